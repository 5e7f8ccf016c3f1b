"""`vitfast.optimize(model)`: a timm, Hugging Face or torchvision ViT -> the same model on vitfast ops.

- timm `VisionTransformer` (and `vitfast.reference.VisionTransformer`, which has timm's tree) ->
  `vitfast.VisionTransformer` (same forward / forward_features / forward_head; `pretrained_cfg` kept),
  with the features of DINOv2 (layer-scale, registers, no_embed_class, the giant's SwiGLUPacked MLP),
  CLIP (pre-norm, QuickGELU, eps), SigLIP (attention pooling), timm's unpacked SwiGLU; timm's DeiT
  `VisionTransformerDistilled` -> vitfast's; timm's `Eva` with DINOv3's features (RoPE, registers, layer-scale,
  separate q / v biases, SwiGLU), EVA's (a position table), EVA-02's or Perception Encoder's ->
  `vitfast.VisionTransformer`; timm's `Beit` (BEiT, BEiT v2: the relative position bias in the attention kernel)
  -> a stand-in holding timm's model (vitfast.timm_beit).
- HF transformers ViT, DeiT (incl. WithTeacher), DINOv2 (incl. with registers and SwiGLU), CLIP vision (incl.
  WithProjection) and SigLIP vision models -> a module with HF's forward arguments that returns HF's
  output object (`BaseModelOutputWithPooling`, `ImageClassifierOutput` incl. the loss when `labels` are
  given, ...), or its tuple with `return_dict=False` (vitfast.hf).
- torchvision `VisionTransformer` -> `vitfast.VisionTransformer` (forward(images) -> logits).
- Models around one of those: HF's depth / segmentation models whose `backbone` is a DINOv2 / DINOv3 backbone
  (Depth Anything, DPT), HF's CLIP / MetaCLIP 2 / SigLIP two-tower and classification models (`vision_model`:
  `get_image_features`, the image-text logits), HF's DINOv2 classifiers (`dinov2`), HF's vision-language
  models whose `vision_tower` is a CLIP or SigLIP vision model (LLaVA, PaliGemma, Gemma 3: inside their
  `model`), and timm's `features_only` models (`FeatureGetterNet`, which reads its ViT's
  `forward_intermediates`) -> a copy of the outer model, its other modules (the text tower, the language
  model) shared, with that one optimized.

Parameters are shared with the source model (the same `nn.Parameter` objects); tensors timm's layout
holds in another form are built from the source's on use (HF's separate q/k/v as timm's packed qkv, CLIP's
class embedding, ...: vitfast.hf), so the source's parameters are the only ones. dtype, device, train/eval
mode and requires_grad are kept. timm, transformers and torchvision are never imported: models are
recognised by their class names and attributes.

A feature vitfast does not implement raises `UnsupportedFeatureError` (a ValueError) naming it:
qk-norm, norms other than LayerNorm and RMSNorm (an RMSNorm inside the attention or MLP), other pooling heads,
activations other than GELU and QuickGELU, MLPs other than timm's Mlp, SwiGLU and SwiGLUPacked, RoPE other than
DINOv3's and timm's RotaryEmbeddingCat (EVA-02's, Perception Encoder's, RoPE-ViT's axial one), conv stems, HF
masks and attention outputs, ... Dropout and drop-path are no-ops in eval mode: converting a model that
has them in train mode raises, and a converted model refuses to run forward in train mode
(`VisionTransformer.train_only_features`).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from vitfast.checkpoint import eva_to_timm, torchvision_to_timm
from vitfast.graphs import CUDAGraphRunner
from vitfast.layers import JoinedLinear
from vitfast.model import VisionTransformer, VisionTransformerDistilled

__all__ = ["optimize", "UnsupportedFeatureError"]


class UnsupportedFeatureError(ValueError):
    """The model uses a feature vitfast does not implement (named in the message)."""


def optimize(model: nn.Module, *, cuda_graphs: bool | None = None) -> nn.Module:
    """timm / HF transformers / torchvision ViT -> a model with the same call signature and outputs
    running on vitfast ops (see the module docstring). A `vitfast.VisionTransformer` is returned as is.

    cuda_graphs: None (default) or True: the returned model's forward replays CUDA graphs on CUDA in
    eval mode when no gradient is recorded (the first call with new input shapes runs eagerly, the
    second is captured; see vitfast.graphs); anything else runs eagerly. False: always eager.
    The runner is the model's `cuda_graphs` attribute."""
    if cuda_graphs not in (None, True, False):
        raise ValueError(f"cuda_graphs: expected None, True or False, got {cuda_graphs!r}")
    inner = _wrapped_models(model)
    if inner:
        out = copy.copy(model)                            # the outer model's other modules shared
        out._modules, out._parameters, out._buffers = dict(model._modules), dict(model._parameters), \
            dict(model._buffers)                          # its own tables: setting one leaves `model` alone
        for attr in inner:
            setattr(out, attr, optimize(model._modules[attr], cuda_graphs=cuda_graphs))
        return out
    if isinstance(model, VisionTransformer):
        out = model
    elif type(model).__module__.startswith("transformers."):
        from vitfast.hf import optimize_hf  # imports this module

        out = optimize_hf(model)
    elif all(hasattr(model, a) for a in ("conv_proj", "class_token", "encoder", "heads")):
        out = _from_torchvision(model)
    elif type(model).__name__ == "Eva" and type(model).__module__.startswith("timm."):
        out = _from_timm_eva(model)
    elif type(model).__name__ == "Beit" and type(model).__module__.startswith("timm."):
        from vitfast.timm_beit import from_timm_beit  # imports this module

        out = from_timm_beit(model)
    elif all(hasattr(model, a) for a in ("patch_embed", "blocks", "pos_embed")):
        out = _from_timm(model)
    else:
        raise ValueError("model: expected a timm VisionTransformer, a Hugging Face vision model (see "
                         "vitfast.hf.CLASSES) or a torchvision VisionTransformer, got "
                         f"{type(model).__module__}.{type(model).__name__}")
    # Graphs on the outermost module only: the modules it wraps run inside its graph.
    for m in out.modules():
        if isinstance(getattr(m, "cuda_graphs", None), CUDAGraphRunner):
            m.cuda_graphs = CUDAGraphRunner(False)
    out.cuda_graphs = CUDAGraphRunner(cuda_graphs)
    return out


