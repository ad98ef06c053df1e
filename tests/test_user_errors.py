"""User mistakes with data roots, devices and unreadable images: one line that names the problem, exit 2, before
any compute (an unreadable image fails its cell, with the file's path first)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cemabench.cli import main
from conftest import write_spec

NO_GPU = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a dataset")
    return str(path)


@pytest.mark.parametrize("arguments, message", [
    (["--dataset", "imagenet-c"], "the imagenet-c dataset needs --data-root DIR, the folder that holds imagenet-c/"),
    (["--dataset", "imagenet-r"], "the imagenet-r dataset needs --data-root DIR, the folder that holds imagenet-r/"),
    (["--dataset", "hf", "--domains", "fog"], "the hf dataset needs --data-root"),
    (["--dataset", "imagenet-c", "--data-root", "FILE"], "--data-root FILE is not a directory; point it at the folder"),
    (["--data-root", "A_DIR"], "the embedded miniature takes no --data-root (got A_DIR)"),
    (["--device", NO_GPU], f"--device {NO_GPU}: this machine has "),
    (["--device", "nosuch"], "--device 'nosuch' is not a device; valid here: cpu"),
    (["--device", "meta"], "--device meta: not available here; valid here: cpu"),
], ids=["imagenet-c-no-root", "imagenet-r-no-root", "hf-no-root", "root-is-a-file", "miniature-with-root",
        "no-such-gpu", "no-such-device", "meta-device"])
def test_run_mistakes_are_one_line_and_exit_2(arguments, message, a_file, tmp_path, capsys):
    arguments = [{"FILE": a_file, "A_DIR": str(tmp_path)}.get(a, a) for a in arguments]
    assert main(["run", "--method", "source", *arguments]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("cemabench: error: ") and captured.err.count("\n") == 1
    assert message.replace("FILE", a_file).replace("A_DIR", str(tmp_path)) in captured.err


@pytest.mark.parametrize("device", [NO_GPU, "nosuch"])
def test_reproduce_checks_the_device_before_anything_runs(device, tmp_path, capsys):
    spec = write_spec(tmp_path / "small.toml", ["source"])
    assert main(["reproduce", spec, "--out", str(tmp_path / "out"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cemabench: error: --device ") and device in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # 11 s: DataLoader worker processes; kept out of the default tier's 5 minutes
def test_a_dataloader_worker_failure_names_the_image_first(tmp_path, capsys):
    folder = tmp_path / "imagenet-c" / "fog" / "5" / "n01440764"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((224, 224, 3), dtype=np.uint8)).save(folder / "good.JPEG")
    (folder / "bad.JPEG").write_bytes(b"not a jpeg")
    out = tmp_path / "run.json"
    assert main(["run", "--method", "source", "--dataset", "imagenet-c", "--data-root", str(tmp_path), "--domains",
                 "fog", "--edge", "tiny:edge", "--foundation", "tiny:foundation", "--dataset-option", "workers=1",
                 "--out", str(out)]) == 3
    (cell,) = json.loads(out.read_text())["cells"]
    first = cell["message"].splitlines()[0]
    assert first.startswith(f"DataError: cannot read image {folder / 'bad.JPEG'}: ")
    assert first.endswith("(DataError in DataLoader worker process 0)")
    assert capsys.readouterr().err.splitlines()[0] == f"fog: error: {first}"


@pytest.mark.parametrize("command", [["reproduce", "table2", "--out", "/proc/cemabench-nope"],
                                     ["sweep", "cema-emin", "--out", "/proc/cemabench-nope"],
                                     ["run", "--method", "source", "--domains", "fog", "--out", "/proc/nope/x.json"],
                                     ["run", "--method", "source", "--domains", "fog", "--store", "/proc/nope"]])
def test_an_unwritable_output_is_one_line_before_any_compute(command, capsys, monkeypatch):
    from cemabench.run import runner

    monkeypatch.setattr(runner, "reproduce", lambda *a, **k: pytest.fail("computed before checking the output"))
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("cemabench: error: --") and "cannot be written" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", [["reproduce", "table2", "--out", "{file}/out"],
                                     ["reproduce", "table2", "--out", "{file}"],
                                     ["run", "--method", "source", "--domains", "fog", "--out", "{file}/x.json"],
                                     ["run", "--method", "source", "--domains", "fog", "--out", "{file}/a/x.json"]])
def test_an_output_under_a_file_names_that_file(command, tmp_path, capsys, monkeypatch):
    """A new user's trial: under a file, ``run --out`` said only "(File exists)", and ``reproduce`` "(Not a
    directory)"; the line now names the file that is in the way."""
    from cemabench.run import runner

    monkeypatch.setattr(runner, "reproduce", lambda *a, **k: pytest.fail("computed before checking the output"))
    file = tmp_path / "a-file"
    file.write_text("")
    assert main([part.format(file=file) for part in command]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot be written: {file} is a file, not a folder" in err


@pytest.mark.slow  # a fresh process (timm's first import warns once per process): about 8 s
def test_a_data_root_error_is_one_line_in_a_fresh_process(tmp_path):
    """A new user's trial: torch's two-line FutureWarning from timm's import (torch.jit.interface) came before the
    error's one line."""
    done = subprocess.run([sys.executable, "-m", "cemabench.cli", "reproduce", "table2", "--out", str(tmp_path / "o"),
                           "--data-root", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("cemabench: error: ") \
        and "imagenet-c/gaussian_noise/5 does not exist" in done.stderr


def test_a_pair_unknown_on_the_miniature_names_the_real_datas_pairs(tmp_path, capsys):
    """A new user's trial: ``--pair`` on the miniature answered "pairs: (none)", naming no valid pair."""
    assert main(["reproduce", "table2", "--pair", "r18-r1O1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "on the embedded miniature; pairs: (none); with --data-root: r18-r101," in err
    assert not (tmp_path / "o").exists()


def test_run_out_naming_a_folder_is_one_line(tmp_path, capsys):
    assert main(["run", "--method", "source", "--domains", "fog", "--out", str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


GENERATED = ["--data-root", "A_DIR", "--edge", "mini:edge", "--foundation", "mini:foundation", "--domains", "fog"]


@pytest.mark.parametrize("arguments, message", [
    (["--dataset", "imagenet-c", "--dataset-option", "source=generated", "--dataset-option", "seed=-1"],
     "imagenet-c option seed must be an integer >= 0, got -1"),
    (["--dataset", "imagenet-c", "--dataset-option", "source=generated", "--dataset-option", "seed=x"],
     "imagenet-c option seed must be an integer >= 0, got 'x'"),
    (["--dataset", "imagenet-c", "--dataset-option", "seed=3"],
     "imagenet-c option seed=3 seeds the generated corruptions, and source = disk reads them from disk"),
    (["--dataset", "coco-c", "--dataset-option", "seed=2"],
     "coco-c option seed=2 seeds the generated corruptions, and source = disk reads them from disk"),
    (["--dataset", "imagenet-c", "--dataset-option", "source=generated", "--dataset-option", "ccc_calibration=true"],
     "imagenet-c ccc_calibration must be a whole number of images >= 1, got True"),
], ids=["negative-seed", "text-seed", "seed-on-disk", "coco-seed-on-disk", "boolean-calibration"])
def test_a_generators_options_are_checked_before_the_data_is_read(arguments, message, tmp_path, capsys):
    """The generated corruptions' seed (and ccc_calibration) are checked as coco-c checks its own, in one line before
    any data is read: a negative or non-integer seed, or a seed given where nothing is generated (it named other
    data, keyed apart, and read the same images), was taken as it was."""
    arguments = [str(tmp_path) if a == "A_DIR" else a for a in [*arguments, *GENERATED]]
    assert main(["run", "--method", "source", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cemabench: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("value", ["0", "true", "1080"])
def test_the_miniatures_n_examples_is_a_whole_number_of_its_images(value, capsys):
    assert main(["run", "--method", "source", "--domains", "fog", "--dataset-option", f"n_examples={value}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cemabench: error: miniature-digits-c n_examples must be an integer from 1 to 1079 (the "
                          "images per domain), got ")
    assert err.count("\n") == 1
