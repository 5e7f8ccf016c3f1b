"""Flash-style attention (kernels/attention.py, vitfast.ops.attention / attention_qkv).

Every result is compared with vitfast.reference in float64 and with eager PyTorch in the same
dtype (DESIGN.md §4). Without CUDA the kernel runs in Triton's interpreter (fp32 and fp16; its bf16
tl.dot is wrong, so bf16 runs on the GPU only).
"""

import itertools
import math

import pytest
import torch

import vitfast.ops as ops
from vitfast import reference
from vitfast.kernels import attention as attention_kernels
from vitfast.testing import FakeCudaTensor, assert_close, forbid_reference, matmul_tf32, poisoned

INTERP_DTYPES = [torch.float32, torch.float16]

# (B, H, N, D, layout): every N of {1, 2, 17, 50, 197, 257} and D of {16, 32, 64, 80, 96, 128},
# B in {1, 2}, H in {1, 3}, over four memory layouts of q/k/v. The interpreter runs 32 x 32 tiles,
# so 197 and 257 cover several query blocks, full key blocks and a partial last one.
CASES = [
    (1, 1, 1, 16, "contiguous"),
    (2, 3, 2, 32, "bnhd"),
    (1, 3, 17, 80, "sliced"),
    (2, 1, 50, 96, "seq_first"),
    (1, 3, 197, 64, "bnhd"),
    (2, 3, 257, 128, "sliced"),
    (1, 1, 257, 16, "seq_first"),
    (2, 1, 197, 80, "contiguous"),
    (1, 1, 17, 40, "sliced"),         # head dim 32 + 8 (second chunk masked)
    (2, 1, 2, 8, "contiguous"),       # head dim below tl.dot's 16: masked lanes
    (1, 2, 3, 1, "bnhd"),             # head dim 1: one 16-wide chunk, 15 lanes masked
    (1, 1, 17, 144, "seq_first"),     # 128 + 16: the second chunk at tl.dot's minimum
    (1, 1, 5, 200, "sliced"),         # 128 + 128 with 56 lanes masked (beyond ViT sizes, accepted up to 256)
]


def make_heads(B, H, N, D, layout, dtype, device="cpu", scale=1.0):
    """A [B, H, N, D] tensor viewed out of the storage `layout` names (unit-stride last dim)."""
    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype) * scale

    if layout == "contiguous":
        return randn(B, H, N, D)
    if layout == "bnhd":              # the layout of a [B, N, C] projection split into heads
        return randn(B, N, H, D).transpose(1, 2)
    if layout == "seq_first":         # [N, B, H, D] storage
        return randn(N, B, H, D).permute(1, 2, 0, 3)
    if layout == "sliced":            # heads and head dims cut out of a NaN-filled bigger tensor, odd offset
        t = torch.full((B, H + 1, N, D + 8), float("nan"), device=device, dtype=dtype)[:, 1:, :, 3:3 + D]
        return t.copy_(randn(B, H, N, D))
    raise AssertionError(layout)


def out_buffer(shape, layout, dtype, device="cpu"):
    """A NaN-filled output buffer; for "bnhd" a strided [B, N, H, D] one, as the qkv path writes."""
    B, H, N, D = shape
    if layout == "bnhd":
        return poisoned((B, N, H, D), dtype, device).transpose(1, 2)
    return poisoned(shape, dtype, device)


def f64(*ts):
    return [t.detach().to(torch.float64) for t in ts]


def check_attention(q, k, v, out, dtype, scale=None):
    ref = reference.attention(*f64(q, k, v), scale)
    eager = reference.attention(q, k, v, scale)
    assert_close(out, ref, dtype=dtype, eager=eager)


# --------------------------------------------------------------------------------------------
# kernel launcher, poisoned outputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("B,H,N,D,layout", CASES)
def test_attention_kernel(B, H, N, D, layout, dtype, device):
    q, k, v = (make_heads(B, H, N, D, layout, dtype, device) for _ in range(3))
    out = out_buffer((B, H, N, D), layout, dtype, device)
    cls_attn = poisoned((B, H, N), torch.float32, device)
    got = attention_kernels.attention(q, k, v, out=out, cls_attn=cls_attn)
    assert got is out
    check_attention(q, k, v, out, dtype)
    probs = reference.attention_probs(*f64(q, k))[:, :, 0]                # (B, H, N)
    assert_close(cls_attn, probs, dtype=dtype, eager=reference.attention_probs(q, k)[:, :, 0], name="cls_attn")


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_attention_kernel_cross_lengths_and_scale(dtype, device):
    """N_q != N_kv (queries 17, keys 50) and an explicit scale."""
    q = make_heads(2, 3, 17, 64, "bnhd", dtype, device)
    k, v = (make_heads(2, 3, 50, 64, "sliced", dtype, device) for _ in range(2))
    out = poisoned((2, 3, 17, 64), dtype, device)
    attention_kernels.attention(q, k, v, 0.3, out=out)
    check_attention(q, k, v, out, dtype, scale=0.3)


def test_attention_kernel_large_logits_fp16(device):
    """Inputs scaled x30 in fp16: scores in the thousands, exp2 must stay finite."""
    q, k, v = (make_heads(2, 3, 197, 64, "contiguous", torch.float16, device, scale=30.0) for _ in range(3))
    out = poisoned(q.shape, torch.float16, device)
    attention_kernels.attention(q, k, v, out=out)
    assert torch.isfinite(out).all()
    check_attention(q, k, v, out, torch.float16)


def test_head_dim_chunks_reach_tl_dot_at_16_or_more():
    """Every accepted head dim splits into power-of-two chunks of >= 16 (tl.dot's minimum on the GPU,
    which the interpreter does not enforce) that cover it."""
    for d in range(1, attention_kernels.MAX_HEAD_DIM + 1):
        lo, hi = attention_kernels.head_dim_chunks(d)
        assert lo >= 16 and lo & (lo - 1) == 0, (d, lo, hi)
        assert hi == 0 or (hi >= 16 and hi & (hi - 1) == 0), (d, lo, hi)
        assert d <= lo + hi <= attention_kernels.MAX_HEAD_DIM, (d, lo, hi)



@pytest.mark.parametrize("dtype,head_dim,cls,must_drop,must_keep", [
    # (BLOCK_M, BLOCK_N, num_warps, num_stages) measured with sm_90 compiles (ptxas -v):
    (torch.bfloat16, 64, False, [(128, 128, 4, 2)],
     [(128, 64, 4, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 2)]),
    (torch.bfloat16, 80, False, [(128, 64, 4, 2), (128, 128, 4, 2)],
     [(128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 2)]),
    (torch.bfloat16, 128, False, [(128, 64, 4, 2), (128, 128, 8, 4)],
     [(128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)]),
    # The CLS row's column sum needs 4 KiB of scratch with 128 x 128 on 8 warps: 233,472 bytes at 3 stages
    # (Triton 3.6 compile), over the 232,448 a block may have.
    (torch.bfloat16, 128, True, [(128, 128, 8, 3), (128, 128, 8, 4)], [(128, 64, 8, 2), (128, 128, 8, 2)]),
    (torch.bfloat16, 256, False, [(128, 64, 4, 2), (64, 64, 4, 2)], [(64, 32, 8, 2)]),
    (torch.float32, 64, False, [(128, 64, 4, 2)], [(128, 64, 8, 2), (64, 64, 4, 2)]),
    (torch.float32, 128, False, [(128, 64, 8, 3), (128, 64, 4, 2)], [(128, 64, 8, 2)]),
    (torch.float32, 256, False, [(128, 64, 8, 2), (64, 64, 4, 2)], [(64, 32, 8, 2)]),
    # A partly masked head dim (72 = 64 + 16, 8 lanes masked: SigLIP so400m, Gemma 4) spills at 64 x 64 on 4 warps
    # and 128 x 128 on 8, with a key mask at 128 x 64 on 8 too; at 40 (32 + 16) 128 x 64 on 8 still fits the mask.
    (torch.bfloat16, 72, False, [(64, 64, 4, 2), (128, 128, 8, 2)], [(128, 64, 8, 2), (64, 32, 8, 2)]),
    (torch.bfloat16, "72-mask", False, [(128, 64, 8, 2), (64, 64, 4, 2), (128, 128, 8, 2)], [(64, 32, 8, 2)]),
    (torch.bfloat16, "40-mask", False, [(128, 64, 4, 2), (64, 64, 4, 2)], [(128, 64, 8, 2), (64, 32, 8, 2)]),
    # At 88 (64 + 32, 8 lanes masked: BLIP-2's ViT-g, Llama 4's tower) 128 x 64 on 8 warps fits (237-253 registers);
    # with RETURN_CLS it spilled on Triton 3.6 (32 bytes at 255 registers, 2 stages): 64 x 32 then.
    (torch.bfloat16, 88, False, [(64, 64, 4, 2), (128, 128, 8, 2)], [(128, 64, 8, 2), (64, 32, 8, 2)]),
    (torch.bfloat16, 88, True, [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2)], [(64, 32, 8, 2)]),
])
def test_prune_configs_keeps_tiles_that_fit_and_do_not_spill(dtype, head_dim, cls, must_drop, must_keep,
                                                              monkeypatch):
    """On an H100/H200 (227 KiB of shared memory per block): tiles that spill registers (bf16 D=80 with
    BLOCK_M 128 on 4 warps) or need more shared memory than there is (fp32 D=128 with 3 stages) are
    dropped, and every head dim keeps at least one tile that runs (fp32 D=256: 64 x 32 on 8 warps)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = attention_kernels.attention_configs()                 # the GPU autotune space
    monkeypatch.setattr(attention_kernels, "_smem_limit", lambda device: 232448)
    mask = isinstance(head_dim, str)
    head_dim = int(str(head_dim).removesuffix("-mask"))
    d_lo, d_hi = attention_kernels.head_dim_chunks(head_dim)
    kept = attention_kernels._prune_configs(configs, {"q_ptr": FakeCudaTensor(dtype), "N_KV": 197},
                                            HEAD_DIM=head_dim, D_LO=d_lo, D_HI=d_hi, RETURN_CLS=cls, HAS_MASK=mask)
    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept}
    assert not tiles & set(must_drop), f"kept {sorted(tiles)}"
    assert set(must_keep) <= tiles, f"kept {sorted(tiles)}"


# --------------------------------------------------------------------------------------------
# packed qkv path
# --------------------------------------------------------------------------------------------
QKV_CASES = [  # (B, N, H, D, padded): padded = qkv is a slice of a wider [B, N, 3C + 8] buffer
    (1, 1, 1, 16, False),
    (2, 17, 3, 32, True),
    (1, 50, 3, 80, False),
    (2, 197, 3, 64, True),
    (1, 257, 1, 96, False),
]


def make_qkv(B, N, H, D, padded, dtype, device="cpu", scale=1.0):
    """qkv [B, N, 3·H·D]; padded: a view into a [B, N, 3·H·D + 8] buffer whose extra columns are NaN
    (a read past the head dim shows up)."""
    C3 = 3 * H * D
    qkv = torch.randn(B, N, C3, device=device, dtype=dtype) * scale
    if not padded:
        return qkv
    buf = torch.full((B, N, C3 + 8), float("nan"), device=device, dtype=dtype)
    buf[..., :C3] = qkv
    return buf[..., :C3]


def check_qkv(qkv, H, out, cls_attn, dtype):
    ref_out, ref_cls = reference.attention_qkv(qkv.detach().double(), H, return_cls_attn=True)
    eager_out, eager_cls = reference.attention_qkv(qkv.detach(), H, return_cls_attn=True)
    assert_close(out, ref_out, dtype=dtype, eager=eager_out)
    if cls_attn is not None:
        assert_close(cls_attn, ref_cls, dtype=dtype, eager=eager_cls, name="cls_attn")
        sums = cls_attn.double().sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5), f"cls_attn rows sum to {sums}"


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("B,N,H,D,padded", QKV_CASES)
def test_attention_qkv_kernel(B, N, H, D, padded, dtype, device):
    qkv = make_qkv(B, N, H, D, padded, dtype, device)
    out = poisoned((B, N, H * D), dtype, device)
    cls_attn = poisoned((B, H, N), torch.float32, device)
    got, got_cls = attention_kernels.attention_qkv(qkv, H, return_cls_attn=True, out=out, cls_attn=cls_attn)
    assert got is out and got_cls is cls_attn
    check_qkv(qkv, H, out, cls_attn, dtype)


def test_attention_qkv_reads_in_place():
    """q, k, v are views of qkv's storage: the kernel reads the projection where it lies."""
    qkv = make_qkv(2, 5, 3, 16, True, torch.float32)
    for t in attention_kernels.qkv_heads(qkv, 3):
        assert t.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
        assert t.shape == (2, 3, 5, 16) and t.stride(-1) == 1


