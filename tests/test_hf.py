"""Hugging Face's DeiT, DINOv2 (with and without registers), DINOv3, CLIP (and MetaCLIP 2) vision and SigLIP
vision models on vitfast, on the CPU: `vitfast.optimize` (fp32 vs HF in float64, bounded by HF's own fp32 error; every
output field, other image sizes by each family's rule) and their checkpoints loaded into
`vitfast.VisionTransformer`. HF's ViT itself is in test_convert.py."""

import copy

import pytest
import torch
from torch import nn

import vitfast
from vitfast import reference
from vitfast.checkpoint import load_checkpoint
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf import CLASSES
from vitfast.layers import JoinedLinear
from vitfast.testing import MODEL_TOLERANCE, assert_close, assert_grads_match, backward_weighted, without_reference

transformers = pytest.importorskip("transformers")

F64 = torch.float64

SMALL = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=3)
# transformers class -> (its config class, config kwargs beyond SMALL)
FAMILIES = {
    "DeiTModel": ("DeiTConfig", dict(intermediate_size=96)),
    "DeiTForImageClassification": ("DeiTConfig", dict(intermediate_size=96, num_labels=5)),
    "DeiTForImageClassificationWithTeacher": ("DeiTConfig", dict(intermediate_size=96, num_labels=5)),
    "Dinov2Model": ("Dinov2Config", dict(mlp_ratio=2)),
    "Dinov2WithRegistersModel": ("Dinov2WithRegistersConfig", dict(mlp_ratio=2, num_register_tokens=4)),
    "CLIPVisionModel": ("CLIPVisionConfig", dict(intermediate_size=96)),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", dict(intermediate_size=96, projection_dim=16)),
    # MetaCLIP 2: CLIP's vision model under its own names (QuickGELU and eps 1e-5 by default)
    "MetaClip2VisionModel": ("MetaClip2VisionConfig", dict(intermediate_size=96)),
    "MetaClip2VisionModelWithProjection": ("MetaClip2VisionConfig", dict(intermediate_size=96, projection_dim=16)),
    "SiglipVisionModel": ("SiglipVisionConfig", dict(intermediate_size=96)),
    # OWL-ViT, OWLv2: CLIP's vision model with pre_layernorm (their detectors: test_hf_around)
    "OwlViTVisionModel": ("OwlViTVisionConfig", dict(intermediate_size=96)),
    "Owlv2VisionModel": ("Owlv2VisionConfig", dict(intermediate_size=96)),
    # Chinese-CLIP, AltCLIP: CLIP's vision model under their own names (their two-tower models: test_hf_around)
    "ChineseCLIPVisionModel": ("ChineseCLIPVisionConfig", dict(intermediate_size=96)),
    "AltCLIPVisionModel": ("AltCLIPVisionConfig", dict(intermediate_size=96)),
    # GIT's: CLIP's vision model with post_layernorm on every token and no pooled output (GitForCausalLM:
    # test_hf_around)
    "GitVisionModel": ("GitVisionConfig", dict(intermediate_size=96)),
    # RoPE, registers, no key bias; HF's train-mode RoPE augmentation off (test_dinov3_... below refuse it)
    "DINOv3ViTModel": ("DINOv3ViTConfig", dict(intermediate_size=96, num_register_tokens=2, pos_embed_rescale=None)),
    # InternViT (InternVL's tower): layer-scale, q / k / v biases as InternViT-300M's, no final norm (mean pooling)
    "InternVLVisionModel": ("InternVLVisionConfig", dict(intermediate_size=96, attention_bias=True)),
    # AIMv2: RMSNorms (the patch tokens' too), the SwiGLU MLP, biases on q / k / v / out_proj and the MLP here, its
    # attention-pooling head (a learned query, k / v projections, output_proj)
    "Aimv2VisionModel": ("Aimv2VisionConfig", dict(intermediate_size=96, qkv_bias=True, mlp_bias=True)),
    # MLCD: CLIP's layout with 2D RoPE (the class token's angle learned) instead of a position table
    "MLCDVisionModel": ("MLCDVisionConfig", dict(intermediate_size=96)),
}


