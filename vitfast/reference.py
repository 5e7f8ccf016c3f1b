"""Plain eager PyTorch for every vitfast op and for the whole ViT: the ground truth.

Everything here is written once, plainly, and computed in the dtype it is given (run it in
float64 on the CPU for the reference of a test). Tests, benchmarks and the CPU fallback of
`vitfast.ops` all call these functions; no other file holds a second copy of this math.

The `VisionTransformer` follows timm's `vision_transformer.py`: the same constructor kwargs, the
same module tree and state_dict keys (`cls_token`, `reg_token`, `pos_embed`, `patch_embed.proj`,
`norm_pre`, `blocks.{i}.norm1`, `attn.qkv`, `attn.proj`, `ls1.gamma`, `norm2`, `mlp.fc1`, `mlp.fc2`,
`ls2.gamma`, `norm`, `attn_pool.*`, `fc_norm`, `head`), pre-LN blocks, LayerNorm eps 1e-6 unless
told otherwise; `VisionTransformerDistilled` is timm's DeiT with a distillation token and head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast.configs import MLP_LAYERS

ACTIVATIONS = (None, "gelu", "gelu_tanh", "quick_gelu")
NORMS = ("layernorm", "rmsnorm")        # VisionTransformer's norm: timm's LayerNorm, or RmsNorm (AIMv2's)


# --------------------------------------------------------------------------------------------
# Ops
# --------------------------------------------------------------------------------------------
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim: (x - mean) / sqrt(var + eps) * weight + bias (biased var)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).square().mean(dim=-1, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor | None, bias: Tensor | None,
                   eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Pre-LN residual stream step: s = x + residual; returns (layer_norm(s), s)."""
    s = x + residual
    return layer_norm(s, weight, bias, eps), s


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-6) -> Tensor:
    """RMSNorm over the last dim as Hugging Face's Qwen2RMSNorm computes it (Qwen2.5-VL's vision tower; AIMv2's
    and InternViT's RMSNorm are the same): x · rsqrt(mean(x²) + eps) in float32 (float64 stays float64),
    rounded to x's dtype, then `weight *` that in the weight's dtype (a float32 weight makes the result
    float32, as in HF). In float64 this is the exact RMSNorm; in 16-bit dtypes it is HF's own rounding."""
    dtype = x.dtype
    h = x.to(torch.promote_types(dtype, torch.float32))
    h = h * torch.rsqrt(h.square().mean(dim=-1, keepdim=True) + eps)
    h = h.to(dtype)
    return h if weight is None else weight * h


