"""vitfast against the ViTs people use: Hugging Face on the CPU (fp32 vs HF in float64, bounded by
HF's own fp32 error); timm and torchvision on a GPU (they need a CUDA build of torch). Covers
`vitfast.optimize`, HF checkpoints loaded into `vitfast.VisionTransformer`, shared weights,
training through the converted model, and the features that must be refused by name."""

import copy

import pytest
import torch
from torch import nn

import vitfast
from vitfast import reference
from vitfast.checkpoint import load_checkpoint
from vitfast.convert import UnsupportedFeatureError
from vitfast.testing import MODEL_TOLERANCE, assert_close

transformers = pytest.importorskip("transformers")

F64 = torch.float64

# The configs the issue asks for (token counts 17, 5, 7); HF layer_norm_eps stays at its default 1e-12.
HF_CASES = {
    "patch8": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    "head_dim_80": dict(img_size=32, patch_size=16, embed_dim=160, depth=2, num_heads=2),
    "non_square": dict(img_size=(48, 32), patch_size=16, embed_dim=96, depth=2, num_heads=3),
}


def hf_vit(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=10,
           cls="ViTForImageClassification", model_kw=None, **config_kw):
    """A random fp32 HF ViT (every weight perturbed, so none sits at its 0/1 init) in eval mode."""
    cfg = transformers.ViTConfig(image_size=img_size, patch_size=patch_size, hidden_size=embed_dim,
                                 num_hidden_layers=depth, num_attention_heads=num_heads,
                                 intermediate_size=4 * embed_dim, num_labels=num_classes, **config_kw)
    model = getattr(transformers, cls)(cfg, **(model_kw or {})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_images(model, batch=2, size=None):
    H, W = size or reference.to_2tuple(model.config.image_size)
    return torch.randn(batch, 3, H, W)


# --------------------------------------------------------------------------------------------
# Hugging Face (CPU)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_vitfast_vit_with_hf_weights_equals_hf(case):
    kw = HF_CASES[case]
    hf = hf_vit(**kw)
    hf64 = copy.deepcopy(hf).double()
    model = vitfast.VisionTransformer(**kw, num_classes=10, norm_eps=hf.config.layer_norm_eps).eval()
    load_checkpoint(model, hf.state_dict())
    x = hf_images(hf)
    with torch.no_grad():
        assert_close(model(x), hf64(pixel_values=x.double()).logits, eager=hf(pixel_values=x).logits)


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_optimize_hf_classifier_equals_hf(case):
    hf = hf_vit(**HF_CASES[case])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x, labels = hf_images(hf), torch.tensor([3, 7])
    with torch.no_grad():
        out, ref, eager = (m(pixel_values=xi, labels=labels, output_hidden_states=True)
                           for m, xi in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(eager)
        assert_close(out.logits, ref.logits, eager=eager.logits)
        assert_close(out.loss, ref.loss, eager=eager.loss, name="loss")
        assert len(out.hidden_states) == len(ref.hidden_states) == HF_CASES[case]["depth"] + 1
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")
        assert out.attentions is None
        as_tuple = opt(x, return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and torch.equal(as_tuple[0], out.logits)


def test_optimize_hf_vit_model_with_pooler():
    hf = hf_vit(embed_dim=48, num_heads=3, cls="ViTModel", model_kw=dict(add_pooling_layer=True))
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = hf_images(hf)
    with torch.no_grad():
        out, ref, eager = opt(x), hf64(x.double()), hf(x)
        assert type(out).__name__ == "BaseModelOutputWithPooling"
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        assert_close(out.pooler_output, ref.pooler_output, eager=eager.pooler_output, name="pooler_output")
        assert len(opt(x, return_dict=False)) == 2


def test_optimize_hf_interpolate_pos_encoding():
    """HF resamples without antialias (unlike timm): the converted model follows HF's rule."""
    hf = hf_vit(patch_size=8)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = hf_images(hf, size=(48, 40))
    with torch.no_grad():
        out = opt(x, interpolate_pos_encoding=True).logits
        assert_close(out, hf64(x.double(), interpolate_pos_encoding=True).logits,
                     eager=hf(x, interpolate_pos_encoding=True).logits)
    with pytest.raises(ValueError, match="built for 32x32 images, got 48x40"):
        opt(x)


def test_optimize_hf_shares_weights_and_keeps_dtype_mode_and_grads_flags():
    hf = hf_vit(depth=2).half()
    hf.vit.layers[0].mlp.fc1.weight.requires_grad_(False)
    opt = vitfast.optimize(hf)
    core, layer = opt.vit.core, hf.vit.layers[0]
    assert not opt.training and not core.training
    assert core.blocks[0].attn.proj.weight is layer.attention.o_proj.weight
    assert core.blocks[0].mlp.fc1.weight is layer.mlp.fc1.weight and not core.blocks[0].mlp.fc1.weight.requires_grad
    assert core.pos_embed is hf.vit.embeddings.position_embeddings and opt.classifier is hf.classifier
    qkv = torch.cat([layer.attention.q_proj.weight, layer.attention.k_proj.weight, layer.attention.v_proj.weight])
    assert torch.equal(core.blocks[0].attn.qkv.weight, qkv)               # HF's q/k/v rows, in order
    assert {p.dtype for p in opt.parameters()} == {torch.float16}
    # No copies: the converted model's parameters are HF's own tensors (an optimizer over either trains both).
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    hf.train()
    assert vitfast.optimize(hf).training


def test_training_through_optimized_hf_matches_hf_gradients():
    """Every HF parameter, q / k / v included (the packed qkv is built from them), gets HF's float64 gradient;
    an optimizer step over the converted model changes HF's own tensors, and eval after it uses the new
    values (the cached packed qkv is rebuilt)."""
    hf = hf_vit(embed_dim=48, depth=2, num_heads=3).train()          # dropout probabilities are 0
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x, labels = hf_images(hf), torch.tensor([1, 4])
    with torch.no_grad():
        opt.eval()(x)                                                  # fills the eval cache of the packed qkv
    opt.train()(x, labels=labels).loss.backward()
    hf64(x.double(), labels=labels).loss.backward()
    eager = copy.deepcopy(hf)
    eager.zero_grad()
    eager(x, labels=labels).loss.backward()
    ours, theirs, ref = dict(hf.named_parameters()), dict(eager.named_parameters()), dict(hf64.named_parameters())
    for name, p in ref.items():
        if name.endswith("k_proj.bias"):          # its true gradient is 0 (softmax ignores a per-query shift):
            continue                              # checked with q's and v's below, relative to their size
        assert_close(ours[name].grad, p.grad, eager=theirs[name].grad, name=f"grad {name}")
    for i in range(2):
        cat = lambda params, i=i: torch.cat([params[f"vit.layers.{i}.attention.{x}_proj.bias"].grad for x in "qkv"])
        assert_close(cat(ours), cat(ref), eager=cat(theirs), name=f"grad layer {i} q/k/v biases")
    torch.optim.SGD(opt.parameters(), lr=0.5).step()
    torch.optim.SGD(hf64.parameters(), lr=0.5).step()
    with torch.no_grad():
        assert_close(opt.eval()(x).logits, hf64.eval()(x.double()).logits, eager=hf.eval()(x).logits,
                     name="logits after a step")


def test_hf_unsupported_features_are_named():
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(hf_vit(hidden_act="relu"))
    msn = transformers.ViTMSNForImageClassification(transformers.ViTMSNConfig(
        image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(UnsupportedFeatureError, match=r"Hugging Face ViTMSNForImageClassification holding "
                                                      r"ViTMSNModel \(vit\) is not supported"):
        vitfast.optimize(msn)
    dropout = hf_vit(hidden_dropout_prob=0.1)
    with pytest.raises(UnsupportedFeatureError, match=r"train mode with dropout p=0.1 \(hidden_dropout_prob\)"):
        vitfast.optimize(copy.deepcopy(dropout).train())
    opt = vitfast.optimize(dropout)              # eval: dropout is inactive, conversion is exact
    x = hf_images(dropout)
    opt.train()
    with pytest.raises(ValueError, match=r"does not implement dropout p=0.1 \(hidden_dropout_prob\)"):
        opt(x)
    opt.eval()
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="attention_mask"):
        opt(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(UnsupportedFeatureError, match="some_flag"):
        opt(x, some_flag=True)
    unmasked = vitfast.optimize(hf_vit(cls="ViTModel"))             # no mask token (use_mask_token=False)
    with pytest.raises(UnsupportedFeatureError, match="bool_masked_pos"):
        unmasked(x, bool_masked_pos=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pixel_values: expected a tensor"):
        opt()
    with pytest.raises(ValueError, match="expected a timm VisionTransformer.*got torch.nn.modules.linear.Linear"):
        vitfast.optimize(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------
# timm's module tree, exercised on the CPU through vitfast.reference (which has timm's names)
# --------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):            # timm.layers.SwiGLU's shape (gate and up as two linears: not the packed one)
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.fc1_g, self.fc1_x, self.act, self.fc2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.SiLU(), \
            nn.Linear(hidden, dim)


class LayerScale(nn.Module):        # timm.layers.LayerScale's shape
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))


def timm_like(**kw):
    return reference.VisionTransformer(**{**dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                                 num_classes=5), **kw}).eval()


def test_optimize_timm_tree_shares_parameters_and_matches():
    src = timm_like(global_pool="avg")
    src64 = copy.deepcopy(src).double()
    opt = vitfast.optimize(src)
    assert isinstance(opt, vitfast.VisionTransformer) and opt.global_pool == "avg"
    assert all(a is b for a, b in zip(opt.parameters(), src.parameters()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(opt(x), src64(x.double()), eager=src(x))
    assert vitfast.optimize(opt) is opt


@pytest.mark.parametrize("kw", [dict(scale_attn_norm=True, scale_mlp_norm=True),
                                dict(mlp_layer="swiglu", mlp_ratio=3.0, scale_mlp_norm=True)], ids=["mlp", "swiglu"])
def test_optimize_timm_tree_with_inner_norms(kw):
    """timm's scale_attn_norm / scale_mlp_norm (EVA-02's and EVA-CLIP's LayerNorms inside the attention and the
    MLP) convert with their own tensors; blocks that differ in them, and such a norm of another width or eps, are
    named."""
    src = timm_like(**kw)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    opt = vitfast.optimize(src)
    assert all(a is b for a, b in zip(opt.parameters(), src.parameters()))
    assert not isinstance(opt.blocks[1].mlp.norm, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(opt(x), copy.deepcopy(src).double()(x.double()), eager=src(x))
    for mutate, feature in ((lambda m: setattr(m.blocks[1].mlp, "norm", nn.Identity()), "blocks differ in mlp norm"),
                            (lambda m: setattr(m.blocks[0].mlp.norm, "eps", 1e-3), "norms with different eps"),
                            (lambda m: setattr(m.blocks[0].mlp, "norm", nn.LayerNorm(7)),
                             r"blocks.0.mlp.norm: LayerNorm \(only LayerNorm")):
        bad = copy.deepcopy(src)
        mutate(bad)
        with pytest.raises(UnsupportedFeatureError, match=feature):
            vitfast.optimize(bad)


@pytest.mark.parametrize("feature, mutate", [
    ("blocks differ in layer-scale", lambda m: setattr(m.blocks[1], "ls1", LayerScale(32))),
    ("qk-norm", lambda m: setattr(m.blocks[0].attn, "q_norm", nn.LayerNorm(16))),
    ("no position embedding", lambda m: setattr(m, "pos_embed", None)),
    (r"global_pool='avgmax'", lambda m: setattr(m, "global_pool", "avgmax")),
    (r"attn_pool: NoneType \(only timm's AttentionPoolLatent\)", lambda m: setattr(m, "global_pool", "map")),
    (r"patch_embed.proj without bias \(without pre_norm\)", lambda m: setattr(m.patch_embed.proj, "bias", None)),
    (r"blocks.0.mlp.act: ReLU \(only GELU", lambda m: setattr(m.blocks[0].mlp, "act", nn.ReLU())),
    (r"blocks.1.norm2: RMSNorm \(an RMSNorm only with a weight of 32 and an eps\)",
     lambda m: setattr(m.blocks[1], "norm2", nn.RMSNorm(32))),
    (r"blocks differ in norm \(\['layernorm', 'rmsnorm'\]\)",
     lambda m: setattr(m.blocks[1], "norm2", nn.RMSNorm(32, eps=1e-6))),
    (r"blocks.0.mlp: fc1 without bias, fc2 with bias", lambda m: setattr(m.blocks[0].mlp.fc1, "bias", None)),
    (r"blocks differ in proj bias", lambda m: setattr(m.blocks[1].attn.proj, "bias", None)),
    ("norms with different eps", lambda m: setattr(m.blocks[1].norm1, "eps", 1e-5)),
    (r"blocks.0.mlp: Sequential \(only timm's Mlp", lambda m: setattr(m.blocks[0], "mlp", nn.Sequential())),
])
def test_timm_unsupported_features_are_named(feature, mutate):
    model = timm_like()
    mutate(model)
    with pytest.raises(UnsupportedFeatureError, match=feature):
        vitfast.optimize(model)


@pytest.mark.parametrize("feature, mutate", [
    (r"blocks.1.mlp: gate_last=True", lambda m: setattr(m.blocks[1].mlp, "gate_last", True)),
    (r"blocks.0.mlp.act: GELU \(a GluMlp only with SiLU", lambda m: setattr(m.blocks[0].mlp, "act", nn.GELU())),
    ("blocks differ in mlp layer", lambda m: setattr(m.blocks[1], "mlp", reference.Mlp(32, 128))),
])
def test_timm_swiglu_variants_vitfast_lacks_are_named(feature, mutate):
    """timm's packed SwiGLU converts (test_optimize_timm_families); its other settings are refused by name."""
    model = timm_like(mlp_layer="swiglu")
    mutate(model)
    with pytest.raises(UnsupportedFeatureError, match=feature):
        vitfast.optimize(model)


# timm's kwargs of DINOv2, DINOv2 with registers, CLIP, SigLIP and DeiT distilled, on the reference ViT
# (timm's module tree and class names), converted and compared on the CPU.
TIMM_FAMILIES = {
    "dinov2_reg4": dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2, init_values=0.5,
                        reg_tokens=4, no_embed_class=True, num_classes=0),
    "clip_quickgelu": dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, pre_norm=True,
                           norm_eps=1e-5, act_layer="quick_gelu", num_classes=5),
    "siglip_map": dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, class_token=False,
                       global_pool="map", num_classes=0),
    "deit_distilled": dict(img_size=32, patch_size=16, embed_dim=48, depth=1, num_heads=2, num_classes=4),
    "dinov2_giant_swiglu": dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2, init_values=0.5,
                                mlp_ratio=2.66667 * 2, mlp_layer="swiglu", num_classes=0),
    # timm's pool_include_prefix: the pooling over the class and register tokens too
    "map_include_prefix": dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, reg_tokens=2,
                               global_pool="map", pool_include_prefix=True, num_classes=3),
    "avg_include_prefix": dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3,
                               global_pool="avg", pool_include_prefix=True, num_classes=3),
    # AIMv2's: RMSNorms (the patch tokens' too, before the position table), the unpacked SwiGLU and proj without
    # biases, no class token, the mean of the tokens
    "aimv2": dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, class_token=False, global_pool="avg",
                  fc_norm=False, qkv_bias=False, proj_bias=False, mlp_layer="swiglu", mlp_ratio=2.75, norm="rmsnorm",
                  embed_norm=True, norm_eps=1e-5, num_classes=3),
    # an RMSNorm model with a class token, an attention-pooling head and biases
    "rmsnorm_map": dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, global_pool="map",
                        norm="rmsnorm", pre_norm=True, num_classes=0),
}


