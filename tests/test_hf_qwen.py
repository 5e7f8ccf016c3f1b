"""Qwen2-VL's, Qwen2.5-VL's (and Qwen2.5-Omni's), Qwen3-VL's and Qwen3.5's vision towers on vitfast: transformers'
`Qwen2VisionTransformerPretrainedModel`, `Qwen2_5_VisionTransformerPretrainedModel`, `Qwen2_5OmniVisionEncoder`,
`Qwen3VLVisionModel` (and Qwen3-Omni's `Qwen3OmniMoeVisionEncoder`) and `Qwen3_5VisionModel` (the
patches of several images and video frames packed into one sequence, each frame attending within itself, Qwen2.5-VL's
windows within themselves: the attention kernel's varlen form), and their VLMs. Compared in fp32 against HF in
float64, bounded by HF's own fp32 error; the packing is transparent (each image alone gives its rows); gradients
reach HF's tensors; a CUDA graph replays batches of other images with the same token and segment counts."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_qwen import HFQwenVisionModel
from vitfast.reference import qwen3_position_taps, qwen_patch_layout, qwen_window_layout
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
    without_reference,
)

transformers = pytest.importorskip("transformers")

F64 = torch.float64
P, TP = 4, 2                                  # patch size, frames per temporal patch
WIDTH = 3 * TP * P * P
VISION = {
    "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2, patch_size=P,
                     temporal_patch_size=TP, spatial_merge_size=2),
    # RMSNorms and a gated MLP; windows of 2 x 2 merged patches (16 pixels), but in block 1, which attends per frame
    "qwen2_5_vl": dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=P, temporal_patch_size=TP,
                       spatial_merge_size=2, out_hidden_size=48, window_size=16, fullatt_block_indexes=[1]),
    # a 4 x 4 position table stretched and shrunk to each grid; DeepStack mergers after blocks 0 and 2
    "qwen3_vl": dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=P, temporal_patch_size=TP,
                     spatial_merge_size=2, out_hidden_size=48, num_position_embeddings=16,
                     deepstack_visual_indexes=[0, 2]),
    # EXAONE 4.5's: Qwen2.5-VL's tower with grouped-query attention (4 query heads, 2 key / value heads)
    "exaone4_5": dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=4, num_key_value_heads=2, patch_size=P,
                      temporal_patch_size=TP, spatial_merge_size=2, out_hidden_size=48, window_size=16,
                      fullatt_block_indexes=[1]),
    # Qwen3.5's: Qwen3-VL's tower without DeepStack
    "qwen3_5": dict(depth=3, hidden_size=32, intermediate_size=40, num_heads=2, patch_size=P, temporal_patch_size=TP,
                    spatial_merge_size=2, out_hidden_size=48, num_position_embeddings=16),
}
TEXT = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
# Two images and a video of 2 frames (temporal patches): T = 64 patches in segments of 24, 8, 16 and 16.
GRID = [(1, 4, 6), (1, 2, 4), (2, 4, 4)]


def vision_model(family: str, **kw):
    cls = {"qwen2_vl": (transformers.Qwen2VLVisionConfig,
                        transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel),
           "qwen2_5_vl": (transformers.Qwen2_5_VLVisionConfig,
                          transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel),
           "qwen2_5_omni": (transformers.models.qwen2_5_omni.Qwen2_5OmniVisionEncoderConfig,
                            transformers.models.qwen2_5_omni.modeling_qwen2_5_omni.Qwen2_5OmniVisionEncoder),
           "qwen3_vl": (transformers.Qwen3VLVisionConfig, transformers.Qwen3VLVisionModel),
           "qwen3_vl_moe": (transformers.Qwen3VLMoeVisionConfig, transformers.Qwen3VLMoeVisionModel),
           "qwen3_5": (transformers.Qwen3_5VisionConfig,
                       transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5VisionModel),
           "qwen3_omni": (transformers.models.qwen3_omni_moe.Qwen3OmniMoeVisionEncoderConfig,
                          transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe.Qwen3OmniMoeVisionEncoder),
           "qwen3_5_moe": (transformers.Qwen3_5MoeVisionConfig,
                           transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeVisionModel),
           "exaone4_5": lambda: (transformers.models.exaone4_5.modeling_exaone4_5.Exaone4_5_VisionConfig,
                                 transformers.models.exaone4_5.modeling_exaone4_5.Exaone4_5_VisionModel),
           "qwen4_exp": lambda: (pytest.importorskip("transformers.models.qwen4_exp").Qwen4ExpVisionConfig,
                                 transformers.models.qwen4_exp.modeling_qwen4_exp.Qwen4ExpVisionModel)}[family]
    cls = cls() if callable(cls) else cls       # Qwen4-Exp: transformers 5.2x only
    config = VISION["qwen3_5" if family == "qwen4_exp" else family.removesuffix("_moe").replace("omni", "vl")]
    return perturbed(cls[1](cls[0](**{**config, **kw})))
    # (Qwen2.5-Omni's tower takes Qwen2.5-VL's config, Qwen3-Omni's Qwen3-VL's)


def packed(grid=GRID):
    """(hidden_states [T, C·t·P·P], grid_thw [n, 3]) as HF's processor gives them."""
    return torch.randn(sum(t * h * w for t, h, w in grid), WIDTH), torch.tensor(grid)


