"""Rotary position embedding (RoPE) on timm's packed qkv projection, in one Triton pass.

    qkv [B, N, 3·C] = (q, k, v) × H heads × D;   tables cos, sin [N_rope, D/2] (fp32), N_rope <= N
    out[b, n, part, h, :D/2] = x1 · cos[r] − x2 · sin[r]      for part q and k, and the last N_rope
    out[b, n, part, h, D/2:] = x2 · cos[r] + x1 · sin[r]      tokens: r = n − (N − N_rope)
    out = qkv elsewhere (the prefix tokens: class, registers; all of v)

with x1, x2 the two halves of the head (the rotate-half pairing of Hugging Face's and timm's DINOv3: pair
j is columns j and D/2 + j), in fp32, rounded once. `inverse=True` rotates by −angle: the transpose, so
the backward of the op is the op itself on the output gradient.

Tables of D columns (FULL) give each element its own angle, V-JEPA 2's RoPE (whose two elements of a pair turn by
different angles, an artefact of its table layout that its checkpoints were trained with):

    out[..., :D/2] = x1 · cos[r, :D/2] − x2 · sin[r, :D/2]      out[..., D/2:] = x2 · cos[r, D/2:] + x1 · sin[r, D/2:]

which is no longer a rotation; `inverse=True` is then the transpose (sin's halves swapped and negated), still the
op's backward.

Out of place (autograd keeps qkv) it writes a new packed tensor: one read and one write of qkv. In place
(inference: qkv is the projection's fresh output) it reads and rewrites q and k of the rotated tokens only,
two thirds of that traffic and no new tensor. Either way the attention kernel then reads the result as any
qkv. This is how FlashAttention applies rotary embeddings: a separate pass over q and k before the attention
kernel.

With `norm` (Gemma 4's and GLM-OCR's vision blocks) the same pass first normalizes each head of q and k, and
of v with norm="qkv", by its RMS over the head dim, for every token (the prefix tokens too):

    x -> x / sqrt(mean(x²) + eps) · w[part]      w [2, D]: q's and k's weights; v's norm has none

then rotates q and k as above; fp32 throughout, rounded once. In place it then rewrites every token of the
normalized parts. Its backward (`norm_rope_qkv_backward`) is one pass too: the gradient rotated back, then the
norms' backward recomputed from the saved qkv (no statistics saved), each program's share of the weights'
gradient summed on the host.
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
    INVERSE: tl.constexpr, IN_PLACE: tl.constexpr, NORM: tl.constexpr, FULL: tl.constexpr,
):
    """One program: BLOCK_T tokens of one image, one (part, head) column block of D = 2·HALF values (in place:
    the q and k heads only, and only the rotated tokens are written, unless NORM). NORM: 0 none, 1 q and k
    normalized (w_ptr: [2, D] weights), 2 v too (without weight). FULL: tables of D columns, an angle per element
    (module docstring)."""
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
        if FULL:                                     # an angle per element: x1's columns, then x2's
            t = r.to(tl.int64)[:, None] * (2 * HALF) + col[None, :]
            c1 = tl.load(cos_ptr + t, mask=rot, other=1.0)
            c2 = tl.load(cos_ptr + t + HALF, mask=rot, other=1.0)
            s1 = tl.load(sin_ptr + t, mask=rot, other=0.0)
            s2 = tl.load(sin_ptr + t + HALF, mask=rot, other=0.0)
            if INVERSE:                              # the transpose
                s1, s2 = -s2, -s1
            x1, x2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        else:
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
def _rstd(x1, x2, eps, D: tl.constexpr):
    """1 / RMS of each row of the halves x1, x2 [BLOCK_T, BLOCK_HALF] (fp32, zero past the head) over its D
    values -> [BLOCK_T]."""
    return 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)


@triton.jit
def _rms_scaled(x1, x2, eps, D: tl.constexpr):
    """The halves x1, x2 of each row divided by the row's RMS."""
    rstd = _rstd(x1, x2, eps, D)
    return x1 * rstd[:, None], x2 * rstd[:, None]


