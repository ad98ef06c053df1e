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
