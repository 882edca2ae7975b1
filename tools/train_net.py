#!/usr/bin/env python
"""Train or evaluate a detr_variants LazyConfig.

    python tools/train_net.py --config-file projects/detr/configs/detr_r18_synthetic.py
    python tools/train_net.py --config-file CFG --eval-only train.init_checkpoint=model.pth
    python tools/train_net.py --config-file CFG --num-gpus 8            # DDP on 8 GPUs
    python tools/train_net.py --config-file CFG --num-gpus 2            # 2 CPU processes (gloo) without a GPU
    python tools/train_net.py --config-file CFG --resume                # continue from the last checkpoint

``--num-gpus`` is the number of processes per machine (GPUs, or CPU processes without CUDA).
Config keys are overridden as ``key=value``; an unknown key is an error (``+key=value`` adds one).
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


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
    sys.exit(0)
