# Entry points, each self-contained on a fresh machine (Python, pip, gcc, nvcc):
#   make bench   the main job: the benchmark sweep
#   make test    ruff + the test suite (GPU tests skip cleanly without CUDA), then the ahead-of-time
#                compile check once more under the oldest Triton vitfast supports (one config per kernel variant)
#   make gpu     on a machine with an NVIDIA GPU: build, smoke, GPU tests and a quick benchmark with the
#                Python on PATH (or PYTHON=...) as it is: no virtual environment, no downloads
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
# The oldest Triton vitfast runs on (the one torch 2.11 brings); its compile check has an environment of its own.
TRITON_OLDEST ?= 3.6.0
VENV_OLDEST ?= .venv-triton-oldest
PYTHON ?= python3
GPU_OUT ?= gpu-results
GPU_ARGS ?=

.PHONY: env lint test compile-check-oldest bench gpu clean

env:
	bash tools/bootstrap.sh $(VENV)

lint: env
	$(PY) -m ruff check .

test: env
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(JOBS) tests
	$(MAKE) compile-check-oldest

compile-check-oldest:
	bash tools/bootstrap.sh $(VENV_OLDEST) --triton $(TRITON_OLDEST) --compile-check-only
	VITFAST_COMPILE_CHECK_CONFIGS=first $(VENV_OLDEST)/bin/python -m pytest -p no:cacheprovider \
		tests/test_triton_compile.py tests/test_direct_launch.py \
		tests/test_launch.py::test_tuned_config_is_the_autotuners_entry_for_the_calls_key

bench: env
	$(PY) -m vitfast bench $(BENCH_ARGS)

gpu:
	$(PYTHON) tools/gpu.py --out $(GPU_OUT) $(GPU_ARGS)

clean:
	rm -rf build *.egg-info vitfast/_C*.so bench-results $(GPU_OUT)
