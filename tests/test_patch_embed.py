"""vitfast.ops.patch_embed / kernels/patch_embed.py against the float64 reference
(Conv2d -> flatten -> transpose -> cat(cls) -> + pos_embed, normalise-then-conv for uint8).

On the CPU the kernel runs in Triton's interpreter (fp32 and fp16; bf16 `tl.dot` is not
emulated faithfully there, so bf16 runs in the `gpu` tests)."""

import pytest
import torch
import torch.nn.functional as F

from vitfast import ops, reference
from vitfast.kernels import patch_embed as patch_embed_kernels
from vitfast.testing import FakeCudaTensor, assert_close, forbid_reference, poisoned

MEAN = (0.485, 0.456, 0.406)   # timm's ImageNet data config
STD = (0.229, 0.224, 0.225)

# kind -> (image dtype, weight/compute dtype, normalise with mean/std)
KINDS = {
    "fp32": (torch.float32, torch.float32, False),
    "fp16": (torch.float16, torch.float16, False),
    "u8_fp32": (torch.uint8, torch.float32, True),
    "u8_fp16": (torch.uint8, torch.float16, True),
    "fp32_norm": (torch.float32, torch.float32, True),      # float images, (img - mean) / std
    "fp32_img_fp16": (torch.float32, torch.float16, False),  # images converted to the weight's dtype in the load
    "u8_bf16": (torch.uint8, torch.bfloat16, True),
    "bf16": (torch.bfloat16, torch.bfloat16, False),
}


