"""Idefics3's, SmolVLM's and Idefics2's vision model on vitfast: transformers' `Idefics3VisionTransformer` /
`SmolVLMVisionTransformer` / `Idefics2VisionTransformer` (SigLIP with images padded to one size, a patch mask and
each image's positions spread over the whole table), and the VLMs around it. Compared in fp32 against HF in float64,
bounded by HF's own fp32 error; the padding is transparent; gradients reach HF's tensors; the forward has no host
synchronisation."""

import copy
import importlib

import pytest
import torch

import vitfast
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf import HFIdefics3VisionTransformer
from vitfast.testing import (
    MODEL_TOLERANCE,
    assert_close,
    assert_tower_on_gpu,
    hf_exact_attention,
    perturbed,
    simulate_cuda_graphs,
    without_reference,
)

transformers = pytest.importorskip("transformers")

F64 = torch.float64
# a 7 x 7 position table (28 / 4: not a power of two, so HF's buckets are not an arange of the grid)
VISION = dict(image_size=28, patch_size=4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=3)
TEXT = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, num_key_value_heads=2, head_dim=8, pad_token_id=0)
FAMILIES = ["Idefics3", "SmolVLM", "Idefics2"]
# a batch padded to 32 x 28 pixels (8 x 7 patches): each image's own grid of patches, top-left
GRIDS = [(8, 7), (5, 7), (8, 3), (2, 2)]


def vision_model(family: str, **kw):
    module = importlib.import_module(f"transformers.models.{family.lower()}.modeling_{family.lower()}")
    cfg = getattr(transformers, f"{family}VisionConfig")(**{**VISION, **kw})
    return perturbed(getattr(module, f"{family}VisionTransformer")(cfg))


