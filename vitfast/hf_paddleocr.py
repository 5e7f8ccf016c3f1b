"""PaddleOCR-VL's vision tower on vitfast: transformers' `PaddleOCRVisionModel` (a SigLIP-style NaViT), which
`vitfast.optimize` also copies `PaddleOCRVLForConditionalGeneration` with (the tower is its `visual`).

The tower takes the patches of several images packed into one sequence: pixel_values [B, L, C, P, P] (B · L = T
patches, each image's row-major, image after image; the VLM passes B = 1) with grid_thw [n, 3] (frames, patch rows,
patch columns per image). Every frame attends within itself only: the attention kernel's varlen form
(`ops.attention_qkv` with `cu_seqlens`: one launch for the batch, no padding, no per-image loop). The patch embedding
(a Conv2d whose stride is its kernel) is one `ops.linear` over the flattened patches with the position embedding
added in its epilogue: the learned table resized to each image's grid (bilinear; the taps and weights made on the host
once per grid, with the align_corners of HF's module: transformers 5.17 aligns the corners, 5.2x does not). Per block:
LayerNorm, the packed q / k / v GEMM (HF's three projections joined), the axial 2D RoPE on q and k (`ops.rope_qkv`,
Qwen2-VL's tables over each image's row-major patches), varlen attention, out_proj with the residual in its epilogue,
LayerNorm, fc1 with the GELU (tanh) in its epilogue, fc2 with the residual in its. Then the post LayerNorm.

Output: HF's BaseModelOutputWithPooling: last_hidden_state [T, C] after the post LayerNorm (what the VLM's projector
merges), pooler_output None; with output_hidden_states, the embeddings and each block's output (before the post
LayerNorm, as HF's). HF's tower takes an attention_mask it never applies (each image's attention is its own segment);
the stand-in ignores it too. The layout of a batch depends only on grid_thw: it is made once per grid (one host read,
as HF's) and kept, and the CUDA graph of a forward is keyed by the token count, the segment count and the longest
segment, so batches of other images with those replay it with their layout as data. The stand-in holds HF's parameter
tensors (an optimizer over either model trains both). Not supported (named in the error): attention outputs,
precomputed layout arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _build, _Findings, _mlp_ratio
from vitfast.hf_kimi import _Patchify
from vitfast.hf_qwen import _ACTIVATIONS, HFQwenVisionModel, renamed_state
from vitfast.layers import Block, JoinedLinear, LayerNorm
from vitfast.reference import position_taps, qwen_patch_layout, qwen_rope_tables, weighted_rows

# transformers class -> family
CLASSES = {"PaddleOCRVisionModel": "paddleocr_vl"}
# HF's key -> the tower's (each replacement applied in turn)
_RENAME = (("vision_model.embeddings.patch_embedding.", "patch_embed.proj."),
           ("vision_model.embeddings.position_embedding.", "pos_embed."), ("vision_model.encoder.layers.", "blocks."),
           (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."), (".self_attn.out_proj.", ".attn.proj."),
           ("vision_model.post_layernorm.", "norm."))
# The layout a caller may hand HF's tower precomputed (transformers' vision_utils): vitfast makes its own from
# grid_thw and refuses these rather than ignore them.
_LAYOUT_KWARGS = {"cu_seqlens", "max_seqlen", "position_ids", "interp_indices", "interp_weights"}


class PaddleOCRVisionTower(nn.Module):
    """The parameters of PaddleOCR-VL's vision tower in vitfast's layers (HF's tensors, adopted by `_build`):
    patch_embed, pos_embed [side², C], blocks (timm's Block: norm1, attn.qkv = HF's q / k / v, attn.proj, norm2,
    mlp.fc1, mlp.fc2), norm."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, hidden: int, act: str, in_chans: int,
                 patch_size: int, pos_side: int, eps: float = 1e-6):
        super().__init__()
        self.patch_embed = _Patchify(in_chans, embed_dim, patch_size)
        self.pos_embed = nn.Embedding(pos_side * pos_side, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=_mlp_ratio(hidden, embed_dim), act=act,
                                           eps=eps) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim, eps=eps)


