# The README's commands. Each target sets the environment up first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONHASHSEED := 0

.PHONY: setup test demo bench cuda-build clean

setup:
	@bash tools/setup_env.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) tools/demo.py --output-dir output/demo

bench: setup
	$(PY) tools/bench_ops.py --output output/bench_ops.json

# Compiles the CUDA kernels as well (they cannot run on a machine without a GPU).
cuda-build: setup
	FORCE_CUDA=1 bash tools/setup_env.sh

clean:
	rm -rf build *.egg-info detr_variants/_C*.so output
