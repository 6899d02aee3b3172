"""A stand-in device for engine tests: A/B slot parts over one disk image, a configuration file,
stand-in /proc/cmdline and mountinfo, and a way to run ``rpi-updater`` against it.

With ``loops`` the parts are real loop devices (``losetup -o --sizelimit``) and the config names
them by device path; without, the config names image-file regions. Slot A is booted; its parts are
filled with a known pattern so that a test can prove they were never written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .loopdev import LoopDevices, make_sparse_image

MiB = 1 << 20
AUTOBOOT_A = "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"
BOARD_MODEL = "Raspberry Pi 4 Model B Rev 1.4"
REPO = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True, slots=True)
class Region:
    path: Path  # the loop device or the image file
    offset: int
    size: int

    def read(self, length: int | None = None) -> bytes:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read(self.size if length is None else length)

    def write(self, data: bytes) -> None:
        with self.path.open("r+b") as f:
            f.seek(self.offset)
            f.write(data)

    def digest(self) -> str:
        return hashlib.sha256(self.read()).hexdigest()


@dataclass
class Device:
    root: Path
    image: Path
    parts: dict[str, Region]  # "A.boot", "A.root", "B.boot", "B.root"
    config_path: Path
    state_dir: Path
    etc: Path
    hooks_dir: Path
    config: dict[str, object] = field(default_factory=dict)

    def write_config(self, **overrides: object) -> Path:
        """Write the config with ``overrides`` (top-level keys); they stay for later writes."""
        self.config.update(overrides)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return self.config_path

    def task_file(self, task: dict[str, object], name: str = "task.json") -> Path:
        path = self.root / name
        path.write_text(json.dumps(task))
        return path

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "updater.cli", "--config", str(self.config_path), *args]

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def start(self, *args: str, quiet: bool = True) -> subprocess.Popen[str]:
        """``rpi-updater ARGS`` in the background (output discarded, or piped when not quiet)."""
        out = subprocess.DEVNULL if quiet else subprocess.PIPE
        return subprocess.Popen(
            self.command(*args),
            stdout=out,
            stderr=out,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def journal(self) -> dict[str, object]:
        path = self.state_dir / "journal.json"
        if not path.exists():
            return {}
        data = json.loads(path.read_text())
        assert isinstance(data, dict)
        return data

    def snapshot(self) -> dict[str, str]:
        """Digests of every slot part: compare before and after to prove nothing was written."""
        return {name: region.digest() for name, region in self.parts.items()}


def build_device(
    root: Path,
    *,
    loops: LoopDevices | None,
    ca_file: Path,
    boot_size: int = 4 * MiB,
    root_size: int = 16 * MiB,
    fill_booted: bool = True,
    disk: Path | None = None,
) -> Device:
    """Lay out bootA, bootB, rootA, rootB in one image and write a config for them.

    With ``disk``, a whole A/B disk image (``image-recipes/make-ab-image.sh``) is used as it
    is: its partitions 2, 3, 5 and 6 are the slots (read from its partition table).
    """
    root.mkdir(parents=True, exist_ok=True)
    if disk is not None:
        image, layout = disk, disk_layout(disk)
        fill_booted = False  # slot A holds what the image was built with
    else:
        image = make_sparse_image(root / "disk.img", 1 * MiB + 2 * boot_size + 2 * root_size)
        layout = {
            "A.boot": (1 * MiB, boot_size),
            "B.boot": (1 * MiB + boot_size, boot_size),
            "A.root": (1 * MiB + 2 * boot_size, root_size),
            "B.root": (1 * MiB + 2 * boot_size + root_size, root_size),
        }
    parts: dict[str, Region] = {}
    specs: dict[str, dict[str, object]] = {"A": {}, "B": {}}
    ids = {"A.boot": "02", "B.boot": "03", "A.root": "05", "B.root": "06"}
    for name, (offset, size) in layout.items():
        slot, part = name.split(".")
        partuuid = f"1234abcd-{ids[name]}"
        if loops is not None:
            dev = loops.attach(image, offset=offset, size_limit=size)
            parts[name] = Region(dev.device, 0, size)
            specs[slot][part] = {"device": str(dev.device), "partuuid": partuuid}
        else:
            parts[name] = Region(image, offset, size)
            specs[slot][part] = {
                "image": str(image),
                "offset": offset,
                "size": size,
                "partuuid": partuuid,
            }
    # Slot A is what "runs": a recognisable pattern that must never change.
    for name in ("A.boot", "A.root") if fill_booted else ():
        region = parts[name]
        pattern = hashlib.sha256(name.encode()).digest() * (region.size // 32)
        region.write(pattern)
    cmdline = root / "cmdline"
    cmdline.write_text(
        "console=serial0,115200 root=PARTUUID=1234abcd-05 rootfstype=ext4 rootwait\n"
    )
    mountinfo = root / "mountinfo"
    mountinfo.write_text(_mountinfo(parts["A.root"] if loops is not None else None))
    # The Pi side, as the firmware leaves it after booting slot A: autoboot.txt on partition 1
    # (a plain directory here: the kernel cannot mount vfat), the device-tree values, a boot id.
    firmware = root / "autoboot"
    firmware.mkdir(exist_ok=True)
    (firmware / "autoboot.txt").write_text(AUTOBOOT_A)
    device_tree = root / "device-tree"
    device_tree.mkdir(exist_ok=True)
    for name, value in (("partition", 2), ("tryboot", 0), ("capabilities", 0xC)):
        (device_tree / name).write_bytes(value.to_bytes(4, "big"))
    (root / "boot_id").write_text("boot-1\n")
    (root / "model").write_bytes(BOARD_MODEL.encode() + b"\0")  # as /proc/device-tree/model
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    hooks_dir = root / "hooks"
    hooks_dir.mkdir(exist_ok=True)
    state_dir = root / "state"
    device = Device(
        root=root,
        image=image,
        parts=parts,
        config_path=root / "config.yaml",
        state_dir=state_dir,
        etc=etc,
        hooks_dir=hooks_dir,
    )
    device.config = {
        "state_dir": str(state_dir),
        "slots": specs,
        "targets": [
            {"name": "boot", "match": ["boot.img", "boot-*.img"], "slot_part": "boot"},
            {"name": "rootfs", "match": ["rootfs.img", "rootfs-*.img"], "slot_part": "root"},
            {"name": "config", "match": "app.conf", "file": str(etc / "app.conf")},
        ],
        "download": {
            "ca_file": str(ca_file),
            "connect_timeout": 5,
            "low_speed_limit": 1024,
            "low_speed_time": 2,
            "retries": 5,
            "backoff_initial": 0.01,
            "backoff_max": 0.05,
            "buffer_size": 256 * 1024,
            "fsync_interval": 1 * MiB,
        },
        "system": {
            "cmdline": str(cmdline),
            "mountinfo": str(mountinfo),
            "boot_id": str(root / "boot_id"),
            "model": str(root / "model"),
        },
        "bootloader": {
            "type": "tryboot",
            "autoboot": str(firmware / "autoboot.txt"),
            "device_tree": str(device_tree),
            "vcio": str(root / "no-vcio"),
        },
        "reboot": {"policy": "never"},
        "health": {"system_running": False, "directory": str(root / "health.d")},
        # Engine tests hand-craft tasks (wrong digests, lying servers) without a manifest; the
        # signed path, the production default, is what tests/harness/signing.py sets up.
        "security": {"allow_unsigned": True},
    }
    device.write_config()
    return device


def disk_layout(image: Path) -> dict[str, tuple[int, int]]:
    """The slot parts of an A/B disk image: partitions 2, 3 (boot), 5, 6 (root), by sfdisk."""
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(image)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    by_number = {int(str(p["node"]).rsplit("img", 1)[-1]): p for p in table["partitions"]}
    names = {2: "A.boot", 3: "B.boot", 5: "A.root", 6: "B.root"}
    return {
        name: (int(by_number[n]["start"]) * sector, int(by_number[n]["size"]) * sector)
        for n, name in names.items()
    }


@contextlib.contextmanager
def mounted_ext4(device: Path, mountpoint: Path) -> Iterator[Path]:
    """Make an ext4 filesystem on ``device`` and mount it; always unmounted afterwards.

    Without lazy initialisation: the kernel would otherwise keep writing inode tables in the
    background, and a test comparing the device's bytes would see writes that are not ours.
    """
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(device)],
        check=True,
    )
    mountpoint.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", str(device), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def _mountinfo(booted_root: Region | None) -> str:
    """A stand-in mountinfo whose / is the booted root (a loop device) or an unrelated device."""
    if booted_root is not None:
        rdev = booted_root.path.stat().st_rdev
        majmin = f"{os.major(rdev)}:{os.minor(rdev)}"
        source = str(booted_root.path)
    else:
        majmin, source = "254:0", "/dev/vda"
    return (
        f"21 1 {majmin} / / rw,relatime shared:1 - ext4 {source} rw\n"
        "22 21 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw\n"
    )


def task_for(files: list[tuple[str, str, int, str]], version: str = "a1b1c1") -> dict[str, object]:
    """A multi-file IoT Platform push: files as (name, url, size, sha256)."""
    return {
        "code": "1000",
        "id": 1,
        "message": "success",
        "data": {
            "version": version,
            "signMethod": "SHA256",
            "files": [
                {"fileName": n, "fileUrl": u, "fileSize": s, "fileSign": d} for n, u, s, d in files
            ],
        },
    }
