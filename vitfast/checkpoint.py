"""State-dict key layouts: detect HF / torchvision / timm layouts and remap them to timm's keys.

Layouts handled (all map onto timm's `VisionTransformer` keys):
- timm: `cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`,
  `norm.*` (or `fc_norm.*`), `head.*`; timm's Eva class (DINOv3, EVA) has `blocks.N.gamma_1`, `attn.q_bias` /
  `attn.v_bias` and the SwiGLU's `mlp.fc1_g` / `mlp.fc1_x`: see `eva_to_timm`.
- HF, classic (most published checkpoints): `vit.encoder.layer.N.attention.attention.{query,key,value}`,
  `attention.output.dense`, `intermediate.dense`, `output.dense`, `layernorm_before/after`, `vit.layernorm`,
  `classifier`.
- HF, current transformers: `vit.layers.N.attention.{q,k,v,o}_proj`, `mlp.fc1`, `mlp.fc2`.
The `vit.` prefix is optional (ViTModel vs ViTForImageClassification). The same skeleton for DeiT
(`deit.`, `distillation_token`, `cls_classifier` / `distillation_classifier`), DINOv2 (`norm1`,
`layer_scale1.lambda1`, `register_tokens`), CLIP's vision tower (`vision_model.`, `class_embedding`,
`pre_layrnorm`, OWL-ViT's and OWLv2's `pre_layernorm`, `self_attn.*`, `post_layernorm`, `visual_projection`) and
SigLIP's (`head.probe`,
`head.attention.in_proj_*`): see `hf_to_timm`.
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

# HF's vision transformers share one skeleton: an optional prefix (the base model inside a head model),
# layers under `encoder.layer.N`, `encoder.layers.N` or `layers.N`, top-level embeddings and norms.
_HF_PREFIX = re.compile(r"^(?:vit|deit|dinov2|vision_model)\.")
_HF_LAYER = re.compile(r"^(?:vit\.|deit\.|dinov2\.|vision_model\.)?"
                       r"(?:encoder\.layers?|layers|model\.layer)\.(\d+)\.(.+)$")        # model.layer: DINOv3

# HF per-layer module -> (timm module, slot or None: its row block when the timm module packs several HF
# ones, `_HF_PACKED`). Classic ViT / DeiT (`attention.attention.query`), current transformers
# (`attention.q_proj`), CLIP / SigLIP (`self_attn.q_proj`), DINOv2 (`norm1`, layer-scale).
_HF_LAYER_KEYS = {
    "attention.attention.query": ("attn.qkv", 0), "attention.q_proj": ("attn.qkv", 0),
    "self_attn.q_proj": ("attn.qkv", 0),
    "attention.attention.key": ("attn.qkv", 1), "attention.k_proj": ("attn.qkv", 1),
    "self_attn.k_proj": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2), "attention.v_proj": ("attn.qkv", 2),
    "self_attn.v_proj": ("attn.qkv", 2),
    "attention.output.dense": ("attn.proj", None), "attention.o_proj": ("attn.proj", None),
    "self_attn.out_proj": ("attn.proj", None), "attention.projection_layer": ("attn.proj", None),     # InternVL
    "intermediate.dense": ("mlp.fc1", None), "mlp.fc1": ("mlp.fc1", None),
    "output.dense": ("mlp.fc2", None), "mlp.fc2": ("mlp.fc2", None),
    # DINOv2-giant's SwiGLU: the gate and up projections are the halves of timm's packed fc1 (older
    # transformers packed them itself, as weights_in)
    "mlp.gate_proj": ("mlp.fc1", 0), "mlp.up_proj": ("mlp.fc1", 1), "mlp.weights_in": ("mlp.fc1", None),
    "mlp.down_proj": ("mlp.fc2", None), "mlp.weights_out": ("mlp.fc2", None),
    "layernorm_before": ("norm1", None), "layer_norm1": ("norm1", None), "norm1": ("norm1", None),
    "layernorm_after": ("norm2", None), "layer_norm2": ("norm2", None), "norm2": ("norm2", None),
    "layer_scale1": ("ls1", None), "layer_scale2": ("ls2", None),
    # AIMv2: RMSNorms, the SwiGLU's gate / up / down projections as `ffn`
    "attention.out_proj": ("attn.proj", None), "rms_norm1": ("norm1", None), "rms_norm2": ("norm2", None),
    "ffn.gate_proj": ("mlp.fc1", 0), "ffn.up_proj": ("mlp.fc1", 1), "ffn.down_proj": ("mlp.fc2", None),
}
# HF per-layer parameters held by the layer itself -> timm's (InternVL's layer-scales)
_HF_LAYER_PARAMS = {"lambda_1": "ls1.gamma", "lambda_2": "ls2.gamma"}
# timm modules packed from several HF ones, in row order: their parts
_HF_PACKED = {"attn.qkv": ("query", "key", "value"), "mlp.fc1": ("gate", "up")}
_HF_TOP_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.class_embedding": "cls_token",                     # CLIP: [D]
    "embeddings.distillation_token": "dist_token",                 # DeiT
    "embeddings.register_tokens": "reg_token",                     # DINOv2 with registers
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.position_embedding.weight": "pos_embed",           # CLIP / SigLIP: an nn.Embedding [T, D]
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "embeddings.patch_embed.weight": "patch_embed.proj.weight",                              # AIMv2
    "embeddings.patch_embed.bias": "patch_embed.proj.bias",
    "embeddings.rms_norm.weight": "patch_embed.norm.weight", "rms_norm.weight": "norm.weight",
    "embeddings.patch_embeddings.weight": "patch_embed.proj.weight",                         # DINOv3
    "embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
    "norm.weight": "norm.weight", "norm.bias": "norm.bias",                                 # DINOv3
    "pre_layrnorm.weight": "norm_pre.weight", "pre_layrnorm.bias": "norm_pre.bias",          # CLIP
    "pre_layernorm.weight": "norm_pre.weight", "pre_layernorm.bias": "norm_pre.bias",        # OWL-ViT, OWLv2
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
    "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias",              # CLIP / SigLIP
    "classifier.weight": "head.weight", "classifier.bias": "head.bias",
    "cls_classifier.weight": "head.weight", "cls_classifier.bias": "head.bias",             # DeiT with teacher
    "distillation_classifier.weight": "head_dist.weight", "distillation_classifier.bias": "head_dist.bias",
    "visual_projection.weight": "head.weight",                                              # CLIP's projection
    "head.probe": "attn_pool.latent",                                                       # SigLIP's head
    "head.attention.out_proj.weight": "attn_pool.proj.weight", "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight", "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight", "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight", "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
}
# Only with HF's masked-image inputs (bool_masked_pos) or HF's own tanh pooler: no timm counterpart.
_HF_SKIPPED = ("embeddings.mask_token", "pooler.")


def detect_layout(state_dict: dict[str, Tensor]) -> str:
    """'timm', 'hf' or 'torchvision' from the keys of a ViT state_dict."""
    keys = list(state_dict)
    if any(k.startswith("blocks.") for k in keys) or "pos_embed" in state_dict:
        return "timm"
    if any(_HF_LAYER.match(k) for k in keys) or any(k.endswith(("embeddings.position_embeddings",
                                                                 "embeddings.position_embedding.weight"))
                                                    for k in keys):
        return "hf"
    if any(k.startswith("encoder.layers.encoder_layer_") for k in keys) or "class_token" in state_dict:
        return "torchvision"
    raise ValueError("state_dict: unrecognised key layout (expected timm, Hugging Face or torchvision ViT "
                     f"keys); first keys: {keys[:5]}")


def hf_to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF ViT, DeiT, DINOv2 (with or without registers), CLIP vision, SigLIP vision and InternVL vision keys (either ViT
    layout, with or without the base model's prefix) -> timm keys. Tensors pass through where the two
    hold the same values; separate q/k/v projections are concatenated into timm's packed qkv ([3·C, C]:
    q rows, then k, then v), DINOv2-giant's gate and up projections into timm's packed fc1, SigLIP's
    head splits its packed q/k/v into the pool's q and kv, CLIP's class embedding [D] becomes [1, 1, D]
    and its position table [T, D] becomes [1, T, D] (views).
    DINOv2 with registers gives the class token a position row and the registers none: timm's layout
    (no_embed_class) holds cls_token + pos[0] and the patches' rows, as timm's own conversion does.
    CLIP's projection has no bias: it becomes a head with a zero bias."""
    out: dict[str, Tensor] = {}
    packed: dict[tuple[int, str, str], list] = {}
    unknown = []
    for key, value in state_dict.items():
        name = _HF_PREFIX.sub("", key)
        if name.startswith(_HF_SKIPPED):
            continue
        m = _HF_LAYER.match(key)
        if m:
            idx, rest = int(m.group(1)), m.group(2)
            stem, _, param = rest.rpartition(".")
            if not stem and param in _HF_LAYER_PARAMS:
                out[f"blocks.{idx}.{_HF_LAYER_PARAMS[param]}"] = value
                continue
            if stem not in _HF_LAYER_KEYS:
                unknown.append(key)
                continue
            target, slot = _HF_LAYER_KEYS[stem]
            if slot is None:
                out[f"blocks.{idx}.{target}.{'gamma' if param == 'lambda1' else param}"] = value
            else:
                packed.setdefault((idx, target, param), [None] * len(_HF_PACKED[target]))[slot] = value
        elif name in _HF_TOP_KEYS:
            out[_HF_TOP_KEYS[name]] = value
        elif name in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
            param = name.rsplit("_", 1)[1]                                   # weight / bias
            dim = value.shape[0] // 3
            out[f"attn_pool.q.{param}"], out[f"attn_pool.kv.{param}"] = value[:dim], value[dim:]
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"state_dict: keys with no ViT counterpart in the HF layout: {unknown[:8]}")
    for (idx, target, param), parts in packed.items():
        if target == "mlp.fc1" and parts[0] is None and (idx, target, "weight") in packed \
                and packed[idx, target, "weight"][0] is None:
            parts = parts[1:]                                   # DINOv3's plain MLP: up_proj alone is fc1
        elif param == "bias" and target == "attn.qkv" and all(
                w is not None for w in packed.get((idx, target, "weight"), [None])):
            # DINOv3: q and v have biases, k has none (a zero bias, as timm's conversion makes it)
            rows = [w.shape[0] for w in packed[idx, target, "weight"]]
            parts = [p if p is not None else next(q for q in parts if q is not None).new_zeros(r)
                     for p, r in zip(parts, rows)]
        if any(p is None for p in parts):
            raise ValueError(f"state_dict: layer {idx} lacks one of {'/'.join(_HF_PACKED[target])} {param}")
        out[f"blocks.{idx}.{target}.{param}"] = torch.cat(parts, dim=0)
    if "cls_token" in out and out["cls_token"].dim() == 1:                   # CLIP's class embedding
        out["cls_token"] = out["cls_token"].view(1, 1, -1)
    if "pos_embed" in out and out["pos_embed"].dim() == 2:                   # an nn.Embedding's weight
        out["pos_embed"] = out["pos_embed"].unsqueeze(0)
    if "reg_token" in out and out["reg_token"].shape[1] == 0 and "pos_embed" not in out:
        del out["reg_token"]                                # DINOv3 without registers: HF's [1, 0, D] tensor
    if "reg_token" in out and "cls_token" in out and "pos_embed" in out:     # DINOv2 with registers
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    if "head.weight" in out and "head.bias" not in out and any(k.endswith("visual_projection.weight")
                                                                  for k in state_dict):
        out["head.bias"] = out["head.weight"].new_zeros(out["head.weight"].shape[0])
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


