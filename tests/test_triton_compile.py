"""Every Triton kernel compiles ahead of time for Hopper (sm_90a) in its production configs, with
no register spills and with the bf16 / fp16 dots lowered to Hopper's warpgroup tensor-core MMA
(`wgmma.mma_async`, never the Ampere-style `mma.sync`). Needs Triton's CUDA backend and the ptxas
bundled with it, not a GPU: nothing is run.

How a case is compiled: the real launcher (`attention_qkv`, `linear`, `patch_embed`, and the backward's
`attention_qkv_backward`, `linear_backward`) is called on CPU tensors with the autotuner's `run`
intercepted, so the kernel receives exactly the arguments a ViT forward (or backward) passes (strides
equal to 1 become constexprs, 16-divisible ints and pointers get divisibility hints, as on the device).
The autotuner's own prune function, run as on an H100 / H200, says which configs it keeps; each case
compiles every one of them with `triton.compile` for GPUTarget("cuda", 90, 32), so a config the
autotuner could pick on the device is never left out. Registers and spills come from the `ptxas -v` log
Triton writes.

Compilation happens in subprocesses (one Triton import each, ~1 s) without TRITON_INTERPRET, which
conftest.py sets on machines without CUDA and which turns `@triton.jit` into interpreter objects, and
without VITFAST_AUTOTUNE (its quick mode would keep one config). The cases are split over up to 4
processes, one per core (under pytest-xdist one worker compiles them for all). Identical compilations
(same signature, constants, hints and options) are done once per process. The check runs under the
Triton the project pins and, through `make compile-check-oldest`, under the oldest Triton vitfast
supports (3.6); there with VITFAST_COMPILE_CHECK_CONFIGS=first, the first config each prune keeps (every
kernel variant's code through that Triton's front end and ptxas, in a fifth of the time; the pinned Triton
compiles every kept config). A twin case (`twin_of`), the launch of another case in fp16 instead of bf16, with
another elementwise activation, or also storing the pre-activation (training's forward: the same tiles, the same
16-bit warpgroup MMA, one more store in the epilogue), compiles only the first config the prune keeps: the
configs' tile shapes and shared memory are its twin's, whose case compiles every one of them.
"""

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in the subprocess: reads a JSON list of cases on stdin, prints one JSON object on stdout:
# {"skip": reason} or {"results": {case id: {...}}}.
_COMPILE_SCRIPT = r'''
import contextlib, io, itertools, json, os, re, sys, time, traceback, warnings
from unittest import mock

warnings.filterwarnings("ignore")

def unavailable():
    try:
        import triton
        from triton.backends import backends
        if "nvidia" not in backends:
            return f"Triton {triton.__version__} has no CUDA backend"
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(90).path
        if not (ptxas and os.path.isfile(ptxas) and os.access(ptxas, os.X_OK)):
            return f"Triton's bundled ptxas for sm_90 not found ({ptxas!r})"
        # The compile below drives Triton's launcher internals (those of Triton 3.6 to 3.9, the
        # versions vitfast supports): another Triton may not have them.
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401
        if not hasattr(JITFunction, "_pack_args") or not hasattr(getattr(triton, "knobs", None), "nvidia"):
            return f"Triton {triton.__version__} lacks the 3.6-3.9 internals this ahead-of-time compile uses"
    except ImportError as e:
        return f"Triton {getattr(sys.modules.get('triton'), '__version__', '?')} lacks what this check uses: {e}"
    except Exception as e:  # no triton, or a backend that cannot locate its tools
        return f"Triton's CUDA backend / bundled ptxas is not usable: {type(e).__name__}: {e}"
    return None

reason = unavailable()
if reason:
    print(json.dumps({"skip": reason}))
    sys.exit(0)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from vitfast.kernels import attention, linear, patch_embed, rope

TARGET = GPUTarget("cuda", 90, 32)
BACKEND = make_backend(TARGET)
triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by Triton after each compile
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "uint8": torch.uint8}


def key_mask(c, N):
    """SigLIP 2 NaFlex's key-padding mask [B, N] (contiguous bool), or None."""
    return torch.ones(2, N, dtype=torch.bool) if c.get("mask") else None


def launch_attention(c):
    dt, D, H, N, segments = DTYPES[c["dtype"]], c["head_dim"], c["heads"], c["seq"], c.get("segments")
    # (B, N, 3C), the packed projection (never touched); with segments, one sequence packing them (varlen)
    qkv = torch.empty(1 if segments else 2, N, 3 * H * D, dtype=dt)
    cu = torch.tensor([0, *itertools.accumulate(segments)], dtype=torch.int32) if segments else None
    grid = c.get("rel_grid")                   # SAM's relative positions: the key grid (rows, columns)
    rel = (torch.empty(2, H, N, grid[0]), torch.empty(2, H, N, grid[1])) if grid else None
    bias = torch.empty(1, H, N, N, dtype=dt) if c.get("bias") else None   # BEiT's relative position bias
    return attention._attention_fwd_kernel, lambda: attention.attention_qkv(
        qkv, H, return_cls_attn=c["cls"], key_mask=key_mask(c, N), cu_seqlens=cu, rel_pos=rel,
        max_seqlen=max(segments) if segments else None, bias=bias)


def launch_linear(c):
    dt, K, N = DTYPES[c["dtype"]], c["k"], c["n"]
    x = torch.empty(8, 197, K, dtype=dt)                  # (B, T, K)
    w, b = torch.empty(N, K, dtype=dt), torch.empty(N, dtype=dt)
    r = torch.empty(8, 197, N, dtype=dt) if c["residual"] else None
    s = torch.empty(N, dtype=dt) if c.get("scale") else None   # layer-scale gamma
    z = torch.empty(8, 197, N, dtype=dt) if c.get("preact") else None   # training: the pre-activation too
    variant = c.get("variant", "tiled")   # "persistent" / "tma" (TMA descriptors) share one persistent kernel
    kernel = linear._linear_kernel if variant == "tiled" else linear._linear_persistent_kernel
    return kernel, lambda: linear.linear(x, w, b, activation=c["activation"], residual=r, scale=s, preact=z,
                                         variant=variant)


def launch_linear_bwd(c):
    """dX = dZ W with dZ formed from dY and z in the kernel (c["k"], c["n"]: the forward's K and N)."""
    dt, K, N = DTYPES[c["dtype"]], c["k"], c["n"]
    dy, z, w = torch.empty(8, 197, N, dtype=dt), torch.empty(8, 197, N, dtype=dt), torch.empty(N, K, dtype=dt)
    s = torch.empty(N, dtype=dt) if c.get("scale") else None
    return linear._linear_bwd_kernel, lambda: linear.linear_backward(dy, z, w, s, c["activation"], need_dz=True,
                                                                     need_dscale=c.get("dscale", False))


def launch_patch_embed(c):
    P, D, img_dt, w_dt = c["patch"], 768, DTYPES[c["image"]], DTYPES[c["weight"]]
    n_prefix, pos_prefix = c.get("prefix", 1), c.get("pos_prefix", True)    # class (+ registers / distillation)
    T = (224 // P) ** 2 + (n_prefix if pos_prefix else 0)
    images = torch.empty(8, 3, 224, 224, dtype=img_dt)   # (B, C, H, W)
    w = torch.empty(D, 3, P, P, dtype=w_dt)
    b, pre, pos = (torch.empty(D, dtype=w_dt), torch.empty(1, n_prefix, D, dtype=w_dt),
                   torch.empty(1, T, D, dtype=w_dt))
    # uint8 images are normalised in the kernel (the engine's path); float images arrive normalised.
    mean, std = (torch.empty(3), torch.empty(3)) if img_dt == torch.uint8 else (None, None)
    return patch_embed._patch_embed_kernel, lambda: patch_embed.patch_embed(images, w, b, pre, pos, mean, std,
                                                                            pos_embed_prefix=pos_prefix)


def launch_attention_bwd(c):
    """One of the two backward kernels (c["part"]: "dkdv" or "dq"), launched by the packed-projection
    backward at a ViT shape; the other kernel's launch is skipped."""
    dt, D, H, N = DTYPES[c["dtype"]], c["head_dim"], c["heads"], c["seq"]
    qkv, out = torch.empty(2, N, 3 * H * D, dtype=dt), torch.empty(2, N, H * D, dtype=dt)
    lse, dout = torch.empty(2, H, N), torch.empty(2, N, H * D, dtype=dt)
    kernels = {"dkdv": attention._attention_bwd_dkdv_kernel, "dq": attention._attention_bwd_dq_kernel}
    other = kernels["dq" if c["part"] == "dkdv" else "dkdv"]

    grid = c.get("rel_grid")                   # SAM's relative positions: the key grid (rows, columns)
    rel = (torch.empty(2, H, N, grid[0]), torch.empty(2, H, N, grid[1])) if grid else None
    bias = torch.empty(1, H, N, N, dtype=dt) if c.get("bias") else None   # BEiT's relative position bias

    def launch():
        with mock.patch.object(other, "run", lambda *a, **kw: None, create=True):
            attention.attention_qkv_backward(qkv, out, lse, dout, H, key_mask=key_mask(c, N), rel_pos=rel,
                                             drel=rel and tuple(torch.empty_like(t) for t in rel), bias=bias,
                                             dbias=None if bias is None else torch.empty(bias.shape))
    return kernels[c["part"]], launch


def launch_rope(c):
    """RoPE on the packed qkv (a plain JIT function, no autotuner): class + 4 registers before the patches."""
    dt, D, H, N = DTYPES[c["dtype"]], c["head_dim"], c["heads"], c["seq"]
    qkv = torch.empty(2, N, 3 * H * D, dtype=dt)
    width = D if c.get("full") else D // 2                 # an angle per element (V-JEPA 2's tables)
    cos, sin = torch.empty(N - 5, width), torch.empty(N - 5, width)
    norm = c.get("norm")
    weight = torch.empty(2, D, dtype=dt) if norm else None
    if c.get("backward"):                                  # the norm forward's backward (training)
        return rope._norm_rope_bwd_kernel, lambda: rope.norm_rope_qkv_backward(qkv, torch.empty_like(qkv), H, cos,
                                                                               sin, weight, norm)
    return rope._rope_qkv_kernel, lambda: rope.rope_qkv(qkv, H, cos, sin, inverse=c.get("inverse", False),
                                                        in_place=c.get("in_place", False), norm=norm, weight=weight)


LAUNCHERS = {"attention": launch_attention, "linear": launch_linear, "patch_embed": launch_patch_embed,
             "attention_bwd": launch_attention_bwd, "linear_bwd": launch_linear_bwd, "rope": launch_rope}


HOPPER_SMEM = 227 * 1024  # the most shared memory one block may opt into on H100 / H200
MODULES = {"attention": attention, "linear": linear, "patch_embed": patch_embed, "attention_bwd": attention,
           "linear_bwd": linear, "rope": rope}


class OnHopper:
    """A tensor argument as a prune function sees it on an H100 / H200."""
    is_cuda, device = True, torch.device("cuda", 0)

    def __init__(self, t):
        self._t = t

    def __getattr__(self, name):
        return getattr(self._t, name)


def capture(kernel, tuner, launch):
    """The launcher's arguments to the kernel and the configs the autotuner's prune keeps for them
    on an H100 / H200 (tensor arguments seen as CUDA tensors, the device's shared-memory limit)."""
    calls = []
    with mock.patch.object(tuner, "run", lambda *a, grid, warmup, **kw: calls.append((a, kw)), create=True):
        launch()
    (args, kwargs), = calls
    if not hasattr(tuner, "configs"):              # a plain JIT function: its launch is the one config
        return args, kwargs, [triton.Config({})]
    tuner.nargs = {n: OnHopper(a) if isinstance(a, torch.Tensor) else a for n, a in zip(tuner.arg_names, args)}
    with mock.patch.object(MODULES[kernel], "_smem_limit", lambda device: HOPPER_SMEM):
        kept = tuner.prune_configs(kwargs)
    tuner.nargs = None
    return args, kwargs, kept


def compile_config(jit, args, kwargs, config, done):
    all_kwargs = {**kwargs, **config.all_kwargs()}
    binder = create_function_from_signature(jit.signature, jit.params, BACKEND)
    bound, specialization, options = binder(*args, **all_kwargs)
    options, signature, constexprs, attrs = jit._pack_args(BACKEND, all_kwargs, bound, specialization, options)
    key = repr((jit.__name__, sorted(signature.items()), sorted(constexprs.items()), sorted(attrs.items()),
                sorted(options.__dict__.items())))
    if key in done:
        return done[key]
    t0 = time.time()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=TARGET,
                                    options=options.__dict__)
    except Exception as e:
        done[key] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
        return done[key]
    ptx, text = kernel.asm["ptx"], log.getvalue()
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    done[key] = {
        "signature": {k: v for k, v in signature.items() if v != "constexpr"},
        "target": (re.findall(r"^\.target\s+(\S+)", ptx, re.M) or ["?"])[0],
        "regs": int(regs[-1]) if regs else None,
        "spill_stores": sum(int(s) for s, _ in spills) if spills else None,
        "spill_loads": sum(int(l) for _, l in spills) if spills else None,
        "shared": kernel.metadata.shared,
        "wgmma": sorted(set(re.findall(r"wgmma\.mma_async\.\S+", ptx))),
        "n_wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "n_mma_sync": len(re.findall(r"\bmma\.sync\b", ptx)),
        "seconds": round(time.time() - t0, 2),
    }
    return done[key]


def main():
    variants = json.load(sys.stdin)
    results, done = {}, {}
    for v in variants:
        try:
            tuner, launch = LAUNCHERS[v["kernel"]](v["launch"])
            args, kwargs, kept = capture(v["kernel"], tuner, launch)
            if v["twin_of"] or os.environ.get("VITFAST_COMPILE_CHECK_CONFIGS") == "first":
                kept = kept[:1]
            res = {"kept": {}}
            tuned = hasattr(tuner, "configs")
            for i, config in enumerate(kept):
                res["kept"][str(tuner.configs.index(config) if tuned else i)] = {
                    "config": str(config), **compile_config(tuner.fn if tuned else tuner, args, kwargs, config, done)}
        except Exception:
            res = {"error": traceback.format_exc()[-3000:]}
        results[v["id"]] = res
    print(json.dumps({"results": results}))


main()
'''

