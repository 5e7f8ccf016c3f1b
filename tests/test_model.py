"""vitfast.VisionTransformer vs the float64 reference ViT: state_dict interchange, pooling variants,
CLS attention maps, resampled position tables and their cache, uint8 input, gradients,
torch.compile, bad inputs, the model zoo; CUDA-graph capture on a GPU."""

import pytest
import torch

import vitfast
from vitfast import layers, reference
from vitfast.configs import CONFIGS
from vitfast.data import data_config
from vitfast.testing import assert_close, rel_err

F64 = torch.float64

# Small models (Triton's interpreter runs every op on the CPU): token counts 17, 5, 7, 2.
CASES = {
    "token_patch8": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10),
    "avg": dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, num_classes=7, global_pool="avg"),
    "avg_no_class_token": dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                               global_pool="avg", class_token=False),
    "tanh_gelu_eps_ratio": dict(img_size=(48, 32), patch_size=16, embed_dim=48, depth=1, num_heads=2, num_classes=4,
                                act_layer="gelu_tanh", norm_eps=1e-12, mlp_ratio=2.5),
    "features_only": dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                          global_pool=""),
    # EVA-02's LayerNorms inside the attention (before proj) and the MLP (before fc2), with either MLP
    "inner_norms": dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                        scale_attn_norm=True, scale_mlp_norm=True),
    "inner_norms_swiglu": dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                               mlp_layer="swiglu", mlp_ratio=3, scale_mlp_norm=True, norm_eps=1e-5),
    # AIMv2's RMSNorms (on the patch tokens too, before the position table) and linears without bias, with a class
    # token and registers here (the table added after the norm, then the prefix tokens in front)
    "rmsnorm_embed_norm_no_proj_bias": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                            num_classes=3, norm="rmsnorm", embed_norm=True, proj_bias=False,
                                            qkv_bias=False, reg_tokens=2, mlp_layer="swiglu", mlp_ratio=2.75),
    # the attention pooling over the prefix tokens too, with its own head count and MLP ratio (Perception Encoder's)
    "map_pool_own_heads": dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                               global_pool="map", attn_pool_num_heads=8, attn_pool_mlp_ratio=2.0,
                               pool_include_prefix=True),
}


def pair(**kw):
    """A random vitfast model (fp32) and the reference with the same weights in fp32 and fp64."""
    model = vitfast.VisionTransformer(**kw).eval()
    with torch.no_grad():   # init leaves biases 0 and norms 1: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = reference.VisionTransformer(**kw).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    ref64 = reference.VisionTransformer(**kw).double().eval()
    ref64.load_state_dict(model.state_dict(), strict=True)
    return model, ref, ref64


def images(kw, batch=2, size=None):
    H, W = size or reference.to_2tuple(kw["img_size"])
    return torch.randn(batch, 3, H, W)


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_reference_and_state_dicts_interchange(case):
    kw = CASES[case]
    model, ref, ref64 = pair(**kw)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    x = images(kw)
    with torch.no_grad():
        out = model(x)
        assert_close(out, ref64(x.double()), eager=ref(x))
        assert_close(model.forward_features(x), ref64.forward_features(x.double()), eager=ref.forward_features(x))
        # and back: the reference's state_dict reproduces the model exactly
        again = vitfast.VisionTransformer(**kw).eval()
        assert rel_err(again(x), out) > 1e-3
        again.load_state_dict(ref.state_dict(), strict=True)
        assert torch.equal(again(x), out)



def test_cpu_path_follows_training_and_loaded_weights(monkeypatch):
    """CPU tensors without the interpreter (torch's CPU kernels, oneDNN GEMMs on weights packed once): the
    model equals the float64 reference in eval, and after an optimizer step in train mode and after
    load_state_dict its eval output follows the new weights (no stale packed copy)."""
    from vitfast import ops

    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "_PACKED", ops.WeakIdKeyDictionary())
    monkeypatch.setattr(ops, "_LINEAR_CPU_PATHS", {})
    monkeypatch.setattr(ops, "_cpu_fastest", lambda fns, args: len(fns) - 1)        # oneDNN wherever it can run
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    model, ref, ref64 = pair(**kw)
    x = images(kw)

    def check(name):
        ref64.load_state_dict(model.state_dict(), strict=True)
        with torch.inference_mode():
            assert_close(model.eval()(x), ref64(x.double()), name=name)

    check("eval")
    assert len(ops._PACKED) == 4 * kw["depth"]      # every block linear (the head reads a strided class-token view)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).square().mean().backward()
    opt.step()
    check("after an optimizer step")
    model.load_state_dict(reference.VisionTransformer(**kw).state_dict())
    check("after load_state_dict")


