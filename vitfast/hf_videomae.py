"""VideoMAE on vitfast: transformers' `VideoMAEModel` (the video ViT of VideoMAE and VideoMAE V2: tubelets of 2
frames x 16 x 16 pixels, 1,568 tokens for 16 frames at 224 px, a fixed sinusoid position table), which
`VideoMAEForVideoClassification` (its mean pooling, fc_norm and classifier shared) and `VideoMAEForPreTraining` (its
decoder and pixel loss shared) hold as `videomae`.

The model takes videos pixel_values [B, T, C, H, W] at the configured image size, T with as many whole tubelets as
the configured num_frames (as HF's: its position table has one row per tubelet token), and an optional bool_masked_pos
[B, tokens] (True: the token dropped, as HF's: the encoder runs over the visible ones only, each video with as many).
The tubelet embedding (HF's Conv3d of kernel = stride = (t, P, P)) is one `ops.patch_embed`: each video's t-frame
groups stacked as one tall image of C x t channels (one copy, the token order HF's), the sinusoid table (HF's, in the
model's dtype, cached per device) in its epilogue; the visible tokens gathered after it (their indices read on the
host once per call, as HF's boolean indexing does, outside the CUDA graph). Per block: the LayerNorm, the packed q /
k / v GEMM (HF's three projections joined, k's missing bias as zeros), the attention, the output projection with the
residual in its epilogue, the LayerNorm, the intermediate GEMM with its GELU in its epilogue, the output GEMM with the
residual. Then the final LayerNorm, where the model has one (not with use_mean_pooling, its default).

Output: HF's BaseModelOutput: last_hidden_state and, with output_hidden_states (True, or an index or list of indices
that keeps only those), the embeddings and each block's output. The stand-in holds HF's model (`self.model`, its
forward unused) and so its parameter tensors; on CUDA in eval mode without grad its forward replays a CUDA graph per
input shape. It trains. Not supported (named in the error): attention outputs, dropout in train mode, activations
other than the GELUs and QuickGELU.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from vitfast import ops
from vitfast.convert import _Findings
from vitfast.hf_sam import _ACTIVATIONS
from vitfast.hf_vitlayer import ViTLayoutStandIn, check_layers, vit_layer

# transformers class -> family
CLASSES = {"VideoMAEModel": "videomae"}


def optimize_videomae(model: nn.Module) -> HFVideoMAEModel:
    """A transformers VideoMAEModel -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0, f"hidden_size={dim} with num_attention_heads={heads}")
    f.need(cfg.hidden_act in _ACTIVATIONS, f"hidden_act={cfg.hidden_act!r} (only {sorted(_ACTIVATIONS)})")
    proj = model.embeddings.patch_embeddings.projection
    f.need(isinstance(proj, nn.Conv3d) and tuple(proj.kernel_size) == tuple(proj.stride) and
           proj.padding in ("valid", (0, 0, 0)) and tuple(proj.dilation) == (1, 1, 1) and proj.groups == 1 and
           proj.bias is not None and proj.kernel_size[1] == proj.kernel_size[2],
           "embeddings.patch_embeddings.projection (expected a non-overlapping Conv3d with square patches and a bias)")
    if model.layernorm is not None:
        f.layer_norm_eps(model.layernorm, "layernorm", dim)
    check_layers(f, model.encoder.layer, dim)
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    module = sys.modules[type(model).__module__]
    return HFVideoMAEModel(model, module.BaseModelOutput).train(model.training)


class HFVideoMAEModel(ViTLayoutStandIn):
    """Stands in for a VideoMAEModel (`forward(pixel_values, bool_masked_pos=None, ...)`) as HF's, returning HF's
    output object (module docstring). HF's model is `self.model`; `self.qkv` holds, per block, its q / k / v
    projections joined, `JoinedLinear`s built from HF's tensors on each access while a gradient is recorded, so that
    they train, one cached copy otherwise."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__(model, output)
        self._tables: dict[tuple, Tensor] = {}

    @property
    def layernorm(self) -> nn.Module | None:
        return self.model.layernorm

    def forward(self, pixel_values=None, bool_masked_pos=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        cfg = self.config
        keep = self._keep(output_attentions, output_hidden_states)
        emb = self.model.embeddings.patch_embeddings
        C, (H, W), t = emb.num_channels, tuple(emb.image_size), emb.tubelet_size
        n = emb.num_patches
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 5 or \
                tuple(pixel_values.shape[2:]) != (C, H, W) or pixel_values.shape[1] // t != cfg.num_frames // t:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected videos [B, T, {C}, {H}, {W}] with T // {t} = "
                             f"{cfg.num_frames // t} tubelets (the model's num_frames and image size), got {got}")
        B = pixel_values.shape[0]
        visible = None
        if bool_masked_pos is not None:
            if not isinstance(bool_masked_pos, Tensor) or tuple(bool_masked_pos.shape) != (B, n):
                got = tuple(bool_masked_pos.shape) if isinstance(bool_masked_pos, Tensor) else \
                    type(bool_masked_pos).__name__
                raise ValueError(f"bool_masked_pos: expected [B, tokens] = [{B}, {n}], got {got}")
            shown = ~bool_masked_pos.to(device=pixel_values.device, dtype=torch.bool)
            counts = shown.sum(1).tolist()                          # the one host read, as HF's boolean indexing
            if len(set(counts)) > 1:
                raise ValueError(f"bool_masked_pos: expected as many visible tokens in every video (HF's model "
                                 f"stacks them), got {counts}")
            visible = shown.nonzero()[:, 1].view(B, counts[0])
        x, hidden = self.cuda_graphs(self, self._forward, pixel_values, visible, keep=keep)
        return self._result(return_dict, last_hidden_state=x, hidden_states=None if keep is None else tuple(hidden))

    def _table(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """HF's sinusoid table (a plain tensor attribute of its embeddings, on the host) in `dtype` on `device`."""
        table = self.model.embeddings.position_embeddings
        key = (id(table), dtype, device, torch.is_inference_mode_enabled())   # inference tensors: never saved
        if key not in self._tables:
            if len(self._tables) >= 8:
                self._tables.clear()
            self._tables[key] = table.detach().to(device=device, dtype=dtype, copy=True)
        return self._tables[key]

    def _forward(self, videos: Tensor, visible: Tensor | None, *, keep):
        m = self.model
        proj = m.embeddings.patch_embeddings.projection
        w = proj.weight
        D, C, (t, P, _) = w.shape[0], w.shape[1], proj.kernel_size
        B, T, _, H, W = videos.shape
        T = T // t                                                  # whole tubelets, as the Conv3d
        # each video's tubelets as one tall image: channel c·t + i (the Conv3d weight's order), row j·H + h (tubelet j)
        tall = videos[:, :T * t].to(w.dtype).reshape(B, T, t, C, H, W).permute(0, 3, 2, 1, 4, 5)
        tall = tall.reshape(B, C * t, T * H, W)
        x = ops.patch_embed(tall, w.view(D, C * t, P, P), proj.bias, pos_embed=self._table(w.dtype, w.device),
                            pos_embed_prefix=False)
        if visible is not None:                                     # HF's: only the visible tokens go on
            x = x.gather(1, visible[..., None].expand(-1, -1, D))
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, qkv) in enumerate(zip(m.encoder.layer, self.qkv), 1):
            x = vit_layer(layer, qkv, x, self.num_heads, self.activation)
            hidden.append(x if i in kept else None)
        if m.layernorm is not None:
            x = ops.layer_norm(x, m.layernorm.weight, m.layernorm.bias, eps=m.layernorm.eps)
        return x, hidden
