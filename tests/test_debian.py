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

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import require

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "rpi-ab-updater"
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# In the root besides the package's own relations: systemd-analyze, and man for the units'
# Documentation=man:rpi-updater(1), which systemd-analyze verify checks.
ROOT_EXTRAS = ("systemd", "man-db")
CACHE = Path(os.environ.get("RPI_UPDATER_TEST_CACHE", "/var/cache/rpi-updater-test"))
CACHE_FORMAT = 1  # bump when the way the base root is made changes
UNITS = ("rpi-updater.service", "rpi-updater-health.service")
CONFIG = "/etc/rpi-updater/config.yaml"
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

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


def _system_env(**extra: str) -> dict[str, str]:
    """Debian's tools only: no venv, no pyenv, no PYTHON* variables; proxies pass through."""
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    env.update({k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")})
    env.update(extra)
    return env


def _run(
    argv: Sequence[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_system_env() if env is None else env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def _ok(proc: subprocess.CompletedProcess[str], what: str) -> str:
    assert proc.returncode == 0, (
        f"{what} failed with exit status {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


def _changelog_version() -> str:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(rf"{PACKAGE} \(([^)]+)\)", first)
    assert match, f"debian/changelog: cannot read the version from {first!r}"
    return match.group(1)


def _relations(field: str) -> list[str]:
    """Package names of a Depends/Recommends field: first alternatives, no versions, no :any."""
    names = []
    for relation in field.split(","):
        if relation.strip():
            first = relation.split("|")[0].split()[0]
            names.append(first.split(":")[0])
    return names


# --------------------------------------------------------------------------- the package


@dataclass(frozen=True)
class Built:
    version: str
    deb: Path
    changes: Path
    log: str


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
    dist = tmp_path_factory.mktemp("dist")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    proc = _run(["make", "package", f"DIST={dist}"], timeout=600, env=env, cwd=REPO)
    log = _ok(proc, "make package") + proc.stderr
    version = _changelog_version()
    deb = dist / f"{PACKAGE}_{version}_all.deb"
    changes = sorted(dist.glob(f"{PACKAGE}_{version}_*.changes"))
    left = sorted(p.name for p in dist.iterdir())
    assert deb.is_file(), f"make package left no {deb.name} in {dist}: {left}"
    assert len(changes) == 1, f"expected one .changes in {dist}: {left}"
    return Built(version, deb, changes[0], log)


def _deb_field(deb: Path, field: str) -> str:
    return _ok(_run(["dpkg-deb", "--field", str(deb), field], timeout=60), "dpkg-deb --field")


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

    depends = _relations(_deb_field(built.deb, "Depends"))
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
    assert _relations(_deb_field(built.deb, "Recommends")) == ["libubootenv-tool"]
    assert _deb_field(built.deb, "Architecture").strip() == "all"


# --------------------------------------------------------------------------- a fresh root


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def _base_tarball(packages: Sequence[str]) -> Path:
    """A Debian 12 root (variant apt) with ``packages``, made by mmdebstrap once per list."""
    key_data = {"format": CACHE_FORMAT, "suite": SUITE, "mirrors": MIRRORS, "packages": packages}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    tarball = CACHE / f"base-{SUITE}-{key}.tar"
    if tarball.is_file():
        return tarball
    CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(prefix=".base-", suffix=".tar", dir=CACHE)
    os.close(fd)
    partial = Path(partial_name)
    try:
        proc = _run(
            [
                "mmdebstrap",
                "--variant=apt",
                "--format=tar",
                "--include=" + ",".join(packages),
                SUITE,
                str(partial),
                *MIRRORS,
            ],
            timeout=900,
        )
        _ok(proc, "mmdebstrap (the Debian 12 root)")
        partial.chmod(0o644)
        partial.replace(tarball)
    finally:
        partial.unlink(missing_ok=True)
    for old in CACHE.glob("base-*.tar"):  # roots of other package lists: made again if needed
        if old != tarball:
            old.unlink(missing_ok=True)
    return tarball


@dataclass(frozen=True)
class Root:
    path: Path

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``argv`` chrooted into the root, with /proc, /sys and /dev mounted as on a machine.

        The mounts live in a mount namespace of the command's own, so they end with it and
        can never outlive a failed test (nor keep the root from being removed).
        """
        script = (
            'mount -t proc proc "$0/proc" && mount -t sysfs sysfs "$0/sys"'
            ' && mount --rbind /dev "$0/dev" && exec chroot "$0" "$@"'
        )
        unshare = ["unshare", "--mount", "--propagation", "private"]
        return _run(
            [*unshare, "sh", "-c", script, str(self.path), *argv],
            timeout=timeout,
            env=_system_env(DEBIAN_FRONTEND="noninteractive"),
        )


@pytest.fixture(scope="module")
def root(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    relations = _deb_field(built.deb, "Depends") + "," + _deb_field(built.deb, "Recommends")
    packages = sorted({*_relations(relations), *ROOT_EXTRAS})
    tarball = _base_tarball(packages)
    path = tmp_path_factory.mktemp("root")
    try:
        _ok(
            _run(["tar", "--numeric-owner", "-xpf", str(tarball), "-C", str(path)], timeout=300),
            f"extracting {tarball}",
        )
        shutil.copy(built.deb, path / "tmp" / built.deb.name)
        the_root = Root(path)
        # As an operator would; every relation is in the root already, so apt needs no network
        # and says so if one is missing.
        _ok(the_root.run("apt-get", "install", "-y", f"/tmp/{built.deb.name}"), "apt-get install")
        yield the_root
    finally:
        leftover = _mounts_under(path)
        assert not leftover, f"mounts left under the test root, not removing it: {leftover}"
        shutil.rmtree(path)


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
