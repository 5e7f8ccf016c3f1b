"""vitfast.ops.rms_norm (the vitfast._C extension: csrc/rms_norm_*) against float64 autograd through
vitfast.reference.rms_norm, and against that formula (Hugging Face's Qwen2RMSNorm) run in the same dtype, the
eager baseline whose error bounds ours.

On a CPU-only machine these run the C++ CPU kernels; with CUDA the `device` fixture sends the same cases
through the CUDA kernels (widths 1 and 7: a warp per row, single elements; 1280 and 3584: a block per row,
16-byte vectors). Kept small: `make test` runs on two cores.
"""

import pytest
import torch

from vitfast import ops, reference
from vitfast.testing import assert_close, forbid_reference, poisoned

EPS = 1e-6


def make_inputs(shape, dtype, wdtype, device, scale=1.0):
    """x with a non-zero mean (times `scale`); weight around 1."""
    x = ((torch.randn(shape, device=device) * 2 + 0.5) * scale).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device=device)).to(wdtype)
    return x, w


def eager_grads(x, w, dy):
    """y (rounded to x's dtype: a float32 weight makes HF's output float32) and the gradients of x and w, by
    autograd through HF's formula in x's dtype."""
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    y = reference.rms_norm(x, w, EPS)
    return (y.detach().to(x.dtype), *torch.autograd.grad(y, (x, w), dy.to(y.dtype)))


def check_forward_backward(x, w, monkeypatch):
    """Forward into a NaN-poisoned buffer (the .out overload) and through ops.rms_norm; backward through the
    extension's kernel from the saved rstd, never the reference math; all against float64 autograd through the
    reference, within 2x the eager formula's own error in this dtype."""
    dtype = x.dtype
    out = poisoned(x.shape, dtype, x.device)
    torch.ops.vitfast.rms_norm.out(x, w, EPS, out=out)

    leaves = [x.detach().requires_grad_(True), w.detach().requires_grad_(True)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
        y = ops.rms_norm(*leaves, EPS)
    assert (tuple(x.shape[:-1]), torch.float32) in saved                    # one fp32 rstd per row
    assert y.dtype == dtype and y.is_contiguous() and torch.equal(y, out)
    dy = torch.randn_like(y)
    forbid_reference(monkeypatch, "rms_norm")
    dx, dw = torch.autograd.grad(y, leaves, dy)
    monkeypatch.undo()

    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, w)]
    y64 = reference.rms_norm(*leaves64, EPS)
    dx64, dw64 = torch.autograd.grad(y64, leaves64, dy.double())
    eager_y, eager_dx, eager_dw = eager_grads(x, w, dy)
    assert dx.dtype == dtype and dw.dtype == w.dtype and dx.shape == x.shape
    assert_close(out, y64, dtype=dtype, eager=eager_y, name="y")
    assert_close(dx, dx64, dtype=dtype, eager=eager_dx, name="grad x")
    assert_close(dw, dw64, dtype=dtype, eager=eager_dw, name="grad weight")


# (shape, x dtype, weight dtype, transposed leading dims, scale of x). Width 1 with |x| ~ 1e-3 (x² ~ eps): there
# dx = g · eps / (x² + eps)^1.5, which for |x| >> sqrt(eps) is ~0 and lost to cancellation in any fp32 arithmetic.
CASES = [pytest.param((3, 1), torch.float32, torch.float32, False, 1e-3, id="1-fp32"),
         pytest.param((2, 3, 7), torch.float16, torch.float32, True, 1.0, id="7-fp16-fp32_weight-strided"),
         pytest.param((17, 1280), torch.bfloat16, torch.bfloat16, False, 1.0, id="1280-bf16"),
         pytest.param((4, 3584), torch.float32, torch.float32, False, 1.0, id="3584-fp32")]


@pytest.mark.parametrize("shape,dtype,wdtype,transposed,scale", CASES)
def test_rms_norm(shape, dtype, wdtype, transposed, scale, device, monkeypatch):
    x, w = make_inputs(shape, dtype, wdtype, device, scale)
    if transposed:                                                  # [2, 3, 7] with strides (7, 14, 1)
        x = make_inputs((shape[1], shape[0], shape[2]), dtype, wdtype, device, scale)[0].transpose(0, 1)
        assert not x.is_contiguous()
    check_forward_backward(x, w, monkeypatch)


