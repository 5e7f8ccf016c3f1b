"""GLM-4V's vision tower on vitfast: transformers' `Glm4vVisionModel` (GLM-4.1V-Thinking, GLM-4.6V),
`Glm4vMoeVisionModel` (GLM-4.5V), `GlmOcrVisionModel` (GLM-OCR) and `Glm5NextVisionModel` (GLM-5-Next), which
`vitfast.optimize` also copies their VLMs with (`Glm4vForConditionalGeneration`, `Glm4vMoeForConditionalGeneration`,
`Glm46VForConditionalGeneration`, `GlmOcrForConditionalGeneration`: the tower is their `visual`, as it is
`Glm5NextForConditionalGeneration`'s, whose language model no test builds).

The tower takes Qwen2-VL's packed input: hidden_states [T, C·t·P·P] (each patch flattened as (channel, frame, row,
column)) with grid_thw [n, 3] (frames, patch rows, patch columns per image), each frame attending within itself only
(the attention kernel's varlen form, `ops.attention_qkv` with `cu_seqlens`: one launch for the batch, no padding,
no per-image loop). The patch embedding (a Conv3d whose stride is its kernel) is one `ops.linear` over the flattened
patches, then an RMSNorm and the learned position table resampled to each image's patch grid (bicubic, HF's
`grid_sample` in float32, the sampling points made on the host once per grid). Per block: RMSNorm, the packed qkv
GEMM, the axial 2D RoPE on q and k (`ops.rope_qkv`, Qwen2-VL's tables), varlen attention, the projection with the
residual in its epilogue, RMSNorm, the gated MLP (SiLU: gate and up as the packed SwiGLU fc1, the gating in its
epilogue), down_proj with the residual in its epilogue. After the blocks: an RMSNorm, the merge x merge
downsampling Conv2d as one `ops.linear` over each block of tokens, and the merger (a projection, LayerNorm, GELU and
a gated MLP) on vitfast's GEMMs. GLM-OCR's tower has no position table and no RMSNorm after the patch embedding, biases
in its blocks' projections, and RMSNorms of each head's q and k before the RoPE (with it, one pass:
`ops.norm_rope_qkv`). GLM-5-Next's (`Glm5NextVisionModel`, the tower of Glm5NextForConditionalGeneration) is GLM-OCR's
with its gated MLPs' gate and up clamped (`swiglu_limit`): fc1's GEMM, then the clamped gating apart
(`reference.swiglu_clamped`: the linear kernel has no epilogue for it), in the blocks and the merger.

Output: HF's BaseModelOutputWithPooling: last_hidden_state the downsampled tokens [T / merge², D], pooler_output the
merger's [T / merge², D]; with output_hidden_states, the embeddings and each block's output but the last block's,
whose slot holds last_hidden_state, as HF's output capturing fills it. The layout of a batch (positions, segments,
RoPE tables, sampling points) depends only on grid_thw: it is made once per grid (one host read, as HF's) and kept,
and the CUDA graph of a forward is keyed by the token count, the segment count and the longest segment, so batches
of other images with those replay it with their layout as data. HF's tower reads a video's t frames' grids from the
rows of grid_thw by frame (its VLM passes each frame as a grid of its own); the stand-in gives every frame its
video's grid, the same numbers as that VLM's call. The stand-in holds HF's parameter tensors (an optimizer over
either model trains both). Not supported (named in the error): attention outputs, precomputed layout arguments,
hidden_act other than SiLU, blocks whose projections' biases or q / k norms differ from the first block's, a merger
with biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _build, _Findings, _mlp_ratio
from vitfast.hf_qwen import HFQwenVisionModel, _norm_eps, _PatchEmbed3d, renamed_state
from vitfast.layers import Attention, Block, JoinedLinear, LayerNorm, RMSNorm
from vitfast.reference import glm_position_grid, qwen_patch_layout, qwen_rope_tables, swiglu_clamped

# transformers class -> family
CLASSES = {"Glm4vVisionModel": "glm4v", "Glm4vMoeVisionModel": "glm4v",
           # GLM-OCR's: no position table, biases in the blocks, q / k RMSNorms per head before the RoPE
           "GlmOcrVisionModel": "glm4v",
           # GLM-5-Next's: GLM-OCR's layout, its gated MLPs' gate and up clamped (swiglu_limit)
           "Glm5NextVisionModel": "glm4v"}
# HF's key -> the tower's (each replacement applied in turn)
_RENAME = (("embeddings.position_embedding.", "pos_embed."), (".mlp.down_proj.", ".mlp.fc2."),
           ("merger.down_proj.", "merger.fc2."))


class _GlmMerger(nn.Module):
    """GLM-4V's patch merger over the downsampled tokens: proj, LayerNorm, exact GELU, then the gated MLP
    (fc1 = [gate | up] packed, SwiGLU in its epilogue; fc2 = down_proj), all GEMMs without bias."""

    swiglu_limit: float | None = None          # GLM-5-Next's clamps: the gating apart from fc1's GEMM

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.gelu(self.post_projection_norm(ops.linear(x, self.proj.weight)))
        if self.swiglu_limit is not None:
            return ops.linear(swiglu_clamped(ops.linear(h, self.fc1.weight), self.swiglu_limit), self.fc2.weight)
        return ops.linear(ops.linear(h, self.fc1.weight, activation="swiglu"), self.fc2.weight)


class _QKNormAttention(Attention):
    """vitfast's attention with GLM-OCR's RMSNorms of each head's q and k (q_norm, k_norm over the head dim) between
    the qkv GEMM and the RoPE (which the tower always gives), in the RoPE's pass (`ops.norm_rope_qkv`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, proj_bias: bool, eps: float):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim, eps=eps), RMSNorm(self.head_dim, eps=eps)

    def forward(self, x: Tensor, residual: Tensor | None = None, scale: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None, cu_seqlens: Tensor | None = None,
                max_seqlen: int | None = None, **_) -> Tensor:
        """x [1, T, C] (packed segments, `Attention`) -> proj(attention(rope(norm(qkv(x))))) (+ residual)."""
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias)
        qkv = ops.norm_rope_qkv(qkv, self.num_heads, self.q_norm.weight, self.k_norm.weight, *rope,
                                eps=self.q_norm.eps, inplace=True)           # the norms and the RoPE in one pass
        out = ops.attention_qkv(qkv, self.num_heads, scale=self.scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return ops.linear(out, self.proj.weight, self.proj.bias, residual=residual, scale=scale)


class GlmVisionTower(nn.Module):
    """The parameters of GLM-4V's vision tower in vitfast's layers (HF's tensors, adopted by `_build`): patch_embed,
    post_conv_layernorm and pos_embed (not GLM-OCR's), blocks (timm's Block with RMSNorms and the packed SwiGLU MLP:
    norm1, attn.qkv, attn.proj, GLM-OCR's attn.q_norm and attn.k_norm, norm2, mlp.fc1 = [gate | up], mlp.fc2),
    post_layernorm, downsample, merger."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, hidden: int, in_chans: int, temporal_patch: int,
                 patch_size: int, out_dim: int, merge: int, merger_hidden: int, pos_side: int, qkv_bias: bool = False,
                 proj_bias: bool = False, mlp_bias: bool = False, qk_norm: bool = False, post_conv_norm: bool = True,
                 patch_bias: bool = True, eps: float = 1e-5, merger_eps: float = 1e-5):
        super().__init__()
        self.patch_embed = _PatchEmbed3d(in_chans, embed_dim, (temporal_patch, patch_size, patch_size), patch_bias)
        self.post_conv_layernorm = RMSNorm(embed_dim, eps=eps) if post_conv_norm else None
        self.pos_embed = nn.Embedding(pos_side * pos_side, embed_dim) if pos_side else None
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=_mlp_ratio(2 * hidden, embed_dim),
                                           qkv_bias=qkv_bias, proj_bias=proj_bias, eps=eps, mlp="swiglu")
                                     for _ in range(depth)])
        for blk in self.blocks:
            blk.norm1, blk.norm2 = RMSNorm(embed_dim, eps=eps), RMSNorm(embed_dim, eps=eps)
            blk.mlp.fc1 = nn.Linear(embed_dim, 2 * hidden, bias=mlp_bias)
            blk.mlp.fc2 = nn.Linear(hidden, embed_dim, bias=mlp_bias)
            if qk_norm:
                blk.attn = _QKNormAttention(embed_dim, num_heads, qkv_bias, proj_bias, eps)
        self.post_layernorm = RMSNorm(embed_dim, eps=eps)
        self.downsample = nn.Conv2d(embed_dim, out_dim, merge, stride=merge)
        self.merger = _GlmMerger(out_dim, merger_hidden, merger_eps)


def optimize_glm(model: nn.Module) -> HFGlmVisionModel:
    """A transformers GLM-4V vision tower (one of CLASSES) -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    blocks = list(model.blocks)
    act = getattr(cfg, "hidden_act", None)
    f.need(act == "silu", f"hidden_act={act!r} (supported: ['silu'], the gated MLPs as SwiGLU)")
    post_conv = getattr(model, "post_conv_layernorm", None)
    qk_norm = hasattr(blocks[0].attn, "q_norm")
    norms = [n for n in (post_conv, model.post_layernorm) if n is not None] + \
        [n for b in blocks for n in (b.norm1, b.norm2, *((b.attn.q_norm, b.attn.k_norm) if qk_norm else ()))]
    eps = {_norm_eps(n) for n in norms}
    f.need(len(eps) == 1 and None not in eps and all(getattr(n, "bias", None) is None for n in norms),
           f"norms (expected RMSNorms of one eps, got {sorted({type(n).__name__ for n in norms})} of eps {eps})")
    biased = {where: getattr(getattr(blocks[0], where.split(".")[0]), where.split(".")[1]).bias is not None
              for where in ("attn.qkv", "attn.proj", "mlp.gate_proj")}
    for i, b in enumerate(blocks):
        f.need(hasattr(b.attn, "q_norm") == hasattr(b.attn, "k_norm") == qk_norm, f"blocks.{i}.attn: q / k norms "
               f"{'in every block' if qk_norm else 'in no block'} (as blocks.0)")
        for where, m in [("attn.qkv", b.attn.qkv), ("attn.proj", b.attn.proj)] + \
                [(f"mlp.{p}", getattr(b.mlp, p, None)) for p in ("gate_proj", "up_proj", "down_proj")]:
            bias = biased[where if where.startswith("attn") else "mlp.gate_proj"]
            f.linear(m, f"blocks.{i}.{where}", bias=False) and f.need(
                (m.bias is not None) == bias, f"blocks.{i}.{where} {'without' if bias else 'with'} bias (as blocks.0)")
        f.need(getattr(b.attn, "attention_dropout", 0.0) == 0.0 or not model.training, f"blocks.{i}.attn dropout")
    limit = getattr(cfg, "swiglu_limit", None)            # GLM-5-Next's clamped gate and up
    f.need(all(getattr(mlp, "swiglu_limit", None) == limit for mlp in [b.mlp for b in blocks] + [model.merger]),
           f"gated MLPs whose swiglu_limit differs from the config's {limit}")
    merger = model.merger
    for p in ("proj", "gate_proj", "up_proj", "down_proj"):
        m = getattr(merger, p, None)
        f.linear(m, f"merger.{p}", bias=False) and f.need(m.bias is None, f"merger.{p} with bias")
    f.layer_norm_eps(merger.post_projection_norm, "merger.post_projection_norm", merger.proj.out_features)
    f.need(isinstance(merger.act1, nn.GELU) and merger.act1.approximate == "none",
           f"merger.act1 {merger.act1!r} (expected exact nn.GELU)")
    ds = model.downsample
    m = cfg.spatial_merge_size
    f.need(isinstance(ds, nn.Conv2d) and tuple(ds.kernel_size) == tuple(ds.stride) == (m, m)
           and tuple(ds.padding) == (0, 0) and ds.groups == 1 and ds.bias is not None,
           f"downsample {ds!r} (expected a Conv2d with bias, kernel = stride = spatial_merge_size {m})")
    f.check(False)
    state = renamed_state(model, _RENAME)
    for pre in [f"blocks.{i}.mlp." for i in range(len(blocks))] + ["merger."]:   # fc1 joined after the build
        for part in ("weight", "bias") if pre != "merger." and biased["mlp.gate_proj"] else ("weight",):
            state[f"{pre}fc1.{part}"] = torch.cat([state.pop(f"{pre}{p}_proj.{part}") for p in ("gate", "up")]).detach()
    pe = model.patch_embed.proj
    table = getattr(getattr(model, "embeddings", None), "position_embedding", None)
    tower_cfg = dict(embed_dim=pe.out_channels, depth=len(blocks), num_heads=blocks[0].attn.num_heads,
                     hidden=blocks[0].mlp.gate_proj.out_features, in_chans=pe.in_channels,
                     temporal_patch=pe.kernel_size[0], patch_size=pe.kernel_size[1], out_dim=ds.out_channels, merge=m,
                     merger_hidden=merger.gate_proj.out_features,
                     pos_side=int(round(table.num_embeddings ** 0.5)) if table is not None else 0,
                     qkv_bias=biased["attn.qkv"], proj_bias=biased["attn.proj"], mlp_bias=biased["mlp.gate_proj"],
                     qk_norm=qk_norm, post_conv_norm=post_conv is not None, patch_bias=pe.bias is not None,
                     eps=eps.pop(), merger_eps=merger.post_projection_norm.eps)
    tower = _build(tower_cfg, state, model, f, GlmVisionTower)
    for mlp, hf_mlp in [(blk.mlp, b.mlp) for blk, b in zip(tower.blocks, blocks)] + [(tower.merger, merger)]:
        bias = "bias" if hf_mlp.gate_proj.bias is not None else None
        mlp.fc1 = JoinedLinear([(hf_mlp.gate_proj, "weight", bias, None), (hf_mlp.up_proj, "weight", bias, None)])
        mlp.swiglu_limit = limit
    return HFGlmVisionModel(cfg, tower, model.rotary_pos_emb.inv_freq).train(model.training)


class HFGlmVisionModel(HFQwenVisionModel):
    """Stands in for a GLM-4V vision tower: `forward(hidden_states, grid_thw, ...)` as HF's, returning HF's output
    object (module docstring). The tower's parameters are HF's tensors (`self.tower`). Its VLM reads `dtype` and
    `spatial_merge_size` from it, as from HF's."""

    def __init__(self, config, tower: GlmVisionTower, inv_freq: Tensor):
        super().__init__(config, tower, "glm4v", inv_freq)

    def forward(self, hidden_states=None, grid_thw=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        self._refuse(kwargs, output_attentions)
        lay = self._layout(self._check(hidden_states, grid_thw), hidden_states.device)
        return self.cuda_graphs(self, self._forward, hidden_states, lay["cu"], lay["cos"], lay["sin"], lay["points"],
                                max_seqlen=lay["max"], keep=self._keep(output_hidden_states), return_dict=return_dict)

    def _make_layout(self, grid: list[tuple[int, int, int]], f64: bool) -> dict:
        """What the forward needs of a grid, on the CPU: cu_seqlens and the longest frame, the RoPE tables, the
        position table's sampling points."""
        pos, cu = qwen_patch_layout(grid, self.spatial_merge_size)
        cos, sin = qwen_rope_tables(pos, self.inv_freq, torch.float64 if f64 else torch.float32)
        points = glm_position_grid(grid, self.spatial_merge_size)[None, :, None] if self.tower.pos_embed is not None \
            else None
        return dict(cu=cu, cos=cos, sin=sin, max=int((cu[1:] - cu[:-1]).max()), points=points)

    def _forward(self, pixels, cu, cos, sin, points, *, max_seqlen, keep, return_dict):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        tower = self.tower
        proj = tower.patch_embed.proj
        dtype, C = proj.weight.dtype, proj.out_channels
        x = ops.linear(pixels.to(dtype)[None], proj.weight.reshape(C, -1), proj.bias)            # (1, T, C)
        if tower.post_conv_layernorm is not None:
            x = tower.post_conv_layernorm(x)
        if tower.pos_embed is not None:                        # the table resampled as HF's does it: in float32
            table = tower.pos_embed.weight
            side = int(round(table.shape[0] ** 0.5))
            grid = table.float().reshape(side, side, C).permute(2, 0, 1)[None]
            pos = F.grid_sample(grid, points, mode="bicubic", align_corners=False, padding_mode="border")
            x = x + pos[0, :, :, 0].T.to(dtype)
        x, hidden = self._run_blocks(x, (cos, sin), cu, max_seqlen, keep)
        m = self.spatial_merge_size                 # each merge x merge block of tokens, channel-major, as the conv
        ds = tower.downsample
        blocks = tower.post_layernorm(x).reshape(-1, m * m, C).transpose(1, 2).reshape(-1, C * m * m)
        down = ops.linear(blocks, ds.weight.reshape(ds.out_channels, -1), ds.bias)             # (T / m², D)
        if hidden[-1] is not None:                  # HF's output capturing puts last_hidden_state in the last slot
            hidden[-1] = down
        out = BaseModelOutputWithPooling(last_hidden_state=down, pooler_output=tower.merger(down),
                                         hidden_states=None if keep is None else tuple(hidden))
        return self._returned(out, return_dict)
