"""Batch inference by stage: how fast images are read, decoded and resized, and whether that keeps the model fed.

On a generated folder of photo-like JPEGs at two sizes, ImageNet's (500x375) and a phone's (4000x3000,
12 MP), in one process:
  cpu exact     images/s per core of `load_image(..., exact=True)` (timm's eval transform: full decode,
                bicubic resize, center crop), split into read / decode / resize
  cpu fast      the same for the default path (reduced-scale JPEG decode, reducing_gap), its speed-up
                over exact, and its pixel distance from exact (mean |diff|, 99th percentile, max)
  gpu decode    with CUDA and torchvision: batched nvJPEG decode + the GPU resize, images/s
  pipeline      with CUDA: `vitfast predict --profile` on the folder (ViT-B/16 bf16, batch 256, random
                weights) per decode path, against the engine alone on synthetic uint8 batches

    python benchmarks/bench_decode.py [--images 24] [--big-images 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch

from vitfast import data
from vitfast.testing import photo

SIZES = {"imagenet": (500, 375), "12mp": (4000, 3000)}


def make_folder(root: Path, kind: str, n: int) -> list[str]:
    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    w, h = SIZES[kind]
    paths = []
    for i in range(n):
        path = folder / f"{kind}_{i:04d}.jpg"
        photo(w, h, seed=i).save(path, quality=90)
        paths.append(str(path))
    return paths


def cpu_stages(paths: list[str], exact: bool, img_size: int = 224) -> dict:
    """One core (this process, one torch thread): seconds per stage and images/s over `paths`."""
    ds = data.ImageDataset(paths, img_size, exact=exact)
    seconds = np.zeros(3)
    t0 = time.perf_counter()
    for i in range(len(ds)):
        _, _, err, s = ds[i]
        assert not err, err
        seconds += s
    wall = time.perf_counter() - t0
    return {"images_per_s": len(paths) / wall, **{f"{k}_s": float(v) for k, v in zip(data.WORKER_STAGES, seconds)},
            "wall_s": wall}


def pixel_distance(paths: list[str], img_size: int = 224) -> dict:
    d = torch.cat([(data.load_image(p, img_size).int() - data.load_image(p, img_size, exact=True).int()).abs()
                   .flatten() for p in paths]).float()
    return {"mean_abs": d.mean().item(), "p99": d.quantile(0.99).item() if d.numel() <= 16_000_000 else None,
            "max": d.max().item()}


def gpu_decode_rate(paths: list[str], batch: int = 64, img_size: int = 224) -> float:
    datas = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    run = lambda: [data.resize_crop(img, img_size) for img in data.decode_jpegs(datas[:batch], "cuda")]
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        run()
    torch.cuda.synchronize()
    return reps * min(batch, len(datas)) / (time.perf_counter() - t0)


def pipeline(folder: Path, decode: str, ckpt: str) -> dict:
    from vitfast import predict

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = predict.main([str(folder), "--model", "vit_base_patch16_224", "--checkpoint", ckpt, "--batch-size", "256",
                           "--output", str(folder.parent / f"preds-{decode}.jsonl"), "--decode", decode,
                           "--profile", "--no-progress"])
    text = err.getvalue()
    m = re.search(r"images in [\d.]+ s = ([\d.]+) images/s", text)
    bound = re.search(r"bounded by: (.+)", text)
    return {"rc": rc, "images_per_s": float(m.group(1)) if m else None,
            "bounded_by": bound.group(1) if bound else None, "profile": text.strip().splitlines()[-12:]}


def engine_rate(ckpt: str, n: int = 2048) -> float:
    from vitfast.engine import InferenceEngine, load_model

    engine = InferenceEngine(load_model("vit_base_patch16_224", ckpt), 256)
    u8 = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8)
    engine.run(u8[:512])                                             # eager, capture, compile, tune
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.run(u8)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24, help="ImageNet-size JPEGs (default 24)")
    p.add_argument("--big-images", type=int, default=6, help="12-MP JPEGs (default 6)")
    p.add_argument("--pipeline-images", type=int, default=2048,
                   help="JPEGs for the CUDA pipeline run (ImageNet size; default 2048)")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = {"date": datetime.date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
              "pillow": PIL.__version__, "sets": {}}
    lines = [f"# bench_decode: {result['date']}, Pillow {PIL.__version__}, torch {torch.__version__}, "
             f"{result['cores']} cores; 224 px, crop 0.9; one core per row", "",
             "| set | path | images/s/core | read s | decode s | resize s | speed-up | mean abs | p99 | max |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind, n in (("imagenet", args.images), ("12mp", args.big_images)):
            paths = make_folder(root, kind, n)
            exact, fast = cpu_stages(paths, exact=True), cpu_stages(paths, exact=False)
            dist = pixel_distance(paths)
            speedup = fast["images_per_s"] / exact["images_per_s"]
            result["sets"][kind] = {"size": SIZES[kind], "n": n, "exact": exact, "fast": fast,
                                    "speedup": speedup, "pixels": dist}
            for name, r in (("exact", exact), ("fast", fast)):
                tail = (f"{speedup:.2f}x | {dist['mean_abs']:.3f} | {dist['p99']} | {dist['max']:.0f} |"
                        if name == "fast" else "1.00x | | | |")
                lines.append(f"| {kind} {SIZES[kind][0]}x{SIZES[kind][1]} | {name} | {r['images_per_s']:.1f} | "
                             f"{r['read_s']:.3f} | {r['decode_s']:.3f} | {r['resize_s']:.3f} | {tail}")
        if torch.cuda.is_available() and data.gpu_decode_available():
            torch.set_num_threads(os.cpu_count() or 1)
            result["gpu"] = torch.cuda.get_device_name()
            for kind in SIZES:
                paths = sorted(str(p) for p in (root / kind).iterdir())
                result["sets"][kind]["gpu_decode_images_per_s"] = gpu_decode_rate(paths)
            lines += ["", f"GPU decode ({result['gpu']}, nvJPEG + resize, batch 64): " + ", ".join(
                f"{k} {result['sets'][k]['gpu_decode_images_per_s']:.0f} images/s" for k in SIZES)]
            from safetensors.torch import save_file

            from vitfast.model import create_model
            ckpt = str(root / "vit_b16.safetensors")
            save_file({k: v.contiguous() for k, v in create_model("vit_base_patch16_224").state_dict().items()}, ckpt)
            folder = root / "pipeline"
            make_folder(root, "pipeline", args.pipeline_images)
            engine = engine_rate(ckpt)
            result["pipeline"] = {"engine_synthetic_images_per_s": engine,
                                  **{d: pipeline(folder, d, ckpt) for d in ("cpu", "gpu")}}
            lines += ["", f"Pipeline (ViT-B/16 bf16, batch 256, {args.pipeline_images} ImageNet-size JPEGs): engine on "
                      f"synthetic uint8 {engine:.0f} images/s"]
            for d in ("cpu", "gpu"):
                r = result["pipeline"][d]
                ratio = None if r["images_per_s"] is None else r["images_per_s"] / engine
                lines.append(f"- predict --decode {d}: {r['images_per_s']} images/s"
                             f" ({'' if ratio is None else f'{ratio:.2f}x the engine, '}bounded by {r['bounded_by']})")
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "markdown": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
