"""NVIDIA's RADIO on vitfast: transformers' `RadioModel` (C-RADIO v3 / v4: a ViT distilled from several teachers, ViT-H
/ 16 by default; the vision model of Nemotron 3 Nano Omni, which holds it as `vision_model`).

The model takes images pixel_values [B, C, H, W] of any size that is a multiple of the patch size (values in [0, 1]
when its input conditioner normalizes them; `make_preprocessor_external` leaves that to the caller, as HF's), and in
transformers releases that have them, temporally packed video frames [B, T · C, H, W] (the video projection) and the
patches of images of different sizes packed with `image_grid_hw` ([total patches, C · P · P]). The patch embedding is
one `ops.patch_embed` with the normalization fused into its loads, the class and register rows written first, and the
position table in its epilogue (HF's Cropped Position Embedding, made by HF's own method: the table bilinearly resized
to the longer side, cropped, and resized again when the grid is not square). Per block: the LayerNorm, the packed
q / k / v GEMM (HF's three projections joined), the attention (FlashAttention-style kernel; packed images each attend
within themselves through its varlen form, `cu_seqlens`), the output projection with the layer-scale and the residual
in its epilogue, the LayerNorm, fc1 with the GELU in its epilogue (or the SwiGLU: gate and up in one GEMM, the gating
in its epilogue), fc2 with the layer-scale and the residual in its. No norm after the blocks, as HF's.

Output: HF's RadioModelOutput: `summary` (the class tokens at `summary_idxs`, flattened), `features` (the patch
tokens), `last_hidden_state` (every token; packed: [total tokens, C]) and, with output_hidden_states (True, or an index
or list of indices that keeps only those, as transformers 5.2x), the embeddings and each block's output. The stand-in
holds HF's model (`self.model`, its forward unused) and so its parameter tensors (an optimizer over either model
trains both); on CUDA in eval mode without grad its forward replays a CUDA graph per input shape (and per
`image_grid_hw`: its layout is read on the host once per call, as HF's). It trains (every op has a backward of its
own). Not supported (named in the error): attention outputs, dropout and drop-path in train mode, activations other
than GELU / QuickGELU.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.layers import JoinedLinear

# transformers class -> family
CLASSES = {"RadioModel": "radio"}


def _attention_parts(layer: nn.Module) -> tuple:
    """A RadioLayer's q, k, v, output projections and attention dropout rate, under either transformers' names (5.1x:
    attention.attention.query / key / value and attention.output.dense; later: attention.q_proj / ... / o_proj)."""
    a = layer.attention
    if hasattr(a, "q_proj"):
        return a.q_proj, a.k_proj, a.v_proj, a.o_proj, getattr(a, "attention_dropout", 0.0)
    s = a.attention
    return s.query, s.key, s.value, a.output.dense, getattr(s, "dropout_prob", 0.0)


def _mlp_parts(mlp: nn.Module) -> tuple[list, nn.Module, str]:
    """A RadioLayer's MLP as (fc1's parts for `JoinedLinear`, fc2, activation): RadioMLP's fc1 / fc2, or the SwiGLU's
    packed weights_in / weights_out (5.1x) or gate_proj, up_proj / down_proj (later), gate rows first."""
    if hasattr(mlp, "gate_proj"):
        return [(mlp.gate_proj, "weight", "bias", None), (mlp.up_proj, "weight", "bias", None)], mlp.down_proj, "swiglu"
    if hasattr(mlp, "weights_in"):
        return [(mlp.weights_in, "weight", "bias", None)], mlp.weights_out, "swiglu"
    return [(mlp.fc1, "weight", "bias", None)], mlp.fc2, None


def optimize_radio(model: nn.Module) -> HFRadioModel:
    """A transformers RadioModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim = cfg.hidden_size
    heads = cfg.num_attention_heads
    f.need(dim % heads == 0 and getattr(cfg, "head_dim", None) in (None, dim // heads),
           f"hidden_size={dim} with num_attention_heads={heads} (head_dim={getattr(cfg, 'head_dim', None)})")
    f.need(getattr(cfg, "use_swiglu_ffn", False) or cfg.hidden_act in _ACTIVATIONS,
           f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    emb = model.embeddings
    f.linear(emb.patch_projection, "embeddings.patch_projection", bias=False) and \
        f.need(emb.patch_projection.bias is None, "embeddings.patch_projection with bias")
    for i, layer in enumerate(model.encoder.layer):
        where = f"encoder.layer.{i}"
        for n in ("norm1", "norm2"):
            f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        q, k, v, o, drop = _attention_parts(layer)
        for part, lin in zip(("q", "k", "v"), (q, k, v)):
            f.linear(lin, f"{where} attention {part}", bias=cfg.qkv_bias)
        f.linear(o, f"{where} attention output")
        f.dropout(drop, f"{where} attention dropout")
        f.dropout(getattr(getattr(layer.attention, "output", None), "dropout", 0.0), f"{where} attention output")
        f.dropout(layer.drop_path, f"{where}.drop_path", "drop-path")
        fc1, fc2, _ = _mlp_parts(layer.mlp)
        for m, *_ in fc1:
            f.linear(m, f"{where}.mlp fc1")
        f.linear(fc2, f"{where}.mlp fc2")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    output = sys.modules[type(model).__module__].RadioModelOutput
    return HFRadioModel(model, output).train(model.training)


class HFRadioModel(nn.Module):
    """Stands in for a RadioModel: `forward(pixel_values, image_grid_hw=None, ...)` as HF's, returning HF's output
    object (module docstring). HF's model is `self.model`; `self.joined` holds, per block, its q / k / v projections
    joined (and the SwiGLU's gate and up), `JoinedLinear`s built from HF's tensors on each access while a gradient is
    recorded, so that they train, one cached copy otherwise."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        self.activation = None if getattr(cfg, "use_swiglu_ffn", False) else _ACTIVATIONS[cfg.hidden_act]
        self.joined = nn.ModuleList()
        for layer in model.encoder.layer:
            q, k, v, *_ = _attention_parts(layer)
            bias = "bias" if q.bias is not None else None
            fc1, *_ = _mlp_parts(layer.mlp)
            qkv = JoinedLinear([(m, "weight", bias, None) for m in (q, k, v)])
            self.joined.append(nn.ModuleDict(dict(qkv=qkv, fc1=JoinedLinear(fc1))))
        self._layouts: dict[tuple, tuple] = {}
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_projection.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings

    def make_preprocessor_external(self) -> nn.Module:
        """HF's: the caller normalizes the pixels; returns the input conditioner (HF's model's, which is detached)."""
        return self.model.make_preprocessor_external()

    def forward(self, pixel_values=None, image_grid_hw=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        if output_attentions or getattr(self.config, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        if output_hidden_states is None:
            output_hidden_states = getattr(self.config, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.encoder.layer) + 1)
        if image_grid_hw is not None:
            grids = self._check_packed(pixel_values, image_grid_hw)
            cu, starts = self._layout(grids, pixel_values.device)
            out = self.cuda_graphs(self, self._forward_packed, pixel_values, cu, starts, grids=grids, keep=keep)
        else:
            self._check_dense(pixel_values)
            out = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        summary, features, x, hidden = out
        out = self._output(summary=summary, features=features, last_hidden_state=x,
                           hidden_states=None if keep is None else tuple(hidden))
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _projection(self, channels: int) -> nn.Linear:
        """The patch projection for pixels of `channels` channels: the image one, or the video one for temporally
        packed frames (HF tells them apart by the channel count)."""
        emb, C = self.model.embeddings, self.config.num_channels
        if channels == C:
            return emb.patch_projection
        video = getattr(emb, "video_patch_projection", None)
        if video is None or channels != video.in_features // self.patch_size ** 2:
            frames = "" if video is None else \
                f" or {video.in_features // self.patch_size ** 2} (temporally packed video)"
            raise ValueError(f"pixel_values: expected {C}{frames} channels, got {channels}")
        return video

    def _check_dense(self, pixels) -> None:
        P, C = self.patch_size, self.config.num_channels
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 or pixels.shape[2] % P or pixels.shape[3] % P \
                or 0 in pixels.shape[2:]:
            got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"pixel_values: expected images [B, C, H, W] with H and W multiples of {P}, got {got}")
        self._projection(pixels.shape[1])
        if pixels.shape[1] != C and self._normalization()[0] is not None:
            raise ValueError(f"pixel_values: temporally packed video ({pixels.shape[1]} channels) needs the pixels "
                             f"normalized by the caller (make_preprocessor_external()); the input conditioner "
                             f"normalizes {C} channels")

    def _check_packed(self, pixels, grid_hw) -> tuple[tuple[int, int], ...]:
        width = self.config.num_channels * self.patch_size ** 2
        if not isinstance(grid_hw, Tensor) or grid_hw.dim() != 2 or grid_hw.shape[1] != 2 or grid_hw.shape[0] == 0 \
                or grid_hw.is_floating_point():
            got = tuple(grid_hw.shape) if isinstance(grid_hw, Tensor) else type(grid_hw).__name__
            raise ValueError(f"image_grid_hw: expected an integer tensor [num_images, 2], got {got}")
        grids = tuple((int(h), int(w)) for h, w in grid_hw.tolist())       # one host read, as HF's
        total = sum(h * w for h, w in grids)
        if min(min(g) for g in grids) <= 0 or not isinstance(pixels, Tensor) or \
                tuple(pixels.shape) != (total, width):
            got = tuple(pixels.shape) if isinstance(pixels, Tensor) else type(pixels).__name__
            raise ValueError(f"pixel_values: expected the patches of image_grid_hw {list(grids)}, [{total}, {width}] "
                             f"(positive grids), got {got}")
        return grids

    def _layout(self, grids: tuple, device: torch.device) -> tuple[Tensor | None, Tensor]:
        """The packed sequence's segments (int32 cu_seqlens, None for one image) and each image's first row, made
        once per grids and device (outside the CUDA graph, which reads them as inputs)."""
        key = (grids, device, torch.is_inference_mode_enabled())   # (inference tensors: never saved for backward)
        if key not in self._layouts:
            n = self.config.num_cls_tokens + self.config.num_registers
            bounds = [0]
            for h, w in grids:
                bounds.append(bounds[-1] + n + h * w)
            cu = torch.tensor(bounds, dtype=torch.int32, device=device) if len(grids) > 1 else None
            if len(self._layouts) >= 8:
                self._layouts.clear()
            self._layouts[key] = (cu, torch.tensor(bounds[:-1], dtype=torch.long, device=device))
        return self._layouts[key]

    def _normalization(self) -> tuple[Tensor | None, Tensor | None]:
        cond = self.model.input_conditioner
        if isinstance(cond, nn.Identity):                                      # make_preprocessor_external
            return None, None
        return cond.norm_mean.reshape(-1), cond.norm_std.reshape(-1)

    def _forward(self, pixels: Tensor, *, keep):
        emb = self.model.embeddings
        proj = self._projection(pixels.shape[1])
        w, P = proj.weight, self.patch_size
        D, C = w.shape[0], pixels.shape[1]
        mean, std = self._normalization()
        grid = (pixels.shape[2] // P, pixels.shape[3] // P)
        table = emb._interpolate_position_embedding(grid, w.dtype)              # [1, rows · columns, D], HF's own
        x = ops.patch_embed(pixels.to(w.dtype), w.view(D, C, P, P), None, pos_embed=table, pos_embed_prefix=False,
                            prefix_tokens=emb.cls_register_token, mean=mean, std=std)
        x, hidden = self._blocks(x, keep)
        cfg = self.config
        summary = x[:, :cfg.num_cls_tokens][:, self.model.summary_idxs].flatten(1)
        return summary, x[:, cfg.num_cls_tokens + cfg.num_registers:], x, hidden

    def _forward_packed(self, patches: Tensor, cu_seqlens: Tensor | None, starts: Tensor, *, grids, keep):
        """Images of other sizes packed: patches [total patches, C · P · P] of the grids `grids` (`_layout`: the
        segments and each image's first row)."""
        emb, cfg = self.model.embeddings, self.config
        w = emb.patch_projection.weight
        mean, std = self._normalization()
        x = patches.to(w.dtype)
        if mean is not None:            # HF's conditioner: in float32, rounded to the input's dtype
            C, P = cfg.num_channels, self.patch_size
            x = ((patches.float().view(-1, C, P * P) - mean.float()[:, None]) / std.float()[:, None]).to(w.dtype)
            x = x.view(patches.shape[0], -1)
        tables = torch.cat([emb._interpolate_position_embedding(g, w.dtype)[0] for g in grids])
        x = ops.linear(x, w, None, residual=tables)                             # (total patches, D) + positions
        prefix = emb.cls_register_token
        n = prefix.shape[0]
        pieces, offset = [], 0
        for h, wd in grids:
            pieces += [prefix, x[offset:offset + h * wd]]
            offset += h * wd
        x = torch.cat(pieces)[None]                                             # (1, L, D): each image's prefix first
        x, hidden = self._blocks(x, keep, cu_seqlens, n + max(h * wd for h, wd in grids))
        x = x[0]
        summary = x[starts[:, None] + self.model.summary_idxs[None, :]].flatten(1)
        bounds = [0]
        for h, wd in grids:
            bounds.append(bounds[-1] + n + h * wd)
        features = torch.cat([x[a + n:b] for a, b in zip(bounds, bounds[1:])])
        return summary, features, x, hidden

    def _blocks(self, x: Tensor, keep, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None):
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, joined) in enumerate(zip(self.model.encoder.layer, self.joined), 1):
            x = self._block(layer, joined, x, cu_seqlens, max_seqlen)
            hidden.append(x if i in kept else None)
        return x, hidden

    def _block(self, layer: nn.Module, joined: nn.ModuleDict, x: Tensor, cu_seqlens, max_seqlen) -> Tensor:
        """One RadioLayer on tokens x [B, T, C]."""
        *_, o, _ = _attention_parts(layer)
        _, fc2, gated = _mlp_parts(layer.mlp)
        qkv, fc1 = joined["qkv"], joined["fc1"]
        h = ops.layer_norm(x, layer.norm1.weight, layer.norm1.bias, eps=layer.norm1.eps)
        h = ops.linear(h, qkv.weight, qkv.bias)
        if cu_seqlens is None:
            h = ops.attention_qkv(h, self.num_heads)
        else:
            h = ops.attention_qkv(h, self.num_heads, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        x = ops.linear(h, o.weight, o.bias, residual=x, scale=layer.layer_scale1.lambda1)
        h = ops.layer_norm(x, layer.norm2.weight, layer.norm2.bias, eps=layer.norm2.eps)
        h = ops.linear(h, fc1.weight, fc1.bias, activation=gated or self.activation)
        return ops.linear(h, fc2.weight, fc2.bias, residual=x, scale=layer.layer_scale2.lambda1)
