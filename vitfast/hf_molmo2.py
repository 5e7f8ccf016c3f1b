"""Molmo2's vision tower on vitfast: transformers' `Molmo2VisionModel` (AI2's Molmo2: a SigLIP-so400m-style ViT over
crops of 378 px, 729 patches of 14, 16 heads of 72), which `Molmo2Model` and `Molmo2ForConditionalGeneration` hold as
`vision_tower` (their adapter reads its hidden states at `vision_feature_layer`).

The tower takes patchified crops pixel_values [B, N, P·P·C] (the processor's flattened patches; N the configured
num_position_embeddings, as HF's table is added as is). The patch embedding (HF's nn.Linear over the flattened
patches) is one GEMM, then HF's position table. Per block: the LayerNorm, the packed q / k / v GEMM (HF's three
projections joined; with grouped-query attention, num_key_value_heads < num_attention_heads, each key / value head's
rows repeated for its query heads, so that their gradients sum back into HF's), the attention, the output projection
with the residual in its epilogue, the LayerNorm, fc1 with its activation in its epilogue, fc2 with the residual. No
final norm, as HF's.

Output: HF's BaseModelOutputWithPooling: last_hidden_state, pooler_output (the tokens' mean, as HF's), and with
output_hidden_states (True, or an index or list of indices that keeps only those) the embeddings and each block's
output. The stand-in holds HF's model (`self.model`, its forward unused) and so its parameter tensors; it trains; on
CUDA in eval mode without grad its forward replays a CUDA graph per input shape. Not supported (named in the error):
attention outputs, dropout in train mode, activations other than the GELUs and QuickGELU.
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _Findings
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.hf_vitlayer import HFStandIn, joined_qkv_proj

# transformers class -> family
CLASSES = {"Molmo2VisionModel": "molmo2"}


def encoder_layer(layer: nn.Module, qkv: nn.Module, x: Tensor, num_heads: int, activation: str,
                  cu_seqlens: Tensor | None = None, max_seqlen: int | None = None) -> Tensor:
    """One SigLIP-layout encoder layer (layer_norm1, self_attn.q / k / v / o_proj, layer_norm2, mlp.fc1 / fc2: Molmo2's,
    HunYuan-VL's) on tokens x [B, N, C], its attention within each segment of cu_seqlens where given."""
    o, fc1, fc2 = layer.self_attn.o_proj, layer.mlp.fc1, layer.mlp.fc2
    n1, n2 = layer.layer_norm1, layer.layer_norm2
    h = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv.weight, qkv.bias)
    h = ops.attention_qkv(h, num_heads, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    x = ops.linear(h, o.weight, o.bias, residual=x)
    h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), fc1.weight, fc1.bias, activation=activation)
    return ops.linear(h, fc2.weight, fc2.bias, residual=x)


def optimize_molmo2(model: nn.Module) -> HFMolmo2VisionModel:
    """A transformers Molmo2VisionModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads, kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or dim // heads
    f.need(heads % kv_heads == 0, f"num_attention_heads={heads} with num_key_value_heads={kv_heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    f.linear(model.patch_embedding, "patch_embedding")
    for i, layer in enumerate(model.layers):
        where = f"layers.{i}"
        for n in ("layer_norm1", "layer_norm2"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        a = layer.self_attn
        widths = {"q_proj": heads * head_dim, "k_proj": kv_heads * head_dim, "v_proj": kv_heads * head_dim}
        for part, width in widths.items():
            m = getattr(a, part)
            f.linear(m, f"{where}.self_attn.{part}", bias=False) and f.need(
                m.out_features == width, f"{where}.self_attn.{part} width {m.out_features} (expected {width})")
        f.linear(a.o_proj, f"{where}.self_attn.o_proj", bias=False)
        if a.attention_dropout > 0:
            f.train_only.append(f"dropout p={a.attention_dropout:g} ({where}.self_attn)")
        f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
        f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    return HFMolmo2VisionModel(model, module.BaseModelOutputWithPooling, heads, kv_heads,
                               head_dim).train(model.training)


class HFMolmo2VisionModel(HFStandIn):
    """Stands in for a Molmo2VisionModel (`forward(pixel_values, ...)`) as HF's, returning HF's output object (module
    docstring). HF's model is `self.model`; `self.qkv` holds, per block, its q / k / v projections joined,
    `JoinedLinear`s built from HF's tensors on each access while a gradient is recorded, so that they train, one cached
    copy otherwise."""

    def __init__(self, model: nn.Module, output: type, heads: int, kv_heads: int, head_dim: int):
        super().__init__(model, output)
        cfg = self.config
        self.num_heads = heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.qkv = nn.ModuleList(joined_qkv_proj(layer.self_attn, heads, kv_heads, head_dim) for layer in model.layers)

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        keep = self._keep(output_attentions, output_hidden_states)
        width, n = self.model.patch_embedding.in_features, self.model.positional_embedding.shape[0]
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 3 or \
                tuple(pixel_values.shape[1:]) != (n, width):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected patchified crops [B, {n}, {width}] (the model's position "
                             f"table's patches, each flattened), got {got}")
        x, hidden = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        return self._result(return_dict, last_hidden_state=x, pooler_output=x.mean(dim=1),
                            hidden_states=None if keep is None else tuple(hidden))

    def _forward(self, patches: Tensor, *, keep):
        m = self.model
        pe = m.patch_embedding
        x = ops.linear(patches.to(pe.weight.dtype), pe.weight, pe.bias) + m.positional_embedding.to(pe.weight.dtype)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(m.layers, self.qkv), 1):
            x = encoder_layer(layer, qkv, x, self.num_heads, self.activation)
            hidden.append(x if i in kept else None)
        return x, hidden
