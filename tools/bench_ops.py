#!/usr/bin/env python
"""Benchmarks multi-scale deformable attention: native kernels vs the PyTorch (grid_sample) path.

Cases (Deformable DETR, one 800x1216 image (--image), levels at strides 8/16/32/64, 8 heads x 32
channels, 4 levels x 4 points, batch 1 (--batch)):
  encoder  queries = all tokens (20,197 at 800x1216)
  decoder  300 queries
Inputs are random: value ~ N(0, 1), sampling locations ~ U[0, 1], attention weights softmaxed over
the 16 levels x points.

Reported per case and dtype, native and PyTorch side by side, with their ratios:
  * forward time (under torch.no_grad) and forward + backward time (grad w.r.t. value, locations
    and weights; output gradient of ones), median and min over --repeat runs after one warm-up,
    the two paths interleaved so that load from other processes hits both alike;
  * peak memory. CUDA: torch.cuda.max_memory_allocated above the allocation before the call.
    CPU: peak resident set size above the resident size before the call (VmHWM after resetting it
    through /proc/self/clear_refs, minus VmRSS), measured in a fresh process per path after a
    warm-up run, with glibc's mmap threshold fixed at 128 KiB so that freed tensor memory goes
    back to the OS instead of staying resident in the heap. It counts every byte the call makes
    resident: autograd-saved intermediates, the output and the gradients.

  python tools/bench_ops.py [--device cpu|cuda] [--image 800x1216] [--batch 1] [--repeat 5]
                            [--threads N] [--output PATH]
"""

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# the module (detr_variants.layers re-exports a function of the same name)
msda = importlib.import_module("detr_variants.layers.ms_deform_attn")

STRIDES = (8, 16, 32, 64)
HEADS, CHANNELS, POINTS = 8, 32, 4
DECODER_QUERIES = 300
IMPLS = ("native", "pytorch")
# The bars the CPU kernels must clear (encoder case, float32).
CPU_BARS = {
    "forward_speedup": 4.0,
    "forward_backward_speedup": 3.0,
    "forward_backward_memory_ratio": 0.25,
}


