"""Meta's Sapiens2 on vitfast: transformers' `Sapiens2Model`, the human-centric ViT (0.4B to 5B, pretrained at 1024 x
768 px: 3,072 patches of 16) under Sapiens2's task models, which hold it as `model` (`Sapiens2ForSemanticSegmentation`
(body-part segmentation), `Sapiens2ForPoseEstimation`, `Sapiens2ForNormalEstimation`, `Sapiens2ForPointmapEstimation`,
`Sapiens2ForImageMatting`): `vitfast.optimize` replaces it in a copy of those, their heads shared.

The model takes images pixel_values [B, C, H, W] of any size that is a multiple of the patch size. The patch embedding
is one `ops.patch_embed` with the class and register rows (no position table). Per block: the RMSNorm, the packed q /
k / v GEMM (HF's three projections joined; in the grouped-query blocks the rows of each k and v head repeated for its
query heads), the RMSNorms of each head's q and k and the RoPE of the patch tokens' q and k in one pass
(`ops.norm_rope_qkv`; DINOv3's RoPE, tables made once per grid; `ops.rope_qkv` without the norms), the attention, the
output projection with the layer-scale and the residual in its epilogue, the RMSNorm, the gated MLP (gate and up in one
GEMM, SiLU's gating in its epilogue: the packed SwiGLU) or the plain one with its activation in fc1's epilogue, the
down projection with the residual in its epilogue. Then the final RMSNorm.

Output: HF's BaseModelOutputWithPooling: last_hidden_state (after the final norm), pooler_output (its class token),
with output_hidden_states (True, or an index or list of indices that keeps only those) the embeddings and each
block's output (before the final norm, as HF's). The stand-in holds HF's model (`self.model`, its forward unused) and
so its parameter tensors; on CUDA in eval mode without grad its forward replays a CUDA graph per input shape. It
trains. Masked patches (bool_masked_pos, with use_mask_token) enter as the mask token. Not supported (named in the
error): bool_masked_pos without a mask token, attention outputs,
dropout and drop-path in train mode, the train-time RoPE augmentations (pos_embed_shift / jitter / rescale; rescale
is on by default) in train mode, activations other than the GELUs and QuickGELU (SiLU in the gated MLP).
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
from vitfast.reference import dinov3_rope, mask_patches

# transformers class -> family
CLASSES = {"Sapiens2Model": "sapiens2"}


def _rope_augmented(cfg) -> list[str]:
    """The train-time moves of the RoPE coordinates the config asks for."""
    return [f"{k}={getattr(cfg, k)}" for k in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale")
            if getattr(cfg, k, None) is not None]


def _rms_eps(f: _Findings, m, where: str, dim: int) -> float | None:
    ok = type(m).__name__.endswith("RMSNorm") and tuple(m.weight.shape) == (dim,)
    f.need(ok, f"{where}: {type(m).__name__} (expected an RMSNorm over {dim})")
    return getattr(m, "variance_epsilon", None) if ok else None


def optimize_sapiens2(model: nn.Module) -> HFSapiens2Model:
    """A transformers Sapiens2Model -> its stand-in on vitfast (module docstring)."""
    name, cfg = type(model).__name__, model.config
    f = _Findings(f"Hugging Face {name}")
    dim, heads = cfg.hidden_size, cfg.num_attention_heads
    f.need(dim % heads == 0 and (dim // heads) % 4 == 0,
           f"hidden_size={dim} with num_attention_heads={heads} (the RoPE needs a head dim that is a multiple of 4)")
    gated = bool(cfg.use_gated_mlp)
    f.need(cfg.hidden_act == "silu" if gated else cfg.hidden_act in _ACTIVATIONS,
           f"hidden_act={cfg.hidden_act!r} with use_gated_mlp={gated} (only 'silu' gated, {sorted(_ACTIVATIONS)} "
           "otherwise)")
    for aug in _rope_augmented(cfg):
        f.train_only.append(f"the RoPE augmentation {aug}")
    f.patchify(model.embeddings.patch_embeddings, "embeddings.patch_embeddings")
    _rms_eps(f, model.norm, "norm", dim)
    for i, layer in enumerate(model.model.layer):
        where, a = f"model.layer.{i}", layer.attention
        for n in ("norm1", "norm2"):
            _rms_eps(f, getattr(layer, n), f"{where}.{n}", dim)
        f.need(heads % a.num_key_value_heads == 0,
               f"{where}: num_attention_heads={heads} not a multiple of its {a.num_key_value_heads} key / value heads")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            f.linear(getattr(a, proj, None), f"{where}.attention.{proj}", bias=False)
        if not isinstance(a.q_norm, nn.Identity):
            for n in ("q_norm", "k_norm"):
                _rms_eps(f, getattr(a, n), f"{where}.attention.{n}", dim // heads)
        f.need(isinstance(layer.layer_scale2, nn.Identity) or hasattr(layer.layer_scale2, "lambda1"),
               f"{where}.layer_scale2: {type(layer.layer_scale2).__name__}")
        f.dropout(a.dropout, f"{where}.attention dropout")
        f.dropout(layer.drop_path, f"{where}.drop_path", "drop-path")
        for proj in ("gate_proj", "up_proj", "down_proj") if gated else ("up_proj", "down_proj"):
            f.linear(getattr(layer.mlp, proj, None), f"{where}.mlp.{proj}", bias=False)
    f.one_dtype_device(model.parameters())
    f.check(model.training)
    output = sys.modules[type(model).__module__].BaseModelOutputWithPooling
    return HFSapiens2Model(model, output).train(model.training)


def _bias(m: nn.Module) -> str | None:
    return "bias" if m.bias is not None else None


class HFSapiens2Model(nn.Module):
    """Stands in for a Sapiens2Model (`forward(pixel_values, bool_masked_pos=None, ...)`) as HF's, returning HF's
    output object (module docstring). HF's model is `self.model`; `self.joined` holds, per block, its q / k / v
    projections joined (k's and v's heads repeated in the grouped-query blocks) and the gated MLP's gate and up,
    `JoinedLinear`s built from HF's tensors on each access while a gradient is recorded, so that they train, one
    cached copy otherwise."""

    def __init__(self, model: nn.Module, output: type):
        super().__init__()
        cfg = model.config
        self.config, self.model, self._output = cfg, model, output
        self.num_heads = cfg.num_attention_heads
        D = cfg.hidden_size // self.num_heads
        self.activation = "swiglu" if cfg.use_gated_mlp else _ACTIVATIONS[cfg.hidden_act]
        self.joined = nn.ModuleList()
        for layer in model.model.layer:
            a, mlp = layer.attention, layer.mlp
            group = self.num_heads // a.num_key_value_heads
            rows = None if group == 1 else [(h // group) * D + j for h in range(self.num_heads) for j in range(D)]
            qkv = JoinedLinear([(a.q_proj, "weight", _bias(a.q_proj), None),
                                (a.k_proj, "weight", _bias(a.k_proj), None, rows),
                                (a.v_proj, "weight", _bias(a.v_proj), None, rows)])
            fc1 = [mlp.gate_proj, mlp.up_proj] if cfg.use_gated_mlp else [mlp.up_proj]
            self.joined.append(nn.ModuleDict(dict(qkv=qkv, fc1=JoinedLinear([(m, "weight", _bias(m), None)
                                                                             for m in fc1]))))
        self._tables: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.cuda_graphs = CUDAGraphRunner()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embeddings.patch_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.patch_embeddings.weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embeddings.patch_embeddings

    def forward(self, pixel_values=None, bool_masked_pos=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, **kwargs):
        cfg = self.config
        if output_attentions or getattr(cfg, "output_attentions", False) and output_attentions is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument output_attentions=True")
        if bool_masked_pos is not None and self.model.embeddings.mask_token is None:
            raise UnsupportedFeatureError("optimized model: unsupported argument bool_masked_pos (this model has no "
                                          "mask token: use_mask_token=False)")
        if self.training and _rope_augmented(cfg):
            raise UnsupportedFeatureError(f"optimized model: train mode with the RoPE augmentations "
                                          f"{', '.join(_rope_augmented(cfg))}, which vitfast does not implement")
        proj = self.model.embeddings.patch_embeddings
        C, (P, Q) = proj.in_channels, proj.kernel_size
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != C or \
                pixel_values.shape[2] % P or pixel_values.shape[3] % Q or 0 in pixel_values.shape[2:]:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: expected images [B, {C}, H, W] with H a multiple of {P} and W of {Q}, "
                             f"got {got}")
        if bool_masked_pos is not None:
            patches = (pixel_values.shape[0], (pixel_values.shape[2] // P) * (pixel_values.shape[3] // Q))
            if not isinstance(bool_masked_pos, Tensor) or tuple(bool_masked_pos.shape) != patches:
                got = tuple(bool_masked_pos.shape) if isinstance(bool_masked_pos, Tensor) else \
                    type(bool_masked_pos).__name__
                raise ValueError(f"bool_masked_pos: expected [B, patches] = [{patches[0]}, {patches[1]}], got {got}")
            bool_masked_pos = bool_masked_pos.to(device=pixel_values.device, dtype=torch.bool)
        if output_hidden_states is None:
            output_hidden_states = getattr(cfg, "output_hidden_states", False)
        keep = kept_hidden_states(output_hidden_states, len(self.model.model.layer) + 1)
        x, hidden = self.cuda_graphs(self, self._forward, pixel_values, bool_masked_pos, keep=keep)
        out = self._output(last_hidden_state=x, pooler_output=x[:, 0],
                           hidden_states=None if keep is None else tuple(hidden))
        use_dict = return_dict if return_dict is not None else getattr(cfg, "return_dict", True)
        return out if use_dict else out.to_tuple()

    def _rope_tables(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (grid, device, dtype, torch.is_inference_mode_enabled())   # (inference tensors: never saved for backward)
        if key not in self._tables:
            work = torch.float64 if dtype == torch.float64 else torch.float32
            self._tables[key] = dinov3_rope(grid, self.config.hidden_size // self.num_heads,
                                            float(self.config.rope_theta), work, device)
        return self._tables[key]

    def _forward(self, pixels: Tensor, masked: Tensor | None, *, keep):
        m = self.model
        emb = m.embeddings
        w = emb.patch_embeddings.weight
        prefix = torch.cat([emb.cls_token, emb.register_tokens], dim=1)
        x = ops.patch_embed(pixels.to(w.dtype), w, emb.patch_embeddings.bias, prefix_tokens=prefix)
        if masked is not None:                                       # the mask token (no position table)
            x = mask_patches(x, masked, emb.mask_token)
        P, Q = emb.patch_embeddings.kernel_size
        rope = self._rope_tables((pixels.shape[2] // P, pixels.shape[3] // Q), x.device, x.dtype)
        kept = keep or ()
        hidden = [x if 0 in kept else None]
        for i, (layer, joined) in enumerate(zip(m.model.layer, self.joined), 1):
            x = self._block(layer, joined, x, rope)
            hidden.append(x if i in kept else None)
        return ops.rms_norm(x, m.norm.weight, eps=m.norm.variance_epsilon), hidden

    def _block(self, layer: nn.Module, joined: nn.ModuleDict, x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """One Sapiens2Layer on tokens x [B, T, C]."""
        a, mlp, qkv, fc1 = layer.attention, layer.mlp, joined["qkv"], joined["fc1"]
        h = ops.linear(ops.rms_norm(x, layer.norm1.weight, eps=layer.norm1.variance_epsilon), qkv.weight, qkv.bias)
        if isinstance(a.q_norm, nn.Identity):
            h = ops.rope_qkv(h, self.num_heads, *rope, inplace=True)
        else:
            h = ops.norm_rope_qkv(h, self.num_heads, a.q_norm.weight, a.k_norm.weight, *rope,
                                  eps=a.q_norm.variance_epsilon, inplace=True)
        x = ops.linear(ops.attention_qkv(h, self.num_heads), a.o_proj.weight, a.o_proj.bias, residual=x,
                       scale=layer.layer_scale1.lambda1)
        h = ops.rms_norm(x, layer.norm2.weight, eps=layer.norm2.variance_epsilon)
        h = ops.linear(h, fc1.weight, fc1.bias, activation=self.activation)
        scale = getattr(layer.layer_scale2, "lambda1", None)
        return ops.linear(h, mlp.down_proj.weight, mlp.down_proj.bias, residual=x, scale=scale)
