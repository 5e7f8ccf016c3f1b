"""Ovis2's vision tower on vitfast: transformers' `Ovis2VisionModel` (AIMv2's transformer, then the visual tokenizer:
hidden_stride x hidden_stride blocks of tokens joined, head_linear, head_norm, softmax) and the VLM around it,
`Ovis2ForConditionalGeneration`. Compared in fp32 against HF in float64, bounded by HF's own fp32 error."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf import HFOvis2VisionModel
from vitfast.testing import MODEL_TOLERANCE, assert_close, assert_grads_match, backward_weighted, perturbed

transformers = pytest.importorskip("transformers")
ovis2 = pytest.importorskip("transformers.models.ovis2.modeling_ovis2")

VISION = dict(image_size=32, patch_size=8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=3, vocab_size=40, hidden_stride=2, num_visual_indicator_tokens=5)


def vision_model(**kw):
    return perturbed(ovis2.Ovis2VisionModel(transformers.Ovis2VisionConfig(**{**VISION, **kw})))


@pytest.mark.parametrize("kw", [{}, dict(tokenize_function="st_argmax"), dict(hidden_stride=1, qkv_bias=True,
                                                                               mlp_bias=True)],
                         ids=["softmax_stride2", "st_argmax", "stride1_biases"])
def test_vision_tower_equals_hf(kw):
    hf = vision_model(**kw)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFOvis2VisionModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out, ref, eager = (m(px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref) and set(out.keys()) == set(ref.keys())
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        if kw.get("tokenize_function") == "st_argmax":          # one-hot rows (to an ulp): the same tokens as HF's
            assert torch.equal(out.pooler_output.argmax(-1), ref.pooler_output.argmax(-1))
        assert_close(out.pooler_output, ref.pooler_output, eager=eager.pooler_output, name="pooler_output")


def test_trains_hf_tensors():
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double().train()
    opt = vitfast.optimize(hf).train()
    hf.train()
    x = torch.randn(2, 3, 32, 32)
    w = torch.randn(2, 4, 35, dtype=torch.float64)
    backward_weighted(hf64(x.double()).pooler_output, w)
    backward_weighted(opt(x).pooler_output, w, reference_free=True)
    assert_grads_match(hf, hf64)


def test_vision_language_model_equals_hf():
    """Ovis2 with the tower on vitfast (the language model, the visual embedding table shared): the logits over a
    prompt with an image per row and the visual indicator tokens, greedy `generate`, as HF's."""
    cfg = transformers.Ovis2Config(
        vision_config=VISION, image_token_id=98, visual_indicator_token_ids=[93, 94, 95, 96, 97], vocab_size=99,
        hidden_size=48, text_config=dict(model_type="qwen2", vocab_size=99, hidden_size=48, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64))
    model = perturbed(transformers.Ovis2ForConditionalGeneration(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.vision_tower, HFOvis2VisionModel)
    assert opt.model.language_model is model.model.language_model
    x = torch.randn(2, 3, 32, 32)
    ids = torch.cat([torch.tensor([[2, 93], [2, 93]]), torch.full((2, 4), 98), torch.tensor([[94], [94]]),
                     torch.randint(3, 90, (2, 5))], dim=1)
    with torch.no_grad():
        out, ref, eager = (m(input_ids=ids, pixel_values=px).logits
                           for m, px in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        gen = dict(input_ids=ids, pixel_values=x, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                   do_sample=False)
        assert torch.equal(opt.generate(**gen), model.generate(**gen))


def test_refusals_are_named():
    with pytest.raises(UnsupportedFeatureError, match=r"tokenize_function='gumbel_argmax' \(only 'softmax'"):
        vitfast.optimize(vision_model(tokenize_function="gumbel_argmax"))
    opt = vitfast.optimize(vision_model())
    with pytest.raises(UnsupportedFeatureError, match="output_hidden_states=True"):
        opt(torch.randn(1, 3, 32, 32), output_hidden_states=True)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(torch.randn(1, 3, 32, 32), output_attentions=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels, eager then its CUDA graph's capture and replays, against HF in fp32 within 2x
    the error of HF itself in that dtype."""
    hf = vision_model(hidden_size=256, intermediate_size=512, num_attention_heads=4, image_size=112, patch_size=14,
                      vocab_size=512).cuda()
    low = copy.deepcopy(hf).to(dtype)
    opt = vitfast.optimize(low)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 3, 112, 112, device="cuda")
            ref, eager, out = hf(x), low(x.to(dtype)), opt(x.to(dtype))
            for key in ("last_hidden_state", "pooler_output"):
                assert out[key].dtype == dtype
                assert_close(out[key], ref[key], dtype=dtype, eager=eager[key], tol=MODEL_TOLERANCE[dtype], name=key)
    assert opt.cuda_graphs.captures == 1
