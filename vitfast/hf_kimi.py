"""Kimi K2.5's vision tower (MoonViT) on vitfast: transformers' `Kimi_K25VisionModel`, which `vitfast.optimize` also
copies `Kimi_K25ForConditionalGeneration` with (the tower is its `vision_tower`).

The tower takes the patches of several images and videos packed into one sequence: pixel_values [T, C, P, P] (each
frame's patches row-major, frame after frame, clip after clip) with grid_thw [n, 3] (frames, patch rows, patch
columns per clip). Every clip attends within itself, its frames together: the attention kernel's varlen form
(`ops.attention_qkv` with `cu_seqlens`: one launch for the batch, no padding, no per-clip loop). The patch embedding
(a Conv2d whose stride is its kernel) is one `ops.linear` over the flattened patches with the position embedding
added in its epilogue: the learned table resized to each frame's grid (bicubic: 16 table rows per patch, the taps
and weights made on the host once per grid) plus the clip's frame sinusoid. Per block: LayerNorm, the packed q / k /
v GEMM (HF's three projections joined), the axial 2D RoPE on q and k (`ops.rope_qkv`; MoonViT interleaves the
column's and the row's angles frequency by frequency), varlen attention, the projection with the residual in its
epilogue, LayerNorm, fc1 with the GELU (tanh) in its epilogue, fc2 with the residual in its. Then the final
LayerNorm, and the merger's input: each kh x kw block of patches, averaged over the clip's frames.

Output: HF's BaseModelOutputWithPooling: last_hidden_state [T, C] after the final LayerNorm, pooler_output
[T' , kh · kw, C] (T' merged tokens, what the VLM's projector takes); with output_hidden_states, the embeddings and
each block's output but the last's, whose slot holds last_hidden_state, as HF's output capturing fills it. The
layout of a batch depends only on grid_thw: it is made once per grid (one host read, as HF's) and kept, and the CUDA
graph of a forward is keyed by the token count, the clip count and the longest clip, so batches of other images
with those replay it with their layout as data. The stand-in holds HF's parameter tensors (an optimizer over either
model trains both). Not supported (named in the error): attention outputs, precomputed layout arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _build, _Findings, _mlp_ratio
from vitfast.hf_qwen import _ACTIVATIONS, HFQwenVisionModel, renamed_state
from vitfast.layers import Block, JoinedLinear, LayerNorm
from vitfast.reference import position_taps, qwen_patch_layout, qwen_rope_tables, temporal_pool_layout, weighted_rows

# transformers class -> family
CLASSES = {"Kimi_K25VisionModel": "kimi_k25"}
# HF's key -> the tower's (each replacement applied in turn)
_RENAME = (("patch_embed.pos_emb.position_embeddings", "pos_embed"), ("layers.", "blocks."),
           ("final_layernorm.", "norm."))
# The layout a caller may hand HF's tower precomputed (transformers' vision_utils and MoonViT's own helpers):
# vitfast makes its own from grid_thw and refuses these rather than ignore them.
_LAYOUT_KWARGS = {"cu_seqlens", "max_seqlen", "position_ids", "interp_indices", "interp_weights", "frame_index",
                  "temporal_merge_index"}


class _Patchify(nn.Module):
    """Holds HF's Conv2d patch projection (stride = kernel): applied as one GEMM over flattened patches."""

    def __init__(self, in_chans: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)


