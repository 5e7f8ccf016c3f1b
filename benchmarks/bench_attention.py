"""Attention forward: vitfast's flash-style kernel vs every SDPA backend and eager attention.

    python benchmarks/bench_attention.py                      # table (GPU: the shapes below)
    pytest benchmarks/bench_attention.py --benchmark-only     # pytest-benchmark, a few shapes

Methods, all timed in the same run with `vitfast.timing.bench` on q, k, v [B, H, N, D]:
    vitfast          vitfast.ops.attention
    vitfast-qkv      vitfast.ops.attention_qkv on the packed [B, N, 3·C] projection (writes [B, N, C])
    sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math
                     F.scaled_dot_product_attention pinned to one backend (torch.nn.attention.sdpa_kernel);
                     a backend that refuses a shape / dtype is reported as skipped
    eager            vitfast.reference.attention: matmul, softmax, matmul (N×N scores in memory)
Shapes: token counts of ViTs at 224 px (patch 32/16/14/8 -> N = 50, 197, 257, 785) and at
384 / 512 px (patch 16/8 -> 577, 2305, 1025, 4097), heads of ViT-B (12 × 64) and ViT-H (16 × 80),
bf16 and fp16. Batch 256 up to 257 tokens, then B·N held near 65536 to bound eager's N² memory.
TFLOP/s counts 4·B·H·N²·D flops (two GEMMs). The slope is the fitted exponent of time per
(image·head) vs N: numpy.polyfit(log N, log(ms / (B·H)), 1) — 2 means fully quadratic.
Without CUDA a tiny CPU run compares the reference paths only: the Triton kernel needs an NVIDIA GPU.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitfast import ops, reference
from vitfast.timing import bench, rotating_inputs, tflops

HAS_CUDA = torch.cuda.is_available()
TOKENS = [50, 197, 257, 577, 785, 1025, 2305, 4097]
HEADS = {"ViT-B": (12, 64), "ViT-H": (16, 80)}
DTYPES = [torch.bfloat16, torch.float16]
SDPA_BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
CPU_TOKENS = [50, 197]
CPU_HEADS = {"ViT-Ti": (3, 64)}
CPU_DTYPES = [torch.float32]


def batch_for(n: int, cuda: bool = HAS_CUDA) -> int:
    if not cuda:
        return 2
    return 256 if n <= 257 else max(4, 65536 // n)


def attention_flops(B: int, H: int, N: int, D: int) -> float:
    return 4.0 * B * H * N * N * D


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, qkv):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def methods() -> dict:
    """name -> fn(q, k, v, qkv): every attention implementation in the comparison."""
    table = {
        "vitfast": lambda q, k, v, qkv: ops.attention(q, k, v),
        "vitfast-qkv": lambda q, k, v, qkv: ops.attention_qkv(qkv, q.shape[1]),
    }
    for name in SDPA_BACKENDS:
        table["sdpa-" + name.split("_")[0].lower()] = _sdpa(name)
    table["eager"] = lambda q, k, v, qkv: reference.attention(q, k, v)
    return table


def make_inputs(B: int, H: int, N: int, D: int, dtype: torch.dtype, device: str):
    """Random q, k, v [B, H, N, D] (contiguous) and a packed qkv [B, N, 3·H·D] of the same size."""
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype)
    return q, k, v, qkv


def measure(B: int, H: int, N: int, D: int, dtype: torch.dtype, device: str) -> dict:
    """ms of every method on one shape; None where a method refuses it (or runs out of memory)."""
    sets = rotating_inputs(lambda: make_inputs(B, H, N, D, dtype, device))
    times = {}
    for name, fn in methods().items():
        try:
            fn(*sets[0])
            times[name] = bench(fn, sets, device=device)
        except (RuntimeError, ValueError, NotImplementedError) as e:   # backend refuses the shape, or OOM
            times[name] = None
            if "out of memory" in str(e) and device == "cuda":
                torch.cuda.empty_cache()
    del sets
    return times


def slope(ns: list[int], ms_per_bh: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(ms_per_bh), 1)[0])


def main() -> None:
    device = "cuda" if HAS_CUDA else "cpu"
    if HAS_CUDA:
        print(f"# attention forward on {torch.cuda.get_device_name()}, torch {torch.__version__}, {date.today()}")
        tokens, heads, dtypes = TOKENS, HEADS, DTYPES
    else:
        print("# No CUDA device: the Triton attention kernel needs an NVIDIA GPU. Tiny CPU run of the "
              "reference paths only (vitfast.ops falls back to the eager math on CPU); no GPU numbers here.")
        tokens, heads, dtypes = CPU_TOKENS, CPU_HEADS, CPU_DTYPES
    names = list(methods())
    print(f"{'model':7} {'dtype':9} {'N':>5} {'B':>4} " + " ".join(f"{n:>16}" for n in names)
          + f" {'speedup vs best sdpa':>20}")
    print(" " * 29 + " ".join(f"{'ms  TFLOP/s':>16}" for _ in names))
    series: dict[tuple, list] = {}
    for model, (H, D) in heads.items():
        for dtype in dtypes:
            for N in tokens:
                B = batch_for(N)
                times = measure(B, H, N, D, dtype, device)
                flops = attention_flops(B, H, N, D)
                cells = [f"{t:8.3f} {tflops(flops, t):7.1f}" if t else f"{'skipped':>16}" for t in times.values()]
                sdpa = [t for n, t in times.items() if n.startswith("sdpa-") and t]
                best = f"{min(sdpa) / times['vitfast']:19.2f}x" if sdpa and times["vitfast"] else f"{'-':>20}"
                print(f"{model:7} {str(dtype)[6:]:9} {N:5d} {B:4d} " + " ".join(cells) + f" {best}")
                for name, t in times.items():
                    if t:
                        series.setdefault((model, str(dtype)[6:], name), []).append((N, t / (B * H)))
    print("\n# log-log slope of time per (image·head) vs N")
    for (model, dt, name), pts in series.items():
        if len(pts) >= 2:
            ns, ts = zip(*pts)
            print(f"{model:7} {dt:9} {name:16} {slope(list(ns), list(ts)):5.2f}  (N = {ns[0]}..{ns[-1]})")


# --------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/bench_attention.py --benchmark-only`
# --------------------------------------------------------------------------------------------
BENCH_SHAPES = [(197, "ViT-B"), (4097, "ViT-B"), (257, "ViT-H")] if HAS_CUDA else [(50, "ViT-Ti")]


@pytest.mark.parametrize("method", ["vitfast", "vitfast-qkv", "sdpa-flash", "sdpa-cudnn", "eager"])
@pytest.mark.parametrize("N,model", BENCH_SHAPES)
def test_bench_attention(benchmark, N, model, method):
    device = "cuda" if HAS_CUDA else "cpu"
    H, D = {**HEADS, **CPU_HEADS}[model]
    B = batch_for(N)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    args = make_inputs(B, H, N, D, dtype, device)
    fn = methods()[method]
    try:
        fn(*args)
    except (RuntimeError, ValueError, NotImplementedError) as e:
        pytest.skip(f"{method} refuses {model} N={N} {dtype}: {e}")
    sync = torch.cuda.synchronize if HAS_CUDA else (lambda: None)

    def run():
        out = fn(*args)
        sync()
        return out

    benchmark.extra_info.update(B=B, H=H, N=N, D=D, dtype=str(dtype))
    out = benchmark(run)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()


if __name__ == "__main__":
    main()
