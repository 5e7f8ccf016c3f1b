"""Test harness: Triton's interpreter on CPU-only machines, the `gpu` marker, seeding."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# The repository root holds `kernels/`, installed as `vitfast.kernels`. With the root on sys.path
# (`python -m pytest` puts the working directory there, and so do pytest-xdist's workers, in sys.path
# and PYTHONPATH), `import kernels` finds that folder instead of Hugging Face's `kernels` package, which
# transformers >= 5.25 requires and imports: importing transformers then fails. vitfast is imported from
# its (editable) installation, which needs no root on the path.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != _ROOT]
if os.environ.get("PYTHONPATH"):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in os.environ["PYTHONPATH"].split(os.pathsep) if p and Path(p).resolve() != _ROOT)

# Must happen before anything imports triton (vitfast.kernels does): without a GPU, Triton
# kernels run on CPU tensors in the interpreter. torch itself does not import triton.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)  # xdist runs one worker per core
# Tuning kept on disk (vitfast.tuning) goes to a folder of this run: tests never read a user's. The process that
# makes it (pytest's; xdist's workers inherit the variable) removes it at exit.
if "VITFAST_CACHE_DIR" not in os.environ:
    os.environ["VITFAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="vitfast-tuning-")
    atexit.register(shutil.rmtree, os.environ["VITFAST_CACHE_DIR"], ignore_errors=True)

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (CUDA is not available)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def no_tf32():
    """fp32 matmuls and convolutions in full fp32 (no TF32) for the test."""
    from vitfast.testing import matmul_tf32

    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    with matmul_tf32(False):
        yield
    torch.backends.cudnn.allow_tf32 = old
