"""What every Triton kernel shares (vitfast.kernels): torch's TF32 setting read through either of its
APIs, autotune keys that hold each compile-time flag, the quick budget (VITFAST_AUTOTUNE=quick), and
the guard that stops a new shape from being benchmarked inside a CUDA-graph capture. On CPU the
launchers run in Triton's interpreter, with the autotuners given two configs so that a new key goes
through Triton's tuning path (prune, do_bench, cache)."""

import inspect

import pytest
import torch
import triton

import vitfast
from vitfast import kernels, ops, reference
from vitfast.kernels import attention as attention_kernels
from vitfast.kernels import linear as linear_kernels
from vitfast.kernels import patch_embed as patch_embed_kernels
from vitfast.testing import assert_close, matmul_tf32, tolerance_key


@pytest.fixture
def restore_tf32():
    """Put torch's matmul precision back to its default ("none": no TF32) after the test."""
    yield
    torch.backends.cuda.matmul.fp32_precision = "none"
    torch.backends.fp32_precision = "none"


@pytest.mark.parametrize("setting,expected", [
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'", True),      # the new API (transformers sets it)
    ("torch.backends.cuda.matmul.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'tf32'", True),                  # the global default of the new API
    ("torch.backends.cuda.matmul.allow_tf32 = True", True),            # the legacy API
    ("torch.set_float32_matmul_precision('high')", True),
    ("pass", False),                                                   # torch's default
])
def test_tf32_setting_is_read_through_either_api(setting, expected, restore_tf32):
    exec(setting)
    assert kernels.tf32_enabled() is expected
    assert tolerance_key(torch.float32, "cuda") == ("tf32" if expected else torch.float32)
    with matmul_tf32(not expected):
        assert kernels.tf32_enabled() is (not expected)
    assert kernels.tf32_enabled() is expected


