"""Benchmark sweep (smoke version): reference ViT images/s over patch sizes on this machine."""

from __future__ import annotations

import argparse
import time

import torch

from vitfast import reference


def _time_ms(fn, warmup: int = 1, iters: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vitfast bench", description=__doc__)
    p.add_argument("--model-size", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--patch-sizes", default="32,16,8")
    args = p.parse_args(argv)
    dims = {"tiny": (192, 3), "small": (384, 6), "base": (768, 12)}[args.model_size]
    print(f"reference ViT-{args.model_size}, 224 px, batch {args.batch_size}, float32, {torch.get_num_threads()} "
          f"CPU threads (torch {torch.__version__})")
    print(f"{'patch':>5} {'tokens':>6} {'ms/batch':>9} {'images/s':>9}")
    for P in (int(s) for s in args.patch_sizes.split(",")):
        model = reference.VisionTransformer(patch_size=P, embed_dim=dims[0], num_heads=dims[1], depth=12).eval()
        x = torch.randn(args.batch_size, 3, 224, 224)
        with torch.inference_mode():
            ms = _time_ms(lambda m=model, x=x: m(x))
        print(f"{P:>5} {1 + (224 // P) ** 2:>6} {ms:>9.1f} {args.batch_size / ms * 1e3:>9.1f}")
    return 0
