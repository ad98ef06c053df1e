"""Method plugins that attack the planner (``--isolate``): the process where the harness asks a method's class what
it declares. Each misbehaves only there (where its confinement is set), so that it plans honestly in-process."""
import gc
import os
import time
from multiprocessing.connection import Connection

from cemabench.method import EdgeDecision, EdgeLogic, Method


class _Predict(EdgeLogic):
    def step(self, model, x):
        return EdgeDecision(model(x))


def _in_a_planner() -> bool:
    from cemabench.protocol import zygote

    return zygote.SANDBOX != ""  # set in a half's process (a planner is one) before any method code is imported


class _Source(Method):
    def edge(self, num_classes):
        return _Predict()


class PlannerSleeps(_Source):
    """Never answers whether it can run under the protocol: a planner that hangs must not hang the table."""

    name = "planner-sleeps"

    @classmethod
    def check_protocol(cls, protocol):
        if _in_a_planner():
            time.sleep(1e6)


class ForgesItsRandomState(_Source):
    """Writes its own answer onto the planner's line, with a random state that is not one, and ends its process."""

    name = "forges-its-random-state"

    @classmethod
    def check_protocol(cls, protocol):
        if _in_a_planner():
            from cemabench.protocol.messages import pack

            line = next(o for o in gc.get_objects() if isinstance(o, Connection) and not o.closed)
            line.send_bytes(pack({"rng": {"python": 1}}))
            os._exit(0)


_BUILT = [0]


class ChangesItsReference(_Source):
    """Declares no reference point while it is checked, then a list of numbers when its paper is asked for."""

    name = "changes-its-reference"
    reference = None

    def __init__(self, **options):
        super().__init__(**options)
        _BUILT[0] += 1
        if _in_a_planner() and _BUILT[0] >= 3:  # after its checks (two builds), before the document is asked for
            type(self).reference = [1, 2, 3]


class NamedOtherwise(_Source):
    """An honest method whose class names itself otherwise than its entry point (named-otherwise)."""

    name = "otherwise"
