"""Launch plans: what a launch fixes is computed once per operand layout, and a launch the autotuner has
settled goes straight to the JIT function with the autotuner's config (`vitfast.kernels.Launch`).

Runs in Triton's interpreter on CPU tensors. `make compile-check-oldest` also runs the test of
`tuned_config` under the oldest Triton vitfast supports: its autotuner must build its cache keys as the
pinned one does (what `tuned_config` mirrors)."""

import math

import pytest
import torch
import triton

from vitfast import kernels, ops, reference
from vitfast.kernels import attention as attention_kernels
from vitfast.kernels import linear as linear_kernels
from vitfast.kernels import patch_embed as patch_embed_kernels
from vitfast.testing import assert_close

KEY = ["M_BUCKET", "N", "K", "HAS_BIAS", "ACTIVATION", "HAS_SCALE", "HAS_RESIDUAL", "STORE_Z", "INPUT_PRECISION"]
SMALL = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1)
LARGE = triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4, num_stages=1)


class Spy:
    """Counts the calls of the autotuner's run and records the BLOCK_M of each JIT launch."""

    def __init__(self, monkeypatch, tuner):
        self.tuned, self.blocks = 0, []
        real_run, real_fn_run = tuner.run, tuner.fn.run

        def run(*args, **kwargs):
            self.tuned += 1
            return real_run(*args, **kwargs)

        def fn_run(*args, **kwargs):
            self.blocks.append(kwargs["BLOCK_M"])
            return real_fn_run(*args, **kwargs)
        monkeypatch.setattr(tuner, "run", run)
        monkeypatch.setattr(tuner.fn, "run", fn_run)


@pytest.fixture
def two_config_linear(monkeypatch):
    """The linear kernel behind an autotuner of two configs whose timing prefers SMALL (the interpreter's
    own autotuner has one config, which needs no key)."""
    times = iter([[2.0, 2.0, 2.0], [1.0, 1.0, 1.0]] * 8)          # LARGE, then SMALL, per key tuned
    tuner = triton.autotune(configs=[LARGE, SMALL], key=KEY,
                            do_bench=lambda kernel_call, quantiles: next(times))(linear_kernels._linear_kernel.fn)
    monkeypatch.setattr(linear_kernels, "_linear_kernel", tuner)
    return tuner


def linear_inputs(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / math.sqrt(K),
            torch.randn(N, generator=g), torch.randn(M, N, generator=g))


def expected(x, w, b, r, activation=None):
    return reference.linear(x.double(), w.double(), b.double(), activation, r.double())


def test_a_settled_launch_skips_the_autotuner_and_runs_its_config(monkeypatch, two_config_linear):
    spy = Spy(monkeypatch, two_config_linear)
    x, w, b, r = linear_inputs(40, 48, 72)
    plan = linear_kernels.plan(x, w, b, "gelu", r, None, None, "tiled")
    y = linear_kernels.run(plan, x, w, b, r, None)
    assert spy.tuned == 1 and spy.blocks == [32]                   # "timed" both, ran the winner, SMALL
    assert_close(y, expected(x, w, b, r, "gelu"), dtype=torch.float32)
    for seed in (1, 2):                                             # new operands, same layout: no autotuner
        x, w, b, r = linear_inputs(40, 48, 72, seed)
        y = linear_kernels.run(plan, x, w, b, r, None)
        assert_close(y, expected(x, w, b, r, "gelu"), dtype=torch.float32)
    assert spy.tuned == 1 and spy.blocks == [32, 32, 32]
    assert plan.launch._direct is False             # the interpreter's kernels have no compiled form to call


def test_tuned_config_is_the_autotuners_entry_for_the_calls_key(monkeypatch, two_config_linear):
    """Checks the installed Triton's Autotuner.run against `tuned_config`: nothing is launched (the JIT
    function's run is a stub), so it runs under Triton 3.6 too, whose interpreter cannot run the kernels."""
    tuner = two_config_linear
    launched = []
    monkeypatch.setattr(tuner.fn, "run", lambda *args, grid, warmup, **kwargs: launched.append(kwargs["BLOCK_M"]))
    x, w, b, r = linear_inputs(40, 48, 72)
    plan = linear_kernels.plan(x, w, b, None, r, None, None, "tiled")
    args = (x, w, b, b, r, r, r, *plan.launch.scalars)
    assert kernels.tuned_config(tuner, args, plan.launch.meta) is None           # not tuned yet
    linear_kernels.run(plan, x, w, b, r, None)
    linear_kernels.run(plan, x, w, b, r, None)
    assert len(tuner.cache) == 1 and launched == [32, 32]
    assert kernels.tuned_config(tuner, args, plan.launch.meta) is next(iter(tuner.cache.values())) is SMALL
    other = dict(plan.launch.meta, HAS_BIAS=False)                               # another key: not tuned
    assert kernels.tuned_config(tuner, args, other) is None
    assert kernels.tuned_config(linear_kernels._linear_persistent_kernel.fn, args, {}) is None   # no autotuner


