"""The Debian package (issue 7), built and installed as an operator would.

- ``make package`` builds it from a clean copy of the work tree (never the developer's venv),
  and lintian finds no error and no warning in the source and binary packages;
- the package holds the command, every module of ``updater``, the default configuration (a
  conffile), the directories, the example hooks, the man page and both systemd units, and
  depends on Debian's own packages only;
- installed with apt into a fresh Debian 12 root (mmdebstrap), ``rpi-updater --version`` runs,
  ``status`` with the shipped configuration reports what a machine that is not a Pi lacks (the
  booted slot, the bootloader) and exits 0, ``health-check`` finds nothing pending, ``daemon``
  refuses to start without a broker with exit status 2 (what ``RestartPreventExitStatus=``
  relies on), and ``systemd-analyze verify`` accepts both units;
- purging removes the state directory, the configuration and the units' symlinks.

Needs root, the Debian build tools (``make deps`` installs them) and Debian's mirror. The root's
packages (the .deb's dependencies and recommends, systemd and man-db) are cached as a tarball
in /var/cache/rpi-updater-test (``RPI_UPDATER_TEST_CACHE``), keyed on that list and the
mirrors. On the 2-core development machine a run from scratch took 45 s, a cached one 17 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import require
from tests.harness.debroot import (
    REPO,
    SYSTEM_PATH,
    Built,
    Root,
    base_tarball,
    build_package,
    deb_field,
    extract,
    relations,
)
from tests.harness.debroot import ok as _ok
from tests.harness.debroot import run as _run

PACKAGE = "rpi-ab-updater"
# In the root besides the package's own relations: systemd-analyze, and man for the units'
# Documentation=man:rpi-updater(1), which systemd-analyze verify checks.
ROOT_EXTRAS = ("systemd", "man-db")
UNITS = ("rpi-updater.service", "rpi-updater-health.service")
CONFIG = "/etc/rpi-updater/config.yaml"

# Each tool, and the Debian package that brings it (all in the Makefile's DEB_PACKAGES).
TOOLS = {
    "make": "make",
    "dpkg-buildpackage": "dpkg-dev",
    "dh": "debhelper",
    "dh_python3": "dh-python",
    "lintian": "lintian",
    "mmdebstrap": "mmdebstrap",
    "unshare": "util-linux",
    "chroot": "coreutils",
    "tar": "tar",
}
PYPROJECT_PLUGIN = Path("/usr/share/dh-python/dhpython/build/plugin_pyproject.py")


# --------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require(os.geteuid() == 0, "building and installing the Debian package needs root")
    for tool, package in TOOLS.items():
        require(
            shutil.which(tool, path=SYSTEM_PATH) is not None,
            f"{tool} not installed (Debian package {package}; `make deps` installs it)",
        )
    require(
        PYPROJECT_PLUGIN.exists(),
        "pybuild's pyproject plugin not installed (Debian package pybuild-plugin-pyproject)",
    )
    return build_package(tmp_path_factory.mktemp("dist"))


def _deb_member(deb: Path, member: str) -> str:
    """A file of the control archive (conffiles, postrm, ...)."""
    out = _run(["dpkg-deb", "--info", str(deb), member], timeout=60)
    return _ok(out, f"dpkg-deb --info {member}")


def test_lintian_finds_no_error_and_no_warning(built: Built) -> None:
    proc = _run(["lintian", "--info", "--display-info", str(built.changes)], timeout=300)
    report = proc.stdout + proc.stderr
    bad = [line for line in report.splitlines() if re.match(r"[EW]: ", line)]
    assert not bad, "lintian:\n" + "\n".join(bad)
    assert proc.returncode == 0, report


def test_package_contents(built: Built) -> None:
    listing = _ok(_run(["dpkg-deb", "--contents", str(built.deb)], timeout=60), "dpkg-deb -c")
    entries: dict[str, str] = {}  # path -> mode string
    for line in listing.splitlines():
        fields = line.split()
        entries[fields[5].removeprefix(".").rstrip("/") or "/"] = fields[0]

    def has(path: str, mode: str) -> None:
        assert path in entries, f"{path} is not in the package"
        assert entries[path] == mode, f"{path}: {entries[path]}, expected {mode}"

    has("/usr/bin/rpi-updater", "-rwxr-xr-x")
    has(CONFIG, "-rw-r--r--")
    has("/etc/rpi-updater/keyring", "drwxr-xr-x")
    has("/etc/rpi-updater/health.d", "drwxr-xr-x")
    has("/usr/lib/tmpfiles.d/rpi-ab-updater.conf", "-rw-r--r--")
    has("/usr/share/man/man1/rpi-updater.1.gz", "-rw-r--r--")
    has("/usr/share/doc/rpi-ab-updater/examples/config.yaml", "-rw-r--r--")
    hooks = ("kernel/post-install", "rootfs/post-install", "config/pre-install", "boot/boot-post")
    for hook in hooks:
        has(f"/usr/share/rpi-ab-updater/hooks/{hook}", "-rwxr-xr-x")
    for unit in UNITS:
        assert any(p.endswith(f"/systemd/system/{unit}") for p in entries), f"no {unit}"

    # Every module of the source tree, subpackages included (the wheel lists packages by name).
    site = "/usr/lib/python3/dist-packages/"
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "updater").rglob("*.py"))
    missing = [m for m in modules if site + m not in entries]
    assert not missing, (
        f"modules missing from the package: {missing}; pyproject.toml's [tool.setuptools] "
        "must name every package (or find them: [tool.setuptools.packages.find])"
    )

    conffiles = _deb_member(built.deb, "conffiles").split()
    assert conffiles == [CONFIG]

    depends = relations(deb_field(built.deb, "Depends"))
    for name in (
        "python3",
        "python3-paho-mqtt",
        "python3-pycurl",
        "python3-pyudev",
        "python3-sdnotify",
        "python3-yaml",
        "python3-cryptography",
        "python3-zstandard",
        "mtools",  # the boot hook the default config names
    ):
        assert name in depends, f"Depends lacks {name}: {depends}"
    assert relations(deb_field(built.deb, "Recommends")) == ["libubootenv-tool"]
    assert deb_field(built.deb, "Architecture").strip() == "all"


# --------------------------------------------------------------------------- a fresh root


@pytest.fixture(scope="module")
def root(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    field = deb_field(built.deb, "Depends") + "," + deb_field(built.deb, "Recommends")
    tarball = base_tarball("base", sorted({*relations(field), *ROOT_EXTRAS}))
    the_root = Root(tmp_path_factory.mktemp("root"))
    try:
        extract(tarball, the_root.path)
        the_root.install(built.deb)
        yield the_root
    finally:
        the_root.remove()


def test_command_runs_and_status_reports_what_is_missing(built: Built, root: Root) -> None:
    version = _ok(root.run("rpi-updater", "--version"), "rpi-updater --version")
    assert version.strip() == f"rpi-updater {built.version.split('-')[0]}"

    # The shipped configuration on a machine that is not a Pi: status still answers (exit 0),
    # and says which slot is booted and which is primary cannot be told, and why.
    status = root.run("rpi-updater", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "Traceback" not in status.stderr, status.stderr
    lines = dict(line.split(":", 1) for line in status.stdout.splitlines() if ":" in line)
    assert lines["booted slot"].strip().startswith("cannot tell which slot is booted"), lines
    primary = lines["primary slot"].strip()
    assert primary.startswith("tryboot: cannot read /boot/autoboot/autoboot.txt"), lines
    assert lines["state"].strip() == "idle", lines
    assert lines["version"].strip() == "unknown", lines

    as_json = root.run("rpi-updater", "status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout)
    assert info["booted"] is None and info["primary"] is None, info
    assert info["booted_error"] and info["bootloader_error"], info
    assert info["state"] == "idle" and info["bootloader"] == "tryboot", info

    # What rpi-updater-health.service runs at every boot: nothing pending, success.
    health = root.run("rpi-updater", "health-check")
    assert health.returncode == 0, health.stdout + health.stderr
    assert "no update pending" in health.stderr, health.stderr

    # The agent without a broker: a configuration error, exit 2, which the unit does not
    # restart (RestartPreventExitStatus=2); no traceback.
    daemon = root.run("rpi-updater", "daemon", timeout=60)
    assert daemon.returncode == 2, daemon.stdout + daemon.stderr
    assert "mqtt.host" in daemon.stderr and "Traceback" not in daemon.stderr, daemon.stderr


def _unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_units_verify_and_are_enabled(root: Root) -> None:
    paths = [f"/lib/systemd/system/{unit}" for unit in UNITS]
    # multi-user.target too: its start transaction, with both units enabled, shows an ordering
    # cycle (which verifying the units alone does not); and with systemd's own boot-success
    # check enabled, which is ordered after multi-user.target and before boot-complete.target.
    enable = root.run("systemctl", "enable", "systemd-boot-check-no-failures.service")
    assert enable.returncode == 0, enable.stdout + enable.stderr
    verify = root.run("systemd-analyze", "verify", *paths, "multi-user.target")
    output = verify.stdout + verify.stderr
    assert verify.returncode == 0, output
    assert "rpi-updater" not in output, output  # no warning about our units, no cycle
    assert "ordering cycle" not in output, output

    for unit in UNITS:
        wants = root.path / "etc/systemd/system/multi-user.target.wants" / unit
        assert wants.is_symlink(), f"{unit} is not enabled"

    agent = _unit_settings((root.path / paths[0].lstrip("/")).read_text())
    assert agent["Type"] == ["notify"]
    assert agent["ExecStart"] == ["/usr/bin/rpi-updater daemon"]
    assert agent["Restart"] == ["always"]
    # The agent pings every WatchdogSec/2 (updater/agent.py, _watchdog_interval).
    assert int(agent["WatchdogSec"][0]) >= 20
    assert "Requires" not in agent and "BindsTo" not in agent  # weak dependencies only
    assert "ProtectSystem" not in agent and "PrivateDevices" not in agent  # it writes devices

    health = _unit_settings((root.path / paths[1].lstrip("/")).read_text())
    assert health["Type"] == ["oneshot"] and health["RemainAfterExit"] == ["yes"]
    assert health["ExecStart"] == ["/usr/bin/rpi-updater health-check"]
    assert health["WantedBy"] == ["multi-user.target"]
    # After every service of the system, before systemd's "the boot succeeded" point, and
    # without the default ordering that would put multi-user.target after it (a cycle).
    assert health["DefaultDependencies"] == ["no"]
    assert "multi-user.target" in " ".join(health["After"]).split()
    assert "boot-complete.target" in " ".join(health["Before"]).split()
    assert "rpi-updater-health.service" not in " ".join(agent.get("After", [])), "a cycle"


def test_configuration_and_directories(root: Root) -> None:
    conffiles = root.run("dpkg-query", "--show", "--showformat=${Conffiles}", PACKAGE)
    assert CONFIG in _ok(conffiles, "dpkg-query Conffiles").split()
    for directory, mode in (
        ("/etc/rpi-updater/keyring", 0o755),
        ("/etc/rpi-updater/health.d", 0o755),
        ("/var/lib/rpi-updater", 0o700),  # systemd-tmpfiles, from the postinst
    ):
        st = (root.path / directory.lstrip("/")).stat()
        assert (st.st_uid, st.st_gid) == (0, 0), directory
        assert st.st_mode & 0o7777 == mode, f"{directory}: {oct(st.st_mode & 0o7777)}"


def test_purge_removes_state_configuration_and_units(root: Root) -> None:
    """Last in the file: it takes the package out of the module's root."""
    _ok(root.run("apt-get", "purge", "-y", PACKAGE), "apt-get purge")
    for gone in (
        "var/lib/rpi-updater",
        "etc/rpi-updater/config.yaml",
        "usr/bin/rpi-updater",
        "etc/systemd/system/multi-user.target.wants/rpi-updater.service",
        "etc/systemd/system/multi-user.target.wants/rpi-updater-health.service",
    ):
        assert not (root.path / gone).exists(), f"/{gone} is still there after the purge"
