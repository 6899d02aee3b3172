"""Slots against real loop devices, real mounts and stand-in kernel tables.

What runs for real: loop devices over image files (each one a "partition"), ext4 file systems
mounted on them, the ``BLKGETSIZE64`` ioctl, ``/sys/block/loop*/loop/`` and, when udevd can be
started, udev's database through pyudev. What is a stand-in, written into ``tmp_path``: the kernel
command line and the mount table (so that "booted from slot B" can be staged without a reboot),
``/proc/swaps``, and a small sysfs tree for device-mapper stacks (this kernel has no dm driver).

The only stub is ``_find_part_nodes`` in two tests: partitions with a PARTUUID cannot be created
as device nodes here (no ``loopNpM``), so the "found it" path of a PARTUUID lookup is reached by
making that one function answer with a real loop device; everything after it runs as in production.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import LoopDevices, make_sparse_image, require
from updater import slots
from updater.config import Config, PartSpec, SlotConfig, SystemConfig
from updater.errors import PlanError
from updater.slots import (
    Device,
    booted_slot,
    in_use_reason,
    other_slot,
    parse_cmdline_root,
    resolve_part,
)

MiB = 1 << 20
UDEVD = "/lib/systemd/systemd-udevd"

# ------------------------------------------------------------------------------------ helpers


def mountinfo_line(mount_id: int, rdev: int, mount_point: str, **kw: str) -> str:
    """One mountinfo line as the kernel writes it (mount point escaped, an optional field)."""
    fstype = kw.get("fstype", "ext4")
    source = kw.get("source", "/dev/root")
    options = kw.get("super_options", "rw")
    point = mount_point.replace("\\", "\\134").replace(" ", "\\040")
    majmin = f"{os.major(rdev)}:{os.minor(rdev)}"
    optional = f"shared:{mount_id}"
    return f"{mount_id} 1 {majmin} / {point} rw,relatime {optional} - {fstype} {source} {options}"


def write_mountinfo(tmp_path: Path, lines: list[str]) -> str:
    path = tmp_path / "mountinfo"
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def make_config(
    tmp_path: Path,
    root_a: PartSpec,
    root_b: PartSpec,
    cmdline: str,
    mountinfo: list[str] | None = None,
) -> Config:
    """A Config built directly (the loader is not ours), with stand-in cmdline and mountinfo."""
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    boot = PartSpec("image", str(tmp_path / "boot.img"))
    return Config(
        path=str(tmp_path / "config.yaml"),
        slots={
            "A": SlotConfig("A", {"boot": boot, "root": root_a}),
            "B": SlotConfig("B", {"boot": boot, "root": root_b}),
        },
        targets=(),
        system=SystemConfig(
            cmdline=str(tmp_path / "cmdline"),
            mountinfo=write_mountinfo(tmp_path, mountinfo or []),
        ),
    )


def rdev_of(path: Path | str) -> int:
    return Path(path).stat().st_rdev


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def fake_sysfs(tmp_path: Path, devices: dict[str, int], links: dict[str, list[str]]) -> Path:
    """A stand-in ``/sys/dev/block`` laid out like the real one.

    ``devices`` maps a name (``dm-0``, ``mmcblk0``, ``mmcblk0/mmcblk0p5`` for a partition) to its
    device number; ``links`` maps ``NAME/holders`` or ``NAME/slaves`` to the names listed there.
    """
    sysfs = tmp_path / "sys"
    by_number = sysfs / "dev" / "block"
    by_number.mkdir(parents=True)
    for name, rdev in devices.items():
        directory = sysfs / "devices" / name
        directory.mkdir(parents=True)
        (directory / "dev").write_text(f"{os.major(rdev)}:{os.minor(rdev)}\n")
        if "/" in name:
            (directory / "partition").write_text("1\n")
        (by_number / f"{os.major(rdev)}:{os.minor(rdev)}").symlink_to(directory)
    for where, names in links.items():
        directory = sysfs / "devices" / where
        directory.mkdir(parents=True)
        for name in names:
            (directory / name.rsplit("/", 1)[-1]).symlink_to(sysfs / "devices" / name)
    return by_number


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture
def ext4_tools(loop_devices: LoopDevices) -> None:
    """mkfs.ext4 and mount, on top of what loop devices need (root, losetup)."""
    for tool in ("mkfs.ext4", "mount", "umount"):
        require(shutil.which(tool) is not None, f"{tool} not found (e2fsprogs / util-linux)")


@pytest.fixture
def mounts(ext4_tools: None) -> Iterator[Callable[[str, Path], None]]:
    """``mount(device, point)``; every mount is undone on teardown, before loops are detached."""
    done: list[Path] = []

    def mount(device: str, point: Path) -> None:
        point.mkdir(parents=True, exist_ok=True)
        run("mount", device, str(point))
        done.append(point)

    try:
        yield mount
    finally:
        for point in reversed(done):
            subprocess.run(["umount", str(point)], check=False)


@pytest.fixture
def udevd() -> Iterator[None]:
    """A running systemd-udevd: the one already running, or one we start and stop again."""
    require(
        Path(UDEVD).exists() and shutil.which("udevadm") is not None,
        f"{UDEVD} not found (Debian package udev)",
    )
    if subprocess.run(["udevadm", "control", "--ping"], capture_output=True).returncode == 0:
        yield
        return
    daemon = subprocess.Popen([UDEVD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["udevadm", "control", "--ping"], capture_output=True).returncode:
            assert daemon.poll() is None, "systemd-udevd exited at start"
            assert time.monotonic() < deadline, "systemd-udevd did not answer within 10 s"
            time.sleep(0.1)
        yield
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


def image(tmp_path: Path, name: str, size: int = 4 * MiB) -> Path:
    return make_sparse_image(tmp_path / name, size)


def ext4_loop(tmp_path: Path, loop_devices: LoopDevices, name: str, **kw: int) -> str:
    """A loop device (optionally over a window of a 4 MiB image) with a fresh ext4 on it."""
    loop = loop_devices.attach(
        image(tmp_path, name), offset=kw.get("offset", 0), size_limit=kw.get("size_limit")
    )
    run("mkfs.ext4", "-q", "-F", str(loop.device))
    return str(loop.device)


# ------------------------------------------------------------------------ cmdline, other_slot


@pytest.mark.parametrize(
    ("cmdline", "root"),
    [
        ("console=tty1 root=PARTUUID=1234abcd-05 rootfstype=ext4 rootwait", "PARTUUID=1234abcd-05"),
        ("root=/dev/mmcblk0p5 quiet root=/dev/mmcblk0p6", "/dev/mmcblk0p6"),  # the last one wins
        ('root="PARTLABEL=root A" ro', "PARTLABEL=root A"),
        ('"root=PARTLABEL=root B" ro', "PARTLABEL=root B"),
        ("root=/dev/sda2 -- root=/dev/sdb2", "/dev/sda2"),  # after -- it belongs to init
        ("rootfstype=ext4 rootwait\n", None),
        ("root= quiet", None),
        ("", None),
    ],
)
def test_parse_cmdline_root(cmdline: str, root: str | None) -> None:
    assert parse_cmdline_root(cmdline) == root


def test_other_slot() -> None:
    assert other_slot("A") == "B"
    assert other_slot("B") == "A"
    with pytest.raises(ValueError, match="'C'"):
        other_slot("C")


# ------------------------------------------------------------------------- booted slot: names


def test_booted_slot_by_partuuid_attribute_of_image_parts(tmp_path: Path) -> None:
    root_a = PartSpec("image", str(image(tmp_path, "a.img")), partuuid="1234abcd-05")
    root_b = PartSpec("image", str(image(tmp_path, "b.img")), partuuid="1234abcd-06")
    config = make_config(tmp_path, root_a, root_b, "console=tty1 root=PARTUUID=1234ABCD-06 ro")
    assert booted_slot(config) == "B"


def test_booted_slot_by_partuuid_spec(tmp_path: Path) -> None:
    """The root parts cannot be resolved here, so the mountinfo cross-check is skipped."""
    config = make_config(
        tmp_path,
        PartSpec("partuuid", "6c586e13-05"),
        PartSpec("partuuid", "6c586e13-06"),
        "root=PARTUUID=6C586E13-05 rootwait",
    )
    assert booted_slot(config) == "A"


def test_booted_slot_by_partlabel(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        PartSpec("partlabel", "rootA"),
        PartSpec("partlabel", "rootB"),
        "root=PARTLABEL=rootB rootwait",
    )
    assert booted_slot(config) == "B"


def test_booted_slot_partlabel_is_case_sensitive(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        PartSpec("partlabel", "rootA"),
        PartSpec("partlabel", "rootB"),
        "root=PARTLABEL=ROOTB",
    )
    with pytest.raises(PlanError, match="neither slot A nor B"):
        booted_slot(config)


def test_booted_slot_no_match(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        PartSpec("partuuid", "6c586e13-05"),
        PartSpec("partuuid", "6c586e13-06"),
        "root=PARTUUID=deadbeef-02",
    )
    with pytest.raises(PlanError) as caught:
        booted_slot(config)
    assert str(caught.value) == (
        "cannot tell which slot is booted: root=PARTUUID=deadbeef-02 matches neither slot A nor B"
    )


def test_booted_slot_without_root_argument(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, PartSpec("partlabel", "rootA"), PartSpec("partlabel", "rootB"), "quiet"
    )
    with pytest.raises(PlanError, match="has no root= argument"):
        booted_slot(config)


def test_booted_slot_both_slots_match(tmp_path: Path) -> None:
    same = PartSpec("partuuid", "6c586e13-05")
    config = make_config(tmp_path, same, same, "root=PARTUUID=6c586e13-05")
    with pytest.raises(PlanError, match="matches slots A and B"):
        booted_slot(config)


def test_booted_slot_unreadable_cmdline(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, PartSpec("partlabel", "rootA"), PartSpec("partlabel", "rootB"), ""
    )
    (tmp_path / "cmdline").unlink()
    with pytest.raises(PlanError, match="cannot read the kernel command line"):
        booted_slot(config)


# ----------------------------------------------------------- booted slot: devices, cross-check


@pytest.fixture
def two_roots(tmp_path: Path, loop_devices: LoopDevices) -> tuple[str, str]:
    """Root A and root B: two loop devices over windows of one disk image."""
    disk = image(tmp_path, "disk.img", 8 * MiB)
    a = loop_devices.attach(disk, offset=1 * MiB, size_limit=2 * MiB)
    b = loop_devices.attach(disk, offset=4 * MiB, size_limit=2 * MiB)
    return str(a.device), str(b.device)


def device_config(
    tmp_path: Path, roots: tuple[str, str], cmdline_root: str, mountinfo: list[str]
) -> Config:
    return make_config(
        tmp_path,
        PartSpec("device", roots[0]),
        PartSpec("device", roots[1]),
        f"console=serial0,115200 root={cmdline_root} rootfstype=ext4",
        mountinfo,
    )


def test_booted_slot_by_device_path(tmp_path: Path, two_roots: tuple[str, str]) -> None:
    a, b = two_roots
    config = device_config(tmp_path, two_roots, a, [mountinfo_line(20, rdev_of(a), "/")])
    assert booted_slot(config) == "A"
    config = device_config(tmp_path, two_roots, b, [mountinfo_line(20, rdev_of(b), "/")])
    assert booted_slot(config) == "B"


def test_booted_slot_by_device_number(tmp_path: Path, two_roots: tuple[str, str]) -> None:
    """A node elsewhere with the same device number (think /dev/root) names the same slot."""
    alias = tmp_path / "root-alias"
    os.mknod(alias, stat.S_IFBLK | 0o600, rdev_of(two_roots[1]))
    mountinfo = [mountinfo_line(20, rdev_of(two_roots[1]), "/")]
    assert booted_slot(device_config(tmp_path, two_roots, str(alias), mountinfo)) == "B"


def test_cross_check_disagreement(tmp_path: Path, two_roots: tuple[str, str]) -> None:
    a, b = two_roots
    mountinfo = [mountinfo_line(20, rdev_of(b), "/", source=b)]
    with pytest.raises(PlanError) as caught:
        booted_slot(device_config(tmp_path, two_roots, a, mountinfo))
    message = str(caught.value)
    assert "disagree" in message
    assert f"root={a}" in message and "slot A" in message
    assert b in message and f"{os.major(rdev_of(b))}:{os.minor(rdev_of(b))}" in message


def test_cross_check_last_root_mount_wins(tmp_path: Path, two_roots: tuple[str, str]) -> None:
    """Mounts stack: an earlier line for / is hidden by a later one."""
    a, b = two_roots
    stacked = [mountinfo_line(20, rdev_of(a), "/"), mountinfo_line(31, rdev_of(b), "/")]
    assert booted_slot(device_config(tmp_path, two_roots, b, stacked)) == "B"
    with pytest.raises(PlanError, match="disagree"):
        booted_slot(device_config(tmp_path, two_roots, a, stacked))


def test_cross_check_nothing_mounted_at_root(tmp_path: Path, two_roots: tuple[str, str]) -> None:
    mountinfo = [mountinfo_line(20, rdev_of(two_roots[0]), "/boot")]
    with pytest.raises(PlanError, match="nothing mounted at /"):
        booted_slot(device_config(tmp_path, two_roots, two_roots[0], mountinfo))


def test_cross_check_through_overlay_root(tmp_path: Path, two_roots: tuple[str, str]) -> None:
    """Read-only root: / is an overlay whose lowerdir is where slot A's root is mounted."""
    a, _ = two_roots
    mountinfo = [
        mountinfo_line(20, rdev_of(a), "/media/root-ro", source=a, super_options="ro"),
        mountinfo_line(21, os.makedev(0, 27), "/media/root-rw", fstype="tmpfs", source="tmpfs"),
        mountinfo_line(
            22,
            os.makedev(0, 30),
            "/",
            fstype="overlay",
            source="overlay",
            super_options="rw,lowerdir=/media/root-ro,upperdir=/media/root-rw/overlay",
        ),
    ]
    assert booted_slot(device_config(tmp_path, two_roots, a, mountinfo)) == "A"


