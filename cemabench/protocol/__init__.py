"""The online cloud-edge protocol: the one package where its rules live.

- :mod:`.loop`: one run unit, batch by batch (:func:`run_unit`);
- :mod:`.link`: what crosses between edge and cloud, encoded, counted, budgeted and delayed;
- :mod:`.edge`: the forward-only edge and its seal;
- :mod:`.meter`: FLOPs and the forward-only guard, op by op, and samples through forwards;
- :mod:`.stream`: stream orders, blocks and batches for every setting;
- :mod:`.scoring`: predictions recorded at arrival, answers, and the measurements of a cell;
- :mod:`.training`: the offline training stage and its cache;
- :mod:`.execution`: device, threads, timing.

The protocol's configuration (:class:`~cemabench.config.Protocol`) lives in the torch-free :mod:`cemabench.config`.
"""
from cemabench.config import Protocol
from cemabench.protocol import hygiene
from cemabench.protocol.edge import ForwardOnlyEdge
from cemabench.protocol.execution import Execution, check_device
from cemabench.protocol.link import Link, LinkCounters, encode
from cemabench.protocol.loop import Models, run_unit, seed_everything
from cemabench.protocol.meter import ComputeMeter, SampleCounter
from cemabench.protocol.scoring import Diverged, DomainResult

hygiene.seal_harness()  # the harness's code as imported, before any plugin runs (cemabench.protocol.hygiene)

__all__ = ["ComputeMeter", "Diverged", "DomainResult", "Execution", "ForwardOnlyEdge", "Link", "LinkCounters",
           "Models", "Protocol", "SampleCounter", "check_device", "encode", "run_unit", "seed_everything"]
