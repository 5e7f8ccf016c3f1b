"""One timing helper for every benchmark (the `vitfast bench` sweep and `benchmarks/`).

GPU: medians of `triton.testing.do_bench` (CUDA events, warm-up, L2 flushed between reps),
with inputs rotated over a pool larger than L2 so no rep reads a warm cache.
CPU: medians of `time.perf_counter` after warm-up.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

L2_BYTES = 64 * 2**20   # larger than any current NVIDIA L2 (H100/H200: 50 MB)


def rotating_inputs(make: Callable[[], Sequence[torch.Tensor]], min_bytes: int = 2 * L2_BYTES,
                    max_sets: int = 16) -> list:
    """Enough independent input sets from `make()` that together they exceed `min_bytes`
    (at least 1, at most max_sets)."""
    first = list(make())
    size = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor)) or 1
    n = max(1, min(max_sets, -(-min_bytes // size)))
    return [first] + [list(make()) for _ in range(n - 1)]


def bench(fn: Callable, inputs: list | None = None, *, device: str | torch.device = "cuda",
          warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 5) -> float:
    """Median milliseconds of one call. `fn(*inputs[i])` cycles through the input sets
    (see rotating_inputs); with inputs None, `fn()` is timed."""
    sets = inputs or [[]]
    state = {"i": 0}

    def call():
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*args)

    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    call()   # warm-up (and first-call compilation)
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def caller_ms(fn: Callable, *, device: str | torch.device = "cuda", calls: int = 20, warmup: int = 3) -> float:
    """Milliseconds per call as a caller pays them: `calls` back-to-back calls between two events (CUDA)
    or clock reads (CPU), inputs as they are, no cache flush. Host time counts: when launching takes
    longer than the kernels run, the device waits and the time shows it."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def sync_timer() -> float:
    """`time.perf_counter` after the pending CUDA work has finished: the clock pytest-benchmark
    uses in `benchmarks/` (a bare clock would time kernel launches, not kernels)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()