# Where transformers models keep the vision model they run, looked for in this order: depth models' `backbone`,
# CLIP's / SigLIP's two-tower and classification models' `vision_model`, the VLMs' `vision_tower` (LLaVA,
# PaliGemma, Gemma 3, Kimi K2.5: inside their `model`), DINOv2's classifiers' `dinov2` / `dinov2_with_registers`,
# OWL-ViT's and OWLv2's `owlvit` / `owlv2`, the Qwen-VL, GLM-4V and PaddleOCR-VL models' `visual`, LightOnOCR's
# `vision_encoder` (inside their `model`; SAM's, and SAM 3's, whose Sam3VisionModel holds its ViT as `backbone`),
# DeepSeek-VL hybrid's SAM `high_res_vision_model` beside its `vision_model`, SAM 3 video's `detector_model` (a
# Sam3Model), VisionEncoderDecoderModel's `encoder` (TrOCR's ViT / DeiT), Depth Pro's `depth_pro` (its `encoder`'s
# `patch_encoder` and `image_encoder`) and `fov_model` (its `fov_encoder`), each of those a DINOv2 as its `model`,
# PixioBackbone's `pixio`, IJepaForImageClassification's `ijepa`, ViTMAEForPreTraining's and
# ViTForMaskedImageModeling's `vit` (a ViTMAEModel, a ViTModel: the pretraining heads), DeiTForMaskedImageModeling's
# `deit`, Phi-4-multimodal's
# `embed_tokens_extend` (inside its `model`), whose `image_embed` holds its SigLIP as `img_processor`:
# every one of these that holds one (found through the models they hold in turn); else their `model`;
# then the `timm_model` of transformers' TimmWrapper models (Perception LM's `vision_tower`).
_HF_INNER = ("backbone", "vision_model", "vision_tower", "dinov2", "dinov2_with_registers", "owlvit", "owlv2", "visual",
             "vision_encoder", "high_res_vision_model", "detector_model", "depth_pro", "encoder", "patch_encoder",
             "image_encoder", "fov_model", "fov_encoder", "pixio", "ijepa", "vit", "deit", "embed_tokens_extend",
             "image_embed", "img_processor", "videomae", "clip", "dpt", "timesformer",
             "beit", "data2vec_vision", "git", "vivit")


def _wrapped_models(model: nn.Module) -> tuple[str, ...]:
    """The attributes holding the ViTs of a model around them (module docstring); empty if none."""
    cls = type(model)
    if cls.__module__.startswith("transformers.") and not _is_hf_class(cls.__name__):
        holds = lambda m: m is not None and (_is_hf_class(type(m).__name__) or bool(_wrapped_models(m)))
        found = tuple(attr for attr in _HF_INNER if holds(model._modules.get(attr)))
        if found or holds(model._modules.get("model")):
            return found or ("model",)
        inner = model._modules.get("timm_model")        # TimmWrapperModel / ...ForImageClassification: a timm model
        if inner is not None and type(inner).__module__.startswith("timm."):
            return ("timm_model",)
    if cls.__name__ == "FeatureGetterNet" and cls.__module__.startswith("timm.") \
            and isinstance(getattr(model, "model", None), nn.Module):
        return ("model",)
    return ()


def _is_hf_class(name: str) -> bool:
    from vitfast.hf import CLASSES  # imports this module

    return name in CLASSES


