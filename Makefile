# Two entry points, both self-contained on a fresh machine (Python, pip, gcc, nvcc):
#   make bench   the main job: the benchmark sweep
#   make test    ruff + the test suite (GPU tests skip cleanly without CUDA)
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2

.PHONY: env lint test bench clean

env:
	bash tools/bootstrap.sh $(VENV)

lint: env
	$(PY) -m ruff check .

test: env
	$(PY) -m ruff check .
	$(PY) -m pytest -n $(JOBS) tests

bench: env
	$(PY) -m vitfast bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info vitfast/_C*.so bench-results