class KimiVisionTower(nn.Module):
    """The parameters of MoonViT in vitfast's layers (HF's tensors, adopted by `_build`): patch_embed, pos_embed
    [side, side, C], blocks (timm's Block: norm1, attn.qkv = HF's q / k / v, attn.proj, norm2, mlp.fc1, mlp.fc2),
    norm."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, hidden: int, act: str, in_chans: int,
                 patch_size: int, pos_side: int, eps: float = 1e-5):
        super().__init__()
        self.patch_embed = _Patchify(in_chans, embed_dim, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(pos_side, pos_side, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=_mlp_ratio(hidden, embed_dim), act=act,
                                           eps=eps) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim, eps=eps)


def optimize_kimi(model: nn.Module) -> HFKimiVisionModel:
    """A transformers Kimi_K25VisionModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    layers = list(model.layers)
    act = _ACTIVATIONS.get(getattr(cfg, "hidden_act", None))
    f.need(act is not None, f"hidden_act={getattr(cfg, 'hidden_act', None)!r} (supported: {sorted(_ACTIVATIONS)})")
    pe = model.patch_embed.proj
    f.patchify(pe, "patch_embed.proj")
    dim = pe.out_channels
    f.layer_norm_eps(model.final_layernorm, "final_layernorm", dim)
    eps = {model.final_layernorm.eps}
    for i, layer in enumerate(layers):
        for where in ("norm1", "norm2"):
            eps.add(f.layer_norm_eps(getattr(layer, where), f"layers.{i}.{where}", dim))
        for proj in ("q_proj", "k_proj", "v_proj", "proj"):
            f.linear(getattr(layer.attn, proj, None), f"layers.{i}.attn.{proj}")
        for fc in ("fc1", "fc2"):
            f.linear(getattr(layer.mlp, fc, None), f"layers.{i}.mlp.{fc}")
        f.need(getattr(layer.attn, "attention_dropout", 0.0) == 0.0 or not model.training,
               f"layers.{i}.attn dropout")
    f.need(len(eps) == 1, f"LayerNorms of one eps (got {sorted(map(str, eps))})")
    table = model.patch_embed.pos_emb.position_embeddings
    f.need(table.dim() == 3 and table.shape[0] == table.shape[1],
           f"position table {tuple(table.shape)} (expected a square grid [side, side, C])")
    pos_emb = model.patch_embed.pos_emb      # how HF resizes the table (its attributes, as its forward reads them)
    resize = (getattr(pos_emb, "interpolation_mode", "bicubic"), getattr(pos_emb, "interpolation_align_corners", False))
    f.need(resize[0] in ("bilinear", "bicubic"), f"position table resized by {resize[0]!r} (bilinear or bicubic)")
    f.check(False)
    state = renamed_state(model, _RENAME)
    for i in range(len(layers)):          # the packed qkv, joined from HF's projections after the build
        for part in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state.pop(f"blocks.{i}.attn.{p}_proj.{part}")
                                                              for p in "qkv"]).detach()
    tower_cfg = dict(embed_dim=dim, depth=len(layers), num_heads=layers[0].attn.num_heads,
                     hidden=layers[0].mlp.fc1.out_features, act=act, in_chans=pe.in_channels,
                     patch_size=pe.kernel_size[0], pos_side=table.shape[0], eps=eps.pop())
    tower = _build(tower_cfg, state, model, f, KimiVisionTower)
    for blk, layer in zip(tower.blocks, layers):
        blk.attn.qkv = JoinedLinear([(getattr(layer.attn, f"{p}_proj"), "weight", "bias", None) for p in "qkv"])
    return HFKimiVisionModel(cfg, tower, model.rotary_emb.inv_freq, pos_emb.time_position_embeddings,
                             resize).train(model.training)


