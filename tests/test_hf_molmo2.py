"""Molmo2's vision tower on vitfast: transformers' `Molmo2VisionModel` (patchified crops through one GEMM and HF's
position table, pre-norm blocks with q / k / v joined, grouped-query attention's key / value heads repeated in the
packed qkv, no final norm, the tokens' mean as pooler_output). Compared in fp32 against HF in float64, bounded by HF's
own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_molmo2 import HFMolmo2VisionModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
molmo2 = pytest.importorskip("transformers.models.molmo2.modeling_molmo2")
config_module = pytest.importorskip("transformers.models.molmo2.configuration_molmo2")

# crops of 16 px in patches of 4: 16 patches of 4 x 4 x 3 = 48 values; 4 heads of 16 (64 wide: not the model's 40)
CONFIG = dict(hidden_size=40, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
              head_dim=16, patch_size=4, num_position_embeddings=16, image_size=[16, 16])


def model(**kw):
    torch.manual_seed(0)
    return perturbed(molmo2.Molmo2VisionModel(config_module.Molmo2VisionConfig(**{**CONFIG, **kw})))


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_equals_hf(kv_heads):
    """last_hidden_state, pooler_output and every hidden state, as HF's; with two key / value heads for four query
    heads (grouped-query attention) too."""
    hf = model(num_key_value_heads=kv_heads)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFMolmo2VisionModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(3, 16, 48)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    for key in ("last_hidden_state", "pooler_output"):
        assert out[key].shape == ref[key].shape
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_trains_hf_tensors(kv_heads):
    """Every HF parameter gets HF's float64 gradient through the kernels' backward (the repeated key / value rows'
    gradients summed back into HF's k / v projections), the reference never called."""
    hf = model(num_key_value_heads=kv_heads)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    hf.train(), hf64.train(), opt.train()
    x = torch.randn(2, 16, 48)
    weights = torch.randn(2, 16, 40, dtype=torch.float64)
    backward_weighted(hf64(x.double()).last_hidden_state, weights)
    backward_weighted(opt(x).last_hidden_state, weights, reference_free=True)
    assert_grads_match(hf, hf64)


def test_vlm_image_features_equal_hf():
    """Molmo2ForConditionalGeneration: a copy with its `vision_tower` on vitfast, the adapter (which reads the tower's
    hidden states at vision_feature_layer and pools them by `image_token_pooling`) and the language model shared; its
    image features as HF's."""
    vision = dict(CONFIG, num_key_value_heads=2)
    adapter = dict(vision_feature_layer=[-1, -2], hidden_size=40, num_attention_heads=2, num_key_value_heads=2,
                   head_dim=16, intermediate_size=48, text_hidden_size=32)
    text = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=100,
                additional_vocab_size=8, num_hidden_layers=2, intermediate_size=48, max_position_embeddings=256)
    torch.manual_seed(0)
    vlm = perturbed(molmo2.Molmo2ForConditionalGeneration(
        config_module.Molmo2Config(vision_config=vision, adapter_config=adapter, text_config=text)))
    vlm64 = copy.deepcopy(vlm).double()
    opt = vitfast.optimize(vlm)
    assert isinstance(opt.model.vision_tower, HFMolmo2VisionModel)
    assert opt.model.language_model is vlm.model.language_model
    crops = torch.randn(2, 16, 48)                                 # two crops of one image
    pooling = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [16, 17, -1, -1], [30, 31, 26, 27]])   # -1: padding
    grids = torch.tensor([[2, 2, 0, 0]])
    with torch.no_grad():
        out, ref, eager = (m.model.get_image_features(px, pooling, grids).pooler_output[0]
                           for m, px in ((opt, crops), (vlm64, crops.double()), (vlm, crops)))
    assert out.shape == ref.shape == (4, 32)
    assert_close(out, ref, eager=eager, name="image features")


def test_graph_replays():
    assert_tower_replays(model(num_key_value_heads=2), [(torch.randn(2, 16, 48),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(torch.randn(1, 16, 48), output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values: expected patchified crops \[B, 16, 48\] \(the model's "
                                         r"position table's patches, each flattened\), got \(1, 9, 48\)"):
        opt(torch.randn(1, 9, 48))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(layers.2.self_attn\)"):
        vitfast.optimize(model(attention_dropout=0.1).train())


@pytest.mark.gpu
def test_molmo2_tower_on_gpu():
    """Molmo2's tower at its config (1152 wide, 16 heads of 72; 6 of its 25 blocks) on crops of 378 px (729 patches),
    batch 16, bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own
    bf16 error; eager, capture and replay."""
    cfg = config_module.Molmo2VisionConfig(num_hidden_layers=6, num_position_embeddings=729)
    assert_tower_on_gpu(lambda: molmo2.Molmo2VisionModel(cfg), (torch.randn(16, 729, 14 * 14 * 3, device="cuda"),))
