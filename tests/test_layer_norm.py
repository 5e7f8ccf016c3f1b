"""vitfast.ops.layer_norm / add_layer_norm (the vitfast._C extension: csrc/) against the float64
reference and eager F.layer_norm in the same dtype.

On a CPU-only machine these run the C++ CPU kernel; with CUDA the `device` fixture sends the same
tables through the CUDA kernels, whose launcher picks a path by row length: warp per row (C <= 1024),
block per row (C <= 16384), or the wide kernel (re-reads the row), each with 16-byte vectors when
aligned and C a multiple of the vector width, else scalar. The shapes below cover every path.
"""

import pytest
import torch
import torch.nn.functional as F

from vitfast import ops, reference
from vitfast.testing import assert_close, forbid_reference, poisoned

EPS = 1e-6
HAS_CUDA = torch.cuda.is_available()

# Every hidden size of the issue (1, 7, 192, 768, 1023, 1280, 8193) and row count (0, 1, 3, 197,
# 4099), paired so each appears; 3-D shapes are the [B, T, C] token layout.
SHAPES = [(0, 768), (1, 1), (3, 7), (197, 192), (4099, 768), (197, 1023), (1, 197, 1280), (2, 3, 8193)]
# Boundaries of the CUDA launcher's paths (warp/block at 1024, block/wide at 16384), vector and scalar.
PATH_SHAPES = [(5, 1024), (5, 1025), (3, 1032), (2, 16384), (2, 16385), (2, 20000)]
# (x dtype, weight/bias dtype): same dtype, or fp32 parameters with 16-bit activations.
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
          (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _id(v):
    return str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None


def make_inputs(shape, dtype, wdtype, device, residual=False):
    """x with a non-zero mean and scale (so both statistics matter); weight around 1, bias around 0."""
    C = shape[-1]
    x = (torch.randn(shape, device=device) * 2 + 0.5).to(dtype)
    w = (1 + 0.5 * torch.randn(C, device=device)).to(wdtype)
    b = (0.5 * torch.randn(C, device=device)).to(wdtype)
    if not residual:
        return x, w, b
    r = torch.randn(shape, device=device).to(dtype)
    return x, r, w, b


def ref_layer_norm(x, w, b):
    return reference.layer_norm(x.double(), w.double(), b.double(), EPS)


def eager_layer_norm(x, w, b):
    """F.layer_norm with the output in x's dtype. Parameters of another dtype (fp32 with 16-bit x,
    float64 x with fp32): computed in the wider dtype, then rounded to x's, which is what eager
    code must do, since CUDA's F.layer_norm rejects parameters of a dtype other than x's."""
    acc = torch.promote_types(x.dtype, w.dtype)
    return F.layer_norm(x.to(acc), (x.shape[-1],), w.to(acc), b.to(acc), EPS).to(x.dtype)


def check_layer_norm(y, x, w, b, dtype):
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert_close(y, ref_layer_norm(x, w, b), dtype=dtype, eager=eager_layer_norm(x, w, b), name="y")


def check_add_layer_norm(y, s, x, r, w, b, dtype):
    assert y.shape == s.shape == x.shape and y.dtype == s.dtype == x.dtype
    s_eager = x + r
    s64 = x.double() + r.double()
    assert_close(s, s64, dtype=dtype, eager=s_eager, name="s")
    assert_close(y, ref_layer_norm(s64, w, b), dtype=dtype, eager=eager_layer_norm(s_eager, w, b), name="y")


# --------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=_id)
def test_layer_norm(shape, dtype, wdtype, device):
    x, w, b = make_inputs(shape, dtype, wdtype, device)
    check_layer_norm(ops.layer_norm(x, w, b, EPS), x, w, b, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=_id)
def test_add_layer_norm(shape, dtype, wdtype, device):
    x, r, w, b = make_inputs(shape, dtype, wdtype, device, residual=True)
    y, s = ops.add_layer_norm(x, r, w, b, EPS)
    check_add_layer_norm(y, s, x, r, w, b, dtype)


@pytest.mark.parametrize("shape", PATH_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_kernel_path_boundaries(shape, dtype, device):
    x, r, w, b = make_inputs(shape, dtype, torch.float32, device, residual=True)
    check_layer_norm(ops.layer_norm(x, w, b, EPS), x, w, b, dtype)
    y, s = ops.add_layer_norm(x, r, w, b, EPS)
    check_add_layer_norm(y, s, x, r, w, b, dtype)


@pytest.mark.parametrize("wdtype", [torch.float64, torch.float32], ids=_id)
@pytest.mark.parametrize("shape", [(1, 1), (197, 192), (3, 8193)], ids=str)
def test_float64_cpu(shape, wdtype):
    """float64 is CPU-only; it accumulates in double, so it matches the reference to ~1e-12."""
    x, r, w, b = make_inputs(shape, torch.float64, wdtype, "cpu", residual=True)
    check_layer_norm(ops.layer_norm(x, w, b, EPS), x, w, b, torch.float64)
    y, s = ops.add_layer_norm(x, r, w, b, EPS)
    check_add_layer_norm(y, s, x, r, w, b, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_id)
@pytest.mark.parametrize("shape", [(197, 768), (3, 8193)], ids=str)
def test_large_mean_small_variance(shape, dtype, device):
    """Rows far from zero: E[x²] - E[x]² in fp32 would lose the variance (~4 next to ~1e6), and even
    the mean rounded to fp32 is off by ~3e-5 (eager's fp32 error here is ~1.6e-5). The corrected
    two-pass statistics keep fp32 results at ~1e-7."""
    x, w, b = make_inputs(shape, torch.float32, torch.float32, device)
    x = (x + 1000.0).to(dtype)
    y = ops.layer_norm(x, w, b, EPS)
    check_layer_norm(y, x, w, b, dtype)
    if dtype == torch.float32:
        assert_close(y, ref_layer_norm(x, w, b), tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_non_contiguous_inputs(dtype, device):
    """Transposed [T, B, C] activations, a strided last dim, a strided weight: copied to contiguous
    inside the op; outputs are contiguous."""
    base = torch.randn(197, 2, 2 * 192, device=device).to(dtype)
    x = base.transpose(0, 1)[..., ::2]                          # [2, 197, 192], strides (384, 768, 2)
    r = torch.randn(2, 192, 197, device=device).to(dtype).transpose(1, 2)  # [2, 197, 192]
    w = torch.randn(2 * 192, device=device)[::2]
    b = torch.randn(192, device=device)
    assert not x.is_contiguous() and not r.is_contiguous() and not w.is_contiguous()
    y = ops.layer_norm(x, w, b, EPS)
    assert y.is_contiguous()
    check_layer_norm(y, x, w, b, dtype)
    y, s = ops.add_layer_norm(x, r, w, b, EPS)
    assert y.is_contiguous() and s.is_contiguous()
    check_add_layer_norm(y, s, x, r, w, b, dtype)


@pytest.mark.parametrize("dtype,wdtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(3, 7), (197, 768), (2, 8193)], ids=str)
def test_poisoned_outputs(shape, dtype, wdtype, device):
    """The functional ops allocate their outputs, so NaN-poisoning goes through the .out overloads,
    which run the same C++ code writing into caller buffers: any element the kernel skips stays NaN."""
    x, r, w, b = make_inputs(shape, dtype, wdtype, device, residual=True)
    out = poisoned(shape, dtype, device)
    got = torch.ops.vitfast.layer_norm.out(x, w, b, EPS, out=out)
    assert got.data_ptr() == out.data_ptr()
    check_layer_norm(out, x, w, b, dtype)

    out, sum_out = poisoned(shape, dtype, device), poisoned(shape, dtype, device)
    torch.ops.vitfast.add_layer_norm.out(x, r, w, b, EPS, out=out, sum_out=sum_out)
    check_add_layer_norm(out, sum_out, x, r, w, b, dtype)


def test_cpu_rows_split_across_threads():
    """conftest pins one thread; with two, at::parallel_for splits the rows. Rows are independent,
    so the results are bitwise the same."""
    x, r, w, b = make_inputs((4099, 192), torch.float32, torch.float32, "cpu", residual=True)
    one = ops.add_layer_norm(x, r, w, b, EPS)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = ops.add_layer_norm(x, r, w, b, EPS)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(two, one):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    check_add_layer_norm(*two, x, r, w, b, torch.float32)


# --------------------------------------------------------------------------------------------
# torch integration: opcheck, autograd, torch.compile
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_opcheck(requires_grad, transposed, device):
    x, r, w, b = make_inputs((2, 5, 24), torch.float32, torch.float32, device, residual=True)
    if transposed:
        x, r = x.transpose(0, 1), r.transpose(0, 1)
    for t in (x, r, w, b):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(torch.ops.vitfast.layer_norm.default, (x, w, b, EPS))
    torch.library.opcheck(torch.ops.vitfast.add_layer_norm.default, (x, r, w, b, EPS))


def test_gradients_float64():
    x, r, w, b = make_inputs((3, 4, 10), torch.float64, torch.float64, "cpu", residual=True)
    for t in (x, r, w, b):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b, EPS), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, r, w, b: ops.add_layer_norm(x, r, w, b, EPS), (x, r, w, b))


def test_gradients_match_reference(device):
    """Backward (the extension's kernel from the saved row statistics) of a bf16 forward with fp32
    parameters."""
    x, r, w, b = make_inputs((17, 192), torch.bfloat16, torch.float32, device, residual=True)
    gy, gs = torch.randn_like(x), torch.randn_like(x)
    leaves = [t.detach().requires_grad_(True) for t in (x, r, w, b)]
    y, s = ops.add_layer_norm(*leaves, EPS)
    got = torch.autograd.grad((y, s), leaves, (gy, gs))
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, r, w, b)]
    y64, s64 = reference.add_layer_norm(*leaves64, EPS)
    want = torch.autograd.grad((y64, s64), leaves64, (gy.double(), gs.double()))
    for name, leaf, g, g64 in zip(("x", "residual", "weight", "bias"), leaves, got, want):
        assert g.dtype == leaf.dtype
        assert_close(g, g64, dtype=torch.bfloat16, name=f"grad {name}")