def padded_batch(grids=GRIDS, size=(8, 7), patch=4):
    """(pixel_values [B, 3, H, W] with zeros past each image, patch_attention_mask [B, h, w] bool)."""
    x = torch.zeros(len(grids), 3, size[0] * patch, size[1] * patch)
    mask = torch.zeros(len(grids), *size, dtype=torch.bool)
    for i, (h, w) in enumerate(grids):
        x[i, :, :h * patch, :w * patch] = torch.randn(3, h * patch, w * patch)
        mask[i, :h, :w] = True
    return x, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_transformer_equals_hf(family):
    hf = vision_model(family)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFIdefics3VisionTransformer)
    x, mask = padded_batch()
    with torch.no_grad():
        for m in (mask, None):
            out, ref, eager = (model(pixel_values=xi, patch_attention_mask=m, output_hidden_states=True)
                               for model, xi in ((opt, x), (hf64, x.double()), (hf, x)))
            assert set(out.keys()) == set(ref.keys())
            assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state,
                         name=f"last_hidden_state (mask {m is not None})")
            assert len(out.hidden_states) == len(ref.hidden_states)
            for i, (o, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
                assert_close(o, r, eager=e, name=f"hidden_states[{i}]")
        square = torch.randn(2, 3, 28, 28)                       # the table's own size, no mask
        assert_close(opt(square).last_hidden_state, hf64(square.double()).last_hidden_state,
                     eager=hf(square).last_hidden_state, name="28 x 28")


def test_padding_is_transparent():
    """Each image alone, cropped to its own patches and without a mask, gives the rows of its patches in the padded
    batch (its positions spread over the table alike; the padding keys masked in every attention)."""
    opt = vitfast.optimize(vision_model("Idefics3"))
    x, mask = padded_batch()
    with torch.no_grad():
        batch = opt(x, patch_attention_mask=mask).last_hidden_state.view(len(GRIDS), 8, 7, -1)
        for i, (h, w) in enumerate(GRIDS):
            alone = opt(x[i:i + 1, :, :h * 4, :w * 4]).last_hidden_state.view(h, w, -1)
            torch.testing.assert_close(batch[i, :h, :w], alone, rtol=1e-5, atol=1e-5)
        unmasked = opt(x).last_hidden_state.view(len(GRIDS), 8, 7, -1)
    assert (unmasked[1, :5] - batch[1, :5]).abs().max() > 1e-3                   # the mask matters here


def test_trains_hf_tensors():
    hf = vision_model("SmolVLM").train()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x, mask = padded_batch()
    w = torch.randn(len(GRIDS), 56, 48, dtype=F64) * mask.view(len(GRIDS), 56, 1)
    out = opt(x, patch_attention_mask=mask).last_hidden_state
    with without_reference():
        (out * w.float()).sum().backward()
    (hf64(x.double(), patch_attention_mask=mask).last_hidden_state * w).sum().backward()
    for (name, p), (_, p64) in zip(hf.named_parameters(), hf64.named_parameters()):
        assert p.grad is not None, name
        if p64.grad.norm() < 1e-9 * max(1.0, p64.norm().item()):   # k's bias, unused table rows: exactly 0
            assert p.grad.norm() < 1e-4, name
        else:
            assert_close(p.grad, p64.grad, name=f"grad {name}")


def test_forward_has_no_host_sync_and_replays_with_masks_as_data():
    opt = vitfast.optimize(vision_model("Idefics3"), cuda_graphs=False)
    fn = torch.compile(lambda x, m: opt(x, patch_attention_mask=m).last_hidden_state, fullgraph=True,
                       backend="eager", dynamic=False)
    batches = [padded_batch(g) for g in (GRIDS, [(3, 3), (8, 7), (6, 5), (1, 7)])]
    with torch.no_grad():
        for x, mask in batches:
            torch.testing.assert_close(fn(x, mask), opt(x, patch_attention_mask=mask).last_hidden_state,
                                       rtol=1e-5, atol=1e-5)
    hf = vision_model("Idefics3")
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    with torch.no_grad():
        for x, mask in batches + batches[:1]:                          # eager, capture, replay
            out, ref, eager = (m(xi, patch_attention_mask=mask).last_hidden_state
                               for m, xi in ((opt, x), (hf64, x.double()), (hf, x)))
            assert_close(out, ref, eager=eager, name="last_hidden_state")
    assert runner.captures == 1


@pytest.mark.parametrize("family", ["SmolVLM"])
def test_vision_language_model_equals_hf(family):
    """SmolVLM with the vision model on vitfast: logits over a prompt with two images per row (one of them padded),
    image features and greedy generate as HF's. Idefics3ForConditionalGeneration, the same model class around the
    same tower (whose tests above cover both families), is left out to keep `make test` in its time."""
    cfg = getattr(transformers, f"{family}Config")(vision_config=dict(VISION, image_size=32), text_config=TEXT,
                                                    image_token_id=98, scale_factor=2)
    model = perturbed(getattr(transformers, f"{family}ForConditionalGeneration")(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.vision_model, HFIdefics3VisionTransformer)
    assert opt.model.text_model is model.model.text_model and opt.lm_head is model.lm_head
    x = torch.randn(2, 2, 3, 32, 32)
    pixel_mask = torch.ones(2, 2, 32, 32, dtype=torch.long)
    pixel_mask[1, 1, :, 20:], x[1, 1, :, :, 20:] = 0, 0                  # the last image 32 x 20, padded

    def features(m, xi):
        out = m.model.get_image_features(pixel_values=xi, pixel_attention_mask=pixel_mask)
        out = out if isinstance(out, (torch.Tensor, list, tuple)) else out.pooler_output
        return torch.cat([f.reshape(-1, f.shape[-1]) for f in (out if isinstance(out, (list, tuple)) else [out])])

    with torch.no_grad():
        feats = [features(m, xi) for m, xi in ((opt, x), (model64, x.double()), (model, x))]
        assert_close(*feats[:2], eager=feats[2], name="get_image_features")
        ids = torch.cat([torch.tensor([[2], [2]]), torch.full((2, feats[0].shape[0] // 2), 98),
                         torch.randint(3, 90, (2, 5))], dim=1)
        out, ref, eager = (m(input_ids=ids, pixel_values=xi, pixel_attention_mask=pixel_mask).logits
                           for m, xi in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        kw = dict(input_ids=ids, pixel_values=x, pixel_attention_mask=pixel_mask, attention_mask=torch.ones_like(ids),
                  max_new_tokens=4, do_sample=False)
        assert torch.equal(opt.generate(**kw), model.generate(**kw))


def test_bad_patch_mask_is_named():
    opt = vitfast.optimize(vision_model("Idefics3"))
    x, mask = padded_batch()
    with pytest.raises(ValueError, match=r"patch_attention_mask: expected \[4, 8, 7\] .* got \(4, 56\)"):
        opt(x, patch_attention_mask=mask.view(4, 56))


def trained_scale(model):
    """`model` with its projection matrices redrawn at std 0.02: HF's init of Phi-4's SigLIP draws q / k / v, the
    MLP and the pooling head's in_proj with std 1 (a saturated softmax; HF's own fp32 error near the 1e-5 bound)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embedding" not in name and "embed_tokens" not in name:
                p.normal_(0, 0.02)
    return model


def phi4_vision_model():
    module = pytest.importorskip("transformers.models.phi4_multimodal.modeling_phi4_multimodal")
    torch.manual_seed(0)
    return perturbed(trained_scale(module.Phi4MultimodalVisionModel(transformers.Phi4MultimodalVisionConfig(**VISION))))


def test_phi4_vision_model_equals_hf():
    """Phi-4-multimodal's SigLIP (`Phi4MultimodalVisionModel`): Idefics3's patch mask and positions with SigLIP's
    attention-pooling head, which skips the padding keys too: last_hidden_state, pooler_output and every hidden state
    as HF's, padded and not. Bidirectional attention: the float64 twin runs HF's SDPA path without its is_causal
    (which HF applies to a batch without padding), the fp32 bound HF's eager attention (bidirectional)."""
    hf = phi4_vision_model()
    hf.set_attn_implementation("eager")
    hf64 = copy.deepcopy(hf).double()
    hf64.set_attn_implementation(hf_exact_attention())
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFIdefics3VisionTransformer) and opt.embeddings is hf.embeddings
    x, mask = padded_batch()
    with torch.no_grad():
        for m in (mask, None):
            out, ref, eager = (model(xi, patch_attention_mask=m, output_hidden_states=True)
                               for model, xi in ((opt, x), (hf64, x.double()), (hf, x)))
            for key in ("last_hidden_state", "pooler_output"):
                assert_close(out[key], ref[key], eager=eager[key], name=f"{key} (mask {m is not None})")
            assert len(out.hidden_states) == len(ref.hidden_states) == 3
            for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
                assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_phi4_multimodal_optimizes_its_nested_vision_model():
    """Phi4MultimodalForCausalLM keeps its SigLIP at model.embed_tokens_extend.image_embed.img_processor: a copy with
    that one on vitfast (the language model, the audio encoder and the image projections shared); the image features
    its get_img_features makes from a hidden state of the tower (feature_layer -2), crops padded and not, as HF's."""
    pytest.importorskip("transformers.models.phi4_multimodal.modeling_phi4_multimodal")
    audio = dict(hidden_size=32, intermediate_size=64, num_blocks=1, num_attention_heads=2, nemo_conv_channels=16,
                 depthwise_seperable_out_channel=32, ext_pw_out_channel=32, input_size=16, nemo_final_size=4)
    cfg = transformers.Phi4MultimodalConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2, audio_config=audio,
                                            vision_config=dict(VISION, crop_size=28, feature_layer=-2))
    torch.manual_seed(0)
    model = perturbed(trained_scale(transformers.Phi4MultimodalForCausalLM(cfg)))
    image = model.model.embed_tokens_extend.image_embed
    image.img_processor.set_attn_implementation("eager")
    model64 = copy.deepcopy(model).double()
    model64.model.embed_tokens_extend.image_embed.img_processor.set_attn_implementation(hf_exact_attention())
    opt = vitfast.optimize(model)
    got = opt.model.embed_tokens_extend.image_embed
    assert isinstance(got.img_processor, HFIdefics3VisionTransformer) and got.img_projection_up is \
        image.img_projection_up and opt.model.layers is model.model.layers
    assert opt.model.embed_tokens_extend.audio_embed is model.model.embed_tokens_extend.audio_embed
    x, mask = torch.randn(3, 3, 28, 28), torch.ones(3, 7, 7, dtype=torch.bool)
    mask[2, :, 5:] = False
    with torch.no_grad():
        out, ref, eager = (m.model.embed_tokens_extend.image_embed.get_img_features(xi, attention_mask=mask)
                           for m, xi in ((opt, x), (model64, x.double()), (model, x)))
    assert out.shape == ref.shape == (3, 16, 48)
    assert_close(out, ref, eager=eager, name="get_img_features")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_transformer_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels, eager then its CUDA graph's replays (other masks each time), against HF in
    fp32 within 2x the error of HF itself in that dtype. (transformers before 5.25 rounds the positions' fractional
    coordinates to the model's dtype before bucketing; vitfast keeps them in fp32, as 5.25 does: the reference
    here is fp32.)"""
    hf = vision_model("SmolVLM", image_size=512, patch_size=16, hidden_size=128, num_attention_heads=2).cuda()
    low = copy.deepcopy(hf).to(dtype)
    opt = vitfast.optimize(low)
    with torch.no_grad():
        for grids in ([(32, 32), (20, 32), (32, 9)], [(32, 32), (32, 32), (32, 32)], [(7, 30), (32, 1), (16, 16)]):
            x, mask = (t.cuda() for t in padded_batch(grids, size=(32, 32), patch=16))
            ref = hf(x, patch_attention_mask=mask).last_hidden_state
            eager = low(x.to(dtype), patch_attention_mask=mask).last_hidden_state
            out = opt(x.to(dtype), patch_attention_mask=mask).last_hidden_state
            assert out.dtype == dtype
            assert_close(out, ref, dtype=dtype, eager=eager, tol=MODEL_TOLERANCE[dtype], name="last_hidden_state")
    assert opt.cuda_graphs.captures == 1


@pytest.mark.gpu
def test_phi4_vision_model_on_gpu():
    """Phi-4-multimodal's SigLIP at its shapes (1152 wide, 16 heads of 72; 8 of its 27 blocks) on 448 px crops of 14
    px patches (32 x 32), one of them padded (so that HF's SDPA path is bidirectional too), bf16, random weights
    (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own bf16 error; eager, capture and
    replay."""
    module = pytest.importorskip("transformers.models.phi4_multimodal.modeling_phi4_multimodal")
    config = transformers.Phi4MultimodalVisionConfig(num_hidden_layers=8)
    x, mask = padded_batch([(32, 32), (32, 32), (32, 20), (24, 32)], size=(32, 32), patch=14)
    assert_tower_on_gpu(lambda: trained_scale(module.Phi4MultimodalVisionModel(config)), (x.cuda(), mask.cuda()),
                        key="pooler_output")
