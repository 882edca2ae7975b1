#!/usr/bin/env python
"""Convergence curves: train packaged configs, evaluate every --eval-period iterations, and plot
COCO box AP against iteration and against training CPU time.

    python tools/convergence.py                                  # every *_r18_synthetic config
    python tools/convergence.py --configs detr/detr_r18_synthetic tsp/tsp_fcos_r18_synthetic
    nice -n 19 python tools/convergence.py --threads 1 &         # in the background, on 1 thread
    python tools/convergence.py --plot-only                      # redraw the PNG from the JSON

Written to --output-dir: convergence.json (one run per config: its settings, and per evaluation
point the iteration, the cumulative training CPU and wall-clock seconds and AP, AP50, AP75, APs,
APm, APl) and convergence.png, both replaced atomically after every point; each config trains in
<output-dir>/<project>/<name>/ (checkpoints, metrics.json, log.txt). Training time leaves out
evaluation and checkpointing (detr_variants.engine.convergence). The training data is loaded in
the training process (dataloader.train.num_workers=0, and the test loader likewise, unless
overridden), so the CPU time counts it, and with --threads 1 the whole run uses one core. CPU
time is what the curves compare across runs that shared the machine with other work; the wall
clock is recorded too.

A checkpoint is saved at every point, so a killed run loses at most one interval: rerunning the
same command skips finished configs and continues an unfinished one from its last checkpoint
(exactly: weights, optimizer, schedule, data order, random state and the time sums). Configs run
one after another; one that fails is logged and the others still run. Several invocations may
share an output dir with different --configs (the JSON is updated under a file lock).
key=value overrides apply to every config; the tool sets train.output_dir, train.eval_period and
train.checkpointer.period itself. A rerun must use the settings the output dir was made with.
"""

import argparse
import contextlib
import fcntl
import json
import logging
import os
import platform
import tempfile
from typing import Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import detectron2  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.evaluation import COCOEvaluator  # noqa: E402
from detectron2.utils.env import seed_all_rng  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from detectron2.utils.registry import locate  # noqa: E402

import detr_variants  # noqa: F401, E402  (registers the datasets and architectures)
from detr_variants.engine.convergence import ConvergenceRecorder  # noqa: E402
from detr_variants.engine.lazy_train import apply_overrides, train  # noqa: E402
from detr_variants.model_zoo import config_path, get_config, list_configs  # noqa: E402

logger = logging.getLogger("detr_variants")

# applied before the command line's overrides: data loading inside the training process
DEFAULT_OVERRIDES = [
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "train.seed=0",
]
# set by the tool from its flags
OWN_KEYS = ("train.output_dir", "train.eval_period", "train.checkpointer.period")
JSON_NAME, PNG_NAME = "convergence.json", "convergence.png"


# ------------------------------------------------------------------ the JSON file
def load_results(path: str) -> Dict:
    """The tool's JSON (``{"runs": {config: run}}``), empty when the file does not exist yet."""
    if not os.path.exists(path):
        return {"runs": {}}
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock for read-modify-write of ``path`` by several invocations."""
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace_atomically(path: str, write) -> None:
    """Calls ``write(tmp_path)`` on a temporary file next to ``path``, then renames it."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(
        dir=folder or ".", prefix=f".{name}.", suffix=os.path.splitext(name)[1]
    )
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def update_run(output_dir: str, name: str, run: Dict) -> Dict:
    """Replaces config ``name``'s run in the JSON and redraws the PNG; returns the new results."""
    path = os.path.join(output_dir, JSON_NAME)
    with _locked(path):
        results = load_results(path)
        results["runs"][name] = run

        def dump(tmp):
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1, allow_nan=False)
                f.flush()
                os.fsync(f.fileno())

        _replace_atomically(path, dump)
        plot_convergence(results, os.path.join(output_dir, PNG_NAME))
    return results


# ------------------------------------------------------------------ the figure
def plot_convergence(results: Dict, path: str) -> None:
    """Draws AP against iteration (left) and against training CPU time (right), one line per
    run of ``results`` (the JSON's dict), and writes the PNG at ``path`` atomically."""
    fig, (by_iter, by_cpu) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    threads, datasets, drawn = set(), set(), False
    for name, run in sorted(results["runs"].items()):
        points = [p for p in run["points"] if p["AP"] is not None]
        threads |= {s["threads"] for s in run["segments"]}
        datasets.add(run["dataset"])
        if not points:
            continue
        label = name.split("/")[-1] + ("" if run["finished"] else " (running)")
        ap = [p["AP"] for p in points]
        line = by_iter.plot([p["iteration"] for p in points], ap, marker="o", ms=3, label=label)
        by_cpu.plot(
            [p["train_cpu_s"] / 60 for p in points], ap, marker="o", ms=3, color=line[0].get_color()
        )
        drawn = True
    if len(threads) == 1:
        (n,) = threads
        cpu_label = f"training CPU time, {n} thread{'s' if n != 1 else ''} (min)"
    else:
        cpu_label = "training CPU time (min; the runs used different thread counts)"
    by_iter.set(xlabel="iteration", ylabel="COCO box AP (%)")
    by_iter.set_ylim(bottom=0)
    by_cpu.set(xlabel=cpu_label)
    for ax in (by_iter, by_cpu):
        ax.grid(alpha=0.3)
    if drawn:
        by_iter.legend(fontsize=8)
    fig.suptitle(f"COCO box AP on {', '.join(sorted(datasets)) or '(no runs yet)'}")
    fig.tight_layout()
    _replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)


