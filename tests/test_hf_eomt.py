"""EoMT on vitfast: transformers' `EomtForUniversalSegmentation` (a DINOv2-style ViT with registers and a position
table; learned queries put in front of the tokens for the last blocks; the class and mask heads, the upscale blocks)
and `EomtDinov3ForUniversalSegmentation` (the same on DINOv3: RoPE on the patch tokens, no position table). Compared
in fp32 against HF in float64, bounded by HF's own fp32 error; HF's loss on vitfast's predictions; gradients reach
HF's tensors; a CUDA graph replays the forward."""

import contextlib
import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_eomt import HFEomtForUniversalSegmentation, HFVideomtForUniversalSegmentation
from vitfast.testing import (
    assert_close,
    assert_grads_match,
    assert_tower_on_gpu,
    assert_tower_replays,
    assert_trains_after_inference_mode,
    hf_exact_attention,
    perturbed,
    without_reference,
)

transformers = pytest.importorskip("transformers")
eomt = pytest.importorskip("transformers.models.eomt.modeling_eomt")
eomt_dinov3 = pytest.importorskip("transformers.models.eomt_dinov3.modeling_eomt_dinov3")
videomt = pytest.importorskip("transformers.models.videomt.modeling_videomt")
pytest.importorskip("scipy")                      # HF's EomtLoss (built with the model) needs its Hungarian matcher

# patches of 8 at 32 px: 16 patches after the class token and 2 registers; 5 queries in front for the last 2 blocks;
# the masks upscaled twice, to 16 x 16
CONFIG = dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, image_size=32, patch_size=8, num_blocks=2,
              num_queries=5, num_register_tokens=2, num_labels=3, train_num_points=64)
KINDS = {"eomt": {}, "eomt_swiglu": dict(use_swiglu_ffn=True), "dinov3": dict(dinov3=True),
         "dinov3_key_bias": dict(dinov3=True, key_bias=True)}
KEYS = ("class_queries_logits", "masks_queries_logits", "last_hidden_state")



def model(dinov3=False, **kw):
    """A perturbed EoMT (EoMT-DINOv3) with every attn_mask_probs at 0, as a trained model has them."""
    torch.manual_seed(0)
    if dinov3:
        config = transformers.EomtDinov3Config(**{**CONFIG, "intermediate_size": 96, **kw})
        hf = eomt_dinov3.EomtDinov3ForUniversalSegmentation(config)
    else:
        hf = eomt.EomtForUniversalSegmentation(transformers.EomtConfig(**{**CONFIG, "mlp_ratio": 2, **kw}))
    hf.attn_mask_probs.zero_()
    return perturbed(hf)


@pytest.mark.parametrize("kind", KINDS)
def test_equals_hf(kind):
    """Class and mask logits, last_hidden_state and every hidden state (the queries' blocks one longer), as HF's."""
    hf = model(**KINDS[kind])
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFEomtForUniversalSegmentation)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert type(out) is type(ref)
    assert out.masks_queries_logits.shape == (2, 5, 16, 16) and out.class_queries_logits.shape == (2, 5, 4)
    for key in KEYS:
        assert out[key].shape == ref[key].shape
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert [h.shape[1] for h in out.hidden_states] == [h.shape[1] for h in ref.hidden_states] == [19, 19, 19, 24, 24]
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_post_processing_takes_the_output():
    """HF's image processor turns the stand-in's output into HF's segmentation (what a user calls next)."""
    processor = transformers.EomtImageProcessor(size={"shortest_edge": 32, "longest_edge": 32})
    hf = model()
    opt = vitfast.optimize(hf)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out, ref = opt(x), hf(x)
    got, want = (processor.post_process_semantic_segmentation(o, target_sizes=[(32, 32)])[0] for o in (out, ref))
    assert got.shape == (32, 32) and (got == want).float().mean() > 0.99


@pytest.mark.parametrize("kind", ["eomt", "dinov3"])
def test_trains_hf_tensors(kind):
    """In train mode (every query block's prediction made, as HF's), every HF parameter gets HF's float64 gradient of
    Σ masks · w + Σ classes · w' (the reference never called)."""
    hf = model(**KINDS[kind], **(dict(pos_embed_rescale=None) if kind == "dinov3" else {})).train()
    hf64 = copy.deepcopy(hf).double()
    hf64.set_attn_implementation(hf_exact_attention())         # HF's train mode adds a float32 mask (of ones)
    opt = vitfast.optimize(hf)
    x = torch.randn(2, 3, 32, 32)
    w_masks, w_classes = torch.randn(16, 16, dtype=torch.float64), torch.randn(4, dtype=torch.float64)

    def backward(out, reference_free):
        loss = (out.masks_queries_logits * w_masks.to(out.masks_queries_logits.dtype)).sum() + \
            (out.class_queries_logits * w_classes.to(out.class_queries_logits.dtype)).sum()
        if reference_free:
            with without_reference():
                loss.backward()
        else:
            loss.backward()
    backward(hf64(x.double()), False)
    backward(opt(x), True)
    assert_grads_match(hf, hf64)


