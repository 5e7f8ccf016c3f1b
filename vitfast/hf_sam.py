"""SAM's image encoder on vitfast: transformers' `SamVisionEncoder` (Segment Anything's ViT-B / L / H image encoder,
the costly part of SAM; `SamModel` and `SamVisionModel` hold it as `vision_encoder`, which `vitfast.optimize`
replaces in a copy), `SamHQVisionEncoder` (SAM-HQ's: the same, and the global blocks' outputs as its
`intermediate_embeddings`; `SamHQModel`, `SamHQVisionModel`) and `GotOcr2VisionEncoder` (GOT-OCR 2.0's tower, the
same encoder, held by `GotOcr2ForConditionalGeneration` as its `vision_tower`).

The encoder takes images pixel_values [B, C, S, S] of the configured size S. The patch embedding is one
`ops.patch_embed` with the absolute position table added in its epilogue; the tokens keep HF's [B, rows, columns, C]
layout. Per block: the LayerNorm; in a windowed block (all but `global_attn_indexes`) the grid zero-padded to whole
windows and cut into windows, as HF's (the padding tokens take part as keys, as in HF); the qkv GEMM; the attention
with SAM's decomposed relative positions added to its scores inside the kernel (`ops.attention_qkv(rel_pos=...)`:
the terms are made from q and the learned tables in float32, O(N·√N), where HF's SDPA path builds an N×N bias per
head, 4096² per head in a global block at 1024 px); the windows put back and their padding dropped before the output
projection, which adds the residual in its epilogue (a projection per token commutes with the windows' permutation);
the LayerNorm, lin1 with the GELU in its epilogue, lin2 with the residual in its. Then the neck: conv1 (1 x 1: a
GEMM), its LayerNorm over the channels, conv2 (3 x 3: torch's convolution), its LayerNorm.

Output: HF's encoder output: last_hidden_state [B, output_channels, rows, columns] (a channels-first view, as HF's)
and, with output_hidden_states, the embeddings and each block's output [B, rows, columns, C]; SAM-HQ's also its
intermediate_embeddings, the output of each global block [B, rows, columns, C]. The stand-in holds HF's
encoder (`self.model`, its forward unused) and so its parameter tensors; on CUDA in eval mode without grad its forward
replays a CUDA graph per input shape. It trains: the attention's backward is FlashAttention-2's kernels with the
terms in the scores (their gradients summed in the dQ kernel), no N×N matrix either. Not supported (named in the
error): attention outputs, attention dropout in train mode, activations other than GELU / QuickGELU.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.reference import sam_rel_pos

# transformers class -> family
CLASSES = {"SamVisionEncoder": "sam", "SamHQVisionEncoder": "sam", "GotOcr2VisionEncoder": "sam"}
# HF's hidden_act -> vitfast's activation
# HF's activation names -> the linear epilogue's (gelu_fast: the tanh GELU with sqrt(2 / pi) to 10 digits; ViViT's)
_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu"}


def optimize_sam(model: nn.Module) -> HFSamVisionEncoder:
    """A transformers SamVisionEncoder / SamHQVisionEncoder / GotOcr2VisionEncoder -> its stand-in on vitfast (module
    docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    f.need(cfg.hidden_size % cfg.num_attention_heads == 0,
           f"hidden_size={cfg.hidden_size} with num_attention_heads={cfg.num_attention_heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    f.patchify(model.patch_embed.projection, "patch_embed.projection")
    for i, layer in enumerate(model.layers):
        where = f"layers.{i}"
        for n in ("layer_norm1", "layer_norm2"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", cfg.hidden_size)
        f.linear(layer.attn.qkv, f"{where}.attn.qkv", bias=cfg.qkv_bias)
        f.linear(layer.attn.proj, f"{where}.attn.proj")
        f.linear(layer.mlp.lin1, f"{where}.mlp.lin1")
        f.linear(layer.mlp.lin2, f"{where}.mlp.lin2")
        f.dropout(getattr(layer.attn, "dropout", 0.0), f"{where}.attn dropout")
    for n in ("layer_norm1", "layer_norm2"):
        f.layer_norm_eps(getattr(model.neck, n), f"neck.{n}", cfg.output_channels)
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    output = getattr(sys.modules[type(model).__module__], name + "Output")
    return HFSamVisionEncoder(model, output).train(model.training)


def window_partition(x: Tensor, size: int) -> tuple[Tensor, tuple[int, int]]:
    """HF's SamVisionLayer.window_partition: x [B, R, W, C] zero-padded to whole windows -> [B · n, size, size, C],
    and the padded (R, W)."""
    B, R, W, C = x.shape
    pad_r, pad_w = (size - R % size) % size, (size - W % size) % size
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_r))
    Rp, Wp = R + pad_r, W + pad_w
    x = x.reshape(B, Rp // size, size, Wp // size, size, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size, size, C), (Rp, Wp)


def window_unpartition(x: Tensor, size: int, padded: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """The windows [B · n, size, size, C] back into [B, R, W, C], the padding dropped."""
    (Rp, Wp), (R, W) = padded, grid
    B = x.shape[0] // (Rp * Wp // size // size)
    x = x.reshape(B, Rp // size, Wp // size, size, size, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Rp, Wp, -1)
    return x[:, :R, :W]


class HFSamVisionEncoder(nn.Module):
    """Stands in for a SamVisionEncoder (or SAM-HQ's, or GOT-OCR 2.0's copy): `forward(pixel_values, ...)` as HF's,
    returning HF's output object (module docstring). HF's encoder is `self.model`; its parameters are the stand-in's."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.intermediate = "intermediate_embeddings" in getattr(output, "__dataclass_fields__", {})   # SAM-HQ's
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.patch_embed.projection.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.patch_embed

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        proj = self.model.patch_embed.projection
        C, S = proj.in_channels, self.config.image_size
        if not isinstance(pixel_values, Tensor) or tuple(pixel_values.shape[1:]) != (C, S, S):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected images [B, {C}, {S}, {S}], got {got}")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.layers) + 1)
        x, hidden, inter = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        extra = dict(intermediate_embeddings=list(inter)) if self.intermediate else {}
        out = self._output(last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden), **extra)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _forward(self, pixels: Tensor, *, keep):
        m = self.model
        proj = m.patch_embed.projection
        B, D = pixels.shape[0], proj.out_channels
        G = self.config.image_size // self.config.patch_size
        pos = None if m.pos_embed is None else m.pos_embed.reshape(1, G * G, D)
        x = ops.patch_embed(pixels.to(proj.weight.dtype), proj.weight, proj.bias, pos_embed=pos,
                            pos_embed_prefix=False)                                      # (B, G², D)
        kept = keep or ()
        hidden, inter = [x.view(B, G, G, D) if 0 in kept else None], []
        for i, layer in enumerate(m.layers, 1):
            x = self._block(layer, x, G)
            hidden.append(x.view(B, G, G, D) if i in kept else None)
            if self.intermediate and layer.window_size == 0:
                inter.append(x.view(B, G, G, D))
        neck = m.neck
        out = neck.conv1.out_channels
        y = ops.linear(x, neck.conv1.weight.view(out, D))                                # (B, G², out): the 1 x 1 conv
        y = ops.layer_norm(y, neck.layer_norm1.weight, neck.layer_norm1.bias, eps=neck.layer_norm1.eps)
        y = F.conv2d(y.view(B, G, G, out).permute(0, 3, 1, 2), neck.conv2.weight, neck.conv2.bias,
                     padding=neck.conv2.padding)
        y = ops.layer_norm(y.permute(0, 2, 3, 1), neck.layer_norm2.weight, neck.layer_norm2.bias,
                           eps=neck.layer_norm2.eps)
        return y.permute(0, 3, 1, 2), hidden, inter

    def _block(self, layer: nn.Module, x: Tensor, G: int) -> Tensor:
        """One SamVisionLayer on tokens x [B, G², C] (row-major over the G x G grid)."""
        a, mlp = layer.attn, layer.mlp
        B, N, C = x.shape
        h = ops.layer_norm(x, layer.layer_norm1.weight, layer.layer_norm1.bias, eps=layer.layer_norm1.eps)
        size = layer.window_size
        if size > 0:
            h, padded = window_partition(h.view(B, G, G, C), size)                   # (B · n, size, size, C)
        rows = size if size > 0 else G
        qkv = ops.linear(h.reshape(-1, rows * rows, C), a.qkv.weight, a.qkv.bias)     # (B or B · n, rows², 3C)
        rel = None
        if a.use_rel_pos:
            q = qkv.unflatten(2, (3, self.num_heads, -1))[:, :, 0].transpose(1, 2)    # (.., H, rows², D), a view
            table_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            rel = sam_rel_pos(q, a.rel_pos_h, a.rel_pos_w, (rows, rows), table_dtype)
        o = ops.attention_qkv(qkv, self.num_heads, rel_pos=rel)                        # scale D^-½, as HF's
        if size > 0:
            o = window_unpartition(o.view(-1, size, size, C), size, padded, (G, G)).reshape(B, N, C)
        x = ops.linear(o, a.proj.weight, a.proj.bias, residual=x)
        h = ops.layer_norm(x, layer.layer_norm2.weight, layer.layer_norm2.bias, eps=layer.layer_norm2.eps)
        h = ops.linear(h, mlp.lin1.weight, mlp.lin1.bias, activation=self.activation)
        return ops.linear(h, mlp.lin2.weight, mlp.lin2.bias, residual=x)
