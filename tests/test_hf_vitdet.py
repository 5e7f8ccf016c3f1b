"""ViTDet on vitfast: transformers' `VitDetModel` and `VitDetBackbone` (windowed blocks over a zero-padded grid and
global ones, decomposed relative positions in the attention kernel, residual conv blocks, the absolute table resized
to any image size) and `VitMatteForImageMatting` around the backbone. Compared in fp32 against HF in float64, bounded
by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_vitdet import HFVitDetBackbone, HFVitDetModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
vitdet = pytest.importorskip("transformers.models.vitdet.modeling_vitdet")

# patches of 8 at 32 px: a 4 x 4 grid, windows of 3 (padded to 6 x 6); blocks 0 and 2 windowed, 1 and 3 global and
# followed by a residual conv block
CONFIG = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=2, image_size=32,
              pretrain_image_size=32, patch_size=8, window_size=3, window_block_indices=[0, 2],
              residual_block_indices=[1, 3], use_relative_position_embeddings=True)


def model(cls=None, **kw):
    torch.manual_seed(0)
    return perturbed((cls or vitdet.VitDetModel)(transformers.VitDetConfig(**{**CONFIG, **kw})))


@pytest.mark.parametrize("rel_pos", [True, False], ids=["rel_pos", "no_rel_pos"])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 3, 40, 61)], ids=["configured", "resized_40x61"])
def test_equals_hf(shape, rel_pos):
    """last_hidden_state [B, C, rows, columns] and every hidden state as HF's, at the configured size and at another
    (the tables resized, the windows padded otherwise, pixels past whole patches dropped)."""
    hf = model(use_relative_position_embeddings=rel_pos)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFVitDetModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(*shape)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, 48, shape[2] // 8, shape[3] // 8)
    assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state, name="last_hidden_state")
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_backbone_equals_hf():
    """VitDetBackbone: the stages' maps (the stem's too) as HF's; hidden states only when asked for; out_features
    set later read on the next call."""
    hf = model(vitdet.VitDetBackbone, out_features=["stem", "stage2", "stage4"])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFVitDetBackbone) and opt.channels == [48, 48, 48]
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        out, ref, eager = (m(px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert out.hidden_states is None and ref.hidden_states is None
    assert len(out.feature_maps) == len(ref.feature_maps) == 3
    for o, r, e in zip(out.feature_maps, ref.feature_maps, eager.feature_maps):
        assert o.shape == r.shape == (2, 48, 5, 6)
        assert_close(o, r, eager=e, name="feature_maps")
    for m in (hf, hf64):
        m.config.out_features = ["stage3"]
    with torch.no_grad():
        out, ref = opt(x, output_hidden_states=True), hf64(x.double(), output_hidden_states=True)
    assert len(out.feature_maps) == 1 and len(out.hidden_states) == 5
    assert_close(out.feature_maps[0], ref.feature_maps[0], tol=1e-5, name="stage3")


def test_vitmatte_equals_hf():
    """VitMatteForImageMatting (an image and its trimap: 4 channels in): a copy with its `backbone` on vitfast, the
    decoder shared; the alphas as HF's."""
    vitmatte = pytest.importorskip("transformers.models.vitmatte.modeling_vitmatte")
    backbone = dict(model_type="vitdet", **{**CONFIG, "image_size": 64, "pretrain_image_size": 64, "patch_size": 16},
                    num_channels=4, out_features=["stage4"])
    config = transformers.VitMatteConfig(backbone_config=backbone, hidden_size=48, convstream_hidden_sizes=[8, 16, 24],
                                         fusion_hidden_sizes=[32, 16, 8, 8])
    torch.manual_seed(0)
    hf = perturbed(vitmatte.VitMatteForImageMatting(config))
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.backbone, HFVitDetBackbone) and opt.decoder is hf.decoder
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        out, ref, eager = (m(px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert out.alphas.shape == ref.alphas.shape == (2, 1, 64, 64)
    assert_close(out.alphas, ref.alphas, eager=eager.alphas, name="alphas")


def test_trains_hf_tensors():
    """Every HF parameter (the relative-position tables and the residual blocks' too) gets HF's float64 gradient, the
    reference never called."""
    hf = model().train()
    hf64 = copy.deepcopy(hf).double().train()
    opt = vitfast.optimize(hf).train()
    x, w = torch.randn(2, 3, 32, 32), torch.randn(48, 4, 4, dtype=torch.float64)
    backward_weighted(hf64(x.double()).last_hidden_state, w)
    backward_weighted(opt(x).last_hidden_state, w, reference_free=True)
    assert_grads_match(hf, hf64)


def test_graph_replays():
    assert_tower_replays(model(), [(torch.randn(2, 3, 40, 48),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values: expected images \[B, 3, H, W\] with H and W at least 8, got "
                                         r"\(1, 3, 4, 32\)"):
        opt(torch.randn(1, 3, 4, 32))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(encoder.layer.0.mlp.drop\)"):
        vitfast.optimize(model(dropout_prob=0.1).train())


@pytest.mark.gpu
def test_vitdet_on_gpu():
    """ViTDet-B as ViTMatte-B has it (768 wide, 12 blocks, 12 heads of 64: 8 blocks in windows of 14, 4 global ones
    followed by residual conv blocks) at 1024 px (64 x 64 patches: windows over a grid padded to 70 x 70, 4,096 tokens
    in the global blocks), batch 2, bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU,
    bounded by HF's own bf16 error; eager, capture and replay."""
    config = transformers.VitDetConfig(image_size=1024, window_size=14, window_block_indices=[0, 1, 3, 4, 6, 7, 9, 10],
                                       residual_block_indices=[2, 5, 8, 11], use_relative_position_embeddings=True)
    assert_tower_on_gpu(lambda: vitdet.VitDetModel(config), (torch.randn(2, 3, 1024, 1024, device="cuda"),))
