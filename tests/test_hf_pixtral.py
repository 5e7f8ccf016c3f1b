"""Pixtral's vision encoder on vitfast: transformers' `PixtralVisionModel` (images of any size in one padded batch,
packed into one sequence, each image attending within itself: the attention kernel's varlen form) and the VLMs
around it, Mistral 3 (Mistral Small 3.1 / 3.2) and LLaVA (Pixtral-12B). Compared in fp32 against HF in float64,
bounded by HF's own fp32 error; the packing is transparent (each image alone gives its rows); gradients reach HF's
tensors; a CUDA graph replays batches of other image sizes with the same token and image counts."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_pixtral import HFPixtralVisionModel
from vitfast.reference import pixtral_patch_layout
from vitfast.testing import (
    MODEL_TOLERANCE,
    assert_close,
    assert_grads_match,
    backward_weighted,
    perturbed,
    simulate_cuda_graphs,
)

transformers = pytest.importorskip("transformers")

P = 4                                                    # patch size
VISION = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=P, hidden_act="silu")
TEXT = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, head_dim=12)
# Three images padded to 32 x 24 pixels: 8 x 6, 4 x 5 (36 x 20 pixels: the last row of pixels is no patch) and
# 2 x 6 patches, T = 80 in segments of 48, 20 and 12.
SIZES = [(32, 24), (19, 20), (8, 24)]


def vision_model(**kw):
    return perturbed(transformers.PixtralVisionModel(transformers.PixtralVisionConfig(**{**VISION, **kw})))


def images(sizes=SIZES, padded=(32, 24)):
    """(pixel_values [n, 3, H, W], image_sizes [n, 2]) as HF's processor gives them: each image at the top left of
    its slot; the padding holds noise too, which no output may read."""
    return torch.randn(len(sizes), 3, *padded), torch.tensor(sizes)


def test_layout_is_hfs_order():
    """Image after image, each one's patches row by row, positions (row, column) in its own grid."""
    where, cu = pixtral_patch_layout([(8, 12), (13, 4)], 4)
    assert cu.tolist() == [0, 6, 9] and cu.dtype == torch.int32
    assert where.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2],
                              [1, 0, 0], [1, 1, 0], [1, 2, 0]]


