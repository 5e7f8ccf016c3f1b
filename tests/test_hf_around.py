"""Hugging Face models that hold a supported vision model, on vitfast: CLIP's, SigLIP's and MetaCLIP 2's
two-tower models (`get_image_features`, the image-text logits, the contrastive loss) and image classifiers
(`vision_model`), DINOv2's image classifiers (`dinov2`), and vision-language models whose `vision_tower` is a
CLIP or SigLIP vision model (LLaVA, LLaVA-NeXT, LLaVA-OneVision, VipLLaVA, Aya Vision, PaliGemma, Gemma 3) or
InternViT (InternVL), and
OWL-ViT's and OWLv2's two-tower models and detectors. `vitfast.optimize(model)` is a copy of the model with
that one vision model on vitfast, its text tower / language model shared; compared in fp32 against the model in
float64, bounded by its own fp32 error."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf import HFVisionModel
from vitfast.testing import (
    MODEL_TOLERANCE,
    assert_close,
    assert_grads_match,
    perturbed,
    simulate_cuda_graphs,
    without_reference,
)

transformers = pytest.importorskip("transformers")

VISION = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=3)
TEXT = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32)
# two-tower class -> its config class
TWO_TOWER = {"CLIPModel": "CLIPConfig", "SiglipModel": "SiglipConfig", "MetaClip2Model": "MetaClip2Config",
             "OwlViTModel": "OwlViTConfig", "Owlv2Model": "Owlv2Config", "Aimv2Model": "Aimv2Config",
             "ChineseCLIPModel": "ChineseCLIPConfig", "AltCLIPModel": "AltCLIPConfig"}
# classifier -> its config (DINOv2's: the class token beside the mean of the patch tokens, after any registers)
CLASSIFIERS = {"CLIPForImageClassification": "CLIPConfig", "SiglipForImageClassification": "SiglipConfig",
               "Dinov2ForImageClassification": "Dinov2Config",
               "Dinov2WithRegistersForImageClassification": "Dinov2WithRegistersConfig"}
IMAGE_TOKEN = 98           # the VLMs' image placeholder token (the last of TEXT's vocabulary)


def two_tower(name: str):
    projection = {} if name == "SiglipModel" else dict(projection_dim=16)
    text = dict(TEXT, eos_token_id=2) if name == "Aimv2Model" else TEXT       # AIMv2 pools the text at its eos
    cfg = getattr(transformers, TWO_TOWER[name])(text_config=text, vision_config=VISION, **projection)
    return perturbed(getattr(transformers, name)(cfg))


def classifier(name: str):
    config_cls = getattr(transformers, CLASSIFIERS[name])
    if name.startswith("Dinov2"):
        vision = {k: v for k, v in VISION.items() if k != "intermediate_size"}
        cfg = config_cls(**vision, mlp_ratio=2, num_labels=5, **({"num_register_tokens": 2} if "Registers" in name
                                                                   else {}))
    else:
        cfg = config_cls(text_config=TEXT, vision_config=VISION, num_labels=5)
    return perturbed(getattr(transformers, name)(cfg))


def vlm(name: str):
    """A tiny LLaVA (CLIP tower, features of the second-to-last layer without the class token), PaliGemma or
    Gemma 3 (SigLIP tower, its last hidden state; Gemma 3 pools it to 2 x 2 tokens) with a Llama / Gemma language
    model -> (the model, how many image tokens a prompt holds per image)."""
    lm = dict(TEXT, num_key_value_heads=2, head_dim=8, pad_token_id=0)
    n_patches = (VISION["image_size"] // VISION["patch_size"]) ** 2
    if name == "LlavaForConditionalGeneration":
        cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**VISION),
                                       text_config=transformers.LlamaConfig(**lm), image_token_index=IMAGE_TOKEN,
                                       image_seq_length=n_patches, vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    elif name == "PaliGemmaForConditionalGeneration":
        cfg = transformers.PaliGemmaConfig(vision_config=transformers.SiglipVisionConfig(**VISION),
                                           text_config=transformers.GemmaConfig(**lm), image_token_index=IMAGE_TOKEN,
                                           projection_dim=TEXT["hidden_size"])
        cfg.text_config.num_image_tokens = n_patches
    else:
        n_patches = 4
        cfg = transformers.Gemma3Config(vision_config=transformers.SiglipVisionConfig(**VISION),
                                        text_config=transformers.Gemma3TextConfig(**lm, sliding_window=8),
                                        mm_tokens_per_image=n_patches, image_token_index=IMAGE_TOKEN,
                                        boi_token_index=IMAGE_TOKEN - 2, eoi_token_index=IMAGE_TOKEN - 1)
    return perturbed(getattr(transformers, name)(cfg)), n_patches


def image_embeds(out):
    """get_image_features' result: the projected embeddings (a tensor before transformers 5.x's output object)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def assert_shares_all_but_the_vision_model(opt, model, path: str) -> None:
    """opt is a copy of model (and of each module on `path`) whose module at `path` is vitfast's: every other
    child of those modules is model's own, model keeps HF's vision model, and opt holds only model's tensors."""
    assert type(opt) is type(model) and opt is not model
    assert type(model.get_submodule(path)).__module__.startswith("transformers.")
    assert isinstance(opt.get_submodule(path), HFVisionModel)
    parts = path.split(".")
    for depth, step in enumerate(parts):
        prefix = ".".join(parts[:depth])
        ours, theirs = opt.get_submodule(prefix), model.get_submodule(prefix)
        assert ours is not theirs
        for name, m in theirs.named_children():
            if name != step:
                assert getattr(ours, name) is m, f"{prefix}.{name}"
    assert {id(p) for p in opt.parameters()} <= {id(p) for p in model.parameters()}


