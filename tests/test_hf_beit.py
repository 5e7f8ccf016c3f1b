"""BEiT and Data2Vec-vision on vitfast: transformers' `BeitModel` and `Data2VecVisionModel` (the relative position
bias of each block and the shared one, added to the scores inside the attention kernel; q / v biases without k's;
the layer-scales in the epilogues; mean pooling) and the models around them (classifiers, BEiT's masked-image model,
semantic segmenter and backbone). Compared in fp32 against HF in float64, bounded by HF's own fp32 error; gradients
reach HF's tensors, the relative position tables' too; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_beit import HFBeitModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
beit = pytest.importorskip("transformers.models.beit.modeling_beit")
data2vec = pytest.importorskip("transformers.models.data2vec.modeling_data2vec_vision")

# 32 px images in patches of 8: a 4 x 4 grid, 17 tokens
CONFIG = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96, image_size=32,
              patch_size=8, num_labels=5, vocab_size=40, out_indices=[1, 2, 3, 4], semantic_loss_ignore_index=255,
              drop_path_rate=0.0)            # BEiT's default 0.1 is random in train mode
CONFIGS = {"beit": transformers.BeitConfig, "data2vec": transformers.Data2VecVisionConfig}
BASES = {"beit": "BeitModel", "data2vec": "Data2VecVisionModel"}


def model(family="beit", cls=None, **kw):
    torch.manual_seed(0)
    hf = (cls or getattr(transformers, BASES[family]))(CONFIGS[family](**{**CONFIG, **kw}))
    with torch.no_grad():                    # tables of a trained model's size (a few units), not init's zeros
        for name, p in hf.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0.0, 1.5)
    return perturbed(hf)


# (relative position bias per block, shared one, absolute table, mean pooling, layer-scale): BEiT's fine-tuned
# checkpoints, BEiT's pretraining (shared bias, mask token), Data2Vec's, a ViT-like one (only the absolute table)
VARIANTS = {
    "per_block": dict(use_relative_position_bias=True, use_mean_pooling=True),
    "shared": dict(use_shared_relative_position_bias=True, use_mean_pooling=False, use_mask_token=True),
    "both_abs": dict(use_relative_position_bias=True, use_shared_relative_position_bias=True,
                     use_absolute_position_embeddings=True, layer_scale_init_value=0.0),
    "abs_only": dict(use_absolute_position_embeddings=True, use_mean_pooling=False, use_mask_token=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", list(BASES))
def test_equals_hf(family, variant):
    """last_hidden_state, pooler_output and every hidden state, as HF's: at the configured size, another grid (the
    tables resampled by HF's modules, with and without interpolate_pos_encoding), a size past whole patches, and
    masked patches where the model has a mask token."""
    hf = model(family, **VARIANTS[variant])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFBeitModel)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    calls = [((32, 32), {}), ((40, 24), {}), ((40, 24), dict(interpolate_pos_encoding=True)), ((35, 39), {})]
    if hf.embeddings.mask_token is not None:
        calls.append(((32, 32), dict(bool_masked_pos=torch.rand(2, 16) < 0.5)))
    for size, kw in calls:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            out, ref, eager = (m(px, output_hidden_states=True, **kw) for m, px in ((opt, x), (hf64, x.double()),
                                                                                   (hf, x)))
        tokens = 1 + (size[0] // 8) * (size[1] // 8)
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, tokens, 48)
        what = f"{size} {list(kw)}"
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state,
                     name=f"last_hidden_state {what}")
        if ref.pooler_output is None:
            assert out.pooler_output is None
        else:
            assert_close(out.pooler_output, ref.pooler_output, eager=eager.pooler_output, name=f"pooler {what}")
        assert len(out.hidden_states) == len(ref.hidden_states) == 5
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}] {what}")


def test_the_bias_moves_the_output():
    """The relative position bias is not lost on the way: the same model with its tables zeroed in place gives other
    outputs (the gathered biases, cached while no gradient is recorded, are gathered again), HF's own then."""
    hf = model("beit", **VARIANTS["per_block"])
    opt = vitfast.optimize(hf)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = opt(x).last_hidden_state
        for layer in hf.layers:
            layer.relative_position_bias.relative_position_bias_table.zero_()
        after, ref = opt(x).last_hidden_state, hf(x).last_hidden_state
    assert (before - after).abs().max() > 0.01                      # the layer-scales (0.1) damp it
    assert_close(after, ref.double(), eager=ref)


