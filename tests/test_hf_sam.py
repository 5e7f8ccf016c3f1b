"""SAM's image encoder on vitfast: transformers' `SamVisionEncoder` (windowed blocks with zero-padded windows, global
blocks, decomposed relative positions added to the attention's scores in the kernel, the neck) inside `SamModel` and
`SamVisionModel`, and GOT-OCR 2.0's copy of it. Compared in fp32 against HF in float64, bounded by HF's own fp32 error;
gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_sam import HFSamVisionEncoder
from vitfast.testing import (
    assert_close,
    assert_tower_replays,
    assert_trains_hf_tensors,
    assert_vlm_equals_hf,
    perturbed,
)

transformers = pytest.importorskip("transformers")

# 40 px in patches of 4: a 10 x 10 grid; windows of 4 (the grid padded to 12 x 12: nine windows, the last row and
# column of them mostly padding), block 1 global (10 x 10 relative positions)
VISION = dict(hidden_size=48, output_channels=16, num_hidden_layers=3, num_attention_heads=3, image_size=40,
              patch_size=4, mlp_dim=96, window_size=4, global_attn_indexes=[1])


def encoder(kind: str = "sam", **kw):
    """A small encoder off its init, its relative-position tables too (HF starts them at 0)."""
    if kind == "sam":
        from transformers.models.sam.modeling_sam import SamVisionEncoder as cls
        config = transformers.SamVisionConfig(**{**VISION, **kw})
    elif kind == "sam_hq":
        from transformers.models.sam_hq.modeling_sam_hq import SamHQVisionEncoder as cls
        config = transformers.SamHQVisionConfig(**{**VISION, **kw})
    else:
        from transformers.models.got_ocr2.modeling_got_ocr2 import GotOcr2VisionEncoder as cls
        config = transformers.GotOcr2VisionConfig(**{**VISION, **kw})
    hf = perturbed(cls(config))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "rel_pos" in name or name == "pos_embed":
                p.normal_()
    return hf


@pytest.mark.parametrize("kind, kw", [("sam", {}), ("got_ocr2", {}), ("sam_hq", dict(global_attn_indexes=[0, 2])),
                                      ("sam", dict(window_size=5, global_attn_indexes=[0, 2])),   # 2 x 2 windows
                                      ("sam", dict(use_rel_pos=False, use_abs_pos=False, qkv_bias=False)),
                                      ("sam", dict(hidden_act="quick_gelu", num_attention_heads=2))],
                         ids=["sam", "got_ocr2", "sam_hq", "window5", "plain", "quick_gelu"])
def test_encoder_equals_hf(kind, kw):
    """The neck's output and every hidden state (the embeddings, each block's output), as HF's; the relative
    positions moved the output (so they are what is tested)."""
    hf = encoder(kind, **kw)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFSamVisionEncoder) and opt.dtype == torch.float32
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref)
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, 16, 10, 10)
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert h.shape == r.shape == (2, 10, 10, 48)
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")
        if kind == "sam_hq":                                  # the global blocks' outputs
            assert len(out.intermediate_embeddings) == len(ref.intermediate_embeddings) == 2
            for h, r, e in zip(out.intermediate_embeddings, ref.intermediate_embeddings, eager.intermediate_embeddings):
                assert_close(h, r, eager=e, name="intermediate_embeddings")
        if hf.config.use_rel_pos:
            for layer in hf64.layers:
                layer.attn.rel_pos_h.zero_()
            assert (hf64(x.double()).last_hidden_state - ref.last_hidden_state).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["sam", "sam_hq"])
def test_sam_model_equals_hf(kind):
    """SamModel (SamHQModel) with its encoder on vitfast (the prompt encoder and mask decoder shared; SAM-HQ's reads
    the global blocks' outputs too): the masks and IoU scores for point prompts, as HF's; SamVisionModel
    (SamHQVisionModel) likewise."""
    torch.manual_seed(0)
    prefix = "SamHQ" if kind == "sam_hq" else "Sam"
    decoder = dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16)
    config = getattr(transformers, prefix + "Config")(
        vision_config={**VISION, "num_pos_feats": 8},                                   # 2 x 8: the image embedding
        prompt_encoder_config=dict(hidden_size=16, image_size=40, patch_size=4),
        mask_decoder_config={**decoder, **(dict(vit_dim=48) if kind == "sam_hq" else {})})
    hf = getattr(transformers, prefix + "Model")(config).eval()
    hf.vision_encoder = encoder(kind, num_pos_feats=8)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.vision_encoder, HFSamVisionEncoder) and opt.mask_decoder is hf.mask_decoder
    x, points = torch.randn(2, 3, 40, 40), torch.rand(2, 1, 2, 2) * 40
    with torch.no_grad():
        out, ref, eager = (m(pixel_values=px, input_points=p) for m, px, p in
                           ((opt, x, points), (hf64, x.double(), points.double()), (hf, x, points)))
        # the masks: HF's own fp32 error is 1.2e-5 here, over the 1e-5 ceiling; the bound by it (2x) still holds
        assert_close(out.pred_masks, ref.pred_masks, eager=eager.pred_masks, tol=1e-4, name="pred_masks")
        assert_close(out.iou_scores, ref.iou_scores, eager=eager.iou_scores, tol=1e-4, name="iou_scores")
        vision = getattr(transformers, prefix + "VisionModel")(config.vision_config).eval()
        vision.vision_encoder = hf.vision_encoder
        got = vitfast.optimize(vision)(x).last_hidden_state
        assert_close(got, hf64.vision_encoder(x.double()).last_hidden_state,
                     eager=vision(x).last_hidden_state)


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient: the relative-position tables through the decomposed terms and
    the attention's backward kernels (the reference never called), the position table through the patch embedding's
    epilogue, the neck's convolutions."""
    assert_trains_hf_tensors(encoder(), (torch.randn(2, 3, 40, 40),), torch.randn(10, dtype=torch.float64))


def test_graph_replays():
    """One capture per batch size; later batches of other images replay it, each equal to HF."""
    assert_tower_replays(encoder(), [(torch.randn(2, 3, 40, 40),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    hf = encoder()
    opt = vitfast.optimize(hf)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(torch.randn(1, 3, 40, 40), output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values: expected images \[B, 3, 40, 40\], got \(1, 3, 32, 32\)"):
        opt(torch.randn(1, 3, 32, 32))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(encoder(hidden_act="relu"))
    dropout = encoder(attention_dropout=0.1).train()
    with pytest.raises(UnsupportedFeatureError, match="layers.0.attn dropout"):
        vitfast.optimize(dropout)
    assert isinstance(vitfast.optimize(dropout.eval()), HFSamVisionEncoder)      # dropout is off in eval mode


@pytest.mark.gpu
def test_vit_b_encoder_on_gpu():
    """SAM ViT-B's shapes at 1024 px (64 x 64 patches, windows of 14, four global blocks of 4096 tokens), bf16, random
    weights: vitfast against HF in float32 on the GPU, bounded by HF's own bf16 error."""
    config = transformers.SamVisionConfig()                        # ViT-B: 768 wide, 12 heads, 12 blocks
    from transformers.models.sam.modeling_sam import SamVisionEncoder

    torch.manual_seed(0)
    hf = perturbed(SamVisionEncoder(config)).cuda()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "rel_pos" in name:
                p.normal_(std=0.5)
    ref = copy.deepcopy(hf)
    hf16 = hf.to(torch.bfloat16)
    opt = vitfast.optimize(hf16)
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    with torch.no_grad():
        want = ref(x).last_hidden_state.double()
        eager = hf16(x.bfloat16()).last_hidden_state
        for _ in range(3):                                          # eager, capture, replay
            out = opt(x.bfloat16()).last_hidden_state
            assert_close(out, want, eager=eager)


def test_got_ocr2_equals_hf():
    """GOT-OCR 2.0 with its tower on vitfast (the projector and language model shared): logits over a prompt with an
    image per row (3 x 3 image tokens after the projector's strided convolutions), greedy `generate`, as HF's."""
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1)
    model = transformers.GotOcr2ForConditionalGeneration(
        transformers.GotOcr2Config(vision_config=VISION, text_config=text, image_token_index=5)).eval()
    model.model.vision_tower = encoder("got_ocr2")
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.vision_tower, HFSamVisionEncoder)
    ids = torch.tensor([[1, 2, *[5] * 9, 3, 4]] * 2)
    assert_vlm_equals_hf(opt, model, model64, torch.randn(2, 3, 40, 40),
                         dict(input_ids=ids, attention_mask=torch.ones_like(ids)))


def test_sam_rel_pos_is_hf_get_decomposed_rel_pos():
    """`reference.sam_rel_pos` (the kernel's rel_h, rel_w) against HF's attention module on a 5 x 7 grid whose tables
    are resampled (made for 4 x 4: 7 distances, 9 and 13 needed), through `reference.rel_pos_bias`."""
    from transformers.models.sam.modeling_sam import SamVisionAttention

    from vitfast.reference import rel_pos_bias, sam_rel_pos

    attn = SamVisionAttention(transformers.SamVisionConfig(**VISION), window_size=4).double()
    torch.nn.init.normal_(attn.rel_pos_h)
    torch.nn.init.normal_(attn.rel_pos_w)
    q = torch.randn(2, 3, 35, 16, dtype=torch.float64)                                 # (B, H, 5 x 7 tokens, D)
    want = attn.get_decomposed_rel_pos(q.reshape(6, 35, 16), attn.rel_pos_h, attn.rel_pos_w, (5, 7), (5, 7))
    rel_h, rel_w = sam_rel_pos(q, attn.rel_pos_h, attn.rel_pos_w, (5, 7))
    assert rel_h.shape == (2, 3, 35, 5) and rel_w.shape == (2, 3, 35, 7)
    torch.testing.assert_close(rel_pos_bias(rel_h, rel_w), want.reshape(2, 3, 35, 35), rtol=1e-12, atol=1e-12)


def test_deepseek_vl_hybrid_optimizes_both_towers_and_equals_hf():
    """DeepSeek-VL hybrid with both of its towers on vitfast: the SigLIP `vision_model` and the SAM
    `high_res_vision_model` (a SamVisionModel, whose first global block's hidden state the model reads beside the
    neck's output): logits over a prompt with an image per row, greedy `generate`, as HF's."""
    torch.manual_seed(0)
    siglip = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32,
                  patch_size=8)                                                   # 4 x 4 tokens
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    config = transformers.DeepseekVLHybridConfig(
        text_config=text, vision_config=transformers.SiglipVisionConfig(**siglip),
        high_res_vision_config=transformers.SamVisionConfig(**VISION), image_token_id=98)
    model = perturbed(transformers.DeepseekVLHybridForConditionalGeneration(config))
    with torch.no_grad():
        model.model.high_res_vision_alpha.fill_(0.7)                              # HF starts it at 0
        for name, p in model.model.high_res_vision_model.named_parameters():
            if "rel_pos" in name:
                p.normal_()
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.high_res_vision_model.vision_encoder, HFSamVisionEncoder)
    assert type(opt.model.vision_model).__module__.startswith("vitfast")
    assert opt.model.language_model is model.model.language_model
    ids = torch.tensor([[1, *[98] * 16, 3, 4]] * 2)
    x, hi = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out, ref, eager = (m(input_ids=ids, pixel_values=px, high_res_pixel_values=h).logits
                           for m, px, h in ((opt, x, hi), (model64, x.double(), hi.double()), (model, x, hi)))
        assert_close(out, ref, eager=eager, name="logits")
        gen = dict(input_ids=ids, pixel_values=x, high_res_pixel_values=hi, attention_mask=torch.ones_like(ids),
                   max_new_tokens=3, do_sample=False)
        assert torch.equal(opt.generate(**gen), model.generate(**gen))