@pytest.mark.parametrize("name", sorted(TWO_TOWER))
def test_two_tower_models_equal_hf(name):
    """get_image_features, and the forward's image-text logits, embeddings and vision outputs."""
    model = two_tower(name)
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert_shares_all_but_the_vision_model(opt, model, "vision_model")
    assert opt.text_model is model.text_model and opt.logit_scale is model.logit_scale
    x = torch.randn(3, 3, 32, 32)
    ids = torch.randint(1, TEXT["vocab_size"], (2, 7))
    with torch.no_grad():
        assert_close(image_embeds(opt.get_image_features(x)), image_embeds(model64.get_image_features(x.double())),
                     eager=image_embeds(model.get_image_features(x)), name="get_image_features")
        out, ref, eager = (m(input_ids=ids, pixel_values=xi) for m, xi in ((opt, x), (model64, x.double()),
                                                                             (model, x)))
        for key in ("logits_per_image", "image_embeds"):
            assert_close(out[key], ref[key], eager=eager[key], name=key)
        assert torch.equal(out.text_embeds, eager.text_embeds)                  # the text tower is HF's own
        for key in ("last_hidden_state", "pooler_output"):
            assert_close(out.vision_model_output[key], ref.vision_model_output[key],
                         eager=eager.vision_model_output[key], name=f"vision_model_output.{key}")


def test_two_tower_model_trains_hf_vision_tensors():
    """The contrastive loss through the optimized CLIPModel gives HF's float64 gradient to every parameter."""
    model = two_tower("CLIPModel").train()
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    x, ids = torch.randn(2, 3, 32, 32), torch.randint(1, TEXT["vocab_size"], (2, 7))
    loss = opt(input_ids=ids, pixel_values=x, return_loss=True).loss
    with without_reference():
        loss.backward()
    model64(input_ids=ids, pixel_values=x.double(), return_loss=True).loss.backward()
    for (n, p), (_, p64) in zip(model.named_parameters(), model64.named_parameters()):
        if p64.grad is None:
            assert p.grad is None, n
        elif p64.grad.norm() < 1e-9 * max(1.0, p64.norm().item()):     # k's bias: the exact gradient is 0
            assert p.grad.norm() < 1e-4, n
        else:
            assert_close(p.grad, p64.grad, name=f"grad {n}")


