"""The embedded miniature: scikit-learn's handwritten digits as a 10-class, 32-pixel ImageNet-C look-alike.

It exists so that every table spec runs on a laptop CPU with no download. Its two networks, with their shipped
weights, are the ``mini:`` models (:mod:`cemabench.models.mini`). Its numbers say whether the code path
works and how methods rank on a small shift; they are not ImageNet-C numbers, and every output says so.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import io
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cemabench.config.paths import cache_root
from cemabench.data import ArrayDomain, Corruptor, DatasetSource
from cemabench.datasets import corruptions
from cemabench.errors import UserError

IMAGE_SIZE = 32
TEST_FRACTION = 0.6
SPLIT_SEED = 0


SPLIT_FILE = Path(__file__).with_name("miniature_split.npz")  # what derive_split gives, shipped with the package
# its digest: the labels are what the miniature is scored against, and a file can be rewritten by any code that runs
# as the user (issue 22, finding 1); a changed file is refused, not read
SPLIT_SHA256 = "43445ab11e9b2f149e7f3aad867376e5220b080e5bbff2fbec7a4f58338e2897"


def derive_split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The digits' labels and the fixed, stratified split's train and test indices, from scikit-learn: what
    :data:`SPLIT_FILE` holds (``tests/test_miniature.py`` compares them). Shipped, they cost no scikit-learn import
    (about 2 s) in a process that only scores, and a scikit-learn release that split differently could not move the
    miniature's numbers."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=TEST_FRACTION, random_state=SPLIT_SEED,
                                           stratify=labels)
    return labels, train_idx.astype(np.int64), test_idx.astype(np.int64)


def write_split() -> None:
    """Write :data:`SPLIT_FILE` from :func:`derive_split` (``python -c "from cemabench.datasets.miniature import
    write_split; write_split()"``); then set :data:`SPLIT_SHA256` to its digest."""
    labels, train_idx, test_idx = derive_split()
    np.savez(SPLIT_FILE, labels=labels.astype(np.uint8), train=train_idx.astype(np.int16),
             test=test_idx.astype(np.int16))


@functools.lru_cache(maxsize=1)
def _split_bytes() -> tuple[bytes, bytes, bytes]:
    """The labels and the split, read once per process from :data:`SPLIT_FILE` (checked against
    :data:`SPLIT_SHA256`) and kept as immutable bytes, which no array handed out can write into."""
    data = SPLIT_FILE.read_bytes()
    if hashlib.sha256(data).hexdigest() != SPLIT_SHA256:
        raise RuntimeError(f"{SPLIT_FILE} is not the file cemabench shipped (its digest differs): the miniature's "
                           f"labels would be wrong; reinstall cemabench")
    with np.load(io.BytesIO(data)) as shipped:
        return tuple(shipped[k].astype(np.int64).tobytes() for k in ("labels", "train", "test"))


def _split() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh copies of the digits' labels and the split's train and test indices."""
    return tuple(np.frombuffer(b, dtype=np.int64).copy() for b in _split_bytes())


def splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Clean uint8 images (N, 32, 32, 3) and labels for the fixed, stratified train and test splits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    large = F.interpolate(small, size=IMAGE_SIZE, mode="bilinear", align_corners=False).clamp(0, 1)
    images = (large.repeat(1, 3, 1, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    labels, train_idx, test_idx = _split()
    return {"train": (images[train_idx], labels[train_idx]), "test": (images[test_idx], labels[test_idx])}


def cache_dir() -> Path:
    """Where the miniature's generated arrays are kept (under :func:`cemabench.config.paths.cache_root`)."""
    return cache_root() / "miniature"


def _generator_fingerprint() -> str:
    source = inspect.getsource(corruptions) + inspect.getsource(splits)
    return hashlib.sha256(source.encode()).hexdigest()[:12]


def _cached(name: str, make) -> np.ndarray:
    """An array generated once by ``make()`` and kept on disk under the generator's fingerprint."""
    path = cache_dir() / _generator_fingerprint() / f"{name}.npy"
    if path.exists():
        return np.load(path)
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    return out


def corrupted_test_images(corruption: str, severity: int) -> np.ndarray:
    """The test split under one corruption, generated once from a fixed seed and cached on disk."""
    def make():
        seed = int.from_bytes(hashlib.sha256(f"miniature/{corruption}/{severity}".encode()).digest()[:8], "little")
        return corruptions.corrupt(splits()["test"][0], corruption, severity, np.random.default_rng(seed))

    return _cached(f"{corruption}-{severity}", make)


CLEAN = "clean"  # the domain name of the uncorrupted test split


def clean_test_images() -> np.ndarray:
    return _cached("test-images", lambda: splits()["test"][0])


def stream_labels() -> np.ndarray:
    """The test split's labels, derived from scikit-learn's digits (once per process, then copied from immutable
    bytes on every call): the harness reads them only to score, and not from the writable cache, where a plugin could
    rewrite them (issue 22, finding 1)."""
    labels, _, test_idx = _split()
    return labels[test_idx]


def _train_split() -> tuple[np.ndarray, np.ndarray]:
    labels, train_idx, _ = _split()
    return _cached("train-images", lambda: splits()["train"][0]), labels[train_idx]


def train_labels() -> np.ndarray:
    """The clean training split's labels (a module-level function, so that the split pickles)."""
    return _train_split()[1]


def check_choice(what: str, data_root, severity: int, domains) -> None:
    """An embedded miniature (``what``) takes no data root, and only its corruption domains (and ``clean``) at
    severities 1 to 5."""
    if data_root is not None:
        raise UserError(f"the embedded {what} takes no --data-root (got {data_root}); leave it out, or name the "
                        f"dataset that lives there with --dataset (e.g. imagenet-c)")
    unknown = [d for d in domains if d not in corruptions.CORRUPTIONS and d != CLEAN]
    if unknown:
        raise UserError(f"unknown domain(s) {', '.join(unknown)} for the {what}; valid: "
                        f"{', '.join(corruptions.HENDRYCKS_ORDER)}, {CLEAN}")
    if severity not in (1, 2, 3, 4, 5):
        raise UserError(f"severity must be one of 1, 2, 3, 4, 5 (got {severity})")


def _first_labels(count: int | None) -> np.ndarray:
    """The stream's labels, the first ``count`` of them (all for None): module-level, so that a domain pickles."""
    return stream_labels()[:count]


def dataset(data_root=None, severity: int = 5, domains=corruptions.HENDRYCKS_ORDER,
            n_examples: int | None = None) -> DatasetSource:
    """Factory of the ``miniature-digits-c`` dataset: one domain per corruption at the given severity, and ``clean``
    (the uncorrupted test split, the same at every severity) where a table wants the clean stream beside them.
    ``n_examples``: each domain's first N images only (a quicker look, as RobustBench's ``n_examples`` and the CIFAR
    datasets' option; default: all of them)."""
    check_choice("miniature", data_root, severity, domains)
    available = len(stream_labels())
    if n_examples is not None and (type(n_examples) is not int or not 1 <= n_examples <= available):
        raise UserError(f"miniature-digits-c n_examples must be an integer from 1 to {available} (the images per "
                        f"domain), got {n_examples!r}")
    train_images, _ = _train_split()
    labels = stream_labels if n_examples is None else functools.partial(_first_labels, n_examples)
    domains = [ArrayDomain(d, (clean_test_images() if d == CLEAN else corrupted_test_images(d, severity))[:n_examples],
                           labels) for d in domains]
    return DatasetSource(
        name="miniature-digits-c",
        num_classes=10,
        domains=domains,
        clean=ArrayDomain("clean-train", train_images, train_labels),
        is_miniature=True,
        provenance={"dataset": "miniature-digits-c (EMBEDDED MINIATURE)", "severity": severity,
                    "images_per_domain": len(domains[0]) if domains else 0, "image_size": IMAGE_SIZE,
                    "generator": _generator_fingerprint()},
        corruptor=Corruptor(clean_test_images, stream_labels, corruptions.corrupt),
    )