def test_a_launch_keeps_the_autotuner_when_its_key_cannot_be_found(monkeypatch, two_config_linear):
    """A Triton whose autotuner builds its cache keys otherwise: every call goes through the autotuner
    (slower, still right), none runs a config the autotuner did not choose."""
    monkeypatch.setattr(kernels, "tuned_config", lambda *args: None)
    spy = Spy(monkeypatch, two_config_linear)
    x, w, b, r = linear_inputs(40, 48, 72)
    plan = linear_kernels.plan(x, w, b, None, r, None, None, "tiled")
    for _ in range(2):
        assert_close(linear_kernels.run(plan, x, w, b, r, None), expected(x, w, b, r), dtype=torch.float32)
    assert spy.tuned == 2 and spy.blocks == [32, 32]


@pytest.fixture
def plans(monkeypatch):
    monkeypatch.setattr(ops, "_LINEAR_PLANS", {})
    monkeypatch.setattr(ops, "_ATTENTION_PLANS", {})
    monkeypatch.setattr(ops, "_PATCH_EMBED_PLANS", {})
    made = []
    real_plan, real_qkv_plan, real_pe_plan = linear_kernels.plan, attention_kernels.qkv_plan, patch_embed_kernels.plan
    monkeypatch.setattr(linear_kernels, "plan", lambda *a: made.append("linear") or real_plan(*a))
    monkeypatch.setattr(attention_kernels, "qkv_plan", lambda *a: made.append("attention") or real_qkv_plan(*a))
    monkeypatch.setattr(patch_embed_kernels, "plan", lambda *a: made.append("patch_embed") or real_pe_plan(*a))
    return made


def test_ops_linear_plans_once_per_layout(plans):
    """Same layout, new data: the plan is reused (and right). A new shape, strides, alignment, epilogue or
    TF32 setting gets a plan of its own."""
    buf = torch.randn(2, 12, 40)
    w, b, r = torch.randn(24, 32) / 6, torch.randn(24), torch.randn(2, 12, 24)
    cases = [torch.randn(2, 12, 32), torch.randn(2, 12, 32),       # second: the first's plan
             buf[..., :32],                                        # rows of stride 40
             torch.randn(12, 2, 32).transpose(0, 1),               # not flattenable in place: copied
             buf[..., 1:33]]                                       # 4 bytes off 16-byte alignment
    for x in cases:
        assert_close(ops.linear(x, w, b, residual=r), reference.linear(x.double(), w.double(), b.double(), None,
                                                                          r.double()), dtype=torch.float32)
    assert plans == ["linear"] * 4 and len(ops._LINEAR_PLANS) == 4
    ops.linear(cases[0], w, b, activation="gelu", residual=r)
    ops.linear(cases[0], w, b, residual=r.transpose(0, 1).contiguous().transpose(0, 1))   # residual copied
    assert plans == ["linear"] * 6
    from vitfast.testing import matmul_tf32
    with matmul_tf32(not kernels.tf32_enabled()):
        ops.linear(cases[0], w, b, residual=r)
    assert len(ops._LINEAR_PLANS) == 7


def test_the_plan_tables_are_bounded(monkeypatch, plans):
    monkeypatch.setattr(ops, "_MAX_PLANS", 2)
    w = torch.randn(8, 16)
    for M in (3, 4, 5):
        ops.linear(torch.randn(M, 16), w)
    assert len(ops._LINEAR_PLANS) == 1 and plans == ["linear"] * 3      # the third started the table again
    ops.linear(torch.randn(5, 16), w)
    assert plans == ["linear"] * 3


@pytest.mark.parametrize("padded", [False, True])
def test_ops_attention_qkv_plans_once_per_layout(plans, padded):
    from test_attention import check_qkv, make_qkv

    for seed in (0, 1):
        torch.manual_seed(seed)
        qkv = make_qkv(2, 11, 2, 16, padded, torch.float32)
        out, cls_attn = ops.attention_qkv(qkv, 2, return_cls_attn=True)
        check_qkv(qkv, 2, out, cls_attn, torch.float32)
    assert plans == ["attention"]
    out = ops.attention_qkv(qkv, 2)                                # without the CLS row: another plan
    assert_close(out, reference.attention_qkv(qkv.double(), 2), dtype=torch.float32)
    out = ops.attention_qkv(qkv, 2, scale=0.2)                     # another scale: another plan
    assert_close(out, reference.attention_qkv(qkv.double(), 2, 0.2), dtype=torch.float32)
    assert plans == ["attention"] * 3