HOPPER_SMEM = 227 * 1024  # the most shared memory one block may opt into on H100 / H200


def _variant(kernel, name, dot, launch, twin_of=None):
    """One launch of a kernel at a ViT shape; the test compiles every config the prune keeps for it, or, for the
    twin of another case (`twin_of`: its id), the first one only."""
    case = {"id": f"{kernel}-{name}", "kernel": kernel, "dot": dot, "launch": launch, "twin_of": twin_of}
    return pytest.param(case, id=case["id"])


def _cases():
    cases = []
    # Attention: ViT-B/L (64), ViT-H (80) and 128-wide heads, with and without the CLS row, at N=197
    # (the configs kept and their code are the same at N=4097: only N_KV's value differs).
    for head_dim, heads in ((64, 12), (80, 16), (128, 16)):
        for cls in (False, True):
            cases.append(_variant("attention", f"bf16-d{head_dim}-{'cls' if cls else 'nocls'}", "bf16", {
                "dtype": "bf16", "head_dim": head_dim, "heads": heads, "seq": 197, "cls": cls}))
    cases.append(_variant("attention", "fp16-d64-nocls", "f16",
                          {"dtype": "fp16", "head_dim": 64, "heads": 12, "seq": 197, "cls": False},
                          twin_of="attention-bf16-d64-nocls"))
    # Head dim 72 (64 + 16 with 8 lanes masked): SigLIP so400m at 384 px (729 patches), and Gemma 4's tower with its
    # key-padding mask; the tiles kept for a partly masked head dim (`_fits_masked_head`).
    cases.append(_variant("attention", "bf16-d72-nocls", "bf16",
                          {"dtype": "bf16", "head_dim": 72, "heads": 16, "seq": 729, "cls": False}))
    cases.append(_variant("attention", "bf16-d72-nocls-mask", "bf16",
                          {"dtype": "bf16", "head_dim": 72, "heads": 16, "seq": 2520, "cls": False, "mask": True}))
    # Head dim 88 (BLIP-2's and InstructBLIP's EVA ViT-g, Llama 4's tower: 16 heads, 257 tokens at 224 px), and with
    # RETURN_CLS, whose 128 x 64 tiles on 8 warps spilled on Triton 3.6 (the tiles kept: `_fits_masked_head`).
    for cls in (False, True):
        cases.append(_variant("attention", f"bf16-d88-{'cls' if cls else 'nocls'}", "bf16",
                              {"dtype": "bf16", "head_dim": 88, "heads": 16, "seq": 257, "cls": cls}))
    # With a key-padding mask (SigLIP 2 NaFlex: patch sequences padded per image), at NaFlex's 256 patches.
    cases.append(_variant("attention", "bf16-d64-nocls-mask", "bf16",
                          {"dtype": "bf16", "head_dim": 64, "heads": 12, "seq": 256, "cls": False, "mask": True}))
    # Packed variable-length segments (Qwen2-VL's vision tower: the patches of several images in one sequence,
    # attended within each image): head dim 80, images of 32 x 32, 16 x 16 and 64 x 64 patches, no lse.
    cases.append(_variant("attention", "bf16-d80-nocls-varlen", "bf16", {
        "dtype": "bf16", "head_dim": 80, "heads": 16, "seq": 1024 + 256 + 4096, "cls": False,
        "segments": [1024, 256, 4096]}))
    # SAM's decomposed relative positions in the scores: ViT-B's global blocks at 1024 px (64 x 64 patches), ViT-H's
    # head dim 80 in its 14 x 14 windows.
    cases.append(_variant("attention", "bf16-d64-nocls-relpos", "bf16", {
        "dtype": "bf16", "head_dim": 64, "heads": 12, "seq": 4096, "cls": False, "rel_grid": (64, 64)}))
    cases.append(_variant("attention", "bf16-d80-nocls-relpos", "bf16", {
        "dtype": "bf16", "head_dim": 80, "heads": 16, "seq": 196, "cls": False, "rel_grid": (14, 14)}))
    # Their backward (fine-tuning SAM): the dQ kernel also sums the terms' gradients (dS times one-hots).
    for head_dim, heads, grid in ((64, 12, (64, 64)), (80, 16, (14, 14))):
        for part in ("dkdv", "dq"):
            cases.append(_variant("attention_bwd", f"bf16-d{head_dim}-{part}-relpos", "bf16", {
                "dtype": "bf16", "head_dim": head_dim, "heads": heads, "seq": grid[0] * grid[1], "cls": False,
                "part": part, "rel_grid": grid}))
    # A dense bias shared by the batch (BEiT-B's relative position bias, 197 tokens), forward and backward (the dQ
    # kernel adds dS into its gradient with atomics).
    cases.append(_variant("attention", "bf16-d64-nocls-bias", "bf16", {
        "dtype": "bf16", "head_dim": 64, "heads": 12, "seq": 197, "cls": False, "bias": True}))
    for part in ("dkdv", "dq"):
        cases.append(_variant("attention_bwd", f"bf16-d64-{part}-bias", "bf16", {
            "dtype": "bf16", "head_dim": 64, "heads": 12, "seq": 197, "cls": False, "part": part, "bias": True}))
    # Attention backward (dK/dV and dQ kernels): ViT-B's 64, ViT-H's 80 (64 + 16), SigLIP-so400m's 72, bf16.
    for head_dim, heads in ((64, 12), (80, 16), (72, 16)):
        for part in ("dkdv", "dq"):
            cases.append(_variant("attention_bwd", f"bf16-d{head_dim}-{part}", "bf16", {
                "dtype": "bf16", "head_dim": head_dim, "heads": heads, "seq": 197, "part": part}))
    # (The backward kernels with a key-padding mask at head dim 72, the tightest for registers, compiled
    # without spills when the mask was added; they are left out here to keep `make test` within its time.)
    # Linear: the ViT-B/16 linears, one per epilogue: qkv (none), fc1 (gelu, gelu_tanh), fc2 (+ residual).
    for epilogue, k, n, activation, residual in (("none", 768, 2304, None, False),
                                                 ("gelu", 768, 3072, "gelu", False),
                                                 ("gelu_tanh", 768, 3072, "gelu_tanh", False),
                                                 ("residual", 3072, 768, None, True)):
        cases.append(_variant("linear", f"bf16-{epilogue}", "bf16", {
            "dtype": "bf16", "k": k, "n": n, "activation": activation, "residual": residual},
            twin_of="linear-bf16-gelu" if epilogue == "gelu_tanh" else None))
    cases.append(_variant("linear", "fp16-gelu", "f16",
                          {"dtype": "fp16", "k": 768, "n": 3072, "activation": "gelu", "residual": False},
                          twin_of="linear-bf16-gelu"))
    # The epilogues of DINOv2 / CLIP: layer-scale before the residual (fc2, tiled and TMA) and QuickGELU (fc1).
    for variant in ("tiled", "tma"):
        cases.append(_variant("linear", f"{variant}-bf16-layerscale-residual", "bf16", {
            "dtype": "bf16", "k": 3072, "n": 768, "activation": None, "residual": True, "scale": True,
            "variant": variant}))
    cases.append(_variant("linear", "bf16-quick_gelu", "bf16",
                          {"dtype": "bf16", "k": 768, "n": 3072, "activation": "quick_gelu", "residual": False},
                          twin_of="linear-bf16-gelu"))
    # The SwiGLU epilogue (DINOv2-giant's fc1: C = 1536 to 2 x 4096, the gating in the epilogue), both pointer
    # variants (it has no TMA form).
    for variant in ("tiled", "persistent"):
        cases.append(_variant("linear", f"{variant}-bf16-swiglu", "bf16", {
            "dtype": "bf16", "k": 1536, "n": 8192, "activation": "swiglu", "residual": False, "variant": variant}))
    # The tanh-GELU gated epilogue (Gemma 4's vision MLP), the first config of the tiled form at SwiGLU's shape.
    cases.append(_variant("linear", "tiled-bf16-geglu_tanh", "bf16", {
        "dtype": "bf16", "k": 1536, "n": 8192, "activation": "geglu_tanh", "residual": False, "variant": "tiled"},
        twin_of="linear-tiled-bf16-swiglu"))
    # The persistent variant (one program per SM looping over tiles) and its TMA-descriptor form: fc1 (gelu)
    # and fc2 (+ residual), the heaviest epilogues.
    for variant in ("persistent", "tma"):
        for epilogue, k, n, activation, residual in (("gelu", 768, 3072, "gelu", False),
                                                     ("residual", 3072, 768, None, True)):
            cases.append(_variant("linear", f"{variant}-bf16-{epilogue}", "bf16", {
                "dtype": "bf16", "k": k, "n": n, "activation": activation, "residual": residual,
                "variant": variant}))
    # Training: the forward also storing the pre-activation (fc1, each variant), and the backward kernel
    # (dX of fc1 with each activation, fp16 too; fc2's layer-scale with its gamma gradient).
    for variant in ("tiled", "persistent", "tma"):
        cases.append(_variant("linear", f"{variant}-bf16-gelu-preact", "bf16", {
            "dtype": "bf16", "k": 768, "n": 3072, "activation": "gelu", "residual": False, "preact": True,
            "variant": variant}, twin_of="linear-bf16-gelu" if variant == "tiled" else f"linear-{variant}-bf16-gelu"))
    for dtype, activation in (("bf16", "gelu"), ("bf16", "gelu_tanh"), ("bf16", "quick_gelu"), ("fp16", "gelu")):
        cases.append(_variant("linear_bwd", f"{dtype}-{activation}", "bf16" if dtype == "bf16" else "f16", {
            "dtype": dtype, "k": 768, "n": 3072, "activation": activation},
            twin_of=None if (dtype, activation) == ("bf16", "gelu") else "linear_bwd-bf16-gelu"))
    cases.append(_variant("linear_bwd", "bf16-layerscale-dscale", "bf16", {
        "dtype": "bf16", "k": 3072, "n": 768, "activation": None, "scale": True, "dscale": True}))
    # Patch embedding at 224 px, bf16 weight: uint8 images (normalised in the kernel, the engine's
    # path) and bf16 images (already normalised), ViT-*/16 and ViT-*/14.
    for image, patch in (("uint8", 16), ("uint8", 14), ("bf16", 16), ("bf16", 14)):
        cases.append(_variant("patch_embed", f"{image}-p{patch}", "bf16",
                              {"image": image, "weight": "bf16", "patch": patch}))
    # DINOv2 with registers: class + 4 register rows, position rows for the patches only.
    cases.append(_variant("patch_embed", "uint8-p14-reg4", "bf16",
                          {"image": "uint8", "weight": "bf16", "patch": 14, "prefix": 5, "pos_prefix": False}))
    # RoPE on the packed qkv (DINOv3 at 256 px: 5 prefix tokens and 16 x 16 patches; no dot): ViT-B/L's head
    # dim 64, a padded half (80 -> 40 of 64), the backward's inverse rotation, fp16, and in place (inference).
    for dtype, head_dim, inverse, in_place in (("bf16", 64, False, False), ("bf16", 80, False, False),
                                               ("bf16", 64, True, False), ("fp16", 64, False, False),
                                               ("bf16", 64, False, True)):
        name = f"{dtype}-d{head_dim}{'-inverse' if inverse else ''}{'-in_place' if in_place else ''}"
        cases.append(_variant("rope", name, None, {"dtype": dtype, "head_dim": head_dim, "heads": 12, "seq": 261,
                                                   "inverse": inverse, "in_place": in_place}))
    # Tables with an angle per element (V-JEPA 2: head dim 64, in place in inference, the transpose in training).
    for inverse, in_place in ((False, True), (True, False)):
        name = f"bf16-d64-full{'-inverse' if inverse else ''}{'-in_place' if in_place else ''}"
        cases.append(_variant("rope", name, None, {"dtype": "bf16", "head_dim": 64, "heads": 16, "seq": 261,
                                                   "inverse": inverse, "in_place": in_place, "full": True}))
    # With the heads' RMSNorms first (`norm_rope_qkv`): Gemma 4's tower in place (head dim 72 -> 36 of 64, v's norm
    # too) and GLM-OCR's q / k norms out of place (training).
    # Their backward (fine-tuning): at 72 with v's norm, and at 64.
    for head_dim, norm, in_place, backward in ((72, "qkv", True, False), (64, "qk", False, False),
                                               (72, "qkv", False, True), (64, "qk", False, True)):
        name = f"bf16-d{head_dim}-norm_{norm}{'-in_place' if in_place else ''}{'-backward' if backward else ''}"
        cases.append(_variant("rope", name, None, {"dtype": "bf16", "head_dim": head_dim, "heads": 16, "seq": 261,
                                                   "inverse": False, "in_place": in_place, "norm": norm,
                                                   "backward": backward}))
    return cases


