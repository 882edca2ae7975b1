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
from detr_variants.checkpoint import convert_checkpoint, known_converters


def load_state_dict(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=False)


def main():
    pairs = known_converters()
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="known --source / --arch pairs:\n"
        + "\n".join(f"  --source {s} --arch {a}" for s, a in pairs),
    )
    parser.add_argument(
        "--source",
        required=True,
        choices=sorted({s for s, _ in pairs}),
        help="official: the paper's release; hf: HF transformers",
    )
    parser.add_argument(
        "--arch", required=True, choices=sorted({a for _, a in pairs}), help="see the pairs below"
    )
    parser.add_argument("input", help="checkpoint file (.pth, .bin or .safetensors)")
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    args = parser.parse_args()
    if (args.source, args.arch) not in pairs:
        parser.error(f"no converter for --source {args.source} --arch {args.arch}; see --help")
    converted = convert_checkpoint(load_state_dict(args.input), args.source, args.arch)
    torch.save(
        {"model": converted, "__author__": f"{args.source} {args.arch} via detr_variants"},
        args.output,
    )
    print(f"wrote {len(converted)} tensors to {args.output}")


if __name__ == "__main__":
    main()
