"""Hugging Face's DINOv2 / DINOv2-with-registers / DINOv3 backbones (`Dinov2Backbone`, ...: the backbone of Depth
Anything and DPT) on vitfast, on the CPU: every output field and stage option against HF in float64 (bounded by
HF's own fp32 error), whole depth models with the optimized backbone, gradients, the CUDA-graph signature of the
stages (a CPU stand-in), and on a GPU the real capture."""

import copy

import pytest
import torch
from torch.utils import _pytree as pytree

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf import HFBackbone
from vitfast.testing import assert_close, simulate_cuda_graphs, without_reference

transformers = pytest.importorskip("transformers")

SMALL = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=3, num_attention_heads=3)
# backbone class -> (its config class, config kwargs beyond SMALL)
BACKBONES = {
    "Dinov2Backbone": ("Dinov2Config", dict(mlp_ratio=2)),
    "Dinov2WithRegistersBackbone": ("Dinov2WithRegistersConfig", dict(mlp_ratio=2, num_register_tokens=4)),
    "DINOv3ViTBackbone": ("DINOv3ViTConfig", dict(intermediate_size=96, num_register_tokens=2,
                                                  pos_embed_rescale=None)),
}
# stage options: HF's defaults (each stage normed, the patch tokens as maps), Depth Anything's (normed tokens),
# neither, and DINOv3's class tokens; "stem" (the embeddings) is a stage too
OPTIONS = {
    "default": dict(out_indices=[0, 1, 3]),
    "tokens": dict(out_indices=[1, 2, 3], reshape_hidden_states=False),
    "raw": dict(out_indices=[2, 3], apply_layernorm=False, reshape_hidden_states=False),
    "maps_unnormed_class_token": dict(out_indices=[1, 3], apply_layernorm=False, return_class_token=True),
}


def hf_backbone(name: str, **config_kw):
    config_cls, kw = BACKBONES[name]
    cfg = getattr(transformers, config_cls)(**{**SMALL, **kw, **config_kw})
    model = getattr(transformers, name)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def compare(out, ref, eager) -> None:
    """The same output class, fields and attributes; every tensor of them within the usual bound."""
    assert type(out) is type(ref)
    assert list(out.keys()) == list(ref.keys()), f"fields {list(out.keys())} vs HF's {list(ref.keys())}"
    assert hasattr(out, "last_hidden_state") == hasattr(ref, "last_hidden_state")
    got, want, eager = (pytree.tree_flatten((dict(o), getattr(o, "last_hidden_state", None)))
                        for o in (out, ref, eager))
    assert got[1] == want[1] == eager[1]
    for i, (o, r, e) in enumerate(zip(got[0], want[0], eager[0])):
        if r is None:
            assert o is None, f"output leaf {i}"
        else:
            assert_close(o, r, eager=e, name=f"output leaf {i}")


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_optimized_backbone_equals_hf(name, option):
    hf = hf_backbone(name, **OPTIONS[option])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert opt.stage_names == hf.stage_names and opt.out_features == hf.out_features
    assert opt.channels == hf.channels and opt.out_indices == list(hf.out_indices)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for kw in (dict(), dict(output_hidden_states=True)):
            compare(opt(x, **kw), hf64(x.double(), **kw), hf(x, **kw))
        as_tuple, hf_tuple = opt(x, return_dict=False), hf(x, return_dict=False)
        assert isinstance(as_tuple, tuple) and len(as_tuple) == len(hf_tuple)
        compare(opt.forward_with_filtered_kwargs(x, output_attentions=False), hf64(x.double()), hf(x))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_optimized_backbone_other_image_size(name):
    """A 48x40 image: DINOv2's position table resampled by HF's rule, DINOv3's RoPE tables for that grid; the
    maps [B, D, 6, 5]."""
    hf = hf_backbone(name)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        out = opt(x)
        compare(out, hf64(x.double()), hf(x))
    assert all(m.shape == (2, 48, 6, 5) for m in out.feature_maps)


