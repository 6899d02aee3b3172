"""Loop devices over image files, standing in for the partitions of an A/B disk.

Partition scanning does not create ``loopNpM`` nodes on this machine, so each partition is its own
loop device over a window of the disk image (``-o OFFSET --sizelimit SIZE``). Loop devices are a
machine-wide resource: a test that leaks one leaks it for every later test and run, so every
device attached through :class:`LoopDevices` is detached on teardown, also when the test failed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LoopDevice",
    "LoopDeviceError",
    "LoopDevices",
    "loop_device",
    "loop_devices_available",
    "make_sparse_image",
]


class LoopDeviceError(RuntimeError):
    """losetup failed; the message carries its stderr."""


@dataclass(frozen=True, slots=True)
class LoopDevice:
    """An attached loop device and the window of the file it shows."""

    device: Path
    backing_file: Path
    offset: int
    size_limit: int | None
    read_only: bool


def make_sparse_image(path: Path, size: int) -> Path:
    """Create (or resize) ``path`` as a sparse file of ``size`` bytes: no disk used until written.

    Truncating keeps existing content, so resizing a disk image does not wipe it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as image:
        image.truncate(size)
    return path


def loop_devices_available() -> tuple[bool, str]:
    """Whether this process can attach loop devices, and if not, why (for ``require``)."""
    if os.geteuid() != 0:
        return False, "loop devices need root"
    if shutil.which("losetup") is None:
        return False, "losetup not found (Debian package util-linux)"
    if not Path("/dev/loop-control").exists():
        return False, "/dev/loop-control missing (no loop driver)"
    return True, ""


def _losetup(*args: str) -> str:
    result = subprocess.run(["losetup", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LoopDeviceError(f"losetup {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


class LoopDevices:
    """A factory that remembers what it attached and detaches all of it on ``detach_all()``."""

    def __init__(self) -> None:
        self._attached: list[LoopDevice] = []

    @property
    def attached(self) -> list[LoopDevice]:
        return list(self._attached)

    def attach(
        self,
        file: Path,
        *,
        offset: int = 0,
        size_limit: int | None = None,
        read_only: bool = False,
    ) -> LoopDevice:
        """Attach a free loop device to ``file`` (optionally a window of it) and return it."""
        args = ["-f", "--show"]
        if offset:
            args += ["-o", str(offset)]
        if size_limit is not None:
            args += ["--sizelimit", str(size_limit)]
        if read_only:
            args.append("-r")
        device = LoopDevice(
            device=Path(_losetup(*args, str(file))),
            backing_file=file,
            offset=offset,
            size_limit=size_limit,
            read_only=read_only,
        )
        self._attached.append(device)
        return device

    def detach(self, device: LoopDevice) -> None:
        """Detach one device. A device still in use (mounted) is retried briefly."""
        self._attached.remove(device)
        for attempt in range(10):
            try:
                _losetup("-d", str(device.device))
                return
            except LoopDeviceError:
                if attempt == 9:
                    raise
                time.sleep(0.1)

    def detach_all(self) -> None:
        """Detach every device, newest first; report all failures at the end, not the first."""
        failures: list[str] = []
        for device in reversed(list(self._attached)):
            try:
                self.detach(device)
            except LoopDeviceError as err:
                failures.append(str(err))
        if failures:
            raise LoopDeviceError("; ".join(failures))

    def __enter__(self) -> LoopDevices:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach_all()


@contextmanager
def loop_device(
    file: Path, *, offset: int = 0, size_limit: int | None = None, read_only: bool = False
) -> Iterator[LoopDevice]:
    """One loop device for the duration of a ``with`` block."""
    with LoopDevices() as devices:
        yield devices.attach(file, offset=offset, size_limit=size_limit, read_only=read_only)
