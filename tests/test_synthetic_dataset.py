"""Tests of the seed-generated ``synthetic_shapes`` detection dataset."""

import collections
import json
import multiprocessing as mp
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

from detr_variants.data.synthetic import (
    NUM_TRAIN_IMAGES,
    NUM_VAL_IMAGES,
    SYNTHETIC_CLASSES,
    _shape_mask,
    dataset_dir,
    generate_synthetic_shapes,
    register_synthetic_shapes,
)

VAL = "synthetic_shapes_val"


def _load_json(out_dir, split):
    with open(os.path.join(out_dir, "annotations", f"{split}.json"), "rb") as f:
        return f.read()


def _read_images(out_dir, split):
    names = sorted(os.listdir(os.path.join(out_dir, split)))
    return [cv2.imread(os.path.join(out_dir, split, n)) for n in names]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A 40 + 8 image dataset shared by the content tests."""
    return generate_synthetic_shapes(
        str(tmp_path_factory.mktemp("shapes") / "synthetic_shapes"), num_train=40, num_val=8, seed=0
    )


@pytest.fixture
def small_registration(tmp_path):
    """Registers a tiny dataset under tmp_path; restores the default registration after."""
    register_synthetic_shapes(str(tmp_path), num_train=4, num_val=6, seed=0)
    yield str(tmp_path)
    register_synthetic_shapes()


def test_constants():
    assert len(SYNTHETIC_CLASSES) == 6 and len(set(SYNTHETIC_CLASSES)) == 6
    assert (NUM_TRAIN_IMAGES, NUM_VAL_IMAGES) == (2000, 250)


def test_determinism(tmp_path, small_dataset):
    again = generate_synthetic_shapes(str(tmp_path / "a"), num_train=40, num_val=8, seed=0)
    other = generate_synthetic_shapes(str(tmp_path / "b"), num_train=40, num_val=8, seed=1)
    for split in ("train", "val"):
        assert _load_json(again, split) == _load_json(small_dataset, split)
        assert _load_json(other, split) != _load_json(small_dataset, split)
        same = _read_images(again, split)
        ref = _read_images(small_dataset, split)
        assert len(same) == len(ref)
        assert all(np.array_equal(a, b) for a, b in zip(same, ref))
    diff = _read_images(other, "val")
    assert not any(
        a.shape == b.shape and np.array_equal(a, b)
        for a, b in zip(diff, _read_images(small_dataset, "val"))
    )


def test_boxes_valid_and_varied(small_dataset):
    coco = json.loads(_load_json(small_dataset, "train"))
    images = {im["id"]: im for im in coco["images"]}
    assert [c["id"] for c in coco["categories"]] == list(range(1, 7))
    assert [c["name"] for c in coco["categories"]] == list(SYNTHETIC_CLASSES)
    areas = []
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        im = images[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im["width"] and y + h <= im["height"]
        assert 1 <= ann["category_id"] <= 6 and ann["iscrowd"] == 0
        assert ann["area"] == w * h
        areas.append(ann["area"])
    for im in coco["images"]:
        assert 224 <= im["width"] <= 320 and 224 <= im["height"] <= 320
    areas = np.array(areas)
    small, large = (areas < 32**2).mean(), (areas > 96**2).mean()
    assert small > 0.15 and large > 0.1 and 1 - small - large > 0.25
    per_image = collections.Counter(a["image_id"] for a in coco["annotations"])
    counts = [per_image.get(i, 0) for i in images]
    assert len(set(counts)) >= 4 and max(counts) <= 8
    assert len({a["category_id"] for a in coco["annotations"]}) == 6


@pytest.mark.parametrize("name", SYNTHETIC_CLASSES)
def test_shape_mask_is_tight(name):
    rng = np.random.default_rng(3)
    for side in (10.0, 50.0, 140.0):
        mask = _shape_mask(name, side, (300, 300), rng)
        # Tight crop: every border row and column touches the shape.
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert 0.6 * side**2 < mask.size < 1.6 * side**2


def test_parameter_change_regenerates(tmp_path):
    out = str(tmp_path / "synthetic_shapes")
    generate_synthetic_shapes(out, num_train=2, num_val=2)
    generate_synthetic_shapes(out, num_train=2, num_val=3)
    assert len(json.loads(_load_json(out, "val"))["images"]) == 3
    assert len(os.listdir(os.path.join(out, "val"))) == 3
    # Nothing temporary is left next to the dataset (only the lock file).
    assert sorted(os.listdir(tmp_path)) == ["synthetic_shapes", "synthetic_shapes.lock"]


def test_dataset_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DETR_VARIANTS_DATASETS", str(tmp_path))
    assert dataset_dir() == os.path.join(str(tmp_path), "synthetic_shapes")
    assert dataset_dir("/x") == os.path.join("/x", "synthetic_shapes")


def test_registration(small_registration):
    register_synthetic_shapes(small_registration, num_train=4, num_val=6, seed=0)  # idempotent
    assert {"synthetic_shapes_train", VAL} <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get(VAL)
    # Known statically, and registration generated nothing.
    assert meta.thing_classes == list(SYNTHETIC_CLASSES)
    assert not os.path.exists(os.path.join(small_registration, "synthetic_shapes"))

    dicts = DatasetCatalog.get(VAL)
    assert len(dicts) == 6
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        assert d["annotations"]
        for ann in d["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= ann["category_id"] < 6
    assert meta.evaluator_type == "coco"
    assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(6)}
    assert os.path.isfile(meta.json_file)
    assert os.path.isdir(meta.image_root)


def test_concurrent_generation(tmp_path):
    out = str(tmp_path / "shared" / "synthetic_shapes")
    ctx = mp.get_context("spawn")
    kwargs = dict(num_train=12, num_val=4, seed=5)
    procs = [
        ctx.Process(target=generate_synthetic_shapes, args=(out,), kwargs=kwargs) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    ref = generate_synthetic_shapes(str(tmp_path / "ref"), **kwargs)
    for split in ("train", "val"):
        assert _load_json(out, split) == _load_json(ref, split)
        assert all(
            np.array_equal(a, b) for a, b in zip(_read_images(out, split), _read_images(ref, split))
        )
    assert sorted(os.listdir(tmp_path / "shared")) == ["synthetic_shapes", "synthetic_shapes.lock"]


def _predictions(dicts, shift=0.0):
    """GT boxes as score-1 predictions, optionally shifted by ``shift`` box widths."""
    outputs = []
    for d in dicts:
        boxes = torch.tensor(
            [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                for a in d["annotations"]
            ],
            dtype=torch.float32,
        )
        boxes[:, 0::2] += shift * (boxes[:, 2:3] - boxes[:, 0:1])
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]])
        outputs.append({"instances": inst})
    return outputs


def test_coco_evaluator(small_registration, tmp_path):
    # Built before any DatasetCatalog.get: reading json_file generates the data.
    evaluator = COCOEvaluator(VAL, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    # COCOeval scores every GT image, so predict on the whole (tiny) split.
    dicts = DatasetCatalog.get(VAL)

    evaluator.reset()
    evaluator.process(dicts, _predictions(dicts))
    perfect = evaluator.evaluate()["bbox"]["AP"]
    assert perfect == pytest.approx(100.0, abs=1e-6)

    evaluator.reset()
    evaluator.process(dicts, _predictions(dicts, shift=0.3))
    poor = evaluator.evaluate()["bbox"]["AP"]
    assert poor == pytest.approx(10.0, abs=1.0)  # IoU 0.54: only the 0.5 threshold hits
