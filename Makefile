# The README's commands. Each target sets the environment up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONHASHSEED := 0

.PHONY: setup lint typecheck format test demo bench cuda-check gpu-check clean

setup:
	@bash tools/setup_env.sh

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy on detr_variants/layers and detr_variants/modeling (the files and options: pyproject.toml)
typecheck: setup
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	@# the native sources follow ops/.clang-format (Debian's clang-format)
	command -v clang-format >/dev/null && find ops \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' \) \
		-exec clang-format --style=file -i {} + || echo 'clang-format not installed: ops/ not formatted'

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/train_demo.py --output-dir output/demo

bench: setup
	$(PY) tools/bench_ops.py --output output/bench_ops.json

# Compiles the CUDA kernels into build/cuda without installing them (they cannot run without a
# GPU; on a GPU machine `make setup` builds and installs them itself). About 3 min on 2 cores.
cuda-check: setup
	FORCE_CUDA=1 CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} $(PY) setup.py -q build_ext \
		--build-temp build/cuda --build-lib build/cuda

# On a fresh GPU machine with no network and no venv (README, GPU check): installs the wheels
# that tools/gpu_wheels.sh fetched beforehand, builds the CUDA op, runs the CUDA tests and times the
# op and Deformable DETR R50 against HF; writes output/gpu_check.json. Within 8 min on an H100/H200.
# PYTHON= picks the interpreter, GPU_CHECK_ARGS= passes options (e.g. --dry-run, --stages ...).
gpu-check:
	@bash tools/gpu_check.sh $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info detr_variants/_C*.so output
