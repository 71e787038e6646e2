import pytest


@pytest.fixture(scope="session")
def bench_enabled(request) -> bool:
    """False under ``--benchmark-disable`` (CI's smoke run: each benchmark once, on small inputs)."""
    return not request.config.getoption("benchmark_disable")