def test_forward_head_pre_logits_and_pool():
    kw = CASES["avg"]
    model, ref, ref64 = pair(**kw)
    x = images(kw)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
        t64 = ref64.forward_features(x.double())
        assert_close(pooled, ref64.forward_head(t64, pre_logits=True))
        assert_close(model.forward_head(tokens), ref64.forward_head(t64))


def test_return_cls_attn_matches_reference_softmax_rows():
    kw = CASES["token_patch8"]
    model, _, ref64 = pair(**kw)
    x = images(kw)
    with torch.no_grad():
        logits, attns = model(x, return_cls_attn=True)
        assert torch.equal(logits, model(x))
        # ground truth: each reference block's softmax row of query 0, in float64
        pe = ref64.patch_embed
        t = reference.patch_embed(x.double(), pe.proj.weight, pe.proj.bias, ref64.cls_token, ref64.pos_embed)
        expected = []
        for blk in ref64.blocks:
            q, k, _ = reference.split_qkv(blk.attn.qkv(blk.norm1(t)), blk.attn.num_heads)
            expected.append(reference.attention_probs(q, k, blk.attn.scale)[:, :, 0])
            t = blk(t)
    assert len(attns) == kw["depth"]
    for a, e in zip(attns, expected):
        assert a.shape == (2, kw["num_heads"], 17) and a.dtype == torch.float32
        assert_close(a, e)


def test_dynamic_img_size_resamples_once_and_follows_weight_updates(monkeypatch):
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5, dynamic_img_size=True)
    model, ref, ref64 = pair(**kw)
    calls = []
    real = layers.resample_pos_embed
    monkeypatch.setattr(layers, "resample_pos_embed", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = images(kw, size=(48, 40))                                      # grid 6x5 instead of 4x4
    with torch.no_grad():
        for _ in range(2):
            assert_close(model(x), ref64(x.double()), eager=ref(x))
        assert calls == [(6, 5)]                                        # resampled once, then cached
        model(images(kw))                                               # the native grid needs no table
        assert calls == [(6, 5)]
        # an in-place update (optimizer step, load_state_dict's copy) invalidates the cached table
        for m in (model, ref, ref64):
            m.pos_embed.mul_(-1.5)
        assert_close(model(x), ref64(x.double()), eager=ref(x))
        assert len(calls) == 2
        other, ref_o, ref64_o = pair(**kw)
        model.load_state_dict(other.state_dict())
        assert_close(model(x), ref64_o(x.double()), eager=ref_o(x))
        assert len(calls) == 3
        # Module.to swaps the parameter's data and keeps its version: the table follows the new dtype
        model.double()
        assert_close(model(x.double()), ref64_o(x.double()))
        assert len(calls) == 4
        model.float()
    # with gradients flowing to pos_embed the table is recomputed (and differentiated) every call
    model(x).sum().backward()
    model(x).sum().backward()
    assert len(calls) == 6 and model.pos_embed.grad is not None


@pytest.mark.parametrize("size", [(32, 32), (40, 24)], ids=["native", "resampled"])
def test_gradients_match_reference(size):
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=6, dynamic_img_size=True)
    model, ref, ref64 = pair(**kw)
    model.train()
    x = images(kw, size=size)
    w = torch.randn(2, 6)
    grads = {}
    for name, m, dt in (("ours", model, torch.float32), ("eager", ref, torch.float32), ("ref", ref64, F64)):
        xi = x.to(dt).detach().clone().requires_grad_(True)
        (m(xi) * w.to(dt)).sum().backward()
        grads[name] = {"images": xi.grad, **{k: p.grad for k, p in m.named_parameters()}}
    assert set(grads["ours"]) == set(grads["ref"])
    for k, g in grads["ours"].items():
        assert_close(g, grads["ref"][k], eager=grads["eager"][k], name=f"grad of {k}")


