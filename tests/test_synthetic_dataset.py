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
from pycocotools import mask as mask_util

from detr_variants.data.shapes_render import _box_iou, render_image, shape_mask
from detr_variants.data.synthetic import (
    SYNTHETIC_CLASSES,
    SYNTHETIC_SHAPES,
    ShapesSpec,
    dataset_dir,
    generate_synthetic_shapes,
    mask_to_rle,
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


# A small registration in which every COCO feature occurs: crowd regions, empty and grayscale
# images (besides the category-id gaps of the default spec).
SMALL = dict(num_train=4, num_val=10, seed=0, crowd_fraction=0.6, empty_fraction=0.2,
             grayscale_fraction=0.3)  # fmt: skip


@pytest.fixture
def small_registration(tmp_path):
    """Registers a tiny dataset under tmp_path; restores the default registration after."""
    register_synthetic_shapes(str(tmp_path), **SMALL)
    yield str(tmp_path)
    register_synthetic_shapes()


def test_default_spec():
    assert len(SYNTHETIC_CLASSES) == 6 and len(set(SYNTHETIC_CLASSES)) == 6
    assert (SYNTHETIC_SHAPES.num_train, SYNTHETIC_SHAPES.num_val) == (2000, 250)
    ids = SYNTHETIC_SHAPES.category_ids
    assert ids != tuple(range(1, 7)) and list(ids) == sorted(ids)  # gaps, as COCO's 1..90
    with pytest.raises(ValueError, match="category ids"):
        ShapesSpec(category_ids=(3, 2, 4, 7, 9, 12))
    with pytest.raises(ValueError, match="classes"):
        ShapesSpec(classes=("hexagon",), category_ids=(1,))


def test_fingerprint_covers_the_spec():
    assert SYNTHETIC_SHAPES.fingerprint() == ShapesSpec().fingerprint()
    for field, value in [("clutter", 0.5), ("image_size", (100, 120)), ("crowd_fraction", 0.0)]:
        assert ShapesSpec(**{field: value}).fingerprint() != SYNTHETIC_SHAPES.fingerprint()


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
    assert [c["id"] for c in coco["categories"]] == list(SYNTHETIC_SHAPES.category_ids)
    assert [c["name"] for c in coco["categories"]] == list(SYNTHETIC_CLASSES)
    areas = []
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        im = images[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= im["width"] and y + h <= im["height"]
        assert ann["category_id"] in SYNTHETIC_SHAPES.category_ids
        assert ann["area"] == w * h
        areas.append(ann["area"])
    for im in coco["images"]:
        assert 224 <= im["width"] <= 320 and 224 <= im["height"] <= 320
    areas = np.array(areas)
    small, large = (areas < 32**2).mean(), (areas > 96**2).mean()
    assert small > 0.15 and large > 0.1 and 1 - small - large > 0.25
    per_image = collections.Counter(a["image_id"] for a in coco["annotations"])
    counts = [per_image.get(i, 0) for i in images]
    assert len(set(counts)) >= 4 and max(counts) <= 8 + 1  # + 1: a crowd region
    assert len({a["category_id"] for a in coco["annotations"]}) == 6


def test_segmentations_match_the_boxes(small_dataset):
    """Every shape has a polygon and every crowd region an uncompressed RLE (as in COCO files);
    each spans its tight box: a polygon (the drawn outline) to within 1 pixel of each edge, an
    RLE (the drawn mask, rasterized by pycocotools) exactly."""
    coco = json.loads(_load_json(small_dataset, "train"))
    images = {im["id"]: im for im in coco["images"]}
    kinds = collections.Counter()
    for ann in coco["annotations"]:
        im, segm = images[ann["image_id"]], ann["segmentation"]
        if ann["iscrowd"]:
            assert isinstance(segm["counts"], list) and segm["size"] == [im["height"], im["width"]]
            rle = mask_util.frPyObjects(segm, im["height"], im["width"])
            np.testing.assert_array_equal(mask_util.toBbox(rle), ann["bbox"])
        else:
            assert len(segm) == 1 and len(segm[0]) >= 6
            points = np.array(segm[0]).reshape(-1, 2)
            lo, hi = points.min(axis=0), points.max(axis=0)
            x, y, w, h = ann["bbox"]
            # The outline reaches into the pixels at the box's edges: within 1 px of each edge,
            # + 0.1 for cv2's 1/16-pixel vertices and the json's 2 decimals.
            assert np.all(lo >= [x, y]) and np.all(lo <= [x + 1.1, y + 1.1])
            assert np.all(hi <= [x + w, y + h]) and np.all(hi >= [x + w - 1.1, y + h - 1.1])
            rle = mask_util.merge(mask_util.frPyObjects(segm, im["height"], im["width"]))
            # The shape fills a good part of its box (a thin rotated star about a fifth).
            assert mask_util.area(rle) > 0.15 * ann["area"]
        kinds[ann["iscrowd"]] += 1
    assert kinds[1] >= 1 and kinds[0] > 50 * kinds[1]


def test_mask_to_rle_round_trip():
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (1, 1), (6, 3)]:
        for mask in (rng.random(shape) > 0.5, np.ones(shape, bool), np.zeros(shape, bool)):
            rle = mask_util.frPyObjects(mask_to_rle(mask), *shape)
            np.testing.assert_array_equal(mask_util.decode(rle), mask)


def test_grayscale_empty_and_crowd_images(tmp_path):
    spec = dict(num_train=12, num_val=1, seed=0, grayscale_fraction=0.5, empty_fraction=0.3,
                crowd_fraction=0.5)  # fmt: skip
    out = generate_synthetic_shapes(str(tmp_path / "s"), **spec)
    coco = json.loads(_load_json(out, "train"))
    with_objects = {a["image_id"] for a in coco["annotations"]}
    gray = [
        cv2.imread(os.path.join(out, "train", im["file_name"]), cv2.IMREAD_UNCHANGED).ndim == 2
        for im in coco["images"]
    ]
    assert 0 < sum(gray) < len(gray)
    assert 0 < len(with_objects) < len(coco["images"])  # some images have no annotation
    assert any(a["iscrowd"] for a in coco["annotations"])


@pytest.mark.parametrize("name", SYNTHETIC_CLASSES)
def test_shape_mask_is_tight(name):
    rng = np.random.default_rng(3)
    for side in (10.0, 50.0, 140.0):
        mask, outline = shape_mask(name, side, (300, 300), rng)
        # Tight crop: every border row and column touches the shape.
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        assert 0.6 * side**2 < mask.size < 1.6 * side**2
        # The outline, rasterized as COCO does, is the drawn mask but for its boundary pixels
        # (and a ring's hole, which a COCO polygon cannot express).
        h, w = mask.shape
        drawn = mask_util.decode(mask_util.frPyObjects([outline.ravel().tolist()], h, w))[..., 0]
        inter, union = (drawn & mask).sum(), (drawn | mask).sum()
        boundary = 2 * (h + w)
        assert union - inter <= boundary + (mask.size if name == "ring" else 0)


def test_render_image_is_a_function_of_spec_and_rng():
    spec = ShapesSpec(image_size=(40, 60), side_ranges=((8, 12),), size_probs=(1.0,))
    img, objs = render_image(spec, np.random.default_rng(1))
    again, objs2 = render_image(spec, np.random.default_rng(1))
    np.testing.assert_array_equal(img, again)
    assert [o["bbox"] for o in objs] == [o["bbox"] for o in objs2]
    assert 40 <= min(img.shape[:2]) and max(img.shape[:2]) <= 60


@pytest.mark.parametrize("max_iou", [0.0, 0.3])
def test_boxes_overlap_at_most_max_overlap_iou(max_iou):
    spec = ShapesSpec(image_size=(96, 128), max_objects=8, max_overlap_iou=max_iou)
    rng = np.random.default_rng(0)
    ious = []
    for _ in range(30):
        boxes = [o["bbox"] for o in render_image(spec, rng)[1]]
        ious += [_box_iou(tuple(a), tuple(b)) for i, a in enumerate(boxes) for b in boxes[:i]]
    assert len(ious) > 30 and max(ious) <= max_iou
    if max_iou > 0:
        assert max(ious) > 0.1  # the limit, not the placement, keeps the default's boxes apart


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
    register_synthetic_shapes(small_registration, **SMALL)  # idempotent
    assert {"synthetic_shapes_train", VAL} <= set(DatasetCatalog.list())
    meta = MetadataCatalog.get(VAL)
    # Known statically, and registration generated nothing.
    assert meta.thing_classes == list(SYNTHETIC_CLASSES)
    assert not os.path.exists(os.path.join(small_registration, "synthetic_shapes"))

    dicts = DatasetCatalog.get(VAL)  # through detectron2's load_coco_json
    assert len(dicts) == 10
    for d in dicts:
        assert os.path.isfile(d["file_name"])
        for ann in d["annotations"]:
            assert ann["bbox_mode"] == BoxMode.XYWH_ABS
            assert 0 <= ann["category_id"] < 6  # contiguous ids
            assert "segmentation" in ann
    assert any(not d["annotations"] for d in dicts)
    assert any(a["iscrowd"] for d in dicts for a in d["annotations"])
    assert meta.evaluator_type == "coco"
    ids = SYNTHETIC_SHAPES.category_ids
    assert meta.thing_dataset_id_to_contiguous_id == {c: i for i, c in enumerate(ids)}
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


def _predictions(dicts, shift=0.0, crowd=False):
    """Non-crowd (or only crowd) GT boxes as score-1 predictions, optionally shifted by
    ``shift`` box widths."""
    outputs = []
    for d in dicts:
        anns = [a for a in d["annotations"] if bool(a["iscrowd"]) == crowd]
        boxes = torch.tensor(
            [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
            dtype=torch.float32,
        ).reshape(-1, 4)
        boxes[:, 0::2] += shift * (boxes[:, 2:3] - boxes[:, 0:1])
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(boxes)
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        outputs.append({"instances": inst})
    return outputs


def test_coco_evaluator(small_registration, tmp_path):
    # Built before any DatasetCatalog.get: reading json_file generates the data.
    evaluator = COCOEvaluator(VAL, output_dir=str(tmp_path / "eval"), use_fast_impl=False)
    # COCOeval scores every GT image, so predict on the whole (tiny) split.
    dicts = DatasetCatalog.get(VAL)

    # GT boxes as predictions: AP 100 although the category ids have gaps (COCOEvaluator maps
    # the contiguous ids back) and crowd regions are left unpredicted (COCOeval ignores them).
    evaluator.reset()
    evaluator.process(dicts, _predictions(dicts))
    perfect = evaluator.evaluate()["bbox"]["AP"]
    assert perfect == pytest.approx(100.0, abs=1e-6)

    # Detections on crowd regions are ignored, not false positives.
    evaluator.reset()
    both = [
        {"instances": Instances.cat([p["instances"], c["instances"]])}
        for p, c in zip(_predictions(dicts), _predictions(dicts, crowd=True))
    ]
    evaluator.process(dicts, both)
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0, abs=1e-6)

    evaluator.reset()
    evaluator.process(dicts, _predictions(dicts, shift=0.3))
    poor = evaluator.evaluate()["bbox"]["AP"]
    assert poor == pytest.approx(10.0, abs=1.0)  # IoU 0.54: only the 0.5 threshold hits
