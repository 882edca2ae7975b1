import logging

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from PIL import Image

from detr_variants.data import (
    DetrDatasetMapper,
    detr_test_augmentations,
    detr_train_augmentations,
    valid_annotations,
)
from detr_variants.data.image_io import read_image


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
    assert all(a["bbox_mode"] == BoxMode.XYXY_ABS for a in kept)
    assert kept[0]["bbox"] == [10, 10, 30, 30]
    assert kept[1]["bbox"] == [70, 50, 80.0, 60.0]
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


def test_coco_records_train_without_shapely(tiny_shapes):
    """COCO records carry polygons and RLE crowd masks; with masks off the mapper drops them, so
    the crop (which would transform polygons with shapely, not installed) never sees them."""
    mapper = DetrDatasetMapper(
        is_train=True,
        augmentations=detr_train_augmentations(
            min_sizes=[64, 80], max_size=120, crop_resize_sizes=[60], crop_size=[40, 60]
        ),
    )
    dicts = DatasetCatalog.get("tiny_shapes_train")
    assert all("segmentation" in a for d in dicts for a in d["annotations"])
    np.random.seed(0)
    for d in dicts:
        for _ in range(3):  # the crop branch is drawn half of the time
            out = mapper(d)
            assert not out["instances"].has("gt_masks")
            non_crowd = [a for a in d["annotations"] if not a["iscrowd"]]
            assert len(out["instances"]) <= len(non_crowd)


def test_masks_are_kept_when_asked_for(image_file):
    polygon = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0, 10.0, 30.0]]
    ann = _ann([10, 10, 20, 20]) | {"segmentation": polygon, "keypoints": [1, 2, 2]}
    mapper = DetrDatasetMapper(
        is_train=True, augmentations=[T.Resize((30, 40))], use_instance_mask=True
    )
    inst = mapper(_record(image_file, [ann]))["instances"]
    np.testing.assert_allclose(inst.gt_masks.polygons[0][0], np.array(polygon[0]) / 2)
    inst = DetrDatasetMapper(is_train=True, augmentations=[])(_record(image_file, [ann]))[
        "instances"
    ]
    assert not inst.has("gt_masks") and not inst.has("gt_keypoints")


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"bbox": None}, "no 'bbox'"),
        ({"bbox": [1, 2, 3]}, "has 3 values"),
        ({"bbox": [1, 2, "3", 4]}, "non-numeric"),
        ({"bbox": [1, 2, True, 4]}, "non-numeric"),
        ({"bbox": np.zeros((2, 2))}, "flat sequence"),
        ({"bbox": [1, 2, float("nan"), 4]}, "NaN or infinite"),
        ({"bbox": [1, 2, float("inf"), 4]}, "NaN or infinite"),
        ({"category_id": None}, "category_id"),
        ({"category_id": 2.5}, "category_id"),
        ({"category_id": -1}, "category_id"),
        ({"category_id": "2"}, "category_id"),
        ({"bbox_mode": 17}, "unknown bbox_mode"),
        ({"bbox_mode": BoxMode.XYXY_REL}, "relative bbox_mode"),
    ],
)
def test_malformed_annotations_name_the_file_index_and_problem(image_file, change, problem):
    anns = [_ann([1, 1, 5, 5]), _ann([10, 10, 20, 20]) | change]
    mapper = DetrDatasetMapper(is_train=True, augmentations=[])
    with pytest.raises(ValueError) as e:
        mapper(_record(image_file, anns))
    assert image_file in str(e.value) and "annotation 1" in str(e.value)
    assert problem in str(e.value)
    # Evaluation throws annotations away without reading them.
    out = DetrDatasetMapper(is_train=False, augmentations=[])(_record(image_file, anns))
    assert "instances" not in out


