"""Fused linear benchmark: the four ViT linears and the MLP at batch 256 x 197 tokens (M = 50,432).

Per layer (ViT-B C=768, ViT-L C=1024; bf16 and fp16), TFLOP/s (2·M·N·K per call) of
  vitfast   `vitfast.ops.linear`: the dispatched path (fused Triton kernel or cuBLAS + epilogue)
  triton    the fused Triton kernel alone (`vitfast.kernels.linear.linear`), one program per tile
  persist.  its persistent variant (one program per SM looping over tiles)
  tma       the persistent variant with TMA descriptor loads (compute capability >= 9 only)
  cublas    `F.linear` alone (GEMM + bias, no activation / residual): the ceiling to match
  eager     `F.linear` then GELU then the residual add, as a plain PyTorch ViT runs it
and the full MLP (fc1 + GELU, fc2 + residual): `vitfast.ops.mlp` vs eager; DINOv2-giant's SwiGLU fc1 (the
gating in the epilogue, against F.linear then silu(gate) · up).

    python benchmarks/bench_linear.py                          # markdown table
    pytest benchmarks/bench_linear.py --benchmark-only         # pytest-benchmark

Without CUDA, `main` times the CPU paths `ops.linear` chooses between at ViT-Ti rows instead (one
thread; the Triton kernels need an NVIDIA GPU), and the pytest-benchmark suites run a tiny CPU problem.
"""

from __future__ import annotations

import datetime
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from vitfast import ops, reference
from vitfast.timing import bench, rotating_inputs, sync_timer, tflops

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
M = 256 * 197 if HAS_CUDA else 2 * 17
WIDTHS = {"ViT-B": 768, "ViT-L": 1024} if HAS_CUDA else {"tiny": 64}
DTYPES = [torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32]


def vit_linears(C: int):
    """(name, K, N, activation, residual) of one transformer block."""
    return [("qkv", C, 3 * C, None, False), ("proj", C, C, None, True),
            ("fc1", C, 4 * C, "gelu", False), ("fc2", 4 * C, C, None, True)]


# DINOv2-giant's SwiGLU fc1 (C = 1536 -> gate and up of 4096 each, the gating in the epilogue; eager: F.linear, then
# silu(gate) * up): (model, name, K, N, activation, residual)
SWIGLU_FC1 = ("ViT-g", "fc1", 1536, 2 * 4096, "swiglu", False)


def make_linear(K, N, residual, dtype):
    """One input set: x [M, K], weight [N, K], bias [N], residual [M, N] or None (random, not zeros)."""
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K ** 0.5
    b = torch.randn(N, device=DEVICE, dtype=dtype)
    r = torch.randn(M, N, device=DEVICE, dtype=dtype) if residual else None
    return x, w, b, r


def linear_impls(activation):
    impls = {
        "vitfast": lambda x, w, b, r: ops.linear(x, w, b, activation=activation, residual=r),
        "cublas": lambda x, w, b, r: F.linear(x, w, b),
        "eager": lambda x, w, b, r: ops._linear_cublas(x, w, b, activation, r),   # F.linear -> GELU -> + r
    }
    if HAS_CUDA:
        from vitfast.kernels import linear as linear_kernels

        for name, variant in (("triton", "tiled"), ("persistent", "persistent"), ("tma", "tma")):
            if variant == "tma" and (torch.cuda.get_device_capability()[0] < 9 or activation == "swiglu"):
                continue
            impls[name] = (lambda x, w, b, r, v=variant:
                           linear_kernels.linear(x, w, b, activation=activation, residual=r, variant=v))
    return impls


def make_mlp(C, dtype):
    x, w1, b1, _ = make_linear(C, 4 * C, False, dtype)
    w2 = torch.randn(C, 4 * C, device=DEVICE, dtype=dtype) / (4 * C) ** 0.5
    b2 = torch.randn(C, device=DEVICE, dtype=dtype)
    return x, w1, b1, w2, b2, torch.randn_like(x)


MLP_IMPLS = {
    "vitfast": lambda x, w1, b1, w2, b2, r: ops.mlp(x, w1, b1, w2, b2, activation="gelu", residual=r),
    "eager": lambda x, w1, b1, w2, b2, r: F.linear(reference.gelu(F.linear(x, w1, b1)), w2, b2) + r,
}


def _time(fn, inputs):
    return bench(fn, inputs, device=DEVICE)


# ViT-Ti/16 (C = 192): 2 images at 224 px (2 x 197 rows), one at 512 px (1025 rows).
CPU_ROWS, CPU_WIDTH = (2 * 197, 1025), 192


