"""YOLOS on vitfast: transformers' `YolosModel` (You Only Look at One Sequence: a plain ViT over a detection-sized
image, 800 x 1333 px for YOLOS-S: 4,150 patches, with 100 detection tokens after them), which
`YolosForObjectDetection` holds as `vit` (its class and box heads and DETR's loss shared).

The model takes images pixel_values [B, C, H, W] of any size (pixels past whole patches dropped, as HF's
convolution drops them). The patch embedding is one `ops.patch_embed` with the class token plus its position row
as the prefix row and the patches' position rows in its epilogue: HF's table resampled to the patch grid (bicubic,
in the model's dtype, as HF's does on every call: the same grid gives the table itself); the detection tokens plus
their position rows follow the patches. Per block: the LayerNorm, the packed q / k / v GEMM (HF's three projections
joined), the attention, the output projection with the residual in its epilogue, the LayerNorm, the intermediate
GEMM with its GELU in its epilogue, the output GEMM with the residual; then, but after the last block, that block's
mid position table (`use_mid_position_embeddings`, resampled as the first) added. Then the final LayerNorm, and
the pooler (dense + tanh on the class token) where the model has one.

Output: HF's BaseModelOutputWithPooling: last_hidden_state, pooler_output and, with output_hidden_states (True, or an
index or list of indices that keeps only those), the embeddings and each block's output (before its mid position
rows are added, as HF's). The stand-in holds HF's model (`self.model`, its forward unused) and so its parameter
tensors; on CUDA in eval mode without grad its forward replays a CUDA graph per input shape. It trains. Not supported
(named in the error): attention outputs, dropout in train mode, activations other than the GELUs and QuickGELU.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _Findings
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.hf_vitlayer import ViTLayoutStandIn, check_images, check_layers, vit_layer

# transformers class -> family
CLASSES = {"YolosModel": "yolos"}


def optimize_yolos(model: nn.Module) -> HFYolosModel:
    """A transformers YolosModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    emb = model.embeddings
    f.patchify(emb.patch_embeddings.projection, "embeddings.patch_embeddings.projection")
    f.dropout(emb.dropout, "embeddings.dropout")
    f.layer_norm_eps(model.layernorm, "layernorm", dim)
    check_layers(f, model.encoder.layer, dim)
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    return HFYolosModel(model, module.BaseModelOutputWithPooling).train(model.training)


def _resampled(table: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Patch position rows table [..., gh·gw, D] of the patch grid `grid` -> [..., h·w, D] for `size` (h, w): HF's
    bicubic resampling (the table itself for the same grid)."""
    lead, D = table.shape[:-2], table.shape[-1]
    maps = table.reshape(-1, *grid, D).permute(0, 3, 1, 2)
    maps = F.interpolate(maps, size=size, mode="bicubic", align_corners=False)
    return maps.flatten(2).transpose(1, 2).reshape(*lead, size[0] * size[1], D)


class HFYolosModel(ViTLayoutStandIn):
    """Stands in for a YolosModel (`forward(pixel_values, ...)`) as HF's, returning HF's output object (module
    docstring). HF's model is `self.model`; `self.qkv` holds, per block, its q / k / v projections joined,
    `JoinedLinear`s built from HF's tensors on each access while a gradient is recorded, so that they train, one
    cached copy otherwise."""

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        keep = self._keep(output_attentions, output_hidden_states)
        proj = self.model.embeddings.patch_embeddings.projection
        check_images(pixel_values, proj.in_channels, proj.kernel_size[0])
        x, pooled, hidden = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        return self._result(return_dict, last_hidden_state=x, pooler_output=pooled,
                            hidden_states=None if keep is None else tuple(hidden))

    def _forward(self, pixels: Tensor, *, keep):
        m, cfg = self.model, self.config
        emb = m.embeddings
        proj = emb.patch_embeddings.projection
        w, P = proj.weight, proj.kernel_size[0]
        size = (pixels.shape[2] // P, pixels.shape[3] // P)
        height, width = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size,) * 2
        grid = (height // P, width // P)
        n_det = cfg.num_detection_tokens
        table = emb.position_embeddings
        patches = _resampled(table[:, 1:-n_det], grid, size)
        pixels = pixels[:, :, :size[0] * P, :size[1] * P]           # whole patches, as the convolution
        x = ops.patch_embed(pixels.to(w.dtype), w, proj.bias, prefix_tokens=emb.cls_token + table[:, :1],
                            pos_embed=patches, pos_embed_prefix=False)
        x = torch.cat([x, (emb.detection_tokens + table[:, -n_det:]).expand(x.shape[0], -1, -1)], dim=1)
        mid = None
        if m.encoder.interpolation is not None:                   # [depth - 1, 1, T, D], HF's order of rows
            t = getattr(m.encoder, "mid_position_embeddings", None)   # transformers 5.1x's place, then 5.2x's
            t = m.encoder.interpolation.mid_position_embeddings if t is None else t
            mid = torch.cat([t[:, :, :1], _resampled(t[:, :, 1:-n_det], grid, size), t[:, :, -n_det:]], dim=2)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        layers = m.encoder.layer
        for i, (layer, qkv) in enumerate(zip(layers, self.qkv), 1):
            x = vit_layer(layer, qkv, x, self.num_heads, self.activation)
            hidden.append(x if i in kept else None)
            if mid is not None and i < len(layers):
                x = x + mid[i - 1]
        x = ops.layer_norm(x, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps)
        return x, None if m.pooler is None else m.pooler(x), hidden   # HF's pooler: dense + tanh on the class token
