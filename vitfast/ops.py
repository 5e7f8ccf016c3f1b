"""vitfast's public functional API.

Each op is a registered torch custom op (`torch.library`): input validation, device dispatch,
a fake (meta) implementation so `torch.compile(fullgraph=True)` traces it, and autograd without the
reference math (attention: FlashAttention-2 backward kernels; linear and patch embedding: GEMMs with
the epilogue's derivatives; LayerNorm and RMSNorm: the extension's backward kernels from the saved row statistics;
torch's own backward on torch's path). A call that needs none of that (plain tensors, nothing to
differentiate, no torch.compile / export tracing) skips the dispatcher and runs the implementation
directly: the custom-op layer costs tens of microseconds of host time per call. Dispatch:
- CUDA tensors -> the Triton kernels (`vitfast.kernels`) / the CUDA extension (`vitfast._C`);
- CPU tensors  -> torch's fastest CPU kernels (`vitfast.reference.torch_*`: SDPA, F.linear, F.conv2d;
  oneDNN's GEMM with the epilogue fused where that is faster) and the C++ CPU LayerNorm / RMSNorm, or, when
  TRITON_INTERPRET=1 was set before import, the Triton kernels in Triton's interpreter. float64 (no
  kernel) takes the same torch path on any device.
Bad input raises ValueError naming the argument, what was expected and what came.
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from vitfast import reference, tuning

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: Tensor) -> bool:
    """Triton kernels run on CUDA tensors, and on CPU tensors under Triton's interpreter."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")


def _fail(msg: str):
    raise ValueError(msg)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
_KERNELS = None


def _kernels():
    """vitfast.kernels with its four launchers, imported on first use (it imports Triton)."""
    global _KERNELS
    if _KERNELS is None:
        import vitfast.kernels.attention
        import vitfast.kernels.linear
        import vitfast.kernels.patch_embed
        import vitfast.kernels.rope  # noqa: F401
        tuning.install(vitfast.kernels)      # autotune results kept on disk per GPU and versions
        _KERNELS = vitfast.kernels
    return _KERNELS


def _direct(*tensors) -> bool:
    """Whether a call may run the op's implementation without the custom-op dispatcher: not traced by
    torch.compile / export, only plain tensors (no FakeTensor or other subclass), none to differentiate."""
    if torch.compiler.is_compiling():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or (grad and t.requires_grad)):
            return False
    return True


def _check_float(name: str, t: Tensor, allowed=(torch.float16, torch.bfloat16, torch.float32, torch.float64)):
    if not isinstance(t, Tensor):
        _fail(f"{name}: expected a Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        _fail(f"{name}: expected dtype in {[str(d) for d in allowed]}, got {t.dtype}")


def _check_same(name: str, t: Tensor, ref_name: str, ref: Tensor):
    _check_like(name, t, ref_name, ref.device, ref.dtype)


def _check_like(name: str, t: Tensor, ref_name: str, device: torch.device, dtype: torch.dtype):
    if t.device != device:
        _fail(f"{name}: expected device {device} (like {ref_name}), got {t.device}")
    if t.dtype != dtype:
        _fail(f"{name}: expected dtype {dtype} (like {ref_name}), got {t.dtype}")


# ============================================================================================
# layer_norm / add_layer_norm / rms_norm  (csrc/, vitfast._C)
# ============================================================================================
# The ops are defined in C++ (csrc/ops.cpp: CPU and CUDA kernels, TORCH_CHECKs); importing the
# extension registers torch.ops.vitfast.layer_norm / add_layer_norm / rms_norm. Here: fake impls,
# autograd, and the argument checks of the public functions.
try:
    from vitfast import _C  # noqa: F401
    _C_ERROR = None
except (ImportError, OSError) as _e:  # not built, or built against another torch
    _C_ERROR = _e

_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _require_extension():
    if _C_ERROR is not None:
        raise RuntimeError(f"vitfast._C (the C++/CUDA LayerNorm / RMSNorm extension) could not be loaded: {_C_ERROR}. "
                           "Build it in the vitfast checkout with `pip install --no-build-isolation -e .`")


def _check_norm(x, residual, params, eps) -> None:
    """params: the (name, tensor) pairs of the per-column parameters, weight first: weight and bias for
    layer_norm / add_layer_norm, weight alone for rms_norm."""
    _check_float("x", x, _NORM_DTYPES)
    shape, device, dtype = x.shape, x.device, x.dtype
    if not shape:
        _fail("x: expected at least 1 dim [..., C], got a 0-dim tensor")
    if dtype == torch.float64 and device.type == "cuda":
        _fail("x: expected dtype torch.float16, torch.bfloat16 or torch.float32 on CUDA, got torch.float64")
    C = shape[-1]
    for name, t in params:
        _check_float(name, t, _NORM_DTYPES)
        if t.shape != (C,):
            _fail(f"{name}: expected shape ({C},) (the last dim of x {tuple(shape)}), got {tuple(t.shape)}")
        if t.device != device:
            _fail(f"{name}: expected device {device} (like x), got {t.device}")
    weight = params[0][1]
    if weight.dtype not in (torch.float32, dtype):
        _fail(f"weight: expected dtype {dtype} (like x){'' if dtype == torch.float32 else ' or torch.float32'}"
              f", got {weight.dtype}")
    for name, t in params[1:]:
        if t.dtype != weight.dtype:
            _fail(f"{name}: expected dtype {weight.dtype} (like weight), got {t.dtype}")
    if residual is not None:
        _check_float("residual", residual, _NORM_DTYPES)
        _check_same("residual", residual, "x", x)
        if residual.shape != shape:
            _fail(f"residual: expected shape {tuple(shape)} (like x), got {tuple(residual.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        _fail(f"eps: expected a finite number >= 0, got {eps!r}")


# Autograd: the *_stats forms of the ops also return each row's mean and rstd (rms_norm: rstd alone; fp32,
# fp64 for fp64 x), which the backward kernels (`layer_norm_backward`: dx, dweight, dbias;
# `rms_norm_backward`: dx, dweight) read; the plain ops, called through torch.ops with something to
# differentiate, recompute them with one stats forward.
def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


if _C_ERROR is None:
    @torch.library.register_fake("vitfast::layer_norm")
    def _layer_norm_fake(x, weight, bias, eps):
        return x.new_empty(x.shape)  # contiguous, like the C++ op

    @torch.library.register_fake("vitfast::add_layer_norm")
    def _add_layer_norm_fake(x, residual, weight, bias, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape)

    @torch.library.register_fake("vitfast::layer_norm_stats")
    def _layer_norm_stats_fake(x, weight, bias, eps):
        stats = x.new_empty(x.shape[:-1], dtype=_stats_dtype(x))
        return x.new_empty(x.shape), stats, stats.new_empty(stats.shape)

    @torch.library.register_fake("vitfast::add_layer_norm_stats")
    def _add_layer_norm_stats_fake(x, residual, weight, bias, eps):
        stats = x.new_empty(x.shape[:-1], dtype=_stats_dtype(x))
        return x.new_empty(x.shape), x.new_empty(x.shape), stats, stats.new_empty(stats.shape)

    @torch.library.register_fake("vitfast::layer_norm_backward")
    def _layer_norm_backward_fake(dy, x, mean, rstd, weight):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)

    @torch.library.register_fake("vitfast::rms_norm")
    def _rms_norm_fake(x, weight, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake("vitfast::rms_norm_stats")
    def _rms_norm_stats_fake(x, weight, eps):
        return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=_stats_dtype(x))

    @torch.library.register_fake("vitfast::rms_norm_backward")
    def _rms_norm_backward_fake(dy, x, rstd, weight):
        return x.new_empty(x.shape), weight.new_empty(weight.shape)

    def _ln_stats_setup(ctx, inputs, output):
        x, weight = inputs[0], inputs[1]
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def _ln_stats_backward(ctx, dy, _dmean, _drstd):
        x, weight, mean, rstd = ctx.saved_tensors
        return (*torch.ops.vitfast.layer_norm_backward.default(dy, x, mean, rstd, weight), None)

    def _add_ln_stats_setup(ctx, inputs, output):
        weight = inputs[2]
        _, s, mean, rstd = output
        ctx.save_for_backward(s, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def _add_ln_stats_backward(ctx, dy, ds, _dmean, _drstd):
        """y = LN(s), s = x + residual (also returned): ds_total = LN's dx + the returned s's gradient, for
        both x and residual."""
        s, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = torch.ops.vitfast.layer_norm_backward.default(dy, s, mean, rstd, weight)
        dx = dx if ds is None else dx + ds
        return dx, dx, dw, db, None

    def _ln_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3])
        ctx.eps = inputs[3]

    def _ln_backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        _, mean, rstd = torch.ops.vitfast.layer_norm_stats.default(x, weight, bias, ctx.eps)
        return (*torch.ops.vitfast.layer_norm_backward.default(dy, x, mean, rstd, weight), None)

    def _add_ln_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.eps = inputs[4]

    def _add_ln_backward(ctx, dy, ds):
        x, residual, weight, bias = ctx.saved_tensors
        _, s, mean, rstd = torch.ops.vitfast.add_layer_norm_stats.default(x, residual, weight, bias, ctx.eps)
        dx, dw, db = torch.ops.vitfast.layer_norm_backward.default(dy, s, mean, rstd, weight)
        dx = dx if ds is None else dx + ds
        return dx, dx, dw, db, None

    torch.library.register_autograd("vitfast::layer_norm_stats", _ln_stats_backward, setup_context=_ln_stats_setup)
    torch.library.register_autograd("vitfast::add_layer_norm_stats", _add_ln_stats_backward,
                                    setup_context=_add_ln_stats_setup)
    torch.library.register_autograd("vitfast::layer_norm", _ln_backward, setup_context=_ln_setup)
    torch.library.register_autograd("vitfast::add_layer_norm", _add_ln_backward, setup_context=_add_ln_setup)

    def _rms_stats_setup(ctx, inputs, output):
        x, weight = inputs[0], inputs[1]
        _, rstd = output
        ctx.save_for_backward(x, weight, rstd)
        ctx.mark_non_differentiable(rstd)

    def _rms_stats_backward(ctx, dy, _drstd):
        x, weight, rstd = ctx.saved_tensors
        return (*torch.ops.vitfast.rms_norm_backward.default(dy, x, rstd, weight), None)

    def _rms_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:2])
        ctx.eps = inputs[2]

    def _rms_backward(ctx, dy):
        x, weight = ctx.saved_tensors
        _, rstd = torch.ops.vitfast.rms_norm_stats.default(x, weight, ctx.eps)
        return (*torch.ops.vitfast.rms_norm_backward.default(dy, x, rstd, weight), None)

    torch.library.register_autograd("vitfast::rms_norm_stats", _rms_stats_backward, setup_context=_rms_stats_setup)
    torch.library.register_autograd("vitfast::rms_norm", _rms_backward, setup_context=_rms_setup)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias (biased var).

    x [..., C] float16 / bfloat16 / float32 (float64 on the CPU), any strides (a non-contiguous x is
    copied once); weight, bias [C] in x's dtype or float32, on x's device. Statistics in fp32.
    Returns y [..., C], contiguous, in x's dtype. CUDA kernel on CUDA tensors, C++ kernel on CPU.
    """
    _check_norm(x, None, (("weight", weight), ("bias", bias)), eps)
    _require_extension()
    if _direct(x, weight, bias):
        return torch.ops.vitfast.layer_norm.default(x, weight, bias, float(eps))
    return torch.ops.vitfast.layer_norm_stats.default(x, weight, bias, float(eps))[0]     # saves mean, rstd


def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor,
                   eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The pre-LN residual step in one pass: s = x + residual, returns (layer_norm(s), s).

    x, residual [..., C] of one dtype and device; weight, bias [C] as in `layer_norm`. s is rounded
    to x's dtype before it is normalized (as eager `F.layer_norm(x + residual)` does). Both outputs
    contiguous, in x's dtype.
    """
    _check_norm(x, residual, (("weight", weight), ("bias", bias)), eps)
    _require_extension()
    if _direct(x, residual, weight, bias):
        return torch.ops.vitfast.add_layer_norm.default(x, residual, weight, bias, float(eps))
    y, s, _, _ = torch.ops.vitfast.add_layer_norm_stats.default(x, residual, weight, bias, float(eps))
    return y, s


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim: x / sqrt(mean(x²) + eps) * weight (no mean subtracted, no bias), as Hugging
    Face's Qwen2RMSNorm (Qwen2.5-VL's vision tower) and AIMv2's and InternViT's RMSNorm compute it.

    x [..., C] float16 / bfloat16 / float32 (float64 on the CPU), any strides (a non-contiguous x is
    copied once); weight [C] in x's dtype or float32, on x's device. Computed in fp32 (fp64 for float64 x)
    and rounded once (HF rounds x / rms to x's dtype before the weight: within one rounding of this).
    Returns y [..., C], contiguous, in x's dtype. CUDA kernel on CUDA tensors, C++ kernel on CPU.
    """
    _check_norm(x, None, (("weight", weight),), eps)
    _require_extension()
    if _direct(x, weight):
        return torch.ops.vitfast.rms_norm.default(x, weight, float(eps))
    return torch.ops.vitfast.rms_norm_stats.default(x, weight, float(eps))[0]     # saves rstd


# ============================================================================================
# attention / attention_qkv  (kernels/attention.py)
# ============================================================================================
_ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MAX_HEAD_DIM = 256


def _attention_on_triton(t: Tensor) -> bool:
    """fp16 / bf16 / fp32 go to the Triton kernel; float64 (never a fast path) to the reference, and
    so does bf16 under the interpreter, whose bf16 tl.dot is wrong."""
    if not use_triton(t) or t.dtype == torch.float64:
        return False
    return not (t.device.type == "cpu" and t.dtype == torch.bfloat16)


def _check_unit_last(name: str, t: Tensor):
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(f"{name}: expected a unit-stride last dim, got strides {tuple(t.stride())}")


def _check_head_dim(name: str, d: int):
    if not 1 <= d <= _MAX_HEAD_DIM:
        _fail(f"{name}: expected a head dim in [1, {_MAX_HEAD_DIM}], got {d}")


def _check_key_mask(key_mask, batch: int, n_kv: int, dims_from: str, ref_name: str, device: torch.device):
    """A key-padding mask: torch.bool [B, N_kv] (any strides) on the attention's device."""
    if key_mask is None:
        return
    if not isinstance(key_mask, Tensor):
        _fail(f"key_mask: expected a torch.bool Tensor or None, got {type(key_mask).__name__}")
    if key_mask.dtype != torch.bool:
        _fail(f"key_mask: expected dtype torch.bool, got {key_mask.dtype}")
    if tuple(key_mask.shape) != (batch, n_kv):
        _fail(f"key_mask: expected shape [B, N_kv] = [{batch}, {n_kv}] ({dims_from}), got {tuple(key_mask.shape)}")
    if key_mask.device != device:
        _fail(f"key_mask: expected device {device} (like {ref_name}), got {key_mask.device}")


def _check_varlen(cu_seqlens, max_seqlen, batch: int, n_q: int, n_kv: int, ref_name: str, device: torch.device,
                  key_mask=None, return_cls_attn: bool = False) -> int | None:
    """Packed variable-length segments: cu_seqlens int32 [S + 1] on the attention's device, one packed
    sequence (B = 1, N_q = N_kv = T), max_seqlen None or an int >= 1, neither key_mask nor the CLS row.
    Where reading the values costs no device sync (CPU tensors, not traced) they are checked too: cu[0] = 0,
    non-decreasing, cu[S] = T, max_seqlen >= the longest segment. Returns max_seqlen, computed when None
    (a device sync on CUDA, refused while a CUDA graph is being captured), or None while torch.compile
    traces (the op computes it when it runs)."""
    if cu_seqlens is None:
        if max_seqlen is not None:
            _fail(f"max_seqlen: expected None without cu_seqlens, got {max_seqlen!r}")
        return None
    if not isinstance(cu_seqlens, Tensor):
        _fail(f"cu_seqlens: expected a torch.int32 Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        _fail(f"cu_seqlens: expected dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        _fail(f"cu_seqlens: expected shape [S + 1] with S >= 1 segments, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        _fail(f"cu_seqlens: expected device {device} (like {ref_name}), got {cu_seqlens.device}")
    if batch != 1:
        _fail(f"{ref_name}: expected batch size 1 with cu_seqlens (the segments packed into one sequence), "
              f"got {batch}")
    if n_q != n_kv:
        _fail(f"k: expected N_kv = N_q = {n_q} with cu_seqlens (self-attention within each segment), got {n_kv}")
    if key_mask is not None:
        _fail("key_mask: expected None with cu_seqlens (the two are not supported together), got a Tensor")
    if return_cls_attn:
        _fail("return_cls_attn: expected False with cu_seqlens (not supported together), got True")
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1):
        _fail(f"max_seqlen: expected an int >= 1 or None, got {max_seqlen!r}")
    if torch.compiler.is_compiling() or type(cu_seqlens) not in _PLAIN_TENSORS:
        return max_seqlen
    if cu_seqlens.device.type == "cpu":
        bounds = cu_seqlens.tolist()
        if bounds[0] != 0:
            _fail(f"cu_seqlens: expected cu_seqlens[0] = 0, got {bounds[0]}")
        if any(b < a for a, b in zip(bounds, bounds[1:])):
            _fail(f"cu_seqlens: expected non-decreasing boundaries, got {bounds}")
        if bounds[-1] != n_q:
            _fail(f"cu_seqlens: expected cu_seqlens[-1] = {n_q} (the tokens of {ref_name}), got {bounds[-1]}")
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        if max_seqlen is not None and max_seqlen < longest:
            _fail(f"max_seqlen: expected at least the longest segment, {longest}, got {max_seqlen}")
        return max(1, longest) if max_seqlen is None else max_seqlen
    return _max_seqlen(cu_seqlens, max_seqlen)


def _max_seqlen(cu_seqlens: Tensor, max_seqlen: int | None) -> int:
    """max_seqlen, or the longest segment of cu_seqlens when it is None: read from the device (a sync), which
    a CUDA graph being captured cannot contain."""
    if max_seqlen is not None:
        return max_seqlen
    if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        _fail("max_seqlen: expected an int while a CUDA graph is being captured (computing it from cu_seqlens "
              "reads the device, a sync the capture cannot contain), got None")
    return max(1, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))


def _attention_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) < float("inf"):
        _fail(f"scale: expected a finite number or None, got {scale!r}")
    return float(scale)


