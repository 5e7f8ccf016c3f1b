"""Step3p7's vision tower on vitfast: transformers' `Step3p7VisionModel` (the patch embedding with HF's table, resized
bilinearly to the grid, in its epilogue; the pre-LayerNorm; per block the axial 2D RoPE on q and k with HF's own angles,
layer-scales in the epilogues; HF's two downsampling convolutions). Compared in fp32 against HF in float64, bounded by
HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_step3p7 import HFStep3p7VisionModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
step3p7 = pytest.importorskip("transformers.models.step3p7.modeling_step3p7")
config_module = pytest.importorskip("transformers.models.step3p7.configuration_step3p7")

# 32 px images in patches of 8: a 4 x 4 table; 3 heads of 16 (the 2D RoPE: a quarter of each head per axis)
CONFIG = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=32,
              patch_size=8)


def model(**kw):
    torch.manual_seed(0)
    return perturbed(step3p7.Step3p7VisionModel(config_module.Step3p7VisionConfig(**{**CONFIG, **kw})))


@pytest.mark.parametrize("size", [(32, 32), (48, 32)], ids=["table_size", "resized"])
def test_equals_hf(size):
    """last_hidden_state (after the downsampling convolutions) and every hidden state, as HF's: at the table's grid,
    and at another (the table resized by HF's method, the RoPE over the new grid)."""
    hf = model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFStep3p7VisionModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state, name="last_hidden_state")
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient through the kernels' backward (the RoPE's, the attention's),
    the reference never called."""
    hf = model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    hf.train(), hf64.train(), opt.train()
    x = torch.randn(2, 3, 48, 32)
    out64 = hf64(x.double()).last_hidden_state
    weights = torch.randn(out64.shape, dtype=torch.float64)
    backward_weighted(out64, weights)
    backward_weighted(opt(x).last_hidden_state, weights, reference_free=True)
    assert_grads_match(hf, hf64)


def test_graph_replays():
    assert_tower_replays(model(), [(torch.randn(2, 3, 32, 32),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(torch.randn(1, 3, 32, 32), output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values: expected images \[B, 3, H, W\] with H and W multiples of 8, "
                                         r"got \(1, 3, 36, 32\)"):
        opt(torch.randn(1, 3, 36, 32))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))


@pytest.mark.gpu
def test_step3p7_tower_on_gpu():
    """Step3p7's tower at its config (1536 wide, 16 heads of 96; 4 of its 47 blocks) on images of 728 px (2,704
    patches), batch 2, bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by
    HF's own bf16 error; eager, capture and replay."""
    cfg = config_module.Step3p7VisionConfig(num_hidden_layers=4)
    assert_tower_on_gpu(lambda: step3p7.Step3p7VisionModel(cfg), (torch.randn(2, 3, 728, 728, device="cuda"),))
