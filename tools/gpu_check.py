#!/usr/bin/env python
"""GPU readiness check (``make gpu-check``): one run on a fresh GPU machine, one JSON.

Stages, each time-boxed (its cap on a GPU, and what is left of --budget-s), each run in its own
process so that a crash or a CUDA fault in one is recorded and does not stop the others:

  environment      python, torch, CUDA, the device and its compute capability
  install          the wheels of tools/gpu_wheels.sh (what the GPU image lacks) into --site
  build            detr_variants._C with the CUDA kernels, in place, for this device's arch only
                   (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=<major.minor>, MAX_JOBS=<cores>)
  tests            pytest -m cuda (junit XML: passed / failed / skipped counts, failures' names)
  op_benchmark     tools/bench_ops.py: native op vs the PyTorch path, forward, forward+backward,
                   peak memory; batch 2, levels of an 800x1216 image, encoder and decoder queries
  model_benchmark  tools/benchmark.py: Deformable DETR R50, ours vs HF transformers, inference
                   (batch 1, 800x1216) and a training step (batch 2, 512x512)

Writes --output-dir/gpu_check.json after every stage (so a killed run keeps what it measured),
beside it gpu_check_ops.json, gpu_check_models.json, gpu_check_junit.xml and gpu_check.log (every
stage's output). Without a CUDA device (or with --dry-run) the build is skipped with its reason,
the CUDA tests are collected and skipped, and both benchmarks run on the CPU at tiny shapes: a
check of the plumbing, not a measurement. Exit status 1 when a stage failed or ran out of time.

Only the standard library is imported at the top: this runs before the wheels are installed.

    python3 tools/gpu_check.py [--dry-run] [--budget-s 450] [--output-dir output]
                               [--stages build tests op_benchmark model_benchmark]
"""

import argparse
import fnmatch
import glob
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-stage caps in seconds; together they may exceed --budget-s, which bounds the whole run.
CAPS = {"install": 60, "build": 200, "tests": 120, "op_benchmark": 90, "model_benchmark": 150}
RUNNABLE = ("build", "tests", "op_benchmark", "model_benchmark")  # environment, install: always
MIN_STAGE_S = 10  # a stage is not started with less time left
# Repeats sized for an H100/H200 within the caps; the dry run takes one of each at tiny shapes.
GPU_SETTINGS = {
    "ops": ["--image", "800x1216", "--batch", "2", "--repeat", "20"],
    "models": ["--repeat", "10"],
}
DRY_RUN_SETTINGS = {
    "ops": ["--image", "64x96", "--batch", "2", "--repeat", "1", "--cases", "encoder"],
    "models": ["--repeat", "1", "--threads", "1", "--inference-size", "64x96"]
    + ["--train-size", "64x64"],
}
D2_WHEEL = "sal_detectron2-*.whl"
FALLBACK = "ms_deform_attn: using the PyTorch (grid_sample) path"
# What the install must make importable (detectron2 and what it and detr_variants import).
REQUIRED_IMPORTS = ("detectron2.modeling", "fvcore.nn", "iopath", "omegaconf", "hydra")
REQUIRED_IMPORTS += ("pycocotools.coco", "yacs.config", "termcolor")


class Skip(Exception):
    """A stage that does not apply here; the message is the reason."""


class StageFailed(Exception):
    """A stage that ran and failed; the message says why."""


def cuda_arch(capability):
    """TORCH_CUDA_ARCH_LIST for one device: (9, 0) -> "9.0"."""
    return f"{capability[0]}.{capability[1]}"


