"""YOLOS on vitfast: transformers' `YolosModel` (the class token, the patches, then the detection tokens; the position
table and the mid position tables resampled to each image size, the mid ones added after every block but the last)
and `YolosForObjectDetection` around it (its heads and DETR's loss shared). Compared in fp32 against HF in float64,
bounded by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_yolos import HFYolosModel
from vitfast.testing import assert_close, assert_grads_match, assert_tower_on_gpu, assert_tower_replays, perturbed

transformers = pytest.importorskip("transformers")
yolos = pytest.importorskip("transformers.models.yolos.modeling_yolos")

# patches of 8 on a table for 32 x 48 px (4 x 6), 5 detection tokens
CONFIG = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=96, image_size=[32, 48],
              patch_size=8, num_detection_tokens=5, num_labels=4)


def float64_defaults(fn):
    """fn() with float64 as torch's default dtype: DETR's loss makes its class weights in the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return fn()
    finally:
        torch.set_default_dtype(old)


def model(cls=None, **kw):
    torch.manual_seed(0)
    return perturbed((cls or yolos.YolosModel)(transformers.YolosConfig(**{**CONFIG, **kw})))


@pytest.mark.parametrize("mid", [True, False], ids=["mid_positions", "no_mid_positions"])
@pytest.mark.parametrize("shape", [(2, 3, 32, 48), (2, 3, 44, 61)], ids=["configured", "resampled_44x61"])
def test_equals_hf(shape, mid):
    """last_hidden_state, pooler_output and every hidden state as HF's, at the table's size and at another one
    whose pixels past whole patches are dropped."""
    hf = model(use_mid_position_embeddings=mid)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFYolosModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(*shape)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    tokens = 1 + (shape[2] // 8) * (shape[3] // 8) + 5
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, tokens, 48)
    for key in ("last_hidden_state", "pooler_output"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_detector_equals_hf_and_trains():
    """YolosForObjectDetection: a copy with its `vit` on vitfast, the heads shared; logits, boxes and DETR's loss
    (its Hungarian matching) as HF's; in train mode every HF parameter gets HF's float64 gradient."""
    pytest.importorskip("scipy")
    hf = model(yolos.YolosForObjectDetection)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.vit, HFYolosModel) and opt.bbox_predictor is hf.bbox_predictor
    x = torch.randn(2, 3, 40, 56)
    labels = [dict(class_labels=torch.tensor([1, 3]), boxes=torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.3, 0.4]])),
              dict(class_labels=torch.tensor([0]), boxes=torch.tensor([[0.5, 0.5, 0.4, 0.4]]))]
    labels64 = [dict(class_labels=t["class_labels"], boxes=t["boxes"].double()) for t in labels]
    with torch.no_grad():
        out, eager = opt(x, labels=labels), hf(x, labels=labels)
        ref = float64_defaults(lambda: hf64(x.double(), labels=labels64))
    assert out.logits.shape == ref.logits.shape == (2, 5, 5)
    for key in ("logits", "pred_boxes", "loss"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    hf.train(), hf64.train(), opt.train()
    float64_defaults(lambda: hf64(x.double(), labels=labels64).loss.backward())
    opt(x, labels=labels).loss.backward()
    assert_grads_match(hf, hf64)


def test_graph_replays():
    assert_tower_replays(model(), [(torch.randn(2, 3, 40, 56),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    x = torch.randn(1, 3, 32, 48)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values: expected images \[B, 3, H, W\] with H and W at least 8, got "
                                         r"\(1, 3, 4, 48\)"):
        opt(torch.randn(1, 3, 4, 48))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(encoder.layer.0.output.dropout\)"):
        vitfast.optimize(model(hidden_dropout_prob=0.1).train())


@pytest.mark.gpu
def test_yolos_on_gpu():
    """YOLOS-S (384 wide, 12 blocks, 6 heads of 64, 100 detection tokens, its table for 800 x 1333 px, no mid
    position tables) on 800 x 1333 px images (50 x 83 patches: 4,251 tokens), batch 4, bf16, random weights (made on
    the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own bf16 error; eager, capture and replay."""
    config = transformers.YolosConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536,
                                      image_size=[800, 1333], use_mid_position_embeddings=False)
    assert_tower_on_gpu(lambda: yolos.YolosModel(config), (torch.randn(4, 3, 800, 1333, device="cuda"),))