def test_loss_is_hfs_on_each_query_blocks_prediction():
    """With mask_labels and class_labels in train mode: HF's loss (its matcher and criterion, the same random points)
    over the prediction of each query block and the final one; it equals HF's criterion on HF's own predictions, and
    its backward reaches HF's tensors as HF's does."""
    hf = model().train()
    twin = copy.deepcopy(hf)
    opt = vitfast.optimize(hf)
    x = torch.randn(2, 3, 32, 32)
    masks = [(torch.rand(2, 32, 32) > 0.5).float(), (torch.rand(1, 32, 32) > 0.5).float()]
    labels = [torch.tensor([0, 2]), torch.tensor([1])]
    predictions = []
    predict = twin.predict
    twin.predict = lambda *a: predictions.append(predict(*a)) or predictions[-1]      # HF's, recorded
    twin(x)
    assert len(predictions) == 3                                    # the 2 query blocks' and the final one
    torch.manual_seed(1)
    want = sum(twin.get_loss(twin.get_loss_dict(m, c, masks, labels, None)) for m, c in predictions)
    torch.manual_seed(1)
    got = opt(x, mask_labels=masks, class_labels=labels).loss
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    want.backward()
    with without_reference():
        got.backward()
    for (name, p), (_, q) in zip(hf.named_parameters(), twin.named_parameters()):   # (k_proj's bias: 0 in theory)
        assert (p.grad - q.grad).norm() <= 1e-4 * q.grad.norm() + 1e-7, name


def test_graph_replays():
    assert_tower_replays(model(), [(torch.randn(2, 3, 32, 32),) for _ in range(3)], key="masks_queries_logits")


def test_refuses_what_it_does_not_run():
    hf = model()
    opt = vitfast.optimize(hf)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, output_attentions=True)
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 32, 32\] \(the configured size\), got "
                                         r"\(1, 3, 48, 32\)"):
        opt(torch.randn(1, 3, 48, 32))
    hf.attn_mask_probs[1] = 0.5                         # mid-anneal: EoMT's masked attention
    with pytest.raises(UnsupportedFeatureError, match=r"attn_mask_probs=\[0.0, 0.5\]: EoMT's masked attention"):
        opt(x)
    hf.attn_mask_probs.zero_()
    with torch.no_grad():
        assert_close(opt(x).masks_queries_logits, copy.deepcopy(hf).double()(x.double()).masks_queries_logits)
    with pytest.raises(UnsupportedFeatureError, match=r"hidden_act='silu'"):
        vitfast.optimize(model(dinov3=True, use_gated_mlp=True, hidden_act="silu"))
    with pytest.raises(UnsupportedFeatureError, match=r"the RoPE augmentation pos_embed_rescale=2.0"):
        vitfast.optimize(model(dinov3=True).train())
    dinov3 = vitfast.optimize(model(dinov3=True))
    with pytest.raises(UnsupportedFeatureError, match=r"train mode with the RoPE augmentations pos_embed_rescale=2.0"):
        dinov3.train()(x)
    with pytest.raises(UnsupportedFeatureError, match=r"drop-path p=0.1 \(layers.0.drop_path\)"):
        vitfast.optimize(model(drop_path_rate=0.1).train())


