"""Fine-tuning speed: one training step (forward, cross-entropy, backward, AdamW) end to end, and the
attention backward alone.

Training step, the same weights, inputs and labels for every backend, timed in turn in one run:
  torch      `vitfast.reference.VisionTransformer` on torch's fused ops (`use_torch_ops()`: F.linear, SDPA,
             F.layer_norm, F.conv2d): eager PyTorch as a timm user trains
  compile    `torch.compile` of `torch` (--compile-mode, default "default")
  vitfast    `vitfast.VisionTransformer`: FlashAttention-2 backward, the linear / patch-embed GEMM backward,
             the extension's LayerNorm backward
with the median step time, images/s, the peak memory of a step (CUDA) and the speed-ups against torch
and compile. ViT-B/16 in bf16 (parameters and AdamW state in bf16) at batch 64 on a GPU; a ViT-Ti in
fp32 at batch 2 without one (a dry run of the script: those numbers say nothing about GPU speed).

Linear backward alone (GPU): ViT-B's fc1 with GELU, the layer's backward against torch's, and the fused
dX / dZ kernel against torch's gelu_backward + cuBLAS (the two paths vitfast's dispatch chooses between).

Attention backward alone: dq, dk, dv of one ViT-B layer's attention (12 heads of 64, N = 197 and 577,
batch 64) by vitfast's kernels and by SDPA's backward (the flash backend where torch picks it), in
TFLOP/s counting 2.5 x the forward's 4·B·H·N²·D (FlashAttention-2's count, recompute included).

    python benchmarks/bench_train.py [--batch-size 64] [--steps 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitfast
from vitfast import ops, reference

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def build(backend: str, name: str, dtype, state: dict, compile_mode: str):
    """(model in train mode, AdamW) for `backend`, with the weights `state`."""
    if backend == "vitfast":
        model = vitfast.create_model(name)
    else:
        model = reference.create_model(name).use_torch_ops()
    model.load_state_dict(state, strict=True)
    model = model.to(DEVICE, dtype).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if HAS_CUDA else {}))
    if backend == "compile":
        model = torch.compile(model, mode=compile_mode)
    return model, opt


def step(model, opt, x, labels):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x).float(), labels)
    loss.backward()
    opt.step()
    return loss


def time_steps(fns: dict, args, steps: int, warmup: int) -> dict:
    """{backend: (median ms, peak bytes or None, error or None)}, the backends' steps interleaved."""
    out, times = {}, {k: [] for k in fns}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn(*args)
            sync()
            if HAS_CUDA:
                torch.cuda.reset_peak_memory_stats()
            fn(*args)
            sync()
            out[name] = [None, torch.cuda.max_memory_allocated() if HAS_CUDA else None, None]
        except Exception as e:                       # one failing backend must not lose the others
            out[name] = [None, None, f"{type(e).__name__}: {e}"[:300]]
    live = [n for n in fns if out[n][2] is None]
    for r in range(steps):
        for i in range(len(live)):
            name = live[(r + i) % len(live)]
            sync()
            t0 = time.perf_counter()
            fns[name](*args)
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    for name in live:
        out[name][0] = statistics.median(times[name])
    return {k: tuple(v) for k, v in out.items()}


def _median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def attention_backward(batch: int, dtype, reps: int) -> list[dict]:
    """Median ms and TFLOP/s of the attention backward, vitfast's kernels against SDPA's."""
    rows = []
    H, D = 12, 64
    for N in (197, 577):
        qkv = torch.randn(batch, N, 3 * H * D, device=DEVICE, dtype=dtype, requires_grad=True)
        q, k, v = (t.detach().requires_grad_() for t in reference.split_qkv(qkv.detach(), H))
        dout = torch.randn(batch, N, H * D, device=DEVICE, dtype=dtype)
        flops = 2.5 * 4 * batch * H * N * N * D
        outs = {"vitfast": (ops.attention_qkv(qkv, H), (qkv,), dout),
                "sdpa": (F.scaled_dot_product_attention(q, k, v), (q, k, v), dout.view(batch, N, H, D).transpose(1, 2))}
        for name, (out, wrt, grad) in outs.items():
            ms = _median_ms(lambda o=out, w=wrt, g=grad: torch.autograd.grad(o, w, g, retain_graph=True), reps)
            rows.append({"backend": name, "tokens": N, "batch": batch, "ms": ms, "tflops": flops / ms / 1e9})
    return rows


