"""tools/visualize_data.py and tools/visualize_json_results.py on a small COCO-format dataset
(the custom data config, category ids with gaps, a crowd region, an empty and a grayscale
image): the PNGs are written with the right sizes and show something drawn."""

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest

from helpers import write_small_coco


def load_tool(repo_root, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(repo_root, "tools", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vis_data"))
    return write_small_coco(root, "train", 4, seed=2), write_small_coco(root, "val", 3, seed=3)


def custom_config_args(repo_root, train):
    return [
        "--config-file",
        os.path.join(repo_root, "configs", "common", "data", "custom.py"),
        "+model.num_classes=3",
        "dataloader.train.dataset.names.name=vis_train",
        f"dataloader.train.dataset.names.json_file={train[0]}",
        f"dataloader.train.dataset.names.image_root={train[1]}",
        "dataloader.train.mapper.augmentations.scale=0.1",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
    ]


def test_visualize_data_annotations(repo_root, small_coco, tmp_path):
    """One PNG per record, at the image's size; the image with objects has boxes drawn on it."""
    tool = load_tool(repo_root, "visualize_data.py")
    (train, _) = small_coco
    args = custom_config_args(repo_root, train)
    written = tool.main(
        [args[0], args[1], "--source", "annotation", "--output-dir", str(tmp_path), "--num", "3"]
        + args[2:]
    )
    images = json.load(open(train[0]))["images"]
    assert [os.path.basename(p) for p in written] == [f"train_{i:03d}.png" for i in range(3)]
    for path, info in zip(written, images):
        assert cv2.imread(path).shape == (info["height"], info["width"], 3)
    source = cv2.imread(os.path.join(train[1], "train_001.jpg"))
    assert np.abs(cv2.imread(written[1]).astype(int) - source).max() > 50  # boxes and labels
    scaled = tool.main(
        [args[0], args[1], "--source", "annotation", "--output-dir", str(tmp_path / "x2")]
        + ["--num", "1", "--scale", "2"]
        + args[2:]
    )
    assert cv2.imread(scaled[0]).shape == (2 * images[0]["height"], 2 * images[0]["width"], 3)


def test_visualize_data_dataloader(repo_root, small_coco, tmp_path):
    """The training loader's views: sizes from the scaled recipe (scale 0.1: shortest side one
    of 48..80 as 480..800 step 32 scaled and rounded, unless the longest side hit 133)."""
    tool = load_tool(repo_root, "visualize_data.py")
    (train, _) = small_coco
    args = custom_config_args(repo_root, train)
    written = tool.main(
        [args[0], args[1], "--source", "dataloader", "--output-dir", str(tmp_path), "--num", "5"]
        + args[2:]
    )
    assert len(written) == 5 and len(set(written)) == 5
    allowed = {round(s * 0.1) for s in range(480, 801, 32)}
    for path in written:
        h, w = cv2.imread(path).shape[:2]
        assert max(h, w) <= 133 and (min(h, w) in allowed or max(h, w) == 133), (h, w)


def test_visualize_json_results(repo_root, small_coco, tmp_path):
    """Detections made from the val annotations (json category ids 2/5/9): one side-by-side PNG
    (2x the width) per image with a detection above the threshold; a low-score-only image and
    an unknown category id are handled (skipped / ValueError)."""
    tool = load_tool(repo_root, "visualize_json_results.py")
    (_, val) = small_coco
    coco = json.load(open(val[0]))
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 0.9,
        }
        for a in coco["annotations"]
        if not a["iscrowd"] and a["image_id"] != 3
    ]
    dets.append({"image_id": 3, "category_id": 9, "bbox": [1, 1, 10, 10], "score": 0.1})
    results = tmp_path / "coco_instances_results.json"
    results.write_text(json.dumps(dets))
    base = ["--input", str(results), "--dataset", "vis_val", "--dataset-json", *val]
    written = tool.main([*base, "--output", str(tmp_path / "out"), "--conf-threshold", "0.5"])
    with_dets = sorted({d["image_id"] for d in dets if d["score"] >= 0.5})
    assert [os.path.basename(p) for p in written] == [f"val_{i - 1:03d}.png" for i in with_dets]
    sizes = {i["id"]: (i["height"], i["width"]) for i in coco["images"]}
    for path, image_id in zip(written, with_dets):
        h, w = sizes[image_id]
        assert cv2.imread(path).shape == (h, 2 * w, 3)

    scaled = tool.main([*base, "--output", str(tmp_path / "x2"), "--scale", "2"])
    h, w = sizes[with_dets[0]]
    assert cv2.imread(scaled[0]).shape == (2 * h, 4 * w, 3)

    dets[0]["category_id"] = 4  # not a category of the dataset
    results.write_text(json.dumps(dets))
    with pytest.raises(ValueError, match="category_id 4 is not one of the dataset's"):
        tool.main([*base, "--output", str(tmp_path / "bad")])
