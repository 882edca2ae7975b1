#!/usr/bin/env bash
# Downloads into .gpu_wheels/ (git-ignored) the wheels that `make gpu-check` installs on a GPU
# machine that has no network: the packages detr_variants and detectron2 import that the GPU image
# (Python 3.12, torch, torchvision, transformers, numpy, scipy, opencv, pytest, ...) lacks.
# Run it here, where PyPI is reachable, before a GPU session; the folder travels with the device
# tool's `carry` (working tree + carried paths at most 64 MiB).
#
#   GPU_WHEELS=.gpu_wheels    where the wheels go (emptied first)
#   PYTHON=.venv/bin/python   the interpreter whose pip downloads (and builds pure-Python
#                             wheels for packages that publish only a source archive)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
DEST=${GPU_WHEELS:-.gpu_wheels}

# One per line: what the GPU image lacks (see /work/.library/device/KINDS.md's package list),
# at the version pinned in constraints.txt. tests/test_gpu_check.py checks this list against
# the requirements and imports of detr_variants, detectron2 and the tests.
PACKAGES=(
  sal-detectron2==0.7.2 # detectron2's Python code, as tools/setup_env.sh installs it
  fvcore
  iopath
  omegaconf
  hydra-core
  antlr4-python3-runtime
  pycocotools
  yacs
  termcolor
)

# Not carried: what the GPU image has (KINDS.md, "Python packages already there"; the versions
# are the image's), and what is required but never imported here.
IMAGE_HAS=(
  torch torchvision numpy scipy opencv-python-headless pillow matplotlib tqdm tabulate cloudpickle
  tensorboard packaging pyyaml portalocker typing-extensions transformers safetensors
  pytest pytest-timeout onnx onnxruntime onnxscript onnx-ir ml-dtypes flatbuffers
)
NOT_NEEDED=(
  black # detectron2 imports it only in LazyConfig.to_py, which nothing here calls
)

pinned() { # NAME -> NAME==VERSION from constraints.txt (NAME itself if it pins none)
  local line
  line=$(grep -i -m1 "^$1==" constraints.txt || true)
  echo "${line:-$1}"
}

PIP=("$PYTHON" -m pip --disable-pip-version-check -q)
# The GPU machine's Python and platform: CPython 3.12 on x86-64 Linux.
TARGET=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"
for spec in "${PACKAGES[@]}"; do
  case "$spec" in *==*) ;; *) spec=$(pinned "$spec") ;; esac
  if [ "${spec%%==*}" = sal-detectron2 ]; then
    # A cp310 wheel; its compiled _C is not needed (README, Install notes), gpu_check.py installs
    # the Python code with --python-version 3.10 as tools/setup_env.sh does.
    "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.10 -d "$DEST" "$spec"
  elif ! "${PIP[@]}" download --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "$spec" \
    2>/dev/null; then
    # Only a source archive on PyPI: build its wheel here, which must come out pure Python.
    "${PIP[@]}" wheel --no-deps -w "$DEST" "$spec"
  fi
done

for whl in "$DEST"/*.whl; do
  case "$whl" in
    *-none-any.whl | *-cp312-*manylinux*.whl | *sal_detectron2-*-cp310-*.whl) ;;
    *) echo "gpu_wheels: $whl does not install on CPython 3.12 x86-64" >&2; exit 1 ;;
  esac
done
ls -1 "$DEST"
echo "gpu_wheels: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
