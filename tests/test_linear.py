"""Fused linear (kernels/linear.py, vitfast.ops.linear / mlp) vs the float64 reference and eager
PyTorch in the same dtype. On CPU the kernels run in Triton's interpreter (fp32, fp16), all three
variants (tiled, persistent, TMA descriptors: the interpreter emulates them); bf16, tf32, large M,
the cuBLAS/Triton dispatch and CUDA-graph capture run on a GPU."""

import math
import time

import pytest
import torch

from vitfast import ops, reference
from vitfast.kernels import linear as linear_kernels
from vitfast.testing import MODEL_TOLERANCE, FakeCudaTensor, assert_close, forbid_reference, matmul_tf32, poisoned

gpu = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu)]

# (M, K, N, activation, bias, residual, layout of x). Every (M, (K, N)) pair of the issue appears
# once; each activation, bias on/off, residual on/off and each layout appears several times.
#   layout "2d": [M, K]; "3d": [B, T, K]; "sliced": [B, T, K] cut from a wider buffer (rows evenly
#   strided: read in place) with a sliced weight too; "transposed": [B, T, K] from a [T, B, K]
#   buffer (reshaped with a copy); "colmajor": [M, K] with stride 1 along M (stride_xk != 1);
#   "padded": [B, T, K] rows of a [B, T, K rounded up to 8] buffer, weight likewise (what TMA needs
#   for K = 100 in fp16: 16-byte aligned row strides).
CASES = [
    (1, 64, 192, None, False, False, "2d"),
    (17, 96, 384, "gelu", True, False, "3d"),
    (197, 192, 768, "gelu_tanh", True, True, "sliced"),
    (394, 100, 37, "gelu", True, True, "transposed"),
    (197, 64, 192, None, True, True, "3d"),              # proj: bias + residual
    (17, 100, 37, "gelu_tanh", False, True, "colmajor"),
    (394, 192, 768, "gelu", True, False, "2d"),          # fc1: bias + GELU
    (1, 96, 384, None, True, True, "sliced"),
    (394, 96, 384, None, True, True, "transposed"),      # fc2: bias + residual
    (1, 100, 37, "gelu", True, False, "3d"),
    (17, 192, 768, None, False, False, "colmajor"),
    (197, 96, 384, "gelu_tanh", False, False, "2d"),
    (17, 64, 192, "gelu", True, True, "sliced"),
    (394, 64, 192, "gelu_tanh", False, True, "3d"),
    (1, 192, 768, "gelu_tanh", True, True, "transposed"),
    (197, 100, 37, None, True, False, "colmajor"),
]


def make_inputs(M, K, N, bias, residual, layout, dtype, device):
    """x in `layout`, weight [N, K] (≈ unit-variance outputs), bias [N], residual x.shape[:-1] + (N,).
    Buffers are cast to dtype / device before the layout's view is taken (a cast of a strided view
    would return a contiguous copy)."""
    B = 2 if M % 2 == 0 else 1
    T = M // B
    Kp = -(-K // 8) * 8                                        # K rounded up to 8 ("padded")
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    if layout == "2d":
        x = cast(torch.randn(M, K))
    elif layout == "3d":
        x = cast(torch.randn(B, T, K))
    elif layout == "sliced":
        x = cast(torch.randn(B, T, K + 24))[..., 3:K + 3]      # (B, T, K), row stride K + 24
    elif layout == "padded":
        x = cast(torch.randn(B, T, Kp))[..., :K]               # (B, T, K), row stride Kp
    elif layout == "transposed":
        x = cast(torch.randn(T, B, K)).transpose(0, 1)         # (B, T, K), not flattenable in place
    else:
        x = cast(torch.randn(K, M)).t()                        # (M, K), column-major
    scale = 1 / math.sqrt(max(K, 1))
    if layout == "sliced":
        w = cast(torch.randn(N, K + 8) * scale)[:, 8:]         # (N, K), base 8 elements in
    elif layout == "padded":
        w = cast(torch.randn(N, Kp) * scale)[:, :K]            # (N, K), row stride Kp
    else:
        w = cast(torch.randn(N, K) * scale)
    b = cast(torch.randn(N) * 0.5) if bias else None
    r = cast(torch.randn(*x.shape[:-1], N)) if residual else None
    return x, w, b, r


def reference64(x, w, b, activation, r):
    d = lambda t: None if t is None else t.detach().to("cpu", torch.float64)
    return reference.linear(d(x), d(w), d(b), activation, d(r))


# Cases the "tma" variant can read (unit stride along K, 16-byte aligned rows): every M, K (100 via
# "padded"), N and epilogue of CASES; the M / N / K tails come from the descriptors' zero fill.
TMA_CASES = [
    (1, 64, 192, None, False, False, "2d"),
    (17, 100, 37, "gelu_tanh", False, True, "padded"),
    (197, 192, 768, "gelu_tanh", True, True, "3d"),
    (394, 100, 37, "gelu", True, True, "padded"),
    (394, 96, 384, None, True, True, "transposed"),      # fc2: bias + residual (x copied by reshape)
    (197, 64, 192, "gelu", True, False, "2d"),           # fc1: bias + GELU
]


def check_kernel(M, K, N, activation, bias, residual, layout, dtype, device, variant):
    x, w, b, r = make_inputs(M, K, N, bias, residual, layout, dtype, device)
    out = poisoned((*x.shape[:-1], N), dtype, device)
    y = linear_kernels.linear(x, w, b, activation=activation, residual=r, out=out, variant=variant)
    assert y.data_ptr() == out.data_ptr()
    eager = reference.linear(x, w, b, activation, r)
    assert_close(y, reference64(x, w, b, activation, r), dtype=dtype, eager=eager)


@pytest.mark.parametrize("variant", ["tiled", "persistent"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,activation,bias,residual,layout", CASES)
def test_linear_kernel(M, K, N, activation, bias, residual, layout, dtype, device, variant):
    check_kernel(M, K, N, activation, bias, residual, layout, dtype, device, variant)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,activation,bias,residual,layout", TMA_CASES)
def test_linear_kernel_tma(M, K, N, activation, bias, residual, layout, dtype, device):
    """The persistent kernel with TMA descriptor loads (Triton's interpreter emulates them on the CPU;
    on a GPU these run only with compute capability >= 9)."""
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    check_kernel(M, K, N, activation, bias, residual, layout, dtype, device, "tma")


def test_tma_eligible():
    """TMA reads x [M, K] and W [N, K] with a unit stride along K from 16-byte aligned bases and row
    strides, on compute capability >= 9 (None: the interpreter)."""
    eligible = lambda layout, K=64, dtype=torch.float16, cap=(9, 0): linear_kernels.tma_eligible(
        *make_inputs(17 if layout != "transposed" else 18, K, 48, False, False, layout, dtype, "cpu")[:2], cap)
    assert eligible("2d") and eligible("3d") and eligible("2d", cap=None) and eligible("padded", K=100)
    assert eligible("transposed")                          # copied by the launcher's reshape: contiguous
    assert not eligible("2d", cap=(8, 0))                  # Ampere: no TMA
    assert not eligible("colmajor")                        # stride 1 along M, not K
    assert not eligible("sliced")                          # base 3 elements (6 bytes) into the buffer
    assert not eligible("3d", K=100)                       # row stride 200 bytes
    assert eligible("3d", K=100, dtype=torch.float32)      # row stride 400 bytes
    assert not eligible("transposed", K=100)               # the copy's rows: 200 bytes
    assert not eligible("2d", K=0)


def test_launcher_variant_errors():
    x, w, b, _ = make_inputs(17, 100, 37, True, False, "3d", torch.float16, "cpu")
    with pytest.raises(ValueError, match=r"variant: 'tma' needs .*16-byte aligned.*strides \(100, 1\)"):
        linear_kernels.linear(x, w, b, variant="tma")
    with pytest.raises(ValueError, match=r"variant: expected one of \['tiled', 'persistent', 'tma'\], got 'fast'"):
        linear_kernels.linear(x, w, b, variant="fast")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,activation,bias,residual,layout", [CASES[1], CASES[3], CASES[4]])
def test_ops_linear(M, K, N, activation, bias, residual, layout, dtype, device):
    x, w, b, r = make_inputs(M, K, N, bias, residual, layout, dtype, device)
    y = ops.linear(x, w, b, activation=activation, residual=r)
    assert y.shape == (*x.shape[:-1], N) and y.dtype == dtype and y.is_contiguous()
    assert_close(y, reference64(x, w, b, activation, r), dtype=dtype, eager=reference.linear(x, w, b, activation, r))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_mlp(activation, dtype, device):
    C, H = 96, 384
    x, w1, b1, _ = make_inputs(197, C, H, True, False, "3d", dtype, device)
    _, w2, b2, _ = make_inputs(1, H, C, True, False, "2d", dtype, device)
    r = torch.randn_like(x)
    y = ops.mlp(x, w1, b1, w2, b2, activation=activation, residual=r)
    d = lambda t: t.to("cpu", torch.float64)
    ref = reference.linear(reference.linear(d(x), d(w1), d(b1), activation), d(w2), d(b2), None, d(r))
    eager = reference.linear(reference.linear(x, w1, b1, activation), w2, b2, None, r)
    assert_close(y, ref, dtype=dtype, eager=eager)


@pytest.mark.parametrize("variant", ["tiled", "persistent"])
def test_empty_k_is_bias_activation_residual(variant, device):
    """K = 0: the GEMM is all zeros, the epilogue still runs: gelu(b) + r."""
    x, w, b, r = make_inputs(5, 0, 12, True, True, "2d", torch.float32, device)
    y = linear_kernels.linear(x, w, b, activation="gelu", residual=r, out=poisoned((5, 12), torch.float32, device),
                              variant=variant)
    assert_close(y, reference64(x, w, b, "gelu", r), dtype=torch.float32)


def test_cublas_fallback_epilogue_matches_reference():
    """The dispatch's non-Triton path (F.linear + reference epilogue), run on the CPU here."""
    for activation, res in ((None, True), ("gelu", False), ("gelu_tanh", True)):
        x, w, b, r = make_inputs(17, 64, 48, True, res, "3d", torch.float32, "cpu")
        y = ops._linear_cublas(x, w, b, activation, r)
        assert_close(y, reference64(x, w, b, activation, r), dtype=torch.float32)
    # Training's form: the GEMM also writes the pre-activation into a buffer; y is a separate tensor.
    for activation, bias in ((None, True), ("quick_gelu", False)):
        x, w, b, r = make_inputs(17, 64, 48, bias, True, "3d", torch.float32, "cpu")
        s, z = torch.rand(48) + 0.5, poisoned((*x.shape[:-1], 48), torch.float32)
        y = ops._linear_cublas(x, w, b, activation, r, s, z)
        assert y.data_ptr() != z.data_ptr()
        assert_close(z, reference64(x, w, b, None, None), dtype=torch.float32, name="preact")
        d = lambda t: None if t is None else t.double()
        assert_close(y, reference.linear(d(x), d(w), d(b), activation, d(r), d(s)), dtype=torch.float32)


# Every epilogue the CPU dispatch can meet: (activation, bias, residual, layer-scale).
CPU_EPILOGUES = [("gelu", True, False, False), ("gelu_tanh", False, False, False), (None, True, True, False),
                 (None, False, False, False), ("quick_gelu", True, False, True), ("gelu", True, True, True),
                 (None, True, True, True), ("gelu_tanh", True, True, False)]


# bf16 on oneDNN's path: only on CPUs where oneDNN has a bf16 GEMM (elsewhere bf16 takes F.linear, checked by
# test_cpu_bf16_without_onednn_bf16_takes_torch).
ONEDNN_BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not ops._MKLDNN_BF16, reason="oneDNN has no bf16 GEMM on this CPU (needs avx512bw/vl/dq or avx_ne_convert)"))


def test_cpu_bf16_without_onednn_bf16_takes_torch(monkeypatch):
    """ops detects whether oneDNN can run a bf16 GEMM on this CPU (it refuses to build the primitive without
    AVX512-era instructions); without, bf16 takes F.linear and the epilogue, nothing timed, and stays right."""
    x, w, b = torch.randn(8, 16).bfloat16(), torch.randn(32, 16).bfloat16(), torch.randn(32).bfloat16()
    try:
        torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        works = True
    except RuntimeError:
        works = False
    assert ops._MKLDNN_BF16 == (works and ops._MKLDNN)
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "_LINEAR_CPU_PATHS", {})
    monkeypatch.setattr(ops, "_MKLDNN_DTYPES", (torch.float32,))
    monkeypatch.setattr(ops, "_LINEAR_CPU", (ops._linear_torch, poisoned))     # the fused path must not run
    x, w, b, r = make_inputs(34, 64, 48, True, True, "3d", torch.bfloat16, "cpu")
    y = ops.linear(x, w, b, activation="gelu", residual=r)
    assert_close(y, reference64(x, w, b, "gelu", r), dtype=torch.bfloat16,
                 eager=reference.linear(x, w, b, "gelu", r))
    assert not ops._LINEAR_CPU_PATHS