def test_layouts_are_hfs():
    """Positions, segments, Qwen2.5-VL's windows and Qwen3-VL's position-table taps: HF's own helpers' values."""
    vision_utils = pytest.importorskip("transformers.vision_utils")
    grid = [(1, 4, 6), (2, 8, 8), (1, 10, 14), (1, 2, 2), (3, 6, 4)]
    g = torch.tensor(grid)
    pos, cu = qwen_patch_layout(grid, 2)
    assert torch.equal(pos, vision_utils.get_vision_position_ids(g, 2))
    assert torch.equal(cu, vision_utils.get_vision_cu_seqlens(g))
    for window_size in (112, 56):                                        # 4 x 4 and 2 x 2 merged patches
        order, cu_window = qwen_window_layout(grid, 2, window_size // 2 // 14)
        ref_order, ref_cu = vision_utils.get_vision_window_index(g, 2, window_size, 14)
        assert torch.equal(order, ref_order) and torch.equal(cu_window, ref_cu)
    taps, weights = qwen3_position_taps(grid, 2, 7)
    ref_taps, ref_weights = vision_utils.get_vision_interpolation_indices_and_weights(
        g, num_grid_per_side=7, mode="bilinear", align_corners=True, spatial_merge_size=2)
    assert torch.equal(taps, ref_taps) and torch.equal(weights, ref_weights)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen2_5_omni", "qwen3_vl", "qwen3_vl_moe", "qwen3_omni",
                                    "qwen3_5", "qwen3_5_moe", "qwen4_exp", "exaone4_5"])
