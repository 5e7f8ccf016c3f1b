"""Meta's Pixio and I-JEPA on vitfast: transformers' `PixioModel` (class tokens with position rows, HF's bicubic
resampling of the table, a padding attention_mask as the kernel's key mask, the pooler as the class tokens' mean) and
`PixioBackbone` around it; `IJepaModel` (no class token, the table resampled only when asked, HF's pooler) and
`IJepaForImageClassification` around it; `ViTMAEModel` (MAE: HF's random masking between the patches and the class
token). Compared in fp32 against HF in float64, bounded by HF's own fp32 error; gradients reach HF's tensors; a CUDA
graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_pixio import HFPixioModel
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    assert_trains_hf_tensors,
    backward_weighted,
    perturbed,
    without_reference,
)

transformers = pytest.importorskip("transformers")
pixio = pytest.importorskip("transformers.models.pixio.modeling_pixio")

# patches of 8 at 32 px: 16 patches after 4 class tokens
CONFIG = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, mlp_ratio=2, image_size=32, patch_size=8,
              n_cls_tokens=4)


def model(cls=None, **kw):
    torch.manual_seed(0)
    return perturbed((cls or pixio.PixioModel)(transformers.PixioConfig(**{**CONFIG, **kw})))


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 3, 48, 40)], ids=["configured", "resampled_48x40"])
def test_equals_hf(shape):
    """last_hidden_state, pooler_output and every hidden state, as HF's, at the configured size and another (the
    table resampled)."""
    hf = model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFPixioModel) and {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(*shape)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert type(out) is type(ref)
    for key in ("last_hidden_state", "pooler_output"):
        assert out[key].shape == ref[key].shape
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_attention_mask_is_the_key_mask():
    """A padding attention_mask [B, tokens]: the masked keys are ignored, as HF's; it moved the output."""
    hf = model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x, mask = torch.randn(2, 3, 32, 32), torch.ones(2, 20, dtype=torch.long)
    mask[1, -5:] = 0
    with torch.no_grad():
        out, ref, eager = (m(px, attention_mask=mask).last_hidden_state
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert_close(out, ref, eager=eager)
        assert (out[1] - opt(x).last_hidden_state[1]).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"attention_mask: expected \[B, tokens\] = \[2, 20\] .*, got \(2, 16\)"):
        opt(x, attention_mask=mask[:, 4:])


def test_backbone_equals_hf():
    """PixioBackbone: a copy with its `pixio` on vitfast; its stage maps (its own norm, the class tokens dropped,
    reshaped) as HF's."""
    hf = model(pixio.PixioBackbone, out_indices=[1, 3])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.pixio, HFPixioModel) and opt.layernorm is hf.layernorm
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref, eager = (m(px).feature_maps for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert len(out) == len(ref) == 2
    for o, r, e in zip(out, ref, eager):
        assert o.shape == r.shape == (2, 48, 4, 4)
        assert_close(o, r, eager=e, name="feature_maps")


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient (the reference never called): q / k / v through their joined
    rows, the class tokens and position table through the patch embedding's epilogue."""
    assert_trains_hf_tensors(model(), (torch.randn(2, 3, 32, 32),), torch.randn(48, dtype=torch.float64),
                             key="pooler_output")


def test_graph_replays():
    assert_tower_replays(model(), [(torch.randn(2, 3, 32, 32),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(torch.randn(1, 3, 32, 32), output_attentions=True)
    with pytest.raises(ValueError, match=r"H and W multiples of 8, got \(1, 3, 30, 32\)"):
        opt(torch.randn(1, 3, 30, 32))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))
    drop = model(drop_path_rate=0.1).train()
    with pytest.raises(UnsupportedFeatureError, match=r"drop-path p=0.1 \(layers.0.drop_path\)"):
        vitfast.optimize(drop)


def ijepa(cls=None, **kw):
    torch.manual_seed(0)
    module = pytest.importorskip("transformers.models.ijepa.modeling_ijepa")
    config = transformers.IJepaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                                      image_size=32, patch_size=8, num_labels=5)
    return perturbed((cls or module.IJepaModel)(config, **kw))


@pytest.mark.parametrize("pooler", [False, True], ids=["no_pooler", "pooler"])
def test_ijepa_equals_hf(pooler):
    """IJepaModel: last_hidden_state, the pooler's output (HF's dense + tanh on the first token, where the model has
    one) and every hidden state, as HF's, at the configured size and at another with interpolate_pos_encoding."""
    hf = ijepa(add_pooling_layer=pooler)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFPixioModel) and {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    for shape, kw in (((2, 3, 32, 32), {}), ((2, 3, 48, 40), dict(interpolate_pos_encoding=True))):
        x = torch.randn(*shape)
        with torch.no_grad():
            out, ref, eager = (m(px, output_hidden_states=True, **kw) for m, px in ((opt, x), (hf64, x.double()),
                                                                                   (hf, x)))
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        assert (out.pooler_output is None) == (ref.pooler_output is None) == (not pooler)
        if pooler:
            assert_close(out.pooler_output, ref.pooler_output, eager=eager.pooler_output, name="pooler_output")
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")
    with pytest.raises(ValueError, match=r"configured size \(32, 32\) without interpolate_pos_encoding=True"):
        opt(torch.randn(1, 3, 48, 40))
    with pytest.raises(UnsupportedFeatureError, match="bool_masked_pos .this model has no mask token"):
        opt(torch.randn(1, 3, 32, 32), bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool))


