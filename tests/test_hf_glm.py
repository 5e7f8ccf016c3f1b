"""GLM-4V's vision tower on vitfast: transformers' `Glm4vVisionModel` (GLM-4.1V, GLM-4.6V), `Glm4vMoeVisionModel`
(GLM-4.5V) and `GlmOcrVisionModel` (GLM-OCR: q / k norms, biases, no position table) over Qwen2-VL's packed patch
sequences (each frame attending within itself: the attention kernel's varlen
form), and their VLMs. Compared in fp32 against HF in float64, bounded by HF's own fp32 error; the packing is
transparent; a video's frames give what HF's VLM gets for them; gradients reach HF's tensors; a CUDA graph replays
batches of other images with the same token and segment counts."""

import copy

import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_glm import HFGlmVisionModel
from vitfast.reference import glm_position_grid, qwen_patch_layout
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_packed_tower_replays,
    assert_selects_hidden_states,
    assert_vlm_equals_hf,
    perturbed,
    simulate_cuda_graphs,
    two_image_prompt,
    without_reference,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.models.glm4v")

F64 = torch.float64
P, TP = 4, 2                                  # patch size, frames per temporal patch
WIDTH = 3 * TP * P * P
# a 4 x 4 position table (image_size 16 / patch 4) stretched and shrunk to each grid; the blocks' gated MLP is
# out_hidden_size wide, the merger's intermediate_size, as in HF's
VISION = dict(depth=2, hidden_size=32, num_heads=2, patch_size=P, temporal_patch_size=TP, spatial_merge_size=2,
              out_hidden_size=48, intermediate_size=40, image_size=16)
TEXT = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 2],
                                 partial_rotary_factor=1.0))
# Three images: T = 44 patches in segments of 24, 8 and 12 (11 merged tokens).
GRID = [(1, 4, 6), (1, 2, 4), (1, 6, 2)]


def vision_model(kind: str = "glm4v", **kw):
    models = transformers.models
    if kind == "glm5_next":       # its merger's own width; clamps low enough to cut the gates and ups here
        glm5 = pytest.importorskip("transformers.models.glm5_next.modeling_glm5_next")
        kw = dict(dict(projection_intermediate_size=40, swiglu_limit=0.5), **kw)
        return perturbed(glm5.Glm5NextVisionModel(glm5.Glm5NextVisionConfig(**{**VISION, **kw})))
    cls = {"glm4v": (transformers.Glm4vVisionConfig, models.glm4v.modeling_glm4v.Glm4vVisionModel),
           "glm4v_moe": (transformers.Glm4vMoeVisionConfig, models.glm4v_moe.modeling_glm4v_moe.Glm4vMoeVisionModel),
           "glm_ocr": (models.glm_ocr.configuration_glm_ocr.GlmOcrVisionConfig,
                       models.glm_ocr.modeling_glm_ocr.GlmOcrVisionModel)}[kind]
    return perturbed(cls[1](cls[0](**{**VISION, **kw})))


def packed(grid=GRID):
    """(hidden_states [T, C·t·P·P], grid_thw [n, 3]) as HF's processor gives them."""
    return torch.randn(sum(t * h * w for t, h, w in grid), WIDTH), torch.tensor(grid)


def test_position_table_sampling_is_hfs():
    """The table sampled at `glm_position_grid`'s points is what HF's embeddings add to each patch, bit for bit."""
    hf = vision_model()
    grid = [(1, 4, 6), (1, 10, 14), (1, 2, 2), (1, 8, 4)]
    table = hf.embeddings.position_embedding.weight
    T = sum(t * h * w for t, h, w in grid)
    points = glm_position_grid(grid, 2)
    image = table.float().reshape(4, 4, -1).permute(2, 0, 1)[None]
    ours = F.grid_sample(image, points[None, :, None], mode="bicubic", align_corners=False, padding_mode="border")
    pos, _ = qwen_patch_layout(grid, 2)                   # HF's get_vision_position_ids (test_hf_qwen.py)
    with torch.no_grad():
        ref = hf.embeddings(torch.zeros(T, table.shape[1]), torch.tensor([h * w for _, h, w in grid]),
                            torch.tensor(grid), pos[:, 0], pos[:, 1])
    assert torch.equal(ours[0, :, :, 0].T, ref)


