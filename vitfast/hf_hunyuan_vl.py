"""HunYuan-VL's vision tower on vitfast: transformers' `HunYuanVLVisionTransformer` (Tencent's HunYuan-VL: a
SigLIP-style NaViT over the patches of images of any size, packed with `grid_thw`), which `HunYuanVLModel` and
`HunYuanVLForConditionalGeneration` hold as `vision_tower`.

The tower takes HF's packed input: pixel_values [T, C·P·P] (each patch flattened as (channel, row, column)) with
grid_thw [n, 3] (frames, patch rows, patch columns per image). The patch embedding (HF's Conv2d over each patch) is
one GEMM over the flattened patches, then each image's position rows: HF's learned table resized to its grid by HF's
own method (`interpolate_pos_encoding`, the config's interpolate_mode), repeated over its frames. Per block: the
LayerNorm, the packed q / k / v GEMM (HF's three projections joined), each frame attending within itself through the
attention kernel's varlen form (`ops.attention_qkv` with `cu_seqlens`: one launch for the batch, no padding, where
HF's SDPA path loops over the images), the output projection with the residual in its epilogue, the LayerNorm, fc1
with its activation in its epilogue, fc2 with the residual. Then HF's patch merger (its RMSNorms, convolutions and
special tokens; shared) over each image's tokens, as HF's.

Output: HF's BaseModelOutputWithPooling: last_hidden_state [1, T, C], pooler_output [1, tokens, text width] (every
image's merged tokens), and with output_hidden_states (True, or an index or list of indices that keeps only those)
the embeddings and each block's output. The layout depends on grid_thw, read on the host once per call (as HF's);
the CUDA graph of a forward is kept per grid. The stand-in holds HF's model (`self.model`, its forward unused) and so
its parameter tensors; it trains. Not supported (named in the error): attention outputs, precomputed layout
arguments, dropout in train mode, activations other than the GELUs and QuickGELU.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.hf_molmo2 import encoder_layer
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.hf_vitlayer import HFStandIn, joined_qkv_proj

# transformers class -> family
CLASSES = {"HunYuanVLVisionTransformer": "hunyuan_vl"}


def optimize_hunyuan_vl(model: nn.Module) -> HFHunYuanVLVisionTransformer:
    """A transformers HunYuanVLVisionTransformer -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim = cfg.hidden_size
    heads = {layer.self_attn.num_heads for layer in model.layers}
    head_dims = {layer.self_attn.head_dim for layer in model.layers}
    f.need(len(heads) <= 1 and len(head_dims) <= 1, f"blocks of different head counts / dims ({heads}, {head_dims})")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    pe = model.embeddings.patch_embedding
    f.patchify(pe, "embeddings.patch_embedding")
    for i, layer in enumerate(model.layers):
        where = f"layers.{i}"
        for n in ("layer_norm1", "layer_norm2"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        a = layer.self_attn
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            f.linear(getattr(a, part), f"{where}.self_attn.{part}", bias=False)
        f.need(getattr(a, "num_key_value_groups", 1) == 1, f"{where}.self_attn: grouped-query attention")
        f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
        f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
    if getattr(cfg, "attention_dropout", 0.0):
        f.train_only.append(f"dropout p={cfg.attention_dropout:g} (attention)")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    return HFHunYuanVLVisionTransformer(model, module.BaseModelOutputWithPooling, heads.pop() if heads else 1,
                                        head_dims.pop() if head_dims else dim).train(model.training)


class HFHunYuanVLVisionTransformer(HFStandIn):
    """Stands in for a HunYuanVLVisionTransformer (`forward(pixel_values, grid_thw, ...)`) as HF's, returning HF's
    output object (module docstring). HF's model is `self.model`; `self.qkv` holds, per block, its q / k / v
    projections joined (`JoinedLinear`s over HF's tensors, so that they train)."""

    main_input_name = "pixel_values"

    def __init__(self, model: nn.Module, output: type, heads: int, head_dim: int):
        super().__init__(model, output)
        cfg = self.config
        self.num_heads = heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.qkv = nn.ModuleList(joined_qkv_proj(layer.self_attn, heads, heads, head_dim) for layer in model.layers)

    def forward(self, pixel_values=None, grid_thw=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        keep = self._keep(output_attentions, output_hidden_states)
        if kwargs:
            raise UnsupportedFeatureError(f"optimized model: unsupported arguments {sorted(kwargs)} (a precomputed "
                                          "layout: vitfast makes it from grid_thw)")
        width = self.model.embeddings.patch_embedding.weight[0].numel()
        if not isinstance(grid_thw, Tensor) or grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or \
                grid_thw.shape[0] < 1:
            got = tuple(grid_thw.shape) if isinstance(grid_thw, Tensor) else type(grid_thw).__name__
            raise ValueError(f"grid_thw: expected [n, 3] (frames, patch rows, patch columns per image), got {got}")
        grid = tuple(tuple(int(v) for v in row) for row in grid_thw.tolist())      # the one host read, as HF's
        T = sum(t * h * w for t, h, w in grid)
        if not isinstance(pixel_values, Tensor) or tuple(pixel_values.shape) != (T, width):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected patches [T, {width}] with T = {T} (grid_thw's), got {got}")
        sizes = [h * w for t, h, w in grid for _ in range(t)]                      # each frame attends within itself
        cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=pixel_values.device)
        x, pooled, hidden = self.cuda_graphs(self, self._forward, pixel_values, cu, grid=grid, max_seqlen=max(sizes),
                                             keep=keep)
        return self._result(return_dict, last_hidden_state=x, pooler_output=pooled,
                            hidden_states=None if keep is None else tuple(hidden))

    def _forward(self, pixels: Tensor, cu: Tensor, *, grid, max_seqlen: int, keep):
        m = self.model
        emb = m.embeddings
        w = emb.patch_embedding.weight
        x = ops.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1), emb.patch_embedding.bias)   # (T, C)
        pos = torch.cat([emb.interpolate_pos_encoding(x, h, w_)[0].repeat(t, 1) for t, h, w_ in grid])
        x = (x + pos)[None]                                                                       # (1, T, C)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(m.layers, self.qkv), 1):
            x = encoder_layer(layer, qkv, x, self.num_heads, self.activation, cu_seqlens=cu, max_seqlen=max_seqlen)
            hidden.append(x if i in kept else None)
        items = torch.split(x, [t * h * w_ for t, h, w_ in grid], dim=1)
        pooled = torch.cat([m.patch_merger(item, size=(h, w_)) for (_, h, w_), item in zip(grid, items)], dim=1)
        return x, pooled, hidden
