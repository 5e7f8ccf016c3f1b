"""ViViT on vitfast: transformers' `VivitModel` (Google's ViViT, its spatio-temporal attention model: tubelets of 2
frames x 16 x 16 pixels, 3,137 tokens for 32 frames at 224 px, every token attending to every other), which
`VivitForVideoClassification` holds as `vivit` (its classifier over the class token shared).

The model takes videos pixel_values [B, T, C, H, W] of the configured frame count and image size (HF's table has one
row per tubelet token, and its resampling treats that spatio-temporal table as a square grid, which only holds at the
configured size: other sizes are refused by name). The tubelet embedding (HF's Conv3d of kernel = stride = (t, P, P))
is one `ops.patch_embed`: each video's t-frame groups stacked as one tall image of C x t channels (one copy, the
token order HF's), the class token and HF's position table in its epilogue. Per block: the LayerNorm, the packed
q / k / v GEMM (HF's three projections joined), the attention, the output projection with the residual in its
epilogue, the LayerNorm, fc1 with its GELU in its epilogue, fc2 with the residual. Then the final LayerNorm and HF's
pooler.

Output: HF's BaseModelOutputWithPooling: last_hidden_state, pooler_output (where the model has a pooler), and with
output_hidden_states (True, or an index or list of indices that keeps only those) the embeddings and each block's
output. The stand-in holds HF's model (`self.model`, its forward unused) and so its parameter tensors; it trains; on
CUDA in eval mode without grad its forward replays a CUDA graph per input shape. Not supported (named in the error):
attention outputs, a padding attention_mask, videos of other sizes, dropout in train mode, activations other than
the GELUs and QuickGELU.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.hf_vitlayer import HFStandIn, joined_qkv_proj

# transformers class -> family
CLASSES = {"VivitModel": "vivit"}


def optimize_vivit(model: nn.Module) -> HFVivitModel:
    """A transformers VivitModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    emb = model.embeddings
    proj = emb.patch_embeddings.projection
    f.need(isinstance(proj, nn.Conv3d) and tuple(proj.kernel_size) == tuple(proj.stride) and
           proj.padding in ("valid", (0, 0, 0)) and tuple(proj.dilation) == (1, 1, 1) and proj.groups == 1 and
           proj.bias is not None and proj.kernel_size[1] == proj.kernel_size[2],
           "embeddings.patch_embeddings.projection (expected a non-overlapping Conv3d with square patches and a bias)")
    f.dropout(emb.dropout, "embeddings.dropout")
    f.layer_norm_eps(model.layernorm, "layernorm", dim)
    for i, layer in enumerate(model.layers):
        where = f"layers.{i}"
        for n in ("layernorm_before", "layernorm_after"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        a = layer.attention
        for part in ("q_proj", "k_proj", "v_proj"):
            f.linear(getattr(a, part), f"{where}.attention.{part}", bias=False)
        f.linear(a.o_proj, f"{where}.attention.o_proj")
        if a.attention_dropout > 0:
            f.train_only.append(f"dropout p={a.attention_dropout:g} ({where}.attention)")
        f.dropout(layer.dropout, f"{where}.dropout")
        f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
        f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    return HFVivitModel(model, module.BaseModelOutputWithPooling).train(model.training)


class HFVivitModel(HFStandIn):
    """Stands in for a VivitModel (`forward(pixel_values, interpolate_pos_encoding=False, ...)`) as HF's, returning
    HF's output object (module docstring). HF's model is `self.model`; `self.qkv` holds, per block, its q / k / v
    projections joined, `JoinedLinear`s built from HF's tensors on each access while a gradient is recorded, so that
    they train, one cached copy otherwise."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__(model, output)
        cfg = self.config
        self.num_heads = cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        H = self.num_heads
        self.qkv = nn.ModuleList(joined_qkv_proj(layer.attention, H, H, layer.attention.head_dim)
                                 for layer in model.layers)

    @property
    def embeddings(self) -> nn.Module:
        return self.model.embeddings

    @property
    def pooler(self) -> nn.Module | None:
        return self.model.pooler

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, attention_mask=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        cfg = self.config
        keep = self._keep(output_attentions, output_hidden_states)
        if attention_mask is not None:
            raise UnsupportedFeatureError("optimized model: unsupported argument attention_mask (a padding mask: "
                                          "ViViT's videos have none)")
        C, (H, W), T = cfg.num_channels, self.model.embeddings.image_size, cfg.num_frames
        if interpolate_pos_encoding and H != W:
            raise UnsupportedFeatureError("optimized model: interpolate_pos_encoding=True with a non-square image "
                                          f"size {H} x {W} (HF's resampling of ViViT's table takes it as square)")
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 5 or \
                tuple(pixel_values.shape[1:]) != (T, C, H, W):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected videos [B, {T}, {C}, {H}, {W}] (the model's num_frames and "
                             f"image size: its position table's), got {got}")
        x, pooled, hidden = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        return self._result(return_dict, last_hidden_state=x, pooler_output=pooled,
                            hidden_states=None if keep is None else tuple(hidden))

    def _forward(self, videos: Tensor, *, keep):
        m = self.model
        emb = m.embeddings
        proj = emb.patch_embeddings.projection
        w = proj.weight
        D, C, (t, P, _) = w.shape[0], w.shape[1], proj.kernel_size
        B, T, _, H, W = videos.shape
        T = T // t                                                  # whole tubelets, as the Conv3d
        # each video's tubelets as one tall image: channel c·t + i (the Conv3d weight's order), row j·H + h (tubelet j)
        tall = videos[:, :T * t].to(w.dtype).reshape(B, T, t, C, H, W).permute(0, 3, 2, 1, 4, 5)
        tall = tall.reshape(B, C * t, T * H, W)
        x = ops.patch_embed(tall, w.view(D, C * t, P, P), proj.bias, cls_token=emb.cls_token,
                            pos_embed=emb.position_embeddings)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(m.layers, self.qkv), 1):
            o, fc1, fc2 = layer.attention.o_proj, layer.mlp.fc1, layer.mlp.fc2
            n1, n2 = layer.layernorm_before, layer.layernorm_after
            h = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv.weight, qkv.bias)
            x = ops.linear(ops.attention_qkv(h, self.num_heads), o.weight, o.bias, residual=x)
            h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), fc1.weight, fc1.bias,
                           activation=self.activation)
            x = ops.linear(h, fc2.weight, fc2.bias, residual=x)
            hidden.append(x if i in kept else None)
        x = ops.layer_norm(x, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps)
        return x, (None if m.pooler is None else m.pooler(x)), hidden
