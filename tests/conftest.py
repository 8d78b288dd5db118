"""Test-wide settings: longer pytest-timeout limits for end-to-end tests that do not set their own."""

from __future__ import annotations

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
