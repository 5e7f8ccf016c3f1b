"""`vitfast bench`: the patch-size sweep (32 -> 8) and the O(n²) attention study.

For one model size and every configuration (image size S, patch size P -> T = 1 + (S/P)² tokens), or
with --model NAME for a timm name from `vitfast.list_models()` at its own size (its prefix tokens,
layer-scale, pre-norm, eps, activation, pooling head and distillation head on every backend):

- end-to-end forward time and images/s of each model backend, timed in the same run, at each batch size:
    reference      `vitfast.reference.VisionTransformer`: the plain math (N×N softmax, hand-written LayerNorm)
    torch          the same model on torch's fused ops (`use_torch_ops`: F.conv2d, F.layer_norm, SDPA,
                   F.linear, F.gelu): the best eager PyTorch a user writes, as timm runs it
    timm           timm's own VisionTransformer (its Eva for DINOv3) with the same weights (GPU, where timm is
                   importable)
    vitfast        `vitfast.VisionTransformer` as users get it: CUDA graphs on CUDA (vitfast.graphs)
    vitfast-eager  the same with its graphs off (GPU; on a CPU `vitfast` is already eager)
    compile        `torch.compile` of `torch`, mode max-autotune (--compile-mode; GPU; --no-compile skips it)
  with speed-ups against `torch` and against `compile`;
- the ops of one block at that shape, at the largest batch (patch_embed, layer_norm, linear_qkv, attention,
  linear_proj, mlp) for three op backends: `reference` (vitfast.reference), `torch` (reference.torch_*:
  F.conv2d, F.layer_norm, SDPA, F.linear) and `vitfast` (vitfast.ops), with TFLOP/s (GEMM-like ops) or
  GB/s (layer_norm);
- peak memory per measurement (torch.cuda.max_memory_allocated; null on CPU);
- the attention study: attention time per image vs T, the log-log exponent fitted with
  numpy.polyfit(log T, log ms_per_image, 1), and the share of end-to-end time spent in attention;
  --attention-tokens adds attention-only points at more token counts (the fit then uses those).

Batch sizes (default 1, 8, 64 and 256 on a GPU, 2 on a CPU) are given for <= 785 tokens (224 px) and
scaled down for more tokens (batch·T kept constant) to bound memory. Every time comes from
`vitfast.timing.bench`. Writes `results.json`, `results.md` (both rewritten after each configuration)
and PNG plots into --out; prints a summary table. --time-budget stops starting measurements once that
many seconds have passed (the ones left are recorded as skipped), so that a run in a time box still
writes its results.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from vitfast import ops, reference
from vitfast.configs import CONFIGS
from vitfast.testing import rel_err
from vitfast.timing import L2_BYTES, bench, gbps, rotating_inputs, tflops

MODEL_SIZES = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224", "base": "vit_base_patch16_224",
               "large": "vit_large_patch16_224", "huge": "vit_huge_patch14_224"}
# (image size, patch size): tokens 50, 197, 257, 785 at 224 px; 577, 2305 at 384; 1025, 4097 at 512.
SWEEP = [(224, 32), (224, 16), (224, 14), (224, 8), (384, 16), (384, 8), (512, 16), (512, 8)]
CPU_SWEEP = [(224, 32), (224, 16), (224, 14), (224, 8), (384, 16), (512, 16)]   # up to 1025 tokens
QUICK_SWEEP = [(224, 32), (224, 16), (224, 8)]
MODEL_BACKENDS = ("reference", "torch", "timm", "vitfast", "vitfast-eager", "compile")
OP_BACKENDS = ("reference", "torch", "vitfast")
# timm is GPU-only: on a CPU machine it could only be a CPU build beside a CPU torch, which the sweep
# does not compare (and a CPU run must give the same backends whether timm is installed or not).
GPU_ONLY = ("timm", "compile", "vitfast-eager")
GPU_BATCH_SIZES = (1, 8, 64, 256)
COMPILE_MODES = ("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", "default")
SKIPPED = "skipped (time budget)"
OPS = ("patch_embed", "layer_norm", "linear_qkv", "attention", "linear_proj", "mlp")
# The op backend whose attention time each model backend spends (for the attention share).
ATTENTION_OF = {"reference": "reference", "torch": "torch", "timm": "torch", "vitfast": "vitfast",
                "vitfast-eager": "vitfast"}
# The model backends each op backend runs inside, first present wins (for an op's share of end-to-end
# time: ops are timed as eager launches, so vitfast's against vitfast-eager where there is one).
MODEL_OF = {"reference": ("reference",), "torch": ("torch",), "vitfast": ("vitfast-eager", "vitfast")}
BATCH_TOKENS = 785          # a batch size holds up to this many tokens; above it the batch shrinks
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_NOTE = ("{why}: this is a CPU sweep of vitfast's CPU path (torch's CPU kernels, the C++ LayerNorm) "
            "against the reference and eager PyTorch. The Triton kernels need an NVIDIA GPU; these numbers "
            "say nothing about their speed.")
PEAK_MEM_NOTE = ("peak_mem_bytes = torch.cuda.max_memory_allocated over one call, with only that backend's "
                 "weights (for an op: its operands), one input batch and the backend's own caches (CUDA graph "
                 "/ compile pools) resident; null on CPU (no allocator statistics there)")


@dataclass(frozen=True)
class Config:
    image_size: int
    patch_size: int
    batch: int
    prefix: int = 1                 # class / register / distillation tokens in front of the patches

    @property
    def tokens(self) -> int:
        return self.prefix + (self.image_size // self.patch_size) ** 2

    @property
    def label(self) -> str:
        return f"P{self.patch_size}/{self.image_size}px"


@dataclass(frozen=True)
class Spec:
    """The model being measured (timm's ViT kwargs). `size` names it (a size, or the timm name given
    with --model); `extra` holds that name's other kwargs (pre_norm, reg_tokens, init_values, ...)."""
    size: str
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    extra: tuple = ()
    distilled: bool = False
    image_size: int = 224
    patch_size: int = 16

    @property
    def hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def options(self) -> dict:
        return dict(self.extra)

    @property
    def prefix(self) -> int:
        """Tokens in front of the patches: class, registers, distillation."""
        o = self.options
        return int(o.get("class_token", True)) + o.get("reg_tokens", 0) + int(self.distilled)

    @property
    def act(self) -> str:
        return self.options.get("act_layer", "gelu")

    @property
    def swiglu(self) -> bool:
        """The MLP is timm's SwiGLUPacked (DINOv2-giant): fc1 to `hidden` (gate and up halves), fc2 from half."""
        return self.options.get("mlp_layer", "mlp") == "swiglu"

    @property
    def mlp_flops(self) -> int:
        """Multiply-adds x 2 of one token's MLP: fc1 and fc2."""
        C, Hd = self.embed_dim, self.hidden
        return 2 * C * Hd + 2 * (Hd // 2 if self.swiglu else Hd) * C

    @property
    def norm_eps(self) -> float:
        return self.options.get("norm_eps", 1e-6)

    @property
    def num_classes(self) -> int:
        return self.options.get("num_classes", 1000)

    def kwargs(self, cfg: Config) -> dict:
        return dict(self.extra, img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)


def spec_for(size: str, depth: int | None = None) -> Spec:
    """The Spec of a model size (tiny ... huge), from the named timm configurations."""
    kw = CONFIGS[MODEL_SIZES[size]]
    return Spec(size, kw["embed_dim"], depth or kw["depth"], kw["num_heads"], kw.get("mlp_ratio", 4.0))


def spec_for_name(name: str, depth: int | None = None) -> Spec:
    """The Spec of a timm model name (`vitfast.list_models()`): its shape, and its other kwargs as
    `extra` (dynamic_img_size dropped: each configuration is built for its own size)."""
    from vitfast.configs import model_class_and_config

    kind, kw = model_class_and_config(name)
    shape = {k: kw.pop(k) for k in ("embed_dim", "depth", "num_heads")}
    mlp_ratio, img, patch = kw.pop("mlp_ratio", 4.0), kw.pop("img_size", 224), kw.pop("patch_size", 16)
    kw.pop("dynamic_img_size", None)
    return Spec(name, shape["embed_dim"], depth or shape["depth"], shape["num_heads"], mlp_ratio,
                tuple(sorted(kw.items())), kind == "distilled", img[0] if isinstance(img, tuple) else img,
                patch[0] if isinstance(patch, tuple) else patch)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vitfast bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=None,
                   help="ViT size (default: base on GPU, tiny on CPU)")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="a timm model name from vitfast.list_models() (DINOv2, CLIP, SigLIP, DeiT, ...) instead of "
                        "--model-size: its own configuration (default: its image and patch size only)")
    p.add_argument("--depth", type=int, default=None, help="number of blocks (default: the model size's)")
    p.add_argument("--batch-size", "--batch-sizes", dest="batch_size", type=_ints, default=None,
                   help=f"comma-separated batch sizes for <= {BATCH_TOKENS} tokens, scaled down above (default: "
                        f"{','.join(map(str, GPU_BATCH_SIZES))} on GPU, 2 on CPU); ops are timed at the largest")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--patch-sizes", type=_ints, default=None,
                   help="comma-separated; with --image-sizes, the sweep becomes their product")
    p.add_argument("--image-sizes", type=_ints, default=None, help="comma-separated (see --patch-sizes)")
    p.add_argument("--backends", type=_names, default=None,
                   help=f"model backends, comma-separated, from {','.join(MODEL_BACKENDS)} (default: all that "
                        f"can run here); the op backends follow ({', '.join(OP_BACKENDS)})")
    p.add_argument("--no-kernels", action="store_true", help="skip the per-op timings")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes minutes per shape)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="max-autotune",
                   help="torch.compile mode of the compile backend (default max-autotune)")
    p.add_argument("--attention-tokens", type=_ints, default=None,
                   help="comma-separated token counts for attention-only timings (batch scaled like the sweep), "
                        "e.g. 50,197,577,1025,2305,4097; the attention exponent is then fitted on these")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new measurement starts (the rest are recorded as skipped)")
    p.add_argument("--reps", type=int, default=None, help="timed calls per measurement on CPU (median; default 15)")
    p.add_argument("--rep-ms", type=float, default=None,
                   help="milliseconds of repetitions per measurement on GPU (do_bench median; default 200)")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 224 px at patch 32/16/8, 1 rep on CPU / 50 ms on GPU, no torch.compile")
    p.add_argument("--out", default="bench-results", help="output folder (default: bench-results/)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on CPU: steady on a shared machine, where two "
                        "threads can run 20x slower; 0 keeps torch's own setting)")
    return p.parse_args(argv)


