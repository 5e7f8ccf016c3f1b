"""PaddleOCR-VL's vision tower on vitfast: transformers' `PaddleOCRVisionModel` (a SigLIP-style NaViT over packed
images, each attending within itself: the attention kernel's varlen form), and its VLM. Compared in fp32 against HF
in float64, bounded by HF's own fp32 error; the position table's taps are HF's; the packing is transparent;
gradients reach HF's tensors; a CUDA graph replays batches of other images with the same token and image counts."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_paddleocr import HFPaddleOCRVisionModel
from vitfast.reference import position_taps
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
paddle = pytest.importorskip("transformers.models.paddleocr_vl.modeling_paddleocr_vl")

F64 = torch.float64
P = 4                                         # patch size
# a 4 x 4 position table (image_size 16 / patch 4) resized to each image's grid
VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=P)
# Three images, of odd sizes too (the projector merges 2 x 2 patches, but the tower takes any grid): T = 47.
GRID = [(1, 4, 6), (1, 2, 4), (1, 3, 5)]


def vision_model(**kw):
    cfg = transformers.models.paddleocr_vl.configuration_paddleocr_vl.PaddleOCRVisionConfig(**{**VISION, **kw})
    return perturbed(paddle.PaddleOCRVisionModel(cfg))


def packed(grid=GRID):
    """(pixel_values [1, T, 3, P, P], grid_thw [n, 3]) as HF's VLM passes them."""
    return torch.randn(1, sum(t * h * w for t, h, w in grid), 3, P, P), torch.tensor(grid)


def test_position_taps_are_hfs():
    """The bilinear taps of the position table, both ways transformers has resized it (align_corners=True in
    5.17, False in 5.2x): HF's own helper's values."""
    vision_utils = pytest.importorskip("transformers.vision_utils")
    grid = [(1, 4, 6), (2, 8, 8), (1, 10, 14), (1, 3, 3), (3, 6, 4)]
    for align_corners in (False, True):
        taps, weights = position_taps(grid, 1, 7, "bilinear", align_corners)
        ref_taps, ref_weights = vision_utils.get_vision_interpolation_indices_and_weights(
            torch.tensor(grid), num_grid_per_side=7, mode="bilinear", align_corners=align_corners)
        assert torch.equal(taps, ref_taps) and torch.equal(weights, ref_weights)


