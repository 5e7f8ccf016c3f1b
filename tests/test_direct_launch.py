"""A settled launch calls the kernel Triton compiled for it directly (`vitfast.kernels.DirectLaunch`), and
passes Triton's launcher exactly what `JITFunction.run` passes it for the same call; calls the compiled
kernel was not specialized for go back through the JIT function.

Runs real Triton compiles for sm_90 without a GPU (`vitfast.testing.compile_only_triton`: Triton's
bundled ptxas, launches recorded, nothing run), in a subprocess without TRITON_INTERPRET, which conftest.py
sets on machines without CUDA. `make compile-check-oldest` runs it under the oldest Triton vitfast
supports too. Whether the kernels then compute the right values on a GPU is `test_launch.py`'s `gpu`
tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = r'''
import json, sys
try:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    get_ptxas(90)
except Exception as e:      # no CUDA backend or no bundled ptxas: nothing to compile with
    print(json.dumps({"skip": f"Triton's CUDA backend is not usable here: {type(e).__name__}: {e}"}))
    sys.exit(0)

import torch

from vitfast.kernels import attention as A
from vitfast.kernels import linear as L
from vitfast.kernels import patch_embed as P
from vitfast.kernels import rope as R
from vitfast.testing import compile_only_triton

launches = []


def same(a, b):
    """Two recorded launcher calls are equal: the same tensors (identity), equal values of equal types,
    equal launch metadata."""
    if len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor) or isinstance(v, torch.Tensor):
            ok = u is v
        elif type(u).__name__ == "LazyDict":
            ok = type(v) is type(u) and u.get() == v.get()
        else:
            ok = type(u) is type(v) and u == v
        if not ok:
            return False
    return True


def check(launch, new_tensors):
    """Settles `launch`, then checks its direct launches against the JIT function's own on the same tensors,
    and which calls go back through the JIT function."""
    fn = launch.kernel.fn if hasattr(launch.kernel, "configs") else launch.kernel   # autotuned, or a JIT function
    real_run, jit_calls = fn.run, []
    def counted(*args, **kwargs):
        jit_calls.append(1)
        return real_run(*args, **kwargs)
    fn.run = counted
    out = {}
    try:
        launch(*new_tensors())                           # the autotuner (quick mode: one config, untimed)
        n = len(jit_calls)
        launch(*new_tensors())                           # the JIT function with the autotuner's config
        direct = launch._direct
        out["settled"] = [type(direct).__name__, len(jit_calls) - n]
        first = launches[-1]
        matches = []
        for _ in range(3):                               # new tensors: direct launches, no JIT call
            tensors = new_tensors()
            n = len(jit_calls)
            recorded = len(launches)
            ret = launch(*tensors)
            mine = launches[-1]
            real_run(*tensors, *launch.scalars, grid=launch.grid, warmup=False, **launch._kwargs)
            theirs = launches[-1] if len(launches) == recorded + 2 else None     # one launch each, recorded
            matches.append([len(jit_calls) == n, ret is direct.compiled, theirs is not None and same(mine, theirs),
                            all(a is b for a, b in zip(mine[9:], tensors)), mine[4] == first[4]])
        out["direct"] = matches
        tensors = new_tensors()
        n = len(launches)
        checks = {"dtype": (tensors[0].double(), *tensors[1:]), "aligned": (offset(tensors[0]), *tensors[1:])}
        refused = {k: direct(t) for k, t in checks.items()}
        fn.pre_run_hooks.append(lambda *args, **kwargs: None)
        refused["pre_run_hook"] = direct(tensors)
        fn.pre_run_hooks.clear()
        current = direct.current_device
        direct.current_device = lambda: 1
        refused["device"] = direct(tensors)
        direct.current_device = current
        out["refused"] = [refused, len(launches) == n]
        n = len(jit_calls)                               # a misaligned x: the JIT function, another kernel
        launch(*checks["aligned"])
        out["misaligned"] = [len(jit_calls) - n, launches[-1][4] != first[4]]
        n = len(jit_calls)
        launch(*tensors)                                 # aligned again: direct, the first kernel
        out["realigned"] = [len(jit_calls) - n, launches[-1][4] == first[4]]
    finally:
        fn.run = real_run
    return out


def offset(t):
    """t's values at an address 2 elements past a 16-byte boundary (not 16-byte aligned)."""
    flat = torch.empty(t.numel() + 2, dtype=t.dtype)[2:]
    return flat.view(t.shape).copy_(t)