# --------------------------------------------------------------------------------------------
# public ops (custom ops: dispatch, fake impl, autograd)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_ops_attention(dtype, device):
    q, k, v = (make_heads(2, 3, 50, 80, "bnhd", dtype, device) for _ in range(3))
    out = ops.attention(q, k, v)
    assert out.shape == q.shape and out.dtype == dtype
    check_attention(q, k, v, out, dtype)


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_ops_attention_qkv(dtype, device):
    qkv = make_qkv(2, 65, 3, 32, True, dtype, device)
    out = ops.attention_qkv(qkv, 3)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 65, 96)
    check_qkv(qkv, 3, out, None, dtype)
    out2, cls_attn = ops.attention_qkv(qkv, 3, scale=0.2, return_cls_attn=True)
    assert cls_attn.shape == (2, 3, 65) and cls_attn.dtype == torch.float32
    ref_out, ref_cls = reference.attention_qkv(qkv.double(), 3, 0.2, return_cls_attn=True)
    eager_out, eager_cls = reference.attention_qkv(qkv, 3, 0.2, return_cls_attn=True)
    assert_close(out2, ref_out, dtype=dtype, eager=eager_out)
    assert_close(cls_attn, ref_cls, dtype=dtype, eager=eager_cls, name="cls_attn")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_ops_reference_dtypes_on_cpu(dtype):
    """float64 (always) and bf16 on the CPU take torch's SDPA (vitfast's CPU path), within the dtype's
    tolerance of the float64 reference math."""
    q, k, v = (make_heads(1, 3, 17, 32, "bnhd", dtype) for _ in range(3))
    out = ops.attention(q, k, v)
    assert out.dtype == dtype
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=32 ** -0.5))
    assert_close(out, reference.attention(*f64(q, k, v)), dtype=dtype, eager=reference.attention(q, k, v))
    qkv = make_qkv(2, 17, 3, 32, True, dtype)
    ref_out, ref_cls = reference.attention_qkv(qkv.double(), 3, return_cls_attn=True)
    eager_out, eager_cls = reference.attention_qkv(qkv, 3, return_cls_attn=True)
    out, cls_attn = ops.attention_qkv(qkv, 3, return_cls_attn=True)
    assert out.is_contiguous() and cls_attn.is_contiguous() and cls_attn.dtype == torch.float32
    assert_close(out, ref_out, dtype=dtype, eager=eager_out)
    assert_close(cls_attn, ref_cls, dtype=dtype, eager=eager_cls, name="cls_attn")
    assert torch.equal(ops.attention_qkv(qkv, 3), out)
    torch.library.opcheck(torch.ops.vitfast.attention_qkv, (qkv, 3, 32 ** -0.5, False))


def test_opcheck():
    q, k, v = (make_heads(1, 2, 5, 16, "bnhd", torch.float32) for _ in range(3))
    torch.library.opcheck(torch.ops.vitfast.attention, (q, k, v, 0.25))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.vitfast.attention, (qg, kg, vg, 0.25))
    qkv = make_qkv(1, 5, 2, 16, True, torch.float32)
    for cls in (False, True):
        torch.library.opcheck(torch.ops.vitfast.attention_qkv, (qkv, 2, 0.25, cls))
    torch.library.opcheck(torch.ops.vitfast.attention_qkv, (qkv.detach().requires_grad_(), 2, 0.25, True))


def test_autograd_attention():
    q, k, v = (make_heads(1, 2, 9, 16, "bnhd", torch.float32).requires_grad_() for _ in range(3))
    g = torch.randn(1, 2, 9, 16)
    grads = torch.autograd.grad((ops.attention(q, k, v) * g).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad((reference.attention(q64, k64, v64) * g.double()).sum(), (q64, k64, v64))
    for name, got, want in zip("qkv", grads, ref):
        assert_close(got, want, dtype=torch.float32, name=f"grad {name}")


def test_autograd_attention_qkv_with_cls():
    qkv = make_qkv(2, 9, 2, 16, False, torch.float32).requires_grad_()
    g_out, g_cls = torch.randn(2, 9, 32), torch.randn(2, 2, 9)
    out, cls_attn = ops.attention_qkv(qkv, 2, return_cls_attn=True)
    (grad,) = torch.autograd.grad((out * g_out).sum() + (cls_attn * g_cls).sum(), qkv)
    qkv64 = qkv.detach().double().requires_grad_()
    ref_out, ref_cls = reference.attention_qkv(qkv64, 2, return_cls_attn=True)
    (want,) = torch.autograd.grad((ref_out * g_out.double()).sum() + (ref_cls * g_cls.double()).sum(), qkv64)
    assert_close(grad, want, dtype=torch.float32, name="grad qkv")


# --------------------------------------------------------------------------------------------
# backward (FlashAttention-2 kernels)
# --------------------------------------------------------------------------------------------
def reference_grads(q, k, v, dout, scale=None, key_mask=None, cu_seqlens=None):
    """Gradients of reference.attention in q's dtype (eager) and in float64 (ground truth)."""
    def grads(*ts):
        ts = [t.detach().requires_grad_() for t in ts]
        loss = (reference.attention(*ts[:3], scale, key_mask, cu_seqlens) * ts[3].detach()).sum()
        return torch.autograd.grad(loss, ts[:3])
    return grads(q, k, v, dout), grads(*f64(q, k, v, dout))


# (B, H, N_Q, N_KV, D, layout): N not a multiple of the 16 x 16 interpreter tiles, cross lengths, head
# dims of ViT-H (80 = 64 + 16) and SigLIP-so400m (72: 64 + 16, 8 lanes masked), below 16, and 64.
BWD_CASES = [
    (1, 2, 9, 9, 16, "contiguous"),
    (2, 1, 33, 20, 72, "bnhd"),
    (1, 3, 17, 17, 80, "seq_first"),
    (1, 1, 5, 40, 8, "sliced"),
    (2, 2, 50, 50, 64, "bnhd"),
    (1, 1, 21, 21, 40, "sliced"),      # 32 + 16 with 8 lanes of the second chunk masked
]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("B,H,NQ,NKV,D,layout", BWD_CASES)
def test_attention_backward_kernel(B, H, NQ, NKV, D, layout, dtype):
    q = make_heads(B, H, NQ, D, layout, dtype)
    k, v = (make_heads(B, H, NKV, D, layout, dtype) for _ in range(2))
    lse = poisoned((B, H, NQ), torch.float32)
    out = attention_kernels.attention(q, k, v, lse=lse)
    s = f64(q)[0] @ f64(k)[0].transpose(-1, -2) * D ** -0.5
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0).double()),
                               rtol=1e-5, atol=1e-4 if dtype == torch.float16 else 1e-5)
    dout = make_heads(B, H, NQ, D, layout, dtype)
    dq, dk, dv = (out_buffer(t.shape, layout, dtype) for t in (q, k, v))
    attention_kernels.attention_backward(q, k, v, out, lse, dout, dq=dq, dk=dk, dv=dv)
    eager, want = reference_grads(q, k, v, dout)
    for name, got, e, w in zip(("dq", "dk", "dv"), (dq, dk, dv), eager, want):
        assert_close(got, w, dtype=dtype, eager=e, name=name)


@pytest.mark.parametrize("B,N,H,D", [(2, 11, 3, 16), (1, 20, 2, 80)])
def test_attention_qkv_backward_lands_in_one_packed_gradient(B, N, H, D):
    qkv = make_qkv(B, N, H, D, True, torch.float32)
    lse = poisoned((B, H, N), torch.float32)
    out, _ = attention_kernels.attention_qkv(qkv, H, lse=lse)
    dout = torch.randn_like(out)
    dqkv = poisoned((B, N, 3 * H * D), torch.float32)
    assert attention_kernels.attention_qkv_backward(qkv, out, lse, dout, H, dqkv=dqkv) is dqkv
    x64 = f64(qkv)[0].requires_grad_()
    (want,) = torch.autograd.grad((reference.attention_qkv(x64, H) * dout.double()).sum(), x64)
    x32 = qkv.detach().requires_grad_()
    (eager,) = torch.autograd.grad((reference.attention_qkv(x32, H) * dout).sum(), x32)
    assert_close(dqkv, want, dtype=torch.float32, eager=eager, name="dqkv")



@pytest.mark.parametrize("variant", [None, "key_mask", "varlen"])
@pytest.mark.parametrize("packed", [False, True])
def test_ops_backward_runs_the_kernels_not_the_reference(packed, variant, monkeypatch):
    """ops.attention / attention_qkv under autograd, plain, with a key mask and with packed segments: the
    forward saves q, k, v (or qkv), out and the per-row log-sum-exp, nothing N x N; backward runs the Triton
    kernels (the reference functions, torch's SDPA path included, raise once the forward is done) and equals
    float64 autograd through the reference."""
    B, H, N, D = (1 if variant == "varlen" else 3), 2, 40, 16
    key_mask = make_key_mask(B, N, "prefix") if variant == "key_mask" else None
    cu = make_cu_seqlens([13, 0, 27]) if variant == "varlen" else None
    saved = []
    if packed:
        x = make_qkv(B, N, H, D, False, torch.float32).requires_grad_()
        inputs, fwd = (x,), lambda: ops.attention_qkv(x, H, key_mask=key_mask, cu_seqlens=cu)
        ref = lambda t: reference.attention_qkv(t, H, key_mask=key_mask, cu_seqlens=cu)
    else:
        inputs = tuple(make_heads(B, H, N, D, "bnhd", torch.float32).requires_grad_() for _ in range(3))
        fwd = lambda: ops.attention(*inputs, key_mask=key_mask, cu_seqlens=cu)
        ref = lambda *ts: reference.attention(*ts, key_mask=key_mask, cu_seqlens=cu)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = fwd()
    assert saved and max(torch.Size(s).numel() for s in saved) <= 3 * B * N * H * D    # O(N), no N x N
    assert (B, H, N) in [tuple(s) for s in saved]                                       # the log-sum-exp
    dout = torch.randn_like(out)
    forbid_reference(monkeypatch, "attention", "attention_qkv", "attention_probs", "split_qkv", "torch_attention",
                     "torch_attention_qkv", "segment_ids")
    grads = torch.autograd.grad(out, inputs, dout)
    monkeypatch.undo()
    x64 = [t.detach().double().requires_grad_() for t in inputs]
    want = torch.autograd.grad((ref(*x64) * dout.double()).sum(), x64)
    for got, w in zip(grads, want):
        assert_close(got, w, dtype=torch.float32)


