"""LayerNorm bandwidth: vitfast's C++/CUDA kernels (vitfast._C) vs eager PyTorch and the copy ceiling.

LayerNorm is memory-bound, so the figure of merit is GB/s, counted as the bytes the op must move
once: layer_norm reads x and writes y (2·N + weight and bias), add_layer_norm reads x and residual
and writes y and s = x + residual (4·N). The same byte count is used for the baselines, so GB/s
ratios are time ratios:
  copy        x.clone(): the measured device-to-device copy bandwidth, the ceiling for layer_norm
  torch       F.layer_norm
  vitfast     vitfast.ops.layer_norm
  unfused     x + r, then F.layer_norm (how an eager pre-LN ViT block runs)
  vitfast add vitfast.ops.add_layer_norm
Shapes (CUDA): bf16 [256·197, 768] (ViT-B/16 at 224 px, batch 256) and [64·785, 768] (ViT-B/16 at
448 px, batch 64), with bf16 weights as in a model cast with .to(torch.bfloat16).

    python benchmarks/bench_layer_norm.py                       # markdown table
    pytest benchmarks/bench_layer_norm.py --benchmark-only      # pytest-benchmark

Without CUDA it times the C++ CPU kernel on a small fp32 problem.
"""

from __future__ import annotations

import datetime
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from vitfast import ops
from vitfast.timing import bench, gbps, rotating_inputs, sync_timer

EPS = 1e-6
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
SHAPES = [(256 * 197, 768), (64 * 785, 768)] if HAS_CUDA else [(4 * 197, 768)]
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32


def make_inputs(shape, dtype=DTYPE):
    """One input set: x, residual [M, C] (random, not zeros), weight and bias [C] in x's dtype."""
    C = shape[-1]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    r = torch.randn(shape, device=DEVICE, dtype=dtype)
    w = (1 + 0.1 * torch.randn(C, device=DEVICE)).to(dtype)
    b = (0.1 * torch.randn(C, device=DEVICE)).to(dtype)
    return x, r, w, b


LN_IMPLS = {
    "copy": lambda x, r, w, b: x.clone(),
    "torch": lambda x, r, w, b: F.layer_norm(x, (x.shape[-1],), w, b, EPS),
    "vitfast": lambda x, r, w, b: ops.layer_norm(x, w, b, EPS),
}
ADD_IMPLS = {
    "unfused": lambda x, r, w, b: F.layer_norm(x + r, (x.shape[-1],), w, b, EPS),
    "vitfast add": lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS),
}


def layer_norm_bytes(shape, dtype, n_tensors: int) -> int:
    """n_tensors [M, C] tensors moved once, plus weight and bias read once."""
    M, C = shape
    size = torch.empty((), dtype=dtype).element_size()
    return n_tensors * M * C * size + 2 * C * size


def check(shape):
    """The timed kernels compute the right thing on these inputs (vs eager, same dtype)."""
    x, r, w, b = make_inputs(shape)
    tol = dict(atol=3e-2, rtol=3e-2) if DTYPE == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(LN_IMPLS["vitfast"](x, r, w, b), LN_IMPLS["torch"](x, r, w, b), **tol)
    y, s = ADD_IMPLS["vitfast add"](x, r, w, b)
    torch.testing.assert_close(s, x + r, atol=0, rtol=0)
    torch.testing.assert_close(y, ADD_IMPLS["unfused"](x, r, w, b), **tol)


def main():
    name = torch.cuda.get_device_properties(0).name if HAS_CUDA else "CPU (no CUDA)"
    dt = str(DTYPE).removeprefix("torch.")
    print(f"# bench_layer_norm  {name}  torch {torch.__version__}  {datetime.date.today()}  {dt}")
    if not HAS_CUDA:
        print("No CUDA device: the CUDA kernels need an NVIDIA GPU. This small CPU run times the C++ CPU kernel "
              f"({torch.get_num_threads()} threads).")
    print("\nGB/s = bytes the op must move once (layer_norm: x + y; add_layer_norm: x + r + y + s), "
          "for the baselines too.\n")
    print("| shape | op | ms | GB/s | % of copy GB/s | speed-up vs eager |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        check(shape)
        inputs = rotating_inputs(partial(make_inputs, shape))
        ms = {impl: bench(fn, inputs, device=DEVICE) for impl, fn in {**LN_IMPLS, **ADD_IMPLS}.items()}
        copy_bytes = 2 * shape[0] * shape[1] * torch.empty((), dtype=DTYPE).element_size()
        ln_bytes = layer_norm_bytes(shape, DTYPE, 2)
        add_bytes = layer_norm_bytes(shape, DTYPE, 4)
        copy_gbps = gbps(copy_bytes, ms["copy"])
        shape_s = f"[{shape[0]}, {shape[1]}]"
        for impl, nbytes, eager in [("copy", copy_bytes, None), ("torch", ln_bytes, None),
                                    ("vitfast", ln_bytes, "torch"), ("unfused", add_bytes, None),
                                    ("vitfast add", add_bytes, "unfused")]:
            rate = gbps(nbytes, ms[impl])
            speedup = f"{ms[eager] / ms[impl]:.2f}x" if eager else "-"
            print(f"| {shape_s} | {impl} | {ms[impl]:.4f} | {rate:.0f} | {100 * rate / copy_gbps:.0f}% | {speedup} |")


# ------------------------------------------------------------------------------ pytest-benchmark
@pytest.mark.benchmark(group="layer_norm", timer=sync_timer)
@pytest.mark.parametrize("impl", list(LN_IMPLS) + list(ADD_IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm(benchmark, shape, impl):
    check(shape)
    fn = {**LN_IMPLS, **ADD_IMPLS}[impl]
    args = make_inputs(shape)
    fn(*args)  # warm-up outside the timed runs
    benchmark(fn, *args)
    n_tensors = 4 if impl in ADD_IMPLS else 2  # copy: counted like layer_norm (x + y; weights negligible)
    benchmark.extra_info["GB/s"] = gbps(layer_norm_bytes(shape, DTYPE, n_tensors), benchmark.stats.stats.median * 1e3)


if __name__ == "__main__":
    main()
