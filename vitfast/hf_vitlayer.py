"""Hugging Face's ViT-layout layer on vitfast: the block of transformers' ViTLayer, which VideoMAE's, YOLOS's and
DPT's models copy under their own names (layernorm_before, attention.attention.query / key / value,
attention.output.dense, layernorm_after, intermediate.dense, output.dense). Per block: the LayerNorm, the packed
q / k / v GEMM (HF's three projections joined, a missing bias as zeros), the attention, the output projection with the
residual in its epilogue, the LayerNorm, the intermediate GEMM with its activation in its epilogue, the output GEMM
with the residual."""

from __future__ import annotations

from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _Findings
from vitfast.layers import JoinedLinear


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


def vit_layer(layer: nn.Module, qkv: JoinedLinear, x: Tensor, num_heads: int, activation: str) -> Tensor:
    """One ViT-layout layer on tokens x [B, N, C] (module docstring)."""
    o, fc1, fc2 = layer.attention.output.dense, layer.intermediate.dense, layer.output.dense
    n1, n2 = layer.layernorm_before, layer.layernorm_after
    h = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv.weight, qkv.bias)
    x = ops.linear(ops.attention_qkv(h, num_heads), o.weight, o.bias, residual=x)
    h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), fc1.weight, fc1.bias, activation=activation)
    return ops.linear(h, fc2.weight, fc2.bias, residual=x)