def test_vision_tower_equals_hf(family):
    hf = vision_model(family)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFQwenVisionModel) and opt.dtype == torch.float32 and opt.spatial_merge_size == 2
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}          # HF's tensors, no copy
    x, grid = packed()
    with torch.no_grad():
        out, ref, eager = (m(px, grid_thw=grid, output_hidden_states=True)
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert type(out) is type(ref) and set(out.keys()) == set(ref.keys())
    for key in ("last_hidden_state", "pooler_output"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert len(out.hidden_states) == len(ref.hidden_states) == len(hf.blocks) + 1
    for i, (o, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(o, r, eager=e, name=f"hidden_states[{i}]")
    for pick in (0, -1, [0, -2]):              # an index or a list keeps those only, as HF's (transformers 5.2x)
        assert_selects_hidden_states(opt, hf64, (x, grid), ref, pick)
    if family.startswith(("qwen3_vl", "qwen3_omni")):
        assert len(out.deepstack_features) == len(ref.deepstack_features) == 2
        for i, (o, r, e) in enumerate(zip(out.deepstack_features, ref.deepstack_features, eager.deepstack_features)):
            assert_close(o, r, eager=e, name=f"deepstack_features[{i}]")
    with torch.no_grad():
        as_tuple = opt(x, grid, return_dict=False)
    assert len(as_tuple) == len(out.to_tuple()) - 1 and torch.equal(as_tuple[1], out.pooler_output)


def test_packing_is_transparent():
    """Each image alone gives its rows of the packed batch (Qwen2.5-VL: its windows, and its frames in the block
    that attends per frame): no frame attends outside itself (one segment over the whole sequence would move every
    row)."""
    opt = vitfast.optimize(vision_model("qwen2_5_vl"))
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
        one_segment = opt(x, torch.tensor([[1, 8, 8]]))             # the same T as one image: other attention
    assert (one_segment.last_hidden_state - batch.last_hidden_state).abs().max() > 1e-2


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient: the position table's through its taps, the patch embedding's
    through the GEMM, the DeepStack mergers' through their outputs."""
    hf = vision_model("qwen3_vl")
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf).train()
    hf.train(), hf64.train()
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x, grid = packed()
    weights = torch.randn(48, dtype=F64)

    def loss(out):
        deep = sum(f.square().mean() for f in out.deepstack_features)
        return (out.pooler_output * weights.to(out.pooler_output.dtype)).sum() + deep

    loss(hf64(x.double(), grid)).backward()
    out = loss(opt(x, grid))
    with without_reference():
        out.backward()                                           # into HF's own tensors' .grad
    assert_grads_match(hf, hf64)


def test_grouped_query_tower_trains_hf_tensors():
    """EXAONE 4.5's grouped-query qkv: each key / value head's rows get the gradients of every query head that reads
    them, HF's float64 gradient."""
    hf = vision_model("exaone4_5")
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf).train()
    hf.train(), hf64.train()
    x, grid = packed()
    weights = torch.randn(48, dtype=F64)
    backward_weighted(hf64(x.double(), grid).pooler_output, weights)
    backward_weighted(opt(x, grid).pooler_output, weights, reference_free=True)
    assert_grads_match(hf, hf64)


def test_graph_replays_with_the_layout_as_data():
    """One capture per (tokens, segments, longest segment): batches of other images with those replay it, each
    equal to HF."""
    hf = vision_model("qwen3_vl")
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    grids = [GRID, GRID, [(1, 6, 4), (1, 4, 2), (1, 4, 4), (1, 2, 8)], [(1, 2, 12), (1, 4, 2), (2, 4, 4)]]
    with torch.no_grad():
        for grid in grids:
            x, g = packed(grid)
            out, ref, eager = opt(x, g), hf64(x.double(), g), hf(x, g)
            assert_close(out.pooler_output, ref.pooler_output, eager=eager.pooler_output, name="pooler_output")
            assert_close(out.deepstack_features[0], ref.deepstack_features[0], eager=eager.deepstack_features[0],
                         name="deepstack_features[0]")
    assert runner.captures == 1


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_vision_language_model_equals_hf(family):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 with the tower on vitfast (the language model shared): the logits
    over a prompt with two images, and greedy `generate`, as HF's."""
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 2])
    if family in ("qwen2_vl", "qwen2_5_vl"):
        cls, cfg = {"qwen2_vl": (transformers.Qwen2VLForConditionalGeneration, transformers.Qwen2VLConfig),
                    "qwen2_5_vl": (transformers.Qwen2_5_VLForConditionalGeneration, transformers.Qwen2_5_VLConfig)
                    }[family]
        text = dict(TEXT, rope_parameters=rope, bos_token_id=0, eos_token_id=1)
    elif family == "qwen3_vl":
        cls, text = transformers.Qwen3VLForConditionalGeneration, dict(TEXT, head_dim=12, rope_parameters=dict(
            rope, mrope_interleaved=True))
        cfg = transformers.Qwen3VLConfig
    else:                   # Qwen3.5: a linear-attention (gated delta rule) layer, then a full-attention one
        cls, cfg = transformers.Qwen3_5ForConditionalGeneration, transformers.Qwen3_5Config
        text = dict(TEXT, head_dim=12, rope_parameters=dict(rope, mrope_interleaved=True, partial_rotary_factor=1.0),
                    layer_types=["linear_attention", "full_attention"])
    model = perturbed(cls(cfg(vision_config=VISION[family], text_config=text, image_token_id=98, video_token_id=97,
                              vision_start_token_id=96, vision_end_token_id=95)))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.visual, HFQwenVisionModel) and opt.model.language_model is model.model.language_model
    x, grid = packed(GRID[:2])                                   # 24 / 4 + 8 / 4 = 6 + 2 image tokens
    ids = two_image_prompt()
    kw = dict(input_ids=ids, image_grid_thw=grid, mm_token_type_ids=(ids == 98).long())
    assert_vlm_equals_hf(opt, model, model64, x, kw)