def test_uint8_images_with_fused_normalization():
    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    model, ref, ref64 = pair(**kw)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    model.set_input_normalization(mean, std)
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    x64 = (img.double() / 255 - torch.tensor(mean, dtype=F64).view(1, 3, 1, 1)) / torch.tensor(std, dtype=F64).view(
        1, 3, 1, 1)
    with torch.no_grad():
        assert_close(model(img), ref64(x64), eager=ref(x64.float()))
        # float pixels in [0, 1] take the same normalisation
        assert_close(model(img.float() / 255), ref64(x64), eager=ref(x64.float()))
    with pytest.raises(ValueError, match="mean: expected 3 values"):
        model.set_input_normalization((0.5, 0.5), std)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the whole model (custom ops, no graph break). Backend
    aot_eager: Dynamo + AOTAutograd, which is what `fullgraph` is about; inductor's CPU codegen
    would only add minutes of C++ compilation."""
    torch._dynamo.reset()
    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=5, dynamic_img_size=True)
    model, ref, ref64 = pair(**kw)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = images(kw)
    out = compiled(x)                                   # a training graph: gradients flow through it
    assert_close(out, ref64(x.double()), eager=ref(x))
    out.sum().backward()
    ref64(x.double()).sum().backward()
    assert_close(model.blocks[0].attn.qkv.weight.grad, ref64.blocks[0].attn.qkv.weight.grad)
    x = images(kw, size=(48, 32))                       # another size: the resampled table is traced too
    with torch.no_grad():
        assert_close(compiled(x), ref64(x.double()), eager=ref(x))


def test_bad_inputs_give_clear_errors():
    model = vitfast.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="built for 32x32 images, got 48x48; pass dynamic_img_size=True"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="built for 32x32 images, got 40x32"):
        model(torch.randn(1, 3, 40, 32))
    dynamic = vitfast.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                        dynamic_img_size=True)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        dynamic(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D tensor"):
        model(torch.randn(3, 32, 32))
    no_cls = vitfast.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                       class_token=False, global_pool="avg")
    with pytest.raises(ValueError, match="return_cls_attn: needs a model with a class token"):
        no_cls(torch.randn(1, 3, 32, 32), return_cls_attn=True)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        vitfast.VisionTransformer(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="global_pool must be"):
        vitfast.VisionTransformer(global_pool="max")
    with pytest.raises(ValueError, match="act_layer must be"):
        vitfast.VisionTransformer(act_layer="relu")
    with pytest.raises(ValueError, match=r"norm must be one of \('layernorm', 'rmsnorm'\), got 'batchnorm'"):
        vitfast.VisionTransformer(norm="batchnorm")
    with pytest.raises(ValueError, match=r"attn_pool_num_heads: expected a divisor of embed_dim \(768\), got 5"):
        vitfast.VisionTransformer(global_pool="map", attn_pool_num_heads=5)


def test_model_zoo():
    assert vitfast.list_models() == sorted(CONFIGS) and "vit_base_patch16_224" in vitfast.list_models()
    with torch.device("meta"):
        base = vitfast.create_model("vit_base_patch16_224")
        ref = reference.create_model("vit_base_patch16_224")
    assert sum(p.numel() for p in base.parameters()) == 86_567_656          # timm's count
    assert {k: v.shape for k, v in base.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    small = vitfast.create_model("vit_small_patch16_224", img_size=48, depth=1, num_classes=3)
    assert small.patch_embed.grid_size == (3, 3) and len(small.blocks) == 1 and small.head.out_features == 3
    assert small.blocks[0].attn.num_heads == 6 and small.embed_dim == 384
    with pytest.raises(ValueError, match="unknown model name 'vit_nope'"):
        vitfast.create_model("vit_nope")


def test_create_model_names_what_it_does_not_implement():
    with pytest.raises(ValueError, match=r"mlp_layer='glu': vitfast does not implement MLP layers other than"):
        vitfast.create_model("vit_small_patch16_224", mlp_layer="glu")
    with pytest.raises(ValueError, match=r"mlp_layer must be one of \('mlp', 'swiglu'\), got 'glu'"):
        reference.VisionTransformer(mlp_layer="glu")
    with pytest.raises(ValueError, match=r"qk_norm=True: vitfast does not implement qk-norm"):
        vitfast.create_model("vit_small_patch16_224", qk_norm=True)
    with pytest.raises(ValueError, match=r"mlp_layer=.*SwiGLU"):
        vitfast.create_model("vit_small_patch14_dinov2", mlp_layer=torch.nn.Identity)
    with torch.device("meta"):                           # timm's off values are accepted (and dropped)
        model = vitfast.create_model("vit_small_patch16_224", qk_norm=False, norm_layer=None, depth=1)
    assert len(model.blocks) == 1


# --------------------------------------------------------------------------------------------
# The families of issue "The ViTs people run today": timm's kwargs, small sizes
# --------------------------------------------------------------------------------------------
FAMILIES = {  # name -> (distilled, kwargs, image size fed in)
    "dinov2_layer_scale": (False, dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=2,
                                       init_values=0.3, num_classes=0), None),
    "dinov2_reg4_dynamic": (False, dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=3,
                                        init_values=0.3, reg_tokens=4, no_embed_class=True, num_classes=5,
                                        dynamic_img_size=True), (42, 28)),
    "clip_quickgelu_pre_norm": (False, dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2,
                                            pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu",
                                            num_classes=7), None),
    "siglip_map_head": (False, dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3,
                                    class_token=False, global_pool="map", act_layer="gelu_tanh",
                                    num_classes=0), None),
    # so400m-like: head dim 72, mlp ratio 3.7362, and an image size that is not a multiple of the patch
    # (40 px at patch 16: 2 x 2 patches, the last 8 rows / columns dropped as timm's convolution does)
    "so400m_head_dim_72_crop": (False, dict(img_size=40, patch_size=16, embed_dim=144, depth=1, num_heads=2,
                                            mlp_ratio=3.7362, class_token=False, global_pool="map",
                                            num_classes=4), None),
    "deit_distilled": (True, dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2,
                                  num_classes=6), None),
    # DINOv2-giant-like: SwiGLUPacked MLP (fc1 to 256 = gate and up halves of 128), layer-scale, registers
    "dinov2_giant_swiglu": (False, dict(img_size=28, patch_size=14, embed_dim=48, depth=2, num_heads=3,
                                        mlp_ratio=2.66667 * 2, mlp_layer="swiglu", init_values=0.3, reg_tokens=4,
                                        no_embed_class=True, num_classes=5), None),
    # DINOv3-like: RoPE on the patch tokens (no position table), registers, no qkv bias, mean of the patches;
    # a non-square image (any size: the tables are made for each grid)
    "dinov3_rope": (False, dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=3, pos_embed="none",
                                rope="dinov3", reg_tokens=4, init_values=0.3, qkv_bias=False, norm_eps=1e-5,
                                global_pool="avg", fc_norm=False, num_classes=5, dynamic_img_size=True), (48, 32)),
    "no_final_norm_avg": (False, dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                      global_pool="avg", final_norm=False, num_classes=3), None),
}


def family_pair(distilled, kw):
    """A random vitfast model and the reference with its weights, in fp32 and fp64."""
    Fast = vitfast.model.VisionTransformerDistilled if distilled else vitfast.VisionTransformer
    Ref = reference.VisionTransformerDistilled if distilled else reference.VisionTransformer
    model = Fast(**kw).eval()
    with torch.no_grad():   # every weight non-trivial: layer-scales, latent, prefix tokens included
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref, ref64 = Ref(**kw).eval(), Ref(**kw).double().eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    ref64.load_state_dict(model.state_dict(), strict=True)
    return model, ref, ref64


@pytest.mark.parametrize("case", sorted(FAMILIES))
def test_families_equal_the_reference(case):
    distilled, kw, size = FAMILIES[case]
    model, ref, ref64 = family_pair(distilled, kw)
    x = images(kw, size=size)
    with torch.no_grad():
        assert_close(model(x), ref64(x.double()), eager=ref(x))
        feats = model.forward_features(x)
        assert_close(feats, ref64.forward_features(x.double()), eager=ref.forward_features(x), name="features")
        assert_close(model.forward_head(feats, pre_logits=True),
                     ref64.forward_head(ref64.forward_features(x.double()), pre_logits=True),
                     eager=ref.forward_head(ref.forward_features(x), pre_logits=True), name="pre_logits")
    gh, gw = model.patch_embed.grid_for(reference.crop_to_patches(x, model.patch_embed.patch_size))
    assert feats.shape == (2, model.num_prefix_tokens + gh * gw, kw["embed_dim"])


def test_family_state_dict_keys_are_timms():
    """The keys timm's VisionTransformer (and DeiT's distilled one) has for these features."""
    _, kw, _ = FAMILIES["dinov2_reg4_dynamic"]
    keys = set(vitfast.VisionTransformer(**kw).state_dict())
    assert {"reg_token", "blocks.0.ls1.gamma", "blocks.1.ls2.gamma", "cls_token"} <= keys
    assert vitfast.VisionTransformer(**kw).pos_embed.shape == (1, 4, 48)         # patches only: no_embed_class
    keys = set(vitfast.VisionTransformer(**FAMILIES["clip_quickgelu_pre_norm"][1]).state_dict())
    assert {"norm_pre.weight", "norm_pre.bias"} <= keys and "patch_embed.proj.bias" not in keys
    keys = set(vitfast.VisionTransformer(**FAMILIES["siglip_map_head"][1]).state_dict())
    assert {"attn_pool.latent", "attn_pool.q.weight", "attn_pool.kv.bias", "attn_pool.proj.weight",
            "attn_pool.norm.weight", "attn_pool.mlp.fc1.weight", "attn_pool.mlp.fc2.bias"} <= keys
    assert "cls_token" not in keys and "norm.weight" in keys
    distilled = vitfast.model.VisionTransformerDistilled(**FAMILIES["deit_distilled"][1])
    assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= set(distilled.state_dict())
    assert distilled.pos_embed.shape == (1, 2 + 4, 48)


def test_registers_keep_the_class_attention_row():
    """With register tokens the class token is still row 0: return_cls_attn reads its softmax row."""
    _, kw, _ = FAMILIES["dinov2_reg4_dynamic"]
    model, _, ref64 = family_pair(False, kw)
    x = images(kw, size=(42, 28))
    with torch.no_grad():
        _, attns = model(x, return_cls_attn=True)
        t = ref64.blocks[0].norm1(ref64.norm_pre(reference.patch_embed(
            x.double(), ref64.patch_embed.proj.weight, ref64.patch_embed.proj.bias, ref64.prefix_tokens(),
            ref64._pos_embed_for(42, 28), None, None, False)))
        qkv = reference.linear(t, ref64.blocks[0].attn.qkv.weight, ref64.blocks[0].attn.qkv.bias)
        want = reference.attention_qkv(qkv, 3, return_cls_attn=True)[1]
    assert attns[0].shape == (2, 3, 5 + 6)
    assert_close(attns[0], want, dtype=torch.float32)


def test_family_model_zoo_and_bad_configs():
    with torch.device("meta"):
        deit = vitfast.create_model("deit_base_distilled_patch16_224")
        siglip = vitfast.create_model("vit_so400m_patch14_siglip_384")
    assert isinstance(deit, vitfast.model.VisionTransformerDistilled) and deit.num_prefix_tokens == 2
    assert siglip.patch_embed.grid_size == (27, 27) and siglip.attn_pool.head_dim == 72
    # each name carries the eval data configuration of timm's default weights (what predict normalises with)
    assert data_config(siglip) == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9}
    assert data_config(deit)["mean"] == (0.485, 0.456, 0.406)
    with torch.device("meta"):
        clip, dino = vitfast.create_model("vit_base_patch16_clip_224"), vitfast.create_model("vit_small_patch14_dinov2")
    assert data_config(clip) == {"mean": (0.48145466, 0.4578275, 0.40821073),
                                 "std": (0.26862954, 0.26130258, 0.27577711), "crop_pct": 0.95}
    assert data_config(dino)["crop_pct"] == 1.0 and dino.patch_embed.img_size == (518, 518)
    with pytest.raises(ValueError, match="global_pool='token' and class_token=True"):
        vitfast.model.VisionTransformerDistilled(global_pool="avg")
    with pytest.raises(ValueError, match="act_layer must be one of"):
        vitfast.VisionTransformer(act_layer="swiglu")
    with pytest.raises(ValueError, match="reg_tokens must be an int >= 0"):
        vitfast.VisionTransformer(reg_tokens=-1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_capture_and_replay(dtype):
    """Capture protocol of torch.cuda.graph: warm-up on a side stream (Triton autotuning and the
    linear cuBLAS-or-Triton choice happen there, for the captured shapes), capture, then replays on
    new data equal eager vitfast and the float64 reference (within 2x eager reference in dtype)."""
    kw = dict(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3, num_classes=10,
              dynamic_img_size=True)
    model, ref, ref64 = pair(**kw)
    model = model.cuda().to(dtype)
    ref = ref.cuda().to(dtype)
    static = torch.randn(4, 3, 160, 192, device="cuda", dtype=dtype)     # resampled (and cached) position table
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            model(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = model(static)
    for _ in range(2):
        x = torch.randn_like(static)
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            eager = model(x)
            expect = ref64(x.cpu().double())
            torch_eager = ref(x)
        assert rel_err(out, eager) < 1e-6
        assert_close(out, expect, dtype=dtype, eager=torch_eager)