def test_cross_check_through_device_mapper(
    tmp_path: Path, two_roots: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """/ on dm-0 (say dm-crypt) over root A: followed down dm-0's slaves (stand-in sysfs)."""
    a, b = two_roots
    dm = os.makedev(253, 0)
    names = {Path(a).name: rdev_of(a), Path(b).name: rdev_of(b), "dm-0": dm}
    sysfs = fake_sysfs(tmp_path, names, {"dm-0/slaves": [Path(a).name]})
    monkeypatch.setattr(slots, "SYS_DEV_BLOCK", str(sysfs))
    mountinfo = [mountinfo_line(20, dm, "/", source="/dev/mapper/cryptroot")]
    assert booted_slot(device_config(tmp_path, two_roots, a, mountinfo)) == "A"
    with pytest.raises(PlanError, match=r"disagree.*/dev/mapper/cryptroot \(253:0\)"):
        booted_slot(device_config(tmp_path, two_roots, b, mountinfo))


# ---------------------------------------------------------------------------- resolve_part


def test_resolve_device_size_from_ioctl(tmp_path: Path, loop_devices: LoopDevices) -> None:
    loop = loop_devices.attach(image(tmp_path, "disk.img"), offset=4096, size_limit=MiB)
    spec = PartSpec("device", str(loop.device))
    device = resolve_part(spec)
    assert device == Device(str(loop.device), 0, MiB, True, rdev_of(loop.device), spec)
    assert device.describe() == str(loop.device)


def test_resolve_device_refuses_regular_file(tmp_path: Path) -> None:
    disk = image(tmp_path, "disk.img")
    with pytest.raises(PlanError, match=rf"regular file.*`image: {re.escape(str(disk))}`"):
        resolve_part(PartSpec("device", str(disk)))


def test_resolve_device_missing(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"cannot open .*nope"):
        resolve_part(PartSpec("device", str(tmp_path / "nope")))


def test_resolve_image(tmp_path: Path) -> None:
    disk = image(tmp_path, "disk.img", 4 * MiB)
    whole = resolve_part(PartSpec("image", str(disk)))
    assert (whole.offset, whole.size, whole.is_block, whole.rdev) == (0, 4 * MiB, False, None)
    tail = resolve_part(PartSpec("image", str(disk), offset=MiB))
    assert (tail.offset, tail.size) == (MiB, 3 * MiB)
    window = resolve_part(PartSpec("image", str(disk), offset=MiB, size=2 * MiB))
    assert (window.offset, window.size) == (MiB, 2 * MiB)
    assert window.describe() == f"{disk}@{MiB}+{2 * MiB}"


@pytest.mark.parametrize(
    ("offset", "size", "error"),
    [
        (4 * MiB, None, "offset 4194304 is past the end of the file"),
        (5 * MiB, 1, "offset 5242880 is past the end of the file"),
        (3 * MiB, 2 * MiB, "ends at byte 5242880, past the end of the file"),
        (-1, None, "offset must be >= 0"),
        (0, 0, "size > 0"),
    ],
)
def test_resolve_image_bounds(tmp_path: Path, offset: int, size: int | None, error: str) -> None:
    disk = image(tmp_path, "disk.img", 4 * MiB)
    with pytest.raises(PlanError, match=error):
        resolve_part(PartSpec("image", str(disk), offset=offset, size=size))


def test_resolve_image_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="not a regular file"):
        resolve_part(PartSpec("image", str(tmp_path)))
    with pytest.raises(PlanError, match="cannot open"):
        resolve_part(PartSpec("image", str(tmp_path / "missing.img")))