def video_model(**kw):
    """A perturbed VidEoMT (its attn_mask_probs left at 1: HF's video forward never reads them)."""
    torch.manual_seed(0)
    config = transformers.VideomtConfig(**{**CONFIG, "mlp_ratio": 2, **kw})
    return perturbed(videomt.VideomtForUniversalSegmentation(config))


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_video_equals_hf(swiglu):
    """VidEoMT over clips of 3 frames: the first blocks over every frame at once, then frame by frame the queries
    (the previous frame's through query_updater) through the last blocks; the outputs of every frame (frame-major) and
    every hidden state as HF's output capturing records them (each call of a block), as HF's."""
    hf = video_model(use_swiglu_ffn=swiglu)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFVideomtForUniversalSegmentation) and opt.main_input_name == "pixel_values_videos"
    x = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert type(out) is type(ref) and out.masks_queries_logits.shape == (6, 5, 16, 16)
    for key in KEYS:
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert [tuple(h.shape[:2]) for h in out.hidden_states] == [tuple(h.shape[:2]) for h in ref.hidden_states] == \
        [(6, 19)] * 3 + [(2, 24)] * 5 + [(6, 24)]
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")
    assert_close(opt(pixel_values_videos=x[:, :1]).masks_queries_logits,
                 hf64(x[:, :1].double()).masks_queries_logits)                   # one frame: no query_updater


def test_video_trains_hf_tensors():
    """Every HF parameter that HF's float64 forward reaches (not the mask token: no masked patches) gets its gradient
    of Σ masks · w + Σ classes · w' (the reference never called)."""
    hf = video_model().train()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    x = torch.randn(1, 2, 3, 32, 32)
    w_masks, w_classes = torch.randn(16, 16, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    for m, px, free in ((hf64, x.double(), False), (opt, x, True)):
        out = m(px)
        loss = (out.masks_queries_logits * w_masks.to(px.dtype)).sum() + \
            (out.class_queries_logits * w_classes.to(px.dtype)).sum()
        with without_reference() if free else contextlib.nullcontext():
            loss.backward()
    reached = [(n, p, q) for (n, p), (_, q) in zip(hf.named_parameters(), hf64.named_parameters())
               if q.grad is not None]
    assert [n for n, _ in hf.named_parameters() if n not in {n for n, *_ in reached}] == ["embeddings.mask_token"]
    for name, p, q in reached:
        if q.grad.norm() < 1e-9 * max(1.0, q.norm().item()):          # a key bias: 0 in theory
            assert p.grad.norm() < 1e-4, name
        else:
            assert_close(p.grad, q.grad, name=f"grad {name}")


def test_video_replays_and_refuses():
    assert_tower_replays(video_model(), [(torch.randn(1, 2, 3, 32, 32),) for _ in range(3)], key="masks_queries_logits")
    opt = vitfast.optimize(video_model())
    x = torch.randn(1, 2, 3, 32, 32)
    with pytest.raises(ValueError, match="pixel_values: VideomtForUniversalSegmentation takes pixel_values_videos"):
        opt(pixel_values=x)
    with pytest.raises(ValueError, match=r"expected videos \[B, frames, 3, 32, 32\] \(the configured size\), got "
                                         r"\(2, 3, 32, 32\)"):
        opt(x[0])
    with pytest.raises(ValueError, match="mask_labels / class_labels: HF's VideomtForUniversalSegmentation trains no"):
        opt(x, mask_labels=[torch.zeros(1, 32, 32)], class_labels=[torch.tensor([0])])


def test_trains_after_inference_mode():
    """EoMT-DINOv3's RoPE tables cached under torch.inference_mode are not the ones a later training step uses."""
    hf = model(dinov3=True, pos_embed_rescale=None)
    assert_trains_after_inference_mode(vitfast.optimize(hf), (torch.randn(1, 3, 32, 32),),
                                       hf.embeddings.patch_embeddings.weight, key="masks_queries_logits")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["eomt", "dinov3", "video"])
def test_eomt_large_on_gpu(kind):
    """EoMT-L at its shapes (1024 wide, 16 heads of 64, 4 registers, 200 queries, 640 px in patches of 16: 1,600
    patches, masks upscaled to 160 x 160; 8 of its 24 blocks, the queries in the last 4; VidEoMT's over 3 frames),
    bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU, bounded by HF's own bf16 error;
    eager, capture and replay."""
    def build():
        if kind == "video":
            return videomt.VideomtForUniversalSegmentation(transformers.VideomtConfig(num_hidden_layers=8))
        if kind == "dinov3":
            hf = eomt_dinov3.EomtDinov3ForUniversalSegmentation(transformers.EomtDinov3Config(num_hidden_layers=8))
        else:
            hf = eomt.EomtForUniversalSegmentation(transformers.EomtConfig(num_hidden_layers=8))
        hf.attn_mask_probs.zero_()
        return hf
    shape = (1, 3, 3, 640, 640) if kind == "video" else (2, 3, 640, 640)   # VidEoMT: a clip of 3 frames
    assert_tower_on_gpu(build, (torch.randn(*shape, device="cuda"),), key="masks_queries_logits")
