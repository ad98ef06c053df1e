"""Dataset plugins of the test distribution: the miniatures under names of their own.

``plugin-digits`` and ``plugin-boxes`` are the classification and detection miniatures (the first with its corruption
generator, for the ccc setting). ``writing-digits`` (hostile) is ``plugin-digits`` whose factory first writes a file
where cemabench keeps its trained artefacts, as one that replaced an artefact would: in its own process it finds
only a cache of its own, and no other folder it may write.
"""
import contextlib

from cemabench.config.paths import cache_root
from cemabench.datasets import corruptions, miniature, minidet

MARK = "written-by-a-dataset-plugin"


def plugin_digits(data_root=None, severity=5, domains=corruptions.HENDRYCKS_ORDER, **options):
    return miniature.dataset(data_root=data_root, severity=severity, domains=domains, **options)


def plugin_boxes(data_root=None, severity=5, domains=corruptions.HENDRYCKS_ORDER):
    return minidet.dataset(data_root=data_root, severity=severity, domains=domains)


def writing_digits(data_root=None, severity=5, domains=corruptions.HENDRYCKS_ORDER, **options):
    for root in (cache_root(), cache_root().parent.parent):  # (apart, its own cache is CACHE/datasets/NAME)
        with contextlib.suppress(OSError):
            (root / "artefacts" / MARK).write_text("a dataset plugin was here")
    return plugin_digits(data_root, severity, domains, **options)


def random_digits(data_root=None, severity=5, domains=corruptions.HENDRYCKS_ORDER):
    """``plugin-digits`` on a number of images drawn from NumPy's global generator while it is built."""
    import numpy as np

    return plugin_digits(data_root, severity, domains, n_examples=int(np.random.randint(100, 300)))


class _Forging:
    """A domain whose reader writes its own reply on its line before the real one: images or labels whose few bytes
    stand for gigabytes (a view of one value, expanded)."""

    def __init__(self, domain, how):
        self.domain, self.how = domain, how
        self.name, self.sample_nbytes = domain.name, domain.sample_nbytes

    def __len__(self):
        return len(self.domain)

    def _forge(self, reply):
        import torch

        from cemabench.protocol.messages import pack, rng_state
        from cemabench.protocol.sides import LINE

        LINE[0].send_bytes(pack({**reply, "rng": rng_state(torch.device("cpu"))}))

    def images(self, indices):
        import torch

        if self.how == "huge-images":
            self._forge({"images": torch.zeros(1).expand(len(indices), 3, 4000, 4000)})
        return self.domain.images(indices)

    def labels(self):
        import torch

        if self.how == "huge-labels":
            self._forge({"labels": torch.zeros(1, dtype=torch.int64).expand(2 ** 36)})
        return self.domain.labels()

    def batches(self, order, batch_size, pin_memory=False):
        from cemabench.data import sequential_batches

        return sequential_batches(self, order, batch_size, pin_memory)


def forging_digits(data_root=None, severity=5, domains=corruptions.HENDRYCKS_ORDER, how="huge-images", **options):
    """``plugin-digits`` whose reader forges replies (``how``): ``huge-images``, ``huge-labels``, or
    ``deep-provenance``, a build reply whose provenance is JSON nested past the parser's depth."""
    source = plugin_digits(data_root, severity, domains, **options)
    if how == "deep-provenance":
        import os

        from cemabench.protocol.messages import send
        from cemabench.protocol.sides import LINE

        send(LINE[0], {"name": "x", "num_classes": 10, "task": "classification", "is_miniature": True,
                       "clean_hint": "", "provenance": "[" * 100000 + "]" * 100000, "scored_classes": None,
                       "domains": [], "clean": None, "corruptor": None})
        os._exit(0)
    source.domains = [_Forging(d, how) for d in source.domains]
    return source


def unnamed_digits(data_root=None, severity=5, domains=corruptions.HENDRYCKS_ORDER, **options):
    """``plugin-digits`` whose provenance leaves out the dataset's name (which the table's header reads)."""
    source = plugin_digits(data_root, severity, domains, **options)
    source.provenance = {k: v for k, v in source.provenance.items() if k != "dataset"}
    return source


def failing_digits(data_root=None, severity=5, domains=corruptions.HENDRYCKS_ORDER, **options):
    raise ValueError("failing-digits reads its files from --data-root DIR")
