"""BLIP's and BLIP-2's vision transformers on vitfast: transformers' `BlipVisionModel` (BLIP: captioning, VQA,
image-text retrieval; `BlipForConditionalGeneration` and the others hold it as `vision_model`), `Blip2VisionModel`
(BLIP-2's EVA ViT-g: 1408 wide, 39 blocks, 16 heads of 88; `Blip2ForConditionalGeneration`, `Blip2Model`) and
InstructBLIP's copies of it (`InstructBlipVisionModel`, `InstructBlipVideoVisionModel`). `vitfast.optimize` copies the
models around them with the vision model replaced (the Q-Former and language model shared).

The model takes images pixel_values [B, C, H, W]. The patch embedding is one `ops.patch_embed` with the class token
and the position table (its first rows, as HF slices it, or resampled by HF's own method with
interpolate_pos_encoding) in its epilogue. Per block: the LayerNorm, HF's packed qkv GEMM (BLIP-2's k bias is the zero
third of it), the attention, the output projection with the residual in its epilogue, the LayerNorm, fc1 with the
GELU in its epilogue, fc2 with the residual in its. Then the final LayerNorm over every token (last_hidden_state), and
the pooler output: that norm applied once more to the class token's row, as HF's does.

Output: HF's BaseModelOutputWithPooling with last_hidden_state, pooler_output and, with output_hidden_states (True, or
an index or list of indices that keeps only those, as transformers 5.2x), the embeddings and each block's output
(before the final norm). The stand-in holds HF's model (`self.model`, its forward unused) and so its parameter
tensors; on CUDA in eval mode without grad its forward replays a CUDA graph per input shape. It trains. Not supported
(named in the error): attention outputs, dropout in train mode, activations other than GELU / QuickGELU.
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

# transformers class -> family
CLASSES = {"BlipVisionModel": "blip", "Blip2VisionModel": "blip", "InstructBlipVisionModel": "blip",
           "InstructBlipVideoVisionModel": "blip"}


def optimize_blip(model: nn.Module) -> HFBlipVisionModel:
    """A transformers BlipVisionModel / Blip2VisionModel / InstructBlip(Video)VisionModel -> its stand-in on vitfast
    (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim = cfg.hidden_size
    f.need(dim % cfg.num_attention_heads == 0, f"hidden_size={dim} with num_attention_heads={cfg.num_attention_heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    emb = model.embeddings
    f.patchify(emb.patch_embedding, "embeddings.patch_embedding")
    f.layer_norm_eps(model.post_layernorm, "post_layernorm", dim)
    for i, layer in enumerate(model.encoder.layers):
        where = f"encoder.layers.{i}"
        for n in ("layer_norm1", "layer_norm2"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        a = layer.self_attn
        f.linear(a.qkv, f"{where}.self_attn.qkv", bias=False)
        f.linear(a.projection, f"{where}.self_attn.projection")
        f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
        f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
        f.dropout(getattr(a, "dropout", getattr(a, "attention_dropout", 0.0)), f"{where}.self_attn dropout")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    output = sys.modules[type(model).__module__].BaseModelOutputWithPooling
    return HFBlipVisionModel(model, output).train(model.training)


class HFBlipVisionModel(nn.Module):
    """Stands in for a BlipVisionModel / Blip2VisionModel / InstructBlip(Video)VisionModel: `forward(pixel_values,
    interpolate_pos_encoding=False, ...)` as HF's, returning HF's output object (module docstring). HF's model is
    `self.model`; its parameters are the stand-in's."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embedding.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings

    def forward(self, pixel_values=None, interpolate_pos_encoding=False, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        emb = self.model.embeddings
        P, C = emb.patch_embedding.kernel_size[0], emb.patch_embedding.in_channels
        rows = emb.position_embedding.shape[1]
        ok = isinstance(pixel_values, Tensor) and pixel_values.dim() == 4 and pixel_values.shape[1] == C and \
            pixel_values.shape[2] % P == 0 and pixel_values.shape[3] % P == 0 and 0 not in pixel_values.shape[2:]
        if ok and not interpolate_pos_encoding:                 # HF takes the table's first rows
            ok = (pixel_values.shape[2] // P) * (pixel_values.shape[3] // P) + 1 <= rows
        if not ok:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            more = "" if interpolate_pos_encoding else f", at most {rows - 1} patches without interpolate_pos_encoding"
            raise ValueError(f"pixel_values: expected images [B, {C}, H, W] with H and W multiples of {P}{more}, "
                             f"got {got}")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.encoder.layers) + 1)
        x, pooled, hidden = self.cuda_graphs(self, self._forward, pixel_values,
                                             interpolate=bool(interpolate_pos_encoding), keep=keep)
        out = self._output(last_hidden_state=x, pooler_output=pooled, hidden_states=None if keep is None
                           else tuple(hidden))
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _forward(self, pixels: Tensor, *, interpolate: bool, keep):
        m = self.model
        emb, norm = m.embeddings, m.post_layernorm
        w = emb.patch_embedding.weight
        D, P = w.shape[0], w.shape[2]
        n = (pixels.shape[2] // P) * (pixels.shape[3] // P) + 1
        if interpolate:                                        # HF's method reads only the shape of its first argument
            table = emb.interpolate_pos_encoding(torch.empty(1, n, D, device="meta"), *pixels.shape[2:])
        else:
            table = emb.position_embedding[:, :n]
        x = ops.patch_embed(pixels.to(w.dtype), w, emb.patch_embedding.bias, cls_token=emb.class_embedding.to(w.dtype),
                            pos_embed=table.to(w.dtype))
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, layer in enumerate(m.encoder.layers, 1):
            a, mlp = layer.self_attn, layer.mlp
            h = ops.layer_norm(x, layer.layer_norm1.weight, layer.layer_norm1.bias, eps=layer.layer_norm1.eps)
            h = ops.attention_qkv(ops.linear(h, a.qkv.weight, a.qkv.bias), self.num_heads)
            x = ops.linear(h, a.projection.weight, a.projection.bias, residual=x)
            h = ops.layer_norm(x, layer.layer_norm2.weight, layer.layer_norm2.bias, eps=layer.layer_norm2.eps)
            h = ops.linear(h, mlp.fc1.weight, mlp.fc1.bias, activation=self.activation)
            x = ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=x)
            hidden.append(x if i in kept else None)
        x = ops.layer_norm(x, norm.weight, norm.bias, eps=norm.eps)
        pooled = ops.layer_norm(x[:, 0], norm.weight, norm.bias, eps=norm.eps)      # the norm twice, as HF's
        return x, pooled, hidden
