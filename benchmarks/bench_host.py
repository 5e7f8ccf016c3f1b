"""Host cost: how long the CPU spends issuing one ViT forward, and one op, when nothing waits on the GPU.

At small batches a GPU forward is launch-bound: the host time of the ~87 op calls of a ViT-B forward,
not the kernels, sets its speed. Measured here:
  forward, eager    host time of one `vitfast.VisionTransformer` forward with its CUDA graphs off
                    (queued, not waited for: the clock stops when the call returns)
  forward, graphs   the same with its graphs on (argument copy, one replay, output clones)
  torch eager       the `torch` baseline of `vitfast bench` (timm-style eager PyTorch), for scale
  <op>              host time of one vitfast.ops call at the model's shapes, and of the torch call it
                    replaces (F.linear, SDPA, F.layer_norm)
  launcher <op>     vitfast's share of a Triton launch through the kernels' public launcher, which checks
                    its arguments and plans the launch on every call: up to Triton's JIT dispatch, the
                    kernel's autotuner included (the JIT function replaced by a stub that evaluates the
                    grid and returns). ViT-B/16 batch 2 shapes on any device (on a CPU too: nothing runs)
  steady <op>       the same for ops' Triton path at a layout it has seen, as in a model's forward:
                    one key, the cached plan, the output allocated, the autotuner's settled config
                    launched without the autotuner
  forward, Triton path, nothing launched
                    (without CUDA only) a whole eager ViT-B/16 forward down the Triton path on CPU
                    tensors with every launch stubbed as above: vitfast's host work per forward on a
                    GPU, less Triton's JIT dispatch and the CUDA launches (32 px images: the LayerNorms,
                    which do run, cost little)
  direct <op>, forward, Triton path, compiled, nothing run
                    (without CUDA only, Triton's compiler rather than its interpreter) the steady op and
                    the whole forward with Triton's real JIT function: kernels compiled for sm_90 and
                    launched directly once settled (`vitfast.kernels.DirectLaunch`), the launches
                    recorded and not run (`vitfast.testing.compile_only_triton`): a GPU host's cost
                    per op and per forward, less the CUDA launch calls themselves
  jit <op>, forward, ..., JIT function per launch
                    the same with the direct launch turned off: every launch through Triton's JIT
                    function (binding, specialization, cache key), as before it existed
ViT-B/16, bf16, batch 1 on a GPU (the issue's goal there: eager forward <= 1 ms, about 10 µs per op).
Without CUDA a ViT-Ti in fp32: ops run synchronously on the CPU, so the columns hold compute too and
say only how much vitfast adds over the torch call (its dispatch cost).

    python benchmarks/bench_host.py [--json out.json] [--quick]   # table (--quick: 1/25 of the calls, a check
                                                                 # that it runs; its figures are noisier)
    pytest benchmarks/bench_host.py --benchmark-only   # pytest-benchmark (host clock)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from vitfast import ops, reference
from vitfast.graphs import CUDAGraphRunner
from vitfast.model import create_model
from vitfast.testing import MODEL_TOLERANCE, rel_err

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
MODEL, DTYPE, CALLS = ("vit_base_patch16_224", torch.bfloat16, 50) if HAS_CUDA else \
    ("vit_tiny_patch16_224", torch.float32, 10)


def host_ms(fn, calls: int = CALLS) -> float:
    """Median host milliseconds of fn(): the device drained before each call, the clock stopped when the
    call returns (the kernels it queued may still run)."""
    fn()
    times = []
    for _ in range(calls):
        if HAS_CUDA:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    if HAS_CUDA:
        torch.cuda.synchronize()
    return statistics.median(times)


def models():
    """(vitfast with graphs, the same weights eager, the torch baseline), in eval mode, inputs of batch 1."""
    torch.manual_seed(0)
    fast = create_model(MODEL).to(DEVICE, DTYPE).eval()
    eager = create_model(MODEL).to(DEVICE, DTYPE).eval()
    eager.load_state_dict(fast.state_dict())
    eager.cuda_graphs = CUDAGraphRunner(False)
    base = reference.create_model(MODEL).to(DEVICE, DTYPE).eval().use_torch_ops()
    base.load_state_dict(fast.state_dict())
    return fast, eager, base, torch.randn(1, 3, 224, 224, device=DEVICE, dtype=DTYPE)


def op_calls(model):
    """(name, vitfast call, torch call) at the model's shapes, batch 1."""
    blk, C = model.blocks[0], model.embed_dim
    x = torch.randn(1, 197, C, device=DEVICE, dtype=DTYPE)
    qkv = torch.randn(1, 197, 3 * C, device=DEVICE, dtype=DTYPE)
    w, b, n = blk.attn.qkv.weight, blk.attn.qkv.bias, blk.norm1
    H = blk.attn.num_heads
    return [
        ("linear qkv", lambda: ops.linear(x, w, b), lambda: reference.torch_linear(x, w, b)),
        ("attention_qkv", lambda: ops.attention_qkv(qkv, H), lambda: reference.torch_attention_qkv(qkv, H)),
        ("layer_norm", lambda: ops.layer_norm(x, n.weight, n.bias, n.eps),
         lambda: reference.torch_layer_norm(x, n.weight, n.bias, n.eps)),
    ]


