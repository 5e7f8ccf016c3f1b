"""Meta's Sapiens2 on vitfast: transformers' `Sapiens2Model` (RMSNorms, class and register tokens, grouped-query blocks
between full ones, RMSNorms of each head's q and k, DINOv3's RoPE on the patch tokens, a layer-scale on the attention
branch, the gated MLP) and its task models around it (`model`: segmentation, pose, normals). Compared in fp32 against
HF in float64, bounded by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_sapiens2 import HFSapiens2Model
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    assert_trains_after_inference_mode,
    assert_trains_hf_tensors,
    backward_weighted,
    perturbed,
)

transformers = pytest.importorskip("transformers")
sapiens2 = pytest.importorskip("transformers.models.sapiens2.modeling_sapiens2")

# patches of 8; 4 blocks: full attention in the first and the last, 2 key / value heads for 4 query heads between
CONFIG = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_attention_heads=2, num_first_full_attention_layers=1, num_last_full_attention_layers=1,
              num_register_tokens=2, image_size=32, patch_size=8, num_labels=5,
              head_config=dict(upsample_out_channels=[16], conv_out_channels=[8]))
KINDS = {"gated_qk_norm": {}, "plain_no_key_bias": dict(use_gated_mlp=False, hidden_act="gelu", use_qk_norm=False,
                                                        key_bias=False)}


def model(cls=None, **kw):
    torch.manual_seed(0)
    return perturbed((cls or sapiens2.Sapiens2Model)(transformers.Sapiens2Config(**{**CONFIG, **kw})))


@pytest.mark.parametrize("kind", KINDS)
def test_equals_hf(kind):
    """last_hidden_state, pooler_output and every hidden state, as HF's, at two image sizes (RoPE tables per grid)."""
    hf = model(**KINDS[kind])
    assert hf.config.num_key_value_heads_per_layer == [4, 2, 2, 4]
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFSapiens2Model) and {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    for shape in ((2, 3, 32, 24), (1, 3, 40, 48)):
        x = torch.randn(*shape)
        with torch.no_grad():
            out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref)
        for key in ("last_hidden_state", "pooler_output"):
            assert out[key].shape == ref[key].shape
            assert_close(out[key], ref[key], eager=eager[key], name=key)
        assert len(out.hidden_states) == len(ref.hidden_states) == 5
        for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


@pytest.mark.parametrize("task", ["Sapiens2ForSemanticSegmentation", "Sapiens2ForPoseEstimation",
                                  "Sapiens2ForNormalEstimation"])
def test_task_models_equal_hf(task):
    """Sapiens2's task models: a copy with their `model` on vitfast, the head shared; its output as HF's."""
    hf = model(getattr(sapiens2, task))
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.model, HFSapiens2Model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref, eager = (m(px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    key = next(k for k in ref.keys() if k != "loss")
    assert_close(out[key], ref[key], eager=eager[key], name=key)


def test_mask_token_equals_hf_and_trains():
    """With use_mask_token, masked patches (bool_masked_pos) enter as the mask token: the output as HF's, and a
    backward gives the mask token and every other parameter HF's float64 gradient."""
    hf = model(use_mask_token=True, pos_embed_rescale=None)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x, masked = torch.randn(2, 3, 32, 24), torch.rand(2, 12) > 0.5
    with torch.no_grad():
        out, ref, eager = (m(px, bool_masked_pos=masked).last_hidden_state
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert_close(out, ref, eager=eager, name="last_hidden_state")
    with pytest.raises(ValueError, match=r"bool_masked_pos: expected \[B, patches\] = \[2, 12\], got \(2, 16\)"):
        opt(x, bool_masked_pos=torch.zeros(2, 16, dtype=torch.bool))
    for m in (hf, hf64, opt):
        m.train()
    w = torch.randn(64, dtype=torch.float64)
    backward_weighted(hf64(x.double(), bool_masked_pos=masked).last_hidden_state, w)
    backward_weighted(opt(x, bool_masked_pos=masked).last_hidden_state, w, reference_free=True)
    assert hf.embeddings.mask_token.grad.abs().max() > 0
    assert_grads_match(hf, hf64)


@pytest.mark.parametrize("kind", KINDS)
def test_trains_hf_tensors(kind):
    """Every HF parameter gets HF's float64 gradient (the reference never called): the k / v rows repeated for the
    grouped-query blocks add up, the q / k norms' weights through the norm-and-RoPE pass."""
    assert_trains_hf_tensors(model(**KINDS[kind], pos_embed_rescale=None).train(), (torch.randn(2, 3, 32, 24),),
                             torch.randn(64, dtype=torch.float64))


def test_graph_replays():
    assert_tower_replays(model(), [(torch.randn(2, 3, 32, 24),) for _ in range(3)])


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match="bool_masked_pos .this model has no mask token"):
        opt(x, bool_masked_pos=torch.zeros(1, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"H a multiple of 8 and W of 8, got \(1, 3, 30, 32\)"):
        opt(torch.randn(1, 3, 30, 32))
    with pytest.raises(UnsupportedFeatureError, match=r"train mode with the RoPE augmentations pos_embed_rescale=2.0"):
        opt.train()(x)
    with pytest.raises(UnsupportedFeatureError, match=r"the RoPE augmentation pos_embed_rescale=2.0"):
        vitfast.optimize(model().train())
    with pytest.raises(UnsupportedFeatureError, match=r"hidden_act='gelu' with use_gated_mlp=True"):
        vitfast.optimize(model(hidden_act="gelu"))


def test_trains_after_inference_mode():
    """The RoPE tables cached under torch.inference_mode are not the ones a later training step uses."""
    hf = model(pos_embed_rescale=None)
    assert_trains_after_inference_mode(vitfast.optimize(hf), (torch.randn(1, 3, 32, 24),),
                                       hf.embeddings.patch_embeddings.weight)


@pytest.mark.gpu
def test_sapiens2_on_gpu():
    """Sapiens2-0.4B at its shapes (1024 wide, 16 heads of 64, 8 registers, q / k norms; 8 of its 24 blocks, 2 of them
    grouped-query with 8 key / value heads) at 1024 x 768 px (3,072 patches), bf16, random weights (made on the GPU):
    vitfast against HF in float32 on the GPU, bounded by HF's own bf16 error; eager, capture and replay."""
    config = transformers.Sapiens2Config(num_hidden_layers=8, num_first_full_attention_layers=3,
                                         num_last_full_attention_layers=3)
    assert_tower_on_gpu(lambda: sapiens2.Sapiens2Model(config), (torch.randn(2, 3, 1024, 768, device="cuda"),))
