"""Every CUDA source in csrc/ compiles with bare nvcc (no torch headers) for sm_90, ptxas -v reports
every __global__ function of the source (each one instantiated) and no register spills in any kernel;
the CUDA branch of csrc/ops.cpp (VITFAST_WITH_CUDA) compiles with the host compiler against torch's
c10/cuda headers. Needs nvcc, not a GPU: nothing is run."""

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CU_SOURCES = sorted(CSRC.glob("*.cu"))


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH, CUDA_HOME or CUDA_PATH: the CUDA "
                                                     "sources in csrc/ cannot be compiled on this machine")


def ptxas_kernels(log: str) -> dict[str, tuple[int, int, int]]:
    """{entry function: (registers, spill store bytes, spill load bytes)} from `ptxas -v` output."""
    kernels, current, props, props_name = {}, None, {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            current = m.group(1)
        elif m := re.search(r"Function properties for (\S+)", line):
            props_name = m.group(1)
            props[props_name] = None
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            props[props_name] = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and current is not None:
            stores, loads = props.get(current) or (0, 0)
            kernels[current] = (int(m.group(1)), stores, loads)
            current = None
    # Spills in a non-inlined device function count against every kernel; report them too.
    for name, spills in props.items():
        if spills and spills != (0, 0) and name not in kernels:
            kernels[name] = (-1, *spills)
    return kernels


def global_functions(source: str) -> set[str]:
    """The names of the __global__ functions (kernel templates) defined in CUDA source text."""
    return set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", source))


def test_csrc_has_cuda_sources_without_torch_headers():
    assert CU_SOURCES, "csrc/ has no .cu files"
    for source in CU_SOURCES:
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', source.read_text())
        torch_includes = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11", "Python.h")]
        assert not torch_includes, f"{source.name} includes {torch_includes}: CUDA sources must build with bare nvcc"


def test_ptxas_log_parser():
    log = """ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
ptxas info    : Compiling entry function '_Z1gv' for 'sm_90'
ptxas info    : Function properties for _Z1gv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 31 registers, used 1 barriers, 128 bytes smem"""
    assert ptxas_kernels(log) == {"_Z1kv": (255, 4, 4), "_Z1gv": (31, 0, 0)}
    src = """template <int N>
__global__ void __launch_bounds__(N ? 512 : 128)
row_kernel(const float* x) {}
__global__ void plain_kernel(float* y) {}"""
    assert global_functions(src) == {"row_kernel", "plain_kernel"}


def _standards() -> list[str]:
    """The C++ standards a setup.py build may compile with: setup.py passes none, and torch's BuildExtension adds
    one its headers take: C++17 (torch 2.11's choice) or C++20 (torch 2.13's; torch 2.14's headers need it).
    -> the oldest the installed torch's ATen.h takes, and C++20."""
    aten = Path(cpp_extension.include_paths()[0]) / "ATen" / "ATen.h"
    m = re.search(r"__cplusplus < (\d{4})\d\dL", aten.read_text()) if aten.is_file() else None
    oldest = {"2017": "c++17", "2020": "c++20"}.get(m.group(1) if m else "", "c++17")
    return sorted({oldest, "c++20"})


def _nvcc_cmd(source: Path, standard: str, out: Path) -> list[str]:
    """The flags of a setup.py build (torch's BuildExtension adds COMMON_NVCC_FLAGS, which forbid implicit
    half/bf16 conversions, and a C++ standard: C++17 in torch 2.11, C++20 from 2.13), for sm_90 only."""
    return [NVCC, "-c", str(source), "-o", str(out), *cpp_extension.COMMON_NVCC_FLAGS, "-DVITFAST_WITH_CUDA=1",
            f"-std={standard}", "-I", str(CSRC)]


@needs_nvcc
@pytest.mark.parametrize("standard", [s for s in _standards() if s != "c++20"])
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_compiles_under_the_older_standard(source, standard, tmp_path):
    """What the front ends accept depends on the C++ standard, the code generated does not (both standards give
    the same PTX for these sources): under the older standard the source goes through nvcc's front end and the
    host compiler, its device code lowered to PTX without optimisation; registers and spills are checked once,
    under C++20 (below)."""
    cmd = [*_nvcc_cmd(source, standard, tmp_path / f"{source.stem}.o"), "-O0", "-Xcicc", "-O0",
           "-gencode=arch=compute_90,code=compute_90"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"


@needs_nvcc
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_compiles_for_sm90_without_spills(source, tmp_path):
    cmd = [*_nvcc_cmd(source, "c++20", tmp_path / f"{source.stem}.o"), "-O3", "-gencode=arch=compute_90,code=sm_90",
           "-Xptxas", "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log[-6000:]}"
    kernels = ptxas_kernels(log)
    assert kernels and "for 'sm_90'" in log, f"ptxas -v reported no sm_90 kernels for {source.name}:\n{log[-2000:]}"
    # A kernel template no launcher instantiates is never compiled, so it would go unchecked (mangled names hold
    # each identifier as <length><name>).
    unchecked = {f for f in global_functions(source.read_text()) if not any(f"{len(f)}{f}" in k for k in kernels)}
    assert not unchecked, f"{source.name}: no instantiation of {sorted(unchecked)} was compiled"
    spilling = {name: k for name, k in kernels.items() if k[1] or k[2]}
    assert not spilling, (f"{len(spilling)} of {len(kernels)} kernels in {source.name} spill registers "
                          "(registers, spill store bytes, spill load bytes):\n"
                          + "\n".join(f"  {n}: {k}" for n, k in sorted(spilling.items())))


def _cuda_include():
    """The CUDA toolkit's include directory (cuda_runtime.h), or None; nvcc may be a wrapper script."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             Path(NVCC).resolve().parents[1] if NVCC else None, "/usr/local/cuda"]
    return next((Path(h) / "include" for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").is_file()), None)


def _host_compiler():
    return next((found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None)


@needs_nvcc
@pytest.mark.skipif(_host_compiler() is None, reason="no host C++ compiler (c++, g++, clang++) on PATH")
@pytest.mark.parametrize("standard", _standards())
def test_ops_cpp_cuda_branch_compiles(standard):
    """ops.cpp with -DVITFAST_WITH_CUDA (device guard, current stream, the launcher's C ABI, the CUDA
    registrations) against the installed torch's headers and the CUDA toolkit's, as setup.py's CUDA
    build compiles it. A CPU-only torch ships c10/cuda without its generated
    cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips (it only sets export macros)."""
    torch_includes = [Path(p) for p in cpp_extension.include_paths()]
    if not (torch_includes[0] / "c10" / "cuda" / "CUDAGuard.h").is_file():
        pytest.skip("the installed torch ships no c10/cuda headers")
    cuda_include = _cuda_include()
    if cuda_include is None:
        pytest.skip("no CUDA toolkit include directory with cuda_runtime.h (CUDA_HOME, CUDA_PATH, /usr/local/cuda)")
    cmd = [_host_compiler(), "-fsyntax-only", str(CSRC / "ops.cpp"), f"-std={standard}", "-DVITFAST_WITH_CUDA=1",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-I", str(CSRC),
           "-I", sysconfig.get_paths()["include"]]
    cmd += [arg for p in [*torch_includes, cuda_include] for arg in ("-isystem", str(p))]
    if not (torch_includes[0] / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
