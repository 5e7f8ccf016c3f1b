"""Step3p7's vision tower on vitfast: transformers' `Step3p7VisionModel` (StepFun's Step3p7: a 47-block ViT over images
of 728 px, 2,704 patches of 14, with an axial 2D RoPE and layer-scales, then two stride-2 convolutions), which
`Step3p7Model` and `Step3p7ForConditionalGeneration` hold as `vision_model`.

The tower takes images pixel_values [B, C, H, W] of any size whose sides are multiples of the patch size (HF's table
is resized to the patch grid by HF's own method, bilinear). The patch embedding (HF's Conv2d without bias) is one
`ops.patch_embed` with that table in its epilogue, then the pre-LayerNorm. Per block: the LayerNorm, the packed
q / k / v GEMM (HF's three projections joined), the 2D RoPE on q and k (`ops.rope_qkv` with HF's own angle tables,
an angle per column), the attention, the output projection with lambda_1 and the residual in its epilogue, the
LayerNorm, fc1 with its activation in its epilogue, fc2 with lambda_2 and the residual. Then HF's two downsampling
convolutions (shared).

Output: HF's BaseModelOutput: last_hidden_state [B, N / 16, 4·C], and with output_hidden_states (True, or an index or
list of indices that keeps only those) the embeddings and each block's output. The stand-in holds HF's model
(`self.model`, its forward unused) and so its parameter tensors; it trains; on CUDA in eval mode without grad its
forward replays a CUDA graph per input shape. Not supported (named in the error): attention outputs, dropout in
train mode, activations other than the GELUs and QuickGELU.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _Findings
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.hf_vitlayer import HFStandIn, joined_qkv_proj

# transformers class -> family
CLASSES = {"Step3p7VisionModel": "step3p7"}


def optimize_step3p7(model: nn.Module) -> HFStep3p7VisionModel:
    """A transformers Step3p7VisionModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0 and (dim // heads) % 4 == 0,
           f"hidden_size={dim} with num_attention_heads={heads} (the 2D RoPE needs a head dim divisible by 4)")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    f.patchify(model.embeddings.patch_embedding, "embeddings.patch_embedding", bias=False)
    f.layer_norm_eps(model.pre_layernorm, "pre_layernorm", dim)
    for i, layer in enumerate(model.layers):
        where = f"layers.{i}"
        for n in ("layernorm_before", "layernorm_after"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        a = layer.self_attn
        for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
            f.linear(getattr(a, part), f"{where}.self_attn.{part}", bias=False)
        f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
        f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
    if getattr(cfg, "attention_dropout", 0.0):
        f.train_only.append(f"dropout p={cfg.attention_dropout:g} (attention)")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    return HFStep3p7VisionModel(model, module.BaseModelOutput).train(model.training)


class HFStep3p7VisionModel(HFStandIn):
    """Stands in for a Step3p7VisionModel (`forward(pixel_values, ...)`) as HF's, returning HF's output object (module
    docstring). HF's model is `self.model`; `self.qkv` holds, per block, its q / k / v projections joined,
    `JoinedLinear`s built from HF's tensors on each access while a gradient is recorded, so that they train, one
    cached copy otherwise."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__(model, output)
        cfg = self.config
        self.num_heads = cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        H = self.num_heads
        self.qkv = nn.ModuleList(joined_qkv_proj(layer.self_attn, H, H, layer.self_attn.head_dim)
                                 for layer in model.layers)

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        cfg = self.config
        keep = self._keep(output_attentions, output_hidden_states)
        P, C = self.model.embeddings.patch_size, cfg.num_channels
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != C or \
                pixel_values.shape[2] % P or pixel_values.shape[3] % P or 0 in pixel_values.shape[2:]:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected images [B, {C}, H, W] with H and W multiples of {P}, got {got}")
        x, hidden = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        return self._result(return_dict, last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden))

    def _forward(self, pixels: Tensor, *, keep):
        m = self.model
        emb = m.embeddings
        w = emb.patch_embedding.weight
        P = emb.patch_size
        B, _, H, W = pixels.shape
        gh, gw = H // P, W // P
        table = emb.interpolate_pos_encoding(torch.empty(1, 1, w.shape[0], device="meta", dtype=w.dtype), H, W)
        x = ops.patch_embed(pixels.to(w.dtype), w, None, pos_embed=table.to(w.dtype), pos_embed_prefix=False)
        n = m.pre_layernorm
        x = ops.layer_norm(x, n.weight, n.bias, eps=n.eps)
        rows = torch.arange(gh, device=x.device)[:, None].expand(gh, gw).reshape(-1)
        cols = torch.arange(gw, device=x.device)[None, :].expand(gh, gw).reshape(-1)
        cos, sin = m.rotary_emb(x, torch.stack([rows, cols], -1))        # HF's angles [N, D], an angle per column
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        cos, sin = cos.to(table_dtype), sin.to(table_dtype)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(m.layers, self.qkv), 1):
            a, fc1, fc2 = layer.self_attn, layer.mlp.fc1, layer.mlp.fc2
            n1, n2 = layer.layernorm_before, layer.layernorm_after
            h = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv.weight, qkv.bias)
            h = ops.rope_qkv(h, self.num_heads, cos, sin)
            x = ops.linear(ops.attention_qkv(h, self.num_heads), a.out_proj.weight, a.out_proj.bias, residual=x,
                           scale=layer.lambda_1)
            h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), fc1.weight, fc1.bias,
                           activation=self.activation)
            x = ops.linear(h, fc2.weight, fc2.bias, residual=x, scale=layer.lambda_2)
            hidden.append(x if i in kept else None)
        maps = x.transpose(1, 2).reshape(B, x.shape[-1], gh, gw)
        maps = m.downsampler2(m.downsampler1(maps))
        return maps.flatten(2).transpose(1, 2), hidden
