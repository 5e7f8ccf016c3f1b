"""SAM 3's vision backbone on vitfast: transformers' `Sam3ViTModel` (the position table tiled, windowed blocks with
zero-padded windows, global blocks, the axial RoPE with HF's pairwise rotation, no class token) alone and inside
`Sam3VisionModel`, `Sam3TrackerModel`, `Sam3Model` and `Sam3VideoModel`. Compared in fp32 against HF in float64,
bounded by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_sam3 import HFSam3ViTModel
from vitfast.reference import qwen_rope_tables
from vitfast.testing import (
    assert_close,
    assert_tower_on_gpu,
    assert_tower_replays,
    assert_trains_after_inference_mode,
    assert_trains_hf_tensors,
    perturbed,
)

transformers = pytest.importorskip("transformers")
sam3 = pytest.importorskip("transformers.models.sam3.modeling_sam3")

# 40 px in patches of 4: a 10 x 10 grid; windows of 4 (the grid padded to 12 x 12: nine windows, the last row and
# column of them mostly padding), block 1 global; the position table made for a 4 x 4 grid, tiled
VIT = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, image_size=40,
           patch_size=4, window_size=4, global_attn_indexes=[1], pretrain_image_size=16)


@pytest.fixture(autouse=True)
def _float64_rope(monkeypatch):
    """HF's RoPE rounds q and k to float32 (`q.float()`) even in a float64 model: here it keeps their dtype, so the
    float64 twin is the exact reference (an fp32 model's RoPE is unchanged)."""
    def rotate(q, k, cos, sin):
        return tuple(t * cos.to(t.dtype) + sam3.rotate_pairwise(t) * sin.to(t.dtype) for t in (q, k))
    monkeypatch.setattr(sam3, "apply_rotary_pos_emb_2d", rotate)


def backbone(**kw):
    torch.manual_seed(0)
    return perturbed(sam3.Sam3ViTModel(transformers.Sam3ViTConfig(**{**VIT, **kw}))).eval()


def vision_config(**kw):
    return transformers.Sam3VisionConfig(backbone_config=transformers.Sam3ViTConfig(**{**VIT, **kw}),
                                         fpn_hidden_size=16, backbone_feature_sizes=[[40, 40], [20, 20], [10, 10]])


def sam3_config():
    """A small Sam3Config: the backbone of VIT, one-block text tower, geometry encoder, DETR encoder and decoder."""
    small = dict(hidden_size=16, num_layers=1, num_attention_heads=2, intermediate_size=32)
    return transformers.Sam3Config(
        vision_config=vision_config(),
        text_config=transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, projection_dim=16,
                                                bos_token_id=0, eos_token_id=1),
        geometry_encoder_config=transformers.Sam3GeometryEncoderConfig(**small),
        detr_encoder_config=transformers.Sam3DETREncoderConfig(**small),
        detr_decoder_config=transformers.Sam3DETRDecoderConfig(**small, num_queries=5),
        mask_decoder_config=transformers.Sam3MaskDecoderConfig(hidden_size=16, num_attention_heads=2))


@pytest.mark.parametrize("kw, size", [({}, (40, 40)),
                                      (dict(window_size=5, global_attn_indexes=[0, 2]), (40, 40)),   # 2 x 2 windows
                                      (dict(pretrain_image_size=40), (40, 40)),                      # not tiled
                                      (dict(hidden_act="quick_gelu", global_attn_indexes=[0, 1, 2]), (40, 40)),
                                      (dict(global_attn_indexes=[]), (40, 28))],        # windows only: any size
                         ids=["sam3", "window5", "untiled", "quick_gelu_global", "windowed_10x7"])
def test_backbone_equals_hf(kw, size):
    """last_hidden_state and every hidden state (the embeddings after the LayerNorm, each block's output), as HF's;
    the RoPE moved the output (so it is what is tested)."""
    hf = backbone(**kw)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFSam3ViTModel) and opt.dtype == torch.float32
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(2, 3, *size)
    rows, cols = size[0] // 4, size[1] // 4
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref)
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, rows * cols, 48)
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert h.shape == r.shape == (2, rows, cols, 48)
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")
        for layer in hf64.layers:
            layer.position_ids.zero_()
        assert (hf64(x.double()).last_hidden_state - ref.last_hidden_state).abs().max() > 1e-2


