"""ViTPose on vitfast: transformers' `VitPoseBackbone` (a plain ViT whose patch convolution pads by 2, the class
token's position row added to every patch, ViTPose++'s mixture-of-experts MLPs picked by dataset_index) and
`VitPoseForPoseEstimation` around it (its heatmap heads shared). Compared in fp32 against HF in float64, bounded by
HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward, dataset_index as data."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_vitpose import HFVitPoseBackbone
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    backward_weighted,
    perturbed,
    simulate_cuda_graphs,
)

transformers = pytest.importorskip("transformers")
vitpose = pytest.importorskip("transformers.models.vitpose.modeling_vitpose")
backbone = pytest.importorskip("transformers.models.vitpose_backbone.modeling_vitpose_backbone")

# patches of 16 at 64 x 48 px: a 4 x 3 grid, the padding of 2 shifting every patch
BACKBONE = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=2, image_size=[64, 48],
                patch_size=[16, 16], part_features=16)


def pose_model(experts: int = 1, **kw):
    torch.manual_seed(0)
    config = transformers.VitPoseConfig(backbone_config=dict(model_type="vitpose_backbone", **BACKBONE,
                                                             num_experts=experts), num_labels=5, **kw)
    return perturbed(vitpose.VitPoseForPoseEstimation(config))


def backbone_model(**kw):
    torch.manual_seed(0)
    return perturbed(backbone.VitPoseBackbone(transformers.VitPoseBackboneConfig(**{**BACKBONE, **kw})))


@pytest.mark.parametrize("simple", [True, False], ids=["simple", "classic"])
@pytest.mark.parametrize("experts", [1, 3], ids=["vitpose", "vitpose_plus"])
def test_pose_model_equals_hf(experts, simple):
    """VitPoseForPoseEstimation: a copy with its `backbone` on vitfast, the head shared; heatmaps and every hidden
    state as HF's, with flip_pairs too. ViTPose++: each image through its own expert (one index past the experts:
    zeros, as HF's)."""
    hf = pose_model(experts, use_simple_decoder=simple)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.backbone, HFVitPoseBackbone) and opt.head is hf.head
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(4, 3, 64, 48)
    kw = dict(dataset_index=torch.tensor([2, 0, 1, 3])) if experts > 1 else {}
    for extra in ({}, dict(flip_pairs=torch.tensor([[1, 2], [3, 4]]))):
        with torch.no_grad():
            out, ref, eager = (m(px, output_hidden_states=True, **kw, **extra)
                               for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert out.heatmaps.shape == ref.heatmaps.shape == (4, 5, 16, 12)
        assert_close(out.heatmaps, ref.heatmaps, eager=eager.heatmaps, name=f"heatmaps {list(extra)}")
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_backbone_equals_hf():
    """VitPoseBackbone: the stages' feature maps (after the final LayerNorm, [B, patches, C]), the stem's too;
    hidden states only when asked for."""
    hf = backbone_model(num_hidden_layers=3, out_features=["stem", "stage1", "stage3"])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFVitPoseBackbone) and opt.channels == [48, 48, 48]
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        out, ref, eager = (m(px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert out.hidden_states is None and ref.hidden_states is None
    assert len(out.feature_maps) == len(ref.feature_maps) == 3
    for o, r, e in zip(out.feature_maps, ref.feature_maps, eager.feature_maps):
        assert o.shape == r.shape == (2, 12, 48)
        assert_close(o, r, eager=e, name="feature_maps")
    for m in (hf, hf64):                                  # read on the next call, as HF's
        m.config.out_features = ["stage2"]
    with torch.no_grad():
        out, ref = opt(x, return_dict=False), hf64(x.double(), return_dict=False)
    assert len(out) == len(ref) == 1 and len(out[0]) == 1
    assert_close(out[0][0], ref[0][0], tol=1e-5, name="stage2")


@pytest.mark.parametrize("experts", [1, 3], ids=["vitpose", "vitpose_plus"])
def test_trains_hf_tensors(experts):
    """Every HF parameter gets HF's float64 gradient (the reference never called): the experts each through the
    images that picked them (expert 1 through none: no gradient, as HF's zero)."""
    hf = pose_model(experts).train()
    hf64 = copy.deepcopy(hf).double().train()
    opt = vitfast.optimize(hf).train()
    x, w = torch.randn(2, 3, 64, 48), torch.randn(16, 12, dtype=torch.float64)
    kw = dict(dataset_index=torch.tensor([2, 0])) if experts > 1 else {}
    backward_weighted(hf64(x.double(), **kw).heatmaps, w)
    backward_weighted(opt(x, **kw).heatmaps, w, reference_free=True)
    assert_grads_match(hf, hf64)


def test_graph_replays_with_dataset_index_as_data():
    """One capture serves batches whose images pick other experts: dataset_index is the graph's data."""
    hf = pose_model(3)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.backbone.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    with torch.no_grad():
        for index in ([0, 1], [2, 2], [1, 0]):
            x, index = torch.randn(2, 3, 64, 48), torch.tensor(index)
            out, ref, eager = (m(px, dataset_index=index).heatmaps for m, px in ((opt, x), (hf64, x.double()),
                                                                                (hf, x)))
            assert_close(out, ref, eager=eager, name=f"heatmaps {index.tolist()}")
    assert runner.captures == 1


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(backbone_model())
    x = torch.randn(1, 3, 64, 48)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(ValueError, match=r"pixel_values: expected images \[B, 3, 64, 48\] \(the model's image size\), "
                                         r"got \(1, 3, 48, 64\)"):
        opt(torch.randn(1, 3, 48, 64))
    moe = vitfast.optimize(backbone_model(num_experts=3))
    with pytest.raises(ValueError, match=r"dataset_index: expected integer indices \[B\] = \[1\] \(num_experts=3"):
        moe(x)
    with pytest.raises(ValueError, match=r"dataset_index: .* got \(2,\) torch.int64"):
        moe(x, dataset_index=torch.tensor([0, 1]))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(backbone_model(hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match=r"dropout p=0.1 \(encoder.layer.0.attention.attention\)"):
        vitfast.optimize(backbone_model(attention_probs_dropout_prob=0.1).train())
    wide = backbone_model()
    wide.embeddings.patch_embeddings.projection.padding = (8, 8)
    with pytest.raises(UnsupportedFeatureError, match="padding under half the patch size"):
        vitfast.optimize(wide)


@pytest.mark.gpu
@pytest.mark.parametrize("experts", [1, 6], ids=["vitpose_b", "vitpose_plus_b"])
def test_vitpose_on_gpu(experts):
    """ViTPose-B (768 wide, 12 heads of 64, 12 blocks; ViTPose++-B's 6 experts of 192 features) at 256 x 192 px
    (192 patches), batch 32, bf16, random weights (made on the GPU), with its simple heatmap head: vitfast against
    HF in float32 on the GPU, bounded by HF's own bf16 error; eager, capture and replay."""
    config = transformers.VitPoseConfig(backbone_config=dict(model_type="vitpose_backbone", out_indices=[12],
                                                             num_experts=experts, part_features=192))
    args = (torch.randn(32, 3, 256, 192, device="cuda"),)
    if experts > 1:
        args += (torch.arange(32, device="cuda") % experts,)
    assert_tower_on_gpu(lambda: vitpose.VitPoseForPoseEstimation(config), args, key="heatmaps")
