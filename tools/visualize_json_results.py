#!/usr/bin/env python
"""Draw COCO-format detections (``coco_instances_results.json``, as ``COCOEvaluator`` writes it)
next to the ground truth of a registered dataset: the project's (``synthetic_shapes_val``, the
``custom_*`` names once a config has registered them: see --config-file), detectron2's builtin
ones, or a COCO json given by --dataset-json.

    python tools/visualize_json_results.py --dataset synthetic_shapes_val --output output/dets \\
        --input output/detr_r18_synthetic/inference/coco_instances_results.json
    python tools/visualize_json_results.py --config-file my_deformable_detr.py \\
        --dataset custom_val --output output/my_dets \\
        --input output/my_deformable_detr/inference/coco_instances_results.json

Writes ``<image name>.png`` per image with detections: predictions scoring at least
--conf-threshold on the left, the annotations on the right.
"""

import argparse
import json
import logging
import os
import sys
from collections import defaultdict

import cv2
import numpy as np
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, BoxMode, Instances
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

import detr_variants  # noqa: F401  (registers the project's datasets)
from detr_variants.data import register_coco_dataset
from detr_variants.data.image_io import read_image

logger = logging.getLogger("detr_variants")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="COCO-format detections (json list)")
    parser.add_argument("--dataset", required=True, help="registered dataset name")
    parser.add_argument("--output", required=True, help="output directory for the PNGs")
    parser.add_argument("--conf-threshold", type=float, default=0.5, help="minimum score drawn")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="drawing size / image size (small images: 2-3)"
    )
    parser.add_argument(
        "--config-file", help="a LazyConfig whose dataloader registers --dataset (custom data)"
    )
    parser.add_argument(
        "--dataset-json", nargs=2, metavar=("JSON", "IMAGE_ROOT"), help="register --dataset"
    )
    return parser.parse_args(argv)


def register_from_config(config_file: str) -> None:
    """Instantiates the config's dataset names, which registers ``custom_*`` datasets."""
    cfg = LazyConfig.load(config_file)
    for split in ("train", "test"):
        if split in cfg.dataloader:
            instantiate(cfg.dataloader[split].dataset.names)


def predictions_by_image(path: str, metadata, threshold: float):
    """Detections per image id as ``Instances`` with contiguous class ids."""
    with open(path) as f:
        detections = json.load(f)
    to_contiguous = metadata.get("thing_dataset_id_to_contiguous_id")
    by_image = defaultdict(list)
    for d in detections:
        if d["score"] < threshold:
            continue
        if to_contiguous is not None and d["category_id"] not in to_contiguous:
            raise ValueError(
                f"{path}: category_id {d['category_id']} is not one of the dataset's "
                f"{sorted(to_contiguous)}"
            )
        by_image[d["image_id"]].append(d)
    return detections, by_image, to_contiguous


def to_instances(dets, to_contiguous, image_size) -> Instances:
    inst = Instances(image_size)
    boxes = np.asarray([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
    inst.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    inst.scores = np.asarray([d["score"] for d in dets])
    cats = [d["category_id"] for d in dets]
    inst.pred_classes = np.asarray([to_contiguous[c] if to_contiguous else c for c in cats])
    return inst


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="detr_variants")
    if args.config_file:
        register_from_config(args.config_file)
    if args.dataset_json:
        register_coco_dataset(args.dataset, *args.dataset_json)
    if args.dataset not in DatasetCatalog:
        raise KeyError(
            f"Dataset {args.dataset!r} is not registered; pass --config-file or --dataset-json. "
            f"Registered: {', '.join(sorted(DatasetCatalog.list()))}"
        )
    records = DatasetCatalog.get(args.dataset)  # loading it fills thing_classes and the id map
    metadata = MetadataCatalog.get(args.dataset)
    detections, by_image, to_contiguous = predictions_by_image(
        args.input, metadata, args.conf_threshold
    )
    known = {r["image_id"] for r in records}
    unknown = {d["image_id"] for d in detections} - known
    if unknown:
        raise ValueError(
            f"{args.input}: image ids {sorted(unknown)[:10]} are not in {args.dataset!r}"
        )
    os.makedirs(args.output, exist_ok=True)
    written = []
    for record in records:
        if record["image_id"] not in by_image:
            continue
        image = read_image(record["file_name"], "RGB")
        inst = to_instances(by_image[record["image_id"]], to_contiguous, image.shape[:2])
        predicted = Visualizer(image, metadata, args.scale).draw_instance_predictions(inst)
        truth = Visualizer(image, metadata, args.scale).draw_dataset_dict(record)
        side_by_side = np.concatenate([predicted.get_image(), truth.get_image()], axis=1)
        name = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = os.path.join(args.output, f"{name}.png")
        if not cv2.imwrite(path, side_by_side[:, :, ::-1]):
            raise OSError(f"Could not write {path}")
        written.append(path)
    logger.info(
        f"Wrote {len(written)} images with detections scoring >= {args.conf_threshold} to "
        f"{args.output}"
    )
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