def test_well_formed_variants_are_accepted(image_file):
    anns = [
        _ann(np.array([10.0, 10.0, 20.0, 20.0])),
        _ann((10, 10, 30, 30), cls=np.int64(2), mode=BoxMode.XYXY_ABS),
        _ann([20, 20, 20, 10, 90], cls=3.0, mode=BoxMode.XYWHA_ABS),  # rotated: enclosing box
        {"bbox": None, "bbox_mode": 0, "category_id": None, "iscrowd": 1},  # crowd: ignored
    ]
    inst = DetrDatasetMapper(is_train=True, augmentations=[])(_record(image_file, anns))[
        "instances"
    ]
    np.testing.assert_allclose(
        inst.gt_boxes.tensor.numpy(), [[10, 10, 30, 30], [10, 10, 30, 30], [15, 10, 25, 30]]
    )
    assert inst.gt_classes.tolist() == [0, 2, 3]


def test_thin_images_are_resized_not_crashed(tmp_path):
    """A 1x3000 image would be resized to 0x373 by detectron2's ResizeShortestEdge."""
    path = str(tmp_path / "thin.png")
    cv2.imwrite(path, np.full((1, 3000, 3), 128, np.uint8))
    record = {"file_name": path, "height": 1, "width": 3000, "image_id": 1,
              "annotations": [_ann([0, 0, 3000, 1]), _ann([100, 0, 2000, 1])]}  # fmt: skip
    out = DetrDatasetMapper(is_train=False, augmentations=detr_test_augmentations(224, 373))(record)
    assert out["image"].shape == (3, 1, 373)  # the thin side keeps its pixel
    mapper = DetrDatasetMapper(
        is_train=True, augmentations=detr_train_augmentations([224], 373, [112], [108, 168])
    )
    np.random.seed(0)
    for _ in range(6):  # both branches (the crop branch stretches the sliver, as DETR's does)
        out = mapper(record)
        assert min(out["image"].shape[1:]) >= 1 and max(out["image"].shape[1:]) <= 373
        boxes = out["instances"].gt_boxes.tensor
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()


def test_boxes_below_a_pixel_after_augmentation_are_dropped(image_file):
    anns = [_ann([10, 10, 20, 20]), _ann([40, 40, 3, 30]), _ann([50, 5, 30, 2.5])]
    mapper = DetrDatasetMapper(is_train=True, augmentations=[T.Resize((15, 20))])  # scale 1/4
    inst = mapper(_record(image_file, anns))["instances"]
    np.testing.assert_allclose(inst.gt_boxes.tensor.numpy(), [[2.5, 2.5, 7.5, 7.5]])
    assert inst.gt_classes.tolist() == [0]


def test_16_bit_and_float_images(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), values)
    image = read_image(str(tmp_path / "g16.png"))
    assert image.dtype == np.uint8 and image.shape == (1, 4, 3)
    assert image[0, :, 0].tolist() == [0, 1, 128, 255]  # scaled, not clipped to 255
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(tmp_path / "f.tiff")
    with pytest.raises(IOError, match="f.tiff.*float"):
        read_image(str(tmp_path / "f.tiff"))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.full((2, 3, 4), 200, np.uint8))
    assert read_image(str(tmp_path / "rgba.png"), format="BGR").shape == (2, 3, 3)


def test_wrong_image_root_is_one_clear_error(tmp_path, caplog):
    mapper = DetrDatasetMapper(is_train=True, augmentations=[])
    with pytest.raises(IOError, match="does not exist.*image root"):
        mapper(_record(str(tmp_path / "nowhere" / "a.jpg"), []))
    mapper = DetrDatasetMapper(is_train=True, augmentations=[], max_consecutive_failures=4)
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            assert mapper(_record(str(tmp_path / f"{i}.jpg"), [])) is None
        with pytest.raises(IOError, match=f"4 images in a row.*{tmp_path}.*image root"):
            mapper(_record(str(tmp_path / "3.jpg"), []))


def test_failure_count_resets_on_success(tmp_path, image_file):
    mapper = DetrDatasetMapper(is_train=True, augmentations=[], max_consecutive_failures=2)
    for _ in range(3):
        assert mapper(_record(str(tmp_path / "missing.jpg"), [])) is None
        assert mapper(_record(image_file, [])) is not None