def test_inference_calls_skip_the_lse(monkeypatch):
    """Nothing to differentiate: the kernel stores no log-sum-exp; under autograd it does."""
    seen = []
    real, real_run = attention_kernels.attention, attention_kernels.qkv_run

    def spy(*args, lse=None, **kwargs):
        seen.append(lse)
        return real(*args, lse=lse, **kwargs)

    def spy_run(plan, qkv, lse=None, key_mask=None, cu_seqlens=None):
        seen.append(lse)
        return real_run(plan, qkv, lse, key_mask, cu_seqlens)
    monkeypatch.setattr(attention_kernels, "attention", spy)
    monkeypatch.setattr(attention_kernels, "qkv_run", spy_run)
    qkv = make_qkv(1, 9, 2, 16, False, torch.float32)
    with torch.no_grad():
        ops.attention_qkv(qkv, 2)
        ops.attention(*attention_kernels.qkv_heads(qkv, 2))
    ops.attention_qkv(qkv.requires_grad_(), 2)
    assert len(seen) == 3 and seen[0] is None and seen[1] is None and seen[2].shape == (1, 2, 9)


def test_gradcheck_float64_cpu_path():
    """float64 takes torch's path (SDPA) on any device: its gradients through autograd, checked
    numerically (the CLS row is fp32 by contract: its gradient is checked against the reference in
    test_autograd_attention_qkv_with_cls)."""
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c), (q, k, v))
    qkv = torch.randn(1, 6, 3 * 2 * 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.attention_qkv(t, 2), (qkv,))
    assert torch.autograd.gradcheck(lambda t: ops.attention_qkv(t, 2, return_cls_attn=True)[0], (qkv,))


def test_opcheck_backward_ops():
    q, k, v, dout = (make_heads(1, 2, 9, 16, "bnhd", torch.float32) for _ in range(4))
    out, lse = torch.ops.vitfast.attention(q, k, v, 0.25)
    torch.library.opcheck(torch.ops.vitfast.attention_backward, (q, k, v, out, lse, dout, 0.25))
    qkv = make_qkv(1, 9, 2, 16, False, torch.float32)
    out, _, lse = torch.ops.vitfast.attention_qkv(qkv, 2, 0.25, False)
    torch.library.opcheck(torch.ops.vitfast.attention_qkv_backward, (qkv, out, lse, torch.randn_like(out), 2, 0.25))


