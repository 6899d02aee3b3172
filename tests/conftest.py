"""Fixtures for the real parts: a test CA, a session nginx, a per-test fault proxy, loop devices.

Also the CI rule: with ``CI=true`` a skipped test fails the run, so a machine that lacks nginx or
root cannot pass CI by skipping what it could not run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# `tests` has no __init__.py of its own: make `import tests.harness` work however pytest is run.
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from tests.harness import (  # noqa: E402
    Docroot,
    FaultProxy,
    LoopDevices,
    Nginx,
    TlsFiles,
    find_nginx,
    in_ci,
    loop_devices_available,
    make_tls_files,
    require,
)


class _NoSkipsInCI:
    """Turns every skip (but not xfail) into a failed run; installed only when CI=true."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def _note(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            self.skipped.append(report.nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._note(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._note(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.skipped and session.exitstatus in (
            pytest.ExitCode.OK,
            pytest.ExitCode.NO_TESTS_COLLECTED,
        ):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.skipped:
            return
        terminalreporter.write_sep(
            "=", f"CI=true: {len(self.skipped)} skipped test(s) fail the run", red=True, bold=True
        )
        for nodeid in self.skipped:
            terminalreporter.write_line(f"SKIPPED (not allowed in CI) {nodeid}", red=True)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--system",
        action="store_true",
        help="run the system test in tests/system (a VM booting the A/B image: minutes; "
        "`make system-test`); without it tests/system is not collected",
    )


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/system only with --system: `make test` stays quick, `make system-test` runs it."""
    system = Path(__file__).resolve().parent / "system"
    if collection_path.resolve() == system and not config.getoption("--system"):
        return True
    return None


def pytest_configure(config: pytest.Config) -> None:
    if in_ci():
        config.pluginmanager.register(_NoSkipsInCI(), "no-skips-in-ci")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """The test CA (``ca_file``) and the server certificate for 127.0.0.1/localhost."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def nginx(tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """One nginx for the session; a test may stop it, and it is started again before the next."""
    require(find_nginx() is not None, "nginx not installed (Debian package nginx-light)")
    work = tmp_path_factory.mktemp("nginx")
    server = Nginx(work / "docroot", tls_files, work / "run")
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _nginx_running(request: pytest.FixtureRequest) -> None:
    """Bring the session nginx back up for a test that uses it, if a test before stopped it."""
    if "nginx" in request.fixturenames:
        server = request.getfixturevalue("nginx")
        assert isinstance(server, Nginx)
        server.start()


@pytest.fixture
def docroot(nginx: Nginx) -> Iterator[Docroot]:
    """Puts files into nginx's docroot (``add_random``, ``add_bytes``); removed after the test."""
    files = Docroot(nginx.root)
    yield files
    files.cleanup()


@pytest.fixture
def fault_proxy(nginx: Nginx, tls_files: TlsFiles) -> Iterator[FaultProxy]:
    """A fresh fault proxy (empty script, empty log) in front of the session nginx."""
    proxy = FaultProxy(nginx.plain_port, tls_files)
    proxy.start()
    yield proxy
    proxy.stop()
    assert not proxy.errors, f"fault proxy hit unexpected errors: {proxy.errors}"


@pytest.fixture
def loop_devices() -> Iterator[LoopDevices]:
    """``loop_devices.attach(file, offset=..., size_limit=...)``; all detached after the test."""
    available, why = loop_devices_available()
    require(available, why)
    with LoopDevices() as devices:
        yield devices


# --- MQTT: a private mosquitto broker and a recorder of what it carries -------------------------

from tests.harness import Mosquitto, Recorder, mosquitto_available  # noqa: E402


@pytest.fixture(scope="session")
def mosquitto(tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the session (TLS, passwords, the device ACL); see harness/mosquitto.py.

    A test that stops or kills it must ``start()`` it again (in a ``finally``); ``broker_log``
    starts it again too.
    """
    available, why = mosquitto_available()
    require(available, why)
    server = Mosquitto(tls_files, tmp_path_factory.mktemp("mosquitto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def broker_log(mosquitto: Mosquitto) -> Iterator[Recorder]:
    """A started Recorder: every message through the session broker, in order; stopped after."""
    mosquitto.start()
    recorder = Recorder(mosquitto).start()
    yield recorder
    recorder.stop()


@pytest.fixture
def trusted_dir() -> Iterator[Path]:
    """A root-owned 0755 directory under /run for programs the updater must trust (hooks,
    health checks): pytest's tmp_path lives under /tmp (1777), which the updater refuses."""
    import os
    import shutil
    import tempfile

    require(os.geteuid() == 0, "trusted programs must be root-owned: run the tests as root")
    path = Path(tempfile.mkdtemp(prefix="rpi-updater-trusted-", dir="/run"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