# --------------------------------------------------------------------------------------------
# Checks shared by the three sources
# --------------------------------------------------------------------------------------------
def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _drop_rate(m) -> float:
    """Rate of a dropout-like module (nn.Dropout, timm DropPath / PatchDropout) or a float; NaN if unknown."""
    if _is_identity(m):
        return 0.0
    if isinstance(m, (int, float)):
        return float(m)
    for attr in ("p", "drop_prob", "prob"):
        v = getattr(m, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    return float("nan")


def _activation(act) -> str | None:
    """vitfast's name for an activation module / name, or None when vitfast has no such epilogue."""
    if act in ("gelu", "gelu_tanh", "quick_gelu"):
        return act
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if type(act).__module__.startswith("timm."):       # timm.layers.activations' own classes
        return {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}.get(type(act).__name__)
    return None


class BackboneAPI:
    """What transformers' BackboneMixin gives the models around a backbone (DPT, Depth Anything), for a stand-in
    with `config` (HF's own: out_features set on it later is read on the next call), `stage_names` and
    `num_features`."""

    @property
    def out_features(self) -> list[str]:
        return list(self.config.out_features)

    @property
    def out_indices(self) -> list[int]:
        return list(self.config.out_indices)

    @property
    def out_feature_channels(self) -> dict[str, int]:
        return dict(zip(self.stage_names, self.num_features))

    @property
    def channels(self) -> list[int]:
        return [self.out_feature_channels[name] for name in self.out_features]

    def forward_with_filtered_kwargs(self, *args, **kwargs):
        return self(*args, **kwargs)


class _Findings:
    """Unsupported features (always an error) and train-only ones (dropout: an error in train mode)."""

    def __init__(self, what: str):
        self.what, self.unsupported, self.train_only = what, [], []

    def need(self, ok: bool, feature: str) -> bool:
        if not ok and feature not in self.unsupported:
            self.unsupported.append(feature)
        return ok

    def dropout(self, m, where: str, kind: str = "dropout") -> None:
        p = _drop_rate(m)
        if p != p:
            self.need(False, f"{where}: unknown module {type(m).__name__}")
        elif p > 0:
            self.train_only.append(f"{kind} p={p:g} ({where})")

    def layer_norm_eps(self, m, where: str, dim: int) -> float | None:
        ok = (isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (dim,) and m.weight is not None
              and m.bias is not None)
        self.need(ok, f"{where}: {type(m).__name__} (only LayerNorm with weight and bias)")
        return m.eps if ok else None

    def norm_eps(self, m, where: str, dim: int, kinds: set) -> float | None:
        """A LayerNorm with weight and bias, or an RMSNorm with a weight and an eps (timm's RmsNorm, torch's
        nn.RMSNorm, vitfast's): its eps; its kind ("layernorm" / "rmsnorm") goes to `kinds`."""
        if type(m).__name__ not in ("RmsNorm", "RMSNorm"):
            eps = self.layer_norm_eps(m, where, dim)
            if eps is not None:
                kinds.add("layernorm")
            return eps
        w = getattr(m, "weight", None)
        ok = self.need(isinstance(w, Tensor) and tuple(w.shape) == (dim,) and getattr(m, "bias", None) is None
                       and isinstance(getattr(m, "eps", None), float),
                       f"{where}: {type(m).__name__} (an RMSNorm only with a weight of {dim} and an eps)")
        if ok:
            kinds.add("rmsnorm")
        return m.eps if ok else None

    def linear(self, m, where: str, bias: bool = True) -> bool:
        ok = self.need(isinstance(m, nn.Linear), f"{where}: {type(m).__name__} (expected nn.Linear)")
        return ok and self.need(m.bias is not None or not bias, f"{where} without bias")

    def patchify(self, proj, where: str, bias: bool = True) -> bool:
        """A non-overlapping patchify Conv2d, with a bias exactly when `bias` (timm drops it with pre_norm)."""
        ok = isinstance(proj, nn.Conv2d) and tuple(proj.kernel_size) == tuple(proj.stride) and \
            proj.padding in ("valid", (0, 0)) and tuple(proj.dilation) == (1, 1) and proj.groups == 1
        ok = self.need(ok, f"{where}: {type(proj).__name__} (expected a non-overlapping patchify Conv2d; "
                           "conv stems are not supported)")
        has = ok and proj.bias is not None
        return ok and self.need(has == bias, f"{where} {'without' if bias else 'with'} bias "
                                             f"({'without' if bias else 'with'} pre_norm)")

    def one_dtype_device(self, tensors) -> None:
        """The model's tensors all of one dtype on one device (the kernels take one of each)."""
        tensors = list(tensors)
        self.need(len({(t.dtype, t.device) for t in tensors}) <= 1,
                  f"parameters of mixed dtypes / devices ({sorted({f'{t.dtype} {t.device}' for t in tensors})})")

    def uniform(self, values: dict[str, set], where: str = "blocks") -> None:
        for name, seen in values.items():
            self.need(len(seen) <= 1, f"{where} differ in {name} ({sorted(map(str, seen))})")

    def check(self, training: bool) -> None:
        if self.unsupported:
            raise UnsupportedFeatureError(f"optimize: this {self.what} uses features vitfast does not support: "
                                          + "; ".join(self.unsupported))
        if training and self.train_only:
            raise UnsupportedFeatureError(
                f"optimize: this {self.what} is in train mode with {_summary(self.train_only)}; vitfast does not "
                "implement dropout / drop-path or train-time augmentations: call .eval() first (they are inactive "
                "in eval mode)")


def _summary(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _mlp_ratio(hidden: int, dim: int) -> float:
    """A ratio r with int(dim * r) == hidden (the constructors' rule)."""
    r = hidden / dim
    return r if int(dim * r) == hidden else (hidden + 0.5) / dim


def _build(cfg: dict, state: dict[str, Tensor], source, findings: _Findings,
           cls: type = VisionTransformer) -> VisionTransformer:
    """A vitfast VisionTransformer (or `cls`) built on the meta device whose parameters become
    `state`'s tensors (nn.Parameters are adopted as they are: shared with the source model)."""
    findings.one_dtype_device(state.values())
    findings.check(source.training)
    with torch.device("meta"):
        model = cls(**cfg)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise UnsupportedFeatureError(f"optimize: the {findings.what}'s weights do not map onto a vitfast ViT: "
                                      f"missing {missing}, unexpected {unexpected}, shape mismatches {shapes}")
    for key, value in state.items():
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if not isinstance(value, nn.Parameter):
            value = nn.Parameter(value.detach(), requires_grad=value.requires_grad)
        setattr(owner, attr, value)
    model.train(source.training)
    model.train_only_features = tuple(findings.train_only)
    return model


# --------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------
def _from_timm(model: nn.Module) -> VisionTransformer:
    f = _Findings(f"{type(model).__name__}")
    distilled = type(model).__name__ == "VisionTransformerDistilled"
    f.need(type(model).__name__ == "VisionTransformer" or distilled,
           f"model class {type(model).__name__} (only timm's VisionTransformer and VisionTransformerDistilled)")
    f.need(not (distilled and getattr(model, "distilled_training", False) and model.training),
           "distilled_training=True (training with the distillation head's separate output)")
    f.need(isinstance(model.pos_embed, Tensor), "no position embedding (pos_embed='none')")
    dim = getattr(model, "embed_dim", None) or model.pos_embed.shape[-1]
    seen = _timm_seen()
    pre_norm, eps = _timm_stem(f, model, dim, seen)
    for i, blk in enumerate(model.blocks):
        w = f"blocks.{i}"
        if not f.need(type(blk).__name__ == "Block", f"{w}: block type {type(blk).__name__} (only timm's Block)"):
            continue
        for ls in ("ls1", "ls2"):
            m = getattr(blk, ls, None)
            ok = _is_identity(m) or isinstance(getattr(m, "gamma", None), Tensor)
            if f.need(ok, f"{w}.{ls}: {type(m).__name__} (only timm's LayerScale)"):
                seen["layer-scale"].add(not _is_identity(m))
        attn = blk.attn
        if f.need(type(attn).__name__ == "Attention" and isinstance(getattr(attn, "qkv", None), nn.Linear),
                  f"{w}.attn: {type(attn).__name__} (only timm's Attention with a packed qkv)"):
            _timm_attention(f, attn, w, dim, seen)
            seen["qkv bias"].add(attn.qkv.bias is not None)
        _timm_block(f, blk, w, dim, eps, seen)
    use_fc_norm, final_norm = _timm_tail(f, model, dim, eps, seen)
    f.check(model.training)
    cfg = _timm_config(model, dim, seen, eps, pre_norm, use_fc_norm, final_norm,
                       no_embed_class=bool(getattr(model, "no_embed_class", False)),
                       reg_tokens=int(getattr(model, "num_reg_tokens", 0) or 0),
                       pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)))
    out = _build(cfg, _timm_state(model), model, f, VisionTransformerDistilled if distilled else VisionTransformer)
    _join_timm_parts(model, out)
    _keep_pretrained_cfg(model, out)
    return out