def cpu_main():
    """Per ViT-Ti linear on the CPU, one thread, the calls timed in turn (vitfast.bench.Timer): F.linear then
    the epilogue in place (what eager PyTorch runs), oneDNN's GEMM with the epilogue as a post-op reading the
    plain weight (oneDNN reorders it on every call), the same with the weight packed once
    (`ops._packed_weight`), and `ops.linear` under inference_mode (the path it chose for the shape)."""
    from vitfast.bench import Timer

    torch.set_num_threads(1)
    print(f"# bench_linear  CPU, 1 thread  torch {torch.__version__}  {datetime.date.today()}  fp32, ViT-Ti "
          f"(C = {CPU_WIDTH}), median of 30 interleaved calls")
    print("\n| rows | layer | K -> N | epilogue | F.linear + epilogue ms | oneDNN ms | oneDNN packed ms "
          "| vitfast ms | vitfast GFLOP/s | F.linear / vitfast | path |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    timer = Timer("cpu", reps=30, rep_ms=0)
    for M in CPU_ROWS:
        for name, K, N, act, res in vit_linears(CPU_WIDTH):
            x = torch.randn(M, K)
            w, b = torch.randn(N, K) / K ** 0.5, torch.randn(N)
            r = torch.randn(M, N) if res else None
            fns = {"torch": lambda x, w, b, act, r: ops._linear_torch(x, w, b, act, r, None),
                   "onednn": lambda x, w, b, act, r: ops._linear_mkldnn(x, w, b, act, r, None),
                   "packed": lambda x, w, b, act, r: ops._linear_mkldnn(x, w, b, act, r, None, pack=True),
                   "vitfast": lambda x, w, b, act, r: ops.linear(x, w, b, activation=act, residual=r)}
            ms = timer.measure_interleaved(fns, [x, w, b, act, r])
            key = next(k for k in ops._LINEAR_CPU_PATHS if k[:3] == (M, N, K))
            path = ("F.linear", "oneDNN")[ops._LINEAR_CPU_PATHS[key]] + (" packed" if key[-1] else "")
            epi = "+".join(["bias"] + ([act] if act else []) + (["residual"] if res else []))
            gflops = 2.0 * M * N * K / (ms["vitfast"] * 1e-3) / 1e9
            print(f"| {M} | {name} | {K} -> {N} | {epi} | {ms['torch']:.3f} | {ms['onednn']:.3f} | {ms['packed']:.3f} "
                  f"| {ms['vitfast']:.3f} | {gflops:.1f} | {ms['torch'] / ms['vitfast']:.2f} | {path} |")


def main():
    if not HAS_CUDA:
        return cpu_main()
    props = torch.cuda.get_device_properties(0).name
    print(f"# bench_linear  {props}  torch {torch.__version__}  {datetime.date.today()}  M = {M}")
    print("\n| model | layer | dtype | K -> N | epilogue | vitfast ms | vitfast TF/s | triton TF/s | persistent TF/s "
          "| tma TF/s | cuBLAS TF/s | eager TF/s | vitfast / cuBLAS | path |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for model, C in [*WIDTHS.items(), (SWIGLU_FC1[0], None)]:
        for dtype in DTYPES:
            dt = str(dtype).removeprefix("torch.")
            for name, K, N, act, res in vit_linears(C) if C else [SWIGLU_FC1[1:]]:
                inputs = rotating_inputs(partial(make_linear, K, N, res, dtype))
                ms = {impl: _time(fn, inputs) for impl, fn in linear_impls(act).items()}
                flops = 2.0 * M * N * K
                tf = {impl: f"{tflops(flops, t):.3g}" for impl, t in ms.items()}
                epi = "+".join(["bias"] + ([act] if act else []) + (["residual"] if res else []))
                x, w, b, r = inputs[0]
                key = ops._linear_key(x, w, b, act, r) if HAS_CUDA else None
                path = ops._LINEAR_PATHS.get(key, "-")
                print(f"| {model} | {name} | {dt} | {K} -> {N} | {epi} | {ms['vitfast']:.3f} | {tf['vitfast']} "
                      f"| {tf.get('triton', '-')} | {tf.get('persistent', '-')} | {tf.get('tma', '-')} "
                      f"| {tf['cublas']} | {tf['eager']} "
                      f"| {ms['cublas'] / ms['vitfast']:.2f} | {path} |")
            if C is None:
                continue
            inputs = rotating_inputs(partial(make_mlp, C, dtype))
            ms = {impl: _time(fn, inputs) for impl, fn in MLP_IMPLS.items()}
            flops = 2 * 2.0 * M * C * 4 * C
            print(f"| {model} | mlp | {dt} | {C} -> {4 * C} -> {C} | gelu, +residual | {ms['vitfast']:.3f} "
                  f"| {tflops(flops, ms['vitfast']):.3g} | - | - | - | - | {tflops(flops, ms['eager']):.3g} "
                  f"| - | - |")


# ------------------------------------------------------------------------------ pytest-benchmark
CASES = [pytest.param(C, dtype, layer, id=f"{model}-{str(dtype).removeprefix('torch.')}-{layer[0]}")
         for model, C in WIDTHS.items() for dtype in DTYPES for layer in vit_linears(C)]


@pytest.mark.benchmark(group="linear", timer=sync_timer)
@pytest.mark.parametrize("impl", ["vitfast", "triton", "persistent", "tma", "cublas", "eager"])
@pytest.mark.parametrize("C,dtype,layer", CASES)
def test_linear(benchmark, C, dtype, layer, impl):
    name, K, N, act, res = layer
    fns = linear_impls(act)
    if impl not in fns:
        pytest.skip("the Triton kernels need an NVIDIA GPU (TMA: compute capability >= 9)")
    fn, args = fns[impl], make_linear(K, N, res, dtype)
    fn(*args)   # compile / autotune / dispatch decision outside the timed rounds
    benchmark(fn, *args)
    benchmark.extra_info["TFLOP/s"] = tflops(2.0 * M * N * K, benchmark.stats.stats.median * 1e3)


@pytest.mark.benchmark(group="linear-mlp", timer=sync_timer)
@pytest.mark.parametrize("impl", sorted(MLP_IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("model,C", list(WIDTHS.items()))
def test_mlp(benchmark, model, C, dtype, impl):
    fn, args = MLP_IMPLS[impl], make_mlp(C, dtype)
    fn(*args)
    benchmark(fn, *args)
    benchmark.extra_info["TFLOP/s"] = tflops(4.0 * M * C * 4 * C, benchmark.stats.stats.median * 1e3)


if __name__ == "__main__":
    main()
