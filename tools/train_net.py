#!/usr/bin/env python
"""Train or evaluate a detr_variants LazyConfig (a projects/*/configs file, or your own: see the
README's "Your own dataset").

examples:
    python tools/train_net.py --config-file projects/detr/configs/detr_r18_synthetic.py
    python tools/train_net.py --config-file CFG --eval-only train.init_checkpoint=model.pth
    python tools/train_net.py --config-file CFG --num-gpus 8            # DDP on 8 GPUs
    python tools/train_net.py --config-file CFG --num-gpus 2            # 2 CPU processes (gloo) without a GPU
    python tools/train_net.py --config-file CFG --resume                # continue from the last checkpoint
    python tools/train_net.py --config-file CFG train.max_iter=100 model.num_queries=50

--num-gpus is the number of processes per machine (GPUs, or CPU processes without CUDA).
Config keys are overridden as key=value after the flags (lists as [1,2]); an unknown key is an
error naming close matches, and +key=value adds a new one. train.* (configs/common/train.py)
holds the schedule (epochs or max_iter), AMP, clipping, EMA, checkpoint and evaluation periods;
results go to train.output_dir (checkpoints, metrics.json, inference/).
"""

import logging
import os
import sys

from detectron2.config import LazyConfig
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import detr_variants  # noqa: F401  (registers the meta-architectures and datasets)
from detr_variants.engine.lazy_train import apply_overrides, evaluate, train

logger = logging.getLogger("detr_variants")


def main(args):
    cfg = LazyConfig.load(args.config_file)
    cfg = apply_overrides(cfg, args.opts)
    if "evaluator" in cfg.dataloader:
        cfg.dataloader.evaluator.output_dir = os.path.join(cfg.train.output_dir, "inference")
    default_setup(cfg, args)  # logging, config.yaml in the output dir, seeds
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="detr_variants")
    if args.eval_only:
        return evaluate(cfg)
    return train(cfg, resume=args.resume)


def argument_parser():
    """detectron2's launcher flags, with this project's usage text and flag help."""
    parser = default_argument_parser(epilog=__doc__.split("\n\n", 1)[1])
    parser.description = __doc__.split("\n\n", 1)[0]
    helps = {
        "config_file": "the LazyConfig (.py) to run",
        "resume": "continue from the last checkpoint in train.output_dir (iteration, optimizer, "
        "scheduler, EMA) instead of loading train.init_checkpoint",
        "eval_only": "evaluate train.init_checkpoint (loaded strictly) on dataloader.test",
        "num_gpus": "processes per machine: GPUs (NCCL), or CPU processes (gloo) without CUDA",
        "opts": "config overrides: key=value (an unknown key is an error), +key=value adds a key",
    }
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest]
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    sys.exit(0)
