import numpy as np
import pytest

from cemabench.datasets.corruptions import HENDRYCKS_ORDER, corrupt


@pytest.fixture(scope="module")
def digits():
    from cemabench.datasets.miniature import splits

    return splits()["test"][0][:16]


@pytest.mark.parametrize("name", HENDRYCKS_ORDER)
def test_every_corruption_and_severity_changes_images_and_keeps_format(digits, name):
    for severity in range(1, 6):
        out = corrupt(digits, name, severity, np.random.default_rng(0))
        assert out.shape == digits.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - digits).mean() > 1.0


@pytest.mark.parametrize("name", HENDRYCKS_ORDER)
def test_corruptions_are_deterministic_given_the_generator(digits, name):
    a = corrupt(digits, name, 3, np.random.default_rng(7))
    b = corrupt(digits, name, 3, np.random.default_rng(7))
    assert np.array_equal(a, b)


def test_severity_grows_the_damage_for_noise(digits):
    damage = [np.abs(corrupt(digits, "gaussian_noise", s, np.random.default_rng(0)).astype(int) - digits).mean()
              for s in range(1, 6)]
    assert damage == sorted(damage)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown corruption 'rain'.*gaussian_noise"):
        corrupt(np.zeros((1, 8, 8, 3), np.uint8), "rain", 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity must be from 0 to 5"):  # fractional ones since CCC (issue 20)
        corrupt(np.zeros((1, 8, 8, 3), np.uint8), "fog", 6, np.random.default_rng(0))
