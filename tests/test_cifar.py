"""CIFAR-10/100(-C) from disk: RobustBench's rows, labels read at call time, precise layout errors, a real run."""
import json
import pickle
import re

import numpy as np
import pytest
import torch

from cemabench.cli import main
from cemabench.datasets.cifar import CORRUPTIONS, PickledDomain, cifar10, cifar10_c, cifar100_c
from cemabench.errors import UserError
from cemabench.models.zoo import tiny_model

N = 20  # images per severity in the generated files (10,000 in the published ones); any N works


def write_c_tree(root, folder="CIFAR-10-C", corruptions=("gaussian_noise", "fog"), n=N, classes=10, seed=0,
                 label_dtype=np.int64):
    """A CIFAR-C tree in the published layout: <corruption>.npy (5n, 32, 32, 3) uint8 and labels.npy (5n,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    where = root / folder
    where.mkdir(parents=True, exist_ok=True)
    np.save(where / "labels.npy", np.tile(labels, 5).astype(label_dtype))
    images = {}
    for corruption in corruptions:
        images[corruption] = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        np.save(where / f"{corruption}.npy", images[corruption])
    return labels, images


def write_batches(root, folder="cifar-10-batches-py", files=("test_batch",), n=N, key="labels", classes=10, seed=1):
    """torchvision's pickled CIFAR batches: dicts with 'data' (n, 3072) uint8, channel planes R, G, B."""
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True, exist_ok=True)
    written = []
    for name in files:
        data, labels = rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, classes, n).tolist()
        with open(root / folder / name, "wb") as handle:
            pickle.dump({"data": data, key: labels}, handle)
        written.append((data, np.asarray(labels)))
    return written


def images_of(domain, order=None, batch_size=7):
    order = np.arange(len(domain)) if order is None else order
    return torch.cat(list(domain.batches(order, batch_size)))


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_rows_of_a_severity_as_robustbench_reads_them(tmp_path, severity):
    labels, images = write_c_tree(tmp_path, label_dtype=np.uint8)
    source = cifar10_c(tmp_path, severity=severity, domains=["fog", "gaussian_noise"])
    assert source.num_classes == 10 and [d.name for d in source.domains] == ["fog", "gaussian_noise"]
    fog = source.domains[0]
    assert len(fog) == N and fog.sample_nbytes == 3072
    expected = images["fog"][(severity - 1) * N:severity * N]
    got = images_of(fog)
    assert got.shape == (N, 3, 32, 32) and got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(expected).permute(0, 3, 1, 2).float() / 255)
    assert fog.labels().dtype == np.int64 and np.array_equal(fog.labels(), labels)
    assert isinstance(fog.pixels, np.memmap)  # memory mapped: a batch reads only its rows
    assert source.clean is None  # no cifar-10-batches-py here


def test_n_examples_takes_the_first_rows_of_the_severity(tmp_path):
    labels, images = write_c_tree(tmp_path)
    domain = cifar10_c(tmp_path, severity=2, domains=["fog"], n_examples=7).domains[0]
    assert len(domain) == 7 and np.array_equal(domain.labels(), labels[:7])
    assert torch.equal(images_of(domain, np.array([6, 0])),
                       torch.from_numpy(images["fog"][[N + 6, N]]).permute(0, 3, 1, 2).float() / 255)


def test_any_n_divisible_by_five_and_cifar100(tmp_path):
    labels, _ = write_c_tree(tmp_path, folder="CIFAR-100-C", corruptions=("snow", "speckle_noise"), n=3,
                             classes=100)
    source = cifar100_c(tmp_path, severity=4, domains=["snow", "speckle_noise"])
    assert source.num_classes == 100 and [len(d) for d in source.domains] == [3, 3]
    assert np.array_equal(source.domains[1].labels(), labels)


def test_labels_are_read_from_disk_at_call_time(tmp_path):
    write_c_tree(tmp_path)
    domain = cifar10_c(tmp_path, domains=["fog"]).domains[0]
    replaced = np.arange(N) % 10
    np.save(tmp_path / "CIFAR-10-C" / "labels.npy", np.tile(replaced, 5))
    assert np.array_equal(domain.labels(), replaced)


