"""Gemma 4's vision tower on vitfast: transformers' `Gemma4VisionModel` (padded patch batches with (x, y) positions,
sandwich RMSNorms, q / k / v norms, HF's per-half 2D RoPE, clipped linears, grouped-query attention, the pooler and
its standardization) and the VLM around it, `Gemma4ForConditionalGeneration`. Compared in fp32 against HF in float64,
bounded by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_gemma4 import HFGemma4VisionModel, head_order
from vitfast.testing import (
    MODEL_TOLERANCE,
    assert_close,
    assert_tower_replays,
    assert_trains_hf_tensors,
    perturbed,
)

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4VisionModel"):
    pytest.skip("transformers without Gemma 4", allow_module_level=True)

# patches of 4 x 4 pixels (48 values), head dim 16 (the RoPE turns 4 pairs per axis), 2 x 2 pooling
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=3,
              head_dim=16, patch_size=4, pooling_kernel_size=2, position_embedding_size=64, standardize=True)


def vision_model(**kw):
    """A small tower off its init, the standardization's and the clamps' buffers too (the clamps cut into the
    activations: a forward that skipped one would differ)."""
    hf = perturbed(transformers.Gemma4VisionModel(transformers.Gemma4VisionConfig(**{**VISION, **kw})))
    with torch.no_grad():
        for name, b in hf.named_buffers():
            if name == "std_bias":
                b.normal_()
            elif name == "std_scale":
                b.uniform_(0.5, 1.5)
            elif name.endswith("_min"):
                b.fill_(-1.5 if name.endswith("input_min") else -0.2)
            elif name.endswith("_max"):
                b.fill_(1.2 if name.endswith("input_max") else 0.25)
    return hf


def patches(sizes, n: int, dims: int = 48):
    """Images of (columns, rows) patches, each padded to n patches -> pixel_values [B, n, dims] in [0, 1] and their
    positions [B, n, 2] (x, y; -1 for padding), as HF's image processor lays them out."""
    pos = torch.full((len(sizes), n, 2), -1, dtype=torch.long)
    for b, (w, h) in enumerate(sizes):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos[b, :w * h] = torch.stack([xs, ys], -1).reshape(-1, 2)
    return torch.rand(len(sizes), n, dims), pos


def test_head_order_pairs_gemma4_rope_halves_as_rotate_half():
    """Column j and j + D/2 of the reordered head are a pair of Gemma 4's RoPE: (i, i + D/4) of one half."""
    order = head_order(16)
    assert sorted(order) == list(range(16))
    pairs = {(order[j], order[j + 8]) for j in range(8)}
    assert pairs == {(i, i + 4) for i in range(4)} | {(8 + i, 12 + i) for i in range(4)}
    assert all(order[j] < 8 for j in range(4)) and all(order[j] >= 8 for j in range(4, 8))    # x's pairs first


@pytest.mark.parametrize("kw, hidden", [({}, True), ({"hidden_activation": "silu"}, False),
                                        ({"hidden_activation": "gelu"}, False), ({"use_clipped_linears": True}, False),
                                        ({"num_key_value_heads": 1, "use_clipped_linears": True}, False)],
                         ids=["packed-geglu", "packed-swiglu", "packed-unfused", "clipped", "clipped-gqa"])
def test_vision_tower_equals_hf(kw, hidden):
    hf = vision_model(**kw)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFGemma4VisionModel) and opt.dtype == torch.float32
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    pv, pos = patches([(4, 4), (2, 4), (4, 2)], 16)          # the second and third images padded
    with torch.no_grad():
        out, ref, eager = (m(px, pos, output_hidden_states=hidden) for m, px in ((opt, pv), (hf64, pv.double()),
                                                                                 (hf, pv)))
        assert type(out) is type(ref) and set(out.keys()) == set(ref.keys())
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (4 + 2 + 2, 48)
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        if hidden:
            assert len(out.hidden_states) == len(ref.hidden_states) == 3
            for i, (a, b, c) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
                assert_close(a, b, eager=c, name=f"hidden_states[{i}]")
        tup = opt(pv, pos, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], out.last_hidden_state)
        if kw.get("use_clipped_linears"):                  # the clamps are in play: HF without them differs
            for name, b in hf64.named_buffers():
                if name.endswith(("_min", "_max")):
                    b.fill_(float("inf") if name.endswith("_max") else -float("inf"))
            assert not torch.allclose(hf64(pv.double(), pos).last_hidden_state, ref.last_hidden_state, atol=1e-3)


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient: q and k through their reordered rows, the q / k norms through
    their reordered weights, k and v of grouped-query attention through their repeated rows, the position tables
    through the patch embedding's epilogue, the clamps passing gradients where they do not clip."""
    assert_trains_hf_tensors(vision_model(num_key_value_heads=1, use_clipped_linears=True),
                             patches([(4, 4), (4, 2)], 16), torch.randn(48, dtype=torch.float64))


def test_graph_replays():
    """One capture serves batches whose images differ in size and padding: the positions are data."""
    assert_tower_replays(vision_model(), [patches(sizes, 16) for sizes in ([(4, 4), (4, 4)], [(2, 4), (4, 4)],
                                                                           [(4, 2), (2, 2)])])