# --------------------------------------------------------------------------------------------
# key-padding mask (SigLIP 2 NaFlex: each image's patch sequence padded to the batch's length)
# --------------------------------------------------------------------------------------------
def make_key_mask(B, N, kind, device="cpu"):
    """A torch.bool [B, N] key mask, True = the key takes part:
    - "prefix": the first L keys of each batch element, L cycling through 1, 13, N (NaFlex's padding);
    - "random": each key kept with probability 1/2, at least one per batch element;
    - "tail": only the last quarter of the keys: the first key blocks are wholly masked, so the online
      softmax's running max is still -inf when it meets them;
    - "empty": "random" except the last batch element, whose keys are all masked;
    - "strided": "random" read out of a [N, 2B] buffer (strides (2, 2B): neither contiguous nor unit).
    """
    keys = torch.arange(N, device=device)
    if kind == "prefix":
        lengths = torch.tensor([(1, 13, N)[b % 3] for b in range(B)], device=device).clamp(max=N)
        return keys[None, :] < lengths[:, None]
    if kind == "tail":
        return (keys >= N - N // 4 - 1)[None, :].expand(B, N).clone()
    if kind == "strided":
        mask = torch.rand(N, 2 * B, device=device).t()[::2] < 0.5
        mask[torch.arange(B), torch.randint(N, (B,))] = True
        assert not mask.is_contiguous()
        return mask
    mask = torch.rand(B, N, device=device) < 0.5
    mask[torch.arange(B), torch.randint(N, (B,))] = True
    if kind == "empty":
        mask[-1] = False
    else:
        assert kind == "random", kind
    return mask


def check_mask_zeros(key_mask, cls_attn=None, out=None, dk=None, dv=None, dq=None):
    """What the mask pins exactly: the CLS row is 0 at masked keys; a batch element with no key has zero
    outputs and zero gradients; masked keys get dk = dv = 0."""
    empty = ~key_mask.any(-1)                                                  # (B,)
    if cls_attn is not None:
        assert (cls_attn.masked_select(~key_mask[:, None, :]) == 0).all()
    for name, t in (("out", out), ("dq", dq)):
        if t is not None:
            assert torch.isfinite(t).all() and (t[empty] == 0).all(), f"{name}: rows with no key are not 0"
    for name, t in (("dk", dk), ("dv", dv)):                                    # [B, H, N_kv, D]
        if t is not None:
            assert torch.isfinite(t).all() and (t.masked_select(~key_mask[:, None, :, None]) == 0).all(), name


def masked_lse(q, k, key_mask, scale):
    """Each query row's log-sum-exp over its kept keys, log2 domain, float64; +inf for a row with no key."""
    s = (f64(q)[0] @ f64(k)[0].transpose(-1, -2) * scale).masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


# (B, H, N_Q, N_KV, D, layout, mask, dtype): N_KV 17, 50, 65 (not multiples of a block), prefixes of lengths
# 1, 13 and N, wholly masked leading key blocks, a batch element with no key, a non-contiguous mask,
# cross lengths (one latent query, as the MAP head), head dims 16 to 80 (64 + 16); fp32 and fp16 take turns
# (the mask's code is the same in both, and `make test` runs on two cores).
MASK_CASES = [
    (3, 2, 17, 17, 80, "bnhd", "prefix", torch.float16),
    (3, 1, 50, 50, 64, "contiguous", "prefix", torch.float32),
    (2, 3, 65, 65, 32, "seq_first", "random", torch.float16),
    (1, 2, 65, 65, 16, "sliced", "tail", torch.float32),
    (2, 1, 17, 50, 80, "bnhd", "empty", torch.float16),
    (2, 2, 1, 65, 64, "contiguous", "strided", torch.float32),
]


@pytest.mark.parametrize("B,H,NQ,NKV,D,layout,kind,dtype", MASK_CASES)
def test_attention_kernel_key_mask(B, H, NQ, NKV, D, layout, kind, dtype):
    """The kernel with a mask: output, CLS row and log-sum-exp against the float64 reference math with
    the same mask (NaN-poisoned buffers)."""
    q = make_heads(B, H, NQ, D, layout, dtype)
    k, v = (make_heads(B, H, NKV, D, layout, dtype) for _ in range(2))
    key_mask = make_key_mask(B, NKV, kind)
    out, cls_attn, lse = (out_buffer((B, H, NQ, D), layout, dtype), poisoned((B, H, NKV), torch.float32),
                          poisoned((B, H, NQ), torch.float32))
    attention_kernels.attention(q, k, v, out=out, cls_attn=cls_attn, lse=lse, key_mask=key_mask)
    ref = reference.attention(*f64(q, k, v), key_mask=key_mask)
    assert_close(out, ref, dtype=dtype, eager=reference.attention(q, k, v, key_mask=key_mask))
    probs = reference.attention_probs(*f64(q, k), key_mask=key_mask)[:, :, 0]
    eager = reference.attention_probs(q, k, key_mask=key_mask)[:, :, 0]
    assert_close(cls_attn, probs, dtype=dtype, eager=eager, name="cls_attn")
    check_mask_zeros(key_mask, cls_attn=cls_attn, out=out)
    want = masked_lse(q, k, key_mask, D ** -0.5)
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=1e-4 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("B,H,NQ,NKV,D,layout,kind,dtype", MASK_CASES)
def test_attention_backward_kernel_key_mask(B, H, NQ, NKV, D, layout, kind, dtype):
    """dq, dk, dv with a mask against float64 autograd through the reference math: masked keys get zero
    dk and dv, a batch element with no key zero gradients."""
    q = make_heads(B, H, NQ, D, layout, dtype)
    k, v = (make_heads(B, H, NKV, D, layout, dtype) for _ in range(2))
    key_mask = make_key_mask(B, NKV, kind)
    lse = poisoned((B, H, NQ), torch.float32)
    out = attention_kernels.attention(q, k, v, lse=lse, key_mask=key_mask)
    dout = make_heads(B, H, NQ, D, layout, dtype)
    dq, dk, dv = (out_buffer(t.shape, layout, dtype) for t in (q, k, v))
    attention_kernels.attention_backward(q, k, v, out, lse, dout, dq=dq, dk=dk, dv=dv, key_mask=key_mask)
    eager, want = reference_grads(q, k, v, dout, key_mask=key_mask)
    for name, got, e, w in zip(("dq", "dk", "dv"), (dq, dk, dv), eager, want):
        assert_close(got, w, dtype=dtype, eager=e, name=name)
    check_mask_zeros(key_mask, dq=dq, dk=dk, dv=dv)


def test_attention_qkv_backward_kernel_key_mask_lands_in_one_packed_gradient():
    B, N, H, D = 3, 20, 2, 80
    qkv = make_qkv(B, N, H, D, True, torch.float32)
    key_mask = make_key_mask(B, N, "prefix")
    lse = poisoned((B, H, N), torch.float32)
    out, _ = attention_kernels.attention_qkv(qkv, H, lse=lse, key_mask=key_mask)
    dout = torch.randn_like(out)
    dqkv = poisoned((B, N, 3 * H * D), torch.float32)
    assert attention_kernels.attention_qkv_backward(qkv, out, lse, dout, H, dqkv=dqkv, key_mask=key_mask) is dqkv
    x64 = f64(qkv)[0].requires_grad_()
    (want,) = torch.autograd.grad((reference.attention_qkv(x64, H, key_mask=key_mask) * dout.double()).sum(), x64)
    x32 = qkv.detach().requires_grad_()
    (eager,) = torch.autograd.grad((reference.attention_qkv(x32, H, key_mask=key_mask) * dout).sum(), x32)
    assert_close(dqkv, want, dtype=torch.float32, eager=eager, name="dqkv")
    _, dk, dv = attention_kernels.qkv_heads(dqkv, H)
    check_mask_zeros(key_mask, dk=dk, dv=dv)


# (B, H, N, D, mask) of the public ops; float64 takes torch's path (SDPA with the mask).
OPS_MASK_CASES = [
    (3, 2, 17, 80, "prefix"),
    (2, 1, 50, 32, "empty"),
    (2, 2, 65, 16, "strided"),
]


@pytest.mark.parametrize("dtype", [*INTERP_DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("B,H,N,D,kind", OPS_MASK_CASES)
def test_ops_attention_key_mask(B, H, N, D, kind, dtype):
    """ops.attention with a mask, forward and (dq, dk, dv) under autograd, against the float64 reference
    math; without autograd (the direct path) the same output."""
    key_mask = make_key_mask(B, N, kind)
    q, k, v = (make_heads(B, H, N, D, "bnhd", dtype).requires_grad_() for _ in range(3))
    out = ops.attention(q, k, v, key_mask=key_mask)
    ref = reference.attention(*f64(q, k, v), key_mask=key_mask)
    assert_close(out, ref, dtype=dtype, eager=reference.attention(q, k, v, key_mask=key_mask))
    with torch.no_grad():
        assert torch.equal(ops.attention(q, k, v, key_mask=key_mask), out)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    eager, want = reference_grads(q, k, v, dout, key_mask=key_mask)
    for name, got, e, w in zip(("dq", "dk", "dv"), grads, eager, want):
        assert_close(got, w, dtype=dtype, eager=e, name=name)
    check_mask_zeros(key_mask, out=out, dq=grads[0], dk=grads[1], dv=grads[2])


@pytest.mark.parametrize("dtype", [*INTERP_DTYPES, torch.float64], ids=str)
@pytest.mark.parametrize("B,H,N,D,kind", OPS_MASK_CASES)
def test_ops_attention_qkv_key_mask(B, H, N, D, kind, dtype):
    """ops.attention_qkv with a mask, with and without the CLS row, forward and dqkv under autograd (the
    Triton backward when only out has a gradient; with one through the CLS row too, torch's recompute),
    against the float64 reference math."""
    key_mask = make_key_mask(B, N, kind)
    qkv = make_qkv(B, N, H, D, True, dtype).requires_grad_()
    ref_out, ref_cls = reference.attention_qkv(f64(qkv)[0], H, return_cls_attn=True, key_mask=key_mask)
    eager_out, eager_cls = reference.attention_qkv(qkv.detach(), H, return_cls_attn=True, key_mask=key_mask)
    out = ops.attention_qkv(qkv, H, key_mask=key_mask)
    assert_close(out, ref_out, dtype=dtype, eager=eager_out)
    out2, cls_attn = ops.attention_qkv(qkv, H, return_cls_attn=True, key_mask=key_mask)
    assert cls_attn.dtype == torch.float32 and cls_attn.shape == (B, H, N)
    assert_close(out2, ref_out, dtype=dtype, eager=eager_out)
    assert_close(cls_attn, ref_cls, dtype=dtype, eager=eager_cls, name="cls_attn")
    check_mask_zeros(key_mask, cls_attn=cls_attn, out=out2)
    with torch.no_grad():
        assert torch.equal(ops.attention_qkv(qkv, H, key_mask=key_mask), out)
    g_out, g_cls = torch.randn_like(out), torch.randn(B, H, N)
    x64 = f64(qkv)[0].requires_grad_()
    for with_cls in (False, True):
        if with_cls:
            (got,) = torch.autograd.grad((out2 * g_out).sum() + (cls_attn * g_cls).sum(), qkv)
        else:
            (got,) = torch.autograd.grad(out, qkv, g_out)
        o64, c64 = reference.attention_qkv(x64, H, return_cls_attn=True, key_mask=key_mask)
        loss64 = (o64 * g_out.double()).sum() + (c64 * g_cls.double()).sum() * with_cls
        (want,) = torch.autograd.grad(loss64, x64)
        assert_close(got, want, dtype=dtype, name=f"dqkv (CLS row's gradient: {with_cls})")
        _, dk, dv = (t.transpose(1, 2) for t in got.view(B, N, 3, H, D).unbind(2))       # (B, H, N, D)
        check_mask_zeros(key_mask, dq=got, dk=dk, dv=dv)


def test_ops_key_mask_float64_gradcheck():
    """torch's path with a mask (a batch element with no key included): its gradients, checked numerically."""
    key_mask = make_key_mask(2, 6, "empty")
    q, k, v = (torch.randn(2, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert_close(ops.attention(q, k, v, key_mask=key_mask), reference.attention(q, k, v, key_mask=key_mask))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, key_mask=key_mask), (q, k, v))
    qkv = torch.randn(2, 6, 3 * 2 * 8, dtype=torch.float64, requires_grad=True)
    assert_close(ops.attention_qkv(qkv, 2, key_mask=key_mask), reference.attention_qkv(qkv, 2, key_mask=key_mask))
    assert torch.autograd.gradcheck(lambda t: ops.attention_qkv(t, 2, key_mask=key_mask), (qkv,))


def test_ops_attention_qkv_key_mask_plans(monkeypatch):
    """The Triton path's plan table: a mask of the same strides reuses the plan (new values, right
    results), a mask of other strides or no mask gets its own."""
    monkeypatch.setattr(ops, "_ATTENTION_PLANS", {})
    B, N, H, D = 3, 17, 2, 16
    qkv = make_qkv(B, N, H, D, False, torch.float32)
    masks = [make_key_mask(B, N, "prefix"), make_key_mask(B, N, "random"), make_key_mask(B, N, "strided"), None]
    with torch.no_grad():
        for key_mask in masks:
            out = ops.attention_qkv(qkv, H, key_mask=key_mask)
            assert_close(out, reference.attention_qkv(qkv.double(), H, key_mask=key_mask), dtype=torch.float32)
    assert len(ops._ATTENTION_PLANS) == 3
    assert {key[-2] for key in ops._ATTENTION_PLANS} == {(N, 1), masks[2].stride(), None}


def test_opcheck_key_mask():
    """The custom ops with a mask (forward and backward; a batch element with no key included): schema,
    fake impl, autograd registration."""
    q, k, v, dout = (make_heads(2, 2, 9, 16, "bnhd", torch.float32) for _ in range(4))
    key_mask = make_key_mask(2, 9, "empty")
    torch.library.opcheck(torch.ops.vitfast.attention, (q, k, v, 0.25, key_mask))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.vitfast.attention, (qg, kg, vg, 0.25, key_mask))
    out, lse = torch.ops.vitfast.attention(q, k, v, 0.25, key_mask)
    assert_close(out, reference.attention(*f64(q, k, v), 0.25, key_mask), dtype=torch.float32)
    assert (out[1] == 0).all() and (lse[1] == float("inf")).all()          # batch element 1 has no key
    torch.library.opcheck(torch.ops.vitfast.attention_backward, (q, k, v, out, lse, dout, 0.25, key_mask))
    dq, dk, dv = torch.ops.vitfast.attention_backward(q, k, v, out, lse, dout, 0.25, key_mask)
    check_mask_zeros(key_mask, dq=dq, dk=dk, dv=dv)
    qkv = make_qkv(2, 9, 2, 16, True, torch.float32)
    for cls in (False, True):
        torch.library.opcheck(torch.ops.vitfast.attention_qkv, (qkv, 2, 0.25, cls, key_mask))
    torch.library.opcheck(torch.ops.vitfast.attention_qkv, (qkv.detach().requires_grad_(), 2, 0.25, False, key_mask))
    out, _, lse = torch.ops.vitfast.attention_qkv(qkv, 2, 0.25, False, key_mask)
    assert_close(out, reference.attention_qkv(qkv.double(), 2, 0.25, key_mask=key_mask), dtype=torch.float32)
    torch.library.opcheck(torch.ops.vitfast.attention_qkv_backward,
                          (qkv, out, lse, torch.randn_like(out), 2, 0.25, key_mask))


# --------------------------------------------------------------------------------------------
# packed variable-length segments (cu_seqlens: Qwen2-VL's vision tower packs several images into one
# sequence and attends within each)
# --------------------------------------------------------------------------------------------
# An empty segment, a one-token one, lengths off the interpreter's 32 / 16 blocks, one over a block.
VARLEN_LENGTHS = [17, 0, 40, 1, 33]


def make_cu_seqlens(lengths, device="cpu"):
    """cu_seqlens, int32 [S + 1], of segments of these lengths."""
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def varlen_lse(q, k, cu_seqlens, scale):
    """Each token's log-sum-exp over its own segment's keys, log2 domain, float64 ([1, H, T])."""
    seg = reference.segment_ids(cu_seqlens, q.shape[2])
    s = (f64(q)[0] @ f64(k)[0].transpose(-1, -2) * scale).masked_fill(seg[:, None] != seg[None, :], float("-inf"))
    return torch.logsumexp(s, -1) / math.log(2)


# (H, D, layout, max_seqlen past the longest segment, dtype): ViT-B's and Qwen2-VL's head dims (80 = 64 + 16),
# the packed projection's layout and a strided one inside NaN, the grid sized exactly and larger.
VARLEN_CASES = [
    (2, 64, "bnhd", 0, torch.float32),
    (1, 80, "sliced", 23, torch.float16),
]


@pytest.mark.parametrize("H,D,layout,extra,dtype", VARLEN_CASES, ids=["fp32-d64", "fp16-d80-max+23"])
def test_attention_kernels_varlen(H, D, layout, extra, dtype):
    """Forward (out, per-token lse) and backward (dq, dk, dv) with cu_seqlens against float64 autograd
    through the reference's block-diagonal math, NaN-poisoned buffers (every row is written)."""
    cu = make_cu_seqlens(VARLEN_LENGTHS)
    T, max_seqlen = int(cu[-1]), max(VARLEN_LENGTHS) + extra
    q, k, v, dout = (make_heads(1, H, T, D, layout, dtype) for _ in range(4))
    out, lse = out_buffer((1, H, T, D), layout, dtype), poisoned((1, H, T), torch.float32)
    attention_kernels.attention(q, k, v, out=out, lse=lse, cu_seqlens=cu, max_seqlen=max_seqlen)
    ref = reference.attention(*f64(q, k, v), cu_seqlens=cu)
    assert_close(out, ref, dtype=dtype, eager=reference.attention(q, k, v, cu_seqlens=cu))
    torch.testing.assert_close(lse.double(), varlen_lse(q, k, cu, D ** -0.5), rtol=1e-5,
                               atol=1e-4 if dtype == torch.float16 else 1e-5)
    dq, dk, dv = (out_buffer(t.shape, layout, dtype) for t in (q, k, v))
    attention_kernels.attention_backward(q, k, v, out, lse, dout, dq=dq, dk=dk, dv=dv, cu_seqlens=cu,
                                         max_seqlen=max_seqlen)
    eager, want = reference_grads(q, k, v, dout, cu_seqlens=cu)
    for name, got, e, w in zip(("dq", "dk", "dv"), (dq, dk, dv), eager, want):
        assert_close(got, w, dtype=dtype, eager=e, name=name)


def test_attention_qkv_kernels_varlen_equal_each_segment_alone():
    """On the packed projection [1, T, 3·C]: out, lse and dqkv (written into one given buffer) with
    cu_seqlens equal, bit for bit, the non-varlen kernels run on each segment's slice alone; and the float64
    reference."""
    H, D = 2, 80
    cu = make_cu_seqlens(VARLEN_LENGTHS)
    T = int(cu[-1])
    qkv = make_qkv(1, T, H, D, True, torch.float32)
    lse = poisoned((1, H, T), torch.float32)
    out, _ = attention_kernels.attention_qkv(qkv, H, lse=lse, cu_seqlens=cu)     # max_seqlen read from cu
    dout = torch.randn_like(out)
    dqkv = poisoned((1, T, 3 * H * D), torch.float32)
    assert attention_kernels.attention_qkv_backward(qkv, out, lse, dout, H, dqkv=dqkv, cu_seqlens=cu,
                                                    max_seqlen=50) is dqkv
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if end > start:
            seg = slice(start, end)
            lse_seg = poisoned((1, H, end - start), torch.float32)
            out_seg, _ = attention_kernels.attention_qkv(qkv[:, seg], H, lse=lse_seg)
            dqkv_seg = attention_kernels.attention_qkv_backward(qkv[:, seg], out_seg, lse_seg, dout[:, seg], H)
            assert torch.equal(out[:, seg], out_seg) and torch.equal(lse[:, :, seg], lse_seg), (start, end)
            assert torch.equal(dqkv[:, seg], dqkv_seg), (start, end)
    x64 = f64(qkv)[0].requires_grad_()
    ref = reference.attention_qkv(x64, H, cu_seqlens=cu)
    assert_close(out, ref, dtype=torch.float32)
    (want,) = torch.autograd.grad((ref * dout.double()).sum(), x64)
    assert_close(dqkv, want, dtype=torch.float32, name="dqkv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_ops_attention_varlen(dtype, monkeypatch):
    """ops.attention and ops.attention_qkv with cu_seqlens, forward and gradients under autograd, against float64
    autograd through the reference; without autograd (the direct path) the same output. fp32 runs the Triton
    kernels (attention_qkv's plan table: one plan per segment count and max_seqlen, boundaries passed per call),
    float64 torch's path (SDPA per segment)."""
    monkeypatch.setattr(ops, "_ATTENTION_PLANS", {})
    H, D = 2, 16
    cu = make_cu_seqlens(VARLEN_LENGTHS)
    T = int(cu[-1])
    q, k, v = (make_heads(1, H, T, D, "bnhd", dtype).requires_grad_() for _ in range(3))
    out = ops.attention(q, k, v, cu_seqlens=cu)
    assert_close(out, reference.attention(*f64(q, k, v), cu_seqlens=cu), dtype=dtype,
                 eager=reference.torch_attention(q, k, v, cu_seqlens=cu))
    dout = torch.randn_like(out)
    eager, want = reference_grads(q, k, v, dout, cu_seqlens=cu)
    for name, got, e, w in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout), eager, want):
        assert_close(got, w, dtype=dtype, eager=e, name=name)
    qkv = make_qkv(1, T, H, D, True, dtype).requires_grad_()
    x64 = f64(qkv)[0].requires_grad_()
    ref = reference.attention_qkv(x64, H, cu_seqlens=cu)
    out = ops.attention_qkv(qkv, H, cu_seqlens=cu, max_seqlen=45)
    assert_close(out, ref, dtype=dtype, eager=reference.torch_attention_qkv(qkv.detach(), H, cu_seqlens=cu))
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, g)
    (want,) = torch.autograd.grad((ref * g.double()).sum(), x64)
    assert_close(got, want, dtype=dtype, name="dqkv")
    with torch.no_grad():
        assert torch.equal(ops.attention_qkv(qkv, H, cu_seqlens=cu, max_seqlen=45), out)
        assert torch.equal(ops.attention_qkv(qkv, H, cu_seqlens=cu), out)           # max_seqlen 40, read from cu
        other = make_cu_seqlens([45, 1, 0, 20, 25])                 # the same segment count and max_seqlen
        assert_close(ops.attention_qkv(qkv, H, cu_seqlens=other, max_seqlen=45),
                     reference.attention_qkv(x64, H, cu_seqlens=other), dtype=dtype)
    if dtype == torch.float32:      # (segment count, max_seqlen): 45 with and without lse, 40 without
        assert sorted(key[-3] for key in ops._ATTENTION_PLANS) == [(6, 40), (6, 45), (6, 45)]