def test_ijepa_mask_token_equals_hf_and_trains():
    """IJepaModel with use_mask_token: masked patches (bool_masked_pos) enter as its mask token plus their position
    row, at the configured size and resampled; the output as HF's, and a backward gives the mask token and every
    other parameter HF's float64 gradient."""
    hf = ijepa(use_mask_token=True)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    for shape, kw in (((2, 3, 32, 32), {}), ((2, 3, 48, 40), dict(interpolate_pos_encoding=True))):
        x = torch.randn(*shape)
        masked = torch.rand(2, (shape[2] // 8) * (shape[3] // 8)) > 0.5
        with torch.no_grad():
            out, ref, eager = (m(px, bool_masked_pos=masked, **kw).last_hidden_state
                               for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert_close(out, ref, eager=eager, name=f"last_hidden_state {shape}")
    with pytest.raises(ValueError, match=r"bool_masked_pos: expected \[B, patches\] = \[2, 16\], got \(2, 15\)"):
        opt(torch.randn(2, 3, 32, 32), bool_masked_pos=torch.zeros(2, 15, dtype=torch.bool))
    for m in (hf, hf64, opt):
        m.train()
    x, masked, w = torch.randn(2, 3, 32, 32), torch.rand(2, 16) > 0.5, torch.randn(48, dtype=torch.float64)
    backward_weighted(hf64(x.double(), bool_masked_pos=masked).last_hidden_state, w)
    backward_weighted(opt(x, bool_masked_pos=masked).last_hidden_state, w, reference_free=True)
    assert hf.embeddings.mask_token.grad.abs().max() > 0
    assert_grads_match(hf, hf64)


def test_ijepa_classifier_equals_hf_and_trains():
    """IJepaForImageClassification: a copy with its `ijepa` on vitfast, the classifier over the tokens' mean shared;
    logits and loss as HF's; a backward gives every HF parameter HF's float64 gradient."""
    module = pytest.importorskip("transformers.models.ijepa.modeling_ijepa")
    hf = ijepa(module.IJepaForImageClassification)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.ijepa, HFPixioModel) and opt.classifier is hf.classifier
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    with torch.no_grad():
        out, ref, eager = (m(px, labels=labels) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        for key in ("logits", "loss"):
            assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert_trains_hf_tensors(hf, (x,), torch.randn(5, dtype=torch.float64), key="logits")


@pytest.mark.parametrize("ratio", [0.75, 0.0], ids=["masked", "unmasked"])
def test_mae_equals_hf(ratio):
    """ViTMAEModel: with a given noise, the tokens MAE keeps (shuffled by it, the class token first), mask and
    ids_restore, and every hidden state, as HF's, at the configured size and with interpolate_pos_encoding; without
    noise, the same draw of HF's random masking after the same seed."""
    module = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    config = transformers.ViTMAEConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                       intermediate_size=96, image_size=32, patch_size=8, mask_ratio=ratio)
    torch.manual_seed(0)
    hf = perturbed(module.ViTMAEModel(config))
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFPixioModel)
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        for kw in (dict(noise=noise), dict(noise=noise, interpolate_pos_encoding=True)):
            out, ref, eager = (m(px, output_hidden_states=True, **kw) for m, px in ((opt, x), (hf64, x.double()),
                                                                                   (hf, x)))
            assert type(out) is type(ref) and out.last_hidden_state.shape == (2, 1 + int(16 * (1 - ratio)), 48)
            assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
            assert torch.equal(out.mask, ref.mask) and torch.equal(out.ids_restore, ref.ids_restore)
            for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
                assert_close(h, r, eager=e, name=f"hidden_states[{i}]")
        out, ref, eager = [], [], []
        for m, px, into in ((opt, x, out), (hf64, x.double(), ref), (hf, x, eager)):
            torch.manual_seed(5)                           # the same draw of the masking's noise for each
            into.append(m(px))
        assert torch.equal(out[0].ids_restore, ref[0].ids_restore)
        assert_close(out[0].last_hidden_state, ref[0].last_hidden_state, eager=eager[0].last_hidden_state)
    with pytest.raises(ValueError, match=r"noise: expected \[B, patches\] = \[2, 16\], got \(2, 15\)"):
        opt(x, noise=noise[:, 1:])


def test_mae_pretraining_equals_hf_and_trains():
    """ViTMAEForPreTraining (MAE's pretraining: the encoder on the kept patches, HF's decoder reconstructs every
    patch): a copy with its `vit` on vitfast, the decoder shared; loss, logits, mask and ids_restore as HF's; the
    loss's backward gives every HF parameter, the encoder's and the decoder's, HF's float64 gradient (the reference
    never called)."""
    module = pytest.importorskip("transformers.models.vit_mae.modeling_vit_mae")
    config = transformers.ViTMAEConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                       intermediate_size=96, image_size=32, patch_size=8, mask_ratio=0.5,
                                       decoder_hidden_size=32, decoder_num_hidden_layers=1,
                                       decoder_num_attention_heads=2, decoder_intermediate_size=64)
    torch.manual_seed(0)
    hf = perturbed(module.ViTMAEForPreTraining(config))
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.vit, HFPixioModel) and opt.decoder is hf.decoder
    x, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    with torch.no_grad():
        out, ref, eager = (m(px, noise=n) for m, px, n in ((opt, x, noise), (hf64, x.double(), noise.double()),
                                                           (hf, x, noise)))
    for key in ("loss", "logits"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert torch.equal(out.mask, ref.mask.float()) and torch.equal(out.ids_restore, ref.ids_restore)
    opt.train()
    hf64.train()
    hf64(x.double(), noise=noise.double()).loss.backward()
    loss = opt(x, noise=noise).loss
    with without_reference():
        loss.backward()
    assert_grads_match(hf, hf64)


@pytest.mark.gpu
def test_pixio_huge_on_gpu():
    """Pixio-H at its shapes (1280 wide, 16 heads of 80, 8 class tokens, 256 px in patches of 16; 8 of its 32 blocks),
    bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own bf16 error;
    eager, capture and replay."""
    config = transformers.PixioConfig(num_hidden_layers=8)
    assert_tower_on_gpu(lambda: pixio.PixioModel(config), (torch.randn(8, 3, 256, 256, device="cuda"),))
