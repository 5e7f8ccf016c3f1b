"""State-dict key layouts: detect HF / torchvision / timm layouts and remap them to timm's keys.

Layouts handled (all map onto timm's `VisionTransformer` keys):
- timm: `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
  `norm.*` (or `fc_norm.*`), `head.*`.
- HF, classic (most published checkpoints): `vit.encoder.layer.N.attention.attention.{query,key,value}`,
  `attention.output.dense`, `intermediate.dense`, `output.dense`, `layernorm_before/after`, `vit.layernorm`,
  `classifier`.
- HF, current transformers: `vit.layers.N.attention.{q,k,v,o}_proj`, `mlp.fc1`, `mlp.fc2`.
The `vit.` prefix is optional (ViTModel vs ViTForImageClassification).
- torchvision: `class_token`, `conv_proj.*`, `encoder.pos_embedding`,
  `encoder.layers.encoder_layer_N.{ln_1, self_attention.in_proj_*, self_attention.out_proj, ln_2, mlp.0, mlp.3}`
  (older files: `mlp.linear_1/linear_2`), `encoder.ln`, `heads.head`.

`load_checkpoint(model, path_or_state_dict)` reads a `.safetensors` or torch file, remaps its keys,
resamples a position table made for another patch grid (like timm's checkpoint filter) and loads
it strictly, naming any missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from vitfast.reference import resample_pos_embed

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


_TV_LAYER = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+)$")
# torchvision per-layer key (without the layer prefix) -> timm per-block key
_TV_LAYER_KEYS = {
    "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
    "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
    # nn.MultiheadAttention packs q, k, v rows in timm's order
    "self_attention.in_proj_weight": "attn.qkv.weight", "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.weight": "attn.proj.weight", "self_attention.out_proj.bias": "attn.proj.bias",
    "mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
    "mlp.3.weight": "mlp.fc2.weight", "mlp.3.bias": "mlp.fc2.bias",
    "mlp.linear_1.weight": "mlp.fc1.weight", "mlp.linear_1.bias": "mlp.fc1.bias",
    "mlp.linear_2.weight": "mlp.fc2.weight", "mlp.linear_2.bias": "mlp.fc2.bias",
}
_TV_TOP_KEYS = {
    "class_token": "cls_token",
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "encoder.pos_embedding": "pos_embed",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "heads.head.weight": "head.weight",
    "heads.head.bias": "head.bias",
}


def torchvision_to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision `VisionTransformer` keys -> timm keys (tensors passed through, not copied)."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        m = _TV_LAYER.match(key)
        if m and m.group(2) in _TV_LAYER_KEYS:
            out[f"blocks.{m.group(1)}.{_TV_LAYER_KEYS[m.group(2)]}"] = value
        elif key in _TV_TOP_KEYS:
            out[_TV_TOP_KEYS[key]] = value
        else:
            unknown.append(key)
    if unknown:
        hint = (" (a representation_size pre-logits layer or a conv stem is not supported)"
                if any(k.startswith(("heads.pre_logits", "conv_proj.conv")) for k in unknown) else "")
        raise ValueError(f"state_dict: keys with no ViT counterpart in the torchvision layout: {unknown[:8]}{hint}")
    return out


def to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> timm keys."""
    layout = detect_layout(state_dict)
    if layout == "timm":
        return dict(state_dict)
    if layout == "hf":
        return hf_to_timm(state_dict)
    return torchvision_to_timm(state_dict)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state_dict from a `.safetensors` file or a torch file (`torch.load(weights_only=True)`, on
    the CPU). Training checkpoints that wrap it (`{"state_dict": ...}`, `{"model": ...}`) and DDP's
    `module.` prefix are unwrapped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint_path: no such file: {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        obj = load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint_path: {path!r} holds no state_dict (a mapping of names to tensors), "
                         f"got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def fit_pos_embed(state_dict: dict[str, Tensor], model) -> dict[str, Tensor]:
    """Resample a timm-keyed state_dict's `pos_embed` to `model`'s patch grid when its length
    differs (the stored grid must be square; bicubic with antialias, as timm's checkpoint filter)."""
    pe = state_dict.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pe is None or target is None or pe.shape[1] == target.shape[1] or pe.dim() != 3:
        return state_dict
    out = dict(state_dict)
    out["pos_embed"] = resample_pos_embed(pe, model.patch_embed.grid_size, None, model.num_prefix_tokens)
    return out


def load_checkpoint(model, checkpoint: str | os.PathLike | Mapping[str, Tensor]):
    """Load a checkpoint file or state_dict (timm, HF or torchvision keys) into a vitfast/reference
    `VisionTransformer`, strictly. Raises ValueError naming missing, unexpected or mis-shaped keys."""
    sd = dict(checkpoint) if isinstance(checkpoint, Mapping) else load_state_dict_file(checkpoint)
    sd = fit_pos_embed(to_timm(sd), model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {missing}"] if missing else []
        parts += [f"unexpected keys {unexpected}"] if unexpected else []
        parts += [f"shape mismatches {shapes}"] if shapes else []
        hint = ""
        if any(k.startswith("head.") for k in missing + [s.split(":")[0] for s in shapes]):
            hint = " (a checkpoint without a matching classifier needs num_classes=0 or its num_classes)"
        raise ValueError(f"checkpoint does not fit the model: {'; '.join(parts)}{hint}")
    model.load_state_dict(sd, strict=True)
    return model
