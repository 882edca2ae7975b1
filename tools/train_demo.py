#!/usr/bin/env python
"""The main job (``make demo``): train the demo recipe from scratch on the embedded ``shapes_demo``
level, evaluate it with COCOEvaluator, and draw its detections on validation images. Prints the
AP line, the training time (evaluation excluded), the peak memory, and where the PNG and the
checkpoint are; then how to run that checkpoint on your own images with ``demo/demo.py``.

    python tools/train_demo.py --output-dir output/demo
    python tools/train_demo.py --config-file projects/detr/configs/detr_demo.py --output-dir output/demo_detr
    python tools/train_demo.py --eval-period 250 train.max_iter=500   # AP every 250 iterations

The default, ``projects/deformable_detr/configs/deformable_detr_demo.py``, is Deformable DETR with
box refinement and two-stage proposals; the recipe (``configs/common/demo.py``) and the measured
results, with plain DETR for comparison, are in the README ("The demo").
"""

import argparse
import json
import os
import resource
import sys
import time

import cv2
import numpy as np
from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer

import detr_variants  # noqa: F401  (registers datasets and models)
from detr_variants.engine import DefaultPredictor
from detr_variants.engine.convergence import AP_KEYS, ConvergenceRecorder
from detr_variants.engine.lazy_train import apply_overrides, train

DEFAULT_CONFIG = "projects/deformable_detr/configs/deformable_detr_demo.py"


def predictions_png(
    cfg, weights: str, path: str, score_threshold: float, num_images: int = 6
) -> int:
    """Draws the detections scoring at least ``score_threshold`` on the first validation
    images, in a grid of 3 columns, each labelled with its class and score. Returns how many
    were drawn."""
    cfg.train.init_checkpoint = weights
    predictor = DefaultPredictor(cfg)
    dataset = cfg.dataloader.test.dataset.names
    metadata = MetadataCatalog.get(dataset)
    tiles, drawn = [], 0
    for record in DatasetCatalog.get(dataset)[:num_images]:
        image = cv2.imread(record["file_name"])
        instances = predictor(image)["instances"].to("cpu")
        instances = instances[instances.scores >= score_threshold]
        drawn += len(instances)
        vis = Visualizer(image[:, :, ::-1], metadata, scale=2.0).draw_instance_predictions(
            instances
        )
        tiles.append(cv2.resize(vis.get_image(), (320, 320)))
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 3)
    rows = [np.concatenate(tiles[i : i + 3], axis=1) for i in range(0, len(tiles), 3)]
    cv2.imwrite(path, np.concatenate(rows, axis=0)[:, :, ::-1])
    return drawn


def peak_rss_mib() -> dict:
    """Peak resident memory of this process and of its largest finished child (the data loader
    workers), MiB (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"main_process": round(own), "largest_child": round(child)}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE")
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument(
        "--eval-period",
        type=int,
        default=0,
        help="also evaluate every N iterations (0: only at the end); each adds ~10 s",
    )
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=0.3,
        help="draw detections scoring at least this (a short run's sigmoid scores stay below 0.5)",
    )
    parser.add_argument("opts", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()

    cfg = apply_overrides(
        LazyConfig.load(args.config_file), [f"train.output_dir={args.output_dir}", *args.opts]
    )
    cfg.train.eval_period = -1  # the recorder below evaluates
    cfg.dataloader.evaluator.output_dir = os.path.join(args.output_dir, "inference")
    setup_logger(args.output_dir, name="detectron2")
    setup_logger(args.output_dir, name="detr_variants")

    max_iter = cfg.train.max_iter
    recorder = None

    def add_recorder(evaluate):
        # times the training steps alone and evaluates every --eval-period and at the end
        nonlocal recorder
        recorder = ConvergenceRecorder(
            evaluate, period=args.eval_period or max_iter, on_record=lambda record: None
        )
        return [recorder]

    start = time.perf_counter()
    train(cfg, extra_hooks=add_recorder)
    total_seconds = time.perf_counter() - start
    points = recorder.points
    final = points[-1]
    weights = os.path.join(args.output_dir, "model_final.pth")
    png = os.path.join(args.output_dir, "predictions.png")
    drawn = predictions_png(cfg, weights, png, args.score_threshold)

    summary = {
        "config": args.config_file,
        "overrides": args.opts,
        "iterations": max_iter,
        "train_wall_s": final["train_wall_s"],
        "train_cpu_s": final["train_cpu_s"],
        "train_and_eval_wall_s": total_seconds,
        "peak_rss_mib": peak_rss_mib(),
        "detections_drawn": drawn,
        **{k: final[k] for k in AP_KEYS},
        "points": points,
    }
    with open(os.path.join(args.output_dir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)

    ap = " | ".join(f"{k} {final[k]:.1f}" if final[k] is not None else f"{k} -" for k in AP_KEYS)
    rss = summary["peak_rss_mib"]
    print(
        f"\n{args.config_file}: {max_iter} iterations\n"
        f"COCO box {ap}  (on {cfg.dataloader.test.dataset.names})\n"
        f"training {final['train_wall_s'] / 60:.1f} min (evaluation excluded), "
        f"{total_seconds / 60:.1f} min in all; peak memory {rss['main_process']} MiB "
        f"(largest loader worker {rss['largest_child']} MiB)\n"
        f"{drawn} detections (score >= {args.score_threshold}) drawn in {png}\n"
        f"checkpoint: {weights}\n\n"
        "Run it on your own images or a video:\n"
        f"  {os.path.relpath(sys.executable)} demo/demo.py --config-file {args.config_file} "
        f"--input IMAGES... --output out/ --opts train.init_checkpoint={weights}"
    )


if __name__ == "__main__":
    main()