def test_hidden_states_by_index_and_tuple():
    """output_hidden_states as a list of indices keeps only those (None elsewhere, as transformers 5.2x), each equal to
    HF's; return_dict=False gives HF's tuple."""
    hf = backbone()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out = opt(x, output_hidden_states=[0, -1])
        ref, eager = hf64(x.double(), output_hidden_states=True), hf(x, output_hidden_states=True)
        assert [h is None for h in out.hidden_states] == [False, True, True, False]
        for i in (0, 3):
            assert_close(out.hidden_states[i], ref.hidden_states[i], eager=eager.hidden_states[i])
        tup = opt(x, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], opt(x).last_hidden_state)


def test_vision_model_equals_hf():
    """Sam3VisionModel with its backbone on vitfast (the FPN neck shared): the four FPN maps and the backbone's
    tokens, as HF's."""
    hf = perturbed(sam3.Sam3VisionModel(vision_config())).eval()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.backbone, HFSam3ViTModel) and opt.neck is hf.neck and hf.backbone is not opt.backbone
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        out, ref, eager = (m(px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        assert [h.shape[-1] for h in out.fpn_hidden_states] == [40, 20, 10, 5]
        for i, (h, r, e) in enumerate(zip(out.fpn_hidden_states, ref.fpn_hidden_states, eager.fpn_hidden_states)):
            assert_close(h, r, eager=e, name=f"fpn_hidden_states[{i}]")


def test_tracker_and_sam3_models_equal_hf():
    """Sam3TrackerModel (point prompts) and Sam3Model (a text prompt: the DETR encoder and decoder, the mask decoder)
    with the backbone on vitfast, their other modules shared: the masks (and SAM 3's semantic segmentation), as
    HF's."""
    tracker = transformers.Sam3TrackerConfig(
        vision_config=vision_config(), prompt_encoder_config=dict(hidden_size=16, image_size=40, patch_size=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16))
    x = torch.randn(2, 3, 40, 40)
    points, labels = torch.rand(2, 1, 1, 2) * 40, torch.ones(2, 1, 1, dtype=torch.long)
    ids = torch.randint(2, 64, (2, 5))
    cases = ((transformers.Sam3TrackerModel(tracker), dict(input_points=points, input_labels=labels),
              ("pred_masks", "iou_scores")),
             (transformers.Sam3Model(sam3_config()), dict(input_ids=ids), ("pred_masks", "semantic_seg")))
    for model, kw, keys in cases:
        hf = perturbed(model).eval()
        hf64 = copy.deepcopy(hf).double()
        opt = vitfast.optimize(hf)
        assert isinstance(opt.vision_encoder.backbone, HFSam3ViTModel)
        assert opt.vision_encoder.neck is hf.vision_encoder.neck and opt.mask_decoder is hf.mask_decoder
        kw64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
        with torch.no_grad():
            out, ref, eager = (m(pixel_values=px, **a) for m, px, a in
                               ((opt, x, kw), (hf64, x.double(), kw64), (hf, x, kw)))
            for key in keys:
                assert_close(out[key], ref[key], eager=eager[key], tol=1e-4, name=key)


def test_video_model_optimizes_its_detector():
    """Sam3VideoModel: a copy with its detector's backbone on vitfast and the tracker shared; the vision features each
    video frame gets (`detector_model.get_vision_features`, which the tracker takes too), as HF's."""
    tracker = transformers.Sam3TrackerVideoConfig(
        vision_config=vision_config(), prompt_encoder_config=dict(hidden_size=16, image_size=40, patch_size=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16))
    hf = perturbed(transformers.Sam3VideoModel(transformers.Sam3VideoConfig(
        detector_config=sam3_config(), tracker_config=tracker))).eval()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.detector_model.vision_encoder.backbone, HFSam3ViTModel)
    assert opt.tracker_model is hf.tracker_model and opt.detector_model.text_encoder is hf.detector_model.text_encoder
    hf64 = copy.deepcopy(hf.detector_model).double()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        out, ref, eager = (m.get_vision_features(pixel_values=px) for m, px in
                           ((opt.detector_model, x), (hf64, x.double()), (hf.detector_model, x)))
        for i, (h, r, e) in enumerate(zip(out.fpn_hidden_states, ref.fpn_hidden_states, eager.fpn_hidden_states)):
            assert_close(h, r, eager=e, name=f"fpn_hidden_states[{i}]")


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient: q / k / v through their joined and reordered rows, the RoPE's
    and the attention's backward kernels (the reference never called), the position table through its tiling and the
    patch embedding's epilogue."""
    assert_trains_hf_tensors(backbone(), (torch.randn(2, 3, 40, 40),), torch.randn(48, dtype=torch.float64))


def test_rope_tables_made_once_per_kind_of_block(monkeypatch):
    """The RoPE tables come from HF's positions and frequencies once per kind of block (windowed, global) and are kept
    across blocks and calls; replacing a block's buffers (as moving the model does) makes them again."""
    import vitfast.hf_sam3 as hf_sam3

    made = []
    monkeypatch.setattr(hf_sam3, "qwen_rope_tables", lambda *a, **kw: made.append(1) or qwen_rope_tables(*a, **kw))
    hf = backbone(num_hidden_layers=4, global_attn_indexes=[1, 3])
    opt = vitfast.optimize(hf)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        first = opt(x).last_hidden_state
        assert torch.equal(opt(x).last_hidden_state, first) and len(made) == 2
        hf.layers[0].position_ids = hf.layers[0].position_ids.clone()
        opt(x)
    assert len(made) == 3


def test_trains_after_inference_mode():
    """The RoPE tables cached under torch.inference_mode are not the ones a later training step uses."""
    hf = backbone()
    assert_trains_after_inference_mode(vitfast.optimize(hf), (torch.randn(1, 3, 40, 40),),
                                       hf.embeddings.patch_embeddings.projection.weight)


def test_graph_replays():
    """One capture per batch size; later batches of other images replay it, each equal to HF."""
    assert_tower_replays(backbone(), [(torch.randn(2, 3, 40, 40),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(backbone())
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(torch.randn(1, 3, 40, 40), output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values: expected images \[B, 3, 40, 40\], got \(1, 3, 32, 32\)"):
        opt(torch.randn(1, 3, 32, 32))
    windowed = vitfast.optimize(backbone(global_attn_indexes=[]))
    with pytest.raises(ValueError, match=r"H and W multiples of 4, got \(1, 3, 40, 30\)"):
        windowed(torch.randn(1, 3, 40, 30))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(backbone(hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match="the axial RoPE needs a head dim divisible by 4"):
        vitfast.optimize(backbone(hidden_size=36, num_attention_heads=6))
    with pytest.raises(UnsupportedFeatureError, match=r"image_size=\[40, 32\] \(only square\)"):
        vitfast.optimize(backbone(image_size=[40, 32]))
    dropout = backbone(hidden_dropout=0.1).train()
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(embeddings.dropout\)"):
        vitfast.optimize(dropout)
    assert isinstance(vitfast.optimize(dropout.eval()), HFSam3ViTModel)            # dropout is off in eval mode


@pytest.mark.gpu
def test_backbone_on_gpu():
    """SAM 3's backbone at its shapes (1008 px: a 72 x 72 grid, windows of 24, global blocks of 5,184 tokens; 1024
    wide, head dim 64), 8 of its 32 blocks (blocks 3 and 7 global), bf16, random weights (made on the GPU): vitfast
    against HF in float32 on the GPU, bounded by HF's own bf16 error; eager, capture and replay."""
    config = transformers.Sam3ViTConfig(num_hidden_layers=8, global_attn_indexes=[3, 7])
    assert_tower_on_gpu(lambda: sam3.Sam3ViTModel(config), (torch.randn(2, 3, 1008, 1008, device="cuda"),))
