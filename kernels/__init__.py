"""Triton kernels, one file per op (installed as `vitfast.kernels`), and what their launchers and
autotuners share: host integer helpers, the device's shared-memory limit, the TF32 setting, the autotune
budget, the guard that keeps autotuning out of CUDA-graph captures, and `Launch`, a planned launch that
leaves the autotuner out once it has chosen."""

from __future__ import annotations

import os

import torch

# VITFAST_AUTOTUNE=quick: every autotuner keeps only the first config its prune keeps and runs it
# once, untimed (a new shape costs one compile, no benchmark), and ops.linear times its paths
# briefly. For test runs on a GPU, where correctness matters and tuning time does not pay.
AUTOTUNE_ENV = "VITFAST_AUTOTUNE"
AUTOTUNE_MODES = ("full", "quick")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host integers: the launchers' grids and shapes. Not `triton.cdiv`, which since
    Triton 3 is a constexpr function costing about 3 µs per call from Python, on every launch."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), for host integers (see `cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def smem_limit(device: torch.device) -> int:
    """Shared memory one block may use on `device` (opt-in maximum: 227 KiB on H100 / H200); the
    autotune prunes of every kernel drop tiles that need more."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may use TF32 (torch's setting, read through whichever API it has).

    torch >= 2.9 has `torch.backends.cuda.matmul.fp32_precision` ("tf32", "ieee" or "none", which
    reads back the effective value of either API); reading the legacy `allow_tf32` after the new
    API was used raises "mix of the legacy and new APIs", so it is read only on older torch."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def autotune_mode() -> str:
    """"full" (default) or "quick", from VITFAST_AUTOTUNE, read at every new autotune key."""
    mode = os.environ.get(AUTOTUNE_ENV, "full").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"{AUTOTUNE_ENV}: expected one of {AUTOTUNE_MODES}, got {mode!r}")
    return mode


def budgeted(prune):
    """An autotune prune (`early_config_prune`) that keeps only its first config in quick mode."""
    def prune_for_mode(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs)
        return kept[:1] if autotune_mode() == "quick" else kept
    prune_for_mode.__wrapped__ = prune
    return prune_for_mode


class CaptureAutotuneError(RuntimeError):
    """A kernel met a shape it has not been tuned for while a CUDA graph was being captured."""


def autotune_bench(kernel: str):
    """The `do_bench` of `kernel`'s autotuner: Triton's benchmarker, except
    - inside a CUDA-graph capture, where benchmarking would break the capture: it raises
      CaptureAutotuneError, which names the kernel and says to run the shape once first;
    - in quick mode, where the prune keeps one config: one run (compile and launch), no timing."""
    def do_bench(kernel_call, quantiles):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise CaptureAutotuneError(
                f"vitfast.kernels.{kernel}: a new shape reached the kernel during CUDA-graph capture, where it "
                f"cannot be autotuned; run the model (or op) once on this shape before capturing")
        if autotune_mode() == "quick":
            kernel_call()
            return [0.0] * len(quantiles) if quantiles else 0.0
        import triton.testing

        return triton.testing.do_bench(kernel_call, quantiles=quantiles)
    return do_bench


def tuned_config(kernel, args: tuple, kwargs: dict):
    """The config `kernel` (a Triton Autotuner) runs for a call with these arguments: its only config, or
    the one its cache holds for the call's key, built as `Autotuner.run` builds it (the `key` arguments'
    values, then the dtype of each tensor argument). None when that key is not cached (not tuned yet, or
    a Triton that builds its keys otherwise) or `kernel` is no autotuner."""
    configs = getattr(kernel, "configs", None)
    if not configs or not hasattr(kernel, "fn"):
        return None
    if len(configs) == 1:
        return configs[0]
    named = dict(zip(kernel.arg_names, args))
    named.update((k, v) for k, v in kwargs.items() if k in kernel.arg_names)
    key = [named[k] for k in kernel.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return dict.get(kernel.cache, tuple(key))          # what this process holds (read without a disk lookup)


class Launch:
    """One launch of a kernel (autotuned, or a plain JIT function) with everything but its tensors fixed: grid,
    scalar arguments and constexprs, as a launcher computes them once per shape key; the tensors keep their
    dtypes (the plans fix them). `launch(*tensors)` passes the tensors first, then the scalars. A plain JIT
    function starts at stage 2 after its first call.

    Three stages, each call taking the cheapest one that is right for it:
    1. The first call goes through the autotuner, which tunes the key when it has to.
    2. Once the autotuner holds a config for the key, calls go straight to the JIT function with that
       config, without the autotuner's per-call work (a dict of every argument and a key with each
       tensor's dtype as a string: about 14 µs of host time per launch).
    3. The JIT function returns the kernel it compiled for the call; later calls whose tensors have the
       same dtypes and 16-byte alignment, on the same current device, launch that compiled kernel with
       the arguments the JIT function would pass it (`DirectLaunch`), without its per-call binding,
       specialization and cache key: 10 to 15 µs less host time per launch, Triton 3.6 to 3.9
       (benchmarks/RESULTS.md, measured on a CPU). Any other call takes stage 2, which compiles what it
       needs."""

    __slots__ = ("kernel", "grid", "scalars", "meta", "_run", "_kwargs", "_direct")

    def __init__(self, kernel, grid, scalars: tuple, meta: dict):
        self.kernel, self.grid, self.scalars, self.meta = kernel, grid, scalars, meta
        self._run = self._kwargs = self._direct = None

    def __call__(self, *tensors):
        direct = self._direct                      # None: not tried yet; False: not possible
        if direct and direct(tensors):
            return direct.compiled
        if self._run is not None:
            ret = self._run(*tensors, *self.scalars, grid=self.grid, warmup=False, **self._kwargs)
            if direct is None:
                try:
                    jit = self.kernel.fn if hasattr(self.kernel, "configs") else self.kernel
                    direct = DirectLaunch.of(jit, ret, tensors, self.scalars, self._kwargs, self.grid)
                except Exception:      # a Triton whose internals differ: this stage stays, right and slower
                    direct = None
                self._direct = direct or False
            return ret
        args = (*tensors, *self.scalars)
        ret = self.kernel[self.grid](*args, **self.meta)
        if not hasattr(self.kernel, "configs"):          # a plain JIT function (no autotuner): stage 2 is its run
            self._kwargs, self._run = dict(self.meta), self.kernel.run
            return ret
        config = tuned_config(self.kernel, args, self.meta)
        if config is not None and config.pre_hook is None:
            self._kwargs = {**self.meta, **config.all_kwargs()}
            self._run = self.kernel.fn.run
        return ret


class DirectLaunch:
    """A kernel Triton's JIT function compiled for a launch, launched again as `JITFunction.run` launches
    it (Triton 3.6 to 3.9 call it the same way): the grid, the current stream, the launch-metadata and
    enter / exit hooks that profilers use, then every argument in the kernel's signature order.

    Valid while the call's tensors have the dtypes and 16-byte alignment the kernel was specialized on,
    and the current device is the one it was loaded on; `__call__` checks these and launches (True) or
    returns False without launching. What else the JIT function specializes on (the scalars, constexprs
    and config) is fixed by the Launch. Two things the JIT function reads on every call are not read here:
    Triton's debug and instrumentation settings (those of the first call stay), and its check that the
    kernel's globals have not changed."""

    __slots__ = ("fn", "compiled", "launcher", "grid", "grid3", "rest", "dtypes", "aligned", "device",
                 "current_device", "current_stream", "hooks")

    @classmethod
    def of(cls, fn, compiled, tensors: tuple, scalars: tuple, kwargs: dict, grid):
        """The direct launch of what `fn.run(*tensors, *scalars, grid=grid, warmup=False, **kwargs)` just
        launched and returned (`compiled`), or None when that is not a kernel Triton compiled (an
        interpreter's function, a stub), the JIT function has pre-run hooks, or its signature has a
        parameter the call left to no value."""
        import inspect

        from triton import knobs
        from triton.runtime.driver import driver

        if type(fn).__name__ != "JITFunction" or getattr(fn, "pre_run_hooks", True):
            return None
        if hasattr(compiled, "result") or not all(
                hasattr(compiled, a) for a in ("function", "packed_metadata", "launch_metadata", "run")):
            return None
        if not all(hasattr(knobs.runtime, h) for h in ("launch_enter_hook", "launch_exit_hook")):
            return None
        names, params = fn.arg_names, fn.signature.parameters
        given = len(tensors) + len(scalars)
        tail = []
        for name in names[given:]:
            value = kwargs.get(name, params[name].default)
            if value is inspect.Parameter.empty:
                return None
            tail.append(value)
        self = cls()
        args = (*tensors, *scalars, *tail)
        self.grid = grid(dict(zip(names, args))) if callable(grid) else grid
        self.grid3 = (*self.grid, 1, 1)[:3]
        self.fn, self.compiled, self.launcher, self.rest = fn, compiled, compiled.run, (*scalars, *tail)
        self.dtypes = tuple(t.dtype for t in tensors)
        self.aligned = tuple(t.data_ptr() % 16 == 0 for t in tensors)     # Triton's "D" attribute
        active = driver.active
        self.current_device, self.current_stream = active.get_current_device, active.get_current_stream
        self.device = self.current_device()
        self.hooks = knobs.runtime                  # read per launch: profilers set the hooks at any time
        return self

    def __call__(self, tensors: tuple) -> bool:
        for t, dtype, aligned in zip(tensors, self.dtypes, self.aligned):
            if t.dtype != dtype or (t.data_ptr() % 16 == 0) != aligned:
                return False
        device = self.current_device()
        if device != self.device or self.fn.pre_run_hooks:
            return False
        stream = self.current_stream(device)
        args = (*tensors, *self.rest)
        k, (g0, g1, g2), hooks = self.compiled, self.grid3, self.hooks
        self.launcher(g0, g1, g2, stream, k.function, k.packed_metadata, k.launch_metadata(self.grid, stream, *args),
                      hooks.launch_enter_hook, hooks.launch_exit_hook, *args)
        return True
