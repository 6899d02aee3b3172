"""The health check of a trial boot: is the new slot good enough to keep?

Checks, each with a timeout, all run (an operator wants every reason, not the first):

- every configured systemd unit is active (``systemctl is-active``; one still activating is
  waited for, up to the timeout);
- ``systemctl is-system-running`` does not say "degraded" (configurable);
- every executable in the health.d directory exits 0. They must be trusted like hooks
  (root-owned, not group/world-writable, every parent too), and run with a clean environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

from updater.config import HealthConfig
from updater.errors import HookError
from updater.hooks import check_trusted

log = logging.getLogger("updater.health")

_clock = time.monotonic  # module-level, so that tests can run the waiting on a fake clock
_sleep = time.sleep

CLEAN_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def run_checks(config: HealthConfig, *, slot: str, version: str) -> list[str]:
    """Every failed check as a sentence; an empty list means healthy."""
    failures: list[str] = []
    deadline = _clock() + config.timeout  # one wait for all the units, not one each
    for unit in config.units:
        state = _unit_state(unit, deadline)
        if state != "active":
            failures.append(f"unit {unit} is not active: {state}")
    if config.system_running:
        # Not --wait: this check is part of the boot, which cannot finish while it runs.
        # "starting" is fine here; a unit that already failed makes the system "degraded".
        ok, out = _run(["systemctl", "is-system-running"], config.timeout)
        state = out.strip().splitlines()[-1] if out.strip() else "unknown"
        if state not in ("running", "starting"):
            failures.append(f"the system is {state}, not running")
    for program in _health_programs(Path(config.directory), failures):
        env = {**CLEAN_ENV, "RPI_UPDATER_SLOT": slot, "RPI_UPDATER_VERSION": version}
        ok, out = _run([str(program)], config.timeout, env=env)
        if not ok:
            failures.append(f"{program.name} failed{_tail(out)}")
    for failure in failures:
        log.warning("health check: %s", failure)
    return failures


def _unit_state(unit: str, deadline: float, poll: float = 1.0) -> str:
    """The unit's state once it has settled. The check runs while the boot is still going, so a
    unit still starting ("activating"), or with a start job not run yet (still "inactive"),
    is waited for, until ``deadline``."""
    while True:
        ok, out = _run(
            ["systemctl", "show", "--property=ActiveState", "--property=Job", "--", unit],
            max(1.0, deadline - _clock()),
            stdout_only=True,
        )
        if not ok:
            return f"unknown ({out.strip()[-200:] or 'systemctl show failed'})"
        props = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
        state = props.get("ActiveState", "").strip() or "unknown"
        pending = bool(props.get("Job", "").strip())
        settling = state in ("activating", "reloading", "deactivating") or (
            state == "inactive" and pending
        )
        if not settling or _clock() >= deadline:
            return state
        _sleep(min(poll, max(0.0, deadline - _clock())))


def _health_programs(directory: Path, failures: list[str]) -> list[Path]:
    """The trusted executables of health.d, in name order (like run-parts)."""
    if not directory.is_dir():
        return []
    programs = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.name.endswith(("~", ".dpkg-old", ".dpkg-dist")):
            continue
        try:
            check_trusted(str(path))
        except HookError as err:
            failures.append(f"{path.name} refused: {err.message}")
            continue
        programs.append(path)
    return programs


def _run(
    cmd: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
    *,
    stdout_only: bool = False,
) -> tuple[bool, str]:
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            env=env if env is not None else {**CLEAN_ENV, **_systemd_env()},
            cwd="/",
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:g} s"
    except OSError as err:
        return False, f"cannot run {cmd[0]}: {err.strerror or err}"
    if stdout_only:
        return proc.returncode == 0, proc.stdout
    return proc.returncode == 0, (proc.stdout + proc.stderr)


def _systemd_env() -> dict[str, str]:
    """systemctl may need these to reach the manager (a user session in tests, never secrets)."""
    keys = ("SYSTEMD_BUS_TIMEOUT", "XDG_RUNTIME_DIR", "DBUS_SYSTEM_BUS_ADDRESS")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _tail(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return f": {lines[-1][:200]}" if lines else ""
