"""Llama 3.2 Vision's tower on vitfast: transformers' `MllamaVisionModel` (image tiles, gated tile and position
embeddings, the local encoder with its intermediate outputs, the gated global encoder, HF's attention mask that spares
real queries) and the VLM around it, `MllamaForConditionalGeneration`. Compared in fp32 against HF in float64, bounded
by HF's own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.hf_mllama import HFMllamaVisionModel
from vitfast.testing import (
    MODEL_TOLERANCE,
    assert_close,
    assert_tower_replays,
    assert_trains_hf_tensors,
    perturbed,
)

transformers = pytest.importorskip("transformers")

# tiles of 16 px in patches of 8 (4 patches + the class token, padded to 8), up to 4 tiles; the intermediate layers
# out of order, as a config may list them
VISION = dict(hidden_size=48, attention_heads=3, num_hidden_layers=4, num_global_layers=2, intermediate_size=96,
              image_size=16, patch_size=8, max_num_tiles=4, intermediate_layers_indices=[3, 1],
              vision_output_dim=144, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [2, 2]])
# two prompts of two image slots: 2 x 2 tiles and 1 x 2; one tile and an empty slot (the VLM's padding)
IDS = torch.tensor([[4, 2], [1, 0]])
MASK = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 0, 0, 0], [0, 0, 0, 0]]])


def vision_model(**kw):
    """A small tower off its init, its tanh gates too (HF starts them at 0 and π/4)."""
    hf = perturbed(transformers.MllamaVisionModel(transformers.MllamaVisionConfig(**{**VISION, **kw})))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "gate" in name:
                p.normal_()
    return hf


def test_vision_tower_equals_hf():
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFMllamaVisionModel) and opt.dtype == torch.float32
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x = torch.randn(2, 2, 4, 3, 16, 16)
    with torch.no_grad():
        out, ref, eager = (m(px, IDS, MASK) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
        assert type(out) is type(ref)
        assert out.last_hidden_state.shape == ref.last_hidden_state.shape == (2, 2, 4, 5, 48 * 3)
        assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state)
        # each part on its own: the final tokens, the intermediate outputs interleaved feature by feature
        assert_close(out.last_hidden_state[..., 48:], ref.last_hidden_state[..., 48:],
                     eager=eager.last_hidden_state[..., 48:], name="intermediate")
        assert_close(out.last_hidden_state[1, 1], ref.last_hidden_state[1, 1], eager=eager.last_hidden_state[1, 1],
                     name="the empty slot")
        tup = opt(x, IDS, MASK, return_dict=False)
        assert isinstance(tup, tuple) and torch.equal(tup[0], out.last_hidden_state)


def test_trains_hf_tensors():
    """Every HF parameter gets HF's float64 gradient: the gates through their tanh (layer-scales of the global
    blocks' epilogues, the embeddings' weights), the class token and the tables through the patch embedding. The loss
    leaves out the empty image slot, as the VLM's cross-attention mask does: HF's forward gives it the mean of v (its
    finite mask swamps the scores), while autograd differentiates HF's softmax there as if the scores counted."""
    weights = torch.randn(144, dtype=torch.float64) * (MASK.amax(-1) != 0)[..., None, None, None]
    assert_trains_hf_tensors(vision_model(), (torch.randn(2, 2, 4, 3, 16, 16), IDS, MASK), weights)


def test_graph_replays():
    """One capture serves batches with other aspect ratios and tile masks: they are data."""
    other = (torch.tensor([[1, 1], [3, 4]]), torch.tensor([[[1, 0, 0, 0], [1, 0, 0, 0]], [[1, 1, 0, 0], [1, 1, 1, 1]]]))
    assert_tower_replays(vision_model(), [(torch.randn(2, 2, 4, 3, 16, 16), *ids_mask) for ids_mask in ((IDS, MASK),
                                                                                                       other)])


