"""Fine-tuning through vitfast: whole models' gradients come from vitfast's backward kernels and formulas
(FlashAttention-2 attention backward, the linear and patch-embed GEMM backward, the extension's LayerNorm
backward), never the reference math, and equal float64 autograd through the reference; torch.compile
traces forward and backward of the ops in one graph. Kernels run in Triton's interpreter on the CPU."""

import pytest
import torch

import vitfast
from vitfast import ops, reference
from vitfast.testing import assert_close, forbid_reference

# Every function of vitfast.reference that an op's old backward recomputed, or that such a recompute calls.
REFERENCE_MATH = ("attention", "attention_qkv", "attention_probs", "split_qkv", "linear", "activate", "gelu",
                  "quick_gelu", "layer_norm", "add_layer_norm", "patch_embed", "torch_patch_embed",
                  "normalize_images", "add_prefix_and_pos", "torch_attention", "torch_attention_qkv", "rope_qkv",
                  "apply_rope")



# DINOv2-like (registers, layer-scale, positions for the patches only), CLIP-like (pre-norm, QuickGELU),
# DINOv2-giant-like (the SwiGLUPacked MLP), DINOv3-like (RoPE, no position table) and a plain ViT.
MODELS = {
    "vit": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=6),
    "dinov2_reg": dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=4, reg_tokens=4,
                       init_values=0.5, no_embed_class=True),
    "clip": dict(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5, pre_norm=True,
                 act_layer="quick_gelu"),
    "dinov2_giant_swiglu": dict(img_size=28, patch_size=14, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                                init_values=0.5, mlp_ratio=2.66667 * 2, mlp_layer="swiglu"),
    "dinov3_rope": dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, reg_tokens=4,
                        init_values=0.5, pos_embed="none", rope="dinov3", qkv_bias=False, global_pool="avg",
                        fc_norm=False),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_gradients_without_the_reference(name, monkeypatch):
    kw = MODELS[name]
    torch.manual_seed(0)
    model = vitfast.VisionTransformer(**kw).train()
    with torch.no_grad():
        for p in model.parameters():                      # off the 0 / 1 inits: every gradient counts
            p.add_(torch.randn_like(p) * 0.05)
    ref64 = reference.VisionTransformer(**kw).double().train()
    ref64.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    w = torch.randn(2, kw["num_classes"])
    loss = (model(x.requires_grad_()) * w).sum()
    forbid_reference(monkeypatch, *REFERENCE_MATH)
    grads = torch.autograd.grad(loss, [x, *model.parameters()])
    monkeypatch.undo()
    x64 = x.detach().double().requires_grad_()
    want = torch.autograd.grad((ref64(x64) * w.double()).sum(), [x64, *ref64.parameters()])
    names = ["images", *(n for n, _ in model.named_parameters())]
    assert len(grads) == len(want) == len(names)
    for n, g, g64 in zip(names, grads, want):
        assert_close(g, g64, dtype=torch.float32, name=f"grad {n}")


def test_torch_compile_traces_forward_and_backward():
    """One fullgraph compile of LayerNorm -> qkv -> attention -> projection with GELU and residual: the
    custom ops and their backward ops trace (fake implementations), gradients equal eager."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32, requires_grad=True)
    params = [torch.ones(32), torch.zeros(32), torch.randn(96, 32) * 0.2, torch.randn(96), torch.randn(32, 32) * 0.2,
              torch.randn(32)]
    params = [p.requires_grad_() for p in params]

    def block(x, lw, lb, w1, b1, pw, pb):
        qkv = ops.linear(ops.layer_norm(x, lw, lb, 1e-6), w1, b1)
        return ops.linear(ops.attention_qkv(qkv, 2), pw, pb, residual=x, activation="gelu").square().mean()

    eager = torch.autograd.grad(block(x, *params), [x, *params])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, *params), [x, *params])
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)


def test_bench_train_linear_backward_rows():
    """benchmarks/bench_train.py's linear-backward section (a GPU table) on a small fc1 under the interpreter:
    the layer's backward by vitfast and torch, and the two dX / dZ paths, each timed, TFLOP/s from its ms."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("vitfast_bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.linear_backward(1, torch.float32, reps=1, K=32, N=48)
    assert [r["what"].split(" (")[0] for r in rows] == [
        "layer backward: vitfast", "layer backward: torch", "dX + dZ: fused Triton kernel",
        "dX + dZ: gelu_backward + cuBLAS"]
    gemm = 2 * 197 * 32 * 48
    for r, flops in zip(rows, (2 * gemm, 2 * gemm, gemm, gemm)):
        assert r["ms"] > 0 and r["tflops"] == pytest.approx(flops / r["ms"] / 1e9)