def test_resolve_partuuid_not_found() -> None:
    with pytest.raises(PlanError) as caught:
        resolve_part(PartSpec("partuuid", "0badc0de-07"))
    assert str(caught.value) == "no partition with PARTUUID=0badc0de-07 on this machine"


def test_resolve_partlabel_not_found() -> None:
    with pytest.raises(PlanError, match="no partition with PARTLABEL=no-such-label-7f3a"):
        resolve_part(PartSpec("partlabel", "no-such-label-7f3a"))


def test_resolve_partuuid_found(
    tmp_path: Path, loop_devices: LoopDevices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STUB at the edge: the lookup answers with a loop device; the rest is the real path."""
    loop = loop_devices.attach(image(tmp_path, "p5.img"), size_limit=2 * MiB)
    seen: list[tuple[str, str]] = []

    def lookup(kind: str, value: str) -> list[str]:
        seen.append((kind, value))
        return [str(loop.device)]

    monkeypatch.setattr(slots, "_find_part_nodes", lookup)
    spec = PartSpec("partuuid", "1234abcd-05")
    device = resolve_part(spec)
    assert seen == [("partuuid", "1234abcd-05")]
    assert (device.path, device.size, device.rdev) == (
        str(loop.device),
        2 * MiB,
        rdev_of(loop.device),
    )
    assert device.spec is spec


def test_resolve_partuuid_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    """STUB at the edge: two partitions answer (a cloned card in a USB reader)."""
    monkeypatch.setattr(
        slots, "_find_part_nodes", lambda kind, value: ["/dev/sda5", "/dev/mmcblk0p5"]
    )
    with pytest.raises(PlanError, match=r"more than one partition has PARTUUID=1234abcd-05"):
        resolve_part(PartSpec("partuuid", "1234abcd-05"))


def test_resolve_through_by_partuuid_symlinks(
    tmp_path: Path, loop_devices: LoopDevices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When udev's database does not know the partition, its /dev/disk symlinks are asked."""
    loop = loop_devices.attach(image(tmp_path, "p6.img"), size_limit=MiB)
    by_dir = tmp_path / "disk"
    (by_dir / "by-partuuid").mkdir(parents=True)
    (by_dir / "by-partlabel").mkdir()
    (by_dir / "by-partuuid" / "5e1f00d5-06").symlink_to(loop.device)
    (by_dir / "by-partlabel" / "root\\x20B").symlink_to(loop.device)
    monkeypatch.setattr(slots, "DISK_BY_DIR", str(by_dir))
    for spec in (PartSpec("partuuid", "5E1F00D5-06"), PartSpec("partlabel", "root B")):
        device = resolve_part(spec)
        assert (device.path, device.size, device.is_block) == (str(loop.device), MiB, True)


def test_udev_database_knows_loop_filesystem(
    tmp_path: Path, loop_devices: LoopDevices, udevd: None
) -> None:
    """Informational: pyudev resolution over udev's database (the same code as for PARTUUIDs).

    A loop device has no partition entry, so the property looked up is its ID_FS_UUID.
    """
    require(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 not found (e2fsprogs)")
    fs_uuid = str(uuid.uuid4())
    disk = image(tmp_path, "fs.img")
    run("mkfs.ext4", "-q", "-F", "-U", fs_uuid, str(disk))
    loop = loop_devices.attach(disk)
    name = loop.device.name
    run("udevadm", "trigger", "--action=add", "--subsystem-match=block", f"--sysname-match={name}")
    run("udevadm", "settle", "--timeout=30")
    found = slots._udev_nodes("ID_FS_UUID", fs_uuid.upper(), casefold=True)
    assert found == [str(loop.device)]


# ----------------------------------------------------------------------------- in_use_reason


def test_in_use_mounted_loop_device(
    tmp_path: Path, loop_devices: LoopDevices, mounts: Callable[[str, Path], None]
) -> None:
    dev = ext4_loop(tmp_path, loop_devices, "root.img")
    device = resolve_part(PartSpec("device", dev))
    assert in_use_reason(device, "/proc/self/mountinfo") is None
    point = tmp_path / "mnt root b"  # a space, escaped as \040 in mountinfo
    mounts(dev, point)
    reason = in_use_reason(device, "/proc/self/mountinfo")
    assert reason == f"{dev} is mounted at {point}"


def test_in_use_image_region_overlapping_mounted_loop(
    tmp_path: Path, loop_devices: LoopDevices, mounts: Callable[[str, Path], None]
) -> None:
    """A window of disk.img [1 MiB, 3 MiB) is a mounted loop; other windows are free."""
    dev = ext4_loop(tmp_path, loop_devices, "disk.img", offset=MiB, size_limit=2 * MiB)
    disk = str(tmp_path / "disk.img")
    mounts(dev, tmp_path / "mnt")

    overlapping = resolve_part(PartSpec("image", disk, offset=2 * MiB, size=MiB // 2))
    assert in_use_reason(overlapping, "/proc/self/mountinfo") == (
        f"{disk}@{2 * MiB}+{MiB // 2} overlaps {dev} (offset {MiB}, size {2 * MiB}), "
        f"which is mounted at {tmp_path / 'mnt'}"
    )
    straddling = resolve_part(PartSpec("image", disk, offset=0, size=MiB + 1))
    assert in_use_reason(straddling, "/proc/self/mountinfo") is not None

    before = resolve_part(PartSpec("image", disk, offset=0, size=MiB))
    after = resolve_part(PartSpec("image", disk, offset=3 * MiB))
    assert in_use_reason(before, "/proc/self/mountinfo") is None
    assert in_use_reason(after, "/proc/self/mountinfo") is None


def test_in_use_image_attached_but_not_mounted(tmp_path: Path, loop_devices: LoopDevices) -> None:
    disk = image(tmp_path, "disk.img")
    loop_devices.attach(disk)
    device = resolve_part(PartSpec("image", str(disk)))
    assert in_use_reason(device, "/proc/self/mountinfo") is None


def test_in_use_through_loop_over_block_device(
    tmp_path: Path, loop_devices: LoopDevices, mounts: Callable[[str, Path], None]
) -> None:
    """A loop device reading our block device, mounted: stacked use counts."""
    lower = loop_devices.attach(image(tmp_path, "lower.img"))
    upper = loop_devices.attach(lower.device)
    run("mkfs.ext4", "-q", "-F", str(upper.device))
    mounts(str(upper.device), tmp_path / "mnt")
    reason = in_use_reason(
        resolve_part(PartSpec("device", str(lower.device))), "/proc/self/mountinfo"
    )
    assert reason is not None
    assert reason.startswith(f"{lower.device} carries {upper.device} (")
    assert reason.endswith(f"which is mounted at {tmp_path / 'mnt'}")


def test_in_use_swap(
    tmp_path: Path, loop_devices: LoopDevices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in /proc/swaps naming a real loop device."""
    loop = loop_devices.attach(image(tmp_path, "swap.img"))
    swaps = tmp_path / "swaps"
    swaps.write_text(
        "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
        f"{loop.device}                              partition\t4092\t\t0\t\t-2\n"
    )
    monkeypatch.setattr(slots, "PROC_SWAPS", str(swaps))
    device = resolve_part(PartSpec("device", str(loop.device)))
    assert in_use_reason(device, write_mountinfo(tmp_path, [])) == f"{loop.device} is used as swap"


def test_in_use_image_as_swap_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = image(tmp_path, "swapfile")
    swaps = tmp_path / "swaps"
    swaps.write_text(f"Filename Type Size Used Priority\n{disk} file 4092 0 -2\n")
    monkeypatch.setattr(slots, "PROC_SWAPS", str(swaps))
    device = resolve_part(PartSpec("image", str(disk)))
    assert in_use_reason(device, write_mountinfo(tmp_path, [])) == (
        f"{disk}@0+{4 * MiB} is used as a swap file"
    )


def stand_in_device(rdev: int, path: str) -> Device:
    return Device(path, 0, MiB, True, rdev, PartSpec("device", path))


def test_in_use_holder_partition_and_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stand-in sysfs: an SD card with p2 (boot) and p5 (root, held by dm-0)."""
    disk, p2, p5 = (os.makedev(179, n) for n in (0, 2, 5))
    dm = os.makedev(253, 0)
    sysfs = fake_sysfs(
        tmp_path,
        {"mmcblk0": disk, "mmcblk0/mmcblk0p2": p2, "mmcblk0/mmcblk0p5": p5, "dm-0": dm},
        {"mmcblk0/mmcblk0p5/holders": ["dm-0"]},
    )
    monkeypatch.setattr(slots, "SYS_DEV_BLOCK", str(sysfs))
    monkeypatch.setattr(slots, "PROC_SWAPS", str(tmp_path / "no-swaps"))
    mountinfo = write_mountinfo(
        tmp_path,
        [
            mountinfo_line(20, dm, "/", source="/dev/mapper/root"),
            mountinfo_line(21, p2, "/boot/firmware", fstype="vfat"),
        ],
    )
    reason = in_use_reason(stand_in_device(p5, "/dev/mmcblk0p5"), mountinfo)
    assert reason == "/dev/mmcblk0p5 carries /dev/dm-0 (253:0), which is mounted at /"
    reason = in_use_reason(stand_in_device(disk, "/dev/mmcblk0"), mountinfo)
    assert reason is not None and reason.startswith("/dev/mmcblk0 carries /dev/mmcblk0p")

    only_disk = write_mountinfo(tmp_path, [mountinfo_line(20, disk, "/mnt/whole")])
    reason = in_use_reason(stand_in_device(p2, "/dev/mmcblk0p2"), only_disk)
    assert reason == "/dev/mmcblk0p2 is a partition of /dev/mmcblk0, which is mounted at /mnt/whole"
    free = write_mountinfo(tmp_path, [mountinfo_line(20, p2, "/boot")])
    assert in_use_reason(stand_in_device(p5, "/dev/mmcblk0p5"), free) is None


def test_in_use_refuses_unparsable_mountinfo(tmp_path: Path) -> None:
    disk = image(tmp_path, "disk.img")
    bad = tmp_path / "mountinfo"
    bad.write_text("20 1 8:1 / / rw - ext4 /dev/sda1 rw\nthis is not a mount\n")
    with pytest.raises(PlanError, match="line 2 is not a mountinfo line"):
        in_use_reason(resolve_part(PartSpec("image", str(disk))), str(bad))
