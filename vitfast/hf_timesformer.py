"""TimeSformer on vitfast: transformers' `TimesformerModel` (Facebook's video ViT with divided space-time attention:
8 frames at 224 px, 1,569 tokens for TimeSformer-B), which `TimesformerForVideoClassification` holds as `timesformer`
(its classifier shared).

The model takes videos pixel_values [B, T, C, H, W]: with divided space-time attention of the configured frames
and patch grid (as HF's blocks, which read them from the config); with joint_space_time of any, the tables resampled
as HF's (nearest). The patch embedding is one `ops.patch_embed` over the B·T frames with the
patches' position rows in its epilogue; the time embeddings are added in the copy that puts the tokens in HF's order
(the class token, then the patches, each patch's frames together). Per block of divided space-time attention:
- in time: each patch's T frames attend together ([B·N, T] sequences, one attention launch): the LayerNorm, the
  packed qkv GEMM, the attention, the output projection, then temporal_dense with the residual in its epilogue;
- in space: the frames, each with the class token in front ([B·T, 1 + N] sequences, built in one copy): the
  LayerNorm, the packed qkv GEMM, the attention, the output projection with the residual in its epilogue; the class
  token becomes the mean over the frames (HF's: the mean of its residuals, added), the patches go back in one copy;
- the MLP: the LayerNorm, the intermediate GEMM with its GELU in its epilogue, the output GEMM with the residual.
joint_space_time's blocks are plain ViT blocks over every token. Then the final LayerNorm.

Output: HF's BaseModelOutput: last_hidden_state and, with output_hidden_states, the embeddings and each block's
output. The stand-in holds HF's model (`self.model`, its forward unused) and so its parameter tensors; on CUDA in eval
mode without grad its forward replays a CUDA graph per input shape. It trains. Not supported (named in the error):
attention outputs, attention_type="space_only" (HF's model runs the frames as the batch), dropout and drop-path in
train mode, activations other than the GELUs and QuickGELU.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import UnsupportedFeatureError, _Findings
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import kept_hidden_states
from vitfast.hf_sam import _ACTIVATIONS

# transformers class -> family
CLASSES = {"TimesformerModel": "timesformer"}


def _check_attention(f: _Findings, a: nn.Module, where: str) -> None:
    f.linear(a.attention.qkv, f"{where}.attention.qkv", bias=False)
    f.linear(a.output.dense, f"{where}.output.dense")
    f.dropout(a.attention.attn_drop, f"{where}.attention.attn_drop")
    f.dropout(a.output.dropout, f"{where}.output.dropout")


def optimize_timesformer(model: nn.Module) -> HFTimesformerModel:
    """A transformers TimesformerModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    f.need(cfg.attention_type in ("divided_space_time", "joint_space_time"),
           f"attention_type={cfg.attention_type!r} (only 'divided_space_time' and 'joint_space_time')")
    emb = model.embeddings
    f.patchify(emb.patch_embeddings.projection, "embeddings.patch_embeddings.projection")
    f.dropout(emb.pos_drop, "embeddings.pos_drop")
    f.dropout(getattr(emb, "time_drop", None), "embeddings.time_drop")
    f.layer_norm_eps(model.layernorm, "layernorm", dim)
    for i, layer in enumerate(model.encoder.layer):
        where = f"encoder.layer.{i}"
        for n in ("layernorm_before", "layernorm_after", "temporal_layernorm"):
            if hasattr(layer, n):
                f.layer_norm_eps(getattr(layer, n), f"{where}.{n}", dim)
        _check_attention(f, layer.attention, f"{where}.attention")
        if hasattr(layer, "temporal_attention"):
            _check_attention(f, layer.temporal_attention, f"{where}.temporal_attention")
            f.linear(layer.temporal_dense, f"{where}.temporal_dense")
        f.linear(layer.intermediate.dense, f"{where}.intermediate.dense")
        f.linear(layer.output.dense, f"{where}.output.dense")
        f.dropout(layer.intermediate.dropout, f"{where}.intermediate.dropout")
        f.dropout(layer.output.dropout, f"{where}.output.dropout")
        f.dropout(layer.drop_path, f"{where}.drop_path", "drop-path")
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    return HFTimesformerModel(model, module.BaseModelOutput).train(model.training)


