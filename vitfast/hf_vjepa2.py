"""Meta's V-JEPA 2 on vitfast: transformers' `VJEPA2Model` (the video encoder, ViT-L / H / g at 256 or 384 px over
clips of 16 to 64 frames) and `VJEPA2ForVideoClassification` (the encoder, its attentive pooler and a linear
classifier: the Something-Something v2 and Diving-48 models).

The encoder takes videos pixel_values_videos [B, T, C, H, W] (T below the tubelet size: the frames repeated, as HF's;
frames and pixels past whole tubelets and patches dropped, as HF's convolution drops them). The tubelet embedding
(HF's Conv3d of kernel = stride = (t, P, P)) is one `ops.patch_embed` over the clip's t-frame groups seen as images of
t · C channels, its bias in the epilogue; tokens in HF's (frame, row, column) order. Per block: the LayerNorm, the
packed q / k / v GEMM (HF's three projections joined), V-JEPA 2's 3D RoPE on q and k (`ops.rope_qkv` with tables of
D columns, in place: the head's first three sections of 2·⌊D/6⌋ values turn by the token's frame, row and column,
the rest not; V-JEPA 2's tables give the two elements of a pair different angles, which the kernel's per-element
tables carry; HF rotates interleaved pairs, run as rotate-half ones through a reordering of q's and k's rows: q · k
is unchanged), the attention (FlashAttention-style kernel: 8,192 tokens for 64 frames at 256 px), the output
projection with the residual in its epilogue, the LayerNorm, fc1 with the GELU in its epilogue, fc2 with the residual
in its; the LayerNorm after the blocks. Positions follow HF's: token n's frame, row and column counted on the
configured grid (crop_size / P columns per row), whatever the input's size.

`VJEPA2Model` returns HF's output: last_hidden_state, masked_hidden_state (the tokens of context_mask), hidden_states
(the embeddings and each block's output, before the final norm), and without skip_predictor the predictor's output,
from HF's predictor module (V-JEPA 2's pretraining head, not on vitfast) run on vitfast's encoder output.
`VJEPA2ForVideoClassification` runs its pooler on vitfast too (its self-attention blocks as the encoder's without the
RoPE; its cross-attention, a learned query against every token, on the attention kernel) and returns HF's
ImageClassifierOutput (logits, the loss with labels). The stand-ins hold HF's models (`self.model`, their forward
unused) and so their parameter tensors (an optimizer over either trains both); on CUDA in eval mode without grad
their forward replays a CUDA graph per input shape. They train (every op has a backward of its own). Not supported
(named in the error): attention outputs, dropout and drop-path in train mode, activations other than GELU /
QuickGELU, overlapping tubelets.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings, _rotate_half_order
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.layers import JoinedLinear
from vitfast.reference import vjepa2_rope

# transformers class -> family
CLASSES = {"VJEPA2Model": "vjepa2", "VJEPA2ForVideoClassification": "vjepa2"}


def _check_block(f: _Findings, layer: nn.Module, where: str, dim: int, attn: str, proj: str, qkv_bias: bool) -> None:
    for n in ("norm1", "norm2") if hasattr(layer, "norm1") else ("layer_norm1", "layer_norm2"):
        f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
    a = getattr(layer, attn)
    names = ("query", "key", "value") if hasattr(a, "query") else ("q_proj", "k_proj", "v_proj")
    for n in names:
        f.linear(getattr(a, n, None), f"{where}.{attn}.{n}", bias=qkv_bias)
    if proj:
        f.linear(getattr(a, proj, None), f"{where}.{attn}.{proj}")
    f.dropout(getattr(a, "dropout_prob", getattr(a, "dropout", 0.0)), f"{where}.{attn} dropout")
    f.linear(layer.mlp.fc1, f"{where}.mlp.fc1")
    f.linear(layer.mlp.fc2, f"{where}.mlp.fc2")


def optimize_vjepa2(model: nn.Module) -> nn.Module:
    """A transformers VJEPA2Model or VJEPA2ForVideoClassification -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    base = model.vjepa2 if name == "VJEPA2ForVideoClassification" else model
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0 and (dim // heads) % 2 == 0,
           f"hidden_size={dim} with num_attention_heads={heads} (RoPE needs an even head dim)")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    proj = base.encoder.embeddings.patch_embeddings.proj
    ok = isinstance(proj, nn.Conv3d) and tuple(proj.kernel_size) == tuple(proj.stride) and \
        proj.padding in ("valid", (0, 0, 0)) and tuple(proj.dilation) == (1, 1, 1) and proj.groups == 1 and \
        proj.bias is not None
    f.need(ok, "encoder.embeddings.patch_embeddings.proj (expected a non-overlapping Conv3d with bias)")
    f.layer_norm_eps(base.encoder.layernorm, "encoder.layernorm", dim)
    for i, layer in enumerate(base.encoder.layer):
        _check_block(f, layer, f"encoder.layer.{i}", dim, "attention", "proj", cfg.qkv_bias)
        f.dropout(layer.drop_path, f"encoder.layer.{i}.drop_path", "drop-path")
    if base is not model:
        pool = model.pooler
        for i, layer in enumerate(pool.self_attention_layers):
            _check_block(f, layer, f"pooler.self_attention_layers.{i}", dim, "self_attn", "out_proj", True)
        _check_block(f, pool.cross_attention_layer, "pooler.cross_attention_layer", dim, "cross_attn", None, True)
        f.linear(model.classifier, "classifier")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    encoder = HFVJEPA2Model(base, module).train(base.training)
    if base is model:
        return encoder
    return HFVJEPA2ForVideoClassification(model, encoder, module.ImageClassifierOutput).train(model.training)


