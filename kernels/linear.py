"""Fused linear layer: y = act(x @ Wᵀ + b) (+ residual) in one Triton GEMM.

The four ViT linears (qkv, proj + residual, fc1 + GELU, fc2 + residual) are ~96% of a ViT's flops.
Bias, activation and residual are applied to the fp32 accumulator before the single store, so the
epilogue never takes a separate pass over memory.

    x [M, K] (any strides) @ W [N, K]ᵀ (nn.Linear's layout, read transposed by strides: no copy)
    -> + b [N] -> activation (None | exact-erf GELU | tanh GELU | QuickGELU) -> · scale [N] (layer-scale)
    -> + residual [M, N] -> y [M, N]

or, with a gated epilogue (W = [W_gate; W_up] of 2H rows: timm's SwiGLUPacked fc1, or Gemma 4's vision MLP),
    y [M, H] = act(x @ W_gateᵀ + b_gate) · (x @ W_upᵀ + b_up)      act: SiLU ("swiglu") or tanh GELU ("geglu_tanh")
from one tile whose first half of columns are gate rows of W and second half the matching up rows, so the
[M, 2H] product never reaches memory.

dtypes: fp16, bf16, fp32 (fp32 uses TF32 when torch allows it: `vitfast.kernels.tf32_enabled`); fp32 accumulation.
Tiles come from `linear_configs()` (Hopper-sized, autotuned per M bucket / N / K / dtype / epilogue);
program order is grouped along M (GROUP_M) so neighbouring programs reuse W tiles in L2.

Three variants share the tile GEMM helpers and one epilogue (`_linear_store_tile`):
    "tiled"       `_linear_kernel`, one program per output tile;
    "persistent"  `_linear_persistent_kernel`, min(#SMs, #tiles) programs looping over the tiles;
    "tma"         the persistent kernel loading x / W tiles through device-side tensor descriptors
                  (Hopper TMA; `tma_eligible` says when, the launcher sets Triton's scratch allocator).
In training the epilogue also stores the pre-activation z = x @ Wᵀ + b (`preact`).

Backward (`linear_backward`, `_linear_bwd_kernel`): dX = dZ @ W with dZ = dY · scale ⊙ act'(z) formed from
the dY and z tiles inside the GEMM's reduction loop (no elementwise pass over memory); the programs of the
first column tile also store dZ (for dW = dZᵀ x and db = Σ dZ, cuBLAS and a row sum) and the partial sums
Σ dY ⊙ act(z) of layer-scale's gradient.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from vitfast.kernels import Launch, autotune_bench, budgeted, cdiv, next_power_of_2, tf32_enabled
from vitfast.kernels import smem_limit as _smem_limit

# activation name -> the kernel's ACTIVATION constexpr (from 4 the gated epilogues, output width N / 2)
ACTIVATION_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "swiglu": 4, "geglu_tanh": 5}
GATED = ("swiglu", "geglu_tanh")


def m_bucket(M: int) -> int:
    """Autotune / dispatch bucket for the row count: the next power of two (>= 16), so a new batch
    size re-uses the tuning of a nearby one instead of re-tuning."""
    return max(16, next_power_of_2(max(M, 1)))


def linear_configs() -> list[triton.Config]:
    """Autotune space. On Hopper (H100/H200) 128x128 and 128x256 output tiles with a K-tile of 64 keep
    the tensor cores fed; 3-4 shared-memory stages hide global-memory latency; GROUP_M=8 swizzles the
    program order for L2 reuse. The 64-wide tiles cover small M or N. Under Triton's interpreter one
    small config (autotuning there would run every config on the CPU)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # GROUP_M=4 so the tests' M=394 (7 row tiles) exercises a full and a partial group.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    tiles = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)
        (128, 256, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (128, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 64, 4, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in tiles]



def _prune_configs(configs, named_args, **kwargs):
    """Drop tiles that cannot fit the device's shared memory (fp32 with 128x256), that are far
    wider than the problem (N=37 does not need BLOCK_N=256), or, for fp32 with ieee dots (FMA
    units, no tensor cores), that hold more than 64 accumulator values per thread: those spill
    tens of KiB on sm_90 (128x256 on 8 warps, 128x128 on 4). The persistent kernel with pointer
    loads (not TMA) also spills 128x128 on 4 warps (its flattened tile loop keeps the next tile's
    addresses live through the epilogue): it keeps more than 64 accumulator values per thread only
    on 8 warps; so does its TMA form when it also stores the pre-activation (training: 128x128 on 4
    warps spills under Triton 3.6)."""
    x, M, N = named_args["x_ptr"], named_args["M"], named_args["N"]
    if not x.is_cuda:
        return configs
    limit = _smem_limit(x.device) - 8 * 1024   # head-room: epilogue layout conversions use shared memory
    m_cap, n_cap = max(64, next_power_of_2(M)), max(64, next_power_of_2(N))
    smem = lambda c: c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * x.element_size()
    fma = x.dtype == torch.float32 and kwargs["INPUT_PRECISION"] == "ieee"
    acc_per_thread = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] / (32 * c.num_warps)
    persistent_pointers = kwargs.get("USE_TMA", True) is False
    persistent_pressure = persistent_pointers or ("USE_TMA" in kwargs and kwargs.get("STORE_Z", False))
    kept = [c for c in configs if smem(c) <= limit and c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_N"] <= n_cap
            and not (fma and acc_per_thread(c) > 64)
            and not (persistent_pressure and acc_per_thread(c) > 64 and c.num_warps < 8)]
    return kept or [min(configs, key=smem)]


