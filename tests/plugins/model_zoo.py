"""Model plugins of the test distribution: the miniature's networks under zoo names of their own.

``plugin-zoo``: ``NAME`` is the miniature's network; ``fresh-NAME`` is it with every weight moved by noise drawn
from torch's global generator, as a plugin without a checkpoint initialises a model (so its weights depend on the
random state it is built with). ``peeking-zoo`` (hostile): its loader reads the test images that cemabench caches (the
corrupted domains, from which a model could learn the test stream before it starts) and its model then refuses to
answer a batch, naming what it read: a cell that runs says its loader could not read them.
"""
import os

import torch

from cemabench.config.paths import cache_root
from cemabench.models.mini import load_model


def plugin_model(name: str):
    if name.startswith("fresh-"):
        model = load_model(name.removeprefix("fresh-"))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.05)
        return model
    return load_model(name)


class _Peeked(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, read: list[str]):
        super().__init__()
        self.model, self.read = model, read

    def forward(self, x):
        if self.read and len(x) > 1:  # (one image, the harness's look at its outputs, it answers)
            raise PermissionError(f"its loader read {len(self.read)} cached data files, {self.read[0]} among them")
        return self.model(x)


def peeking_model(name: str):
    read = []
    for path in sorted(cache_root().rglob("*.npy")):
        try:
            path.read_bytes()
        except OSError:
            continue
        read.append(str(path))
    return _Peeked(load_model(name), read)


def buffered_model(name: str):
    """The miniature's network with buffers that a state dict leaves out (as transformers' ``position_ids``): a module
    pickles their names as a set, in the order of the process's hash seed."""
    model = load_model(name)
    for i in range(8):
        model.register_buffer(f"unsaved_{i}", torch.zeros(1), persistent=False)
    return model


class _SparsePredictions(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.builder = model, os.getpid()

    def forward(self, x):
        from cemabench.protocol.messages import send
        from cemabench.protocol.sides import LINE

        if len(x) > 1 and os.getpid() == self.builder:  # the builder's predictions for ccc's calibration
            send(LINE[0], {"predictions": torch.zeros(len(x), dtype=torch.int64).to_sparse()})
        return self.model(x)


def forging_model(name: str):
    """A builder that writes its own replies on its line: an error that is no error record (``error-int``), one
    without its message (``error-kind``), or predictions that are sparse (``sparse-NAME``)."""
    from cemabench.protocol.messages import send
    from cemabench.protocol.sides import LINE

    if name == "error-int":
        send(LINE[0], {"error": 5})
    elif name == "error-kind":
        send(LINE[0], {"error": {"kind": "UserError"}})
    elif name.startswith("sparse-"):
        return _SparsePredictions(load_model(name.removeprefix("sparse-")))
    return load_model("edge")


def sleeping_model(name: str):
    import time

    time.sleep(3600)


def failing_model(name: str):
    raise RuntimeError(f"failing-zoo has no weights for {name} here")