@pytest.mark.parametrize("case", sorted(TIMM_FAMILIES))
def test_optimize_timm_families(case):
    cls = reference.VisionTransformerDistilled if case == "deit_distilled" else reference.VisionTransformer
    src = cls(**TIMM_FAMILIES[case]).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src64 = copy.deepcopy(src).double()
    opt = vitfast.optimize(src)
    assert type(opt).__name__ == cls.__name__ and all(a is b for a, b in zip(opt.parameters(), src.parameters()))
    x = torch.randn(2, 3, *reference.to_2tuple(TIMM_FAMILIES[case]["img_size"]))
    with torch.no_grad():
        assert_close(opt(x), src64(x.double()), eager=src(x))
        assert_close(opt.forward_head(opt.forward_features(x), pre_logits=True),
                     src64.forward_head(src64.forward_features(x.double()), pre_logits=True),
                     eager=src.forward_head(src.forward_features(x), pre_logits=True), name="pre_logits")


def test_timm_drop_path_only_refused_in_train_mode():
    model = timm_like()
    model.blocks[0].drop_path1 = nn.Dropout(0.2)          # anything with a rate, as timm's DropPath
    with pytest.raises(UnsupportedFeatureError, match=r"drop-path p=0.2 \(blocks.0.drop_path1\)"):
        vitfast.optimize(copy.deepcopy(model).train())
    opt = vitfast.optimize(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(opt(x), copy.deepcopy(model).double()(x.double()), eager=model(x))
    with pytest.raises(ValueError, match="does not implement drop-path"):
        opt.train()(x)


def test_timm_unpacked_swiglu_joins_its_halves():
    """timm's SwiGLU (the gate and up projections as fc1_g and fc1_x) runs as the packed SwiGLU, its fc1 joined
    from the two (`JoinedLinear`): the converted model holds timm's tensors and equals the packed reference."""
    ref = timm_like(mlp_layer="swiglu", mlp_ratio=3.0)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    src = copy.deepcopy(ref)
    for blk in src.blocks:
        glu, (g, x), (bg, bx) = SwiGLU(32, 48), blk.mlp.fc1.weight.chunk(2), blk.mlp.fc1.bias.chunk(2)
        with torch.no_grad():
            for lin, w, b in ((glu.fc1_g, g, bg), (glu.fc1_x, x, bx)):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
        glu.fc2 = blk.mlp.fc2
        blk.mlp = glu
    opt = vitfast.optimize(src)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in src.parameters()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(opt(x), copy.deepcopy(ref).double()(x.double()), eager=ref(x))


# --------------------------------------------------------------------------------------------
# timm and torchvision themselves (GPU machines, where CUDA torch builds of them are installed)
# --------------------------------------------------------------------------------------------
def _perturb(model):
    with torch.no_grad():       # timm / torchvision zero some biases and heads at init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [
    dict(),
    dict(global_pool="avg", class_token=False),
    dict(dynamic_img_size=True),
    dict(act_layer="gelu_tanh", qkv_bias=False),
], ids=["token", "avg", "dynamic", "tanh_no_qkv_bias"])
def test_optimize_timm_equals_timm(kw, no_tf32):
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    src = _perturb(TimmViT(img_size=64, patch_size=16, embed_dim=160, depth=2, num_heads=2, num_classes=10, **kw))
    src = src.cuda().eval()
    src64 = copy.deepcopy(src).double()
    opt = vitfast.optimize(src)
    # the timm state_dict also loads strictly into a vitfast model built with the same kwargs
    built = vitfast.VisionTransformer(img_size=64, patch_size=16, embed_dim=160, depth=2, num_heads=2,
                                      num_classes=10, **kw).cuda().eval()
    built.load_state_dict(src.state_dict(), strict=True)
    size = (96, 80) if kw.get("dynamic_img_size") else (64, 64)
    x = torch.randn(2, 3, *size, device="cuda")
    with torch.no_grad():
        ref, eager = src64(x.double()), src(x)
        assert_close(opt(x), ref, eager=eager)
        assert_close(built(x), ref, eager=eager)
        assert_close(opt.forward_features(x), src64.forward_features(x.double()), eager=src.forward_features(x))


