"""ViTPose on vitfast: transformers' `VitPoseBackbone` (ViTPose's and ViTPose++'s plain ViT, top-down human pose
estimation at 256 x 192 px: 192 patches), which `VitPoseForPoseEstimation` holds as `backbone` (its heatmap head,
simple or classic, shared).

The backbone takes images pixel_values [B, C, H, W] of the configured image size (as HF's) and, for ViTPose++'s
mixture-of-experts MLPs (num_experts > 1), dataset_index [B] (each image's expert). The patch embedding is HF's
convolution with its padding of 2 (the patch grid shifted 2 pixels up and left: one copy of the image with 2 zero
rows and columns in front and its last 2 dropped, then `ops.patch_embed`), with the position rows of the patches
plus the class token's row (HF's model has no class token but adds its position row to every patch) in its epilogue.
Per block: the LayerNorm, the packed q / k / v GEMM (HF's three projections joined), the attention, the output
projection with the residual in its epilogue, the LayerNorm, fc1 with the GELU in its epilogue, fc2 with the
residual. ViTPose++'s MoE MLP: fc2 and every expert's linear joined as one GEMM (no host sync: a CUDA graph takes
dataset_index as data), each image's own expert's columns picked (an index outside the experts gives zeros, as
HF's), then the residual.

Output: HF's BackboneOutput: feature_maps, one per stage of `config.out_features` ("stem" the embeddings, "stageN"
block N), each after the final LayerNorm, as HF's [B, patches, C] tokens; with output_hidden_states, the embeddings and
each block's output. The stand-in holds HF's model (`self.model`, its forward unused) and so its parameter tensors;
on CUDA in eval mode without grad its forward replays a CUDA graph per input shape. It trains. Not supported (named
in the error): attention outputs, dropout in train mode, activations other than the GELUs and QuickGELU, a padding
of the patch convolution of half the patch size or more.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import BackboneAPI, UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.layers import JoinedLinear

# transformers class -> family
CLASSES = {"VitPoseBackbone": "vitpose"}


def optimize_vitpose(model: nn.Module) -> HFVitPoseBackbone:
    """A transformers VitPoseBackbone -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    emb = model.embeddings
    proj = emb.patch_embeddings.projection
    P = tuple(proj.kernel_size)
    pad = proj.padding if isinstance(proj.padding, tuple) else (-1, -1)
    f.need(isinstance(proj, nn.Conv2d) and tuple(proj.stride) == P and tuple(proj.dilation) == (1, 1) and
           proj.groups == 1 and proj.bias is not None and pad[0] == pad[1] and 0 <= 2 * pad[0] < min(P) and
           proj.padding_mode == "zeros",
           f"embeddings.patch_embeddings.projection: {proj} (expected a patchify Conv2d with a bias and a padding "
           f"under half the patch size)")
    f.dropout(emb.dropout, "embeddings.dropout")
    f.layer_norm_eps(model.layernorm, "layernorm", dim)
    for i, layer in enumerate(model.encoder.layer):
        where = f"encoder.layer.{i}"
        for n in ("layernorm_before", "layernorm_after"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        a = layer.attention
        for part in ("query", "key", "value"):
            f.linear(getattr(a.attention, part), f"{where}.attention.attention.{part}", bias=cfg.qkv_bias)
        f.linear(a.output.dense, f"{where}.attention.output.dense")
        if a.attention.dropout_prob > 0:
            f.train_only.append(f"dropout p={a.attention.dropout_prob:g} ({where}.attention.attention)")
        f.dropout(a.output.dropout, f"{where}.attention.output.dropout")
        f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
        f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
        for j, expert in enumerate(getattr(layer.mlp, "experts", ())):
            f.linear(expert, f"{where}.mlp.experts.{j}")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    return HFVitPoseBackbone(model, module.BackboneOutput).train(model.training)


class HFVitPoseBackbone(BackboneAPI, nn.Module):
    """Stands in for a VitPoseBackbone (`forward(pixel_values, dataset_index=None, ...)` and
    `forward_with_filtered_kwargs`, which VitPoseForPoseEstimation calls) as HF's, returning HF's BackboneOutput
    (module docstring). HF's model is `self.model`; `self.joined` holds, per block, its q / k / v projections joined
    (and ViTPose++'s fc2 with its experts), `JoinedLinear`s built from HF's tensors on each access while a gradient
    is recorded, so that they train, one cached copy otherwise. The config is HF's own object: out_features set on it
    later is read on the next call."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads, self.num_experts = cfg.num_attention_heads, cfg.num_experts
        self.joined = nn.ModuleList()
        for layer in model.encoder.layer:
            a = layer.attention.attention
            bias = "bias" if a.query.bias is not None else None
            parts = dict(qkv=JoinedLinear([(m, "weight", bias, None) for m in (a.query, a.key, a.value)]))
            if self.num_experts > 1:                  # fc2's rows, then each expert's
                parts["fc2"] = JoinedLinear([(m, "weight", "bias", None) for m in (layer.mlp.fc2, *layer.mlp.experts)])
            self.joined.append(nn.ModuleDict(parts))
        self.activation = _ACTIVATIONS[cfg.hidden_act]
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

    @property
    def stage_names(self) -> list[str]:
        return list(self.config.stage_names)

    @property
    def num_features(self) -> list[int]:
        return list(self.model.num_features)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def forward(self, pixel_values=None, dataset_index=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        cfg = self.config
        if output_attentions or getattr(cfg, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        proj = self.model.embeddings.patch_embeddings.projection
        size = tuple(self.model.embeddings.patch_embeddings.image_size)
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or \
                tuple(pixel_values.shape[1:]) != (proj.in_channels, *size):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected images [B, {proj.in_channels}, {size[0]}, {size[1]}] (the "
                             f"model's image size), got {got}")
        B = pixel_values.shape[0]
        index = None
        if self.num_experts > 1:
            if not isinstance(dataset_index, Tensor) or dataset_index.numel() != B or dataset_index.is_floating_point():
                got = (f"{tuple(dataset_index.shape)} {dataset_index.dtype}" if isinstance(dataset_index, Tensor)
                       else type(dataset_index).__name__)
                raise ValueError(f"dataset_index: expected integer indices [B] = [{B}] (num_experts="
                                 f"{self.num_experts}: each image's expert), got {got}")
            index = dataset_index.reshape(B).to(device=pixel_values.device, dtype=torch.long)
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        maps, hidden = self.cuda_graphs(self, self._forward, pixel_values, index, stages=tuple(self.out_features),
                                        keep_hidden=bool(output_hidden_states))
        result = self._output(feature_maps=tuple(maps), hidden_states=tuple(hidden) if hidden else None)
        use_dict = return_dict if return_dict is not None else getattr(cfg, "return_dict", True)
        return result if use_dict else result.to_tuple()

    def _forward(self, pixels: Tensor, index: Tensor | None, *, stages: tuple[str, ...], keep_hidden: bool):
        m = self.model
        emb = m.embeddings
        proj = emb.patch_embeddings.projection
        w, pad = proj.weight, proj.padding[0]
        if pad:                                               # HF's padding: the patch grid shifted by `pad` pixels
            pixels = F.pad(pixels, (pad, -pad, pad, -pad))
        table = emb.position_embeddings[:, 1:] + emb.position_embeddings[:, :1]
        x = ops.patch_embed(pixels.to(w.dtype), w, proj.bias, pos_embed=table, pos_embed_prefix=False)
        hidden = [x]
        for layer, joined in zip(m.encoder.layer, self.joined):
            x = self._block(layer, joined, x, index)
            hidden.append(x)
        norm = m.layernorm
        maps = [ops.layer_norm(h, norm.weight, norm.bias, eps=norm.eps)
                for stage, h in zip(self.stage_names, hidden) if stage in stages]
        return maps, hidden if keep_hidden else None

    def _block(self, layer: nn.Module, joined: nn.ModuleDict, x: Tensor, index: Tensor | None) -> Tensor:
        """One VitPoseBackboneLayer on tokens x [B, N, C]."""
        qkv, o, mlp = joined["qkv"], layer.attention.output.dense, layer.mlp
        n1, n2 = layer.layernorm_before, layer.layernorm_after
        h = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv.weight, qkv.bias)
        x = ops.linear(ops.attention_qkv(h, self.num_heads), o.weight, o.bias, residual=x)
        h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), mlp.fc1.weight, mlp.fc1.bias,
                       activation=self.activation)
        if index is None:
            return ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=x)
        fc2 = joined["fc2"]                                   # [shared | expert 0 | expert 1 | ...] columns
        B, N, _ = h.shape
        E, part = self.num_experts, mlp.part_features
        shared, experts = ops.linear(h, fc2.weight, fc2.bias).split([x.shape[-1] - part, E * part], dim=-1)
        pick = index.clamp(0, E - 1).view(B, 1, 1, 1).expand(B, N, 1, part)
        own = torch.gather(experts.unflatten(-1, (E, part)), 2, pick).squeeze(2)
        own = own * ((index >= 0) & (index < E)).view(B, 1, 1).to(own.dtype)
        return torch.cat([shared, own], dim=-1) + x