def test_clean_cifar10_from_torchvisions_batches(tmp_path):
    [(data, labels)] = write_batches(tmp_path)
    train = write_batches(tmp_path, files=tuple(f"data_batch_{i}" for i in range(1, 6)), n=4, seed=2)
    source = cifar10(tmp_path)
    [test] = source.domains
    assert test.name == "test" and len(test) == N and np.array_equal(test.labels(), labels)
    got = images_of(test)
    assert torch.equal(got, torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255)  # planes R, G, B, row-major
    assert (got[0, :, 0, 1] * 255).round().tolist() == [data[0, 1], data[0, 1025], data[0, 2049]]
    assert isinstance(source.clean, PickledDomain) and len(source.clean) == 20
    assert np.array_equal(source.clean.labels(), np.concatenate([y for _, y in train]))
    assert len(cifar10(tmp_path, n_examples=5).domains[0]) == 5
    write_c_tree(tmp_path)
    assert len(cifar10_c(tmp_path, domains=["fog"]).clean) == 20  # the training split is the cloud's clean data


def run_cli(capsys, root, *extra, dataset="cifar10-c"):
    code = main(["run", "--method", "source", "--dataset", dataset, "--edge", "tiny:edge@10",
                 "--foundation", "tiny:foundation@10", *(["--data-root", str(root)] if root else []), *extra])
    return code, capsys.readouterr()


def expect_error(capsys, root, pattern, *extra):
    code, out = run_cli(capsys, root, *extra)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cemabench: error: "), out.err
    assert re.search(pattern, lines[0]), lines[0]


def test_layout_errors_are_one_line_exit_2(tmp_path, capsys):
    expect_error(capsys, None, r"cifar10-c reads its files from --data-root DIR; expected ROOT/CIFAR-10-C/")
    expect_error(capsys, tmp_path, r"CIFAR-10-C does not exist; expected ROOT/CIFAR-10-C/<corruption>\.npy")
    write_c_tree(tmp_path, corruptions=("fog",))
    expect_error(capsys, tmp_path, r"CIFAR-10-C/snow\.npy is missing; expected ROOT/CIFAR-10-C/<corruption>\.npy "
                 r"\(uint8, shape \(5\*N, 32, 32, 3\)", "--domains", "fog", "snow")
    expect_error(capsys, tmp_path, r"unknown CIFAR-10-C corruption\(s\) smog; valid: gaussian_noise, .*, "
                 r"speckle_noise, clean \(the clean test set, from ROOT/cifar-10-batches-py\)$", "--domains", "smog")
    expect_error(capsys, tmp_path, r"severity must be one of 1, 2, 3, 4, 5 \(got 6\)", "--severity", "6",
                 "--domains", "fog")
    expect_error(capsys, tmp_path, r"n_examples must be an integer from 1 to 20", "--domains", "fog",
                 "--dataset-option", "n_examples=21")
    (tmp_path / "CIFAR-10-C" / "labels.npy").unlink()
    expect_error(capsys, tmp_path, r"CIFAR-10-C/labels\.npy is missing; expected", "--domains", "fog")


@pytest.mark.parametrize("array, found", [
    (np.zeros((100, 32, 32), np.uint8), r"uint8 of shape \(100, 32, 32\)"),
    (np.zeros((100, 32, 32, 3), np.float32), r"float32 of shape \(100, 32, 32, 3\)"),
    (np.zeros((100, 3, 32, 32), np.uint8), r"uint8 of shape \(100, 3, 32, 32\)"),
    (np.zeros((50, 32, 32, 3), np.uint8), r"uint8 of shape \(50, 32, 32, 3\)"),  # labels say 5 * 20 rows
])
def test_wrongly_shaped_or_typed_images_name_file_found_and_expected(tmp_path, capsys, array, found):
    write_c_tree(tmp_path, corruptions=("fog",))
    np.save(tmp_path / "CIFAR-10-C" / "fog.npy", array)
    expect_error(capsys, tmp_path, rf"CIFAR-10-C/fog\.npy holds {found}; expected uint8 of shape "
                 rf"\(5\*N, 32, 32, 3\) with N = 20$", "--domains", "fog")


@pytest.mark.parametrize("labels, message", [
    (np.zeros((5, 20), np.int64), r"labels\.npy holds int64 of shape \(5, 20\); expected integer labels of shape"),
    (np.zeros(100, np.float32), r"labels\.npy holds float32 of shape \(100,\); expected integer labels"),
    (np.zeros(99, np.int64), r"labels\.npy holds int64 of shape \(99,\)"),
    (np.arange(100) % 7, r"the five severity blocks of .*labels\.npy differ"),
    (np.full(100, 10), r"labels\.npy has labels outside 0\.\.9 \(found 10\.\.10\)"),
])
def test_bad_labels_files(tmp_path, capsys, labels, message):
    write_c_tree(tmp_path, corruptions=("fog",))
    np.save(tmp_path / "CIFAR-10-C" / "labels.npy", labels)
    expect_error(capsys, tmp_path, message, "--domains", "fog")


