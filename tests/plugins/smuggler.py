"""Hostile methods that try to get data across the link without paying for it (issue 22, findings 2-5 and 10). Each
one's edge awaits the cloud's answers; its cloud answers with the foundation model on whatever batch it can rebuild
from what reached it, and with zeros (class 0 everywhere) when it can rebuild nothing."""
from dataclasses import dataclass

import torch

from cemabench.method import CloudLogic, CloudReply, EdgeDecision, EdgeLogic, Method


class ClaimsToBeEmpty(torch.Tensor):
    """An index tensor that says it holds nothing."""

    def __len__(self):
        return 0

    def numel(self):
        return 0


def _batch_from_storage(t: torch.Tensor, shape) -> torch.Tensor | None:
    """The edge batch (``shape``, float32) read back from the storage behind ``t``, if it is there."""
    storage = t.untyped_storage()
    need = int(torch.Size(shape).numel()) * 4
    if storage.nbytes() < need:
        return None
    flat = torch.empty(0, dtype=torch.float32).set_(storage, 0, (need // 4,))
    return flat.reshape(shape).clone()


class _StealingCloud(CloudLogic):
    shape = None  # the batch's shape, told by the edge (what a plugin author's two halves can share)

    def __init__(self, resources, where):
        self.model, self.where = resources.foundation().eval(), where

    def step(self, upload):
        n = len(upload.index)
        batch = _batch_from_storage(self.where(upload), _StealingCloud.shape) if _StealingCloud.shape else None
        with torch.no_grad():
            answers = self.model(batch)[upload.index] if batch is not None else None
        return CloudReply(answers=answers if answers is not None else torch.zeros(n, 10))


class _ViewEdge(EdgeLogic):
    """No inputs up: the cloud gets ``x[:0]``, which used to be a view onto the whole batch."""

    def step(self, model, x):
        _StealingCloud.shape = tuple(x.shape)
        return EdgeDecision(logits=None, upload=torch.arange(len(x)), send_input=False, await_answers=True)


class ViewSmuggler(Method):
    name = "view-smuggler"

    def edge(self, num_classes):
        return _ViewEdge()

    def cloud(self, resources):
        return _StealingCloud(resources, lambda upload: upload.samples)


class _AliasEdge(EdgeLogic):
    """One float32 payload value per sample: a narrow view of the batch, which used to cross with its storage."""

    def step(self, model, x):
        _StealingCloud.shape = tuple(x.shape)
        rows = x.reshape(len(x), -1)[:, :1]
        return EdgeDecision(logits=None, upload=torch.arange(len(x)), send_input=False, await_answers=True,
                            payload={"first": rows}, payload_dtype="float32")


class PayloadAlias(Method):
    name = "payload-alias"

    def edge(self, num_classes):
        return _AliasEdge()

    def cloud(self, resources):
        return _StealingCloud(resources, lambda upload: upload.payload["first"])


class _EmptyClaimEdge(EdgeLogic):
    def step(self, model, x):
        index = torch.arange(len(x)).as_subclass(ClaimsToBeEmpty)
        return EdgeDecision(logits=model(x), upload=index)


class EmptyClaimer(Method):
    name = "empty-claimer"

    def edge(self, num_classes):
        return _EmptyClaimEdge()


class _SparseEdge(EdgeLogic):
    def step(self, model, x):
        values = x.reshape(-1)  # uncoalesced: every value at index 0 of a tensor of size (1,)
        packed = torch.sparse_coo_tensor(torch.zeros(1, len(values), dtype=torch.long), values, (1,))
        return EdgeDecision(logits=model(x), tensors={"stats": packed})


class SparseTensors(Method):
    name = "sparse-tensors"

    def edge(self, num_classes):
        return _SparseEdge()


@dataclass
class _TwoFacedDecision(EdgeDecision):
    """Shows its own logits once (to the validation), then something else to everyone after."""

    reads: int = 0

    def __getattribute__(self, name):
        if name == "logits":
            count = object.__getattribute__(self, "reads") + 1
            object.__setattr__(self, "reads", count)
            if count > 1:
                return torch.zeros_like(object.__getattribute__(self, "logits"))
        return object.__getattribute__(self, name)


class _TwoFacedEdge(EdgeLogic):
    def step(self, model, x):
        return _TwoFacedDecision(logits=model(x))


class TwoFaced(Method):
    name = "two-faced"

    def edge(self, num_classes):
        return _TwoFacedEdge()


# Leaving the process changed for the cells after it (issue 22, finding 8).

class _Predict(EdgeLogic):
    def step(self, model, x):
        return EdgeDecision(logits=model(x))


class LeavesAHook(Method):
    """Registers a process-wide forward hook that zeroes every module's output, and leaves it."""

    name = "leaves-a-hook"

    def edge(self, num_classes):
        torch.nn.modules.module.register_module_forward_hook(
            lambda module, args, out: out * 0 if isinstance(out, torch.Tensor) and out.is_floating_point() else out)
        return _Predict()


class LeavesGradOff(Method):
    """Turns autograd off for the whole process, and leaves it off."""

    name = "leaves-grad-off"

    def edge(self, num_classes):
        torch.set_grad_enabled(False)
        return _Predict()


class _RewritesLabels(EdgeLogic):
    """Predicts class 0 everywhere and writes "labels" that say so wherever the miniature caches its arrays."""

    def step(self, model, x):
        import numpy as np

        from cemabench.datasets import miniature

        folder = miniature.cache_dir() / miniature._generator_fingerprint()
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("test-labels", "train-labels"):
            np.save(folder / f"{name}.npy", np.zeros(len(miniature.clean_test_images()), dtype=np.int64))
        logits = torch.zeros(len(x), 10)
        logits[:, 0] = 1
        return EdgeDecision(logits=logits)


class RewritesLabels(Method):
    """Issue 22, finding 1: rewrites the cached labels with its own predictions."""

    name = "rewrites-labels"

    def edge(self, num_classes):
        return _RewritesLabels()


class _ZeroSizes(torch.overrides.TorchFunctionMode):
    """Makes every tensor say it has no elements, to whoever asks through torch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.numel, torch.Tensor.nelement):
            return 0
        return func(*args, **(kwargs or {}))


class _LeavesAModeEntered(EdgeLogic):
    def step(self, model, x):
        _ZeroSizes().__enter__()  # and never leaves it: the link's byte count would run under it
        return EdgeDecision(logits=model(x), upload=torch.arange(len(x)))


class LeavesAModeEntered(Method):
    """Reviewer's finding: a function mode left entered made the link charge 0 bytes for the batch."""

    name = "leaves-a-mode-entered"

    def edge(self, num_classes):
        return _LeavesAModeEntered()


class _LongKeys(EdgeLogic):
    def step(self, model, x):
        return EdgeDecision(logits=model(x), tensors={"A" * 100_000: torch.empty(0)})


class LongKeys(Method):
    """Reviewer's finding: tensor names are not charged, so a long one carried data for free."""

    name = "long-keys"

    def edge(self, num_classes):
        return _LongKeys()


# The cloud reaching into the edge (issue 22, finding 12).

class _ReachingCloud(CloudLogic):
    """Finds the edge's model through the garbage collector and moves its BatchNorm statistics (or, with
    ``swap``, replaces a parameter or a buffer with a new tensor), sending nothing down."""

    def __init__(self, resources, swap):
        self.replica, self.swap = resources.edge_replica(), swap

    def step(self, upload):
        import gc

        from torch import nn

        edges = [o for o in gc.get_objects() if type(o).__name__ == "ForwardOnlyEdge"]
        for edge in edges:
            for m in edge.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    if self.swap == "parameter":
                        m.weight = nn.Parameter(m.weight.detach() * 2, requires_grad=False)
                    elif self.swap == "buffer":
                        m.running_var = m.running_var * 2  # a new tensor in the buffer's place
                    else:
                        with torch.no_grad():
                            m.running_mean.add_(0.5)
                    break
        return None


class ReachesIntoTheEdge(Method):
    name = "reaches-into-the-edge"

    def edge(self, num_classes):
        return _Predict()

    def cloud(self, resources):
        return _ReachingCloud(resources, swap=None)


class SwapsAnEdgeParameter(Method):
    name = "swaps-an-edge-parameter"

    def edge(self, num_classes):
        return _Predict()

    def cloud(self, resources):
        return _ReachingCloud(resources, swap="parameter")


class SwapsAnEdgeBuffer(Method):
    name = "swaps-an-edge-buffer"

    def edge(self, num_classes):
        return _Predict()

    def cloud(self, resources):
        return _ReachingCloud(resources, swap="buffer")


# Forged results (issue 22, finding 6).

class _ForgesRecords(EdgeLogic):
    """Finds the harness's scheduler through the garbage collector and stores a perfect record, under its key, for
    every unit it has queued; then predicts honestly."""

    def step(self, model, x):
        import dataclasses
        import gc

        from cemabench.protocol.scoring import DomainResult

        for scheduler in [o for o in gc.get_objects() if type(o).__name__ == "Scheduler"]:
            for unit in list(getattr(scheduler, "queue", [])):
                results = []
                for device, name in unit.expected:
                    result = DomainResult(name, device=device)
                    result.seen = result.correct = 1000
                    results.append(result.to_dict())
                scheduler.store.put(scheduler.keys[unit.id], {"unit": dataclasses.asdict(unit), "results": results})
        return EdgeDecision(logits=model(x))


class ForgesRecords(Method):
    name = "forges-records"

    def edge(self, num_classes):
        return _ForgesRecords()


# Poisoned artefacts (issue 22, finding 7).

class PoisonsAnArtefact(Method):
    """Its training stage computes ecc-independent's training key (at the options in the environment's
    CEMABENCH_TEST_VICTIM, JSON) and stores, under it, that method's trained artefact with every weight zeroed."""

    name = "poisons-an-artefact"

    def edge(self, num_classes):
        return _Predict()

    def train(self, resources):
        import json
        import os

        from cemabench import registry
        from cemabench.config.paths import cache_root
        from cemabench.protocol.training import train_here, training_key

        victim = registry.build_method("ecc-independent", json.loads(os.environ.get("CEMABENCH_TEST_VICTIM", "{}")))
        state = train_here(victim, resources)
        path = cache_root() / "artefacts" / f"{training_key(victim, resources)}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: torch.zeros_like(v) for k, v in state.items()}, path)
        return {"nothing": torch.zeros(1)}


class _ZeroesItsFlops(EdgeLogic):
    def step(self, model, x):
        from cemabench.protocol.meter import ComputeMeter

        ComputeMeter.take = lambda self: 0  # the edge's FLOPs, reported as none
        return EdgeDecision(logits=model(x))


class ZeroesItsFlops(Method):
    """Replaces the meter's reading in its own process. Run it isolated only: in-process the patch would stay in the
    test's process, which then (rightly) runs no more units."""

    name = "zeroes-its-flops"

    def edge(self, num_classes):
        return _ZeroesItsFlops()


# Ways out of an isolated half (a hostile review of --isolate). Run them isolated only: in-process they would act on
# the test's own process.

class _Escapes(EdgeLogic):
    def __init__(self, how):
        self.how = how

    def step(self, model, x):
        import os
        import signal
        import socket

        if self.how == "shared-memory":  # a side channel to the cloud half, or to the next unit
            torch.save(x, "/dev/shm/cemabench-test-batch")
        elif self.how == "signal":  # stop the process that forks the halves: every later unit would wait for it
            os.kill(os.getppid(), signal.SIGSTOP)
        elif self.how == "tcp":  # a service of this user's (a Ray head, say) runs code outside the sandbox
            socket.create_connection(("127.0.0.1", 6379), timeout=5)
        elif self.how == "unix-socket" and not getattr(self, "told", False):  # a service listening on a path (a
            self.told = True                                                   # Ray raylet's, a Docker daemon's)
            with socket.socket(socket.AF_UNIX) as line:
                line.connect(os.environ["CEMABENCH_TEST_SOCKET"])
                line.sendall(b"the labels, please")
        elif self.how == "sysv-shm":  # the batch left in System V shared memory, for the cloud half or the next unit
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.shmget(0x63656D61, 1 << 20, 0o1000 | 0o600) < 0:  # IPC_CREAT
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        elif self.how == "posix-queue":  # the batch in a POSIX message queue, for the cloud half or the next unit
            import ctypes
            import ctypes.util

            rt = ctypes.CDLL(ctypes.util.find_library("rt") or "librt.so.1", use_errno=True)
            if rt.mq_open(b"/cemabench-test-batch", os.O_CREAT | os.O_RDWR, 0o600, None) < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        elif self.how == "file-lock":  # locks on ranges of a file both halves read: a bit each for the cloud half
            import fcntl

            with open(torch.__file__, "rb") as readable:
                fcntl.lockf(readable, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, int(x.flatten()[0] * 255))
        elif self.how == "inotify":  # the cloud half told which files the edge read (a review's plugin: the batch)
            import ctypes

            if ctypes.CDLL(None, use_errno=True).inotify_init1(0) < 0:
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        elif self.how == "socket-pair":  # bound to abstract names the other half lists in /proc/self/net/unix
            socket.socketpair()
        elif self.how == "lease":  # a lease on a file both halves read, shown in /proc/locks: a bit for the other
            import fcntl

            with open(torch.__file__, "rb") as readable:
                fcntl.fcntl(readable, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        elif self.how == "shared-mapping":  # a futex in a page of a file both halves map: woken by the other half
            import mmap

            with open(torch.__file__, "rb") as readable:
                mmap.mmap(readable.fileno(), 4096, mmap.MAP_SHARED, mmap.PROT_READ)
        elif self.how == "namespace":  # capabilities of its own in a user namespace, which the other half reads
            import ctypes

            if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:  # CLONE_NEWUSER
                raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        elif self.how == "shared-page":  # a page the other half maps too (from the zygote): a futex both see
            with open("/proc/self/maps") as maps:
                shared = [line.split()[-1] for line in maps if line.split()[1][3] == "s"]
            if shared:
                raise RuntimeError(f"shares {', '.join(shared)} with the other half")
            raise PermissionError(1, "Operation not permitted: no page shared")  # (what the test reads)
        elif self.how == "nice":  # the zygote at nice 19: every later half inherits it
            os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)
        elif self.how == "sigio":  # the zygote made the owner of a pipe, whose I/O then signals it (SIGIO ends it)
            import fcntl

            read, write = os.pipe()
            fcntl.fcntl(read, fcntl.F_SETOWN, os.getppid())
            fcntl.fcntl(read, fcntl.F_SETFL, os.O_ASYNC)
            os.write(write, b"!")
        elif self.how == "proc":  # another process's command line: the loop's names its folders, and a half can
            with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:  # rewrite its own for the other half to read
                f.read()
        elif self.how == "prlimit":  # the zygote's memory limit lowered: every later unit of every method fails
            import resource

            resource.prlimit(os.getppid(), resource.RLIMIT_DATA, (64 << 20, 64 << 20))
        elif self.how == "udp":  # a datagram out, to this machine or any other
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as line:
                line.sendto(b"the stream's order", ("127.0.0.1", 9))
        elif self.how == "terminal":  # type into the user's shell
            with open("/dev/tty", "rb"):
                pass
        elif self.how == "read-file":  # a dataset's labels, the results folder: any file of this user's
            with open(os.environ["CEMABENCH_TEST_PRIVY_PATH"], "rb") as f:
                f.read()
        elif self.how == "read-cache":  # the corrupted images and the training artefacts
            from cemabench.config.paths import cache_root

            os.listdir(cache_root())
        elif self.how == "environment":  # printed in the table the user publishes
            with open("/proc/self/environ", "rb") as f:  # (the process's first environment, kept in its memory)
                first = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            found = sorted({v for v in (*os.environ.values(), *(v.decode() for v in first.values()))
                            if "not-a-real" in v or "notareal" in v})
            if found:
                raise PermissionError(f"found {', '.join(found)}")
        elif self.how == "stat" and os.path.exists(os.environ["CEMABENCH_TEST_PRIVY_PATH"]):  # which files exist: an
            raise FileExistsError(f"found {os.environ['CEMABENCH_TEST_PRIVY_PATH']}")  # ImageNet file's class folder
        return EdgeDecision(logits=model(x))


class Escapes(Method):
    name = "escapes"

    @dataclass
    class Options:
        how: str = "shared-memory"

    def edge(self, num_classes):
        return _Escapes(self.options.how)


class _ClaimsOk(EdgeLogic):
    def __init__(self):
        self.batches = 0

    def step(self, model, x):
        from cemabench.errors import HalfFailed

        self.batches += 1
        if self.batches == 3:  # scored over the two batches it got right, were the status its to give
            raise HalfFailed("all is well", "ok")
        return EdgeDecision(logits=model(x))


class ClaimsOk(Method):
    """Ends its cell with an error that names the status "ok" (a hostile review of --isolate)."""

    name = "claims-ok"

    def edge(self, num_classes):
        return _ClaimsOk()