def test_ops_varlen_float64_gradcheck():
    """torch's path with cu_seqlens (an empty and a one-token segment included): its gradients, checked
    numerically."""
    cu = make_cu_seqlens([4, 0, 1, 5])
    q, k, v = (torch.randn(1, 2, 10, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert_close(ops.attention(q, k, v, cu_seqlens=cu), reference.attention(q, k, v, cu_seqlens=cu))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.attention(a, b, c, cu_seqlens=cu), (q, k, v))
    qkv = torch.randn(1, 10, 3 * 2 * 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.attention_qkv(t, 2, cu_seqlens=cu, max_seqlen=5), (qkv,))


def test_opcheck_varlen():
    """The custom ops with cu_seqlens (forward and backward; max_seqlen given, and left to the op): schema,
    fake impl, autograd registration."""
    cu = make_cu_seqlens([4, 0, 5])
    q, k, v, dout = (make_heads(1, 2, 9, 16, "bnhd", torch.float32) for _ in range(4))
    torch.library.opcheck(torch.ops.vitfast.attention, (q, k, v, 0.25, None, cu, 5))
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.vitfast.attention, (qg, kg, vg, 0.25, None, cu, None))
    out, lse = torch.ops.vitfast.attention(q, k, v, 0.25, None, cu, 5)
    assert_close(out, reference.attention(*f64(q, k, v), 0.25, cu_seqlens=cu), dtype=torch.float32)
    torch.library.opcheck(torch.ops.vitfast.attention_backward, (q, k, v, out, lse, dout, 0.25, None, cu, 5))
    qkv = make_qkv(1, 9, 2, 16, True, torch.float32)
    torch.library.opcheck(torch.ops.vitfast.attention_qkv, (qkv.detach().requires_grad_(), 2, 0.25, False, None, cu, 5))
    out, _, lse = torch.ops.vitfast.attention_qkv(qkv, 2, 0.25, False, None, cu, None)
    assert_close(out, reference.attention_qkv(qkv.double(), 2, 0.25, cu_seqlens=cu), dtype=torch.float32)
    torch.library.opcheck(torch.ops.vitfast.attention_qkv_backward,
                          (qkv, out, lse, torch.randn_like(out), 2, 0.25, None, cu, 5))


def test_ops_attention_qkv_varlen_traces_in_one_graph():
    """torch.compile(fullgraph=True) traces ops.attention_qkv with cu_seqlens, max_seqlen given (a new value
    per batch: traced again as a symbolic int) and left to the op (which reads it from the boundaries when it
    runs): no graph break, the eager output."""
    H, D = 2, 16
    qkv = make_qkv(1, 20, H, D, False, torch.float32)
    given = torch.compile(lambda x, cu, m: ops.attention_qkv(x, H, cu_seqlens=cu, max_seqlen=m), fullgraph=True,
                          backend="eager")
    left = torch.compile(lambda x, cu: ops.attention_qkv(x, H, cu_seqlens=cu), fullgraph=True, backend="eager")
    for lengths in ([8, 12], [5, 0, 15]):
        cu = make_cu_seqlens(lengths)
        eager = ops.attention_qkv(qkv, H, cu_seqlens=cu)
        torch.testing.assert_close(given(qkv, cu, max(lengths)), eager, rtol=0, atol=0)
        torch.testing.assert_close(left(qkv, cu), eager, rtol=0, atol=0)


def test_varlen_max_seqlen_is_not_read_during_cuda_graph_capture(monkeypatch):
    """max_seqlen=None on CUDA reads the device; while a graph is being captured that is refused, by name."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    cu = FakeCudaTensor(torch.int32)
    with pytest.raises(ValueError, match=r"max_seqlen: expected an int while a CUDA graph is being captured"):
        ops._max_seqlen(cu, None)
    assert ops._max_seqlen(cu, 7) == 7


# --------------------------------------------------------------------------------------------
# SAM's decomposed relative positions (rel_pos)
# --------------------------------------------------------------------------------------------
def make_rel_pos(B, H, KH, KW, dtype=torch.float32, device="cpu", scale=2.0):
    return (torch.randn(B, H, KH * KW, KH, device=device).to(dtype) * scale,
            torch.randn(B, H, KH * KW, KW, device=device).to(dtype) * scale)


# (B, H, KH, KW, D): a grid not square (5 x 7: row and column of key j differ), a SAM window (14 x 14: 196 keys, a
# partial last block), ViT-H's head dim (80 = 64 + 16), one row, one column; grids whose rows are whole key blocks
# (the interpreter's are 32 keys: 32 wide, one block per row, rel_w's tile loaded once; 64 wide, two blocks per row).
REL_CASES = [(2, 3, 5, 7, 16), (1, 2, 14, 14, 64), (1, 1, 6, 11, 80), (2, 2, 1, 9, 32), (1, 2, 9, 1, 32),
             (2, 2, 3, 32, 16), (1, 2, 3, 64, 16)]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("B,H,KH,KW,D", REL_CASES)
def test_ops_attention_qkv_rel_pos(B, H, KH, KW, D, dtype, device):
    """score(i, j) + rel_h[i, j // KW] + rel_w[i, j % KW] in the kernel: the float64 reference with the N x N bias,
    and eager SDPA with that bias in the dtype (HF's SDPA path); the terms moved the output."""
    N = KH * KW
    qkv = make_qkv(B, N, H, D, True, dtype, device, scale=2.0)
    rel_h, rel_w = make_rel_pos(B, H, KH, KW, dtype, device)
    out = ops.attention_qkv(qkv, H, rel_pos=(rel_h, rel_w))
    assert out.shape == (B, N, H * D) and out.dtype == dtype
    ref = reference.attention_qkv(qkv.double(), H, rel_pos=(rel_h.double(), rel_w.double()))
    eager = reference.attention_qkv(qkv, H, rel_pos=(rel_h, rel_w))
    assert_close(out, ref, dtype=dtype, eager=eager)
    assert (ref - reference.attention_qkv(qkv.double(), H)).abs().max() > 0.1
    empty = ops.attention_qkv(qkv[:0], H, rel_pos=(rel_h[:0], rel_w[:0]))               # an empty batch
    assert empty.shape == (0, N, H * D)


def test_ops_attention_qkv_rel_pos_cpu_path_and_gradients(monkeypatch):
    """torch's path (SDPA with the bias) equals the reference; gradients of qkv, rel_h and rel_w equal float64
    autograd, on the kernels' path (FlashAttention-2's backward with the terms, the reference never called) and on
    torch's (SDPA's backward on the recomputed forward)."""
    B, H, KH, KW, D = 2, 2, 4, 5, 16
    qkv = make_qkv(B, KH * KW, H, D, True, torch.float32, "cpu", scale=2.0)
    rel = make_rel_pos(B, H, KH, KW)
    x64, h64, w64 = (t.double().requires_grad_() for t in (qkv, *rel))
    ref = reference.attention_qkv(x64, H, rel_pos=(h64, w64))
    dout = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x64, h64, w64), dout)
    for interpret in (True, False):
        monkeypatch.setattr(ops, "INTERPRET", interpret and ops.INTERPRET)
        x, h, w = (t.clone().requires_grad_() for t in (qkv, *rel))
        out = ops.attention_qkv(x, H, rel_pos=(h, w))
        assert_close(out, ref.detach())
        if interpret:
            forbid_reference(monkeypatch, "attention_qkv", "torch_attention_qkv", "attention_probs", "rel_pos_bias")
        grads = torch.autograd.grad(out, (x, h, w), dout.float())
        monkeypatch.undo()
        for name, g, g64 in zip(("dqkv", "drel_h", "drel_w"), grads, want):
            assert_close(g, g64, name=name)


