"""Llama 4's vision tower on vitfast: transformers' `Llama4VisionModel`, the vision model of Llama 4 Scout and
Maverick (`Llama4ForConditionalGeneration.vision_model`, which `vitfast.optimize` copies with the tower replaced).

The tower takes image tiles pixel_values [n, C, S, S] of the configured size S. The patch embedding (HF's Unfold and
a Linear without bias: a patchify convolution) is one `ops.patch_embed` with the patches' rows of the position table
added in its epilogue; the class token, with its own row of the table, goes after the patches (Llama 4 puts it last);
then the LayerNorm before the blocks, and per block: LayerNorm, the packed q / k / v GEMM (HF's three projections
joined), the 2D RoPE on q and k (`ops.rope_qkv`, HF's own angles; HF rotates interleaved pairs, which run as
rotate-half ones through a reordering of q's and k's rows: q · k is unchanged; the class token's angles are zero),
attention, o_proj with the residual in its epilogue, LayerNorm, fc1 with the GELU in its epilogue, fc2 with the
residual in its. Then the LayerNorm after the blocks, the class token dropped, and the vision adapter: the pixel
shuffle (HF's reshapes) and its two linears, each with the GELU in its epilogue.

Output: HF's BaseModelOutputWithPooling: last_hidden_state [n, N', projector_output_dim] (the adapter's output, what
the VLM's projector takes) and, with output_hidden_states (any true value, as HF's reads it), the embeddings and each
block's output. The stand-in holds HF's parameter tensors (an optimizer over either model trains both); on CUDA in
eval mode without grad its forward replays a CUDA graph per input shape. attention_mask is taken and ignored, as
HF's tower does. Not supported (named in the error): attention outputs.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _build, _Findings, _mlp_ratio, _rotate_half_order
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states, renamed_state
from vitfast.layers import Block, JoinedLinear, LayerNorm

# transformers class -> family
CLASSES = {"Llama4VisionModel": "llama4"}
# HF's key -> the tower's (each replacement applied in turn)
_RENAME = (("model.layers.", "blocks."), (".input_layernorm.", ".norm1."), (".post_attention_layernorm.", ".norm2."),
           (".self_attn.o_proj.", ".attn.proj."))


class Llama4Tower(nn.Module):
    """The parameters of Llama 4's vision model in vitfast's layers (HF's tensors, adopted by `_build`), under HF's
    names where vitfast has no other: patch_embedding.linear, class_embedding, positional_embedding_vlm,
    layernorm_pre, blocks (timm's Block: norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2, all with biases),
    layernorm_post, vision_adapter.mlp.fc1 / fc2 (without bias)."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, hidden: int, in_chans: int, patch_size: int,
                 num_patches: int, adapter_in: int, adapter_mid: int, adapter_out: int, eps: float = 1e-5):
        super().__init__()
        self.patch_embedding = nn.Module()
        self.patch_embedding.linear = nn.Linear(in_chans * patch_size * patch_size, embed_dim, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(embed_dim))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(num_patches + 1, embed_dim))
        self.layernorm_pre = LayerNorm(embed_dim, eps=eps)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio=_mlp_ratio(hidden, embed_dim), eps=eps)
                                     for _ in range(depth)])
        self.layernorm_post = LayerNorm(embed_dim, eps=eps)
        self.vision_adapter = nn.Module()
        self.vision_adapter.mlp = nn.Module()
        self.vision_adapter.mlp.fc1 = nn.Linear(adapter_in, adapter_mid, bias=False)
        self.vision_adapter.mlp.fc2 = nn.Linear(adapter_out, adapter_out, bias=False)