# The ops return each query row's log-sum-exp (log2 domain, [B, H, N_Q] fp32) next to the output: the
# Triton backward (FlashAttention-2) rebuilds the probabilities from it. On torch's path (CPU, float64)
# it is zeros and unused: there the backward is SDPA's own, through autograd on a recomputed forward.
# key_mask (bool [B, N_kv] or None) goes to the kernels / SDPA as it is; it has no gradient. So does
# cu_seqlens (int32 [S + 1], packed segments: lse is then per token, [1, H, T]); max_seqlen None (the op was
# traced by torch.compile before it was known) is computed where the kernels need it.
def _attention_impl(q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None = None,
                    cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                    with_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """(out, lse); with_lse=False (a direct call: nothing to differentiate) skips the lse."""
    if _attention_on_triton(q):
        lse = q.new_empty(q.shape[:3], dtype=torch.float32) if with_lse else None   # every row written
        if cu_seqlens is not None:
            max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        return _kernels().attention.attention(q, k, v, scale, lse=lse, key_mask=key_mask, cu_seqlens=cu_seqlens,
                                              max_seqlen=max_seqlen), lse
    lse = q.new_zeros(q.shape[:3], dtype=torch.float32) if with_lse else None
    return reference.torch_attention(q, k, v, scale, key_mask, cu_seqlens).contiguous(), lse


def _attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, key_mask: Tensor | None = None,
                        cu_seqlens: Tensor | None = None, max_seqlen: int | None = None) -> tuple[Tensor, Tensor]:
    return _attention_impl(q, k, v, scale, key_mask, cu_seqlens, max_seqlen)


_attention_op = torch.library.custom_op("vitfast::attention", _attention_with_lse, mutates_args=())


@_attention_op.register_fake
def _(q, k, v, scale, key_mask=None, cu_seqlens=None, max_seqlen=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_bwd_impl(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                        scale: float, key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                        max_seqlen: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
    return _kernels().attention.attention_backward(q, k, v, out, lse, dout, scale, key_mask=key_mask,
                                                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def _recompute_grads(fn, inputs, grads, wanted=None):
    """torch's own backward of fn (SDPA's, conv's) on a recomputed forward: the gradients of `inputs`
    (None for those not `wanted`, non-float or None). Runs in an autograd formula, where autograd records
    (inside a custom op's implementation it would not)."""
    wanted = [True] * len(inputs) if wanted is None else wanted
    with torch.enable_grad():
        args = [t.detach().requires_grad_(bool(w)) if isinstance(t, Tensor) and t.is_floating_point() else t
                for t, w in zip(inputs, wanted)]
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
        wrt = [a for a in args if isinstance(a, Tensor) and a.requires_grad]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs]))
        return tuple(next(got) if isinstance(a, Tensor) and a.requires_grad else None for a in args)


_attention_bwd_op = torch.library.custom_op("vitfast::attention_backward", _attention_bwd_impl, mutates_args=())


@_attention_bwd_op.register_fake
def _(q, k, v, out, lse, dout, scale, key_mask=None, cu_seqlens=None, max_seqlen=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, key_mask, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, cu_seqlens)
    ctx.scale, ctx.max_seqlen = scale, max_seqlen
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, key_mask, cu_seqlens = ctx.saved_tensors
    if _attention_on_triton(q):
        return (*_attention_bwd_op(q, k, v, out, lse, dout, ctx.scale, key_mask, cu_seqlens, ctx.max_seqlen),
                None, None, None, None)
    fn = lambda *a: reference.torch_attention(*a, ctx.scale, key_mask, cu_seqlens)
    return (*_recompute_grads(fn, (q, k, v), (dout,)), None, None, None, None)


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup)


# Steady state of attention_qkv on the Triton path: qkv's layout, heads, scale and outputs -> the launch plan
# (`kernels.attention.qkv_plan`), so that a call seen before builds one small key, allocates and launches.
# (Each plan table holds one entry per layout; past _MAX_PLANS, many batch sizes say, it starts again.)
_ATTENTION_PLANS: dict[tuple, object] = {}
_MAX_PLANS = 4096


def _attention_qkv_triton(qkv: Tensor, num_heads: int, scale: float, return_cls_attn: bool, lse: Tensor | None,
                          key_mask: Tensor | None, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None):
    """The Triton launch of attention_qkv (max_seqlen an int whenever cu_seqlens is given)."""
    attention = _kernels().attention
    if qkv.shape[0] == 0:
        return attention.attention_qkv(qkv, num_heads, scale, return_cls_attn=return_cls_attn, lse=lse,
                                       key_mask=key_mask)
    key = (qkv.shape, qkv.stride(), qkv.dtype, qkv.device, num_heads, scale, return_cls_attn, lse is not None,
           None if cu_seqlens is None else (cu_seqlens.shape[0], max_seqlen),
           None if key_mask is None else key_mask.stride(), qkv.dtype == torch.float32 and _kernels().tf32_enabled())
    plan = _ATTENTION_PLANS.get(key)
    if plan is None:
        if len(_ATTENTION_PLANS) >= _MAX_PLANS:
            _ATTENTION_PLANS.clear()
        plan = _ATTENTION_PLANS[key] = attention.qkv_plan(qkv, num_heads, scale, return_cls_attn, lse is not None,
                                                          key_mask, cu_seqlens, max_seqlen)
    return attention.qkv_run(plan, qkv, lse, key_mask, cu_seqlens)


