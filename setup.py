"""Build script: the `vitfast` package, `vitfast.kernels` (from `kernels/`), and the extension
`vitfast._C` from `csrc/`.

The extension is C++-only where the installed torch has no CUDA, and a CUDA build where it has
(sm_80 and sm_90 by default; set VITFAST_CUDA_ARCHS="90" or "80;86;90" to choose). A torch with
CUDA but no CUDA compiler (nvcc, found through CUDA_HOME or PATH) stops the build with an error:
the LayerNorm ops would otherwise have no CUDA kernel; VITFAST_NO_CUDA=1 builds the CPU-only
extension on purpose, and VITFAST_NO_EXTENSION=1 installs the Python package alone (what the
ahead-of-time compile check of the Triton kernels needs). Build with
`pip install --no-build-isolation -e .` so it compiles against the torch already installed.
"""

import glob
import os
import sys

from setuptools import setup


def _extensions():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    if not cpp or os.environ.get("VITFAST_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp-simd"]  # -fopenmp-simd: `#pragma omp simd` only, no runtime
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs threads only in code compiled with OpenMP; the loader reuses torch's libgomp.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    with_cuda = torch.version.cuda is not None and os.environ.get("VITFAST_NO_CUDA", "0") != "1"
    if with_cuda and CUDA_HOME is None:
        raise SystemExit(f"vitfast: torch {torch.__version__} is built with CUDA {torch.version.cuda}, but no CUDA "
                         "compiler was found (set CUDA_HOME, or put nvcc on PATH); without it the LayerNorm "
                         "extension would have no CUDA kernel. Set VITFAST_NO_CUDA=1 to build the CPU-only "
                         "extension anyway.")
    if with_cuda:
        archs = [a for a in os.environ.get("VITFAST_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        ext = CUDAExtension(
            "vitfast._C",
            cpp + sorted(glob.glob("csrc/*.cu")),
            define_macros=[("VITFAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo", *gencode]},
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