def _from_timm_eva(model: nn.Module) -> VisionTransformer:
    """timm's Eva class with VisionTransformer's features: DINOv3 (its RoPE, registers, layer-scale as the
    blocks' gamma_1 / gamma_2, the plain, packed or unpacked SwiGLU MLP), EVA's with a position table and
    without RoPE, and EVA-02's and EVA-CLIP's (a position table and the axial RoPE of timm's RotaryEmbeddingCat,
    whose tables the converted model takes from that module, interleaved pairs as rotate-half ones by a
    reordering of q's and k's rows; separate q / k / v projections; LayerNorms inside the attention and the
    MLP). Separate q / v biases beside the packed qkv weight, the q / k / v projections and the unpacked
    SwiGLU's fc1_g / fc1_x are joined (`JoinedLinear`) from Eva's own tensors. Perception Encoder's and RoPE-ViT's
    AttentionRope (a packed qkv with its own bias), and Eva's attention pooling over the prefix tokens too, with
    its own head count and MLP width (PE-Core's). Mixed RoPE, grouped-query attention and other options are refused
    by name."""
    f = _Findings("timm Eva")
    dim = model.embed_dim
    seen = _timm_seen()
    pre_norm, eps = _timm_stem(f, model, dim, seen)
    heads = {blk.attn.num_heads for blk in model.blocks if hasattr(getattr(blk, "attn", None), "num_heads")}
    rope, rope_cfg, interleaved = getattr(model, "rope", None), {}, False
    f.need(not getattr(model, "rope_mixed", False), "rope_type='mixed'")
    kind = type(rope).__name__
    if rope is not None and f.need(kind in ("RotaryEmbeddingDinoV3", "RotaryEmbeddingCat"),
                                   f"rope: {kind} (only DINOv3's RotaryEmbeddingDinoV3 and EVA-02's axial "
                                   "RotaryEmbeddingCat)") and kind == "RotaryEmbeddingCat":
        # EVA-02: the tables are the module's own (`reference.timm_rope_tables`); interleaved pairs are taken as
        # rotate-half ones by reordering the q / k rows of each head (`_join_timm_parts`)
        f.need(len(heads) == 1 and getattr(rope, "dim", None) == dim // next(iter(heads), 1),
               f"rope: dim {getattr(rope, 'dim', None)} (expected the head dim)")
        if getattr(rope, "aug_active", False):
            f.train_only.append("RoPE coordinate augmentation (rope_shift / jitter / rescale_coords)")
        interleaved = not getattr(rope, "rotate_half", False)
        rope_cfg = dict(rope="timm")
    elif rope is not None and kind == "RotaryEmbeddingDinoV3":
        f.need(rope.temperature is not None and rope.min_period is None and rope.max_period is None,
               "rope: min_period / max_period (only a temperature)")
        f.need(rope.normalize_coords == "separate" and rope.grid_offset == 0 and rope.grid_indexing == "ij",
               f"rope: normalize_coords={rope.normalize_coords!r}, grid_offset={rope.grid_offset}, "
               f"grid_indexing={rope.grid_indexing!r} (only 'separate', 0 and 'ij': DINOv3's)")
        f.need(rope.rotate_half, "rope: rotate_half=False (only DINOv3's rotate-half pairs)")
        f.need(len(heads) == 1 and rope.dim * heads.pop() == dim, f"rope: dim {rope.dim} (expected the head dim)")
        if rope.aug_active:
            f.train_only.append("RoPE coordinate augmentation (rope_shift / jitter / rescale_coords)")
        rope_cfg = dict(rope="dinov3", rope_temperature=rope.temperature, rope_rounding="timm")
    for i, blk in enumerate(model.blocks):
        w = f"blocks.{i}"
        if not f.need(type(blk).__name__ == "EvaBlock", f"{w}: block type {type(blk).__name__} (only EvaBlock)"):
            continue
        g1, g2 = getattr(blk, "gamma_1", None), getattr(blk, "gamma_2", None)
        f.need((g1 is None) == (g2 is None), f"{w}: layer-scale on one branch only (attn_only_layer_scale)")
        seen["layer-scale"].add(g1 is not None)
        attn = blk.attn
        fused = isinstance(getattr(attn, "qkv", None), nn.Linear)
        split = all(isinstance(getattr(attn, f"{n}_proj", None), nn.Linear) for n in "qkv")
        attn_kind = type(attn).__name__
        if f.need(attn_kind in ("EvaAttention", "AttentionRope") and (fused or split),
                  f"{w}.attn: {attn_kind} (only EvaAttention and AttentionRope with a packed qkv or q / k / v "
                  "projections)"):
            f.need(getattr(attn, "gate", None) is None, f"{w}.attn: a gate (gated_attn)")
            f.need(getattr(attn, "num_kv_heads", attn.num_heads) == attn.num_heads,
                   f"{w}.attn: num_kv_heads={getattr(attn, 'num_kv_heads', None)} (grouped-query attention)")
            if fused and attn_kind == "AttentionRope":       # Perception Encoder's, RoPE-ViT's: the Linear's own bias
                seen["qkv bias"].add(attn.qkv.bias is not None)
            elif fused:
                f.need(attn.qkv.bias is None, f"{w}.attn: a bias on the packed qkv Linear")
                seen["qkv bias"].add(getattr(attn, "q_bias", None) is not None)
            else:                                      # EVA-02's qkv_fused=False: q and v biases, none on k
                f.need(attn.k_proj.bias is None and (attn.q_proj.bias is None) == (attn.v_proj.bias is None),
                       f"{w}.attn: a k_proj bias, or a q_proj bias without a v_proj one or the other way round")
                seen["qkv bias"].add(attn.q_proj.bias is not None)
            half = bool(getattr(attn, "rotate_half", False))
            f.need(not rope_cfg or (half == (not interleaved) and attn.num_prefix_tokens == model.num_prefix_tokens),
                   f"{w}.attn: rotate_half={half}, num_prefix_tokens={attn.num_prefix_tokens} (expected the RoPE "
                   f"module's pairs and the model's {model.num_prefix_tokens} prefix tokens)")
            _timm_attention(f, attn, w, dim, seen)
        _timm_block(f, blk, w, dim, eps, seen)
    use_fc_norm, final_norm = _timm_tail(f, model, dim, eps, seen)
    f.check(model.training)
    cfg = _timm_config(model, dim, seen, eps, pre_norm, use_fc_norm, final_norm,
                       no_embed_class=bool(model.no_embed_class), pos_embed="none" if model.pos_embed is None
                       else "learn", reg_tokens=0 if model.reg_token is None else model.reg_token.shape[1],
                       pool_include_prefix=model.global_pool == "map", **rope_cfg)   # Eva's "map" pools them all
    out = _build(cfg, _timm_state(model), model, f)
    _join_timm_parts(model, out, interleaved)
    if rope_cfg.get("rope") == "timm":
        out.rope_embed = rope                           # timm's own module makes the tables
    _keep_pretrained_cfg(model, out)
    return out