def _assert_low_precision_within_2x(src, dtype):
    """optimize(src) in `dtype` vs src's fp32 output: error <= 2x src's own error in that dtype."""
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref32 = src(x)
        low = src.to(dtype)
        eager = low(x.to(dtype))
        out = vitfast.optimize(low)(x.to(dtype))
    assert out.dtype == dtype
    assert_close(out, ref32, dtype=dtype, eager=eager, tol=MODEL_TOLERANCE[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_base_patch8_224"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_optimize_timm_base_low_precision_within_2x_timm(name, dtype, no_tf32):
    """vitfast in fp16/bf16 vs timm's fp32 output: error <= 2x timm's own error in that dtype."""
    timm = pytest.importorskip("timm")
    _assert_low_precision_within_2x(_perturb(timm.create_model(name, pretrained=False)).cuda().eval(), dtype)


def test_optimize_real_timm_vit_with_inner_norms():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    src = _perturb(TimmViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=4,
                           scale_attn_norm=True, scale_mlp_norm=True)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(vitfast.optimize(copy.deepcopy(src))(x), src(x))


@pytest.mark.parametrize("kw", [dict(global_pool="map", reg_tokens=2), dict(global_pool="avg")], ids=["map", "avg"])
def test_optimize_real_timm_vit_pooling_with_prefix_tokens(kw):
    """timm's pool_include_prefix=True: the attention pooling and the mean over the class and register tokens
    too (timm's test_vit3 has it)."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    src = _perturb(TimmViT(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=4,
                           pool_include_prefix=True, **kw)).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_close(vitfast.optimize(copy.deepcopy(src))(x), src(x))


def test_optimize_real_timm_aimv2():
    """timm's AIMv2 (RmsNorm everywhere, the patch tokens' too, SwiGLU and proj without biases) in float64."""
    timm = pytest.importorskip("timm")
    src = _perturb(timm.create_model("aimv2_large_patch14_224", pretrained=False, depth=2, embed_dim=64, num_heads=2,
                                     img_size=28, num_classes=3)).double().eval()
    opt = vitfast.optimize(copy.deepcopy(src))
    assert opt.blocks[0].attn.proj.bias is None and opt.patch_embed.norm.weight.shape == (64,)
    x = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        assert_close(opt(x), src(x))
        assert_close(opt.forward_features(x), src.forward_features(x), name="features")


@pytest.mark.gpu
def test_timm_unsupported_features_are_named_on_real_timm():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer as TimmViT
    base = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    for kw, feature in ((dict(qk_norm=True), "qk-norm"), (dict(global_pool="avgmax"), "global_pool='avgmax'")):
        with pytest.raises(UnsupportedFeatureError, match=feature):
            vitfast.optimize(TimmViT(**base, **kw).eval())
    with pytest.raises(UnsupportedFeatureError, match=r"train mode with dropout p=0.1 \(blocks.0.attn.attn_drop\)"):
        vitfast.optimize(TimmViT(**base, attn_drop_rate=0.1).train())


# One timm name per family, at 2 blocks (and a narrower width for the wide ones): fp32 against timm in
# float64, bf16 within 2x timm's own bf16 error.
TIMM_FAMILY_NAMES = {"vit_base_patch14_reg4_dinov2": {}, "vit_base_patch16_clip_quickgelu_224": {},
                     "vit_so400m_patch14_siglip_384": dict(embed_dim=288, num_heads=4),
                     "deit_small_distilled_patch16_224": {},
                     # timm's SwiGLUPacked MLP (GluMlp): fc1 384 -> 2048, fc2 1024 -> 384
                     "vit_giant_patch14_dinov2": dict(embed_dim=384, num_heads=6, img_size=224)}


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TIMM_FAMILY_NAMES))
def test_optimize_timm_families_equal_timm(name, no_tf32):
    timm = pytest.importorskip("timm")
    src = _perturb(timm.create_model(name, pretrained=False, depth=2, **TIMM_FAMILY_NAMES[name])).cuda().eval()
    src64 = copy.deepcopy(src).double()
    opt = vitfast.optimize(src)
    assert type(opt).__name__ == type(src).__name__
    x = torch.randn(2, 3, *src.patch_embed.img_size, device="cuda")
    with torch.no_grad():
        ref, eager = src64(x.double()), src(x)
        assert_close(opt(x), ref, eager=eager)
        feats = opt.forward_head(opt.forward_features(x), pre_logits=True)
        assert_close(feats, src64.forward_head(src64.forward_features(x.double()), pre_logits=True),
                     eager=src.forward_head(src.forward_features(x), pre_logits=True), name="pre_logits")
        low = copy.deepcopy(src).to(torch.bfloat16)
        out = vitfast.optimize(low)(x.to(torch.bfloat16))
        assert_close(out, ref, dtype=torch.bfloat16, eager=low(x.to(torch.bfloat16)), name="bf16")


@pytest.mark.gpu
def test_optimize_torchvision_equals_torchvision(tmp_path, no_tf32):
    tv_models = pytest.importorskip("torchvision.models")
    src = _perturb(tv_models.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                                               hidden_dim=160, mlp_dim=640, num_classes=10)).cuda().eval()
    src64 = copy.deepcopy(src).double()
    opt = vitfast.optimize(src)
    assert opt.blocks[0].attn.qkv.weight is src.encoder.layers.encoder_layer_0.self_attention.in_proj_weight
    torch.save(src.state_dict(), tmp_path / "tv.pth")
    loaded = vitfast.create_model("vit_base_patch16_224", img_size=64, embed_dim=160, depth=2, num_heads=2,
                                  num_classes=10, checkpoint_path=tmp_path / "tv.pth").cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        ref, eager = src64(x.double()), src(x)
        assert_close(opt(x), ref, eager=eager)
        assert_close(loaded(x), ref, eager=eager)
    with pytest.raises(UnsupportedFeatureError, match="representation_size"):
        vitfast.optimize(tv_models.VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, representation_size=16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_optimize_torchvision_vit_b_16_low_precision_within_2x(dtype, no_tf32):
    tv_models = pytest.importorskip("torchvision.models")
    _assert_low_precision_within_2x(_perturb(tv_models.vit_b_16()).cuda().eval(), dtype)
