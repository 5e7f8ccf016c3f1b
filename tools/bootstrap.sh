#!/usr/bin/env bash
# Create or refresh a virtual environment and install what is missing:
#   bootstrap.sh [VENV] [--triton VERSION] [--compile-check-only]
# torch is installed (pinned, CPU wheel where that is what the machine offers) only when no torch
# is importable: an unpinned torch would pull several GB of CUDA packages onto a CPU machine.
# timm and torchvision are never installed here (they need a CUDA torch; GPU tests use them
# where they already exist).
# --compile-check-only: just what tests/test_triton_compile.py and tests/test_direct_launch.py need
# (torch, the given Triton, numpy, pytest, vitfast without its C++ extension): the environment that
# checks the kernels under the oldest Triton vitfast supports.
set -euo pipefail
VENV=${1:-.venv}
[ $# -gt 0 ] && shift
TRITON=3.9.0          # the version the kernels are checked with in the main environment
MINIMAL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --triton) TRITON=$2; shift 2 ;;
    --compile-check-only) MINIMAL=1; shift ;;
    *) echo "bootstrap.sh: unknown option $1 (expected --triton VERSION, --compile-check-only)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
# Everything below leaves the installed torch alone (none of these require torch). In the main
# environment a triton already present (e.g. the one a CUDA torch brings) is kept; the compile-check
# environment holds exactly the Triton it is for.
missing=$(MINIMAL=$MINIMAL TRITON=$TRITON "$VPY" - <<'PY'
import importlib.metadata, importlib.util, os
triton = f"triton=={os.environ['TRITON']}"
if os.environ["MINIMAL"] == "1":
    need = {"numpy": "numpy", "pytest": "pytest", "setuptools": "setuptools", "wheel": "wheel"}
    try:
        ok = importlib.metadata.version("triton") == os.environ["TRITON"]
    except importlib.metadata.PackageNotFoundError:
        ok = False
    extra = [] if ok else [triton]
else:
    need = {"triton": triton, "numpy": "numpy", "pytest": "pytest",
            "pytest_benchmark": "pytest-benchmark", "pybind11": "pybind11", "ninja": "ninja",
            "transformers": "transformers", "safetensors": "safetensors", "ruff": "ruff",
            "setuptools": "setuptools", "wheel": "wheel", "xdist": "pytest-xdist", "PIL": "pillow",
            "matplotlib": "matplotlib", "tqdm": "tqdm", "scipy": "scipy"}
    extra = []
print(" ".join(extra + [pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None]))
PY
)
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086
  pip_install $missing
fi
# Build the extension in place and install the package (no build isolation: an isolated build
# would fetch a fresh torch). The compile-check environment needs no extension.
if [ "$MINIMAL" = 1 ]; then
  VITFAST_NO_EXTENSION=1 "$VPY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
else
  "$VPY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
fi
