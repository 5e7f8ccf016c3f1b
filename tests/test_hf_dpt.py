"""DPT on vitfast: transformers' `DPTModel` (DPT-Large's ViT, its table resized bilinearly to every image size; and
DPT-Hybrid's, over HF's BiT stem) and the models around it, `DPTForDepthEstimation` and `DPTForSemanticSegmentation`
(their necks, reading the blocks' hidden states, and heads shared). Compared in fp32 against HF in float64, bounded by
HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_dpt import HFDPTModel
from vitfast.testing import assert_close, assert_grads_match, assert_tower_on_gpu, assert_tower_replays, perturbed

transformers = pytest.importorskip("transformers")
dpt = pytest.importorskip("transformers.models.dpt.modeling_dpt")

# patches of 8 on a table for 32 px (4 x 4); every block's hidden state feeds the neck
CONFIG = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32,
              patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 24, 32],
              fusion_hidden_size=16, num_labels=3, head_in_index=-1)
# DPT-Hybrid: a BiT stem downsampling by 16 (its first two stages' features feed the neck as they are)
HYBRID = dict(CONFIG, image_size=64, patch_size=16, is_hybrid=True, backbone_featmap_shape=[1, 64, 4, 4],
              backbone_config=dict(model_type="bit", hidden_sizes=[64, 64, 64], depths=[1, 1, 1], embedding_size=32,
                                   num_groups=8, layer_type="bottleneck", global_padding="same",
                                   out_features=["stage1", "stage2", "stage3"], embedding_dynamic_padding=True),
              neck_hidden_sizes=[64, 64, 24, 32], reassemble_factors=[1, 1, 1, 0.5], neck_ignore_stages=[0, 1])


def model(cls=None, config=CONFIG, **kw):
    torch.manual_seed(0)
    hf = perturbed((cls or dpt.DPTModel)(transformers.DPTConfig(**{**config, **kw})))
    if isinstance(hf, dpt.DPTForDepthEstimation):       # depth above the head's final ReLU (not all zeros)
        with torch.no_grad():
            hf.head.head[-2].bias.fill_(1.0)
    return hf


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 3, 44, 61)], ids=["configured", "resized_44x61"])
def test_equals_hf(shape):
    """last_hidden_state, pooler_output and every hidden state as HF's, at the table's size and at another one (the
    table resized, pixels past whole patches dropped)."""
    hf = model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFDPTModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(*shape)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, 1 + (shape[2] // 8) * (shape[3] // 8), 48)
    for key in ("last_hidden_state", "pooler_output"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


@pytest.mark.parametrize("hybrid", [False, True], ids=["dpt", "dpt_hybrid"])
def test_depth_and_segmentation_equal_hf(hybrid):
    """DPTForDepthEstimation and DPTForSemanticSegmentation: a copy with its `dpt` on vitfast, the neck and heads
    shared: the depth and the logits (and the segmentation loss with labels) as HF's; DPT-Hybrid's stem features
    pass to the neck as HF's."""
    config, size = (HYBRID, 64) if hybrid else (CONFIG, 48)
    x = torch.randn(2, 3, size, size)
    for cls, key in ((dpt.DPTForDepthEstimation, "predicted_depth"), (dpt.DPTForSemanticSegmentation, "logits")):
        if hybrid and cls is dpt.DPTForSemanticSegmentation:
            continue                                     # HF's segmentation model has no hybrid form
        hf = model(cls, config)
        hf64 = copy.deepcopy(hf).double()
        opt = vitfast.optimize(hf)
        assert isinstance(opt.dpt, HFDPTModel) and opt.neck is hf.neck
        kw = dict(labels=torch.randint(0, 3, (2, size, size))) if key == "logits" else {}
        with torch.no_grad():
            out, ref, eager = (m(px, **kw) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert ref[key].norm() > 0
        for k in (key, "loss") if kw else (key,):
            assert_close(out[k], ref[k], eager=eager[k], name=f"{cls.__name__}.{k}")


def test_trains_hf_tensors():
    """DPTForSemanticSegmentation's loss: every parameter of HF's ViT gets HF's float64 gradient, through HF's neck
    and heads."""
    hf = model(dpt.DPTForSemanticSegmentation).train()
    for m in hf.modules():                             # the heads' dropout off (random: no twin would match)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for m in (hf.neck, hf.head, hf.auxiliary_head):   # HF's own modules, their fp32 error HF's: the ViT's checked
        m.requires_grad_(False)
    hf.dpt.layernorm.requires_grad_(False)             # unread: the neck reads the blocks' outputs
    hf64 = copy.deepcopy(hf).double().train()
    opt = vitfast.optimize(hf).train()
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    hf64(x.double(), labels=labels).loss.backward()
    opt(x, labels=labels).loss.backward()
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
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(encoder.layer.0.output.dropout\)"):
        vitfast.optimize(model(hidden_dropout_prob=0.1).train())


@pytest.mark.gpu
def test_dpt_on_gpu():
    """DPT-Large's ViT (1024 wide, 24 blocks, 16 heads of 64) at 384 x 512 px (its 24 x 24 table resized to 24 x 32:
    769 tokens), batch 8, bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by
    HF's own bf16 error; eager, capture and replay."""
    config = transformers.DPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                    intermediate_size=4096)
    assert_tower_on_gpu(lambda: dpt.DPTModel(config), (torch.randn(8, 3, 384, 512, device="cuda"),))
