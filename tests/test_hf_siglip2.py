"""SigLIP 2 NaFlex on vitfast: transformers' `Siglip2VisionModel` (patchified images of any aspect ratio, padded to
one sequence length, with a patch mask and each image's patch grid), and the models around it (`Siglip2Model`,
`Siglip2ForImageClassification`, the LFM2-VL VLM). Compared in fp32 against HF in float64, bounded by HF's own
fp32 error; the padding is transparent (each image alone, unpadded, gives its rows); gradients reach HF's
tensors; the forward has no host synchronisation and the CUDA graph takes the masks and grids as data."""

import copy

import pytest
import torch
import torch.nn.functional as F

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf import HFSiglip2VisionModel
from vitfast.reference import naflex_position_table
from vitfast.testing import MODEL_TOLERANCE, assert_close, perturbed, simulate_cuda_graphs, without_reference

transformers = pytest.importorskip("transformers")

F64 = torch.float64
# A 4 x 4 position table (num_patches=16) of 4 x 4 patches; the batch's grids (rows, columns) shrink one axis of
# the table and stretch the other, or keep it; N = 20 positions, so every image has padding.
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, patch_size=4,
              num_patches=16)
TEXT = dict(vocab_size=99, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32)
SHAPES = [(3, 5), (4, 4), (6, 3)]
N = 20
WIDTH = 3 * 4 * 4


def vision_model(**kw):
    return perturbed(transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**{**VISION, **kw})))


def naflex_batch(shapes=SHAPES, n=N):
    """(pixel_values [B, n, C·P·P], pixel_attention_mask [B, n] int32, spatial_shapes [B, 2]) as HF's processor
    lays them out, the padding patches random rather than zero (they must not matter)."""
    mask = torch.zeros(len(shapes), n, dtype=torch.int32)
    for i, (h, w) in enumerate(shapes):
        mask[i, :h * w] = 1
    return torch.randn(len(shapes), n, WIDTH), mask, torch.tensor(shapes)


def as64(batch):
    return batch[0].double(), batch[1], batch[2]


def resized_by_interpolate(table, shapes, n):
    """The definition: each image's table from `F.interpolate` (bilinear, antialiased), padded with its first row."""
    G, D = int(table.shape[0] ** 0.5), table.shape[1]
    grid = table.T.reshape(1, D, G, G)
    out = table.new_empty(len(shapes), n, D)
    for i, (h, w) in enumerate(shapes):
        rows = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        rows = rows.reshape(D, h * w).T
        out[i, :h * w], out[i, h * w:] = rows, rows[0]
    return out


@pytest.mark.parametrize("grid, shapes", [(4, SHAPES), (16, [(3, 5), (16, 16), (20, 2), (1, 1), (9, 28)])])
def test_naflex_position_table_is_the_antialiased_bilinear_resize(grid, shapes):
    n = max(h * w for h, w in shapes) + 3
    table = torch.randn(grid * grid, 8, dtype=F64)
    out = naflex_position_table(table, torch.tensor(shapes), n)
    ref = resized_by_interpolate(table, shapes, n)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    out32 = naflex_position_table(table.float(), torch.tensor(shapes), n)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)        # fp32 sums of up to 256 terms


