"""Packed images: vitfast's varlen attention vs the two ways Hugging Face's packed vision towers attend.

    python benchmarks/bench_varlen.py                      # table (GPU: the shapes below)
    pytest benchmarks/bench_varlen.py --benchmark-only     # pytest-benchmark, one shape

Qwen2-VL / Qwen2.5-VL / Qwen3-VL and Pixtral (Mistral Small 3.1) pack the patches of several images into one
sequence [1, T, 3·C] (the qkv projection), each image attending within itself. Methods, all timed in the same run
with `vitfast.timing.bench` on one packed qkv and its cu_seqlens:
    vitfast-varlen     vitfast.ops.attention_qkv(qkv, H, cu_seqlens=..., max_seqlen=...): one launch, each
                       image's n² scores only (on CPU tensors: SDPA per image)
    sdpa-per-image     HF's Qwen-VL towers under sdpa: q, k, v split per image, F.scaled_dot_product_attention on
                       each, concatenated (one launch per image)
    sdpa-block-mask    HF's Pixtral under sdpa: one F.scaled_dot_product_attention over all T tokens with a dense
                       [T, T] block-diagonal additive mask (built once here, outside the timing; HF builds it per
                       forward): all T² scores computed, the off-block ones masked
TFLOP/s counts the useful flops, 4·H·D·Σ n² (two GEMMs per image). Without CUDA a small fp32 CPU run.
"""

from __future__ import annotations

import itertools
from datetime import date

import pytest
import torch
import torch.nn.functional as F

from vitfast import ops
from vitfast.timing import bench, rotating_inputs, tflops

HAS_CUDA = torch.cuda.is_available()
# name -> (heads, head dim): Pixtral-12B's / Mistral Small 3.1's tower (1024 = 16 x 64), Qwen2-VL's (1280 = 16 x 80)
HEADS = {"Pixtral": (16, 64), "Qwen2-VL": (16, 80)}
# name -> tokens per image: four 1024 x 1024 images at patch 16; images of mixed sizes; sixteen 448 x 448 tiles
IMAGES = {"4 x 1024 px": [4096] * 4, "mixed": [4096, 2048, 1024, 256, 256], "16 x 448 px": [784] * 16}
CPU_HEADS = {"tiny": (3, 64)}
CPU_IMAGES = {"3 images": [256, 64, 144], "8 x 64": [64] * 8}


def make_inputs(segments: list[int], H: int, D: int, dtype: torch.dtype, device: str):
    """qkv [1, T, 3·H·D] and its int32 cu_seqlens."""
    qkv = torch.randn(1, sum(segments), 3 * H * D, device=device, dtype=dtype)
    cu = torch.tensor([0, *itertools.accumulate(segments)], device=device, dtype=torch.int32)
    return qkv, cu


def split_heads(qkv: torch.Tensor, H: int):
    """[1, T, 3·H·D] -> q, k, v [1, H, T, D] (views), as HF's towers reshape their projections."""
    T = qkv.shape[1]
    return qkv.view(1, T, 3, H, -1).permute(2, 0, 3, 1, 4).unbind(0)


def block_mask(segments: list[int], dtype: torch.dtype, device: str) -> torch.Tensor:
    """HF Pixtral's `generate_block_attention_mask`: [1, 1, T, T], 0 within an image, dtype's min elsewhere."""
    T = sum(segments)
    mask = torch.full((T, T), torch.finfo(dtype).min, dtype=dtype, device=device)
    start = 0
    for n in segments:
        mask[start:start + n, start:start + n] = 0
        start += n
    return mask[None, None]