@pytest.mark.parametrize("dtype", [torch.float32, ONEDNN_BF16])
@pytest.mark.parametrize("activation,bias,residual,scale", CPU_EPILOGUES)
def test_cpu_path_picks_mkldnn_or_torch_once_per_key_and_both_are_right(activation, bias, residual, scale,
                                                                        dtype, monkeypatch):
    """CPU tensors (no interpreter) take the faster of oneDNN's fused GEMM + post-op and F.linear + the
    epilogue, timed on the first call of a key; either path equals the float64 reference."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "_LINEAR_CPU_PATHS", {})
    x, w, b, r = make_inputs(394, 96, 384, bias, residual, "3d", dtype, "cpu")
    gamma = (torch.rand(384) * 0.5 + 1e-3).to(dtype) if scale else None
    d = lambda t: None if t is None else t.double()
    want = reference.linear(d(x), d(w), d(b), activation, d(r), d(gamma))
    eager = reference.linear(x, w, b, activation, r, gamma)
    assert_close(ops.linear(x, w, b, activation=activation, residual=r, scale=gamma), want, dtype=dtype, eager=eager)
    (key, chosen), = ops._LINEAR_CPU_PATHS.items()
    assert chosen in (0, 1)
    for path in (0, 1):
        ops._LINEAR_CPU_PATHS[key] = path
        y = ops.linear(x, w, b, activation=activation, residual=r, scale=gamma)
        assert y.is_contiguous() and y.shape == (*x.shape[:-1], 384)
        assert_close(y, want, dtype=dtype, eager=eager, name=("torch", "mkldnn")[path])
    assert len(ops._LINEAR_CPU_PATHS) == 1


@pytest.mark.parametrize("layout,operand", [("transposed", "x"), ("colmajor", "x"), ("sliced", "weight"),
                                            ("3d", "bias"), ("3d", "residual")])
def test_cpu_path_strided_operands_take_torch(layout, operand, monkeypatch):
    """oneDNN's fused GEMM reads a strided bias wrongly; any non-contiguous operand takes F.linear
    (nothing timed, nothing cached) and stays right."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "_LINEAR_CPU_PATHS", {})
    monkeypatch.setattr(ops, "_LINEAR_CPU", (ops._linear_torch, poisoned))     # the fused path must not run
    x, w, b, r = make_inputs(34, 64, 48, True, True, layout, torch.float32, "cpu")
    if operand == "bias":
        b = torch.randn(96)[::2]
    elif operand == "residual":
        r = torch.randn(48, *x.shape[:-1]).permute(1, 2, 0)
    y = ops.linear(x, w, b, residual=r, activation="gelu" if operand != "residual" else None)
    assert_close(y, reference64(x, w, b, "gelu" if operand != "residual" else None, r), dtype=torch.float32)
    assert not ops._LINEAR_CPU_PATHS