def test_ops_attention_qkv_rel_pos_float64_gradcheck_opcheck_and_compile():
    qkv = torch.randn(1, 6, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    rel_h, rel_w = (t.double().requires_grad_() for t in make_rel_pos(1, 2, 2, 3))
    assert torch.autograd.gradcheck(lambda x, h, w: ops.attention_qkv(x, 2, rel_pos=(h, w)), (qkv, rel_h, rel_w))
    x, h, w = (t.detach().float() for t in (qkv, rel_h, rel_w))
    torch.library.opcheck(torch.ops.vitfast.attention_qkv_rel_pos.default, (x, h, w, 2, 0.5))
    out, lse = torch.ops.vitfast.attention_qkv_rel_pos(x, h, w, 2, 0.5)
    torch.library.opcheck(torch.ops.vitfast.attention_qkv_rel_pos_backward.default,
                          (x, h, w, out, lse, torch.randn_like(out), 2, 0.5))
    fn = lambda a, b, c: ops.attention_qkv(a, 2, rel_pos=(b, c))
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, h, w), fn(x, h, w))


def test_attention_kernel_rel_pos_plan_and_buffers():
    """The plan of a rel_pos launch (kernels/attention.py qkv_plan / qkv_run) gives the kernel's result; the kernel's
    own checks name the bad terms."""
    B, H, KH, KW, D = 2, 2, 3, 5, 16
    qkv = make_qkv(B, KH * KW, H, D, True, torch.float32, "cpu")
    rel = make_rel_pos(B, H, KH, KW)
    plan = attention_kernels.qkv_plan(qkv, H, D ** -0.5, False, False, rel_kh_kw=(KH, KW))
    out, cls_attn = attention_kernels.qkv_run(plan, qkv, rel_pos=rel)
    assert cls_attn is None
    assert_close(out, reference.attention_qkv(qkv.double(), H, rel_pos=tuple(t.double() for t in rel)))
    q, k, v = attention_kernels.qkv_heads(qkv, H)
    with pytest.raises(ValueError, match=r"rel_w: expected a contiguous \[2, 2, 15, K\] torch.float32 tensor"):
        attention_kernels.attention(q, k, v, rel_pos=(rel[0], rel[1].half()))
    with pytest.raises(ValueError, match=r"rel_pos: expected a key grid of KH x KW = N_KV = 15 keys, got 3 x 4"):
        attention_kernels.attention(q, k, v, rel_pos=(rel[0], rel[1][..., :4].contiguous()))


# --------------------------------------------------------------------------------------------
# A dense additive bias (attn_bias: BEiT's relative position bias)
# --------------------------------------------------------------------------------------------
def make_bias(B, H, N, dtype=torch.float32, device="cpu", scale=2.0):
    """[B, H, N, N] scores of the size of a trained BEiT's (a few units), or [H, N, N] with B None."""
    return (torch.randn(*((H, N, N) if B is None else (B, H, N, N)), device=device) * scale).to(dtype)


# (B, H, N, D, bias batch, key mask): one bias for the batch ([H, N, N]) over a partial last key block, ViT-H's head
# dim (80 = 64 + 16), a bias per image, a shared [1, H, N, N] one with a key mask (a batch element left with no
# key), one token.
BIAS_CASES = [(2, 3, 37, 32, None, None), (1, 2, 20, 80, None, None), (2, 2, 45, 16, 2, "random"),
              (3, 2, 33, 16, 1, "empty"), (2, 1, 1, 16, None, None)]


@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
@pytest.mark.parametrize("B,H,N,D,bias_batch,mask", BIAS_CASES)
def test_ops_attention_qkv_attn_bias(B, H, N, D, bias_batch, mask, dtype, device):
    """score(i, j) + attn_bias[h, i, j] in the kernel: the float64 reference, and eager SDPA with the bias in the
    dtype (HF's BEiT); the bias moved the output; a batch element with no key gives zeros."""
    qkv = make_qkv(B, N, H, D, True, dtype, device, scale=2.0)
    bias = make_bias(bias_batch, H, N, dtype, device)
    key_mask = None if mask is None else make_key_mask(B, N, mask, device)
    out = ops.attention_qkv(qkv, H, attn_bias=bias, key_mask=key_mask)
    assert out.shape == (B, N, H * D) and out.dtype == dtype
    ref = reference.attention_qkv(qkv.double(), H, key_mask=key_mask, attn_bias=bias.double())
    eager = reference.torch_attention_qkv(qkv, H, key_mask=key_mask, attn_bias=bias)
    assert_close(out, ref, dtype=dtype, eager=eager)
    if N > 1:
        assert (ref - reference.attention_qkv(qkv.double(), H, key_mask=key_mask)).abs().max() > 0.1
    if key_mask is not None:
        check_mask_zeros(key_mask, out=out)
    empty = ops.attention_qkv(qkv[:0], H, attn_bias=bias if bias_batch != B else bias[:0])   # an empty batch
    assert empty.shape == (0, N, H * D)


@pytest.mark.parametrize("shared,mask", [(True, None), (False, "random"), (True, "empty")])
def test_ops_attention_qkv_attn_bias_gradients(monkeypatch, shared, mask):
    """Gradients of qkv and of the bias equal float64 autograd, on the kernels' path (FlashAttention-2's backward with
    the bias; the dQ kernel's atomics sum a shared bias's gradient over the batch; the reference never called) and on
    torch's (SDPA's backward on the recomputed forward)."""
    B, H, N, D = 3, 2, 21, 16
    qkv = make_qkv(B, N, H, D, True, torch.float32, "cpu", scale=2.0)
    bias = make_bias(None if shared else B, H, N)
    key_mask = None if mask is None else make_key_mask(B, N, mask)
    x64, b64 = (t.double().requires_grad_() for t in (qkv, bias))
    ref = reference.attention_qkv(x64, H, key_mask=key_mask, attn_bias=b64)
    dout = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (x64, b64), dout)
    for interpret in (True, False):
        monkeypatch.setattr(ops, "INTERPRET", interpret and ops.INTERPRET)
        x, b = (t.clone().requires_grad_() for t in (qkv, bias))
        out = ops.attention_qkv(x, H, attn_bias=b, key_mask=key_mask)
        assert_close(out, ref.detach())
        if interpret:
            forbid_reference(monkeypatch, "attention_qkv", "torch_attention_qkv", "attention_probs")
        grads = torch.autograd.grad(out, (x, b), dout.float())
        monkeypatch.undo()
        for name, g, g64 in zip(("dqkv", "dbias"), grads, want):
            assert g.shape == g64.shape
            assert_close(g, g64, name=name)


def test_ops_attention_qkv_attn_bias_float64_gradcheck_opcheck_and_compile():
    qkv = torch.randn(2, 6, 3 * 2 * 4, dtype=torch.float64, requires_grad=True)
    bias = make_bias(None, 2, 6, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: ops.attention_qkv(x, 2, attn_bias=b), (qkv, bias))
    x, b = qkv.detach().float(), bias.detach().float()[None]
    key_mask = torch.tensor([[True] * 6, [True, False] * 3])
    for mask in (None, key_mask):
        torch.library.opcheck(torch.ops.vitfast.attention_qkv_bias.default, (x, b, 2, 0.5, mask))
        out, lse = torch.ops.vitfast.attention_qkv_bias(x, b, 2, 0.5, mask)
        torch.library.opcheck(torch.ops.vitfast.attention_qkv_bias_backward.default,
                              (x, b, out, lse, torch.randn_like(out), 2, 0.5, mask))
    fn = lambda a, c: ops.attention_qkv(a, 2, attn_bias=c, key_mask=key_mask)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(x, b), fn(x, b))


def test_attention_kernel_bias_plan_strides_and_buffers():
    """The plan of a bias launch gives the kernel's result for a bias shared by the batch (batch stride 0), one per
    image and one read through strides (a view of a wider buffer); the kernels' own checks name a bad bias and a
    missing gradient buffer."""
    B, H, N, D = 2, 2, 15, 16
    qkv = make_qkv(B, N, H, D, True, torch.float32, "cpu")
    wide = make_bias(B, H, N + 3)[..., :N, 1:N + 1]                        # rows N + 3 apart: not contiguous
    for bias in (make_bias(1, H, N), make_bias(B, H, N), wide):
        plan = attention_kernels.qkv_plan(qkv, H, D ** -0.5, False, False, bias=bias)
        out, cls_attn = attention_kernels.qkv_run(plan, qkv, bias=bias)
        assert cls_attn is None
        assert_close(out, reference.attention_qkv(qkv.double(), H, attn_bias=bias.double()))
    q, k, v = attention_kernels.qkv_heads(qkv, H)
    with pytest.raises(ValueError, match=r"bias: expected \[2 or 1, 2, 15, 15\] fp16 / bf16 / fp32 .*got "
                                         r"\(2, 2, 15, 14\)"):
        attention_kernels.attention(q, k, v, bias=make_bias(B, H, N)[..., :14])
    with pytest.raises(ValueError, match=r"bias: expected \[2 or 1, .*got \(2, 2, 15, 15\) torch.float64"):
        attention_kernels.attention(q, k, v, bias=make_bias(B, H, N, torch.float64))
    with pytest.raises(ValueError, match=r"dbias: expected an fp32 buffer like bias, got None"):
        attention_kernels.attention_backward(q, k, v, q, torch.zeros(B, H, N), q, bias=make_bias(1, H, N))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
