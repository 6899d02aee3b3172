"""The system test's failure report: every failed scenario shows the serial console.

A scenario's VM registers itself in :data:`CONSOLES`; when a test fails, the last lines of each
registered console are attached to its report (pytest prints them under the failure), and the
whole log stays where ``VM(log=...)`` wrote it.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.system.vm import VM

#: The VMs of the running session, by name.
CONSOLES: dict[str, VM] = {}
TAIL = 150


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        for name, vm in CONSOLES.items():
            report.sections.append(
                (
                    f"serial console of {name} (last {TAIL} lines; all of it: {vm.log_path})",
                    vm.console_tail(TAIL),
                )
            )
    return report
