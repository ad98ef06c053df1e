import numpy as np
import pytest
import torch

from cemabench.datasets import miniature
from cemabench.datasets.corruptions import HENDRYCKS_ORDER
from cemabench.errors import UserError
from cemabench.models.mini import load_model, train


def _accuracy(model, images, labels):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return float((model(x).argmax(1).numpy() == labels).mean() * 100)


def test_splits_are_fixed_disjoint_and_stratified():
    s = miniature.splits()
    (train_x, train_y), (test_x, test_y) = s["train"], s["test"]
    assert len(train_y) + len(test_y) == 1797 and len(test_y) == 1079
    assert set(np.bincount(test_y)) <= set(range(100, 112))
    assert not {x.tobytes() for x in train_x[:200]} & {x.tobytes() for x in test_x}


def test_the_shipped_labels_and_split_are_scikit_learns():
    """The package ships the digits' labels and the split (a process that only scores imports no scikit-learn); they
    are what scikit-learn derives, and the labels are those of the images the miniature generates."""
    shipped = miniature._split()
    derived = miniature.derive_split()
    assert all(np.array_equal(a, b) for a, b in zip(shipped, derived))
    from sklearn.datasets import load_digits

    assert np.array_equal(miniature.stream_labels(), load_digits().target[derived[2]])


def test_a_rewritten_split_file_is_refused_not_read(tmp_path, monkeypatch):
    """Issue 22, finding 1, for the shipped file: code running as the user can rewrite it, and the labels in it are
    what every miniature cell is scored against. Its digest is in the source; a file that differs is not read."""
    labels, train, test = miniature._split()
    forged = tmp_path / "miniature_split.npz"
    np.savez(forged, labels=np.zeros_like(labels, dtype=np.uint8), train=train.astype(np.int16),
             test=test.astype(np.int16))
    monkeypatch.setattr(miniature, "SPLIT_FILE", forged)
    miniature._split_bytes.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="is not the file cemabench shipped"):
            miniature.stream_labels()
    finally:
        miniature._split_bytes.cache_clear()


def test_cached_domain_equals_a_fresh_generation(tmp_path, monkeypatch):
    first = miniature.corrupted_test_images("snow", 2)
    monkeypatch.setenv("CEMABENCH_CACHE", str(tmp_path))
    assert not any(tmp_path.iterdir())
    fresh = miniature.corrupted_test_images("snow", 2)
    assert np.array_equal(first, fresh)
    assert np.array_equal(fresh, miniature.corrupted_test_images("snow", 2))


@pytest.mark.slow  # 32 s: it generates all 15 corruptions at severity 5 (the default tier's time is kept under 5 min)
def test_miniature_is_informative_at_severity_5():
    """Corruption must hurt the source edge model, and the foundation model must leave room to help it."""
    edge, foundation = load_model("edge"), load_model("foundation")
    clean_x, labels = miniature.splits()["test"]
    clean = _accuracy(edge, clean_x, labels)
    corrupted = [_accuracy(edge, miniature.corrupted_test_images(c, 5), labels) for c in HENDRYCKS_ORDER]
    teacher = [_accuracy(foundation, miniature.corrupted_test_images(c, 5), labels) for c in HENDRYCKS_ORDER]
    assert clean > 95
    assert np.mean(corrupted) < clean - 20
    assert np.mean(teacher) > np.mean(corrupted) + 20


def test_unknown_domain_and_model_are_user_errors():
    with pytest.raises(UserError, match="unknown domain.*rain.*valid: gaussian_noise"):
        miniature.dataset(domains=["rain"])
    with pytest.raises(UserError, match="unknown model mini:huge; valid: mini:edge"):
        load_model("huge")


def test_training_script_is_deterministic():
    a, acc_a = train.train("edge", epochs_scale=1 / 30)
    b, acc_b = train.train("edge", epochs_scale=1 / 30)
    assert acc_a == acc_b
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_n_examples_keeps_each_domains_first_images_and_their_labels():
    whole = miniature.dataset(domains=("fog", "clean"))
    first = miniature.dataset(domains=("fog", "clean"), n_examples=100)
    for a, b in zip(whole.domains, first.domains, strict=True):
        assert len(b) == 100 and np.array_equal(b.pixels, a.pixels[:100])
        assert np.array_equal(b.labels(), a.labels()[:100])
    assert first.provenance["images_per_domain"] == 100 and len(first.clean) == len(whole.clean)  # training: whole
    import pickle

    assert np.array_equal(pickle.loads(pickle.dumps(first.domains[0].label_source))(), whole.domains[0].labels()[:100])
