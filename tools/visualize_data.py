#!/usr/bin/env python
"""Draw a LazyConfig's training data: the annotations as stored, or what the training loader
feeds the model (the mapper's augmented images and boxes, crowd regions dropped).

    python tools/visualize_data.py --config-file my_deformable_detr.py --source annotation \\
        --output-dir output/vis --num 8
    python tools/visualize_data.py --config-file projects/detr/configs/detr_r18_synthetic.py \\
        --source dataloader --output-dir output/vis --num 8 dataloader.train.num_workers=0

One PNG per image in --output-dir: ``<image name>.png`` for annotations,
``<image name>_<k>.png`` for the k-th augmented view drawn from the loader.
"""

import argparse
import itertools
import logging
import os
import sys

import cv2
import numpy as np
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

import detr_variants  # noqa: F401  (registers the datasets)
from detr_variants.data.image_io import read_image
from detr_variants.engine.lazy_train import apply_overrides, build_train_loader

logger = logging.getLogger("detr_variants")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="a LazyConfig (.py)")
    parser.add_argument(
        "--source",
        choices=["annotation", "dataloader"],
        required=True,
        help="annotation: the dataset's records; dataloader: the training mapper's output",
    )
    parser.add_argument("--output-dir", required=True, help="where the PNGs are written")
    parser.add_argument("--num", type=int, default=16, help="number of images to draw")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="drawing size / image size (small images: 2-3)"
    )
    parser.add_argument("opts", nargs="*", help="config overrides, key=value (+key=value adds)")
    return parser.parse_args(argv)


def dataset_metadata(cfg):
    """Metadata of the training dataset(s) (the first one's, for the class names)."""
    names = instantiate(cfg.dataloader.train.dataset.names)
    return MetadataCatalog.get(names if isinstance(names, str) else names[0])


def save(image_rgb: np.ndarray, path: str) -> None:
    if not cv2.imwrite(path, np.ascontiguousarray(image_rgb[:, :, ::-1])):
        raise OSError(f"Could not write {path}")


def draw_annotations(cfg, output_dir: str, num: int, scale: float = 1.0):
    dicts = instantiate(cfg.dataloader.train.dataset)
    metadata = dataset_metadata(cfg)
    for record in dicts[:num]:
        image = read_image(record["file_name"], "RGB")
        drawn = Visualizer(image, metadata, scale=scale).draw_dataset_dict(record).get_image()
        name = os.path.splitext(os.path.basename(record["file_name"]))[0]
        save(drawn, os.path.join(output_dir, f"{name}.png"))
        yield os.path.join(output_dir, f"{name}.png")


def draw_loader(cfg, output_dir: str, num: int, scale: float = 1.0):
    image_format = cfg.dataloader.train.mapper.get("image_format", "RGB")
    loader, _ = build_train_loader(cfg)
    metadata = dataset_metadata(cfg)
    batches = (sample for batch in loader for sample in batch)
    for k, sample in enumerate(itertools.islice(batches, num)):
        image = sample["image"].permute(1, 2, 0).numpy()
        if image_format == "BGR":
            image = image[:, :, ::-1]
        inst = sample["instances"]
        classes = inst.gt_classes.tolist()
        names = metadata.get("thing_classes")
        drawn = (
            Visualizer(image, metadata, scale=scale)
            .overlay_instances(
                boxes=inst.gt_boxes.tensor.numpy(),
                labels=[names[c] if names else str(c) for c in classes],
            )
            .get_image()
        )
        name = os.path.splitext(os.path.basename(sample["file_name"]))[0]
        save(drawn, os.path.join(output_dir, f"{name}_{k}.png"))
        yield os.path.join(output_dir, f"{name}_{k}.png")


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="detr_variants")
    cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)
    os.makedirs(args.output_dir, exist_ok=True)
    draw = draw_annotations if args.source == "annotation" else draw_loader
    written = list(draw(cfg, args.output_dir, args.num, args.scale))
    logger.info(f"Wrote {len(written)} images to {args.output_dir}")
    return written


if __name__ == "__main__":
    main()
    sys.exit(0)