def _rotate_half_order(dim: int, heads: int) -> list[int]:
    """The q / k rows of `heads` heads of dim / heads columns with interleaved RoPE pairs (2i, 2i + 1) reordered so
    that they are rotate-half pairs (i, D/2 + i): each head's even rows, then its odd ones. q · k is unchanged."""
    d = dim // heads
    return [h * d + j for h in range(heads) for j in (*range(0, d, 2), *range(1, d, 2))]


def _timm_state(model: nn.Module) -> dict[str, Tensor]:
    """timm's state_dict (its own tensors) in vitfast's keys (`eva_to_timm` for Eva's): where vitfast packs what
    timm keeps apart (Eva's q / v biases beside the packed qkv weight, the unpacked SwiGLU's fc1_g / fc1_x), a
    concatenated copy for `_build`, which `_join_timm_parts` then replaces by the parts."""
    return eva_to_timm(model.state_dict(keep_vars=True))


def _join_timm_parts(model: nn.Module, out: VisionTransformer, interleaved: bool = False) -> None:
    """Point the packed tensors `_timm_state` copied at timm's own parts (`JoinedLinear`); with interleaved RoPE
    pairs, q's and k's rows reordered as rotate-half pairs (`_rotate_half_order`)."""
    dim = out.embed_dim
    order = _rotate_half_order(dim, out.blocks[0].attn.num_heads) if interleaved and len(out.blocks) else None
    for blk, core in zip(model.blocks, out.blocks):
        attn, mlp = blk.attn, blk.mlp
        if getattr(attn, "q_proj", None) is not None:   # EVA-02's separate projections (k has no bias)
            core.attn.qkv = JoinedLinear([(attn.q_proj, "weight", "bias", None, order),
                                          (attn.k_proj, "weight", "bias", None, order),
                                          (attn.v_proj, "weight", "bias", None)])
        elif order is not None and attn.qkv.bias is not None:   # AttentionRope's packed qkv with its own bias
            core.attn.qkv = JoinedLinear([(attn.qkv, "weight", "bias", slice(0, dim), order),
                                          (attn.qkv, "weight", "bias", slice(dim, 2 * dim), order),
                                          (attn.qkv, "weight", "bias", slice(2 * dim, 3 * dim))])
        elif getattr(attn, "q_bias", None) is not None or order is not None:
            parts = nn.Module()                         # Eva's qkv weight and q / v biases (k has none)
            parts.weight, parts.q_bias, parts.v_bias = attn.qkv.weight, attn.q_bias, attn.v_bias
            core.attn.qkv = JoinedLinear([(parts, "weight", "q_bias", slice(0, dim), order),
                                          (parts, "weight", None, slice(dim, 2 * dim), order),
                                          (parts, "weight", "v_bias", slice(2 * dim, 3 * dim))])
        if hasattr(mlp, "fc1_g"):                       # timm's SwiGLU: silu(fc1_g(x)) · fc1_x(x)
            core.mlp.fc1 = JoinedLinear([(mlp.fc1_g, "weight", "bias", None), (mlp.fc1_x, "weight", "bias", None)])


def _timm_seen() -> dict[str, set]:
    """What the blocks (and the stem and tail) of a timm model must agree on, as found."""
    return {"num_heads": set(), "mlp hidden size": set(), "activation": set(), "qkv bias": set(),
            "layer-scale": set(), "mlp layer": set(), "attn norm": set(), "mlp norm": set(), "norm": set(),
            "embed norm": set(), "proj bias": set()}


