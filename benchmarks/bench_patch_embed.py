"""Patch embedding: vitfast.ops.patch_embed vs the eager sequence it replaces and vs torch.compile of it.

The eager sequence (timm's PatchEmbed + _pos_embed, normalisation first for uint8 batches):
    normalise -> Conv2d -> flatten -> transpose -> cat(cls) -> + pos_embed
Shapes with CUDA: ViT-B (D = 768), batch 256, P in {32, 16, 8}, 224 and 384 px, bf16 and uint8
input (uint8 normalised with ImageNet mean/std), bf16 compute. GB/s counts image + weight +
output bytes; TFLOP/s counts 2·B·N·K·D. Without CUDA: a tiny CPU smoke run of the same table.

    python benchmarks/bench_patch_embed.py                         # table
    pytest benchmarks/bench_patch_embed.py --benchmark-only        # pytest-benchmark
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitfast import ops, reference
from vitfast.testing import rel_err
from vitfast.timing import bench, gbps, rotating_inputs, sync_timer, tflops

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
if HAS_CUDA:
    BATCH, DIM = 256, 768
    CONFIGS = [(P, px) for P in (32, 16, 8) for px in (224, 384)]   # (patch size, image side)
else:
    BATCH, DIM = 2, 64
    CONFIGS = [(16, 32), (8, 32)]
KINDS = ("bf16", "uint8")           # image dtype; compute dtype is bf16
IMPLS = ("eager", "compile", "vitfast") if HAS_CUDA else ("eager", "vitfast")   # eager first: the speed-up base


def eager_patch_embed(images, weight, bias, cls_token, pos_embed, mean, std):
    """The eager sequence vitfast.ops.patch_embed replaces. -> tokens [B, 1 + N, D]"""
    P = weight.shape[-1]
    x = reference.normalize_images(images, mean, std, weight.dtype) if images.dtype == torch.uint8 else images
    x = F.conv2d(x, weight, bias, stride=P).flatten(2).transpose(1, 2)               # (B, N, D)
    x = torch.cat([cls_token.expand(x.shape[0], -1, -1), x], dim=1)                  # (B, 1 + N, D)
    return x + pos_embed


def vitfast_patch_embed(images, weight, bias, cls_token, pos_embed, mean, std):
    return ops.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)


def make_inputs(kind: str, P: int, px: int, batch: int = BATCH, dim: int = DIM):
    dt = torch.bfloat16
    if kind == "uint8":
        images = torch.randint(0, 256, (batch, 3, px, px), dtype=torch.uint8, device=DEVICE)
        mean, std = torch.tensor(MEAN, device=DEVICE), torch.tensor(STD, device=DEVICE)
    else:
        images = torch.randn(batch, 3, px, px, device=DEVICE, dtype=dt)
        mean = std = None
    T = 1 + (px // P) ** 2
    weight = torch.randn(dim, 3, P, P, device=DEVICE, dtype=dt) * (3 * P * P) ** -0.5
    bias = torch.randn(dim, device=DEVICE, dtype=dt)
    cls_token = torch.randn(1, 1, dim, device=DEVICE, dtype=dt)
    pos_embed = torch.randn(1, T, dim, device=DEVICE, dtype=dt) * 0.02
    return images, weight, bias, cls_token, pos_embed, mean, std


def traffic(kind: str, P: int, px: int, batch: int = BATCH, dim: int = DIM) -> tuple[float, float]:
    """(bytes moved at minimum: image + weight + output, flops 2·B·N·K·D)."""
    n, k = (px // P) ** 2, 3 * P * P
    img_bytes = batch * 3 * px * px * (1 if kind == "uint8" else 2)
    nbytes = img_bytes + dim * k * 2 + batch * (1 + n) * dim * 2
    return nbytes, 2.0 * batch * n * k * dim


def implementation(name: str):
    if name == "vitfast":
        return vitfast_patch_embed
    if name == "eager":
        return eager_patch_embed
    torch._dynamo.reset()   # a fresh compile per shape, no recompile limit in the way
    return torch.compile(eager_patch_embed, dynamic=False)


@pytest.mark.benchmark(group="patch_embed", timer=sync_timer)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("P,px", CONFIGS)
def test_patch_embed(benchmark, P, px, kind, impl):
    fn, args = implementation(impl), make_inputs(kind, P, px)
    nbytes, flops = traffic(kind, P, px)
    benchmark.extra_info.update(P=P, px=px, batch=BATCH, dim=DIM, input=kind, nbytes=nbytes, flops=flops)
    benchmark(fn, *args)


def main():
    name = torch.cuda.get_device_name() if HAS_CUDA else "CPU"
    print(f"patch_embed on {name}, torch {torch.__version__}: batch {BATCH}, D {DIM}, bf16 compute, "
          f"CLS + pos_embed")
    if not HAS_CUDA:
        print("No CUDA device: the Triton kernels need an NVIDIA GPU. This tiny CPU run times the reference "
              "path (vitfast) against eager conv, as a smoke test only; torch.compile is not run.")
    head = (f"{'P':>3} {'px':>4} {'input':>6} {'impl':>8} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8} {'x eager':>8} "
            f"{'vs eager':>9}")
    print(head)
    print("-" * len(head))
    for P, px in CONFIGS:
        for kind in KINDS:
            nbytes, flops = traffic(kind, P, px)
            sets = rotating_inputs(lambda kind=kind, P=P, px=px: make_inputs(kind, P, px))
            expect = eager_patch_embed(*sets[0])
            times = {}
            for impl in IMPLS:
                fn = implementation(impl)
                err = rel_err(fn(*sets[0]), expect)
                times[impl] = ms = bench(fn, sets, device=DEVICE)
                print(f"{P:>3} {px:>4} {kind:>6} {impl:>8} {ms:>9.3f} {gbps(nbytes, ms):>8.1f} "
                      f"{tflops(flops, ms):>8.2f} {times['eager'] / ms:>8.2f} "
                      f"{err:>9.2e}")
            del sets
            if HAS_CUDA:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
