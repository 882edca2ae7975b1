"""Fuzz test of the dataset mapper (issue #14): random dataset dicts through the training and
the evaluation mapper. Every outcome must be a correct sample, a logged skip, or an exception
whose message names the file; never an unrelated crash, and never a target outside the image,
of zero area or with NaN."""

import collections
import logging

import cv2
import numpy as np
import pytest
from detectron2.structures import BoxMode
from PIL import Image

from detr_variants.data import DetrDatasetMapper, detr_test_augmentations, detr_train_augmentations

NUM_DICTS = 1000
logger = logging.getLogger(__name__)


def _image_files(tmp_path, rng):
    """Image files of every kind the mapper must handle: ``(path, height, width)``."""
    files = []

    def add(name, array=None, mode=None, raw=None):
        path = str(tmp_path / name)
        if raw is not None:
            with open(path, "wb") as f:
                f.write(raw)
        elif mode is not None:
            Image.fromarray(array, mode).save(path)
        else:
            cv2.imwrite(path, array)
        h, w = array.shape[:2] if array is not None else (8, 8)
        files.append((path, h, w))

    for h, w in [(1, 1), (2, 3), (7, 5), (16, 16), (3000, 2), (2, 3000), (1, 300), (33, 20)]:
        add(f"rgb_{h}x{w}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    add("gray.jpg", rng.integers(0, 256, (12, 9), dtype=np.uint8))
    add("rgba.png", rng.integers(0, 256, (10, 14, 4), dtype=np.uint8))
    add("g16.png", rng.integers(0, 65536, (9, 11), dtype=np.uint16))
    add("float.tiff", rng.random((6, 6), dtype=np.float32), mode="F")
    add("int32.tiff", rng.integers(0, 2**20, (6, 6), dtype=np.int32), mode="I")
    add("palette.png", rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="P")
    good = cv2.imencode(".jpg", rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))[1].tobytes()
    add("truncated.jpg", raw=good[: len(good) // 2])
    add("not_an_image.jpg", raw=b"GIF89a nonsense")
    files.append((str(tmp_path / "missing.jpg"), 8, 8))
    return files


def _number(rng, scale):
    r = rng.random()
    if r < 0.005:
        return float(rng.choice([np.nan, np.inf, -np.inf]))
    if r < 0.1:
        return -float(rng.random() * scale)
    if r < 0.15:
        return int(rng.integers(0, scale + 1))
    return float(rng.random() * scale * 1.2)


def _annotation(rng, h, w):
    mode = BoxMode(int(rng.integers(0, 5)))
    n = 5 if mode == BoxMode.XYWHA_ABS else 4
    if rng.random() < 0.01:
        n = int(rng.integers(0, 7))  # wrong length
    bbox = [_number(rng, max(h, w)) for _ in range(n)]
    r = rng.random()
    if r < 0.005:
        bbox = None
    elif r < 0.05:
        bbox = np.array(bbox)
    elif r < 0.055 and bbox:
        bbox[0] = "12"
    ann = {"bbox": bbox, "bbox_mode": mode, "category_id": int(rng.integers(0, 6))}
    r = rng.random()
    if r < 0.005:
        ann["category_id"] = rng.choice([None, 2.5, -1, "1"])
    elif r < 0.01:
        del ann[rng.choice(["bbox", "bbox_mode", "category_id"])]
    if rng.random() < 0.1:
        ann["iscrowd"] = 1
        ann["segmentation"] = {"counts": [0, h * w], "size": [h, w]}  # RLE, as COCO's crowds
    elif rng.random() < 0.5:
        ann["iscrowd"] = 0
        ann["segmentation"] = [[0.0, 0.0, w, 0.0, w, h]]  # a polygon
    return ann


def _record(rng, files, index):
    path, h, w = files[int(rng.integers(len(files)))]
    num = int(rng.choice([0, 1, 3, 10, 1000], p=[0.2, 0.35, 0.3, 0.14, 0.01]))
    record = {"file_name": path, "height": h, "width": w, "image_id": index,
              "annotations": [_annotation(rng, h, w) for _ in range(num)]}  # fmt: skip
    r = rng.random()
    if r < 0.03:
        del record[rng.choice(["file_name", "height", "width", "annotations"])]
    elif r < 0.05:
        record["height"] = h + 1  # wrong size in the json
    return record


def _check_sample(out, record, is_train):
    image = out["image"]
    assert image.dtype.is_floating_point is False and image.shape[0] == 3
    assert min(image.shape[1:]) >= 1
    if not is_train:
        assert "instances" not in out
        return
    inst = out["instances"]
    h, w = image.shape[1:]
    assert inst.image_size == (h, w)
    boxes = inst.gt_boxes.tensor
    assert boxes.isfinite().all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert ((boxes[:, 2:] - boxes[:, :2]) >= 1).all()  # at least a pixel a side
    assert len(inst) <= len(record.get("annotations", []))
    assert ((inst.gt_classes >= 0) & (inst.gt_classes < 6)).all()


def test_mapper_fuzz(tmp_path, caplog):
    rng = np.random.default_rng(0)
    np.random.seed(0)  # the augmentations' own randomness
    files = _image_files(tmp_path, rng)
    small = dict(min_sizes=[8, 16], max_size=24, crop_resize_sizes=[8, 12], crop_size=[4, 8])
    mappers = {
        True: DetrDatasetMapper(
            is_train=True,
            augmentations=detr_train_augmentations(**small),
            max_consecutive_failures=10**6,  # single bad files here, not a wrong root
        ),
        False: DetrDatasetMapper(is_train=False, augmentations=detr_test_augmentations(16, 24)),
    }
    counts = collections.Counter()
    for index in range(NUM_DICTS):
        record = _record(rng, files, index)
        for is_train, mapper in mappers.items():
            split = "train" if is_train else "eval"
            caplog.clear()
            try:
                with caplog.at_level(logging.WARNING):
                    out = mapper(record)
            except (ValueError, IOError) as e:
                name = record.get("file_name", f"image_id {record['image_id']!r}")
                assert str(name) in str(e), f"error without the file name: {e!r}"
                counts[f"{split}: error"] += 1
                continue
            if out is None:
                assert is_train and "Skipping unreadable image" in caplog.text
                counts[f"{split}: skipped"] += 1
                continue
            _check_sample(out, record, is_train)
            counts[f"{split}: sample"] += 1
            if is_train:
                counts["train: targets"] += len(out["instances"])
    logger.warning(
        "mapper fuzz outcomes over %d dicts: %s", NUM_DICTS, dict(sorted(counts.items()))
    )
    print(dict(sorted(counts.items())))
    # Every kind of outcome happens, and most dicts make a sample.
    for split in ("train", "eval"):
        assert counts[f"{split}: sample"] > NUM_DICTS // 4
        assert counts[f"{split}: error"] > 0
    assert counts["train: skipped"] > 0 and counts["train: targets"] > 0
    assert sum(v for k, v in counts.items() if k != "train: targets") == 2 * NUM_DICTS


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
