"""SAM 3's vision backbone on vitfast: transformers' `Sam3ViTModel`, the ViT of Segment Anything 3 (ViT-L sized: 32
blocks of 1024, 1008 px in patches of 14, a 72 x 72 grid), the costly part of SAM 3. `Sam3VisionModel` holds it as
`backbone` (beside its FPN neck), `Sam3Model` and `Sam3TrackerModel` hold that as `vision_encoder`, and
`Sam3VideoModel` a Sam3Model as `detector_model` (whose vision features its tracker takes too): `vitfast.optimize`
copies each with the backbone replaced (the neck, text tower, DETR, decoders and tracker shared).

The backbone takes images pixel_values [B, C, H, W] (H and W multiples of the patch size; the configured size when it
has global blocks). The patch embedding (a convolution without bias) is one `ops.patch_embed` with the position table
added in its epilogue (HF's table of the pretraining grid tiled over the patch grid, not resampled); the tokens keep
HF's [B, rows, columns, C] layout; then the LayerNorm before the blocks. Per block: the LayerNorm; in a windowed block
(all but `global_attn_indexes`) the grid zero-padded to whole windows and cut into windows, as HF's (the padding
tokens take part as keys, as in HF); the packed q / k / v GEMM (HF's three projections joined); the 2D axial RoPE on q
and k (`ops.rope_qkv`, in place: HF's angles, from each kind of block's own positions: the window's grid, or the
whole grid scaled to the window's span in a global block; HF rotates interleaved pairs, which run as rotate-half ones
through a reordering of q's and k's rows: q · k is unchanged); the attention (FlashAttention-style kernel, no N x N
matrix: 5,184 tokens per image in a global block at 1008 px); the windows put back and their padding dropped before
o_proj, which adds the residual in its epilogue (a projection per token commutes with the windows' permutation); the
LayerNorm, fc1 with the GELU in its epilogue, fc2 with the residual in its. No norm after the blocks, as HF's.

Output: HF's BaseModelOutput: last_hidden_state [B, rows · columns, C] and, with output_hidden_states (True, or an
index or list of indices that keeps only those, as transformers 5.2x), the embeddings after the LayerNorm and each
block's output [B, rows, columns, C]. The stand-in holds HF's backbone (`self.model`, its forward unused) and so its
parameter tensors (an optimizer over either model trains both); on CUDA in eval mode without grad its forward replays
a CUDA graph per input shape. It trains (every op has a backward of its own). Not supported (named in the error):
attention outputs, dropout in train mode, activations other than GELU / QuickGELU, RoPE other than HF's axial one,
non-square image or patch sizes in the config.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings, _rotate_half_order
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.hf_sam import _ACTIVATIONS, window_partition, window_unpartition
from vitfast.layers import JoinedLinear
from vitfast.reference import qwen_rope_tables

# transformers class -> family
CLASSES = {"Sam3ViTModel": "sam3"}


def _square(value, what: str, f: _Findings) -> int | None:
    """An int, or a pair of equal ints (HF's configs take both), as one int; else a finding."""
    side = value if isinstance(value, int) else value[0] if isinstance(value, (list, tuple)) and len(value) == 2 \
        and value[0] == value[1] else None
    f.need(isinstance(side, int), f"{what}={value!r} (only square)")
    return side


def optimize_sam3(model: nn.Module) -> HFSam3ViTModel:
    """A transformers Sam3ViTModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0 and (dim // heads) % 4 == 0,
           f"hidden_size={dim} with num_attention_heads={heads} (the axial RoPE needs a head dim divisible by 4)")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    rope = getattr(cfg, "rope_parameters", None) or {}
    f.need(rope.get("rope_type") == "axial", f"rope_parameters={rope!r} (only rope_type 'axial')")
    _square(cfg.image_size, "image_size", f)
    _square(cfg.patch_size, "patch_size", f)
    emb = model.embeddings
    f.patchify(emb.patch_embeddings.projection, "embeddings.patch_embeddings.projection", bias=False)
    f.dropout(emb.dropout, "embeddings.dropout")
    f.layer_norm_eps(model.layer_norm, "layer_norm", dim)
    for i, layer in enumerate(model.layers):
        where = f"layers.{i}"
        for n in ("layer_norm1", "layer_norm2"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            f.linear(getattr(layer.attention, proj, None), f"{where}.attention.{proj}")
        f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
        f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
        f.dropout(getattr(layer.attention, "attention_dropout", 0.0), f"{where}.attention dropout")
        f.dropout(layer.mlp.dropout, f"{where}.mlp.dropout")
        f.dropout(layer.dropout, f"{where}.dropout")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    output = sys.modules[type(model).__module__].BaseModelOutput
    return HFSam3ViTModel(model, output).train(model.training)


class HFSam3ViTModel(nn.Module):
    """Stands in for a Sam3ViTModel: `forward(pixel_values, ...)` as HF's, returning HF's output object (module
    docstring). HF's backbone is `self.model`; `self.qkv` holds, per block, its q / k / v projections joined, q's and
    k's rows reordered for the rotate-half RoPE (`JoinedLinear`: built from HF's tensors on each access while a
    gradient is recorded, so that they train; one cached copy otherwise)."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.patch_size = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        side = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        self.grid = side // self.patch_size                        # the grid of the global blocks' positions
        order = _rotate_half_order(cfg.hidden_size, cfg.num_attention_heads)
        self.qkv = nn.ModuleList(
            JoinedLinear([(a.q_proj, "weight", "bias", None, order), (a.k_proj, "weight", "bias", None, order),
                          (a.v_proj, "weight", "bias", None)])
            for a in (layer.attention for layer in model.layers))
        self._tables: dict[int, tuple] = {}
        self._first = {}                                   # window size (0: global) -> its first block's index
        for i, layer in enumerate(model.layers):
            self._first.setdefault(layer.window_size, i)
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embeddings.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embeddings.projection.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        proj = self.model.embeddings.patch_embeddings.projection
        C, P = proj.in_channels, self.patch_size
        ok = isinstance(pixel_values, Tensor) and pixel_values.dim() == 4 and pixel_values.shape[1] == C and \
            pixel_values.shape[2] % P == 0 and pixel_values.shape[3] % P == 0 and pixel_values.shape[2] > 0 and \
            pixel_values.shape[3] > 0
        size = self.grid * P
        if ok and any(layer.window_size == 0 for layer in self.model.layers):
            ok = tuple(pixel_values.shape[2:]) == (size, size)
        if not ok:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            want = f"[B, {C}, {size}, {size}]" if any(layer.window_size == 0 for layer in self.model.layers) else \
                f"[B, {C}, H, W] with H and W multiples of {P}"
            raise ValueError(f"pixel_values: expected images {want}, got {got}")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.layers) + 1)
        x, hidden = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        out = self._output(last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden))
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _rope(self, layer: nn.Module, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [N, D/2] of a block's kind (windowed or global), from the first block of that kind's positions
        and frequencies (every block of a kind has the same): HF's float32 values (float64 for a float64 model), made
        once and kept while those buffers stay the same tensors, unmodified."""
        layer = self.model.layers[self._first[layer.window_size]]               # the first block of that kind
        pos, inv = layer.position_ids, layer.rotary_emb.inv_freq
        key = (pos.data_ptr(), pos._version, pos.dtype, inv.data_ptr(), inv._version, inv.dtype, pos.device, dtype,
               torch.is_inference_mode_enabled())      # tables made under inference_mode are never saved for backward
        cached = self._tables.get(layer.window_size)
        if cached is None or cached[0] != key:           # HF's angles: the positions (x, y) times the frequencies
            table = torch.float64 if dtype == torch.float64 else torch.float32
            cached = self._tables[layer.window_size] = (key, *qwen_rope_tables(pos, inv, table))
        return cached[1], cached[2]

    def _forward(self, pixels: Tensor, *, keep):
        m = self.model
        emb = m.embeddings
        w = emb.patch_embeddings.projection.weight
        B, D, P = pixels.shape[0], w.shape[0], self.patch_size
        R, W = pixels.shape[2] // P, pixels.shape[3] // P
        table = emb.position_embeddings                                            # [1, p², D]: the pretraining grid
        p = int(table.shape[1] ** 0.5)
        if (p, p) != (R, W):                                                         # tiled, as HF's
            table = table.reshape(1, p, p, D).repeat(1, -(-R // p), -(-W // p), 1)[:, :R, :W].reshape(1, R * W, D)
        x = ops.patch_embed(pixels.to(w.dtype), w, None, pos_embed=table, pos_embed_prefix=False)   # (B, R · W, D)
        x = ops.layer_norm(x, m.layer_norm.weight, m.layer_norm.bias, eps=m.layer_norm.eps)
        kept = keep or ()
        hidden = [x.view(B, R, W, D) if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(m.layers, self.qkv), 1):
            x = self._block(layer, qkv, x, (R, W))
            hidden.append(x.view(B, R, W, D) if i in kept else None)
        return x, hidden

    def _block(self, layer: nn.Module, qkv_proj: JoinedLinear, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """One Sam3ViTLayer on tokens x [B, R · W, C] (row-major over the R x W grid)."""
        a, mlp = layer.attention, layer.mlp
        B, N, C = x.shape
        h = ops.layer_norm(x, layer.layer_norm1.weight, layer.layer_norm1.bias, eps=layer.layer_norm1.eps)
        size = layer.window_size
        if size > 0:
            h, padded = window_partition(h.view(B, *grid, C), size)                # (B · n, size, size, C)
        tokens = size * size if size > 0 else N
        qkv = ops.linear(h.reshape(-1, tokens, C), qkv_proj.weight, qkv_proj.bias)   # (B or B · n, tokens, 3C)
        cos, sin = self._rope(layer, qkv.dtype)
        qkv = ops.rope_qkv(qkv, self.num_heads, cos, sin, inplace=True)
        o = ops.attention_qkv(qkv, self.num_heads)                                     # scale D^-½, as HF's
        if size > 0:
            o = window_unpartition(o.view(-1, size, size, C), size, padded, grid).reshape(B, N, C)
        x = ops.linear(o, a.o_proj.weight, a.o_proj.bias, residual=x)
        h = ops.layer_norm(x, layer.layer_norm2.weight, layer.layer_norm2.bias, eps=layer.layer_norm2.eps)
        h = ops.linear(h, mlp.fc1.weight, mlp.fc1.bias, activation=self.activation)
        return ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=x)
