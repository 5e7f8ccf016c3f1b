"""Named ViT configurations, with timm's model names and constructor kwargs.

`CONFIGS[name]` is a dict of `VisionTransformer(**kwargs)` arguments (the same kwargs for
`vitfast.reference.VisionTransformer` and `vitfast.VisionTransformer`). Parameter counts match
timm's models of the same name (e.g. vit_base_patch16_224: 86,567,656).
"""

CONFIGS: dict[str, dict] = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch32_224": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch8_224": dict(patch_size=8, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_384": dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def get_config(name: str, **overrides) -> dict:
    """Constructor kwargs for a named model, with `overrides` applied on top."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model name {name!r}; expected one of {sorted(CONFIGS)}")
    return {**CONFIGS[name], **overrides}
