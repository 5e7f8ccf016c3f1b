"""Llama 4's vision tower on vitfast: transformers' `Llama4VisionModel` (the class token after the patches, HF's 2D
RoPE on interleaved pairs, the pixel-shuffle adapter) and the VLM around it, `Llama4ForConditionalGeneration`.
Compared in fp32 against HF in float64, bounded by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph
replays the forward."""

import copy
import inspect

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_llama4 import HFLlama4VisionModel
from vitfast.testing import (
    MODEL_TOLERANCE,
    assert_close,
    assert_tower_replays,
    assert_trains_hf_tensors,
    perturbed,
)

transformers = pytest.importorskip("transformers")

# 4 x 4 patches of 8 pixels, head dim 16; the adapter's pixel shuffle makes 2 x 2 tokens of 4 · 48 features
VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192, image_size=32,
              patch_size=8, vision_output_dim=64, projector_input_dim=64, projector_output_dim=64,
              pixel_shuffle_ratio=0.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def vision_model(**kw):
    return perturbed(transformers.Llama4VisionModel(transformers.Llama4VisionConfig(**{**VISION, **kw})))


@pytest.mark.parametrize("hidden", [False, True])
def test_vision_tower_equals_hf(hidden):
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFLlama4VisionModel) and opt.dtype == torch.float32
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=hidden) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref) and set(out.keys()) == set(ref.keys())
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (3, 4, 64)
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        if hidden:
            assert len(out.hidden_states) == len(ref.hidden_states) == 3
            for i, (a, b, c) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
                assert_close(a, b, eager=c, name=f"hidden_states[{i}]")
        tup = opt(x, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], out.last_hidden_state)


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient: q and k through their reordered rows, the class token and the
    position table through the patch embedding's epilogue and the concatenation."""
    assert_trains_hf_tensors(vision_model(), (torch.randn(2, 3, 32, 32),), torch.randn(64, dtype=torch.float64))


def test_graph_replays():
    assert_tower_replays(vision_model(), [(torch.randn(2, 3, 32, 32),) for _ in range(3)])


def test_vision_language_model_equals_hf():
    """Llama 4 (Scout, Maverick) with the tower on vitfast (the language model and projector shared): image features,
    the logits over a prompt with an image per row, greedy `generate`, as HF's."""
    text = transformers.Llama4TextConfig(vocab_size=99, hidden_size=48, intermediate_size=64, intermediate_size_mlp=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                         num_local_experts=2, max_position_embeddings=64, pad_token_id=0)
    cfg = transformers.Llama4Config(vision_config=transformers.Llama4VisionConfig(**VISION), text_config=text,
                                    image_token_index=98)
    model = perturbed(transformers.Llama4ForConditionalGeneration(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.vision_model, HFLlama4VisionModel) and not isinstance(model.vision_model,
                                                                                  HFLlama4VisionModel)
    assert opt.language_model is model.language_model and opt.multi_modal_projector is model.multi_modal_projector
    x = torch.randn(2, 3, 32, 32)

    def features(m, px):          # transformers 5.2x: projected, as pooler_output; 5.17: the tower's output
        strategy = "vision_feature_select_strategy" in inspect.signature(m.get_image_features).parameters
        out = m.get_image_features(pixel_values=px, **({"vision_feature_select_strategy": "default"} if strategy
                                                       else {}))
        return out.last_hidden_state if out.pooler_output is None else out.pooler_output

    with torch.no_grad():
        feats = [features(m, px) for m, px in ((opt, x), (model64, x.double()), (model, x))]
        assert_close(*feats[:2], eager=feats[2], name="get_image_features")
        ids = torch.cat([torch.tensor([[2], [2]]), torch.full((2, 4), 98), torch.randint(3, 90, (2, 5))], dim=1)
        out, ref, eager = (m(input_ids=ids, pixel_values=px).logits
                           for m, px in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        gen = dict(input_ids=ids, pixel_values=x, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                   do_sample=False)
        assert torch.equal(opt.generate(**gen), model.generate(**gen))


def test_bad_inputs_and_models_are_named():
    opt = vitfast.optimize(vision_model())
    with pytest.raises(ValueError, match=r"pixel_values: expected image tiles \[n, 3, 32, 32\], got \(2, 3, 32, 24\)"):
        opt(torch.randn(2, 3, 32, 24))
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(torch.randn(1, 3, 32, 32), output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match=r"train mode with dropout p=0.1 \(model.layers.0.self_attn"):
        vitfast.optimize(vision_model(attention_dropout=0.1).train())
    with pytest.raises(UnsupportedFeatureError, match=r"pixel_shuffle_ratio=0.4 \(only 1 / an integer\)"):
        vitfast.optimize(vision_model(pixel_shuffle_ratio=0.4))
    hf = vision_model()
    hf.model.layers[1].mlp.activation_fn = torch.nn.GELU(approximate="tanh")
    with pytest.raises(UnsupportedFeatureError, match=r"model.layers.1.mlp.activation_fn: GELU \(only exact GELU\)"):
        vitfast.optimize(hf)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels at Llama 4's head dim (88 = 1408 / 16), eager then its CUDA graph's capture and
    replays, against HF in fp32 within 2x the error of HF itself in that dtype."""
    hf = vision_model(hidden_size=352, num_attention_heads=4, intermediate_size=1408, image_size=112, patch_size=14,
                      projector_input_dim=256, projector_output_dim=256, vision_output_dim=256).cuda()
    low = copy.deepcopy(hf).to(dtype)
    opt = vitfast.optimize(low)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 3, 112, 112, device="cuda")
            ref, eager, out = hf(x), low(x.to(dtype)), opt(x.to(dtype))
            assert out.last_hidden_state.dtype == dtype
            assert_close(out.last_hidden_state, ref.last_hidden_state, dtype=dtype,
                         eager=eager.last_hidden_state, tol=MODEL_TOLERANCE[dtype])
    assert opt.cuda_graphs.captures == 1
