"""TimeSformer on vitfast: transformers' `TimesformerModel` (divided space-time attention: each patch's frames, then
each frame's patches with the class token, which becomes its mean over the frames; or joint space-time attention)
and `TimesformerForVideoClassification` around it. Compared in fp32 against HF in float64, bounded by HF's own fp32
error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_timesformer import HFTimesformerModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
timesformer = pytest.importorskip("transformers.models.timesformer.modeling_timesformer")

# 4 frames of 32 px in patches of 8: 1 + 16 x 4 = 65 tokens
CONFIG = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
              patch_size=8, num_frames=4, num_labels=5)


def model(cls=None, **kw):
    torch.manual_seed(0)
    return perturbed((cls or timesformer.TimesformerModel)(transformers.TimesformerConfig(**{**CONFIG, **kw})))


@pytest.mark.parametrize("attention", ["divided_space_time", "joint_space_time"], ids=["divided", "joint"])
def test_equals_hf(attention):
    """last_hidden_state and every hidden state as HF's; joint space-time attention also on 3 frames of 40 px (the
    tables resampled as HF's)."""
    hf = model(attention_type=attention)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFTimesformerModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    shapes = [(2, 4, 3, 32, 32)] + ([(2, 3, 3, 40, 40)] if attention == "joint_space_time" else [])
    for shape in shapes:
        x = torch.randn(*shape)
        with torch.no_grad():
            out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        tokens = 1 + shape[1] * (shape[3] // 8) ** 2
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, tokens, 48)
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state,
                     name=f"last_hidden_state {shape}")
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}] {shape}")


def test_video_classifier_equals_hf_and_trains():
    """TimesformerForVideoClassification: a copy with its `timesformer` on vitfast, the classifier shared; logits and
    the loss as HF's; in train mode every HF parameter gets HF's float64 gradient (the reference never called)."""
    hf = model(timesformer.TimesformerForVideoClassification, image_size=16)     # 2 x 2 patches: quick in the
    hf64 = copy.deepcopy(hf).double()                                             # interpreter
    opt = vitfast.optimize(hf)
    assert isinstance(opt.timesformer, HFTimesformerModel) and opt.classifier is hf.classifier
    x, labels = torch.randn(3, 4, 3, 16, 16), torch.tensor([0, 4, 2])
    with torch.no_grad():
        out, ref, eager = (m(px, labels=labels) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    for key in ("logits", "loss"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    hf.train(), hf64.train(), opt.train()
    w = torch.randn(3, 5, dtype=torch.float64)
    backward_weighted(hf64(x.double()).logits, w)
    backward_weighted(opt(x).logits, w, reference_free=True)
    assert_grads_match(hf, hf64)


def test_graph_replays():
    assert_tower_replays(model(image_size=16), [(torch.randn(2, 4, 3, 16, 16),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    x = torch.randn(1, 4, 3, 32, 32)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values: expected videos \[B, 4, 3, 32, 32\] \(divided space-time "
                                         r"attention: .* got \(1, 3, 3, 32, 32\)"):
        opt(torch.randn(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match=r"pixel_values: expected videos \[B, T, 3, H, W\] with H and W at least 8"):
        opt(torch.randn(1, 3, 32, 32))
    with pytest.raises(UnsupportedFeatureError, match="attention_type='space_only'"):
        vitfast.optimize(model(attention_type="space_only"))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(embeddings.pos_drop\)"):
        vitfast.optimize(model(hidden_dropout_prob=0.1).train())


@pytest.mark.gpu
def test_timesformer_on_gpu():
    """TimeSformer-B (768 wide, 12 heads of 64; 6 of its 12 blocks) on 8 frames at 224 px (1,569 tokens: temporal
    attention over 8 frames for each of 196 patches, spatial over 197 tokens per frame), batch 4, bf16, random weights
    (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own bf16 error; eager, capture and
    replay."""
    config = transformers.TimesformerConfig(num_hidden_layers=6)
    assert_tower_on_gpu(lambda: timesformer.TimesformerModel(config), (torch.randn(4, 8, 3, 224, 224, device="cuda"),))