results = {}
with compile_only_triton(launches), torch.inference_mode():
    M, K, N = 40, 64, 96
    for variant, dtype in (("tiled", torch.float16), ("persistent", torch.bfloat16)):
        x, w, b, r = (torch.randn(M, K, dtype=dtype), torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype),
                      torch.randn(M, N, dtype=dtype))
        plan = L.plan(x, w, b, "gelu", r, None, None, variant)
        def linear_tensors():
            x, r, out = torch.randn(M, K, dtype=dtype), torch.randn(M, N, dtype=dtype), torch.empty(M, N, dtype=dtype)
            return (x, w, b, out, r, out, out)           # what linear.run passes: bias, out for scale, residual
        results[f"linear-{variant}"] = check(plan.launch, linear_tensors)
    B, T, H, D = 2, 17, 2, 64
    qkv = torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16)
    plan = A.qkv_plan(qkv, H, D ** -0.5, True, False)
    def attention_tensors():
        qkv, C = torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16), H * D
        out, cls = torch.empty(B, T, C, dtype=torch.bfloat16), torch.empty(B, H, T)
        return (qkv, qkv.narrow(2, C, C), qkv.narrow(2, 2 * C, C), out, cls, out, out, out, out, out,
                out)                                                                              # out: unread
    results["attention_qkv"] = check(plan.launch, attention_tensors)
    # With a key-padding mask read through strides (a [T, 2B] buffer's every other column): the mask's
    # strides are the plan's, the mask's bytes (uint8) a tensor of each call.
    plan = A.qkv_plan(qkv, H, D ** -0.5, False, True, torch.ones(T, 2 * B, dtype=torch.bool).t()[::2])
    def masked_attention_tensors():
        qkv, C = torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16), H * D
        out, lse = torch.empty(B, T, C, dtype=torch.bfloat16), torch.empty(B, H, T)
        mask = (torch.rand(T, 2 * B) < 0.5).t()[::2]
        return (qkv, qkv.narrow(2, C, C), qkv.narrow(2, 2 * C, C), out, out, lse, mask.view(torch.uint8), out, out,
                out, out)
    results["attention_qkv-mask"] = check(plan.launch, masked_attention_tensors)
    # Packed segments: the segment count and max_seqlen are the plan's, the boundaries (int32) a tensor of
    # each call.
    plan = A.qkv_plan(qkv[:1], H, D ** -0.5, False, True, None, torch.tensor([0, 5, 17], dtype=torch.int32), 12)
    def varlen_attention_tensors():
        qkv, C = torch.randn(1, T, 3 * H * D, dtype=torch.bfloat16), H * D
        out, lse = torch.empty(1, T, C, dtype=torch.bfloat16), torch.empty(1, H, T)
        cu = torch.tensor([0, int(torch.randint(6, 12, ())), T], dtype=torch.int32)
        return (qkv, qkv.narrow(2, C, C), qkv.narrow(2, 2 * C, C), out, out, lse, out, cu, out, out, out)
    results["attention_qkv-varlen"] = check(plan.launch, varlen_attention_tensors)
    # SAM's relative positions over a 3 x 6 key grid (T = 18): the grid is the plan's, the terms tensors of each call.
    plan = A.qkv_plan(torch.randn(B, 18, 3 * H * D, dtype=torch.bfloat16), H, D ** -0.5, False, False,
                      rel_kh_kw=(3, 6))
    def rel_pos_attention_tensors():
        qkv, C = torch.randn(B, 18, 3 * H * D, dtype=torch.bfloat16), H * D
        out = torch.empty(B, 18, C, dtype=torch.bfloat16)
        return (qkv, qkv.narrow(2, C, C), qkv.narrow(2, 2 * C, C), out, out, out, out, out, torch.randn(B, H, 18, 3),
                torch.randn(B, H, 18, 6), out)
    results["attention_qkv-rel_pos"] = check(plan.launch, rel_pos_attention_tensors)
    # A dense bias shared by the batch (BEiT's relative position bias, bf16 [1, H, T, T]): its strides are the plan's
    # (batch stride 0), the bias a tensor of each call.
    plan = A.qkv_plan(qkv, H, D ** -0.5, False, True, bias=torch.randn(1, H, T, T, dtype=torch.bfloat16))
    def bias_attention_tensors():
        qkv, C = torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16), H * D
        out, lse = torch.empty(B, T, C, dtype=torch.bfloat16), torch.empty(B, H, T)
        return (qkv, qkv.narrow(2, C, C), qkv.narrow(2, 2 * C, C), out, out, lse, out, out, out, out,
                torch.randn(1, H, T, T, dtype=torch.bfloat16))
    results["attention_qkv-bias"] = check(plan.launch, bias_attention_tensors)
    B, D = 2, 64
    weight, bias = torch.randn(D, 3, 16, 16, dtype=torch.bfloat16), torch.randn(D, dtype=torch.bfloat16)
    cls, pos, mean, std = (torch.randn(1, 1, D, dtype=torch.bfloat16), torch.randn(1, 5, D, dtype=torch.bfloat16),
                           torch.rand(3), torch.rand(3) + 0.5)
    images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
    plan = P.plan(images, weight, bias, cls, pos, mean, std, True)
    def patch_embed_tensors():
        images = torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8)
        out = torch.empty(B, 5, D, dtype=torch.bfloat16)
        return (images, weight, bias, cls.reshape(-1, D), pos.reshape(-1, D), mean, std, out)  # as run passes
    results["patch_embed"] = check(plan.launch, patch_embed_tensors)
    B, T, H, D = 2, 17, 2, 64                            # RoPE: a plain JIT function (no autotuner)
    plan = R.plan(torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16), H, T - 1).launch
    def rope_tensors():
        qkv = torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16)
        cos = torch.rand(T - 1, D // 2)
        return (qkv, torch.empty_like(qkv), cos, torch.rand(T - 1, D // 2), cos)     # cos for the unread weight
    results["rope"] = check(plan, rope_tensors)
    plan = R.plan(torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16), H, T, in_place=True, norm="qkv",
                  eps=1e-6).launch                       # with the heads' norms first (norm_rope_qkv), in place
    def norm_rope_tensors():
        qkv = torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16)
        return (qkv, qkv, torch.rand(T, D // 2), torch.rand(T, D // 2), torch.randn(2, D, dtype=torch.bfloat16))
    results["rope-norm"] = check(plan, norm_rope_tensors)
    backward = R.backward_plan(torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16), H, T - 1, "qk", 1e-6)
    def norm_rope_backward_tensors():                    # its backward: qkv, dout, dqkv, the weights' parts, ...
        qkv = torch.randn(B, T, 3 * H * D, dtype=torch.bfloat16)
        return (qkv, torch.randn_like(qkv), torch.empty_like(qkv), torch.empty(backward.parts),
                torch.rand(T - 1, D // 2), torch.rand(T - 1, D // 2), torch.randn(2, D, dtype=torch.bfloat16))
    results["rope-norm-backward"] = check(backward.launch, norm_rope_backward_tensors)
print(json.dumps({"results": results}))
'''


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VITFAST_AUTOTUNE"] = "quick"
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in report:
        pytest.skip(report["skip"])
    return report["results"]


CASES = ["linear-tiled", "linear-persistent", "attention_qkv", "attention_qkv-mask", "attention_qkv-varlen",
         "attention_qkv-rel_pos", "attention_qkv-bias",
         "patch_embed", "rope", "rope-norm", "rope-norm-backward"]


@pytest.mark.parametrize("case", CASES)
def test_direct_launches_pass_what_the_jit_function_passes(results, case):
    r = results[case]
    assert r["settled"] == ["DirectLaunch", 1]           # after the autotuner's call, one JIT call
    # each direct launch: no JIT call, returns the compiled kernel, records what the JIT function records
    # for the same tensors, passes the new tensors, runs the settled kernel
    assert r["direct"] == [[True] * 5] * 3


@pytest.mark.parametrize("case", CASES)
def test_calls_the_compiled_kernel_does_not_fit_go_through_the_jit_function(results, case):
    r = results[case]
    refused, nothing_launched = r["refused"]
    assert refused == {"dtype": False, "aligned": False, "pre_run_hook": False, "device": False}
    assert nothing_launched
    assert r["misaligned"] == [1, True]                  # Triton compiled it another kernel
    assert r["realigned"] == [0, True]                   # and the settled one runs again directly