@triton.jit
def _linear_tile_coords(
    tile,  # linear index of the output tile, in grouped order
    M, N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """(pid_m, pid_n) of `tile`. Grouped order: GROUP_M row tiles sweep all column tiles together, so
    the W tiles they share stay in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (tile // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % num_pid_in_group) % group_size_m
    pid_n = (tile % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _linear_tile_gemm(
    x_ptr,  # [M, K] input rows, strides (stride_xm, stride_xk)
    w_ptr,  # [N, K] weight; read as Wᵀ [K, N] through its strides
    pid_m, pid_n,
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GLU: tl.constexpr = False,
):
    """The fp32 [BLOCK_M, BLOCK_N] tile (pid_m, pid_n) of x @ Wᵀ, loaded through pointers. GLU (W = [W_gate;
    W_up], N = 2H rows): the tile's first BLOCK_N / 2 columns are gate rows pid_n · BLOCK_N / 2 + j of W, its
    last BLOCK_N / 2 the up rows H + pid_n · BLOCK_N / 2 + j."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows / columns past M / N wrap (% M, % N): their loads stay in bounds without an M/N mask and
    # their results are never stored. int64 row offsets: M * stride_xm can pass 2^31.
    rows = (offs_m % M).to(tl.int64)
    if GLU:
        HALF: tl.constexpr = BLOCK_N // 2
        j = tl.arange(0, BLOCK_N)
        cols = ((pid_n * HALF + j % HALF) % (N // 2) + (j // HALF) * (N // 2)).to(tl.int64)
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = (offs_n % N).to(tl.int64)
    # K offsets and steps in int64 too: a column-major x has stride_xk = M, and BLOCK_K · M can pass 2^31.
    stride_xk64 = tl.cast(stride_xk, tl.int64)   # a stride of 1 arrives as a constexpr int
    stride_wk64 = tl.cast(stride_wk, tl.int64)
    offs_k64 = offs_k.to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k64[None, :] * stride_xk64     # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_k64[:, None] * stride_wk64 + cols[None, :] * stride_wn     # [BLOCK_K, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k * BLOCK_K   # K tail: any K, e.g. 100
        a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk64
        w_ptrs += BLOCK_K * stride_wk64
    return acc


@triton.jit
def _linear_tile_gemm_tma(
    x_desc,  # [M, K] tensor descriptor, blocks [BLOCK_M, BLOCK_K]
    w_desc,  # [N, K] tensor descriptor, blocks [BLOCK_N, BLOCK_K]
    pid_m, pid_n, K,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The same tile with TMA loads: the copy engine zero-fills what lies past M, N or K, so no masks."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([pid_m * BLOCK_M, k * BLOCK_K])   # [BLOCK_M, BLOCK_K]
        b = w_desc.load([pid_n * BLOCK_N, k * BLOCK_K])   # [BLOCK_N, BLOCK_K]
        acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _linear_store_tile(
    acc,     # [BLOCK_M, BLOCK_N] fp32 tile (pid_m, pid_n) of x @ Wᵀ
    pid_m, pid_n,
    M, N,
    b_ptr,   # [N] bias
    s_ptr,   # [N] layer-scale
    r_ptr,   # [M, N] residual
    y_ptr,   # [M, N] output
    z_ptr,   # [M, N] pre-activation output (written when STORE_Z)
    stride_b, stride_s, stride_rm, stride_rn, stride_ym, stride_yn, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_Z: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Epilogue in two column halves: half the live registers (the full 128x256 tile spills with the
    erf GELU or the residual), same stores. Gated (ACTIVATION 4 SwiGLU, 5 GeGLU-tanh): the halves are the gate and
    up columns of output columns pid_n · BLOCK_N / 2 + j of y [M, N / 2]."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    if ACTIVATION >= 4:
        _gated_epilogue(acc0, acc1, offs_m, pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2), M, N // 2, b_ptr,
                        y_ptr, stride_b, stride_ym, stride_yn, HAS_BIAS, ACTIVATION)
        return
    offs_n0 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
    _linear_epilogue(acc0, offs_m, offs_n0, M, N, b_ptr, s_ptr, r_ptr, y_ptr, z_ptr, stride_b, stride_s, stride_rm,
                     stride_rn, stride_ym, stride_yn, stride_zm, stride_zn, HAS_BIAS, ACTIVATION, HAS_SCALE,
                     HAS_RESIDUAL, STORE_Z)
    _linear_epilogue(acc1, offs_m, offs_n0 + BLOCK_N // 2, M, N, b_ptr, s_ptr, r_ptr, y_ptr, z_ptr, stride_b,
                     stride_s, stride_rm, stride_rn, stride_ym, stride_yn, stride_zm, stride_zn, HAS_BIAS, ACTIVATION,
                     HAS_SCALE, HAS_RESIDUAL, STORE_Z)


@triton.autotune(configs=linear_configs(),
                 key=["M_BUCKET", "N", "K", "HAS_BIAS", "ACTIVATION", "HAS_SCALE", "HAS_RESIDUAL", "STORE_Z",
                      "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": budgeted(_prune_configs)},
                 do_bench=autotune_bench("linear"))
@triton.jit(do_not_specialize=["M_BUCKET"])
def _linear_kernel(
    x_ptr,  # [M, K] input rows, strides (stride_xm, stride_xk)
    w_ptr,  # [N, K] weight as nn.Linear stores it; read as Wᵀ [K, N] through its strides
    b_ptr,  # [N] bias (read only when HAS_BIAS)
    s_ptr,  # [N] layer-scale (read only when HAS_SCALE)
    r_ptr,  # [M, N] residual (read only when HAS_RESIDUAL)
    y_ptr,  # [M, N] output
    z_ptr,  # [M, N] pre-activation x @ Wᵀ + b (written only when STORE_Z)
    M, N, K,
    M_BUCKET,  # autotune key only (see m_bucket)
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_b, stride_s,
    stride_rm, stride_rn,
    stride_ym, stride_yn,
    stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 none, 1 exact GELU, 2 tanh GELU, 3 QuickGELU, 4 SwiGLU, 5 GeGLU-tanh (y: [M, N/2])
    HAS_SCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_Z: tl.constexpr,          # training: also store the pre-activation for the backward
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 inputs only; fp16/bf16 ignore it)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program per output tile (variant "tiled")."""
    pid_m, pid_n = _linear_tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _linear_tile_gemm(x_ptr, w_ptr, pid_m, pid_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                            INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, ACTIVATION >= 4)
    _linear_store_tile(acc, pid_m, pid_n, M, N, b_ptr, s_ptr, r_ptr, y_ptr, z_ptr, stride_b, stride_s, stride_rm,
                       stride_rn, stride_ym, stride_yn, stride_zm, stride_zn, HAS_BIAS, ACTIVATION, HAS_SCALE,
                       HAS_RESIDUAL, STORE_Z, BLOCK_M, BLOCK_N)


@triton.autotune(configs=linear_configs(),
                 key=["M_BUCKET", "N", "K", "HAS_BIAS", "ACTIVATION", "HAS_SCALE", "HAS_RESIDUAL", "STORE_Z",
                      "INPUT_PRECISION", "USE_TMA"],
                 prune_configs_by={"early_config_prune": budgeted(_prune_configs)},
                 do_bench=autotune_bench("linear"))
@triton.jit(do_not_specialize=["M_BUCKET"])
def _linear_persistent_kernel(
    x_ptr,  # [M, K] input rows, strides (stride_xm, stride_xk); with USE_TMA stride_xk == 1, rows 16-byte aligned
    w_ptr,  # [N, K] weight as nn.Linear stores it; with USE_TMA stride_wk == 1, rows 16-byte aligned
    b_ptr,  # [N] bias (read only when HAS_BIAS)
    s_ptr,  # [N] layer-scale (read only when HAS_SCALE)
    r_ptr,  # [M, N] residual (read only when HAS_RESIDUAL)
    y_ptr,  # [M, N] output
    z_ptr,  # [M, N] pre-activation x @ Wᵀ + b (written only when STORE_Z)
    M, N, K,
    M_BUCKET,  # autotune key only (see m_bucket)
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_b, stride_s,
    stride_rm, stride_rn,
    stride_ym, stride_yn,
    stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0 none, 1 exact GELU, 2 tanh GELU, 3 QuickGELU, 4 SwiGLU, 5 GeGLU-tanh (y: [M, N/2])
    HAS_SCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_Z: tl.constexpr,          # training: also store the pre-activation for the backward
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 inputs only; fp16/bf16 ignore it)
    USE_TMA: tl.constexpr,          # x / W tiles through device-side tensor descriptors (Hopper TMA)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Variants "persistent" and "tma": min(#SMs, #tiles) programs, each looping over the output tiles
    pid, pid + #programs, ... in grouped order. One launch wave, and the flattened loop lets the next
    tile's loads overlap this tile's epilogue."""
    if USE_TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = _linear_tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        if USE_TMA:
            acc = _linear_tile_gemm_tma(x_desc, w_desc, pid_m, pid_n, K, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc = _linear_tile_gemm(x_ptr, w_ptr, pid_m, pid_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                                    INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, ACTIVATION >= 4)
        _linear_store_tile(acc, pid_m, pid_n, M, N, b_ptr, s_ptr, r_ptr, y_ptr, z_ptr, stride_b, stride_s, stride_rm,
                           stride_rn, stride_ym, stride_yn, stride_zm, stride_zn, HAS_BIAS, ACTIVATION, HAS_SCALE,
                           HAS_RESIDUAL, STORE_Z, BLOCK_M, BLOCK_N)


@triton.jit
def _activate(a, ACTIVATION: tl.constexpr):
    """act(a) in fp32: 0 none, 1 exact GELU (erf), 2 tanh GELU, 3 QuickGELU."""
    if ACTIVATION == 1:    # 0.5·a·(1 + erf(a/√2))
        a = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACTIVATION == 2:  # 0.5·a·(1 + tanh(u)) = a·sigmoid(2u), u = √(2/π)·(a + 0.044715·a³); stable for |u| large
        u = 0.7978845608028654 * (a + 0.044715 * a * a * a)
        a = a / (1.0 + tl.exp(-2.0 * u))
    elif ACTIVATION == 3:  # QuickGELU (CLIP): a·sigmoid(1.702·a)
        a = a / (1.0 + tl.exp(-1.702 * a))
    return a


@triton.jit
def _activation_grad(z, ACTIVATION: tl.constexpr):
    """act'(z) in fp32 for ACTIVATION 1-3 (the derivatives torch's gelu_backward uses)."""
    if ACTIVATION == 1:    # Φ(z) + z·φ(z)
        g = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACTIVATION == 2:  # t = tanh(u): 0.5·(1 + t) + 0.5·z·(1 − t²)·u'(z)
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:                  # s = sigmoid(1.702·z): s + 1.702·z·s·(1 − s)
        sg = 1.0 / (1.0 + tl.exp(-1.702 * z))
        g = sg + 1.702 * z * sg * (1.0 - sg)
    return g


@triton.jit
def _linear_epilogue(
    acc,     # [BM, BN] fp32 tile of x @ Wᵀ
    offs_m,  # [BM] its rows
    offs_n,  # [BN] its columns
    M, N,
    b_ptr,   # [N] bias
    s_ptr,   # [N] layer-scale
    r_ptr,   # [M, N] residual
    y_ptr,   # [M, N] output
    z_ptr,   # [M, N] pre-activation output (training: the backward's act'(z))
    stride_b, stride_s, stride_rm, stride_rn, stride_ym, stride_yn, stride_zm, stride_zn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    STORE_Z: tl.constexpr,
):
    """y = act(acc + b) · s (+ r) in fp32, one cast, one masked store (and z = acc + b when STORE_Z)."""
    n_mask = offs_n < N
    # int64 row and column offsets: M · stride_rm can pass 2^31, and so can N · stride_rn for a
    # column-major residual (residual.reshape keeps its strides).
    offs_m64, offs_n64 = offs_m.to(tl.int64), offs_n.to(tl.int64)
    mask = (offs_m < M)[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n * stride_b, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if STORE_Z:
        z_ptrs = z_ptr + offs_m64[:, None] * stride_zm + offs_n64[None, :] * stride_zn
        tl.store(z_ptrs, acc.to(z_ptr.dtype.element_ty), mask=mask)
    acc = _activate(acc, ACTIVATION)
    if HAS_SCALE:          # layer-scale (timm's LayerScale gamma), before the residual add
        acc = acc * tl.load(s_ptr + offs_n * stride_s, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + offs_m64[:, None] * stride_rm + offs_n64[None, :] * stride_rn, mask=mask, other=0.0)
        acc += r.to(tl.float32)
    y_ptrs = y_ptr + offs_m64[:, None] * stride_ym + offs_n64[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_epilogue(
    gate,    # [BM, BN] fp32 gate columns of x @ Wᵀ
    up,      # [BM, BN] fp32 up columns, the same output columns
    offs_m,  # [BM] rows
    offs_h,  # [BN] output columns (gate column offs_h, up column H + offs_h)
    M, H,
    b_ptr,   # [2H] bias
    y_ptr,   # [M, H] output
    stride_b, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,   # 4: SiLU, 5: tanh GELU of the gate
):
    """y = act(gate + b[:H]) · (up + b[H:]) in fp32, one cast, one masked store."""
    h_mask = offs_h < H
    mask = (offs_m < M)[:, None] & h_mask[None, :]
    if HAS_BIAS:
        gate += tl.load(b_ptr + offs_h * stride_b, mask=h_mask, other=0.0).to(tl.float32)[None, :]
        up += tl.load(b_ptr + (offs_h + H) * stride_b, mask=h_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 4:
        y = gate / (1.0 + tl.exp(-gate)) * up
    else:
        y = _activate(gate, 2) * up
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_h.to(tl.int64)[None, :] * stride_yn
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


VARIANTS = ("tiled", "persistent", "tma")


# CUDA device index -> (compute capability, SM count), read once: launches are host-time critical.
_DEVICES: dict[int, tuple[tuple[int, int], int]] = {}


def _device_facts(device: torch.device) -> tuple[tuple[int, int], int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    facts = _DEVICES.get(index)
    if facts is None:
        props = torch.cuda.get_device_properties(index)
        facts = _DEVICES[index] = ((props.major, props.minor), props.multi_processor_count)
    return facts


def device_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of a CUDA `device`, read once per device."""
    return _device_facts(device)[0]


def _num_programs(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM on a GPU; 3 under the interpreter, so that small
    test problems give each program several tiles."""
    return _device_facts(device)[1] if device.type == "cuda" else 3


def tma_eligible(x: torch.Tensor, weight: torch.Tensor, capability: tuple[int, int] | None) -> bool:
    """Whether the "tma" variant can read x [..., K] and weight [N, K]: a TMA-capable GPU (compute
    capability >= 9; `capability` None = Triton's interpreter, which emulates the descriptors), a
    unit stride along K, 16-byte aligned base pointers and row strides, M, N, K in [1, 2^31)."""
    if capability is not None and capability[0] < 9:
        return False
    K, size = x.shape[-1], x.element_size()
    M = x.numel() // K if K else 0
    if not (0 < M < 2**31 and 0 < K < 2**31 and 0 < weight.shape[0] < 2**31):
        return False
    try:
        x2 = x.view(M, K)                            # what the launcher reads in place
    except RuntimeError:                             # the launcher copies x: contiguous, fresh allocation
        x2 = None
    views = [(weight.data_ptr(), weight.stride())] + ([] if x2 is None else [(x2.data_ptr(), x2.stride())])
    if x2 is None and (K * size) % 16:
        return False
    return all(ptr % 16 == 0 and (stride[1] == 1 or K == 1) and (stride[0] * size) % 16 == 0
               for ptr, stride in views)


def _rows(t: torch.Tensor, name: str, M: int, N: int) -> torch.Tensor:
    """t [..., N] as the [M, N] view a kernel writes through, or ValueError naming `name`."""
    try:
        return t.view(M, N)
    except RuntimeError as e:
        raise ValueError(f"{name}: expected a buffer viewable as [{M}, {N}], got strides {t.stride()}") from e


def _tma_allocator(device: torch.device):
    """Triton's allocator for the global scratch the "tma" variant writes its tensor descriptors to
    (128 bytes per descriptor and program): a torch allocation on the launch's device and current
    stream, so stream-ordered, and taken from the graph's private pool while a CUDA graph is captured."""
    return lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           activation: str | None = None, residual: torch.Tensor | None = None, scale: torch.Tensor | None = None,
           out: torch.Tensor | None = None, preact: torch.Tensor | None = None,
           variant: str = "tiled") -> torch.Tensor:
    """act(x @ weightᵀ + bias) · scale (+ residual) with the fused Triton kernel.

    x [..., K]; weight [N, K]; bias [N] or None; residual [..., N] or None; scale [N] or None (a
    per-column layer-scale, applied before the residual); activation None, "gelu" (exact erf),
    "gelu_tanh", "quick_gelu" (a·sigmoid(1.702·a)), "swiglu" (y [..., N / 2] = silu(z[..., :N/2]) ·
    z[..., N/2:] of z = x @ weightᵀ + bias; no residual, scale or preact; not the "tma" variant) or "geglu_tanh"
    (the same with the tanh GELU for silu); out:
    optional preallocated [..., N] output (N / 2 for the gated ones; must
    not overlap the inputs); preact: optional [..., N] buffer that also receives z = x @ weightᵀ + bias, the
    pre-activation (training: `linear_backward` reads it). All tensors share x's dtype (fp16, bf16, fp32)
    and device. Returns y [..., N].
    variant: "tiled" (one program per output tile), "persistent" (one program per SM looping over
    tiles) or "tma" (persistent with Hopper TMA loads; needs `tma_eligible`, else ValueError).

    x is read as [M, K] rows through its strides: a view (no copy) whenever the leading dims
    flatten evenly (contiguous or row-sliced inputs); otherwise `reshape` copies it once.
    No host synchronisation: safe inside CUDA-graph capture once autotuned.
    """
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation: expected one of {list(ACTIVATION_CODES)}, got {activation!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {list(VARIANTS)}, got {variant!r}")
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight: expected shape [N, {K}] (K = x.shape[-1]), got {list(weight.shape)}")
    N = weight.shape[0]
    lead = tuple(x.shape[:-1])
    M = math.prod(lead)
    for name, t in (("bias", bias), ("scale", scale)):
        if t is not None and tuple(t.shape) != (N,):
            raise ValueError(f"{name}: expected shape [{N}], got {list(t.shape)}")
    if activation in GATED:
        if N % 2:
            raise ValueError(f"weight: activation={activation!r} needs an even row count (gate and up halves), "
                             f"got {N}")
        bad = [name for name, t in (("residual", residual), ("scale", scale), ("preact", preact)) if t is not None]
        if bad or variant == "tma":
            raise ValueError(f"activation={activation!r}: expected no residual, scale, preact and a variant other "
                             f"than 'tma', got {bad or [f'variant={variant!r}']}")
    N_out = N // 2 if activation in GATED else N
    if residual is not None and tuple(residual.shape) != (*lead, N):
        raise ValueError(f"residual: expected shape {[*lead, N]}, got {list(residual.shape)}")
    dtype, device = x.dtype, x.device
    for name, t in (("weight", weight), ("bias", bias), ("scale", scale), ("residual", residual), ("out", out),
                    ("preact", preact)):
        if t is not None and (t.dtype != dtype or t.device != device):
            raise ValueError(f"{name}: expected {dtype} on {device} (like x), got {t.dtype} on {t.device}")
    cc = device_capability(device) if x.is_cuda and variant == "tma" else None
    if variant == "tma" and M * N > 0 and not tma_eligible(x, weight, cc):
        raise ValueError(f"variant: 'tma' needs compute capability >= 9 (got {cc}), unit stride along K, "
                         f"16-byte aligned pointers and row strides, 0 < M, N, K < 2^31; got x {list(x.shape)} "
                         f"strides {x.stride()}, weight {list(weight.shape)} strides {weight.stride()}, {x.dtype}")

    if out is None:
        out = torch.empty((*lead, N_out), dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (*lead, N_out):
        raise ValueError(f"out: expected shape {[*lead, N_out]}, got {list(out.shape)}")
    elif any(t is not None and t.data_ptr() == out.data_ptr() for t in (x, residual, preact)):
        raise ValueError("out: must not share memory with x, residual or preact (autotuning re-runs the kernel)")
    if preact is not None and tuple(preact.shape) != (*lead, N):
        raise ValueError(f"preact: expected shape {[*lead, N]}, got {list(preact.shape)}")
    if preact is not None and any(t is not None and t.data_ptr() == preact.data_ptr() for t in (x, residual)):
        raise ValueError("preact: must not share memory with x or residual")
    if M == 0 or N == 0:
        return out
    return run(plan(x, weight, bias, activation, residual, scale, preact, variant, out), x, weight, bias, residual,
               scale, preact, out)


class LinearPlan:
    """What a launch fixes for operands of given shapes, strides, dtype and device, an epilogue and a
    variant (`plan`): `run` then allocates the output and launches."""

    __slots__ = ("launch", "out_shape", "M", "N", "K", "x_view", "r_view", "allocator")

    def __init__(self, launch, out_shape, M, N, K, x_view, r_view, allocator):
        self.launch, self.out_shape, self.M, self.N, self.K = launch, out_shape, M, N, K
        self.x_view, self.r_view, self.allocator = x_view, r_view, allocator


def _rows_strides(t: torch.Tensor, M: int, N: int) -> tuple[int, int] | None:
    """The strides of t [..., N] read as [M, N] rows in place, or None when that needs a copy."""
    try:
        return t.view(M, N).stride()
    except RuntimeError:
        return None


def plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
         residual: torch.Tensor | None, scale: torch.Tensor | None, preact: torch.Tensor | None,
         variant: str, out: torch.Tensor | None = None) -> LinearPlan:
    """The launch of `linear` for these operands (validated; M, N > 0), valid for any later operands with
    the same shapes, strides, dtype, device, 16-byte alignment of x and weight, tf32 setting and
    epilogue. out / preact None: a contiguous buffer (what `run` allocates, what ops passes)."""
    K, N = x.shape[-1], weight.shape[0]
    lead = tuple(x.shape[:-1])
    M = math.prod(lead)
    xs = _rows_strides(x, M, K)
    N_out = N // 2 if activation in GATED else N
    ys = (N_out, 1) if out is None else _rows(out, "out", M, N_out).stride()
    zs = ys if preact is None else _rows(preact, "preact", M, N).stride()
    rs = ys if residual is None else (_rows_strides(residual, M, N) or (N, 1))
    fp32_tf32 = x.dtype == torch.float32 and x.is_cuda and tf32_enabled()
    tiles = lambda meta: cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
    meta = dict(HAS_BIAS=bias is not None, ACTIVATION=ACTIVATION_CODES[activation], HAS_SCALE=scale is not None,
                HAS_RESIDUAL=residual is not None, STORE_Z=preact is not None,
                INPUT_PRECISION="tf32" if (fp32_tf32 or x.dtype != torch.float32) else "ieee")
    allocator = None
    if variant == "tiled":
        kernel, grid = _linear_kernel, lambda meta: (tiles(meta),)
    else:
        programs = _num_programs(x.device)
        kernel, grid = _linear_persistent_kernel, lambda meta: (min(programs, tiles(meta)),)
        meta["USE_TMA"] = variant == "tma"
        if variant == "tma":
            allocator = _tma_allocator(x.device)
    scalars = (M, N, K, m_bucket(M),
               *(xs or (K, 1)), *weight.stride(),             # 2-D: (row, column) strides
               bias.stride(0) if bias is not None else ys[0], scale.stride(0) if scale is not None else ys[0],
               *rs, *ys, *zs)
    return LinearPlan(Launch(kernel, grid, scalars, meta), (*lead, N_out), M, N, K, xs is not None,
                      residual is None or _rows_strides(residual, M, N) is not None, allocator)


def run(p: LinearPlan, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
        residual: torch.Tensor | None, scale: torch.Tensor | None, preact: torch.Tensor | None = None,
        out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch `p` on operands it was planned for (nothing is checked): returns y (`out`, or a new
    contiguous tensor). x and residual are passed as they are when they read as rows in place (the kernel
    takes pointers and the planned strides), else as contiguous copies."""
    if out is None:
        out = torch.empty(p.out_shape, dtype=x.dtype, device=x.device)
    if not p.x_view:
        x = x.reshape(p.M, p.K)
    if residual is not None and not p.r_view:
        residual = residual.reshape(p.M, p.N)
    if p.allocator is not None:
        triton.set_allocator(p.allocator)
    p.launch(x, weight, out if bias is None else bias, out if scale is None else scale,
             out if residual is None else residual, out, out if preact is None else preact)
    return out


# ============================================================================================
# Backward: dX = dZ W with dZ = dY · scale ⊙ act'(z) formed in the GEMM that reads dY
# ============================================================================================
def linear_bwd_configs() -> list[triton.Config]:
    """Tiles of dX [M, K] (BLOCK_M x BLOCK_K), stepping BLOCK_N along the reduction over N. The dZ tile is
    built in registers from the dY and z tiles (the software pipeline keeps the next steps' dY and z in
    registers too), so the activation's derivative competes with the accumulator for registers: the 128-row
    tiles run 8 warps with a 32-wide step. Measured with sm_90 compiles (ptxas -v, bf16 and fp16, erf GELU):
    128x128 and 128x64 with 64-wide steps spill on 4 warps (kilobytes), and on 8 warps at most stage
    counts (up to 60 bytes)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        # BLOCK_N=16 so the tests' N (12, 37, 48) run full and partial reduction steps; BLOCK_M=64: two
        # dscale partial sums per tile.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_K": 32, "BLOCK_N": 16, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    tiles = [  # (BLOCK_M, BLOCK_K, BLOCK_N, num_stages, num_warps)
        (128, 128, 32, 3, 8),
        (128, 128, 32, 4, 8),
        (128, 64, 32, 4, 8),
        (64, 128, 64, 3, 8),
        (64, 128, 32, 4, 4),
        (64, 64, 64, 4, 8),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk, "BLOCK_N": bn, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bk, bn, s, w in tiles]


# dscale partial sums: one row per DS_ROWS rows of dY, whatever the tile (BLOCK_M a multiple of it): every
# config writes every row, so no value of a config timed while autotuning survives into the result.
DS_ROWS = 32


def _prune_bwd_configs(configs, named_args, **kwargs):
    """Drop tiles whose pipelined dY, z and W tiles overflow shared memory, that are far wider than M or K,
    or, for fp32 with ieee dots (FMA, no tensor cores), that hold more than 64 accumulator values per thread."""
    dy, M, K = named_args["dy_ptr"], named_args["M"], named_args["K"]
    if not dy.is_cuda:
        return configs
    fma = dy.dtype == torch.float32 and kwargs["INPUT_PRECISION"] == "ieee"
    acc_per_thread = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] / (32 * c.num_warps)
    limit = _smem_limit(dy.device) - 8 * 1024
    reads_z = kwargs["ACTIVATION"] != 0 or kwargs["DSCALE"]
    smem = lambda c: c.num_stages * c.kwargs["BLOCK_N"] * (
        c.kwargs["BLOCK_M"] * (2 if reads_z else 1) + c.kwargs["BLOCK_K"]) * dy.element_size()
    m_cap, k_cap = max(64, next_power_of_2(M)), max(64, next_power_of_2(K))
    kept = [c for c in configs if smem(c) <= limit and c.kwargs["BLOCK_M"] <= m_cap and c.kwargs["BLOCK_K"] <= k_cap
            and not (fma and acc_per_thread(c) > 64)]
    return kept or [min(configs, key=smem)]


@triton.autotune(configs=linear_bwd_configs(),
                 key=["M_BUCKET", "N", "K", "ACTIVATION", "HAS_SCALE", "STORE_DZ", "DSCALE", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": budgeted(_prune_bwd_configs)},
                 do_bench=autotune_bench("linear_backward"))
@triton.jit(do_not_specialize=["M_BUCKET"])
def _linear_bwd_kernel(
    dy_ptr,  # [M, N] gradient of y
    z_ptr,   # [M, N] pre-activation (read when ACTIVATION != 0 or DSCALE)
    w_ptr,   # [N, K] weight as nn.Linear stores it
    s_ptr,   # [N] layer-scale (read when HAS_SCALE)
    dx_ptr,  # [M, K] output: dZ W
    dz_ptr,  # [M, N] output when STORE_DZ: dZ, for dW = dZᵀ x and db = Σ dZ
    ds_ptr,  # [cdiv(M, DS_ROWS), N] fp32 output when DSCALE: row r = Σ over dY rows r·DS_ROWS... of dY ⊙ act(z)
    M, N, K,
    M_BUCKET,  # autotune key only (see m_bucket)
    stride_dym, stride_dyn,
    stride_zm, stride_zn,
    stride_wn, stride_wk,
    stride_s,
    stride_dxm, stride_dxk,
    stride_dzm, stride_dzn,
    ACTIVATION: tl.constexpr,       # 0 none, 1 exact GELU (erf), 2 tanh GELU, 3 QuickGELU
    HAS_SCALE: tl.constexpr,
    STORE_DZ: tl.constexpr,
    DSCALE: tl.constexpr,
    DS_ROWS: tl.constexpr,          # rows of dY per dscale partial sum (BLOCK_M is a multiple of it)
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 inputs only; fp16/bf16 ignore it)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One program per dX tile (pid_m, pid_k). Each reduction step loads dY and z tiles, forms dZ in fp32
    (one cast to the weight's dtype, as torch's gelu_backward output) and feeds it to the dot; the programs
    of column tile 0 also store dZ and the layer-scale partial sums, so each is written once."""
    pid_m, pid_k = _linear_tile_coords(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    rows = offs_m.to(tl.int64)
    cols = (offs_k % K).to(tl.int64)          # columns past K wrap: in-bounds loads, never stored
    stride_wn64 = tl.cast(stride_wn, tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for i in range(0, tl.cdiv(N, BLOCK_N)):
        offs_n = i * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        n64 = offs_n.to(tl.int64)
        mask = m_mask[:, None] & n_mask[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + n64[None, :] * stride_dyn, mask=mask, other=0.0)
        dy = dy.to(tl.float32)
        g = dy
        if HAS_SCALE:
            g = g * tl.load(s_ptr + offs_n * stride_s, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION != 0 or DSCALE:
            z = tl.load(z_ptr + rows[:, None] * stride_zm + n64[None, :] * stride_zn, mask=mask, other=0.0)
            z = z.to(tl.float32)
        if ACTIVATION != 0:
            g = g * _activation_grad(z, ACTIVATION)
        dz = g.to(w_ptr.dtype.element_ty)
        if pid_k == 0:   # this row tile's dZ / dscale writer
            if STORE_DZ:
                tl.store(dz_ptr + rows[:, None] * stride_dzm + n64[None, :] * stride_dzn, dz, mask=mask)
            if DSCALE:   # one partial sum per DS_ROWS rows; masked rows load dY = 0: they add nothing
                GROUPS: tl.constexpr = BLOCK_M // DS_ROWS
                prod = tl.reshape(dy * _activate(z, ACTIVATION), (GROUPS, DS_ROWS, BLOCK_N))
                grp = pid_m * GROUPS + tl.arange(0, GROUPS)
                grp_mask = (grp < tl.cdiv(M, DS_ROWS))[:, None] & n_mask[None, :]
                tl.store(ds_ptr + grp[:, None] * N + offs_n[None, :], tl.sum(prod, axis=1), mask=grp_mask)
        w = tl.load(w_ptr + n64[:, None] * stride_wn64 + cols[None, :] * stride_wk, mask=n_mask[:, None], other=0.0)
        acc = tl.dot(dz, w, acc, input_precision=INPUT_PRECISION)
    mask = m_mask[:, None] & (offs_k < K)[None, :]
    dx_ptrs = dx_ptr + rows[:, None] * stride_dxm + offs_k.to(tl.int64)[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=mask)


def linear_backward(dy: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, scale: torch.Tensor | None,
                    activation: str | None, *, need_dz: bool = True, need_dscale: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The backward of y = act(z) · scale (+ residual), z = x @ weightᵀ + b, from dY, through the fused kernel:
    dX = dZ @ weight with dZ = dY · scale ⊙ act'(z) formed inside the GEMM (never a separate pass).

    dy [..., N]; z [..., N] the saved pre-activation (needed when activation is set or need_dscale; else None);
    weight [N, K]; scale [N] or None; activation as `linear`'s. Same dtype and device throughout.
    Returns (dx [..., K], dz [..., N] when need_dz (dW = dzᵀ x and db = Σ dz are the caller's GEMM and
    sum), dscale [N] = Σ dY ⊙ act(z) in scale's dtype when need_dscale)."""
    if activation not in ACTIVATION_CODES or activation in GATED:
        raise ValueError(f"activation: expected one of {[a for a in ACTIVATION_CODES if a not in GATED]} (the "
                         f"gated ones' backward is ops'), got {activation!r}")
    N, K = weight.shape
    if dy.shape[-1] != N:
        raise ValueError(f"dy: expected last dim {N} (weight.shape[0]), got shape {list(dy.shape)}")
    if need_dscale and scale is None:
        raise ValueError("need_dscale: expected a scale tensor, got scale=None")
    reads_z = activation is not None or need_dscale
    if reads_z and (z is None or z.shape != dy.shape):
        raise ValueError(f"z: expected shape {list(dy.shape)} (like dy), got {None if z is None else list(z.shape)}")
    for name, t in (("z", z), ("weight", weight), ("scale", scale)):
        if t is not None and (t.dtype != dy.dtype or t.device != dy.device):
            raise ValueError(f"{name}: expected {dy.dtype} on {dy.device} (like dy), got {t.dtype} on {t.device}")
    lead = tuple(dy.shape[:-1])
    M = math.prod(lead)
    dy2 = dy.reshape(M, N)
    z2 = z.reshape(M, N) if reads_z else dy2                              # dummy when unused
    dx = torch.empty((*lead, K), dtype=dy.dtype, device=dy.device)
    dz = torch.empty((*lead, N), dtype=dy.dtype, device=dy.device) if need_dz else None
    ds = torch.empty((cdiv(M, DS_ROWS), N), dtype=torch.float32, device=dy.device) if need_dscale else None
    if K == 0 and M * N:   # dX is empty; dZ and dscale are not: run on one zero column
        dx1, dz, dscale = linear_backward(dy, z, weight.new_zeros((N, 1)), scale, activation, need_dz=need_dz,
                                          need_dscale=need_dscale)
        return dx1[..., :0], dz, dscale
    if M == 0 or N == 0:
        return dx.zero_(), dz, None if ds is None else ds.sum(0).to(scale.dtype)
    dx2, dz2 = dx.view(M, K), (dz.view(M, N) if dz is not None else dy2)
    s = scale if scale is not None else dy2
    fp32_tf32 = dy.dtype == torch.float32 and dy.is_cuda and tf32_enabled()
    grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(K, meta["BLOCK_K"]),)
    _linear_bwd_kernel[grid](
        dy2, z2, weight, s, dx2, dz2, ds if ds is not None else dx2,
        M, N, K, m_bucket(M),
        dy2.stride(0), dy2.stride(1),
        z2.stride(0), z2.stride(1),
        weight.stride(0), weight.stride(1),
        s.stride(0),
        dx2.stride(0), dx2.stride(1),
        dz2.stride(0), dz2.stride(1),
        ACTIVATION=ACTIVATION_CODES[activation],
        HAS_SCALE=scale is not None,
        STORE_DZ=need_dz,
        DSCALE=need_dscale,
        DS_ROWS=DS_ROWS,
        INPUT_PRECISION="tf32" if (fp32_tf32 or dy.dtype != torch.float32) else "ieee",
    )
    return dx, dz, None if ds is None else ds.sum(0).to(scale.dtype)