def feature_levels(height, width):
    """(H, W) of the feature maps at STRIDES; each stride-2 stage rounds up (800x1216 gives
    (100, 152), (50, 76), (25, 38), (13, 19))."""
    return tuple((-(-height // s), -(-width // s)) for s in STRIDES)


def case_queries(levels):
    return {"encoder": sum(h * w for h, w in levels), "decoder": DECODER_QUERIES}


def make_inputs(num_queries, dtype, device, levels, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.long)
    areas = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    L = len(levels)
    value = torch.randn(batch, int(areas.sum()), HEADS, CHANNELS, generator=g)
    loc = torch.rand(batch, num_queries, HEADS, L, POINTS, 2, generator=g)
    attn = (
        torch.randn(batch, num_queries, HEADS, L * POINTS, generator=g)
        .softmax(-1)
        .view(batch, num_queries, HEADS, L, POINTS)
    )
    value, loc, attn = (t.to(device=device, dtype=dtype) for t in (value, loc, attn))
    return value, shapes.to(device), starts.to(device), loc, attn


def op_for(impl):
    if impl == "native":
        return msda.ms_deform_attn
    return msda.ms_deform_attn_pytorch


def run_forward(impl, inputs):
    with torch.no_grad():
        return op_for(impl)(*inputs)


def run_forward_backward(impl, inputs):
    value, shapes, starts, loc, attn = inputs
    leaves = [t.detach().requires_grad_() for t in (value, loc, attn)]
    out = op_for(impl)(leaves[0], shapes, starts, leaves[1], leaves[2])
    out.backward(torch.ones_like(out))
    return out, [t.grad for t in leaves]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_paths(inputs, device, repeat):
    """Median / min milliseconds per impl and mode, the impls interleaved."""
    times = {(impl, mode): [] for impl in IMPLS for mode in ("forward", "forward_backward")}
    for _ in range(repeat + 1):  # the first round is the warm-up
        for impl in IMPLS:
            for mode, fn in (("forward", run_forward), ("forward_backward", run_forward_backward)):
                sync(device)
                t0 = time.perf_counter()
                result = fn(impl, inputs)
                sync(device)
                times[(impl, mode)].append((time.perf_counter() - t0) * 1e3)
                del result
    return {
        k: {"median_ms": statistics.median(v[1:]), "min_ms": min(v[1:])} for k, v in times.items()
    }


# ------------------------------------------------------------------------------ memory (CPU)
def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peak_bytes(fn):
    """Peak resident bytes above the current resident size while fn() runs (Linux)."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS
    before = _proc_status_kb("VmRSS")
    result = fn()
    peak = _proc_status_kb("VmHWM")
    del result
    gc.collect()
    return (peak - before) * 1024


def memory_worker(spec):
    """Runs in a fresh process: peak resident memory of one impl for one case."""
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    inputs = make_inputs(spec["queries"], dtype, "cpu", spec["levels"], spec["batch"])
    impl = spec["impl"]
    run_forward(impl, inputs)
    run_forward_backward(impl, inputs)  # warm-up: thread pools, lazy initialisation
    return {
        "forward_peak_bytes": _cpu_peak_bytes(lambda: run_forward(impl, inputs)),
        "forward_backward_peak_bytes": _cpu_peak_bytes(lambda: run_forward_backward(impl, inputs)),
    }


def cpu_memory(case, queries, dtype, impl, threads, levels, batch):
    spec = {
        "case": case,
        "queries": queries,
        "dtype": dtype,
        "impl": impl,
        "threads": threads,
        "levels": levels,
        "batch": batch,
    }
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return {"forward_peak_bytes": None, "forward_backward_peak_bytes": None}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cuda_memory(inputs, impl):
    out = {}
    for key, fn in (
        ("forward_peak_bytes", run_forward),
        ("forward_backward_peak_bytes", run_forward_backward),
    ):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn(impl, inputs)
        torch.cuda.synchronize()
        out[key] = torch.cuda.max_memory_allocated() - before
        del result
    return out


# ------------------------------------------------------------------------------------ driver
def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt_ms(x):
    return f"{x:9.1f}" if x >= 10 else f"{x:9.2f}"


def fmt_mb(x):
    return "      n/a" if x is None else f"{x / 2**20:9.1f}"


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--dtypes", default=None, help="comma list (default: cpu float32; cuda float32,bfloat16)"
    )
    parser.add_argument("--cases", default="encoder,decoder")
    parser.add_argument("--image", default="800x1216", help="HxW of the image the levels come from")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--repeat", type=int, default=5, help="timed runs per measurement (after one warm-up)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--output", default=os.path.join("output", "bench_ops.json"))
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_worker is not None:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return 0

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")
    height, width = (int(v) for v in args.image.lower().split("x"))
    levels = feature_levels(height, width)
    queries_of = case_queries(levels)
    dtypes = (args.dtypes or ("float32" if device == "cpu" else "float32,bfloat16")).split(",")
    if not msda.native_available(device):
        print(
            f"warning: native kernels not built for {device}; 'native' falls back to PyTorch",
            file=sys.stderr,
        )

    env = {
        "device": device,
        "device_name": torch.cuda.get_device_name()
        if device == "cuda"
        else (platform.processor() or platform.machine()),
        "threads": threads,
        "torch": torch.__version__,
        "native_available": msda.native_available(device),
        "cpu_isa": msda._C.cpu_isa() if msda._C is not None else None,
        "repeat": args.repeat,
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu_model"] = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None
            )
    except OSError:
        pass
    report = {
        "description": __doc__.strip().split("\n\n", 1)[1],
        "shapes": {
            "image": [height, width],
            "levels": levels,
            "heads": HEADS,
            "channels_per_head": CHANNELS,
            "points": POINTS,
            "batch": args.batch,
        },
        "memory_method": (
            "cuda: torch.cuda.max_memory_allocated minus memory_allocated before the call"
            if device == "cuda"
            else "cpu: peak RSS delta (VmHWM after /proc/self/clear_refs reset, minus VmRSS before), fresh process "
            "per path, after a warm-up, MALLOC_MMAP_THRESHOLD_=131072 so that freed tensors leave the RSS; "
            "includes the output and the gradients"
        ),
        "environment": env,
        "results": [],
    }

    header = f"{'case':8} {'dtype':8} {'path':8} {'fwd ms':>9} {'fwd+bwd ms':>10} {'fwd MB':>9} {'fwd+bwd MB':>10}"
    lines = [header, "-" * len(header)]
    for case in args.cases.split(","):
        queries = queries_of[case]
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            inputs = make_inputs(queries, dtype, device, levels, args.batch)
            times = time_paths(inputs, device, args.repeat)
            rows = {}
            for impl in IMPLS:
                if device == "cuda":
                    mem = cuda_memory(inputs, impl)
                else:
                    mem = cpu_memory(case, queries, dtype_name, impl, threads, levels, args.batch)
                rows[impl] = {
                    "forward_ms": times[(impl, "forward")]["median_ms"],
                    "forward_min_ms": times[(impl, "forward")]["min_ms"],
                    "forward_backward_ms": times[(impl, "forward_backward")]["median_ms"],
                    "forward_backward_min_ms": times[(impl, "forward_backward")]["min_ms"],
                    **mem,
                }
                r = rows[impl]
                lines.append(
                    f"{case:8} {dtype_name:8} {impl:8} {fmt_ms(r['forward_ms'])} {fmt_ms(r['forward_backward_ms']):>10} "
                    f"{fmt_mb(r['forward_peak_bytes'])} {fmt_mb(r['forward_backward_peak_bytes']):>10}"
                )
            nat, ref = rows["native"], rows["pytorch"]
            ratios = {
                "forward_speedup": ratio(ref["forward_ms"], nat["forward_ms"]),
                "forward_backward_speedup": ratio(
                    ref["forward_backward_ms"], nat["forward_backward_ms"]
                ),
                "forward_memory_ratio": ratio(nat["forward_peak_bytes"], ref["forward_peak_bytes"]),
                "forward_backward_memory_ratio": ratio(
                    nat["forward_backward_peak_bytes"], ref["forward_backward_peak_bytes"]
                ),
            }
            lines.append(
                f"{'':8} {'':8} {'ratio':8} {ratios['forward_speedup'] or 0:8.2f}x {ratios['forward_backward_speedup'] or 0:9.2f}x "
                f"{ratios['forward_memory_ratio'] or 0:9.3f} {ratios['forward_backward_memory_ratio'] or 0:10.3f}"
            )
            entry = {
                "case": case,
                "queries": queries,
                "dtype": dtype_name,
                **{k: v for k, v in rows.items()},
                "ratios": ratios,
            }
            default_shapes = levels == feature_levels(800, 1216) and args.batch == 1
            if device == "cpu" and case == "encoder" and dtype_name == "float32" and default_shapes:
                entry["bars"] = {
                    "forward_speedup >= 4": (ratios["forward_speedup"] or 0)
                    >= CPU_BARS["forward_speedup"],
                    "forward_backward_speedup >= 3": (ratios["forward_backward_speedup"] or 0)
                    >= CPU_BARS["forward_backward_speedup"],
                    "forward_backward_memory_ratio <= 0.25": ratios["forward_backward_memory_ratio"]
                    is not None
                    and ratios["forward_backward_memory_ratio"]
                    <= CPU_BARS["forward_backward_memory_ratio"],
                }
            report["results"].append(entry)
            del inputs

    print(
        f"MSDeformAttn on {device} ({env.get('cpu_model') or env['device_name']}, {threads} threads, "
        f"kernels: {env['cpu_isa'] if device == 'cpu' else 'cuda'}); times are medians of {args.repeat} runs"
    )
    print("\n".join(lines))
    print("ratio row: PyTorch time / native time, native memory / PyTorch memory")
    for entry in report["results"]:
        if "bars" in entry:
            print(
                "CPU bars (encoder, float32): "
                + ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in entry["bars"].items())
            )
    out_dir = os.path.dirname(args.output)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