class HFTimesformerModel(nn.Module):
    """Stands in for a TimesformerModel (`forward(pixel_values, ...)`) as HF's, returning HF's output object (module
    docstring). HF's model is `self.model`: its packed qkv projections are used as they are."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        self.activation = _ACTIVATIONS[cfg.hidden_act]
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.layernorm.weight.device

    @property
    def embeddings(self) -> nn.Module:
        return self.model.embeddings

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def forward(self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        cfg = self.config
        if output_attentions or getattr(cfg, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        P, C = cfg.patch_size, cfg.num_channels
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 5 or pixel_values.shape[2] != C or \
                pixel_values.shape[3] < P or pixel_values.shape[4] < P:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected videos [B, T, {C}, H, W] with H and W at least {P}, got {got}")
        S = cfg.image_size
        grid = tuple(s // P for s in pixel_values.shape[3:])
        if cfg.attention_type == "divided_space_time" and (pixel_values.shape[1], *grid) != (cfg.num_frames,
                                                                                               S // P, S // P):
            raise ValueError(f"pixel_values: expected videos [B, {cfg.num_frames}, {C}, {S}, {S}] (divided space-time "
                             f"attention: HF's blocks take the configured frames and patch grid), got "
                             f"{tuple(pixel_values.shape)}")
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.encoder.layer) + 1)
        x, hidden = self.cuda_graphs(self, self._forward, pixel_values, keep=keep)
        out = self._output(last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden))
        use_dict = return_dict if return_dict is not None else getattr(cfg, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _embed(self, videos: Tensor) -> tuple[Tensor, int]:
        """-> (tokens [B, 1 + N·T, D] in HF's order, N)."""
        emb = self.model.embeddings
        proj = emb.patch_embeddings.projection
        w, P = proj.weight, proj.kernel_size[0]
        B, T, C, H, W = videos.shape
        h, wd = H // P, W // P
        table = emb.position_embeddings                            # [1, 1 + n·n, D]
        patches = table[:, 1:]
        if 1 + h * wd != table.shape[1]:                           # HF's: nearest to this grid
            n = int((table.shape[1] - 1) ** 0.5)
            grid = patches.transpose(1, 2).reshape(1, -1, n, n)
            patches = F.interpolate(grid, size=(h, wd), mode="nearest").flatten(2).transpose(1, 2)
        frames = videos.reshape(B * T, C, H, W)[:, :, :h * P, :wd * P]   # whole patches, as the convolution
        x = ops.patch_embed(frames.to(w.dtype), w, proj.bias, pos_embed=patches, pos_embed_prefix=False)
        D = x.shape[-1]
        cls = (emb.cls_token + table[:, :1]).expand(B, 1, D)
        time = emb.time_embeddings                                 # [1, T', D] (space_only, without them, refused)
        if time.shape[1] != T:                                     # HF's: nearest to these frames
            time = F.interpolate(time.transpose(1, 2), size=T, mode="nearest").transpose(1, 2)
        N = h * wd
        out = x.new_empty(B, 1 + N * T, D)                         # HF's order: each patch's frames consecutive
        out[:, :1] = cls
        out[:, 1:].view(B, N, T, D).copy_((x.view(B, T, N, D) + time.view(1, T, 1, D)).transpose(1, 2))
        return out, N

    def _forward(self, videos: Tensor, *, keep):
        m = self.model
        x, N = self._embed(videos)
        T = videos.shape[1]
        divided = self.config.attention_type == "divided_space_time"
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, layer in enumerate(m.encoder.layer, 1):
            if divided:
                x = self._space(layer, self._time(layer, x, N, T), N, T)
            else:                                                  # joint_space_time: every token together
                x = self._attention(layer.attention, layer.layernorm_before, x, residual=x)
            n2, fc1, fc2 = layer.layernorm_after, layer.intermediate.dense, layer.output.dense
            h = ops.linear(ops.layer_norm(x, n2.weight, n2.bias, eps=n2.eps), fc1.weight, fc1.bias,
                           activation=self.activation)
            x = ops.linear(h, fc2.weight, fc2.bias, residual=x)
            hidden.append(x if i in kept else None)
        return ops.layer_norm(x, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps), hidden

    def _attention(self, a: nn.Module, norm: nn.Module, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """A TimeSformerAttention on x [S, L, D] after `norm`: the packed qkv GEMM, the attention, the output
        projection (with `residual` in its epilogue)."""
        h = ops.linear(ops.layer_norm(x, norm.weight, norm.bias, eps=norm.eps), a.attention.qkv.weight,
                       a.attention.qkv.bias)
        return ops.linear(ops.attention_qkv(h, self.num_heads), a.output.dense.weight, a.output.dense.bias,
                          residual=residual)

    def _time(self, layer: nn.Module, x: Tensor, N: int, T: int) -> tuple[Tensor, Tensor]:
        """The temporal half: each patch's T frames together -> the patches [B·N, T, D] after temporal_dense with
        the residual; the class token stays x[:, :1]."""
        B, _, D = x.shape
        patches = x[:, 1:].reshape(B * N, T, D)                    # each patch's frames are consecutive
        h = self._attention(layer.temporal_attention, layer.temporal_layernorm, patches)
        return x[:, :1], ops.linear(h, layer.temporal_dense.weight, layer.temporal_dense.bias, residual=patches)

    def _space(self, layer: nn.Module, parts: tuple[Tensor, Tensor], N: int, T: int) -> Tensor:
        """The spatial half on (class token [B, 1, D], patches [B·N, T, D]): each frame's patches with the class
        token in front -> the tokens [B, 1 + N·T, D] in HF's order, the class token the mean over the frames."""
        cls, patches = parts
        B, _, D = cls.shape
        frames = torch.cat([cls.view(B, 1, 1, D).expand(B, T, 1, D), patches.view(B, N, T, D).transpose(1, 2)],
                           dim=2).view(B * T, 1 + N, D)             # one copy: [B·T, 1 + N, D]
        frames = self._attention(layer.attention, layer.layernorm_before, frames, residual=frames).view(B, T, 1 + N, D)
        out = frames.new_empty(B, 1 + N * T, D)
        out[:, 0] = frames[:, :, 0].mean(1)                        # HF's: the class token plus its mean residual
        out[:, 1:].view(B, N, T, D).copy_(frames[:, :, 1:].transpose(1, 2))   # back in HF's order, one copy
        return out
