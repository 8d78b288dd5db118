"""Test-wide settings: longer pytest-timeout limits for end-to-end tests that do not set their own, and a fixture
that runs a file's tiny-tensor tests on one thread."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

# pyproject's `timeout = 300` fits a unit test; a real sweep on 2 busy CPU cores takes minutes, and a module-scoped
# fixture (a shared sweep) counts against the first test that uses it. A test's own @pytest.mark.timeout wins.
SLOW_TIMEOUT_S = 900
STRESS_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is not None:
            continue
        if item.get_closest_marker("stress") is not None:
            item.add_marker(pytest.mark.timeout(STRESS_TIMEOUT_S))
        elif item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module on one intra-op thread, restoring the count afterwards (`pytestmark = usefixtures(...)`).

    Its tensors are tiny: two spinning OpenMP threads on a shared 2-core machine made test_models 3x slower
    (76 s vs 23 s) while other jobs ran.
    """
    import torch  # here, not at the top: collecting the spec and bad-spec tests must not pay for torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