def test_ops_and_model_run_after_the_new_tf32_api(restore_tf32):
    """After `torch.backends.cuda.matmul.fp32_precision = "tf32"`, torch refuses reads of the legacy
    `allow_tf32` ("mix of the legacy and new APIs"); no op or model may read it."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))                 # (B, H, N, D)
    assert_close(ops.attention(q, k, v), reference.attention(q.double(), k.double(), v.double()))
    x, w, b = torch.randn(5, 32), torch.randn(24, 32) * 32 ** -0.5, torch.randn(24)
    assert_close(ops.linear(x, w, b, activation="gelu"), reference.linear(x.double(), w.double(), b.double(), "gelu"))
    kw = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    model = vitfast.VisionTransformer(**kw).eval()
    ref = reference.VisionTransformer(**kw).double().eval()
    ref.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(images), ref(images.double()))


AUTOTUNERS = {
    "attention": attention_kernels._attention_fwd_kernel,
    "attention_bwd_dkdv": attention_kernels._attention_bwd_dkdv_kernel,
    "attention_bwd_dq": attention_kernels._attention_bwd_dq_kernel,
    "linear": linear_kernels._linear_kernel,
    "linear_persistent": linear_kernels._linear_persistent_kernel,
    "patch_embed": patch_embed_kernels._patch_embed_kernel,
}
# constexprs that are functions of a key argument: attention's head-dim chunks follow HEAD_DIM.
DERIVED = {"attention": {"D_LO", "D_HI"}, "attention_bwd_dkdv": {"D_LO", "D_HI"}, "attention_bwd_dq": {"D_LO", "D_HI"}}


@pytest.mark.parametrize("name", AUTOTUNERS)
def test_key_holds_every_compile_time_flag(name):
    """A config tuned for one value of a flag must not be reused for another: the flag changes the code,
    its registers and shared memory (fp32 tf32 vs ieee dots, normalising in the patch-embed load)."""
    tuner = AUTOTUNERS[name]
    params = inspect.signature(tuner.base_fn).parameters
    constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    meta = {k for c in tuner.configs for k in c.kwargs}
    missing = constexprs - meta - set(tuner.keys) - DERIVED.get(name, set())
    assert not missing, f"{name}: constexpr flags missing from the autotune key: {sorted(missing)}"


@pytest.mark.parametrize("name", AUTOTUNERS)
def test_do_bench_refuses_to_benchmark_during_capture(name, monkeypatch):
    tuner = AUTOTUNERS[name]
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    kernel = {"attention_bwd_dkdv": r"attention backward \(dk, dv\)",
              "attention_bwd_dq": r"attention backward \(dq\)"}.get(name, name.removesuffix("_persistent"))
    with pytest.raises(kernels.CaptureAutotuneError, match=f"kernels.{kernel}: .*before capturing"):
        tuner.do_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8))
    assert calls == []                                        # nothing was launched


def test_quick_mode_keeps_the_first_config_and_runs_it_once(monkeypatch):
    configs = [triton.Config({"BLOCK_M": m}, num_warps=4) for m in (16, 32, 64)]
    prune = kernels.budgeted(lambda cs, nargs, **kw: cs[1:])
    monkeypatch.delenv(kernels.AUTOTUNE_ENV, raising=False)
    assert prune(configs, {}) == configs[1:]
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "quick")
    assert prune(configs, {}) == configs[1:2]
    calls = []
    assert kernels.autotune_bench("linear")(lambda: calls.append(1), (0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert calls == [1]
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "slow")
    with pytest.raises(ValueError, match="VITFAST_AUTOTUNE: expected one of"):
        prune(configs, {})


# --------------------------------------------------------------------------------------------
# Through the real launchers and Triton's Autotuner.run
# --------------------------------------------------------------------------------------------
def _attention_case():
    q, k, v = (torch.randn(1, 2, 23, 16) for _ in range(3))            # (B, H, N, D)
    return (lambda: attention_kernels.attention(q, k, v)), reference.attention(q, k, v)


def _linear_case():
    x, w, b = torch.randn(23, 48), torch.randn(40, 48) * 48 ** -0.5, torch.randn(40)
    return (lambda: linear_kernels.linear(x, w, b, activation="gelu")), reference.linear(x, w, b, "gelu")


def _patch_embed_case():
    images, w = torch.randint(0, 256, (1, 3, 16, 24), dtype=torch.uint8), torch.randn(24, 3, 8, 8) * 0.05
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.3, 0.25])
    return ((lambda: patch_embed_kernels.patch_embed(images, w, None, mean=mean, std=std)),
            reference.patch_embed(images, w, None, None, None, mean, std))


LAUNCHES = {"attention": ("attention", _attention_case), "linear": ("linear", _linear_case),
            "patch_embed": ("patch_embed", _patch_embed_case)}


@pytest.mark.parametrize("name", LAUNCHES)
def test_new_shape_during_capture_raises_and_a_warmed_shape_replays(name, monkeypatch):
    """A capture that meets an untuned key stops with CaptureAutotuneError before anything is
    benchmarked or launched; after one run outside the capture the same key runs inside it."""
    tuner_name, case = LAUNCHES[name]
    tuner = AUTOTUNERS[tuner_name]
    one = tuner.configs[0]
    two = triton.Config(dict(one.kwargs), num_warps=2 * one.num_warps, num_stages=one.num_stages)
    monkeypatch.setattr(tuner, "configs", [one, two])      # two configs: Autotuner.run tunes each new key
    monkeypatch.setattr(tuner, "cache", {})
    monkeypatch.delenv(kernels.AUTOTUNE_ENV, raising=False)
    capturing = {"on": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing["on"])
    run, expected = case()
    with pytest.raises(kernels.CaptureAutotuneError, match="run the model .* once on this shape"):
        run()
    assert tuner.cache == {}
    capturing["on"] = False
    # Outside the capture the key is tuned; quick mode, because a CPU has nothing to time with: the
    # first config, run once (Triton >= 3.9 skips the benchmark of a single config).
    monkeypatch.setenv(kernels.AUTOTUNE_ENV, "quick")
    assert_close(run(), expected, dtype=torch.float32)
    assert len(tuner.cache) == 1
    capturing["on"] = True
    assert_close(run(), expected, dtype=torch.float32)     # a tuned key launches inside a capture


def test_host_integer_helpers_equal_tritons():
    """The launchers' grids use kernels.cdiv / next_power_of_2 (plain Python), not Triton's constexpr
    functions (microseconds per call from the host): the same values."""
    for n in [*range(1, 1100), 2**31 - 1, 2**31, 2**31 + 1, 50432, 12345678901]:
        assert kernels.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 64, 128, 257):
            assert kernels.cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert kernels.cdiv(0, 64) == 0 and kernels.next_power_of_2(0) == 1


def test_device_facts_are_read_once_per_device(monkeypatch):
    """The linear launcher's compute capability (TMA) and SM count (persistent grid) come from one read of
    the device's properties per device, not one per launch."""
    from types import SimpleNamespace

    reads = []
    props = {0: SimpleNamespace(major=9, minor=0, multi_processor_count=132),
             1: SimpleNamespace(major=8, minor=0, multi_processor_count=108)}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: reads.append(i) or props[i])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(linear_kernels, "_DEVICES", {})
    for _ in range(3):
        assert linear_kernels.device_capability(torch.device("cuda", 0)) == (9, 0)
        assert linear_kernels._num_programs(torch.device("cuda", 0)) == 132
        assert linear_kernels._num_programs(torch.device("cuda")) == 108           # the current device
    assert reads == [0, 1]
    assert linear_kernels._num_programs(torch.device("cpu")) == 3                   # the interpreter
