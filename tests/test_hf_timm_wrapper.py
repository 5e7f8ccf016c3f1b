"""transformers' TimmWrapper models (a timm model as `timm_model`) and Perception LM, whose vision tower is one,
through `vitfast.optimize`: a copy of the model with its timm model on vitfast, against HF in float64 (on the CPU
through Triton's interpreter). Needs timm, which the CPU set-up leaves out: these run where timm is installed."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.testing import assert_close, perturbed

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

# timm names at 2 blocks and a small width: PE-Core (attention pooling over the class token too, 8 heads), PE-Lang
# (layer-scale, no final norm), RoPE-ViT (a classifier)
PE_CORE = dict(architecture="vit_pe_core_tiny_patch16_384", model_args=dict(depth=2, embed_dim=48, num_heads=3,
                                                                            img_size=48))
PE_LANG = dict(architecture="vit_pe_lang_large_patch14_448", model_args=dict(depth=2, embed_dim=64, num_heads=2,
                                                                             img_size=42))


def _assert_outputs_equal(opt, model, model64, x, keys, **kw):
    with torch.no_grad():
        out, ref, eager = opt(x, **kw), model64(x.double(), **kw), model(x, **kw)
        for key in keys:
            assert_close(out[key], ref[key], eager=eager[key], name=key)
        if kw.get("output_hidden_states"):
            assert len(out.hidden_states) == len(ref.hidden_states)
            for i, (a, b, c) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
                assert_close(a, b, eager=c, name=f"hidden_states[{i}]")


@pytest.mark.parametrize("hidden", [None, True, [0]], ids=["features", "all_hidden_states", "hidden_state_0"])
def test_timm_wrapper_model_equals_hf(hidden):
    """TimmWrapperModel: last_hidden_state (forward_features or forward_intermediates), pooler_output (the timm
    model's forward_head: PE-Core's attention pooling), hidden_states as timm's intermediates (all, or a list)."""
    model = perturbed(transformers.TimmWrapperModel(transformers.TimmWrapperConfig(**PE_CORE))).eval()
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert type(opt) is type(model) and opt is not model and opt.config is model.config
    assert isinstance(opt.timm_model, vitfast.VisionTransformer)
    assert type(model.timm_model).__module__.startswith("timm.")
    assert {id(p) for p in opt.parameters()} == {id(p) for p in model.parameters()}
    _assert_outputs_equal(opt, model, model64, torch.randn(2, 3, 48, 48), ("last_hidden_state", "pooler_output"),
                          output_hidden_states=hidden)


def test_timm_wrapper_model_replays_the_features_graph():
    """TimmWrapperModel runs its timm model as forward_features, then forward_head: the features are captured once
    (simulated on the CPU) and replayed, each result as HF's."""
    from vitfast.graphs import CUDAGraphRunner
    from vitfast.testing import simulate_cuda_graphs

    model = perturbed(transformers.TimmWrapperModel(transformers.TimmWrapperConfig(**PE_CORE))).eval()
    opt = vitfast.optimize(model)
    runner = opt.timm_model.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, 48, 48)
            _assert_outputs_equal(opt, model, model64, x, ("last_hidden_state", "pooler_output"))
    assert runner.captures == 1


def test_timm_wrapper_classifier_equals_hf():
    """TimmWrapperForImageClassification (RoPE-ViT): logits and the loss with labels."""
    cfg = transformers.TimmWrapperConfig(architecture="vit_small_patch16_rope_224", num_labels=5,
                                         model_args=dict(depth=2, embed_dim=64, num_heads=2, img_size=32))
    model = perturbed(transformers.TimmWrapperForImageClassification(cfg)).eval()
    opt = vitfast.optimize(model)
    assert isinstance(opt.timm_model, vitfast.VisionTransformer)
    _assert_outputs_equal(opt, model, copy.deepcopy(model).double(), torch.randn(2, 3, 32, 32), ("logits", "loss"),
                          labels=torch.tensor([1, 3]))


def test_timm_wrapper_of_an_unsupported_timm_model_is_refused_by_name():
    model = transformers.TimmWrapperModel(transformers.TimmWrapperConfig(
        architecture="vit_small_patch16_rope_mixed_224", model_args=dict(depth=1, embed_dim=64, num_heads=2)))
    with pytest.raises(UnsupportedFeatureError, match="rope_type='mixed'"):
        vitfast.optimize(model)


def test_perception_lm_equals_hf():
    """Perception LM (PE-Lang's tower without its class token, the projector's 2 x 2 pooling, a Llama): image
    features, logits over a prompt with an image per row, greedy generate."""
    image_token = 98
    cfg = transformers.PerceptionLMConfig(
        vision_config=transformers.TimmWrapperConfig(**PE_LANG),
        text_config=transformers.LlamaConfig(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                             max_position_embeddings=64, pad_token_id=0),
        vision_use_cls_token=True, projector_pooling_ratio=2, image_token_id=image_token)
    model = perturbed(transformers.PerceptionLMForConditionalGeneration(cfg)).eval()
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert opt.model.vision_tower is not model.model.vision_tower
    assert isinstance(opt.model.vision_tower.timm_model, vitfast.VisionTransformer)
    assert opt.model.language_model is model.model.language_model and opt.lm_head is model.lm_head
    x = torch.randn(2, 1, 3, 42, 42)                   # one tile per image
    with torch.no_grad():
        feats = [m.model.get_image_features(pixel_values=xi).pooler_output
                 for m, xi in ((opt, x), (model64, x.double()), (model, x))]
        assert_close(*feats[:2], eager=feats[2], name="get_image_features")
        n_tokens = feats[0].shape[1]
        ids = torch.cat([torch.tensor([[2], [2]]), torch.full((2, n_tokens), image_token),
                         torch.randint(3, image_token - 2, (2, 5))], dim=1)
        out, ref, eager = (m(input_ids=ids, pixel_values=xi).logits
                           for m, xi in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        gen = dict(input_ids=ids, pixel_values=x, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                   do_sample=False)
        assert torch.equal(opt.generate(**gen), model.generate(**gen))
