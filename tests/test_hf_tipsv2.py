"""Google DeepMind's TIPSv2 on vitfast: transformers' `Tipsv2VisionModel` (DINOv2's layout with a class token with
a position row and registers without one, layer-scales, GELU or SwiGLU; its table resampled bilinearly with
antialias for other grids; the mask token) and `Tipsv2Model` around it. Compared in fp32 against HF in float64,
bounded by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_tipsv2 import HFTipsv2VisionBackbone, HFTipsv2VisionModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
tipsv2 = pytest.importorskip("transformers.models.tipsv2.modeling_tipsv2")

# patches of 8 at 32 px: 16 patches after the class token and 2 registers
VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=32, patch_size=8,
              num_register_tokens=2)


def model(**kw):
    torch.manual_seed(0)
    return perturbed(tipsv2.Tipsv2VisionModel(transformers.Tipsv2VisionConfig(**{**VISION, **kw})))


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 3, 40, 24)], ids=["configured", "resampled_40x24"])
def test_equals_hf(shape, swiglu):
    """last_hidden_state, pooler_output and every hidden state, as HF's: plain, with masked patches (the mask token
    plus the patch's position row) and with a padding attention_mask (the attention kernel's key mask)."""
    hf = model(use_swiglu_ffn=swiglu)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFTipsv2VisionModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(*shape)
    patches = (shape[2] // 8) * (shape[3] // 8)
    keys = torch.ones(2, 3 + patches, dtype=torch.long)
    keys[1, -3:] = 0
    cases = [{}, dict(bool_masked_pos=torch.rand(2, patches) > 0.5)]
    if opt.takes_attention_mask:                          # transformers 5.2x: HF's model takes one
        cases.append(dict(attention_mask=keys))
    else:
        with pytest.raises(UnsupportedFeatureError, match="attention_mask, which this transformers'"):
            opt(x, attention_mask=keys)
    for kw in cases:
        with torch.no_grad():
            out, ref, eager = (m(px, output_hidden_states=True, **kw) for m, px in ((opt, x), (hf64, x.double()),
                                                                                   (hf, x)))
        for key in ("last_hidden_state", "pooler_output"):
            assert out[key].shape == ref[key].shape
            assert_close(out[key], ref[key], eager=eager[key], name=f"{key} {list(kw)}")
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}] {list(kw)}")


def test_image_text_model_equals_hf():
    """Tipsv2Model: a copy with its `vision_model` on vitfast, the text tower shared; image features and the
    image-text logits as HF's."""
    text = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    hf = perturbed(tipsv2.Tipsv2Model(transformers.Tipsv2Config(vision_config=VISION, text_config=text)))
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.vision_model, HFTipsv2VisionModel) and opt.text_model is hf.text_model
    x, ids = torch.randn(2, 3, 32, 32), torch.randint(1, 99, (3, 6))
    with torch.no_grad():
        out, ref, eager = (m.get_image_features(pixel_values=px).pooler_output
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert_close(out, ref, eager=eager, name="image features")
        out, ref, eager = (m(input_ids=ids, pixel_values=px).logits_per_image
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert out.shape == (2, 3)
    assert_close(out, ref, eager=eager, name="logits_per_image")


@pytest.mark.parametrize("reshape", [True, False], ids=["maps", "tokens"])
def test_backbone_equals_hf(reshape):
    """Tipsv2VisionBackbone: the stages' feature maps (final-normed, as [B, D, h, w] or every token), as HF's."""
    torch.manual_seed(0)
    config = transformers.Tipsv2VisionConfig(**{**VISION, "num_hidden_layers": 3}, out_indices=[1, 3],
                                             reshape_hidden_states=reshape)
    hf = perturbed(tipsv2.Tipsv2VisionBackbone(config))
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFTipsv2VisionBackbone) and opt.channels == [48, 48]
    x = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        out, ref, eager = (m(px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert len(out.feature_maps) == len(ref.feature_maps) == 2
    for o, r, e in zip(out.feature_maps, ref.feature_maps, eager.feature_maps):
        assert o.shape == r.shape == ((2, 48, 4, 3) if reshape else (2, 15, 48))
        assert_close(o, r, eager=e, name="feature_maps")


def test_dense_prediction_models_equal_hf():
    """TIPSv2's DPT heads (Tipsv2DptForDepthEstimation, Tipsv2DptForDensePrediction): a copy with their `backbone` on
    vitfast, the necks and heads shared; depth, normals and segmentation logits as HF's."""
    dpt = pytest.importorskip("transformers.models.tipsv2_dpt.modeling_tipsv2_dpt")
    backbone = dict(model_type="tipsv2_vision_model", **{**VISION, "num_hidden_layers": 4}, out_indices=[1, 2, 3, 4],
                    reshape_hidden_states=False)
    config = transformers.Tipsv2DptConfig(backbone_config=backbone, neck_hidden_sizes=[16, 24, 32, 48],
                                          fusion_hidden_size=16, num_depth_bins=8)
    for cls in (dpt.Tipsv2DptForDepthEstimation, dpt.Tipsv2DptForDensePrediction):
        torch.manual_seed(0)
        hf = perturbed(cls(config))
        hf64 = copy.deepcopy(hf).double()
        opt = vitfast.optimize(hf)
        assert isinstance(opt.backbone, HFTipsv2VisionBackbone)
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            out, ref, eager = (m(px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        keys = [k for k in ref.keys() if isinstance(ref[k], torch.Tensor)]
        assert "predicted_depth" in keys
        for key in keys:
            assert_close(out[key], ref[key], eager=eager[key], name=f"{cls.__name__}.{key}")


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient (the reference never called), the mask token through the masked
    patches."""
    hf = model().train()
    hf64 = copy.deepcopy(hf).double().train()
    opt = vitfast.optimize(hf).train()
    x, masked, w = torch.randn(2, 3, 32, 32), torch.rand(2, 16) > 0.5, torch.randn(48, dtype=torch.float64)
    backward_weighted(hf64(x.double(), bool_masked_pos=masked).pooler_output, w)
    backward_weighted(opt(x, bool_masked_pos=masked).pooler_output, w, reference_free=True)
    assert_grads_match(hf, hf64)


def test_graph_replays():
    assert_tower_replays(model(), [(torch.randn(2, 3, 32, 32),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(ValueError, match=r"H and W multiples of 8, got \(1, 3, 30, 32\)"):
        opt(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"bool_masked_pos: expected \[B, patches\] = \[1, 16\], got \(1, 19\)"):
        opt(x, bool_masked_pos=torch.zeros(1, 19, dtype=torch.bool))
    if opt.takes_attention_mask:
        with pytest.raises(ValueError, match=r"attention_mask: expected \[B, tokens\] = \[1, 19\], got \(1, 16\)"):
            opt(x, attention_mask=torch.ones(1, 16))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match=r"drop-path p=0.1 \(encoder.layer.0.drop_path\)"):
        vitfast.optimize(model(drop_path_rate=0.1).train())


@pytest.mark.gpu
def test_tipsv2_on_gpu():
    """TIPSv2-B/14 at its shapes (768 wide, 12 heads of 64, 1 register; 8 of its 12 blocks) at 448 px (1,024
    patches), bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own
    bf16 error; eager, capture and replay."""
    config = transformers.Tipsv2VisionConfig(num_hidden_layers=8)
    assert_tower_on_gpu(lambda: tipsv2.Tipsv2VisionModel(config), (torch.randn(8, 3, 448, 448, device="cuda"),))