def test_out_features_set_later_is_read_on_the_next_call_and_keys_the_graphs():
    hf = hf_backbone("Dinov2WithRegistersBackbone", out_indices=[3])
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for _ in range(3):
            assert len(opt(x).feature_maps) == 1
        hf.out_indices = [1, 2]                 # HF's config object, shared: both models follow
        assert opt.out_features == ["stage1", "stage2"]
        for _ in range(3):
            out = opt(x)
            compare(out, hf(x), hf(x))
        assert runner.captures == 2


def test_depth_models_with_the_optimized_backbone_equal_hf():
    """Depth Anything and DPT call the backbone as HF's (forward_with_filtered_kwargs, stage maps or tokens):
    `vitfast.optimize(model)` is a copy of the model with the backbone on vitfast (neck and head shared), equal
    to HF's; the model itself keeps HF's backbone."""
    backbone_cfg = transformers.Dinov2Config(**{**SMALL, "num_hidden_layers": 4}, mlp_ratio=2,
                                             out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    models = [
        transformers.DepthAnythingForDepthEstimation(transformers.DepthAnythingConfig(
            backbone_config=backbone_cfg, patch_size=8, reassemble_hidden_size=48, neck_hidden_sizes=[8, 16, 24, 32],
            fusion_hidden_size=16, head_hidden_size=8)),
        transformers.DPTForDepthEstimation(transformers.DPTConfig(
            backbone_config=copy.deepcopy(backbone_cfg), is_hybrid=False, hidden_size=48,
            neck_hidden_sizes=[8, 16, 24, 32], fusion_hidden_size=16, reassemble_factors=[4, 2, 1, 0.5])),
    ]
    x = torch.randn(2, 3, 32, 32)
    for model in models:
        model.eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model64 = copy.deepcopy(model).double()
        hf_backbone_module = model.backbone
        opt = vitfast.optimize(model)
        assert type(opt) is type(model) and model.backbone is hf_backbone_module
        assert isinstance(opt.backbone, HFBackbone) and opt.head is model.head and opt.neck is model.neck
        assert {id(p) for p in opt.parameters()} <= {id(p) for p in model.parameters()}
        with torch.no_grad():
            assert_close(opt(x).predicted_depth, model64(x.double()).predicted_depth, eager=model(x).predicted_depth,
                         name=type(model).__name__)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_optimized_backbone_trains_hf_tensors(name):
    torch.manual_seed(0)
    hf = hf_backbone(name).train()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = torch.randn(2, 3, 32, 32)
    maps = opt(x).feature_maps
    weights = [torch.randn_like(m) for m in maps]
    with without_reference():
        sum((m * w).sum() for m, w in zip(maps, weights)).backward()
    sum((m * w.double()).sum() for m, w in zip(hf64(x.double()).feature_maps, weights)).backward()
    for (n, p), (_, p64) in zip(hf.named_parameters(), hf64.named_parameters()):
        if p64.grad is None:
            assert p.grad is None, n
        elif p64.grad.norm() < 1e-9 * max(1.0, p64.norm().item()):   # DINOv3's k bias: the exact gradient is 0
            assert p.grad.norm() < 1e-4, n
        else:
            assert_close(p.grad, p64.grad, name=f"grad {n}")


def test_unsupported_backbone_arguments_are_named():
    opt = vitfast.optimize(hf_backbone("Dinov2Backbone"))
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UnsupportedFeatureError, match="output_hidden_states: expected True or False"):
        opt(x, output_hidden_states=[1])
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="attention_mask"):
        opt(x, attention_mask=torch.ones(1, 17))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_optimized_backbone_replays_on_cuda(name, no_tf32):
    hf = hf_backbone(name, hidden_size=128, num_attention_heads=2, out_indices=[1, 3], return_class_token=True)
    hf = hf.cuda()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = torch.randn(4, 3, 64, 48, device="cuda")
    with torch.no_grad():
        ref, eager = hf64(x.double(), output_hidden_states=True), hf(x, output_hidden_states=True)
        for _ in range(3):                                  # eager, capture, replay
            compare(opt(x, output_hidden_states=True), ref, eager)
        assert opt.cuda_graphs.captures == 1
