"""Shared settings of the per-op pytest-benchmark suites (`pytest benchmarks/ --benchmark-only`).

pytest-benchmark reads a host clock around each round; on a GPU that times kernel launches, not
kernels. Unless the command line names a timer (`--benchmark-timer`) or a test's
`@pytest.mark.benchmark(timer=...)` does, every round here reads `vitfast.timing.sync_timer`
(CUDA synchronize, then perf_counter). The figures for tables come from each file's `main()` and
from `vitfast bench`, which time with `vitfast.timing.bench` (do_bench medians, rotated inputs).
"""

from vitfast.timing import sync_timer


def pytest_configure(config):
    # Runs before pytest-benchmark's own pytest_configure (trylast), which reads the option.
    if not any(str(a).startswith("--benchmark-timer") for a in config.invocation_params.args) \
            and hasattr(config.option, "benchmark_timer"):
        config.option.benchmark_timer = f"{sync_timer.__module__}.{sync_timer.__name__}"
