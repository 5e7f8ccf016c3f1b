#!/usr/bin/env bash
# Create or refresh the virtual environment and install what is missing.
# torch is installed (pinned, CPU wheel where that is what the machine offers) only when no torch
# is importable: an unpinned torch would pull several GB of CUDA packages onto a CPU machine.
# timm and torchvision are never installed here (they need a CUDA torch; GPU tests use them
# where they already exist).
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
# Everything below leaves the installed torch alone (none of these require torch). triton is pinned
# to the version the kernels are checked with; a triton already present (e.g. the one a CUDA torch
# brings) is kept.
missing=$("$VPY" - <<'PY'
import importlib.util
need = {"triton": "triton==3.9.0", "numpy": "numpy", "pytest": "pytest",
        "pytest_benchmark": "pytest-benchmark", "pybind11": "pybind11", "ninja": "ninja",
        "transformers": "transformers", "safetensors": "safetensors", "ruff": "ruff",
        "setuptools": "setuptools", "wheel": "wheel", "xdist": "pytest-xdist", "PIL": "pillow",
        "matplotlib": "matplotlib", "tqdm": "tqdm"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086
  pip_install $missing
fi
# Build the extension in place and install the package (no build isolation: an isolated build
# would fetch a fresh torch).
"$VPY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
