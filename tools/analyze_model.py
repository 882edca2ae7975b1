#!/usr/bin/env python
"""FLOPs, parameters, activations and structure of any config, as detectron2's
``tools/analyze_model.py``, with FLOP handles for the attention ops (``detr_variants.utils.analysis``).

    python tools/analyze_model.py --config-file projects/detr/configs/detr_r18_synthetic.py \\
        --tasks flop parameter activation structure --num-inputs 10
    python tools/analyze_model.py --config-file projects/deformable_detr/configs/deformable_detr_r50_50ep.py \\
        --tasks flop --input-size 800 1216 train.init_checkpoint=model.pth

FLOPs and activations are counted on ``--num-inputs`` images of the config's test set, resized by
its test mapper, or, with ``--input-size H W`` (needed when the dataset is not available, e.g.
COCO), on random H x W model inputs (no resize). One multiply-add counts as one flop. Overrides are
``key=value`` as for ``tools/train_net.py``.
"""

import argparse
import json
import logging
from collections import Counter
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
import tqdm
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.logger import setup_logger
from fvcore.nn import flop_count_table, parameter_count, parameter_count_table

import detr_variants  # noqa: F401  (registers the meta-architectures and datasets)
from detr_variants.checkpoint import Checkpointer
from detr_variants.engine import resolve_device
from detr_variants.engine.lazy_train import apply_overrides
from detr_variants.utils.analysis import activation_counts, flop_count_analysis

logger = logging.getLogger("detr_variants")


def synthetic_inputs(height: int, width: int, num: int, seed: int = 0) -> Iterable[List[Dict]]:
    """``num`` batches of one random ``height`` x ``width`` image in detectron2's input format."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(num):
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        yield [{"image": image, "height": height, "width": width}]


def test_inputs(cfg, input_size: Optional[List[int]], num: int) -> Iterable[List[Dict]]:
    """The first ``num`` batches of ``cfg.dataloader.test``, or random ones of ``input_size``."""
    if input_size:
        return synthetic_inputs(*input_size, num)
    try:
        loader = instantiate(cfg.dataloader.test)
    except (KeyError, FileNotFoundError, OSError) as e:
        raise SystemExit(
            f"cannot load the test set of the config ({e}); pass --input-size H W to count on "
            "random inputs of that size"
        ) from e
    return (batch for _, batch in zip(range(num), loader))


def build_model(cfg):
    model = instantiate(cfg.model).to(resolve_device(cfg.train.device))
    if cfg.train.get("init_checkpoint"):
        Checkpointer(model, strict=True).load(cfg.train.init_checkpoint)
    return model.eval()


def do_flop(cfg, args) -> Dict:
    inputs = test_inputs(cfg, args.input_size, args.num_inputs)
    model = build_model(cfg)
    counts, totals = Counter(), []
    for i, batch in enumerate(tqdm.tqdm(inputs)):
        analysis = flop_count_analysis(model, batch)
        if i > 0:
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counts += analysis.by_operator()
        totals.append(analysis.total())
    logger.info("FLOPs of the first input:\n%s", flop_count_table(analysis))
    by_operator = {k: v / len(totals) / 1e9 for k, v in counts.items()}
    logger.info("Average GFLOPs per operator: %s", by_operator)
    result = {
        "gflops_mean": float(np.mean(totals)) / 1e9,
        "gflops_std": float(np.std(totals)) / 1e9,
        "num_inputs": len(totals),
        "gflops_by_operator": by_operator,
    }
    logger.info(
        "Total GFLOPs: %.3f±%.3f over %d inputs",
        result["gflops_mean"],
        result["gflops_std"],
        len(totals),
    )
    return result


def do_activation(cfg, args) -> Dict:
    inputs = test_inputs(cfg, args.input_size, args.num_inputs)
    model = build_model(cfg)
    counts, totals = Counter(), []
    for batch in tqdm.tqdm(inputs):
        count = activation_counts(model, batch)
        counts += count
        totals.append(sum(count.values()))
    by_operator = {k: v / len(totals) for k, v in counts.items()}
    logger.info("Average million activations per operator: %s", by_operator)
    logger.info("Total million activations: %.3f±%.3f", np.mean(totals), np.std(totals))
    return {
        "mactivations_mean": float(np.mean(totals)),
        "mactivations_std": float(np.std(totals)),
        "mactivations_by_operator": by_operator,
    }


def do_parameter(cfg, args) -> Dict:
    model = instantiate(cfg.model)
    logger.info("Parameter count:\n%s", parameter_count_table(model, max_depth=5))
    return {"parameters": parameter_count(model)[""]}


def do_structure(cfg, args) -> Dict:
    structure = str(instantiate(cfg.model))
    logger.info("Model structure:\n%s", structure)
    return {"structure": structure}


TASKS = dict(flop=do_flop, parameter=do_parameter, activation=do_activation, structure=do_structure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--tasks", choices=TASKS, required=True, nargs="+")
    parser.add_argument(
        "-n", "--num-inputs", type=int, default=100, help="images to average FLOPs/activations"
    )
    parser.add_argument(
        "--input-size", type=int, nargs=2, metavar=("H", "W"), help="random inputs of this size"
    )
    parser.add_argument("--output", help="also write the results as JSON to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    return parser.parse_args(argv)


def main(argv=None) -> Dict:
    args = parse_args(argv)
    setup_logger(name="fvcore")
    setup_logger(name="detr_variants")
    cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)
    results = {task: TASKS[task](cfg, args) for task in args.tasks}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
