"""Fused ViT patch embedding: images -> tokens [B, T, D] in one Triton GEMM.

    tokens[b, P + n, :] = norm(patch(b, n)) @ Wᵀ + bias + pos_embed[P + n]     (pos_embed_prefix: rows for the
    tokens[b, p, :]     = prefix_tokens[p] + pos_embed[p],   p < P            prefix too, timm's default)
    tokens[b, P + n, :] = norm(patch(b, n)) @ Wᵀ + bias + pos_embed[n]         (no_embed_class: rows for the
    tokens[b, p, :]     = prefix_tokens[p]                                      patches only)

with P prefix tokens: a class token, then register or distillation tokens (timm's order), or none.

A GEMM [B·N, K] x [K, D] with K = C·P·P ordered (c, ph, pw) like the conv weight [D, C, P, P]:
- the A operand is gathered straight from the image by im2col addressing with the image's own
  strides (NCHW-contiguous and channels_last both work, no unfold, no copy); an image address
  splits into a per-row part (which image, which patch) plus a per-column part (c, ph, pw);
- uint8 images are converted and normalised in the load, x = (img / 255 − mean[c]) / std[c],
  folded into a per-column scale and shift; float images get (img − mean[c]) / std[c] the same way;
- the epilogue adds bias and pos_embed and writes token n at row P + n; the tile that holds token 0
  of an image also writes that image's P prefix rows, so there is no torch.cat.
Dtypes: images uint8 / fp16 / bf16 / fp32; weight (the compute and output dtype) fp16 / bf16 / fp32;
accumulation in fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from vitfast.kernels import Launch, autotune_bench, budgeted, cdiv, next_power_of_2, tf32_enabled
from vitfast.kernels import smem_limit as _smem_limit


def _configs():
    """Autotune configs (BLOCK_M tokens x BLOCK_N features x BLOCK_K patch elements)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter would run every config; one small config keeps every mask in play.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4})]
    # (64, 128, 64) on 4 warps is left out: within the register estimate of _prune_configs, yet its
    # im2col addressing spills at P = 14 (160-290 bytes on sm_90).
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (128, 128, 64, 4, 4),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 64, 64, 4, 4),
        (128, 128, 32, 4, 5),
        (64, 64, 64, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]