def test_vision_language_model_equals_hf():
    """Gemma 4 with the tower on vitfast (the language model and embedder shared): image features, the logits over
    a prompt with an image per row, greedy `generate`, as HF's."""
    text = transformers.Gemma4TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         vocab_size_per_layer_input=128, hidden_size_per_layer_input=8,
                                         max_position_embeddings=128, sliding_window=16,
                                         layer_types=["sliding_attention", "full_attention"])
    cfg = transformers.Gemma4Config(text_config=text, vision_config=transformers.Gemma4VisionConfig(**VISION),
                                    audio_config=None, boi_token_id=120, eoi_token_id=121, image_token_id=122,
                                    video_token_id=123, boa_token_id=124, eoa_token_index=125, audio_token_id=126)
    model = perturbed(transformers.Gemma4ForConditionalGeneration(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.vision_tower, HFGemma4VisionModel)
    assert not isinstance(model.model.vision_tower, HFGemma4VisionModel)
    assert opt.model.language_model is model.model.language_model and opt.model.embed_vision is model.model.embed_vision
    pv, pos = patches([(4, 4), (4, 4)], 16)
    with torch.no_grad():
        feats = [m.get_image_features(pixel_values=px, image_position_ids=pos).pooler_output
                 for m, px in ((opt, pv), (model64, pv.double()), (model, pv))]
        for i, (a, b, c) in enumerate(zip(*feats)):
            assert_close(a, b, eager=c, name=f"get_image_features[{i}]")
        ids = torch.cat([torch.tensor([[2, 120]] * 2), torch.full((2, 4), 122), torch.tensor([[121]] * 2),
                         torch.randint(3, 100, (2, 5))], dim=1)
        out, ref, eager = (m(input_ids=ids, pixel_values=px, image_position_ids=pos).logits
                           for m, px in ((opt, pv), (model64, pv.double()), (model, pv)))
        assert_close(out, ref, eager=eager, name="logits")
        gen = dict(input_ids=ids, pixel_values=pv, image_position_ids=pos, attention_mask=torch.ones_like(ids),
                   max_new_tokens=3, do_sample=False)
        assert torch.equal(opt.generate(**gen), model.generate(**gen))


def test_bad_inputs_and_models_are_named():
    opt = vitfast.optimize(vision_model())
    pv, pos = patches([(4, 4)], 16)
    with pytest.raises(ValueError, match=r"pixel_values: expected patches \[B, N, 48\] .*got \(1, 16, 47\)"):
        opt(pv[..., :47], pos)
    with pytest.raises(ValueError, match=r"pixel_position_ids: expected an integer tensor \[B, N, 2\] = \[1, 16, 2\]"):
        opt(pv, pos.float())
    with pytest.raises(ValueError, match=r"pixel_values: expected a patch count N that pools .* got N = 18"):
        opt(torch.rand(1, 18, 48), torch.zeros(1, 18, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pool into 3 outputs of 2 x 2 patches .* got a patch past them"):
        opt(pv[:, :12], pos[:, :12])                       # 12 patches of a 4 x 4 image: the pooled grid is 2 x 2
    bad = pos.clone()
    bad[0, 3] = 64
    with pytest.raises(ValueError, match=r"pixel_position_ids: expected positions in \[0, 64\)"):
        opt(pv, bad)
    bad[0, 3] = torch.tensor([-1, 2])                     # half a padding marker
    with pytest.raises(ValueError, match=r"or \(-1, -1\) for padding"):
        opt(pv, bad)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(pv, pos, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match=r"train mode with dropout p=0.1 \(encoder.layers.0.self_attn"):
        vitfast.optimize(vision_model(attention_dropout=0.1).train())
    with pytest.raises(UnsupportedFeatureError, match=r"pooling_kernel_size=1"):
        vitfast.optimize(vision_model(pooling_kernel_size=1))


@pytest.mark.gpu
@pytest.mark.parametrize("clipped", [False, True], ids=["packed", "clipped"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, clipped, no_tf32):
    """fp16 / bf16 on vitfast's kernels at Gemma 4's head dim (72 = 1152 / 16), the large models' packed GEMMs with
    the tanh-GELU gating in fc1's epilogue or the small ones' clipped linears, padded images, eager then its CUDA
    graph's capture and replays, against HF in fp32 within 2x the error of HF itself in that dtype."""
    hf = vision_model(hidden_size=288, num_attention_heads=4, num_key_value_heads=4, head_dim=72,
                      intermediate_size=1076, patch_size=16, pooling_kernel_size=3, position_embedding_size=256,
                      use_clipped_linears=clipped).cuda()
    low = copy.deepcopy(hf).to(dtype)
    opt = vitfast.optimize(low)
    with torch.no_grad():
        for sizes in ([(12, 9), (9, 12)], [(6, 9), (12, 9)], [(12, 9), (3, 3)]):
            pv, pos = patches(sizes, 108, dims=768)
            pv, pos = pv.cuda(), pos.cuda()
            ref, eager, out = hf(pv, pos), low(pv.to(dtype), pos), opt(pv.to(dtype), pos)
            assert out.last_hidden_state.dtype == dtype
            assert_close(out.last_hidden_state, ref.last_hidden_state, dtype=dtype,
                         eager=eager.last_hidden_state, tol=MODEL_TOLERANCE[dtype])
    assert opt.cuda_graphs.captures == 1