def test_qwen2_5_omni_thinker_equals_hf():
    """Qwen2.5-Omni's thinker (its vision encoder: Qwen2.5-VL's tower with separate q / k / v) with the tower on
    vitfast: the logits over a prompt with two images, and greedy `generate`, as HF's. (The whole
    Qwen2_5OmniForConditionalGeneration holds the thinker as `thinker`: optimize that.)"""
    omni = pytest.importorskip("transformers.models.qwen2_5_omni")
    text = dict(TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 2]))
    audio = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=16,
                 output_dim=48, n_window=4, max_source_positions=32)
    cfg = omni.Qwen2_5OmniThinkerConfig(vision_config=VISION["qwen2_5_vl"], text_config=text, audio_config=audio,
                                        image_token_index=98, video_token_index=97, audio_token_index=94,
                                        vision_start_token_id=96, vision_end_token_id=95)
    model = perturbed(omni.Qwen2_5OmniThinkerForConditionalGeneration(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    where = "model.visual" if isinstance(getattr(model, "model", None), torch.nn.Module) \
        and hasattr(model.model, "visual") else "visual"                     # transformers 5.2x: inside `model`
    assert isinstance(opt.get_submodule(where), HFQwenVisionModel)
    x, grid = packed(GRID[:2])
    ids = two_image_prompt()
    kw = dict(input_ids=ids, image_grid_thw=grid, attention_mask=torch.ones_like(ids))
    assert_vlm_equals_hf(opt, model, model64, x, kw)


def test_bad_inputs_are_named():
    opt = vitfast.optimize(vision_model("qwen2_vl"))
    x, grid = packed()
    with pytest.raises(ValueError, match=r"hidden_states: expected patches \[T, 96\].*\(64, 48\)"):
        opt(x[:, :48], grid)
    with pytest.raises(ValueError, match=r"grid_thw: expected an integer tensor \[n, 3\].*\(3, 3\) torch.float32"):
        opt(x, grid.float())
    with pytest.raises(ValueError, match=r"grid_thw: expected at least one grid, .* divisible by 2 .* T = 64"):
        opt(x, torch.tensor([[1, 4, 6], [1, 2, 4], [2, 4, 5]]))
    with pytest.raises(ValueError, match=r"grid_thw: expected at least one grid, .* T = 63"):
        opt(x[:63], grid)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(x, grid, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="cu_seqlens"):          # a precomputed layout: refused
        opt(x, grid, cu_seqlens=torch.tensor([0, 64], dtype=torch.int32))
    with torch.no_grad():                          # what a VLM passes along (transformers 5.17's generate) is ignored
        assert torch.equal(opt(x, grid, use_cache=True).pooler_output, opt(x, grid).pooler_output)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels at Qwen2-VL-like head dims (80), eager then its CUDA graph's replays (other
    images each time), against HF in fp32 within 2x the error of HF itself in that dtype."""
    hf = vision_model("qwen3_vl", hidden_size=160, intermediate_size=320, num_heads=2, depth=2,
                      patch_size=16, num_position_embeddings=256, deepstack_visual_indexes=[1]).cuda()
    grids = [[(1, 32, 24), (1, 16, 16), (2, 8, 8)], [(1, 24, 32), (1, 8, 32), (2, 8, 8)],
             [(1, 16, 48), (1, 32, 8), (2, 8, 8)]]
    assert_packed_tower_replays(hf, dtype, grids, lambda T: torch.randn(T, 3 * TP * 16 * 16, device="cuda"),
                                keys=("last_hidden_state", "pooler_output"))
