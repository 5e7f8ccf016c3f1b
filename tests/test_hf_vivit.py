"""ViViT on vitfast: transformers' `VivitModel` (tubelets through one patch embedding with the class token and the
position table in its epilogue, spatio-temporal attention over every tubelet token) and `VivitForVideoClassification`
around it. Compared in fp32 against HF in float64, bounded by HF's own fp32 error; gradients reach HF's tensors; a
CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_vivit import HFVivitModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
vivit = pytest.importorskip("transformers.models.vivit.modeling_vivit")

# 4 frames of 32 px in tubelets of 2 x 8 x 8: 2 x 4 x 4 = 32 tokens and the class token
CONFIG = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
              num_frames=4, tubelet_size=[2, 8, 8], num_labels=5, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)


def model(cls=None, **kw):
    torch.manual_seed(0)
    return perturbed((cls or vivit.VivitModel)(transformers.VivitConfig(**{**CONFIG, **kw})))


@pytest.mark.parametrize("act", ["gelu_fast", "gelu"])
def test_equals_hf(act):
    """last_hidden_state, pooler_output and every hidden state, as HF's (ViViT's default activation, gelu_fast, is
    the tanh GELU; and the exact one)."""
    hf = model(hidden_act=act)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFVivitModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, 33, 48)
    for key in ("last_hidden_state", "pooler_output"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_video_classifier_equals_hf_and_trains():
    """VivitForVideoClassification: a copy with its `vivit` on vitfast, the classifier shared; logits and the loss as
    HF's; every parameter gets HF's float64 gradient through the kernels' backward, the reference never called."""
    hf = model(vivit.VivitForVideoClassification)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.vivit, HFVivitModel) and opt.classifier is hf.classifier
    x, labels = torch.randn(3, 4, 3, 32, 32), torch.tensor([0, 4, 2])
    with torch.no_grad():
        out, ref, eager = (m(px, labels=labels) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    for key in ("logits", "loss"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    hf.train(), hf64.train(), opt.train()
    weights = torch.randn(3, 5, dtype=torch.float64)
    backward_weighted(hf64(x.double()).logits, weights)
    backward_weighted(opt(x).logits, weights, reference_free=True)
    assert_grads_match(hf, hf64)


def test_graph_replays():
    assert_tower_replays(model(), [(torch.randn(2, 4, 3, 32, 32),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    x = torch.randn(1, 4, 3, 32, 32)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="attention_mask"):
        opt(x, attention_mask=torch.ones(1, 33))
    with pytest.raises(ValueError, match=r"pixel_values: expected videos \[B, 4, 3, 32, 32\] \(the model's num_frames "
                                         r"and image size: its position table's\), got \(1, 6, 3, 32, 32\)"):
        opt(torch.randn(1, 6, 3, 32, 32))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(layers.1.dropout\)"):
        vitfast.optimize(model(hidden_dropout_prob=0.1).train())


@pytest.mark.gpu
def test_vivit_on_gpu():
    """ViViT-B (768 wide, 12 heads of 64; 4 of its 12 blocks) on 32 frames at 224 px (3,137 tokens), batch 2, bf16,
    random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own bf16 error; eager,
    capture and replay."""
    cfg = transformers.VivitConfig(num_hidden_layers=4)
    assert_tower_on_gpu(lambda: vivit.VivitModel(cfg), (torch.randn(2, 32, 3, 224, 224, device="cuda"),))