@pytest.mark.parametrize("kind", ["glm4v", "glm4v_moe", "glm_ocr", "glm5_next"])
def test_vision_tower_equals_hf(kind):
    if kind == "glm_ocr":
        pytest.importorskip("transformers.models.glm_ocr")
    hf = vision_model(kind)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFGlmVisionModel) and opt.dtype == torch.float32 and opt.spatial_merge_size == 2
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}          # HF's tensors, no copy
    x, grid = packed()
    with torch.no_grad():
        out, ref, eager = (m(px, grid_thw=grid, output_hidden_states=True)
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert type(out) is type(ref) and set(out.keys()) == set(ref.keys())
    for key in ("last_hidden_state", "pooler_output"):
        assert out[key].shape == (11, 48)
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    # the embeddings, block 0's output, and last_hidden_state in the last block's slot (HF's output capturing)
    assert len(out.hidden_states) == len(ref.hidden_states) == len(hf.blocks) + 1
    for i, (o, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(o, r, eager=e, name=f"hidden_states[{i}]")
    for pick in (0, -1, [0, -2]):              # an index or a list keeps those only, as HF's (transformers 5.2x)
        assert_selects_hidden_states(opt, hf64, (x, grid), ref, pick)
    with torch.no_grad():
        as_tuple = opt(x, grid, return_dict=False)
    assert len(as_tuple) == 2 and torch.equal(as_tuple[1], out.pooler_output)


def test_packing_is_transparent_and_frames_are_images():
    """Each image alone gives its rows of the packed batch (one segment over the whole sequence would move every
    row); a video of 2 frames gives what HF's VLM passes for it, each frame as an image of its grid."""
    hf = vision_model(attention_bias=True)                  # with the qkv bias some checkpoints may carry
    opt = vitfast.optimize(hf)
    x, grid = packed()
    with torch.no_grad():
        batch = opt(x, grid)
        start = 0
        for t, h, w in GRID:
            n = t * h * w
            alone = opt(x[start:start + n], torch.tensor([[t, h, w]]))
            torch.testing.assert_close(batch.pooler_output[start // 4:(start + n) // 4], alone.pooler_output,
                                       rtol=1e-5, atol=1e-5)
            start += n
        one_segment = opt(x[:36], torch.tensor([[1, 6, 6]]))    # 36 tokens of the batch as one image
        video, frames = packed([(2, 4, 6)])
        as_video = opt(video, frames)
        as_frames, ref = opt(video, torch.tensor([[1, 4, 6]] * 2)), hf(video, torch.tensor([[1, 4, 6]] * 2))
    assert (one_segment.last_hidden_state[:6] - batch.last_hidden_state[:6]).abs().max() > 1e-2
    torch.testing.assert_close(as_video.pooler_output, as_frames.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(as_frames.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["glm4v", "glm_ocr", "glm5_next"])
def test_trains_hf_tensors(kind):
    """Every HF parameter gets HF's float64 gradient: the position table's through the bicubic sampling, the patch
    embedding's and the downsampling's through their GEMMs, the merger's through its gated MLP; GLM-OCR's q / k
    norms' and biases'; GLM-5-Next's through its clamped gates and ups (0 where a clamp cuts)."""
    if kind == "glm_ocr":
        pytest.importorskip("transformers.models.glm_ocr")
    hf = vision_model(kind)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf).train()
    hf.train(), hf64.train()
    x, grid = packed()
    weights = torch.randn(48, dtype=F64)

    def loss(out):
        return (out.pooler_output * weights.to(out.pooler_output.dtype)).sum() + out.last_hidden_state.square().mean()

    loss(hf64(x.double(), grid)).backward()
    out = loss(opt(x, grid))
    with without_reference():
        out.backward()                                           # into HF's own tensors' .grad
    assert_grads_match(hf, hf64)


def test_graph_replays_with_the_layout_as_data():
    """One capture per (tokens, segments, longest segment): batches of other images with those replay it, each
    equal to HF."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    grids = [GRID, GRID, [(1, 6, 4), (1, 4, 2), (1, 2, 6)], [(1, 2, 12), (1, 4, 2), (1, 2, 6)]]
    with torch.no_grad():
        for grid in grids:
            x, g = packed(grid)
            out, ref, eager = opt(x, g), hf64(x.double(), g), hf(x, g)
            assert_close(out.pooler_output, ref.pooler_output, eager=eager.pooler_output, name="pooler_output")
    assert runner.captures == 1


@pytest.mark.parametrize("family", ["glm4v", "glm4v_moe", "glm46v", "glm_ocr"])
def test_vision_language_model_equals_hf(family):
    """GLM-4.1V (Glm4vForConditionalGeneration), GLM-4.5V (Glm4vMoeForConditionalGeneration: a dense layer, then a
    mixture-of-experts one), GLM-4.6V (Glm46VForConditionalGeneration) and GLM-OCR (GlmOcrForConditionalGeneration)
    with the tower on vitfast (the language model shared): the logits over a prompt with two images, and greedy
    `generate`, as HF's."""
    if family == "glm_ocr":
        glm_ocr = pytest.importorskip("transformers.models.glm_ocr")
        cls, cfg, vision, text = glm_ocr.GlmOcrForConditionalGeneration, glm_ocr.GlmOcrConfig, VISION, TEXT
    elif family == "glm46v":
        glm46v = pytest.importorskip("transformers.models.glm46v")
        cls, cfg = glm46v.Glm46VForConditionalGeneration, glm46v.Glm46VConfig
        vision, text = dict(VISION, model_type="glm4v_vision"), dict(TEXT, model_type="glm4v_text")
    elif family == "glm4v_moe":
        cls, cfg = transformers.Glm4vMoeForConditionalGeneration, transformers.Glm4vMoeConfig
        vision = VISION
        text = dict(TEXT, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1)
    else:
        cls, cfg, vision, text = transformers.Glm4vForConditionalGeneration, transformers.Glm4vConfig, VISION, TEXT
    model = perturbed(cls(cfg(vision_config=vision, text_config=text, image_token_id=98, video_token_id=97,
                              image_start_token_id=96, image_end_token_id=95, video_start_token_id=94,
                              video_end_token_id=93)))
    if family == "glm4v_moe":                   # the experts as a loop of GEMMs: grouped_mm takes no float64
        model.set_experts_implementation("eager")
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.visual, HFGlmVisionModel) and opt.model.language_model is model.model.language_model
    x, grid = packed(GRID[:2])                                   # 24 / 4 + 8 / 4 = 6 + 2 image tokens
    ids = two_image_prompt()
    kw = dict(input_ids=ids, image_grid_thw=grid, mm_token_type_ids=(ids == 98).long())
    assert_vlm_equals_hf(opt, model, model64, x, kw)


def test_unsupported_and_bad_inputs_are_named():
    with pytest.raises(UnsupportedFeatureError, match=r"hidden_act='gelu'"):
        vitfast.optimize(vision_model(hidden_act="gelu"))
    hf = vision_model()
    hf.blocks[1].mlp.up_proj.bias = torch.nn.Parameter(torch.zeros(48))
    with pytest.raises(UnsupportedFeatureError, match=r"blocks\.1\.mlp\.up_proj with bias"):
        vitfast.optimize(hf)
    opt = vitfast.optimize(vision_model())
    x, grid = packed()
    with pytest.raises(ValueError, match=r"hidden_states: expected patches \[T, 96\].*\(44, 48\)"):
        opt(x[:, :48], grid)
    with pytest.raises(ValueError, match=r"grid_thw: expected at least one grid, .* divisible by 2 .* T = 44"):
        opt(x, torch.tensor([[1, 4, 6], [1, 2, 4], [1, 3, 4]]))
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(x, grid, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="position_ids"):          # a precomputed layout: refused
        opt(x, grid, position_ids=torch.zeros(44, 2, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["glm4v", "glm_ocr", "glm5_next"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, kind, no_tf32):
    """fp16 / bf16 on vitfast's kernels at GLM-4V's head dim (128), eager then its CUDA graph's replays (other images
    each time), against HF in fp32 within 2x the error of HF itself in that dtype."""
    if kind == "glm_ocr":
        pytest.importorskip("transformers.models.glm_ocr")
    hf = vision_model(kind, hidden_size=256, num_heads=2, out_hidden_size=256, intermediate_size=512, patch_size=14,
                      image_size=336).cuda()
    grids = [[(1, 32, 24), (1, 16, 16), (1, 8, 8)], [(1, 24, 32), (1, 8, 32), (1, 8, 8)],
             [(1, 16, 48), (1, 32, 8), (1, 8, 8)]]
    assert_packed_tower_replays(hf, dtype, grids, lambda T: torch.randn(T, 3 * TP * 14 * 14, device="cuda"),
                                keys=("last_hidden_state", "pooler_output"))
