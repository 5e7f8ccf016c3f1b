"""Gemma 4's vision tower on vitfast: transformers' `Gemma4VisionModel`, the vision tower of the Gemma 4 VLMs
(`Gemma4Model.vision_tower`; `vitfast.optimize` copies `Gemma4Model` and `Gemma4ForConditionalGeneration` with it
replaced).

The tower takes patchified images padded to one length: pixel_values [B, N, 3·P·P] in [0, 1] with
pixel_position_ids [B, N, 2], each patch's (x, y) in its image, (-1, -1) for padding. The patch embedding is one
`ops.linear` over 2·(pixels - 0.5) with the factored position embeddings (an x table's row plus a y table's,
`reference.gemma4_position_embeddings`) added in its epilogue. Per block (HF's `Gemma4VisionEncoderLayer`, the text
decoder's block style): RMSNorm; q / k / v projections (one packed GEMM, HF's three joined, or, with clipped linears,
three GEMMs between HF's clamps); in one pass (`ops.norm_rope_qkv`), RMSNorms of each head's q and k (with weights)
and v (without) and the axial 2D RoPE on q and k (HF rotates each half of a head by one axis, which runs as Qwen2-VL's
rotate-half layout through a reordering of q's and k's rows and of their norms' weights: q · k is unchanged; the
tables come from each patch's position, so padded batches need no layout); attention with scale 1 and
the padding masked as keys (`key_mask`); o_proj; an RMSNorm of the attention's output before the residual add;
RMSNorm, the gated MLP (gate and up as one packed GEMM with the gating in its epilogue for the tanh GELU (HF's
gelu_pytorch_tanh, Gemma 4's) or SiLU, or two clamped GEMMs and HF's activation of the gate times up), down_proj, an
RMSNorm before the residual add. Grouped-query attention runs with k's and v's rows repeated per head.
Then HF's pooler: padding zeroed, the mean of each k x k block of patches by position (`reference.gemma4_pool`),
scaled by √hidden_size in float32, the empty blocks dropped, HF's standardization (std_bias, std_scale) where the
config has it, cast to the model's dtype.

Output: the output class HF's tower returns (BaseModelOutputWithPooling in transformers 5.2x, BaseModelOutputWithPast
in 5.17): last_hidden_state the pooled tokens of every image, one after the other [T', hidden_size]; with
output_hidden_states, the embeddings and each block's output (padding rows included) but the last block's, whose slot
holds last_hidden_state, as HF's output capturing fills it. The stand-in holds HF's tower (`self.model`: its parameter
tensors and buffers, which its forward reads; an optimizer over either model trains both); on CUDA in eval mode
without grad the tower up to the pooling replays a CUDA graph per input shape. Each forward reads the positions once
on the host, to name bad ones, and, as HF's, the pooled mask (to drop the empty blocks). Not supported (named in the
error): attention outputs, a pooling kernel of 1, attention dropout in train mode.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import _norm_eps, kept_hidden_states, rms_eps
from vitfast.layers import JoinedLinear
from vitfast.reference import gemma4_blocks, gemma4_pool, gemma4_position_embeddings, qwen_rope_tables

# transformers class -> family
CLASSES = {"Gemma4VisionModel": "gemma4"}
# HF's activation module of the gate -> `ops.linear`'s gated epilogue (others run unfused: HF's module, then · up)
_GATED = {"GELUTanh": "geglu_tanh", "PytorchGELUTanh": "geglu_tanh", "NewGELUActivation": "geglu_tanh",
          "SiLUActivation": "swiglu", "SiLU": "swiglu"}


def head_order(head_dim: int) -> list[int]:
    """A head's columns reordered from Gemma 4's RoPE layout (each half of the head rotated by one axis, pairs
    (i, i + D/4) within it) to the rotate-half one of `ops.rope_qkv` (pairs (j, j + D/2)), the x axis's pairs first:
    x's first halves, y's first halves, x's second halves, y's second halves."""
    q = head_dim // 4
    return [*range(0, q), *range(2 * q, 3 * q), *range(q, 2 * q), *range(3 * q, 4 * q)]


def _rows(heads: int, head_dim: int, per_head: list[int], group: int = 1) -> list[int]:
    """The rows of `heads` heads read from a projection of heads / group heads (grouped-query attention repeats
    each of k's and v's heads `group` times), each head's columns in `per_head`'s order."""
    return [(h // group) * head_dim + j for h in range(heads) for j in per_head]


def optimize_gemma4(model: nn.Module) -> HFGemma4VisionModel:
    """A transformers Gemma4VisionModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    layers = list(model.encoder.layers)
    heads, kv_heads, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    f.need(heads % kv_heads == 0, f"num_attention_heads={heads} not a multiple of num_key_value_heads={kv_heads}")
    f.need(D % 4 == 0, f"head_dim={D} (the 2D RoPE needs a multiple of 4)")
    f.need(cfg.pooling_kernel_size >= 2, f"pooling_kernel_size={cfg.pooling_kernel_size} (HF's pooler keeps the "
                                         "padding positions' mask for 1)")
    rope = getattr(cfg, "rope_parameters", None) or {}
    f.need(rope.get("rope_type", "axial") == "axial", f"rope_type={rope.get('rope_type')!r} (only 'axial')")
    norms = [(f"encoder.layers.{i}.{n}", getattr(layer, n)) for i, layer in enumerate(layers)
             for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                       "post_feedforward_layernorm")]
    norms += [(f"encoder.layers.{i}.self_attn.{n}", getattr(layer.self_attn, n)) for i, layer in enumerate(layers)
              for n in ("q_norm", "k_norm")]
    for where, m in norms:
        f.need(_norm_eps(m) is not None, f"{where}: {type(m).__name__} (expected an RMSNorm with a weight)")
    for i, layer in enumerate(layers):
        a, where = layer.self_attn, f"encoder.layers.{i}"
        f.need(getattr(a.v_norm, "with_scale", True) is False and rms_eps(a.v_norm) is not None,
               f"{where}.self_attn.v_norm (expected an RMSNorm without weight)")
        eps = {rms_eps(n) for n in (a.q_norm, a.k_norm, a.v_norm)}
        f.need(len(eps) == 1, f"{where}.self_attn: q / k / v norms with different eps ({eps})")
        f.dropout(getattr(a, "attention_dropout", 0.0), f"{where}.self_attn dropout")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    return HFGemma4VisionModel(model, _output_class(model)).train(model.training)


