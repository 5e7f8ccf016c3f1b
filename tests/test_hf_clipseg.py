"""CLIPSeg on vitfast: transformers' `CLIPSegVisionModel` (CLIP's vision transformer, its position table resampled by
default: CLIPSeg's 352 px inputs on a 224 px table) and the models around it, `CLIPSegModel` (its text tower shared)
and `CLIPSegForImageSegmentation` (its decoder, reading the vision model's hidden states, shared). Compared in fp32
against HF in float64, bounded by HF's own fp32 error; gradients reach HF's tensors."""

import copy

import pytest
import torch

import vitfast
from vitfast.hf import HFCLIPSegVisionModel
from vitfast.testing import assert_close, assert_grads_match, assert_tower_on_gpu, perturbed

transformers = pytest.importorskip("transformers")
clipseg = pytest.importorskip("transformers.models.clipseg.modeling_clipseg")

# patches of 8 on a table for 32 px (16 patches); 48 px images resample it to 36
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=3, image_size=32,
              patch_size=8)
TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            bos_token_id=0, eos_token_id=2)


def model(cls):
    torch.manual_seed(0)
    config = transformers.CLIPSegConfig(text_config=TEXT, vision_config=VISION, projection_dim=16,
                                        extract_layers=[1, 2, 3], reduce_dim=16, decoder_num_attention_heads=2,
                                        decoder_intermediate_size=32)
    return perturbed(cls(config))


@pytest.mark.parametrize("size", [32, 48], ids=["table_size", "resampled_48"])
def test_vision_model_equals_hf(size):
    """CLIPSegVisionModel: last_hidden_state, pooler_output and every hidden state as HF's, the table resampled
    (bicubic) by default for another image size; interpolate_pos_encoding=False at another size refused as HF's."""
    torch.manual_seed(0)
    hf = perturbed(clipseg.CLIPSegVisionModel(transformers.CLIPSegVisionConfig(**VISION)))
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFCLIPSegVisionModel)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out, ref, eager = (m(px, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    for key in ("last_hidden_state", "pooler_output"):
        assert out[key].shape == ref[key].shape
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert len(out.hidden_states) == len(ref.hidden_states) == 5
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")
    if size != 32:
        with pytest.raises(ValueError):
            hf(x, interpolate_pos_encoding=False)
        with pytest.raises(ValueError):
            opt(x, interpolate_pos_encoding=False)


def test_segmentation_equals_hf():
    """CLIPSegForImageSegmentation: a copy with its vision model on vitfast, the text tower and decoder shared; the
    logits conditioned on text and on an image, and the loss with labels, as HF's."""
    hf = model(clipseg.CLIPSegForImageSegmentation)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.clip.vision_model, HFCLIPSegVisionModel) and opt.decoder is hf.decoder
    x, ids = torch.randn(2, 3, 48, 48), torch.randint(3, 99, (2, 5))
    prompts, labels = torch.randn(2, 3, 32, 32), torch.rand(2, 48, 48)
    for name, kw in (("text", dict(input_ids=ids, labels=labels)), ("image", dict(conditional_pixel_values=prompts))):
        with torch.no_grad():
            out, ref, eager = (m(pixel_values=px, **{k: v.double() if m is hf64 and v.is_floating_point() else v
                                                    for k, v in kw.items()})
                               for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert out.logits.shape == ref.logits.shape == (2, 48, 48)
        for key in ("logits", "loss") if "labels" in kw else ("logits",):
            assert_close(out[key], ref[key], eager=eager[key], name=f"{key} ({name} prompt)")


def test_two_tower_model_equals_hf_and_trains():
    """CLIPSegModel: image features and logits_per_image as HF's; the contrastive loss gives every HF parameter
    HF's float64 gradient."""
    hf = model(clipseg.CLIPSegModel)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt.vision_model, HFCLIPSegVisionModel) and opt.text_model is hf.text_model
    x, ids = torch.randn(3, 3, 48, 48), torch.randint(3, 99, (3, 5))
    with torch.no_grad():
        out, ref, eager = (m(input_ids=ids, pixel_values=px) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    assert_close(out.logits_per_image, ref.logits_per_image, eager=eager.logits_per_image, name="logits_per_image")
    hf.train(), hf64.train(), opt.train()
    hf64(input_ids=ids, pixel_values=x.double(), return_loss=True).loss.backward()
    opt(input_ids=ids, pixel_values=x, return_loss=True).loss.backward()
    assert_grads_match(hf, hf64)


@pytest.mark.gpu
def test_clipseg_on_gpu():
    """CLIPSeg rd64 (CLIP ViT-B/16's vision tower, its 224 px table resampled to 352 px: 484 patches; the decoder
    of 64 channels), batch 8, bf16, random weights (made on the GPU): vitfast against HF in float32 on the GPU,
    bounded by HF's own bf16 error; eager, capture and replay."""
    config = transformers.CLIPSegConfig(reduce_dim=64)
    args = (torch.randint(3, 1000, (8, 7), device="cuda"), torch.randn(8, 3, 352, 352, device="cuda"))
    assert_tower_on_gpu(lambda: clipseg.CLIPSegForImageSegmentation(config), args, key="logits")
