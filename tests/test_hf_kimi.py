"""Kimi K2.5's vision tower (MoonViT) on vitfast: transformers' `Kimi_K25VisionModel` over packed images and video
clips (each clip attending within itself, its frames together: the attention kernel's varlen form), and its VLM.
Compared in fp32 against HF in float64, bounded by HF's own fp32 error; the layout helpers give HF's numbers; the
packing is transparent; gradients reach HF's tensors; a CUDA graph replays batches of other images with the same
token and clip counts."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_kimi import HFKimiVisionModel
from vitfast.reference import position_taps, qwen_patch_layout, qwen_rope_tables, temporal_pool_layout
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
kimi = pytest.importorskip("transformers.models.kimi_k25.modeling_kimi_k25")

F64 = torch.float64
P = 4                                         # patch size
# a 4 x 4 position table resized to each grid; a frame sinusoid of 4 rows; 2 x 2 patches per merged token
VISION = dict(patch_size=P, pos_emb_height=4, pos_emb_width=4, pos_emb_time=4, num_attention_heads=2,
              num_hidden_layers=2, hidden_size=32, intermediate_size=40, merge_kernel_size=(2, 2))
# Three images: T = 44 patches in segments of 24, 8 and 12 (6 + 2 + 3 merged tokens); two clips of 3 frames (HF's
# tower in transformers 5.17 pools only batches of one frame count): 12 + 24 patches (1 + 2 merged tokens); both.
GRID = [(1, 4, 6), (1, 2, 4), (1, 6, 2)]
CLIPS = [(3, 2, 2), (3, 4, 2)]
MIXED = [(1, 4, 6), (1, 2, 4), (3, 2, 2)]


def vision_model(**kw):
    cfg = transformers.models.kimi_k25.configuration_kimi_k25.Kimi_K25VisionConfig(**{**VISION, **kw})
    return perturbed(kimi.Kimi_K25VisionModel(cfg))


def packed(grid=GRID):
    """(pixel_values [T, 3, P, P], grid_thw [n, 3]) as HF's processor gives them."""
    return torch.randn(sum(t * h * w for t, h, w in grid), 3, P, P), torch.tensor(grid)