def test_cpu_path_falls_back_when_the_fused_op_fails(monkeypatch):
    """A torch build or CPU without oneDNN's fused GEMM (the op raises): F.linear is chosen, right."""
    def unavailable(*args):
        raise RuntimeError("no oneDNN kernel for this CPU")
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "_LINEAR_CPU_PATHS", {})
    monkeypatch.setattr(ops, "_LINEAR_CPU", (ops._linear_torch, unavailable))
    x, w, b, _ = make_inputs(34, 64, 48, True, False, "3d", torch.float32, "cpu")
    assert_close(ops.linear(x, w, b, activation="gelu"), reference64(x, w, b, "gelu", None), dtype=torch.float32)
    assert list(ops._LINEAR_CPU_PATHS.values()) == [0]


needs_pack = pytest.mark.skipif(not ops._MKLDNN_PACK, reason="this torch build has no oneDNN weight packing")


def _oned_nn_path(monkeypatch):
    """CPU tensors without the interpreter, every CPU linear key on oneDNN's path, no packed weight kept."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "_PACKED", ops.WeakIdKeyDictionary())
    paths = {}
    monkeypatch.setattr(ops, "_LINEAR_CPU_PATHS", paths)
    monkeypatch.setattr(ops, "_cpu_fastest", lambda fns, args: 1)
    return paths


@needs_pack
@pytest.mark.parametrize("dtype", [torch.float32, ONEDNN_BF16])
def test_cpu_packed_weight_follows_every_change_of_the_weight(dtype, monkeypatch):
    """Inference keeps each weight in oneDNN's layout: the output follows an in-place update (version
    counter), a replaced tensor, `.data` swapped for another tensor (data pointer), and equals the float64
    reference each time; the copy goes with the weight."""
    import gc

    _oned_nn_path(monkeypatch)
    x, w, b, r = make_inputs(394, 96, 384, True, True, "3d", dtype, "cpu")
    lin = torch.nn.Linear(96, 384).to(dtype)
    d = lambda t: None if t is None else t.double()

    def check(y, name, m=lin):
        assert_close(y, reference.linear(d(x), d(m.weight), d(m.bias), "gelu", None), dtype=dtype,
                     eager=reference.linear(x, m.weight, m.bias, "gelu"), name=name)

    with torch.no_grad():
        check(ops.linear(x, lin.weight, lin.bias, activation="gelu"), "first call")
        assert list(ops._PACKED.keys()) == [lin.weight]
        packed = ops._PACKED[lin.weight][1]
        check(ops.linear(x, lin.weight, lin.bias, activation="gelu"), "cached")
        assert ops._PACKED[lin.weight][1] is packed                      # no second reorder
        lin.weight.mul_(-0.5)                                            # an optimizer / load_state_dict step
        check(ops.linear(x, lin.weight, lin.bias, activation="gelu"), "after an in-place update")
        lin.weight.data = w.clone()                                      # Module.to() / .half() swap .data
        check(ops.linear(x, lin.weight, lin.bias, activation="gelu"), "after .data was replaced")
        lin.weight = torch.nn.Parameter(w * 2)                           # a new Parameter
        check(ops.linear(x, lin.weight, lin.bias, activation="gelu"), "with a new parameter")
        lin.weight.data.copy_(w)                   # bypasses the version counter: documented, cleared by hand
        ops.clear_cpu_weight_cache()
        assert len(ops._PACKED) == 0
        check(ops.linear(x, lin.weight, lin.bias, activation="gelu"), "after clear_cpu_weight_cache")
        assert_close(ops.linear(x, w, b, residual=r), reference.linear(d(x), d(w), d(b), None, d(r)), dtype=dtype,
                     eager=reference.linear(x, w, b, None, r), name="residual post-op on a packed weight")
    del lin, check
    gc.collect()
    assert list(ops._PACKED.keys()) == [w]                               # the dead weight's copy is gone


@needs_pack
def test_cpu_packed_weight_modes(monkeypatch):
    """A pack made under inference_mode serves no_grad and grad-enabled calls with nothing to differentiate;
    an inference tensor as the weight (no version counter) and a view are never packed; training takes the
    plain weight (the op path: nothing kept), with the right gradient."""
    _oned_nn_path(monkeypatch)
    x, w, b, _ = make_inputs(197, 64, 192, True, False, "3d", torch.float32, "cpu")
    want = reference64(x, w, b, "gelu_tanh", None)
    with torch.inference_mode():
        assert_close(ops.linear(x, w, b, activation="gelu_tanh"), want, dtype=torch.float32, name="inference_mode")
        w_inf = w.clone()
        assert_close(ops.linear(x, w_inf, b, activation="gelu_tanh"), want, dtype=torch.float32, name="inference w")
    rows = torch.cat([torch.randn(5, 64), w])[5:]                        # a view (rows of a packed in_proj)
    assert_close(ops.linear(x, rows, b, activation="gelu_tanh"), want, dtype=torch.float32, name="a view")
    assert list(ops._PACKED.keys()) == [w]
    with torch.no_grad():
        assert_close(ops.linear(x, w, b, activation="gelu_tanh"), want, dtype=torch.float32, name="no_grad")
    assert_close(ops.linear(x, w, b, activation="gelu_tanh"), want, dtype=torch.float32, name="grad enabled")
    ops.clear_cpu_weight_cache()
    wt = w.clone().requires_grad_()
    y = ops.linear(x, wt, b, activation="gelu_tanh")
    assert_close(y, want, dtype=torch.float32, name="training forward")
    assert len(ops._PACKED) == 0
    y.square().sum().backward()
    w64 = w.double().requires_grad_()
    reference.linear(x.double(), w64, b.double(), "gelu_tanh", None).square().sum().backward()
    assert_close(wt.grad, w64.grad, dtype=torch.float32, name="dW")


def test_cpu_fastest_times_interleaved_rounds_and_keeps_the_best():
    """The once-per-shape CPU decision: a warm-up call each, then interleaved timed rounds (five here: far
    inside the budget), the best time of each; a candidate that raises is dropped."""
    calls = []

    def fake(name, seconds):
        def fn(*args):
            calls.append(name)
            if seconds is None:
                raise RuntimeError("no kernel")
            t = time.perf_counter() + seconds
            while time.perf_counter() < t:
                pass
        return fn

    fns = [fake("slow", 2e-3), fake("broken", None), fake("fast", 5e-4)]
    assert ops._cpu_fastest(fns, ()) == 2
    assert calls == ["slow", "broken", "fast"] + ["slow", "fast"] * 5
    calls.clear()
    assert ops._cpu_fastest(fns[:1] + fns[2:], (), rounds=50, budget_s=0.02) == 1
    assert 3 * 2 <= len(calls) < 50 * 2                                   # the budget ends it early


def test_fastest_path_times_once_and_never_while_capturing():
    calls = []
    timer = lambda name, ms: (lambda: calls.append(name) or ms)
    cache = {}
    timers = {"triton": timer("triton", 2.0), "cublas": timer("cublas", 1.0)}
    assert ops._fastest_path("k", timers, cache, capturing=True) == "cublas"   # capture-safe default
    assert calls == [] and cache == {}
    assert ops._fastest_path("k", timers, cache, capturing=False) == "cublas"
    assert ops._fastest_path("k", timers, cache, capturing=False) == "cublas"
    assert sorted(calls) == ["cublas", "triton"]                              # timed once
    assert ops._fastest_path("k", timers, cache, capturing=True) == "cublas"   # cached choice under capture
    timers = {"triton": timer("triton", 1.0), "cublas": timer("cublas", 1.0)}
    assert ops._fastest_path("tie", timers, cache, capturing=False) == "triton"


def test_backward_dispatch_logic_on_cpu_tensors(monkeypatch):
    """The CUDA backward dispatch's own logic, run on CPU tensors under the interpreter (the device itself is
    not needed by it): the fused kernel and torch's path are timed once per key and the choice cached (none
    while capturing: torch's path, uncached); both paths give the same dX, dZ and layer-scale gradient."""
    monkeypatch.setattr(ops, "_LINEAR_BWD_PATHS", {})
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    timed = []
    import vitfast.timing
    monkeypatch.setattr(vitfast.timing, "caller_ms", lambda fn, **kw: timed.append(fn()) or 1.0)
    torch.manual_seed(0)
    dy, z, w, s = torch.randn(40, 12), torch.randn(40, 12), torch.randn(12, 20) / 4, torch.rand(12) + 0.5
    want = ops._linear_bwd_torch(dy, z, w, s, "gelu", True, True)
    got = ops._linear_bwd_cuda(dy, z, w, s, "gelu", True, True)      # capturing: torch's path, nothing timed
    assert not timed and not ops._LINEAR_BWD_PATHS
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    capturing[0] = False
    got = ops._linear_bwd_cuda(dy, z, w, s, "gelu", True, True)
    assert len(timed) == 2 and list(ops._LINEAR_BWD_PATHS.values()) == ["triton"]   # a tie goes to the first
    ops._linear_bwd_cuda(dy, z, w, s, "gelu", True, True)
    assert len(timed) == 2                                                          # decided once per key
    for name, g, e in zip(("dx", "dz", "dscale"), got, want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def test_linear_candidates():
    """What the CUDA dispatch times once per key: the TMA form only where eligible, the persistent forms
    not for fp32 ieee; cuBLAS last (ties go to the earlier path); every Triton path maps to a variant."""
    assert ops._linear_candidates(tma_ok=True, fp32_ieee=False) == ("triton", "triton-persistent", "triton-tma",
                                                                     "cublas")
    assert ops._linear_candidates(tma_ok=False, fp32_ieee=False) == ("triton", "triton-persistent", "cublas")
    for tma_ok in (True, False):   # FMA dots: the persistent forms spill on sm_90
        assert ops._linear_candidates(tma_ok=tma_ok, fp32_ieee=True) == ("triton", "cublas")
    assert set(ops._LINEAR_VARIANTS) == {"triton", "triton-persistent", "triton-tma"}
    assert set(ops._LINEAR_VARIANTS.values()) == set(linear_kernels.VARIANTS)


def test_m_bucket():
    assert [linear_kernels.m_bucket(m) for m in (0, 1, 16, 17, 197, 50432)] == [16, 16, 16, 32, 256, 65536]



@pytest.mark.parametrize("dtype,precision,use_tma,store_z,must_drop,must_keep", [
    # (BLOCK_M, BLOCK_N, num_warps, num_stages) measured with sm_90 compiles (ptxas -v). use_tma None:
    # the tiled kernel; False / True: the persistent kernel with pointer / TMA loads. store_z: training.
    (torch.float32, "ieee", None, False, [(128, 256, 8, 3), (128, 128, 4, 4)], [(128, 128, 8, 3), (64, 64, 4, 4)]),
    (torch.float32, "tf32", None, False, [(128, 256, 8, 4)], [(128, 128, 8, 3)]),
    (torch.bfloat16, "tf32", None, False, [], [(128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 4, 4)]),
    (torch.bfloat16, "tf32", None, True, [], [(128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 4, 4)]),
    (torch.bfloat16, "tf32", False, False, [(128, 128, 4, 4)], [(128, 256, 8, 3), (128, 256, 8, 4), (128, 64, 4, 4)]),
    (torch.bfloat16, "tf32", True, False, [], [(128, 256, 8, 3), (128, 256, 8, 4), (128, 128, 4, 4)]),
    (torch.bfloat16, "tf32", True, True, [(128, 128, 4, 4)], [(128, 256, 8, 3), (128, 128, 8, 4), (128, 64, 4, 4)]),
])
def test_prune_configs(dtype, precision, use_tma, store_z, must_drop, must_keep, monkeypatch):
    """On an H100/H200 (227 KiB of shared memory per block): fp32 drops the tiles that cannot fit, and
    with ieee dots (FMA, no tensor cores) also those that spill; bf16 keeps the large tiles, except
    128x128 on 4 warps in the persistent kernel with pointer loads, or with TMA loads when it also stores
    the pre-activation (they spill there)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = linear_kernels.linear_configs()                        # the GPU autotune space
    monkeypatch.setattr(linear_kernels, "_smem_limit", lambda device: 232448)
    flags = ({} if use_tma is None else {"USE_TMA": use_tma}) | {"STORE_Z": store_z}
    kept = linear_kernels._prune_configs(configs, {"x_ptr": FakeCudaTensor(dtype), "M": 1576, "N": 3072},
                                         INPUT_PRECISION=precision, **flags)
    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
    assert not tiles & set(must_drop), f"kept {sorted(tiles)}"
    assert set(must_keep) <= tiles, f"kept {sorted(tiles)}"


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.bfloat16, "tf32")])
def test_prune_backward_configs(dtype, precision, monkeypatch):
    """Every backward tile (all compiled without spills for sm_90) fits Hopper's shared memory at ViT-B's fc1
    (dX [1576, 768], N = 3072) and holds at most 64 fp32 accumulator values per thread (the ieee fp32 limit);
    a tiny problem keeps only the 64-wide tiles."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = linear_kernels.linear_bwd_configs()
    monkeypatch.setattr(linear_kernels, "_smem_limit", lambda device: 232448)
    args = {"dy_ptr": FakeCudaTensor(dtype), "M": 1576, "K": 768}
    kw = dict(INPUT_PRECISION=precision, ACTIVATION=1, DSCALE=False)
    kept = linear_kernels._prune_bwd_configs(configs, args, **kw)
    assert kept == configs
    small = linear_kernels._prune_bwd_configs(configs, {**args, "M": 40, "K": 20}, **kw)
    assert small and all(c.kwargs["BLOCK_M"] == 64 and c.kwargs["BLOCK_K"] == 64 for c in small)


def _good(device="cpu", dtype=torch.float32):
    return (torch.randn(2, 5, 16, dtype=dtype, device=device), torch.randn(8, 16, dtype=dtype, device=device),
            torch.randn(8, dtype=dtype, device=device))


@pytest.mark.parametrize("change,match", [
    (lambda x, w, b: dict(weight=torch.randn(8, 15)), r"weight: expected shape \(N, 16\).*got \(8, 15\)"),
    (lambda x, w, b: dict(weight=torch.randn(16)), r"weight: expected shape \(N, 16\).*got \(16,\)"),
    (lambda x, w, b: dict(bias=torch.randn(7)), r"bias: expected shape \(8,\).*got \(7,\)"),
    (lambda x, w, b: dict(residual=torch.randn(2, 5, 7)), r"residual: expected shape \(2, 5, 8\).*got \(2, 5, 7\)"),
    (lambda x, w, b: dict(residual=torch.randn(10, 8)), r"residual: expected shape \(2, 5, 8\).*got \(10, 8\)"),
    (lambda x, w, b: dict(activation="relu"), r"activation: expected one of .*'gelu_tanh'.*got 'relu'"),
    (lambda x, w, b: dict(weight=w.half()), r"weight: expected dtype torch.float32 \(like x\), got torch.float16"),
    (lambda x, w, b: dict(bias=b.double()), r"bias: expected dtype torch.float32 \(like x\), got torch.float64"),
    (lambda x, w, b: dict(weight=w.to("meta")), r"weight: expected device cpu \(like x\), got meta"),
    (lambda x, w, b: dict(x=x.int()), r"x: expected dtype in .*got torch.int32"),
    (lambda x, w, b: dict(x=torch.tensor(1.0)), r"x: expected a tensor \[..., K\]"),
])
def test_bad_input(change, match):
    x, w, b = _good()
    kw = dict(x=x, weight=w, bias=b, activation=None, residual=None)
    kw.update(change(x, w, b))
    with pytest.raises(ValueError, match=match):
        ops.linear(kw.pop("x"), kw.pop("weight"), kw.pop("bias"), **kw)


def test_bad_input_mlp_and_launcher():
    x, w, b = _good()
    with pytest.raises(ValueError, match=r"fc2_weight: expected shape \(C_out, H\) .*got \(16, 9\)"):
        ops.mlp(x, w, b, torch.randn(16, 9), None)
    with pytest.raises(ValueError, match=r"out: expected shape \[2, 5, 8\], got \[10, 8\]"):
        linear_kernels.linear(x, w, b, out=torch.empty(10, 8))
    with pytest.raises(ValueError, match=r"out: expected a buffer viewable as \[10, 8\]"):
        linear_kernels.linear(x, w, b, out=torch.empty(8, 5, 2).permute(2, 1, 0))
    with pytest.raises(ValueError, match=r"activation: expected one of .*got 'GELU'"):
        linear_kernels.linear(x, w, b, activation="GELU")


@pytest.mark.parametrize("bias,activation,residual,scale", [(True, "gelu", True, False), (False, None, False, False),
                                                             (True, "quick_gelu", True, True)])
def test_opcheck(bias, activation, residual, scale, device):
    x, w, b, r = make_inputs(6, 20, 12, bias, residual, "3d", torch.float32, device)
    s = torch.randn(12, device=device) if scale else None
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(ops._linear_op, (x, w, b, activation, r, s))


# Layer-scale (DINOv2, DeiT-III, CLIP-L: y = residual + gamma · (x Wᵀ + b)) and QuickGELU (OpenAI CLIP).
@pytest.mark.parametrize("variant", ["tiled", "persistent", "tma"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,activation,residual", [(17, 64, 192, "quick_gelu", False), (197, 96, 384, None, True),
                                                       (5, 64, 37, "gelu", True)])
def test_layer_scale_and_quick_gelu(M, K, N, activation, residual, dtype, variant, device):
    x, w, b, r = make_inputs(M, K, N, True, residual, "3d" if N % 8 == 0 else "2d", dtype, device)
    gamma = (torch.rand(N, device=device) * 0.5 + 1e-3).to(dtype)        # small, like a trained gamma
    out = poisoned((*x.shape[:-1], N), dtype, device)
    y = linear_kernels.linear(x, w, b, activation=activation, residual=r, scale=gamma, out=out, variant=variant)
    d = lambda t: None if t is None else t.detach().to("cpu", torch.float64)
    want = reference.linear(d(x), d(w), d(b), activation, d(r), d(gamma))
    assert_close(y, want, dtype=dtype, eager=reference.linear(x, w, b, activation, r, gamma))
    assert_close(ops.linear(x, w, b, activation=activation, residual=r, scale=gamma), want, dtype=dtype,
                 eager=reference.linear(x, w, b, activation, r, gamma), name="ops.linear")


def test_quick_gelu_and_layer_scale_reference():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert torch.allclose(reference.quick_gelu(x), x * torch.sigmoid(1.702 * x))
    w, b, g, r = torch.eye(101, dtype=torch.float64), torch.zeros(101, dtype=torch.float64), \
        torch.full((101,), 0.5, dtype=torch.float64), torch.ones(101, dtype=torch.float64)
    assert torch.allclose(reference.linear(x, w, b, "quick_gelu", r, g), 1 + 0.5 * reference.quick_gelu(x))
    with pytest.raises(ValueError, match=r"scale: expected shape \(101,\)"):
        ops.linear(x, w, b, scale=torch.ones(3, dtype=torch.float64))


def test_autograd_matches_reference(device):
    x, w, b, r = make_inputs(6, 20, 12, True, True, "3d", torch.float32, device)
    s = torch.rand(12, device=device) + 0.5
    leaves = [t.requires_grad_(True) for t in (x, w, b, r, s)]
    g = torch.randn(*x.shape[:-1], 12, device=device)
    grads = torch.autograd.grad(ops.linear(x, w, b, activation="gelu_tanh", residual=r, scale=s), leaves, g)
    leaves64 = [t.detach().to("cpu", torch.float64).requires_grad_(True) for t in leaves]
    ref = reference.linear(leaves64[0], leaves64[1], leaves64[2], "gelu_tanh", leaves64[3], leaves64[4])
    grads64 = torch.autograd.grad(ref, leaves64, g.to("cpu", torch.float64))
    for name, got, want in zip("x w b residual scale".split(), grads, grads64):
        assert_close(got, want, dtype=torch.float32, name=f"grad {name}")


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("bias,residual,scale", [(True, True, True), (False, False, False), (True, False, True),
                                                 (False, True, False)])
def test_backward_every_epilogue_without_the_reference(activation, bias, residual, scale, monkeypatch):
    """dX = dZ W, dW = dZᵀ X, db = Σ dZ with dZ = dY·scale ⊙ act'(z), the residual's gradient passed
    through and layer-scale's gamma gradient, for each epilogue: equal to float64 autograd through the
    reference, which the backward never calls."""
    torch.manual_seed(0)
    x, w, b, r = make_inputs(34, 20, 12, bias, residual, "3d", torch.float32, "cpu")
    s = torch.rand(12) + 0.5 if scale else None
    values = [x, w, b, r, s]
    leaves = [None if t is None else t.detach().requires_grad_() for t in values]
    y = ops.linear(leaves[0], leaves[1], leaves[2], activation=activation, residual=leaves[3], scale=leaves[4])
    g = torch.randn_like(y)
    forbid_reference(monkeypatch, "linear", "activate", "gelu", "quick_gelu")    # the reference and what it calls
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wrt, g)
    monkeypatch.undo()
    leaves64 = [None if t is None else t.detach().double().requires_grad_() for t in values]
    y64 = reference.linear(leaves64[0], leaves64[1], leaves64[2], activation, leaves64[3], leaves64[4])
    grads64 = torch.autograd.grad(y64, [t for t in leaves64 if t is not None], g.double())
    names = [n for n, t in zip(("x", "weight", "bias", "residual", "scale"), values) if t is not None]
    for name, got, want in zip(names, grads, grads64):
        assert_close(got, want, dtype=torch.float32, name=f"grad {name}")


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu", None])
def test_fused_op_backward_rebuilds_the_pre_activation(activation, monkeypatch):
    """The inference op itself under autograd (torch.ops users; ops.linear takes the op that also returns z in
    training): its backward rebuilds z with one GEMM, never reference.linear, and equals the reference's
    gradients."""
    x, w, b, r = make_inputs(17, 20, 12, True, True, "3d", torch.float32, "cpu")
    s = torch.rand(12) + 0.5
    leaves = [t.detach().requires_grad_() for t in (x, w, b, r, s)]
    y = ops._linear_op(leaves[0], leaves[1], leaves[2], activation, leaves[3], leaves[4])
    g = torch.randn_like(y)
    forbid_reference(monkeypatch, "linear")
    grads = torch.autograd.grad(y, leaves, g)
    monkeypatch.undo()
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(reference.linear(l64[0], l64[1], l64[2], activation, l64[3], l64[4]), l64, g.double())
    for name, got, w64 in zip(("x", "weight", "bias", "residual", "scale"), grads, want):
        assert_close(got, w64, dtype=torch.float32, name=f"grad {name}")


