"""DPT on vitfast: transformers' `DPTModel` (the ViT of DPT, Dense Prediction Transformers: DPT-Large, transformers'
default depth-estimation model, at 384 px and other sizes; DPT-Hybrid's ViT over a BiT stem), which
`DPTForDepthEstimation` and `DPTForSemanticSegmentation` hold as `dpt` (their necks, which read the blocks' hidden
states, and heads shared).

The model takes images pixel_values [B, C, H, W] of any size (pixels past whole patches dropped, as HF's
convolution drops them; DPT-Hybrid: its configured size, as HF's). The patch embedding is one `ops.patch_embed`
with the class token plus its position row as the prefix row and the patches' position rows in its epilogue: HF's
table resized to the patch grid (bilinear, as HF's on every call: the same grid gives the table itself). DPT-Hybrid's
embeddings (the BiT stem, its 1 x 1 projection, the position rows) are HF's module, shared, whose stage features pass
through as `intermediate_activations`. Then HF's ViT-layout blocks (`vitfast.hf_vitlayer`), the final LayerNorm, and
HF's pooler where the model has one.

Output: HF's BaseModelOutputWithPoolingAndIntermediateActivations: last_hidden_state, pooler_output,
intermediate_activations (DPT-Hybrid's) and, with output_hidden_states (True, or an index or list of indices that
keeps only those), the embeddings and each block's output. The stand-in holds HF's model (`self.model`, its forward
unused) and so its parameter tensors; on CUDA in eval mode without grad its forward replays a CUDA graph per input
shape. It trains. Not supported (named in the error): attention outputs, dropout in train mode, activations other
than the GELUs and QuickGELU.
"""

from __future__ import annotations

import sys

import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _Findings
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.hf_vitlayer import ViTLayoutStandIn, check_images, check_layers, vit_layer

# transformers class -> family
CLASSES = {"DPTModel": "dpt"}


def optimize_dpt(model: nn.Module) -> HFDPTModel:
    """A transformers DPTModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    if not cfg.is_hybrid:
        f.patchify(model.embeddings.patch_embeddings.projection, "embeddings.patch_embeddings.projection")
        f.dropout(model.embeddings.dropout, "embeddings.dropout")
    f.layer_norm_eps(model.layernorm, "layernorm", dim)
    check_layers(f, model.encoder.layer, dim)
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    return HFDPTModel(model, module.BaseModelOutputWithPoolingAndIntermediateActivations).train(model.training)


class HFDPTModel(ViTLayoutStandIn):
    """Stands in for a DPTModel (`forward(pixel_values, ...)`) as HF's, returning HF's output object (module
    docstring). HF's model is `self.model`; `self.qkv` holds, per block, its q / k / v projections joined,
    `JoinedLinear`s built from HF's tensors on each access while a gradient is recorded, so that they train, one
    cached copy otherwise."""

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        keep = self._keep(output_attentions, output_hidden_states)
        check_images(pixel_values, self.config.num_channels, self.config.patch_size)
        x, pooled, hidden, stem = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        return self._result(return_dict, last_hidden_state=x, pooler_output=pooled, intermediate_activations=stem,
                            hidden_states=None if keep is None else tuple(hidden))

    def _embed(self, pixels: Tensor) -> Tensor:
        """DPT's (not hybrid) embeddings: the patch GEMM with the class row and the resized table in its epilogue."""
        emb = self.model.embeddings
        proj = emb.patch_embeddings.projection
        w, P = proj.weight, proj.kernel_size[0]
        size = (pixels.shape[2] // P, pixels.shape[3] // P)
        table = emb.position_embeddings
        old = int((table.shape[1] - 1) ** 0.5)
        grid = table[0, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=size, mode="bilinear").permute(0, 2, 3, 1).reshape(1, size[0] * size[1], -1)
        pixels = pixels[:, :, :size[0] * P, :size[1] * P]           # whole patches, as the convolution
        return ops.patch_embed(pixels.to(w.dtype), w, proj.bias, prefix_tokens=emb.cls_token + table[:, :1],
                               pos_embed=grid, pos_embed_prefix=False)

    def _forward(self, pixels: Tensor, *, keep):
        m = self.model
        stem = None
        if self.config.is_hybrid:                                  # HF's BiT stem, projection and position rows
            out = m.embeddings(pixels)
            x, stem = out.last_hidden_states, list(out.intermediate_activations)
        else:
            x = self._embed(pixels)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(m.encoder.layer, self.qkv), 1):
            x = vit_layer(layer, qkv, x, self.num_heads, self.activation)
            hidden.append(x if i in kept else None)
        x = ops.layer_norm(x, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps)
        return x, None if m.pooler is None else m.pooler(x), hidden, stem
