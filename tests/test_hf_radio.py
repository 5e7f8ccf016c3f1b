"""NVIDIA's RADIO on vitfast: transformers' `RadioModel` (class and register tokens, the Cropped Position Embedding,
layer-scales, the GELU or SwiGLU MLP, the input conditioner fused into the patch embedding; images of other sizes
packed by `image_grid_hw` and temporally packed video where transformers has them). Compared in fp32 against HF in
float64, bounded by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy
import inspect

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_radio import HFRadioModel
from vitfast.testing import (
    assert_close,
    assert_tower_on_gpu,
    assert_tower_replays,
    assert_trains_after_inference_mode,
    assert_trains_hf_tensors,
    perturbed,
)

transformers = pytest.importorskip("transformers")
radio = pytest.importorskip("transformers.models.radio.modeling_radio")

# patches of 4, a position table for up to 48 px (12 x 12), 2 class tokens (both in the summary) and 3 registers
CONFIG = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2.0, patch_size=4, image_size=32,
              max_img_size=48, num_cls_tokens=2, num_registers=3, summary_idxs=[0, 1])
PACKED = "image_grid_hw" in inspect.signature(radio.RadioModel.forward).parameters        # transformers >= 5.2x
KEYS = ("summary", "features", "last_hidden_state")


def model(**kw):
    torch.manual_seed(0)
    return perturbed(radio.RadioModel(transformers.RadioConfig(**{**CONFIG, **kw}))).eval()


def assert_outputs_equal(opt, hf, hf64, *args, hidden=True):
    """Each of KEYS (and every hidden state) from `opt` against `hf64`'s, bounded by `hf`'s own fp32 error."""
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        out, ref, eager = (m(*a, output_hidden_states=hidden) for m, a in ((opt, args), (hf64, args64), (hf, args)))
    assert type(out) is type(ref)
    for key in KEYS:
        assert out[key].shape == ref[key].shape, key
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    if hidden:
        assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")
    return ref


@pytest.mark.parametrize("kw, size", [({}, (40, 28)), (dict(use_swiglu_ffn=True), (32, 32)),
                                      (dict(qkv_bias=False, layerscale_value=0.5, hidden_act="quick_gelu"), (48, 48)),
                                      ({}, (16, 44))],
                         ids=["gelu_40x28", "swiglu", "no_qkv_bias_quick_gelu", "wider_than_tall"])
def test_equals_hf(kw, size):
    """summary, features, last_hidden_state and every hidden state, as HF's, for images of any size (the position
    table resized to the longer side and cropped); the position table moved the output (so it is what is tested)."""
    hf = model(**kw)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFRadioModel) and opt.dtype == torch.float32
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.rand(2, 3, *size)
    ref = assert_outputs_equal(opt, hf, hf64, x)
    assert ref.features.shape == (2, size[0] // 4 * (size[1] // 4), 48) and ref.summary.shape == (2, 96)
    with torch.no_grad():
        hf64.embeddings.position_embedding.zero_()
        assert (hf64(x.double()).features - ref.features).abs().max() > 1e-2


def test_external_preprocessor():
    """After make_preprocessor_external (as Nemotron 3 Nano Omni calls it) the caller's normalized pixels go in as
    they are, on both models."""
    hf = model()
    opt = vitfast.optimize(hf)
    conditioner = opt.make_preprocessor_external()
    assert isinstance(hf.input_conditioner, torch.nn.Identity) and hasattr(conditioner, "norm_mean")
    assert_outputs_equal(opt, hf, copy.deepcopy(hf).double(), torch.randn(2, 3, 32, 24), hidden=False)


@pytest.mark.skipif(not PACKED, reason="this transformers' RadioModel takes no image_grid_hw")
@pytest.mark.parametrize("grids", [[[4, 3], [2, 5], [3, 3]], [[3, 4]]], ids=["three_images", "one_image"])
def test_packed_images_equal_hf(grids):
    """Patches of images of other sizes packed with image_grid_hw: each image attends within itself (the attention's
    varlen form), its class and register rows first; summary, features, last_hidden_state as HF's."""
    hf = model()
    opt = vitfast.optimize(hf)
    grid = torch.tensor(grids)
    patches = torch.rand(int(grid.prod(-1).sum()), 3 * 4 * 4)
    ref = assert_outputs_equal(opt, hf, copy.deepcopy(hf).double(), patches, grid)
    assert ref.summary.shape == (len(grids), 96) and ref.last_hidden_state.shape == (patches.shape[0] + 5 * len(grids),
                                                                                     48)


@pytest.mark.skipif(not PACKED, reason="this transformers' RadioModel has no video projection")
def test_video_frames_equal_hf():
    """Temporally packed video (2 frames per patch: 6 channels) through the video projection, normalized by the
    caller; with the input conditioner on, refused by name."""
    hf = model(video_temporal_patch_size=2)
    opt = vitfast.optimize(hf)
    x = torch.randn(2, 6, 24, 32)
    with pytest.raises(ValueError, match="needs the pixels normalized by the caller"):
        opt(x)
    opt.make_preprocessor_external()
    assert_outputs_equal(opt, hf, copy.deepcopy(hf).double(), x)