def make_inputs(B, C, H, W, P, D, kind, cls, pos, channels_last=False, device="cpu"):
    img_dtype, dtype, norm = KINDS[kind]
    if img_dtype == torch.uint8:
        images = torch.randint(0, 256, (B, C, H, W), dtype=torch.uint8, device=device)
    else:
        images = torch.rand(B, C, H, W, device=device).to(img_dtype)   # image-like values in [0, 1)
    if channels_last:
        images = images.to(memory_format=torch.channels_last)
    T = (1 if cls else 0) + (H // P) * (W // P)
    weight = (torch.randn(D, C, P, P, device=device) * (C * P * P) ** -0.5).to(dtype)
    bias = torch.randn(D, device=device).to(dtype)
    cls_token = torch.randn(1, 1, D, device=device).to(dtype) if cls else None
    pos_embed = (torch.randn(1, T, D, device=device) * 0.5).to(dtype) if pos else None
    mean = torch.tensor(MEAN[:C], device=device) if norm else None
    std = torch.tensor(STD[:C], device=device) if norm else None
    return images, weight, bias, cls_token, pos_embed, mean, std


def reference64(images, weight, bias, cls_token, pos_embed, mean, std):
    """The reference in float64 on the CPU, from exactly the same (rounded) inputs."""
    f64 = lambda t: None if t is None else t.detach().cpu().double()
    imgs = images.cpu() if images.dtype == torch.uint8 else f64(images)
    return reference.patch_embed(imgs, f64(weight), f64(bias), f64(cls_token), f64(pos_embed), f64(mean), f64(std))


def check(args, device):
    """Kernel into a poisoned buffer, and the public op: both within DESIGN.md §4 of the float64
    reference and bounded by eager PyTorch's own error in the same dtype; identical to each other."""
    images, weight, bias, cls_token, pos_embed, mean, std = args
    ref64 = reference64(*args)
    eager = reference.patch_embed(*args)
    out = poisoned(tuple(ref64.shape), weight.dtype, device)
    got = patch_embed_kernels.patch_embed(*args, out=out)
    assert got is out
    assert_close(out, ref64, dtype=weight.dtype, eager=eager)
    y = ops.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
    assert y.dtype == weight.dtype and y.shape == ref64.shape
    assert torch.equal(y, out)


# (P, H, W, C, D, B, kind, cls_token, pos_embed, channels_last): a covering set over patch sizes
# 8/14/16/32, images 32x32 / 56x28 / 64x64, C 3 and 1, CLS and pos_embed on/off, both layouts;
# token counts 1, 4, 16, 64 and features D not multiples of the block.
CASES = [
    (8, 32, 32, 3, 40, 2, "fp32", True, True, False),
    (8, 64, 64, 3, 24, 2, "u8_fp32", True, True, True),
    (8, 32, 32, 1, 40, 1, "u8_fp16", False, True, True),
    (14, 56, 28, 3, 40, 2, "fp32", True, True, True),
    (14, 56, 28, 3, 72, 2, "u8_fp32", True, False, False),
    (14, 56, 28, 1, 40, 3, "fp16", False, False, False),
    (14, 56, 28, 3, 40, 2, "u8_fp16", True, True, True),
    (16, 32, 32, 3, 40, 2, "u8_fp16", True, True, False),
    (16, 64, 64, 3, 40, 2, "fp16", True, True, True),
    (16, 64, 64, 1, 40, 2, "fp32_norm", False, True, False),
    (16, 32, 32, 3, 40, 2, "fp32_img_fp16", True, True, True),
    (32, 64, 64, 3, 40, 2, "fp32", False, True, False),
    (32, 32, 32, 3, 40, 3, "u8_fp32", True, True, True),
    (32, 64, 64, 1, 24, 1, "fp16", True, False, True),
]


@pytest.mark.parametrize("P,H,W,C,D,B,kind,cls,pos,channels_last", CASES)
def test_patch_embed(P, H, W, C, D, B, kind, cls, pos, channels_last, device):
    check(make_inputs(B, C, H, W, P, D, kind, cls, pos, channels_last, device), device)


def test_patch_embed_equals_conv_sequence(device):
    """The acceptance baseline spelled out: normalise -> Conv2d -> flatten -> transpose -> cat(cls) -> + pos."""
    images, weight, bias, cls_token, pos_embed, mean, std = make_inputs(2, 3, 56, 28, 14, 40, "u8_fp32", True, True,
                                                                        device=device)
    x = (images.cpu().double() / 255 - mean.cpu().double().view(1, 3, 1, 1)) / std.cpu().double().view(1, 3, 1, 1)
    conv = F.conv2d(x, weight.cpu().double(), bias.cpu().double(), stride=14).flatten(2).transpose(1, 2)  # (B, N, D)
    expect = torch.cat([cls_token.cpu().double().expand(2, 1, 40), conv], dim=1) + pos_embed.cpu().double()
    out = ops.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
    assert_close(out, expect, dtype=torch.float32)


def test_patch_embed_strided_out_and_shapes_without_extras(device):
    """No bias/CLS/pos/mean/std; `out` a strided view: the columns around it stay untouched,
    pos_embed given as [T, D] and cls_token as [D] are read like [1, T, D] / [1, 1, D]."""
    images, weight, _, _, _, _, _ = make_inputs(2, 3, 32, 32, 8, 40, "fp32", False, False, device=device)
    big = poisoned((2, 16, 48), torch.float32, device)
    out = big[:, :, 4:44]                                                   # (B, T, D) with row stride 48
    patch_embed_kernels.patch_embed(images, weight, out=out)
    assert_close(out, reference64(images, weight, None, None, None, None, None), dtype=torch.float32)
    assert torch.isnan(big[:, :, :4]).all() and torch.isnan(big[:, :, 44:]).all()

    _, _, bias, cls_token, pos_embed, _, _ = make_inputs(2, 3, 32, 32, 8, 40, "fp32", True, True, device=device)
    y = ops.patch_embed(images, weight, bias, cls_token=cls_token.reshape(40), pos_embed=pos_embed.reshape(17, 40))
    assert_close(y, reference64(images, weight, bias, cls_token, pos_embed, None, None), dtype=torch.float32)


def test_patch_embed_autograd_and_grads(device):
    """Backward (dW through the im2col GEMM, db, the prefix and position rows summed over the batch, the
    image gradient folded back): gradients equal the reference's."""
    args = make_inputs(2, 3, 32, 32, 16, 24, "fp32", True, True, device=device)
    images, weight, bias, cls_token, pos_embed, _, _ = args
    leaves = [t.detach().requires_grad_() for t in (images, weight, bias, cls_token, pos_embed)]
    y = ops.patch_embed(leaves[0], leaves[1], leaves[2], cls_token=leaves[3], pos_embed=leaves[4])
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, g)
    leaves64 = [t.detach().double().requires_grad_() for t in (images, weight, bias, cls_token, pos_embed)]
    y64 = reference.patch_embed(*leaves64)
    grads64 = torch.autograd.grad(y64, leaves64, g.double())
    for name, got, want in zip(("images", "weight", "bias", "cls_token", "pos_embed"), grads, grads64):
        assert_close(got, want, dtype=torch.float32, name=f"grad {name}")


