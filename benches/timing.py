"""Helpers shared by the benchmark files (not a benchmark itself)."""


def mean_seconds(benchmark):
    """The measured mean, or None when benchmarks are disabled (nothing was timed)."""
    return benchmark.stats.stats.mean if benchmark.stats is not None else None
