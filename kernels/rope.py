"""Rotary position embedding (RoPE) on timm's packed qkv projection, in one Triton pass.

    qkv [B, N, 3·C] = (q, k, v) × H heads × D;   tables cos, sin [N_rope, D/2] (fp32), N_rope <= N
    out[b, n, part, h, :D/2] = x1 · cos[r] − x2 · sin[r]      for part q and k, and the last N_rope
    out[b, n, part, h, D/2:] = x2 · cos[r] + x1 · sin[r]      tokens: r = n − (N − N_rope)
    out = qkv elsewhere (the prefix tokens: class, registers; all of v)

with x1, x2 the two halves of the head (the rotate-half pairing of Hugging Face's and timm's DINOv3: pair
j is columns j and D/2 + j), in fp32, rounded once. `inverse=True` rotates by −angle: the transpose, so
the backward of the op is the op itself on the output gradient.

Out of place (autograd keeps qkv) it writes a new packed tensor: one read and one write of qkv. In place
(inference: qkv is the projection's fresh output) it reads and rewrites q and k of the rotated tokens only,
two thirds of that traffic and no new tensor. Either way the attention kernel then reads the result as any
qkv. This is how FlashAttention applies rotary embeddings: a separate pass over q and k before the attention
kernel.

With `norm` (Gemma 4's and GLM-OCR's vision blocks) the same pass first normalizes each head of q and k, and
of v with norm="qkv", by its RMS over the head dim, for every token (the prefix tokens too):

    x -> x / sqrt(mean(x²) + eps) · w[part]      w [2, D]: q's and k's weights; v's norm has none

then rotates q and k as above; fp32 throughout, rounded once. In place it then rewrites every token of the
normalized parts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitfast.kernels import Launch, cdiv, next_power_of_2


@triton.jit
def _rope_qkv_kernel(
    src_ptr, dst_ptr, cos_ptr, sin_ptr, w_ptr,
    N, stride_sb, stride_sn, stride_db, stride_dn, rope_start, eps,
    H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr,
    INVERSE: tl.constexpr, IN_PLACE: tl.constexpr, NORM: tl.constexpr,
):
    """One program: BLOCK_T tokens of one image, one (part, head) column block of D = 2·HALF values (in place:
    the q and k heads only, and only the rotated tokens are written, unless NORM). NORM: 0 none, 1 q and k
    normalized (w_ptr: [2, D] weights), 2 v too (without weight)."""
    pid_t, b, ph = tl.program_id(0), tl.program_id(1), tl.program_id(2)     # ph = part · H + head
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_HALF)
    ok = (tok < N)[:, None] & (col < HALF)[None, :]
    src = src_ptr + b.to(tl.int64) * stride_sb + tok.to(tl.int64)[:, None] * stride_sn + ph * (2 * HALF) + col[None, :]
    dst = dst_ptr + b.to(tl.int64) * stride_db + tok.to(tl.int64)[:, None] * stride_dn + ph * (2 * HALF) + col[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    if NORM == 2:                                    # every head: v's too
        x1, x2 = _rms_scaled(x1, x2, eps, 2 * HALF)
    if NORM == 1:
        if ph < 2 * H:
            x1, x2 = _rms_scaled(x1, x2, eps, 2 * HALF)
    if NORM != 0:
        if ph < 2 * H:                               # q's or k's weight
            w = w_ptr + (ph // H) * (2 * HALF) + col
            x1 = x1 * tl.load(w, mask=col < HALF, other=0.0).to(tl.float32)[None, :]
            x2 = x2 * tl.load(w + HALF, mask=col < HALF, other=0.0).to(tl.float32)[None, :]
    if ph < 2 * H:                                   # q or k: rotate the tokens the tables cover
        r = tok - rope_start
        rot = ok & (r >= 0)[:, None]
        t = r.to(tl.int64)[:, None] * HALF + col[None, :]
        c = tl.load(cos_ptr + t, mask=rot, other=1.0)
        s = tl.load(sin_ptr + t, mask=rot, other=0.0)
        if INVERSE:
            s = -s
        x1, x2 = x1 * c - x2 * s, x2 * c + x1 * s
        if IN_PLACE and NORM == 0:
            ok = rot
    tl.store(dst, x1.to(dst_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, x2.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rms_scaled(x1, x2, eps, D: tl.constexpr):
    """The halves x1, x2 [BLOCK_T, BLOCK_HALF] (fp32, zero past the head) of each row divided by the row's RMS
    over its D values."""
    rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
    return x1 * rstd[:, None], x2 * rstd[:, None]


def _block_t(half: int) -> int:
    """Tokens per program: about 4096 values of each half per program, 16 to 128 tokens."""
    return max(16, min(128, 4096 // next_power_of_2(half)))


class RopePlan:
    __slots__ = ("launch", "in_place")

    def __init__(self, launch: Launch, in_place: bool):
        self.launch, self.in_place = launch, in_place


NORMS = (None, "qk", "qkv")      # what `norm` normalizes before the rotation (module docstring)


def plan(qkv: torch.Tensor, num_heads: int, n_rope: int, inverse: bool = False, in_place: bool = False,
         norm: str | None = None, eps: float = 1e-6) -> RopePlan:
    """The launch for qkv's shape and strides, tables covering the last n_rope tokens: into a new contiguous
    tensor, or in place (the q and k heads only, v's too with norm="qkv")."""
    B, N, C3 = qkv.shape
    half = C3 // (3 * num_heads) // 2
    block_t, block_half = _block_t(half), next_power_of_2(half)
    grid = (cdiv(N, block_t), B, (2 if in_place and norm != "qkv" else 3) * num_heads)
    warps = 4 if block_t * block_half >= 2048 else 2
    dst = (qkv.stride(0), qkv.stride(1)) if in_place else (N * C3, C3)
    scalars = (N, qkv.stride(0), qkv.stride(1), *dst, N - n_rope, float(eps))
    meta = dict(H=num_heads, HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t, INVERSE=inverse, IN_PLACE=in_place,
                NORM=NORMS.index(norm), num_warps=warps)
    return RopePlan(Launch(_rope_qkv_kernel, grid, scalars, meta), in_place)


def run(p: RopePlan, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        weight: torch.Tensor | None = None) -> torch.Tensor:
    """Launch `p` on operands it was planned for (nothing is checked): qkv itself rotated (in place), or a new
    contiguous packed tensor. weight: q's and k's norm weights [2, D] (contiguous) for a plan with a norm."""
    out = qkv if p.in_place else torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    if out.numel():
        p.launch(qkv, out, cos, sin, cos if weight is None else weight)
    return out


def rope_qkv(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
             inverse: bool = False, in_place: bool = False, norm: str | None = None,
             weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """qkv [B, N, 3·C] (unit-stride last dim, even head dim) with q and k of its last cos.shape[0] tokens
    rotated (after the heads' norms with `norm`: weight [2, D], q's and k's); cos, sin [N_rope, D/2] contiguous
    fp32 on qkv's device. See the module docstring."""
    return run(plan(qkv, num_heads, cos.shape[0], inverse, in_place, norm, eps), qkv, cos, sin, weight)
