"""ERNIE 4.5 VL's vision tower on vitfast: transformers' `Ernie4_5_VLMoeVisionTransformerPretrainedModel` over
Qwen2-VL's packed patch sequences (each frame attending within itself: the attention kernel's varlen form), and its
VLM. Compared in fp32 against HF in float64, bounded by HF's own fp32 error; the packing is transparent; gradients
reach HF's tensors; a CUDA graph replays batches of other images with the same token and segment counts."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_ernie import HFErnieVisionModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_packed_tower_replays,
    assert_selects_hidden_states,
    assert_vlm_equals_hf,
    backward_weighted,
    perturbed,
    simulate_cuda_graphs,
    two_image_prompt,
)

transformers = pytest.importorskip("transformers")
ernie = pytest.importorskip("transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe")
configs = pytest.importorskip("transformers.models.ernie4_5_vl_moe.configuration_ernie4_5_vl_moe")

F64 = torch.float64
P = 4                                         # patch size
VISION = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=48, patch_size=P, spatial_merge_size=2)
# Two images and a video of 2 frames: T = 40 patches in segments of 24, 8, 4 and 4.
GRID = [(1, 4, 6), (1, 2, 4), (2, 2, 2)]


def vision_model(name="Ernie4_5_VLMoeVisionTransformerPretrainedModel", **kw):
    return perturbed(getattr(ernie, name)(configs.Ernie4_5_VLMoeVisionConfig(**{**VISION, **kw})))


def packed(grid=GRID):
    """(hidden_states [T, C·P·P], grid_thw [n, 3]) as HF's processor gives them."""
    return torch.randn(sum(t * h * w for t, h, w in grid), 3 * P * P), torch.tensor(grid)


@pytest.mark.parametrize("name", ["Ernie4_5_VLMoeVisionTransformerPretrainedModel",
                                  "Ernie4_5_VL_MoeVisionTransformerPretrainedModel"])    # (the deprecated name)
def test_vision_tower_equals_hf(name):
    hf = vision_model(name)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFErnieVisionModel) and opt.dtype == torch.float32 and opt.spatial_merge_size == 2
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}          # HF's tensors, no copy
    x, grid = packed()
    with torch.no_grad():
        out, ref, eager = (m(px, grid_thw=grid, output_hidden_states=True)
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert type(out) is type(ref) and set(out.keys()) == set(ref.keys())
    assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state, name="last_hidden_state")
    # the embeddings, block 0's output, and last_hidden_state in the last block's slot (HF's output capturing)
    assert len(out.hidden_states) == len(ref.hidden_states) == len(hf.blocks) + 1
    for i, (o, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(o, r, eager=e, name=f"hidden_states[{i}]")
    for pick in (0, -1, [0, -2]):              # an index or a list keeps those only, as HF's (transformers 5.2x)
        assert_selects_hidden_states(opt, hf64, (x, grid), ref, pick)
    with torch.no_grad():
        as_tuple = opt(x, grid, return_dict=False)
    assert len(as_tuple) == 1 and torch.equal(as_tuple[0], out.last_hidden_state)


def test_packing_is_transparent_and_trains_hf_tensors():
    """Each image alone gives its rows of the packed batch (one segment over the whole sequence would move every
    row); every HF parameter gets HF's float64 gradient."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x, grid = packed()
    with torch.no_grad():
        batch = opt(x, grid)
        start = 0
        for t, h, w in GRID:
            n = t * h * w
            alone = opt(x[start:start + n], torch.tensor([[t, h, w]]))
            torch.testing.assert_close(batch.last_hidden_state[start:start + n], alone.last_hidden_state,
                                       rtol=1e-5, atol=1e-5)
            start += n
        one_segment = opt(x[:36], torch.tensor([[1, 6, 6]]))    # 36 tokens of the batch as one image
    assert (one_segment.last_hidden_state[:24] - batch.last_hidden_state[:24]).abs().max() > 1e-2
    opt.train(), hf.train(), hf64.train()
    weights = torch.randn(32, dtype=F64)
    backward_weighted(hf64(x.double(), grid).last_hidden_state, weights)
    backward_weighted(opt(x, grid).last_hidden_state, weights, reference_free=True)  # into HF's own tensors' .grad
    assert_grads_match(hf, hf64)


def test_graph_replays_with_the_layout_as_data():
    """One capture per (tokens, segments, longest segment): batches of other images with those replay it, each
    equal to HF."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    grids = [GRID, GRID, [(1, 6, 4), (1, 4, 2), (2, 2, 2)], [(1, 2, 12), (1, 2, 4), (1, 2, 2), (1, 2, 2)]]
    with torch.no_grad():
        for grid in grids:
            x, g = packed(grid)
            out, ref, eager = opt(x, g), hf64(x.double(), g), hf(x, g)
            assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state,
                         name="last_hidden_state")
    assert runner.captures == 1