def methods(segments: list[int], H: int, mask: torch.Tensor) -> dict:
    """name -> fn(qkv, cu) -> [1, T, C] for one set of images (each as its tower then feeds its output
    projection)."""
    lengths, longest = list(segments), max(segments)

    def per_image(qkv, cu):                     # as HF's Qwen-VL towers: each image's [1, n, C], concatenated
        q, k, v = split_heads(qkv, H)
        parts = [F.scaled_dot_product_attention(*(t.narrow(2, s, n) for t in (q, k, v))).transpose(1, 2)
                 for s, n in zip(itertools.accumulate([0, *lengths[:-1]]), lengths)]
        return torch.cat(parts, dim=1).reshape(1, qkv.shape[1], -1)

    def with_mask(qkv, cu):                     # as HF's Pixtral: then [1, T, C] for o_proj
        q, k, v = split_heads(qkv, H)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(1, qkv.shape[1], -1)

    return {"vitfast-varlen": lambda qkv, cu: ops.attention_qkv(qkv, H, cu_seqlens=cu, max_seqlen=longest),
            "sdpa-per-image": per_image, "sdpa-block-mask": with_mask}


def measure(segments: list[int], H: int, D: int, dtype: torch.dtype, device: str) -> dict:
    """ms of every method; None where one fails (out of memory, a refused shape)."""
    sets = rotating_inputs(lambda: make_inputs(segments, H, D, dtype, device))
    mask = block_mask(segments, dtype, device)
    times = {}
    for name, fn in methods(segments, H, mask).items():
        try:
            fn(*sets[0])
            times[name] = bench(fn, sets, device=device)
        except (RuntimeError, ValueError) as e:
            times[name] = None
            if "out of memory" in str(e) and device == "cuda":
                torch.cuda.empty_cache()
    del sets, mask
    return times


def main() -> None:
    device = "cuda" if HAS_CUDA else "cpu"
    if HAS_CUDA:
        heads, images, dtype = HEADS, IMAGES, torch.bfloat16
        where = f"{torch.cuda.get_device_name()}, bf16"
    else:
        heads, images, dtype = CPU_HEADS, CPU_IMAGES, torch.float32
        where = "CPU (no CUDA: vitfast runs SDPA per image there), fp32"
    print(f"# packed images, attention forward on {where}, torch {torch.__version__}, {date.today()}")
    names = ["vitfast-varlen", "sdpa-per-image", "sdpa-block-mask"]
    print(f"{'heads':9} {'images':12} {'T':>6} " + " ".join(f"{n:>17}" for n in names)
          + f" {'vs per-image':>13} {'vs block mask':>14}")
    for (model, (H, D)), (label, segments) in itertools.product(heads.items(), images.items()):
        times = measure(segments, H, D, dtype, device)
        flops = 4.0 * H * D * sum(n * n for n in segments)
        cells = [f"{t:8.3f} {tflops(flops, t):8.2f}" if t else f"{'failed':>17}" for t in times.values()]
        mine = times["vitfast-varlen"]
        ratios = [f"{times[n] / mine:12.2f}x" if mine and times[n] else f"{'-':>13}"
                  for n in ("sdpa-per-image", "sdpa-block-mask")]
        print(f"{model:9} {label:12} {sum(segments):6d} " + " ".join(cells) + " " + " ".join(ratios))
    print("(cells: ms, TFLOP/s of the useful flops; the ratios: the method's time / vitfast-varlen's)")


# --------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/bench_varlen.py --benchmark-only`
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vitfast-varlen", "sdpa-per-image", "sdpa-block-mask"])
def test_bench_varlen(benchmark, method):
    device = "cuda" if HAS_CUDA else "cpu"
    (H, D), segments = (HEADS["Pixtral"], IMAGES["mixed"]) if HAS_CUDA else (CPU_HEADS["tiny"],
                                                                            CPU_IMAGES["3 images"])
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    qkv, cu = make_inputs(segments, H, D, dtype, device)
    fns = methods(segments, H, block_mask(segments, dtype, device))
    out = benchmark(fns[method], qkv, cu)
    ref = fns["sdpa-per-image"](qkv, cu)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


if __name__ == "__main__":
    main()