def _output_class(model: nn.Module) -> type:
    """The output class HF's tower returns: its forward's source names it (transformers 5.17 returns a
    BaseModelOutputWithPast where later versions return a BaseModelOutputWithPooling; the annotation says the former
    in both)."""
    module = sys.modules[type(model).__module__]
    try:
        source = inspect.getsource(inspect.unwrap(type(model).forward))
    except (OSError, TypeError):
        source = ""
    past = "return BaseModelOutputWithPast(" in source and "return BaseModelOutputWithPooling(" not in source
    return module.BaseModelOutputWithPast if past else module.BaseModelOutputWithPooling


class HFGemma4VisionModel(nn.Module):
    """Stands in for a Gemma4VisionModel: `forward(pixel_values, pixel_position_ids, ...)` as HF's, returning HF's
    output object (module docstring). HF's tower is `self.model` (its forward unused); `self.joined` holds, per
    block, its q / k / v (and the MLP's gate / up) projections joined or reordered for vitfast's kernels
    (`JoinedLinear`: built from HF's tensors on each access while a gradient is recorded, so that they train; one
    cached copy otherwise)."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        per_head = head_order(self.head_dim)
        q_rows = _rows(self.num_heads, self.head_dim, per_head)
        k_rows = _rows(self.num_heads, self.head_dim, per_head, group)
        v_rows = _rows(self.num_heads, self.head_dim, list(range(self.head_dim)), group) if group > 1 else None
        self.clipped = bool(cfg.use_clipped_linears)
        self.joined = nn.ModuleList()
        for layer in model.encoder.layers:
            a, mlp = layer.self_attn, layer.mlp
            parts = [(a.q_proj.linear, "weight", None, None, q_rows), (a.k_proj.linear, "weight", None, None, k_rows),
                     (a.v_proj.linear, "weight", None, None, v_rows)]
            if self.clipped:   # each projection between its own clamps: one GEMM per projection
                joined = {p: JoinedLinear([part]) for p, part in zip("qkv", parts)}
            else:
                joined = {"qkv": JoinedLinear(parts),
                          "fc1": JoinedLinear([(mlp.gate_proj.linear, "weight", None, None),
                                               (mlp.up_proj.linear, "weight", None, None)])}
            self.joined.append(nn.ModuleDict(joined))
        self.register_buffer("head_order", torch.tensor(per_head, device=model.encoder.rotary_emb.inv_freq.device),
                             persistent=False)
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embedder.input_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.patch_embedder.input_proj.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.patch_embedder

    def forward(self, pixel_values=None, pixel_position_ids=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        length = self._check(pixel_values, pixel_position_ids)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        n = len(self.model.encoder.layers)
        keep = kept_hidden_states(output_hidden_states, n + 1)
        pooled, mask, hidden = self.cuda_graphs(self, self._forward, pixel_values, pixel_position_ids, length=length,
                                                keep=keep)
        x = pooled[mask]                                              # (T', C): the empty blocks dropped
        if self.config.standardize:
            x = (x - self.model.std_bias.float()) * self.model.std_scale.float()
        w = self.model.patch_embedder.input_proj.weight
        x = x.to(w.dtype if w.dtype.is_floating_point else pixel_values.dtype)
        if keep is not None and n in keep:
            hidden[n] = x
        out = self._output(last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden))
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _check(self, pixels, positions) -> int:
        """The arguments checked (one host read of the positions) -> the pooled length (HF's: N / kernel²)."""
        width = self.model.patch_embedder.input_proj.in_features
        if not isinstance(pixels, Tensor) or pixels.dim() != 3 or pixels.shape[2] != width or pixels.shape[1] < 1:
            got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"pixel_values: expected patches [B, N, {width}] (3 x patch_size^2 values each), "
                             f"got {got}")
        B, N, _ = pixels.shape
        if not isinstance(positions, Tensor) or tuple(positions.shape) != (B, N, 2) or positions.is_floating_point() \
                or positions.is_complex() or positions.dtype == torch.bool:
            got = (f"{tuple(positions.shape)} {positions.dtype}" if isinstance(positions, Tensor)
                   else type(positions).__name__)
            raise ValueError(f"pixel_position_ids: expected an integer tensor [B, N, 2] = [{B}, {N}, 2] (x, y per "
                             f"patch, -1 for padding), got {got}")
        if positions.device != pixels.device:
            raise ValueError(f"pixel_position_ids: expected device {pixels.device} (like pixel_values), "
                             f"got {positions.device}")
        kernel = self.config.pooling_kernel_size
        length = N // (kernel * kernel)
        k = int((N // length) ** 0.5) if length else 0
        if length < 1 or k * k * length != N:
            raise ValueError(f"pixel_values: expected a patch count N that pools by HF's rule (N / "
                             f"{kernel * kernel} outputs of k x k patches each), got N = {N}")
        size = self.model.patch_embedder.position_embedding_table.shape[1]
        pad = positions == -1
        bad = torch.stack([((positions < -1) | (positions >= size)).any() | (pad.any(-1) != pad.all(-1)).any(),
                           (gemma4_blocks(positions, k) >= length).any()]).tolist()
        if bad[0]:
            raise ValueError(f"pixel_position_ids: expected positions in [0, {size}) (the position table's rows), "
                             "or (-1, -1) for padding")
        if bad[1]:
            raise ValueError(f"pixel_position_ids: expected each image's patches to pool into {length} outputs of "
                             f"{k} x {k} patches (x // {k} + (width // {k}) · (y // {k}) < {length}), got a patch past "
                             "them")
        return length

    def _forward(self, pixels: Tensor, positions: Tensor, *, length: int, keep):
        """pixels, positions -> (pooled [B, length, C] float32 scaled by √C, mask [B, length], hidden states)."""
        m = self.model
        w = m.patch_embedder.input_proj.weight
        pixels = 2 * (pixels - 0.5)
        if w.dtype.is_floating_point:
            pixels = pixels.to(w.dtype)
        pad = (positions == -1).all(dim=-1)                                                  # (B, N)
        pos = gemma4_position_embeddings(m.patch_embedder.position_embedding_table, positions)
        x = ops.linear(pixels, w, residual=pos.to(pixels.dtype))                             # (B, N, C)
        B, N, C = x.shape
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        rope = qwen_rope_tables(positions.reshape(B * N, 2), m.encoder.rotary_emb.inv_freq, table_dtype)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, joined) in enumerate(zip(m.encoder.layers, self.joined), 1):
            x = self._block(layer, joined, x, rope, ~pad)
            hidden.append(x if i in kept else None)
        x = x.masked_fill(pad[..., None], 0.0)
        pooled, mask = gemma4_pool(x, positions, length)
        return pooled.float() * C ** 0.5, mask, hidden

    def _linear(self, proj: nn.Module, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """HF's Gemma4ClippableLinear on vitfast's GEMM: its clamps of input and output where it clips."""
        if self.clipped:
            x = torch.clamp(x, proj.input_min, proj.input_max)
        y = ops.linear(x, proj.linear.weight if weight is None else weight)
        return torch.clamp(y, proj.output_min, proj.output_max) if self.clipped else y

    def _block(self, layer: nn.Module, joined: nn.ModuleDict, x: Tensor, rope: tuple[Tensor, Tensor],
               key_mask: Tensor) -> Tensor:
        a, mlp, H, D = layer.self_attn, layer.mlp, self.num_heads, self.head_dim
        B, N, _ = x.shape
        h = ops.rms_norm(x, layer.input_layernorm.weight, eps=rms_eps(layer.input_layernorm))
        if self.clipped:
            qkv = torch.cat([self._linear(getattr(a, f"{p}_proj"), h, joined[p].weight) for p in "qkv"], dim=-1)
        else:
            qkv = ops.linear(h, joined["qkv"].weight)
        order = self.head_order                    # the heads' norms and RoPE in one pass over the batch's tokens
        qkv = ops.norm_rope_qkv(qkv.view(1, B * N, 3 * H * D), H, a.q_norm.weight[order], a.k_norm.weight[order],
                                *rope, eps=rms_eps(a.q_norm), v_norm=True, inplace=True).view(B, N, 3 * H * D)
        out = ops.attention_qkv(qkv, H, scale=1.0, key_mask=key_mask)
        out = self._linear(a.o_proj, out)
        x = x + ops.rms_norm(out, layer.post_attention_layernorm.weight, eps=rms_eps(layer.post_attention_layernorm))
        h = ops.rms_norm(x, layer.pre_feedforward_layernorm.weight, eps=rms_eps(layer.pre_feedforward_layernorm))
        gating = None if self.clipped else _GATED.get(type(mlp.act_fn).__name__)
        if gating is not None:                     # the gating in fc1's epilogue
            hidden = ops.linear(h, joined["fc1"].weight, activation=gating)
        else:                                      # between the clamps, or an activation without an epilogue
            if self.clipped:
                gate, up = self._linear(mlp.gate_proj, h), self._linear(mlp.up_proj, h)
            else:
                gate, up = ops.linear(h, joined["fc1"].weight).chunk(2, dim=-1)
            hidden = mlp.act_fn(gate) * up
        out = self._linear(mlp.down_proj, hidden)
        post = layer.post_feedforward_layernorm
        return x + ops.rms_norm(out, post.weight, eps=rms_eps(post))
