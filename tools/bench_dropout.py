#!/usr/bin/env python
"""Benchmarks the native CPU dropout against PyTorch's, side by side in one run.

The tensor is the FFN activation of a Deformable DETR encoder layer at 512x512, batch 2:
(2, 5440, 1024) float32. Timed (median of --repeat runs after a warm-up, the cases interleaved):
``F.dropout``; the native forward, alone and with the ReLU fused in; the native backward; and one
``torch.mul`` of two such tensors as a memory-bound reference. Writes the numbers as JSON.

  python tools/bench_dropout.py [--repeat 10] [--threads 2] [--output output/bench_dropout.json]
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from detr_variants._native import _C  # noqa: E402


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--output", default=os.path.join("output", "bench_dropout.json"))
    args = parser.parse_args()
    if _C is None:
        sys.exit("detr_variants._C is not built (make setup)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(2, 5440, 1024)
    _, mask = _C.dropout_cpu_forward(x, args.p, 0)
    scale = 1.0 / (1.0 - args.p)
    cases = {
        "F.dropout": lambda: F.dropout(x, args.p, True),
        "native forward": lambda: _C.dropout_cpu_forward(x, args.p, 0),
        "native forward, ReLU fused": lambda: _C.dropout_cpu_forward(x, args.p, 0, True),
        "native backward": lambda: _C.dropout_cpu_backward(x, mask, scale),
        "torch.mul (reference)": lambda: x * x,
    }
    times = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(args.repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    result = {
        "shape": list(x.shape),
        "p": args.p,
        "threads": args.threads,
        "torch": torch.__version__,
        "median_ms": {name: 1e3 * statistics.median(t) for name, t in times.items()},
    }
    for name, ms in result["median_ms"].items():
        print(f"{name:28s} {ms:7.1f} ms")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