def _attention_qkv_impl(qkv: Tensor, num_heads: int, scale: float, return_cls_attn: bool,
                        key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                        max_seqlen: int | None = None, with_lse: bool = True
                        ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(out, cls_attn, lse). The op (with_lse=True) returns an empty cls_attn when it was not asked for;
    a direct call (with_lse=False: nothing to differentiate) gets None there and no lse."""
    B, N, _ = qkv.shape
    if _attention_on_triton(qkv):
        lse = qkv.new_empty((B, num_heads, N), dtype=torch.float32) if with_lse else None   # every row written
        if cu_seqlens is not None:
            max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
        out, cls_attn = _attention_qkv_triton(qkv, num_heads, scale, return_cls_attn, lse, key_mask, cu_seqlens,
                                              max_seqlen)
    else:
        lse = qkv.new_zeros((B, num_heads, N), dtype=torch.float32) if with_lse else None
        if return_cls_attn:
            out, cls_attn = reference.torch_attention_qkv(qkv, num_heads, scale, True, key_mask)
            cls_attn = cls_attn.contiguous()
        else:
            out, cls_attn = reference.torch_attention_qkv(qkv, num_heads, scale, False, key_mask, cu_seqlens), None
        out = out.contiguous()
    if cls_attn is None and with_lse:
        cls_attn = qkv.new_empty(0, dtype=torch.float32)
    return out, cls_attn, lse


def _attention_qkv_with_lse(qkv: Tensor, num_heads: int, scale: float, return_cls_attn: bool,
                            key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                            max_seqlen: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    return _attention_qkv_impl(qkv, num_heads, scale, return_cls_attn, key_mask, cu_seqlens, max_seqlen)


_attention_qkv_op = torch.library.custom_op("vitfast::attention_qkv", _attention_qkv_with_lse, mutates_args=())


@_attention_qkv_op.register_fake
def _(qkv, num_heads, scale, return_cls_attn, key_mask=None, cu_seqlens=None, max_seqlen=None):
    B, N, C3 = qkv.shape
    cls_shape = (B, num_heads, N) if return_cls_attn else (0,)
    return (qkv.new_empty(B, N, C3 // 3), qkv.new_empty(cls_shape, dtype=torch.float32),
            qkv.new_empty((B, num_heads, N), dtype=torch.float32))


def _attention_qkv_bwd_impl(qkv: Tensor, out: Tensor, lse: Tensor, dout: Tensor, num_heads: int,
                            scale: float, key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                            max_seqlen: int | None = None) -> Tensor:
    if cu_seqlens is not None:
        max_seqlen = _max_seqlen(cu_seqlens, max_seqlen)
    return _kernels().attention.attention_qkv_backward(qkv, out, lse, dout, num_heads, scale, key_mask=key_mask,
                                                       cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


_attention_qkv_bwd_op = torch.library.custom_op("vitfast::attention_qkv_backward", _attention_qkv_bwd_impl,
                                                mutates_args=())


@_attention_qkv_bwd_op.register_fake
def _(qkv, out, lse, dout, num_heads, scale, key_mask=None, cu_seqlens=None, max_seqlen=None):
    return qkv.new_empty(qkv.shape)


def _attention_qkv_setup(ctx, inputs, output):
    qkv, num_heads, scale, _, key_mask, cu_seqlens, max_seqlen = inputs
    out, cls_attn, lse = output
    ctx.save_for_backward(qkv, out, lse, key_mask, cu_seqlens)
    ctx.num_heads, ctx.scale, ctx.max_seqlen = num_heads, scale, max_seqlen
    ctx.mark_non_differentiable(lse)


def _attention_qkv_backward(ctx, dout, dcls, _dlse):
    qkv, out, lse, key_mask, cu_seqlens = ctx.saved_tensors
    dcls = dcls if dcls is not None and dcls.numel() else None
    no_grads = (None,) * 6                  # num_heads, scale, return_cls_attn, key_mask, cu_seqlens, max_seqlen
    if dcls is None and _attention_on_triton(qkv):
        return _attention_qkv_bwd_op(qkv, out, lse, dout, ctx.num_heads, ctx.scale, key_mask, cu_seqlens,
                                     ctx.max_seqlen), *no_grads
    # torch's path, or a gradient through the CLS attention row: SDPA's backward on a recomputed forward
    # (the CLS row's own is O(N): one query).
    fn = lambda x: reference.torch_attention_qkv(x, ctx.num_heads, ctx.scale, dcls is not None, key_mask, cu_seqlens)
    return _recompute_grads(fn, (qkv,), (dout, dcls))[0], *no_grads


_attention_qkv_op.register_autograd(_attention_qkv_backward, setup_context=_attention_qkv_setup)


def _attention_rel_pos_impl(qkv: Tensor, rel_h: Tensor, rel_w: Tensor, num_heads: int, scale: float,
                            with_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """(out, lse): lse [B, H, N] fp32 for the backward kernels when with_lse (zeros on torch's path), else None."""
    B, N, _ = qkv.shape
    if not _attention_on_triton(qkv):
        out = reference.torch_attention_qkv(qkv, num_heads, scale, rel_pos=(rel_h, rel_w)).contiguous()
        return out, (qkv.new_zeros((B, num_heads, N), dtype=torch.float32) if with_lse else None)
    if B == 0:                                                                     # no program to launch
        return qkv.new_empty(B, N, qkv.shape[2] // 3), (qkv.new_empty((B, num_heads, N), dtype=torch.float32)
                                                        if with_lse else None)
    attention = _kernels().attention
    grid = (rel_h.shape[-1], rel_w.shape[-1])
    key = ("rel_pos", qkv.shape, qkv.stride(), qkv.dtype, qkv.device, num_heads, scale, grid, with_lse,
           qkv.dtype == torch.float32 and _kernels().tf32_enabled())
    plan = _ATTENTION_PLANS.get(key)
    if plan is None:
        if len(_ATTENTION_PLANS) >= _MAX_PLANS:
            _ATTENTION_PLANS.clear()
        plan = _ATTENTION_PLANS[key] = attention.qkv_plan(qkv, num_heads, scale, False, with_lse, rel_kh_kw=grid)
    lse = qkv.new_empty((B, num_heads, N), dtype=torch.float32) if with_lse else None          # every row written
    return attention.qkv_run(plan, qkv, lse, rel_pos=(rel_h, rel_w))[0], lse


def _attention_rel_pos_with_lse(qkv: Tensor, rel_h: Tensor, rel_w: Tensor, num_heads: int, scale: float
                                ) -> tuple[Tensor, Tensor]:
    return _attention_rel_pos_impl(qkv, rel_h, rel_w, num_heads, scale)


_attention_rel_pos_op = torch.library.custom_op("vitfast::attention_qkv_rel_pos", _attention_rel_pos_with_lse,
                                                mutates_args=())


@_attention_rel_pos_op.register_fake
def _(qkv, rel_h, rel_w, num_heads, scale):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


def _attention_rel_pos_bwd_impl(qkv: Tensor, rel_h: Tensor, rel_w: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                                num_heads: int, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    drel = (torch.empty_like(rel_h), torch.empty_like(rel_w))
    dqkv = _kernels().attention.attention_qkv_backward(qkv, out, lse, dout, num_heads, scale,
                                                       rel_pos=(rel_h, rel_w), drel=drel)
    return dqkv, *drel


_attention_rel_pos_bwd_op = torch.library.custom_op("vitfast::attention_qkv_rel_pos_backward",
                                                    _attention_rel_pos_bwd_impl, mutates_args=())


@_attention_rel_pos_bwd_op.register_fake
def _(qkv, rel_h, rel_w, out, lse, dout, num_heads, scale):
    return qkv.new_empty(qkv.shape), rel_h.new_empty(rel_h.shape), rel_w.new_empty(rel_w.shape)


def _attention_rel_pos_setup(ctx, inputs, output):
    qkv, rel_h, rel_w, ctx.num_heads, ctx.scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, rel_h, rel_w, out, lse)
    ctx.mark_non_differentiable(lse)


def _attention_rel_pos_backward(ctx, dout, _dlse):
    # The Triton path: FlashAttention-2's backward kernels with the terms in the scores, their gradients summed in
    # the dQ kernel. torch's path: SDPA's backward on a recomputed forward with the N x N bias.
    qkv, rel_h, rel_w, out, lse = ctx.saved_tensors
    if _attention_on_triton(qkv):
        grads = _attention_rel_pos_bwd_op(qkv, rel_h, rel_w, out, lse, dout, ctx.num_heads, ctx.scale)
        grads = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))
    else:
        fn = lambda x, h, w: reference.torch_attention_qkv(x, ctx.num_heads, ctx.scale, rel_pos=(h, w))
        grads = _recompute_grads(fn, (qkv, rel_h, rel_w), (dout,), ctx.needs_input_grad[:3])
    return *grads, None, None


_attention_rel_pos_op.register_autograd(_attention_rel_pos_backward, setup_context=_attention_rel_pos_setup)


def _check_rel_pos(rel_pos, qkv: Tensor, num_heads: int, key_mask, cu_seqlens, return_cls_attn
                   ) -> tuple[Tensor, Tensor]:
    """attention_qkv's rel_pos checked -> (rel_h, rel_w) in float32 (float64 for a float64 qkv), contiguous."""
    if not isinstance(rel_pos, (tuple, list)) or len(rel_pos) != 2:
        _fail(f"rel_pos: expected a pair (rel_h, rel_w), got {type(rel_pos).__name__}")
    given = [name for name, t in (("key_mask", key_mask), ("cu_seqlens", cu_seqlens)) if t is not None]
    given += ["return_cls_attn=True"] if return_cls_attn else []
    if given:
        _fail(f"rel_pos: expected no key_mask, cu_seqlens or return_cls_attn with it (not supported together), got "
              f"{', '.join(given)}")
    B, N = qkv.shape[:2]
    dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    out = []
    for name, t in zip(("rel_h", "rel_w"), rel_pos):
        _check_float(name, t)
        _check_like(name, t, "qkv", qkv.device, t.dtype)
        if t.dim() != 4 or tuple(t.shape[:3]) != (B, num_heads, N) or t.shape[3] < 1:
            _fail(f"{name}: expected [B, H, N, K] = [{B}, {num_heads}, {N}, K >= 1] (B, N of qkv, its heads), got "
                  f"{tuple(t.shape)}")
        out.append(t.to(dtype).contiguous())
    if out[0].shape[3] * out[1].shape[3] != N:
        _fail(f"rel_pos: expected a KH x KW grid of the N = {N} tokens, got KH = {out[0].shape[3]}, "
              f"KW = {out[1].shape[3]}")
    return out[0], out[1]


def _attention_bias_impl(qkv: Tensor, bias: Tensor, num_heads: int, scale: float, key_mask: Tensor | None = None,
                         with_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """(out, lse): lse [B, H, N] fp32 for the backward kernels when with_lse (zeros on torch's path), else None."""
    B, N, _ = qkv.shape
    if not _attention_on_triton(qkv):
        out = reference.torch_attention_qkv(qkv, num_heads, scale, key_mask=key_mask, attn_bias=bias).contiguous()
        return out, (qkv.new_zeros((B, num_heads, N), dtype=torch.float32) if with_lse else None)
    if B == 0:                                                                     # no program to launch
        return qkv.new_empty(B, N, qkv.shape[2] // 3), (qkv.new_empty((B, num_heads, N), dtype=torch.float32)
                                                        if with_lse else None)
    attention = _kernels().attention
    key = ("bias", qkv.shape, qkv.stride(), qkv.dtype, qkv.device, num_heads, scale, with_lse, bias.shape,
           bias.stride(), bias.dtype, None if key_mask is None else key_mask.stride(),
           qkv.dtype == torch.float32 and _kernels().tf32_enabled())
    plan = _ATTENTION_PLANS.get(key)
    if plan is None:
        if len(_ATTENTION_PLANS) >= _MAX_PLANS:
            _ATTENTION_PLANS.clear()
        plan = _ATTENTION_PLANS[key] = attention.qkv_plan(qkv, num_heads, scale, False, with_lse, key_mask,
                                                          bias=bias)
    lse = qkv.new_empty((B, num_heads, N), dtype=torch.float32) if with_lse else None          # every row written
    return attention.qkv_run(plan, qkv, lse, key_mask, bias=bias)[0], lse


def _attention_bias_with_lse(qkv: Tensor, bias: Tensor, num_heads: int, scale: float,
                             key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return _attention_bias_impl(qkv, bias, num_heads, scale, key_mask)


_attention_bias_op = torch.library.custom_op("vitfast::attention_qkv_bias", _attention_bias_with_lse, mutates_args=())


@_attention_bias_op.register_fake
def _(qkv, bias, num_heads, scale, key_mask=None):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


def _attention_bias_bwd_impl(qkv: Tensor, bias: Tensor, out: Tensor, lse: Tensor, dout: Tensor, num_heads: int,
                             scale: float, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    dbias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)      # the kernel adds into it
    dqkv = _kernels().attention.attention_qkv_backward(qkv, out, lse, dout, num_heads, scale, key_mask=key_mask,
                                                       bias=bias, dbias=dbias)
    return dqkv, dbias.to(bias.dtype)


_attention_bias_bwd_op = torch.library.custom_op("vitfast::attention_qkv_bias_backward", _attention_bias_bwd_impl,
                                                 mutates_args=())


@_attention_bias_bwd_op.register_fake
def _(qkv, bias, out, lse, dout, num_heads, scale, key_mask=None):
    return qkv.new_empty(qkv.shape), bias.new_empty(bias.shape)


def _attention_bias_setup(ctx, inputs, output):
    qkv, bias, ctx.num_heads, ctx.scale, key_mask = inputs
    out, lse = output
    ctx.save_for_backward(qkv, bias, out, lse, key_mask)
    ctx.mark_non_differentiable(lse)


def _attention_bias_backward(ctx, dout, _dlse):
    # The Triton path: FlashAttention-2's backward kernels with the bias in the scores, its gradient (dS) added in
    # the dQ kernel. torch's path: SDPA's backward on a recomputed forward.
    qkv, bias, out, lse, key_mask = ctx.saved_tensors
    if _attention_on_triton(qkv):
        grads = _attention_bias_bwd_op(qkv, bias, out, lse, dout, ctx.num_heads, ctx.scale, key_mask)
        grads = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad))
    else:
        fn = lambda x, b: reference.torch_attention_qkv(x, ctx.num_heads, ctx.scale, key_mask=key_mask, attn_bias=b)
        grads = _recompute_grads(fn, (qkv, bias), (dout,), ctx.needs_input_grad[:2])
    return *grads, None, None, None


