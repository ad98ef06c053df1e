"""The detection miniature's canvases (issue 18): deterministic, valid COCO ground truth, exact boxes, and
corruptions applied to the whole canvas."""
import numpy as np
import pytest
from test_detection_task import truth_as_detections

from cemabench.datasets import minidet
from cemabench.datasets.corruptions import HENDRYCKS_ORDER
from cemabench.protocol.tasks import detection


@pytest.fixture(scope="module")
def test_canvases():
    return minidet.canvases("test", 60)


def test_the_same_seed_gives_the_same_bytes_and_the_splits_differ(test_canvases):
    images, doc = test_canvases
    again, doc_again = minidet.canvases("test", 60)
    assert np.array_equal(images, again) and doc == doc_again
    train, _ = minidet.canvases("train", 60)
    assert not np.array_equal(images, train)


def test_the_ground_truth_is_coco_and_scores_itself_100(test_canvases):
    images, doc = test_canvases
    assert images.shape == (60, 64, 64, 3) and images.dtype == np.uint8
    assert [i["id"] for i in doc["images"]] == list(range(1, 61))
    counts = np.bincount([a["image_id"] for a in doc["annotations"]], minlength=61)[1:]
    assert counts.min() >= 1 and counts.max() <= 4
    assert {a["category_id"] for a in doc["annotations"]} <= set(range(1, 11))
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x < x + w <= 64 and 0 <= y < y + h <= 64 and a["area"] == w * h
    assert detection.score(doc, [i["id"] for i in doc["images"]], truth_as_detections(doc)) == pytest.approx(
        {"map": 100.0, "map50": 100.0, "ar100": 100.0})


def test_each_box_holds_its_digit_tightly():
    """On canvases of one digit, no pixel outside the box is lighter than the background by more than the digit's
    visible level and the noise, and each edge of the box has a clearly lit pixel within two pixels of it."""
    images, doc = minidet.canvases("test", 80)
    checked = 0
    for image in doc["images"]:
        mine = [a for a in doc["annotations"] if a["image_id"] == image["id"]]
        if len(mine) != 1:
            continue
        canvas = images[image["id"] - 1, :, :, 0].astype(np.float64)
        x, y, w, h = (int(v) for v in mine[0]["bbox"])
        outside = canvas.copy()
        outside[y:y + h, x:x + w] = np.nan
        level = np.nanmedian(outside)
        assert np.nanmax(np.abs(outside - level)) < (minidet.VISIBLE + 0.1) * 255  # no digit shows outside the box
        bright = canvas > level + 0.3 * 255
        rows, cols = np.nonzero(bright)
        assert x <= cols.min() <= x + 2 and x + w - 3 <= cols.max() <= x + w - 1
        assert y <= rows.min() <= y + 2 and y + h - 3 <= rows.max() <= y + h - 1
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("corruption", HENDRYCKS_ORDER)
def test_every_corruption_changes_the_canvas_and_is_seeded(test_canvases, corruption):
    images, _ = test_canvases
    low = minidet.corrupted(images[:8], corruption, 1)
    high = minidet.corrupted(images[:8], corruption, 5)
    assert high.shape == images[:8].shape and high.dtype == np.uint8
    assert np.array_equal(high, minidet.corrupted(images[:8], corruption, 5))
    distance = np.abs(high.astype(int) - images[:8]).mean()
    assert distance > 0.5 and np.abs(low.astype(int) - images[:8]).mean() > 0.1