def test_vision_language_model_equals_hf():
    """ERNIE 4.5 VL (Ernie4_5_VLMoeForConditionalGeneration: a dense layer, then a mixture-of-experts one; the
    resampler after the tower stays HF's) with the tower on vitfast (the language model shared): the logits over a
    prompt with two images, and greedy `generate`, as HF's."""
    text = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, moe_intermediate_size=[16, 16], moe_k=2,
                moe_num_experts=4, moe_num_shared_experts=1,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 2]))
    cfg = configs.Ernie4_5_VLMoeConfig(vision_config=VISION, text_config=text, image_token_id=98, video_token_id=97,
                                       image_start_token_id=96, image_end_token_id=95, video_start_token_id=94,
                                       video_end_token_id=93)
    model = perturbed(ernie.Ernie4_5_VLMoeForConditionalGeneration(cfg))
    model.set_experts_implementation("eager")          # the experts as a loop of GEMMs: grouped_mm takes no float64
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.vision_tower, HFErnieVisionModel)
    assert opt.model.language_model is model.model.language_model
    x, grid = packed(GRID[:2])                                   # 24 / 4 + 8 / 4 = 6 + 2 image tokens
    ids = two_image_prompt()
    kw = dict(input_ids=ids, image_grid_thw=grid, mm_token_type_ids=(ids == 98).long())
    assert_vlm_equals_hf(opt, model, model64, x, kw)


def test_unsupported_and_bad_inputs_are_named():
    with pytest.raises(UnsupportedFeatureError, match=r"hidden_act='silu'"):
        vitfast.optimize(vision_model(hidden_act="silu"))
    opt = vitfast.optimize(vision_model())
    x, grid = packed()
    with pytest.raises(ValueError, match=r"hidden_states: expected patches \[T, 48\].*\(40, 24\)"):
        opt(x[:, :24], grid)
    with pytest.raises(ValueError, match=r"grid_thw: expected at least one grid, .* divisible by 2 .* T = 40"):
        opt(x, torch.tensor([[1, 4, 6], [1, 2, 4], [1, 2, 3]]))
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(x, grid, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="cu_seqlens"):          # a precomputed layout: refused
        opt(x, grid, cu_seqlens=torch.tensor([0, 40], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels at ERNIE 4.5 VL's head dim (80), eager then its CUDA graph's replays (other
    images each time), against HF in fp32 within 2x the error of HF itself in that dtype."""
    hf = vision_model(hidden_size=160, num_heads=2, intermediate_size=320, patch_size=14).cuda()
    grids = [[(1, 32, 24), (1, 16, 16), (2, 8, 8)], [(1, 24, 32), (1, 8, 32), (2, 8, 8)],
             [(1, 16, 48), (1, 32, 8), (2, 8, 8)]]
    assert_packed_tower_replays(hf, dtype, grids, lambda T: torch.randn(T, 3 * 14 * 14, device="cuda"))
