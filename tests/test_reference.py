"""The eager reference vs independent implementations: torch's own ops, timm's parameter counts
and key names, and Hugging Face's ViT (float64, CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitfast import reference
from vitfast.checkpoint import hf_to_timm, to_timm
from vitfast.configs import CONFIGS
from vitfast.testing import rel_err

transformers = pytest.importorskip("transformers")

# timm's parameter counts: timm.create_model(name).num_params with timm's default configuration of the
# name (its image size and class count), read with timm 1.0.31.
TIMM_PARAMS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch32_224": 88_224_232,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch8_224": 86_576_872,
    "vit_base_patch16_384": 86_859_496,
    "vit_large_patch16_224": 304_326_632,
    "vit_huge_patch14_224": 630_764_800,
    "vit_small_patch14_dinov2": 22_056_192,
    "vit_base_patch14_dinov2": 86_579_712,
    "vit_large_patch14_dinov2": 304_367_616,
    "vit_small_patch14_reg4_dinov2": 22_057_344,
    "vit_base_patch14_reg4_dinov2": 86_582_016,
    "vit_large_patch14_reg4_dinov2": 304_370_688,
    "vit_base_patch16_clip_224": 86_568_424,
    "vit_base_patch16_clip_quickgelu_224": 86_193_152,
    "vit_large_patch14_clip_224": 304_204_776,
    "vit_large_patch14_clip_quickgelu_224": 303_966_976,
    "vit_base_patch16_siglip_224": 92_884_224,
    "vit_base_patch16_siglip_256": 92_930_304,
    "vit_base_patch16_siglip_384": 93_176_064,
    "vit_so400m_patch14_siglip_224": 427_680_704,
    "vit_so400m_patch14_siglip_384": 428_225_600,
    "deit_tiny_patch16_224": 5_717_416,
    "deit_small_patch16_224": 22_050_664,
    "deit_base_patch16_224": 86_567_656,
    "deit_tiny_distilled_patch16_224": 5_910_800,
    "deit_small_distilled_patch16_224": 22_436_432,
    "deit_base_distilled_patch16_224": 87_338_192,
}


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_parameter_count_matches_timm(name):
    with torch.device("meta"):
        model = reference.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name]


# Named configs whose parameter count is checked against Hugging Face's model instead (test_hf.py).
HF_COUNTED = {"vit_giant_patch14_dinov2", "vit_giant_patch14_reg4_dinov2", "vit_small_patch16_dinov3",
              "vit_base_patch16_dinov3", "vit_large_patch16_dinov3", "vit_small_plus_patch16_dinov3",
              "vit_huge_plus_patch16_dinov3", "vit_7b_patch16_dinov3"}


def test_every_config_has_a_timm_count():
    assert set(CONFIGS) == set(TIMM_PARAMS) | HF_COUNTED and not set(TIMM_PARAMS) & HF_COUNTED


def test_state_dict_keys_are_timms():
    model = reference.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                        num_classes=10)
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                "norm.weight", "norm.bias", "head.weight", "head.bias"}
    for p in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        expected |= {f"blocks.0.{p}.weight", f"blocks.0.{p}.bias"}
    assert set(model.state_dict()) == expected
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["pos_embed"] == (1, 5, 32) and shapes["blocks.0.attn.qkv.weight"] == (96, 32)
    assert shapes["patch_embed.proj.weight"] == (32, 3, 16, 16)
    # avg pooling: timm moves the final norm to fc_norm
    avg = reference.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                      global_pool="avg", class_token=False)
    keys = set(avg.state_dict())
    assert "fc_norm.weight" in keys and "norm.weight" not in keys and "cls_token" not in keys


def test_timm_state_dict_loads_strict_and_reproduces_outputs():
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    a, b = reference.VisionTransformer(**kw).double(), reference.VisionTransformer(**kw).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert rel_err(a(x), b(x)) > 1e-3          # different random weights
    b.load_state_dict(a.state_dict(), strict=True)
    assert rel_err(b(x), a(x)) == 0.0


def test_wrong_state_dict_keys_are_named():
    model = reference.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    sd = model.state_dict()
    sd["blocks.0.attn.qkv_typo.weight"] = sd.pop("blocks.0.attn.qkv.weight")
    with pytest.raises(RuntimeError, match="blocks.0.attn.qkv.weight"):
        model.load_state_dict(sd, strict=True)
    with pytest.raises(ValueError, match="unrecognised key layout"):
        to_timm({"foo.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# Ops vs torch's own implementations (float64)
# ---------------------------------------------------------------------------------------------
def test_layer_norm_matches_torch():
    x, w, b = torch.randn(5, 37, dtype=torch.float64), torch.randn(37, dtype=torch.float64), \
        torch.randn(37, dtype=torch.float64)
    assert rel_err(reference.layer_norm(x, w, b, 1e-6), F.layer_norm(x, (37,), w, b, 1e-6)) < 1e-14
    y, s = reference.add_layer_norm(x, 2 * x, w, b)
    assert rel_err(s, 3 * x) == 0 and rel_err(y, F.layer_norm(3 * x, (37,), w, b, 1e-6)) < 1e-14


def test_attention_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=torch.float64) for _ in range(3))
    assert rel_err(reference.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)) < 1e-14
    assert rel_err(reference.attention(q, k, v, 0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3)) < 1e-14
    qkv = torch.randn(2, 17, 3 * 48, dtype=torch.float64)
    out, cls = reference.attention_qkv(qkv, 3, return_cls_attn=True)
    q, k, v = qkv.view(2, 17, 3, 3, 16).unbind(2)                    # each (B, N, H, D)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    expect = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 17, 48)
    assert rel_err(out, expect) < 1e-14
    assert torch.allclose(cls.double().sum(-1), torch.ones(2, 3, dtype=torch.float64))


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_linear_matches_formula(activation):
    x, w, b, r = (torch.randn(*s, dtype=torch.float64) for s in ((4, 5, 9), (7, 9), (7,), (4, 5, 7)))
    y = x @ w.t() + b
    if activation == "gelu":
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    elif activation == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y**3)))
    assert rel_err(reference.linear(x, w, b, activation, r), y + r) < 1e-14
    with pytest.raises(ValueError, match="activation"):
        reference.linear(x, w, b, "relu")


@pytest.mark.parametrize("uint8", [False, True])
def test_patch_embed_matches_conv(uint8):
    P, D = 8, 24
    img = torch.randint(0, 256, (2, 3, 32, 16), dtype=torch.uint8)
    w, b = torch.randn(D, 3, P, P, dtype=torch.float64), torch.randn(D, dtype=torch.float64)
    cls, pos = torch.randn(1, 1, D, dtype=torch.float64), torch.randn(1, 1 + 8, D, dtype=torch.float64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = img.double() / 255 if uint8 else torch.randn(2, 3, 32, 16, dtype=torch.float64)
    if uint8:
        out = reference.patch_embed(img, w, b, cls, pos, mean, std)
        x = (x - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    else:
        out = reference.patch_embed(x, w, b, cls, pos)
    conv = F.conv2d(x, w, b, stride=P).flatten(2).transpose(1, 2)
    expect = torch.cat([cls.expand(2, 1, D), conv], dim=1) + pos
    assert rel_err(out, expect) < 1e-14


# ---------------------------------------------------------------------------------------------
# The reference ViT vs Hugging Face's ViT with the same weights (float64)
# ---------------------------------------------------------------------------------------------
def hf_pair(img_size, patch_size, embed_dim, depth, num_heads, num_classes=10, mlp_ratio=4.0):
    """A random HF ViTForImageClassification and the reference ViT loaded with its weights."""
    cfg = transformers.ViTConfig(
        image_size=img_size, patch_size=patch_size, hidden_size=embed_dim, num_hidden_layers=depth,
        num_attention_heads=num_heads, intermediate_size=int(embed_dim * mlp_ratio), hidden_act="gelu",
        layer_norm_eps=1e-6, qkv_bias=True, num_labels=num_classes)
    hf = transformers.ViTForImageClassification(cfg).double().eval()
    with torch.no_grad():   # HF initialises norms to 1/0 and biases to 0: make every weight count
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = reference.VisionTransformer(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                                      num_heads=num_heads, num_classes=num_classes, mlp_ratio=mlp_ratio).double()
    ref.load_state_dict(hf_to_timm(hf.state_dict()), strict=True)
    return hf, ref.eval()


HF_CASES = {
    "patch8": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2),
    "head_dim_80": dict(img_size=32, patch_size=16, embed_dim=160, depth=2, num_heads=2),
    "non_square": dict(img_size=(48, 32), patch_size=16, embed_dim=96, depth=2, num_heads=3),
    "odd_tokens_patch14": dict(img_size=42, patch_size=14, embed_dim=48, depth=1, num_heads=3),
}


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_reference_vit_equals_hugging_face(case):
    kw = HF_CASES[case]
    hf, ref = hf_pair(**kw)
    H, W = reference.to_2tuple(kw["img_size"])
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    with torch.no_grad():
        hf_out = hf(pixel_values=x)
        hf_hidden = hf.vit(pixel_values=x).last_hidden_state
        assert rel_err(ref.forward_features(x), hf_hidden) < 1e-10
        assert rel_err(ref(x), hf_out.logits) < 1e-10


def _hf_classic_keys(sd):
    """The published-checkpoint HF layout, written out from the current one."""
    ren = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
           "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    out = {}
    for k, v in sd.items():
        k = k.replace("vit.layers.", "vit.encoder.layer.")
        for a, b in ren.items():
            k = k.replace(f".{a}.", f".{b}.")
        out[k] = v
    return out


def test_classic_hf_checkpoint_layout_loads():
    hf, ref = hf_pair(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2)
    classic = _hf_classic_keys(hf.state_dict())
    assert any(".attention.attention.query." in k for k in classic)
    ref2 = reference.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2,
                                       num_classes=10).double()
    ref2.load_state_dict(to_timm(classic), strict=True)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ref2(x), hf(pixel_values=x).logits) < 1e-10


def test_pos_embed_resampling_matches_pil_bicubic():
    """timm resamples with torch's antialiased bicubic, which is PIL's resize filter: check it
    against PIL channel by channel (PIL's float images are 32-bit)."""
    Image = pytest.importorskip("PIL.Image")
    np = pytest.importorskip("numpy")
    pe = torch.randn(1, 1 + 14 * 14, 5, dtype=torch.float64)
    for new in ((24, 24), (7, 10)):       # up and (anisotropic) down
        out = reference.resample_pos_embed(pe, new, (14, 14))
        assert out.shape == (1, 1 + new[0] * new[1], 5)
        assert torch.equal(out[:, :1], pe[:, :1])
        grid = pe[0, 1:].reshape(14, 14, 5)
        for c in range(5):
            img = Image.fromarray(grid[..., c].numpy().astype(np.float32), mode="F")
            pil = torch.from_numpy(np.array(img.resize((new[1], new[0]), Image.BICUBIC))).double()
            assert rel_err(out[0, 1:, c].reshape(new), pil) < 1e-5


def test_vit_at_384_with_resampled_pos_embed_equals_hf():
    """A 224 model run on 384 images equals HF's ViT built for 384 with the resampled table."""
    hf224, ref = hf_pair(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    ref.dynamic_img_size = True
    hf384, _ = hf_pair(img_size=384, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    sd = hf224.state_dict()
    sd["vit.embeddings.position_embeddings"] = reference.resample_pos_embed(ref.pos_embed.detach(), (24, 24))
    hf384.load_state_dict(sd)
    x = torch.randn(1, 3, 384, 384, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(ref(x), hf384(pixel_values=x).logits) < 1e-10


def test_global_pool_avg_excludes_cls_token():
    model = reference.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                        global_pool="avg", num_classes=0).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    tokens = model.forward_features(x)
    expect = reference.layer_norm(tokens[:, 1:].mean(1), model.fc_norm.weight, model.fc_norm.bias)
    assert rel_err(model(x), expect) < 1e-14


def test_bad_images_give_clear_errors():
    model = reference.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="built for 32x32 images, got 40x32"):
        model(torch.randn(1, 3, 40, 32))
    dynamic = reference.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                          dynamic_img_size=True)
    with pytest.raises(ValueError, match="divisible by the patch size"):
        dynamic(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="expected 3 channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="built for 32x32 images, got 48x48"):
        model(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        reference.VisionTransformer(embed_dim=30, num_heads=4)
