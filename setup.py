"""Build script: the `vitfast` package, `vitfast.kernels` (from `kernels/`), and the extension
`vitfast._C` from `csrc/`.

The extension is C++-only where the installed torch has no CUDA, and a CUDA build where it has
(sm_80 and sm_90 by default; set VITFAST_CUDA_ARCHS="90" or "80;86;90" to choose). A torch with
CUDA but no CUDA compiler (nvcc, found through CUDA_HOME or PATH) stops the build with an error:
the LayerNorm / RMSNorm ops would otherwise have no CUDA kernel (an `nvcc` on PATH that is a wrapper outside the toolkit
is followed to the toolkit it runs); VITFAST_NO_CUDA=1 builds the CPU-only
extension on purpose, and VITFAST_NO_EXTENSION=1 installs the Python package alone (what the
ahead-of-time compile check of the Triton kernels needs). Build with
`pip install --no-build-isolation -e .` so it compiles against the torch already installed.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup


def _cuda_home_behind_nvcc():
    """Where no CUDA_HOME / CUDA_PATH is set, torch takes the folder above the `nvcc` on PATH as the CUDA toolkit.
    When that `nvcc` is a wrapper script or a link outside the toolkit (/usr/local/bin/nvcc running
    /usr/local/cuda-13.0/bin/nvcc), that folder has no CUDA headers or libraries: the host compiler then cannot
    find cuda_runtime_api.h. -> the toolkit nvcc itself reports (its TOP), or None where torch's guess is right."""
    nvcc = shutil.which("nvcc")
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or nvcc is None:
        return None
    if os.path.isfile(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda_runtime_api.h")):
        return None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    home = os.path.realpath(top.group(1).strip()) if top else None
    return home if home and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")) else None


def _extensions():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp or os.environ.get("VITFAST_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch

    if torch.version.cuda is not None and (home := _cuda_home_behind_nvcc()):
        os.environ["CUDA_HOME"] = home          # read by torch.utils.cpp_extension when it is imported, below
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # No -std: torch's BuildExtension adds the standard its own headers need (C++17 or C++20; torch 2.14's need 20).
    cxx_flags = ["-O3", "-fopenmp-simd"]  # -fopenmp-simd: `#pragma omp simd` only, no runtime
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs threads only in code compiled with OpenMP; the loader reuses torch's libgomp.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    with_cuda = torch.version.cuda is not None and os.environ.get("VITFAST_NO_CUDA", "0") != "1"
    if with_cuda and CUDA_HOME is None:
        raise SystemExit(f"vitfast: torch {torch.__version__} is built with CUDA {torch.version.cuda}, but no CUDA "
                         "compiler was found (set CUDA_HOME, or put nvcc on PATH); without it the LayerNorm / "
                         "RMSNorm extension would have no CUDA kernel. Set VITFAST_NO_CUDA=1 to build the CPU-only "
                         "extension anyway.")
    if with_cuda:
        archs = [a for a in os.environ.get("VITFAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        ext = CUDAExtension(
            "vitfast._C",
            cpp + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("VITFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", *gencode]},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension("vitfast._C", cpp, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=["vitfast", "vitfast.kernels"],
    package_dir={"vitfast": "vitfast", "vitfast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
