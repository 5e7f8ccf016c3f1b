"""InferenceEngine: uint8 batches through the fused-normalisation pipeline equal the model's own
forward, batch by batch (incl. a partial last batch), on CPU; CUDA graphs per bucket and the
pinned / side-stream path on GPU."""

import pytest
import torch

from vitfast import reference
from vitfast.data import IMAGENET_MEAN, IMAGENET_STD
from vitfast.engine import InferenceEngine, bucket_sizes
from vitfast.model import VisionTransformer
from vitfast.testing import assert_close, rel_err

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
MEAN, STD = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)


def tiny_models(seed: int = 0, **overrides):
    """(vitfast model, float64 reference model) with the same weights."""
    torch.manual_seed(seed)
    ref = reference.VisionTransformer(**{**TINY, **overrides}).eval()
    model = VisionTransformer(**{**TINY, **overrides}).eval()
    model.load_state_dict(ref.state_dict())
    return model, ref.double()


def images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)


def model_outputs(model, u8: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """The model's own forward on uint8 images with its fused input normalisation."""
    model.set_input_normalization(IMAGENET_MEAN, IMAGENET_STD)
    try:
        with torch.no_grad():
            x = model.forward_features(u8)
            return model.forward_head(x, pre_logits=pre_logits)
    finally:
        model.set_input_normalization(None, None)


def reference_outputs(ref, u8: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    x = reference.normalize_images(u8, MEAN, STD, torch.float64)
    with torch.no_grad():
        return ref.forward_head(ref.forward_features(x), pre_logits=pre_logits)


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_sizes(6) == [1, 2, 4, 6]


def test_cpu_run_equals_model_batch_by_batch():
    model, ref = tiny_models()
    u8 = images(11)                                          # batches 4, 4 and a partial 3
    engine = InferenceEngine(model, batch_size=4, device="cpu")
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    out = engine.run(u8)
    assert out.shape == (11, TINY["num_classes"]) and out.dtype == torch.float32
    for i in range(0, 11, 4):
        assert torch.equal(out[i:i + 4], model_outputs(model, u8[i:i + 4])), f"batch at {i}"
    assert_close(out, reference_outputs(ref, u8), torch.float32)


def test_stream_splits_batches_and_keeps_order():
    model, ref = tiny_models()
    batches = [images(3), images(5), images(2)]             # with batch_size 4: 3 | 4, 1 | 2
    engine = InferenceEngine(model, batch_size=4, device="cpu", output="both")
    outs = list(engine.stream(iter(batches)))
    assert [o[1].shape[0] for o in outs] == [3, 4, 1, 2]
    u8 = torch.cat(batches)
    feats, logits = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    assert_close(logits, reference_outputs(ref, u8), torch.float32, name="logits")
    assert_close(feats, reference_outputs(ref, u8, pre_logits=True), torch.float32, name="embeddings")
    emb = InferenceEngine(model, batch_size=4, device="cpu", output="embeddings").run(batches)
    assert torch.equal(emb, feats)


def test_avg_pool_model_and_custom_normalisation():
    model, ref = tiny_models(global_pool="avg")
    u8 = images(5)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    out = InferenceEngine(model, batch_size=2, device="cpu", mean=mean, std=std).run(u8)
    x = reference.normalize_images(u8, torch.tensor(mean), torch.tensor(std), torch.float64)
    with torch.no_grad():
        assert_close(out, ref(x), torch.float32)


def test_bad_inputs():
    model, _ = tiny_models()
    with pytest.raises(ValueError, match="batch_size: expected a positive int, got 0"):
        InferenceEngine(model, batch_size=0)
    with pytest.raises(ValueError, match="output: expected one of"):
        InferenceEngine(model, batch_size=2, output="probs")
    with pytest.raises(ValueError, match="mean: expected 3 values"):
        InferenceEngine(model, batch_size=2, device="cpu", mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="model: expected a timm-style ViT"):
        InferenceEngine(torch.nn.Linear(2, 2), batch_size=2)
    engine = InferenceEngine(model, batch_size=2, device="cpu")
    with pytest.raises(ValueError, match=r"images: expected a uint8 tensor \[N, 3, H, W\], got torch.float32"):
        engine.run(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="built for 32x32 images, got 48x48"):
        engine.run(images(2, 48))
    with pytest.raises(ValueError, match="expected every batch to hold"):
        InferenceEngine(model, batch_size=2, device="cpu").run([images(2), images(2, 40)])
    with pytest.raises(ValueError, match="at least one image"):
        engine.run([])


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_weights_loaded_after_the_first_run_are_used(dev):
    """New weights loaded in place after a run: the resampled position table is made again (and on
    CUDA the graphs are captured again), so the outputs follow the new weights."""
    model, _ = tiny_models(dynamic_img_size=True)
    u8 = images(3, size=40)                                  # grid 5x5: the 4x4 table is resampled
    engine = InferenceEngine(model, batch_size=4, dtype=torch.float32, device=dev)
    first = engine.run(u8)
    other, other_ref = tiny_models(seed=1, dynamic_img_size=True)
    model.load_state_dict(other.state_dict())
    out = engine.run(u8)
    assert rel_err(out, first) > 1e-2                        # the new weights do change the outputs
    assert_close(out, reference_outputs(other_ref, u8), torch.float32)


# --------------------------------------------------------------------------------------------
# CUDA: graphs per bucket, pinned staging + side-stream copies
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_buckets_equal_eager(dtype):
    model, ref = tiny_models()
    model = model.cuda().to(dtype)
    u8 = images(8 + 8 + 5 + 1)                              # full batches, then buckets 8 (for 5) and 1
    engine = InferenceEngine(model, batch_size=8, dtype=dtype)
    assert engine.use_graphs and engine.buckets == [1, 2, 4, 8]
    out = engine.run(list(u8.split([8, 8, 5, 1])))
    # Bucket 8: eager, captured, then the 5 replayed padded in it; bucket 1 met once: eager.
    assert engine.graphs.captures == 1 and engine.graphs.cached_inputs() == [[(8, 3, 32, 32)]]
    eager = torch.cat([model_outputs(model, b.cuda()).float() for b in u8.split([8, 8, 5, 1])])
    want = reference_outputs(ref, u8)
    assert_close(out, want, dtype, eager=eager)
    again = engine.run(u8)                                   # 8, 8, then 6 padded into the 8 bucket
    assert torch.equal(again[8:16], out[8:16])               # the same graph on the same rows: bitwise
    assert engine.graphs.captures == 1
    assert_close(again, want, dtype, eager=eager)


@pytest.mark.gpu
def test_cuda_pinned_side_stream_path_equals_device_input():
    model, ref = tiny_models()
    u8 = images(20)
    graphs = InferenceEngine(model.cuda(), batch_size=8, dtype=torch.float32)
    from_host = torch.cat(list(graphs.stream(u8.split(3))))            # CPU uint8: pinned + side stream
    from_device = graphs.run(u8.cuda())                                 # already on the GPU: no staging
    eager = InferenceEngine(model, batch_size=8, dtype=torch.float32, cuda_graphs=False).run(u8)
    assert from_host.is_cuda
    assert_close(from_host, reference_outputs(ref, u8), torch.float32)
    torch.testing.assert_close(from_host, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_device, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("output", ["logits", "both"])
def test_cuda_outputs_to_host_equal_device_outputs_and_are_ready(output):
    """stream(to_host=True): pinned CPU tensors equal to the device outputs, in order; each handed over
    when its own copy has arrived (already there to read), with the next batch queued behind it; the
    stage timings count every batch."""
    model, _ = tiny_models()
    u8 = images(8 * 5 + 3)
    engine = InferenceEngine(model.cuda(), batch_size=8, dtype=torch.float32, output=output, profile=True)
    on_device = list(InferenceEngine(model, batch_size=8, dtype=torch.float32, output=output).stream(u8.split(8)))
    host = list(engine.stream(u8.split(8), to_host=True))
    assert len(host) == len(on_device) == 6
    for got, want in zip(host, on_device):
        got, want = (got, want) if output == "both" else ((got,), (want,))
        for g, w in zip(got, want):
            assert g.device.type == "cpu" and g.is_pinned()
            torch.testing.assert_close(g, w.cpu(), rtol=1e-5, atol=1e-6)
    seconds = engine.stage_seconds()
    assert seconds["h2d"] > 0 and seconds["model"] > 0


def test_cpu_to_host_and_profile():
    model, _ = tiny_models()
    u8 = images(10)
    engine = InferenceEngine(model, batch_size=4, device="cpu", profile=True)
    host = torch.cat(list(engine.stream(u8.split(4), to_host=True)))
    assert torch.equal(host, InferenceEngine(model, batch_size=4, device="cpu").run(u8))
    seconds = engine.stage_seconds()
    assert seconds["model"] > 0 and seconds["h2d"] == 0


# Each family's embedding: the pooled features (pre-logits) and, where the model has one, the head's
# output (CLIP's projection, DeiT's mean of two heads); the data config follows the named model.
FAMILY_NAMES = {
    "vit_small_patch14_reg4_dinov2": dict(img_size=28, init_values=0.5),          # registers, layer-scale
    "vit_base_patch16_clip_quickgelu_224": dict(img_size=32, num_classes=16),     # pre-norm, projection head
    "vit_base_patch16_siglip_224": dict(img_size=32),                             # no class token, MAP pooling
    "deit_tiny_distilled_patch16_224": dict(img_size=32, num_classes=5),          # class + distillation heads
    "vit_small_patch16_dinov3": dict(img_size=32, init_values=0.5),               # RoPE, no position table
}


@pytest.mark.parametrize("name", sorted(FAMILY_NAMES))
def test_family_embeddings_and_data_config(name):
    """The engine (uint8 in, normalisation fused into the patch-embed) equals the model's own forward on
    images normalised with the name's mean / std (the model against the float64 reference: test_model)."""
    from vitfast.configs import DATA_CONFIGS
    from vitfast.model import create_model

    shrink = dict(embed_dim=32, depth=2, num_heads=2, **FAMILY_NAMES[name])
    torch.manual_seed(0)
    model = create_model(name, **shrink).eval()
    with torch.no_grad():
        for p in model.parameters():                 # off the 0/1 inits: every parameter counts
            p.add_(torch.randn_like(p) * 0.05)
    size = shrink["img_size"]
    u8 = images(5, size)
    engine = InferenceEngine(model, batch_size=4, device="cpu", output="both")
    assert engine.mean.tolist() == pytest.approx(DATA_CONFIGS[name]["mean"])
    assert engine.std.tolist() == pytest.approx(DATA_CONFIGS[name]["std"])
    feats, out = engine.run(u8)
    mean, std = torch.tensor(DATA_CONFIGS[name]["mean"]), torch.tensor(DATA_CONFIGS[name]["std"])
    x = reference.normalize_images(u8, mean, std, torch.float32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        want_feats, want_out = model.forward_head(tokens, pre_logits=True), model.forward_head(tokens)
    assert feats.shape == (5, 32) and out.shape == want_out.shape
    assert_close(feats, want_feats.double(), torch.float32, name="embeddings")
    assert_close(out, want_out.double(), torch.float32, name="head output")
