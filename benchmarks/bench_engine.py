"""Batch inference throughput: `InferenceEngine` vs a plain loop over `model(x)`, same batch size.

    python benchmarks/bench_engine.py                      # table (GPU: ViT-B/16, bf16, batch 256)
    pytest benchmarks/bench_engine.py --benchmark-only     # pytest-benchmark

Input: synthetic uint8 images [N, 3, S, S] in (pageable) host memory, N = several batches, as a
data loader hands them over. Methods, timed in the same run with `vitfast.timing.bench`
(one call = all N images, results on the device):
    engine          InferenceEngine.run(host uint8): pinned staging, side-stream H2D overlapped with
                    compute, normalisation in the patch-embed kernel, one CUDA graph per bucket
    engine-dev      InferenceEngine.run(device uint8): the same without the host copies
    loop            for each batch: x = batch.to(device); model((x / 255 - mean) / std) — the plain loop
    model-only      model(x) on one device-resident normalised batch, times N / batch: the compute
                    ceiling (the figure `vitfast bench` reports); engine / model-only is the pipeline's
                    efficiency
Without CUDA a tiny CPU run (the Triton kernels need an NVIDIA GPU; on CPU vitfast's ops run the
reference math): it checks the plumbing, its numbers say nothing about a GPU.
"""

from __future__ import annotations

from datetime import date

import pytest
import torch

import vitfast
from vitfast import reference
from vitfast.data import IMAGENET_MEAN, IMAGENET_STD
from vitfast.engine import InferenceEngine
from vitfast.timing import bench

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    MODEL, KWARGS, DTYPE, BATCH, N_BATCHES = "vit_base_patch16_224", {}, torch.bfloat16, 256, 8
else:
    MODEL, DTYPE, BATCH, N_BATCHES = "vit_tiny_patch16_224", torch.float32, 8, 4
    KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
METHODS = ["engine", "engine-dev", "loop", "model-only"]


def build(device: str):
    """model (in DTYPE on device), host uint8 images [N, 3, S, S], and the methods (name -> fn())."""
    torch.manual_seed(0)
    model = vitfast.create_model(MODEL, **KWARGS).eval()
    S = model.patch_embed.img_size[0]
    host = torch.randint(0, 256, (BATCH * N_BATCHES, 3, S, S), dtype=torch.uint8)
    engine = InferenceEngine(model, BATCH, DTYPE, device)     # casts and moves the model
    dev = host.to(device)
    mean, std = torch.tensor(IMAGENET_MEAN, device=device), torch.tensor(IMAGENET_STD, device=device)
    one = reference.normalize_images(dev[:BATCH], mean, std, DTYPE)

    @torch.inference_mode()
    def loop():
        return [model(reference.normalize_images(b.to(device), mean, std, DTYPE)) for b in host.split(BATCH)]

    @torch.inference_mode()
    def model_only():
        return [model(one) for _ in range(N_BATCHES)]

    fns = {"engine": lambda: engine.run(host), "engine-dev": lambda: engine.run(dev), "loop": loop,
           "model-only": model_only}
    return model, host, fns


def main() -> None:
    device = "cuda" if HAS_CUDA else "cpu"
    if HAS_CUDA:
        print(f"# InferenceEngine on {torch.cuda.get_device_name()}, torch {torch.__version__}, {date.today()}")
    else:
        print("# No CUDA device: the Triton kernels, CUDA graphs and streams need an NVIDIA GPU. Tiny CPU run "
              f"(vitfast ops fall back to the reference math, {torch.get_num_threads()} threads); no GPU numbers.")
    model, host, fns = build(device)
    n = host.shape[0]
    print(f"# {MODEL} {KWARGS or ''} {str(DTYPE)[6:]}, batch {BATCH}, {n} images {tuple(host.shape[1:])} uint8")
    print(f"{'method':12} {'ms':>10} {'images/s':>10} {'vs loop':>8} {'vs model-only':>14}")
    times = {}
    for name, fn in fns.items():
        fn()                                    # warm-up: compilation, autotuning, graph capture
        times[name] = bench(fn, device=device, warmup_ms=500, rep_ms=2000)
    for name, ms in times.items():
        print(f"{name:12} {ms:10.2f} {n / ms * 1e3:10.1f} {times['loop'] / ms:7.2f}x "
              f"{times['model-only'] / ms:13.2f}x")


# --------------------------------------------------------------------------------------------
# pytest-benchmark: `pytest benchmarks/bench_engine.py --benchmark-only`
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_setup():
    return build("cuda" if HAS_CUDA else "cpu")


@pytest.mark.parametrize("method", METHODS)
def test_bench_engine(benchmark, bench_setup, method):
    model, host, fns = bench_setup
    fn = fns[method]
    sync = torch.cuda.synchronize if HAS_CUDA else (lambda: None)

    def run():
        out = fn()
        sync()
        return out

    run()
    benchmark.extra_info.update(model=MODEL, batch=BATCH, images=host.shape[0], dtype=str(DTYPE))
    out = benchmark(run)
    out = torch.cat(out) if isinstance(out, list) else out
    assert out.shape[-1] == model.num_classes and torch.isfinite(out).all()


if __name__ == "__main__":
    main()
