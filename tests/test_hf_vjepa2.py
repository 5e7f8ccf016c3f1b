"""Meta's V-JEPA 2 on vitfast: transformers' `VJEPA2Model` (tubelets, the 3D RoPE whose pairs' elements turn by
different angles, the final norm; HF's predictor on vitfast's encoder output) and `VJEPA2ForVideoClassification` (the
attentive pooler and classifier on vitfast too). Compared in fp32 against HF in float64, bounded by HF's own fp32
error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_vjepa2 import HFVJEPA2ForVideoClassification, HFVJEPA2Model
from vitfast.testing import (
    assert_close,
    assert_tower_on_gpu,
    assert_tower_replays,
    assert_trains_after_inference_mode,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
vjepa2 = pytest.importorskip("transformers.models.vjepa2.modeling_vjepa2")

# clips of 4 frames at 32 px in tubelets of 2 x 8 x 8: 2 x 4 x 4 = 32 tokens; head dim 32 (three RoPE sections of
# 10 and 2 values unrotated); a one-block predictor and pooler
CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, crop_size=32, frames_per_clip=4,
              patch_size=8, tubelet_size=2, pred_hidden_size=24, pred_num_hidden_layers=1,
              pred_num_attention_heads=2, num_pooler_layers=1, num_labels=5)


def model(cls=None, **kw):
    torch.manual_seed(0)
    return perturbed((cls or vjepa2.VJEPA2Model)(transformers.VJEPA2Config(**{**CONFIG, **kw}))).eval()


@pytest.mark.parametrize("kw, shape", [({}, (2, 4, 3, 32, 32)),
                                       (dict(hidden_size=48), (2, 4, 3, 32, 32)),   # head dim 24: no unrotated rest
                                       ({}, (1, 1, 3, 32, 32)),                      # one frame: repeated, as HF's
                                       ({}, (2, 5, 3, 34, 40)),         # the 5th frame and 2 px rows dropped, as HF's
                                       (dict(hidden_act="quick_gelu"), (1, 4, 3, 32, 32))],
                         ids=["d32", "d24", "one_frame", "ragged", "quick_gelu"])
def test_encoder_equals_hf(kw, shape, monkeypatch):
    """last_hidden_state, masked_hidden_state and every hidden state, as HF's; the RoPE moved the output (so it is what
    is tested)."""
    hf = model(**kw)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFVJEPA2Model) and opt.dtype == torch.float32
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(*shape)
    with torch.no_grad():
        out, ref, eager = (m(v, skip_predictor=True, output_hidden_states=True)
                           for m, v in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref) and out.predictor_output is None
        for key in ("last_hidden_state", "masked_hidden_state"):
            assert out[key].shape == ref[key].shape
            assert_close(out[key], ref[key], eager=eager[key], name=key)
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")
        monkeypatch.setattr(vjepa2, "rotate_queries_or_keys", lambda x, pos: x)
        assert (hf64(x.double(), skip_predictor=True).last_hidden_state - ref.last_hidden_state).abs().max() > 1e-2


def test_predictor_runs_on_the_encoders_output():
    """Without skip_predictor: HF's predictor on vitfast's encoder output, its last_hidden_state and
    target_hidden_state as HF's, with the default masks and with given context / target masks."""
    hf = model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = torch.randn(2, 4, 3, 32, 32)
    masks = dict(context_mask=[torch.arange(0, 32, 2).repeat(2, 1)], target_mask=[torch.arange(1, 32, 2).repeat(2, 1)])
    with torch.no_grad():
        for kw in ({}, masks):
            out, ref, eager = (m(v, **kw) for m, v in ((opt, x), (hf64, x.double()), (hf, x)))
            assert_close(out.masked_hidden_state, ref.masked_hidden_state, eager=eager.masked_hidden_state)
            for key in ("last_hidden_state", "target_hidden_state"):
                assert_close(out.predictor_output[key], ref.predictor_output[key], eager=eager.predictor_output[key],
                             name=f"predictor {key}")
        assert_close(opt.get_vision_features(x), hf64.get_vision_features(x.double()),
                     eager=hf.get_vision_features(x))