def test_gradcheck_float64_cpu_path():
    x, w, b, r = (t.double().requires_grad_() for t in make_inputs(5, 6, 4, True, True, "3d", torch.float32, "cpu"))
    s = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    for activation in ("gelu", "gelu_tanh", "quick_gelu"):
        def f(*a, act=activation):
            return ops.linear(a[0], a[1], a[2], activation=act, residual=a[3], scale=a[4])
        assert torch.autograd.gradcheck(f, (x, w, b, r, s))




# ------------------------------------------------------------------------------------------ backward kernel
# (M, K, N, activation, scale): N 12 / 37 / 48 against the interpreter's BLOCK_N 16 (full and partial
# reduction steps), M and K past one 32-wide tile with tails.
BWD_CASES = [(34, 20, 12, "gelu", False), (70, 45, 37, "gelu_tanh", True), (5, 64, 48, "quick_gelu", True),
             (33, 100, 37, None, True), (70, 45, 37, "gelu", True)]


def backward_reference64(dy, z, w, s, activation):
    """(dx, dz, dscale) of y = act(z) · s by float64 autograd through the reference activation."""
    z64 = z.detach().double().requires_grad_()
    s64 = None if s is None else s.detach().double().requires_grad_()
    y = reference.activate(z64, activation)
    y = y if s64 is None else y * s64
    grads = torch.autograd.grad(y, [t for t in (z64, s64) if t is not None], dy.double())
    dz = grads[0]
    return dz @ w.double(), dz, (grads[1].reshape(-1, w.shape[0]).sum(0) if s is not None else None)