_attention_bias_op.register_autograd(_attention_bias_backward, setup_context=_attention_bias_setup)


def _check_attn_bias(attn_bias, qkv: Tensor, num_heads: int, cu_seqlens, return_cls_attn, rel_pos) -> Tensor:
    """attention_qkv's attn_bias checked -> [B or 1, H, N, N] with a unit-stride last dim, in its own dtype (fp16 /
    bf16 / fp32; float64 only for a float64 qkv, float32 otherwise)."""
    given = [name for name, t in (("cu_seqlens", cu_seqlens), ("rel_pos", rel_pos)) if t is not None]
    given += ["return_cls_attn=True"] if return_cls_attn else []
    if given:
        _fail(f"attn_bias: expected no cu_seqlens, rel_pos or return_cls_attn with it (not supported together), got "
              f"{', '.join(given)}")
    _check_float("attn_bias", attn_bias)
    if attn_bias.device != qkv.device:
        _fail(f"attn_bias: expected device {qkv.device} (like qkv), got {attn_bias.device}")
    B, N = qkv.shape[:2]
    bias = attn_bias[None] if attn_bias.dim() == 3 else attn_bias
    if bias.dim() != 4 or bias.shape[0] not in (1, B) or tuple(bias.shape[1:]) != (num_heads, N, N):
        _fail(f"attn_bias: expected [H, N, N] or [B or 1, H, N, N] = [{B} or 1, {num_heads}, {N}, {N}] (B, N of "
              f"qkv, its heads), got {tuple(attn_bias.shape)}")
    if qkv.dtype == torch.float64:
        bias = bias.double()
    elif bias.dtype == torch.float64:
        bias = bias.float()
    return bias if N == 1 or bias.stride(3) == 1 else bias.contiguous()