def _joined(attention: nn.Module, order: list[int] | None = None) -> JoinedLinear:
    """The packed qkv of HF's three projections (V-JEPA 2's query / key / value or the pooler's q / k / v_proj), q's
    and k's rows in `order`."""
    parts = [getattr(attention, n) for n in (("query", "key", "value") if hasattr(attention, "query")
                                             else ("q_proj", "k_proj", "v_proj"))]
    bias = "bias" if parts[0].bias is not None else None
    return JoinedLinear([(parts[0], "weight", bias, None, order), (parts[1], "weight", bias, None, order),
                         (parts[2], "weight", bias, None)])


class HFVJEPA2Model(nn.Module):
    """Stands in for a VJEPA2Model: `forward(pixel_values_videos, context_mask=None, target_mask=None,
    skip_predictor=False, ...)` as HF's, returning HF's output object (module docstring). HF's model is `self.model`;
    `self.qkv` holds each block's joined q / k / v (q's and k's rows reordered for the rotate-half RoPE)."""

    def __init__(self, model: nn.Module, module):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._hf = cfg, model, module
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.grid = cfg.crop_size // (cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0])
        order = _rotate_half_order(cfg.hidden_size, cfg.num_attention_heads)
        self.qkv = nn.ModuleList(_joined(layer.attention, order) for layer in model.encoder.layer)
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.encoder.embeddings.patch_embeddings.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.encoder.embeddings.patch_embeddings.proj.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.encoder.embeddings.patch_embeddings

    def check_videos(self, videos) -> None:
        proj = self.model.encoder.embeddings.patch_embeddings.proj
        C, P = proj.in_channels, proj.kernel_size[1]
        ok = isinstance(videos, Tensor) and videos.dim() == 5 and videos.shape[2] == C and videos.shape[1] > 0 and \
            videos.shape[3] >= P and videos.shape[4] >= P
        if not ok:
            got = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
            raise ValueError(f"pixel_values_videos: expected videos [B, T, {C}, H, W] with H, W >= {P}, got {got}")

    def forward(self, pixel_values_videos=None, context_mask=None, target_mask=None, skip_predictor=False,
                output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        self.check_videos(pixel_values_videos)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.encoder.layer) + 1)
        x, hidden = self.cuda_graphs(self, self.encode, pixel_values_videos, keep=keep)
        if context_mask is None and target_mask is None:
            B, N = x.shape[:2]
            context_mask = target_mask = [torch.arange(N, device=x.device).unsqueeze(0).repeat((B, 1))]
        predicted = None
        if not skip_predictor:                    # HF's predictor module on the encoder's output
            p = self.model.predictor(encoder_hidden_states=x, context_mask=context_mask, target_mask=target_mask)
            predicted = self._hf.VJEPA2WithMaskedInputPredictorOutput(
                last_hidden_state=p.last_hidden_state, target_hidden_state=self._hf.apply_masks(x, target_mask),
                hidden_states=p.hidden_states, attentions=p.attentions)
        out = self._hf.VJEPA2WithMaskedInputModelOutput(
            last_hidden_state=x, masked_hidden_state=self._hf.apply_masks(x, context_mask),
            hidden_states=None if keep is None else tuple(hidden), predictor_output=predicted)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def get_vision_features(self, pixel_values_videos) -> Tensor:
        return self.forward(pixel_values_videos, skip_predictor=True).last_hidden_state

    def _rope(self, n: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        table = torch.float64 if dtype == torch.float64 else torch.float32
        key = (n, table, device, torch.is_inference_mode_enabled())   # (inference tensors: never saved for backward)
        if key not in self._tables:
            if len(self._tables) >= 8:
                self._tables.clear()
            self._tables[key] = vjepa2_rope(n, self.grid, self.head_dim, table, device)
        return self._tables[key]

    def encode(self, videos: Tensor, *, keep) -> tuple[Tensor, list]:
        """The encoder: videos [B, T, C, H, W] -> (tokens after the final LayerNorm [B, N, D], the kept hidden
        states)."""
        m = self.model.encoder
        proj = m.embeddings.patch_embeddings.proj
        w = proj.weight
        D, C, (t, P, _) = w.shape[0], w.shape[1], proj.kernel_size
        if videos.shape[1] < t:                                                   # HF's: the frames repeated
            videos = videos.repeat(1, t, 1, 1, 1)
        B, T, _, H, W = videos.shape
        T, H, W = T // t * t, H // P * P, W // P * P                             # whole tubelets, as the Conv3d
        clips = videos[:, :T, :, :H, :W].to(w.dtype).unflatten(1, (T // t, t)).transpose(2, 3)   # (B, T', C, t, H, W)
        x = ops.patch_embed(clips.reshape(B * (T // t), C * t, H, W), w.view(D, C * t, P, P), proj.bias)
        x = x.view(B, -1, D)                                                      # (B, T' · H' · W', D)
        cos, sin = self._rope(x.shape[1], x.dtype, x.device)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(m.layer, self.qkv), 1):
            x = block(layer, layer.attention, "proj", qkv, x, self.num_heads, self.activation, (cos, sin))
            hidden.append(x if i in kept else None)
        return ops.layer_norm(x, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps), hidden


def block(layer: nn.Module, attention: nn.Module, proj: str, qkv_proj: JoinedLinear, x: Tensor, heads: int,
          activation: str, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One pre-norm block on tokens x [B, N, C]: an encoder layer (norm1 / norm2, with the RoPE) or a pooler
    self-attention layer (layer_norm1 / layer_norm2)."""
    n1, n2 = (layer.norm1, layer.norm2) if hasattr(layer, "norm1") else (layer.layer_norm1, layer.layer_norm2)
    h = ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps)
    qkv = ops.linear(h, qkv_proj.weight, qkv_proj.bias)
    if rope is not None:
        qkv = ops.rope_qkv(qkv, heads, *rope, inplace=True)
    o = getattr(attention, proj)
    x = ops.linear(ops.attention_qkv(qkv, heads), o.weight, o.bias, residual=x)
    h = ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps)
    h = ops.linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias, activation=activation)
    return ops.linear(h, layer.mlp.fc2.weight, layer.mlp.fc2.bias, residual=x)


class HFVJEPA2ForVideoClassification(nn.Module):
    """Stands in for a VJEPA2ForVideoClassification: `forward(pixel_values_videos, labels=None, ...)` as HF's,
    returning HF's ImageClassifierOutput (module docstring). HF's model is `self.model`; `self.vjepa2` the encoder's
    stand-in."""

    def __init__(self, model: nn.Module, encoder: HFVJEPA2Model, output: type):
        super().__init__()
        self.config, self.model, self.vjepa2, self._output = model.config, model, encoder, output
        pool = model.pooler
        self.pool_qkv = nn.ModuleList(_joined(layer.self_attn) for layer in pool.self_attention_layers)
        cross = pool.cross_attention_layer.cross_attn
        self.pool_kv = JoinedLinear([(cross.k_proj, "weight", "bias", None), (cross.v_proj, "weight", "bias", None)])
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.vjepa2.dtype

    @property
    def device(self) -> torch.device:
        return self.vjepa2.device

    def forward(self, pixel_values_videos=None, labels=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        self.vjepa2.check_videos(pixel_values_videos)
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.vjepa2.encoder.layer) + 1)
        logits, hidden = self.cuda_graphs(self, self._forward, pixel_values_videos, keep=keep)
        loss = None if labels is None else self.model.loss_function(pooled_logits=logits, labels=labels,
                                                                    config=self.config)
        out = self._output(loss=loss, logits=logits, hidden_states=None if keep is None else tuple(hidden))
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _forward(self, videos: Tensor, *, keep):
        x, hidden = self.vjepa2.encode(videos, keep=keep)
        pool, H = self.model.pooler, self.vjepa2.num_heads
        for layer, qkv in zip(pool.self_attention_layers, self.pool_qkv):
            x = block(layer, layer.self_attn, "out_proj", qkv, x, H, self.vjepa2.activation)
        layer = pool.cross_attention_layer                                        # the query against every token
        cross, n1, n2 = layer.cross_attn, layer.layer_norm1, layer.layer_norm2
        B, N, D = x.shape
        queries = pool.query_tokens.expand(B, -1, -1)                             # (B, 1, D)
        q = ops.linear(queries, cross.q_proj.weight, cross.q_proj.bias)
        kv = ops.linear(ops.layer_norm(x, n1.weight, n1.bias, eps=n1.eps), self.pool_kv.weight, self.pool_kv.bias)
        k, v = kv.view(B, N, 2, H, D // H).permute(2, 0, 3, 1, 4).unbind(0)      # (B, H, N, D / H) views
        o = ops.attention(q.view(B, 1, H, D // H).transpose(1, 2), k, v)          # (B, H, 1, D / H)
        y = queries + o.transpose(1, 2).reshape(B, 1, D)
        h = ops.layer_norm(y, n2.weight, n2.bias, eps=n2.eps)
        h = ops.linear(h, layer.mlp.fc1.weight, layer.mlp.fc1.bias, activation=self.vjepa2.activation)
        y = ops.linear(h, layer.mlp.fc2.weight, layer.mlp.fc2.bias, residual=y)[:, 0]
        c = self.model.classifier
        return ops.linear(y, c.weight, c.bias), hidden
