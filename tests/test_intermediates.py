"""timm's feature-extraction API on vitfast's VisionTransformer: forward_intermediates, get_intermediate_layers,
prune_intermediate_layers. Against the float64 reference model's block outputs (read by forward hooks), against
timm's own models where timm is installed, and through the CUDA-graph runner (a CPU stand-in here, the real
capture in the `gpu` test)."""

import copy

import pytest
import torch

import vitfast
from vitfast import graphs, reference
from vitfast.model import feature_take_indices
from vitfast.testing import assert_close, simulate_cuda_graphs

F64 = torch.float64

# Small models (Triton's interpreter runs the fp32 ones): a class token; DINOv2's registers and layer-scale with a
# non-square grid; no prefix token at all (SigLIP's pooling head); DeiT's distillation token; DINOv3's RoPE.
CASES = {
    "token": dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=5),
    "registers": dict(img_size=(48, 32), patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                      reg_tokens=2, init_values=0.5, no_embed_class=True),
    "no_prefix_map": dict(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=0,
                          class_token=False, global_pool="map"),
    "rope": dict(img_size=32, patch_size=16, embed_dim=32, depth=3, num_heads=2, num_classes=4, reg_tokens=1,
                 pos_embed="none", rope="dinov3", dynamic_img_size=True, global_pool="avg"),
}


def pair(kw, distilled=False):
    """A vitfast model and the float64 reference with the same (perturbed) weights."""
    cls, ref_cls = ((vitfast.model.VisionTransformerDistilled, reference.VisionTransformerDistilled) if distilled
                    else (vitfast.VisionTransformer, reference.VisionTransformer))
    model = cls(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = ref_cls(**kw).double().eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return model, ref


def reference_blocks(ref, x):
    """The reference's output of every block and its final tokens (after the final norm)."""
    outs = []
    hooks = [blk.register_forward_hook(lambda m, args, out: outs.append(out)) for blk in ref.blocks]
    try:
        final = ref.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return outs, final


def expected(ref, x, take, norm, nchw):
    """timm's rule written out: the blocks in `take`, normed if asked, split into patches and prefix tokens."""
    outs, final = reference_blocks(ref, x)
    NP, P = ref.num_prefix_tokens, ref.patch_embed.patch_size
    grid = (x.shape[-2] // P[0], x.shape[-1] // P[1])
    patches, prefix = [], []
    for i in sorted(set(take)):
        y = ref.norm(outs[i]) if norm else outs[i]
        prefix.append(y[:, :NP])
        p = y[:, NP:]
        patches.append(p.reshape(x.shape[0], *grid, -1).permute(0, 3, 1, 2) if nchw else p)
    return final, patches, prefix


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("indices,norm,nchw", [(None, False, True), (2, True, False), ([0, -1], False, False)],
                         ids=["all_nchw", "last2_norm_nlc", "first_last_nlc"])
def test_forward_intermediates_equal_the_reference_blocks(case, indices, norm, nchw):
    kw = CASES[case]
    model, ref = pair(kw)
    size = (32, 48) if kw.get("dynamic_img_size") else reference.to_2tuple(kw["img_size"])
    x = torch.randn(2, 3, *size)
    take = feature_take_indices(kw["depth"], indices)
    want_final, want, want_prefix = expected(ref, x.double(), take, norm, nchw)
    with torch.no_grad():
        final, got = model.forward_intermediates(x, indices, norm=norm, output_fmt="NCHW" if nchw else "NLC")
        assert_close(final, want_final, name="final")
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, name=f"intermediate {i}")
            if nchw:
                assert g.is_contiguous()
        with_prefix = model.forward_intermediates(x, indices, return_prefix_tokens=True, norm=norm,
                                                  output_fmt="NCHW" if nchw else "NLC", intermediates_only=True)
        if model.num_prefix_tokens:
            for (g, gp), w, wp in zip(with_prefix, want, want_prefix):
                assert_close(g, w)
                assert_close(gp, wp, name="prefix tokens")
        else:                                       # timm's VisionTransformer: the patches alone
            assert all(isinstance(g, torch.Tensor) for g in with_prefix)


def test_distilled_prefix_tokens_are_class_and_distillation_tokens():
    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    model, ref = pair(kw, distilled=True)
    x = torch.randn(2, 3, 32, 32)
    _, want, want_prefix = expected(ref, x.double(), (1,), True, True)
    with torch.no_grad():
        (patches, prefix), = model.forward_intermediates(x, 1, return_prefix_tokens=True, norm=True,
                                                         intermediates_only=True)
    assert prefix.shape == (2, 2, 32) and patches.shape == (2, 32, 2, 2)
    assert_close(patches, want[0])
    assert_close(prefix, want_prefix[0], name="prefix tokens")


def test_output_dict_get_intermediate_layers_and_duplicate_indices():
    kw = CASES["registers"]
    model, ref = pair(kw)
    x = torch.randn(2, 3, 48, 32)
    want_final, want, want_prefix = expected(ref, x.double(), (0, 2), False, False)
    with torch.no_grad():
        out = model.forward_intermediates(x, [2, 0, 2], return_prefix_tokens=True, output_fmt="NLC",
                                          output_dict=True)
        assert set(out) == {"image_intermediates", "image_intermediates_prefix", "image_features"}
        assert_close(out["image_features"], want_final)
        for got, w in zip(out["image_intermediates"], want, strict=True):     # block order, each block once
            assert_close(got, w)
        for got, w in zip(out["image_intermediates_prefix"], want_prefix, strict=True):
            assert_close(got, w)
        only = model.forward_intermediates(x, [0, 2], output_dict=True, intermediates_only=True)
        assert set(only) == {"image_intermediates"}
        layers = model.get_intermediate_layers(x, 2, reshape=True)
        _, want_nchw, _ = expected(ref, x.double(), (1, 2), False, True)
        for got, w in zip(layers, want_nchw, strict=True):
            assert got.shape == (2, 32, 3, 2)
            assert_close(got, w)


def test_stop_early_runs_no_later_block():
    model, ref = pair(CASES["token"])
    ran = []
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, args, out, i=i: ran.append(i))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model.forward_intermediates(x, [0], stop_early=True, intermediates_only=True)
        assert ran == [0]
        ran.clear()
        final, _ = model.forward_intermediates(x, [0])
        assert ran == [0, 1, 2]
    _, want, _ = expected(ref, x.double(), (0,), False, True)
    assert_close(got[0], want[0])
    assert_close(final, reference_blocks(ref, x.double())[1], name="final")