def hf_model(name: str, **config_kw):
    """A random fp32 HF model of `name` (every weight perturbed off its 0/1 init) in eval mode."""
    config_cls, kw = FAMILIES[name]
    cfg = getattr(transformers, config_cls)(**{**SMALL, **kw, **config_kw})
    model = getattr(transformers, name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def compare(out, ref, eager) -> None:
    """Every tensor field of HF's output object (tuples of hidden states element by element)."""
    assert type(out).__name__ == type(ref).__name__
    assert set(out.keys()) == set(ref.keys()), f"fields {sorted(out.keys())} vs HF's {sorted(ref.keys())}"
    for key in ref.keys():
        if isinstance(ref[key], tuple):
            assert len(out[key]) == len(ref[key])
            for i, (o, r, e) in enumerate(zip(out[key], ref[key], eager[key])):
                assert_close(o, r, eager=e, name=f"{key}[{i}]")
        else:
            assert_close(out[key], ref[key], eager=eager[key], name=key)


def test_every_supported_class_is_tested():
    assert set(CLASSES) == set(FAMILIES) | {"ViTModel", "ViTForImageClassification"} | {   # those: test_convert
        "Dinov2Backbone", "Dinov2WithRegistersBackbone", "DINOv3ViTBackbone"} | {               # test_hf_backbone
        "Siglip2VisionModel"} | {                                                               # test_hf_siglip2
        "OwlViTVisionTransformer", "Owlv2VisionTransformer",           # inside the OWL models of test_hf_around
        "Kosmos2VisionTransformer"} | {                                # inside Kosmos-2's, test_hf_around
        "CLIPSegVisionModel"} | {                                                               # test_hf_clipseg
        "Idefics3VisionTransformer", "SmolVLMVisionTransformer", "Phi4MultimodalVisionModel",  # test_hf_idefics3
        "Idefics2VisionTransformer"} | {
        "Qwen2VisionTransformerPretrainedModel", "Qwen2_5_VisionTransformerPretrainedModel",   # test_hf_qwen
        "Qwen2_5OmniVisionEncoder", "Qwen3OmniMoeVisionEncoder", "Exaone4_5_VisionModel",
        "Qwen3VLVisionModel", "Qwen3VLMoeVisionModel", "Qwen3_5VisionModel", "Qwen3_5MoeVisionModel",
        "Qwen4ExpVisionModel"} | {
        "PixtralVisionModel"} | {                                                               # test_hf_pixtral
        "Glm4vVisionModel", "Glm4vMoeVisionModel", "GlmOcrVisionModel", "Glm5NextVisionModel"} | {  # test_hf_glm
        "Kimi_K25VisionModel"} | {                                                              # test_hf_kimi
        "PaddleOCRVisionModel"} | {                                                             # test_hf_paddleocr
        "Ernie4_5_VLMoeVisionTransformerPretrainedModel",                                      # test_hf_ernie
        "Ernie4_5_VL_MoeVisionTransformerPretrainedModel"} | {
        "Llama4VisionModel"} | {                                                                # test_hf_llama4
        "Ovis2VisionModel"} | {                                                                 # test_hf_ovis2
        "Gemma4VisionModel"} | {                                                                # test_hf_gemma4
        "MllamaVisionModel"} | {                                                                # test_hf_mllama
        "SamVisionEncoder", "SamHQVisionEncoder", "GotOcr2VisionEncoder"} | {                   # test_hf_sam
        "Sam3ViTModel"} | {                                                                     # test_hf_sam3
        "RadioModel"} | {                                                                       # test_hf_radio
        "VJEPA2Model", "VJEPA2ForVideoClassification"} | {                                     # test_hf_vjepa2
        "BlipVisionModel", "Blip2VisionModel", "InstructBlipVisionModel",                      # test_hf_blip
        "InstructBlipVideoVisionModel"} | {
        "PixioModel", "IJepaModel", "ViTMAEModel"} | {                                          # test_hf_pixio
        "EomtForUniversalSegmentation", "EomtDinov3ForUniversalSegmentation",                  # test_hf_eomt
        "VideomtForUniversalSegmentation"} | {
        "Sapiens2Model"} | {                                                                    # test_hf_sapiens2
        "Tipsv2VisionModel", "Tipsv2VisionBackbone"} | {                                        # test_hf_tipsv2
        "VitPoseBackbone"} | {                                                                  # test_hf_vitpose
        "VideoMAEModel"} | {                                                                    # test_hf_videomae
        "YolosModel"} | {                                                                       # test_hf_yolos
        "DPTModel"} | {                                                                         # test_hf_dpt
        "TimesformerModel"} | {                                                                 # test_hf_timesformer
        "VitDetModel", "VitDetBackbone"} | {                                                    # test_hf_vitdet
        "BeitModel", "Data2VecVisionModel"} | {                                                 # test_hf_beit
        "VivitModel"} | {                                                                       # test_hf_vivit
        "Molmo2VisionModel"} | {                                                                # test_hf_molmo2
        "HunYuanVLVisionTransformer"} | {                                                       # test_hf_hunyuan_vl
        "Step3p7VisionModel"}                                                                   # test_hf_step3p7


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_optimize_hf_family_equals_hf(name):
    hf = hf_model(name)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref, eager = (m(xi, output_hidden_states=True) for m, xi in ((opt, x), (hf64, x.double()), (hf, x)))
        compare(out, ref, eager)
        assert len(out.hidden_states) == SMALL["num_hidden_layers"] + 1
        as_tuple, hf_tuple = opt(x, return_dict=False), hf(x, return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(hf_tuple)
        assert all(torch.equal(a, b) for a, b in zip(as_tuple, opt(x).to_tuple()))


@pytest.mark.parametrize("name", ["DeiTForImageClassification", "Dinov2Model", "Dinov2WithRegistersModel",
                                  "CLIPVisionModelWithProjection", "SiglipVisionModel", "DINOv3ViTModel",
                                  "InternVLVisionModel", "MLCDVisionModel"])
def test_optimize_hf_family_other_image_size(name):
    """Position tables resampled by each family's HF rule: DINOv2 and InternVL always (DINOv2 with antialias when
    it has registers), the others when asked with interpolate_pos_encoding=True; DINOv3's and MLCD's RoPE tables are
    made for any patch grid."""
    hf = hf_model(name)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = torch.randn(2, 3, 48, 40)
    any_size = name.startswith(("Dinov2", "DINOv3", "InternVL", "MLCD"))
    kw = {} if any_size else dict(interpolate_pos_encoding=True)
    with torch.no_grad():
        compare(opt(x, **kw), hf64(x.double(), **kw), hf(x, **kw))
    if not any_size:
        with pytest.raises(ValueError, match="built for 32x32 images, got 48x40"):
            opt(x)


def test_optimize_hf_families_share_weights():
    clip = hf_model("CLIPVisionModelWithProjection")
    opt = vitfast.optimize(clip)
    core, vision = opt.vision_model.core, clip.vision_model
    assert opt.visual_projection is clip.visual_projection
    assert core.norm_pre.weight is vision.pre_layrnorm.weight and core.norm.weight is vision.post_layernorm.weight
    assert core.blocks[1].mlp.fc2.weight is vision.encoder.layers[1].mlp.fc2.weight
    dino = hf_model("Dinov2Model")
    core = vitfast.optimize(dino).core
    assert core.blocks[0].ls1.gamma is dino.encoder.layer[0].layer_scale1.lambda1
    assert core.pos_embed is dino.embeddings.position_embeddings
    siglip = hf_model("SiglipVisionModel")
    core, head = vitfast.optimize(siglip).core, getattr(siglip, "vision_model", siglip).head
    assert core.attn_pool.latent is head.probe and core.attn_pool.proj.weight is head.attention.out_proj.weight


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_optimized_hf_trains_hf_tensors(name):
    """optimize(hf) holds exactly HF's parameter tensors (q / k / v: the packed qkv is built from them; CLIP's,
    SigLIP's and DINOv2-with-registers' class token and position table are built from HF's embeddings), and
    a backward through it gives every one of them HF's float64 gradient."""
    torch.manual_seed(0)
    hf = hf_model(name).train()
    if name == "MLCDVisionModel":            # its class token's RoPE angle trains only with HF's code: frozen here
        hf.class_pos_emb.requires_grad_(False)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    ours, theirs = {id(p) for p in opt.parameters()}, {id(p): n for n, p in hf.named_parameters()}
    assert ours <= set(theirs)
    assert all(theirs[i].endswith("mask_token") for i in set(theirs) - ours)   # only a mask token may be left
    x = torch.randn(2, 3, 32, 32)
    first = lambda out: out[0] if isinstance(out, tuple) else next(iter(out.values()))
    w = torch.randn_like(first(opt(x)))
    loss = (first(opt(x)) * w).sum()
    with without_reference():                                    # vitfast's backward, not the reference's
        loss.backward()
    (first(hf64(x.double())) * w.double()).sum().backward()
    for (n, p), (_, p64) in zip(hf.named_parameters(), hf64.named_parameters()):
        if p64.grad is None:
            assert p.grad is None, n                              # unused by HF's forward (mask_token)
        elif p64.grad.norm() < 1e-6 * max(1.0, p64.norm().item()):   # k's bias: the exact gradient is 0 (HF's
            assert p.grad.norm() < 1e-4, n                            # float32 softmax, GIT's, leaves ~1e-8)
        else:
            assert_close(p.grad, p64.grad, name=f"grad {n}")


def test_derived_class_token_follows_hf_and_yields_to_an_assigned_parameter():
    clip = hf_model("CLIPVisionModel")
    core = vitfast.optimize(clip).core
    with torch.no_grad():
        clip.embeddings.class_embedding.add_(1.0)
    assert torch.equal(core.cls_token, clip.embeddings.class_embedding.view(1, 1, -1))
    core.cls_token = nn.Parameter(torch.zeros(1, 1, 48))
    assert torch.equal(core.cls_token, torch.zeros(1, 1, 48)) and "cls_token" in dict(core.named_parameters())


def test_joined_linear_builds_from_its_sources_and_caches_only_without_grad():
    a, b = nn.Linear(4, 3), nn.Linear(4, 2)
    joined = JoinedLinear([(a, "weight", "bias", None), (b, "weight", "bias", None)])
    want = lambda: (torch.cat([a.weight, b.weight]), torch.cat([a.bias, b.bias]))
    with torch.no_grad():
        w = joined.weight
        assert torch.equal(w, want()[0]) and torch.equal(joined.bias, want()[1]) and joined.weight is w   # cached
        a.weight.add_(1.0)                                        # in place: rebuilt
        assert torch.equal(joined.weight, want()[0])
        b.weight = nn.Parameter(torch.randn(2, 4))                # replaced: rebuilt
        assert torch.equal(joined.weight, want()[0])
    x, g = torch.randn(5, 4), torch.randn(5, 5)
    (joined(x) * g).sum().backward()                              # grad mode: built live, gradients reach a and b
    assert torch.allclose(torch.cat([a.weight.grad, b.weight.grad]), g.t() @ x, atol=1e-6)
    assert torch.allclose(torch.cat([a.bias.grad, b.bias.grad]), g.sum(0), atol=1e-6)
    mha = nn.MultiheadAttention(4, 2)
    kv = JoinedLinear([(mha, "in_proj_weight", "in_proj_bias", slice(4, 12))])
    assert kv.weight.data_ptr() == mha.in_proj_weight[4:].data_ptr() and (kv.in_features, kv.out_features) == (4, 8)
    assert JoinedLinear([(nn.Linear(4, 3, bias=False), "weight", "bias", None)]).bias is None
    # A part without bias next to parts with one (DINOv3's key projection): zeros there, one cached tensor.
    q, k, v = nn.Linear(4, 3), nn.Linear(4, 3, bias=False), nn.Linear(4, 3)
    qkv = JoinedLinear([(m, "weight", "bias", None) for m in (q, k, v)])
    with torch.no_grad():
        bias = qkv.bias
        assert torch.equal(bias, torch.cat([q.bias, torch.zeros(3), v.bias])) and qkv.bias is bias
    (qkv(x) * torch.randn(5, 9)).sum().backward()
    assert q.bias.grad is not None and v.bias.grad is not None and k.bias is None
    # One part with its rows reordered and repeated (Gemma 4's grouped-query k): a copy, cached like a join.
    k = nn.Linear(4, 2, bias=False)
    rows = JoinedLinear([(k, "weight", None, None, [1, 0, 1, 0])])
    with torch.no_grad():
        w = rows.weight
        assert torch.equal(w, k.weight[[1, 0, 1, 0]]) and rows.weight is w
        k.weight.mul_(2.0)                                        # in place: rebuilt
        assert torch.equal(rows.weight, k.weight[[1, 0, 1, 0]])
    (rows(x) * g[:, :4]).sum().backward()                         # the repeated rows' gradients add up
    assert torch.allclose(k.weight.grad, (g[:, :4].t() @ x).view(2, 2, 4).sum(0)[[1, 0]], atol=1e-6)
    # A repeated part without bias beside parts with one (Sapiens2's grouped-query k without key_bias): zeros of the
    # repeated rows' count.
    q = nn.Linear(4, 4)
    gqa = JoinedLinear([(q, "weight", "bias", None), (k, "weight", "bias", None, [0, 0, 1, 1])])
    with torch.no_grad():
        assert gqa.weight.shape == (8, 4) and torch.equal(gqa.bias, torch.cat([q.bias, torch.zeros(4)]))


def test_optimize_hf_dinov2_swiglu_equals_hf_and_trains_its_projections():
    """DINOv2-giant's MLP (use_swiglu_ffn): timm's packed fc1 is built from HF's gate and up projections, which
    stay the parameters (their gradients are HF's own)."""
    hf = hf_model("Dinov2Model", use_swiglu_ffn=True)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    mlp, hf_mlp = opt.core.blocks[1].mlp, hf.layers[1].mlp if hasattr(hf, "layers") else hf.encoder.layer[1].mlp
    packed = not hasattr(hf_mlp, "gate_proj")                     # older transformers: weights_in holds both
    assert type(mlp).__name__ == "GluMlp" and isinstance(mlp.fc1, nn.Linear if packed else JoinedLinear)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}        # the mask token's too
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref, eager = (m(xi, output_hidden_states=True) for m, xi in ((opt, x), (hf64, x.double()), (hf, x)))
        compare(out, ref, eager)
    parts = [hf_mlp.weights_in] if packed else [hf_mlp.gate_proj, hf_mlp.up_proj]
    g = torch.randn_like(out.pooler_output)
    (opt(x).pooler_output * g).sum().backward()
    got = [p.weight.grad.clone() for p in parts]
    hf.zero_grad()
    (hf(x).pooler_output * g).sum().backward()
    for mine, p in zip(got, parts):
        assert_close(mine, p.weight.grad, dtype=torch.float32, name="fc1 part grad")


def test_optimize_hf_dinov3_gated_mlp_and_rope_ablation():
    """DINOv3's gated MLP (use_gated_mlp, SiLU) runs as the packed SwiGLU built from HF's gate and up projections;
    with the rotation taken out, the comparison fails (so the RoPE is what makes it pass)."""
    hf = hf_model("DINOv3ViTModel", use_gated_mlp=True, hidden_act="silu")
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    mlp = opt.core.blocks[0].mlp
    assert type(mlp).__name__ == "GluMlp" and isinstance(mlp.fc1, JoinedLinear)
    assert opt.core.pos_embed is None and opt.core.rope_type == "dinov3"
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        out, ref, eager = (m(xi, output_hidden_states=True) for m, xi in ((opt, x), (hf64, x.double()), (hf, x)))
        compare(out, ref, eager)
        opt.core.rope_type = None
        unrotated = opt(x).last_hidden_state
    assert (unrotated.double() - ref.last_hidden_state).abs().max() > 1e-2


def test_optimize_hf_dinov3_without_registers():
    """HF keeps an empty [1, 0, D] register tensor for a DINOv3 without registers: no register token in vitfast's
    model (it was refused as a key without a place)."""
    hf = hf_model("DINOv3ViTModel", num_register_tokens=0)
    opt = vitfast.optimize(hf)
    assert opt.core.reg_token is None and opt.core.num_prefix_tokens == 1
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        compare(opt(x), copy.deepcopy(hf).double()(x.double()), hf(x))


def test_optimize_hf_dinov3_traces_in_torch_compile():
    """The optimized DINOv3 in one torch.compile graph (the RoPE tables made in the traced code, the packed
    qkv's zero key bias in it) equals the eager model."""
    opt = vitfast.optimize(hf_model("DINOv3ViTModel"), cuda_graphs=False)
    x = torch.randn(2, 3, 32, 40)
    fn = torch.compile(lambda x: opt(x).last_hidden_state, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(fn(x), opt(x).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_optimize_hf_dinov3_refusals_are_named():
    """HF moves DINOv3's RoPE coordinates at random in train mode (pos_embed_rescale=2.0 by default), which
    vitfast does not: eval works, train mode is refused by name; output projections without bias too."""
    hf = hf_model("DINOv3ViTModel", pos_embed_rescale=2.0)
    opt = vitfast.optimize(hf)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(opt(x).pooler_output, copy.deepcopy(hf).double()(x.double()).pooler_output)
    with pytest.raises(ValueError, match=r"RoPE coordinate augmentation \(pos_embed_rescale=2.0\)"):
        opt.train()(x)
    with pytest.raises(UnsupportedFeatureError, match=r"RoPE coordinate augmentation \(pos_embed_rescale=2.0\)"):
        vitfast.optimize(hf.train())
    with pytest.raises(UnsupportedFeatureError, match="proj_bias=False"):
        vitfast.optimize(hf_model("DINOv3ViTModel", proj_bias=False))


# name -> (its count; HF's hidden size, heads, layers and MLP width, gated or not)
DINOV3_PARAMS = {"vit_small_patch16_dinov3": (21_586_944, 384, 6, 12, 1536, False),
                 "vit_base_patch16_dinov3": (85_641_216, 768, 12, 12, 3072, False),
                 "vit_large_patch16_dinov3": (303_079_424, 1024, 16, 24, 4096, False),
                 "vit_small_plus_patch16_dinov3": (28_683_264, 384, 6, 12, 1536, True),
                 "vit_huge_plus_patch16_dinov3": (840_509_440, 1280, 20, 32, 5120, True),
                 "vit_7b_patch16_dinov3": (6_716_030_976, 4096, 32, 40, 8192, True)}


@pytest.mark.parametrize("name", sorted(DINOV3_PARAMS))
def test_dinov3_has_hf_dinov3s_parameters(name):
    """The DINOv3 names at full size (meta device) hold HF's parameters less its mask token and its query and
    value biases (timm's configurations of these names have no qkv bias; the released ones are zeros)."""
    expected, dim, heads, depth, width, gated = DINOV3_PARAMS[name]
    cfg = transformers.DINOv3ViTConfig(hidden_size=dim, num_attention_heads=heads, intermediate_size=width,
                                       num_hidden_layers=depth, num_register_tokens=4, image_size=256, patch_size=16,
                                       use_gated_mlp=gated)
    with torch.device("meta"):
        hf = transformers.DINOv3ViTModel(cfg)
        mine = vitfast.create_model(name)
    count = lambda m: sum(p.numel() for p in m.parameters())
    biases = 2 * depth * dim
    assert count(mine) == count(hf) - hf.embeddings.mask_token.numel() - biases == expected


def test_dinov3_checkpoint_with_zero_qkv_biases_loads_into_the_timm_name(tmp_path):
    """HF's released DINOv3 checkpoints hold zero query / value biases: they load into the name's model (no qkv
    bias), and the same checkpoint with a non-zero bias is refused, naming the keys."""
    hf = hf_model("DINOv3ViTModel", patch_size=16, intermediate_size=192, num_register_tokens=4)
    with torch.no_grad():
        for layer in hf.model.layer:
            layer.attention.q_proj.bias.zero_()
            layer.attention.v_proj.bias.zero_()
    model = vitfast.create_model("vit_small_patch16_dinov3", **SHRINK, img_size=32)
    load_checkpoint(model, hf.state_dict())
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert_close(model.eval().forward_features(x), copy.deepcopy(hf).double()(x.double()).last_hidden_state,
                     eager=hf(x).last_hidden_state)
    with torch.no_grad():
        hf.model.layer[1].attention.v_proj.bias[3] = 0.5
    with pytest.raises(ValueError, match=r"unexpected keys \['blocks.1.attn.qkv.bias'\]"):
        load_checkpoint(model, hf.state_dict())


GIANT_PARAMS = {"vit_giant_patch14_dinov2": 1_136_479_232, "vit_giant_patch14_reg4_dinov2": 1_136_483_840}


@pytest.mark.parametrize("name", sorted(GIANT_PARAMS))
def test_dinov2_giant_has_hf_giants_parameters(name):
    """The DINOv2-giants at full size (on the meta device) hold HF's parameters, less HF's mask token (masked
    patches, which vitfast does not implement) and, with registers, the class token's position row (timm's
    layout folds it into cls_token). timm's own counts of these two are not checked here (no timm on the CPU
    machine; test_reference.py holds timm's counts of the other names)."""
    registers = "reg4" in name
    cfg = (transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config)(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, mlp_ratio=4, use_swiglu_ffn=True,
        image_size=518, patch_size=14, **(dict(num_register_tokens=4) if registers else {}))
    with torch.device("meta"):
        hf = (transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model)(cfg)
        mine = vitfast.create_model(name)
    count = lambda m: sum(p.numel() for p in m.parameters())
    folded = 1536 if registers else 0
    assert count(mine) == count(hf) - hf.embeddings.mask_token.numel() - folded == GIANT_PARAMS[name]
    assert tuple(mine.blocks[0].mlp.fc1.weight.shape) == (8192, 1536)
    assert tuple(mine.blocks[0].mlp.fc2.weight.shape) == (1536, 4096)


@pytest.mark.parametrize("name", ["ViTModel", "DeiTModel", "Dinov2Model", "Dinov2WithRegistersModel", "DINOv3ViTModel"])
def test_masked_patches_take_the_mask_token_and_train_it(name):
    """bool_masked_pos [B, patches] (masked image modeling, DINOv2 / iBOT-style training): each masked patch enters as
    HF's mask token plus its position row (DINOv3: the token alone), at the configured size and another grid; the
    outputs as HF's, and a backward gives the mask token (and every other parameter) HF's float64 gradient."""
    if name in ("ViTModel", "DeiTModel"):                            # their mask token only with use_mask_token
        config = getattr(transformers, name.replace("Model", "Config"))(**{**SMALL, "intermediate_size": 96})
        hf = getattr(transformers, name)(config, add_pooling_layer=False, use_mask_token=True).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    else:
        hf = hf_model(name)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert opt.mask_token is hf.embeddings.mask_token
    kw = {} if name.startswith(("Dinov2", "DINOv3")) else dict(interpolate_pos_encoding=True)   # (DINOv2 resamples)
    for shape in ((2, 3, 32, 32), (2, 3, 40, 24)):
        x = torch.randn(*shape)
        masked = torch.rand(2, (shape[2] // 8) * (shape[3] // 8)) > 0.5
        with torch.no_grad():
            out, ref, eager = (m(px, bool_masked_pos=masked, **kw).last_hidden_state
                               for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
            assert_close(out, ref, eager=eager, name=f"last_hidden_state {shape}")
            assert (out - opt(x, **kw).last_hidden_state).abs().max() > 1e-2          # the mask took effect
    hf.train()
    hf64.train()
    opt.train()
    x, masked, w = torch.randn(2, 3, 32, 32), torch.rand(2, 16) > 0.5, torch.randn(48, dtype=torch.float64)
    backward_weighted(hf64(x.double(), bool_masked_pos=masked).last_hidden_state, w)
    backward_weighted(opt(x, bool_masked_pos=masked).last_hidden_state, w, reference_free=True)
    assert hf.embeddings.mask_token.grad is not None and hf.embeddings.mask_token.grad.abs().max() > 0
    assert_grads_match(hf, hf64)


def test_optimize_hf_family_refusals_are_named():
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(hf_model("CLIPVisionModel", hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match="bool_masked_pos"):            # SigLIP has no mask token
        vitfast.optimize(hf_model("SiglipVisionModel"))(torch.randn(1, 3, 32, 32),
                                                        bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool))
    opt = vitfast.optimize(hf_model("Dinov2Model"))
    with pytest.raises(ValueError, match=r"bool_masked_pos: expected \[B, patches\] = \[1, 16\], got \(1, 15\)"):
        opt(torch.randn(1, 3, 32, 32), bool_masked_pos=torch.zeros(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        opt(torch.randn(1, 3, 36, 32))
    for kw, what in ((dict(use_qk_norm=True), "use_qk_norm=True"), (dict(norm_type="rms_norm"), "norm_type='rms_norm'"),
                     (dict(use_absolute_position_embeddings=False), "use_absolute_position_embeddings=False")):
        with pytest.raises(UnsupportedFeatureError, match=what):                # InternViT-6B's RMSNorms and qk norm
            vitfast.optimize(hf_model("InternVLVisionModel", **kw))
    for kw, what in ((dict(is_native=True), r"is_native=True \(2D sin-cos positions"),
                     (dict(mlp_bias=False), r"qkv_bias=True with mlp_bias=False \(only both or neither\)")):
        with pytest.raises(UnsupportedFeatureError, match=what):
            vitfast.optimize(hf_model("Aimv2VisionModel", **kw))


def test_optimize_hf_mlcd_refuses_training_its_class_rope_angle():
    hf = hf_model("MLCDVisionModel").train()
    opt = vitfast.optimize(hf)
    with pytest.raises(UnsupportedFeatureError, match=r"class_pos_emb\) would get no gradient; freeze it"):
        opt(torch.randn(1, 3, 32, 32))
    with torch.no_grad():                    # without grad it runs, in train mode too
        out = opt(torch.randn(1, 3, 32, 32))
    assert out.last_hidden_state.shape == (1, 17, 48)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)       # in eval mode, with grad: the angle is a constant
    opt.eval()(x).pooler_output.sum().backward()
    assert x.grad is not None and hf.class_pos_emb.grad is None


def test_optimize_hf_aimv2_without_biases_or_head():
    """AIMv2's defaults (no bias on q / k / v / out_proj or the MLP), and without its pooling head."""
    for kw in (dict(qkv_bias=False, mlp_bias=False), dict(use_head=False)):
        hf = hf_model("Aimv2VisionModel", **kw)
        opt = vitfast.optimize(hf)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            out, ref, eager = (m(xi) for m, xi in ((opt, x), (copy.deepcopy(hf).double(), x.double()), (hf, x)))
            compare(out, ref, eager)
        assert (out.pooler_output is None) == (not hf.config.use_head)


def test_optimize_hf_internvl_with_final_norm_and_without_qkv_bias():
    """InternViT's other options: a final LayerNorm (use_mean_pooling=False) and q / k / v without bias (HF's
    default), layer-scales from HF's lambda_1 / lambda_2."""
    hf = hf_model("InternVLVisionModel", use_mean_pooling=False, attention_bias=False)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert opt.core.norm.weight is hf.layernorm.weight and opt.core.blocks[0].attn.qkv.bias is None
    assert opt.core.blocks[1].ls2.gamma is hf.encoder.layer[1].lambda_2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        compare(opt(x, output_hidden_states=True), hf64(x.double(), output_hidden_states=True),
                hf(x, output_hidden_states=True))


# --------------------------------------------------------------------------------------------
# HF checkpoints of these families through create_model(timm's name, checkpoint_path=...)
# --------------------------------------------------------------------------------------------
SHRINK = dict(embed_dim=48, depth=2, num_heads=3)                 # the same on both sides, below
# timm name -> (HF class, HF config beyond SMALL's heads/layers/width, create_model overrides, output field)
CHECKPOINTS = {
    # HF gives DINOv2-reg's class token a position row: timm's layout (no_embed_class) folds it into cls_token
    "vit_small_patch14_reg4_dinov2": ("Dinov2WithRegistersModel", dict(image_size=28, patch_size=14, mlp_ratio=4),
                                      dict(img_size=28), "last_hidden_state"),
    "vit_small_patch14_dinov2": ("Dinov2Model", dict(image_size=28, patch_size=14, mlp_ratio=4),
                                 dict(img_size=28), "last_hidden_state"),
    # DINOv2-giant's SwiGLU: HF's gate and up projections -> timm's packed fc1 (2 x 128 at this width)
    "vit_giant_patch14_dinov2": ("Dinov2Model", dict(image_size=28, patch_size=14, mlp_ratio=4, use_swiglu_ffn=True),
                                 dict(img_size=28), "last_hidden_state"),
    # CLIP's projection (no bias) becomes the head
    "vit_base_patch16_clip_quickgelu_224": ("CLIPVisionModelWithProjection",
                                            dict(patch_size=16, intermediate_size=192, projection_dim=16),
                                            dict(img_size=32, num_classes=16), "image_embeds"),
    # HF's SigLIP runs the tanh GELU where timm's runs the exact one; its packed in_proj -> the pool's q, kv
    "vit_base_patch16_siglip_224": ("SiglipVisionModel", dict(patch_size=16, intermediate_size=192),
                                    dict(img_size=32, act_layer="gelu_tanh"), "pooler_output"),
    # DINOv3: RoPE, registers, a zero key bias in the packed qkv (HF's q and v biases: qkv_bias=True)
    "vit_small_patch16_dinov3": ("DINOv3ViTModel", dict(patch_size=16, intermediate_size=192, num_register_tokens=4),
                                 dict(img_size=32, qkv_bias=True), "last_hidden_state"),
    # HF's DeiT configs keep LayerNorm eps 1e-12 where timm's use 1e-6
    "deit_tiny_distilled_patch16_224": ("DeiTForImageClassificationWithTeacher",
                                        dict(patch_size=16, intermediate_size=192, num_labels=5),
                                        dict(img_size=32, num_classes=5, norm_eps=1e-12), "logits"),
}


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_hf_checkpoint_loads_into_timm_name(name, tmp_path):
    from safetensors.torch import save_file

    cls, hf_kw, overrides, field = CHECKPOINTS[name]
    hf = hf_model(cls, **hf_kw)
    path = tmp_path / "model.safetensors"
    save_file({k: v.detach().contiguous() for k, v in hf.state_dict().items()}, str(path))
    model = vitfast.create_model(name, checkpoint_path=path, **SHRINK, **overrides).eval()
    size = hf.config.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model.forward_features(x) if field == "last_hidden_state" else model(x)
        ref = copy.deepcopy(hf).double()(x.double())
        assert_close(out, ref[field], eager=hf(x)[field], name=field)


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_float64_reference_with_hf_weights_equals_hf(name):
    """The ground truth itself: vitfast.reference in float64 with a family's HF weights equals HF's model
    in float64 to < 1e-10 (other image sizes follow each family's HF resampling rule, which HF computes in
    float32 for DINOv2: test_optimize_hf_family_other_image_size)."""
    from vitfast.configs import model_class_and_config
    from vitfast.testing import rel_err

    cls, hf_kw, overrides, field = CHECKPOINTS[name]
    hf = hf_model(cls, **hf_kw).double()
    kind, cfg = model_class_and_config(name, **SHRINK, **overrides)
    ref = (reference.VisionTransformerDistilled if kind == "distilled" else reference.VisionTransformer)(**cfg)
    load_checkpoint(ref.double().eval(), hf.state_dict())          # float64 before loading: no fp32 rounding
    size = hf.config.image_size
    x = torch.randn(2, 3, size, size, dtype=F64)
    with torch.no_grad():
        out = ref.forward_features(x) if field == "last_hidden_state" else ref(x)
        assert rel_err(out, hf(x)[field]) < 1e-10


# --------------------------------------------------------------------------------------------
# On the GPU: the Triton kernels and the CUDA graph the converted model replays by default
# --------------------------------------------------------------------------------------------
GPU = dict(image_size=64, patch_size=16, hidden_size=128, num_hidden_layers=2, num_attention_heads=2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_optimize_hf_family_on_gpu(name, dtype, no_tf32):
    """fp32 vs HF in float64 (eager call, then the captured graph's replay), and fp16 / bf16 vs HF's fp32
    output within 2x HF's own error in that dtype."""
    hf = hf_model(name, **GPU).cuda()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        ref, ref32 = hf64(x.double()), hf(x)
        for _ in range(3):                                  # eager, capture, replay
            compare(opt(x), ref, ref32)
        low = copy.deepcopy(hf).to(dtype)
        eager, out = low(x.to(dtype)), vitfast.optimize(low)(x.to(dtype))
    for key in ref32.keys():
        if torch.is_tensor(ref32[key]):
            assert out[key].dtype == dtype
            assert_close(out[key], ref32[key], dtype=dtype, eager=eager[key], tol=MODEL_TOLERANCE[dtype], name=key)
