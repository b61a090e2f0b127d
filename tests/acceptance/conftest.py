"""Acceptance tests start Ferry's processes; a failing test's report carries their logs."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.acceptance.stack import Stack


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Stack):
                report.sections.extend(value.report())
    return report
