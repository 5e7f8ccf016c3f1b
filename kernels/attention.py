"""Flash-style attention forward for ViT shapes: softmax(q kᵀ · scale) v without an N×N matrix.

One program owns BLOCK_M query rows of one (batch, head) and streams the keys/values in blocks
of BLOCK_N with an online softmax (running max m and sum l in fp32, `exp2` with scale·log2(e)
folded into the scores), accumulating in fp32 and storing in the input dtype.

- q, k, v and out are read/written through (batch, head, token) strides with a unit-stride head
  dim, so the same kernel serves [B, H, N, D] tensors of any layout and the packed qkv projection
  [B, N, 3·C] (timm layout: qkv.reshape(B, N, 3, H, D)) with no copy.
- Any N: the last key block is masked (scores -> -inf), rows past N are neither read nor stored.
- Head dims up to 256. The head dim is covered by two power-of-two column chunks (D_LO, D_HI):
  80 = 64 + 16 and 96 = 64 + 32 exactly, so ViT-H's 80 spends no MMA work on padding; other
  sizes pad the last chunk with masked lanes, which are never loaded.
- RETURN_CLS: the program owning query row 0 also writes the softmax row of that query, [B, H, N]
  fp32: it stores row 0's raw log2-domain scores while streaming, then rescales them in place with
  the final max and sum, p = exp2(s - m) / l. Costs O(N) extra memory per head, never N².
- fp16 / bf16 / fp32 inputs; fp32 dots use tf32 or ieee (`DOT_PRECISION`), as the caller decides.
- RETURN_LSE: every query row's log-sum-exp of its scaled scores, log2 domain (m + log2 l), [B, H, N_Q]
  fp32: what the backward needs to rebuild the probabilities block by block.
- HAS_MASK: a key-padding mask [B, N_KV] (bool read as uint8 through two strides; SigLIP 2 NaFlex pads
  each image's patch sequence): a key whose entry is 0 is left out for every query and head of its batch
  element (score -inf, probability 0, also in the CLS row). Queries are not masked. A row whose keys are
  all masked outputs zeros, its lse is +inf (so the backward rebuilds p = 0: zero gradients) and its CLS
  row zeros, as FlashAttention does; the online softmax offsets exp2 by 0 while a row's running max is
  still -inf, so no -inf − -inf NaN arises. HAS_MASK=False compiles to the unmasked kernel, unchanged.
- VARLEN: packed variable-length self-attention (FlashAttention's varlen; Qwen2-VL's vision tower packs
  the patches of several images into one sequence and attends within each image). q, k, v and out are
  [1, H, T, D] by strides and cu_seqlens (int32 [S + 1], cu[0] = 0, non-decreasing, cu[S] = T) splits
  the T tokens into S segments, segment s = tokens [cu[s], cu[s + 1]); a token attends to the keys of its
  own segment only. A program's batch index is its segment: it offsets its base pointers by cu[s] tokens
  and bounds its rows and keys by the segment's length n; N_Q = N_KV is the longest length (max_seqlen),
  which sizes the grid and buckets the autotune key, and a program whose query block starts at or past n
  returns at once (an empty segment writes nothing). lse is per token, [1, H, T]. Not combined with
  HAS_MASK or RETURN_CLS. VARLEN=False compiles to the kernel without it, unchanged.
- REL_KW: SAM's decomposed relative positions (MViTv2's; SAM's image encoder, GOT-OCR2's and DeepSeek-OCR's
  SAM towers). The keys form a KH x REL_KW grid (key n at row n // REL_KW, column n % REL_KW) and every score
  gets a term per query and key row plus one per query and key column, rel_h [B, H, N_Q, KH] and rel_w
  [B, H, N_Q, REL_KW] (fp32, made by the caller from q and the learned tables: O(N·√N), not N²), added per
  tile in the kernel: s_ij = q_i·k_j·scale + rel_h[i, j // REL_KW] + rel_w[i, j % REL_KW]. REL_KW is a
  constexpr, so the division is by a constant; REL_KW=0 compiles to the kernel without it, unchanged. When
  REL_KW is a multiple of BLOCK_N (SAM's 64-wide global blocks) a key block lies within one row of the grid:
  one rel_h term per query and rel_w's contiguous columns, and rel_w's tile is loaded once when the block is a
  whole row; otherwise (SAM's 14 x 14 windows) the terms are gathered per element. The backward kernels take
  them too (gathered), and the dQ kernel sums dS per key row and column into their gradients.
- HAS_BIAS: a dense additive bias, [B, H, N_Q, N_KV] by strides (batch stride 0 for one bias shared by the batch:
  BEiT's and Data2Vec's relative position bias, a table per head gathered into [H, N, N] once per forward), unit
  stride over the keys, fp16 / bf16 / fp32, added to the scores tile by tile in fp32: s_ij = q_i·k_j·scale +
  bias_ij (HF's eager `attn_weights + attention_mask`). The backward kernels read it too, and the dQ kernel adds
  dS (fp32) into its gradient with atomics, so that a bias shared by the batch gets the batch's sum without a
  [B, H, N, N] buffer. HAS_BIAS=False compiles to the kernel without it, unchanged.

Backward (FlashAttention-2): with D_i = Σ_d dO_id · O_id, P = exp2(S·log2(e) − lse) rebuilt one tile at
a time, dV = Pᵀ dO, dP = dO Vᵀ, dS = P ⊙ (dP − D), dQ = dS K · scale, dK = dSᵀ Q · scale. One kernel
owns a block of keys and streams the queries (dK, dV), another owns a block of queries and streams
the keys (dQ): no atomics, no N×N matrix, O(N) extra memory (lse and D). dQ, dK and dV are written
through strides, so the gradient of the packed projection lands in one [B, N, 3·C] tensor. The head
dim is split into the forward's two power-of-two chunks (72 = 64 + 16 with 8 lanes masked, 80 = 64 + 16):
no dot runs over a padded 128. With HAS_MASK, p = 0 for the masked keys, so their dK and dV are 0.
With VARLEN, the dK/dV program owns a key block of one segment and streams that segment's queries, the
dQ program a query block and that segment's keys.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vitfast.kernels import Launch, autotune_bench, budgeted, cdiv, next_power_of_2, tf32_enabled
from vitfast.kernels import smem_limit as _smem_limit

MAX_HEAD_DIM = 256
LOG2E = math.log2(math.e)


def attention_configs() -> list[triton.Config]:
    """Autotune space (keyed on sequence lengths and head dim). Hopper likes BLOCK_M 128 with
    BLOCK_N 64-128, 4-8 warps and 2-4 pipeline stages; BLOCK_M 64 helps short sequences fill the
    machine. The last tile (64 x 32 on 8 warps) is the one that fits shared memory and registers for
    fp32 with head dims above ~144. `_prune_configs` drops, per call, the tiles that cannot run or
    spill. The interpreter gets one small config (it would otherwise run every config)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    configs = [triton.Config({"BLOCK_M": 128, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bn in (64, 128) for w in (4, 8) for s in (2, 3, 4)]
    configs += [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=s) for s in (2, 3)]
    configs += [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2)]
    return configs



# Per-thread fp32 words (see `_prune_configs`) above which sm_90 compiles of this kernel spill registers.
_MAX_WORDS_PER_THREAD = 192


def _prune_configs(configs, named_args, **kwargs):
    """Keep the tiles that fit the device's shared memory, do not spill registers and do not use key
    blocks much longer than the sequence; if none is left, the one needing the fewest registers among
    those that fit. Both estimates match sm_90 compiles (Triton 3.x, `ptxas -v`):
    - shared memory: the q tile plus num_stages buffers of k and v tiles, elt·D·(BLOCK_M + 2·stages·BLOCK_N)
      bytes with D the padded head dim (fp32 with D=128 and 3 stages needs 256 KiB: cannot launch), and
      with RETURN_CLS the scratch of the cross-warp column sum that extracts query 0's scores,
      4·BLOCK_N·min(num_warps, BLOCK_M/16) bytes (bf16 D=128 128 x 128 on 8 warps, 3 stages: 233,472 bytes,
      over the 232,448 an sm_90 block may have); with REL_KW the pipeliner also stages the two gathered fp32
      tiles of relative-position terms, 8·BLOCK_M·BLOCK_N·(num_stages − 1) bytes (bf16 D=64 128 x 64 on 8 warps,
      4 stages: 278,528 bytes), half that when the key blocks lie within rows of the key grid (REL_KW a multiple
      of BLOCK_N: rel_w's tile alone), none when they are whole rows (rel_w's tile loaded once); they count as one
      more fp32 tile of registers; a dense bias (HAS_BIAS) counts likewise, one fp32 tile staged and in registers;
    - registers: fp32 scores and accumulator plus operands in the input dtype,
      (BLOCK_M·BLOCK_N + BLOCK_M·D)·(1 + elt/4) / (32·num_warps) words per thread; above 192 the
      compile spills (bf16, D=80, BLOCK_M 128 on 4 warps: 216 words, spills; 128 x 128 on 4 warps
      spills for every D >= 32). fp32 with ieee dots runs on FMA units and spills with any tile.
    A head dim whose last chunk is partly masked keeps fewer tiles (`_fits_masked_head`)."""
    q, n_kv = named_args["q_ptr"], named_args["N_KV"]
    elt, block_d = q.element_size(), kwargs["D_LO"] + kwargs["D_HI"]
    cls_scratch = lambda c: (4 * c.kwargs["BLOCK_N"] * min(c.num_warps, c.kwargs["BLOCK_M"] // 16)
                             if kwargs["RETURN_CLS"] else 0)
    rel_kw = kwargs.get("REL_KW") or 0
    dense = 1 if kwargs.get("HAS_BIAS") else 0            # a dense bias: one more tile, staged like k and v
    bias_tile = 1 if rel_kw or dense else 0               # the relative-position terms: one more fp32 tile
    staged = lambda c: ((0 if not rel_kw or rel_kw == c.kwargs["BLOCK_N"]     # bytes per stage of gathered terms
                         else 4 if rel_kw % c.kwargs["BLOCK_N"] == 0 else 8) + 4 * dense) \
        * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
    smem = lambda c: (elt * block_d * (c.kwargs["BLOCK_M"] + 2 * c.num_stages * c.kwargs["BLOCK_N"])
                      + cls_scratch(c) + staged(c) * (c.num_stages - 1))
    words = lambda c: ((c.kwargs["BLOCK_M"] * (c.kwargs["BLOCK_N"] + block_d)) * (1 + elt / 4)
                       + bias_tile * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]) / (32 * c.num_warps)
    limit = _smem_limit(q.device) - 1024 if q.is_cuda else float("inf")
    fits = [c for c in configs if smem(c) <= limit] or [min(configs, key=smem)]
    keep = [c for c in fits
            if words(c) <= _MAX_WORDS_PER_THREAD and c.kwargs["BLOCK_N"] <= max(64, next_power_of_2(n_kv))
            and (kwargs.get("HEAD_DIM", block_d) == block_d
                 or _fits_masked_head(c, block_d, kwargs["HAS_MASK"] or kwargs["RETURN_CLS"]))]
    return keep or [min(fits, key=words)]


