"""The ``ccc`` setting: CCC's calibrated walk (by hand), finer severities that leave integer ones as they were, a
stream deterministic from its seed, and a measured difficulty near its target (slow)."""
import numpy as np
import pytest
import torch

from cemabench import registry
from cemabench.config import Protocol
from cemabench.data import Corruptor
from cemabench.datasets import corruptions, miniature
from cemabench.errors import UserError
from cemabench.protocol import ccc
from cemabench.run.context import TableContext
from cemabench.tables.spec import load_table
from conftest import TinyNet, tiny_dataset


def test_the_walk_keeps_the_paths_mean_nearest_the_target():
    """By hand, target 50: row 1 from the right: (1,2) must go down (mean 55); (1,1): down 65, right 53.3 -> right;
    (1,0): down 75, right 55 -> right. Row 2: (2,2) down (40); (2,1): down (160+20)/4 = 45, right (120+20)/4 = 35 ->
    down; (2,0): down (220+30)/5 = 50, right (180+30)/5 = 42 -> down. Starts: (1,0) means 55, (2,0) 50 -> (2,0)."""
    accuracy = np.array([[90, 80, 70], [60, 50, 40], [30, 20, 10]], dtype=float)
    assert ccc.walk(accuracy, 50) == [(2, 0), (1, 0), (1, 1), (1, 2), (0, 2)]
    assert ccc.walk(accuracy, 90) == [(1, 0), (0, 0)]  # (1,0) then down to 90: mean 75, the nearest start


def test_finer_severities_interpolate_and_leave_integer_ones_as_they_were():
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    for name in ("gaussian_noise", "contrast", "shot_noise", "jpeg_compression"):
        whole = corruptions.corrupt(images, name, 3, np.random.default_rng(1))
        assert np.array_equal(whole, corruptions.corrupt(images, name, 3.0, np.random.default_rng(1)))
        assert np.array_equal(corruptions.corrupt(images, name, 0, np.random.default_rng(1)), images)
    assert corruptions._at((0.75, 0.5, 0.4, 0.3, 0.15), 2.5, 1.0) == pytest.approx(0.45)
    assert corruptions._at((0.75, 0.5, 0.4, 0.3, 0.15), 0.5, 1.0) == pytest.approx(0.875)  # from severity 0's 1.0
    assert corruptions._at((500, 250, 100, 75, 50), 1.5, np.inf, inverse=True) == pytest.approx(1 / 0.003)
    with pytest.raises(ValueError, match="from 0 to 5"):
        corruptions.corrupt(images, "contrast", 5.5, np.random.default_rng(0))


def _small(seed, calibration=None):
    """A stream of 60 random 8-pixel images under contrast and brightness, for a tiny 4-class network."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 40)
    source = Corruptor(lambda: images, lambda: labels, corruptions.corrupt)
    torch.manual_seed(0)
    model = TinyNet().eval()
    calibration = calibration or ccc.Calibration(source, model, size=20)
    return ccc.build(source, model, ("contrast", "brightness"), seed, 40.0, 10, 60, calibration), calibration


def test_the_stream_is_deterministic_from_its_seed():
    (a, steps), calibration = _small(0)
    (b, again), _ = _small(0)  # calibrated anew
    (c, other), _ = _small(1, calibration)
    assert np.array_equal(a.pixels, b.pixels) and steps == again and np.array_equal(a.labels(), b.labels())
    assert not np.array_equal(a.pixels, c.pixels)
    assert len(a) == 60 and sum(s.count for s in steps) == 60 and [s.start for s in steps] == list(range(0, 60, 10))
    assert all(s.first != s.second for s in steps) and steps[0].s2 == 0.0  # a walk starts with its second one off


@pytest.mark.parametrize("fields, words", [
    ({"ccc_length": 10}, "apply to setting ccc"),
    ({"setting": "ccc", "devices": 2}, "one generated stream on one device"),
    ({"setting": "ccc", "ccc_difficulty": 101}, "at most 100"),
    ({"setting": "ccc+correlated"}, "setting must be one of"),
])
def test_the_ccc_fields_are_checked(fields, words):
    with pytest.raises(UserError, match=words):
        Protocol(**fields)


@pytest.mark.slow  # about 100 s (both targets on both seeds: 207 s on a loaded 2-core machine); kept out of the
# default tier's 5 minutes
def test_the_measured_difficulty_is_near_its_target():
    """The source model's accuracy on the ccc table's stream (its corruptions, 5,000 images at 100 a step), at target
    40 % (seed 0) and 20 % (seed 1; both targets on both seeds passed too): within 8 points of the target (the walk
    keeps the calibrated mean near it; a pair that cannot reach it, or the last walk cut short, moves it), and within
    4 points of the calibrated mean of the walk's points (the calibration set is 100 images; the stream draws
    others)."""
    source = miniature.dataset(domains=("contrast",)).corruptor
    model = registry.build_model("mini:edge")
    calibration = ccc.Calibration(source, model)
    names = ("impulse_noise", "glass_blur", "snow", "frost", "fog", "brightness", "contrast")
    for seed, target in ((0, 40.0), (1, 20.0)):
        domain, steps = ccc.build(source, model, names, seed, target, 100, 5000, calibration)
        measured = 100 * float((ccc.predict(model, domain.pixels) == domain.labels()).mean())
        calibrated = float(np.average([s.expected for s in steps], weights=[s.count for s in steps]))
        assert abs(measured - target) <= 8, (seed, target, measured)
        assert abs(measured - calibrated) <= 4, (seed, target, measured, calibrated)


def test_a_dataset_without_a_generator_is_refused_before_any_compute():
    """ImageNet-C (with --data-root) offers no corruption generator: the ccc setting is one line, exit 2."""
    context = TableContext(load_table("ccc"), None)
    context.dataset = tiny_dataset()  # a dataset read from storage: no corruptor
    with pytest.raises(UserError, match="setting ccc generates its stream with the dataset's own corruption generator, "
                                        "and tiny has none"):
        context.check_stream()