def test_vision_text_dual_encoder_equals_hf_and_trains():
    """VisionTextDualEncoderModel (a pretrained ViT and BERT joined into a CLIP-style model to train): a copy with its
    `vision_model` on vitfast, the text model and projections shared; logits_per_image as HF's, and the contrastive
    loss gives every parameter HF's float64 gradient (the text tower's dropout off: random)."""
    vision = transformers.ViTConfig(**VISION)
    text = transformers.BertConfig(**TEXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    torch.manual_seed(0)
    model = perturbed(transformers.VisionTextDualEncoderModel(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert_shares_all_but_the_vision_model(opt, model, "vision_model")
    x, ids = torch.randn(3, 3, 32, 32), torch.randint(1, TEXT["vocab_size"], (3, 7))
    with torch.no_grad():
        out, ref, eager = (m(input_ids=ids, pixel_values=xi) for m, xi in ((opt, x), (model64, x.double()),
                                                                             (model, x)))
    assert_close(out.logits_per_image, ref.logits_per_image, eager=eager.logits_per_image, name="logits_per_image")
    for m in (model, model64, opt):
        m.train()
    model64(input_ids=ids, pixel_values=x.double(), return_loss=True).loss.backward()
    loss = opt(input_ids=ids, pixel_values=x, return_loss=True).loss
    with without_reference():
        loss.backward()
    assert_grads_match(model, model64)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_image_classifiers_equal_hf(name):
    """CLIP's (mean of the patch tokens), SigLIP's (mean of every token) and DINOv2's (the class token and the
    mean of the patch tokens) classifier heads on vitfast's vision model, with the loss for labels."""
    model = classifier(name)
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert_shares_all_but_the_vision_model(opt, model, model.base_model_prefix if name.startswith("Dinov2")
                                           else "vision_model")
    x, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    with torch.no_grad():
        out, ref, eager = (m(xi, labels=labels) for m, xi in ((opt, x), (model64, x.double()), (model, x)))
    assert_close(out.logits, ref.logits, eager=eager.logits, name="logits")
    assert_close(out.loss, ref.loss, eager=eager.loss, name="loss")


@pytest.mark.parametrize("name", ["LlavaForConditionalGeneration", "PaliGemmaForConditionalGeneration",
                                  "Gemma3ForConditionalGeneration"])
def test_vision_language_models_equal_hf(name):
    """The VLM's logits over a prompt with an image, and its image features (LLaVA: the second-to-last hidden
    state of the CLIP tower; PaliGemma, Gemma 3: the SigLIP tower's last hidden state), with the vision tower on
    vitfast."""
    model, n_patches = vlm(name)
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert_shares_all_but_the_vision_model(opt, model, "model.vision_tower")
    x = torch.randn(2, 3, 32, 32)
    image = IMAGE_TOKEN * torch.ones(2, n_patches, dtype=torch.long)
    ids = torch.cat([torch.tensor([[2], [2]]), image, torch.randint(3, IMAGE_TOKEN - 2, (2, 5))], dim=1)
    with torch.no_grad():
        out, ref, eager = (m(input_ids=ids, pixel_values=xi).logits
                           for m, xi in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        feats = [torch.cat(list(image_embeds(m.get_image_features(pixel_values=xi))))
                 for m, xi in ((opt, x), (model64, x.double()), (model, x))]
        assert_close(*feats[:2], eager=feats[2], name="get_image_features")
        # generate() calls the vision tower as HF's does; greedy decoding picks HF's tokens
        kw = dict(input_ids=ids, pixel_values=x, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        if name.startswith("PaliGemma"):
            kw["token_type_ids"] = torch.zeros_like(ids)                  # the whole prompt is prefix
        assert torch.equal(opt.generate(**kw), model.generate(**kw))


@pytest.mark.parametrize("name", ["OwlViTForObjectDetection", "Owlv2ForObjectDetection"])
def test_open_vocabulary_detectors_equal_hf(name):
    """OWL-ViT's and OWLv2's detectors (`owlvit` / `owlv2`: a two-tower model whose vision model's post_layernorm
    they apply to every token themselves) with the vision model on vitfast: class logits and boxes for text
    queries (and OWLv2's objectness), at the config's image size and another (interpolate_pos_encoding), and
    image-guided detection."""
    cfg = getattr(transformers, name.replace("ForObjectDetection", "Config"))(
        text_config=dict(TEXT, bos_token_id=0, eos_token_id=2), vision_config=VISION, projection_dim=48)
    model = perturbed(getattr(transformers, name)(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    base = name[:-len("ForObjectDetection")].lower()
    assert_shares_all_but_the_vision_model(opt, model, f"{base}.vision_model")
    ids = torch.randint(3, TEXT["vocab_size"], (4, 7))                 # two text queries per image
    keys = ["logits", "pred_boxes"] + (["objectness_logits"] if name.startswith("Owlv2") else [])
    with torch.no_grad():
        for size, kw in (((32, 32), {}), ((48, 40), dict(interpolate_pos_encoding=True))):
            x = torch.randn(2, 3, *size)
            out, ref, eager = (m(input_ids=ids, pixel_values=xi, **kw) for m, xi in ((opt, x), (model64, x.double()),
                                                                                   (model, x)))
            for key in keys:
                assert_close(out[key], ref[key], eager=eager[key], name=f"{key} at {size}")
        x, query = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
        out, ref, eager = (m.image_guided_detection(pixel_values=xi, query_pixel_values=qi)
                           for m, xi, qi in ((opt, x, query), (model64, x.double(), query.double()), (model, x, query)))
        for key in ("logits", "target_pred_boxes"):
            assert_close(out[key], ref[key], eager=eager[key], name=f"image-guided {key}")


# VLMs whose vision tower is HF's CLIP or SigLIP vision model too: LLaVA-NeXT and LLaVA-OneVision (any-resolution
# tiles of each image, 5-D pixel_values with image_sizes), Aya Vision (pixel shuffle), VipLLaVA (several layers)
MORE_VLMS = {"LlavaNextForConditionalGeneration": ("CLIPVisionConfig", dict(image_grid_pinpoints=[[32, 32], [32, 64],
                                                                                                  [64, 32]])),
             "LlavaOnevisionForConditionalGeneration": ("SiglipVisionConfig", dict(image_grid_pinpoints=[[32, 32],
                                                                                                        [32, 64],
                                                                                                        [64, 32]])),
             "AyaVisionForConditionalGeneration": ("SiglipVisionConfig", dict(downsample_factor=2)),
             "VipLlavaForConditionalGeneration": ("CLIPVisionConfig", dict(vision_feature_layers=[-2, -1, 1])),
             # InternVL 2.5 / 3 / 3.5: InternViT, its class token dropped, pixel shuffle to a quarter of the tokens
             "InternVLForConditionalGeneration": ("InternVLVisionConfig", dict(image_token_id=IMAGE_TOKEN)),
             # Command A Vision: SigLIP, pixel shuffle, a SwiGLU projector; DeepSeek-VL: SigLIP as `vision_model`
             "Cohere2VisionForConditionalGeneration": ("SiglipVisionConfig", dict(
                 image_token_id=IMAGE_TOKEN, downsample_factor=2, alignment_intermediate_size=64)),
             "DeepseekVLForConditionalGeneration": ("SiglipVisionConfig", dict(image_token_id=IMAGE_TOKEN))}


@pytest.mark.parametrize("name", sorted(MORE_VLMS))
def test_more_vision_language_models_equal_hf(name):
    """LLaVA-NeXT, LLaVA-OneVision, Aya Vision, VipLLaVA, InternVL, Command A Vision and DeepSeek-VL with the vision
    tower on vitfast: logits over a prompt with an image per row (as many image tokens as HF's own image features have
    rows), image features, greedy generate."""
    vision_cls, kw = MORE_VLMS[name]
    text_cls = {"Aya": transformers.CohereConfig, "Int": transformers.Qwen2Config,
                "Coh": transformers.Cohere2Config}.get(name[:3], transformers.LlamaConfig)
    cfg = getattr(transformers, name.replace("ForConditionalGeneration", "Config"))(
        vision_config=getattr(transformers, vision_cls)(**VISION),
        text_config=text_cls(**TEXT, num_key_value_heads=2, head_dim=8, pad_token_id=0),
        **({} if "image_token_id" in kw else dict(image_token_index=IMAGE_TOKEN)), **kw)
    model = perturbed(getattr(transformers, name)(cfg))
    model64 = copy.deepcopy(model).double()
    if "image_grid_pinpoints" in kw:                  # two images: a 32 x 64 and a 64 x 32 one, three tiles each
        x, extra = torch.randn(2, 3, 3, 32, 32), dict(image_sizes=torch.tensor([[32, 64], [64, 32]]))
    else:
        x, extra = torch.randn(2, 3, 32, 32), {}

    def features(m, xi):                    # (DeepSeek-VL has them on its inner model only)
        get = getattr(m, "get_image_features", None) or m.model.get_image_features
        out = image_embeds(get(pixel_values=xi, **extra))
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in (out if isinstance(out, (list, tuple)) else [out])])

    with torch.no_grad():
        n_tokens = features(model, x).shape[0] // 2
    opt = vitfast.optimize(model)
    assert_shares_all_but_the_vision_model(opt, model, "model.vision_model" if name.startswith("Deepseek")
                                           else "model.vision_tower")
    ids = torch.cat([torch.tensor([[2], [2]]), torch.full((2, n_tokens), IMAGE_TOKEN),
                     torch.randint(3, IMAGE_TOKEN - 2, (2, 5))], dim=1)
    with torch.no_grad():
        out, ref, eager = (m(input_ids=ids, pixel_values=xi, **extra).logits
                           for m, xi in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        feats = [features(m, xi) for m, xi in ((opt, x), (model64, x.double()), (model, x))]
        assert_close(*feats[:2], eager=feats[2], name="get_image_features")
        kw = dict(input_ids=ids, pixel_values=x, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                  do_sample=False, **extra)
        assert torch.equal(opt.generate(**kw), model.generate(**kw))


def test_depth_pro_optimizes_its_three_vision_transformers():
    """Depth Pro (Apple's metric depth: a DINOv2 over overlapping patches at three scales, one over the whole image,
    one for the field of view): a copy with the three on vitfast, its fusion and heads shared; the depth map and the
    field-of-view encoder's features as HF's. The field of view itself (a scalar per image after strided convolutions
    and ReLUs) amplifies either model's rounding, so it is held to the fp32 ceiling only."""
    dinov2 = dict(model_type="dinov2", hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, patch_size=4, image_size=16)
    cfg = transformers.DepthProConfig(patch_size=16, fusion_hidden_size=16, intermediate_hook_ids=[3, 1],
                                      intermediate_feature_dims=[16, 16], scaled_images_feature_dims=[32, 32, 16],
                                      use_fov_model=True, image_model_config=dinov2, patch_model_config=dinov2,
                                      fov_model_config=dinov2)
    torch.manual_seed(0)
    model = perturbed(transformers.DepthProForDepthEstimation(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    encoder = opt.depth_pro.encoder
    for tower in (encoder.patch_encoder.model, encoder.image_encoder.model, opt.fov_model.fov_encoder.model):
        assert isinstance(tower, HFVisionModel)
    assert opt.head is model.head and opt.fov_model.head is model.fov_model.head
    x = torch.randn(1, 3, 64, 64)                           # 3 scales: 1 + 9 + 25 overlapping patches of 16 px
    with torch.no_grad():
        out, ref, eager = (m(px) for m, px in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out.predicted_depth, ref.predicted_depth, eager=eager.predicted_depth, name="predicted_depth")
        assert_close(out.field_of_view, ref.field_of_view, tol=1e-4, name="field_of_view")
        feats = [m.fov_model.fov_encoder(px) for m, px in ((opt, x), (model64, x.double()), (model, x))]
        assert_close(feats[0], feats[1], eager=feats[2], name="field-of-view features")


def test_vision_encoder_decoder_optimizes_its_encoder():
    """VisionEncoderDecoderModel (TrOCR, ViT-GPT2 captioning: a ViT / DeiT `encoder`, a text `decoder` with
    cross-attention): a copy with the encoder on vitfast, the decoder shared; logits and greedy `generate` as HF's."""
    vit = transformers.ViTConfig(**VISION)
    gpt2 = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, add_cross_attention=True,
                                   is_decoder=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt2)
    cfg.decoder_start_token_id, cfg.pad_token_id = 1, 0
    torch.manual_seed(0)
    model = perturbed(transformers.VisionEncoderDecoderModel(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.encoder, HFVisionModel) and opt.decoder is model.decoder
    x, ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 6], [1, 7, 8]])
    with torch.no_grad():
        out, ref, eager = (m(pixel_values=px, decoder_input_ids=ids).logits
                           for m, px in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        kw = dict(max_new_tokens=5, do_sample=False)
        assert torch.equal(opt.generate(x, **kw), model.generate(x, **kw))


@pytest.mark.parametrize("name", ["ViTForMaskedImageModeling", "DeiTForMaskedImageModeling"])
def test_masked_image_modeling_optimizes_its_vit(name):
    """ViTForMaskedImageModeling and DeiTForMaskedImageModeling (SimMIM: a ViTModel / DeiTModel with a mask token as
    their `vit` / `deit`, a conv decoder): a copy with the ViT on vitfast, the decoder shared; with bool_masked_pos the
    reconstruction and loss as HF's, and the loss's backward gives every parameter, the mask token's too, HF's float64
    gradient."""
    torch.manual_seed(0)
    config = getattr(transformers, name.replace("ForMaskedImageModeling", "Config"))(**VISION, encoder_stride=8)
    model = perturbed(getattr(transformers, name)(config))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    inner = "vit" if name.startswith("ViT") else "deit"
    assert isinstance(getattr(opt, inner), HFVisionModel) and opt.decoder is model.decoder
    x, masked = torch.randn(2, 3, 32, 32), torch.rand(2, 16) > 0.5
    with torch.no_grad():
        out, ref, eager = (m(px, bool_masked_pos=masked) for m, px in ((opt, x), (model64, x.double()), (model, x)))
    for key in ("reconstruction", "loss"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    for m in (model, model64, opt):
        m.train()
    model64(x.double(), bool_masked_pos=masked).loss.backward()
    loss = opt(x, bool_masked_pos=masked).loss
    with without_reference():
        loss.backward()
    assert_grads_match(model, model64)


def test_models_around_an_unsupported_vision_model_are_refused_by_name():
    cfg = transformers.XCLIPConfig(text_config=TEXT, vision_config=VISION)
    with pytest.raises(UnsupportedFeatureError,
                       match=r"XCLIPModel holding XCLIPVisionModel \(vision_model\)"):
        vitfast.optimize(transformers.XCLIPModel(cfg))


def test_get_image_features_replays_the_vision_models_graph():
    """With CUDA graphs (simulated on the CPU: outputs in fixed buffers that each replay overwrites): the vision
    model's graph is captured once and replayed, and HF's get_image_features, which sets the projected embeddings
    on the output object it gets, gets a new one each call: results handed out stay as they were."""
    model = two_tower("CLIPModel")
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    runner = opt.vision_model.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    xs = [torch.randn(2, 3, 32, 32) for _ in range(4)]
    with torch.no_grad():
        outs = [opt.get_image_features(x) for x in xs]                 # eager, capture, replay, replay
        for x, out in zip(xs, outs):
            ref, eager = model64.get_image_features(x.double()), model.get_image_features(x)
            assert_close(image_embeds(out), image_embeds(ref), eager=image_embeds(eager), name="get_image_features")
            if not isinstance(out, torch.Tensor):                     # transformers 5.x: the vision model's outputs
                assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state,
                             name="last_hidden_state")
    assert runner.captures == 1


@pytest.mark.gpu
def test_two_tower_model_replays_on_cuda(no_tf32):
    """get_image_features on CUDA: eager, capture, replays, each equal to HF; a result handed out is not
    overwritten by a later replay."""
    model = two_tower("CLIPModel").cuda()
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    xs = [torch.randn(4, 3, 32, 32, device="cuda") for _ in range(4)]
    with torch.no_grad():
        outs = [image_embeds(opt.get_image_features(x)) for x in xs]
        for x, out in zip(xs, outs):
            assert_close(out, image_embeds(model64.get_image_features(x.double())),
                         eager=image_embeds(model.get_image_features(x)), name="get_image_features")
    assert opt.vision_model.cuda_graphs.captures == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["SiglipModel", "LlavaForConditionalGeneration", "PaliGemmaForConditionalGeneration"])
def test_models_around_a_vision_model_in_half_precision_on_cuda(name, dtype, no_tf32):
    """The model in fp16 / bf16 with its vision model on vitfast's kernels (eager, then its CUDA graph's replays)
    against the model in fp32, within 2x the error of the model itself in that dtype: SigLIP's image embeddings,
    the VLMs' logits over a prompt with an image."""
    if name == "SiglipModel":
        model, n_tokens = two_tower(name), 0
        run = lambda m, x: image_embeds(m.get_image_features(x))                           # noqa: E731
    else:
        model, n_tokens = vlm(name)
        image = IMAGE_TOKEN * torch.ones(2, n_tokens, dtype=torch.long)
        ids = torch.cat([torch.tensor([[2], [2]]), image, torch.randint(3, IMAGE_TOKEN - 2, (2, 5))], dim=1).cuda()
        run = lambda m, x: m(input_ids=ids, pixel_values=x).logits                          # noqa: E731
    model = model.cuda()
    low = copy.deepcopy(model).to(dtype)
    opt = vitfast.optimize(low)
    x = torch.randn(2, 3, 32, 32, device="cuda")
    with torch.no_grad():
        ref, eager = run(model, x), run(low, x.to(dtype))
        for _ in range(3):                                                                   # eager, capture, replay
            out = run(opt, x.to(dtype))
            assert out.dtype == dtype
            assert_close(out, ref, dtype=dtype, eager=eager, tol=MODEL_TOLERANCE[dtype], name=name)
    vision = opt.vision_model if name == "SiglipModel" else opt.model.vision_tower
    assert vision.cuda_graphs.captures == 1


def test_git_captioner_optimizes_its_image_encoder():
    """GitForCausalLM (GIT, Microsoft's image-to-text model: captioning, VQA): a copy with its CLIP `image_encoder`
    (post_layernorm on every token) on vitfast, the text decoder and projection shared; logits and greedy `generate`
    as HF's."""
    vision = dict(VISION, intermediate_size=96)
    cfg = transformers.GitConfig(vision_config=vision, vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = perturbed(transformers.GitForCausalLM(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.git.image_encoder, HFVisionModel) and opt.git.encoder is model.git.encoder
    x, ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 6], [1, 7, 8]])
    with torch.no_grad():
        out, ref, eager = (m(input_ids=ids, pixel_values=px).logits
                           for m, px in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        kw = dict(max_new_tokens=5, do_sample=False)
        assert torch.equal(opt.generate(pixel_values=x, **kw), model.generate(pixel_values=x, **kw))


def test_kosmos2_optimizes_its_vision_transformer():
    """Kosmos2ForConditionalGeneration (Kosmos-2, grounded captioning): a copy whose Kosmos2VisionModel holds its CLIP
    vision transformer on vitfast (`vision_model.model`, whose post_layernorm Kosmos-2 applies to every token itself),
    the text model and the image-to-text projection shared; logits and image embeddings as HF's, and greedy
    `generate` (which passes its generation arguments on to the vision model, as HF's ignores them) too."""
    vision = dict(VISION, intermediate_size=96)
    text = dict(vocab_size=60, embed_dim=32, layers=2, attention_heads=2, ffn_dim=64, max_position_embeddings=64)
    cfg = transformers.Kosmos2Config(vision_config=vision, text_config=text, latent_query_num=4)
    torch.manual_seed(0)
    model = perturbed(transformers.Kosmos2ForConditionalGeneration(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.vision_model.model, HFVisionModel) and opt.text_model is model.text_model
    x = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 10], [0, 11, 12, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0, 0]] * 2)          # where the 4 image tokens go
    with torch.no_grad():
        out, eager = (m(pixel_values=x, input_ids=ids, image_embeds_position_mask=mask) for m in (opt, model))
        torch.set_default_dtype(torch.float64)                   # HF's causal mask is made in the default dtype
        try:
            ref = model64(pixel_values=x.double(), input_ids=ids, image_embeds_position_mask=mask)
        finally:
            torch.set_default_dtype(torch.float32)
        assert_close(out.logits, ref.logits, eager=eager.logits, name="logits")
        embeds = lambda o: o.image_outputs.pooler_output if "image_outputs" in o else o.image_embeds  # 5.2x / 5.1x
        assert_close(embeds(out), embeds(ref), eager=embeds(eager), name="image embeddings")
        kw = dict(pixel_values=x, input_ids=ids, image_embeds_position_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(opt.generate(**kw), model.generate(**kw))
