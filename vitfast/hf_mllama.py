"""Llama 3.2 Vision's tower on vitfast: transformers' `MllamaVisionModel` (`MllamaModel.vision_model`;
`vitfast.optimize` copies `MllamaModel` and `MllamaForConditionalGeneration` with it replaced).

The tower takes each image as up to max_num_tiles tiles of one size: pixel_values [B, M, T, C, S, S] (M images per
prompt, T = max_num_tiles), aspect_ratio_ids [B, M] (0: no image) and aspect_ratio_mask [B, M, T] (1: a tile of the
image). Per tile, the patch embedding is one `ops.patch_embed` with the class token in row 0 and the gated position
table's shared part, (1 − tanh g) · table, in its epilogue; the per-tile rows (the gated tile-position table of the
image's aspect ratio, and before the class token the gated pre-tile embedding) are one add; then the LayerNorm, and the
tokens padded to a multiple of 8 per tile. The T tiles of an image are one sequence: 32 blocks (LayerNorm, the packed q
/ k / v GEMM of HF's three projections, attention, o_proj with the residual in its epilogue, LayerNorm, fc1 with the
exact GELU in its epilogue, fc2 with the residual in its), the LayerNorm after them, the gated post-tile embedding,
then 8 gated blocks (tanh of each block's gate_attn and gate_ffn as the layer-scale of o_proj's and fc2's epilogue).
Output: the final tokens and the outputs of the blocks intermediate_layers_indices names, stacked and flattened as HF's
(feature-major), concatenated: last_hidden_state [B, M, T, N + 1, hidden_size · (1 + len(indices))], padding dropped.

Attention as HF's mask has it: HF masks a (query, key) pair only when both are padding (a pad token of a tile, or any
token of a tile the image does not have). So the image's real tokens attend to every token, padding included, and
padding attends to the real tokens only: two passes of the attention kernel, without and with `key_mask`, one picked
per query row. An image slot without any tile (aspect_ratio_id 0, the VLM's padding) has every pair masked, which HF's
finite mask turns into a uniform softmax: the mean of v, as here.

The stand-in holds HF's tower (`self.model`: its parameters, which its forward reads; an optimizer over either model
trains both); on CUDA in eval mode without grad its forward replays a CUDA graph per input shape. Each forward reads
the aspect-ratio inputs once on the host, to name bad ones. Not supported (named in the error): attention and hidden
state outputs, activations other than the exact GELU.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.layers import JoinedLinear

# transformers class -> family
CLASSES = {"MllamaVisionModel": "mllama"}


def optimize_mllama(model: nn.Module) -> HFMllamaVisionModel:
    """A transformers MllamaVisionModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    f.need(cfg.hidden_act == "gelu", f"hidden_act={cfg.hidden_act!r} (supported: ['gelu'])")
    dim = cfg.hidden_size
    f.need(model.patch_embedding.bias is None, "patch_embedding with bias")
    f.layer_norm_eps(model.layernorm_pre, "layernorm_pre", dim)
    f.layer_norm_eps(model.layernorm_post, "layernorm_post", dim)
    for stack in ("transformer", "global_transformer"):
        for i, layer in enumerate(getattr(model, stack).layers):
            where = f"{stack}.layers.{i}"
            for n in ("input_layernorm", "post_attention_layernorm"):
                f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                m = getattr(layer.self_attn, p)
                f.linear(m, f"{where}.self_attn.{p}", bias=False) and f.need(m.bias is None,
                                                                             f"{where}.self_attn.{p} with bias")
            f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
            f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    return HFMllamaVisionModel(model).train(model.training)