def linear_backward(batch: int, dtype, reps: int, K: int = 768, N: int = 3072) -> list[dict]:
    """ViT-B's fc1 (768 -> 3072, GELU) at `batch` images of 197 tokens: the layer's backward (dX, dW, db) through
    autograd, vitfast's training path against torch's F.gelu(F.linear(...)); then the two ways vitfast can form
    dX and dZ = dY ⊙ GELU'(z), which its dispatch times against each other: the fused Triton kernel, and
    torch's gelu_backward + cuBLAS. TFLOP/s count 2·M·N·K per GEMM (two in the layer, one in the dX rows)."""
    M = batch * 197
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.randn(N, K, device=DEVICE) * K ** -0.5).to(dtype).requires_grad_()
    b = torch.zeros(N, device=DEVICE, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=DEVICE, dtype=dtype)
    gemm = 2 * M * N * K
    rows = []
    for name, out in (("layer backward: vitfast", ops.linear(x, w, b, activation="gelu")),
                      ("layer backward: torch", F.gelu(F.linear(x, w, b)))):
        ms = _median_ms(lambda o=out: torch.autograd.grad(o, (x, w, b), dy, retain_graph=True), reps)
        rows.append({"what": name, "ms": ms, "tflops": 2 * gemm / ms / 1e9})
    z, w0 = F.linear(x, w, b).detach(), w.detach()
    kernels = ops._kernels()
    for name, fn in (("dX + dZ: fused Triton kernel",
                      lambda: kernels.linear.linear_backward(dy, z, w0, None, "gelu")),
                     ("dX + dZ: gelu_backward + cuBLAS",
                      lambda: ops._linear_bwd_torch(dy, z, w0, None, "gelu", True, False))):
        ms = _median_ms(fn, reps)
        rows.append({"what": name, "ms": ms, "tflops": gemm / ms / 1e9})
    chosen = sorted({v for k, v in ops._LINEAR_BWD_PATHS.items() if k[2:4] == (N, K)})
    rows[0]["what"] += f" (dX path chosen: {', '.join(chosen) or '?'})"
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: vit_base_patch16_224 on a GPU, vit_tiny_patch16_224 on CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on a GPU, 2 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per backend (default 20 on a GPU, 3 on CPU)")
    p.add_argument("--backends", default="torch,compile,vitfast")
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)
    name = args.model or ("vit_base_patch16_224" if HAS_CUDA else "vit_tiny_patch16_224")
    batch = args.batch_size or (64 if HAS_CUDA else 2)
    steps = args.steps or (20 if HAS_CUDA else 3)
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not HAS_CUDA:
        backends = [b for b in backends if b != "compile"]      # inductor's CPU compile takes minutes here
    torch.manual_seed(0)
    state = vitfast.create_model(name).state_dict()
    x = torch.randn(batch, 3, 224, 224, device=DEVICE, dtype=dtype)
    labels = torch.randint(0, 1000, (batch,), device=DEVICE)
    fns = {}
    for b in backends:
        model, opt = build(b, name, dtype, state, args.compile_mode)
        fns[b] = lambda x, y, m=model, o=opt: step(m, o, x, y)
    results = time_steps(fns, (x, labels), steps, warmup=3 if HAS_CUDA else 1)
    attn = attention_backward(batch, dtype, reps=20 if HAS_CUDA else 2) if HAS_CUDA else []
    lin = linear_backward(batch, dtype, reps=20) if HAS_CUDA else []
    where = torch.cuda.get_device_name() if HAS_CUDA else "cpu (a dry run: says nothing about GPU speed)"
    lines = [f"# bench_train: {name} {str(dtype).replace('torch.', '')} batch {batch} on {where}, torch "
             f"{torch.__version__}, {datetime.date.today()}", "",
             "| backend | ms / step | images/s | peak memory | vs torch | vs compile |",
             "|---|---:|---:|---:|---:|---:|"]
    base = results.get("torch", (None,))[0]
    comp = results.get("compile", (None,))[0]
    for b, (ms, peak, err) in results.items():
        if err:
            lines.append(f"| {b} | {err} | | | | |")
            continue
        mem = "–" if peak is None else f"{peak / 2**30:.2f} GiB"
        vs_torch = "–" if base is None else f"{base / ms:.2f}x"
        vs_comp = "–" if comp is None else f"{comp / ms:.2f}x"
        lines.append(f"| {b} | {ms:.1f} | {batch / ms * 1e3:.1f} | {mem} | {vs_torch} | {vs_comp} |")
    if attn:
        lines += ["", "| attention backward | tokens | batch | ms | TFLOP/s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['backend']} | {r['tokens']} | {r['batch']} | {r['ms']:.3f} | {r['tflops']:.1f} |"
                  for r in attn]
    if lin:
        lines += ["", f"| linear backward (fc1 768 -> 3072, GELU, {batch * 197} rows) | ms | TFLOP/s |",
                  "|---|---:|---:|"]
        lines += [f"| {r['what']} | {r['ms']:.3f} | {r['tflops']:.1f} |" for r in lin]
    text = "\n".join(lines)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": name, "batch": batch, "dtype": str(dtype), "device": where, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "steps": {b: {"ms": ms, "peak_bytes": peak, "error": err} for b, (ms, peak, err) in results.items()},
            "attention_backward": attn, "linear_backward": lin, "markdown": text}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