_EVA_KEY = re.compile(r"^blocks\.\d+\.(?:gamma_[12]|attn\.[qv]_bias|mlp\.fc1_[gx]\.(?:weight|bias))$")


def eva_to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm's Eva keys (its DINOv3 and EVA models) -> timm VisionTransformer's: `blocks.N.gamma_1` / `gamma_2` ->
    `ls1.gamma` / `ls2.gamma` (passed through); separate `attn.q_bias` and `attn.v_bias` -> the packed
    `attn.qkv.bias` with a zero key bias, as Eva computes it; EVA-02's separate `attn.q_proj` / `k_proj` / `v_proj`
    -> the packed `attn.qkv` likewise; the SwiGLU's `mlp.fc1_g` and `mlp.fc1_x` -> the packed `mlp.fc1` (gate
    rows first). Other keys pass through. (The q / k rows keep Eva's order: a model with interleaved RoPE pairs
    converts through `vitfast.optimize`, which reorders them.)"""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        stem, _, name = key.rpartition(".")
        if name in ("gamma_1", "gamma_2"):
            out[f"{stem}.ls{name[-1]}.gamma"] = value
        elif name not in ("q_bias", "v_bias") and not stem.endswith(
                (".mlp.fc1_g", ".mlp.fc1_x", ".attn.q_proj", ".attn.k_proj", ".attn.v_proj")):
            out[key] = value
    for key, q in state_dict.items():
        if key.endswith(".attn.q_bias"):
            stem = key[:-len("q_bias")]
            v = state_dict.get(stem + "v_bias")
            if v is None:
                raise ValueError(f"state_dict: {key} without {stem}v_bias")
            out[stem + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
        elif key.endswith(".attn.q_proj.weight"):            # EVA-02's separate projections (qkv_fused=False)
            stem = key[:-len("q_proj.weight")]
            parts = [state_dict.get(f"{stem}{n}_proj.weight") for n in "qkv"]
            if any(t is None for t in parts):
                raise ValueError(f"state_dict: {key} without {stem}k_proj.weight / {stem}v_proj.weight")
            out[stem + "qkv.weight"] = torch.cat(parts)
            qb, vb = state_dict.get(stem + "q_proj.bias"), state_dict.get(stem + "v_proj.bias")
            if (qb is None) != (vb is None) or stem + "k_proj.bias" in state_dict:
                raise ValueError(f"state_dict: {stem}q_proj / v_proj biases (expected both or neither, no k bias)")
            if qb is not None:
                out[stem + "qkv.bias"] = torch.cat([qb, torch.zeros_like(qb), vb])
        elif key.endswith(".mlp.fc1_g.weight"):
            stem = key[:-len("fc1_g.weight")]
            for p in ("weight", "bias"):
                g, x = state_dict.get(f"{stem}fc1_g.{p}"), state_dict.get(f"{stem}fc1_x.{p}")
                if (g is None) != (x is None):
                    raise ValueError(f"state_dict: {stem}fc1_g.{p} and {stem}fc1_x.{p}: one without the other")
                if g is not None:
                    out[f"{stem}fc1.{p}"] = torch.cat([g, x])
    return out


def to_timm(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> timm keys."""
    layout = detect_layout(state_dict)
    if layout == "timm":
        return eva_to_timm(state_dict) if any(_EVA_KEY.match(k) for k in state_dict) else dict(state_dict)
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
    out["pos_embed"] = resample_pos_embed(pe, model.patch_embed.grid_size, None,
                                          getattr(model, "pos_embed_prefix", model.num_prefix_tokens))
    return out


def load_checkpoint(model, checkpoint: str | os.PathLike | Mapping[str, Tensor]):
    """Load a checkpoint file or state_dict (timm, HF or torchvision keys) into a vitfast/reference
    `VisionTransformer`, strictly. Raises ValueError naming missing, unexpected or mis-shaped keys."""
    sd = dict(checkpoint) if isinstance(checkpoint, Mapping) else load_state_dict_file(checkpoint)
    sd = fit_pos_embed(to_timm(sd), model)
    expected = model.state_dict()
    # A qkv bias the model does not have, all zeros, holds nothing: HF's DINOv3 checkpoints carry zero query and
    # value biases that timm's configurations of those models leave out (as timm's conversion drops them).
    sd = {k: v for k, v in sd.items() if k in expected or not (k.endswith(".attn.qkv.bias") and not v.any())}
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
