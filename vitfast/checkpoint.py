"""State-dict key layouts: detect HF / torchvision / timm layouts and remap them to timm's keys.

Layouts handled (all map onto timm's `VisionTransformer` keys):
- timm: `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
  `norm.*` (or `fc_norm.*`), `head.*`.
- HF, classic (most published checkpoints): `vit.encoder.layer.N.attention.attention.{query,key,value}`,
  `attention.output.dense`, `intermediate.dense`, `output.dense`, `layernorm_before/after`, `vit.layernorm`,
  `classifier`.
- HF, current transformers: `vit.layers.N.attention.{q,k,v,o}_proj`, `mlp.fc1`, `mlp.fc2`.
The `vit.` prefix is optional (ViTModel vs ViTForImageClassification).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_HF_LAYER = re.compile(r"^(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)$")

# HF per-layer suffix -> (timm suffix, qkv slot or None)
_HF_LAYER_KEYS = {
    "attention.attention.query": ("attn.qkv", 0), "attention.q_proj": ("attn.qkv", 0),
    "attention.attention.key": ("attn.qkv", 1), "attention.k_proj": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2), "attention.v_proj": ("attn.qkv", 2),
    "attention.output.dense": ("attn.proj", None), "attention.o_proj": ("attn.proj", None),
    "intermediate.dense": ("mlp.fc1", None), "mlp.fc1": ("mlp.fc1", None),
    "output.dense": ("mlp.fc2", None), "mlp.fc2": ("mlp.fc2", None),
    "layernorm_before": ("norm1", None), "layernorm_after": ("norm2", None),
}
_HF_TOP_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def detect_layout(state_dict: dict[str, Tensor]) -> str:
    """'timm', 'hf' or 'torchvision' from the keys of a ViT state_dict."""
    keys = list(state_dict)
    if any(k.startswith("blocks.") for k in keys) or "pos_embed" in state_dict:
        return "timm"
    if any(_HF_LAYER.match(k) for k in keys) or any(k.endswith("embeddings.position_embeddings") for k in keys):
        return "hf"
    if any(k.startswith("encoder.layers.encoder_layer_") for k in keys) or "class_token" in state_dict:
        return "torchvision"
    raise ValueError("state_dict: unrecognised key layout (expected timm, Hugging Face or torchvision ViT "
                     f"keys); first keys: {keys[:5]}")


def hf_to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF ViT (either layout, with or without the `vit.` prefix) -> timm keys. Separate q/k/v
    projections are concatenated into one qkv (timm's [3·C, C] layout: q rows, then k, then v)."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], list] = {}
    unknown = []
    for key, value in state_dict.items():
        name = key[4:] if key.startswith("vit.") else key
        if name.startswith("pooler."):
            continue          # HF's pooler (ViTModel's optional tanh head) has no timm counterpart
        m = _HF_LAYER.match(key)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            stem, _, param = rest.rpartition(".")
            if stem not in _HF_LAYER_KEYS:
                unknown.append(key)
                continue
            target, slot = _HF_LAYER_KEYS[stem]
            if slot is None:
                out[f"blocks.{idx}.{target}.{param}"] = value
            else:
                qkv.setdefault((idx, param), [None, None, None])[slot] = value
        elif name in _HF_TOP_KEYS:
            out[_HF_TOP_KEYS[name]] = value
        elif key in _HF_TOP_KEYS:
            out[_HF_TOP_KEYS[key]] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"state_dict: keys with no ViT counterpart in the HF layout: {unknown[:8]}")
    for (idx, param), parts in qkv.items():
        if any(p is None for p in parts):
            raise ValueError(f"state_dict: layer {idx} lacks one of query/key/value {param}")
        out[f"blocks.{idx}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    return out


def to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> timm keys."""
    layout = detect_layout(state_dict)
    if layout == "timm":
        return dict(state_dict)
    if layout == "hf":
        return hf_to_timm(state_dict)
    raise ValueError(f"state_dict: the {layout} layout is not supported yet")
