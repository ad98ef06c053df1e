"""cemabench: a benchmark harness for cloud-edge test-time adaptation."""

from cemabench import _moved
from cemabench.config import numerics

numerics.pin()  # before torch computes anything in this process (cemabench.config.numerics)

__version__ = "0.1.0"

_moved.install()  # the pre-0.2 module paths, for one release
