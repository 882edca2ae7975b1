#!/usr/bin/env python
"""Convert an official or HF-transformers checkpoint for a detr_variants model.

    python tools/convert_checkpoint.py --source official --arch deformable_detr r50_deformable_detr.pth out.pth
    python tools/convert_checkpoint.py --source hf --arch conditional_detr pytorch_model.bin out.pth

The input is a path or a URL (verified against its SHA-256: ``?sha256=<hex>`` or a torch.hub
file name). It is unpickled with an allow-list of the types released checkpoints hold (tensors,
``argparse.Namespace``, numpy arrays); ``--trust-checkpoint`` lifts it for files you trust. The
output holds ``{"model": state_dict}`` and loads with ``DetectionCheckpointer`` (set
``train.init_checkpoint`` to it).
"""

import argparse

import detr_variants  # noqa: F401  (registers the converters)
from detr_variants.checkpoint import (
    atomic_torch_save,
    convert_checkpoint,
    known_converters,
    load_checkpoint_file,
)


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
    parser.add_argument("input", help="checkpoint path or URL (.pth, .bin or .safetensors)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the input unrestricted and accept a URL without a known SHA-256 "
        "(only for files from a source you trust)",
    )
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    args = parser.parse_args()
    if (args.source, args.arch) not in pairs:
        parser.error(f"no converter for --source {args.source} --arch {args.arch}; see --help")
    converted = convert_checkpoint(
        load_checkpoint_file(args.input, trust=args.trust_checkpoint), args.source, args.arch
    )
    atomic_torch_save(
        {"model": converted, "__author__": f"{args.source} {args.arch} via detr_variants"},
        args.output,
    )
    print(f"wrote {len(converted)} tensors to {args.output}")


if __name__ == "__main__":
    main()
