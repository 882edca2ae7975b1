# The README's commands. Each target sets the environment up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONHASHSEED := 0

.PHONY: setup lint typecheck format test demo bench cuda-check clean

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

clean:
	rm -rf build *.egg-info detr_variants/_C*.so output