def _timm_stem(f: _Findings, model: nn.Module, dim: int, seen: dict) -> tuple[bool, set]:
    """Check timm's pooling, patch embedding (and its norm), norm_pre and the dropouts of the embedding and the
    head; returns whether there is a norm_pre and the norms' eps found so far (their kinds go to seen["norm"])."""
    gp = getattr(model, "global_pool", "token")
    f.need(gp in ("token", "avg", "map", ""), f"global_pool={gp!r}")
    pe = model.patch_embed
    pre_norm = not _is_identity(getattr(model, "norm_pre", None))
    f.patchify(getattr(pe, "proj", None), "patch_embed.proj", bias=not pre_norm)
    f.need(not getattr(pe, "dynamic_img_pad", False), "dynamic_img_pad=True")
    f.need(getattr(pe, "img_size", None) is not None, "patch_embed without a fixed img_size")
    f.dropout(getattr(model, "pos_drop", None), "pos_drop")
    f.dropout(getattr(model, "patch_drop", None), "patch_drop", "patch dropout")
    f.dropout(getattr(model, "head_drop", None), "head_drop")
    eps = {f.norm_eps(model.norm_pre, "norm_pre", dim, seen["norm"])} if pre_norm else set()
    embed_norm = getattr(pe, "norm", None)         # embed_norm_layer (AIMv2's RMSNorm on the patch tokens)
    seen["embed norm"].add(not _is_identity(embed_norm))
    if not _is_identity(embed_norm):
        eps.add(f.norm_eps(embed_norm, "patch_embed.norm", dim, seen["norm"]))
    return pre_norm, eps