def _check_packed_qkv(qkv: Tensor, num_heads) -> int:
    """The checks of a packed projection [B, N, 3·C] (timm's layout) and its head count; returns the head dim."""
    _check_float("qkv", qkv, _ATTENTION_DTYPES)
    if qkv.dim() != 3:
        _fail(f"qkv: expected 3 dims [B, N, 3*C], got shape {tuple(qkv.shape)}")
    _check_unit_last("qkv", qkv)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        _fail(f"num_heads: expected a positive int, got {num_heads!r}")
    C3 = qkv.shape[2]
    if C3 == 0 or C3 % (3 * num_heads) != 0:
        _fail(f"qkv: expected a last dim divisible by 3 * num_heads = {3 * num_heads}, got {C3}")
    return C3 // (3 * num_heads)


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None,
              key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
              max_seqlen: int | None = None) -> Tensor:
    """softmax(q kᵀ·scale) v, flash-style (no N×N matrix in memory).

    q [B, H, N_q, D], k and v [B, H, N_kv, D]: any strides with a unit-stride last dim (like
    F.scaled_dot_product_attention), fp16 / bf16 / fp32 (float64 via the reference), one device,
    D <= 256. scale defaults to D^-½. fp32 on CUDA uses tf32 when torch allows it for matmuls
    (`torch.backends.cuda.matmul.fp32_precision = "tf32"`, or the legacy `allow_tf32`).
    key_mask: optional key-padding mask, torch.bool [B, N_kv] (any strides) on q's device, like SDPA's
    boolean attn_mask broadcast as key_mask[:, None, None, :]: True = the key takes part, False = every
    query of that batch element (all heads) ignores it. Queries are not masked. A query row left with no
    key outputs zeros (not NaN, as FlashAttention) and gets zero gradients. The mask has no gradient.
    cu_seqlens: optional packed variable-length self-attention (FlashAttention's `flash_attn_varlen_func`;
    Qwen2-VL's vision tower packs several images' patches into one sequence): q, k, v [1, H, T, D] hold
    S segments, segment s = tokens [cu_seqlens[s], cu_seqlens[s + 1]), and a token attends to the keys
    of its own segment only. cu_seqlens: torch.int32 [S + 1] on q's device, cu[0] = 0, non-decreasing,
    cu[S] = T; checked on CPU tensors, the caller's contract on CUDA (rows past cu[S] would be left
    unwritten). Empty segments are allowed. max_seqlen: an int >= the longest segment (it sizes the launch
    grid); None computes it from cu_seqlens, which on CUDA reads the device (a host sync, refused during
    CUDA-graph capture): pass it in steady state. Not with key_mask. cu_seqlens has no gradient.
    Returns [B, H, N_q, D] in q's dtype.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(name, t, _ATTENTION_DTYPES)
        if t.dim() != 4:
            _fail(f"{name}: expected 4 dims [B, H, N, D], got shape {tuple(t.shape)}")
        _check_unit_last(name, t)
    _check_same("k", k, "q", q)
    _check_same("v", v, "q", q)
    B, H, _, D = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        _fail(f"k: expected [B, H, N_kv, D] = [{B}, {H}, N_kv, {D}] (B, H, D of q), got {tuple(k.shape)}")
    if v.shape != k.shape:
        _fail(f"v: expected shape {tuple(k.shape)} (like k), got {tuple(v.shape)}")
    if k.shape[2] < 1:
        _fail(f"k: expected at least one key token, got shape {tuple(k.shape)}")
    _check_head_dim("q", D)
    _check_key_mask(key_mask, B, k.shape[2], "B of q, N_kv of k", "q", q.device)
    max_seqlen = _check_varlen(cu_seqlens, max_seqlen, B, q.shape[2], k.shape[2], "q", q.device, key_mask)
    scale = _attention_scale(scale, D)
    if _direct(q, k, v, key_mask, cu_seqlens):
        return _attention_impl(q, k, v, scale, key_mask, cu_seqlens, max_seqlen, with_lse=False)[0]
    return _attention_op(q, k, v, scale, key_mask, cu_seqlens, max_seqlen)[0]


def attention_qkv(qkv: Tensor, num_heads: int, *, scale: float | None = None, return_cls_attn: bool = False,
                  key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None,
                  rel_pos: tuple[Tensor, Tensor] | None = None, attn_bias: Tensor | None = None):
    """Attention straight from the packed qkv projection, read through strides (no copy).

    qkv [B, N, 3·C] with timm's layout (qkv.reshape(B, N, 3, H, D)), unit-stride last dim,
    fp16 / bf16 / fp32 (float64 via the reference). key_mask: optional key-padding mask, torch.bool
    [B, N] (any strides) on qkv's device, as in `attention` (True = the token takes part as a key; every
    token still gets an output row; a row left with no key is zeros). Returns out [B, N, C] in qkv's
    dtype, ready for the output projection, and with return_cls_attn=True also cls_attn [B, H, N] fp32:
    the softmax probabilities of query token 0 over all keys, 0 at masked keys (computed in the kernel,
    no N×N matrix). cu_seqlens, max_seqlen: packed segments of a qkv [1, T, 3·C], as in `attention`
    (Qwen2-VL's vision blocks: `attention_qkv(qkv, H, cu_seqlens=cu, max_seqlen=m)`); not with key_mask or
    return_cls_attn. rel_pos: SAM's decomposed relative positions (rel_h [B, H, N, KH], rel_w [B, H, N, KW]) over
    a KH x KW grid of the N = KH · KW tokens (row-major): score(i, j) += rel_h[i, j // KW] + rel_w[i, j % KW],
    added in the kernel (no N×N matrix; `reference.sam_rel_pos` makes them from q and the learned tables); any
    float dtype (computed in float32), differentiable in qkv and both (FlashAttention-2's backward kernels with the
    terms, whose gradients the dQ kernel sums); not with key_mask, cu_seqlens or return_cls_attn.
    attn_bias: a dense additive bias, [H, N, N] (one for the batch: BEiT's and Data2Vec's relative position bias,
    gathered from their tables) or [B or 1, H, N, N], fp16 / bf16 / fp32 (any strides; a unit-stride last dim is
    read with no copy): score(i, j) += attn_bias[h, i, j], added to each tile in fp32 (O(H·N²) read, no B·H·N²
    matrix); with key_mask or alone; differentiable in qkv and attn_bias (the dQ kernel adds dS into the bias's
    gradient, summed over the batch for a shared bias); not with cu_seqlens, rel_pos or return_cls_attn.
    """
    D = _check_packed_qkv(qkv, num_heads)
    if not isinstance(return_cls_attn, bool):
        _fail(f"return_cls_attn: expected a bool, got {return_cls_attn!r}")
    if qkv.shape[1] < 1:
        _fail(f"qkv: expected at least one token, got shape {tuple(qkv.shape)}")
    _check_head_dim("qkv", D)
    _check_key_mask(key_mask, qkv.shape[0], qkv.shape[1], "B and N of qkv", "qkv", qkv.device)
    max_seqlen = _check_varlen(cu_seqlens, max_seqlen, qkv.shape[0], qkv.shape[1], qkv.shape[1], "qkv", qkv.device,
                               key_mask, return_cls_attn)
    scale = _attention_scale(scale, D)
    if attn_bias is not None:
        bias = _check_attn_bias(attn_bias, qkv, num_heads, cu_seqlens, return_cls_attn, rel_pos)
        if _direct(qkv, bias, key_mask):
            return _attention_bias_impl(qkv, bias, num_heads, scale, key_mask, with_lse=False)[0]
        return _attention_bias_op(qkv, bias, num_heads, scale, key_mask)[0]
    if rel_pos is not None:
        rel_h, rel_w = _check_rel_pos(rel_pos, qkv, num_heads, key_mask, cu_seqlens, return_cls_attn)
        if _direct(qkv, rel_h, rel_w):
            return _attention_rel_pos_impl(qkv, rel_h, rel_w, num_heads, scale, with_lse=False)[0]
        return _attention_rel_pos_op(qkv, rel_h, rel_w, num_heads, scale)[0]
    if _direct(qkv, key_mask, cu_seqlens):
        out, cls_attn, _ = _attention_qkv_impl(qkv, num_heads, scale, return_cls_attn, key_mask, cu_seqlens,
                                               max_seqlen, with_lse=False)
    else:
        out, cls_attn, _ = _attention_qkv_op(qkv, num_heads, scale, return_cls_attn, key_mask, cu_seqlens,
                                             max_seqlen)
    return (out, cls_attn) if return_cls_attn else out


# ============================================================================================
# rope_qkv  (kernels/rope.py)
# ============================================================================================
_ROPE_PLANS: dict[tuple, object] = {}


def _rope_impl(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, inverse: bool, in_place: bool = False
               ) -> Tensor:
    if _attention_on_triton(qkv):
        rope = _kernels().rope
        full = cos.shape[1] * 3 * num_heads == qkv.shape[2]                  # an angle per element (V-JEPA 2)
        key = (qkv.shape, qkv.stride(), qkv.dtype, qkv.device, num_heads, cos.shape[0], inverse, in_place, full)
        plan = _ROPE_PLANS.get(key)
        if plan is None:
            if len(_ROPE_PLANS) >= _MAX_PLANS:
                _ROPE_PLANS.clear()
            plan = _ROPE_PLANS[key] = rope.plan(qkv, num_heads, cos.shape[0], inverse, in_place, full=full)
        return rope.run(plan, qkv, cos, sin)
    return reference.torch_rope_qkv(qkv, num_heads, cos, sin, inverse, in_place)


def _rope_new(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    return _rope_impl(qkv, num_heads, cos, sin, inverse)


_rope_op = torch.library.custom_op("vitfast::rope_qkv", _rope_new, mutates_args=())      # out of place


@_rope_op.register_fake
def _(qkv, num_heads, cos, sin, inverse):
    return qkv.new_empty(qkv.shape)


def _rope_setup(ctx, inputs, output):
    _, ctx.num_heads, cos, sin, ctx.inverse = inputs
    ctx.save_for_backward(cos, sin)


def _rope_backward(ctx, dout):
    # The rotation is orthogonal: its backward is the inverse rotation of the gradient (v and the prefix
    # tokens pass through), the same kernel; with an angle per element (not a rotation), its transpose.
    cos, sin = ctx.saved_tensors
    return _rope_op(dout.contiguous(), ctx.num_heads, cos, sin, not ctx.inverse), None, None, None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def _check_rope(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, inplace, full: bool = False) -> int:
    """rope_qkv's and norm_rope_qkv's arguments checked -> the head dim. full: tables of D columns allowed too."""
    D, N = _check_packed_qkv(qkv, num_heads), qkv.shape[1]
    if D % 2:
        _fail(f"qkv: rotary embedding needs an even head dim, got {D}")
    table_dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            _fail(f"{name}: expected a Tensor, got {type(t).__name__}")
        _check_like(name, t, "qkv", qkv.device, t.dtype)
        if t.dtype != table_dtype:
            _fail(f"{name}: expected dtype {table_dtype} for a {qkv.dtype} qkv, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] not in ((D // 2, D) if full else (D // 2,)) or not 1 <= t.shape[0] <= N:
            _fail(f"{name}: expected shape [N_rope, D/2] = [1..{N}, {D // 2}]"
                  f"{f' or [N_rope, D] = [1..{N}, {D}]' if full else ''}, got {tuple(t.shape)}")
        if t.requires_grad:
            _fail(f"{name}: expected a table that does not require grad (the rotation's angles are fixed)")
    if sin.shape != cos.shape:
        _fail(f"sin: expected shape {tuple(cos.shape)} (like cos), got {tuple(sin.shape)}")
    if not isinstance(inplace, bool):
        _fail(f"inplace: expected a bool, got {inplace!r}")
    return D


def rope_qkv(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, *, inplace: bool = False) -> Tensor:
    """Rotary position embedding on the packed qkv projection: q and k of the last N_rope tokens rotated pair by
    pair (pair j: columns j and D/2 + j of a head, DINOv3's rotate-half layout), v and the tokens before them
    (class, registers) unchanged; one Triton pass on the GPU (`kernels/rope.py`), fp32 math rounded once.

    qkv [B, N, 3·C] as `attention_qkv` takes it (even head dim D); cos, sin [N_rope, D/2] with 1 <= N_rope <= N,
    float32 (float64 for a float64 qkv), on qkv's device, not requiring grad (`reference.dinov3_rope` makes
    them). Tables of D columns, [N_rope, D], give each element its own angle (V-JEPA 2's RoPE: columns j and
    D/2 + j are the angles of pair j's two elements: x1 · cos[:, j] − x2 · sin[:, j], x2 · cos[:, D/2 + j] + x1 ·
    sin[:, D/2 + j]). Returns a new packed tensor [B, N, 3·C], differentiable in qkv; with inplace=True, qkv itself
    rotated in place (only q and k of the rotated tokens are read and written) wherever the call needs no autograd
    and is not traced by torch.compile, else a new tensor as without it: use the tensor returned."""
    _check_rope(qkv, num_heads, cos, sin, inplace, full=True)
    cos, sin = cos.contiguous(), sin.contiguous()
    if _direct(qkv):
        return _rope_impl(qkv, num_heads, cos, sin, False, inplace)
    return _rope_op(qkv, num_heads, cos, sin, False)


def _norm_rope_impl(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, weight: Tensor, norm: str, eps: float,
                    in_place: bool = False) -> Tensor:
    if _attention_on_triton(qkv):
        rope = _kernels().rope
        key = (qkv.shape, qkv.stride(), qkv.dtype, qkv.device, num_heads, cos.shape[0], False, in_place, norm, eps)
        plan = _ROPE_PLANS.get(key)
        if plan is None:
            if len(_ROPE_PLANS) >= _MAX_PLANS:
                _ROPE_PLANS.clear()
            plan = _ROPE_PLANS[key] = rope.plan(qkv, num_heads, cos.shape[0], False, in_place, norm, eps)
        return rope.run(plan, qkv, cos, sin, weight)
    return reference.torch_norm_rope_qkv(qkv, num_heads, cos, sin, weight, norm, eps, in_place)


def _norm_rope_new(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, weight: Tensor, norm: str,
                   eps: float) -> Tensor:
    return _norm_rope_impl(qkv, num_heads, cos, sin, weight, norm, eps)


_norm_rope_op = torch.library.custom_op("vitfast::norm_rope_qkv", _norm_rope_new, mutates_args=())   # out of place


@_norm_rope_op.register_fake
def _(qkv, num_heads, cos, sin, weight, norm, eps):
    return qkv.new_empty(qkv.shape)


def _norm_rope_bwd_impl(qkv: Tensor, dout: Tensor, num_heads: int, cos: Tensor, sin: Tensor, weight: Tensor,
                       norm: str, eps: float) -> tuple[Tensor, Tensor]:
    rope = _kernels().rope
    key = ("backward", qkv.shape, qkv.stride(), qkv.dtype, qkv.device, num_heads, cos.shape[0], norm, eps)
    plan = _ROPE_PLANS.get(key)
    if plan is None:
        if len(_ROPE_PLANS) >= _MAX_PLANS:
            _ROPE_PLANS.clear()
        plan = _ROPE_PLANS[key] = rope.backward_plan(qkv, num_heads, cos.shape[0], norm, eps)
    return rope.run_backward(plan, qkv, dout, cos, sin, weight)


_norm_rope_bwd_op = torch.library.custom_op("vitfast::norm_rope_qkv_backward", _norm_rope_bwd_impl, mutates_args=())


@_norm_rope_bwd_op.register_fake
def _(qkv, dout, num_heads, cos, sin, weight, norm, eps):
    return qkv.new_empty(qkv.shape), weight.new_empty(weight.shape)


def _norm_rope_setup(ctx, inputs, output):
    qkv, ctx.num_heads, cos, sin, weight, ctx.norm, ctx.eps = inputs
    ctx.save_for_backward(qkv, cos, sin, weight)


def _norm_rope_backward(ctx, dout):
    # The Triton path: one backward pass (kernels/rope.py) that recomputes the norms from the saved qkv. torch's
    # path: torch's autograd on a recomputed forward.
    qkv, cos, sin, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    if _attention_on_triton(qkv):
        dqkv, dweight = _norm_rope_bwd_op(qkv, dout.contiguous(), ctx.num_heads, cos, sin, weight, ctx.norm,
                                          ctx.eps)
        dqkv, dweight = dqkv if need[0] else None, dweight if need[4] else None
    else:
        fn = lambda x, w: reference.torch_norm_rope_qkv(x, ctx.num_heads, cos, sin, w, ctx.norm, ctx.eps)
        dqkv, dweight = _recompute_grads(fn, (qkv, weight), (dout,), need[0:5:4])
    return dqkv, None, None, None, dweight, None, None


_norm_rope_op.register_autograd(_norm_rope_backward, setup_context=_norm_rope_setup)


def norm_rope_qkv(qkv: Tensor, num_heads: int, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, *,
                  eps: float = 1e-6, v_norm: bool = False, inplace: bool = False) -> Tensor:
    """RMSNorms of each head of q and k (weights q_weight, k_weight over the head dim) and, with v_norm, of v (no
    weight), then `rope_qkv`'s rotation of q and k: Gemma 4's and GLM-OCR's vision attention between the qkv GEMM
    and the attention, in one Triton pass on the GPU (`kernels/rope.py`), fp32 math rounded once (HF rounds
    after the norm too: within one rounding of this). Every token is normalized, the prefix ones too.

    qkv, cos, sin, inplace as `rope_qkv` takes them; q_weight, k_weight [D] in qkv's dtype or float32, on its
    device; eps a finite number >= 0. Returns a new packed tensor [B, N, 3·C], differentiable in qkv and the
    weights (on the GPU one Triton backward pass, which recomputes the norms from the saved qkv); with
    inplace=True, qkv itself rewritten (q and k, and v with v_norm) wherever the call needs no autograd and is
    not traced by torch.compile."""
    D = _check_rope(qkv, num_heads, cos, sin, inplace)
    for name, t in (("q_weight", q_weight), ("k_weight", k_weight)):
        _check_float(name, t, _NORM_DTYPES)
        if t.shape != (D,):
            _fail(f"{name}: expected shape ({D},) (the head dim of qkv), got {tuple(t.shape)}")
        _check_like(name, t, "qkv", qkv.device, t.dtype)
        if t.dtype not in (torch.float32, qkv.dtype):
            _fail(f"{name}: expected dtype {qkv.dtype} (like qkv) or torch.float32, got {t.dtype}")
    if k_weight.dtype != q_weight.dtype:
        _fail(f"k_weight: expected dtype {q_weight.dtype} (like q_weight), got {k_weight.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        _fail(f"eps: expected a finite number >= 0, got {eps!r}")
    if not isinstance(v_norm, bool):
        _fail(f"v_norm: expected a bool, got {v_norm!r}")
    cos, sin = cos.contiguous(), sin.contiguous()
    weight, norm = torch.stack([q_weight, k_weight]), "qkv" if v_norm else "qk"
    if _direct(qkv, weight):
        return _norm_rope_impl(qkv, num_heads, cos, sin, weight, norm, float(eps), inplace)
    return _norm_rope_op(qkv, num_heads, cos, sin, weight, norm, float(eps))


# ============================================================================================
# linear / mlp  (kernels/linear.py)
# ============================================================================================
# The activations of `linear`: the reference's, and the gated ones, half the width: "swiglu" (timm's SwiGLUPacked fc1
# with its gating) and "geglu_tanh" (the same with the tanh GELU: Gemma 4's vision MLP).
GATED_ACTIVATIONS = ("swiglu", "geglu_tanh")
LINEAR_ACTIVATIONS = (*reference.ACTIVATIONS, *GATED_ACTIVATIONS)


def _check_linear(x, weight, bias, activation, residual, scale=None) -> None:
    _check_float("x", x)
    shape, device, dtype = x.shape, x.device, x.dtype
    if not shape:
        _fail("x: expected a tensor [..., K] with at least 1 dim, got a 0-d tensor")
    _check_float("weight", weight)
    _check_like("weight", weight, "x", device, dtype)
    K = shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        _fail(f"weight: expected shape (N, {K}) like nn.Linear (K = x.shape[-1]), got {tuple(weight.shape)}")
    N = weight.shape[0]
    for name, t in (("bias", bias), ("scale", scale)):
        if t is not None:
            _check_float(name, t)
            _check_like(name, t, "x", device, dtype)
            if t.shape != (N,):
                _fail(f"{name}: expected shape ({N},) (weight.shape[0]), got {tuple(t.shape)}")
    if activation not in LINEAR_ACTIVATIONS:
        _fail(f"activation: expected one of {LINEAR_ACTIVATIONS}, got {activation!r}")
    if activation in GATED_ACTIVATIONS:
        if N % 2:
            _fail(f"weight: activation={activation!r} needs an even row count (gate and up halves), got {N}")
        bad = [name for name, t in (("residual", residual), ("scale", scale)) if t is not None]
        if bad:
            _fail(f"activation={activation!r}: expected no {' or '.join(bad)} (a gated MLP's fc1 has none), got a "
                  f"tensor")
    if residual is not None:
        _check_float("residual", residual)
        _check_like("residual", residual, "x", device, dtype)
        if residual.shape != (*shape[:-1], N):
            _fail(f"residual: expected shape {(*shape[:-1], N)} (x.shape[:-1] + (N,)), got {tuple(residual.shape)}")


# Dispatch on CUDA: key -> one of _linear_candidates(...), decided once by timing them and kept on disk
# (vitfast.tuning) per GPU and versions.
_LINEAR_PATHS: dict[tuple, str] = tuning.PersistentTable("linear_paths")
# Dispatch path -> the Triton launcher's variant.
_LINEAR_VARIANTS = {"triton": "tiled", "triton-persistent": "persistent", "triton-tma": "tma"}


def _fastest_path(key, timers: dict, cache: dict, capturing: bool, default: str = "cublas") -> str:
    """The path for `key`: the cached decision, else time every `timers[name]()` once (ms) and
    cache the fastest (first wins ties). While a CUDA graph is being captured nothing may be
    timed: return `default` without caching. The default is cuBLAS because a first Triton launch
    would autotune (benchmark), which a capture cannot contain."""
    if key not in cache:
        if capturing:
            return default
        times = {name: timer() for name, timer in timers.items()}
        cache[key] = min(times, key=times.get)
    return cache[key]


def _linear_candidates(tma_ok: bool, fp32_ieee: bool) -> tuple[str, ...]:
    """The paths timed for one dispatch key: the fused Triton kernel (one program per tile), its
    persistent form, its TMA form when the GPU and the operands allow it (`tma_eligible`), and
    cuBLAS + one elementwise pass. fp32 with ieee dots (FMA, no tensor cores) keeps only the tiled
    kernel: the persistent forms spill registers there on sm_90."""
    if fp32_ieee:
        return ("triton", "cublas")
    return ("triton", "triton-persistent", *(("triton-tma",) if tma_ok else ()), "cublas")


def _linear_cublas(x, weight, bias, activation, residual, scale=None, preact=None):
    """cuBLAS GEMM with the bias in its epilogue, then the activation / layer-scale / residual in place
    (one elementwise pass for each ViT linear: fc1 has no residual, proj/fc2 no activation; a gated MLP's gating)."""
    if activation in GATED_ACTIVATIONS:
        return reference.gated(reference.torch_linear(x, weight, bias), activation)
    return reference.torch_linear(x, weight, bias, activation, residual, scale, preact)


def _linear_key(x, weight, bias, activation, residual, scale=None, preact=False) -> tuple:
    """Dispatch key: device, M bucket, N, K, dtype, tf32 setting, epilogue, whether the pre-activation is
    stored too (training), TMA eligibility (last; it depends on alignment and strides, so a cached
    "triton-tma" never meets operands it cannot read)."""
    kernels, device, K = _kernels(), x.device, x.shape[-1]
    return (device.index, kernels.linear.m_bucket(x.numel() // K if K else 0), weight.shape[0], K, x.dtype,
            kernels.tf32_enabled(), bias is not None, activation, residual is not None, scale is not None,
            preact, activation not in GATED_ACTIVATIONS        # the gated epilogues have no TMA form
            and kernels.linear.tma_eligible(x, weight, kernels.linear.device_capability(device)))


# Steady state of a linear on the Triton path: the operands' layout -> the launch plan of its path
# (`kernels.linear.plan`), or None for cuBLAS. A call whose layout was seen builds one small key, looks it
# up and launches: no second validation, no dispatch key, no timing.
_LINEAR_PLANS: dict[tuple, object] = {}
_MISSING = object()


def _plan_key(x, weight, bias, activation, residual, scale, preact) -> tuple:
    """What a linear's path and launch depend on: shapes, strides, dtype, device, the 16-byte alignment of x
    and weight (TMA eligibility), the epilogue, and for fp32 the TF32 setting (validated operands: one dtype)."""
    return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16, weight.shape, weight.stride(),
            weight.data_ptr() % 16, None if bias is None else bias.stride(), activation,
            None if residual is None else residual.stride(), None if scale is None else scale.stride(),
            preact is not None, x.dtype == torch.float32 and _kernels().tf32_enabled())


def _linear_triton(x, weight, bias, activation, residual, scale, preact=None):
    """A linear on the Triton path: on CUDA the fastest correct path among _linear_candidates (per
    `_linear_key`, decided on first use), under the interpreter the tiled kernel. `preact`: a contiguous
    buffer that also receives the pre-activation z (training)."""
    if x.numel() == 0 or weight.shape[0] == 0:
        return _kernels().linear.linear(x, weight, bias, activation=activation, residual=residual, scale=scale,
                                        preact=preact)
    key = _plan_key(x, weight, bias, activation, residual, scale, preact)
    plan = _LINEAR_PLANS.get(key, _MISSING)
    if plan is _MISSING:
        plan = _linear_plan(key, x, weight, bias, activation, residual, scale, preact)
    if plan is None:
        return _linear_cublas(x, weight, bias, activation, residual, scale, preact)
    return _kernels().linear.run(plan, x, weight, bias, residual, scale, preact)


def _linear_plan(key, x, weight, bias, activation, residual, scale, preact):
    """The plan for a new layout `key` (None: cuBLAS), kept in _LINEAR_PLANS unless the path is a capture's
    provisional cuBLAS (not decided, see `_fastest_path`)."""
    kernels, variant, decided = _kernels(), "tiled", True
    if x.is_cuda:
        dkey = _linear_key(x, weight, bias, activation, residual, scale, preact is not None)
        path = _LINEAR_PATHS.get(dkey) or _choose_linear_path(dkey, x, weight, bias, activation, residual, scale,
                                                              preact)
        decided = dkey in _LINEAR_PATHS
        if path == "cublas":
            if decided:
                _remember_plan(key, None)
            return None
        variant = _LINEAR_VARIANTS[path]
    plan = kernels.linear.plan(x, weight, bias, activation, residual, scale, preact, variant)
    if decided:
        _remember_plan(key, plan)
    return plan


def _remember_plan(key, plan) -> None:
    if len(_LINEAR_PLANS) >= _MAX_PLANS:
        _LINEAR_PLANS.clear()
    _LINEAR_PLANS[key] = plan


def _choose_linear_path(key, x, weight, bias, activation, residual, scale, preact=None) -> str:
    """Time each candidate of `key` once as a caller pays it, launch cost included (briefly under
    VITFAST_AUTOTUNE=quick), and cache the fastest; cuBLAS, uncached, while a CUDA graph is being captured."""
    from vitfast.timing import caller_ms

    kernels, tf32, tma_ok = _kernels(), key[5], key[-1]
    fused = lambda variant: kernels.linear.linear(x, weight, bias, activation=activation, residual=residual,
                                                  scale=scale, preact=preact, variant=variant)
    run = {name: (lambda v=_LINEAR_VARIANTS[name]: fused(v))
           for name in _linear_candidates(tma_ok, x.dtype == torch.float32 and not tf32)[:-1]}
    run["cublas"] = lambda: _linear_cublas(x, weight, bias, activation, residual, scale, preact)
    warmup, calls = (1, 2) if kernels.autotune_mode() == "quick" else (3, 20)
    timers = {name: (lambda f=f: caller_ms(f, device=x.device, calls=calls, warmup=warmup))
              for name, f in run.items()}
    return _fastest_path(key, timers, _LINEAR_PATHS, torch.cuda.is_current_stream_capturing())


def _cpu_fastest(fns, args, rounds: int = 5, budget_s: float = 0.2) -> int:
    """Index of the fastest of `fns` on `args` (CPU), for decisions made once per shape: one warm-up call
    each, then timed rounds of one call each in turn, the best time of each (interleaved, so a slow spell
    of a shared machine falls on all of them). Up to `rounds` rounds; none after the second once `budget_s`
    seconds have passed. A function that raises is never chosen."""
    seconds: list[list[float] | None] = [[] for _ in fns]
    start = time.perf_counter()
    for r in range(rounds + 1):
        if r > 2 and time.perf_counter() - start > budget_s:
            break
        for i, fn in enumerate(fns):
            if seconds[i] is None:
                continue
            t0 = time.perf_counter()
            try:
                fn(*args)
            except (RuntimeError, TypeError, NotImplementedError):   # an op this torch build or CPU lacks
                seconds[i] = None
                continue
            if r:                                                    # round 0 is the warm-up
                seconds[i].append(time.perf_counter() - t0)
    best = [min(s) if s else float("inf") for s in seconds]
    return best.index(min(best))


# oneDNN's GEMM with the activation or the residual add as a post-op (the kernel torch.compile's CPU
# backend emits): no elementwise pass after the GEMM.
_MKLDNN_ACT = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
_MKLDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's bf16 GEMM needs AVX512-BF16-era instructions (avx512bw/vl/dq or avx_ne_convert): on CPUs without them
# it refuses to build the primitive, so bf16 then takes F.linear.
_MKLDNN_BF16 = _MKLDNN and bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
_MKLDNN_DTYPES = (torch.float32, torch.bfloat16) if _MKLDNN_BF16 else (torch.float32,)
_MKLDNN_PACK = _MKLDNN and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")

# weight -> (its data pointer and version, the weight in oneDNN's blocked layout). oneDNN converts a plain
# weight into that layout on every call; done once per weight (as torch.compile's CPU backend does when it
# freezes a model) the GEMM is typically 2-11% faster at ViT-Ti shapes (benchmarks/RESULTS.md). The copy lives as long
# as the weight and is made again when the weight is replaced, moved or modified in place (its data
# pointer or version counter changes; a write through `.data` bypasses the counter: call
# `clear_cpu_weight_cache()` after one).
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def clear_cpu_weight_cache() -> None:
    """Drop the oneDNN-layout copies of linear weights that CPU inference keeps (see `linear`)."""
    _PACKED.clear()


def _packed_weight(weight: Tensor, rows: int) -> Tensor:
    """`weight` [N, K] in oneDNN's layout for a GEMM of about `rows` rows, kept per weight. The weight itself
    when it is a view (one made on each access, such as rows of an in_proj, would be reordered on every
    call) or carries no version counter (an inference tensor: an in-place change would go unseen)."""
    if weight._base is not None:
        return weight
    try:
        stamp = (weight.data_ptr(), weight._version)
    except RuntimeError:
        return weight
    hit = _PACKED.get(weight)
    if hit is None or hit[0] != stamp:
        hit = _PACKED[weight] = (stamp, torch.ops.mkldnn._reorder_linear_weight(weight, rows))
    return hit[1]


def _linear_mkldnn(x, weight, bias, activation, residual, scale, pack=False):
    op = torch.ops.mkldnn._linear_pointwise
    if pack:
        weight = _packed_weight(weight, x.numel() // x.shape[-1])
    if residual is not None and scale is None and activation is None:
        return op.binary(x, residual, weight, bias, "add")
    attr, algorithm = _MKLDNN_ACT.get(activation, ("none", ""))
    y = op(x, weight, bias, attr, [], algorithm)
    if activation not in _MKLDNN_ACT:
        y = reference.activate(y, activation)
    if scale is not None:
        y = y.mul_(scale)
    return y if residual is None else y.add_(residual)


def _linear_torch(x, weight, bias, activation, residual, scale, pack=False):
    """F.linear and the epilogue (`pack` unused: the CPU candidates share one signature)."""
    return reference.torch_linear(x, weight, bias, activation, residual, scale).contiguous()


# CPU linear: key (M, N, K, dtype, epilogue, packed weight) -> index into _LINEAR_CPU of the faster path,
# timed once. oneDNN's fused form is faster at most ViT shapes, slower at some tiny ones: hence the timing
# per key.
_LINEAR_CPU_PATHS: dict[tuple, int] = {}
_LINEAR_CPU = (_linear_torch, _linear_mkldnn)


def _linear_cpu(x, weight, bias, activation, residual, scale, pack=False):
    """pack: the oneDNN path may keep the weight in its layout (`_packed_weight`): a call with nothing to
    differentiate. Training steps change the weights every step, so they take the plain weight."""
    # oneDNN reads a strided bias wrongly (silently): the fused path takes contiguous operands only.
    if (not _MKLDNN or x.dtype not in _MKLDNN_DTYPES or x.dim() < 2 or not x.numel() or not x.is_contiguous()
            or not weight.is_contiguous() or not (bias is None or bias.is_contiguous())
            or not (residual is None or residual.is_contiguous()) or not (scale is None or scale.is_contiguous())):
        return _linear_torch(x, weight, bias, activation, residual, scale)
    args = (x, weight, bias, activation, residual, scale, pack and _MKLDNN_PACK)
    key = (x.numel() // x.shape[-1], *weight.shape, x.dtype, bias is not None, activation,
           residual is not None, scale is not None, args[-1])
    best = _LINEAR_CPU_PATHS.get(key)
    if best is None:
        best = _LINEAR_CPU_PATHS[key] = _cpu_fastest(_LINEAR_CPU, args)
    return _LINEAR_CPU[best](*args)


def _linear_run(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                residual: Tensor | None, scale: Tensor | None, pack: bool = False) -> Tensor:
    # float64 has no kernel (tl.dot has no fp64 tensor-core path): it takes torch's path, like CPU tensors.
    if not use_triton(x) or x.dtype == torch.float64:
        if activation in GATED_ACTIVATIONS:
            return reference.gated(_linear_run(x, weight, bias, None, None, None, pack), activation)
        if x.device.type == "cpu":
            return _linear_cpu(x, weight, bias, activation, residual, scale, pack)
        return _linear_torch(x, weight, bias, activation, residual, scale)
    return _linear_triton(x, weight, bias, activation, residual, scale)


def _linear_impl(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                 residual: Tensor | None, scale: Tensor | None) -> Tensor:
    return _linear_run(x, weight, bias, activation, residual, scale)


_linear_op = torch.library.custom_op("vitfast::linear", _linear_impl, mutates_args=())


@_linear_op.register_fake
def _(x, weight, bias, activation, residual, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2 if activation in GATED_ACTIVATIONS else weight.shape[0]))


def _activation(z: Tensor, activation: str | None) -> Tensor:
    """act(z) for a backward formula (torch's elementwise ops; a backward never calls the reference)."""
    if activation in ("gelu", "gelu_tanh"):
        return torch.nn.functional.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")
    return z * torch.sigmoid(1.702 * z) if activation == "quick_gelu" else z


def _activation_grad(dy: Tensor, z: Tensor, activation: str | None) -> Tensor:
    """dL/dz of a = act(z), given dL/da = dy."""
    if activation in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(dy, z, approximate="tanh" if activation == "gelu_tanh" else "none")
    if activation == "quick_gelu":
        s = torch.sigmoid(1.702 * z)
        return dy * (s + 1.702 * z * s * (1 - s))
    return dy


# Training forward: y and the pre-activation z = x Wᵀ + b, stored by the same GEMM's epilogue, which the
# backward reads for act'(z) (and layer-scale's gradient) instead of recomputing the GEMM.
def _linear_preact_impl(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                        residual: Tensor | None, scale: Tensor | None) -> tuple[Tensor, Tensor]:
    z = x.new_empty((*x.shape[:-1], weight.shape[0]))
    if not use_triton(x) or x.dtype == torch.float64:
        return reference.torch_linear(x, weight, bias, activation, residual, scale, preact=z), z
    return _linear_triton(x, weight, bias, activation, residual, scale, preact=z), z


_linear_preact_op = torch.library.custom_op("vitfast::linear_preact", _linear_preact_impl, mutates_args=())


@_linear_preact_op.register_fake
def _(x, weight, bias, activation, residual, scale):
    shape = (*x.shape[:-1], weight.shape[0])
    return x.new_empty(shape), x.new_empty(shape)


def _linear_bwd_torch(dy: Tensor, z: Tensor | None, weight: Tensor, scale: Tensor | None, activation: str | None,
                      need_dx: bool, need_dscale: bool) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """(dx, dz, dscale) for dy [M, N] with torch's elementwise ops and GEMM: dz = dy · scale ⊙ act'(z)."""
    dz = dy * scale if scale is not None else dy
    dz = _activation_grad(dz, z, activation)
    dscale = None
    if need_dscale:
        dscale = (dy * _activation(z, activation)).sum(0)
    return (dz @ weight if need_dx else None), dz, dscale


def _linear_bwd_impl(dy: Tensor, z: Tensor | None, weight: Tensor, scale: Tensor | None, activation: str | None,
                     need_dz: bool, need_dscale: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dz, dscale) on the Triton path, dy [M, N]: the fused kernel, or on CUDA torch's elementwise pass and
    cuBLAS where that was timed faster for the key. dz / dscale are empty when not asked for."""
    if dy.is_cuda:
        dx, dz, dscale = _linear_bwd_cuda(dy, z, weight, scale, activation, need_dz, need_dscale)
    else:                                                                                       # interpreter
        dx, dz, dscale = _kernels().linear.linear_backward(dy, z, weight, scale, activation, need_dz=need_dz,
                                                           need_dscale=need_dscale)
    dz = (dz if dz is not dy else dy.clone()) if need_dz else dy.new_empty(0)   # an op's output never aliases dy
    return dx, dz, (dscale if need_dscale else dy.new_empty(0))


_linear_bwd_op = torch.library.custom_op("vitfast::linear_backward", _linear_bwd_impl, mutates_args=())


@_linear_bwd_op.register_fake
def _(dy, z, weight, scale, activation, need_dz, need_dscale):
    return (dy.new_empty((dy.shape[0], weight.shape[1])), dy.new_empty(dy.shape if need_dz else (0,)),
            dy.new_empty((weight.shape[0] if need_dscale else 0,)))


# Dispatch of the backward on CUDA: key -> "triton" (the fused kernel) or "torch", timed once, kept on disk.
_LINEAR_BWD_PATHS: dict[tuple, str] = tuning.PersistentTable("linear_bwd_paths")


def _linear_bwd_cuda(dy, z, weight, scale, activation, need_dz, need_dscale):
    kernels, (N, K) = _kernels(), weight.shape
    key = (dy.device.index, kernels.linear.m_bucket(dy.shape[0]), N, K, dy.dtype, kernels.tf32_enabled(),
           activation, scale is not None, need_dz, need_dscale)
    fused = lambda: kernels.linear.linear_backward(dy, z, weight, scale, activation, need_dz=need_dz,
                                                   need_dscale=need_dscale)
    unfused = lambda: _linear_bwd_torch(dy, z, weight, scale, activation, True, need_dscale)
    path = _LINEAR_BWD_PATHS.get(key)
    if path is None:
        from vitfast.timing import caller_ms

        warmup, calls = (1, 2) if kernels.autotune_mode() == "quick" else (3, 20)
        timers = {name: (lambda f=f: caller_ms(f, device=dy.device, calls=calls, warmup=warmup))
                  for name, f in (("triton", fused), ("torch", unfused))}
        path = _fastest_path(key, timers, _LINEAR_BWD_PATHS, torch.cuda.is_current_stream_capturing(), "torch")
    return fused() if path == "triton" else unfused()


def _linear_grads(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, scale: Tensor | None,
                  z: Tensor | None, activation: str | None, need) -> tuple:
    """Gradients of y = act(z)·scale + residual, z = x Wᵀ + b, in the op's input order: dresidual = dy;
    dz = dy·scale ⊙ act'(z); dx = dz W (on the Triton path one kernel forms dz while it reads dy and also
    returns Σ dy ⊙ act(z), layer-scale's gradient); dW = dzᵀ x and db = Σ dz (cuBLAS GEMM, a sum over the
    rows). z: the saved pre-activation, or None to rebuild it with one GEMM when it is needed."""
    N, K = weight.shape
    need_dscale = scale is not None and bool(need[5])
    need_dz = bool(need[1]) or (bias is not None and bool(need[2]))
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    if z is not None:
        z2 = z.reshape(-1, N)
    elif activation is not None or need_dscale:
        z2 = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    else:
        z2 = None
    dscale = None
    if activation is None and scale is None:
        dz2, dx2 = dy2, (dy2 @ weight if need[0] else None)
    elif need[0] and use_triton(dy) and dy.dtype != torch.float64:
        dx2, dz2, dscale = _linear_bwd_op(dy2, z2, weight, scale, activation, need_dz, need_dscale)
    else:
        dx2, dz2, dscale = _linear_bwd_torch(dy2, z2, weight, scale, activation, bool(need[0]), need_dscale)
    dx = dx2.reshape(x.shape) if need[0] else None
    dw = dz2.t() @ x2 if need[1] else None
    db = dz2.sum(0) if bias is not None and need[2] else None
    return dx, dw, db, None, (dy if need[4] else None), (dscale if need_dscale else None)


def _linear_setup(ctx, inputs, output):
    x, weight, bias, activation, residual, scale = inputs
    ctx.save_for_backward(x, weight, bias, scale)
    ctx.activation = activation


def _linear_backward(ctx, dy):
    """The fused op under autograd (torch.ops / torch.compile users): z rebuilt with one GEMM when needed."""
    x, weight, bias, scale = ctx.saved_tensors
    if ctx.activation in GATED_ACTIVATIONS:
        return _gated_grads(dy, x, weight, bias, ctx.activation, ctx.needs_input_grad)
    return _linear_grads(dy, x, weight, bias, scale, None, ctx.activation, ctx.needs_input_grad)


def _gated_grads(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, need) -> tuple:
    """A gated epilogue's backward (`ops.linear` itself takes the unfused form when a gradient is recorded):
    z = [gate | up] rebuilt with one GEMM, dZ = [dY · up · act'(gate) | dY · act(gate)], then dX = dZ W,
    dW = dZᵀ x, db = Σ dZ."""
    K, N = x.shape[-1], weight.shape[0]
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N // 2)
    z = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    gate, up = z.chunk(2, dim=-1)
    if activation == "swiglu":
        sg = torch.sigmoid(gate)
        act, dgate = gate * sg, dy2 * up * sg * (1 + gate * (1 - sg))
    else:                                             # the tanh GELU: torch's own gelu_backward
        act, dgate = _activation(gate, "gelu_tanh"), _activation_grad(dy2 * up, gate, "gelu_tanh")
    dz = torch.cat([dgate, dy2 * act], dim=-1)
    dx = (dz @ weight).reshape(x.shape) if need[0] else None
    dw = dz.t() @ x2 if need[1] else None
    db = dz.sum(0) if bias is not None and need[2] else None
    return dx, dw, db, None, None, None


_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _linear_preact_setup(ctx, inputs, output):
    x, weight, bias, activation, residual, scale = inputs
    ctx.save_for_backward(x, weight, bias, scale, output[1])
    ctx.activation = activation
    ctx.mark_non_differentiable(output[1])


def _linear_preact_backward(ctx, dy, _dz):
    x, weight, bias, scale, z = ctx.saved_tensors
    return _linear_grads(dy, x, weight, bias, scale, z, ctx.activation, ctx.needs_input_grad)


_linear_preact_op.register_autograd(_linear_preact_backward, setup_context=_linear_preact_setup)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, activation: str | None = None,
           residual: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """act(x @ weightᵀ + bias) · scale + residual in one fused GEMM (the epilogue never re-reads memory).

    x:          [..., K] fp16, bf16 or fp32 (fp64 on the reference path); any strides (read as
                [M, K] rows without a copy when the leading dims flatten evenly).
    weight:     [N, K] as nn.Linear stores it (read transposed through its strides, no copy).
    bias:       [N] or None.
    activation: None, "gelu" (exact erf, as timm / HF / torchvision), "gelu_tanh", "quick_gelu"
                (CLIP's x·sigmoid(1.702·x)), "swiglu": timm's SwiGLUPacked fc1 and its gating,
                y [..., N / 2] = silu(z[..., :N/2]) · z[..., N/2:] with z = x @ weightᵀ + bias, the [..., N]
                product never stored (no residual or scale; in training the GEMM and the gating apart), or
                "geglu_tanh": the same with the tanh GELU for silu (Gemma 4's vision MLP).
    scale:      [N] or None: layer-scale (timm's LayerScale gamma), multiplied after the activation.
    residual:   [..., N] (x.shape[:-1] + (N,)) or None, added last.
    All tensors share x's dtype and device; fp32 uses tf32 when torch allows it for matmuls.
    Returns y [..., N] (contiguous) in x's dtype. On CUDA the first call per shape bucket times
    the Triton kernel against cuBLAS + one elementwise pass and keeps the faster (never while a
    CUDA graph is being captured: call once before capturing). On the CPU it times F.linear + the
    epilogue against oneDNN's GEMM with the epilogue as a post-op; with nothing to differentiate, oneDNN
    reads a copy of the weight in its own layout, kept while the weight lives and unchanged
    (`clear_cpu_weight_cache`).
    """
    _check_linear(x, weight, bias, activation, residual, scale)
    if activation in GATED_ACTIVATIONS and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias)):
        # Training: the GEMM and its gating apart (the gating's backward is torch's; the GEMM's vitfast's).
        return reference.gated(linear(x, weight, bias), activation)
    if _direct(x, weight, bias, residual, scale):
        return _linear_run(x, weight, bias, activation, residual, scale, pack=True)
    if torch.is_grad_enabled() and ((scale is not None and scale.requires_grad) or (activation is not None and any(
            t is not None and t.requires_grad for t in (x, weight, bias)))):
        # Training: the same fused GEMM also stores the pre-activation z, which the backward reads for act'(z)
        # (and the layer-scale gradient) instead of a second GEMM rebuilding it.
        return _linear_preact_op(x, weight, bias, activation, residual, scale)[0]
    return _linear_op(x, weight, bias, activation, residual, scale)


def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
        *, activation: str = "gelu", residual: Tensor | None = None) -> Tensor:
    """fc2(act(fc1(x))) (+ residual): the ViT MLP (timm's Mlp). x [..., C], fc1_weight [H, C],
    fc1_bias [H], fc2_weight [C_out, H], fc2_bias [C_out], residual [..., C_out] -> [..., C_out]."""
    _check_float("fc1_weight", fc1_weight)
    _check_float("fc2_weight", fc2_weight)
    if fc1_weight.dim() != 2 or fc2_weight.dim() != 2 or fc2_weight.shape[1] != fc1_weight.shape[0]:
        _fail(f"fc2_weight: expected shape (C_out, H) with H = fc1_weight.shape[0] (fc1_weight "
              f"{tuple(fc1_weight.shape)}), got {tuple(fc2_weight.shape)}")
    h = linear(x, fc1_weight, fc1_bias, activation=activation)        # [..., H]
    return linear(h, fc2_weight, fc2_bias, residual=residual)        # [..., C_out]


# ============================================================================================
# patch_embed  (kernels/patch_embed.py)
# ============================================================================================
_PE_IMAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_patch_embed(images, weight, bias, cls_token, prefix_tokens, pos_embed, mean, std,
                       pos_embed_prefix) -> None:
    if not isinstance(images, Tensor):
        _fail(f"images: expected a Tensor, got {type(images).__name__}")
    if images.dtype not in _PE_IMAGE_DTYPES:
        _fail(f"images: expected dtype in {[str(d) for d in _PE_IMAGE_DTYPES]}, got {images.dtype}")
    if images.dim() != 4:
        _fail(f"images: expected a 4-D tensor [B, C, H, W], got shape {tuple(images.shape)}")
    _check_float("weight", weight)
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        _fail(f"weight: expected the conv weight [D, C, P, P] (square patches), got shape {tuple(weight.shape)}")
    if weight.device != images.device:
        _fail(f"weight: expected device {images.device} (like images), got {weight.device}")
    B, C, H, W = images.shape
    D, Cw, P, _ = weight.shape
    if C != Cw:
        _fail(f"images: expected {Cw} channels (weight {tuple(weight.shape)}), got {C} (shape {tuple(images.shape)})")
    if H % P or W % P:
        _fail(f"images: height H={H} and width W={W} must be divisible by the patch size P={P}")
    for name, t in (("bias", bias), ("cls_token", cls_token), ("prefix_tokens", prefix_tokens),
                    ("pos_embed", pos_embed)):
        if t is not None:
            _check_float(name, t)
            _check_same(name, t, "weight", weight)
    if bias is not None and tuple(bias.shape) != (D,):
        _fail(f"bias: expected shape ({D},), got {tuple(bias.shape)}")
    if cls_token is not None and tuple(cls_token.shape) not in ((1, 1, D), (D,)):
        _fail(f"cls_token: expected shape (1, 1, {D}) or ({D},), got {tuple(cls_token.shape)}")
    if prefix_tokens is not None:
        if cls_token is not None:
            _fail("prefix_tokens: expected None when cls_token is given (put the class token first in "
                  "prefix_tokens)")
        if prefix_tokens.dim() not in (2, 3) or (prefix_tokens.dim() == 3 and prefix_tokens.shape[0] != 1) \
                or prefix_tokens.shape[-1] != D or prefix_tokens.shape[-2] < 1:
            _fail(f"prefix_tokens: expected shape (1, NP, {D}) or (NP, {D}) with NP >= 1, "
                  f"got {tuple(prefix_tokens.shape)}")
    if not isinstance(pos_embed_prefix, bool):
        _fail(f"pos_embed_prefix: expected a bool, got {pos_embed_prefix!r}")
    if pos_embed is not None:
        n_prefix = 1 if cls_token is not None else (0 if prefix_tokens is None else prefix_tokens.shape[-2])
        prefix = n_prefix if pos_embed_prefix else 0
        T = prefix + (H // P) * (W // P)
        if pos_embed.dim() not in (2, 3) or (pos_embed.dim() == 3 and pos_embed.shape[0] != 1) \
                or pos_embed.shape[-1] != D:
            _fail(f"pos_embed: expected shape (1, {T}, {D}) or ({T}, {D}), got {tuple(pos_embed.shape)}")
        if pos_embed.shape[-2] != T:
            _fail(f"pos_embed: expected length {T} = {prefix} prefix + ({H}/{P})·({W}/{P}) patches "
                  f"for {H}x{W} images, got {pos_embed.shape[-2]} (shape {tuple(pos_embed.shape)}); "
                  f"resample it to the grid")
    for name, t in (("mean", mean), ("std", std)):
        if t is not None:
            _check_float(name, t)
            if t.device != images.device:
                _fail(f"{name}: expected device {images.device} (like images), got {t.device}")
            if tuple(t.shape) != (C,):
                _fail(f"{name}: expected shape ({C},) (one value per image channel), got {tuple(t.shape)}")


# Steady state of patch_embed on the Triton path: the operands' layout -> the launch plan
# (`kernels.patch_embed.plan`), as for attention_qkv and linear.
_PATCH_EMBED_PLANS: dict[tuple, object] = {}


def _layout(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.shape, t.stride())


def _patch_embed_triton(images, weight, bias, prefix_tokens, pos_embed, mean, std, pos_embed_prefix):
    patch_embed = _kernels().patch_embed
    if images.shape[0] == 0:
        return patch_embed.patch_embed(images, weight, bias, prefix_tokens, pos_embed, mean, std,
                                       pos_embed_prefix=pos_embed_prefix)
    key = (images.shape, images.stride(), images.dtype, images.device, weight.shape, weight.stride(), weight.dtype,
           _layout(bias), _layout(prefix_tokens), _layout(pos_embed), _layout(mean), _layout(std), pos_embed_prefix,
           weight.dtype == torch.float32 and _kernels().tf32_enabled())
    plan = _PATCH_EMBED_PLANS.get(key)
    if plan is None:
        if len(_PATCH_EMBED_PLANS) >= _MAX_PLANS:
            _PATCH_EMBED_PLANS.clear()
        plan = _PATCH_EMBED_PLANS[key] = patch_embed.plan(images, weight, bias, prefix_tokens, pos_embed, mean, std,
                                                          pos_embed_prefix)
    return patch_embed.run(plan, images, weight, bias, prefix_tokens, pos_embed, mean, std)


# CPU patch embedding: shape key -> index into _PATCH_EMBED_TORCH of the faster path, timed once.
_PATCH_EMBED_PATHS: dict[tuple, int] = {}
_PATCH_EMBED_TORCH = (reference.torch_patch_embed, reference.patch_embed)     # F.conv2d, im2col GEMM


def _patch_embed_impl(images: Tensor, weight: Tensor, bias: Tensor | None, prefix_tokens: Tensor | None,
                      pos_embed: Tensor | None, mean: Tensor | None, std: Tensor | None,
                      pos_embed_prefix: bool) -> Tensor:
    # float64 has no kernel (tl.dot has no fp64 tensor-core path): it takes torch's path, like CPU tensors.
    args = (images, weight, bias, prefix_tokens, pos_embed, mean, std, pos_embed_prefix)
    if use_triton(images) and weight.dtype != torch.float64:
        return _patch_embed_triton(*args)
    if images.device.type != "cpu":
        return reference.torch_patch_embed(*args).contiguous()
    # On the CPU, mkldnn's F.conv2d is about twice slower than the im2col GEMM at patch 32 and faster at
    # patch 16: the first call of a shape times both and keeps the faster.
    key = (tuple(images.shape), images.dtype, tuple(weight.shape), weight.dtype, *(t is None for t in args[2:7]),
           None if prefix_tokens is None else tuple(prefix_tokens.shape), pos_embed_prefix)
    best = _PATCH_EMBED_PATHS.get(key)
    if best is None:
        best = _PATCH_EMBED_PATHS[key] = _cpu_fastest(_PATCH_EMBED_TORCH, args)
    return _PATCH_EMBED_TORCH[best](*args).contiguous()


_patch_embed_op = torch.library.custom_op("vitfast::patch_embed", _patch_embed_impl, mutates_args=())


@_patch_embed_op.register_fake
def _(images, weight, bias, prefix_tokens, pos_embed, mean, std, pos_embed_prefix):
    B, _, H, W = images.shape
    D, _, P, _ = weight.shape
    T = (0 if prefix_tokens is None else prefix_tokens.numel() // D) + (H // P) * (W // P)
    return images.new_empty((B, T, D), dtype=weight.dtype)


def _patch_embed_setup(ctx, inputs, output):
    images, weight, bias, prefix_tokens, pos_embed, mean, std, pos_embed_prefix = inputs
    ctx.save_for_backward(images, weight, mean, std)
    ctx.pos_embed_prefix = pos_embed_prefix
    ctx.shapes = (None if bias is None else bias.shape, None if prefix_tokens is None else prefix_tokens.shape,
                  None if pos_embed is None else pos_embed.shape)


def _patch_embed_backward(ctx, dout):
    """out = [prefix rows; patches(x) Wᵀ + b] + pos (pos on every row, or on the patch rows only):
    dW = d_tokensᵀ patches (one GEMM over the im2col rows), db and the prefix rows summed over the batch,
    the position table's gradient summed over the batch; the image gradient (float images) through
    d_tokens W folded back onto the pixels, divided by std."""
    images, weight, mean, std = ctx.saved_tensors
    need = ctx.needs_input_grad
    if need[5] or need[6]:          # gradients for mean / std (buffers, rarely trained): torch's conv autograd
        # bias, prefix rows and the position table enter the output additively: their values do not
        # change any gradient, zeros of their shapes stand in for them.
        args = [images, weight, *[None if s is None else dout.new_zeros(s) for s in ctx.shapes], mean, std]
        fn = lambda *a: reference.torch_patch_embed(*a, ctx.pos_embed_prefix)
        return _recompute_grads(fn, args, (dout,), need[:7]) + (None,)
    bias_shape, prefix_shape, pos_shape = ctx.shapes
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    gh, gw = H // P, W // P
    n_prefix = 0 if prefix_shape is None else prefix_shape.numel() // D
    d_tokens = dout[:, n_prefix:]                                                       # (B, N, D)
    d_tokens2 = d_tokens.reshape(-1, D)
    dw = db = dprefix = dpos = dimages = None
    if need[1]:
        x = images.to(weight.dtype)
        x = x / 255 if images.dtype == torch.uint8 else x
        if mean is not None:
            x = x - mean.to(x.dtype).view(1, -1, 1, 1)
        if std is not None:
            x = x / std.to(x.dtype).view(1, -1, 1, 1)
        patches = x.reshape(B, C, gh, P, gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B * gh * gw, C * P * P)
        dw = (d_tokens2.t() @ patches).reshape(weight.shape)
    if bias_shape is not None and need[2]:
        db = d_tokens2.sum(0)
    if prefix_shape is not None and need[3]:
        dprefix = dout[:, :n_prefix].sum(0).reshape(prefix_shape)
    if pos_shape is not None and need[4]:
        dpos = (dout if ctx.pos_embed_prefix else d_tokens).sum(0).reshape(pos_shape)
    if need[0]:
        dx = (d_tokens2 @ weight.reshape(D, -1)).reshape(B, gh, gw, C, P, P).permute(0, 3, 1, 4, 2, 5)
        dimages = dx.reshape(B, C, H, W)
        if std is not None:
            dimages = dimages / std.to(dimages.dtype).view(1, -1, 1, 1)
        dimages = dimages.to(images.dtype)
    return dimages, dw, db, dprefix, dpos, None, None, None


_patch_embed_op.register_autograd(_patch_embed_backward, setup_context=_patch_embed_setup)


def patch_embed(images: Tensor, weight: Tensor, bias: Tensor | None, *, cls_token: Tensor | None = None,
                pos_embed: Tensor | None = None, mean: Tensor | None = None, std: Tensor | None = None,
                prefix_tokens: Tensor | None = None, pos_embed_prefix: bool = True) -> Tensor:
    """Patchify + project + prefix rows + position embedding in one kernel (timm's PatchEmbed followed
    by `_pos_embed`: the class / register / distillation tokens and the position table, with the input
    normalisation fused into the load).

    images:    [B, C, H, W] uint8, fp16, bf16 or fp32 (fp64 on the reference path); NCHW or
               channels_last, H and W divisible by P. uint8 is scaled by 1/255 first.
    weight:    [D, C, P, P] the conv weight (timm's patch_embed.proj.weight); its dtype is the
               compute and output dtype (fp16, bf16, fp32).
    bias:      [D] or None.
    cls_token: [1, 1, D] or [D] or None: one class token, row 0 (cls_token + pos_embed[0]).
    prefix_tokens: [1, NP, D] or [NP, D] or None, instead of cls_token: NP prefix rows in this order
               (timm's: the class token, then register or distillation tokens).
    pos_embed: [1, T', D] or [T', D] or None, already resampled to this grid: T' = NP + (H/P)·(W/P)
               rows with pos_embed_prefix=True (timm's default: the prefix tokens get position rows
               too), (H/P)·(W/P) with pos_embed_prefix=False (timm's no_embed_class).
    mean, std: [C] or None, in [0, 1] units (timm's data config): x = (img/255 − mean) / std.
    bias, cls_token, prefix_tokens and pos_embed have weight's dtype and device.
    Returns tokens [B, NP + (H/P)·(W/P), D] (contiguous) in weight's dtype.
    """
    _check_patch_embed(images, weight, bias, cls_token, prefix_tokens, pos_embed, mean, std, pos_embed_prefix)
    prefix = cls_token if cls_token is not None else prefix_tokens
    direct = _direct(images, weight, bias, prefix, pos_embed, mean, std)
    op = _patch_embed_impl if direct else _patch_embed_op
    return op(images, weight, bias, prefix, pos_embed, mean, std, pos_embed_prefix)