# Rows that do not split evenly into the backward's row chunks, a hidden size that is not a multiple
# of anything, the CUDA paths' boundaries (warp per row, block per row, wide rows).
BWD_SHAPES = [(1, 7), (33, 192), (5, 197, 37), (4099, 768), (3, 1025), (2, 16385)]


@pytest.mark.parametrize("fused", [False, True], ids=["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                          (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)], ids=_id)
@pytest.mark.parametrize("shape", BWD_SHAPES)
def test_backward_kernel(shape, dtype, wdtype, fused, device, monkeypatch):
    """dx, dweight, dbias (and the sum output's gradient through x and residual) from the kernels, never
    the reference math, against float64 autograd through the reference, bounded by eager PyTorch's own
    error in the same dtype; the forward saved one mean and one rstd per row."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 LayerNorm is CPU-only")
    x, r, w, b = make_inputs(shape, dtype, wdtype, device, residual=True)
    leaves = [t.detach().requires_grad_(True) for t in ((x, r, w, b) if fused else (x, w, b))]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = ops.add_layer_norm(*leaves, EPS) if fused else (ops.layer_norm(*leaves, EPS),)
    assert shape[:-1] in saved                                        # mean / rstd, one per row
    grads_out = [torch.randn_like(o) for o in out]
    forbid_reference(monkeypatch, "layer_norm", "add_layer_norm")
    got = torch.autograd.grad(out, leaves, grads_out)
    monkeypatch.undo()
    ref_fn = reference.add_layer_norm if fused else reference.layer_norm
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    out64 = ref_fn(*leaves64, EPS)
    out64 = out64 if fused else (out64,)
    want = torch.autograd.grad(out64, leaves64, [g.double() for g in grads_out])
    eager_leaves = [t.detach().requires_grad_(True) for t in leaves]        # eager PyTorch in this dtype
    if fused:
        ex, er, ew, eb = eager_leaves
        es = ex + er
        eager_out = (F.layer_norm(es, shape[-1:], ew.to(dtype), eb.to(dtype), EPS), es)
    else:
        ex, ew, eb = eager_leaves
        eager_out = (F.layer_norm(ex, shape[-1:], ew.to(dtype), eb.to(dtype), EPS),)
    eager = torch.autograd.grad(eager_out, eager_leaves, grads_out)
    names = ("x", "residual", "weight", "bias") if fused else ("x", "weight", "bias")
    for name, leaf, g, g64, e in zip(names, leaves, got, want, eager):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert_close(g, g64, dtype=dtype, eager=e, name=f"grad {name}")


def test_raw_ops_autograd_recompute_the_statistics(monkeypatch):
    """torch.ops.vitfast.layer_norm / add_layer_norm called directly under autograd: the backward
    recomputes the row statistics (one stats forward) and runs the same kernel, not the reference."""
    x, r, w, b = make_inputs((9, 40), torch.float32, torch.float32, "cpu", residual=True)
    leaves = [t.detach().requires_grad_(True) for t in (x, r, w, b)]
    y = torch.ops.vitfast.layer_norm.default(leaves[0], leaves[2], leaves[3], EPS)
    y2, s2 = torch.ops.vitfast.add_layer_norm.default(*leaves, EPS)
    g = torch.randn_like(y)
    forbid_reference(monkeypatch, "layer_norm", "add_layer_norm")
    got = torch.autograd.grad((y * g).sum() + (y2 * g).sum() + (s2 * g).sum(), leaves)
    monkeypatch.undo()
    l64 = [t.detach().double().requires_grad_(True) for t in leaves]
    y64 = reference.layer_norm(l64[0], l64[2], l64[3], EPS)
    y264, s264 = reference.add_layer_norm(*l64, EPS)
    want = torch.autograd.grad((y64 * g.double()).sum() + (y264 * g.double()).sum() + (s264 * g.double()).sum(), l64)
    for name, a, e in zip(("x", "residual", "weight", "bias"), got, want):
        assert_close(a, e, dtype=torch.float32, name=f"grad {name}")


def test_stats_ops_and_backward_opcheck():
    x, r, w, b = make_inputs((3, 5, 24), torch.float32, torch.float32, "cpu", residual=True)
    y, mean, rstd = torch.ops.vitfast.layer_norm_stats.default(x, w, b, EPS)
    assert torch.equal(y, torch.ops.vitfast.layer_norm.default(x, w, b, EPS))
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(-1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rstd.double(), (x64.var(-1, unbiased=False) + EPS).rsqrt(), rtol=1e-5, atol=1e-6)
    for t in (x, r, w, b):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.vitfast.layer_norm_stats.default, (x, w, b, EPS))
    torch.library.opcheck(torch.ops.vitfast.add_layer_norm_stats.default, (x, r, w, b, EPS))
    torch.library.opcheck(torch.ops.vitfast.layer_norm_backward.default,
                          (torch.randn_like(x), x.detach(), mean, rstd, w.detach()))
    with pytest.raises(RuntimeError, match=r"layer_norm_backward: mean: expected 15 Float values"):
        torch.ops.vitfast.layer_norm_backward.default(torch.randn_like(x), x.detach(), mean[:2], rstd, w.detach())


def test_torch_compile_fullgraph_cpu():
    """Fake impls let dynamo/inductor trace both ops without graph breaks; results match eager."""
    x, r, w, b = make_inputs((2, 17, 64), torch.float32, torch.float32, "cpu", residual=True)

    def block(x, r, w, b):
        y, s = ops.add_layer_norm(x, r, w, b, EPS)
        return ops.layer_norm(s, w, b, EPS), y

    compiled = torch.compile(block, fullgraph=True)
    for got, want in zip(compiled(x, r, w, b), block(x, r, w, b)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
BAD_INPUT = {  # id: (call on x [4, 16], residual, weight [16], bias [16]; message regex)
    "weight_size": (lambda x, r, w, b: ops.layer_norm(x, w[:15], b), r"weight: expected shape \(16,\) .*got \(15,\)"),
    "bias_size": (lambda x, r, w, b: ops.layer_norm(x, w, b[:15]), r"bias: expected shape \(16,\) .*got \(15,\)"),
    "weight_2d": (lambda x, r, w, b: ops.layer_norm(x, w.view(4, 4), b),
                  r"weight: expected shape \(16,\) .*got \(4, 4\)"),
    "int_x": (lambda x, r, w, b: ops.layer_norm(x.int(), w, b), r"x: expected dtype in .*got torch.int32"),
    "int_weight": (lambda x, r, w, b: ops.layer_norm(x, w.long(), b), r"weight: expected dtype in .*got torch.int64"),
    "half_weight": (lambda x, r, w, b: ops.layer_norm(x, w.half(), b.half()),
                    r"weight: expected dtype torch.float32 \(like x\), got torch.float16"),
    "bias_dtype": (lambda x, r, w, b: ops.layer_norm(x, w, b.double()),
                   r"bias: expected dtype torch.float32 \(like weight\), got torch.float64"),
    "0dim_x": (lambda x, r, w, b: ops.layer_norm(x[0, 0], w[:1], b[:1]), r"x: expected at least 1 dim"),
    "negative_eps": (lambda x, r, w, b: ops.layer_norm(x, w, b, -1.0), r"eps: expected a finite number >= 0, got -1.0"),
    "nan_eps": (lambda x, r, w, b: ops.layer_norm(x, w, b, float("nan")), r"eps: expected a finite number >= 0"),
    "weight_device": (lambda x, r, w, b: ops.layer_norm(x, w.to("meta"), b),
                      r"weight: expected device .* \(like x\), got meta"),
    "residual_shape": (lambda x, r, w, b: ops.add_layer_norm(x, r[:3], w, b),
                       r"residual: expected shape \(4, 16\) .*got \(3, 16\)"),
    "residual_dtype": (lambda x, r, w, b: ops.add_layer_norm(x, r.half(), w, b),
                       r"residual: expected dtype torch.float32 \(like x\), got torch.float16"),
    "residual_device": (lambda x, r, w, b: ops.add_layer_norm(x, r.to("meta"), w, b),
                        r"residual: expected device .*got meta"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_public(case, device):
    call, msg = BAD_INPUT[case]
    with pytest.raises(ValueError, match=msg):
        call(*make_inputs((4, 16), torch.float32, torch.float32, device, residual=True))


def test_bad_input_cpp_checks(device):
    """The C++ op's own TORCH_CHECKs (for callers of torch.ops.vitfast.* directly)."""
    x, r, w, b = make_inputs((4, 16), torch.float32, torch.float32, device, residual=True)
    op, add_op = torch.ops.vitfast.layer_norm, torch.ops.vitfast.add_layer_norm
    cases = [
        (lambda: op(x, w[:15], b, EPS), r"vitfast::layer_norm: weight: expected shape \[16\] .*got \[15\]"),
        (lambda: op(x.int(), w, b, EPS), r"x: expected dtype Float, Half, BFloat16 .*got Int"),
        (lambda: op(x, w.half(), b.half(), EPS), r"weight: expected dtype Float \(like x\), got Half"),
        (lambda: op(x.half(), w.double(), b.double(), EPS), r"weight: expected dtype Half \(like x\) or Float, got"),
        (lambda: op(x, w, b.double(), EPS), r"bias: expected dtype Float \(like weight\), got Double"),
        (lambda: op(x, w, b, -1.0), r"eps: expected a finite value >= 0"),
        (lambda: add_op(x, r[:3], w, b, EPS), r"residual: expected shape \[4, 16\] .*got \[3, 16\]"),
        (lambda: torch.ops.vitfast.layer_norm.out(x, w, b, EPS, out=torch.empty(4, 15, device=device)),
         r"out: expected shape \[4, 16\] .*got \[4, 15\]"),
        (lambda: torch.ops.vitfast.layer_norm.out(x, w, b, EPS, out=torch.empty(16, 4, device=device).t()),
         r"out: expected a contiguous tensor"),
        (lambda: torch.ops.vitfast.layer_norm.out(x, w, b, EPS, out=x), r"unsupported operation"),
        (lambda: torch.ops.vitfast.layer_norm.out(x[0], w, b, EPS, out=w), r"unsupported operation"),
        (lambda: add_op.out(x[0], r[0], w, b, EPS, out=torch.empty_like(w), sum_out=b), r"unsupported operation"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            call()


@pytest.mark.gpu
def test_mixed_devices_gpu():
    x, w, b = make_inputs((4, 16), torch.float32, torch.float32, "cuda")
    with pytest.raises(ValueError, match=r"weight: expected device cuda:0 \(like x\), got cpu"):
        ops.layer_norm(x, w.cpu(), b)
    with pytest.raises(ValueError, match=r"x: expected dtype .* on CUDA, got torch.float64"):
        ops.layer_norm(x.double(), w.double(), b.double())
    with pytest.raises(RuntimeError, match=r"weight: expected device cuda:0 \(like x\), got cpu"):
        torch.ops.vitfast.layer_norm(x, w.cpu(), b, EPS)


def test_missing_extension_message(monkeypatch):
    monkeypatch.setattr(ops, "_C_ERROR", ImportError("No module named 'vitfast._C'"))
    x, w, b = make_inputs((2, 8), torch.float32, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \."):
        ops.layer_norm(x, w, b)


# --------------------------------------------------------------------------------------------
# GPU only: ViT-B shapes, unaligned pointers, streams and CUDA graphs
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256 * 197, 768), (64 * 785, 768)], ids=str)
@pytest.mark.parametrize("dtype,wdtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float32)], ids=_id)
def test_vit_shapes_gpu(shape, dtype, wdtype):
    x, r, w, b = make_inputs(shape, dtype, wdtype, "cuda", residual=True)
    out = poisoned(shape, dtype, "cuda")
    torch.ops.vitfast.layer_norm.out(x, w, b, EPS, out=out)
    check_layer_norm(out, x, w, b, dtype)
    y, s = ops.add_layer_norm(x, r, w, b, EPS)
    check_add_layer_norm(y, s, x, r, w, b, dtype)


def _misaligned(t):
    """A copy of t starting one element (2 or 4 bytes) past a 16-byte boundary: contiguous, so the op
    does not copy it again, but not 16-byte aligned."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.gpu
@pytest.mark.parametrize("misaligned", ["none", "x", "residual", "weight", "bias", "out", "sum_out"])
@pytest.mark.parametrize("cols", [196, 768, 1280, 8192], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_id)
def test_unaligned_pointers_gpu(dtype, cols, misaligned):
    """16-byte vectors need every pointer 16-byte aligned and rows a whole number of vectors. One
    tensor at a time is misaligned (see _misaligned), which must take the scalar path instead of
    misaligned vector accesses; cols 196 in bf16: aligned pointers but rows of 392 bytes."""
    rows = 33
    x, r, w, b = make_inputs((rows, cols), dtype, torch.float32, "cuda", residual=True)
    tensors = {"x": x, "residual": r, "weight": w, "bias": b,
               "out": poisoned(x.shape, dtype, "cuda"), "sum_out": poisoned(x.shape, dtype, "cuda")}
    if misaligned != "none":
        tensors[misaligned] = _misaligned(tensors[misaligned])
    x, r, w, b, out, sum_out = tensors.values()
    torch.ops.vitfast.layer_norm.out(x, w, b, EPS, out=out)
    check_layer_norm(out, x, w, b, dtype)
    out.fill_(float("nan"))
    torch.ops.vitfast.add_layer_norm.out(x, r, w, b, EPS, out=out, sum_out=sum_out)
    check_add_layer_norm(out, sum_out, x, r, w, b, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4 * 65535 + 5, 64), (65535 + 7, 1032)], ids=str)
def test_more_than_65535_blocks_gpu(shape):
    """Grids beyond gridDim.y/z's 65535 limit on gridDim.x: warp per row (4 rows per block) and
    block per row; every row written (poisoned outputs)."""
    x, r, w, b = make_inputs(shape, torch.bfloat16, torch.float32, "cuda", residual=True)
    out, sum_out = poisoned(shape, torch.bfloat16, "cuda"), poisoned(shape, torch.bfloat16, "cuda")
    torch.ops.vitfast.add_layer_norm.out(x, r, w, b, EPS, out=out, sum_out=sum_out)
    check_add_layer_norm(out, sum_out, x, r, w, b, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (tensors off the current one)")
def test_tensors_on_second_device_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the op's device guard launches on cuda:1."""
    x, r, w, b = make_inputs((197, 768), torch.bfloat16, torch.bfloat16, "cuda:1", residual=True)
    with torch.cuda.device(0):
        y, s = ops.add_layer_norm(x, r, w, b, EPS)
    assert y.device == s.device == x.device
    check_add_layer_norm(y, s, x, r, w, b, torch.bfloat16)


@pytest.mark.gpu
def test_side_stream_and_cuda_graph_gpu():
    """The kernels launch on the current stream without host syncs, so they run on a side stream
    and can be captured in a CUDA graph (a launch on another stream would fail the capture) and
    replayed on new data."""
    x, r, w, b = make_inputs((197, 768), torch.bfloat16, torch.float32, "cuda", residual=True)

    def block():
        y, s = ops.add_layer_norm(x, r, w, b, EPS)
        return y, s, ops.layer_norm(s, w, b, EPS)

    def check(y, s, z):
        check_add_layer_norm(y, s, x, r, w, b, torch.bfloat16)
        check_layer_norm(z, s, w, b, torch.bfloat16)

    # Side stream, which is also the warm-up torch.cuda.graph asks for before a capture.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            outs = block()
    torch.cuda.current_stream().wait_stream(stream)
    check(*outs)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = block()
    for scale in (3.0, 0.5):
        x.copy_(torch.randn_like(x) * scale - 1)
        r.copy_(torch.randn_like(r) * scale)
        graph.replay()
        torch.cuda.synchronize()
        check(*outs)
