"""BLIP's, BLIP-2's and InstructBLIP's vision transformers on vitfast (`BlipVisionModel`, `Blip2VisionModel`,
`InstructBlipVisionModel`, `InstructBlipVideoVisionModel`: the packed qkv, the final norm over every token and once
more on the pooled row), alone and inside BLIP's captioner and BLIP-2's generator. Compared in fp32 against HF in
float64, bounded by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_blip import HFBlipVisionModel
from vitfast.testing import assert_close, assert_tower_on_gpu, assert_tower_replays, assert_trains_hf_tensors, perturbed

transformers = pytest.importorskip("transformers")

VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32,
              patch_size=8)
KINDS = {"BlipVisionModel": "BlipVisionConfig", "Blip2VisionModel": "Blip2VisionConfig",
         "InstructBlipVisionModel": "InstructBlipVisionConfig",
         "InstructBlipVideoVisionModel": "InstructBlipVideoVisionConfig"}


def vision(name: str = "BlipVisionModel", **kw):
    torch.manual_seed(0)
    return perturbed(getattr(transformers, name)(getattr(transformers, KINDS[name])(**{**VISION, **kw})))


@pytest.mark.parametrize("name, kw", [(name, {}) for name in KINDS] + [("Blip2VisionModel", dict(qkv_bias=False))],
                         ids=[*KINDS, "blip2_no_qkv_bias"])
def test_vision_models_equal_hf(name, kw):
    """last_hidden_state, pooler_output and every hidden state, as HF's: at the configured size, at another with
    interpolate_pos_encoding (HF's bicubic resampling), and at a smaller one without it (the table's first rows, as
    HF slices it)."""
    hf = vision(name, **kw)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFBlipVisionModel) and opt.main_input_name == "pixel_values"
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    for shape, interpolate in (((2, 3, 32, 32), False), ((2, 3, 48, 40), True), ((1, 3, 24, 24), False)):
        x = torch.randn(*shape)
        with torch.no_grad():
            out, ref, eager = (m(px, interpolate_pos_encoding=interpolate, output_hidden_states=True)
                               for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref)
        for key in ("last_hidden_state", "pooler_output"):
            assert out[key].shape == ref[key].shape
            assert_close(out[key], ref[key], eager=eager[key], name=f"{key} at {shape[2:]}")
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_blip_captioner_and_blip2_generator_equal_hf():
    """BlipForConditionalGeneration and Blip2ForConditionalGeneration (an OPT language model behind the Q-Former) with
    their vision model on vitfast (the rest shared): BLIP-2's logits, and greedy `generate` of both, as HF's."""
    torch.manual_seed(0)
    blip = transformers.BlipConfig(vision_config=VISION, text_config=dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        encoder_hidden_size=48, bos_token_id=1, eos_token_id=2, pad_token_id=0, sep_token_id=2))
    blip2 = transformers.Blip2Config(
        vision_config=VISION, num_query_tokens=4, image_token_index=60,
        qformer_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, encoder_hidden_size=48),
        text_config=dict(model_type="opt", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         ffn_dim=64, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    x = torch.randn(2, 3, 32, 32)
    captioner = perturbed(transformers.BlipForConditionalGeneration(blip))
    opt = vitfast.optimize(captioner)
    assert isinstance(opt.vision_model, HFBlipVisionModel) and opt.text_decoder is captioner.text_decoder
    with torch.no_grad():
        assert torch.equal(opt.generate(pixel_values=x, max_new_tokens=4),
                           captioner.generate(pixel_values=x, max_new_tokens=4))
    model = perturbed(transformers.Blip2ForConditionalGeneration(blip2))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.vision_model, HFBlipVisionModel) and opt.language_model is model.language_model
    ids = torch.tensor([[60] * 4 + [1, 5, 6]] * 2)
    with torch.no_grad():
        out, ref, eager = (m(pixel_values=px, input_ids=ids).logits
                           for m, px in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        kw = dict(pixel_values=x, input_ids=ids, max_new_tokens=4)
        assert torch.equal(opt.generate(**kw), model.generate(**kw))


@pytest.mark.parametrize("name", ["BlipVisionModel", "Blip2VisionModel"])
def test_trains_hf_tensors(name):
    """Every HF parameter gets HF's float64 gradient (the reference never called): the packed qkv, the class token
    and position table through the patch embedding's epilogue, the final norm through both of its uses."""
    assert_trains_hf_tensors(vision(name), (torch.randn(2, 3, 32, 32),), torch.randn(48, dtype=torch.float64),
                             key="pooler_output")


def test_graph_replays():
    """One capture per input shape; later batches of other images replay it, each equal to HF."""
    assert_tower_replays(vision("Blip2VisionModel"), [(torch.randn(2, 3, 32, 32),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(vision())
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(torch.randn(1, 3, 32, 32), output_attentions=True)
    with pytest.raises(ValueError, match=r"at most 16 patches without interpolate_pos_encoding, got \(1, 3, 40, 32\)"):
        opt(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"H and W multiples of 8, got \(1, 3, 30, 32\)"):
        opt(torch.randn(1, 3, 30, 32), interpolate_pos_encoding=True)
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(vision(hidden_act="relu"))
    dropout = vision(attention_dropout=0.1).train()
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(encoder.layers.0.self_attn dropout\)"):
        vitfast.optimize(dropout)


@pytest.mark.gpu
def test_blip2_vit_g_on_gpu():
    """BLIP-2's EVA ViT-g at its shapes (1408 wide, 16 heads of 88, 224 px in patches of 14: 257 tokens; 8 of its 39
    blocks), bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own
    bf16 error; eager, capture and replay."""
    config = transformers.Blip2VisionConfig(num_hidden_layers=8)
    assert_tower_on_gpu(lambda: transformers.Blip2VisionModel(config), (torch.randn(8, 3, 224, 224, device="cuda"),))
