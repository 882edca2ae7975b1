#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned dependencies, detectron2 and this package
# (editable, with its native ops). Idempotent: a stamp of the inputs skips the work when
# nothing changed and the environment still imports.
#
#   PYTHON=python3.11         interpreter used to create the venv
#   VENV=.venv                where the venv lives
#   DETECTRON2_SOURCE=...     a pip requirement for detectron2 instead of the PyPI
#                             sal-detectron2 wheel (e.g. a git URL or a local checkout)
#   FORCE_CUDA=1              also compile the CUDA kernels (see ops/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
STAMP="$VENV/.detr_variants_setup"

inputs_hash() {
  { cat constraints.txt pyproject.toml setup.py tools/setup_env.sh
    find ops -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \) -print0 2>/dev/null \
      | sort -z | xargs -0 -r cat
    echo "${DETECTRON2_SOURCE:-}" "${FORCE_CUDA:-}"
  } | sha256sum | cut -d' ' -f1
}

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(inputs_hash)" ] \
   && "$PY" -c "import detectron2.modeling, detr_variants._C" 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi

[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
PIP=("$PY" -m pip install --disable-pip-version-check -q -c constraints.txt)

echo "setup: installing pinned dependencies"
"${PIP[@]}" torch torchvision numpy scipy pycocotools opencv-python-headless fvcore iopath \
  Pillow matplotlib termcolor yacs tabulate cloudpickle tqdm tensorboard omegaconf hydra-core \
  black ruff mypy packaging "setuptools<81" ninja pytest pytest-timeout transformers \
  onnx onnxruntime onnxscript

if "$PY" -c "import detectron2.modeling" 2>/dev/null; then
  echo "setup: detectron2 already importable, keeping it"
elif [ -n "${DETECTRON2_SOURCE:-}" ]; then
  echo "setup: installing detectron2 from $DETECTRON2_SOURCE"
  "$PY" -m pip install --disable-pip-version-check -q --no-build-isolation "$DETECTRON2_SOURCE"
else
  echo "setup: installing detectron2 (sal-detectron2 0.7.2 wheel, Python code only)"
  SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$PY" -m pip install --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version 3.10 --upgrade --target "$SITE" sal-detectron2==0.7.2
  # The wheel also ships an unrelated top-level `tools` package; it would shadow ours.
  rm -rf "$SITE/tools"
fi

echo "setup: building detr_variants and its native ops"
if [ -z "${CUDA_HOME:-}" ]; then
  # torch guesses the directory above nvcc, which need not hold libcudart; pick the
  # toolkit root that does.
  for root in "$(dirname "$(dirname "$(command -v nvcc || echo /none/bin/nvcc)")")" /usr/local/cuda; do
    if ls "$root"/lib64/libcudart.so* >/dev/null 2>&1; then export CUDA_HOME="$root"; break; fi
  done
fi
"$PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
"$PY" -c "import detectron2.modeling, detr_variants._C"
inputs_hash > "$STAMP"
echo "setup: done"
