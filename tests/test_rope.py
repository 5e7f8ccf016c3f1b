"""Rotary position embedding on the packed qkv (kernels/rope.py, vitfast.ops.rope_qkv) and DINOv3's tables.

Results are compared with vitfast.reference in float64 (and eager PyTorch in the same dtype); without CUDA
the kernel runs in Triton's interpreter. Each case also checks that the rotation moved the values, so that
it is what is being tested.
"""

import math

import pytest
import torch

import vitfast.ops as ops
from vitfast import reference
from vitfast.testing import assert_close, forbid_reference


def tables(n_rope: int, head_dim: int, dtype=torch.float32, device="cpu"):
    angles = torch.rand(n_rope, head_dim // 2, dtype=torch.float64, device=device) * 2 * math.pi
    return angles.cos().to(dtype), angles.sin().to(dtype)


def full_tables(n_rope: int, head_dim: int, dtype=torch.float32, device="cpu"):
    """Tables of D columns: an angle per element (V-JEPA 2's layout), x1's columns then x2's."""
    return tables(n_rope, 2 * head_dim, dtype, device)


def hf_rotate_half(x, cos, sin):
    """Hugging Face's DINOv3 formula with full [N, D] tables: x · cos + rotate_half(x) · sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.tile(2) + torch.cat([-x2, x1], dim=-1) * sin.tile(2)


def test_apply_rope_is_hf_rotate_half_on_the_last_tokens():
    x = torch.randn(2, 3, 9, 16, dtype=torch.float64)
    cos, sin = tables(5, 16, torch.float64)
    out = reference.apply_rope(x, cos, sin)
    assert torch.equal(out[..., :4, :], x[..., :4, :])                     # prefix tokens untouched
    torch.testing.assert_close(out[..., 4:, :], hf_rotate_half(x[..., 4:, :], cos, sin), rtol=0, atol=1e-14)
    torch.testing.assert_close(reference.apply_rope(out, cos, sin, inverse=True), x, rtol=0, atol=1e-14)


def test_dinov3_tables_follow_the_definition():
    """Patch centres in [-1, 1], frequencies 1 / 100^(4i / D), the row coordinate's angles first."""
    gh, gw, D = 3, 5, 16
    cos, sin = reference.dinov3_rope((gh, gw), D, 100.0, torch.float64)
    assert cos.shape == sin.shape == (gh * gw, D // 2)
    freqs = 100.0 ** (-torch.arange(D // 4, dtype=torch.float64) * 4 / D)
    for idx in (0, 7, gh * gw - 1):
        i, j = divmod(idx, gw)
        y, x = (i + 0.5) / gh * 2 - 1, (j + 0.5) / gw * 2 - 1
        want = torch.cat([2 * math.pi * y * freqs, 2 * math.pi * x * freqs])
        torch.testing.assert_close(cos[idx], want.cos(), rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[idx], want.sin(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="head_dim: DINOv3's RoPE needs a multiple of 4, got 6"):
        reference.dinov3_rope((2, 2), 6)


# (B, N, H, D, N_rope, layout): with and without prefix tokens (class, registers), head dims with padded halves
# (80 -> 40 in a 64-wide block, 30 -> 15 in 16), token counts over several token blocks.
CASES = [
    (2, 21, 2, 64, 16, "contiguous"),     # class + 4 registers before 16 patches
    (1, 12, 3, 80, 12, "contiguous"),     # no prefix
    (2, 7, 1, 30, 6, "sliced"),           # class token, odd half
    (1, 300, 2, 8, 299, "sliced"),        # several token blocks of a small head
]


def packed(B, N, H, D, layout, dtype, device="cpu"):
    """qkv [B, N, 3·H·D]; "sliced": a view into wider rows (a token stride larger than 3·C)."""
    if layout == "sliced":
        return torch.randn(B, N, 3 * H * D + 8, device=device).to(dtype)[..., 4:4 + 3 * H * D]
    return torch.randn(B, N, 3 * H * D, device=device).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[1]}-D{c[3]}-rope{c[4]}-{c[5]}")
def test_rope_qkv_equals_reference(case, dtype, device):
    B, N, H, D, n_rope, layout = case
    qkv = packed(B, N, H, D, layout, dtype, device)
    cos, sin = tables(n_rope, D, device=device)
    out = ops.rope_qkv(qkv, H, cos, sin)
    assert out.shape == qkv.shape and out.dtype == dtype and out.is_contiguous()
    ref64 = reference.rope_qkv(qkv.double(), H, cos.double(), sin.double())
    assert_close(out, ref64, eager=reference.rope_qkv(qkv, H, cos, sin))
    C = H * D
    prefix = N - n_rope
    assert torch.equal(out[:, :prefix], qkv[:, :prefix])                       # prefix tokens as they were
    assert torch.equal(out[..., 2 * C:], qkv[..., 2 * C:])                     # v as it was
    moved = (out[:, prefix:, :2 * C].float() - qkv[:, prefix:, :2 * C].float()).abs().max()
    assert moved > 0.1                                                         # q and k rotated


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"N{c[1]}-D{c[3]}-rope{c[4]}-{c[5]}")
def test_rope_qkv_cpu_path_equals_reference(case, dtype, monkeypatch):
    """CPU tensors without the interpreter: torch, one copy of qkv rotated in place through a view."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    B, N, H, D, n_rope, layout = case
    qkv = packed(B, N, H, D, layout, dtype)
    before = qkv.clone()
    cos, sin = tables(n_rope, D)
    out = ops.rope_qkv(qkv, H, cos, sin)
    assert torch.equal(qkv, before) and out.is_contiguous()                   # the input is not touched
    assert_close(out, reference.rope_qkv(qkv.double(), H, cos.double(), sin.double()),
                 eager=reference.rope_qkv(qkv, H, cos, sin))
    back = reference.torch_rope_qkv(out, H, cos, sin, inverse=True)           # the backward's rotation
    assert_close(back, qkv.double(), dtype=dtype, name="inverse")


@pytest.mark.parametrize("interpret", [True, False], ids=["kernel", "cpu_path"])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"N{c[1]}-D{c[3]}-rope{c[4]}-{c[5]}")
def test_rope_qkv_in_place_rotates_qkv_itself(case, interpret, monkeypatch):
    """inplace=True with nothing to differentiate: qkv itself holds the rotation, the same values as out of
    place; the memory around a strided qkv is untouched. With a gradient to record, a new tensor instead."""
    monkeypatch.setattr(ops, "INTERPRET", interpret and ops.INTERPRET)
    B, N, H, D, n_rope, layout = case
    base = torch.randn(B, N, 3 * H * D + 8)
    qkv = base[..., 4:4 + 3 * H * D] if layout == "sliced" else base[..., :3 * H * D].contiguous()
    cos, sin = tables(n_rope, D)
    want = ops.rope_qkv(qkv, H, cos, sin)
    around = base.clone()
    out = ops.rope_qkv(qkv, H, cos, sin, inplace=True)
    assert out is qkv and torch.equal(qkv, want)
    if layout == "sliced":
        assert torch.equal(base[..., :4], around[..., :4]) and torch.equal(base[..., -4:], around[..., -4:])
    x = torch.randn(B, N, 3 * H * D, requires_grad=True)
    y = ops.rope_qkv(x, H, cos, sin, inplace=True)
    assert y is not x and y.grad_fn is not None
    with pytest.raises(ValueError, match="inplace: expected a bool, got 1"):
        ops.rope_qkv(x, H, cos, sin, inplace=1)


@pytest.mark.parametrize("full", [False, True], ids=["rotation", "angle_per_element"])
def test_rope_qkv_backward_is_the_transpose_without_the_reference(full, monkeypatch, device):
    """The backward: the inverse rotation, or with tables of D columns (not a rotation) the transpose."""
    B, N, H, D = 2, 13, 2, 32
    qkv = torch.randn(B, N, 3 * H * D, device=device, requires_grad=True)
    cos, sin = (full_tables if full else tables)(N - 1, D, device=device)
    dout = torch.randn(B, N, 3 * H * D, device=device)
    x64 = qkv.detach().double().requires_grad_()
    reference.rope_qkv(x64, H, cos.double(), sin.double()).backward(dout.double())
    forbid_reference(monkeypatch, "rope_qkv", "apply_rope", "rope_halves")
    ops.rope_qkv(qkv, H, cos, sin).backward(dout)
    assert_close(qkv.grad, x64.grad, name="dqkv")


@pytest.mark.parametrize("full", [False, True], ids=["rotation", "angle_per_element"])
def test_rope_qkv_float64_gradcheck_and_opcheck(full):
    qkv = torch.randn(1, 5, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    cos, sin = (full_tables if full else tables)(4, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda x: ops.rope_qkv(x, 2, cos, sin), (qkv,))
    torch.library.opcheck(torch.ops.vitfast.rope_qkv.default, (qkv.detach(), 2, cos, sin, False))


def test_rope_qkv_traces_in_torch_compile():
    qkv = torch.randn(1, 5, 24)
    cos, sin = tables(4, 4)
    fn = torch.compile(lambda x: ops.rope_qkv(x, 2, cos, sin), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(qkv), ops.rope_qkv(qkv, 2, cos, sin))


def test_rope_qkv_refuses_bad_tables_by_name():
    qkv = torch.randn(2, 5, 3 * 2 * 8)
    cos, sin = tables(4, 8)
    bad = [
        (dict(cos=cos.double()), r"cos: expected dtype torch.float32 for a torch.float32 qkv, got torch.float64"),
        (dict(cos=cos[:, :3].contiguous()),
         r"cos: expected shape \[N_rope, D/2\] = \[1..5, 4\] or \[N_rope, D\] = \[1..5, 8\], got \(4, 3\)"),
        (dict(cos=torch.ones(6, 4)), r"cos: expected shape \[N_rope, D/2\] = \[1..5, 4\] or .*, got \(6, 4\)"),
        (dict(cos=torch.ones(4, 8)), r"sin: expected shape \(4, 8\) \(like cos\), got \(4, 4\)"),
        (dict(sin=sin[:3]), r"sin: expected shape \(4, 4\) \(like cos\), got \(3, 4\)"),
        (dict(sin=sin.clone().requires_grad_()), r"sin: expected a table that does not require grad"),
        (dict(cos=cos.to("meta")), r"cos: expected device cpu \(like qkv\), got meta"),
        (dict(sin=None), r"sin: expected a Tensor, got NoneType"),
        (dict(qkv=torch.randn(2, 5, 3 * 2 * 7)), r"qkv: rotary embedding needs an even head dim, got 7"),
        (dict(qkv=torch.randn(2, 5, 3 * 2 * 8).long()), r"qkv: expected dtype in"),
        (dict(num_heads=0), r"num_heads: expected a positive int, got 0"),
    ]
    for change, message in bad:
        args = dict(qkv=qkv, num_heads=2, cos=cos, sin=sin, **{})
        args.update(change)
        with pytest.raises(ValueError, match=message):
            ops.rope_qkv(args["qkv"], args["num_heads"], args["cos"], args["sin"])


def test_full_tables_give_each_element_its_angle():
    """Tables of D columns: out1 = x1·cos₁ − x2·sin₁, out2 = x2·cos₂ + x1·sin₂ (the halves of the tables); equal to
    the D/2 form when the halves agree; inverse=True is the transpose (⟨f(x), y⟩ = ⟨x, fᵀ(y)⟩)."""
    x, y = torch.randn(2, 3, 9, 16, dtype=torch.float64), torch.randn(2, 3, 9, 16, dtype=torch.float64)
    cos, sin = full_tables(5, 16, torch.float64)
    out = reference.apply_rope(x, cos, sin)
    x1, x2 = x[..., 4:, :8], x[..., 4:, 8:]
    want = torch.cat([x1 * cos[:, :8] - x2 * sin[:, :8], x2 * cos[:, 8:] + x1 * sin[:, 8:]], dim=-1)
    torch.testing.assert_close(out[..., 4:, :], want, rtol=0, atol=0)
    assert torch.equal(out[..., :4, :], x[..., :4, :])
    back = reference.apply_rope(y, cos, sin, inverse=True)
    torch.testing.assert_close((out * y).sum(), (x * back).sum(), rtol=1e-12, atol=0)
    half_cos, half_sin = tables(5, 16, torch.float64)
    torch.testing.assert_close(reference.apply_rope(x, half_cos.tile(2), half_sin.tile(2)),
                               reference.apply_rope(x, half_cos, half_sin), rtol=0, atol=0)


@pytest.mark.parametrize("interpret", [True, False], ids=["kernel", "cpu_path"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[1]}-D{c[3]}-rope{c[4]}-{c[5]}")
def test_rope_qkv_full_tables_equal_reference(case, interpret, monkeypatch):
    """Tables of D columns through the kernel (the interpreter) and torch's CPU path, out of place and in place:
    as the float64 reference; the result differs from the D/2 form of either half (so each half is read)."""
    monkeypatch.setattr(ops, "INTERPRET", interpret and ops.INTERPRET)
    B, N, H, D, n_rope, layout = case
    qkv = packed(B, N, H, D, layout, torch.float32)
    cos, sin = full_tables(n_rope, D)
    out = ops.rope_qkv(qkv, H, cos, sin)
    assert_close(out, reference.rope_qkv(qkv.double(), H, cos.double(), sin.double()),
                 eager=reference.rope_qkv(qkv, H, cos, sin))
    for half in (slice(0, D // 2), slice(D // 2, D)):
        other = ops.rope_qkv(qkv, H, cos[:, half].contiguous(), sin[:, half].contiguous())
        assert (other - out).abs().max() > 0.1
    inplace = qkv.clone()
    assert ops.rope_qkv(inplace, H, cos, sin, inplace=True) is inplace and torch.equal(inplace, out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rope_qkv_on_gpu(dtype):
    B, N, H, D = 4, 261, 12, 64                  # ViT-B/16 at 256 px: class, 4 registers and 256 patches
    qkv = torch.randn(B, N, 3 * H * D, device="cuda").to(dtype)
    cos, sin = reference.dinov3_rope((16, 16), D, device="cuda")
    for _ in range(3):                           # the direct launch after two calls gives the same result
        out = ops.rope_qkv(qkv, H, cos, sin)
        assert_close(out, reference.rope_qkv(qkv.double(), H, cos.double(), sin.double()),
                     eager=reference.rope_qkv(qkv, H, cos, sin))
        mine = qkv.clone()
        assert ops.rope_qkv(mine, H, cos, sin, inplace=True) is mine and torch.equal(mine, out)
    cos, sin = full_tables(N - 5, D, device="cuda")                  # an angle per element, forward and backward
    x = qkv.clone().requires_grad_()
    out = ops.rope_qkv(x, H, cos, sin)
    assert_close(out, reference.rope_qkv(qkv.double(), H, cos.double(), sin.double()),
                 eager=reference.rope_qkv(qkv, H, cos, sin))
    dout = torch.randn_like(out)
    out.backward(dout)
    x64 = qkv.double().requires_grad_()
    reference.rope_qkv(x64, H, cos.double(), sin.double()).backward(dout.double())
    assert_close(x.grad, x64.grad, dtype=dtype, name="dqkv")


def head_norms_then_rope(qkv, H, q_weight, k_weight, cos, sin, eps, v_norm):
    """Hugging Face's order in float64 (Gemma 4's and GLM-OCR's attention): each head's RMSNorm (times the weight
    for q and k), then `hf_rotate_half` on q and k of the last tokens."""
    B, N, C3 = qkv.shape
    D = C3 // (3 * H)
    x = qkv.double().view(B, N, 3, H, D)
    rms = lambda t: t / (t.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    q, k = rms(x[:, :, 0]) * q_weight.double(), rms(x[:, :, 1]) * k_weight.double()
    v = rms(x[:, :, 2]) if v_norm else x[:, :, 2]
    n = cos.shape[0]
    c, s = cos.double()[:, None], sin.double()[:, None]
    q = torch.cat([q[:, :N - n], hf_rotate_half(q[:, N - n:], c, s)], 1)
    k = torch.cat([k[:, :N - n], hf_rotate_half(k[:, N - n:], c, s)], 1)
    return torch.stack([q, k, v], 2).reshape(B, N, C3)


@pytest.mark.parametrize("v_norm", [False, True], ids=["qk", "qkv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES + [(2, 10, 3, 72, 10, "contiguous")],
                         ids=lambda c: f"N{c[1]}-D{c[3]}-rope{c[4]}-{c[5]}")
def test_norm_rope_qkv_equals_reference(case, dtype, v_norm, device):
    """The heads' RMSNorms then the rotation, one pass (the kernel; Gemma 4's head dim 72 among the cases): HF's
    order in float64, and the reference's torch form, within the usual tolerance; the norms moved the values."""
    B, N, H, D, n_rope, layout = case
    qkv = packed(B, N, H, D, layout, dtype, device) * 3
    cos, sin = tables(n_rope, D, device=device)
    q_weight, k_weight = (torch.randn(D, device=device).to(dtype) for _ in range(2))
    out = ops.norm_rope_qkv(qkv, H, q_weight, k_weight, cos, sin, eps=1e-5, v_norm=v_norm)
    assert out.shape == qkv.shape and out.dtype == dtype and out.is_contiguous()
    want = head_norms_then_rope(qkv, H, q_weight, k_weight, cos, sin, 1e-5, v_norm)
    weight = torch.stack([q_weight, k_weight])
    assert_close(out, want, eager=reference.torch_norm_rope_qkv(qkv, H, cos, sin, weight, "qkv" if v_norm else "qk",
                                                                1e-5))
    C = H * D
    assert (out[..., :2 * C].float() - ops.rope_qkv(qkv, H, cos, sin)[..., :2 * C].float()).abs().max() > 0.1
    if not v_norm:
        assert torch.equal(out[..., 2 * C:], qkv[..., 2 * C:])                 # v as it was


@pytest.mark.parametrize("interpret", [True, False], ids=["kernel", "cpu_path"])
@pytest.mark.parametrize("v_norm", [False, True], ids=["qk", "qkv"])
def test_norm_rope_qkv_in_place_rewrites_qkv_itself(v_norm, interpret, monkeypatch):
    """inplace=True: qkv itself holds the result, the prefix tokens' norms (and v's with v_norm) included; the
    memory around a strided qkv is untouched."""
    monkeypatch.setattr(ops, "INTERPRET", interpret and ops.INTERPRET)
    B, N, H, D = 2, 9, 2, 16
    base = torch.randn(B, N, 3 * H * D + 8)
    qkv = base[..., 4:4 + 3 * H * D]
    cos, sin = tables(N - 2, D)
    qw, kw = torch.randn(D), torch.randn(D)
    want = ops.norm_rope_qkv(qkv, H, qw, kw, cos, sin, v_norm=v_norm)
    around = base.clone()
    out = ops.norm_rope_qkv(qkv, H, qw, kw, cos, sin, v_norm=v_norm, inplace=True)
    assert out is qkv and torch.equal(qkv, want)
    assert torch.equal(base[..., :4], around[..., :4]) and torch.equal(base[..., -4:], around[..., -4:])
    x = torch.randn(B, N, 3 * H * D, requires_grad=True)
    y = ops.norm_rope_qkv(x, H, qw, kw, cos, sin, inplace=True)
    assert y is not x and y.grad_fn is not None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # the interpreter's numpy on the padded rows' 0 / 0 (eps 0)
@pytest.mark.parametrize("v_norm", [False, True], ids=["qk", "qkv"])
@pytest.mark.parametrize("case", [(2, 13, 2, 24, 12, "contiguous", torch.float32, 1e-6),
                                  (1, 150, 3, 72, 144, "sliced", torch.float16, 0.0),
                                  (3, 5, 1, 8, 5, "contiguous", torch.float32, 1e-5)],
                         ids=lambda c: f"N{c[1]}-D{c[3]}-rope{c[4]}-{c[5]}-{c[6]}-eps{c[7]}")
def test_norm_rope_qkv_backward_equals_float64_autograd(case, v_norm, device, monkeypatch):
    """Gradients of qkv and of both weights: HF's order differentiated in float64, the op's backward without the
    reference (the kernel on the Triton path: rotation back, the norms recomputed; its weights' gradient summed
    over programs, heads and images; padded rows left out even with eps 0). Prefix tokens, Gemma 4's head dim 72
    over several token blocks, a sliced qkv (the forward saves it as it was)."""
    B, N, H, D, n_rope, layout, dtype, eps = case
    qkv = packed(B, N, H, D, layout, dtype, device).requires_grad_()
    qw, kw = (torch.randn(D, device=device).to(dtype).requires_grad_() for _ in range(2))
    cos, sin = tables(n_rope, D, device=device)
    dout = torch.randn(B, N, 3 * H * D, device=device).to(dtype)
    out = ops.norm_rope_qkv(qkv, H, qw, kw, cos, sin, eps=eps, v_norm=v_norm)
    forbid_reference(monkeypatch, "torch_norm_rope_qkv", "apply_rope")
    out.backward(dout)
    monkeypatch.undo()
    x64, qw64, kw64 = (t.detach().double().requires_grad_() for t in (qkv, qw, kw))
    head_norms_then_rope(x64, H, qw64, kw64, cos, sin, eps, v_norm).backward(dout.double())
    for name, got, want in (("dqkv", qkv.grad, x64.grad), ("dq_weight", qw.grad, qw64.grad),
                            ("dk_weight", kw.grad, kw64.grad)):
        assert got.dtype == dtype
        assert_close(got, want, name=name)
    if not v_norm:
        assert torch.equal(qkv.grad[..., 2 * H * D:], dout[..., 2 * H * D:])     # v's gradient passed through


def test_norm_rope_qkv_float64_gradcheck_and_opcheck():
    qkv = torch.randn(1, 5, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    qw, kw = (torch.randn(4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    cos, sin = tables(4, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda x, a, b: ops.norm_rope_qkv(x, 2, a, b, cos, sin, v_norm=True),
                                    (qkv, qw, kw))
    torch.library.opcheck(torch.ops.vitfast.norm_rope_qkv.default,
                          (qkv.detach(), 2, cos, sin, torch.stack([qw, kw]).detach(), "qkv", 1e-6))
    x, w = qkv.detach().float(), torch.stack([qw, kw]).detach().float()         # the kernel's backward op
    torch.library.opcheck(torch.ops.vitfast.norm_rope_qkv_backward.default,
                          (x, torch.randn_like(x), 2, cos.float(), sin.float(), w, "qk", 1e-6))


def test_norm_rope_qkv_backward_traces_in_torch_compile():
    """Forward and backward in one compiled graph (AOT autograd traces the backward op's fake), equal to eager."""
    qkv = torch.randn(2, 6, 3 * 2 * 8, requires_grad=True)
    qw, kw = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    cos, sin = tables(5, 8)
    dout = torch.randn(2, 6, 48)
    fn = lambda x, a, b: ops.norm_rope_qkv(x, 2, a, b, cos, sin, v_norm=True)
    want = torch.autograd.grad(fn(qkv, qw, kw), (qkv, qw, kw), dout)
    got = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(qkv, qw, kw), (qkv, qw, kw),
                              dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_norm_rope_qkv_refuses_bad_weights_by_name():
    qkv = torch.randn(2, 5, 3 * 2 * 8)
    cos, sin = tables(4, 8)
    w = torch.randn(8)
    bad = [
        (dict(q_weight=torch.randn(7)), r"q_weight: expected shape \(8,\) \(the head dim of qkv\), got \(7,\)"),
        (dict(k_weight=w.double()), r"k_weight: expected dtype torch.float32 \(like qkv\) or torch.float32, got "
                                    r"torch.float64"),
        (dict(k_weight=w.to("meta")), r"k_weight: expected device cpu \(like qkv\), got meta"),
        (dict(eps=-1.0), r"eps: expected a finite number >= 0, got -1.0"),
        (dict(v_norm=1), r"v_norm: expected a bool, got 1"),
        (dict(cos=cos.double()), r"cos: expected dtype torch.float32 for a torch.float32 qkv, got torch.float64"),
    ]
    for change, message in bad:
        args = dict(q_weight=w, k_weight=w, cos=cos, sin=sin, eps=1e-6, v_norm=False)
        args.update(change)
        with pytest.raises(ValueError, match=message):
            ops.norm_rope_qkv(qkv, 2, args["q_weight"], args["k_weight"], args["cos"], args["sin"], eps=args["eps"],
                              v_norm=args["v_norm"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_norm_rope_qkv_on_gpu(dtype):
    B, N, H, D = 4, 2520, 16, 72                 # Gemma 4's tower: 2520 patches, 16 heads of 72
    qkv = (torch.randn(B, N, 3 * H * D, device="cuda") * 3).to(dtype)
    cos, sin = tables(N, D, device="cuda")
    qw, kw = (torch.randn(D, device="cuda").to(dtype) for _ in range(2))
    weight = torch.stack([qw, kw])
    for _ in range(3):                           # the direct launch after two calls gives the same result
        out = ops.norm_rope_qkv(qkv, H, qw, kw, cos, sin, v_norm=True)
        assert_close(out, head_norms_then_rope(qkv, H, qw, kw, cos, sin, 1e-6, True),
                     eager=reference.torch_norm_rope_qkv(qkv, H, cos, sin, weight, "qkv", 1e-6))
        mine = qkv.clone()
        assert ops.norm_rope_qkv(mine, H, qw, kw, cos, sin, v_norm=True, inplace=True) is mine
        assert torch.equal(mine, out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_norm_rope_qkv_backward_on_gpu(dtype):
    """The backward kernel at Gemma 4's shape: dqkv and the weights' gradients (summed over 2 x 2520 x 16 rows per
    weight) against float64 autograd of HF's order."""
    B, N, H, D = 2, 2520, 16, 72
    qkv = (torch.randn(B, N, 3 * H * D, device="cuda") * 3).to(dtype).requires_grad_()
    qw, kw = (torch.randn(D, device="cuda").to(dtype).requires_grad_() for _ in range(2))
    cos, sin = tables(N, D, device="cuda")
    dout = torch.randn(B, N, 3 * H * D, device="cuda").to(dtype)
    ops.norm_rope_qkv(qkv, H, qw, kw, cos, sin, v_norm=True).backward(dout)
    x64, qw64, kw64 = (t.detach().double().requires_grad_() for t in (qkv, qw, kw))
    head_norms_then_rope(x64, H, qw64, kw64, cos, sin, 1e-6, True).backward(dout.double())
    for name, got, want in (("dqkv", qkv.grad, x64.grad), ("dq_weight", qw.grad, qw64.grad),
                            ("dk_weight", kw.grad, kw64.grad)):
        assert_close(got, want, name=name)


def test_rope_model_traces_in_torch_compile():
    """A RoPE model compiles in one graph (the tables made in the traced code, the op out of place) and gives
    the eager model's output."""
    import vitfast

    model = vitfast.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                                      pos_embed="none", rope="dinov3", reg_tokens=2, dynamic_img_size=True).eval()
    x = torch.randn(2, 3, 48, 32)
    compiled = torch.compile(model._forward, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_rope_tables_made_under_inference_mode_do_not_reach_training():
    """The model's table cache keeps inference-mode tables apart: a training step after an inference_mode call
    works (autograd cannot save inference tensors) and its gradients flow."""
    import vitfast

    model = vitfast.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                                      pos_embed="none", rope="dinov3")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        first = model.eval()(x)
    out = model.train()(x)
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    torch.testing.assert_close(out.detach(), first, rtol=1e-5, atol=1e-5)