def test_prune_intermediate_layers():
    kw = CASES["no_prefix_map"]
    model, ref = pair(kw)
    x = torch.randn(2, 3, 32, 32)
    outs, _ = reference_blocks(ref, x.double())
    with torch.no_grad():
        before = model.forward_intermediates(x, [1], intermediates_only=True)
        assert model.prune_intermediate_layers([-2], prune_norm=True) == [1]
        assert len(model.blocks) == 2 and model.attn_pool is None and model.num_classes == 0
        after = model.forward_intermediates(x, [1], intermediates_only=True)
        assert_close(after[0], before[0])
        assert_close(model(x), outs[1], name="all tokens of block 1")
        # what timm keeps and drops: the state_dict of the pruned model is the reference's, less the rest
        kept = set(model.state_dict())
        assert not any(k.startswith(("blocks.2.", "attn_pool.", "norm.")) for k in kept)
        assert kept < set(ref.state_dict())


@pytest.mark.parametrize("kwargs,message", [
    (dict(indices=0), "indices: expected a count of last blocks from 1 to 3, got 0"),
    (dict(indices=4), "indices: expected a count of last blocks from 1 to 3, got 4"),
    (dict(indices=[0, 3, -4]), r"indices: expected block indices from -3 to 2, got \[3, -4\]"),
    (dict(indices=[]), "indices: expected None, an int or a non-empty list"),
    (dict(indices=True), "indices: expected None, an int or a non-empty list"),
    (dict(output_fmt="NHWC"), "output_fmt: expected 'NCHW' or 'NLC', got 'NHWC'"),
    (dict(attn_mask=torch.ones(1, 1)), "attn_mask / is_causal: .* got Tensor and False"),
    (dict(is_causal=True), "attn_mask / is_causal: .* got NoneType and True"),
])
def test_bad_arguments_are_named(kwargs, message):
    model = vitfast.VisionTransformer(**CASES["token"]).eval()
    with pytest.raises(ValueError, match=message):
        model.forward_intermediates(torch.randn(1, 3, 32, 32), **kwargs)
    with pytest.raises(ValueError, match="indices"):
        model.prune_intermediate_layers(0)


