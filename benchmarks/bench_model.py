"""End-to-end ViT forward: vitfast vs the reference, eager PyTorch on its fused ops and torch.compile.

    python benchmarks/bench_model.py                      # table (GPU: ViT-B/16, 224 px, bf16, batch 256)
    pytest benchmarks/bench_model.py --benchmark-only     # pytest-benchmark

The backends are those of `vitfast bench` (vitfast/bench.py builds them; see its docstring):
reference, torch, timm (GPU, where installed), compile (GPU), vitfast (CUDA graphs on a GPU),
vitfast-eager (GPU).
`main()` is the sweep's single-configuration case without the per-op timings; run `vitfast bench`
for patch sizes 32 -> 8 and the attention study. Without CUDA a tiny CPU run (ViT-Ti, batch 2):
the Triton kernels need an NVIDIA GPU, so its numbers say nothing about them.
"""

from __future__ import annotations

import sys

import pytest
import torch

from vitfast import bench, reference
from vitfast.testing import FLOOR, rel_err

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
if HAS_CUDA:
    SIZE, IMAGE, PATCH, BATCH, DTYPE = "base", 224, 16, 256, torch.bfloat16
else:
    SIZE, IMAGE, PATCH, BATCH, DTYPE = "tiny", 224, 16, 2, torch.float32
BACKENDS = ["reference", "torch", "vitfast"] + (["vitfast-eager"] if HAS_CUDA else [])


def main(argv=None) -> int:
    args = ["--image-sizes", str(IMAGE), "--patch-sizes", str(PATCH), "--batch-size", str(BATCH), "--no-kernels",
            "--out", "bench-results/model", *(sys.argv[1:] if argv is None else argv)]
    return bench.main(args)


# ------------------------------------------------------------------------------ pytest-benchmark
@pytest.fixture(scope="module")
def setup():
    """Weights shared by every backend, one input batch, the reference's logits in DTYPE and in fp32
    (the truth the low-precision outputs are measured against)."""
    spec = bench.spec_for(SIZE)
    cfg = bench.Config(IMAGE, PATCH, BATCH)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        ref = reference.VisionTransformer(**spec.kwargs(cfg)).eval()
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, device=DEVICE, dtype=DTYPE)
    with torch.inference_mode():
        ref32 = ref(x.float())
    ref = ref.to(DTYPE)                  # outside inference_mode: the weights stay normal tensors
    with torch.inference_mode():
        expected = ref(x)
    return spec, cfg, ref.state_dict(), x, expected, ref32


@pytest.mark.benchmark(group="model")
@pytest.mark.parametrize("backend", BACKENDS)
def test_model(benchmark, setup, backend):
    spec, cfg, state, x, expected, ref32 = setup
    with torch.no_grad():
        fn = bench.build_model_backend(backend, spec, cfg, state, DEVICE, DTYPE)
    benchmark.extra_info.update(model=SIZE, image=IMAGE, patch=PATCH, tokens=cfg.tokens, batch=BATCH,
                                dtype=str(DTYPE), device=torch.cuda.get_device_name() if HAS_CUDA else "cpu")
    with torch.inference_mode():
        out = benchmark(fn, x)
    if benchmark.stats is not None:      # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median
    if DTYPE == torch.float32:           # the reference's logits (~1e-6 apart)
        assert rel_err(out, expected) < 1e-5
    else:                                # DESIGN.md §4: within 2x the reference's own error in DTYPE
        assert rel_err(out, ref32) <= 2 * rel_err(expected, ref32) + FLOOR[DTYPE]


if __name__ == "__main__":
    sys.exit(main())
