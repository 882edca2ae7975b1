"""``pip install .`` into an environment that already has torch and detectron2: the wheel holds
every config, and ``get_config`` loads them from the installed copy (repository not on the
path). Built with DETR_VARIANTS_NO_EXT=1: the native op is not what this tests, and compiling it
takes minutes."""

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from detr_variants import model_zoo

SOURCES = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in")
TREES = ("detr_variants", "configs", "projects", "ops")


def repo_configs(repo_root):
    return sorted(
        os.path.relpath(p, repo_root)
        for pattern in ("configs/**/*.py", "projects/*/configs/*.py")
        for p in glob.glob(os.path.join(repo_root, pattern), recursive=True)
    )


def test_checkout_reads_its_own_configs(repo_root):
    path = model_zoo.config_path("configs/common/data/custom.py")
    assert path == os.path.join(repo_root, "configs", "common", "data", "custom.py")
    assert model_zoo.config_path("detr/detr_r18_synthetic").startswith(repo_root)


@pytest.mark.slow
def test_wheel_ships_the_configs_and_get_config_works_installed(repo_root, tmp_path):
    # A copy of what the build reads, so that the build leaves nothing in the checkout.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        shutil.copy(os.path.join(repo_root, name), src / name)
    for tree in TREES:
        shutil.copytree(
            os.path.join(repo_root, tree),
            src / tree,
            ignore=shutil.ignore_patterns("__pycache__", "*.so", "build", "output"),
        )
    env = dict(os.environ, DETR_VARIANTS_NO_EXT="1")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", ".", "-w", str(tmp_path / "dist")],
        cwd=src,
        env=env,
        check=True,
    )
    (wheel,) = glob.glob(str(tmp_path / "dist" / "detr_variants-*.whl"))
    shipped = sorted(
        n[len("detr_variants/model_zoo_configs/") :]
        for n in zipfile.ZipFile(wheel).namelist()
        if n.startswith("detr_variants/model_zoo_configs/")
    )
    assert shipped == repo_configs(repo_root)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), wheel], check=True)
    script = (
        "import json, detr_variants, detectron2\n"
        "from detr_variants import model_zoo\n"
        "names = model_zoo.list_configs()\n"
        "for n in names: model_zoo.get_config(n)\n"
        "cfg = model_zoo.get_config('configs/common/data/custom.py')\n"
        "print(json.dumps({'package': detr_variants.__file__, 'names': names,\n"
        "    'custom': model_zoo.config_path('configs/common/data/custom.py'),\n"
        "    'scale': cfg.dataloader.train.mapper.augmentations.scale}))\n"
    )
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=run_dir,
        env=dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1"),
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["package"].startswith(str(site))
    assert result["custom"].startswith(str(site / "detr_variants" / "model_zoo_configs"))
    assert result["names"] == model_zoo.list_configs() and len(result["names"]) > 20
    assert result["scale"] == 1.0