def _timm_attention(f: _Findings, attn: nn.Module, w: str, dim: int, seen: dict) -> None:
    """Check one timm attention with a packed qkv Linear (VisionTransformer's Attention, Eva's EvaAttention)."""
    f.need(_is_identity(getattr(attn, "q_norm", None)) and _is_identity(getattr(attn, "k_norm", None)), "qk-norm")
    f.dropout(getattr(attn, "attn_drop", None), f"{w}.attn.attn_drop")
    f.dropout(getattr(attn, "proj_drop", None), f"{w}.attn.proj_drop")
    qkv = getattr(attn, "qkv", None)
    if isinstance(qkv, nn.Linear):
        f.need(qkv.out_features == 3 * dim and qkv.in_features == dim, f"{w}.attn.qkv shape")
    else:                                              # Eva's q / k / v projections
        f.need(all(getattr(attn, f"{n}_proj").out_features == dim and getattr(attn, f"{n}_proj").in_features == dim
                   for n in "qkv"), f"{w}.attn.q_proj / k_proj / v_proj shapes")
    if f.linear(attn.proj, f"{w}.attn.proj", bias=False):      # timm's proj_bias: proj's and the MLP's
        seen["proj bias"].add(attn.proj.bias is not None)
    heads = attn.num_heads
    f.need(dim % heads == 0 and abs(attn.scale - (dim // heads) ** -0.5) < 1e-12 * attn.scale + 1e-12,
           f"{w}.attn: attention scale {attn.scale} (only head_dim ** -0.5)")
    seen["num_heads"].add(heads)


def _timm_block(f: _Findings, blk: nn.Module, w: str, dim: int, eps: set, seen: dict) -> None:
    """Check one timm block's norms, drop-paths and MLP (timm's Mlp, SwiGLUPacked or the unpacked SwiGLU)."""
    f.dropout(getattr(blk, "drop_path1", None), f"{w}.drop_path1", "drop-path")
    f.dropout(getattr(blk, "drop_path2", None), f"{w}.drop_path2", "drop-path")
    eps |= {f.norm_eps(blk.norm1, f"{w}.norm1", dim, seen["norm"]), f.norm_eps(blk.norm2, f"{w}.norm2", dim,
                                                                                 seen["norm"])}
    mlp = blk.mlp
    kind = {"Mlp": "mlp", "GluMlp": "swiglu", "SwiGLU": "swiglu"}.get(type(mlp).__name__)
    if f.need(kind is not None, f"{w}.mlp: {type(mlp).__name__} (only timm's Mlp, SwiGLU and SwiGLUPacked, a "
                                "GluMlp)"):
        check = _timm_mlp if kind == "mlp" else _timm_swiglu_parts if hasattr(mlp, "fc1_g") else _timm_swiglu
        check(f, mlp, f"{w}.mlp", seen)
        seen["mlp layer"].add(kind)
        # the LayerNorms inside (timm's scale_attn_norm / scale_mlp_norm, EVA-02's): on the attention's output
        # and on the MLP's hidden features (its gated half for a SwiGLU)
        fc2 = getattr(mlp, "fc2", None)
        for name, m, width in (("attn", blk.attn, dim), ("mlp", mlp, getattr(fc2, "in_features", None))):
            norm = getattr(m, "norm", None)
            seen[f"{name} norm"].add(not _is_identity(norm))
            if not _is_identity(norm):
                eps.add(f.layer_norm_eps(norm, f"{w}.{name}.norm", width))


def _timm_tail(f: _Findings, model: nn.Module, dim: int, eps: set, seen: dict) -> tuple[bool, bool]:
    """Check the final norm / fc_norm, the heads and an attention-pooling head, then that the blocks agree;
    returns (fc_norm used, a final norm at all)."""
    norm, fc_norm = getattr(model, "norm", None), getattr(model, "fc_norm", None)
    use_fc_norm, final_norm = not _is_identity(fc_norm), not (_is_identity(norm) and _is_identity(fc_norm))
    f.need(_is_identity(norm) or _is_identity(fc_norm), "norm and fc_norm both")
    if final_norm:
        eps.add(f.norm_eps(fc_norm if use_fc_norm else norm, "fc_norm" if use_fc_norm else "norm", dim,
                           seen["norm"]))
    for name in ("head", "head_dist"):
        if not _is_identity(getattr(model, name, None)):
            f.linear(getattr(model, name), name)
    pool = getattr(model, "attn_pool", None)
    if getattr(model, "global_pool", "token") == "map" and f.need(
            type(pool).__name__ == "AttentionPoolLatent", f"attn_pool: {type(pool).__name__} (only timm's "
                                                          "AttentionPoolLatent)"):
        heads = getattr(pool, "num_heads", 0)
        f.need(getattr(pool, "latent_len", 1) == 1 and getattr(pool, "pool", "token") == "token"
               and getattr(pool, "pos_embed", None) is None and isinstance(getattr(pool, "q", None), nn.Linear)
               and _is_identity(getattr(pool, "q_norm", None)) and _is_identity(getattr(pool, "k_norm", None))
               and getattr(pool, "mlp", None) is not None and heads > 0 and dim % heads == 0
               and abs(getattr(pool, "scale", 0) - (dim // heads) ** -0.5) < 1e-12,
               "attn_pool options (only one latent query with its q projection, token pooling, no qk-norm "
               "or position table, an MLP, head_dim ** -0.5 scaling)")
        for name in ("q", "kv", "proj"):
            f.linear(getattr(pool, name, None), f"attn_pool.{name}")
        eps.add(f.norm_eps(pool.norm, "attn_pool.norm", dim, seen["norm"]))
        f.dropout(getattr(pool, "proj_drop", None), "attn_pool.proj_drop")
        if getattr(pool, "mlp", None) is not None:
            # its own heads and MLP width (Perception Encoder's: 8 heads, ratio 4); the blocks' activation
            own = {"activation": seen["activation"], "mlp hidden size": set()}
            _timm_mlp(f, pool.mlp, "attn_pool.mlp", own)
            f.need(_is_identity(getattr(pool.mlp, "norm", None)), "attn_pool.mlp.norm (a norm inside its MLP)")
            seen["attn pool"] = {(heads, *own["mlp hidden size"])}
    f.uniform(seen)
    f.need(len(eps) == 1, f"norms with different eps ({eps})")
    return use_fc_norm, final_norm


def _timm_config(model: nn.Module, dim: int, seen: dict, eps: set, pre_norm: bool, use_fc_norm: bool,
                 final_norm: bool, **kw) -> dict:
    """vitfast's VisionTransformer kwargs for a checked timm model (`kw`: what its class holds differently)."""
    proj = model.patch_embed.proj
    hidden = seen["mlp hidden size"].pop() if seen["mlp hidden size"] else 4 * dim
    heads = seen["num_heads"].pop() if seen["num_heads"] else 1
    pool_heads, pool_hidden = next(iter(seen.get("attn pool", ())), (heads, hidden))
    return dict(img_size=model.patch_embed.img_size, patch_size=tuple(proj.kernel_size), in_chans=proj.in_channels,
                num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0, embed_dim=dim,
                depth=len(model.blocks), num_heads=heads,
                mlp_ratio=_mlp_ratio(hidden, dim), qkv_bias=seen["qkv bias"].pop() if seen["qkv bias"] else True,
                class_token=getattr(model, "cls_token", None) is not None,
                global_pool=getattr(model, "global_pool", "token"), fc_norm=use_fc_norm,
                dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
                act_layer=seen["activation"].pop() if seen["activation"] else "gelu", norm_eps=eps.pop(),
                init_values=1.0 if seen["layer-scale"] == {True} else None,     # the gammas come from the weights
                pre_norm=pre_norm, final_norm=final_norm,
                mlp_layer=seen["mlp layer"].pop() if seen["mlp layer"] else "mlp",
                scale_attn_norm=seen["attn norm"] == {True}, scale_mlp_norm=seen["mlp norm"] == {True},
                norm=seen["norm"].pop() if seen["norm"] else "layernorm", embed_norm=seen["embed norm"] == {True},
                proj_bias=seen["proj bias"] != {False},
                attn_pool_num_heads=None if pool_heads == heads else pool_heads,
                attn_pool_mlp_ratio=None if pool_hidden == hidden else _mlp_ratio(pool_hidden, dim), **kw)


def _keep_pretrained_cfg(model: nn.Module, out: nn.Module) -> None:
    for attr in ("pretrained_cfg", "default_cfg"):
        if hasattr(model, attr):
            setattr(out, attr, getattr(model, attr))


def _timm_mlp(f: _Findings, mlp: nn.Module, where: str, seen: dict) -> None:
    """Check one timm Mlp (a block's or the attention pool's); its activation and width go to `seen`."""
    act = _activation(getattr(mlp, "act", None))
    f.need(act is not None, f"{where}.act: {type(getattr(mlp, 'act', None)).__name__} (only GELU, exact or tanh, "
                            "and QuickGELU)")
    _mlp_linears(f, (mlp.fc1, mlp.fc2), where, ("fc1", "fc2"), seen)
    f.dropout(getattr(mlp, "drop1", None), f"{where}.drop1")
    f.dropout(getattr(mlp, "drop2", None), f"{where}.drop2")
    seen["activation"].add(act)
    seen["mlp hidden size"].add(getattr(mlp.fc1, "out_features", None))


def _mlp_linears(f: _Findings, linears, where: str, names, seen: dict) -> bool:
    """Check an MLP's linears: with biases, or (a block's, where `seen` counts "proj bias": timm's proj_bias=False)
    all without."""
    blocks = "proj bias" in seen
    ok = all([f.linear(m, f"{where}.{n}", bias=not blocks) for m, n in zip(linears, names)])
    if ok and blocks:
        biased = {m.bias is not None for m in linears}
        f.need(len(biased) == 1, f"{where}: " + ", ".join(f"{n} {'with' if m.bias is not None else 'without'} bias"
                                                          for m, n in zip(linears, names)))
        seen["proj bias"] |= biased
    return ok


def _timm_swiglu(f: _Findings, mlp: nn.Module, where: str, seen: dict) -> None:
    """Check one timm GluMlp: SwiGLUPacked's (SiLU of the first half times the second, no norm inside); its
    width (fc1's, both halves) goes to `seen`, its activation does not (act_layer is the other MLPs')."""
    f.need(type(getattr(mlp, "act", None)).__name__ == "SiLU",
           f"{where}.act: {type(getattr(mlp, 'act', None)).__name__} (a GluMlp only with SiLU: SwiGLUPacked)")
    f.need(getattr(mlp, "gate_last", None) is False and getattr(mlp, "chunk_dim", None) in (-1, 2),
           f"{where}: gate_last={getattr(mlp, 'gate_last', None)}, chunk_dim={getattr(mlp, 'chunk_dim', None)} "
           "(only the gate on the first half along the features, SwiGLUPacked's)")
    _mlp_linears(f, (mlp.fc1, mlp.fc2), where, ("fc1", "fc2"), seen)
    hidden = getattr(mlp.fc1, "out_features", 0)
    f.need(hidden % 2 == 0 and getattr(mlp.fc2, "in_features", None) == hidden // 2,
           f"{where}: fc1 width {hidden} and fc2 input {getattr(mlp.fc2, 'in_features', None)} (expected an even "
           "width and half of it)")
    f.dropout(getattr(mlp, "drop1", None), f"{where}.drop1")
    f.dropout(getattr(mlp, "drop2", None), f"{where}.drop2")
    seen["mlp hidden size"].add(hidden)


def _timm_swiglu_parts(f: _Findings, mlp: nn.Module, where: str, seen: dict) -> None:
    """Check one timm SwiGLU (the gate and up projections as fc1_g and fc1_x: silu(fc1_g(x)) · fc1_x(x), no norm
    inside); the width of the two joined goes to `seen`."""
    f.need(type(getattr(mlp, "act", None)).__name__ == "SiLU",
           f"{where}.act: {type(getattr(mlp, 'act', None)).__name__} (a SwiGLU only with SiLU)")
    g, x = getattr(mlp, "fc1_g", None), getattr(mlp, "fc1_x", None)
    ok = _mlp_linears(f, (g, x, mlp.fc2), where, ("fc1_g", "fc1_x", "fc2"), seen)
    hidden = getattr(g, "out_features", 0)
    f.need(ok and x.out_features == hidden and g.in_features == x.in_features
           and getattr(mlp.fc2, "in_features", None) == hidden,
           f"{where}: fc1_g, fc1_x and fc2 shapes (expected two equal projections and fc2 from their width)")
    f.dropout(getattr(mlp, "drop1", None), f"{where}.drop1")
    f.dropout(getattr(mlp, "drop2", None), f"{where}.drop2")
    seen["mlp hidden size"].add(2 * hidden)


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------
def _from_torchvision(model: nn.Module) -> VisionTransformer:
    f = _Findings(f"torchvision {type(model).__name__}")
    f.patchify(model.conv_proj, "conv_proj")
    heads = model.heads
    f.need(getattr(model, "representation_size", None) is None and not hasattr(heads, "pre_logits"),
           "representation_size (pre-logits layer)")
    head = getattr(heads, "head", None)
    f.linear(head, "heads.head")
    dim = model.class_token.shape[-1]
    eps = {f.layer_norm_eps(model.encoder.ln, "encoder.ln", dim)}
    f.dropout(getattr(model.encoder, "dropout", None), "encoder.dropout")
    seen = {"num_heads": set(), "mlp hidden size": set(), "activation": set()}
    for i, blk in enumerate(model.encoder.layers):
        w = f"encoder.layers.{i}"
        mha, mlp = blk.self_attention, blk.mlp
        eps |= {f.layer_norm_eps(blk.ln_1, f"{w}.ln_1", dim), f.layer_norm_eps(blk.ln_2, f"{w}.ln_2", dim)}
        f.dropout(getattr(blk, "dropout", None), f"{w}.dropout")
        if f.need(isinstance(mha, nn.MultiheadAttention), f"{w}.self_attention: {type(mha).__name__}"):
            f.need(mha.batch_first and mha._qkv_same_embed_dim and mha.in_proj_bias is not None
                   and mha.bias_k is None and not mha.add_zero_attn and mha.out_proj.bias is not None,
                   f"{w}.self_attention: MultiheadAttention options (needs batch_first, bias, no add_bias_kv / "
                   "add_zero_attn)")
            f.dropout(mha.dropout, f"{w}.self_attention.dropout")
            seen["num_heads"].add(mha.num_heads)
        ok = isinstance(mlp, nn.Sequential) and len(mlp) == 5
        if f.need(ok, f"{w}.mlp: {type(mlp).__name__} (expected Linear, GELU, Dropout, Linear, Dropout)"):
            act = _activation(mlp[1])
            f.need(act is not None, f"{w}.mlp.1: {type(mlp[1]).__name__} (only GELU)")
            f.linear(mlp[0], f"{w}.mlp.0")
            f.linear(mlp[3], f"{w}.mlp.3")
            f.dropout(mlp[2], f"{w}.mlp.2")
            f.dropout(mlp[4], f"{w}.mlp.4")
            seen["activation"].add(act)
            seen["mlp hidden size"].add(getattr(mlp[0], "out_features", None))
    f.uniform(seen)
    f.need(len(eps) == 1, f"norms with different eps ({eps})")
    f.check(model.training)

    hidden = seen["mlp hidden size"].pop() if seen["mlp hidden size"] else 4 * dim
    cfg = dict(img_size=model.image_size, patch_size=tuple(model.conv_proj.kernel_size),
               in_chans=model.conv_proj.in_channels, num_classes=head.out_features, embed_dim=dim,
               depth=len(model.encoder.layers), num_heads=seen["num_heads"].pop() if seen["num_heads"] else 1,
               mlp_ratio=_mlp_ratio(hidden, dim), qkv_bias=True, class_token=True, global_pool="token",
               act_layer=seen["activation"].pop() if seen["activation"] else "gelu", norm_eps=eps.pop())
    return _build(cfg, torchvision_to_timm(model.state_dict(keep_vars=True)), model, f)