def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles that cannot fit the device's shared memory or that spill registers; if none is
    left, the one needing the fewest registers among those that fit. Both estimates match sm_90
    compiles (Triton 3.x, `ptxas -v`):
    - shared memory: num_stages − 1 buffers of the weight tile and of the raw image tile, plus one
      converted image tile when the load converts (uint8, normalisation, or a dtype other than the
      weight's): fp64 images with 128 x 128 x 64 tiles on 4 stages need 256 KiB and cannot launch;
    - registers: the fp32 accumulator plus the int64 im2col addresses of the image tile,
      (BLOCK_M·BLOCK_N + 2·BLOCK_M·BLOCK_K) / (32·num_warps) words per thread; at 192 and above the
      compile spills (128 x 128 x 64 on 4 warps: 256 words, spills 120-870 bytes at P = 14 and 16)."""
    img, w = named_args["img_ptr"], named_args["w_ptr"]
    convert = img.dtype != w.dtype or kwargs["IS_UINT8"] or kwargs["HAS_MEAN"] or kwargs["HAS_STD"]

    def smem(c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        buffers = (c.num_stages - 1) * (bn * bk * w.element_size() + bm * bk * img.element_size())
        return buffers + (bm * bk * w.element_size() if convert else 0)

    def words(c):
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        return (bm * bn + 2 * bm * bk) / (32 * c.num_warps)

    limit = _smem_limit(w.device) - 4 * 1024 if w.is_cuda else float("inf")
    fits = [c for c in configs if smem(c) <= limit] or [min(configs, key=smem)]
    return [c for c in fits if words(c) < 192] or [min(fits, key=words)]


# Keyed on a power-of-two bucket of M (= B·N), not M: a new batch size re-uses the tuning of a nearby
# one instead of re-tuning (a re-tune benchmarks, which a CUDA-graph capture cannot contain).
# The flags are in the key too: normalising in the load (IS_UINT8, HAS_MEAN, HAS_STD) adds a converted
# tile to the shared memory the prune counts, and the epilogue flags change the registers.
@triton.autotune(configs=_configs(),
                 key=["M_BUCKET", "D", "K", "PATCH", "HAS_BIAS", "PREFIX", "HAS_POS", "POS_PREFIX", "HAS_MEAN",
                      "HAS_STD", "IS_UINT8", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": budgeted(_prune_configs)},
                 do_bench=autotune_bench("patch_embed"))
@triton.jit(do_not_specialize=["M_BUCKET"])
def _patch_embed_kernel(
    img_ptr,     # [B, C, H, W] uint8 / fp16 / bf16 / fp32, any strides
    w_ptr,       # [D, C, P, P] compute dtype, any strides
    bias_ptr,    # [D]          (when HAS_BIAS)
    pre_ptr,     # [PREFIX, D]  prefix tokens (class, registers, distillation), when PREFIX > 0
    pos_ptr,     # [T, D]       (when HAS_POS; T = PREFIX + N with POS_PREFIX, else N)
    mean_ptr,    # [C]          (when HAS_MEAN)
    std_ptr,     # [C]          (when HAS_STD)
    out_ptr,     # [B, T, D]    weight's dtype
    M, D, K,     # M = B·N patch rows, D features, K = C·P·P
    M_BUCKET,    # autotune key only: next power of two of M
    N_TOK, GRID_W,  # N = (H/P)·(W/P) patches per image, W/P patches per grid row
    stride_ib, stride_ic, stride_ih, stride_iw,
    stride_wd, stride_wc, stride_wh, stride_ww,
    stride_bias, stride_pre_t, stride_pre_d, stride_pt, stride_pd, stride_mean, stride_std,
    stride_ob, stride_ot, stride_od,
    PATCH: tl.constexpr,
    HAS_BIAS: tl.constexpr, PREFIX: tl.constexpr, HAS_POS: tl.constexpr, POS_PREFIX: tl.constexpr,
    HAS_MEAN: tl.constexpr, HAS_STD: tl.constexpr, IS_UINT8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles share the L2-resident image rows across feature tiles.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(D, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)     # patch rows b·N + n
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)     # features d
    mask_m = offs_m < M
    mask_n = offs_n < D
    b = (offs_m // N_TOK).to(tl.int64)                   # int64: b·stride_ib can pass 2^31
    n = offs_m % N_TOK
    gy = n // GRID_W
    gx = n % GRID_W
    a_row = b * stride_ib + (gy * PATCH).to(tl.int64) * stride_ih + (gx * PATCH).to(tl.int64) * stride_iw
    w_row = offs_n * stride_wd

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        c = offs_k // (PATCH * PATCH)
        ph = (offs_k // PATCH) % PATCH
        pw = offs_k % PATCH
        # int64: in a batch-inner view (e.g. CNHW storage) a channel stride holds B, and c times it can pass 2^31.
        a_col = c.to(tl.int64) * stride_ic + ph.to(tl.int64) * stride_ih + pw.to(tl.int64) * stride_iw
        a = tl.load(img_ptr + a_row[:, None] + a_col[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        if IS_UINT8 or HAS_MEAN or HAS_STD:
            # x = (img · u − mean) / std = img · scale + shift, with u = 1/255 for uint8 images.
            scale = tl.full((BLOCK_K,), 1.0 / 255.0 if IS_UINT8 else 1.0, tl.float32)
            shift = tl.zeros((BLOCK_K,), dtype=tl.float32)
            if HAS_MEAN:
                shift = -tl.load(mean_ptr + c * stride_mean, mask=mask_k, other=0).to(tl.float32)
            if HAS_STD:
                inv_std = 1.0 / tl.load(std_ptr + c * stride_std, mask=mask_k, other=1).to(tl.float32)
                scale = scale * inv_std
                shift = shift * inv_std
            # Padded columns (k >= K) load img 0, mean 0, std 1, so they stay 0.
            a = a.to(tl.float32) * scale[None, :] + shift[None, :]
        a = a.to(w_ptr.dtype.element_ty)
        w_col = c * stride_wc + ph * stride_wh + pw * stride_ww
        w = tl.load(w_ptr + w_col[:, None] + w_row[None, :], mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)          # [BLOCK_M, BLOCK_N] fp32

    row = n + PREFIX                                                   # token row in the output
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0).to(tl.float32)[None, :]
    if HAS_POS:
        pos_row = row if POS_PREFIX else n                             # the table's row for token n
        pos = tl.load(pos_ptr + pos_row[:, None] * stride_pt + offs_n[None, :] * stride_pd, mask=mask, other=0)
        acc += pos.to(tl.float32)
    out_b = b * stride_ob
    out_offs = out_b[:, None] + row.to(tl.int64)[:, None] * stride_ot + offs_n[None, :] * stride_od
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    # The row tile holding token 0 of image b also writes b's prefix rows 0 .. PREFIX - 1.
    for p in tl.static_range(PREFIX):
        tok = tl.load(pre_ptr + p * stride_pre_t + offs_n * stride_pre_d, mask=mask_n, other=0).to(tl.float32)
        if HAS_POS and POS_PREFIX:
            tok += tl.load(pos_ptr + p * stride_pt + offs_n * stride_pd, mask=mask_n, other=0).to(tl.float32)
        tok_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + tok[None, :]
        tok_offs = out_b[:, None] + p * stride_ot + offs_n[None, :] * stride_od
        tl.store(out_ptr + tok_offs, tok_tile.to(out_ptr.dtype.element_ty), mask=mask & (n == 0)[:, None])


def patch_embed(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                prefix_tokens: torch.Tensor | None = None, pos_embed: torch.Tensor | None = None,
                mean: torch.Tensor | None = None, std: torch.Tensor | None = None,
                out: torch.Tensor | None = None, *, pos_embed_prefix: bool = True) -> torch.Tensor:
    """Launch the fused patch embedding (see the module docstring); arguments as
    `vitfast.ops.patch_embed`, which validates them. images [B, C, H, W], weight [D, C, P, P],
    bias [D], prefix_tokens [1, NP, D], [NP, D] or [D] (one class token), pos_embed [1, T', D] or
    [T', D] with T' = NP + N rows (pos_embed_prefix) or N, mean/std [C]; out: optional preallocated
    [B, NP + N, D] in weight's dtype. Returns out."""
    B, C, H, W = images.shape
    D, Cw, P, Pw = weight.shape
    if Cw != C or Pw != P or H % P or W % P:
        raise ValueError(f"patch_embed: images {tuple(images.shape)} do not fit weight {tuple(weight.shape)}")
    grid_w = W // P
    n_tok = (H // P) * grid_w
    prefix = None if prefix_tokens is None else prefix_tokens.reshape(-1, prefix_tokens.shape[-1])  # (NP, D)
    n_prefix = 0 if prefix is None else prefix.shape[0]
    T = n_tok + n_prefix
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(-1, pos_embed.shape[-1])            # (T', D), a view
        rows = n_tok + (n_prefix if pos_embed_prefix else 0)
        if tuple(pos_embed.shape) != (rows, D):
            raise ValueError(f"patch_embed: pos_embed expected ({rows}, {D}), got {tuple(pos_embed.shape)}")
    if prefix is not None and prefix.shape[1] != D:
        raise ValueError(f"patch_embed: prefix_tokens expected rows of {D}, got shape {tuple(prefix_tokens.shape)}")
    for name, t, size in (("bias", bias, D), ("mean", mean, C), ("std", std, C)):
        if t is not None and t.numel() != size:
            raise ValueError(f"patch_embed: {name} expected {size} values, got shape {tuple(t.shape)}")
    if out is None:
        out = torch.empty((B, T, D), dtype=weight.dtype, device=images.device)
    elif tuple(out.shape) != (B, T, D) or out.dtype != weight.dtype or out.device != images.device:
        raise ValueError(f"patch_embed: out expected ({B}, {T}, {D}) {weight.dtype} on {images.device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
    if out.numel() == 0:
        return out
    p = plan(images, weight, bias, prefix_tokens, pos_embed, mean, std, pos_embed_prefix, out)
    return run(p, images, weight, bias, prefix_tokens, pos_embed, mean, std, out)


class PatchEmbedPlan:
    """What a `patch_embed` launch fixes for operands of given shapes, strides, dtypes and device (`plan`):
    `run` then allocates the output and launches."""

    __slots__ = ("launch", "out_shape", "D")

    def __init__(self, launch, out_shape, D):
        self.launch, self.out_shape, self.D = launch, out_shape, D


def _rows(t: torch.Tensor | None, D: int) -> torch.Tensor | None:
    """prefix_tokens or pos_embed ([1, R, D], [R, D] or [D]) as [R, D] (a view when one exists)."""
    return None if t is None else t.reshape(-1, D)


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    """mean or std (C values) as [C]."""
    return None if t is None else t.reshape(-1)


def plan(images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prefix_tokens: torch.Tensor | None,
         pos_embed: torch.Tensor | None, mean: torch.Tensor | None, std: torch.Tensor | None,
         pos_embed_prefix: bool, out: torch.Tensor | None = None) -> PatchEmbedPlan:
    """The launch of `patch_embed` for these operands (validated; a non-empty output), valid for any later
    operands with the same shapes, strides, dtypes and device, and the same TF32 setting for fp32. out None:
    a contiguous output (what `run` allocates)."""
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    grid_w = W // P
    n_tok = (H // P) * grid_w
    prefix, pos = _rows(prefix_tokens, D), _rows(pos_embed, D)
    mean, std = _flat(mean), _flat(std)
    n_prefix = 0 if prefix is None else prefix.shape[0]
    stride0 = lambda t: t.stride(0) if t is not None else 0
    use_tf32 = weight.dtype == torch.float32 and images.is_cuda and tf32_enabled()
    M, K = B * n_tok, C * P * P
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(D, meta["BLOCK_N"]),)
    out_strides = out.stride() if out is not None else ((n_tok + n_prefix) * D, D, 1)
    scalars = (M, D, K, next_power_of_2(M), n_tok, grid_w,
               *images.stride(), *weight.stride(),
               stride0(bias), *(prefix.stride() if prefix is not None else (0, 0)),
               *(pos.stride() if pos is not None else (0, 0)),
               stride0(mean), stride0(std),
               *out_strides)
    meta = dict(PATCH=P, HAS_BIAS=bias is not None, PREFIX=n_prefix, HAS_POS=pos is not None,
                POS_PREFIX=bool(pos_embed_prefix) and n_prefix > 0,
                HAS_MEAN=mean is not None, HAS_STD=std is not None, IS_UINT8=images.dtype == torch.uint8,
                DOT_PRECISION="tf32" if use_tf32 else "ieee")
    return PatchEmbedPlan(Launch(_patch_embed_kernel, grid, scalars, meta), (B, n_tok + n_prefix, D), D)


def run(p: PatchEmbedPlan, images: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        prefix_tokens: torch.Tensor | None, pos_embed: torch.Tensor | None, mean: torch.Tensor | None,
        std: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch `p` on operands it was planned for (nothing is checked): returns the tokens (`out`, or a new
    contiguous tensor). Absent optional tensors are passed as the weight (never read: their flag is off)."""
    if out is None:
        out = torch.empty(p.out_shape, dtype=weight.dtype, device=images.device)
    D = p.D
    prefix = weight if prefix_tokens is None else prefix_tokens.reshape(-1, D)
    pos = weight if pos_embed is None else pos_embed.reshape(-1, D)
    p.launch(images, weight, weight if bias is None else bias, prefix, pos,
             weight if mean is None else mean.reshape(-1), weight if std is None else std.reshape(-1), out)
    return out