@pytest.mark.parametrize("need", ["all", "dx only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,activation,scale", BWD_CASES)
def test_linear_backward_kernel(M, K, N, activation, scale, dtype, need):
    """dX = dZ W with dZ = dY · scale ⊙ act'(z) formed in the kernel, dZ stored, Σ dY ⊙ act(z): against float64
    autograd, and within 2x eager torch's error in the same dtype (gelu_backward, then the GEMM)."""
    torch.manual_seed(M + N)
    dy = torch.randn(2, M, N).to(dtype)
    z = (torch.randn(2, M, N) * 2).to(dtype)
    w = (torch.randn(N, K) / math.sqrt(N)).to(dtype)
    s = (torch.rand(N) + 0.5).to(dtype) if scale else None
    need_dz, need_dscale = need == "all", need == "all" and scale
    dx, dz, dscale = linear_kernels.linear_backward(dy, z, w, s, activation, need_dz=need_dz, need_dscale=need_dscale)
    want_dx, want_dz, want_ds = backward_reference64(dy, z, w, s, activation)
    eager = ops._linear_bwd_torch(dy.reshape(-1, N).float(), z.reshape(-1, N).float(), w.float(),
                                  None if s is None else s.float(), activation, True, bool(need_dscale))
    assert dx.shape == (2, M, K) and dx.dtype == dtype
    assert_close(dx, want_dx, dtype=dtype, name="dx")
    if need_dz:
        assert dz.shape == (2, M, N) and dz.dtype == dtype
        assert_close(dz, want_dz, dtype=dtype, name="dz")
    else:
        assert dz is None
    if need_dscale:
        assert dscale.shape == (N,) and dscale.dtype == dtype
        assert_close(dscale, want_ds, dtype=dtype, eager=eager[2].to(dtype), name="dscale")
    else:
        assert dscale is None


def test_linear_backward_kernel_strided_inputs_and_empty_dims():
    """dY and z read through their strides (a transposed view), an empty K (dX empty, dZ and dscale not), no rows."""
    dy = torch.randn(37, 40).t()                     # [40, 37], column-major
    z = torch.randn(37, 40).t()
    w, s = torch.randn(37, 24) / 6, torch.rand(37) + 0.5
    dx, dz, ds = linear_kernels.linear_backward(dy, z, w, s, "gelu", need_dz=True, need_dscale=True)
    want = backward_reference64(dy, z, w, s, "gelu")
    for name, got, ref in zip(("dx", "dz", "dscale"), (dx, dz, ds), want):
        assert_close(got, ref, dtype=torch.float32, name=name)
    dx, dz, ds = linear_kernels.linear_backward(dy, z, w[:, :0], s, "gelu", need_dz=True, need_dscale=True)
    assert dx.shape == (40, 0)
    assert_close(dz, want[1], dtype=torch.float32, name="dz, K = 0")
    assert_close(ds, want[2], dtype=torch.float32, name="dscale, K = 0")
    dx, dz, ds = linear_kernels.linear_backward(dy[:0], z[:0], w, s, "gelu", need_dz=True, need_dscale=True)
    assert dx.shape == (0, 24) and dz.shape == (0, 37) and torch.equal(ds, torch.zeros(37))


@pytest.mark.parametrize("block_m", [64, 128])
def test_dscale_partial_sums_cover_every_row_whatever_the_tile(block_m):
    """Autotuning runs each config into the same buffers before the chosen one runs: every config must write
    every row of the layer-scale partial sums (one per DS_ROWS rows of dY, whatever BLOCK_M), so that none is
    left from another config. The kernel launched directly with each tile height into a NaN-filled buffer."""
    M, K, N = 200, 16, 24
    dy, z, w, s = torch.randn(M, N), torch.randn(M, N), torch.randn(N, K) / 5, torch.rand(N) + 0.5
    dx, dz = torch.empty(M, K), torch.empty(M, N)
    ds = torch.full((-(-M // linear_kernels.DS_ROWS), N), float("nan"))
    grid = (-(-M // block_m) * -(-K // 32),)
    linear_kernels._linear_bwd_kernel.fn[grid](
        dy, z, w, s, dx, dz, ds, M, N, K, M, *dy.stride(), *z.stride(), *w.stride(), s.stride(0), *dx.stride(),
        *dz.stride(), ACTIVATION=1, HAS_SCALE=True, STORE_DZ=True, DSCALE=True, DS_ROWS=linear_kernels.DS_ROWS,
        INPUT_PRECISION="ieee", BLOCK_M=block_m, BLOCK_K=32, BLOCK_N=16, GROUP_M=4)
    want = backward_reference64(dy, z, w, s, "gelu")
    assert_close(ds.sum(0), want[2], dtype=torch.float32, name="dscale")
    assert_close(dx, want[0], dtype=torch.float32, name="dx")


@pytest.mark.parametrize("call,match", [
    (dict(activation="relu"), r"activation: expected one of \[None, 'gelu'"),
    (dict(dy=torch.zeros(3, 5)), r"dy: expected last dim 6 \(weight.shape\[0\]\), got shape \[3, 5\]"),
    (dict(z=None), r"z: expected shape \[3, 6\] \(like dy\), got None"),
    (dict(z=torch.zeros(3, 6, dtype=torch.float16)),
     r"z: expected torch.float32 on cpu \(like dy\), got torch.float16"),
    (dict(scale=None, need_dscale=True), r"need_dscale: expected a scale tensor, got scale=None"),
])
def test_linear_backward_bad_input(call, match):
    args = dict(dy=torch.zeros(3, 6), z=torch.zeros(3, 6), weight=torch.zeros(6, 4), scale=torch.ones(6),
                activation="gelu")
    args.update(call)
    kw = {"need_dscale": args.pop("need_dscale")} if "need_dscale" in args else {}
    with pytest.raises(ValueError, match=match):
        linear_kernels.linear_backward(args["dy"], args["z"], args["weight"], args["scale"], args["activation"], **kw)


@pytest.mark.parametrize("variant", ["tiled", "persistent", "tma"])
@pytest.mark.parametrize("activation,scale,residual", [("gelu", False, False), ("quick_gelu", True, True),
                                                       (None, True, True)])
def test_linear_kernel_stores_the_pre_activation(activation, scale, residual, variant):
    """`preact` receives z = x Wᵀ + b from the same epilogue that writes y (every element, each variant)."""
    x, w, b, r = make_inputs(70, 64, 48, True, residual, "3d", torch.float32, "cpu")
    s = torch.rand(48) + 0.5 if scale else None
    z = poisoned((*x.shape[:-1], 48), torch.float32)
    y = linear_kernels.linear(x, w, b, activation=activation, residual=r, scale=s, preact=z, variant=variant)
    assert_close(z, reference64(x, w, b, None, None), dtype=torch.float32, name="preact")
    d = lambda t: None if t is None else t.double()
    assert_close(y, reference.linear(d(x), d(w), d(b), activation, d(r), d(s)), dtype=torch.float32, name="y")
    with pytest.raises(ValueError, match=r"preact: expected shape \[2, 35, 48\], got \[70, 48\]"):
        linear_kernels.linear(x, w, b, preact=torch.empty(70, 48))
    with pytest.raises(ValueError, match=r"preact: must not share memory with x or residual"):
        linear_kernels.linear(x, w, b, preact=x[..., :48])


def test_training_forward_saves_the_pre_activation_and_the_backward_reads_it(monkeypatch):
    """In training ops.linear runs the GEMM once (the op that also returns z) and the backward's dZ is formed
    inside the Triton kernel: neither torch's elementwise activation gradient nor a GEMM rebuilding z runs."""
    x, w, b, r = make_inputs(34, 20, 12, True, True, "3d", torch.float32, "cpu")
    s = torch.rand(12) + 0.5
    leaves = [t.detach().requires_grad_() for t in (x, w, b, r, s)]
    launches, launch = [], linear_kernels.run          # (plan, x, weight, bias, residual, scale, preact)
    monkeypatch.setattr(linear_kernels, "run", lambda *a: launches.append(a[6]) or launch(*a))
    y = ops.linear(leaves[0], leaves[1], leaves[2], activation="gelu", residual=leaves[3], scale=leaves[4])
    assert len(launches) == 1 and launches[0] is not None          # one GEMM, z stored by its epilogue
    assert y.grad_fn is not None and "linear_preact" in y.grad_fn.name()

    def forbidden(*args, **kwargs):
        raise AssertionError("the backward left the fused kernel")
    monkeypatch.setattr(ops, "_activation_grad", forbidden)
    monkeypatch.setattr(torch, "addmm", forbidden)
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    monkeypatch.undo()
    l64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(reference.linear(l64[0], l64[1], l64[2], "gelu", l64[3], l64[4]), l64,
                               torch.ones_like(y).double())
    for name, got, w64 in zip(("x", "weight", "bias", "residual", "scale"), grads, want):
        assert_close(got, w64, dtype=torch.float32, name=f"grad {name}")


def test_inference_and_frozen_layer_scale_do_not_store_the_pre_activation(monkeypatch):
    x, w, b, r = make_inputs(6, 20, 12, True, True, "3d", torch.float32, "cpu")
    s = torch.rand(12) + 0.5
    launch, launches = linear_kernels.run, []

    def no_preact(*a):                                  # (plan, x, weight, bias, residual, scale, preact)
        assert a[6] is None, "stored z without a gradient needing it"
        launches.append(a)
        return launch(*a)
    monkeypatch.setattr(linear_kernels, "run", no_preact)
    with torch.no_grad():
        ops.linear(x.requires_grad_(), w, b, activation="gelu")
    ops.linear(torch.randn(6, 20), w, b, activation="gelu")               # nothing requires grad
    y = ops.linear(x, w, b, residual=r, scale=s)                          # layer-scale frozen, no activation: dz = dy·s
    (gx,) = torch.autograd.grad(y.sum(), [x])
    assert len(launches) == 3
    assert_close(gx, (torch.ones(2, 3, 12).double() * s.double()) @ w.double(), dtype=torch.float32)


def test_opcheck_training_ops():
    x, w, b, r = make_inputs(6, 20, 12, True, True, "3d", torch.float32, "cpu")
    s = torch.rand(12) + 0.5
    for t in (x, w, s):
        t.requires_grad_(True)
    torch.library.opcheck(ops._linear_preact_op, (x, w, b, "gelu_tanh", r, s))
    dy, z = torch.randn(6, 12), torch.randn(6, 12)
    torch.library.opcheck(ops._linear_bwd_op, (dy, z, w.detach(), s.detach(), "quick_gelu", True, True))
    torch.library.opcheck(ops._linear_bwd_op, (dy, None, w.detach(), s.detach(), None, False, False))
    torch.library.opcheck(ops._linear_bwd_op, (dy, None, w.detach(), None, None, True, False))   # dz = dy


# ------------------------------------------------------------------------------------------ GPU
VIT_B = [(768, 3072, "gelu", False), (3072, 768, None, True), (768, 2304, None, False), (768, 768, None, True)]


@gpu
@pytest.mark.parametrize("variant", linear_kernels.VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,N,activation,residual", VIT_B)
def test_linear_kernel_large_m(K, N, activation, residual, dtype, variant):
    """ViT-B linears at batch 256 x 197 tokens (M = 50,432, tails in M), each variant (TMA on compute
    capability >= 9); float64 reference on the GPU."""
    if variant == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    x, w, b, r = make_inputs(256 * 197, K, N, True, residual, "3d", dtype, "cuda")
    y = linear_kernels.linear(x, w, b, activation=activation, residual=r, out=poisoned((256, 197, N), dtype, "cuda"),
                              variant=variant)
    d = lambda t: None if t is None else t.double()
    ref = reference.linear(d(x), d(w), d(b), activation, d(r))
    assert_close(y, ref, dtype=dtype, eager=reference.linear(x, w, b, activation, r))


@gpu
def test_linear_kernel_int64_column_offsets():
    """Column-major x and residual with M = 2^25 + 3 rows: one BLOCK_K step along K moves 64·M > 2^31
    elements, and column n of the residual sits n·M elements in (> 2^31 from n = 64). Rows at both ends
    against the float64 reference."""
    M, K, N = 2**25 + 3, 96, 80
    x = torch.randn(K, M, dtype=torch.float16, device="cuda").t()        # (M, K), stride_xk = M
    w = (torch.randn(N, K, device="cuda") / math.sqrt(K)).half()
    b = torch.randn(N, dtype=torch.float16, device="cuda")
    r = torch.randn(N, M, dtype=torch.float16, device="cuda").t()        # (M, N), stride_rn = M
    y = linear_kernels.linear(x, w, b, residual=r)
    for rows in (slice(0, 64), slice(M - 64, M)):
        args = (x[rows], w, b, None, r[rows])
        assert_close(y[rows], reference64(*args), dtype=torch.float16, eager=reference.linear(*args))


@gpu
def test_linear_kernel_tf32():
    x, w, b, r = make_inputs(197, 192, 768, True, True, "3d", torch.float32, "cuda")
    with matmul_tf32(True):
        y = linear_kernels.linear(x, w, b, activation="gelu", residual=r)
        eager = reference.linear(x, w, b, "gelu", r)
        assert_close(y, reference64(x, w, b, "gelu", r), dtype=torch.float32, eager=eager)   # 'tf32' tolerance


@gpu
def test_dispatch_decides_once_and_captures_in_cuda_graph(monkeypatch):
    x, w, b, r = make_inputs(4 * 197, 256, 512, True, True, "3d", torch.float16, "cuda")
    ref = reference64(x, w, b, None, r)
    monkeypatch.setattr(ops, "_LINEAR_PATHS", {})       # in memory only: no decision read from disk
    monkeypatch.setattr(ops, "_LINEAR_PLANS", {})
    torch.nn.functional.linear(x, w, b)   # cuBLAS handle / workspace exist before the first capture
    torch.cuda.synchronize()
    # A new key while capturing: no timing, the capture-safe path.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = ops.linear(x, w, b, residual=r)
    assert not ops._LINEAR_PATHS
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y_graph, ref, dtype=torch.float16)
    # Outside capture: timed once and cached; then the cached choice is captured and replayed.
    y = ops.linear(x, w, b, residual=r)
    assert len(ops._LINEAR_PATHS) == 1
    assert set(ops._LINEAR_PATHS.values()) <= set(ops._linear_candidates(ops._linear_key(x, w, b, None, r)[-1],
                                                                         False))
    assert_close(y, ref, dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = ops.linear(x, w, b, residual=r)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y_graph, reference64(x, w, b, None, r), dtype=torch.float16)


@gpu
def test_tma_variant_captures_in_cuda_graph():
    """The descriptor scratch comes from torch's allocator (the graph's pool while capturing): a captured
    "tma" launch replays correctly on new inputs."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    x, w, b, r = make_inputs(4 * 197, 256, 512, True, True, "3d", torch.float16, "cuda")
    run = lambda: linear_kernels.linear(x, w, b, activation="gelu", residual=r, variant="tma")
    run()                                                       # autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(y, reference64(x, w, b, "gelu", r), dtype=torch.float16, eager=reference.linear(x, w, b, "gelu", r))


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("K,N,activation,scale", [(768, 3072, "gelu", False), (768, 3072, "gelu_tanh", False),
                                                  (1024, 4096, "quick_gelu", False), (3072, 768, None, True)])
def test_linear_backward_kernel_vit_shapes(K, N, activation, scale, dtype):
    """ViT-B/L's fc1 (dX of the GELU / QuickGELU GEMM) and fc2 with layer-scale at batch 8: within 2x the
    error of torch's own backward in the same dtype (gelu_backward, then cuBLAS)."""
    torch.manual_seed(0)
    M = 8 * 197
    dy = torch.randn(M, N, device="cuda", dtype=dtype) * 0.1
    z = torch.randn(M, N, device="cuda", dtype=dtype) * 2
    w = (torch.randn(N, K, device="cuda") / math.sqrt(N)).to(dtype)
    s = (torch.rand(N, device="cuda") + 0.5).to(dtype) if scale else None
    dx, dz, ds = linear_kernels.linear_backward(dy, z, w, s, activation, need_dz=True, need_dscale=scale)
    want = backward_reference64(dy.cpu(), z.cpu(), w.cpu(), None if s is None else s.cpu(), activation)
    eager = ops._linear_bwd_torch(dy, z, w, s, activation, True, scale)
    for name, got, ref, e in zip(("dx", "dz", "dscale"), (dx, dz, ds), want, eager):
        if ref is not None:
            assert_close(got, ref, dtype=dtype, eager=e, name=name)


@gpu
def test_backward_dispatch_decides_once_and_is_capture_safe(monkeypatch):
    """The backward times the fused kernel against torch's elementwise pass + cuBLAS once per key (none while a
    CUDA graph is being captured: torch's path, not cached), and both give the reference's gradients."""
    torch.manual_seed(0)
    monkeypatch.setattr(ops, "_LINEAR_BWD_PATHS", {})
    x, w, b, _ = make_inputs(4 * 197, 256, 512, True, False, "3d", torch.float16, "cuda")
    dy = torch.randn(4 * 197, 512, device="cuda", dtype=torch.float16)
    z = ops.linear(x, w, b)
    want = backward_reference64(dy.cpu(), z.cpu(), w.cpu(), None, "gelu")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ops._linear_bwd_impl(dy, z, w, None, "gelu", True, False)
    assert not ops._LINEAR_BWD_PATHS
    graph.replay()
    torch.cuda.synchronize()
    dx, dz, _ = ops._linear_bwd_impl(dy, z, w, None, "gelu", True, False)
    assert len(ops._LINEAR_BWD_PATHS) == 1 and set(ops._LINEAR_BWD_PATHS.values()) <= {"triton", "torch"}
    for got in (captured, (dx, dz)):
        assert_close(got[0], want[0], dtype=torch.float16, name="dx")
        assert_close(got[1], want[1], dtype=torch.float16, name="dz")


# --------------------------------------------------------------------------------------------
# The gated epilogues: y [..., H] = act(gate) · up of [gate | up] = x Wᵀ + b, act SiLU ("swiglu": timm's
# SwiGLUPacked fc1) or the tanh GELU ("geglu_tanh": Gemma 4's vision MLP)
# --------------------------------------------------------------------------------------------
# (M, K, H, bias, layout): H off the tile width (37, 20) and on it (96, 192); every layout of CASES
SWIGLU_CASES = [(394, 100, 37, True, "transposed"), (17, 64, 96, False, "sliced"), (1, 48, 20, True, "2d"),
                (197, 96, 192, True, "3d"), (17, 100, 37, True, "colmajor")]
GATED = ["swiglu", "geglu_tanh"]


def gated64(x, w, b, act="swiglu"):
    d = lambda t: None if t is None else t.detach().to("cpu", torch.float64)
    return reference.gated(reference.linear(d(x), d(w), d(b)), act)


def test_gated_reference_is_the_definition():
    h = torch.randn(3, 10, dtype=torch.float64)
    gate, up = h[:, :5], h[:, 5:]
    torch.testing.assert_close(reference.gated(h, "swiglu"), gate * torch.sigmoid(gate) * up)
    tanh_gelu = 0.5 * gate * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (gate + 0.044715 * gate ** 3)))
    torch.testing.assert_close(reference.gated(h, "geglu_tanh"), tanh_gelu * up)
    with pytest.raises(ValueError, match="activation must be 'swiglu' or 'geglu_tanh', got 'gelu'"):
        reference.gated(h, "gelu")


@pytest.mark.parametrize("variant", ["tiled", "persistent"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,H,bias,layout,act", [(*c, "swiglu") for c in SWIGLU_CASES] +
                         [(*c, "geglu_tanh") for c in SWIGLU_CASES[:3]])
def test_swiglu_kernel(M, K, H, bias, layout, act, dtype, device, variant):
    """The gate and up columns of each output column in one tile: equal to the float64 GEMM and gating, within
    2x eager's error in the dtype (which rounds the [M, 2H] product before gating); every output written."""
    x, w, b, _ = make_inputs(M, K, 2 * H, bias, False, layout, dtype, device)
    out = poisoned((*x.shape[:-1], H), dtype, device)
    y = linear_kernels.linear(x, w, b, activation=act, out=out, variant=variant)
    assert y.data_ptr() == out.data_ptr()
    assert_close(y, gated64(x, w, b, act), dtype=dtype, eager=reference.gated(reference.linear(x, w, b), act))


@pytest.mark.parametrize("act", GATED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_linear_swiglu(dtype, act, device, monkeypatch):
    """ops.linear(activation='swiglu' / 'geglu_tanh') on the Triton path and (CPU tensors without the interpreter)
    on torch's; in training, the GEMM and the gating apart, with gradients equal to float64 autograd."""
    x, w, b, _ = make_inputs(197, 96, 2 * 48, True, False, "3d", dtype, device)
    want = gated64(x, w, b, act)
    assert_close(ops.linear(x, w, b, activation=act), want, dtype=dtype,
                 eager=reference.gated(reference.linear(x, w, b), act))
    if device == "cpu":
        monkeypatch.setattr(ops, "INTERPRET", False)
        assert_close(ops.linear(x, w, b, activation=act), want, dtype=dtype,
                     eager=reference.gated(reference.linear(x, w, b), act), name="torch path")
        monkeypatch.undo()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = ops.linear(*leaves, activation=act)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    leaves64 = [t.detach().cpu().double().requires_grad_(True) for t in (x, w, b)]
    (reference.gated(reference.linear(*leaves64), act) * weights.cpu().double()).sum().backward()
    assert_close(y, want, dtype=dtype, name="training output")
    for name, t, t64 in zip(("dx", "dw", "db"), leaves, leaves64):
        assert_close(t.grad, t64.grad, dtype=dtype, tol=MODEL_TOLERANCE.get(dtype), name=name)


@pytest.mark.parametrize("act", GATED)
def test_swiglu_op_under_autograd_and_opcheck(act, device):
    """The custom op itself (torch.ops callers, torch.compile): its fake shape [..., N / 2] and its backward
    (z rebuilt with one GEMM, the gating's derivative written out) through opcheck and gradcheck in float64."""
    x, w, b, _ = make_inputs(6, 20, 12, True, False, "3d", torch.float32, device)
    for t in (x, w, b):
        t.requires_grad_(True)
    torch.library.opcheck(ops._linear_op, (x, w, b, act, None, None))
    d = [t.detach().cpu().double().requires_grad_(True) for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda *a: ops._linear_op(*a, act, None, None), d)


def test_swiglu_bad_input():
    x, w, b = _good()
    with pytest.raises(ValueError, match=r"weight: activation='swiglu' needs an even row count .*got 7"):
        ops.linear(x, w[:7], b[:7], activation="swiglu")
    with pytest.raises(ValueError, match=r"activation='geglu_tanh': expected no residual or scale"):
        ops.linear(x, w, b, activation="geglu_tanh", residual=torch.randn(2, 5, 8), scale=torch.ones(8))
    with pytest.raises(ValueError, match=r"activation='swiglu': expected no residual, scale, preact .*'tma'"):
        linear_kernels.linear(x, w, b, activation="swiglu", variant="tma")
    with pytest.raises(ValueError, match=r"out: expected shape \[2, 5, 4\], got \[2, 5, 8\]"):
        linear_kernels.linear(x, w, b, activation="geglu_tanh", out=torch.empty(2, 5, 8))
    with pytest.raises(ValueError, match=r"activation: expected one of .* \(the gated ones' backward is ops'\), "
                                         r"got 'geglu_tanh'"):
        linear_kernels.linear_backward(torch.randn(2, 4), torch.randn(2, 4), w[:4], None, "geglu_tanh")


@pytest.mark.parametrize("act", GATED)
def test_swiglu_cublas_path_and_dispatch_key(act):
    """The dispatch's non-Triton form (F.linear, then the gating), and the key that keeps the TMA form out."""
    x, w, b, _ = make_inputs(17, 64, 48, True, False, "3d", torch.float32, "cpu")
    assert_close(ops._linear_cublas(x, w, b, act, None), gated64(x, w, b, act), dtype=torch.float32)
    assert ops._linear_key(x, w, b, act, None)[-1] is False