def test_classifier_equals_hf():
    """VJEPA2ForVideoClassification: the encoder, the pooler's self-attention block and cross-attention and the
    classifier on vitfast; logits, the loss with labels and the encoder's hidden states, as HF's."""
    hf = model(vjepa2.VJEPA2ForVideoClassification)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFVJEPA2ForVideoClassification)
    x, labels = torch.randn(2, 4, 3, 32, 32), torch.tensor([1, 4])
    with torch.no_grad():
        out, ref, eager = (m(v, labels=labels, output_hidden_states=True)
                           for m, v in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref) and out.logits.shape == (2, 5)
        for key in ("logits", "loss"):
            assert_close(out[key], ref[key], eager=eager[key], name=key)
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


@pytest.mark.parametrize("cls", ["VJEPA2Model", "VJEPA2ForVideoClassification"])
def test_trains_hf_tensors(cls):
    """Every HF parameter the forward uses (not the predictor, with skip_predictor) gets HF's float64 gradient: q /
    k / v through their joined and reordered rows, the RoPE's transpose and the attention's backward kernels (the
    reference never called), the tubelet convolution through the patch embedding's backward."""
    hf = model(getattr(vjepa2, cls)).train()
    hf64 = copy.deepcopy(hf).double().train()
    opt = vitfast.optimize(hf).train()
    x = torch.randn(2, 4, 3, 32, 32)
    key = "logits" if cls.endswith("Classification") else "last_hidden_state"
    kw = {} if key == "logits" else dict(skip_predictor=True)
    weights = torch.randn(5 if key == "logits" else 64, dtype=torch.float64)
    backward_weighted(getattr(hf64(x.double(), **kw), key), weights)
    backward_weighted(getattr(opt(x, **kw), key), weights, reference_free=True)
    for (name, p), (_, p64) in zip(hf.named_parameters(), hf64.named_parameters()):
        if p64.grad is None:
            assert p.grad is None and "predictor" in name, name
        elif p64.grad.norm() < 1e-9 * max(1.0, p64.norm().item()):   # the pooler's key bias: 0 in theory, small
            assert p.grad.norm() < 1e-4, name
        else:
            assert_close(p.grad, p64.grad, name=f"grad {name}")


def test_graph_replays():
    """One capture per clip shape; later clips replay it, each equal to HF (the encoder, and the classifier)."""
    batches = [(torch.randn(2, 4, 3, 32, 32),) for _ in range(3)]
    assert_tower_replays(model(), batches)
    assert_tower_replays(model(vjepa2.VJEPA2ForVideoClassification), batches, key="logits")


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(torch.randn(1, 4, 3, 32, 32), output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values_videos: expected videos \[B, T, 3, H, W\] with H, W >= 8, "
                                         r"got \(1, 3, 32, 32\)"):
        opt(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"got \(1, 4, 3, 4, 32\)"):
        opt(torch.randn(1, 4, 3, 4, 32))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    drop = model(drop_path_rate=0.1).train()
    with pytest.raises(UnsupportedFeatureError, match=r"drop-path p=0.1 \(encoder.layer.1.drop_path\)"):
        vitfast.optimize(drop)
    assert isinstance(vitfast.optimize(drop.eval()), HFVJEPA2Model)                  # drop-path is off in eval mode


def test_trains_after_inference_mode():
    """The RoPE tables cached under torch.inference_mode are not the ones a later training step uses."""
    hf = model()
    assert_trains_after_inference_mode(vitfast.optimize(hf), (torch.randn(1, 4, 3, 32, 32),),
                                       hf.encoder.embeddings.patch_embeddings.proj.weight)


@pytest.mark.gpu
def test_vit_l_on_gpu():
    """V-JEPA 2 ViT-L at its shapes (16 frames at 256 px: 8 x 16 x 16 = 2,048 tokens; 1024 wide, head dim 64; 8 of its
    24 blocks), bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own
    bf16 error (HF computes its RoPE's angles in bf16); eager, capture and replay."""
    config = transformers.VJEPA2Config(num_hidden_layers=8, frames_per_clip=16)
    assert_tower_on_gpu(lambda: vjepa2.VJEPA2Model(config), (torch.randn(2, 16, 3, 256, 256, device="cuda"),),
                        skip_predictor=True)
