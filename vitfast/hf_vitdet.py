"""ViTDet on vitfast: transformers' `VitDetModel` and `VitDetBackbone` (the plain ViT backbone of ViTDet: windowed
and global blocks with decomposed relative positions, SAM's design, and residual conv blocks between them), which
`VitMatteForImageMatting` (ViTMatte: image matting from an image and its trimap, 4 channels in) holds as `backbone`
(its detail-capture decoder shared).

The model takes images pixel_values [B, C, H, W] of any size (pixels past whole patches dropped, as HF's
convolution drops them). The patch embedding is one `ops.patch_embed` with the absolute position table (HF's,
pretrained for a square grid, its class row dropped, resized bicubically to this grid as HF's) in its epilogue; the
tokens stay row-major [B, rows · columns, C]. Per block, as `vitfast.hf_sam`'s: the LayerNorm; in a windowed block
the grid zero-padded to whole windows and cut into windows (as HF's); the qkv GEMM; the attention with the decomposed
relative positions added to its scores inside the kernel (`ops.attention_qkv(rel_pos=...)`, HF's tables resampled
to the window or grid as HF's); the windows put back before the output projection, which adds the residual in its
epilogue; the LayerNorm, fc1 with the GELU in its epilogue, fc2 with the residual; then, in the blocks of
`residual_block_indices`, HF's bottleneck conv block (shared) on the channels-first view.

Output: HF's BaseModelOutput (last_hidden_state [B, C, rows, columns], a channels-first view as HF's) or, for the
backbone, BackboneOutput (the `out_features` stages' maps, "stem" the embeddings); with output_hidden_states, the
embeddings and each block's output, channels-first. The stand-in holds HF's model (`self.model`, its forward unused)
and so its parameter tensors; on CUDA in eval mode without grad its forward replays a CUDA graph per input shape. It
trains. Not supported (named in the error): attention outputs, dropout and drop-path in train mode, activations other
than the GELUs and QuickGELU.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import BackboneAPI, UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.hf_sam import _ACTIVATIONS, window_partition, window_unpartition
from vitfast.hf_vitlayer import check_images
from vitfast.reference import sam_rel_pos

# transformers class -> family
CLASSES = {"VitDetModel": "vitdet", "VitDetBackbone": "vitdet"}


def optimize_vitdet(model: nn.Module) -> HFVitDetModel:
    """A transformers VitDetModel or VitDetBackbone -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    f.patchify(model.embeddings.projection, "embeddings.projection")
    for i, layer in enumerate(model.encoder.layer):
        where = f"encoder.layer.{i}"
        for n in ("norm1", "norm2"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        f.linear(layer.attention.qkv, f"{where}.attention.qkv", bias=cfg.qkv_bias)
        f.linear(layer.attention.proj, f"{where}.attention.proj")
        f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
        f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
        f.dropout(layer.mlp.drop, f"{where}.mlp.drop")
        f.dropout(layer.drop_path, f"{where}.drop_path", "drop-path")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    if name == "VitDetBackbone":
        return HFVitDetBackbone(model, module.BackboneOutput).train(model.training)
    return HFVitDetModel(model, module.BaseModelOutput).train(model.training)


class HFVitDetModel(nn.Module):
    """Stands in for a VitDetModel (`forward(pixel_values, ...)`) as HF's, returning HF's output object (module
    docstring). HF's model is `self.model`: its packed qkv projections are used as they are."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.projection.weight.device

    @property
    def embeddings(self) -> nn.Module:
        return self.model.embeddings

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.projection

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        cfg = self.config
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        x, hidden = self._tokens(pixel_values, output_attentions, kept_hidden_states(output_hidden_states,
                                                                                    len(self.model.encoder.layer) + 1))
        out = self._output(last_hidden_state=x, hidden_states=hidden)
        use_dict = return_dict if return_dict is not None else getattr(cfg, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _tokens(self, pixel_values, output_attentions, keep):
        """The checks, then (the last block's output [B, C, rows, columns], the kept hidden states or None)."""
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        proj = self.model.embeddings.projection
        check_images(pixel_values, proj.in_channels, proj.kernel_size[0])
        x, hidden = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        return x, None if keep is None else tuple(hidden)

    def _forward(self, pixels: Tensor, *, keep):
        m = self.model
        emb = m.embeddings
        proj = emb.projection
        w, P = proj.weight, proj.kernel_size[0]
        B, D = pixels.shape[0], w.shape[0]
        grid = (pixels.shape[2] // P, pixels.shape[3] // P)
        pos = None
        if emb.position_embeddings is not None:                    # the class row dropped, resized as HF's
            table = emb.position_embeddings[:, 1:]
            n = int(table.shape[1] ** 0.5)
            if grid != (n, n):
                table = F.interpolate(table.reshape(1, n, n, D).permute(0, 3, 1, 2), size=grid, mode="bicubic",
                                      align_corners=False).permute(0, 2, 3, 1)
            pos = table.reshape(1, grid[0] * grid[1], D)
        pixels = pixels[:, :, :grid[0] * P, :grid[1] * P]          # whole patches, as the convolution
        x = ops.patch_embed(pixels.to(w.dtype), w, proj.bias, pos_embed=pos, pos_embed_prefix=False)
        maps = lambda t: t.view(B, *grid, D).permute(0, 3, 1, 2)   # noqa: E731  HF's channels-first view
        kept = keep or ()
        hidden = [maps(x) if 0 in kept else None]
        for i, layer in enumerate(m.encoder.layer, 1):
            x = self._block(layer, x, grid)
            hidden.append(maps(x) if i in kept else None)
        return maps(x), hidden

    def _block(self, layer: nn.Module, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """One VitDetLayer on tokens x [B, rows · columns, C] (row-major)."""
        a, mlp = layer.attention, layer.mlp
        B, N, C = x.shape
        h = ops.layer_norm(x, layer.norm1.weight, layer.norm1.bias, eps=layer.norm1.eps)
        size = layer.window_size
        if size > 0:
            h, padded = window_partition(h.view(B, *grid, C), size)                 # (B · n, size, size, C)
        rows, cols = (size, size) if size > 0 else grid
        qkv = ops.linear(h.reshape(-1, rows * cols, C), a.qkv.weight, a.qkv.bias)
        rel = None
        if a.use_relative_position_embeddings:
            q = qkv.unflatten(2, (3, self.num_heads, -1))[:, :, 0].transpose(1, 2)  # (.., H, rows · cols, D), a view
            table_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
            rel = sam_rel_pos(q, a.rel_pos_h, a.rel_pos_w, (rows, cols), table_dtype)
        o = ops.attention_qkv(qkv, self.num_heads, rel_pos=rel)                      # scale D^-½, as HF's
        if size > 0:
            o = window_unpartition(o.view(-1, size, size, C), size, padded, grid).reshape(B, N, C)
        x = ops.linear(o, a.proj.weight, a.proj.bias, residual=x)
        h = ops.layer_norm(x, layer.norm2.weight, layer.norm2.bias, eps=layer.norm2.eps)
        h = ops.linear(h, mlp.fc1.weight, mlp.fc1.bias, activation=self.activation)
        x = ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=x)
        if layer.use_residual_block:                               # HF's bottleneck conv block, channels-first
            y = layer.residual(x.view(B, *grid, C).permute(0, 3, 1, 2))
            x = y.permute(0, 2, 3, 1).reshape(B, N, C)
        return x


class HFVitDetBackbone(BackboneAPI, HFVitDetModel):
    """Stands in for a VitDetBackbone (ViTMatte's `backbone`): `forward(pixel_values, ...)` and
    `forward_with_filtered_kwargs` as HF's, returning HF's BackboneOutput: one feature map [B, C, rows, columns] per
    stage of `config.out_features` ("stem" the embeddings, "stageN" block N). The config is HF's own object:
    out_features set on it later is read on the next call."""

    @property
    def stage_names(self) -> list[str]:
        return list(self.config.stage_names)

    @property
    def num_features(self) -> list[int]:
        return list(self.model.num_features)

    def forward(self, pixel_values=None, output_hidden_states=None, output_attentions=None, return_dict=None,
                **kwargs):
        cfg = self.config
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        stages = [self.stage_names.index(s) for s in self.out_features]     # only those kept, unless all are asked
        keep = kept_hidden_states(True if output_hidden_states else stages, len(self.stage_names))
        _, hidden = self._tokens(pixel_values, output_attentions, keep)
        maps = tuple(hidden[i] for i in stages)
        result = self._output(feature_maps=maps, hidden_states=hidden if output_hidden_states else None)
        use_dict = return_dict if return_dict is not None else getattr(cfg, "return_dict", True)
        return result if use_dict else result.to_tuple()
