"""HunYuan-VL's vision tower on vitfast: transformers' `HunYuanVLVisionTransformer` (packed patches of images of any
size with grid_thw, HF's learned table resized to each image's grid, each image attending within itself through the
attention kernel's varlen form, HF's patch merger per image). Compared in fp32 against HF in float64, bounded by HF's
own fp32 error; gradients reach HF's tensors; a CUDA graph replays the forward per grid."""

import copy

import pytest
import torch

import vitfast
from vitfast.convert import UnsupportedFeatureError
from vitfast.graphs import CUDAGraphRunner
from vitfast.hf_hunyuan_vl import HFHunYuanVLVisionTransformer
from vitfast.testing import assert_close, assert_grads_match, backward_weighted, perturbed, simulate_cuda_graphs

transformers = pytest.importorskip("transformers")
hunyuan = pytest.importorskip("transformers.models.hunyuan_vl.modeling_hunyuan_vl")
config_module = pytest.importorskip("transformers.models.hunyuan_vl.configuration_hunyuan_vl")

P = 4
# a 4 x 4 table (max_image_size 16 / patch 4) resized to each grid; merges of 2 x 2 into a text width of 32
CONFIG = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3, patch_size=P,
              max_image_size=16, spatial_merge_size=2, text_hidden_size=32, out_hidden_size=32)
GRID = [(1, 4, 6), (1, 2, 4), (1, 6, 2)]                   # 24 + 8 + 12 = 44 patches


def model(**kw):
    torch.manual_seed(0)
    hf = hunyuan.HunYuanVLVisionTransformer(config_module.HunYuanVLVisionConfig(**{**CONFIG, **kw}))
    with torch.no_grad():                                   # the merger's special tokens (empty at init)
        for p in (hf.patch_merger.image_newline, hf.patch_merger.image_begin, hf.patch_merger.image_end,
                  hf.patch_merger.image_sep):
            p.normal_()
    return perturbed(hf)


def packed(grid=GRID):
    return torch.randn(sum(t * h * w for t, h, w in grid), 3 * P * P), torch.tensor(grid)


def test_equals_hf():
    """last_hidden_state, pooler_output (the merged tokens of every image) and every hidden state, as HF's."""
    hf = model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    assert isinstance(opt, HFHunYuanVLVisionTransformer)
    assert {id(p) for p in opt.parameters()} == {id(p) for p in hf.parameters()}
    x, grid = packed()
    with torch.no_grad():
        out, ref, eager = (m(px, grid, output_hidden_states=True) for m, px in ((opt, x), (hf64, x.double()), (hf, x)))
    for key in ("last_hidden_state", "pooler_output"):
        assert out[key].shape == ref[key].shape
        assert_close(out[key], ref[key], eager=eager[key], name=key)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for i, (h, r, e) in enumerate(zip(out.hidden_states, ref.hidden_states, eager.hidden_states)):
        assert_close(h, r, eager=e, name=f"hidden_states[{i}]")


def test_packing_is_transparent():
    """Each image alone gives its rows of the packed batch (one segment over all of them would move every row)."""
    opt = vitfast.optimize(model())
    x, grid = packed()
    with torch.no_grad():
        batch = opt(x, grid).last_hidden_state
        start = 0
        for t, h, w in GRID:
            n = t * h * w
            alone = opt(x[start:start + n], torch.tensor([[t, h, w]])).last_hidden_state
            torch.testing.assert_close(batch[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


def test_trains_hf_tensors():
    """Every HF parameter (the table's through HF's resizing, the merger's) gets HF's float64 gradient through the
    kernels' backward, the reference never called."""
    hf = model()
    hf.patch_merger.image_sep.requires_grad_(False)          # the tower's forward leaves it unused (its VLM's token)
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    hf.train(), hf64.train(), opt.train()
    x, grid = packed()
    out64 = hf64(x.double(), grid)
    weights = torch.randn(out64.pooler_output.shape, dtype=torch.float64)
    backward_weighted(out64.pooler_output, weights)
    backward_weighted(opt(x, grid).pooler_output, weights, reference_free=True)
    assert_grads_match(hf, hf64)


def test_graph_replays_per_grid():
    """One capture per grid: other images of that grid replay it, each equal to HF."""
    hf = model()
    hf64 = copy.deepcopy(hf).double()
    opt = vitfast.optimize(hf)
    runner = opt.cuda_graphs = simulate_cuda_graphs(CUDAGraphRunner())
    with torch.no_grad():
        for _ in range(3):
            x, grid = packed()
            out, ref, eager = opt(x, grid), hf64(x.double(), grid), hf(x, grid)
            assert_close(out.pooler_output, ref.pooler_output, eager=eager.pooler_output, name="pooler_output")
    assert runner.captures == 1


def test_refuses_what_it_does_not_run():
    opt = vitfast.optimize(model())
    x, grid = packed()
    with pytest.raises(UnsupportedFeatureError, match="output_attentions=True"):
        opt(x, grid, output_attentions=True)
    with pytest.raises(UnsupportedFeatureError, match=r"unsupported arguments \['cu_seqlens'\]"):
        opt(x, grid, cu_seqlens=torch.tensor([0, 44], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"pixel_values: expected patches \[T, 48\] with T = 44 \(grid_thw's\), got "
                                         r"\(40, 48\)"):
        opt(x[:40], grid)
    with pytest.raises(ValueError, match=r"grid_thw: expected \[n, 3\]"):
        opt(x, torch.tensor([4, 11]))
    with pytest.raises(UnsupportedFeatureError, match="hidden_act='relu'"):
        vitfast.optimize(model(hidden_act="relu"))


@pytest.mark.gpu
def test_hunyuan_vl_tower_on_gpu():
    """HunYuan-VL's tower at its config (1152 wide, 16 heads of 72; 4 of its 27 blocks) over two images of 1024 x 768
    and 512 x 512 px packed (4,096 patches of 16), bf16 against HF in float32 on the GPU, within 2x HF's own bf16 error,
    eager and replayed."""
    from vitfast.testing import rel_err

    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = perturbed(hunyuan.HunYuanVLVisionTransformer(config_module.HunYuanVLVisionConfig(num_hidden_layers=4)))
    ref = copy.deepcopy(hf)
    hf16 = hf.to(torch.bfloat16)
    opt = vitfast.optimize(copy.deepcopy(hf16))
    grid = torch.tensor([[1, 64, 48], [1, 32, 32]], device="cuda")
    x = torch.randn(64 * 48 + 32 * 32, 3 * 16 * 16, device="cuda")
    with torch.no_grad():
        want = ref(x, grid).pooler_output
        bound = 2 * rel_err(hf16(x.bfloat16(), grid).pooler_output, want) + 1e-3
        for call in ("eager", "capture", "replay"):
            err = rel_err(opt(x.bfloat16(), grid).pooler_output, want)
            assert err <= bound, f"{call}: {err:.3e} > {bound:.3e}"
        assert opt.cuda_graphs.captures == 1
