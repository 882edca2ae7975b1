#!/usr/bin/env python
"""Convert an official or HF-transformers checkpoint for a detr_variants model.

    python tools/convert_checkpoint.py --source official --arch deformable_detr r50_deformable_detr.pth out.pth
    python tools/convert_checkpoint.py --source hf --arch conditional_detr pytorch_model.bin out.pth

The output holds ``{"model": state_dict}`` and loads with ``DetectionCheckpointer`` (set
``train.init_checkpoint`` to it).
"""

import argparse

import torch

import detr_variants  # noqa: F401  (registers the converters)
from detr_variants.checkpoint import convert_checkpoint


def load_state_dict(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, choices=["official", "hf"])
    parser.add_argument("--arch", required=True)
    parser.add_argument("input")
    parser.add_argument("output")
    args = parser.parse_args()
    converted = convert_checkpoint(load_state_dict(args.input), args.source, args.arch)
    torch.save(
        {"model": converted, "__author__": f"{args.source} {args.arch} via detr_variants"},
        args.output,
    )
    print(f"wrote {len(converted)} tensors to {args.output}")


if __name__ == "__main__":
    main()