@triton.jit
def _norm_rope_bwd_kernel(
    src_ptr, g_ptr, dx_ptr, dw_ptr, cos_ptr, sin_ptr, w_ptr,
    N, stride_sb, stride_sn, rope_start, eps,
    H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_T: tl.constexpr, NORM: tl.constexpr,
):
    """The backward of the NORM forward, one program per forward program's block: the output gradient g
    (contiguous [B, N, 3·C]) rotated back (the rotation's transpose), then through the norm, recomputed from
    the saved input x:

        n = x · rstd,   y = n · w:   dw += Σ_rows g · n,   dx = rstd · (g·w − n · mean(g·w · n))

    into dx (contiguous, qkv's dtype); each program's share of dw (q's or k's head) into its own row of
    dw_ptr [num_programs(0), B, 2·H, D] fp32, summed on the host. v's heads: the norm without weight (NORM 2)
    or the gradient as it is (NORM 1)."""
    pid_t, b, ph = tl.program_id(0), tl.program_id(1), tl.program_id(2)     # ph = part · H + head
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_HALF)
    ok = (tok < N)[:, None] & (col < HALF)[None, :]
    src = src_ptr + b.to(tl.int64) * stride_sb + tok.to(tl.int64)[:, None] * stride_sn + ph * (2 * HALF) + col[None, :]
    grad = (b.to(tl.int64) * N + tok.to(tl.int64))[:, None] * (6 * H * HALF) + ph * (2 * HALF) + col[None, :]
    g1 = tl.load(g_ptr + grad, mask=ok, other=0.0).to(tl.float32)
    g2 = tl.load(g_ptr + grad + HALF, mask=ok, other=0.0).to(tl.float32)
    if ph < 2 * H:                                   # q or k: rotate back, then the weighted norm's backward
        r = tok - rope_start
        rot = ok & (r >= 0)[:, None]
        t = r.to(tl.int64)[:, None] * HALF + col[None, :]
        c = tl.load(cos_ptr + t, mask=rot, other=1.0)
        s = tl.load(sin_ptr + t, mask=rot, other=0.0)
        g1, g2 = g1 * c + g2 * s, g2 * c - g1 * s
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        rstd = _rstd(x1, x2, eps, 2 * HALF)
        n1, n2 = x1 * rstd[:, None], x2 * rstd[:, None]
        # rows past N are left out of dw (with eps 0 their n is 0 / 0)
        part = dw_ptr + ((pid_t.to(tl.int64) * tl.num_programs(1) + b) * (2 * H) + ph) * (2 * HALF) + col
        tl.store(part, tl.sum(tl.where(ok, g1 * n1, 0.0), axis=0), mask=col < HALF)
        tl.store(part + HALF, tl.sum(tl.where(ok, g2 * n2, 0.0), axis=0), mask=col < HALF)
        w = w_ptr + (ph // H) * (2 * HALF) + col
        g1 = g1 * tl.load(w, mask=col < HALF, other=0.0).to(tl.float32)[None, :]
        g2 = g2 * tl.load(w + HALF, mask=col < HALF, other=0.0).to(tl.float32)[None, :]
        g1, g2 = _rms_backward(n1, n2, g1, g2, rstd, 2 * HALF)
    else:
        if NORM == 2:                                # v: the norm without weight
            x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
            rstd = _rstd(x1, x2, eps, 2 * HALF)
            g1, g2 = _rms_backward(x1 * rstd[:, None], x2 * rstd[:, None], g1, g2, rstd, 2 * HALF)
    tl.store(dx_ptr + grad, g1.to(dx_ptr.dtype.element_ty), mask=ok)
    tl.store(dx_ptr + grad + HALF, g2.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rms_backward(n1, n2, g1, g2, rstd, D: tl.constexpr):
    """dx of n = x · rstd for the gradient g of n (halves, fp32): rstd · (g − n · mean(g · n)) per row."""
    dot = (tl.sum(g1 * n1, axis=1) + tl.sum(g2 * n2, axis=1)) / D
    return rstd[:, None] * (g1 - n1 * dot[:, None]), rstd[:, None] * (g2 - n2 * dot[:, None])


def _block_t(half: int) -> int:
    """Tokens per program: about 4096 values of each half per program, 16 to 128 tokens."""
    return max(16, min(128, 4096 // next_power_of_2(half)))


class RopePlan:
    __slots__ = ("launch", "in_place")

    def __init__(self, launch: Launch, in_place: bool):
        self.launch, self.in_place = launch, in_place


NORMS = (None, "qk", "qkv")      # what `norm` normalizes before the rotation (module docstring)


def plan(qkv: torch.Tensor, num_heads: int, n_rope: int, inverse: bool = False, in_place: bool = False,
         norm: str | None = None, eps: float = 1e-6, full: bool = False) -> RopePlan:
    """The launch for qkv's shape and strides, tables covering the last n_rope tokens (of D / 2 columns, or D with
    `full`): into a new contiguous tensor, or in place (the q and k heads only, v's too with norm="qkv")."""
    B, N, C3 = qkv.shape
    half = C3 // (3 * num_heads) // 2
    block_t, block_half = _block_t(half), next_power_of_2(half)
    grid = (cdiv(N, block_t), B, (2 if in_place and norm != "qkv" else 3) * num_heads)
    warps = 4 if block_t * block_half >= 2048 else 2
    dst = (qkv.stride(0), qkv.stride(1)) if in_place else (N * C3, C3)
    scalars = (N, qkv.stride(0), qkv.stride(1), *dst, N - n_rope, float(eps))
    meta = dict(H=num_heads, HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t, INVERSE=inverse, IN_PLACE=in_place,
                NORM=NORMS.index(norm), FULL=full, num_warps=warps)
    return RopePlan(Launch(_rope_qkv_kernel, grid, scalars, meta), in_place)


class NormRopeBackwardPlan:
    __slots__ = ("launch", "parts")

    def __init__(self, launch: Launch, parts: tuple):
        self.launch, self.parts = launch, parts


def backward_plan(qkv: torch.Tensor, num_heads: int, n_rope: int, norm: str, eps: float) -> NormRopeBackwardPlan:
    """The launch of the norm forward's backward for the saved qkv's shape and strides."""
    B, N, C3 = qkv.shape
    half = C3 // (3 * num_heads) // 2
    block_t, block_half = _block_t(half), next_power_of_2(half)
    grid = (cdiv(N, block_t), B, 3 * num_heads)
    warps = 4 if block_t * block_half >= 2048 else 2
    scalars = (N, qkv.stride(0), qkv.stride(1), N - n_rope, float(eps))
    meta = dict(H=num_heads, HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t, NORM=NORMS.index(norm),
                num_warps=warps)
    return NormRopeBackwardPlan(Launch(_norm_rope_bwd_kernel, grid, scalars, meta),
                                (grid[0], B, 2, num_heads, 2 * half))


def run_backward(p: NormRopeBackwardPlan, qkv: torch.Tensor, dout: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch `p` (nothing is checked): the forward's saved qkv, its output gradient dout (contiguous), tables
    and weight [2, D] as the forward had them -> (dqkv contiguous in qkv's dtype, dweight [2, D] in weight's)."""
    dx = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    parts = torch.empty(p.parts, dtype=torch.float32, device=qkv.device)
    if dx.numel():
        p.launch(qkv, dout, dx, parts, cos, sin, weight)
    return dx, parts.sum((0, 1, 3)).to(weight.dtype)


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
    rotated (after the heads' norms with `norm`: weight [2, D], q's and k's); cos, sin [N_rope, D/2] (or [N_rope, D]
    without norm: an angle per element) contiguous fp32 on qkv's device. See the module docstring."""
    D = qkv.shape[2] // (3 * num_heads)
    return run(plan(qkv, num_heads, cos.shape[0], inverse, in_place, norm, eps, cos.shape[1] == D), qkv, cos, sin,
               weight)


def norm_rope_qkv_backward(qkv: torch.Tensor, dout: torch.Tensor, num_heads: int, cos: torch.Tensor,
                           sin: torch.Tensor, weight: torch.Tensor, norm: str, eps: float = 1e-6
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients (dqkv, dweight) of `rope_qkv(qkv, ..., norm=norm, weight=weight, eps=eps)` for its output
    gradient dout [B, N, 3·C] (contiguous); norm "qk" or "qkv"."""
    return run_backward(backward_plan(qkv, num_heads, cos.shape[0], norm, eps), qkv, dout, cos, sin, weight)
