"""Hugging Face's ViT-layout layer on vitfast: the block of transformers' ViTLayer, which VideoMAE's, YOLOS's and
DPT's models copy under their own names (layernorm_before, attention.attention.query / key / value,
attention.output.dense, layernorm_after, intermediate.dense, output.dense). Per block: the LayerNorm, the packed
q / k / v GEMM (HF's three projections joined, a missing bias as zeros), the attention, the output projection with the
residual in its epilogue, the LayerNorm, the intermediate GEMM with its activation in its epilogue, the output GEMM
with the residual. `ViTLayoutStandIn` is the shared shape of those models' stand-ins."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.layers import JoinedLinear


def check_images(pixel_values, channels: int, patch: int) -> None:
    """pixel_values [B, channels, H, W] of any size of at least one patch (a patchify convolution drops what whole
    patches do not cover), or a ValueError naming it."""
    if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != channels or \
            pixel_values.shape[2] < patch or pixel_values.shape[3] < patch:
        got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
        raise ValueError(f"pixel_values: expected images [B, {channels}, H, W] with H and W at least {patch}, got "
                         f"{got}")


def check_layers(f: _Findings, layers: nn.ModuleList, dim: int, where: str = "encoder.layer") -> None:
    """What vitfast runs of each layer, into `f`: LayerNorms, nn.Linears, dropouts (train mode only)."""
    for i, layer in enumerate(layers):
        at = f"{where}.{i}"
        for n in ("layernorm_before", "layernorm_after"):
            f.layer_norm_eps(getattr(layer, n), f"{at}.{n}", dim)
        a = layer.attention
        for part in ("query", "key", "value"):
            f.linear(getattr(a.attention, part), f"{at}.attention.attention.{part}", bias=False)
        f.linear(a.output.dense, f"{at}.attention.output.dense")
        if a.attention.dropout_prob > 0:
            f.train_only.append(f"dropout p={a.attention.dropout_prob:g} ({at}.attention.attention)")
        f.dropout(a.output.dropout, f"{at}.attention.output.dropout")
        f.linear(layer.intermediate.dense, f"{at}.intermediate.dense")
        f.linear(layer.output.dense, f"{at}.output.dense")
        f.dropout(layer.output.dropout, f"{at}.output.dropout")


def joined_qkv(layers: nn.ModuleList) -> nn.ModuleList:
    """Per layer, its q / k / v projections as one `JoinedLinear` over HF's tensors (built from them on each access
    while a gradient is recorded, so that they train; one cached copy otherwise)."""
    return nn.ModuleList(
        JoinedLinear([(m, "weight", "bias" if m.bias is not None else None, None) for m in (a.query, a.key, a.value)])
        for a in (layer.attention.attention for layer in layers))


def _kv_order(heads: int, kv_heads: int, head_dim: int) -> list[int] | None:
    """The key / value rows for each query head (HF's repeat_kv: head h reads key / value head h // group), or None
    without grouping."""
    if kv_heads == heads:
        return None
    group = heads // kv_heads
    return [(h // group) * head_dim + d for h in range(heads) for d in range(head_dim)]


def joined_qkv_proj(attn: nn.Module, heads: int, kv_heads: int, head_dim: int) -> JoinedLinear:
    """An attention's q_proj / k_proj / v_proj (HF's ViViT, Step3p7's, the SigLIP-layout towers') as one
    `JoinedLinear` over HF's tensors, a missing bias as zeros (grouped-query attention, kv_heads < heads: each key /
    value head's rows repeated for its query heads)."""
    order = _kv_order(heads, kv_heads, head_dim)
    bias = lambda m: "bias" if m.bias is not None else None
    return JoinedLinear([(attn.q_proj, "weight", bias(attn.q_proj), None)] + [
        (m, "weight", bias(m), None) + ((order,) if order is not None else ()) for m in (attn.k_proj, attn.v_proj)])


def vit_layer(layer: nn.Module, qkv: JoinedLinear, x: Tensor, num_heads: int, activation: str) -> Tensor:
    """One ViT-layout layer on tokens x [B, N, C] (module docstring)."""
    o, fc1, fc2 = layer.attention.output.dense, layer.intermediate.dense, layer.output.dense
    n1, n2 = layer.layernorm_before, layer.layernorm_after
    h = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv.weight, qkv.bias)
    x = ops.linear(ops.attention_qkv(h, num_heads), o.weight, o.bias, residual=x)
    h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), fc1.weight, fc1.bias, activation=activation)
    return ops.linear(h, fc2.weight, fc2.bias, residual=x)


class HFStandIn(nn.Module):
    """The shared shape of the stand-ins that hold HF's model as `self.model` (its forward unused) and run its blocks
    on vitfast's ops (VideoMAE's, YOLOS's, DPT's, BEiT's, ViViT's, Molmo2's, HunYuan-VL's, Step3p7's): its config and
    output class, a CUDA-graph runner, its dtype and device; `_keep` (the forward's refusal of attention outputs and
    the hidden states to keep) and `_result` (HF's output object, or its tuple) for the subclass's forward, which
    names its blocks in `_blocks`."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        self.config, self.model, self._output = model.config, model, output
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype             # one dtype and device (checked by optimize)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _blocks(self) -> nn.ModuleList:
        return self.model.layers

    def _keep(self, output_attentions, output_hidden_states) -> tuple[int, ...] | None:
        """Attention outputs refused by name; the hidden states to return (`kept_hidden_states`: the embeddings and
        each block's output)."""
        cfg = self.config
        if output_attentions or getattr(cfg, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        return kept_hidden_states(output_hidden_states, len(self._blocks()) + 1)

    def _result(self, return_dict, **fields):
        out = self._output(**fields)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()


class ViTLayoutStandIn(HFStandIn):
    """The stand-ins for HF's ViT-layout models (VideoMAE's, YOLOS's, DPT's): `HFStandIn` with per block its q / k / v
    joined (`joined_qkv`)."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__(model, output)
        self.num_heads = self.config.num_attention_heads
        self.qkv = joined_qkv(model.encoder.layer)
        self.activation = _ACTIVATIONS[self.config.hidden_act]

    @property
    def embeddings(self) -> nn.Module:
        return self.model.embeddings

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def _blocks(self) -> nn.ModuleList:
        return self.model.encoder.layer
