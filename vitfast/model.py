"""`VisionTransformer` on vitfast ops, the model zoo (`create_model`, `list_models`).

The model has timm's constructor kwargs and state_dict keys (the same as
`vitfast.reference.VisionTransformer`): timm state_dicts load with `strict=True`, and the reference
model's state_dict loads into this one and back. Checkpoints in timm, Hugging Face or torchvision
key layouts load through `create_model(name, checkpoint_path=...)` / `vitfast.checkpoint.load_checkpoint`.

The timm features of DINOv2 (layer-scale, register tokens, no_embed_class, the giant's SwiGLU MLP), CLIP
(pre-norm, LayerNorm eps, QuickGELU), SigLIP (no class token, attention pooling), DeiT (the distilled
variant) and DINOv3 (RoPE instead of a position table: pos_embed="none", rope="dinov3") are here, on the
kernels, and EVA-02's LayerNorms inside the attention and the MLP (scale_attn_norm, scale_mlp_norm). Not
supported: qk-norm, other MLPs, other pooling heads, dropout / drop-path in training; `vitfast.optimize`
names them when it meets them.
Dense features come through timm's API: `forward_intermediates`, `get_intermediate_layers`,
`prune_intermediate_layers`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from vitfast import ops, reference
from vitfast.configs import CONFIGS, DATA_CONFIGS, model_class_and_config
from vitfast.graphs import CUDAGraphRunner
from vitfast.layers import AttentionPoolLatent, Block, LayerNorm, PatchEmbed, RMSNorm
from vitfast.reference import check_image_size, crop_to_patches, mask_patches


class VisionTransformer(reference.VisionTransformer):
    """Vision Transformer running on vitfast's kernels (timm's kwargs and state_dict keys).

    The constructor, parameters and keys are `vitfast.reference.VisionTransformer`'s (it builds the
    same tree from the kernel-backed layers of `vitfast.layers`); forward runs vitfast ops.
    images [B, in_chans, H, W] (float in any dtype, cast to the weights' dtype; or uint8, see
    `set_input_normalization`) -> logits [B, num_classes] (pooled features if num_classes=0,
    all tokens if global_pool="").
    Images of another size than `img_size` need `dynamic_img_size=True`: the position embedding is
    then resampled (bicubic, antialiased, like timm) once per image size and cached.
    """

    embed_layer, block_layer, norm_layer, rms_layer, pool_layer = PatchEmbed, Block, LayerNorm, RMSNorm, \
        AttentionPoolLatent

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, class_token=True, global_pool="token",
                 fc_norm=None, dynamic_img_size=False, act_layer="gelu", norm_eps=1e-6, init_values=None,
                 reg_tokens=0, no_embed_class=False, pre_norm=False, final_norm=True, mlp_layer="mlp",
                 pos_embed="learn", rope=None, rope_temperature=100.0, rope_rounding="hf", scale_attn_norm=False,
                 scale_mlp_norm=False, attn_pool_num_heads=None, attn_pool_mlp_ratio=None, pool_include_prefix=False,
                 norm="layernorm", embed_norm=False, proj_bias=True):
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, class_token=class_token, global_pool=global_pool, fc_norm=fc_norm,
                         dynamic_img_size=dynamic_img_size, act_layer=act_layer, norm_eps=norm_eps,
                         init_values=init_values, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
                         pre_norm=pre_norm, final_norm=final_norm, mlp_layer=mlp_layer, pos_embed=pos_embed,
                         rope=rope, rope_temperature=rope_temperature, rope_rounding=rope_rounding,
                         scale_attn_norm=scale_attn_norm, scale_mlp_norm=scale_mlp_norm,
                         attn_pool_num_heads=attn_pool_num_heads, attn_pool_mlp_ratio=attn_pool_mlp_ratio,
                         pool_include_prefix=pool_include_prefix, norm=norm, embed_norm=embed_norm,
                         proj_bias=proj_bias)
        self._rope_cache: dict[tuple, tuple[Tensor, Tensor]] = {}     # RoPE tables per patch grid, see rope_for
        # Per-channel normalisation fused into the patch embedding (see set_input_normalization).
        self.register_buffer("img_mean", None, persistent=False)
        self.register_buffer("img_std", None, persistent=False)
        # Features of a converted model that only matter in training (dropout, drop-path), named
        # by vitfast.optimize: forward refuses to run in train mode while any is listed.
        self.train_only_features: tuple[str, ...] = ()
        self.register_load_state_dict_post_hook(_clear_pos_embed_cache)
        # forward() on CUDA in eval mode without grad replays CUDA graphs (vitfast.graphs); `model.cuda_graphs
        # = CUDAGraphRunner(False)` or `vitfast.optimize(model, cuda_graphs=False)` turns that off.
        self.cuda_graphs = CUDAGraphRunner()

    def __getattr__(self, name: str):
        # A converted model can hold tensors built from its source model's parameters on each access
        # (vitfast.hf: CLIP's class embedding as [1, 1, D], DINOv2 with registers' class token plus its
        # position row), so that the source's tensors stay the parameters: {name: function(model)}.
        derived = self.__dict__.get("derived_tensors")
        if derived is not None and name in derived:
            return derived[name](self)
        return super().__getattr__(name)

    def __setattr__(self, name: str, value) -> None:
        derived = self.__dict__.get("derived_tensors")
        if derived is not None and name in derived:       # an assigned tensor replaces the derived one
            del derived[name]
        super().__setattr__(name, value)

    def set_input_normalization(self, mean, std) -> VisionTransformer:
        """Fuse `(x - mean) / std` per channel (mean/std in [0, 1] units, e.g. ImageNet's) into the
        patch embedding. Images are then raw pixels: uint8 in 0..255 (divided by 255 in the kernel)
        or float in [0, 1]. `set_input_normalization(None, None)` turns it off."""
        dev = self.patch_embed.proj.weight.device
        for name, v in (("img_mean", mean), ("img_std", std)):
            t = None if v is None else torch.as_tensor(v, dtype=torch.float32, device=dev).reshape(-1)
            if t is not None and t.numel() != self.in_chans:
                raise ValueError(f"{name[4:]}: expected {self.in_chans} values (one per channel), got {t.numel()}")
            setattr(self, name, t)
        return self

    # ----------------------------------------------------------------------------------------
    def forward_tokens(self, x: Tensor, *, pos_embed: Tensor | None = None, return_cls_attn: bool = False,
                       return_hidden: bool = False, patch_mask: tuple[Tensor, Tensor] | None = None
                       ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """images -> (tokens [B, T, D] before the final norm, per-layer cls_attn [B, H, T],
        hidden states [embeddings, block 1 output, ...]). `pos_embed`: a table already made for the
        images' patch grid (adapters with their own resampling rule pass it); default: the model's.
        patch_mask: (masked [B, patches] bool, mask token [D]): masked patches enter as the token (`embed`)."""
        self._check_trainable()
        if return_cls_attn and not self.has_class_token:
            raise ValueError("return_cls_attn: needs a model with a class token (class_token=True), this one has none")
        rope = self.rope_for(x)
        x = self.embed(x, pos_embed=pos_embed, patch_mask=patch_mask)                        # (B, T, D)
        return self.forward_blocks(x, rope=rope, return_cls_attn=return_cls_attn, return_hidden=return_hidden)

    def forward_blocks(self, x: Tensor, *, rope: tuple[Tensor, Tensor] | None = None, key_mask: Tensor | None = None,
                       return_cls_attn: bool = False, return_hidden: bool = False
                       ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """tokens [B, T, D] entering the blocks -> (tokens after them, before the final norm; per-layer cls_attn
        [B, H, T]; hidden states [x, block 1 output, ...]). rope: the RoPE tables (`rope_for`); key_mask: bool
        [B, T], the tokens every attention may attend to (adapters whose batches pad their sequences pass it:
        SigLIP 2's NaFlex, `vitfast.hf`)."""
        cls_attns, hidden = [], [x] if return_hidden else []
        for blk in self.blocks:
            if return_cls_attn:
                x, a = blk(x, return_cls_attn=True, rope=rope, key_mask=key_mask)
                cls_attns.append(a)
            else:
                x = blk(x, rope=rope, key_mask=key_mask)
            if return_hidden:
                hidden.append(x)
        return x, cls_attns, hidden

    def _check_trainable(self) -> None:
        if self.training and self.train_only_features:
            raise ValueError("vitfast cannot train this converted model: it does not implement "
                             f"{', '.join(self.train_only_features)}; call .eval() (those are inactive in eval)")

    def rope_for(self, images: Tensor) -> tuple[Tensor, Tensor] | None:
        """The RoPE tables (cos, sin) for the patch grid of `images`, or None without RoPE: made once per grid,
        dtype (float64 for a float64 model, else float32), device, temperature and rounding, then cached (they depend on
        nothing else; a CUDA graph captured on them reads the cached tensors)."""
        if self.rope_type is None:
            return None
        if torch.compiler.is_compiling():
            return super().rope_for(images)
        w, P = self.patch_embed.proj.weight, self.patch_embed.patch_size
        # (tables made under inference_mode are inference tensors, which autograd cannot save: kept apart)
        key = (images.shape[-2] // P[0], images.shape[-1] // P[1], w.dtype == torch.float64, w.device,
               self.rope_temperature, self.rope_rounding, torch.is_inference_mode_enabled(),
               id(getattr(self, "rope_embed", None)))                   # rope="timm": timm's table module
        tables = self._rope_cache.get(key)
        if tables is None:
            with torch.no_grad():
                tables = self._rope_cache[key] = super().rope_for(images)
        return tables

    def embed(self, x: Tensor, *, pos_embed: Tensor | None = None, mean: Tensor | None = None,
              std: Tensor | None = None, patch_mask: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """images [B, C, H, W] -> tokens [B, NP + N, D] entering the blocks: patches, prefix tokens and
        position table in one kernel, then norm_pre (CLIP). `pos_embed`: a table already made for the
        images' patch grid (adapters with their own resampling rule and the engine pass it); mean/std:
        the input normalisation (default: set_input_normalization's). patch_mask: (masked [B, N] bool, mask
        token [D]): each masked patch is the mask token plus its position row (the table's last N rows), as
        Hugging Face's ViT, DeiT and DINOv2 embed one (masked image modeling, iBOT / DINOv2 training)."""
        pe = self.patch_embed
        fixed_size = not self.dynamic_img_size and pos_embed is None
        check_image_size(x, self.in_chans, pe.patch_size, pe.img_size if fixed_size else None)
        x = crop_to_patches(x, pe.patch_size)
        weight = pe.proj.weight
        if x.dtype != torch.uint8 and x.dtype != weight.dtype:
            x = x.to(weight.dtype)
        grid = pe.grid_for(x) if pos_embed is not None else None
        x = pe(x, self.prefix_tokens(), self.pos_embed if pos_embed is None else pos_embed, pos_embed_grid=grid,
               pos_embed_prefix=not self.no_embed_class, mean=self.img_mean if mean is None else mean,
               std=self.img_std if std is None else std)                                      # (B, T, D)
        if patch_mask is not None:
            masked, token = patch_mask
            N = masked.shape[1]
            rows = token.reshape(1, 1, -1).to(x.dtype)
            table = self.pos_embed if pos_embed is None else pos_embed
            if table is not None:
                rows = rows + table.reshape(1, -1, table.shape[-1])[:, -N:].to(x.dtype)
            x = mask_patches(x, masked, rows)
        return self.norm_pre(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """images [B, C, H, W] -> tokens [B, T, D] after the final norm. Replays CUDA graphs as `forward` does (its
        own per signature): callers that run a ViT as forward_features then forward_head (transformers'
        TimmWrapperModel, Perception LM's tower) get them too."""
        return self.cuda_graphs(self, self._forward_features, x)

    def _forward_features(self, x: Tensor) -> Tensor:
        return self.norm(self.forward_tokens(x)[0])

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """tokens [B, T, D] (after the final norm) -> logits [B, num_classes] (or pooled features)."""
        x = self.fc_norm(self.pool(x))
        return x if pre_logits else _head(self.head, x)

    def forward(self, x: Tensor, return_cls_attn: bool = False):
        """images [B, C, H, W] -> logits; with return_cls_attn=True -> (logits, [cls_attn [B, H, T]
        fp32 per layer]): the softmax row of the CLS query in each block, from the attention kernel.
        On CUDA, in eval mode and without grad, the second call with a signature is captured as a CUDA
        graph and later ones replay it (`self.cuda_graphs`, vitfast.graphs)."""
        return self.cuda_graphs(self, self._forward, x, return_cls_attn=return_cls_attn)

    def _forward(self, x: Tensor, return_cls_attn: bool = False):
        tokens, cls_attns, _ = self.forward_tokens(x, return_cls_attn=return_cls_attn)
        logits = self.forward_head(self.norm(tokens))
        return (logits, cls_attns) if return_cls_attn else logits

    # ----------------------------------------------------------------------------------------
    # timm's feature-extraction API (dense features of DINOv2 / DINOv3, depth and segmentation heads)
    # ----------------------------------------------------------------------------------------
    def forward_intermediates(self, x: Tensor, indices: int | list[int] | tuple[int, ...] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask: Tensor | None = None, is_causal: bool = False):
        """timm's `forward_intermediates`: the outputs of the blocks in `indices` (None: all; an int n: the
        last n; a list: those blocks, negative counting from the end), in block order.

        Each intermediate is the block's patch tokens, [B, D, H', W'] (output_fmt="NCHW") or [B, N, D]
        ("NLC"), after the final norm with norm=True; with return_prefix_tokens, (patches, prefix tokens
        [B, NP, D]) pairs (class, registers, distillation token; a model without prefix tokens returns the
        patches alone). Returns (tokens after the final norm, intermediates), the intermediates alone with
        intermediates_only=True, or with output_dict=True a dict of 'image_intermediates',
        'image_intermediates_prefix' (with return_prefix_tokens) and 'image_features' (unless
        intermediates_only). stop_early: run no block after the last one asked for.
        On CUDA in eval mode without grad, replayed as CUDA graphs like `forward`."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt: expected 'NCHW' or 'NLC', got {output_fmt!r}")
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal: vitfast's attention is unmasked over all tokens; expected "
                             f"attn_mask=None and is_causal=False, got {type(attn_mask).__name__} and {is_causal!r}")
        take = feature_take_indices(len(self.blocks), indices)
        return self.cuda_graphs(self, self._forward_intermediates, x, take=take,
                                return_prefix_tokens=bool(return_prefix_tokens), norm=bool(norm),
                                stop_early=bool(stop_early), nchw=output_fmt == "NCHW",
                                intermediates_only=bool(intermediates_only), output_dict=bool(output_dict))

    def _forward_intermediates(self, x: Tensor, take: tuple[int, ...], return_prefix_tokens: bool, norm: bool,
                               stop_early: bool, nchw: bool, intermediates_only: bool, output_dict: bool):
        self._check_trainable()
        B, P = x.shape[0], self.patch_embed.patch_size
        grid = (x.shape[-2] // P[0], x.shape[-1] // P[1])
        rope = self.rope_for(x)
        x = self.embed(x)
        intermediates, last = [], max(take) if stop_early else len(self.blocks) - 1
        for i, blk in enumerate(self.blocks):      # (no slicing: a new Sequential would count as a registration)
            if i > last:
                break
            x = blk(x, rope=rope)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        NP = self.num_prefix_tokens
        prefix = [y[:, :NP] for y in intermediates] if NP else None
        patches = [y[:, NP:] for y in intermediates]
        if nchw:
            patches = [y.reshape(B, *grid, -1).permute(0, 3, 1, 2).contiguous() for y in patches]
        if output_dict:
            out = {"image_intermediates": patches}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            patches = list(zip(patches, prefix))
        return patches if intermediates_only else (self.norm(x), patches)

    def get_intermediate_layers(self, x: Tensor, n: int | list[int] | tuple[int, ...] = 1, reshape: bool = False,
                                return_prefix_tokens: bool = False, norm: bool = False,
                                attn_mask: Tensor | None = None) -> list:
        """timm's DINO-style `get_intermediate_layers`: `forward_intermediates(x, n, ..., intermediates_only=True)`,
        [B, D, H', W'] with reshape=True, else [B, N, D]."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
                                          attn_mask=attn_mask)

    def prune_intermediate_layers(self, indices: int | list[int] | tuple[int, ...] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """timm's `prune_intermediate_layers`: drop the blocks after the last of `indices` (as in
        forward_intermediates), the final norm with prune_norm, and with prune_head the pooling, fc_norm and
        head(s) (forward then returns all tokens). -> the indices, counted from the first block."""
        take = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max(take) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.attn_pool, self.fc_norm, self.head = None, nn.Identity(), nn.Identity()
            if hasattr(self, "head_dist"):
                self.head_dist = nn.Identity()
            self.num_classes, self.global_pool = 0, ""
        self.cuda_graphs.reset()          # global_pool is read by the captured forward
        return list(take)


class VisionTransformerDistilled(reference.Distilled, VisionTransformer):
    """DeiT with distillation (timm's `VisionTransformerDistilled`) on vitfast's kernels: the class and
    distillation tokens are written by the patch-embedding kernel; in eval the logits are the mean of
    `head` and `head_dist`."""

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x, x_dist = x[:, 0], x[:, 1]
        if pre_logits:
            return (x + x_dist) / 2
        return (_head(self.head, x) + _head(self.head_dist, x_dist)) / 2


def feature_take_indices(num_blocks: int, indices) -> tuple[int, ...]:
    """timm's rule for which blocks feature extraction takes: None -> all, an int n -> the last n, a list or
    tuple -> those (negative from the end); -> the indices counted from the first block."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices: expected a count of last blocks from 1 to {num_blocks}, got {indices}")
        return tuple(range(num_blocks - indices, num_blocks))
    if not isinstance(indices, (list, tuple)) or not indices \
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise ValueError(f"indices: expected None, an int or a non-empty list of block indices, got {indices!r}")
    take = tuple(num_blocks + i if i < 0 else i for i in indices)
    bad = [i for i, t in zip(indices, take) if not 0 <= t < num_blocks]
    if bad:
        raise ValueError(f"indices: expected block indices from {-num_blocks} to {num_blocks - 1}, got {bad}")
    return take


def _head(head: nn.Module, x: Tensor) -> Tensor:
    return x if isinstance(head, nn.Identity) else ops.linear(x, head.weight, head.bias)


def _clear_pos_embed_cache(model: VisionTransformer, incompatible_keys) -> None:
    model.patch_embed.clear_cache()


# --------------------------------------------------------------------------------------------
# Model zoo
# --------------------------------------------------------------------------------------------
def list_models() -> list[str]:
    """The timm model names vitfast has configurations for (`vitfast.configs.CONFIGS`)."""
    return sorted(CONFIGS)


def create_model(name: str, *, checkpoint_path: str | os.PathLike | None = None, **kwargs) -> VisionTransformer:
    """`VisionTransformer` for a timm model name (see `list_models()`), kwargs overriding the config.

    checkpoint_path: a `.safetensors` or torch (`torch.load(weights_only=True)`) file in timm, Hugging
    Face (either layout) or torchvision keys; a position table for another grid is resampled.
    Without it the weights are randomly initialised (timm-like init). `model.pretrained_cfg` holds the
    eval data configuration of timm's default weights of that name (mean, std, crop_pct).
    """
    kind, cfg = model_class_and_config(name, **kwargs)
    model = (VisionTransformerDistilled if kind == "distilled" else VisionTransformer)(**cfg)
    model.pretrained_cfg = dict(DATA_CONFIGS[name], architecture=name)   # mean / std / crop_pct, as timm's
    if checkpoint_path is not None:
        from vitfast.checkpoint import load_checkpoint
        load_checkpoint(model, checkpoint_path)
    return model