@pytest.mark.skipif(not PACKED, reason="this transformers has no Nemotron 3 Nano Omni")
def test_nemotron_omni_features_equal_hf():
    """Nemotron 3 Nano Omni with its RADIO `vision_model` on vitfast (the language model and projector shared): the
    projected features of packed images (get_image_features) and of a video's tubelets (get_video_features), as
    HF's."""
    omni = pytest.importorskip("transformers.models.nemotron_h_omni.modeling_nemotron_h_omni")
    text = transformers.AutoConfig.for_model(
        "nemotron_h", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, hybrid_override_pattern="M*", mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8,
        n_groups=1)
    config = omni.NemotronH_Omni_Reasoning_V3_Config(
        vision_config=transformers.RadioConfig(**CONFIG, video_temporal_patch_size=2), text_config=text,
        vision_hidden_size=48, projector_hidden_size=32, image_token_id=5, video_token_id=6)
    torch.manual_seed(0)
    hf = perturbed(omni.NemotronH_Omni_Reasoning_V3(config)).eval()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.vision_model, HFRadioModel) and opt.language_model is hf.language_model
    grid, patches, video = torch.tensor([[4, 4], [2, 6]]), torch.randn(28, 48), torch.randn(1, 2, 6, 16, 16)
    with torch.no_grad():
        for get, x in (("get_image_features", (patches, grid)), ("get_video_features", (video,))):
            x64 = tuple(t.double() if t.is_floating_point() else t for t in x)
            out, ref, eager = (getattr(m, get)(*a).pooler_output for m, a in ((opt, x), (hf64, x64), (hf, x)))
            assert len(out) == len(ref)
            for o, r, e in zip(out, ref, eager):
                assert_close(o, r, eager=e, name=get)


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient (the reference never called): q / k / v through their joined rows,
    the layer-scales through the epilogues, the class / register tokens and the position table through the patch
    embedding's backward and HF's resizing."""
    assert_trains_hf_tensors(model(use_swiglu_ffn=True), (torch.rand(2, 3, 40, 28),),
                             torch.randn(48, dtype=torch.float64))


@pytest.mark.skipif(not PACKED, reason="this transformers' RadioModel takes no image_grid_hw")
def test_trains_hf_tensors_packed():
    grid = torch.tensor([[4, 3], [2, 5]])
    assert_trains_hf_tensors(model(), (torch.rand(22, 48), grid), torch.randn(48, dtype=torch.float64))


@pytest.mark.skipif(not PACKED, reason="this transformers' RadioModel takes no image_grid_hw")
def test_trains_after_inference_mode():
    """The packed layout (cu_seqlens) cached under torch.inference_mode is not the one a later training step uses."""
    hf = model()
    assert_trains_after_inference_mode(vitfast.optimize(hf), (torch.rand(22, 48), torch.tensor([[4, 3], [2, 5]])),
                                       hf.embeddings.patch_projection.weight)


def test_graph_replays():
    """One capture per input shape; later batches of other images replay it, each equal to HF (and packed images with
    the same grids)."""
    assert_tower_replays(model(), [(torch.rand(2, 3, 32, 24),) for _ in range(3)], key="features")
    if PACKED:
        grid = torch.tensor([[4, 3], [2, 5]])
        assert_tower_replays(model(), [(torch.rand(22, 48), grid) for _ in range(3)], key="summary")


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(torch.rand(1, 3, 32, 32), output_attentions=True)
    with pytest.raises(ValueError, match=r"H and W multiples of 4, got \(1, 3, 30, 32\)"):
        opt(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="pixel_values: expected 3 channels, got 4"):
        opt(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"image_grid_hw: expected an integer tensor \[num_images, 2\]"):
        opt(torch.rand(12, 48), image_grid_hw=torch.tensor([4.0, 3.0]))
    with pytest.raises(ValueError, match=r"the patches of image_grid_hw \[\(4, 3\)\], \[12, 48\] .*got \(11, 48\)"):
        opt(torch.rand(11, 48), image_grid_hw=torch.tensor([[4, 3]]))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    drop = model(drop_path_rate=0.1).train()
    with pytest.raises(UnsupportedFeatureError, match=r"drop-path p=0.1 \(encoder.layer.0.drop_path\)"):
        vitfast.optimize(drop)
    assert isinstance(vitfast.optimize(drop.eval()), HFRadioModel)                  # drop-path is off in eval mode


@pytest.mark.gpu
def test_c_radio_h_on_gpu():
    """C-RADIO's ViT-H / 16 (1280 wide, 16 heads of 80, 3 class tokens, 7 registers; 8 of its 32 blocks) at 512 x
    768 px, bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own
    bf16 error; eager, capture and replay."""
    config = transformers.RadioConfig(num_hidden_layers=8)
    assert_tower_on_gpu(lambda: radio.RadioModel(config), (torch.rand(2, 3, 512, 768, device="cuda"),),
                        key="features")
