"""`make gpu-check` (tools/gpu_check.py, tools/gpu_wheels.sh): every part that runs on a CPU.

The driver runs end to end in its dry-run mode (CUDA build skipped with its reason, CUDA tests
collected and skipped, both benchmarks on the CPU at tiny shapes, wheels installed from a local
folder); its helpers and time boxes are tested on their own; and the wheel list of
tools/gpu_wheels.sh is checked against what detr_variants, detectron2 and the check import. No
wheel is downloaded here.
"""

import argparse
import ast
import importlib.metadata as md
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("environment", "install", "build", "tests", "op_benchmark", "model_benchmark")


def load_driver():
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(ROOT, "tools", "gpu_check.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_run_args(tmp_path, **overrides):
    """tools/gpu_check.py's arguments for a dry run writing under ``tmp_path``, with no wheels."""
    args = dict(dry_run=True, budget_s=600, output_dir=str(tmp_path), python=sys.executable)
    args.update(wheels=str(tmp_path / "none"), site=str(tmp_path / "site"), tests=[], stages=[])
    return argparse.Namespace(**{**args, **overrides})


def write_wheel(folder, name, version, tag, files):
    """A minimal wheel of ``files`` ({path: text}), enough for ``pip install --no-index``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        **files,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    path = os.path.join(folder, f"{name}-{version}-{tag}.whl")
    with zipfile.ZipFile(path, "w") as z:
        for p, text in files.items():
            z.writestr(p, text)
        z.writestr(f"{dist}/RECORD", record)
    return path


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_dry_run_records_every_stage(tmp_path):
    """The whole driver in dry-run mode: exit status 0, one JSON with a result or a skip reason
    for every stage, the CUDA tests skipped (not failed), benchmark figures that were measured
    (positive times, both implementations, both models), and the local wheels installed with the
    detectron2 wheel's stray top-level ``tools`` removed."""
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    wheels.mkdir()
    write_wheel(wheels, "gpucheck_probe", "1.0", "py3-none-any", {"gpucheck_probe.py": "X = 1\n"})
    write_wheel(
        wheels,
        "sal_detectron2",
        "0.0.1",
        "cp310-none-any",
        {"d2_probe/__init__.py": "", "tools/__init__.py": ""},
    )
    cmd = [sys.executable, "tools/gpu_check.py", "--dry-run", "--budget-s", "1500"]
    cmd += ["--output-dir", str(out), "--wheels", str(wheels), "--site", str(site)]
    cmd += ["--tests", "tests/test_ms_deform_attn.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "dry-run"
    assert list(report["stages"]) == list(STAGES)
    for name, stage in report["stages"].items():
        assert stage["status"] in ("ok", "skipped"), (name, stage)
        assert stage["wall_s"] >= 0
        if stage["status"] == "skipped":
            assert stage["reason"], name
    assert report["stages"]["build"] == {
        "status": "skipped",
        "reason": "--dry-run",
        "wall_s": report["stages"]["build"]["wall_s"],
    }
    assert report["build_s"] is None
    assert report["torch"] and report["device"]

    install = report["stages"]["install"]
    assert sorted(install["wheels"]) == sorted(os.listdir(wheels))
    assert (site / "gpucheck_probe.py").exists() and (site / "d2_probe").is_dir()
    assert not (site / "tools").exists()

    tests = report["tests"]
    assert tests["failed"] == 0 and tests["failures"] == []
    assert tests["skipped"] >= 2 and tests["passed"] == 0  # the CUDA tests, skipped without one
    assert (out / "gpu_check_junit.xml").exists()

    (op,) = report["op_timings"]["results"]  # --cases encoder, float32 in the dry run
    assert (op["case"], op["dtype"]) == ("encoder", "float32")
    assert report["op_timings"]["shapes"]["batch"] == 2
    for impl in ("native", "pytorch"):
        assert op[impl]["forward_ms"] > 0 and op[impl]["forward_backward_ms"] > 0

    (row,) = report["model_timings"]
    assert row["model"] == "deformable_detr_r50" and row["device"] == "cpu"
    for key in ("ours_inference", "hf_inference", "ours_train_step", "hf_train_step"):
        assert row[key]["seconds"] > 0, key
    model_stage = report["stages"]["model_benchmark"]
    assert "dry-run" in model_stage["note"]
    # the op's fallback warnings are collected: only the GFLOPs count's trace, the CPU op is built
    assert model_stage["op_fallbacks"] and all("tracing" in w for w in model_stage["op_fallbacks"])
    assert "[gpu-check] total" in proc.stdout
    assert "===== build" not in (out / "gpu_check.log").read_text()  # skipped, not run


def test_make_gpu_check_passes_interpreter_wheels_and_options(tmp_path):
    """`make gpu-check` -> tools/gpu_check.sh -> tools/gpu_check.py with PYTHON, GPU_WHEELS,
    GPU_SITE and GPU_CHECK_ARGS passed through (here a dry run of the build stage alone)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path / "out"
    cmd = ["make", "-s", "gpu-check", f"PYTHON={sys.executable}"]
    cmd += [f"GPU_WHEELS={tmp_path / 'wheels'}", f"GPU_SITE={tmp_path / 'site'}"]
    cmd += [f"GPU_CHECK_ARGS=--dry-run --stages build --output-dir {out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stages = json.loads((out / "gpu_check.json").read_text())["stages"]
    assert stages["environment"]["executable"] == shutil.which(sys.executable)
    assert (
        stages["install"]["reason"]
        == f"no wheels in {tmp_path / 'wheels'} (run tools/gpu_wheels.sh first)"
    )
    assert stages["build"]["reason"] == "--dry-run"
    assert stages["tests"]["reason"] == "not in --stages"


# ------------------------------------------------------------------------------ parts
def test_stage_time_box_and_failure_do_not_stop_the_others(tmp_path):
    """A stage past its time box is killed and recorded as 'timeout', a failing one as 'failed'
    with the tail of its output, a skipped one with its reason; each is written to the JSON as
    it ends, and the stages after them still run."""
    driver = load_driver()
    check = driver.GpuCheck(dry_run_args(tmp_path))
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    fail = [sys.executable, "-c", "import sys; print('it broke here'); sys.exit(3)"]
    assert check.stage("slow", lambda t: check.run("slow", sleep, timeout=1))["status"] == "timeout"
    failed = check.stage("broken", lambda t: check.run("broken", fail, timeout=30))
    assert failed["status"] == "failed"
    assert "exit status 3" in failed["reason"] and "it broke here" in failed["reason"]
    assert check.stage("install", check.install)["reason"].startswith("no wheels in")
    assert check.stage("fine", lambda t: {"value": 1})["value"] == 1
    on_disk = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert [on_disk[n]["status"] for n in ("slow", "broken", "install", "fine")] == [
        "timeout",
        "failed",
        "skipped",
        "ok",
    ]
    assert "it broke here" in (tmp_path / "gpu_check.log").read_text()

    check.args.budget_s = 0  # no time left: the next stage is not started
    assert check.stage("build", check.build)["status"] == "timeout"


def test_main_runs_only_the_stages_asked_for(tmp_path):
    """A rerun's subset (--stages): environment and install always run, the others are recorded
    as skipped with the reason, and a run where nothing failed exits 0."""
    driver = load_driver()
    check = driver.GpuCheck(dry_run_args(tmp_path, stages=[]))
    assert check.main() == 0
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert stages["environment"]["status"] == "ok"
    assert stages["environment"]["torch"] == __import__("torch").__version__
    assert [stages[n]["reason"] for n in driver.RUNNABLE] == ["not in --stages"] * 4


def test_junit_summary_counts_and_names(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="y"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped message="z"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert load_driver().junit_summary(str(xml)) == {
        "passed": 1,
        "failed": 2,
        "skipped": 1,
        "failures": ["tests.test_a::test_bad", "tests.test_b::test_err"],
    }


def test_cuda_arch_and_cuda_home(tmp_path, monkeypatch):
    driver = load_driver()
    assert driver.cuda_arch((9, 0)) == "9.0" and driver.cuda_arch((8, 6)) == "8.6"
    toolkit = tmp_path / "cuda"
    (toolkit / "lib64").mkdir(parents=True)
    (toolkit / "lib64" / "libcudart.so.13").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert driver.cuda_home() == str(toolkit)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "empty"))  # no libcudart: not taken
    assert driver.cuda_home() != str(tmp_path / "empty")


# ------------------------------------------------------------------------------ wheel list
def _wheel_packages():
    """PACKAGES and IMAGE_HAS of tools/gpu_wheels.sh: {name: version or None}."""
    text = open(os.path.join(ROOT, "tools", "gpu_wheels.sh")).read()

    def array(name):
        body = re.search(rf"^{name}=\((.*?)^\)", text, re.S | re.M).group(1)
        specs = [line.split("#")[0].strip() for line in body.splitlines()]
        return dict((s.split("==") + [None])[:2] for s in " ".join(specs).split())

    return array("PACKAGES"), array("IMAGE_HAS"), array("NOT_NEEDED")


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist):
    """The install requirements of an installed distribution on CPython 3.12 (no extras)."""
    from packaging.requirements import Requirement

    out = []
    for text in md.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"python_version": "3.12", "extra": ""}):
            out.append(_norm(req.name))
    return out


def test_wheel_list_covers_what_is_imported():
    """Every distribution that detr_variants (pyproject.toml), detectron2 and the tests need, and
    what those need in turn, is either carried by tools/gpu_wheels.sh, listed there as part of
    the GPU image, or listed as not needed, with the versions of constraints.txt; and every
    third-party module imported by detr_variants, the check's tools and the tests belongs to one
    of them."""
    import tomllib

    carried, image, not_needed = ({_norm(k): v for k, v in d.items()} for d in _wheel_packages())
    known = set(carried) | set(image) | set(not_needed)
    pins = dict(
        (_norm(line.split("==")[0]), line.split("==")[1].strip())
        for line in open(os.path.join(ROOT, "constraints.txt"))
        if "==" in line and not line.startswith("#")
    )
    for name, version in carried.items():
        assert name == "sal-detectron2" or name in pins, f"{name} is not pinned in constraints.txt"
        assert version in (None, pins.get(name, version)), name

    project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
    from packaging.requirements import Requirement

    roots = [Requirement(r).name for r in project["dependencies"]]
    roots += [Requirement(r).name for r in project["optional-dependencies"]["test"]]
    roots += ["sal-detectron2", "transformers"]  # installed by setup_env.sh; the HF peers
    todo, seen = [_norm(r) for r in roots], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert name in known, f"{name} is needed but neither carried nor on the GPU image"
        if name in carried:  # the image's own packages come with their requirements
            todo += _requirements(name)

    modules = set()
    sources = [os.path.join("tools", f) for f in ("bench_ops.py", "benchmark.py", "gpu_check.py")]
    for folder in ("detr_variants", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            sources += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    for path in sources:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules.add(node.module.split(".")[0])
    owners = md.packages_distributions()
    # the project's own modules, and the scripts the tests import by name
    scripts = [f[:-3] for d in ("tools", "demo") for f in os.listdir(os.path.join(ROOT, d))]
    local = {"detr_variants", "helpers", *scripts}
    for module in sorted(modules - set(sys.stdlib_module_names) - local):
        dists = {_norm(d) for d in owners.get(module, [])}
        assert dists, f"{module} is imported but not installed here"
        assert dists & known, f"{module} ({dists}) is neither carried nor on the GPU image"


def test_op_benchmark_levels_follow_the_backbone_strides():
    """tools/bench_ops.py --image: the 4 levels at strides 8/16/32/64, each stride-2 stage rounding
    up, as the levels it hard-coded before for 800x1216 (20,197 encoder queries)."""
    spec = importlib.util.spec_from_file_location(
        "bench_ops", os.path.join(ROOT, "tools", "bench_ops.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.feature_levels(800, 1216) == ((100, 152), (50, 76), (25, 38), (13, 19))
    assert bench.case_queries(bench.feature_levels(800, 1216)) == {"encoder": 20197, "decoder": 300}
    assert bench.feature_levels(512, 512) == ((64, 64), (32, 32), (16, 16), (8, 8))
    assert bench.feature_levels(513, 65) == ((65, 9), (33, 5), (17, 3), (9, 2))