def test_masked_image_modeling_equals_hf_and_trains():
    """BeitForMaskedImageModeling (BEiT's pretraining): the masked patches enter as the mask token; logits and the
    loss over the masked patches as HF's; in train mode every parameter (the relative position tables too) gets HF's
    float64 gradient, the reference never called."""
    hf = model("beit", beit.BeitForMaskedImageModeling, **VARIANTS["shared"])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.beit, HFBeitModel) and opt.lm_head is hf.lm_head
    x, masked = torch.randn(2, 3, 32, 32), torch.rand(2, 16) < 0.5
    labels = torch.randint(0, 40, (int(masked.sum()),))
    with torch.no_grad():
        out, ref, eager = (m(px, bool_masked_pos=masked, labels=labels) for m, px in ((opt, x), (hf64, x.double()),
                                                                                        (hf, x)))
    for key in ("logits", "loss"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    hf.train(), hf64.train(), opt.train()
    hf64(x.double(), bool_masked_pos=masked, labels=labels).loss.backward()
    backward_weighted(opt(x, bool_masked_pos=masked, labels=labels).loss, torch.ones((), dtype=torch.float64),
                      reference_free=True)
    assert_grads_match(hf, hf64)


@pytest.mark.parametrize("family,cls", [("beit", "BeitForImageClassification"),
                                        ("data2vec", "Data2VecVisionForImageClassification")])
def test_classifier_equals_hf_and_trains(family, cls):
    """The classifiers (Data2Vec's holds its model as `data2vec_vision`): logits and the loss as HF's; every parameter
    gets HF's float64 gradient through the attention's backward kernels, the reference never called."""
    hf = model(family, getattr(transformers, cls), **VARIANTS["both_abs"])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    inner = opt.beit if family == "beit" else opt.data2vec_vision
    assert isinstance(inner, HFBeitModel) and opt.classifier is hf.classifier
    x, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 4, 2])
    with torch.no_grad():
        out, ref, eager = (m(px, labels=labels) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    for key in ("logits", "loss"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    hf.train(), hf64.train(), opt.train()
    weights = torch.randn(3, 5, dtype=torch.float64)
    backward_weighted(hf64(x.double()).logits, weights)
    backward_weighted(opt(x).logits, weights, reference_free=True)
    assert_grads_match(hf, hf64)


def test_segmentation_and_backbone_equal_hf():
    """BeitForSemanticSegmentation (its FPN and UperNet heads read the hidden states) and BeitBackbone (feature maps
    of the stages asked for), each as HF's."""
    hf = model("beit", beit.BeitForSemanticSegmentation, **VARIANTS["per_block"])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.beit, HFBeitModel) and opt.decode_head is hf.decode_head
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    with torch.no_grad():
        out, ref, eager = (m(px, labels=labels) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    for key in ("logits", "loss"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    hf = model("beit", beit.BeitBackbone, out_features=["stage1", "stage3"], out_indices=None,
               **VARIANTS["per_block"])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.beit, HFBeitModel)
    with torch.no_grad():
        out, ref, eager = (m(px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert len(out.feature_maps) == len(ref.feature_maps) == 2
    for i, (o, r, e) in enumerate(zip(out.feature_maps, ref.feature_maps, eager.feature_maps)):
        assert o.shape == r.shape == (2, 48, 4, 4)
        assert_close(o, r, eager=e, name=f"feature_maps[{i}]")


def test_graph_replays():
    """One capture serves other images (the biases gathered once, the graph's constants), masks as data."""
    assert_tower_replays(model("beit", **VARIANTS["per_block"]), [(torch.randn(2, 3, 32, 32),) for _ in range(3)])
    assert_tower_replays(model("data2vec", **VARIANTS["shared"]),
                         [(torch.randn(2, 3, 32, 32), torch.rand(2, 16) < 0.5) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model("beit", **VARIANTS["per_block"]))
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="attention_mask"):
        opt(x, attention_mask=torch.ones(1, 17))
    with pytest.raises(UnsupportedFeatureError, match="bool_masked_pos, where the model has no mask token"):
        opt(x, bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pixel_values: expected images \[B, 3, H, W\] with H and W at least 8, got "
                                         r"\(1, 3, 4, 32\)"):
        opt(torch.randn(1, 3, 4, 32))
    opt = vitfast.optimize(model("beit", **VARIANTS["shared"]))
    with pytest.raises(ValueError, match=r"bool_masked_pos: expected \[B, patches\] = \[1, 16\], got \(1, 9\)"):
        opt(x, bool_masked_pos=torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model("beit", hidden_act="relu"))
    with pytest.raises(UnsupportedFeatureError, match=r"drop-path p=0.1 \(encoder.layer.3.drop_path\)"):
        vitfast.optimize(model("data2vec", drop_path_rate=0.1).train())


@pytest.mark.gpu
def test_beit_on_gpu():
    """BEiT-B (768 wide, 12 heads of 64, a relative position bias per block; 6 of its 12 blocks) at 224 px (197
    tokens), batch 8, bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's
    own bf16 error; eager, capture and replay."""
    cfg = transformers.BeitConfig(num_hidden_layers=6, use_relative_position_bias=True, use_mean_pooling=True)

    def build():
        hf = beit.BeitModel(cfg)
        with torch.no_grad():
            for layer in hf.layers:
                layer.relative_position_bias.relative_position_bias_table.normal_(0.0, 1.5)
        return hf
    assert_tower_on_gpu(build, (torch.randn(8, 3, 224, 224, device="cuda"),))
