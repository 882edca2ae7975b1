"""The predictor's input handling (issue #14 §3): paths, arrays in either channel order,
explicit grayscale, a clear error for anything else, and a score threshold."""

import pathlib

import cv2
import numpy as np
import pytest
import torch

from detr_variants.engine import DefaultPredictor


@pytest.fixture(scope="module")
def predictor_and_image(tmp_path_factory):
    """An untrained tiny DETR (input handling needs no trained weights) and a BGR image file."""
    from detr_variants.engine.lazy_train import apply_overrides
    from detr_variants.model_zoo import get_config
    from helpers import tiny_run_overrides

    out = tmp_path_factory.mktemp("predictor")
    cfg = apply_overrides(
        get_config("detr/detr_r18_synthetic"),
        ["model.encoder.num_layers=1", "model.decoder.num_layers=1", *tiny_run_overrides(out)],
    )
    cfg.train.init_checkpoint = ""
    cfg.train.allow_random_weights = True  # the explicit opt-in for an untrained predictor
    torch.manual_seed(0)
    path = str(out / "img.png")
    cv2.imwrite(path, np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return DefaultPredictor(cfg), path


def test_paths_and_arrays_agree(predictor_and_image):
    predictor, path = predictor_and_image
    bgr = cv2.imread(path)
    ref = predictor(path)["instances"]
    assert ref.image_size == (40, 56) and len(ref) > 0
    for other in (
        predictor(pathlib.Path(path))["instances"],
        predictor(bgr)["instances"],
        predictor(np.ascontiguousarray(bgr[:, :, ::-1]), format="RGB")["instances"],
    ):
        torch.testing.assert_close(other.scores, ref.scores, rtol=0, atol=0)
        torch.testing.assert_close(other.pred_boxes.tensor, ref.pred_boxes.tensor, rtol=0, atol=0)
    # Channel order matters: the same array read as RGB gives other scores.
    assert not torch.equal(predictor(bgr, format="RGB")["instances"].scores, ref.scores)


def test_grayscale_is_an_explicit_conversion(predictor_and_image):
    predictor, path = predictor_and_image
    gray = cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2GRAY)
    three = predictor(np.repeat(gray[:, :, None], 3, axis=2))["instances"]
    for arr in (gray, gray[:, :, None]):
        torch.testing.assert_close(predictor(arr)["instances"].scores, three.scores)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (np.zeros((8, 8, 3), np.float32) + 0.5, ValueError, "uint8.*float32.*\\* 255"),
        (np.full((8, 8, 3), np.nan, np.float64), ValueError, "NaN"),
        (np.zeros((8, 8, 3), np.uint16), ValueError, "uint16"),
        (np.zeros((8, 8, 4), np.uint8), ValueError, "HxWx3.*alpha"),
        (np.zeros((8, 8, 2), np.uint8), ValueError, "HxWx3"),
        (np.zeros((0, 8, 3), np.uint8), ValueError, "empty"),
        (np.zeros((8,), np.uint8), ValueError, "HxWx3"),
        ([[1, 2, 3]], TypeError, "list"),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), TypeError, "Tensor"),
    ],
)
def test_bad_input_is_refused_clearly(predictor_and_image, bad, error, message):
    predictor, _ = predictor_and_image
    with pytest.raises(error, match=message):
        predictor(bad)


def test_unreadable_path(predictor_and_image, tmp_path):
    predictor, _ = predictor_and_image
    with pytest.raises(IOError, match="missing.jpg"):
        predictor(tmp_path / "missing.jpg")


def test_score_threshold(predictor_and_image):
    predictor, path = predictor_and_image
    scores = predictor(path)["instances"].scores
    threshold = float(scores.median())
    kept = predictor(path, score_threshold=threshold)["instances"]
    assert len(kept) == int((scores >= threshold).sum()) and len(kept) < len(scores)
    assert (kept.scores >= threshold).all()
    assert len(predictor(path, score_threshold=1.1)["instances"]) == 0