@pytest.mark.parametrize("case", ["registers_no_pos_prefix", "uint8_normalised", "no_prefix_no_bias",
                                  "mean_std_trained"])
def test_patch_embed_backward_variants_never_call_the_reference(case, monkeypatch):
    """DINOv2-reg's layout (5 prefix rows, position rows for the patches only), uint8 images normalised
    in the kernel (no image gradient), no prefix / bias, and trainable mean / std (torch's conv backward):
    each gradient equals float64 autograd through the reference; only the last touches torch's conv."""
    torch.manual_seed(0)
    kind = "u8_fp32" if case in ("uint8_normalised", "mean_std_trained") else "fp32"
    images, weight, bias, _, _, mean, std = make_inputs(2, 3, 32, 48, 16, 24, kind, False, False)
    prefix = {"registers_no_pos_prefix": torch.randn(1, 5, 24), "no_prefix_no_bias": None}.get(case, torch.randn(1, 24))
    n_pos = 6 + (0 if case in ("registers_no_pos_prefix", "no_prefix_no_bias") else 1)
    pos = torch.randn(1, n_pos, 24) * 0.5
    pos_prefix = case not in ("registers_no_pos_prefix",)
    bias = None if case == "no_prefix_no_bias" else bias
    if case == "mean_std_trained":
        mean, std = mean.clone(), std.clone()
    names = ["images", "weight", "bias", "prefix", "pos", "mean", "std"]
    values = [images, weight, bias, prefix, pos, mean, std]
    train = [t is not None and t.is_floating_point() and (n not in ("mean", "std") or case == "mean_std_trained")
             for n, t in zip(names, values)]
    leaves = [t.detach().requires_grad_() if w else t for t, w in zip(values, train)]
    y = ops.patch_embed(leaves[0], leaves[1], leaves[2], prefix_tokens=leaves[3], pos_embed=leaves[4],
                        mean=leaves[5], std=leaves[6], pos_embed_prefix=pos_prefix)
    g = torch.randn_like(y)
    if case != "mean_std_trained":                # the reference and what it calls
        forbid_reference(monkeypatch, "patch_embed", "torch_patch_embed", "normalize_images", "add_prefix_and_pos")
    wrt = [t for t, w in zip(leaves, train) if w]
    grads = torch.autograd.grad(y, wrt, g)
    monkeypatch.undo()
    leaves64 = [(t.detach().double() if t.is_floating_point() else t).requires_grad_(w) if t is not None else None
                for t, w in zip(values, train)]
    y64 = reference.patch_embed(*leaves64[:5], leaves64[5], leaves64[6], pos_prefix)
    grads64 = torch.autograd.grad(y64, [t for t, w in zip(leaves64, train) if w], g.double())
    for name, got, want in zip([n for n, w in zip(names, train) if w], grads, grads64):
        assert_close(got, want, dtype=torch.float32, name=f"grad {name}")



@pytest.mark.parametrize("kind", ["fp32", "u8_fp32"])
def test_patch_embed_opcheck(kind, device):
    images, weight, bias, cls_token, pos_embed, mean, std = make_inputs(2, 3, 32, 32, 16, 24, kind, True, True,
                                                                        device=device)
    for t in (weight, bias, cls_token, pos_embed):
        t.requires_grad_()
    torch.library.opcheck(ops._patch_embed_op, (images, weight, bias, cls_token, pos_embed, mean, std, True))
    # registers without position rows (DINOv2-reg): 1 + 4 prefix rows, the table for the 4 patches only
    prefix = torch.randn(1, 5, 24, device=device, requires_grad=True)
    pos = torch.randn(1, 4, 24, device=device, requires_grad=True)
    torch.library.opcheck(ops._patch_embed_op, (images, weight, bias, prefix, pos, mean, std, False))


