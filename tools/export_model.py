#!/usr/bin/env python
"""Exports a detector to ONNX, TorchScript or a ``torch.export`` program (any H and W).

    python tools/export_model.py --format onnx --config-file \
        projects/deformable_detr/configs/deformable_detr_r50_50ep.py \
        --output output/deformable_detr.onnx [train.init_checkpoint=model.pth] [key=value ...]

The exported model takes one image (1, 3, H, W), float pixel values in the config's input format
(``<output>.json`` says which), resized as the test-time augmentation does, and returns class
logits and boxes; ``<output>.json`` also holds what ``detr_variants.engine.export.
postprocess_exported`` needs to turn them into the PyTorch model's detections. ``--check`` runs
the exported model next to the PyTorch one on two image sizes (a TorchScript trace of Deformable
DETR or SMCA: at its traced size, the only one it accepts) and prints the largest differences.
"""

import argparse
import json
import logging
import os

import torch
from detectron2.config import LazyConfig, instantiate

import detr_variants  # noqa: F401  (registers the models)
from detr_variants.checkpoint import Checkpointer
from detr_variants.engine.export import (
    EXPORT_FORMATS,
    ExportableDetector,
    export_meta,
    exported_inputs,
    load_exported,
    pad_to_divisibility,
    save_exported,
    trace_follows_input_size,
)
from detr_variants.engine.lazy_train import apply_overrides

logger = logging.getLogger("export_model")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=EXPORT_FORMATS, required=True)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="the exported file (.onnx, .pt, .pt2)")
    parser.add_argument(
        "--size", type=int, nargs=2, default=(800, 1216), metavar=("H", "W"),
        help="example input size to capture the graph with (export and onnx take any size; "
        "a TorchScript trace of Deformable DETR or SMCA only this one)",
    )  # fmt: skip
    parser.add_argument("--check", action="store_true", help="compare with PyTorch at 2 sizes")
    parser.add_argument("opts", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)
    model = instantiate(cfg.model).eval()
    if cfg.train.get("init_checkpoint"):
        Checkpointer(model, strict=True).load(cfg.train.init_checkpoint)
    else:
        logger.warning("no train.init_checkpoint: exporting randomly initialised weights")
    meta = export_meta(model)
    example = pad_to_divisibility(torch.rand(1, 3, *args.size) * 255, meta)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with torch.no_grad():
        save_exported(ExportableDetector(model), example, args.output, args.format)
    with open(args.output + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    logger.info("wrote %s and %s.json", args.output, args.output)

    report = {"output": args.output, "format": args.format}
    if args.check:
        run = load_exported(args.output, args.format)
        h, w = args.size
        sizes = ((h, w), (h + 37, w - 53))
        if args.format == "torchscript" and not trace_follows_input_size(model):
            sizes = sizes[:1]  # the trace refuses other sizes (FixedSizeTrace)
        for size in sizes:
            inputs = exported_inputs(torch.rand(1, 3, *size) * 255, meta)
            with torch.no_grad():
                expected = ExportableDetector(model)(*inputs)
            got = run(*inputs)
            diffs = [(e.float() - g.float()).abs().max().item() for e, g in zip(expected, got)]
            report[f"max_abs_diff_{size[0]}x{size[1]}"] = diffs
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