def test_vision_language_model_equals_hf():
    """Llama 3.2 Vision with the tower on vitfast (the language model and projector shared): the logits over a prompt
    whose text attends to the images through the cross-attention layers, and greedy `generate`, as HF's."""
    text = transformers.MllamaTextConfig(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = transformers.MllamaConfig(vision_config=transformers.MllamaVisionConfig(**VISION), text_config=text,
                                    image_token_index=98)
    model = perturbed(transformers.MllamaForConditionalGeneration(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.vision_model, HFMllamaVisionModel)
    assert not isinstance(model.model.vision_model, HFMllamaVisionModel)
    assert opt.model.language_model is model.model.language_model
    x = torch.randn(2, 2, 4, 3, 16, 16)
    ids = torch.cat([torch.tensor([[1, 98, 98], [1, 98, 5]]), torch.randint(3, 90, (2, 5))], dim=1)
    cross = torch.zeros(2, 8, 2, 4, dtype=torch.long)
    cross[0, 1:, 0], cross[0, 2:, 1] = MASK[0, 0], MASK[0, 1]              # text after each image attends to it
    cross[1, 1:, 0] = MASK[1, 0]
    args = dict(input_ids=ids, aspect_ratio_ids=IDS, aspect_ratio_mask=MASK, cross_attention_mask=cross)
    with torch.no_grad():
        out, ref, eager = (m(pixel_values=px, **args).logits
                           for m, px in ((opt, x), (model64, x.double()), (model, x)))
        assert_close(out, ref, eager=eager, name="logits")
        gen = dict(**args, pixel_values=x, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        assert torch.equal(opt.generate(**gen), model.generate(**gen))


def test_bad_inputs_and_models_are_named():
    opt = vitfast.optimize(vision_model())
    x = torch.randn(2, 2, 4, 3, 16, 16)
    with pytest.raises(ValueError, match=r"pixel_values: expected tiles \[B, M, 4, 3, 16, 16\] .*got \(2, 2, 3, 3, 16"):
        opt(x[:, :, :3], IDS, MASK[..., :3])
    with pytest.raises(ValueError, match=r"aspect_ratio_mask: expected an integer tensor \[2, 2, 4\]"):
        opt(x, IDS, MASK.float())
    with pytest.raises(ValueError, match=r"aspect_ratio_ids: expected ids in \[0, 4\]"):
        opt(x, IDS + 1, MASK)
    with pytest.raises(ValueError, match=r"aspect_ratio_mask: expected 0 or 1 per tile"):
        opt(x, IDS, MASK * 2)
    with pytest.raises(UnsupportedFeatureError, match=r"output_hidden_states=True"):
        opt(x, IDS, MASK, output_hidden_states=True)
    with pytest.raises(UnsupportedFeatureError, match=r"hidden_act='quick_gelu' \(supported: \['gelu'\]\)"):
        vitfast.optimize(vision_model(hidden_act="quick_gelu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vision_tower_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels at Llama 3.2 Vision's head dim (80 = 1280 / 16) and tile size (448 px in
    patches of 14: 1025 tokens padded to 1032), eager then its CUDA graph's capture and replays, against HF in fp32
    within 2x the error of HF itself in that dtype."""
    hf = vision_model(hidden_size=320, attention_heads=4, intermediate_size=1280, image_size=448, patch_size=14,
                      vision_output_dim=960).cuda()
    low = copy.deepcopy(hf).to(dtype)
    opt = vitfast.optimize(low)
    ids, mask = IDS.cuda(), MASK.cuda()
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 2, 4, 3, 448, 448, device="cuda")
            ref, eager, out = hf(x, ids, mask), low(x.to(dtype), ids, mask), opt(x.to(dtype), ids, mask)
            assert out.last_hidden_state.dtype == dtype
            real = mask.bool()                                          # the empty slot's mean of v aside
            assert_close(out.last_hidden_state[real], ref.last_hidden_state[real], dtype=dtype,
                         eager=eager.last_hidden_state[real], tol=MODEL_TOLERANCE[dtype])
    assert opt.cuda_graphs.captures == 1
