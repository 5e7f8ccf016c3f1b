"""RMSNorm bandwidth: vitfast's C++/CUDA kernels (vitfast._C) vs eager PyTorch and the copy ceiling.

RMSNorm is memory-bound: GB/s counts the bytes the op must move once (read x, write y: 2·N, plus the
weight), for the baselines too, so GB/s ratios are time ratios:
  copy      x.clone(): the measured device-to-device copy bandwidth, the ceiling
  hf        Hugging Face's Qwen2RMSNorm formula in eager PyTorch (vitfast.reference.rms_norm)
  torch     F.rms_norm
  vitfast   vitfast.ops.rms_norm
Shapes (CUDA): bf16 [64·1024, 1280] (Qwen2.5-VL's vision blocks, 64 images of 1024 patches) and
[16·1024, 3584], with bf16 weights.

    python benchmarks/bench_rms_norm.py                       # markdown table
    pytest benchmarks/bench_rms_norm.py --benchmark-only      # pytest-benchmark

Without CUDA it times the C++ CPU kernel on a small fp32 problem.
"""

from __future__ import annotations

import datetime
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from vitfast import ops, reference
from vitfast.timing import bench, gbps, rotating_inputs, sync_timer

EPS = 1e-6
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SHAPES = [(64 * 1024, 1280), (16 * 1024, 3584)] if HAS_CUDA else [(4 * 256, 1280)]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def make_inputs(shape, dtype=DTYPE):
    """One input set: x [M, C] (random, not zeros), weight [C] in x's dtype."""
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    return x, w


IMPLS = {
    "copy": lambda x, w: x.clone(),
    "hf": lambda x, w: reference.rms_norm(x, w, EPS),
    "torch": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
    "vitfast": lambda x, w: ops.rms_norm(x, w, EPS),
}


def rms_norm_bytes(shape, dtype) -> int:
    """x read and y written once, plus the weight."""
    M, C = shape
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * M * C * size + C * size


def check(shape):
    """The timed kernel computes the right thing on these inputs (vs HF's formula, same dtype)."""
    x, w = make_inputs(shape)
    tol = dict(atol=3e-2, rtol=3e-2) if DTYPE == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(IMPLS["vitfast"](x, w), IMPLS["hf"](x, w), **tol)


def main():
    name = torch.cuda.get_device_properties(0).name if HAS_CUDA else "CPU (no CUDA)"
    dt = str(DTYPE).removeprefix("torch.")
    print(f"# bench_rms_norm  {name}  torch {torch.__version__}  {datetime.date.today()}  {dt}")
    if not HAS_CUDA:
        print("No CUDA device: the CUDA kernels need an NVIDIA GPU. This small CPU run times the C++ CPU kernel "
              f"({torch.get_num_threads()} threads).")
    print("\nGB/s = bytes the op must move once (x + y), for the baselines too.\n")
    print("| shape | op | ms | GB/s | % of copy GB/s | speed-up vs torch |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        check(shape)
        inputs = rotating_inputs(partial(make_inputs, shape))
        ms = {impl: bench(fn, inputs, device=DEVICE) for impl, fn in IMPLS.items()}
        nbytes = rms_norm_bytes(shape, DTYPE)
        copy_gbps = gbps(2 * shape[0] * shape[1] * torch.empty((), dtype=DTYPE).element_size(), ms["copy"])
        for impl in IMPLS:
            rate = gbps(nbytes, ms[impl])
            speedup = f"{ms['torch'] / ms[impl]:.2f}x" if impl in ("hf", "vitfast") else "-"
            print(f"| [{shape[0]}, {shape[1]}] | {impl} | {ms[impl]:.4f} | {rate:.0f} | {100 * rate / copy_gbps:.0f}% "
                  f"| {speedup} |")


# ------------------------------------------------------------------------------ pytest-benchmark
@pytest.mark.benchmark(group="rms_norm", timer=sync_timer)
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm(benchmark, shape, impl):
    check(shape)
    fn = IMPLS[impl]
    args = make_inputs(shape)
    fn(*args)  # warm-up outside the timed runs
    benchmark(fn, *args)
    benchmark.extra_info["GB/s"] = gbps(rms_norm_bytes(shape, DTYPE), benchmark.stats.stats.median * 1e3)


if __name__ == "__main__":
    main()
