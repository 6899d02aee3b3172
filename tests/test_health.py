"""The health check's systemd side, with ``systemctl`` answered by a script of states: no
systemd runs as PID 1 on this machine (issue 8's VM will run the real one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import updater.health as health
from updater.config import HealthConfig


class Systemctl:
    """Answers ``systemctl show --property=ActiveState --property=Job UNIT`` from a list of
    (state, job) per unit, in order (the last one repeats), and ``is-system-running`` with
    ``system``."""

    def __init__(self, states: dict[str, list[tuple[str, str]]], system: str = "running") -> None:
        self.states = {unit: iter(seq) for unit, seq in states.items()}
        self.last: dict[str, tuple[str, str]] = {}
        self.system = system
        self.calls: list[list[str]] = []

    def __call__(
        self,
        cmd: list[str],
        timeout: float,
        env: dict[str, str] | None = None,
        *,
        stdout_only: bool = False,
    ) -> tuple[bool, str]:
        self.calls.append(cmd)
        if cmd[:2] == ["systemctl", "is-system-running"]:
            return self.system == "running", f"{self.system}\n"
        assert cmd[:4] == ["systemctl", "show", "--property=ActiveState", "--property=Job"], cmd
        assert stdout_only, "a warning on stderr must not be taken for the state"
        unit = cmd[-1]
        state, job = next(self.states[unit], self.last.get(unit, ("unknown", "")))
        self.last[unit] = (state, job)
        return True, f"ActiveState={state}\nJob={job}\n"


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    clock = [0.0]
    monkeypatch.setattr(health, "_clock", lambda: clock[0])

    def sleep(seconds: float) -> None:
        clock[0] += max(seconds, 0.001)

    monkeypatch.setattr(health, "_sleep", sleep)
    yield


def config(tmp_path: Path, *units: str, system_running: bool = False) -> HealthConfig:
    return HealthConfig(
        units=units,
        system_running=system_running,
        directory=str(tmp_path / "none"),
        timeout=10,
    )


def test_active_units_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Systemctl({"app.service": [("active", "")]})
    monkeypatch.setattr(health, "_run", fake)

    assert health.run_checks(config(tmp_path, "app.service"), slot="B", version="v") == []


def test_a_unit_queued_or_still_activating_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_sleep: None
) -> None:
    fake = Systemctl({"app.service": [("inactive", "17"), ("activating", "17"), ("active", "")]})
    monkeypatch.setattr(health, "_run", fake)

    assert health.run_checks(config(tmp_path, "app.service"), slot="B", version="v") == []
    assert len(fake.calls) == 3


def test_a_unit_activating_past_the_timeout_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_sleep: None
) -> None:
    fake = Systemctl({"app.service": [("activating", "17")]})
    monkeypatch.setattr(health, "_run", fake)

    failures = health.run_checks(config(tmp_path, "app.service"), slot="B", version="v")

    assert failures == ["unit app.service is not active: activating"]
    assert 9 <= len(fake.calls) <= 12, "polled about once a second for the 10 s timeout"


def test_a_failed_unit_fails_at_once_and_every_reason_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_sleep: None
) -> None:
    fake = Systemctl(
        {"app.service": [("failed", "")], "db.service": [("inactive", "")]}, system="degraded"
    )
    monkeypatch.setattr(health, "_run", fake)
    cfg = config(tmp_path, "app.service", "db.service", system_running=True)

    failures = health.run_checks(cfg, slot="B", version="v")

    assert failures == [
        "unit app.service is not active: failed",
        "unit db.service is not active: inactive",
        "the system is degraded, not running",
    ]
    assert len(fake.calls) == 3


def test_units_share_one_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_sleep: None
) -> None:
    fake = Systemctl({"a.service": [("activating", "1")], "b.service": [("activating", "2")]})
    monkeypatch.setattr(health, "_run", fake)

    failures = health.run_checks(config(tmp_path, "a.service", "b.service"), slot="B", version="v")

    assert failures == [
        "unit a.service is not active: activating",
        "unit b.service is not active: activating",
    ]
    assert len(fake.calls) <= 12, "10 s in all, not 10 s each"