def _heads(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _cu(*bounds, device="cpu"):
    return torch.tensor(bounds, dtype=torch.int32, device=device)


BAD_ATTENTION = [
    ("k batch", lambda: ops.attention(_heads(2, 3, 5, 16), _heads(1, 3, 5, 16), _heads(1, 3, 5, 16)),
     r"k: expected \[B, H, N_kv, D\] = \[2, 3, N_kv, 16\].*got \(1, 3, 5, 16\)"),
    ("k head dim", lambda: ops.attention(_heads(1, 3, 5, 16), _heads(1, 3, 5, 32), _heads(1, 3, 5, 32)),
     r"k: expected .*got \(1, 3, 5, 32\)"),
    ("v length", lambda: ops.attention(_heads(1, 3, 5, 16), _heads(1, 3, 5, 16), _heads(1, 3, 6, 16)),
     r"v: expected shape \(1, 3, 5, 16\) \(like k\), got \(1, 3, 6, 16\)"),
    ("no keys", lambda: ops.attention(_heads(1, 3, 5, 16), _heads(1, 3, 0, 16), _heads(1, 3, 0, 16)),
     r"k: expected at least one key token"),
    ("3 dims", lambda: ops.attention(_heads(3, 5, 16), _heads(3, 5, 16), _heads(3, 5, 16)),
     r"q: expected 4 dims \[B, H, N, D\], got shape \(3, 5, 16\)"),
    ("head dim > 256", lambda: ops.attention(_heads(1, 1, 5, 257), _heads(1, 1, 5, 257), _heads(1, 1, 5, 257)),
     r"q: expected a head dim in \[1, 256\], got 257"),
    ("mixed dtypes", lambda: ops.attention(_heads(1, 1, 5, 16), _heads(1, 1, 5, 16, dtype=torch.float16),
                                           _heads(1, 1, 5, 16)),
     r"k: expected dtype torch.float32 \(like q\), got torch.float16"),
    ("mixed devices", lambda: ops.attention(_heads(1, 1, 5, 16), _heads(1, 1, 5, 16, device="meta"),
                                            _heads(1, 1, 5, 16)),
     r"k: expected device cpu \(like q\), got meta"),
    ("int dtype", lambda: ops.attention(*[torch.ones(1, 1, 5, 16, dtype=torch.int32)] * 3),
     r"q: expected dtype in .*got torch.int32"),
    ("strided last dim", lambda: ops.attention(_heads(1, 1, 16, 5).transpose(-1, -2), _heads(1, 1, 5, 16),
                                               _heads(1, 1, 5, 16)),
     r"q: expected a unit-stride last dim, got strides \(80, 80, 1, 5\)"),
    ("nan scale", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, scale=float("nan")),
     r"scale: expected a finite number or None, got nan"),
    ("mask dtype", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, key_mask=torch.ones(1, 5, dtype=torch.uint8)),
     r"key_mask: expected dtype torch.bool, got torch.uint8"),
    ("mask length", lambda: ops.attention(_heads(1, 1, 4, 16), _heads(1, 1, 5, 16), _heads(1, 1, 5, 16),
                                          key_mask=torch.ones(1, 4, dtype=torch.bool)),
     r"key_mask: expected shape \[B, N_kv\] = \[1, 5\] \(B of q, N_kv of k\), got \(1, 4\)"),
    ("mask 3 dims", lambda: ops.attention(*[_heads(2, 1, 5, 16)] * 3, key_mask=torch.ones(2, 1, 5, dtype=torch.bool)),
     r"key_mask: expected shape \[B, N_kv\] = \[2, 5\] \(B of q, N_kv of k\), got \(2, 1, 5\)"),
    ("mask device", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3,
                                          key_mask=torch.ones(1, 5, dtype=torch.bool, device="meta")),
     r"key_mask: expected device cpu \(like q\), got meta"),
    ("mask not a tensor", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, key_mask=[[True] * 5]),
     r"key_mask: expected a torch.bool Tensor or None, got list"),
    ("cu dtype", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, cu_seqlens=torch.tensor([0, 5])),
     r"cu_seqlens: expected dtype torch.int32, got torch.int64"),
    ("cu one entry", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, cu_seqlens=_cu(5)),
     r"cu_seqlens: expected shape \[S \+ 1\] with S >= 1 segments, got \(1,\)"),
    ("cu device", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, cu_seqlens=_cu(0, 5, device="meta")),
     r"cu_seqlens: expected device cpu \(like q\), got meta"),
    ("varlen batch", lambda: ops.attention(*[_heads(2, 1, 5, 16)] * 3, cu_seqlens=_cu(0, 5)),
     r"q: expected batch size 1 with cu_seqlens \(the segments packed into one sequence\), got 2"),
    ("varlen cross lengths", lambda: ops.attention(_heads(1, 1, 4, 16), *[_heads(1, 1, 5, 16)] * 2,
                                                   cu_seqlens=_cu(0, 4)),
     r"k: expected N_kv = N_q = 4 with cu_seqlens \(self-attention within each segment\), got 5"),
    ("varlen and mask", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, cu_seqlens=_cu(0, 5),
                                              key_mask=torch.ones(1, 5, dtype=torch.bool)),
     r"key_mask: expected None with cu_seqlens \(the two are not supported together\), got a Tensor"),
    ("cu start", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, cu_seqlens=_cu(1, 5)),
     r"cu_seqlens: expected cu_seqlens\[0\] = 0, got 1"),
    ("cu decreasing", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, cu_seqlens=_cu(0, 3, 2, 5)),
     r"cu_seqlens: expected non-decreasing boundaries, got \[0, 3, 2, 5\]"),
    ("cu end", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, cu_seqlens=_cu(0, 4)),
     r"cu_seqlens: expected cu_seqlens\[-1\] = 5 \(the tokens of q\), got 4"),
    ("max_seqlen short", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, cu_seqlens=_cu(0, 2, 5), max_seqlen=2),
     r"max_seqlen: expected at least the longest segment, 3, got 2"),
    ("max_seqlen 0", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, cu_seqlens=_cu(0, 5), max_seqlen=0),
     r"max_seqlen: expected an int >= 1 or None, got 0"),
    ("max_seqlen alone", lambda: ops.attention(*[_heads(1, 1, 5, 16)] * 3, max_seqlen=5),
     r"max_seqlen: expected None without cu_seqlens, got 5"),
]

BAD_QKV = [
    ("not divisible", lambda: ops.attention_qkv(_heads(1, 5, 50), 2),
     r"qkv: expected a last dim divisible by 3 \* num_heads = 6, got 50"),
    ("num_heads 0", lambda: ops.attention_qkv(_heads(1, 5, 48), 0), r"num_heads: expected a positive int, got 0"),
    ("num_heads float", lambda: ops.attention_qkv(_heads(1, 5, 48), 2.0),
     r"num_heads: expected a positive int, got 2.0"),
    ("2 dims", lambda: ops.attention_qkv(_heads(5, 48), 1),
     r"qkv: expected 3 dims \[B, N, 3\*C\], got shape \(5, 48\)"),
    ("strided last dim", lambda: ops.attention_qkv(_heads(1, 48, 5).transpose(1, 2), 1),
     r"qkv: expected a unit-stride last dim, got strides \(240, 1, 5\)"),
    ("head dim > 256", lambda: ops.attention_qkv(_heads(1, 2, 3 * 300), 1),
     r"qkv: expected a head dim in \[1, 256\], got 300"),
    ("cls flag", lambda: ops.attention_qkv(_heads(1, 5, 48), 1, return_cls_attn="yes"),
     r"return_cls_attn: expected a bool, got 'yes'"),
    ("mask dtype", lambda: ops.attention_qkv(_heads(2, 5, 48), 1, key_mask=torch.ones(2, 5)),
     r"key_mask: expected dtype torch.bool, got torch.float32"),
    ("mask batch", lambda: ops.attention_qkv(_heads(2, 5, 48), 1, key_mask=torch.ones(1, 5, dtype=torch.bool)),
     r"key_mask: expected shape \[B, N_kv\] = \[2, 5\] \(B and N of qkv\), got \(1, 5\)"),
    ("mask device", lambda: ops.attention_qkv(_heads(2, 5, 48), 1,
                                              key_mask=torch.ones(2, 5, dtype=torch.bool, device="meta")),
     r"key_mask: expected device cpu \(like qkv\), got meta"),
    ("varlen cls", lambda: ops.attention_qkv(_heads(1, 5, 48), 1, return_cls_attn=True, cu_seqlens=_cu(0, 5)),
     r"return_cls_attn: expected False with cu_seqlens \(not supported together\), got True"),
    ("cu not a tensor", lambda: ops.attention_qkv(_heads(1, 5, 48), 1, cu_seqlens=[0, 5]),
     r"cu_seqlens: expected a torch.int32 Tensor or None, got list"),
    ("rel_pos not a pair", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, rel_pos=_heads(1, 1, 6, 2)),
     r"rel_pos: expected a pair \(rel_h, rel_w\), got Tensor"),
    ("rel_pos grid", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, rel_pos=(_heads(1, 1, 6, 2), _heads(1, 1, 6, 2))),
     r"rel_pos: expected a KH x KW grid of the N = 6 tokens, got KH = 2, KW = 2"),
    ("rel_h shape", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, rel_pos=(_heads(1, 2, 6, 2), _heads(1, 1, 6, 3))),
     r"rel_h: expected \[B, H, N, K\] = \[1, 1, 6, K >= 1\] \(B, N of qkv, its heads\), got \(1, 2, 6, 2\)"),
    ("rel_w dtype", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, rel_pos=(_heads(1, 1, 6, 2),
                                                                            torch.ones(1, 1, 6, 3, dtype=torch.int64))),
     r"rel_w: expected dtype in .*got torch.int64"),
    ("rel_w device", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, rel_pos=(_heads(1, 1, 6, 2),
                                                                             _heads(1, 1, 6, 3, device="meta"))),
     r"rel_w: expected device cpu \(like qkv\), got meta"),
    ("rel_pos and mask", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, key_mask=torch.ones(1, 6, dtype=torch.bool),
                                                   rel_pos=(_heads(1, 1, 6, 2), _heads(1, 1, 6, 3))),
     r"rel_pos: expected no key_mask, cu_seqlens or return_cls_attn with it \(not supported together\), got "
     r"key_mask"),
    ("rel_pos and cls", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, return_cls_attn=True,
                                                  rel_pos=(_heads(1, 1, 6, 2), _heads(1, 1, 6, 3))),
     r"got return_cls_attn=True"),
    ("attn_bias shape", lambda: ops.attention_qkv(_heads(2, 6, 48), 2, attn_bias=_heads(2, 6, 5)),
     r"attn_bias: expected \[H, N, N\] or \[B or 1, H, N, N\] = \[2 or 1, 2, 6, 6\] \(B, N of qkv, its heads\), got "
     r"\(2, 6, 5\)"),
    ("attn_bias batch", lambda: ops.attention_qkv(_heads(2, 6, 48), 2, attn_bias=_heads(3, 2, 6, 6)),
     r"attn_bias: expected .*got \(3, 2, 6, 6\)"),
    ("attn_bias dtype", lambda: ops.attention_qkv(_heads(1, 6, 48), 1,
                                                  attn_bias=torch.ones(1, 6, 6, dtype=torch.int64)),
     r"attn_bias: expected dtype in .*got torch.int64"),
    ("attn_bias device", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, attn_bias=_heads(1, 6, 6, device="meta")),
     r"attn_bias: expected device cpu \(like qkv\), got meta"),
    ("attn_bias and cls", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, return_cls_attn=True,
                                                    attn_bias=_heads(1, 6, 6)),
     r"attn_bias: expected no cu_seqlens, rel_pos or return_cls_attn with it \(not supported together\), got "
     r"return_cls_attn=True"),
    ("attn_bias and varlen", lambda: ops.attention_qkv(_heads(1, 6, 48), 1, cu_seqlens=_cu(0, 6), max_seqlen=6,
                                                       attn_bias=_heads(1, 6, 6)),
     r"attn_bias: expected no .*got cu_seqlens"),
]