def optimize_llama4(model: nn.Module) -> HFLlama4VisionModel:
    """A transformers Llama4VisionModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    layers = list(model.model.layers)
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0 and (dim // heads) % 2 == 0,
           f"hidden_size={dim} with num_attention_heads={heads} (RoPE needs an even head dim)")
    ratio = float(cfg.pixel_shuffle_ratio)
    f.need(ratio > 0 and round(1 / ratio) == 1 / ratio, f"pixel_shuffle_ratio={ratio} (only 1 / an integer)")
    norms = [("layernorm_pre", model.layernorm_pre), ("layernorm_post", model.layernorm_post),
             *((f"model.layers.{i}.{n}", getattr(layer, n)) for i, layer in enumerate(layers)
               for n in ("input_layernorm", "post_attention_layernorm"))]
    eps = {f.layer_norm_eps(m, where, dim) for where, m in norms}
    f.need(len(eps) == 1, f"LayerNorms with different eps ({eps})")
    for i, layer in enumerate(layers):
        a, m, where = layer.self_attn, layer.mlp, f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            f.linear(getattr(a, proj, None), f"{where}.self_attn.{proj}")
        f.linear(m.fc1, f"{where}.mlp.fc1")
        f.linear(m.fc2, f"{where}.mlp.fc2")
        f.need(type(getattr(m, "activation_fn", None)) is nn.GELU and m.activation_fn.approximate == "none",
               f"{where}.mlp.activation_fn: {type(getattr(m, 'activation_fn', None)).__name__} (only exact GELU)")
        f.dropout(getattr(a, "attention_dropout", 0.0), f"{where}.self_attn dropout")
    adapter = model.vision_adapter.mlp
    f.dropout(getattr(adapter, "dropout", 0.0), "vision_adapter.mlp dropout")
    for part in ("fc1", "fc2"):
        lin = getattr(adapter, part, None)
        f.linear(lin, f"vision_adapter.mlp.{part}", bias=False) and f.need(lin.bias is None,
                                                                          f"vision_adapter.mlp.{part} with bias")
    f.check(model.training)                  # dropout: refused in train mode
    state = renamed_state(model, _RENAME)
    order = _rotate_half_order(dim, heads)
    for i in range(len(layers)):          # the packed qkv, joined from HF's projections after the build
        pre = f"blocks.{i}."
        for part in ("weight", "bias"):
            q, k, v = (state.pop(f"{pre}self_attn.{p}_proj.{part}") for p in "qkv")
            state[f"{pre}attn.qkv.{part}"] = torch.cat([q[order], k[order], v]).detach()
    linear = model.patch_embedding.linear
    P = model.patch_size
    tower_cfg = dict(embed_dim=dim, depth=len(layers), num_heads=heads, hidden=layers[0].mlp.fc1.out_features,
                     in_chans=linear.in_features // (P * P), patch_size=P, num_patches=model.num_patches - 1,
                     adapter_in=adapter.fc1.in_features, adapter_mid=adapter.fc1.out_features,
                     adapter_out=adapter.fc2.out_features, eps=eps.pop())
    tower = _build(tower_cfg, state, model, f, Llama4Tower)
    for blk, layer in zip(tower.blocks, layers):
        a = layer.self_attn
        blk.attn.qkv = JoinedLinear([(a.q_proj, "weight", "bias", None, order),
                                     (a.k_proj, "weight", "bias", None, order), (a.v_proj, "weight", "bias", None)])
    freqs = model.rotary_embedding.freqs_ci.detach()[:, 0]                # complex [N + 1, D / 2]: HF's own angles
    output = sys.modules[type(model).__module__].BaseModelOutputWithPooling
    return HFLlama4VisionModel(cfg, tower, freqs, ratio, output).train(model.training)


def pixel_shuffle(x: Tensor, ratio: float) -> Tensor:
    """HF's Llama 4 pixel shuffle: tokens [n, S², C] of an S x S grid -> [n, (S · ratio)², C / ratio²]."""
    n, t, c = x.shape
    side = int(t ** 0.5)
    x = x.reshape(n, side, int(side * ratio), int(c / ratio))
    x = x.permute(0, 2, 1, 3).reshape(n, int(side * ratio), int(side * ratio), int(c / ratio ** 2))
    return x.permute(0, 2, 1, 3).reshape(n, -1, x.shape[-1])


class HFLlama4VisionModel(nn.Module):
    """Stands in for a Llama4VisionModel: `forward(pixel_values, ...)` as HF's, returning HF's output object
    (module docstring). The tower's parameters are HF's tensors (`self.tower`)."""

    def __init__(self, config, tower: Llama4Tower, freqs: Tensor, ratio: float, output: type):
        super().__init__()
        self.config, self.tower, self._output, self.pixel_shuffle_ratio = config, tower, output, ratio
        self.patch_size = config.patch_size
        self.register_buffer("rope_cos", freqs.real.float().contiguous(), persistent=False)    # [N + 1, D / 2]
        self.register_buffer("rope_sin", freqs.imag.float().contiguous(), persistent=False)
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.patch_embedding.linear.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.patch_embedding.linear.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.tower.patch_embedding

    def forward(self, pixel_values=None, attention_mask=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        size = self.config.image_size
        C = self.tower.patch_embedding.linear.in_features // self.patch_size ** 2
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or \
                tuple(pixel_values.shape[1:]) != (C, size, size):
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected image tiles [n, {C}, {size}, {size}], got {got}")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(bool(output_hidden_states), len(self.tower.blocks) + 1)
        return self.cuda_graphs(self, self._forward, pixel_values, keep=keep, return_dict=return_dict)

    def _forward(self, pixels, *, keep, return_dict):
        t = self.tower
        w, P = t.patch_embedding.linear.weight, self.patch_size
        D, n = w.shape[0], pixels.shape[0]
        pos = t.positional_embedding_vlm
        x = ops.patch_embed(pixels.to(w.dtype), w.view(D, -1, P, P), None, pos_embed=pos[None, :-1],
                            pos_embed_prefix=False)                                    # (n, N, D): + the patches' rows
        cls = (t.class_embedding + pos[-1]).to(x.dtype)
        x = t.layernorm_pre(torch.cat([x, cls.expand(n, 1, D)], dim=1))                 # (n, N + 1, D): class last
        f64 = x.dtype == torch.float64
        rope = (self.rope_cos.double(), self.rope_sin.double()) if f64 else (self.rope_cos, self.rope_sin)
        hidden = [x] if keep is not None else []
        for blk in t.blocks:
            x = blk(x, rope=rope)
            if keep is not None:
                hidden.append(x)
        x = pixel_shuffle(t.layernorm_post(x)[:, :-1], self.pixel_shuffle_ratio)
        mlp = t.vision_adapter.mlp
        x = ops.linear(ops.linear(x, mlp.fc1.weight, None, activation="gelu"), mlp.fc2.weight, None, activation="gelu")
        out = self._output(last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden))
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()
