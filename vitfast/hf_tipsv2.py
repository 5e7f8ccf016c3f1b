"""Google DeepMind's TIPSv2 on vitfast: transformers' `Tipsv2VisionModel` (TIPS, "Text-Image Pretraining with Spatial
awareness": a DINOv2-style ViT with a class token, registers, layer-scales, GELU or SwiGLU MLPs, whose patch tokens
are its dense features; `Tipsv2Model`, the image-text model, holds it as `vision_model`, its text tower shared) and
`Tipsv2VisionBackbone` (its stage feature maps; TIPSv2's DPT depth, normals and segmentation heads hold it as
`backbone`, their necks and heads shared: `HFTipsv2VisionBackbone`).

The model takes images pixel_values [B, C, H, W] (H and W multiples of the patch size), an optional bool_masked_pos
[B, patches] (True: the patch replaced by the mask token, as HF's) and an optional attention_mask [B, tokens] (1 /
True: the key takes part; HF's padding mask, the attention kernel's key mask; refused where HF's model has none, as
transformers 5.1x's). The patch embedding is one
`ops.patch_embed` with the class token plus its position row and the registers (which have none) as prefix rows and
the patches' position rows in its epilogue: HF's table, or HF's own resampling of it (bilinear with antialias) for
another grid; masked patches take the mask token plus their position row. Per block: the LayerNorm, the packed q / k
/ v GEMM (HF's three projections joined), the attention, o_proj with the layer-scale and the residual in its
epilogue, the LayerNorm, fc1 with the GELU in its epilogue (or the SwiGLU: gate and up in one GEMM, the gating in
its epilogue), fc2 with the layer-scale and the residual. Then the final LayerNorm.

Output: HF's BaseModelOutputWithPooling: last_hidden_state (after the final norm), pooler_output (its class token)
and, with output_hidden_states (True, or an index or list of indices that keeps only those), the embeddings and each
block's output (before the final norm, as HF's). The stand-in holds HF's model (`self.model`, its forward unused)
and so its parameter tensors; on CUDA in eval mode without grad its forward replays a CUDA graph per input shape. It
trains. Not supported (named in the error): attention outputs, dropout and drop-path in train mode, activations
other than the GELUs and QuickGELU.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import BackboneAPI, UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.layers import JoinedLinear
from vitfast.reference import mask_patches

# transformers class -> family
CLASSES = {"Tipsv2VisionModel": "tipsv2", "Tipsv2VisionBackbone": "tipsv2"}


def _attention_parts(layer: nn.Module) -> tuple:
    """A layer's q, k, v, output projections and attention dropout rates, under either transformers' names (5.1x:
    attention.attention.query / key / value and attention.output.dense, DINOv2's; later: attention.q_proj / ... /
    o_proj)."""
    a = layer.attention
    if hasattr(a, "q_proj"):
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj, (a.attention_dropout,)
    return a.attention.query, a.attention.key, a.attention.value, a.output.dense, (a.attention.dropout_prob,
                                                                                     a.output.dropout)


def _mlp_parts(mlp: nn.Module) -> tuple[list, nn.Module, bool]:
    """A layer's MLP as (fc1's parts for `JoinedLinear`, fc2, gated): fc1 / fc2, or the SwiGLU's gate_proj and
    up_proj (gate rows first) / down_proj, or its packed weights_in (gate rows first) / weights_out (5.1x)."""
    if hasattr(mlp, "gate_proj"):
        return [(m, "weight", "bias", None) for m in (mlp.gate_proj, mlp.up_proj)], mlp.down_proj, True
    if hasattr(mlp, "weights_in"):
        return [(mlp.weights_in, "weight", "bias", None)], mlp.weights_out, True
    return [(mlp.fc1, "weight", "bias", None)], mlp.fc2, False


def optimize_tipsv2(model: nn.Module) -> HFTipsv2VisionModel:
    """A transformers Tipsv2VisionModel or Tipsv2VisionBackbone -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0 and getattr(cfg, "head_dim", None) in (None, dim // heads),
           f"hidden_size={dim} with num_attention_heads={heads} (head_dim={getattr(cfg, 'head_dim', None)})")
    f.need(cfg.use_swiglu_ffn or cfg.hidden_act in _ACTIVATIONS,
           f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    emb = model.embeddings
    f.patchify(emb.patch_embeddings.projection, "embeddings.patch_embeddings.projection")
    f.dropout(emb.dropout, "embeddings.dropout")
    f.layer_norm_eps(model.layernorm, "layernorm", dim)
    for i, layer in enumerate(model.encoder.layer):
        where = f"encoder.layer.{i}"
        for n in ("norm1", "norm2"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        *qkv, o, drops = _attention_parts(layer)
        for part, lin in zip("qkv", qkv):
            f.linear(lin, f"{where} attention {part}", bias=cfg.qkv_bias)
        f.linear(o, f"{where} attention output")
        for d in drops:
            f.dropout(d, f"{where}.attention dropout")
        f.dropout(layer.drop_path, f"{where}.drop_path", "drop-path")
        fc1, fc2, _ = _mlp_parts(layer.mlp)
        for m, *_ in fc1:
            f.linear(m, f"{where}.mlp fc1")
        f.linear(fc2, f"{where}.mlp fc2")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    if name == "Tipsv2VisionBackbone":
        return HFTipsv2VisionBackbone(model, module.BackboneOutput).train(model.training)
    return HFTipsv2VisionModel(model, module.BaseModelOutputWithPooling).train(model.training)


class HFTipsv2VisionModel(nn.Module):
    """Stands in for a Tipsv2VisionModel (`forward(pixel_values, bool_masked_pos=None, attention_mask=None, ...)`) as
    HF's, returning HF's output object (module docstring). HF's model is `self.model`; `self.joined` holds, per block,
    its q / k / v projections joined (and the SwiGLU's gate and up), `JoinedLinear`s built from HF's tensors on each
    access while a gradient is recorded, so that they train, one cached copy otherwise."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        self.joined = nn.ModuleList()
        for layer in model.encoder.layer:
            q, k, v, *_ = _attention_parts(layer)
            bias = "bias" if q.bias is not None else None
            fc1, _, gated = _mlp_parts(layer.mlp)
            self.joined.append(nn.ModuleDict(dict(qkv=JoinedLinear([(m, "weight", bias, None) for m in (q, k, v)]),
                                                  fc1=JoinedLinear(fc1))))
        self.activation = "swiglu" if gated else _ACTIVATIONS[cfg.hidden_act]
        # transformers 5.1x's Tipsv2VisionModel has no attention_mask (its forward drops one unread)
        self.takes_attention_mask = "attention_mask" in inspect.signature(type(model).forward).parameters
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embeddings.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embeddings.projection.weight.device

    @property
    def embeddings(self) -> nn.Module:
        return self.model.embeddings

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def forward(self, pixel_values=None, bool_masked_pos=None, attention_mask=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        x, hidden = self._tokens(pixel_values, bool_masked_pos, attention_mask, output_attentions, output_hidden_states)
        out = self._output(last_hidden_state=x, pooler_output=x[:, 0], hidden_states=hidden)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _tokens(self, pixel_values, bool_masked_pos, attention_mask, output_attentions, output_hidden_states):
        """The checks, then (tokens after the final norm, hidden states tuple or None)."""
        cfg = self.config
        if output_attentions or getattr(cfg, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        proj = self.model.embeddings.patch_embeddings.projection
        C, P = proj.in_channels, proj.kernel_size[0]
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != C or \
                pixel_values.shape[2] % P or pixel_values.shape[3] % P or 0 in pixel_values.shape[2:]:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected images [B, {C}, H, W] with H and W multiples of {P}, got {got}")
        B, N = pixel_values.shape[0], (pixel_values.shape[2] // P) * (pixel_values.shape[3] // P)
        T = 1 + cfg.num_register_tokens + N
        for name, t, shape, what in (("bool_masked_pos", bool_masked_pos, (B, N), "patches"),
                                     ("attention_mask", attention_mask, (B, T), "tokens")):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected [B, {what}] = [{shape[0]}, {shape[1]}], got {got}")
        if attention_mask is not None and not self.takes_attention_mask:
            raise UnsupportedFeatureError(f"optimized model: attention_mask, which this transformers' "
                                          f"{type(self.model).__name__} does not take (its forward ignores it)")
        masked = None if bool_masked_pos is None else bool_masked_pos.to(device=pixel_values.device, dtype=torch.bool)
        keys = None if attention_mask is None else attention_mask.to(device=pixel_values.device, dtype=torch.bool)
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.encoder.layer) + 1)
        x, hidden = self.cuda_graphs(self, self._forward, pixel_values, masked, keys, keep=keep)
        return x, None if keep is None else tuple(hidden)

    def _forward(self, pixels: Tensor, masked: Tensor | None, keys: Tensor | None, *, keep):
        m = self.model
        emb = m.embeddings
        proj = emb.patch_embeddings.projection
        w, P = proj.weight, proj.kernel_size[0]
        N = (pixels.shape[2] // P) * (pixels.shape[3] // P)
        table = emb.interpolate_pos_encoding(torch.empty(1, 1 + N, w.shape[0], device="meta"), *pixels.shape[2:])
        table = table.to(w.dtype)                                     # HF's table, or its resampling for this grid
        prefix = torch.cat([emb.cls_token + table[:, :1], emb.register_tokens], dim=1)
        x = ops.patch_embed(pixels.to(w.dtype), w, proj.bias, prefix_tokens=prefix, pos_embed=table[:, 1:],
                            pos_embed_prefix=False)
        if masked is not None:                                        # the mask token plus the patch's position row
            x = mask_patches(x, masked, emb.mask_token.to(w.dtype) + table[:, 1:])
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, joined) in enumerate(zip(m.encoder.layer, self.joined), 1):
            x = self._block(layer, joined, x, keys)
            hidden.append(x if i in kept else None)
        return ops.layer_norm(x, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps), hidden

    def _block(self, layer: nn.Module, joined: nn.ModuleDict, x: Tensor, keys: Tensor | None) -> Tensor:
        """One Tipsv2VisionLayer on tokens x [B, T, C]."""
        o, (_, fc2, _) = _attention_parts(layer)[3], _mlp_parts(layer.mlp)
        qkv, fc1 = joined["qkv"], joined["fc1"]
        h = ops.linear(ops.layer_norm(x, layer.norm1.weight, layer.norm1.bias, eps=layer.norm1.eps), qkv.weight,
                       qkv.bias)
        x = ops.linear(ops.attention_qkv(h, self.num_heads, key_mask=keys), o.weight, o.bias, residual=x,
                       scale=layer.layer_scale1.lambda1)
        h = ops.layer_norm(x, layer.norm2.weight, layer.norm2.bias, eps=layer.norm2.eps)
        h = ops.linear(h, fc1.weight, fc1.bias, activation=self.activation)
        return ops.linear(h, fc2.weight, fc2.bias, residual=x, scale=layer.layer_scale2.lambda1)


class HFTipsv2VisionBackbone(BackboneAPI, HFTipsv2VisionModel):
    """Stands in for a Tipsv2VisionBackbone (the backbone of TIPSv2's DPT heads, `Tipsv2DptForDepthEstimation` and
    the others, which hold it as `backbone`): `forward(pixel_values, attention_mask=None, ...)` and
    `forward_with_filtered_kwargs` as HF's, returning HF's BackboneOutput: one feature map per stage of
    `config.out_features` ("stem" the embeddings, "stageN" block N), final-normed with `apply_layernorm`, with
    `reshape_hidden_states` the patch tokens as [B, D, H / patch, W / patch] (HF's reshape), without it every token.
    The config is HF's own object: out_features set on it later is read on the next call."""

    @property
    def stage_names(self) -> list[str]:
        return list(self.config.stage_names)

    @property
    def num_features(self) -> list[int]:
        return list(self.model.num_features)

    def forward(self, pixel_values=None, attention_mask=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        _, hidden = self._tokens(pixel_values, None, attention_mask, output_attentions, True)
        cfg, m = self.config, self.model
        B, _, H, W = pixel_values.shape
        P, Q = m.embeddings.patch_embeddings.projection.kernel_size
        maps = []
        for stage, h in zip(self.stage_names, hidden):
            if stage in self.out_features:
                if cfg.apply_layernorm:
                    h = ops.layer_norm(h, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps)
                if cfg.reshape_hidden_states:
                    h = h[:, 1 + cfg.num_register_tokens:].reshape(B, H // P, W // Q, -1).permute(0, 3, 1, 2)
                    h = h.contiguous()
                maps.append(h)
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        result = self._output(feature_maps=tuple(maps), hidden_states=hidden if output_hidden_states else None)
        use_dict = return_dict if return_dict is not None else getattr(cfg, "return_dict", True)
        return result if use_dict else result.to_tuple()
