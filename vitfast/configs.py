"""Named ViT configurations, with timm's model names and constructor kwargs.

`CONFIGS[name]` is a dict of `VisionTransformer(**kwargs)` arguments (the same kwargs for
`vitfast.reference.VisionTransformer` and `vitfast.VisionTransformer`), with the image size and class
count of timm's default pretrained configuration of that name. Parameter counts match timm's models
of the same name (e.g. vit_base_patch16_224: 86,567,656; vit_base_patch14_reg4_dinov2: 86,582,016); those
of the two DINOv2-giants are checked against Hugging Face's models of them instead.
The names in DISTILLED build the distilled variant (`VisionTransformerDistilled`, DeiT).
"""

# The MLPs a block can have: timm's Mlp (fc1, activation, fc2) or its SwiGLUPacked (DINOv2-giant's).
MLP_LAYERS = ("mlp", "swiglu")

_CLIP = dict(pre_norm=True, norm_eps=1e-5)
_SIGLIP = dict(class_token=False, global_pool="map", num_classes=0)
_SO400M = dict(patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, **_SIGLIP)
_DINOV2 = dict(patch_size=14, img_size=518, init_values=1e-5, num_classes=0)
_REG4 = dict(reg_tokens=4, no_embed_class=True)
# DINOv3 (timm's Eva configurations of these names): RoPE instead of a position table, 4 registers, layer-scale,
# no qkv bias, LayerNorm eps 1e-5, the final norm then the mean of the patch tokens, any image size
_DINOV3 = dict(patch_size=16, img_size=256, pos_embed="none", rope="dinov3", rope_temperature=100.0, reg_tokens=4,
               init_values=1e-5, qkv_bias=False, norm_eps=1e-5, global_pool="avg", fc_norm=False, num_classes=0,
               dynamic_img_size=True)
_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_LARGE = dict(embed_dim=1024, depth=24, num_heads=16)
_GIANT = dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu")

CONFIGS: dict[str, dict] = {
    "vit_tiny_patch16_224": dict(patch_size=16, **_TINY),
    "vit_small_patch16_224": dict(patch_size=16, **_SMALL),
    "vit_base_patch32_224": dict(patch_size=32, **_BASE),
    "vit_base_patch16_224": dict(patch_size=16, **_BASE),
    "vit_base_patch8_224": dict(patch_size=8, **_BASE),
    "vit_base_patch16_384": dict(img_size=384, patch_size=16, **_BASE),
    "vit_large_patch16_224": dict(patch_size=16, **_LARGE),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, num_classes=0),
    # DINOv2 (layer-scale), with registers (4 register tokens, position rows for the patches only)
    "vit_small_patch14_dinov2": dict(**_DINOV2, **_SMALL),
    "vit_base_patch14_dinov2": dict(**_DINOV2, **_BASE),
    "vit_large_patch14_dinov2": dict(**_DINOV2, **_LARGE),
    "vit_small_patch14_reg4_dinov2": dict(**_DINOV2, **_SMALL, **_REG4),
    "vit_base_patch14_reg4_dinov2": dict(**_DINOV2, **_BASE, **_REG4),
    "vit_large_patch14_reg4_dinov2": dict(**_DINOV2, **_LARGE, **_REG4),
    # DINOv2-giant: SwiGLU MLP (timm's SwiGLUPacked: fc1 1536 -> 8192, gate and up halves, fc2 4096 -> 1536)
    "vit_giant_patch14_dinov2": dict(**_DINOV2, **_GIANT),
    "vit_giant_patch14_reg4_dinov2": dict(**_DINOV2, **_GIANT, **_REG4),
    # DINOv3 (RoPE; timm's state_dict keys for these are Eva's, which load through checkpoint.eva_to_timm)
    "vit_small_patch16_dinov3": dict(**_DINOV3, **_SMALL),
    "vit_base_patch16_dinov3": dict(**_DINOV3, **_BASE),
    "vit_large_patch16_dinov3": dict(**_DINOV3, **_LARGE),
    # the "plus" and 7B DINOv3: SwiGLU MLP (timm's SwiGLU: gate and up projections of 4 (7B: 2) x embed_dim, packed)
    "vit_small_plus_patch16_dinov3": dict(**_DINOV3, **_SMALL, mlp_layer="swiglu", mlp_ratio=8.0),
    "vit_huge_plus_patch16_dinov3": dict(**_DINOV3, embed_dim=1280, depth=32, num_heads=20, mlp_layer="swiglu",
                                         mlp_ratio=8.0),
    "vit_7b_patch16_dinov3": dict(**_DINOV3, embed_dim=4096, depth=40, num_heads=32, mlp_layer="swiglu",
                                  mlp_ratio=4.0),
    # CLIP image towers (pre-norm, LayerNorm eps 1e-5; QuickGELU for the OpenAI weights)
    "vit_base_patch16_clip_224": dict(patch_size=16, **_BASE, **_CLIP),
    "vit_base_patch16_clip_quickgelu_224": dict(patch_size=16, **_BASE, **_CLIP, act_layer="quick_gelu",
                                                num_classes=512),
    "vit_large_patch14_clip_224": dict(patch_size=14, **_LARGE, **_CLIP),
    "vit_large_patch14_clip_quickgelu_224": dict(patch_size=14, **_LARGE, **_CLIP, act_layer="quick_gelu",
                                                 num_classes=768),
    # SigLIP image towers (no class token, attention-pooling head); so400m at 384 px reads 27 x 27 patches
    "vit_base_patch16_siglip_224": dict(patch_size=16, **_BASE, **_SIGLIP),
    "vit_base_patch16_siglip_256": dict(img_size=256, patch_size=16, **_BASE, **_SIGLIP),
    "vit_base_patch16_siglip_384": dict(img_size=384, patch_size=16, **_BASE, **_SIGLIP),
    "vit_so400m_patch14_siglip_224": dict(**_SO400M),
    "vit_so400m_patch14_siglip_384": dict(img_size=384, **_SO400M),
    # DeiT, and DeiT with distillation (class + distillation token, two heads)
    "deit_tiny_patch16_224": dict(patch_size=16, **_TINY),
    "deit_small_patch16_224": dict(patch_size=16, **_SMALL),
    "deit_base_patch16_224": dict(patch_size=16, **_BASE),
    "deit_tiny_distilled_patch16_224": dict(patch_size=16, **_TINY),
    "deit_small_distilled_patch16_224": dict(patch_size=16, **_SMALL),
    "deit_base_distilled_patch16_224": dict(patch_size=16, **_BASE),
}
DISTILLED = {"deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224",
             "deit_base_distilled_patch16_224"}