def test_vision_tower_equals_hf():
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFPaddleOCRVisionModel) and opt.dtype == torch.float32
    assert opt.resize == ("bilinear", hf.vision_model.embeddings.interpolation_align_corners)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}          # HF's tensors, no copy
    x, grid = packed()
    with torch.no_grad():
        out, ref, eager = (m(px, grid_thw=grid, output_hidden_states=True)
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert type(out) is type(ref) and set(out.keys()) == set(ref.keys()) and out.pooler_output is None
    assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state, name="last_hidden_state")
    # the embeddings and each block's output, before the post LayerNorm
    assert len(out.hidden_states) == len(ref.hidden_states) == len(hf.vision_model.encoder.layers) + 1
    for i, (o, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(o, r, eager=e, name=f"hidden_states[{i}]")
    for pick in (0, -1, [0, -2]):              # an index or a list keeps those only, as HF's (transformers 5.2x)
        assert_selects_hidden_states(opt, hf64, (x, grid), ref, pick)
    with torch.no_grad():
        as_tuple = opt(x.reshape(47, 1, 3, P, P), grid, return_dict=False)        # B x L patches: any split
    assert len(as_tuple) == 1 and torch.equal(as_tuple[0], out.last_hidden_state)


def test_packing_is_transparent():
    """Each image alone gives its rows of the packed batch (one segment over the whole sequence would move every
    row)."""
    opt = vitfast.optimize(vision_model())
    x, grid = packed()
    with torch.no_grad():
        batch = opt(x, grid)
        start = 0
        for t, h, w in GRID:
            n = t * h * w
            alone = opt(x[:, start:start + n], torch.tensor([[t, h, w]]))
            torch.testing.assert_close(batch.last_hidden_state[start:start + n], alone.last_hidden_state,
                                       rtol=1e-5, atol=1e-5)
            start += n
        one_segment = opt(x[:, :36], torch.tensor([[1, 6, 6]]))    # 36 tokens of the batch as one image
    assert (one_segment.last_hidden_state[:24] - batch.last_hidden_state[:24]).abs().max() > 1e-2


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient: the position table's through its taps, q / k / v through the
    packed qkv."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf).train()
    hf.train(), hf64.train()
    x, grid = packed()
    weights = torch.randn(32, dtype=F64)
    backward_weighted(hf64(x.double(), grid).last_hidden_state, weights)
    backward_weighted(opt(x, grid).last_hidden_state, weights, reference_free=True)  # into HF's own tensors' .grad
    assert_grads_match(hf, hf64)


def test_graph_replays_with_the_layout_as_data():
    """One capture per (tokens, images, largest image): batches of other images with those replay it, each equal to
    HF."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    grids = [GRID, GRID, [(1, 6, 4), (1, 4, 2), (1, 5, 3)], [(1, 2, 12), (1, 1, 8), (1, 15, 1)]]
    with torch.no_grad():
        for grid in grids:
            x, g = packed(grid)
            out, ref, eager = opt(x, g), hf64(x.double(), g), hf(x, g)
            assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state,
                         name="last_hidden_state")
    assert runner.captures == 1


def test_vision_language_model_equals_hf():
    """PaddleOCR-VL (PaddleOCRVLForConditionalGeneration) with the tower on vitfast (the language model shared): the
    logits over a prompt with two images, and greedy `generate`, as HF's."""
    cfgs = transformers.models.paddleocr_vl.configuration_paddleocr_vl
    text = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 2]))
    cfg = cfgs.PaddleOCRVLConfig(vision_config=VISION, text_config=text, image_token_id=98, video_token_id=97,
                                 vision_start_token_id=96, vision_end_token_id=95)
    model = perturbed(paddle.PaddleOCRVLForConditionalGeneration(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.visual, HFPaddleOCRVisionModel)
    assert opt.model.language_model is model.model.language_model
    grid = torch.tensor([(1, 4, 6), (1, 2, 4)])                  # 24 / 4 + 8 / 4 = 6 + 2 image tokens
    x = torch.randn(32, 3, P, P)                                 # the VLM takes [T, 3, P, P]
    ids = two_image_prompt()
    kw = dict(input_ids=ids, image_grid_thw=grid, mm_token_type_ids=(ids == 98).long())
    assert_vlm_equals_hf(opt, model, model64, x, kw)


def test_unsupported_and_bad_inputs_are_named():
    with pytest.raises(UnsupportedFeatureError, match=r"hidden_act='silu'"):
        vitfast.optimize(vision_model(hidden_act="silu"))
    opt = vitfast.optimize(vision_model())
    x, grid = packed()
    with pytest.raises(ValueError, match=r"pixel_values: expected patches \[B, L, 3, 4, 4\].*\(47, 3, 4, 4\)"):
        opt(x[0], grid)
    with pytest.raises(ValueError, match=r"grid_thw: expected at least one grid, .* B · L = 47"):
        opt(x, torch.tensor([[1, 4, 6], [1, 2, 4], [1, 3, 4]]))
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(x, grid, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="interp_indices"):       # a precomputed layout: refused
        opt(x, grid, interp_indices=torch.zeros(47, 4, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels at PaddleOCR-VL's head dim (72), eager then its CUDA graph's replays (other
    images each time), against HF in fp32 within 2x the error of HF itself in that dtype."""
    hf = vision_model(hidden_size=144, num_attention_heads=2, intermediate_size=288, patch_size=14,
                      image_size=224).cuda()
    grids = [[(1, 32, 24), (1, 16, 16), (1, 8, 8)], [(1, 24, 32), (1, 8, 32), (1, 8, 8)],
             [(1, 16, 48), (1, 32, 8), (1, 8, 8)]]
    assert_packed_tower_replays(hf, dtype, grids, lambda T: torch.randn(1, T, 3, 14, 14, device="cuda"))