class _NoLaunch:
    """Stands in for the JIT function under a kernel's autotuner: `run` evaluates the grid as Triton does
    before a launch, and launches nothing."""

    def run(self, *args, grid, warmup, **kwargs):
        return grid(kwargs) if callable(grid) else grid


def launch_us(calls: int = 20000) -> list[tuple[str, float]]:
    """(name, best of 5 rounds of `calls` calls, in µs per call) of vitfast's part of each Triton launch at
    ViT-B/16 shapes with batch 2, on DEVICE: everything up to Triton's JIT dispatch, the kernels' autotuners
    included (the JIT functions replaced by `_NoLaunch`; autotuning cut to one config, VITFAST_AUTOTUNE=quick).
    "launcher": the kernels' public launcher (validates and plans every call); "steady": ops' Triton path for
    a layout it has seen (plan looked up, the autotuner's settled config launched directly). Without CUDA
    also a whole forward down that path (in ms per forward, best of 5 rounds of calls / 400)."""
    import os

    from vitfast.kernels import attention as A
    from vitfast.kernels import linear as L
    from vitfast.kernels import patch_embed as P

    kernels = ops._kernels()
    d = dict(device=DEVICE, dtype=DTYPE)
    x, w, b = torch.randn(2, 197, 768, **d), torch.randn(2304, 768, **d), torch.randn(2304, **d)
    r, qkv = torch.randn(2, 197, 2304, **d), torch.randn(2, 197, 2304, **d)
    img, pw, pb = torch.randn(2, 3, 224, 224, **d), torch.randn(768, 3, 16, 16, **d), torch.randn(768, **d)
    cls, pos = torch.randn(1, 768, **d), torch.randn(197, 768, **d)
    calls_of = [("launcher linear (+ residual)", lambda: L.linear(x, w, b, residual=r)),
                ("steady linear (+ residual)", lambda: ops._linear_triton(x, w, b, None, r, None)),
                ("launcher attention_qkv", lambda: A.attention_qkv(qkv, 12, 0.125)),
                ("steady attention_qkv", lambda: ops._attention_qkv_triton(qkv, 12, 0.125, False, None, None)),
                ("launcher patch_embed", lambda: P.patch_embed(img, pw, pb, cls, pos)),
                ("steady patch_embed", lambda: ops._patch_embed_triton(img, pw, pb, cls, pos, None, None, True))]
    if not HAS_CUDA:
        # A whole eager ViT-B/16 forward down the Triton path on CPU tensors, 32 px images (5 tokens, so that
        # the LayerNorms, which do run, cost little): vitfast's host work per forward, nothing launched.
        tiny_images = create_model("vit_base_patch16_224", img_size=32).eval()
        tiny_images.cuda_graphs = CUDAGraphRunner(False)
        x32 = torch.randn(1, 3, 32, 32)
        calls_of.append(("forward, Triton path, nothing launched", lambda: tiny_images(x32)))
    tuners = (L._linear_kernel, L._linear_persistent_kernel, A._attention_fwd_kernel, P._patch_embed_kernel)
    saved = ([t.fn for t in tuners], ops._LINEAR_PATHS, ops._LINEAR_PLANS, ops._ATTENTION_PLANS,
             ops._PATCH_EMBED_PLANS, os.environ.get(kernels.AUTOTUNE_ENV))
    os.environ[kernels.AUTOTUNE_ENV] = "quick"
    # ops' path for the linear: the tiled Triton kernel (decided here, not timed: nothing runs)
    ops._LINEAR_PATHS = {ops._linear_key(x, w, b, None, r): "triton"} if x.is_cuda else {}
    ops._LINEAR_PLANS, ops._ATTENTION_PLANS, ops._PATCH_EMBED_PLANS = {}, {}, {}
    interpret, ops.INTERPRET = ops.INTERPRET, True      # CPU tensors take the Triton path (its launches stubbed)
    rows = []
    try:
        for t in tuners:
            t.fn = _NoLaunch()
        with torch.inference_mode():
            for name, fn in calls_of:
                n = calls if name.startswith(("launcher", "steady")) else calls // 400
                best = float("inf")
                for _ in range(5):
                    fn()
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    best = min(best, (time.perf_counter() - t0) / n * 1e6)
                rows.append((name, best if n == calls else best / 1e3))
    finally:
        ops.INTERPRET = interpret
        fns, ops._LINEAR_PATHS, ops._LINEAR_PLANS, ops._ATTENTION_PLANS, ops._PATCH_EMBED_PLANS, mode = saved
        for t, fn in zip(tuners, fns):
            t.fn = fn
        if mode is None:
            os.environ.pop(kernels.AUTOTUNE_ENV, None)
        else:
            os.environ[kernels.AUTOTUNE_ENV] = mode
    return rows