def test_gradcheck_float64():
    x, w = make_inputs((3, 4, 10), torch.float64, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, EPS), (x.requires_grad_(), w.requires_grad_()))


def test_opcheck_and_saved_rstd():
    """The three ops under torch.library.opcheck (schemas, fake impls, autograd registration), the stats op's
    rstd against float64, and the C++ op's own checks of the backward's inputs."""
    x, w = make_inputs((3, 5, 24), torch.float32, torch.float32, "cpu")
    y, rstd = torch.ops.vitfast.rms_norm_stats.default(x, w, EPS)
    assert torch.equal(y, torch.ops.vitfast.rms_norm.default(x, w, EPS))
    torch.testing.assert_close(rstd.double(), (x.double().square().mean(-1) + EPS).rsqrt(), rtol=1e-6, atol=0)
    xt = x.transpose(0, 1).requires_grad_(True)                     # strided leading dims
    torch.library.opcheck(torch.ops.vitfast.rms_norm.default, (xt, w.requires_grad_(True), EPS))
    torch.library.opcheck(torch.ops.vitfast.rms_norm_stats.default, (xt, w, EPS))
    torch.library.opcheck(torch.ops.vitfast.rms_norm_backward.default, (torch.randn_like(x), x, rstd, w.detach()))
    with pytest.raises(RuntimeError, match=r"vitfast::rms_norm_backward: rstd: expected 15 Float values"):
        torch.ops.vitfast.rms_norm_backward.default(torch.randn_like(x), x, rstd[:2], w.detach())


def test_torch_compile_fullgraph():
    """The fake impls let dynamo and AOT autograd trace the op and its backward in one graph (aot_eager: the
    trace without inductor's code generation); values as eager."""
    x, w = make_inputs((2, 17, 64), torch.float32, torch.float32, "cpu")
    x, w = x.requires_grad_(True), w.requires_grad_(True)

    def block(x, w):
        return ops.rms_norm(ops.rms_norm(x, w, EPS) * 2, w, EPS)

    got = torch.compile(block, fullgraph=True, backend="aot_eager")(x, w)
    want = block(x, w)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    dy = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (x, w), dy), torch.autograd.grad(want, (x, w), dy)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


BAD_INPUT = {  # id: (call on x [4, 16], weight [16]; message)
    "weight_shape": (lambda x, w: ops.rms_norm(x, w[:15]), r"weight: expected shape \(16,\) .*got \(15,\)"),
    "weight_dtype": (lambda x, w: ops.rms_norm(x, w.half()),
                     r"weight: expected dtype torch.float32 \(like x\), got torch.float16"),
    "x_dtype": (lambda x, w: ops.rms_norm(x.int(), w), r"x: expected dtype in .*got torch.int32"),
    "x_0dim": (lambda x, w: ops.rms_norm(x[0, 0], w[:1]), r"x: expected at least 1 dim"),
    "eps": (lambda x, w: ops.rms_norm(x, w, -1.0), r"eps: expected a finite number >= 0, got -1.0"),
    "weight_device": (lambda x, w: ops.rms_norm(x, w.to("meta")), r"weight: expected device .* \(like x\), got meta"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input(case, device):
    call, msg = BAD_INPUT[case]
    with pytest.raises(ValueError, match=msg):
        call(*make_inputs((4, 16), torch.float32, torch.float32, device))


@pytest.mark.gpu
def test_cuda_kernels_gpu(monkeypatch):
    """ViT-sized rows (788 = 4 x 197: backward row chunks of uneven length) in bf16 / fp16 / fp32 with the weight in
    x's dtype and in fp32, at Qwen2.5-VL's widths; a row longer than 16384 (the wide kernel) and a misaligned x
    (the scalar path at width 1280)."""
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for wdtype in dict.fromkeys((dtype, torch.float32)):
            for cols in (1280, 3584):
                check_forward_backward(*make_inputs((788, cols), dtype, wdtype, "cuda"), monkeypatch)
    check_forward_backward(*make_inputs((3, 20000), torch.bfloat16, torch.float32, "cuda"), monkeypatch)
    x, w = make_inputs((33, 1280), torch.bfloat16, torch.bfloat16, "cuda")
    x = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")[1:].view(x.shape).copy_(x)
    assert x.data_ptr() % 16 != 0
    check_forward_backward(x, w, monkeypatch)
