#!/usr/bin/env python
"""The main job on the embedded dataset: train the default demo config on synthetic_shapes
(CPU-sized), evaluate it with COCOEvaluator, print the AP line and save a PNG of predictions
on validation images. (To run a checkpoint on your own images or a video, use demo/demo.py.)

    python tools/train_demo.py --output-dir output/demo [--config detr/detr_r18_synthetic] [key=value ...]

The default is Deformable DETR, which beats DETR on synthetic_shapes (README). Its full
700-iteration recipe takes about 2.2 s per iteration on 2 cores, so the demo trains it for 250
iterations (the schedule is relative, so the lr drop stays at 80%) to keep training within 12
minutes; `--config` runs any packaged config with its own iteration count.
"""

import argparse
import json
import os
import time

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

import detr_variants  # noqa: F401  (registers datasets and models)
from detr_variants.engine import DefaultPredictor
from detr_variants.engine.lazy_train import apply_overrides, train
from detr_variants.model_zoo import get_config

DEFAULT_DEMO_CONFIG = "deformable_detr/deformable_detr_r18_synthetic"
DEFAULT_DEMO_OVERRIDES = ["train.max_iter=250"]


def predictions_png(
    cfg,
    weights: str,
    path: str,
    num_images: int = 6,
    score_threshold: float = 0.3,
    at_least: int = 3,
) -> None:
    """Draws the predictions above ``score_threshold`` on the first validation images, in a grid;
    an image with fewer gets its ``at_least`` best ones (a short run's sigmoid scores are low), each
    labelled with its score."""
    cfg.train.init_checkpoint = weights
    predictor = DefaultPredictor(cfg)
    dataset = cfg.dataloader.test.dataset.names
    metadata = MetadataCatalog.get(dataset)
    tiles = []
    for record in DatasetCatalog.get(dataset)[:num_images]:
        image = cv2.imread(record["file_name"])
        instances = predictor(image)["instances"].to("cpu")
        keep = max(int((instances.scores >= score_threshold).sum()), min(at_least, len(instances)))
        instances = instances[instances.scores.argsort(descending=True)[:keep]]
        vis = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances)
        tiles.append(cv2.resize(vis.get_image(), (320, 320)))
    rows = [np.concatenate(tiles[i : i + 3], axis=1) for i in range(0, len(tiles), 3)]
    cv2.imwrite(path, np.concatenate(rows, axis=0)[:, :, ::-1])


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=DEFAULT_DEMO_CONFIG, help="packaged config (project/name)"
    )
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("opts", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    defaults = DEFAULT_DEMO_OVERRIDES if args.config == DEFAULT_DEMO_CONFIG else []
    cfg = apply_overrides(
        get_config(args.config), [*defaults, f"train.output_dir={args.output_dir}", *args.opts]
    )
    cfg.dataloader.evaluator.output_dir = os.path.join(args.output_dir, "inference")
    setup_logger(args.output_dir, name="detectron2")
    setup_logger(args.output_dir, name="detr_variants")

    start = time.perf_counter()
    results = train(cfg)
    train_eval_seconds = time.perf_counter() - start
    box = results["bbox"]
    png = os.path.join(args.output_dir, "predictions.png")
    predictions_png(cfg, os.path.join(args.output_dir, "model_final.pth"), png)

    summary = {
        "config": args.config,
        "iterations": cfg.train.max_iter,
        "seconds_train_and_eval": train_eval_seconds,
        **{k: box[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
    }
    with open(os.path.join(args.output_dir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(
        f"\n{args.config}: {cfg.train.max_iter} iterations, {train_eval_seconds / 60:.1f} min train+eval"
    )
    print(
        "AP {AP:.1f} | AP50 {AP50:.1f} | AP75 {AP75:.1f} | APs {APs:.1f} | APm {APm:.1f} | APl {APl:.1f}".format(
            **box
        )
    )
    print(f"predictions drawn in {png}")


if __name__ == "__main__":
    main()
