"""VideoMAE on vitfast: transformers' `VideoMAEModel` (tubelets through one patch embedding, the fixed sinusoid table
in its epilogue, masked tokens dropped, q / v biases without k's) and the models around it,
`VideoMAEForVideoClassification` and `VideoMAEForPreTraining`. Compared in fp32 against HF in float64, bounded by
HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward, masks as data."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_videomae import HFVideoMAEModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
videomae = pytest.importorskip("transformers.models.videomae.modeling_videomae")

# 4 frames of 32 px in tubelets of 2 x 8 x 8: 2 x 4 x 4 = 32 tokens
CONFIG = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=32,
              patch_size=8, num_frames=4, tubelet_size=2, num_labels=5, decoder_hidden_size=24,
              decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=48)


def config(**kw):
    if "qv_bias" in kw:                         # transformers 5.1x names it qkv_bias (and gives k a bias too)
        kw["qkv_bias"] = kw["qv_bias"]
    return transformers.VideoMAEConfig(**{**CONFIG, **kw})


def model(cls=None, **kw):
    torch.manual_seed(0)
    return perturbed((cls or videomae.VideoMAEModel)(config(**kw)))


def masks(batch: int, tokens: int = 32, masked: int = 20) -> torch.Tensor:
    out = torch.zeros(batch, tokens, dtype=torch.bool)
    for row in out:
        row[torch.randperm(tokens)[:masked]] = True
    return out


@pytest.mark.parametrize("qv_bias", [True, False], ids=["qv_bias", "no_bias"])
@pytest.mark.parametrize("mean_pooling", [True, False], ids=["no_final_norm", "final_norm"])
def test_equals_hf(mean_pooling, qv_bias):
    """last_hidden_state and every hidden state, as HF's: the whole clip, a clip with one frame past the last whole
    tubelet (dropped, as the Conv3d drops it), and the visible tokens of a masked one."""
    hf = model(use_mean_pooling=mean_pooling, qv_bias=qv_bias)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFVideoMAEModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    for frames, kw, tokens in ((4, {}, 32), (5, {}, 32), (4, dict(bool_masked_pos=masks(2)), 12)):
        x = torch.randn(2, frames, 3, 32, 32)
        with torch.no_grad():
            out, ref, eager = (m(px, output_hidden_states=True, **kw) for m, px in ((opt, x), (hf64, x.double()),
                                                                                   (hf, x)))
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, tokens, 48)
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state,
                     name=f"last_hidden_state {frames} frames {list(kw)}")
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}] {list(kw)}")


@pytest.mark.parametrize("mean_pooling", [True, False], ids=["mean_pooling", "first_token"])
def test_video_classifier_equals_hf(mean_pooling):
    """VideoMAEForVideoClassification: a copy with its `videomae` on vitfast, the pooling, fc_norm and classifier
    shared; logits and the loss with labels as HF's."""
    hf = model(videomae.VideoMAEForVideoClassification, use_mean_pooling=mean_pooling)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.videomae, HFVideoMAEModel) and opt.classifier is hf.classifier
    x, labels = torch.randn(3, 4, 3, 32, 32), torch.tensor([0, 4, 2])
    with torch.no_grad():
        out, ref, eager = (m(px, labels=labels) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    for key in ("logits", "loss"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)


@pytest.mark.parametrize("norm_pix_loss", [True, False], ids=["norm_pix_loss", "pixel_loss"])
def test_pretraining_equals_hf_and_trains(norm_pix_loss):
    """VideoMAEForPreTraining: its `videomae` on vitfast over the visible tokens, the decoder and the pixel loss
    shared: the masked tokens' reconstruction and the loss as HF's; in train mode every HF parameter (the encoder's,
    the decoder's and the mask token) gets HF's float64 gradient, the reference never called."""
    hf = model(videomae.VideoMAEForPreTraining, norm_pix_loss=norm_pix_loss)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.videomae, HFVideoMAEModel) and opt.decoder is hf.decoder
    x, masked = torch.randn(2, 4, 3, 32, 32), masks(2)
    with torch.no_grad():
        out, ref, eager = (m(px, bool_masked_pos=masked) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert out.logits.shape == ref.logits.shape == (2, 20, 2 * 8 * 8 * 3)
    for key in ("logits", "loss"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    hf.train(), hf64.train(), opt.train()
    hf64(x.double(), bool_masked_pos=masked).loss.backward()
    backward_weighted(opt(x, bool_masked_pos=masked).loss, torch.ones((), dtype=torch.float64), reference_free=True)
    assert_grads_match(hf, hf64)


def test_graph_replays():
    """One capture serves clips with other masks of as many visible tokens (their indices are the graph's data)."""
    assert_tower_replays(model(), [(torch.randn(2, 4, 3, 32, 32),) for _ in range(3)])
    assert_tower_replays(model(), [(torch.randn(2, 4, 3, 32, 32), masks(2)) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    x = torch.randn(1, 4, 3, 32, 32)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values: expected videos \[B, T, 3, 32, 32\] with T // 2 = 2 tubelets "
                                         r"\(the model's num_frames and image size\), got \(1, 6, 3, 32, 32\)"):
        opt(torch.randn(1, 6, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got \(1, 4, 3, 32, 24\)"):
        opt(torch.randn(1, 4, 3, 32, 24))
    with pytest.raises(ValueError, match=r"bool_masked_pos: expected \[B, tokens\] = \[1, 32\], got \(1, 16\)"):
        opt(x, bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool))
    uneven = masks(2)
    uneven[0, uneven[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match=r"as many visible tokens in every video .* got \[13, 12\]"):
        opt(torch.randn(2, 4, 3, 32, 32), bool_masked_pos=uneven)
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(encoder.layer.0.output.dropout\)"):
        vitfast.optimize(model(hidden_dropout_prob=0.1).train())


@pytest.mark.gpu
def test_videomae_on_gpu():
    """VideoMAE-B (768 wide, 12 heads of 64; 8 of its 12 blocks) on 16 frames at 224 px (1,568 tubelet tokens),
    batch 4, bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own
    bf16 error; eager, capture and replay."""
    cfg = transformers.VideoMAEConfig(num_hidden_layers=8)
    assert_tower_on_gpu(lambda: videomae.VideoMAEModel(cfg), (torch.randn(4, 16, 3, 224, 224, device="cuda"),))