def _fits_masked_head(c: triton.Config, block_d: int, extra: bool) -> bool:
    """A head dim whose last chunk is partly masked (72 = 64 + 16 with 8 lanes masked: SigLIP so400m's, Gemma 4's;
    88, Llama 4's and BLIP-2's; 40) costs registers the estimate does not count. sm_90 compiles (`ptxas -v`, bf16)
    spill for 64 x 64 on 4 warps and 128 x 128 on 8 at D = 72 and 88, 128 x 64 on 4 at D = 40, and with a key mask
    (or, on Triton 3.6, with RETURN_CLS at D = 88: 32 bytes at 255 registers, 2 stages) also 128 x 64 on 8 at D = 72
    and 88: the tiles kept are those on 8 warps with BLOCK_N <= 64, and with a key mask or RETURN_CLS (`extra`)
    BLOCK_M · block_d <= 128 · 48 (128 x 64 up to D = 48, else 64 x 32)."""
    return c.num_warps == 8 and c.kwargs["BLOCK_N"] <= 64 and (
        not extra or c.kwargs["BLOCK_M"] * block_d <= 128 * 48)


@triton.jit
def _load_tile(ptrs, row_ok, cols, HEAD_DIM: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a [rows, cols] tile; rows masked only when asked, head-dim columns only past HEAD_DIM."""
    if MASK_ROWS and MASK_COLS:
        tile = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)
    elif MASK_ROWS:
        tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _rel_bias(rel_h, rel_w, rows, keys, ok, stride_rh, REL_KW: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """SAM's relative-position scores of queries `rows` [R] and keys `keys` [K], in log2 units -> [R, K] fp32
    ([K, R] with KEYS_FIRST; 0 outside the mask ok of that shape): (rel_h[row, key // REL_KW] + rel_w[row,
    key % REL_KW]) · log2(e), from this head's rel_h [N_Q, stride_rh] and rel_w [N_Q, REL_KW]."""
    if KEYS_FIRST:
        r, row_of, col_of = rows[None, :].to(tl.int64), (keys // REL_KW)[:, None], (keys % REL_KW)[:, None]
    else:
        r, row_of, col_of = rows[:, None].to(tl.int64), (keys // REL_KW)[None, :], (keys % REL_KW)[None, :]
    bias = tl.load(rel_h + r * stride_rh + row_of, mask=ok, other=0.0)
    bias += tl.load(rel_w + r * REL_KW + col_of, mask=ok, other=0.0)
    return bias.to(tl.float32) * 1.4426950408889634


@triton.jit
def _bias_tile(bias, rows, keys, row_ok, key_ok, stride_bm, MASK_KEYS: tl.constexpr, KEYS_FIRST: tl.constexpr):
    """A dense bias's tile of queries `rows` [R] and keys `keys` [K], in log2 units -> [R, K] fp32 ([K, R] with
    KEYS_FIRST; 0 outside the rows and, with MASK_KEYS, the keys), from this head's bias [N_Q, N_KV] by
    (stride_bm, 1)."""
    if KEYS_FIRST:
        ptrs = bias + rows[None, :].to(tl.int64) * stride_bm + keys[:, None]
        ok = row_ok[None, :] & key_ok[:, None] if MASK_KEYS else row_ok[None, :]
    else:
        ptrs = bias + rows[:, None].to(tl.int64) * stride_bm + keys[None, :]
        ok = row_ok[:, None] & key_ok[None, :] if MASK_KEYS else row_ok[:, None]
    return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * 1.4426950408889634


@triton.jit
def _attention_block(
    q_lo, q_hi,                 # [BLOCK_M, D_LO], [BLOCK_M, D_HI] this program's queries (q_hi unused if D_HI == 0)
    acc_lo, acc_hi,             # fp32 running outputs, same shapes
    m_i, l_i,                   # [BLOCK_M] fp32 running max (log2 domain) and sum
    k_blk,                      # [BLOCK_N, D] this block's keys, rows stride_kn apart
    v_blk,                      # [BLOCK_N, D] this block's values, rows stride_vn apart
    cls_ptr,                    # [N_KV] fp32: this head's CLS row (raw scores while streaming)
    mask_row,                   # [N_KV] uint8 by stride_mn: this batch element's key mask (HAS_MASK only)
    rel_h, rel_w,               # this head's [N_Q, KH] and [N_Q, REL_KW] fp32 relative-position terms (REL_KW only)
    rel_w_tile,                 # [BLOCK_M, BLOCK_N]: this program's rows of rel_w, in log2 units (REL_KW == BLOCK_N)
    bias_blk,                   # [N_Q, N_KV] by (stride_bm, 1): this (batch, head)'s dense bias (HAS_BIAS only)
    stride_kn, stride_vn, stride_mn, stride_rh, stride_bm, start_n, N_KV, qk_scale, is_cls_program,
    offs_m, offs_n, cols_lo, cols_hi, row_ok,
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, MASK_N: tl.constexpr,
    RETURN_CLS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, REL_KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N)."""
    key_ok = (start_n + offs_n) < N_KV
    if HAS_MASK:   # keys past N_KV read as masked
        kv_ok = tl.load(mask_row + (start_n + offs_n).to(tl.int64) * stride_mn, mask=key_ok, other=0) != 0
    # Row offsets from the block's base pointer, in int64: a sequence-first layout has token strides
    # of B·H·D, and BLOCK_N of them can pass 2^31. Rebuilt each step rather than carried: a
    # [BLOCK_N, D] tensor of pointers held across the loop costs ~2 x 64 registers per thread.
    k_rows = k_blk + offs_n[:, None].to(tl.int64) * stride_kn
    v_rows = v_blk + offs_n[:, None].to(tl.int64) * stride_vn
    k = _load_tile(k_rows + cols_lo[None, :], key_ok, cols_lo, HEAD_DIM, MASK_N, D_LO > HEAD_DIM)
    qk = tl.dot(q_lo, tl.trans(k), input_precision=DOT_PRECISION)
    if D_HI > 0:
        k = _load_tile(k_rows + cols_hi[None, :], key_ok, cols_hi, HEAD_DIM, MASK_N, D_LO + D_HI > HEAD_DIM)
        qk = tl.dot(q_hi, tl.trans(k), qk, input_precision=DOT_PRECISION)
    qk = qk * qk_scale                                                          # (BLOCK_M, BLOCK_N), log2 domain
    if REL_KW > 0:   # SAM's decomposed relative positions: key n sits at (n // REL_KW, n % REL_KW) of the grid
        if REL_KW % BLOCK_N == 0:
            # The block's keys lie in one row of the grid (SAM's global blocks: 64 wide): one term per query from
            # rel_h, and rel_w's columns of the block, contiguous (loaded once when the block is a whole row).
            rows = offs_m.to(tl.int64)
            col_h = tl.load(rel_h + rows * stride_rh + start_n // REL_KW, mask=row_ok, other=0.0).to(tl.float32)
            if REL_KW == BLOCK_N:
                tile_w = rel_w_tile
            else:
                tile_w = tl.load(rel_w + rows[:, None] * REL_KW + (start_n % REL_KW) + offs_n[None, :],
                                 mask=row_ok[:, None], other=0.0).to(tl.float32) * 1.4426950408889634
            qk += col_h[:, None] * 1.4426950408889634 + tile_w
        else:
            qk += _rel_bias(rel_h, rel_w, offs_m, start_n + offs_n, row_ok[:, None] & key_ok[None, :], stride_rh,
                            REL_KW, False)
    if HAS_BIAS:
        qk += _bias_tile(bias_blk, offs_m, start_n + offs_n, row_ok, key_ok, stride_bm, MASK_N, False)
    if HAS_MASK:
        qk = tl.where(kv_ok[None, :], qk, float("-inf"))
    elif MASK_N:
        qk = tl.where(key_ok[None, :], qk, float("-inf"))
    if RETURN_CLS:
        if is_cls_program:
            row0 = tl.sum(tl.where(offs_m[:, None] == 0, qk, 0.0), axis=0)    # (BLOCK_N,) scores of query 0
            tl.store(cls_ptr + start_n + offs_n, row0, mask=key_ok)
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    if HAS_MASK:
        # Every key so far masked: m_new is -inf, and -inf - -inf would be NaN. Offset by 0 instead
        # (alpha = p = 0; acc and l are still 0).
        m_off = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_off = m_new
    alpha = tl.math.exp2(m_i - m_off)
    p = tl.math.exp2(qk - m_off[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = _load_tile(v_rows + cols_lo[None, :], key_ok, cols_lo, HEAD_DIM, MASK_N, D_LO > HEAD_DIM)
    p = p.to(v.dtype)
    acc_lo = tl.dot(p, v, acc_lo * alpha[:, None], input_precision=DOT_PRECISION)
    if D_HI > 0:
        v = _load_tile(v_rows + cols_hi[None, :], key_ok, cols_hi, HEAD_DIM, MASK_N, D_LO + D_HI > HEAD_DIM)
        acc_hi = tl.dot(p, v, acc_hi * alpha[:, None], input_precision=DOT_PRECISION)
    return acc_lo, acc_hi, m_new, l_i


@triton.autotune(configs=attention_configs(),
                 key=["N_Q", "N_KV", "HEAD_DIM", "RETURN_CLS", "RETURN_LSE", "HAS_MASK", "VARLEN", "DOT_PRECISION",
                      "REL_KW", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": budgeted(_prune_configs)},
                 do_bench=autotune_bench("attention"))
@triton.jit
def _attention_fwd_kernel(
    q_ptr,                      # [B, H, N_Q, D] by strides, head dim unit stride
    k_ptr,                      # [B, H, N_KV, D] by strides, head dim unit stride
    v_ptr,                      # [B, H, N_KV, D] by strides, head dim unit stride
    out_ptr,                    # [B, H, N_Q, D] by strides, head dim unit stride
    cls_ptr,                    # [B, H, N_KV] fp32 contiguous; touched only with RETURN_CLS
    lse_ptr,                    # [B, H, N_Q] fp32 contiguous; touched only with RETURN_LSE
    mask_ptr,                   # [B, N_KV] uint8 (a bool mask's bytes) by strides; touched only with HAS_MASK
    cu_ptr,                     # [S + 1] int32 segment boundaries (cu_seqlens); touched only with VARLEN
    rh_ptr,                     # [B, H, N_Q, KH] fp32 contiguous (rows stride_rh = KH apart); only with REL_KW
    rw_ptr,                     # [B, H, N_Q, REL_KW] fp32 contiguous; only with REL_KW
    bias_ptr,                   # [B, H, N_Q, N_KV] by (stride_bb, stride_bh, stride_bm, 1); only with HAS_BIAS
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_mb, stride_mn, stride_rh, stride_bb, stride_bh, stride_bm,
    H, N_Q, N_KV,               # VARLEN: N_Q = N_KV = max_seqlen, the longest segment's length (or more)
    T,                          # VARLEN: the packed sequence's length, lse's rows per head; unused otherwise
    qk_scale,                   # scale · log2(e)
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, RETURN_CLS: tl.constexpr,
    RETURN_LSE: tl.constexpr, HAS_MASK: tl.constexpr, VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REL_KW: tl.constexpr,       # > 0: SAM's relative positions, a key grid REL_KW wide (N_KV = KH · REL_KW)
    HAS_BIAS: tl.constexpr,     # a dense additive bias (not with VARLEN)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # 1-D grid of B·H·cdiv(N_Q, BLOCK_M) programs (VARLEN: S segments for B), query blocks of one head
    # adjacent (they share K/V in L2); 1-D so that B·H is not capped at 65535 like a grid's y dimension.
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    if VARLEN:
        # Segment off_b: tokens [seq_start, seq_start + n_q) of the [1, H, T, D] tensors, its own keys.
        seq_start = tl.load(cu_ptr + off_b).to(tl.int64)
        n_q = (tl.load(cu_ptr + off_b + 1) - seq_start).to(tl.int32)
        if pid_m * BLOCK_M >= n_q:      # past this segment's queries (the grid covers the longest one)
            return
        n_kv = n_q
        # The batch offsets below become the segment's token offsets: off_b · stride_xb = seq_start · stride_xn.
        off_b = seq_start
        stride_qb, stride_kb, stride_vb, stride_ob = stride_qn, stride_kn, stride_vn, stride_on
    else:
        n_q, n_kv = N_Q, N_KV

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    # The head dim as two power-of-two column chunks, [0, D_LO) and [D_LO, D_LO + D_HI): 80 = 64 + 16
    # and 96 = 64 + 32 are exact, so no MMA work is spent on padding (D_HI = 0: one chunk).
    cols_lo = tl.arange(0, D_LO)
    cols_hi = D_LO + tl.arange(0, D_HI if D_HI > 0 else 16)
    row_ok = offs_m < n_q

    # int64 row offsets: a sequence-first layout can put N·stride past 2^31.
    q_rows = q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qn
    q_lo = _load_tile(q_rows + cols_lo[None, :], row_ok, cols_lo, HEAD_DIM, True, D_LO > HEAD_DIM)
    acc_lo = tl.zeros([BLOCK_M, D_LO], dtype=tl.float32)
    if D_HI > 0:
        q_hi = _load_tile(q_rows + cols_hi[None, :], row_ok, cols_hi, HEAD_DIM, True, D_LO + D_HI > HEAD_DIM)
    else:
        q_hi = tl.zeros([BLOCK_M, 16], dtype=q_lo.dtype)
    acc_hi = tl.zeros([BLOCK_M, D_HI if D_HI > 0 else 16], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    k_blk = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_blk = v_ptr + off_b * stride_vb + off_h * stride_vh
    k_step = BLOCK_N * tl.cast(stride_kn, tl.int64)   # a stride of 1 arrives as a constexpr int
    v_step = BLOCK_N * tl.cast(stride_vn, tl.int64)
    cls_row = cls_ptr + pid_bh.to(tl.int64) * N_KV
    mask_row = mask_ptr + off_b * stride_mb
    rel_h = rh_ptr + pid_bh.to(tl.int64) * N_Q * stride_rh
    rel_w = rw_ptr + pid_bh.to(tl.int64) * N_Q * REL_KW
    if REL_KW == BLOCK_N:     # every key block is one whole row of the key grid: the same rel_w tile for each
        rel_w_tile = tl.load(rel_w + offs_m[:, None].to(tl.int64) * REL_KW + offs_n[None, :], mask=row_ok[:, None],
                             other=0.0).to(tl.float32) * 1.4426950408889634
    else:
        rel_w_tile = m_i      # unused
    bias_blk = bias_ptr + off_b * stride_bb + off_h * stride_bh
    is_cls_program = pid_m == 0

    n_full = (n_kv // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc_lo, acc_hi, m_i, l_i = _attention_block(
            q_lo, q_hi, acc_lo, acc_hi, m_i, l_i, k_blk, v_blk, cls_row, mask_row, rel_h, rel_w, rel_w_tile,
            bias_blk, stride_kn, stride_vn, stride_mn, stride_rh, stride_bm, start_n, n_kv, qk_scale, is_cls_program,
            offs_m, offs_n, cols_lo, cols_hi, row_ok, HEAD_DIM, D_LO, D_HI, False, RETURN_CLS, HAS_MASK, DOT_PRECISION,
            REL_KW, HAS_BIAS, BLOCK_N)
        k_blk += k_step
        v_blk += v_step
    if n_full < n_kv:   # the last, partial key block
        acc_lo, acc_hi, m_i, l_i = _attention_block(
            q_lo, q_hi, acc_lo, acc_hi, m_i, l_i, k_blk, v_blk, cls_row, mask_row, rel_h, rel_w, rel_w_tile,
            bias_blk, stride_kn, stride_vn, stride_mn, stride_rh, stride_bm, n_full, n_kv, qk_scale, is_cls_program,
            offs_m, offs_n, cols_lo, cols_hi, row_ok, HEAD_DIM, D_LO, D_HI, True, RETURN_CLS, HAS_MASK, DOT_PRECISION,
            REL_KW, HAS_BIAS, BLOCK_N)

    if HAS_MASK:
        # A row whose keys are all masked has l = 0 and acc = 0: it outputs 0, and its lse is +inf so that
        # the backward's exp2(s - lse) is 0 (FlashAttention's convention). Its CLS row is 0 likewise.
        row_empty = l_i == 0.0
        l_div = tl.where(row_empty, 1.0, l_i)
        m_i = tl.where(row_empty, 0.0, m_i)
    else:
        l_div = l_i
    out_rows = out_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_on
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_rows + cols_lo[None, :], (acc_lo / l_div[:, None]).to(out_ty),
             mask=row_ok[:, None] & (cols_lo[None, :] < HEAD_DIM))
    if D_HI > 0:
        tl.store(out_rows + cols_hi[None, :], (acc_hi / l_div[:, None]).to(out_ty),
                 mask=row_ok[:, None] & (cols_hi[None, :] < HEAD_DIM))
    if RETURN_LSE:
        lse = m_i + tl.math.log2(l_div)
        if HAS_MASK:
            lse = tl.where(row_empty, float("inf"), lse)
        if VARLEN:
            tl.store(lse_ptr + off_h * T + seq_start + offs_m, lse, mask=row_ok)
        else:
            tl.store(lse_ptr + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=row_ok)

    if RETURN_CLS:
        if is_cls_program:
            # Every key has been seen: turn query 0's raw scores into probabilities. The barrier makes
            # the scores stored above (by whichever threads held them) visible to this pass.
            m_0 = tl.sum(tl.where(offs_m == 0, m_i, 0.0), axis=0)
            l_0 = tl.sum(tl.where(offs_m == 0, l_div, 0.0), axis=0)
            tl.debug_barrier()
            for start_n in range(0, N_KV, BLOCK_N):
                key_ok = (start_n + offs_n) < N_KV
                s = tl.load(cls_row + start_n + offs_n, mask=key_ok, other=float("-inf"))
                tl.store(cls_row + start_n + offs_n, tl.math.exp2(s - m_0) / l_0, mask=key_ok)


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """(D_LO, D_HI): the head dim as a power-of-two chunk plus a (masked) power-of-two remainder,
    each at least 16 (tl.dot's minimum): 64 -> (64, 0), 80 -> (64, 16), 96 -> (64, 32), 8 -> (16, 0)."""
    lo = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - lo
    return lo, (max(16, next_power_of_2(rest)) if rest > 0 else 0)


def _check_out(name: str, t: torch.Tensor, shape, dtype, device):
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name}: expected {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(t.shape)} {t.dtype} on {t.device}")


def _mask_args(key_mask: torch.Tensor | None, B: int, n_kv: int, placeholder: torch.Tensor):
    """(mask tensor, stride_mb, stride_mn) for a kernel: the bool mask's bytes as uint8 (no copy, any
    strides), or a placeholder the kernel never reads when there is no mask."""
    if key_mask is None:
        return placeholder, 0, 0
    if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, n_kv) or key_mask.device != placeholder.device:
        raise ValueError(f"key_mask: expected ({B}, {n_kv}) torch.bool on {placeholder.device}, got "
                         f"{tuple(key_mask.shape)} {key_mask.dtype} on {key_mask.device}")
    return key_mask.view(torch.uint8), key_mask.stride(0), key_mask.stride(1)


def _varlen_args(cu_seqlens: torch.Tensor | None, max_seqlen: int | None, B: int, n_q: int, n_kv: int,
                 placeholder: torch.Tensor, combined_with: str | None = None):
    """(cu tensor, programs per head and block index, N_Q, N_KV) for a kernel. Without cu_seqlens: a
    placeholder the kernel never reads, B, n_q, n_kv. With it: the segments of one packed sequence
    ([1, H, T, D] tensors; cu_seqlens int32 [S + 1]), S, and max_seqlen twice (None: the longest segment,
    read from the device, a sync on CUDA). combined_with: the argument given beside cu_seqlens that the
    kernel cannot combine with it (key_mask, cls_attn), if any."""
    if cu_seqlens is None:
        return placeholder, B, n_q, n_kv
    if (cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
            or cu_seqlens.device != placeholder.device):
        raise ValueError(f"cu_seqlens: expected [S + 1] (S >= 1) torch.int32 on {placeholder.device}, got "
                         f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype} on {cu_seqlens.device}")
    if B != 1 or n_q != n_kv:
        raise ValueError(f"cu_seqlens: expected q, k, v [1, H, T, D] (one packed sequence), got B = {B}, "
                         f"N_Q = {n_q}, N_KV = {n_kv}")
    if combined_with is not None:
        raise ValueError(f"cu_seqlens: expected no {combined_with} with it (not supported together), got one")
    if max_seqlen is None:
        max_seqlen = max(1, int((cu_seqlens[1:] - cu_seqlens[:-1]).max()))
    return cu_seqlens, cu_seqlens.numel() - 1, max_seqlen, max_seqlen


def rel_pos_args(rel_pos: tuple[torch.Tensor, torch.Tensor] | None, B: int, H: int, n_q: int, n_kv: int,
                 placeholder: torch.Tensor):
    """(rel_h, rel_w, REL_KW) for a kernel: SAM's relative-position terms rel_h [B, H, N_Q, KH] and rel_w
    [B, H, N_Q, KW], fp32 contiguous, KH · KW = N_KV, checked; or placeholders the kernel never reads and 0."""
    if rel_pos is None:
        return placeholder, placeholder, 0
    rel_h, rel_w = rel_pos
    for name, t in (("rel_h", rel_h), ("rel_w", rel_w)):
        if (t.dtype != torch.float32 or t.dim() != 4 or tuple(t.shape[:3]) != (B, H, n_q) or not t.is_contiguous()
                or t.device != placeholder.device):
            raise ValueError(f"{name}: expected a contiguous [{B}, {H}, {n_q}, K] torch.float32 tensor on "
                             f"{placeholder.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if rel_h.shape[3] * rel_w.shape[3] != n_kv:
        raise ValueError(f"rel_pos: expected a key grid of KH x KW = N_KV = {n_kv} keys, got {rel_h.shape[3]} x "
                         f"{rel_w.shape[3]}")
    return rel_h, rel_w, rel_w.shape[3]


def bias_args(bias: torch.Tensor | None, B: int, H: int, n_q: int, n_kv: int, placeholder: torch.Tensor):
    """(bias, (stride_bb, stride_bh, stride_bm)) for a kernel: a dense bias [B or 1, H, N_Q, N_KV] (fp16 / bf16 /
    fp32, unit stride over the keys; one of batch 1 is shared by the batch: batch stride 0), checked; or a
    placeholder the kernel never reads and zero strides."""
    if bias is None:
        return placeholder, (0, 0, 0)
    if (bias.dtype not in (torch.float16, torch.bfloat16, torch.float32) or bias.dim() != 4
            or bias.shape[0] not in (1, B) or tuple(bias.shape[1:]) != (H, n_q, n_kv)
            or (n_kv > 1 and bias.stride(3) != 1) or bias.device != placeholder.device):
        raise ValueError(f"bias: expected [{B} or 1, {H}, {n_q}, {n_kv}] fp16 / bf16 / fp32 with a unit-stride last "
                         f"dim on {placeholder.device}, got {tuple(bias.shape)} {bias.dtype} strides "
                         f"{tuple(bias.stride())} on {bias.device}")
    return bias, (bias.stride(0) if bias.shape[0] > 1 else 0, bias.stride(1), bias.stride(2))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, *,
              out: torch.Tensor | None = None, cls_attn: torch.Tensor | None = None,
              lse: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
              rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale + bias) v. q [B, H, N_Q, D], k and v [B, H, N_KV, D], any strides with a unit-stride
    head dim, fp16 / bf16 / fp32. out: optional [B, H, N_Q, D] buffer (any strides, unit-stride head dim).
    cls_attn: optional contiguous [B, H, N_KV] fp32 buffer that receives the softmax row of query 0.
    lse: optional contiguous [B, H, N_Q] fp32 buffer that receives each query row's log-sum-exp (log2
    domain; +inf for a row whose keys are all masked), for `attention_backward`. key_mask: optional
    torch.bool [B, N_KV] (any strides), False = the key is left out for every query and head of that batch
    element; a row left with no key outputs zeros. cu_seqlens: optional int32 [S + 1] segment boundaries
    of q, k, v [1, H, T, D] (cu[0] = 0, non-decreasing, cu[S] = T: the caller's contract, not checked, as
    FlashAttention's varlen; rows past cu[S] are not written): each token attends to its own segment's
    keys; max_seqlen: an int >= the longest segment (None: read from cu_seqlens, a device sync on CUDA);
    not with key_mask or cls_attn. rel_pos: optional (rel_h [B, H, N_Q, KH], rel_w [B, H, N_Q, KW]) fp32
    contiguous with KH · KW = N_KV (`rel_pos_args`): SAM's decomposed relative positions, score(i, j) +=
    rel_h[i, j // KW] + rel_w[i, j % KW]; not with cu_seqlens or cls_attn. bias: optional dense additive bias
    [B or 1, H, N_Q, N_KV] (`bias_args`: batch 1 is shared by the batch), added to the scores in fp32; not with
    cu_seqlens or rel_pos. Returns out. Arguments are assumed validated (vitfast.ops does it); only buffers, the
    mask, cu_seqlens', rel_pos' and bias' layouts are checked."""
    B, H, n_q, D = q.shape
    n_kv = k.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim <= {MAX_HEAD_DIM}, got {D}")
    if out is None:
        out = torch.empty((B, H, n_q, D), dtype=q.dtype, device=q.device)
    _check_out("out", out, (B, H, n_q, D), q.dtype, q.device)
    if D > 1 and out.stride(-1) != 1:
        raise ValueError(f"out: expected a unit-stride last dim, got strides {out.stride()}")
    if cls_attn is not None:
        _check_out("cls_attn", cls_attn, (B, H, n_kv), torch.float32, q.device)
        if not cls_attn.is_contiguous():
            raise ValueError(f"cls_attn: expected a contiguous buffer, got strides {cls_attn.stride()}")
    if lse is not None:
        _check_out("lse", lse, (B, H, n_q), torch.float32, q.device)
        if not lse.is_contiguous():
            raise ValueError(f"lse: expected a contiguous buffer, got strides {lse.stride()}")
    mask, stride_mb, stride_mn = _mask_args(key_mask, B, n_kv, out)
    both = "key_mask" if key_mask is not None else "cls_attn" if cls_attn is not None else None
    cu, batch, n_q_arg, n_kv_arg = _varlen_args(cu_seqlens, max_seqlen, B, n_q, n_kv, out, both)
    rel_h, rel_w, rel_kw = rel_pos_args(rel_pos, B, H, n_q, n_kv, out)
    if rel_pos is not None and (cu_seqlens is not None or cls_attn is not None):
        raise ValueError("rel_pos: expected no cu_seqlens or cls_attn with it (not supported together), got one")
    bias, bias_strides = bias_args(bias, B, H, n_q, n_kv, out)
    if bias is not out and (cu_seqlens is not None or rel_pos is not None):
        raise ValueError("bias: expected no cu_seqlens or rel_pos with it (not supported together), got one")
    if out.numel() == 0:
        return out
    scale = D ** -0.5 if scale is None else float(scale)
    precision = "tf32" if q.dtype == torch.float32 and q.is_cuda and tf32_enabled() else "ieee"
    d_lo, d_hi = head_dim_chunks(D)
    grid = lambda meta: (cdiv(n_q_arg, meta["BLOCK_M"]) * batch * H,)
    _attention_fwd_kernel[grid](
        q, k, v, out, cls_attn if cls_attn is not None else out, lse if lse is not None else out, mask, cu,
        rel_h, rel_w, bias,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_mb, stride_mn, rel_h.shape[-1] if rel_pos is not None else 0, *bias_strides,
        H, n_q_arg, n_kv_arg, n_q, scale * LOG2E,
        HEAD_DIM=D, D_LO=d_lo, D_HI=d_hi, RETURN_CLS=cls_attn is not None, RETURN_LSE=lse is not None,
        HAS_MASK=key_mask is not None, VARLEN=cu_seqlens is not None, DOT_PRECISION=precision, REL_KW=rel_kw,
        HAS_BIAS=bias is not out,
    )
    return out


def qkv_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views (no copy) of the packed projection qkv [B, N, 3·C] as q, k, v [B, H, N, D]."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D)
    return q, k, v


def attention_qkv(qkv: torch.Tensor, num_heads: int, scale: float | None = None, *, return_cls_attn: bool = False,
                  out: torch.Tensor | None = None, cls_attn: torch.Tensor | None = None,
                  lse: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                  cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                  rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None, bias: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention straight from the packed qkv projection. qkv [B, N, 3·C] (unit-stride last dim) ->
    (out [B, N, C], cls_attn [B, H, N] fp32 or None). out / cls_attn / lse: optional buffers (lse as in
    `attention`, [B, H, N]); key_mask: optional torch.bool [B, N], as in `attention`; cu_seqlens, max_seqlen:
    the segments of a packed qkv [1, T, 3·C], as in `attention`; rel_pos and bias as in `attention`."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv_heads(qkv, num_heads)
    if out is None:
        out = torch.empty((B, N, C), dtype=qkv.dtype, device=qkv.device)
    _check_out("out", out, (B, N, C), qkv.dtype, qkv.device)
    if return_cls_attn and cls_attn is None:
        cls_attn = torch.empty((B, num_heads, N), dtype=torch.float32, device=qkv.device)
    out_heads = out.view(B, N, num_heads, C // num_heads).transpose(1, 2)    # (B, H, N, D) view of out
    attention(q, k, v, scale, out=out_heads, cls_attn=cls_attn if return_cls_attn else None, lse=lse,
              key_mask=key_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, rel_pos=rel_pos, bias=bias)
    return out, (cls_attn if return_cls_attn else None)


class QKVPlan:
    """What an `attention_qkv` launch fixes for a qkv of given shape, strides, dtype and device, head
    count, scale, outputs, key mask layout and segments (`qkv_plan`); `qkv_run` then allocates the outputs
    and launches."""

    __slots__ = ("launch", "out_shape", "cls_shape", "C")

    def __init__(self, launch, out_shape, cls_shape, C):
        self.launch, self.out_shape, self.cls_shape, self.C = launch, out_shape, cls_shape, C


def qkv_plan(qkv: torch.Tensor, num_heads: int, scale: float, return_cls_attn: bool, return_lse: bool,
             key_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
             max_seqlen: int | None = None, rel_kh_kw: tuple[int, int] | None = None,
             bias: torch.Tensor | None = None) -> QKVPlan:
    """The launch of `attention_qkv` (arguments validated by vitfast.ops; B, N >= 1) for any qkv with this
    shape, strides, dtype and device: q, k and v [B, H, N, D] are read from qkv's three thirds through the
    strides (qkv.stride(0), D, qkv.stride(1)), out [B, N, C] contiguous as [B, H, N, D] through
    (N·C, D, C). key_mask: None (no mask), or a torch.bool [B, N] of the layout the plan's calls pass
    (its strides are fixed here). cu_seqlens: None, or the int32 [S + 1] boundaries of a packed qkv
    [1, T, 3·C] with max_seqlen (an int) the longest segment: the plan fixes S and max_seqlen (the grid,
    N_Q = N_KV), the calls pass boundaries of that length. rel_kh_kw: None, or the key grid (KH, KW) of the
    relative-position terms the calls pass (as `attention`'s rel_pos). bias: None, or a dense bias of the layout
    the calls pass (`bias_args`: its strides are fixed here)."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    sb, sn = qkv.stride(0), qkv.stride(1)
    precision = "tf32" if qkv.dtype == torch.float32 and qkv.is_cuda and tf32_enabled() else "ieee"
    d_lo, d_hi = head_dim_chunks(D)
    batch, n_blk = (B, N) if cu_seqlens is None else (cu_seqlens.numel() - 1, max_seqlen)
    grid = lambda meta: (cdiv(n_blk, meta["BLOCK_M"]) * batch * num_heads,)
    mask_strides = (0, 0) if key_mask is None else (key_mask.stride(0), key_mask.stride(1))
    kh, kw = rel_kh_kw or (0, 0)
    _, bias_strides = bias_args(bias, B, num_heads, N, N, qkv)
    scalars = (sb, D, sn, sb, D, sn, sb, D, sn, N * C, D, C, *mask_strides, kh, *bias_strides, num_heads, n_blk,
               n_blk, N, scale * LOG2E)
    meta = dict(HEAD_DIM=D, D_LO=d_lo, D_HI=d_hi, RETURN_CLS=return_cls_attn, RETURN_LSE=return_lse,
                HAS_MASK=key_mask is not None, VARLEN=cu_seqlens is not None, DOT_PRECISION=precision, REL_KW=kw,
                HAS_BIAS=bias is not None)
    return QKVPlan(Launch(_attention_fwd_kernel, grid, scalars, meta), (B, N, C),
                   (B, num_heads, N) if return_cls_attn else None, C)


def qkv_run(p: QKVPlan, qkv: torch.Tensor, lse: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
            cu_seqlens: torch.Tensor | None = None, rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
            bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch `p` on a qkv (and key_mask, cu_seqlens) it was planned for (nothing is checked; lse: a contiguous
    [B, H, N] fp32 buffer exactly when the plan returns it; key_mask exactly when the plan was made with one,
    of the same strides; cu_seqlens likewise, of the same length; rel_pos exactly when planned with its grid; bias
    exactly when planned with one, of the same strides):
    (out [B, N, C], cls_attn [B, H, N] fp32 or None), new tensors (out's rows past cu_seqlens[-1], if any, not
    written)."""
    out = torch.empty(p.out_shape, dtype=qkv.dtype, device=qkv.device)
    cls_attn = None if p.cls_shape is None else torch.empty(p.cls_shape, dtype=torch.float32, device=qkv.device)
    C = p.C
    p.launch(qkv, qkv.narrow(2, C, C), qkv.narrow(2, 2 * C, C), out, out if cls_attn is None else cls_attn,
             out if lse is None else lse, out if key_mask is None else key_mask.view(torch.uint8),
             out if cu_seqlens is None else cu_seqlens, *(rel_pos or (out, out)), out if bias is None else bias)
    return out, cls_attn


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------
def attention_bwd_configs(resident: str) -> list[triton.Config]:
    """Tiles (BLOCK_M queries x BLOCK_N keys) of a backward kernel. The block a program keeps (keys for
    dK/dV, `resident="n"`; queries for dQ, `"m"`) is 64 or 128 rows: the M side of every dot, which
    Hopper's warpgroup MMA needs at 64 or more; the streamed one 32 to 64. `_prune_bwd_configs` drops
    those that do not fit shared memory or would spill. The interpreter gets one small config."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    tiles = [(big, small) for big in (64, 128) for small in (32, 64)]
    return [triton.Config({"BLOCK_M": small, "BLOCK_N": big} if resident == "n" else {"BLOCK_M": big, "BLOCK_N": small},
                          num_warps=w, num_stages=s)
            for big, small in tiles for w in (4, 8) for s in (1, 2)]


# Per-thread fp32 words (see `_prune_bwd_configs`) above which the backward kernels spill on sm_90.
_MAX_BWD_WORDS_PER_THREAD = 192


def _prune_bwd_configs(configs, named_args, **kwargs):
    """Keep the tiles that fit shared memory and registers; if none does, the smallest. Estimates, with
    R the resident rows, S the streamed rows and D the head dim's two chunks together:
    - shared memory: num_stages buffers of the two streamed operands, elt·D·2·S·stages bytes, plus the
      resident pair, elt·D·2·R;
    - registers: two fp32 accumulators (dK and dV) or one (dQ) of R x D, the resident operands in the
      input dtype, two R x S fp32 score tiles, over 32·num_warps threads; x 1.4 when the second chunk is
      partly masked (72 = 64 + 16 with 8 lanes off: sm_90 compiles of its masked loads use ~40% more
      registers than 80's, and spill at tiles 80 runs without).
    With REL_KW (SAM's relative positions) one more R x S fp32 tile of terms, in registers and, as in the forward,
    staged by the pipeliner (8·R·S·(stages − 1) bytes), and in the dQ kernel the terms' two gradient accumulators,
    R x (REL_KHP + REL_KWP) fp32: sm_90 compiles (bf16, D=64, a 64 x 64 key grid) spill at 128 x 32 on 4 warps,
    128 x 64 on 8 and 64 x 64 on 4, which this drops, and not at the tiles it keeps. A dense bias (HAS_BIAS) counts
    as two more R x S fp32 tiles in the dK/dV kernel and three in the dQ kernel (its tile, the fp32 dS it adds into
    the bias's gradient, its atomics' 64-bit addresses), and one staged fp32 tile: sm_90 compiles (bf16, D=64,
    197 tokens) spill at dQ's 64 x 64 on 4 warps and 128 x 64 on 8 (2 stages) when it counts as two, and at dK/dV's
    64 x 128 on 8 (1 stage) when it counts as one; not at the tiles this keeps."""
    q, resident = named_args["q_ptr"], kwargs["RESIDENT"]
    elt, block_d = q.element_size(), kwargs["D_LO"] + kwargs["D_HI"]
    rows = lambda c: ((c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]) if resident == "n"
                      else (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))
    rel = 1 if kwargs.get("REL_KW") else 0
    dense = 1 if kwargs.get("HAS_BIAS") else 0
    dense_tiles = dense * (3 if resident == "m" else 2)   # the bias tile, dS (fp32), dQ's atomics' 64-bit addresses
    rel_grads = kwargs["REL_KHP"] + kwargs["REL_KWP"] if rel and resident == "m" else 0
    smem = lambda c: (elt * block_d * 2 * (rows(c)[0] + rows(c)[1] * max(1, c.num_stages))
                      + (2 * rel + dense) * 4 * rows(c)[0] * rows(c)[1] * max(0, c.num_stages - 1))
    accumulators = 2 if resident == "n" else 1
    masked = 1.4 if kwargs["D_HI"] > 0 and kwargs["HEAD_DIM"] < block_d else 1.0
    words = lambda c: masked * ((accumulators * rows(c)[0] * block_d + 2 * rows(c)[0] * block_d * elt / 4
                                 + (2 + rel + dense_tiles) * rows(c)[0] * rows(c)[1] + rows(c)[0] * rel_grads)
                                / (32 * c.num_warps))
    limit = _smem_limit(q.device) - 1024 if q.is_cuda else float("inf")
    fits = [c for c in configs if smem(c) <= limit] or [min(configs, key=smem)]
    return [c for c in fits if words(c) <= _MAX_BWD_WORDS_PER_THREAD] or [min(fits, key=words)]


@triton.jit
def _bwd_program(num_blocks, H):
    """A backward program's (block index, batch·head index, batch offset, head offset): 1-D grid of
    B·H·num_blocks programs, the blocks of one head adjacent."""
    pid = tl.program_id(0)
    pid_blk, pid_bh = pid % num_blocks, pid // num_blocks
    return pid_blk, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


@triton.jit
def _load_rows(base, rows, stride, row_ok, cols, col_ok):
    """A [len(rows), len(cols)] tile of rows `rows` (int64 offsets), masked outside row_ok x col_ok."""
    return tl.load(base + rows[:, None].to(tl.int64) * stride + cols[None, :],
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _load_chunks(base, rows, stride, row_ok, cols_lo, cols_hi, HEAD_DIM: tl.constexpr, D_HI: tl.constexpr):
    """The head dim's two column chunks of rows `rows` (the second a 16-wide zero tile when D_HI is 0)."""
    lo = _load_rows(base, rows, stride, row_ok, cols_lo, cols_lo < HEAD_DIM)
    if D_HI > 0:
        hi = _load_rows(base, rows, stride, row_ok, cols_hi, cols_hi < HEAD_DIM)
    else:
        hi = tl.zeros([rows.shape[0], 16], dtype=lo.dtype)
    return lo, hi


@triton.jit
def _store_chunks(base, rows, stride, row_ok, cols_lo, cols_hi, lo, hi, HEAD_DIM: tl.constexpr,
                  D_HI: tl.constexpr):
    ptrs = base + rows[:, None].to(tl.int64) * stride
    ty = base.dtype.element_ty
    tl.store(ptrs + cols_lo[None, :], lo.to(ty), mask=row_ok[:, None] & (cols_lo[None, :] < HEAD_DIM))
    if D_HI > 0:
        tl.store(ptrs + cols_hi[None, :], hi.to(ty), mask=row_ok[:, None] & (cols_hi[None, :] < HEAD_DIM))


_BWD_KEY = ["N_Q", "N_KV", "HEAD_DIM", "HAS_MASK", "VARLEN", "DOT_PRECISION", "RESIDENT", "REL_KW", "REL_KHP",
            "REL_KWP", "HAS_BIAS"]


@triton.autotune(configs=attention_bwd_configs("n"), key=_BWD_KEY,
                 prune_configs_by={"early_config_prune": budgeted(_prune_bwd_configs)},
                 do_bench=autotune_bench("attention backward (dk, dv)"))
@triton.jit
def _attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,            # [B, H, N, D] by strides, head dim unit stride
    lse_ptr, delta_ptr,                     # [B, H, N_Q] fp32 contiguous
    dk_ptr, dv_ptr,                         # [B, H, N_KV, D] by strides, head dim unit stride
    mask_ptr,                               # [B, N_KV] uint8 by strides; touched only with HAS_MASK
    cu_ptr,                                 # [S + 1] int32 segment boundaries; touched only with VARLEN
    rh_ptr, rw_ptr,                         # [B, H, N_Q, KH], [B, H, N_Q, REL_KW] fp32; only with REL_KW
    bias_ptr,                               # [B, H, N_Q, N_KV] by (stride_bb, stride_bh, stride_bm, 1); HAS_BIAS
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_mb, stride_mn, stride_rh, stride_bb, stride_bh, stride_bm,
    H, N_Q, N_KV, T, qk_scale, scale,       # VARLEN: N_Q = N_KV = max_seqlen, T the packed length
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, RESIDENT: tl.constexpr, REL_KW: tl.constexpr,
    REL_KHP: tl.constexpr, REL_KWP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dK, dV of BLOCK_N keys of one (batch, head), streaming every query block (VARLEN: of one segment,
    streaming that segment's queries). The head dim is two column chunks, as in the forward (80 = 64 + 16):
    every dot over it is split in two."""
    pid_n, pid_bh, off_b, off_h = _bwd_program(tl.cdiv(N_KV, BLOCK_N), H)
    if VARLEN:   # segment off_b: tokens [seq_start, seq_start + n_kv), its batch offsets token offsets
        seq_start = tl.load(cu_ptr + off_b).to(tl.int64)
        n_kv = (tl.load(cu_ptr + off_b + 1) - seq_start).to(tl.int32)
        if pid_n * BLOCK_N >= n_kv:
            return
        n_q = n_kv
        off_b = seq_start
        stride_qb, stride_kb, stride_vb, stride_dob = stride_qn, stride_kn, stride_vn, stride_don
        stride_dkb, stride_dvb = stride_dkn, stride_dvn
    else:
        n_q, n_kv = N_Q, N_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    cols_lo = tl.arange(0, D_LO)
    cols_hi = D_LO + tl.arange(0, D_HI if D_HI > 0 else 16)
    key_ok = offs_n < n_kv
    if HAS_MASK:   # a masked key gets p = 0 from every query: its dK and dV are 0
        kv_ok = tl.load(mask_ptr + off_b * stride_mb + offs_n.to(tl.int64) * stride_mn, mask=key_ok, other=0) != 0
    else:
        kv_ok = key_ok
    k_lo, k_hi = _load_chunks(k_ptr + off_b * stride_kb + off_h * stride_kh, offs_n, stride_kn, key_ok,
                              cols_lo, cols_hi, HEAD_DIM, D_HI)
    v_lo, v_hi = _load_chunks(v_ptr + off_b * stride_vb + off_h * stride_vh, offs_n, stride_vn, key_ok,
                              cols_lo, cols_hi, HEAD_DIM, D_HI)
    dk_lo = tl.zeros([BLOCK_N, D_LO], dtype=tl.float32)
    dv_lo = tl.zeros([BLOCK_N, D_LO], dtype=tl.float32)
    dk_hi = tl.zeros([BLOCK_N, D_HI if D_HI > 0 else 16], dtype=tl.float32)
    dv_hi = tl.zeros([BLOCK_N, D_HI if D_HI > 0 else 16], dtype=tl.float32)
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    do_base = do_ptr + off_b * stride_dob + off_h * stride_doh
    if VARLEN:   # lse and D are per token, [1, H, T]
        row_stats = off_h * T + seq_start
    else:
        row_stats = pid_bh.to(tl.int64) * N_Q
    rel_h = rh_ptr + pid_bh.to(tl.int64) * N_Q * stride_rh
    rel_w = rw_ptr + pid_bh.to(tl.int64) * N_Q * REL_KW
    bias_blk = bias_ptr + off_b * stride_bb + off_h * stride_bh
    for start_m in range(0, n_q, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < n_q
        q_lo, q_hi = _load_chunks(q_base, rows, stride_qn, row_ok, cols_lo, cols_hi, HEAD_DIM, D_HI)
        do_lo, do_hi = _load_chunks(do_base, rows, stride_don, row_ok, cols_lo, cols_hi, HEAD_DIM, D_HI)
        lse = tl.load(lse_ptr + row_stats + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + row_stats + rows, mask=row_ok, other=0.0)
        s_t = tl.dot(k_lo, tl.trans(q_lo), input_precision=DOT_PRECISION)             # (BLOCK_N, BLOCK_M)
        if D_HI > 0:
            s_t = tl.dot(k_hi, tl.trans(q_hi), s_t, input_precision=DOT_PRECISION)
        s_t = s_t * qk_scale
        if REL_KW > 0:
            s_t += _rel_bias(rel_h, rel_w, rows, offs_n, key_ok[:, None] & row_ok[None, :], stride_rh, REL_KW, True)
        if HAS_BIAS:
            s_t += _bias_tile(bias_blk, rows, offs_n, row_ok, key_ok, stride_bm, True, True)
        p_t = tl.where(kv_ok[:, None] & row_ok[None, :], tl.math.exp2(s_t - lse[None, :]), 0.0)
        dv_lo = tl.dot(p_t.to(do_lo.dtype), do_lo, dv_lo, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v_lo, tl.trans(do_lo), input_precision=DOT_PRECISION)           # (BLOCK_N, BLOCK_M)
        if D_HI > 0:
            dv_hi = tl.dot(p_t.to(do_hi.dtype), do_hi, dv_hi, input_precision=DOT_PRECISION)
            dp_t = tl.dot(v_hi, tl.trans(do_hi), dp_t, input_precision=DOT_PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_lo.dtype)
        dk_lo = tl.dot(ds_t, q_lo, dk_lo, input_precision=DOT_PRECISION)
        if D_HI > 0:
            dk_hi = tl.dot(ds_t, q_hi, dk_hi, input_precision=DOT_PRECISION)
    _store_chunks(dk_ptr + off_b * stride_dkb + off_h * stride_dkh, offs_n, stride_dkn, key_ok, cols_lo, cols_hi,
                  dk_lo * scale, dk_hi * scale, HEAD_DIM, D_HI)
    _store_chunks(dv_ptr + off_b * stride_dvb + off_h * stride_dvh, offs_n, stride_dvn, key_ok, cols_lo, cols_hi,
                  dv_lo, dv_hi, HEAD_DIM, D_HI)


@triton.autotune(configs=attention_bwd_configs("m"), key=_BWD_KEY,
                 prune_configs_by={"early_config_prune": budgeted(_prune_bwd_configs)},
                 do_bench=autotune_bench("attention backward (dq)"))
@triton.jit
def _attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,            # [B, H, N, D] by strides, head dim unit stride
    lse_ptr, delta_ptr,                     # [B, H, N_Q] fp32 contiguous
    dq_ptr,                                 # [B, H, N_Q, D] by strides, head dim unit stride
    mask_ptr,                               # [B, N_KV] uint8 by strides; touched only with HAS_MASK
    cu_ptr,                                 # [S + 1] int32 segment boundaries; touched only with VARLEN
    rh_ptr, rw_ptr,                         # [B, H, N_Q, KH], [B, H, N_Q, REL_KW] fp32; only with REL_KW
    drh_ptr, drw_ptr,                       # their gradients, the same shapes, fp32 contiguous; only with REL_KW
    bias_ptr,                               # [B, H, N_Q, N_KV] by (stride_bb, stride_bh, stride_bm, 1); HAS_BIAS
    dbias_ptr,                              # fp32 [B, H, N_Q, N_KV] by (stride_dbb, stride_dbh, stride_dbm, 1)
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn, stride_mb, stride_mn, stride_rh,
    stride_bb, stride_bh, stride_bm, stride_dbb, stride_dbh, stride_dbm,
    H, N_Q, N_KV, T, qk_scale, scale,       # VARLEN: N_Q = N_KV = max_seqlen, T the packed length
    HEAD_DIM: tl.constexpr, D_LO: tl.constexpr, D_HI: tl.constexpr, HAS_MASK: tl.constexpr,
    VARLEN: tl.constexpr, DOT_PRECISION: tl.constexpr, RESIDENT: tl.constexpr, REL_KW: tl.constexpr,
    REL_KHP: tl.constexpr, REL_KWP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ of BLOCK_M queries of one (batch, head), streaming every key block (VARLEN: of one segment,
    streaming that segment's keys; head dim in two chunks). With REL_KW also the gradients of the
    relative-position terms, the sums of dS over each key row and each key column: dS times a one-hot
    [BLOCK_N, REL_KHP] (key n -> its row) and [BLOCK_N, REL_KWP] (-> its column), accumulated in fp32. With
    HAS_BIAS also the dense bias's gradient: dS added (fp32 atomics) into dbias, whose batch stride is 0 when one
    bias is shared by the batch."""
    pid_m, pid_bh, off_b, off_h = _bwd_program(tl.cdiv(N_Q, BLOCK_M), H)
    if VARLEN:   # segment off_b: tokens [seq_start, seq_start + n_q), its batch offsets token offsets
        seq_start = tl.load(cu_ptr + off_b).to(tl.int64)
        n_q = (tl.load(cu_ptr + off_b + 1) - seq_start).to(tl.int32)
        if pid_m * BLOCK_M >= n_q:
            return
        n_kv = n_q
        off_b = seq_start
        stride_qb, stride_kb, stride_vb, stride_dob = stride_qn, stride_kn, stride_vn, stride_don
        stride_dqb = stride_dqn
    else:
        n_q, n_kv = N_Q, N_KV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    cols_lo = tl.arange(0, D_LO)
    cols_hi = D_LO + tl.arange(0, D_HI if D_HI > 0 else 16)
    row_ok = offs_m < n_q
    q_lo, q_hi = _load_chunks(q_ptr + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qn, row_ok,
                              cols_lo, cols_hi, HEAD_DIM, D_HI)
    do_lo, do_hi = _load_chunks(do_ptr + off_b * stride_dob + off_h * stride_doh, offs_m, stride_don, row_ok,
                                cols_lo, cols_hi, HEAD_DIM, D_HI)
    if VARLEN:   # lse and D are per token, [1, H, T]
        row_stats = off_h * T + seq_start
    else:
        row_stats = pid_bh.to(tl.int64) * N_Q
    lse = tl.load(lse_ptr + row_stats + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + row_stats + offs_m, mask=row_ok, other=0.0)
    dq_lo = tl.zeros([BLOCK_M, D_LO], dtype=tl.float32)
    dq_hi = tl.zeros([BLOCK_M, D_HI if D_HI > 0 else 16], dtype=tl.float32)
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    mask_row = mask_ptr + off_b * stride_mb
    rel_h = rh_ptr + pid_bh.to(tl.int64) * N_Q * stride_rh
    rel_w = rw_ptr + pid_bh.to(tl.int64) * N_Q * REL_KW
    d_rel_h = tl.zeros([BLOCK_M, REL_KHP], dtype=tl.float32)
    d_rel_w = tl.zeros([BLOCK_M, REL_KWP], dtype=tl.float32)
    bias_blk = bias_ptr + off_b * stride_bb + off_h * stride_bh
    dbias_blk = dbias_ptr + off_b * stride_dbb + off_h * stride_dbh
    for start_n in range(0, n_kv, BLOCK_N):
        keys = start_n + offs_n
        key_ok = keys < n_kv
        if HAS_MASK:
            kv_ok = tl.load(mask_row + keys.to(tl.int64) * stride_mn, mask=key_ok, other=0) != 0
        else:
            kv_ok = key_ok
        k_lo, k_hi = _load_chunks(k_base, keys, stride_kn, key_ok, cols_lo, cols_hi, HEAD_DIM, D_HI)
        v_lo, v_hi = _load_chunks(v_base, keys, stride_vn, key_ok, cols_lo, cols_hi, HEAD_DIM, D_HI)
        s = tl.dot(q_lo, tl.trans(k_lo), input_precision=DOT_PRECISION)               # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do_lo, tl.trans(v_lo), input_precision=DOT_PRECISION)
        if D_HI > 0:
            s = tl.dot(q_hi, tl.trans(k_hi), s, input_precision=DOT_PRECISION)
            dp = tl.dot(do_hi, tl.trans(v_hi), dp, input_precision=DOT_PRECISION)
        s = s * qk_scale
        if REL_KW > 0:
            s += _rel_bias(rel_h, rel_w, offs_m, keys, row_ok[:, None] & key_ok[None, :], stride_rh, REL_KW, False)
        if HAS_BIAS:
            s += _bias_tile(bias_blk, offs_m, keys, row_ok, key_ok, stride_bm, True, False)
        p = tl.where(kv_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_BIAS:     # the bias's gradient is dS itself, summed over the batch when the bias is shared
            tl.atomic_add(dbias_blk + offs_m[:, None].to(tl.int64) * stride_dbm + keys[None, :], ds,
                          mask=row_ok[:, None] & key_ok[None, :], sem="relaxed")
        ds = ds.to(k_lo.dtype)
        dq_lo = tl.dot(ds, k_lo, dq_lo, input_precision=DOT_PRECISION)
        if D_HI > 0:
            dq_hi = tl.dot(ds, k_hi, dq_hi, input_precision=DOT_PRECISION)
        if REL_KW > 0:   # the score's gradient summed per key row and per key column: dS times one-hots
            at_row = ((keys // REL_KW)[:, None] == tl.arange(0, REL_KHP)[None, :]).to(ds.dtype)
            at_col = ((keys % REL_KW)[:, None] == tl.arange(0, REL_KWP)[None, :]).to(ds.dtype)
            d_rel_h = tl.dot(ds, at_row, d_rel_h, input_precision=DOT_PRECISION)
            d_rel_w = tl.dot(ds, at_col, d_rel_w, input_precision=DOT_PRECISION)
    _store_chunks(dq_ptr + off_b * stride_dqb + off_h * stride_dqh, offs_m, stride_dqn, row_ok, cols_lo, cols_hi,
                  dq_lo * scale, dq_hi * scale, HEAD_DIM, D_HI)
    if REL_KW > 0:
        rows = offs_m[:, None].to(tl.int64)
        cols_h, cols_w = tl.arange(0, REL_KHP)[None, :], tl.arange(0, REL_KWP)[None, :]
        tl.store(drh_ptr + pid_bh.to(tl.int64) * N_Q * stride_rh + rows * stride_rh + cols_h, d_rel_h,
                 mask=row_ok[:, None] & (cols_h < stride_rh))
        tl.store(drw_ptr + pid_bh.to(tl.int64) * N_Q * REL_KW + rows * REL_KW + cols_w, d_rel_w,
                 mask=row_ok[:, None] & (cols_w < REL_KW))


def attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                       dout: torch.Tensor, scale: float | None = None, *, dq: torch.Tensor | None = None,
                       dk: torch.Tensor | None = None, dv: torch.Tensor | None = None,
                       key_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                       max_seqlen: int | None = None, rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
                       drel: tuple[torch.Tensor, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
                       dbias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `attention` (FlashAttention-2): q, k, v, out [B, H, N, D] and dout like out (any
    strides, unit-stride head dim), lse [B, H, N_Q] fp32 from the forward. dq / dk / dv: optional
    buffers like q / k / v (any strides with a unit-stride head dim: views of one packed gradient).
    key_mask: the forward's torch.bool [B, N_KV] mask, or None (masked keys get dk = dv = 0, a row with no
    key left dq = 0). cu_seqlens, max_seqlen: the forward's segments, or None (rows past cu_seqlens[-1]
    are not written). rel_pos: the forward's relative-position terms (rel_h, rel_w), whose gradients go to drel,
    a pair of buffers like them (fp32 contiguous; not with cu_seqlens). bias: the forward's dense bias, whose
    gradient is added into dbias, a buffer of its shape in fp32 (unit-stride last dim; zeros for the gradient
    alone: the kernel adds to it, with atomics, so a shared bias gets the batch's sum). Extra memory: lse and
    D = Σ dout·out, [B, H, N_Q] fp32 each. Returns (dq, dk, dv)."""
    B, H, n_q, D = q.shape
    n_kv = k.shape[2]
    bufs = []
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if buf is None:
            buf = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        _check_out(name, buf, like.shape, like.dtype, like.device)
        if D > 1 and buf.stride(-1) != 1:
            raise ValueError(f"{name}: expected a unit-stride last dim, got strides {buf.stride()}")
        bufs.append(buf)
    dq, dk, dv = bufs
    _check_out("lse", lse, (B, H, n_q), torch.float32, q.device)
    mask, stride_mb, stride_mn = _mask_args(key_mask, B, n_kv, lse)
    cu, batch, n_q_arg, n_kv_arg = _varlen_args(cu_seqlens, max_seqlen, B, n_q, n_kv, lse,
                                                "key_mask" if key_mask is not None else None)
    rel_h, rel_w, rel_kw = rel_pos_args(rel_pos, B, H, n_q, n_kv, lse)
    drel_h, drel_w = rel_h, rel_w
    if rel_pos is not None:
        if cu_seqlens is not None:
            raise ValueError("rel_pos: expected no cu_seqlens with it (not supported together), got one")
        if drel is None:
            raise ValueError("drel: expected buffers (drel_h, drel_w) like rel_pos' tensors, got None")
        drel_h, drel_w = drel
        _check_out("drel_h", drel_h, rel_h.shape, torch.float32, q.device)
        _check_out("drel_w", drel_w, rel_w.shape, torch.float32, q.device)
        if not (drel_h.is_contiguous() and drel_w.is_contiguous()):
            raise ValueError("drel: expected contiguous buffers")
    rel = dict(REL_KW=rel_kw, REL_KHP=next_power_of_2(max(16, rel_h.shape[-1])) if rel_kw else 16,
               REL_KWP=next_power_of_2(max(16, rel_kw)))
    stride_rh = rel_h.shape[-1] if rel_kw else 0
    bias, bias_strides = bias_args(bias, B, H, n_q, n_kv, lse)
    dbias_strides = (0, 0, 0)
    if bias is not lse:
        if cu_seqlens is not None or rel_pos is not None:
            raise ValueError("bias: expected no cu_seqlens or rel_pos with it (not supported together), got one")
        if dbias is None:
            raise ValueError("dbias: expected an fp32 buffer like bias, got None")
        _check_out("dbias", dbias, bias.shape, torch.float32, q.device)
        if n_kv > 1 and dbias.stride(3) != 1:
            raise ValueError(f"dbias: expected a unit-stride last dim, got strides {dbias.stride()}")
        dbias_strides = (dbias.stride(0) if dbias.shape[0] > 1 else 0, dbias.stride(1), dbias.stride(2))
    else:
        dbias = lse
    if D > 1 and dout.stride(-1) != 1:
        dout = dout.contiguous()
    if dq.numel() == 0 and dk.numel() == 0:
        return dq, dk, dv
    scale = D ** -0.5 if scale is None else float(scale)
    delta = (dout.float() * out.float()).sum(-1).contiguous()                        # (B, H, N_Q) fp32
    lse = lse.contiguous()
    precision = "tf32" if q.dtype == torch.float32 and q.is_cuda and tf32_enabled() else "ieee"
    d_lo, d_hi = head_dim_chunks(D)
    common = dict(HEAD_DIM=D, D_LO=d_lo, D_HI=d_hi, HAS_MASK=key_mask is not None, VARLEN=cu_seqlens is not None,
                  DOT_PRECISION=precision, HAS_BIAS=bias is not lse)
    qkvo_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    _attention_bwd_dkdv_kernel[lambda meta: (cdiv(n_kv_arg, meta["BLOCK_N"]) * batch * H,)](
        q, k, v, dout, lse, delta, dk, dv, mask, cu, rel_h, rel_w, bias, *qkvo_strides,
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), stride_mb, stride_mn,
        stride_rh, *bias_strides, H, n_q_arg, n_kv_arg, n_q, scale * LOG2E, scale, RESIDENT="n", **common, **rel)
    _attention_bwd_dq_kernel[lambda meta: (cdiv(n_q_arg, meta["BLOCK_M"]) * batch * H,)](
        q, k, v, dout, lse, delta, dq, mask, cu, rel_h, rel_w, drel_h, drel_w, bias, dbias, *qkvo_strides,
        dq.stride(0), dq.stride(1), dq.stride(2), stride_mb, stride_mn, stride_rh, *bias_strides, *dbias_strides, H,
        n_q_arg, n_kv_arg, n_q, scale * LOG2E, scale, RESIDENT="m", **common, **rel)
    return dq, dk, dv


def attention_qkv_backward(qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                           num_heads: int, scale: float | None = None, *, dqkv: torch.Tensor | None = None,
                           key_mask: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                           max_seqlen: int | None = None, rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
                           drel: tuple[torch.Tensor, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
                           dbias: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient of `attention_qkv` with respect to the packed projection: qkv [B, N, 3·C], out and dout
    [B, N, C], lse [B, H, N], key_mask the forward's torch.bool [B, N] or None, cu_seqlens / max_seqlen the
    forward's segments or None, rel_pos, drel, bias and dbias as in `attention_backward` -> dqkv [B, N, 3·C]
    (contiguous, or the given buffer), dq, dk and dv written straight into its three thirds."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    if dqkv is None:
        dqkv = torch.empty((B, N, C3), dtype=qkv.dtype, device=qkv.device)
    _check_out("dqkv", dqkv, (B, N, C3), qkv.dtype, qkv.device)
    heads = lambda t: t.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)      # (B, H, N, D)
    dq, dk, dv = qkv_heads(dqkv, num_heads)
    attention_backward(*qkv_heads(qkv, num_heads), heads(out), lse, heads(dout), scale, dq=dq, dk=dk, dv=dv,
                       key_mask=key_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, rel_pos=rel_pos, drel=drel,
                       bias=bias, dbias=dbias)
    return dqkv
