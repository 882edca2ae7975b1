#!/usr/bin/env python
"""Runs a command and samples the memory of its process tree, then writes the curve to JSON.

    python tools/measure_rss.py --out rss.json --interval 2 -- python tools/train_net.py ...
    python tools/measure_rss.py --plot rss.png before.json after.json   # curves side by side

Each sample records the elapsed seconds, the main process's RSS and user / system CPU seconds,
and the tree's summed RSS and PSS (PSS splits pages shared between the trainer and its data-loader workers, so it does not
count copy-on-write sharing twice). Figures are in MiB, read from /proc (Linux only).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def _children(pid: int) -> list:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(c) for c in f.read().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def _kib(pid: int, path: str, field: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> tuple:
    """User and system CPU seconds of the process (system time grows with page faults)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf(
            "SC_CLK_TCK"
        )
    except (OSError, IndexError, ValueError):
        return 0.0, 0.0


def sample(pid: int) -> dict:
    tree = [pid, *_children(pid)]
    user_s, sys_s = _cpu_s(pid)
    return {
        "user_s": user_s,
        "sys_s": sys_s,
        "rss_mib": _kib(pid, "status", "VmRSS:") / 1024,
        "tree_rss_mib": sum(_kib(p, "status", "VmRSS:") for p in tree) / 1024,
        "tree_pss_mib": sum(_kib(p, "smaps_rollup", "Pss:") for p in tree) / 1024,
        "processes": len(tree),
    }


def plot(png: str, curve_files: list) -> None:
    """The main process's RSS against elapsed time, one line per JSON (labelled by file name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for path in curve_files:
        with open(path) as f:
            curve = json.load(f)["curve"]
        label = os.path.splitext(os.path.basename(path))[0]
        ax.plot([s["t_s"] / 60 for s in curve], [s["rss_mib"] for s in curve], label=label)
    ax.set(xlabel="minutes", ylabel="RSS of the main process (MiB)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON file for the curve")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--plot", metavar="PNG", help="draw the curves of the JSON files given")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ... (or JSON files)")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.plot:
        plot(args.plot, command)
        return
    if not args.out or not command:
        parser.error("--out and a command are required (or --plot PNG with JSON files)")
    start = time.monotonic()
    proc = subprocess.Popen(command)
    # killing the sampler stops the command too (not an orphan training on) and keeps the curve
    signal.signal(signal.SIGTERM, lambda signum, frame: proc.terminate())
    curve = []
    while proc.poll() is None:
        curve.append({"t_s": round(time.monotonic() - start, 1), **sample(proc.pid)})
        if len(curve) % 20 == 0:  # so that an interrupted run keeps its curve
            _write(args.out, command, proc.returncode, start, curve)
        time.sleep(args.interval)
    summary = _write(args.out, command, proc.returncode, start, curve)
    print(
        f"peak RSS {summary['peak_rss_mib']:.0f} MiB, peak tree PSS "
        f"{summary['peak_tree_pss_mib']:.0f} MiB, end RSS {summary['end_rss_mib']:.0f} MiB, "
        f"{summary['wall_s']:.0f} s, rc {proc.returncode}"
    )
    sys.exit(proc.returncode if proc.returncode >= 0 else 128 - proc.returncode)  # as a shell does


def _write(out: str, command: list, returncode, start: float, curve: list) -> dict:
    curve = [s for s in curve if s["rss_mib"] > 0]
    summary = {
        "command": command,
        "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "OMP_"))},
        "returncode": returncode,
        "wall_s": round(time.monotonic() - start, 1),
        "peak_rss_mib": max((s["rss_mib"] for s in curve), default=0),
        "peak_tree_pss_mib": max((s["tree_pss_mib"] for s in curve), default=0),
        "end_rss_mib": curve[-1]["rss_mib"] if curve else 0,
        "curve": curve,
    }
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    main()