def _bad(**changes):
    """Valid 3-channel 32x32 fp32 inputs for P=16 (T = 1 + 4), with some replaced."""
    kw = dict(images=torch.rand(2, 3, 32, 32), weight=torch.randn(24, 3, 16, 16), bias=torch.randn(24),
              cls_token=torch.randn(1, 1, 24), pos_embed=torch.randn(1, 5, 24), mean=torch.tensor(MEAN),
              std=torch.tensor(STD))
    kw.update(changes)
    return kw


BAD = [
    (_bad(images=torch.rand(2, 3, 32, 40)), r"H=32 and width W=40 must be divisible by the patch size P=16"),
    (_bad(images=torch.rand(2, 3, 30, 32)), r"H=30 .* P=16"),
    (_bad(images=torch.rand(2, 1, 32, 32)), r"images: expected 3 channels .* got 1"),
    (_bad(pos_embed=torch.randn(1, 4, 24)), r"pos_embed: expected length 5 .* got 4"),
    (_bad(cls_token=None), r"pos_embed: expected length 4 .* got 5"),
    (_bad(pos_embed=torch.randn(1, 5, 16)), r"pos_embed: expected shape \(1, 5, 24\) or \(5, 24\), got \(1, 5, 16\)"),
    (_bad(mean=torch.tensor([0.5, 0.5])), r"mean: expected shape \(3,\) .* got \(2,\)"),
    (_bad(std=torch.ones(1, 3, 1, 1)), r"std: expected shape \(3,\) .* got \(1, 3, 1, 1\)"),
    (_bad(images=torch.rand(3, 32, 32)), r"images: expected a 4-D tensor .* got shape \(3, 32, 32\)"),
    (_bad(images=torch.zeros(2, 3, 32, 32, dtype=torch.int32)), r"images: expected dtype in .* got torch.int32"),
    (_bad(weight=torch.randn(24, 3, 16, 8)), r"weight: expected the conv weight \[D, C, P, P\] .* \(24, 3, 16, 8\)"),
    (_bad(bias=torch.randn(23)), r"bias: expected shape \(24,\), got \(23,\)"),
    (_bad(cls_token=torch.randn(1, 2, 24)), r"cls_token: expected shape \(1, 1, 24\) or \(24,\), got \(1, 2, 24\)"),
    (_bad(pos_embed=torch.randn(1, 5, 24, dtype=torch.float16)), r"pos_embed: expected dtype torch.float32"),
    (_bad(weight=torch.randn(24, 3, 16, 16, device="meta")), r"weight: expected device cpu .* got meta"),
    (_bad(mean=torch.tensor(MEAN, device="meta")), r"mean: expected device cpu .* got meta"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_patch_embed_bad_input(kwargs, match):
    images, weight, bias = kwargs.pop("images"), kwargs.pop("weight"), kwargs.pop("bias")
    with pytest.raises(ValueError, match=match):
        ops.patch_embed(images, weight, bias, **kwargs)


def test_patch_embed_batch_inner_layout(device):
    """Images viewed out of [C, B, H, W] storage (channel stride B·H·W, batch stride H·W): the kernel reads
    them by strides, no copy."""
    images, weight, bias, cls_token, pos_embed, mean, std = make_inputs(2, 3, 32, 32, 16, 40, "u8_fp32", True, True,
                                                                        device=device)
    images = images.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    assert images.stride() == (32 * 32, 2 * 32 * 32, 32, 1)
    check((images, weight, bias, cls_token, pos_embed, mean, std), device)



@pytest.mark.parametrize("img_dtype,w_dtype,flags,must_drop,must_keep", [
    # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) measured with sm_90 compiles (ptxas -v):
    (torch.uint8, torch.bfloat16, (True, True, True), [(128, 128, 64, 4, 4), (256, 128, 64, 8, 3)],
     [(128, 128, 64, 8, 3), (64, 64, 64, 4, 4)]),
    (torch.bfloat16, torch.bfloat16, (False, False, False), [(128, 256, 64, 8, 3), (128, 128, 32, 4, 5)],
     [(128, 128, 64, 8, 3), (64, 64, 64, 4, 4)]),
    (torch.float64, torch.bfloat16, (False, False, False), [(128, 128, 64, 4, 4)], [(64, 64, 64, 4, 4)]),
])
def test_prune_configs_keeps_tiles_that_fit_and_do_not_spill(img_dtype, w_dtype, flags, must_drop, must_keep,
                                                             monkeypatch):
    """On an H100/H200 (227 KiB of shared memory per block) the tiles that spill or cannot launch are
    dropped, and the autotune key is a bucket of M (a new batch size in the bucket does not re-tune)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    configs = patch_embed_kernels._configs()                         # the GPU autotune space
    monkeypatch.setattr(patch_embed_kernels, "_smem_limit", lambda device: 232448)
    is_uint8, has_mean, has_std = flags
    kept = patch_embed_kernels._prune_configs(
        configs, {"img_ptr": FakeCudaTensor(img_dtype), "w_ptr": FakeCudaTensor(w_dtype)},
        IS_UINT8=is_uint8, HAS_MEAN=has_mean, HAS_STD=has_std)
    tiles = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
             for c in kept}
    assert not tiles & set(must_drop), f"kept {sorted(tiles)}"
    assert set(must_keep) <= tiles, f"kept {sorted(tiles)}"
    assert "M" not in patch_embed_kernels._patch_embed_kernel.keys
    assert "M_BUCKET" in patch_embed_kernels._patch_embed_kernel.keys


# ---------------------------------------------------------------------------------------------
# GPU: bf16 (not in the interpreter), 224 px batches, tf32, int64 image offsets
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("P", [8, 14, 16, 32])
@pytest.mark.parametrize("kind,channels_last", [("bf16", False), ("u8_bf16", True), ("u8_bf16", False),
                                                ("fp16", True), ("fp32", False)])
def test_patch_embed_gpu_224(P, kind, channels_last):
    check(make_inputs(8, 3, 224, 224, P, 768, kind, True, True, channels_last, "cuda"), "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [True, False])
def test_patch_embed_gpu_odd_shapes(cls):
    """Non-square 384x224, D = 200 (no block multiple), C = 1, batch 5."""
    check(make_inputs(5, 1, 384, 224, 16, 200, "u8_bf16", cls, True, True, "cuda"), "cuda")


@pytest.mark.gpu
def test_patch_embed_gpu_int64_image_offsets():
    """A uint8 batch past 2^31 bytes: the last images sit beyond int32 offsets."""
    B = 2**31 // (3 * 224 * 224) + 2
    images, weight, bias, cls_token, pos_embed, mean, std = make_inputs(B, 3, 224, 224, 16, 32, "u8_bf16", True,
                                                                        True, device="cuda")
    out = ops.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
    tail = (images[-3:], weight, bias, cls_token, pos_embed, mean, std)
    assert_close(out[-3:], reference64(*tail), dtype=torch.bfloat16, eager=reference.patch_embed(*tail))


@pytest.mark.gpu
def test_patch_embed_gpu_int64_channel_offsets():
    """Images viewed out of a [C, B, H, W] uint8 buffer of 3 GiB: channel 2 starts 2·B·H·W > 2^31
    elements in, so the per-column (channel) part of the image address needs int64 too."""
    B = 2**30 // (224 * 224) + 2
    _, weight, bias, cls_token, pos_embed, mean, std = make_inputs(1, 3, 224, 224, 16, 32, "u8_bf16", True, True,
                                                                   device="cuda")
    images = torch.randint(0, 256, (3, B, 224, 224), dtype=torch.uint8, device="cuda").permute(1, 0, 2, 3)
    out = ops.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
    for imgs in (slice(0, 2), slice(B - 2, B)):
        sub = (images[imgs], weight, bias, cls_token, pos_embed, mean, std)
        assert_close(out[imgs], reference64(*sub), dtype=torch.bfloat16, eager=reference.patch_embed(*sub))


@pytest.mark.parametrize("P", [32, 16])
def test_cpu_path_picks_conv_or_gemm_once_per_shape_and_both_are_right(P, monkeypatch):
    """CPU tensors (no interpreter) take the faster of F.conv2d and the im2col GEMM, timed on the first
    call of a shape; either path equals the float64 reference."""
    monkeypatch.setattr(ops, "INTERPRET", False)
    monkeypatch.setattr(ops, "_PATCH_EMBED_PATHS", {})
    args = make_inputs(2, 3, 64, 64, P, 48, "u8_fp32", cls=True, pos=True)
    images, weight, bias, cls_token, pos_embed, mean, std = args
    want = reference64(*args)
    out = ops.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
    assert_close(out, want, dtype=torch.float32)
    (key, chosen), = ops._PATCH_EMBED_PATHS.items()
    assert chosen in (0, 1)
    for path in (0, 1):
        ops._PATCH_EMBED_PATHS[key] = path
        out = ops.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
        assert out.is_contiguous()
        assert_close(out, want, dtype=torch.float32, name=("conv2d", "gemm")[path])
    assert len(ops._PATCH_EMBED_PATHS) == 1


# Prefix tokens beyond the class token: DINOv2 with registers (class + 4 registers, position rows for
# the patches only: timm's no_embed_class), DeiT distilled (class + distillation token, position rows
# for both), and registers without a class token.
@pytest.mark.parametrize("kind", ["fp32", "fp16", "u8_fp32"])
@pytest.mark.parametrize("n_prefix,pos_prefix,P,H,W", [(5, False, 14, 28, 42), (2, True, 16, 32, 48),
                                                        (4, False, 8, 24, 16), (3, True, 8, 16, 16)])
def test_prefix_tokens_with_and_without_position_rows(kind, n_prefix, pos_prefix, P, H, W, device):
    images, weight, bias, _, _, mean, std = make_inputs(2, 3, H, W, P, 40, kind, False, False, device=device)
    dtype = weight.dtype
    N = (H // P) * (W // P)
    prefix = torch.randn(1, n_prefix, 40, device=device).to(dtype)
    pos = (torch.randn(1, N + (n_prefix if pos_prefix else 0), 40, device=device) * 0.5).to(dtype)
    out = poisoned((2, n_prefix + N, 40), dtype, device)
    got = patch_embed_kernels.patch_embed(images, weight, bias, prefix, pos, mean, std, out,
                                          pos_embed_prefix=pos_prefix)
    f64 = lambda t: None if t is None else t.detach().to("cpu", torch.float64)
    imgs = images.cpu() if images.dtype == torch.uint8 else f64(images)
    want = reference.patch_embed(imgs, f64(weight), f64(bias), f64(prefix), f64(pos), f64(mean), f64(std), pos_prefix)
    eager = reference.patch_embed(images, weight, bias, prefix, pos, mean, std, pos_prefix)
    assert_close(got, want, dtype=dtype, eager=eager)
    assert torch.equal(got, ops.patch_embed(images, weight, bias, prefix_tokens=prefix, pos_embed=pos, mean=mean,
                                            std=std, pos_embed_prefix=pos_prefix))
    # the prefix rows are the tokens themselves (plus their position rows when the table has them)
    rows = prefix[0].double() + (pos[0, :n_prefix].double() if pos_prefix else 0)
    assert_close(got[:, :n_prefix].cpu(), rows.cpu().expand(2, -1, -1), dtype=dtype, name="prefix rows")


def test_prefix_token_errors():
    kw = _bad(cls_token=None, pos_embed=torch.randn(1, 4, 24))
    with pytest.raises(ValueError, match="prefix_tokens: expected None when cls_token is given"):
        ops.patch_embed(**_bad(), prefix_tokens=torch.randn(1, 2, 24))
    with pytest.raises(ValueError, match=r"prefix_tokens: expected shape \(1, NP, 24\) or \(NP, 24\)"):
        ops.patch_embed(**kw, prefix_tokens=torch.randn(2, 2, 24), pos_embed_prefix=False)
    with pytest.raises(ValueError, match=r"pos_embed: expected length 7 = 3 prefix"):
        ops.patch_embed(**kw, prefix_tokens=torch.randn(1, 3, 24))
    with pytest.raises(ValueError, match="pos_embed_prefix: expected a bool"):
        ops.patch_embed(**kw, prefix_tokens=torch.randn(1, 3, 24), pos_embed_prefix="no")
    out = ops.patch_embed(**kw, prefix_tokens=torch.randn(1, 3, 24), pos_embed_prefix=False)
    assert out.shape == (2, 7, 24)