def test_layouts_are_hfs():
    """The bicubic taps of the position table, the frame rows, the merger's slots and the RoPE tables: HF's own
    helpers' values."""
    vision_utils = pytest.importorskip("transformers.vision_utils")
    grid = [(1, 4, 6), (2, 8, 8), (1, 10, 14), (1, 2, 2), (3, 6, 4)]
    g = torch.tensor(grid)
    taps, weights = position_taps(grid, 1, 7, "bicubic", align_corners=False)
    ref_taps, ref_weights = vision_utils.get_vision_interpolation_indices_and_weights(
        g, num_grid_per_side=7, mode="bicubic", align_corners=False)
    assert torch.equal(taps, ref_taps) and torch.equal(weights, ref_weights)
    dest, share = temporal_pool_layout(grid, (2, 2))
    if isinstance(kimi.get_vision_temporal_merge_index(torch.tensor([(1, 2, 2)]), 2, 2), tuple):
        ref = kimi.get_vision_temporal_merge_index(g, 2, 2)     # transformers 5.2x: (slot, 1 / frames, merged)
        assert torch.equal(dest, ref[0]) and torch.equal(share, ref[1].float())
        assert ref[2] == sum(h // 2 * (w // 2) for _, h, w in grid)
    else:                               # 5.17: [merged tokens, frames, slots] of patch indices (one frame count)
        one = [(1, 4, 6), (1, 10, 14)]
        index = kimi.get_vision_temporal_merge_index(torch.tensor(one), 2, 2)
        slots = torch.arange(index.shape[0] * 4).view(-1, 1, 4).expand_as(index)
        assert torch.equal(temporal_pool_layout(one, (2, 2))[0][index.flatten()], slots.flatten())
    frames = kimi.get_vision_frame_index(g)
    assert torch.equal(frames, torch.cat([(torch.arange(t) + int(t > 1)).repeat_interleave(h * w)
                                          for t, h, w in grid]))
    hf = vision_model(hidden_size=48)                                      # head dim 24: 6 frequencies per axis
    pos, _ = qwen_patch_layout(grid, 1)
    cos, sin = qwen_rope_tables(pos.flip(-1), hf.rotary_emb.inv_freq, pairs=True)
    ref_cos, ref_sin = hf.rotary_emb(torch.zeros(1), vision_utils.get_vision_position_ids(g, 1))
    assert torch.equal(cos, ref_cos[:, :12]) and torch.equal(sin, ref_sin[:, :12])


@pytest.mark.parametrize("grid", [GRID, CLIPS], ids=["images", "clips"])
def test_vision_tower_equals_hf(grid):
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFKimiVisionModel) and opt.dtype == torch.float32 and opt.merge_kernel_size == (2, 2)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}          # HF's tensors, no copy
    x, grid = packed(grid)
    with torch.no_grad():
        out, ref, eager = (m(px, grid_thw=grid, output_hidden_states=True)
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert type(out) is type(ref) and set(out.keys()) == set(ref.keys())
    assert out.last_hidden_state.shape == (x.shape[0], 32) and out.pooler_output.shape == ref.pooler_output.shape
    for key in ("last_hidden_state", "pooler_output"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    # the embeddings, block 0's output, and last_hidden_state in the last block's slot (HF's output capturing)
    assert len(out.hidden_states) == len(ref.hidden_states) == len(hf.layers) + 1
    for i, (o, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(o, r, eager=e, name=f"hidden_states[{i}]")
    for pick in (0, -1, [0, -2]):              # an index or a list keeps those only, as HF's (transformers 5.2x)
        assert_selects_hidden_states(opt, hf64, (x, grid), ref, pick)
    with torch.no_grad():
        as_tuple = opt(x, grid, return_dict=False)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[1], out.pooler_output)


def test_packing_is_transparent_and_a_clips_frames_attend_together():
    """Each clip alone gives its rows of the packed batch (one segment over the whole sequence would move every
    row); a clip's frames attend to each other (its frames as separate images give other rows)."""
    opt = vitfast.optimize(vision_model())
    x, grid = packed(MIXED)
    with torch.no_grad():
        batch = opt(x, grid)
        start = 0
        for t, h, w in MIXED:
            n = t * h * w
            alone = opt(x[start:start + n], torch.tensor([[t, h, w]]))
            torch.testing.assert_close(batch.last_hidden_state[start:start + n], alone.last_hidden_state,
                                       rtol=1e-5, atol=1e-5)
            start += n
        one_segment = opt(x[:36], torch.tensor([[1, 6, 6]]))    # 36 tokens of the batch as one image
        as_images = opt(x[32:], torch.tensor([[1, 2, 2]] * 3))   # the clip's frames as 3 images
    assert (one_segment.last_hidden_state[:24] - batch.last_hidden_state[:24]).abs().max() > 1e-2
    assert (as_images.last_hidden_state - batch.last_hidden_state[32:]).abs().max() > 1e-2


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient (two clips): the position table's through its 16 taps per patch,
    q / k / v through the packed qkv, the final LayerNorm's through the merger's frame means."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf).train()
    hf.train(), hf64.train()
    x, grid = packed(CLIPS)
    weights = torch.randn(32, dtype=F64)
    backward_weighted(hf64(x.double(), grid).pooler_output, weights)
    backward_weighted(opt(x, grid).pooler_output, weights, reference_free=True)  # into HF's own tensors' .grad
    assert_grads_match(hf, hf64)


def test_graph_replays_with_the_layout_as_data():
    """One capture per (tokens, clips, longest clip): batches of other images with those replay it, each equal to
    HF."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    grids = [GRID, GRID, [(1, 6, 4), (1, 4, 2), (1, 2, 6)], [(1, 2, 12), (1, 4, 2), (1, 6, 2)]]
    with torch.no_grad():
        for grid in grids:
            x, g = packed(grid)
            out, ref, eager = opt(x, g), hf64(x.double(), g), hf(x, g)
            assert_close(out.pooler_output, ref.pooler_output, eager=eager.pooler_output, name="pooler_output")
    assert runner.captures == 1


def test_vision_language_model_equals_hf():
    """Kimi K2.5 (Kimi_K25ForConditionalGeneration, a DeepSeek-V3 language model: a dense layer, then a
    mixture-of-experts one) with the tower on vitfast (the language model shared): the logits over a prompt with two
    images, and greedy `generate`, as HF's."""
    cfg_module = transformers.models.kimi_k25.configuration_kimi_k25
    text = dict(model_type="deepseek_v3", vocab_size=99, hidden_size=48, intermediate_size=64,
                moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=8,
                max_position_embeddings=128)
    cfg = cfg_module.Kimi_K25Config(vision_config=VISION, text_config=text, projection_hidden_size=32,
                                    image_token_id=98, video_token_id=97)
    model = perturbed(kimi.Kimi_K25ForConditionalGeneration(cfg))
    model.set_experts_implementation("eager")          # the experts as a loop of GEMMs: grouped_mm takes no float64
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.vision_tower, HFKimiVisionModel)
    assert opt.model.language_model is model.model.language_model
    x, grid = packed(GRID[:2])                                   # 24 / 4 + 8 / 4 = 6 + 2 image tokens
    ids = two_image_prompt()
    kw = dict(input_ids=ids, image_grid_thw=grid, attention_mask=torch.ones_like(ids))
    assert_vlm_equals_hf(opt, model, model64, x, kw)


def test_unsupported_and_bad_inputs_are_named():
    with pytest.raises(UnsupportedFeatureError, match=r"hidden_act='silu'"):
        vitfast.optimize(vision_model(hidden_act="silu"))
    opt = vitfast.optimize(vision_model())
    x, grid = packed()
    with pytest.raises(ValueError, match=r"pixel_values: expected patches \[T, 3, 4, 4\].*\(44, 48\)"):
        opt(x.reshape(44, 48), grid)
    with pytest.raises(ValueError, match=r"grid_thw: expected at least one grid, .* divisible by 2 .* T = 44"):
        opt(x, torch.tensor([[1, 4, 6], [1, 2, 4], [1, 3, 4]]))
    with pytest.raises(ValueError, match=r"grid_thw: expected clips of at most 4 frames .* \[1, 5\]"):
        opt(x[:44], torch.tensor([[1, 4, 6], [5, 2, 2]]))
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(x, grid, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="frame_index"):          # a precomputed layout: refused
        opt(x, grid, frame_index=torch.zeros(44, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels at MoonViT's head dim (72), eager then its CUDA graph's replays (other images
    each time), against HF in fp32 within 2x the error of HF itself in that dtype."""
    hf = vision_model(hidden_size=144, num_attention_heads=2, intermediate_size=288, patch_size=14, pos_emb_height=16,
                      pos_emb_width=16).cuda()
    grids = [[(1, 32, 24), (1, 16, 16), (2, 8, 8)], [(1, 24, 32), (1, 8, 32), (2, 8, 8)],
             [(1, 16, 48), (1, 32, 8), (2, 8, 8)]]
    assert_packed_tower_replays(hf, dtype, grids, lambda T: torch.randn(T, 3, 14, 14, device="cuda"),
                                keys=("last_hidden_state", "pooler_output"))