def optimize_paddleocr(model: nn.Module) -> HFPaddleOCRVisionModel:
    """A transformers PaddleOCRVisionModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    vm = model.vision_model
    layers = list(vm.encoder.layers)
    act = _ACTIVATIONS.get(getattr(cfg, "hidden_act", None))
    f.need(act is not None, f"hidden_act={getattr(cfg, 'hidden_act', None)!r} (supported: {sorted(_ACTIVATIONS)})")
    emb = vm.embeddings
    pe = emb.patch_embedding
    f.patchify(pe, "vision_model.embeddings.patch_embedding")
    dim = pe.out_channels
    eps = {f.layer_norm_eps(vm.post_layernorm, "vision_model.post_layernorm", dim)}
    for i, layer in enumerate(layers):
        where = f"vision_model.encoder.layers.{i}"
        for norm in ("layer_norm1", "layer_norm2"):
            eps.add(f.layer_norm_eps(getattr(layer, norm), f"{where}.{norm}", dim))
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            f.linear(getattr(layer.self_attn, proj, None), f"{where}.self_attn.{proj}")
        for fc in ("fc1", "fc2"):
            f.linear(getattr(layer.mlp, fc, None), f"{where}.mlp.{fc}")
        f.need(getattr(layer.self_attn, "attention_dropout", 0.0) == 0.0 or not model.training,
               f"{where}.self_attn dropout")
    f.need(len(eps) == 1, f"LayerNorms of one eps (got {sorted(map(str, eps))})")
    resize = (getattr(emb, "interpolation_mode", "bilinear"), getattr(emb, "interpolation_align_corners", False))
    f.need(resize[0] in ("bilinear", "bicubic"), f"position table resized by {resize[0]!r} (bilinear or bicubic)")
    f.check(False)
    state = renamed_state(model, _RENAME)
    for i in range(len(layers)):          # the packed qkv, joined from HF's projections after the build
        for part in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{part}"] = torch.cat([state.pop(f"blocks.{i}.self_attn.{p}_proj.{part}")
                                                              for p in "qkv"]).detach()
    tower_cfg = dict(embed_dim=dim, depth=len(layers), num_heads=layers[0].self_attn.num_heads,
                     hidden=layers[0].mlp.fc1.out_features, act=act, in_chans=pe.in_channels,
                     patch_size=pe.kernel_size[0], pos_side=int(round(emb.position_embedding.num_embeddings ** 0.5)),
                     eps=eps.pop())
    tower = _build(tower_cfg, state, model, f, PaddleOCRVisionTower)
    for blk, layer in zip(tower.blocks, layers):
        blk.attn.qkv = JoinedLinear([(getattr(layer.self_attn, f"{p}_proj"), "weight", "bias", None) for p in "qkv"])
    return HFPaddleOCRVisionModel(cfg, tower, vm.encoder.rotary_pos_emb.inv_freq, resize).train(model.training)


class HFPaddleOCRVisionModel(HFQwenVisionModel):
    """Stands in for PaddleOCR-VL's PaddleOCRVisionModel: `forward(pixel_values, grid_thw, ...)` as HF's, returning
    HF's output object (module docstring). The tower's parameters are HF's tensors (`self.tower`). Its VLM reads
    `dtype` from it, as from HF's."""

    def __init__(self, config, tower: PaddleOCRVisionTower, inv_freq: Tensor, resize: tuple[str, bool]):
        super().__init__(config, tower, "paddleocr_vl", inv_freq)
        self.resize = resize                              # the position table's (mode, align_corners)

    _layout_kwargs = _LAYOUT_KWARGS

    def forward(self, pixel_values=None, grid_thw=None, attention_mask=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        self._refuse(kwargs, output_attentions)
        lay = self._layout(self._check(pixel_values, grid_thw), pixel_values.device)
        return self.cuda_graphs(self, self._forward, pixel_values, lay["cu"], lay["cos"], lay["sin"], lay["taps"],
                                lay["weights"], max_seqlen=lay["max"], keep=self._keep(output_hidden_states),
                                return_dict=return_dict)

    def _check(self, pixel_values, grid_thw) -> list[tuple[int, int, int]]:
        """The arguments checked; -> grid_thw as a list (the one host read of the forward)."""
        pe = self.tower.patch_embed.proj
        shape = (pe.in_channels, *pe.kernel_size)
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 5 or tuple(pixel_values.shape[2:]) != shape:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected patches [B, L, {', '.join(map(str, shape))}], got {got}")
        return self._grid(grid_thw, pixel_values.shape[0] * pixel_values.shape[1], "B · L")

    def _make_layout(self, grid: list[tuple[int, int, int]], f64: bool) -> dict:
        """What the forward needs of a grid, on the CPU: cu_seqlens (one segment per frame) and the longest frame,
        the RoPE tables, the position table's taps."""
        pos, cu = qwen_patch_layout(grid, 1)
        cos, sin = qwen_rope_tables(pos, self.inv_freq, torch.float64 if f64 else torch.float32)
        taps, weights = position_taps(grid, 1, int(round(self.tower.pos_embed.num_embeddings ** 0.5)), *self.resize)
        return dict(cu=cu, cos=cos, sin=sin, taps=taps, weights=weights.double() if f64 else weights,
                    max=int((cu[1:] - cu[:-1]).max()))

    def _forward(self, pixels, cu, cos, sin, taps, weights, *, max_seqlen, keep, return_dict):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        tower = self.tower
        proj = tower.patch_embed.proj
        dtype, C = proj.weight.dtype, proj.out_channels
        pos = weighted_rows(tower.pos_embed.weight, taps, weights)               # HF: in the weights' dtype
        x = ops.linear(pixels.to(dtype).reshape(1, -1, proj.weight[0].numel()), proj.weight.reshape(C, -1),
                       proj.bias, residual=pos.to(dtype)[None])                                      # (1, T, C)
        x, hidden = self._run_blocks(x, (cos, sin), cu, max_seqlen, keep)
        out = BaseModelOutputWithPooling(last_hidden_state=tower.norm(x)[0], pooler_output=None,
                                         hidden_states=None if keep is None else tuple(hidden))
        return self._returned(out, return_dict)