def test_vision_tower_equals_hf():
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFPixtralVisionModel) and opt.dtype == torch.float32 and opt.patch_size == P
    x, sizes = images()
    with torch.no_grad():
        out, ref, eager = (m(px, image_sizes=sizes, output_hidden_states=True)
                           for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref) and set(out.keys()) == set(ref.keys()) == {"last_hidden_state", "hidden_states"}
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (1, 80, 32)
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        assert len(out.hidden_states) == len(ref.hidden_states) == len(hf.transformer.layers) + 1
        for i, (o, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
            assert_close(o, r, eager=e, name=f"hidden_states[{i}]")
        # image_sizes as a list, and the whole slot of each image when they are left out
        as_list = opt(x, image_sizes=sizes.tolist())
        assert torch.equal(as_list.last_hidden_state, out.last_hidden_state)
        assert_close(opt(x).last_hidden_state, hf64(x.double()).last_hidden_state, eager=hf(x).last_hidden_state)
        # an index or a list of indices (a VLM's vision_feature_layer) keeps those hidden states only, as HF's
        # from transformers 5.2x (5.17 keeps them all for an index, and mistakes a list)
        for pick, picked in ((-1, {3}), ([0, -2], {0, 2})):
            o = opt(x, sizes, output_hidden_states=pick)
            assert [h is None for h in o.hidden_states] == [i not in picked for i in range(4)]
            for i in picked:
                assert_close(o.hidden_states[i], ref.hidden_states[i], name=f"output_hidden_states={pick}")
            r = hf64(x.double(), sizes, output_hidden_states=pick).hidden_states
            if len(r) == 4 and any(h is None for h in r):
                assert [h is None for h in o.hidden_states] == [h is None for h in r]
        as_tuple = opt(x, sizes, return_dict=False)
    assert len(as_tuple) == 1 and torch.equal(as_tuple[0], out.last_hidden_state)


def test_packing_is_transparent():
    """Each image alone (in a batch of its own size) gives its rows of the packed batch, whatever the padding
    holds: no image attends outside itself (one image over all the tokens would move every row)."""
    opt = vitfast.optimize(vision_model())
    x, sizes = images()
    with torch.no_grad():
        batch = opt(x, sizes).last_hidden_state[0]
        start = 0
        for i, (h, w) in enumerate(SIZES):
            n = (h // P) * (w // P)
            alone = opt(x[i:i + 1, :, :h, :w]).last_hidden_state[0]
            torch.testing.assert_close(batch[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
        noisy = x.clone()
        noisy[1, :, 16:], noisy[1, :, :, 20:] = 1e3, -1e3   # image 1's padding, and its rows that make no patch
        assert torch.equal(opt(noisy, sizes).last_hidden_state[0], batch)


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient: the patch convolution's through the GEMM, q / k / v and
    gate / up through their joined weights."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf).train()
    hf.train(), hf64.train()
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x, sizes = images()
    weights = torch.randn(32, dtype=torch.float64)
    backward_weighted(hf64(x.double(), sizes).last_hidden_state, weights)
    backward_weighted(opt(x, sizes).last_hidden_state, weights, reference_free=True)  # into HF's own tensors' .grad
    assert_grads_match(hf, hf64)


def test_graph_replays_with_the_layout_as_data():
    """One capture per (padded size, tokens, images, largest image): batches of other image sizes with those
    replay it, each equal to HF."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    batches = [SIZES, SIZES, [(32, 24), (16, 20), (12, 16)], [(8, 24), (32, 24), (20, 16)]]   # 48, 20 and 12 each
    with torch.no_grad():
        for sizes in batches:
            x, s = images(sizes)
            out, ref, eager = opt(x, s), hf64(x.double(), s), hf(x, s)
            assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
    assert runner.captures == 1


@pytest.mark.parametrize("name", ["Mistral3ForConditionalGeneration", "LlavaForConditionalGeneration",
                                  "LightOnOcrForConditionalGeneration"])
def test_vision_language_models_equal_hf(name):
    """Mistral 3 (Mistral Small 3.1 / 3.2: the patch merger and projector on the last hidden state), LLaVA
    (Pixtral-12B) and LightOnOCR (the tower as its `vision_encoder`, a Qwen3 language model) with the tower on vitfast
    (the language model shared): the logits over a prompt with two images of other sizes, and greedy `generate`, as
    HF's."""
    vision = transformers.PixtralVisionConfig(**VISION)
    text = transformers.MistralConfig(**TEXT)
    where = "model.vision_tower"
    if name == "LightOnOcrForConditionalGeneration":
        lighton = pytest.importorskip("transformers.models.lighton_ocr")
        cfg = lighton.LightOnOcrConfig(vision_config=vision, text_config=transformers.Qwen3Config(**TEXT),
                                       image_token_id=98, spatial_merge_size=2)
        per_image = [(32 // P // 2) * (24 // P // 2), (16 // P // 2) * (8 // P // 2)]     # merged 2 x 2
        where = "model.vision_encoder"
    elif name == "Mistral3ForConditionalGeneration":
        cfg = transformers.Mistral3Config(vision_config=vision, text_config=text, image_token_index=98,
                                          spatial_merge_size=2)
        per_image = [(32 // P // 2) * (24 // P // 2), (16 // P // 2) * (8 // P // 2)]     # merged 2 x 2
    else:
        cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=98,
                                       vision_feature_layer=-1, vision_feature_select_strategy="full")
        per_image = [(32 // P) * (24 // P), (16 // P) * (8 // P)]
    model = perturbed(getattr(transformers, name)(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.get_submodule(where), HFPixtralVisionModel)
    assert opt.model.language_model is model.model.language_model
    x, sizes = images([(32, 24), (16, 8)])
    ids = torch.cat([torch.tensor([[2]]), torch.full((1, per_image[0]), 98), torch.tensor([[3]]),
                     torch.full((1, per_image[1]), 98), torch.randint(4, 90, (1, 5))], dim=1)
    with torch.no_grad():
        out, ref, eager = (m(input_ids=ids, pixel_values=px, image_sizes=sizes).logits
                           for m, px in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        gen = dict(input_ids=ids, pixel_values=x, image_sizes=sizes, max_new_tokens=3, do_sample=False)
        assert torch.equal(opt.generate(**gen), model.generate(**gen))


def test_bad_inputs_and_models_are_named():
    opt = vitfast.optimize(vision_model())
    x, sizes = images()
    with pytest.raises(ValueError, match=r"pixel_values: expected images \[n, 3, H, W\], got \(3, 1, 32, 24\)"):
        opt(x[:, :1], sizes)
    with pytest.raises(ValueError, match=r"image_sizes: expected 3 \(height, width\) pairs, each between the patch "
                                         r"size 4 and the padded batch's 32 x 24"):
        opt(x, torch.tensor([[32, 24], [40, 8], [8, 8]]))
    with pytest.raises(ValueError, match=r"image_sizes: expected 3 .*\[\[32, 24\], \[8, 8\]\]"):
        opt(x, [[32, 24], [8, 8]])
    with pytest.raises(ValueError, match=r"image_sizes: expected 3 .*between the patch size 4"):
        opt(x, [[32, 24], [3, 8], [8, 8]])
    with pytest.raises(ValueError, match=r"pixel_values: expected images of at least the patch size 4 x 4, got 3 x 8"):
        opt(torch.randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match=r"image_sizes: expected integers .* torch.float32"):
        opt(x, sizes.float())
    with pytest.raises(ValueError, match=r"output_hidden_states: expected a bool, an index or a list .*'last'"):
        opt(x, sizes, output_hidden_states="last")
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(x, sizes, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match=r"hidden_act='gelu' \(supported: \['silu'\]"):
        vitfast.optimize(vision_model(hidden_act="gelu"))
    hf = vision_model()
    hf.transformer.layers[1].attention.k_proj = torch.nn.Linear(32, 32)          # a bias the tower would drop
    with pytest.raises(UnsupportedFeatureError, match=r"transformer.layers.1.attention.k_proj with bias"):
        vitfast.optimize(hf)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels at Pixtral's head dim (64), eager then its CUDA graph's replays (other image
    sizes each time), against HF in fp32 within 2x the error of HF itself in that dtype."""
    hf = vision_model(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_hidden_layers=2,
                      patch_size=16).cuda()
    low = copy.deepcopy(hf).to(dtype)
    opt = vitfast.optimize(low)
    batches = [[(512, 384), (256, 256), (128, 512)], [(384, 512), (512, 128), (256, 256)],
               [(512, 256), (256, 512), (128, 512)]]
    with torch.no_grad():
        for sizes in batches:
            x = torch.randn(len(sizes), 3, 512, 512, device="cuda")
            s = torch.tensor(sizes, device="cuda")
            ref, eager, out = hf(x, s), low(x.to(dtype), s), opt(x.to(dtype), s)
            assert out.last_hidden_state.dtype == dtype
            assert_close(out.last_hidden_state, ref.last_hidden_state, dtype=dtype, eager=eager.last_hidden_state,
                         tol=MODEL_TOLERANCE[dtype])
    assert opt.cuda_graphs.captures == 1