def test_forward_and_forward_intermediates_keep_graphs_apart():
    """One runner serves both entry points: the same image batch gives each its own signature, and replayed
    intermediates (held by the caller) are not overwritten by later replays."""
    model, ref = pair(CASES["token"])
    runner = model.cuda_graphs = simulate_cuda_graphs(graphs.CUDAGraphRunner())
    xs = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    with torch.no_grad():
        logits = [model(x) for x in xs]
        inter = [model.forward_intermediates(x, 2, norm=True) for x in xs]
        assert runner.captures == 2
        model.cuda_graphs = graphs.CUDAGraphRunner(False)
        for x, lg, (final, got) in zip(xs, logits, inter):
            assert torch.equal(lg, model(x))
            want_final, want = model.forward_intermediates(x, 2, norm=True)
            assert torch.equal(final, want_final) and all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_train_only_features_refused_in_train_mode():
    model = vitfast.VisionTransformer(**CASES["token"])
    model.train_only_features = ("dropout",)
    with pytest.raises(ValueError, match="does not implement dropout"):
        model.forward_intermediates(torch.randn(1, 3, 32, 32))
    model.eval().forward_intermediates(torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------------------------
# timm's own models (where timm is installed)
# --------------------------------------------------------------------------------------------
TIMM = {
    "vit": ("vit_small_patch16_224", dict(img_size=32, embed_dim=32, num_heads=2, reg_tokens=2)),
    "dinov3_eva": ("vit_small_patch16_dinov3", dict(embed_dim=32, num_heads=2)),
}


def _timm_pair(name):
    timm = pytest.importorskip("timm")
    arch, kw = TIMM[name]
    src = timm.create_model(arch, pretrained=False, depth=3, **kw).double().eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return src, vitfast.optimize(copy.deepcopy(src))


@pytest.mark.parametrize("name", sorted(TIMM))
@pytest.mark.parametrize("kwargs", [
    dict(), dict(indices=2, norm=True, output_fmt="NLC"), dict(indices=[0, -1], return_prefix_tokens=True),
    dict(indices=[1], stop_early=True, intermediates_only=True),
], ids=["all", "last2_norm_nlc", "prefix", "stop_early"])
def test_optimized_timm_models_equal_timms_intermediates(name, kwargs):
    src, opt = _timm_pair(name)
    x = torch.randn(2, 3, 32, 48 if name == "dinov3_eva" else 32, dtype=F64)
    with torch.no_grad():
        want, got = src.forward_intermediates(x, **kwargs), opt.forward_intermediates(x, **kwargs)
    want_leaves, want_spec = torch.utils._pytree.tree_flatten(want)
    got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
    assert got_spec == want_spec
    for g, w in zip(got_leaves, want_leaves):
        assert_close(g, w)


@pytest.mark.parametrize("name", sorted(TIMM))
def test_optimized_timm_get_intermediate_layers_and_prune_equal_timms(name):
    src, opt = _timm_pair(name)
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    with torch.no_grad():
        # (timm's Eva has no get_intermediate_layers: what timm's ViT makes of it)
        want = src.forward_intermediates(x, 2, norm=True, output_fmt="NCHW", intermediates_only=True)
        for g, w in zip(opt.get_intermediate_layers(x, 2, reshape=True, norm=True), want, strict=True):
            assert_close(g, w)
        assert opt.prune_intermediate_layers([1]) == src.prune_intermediate_layers([1])
        assert_close(opt(x), src(x), name="pruned forward")


@pytest.mark.parametrize("name", sorted(TIMM))
def test_optimized_timm_features_only_models_equal_timms(name):
    """timm's features_only model (FeatureGetterNet: the pruned ViT's forward_intermediates) -> a copy with the
    ViT on vitfast, equal to timm's; the source keeps timm's ViT."""
    timm = pytest.importorskip("timm")
    arch, kw = TIMM[name]
    from timm.models._features import FeatureGetterNet

    for norm in (False, True):                          # (features_only makes the first; the second normed)
        src = (FeatureGetterNet(timm.create_model(arch, pretrained=False, depth=4, **kw), (1, -2), norm=True) if norm
               else timm.create_model(arch, pretrained=False, depth=4, features_only=True, out_indices=(1, -2), **kw))
        src = src.double().eval()
        with torch.no_grad():
            for p in src.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        opt = vitfast.optimize(src)
        assert isinstance(opt.model, vitfast.VisionTransformer) and not isinstance(src.model, vitfast.VisionTransformer)
        assert opt.feature_info.channels() == src.feature_info.channels() and len(opt.model.blocks) == 3
        x = torch.randn(2, 3, 32, 32, dtype=F64)
        with torch.no_grad():
            for g, w in zip(opt(x), src(x), strict=True):
                assert_close(g, w)


@pytest.mark.gpu
def test_forward_intermediates_replays_cuda_graphs_equal_to_the_reference():
    kw = dict(CASES["registers"], embed_dim=96, num_heads=3)
    model, ref = pair(kw)
    model.cuda()
    xs = [torch.randn(4, 3, 48, 32) for _ in range(3)]
    with torch.no_grad():                                  # eager, capture, replay: none overwritten by the next
        outs = [model.forward_intermediates(x.cuda(), [0, 2], return_prefix_tokens=True, norm=True) for x in xs]
        assert model.cuda_graphs.captures == 1
    for x, (final, got) in zip(xs, outs):
        want_final, want, want_prefix = expected(ref, x.double(), (0, 2), True, True)
        assert_close(final, want_final, name="final")
        for (g, gp), w, wp in zip(got, want, want_prefix, strict=True):
            assert_close(g, w)
            assert_close(gp, wp, name="prefix tokens")
