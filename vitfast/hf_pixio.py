"""Meta's Pixio, I-JEPA and MAE on vitfast: transformers' `PixioModel` (a ViT-H / 16 pretrained on pixels, 8 class
tokens; its `PixioBackbone`, the stage feature maps of depth and 3D heads, holds it as `pixio`), `IJepaModel` (I-JEPA's
ViT-H / 14 and ViT-g / 16, no class token; `IJepaForImageClassification` holds it as `ijepa`) and `ViTMAEModel` (MAE's
encoder: the patches randomly masked by HF's own method, with the given noise or its own draw, between the patch
embedding and the class token; mask_ratio=0 keeps every patch, shuffled). `vitfast.optimize` replaces the model inside
those in a copy: the backbone's own norm and reshaping, or the classifier over the tokens' mean, then run on the
stand-in's outputs, as HF's.

The model takes images pixel_values [B, C, H, W] (H and W multiples of the patch size; I-JEPA's and MAE's of the
configured size unless interpolate_pos_encoding, as HF's) and an optional attention_mask [B, tokens] (1 / True: the key
takes part; HF's padding mask, the attention kernel's key mask). The patch embedding is one `ops.patch_embed` with
Pixio's class tokens and the position table (resampled to the grid by HF's own method when the grid differs from the
table's: always for Pixio, with interpolate_pos_encoding for I-JEPA and MAE) in its epilogue; I-JEPA's masked patches
(bool_masked_pos, with use_mask_token) take its mask token plus their position row. Per block: the LayerNorm,
the packed q / k / v GEMM (HF's three projections joined), the attention, o_proj with the residual in its epilogue, the
LayerNorm, fc1 with the GELU in its epilogue, fc2 with the residual in its. Then the final LayerNorm; the pooler output
is the mean of Pixio's class tokens after it, or I-JEPA's pooler (HF's module: dense and tanh on the first token) where
the model has one, as HF's.

Output: HF's BaseModelOutputWithPooling: last_hidden_state, pooler_output (MAE's ViTMAEModelOutput: mask and
ids_restore instead) and, with output_hidden_states (True, or an index or list of indices that keeps only those, as
transformers 5.2x), the embeddings and each block's output (before the final norm). The stand-in holds HF's model
(`self.model`, its forward unused) and so its parameter tensors; on CUDA in eval mode without grad its forward replays
a CUDA graph per input shape. It trains. Not supported (named in the error): attention outputs, dropout and drop-path
in train mode, activations other than GELU / QuickGELU, bool_masked_pos without a mask token.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.layers import JoinedLinear
from vitfast.reference import mask_patches

# transformers class -> family
CLASSES = {"PixioModel": "pixio", "IJepaModel": "pixio", "ViTMAEModel": "pixio"}


def optimize_pixio(model: nn.Module) -> HFPixioModel:
    """A transformers PixioModel, IJepaModel or ViTMAEModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0 and getattr(cfg, "head_dim", None) in (None, dim // heads),
           f"hidden_size={dim} with num_attention_heads={heads} (head_dim={getattr(cfg, 'head_dim', None)})")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    emb = model.embeddings
    f.patchify(emb.patch_embeddings.projection, "embeddings.patch_embeddings.projection")
    f.dropout(getattr(emb, "dropout", None), "embeddings.dropout")
    f.layer_norm_eps(model.layernorm, "layernorm", dim)
    for i, layer in enumerate(model.layers):
        where = f"layers.{i}"
        for n in ("layernorm_before", "layernorm_after"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        for proj in ("q_proj", "k_proj", "v_proj"):
            f.linear(getattr(layer.attention, proj, None), f"{where}.attention.{proj}", bias=cfg.qkv_bias)
        f.linear(layer.attention.o_proj, f"{where}.attention.o_proj")
        f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
        f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
        f.dropout(layer.attention.attention_dropout, f"{where}.attention dropout")
        f.dropout(layer.dropout, f"{where}.dropout")
        f.dropout(getattr(layer, "drop_path", None), f"{where}.drop_path", "drop-path")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    output = module.ViTMAEModelOutput if name == "ViTMAEModel" else module.BaseModelOutputWithPooling
    return HFPixioModel(model, output).train(model.training)


class HFPixioModel(nn.Module):
    """Stands in for a PixioModel (`forward(pixel_values, attention_mask=None, ...)`) or an IJepaModel
    (`forward(pixel_values, bool_masked_pos=None, interpolate_pos_encoding=None, attention_mask=None, ...)`) or a
    ViTMAEModel (`forward(pixel_values, noise=None, interpolate_pos_encoding=None, ...)`) as HF's,
    returning HF's output object (module docstring). HF's model is `self.model`; `self.qkv` holds each block's joined
    q / k / v (`JoinedLinear`: built from HF's tensors on each access while a gradient is recorded; one cached copy
    otherwise)."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.prefix = getattr(model.embeddings, "n_cls_tokens", 0)               # Pixio's class tokens, I-JEPA none
        self.mae = hasattr(model.embeddings, "random_masking")                     # MAE: its class token after it
        self.qkv = nn.ModuleList()
        for layer in model.layers:
            a = layer.attention
            bias = "bias" if a.q_proj.bias is not None else None
            self.qkv.append(JoinedLinear([(m, "weight", bias, None) for m in (a.q_proj, a.k_proj, a.v_proj)]))
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embeddings.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embeddings.projection.weight.device

    @property
    def embeddings(self) -> nn.Module:
        """HF's embeddings module (PixioBackbone reads its n_cls_tokens)."""
        return self.model.embeddings

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def forward(self, pixel_values=None, attention_mask=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, bool_masked_pos=None, interpolate_pos_encoding=None, noise=None, **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        token = getattr(self.model.embeddings, "mask_token", None)
        if bool_masked_pos is not None and token is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument bool_masked_pos (this model has no "
                                          "mask token: I-JEPA's with use_mask_token=True has one)")
        proj = self.model.embeddings.patch_embeddings.projection
        C, P = proj.in_channels, proj.kernel_size[0]
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != C or \
                pixel_values.shape[2] % P or pixel_values.shape[3] % P or 0 in pixel_values.shape[2:]:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected images [B, {C}, H, W] with H and W multiples of {P}, got {got}")
        resample = self.prefix > 0 or bool(interpolate_pos_encoding)            # Pixio always, I-JEPA when asked
        size = tuple(self.model.embeddings.image_size) if hasattr(self.model.embeddings, "image_size") else None
        if not resample and tuple(pixel_values.shape[2:]) != size:
            raise ValueError(f"pixel_values: expected images of the configured size {size} without "
                             f"interpolate_pos_encoding=True, got {tuple(pixel_values.shape)}")
        B, T = pixel_values.shape[0], self.prefix + (pixel_values.shape[2] // P) * (pixel_values.shape[3] // P)
        if bool_masked_pos is not None:                # I-JEPA's patches (no class token) replaced by its mask token
            if not isinstance(bool_masked_pos, Tensor) or tuple(bool_masked_pos.shape) != (B, T):
                got = tuple(bool_masked_pos.shape) if isinstance(bool_masked_pos, Tensor) else \
                    type(bool_masked_pos).__name__
                raise ValueError(f"bool_masked_pos: expected [B, patches] = [{B}, {T}], got {got}")
            bool_masked_pos = bool_masked_pos.to(device=pixel_values.device, dtype=torch.bool)
        if self.mae:                                      # the class token and the patches MAE's masking keeps
            patches, T = T, 1 + int(T * (1 - self.config.mask_ratio))
            if noise is not None and (not isinstance(noise, Tensor) or tuple(noise.shape) != (B, patches)):
                got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
                raise ValueError(f"noise: expected [B, patches] = [{B}, {patches}], got {got}")
        elif noise is not None:
            raise ValueError(f"noise: only ViTMAEModel takes it (its masking), not {type(self.model).__name__}")
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, T):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else \
                    type(attention_mask).__name__
                raise ValueError(f"attention_mask: expected [B, tokens] = [{B}, {T}] (any class tokens and the "
                                 f"patches), got {got}")
            attention_mask = attention_mask.to(device=pixel_values.device, dtype=torch.bool)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.layers) + 1)
        x, extra, hidden = self.cuda_graphs(self, self._forward, pixel_values, attention_mask, noise, bool_masked_pos,
                                            resample=resample, keep=keep)
        out = self._output(last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden), **extra)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _forward(self, pixels: Tensor, mask: Tensor | None, noise: Tensor | None, masked: Tensor | None, *,
                 resample: bool, keep):
        m = self.model
        emb = m.embeddings
        w, b = emb.patch_embeddings.projection.weight, emb.patch_embeddings.projection.bias
        D, P, n = w.shape[0], w.shape[2], self.prefix
        tokens = n + int(self.mae) + (pixels.shape[2] // P) * (pixels.shape[3] // P)
        table = emb.interpolate_pos_encoding(torch.empty(1, tokens, D, device="meta"), *pixels.shape[2:]) \
            if resample else emb.position_embeddings                               # HF's resampling, or the table
        table = table.to(w.dtype)
        extra = {}
        if self.mae:                         # the patches and their rows; HF's masking; the class token and its row
            x = ops.patch_embed(pixels.to(w.dtype), w, b, pos_embed=table[:, 1:], pos_embed_prefix=False)
            x, extra["mask"], extra["ids_restore"] = emb.random_masking(x, noise)
            x = torch.cat([(emb.cls_token.to(w.dtype) + table[:, :1]).expand(x.shape[0], -1, -1), x], dim=1)
        else:
            x = ops.patch_embed(pixels.to(w.dtype), w, b, prefix_tokens=emb.cls_token.to(w.dtype) if n else None,
                                pos_embed=table, pos_embed_prefix=n > 0)
            if masked is not None:                    # the mask token plus the patch's position row (no prefix)
                x = mask_patches(x, masked, emb.mask_token.to(w.dtype) + table)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(m.layers, self.qkv), 1):
            a, mlp, n1, n2 = layer.attention, layer.mlp, layer.layernorm_before, layer.layernorm_after
            h = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv.weight, qkv.bias)
            x = ops.linear(ops.attention_qkv(h, self.num_heads, key_mask=mask), a.o_proj.weight, a.o_proj.bias,
                           residual=x)
            h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), mlp.fc1.weight, mlp.fc1.bias,
                           activation=self.activation)
            x = ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=x)
            hidden.append(x if i in kept else None)
        x = ops.layer_norm(x, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps)
        if not self.mae:
            pooler = getattr(m, "pooler", None)
            extra["pooler_output"] = x[:, :n].mean(dim=1) if n else None if pooler is None else pooler(x)   # I-JEPA's
        return x, extra, hidden