# The eval data configuration of timm's default pretrained weights of each name (timm's
# `pretrained_cfg`: normalisation mean / std and crop_pct; bicubic resizing for all of them).
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_OPENAI = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
DATA_CONFIGS: dict[str, dict] = {
    **{n: dict(**_HALF, crop_pct=0.9) for n in CONFIGS if n.startswith("vit_") and "dinov" not in n
       and "clip" not in n},
    "vit_base_patch16_384": dict(**_HALF, crop_pct=1.0),
    **{n: dict(**_IMAGENET, crop_pct=1.0) for n in CONFIGS if "dinov2" in n or "dinov3" in n},
    "vit_base_patch16_clip_224": dict(**_OPENAI, crop_pct=0.95),
    "vit_base_patch16_clip_quickgelu_224": dict(**_OPENAI, crop_pct=1.0),
    "vit_large_patch14_clip_224": dict(**_HALF, crop_pct=1.0),
    "vit_large_patch14_clip_quickgelu_224": dict(**_OPENAI, crop_pct=1.0),
    **{n: dict(**_IMAGENET, crop_pct=0.9) for n in CONFIGS if n.startswith("deit_")},
}


# timm names vitfast does not run: the feature its kernels lack.
UNSUPPORTED: dict[str, str] = {}
# timm VisionTransformer kwargs vitfast does not implement: (their off value, the feature). An override at
# the off value is dropped; any other value is refused by name.
UNSUPPORTED_KWARGS = {
    "qk_norm": (False, "qk-norm (LayerNorm on q and k)"),
    "mlp_layer": (None, "MLP layers other than fc1-act-fc2 and the packed SwiGLU (mlp_layer='mlp' or 'swiglu')"),
    "block_fn": (None, "blocks other than timm's Block"),
    "embed_layer": (None, "patch embeddings other than a patchify conv (conv stems, ...)"),
    "norm_layer": (None, "norm layers other than LayerNorm (its eps: norm_eps)"),
}


def get_config(name: str, **overrides) -> dict:
    """Constructor kwargs for a named model, with `overrides` applied on top. A name or an override for a
    feature vitfast does not implement raises ValueError naming the feature."""
    if name in UNSUPPORTED:
        raise ValueError(f"model {name!r} is not supported: vitfast does not implement {UNSUPPORTED[name]}")
    if name not in CONFIGS:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(CONFIGS)}")
    for key, (off, feature) in UNSUPPORTED_KWARGS.items():
        if key == "mlp_layer" and overrides.get(key) in MLP_LAYERS:
            continue                                     # vitfast's own names of the MLPs it runs
        if key in overrides:
            value = overrides.pop(key)
            if value is not off and value != off:
                raise ValueError(f"{key}={value!r}: vitfast does not implement {feature}")
    return {**CONFIGS[name], **overrides}


def model_class_and_config(name: str, **overrides) -> tuple[str, dict]:
    """("distilled" or "vit", constructor kwargs) for a named model."""
    return ("distilled" if name in DISTILLED else "vit"), get_config(name, **overrides)