class HFKimiVisionModel(HFQwenVisionModel):
    """Stands in for Kimi K2.5's MoonViT: `forward(pixel_values, grid_thw, ...)` as HF's, returning HF's output
    object (module docstring). The tower's parameters are HF's tensors (`self.tower`). Its VLM reads
    `merge_kernel_size` and `dtype` from it, as from HF's."""

    def __init__(self, config, tower: KimiVisionTower, inv_freq: Tensor, time_embed: Tensor,
                 resize: tuple[str, bool] = ("bicubic", False)):
        super().__init__(config, tower, "kimi_k25", inv_freq)
        self.resize = resize                              # the position table's (mode, align_corners)
        self.merge_kernel_size = tuple(config.merge_kernel_size)
        self.register_buffer("time_embed", time_embed.detach().clone(), persistent=False)   # HF's frame sinusoid

    _layout_kwargs = _LAYOUT_KWARGS

    def forward(self, pixel_values=None, grid_thw=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        self._refuse(kwargs, output_attentions)
        lay = self._layout(self._check(pixel_values, grid_thw), pixel_values.device)
        return self.cuda_graphs(self, self._forward, pixel_values, lay["cu"], lay["cos"], lay["sin"], lay["taps"],
                                lay["weights"], lay["frames"], lay["dest"], lay["share"], max_seqlen=lay["max"],
                                merged=lay["merged"], keep=self._keep(output_hidden_states), return_dict=return_dict)

    def _check(self, pixel_values, grid_thw) -> list[tuple[int, int, int]]:
        """The arguments checked; -> grid_thw as a list (the one host read of the forward)."""
        pe = self.tower.patch_embed.proj
        shape = (pe.in_channels, *pe.kernel_size)
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != shape:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected patches [T, {', '.join(map(str, shape))}], got {got}")
        grid = self._grid(grid_thw, pixel_values.shape[0], "T", self.merge_kernel_size)
        most = self.time_embed.shape[0] - 1                 # the frame sinusoid's rows (row 0: a single frame's)
        if any(t > max(most, 1) for t, _, _ in grid):
            raise ValueError(f"grid_thw: expected clips of at most {most} frames (the model's pos_emb_time), got "
                             f"{[t for t, _, _ in grid]}")
        return grid

    def _make_layout(self, grid: list[tuple[int, int, int]], f64: bool) -> dict:
        """What the forward needs of a grid, on the CPU: cu_seqlens (one segment per clip) and the longest clip, the
        RoPE tables, the position table's taps, each patch's frame row, the merger's slots."""
        pos, _ = qwen_patch_layout(grid, 1)
        lengths = torch.tensor([t * h * w for t, h, w in grid])
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
        wide = torch.float64 if f64 else torch.float32
        cos, sin = qwen_rope_tables(pos.flip(-1), self.inv_freq, wide, pairs=True)
        taps, weights = position_taps(grid, 1, self.tower.pos_embed.shape[0], *self.resize)
        frames = torch.cat([(torch.arange(t) + int(t > 1)).repeat_interleave(h * w) for t, h, w in grid])
        dest, share = temporal_pool_layout(grid, self.merge_kernel_size)
        kh, kw = self.merge_kernel_size
        return dict(cu=cu, cos=cos, sin=sin, taps=taps, weights=weights.to(wide), frames=frames, dest=dest,
                    share=share.to(wide), max=int(lengths.max()), merged=sum(h // kh * (w // kw) for _, h, w in grid))

    def _forward(self, pixels, cu, cos, sin, taps, weights, frames, dest, share, *, max_seqlen, merged,
                 keep, return_dict):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        tower = self.tower
        proj = tower.patch_embed.proj
        dtype, C = proj.weight.dtype, proj.out_channels
        pos = weighted_rows(tower.pos_embed.reshape(-1, C), taps, weights) + self.time_embed[frames]
        x = ops.linear(pixels.to(dtype).reshape(1, pixels.shape[0], -1), proj.weight.reshape(C, -1), proj.bias,
                       residual=pos.to(dtype)[None])                                                 # (1, T, C)
        x, hidden = self._run_blocks(x, (cos, sin), cu, max_seqlen, keep)
        x = tower.norm(x)[0]
        if hidden[-1] is not None:                  # HF's output capturing puts last_hidden_state in the last slot
            hidden[-1] = x
        k = self.merge_kernel_size[0] * self.merge_kernel_size[1]       # each slot: the mean over the clip's frames
        pooled = torch.zeros(merged * k, C, dtype=share.dtype, device=x.device).index_add(
            0, dest, x.to(share.dtype) * share[:, None])
        out = BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled.reshape(merged, k, C).to(dtype),
                                         hidden_states=None if keep is None else tuple(hidden))
        return self._returned(out, return_dict)