CASES = _cases()


def _compile_all(cache_dir: Path, shards: int = 1) -> dict:
    """Run the compile script over every case, the cases split over `shards` concurrent processes:
    {"skip": reason} or {"results": {case id: result}}."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VITFAST_AUTOTUNE")}
    env["TRITON_CACHE_DIR"] = str(cache_dir)  # fresh: a cache hit would skip ptxas and its register report
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cases = [p.values[0] for p in CASES]
    # stderr to files: a shard must never block on a full pipe while another one's output is read.
    errs = [tempfile.TemporaryFile("w+") for _ in range(shards)]
    procs = [subprocess.Popen([sys.executable, "-c", _COMPILE_SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=err, text=True, cwd=ROOT, env=env) for err in errs]
    for i, proc in enumerate(procs):           # every shard gets its cases before any is waited for
        proc.stdin.write(json.dumps(cases[i::shards]))
        proc.stdin.close()
    outs = [(proc.stdout.read(), proc.wait(timeout=900)) for proc in procs]
    results = {}
    for (stdout, rc), err in zip(outs, errs):
        err.seek(0)
        assert rc == 0, f"compile subprocess failed (rc {rc}):\n{err.read()[-6000:]}"
        out = json.loads(stdout.strip().splitlines()[-1])
        if "skip" in out:
            return out
        results.update(out["results"])
    return {"results": results}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{case id: result} for every case. Under pytest-xdist the workers share one compilation (the
    first to take the lock compiles, the others read its results) instead of each paying for it. The
    compilation is split over the machine's cores (up to 4) either way: a worker that waits for the lock
    leaves its core idle, and the compiling worker's shards take it."""
    shards = min(4, len(os.sched_getaffinity(0)))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent  # this run's directory, common to its workers
        with open(shared / "triton_compile.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = shared / "triton_compile.json"
            if not done.is_file():
                done.write_text(json.dumps(_compile_all(tmp_path_factory.mktemp("triton_cache"), shards)))
            out = json.loads(done.read_text())
    else:
        out = _compile_all(tmp_path_factory.mktemp("triton_cache"), shards)
    if "skip" in out:
        pytest.skip(out["skip"])
    return out["results"]


def test_case_ids_are_unique():
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_each_twin_has_a_case_that_compiles_every_config():
    """A twin compiles one config: the case it names, of the same kernel and variant and the same launch but for
    the dtype, the activation or the pre-activation's store, compiles every config the prune keeps."""
    cases = {p.id: p.values[0] for p in CASES}
    twins = {i: c for i, c in cases.items() if c["twin_of"]}
    assert twins
    for i, c in twins.items():
        anchor = cases.get(c["twin_of"])
        assert anchor is not None and anchor["twin_of"] is None and anchor["kernel"] == c["kernel"], i
        mine, theirs = ({"variant": "tiled", "preact": False, **case["launch"]} for case in (c, anchor))
        differ = {k for k in {**mine, **theirs} if mine.get(k) != theirs.get(k)}
        assert differ and differ <= {"dtype", "activation", "preact"}, \
            f"{i} differs from {c['twin_of']} in {sorted(differ)}"


@pytest.mark.parametrize("case", CASES)
def test_kept_configs_compile_for_sm90_with_wgmma_and_no_spills(case, compiled):
    """Every config the autotuner may pick for this ViT shape: compiles for sm_90a, fits Hopper's
    shared memory, runs its dots on warpgroup MMA (wgmma) in the kernel's dtype, spills nothing."""
    res = compiled[case["id"]]
    assert "error" not in res, f"{case['id']}: launch capture failed:\n{res['error']}"
    assert res["kept"], f"{case['id']}: the autotuner's prune keeps no config"
    dot = f".{case['dot']}.{case['dot']}"
    problems = []
    for idx, r in sorted(res["kept"].items(), key=lambda kv: int(kv[0])):
        what = f"config #{idx} ({r['config']})"
        if "error" in r:
            problems.append(f"{what} failed to compile for sm_90:\n{r['error']}")
            continue
        if r["target"] != "sm_90a":
            problems.append(f"{what}: the PTX targets {r['target']}, expected sm_90a")
        if r["regs"] is None or r["spill_stores"] is None:
            problems.append(f"{what}: ptxas -v reported nothing")
            continue
        if r["shared"] > HOPPER_SMEM:
            problems.append(f"{what} needs {r['shared']} bytes of shared memory, at most {HOPPER_SMEM}")
        if case["dot"] is None:                    # no dot (RoPE): no MMA expected either
            if r["n_wgmma"] or r["n_mma_sync"]:
                problems.append(f"{what}: unexpected MMA instructions {r['wgmma']}, {r['n_mma_sync']} mma.sync")
        elif r["n_wgmma"] == 0 or r["n_mma_sync"] != 0 or not all(op.endswith(dot) for op in r["wgmma"]):
            problems.append(f"{what}: expected {dot} wgmma.mma_async for the dots, found {r['wgmma']} "
                            f"and {r['n_mma_sync']} mma.sync")
        if (r["spill_stores"], r["spill_loads"]) != (0, 0):
            problems.append(f"{what} spills {r['spill_stores']} bytes stores / {r['spill_loads']} bytes loads "
                            f"({r['regs']} registers/thread)")
    assert not problems, f"{case['id']} (launch {case['launch']}):\n" + "\n".join(problems)