@pytest.mark.parametrize("use_head", [True, False])
def test_siglip2_vision_model_equals_hf(use_head):
    hf = vision_model(vision_use_head=use_head)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFSiglip2VisionModel)
    batch = naflex_batch()
    with torch.no_grad():
        out, ref, eager = opt(*batch, output_hidden_states=True), hf64(*as64(batch), output_hidden_states=True), \
            hf(*batch, output_hidden_states=True)
    assert set(out.keys()) == set(ref.keys())
    for key in ("last_hidden_state", "pooler_output") if use_head else ("last_hidden_state",):
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert len(out.hidden_states) == len(ref.hidden_states) == VISION["num_hidden_layers"] + 1
    for i, (o, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(o, r, eager=e, name=f"hidden_states[{i}]")
    with torch.no_grad():
        as_tuple = opt(*batch, return_dict=False)
    assert all(torch.equal(a, b) for a, b in zip(as_tuple, opt(*batch).to_tuple()))


def test_siglip2_padding_is_transparent():
    """Each image run alone, unpadded and without a mask, gives the rows of its patches in the padded batch and its
    pooled output: the padding keys are masked in every attention, the head's too (ignoring them would move both)."""
    hf = vision_model()
    opt = vitfast.optimize(hf)
    pixels, mask, shapes = naflex_batch()
    with torch.no_grad():
        batch = opt(pixels, mask, shapes)
        for i, (h, w) in enumerate(SHAPES):
            alone = opt(pixels[i:i + 1, :h * w], None, shapes[i:i + 1])
            torch.testing.assert_close(batch.last_hidden_state[i, :h * w], alone.last_hidden_state[0],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(batch.pooler_output[i], alone.pooler_output[0], rtol=1e-5, atol=1e-5)
        unmasked = opt(pixels, None, shapes)
    assert (unmasked.pooler_output - batch.pooler_output).abs().max() > 1e-3        # the mask matters here


def test_siglip2_without_a_mask_equals_hf():
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    pixels, _, shapes = naflex_batch([(4, 5), (5, 4)])
    with torch.no_grad():
        out, ref, eager = opt(pixels, None, shapes), hf64(pixels.double(), None, shapes), hf(pixels, None, shapes)
    for key in ("last_hidden_state", "pooler_output"):
        assert_close(out[key], ref[key], eager=eager[key], name=key)


def test_siglip2_trains_hf_tensors():
    """A loss on the pooled output and the tokens: every HF parameter gets HF's float64 gradient, the position
    table's through the resize, the patch embedding's through the linear."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf).train()
    hf.train(), hf64.train()
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    batch = naflex_batch()
    weights = torch.randn(48, dtype=F64)

    def loss(out):
        rows = out.last_hidden_state * batch[1][..., None]
        return (out.pooler_output * weights.to(rows.dtype)).sum() + rows.square().mean()

    loss(hf64(*as64(batch))).backward()
    out = loss(opt(*batch))
    with without_reference():
        out.backward()                                           # into HF's own tensors' .grad
    for (name, p), (_, p64) in zip(hf.named_parameters(), hf64.named_parameters()):
        assert p.grad is not None, name
        if p64.grad.norm() < 1e-9 * max(1.0, p64.norm().item()):   # k's bias: the exact gradient is 0
            assert p.grad.norm() < 1e-4, name
        else:
            assert_close(p.grad, p64.grad, name=f"grad {name}")


def test_siglip2_graph_replays_with_masks_and_grids_as_data():
    """One capture per (B, N): later batches with other grids and masks replay it, each equal to HF."""
    hf = vision_model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    batches = [naflex_batch(s) for s in (SHAPES, SHAPES, [(2, 2), (5, 4), (4, 3)], [(1, 7), (3, 3), (4, 5)])]
    with torch.no_grad():
        outs = [opt(*b) for b in batches]
        for b, out in zip(batches, outs):
            ref, eager = hf64(*as64(b)), hf(*b)
            assert_close(out.pooler_output, ref.pooler_output, eager=eager.pooler_output, name="pooler_output")
            assert_close(out.last_hidden_state, ref.last_hidden_state, eager=eager.last_hidden_state,
                         name="last_hidden_state")
    assert runner.captures == 1


def test_siglip2_forward_is_one_graph_without_host_syncs():
    """torch.compile with fullgraph=True traces the whole forward, the position resize and the masks included: no
    `.item()` / `.tolist()` (a host synchronisation, which would also bake one batch's grids into a CUDA graph);
    the traced forward equals the eager one for grids it was not traced with (dynamic=False: one trace per shape)."""
    opt = vitfast.optimize(vision_model(), cuda_graphs=False)
    fn = torch.compile(lambda *b: opt(*b).pooler_output, fullgraph=True, backend="eager", dynamic=False)
    with torch.no_grad():
        for shapes in (SHAPES, [(2, 2), (5, 4), (4, 3)]):
            batch = naflex_batch(shapes)
            torch.testing.assert_close(fn(*batch), opt(*batch).pooler_output, rtol=1e-5, atol=1e-5)


def test_siglip2_models_around_the_vision_model_equal_hf():
    """Siglip2Model (get_image_features, image-text logits) and Siglip2ForImageClassification (HF's masked mean of the
    tokens) with their vision model on vitfast."""
    cfg = transformers.Siglip2Config(text_config=TEXT, vision_config=VISION)
    two = perturbed(transformers.Siglip2Model(cfg))
    two64 = copy.deepcopy(two).double()
    opt = vitfast.optimize(two)
    assert isinstance(opt.vision_model, HFSiglip2VisionModel) and opt.text_model is two.text_model
    batch = naflex_batch()
    ids = torch.randint(0, 99, (2, 7))
    with torch.no_grad():
        feats = [m.get_image_features(*b) for m, b in ((opt, batch), (two64, as64(batch)), (two, batch))]
        feats = [f if isinstance(f, torch.Tensor) else f.pooler_output for f in feats]
        assert_close(*feats[:2], eager=feats[2], name="get_image_features")
        logits = [m(input_ids=ids, pixel_values=b[0], pixel_attention_mask=b[1], spatial_shapes=b[2]).logits_per_image
                  for m, b in ((opt, batch), (two64, as64(batch)), (two, batch))]
        assert_close(*logits[:2], eager=logits[2], name="logits_per_image")
    clf = perturbed(transformers.Siglip2ForImageClassification(
        transformers.Siglip2Config(text_config=TEXT, vision_config=VISION, num_labels=5)))
    clf64 = copy.deepcopy(clf).double()
    opt = vitfast.optimize(clf)
    with torch.no_grad():
        out, ref, eager = (m(*b).logits for m, b in ((opt, batch), (clf64, as64(batch)), (clf, batch)))
    assert_close(out, ref, eager=eager, name="logits")


def test_lfm2_vl_with_its_siglip2_tower_on_vitfast_equals_hf():
    """LFM2-VL, a VLM whose `vision_tower` is a SigLIP 2 NaFlex model: the logits over a prompt with two images of
    other aspect ratios, and greedy `generate`, as HF's with the tower on vitfast (the language model shared)."""
    text = dict(TEXT, num_key_value_heads=2, layer_types=["conv", "full_attention"], max_position_embeddings=64)
    cfg = transformers.Lfm2VlConfig(vision_config=dict(VISION, vision_use_head=False), text_config=text,
                                    image_token_id=98, projector_hidden_size=32)
    model = perturbed(transformers.Lfm2VlForConditionalGeneration(cfg))
    model64 = copy.deepcopy(model).double()
    opt = vitfast.optimize(model)
    assert isinstance(opt.model.vision_tower, HFSiglip2VisionModel) and opt.model.language_model is \
        model.model.language_model
    pixels, mask, shapes = naflex_batch([(4, 4), (2, 6)], n=16)          # 2x2 patches per token: 4 + 3 tokens
    ids = torch.cat([torch.tensor([[2]]), torch.full((1, 7), 98), torch.randint(3, 90, (1, 5))], dim=1)
    kw = dict(input_ids=ids, pixel_attention_mask=mask, spatial_shapes=shapes)
    with torch.no_grad():
        out, ref, eager = (m(pixel_values=x, **kw).logits for m, x in ((opt, pixels), (model64, pixels.double()),
                                                                        (model, pixels)))
        assert_close(out, ref, eager=eager, name="logits")
        gen = dict(kw, pixel_values=pixels, max_new_tokens=4, do_sample=False)
        assert torch.equal(opt.generate(**gen), model.generate(**gen))


def test_siglip2_bad_inputs_are_named():
    opt = vitfast.optimize(vision_model())
    pixels, mask, shapes = naflex_batch()
    with pytest.raises(ValueError, match=r"pixel_values: expected patches \[B, N, 48\].*\(3, 3, 16, 16\)"):
        opt(torch.randn(3, 3, 16, 16), mask, shapes)
    with pytest.raises(ValueError, match=r"spatial_shapes: expected an integer tensor \[3, 2\]"):
        opt(pixels, mask, shapes.float())
    with pytest.raises(ValueError, match=r"spatial_shapes: expected patch grids .* at most N = 20 patches"):
        opt(pixels, mask, torch.tensor([[3, 5], [5, 5], [4, 4]]))
    with pytest.raises(ValueError, match=r"pixel_attention_mask: expected \[3, 20\]"):
        opt(pixels, mask[:, :10], shapes)
    with pytest.raises(UnsupportedFeatureError, match="output_attentions"):
        opt(pixels, mask, shapes, output_attentions=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_siglip2_in_half_precision_on_cuda(dtype, no_tf32):
    """fp16 / bf16 on vitfast's kernels, eager then its CUDA graph's replays (other grids each time), against HF in
    fp32 within 2x the error of HF itself in that dtype."""
    hf = vision_model(num_patches=256, patch_size=16, hidden_size=128, num_attention_heads=2).cuda()
    low = copy.deepcopy(hf).to(dtype)
    opt = vitfast.optimize(low)
    grids = [[(16, 16), (12, 20), (8, 30)], [(15, 17), (20, 12), (4, 50)], [(10, 10), (16, 14), (25, 9)]]
    with torch.no_grad():
        for shapes in grids:
            pixels, mask, spatial = (t.cuda() for t in naflex_batch(shapes, n=256))
            pixels = torch.randn(3, 256, 3 * 16 * 16, device="cuda")
            ref, eager = hf(pixels, mask, spatial), low(pixels.to(dtype), mask, spatial)
            out = opt(pixels.to(dtype), mask, spatial)
            for key in ("last_hidden_state", "pooler_output"):
                assert out[key].dtype == dtype
                assert_close(out[key], ref[key], dtype=dtype, eager=eager[key], tol=MODEL_TOLERANCE[dtype], name=key)
    assert opt.cuda_graphs.captures == 1