def sweep_configs(args, device: str, spec: Spec | None = None) -> list[tuple[int, int]]:
    """The (image size, patch size) pairs to measure. --patch-sizes / --image-sizes replace the
    default list by their product (the one not given taken from the default list). With --model the
    default list is that model's own size."""
    if getattr(args, "model", None) and spec is not None:
        base = [(spec.image_size, spec.patch_size)]
    else:
        base = QUICK_SWEEP if args.quick else SWEEP if device == "cuda" else CPU_SWEEP
    if args.patch_sizes is None and args.image_sizes is None:
        return list(base)
    images = args.image_sizes or sorted({s for s, _ in base})
    patches = args.patch_sizes or sorted({p for _, p in base}, reverse=True)
    pairs = [(s, p) for s in images for p in patches if p > 0 and s % p == 0]
    if not pairs:
        raise SystemExit(f"vitfast bench: no image size in {images} is divisible by a patch size in {patches}")
    return pairs


def batch_for(tokens: int, batch_size: int) -> int:
    """The batch for `tokens` tokens: batch_size up to BATCH_TOKENS tokens, batch·tokens constant above."""
    return max(1, min(batch_size, batch_size * BATCH_TOKENS // tokens))


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------
def _timm_class(distilled: bool = False):
    try:
        if distilled:
            from timm.models.deit import VisionTransformerDistilled as cls
        else:
            from timm.models.vision_transformer import VisionTransformer as cls
    except ImportError:
        return None
    return cls


def _free(device: str) -> None:
    """Give a dropped model's GPU memory back before the next one is measured (gc breaks the reference
    cycles of compiled / graphed models; it takes a while, so only on GPU)."""
    if device == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _peak_memory(fn, args, device: str) -> int | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn(*args)
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


class Timer:
    """`vitfast.timing.bench` with this run's settings, plus warm-up, peak memory and the time budget
    (`deadline`: a `time.monotonic()` value after which no measurement starts; None: no budget)."""

    def __init__(self, device: str, reps: int, rep_ms: float, deadline: float | None = None):
        self.device, self.reps, self.rep_ms, self.deadline = device, reps, rep_ms, deadline

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def measure(self, fn, make, first: list | None = None) -> tuple[float, int | None]:
        """(median ms of fn(*inputs), peak bytes). `make()` builds one input set (`first`, if given,
        is the first); on GPU the sets rotate over more than 2x the L2 size. On CPU `bench` makes
        the one warm-up call."""
        with torch.inference_mode():
            first = list(make()) if first is None else first
            for _ in range(2 if self.device == "cuda" else 0):   # compilation, autotuning happen here
                fn(*first)
            peak = _peak_memory(fn, first, self.device)
            sets = [first]
            if self.device == "cuda":
                sets += rotating_inputs(make, min_bytes=2 * L2_BYTES)[1:]
            ms = bench(fn, sets, device=self.device, rep_ms=self.rep_ms, cpu_reps=self.reps)
        return ms, peak

    def measure_interleaved(self, fns: dict, args: list) -> dict[str, float | Exception]:
        """CPU: {name: median ms of fns[name](*args), or the exception it raised}, the backends timed
        in turn (round r starts at the r-th), so that a slow spell of a shared machine falls on all
        of them alike instead of on whichever was being timed."""
        times: dict[str, list | Exception] = {}
        with torch.inference_mode():
            for name, fn in fns.items():                         # warm-up
                try:
                    fn(*args)
                    times[name] = []
                except Exception as e:                           # noqa: BLE001 - recorded per backend
                    times[name] = e
            names = [n for n in fns if isinstance(times[n], list)]
            for r in range(self.reps):
                for i in range(len(names)):
                    name = names[(r + i) % len(names)]
                    t0 = time.perf_counter()
                    fns[name](*args)
                    times[name].append((time.perf_counter() - t0) * 1e3)
        return {n: statistics.median(v) if isinstance(v, list) else v for n, v in times.items()}


def build_model_backend(backend: str, spec: Spec, cfg: Config, state: dict, device: str, dtype,
                        compile_mode: str = "max-autotune"):
    """A callable images -> logits for `backend`, with the weights `state`."""
    kwargs = spec.kwargs(cfg)
    if backend in ("reference", "torch", "compile"):
        cls = reference.VisionTransformerDistilled if spec.distilled else reference.VisionTransformer
        with torch.device(device):
            model = cls(**kwargs).use_torch_ops(backend != "reference")
    elif backend == "timm" and kwargs.get("rope"):      # timm runs RoPE models (DINOv3) as its Eva class
        with torch.device(device):
            model = _timm_eva(kwargs)
        state = _eva_state(state, kwargs.get("mlp_layer") == "swiglu")
    elif backend == "timm":
        eps = kwargs.pop("norm_eps", None)             # timm takes the eps through its norm layer
        if eps is not None:
            kwargs["norm_layer"] = partial(torch.nn.LayerNorm, eps=eps)
        if kwargs.pop("mlp_layer", "mlp") == "swiglu":  # timm's class for it, with its SiLU
            from timm.layers import SwiGLUPacked
            kwargs.update(mlp_layer=SwiGLUPacked, act_layer="silu")
        with torch.device(device):
            model = _timm_class(spec.distilled)(**kwargs)
    else:
        from vitfast.graphs import CUDAGraphRunner
        from vitfast.model import VisionTransformer, VisionTransformerDistilled
        with torch.device(device):
            model = (VisionTransformerDistilled if spec.distilled else VisionTransformer)(**kwargs)
        if backend == "vitfast-eager":
            model.cuda_graphs = CUDAGraphRunner(False)
    model.load_state_dict(state, strict=True)
    model = model.to(dtype).eval()
    if backend == "compile":
        return torch.compile(model, mode=compile_mode)
    return model


def _timm_eva(kw: dict):
    """timm's Eva with a DINOv3 Spec's kwargs (timm's vit_*_patch16_dinov3 configurations: its SwiGLU unpacked,
    with half vitfast's packed width per projection)."""
    from timm.models.eva import Eva

    swiglu = kw.get("mlp_layer", "mlp") == "swiglu"
    return Eva(img_size=kw["img_size"], patch_size=kw["patch_size"], embed_dim=kw["embed_dim"], depth=kw["depth"],
               num_heads=kw["num_heads"], mlp_ratio=kw["mlp_ratio"] / 2 if swiglu else kw["mlp_ratio"],
               swiglu_mlp=swiglu, swiglu_align_to=8 if swiglu else 0, qkv_bias=kw.get("qkv_bias", True),
               init_values=kw.get("init_values"), class_token=kw.get("class_token", True),
               num_reg_tokens=kw.get("reg_tokens", 0), use_abs_pos_emb=False, use_rot_pos_emb=True,
               rope_type="dinov3", rope_temperature=kw.get("rope_temperature", 100.0), rope_rotate_half=True,
               global_pool=kw.get("global_pool", "token"), use_fc_norm=kw.get("fc_norm"),
               norm_layer=partial(torch.nn.LayerNorm, eps=kw.get("norm_eps", 1e-6)),
               num_classes=kw.get("num_classes", 1000))


def _eva_state(state: dict, swiglu: bool) -> dict:
    """vitfast's keys -> timm Eva's (checkpoint.eva_to_timm, the other way): ls1 / ls2.gamma -> gamma_1 / gamma_2,
    the packed qkv bias -> q_bias and v_bias (Eva has no key bias), a packed SwiGLU fc1 -> fc1_g and fc1_x."""
    out = {}
    for key, value in state.items():
        stem, _, name = key.rpartition(".")
        if stem.endswith((".ls1", ".ls2")) and name == "gamma":
            out[f"{stem[:-4]}.gamma_{stem[-1]}"] = value
        elif stem.endswith(".attn.qkv") and name == "bias":
            q, k, v = value.chunk(3)
            if k.any():
                raise ValueError(f"{key}: timm's Eva has no key bias, this one is not zero")
            out[f"{stem[:-4]}.q_bias"], out[f"{stem[:-4]}.v_bias"] = q, v
        elif swiglu and stem.endswith(".mlp.fc1"):
            out[f"{stem}_g.{name}"], out[f"{stem}_x.{name}"] = value.chunk(2)
        else:
            out[key] = value
    return out


def op_case(op: str, spec: Spec, cfg: Config, device: str, dtype):
    """(make_inputs, {op backend: fn}, work) for one op of one block; work = {"flops": ..} or {"bytes": ..}.
    The `torch` op is what the `torch` model runs (residual adds out of place, as timm's blocks do)."""
    B, T, C, H, P, S = cfg.batch, cfg.tokens, spec.embed_dim, spec.num_heads, cfg.patch_size, cfg.image_size
    R, NP, eps = reference, T - (S // P) ** 2 if S else 1, spec.norm_eps

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=device, dtype=dtype) * scale

    # the model's layer-scale (DINOv2) in the proj / fc2 epilogues, as its blocks run them
    gamma = rand(C, scale=0.1) if spec.options.get("init_values") else None
    if op == "patch_embed":
        pos_prefix = not spec.options.get("no_embed_class", False)
        w, b = rand(C, 3, P, P, scale=0.02), None if spec.options.get("pre_norm") else rand(C)
        prefix, pos = (rand(1, NP, C) if NP else None), rand(1, T if pos_prefix else T - NP, C)
        return (lambda: [rand(B, 3, S, S)],
                {"reference": lambda x: R.patch_embed(x, w, b, prefix, pos, pos_embed_prefix=pos_prefix),
                 "torch": lambda x: R.torch_patch_embed(x, w, b, prefix, pos, pos_embed_prefix=pos_prefix),
                 "vitfast": lambda x: ops.patch_embed(x, w, b, prefix_tokens=prefix, pos_embed=pos,
                                                      pos_embed_prefix=pos_prefix)},
                {"flops": 2 * B * (T - NP) * 3 * P * P * C})
    if op == "layer_norm":
        w, b = 1 + rand(C, scale=0.1), rand(C, scale=0.1)
        return (lambda: [rand(B, T, C)],
                {"reference": lambda x: R.layer_norm(x, w, b, eps),
                 "torch": lambda x: R.torch_layer_norm(x, w, b, eps),
                 "vitfast": lambda x: ops.layer_norm(x, w, b, eps)},
                {"bytes": 2 * B * T * C * torch.finfo(dtype).bits // 8})
    if op == "attention":
        return (lambda: [rand(B, T, 3 * C)],
                {"reference": lambda x: R.attention_qkv(x, H), "torch": lambda x: R.torch_attention_qkv(x, H),
                 "vitfast": lambda x: ops.attention_qkv(x, H)},
                {"flops": 4 * B * T * T * C})                       # q kᵀ and p v, 2·T·T·D each per head
    if op in ("linear_qkv", "linear_proj"):
        n_out, res = (3 * C, False) if op == "linear_qkv" else (C, True)
        w, g = rand(n_out, C, scale=C ** -0.5), gamma if res else None
        b = None if op == "linear_qkv" and not spec.options.get("qkv_bias", True) else rand(n_out, scale=0.1)
        make = (lambda: [rand(B, T, C), rand(B, T, C)]) if res else (lambda: [rand(B, T, C)])
        return (make,
                {"reference": lambda x, r=None: R.linear(x, w, b, None, r, g),
                 "torch": lambda x, r=None: _torch_residual(R.torch_linear(x, w, b), r, g),
                 "vitfast": lambda x, r=None: ops.linear(x, w, b, residual=r, scale=g)},
                {"flops": 2 * B * T * C * n_out})
    if op == "mlp" and spec.swiglu:                  # fc1 to [gate | up], silu(gate) * up (vitfast: in fc1), fc2
        Hd = spec.hidden
        w1, b1 = rand(Hd, C, scale=C ** -0.5), rand(Hd, scale=0.1)
        w2, b2 = rand(C, Hd // 2, scale=(Hd // 2) ** -0.5), rand(C, scale=0.1)
        glu = R.swiglu
        return (lambda: [rand(B, T, C), rand(B, T, C)],
                {"reference": lambda x, r: R.linear(glu(R.linear(x, w1, b1)), w2, b2, None, r, gamma),
                 "torch": lambda x, r: _torch_residual(R.torch_linear(glu(R.torch_linear(x, w1, b1)), w2, b2), r,
                                                       gamma),
                 "vitfast": lambda x, r: ops.linear(ops.linear(x, w1, b1, activation="swiglu"), w2, b2, residual=r,
                                                    scale=gamma)},
                {"flops": B * T * spec.mlp_flops})
    if op == "mlp":
        Hd = spec.hidden
        w1, b1 = rand(Hd, C, scale=C ** -0.5), rand(Hd, scale=0.1)
        w2, b2 = rand(C, Hd, scale=Hd ** -0.5), rand(C, scale=0.1)
        act = spec.act
        return (lambda: [rand(B, T, C), rand(B, T, C)],
                {"reference": lambda x, r: R.linear(R.linear(x, w1, b1, act), w2, b2, None, r, gamma),
                 "torch": lambda x, r: _torch_residual(R.torch_linear(R.torch_linear(x, w1, b1, act), w2, b2), r,
                                                       gamma),
                 "vitfast": lambda x, r: ops.linear(ops.linear(x, w1, b1, activation=act), w2, b2, residual=r,
                                                    scale=gamma)},
                {"flops": B * T * spec.mlp_flops})
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _torch_residual(y, residual, gamma):
    """What a timm block does after its proj / fc2 in eager PyTorch: x + ls(y)."""
    if gamma is not None:
        y = y * gamma
    return y if residual is None else residual + y


def model_flops(spec: Spec, cfg: Config) -> int:
    """Forward FLOPs of one batch (matmuls only; the attention-pooling head of "map" models left out)."""
    B, T, C, P = cfg.batch, cfg.tokens, spec.embed_dim, cfg.patch_size
    block = 2 * T * C * 3 * C + 4 * T * T * C + 2 * T * C * C + T * spec.mlp_flops
    heads = 2 if spec.distilled else 1
    return B * (2 * (T - cfg.prefix) * 3 * P * P * C + spec.depth * block + heads * 2 * C * spec.num_classes)


def model_title(config: dict) -> str:
    """"ViT-base", or the timm name given with --model."""
    return config.get("model") or f"ViT-{config['model_size']}"


def _record(kind: str, cfg: Config, backend: str, dtype, **fields) -> dict:
    r = dict(kind=kind, patch_size=cfg.patch_size, image_size=cfg.image_size, tokens=cfg.tokens, batch=cfg.batch,
             backend=backend, dtype=str(dtype).replace("torch.", ""), ms=None, ms_per_image=None,
             images_per_s=None, peak_mem_bytes=None, error=None)
    r.update(fields)
    return r


def _error(e: BaseException) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "out of memory"
    traceback.print_exc(file=sys.stderr)
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_config(cfg: Config, spec: Spec, backends: list[str], op_backends: list[str], timer: Timer, device: str,
               dtype, progress, compile_mode: str = "max-autotune") -> list[dict]:
    """Model records for `backends` and op records for `op_backends` (none: no op timings) at one
    configuration. Models are built under no_grad and called under inference_mode."""
    records = []
    if timer.expired():
        progress.update(len(backends) + len(OPS) * len(op_backends))
        return ([_record("model", cfg, b, dtype, error=SKIPPED) for b in backends]
                + [_record("kernel", cfg, b, dtype, op=op, error=SKIPPED) for op in OPS for b in op_backends])
    torch.manual_seed(0)
    with torch.device(device):
        ref = (reference.VisionTransformerDistilled if spec.distilled else reference.VisionTransformer)(
            **spec.kwargs(cfg))
    state = {k: v.to("cpu", dtype) for k, v in ref.state_dict().items()}   # off the GPU: not in the peaks
    ref = ref.to(dtype).eval()
    example = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    try:
        with torch.inference_mode():
            expected = ref(example)                      # the reference's output: every backend is checked against it
    except torch.cuda.OutOfMemoryError:
        expected = None                                  # no check at this size; the backends still run
    del ref
    _free(device)
    flops, shape = model_flops(spec, cfg), example.shape

    def model_record(backend, fn, ms, peak, x, want):
        with torch.inference_mode():
            err = None if want is None else rel_err(fn(x), want)
        return _record("model", cfg, backend, dtype, ms=ms, ms_per_image=ms / cfg.batch,
                       images_per_s=cfg.batch / ms * 1e3, tflops=tflops(flops, ms), peak_mem_bytes=peak,
                       rel_err_vs_reference=err)

    if device == "cpu" and not timer.expired():         # every backend at once, timed in turn
        progress.set_description(f"{cfg.label} models")
        fns = {}
        for backend in backends:
            try:
                fns[backend] = build_model_backend(backend, spec, cfg, state, device, dtype, compile_mode)
            except Exception as e:                      # one failing backend must not lose the sweep
                records.append(_record("model", cfg, backend, dtype, error=_error(e)))
        for backend, ms in timer.measure_interleaved(fns, [example]).items():
            records.append(_record("model", cfg, backend, dtype, error=_error(ms)) if isinstance(ms, Exception)
                           else model_record(backend, fns[backend], ms, None, example, expected))
        records.sort(key=lambda r: backends.index(r["backend"]))
        progress.update(len(backends))
        backends = []
    for backend in backends:
        progress.set_description(f"{cfg.label} {backend}")
        fn = None
        if timer.expired():
            records.append(_record("model", cfg, backend, dtype, error=SKIPPED))
            progress.update()
            continue
        try:
            fn = build_model_backend(backend, spec, cfg, state, device, dtype, compile_mode)
            ms, peak = timer.measure(fn, lambda: [torch.randn(shape, device=device, dtype=dtype)], [example])
            records.append(model_record(backend, fn, ms, peak, example, expected))
        except Exception as e:                          # one failing backend must not lose the sweep
            records.append(_record("model", cfg, backend, dtype, error=_error(e)))
        del fn
        if backend == "compile":
            torch._dynamo.reset()
        _free(device)
        progress.update()
    del example, expected, state
    _free(device)
    for op in OPS:
        for backend in op_backends:
            progress.set_description(f"{cfg.label} {op} {backend}")
            if timer.expired():
                records.append(_record("kernel", cfg, backend, dtype, op=op, error=SKIPPED))
                progress.update()
                continue
            try:
                make, fns, work = op_case(op, spec, cfg, device, dtype)
                ms, peak = timer.measure(fns[backend], make)
                rate = ({"tflops": tflops(work["flops"], ms)} if "flops" in work
                        else {"gbps": gbps(work["bytes"], ms)})
                records.append(_record("kernel", cfg, backend, dtype, op=op, ms=ms, ms_per_image=ms / cfg.batch,
                                       peak_mem_bytes=peak, **rate))
            except Exception as e:
                records.append(_record("kernel", cfg, backend, dtype, op=op, error=_error(e)))
            make = fns = None
            progress.update()
    add_shares(records, spec)
    return records


def run_attention_sweep(tokens: list[int], spec: Spec, batch_size: int, op_backends: list[str], timer: Timer,
                        device: str, dtype, progress) -> list[dict]:
    """Attention-only records (kind "attention") at each token count in `tokens`, for the op backends,
    with the sweep's batch rule (batch·tokens constant above BATCH_TOKENS)."""
    records = []
    for n in tokens:
        cfg = SimpleNamespace(tokens=n, batch=batch_for(n, batch_size), patch_size=None, image_size=None)
        for backend in op_backends:
            progress.set_description(f"attention N={n} {backend}")
            if timer.expired():
                records.append(_record("attention", cfg, backend, dtype, op="attention", error=SKIPPED))
                progress.update()
                continue
            make = fns = None
            try:
                make, fns, work = op_case("attention", spec, cfg, device, dtype)
                ms, peak = timer.measure(fns[backend], make)
                records.append(_record("attention", cfg, backend, dtype, op="attention", ms=ms,
                                       ms_per_image=ms / cfg.batch, peak_mem_bytes=peak,
                                       tflops=tflops(work["flops"], ms)))
            except Exception as e:
                records.append(_record("attention", cfg, backend, dtype, op="attention", error=_error(e)))
            make = fns = None
            _free(device)
            progress.update()
    return records


def add_shares(records: list[dict], spec: Spec) -> None:
    """attention_share on model records (depth x attention ms / model ms, same config and batch) and
    model_share on op records (calls per forward x op ms / model ms)."""
    calls = {"patch_embed": 1, "layer_norm": 2 * spec.depth + 1, "linear_qkv": spec.depth, "attention": spec.depth,
             "linear_proj": spec.depth, "mlp": spec.depth}
    ms = {(r["kind"], r.get("op"), r["backend"]): r["ms"] for r in records if r["ms"] is not None}
    for r in records:
        if r["kind"] == "model":
            attn = ms.get(("kernel", "attention", ATTENTION_OF.get(r["backend"])))
            r["attention_share"] = spec.depth * attn / r["ms"] if attn and r["ms"] else None
        else:
            model = next((ms[k] for b in MODEL_OF.get(r["backend"], ()) if (k := ("model", None, b)) in ms), None)
            r["model_share"] = calls[r["op"]] * r["ms"] / model if model and r["ms"] else None


# --------------------------------------------------------------------------------------------
# The attention study: fitted exponents
# --------------------------------------------------------------------------------------------
def fit_exponent(records: list[dict], kind: str, backend: str, op: str | None = None) -> dict | None:
    """Least-squares line log(ms_per_image) = exponent·log(tokens) + intercept over the measured
    points of one backend (numpy.polyfit, natural logs), one point per token count (its largest
    batch); None with fewer than 2 distinct token counts."""
    best = {}
    for r in records:
        if r["kind"] == kind and r["backend"] == backend and r.get("op") == op and r["ms"] is not None:
            if r["tokens"] not in best or r.get("batch", 0) > best[r["tokens"]].get("batch", 0):
                best[r["tokens"]] = r
    pts = sorted((n, r["ms_per_image"]) for n, r in best.items())
    if len({n for n, _ in pts}) < 2:
        return None
    n, t = np.array(pts, dtype=np.float64).T
    slope, intercept = np.polyfit(np.log(n), np.log(t), 1)
    return {"exponent": float(slope), "intercept": float(intercept), "points": len(pts)}


def attention_kind(records: list[dict]) -> str:
    """The records the attention study is read from: the attention-only sweep ("attention") when the
    run has one, else the per-configuration op timings ("kernel")."""
    return "attention" if any(r["kind"] == "attention" for r in records) else "kernel"


def fits(records: list[dict]) -> dict:
    out = {"attention": {}, "model": {}}
    kind = attention_kind(records)
    for b in dict.fromkeys(r["backend"] for r in records):
        if (f := fit_exponent(records, kind, b, "attention")) is not None:
            out["attention"][b] = f
        if (f := fit_exponent(records, "model", b)) is not None:
            out["model"][b] = f
    return out


def main_attention_backend(fitted: dict) -> str | None:
    return next((b for b in ("vitfast", "torch", "reference") if b in fitted["attention"]), None)


# --------------------------------------------------------------------------------------------
# Output: JSON, Markdown, plots
# --------------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def _mib(v) -> str:
    return "–" if v is None else f"{v / 2**20:.0f}"


def _configs(records):
    return sorted({(r["tokens"], r["patch_size"], r["image_size"], r["batch"]) for r in records})


def _key(r: dict) -> tuple:
    """What makes two records the same configuration."""
    return r["tokens"], r["image_size"], r["batch"]


def markdown(result: dict) -> str:
    env, records, fitted = result["environment"], result["records"], result["fits"]
    c = env["config"]
    lines = [f"# vitfast bench: {model_title(c)} (dim {c['embed_dim']}, depth {c['depth']}, "
             f"heads {c['num_heads']}), {c['dtype']}, {env['gpu']}", "",
             f"{env['date']} · torch {env['torch']} · triton {env['triton']} · driver {env['driver']}", "",
             f"Command: `{env['command']}`", ""]
    lines += [f"> {n}" for n in env["notes"]] + [""]
    models = [r for r in records if r["kind"] == "model"]
    ms = {(_key(r), r["backend"]): r["ms"] for r in models if r["ms"]}
    lines += ["## End to end", "",
              "| patch | image | tokens | batch | backend | ms / batch | images/s | x torch | x compile | TFLOP/s "
              "| peak MiB | attention share | rel err vs reference |", "|" + "---:|" * 13]
    for r in sorted(models, key=lambda r: (r["tokens"], r["image_size"], r["batch"])):
        speed = {b: ms[_key(r), b] / r["ms"] if r["ms"] and (_key(r), b) in ms else None for b in ("torch", "compile")}
        share = None if r.get("attention_share") is None else f"{100 * r['attention_share']:.0f}%"
        tail = (f"{_fmt(r['ms'])} | {_fmt(r['images_per_s'], '.1f')} | {_fmt(speed['torch'], '.2f')} | "
                f"{_fmt(speed['compile'], '.2f')} | {_fmt(r.get('tflops'))} | {_mib(r['peak_mem_bytes'])} | "
                f"{share or '–'} | {_fmt(r.get('rel_err_vs_reference'), '.1e')} |")
        if r["error"]:
            tail = f"{r['error']} |" + " – |" * 7
        lines.append(f"| {r['patch_size']} | {r['image_size']} | {r['tokens']} | {r['batch']} | {r['backend']} "
                     f"| {tail}")
    attn = [r for r in records if r["kind"] == "kernel" and r["op"] == "attention"]
    lines += ["", "## Attention vs tokens (the O(n²) study)", ""]
    for b, f in fitted["attention"].items():
        lines.append(f"- attention `{b}`: time per image ∝ N^{f['exponent']:.2f} (fit over {f['points']} points)")
    for b, f in fitted["model"].items():
        lines.append(f"- end to end `{b}`: time per image ∝ N^{f['exponent']:.2f}")
    lines += ["", "| tokens | patch | image | backend | ms / batch | ms / image | TFLOP/s | share of end to end |",
              "|" + "---:|" * 8]
    shares = {(_key(r), ATTENTION_OF.get(r["backend"])): r.get("attention_share")
              for r in models if r["backend"] in ("reference", "torch", "vitfast-eager")}
    shares.update({(_key(r), "vitfast"): r.get("attention_share") for r in models
                   if r["backend"] == "vitfast" and (_key(r), "vitfast") not in shares})
    for r in sorted(attn, key=lambda r: (r["tokens"], r["image_size"], r["backend"])):
        share = shares.get((_key(r), r["backend"]))
        lines.append(f"| {r['tokens']} | {r['patch_size']} | {r['image_size']} | {r['backend']} | {_fmt(r['ms'])} | "
                     f"{_fmt(r['ms_per_image'])} | {_fmt(r.get('tflops'))} | "
                     f"{'–' if share is None else f'{100 * share:.0f}%'} |")
    sweep = [r for r in records if r["kind"] == "attention"]
    if sweep:
        lines += ["", "## Attention alone (--attention-tokens; the exponents above are fitted on these)", "",
                  "| tokens | batch | backend | ms / batch | ms / image | TFLOP/s | peak MiB |", "|" + "---:|" * 7]
        for r in sorted(sweep, key=lambda r: (r["tokens"], r["backend"])):
            cells = (f"{_fmt(r['ms'])} | {_fmt(r['ms_per_image'])} | {_fmt(r.get('tflops'))} | "
                     f"{_mib(r['peak_mem_bytes'])} |") if not r["error"] else f"{r['error']} | – | – | – |"
            lines.append(f"| {r['tokens']} | {r['batch']} | {r['backend']} | {cells}")
    kernels = [r for r in records if r["kind"] == "kernel"]
    if kernels:
        lines += ["", "## Ops of one block (share = calls per forward x op time / end-to-end time)", "",
                  "| tokens | patch | image | op | backend | ms | TFLOP/s | GB/s | x torch | share of model |",
                  "|" + "---:|" * 10]
        torch_op = {(_key(r), r["op"]): r["ms"] for r in kernels if r["backend"] == "torch"}
        for r in sorted(kernels, key=lambda r: (r["tokens"], r["image_size"], OPS.index(r["op"]), r["backend"])):
            base = torch_op.get((_key(r), r["op"]))
            speed = base / r["ms"] if base and r["ms"] else None
            share = None if r.get("model_share") is None else f"{100 * r['model_share']:.0f}%"
            lines.append(f"| {r['tokens']} | {r['patch_size']} | {r['image_size']} | {r['op']} | {r['backend']} | "
                         f"{r['error'] or _fmt(r['ms'])} | {_fmt(r.get('tflops'))} | {_fmt(r.get('gbps'))} | "
                         f"{_fmt(speed, '.2f')} | {share or '–'} |")
    return "\n".join(lines) + "\n"


def summary(result: dict) -> str:
    """images/s per configuration and backend, then attention ms/image per token count."""
    records = result["records"]
    models = [r for r in records if r["kind"] == "model"]
    backends = list(dict.fromkeys(r["backend"] for r in models))
    head = f"{'config':<14}{'tokens':>7}{'batch':>6}" + "".join(f"{b:>19}" for b in backends)
    lines = ["images/s (end to end):", head]
    for tokens, patch, image, batch in _configs(models):
        row = {r["backend"]: r for r in models if _key(r) == (tokens, image, batch)}
        cells = "".join(f"{_fmt(row[b]['images_per_s'], '.1f') if b in row and not row[b]['error'] else 'n/a':>19}"
                        for b in backends)
        lines.append(f"{f'P{patch}/{image}px':<14}{tokens:>7}{batch:>6}{cells}")
    attn = [r for r in records if r["kind"] == attention_kind(records) and r["op"] == "attention"]
    if attn:
        abk = list(dict.fromkeys(r["backend"] for r in attn))
        lines += ["", "attention ms per image:", f"{'tokens':>7}" + "".join(f"{b:>12}" for b in abk)]
        for tokens in sorted({r["tokens"] for r in attn}):
            row = {r["backend"]: r["ms_per_image"] for r in attn if r["tokens"] == tokens}
            lines.append(f"{tokens:>7}" + "".join(f"{_fmt(row.get(b), '.4g'):>12}" for b in abk))
    e = result["attention_exponent"]
    lines.append("")
    lines.append("fitted attention exponent: " + ("n/a (fewer than 2 token counts)" if e is None else
                 f"time ∝ N^{e:.2f} ({result['attention_fit_backend']})"))
    return "\n".join(lines)


def plots(result: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, fitted, env = result["records"], result["fits"], result["environment"]
    title = f"{model_title(env['config'])} {env['config']['dtype']}, {env['gpu']}"
    written = []

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (b, f) in enumerate(fitted["attention"].items()):
        pts = sorted((r["tokens"], r["ms_per_image"]) for r in records if r["kind"] == attention_kind(records)
                     and r["op"] == "attention" and r["backend"] == b and r["ms"] is not None)
        n = np.array([p[0] for p in pts], dtype=float)
        color = f"C{i}"
        ax.loglog(n, [p[1] for p in pts], "o", color=color, label=f"{b} (measured)")
        grid = np.geomspace(n.min(), n.max(), 50)
        ax.loglog(grid, np.exp(f["intercept"]) * grid ** f["exponent"], "-", color=color,
                  label=f"{b} fit: slope {f['exponent']:.2f}")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("attention ms per image")
    ax.set_title(f"Attention time vs N (log-log): {title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if fitted["attention"]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "attention_vs_tokens.png", dpi=120)
    plt.close(fig)
    written.append("attention_vs_tokens.png")

    models = [r for r in records if r["kind"] == "model"]
    configs = _configs(models)
    backends = list(dict.fromkeys(r["backend"] for r in models))
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(configs)), 5))
    width = 0.8 / max(1, len(backends))
    measured = False
    for i, b in enumerate(backends):
        vals = []
        for tokens, _, image, batch in configs:
            r = next((r for r in models if (_key(r), r["backend"]) == ((tokens, image, batch), b)), None)
            vals.append(r["images_per_s"] if r and r["images_per_s"] else 0.0)
        measured |= any(v > 0 for v in vals)
        ax.bar(np.arange(len(configs)) + (i - (len(backends) - 1) / 2) * width, vals, width, label=b)
    ax.set_xticks(np.arange(len(configs)), [f"P{p}/{s}\n{t} tok\nB={b}" for t, p, s, b in configs], fontsize=7)
    if measured:                     # a run whose time budget ran out may have measured nothing
        ax.set_yscale("log")
    ax.set_ylabel("images/s")
    ax.set_title(f"End-to-end throughput: {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "images_per_s.png", dpi=120)
    plt.close(fig)
    written.append("images_per_s.png")

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, b in enumerate(backends):
        pts = sorted((r["tokens"], r["attention_share"]) for r in models
                     if r["backend"] == b and r.get("attention_share") is not None)
        if pts:
            ax.semilogx([p[0] for p in pts], [100 * p[1] for p in pts], "o-", color=f"C{i}", label=b)
    ax.set_xlabel("tokens N")
    ax.set_ylabel("% of end-to-end time in attention")
    ax.set_title(f"Attention share of the forward pass: {title}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "attention_share.png", dpi=120)
    plt.close(fig)
    written.append("attention_share.png")
    return written


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(argv, device: str, config: dict, notes: list[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = device == "cuda"
    return {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "device": device,
            "driver": _driver_version() if cuda else None, "cuda": torch.version.cuda if cuda else None,
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["vitfast bench", *argv]),
            "triton_interpret": ops.INTERPRET, "timing": ("triton.testing.do_bench median, CUDA events, L2 flushed, "
                                                          "inputs rotated over > 2x L2" if cuda else
                                                          "median of time.perf_counter after warm-up"),
            "peak_mem": PEAK_MEM_NOTE, "notes": notes, "config": config}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vitfast bench: --device cuda, but CUDA is not available")
    gpu = device == "cuda"
    if args.model is not None:
        if args.model_size is not None:
            raise SystemExit("vitfast bench: give --model or --model-size, not both")
        if args.model not in CONFIGS:
            raise SystemExit(f"vitfast bench: --model: unknown name {args.model!r}; expected one of "
                             f"vitfast.list_models(): {', '.join(sorted(CONFIGS))}")
        size, spec = None, spec_for_name(args.model, args.depth)
    else:
        size = args.model_size or ("base" if gpu else "tiny")
        spec = spec_for(size, args.depth)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    batch_sizes = sorted(set(args.batch_size or (GPU_BATCH_SIZES if gpu else (2,))))
    batch_size = batch_sizes[-1]                 # the attention sweep's and the op timings' batch
    reps = args.reps or (1 if args.quick else 15)
    rep_ms = args.rep_ms or (50 if args.quick else 200)
    if min(batch_sizes[0], reps, spec.depth) < 1:
        raise SystemExit("vitfast bench: --batch-size, --reps and --depth must be >= 1")

    threads = 1 if args.threads is None and not gpu else args.threads
    if threads:
        torch.set_num_threads(threads)
    notes = [] if gpu else [CPU_NOTE.format(why="--device cpu" if torch.cuda.is_available() else
                                            "CUDA is not available")]
    if ops.INTERPRET and not gpu:
        notes.append("TRITON_INTERPRET=1: vitfast's ops run in Triton's interpreter on CPU (slow by design).")
    backends, backend_notes = select_backends(args, gpu)
    notes += backend_notes
    op_backends = [] if args.no_kernels else [
        b for b, on in (("reference", "reference" in backends), ("torch", {"torch", "timm", "compile"} & set(backends)),
                        ("vitfast", {"vitfast", "vitfast-eager"} & set(backends))) if on]
    pairs = sweep_configs(args, device, spec)
    npre = spec.prefix
    configs = sorted({Config(s, p, batch_for(npre + (s // p) ** 2, b), npre) for s, p in pairs for b in batch_sizes},
                     key=lambda c: (c.tokens, c.image_size, c.batch))
    op_batch = {(s, p): batch_for(npre + (s // p) ** 2, batch_size) for s, p in pairs}   # ops at the largest batch
    attention_tokens = sorted(set(args.attention_tokens or []))
    if any(n < 1 for n in attention_tokens):
        raise SystemExit(f"vitfast bench: --attention-tokens must be >= 1, got {args.attention_tokens}")
    if attention_tokens and not op_backends:
        raise SystemExit("vitfast bench: --attention-tokens needs op backends (not --no-kernels)")

    config = {"model_size": size, "model": args.model, "model_options": spec.options, "embed_dim": spec.embed_dim,
              "depth": spec.depth, "num_heads": spec.num_heads,
              "mlp_ratio": spec.mlp_ratio, "dtype": str(dtype).replace("torch.", ""), "batch_sizes": batch_sizes,
              "batch_tokens": BATCH_TOKENS, "backends": backends, "op_backends": op_backends,
              "configs": [dict(image_size=c.image_size, patch_size=c.patch_size, tokens=c.tokens, batch=c.batch)
                          for c in configs],
              "attention_tokens": attention_tokens, "compile_mode": args.compile_mode if "compile" in backends
              else None, "time_budget_s": args.time_budget,
              "reps": reps if not gpu else None, "rep_ms": rep_ms if gpu else None}
    env = environment(argv, device, config, notes)
    for n in notes:
        print(f"note: {n}")
    print(f"vitfast bench: {model_title(config)} (dim {spec.embed_dim}, depth {spec.depth}, heads {spec.num_heads}) "
          f"{config['dtype']} on {env['gpu']}; {len(configs)} configurations x backends {backends}; "
          f"ops: {op_backends or 'skipped'}" + (f"; attention alone at N = {attention_tokens}"
                                                 if attention_tokens else ""))

    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    timer = Timer(device, reps, rep_ms, deadline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    total = (len(configs) * len(backends) + len(pairs) * len(OPS) * len(op_backends)
             + len(attention_tokens) * len(op_backends))
    with torch.no_grad(), _progress(total) as progress:
        for cfg in configs:
            with_ops = op_backends if cfg.batch == op_batch[cfg.image_size, cfg.patch_size] else []
            records += run_config(cfg, spec, backends, with_ops, timer, device, dtype, progress, args.compile_mode)
            write_results(assemble(env, records), out)      # a run cut short still leaves its results
        for n in attention_tokens:
            records += run_attention_sweep([n], spec, batch_size, op_backends, timer, device, dtype, progress)
            write_results(assemble(env, records), out)
    result = assemble(env, records)
    write_results(result, out)
    try:
        pngs = plots(result, out)
    except ImportError as e:        # matplotlib is optional
        pngs = []
        print(f"note: no plots ({e})")
    print()
    print(summary(result))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'}" + "".join(f", {out / p}" for p in pngs))
    skipped = sum(r["error"] == SKIPPED for r in records)
    if skipped:
        print(f"note: {skipped} measurements skipped: the time budget of {args.time_budget} s ran out")
    failed = [r for r in records if r["error"] and r["error"] not in ("out of memory", SKIPPED)]
    for r in failed:
        print(f"error: {r['backend']} {r.get('op') or 'model'} at {r['tokens']} tokens: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def select_backends(args, gpu: bool) -> tuple[list[str], list[str]]:
    """(model backends to run, notes on the ones left out): the requested ones (default: all) that can run
    on this device. GPU-only backends are left out on a CPU run whether or not their packages exist."""
    requested = args.backends or list(MODEL_BACKENDS)
    unknown = [b for b in requested if b not in MODEL_BACKENDS]
    if unknown:
        raise SystemExit(f"vitfast bench: unknown backend(s) {unknown}; expected some of {list(MODEL_BACKENDS)}")
    backends, notes = [], []
    for b in MODEL_BACKENDS:
        if b not in requested:
            continue
        if b in GPU_ONLY and not gpu:
            if args.backends or b != "timm":
                notes.append(f"backend {b} skipped: it needs CUDA")
        elif b == "compile" and (args.no_compile or args.quick):
            notes.append("backend compile skipped (--no-compile / --quick)")
        elif b == "timm" and _timm_class() is None:
            if args.backends:
                notes.append("backend timm skipped: timm is not installed")
        else:
            backends.append(b)
    return backends, notes


def assemble(env: dict, records: list[dict]) -> dict:
    """The result document: environment, fitted exponents and every record."""
    fitted = fits(records)
    main_b = main_attention_backend(fitted)
    return {"environment": env, "attention_exponent": fitted["attention"][main_b]["exponent"] if main_b else None,
            "attention_fit_backend": main_b, "fits": fitted, "records": records}


def write_results(result: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(_finite(result), indent=1, allow_nan=False) + "\n")
    (out / "results.md").write_text(markdown(result))


class _NoProgress:
    """Stands in for tqdm (optional) when it is not installed."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def set_description(self, text):
        pass

    def update(self, n=1):
        pass


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoProgress()
    return tqdm(total=total, file=sys.stderr, disable=None, unit="run")


def _finite(v):
    """JSON has no inf/NaN: they become null (an inf rel_err means a non-finite output)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


if __name__ == "__main__":
    sys.exit(main())
