import logging

import numpy as np
import pytest
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from detr_variants.data import DetrDatasetMapper, detr_train_augmentations, valid_annotations


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 80, 3), dtype=np.uint8)).save(
        path
    )
    return str(path)


def _record(file_name, annotations):
    return {
        "file_name": file_name,
        "height": 60,
        "width": 80,
        "image_id": 1,
        "annotations": annotations,
    }


def _ann(bbox, cls=0, mode=BoxMode.XYWH_ABS):
    return {"bbox": bbox, "bbox_mode": mode, "category_id": cls, "iscrowd": 0}


def test_image_without_annotations_gives_empty_instances(image_file):
    mapper = DetrDatasetMapper(is_train=True, augmentations=[])
    out = mapper(_record(image_file, []))
    assert out["image"].shape == (3, 60, 80)
    assert len(out["instances"]) == 0
    assert out["instances"].gt_boxes.tensor.shape == (0, 4)


def test_bad_boxes_are_skipped_or_clipped_with_a_warning(caplog):
    anns = [
        _ann([10, 10, 20, 20]),
        _ann([10, 10, 0, 5]),
        _ann([10, 10, -3, 5]),
        _ann([100, 100, 5, 5]),
        _ann([70, 50, 20, 20]),
        _ann([0, 0, 5, 5], cls=1) | {"iscrowd": 1},
    ]
    with caplog.at_level(logging.WARNING):
        kept = valid_annotations(anns, (60, 80), "x.png")
    assert len(kept) == 2
    assert kept[0]["bbox"] == [10, 10, 20, 20]
    assert kept[1]["bbox"] == [70, 50, 80.0, 60.0] and kept[1]["bbox_mode"] == BoxMode.XYXY_ABS
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "non-positive width or height" in messages and "outside" in messages


def test_unreadable_image(tmp_path, caplog):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    train = DetrDatasetMapper(is_train=True, augmentations=[])
    with caplog.at_level(logging.WARNING):
        assert train(_record(str(broken), [])) is None  # detectron2's MapDataset draws another one
    assert "unreadable" in caplog.text
    with pytest.raises(IOError, match="broken.jpg"):
        DetrDatasetMapper(is_train=False, augmentations=[])(_record(str(broken), []))


def test_train_augmentation_sizes_and_box_transform(image_file):
    mapper = DetrDatasetMapper(
        is_train=True,
        augmentations=detr_train_augmentations(
            min_sizes=[32, 48], max_size=100, crop_resize_sizes=[40], crop_size=[20, 30]
        ),
    )
    np.random.seed(0)
    for _ in range(20):
        out = mapper(_record(image_file, [_ann([10, 10, 20, 20])]))
        h, w = out["image"].shape[1:]
        assert min(h, w) in (32, 48) and max(h, w) <= 100
        boxes = out["instances"].gt_boxes.tensor
        assert (
            (boxes[:, 2:] > boxes[:, :2]).all()
            and (boxes[:, 2] <= w).all()
            and (boxes[:, 3] <= h).all()
        )


def test_eval_mapping_drops_annotations(image_file):
    out = DetrDatasetMapper(is_train=False, augmentations=[T.ResizeShortestEdge(30, 100)])(
        _record(image_file, [_ann([1, 1, 5, 5])])
    )
    assert "instances" not in out and "annotations" not in out
    assert out["image"].shape == (3, 30, 40)