# ------------------------------------------------------------------ configs
class ProcessedImagesCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator that scores only the images it processed (``--val-images``), instead of
    counting every other image of the dataset as missed."""

    def evaluate(self, img_ids=None):
        return super().evaluate(img_ids=[p["image_id"] for p in self._predictions])


def first_images(dicts: List[Dict], n: int) -> List[Dict]:
    if not 0 < n <= len(dicts):
        raise ValueError(f"--val-images {n}: the test set has {len(dicts)} images")
    return dicts[:n]


def build_config(name: str, overrides: List[str], args, run_dir: str):
    """Config ``name`` with the tool's defaults, ``overrides`` and its own keys applied."""
    cfg = apply_overrides(get_config(name), [*DEFAULT_OVERRIDES, *overrides])
    cfg.train.update(output_dir=run_dir, eval_period=-1)  # the recorder evaluates
    cfg.train.checkpointer.period = args.eval_period  # a checkpoint at every point
    cfg.dataloader.evaluator.output_dir = os.path.join(run_dir, "inference")
    if args.val_images is not None:
        evaluator = cfg.dataloader.evaluator
        target = evaluator._target_
        if not issubclass(locate(target) if isinstance(target, str) else target, COCOEvaluator):
            raise ValueError(f"--val-images needs a COCOEvaluator; {name} has {target}")
        evaluator.dataset_name = evaluator.dataset_name  # resolve the interpolation before...
        evaluator._target_ = ProcessedImagesCOCOEvaluator
        test = cfg.dataloader.test
        test.dataset = L(first_images)(dicts=test.dataset, n=args.val_images)  # ...it moves
    return cfg


def environment(cfg) -> Dict:
    """Facts about this process that the times depend on (no host names), as plain types (the
    checkpoint holds them and loads weights-only)."""
    return {
        "torch": str(torch.__version__),  # not TorchVersion
        "detectron2": detectron2.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "niceness": os.nice(0),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "device": str(cfg.train.device),
    }


def run_config(name: str, settings: Dict, args) -> None:
    """Trains config ``name`` (resuming from its last checkpoint), recording into the JSON."""
    run_dir = os.path.join(args.output_dir, *name.split("/"))
    cfg = build_config(name, settings["overrides"], args, run_dir)
    os.makedirs(run_dir, exist_ok=True)
    dataset = cfg.dataloader.evaluator.dataset_name
    file_log = logging.FileHandler(os.path.join(run_dir, "log.txt"))
    file_log.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("detectron2", "detr_variants")]
    for log in loggers:
        log.addHandler(file_log)
    try:
        seed = cfg.train.get("seed", -1)
        seed_all_rng(seed if seed >= 0 else None)

        def write(record: Dict) -> None:
            update_run(args.output_dir, name, {"settings": settings, "dataset": dataset, **record})

        def hooks(evaluate):
            env = environment(cfg)
            return [
                ConvergenceRecorder(
                    evaluate, period=args.eval_period, on_record=write, environment=env
                )
            ]

        train(cfg, resume=True, extra_hooks=hooks)
    finally:
        for log in loggers:
            log.removeHandler(file_log)
        file_log.close()


# ------------------------------------------------------------------ command line
def synthetic_configs() -> List[str]:
    """Every packaged ``*_r18_synthetic`` config."""
    return [n for n in list_configs() if n.endswith("_r18_synthetic")]


def parse_args(argv: Optional[List[str]] = None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--configs", nargs="+", help="packaged configs (project/name); default: *_r18_synthetic"
    )
    parser.add_argument("--eval-period", type=int, default=100, help="iterations between points")
    parser.add_argument("--val-images", type=int, help="evaluate on the first N test images")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--output-dir", default="output/convergence")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    parser.add_argument("opts", nargs="*", help="config overrides for every config, key=value")
    args = parser.parse_args(argv)
    if args.eval_period <= 0:
        parser.error("--eval-period must be positive")
    if args.threads <= 0:
        parser.error("--threads must be positive")
    own = [o for o in args.opts if o.lstrip("+").split("=", 1)[0] in OWN_KEYS]
    if own:
        parser.error(f"{own}: the tool sets these (use --output-dir / --eval-period)")
    return args


def main(argv: Optional[List[str]] = None) -> Dict:
    """Runs the tool; returns the JSON's content."""
    args = parse_args(argv)
    json_path = os.path.join(args.output_dir, JSON_NAME)
    if args.plot_only:
        if not os.path.isfile(json_path):
            raise SystemExit(f"--plot-only: no {json_path} (run the tool without it first)")
        results = load_results(json_path)
        plot_convergence(results, os.path.join(args.output_dir, PNG_NAME))
        return results

    setup_logger(name="detectron2")
    setup_logger(name="detr_variants")
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    names = args.configs or synthetic_configs()
    for name in names:
        config_path(name)  # an unknown name fails now, listing the choices
    settings = {
        "overrides": [*DEFAULT_OVERRIDES, *args.opts],
        "eval_period": args.eval_period,
        "val_images": args.val_images,
    }
    runs = load_results(json_path)["runs"]
    for name in names:
        if name in runs and runs[name]["settings"] != settings:
            raise SystemExit(
                f"{json_path} holds a run of {name} with other settings "
                f"({runs[name]['settings']}, now {settings}): use another --output-dir"
            )

    failed = []
    for name in names:
        if name in runs and runs[name]["finished"]:
            logger.info("%s: finished earlier, skipped", name)
            continue
        logger.info("%s: training (resumes from its last checkpoint if any)", name)
        try:
            run_config(name, settings, args)
        except Exception:
            logger.exception("%s failed; the other configs go on", name)
            failed.append(name)
    if failed:
        raise SystemExit(
            f"failed: {', '.join(failed)} (see their log.txt; rerun the same command to resume)"
        )
    return load_results(json_path)


if __name__ == "__main__":
    main()