def direct_us(calls: int = 20000) -> list[tuple[str, float]]:
    """Without CUDA, and with Triton's compiler (not its interpreter): (name, best of 5 rounds, µs per call;
    the forward in ms) of ops' Triton path at a layout it has seen, Triton's JIT function and the direct
    launch of its compiled kernel included, under `vitfast.testing.compile_only_triton` (kernels compiled
    for sm_90, launches recorded, nothing run): what a GPU's host pays per op, less the CUDA launch itself.
    Then the same rows with the direct launch off ("jit"). The first calls compile (about a minute for the
    whole forward; Triton caches the kernels on disk)."""
    import os

    from vitfast.kernels import linear as L
    from vitfast.testing import compile_only_triton

    if HAS_CUDA or type(L._linear_kernel.fn).__name__ != "JITFunction":
        return []
    kernels = ops._kernels()
    d = dict(device=DEVICE, dtype=torch.bfloat16)
    x, w, b = torch.randn(2, 197, 768, **d), torch.randn(2304, 768, **d), torch.randn(2304, **d)
    r, qkv = torch.randn(2, 197, 2304, **d), torch.randn(2, 197, 2304, **d)
    img, pw, pb = torch.randn(2, 3, 224, 224, **d), torch.randn(768, 3, 16, 16, **d), torch.randn(768, **d)
    cls, pos = torch.randn(1, 1, 768, **d), torch.randn(1, 197, 768, **d)
    tiny_images = create_model("vit_base_patch16_224", img_size=32).eval()
    tiny_images.cuda_graphs = CUDAGraphRunner(False)
    x32 = torch.randn(1, 3, 32, 32)
    calls_of = [("direct linear (+ residual)", lambda: ops._linear_triton(x, w, b, None, r, None)),
                ("direct attention_qkv", lambda: ops._attention_qkv_triton(qkv, 12, 0.125, False, None, None)),
                ("direct patch_embed", lambda: ops._patch_embed_triton(img, pw, pb, cls, pos, None, None, True)),
                ("forward, Triton path, compiled, nothing run", lambda: tiny_images(x32))]
    saved = ops._LINEAR_PLANS, ops._ATTENTION_PLANS, ops._PATCH_EMBED_PLANS, os.environ.get(kernels.AUTOTUNE_ENV)
    os.environ[kernels.AUTOTUNE_ENV] = "quick"
    ops._LINEAR_PLANS, ops._ATTENTION_PLANS, ops._PATCH_EMBED_PLANS = {}, {}, {}
    interpret, ops.INTERPRET = ops.INTERPRET, True      # CPU tensors take the Triton path (compiled, not run)
    rows, direct_of = [], kernels.DirectLaunch.of
    try:
        with compile_only_triton(), torch.inference_mode():
            for stage in ("direct", "jit"):
                if stage == "jit":                       # the same, every launch through the JIT function
                    kernels.DirectLaunch.of = classmethod(lambda cls, *args: None)
                    ops._LINEAR_PLANS, ops._ATTENTION_PLANS, ops._PATCH_EMBED_PLANS = {}, {}, {}
                for name, fn in calls_of:
                    n = calls if name.startswith("direct") else calls // 400
                    for _ in range(3):
                        fn()                             # compile, tune (one config), settle
                    best = float("inf")
                    for _ in range(5):
                        t0 = time.perf_counter()
                        for _ in range(n):
                            fn()
                        best = min(best, (time.perf_counter() - t0) / n * 1e6)
                    name = name if stage == "direct" else name.replace("direct", "jit").replace(
                        "compiled", "compiled, JIT function per launch")
                    rows.append((name, best if n == calls else best / 1e3))
    finally:
        kernels.DirectLaunch.of = direct_of
        ops.INTERPRET = interpret
        ops._LINEAR_PLANS, ops._ATTENTION_PLANS, ops._PATCH_EMBED_PLANS, mode = saved
        if mode is None:
            os.environ.pop(kernels.AUTOTUNE_ENV, None)
        else:
            os.environ[kernels.AUTOTUNE_ENV] = mode
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--quick", action="store_true",
                   help="rounds of 800 calls instead of 20000 per op: a check that the benchmark runs (noisier)")
    args = p.parse_args(argv)
    calls = 800 if args.quick else 20000
    fast, eager, base, x = models()
    with torch.inference_mode():
        for _ in range(3):
            fast(x), eager(x), base(x)                  # tune, capture
        rows = [("forward, eager", host_ms(lambda: eager(x)), None),
                ("forward, graphs", host_ms(lambda: fast(x)), None),
                ("torch eager forward", host_ms(lambda: base(x)), None)]
        for name, mine, theirs in op_calls(fast):
            rows.append((name, host_ms(mine) * 1e3, host_ms(theirs) * 1e3))
        rows += [(name, us, None) for name, us in launch_us(calls) + direct_us(calls)]
    gpu = torch.cuda.get_device_name() if HAS_CUDA else "cpu (ops run synchronously: compute included)"
    lines = [f"# vitfast host cost: {MODEL} {str(DTYPE).replace('torch.', '')} batch 1 on {gpu}, "
             f"torch {torch.__version__}, {datetime.date.today()}", "", "| what | vitfast | torch call |",
             "|---|---:|---:|"]
    units = [("ms" if name.startswith(("forward", "torch")) else "µs") for name, _, _ in rows]
    lines += [f"| {name} | {mine:.3g} {unit} | {'–' if theirs is None else f'{theirs:.3g} {unit}'} |"
              for (name, mine, theirs), unit in zip(rows, units)]
    text = "\n".join(lines)
    print(text)
    if args.json:
        import platform

        import triton

        Path(args.json).write_text(json.dumps({
            "model": MODEL, "dtype": str(DTYPE), "device": gpu, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            "rows": [{"what": name, "vitfast": mine, "torch": theirs, "unit": unit}
                     for (name, mine, theirs), unit in zip(rows, units)], "markdown": text}, indent=1))
    return 0


@pytest.fixture(scope="module")
def setup():
    return models()


@pytest.mark.benchmark(group="host", timer=time.perf_counter)
@pytest.mark.parametrize("which", ["graphs", "eager", "torch"])
def test_forward_host_time(benchmark, setup, which):
    fast, eager, base, x = setup
    model = {"graphs": fast, "eager": eager, "torch": base}[which]
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        if HAS_CUDA:
            torch.cuda.synchronize()
        out = benchmark(model, x)
        want = base(x)
    assert out.shape == want.shape == (1, 1000)
    # the same logits as the torch baseline: to fp32 rounding, or within a deep bf16 model's tolerance
    assert rel_err(out, want) <= MODEL_TOLERANCE.get(DTYPE, 1e-4)


if __name__ == "__main__":
    sys.exit(main())