def cuda_home():
    """The CUDA toolkit root that holds libcudart: $CUDA_HOME, the directory above nvcc, or
    /usr/local/cuda (torch guesses the directory above nvcc, which need not hold it)."""
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), nvcc and os.path.dirname(os.path.dirname(nvcc))]
    for root in [r for r in roots if r] + ["/usr/local/cuda"]:
        if glob.glob(os.path.join(root, "lib64", "libcudart.so*")):
            return root
    return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def junit_summary(path):
    """Counts and failures' names from pytest's junit XML."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    summary = {"passed": 0, "failed": 0, "skipped": 0, "failures": []}
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            summary["failed"] += 1
            summary["failures"].append(name)
        elif case.find("skipped") is not None:
            summary["skipped"] += 1
        else:
            summary["passed"] += 1
    return summary


class GpuCheck:
    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.output_dir)
        os.makedirs(self.out, exist_ok=True)
        self.json_path = os.path.join(self.out, "gpu_check.json")
        self.log_path = os.path.join(self.out, "gpu_check.log")
        open(self.log_path, "w").close()
        self.start = time.monotonic()
        self.python = args.python
        self.cuda = False
        self.child = None  # the running stage's process
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        # the interpreter's own bin (a venv's ninja, which the CUDA build uses) comes first
        bin_dir = os.path.dirname(os.path.abspath(args.python))
        self.env["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (os.path.abspath(args.site), ROOT, os.environ.get("PYTHONPATH")) if p
        )
        self.report = {
            "mode": None,
            "budget_s": args.budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": None,
            "torch": None,
            "cuda": None,
            "build_s": None,
            "tests": None,
            "op_timings": None,
            "model_timings": None,
            "stages": {},
        }

    # ------------------------------------------------------------------ plumbing
    def left_s(self):
        return self.args.budget_s - (time.monotonic() - self.start)

    def write(self):
        self.report["total_wall_s"] = round(time.monotonic() - self.start, 1)
        with open(self.json_path + ".tmp", "w") as f:
            json.dump(self.report, f, indent=2)
        os.replace(self.json_path + ".tmp", self.json_path)

    def run(self, stage, cmd, env=None, timeout=None):
        """Runs ``cmd`` (output appended to the log); returns its output, raises StageFailed."""
        with open(self.log_path, "a") as log:
            log.write(f"\n===== {stage}: {' '.join(cmd)}\n")
            log.flush()
            # its own process group, so that a timeout also ends what it started (ninja, nvcc)
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env or self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            self.child = proc
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                log.write(out)
                raise TimeoutError(f"{' '.join(cmd[1:3])}: over {timeout:.0f} s") from None
            log.write(out)
        self.child = None
        if proc.returncode != 0:
            tail = out.strip().splitlines()[-15:]
            raise StageFailed(f"exit status {proc.returncode}: " + "\n".join(tail))
        return out

    def stage(self, name, fn):
        """Runs one stage within its time box and records its result, or why it has none."""
        # the caps are sized for a GPU machine; a dry run is bounded by --budget-s alone
        cap = CAPS.get(name) if self.cuda else None
        timeout = None if name not in CAPS else min(cap or self.left_s(), self.left_s())
        entry = {}
        t0 = time.monotonic()
        try:
            if timeout is not None and timeout < MIN_STAGE_S:
                raise TimeoutError(f"not started: {self.left_s():.0f} s of the budget left")
            entry = {"status": "ok", **(fn(timeout) or {})}
        except Skip as e:
            entry = {"status": "skipped", "reason": str(e)}
        except TimeoutError as e:
            entry = {"status": "timeout", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - a failing stage must not stop the others
            entry = {"status": "failed", "reason": f"{type(e).__name__}: {e}"}
        entry["wall_s"] = round(time.monotonic() - t0, 1)
        self.report["stages"][name] = entry
        self.write()
        line = f"[gpu-check] {name}: {entry['status']} ({entry['wall_s']} s)"
        if "reason" in entry:
            line += " - " + entry["reason"].splitlines()[0][:200]
        print(line, flush=True)
        return entry

    # ------------------------------------------------------------------ stages
    def environment(self, timeout):
        import torch

        self.cuda = torch.cuda.is_available() and not self.args.dry_run
        info = {
            "python": platform.python_version(),
            "executable": self.python,
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
            "cpu_count": os.cpu_count(),
            "cuda_home": cuda_home(),
        }
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
            info["capability"] = cuda_arch(torch.cuda.get_device_capability(0))
            info["device_count"] = torch.cuda.device_count()
        else:
            info["device"] = cpu_model()
        nvcc = shutil.which("nvcc") or (info["cuda_home"] and f"{info['cuda_home']}/bin/nvcc")
        if nvcc and os.path.exists(nvcc):
            version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
            info["nvcc"] = next((ln for ln in version.splitlines() if "release" in ln), version)
        self.report["mode"] = "cuda" if self.cuda else "dry-run"
        self.report.update(device=info["device"], torch=info["torch"], cuda=info["torch_cuda"])
        return info

    def install(self, timeout):
        wheels = sorted(glob.glob(os.path.join(self.args.wheels, "*.whl")))
        if not wheels:
            raise Skip(f"no wheels in {self.args.wheels} (run tools/gpu_wheels.sh first)")
        site = os.path.abspath(self.args.site)
        pip = [self.python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        pip += ["--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade"]
        pip += ["--target", site]
        d2 = [w for w in wheels if fnmatch.fnmatch(os.path.basename(w), D2_WHEEL)]
        others = [w for w in wheels if w not in d2]
        deadline = time.monotonic() + timeout
        if others:
            self.run("install", pip + others, timeout=deadline - time.monotonic())
        if d2:
            # a cp310 wheel of Python code (tools/setup_env.sh installs it the same way)
            cmd = pip + ["--only-binary=:all:", "--python-version", "3.10", *d2]
            self.run("install", cmd, timeout=deadline - time.monotonic())
            # it also ships an unrelated top-level `tools` package that would shadow ours
            shutil.rmtree(os.path.join(site, "tools"), ignore_errors=True)
        check = "import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]"
        self.run("install", [self.python, "-c", check, *REQUIRED_IMPORTS], timeout=60)
        return {"site": site, "wheels": [os.path.basename(w) for w in wheels]}

    def build(self, timeout):
        if not self.cuda:
            raise Skip(self.no_cuda_reason())
        import torch

        arch = cuda_arch(torch.cuda.get_device_capability(0))
        env = dict(self.env, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST=arch)
        env["MAX_JOBS"] = str(os.cpu_count() or 1)
        if cuda_home():
            env["CUDA_HOME"] = cuda_home()
        t0 = time.monotonic()
        self.run("build", [self.python, "setup.py", "build_ext", "--inplace"], env, timeout)
        build_s = round(time.monotonic() - t0, 1)
        self.report["build_s"] = build_s
        probe = "import detr_variants._C as C; assert C.with_cuda(), 'built without CUDA'; print(C.__file__)"
        so = self.run("build", [self.python, "-c", probe], timeout=60).strip().splitlines()[-1]
        return {"arch": arch, "build_s": build_s, "extension": os.path.relpath(so, ROOT)}

    def tests(self, timeout):
        junit = os.path.join(self.out, "gpu_check_junit.xml")
        cmd = [self.python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
        cmd += [f"--junitxml={junit}", *self.args.tests]
        try:
            self.run("tests", cmd, timeout=timeout)
            error = None
        except StageFailed as e:
            error = e
        if not os.path.exists(junit):
            raise error or StageFailed("pytest wrote no junit XML")
        summary = junit_summary(junit)
        self.report["tests"] = summary
        if error is not None:
            raise StageFailed(f"{summary['failed']} failed: {summary['failures']}; {error}")
        result = {"junit": os.path.basename(junit)}
        if not self.cuda:
            result["note"] = "the CUDA tests are skipped here: " + self.no_cuda_reason()
        elif summary["passed"] == 0:  # they skip themselves when the CUDA kernels are missing
            raise StageFailed(f"no CUDA test ran ({summary['skipped']} skipped): see the build")
        return result

    def op_benchmark(self, timeout):
        path = os.path.join(self.out, "gpu_check_ops.json")
        cmd = [self.python, "tools/bench_ops.py", "--device", self.device(), "--output", path]
        self.run("op_benchmark", cmd + self.settings()["ops"], timeout=timeout)
        with open(path) as f:
            bench = json.load(f)
        native = bench["environment"]["native_available"]
        self.report["op_timings"] = {
            "shapes": bench["shapes"],
            "native_available": native,
            "results": bench["results"],
        }
        if not native:
            raise StageFailed(
                f"no native {self.device()} kernels: 'native' rows are the PyTorch path"
            )
        return self.dry_run_note({"output": os.path.basename(path)})

    def model_benchmark(self, timeout):
        path = os.path.join(self.out, "gpu_check_models.json")
        cmd = [self.python, "tools/benchmark.py", "--models", "deformable_detr_r50"]
        cmd += ["--device", self.device(), "--output", path]
        out = self.run("model_benchmark", cmd + self.settings()["models"], timeout=timeout)
        with open(path) as f:
            rows = json.load(f)["rows"]
        self.report["model_timings"] = rows
        # ms_deform_attn's warnings (tracing for the GFLOPs count is expected)
        fallbacks = sorted({ln.strip() for ln in out.splitlines() if FALLBACK in ln})
        return self.dry_run_note({"output": os.path.basename(path), "op_fallbacks": fallbacks})

    # ------------------------------------------------------------------ modes
    def not_asked(self, timeout):
        raise Skip("not in --stages")

    def device(self):
        return "cuda" if self.cuda else "cpu"

    def settings(self):
        return GPU_SETTINGS if self.cuda else DRY_RUN_SETTINGS

    def no_cuda_reason(self):
        return "--dry-run" if self.args.dry_run else "no CUDA device"

    def dry_run_note(self, result):
        if not self.cuda:
            result["note"] = (
                f"CPU at tiny shapes ({self.no_cuda_reason()}): plumbing, not a measurement"
            )
        return result

    def main(self):
        # killed (e.g. at an outer time limit): end the stage's processes too, keep the JSON
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            self.stage("environment", self.environment)
            self.stage("install", self.install)
            for name in RUNNABLE:
                if name in self.args.stages:
                    self.stage(name, getattr(self, name))
                else:
                    self.stage(name, self.not_asked)
        finally:
            if self.child is not None and self.child.poll() is None:
                os.killpg(self.child.pid, signal.SIGKILL)
        self.write()
        self.print_summary()
        bad = [n for n, s in self.report["stages"].items() if s["status"] in ("failed", "timeout")]
        return 1 if bad else 0

    def print_summary(self):
        r = self.report
        print(
            f"[gpu-check] {r['mode']} on {r.get('device')}, torch {r.get('torch')}, CUDA {r.get('cuda')}"
        )
        if r["tests"]:
            t = r["tests"]
            print(
                f"[gpu-check] tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
            )
            for name in t["failures"]:
                print(f"[gpu-check]   FAILED {name}")
        for row in (r["op_timings"] or {}).get("results", []):
            n, p = row["native"], row["pytorch"]
            ratios = row["ratios"]
            print(
                f"[gpu-check] op {row['case']} {row['dtype']}: native {n['forward_ms']:.3f} / "
                f"{n['forward_backward_ms']:.3f} ms, pytorch {p['forward_ms']:.3f} / "
                f"{p['forward_backward_ms']:.3f} ms (fwd / fwd+bwd), memory ratio fwd+bwd "
                f"{ratios['forward_backward_memory_ratio']}"
            )
        for row in r["model_timings"] or []:
            for key in ("inference", "train_step"):
                times = {
                    w: row[f"{w}_{key}"]["seconds"] for w in ("ours", "hf") if f"{w}_{key}" in row
                }
                print(
                    f"[gpu-check] {row['model']} {key}: "
                    + ", ".join(f"{w} {s * 1e3:.1f} ms" for w, s in times.items())
                )
        print(f"[gpu-check] total {r['total_wall_s']} s; wrote {self.json_path}")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU only, even with a GPU")
    parser.add_argument("--budget-s", type=float, default=450, help="the whole run's time box")
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "output"))
    parser.add_argument("--wheels", default=os.path.join(ROOT, ".gpu_wheels"))
    parser.add_argument("--site", default="/tmp/detr_variants_site", help="where wheels go")
    parser.add_argument("--python", default=sys.executable, help="interpreter of every stage")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="pytest paths")
    parser.add_argument(
        "--stages", nargs="+", default=list(RUNNABLE), choices=RUNNABLE, help="a rerun's subset"
    )
    args = parser.parse_args(argv)
    return GpuCheck(args).main()


if __name__ == "__main__":
    sys.exit(main())