@pytest.mark.parametrize("call,match", [(c, m) for _, c, m in BAD_ATTENTION + BAD_QKV],
                         ids=[n for n, _, _ in BAD_ATTENTION + BAD_QKV])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kernel_rejects_wrong_buffers():
    q = _heads(1, 2, 5, 16)
    with pytest.raises(ValueError, match=r"out: expected \(1, 2, 5, 16\) torch.float32"):
        attention_kernels.attention(q, q, q, out=poisoned((1, 2, 5, 8), torch.float32))
    with pytest.raises(ValueError, match=r"cls_attn: expected \(1, 2, 5\) torch.float32"):
        attention_kernels.attention(q, q, q, cls_attn=poisoned((1, 2, 5), torch.float16))
    with pytest.raises(ValueError, match=r"key_mask: expected \(1, 5\) torch.bool on cpu, got \(1, 5\) torch.uint8"):
        attention_kernels.attention(q, q, q, key_mask=torch.ones(1, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected \[S \+ 1\] \(S >= 1\) torch.int32 on cpu, got "
                                         r"\(2,\) torch.int64 on cpu"):
        attention_kernels.attention(q, q, q, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected no cls_attn with it"):
        attention_kernels.attention(q, q, q, cu_seqlens=_cu(0, 5), cls_attn=poisoned((1, 2, 5), torch.float32))


# --------------------------------------------------------------------------------------------
# GPU: bf16, long sequences, tf32, CUDA graphs
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,D", [(197, 64), (577, 80), (1025, 64), (2305, 96), (4097, 80), (4097, 64)])
def test_attention_gpu(N, D, dtype):
    q, k, v = (make_heads(2, 3, N, D, "bnhd", dtype, "cuda") for _ in range(3))
    out = out_buffer((2, 3, N, D), "bnhd", dtype, "cuda")
    cls_attn = poisoned((2, 3, N), torch.float32, "cuda")
    attention_kernels.attention(q, k, v, out=out, cls_attn=cls_attn)
    check_attention(q, k, v, out, dtype)      # float64 reference, run on the GPU
    probs = reference.attention_probs(*f64(q, k))[:, :, 0]
    assert_close(cls_attn, probs, dtype=dtype, eager=reference.attention_probs(q, k)[:, :, 0], name="cls_attn")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,H,D", [(197, 12, 64), (257, 16, 80), (4097, 16, 80)])
def test_attention_qkv_gpu(N, H, D, dtype):
    qkv = make_qkv(2, N, H, D, True, dtype, "cuda", scale=3.0)
    out, cls_attn = ops.attention_qkv(qkv, H, return_cls_attn=True)
    check_qkv(qkv, H, out, cls_attn, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_attention_fp32_gpu(allow_tf32):
    """fp32 follows torch's TF32 setting for matmuls (assert_close picks the tf32 tolerance)."""
    q, k, v = (make_heads(2, 3, 257, 80, "sliced", torch.float32, "cuda") for _ in range(3))
    with matmul_tf32(allow_tf32):
        out = ops.attention(q, k, v)
        ref = reference.attention(*f64(q, k, v))
        assert_close(out, ref, dtype=torch.float32, eager=reference.attention(q, k, v))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [1, 8, 40, 144, 200, 256])
def test_attention_gpu_head_dims(D, dtype):
    """Head dims outside the ViT sizes: below tl.dot's 16 (padded chunk), a 16-wide second chunk (144),
    and up to 256, where fp32 needs the 64 x 32 tile to fit shared memory. With the CLS row."""
    q, k, v = (make_heads(2, 3, 197, D, "sliced", dtype, "cuda") for _ in range(3))
    out = poisoned((2, 3, 197, D), dtype, "cuda")
    cls_attn = poisoned((2, 3, 197), torch.float32, "cuda")
    with matmul_tf32(True):
        attention_kernels.attention(q, k, v, out=out, cls_attn=cls_attn)
        check_attention(q, k, v, out, dtype)
        probs = reference.attention_probs(*f64(q, k))[:, :, 0]
        assert_close(cls_attn, probs, dtype=dtype, eager=reference.attention_probs(q, k)[:, :, 0], name="cls_attn")


@pytest.mark.gpu
def test_attention_gpu_int64_key_offsets():
    """Sequence-first storage [N, B·H, D] with 2^20 heads of 64: the token stride is 2^26, so keys 32..39
    sit past int32 offsets from their block's base (BLOCK_N of them span > 2^31 elements)."""
    N, BH, D = 40, 2**20, 64
    q, k, v = (torch.randn(N, 1, BH, D, dtype=torch.float16, device="cuda").permute(1, 2, 0, 3) for _ in range(3))
    out = attention_kernels.attention(q, k, v)                        # (1, BH, N, D)
    for heads in (slice(0, 2), slice(BH - 2, BH)):
        sub = [t[:, heads] for t in (q, k, v)]
        assert_close(out[:, heads], reference.attention(*f64(*sub)), dtype=torch.float16,
                     eager=reference.attention(*sub))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("N,H,D", [(197, 12, 64), (257, 16, 80), (1025, 6, 64), (577, 4, 72)])
def test_attention_backward_gpu(N, H, D, dtype):
    """The backward kernels at ViT shapes and head dims (72 and 80 as 64 + 16), fp32 with tf32 allowed,
    through autograd on the packed projection: the gradient equals float64 autograd through the
    reference within 2x eager's error; the forward saved no N x N tensor."""
    qkv = make_qkv(2, N, H, D, False, dtype, "cuda").requires_grad_()
    with matmul_tf32(True):
        out = ops.attention_qkv(qkv, H)
        dout = torch.randn_like(out)
        (got,) = torch.autograd.grad(out, qkv, dout)
        x64 = qkv.detach().double().requires_grad_()
        (want,) = torch.autograd.grad((reference.attention_qkv(x64, H) * dout.double()).sum(), x64)
        x = qkv.detach().requires_grad_()
        (eager,) = torch.autograd.grad((reference.attention_qkv(x, H) * dout).sum(), x)
    assert_close(got, want, dtype=dtype, eager=eager, name="dqkv")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,H,D", [(256, 12, 64), (257, 16, 72), (1025, 6, 80)])
def test_attention_key_mask_gpu(N, H, D, dtype):
    """Padded batches as SigLIP 2 NaFlex makes them (kept prefixes of 1, 13 and N keys, and an element with
    none), on the device in bf16 / fp16: out and the CLS row, and dqkv through autograd (the backward
    kernels), against float64 autograd through the reference with the mask, within 2x eager's error."""
    key_mask = make_key_mask(4, N, "prefix", "cuda")
    key_mask[-1] = False
    qkv = make_qkv(4, N, H, D, True, dtype, "cuda", scale=3.0).requires_grad_()
    out, cls_attn = ops.attention_qkv(qkv, H, return_cls_attn=True, key_mask=key_mask)
    x64 = qkv.detach().double().requires_grad_()
    ref_out, ref_cls = reference.attention_qkv(x64, H, return_cls_attn=True, key_mask=key_mask)
    x = qkv.detach().requires_grad_()
    eager_out, eager_cls = reference.attention_qkv(x, H, return_cls_attn=True, key_mask=key_mask)
    assert_close(out, ref_out, dtype=dtype, eager=eager_out)
    assert_close(cls_attn, ref_cls, dtype=dtype, eager=eager_cls, name="cls_attn")
    check_mask_zeros(key_mask, cls_attn=cls_attn, out=out)
    dout = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, dout)
    (want,) = torch.autograd.grad((ref_out * dout.double()).sum(), x64)
    (eager,) = torch.autograd.grad((eager_out * dout).sum(), x)
    assert_close(got, want, dtype=dtype, eager=eager, name="dqkv")
    assert (got[-1] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,H,KH,KW,D", [(2, 12, 64, 64, 64), (50, 16, 14, 14, 80)],
                         ids=["sam_b_global", "sam_h_window"])
def test_attention_rel_pos_gpu(B, H, KH, KW, D, dtype):
    """SAM's relative positions on the device: ViT-B's global blocks at 1024 px (4096 tokens) and ViT-H's 14 x 14
    windows (head dim 80), against float64 with the N x N bias, within 2x eager SDPA's error with that bias; the
    gradients of qkv and of both terms from the backward kernels likewise."""
    qkv = make_qkv(B, KH * KW, H, D, False, dtype, "cuda", scale=2.0).requires_grad_()
    rel = tuple(t.requires_grad_() for t in make_rel_pos(B, H, KH, KW, torch.float32, "cuda"))
    out = ops.attention_qkv(qkv, H, rel_pos=rel)
    inputs64 = [t.detach().double().requires_grad_() for t in (qkv, *rel)]
    ref = reference.attention_qkv(inputs64[0], H, rel_pos=tuple(inputs64[1:]))
    inputs = [t.detach().requires_grad_() for t in (qkv, *rel)]
    eager = reference.torch_attention_qkv(inputs[0], H, rel_pos=tuple(inputs[1:]))
    assert_close(out, ref, dtype=dtype, eager=eager)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, *rel), dout)
    want = torch.autograd.grad(ref, inputs64, dout.double())
    eager_grads = torch.autograd.grad(eager, inputs, dout)
    for name, g, w, e in zip(("dqkv", "drel_h", "drel_w"), got, want, eager_grads):
        assert_close(g, w, dtype=dtype, eager=e, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,H,N,D,shared", [(32, 12, 197, 64, True), (8, 16, 577, 64, True), (4, 16, 257, 80, False)],
                         ids=["beit_b_224", "beit_l_384", "per_image_d80"])
def test_attention_bias_gpu(B, H, N, D, shared, dtype):
    """A dense bias on the device: BEiT-B at 224 px and BEiT-L at 384 px (one [H, N, N] bias shared by the batch, in
    the model's dtype), and a bias per image at head dim 80, against float64, within 2x eager SDPA's error with that
    bias; the gradients of qkv and of the bias (the dQ kernel's atomics summing a shared one over the batch) too."""
    qkv = make_qkv(B, N, H, D, False, dtype, "cuda", scale=2.0).requires_grad_()
    bias = make_bias(None if shared else B, H, N, dtype, "cuda").requires_grad_()
    out = ops.attention_qkv(qkv, H, attn_bias=bias)
    inputs64 = [t.detach().double().requires_grad_() for t in (qkv, bias)]
    ref = reference.attention_qkv(inputs64[0], H, attn_bias=inputs64[1])
    inputs = [t.detach().requires_grad_() for t in (qkv, bias)]
    eager = reference.torch_attention_qkv(inputs[0], H, attn_bias=inputs[1])
    assert_close(out, ref, dtype=dtype, eager=eager)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (qkv, bias), dout)
    want = torch.autograd.grad(ref, inputs64, dout.double())
    eager_grads = torch.autograd.grad(eager, inputs, dout)
    for name, g, w, e in zip(("dqkv", "dbias"), got, want, eager_grads):
        assert g.shape == w.shape
        assert_close(g, w, dtype=dtype, eager=e, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_attention_varlen_gpu(dtype):
    """Qwen2-VL's packing on the device: 16 heads of 80, images of 32 x 32, 16 x 16 and 56 x 56 patches, a one-patch
    and an empty segment (T = 4417), bf16 / fp16: out and dqkv through autograd (the backward kernels) against
    float64 autograd through the reference's block-diagonal math, within 2x the error of eager SDPA run per
    segment in the same dtype, over the whole and segment by segment."""
    H, D = 16, 80
    lengths = [1024, 256, 1, 0, 3136]
    cu = make_cu_seqlens(lengths, "cuda")
    T = int(cu[-1])
    qkv = make_qkv(1, T, H, D, True, dtype, "cuda", scale=3.0).requires_grad_()
    out = ops.attention_qkv(qkv, H, cu_seqlens=cu, max_seqlen=max(lengths))
    x64 = qkv.detach().double().requires_grad_()
    ref = reference.attention_qkv(x64, H, cu_seqlens=cu)
    x = qkv.detach().requires_grad_()
    eager = reference.torch_attention_qkv(x, H, cu_seqlens=cu)                  # SDPA per segment, in dtype
    assert_close(out, ref, dtype=dtype, eager=eager)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if end > start:
            seg = slice(start, end)
            assert_close(out[:, seg], ref[:, seg], dtype=dtype, eager=eager[:, seg], name=f"out[{start}:{end}]")
    dout = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, qkv, dout)
    (want,) = torch.autograd.grad((ref * dout.double()).sum(), x64)
    (eager_grad,) = torch.autograd.grad((eager * dout).sum(), x)
    assert_close(got, want, dtype=dtype, eager=eager_grad, name="dqkv")


@pytest.mark.gpu
def test_attention_cuda_graph():
    """No host sync in the launch: capture once (after autotuning), replay on new inputs."""
    qkv = make_qkv(4, 197, 12, 64, False, torch.float16, "cuda")
    ops.attention_qkv(qkv, 12, return_cls_attn=True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, cls_attn = ops.attention_qkv(qkv, 12, return_cls_attn=True)
    qkv.copy_(make_qkv(4, 197, 12, 64, False, torch.float16, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    check_qkv(qkv, 12, out, cls_attn, torch.float16)