class HFMllamaVisionModel(nn.Module):
    """Stands in for a MllamaVisionModel: `forward(pixel_values, aspect_ratio_ids, aspect_ratio_mask, ...)` as HF's,
    returning HF's output object (module docstring). HF's tower is `self.model` (its forward unused); `self.qkv`
    holds each block's q / k / v projections joined (`JoinedLinear`: HF's tensors, which train)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.config, self.model = model.config, model
        self._output = sys.modules[type(model).__module__].BaseModelOutput
        for name in ("image_size", "patch_size", "max_num_tiles", "hidden_size", "num_channels", "num_patches",
                     "intermediate_layers_indices"):      # what HF's tower holds (its VLM reads num_patches)
            setattr(self, name, getattr(model, name))
        self.qkv = nn.ModuleList(JoinedLinear([(getattr(layer.self_attn, p), "weight", None, None) for p in
                                               ("q_proj", "k_proj", "v_proj")])
                                 for layer in (*model.transformer.layers, *model.global_transformer.layers))
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.patch_embedding.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.patch_embedding

    def forward(self, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        bad = [f"{k}=True" for k, v in (("output_attentions", output_attentions),
                                        ("output_hidden_states", output_hidden_states)) if v]
        if bad:
            raise UnsupportedFeatureError(f"optimized model: unsupported arguments {bad}")
        self._check(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        x = self.cuda_graphs(self, self._forward, pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        out = self._output(last_hidden_state=x)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _check(self, pixels, ids, mask) -> None:
        """The arguments checked (one host read of the aspect-ratio inputs)."""
        cfg = self.config
        C, S, T = cfg.num_channels, cfg.image_size, cfg.max_num_tiles
        if not isinstance(pixels, Tensor) or pixels.dim() != 6 or tuple(pixels.shape[2:]) != (T, C, S, S):
            got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"pixel_values: expected tiles [B, M, {T}, {C}, {S}, {S}] (max_num_tiles tiles of "
                             f"image_size), got {got}")
        B, M = pixels.shape[:2]
        for name, t, shape in (("aspect_ratio_ids", ids, (B, M)), ("aspect_ratio_mask", mask, (B, M, T))):
            if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.is_floating_point() or t.is_complex():
                got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{name}: expected an integer tensor {list(shape)}, got {got}")
            if t.device != pixels.device:
                raise ValueError(f"{name}: expected device {pixels.device} (like pixel_values), got {t.device}")
        top = cfg.max_aspect_ratio_id
        bad = torch.stack([((ids < 0) | (ids > top)).any(), ((mask != 0) & (mask != 1)).any()]).tolist()
        if bad[0]:
            raise ValueError(f"aspect_ratio_ids: expected ids in [0, {top}] (0 for no image)")
        if bad[1]:
            raise ValueError("aspect_ratio_mask: expected 0 or 1 per tile")

    def _forward(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        m, cfg = self.model, self.config
        B, M, T, C, S, _ = pixels.shape
        w = m.patch_embedding.weight
        D, BM = w.shape[0], B * M
        pos = m.gated_positional_embedding
        g = pos.gate.tanh()
        x = ops.patch_embed(pixels.reshape(BM * T, C, S, S).to(w.dtype), w, None, cls_token=m.class_embedding,
                            pos_embed=((1 - g) * pos.embedding).to(w.dtype))                       # (BM·T, N + 1, D)
        N1 = x.shape[1]
        tiles = g * pos.tile_embedding(ids).view(BM, T, N1, D)                                  # every row
        pre = m.pre_tile_positional_embedding
        tiles[:, :, 1:] += pre.embedding(ids).view(BM, T, 1, D) * pre.gate.tanh()               # the patch rows
        x = ops.layer_norm(x.view(BM, T, N1, D) + tiles.to(x.dtype), m.layernorm_pre.weight, m.layernorm_pre.bias,
                           eps=m.layernorm_pre.eps)
        pad = (8 - N1 % 8) % 8
        Np = N1 + pad
        x = F.pad(x, (0, 0, 0, pad)).view(BM, T * Np, D)
        token = torch.arange(Np, device=x.device) < N1
        valid = (mask.reshape(BM, T, 1) != 0) & token                                         # (BM, T, Np)
        valid = valid.view(BM, T * Np)
        empty = ~valid.any(dim=1)                                                             # no tile at all
        qkv = iter(self.qkv)
        n = len(m.transformer.layers)
        wanted = {i % n for i in cfg.intermediate_layers_indices}
        kept = {}
        for i, layer in enumerate(m.transformer.layers):
            x = self._block(layer, next(qkv), x, valid, empty, gated=False)
            if i in wanted:
                kept[i] = x
        x = ops.layer_norm(x, m.layernorm_post.weight, m.layernorm_post.bias, eps=m.layernorm_post.eps)
        post = m.post_tile_positional_embedding
        x = (x.view(BM, T, Np, D) + (post.embedding(ids).view(BM, T, 1, D) * post.gate.tanh()).to(x.dtype))
        x = x.view(BM, T * Np, D)
        for layer in m.global_transformer.layers:
            x = self._block(layer, next(qkv), x, valid, empty, gated=True)
        x = x.view(BM, T, Np, D)[:, :, :N1].reshape(B, M, T, N1, D)
        inter = torch.stack([kept[i % n] for i in cfg.intermediate_layers_indices], dim=-1)       # HF's order
        inter = inter.reshape(BM, T, Np, -1)[:, :, :N1].reshape(B, M, T, N1, -1)
        return torch.cat([x, inter], dim=-1)

    def _block(self, layer: nn.Module, qkv_proj: JoinedLinear, x: Tensor, valid: Tensor, empty: Tensor,
               gated: bool) -> Tensor:
        a, mlp, H = layer.self_attn, layer.mlp, layer.self_attn.num_heads
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        qkv = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), qkv_proj.weight)
        full = ops.attention_qkv(qkv, H)                          # real queries: every key, padding included
        masked = ops.attention_qkv(qkv, H, key_mask=valid)        # padding queries: the real keys only
        out = torch.where(valid[..., None], full, masked)
        C = out.shape[-1]
        mean_v = qkv[..., 2 * C:].mean(dim=1, keepdim=True)       # an image slot with no tile: uniform weights
        out = torch.where(empty[:, None, None], mean_v, out)
        scale = (lambda gate: gate.tanh().to(x.dtype).expand(C).contiguous()) if gated else (lambda gate: None)
        x = ops.linear(out, a.o_proj.weight, residual=x, scale=scale(getattr(layer, "gate_attn", None)))
        h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), mlp.fc1.weight, mlp.fc1.bias,
                       activation="gelu")
        return ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=x, scale=scale(getattr(layer, "gate_ffn", None)))
