"""ERNIE 4.5 VL's vision tower on vitfast: transformers' `Ernie4_5_VLMoeVisionTransformerPretrainedModel` (and its
alias `Ernie4_5_VL_MoeVisionTransformerPretrainedModel`), which `vitfast.optimize` also copies
`Ernie4_5_VLMoeForConditionalGeneration` with (the tower is its `vision_tower`; the resampler after it stays HF's).

The tower takes Qwen2-VL's packed input: hidden_states [T, C·P·P] (each patch flattened) with grid_thw [n, 3] (frames,
patch rows, patch columns per image), the patches of each frame in merge x merge blocks, each frame attending within
itself only: the attention kernel's varlen form (`ops.attention_qkv` with `cu_seqlens`: one launch for the batch, no
padding, no per-image loop). The patch embedding is HF's Linear (no bias) as one `ops.linear`. Per block: LayerNorm,
the packed qkv GEMM, the axial 2D RoPE on q and k (`ops.rope_qkv`, Qwen2-VL's tables), varlen attention, the
projection with the residual in its epilogue, LayerNorm, fc1 with the activation (QuickGELU) in its epilogue, fc2 with
the residual in its. Then the final LayerNorm.

Output: HF's BaseModelOutputWithPooling: last_hidden_state [T, C] after the final LayerNorm (what the VLM's resampler
takes); with output_hidden_states, the embeddings and each block's output but the last's, whose slot holds
last_hidden_state, as HF's output capturing fills it. The layout of a batch depends only on grid_thw: it is made once
per grid (one host read, as HF's) and kept, and the CUDA graph of a forward is keyed by the token count, the segment
count and the longest segment, so batches of other images with those replay it with their layout as data. The
stand-in holds HF's parameter tensors (an optimizer over either model trains both). Not supported (named in the
error): attention outputs, precomputed layout arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _build, _Findings, _mlp_ratio
from vitfast.hf_qwen import _ACTIVATIONS, HFQwenVisionModel, renamed_state
from vitfast.layers import Block, LayerNorm
from vitfast.reference import qwen_patch_layout, qwen_rope_tables

# transformers class -> family
CLASSES = {"Ernie4_5_VLMoeVisionTransformerPretrainedModel": "ernie4_5_vl",
           "Ernie4_5_VL_MoeVisionTransformerPretrainedModel": "ernie4_5_vl"}
# HF's key -> the tower's
_RENAME = (("ln.", "norm."),)


class ErnieVisionTower(nn.Module):
    """The parameters of ERNIE 4.5 VL's vision tower in vitfast's layers (HF's tensors, adopted by `_build`):
    patch_embed.proj (a Linear), blocks (timm's Block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2), norm."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, hidden: int, act: str, patch_width: int,
                 patch_bias: bool = False, eps: float = 1e-6):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Linear(patch_width, embed_dim, bias=patch_bias)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=_mlp_ratio(hidden, embed_dim), act=act,
                                           eps=eps) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim, eps=eps)


def optimize_ernie(model: nn.Module) -> HFErnieVisionModel:
    """A transformers ERNIE 4.5 VL vision tower (one of CLASSES) -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    blocks = list(model.blocks)
    act = _ACTIVATIONS.get(getattr(cfg, "hidden_act", None))
    f.need(act is not None, f"hidden_act={getattr(cfg, 'hidden_act', None)!r} (supported: {sorted(_ACTIVATIONS)})")
    pe = model.patch_embed.proj
    f.linear(pe, "patch_embed.proj", bias=False)
    dim = pe.out_features
    eps = {f.layer_norm_eps(model.ln, "ln", dim)}
    for i, b in enumerate(blocks):
        for where in ("norm1", "norm2"):
            eps.add(f.layer_norm_eps(getattr(b, where), f"blocks.{i}.{where}", dim))
        for where, m in (("attn.qkv", b.attn.qkv), ("attn.proj", b.attn.proj), ("mlp.fc1", b.mlp.fc1),
                         ("mlp.fc2", b.mlp.fc2)):
            f.linear(m, f"blocks.{i}.{where}")
        f.need(getattr(b.attn, "attention_dropout", 0.0) == 0.0 or not model.training, f"blocks.{i}.attn dropout")
    f.need(len(eps) == 1, f"LayerNorms of one eps (got {sorted(map(str, eps))})")
    f.check(False)
    tower_cfg = dict(embed_dim=dim, depth=len(blocks), num_heads=blocks[0].attn.num_heads,
                     hidden=blocks[0].mlp.fc1.out_features, act=act, patch_width=pe.in_features,
                     patch_bias=pe.bias is not None, eps=eps.pop())
    tower = _build(tower_cfg, renamed_state(model, _RENAME), model, f, ErnieVisionTower)
    return HFErnieVisionModel(cfg, tower, model.rotary_pos_emb.inv_freq).train(model.training)


class HFErnieVisionModel(HFQwenVisionModel):
    """Stands in for ERNIE 4.5 VL's vision tower: `forward(hidden_states, grid_thw, ...)` as HF's, returning HF's
    output object (module docstring). The tower's parameters are HF's tensors (`self.tower`). Its VLM reads
    `spatial_merge_size` and `dtype` from it, as from HF's."""

    def __init__(self, config, tower: ErnieVisionTower, inv_freq: Tensor):
        super().__init__(config, tower, "ernie4_5_vl", inv_freq)

    def forward(self, hidden_states=None, grid_thw=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        self._refuse(kwargs, output_attentions)
        lay = self._layout(self._check(hidden_states, grid_thw), hidden_states.device)
        return self.cuda_graphs(self, self._forward, hidden_states, lay["cu"], lay["cos"], lay["sin"],
                                max_seqlen=lay["max"], keep=self._keep(output_hidden_states), return_dict=return_dict)

    def _make_layout(self, grid: list[tuple[int, int, int]], f64: bool) -> dict:
        """What the forward needs of a grid, on the CPU: cu_seqlens (one segment per frame) and the longest frame,
        the RoPE tables."""
        pos, cu = qwen_patch_layout(grid, self.spatial_merge_size)
        cos, sin = qwen_rope_tables(pos, self.inv_freq, torch.float64 if f64 else torch.float32)
        return dict(cu=cu, cos=cos, sin=sin, max=int((cu[1:] - cu[:-1]).max()))

    def _forward(self, pixels, cu, cos, sin, *, max_seqlen, keep, return_dict):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        proj = self.tower.patch_embed.proj
        x = ops.linear(pixels.to(proj.weight.dtype)[None], proj.weight, proj.bias)                     # (1, T, C)
        x, hidden = self._run_blocks(x, (cos, sin), cu, max_seqlen, keep)
        x = self.tower.norm(x)[0]
        if hidden[-1] is not None:                  # HF's output capturing puts last_hidden_state in the last slot
            hidden[-1] = x
        out = BaseModelOutputWithPooling(last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden))
        return self._returned(out, return_dict)