def segment_ids(cu_seqlens: Tensor, n: int) -> Tensor:
    """The segment of each of n packed tokens: cu_seqlens int [S + 1] (cu[0] = 0, non-decreasing) ->
    [n] ids, token i in segment s when cu[s] <= i < cu[s + 1] (S for tokens past cu[S])."""
    tokens = torch.arange(n, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


def attention_probs(q: Tensor, k: Tensor, scale: float | None = None, key_mask: Tensor | None = None,
                    cu_seqlens: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ · scale) over keys. q [..., Nq, D], k [..., Nk, D] -> [..., Nq, Nk].

    key_mask: optional bool [B, Nk] for q, k [B, H, N, D] (True = the key takes part): the other keys get
    probability 0 from every query and head of their batch element; a row with no key left is all zeros
    (FlashAttention's convention, not softmax's NaN). cu_seqlens: optional int [S + 1] segment boundaries
    of packed tokens (FlashAttention's varlen): query i sees key j only when both lie in one segment
    [cu[s], cu[s + 1]) (a block-diagonal mask). bias: optional scores added before the softmax, broadcast
    to [..., Nq, Nk] (SAM's relative positions: `rel_pos_bias`)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        s = s + bias
    if key_mask is None and cu_seqlens is None:
        return torch.softmax(s, dim=-1)
    keep = None if key_mask is None else key_mask[:, None, None, :]       # (B, 1, 1, Nk)
    if cu_seqlens is not None:
        same = segment_ids(cu_seqlens, q.shape[-2])[:, None] == segment_ids(cu_seqlens, k.shape[-2])[None, :]
        keep = same if keep is None else keep & same                        # (Nq, Nk) or (B, 1, Nq, Nk)
    s = s.masked_fill(~keep, float("-inf"))
    s = s.masked_fill(~keep.any(-1, keepdim=True), 0.0)     # rows with no key: finite, then zeroed below
    return torch.softmax(s, dim=-1) * keep


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None, key_mask: Tensor | None = None,
              cu_seqlens: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v. q, k, v [B, H, N, D] -> [B, H, N, D]; scale defaults to D^-½; key_mask: optional
    bool [B, N_kv], cu_seqlens: optional segment boundaries of packed q, k, v [1, H, T, D], as in
    `attention_probs`."""
    return attention_probs(q, k, scale, key_mask, cu_seqlens) @ v


def rel_pos_bias(rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """SAM's decomposed relative positions as scores: rel_h [..., N, KH], rel_w [..., N, KW] -> [..., N, KH · KW],
    key j of the KH x KW grid (row-major) getting rel_h[:, j // KW] + rel_w[:, j % KW]."""
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)


def sam_rel_pos_table(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """HF's SamVisionAttention.get_rel_pos: the learned table rel_pos [L, D] linearly resampled to 2·max(q, k) − 1
    distances, then read at each (query, key) distance -> [q_size, k_size, D]."""
    dist = int(2 * max(q_size, k_size) - 1)
    resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).transpose(1, 2), size=dist, mode="linear")
    resized = resized.reshape(-1, dist).permute(1, 0)
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    return resized[((q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)).long()]


def sam_rel_pos(q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, grid: tuple[int, int],
                dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """SAM's decomposed relative positions (HF's get_decomposed_rel_pos, MViTv2's) of queries q [B, H, N, D] on a
    grid (rows, columns) of N tokens, with the learned tables rel_pos_h [Lh, D], rel_pos_w [Lw, D] -> rel_h
    [B, H, N, rows], rel_w [B, H, N, columns] (`rel_pos_bias` turns them into scores), computed in `dtype` (default
    q's): O(N·√N) work."""
    B, H, N, D = q.shape
    rows, cols = grid
    dtype = q.dtype if dtype is None else dtype
    r_h = sam_rel_pos_table(rows, rows, rel_pos_h).to(dtype)                       # (rows, rows, D)
    r_w = sam_rel_pos_table(cols, cols, rel_pos_w).to(dtype)
    x = q.to(dtype).reshape(B, H, rows, cols, D)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", x, r_h).reshape(B, H, N, rows)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", x, r_w).reshape(B, H, N, cols)
    return rel_h, rel_w


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Packed qkv [B, N, 3·C] (timm's layout: q, k, v then heads) -> q, k, v [B, H, N, D]."""
    B, N, C3 = qkv.shape
    qkv = qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    return qkv[0], qkv[1], qkv[2]


def attention_qkv(qkv: Tensor, num_heads: int, scale: float | None = None, return_cls_attn: bool = False,
                  key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                  rel_pos: tuple[Tensor, Tensor] | None = None, attn_bias: Tensor | None = None
                  ) -> Tensor | tuple[Tensor, Tensor]:
    """Attention from the packed qkv projection. qkv [B, N, 3·C] -> out [B, N, C]
    (and, with return_cls_attn, the softmax row of query token 0: cls_attn [B, H, N] in fp32).
    key_mask: optional bool [B, N]; cu_seqlens: optional segment boundaries of a packed qkv [1, T, 3·C];
    as in `attention_probs`. rel_pos: SAM's (rel_h, rel_w), added to the scores as `rel_pos_bias` makes them.
    attn_bias: a dense bias [H, N, N] or [B or 1, H, N, N] added to the scores (not with rel_pos)."""
    B, N, _ = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    bias = None if rel_pos is None else rel_pos_bias(*rel_pos).to(q.dtype)
    if attn_bias is not None:
        bias = attn_bias.to(q.dtype)
    p = attention_probs(q, k, scale, key_mask, cu_seqlens, bias)   # (B, H, N, N)
    out = (p @ v).transpose(1, 2).reshape(B, N, -1)       # (B, N, C)
    if return_cls_attn:
        return out, p[:, :, 0, :].float()
    return out


# Rotary position embedding (RoPE), as DINOv3 has it (Hugging Face's and timm's): the head dim's two halves
# are the pairs (column j with column D/2 + j), one angle per pair and token; the tables cos, sin [N_rope, D/2]
# cover the last N_rope tokens (the patches), the prefix tokens before them (class, registers) are not rotated.
# rope="timm": the tables of a timm RotaryEmbeddingCat module (EVA-02's), `model.rope_embed` (timm_rope_tables);
# a model converted from interleaved pairs (columns 2i, 2i + 1) holds its q / k rows in rotate-half order.
ROPE_TYPES = (None, "dinov3", "timm")
ROPE_ROUNDINGS = ("hf", "timm")     # dinov3_rope's two roundings of the same angles


def rope_halves(cos: Tensor, sin: Tensor, half: int, inverse: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The tables of a RoPE over heads of 2·half columns as (cos₁, sin₁, cos₂, sin₂), the angles of the first and
    of the second element of each pair: the same for tables of `half` columns, the two halves of tables of 2·half
    columns (an angle per element, V-JEPA 2's). inverse: the transpose (for a rotation its inverse)."""
    c1, c2 = (cos, cos) if cos.shape[-1] == half else (cos[..., :half], cos[..., half:])
    s1, s2 = (sin, sin) if sin.shape[-1] == half else (sin[..., :half], sin[..., half:])
    return (c1, -s2, c2, -s1) if inverse else (c1, s1, c2, s2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """x [..., N, D] with its last cos.shape[0] tokens rotated: (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin)
    for the halves x1, x2, computed in the tables' dtype when it is wider, returned in x's. inverse: rotate by
    −angle (the transpose: the backward of the rotation). Tables of D columns: an angle per element
    (`rope_halves`)."""
    n = cos.shape[0]
    keep, rot = x[..., : x.shape[-2] - n, :], x[..., x.shape[-2] - n:, :]
    x1, x2 = rot.chunk(2, dim=-1)
    c1, s1, c2, s2 = rope_halves(cos, sin, x1.shape[-1], inverse)
    rot = torch.cat([x1 * c1 - x2 * s1, x2 * c2 + x1 * s2], dim=-1).to(x.dtype)
    return torch.cat([keep, rot], dim=-2)


def rope_qkv(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, inverse: bool = False) -> Tensor:
    """Packed qkv [B, N, 3·C] -> the same layout with q and k rotated (apply_rope), v as it is."""
    B, N, C3 = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)                                                   # (B, H, N, D)
    q, k = apply_rope(q, cos, sin, inverse), apply_rope(k, cos, sin, inverse)
    return torch.stack([q, k, v]).permute(1, 3, 0, 2, 4).reshape(B, N, C3)


def timm_rope_tables(module: nn.Module, grid: tuple[int, int], dynamic: bool, dtype: torch.dtype
                     ) -> tuple[Tensor, Tensor]:
    """cos, sin [gh·gw, D/2] in `dtype` from timm's RotaryEmbeddingCat `module` (EVA-02's): its `get_embed` for the
    grid as timm's Eva asks for it (the grid with dynamic_img_size, its cached table otherwise), [sin | cos] of D
    columns each, one angle per pair: columns 2i (interleaved pairs) or i (rotate_half) of each."""
    emb = module.get_embed(shape=list(grid)) if dynamic else module.get_embed()
    sin, cos = emb.chunk(2, dim=-1)
    half = sin.shape[-1] // 2
    if getattr(module, "rotate_half", False):
        sin, cos = sin[:, :half], cos[:, :half]
    else:
        sin, cos = sin[:, ::2], cos[:, ::2]
    return cos.to(dtype).contiguous(), sin.to(dtype).contiguous()


def dinov3_rope(grid: tuple[int, int], head_dim: int, temperature: float = 100.0, dtype: torch.dtype = torch.float32,
                device=None, rounding: str = "hf") -> tuple[Tensor, Tensor]:
    """DINOv3's RoPE tables for a patch grid (gh, gw): cos, sin [gh·gw, head_dim / 2] in `dtype`, patches in
    row-major order. Patch centres in [-1, 1] per axis ((i + 0.5) / g · 2 − 1), frequencies
    1 / temperature^(4i / head_dim) for i < head_dim / 4, angles 2π · coordinate · frequency: the first
    head_dim / 4 pairs from the row coordinate, the next from the column. Coordinates and frequencies are made
    in float32; the angles and their cos / sin in float32, or in float64 from those float32 values for a float64
    `dtype` (what the models compute after `.double()`). rounding: "hf" multiplies by the frequency, as Hugging
    Face's DINOv3ViTRopePositionEmbedding does; "timm" divides by the period temperature^(2i / (head_dim / 2)),
    as timm's RotaryEmbeddingDinoV3 (and Meta's original) does. The two differ by a few float32 ulps."""
    if head_dim % 4:
        raise ValueError(f"head_dim: DINOv3's RoPE needs a multiple of 4, got {head_dim}")
    if rounding not in ROPE_ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROPE_ROUNDINGS}, got {rounding!r}")
    f32, work = torch.float32, torch.float64 if dtype == torch.float64 else torch.float32
    gh, gw = grid
    ys = (torch.arange(0.5, gh, device=device, dtype=f32) / gh) * 2 - 1
    xs = (torch.arange(0.5, gw, device=device, dtype=f32) / gw) * 2 - 1
    coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)        # (gh·gw, 2)
    if rounding == "hf":
        freqs = (1 / temperature ** torch.arange(0, 1, 4 / head_dim, device=device, dtype=f32)).to(work)
        angles = 2 * math.pi * coords[:, :, None] * freqs                                   # (gh·gw, 2, head_dim/4)
    else:
        exponents = 2.0 * torch.arange(head_dim // 4, device=device, dtype=f32) / (head_dim // 2)
        angles = 2 * math.pi * coords[:, :, None].to(work) / (temperature ** exponents).to(work)
    angles = angles.reshape(gh * gw, head_dim // 2)
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    return F.gelu(x, approximate=approximate)


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's QuickGELU: x · sigmoid(1.702 · x)."""
    return x * torch.sigmoid(1.702 * x)


def activate(x: Tensor, activation: str | None) -> Tensor:
    """One of ACTIVATIONS: None, "gelu" (exact erf), "gelu_tanh" or "quick_gelu"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "gelu":
        return gelu(x)
    if activation == "gelu_tanh":
        return gelu(x, approximate="tanh")
    return quick_gelu(x) if activation == "quick_gelu" else x


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
           residual: Tensor | None = None, scale: Tensor | None = None) -> Tensor:
    """act(x @ weightᵀ + bias) · scale + residual. x [..., K], weight [N, K] (nn.Linear), bias [N],
    residual [..., N], scale [N] (layer-scale, timm's LayerScale gamma); activation one of ACTIVATIONS."""
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    y = activate(y, activation)
    if scale is not None:
        y = y * scale
    if residual is not None:
        y = y + residual
    return y


def normalize_images(images: Tensor, mean: Tensor | None, std: Tensor | None, dtype: torch.dtype) -> Tensor:
    """uint8 images -> images / 255 in `dtype`; then (x - mean) / std per channel if given.
    mean and std are in [0, 1] units (timm's data config)."""
    x = images.to(dtype)
    if images.dtype == torch.uint8:
        x = x / 255
    if mean is not None:
        x = x - mean.to(dtype).view(1, -1, 1, 1)
    if std is not None:
        x = x / std.to(dtype).view(1, -1, 1, 1)
    return x


def add_prefix_and_pos(x: Tensor, prefix_tokens: Tensor | None, pos_embed: Tensor | None,
                       pos_embed_prefix: bool = True) -> Tensor:
    """Patch tokens x [B, N, D] -> [B, NP + N, D]: the NP prefix tokens (prefix_tokens [1, NP, D],
    [NP, D] or [D]: class, then register or distillation tokens) in front, and the position table
    pos_embed added, which has rows for the prefix tokens too (pos_embed_prefix, timm's default) or
    for the patches only (no_embed_class: timm adds it, then puts the prefix tokens in front)."""
    B, D = x.shape[0], x.shape[-1]
    pos = None if pos_embed is None else pos_embed.reshape(1, -1, D)
    if pos is not None and not pos_embed_prefix:
        x = x + pos
    if prefix_tokens is not None:
        prefix = prefix_tokens.reshape(1, -1, D).to(x.dtype)
        x = torch.cat([prefix.expand(B, -1, -1), x], dim=1)
    if pos is not None and pos_embed_prefix:
        x = x + pos
    return x


def patch_embed(images: Tensor, weight: Tensor, bias: Tensor | None, prefix_tokens: Tensor | None = None,
                pos_embed: Tensor | None = None, mean: Tensor | None = None,
                std: Tensor | None = None, pos_embed_prefix: bool = True) -> Tensor:
    """Patchify + project + prefix tokens + position embedding, as a matmul.

    images [B, C, H, W] (float, or uint8 normalised with mean/std), weight [D, C, P, P] (the conv
    weight), bias [D], prefix_tokens [1, NP, D], [NP, D] or [D] (a class token), pos_embed [1, T', D]
    or [T', D] with T' = NP + (H/P)·(W/P) rows, or (H/P)·(W/P) when pos_embed_prefix is False (see
    add_prefix_and_pos). Returns tokens [B, NP + N, D] in weight's dtype.
    """
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    gh, gw = H // P, W // P
    x = normalize_images(images, mean, std, weight.dtype)
    x = x.reshape(B, C, gh, P, gw, P).permute(0, 2, 4, 1, 3, 5).reshape(B, gh * gw, C * P * P)  # (B, N, C·P·P)
    x = x @ weight.reshape(D, C * P * P).t()                                                   # (B, N, D)
    if bias is not None:
        x = x + bias
    return add_prefix_and_pos(x, prefix_tokens, pos_embed, pos_embed_prefix)


# --------------------------------------------------------------------------------------------
# The same ops through torch's fused kernels (F.layer_norm, F.scaled_dot_product_attention,
# F.linear, F.conv2d): what a user of eager PyTorch writes, as timm runs it. They are the `torch`
# baseline of `vitfast bench` (`VisionTransformer.use_torch_ops`) and vitfast's path for CPU
# tensors. Same arguments and results as the plain functions above.
# --------------------------------------------------------------------------------------------
def torch_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-6) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None,
                    key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None, bias: Tensor | None = None
                    ) -> Tensor:
    """SDPA; key_mask (bool [B, N_kv]) as its boolean attn_mask [B, 1, 1, N_kv]. A batch element with no key
    left attends to all of them and is zeroed after: zeros and zero gradients, on any SDPA backend. bias: scores
    added before the softmax (SDPA's float attn_mask, in q's dtype; the masked keys at -inf), broadcast to
    [B, H, N_q, N_kv]; not with cu_seqlens.
    cu_seqlens (int [S + 1], the segments of packed q, k, v [1, H, T, D]; not with key_mask): SDPA on each
    segment, written into one output (reads the boundaries on the host: a sync on CUDA; tokens past cu[S]
    are 0), laid out [1, T, H, D] in memory (a view [1, H, T, D] of it is returned: no transpose copy for the
    caller that goes on to [1, T, C])."""
    if cu_seqlens is not None:
        B, H, N, D = q.shape
        out = q.new_empty(B, N, H, D)
        bounds = cu_seqlens.tolist()
        out[:, bounds[-1]:] = 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                seg = slice(start, end)
                out[:, seg] = F.scaled_dot_product_attention(q[:, :, seg], k[:, :, seg], v[:, :, seg],
                                                             scale=scale).transpose(1, 2)
        return out.transpose(1, 2)                                                          # (B, H, N, D) view
    if key_mask is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    any_key = key_mask.any(-1, keepdim=True)                                                # (B, 1)
    mask = (key_mask | ~any_key)[:, None, None, :]                                          # (B, 1, 1, N_kv)
    if bias is not None:
        mask = bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out * any_key[:, :, None, None].to(out.dtype)


def torch_attention_qkv(qkv: Tensor, num_heads: int, scale: float | None = None, return_cls_attn: bool = False,
                        key_mask: Tensor | None = None, cu_seqlens: Tensor | None = None,
                        rel_pos: tuple[Tensor, Tensor] | None = None, attn_bias: Tensor | None = None
                        ) -> Tensor | tuple[Tensor, Tensor]:
    """SDPA on the packed projection; the CLS row, when asked for, from query 0 alone: O(N) extra.
    cu_seqlens: as in `torch_attention` (not with the CLS row). rel_pos: SAM's (rel_h, rel_w), as SDPA's float
    attn_mask (`rel_pos_bias`, in q's dtype: HF's SDPA path); alone. attn_bias: a dense bias [B or 1, H, N, N] added
    to the scores (SDPA's float attn_mask, in q's dtype, as HF's BEiT adds it), with key_mask's keys at -inf (a
    batch element with no key left gives zeros, as in `torch_attention`); not with cu_seqlens, rel_pos or the CLS
    row."""
    B, N, _ = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)                                                    # (B, H, N, D)
    bias = rel_pos_bias(*rel_pos) if rel_pos is not None else attn_bias
    bias = None if bias is None else bias.to(q.dtype)
    out = torch_attention(q, k, v, scale, key_mask, cu_seqlens, bias).transpose(1, 2).reshape(B, N, -1)  # (B, N, C)
    if return_cls_attn:
        return out, attention_probs(q[:, :, :1], k, scale, key_mask)[:, :, 0].float()    # (B, H, N)
    return out


def torch_rope_qkv(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, inverse: bool = False,
                   in_place: bool = False) -> Tensor:
    """`rope_qkv` without its split and repack: q and k of the rotated tokens rewritten through a view of qkv
    itself (in_place) or of one contiguous copy, in the tables' dtype, rounded once."""
    B, N, C3 = qkv.shape
    D, n = C3 // (3 * num_heads), cos.shape[0]
    out = qkv if in_place else qkv.clone() if qkv.is_contiguous() else qkv.contiguous()
    qk = out.unflatten(2, (3, num_heads, D))[:, N - n:, :2]                     # (B, n, 2, H, D), a view
    x1, x2 = qk[..., : D // 2], qk[..., D // 2:]
    c1, s1, c2, s2 = (t[:, None, None, :] for t in rope_halves(cos, sin, D // 2, inverse))   # (n, 1, 1, D/2)
    a, e = x1.to(cos.dtype, copy=True), x2.to(cos.dtype, copy=True)          # copies: x1, x2 are overwritten
    x1.copy_(a * c1 - e * s1)
    x2.copy_(e * c2 + a * s2)
    return out


def torch_norm_rope_qkv(qkv: Tensor, num_heads: int, cos: Tensor, sin: Tensor, weight: Tensor, norm: str = "qk",
                        eps: float = 1e-6, in_place: bool = False) -> Tensor:
    """`norm_rope_qkv` in torch: each head of q and k (and v with norm="qkv") divided by its RMS, q's and k's
    multiplied by weight [2, D], then q and k of the last cos.shape[0] tokens rotated (`apply_rope`); in the
    tables' dtype, rounded once; into qkv itself with in_place. Differentiable (the op's backward)."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    x = qkv.unflatten(2, (3, num_heads, D)).to(cos.dtype)                       # (B, N, 3, H, D)

    def rms(t: Tensor) -> Tensor:
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + eps)

    q, k = (apply_rope((rms(x[:, :, i]) * weight[i].to(cos.dtype)).transpose(1, 2), cos, sin).transpose(1, 2)
            for i in (0, 1))
    v = rms(x[:, :, 2]) if norm == "qkv" else x[:, :, 2]
    out = torch.stack([q, k, v], dim=2).flatten(2).to(qkv.dtype)
    return qkv.copy_(out) if in_place else out


def torch_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                 residual: Tensor | None = None, scale: Tensor | None = None, preact: Tensor | None = None) -> Tensor:
    """F.linear (the bias in the GEMM), the activation, then scale and residual in place on the fresh output.
    preact: a contiguous [..., N] buffer the GEMM writes z = x Wᵀ + b into (training keeps it); y is then a
    new tensor."""
    if preact is None:
        y = activate(F.linear(x, weight, bias), activation)
    else:
        x2, z2 = x.reshape(-1, x.shape[-1]), preact.view(-1, weight.shape[0])
        if bias is not None:
            torch.addmm(bias, x2, weight.t(), out=z2)
        else:
            torch.mm(x2, weight.t(), out=z2)
        y = activate(preact, activation) if activation is not None else preact.clone()
    if scale is not None:
        y = y.mul_(scale)
    return y if residual is None else y.add_(residual)


def torch_patch_embed(images: Tensor, weight: Tensor, bias: Tensor | None, prefix_tokens: Tensor | None = None,
                      pos_embed: Tensor | None = None, mean: Tensor | None = None,
                      std: Tensor | None = None, pos_embed_prefix: bool = True) -> Tensor:
    """`patch_embed` with the patchify projection as F.conv2d (stride = kernel = P)."""
    x = normalize_images(images, mean, std, weight.dtype)
    x = F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)   # (B, N, D)
    return add_prefix_and_pos(x, prefix_tokens, pos_embed, pos_embed_prefix)


def resample_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                       num_prefix_tokens: int = 1, antialias: bool = True) -> Tensor:
    """Resize the grid part of pos_embed [1, prefix + gh·gw, D] to `new_grid`, bicubic; the prefix
    (CLS) rows are kept as they are. antialias=True is timm's `resample_abs_pos_embed`;
    antialias=False is HF ViT's `interpolate_pos_encoding` (they differ: torch's antialiased
    bicubic is PIL's filter, a = -0.5, the plain one uses a = -0.75)."""
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed holds {n} grid positions, not a square grid; pass old_grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = pos_embed.shape[-1]
    work_dtype = torch.float64 if pos_embed.dtype == torch.float64 else torch.float32
    grid = grid.to(work_dtype).reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)    # (1, D, gh, gw)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# --------------------------------------------------------------------------------------------
# The reference model (timm's module tree and state_dict keys)
# --------------------------------------------------------------------------------------------
def naflex_position_table(table: Tensor, spatial_shapes: Tensor, length: int) -> Tensor:
    """SigLIP 2's position embeddings for a NaFlex batch: the square table [G·G, D] resized to each image's
    patch grid (rows, columns) = spatial_shapes[b] ([B, 2] integers) by `F.interpolate(mode="bilinear",
    align_corners=False, antialias=True)`, its rows in raster order, then padded to `length` with the image's
    first row, as HF's `Siglip2VisionEmbeddings.resize_positional_embeddings` -> [B, length, D] in the table's
    dtype. The resize is linear: each output row is the table weighted by the product of its row's and its
    column's filter weights (the triangle filter widened by the downscale factor, normalised), computed for
    the whole batch at once in float32 (float64 for a float64 table): no per-image loop and no host
    synchronisation, so a CUDA graph captures it with the spatial shapes as data."""
    grid = int(round(table.shape[0] ** 0.5))
    dtype = torch.float64 if table.dtype == torch.float64 else torch.float32
    sizes = spatial_shapes.to(device=table.device, dtype=dtype)                          # (B, 2) rows, columns
    pos = torch.arange(length, device=table.device, dtype=dtype)                         # (N,)
    row = torch.div(pos, sizes[:, 1:], rounding_mode="floor")                            # (B, N)
    col = pos - row * sizes[:, 1:]
    inside = pos < sizes.prod(-1, keepdim=True)                          # padding rows take position (0, 0)
    source = torch.arange(grid, device=table.device, dtype=dtype)

    def weights(out: Tensor, size: Tensor) -> Tensor:                    # out (B, N), size (B, 1) -> (B, N, G)
        scale = grid / size
        center = (out * inside + 0.5) * scale - 0.5
        w = (1 - (source - center[..., None]).abs() / scale.clamp(min=1)[..., None]).clamp(min=0)
        return w / w.sum(-1, keepdim=True)

    w = (weights(row, sizes[:, :1])[..., :, None] * weights(col, sizes[:, 1:])[..., None, :]).flatten(-2)
    return (w @ table.to(dtype)).to(table.dtype)                                        # (B, N, D)


def idefics3_position_ids(mask: Tensor, side: int) -> Tensor:
    """Idefics3's (and SmolVLM's) position of each patch in its `side` x `side` table: an image's valid region,
    mask [B, h, w] (True for the patches of the image, top-left; h, w the padded batch's grid), is spread over the
    whole table, row i of n valid rows at bucket(i / n) of the table's rows (and columns alike); padding patches
    take position 0. The arithmetic is HF's own, vectorised (fp32 coordinates, `torch.bucketize` on the same
    boundaries): the same ids on the same device, with no host synchronisation. -> [B, h·w] int64."""
    B, h, w = mask.shape
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=mask.device)

    def buckets(count: Tensor, n: int) -> Tensor:                       # count (B,) valid rows -> (B, n)
        coords = torch.arange(n, device=mask.device, dtype=torch.float32)[None, :] * (1.0 / count)[:, None]
        return torch.bucketize(coords.clamp(max=1.0 - 1e-6), boundaries, right=True)

    ids = buckets(mask[:, :, 0].sum(1), h)[:, :, None] * side + buckets(mask[:, 0, :].sum(1), w)[:, None, :]
    return torch.where(mask.reshape(B, -1), ids.reshape(B, -1), 0)


def qwen_patch_layout(grid_thw: list[tuple[int, int, int]], merge: int) -> tuple[Tensor, Tensor]:
    """Where each patch of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL packed sequence sits, for images (and videos)
    of (frames t, patch rows h, patch columns w) each: HF's processor lays each frame's patches out in
    merge x merge blocks (blocks row-major, each block's patches row-major), frame after frame, image after
    image. -> (positions [T, 2] int64: each patch's (row, column) in its frame, as HF's
    `get_vision_position_ids`; cu_seqlens [S + 1] int32: one attention segment per frame), on the CPU."""
    rows, cols, lengths = [], [], []
    for t, h, w in grid_thw:
        r = torch.arange(h).view(h // merge, 1, merge, 1).expand(h // merge, w // merge, merge, merge)
        c = torch.arange(w).view(1, w // merge, 1, merge).expand(h // merge, w // merge, merge, merge)
        rows.append(r.flatten().repeat(t))
        cols.append(c.flatten().repeat(t))
        lengths += [h * w] * t
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return torch.stack([torch.cat(rows), torch.cat(cols)], dim=-1), cu


def qwen_window_layout(grid_thw: list[tuple[int, int, int]], merge: int, window: int) -> tuple[Tensor, Tensor]:
    """Qwen2.5-VL's window attention: each frame's merge x merge blocks grouped into windows of window x window
    blocks (the last row and column of windows cut at the frame's edge), as HF's `get_vision_window_index`.
    -> (order [T / merge²] int64: the blocks window after window, each window's blocks row-major; cu_seqlens
    [W + 1] int32 of the windows over the reordered tokens, empty windows left out), on the CPU."""
    order, lengths, start = [], [], 0
    for t, h, w in grid_thw:
        bh, bw = h // merge, w // merge
        nh, nw = -(-bh // window), -(-bw // window)
        index = F.pad(torch.arange(t * bh * bw).view(t, bh, bw), (0, nw * window - bw, 0, nh * window - bh),
                      value=-1)
        index = index.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, window * window)
        counts = (index >= 0).sum(-1).flatten()
        order.append(index[index >= 0] + start)
        lengths += [int(n) * merge * merge for n in counts if n > 0]
        start += t * bh * bw
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return torch.cat(order), cu


def pixtral_patch_layout(sizes: list[tuple[int, int]], patch: int) -> tuple[Tensor, Tensor]:
    """Pixtral's packing of a padded image batch [n, C, H, W]: image i is the top-left sizes[i] = (height, width)
    pixels of its slot and gives its (height // patch) x (width // patch) patches row by row, image after image,
    as HF's PixtralVisionModel orders them. -> (where [T, 3] int64: each token's (image, patch row, patch column);
    its RoPE position is where[:, 1:]; cu_seqlens [n + 1] int32: one attention segment per image), on the CPU."""
    where, lengths = [], []
    for i, (height, width) in enumerate(sizes):
        h, w = height // patch, width // patch
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        where.append(torch.stack([torch.full((h * w,), i), rows.flatten(), cols.flatten()], dim=-1))
        lengths.append(h * w)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int64).cumsum(0)
    return torch.cat(where), cu


def qwen_rope_tables(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype = torch.float32, *,
                     pairs: bool = False) -> tuple[Tensor, Tensor]:
    """The axial 2D RoPE tables of the Qwen-VL, GLM-4V, Pixtral, MoonViT and SAM 3 vision towers for patches at
    positions [T, 2] (row, column; SAM 3's (x, y)): HF's angles, position (fp32) x inverse frequency, the first
    axis's then the second's, so that pair j of the rotate-half layout (columns j and D/2 + j) turns by angle j ->
    (cos, sin) [T, D / 2] in `dtype` (for `ops.rope_qkv`). inv_freq: [D / 4], one set for both axes (Qwen), or [2, D
    / 4], the row's and the column's (Pixtral: the even and the odd ones of a 1D RoPE's D / 2). pairs=True
    interleaves the two axes frequency by frequency instead (MoonViT, Kimi K2.5's tower, with positions given as
    (column, row))."""
    angles = positions[..., None].float() * inv_freq.float().to(positions.device)
    angles = (angles.transpose(1, 2) if pairs else angles).flatten(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def vjepa2_rope(n: int, grid: int, head_dim: int, dtype: torch.dtype = torch.float32, device=None
                ) -> tuple[Tensor, Tensor]:
    """V-JEPA 2's RoPE as cos, sin [n, head_dim] for tokens 0..n-1 (frame = n // grid², row, column on a grid of `grid`
    columns), as tables of head_dim columns for `ops.rope_qkv` (an angle per element) in the rotate-half order
    (column i: the head's element 2i, column head_dim/2 + i: element 2i + 1; q's and k's rows reordered so). HF's
    element e of section k (e // s, s = 2·⌊head_dim/6⌋; k = 3 is the unrotated rest) turns by position_k · ω[(e mod
    s) mod s/2], ω[j] = 10000^(−j / (s/2)), in `dtype` (HF computes the angles in the model's dtype)."""
    s = 2 * ((head_dim // 3) // 2)
    ids = torch.arange(n, device=device)
    frame, rest = ids // (grid * grid), ids % (grid * grid)
    pos = torch.stack([frame, rest // grid, rest % grid, torch.zeros_like(ids)], dim=1).to(dtype)     # (n, 4)
    omega = 1.0 / 10000 ** (torch.arange(s // 2, device=device, dtype=dtype) / (s / 2))
    element = torch.arange(head_dim, device=device)
    section = torch.clamp(element // s, max=3)
    angles = pos[:, section] * torch.where(section < 3, omega[(element % s) % (s // 2)], 0.0)       # (n, head_dim)
    order = torch.cat([torch.arange(0, head_dim, 2, device=device), torch.arange(1, head_dim, 2, device=device)])
    angles = angles[:, order]
    return angles.cos(), angles.sin()


def weighted_rows(table: Tensor, taps: Tensor, weights: Tensor) -> Tensor:
    """Σ_k weights[:, k] · table[taps[:, k]]: taps [T, K] rows of table [R, D] blended by weights [T, K] in the
    weights' dtype (Qwen3-VL's interpolated position embeddings, as HF computes them) -> [T, D]."""
    return (table[taps].to(weights.dtype) * weights[..., None]).sum(1)


def qwen3_position_taps(grid_thw: list[tuple[int, int, int]], merge: int, side: int) -> tuple[Tensor, Tensor]:
    """Qwen3-VL's learned position table (side x side rows) resized to each frame's patch grid by
    `F.interpolate(mode="bilinear", align_corners=True)`, as the 4 table rows each patch reads and their weights
    (HF's `get_vision_interpolation_indices_and_weights`), in `qwen_patch_layout`'s order: `position_taps`."""
    return position_taps(grid_thw, merge, side, "bilinear", align_corners=True)


def position_taps(grid_thw: list[tuple[int, int, int]], merge: int, side: int, mode: str = "bilinear",
                  align_corners: bool = False) -> tuple[Tensor, Tensor]:
    """A learned side x side position table resized to each frame's patch grid by `F.interpolate(mode=mode,
    align_corners=align_corners)` (the edge rows repeated past the border), as the table rows each patch reads and
    their weights: 2 x 2 for "bilinear", 4 x 4 for "bicubic" (Keys' kernel, a = -0.75), with HF's fp32 arithmetic
    (`get_vision_interpolation_indices_and_weights`), in `qwen_patch_layout`'s order (merge 1: row-major).
    -> (indices [T, K] int64, weights [T, K] float32), on the CPU: the patch's embedding is
    Σ_k weights[:, k] · table[indices[:, k]] (`weighted_rows`)."""
    if mode not in ("bilinear", "bicubic"):
        raise ValueError(f"mode: expected 'bilinear' or 'bicubic', got {mode!r}")
    pos, _ = qwen_patch_layout(grid_thw, merge)
    sizes = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grid_thw])
    taps, weights = [], []
    offsets = torch.arange(2) if mode == "bilinear" else torch.arange(-1, 3)
    for axis in (0, 1):
        index = pos[:, axis].float()
        if align_corners:
            src = index * (side - 1) / (sizes[:, axis] - 1).clamp(min=1)
        else:
            src = (index + 0.5) * side / sizes[:, axis] - 0.5
        floor = src.floor()
        taps.append((floor.long()[:, None] + offsets).clamp(0, side - 1))
        d = (src[:, None] - floor[:, None] - offsets).abs()
        if mode == "bilinear":
            weights.append((1 - d).clamp(min=0))
        else:
            a = -0.75
            near = ((a + 2) * d - (a + 3)) * d * d + 1
            far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
            weights.append(torch.where(d <= 1, near, far))
    n = offsets.numel()
    indices = (taps[0][:, :, None] * side + taps[1][:, None, :]).reshape(-1, n * n)
    return indices, (weights[0][:, :, None] * weights[1][:, None, :]).reshape(-1, n * n)


def temporal_pool_layout(grid_thw: list[tuple[int, int, int]], kernel: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """MoonViT's (Kimi K2.5's) merger input: each kh x kw block of a frame's row-major patches is one merged token,
    its patches the token's kh · kw slots (row-major), each slot the mean over the clip's frames. -> (destination
    [T] int64: the slot merged_token · kh · kw + position each patch adds into, weight [T] float32: 1 / frames of its
    clip), on the CPU."""
    kh, kw = kernel
    dest, weight, merged = [], [], 0
    for t, h, w in grid_thw:
        nh, nw = h // kh, w // kw
        slot = ((torch.arange(nh)[:, None, None, None] * nw + torch.arange(nw)[None, None, :, None]) * kh * kw
                + torch.arange(kh)[None, :, None, None] * kw + torch.arange(kw)[None, None, None, :])  # nh, kh, nw, kw
        dest.append((slot + merged * kh * kw).flatten().repeat(t))
        weight.append(torch.full((t * h * w,), 1.0 / t))
        merged += nh * nw
    return torch.cat(dest), torch.cat(weight)


def gemma4_position_embeddings(table: Tensor, positions: Tensor) -> Tensor:
    """Gemma 4's factored 2D position embeddings: table [2, S, D] (an x table and a y table), positions [B, N, 2]
    (x, y) integers with (-1, -1) for padding -> table[0][x] + table[1][y], zeros at padding, [B, N, D] in the
    table's dtype (HF's `Gemma4VisionPatchEmbedder._position_embeddings`)."""
    clamped = positions.clamp(min=0)
    emb = F.embedding(clamped[..., 0], table[0]) + F.embedding(clamped[..., 1], table[1])
    return torch.where((positions == -1).all(dim=-1)[..., None], 0.0, emb)


def gemma4_blocks(positions: Tensor, k: int) -> Tensor:
    """Which output of Gemma 4's pooler each patch at positions [B, N, 2] (x, y; -1 for padding, counted as (0, 0))
    goes to: its k x k block (x // k, y // k) at x // k + (width // k) · (y // k), width the image's largest x + 1
    (HF's `Gemma4VisionPooler._avg_pool_by_positions`) -> [B, N] int64."""
    clamped = positions.clamp(min=0)
    width = clamped[..., 0].max(dim=-1, keepdim=True)[0] + 1
    block = torch.div(clamped, k, rounding_mode="floor")
    return (block[..., 0] + (width // k) * block[..., 1]).long()


def gemma4_pool(hidden: Tensor, positions: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Gemma 4's spatial pooling of the tower's tokens hidden [B, N, D] (padding rows zeroed) at positions
    [B, N, 2] into `length` outputs: the mean of each k x k block of patches (`gemma4_blocks`), k = √(N / length),
    as HF's `Gemma4VisionPooler._avg_pool_by_positions` computes it (a one-hot weight matrix, the product in
    float32, rounded to hidden's dtype) -> (pooled [B, length, D], mask [B, length]: True where a block holds a
    patch)."""
    k = int((hidden.shape[1] // length) ** 0.5)
    weights = F.one_hot(gemma4_blocks(positions, k), length).float() / (k * k)           # (B, N, length)
    pooled = weights.transpose(1, 2) @ hidden.float()
    return pooled.to(hidden.dtype), (weights != 0).any(dim=1)


def glm_position_grid(grid_thw: list[tuple[int, int, int]], merge: int) -> Tensor:
    """GLM-4V's learned position table resized to each frame's patch grid by `F.grid_sample(mode="bicubic",
    align_corners=False, padding_mode="border")`: each patch's sampling point (x, y) in [-1, 1], the centre of its
    column and row in the frame's grid, in `qwen_patch_layout`'s order, with HF's float32 arithmetic
    (`Glm4vVisionEmbeddings`). -> [T, 2] float32, on the CPU: the patch's embedding is the table, as an image
    [1, C, side, side], sampled there. A frame of a video takes its video's grid (HF's VLM passes each frame as an
    image of its own)."""
    pos, _ = qwen_patch_layout(grid_thw, merge)
    sizes = torch.cat([torch.tensor([[h, w]], dtype=torch.float32).expand(t * h * w, 2) for t, h, w in grid_thw])
    return ((pos.flip(-1) + 0.5) / sizes.flip(-1)) * 2 - 1


def to_2tuple(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def check_image_size(x: Tensor, in_chans: int, patch_size: tuple[int, int],
                     img_size: tuple[int, int] | None = None) -> None:
    """Clear errors for images the model cannot take (names the sizes). With `img_size` (a fixed-size
    model) the images must have that size, as in timm (whose patchify convolution then drops what whole
    patches do not cover); without it (dynamic size) H and W must be multiples of the patch size."""
    if x.dim() != 4:
        raise ValueError(f"images: expected a 4-D tensor [B, C, H, W], got shape {tuple(x.shape)}")
    _, C, H, W = x.shape
    if C != in_chans:
        raise ValueError(f"images: expected {in_chans} channels, got {C} (shape {tuple(x.shape)})")
    if img_size is not None:
        if (H, W) != tuple(img_size):
            raise ValueError(f"images: the model was built for {img_size[0]}x{img_size[1]} images, got {H}x{W}; "
                             f"pass dynamic_img_size=True to resample the position embedding")
    elif H % patch_size[0] or W % patch_size[1]:
        raise ValueError(f"images: height and width must be divisible by the patch size {patch_size}, "
                         f"got {H}x{W}")


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
        super().__init__()
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = nn.Identity()       # timm's embed_norm_layer (AIMv2's RMSNorm): on the patch tokens, before the
        #                                 position table is added

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))    # (B, N, D)


class LayerNorm(nn.LayerNorm):
    fused = False               # True: F.layer_norm

    def forward(self, x: Tensor) -> Tensor:
        return (torch_layer_norm if self.fused else layer_norm)(x, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm with a weight (HF's Qwen2RMSNorm, Qwen2.5-VL's vision tower): x · rsqrt(mean(x²) + eps) · weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def _inner_norm(layer: type, dim: int, eps: float | None) -> nn.Module:
    """A LayerNorm inside an attention or MLP (timm's scale_attn_norm / scale_mlp_norm), or nn.Identity."""
    return nn.Identity() if eps is None else layer(dim, eps=eps)


class Attention(nn.Module):
    """timm's Attention. `fused_attn` (as in timm): False = the plain softmax math above (the
    default, the ground truth); True = F.scaled_dot_product_attention, the path timm takes by default.
    norm_eps: a LayerNorm with that eps on the attention's output before proj (timm's scale_norm; EVA-CLIP's
    inner norm), else none."""

    norm_layer = LayerNorm

    def __init__(self, dim, num_heads, qkv_bias=True, proj_bias=True, fused_attn=False, norm_eps=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = _inner_norm(self.norm_layer, dim, norm_eps)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [B, N, C] -> [B, N, C]; rope: (cos, sin) tables rotating q and k of the last tokens (rope_qkv)."""
        qkv = self.qkv(x)                                                          # (B, N, 3C)
        if rope is not None:
            qkv = rope_qkv(qkv, self.num_heads, *rope)
        attend = torch_attention_qkv if self.fused_attn else attention_qkv
        return self.proj(self.norm(attend(qkv, self.num_heads, self.scale)))      # (B, N, C)


class Mlp(nn.Module):
    """fc2(act(fc1(x))); norm_eps: a LayerNorm with that eps on the hidden features before fc2 (timm's
    scale_mlp_norm; EVA-02's), else none."""

    norm_layer = LayerNorm

    def __init__(self, in_features, hidden_features, act="gelu", norm_eps=None, bias=True):
        super().__init__()
        if act not in ACTIVATIONS[1:]:
            raise ValueError(f"act must be one of {ACTIVATIONS[1:]}, got {act!r}")
        self.act = act
        self.fused = False      # True: torch_linear (F.linear, F.gelu)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.norm = _inner_norm(self.norm_layer, hidden_features, norm_eps)
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        lin = torch_linear if self.fused else linear
        h = self.norm(lin(x, self.fc1.weight, self.fc1.bias, activation=self.act))
        return lin(h, self.fc2.weight, self.fc2.bias)


def swiglu(h: Tensor) -> Tensor:
    """SwiGLU's gating: h [..., 2·H] = [gate | up] -> silu(gate) · up [..., H] (timm's SwiGLUPacked order)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_clamped(h: Tensor, limit: float) -> Tensor:
    """SwiGLU with GLM-5-Next's clamps: h [..., 2·H] = [gate | up] -> silu(min(gate, limit)) · clamp(up, ±limit)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


def gated(h: Tensor, activation: str) -> Tensor:
    """A gated MLP's gating: h [..., 2·H] = [gate | up] -> act(gate) · up [..., H]; activation "swiglu" (SiLU) or
    "geglu_tanh" (the tanh GELU: Gemma 4's vision MLP)."""
    if activation == "swiglu":
        return swiglu(h)
    if activation != "geglu_tanh":
        raise ValueError(f"activation must be 'swiglu' or 'geglu_tanh', got {activation!r}")
    gate, up = h.chunk(2, dim=-1)
    return gelu(gate, approximate="tanh") * up


class GluMlp(nn.Module):
    """timm's GluMlp as its SwiGLUPacked builds it (SiLU, the gate on the first half), DINOv2-giant's MLP:
    fc1 [hidden, C] gives [gate | up] (hidden / 2 features each), then fc2(silu(gate) · up) with fc2
    [C, hidden / 2]. Hugging Face's Dinov2SwiGLUFFN holds the same (its gate_proj and up_proj, or its
    weights_in, are the two halves of fc1). norm_eps: a LayerNorm on the gated features before fc2 (EVA-02's)."""

    norm_layer = LayerNorm

    def __init__(self, in_features, hidden_features, norm_eps=None, bias=True):
        super().__init__()
        if hidden_features % 2:
            raise ValueError(f"hidden_features: expected an even width (gate and up halves), got {hidden_features}")
        self.fused = False      # True: torch_linear (F.linear)
        self.gate_last, self.chunk_dim = False, -1       # timm's attributes: silu(first half) * second half
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.SiLU()                             # timm's tree; `swiglu` applies it
        self.norm = _inner_norm(self.norm_layer, hidden_features // 2, norm_eps)
        self.fc2 = nn.Linear(hidden_features // 2, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        lin = torch_linear if self.fused else linear
        return lin(self.norm(swiglu(lin(x, self.fc1.weight, self.fc1.bias))), self.fc2.weight, self.fc2.bias)


class LayerScale(nn.Module):
    """timm's LayerScale: a learned per-channel gain `gamma` [dim] (DINOv2, DeiT-III)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def layer_scale(ls: nn.Module) -> Tensor | None:
    """The gamma of a LayerScale module, None for nn.Identity (no layer-scale). Read from the module's
    parameters first: getattr of a missing name on a module raises and catches an AttributeError, a few µs
    on each of the forward's blocks."""
    gamma = ls._parameters.get("gamma")
    if gamma is not None or isinstance(ls, nn.Identity):
        return gamma
    return getattr(ls, "gamma", None)


class Block(nn.Module):
    # The layer classes are attributes so that vitfast.layers.Block builds the same tree from its
    # own (kernel-backed) layers.
    norm_layer, rms_layer, attn_layer, mlp_layer, glu_layer = LayerNorm, RMSNorm, Attention, Mlp, GluMlp

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_bias=True, act="gelu", eps=1e-6,
                 init_values=None, mlp="mlp", scale_attn_norm=False, scale_mlp_norm=False, norm="layernorm"):
        """proj_bias: biases on attn.proj and the MLP's linears (timm's Block passes it to both); norm
        "layernorm" or "rmsnorm" (AIMv2's): norm1 and norm2."""
        super().__init__()
        make_norm = self.rms_layer if norm == "rmsnorm" else self.norm_layer
        self.norm1 = make_norm(dim, eps=eps)
        self.attn = self.attn_layer(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias,
                                    norm_eps=eps if scale_attn_norm else None)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = make_norm(dim, eps=eps)
        hidden, mlp_eps = int(dim * mlp_ratio), eps if scale_mlp_norm else None
        self.mlp = (self.glu_layer(dim, hidden, norm_eps=mlp_eps, bias=proj_bias) if mlp == "swiglu"
                    else self.mlp_layer(dim, hidden, act=act, norm_eps=mlp_eps, bias=proj_bias))
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


class AttentionPoolLatent(nn.Module):
    """timm's attention pooling with a latent query (`global_pool="map"`, SigLIP): one learned query
    attends over the tokens, then an MLP with a residual; keys `latent`, `q`, `kv`, `proj`, `norm`, `mlp`."""

    mlp_layer, norm_layer = Mlp, LayerNorm

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, act: str = "gelu", eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = False     # True: SDPA (see VisionTransformer.use_torch_ops)
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = self.norm_layer(dim, eps=eps)
        self.mlp = self.mlp_layer(dim, int(dim * mlp_ratio), act=act)

    def attend(self, x: Tensor) -> Tensor:
        """tokens x [B, N, D] -> the latent query's attention output [B, 1, D] (before proj)."""
        B, N, D = x.shape
        q = linear(self.latent.expand(B, -1, -1), self.q.weight, self.q.bias)              # (B, 1, D)
        q = q.reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)                  # (B, H, 1, Dh)
        kv = linear(x, self.kv.weight, self.kv.bias)                                        # (B, N, 2D)
        k, v = kv.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)    # (B, H, N, Dh) each
        attend = torch_attention if self.fused_attn else attention
        return attend(q, k, v, self.scale).transpose(1, 2).reshape(B, 1, D)

    def forward(self, x: Tensor) -> Tensor:
        """tokens x [B, N, D] -> pooled [B, D]."""
        y = linear(self.attend(x), self.proj.weight, self.proj.bias)                        # (B, 1, D)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


class VisionTransformer(nn.Module):
    """Eager reference ViT with timm's constructor kwargs and state_dict keys.

    images [B, in_chans, H, W] -> logits [B, num_classes] (or pooled features if num_classes=0).
    Images of another size than `img_size` need `dynamic_img_size=True` (the position embedding
    is then resampled bicubically, like timm). As in timm, a size that is not a multiple of the
    patch size drops the last rows / columns of pixels (the patchify convolution's floor).

    timm's kwargs beyond the original ViT: init_values (layer-scale), reg_tokens (register tokens),
    no_embed_class (position rows for the patches only), pre_norm (a LayerNorm before the blocks,
    patch embedding without bias: CLIP), final_norm, fc_norm, global_pool "map" (attention pooling
    with a latent query: SigLIP), act_layer "gelu" / "gelu_tanh" / "quick_gelu", norm_eps, and
    mlp_layer "swiglu" (timm's SwiGLUPacked, DINOv2-giant: fc1 to int(embed_dim · mlp_ratio) features, the
    gate and up halves, SiLU; act_layer then applies to an attention-pooling head's MLP only), and pos_embed
    "none" (no position table). rope="dinov3" (with rope_temperature) rotates q and k of the patch tokens in
    every attention by DINOv3's rotary position embedding (`dinov3_rope`, made for each image's patch grid;
    rope_rounding "hf" or "timm": the rounding of Hugging Face's model or of timm's). scale_attn_norm /
    scale_mlp_norm: timm's LayerNorms inside the attention (on its output, before proj) and the MLP (on the
    hidden features, before fc2), as EVA-02 and EVA-CLIP have them. rope="timm" takes its tables from timm's
    RotaryEmbeddingCat module set as `rope_embed` (EVA-02's; `vitfast.optimize` of timm's Eva does it).
    attn_pool_num_heads / attn_pool_mlp_ratio (timm's Eva's): the attention-pooling head's own head count and MLP
    ratio (None: the blocks'; Perception Encoder's head has 8 heads whatever the width). pool_include_prefix
    (timm's): the "map" and "avg" pooling over the class and register tokens too (timm's Eva: its "map" pooling).
    norm "rmsnorm" (AIMv2's; default "layernorm"): RMSNorms (a weight, no bias) wherever the model has a
    LayerNorm of its own (the blocks' norm1 / norm2, norm_pre, the final norm or fc_norm, the pooling head's norm);
    embed_norm (timm's embed_norm_layer): one more on the patch tokens before the position table is added;
    proj_bias=False (timm's): no bias on the attention's proj and the MLPs' linears.
    """

    # Layer classes: vitfast.model.VisionTransformer swaps in the kernel-backed ones.
    embed_layer, block_layer, norm_layer, rms_layer, pool_layer = PatchEmbed, Block, LayerNorm, RMSNorm, \
        AttentionPoolLatent

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token",
                 fc_norm=None, dynamic_img_size=False, act_layer="gelu", norm_eps=1e-6, init_values=None,
                 reg_tokens=0, no_embed_class=False, pre_norm=False, final_norm=True, mlp_layer="mlp",
                 pos_embed="learn", rope=None, rope_temperature=100.0, rope_rounding="hf", scale_attn_norm=False,
                 scale_mlp_norm=False, attn_pool_num_heads=None, attn_pool_mlp_ratio=None, pool_include_prefix=False,
                 norm="layernorm", embed_norm=False, proj_bias=True):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if pos_embed not in ("learn", "none"):
            raise ValueError(f"pos_embed must be 'learn' or 'none', got {pos_embed!r}")
        if rope not in ROPE_TYPES:
            raise ValueError(f"rope must be one of {ROPE_TYPES}, got {rope!r}")
        if rope_rounding not in ROPE_ROUNDINGS:
            raise ValueError(f"rope_rounding must be one of {ROPE_ROUNDINGS}, got {rope_rounding!r}")
        if rope is not None and (embed_dim // num_heads) % 4:
            raise ValueError(f"rope={rope!r}: needs a head dim (embed_dim / num_heads) divisible by 4, got "
                             f"{embed_dim} / {num_heads}")
        if mlp_layer not in MLP_LAYERS:
            raise ValueError(f"mlp_layer must be one of {MLP_LAYERS}, got {mlp_layer!r}")
        if global_pool not in ("token", "avg", "map", ""):
            raise ValueError(f"global_pool must be 'token', 'avg', 'map' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if attn_pool_num_heads is not None and (attn_pool_num_heads < 1 or embed_dim % attn_pool_num_heads):
            raise ValueError(f"attn_pool_num_heads: expected a divisor of embed_dim ({embed_dim}), "
                             f"got {attn_pool_num_heads}")
        if act_layer not in ACTIVATIONS[1:]:
            raise ValueError(f"act_layer must be one of {ACTIVATIONS[1:]}, got {act_layer!r}")
        if not isinstance(reg_tokens, int) or reg_tokens < 0:
            raise ValueError(f"reg_tokens must be an int >= 0, got {reg_tokens!r}")
        self.num_classes, self.global_pool, self.in_chans = num_classes, global_pool, in_chans
        self.embed_dim = self.num_features = embed_dim
        self.num_reg_tokens, self.no_embed_class = reg_tokens, no_embed_class
        self.has_class_token = class_token
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.dynamic_img_size, self.pool_include_prefix = dynamic_img_size, bool(pool_include_prefix)
        self.rope_type, self.rope_temperature, self.rope_rounding = rope, float(rope_temperature), rope_rounding
        self.fused = False      # see use_torch_ops
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm   # timm's rule

        make_norm = self.rms_layer if norm == "rmsnorm" else self.norm_layer
        self.patch_embed = self.embed_layer(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        if embed_norm:
            self.patch_embed.norm = make_norm(embed_dim, eps=norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        self._init_extra_tokens(embed_dim)
        embed_len = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02) if pos_embed == "learn" else None
        self.norm_pre = make_norm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[
            self.block_layer(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, act=act_layer,
                             eps=norm_eps, init_values=init_values, mlp=mlp_layer, scale_attn_norm=scale_attn_norm,
                             scale_mlp_norm=scale_mlp_norm, norm=norm)
            for _ in range(depth)])
        self.norm = make_norm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = (self.pool_layer(embed_dim, attn_pool_num_heads or num_heads,
                                          mlp_ratio if attn_pool_mlp_ratio is None else attn_pool_mlp_ratio,
                                          act=act_layer, eps=norm_eps)
                          if global_pool == "map" else None)
        if self.attn_pool is not None and norm == "rmsnorm":
            self.attn_pool.norm = make_norm(embed_dim, eps=norm_eps)
        self.fc_norm = make_norm(embed_dim, eps=norm_eps) if final_norm and use_fc_norm else nn.Identity()
        self._init_heads(embed_dim, num_classes)
        init_weights(self)

    def _init_extra_tokens(self, embed_dim: int) -> None:
        """Prefix tokens after the class and register tokens (VisionTransformerDistilled's)."""

    def _init_heads(self, embed_dim: int, num_classes: int) -> None:
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def prefix_tokens(self) -> Tensor | None:
        """The prefix tokens in timm's order, [1, NP, D] (class, registers), or None."""
        tokens = [t for t in (self.cls_token, self.reg_token) if t is not None]
        return None if not tokens else tokens[0] if len(tokens) == 1 else torch.cat(tokens, dim=1)

    @property
    def pos_embed_prefix(self) -> int:
        """How many rows of pos_embed belong to prefix tokens (0 with no_embed_class)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    def _pos_embed_for(self, H: int, W: int) -> Tensor | None:
        if self.pos_embed is None:
            return None
        P = self.patch_embed.patch_size
        grid = (H // P[0], W // P[1])
        return resample_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, self.pos_embed_prefix)

    def forward_features(self, x: Tensor) -> Tensor:
        """images [B, C, H, W] -> tokens [B, T, D] after the final norm."""
        pe = self.patch_embed
        check_image_size(x, self.in_chans, pe.patch_size, None if self.dynamic_img_size else pe.img_size)
        x = crop_to_patches(x, pe.patch_size)
        w, rope = pe.proj.weight, self.rope_for(x)
        embed = torch_patch_embed if self.fused else patch_embed
        prefix, pos = self.prefix_tokens(), self._pos_embed_for(*x.shape[-2:])
        if isinstance(pe.norm, nn.Identity):
            x = embed(x.to(w.dtype), w, pe.proj.bias, prefix, pos, None, None, not self.no_embed_class)
        else:                                       # embed_norm: the patches normed before the position table
            x = pe.norm(embed(x.to(w.dtype), w, pe.proj.bias, None, None, None, None))
            x = add_prefix_and_pos(x, prefix, pos, not self.no_embed_class)
        x = self.norm_pre(x)
        for blk in self.blocks:
            x = blk(x, rope=rope)
        return self.norm(x)

    def rope_for(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """The RoPE tables (cos, sin) for the patch grid of `images` [B, C, H, W], or None without RoPE; in
        float64 for a float64 model, else float32."""
        if self.rope_type is None:
            return None
        P, w = self.patch_embed.patch_size, self.patch_embed.proj.weight
        grid = (images.shape[-2] // P[0], images.shape[-1] // P[1])
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        if self.rope_type == "timm":
            embed = getattr(self, "rope_embed", None)
            if embed is None:
                raise ValueError("rope='timm': the tables come from timm's RotaryEmbeddingCat as `model.rope_embed` "
                                 "(vitfast.optimize of a timm Eva sets it); this model has none")
            return timm_rope_tables(embed, grid, self.dynamic_img_size, dtype)
        return dinov3_rope(grid, self.embed_dim // self.blocks[0].attn.num_heads, self.rope_temperature, dtype,
                           w.device, self.rope_rounding)

    def use_torch_ops(self, on: bool = True) -> VisionTransformer:
        """Run on torch's fused ops (F.conv2d patchify, F.layer_norm, SDPA, F.linear + F.gelu) instead of
        the plain math: the model a user of eager PyTorch runs (timm's own forward), the `torch`
        baseline of `vitfast bench`. Off (the default) is the ground truth."""
        self.fused = on
        for m in self.modules():
            if isinstance(m, (Attention, AttentionPoolLatent)):
                m.fused_attn = on
            elif isinstance(m, (LayerNorm, Mlp, GluMlp)):
                m.fused = on
        return self

    def pool(self, x: Tensor) -> Tensor:
        tokens = x if self.pool_include_prefix else x[:, self.num_prefix_tokens:]
        if self.attn_pool is not None:
            return self.attn_pool(tokens)
        if self.global_pool == "avg":
            return tokens.mean(dim=1)
        if self.global_pool == "token":
            return x[:, 0]
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.fc_norm(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class Distilled:
    """What timm's DeiT with distillation (`VisionTransformerDistilled`) adds to a ViT: a distillation
    token after the class token (`dist_token`, with its own position row) and a second head
    (`head_dist`); in eval the logits are the mean of the two heads, the pre-logits features the mean of
    the two tokens. A mixin, put before the ViT class (the reference's or vitfast's)."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("global_pool", "token") != "token" or not kwargs.get("class_token", True):
            raise ValueError("the distilled ViT reads its class and distillation tokens: it needs "
                             "global_pool='token' and class_token=True")
        super().__init__(*args, **kwargs)

    def _init_extra_tokens(self, embed_dim: int) -> None:
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.num_prefix_tokens += 1

    def _init_heads(self, embed_dim: int, num_classes: int) -> None:
        super()._init_heads(embed_dim, num_classes)
        self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def prefix_tokens(self) -> Tensor:
        return torch.cat([t for t in (self.cls_token, self.reg_token, self.dist_token) if t is not None], dim=1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x, x_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (x + x_dist) / 2
        return (self.head(x) + self.head_dist(x_dist)) / 2


class VisionTransformerDistilled(Distilled, VisionTransformer):
    """The reference DeiT with distillation (timm's `VisionTransformerDistilled`)."""


def crop_size(img_size, patch_size) -> tuple[int, int]:
    """The part of an image of `img_size` its patches cover (timm's patchify convolution floors)."""
    (H, W), (ph, pw) = to_2tuple(img_size), to_2tuple(patch_size)
    return H // ph * ph, W // pw * pw


def mask_patches(x: Tensor, masked: Tensor, rows: Tensor) -> Tensor:
    """Tokens x [B, NP + N, D] (prefix tokens, then N patches) with each masked patch (masked [B, N] bool) replaced by
    its row of `rows` [1 or B, N or 1, D]: the mask token, plus the patch's position row where the model adds one
    (Hugging Face's ViT, DeiT, DINOv2 / v3, I-JEPA, Sapiens2, TIPSv2 embeddings with bool_masked_pos)."""
    n = x.shape[1] - masked.shape[1]
    return torch.cat([x[:, :n], torch.where(masked[..., None], rows.to(x.dtype), x[:, n:])], dim=1)


def crop_to_patches(x: Tensor, patch_size) -> Tensor:
    """x [..., H, W] -> its top-left part that whole patches cover (a view): what a strided patchify
    convolution reads of an image whose size is not a multiple of the patch (SigLIP so400m at 384 px)."""
    H, W = crop_size(x.shape[-2:], patch_size)
    return x if (H, W) == tuple(x.shape[-2:]) else x[..., :H, :W]


def init_weights(model: nn.Module) -> None:
    """timm-like init: truncated normal (std .02) linears and position / prefix tokens, zero biases,
    unit norms; layer-scale gammas keep their init_values."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, AttentionPoolLatent):
            nn.init.trunc_normal_(m.latent, std=m.latent.shape[-1] ** -0.5)
    for name in ("pos_embed", "cls_token", "reg_token", "dist_token"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            nn.init.trunc_normal_(p, std=0.02)


def create_model(name: str, **kwargs) -> VisionTransformer:
    """Reference model by timm name (see vitfast.configs.CONFIGS)."""
    from vitfast.configs import model_class_and_config
    cls, cfg = model_class_and_config(name, **kwargs)
    return (VisionTransformerDistilled if cls == "distilled" else VisionTransformer)(**cfg)