def test_ops_patch_embed_plans_once_per_layout(plans):
    """New images of the same layout reuse the plan (and are right); another image layout, image dtype with
    its normalisation, or set of extras gets a plan of its own."""
    from test_patch_embed import make_inputs, reference64

    def embed(args):
        images, weight, bias, cls_token, pos_embed, mean, std = args
        out = ops.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
        assert_close(out, reference64(*args), dtype=weight.dtype)

    args = make_inputs(2, 3, 32, 32, 8, 40, "fp32", True, True)
    for seed in (1, 2):                                            # new images, same weights
        torch.manual_seed(seed)
        embed((make_inputs(2, 3, 32, 32, 8, 40, "fp32", True, True)[0], *args[1:]))
    assert plans == ["patch_embed"]
    embed((args[0].to(memory_format=torch.channels_last), *args[1:]))
    embed(make_inputs(2, 3, 32, 32, 8, 40, "u8_fp32", True, True))
    embed((*args[:3], None, None, None, None))                   # no class token, no position table
    assert plans == ["patch_embed"] * 4 and len(ops._PATCH_EMBED_PLANS) == 4
    launch = next(iter(ops._PATCH_EMBED_PLANS.values())).launch
    assert launch._run is not None and launch._direct is False     # settled (interpreter: nothing compiled)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["triton", "triton-persistent", "triton-tma"])
def test_steady_launches_on_the_gpu_equal_the_first(monkeypatch, path):
    """On the device: once a layout's launch has settled, later calls (new data, same layout) go straight to
    the JIT function with the autotuner's config and stay right, for each Triton form of the linear."""
    monkeypatch.setattr(ops, "_LINEAR_PLANS", {})
    x, w, b, r = (t.cuda().to(torch.bfloat16) for t in linear_inputs(394, 768, 2304))
    dkey = ops._linear_key(x, w, b, "gelu", r)
    if path == "triton-tma" and not dkey[-1]:
        pytest.skip("the GPU or the operands do not allow TMA")
    monkeypatch.setattr(ops, "_LINEAR_PATHS", {dkey: path})
    for seed in range(6):                                   # the weights stay, the activations change
        x, _, _, r = (t.cuda().to(torch.bfloat16) for t in linear_inputs(394, 768, 2304, seed))
        x, r = x.view(2, 197, 768), r.view(2, 197, 2304)
        if seed == 4:                                       # a residual off 16-byte alignment: same plan,
            r = torch.empty(r.numel() + 2, dtype=r.dtype, device=r.device)[2:].view(r.shape).copy_(r)
        y = ops.linear(x, w, b, activation="gelu", residual=r)   # not the direct launch (then seed 5 is)
        assert_close(y, expected(x, w, b, r, "gelu"), dtype=torch.bfloat16)
    (plan,) = ops._LINEAR_PLANS.values()
    assert plan.launch._run is not None                    # settled: the autotuner is out of the way
    assert isinstance(plan.launch._direct, kernels.DirectLaunch)    # and Triton's JIT dispatch too


@pytest.mark.gpu
def test_steady_attention_launches_on_the_gpu_equal_the_first(monkeypatch):
    from test_attention import check_qkv, make_qkv

    monkeypatch.setattr(ops, "_ATTENTION_PLANS", {})
    for seed in range(6):                                   # 3 contiguous qkv, then 3 with padded rows
        torch.manual_seed(seed)
        qkv = make_qkv(2, 197, 12, 64, seed >= 3, torch.bfloat16, "cuda")
        out, cls_attn = ops.attention_qkv(qkv, 12, return_cls_attn=True)
        check_qkv(qkv, 12, out, cls_attn, torch.bfloat16)
    assert len(ops._ATTENTION_PLANS) == 2                   # contiguous, then padded rows
    assert all(isinstance(p.launch._direct, kernels.DirectLaunch) for p in ops._ATTENTION_PLANS.values())


@pytest.mark.gpu
def test_steady_patch_embed_launches_on_the_gpu_equal_the_first(monkeypatch):
    from test_patch_embed import make_inputs, reference64

    monkeypatch.setattr(ops, "_PATCH_EMBED_PLANS", {})
    weights = make_inputs(8, 3, 224, 224, 16, 768, "u8_bf16", True, True, device="cuda")[1:]
    for seed in range(6):                                  # new uint8 images, normalised in the kernel
        torch.manual_seed(seed)
        args = (make_inputs(8, 3, 224, 224, 16, 768, "u8_bf16", True, True, device="cuda")[0], *weights)
        images, weight, bias, cls_token, pos_embed, mean, std = args
        out = ops.patch_embed(images, weight, bias, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
        assert_close(out, reference64(*args), dtype=torch.bfloat16)
    (plan,) = ops._PATCH_EMBED_PLANS.values()
    assert isinstance(plan.launch._direct, kernels.DirectLaunch)
