"""Debian 12 roots for the tests that install our package: the .deb test and the VM system test.

A root is made by mmdebstrap once per package list and kept as a tarball in a cache directory
(``RPI_UPDATER_TEST_CACHE``, default /var/cache/rpi-updater-test), keyed on everything that
goes into it: the suite, the mirrors, the variant, the package list, and a format number bumped
when the way it is made changes. A key that changes makes a new tarball and removes the old
ones of the same kind, so the cache holds one root per kind.

Everything runs with Debian's own tools (``SYSTEM_PATH``, no venv, no PYTHON* variables of the
developer's shell), as an operator's machine would.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CACHE",
    "MIRRORS",
    "REPO",
    "SUITE",
    "SYSTEM_PATH",
    "Built",
    "Root",
    "base_tarball",
    "build_package",
    "deb_field",
    "extract",
    "mounts_under",
    "ok",
    "relations",
    "run",
    "system_env",
]

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "rpi-ab-updater"
SUITE = "bookworm"
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
CACHE = Path(os.environ.get("RPI_UPDATER_TEST_CACHE", "/var/cache/rpi-updater-test"))
CACHE_FORMAT = 1  # bump when the way a base root is made changes
STALE_PARTIAL = 3600  # seconds: a partial tarball this old belongs to no running mmdebstrap
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def system_env(**extra: str) -> dict[str, str]:
    """Debian's tools only: no venv, no pyenv, no PYTHON* variables; proxies pass through."""
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    env.update({k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")})
    env.update(extra)
    return env


def run(
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
        env=system_env() if env is None else env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str], what: str) -> str:
    """``proc``'s stdout, or an assertion error with both of its outputs' ends."""
    assert proc.returncode == 0, (
        f"{what} failed with exit status {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc.stdout


# --------------------------------------------------------------------------- the package


@dataclass(frozen=True)
class Built:
    version: str
    deb: Path
    changes: Path
    log: str


def changelog_version() -> str:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    match = re.match(rf"{PACKAGE} \(([^)]+)\)", first)
    assert match, f"debian/changelog: cannot read the version from {first!r}"
    return match.group(1)


def build_package(dist: Path) -> Built:
    """``make package`` into ``dist``, as a developer runs it (not from inside make's env)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
    }
    proc = run(["make", "package", f"DIST={dist}"], timeout=600, env=env, cwd=REPO)
    log = ok(proc, "make package") + proc.stderr
    version = changelog_version()
    deb = dist / f"{PACKAGE}_{version}_all.deb"
    changes = sorted(dist.glob(f"{PACKAGE}_{version}_*.changes"))
    left = sorted(p.name for p in dist.iterdir())
    assert deb.is_file(), f"make package left no {deb.name} in {dist}: {left}"
    assert len(changes) == 1, f"expected one .changes in {dist}: {left}"
    return Built(version, deb, changes[0], log)


def deb_field(deb: Path, field: str) -> str:
    return ok(run(["dpkg-deb", "--field", str(deb), field], timeout=60), "dpkg-deb --field")


def relations(field: str) -> list[str]:
    """Package names of a Depends/Recommends field: first alternatives, no versions, no :any."""
    names = []
    for relation in field.split(","):
        if relation.strip():
            first = relation.split("|")[0].split()[0]
            names.append(first.split(":")[0])
    return names


# --------------------------------------------------------------------------- roots


def base_tarball(kind: str, packages: Sequence[str], *, variant: str = "apt") -> Path:
    """A Debian 12 root (``variant``) with ``packages``, made by mmdebstrap once per key.

    ``kind`` names the family of roots ("base" for the package test, "vm" for the system
    test): a new key replaces the older tarballs of its own kind only.
    """
    key_data = {
        "format": CACHE_FORMAT,
        "suite": SUITE,
        "mirrors": MIRRORS,
        "variant": variant,
        "packages": sorted(packages),
    }
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    tarball = CACHE / f"{kind}-{SUITE}-{key}.tar"
    if tarball.is_file():
        return tarball
    CACHE.mkdir(mode=0o755, parents=True, exist_ok=True)
    for stale in CACHE.glob(f".{kind}-*.tar"):  # left by a killed run (not one still going)
        if time.time() - stale.stat().st_mtime > STALE_PARTIAL:
            stale.unlink(missing_ok=True)
    fd, partial_name = tempfile.mkstemp(prefix=f".{kind}-", suffix=".tar", dir=CACHE)
    os.close(fd)
    partial = Path(partial_name)
    try:
        proc = run(
            [
                "mmdebstrap",
                f"--variant={variant}",
                "--format=tar",
                "--include=" + ",".join(sorted(packages)),
                SUITE,
                str(partial),
                *MIRRORS,
            ],
            timeout=1200,
        )
        ok(proc, f"mmdebstrap (the Debian 12 root, {kind})")
        partial.chmod(0o644)
        partial.replace(tarball)
    finally:
        partial.unlink(missing_ok=True)
    for old in CACHE.glob(f"{kind}-{SUITE}-*.tar"):  # other keys: made again if needed
        if old != tarball:
            old.unlink(missing_ok=True)
    return tarball


def extract(tarball: Path, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = run(["tar", "--numeric-owner", "-xpf", str(tarball), "-C", str(path)], timeout=600)
    ok(proc, f"extracting {tarball}")


def mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


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
        return run(
            [*unshare, "sh", "-c", script, str(self.path), *argv],
            timeout=timeout,
            env=system_env(DEBIAN_FRONTEND="noninteractive"),
        )

    def install(self, deb: Path) -> None:
        """Install ``deb`` with apt, as an operator would; every relation must be in the root
        already, so apt needs no network and says so if one is missing."""
        shutil.copy(deb, self.path / "tmp" / deb.name)
        try:
            ok(self.run("apt-get", "install", "-y", f"/tmp/{deb.name}"), "apt-get install")
        finally:
            (self.path / "tmp" / deb.name).unlink(missing_ok=True)

    def remove(self) -> None:
        leftover = mounts_under(self.path)
        assert not leftover, f"mounts left under the test root, not removing it: {leftover}"
        shutil.rmtree(self.path)