def test_not_an_npy_file(tmp_path):
    write_c_tree(tmp_path, corruptions=("fog",))
    (tmp_path / "CIFAR-10-C" / "fog.npy").write_bytes(b"not numpy")
    with pytest.raises(UserError, match=r"fog\.npy is not a readable \.npy array"):
        cifar10_c(tmp_path, domains=["fog"])


def test_clean_layout_errors(tmp_path):
    with pytest.raises(UserError, match=r"cifar-10-batches-py/test_batch is missing; expected torchvision's layout"):
        cifar10(tmp_path)
    write_batches(tmp_path, files=("test_batch", "data_batch_1"))
    write_c_tree(tmp_path)
    with pytest.raises(UserError, match=r"data_batch_2 is missing"):
        cifar10_c(tmp_path, domains=["fog"])
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as handle:
        pickle.dump({"data": np.zeros((4, 1024), np.uint8), "labels": [0] * 4}, handle)
    with pytest.raises(UserError, match=r"test_batch holds data uint8 \(4, 1024\) and labels of shape \(4,\); "
                                        r"expected uint8 data of shape \(N, 3072\)"):
        cifar10(tmp_path)
    with pytest.raises(UserError, match="cifar10 has one domain, test"):
        cifar10(tmp_path, domains=["fog"])


def test_the_published_corruption_names():
    assert len(CORRUPTIONS) == 19 and CORRUPTIONS[:15][-1] == "jpeg_compression"


def test_tiny_models_take_a_class_count():
    assert tiny_model("edge@10").fc.out_features == 10 and tiny_model("foundation").fc.out_features == 1000
    assert torch.equal(tiny_model("edge@100").stem[0].weight, tiny_model("edge").stem[0].weight)
    with pytest.raises(UserError, match="integer >= 2"):
        tiny_model("edge@one")


def test_a_real_run_of_source_on_generated_cifar10_c(tmp_path, capsys):
    write_c_tree(tmp_path)
    code, out = run_cli(capsys, tmp_path, "--domains", "gaussian_noise", "fog", "--batch-size", "8", "--out",
                        str(tmp_path / "run.json"))
    assert code == 0, out.err
    assert "gaussian_noise" in out.out and "fog" in out.out and "EMBEDDED MINIATURE" not in out.out
    cells = json.loads((tmp_path / "run.json").read_text())["cells"]
    assert [c["domain"] for c in cells] == ["gaussian_noise", "fog"] and all(c["status"] == "ok" for c in cells)


def test_a_real_run_on_the_clean_cifar10_test_set(tmp_path, capsys):
    write_batches(tmp_path)
    code, out = run_cli(capsys, tmp_path, "--batch-size", "8", dataset="cifar10")
    assert code == 0, out.err
    assert "test" in out.out


def test_the_clean_test_set_as_a_domain_beside_the_corruptions(tmp_path, capsys):
    write_c_tree(tmp_path)
    [(data, labels)] = write_batches(tmp_path)
    source = cifar10_c(tmp_path, severity=2, domains=["clean", "fog"], n_examples=15)
    clean = source.domains[0]
    assert [d.name for d in source.domains] == ["clean", "fog"] and len(clean) == 15
    assert torch.equal(images_of(clean), torch.from_numpy(data[:15].reshape(-1, 3, 32, 32)).float() / 255)
    assert np.array_equal(clean.labels(), labels[:15])
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(UserError, match="test_batch is missing"):
        cifar10_c(tmp_path, domains=["clean"])


def test_the_miniature_has_its_clean_test_split_as_a_domain():
    from cemabench.datasets.miniature import clean_test_images, dataset, splits

    source = dataset(domains=["clean", "fog"], severity=3)
    clean = source.domains[0]
    assert clean.name == "clean" and np.array_equal(clean.pixels, splits()["test"][0])
    assert np.array_equal(clean.pixels, clean_test_images())
    assert not np.array_equal(source.domains[1].pixels, clean.pixels)
    with pytest.raises(UserError, match="valid: gaussian_noise.*clean"):
        dataset(domains=["nosuch"])
