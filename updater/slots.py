"""Slots: find a slot's parts here, tell which slot is booted, and whether a part is busy.

Everything here answers one question before the first byte is written: *is it safe to write this
place?* So every doubt becomes a :class:`~updater.errors.PlanError` whose message names what was
looked at, in words an operator can act on; nothing in this module writes to a device.

Three views of the machine are combined:

* the configuration (:class:`~updater.config.PartSpec`): where each slot's parts are meant to be;
* the kernel command line (``root=``): which slot the bootloader started;
* the kernel's own tables (``/proc/self/mountinfo``, ``/proc/swaps``, sysfs): what is in use now.

The paths of the kernel tables that are not part of :class:`~updater.config.SystemConfig` are
module constants (``SYS_DEV_BLOCK``, ``SYS_BLOCK``, ``PROC_SWAPS``, ``DISK_BY_DIR``) so that tests
can point them at stand-in files the same way the configuration points at a stand-in cmdline.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from updater.config import Config, PartSpec
from updater.errors import PlanError

BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): a block device's size in bytes

SYS_DEV_BLOCK = "/sys/dev/block"  # MAJ:MIN -> the device's sysfs directory
SYS_BLOCK = "/sys/block"  # whole disks, among them loopN with loop/backing_file etc.
PROC_SWAPS = "/proc/swaps"
DISK_BY_DIR = "/dev/disk"  # udev's by-partuuid/ and by-partlabel/ symlinks

BLKID_TIMEOUT = 30.0  # seconds; blkid probes every block device and may meet a slow one

_UDEV_PROPERTY = {"partuuid": "ID_PART_ENTRY_UUID", "partlabel": "ID_PART_ENTRY_NAME"}
_BY_DIR = {"partuuid": "by-partuuid", "partlabel": "by-partlabel"}
_BLKID_TAG = {"partuuid": "PARTUUID", "partlabel": "PARTLABEL"}

# --------------------------------------------------------------------------------------------
# Devices


@dataclass(frozen=True, slots=True)
class Device:
    """One slot part as found on this machine: a region of a block device or of an image file.

    ``size`` is the capacity of the part in bytes (what may be written), ``rdev`` the device
    number of a block device (``None`` for image files); ``spec`` is what the configuration said,
    kept so that messages can quote it.
    """

    path: str
    offset: int
    size: int
    is_block: bool
    rdev: int | None
    spec: PartSpec

    def describe(self) -> str:
        """``/dev/loop3`` for a whole block device, ``disk.img@1048576+268435456`` otherwise."""
        if self.is_block and self.offset == 0 and self.spec.size is None:
            return self.path
        return f"{self.path}@{self.offset}+{self.size}"


def spec_text(spec: PartSpec) -> str:
    """The part spec as an operator wrote it in the configuration (for messages)."""
    if spec.kind == "partuuid":
        return f"PARTUUID={spec.value}"
    if spec.kind == "partlabel":
        return f"PARTLABEL={spec.value}"
    if spec.kind == "image":
        size = "" if spec.size is None else f", size {spec.size}"
        return f"image {spec.value} (offset {spec.offset}{size})"
    return spec.value


def resolve_part(spec: PartSpec) -> Device:
    """Find the part ``spec`` names on this machine and measure it; refuse anything doubtful.

    Nothing is opened for writing: a block device's size comes from ``BLKGETSIZE64`` on a
    read-only descriptor, so resolving a slot can never disturb it.
    """
    if spec.kind == "image":
        return _resolve_image(spec)
    if spec.kind == "device":
        return _resolve_block(spec, spec.value)
    nodes = _find_part_nodes(spec.kind, spec.value)
    if not nodes:
        raise PlanError(f"no partition with {spec_text(spec)} on this machine")
    if len(nodes) > 1:
        raise PlanError(
            f"more than one partition has {spec_text(spec)} ({', '.join(nodes)}): "
            "cannot tell which one is the slot; remove the duplicate (e.g. a cloned SD card)"
        )
    return _resolve_block(spec, nodes[0])


def _resolve_image(spec: PartSpec) -> Device:
    """An image file region; it must be a regular file and the region must lie inside it.

    A part that runs past the end of its file would either fail half-way through the write or
    silently grow the file, so it is refused up front.
    """
    try:
        st = Path(spec.value).stat()
    except OSError as err:
        raise PlanError(f"{spec_text(spec)}: cannot open: {err.strerror}") from err
    if not stat.S_ISREG(st.st_mode):
        raise PlanError(f"{spec_text(spec)}: not a regular file")
    offset, size = _region(spec, st.st_size, "file")
    return Device(spec.value, offset, size, is_block=False, rdev=None, spec=spec)


def _resolve_block(spec: PartSpec, path: str) -> Device:
    """A block device node; a regular file here is a configuration mistake, not a device."""
    try:
        st = Path(path).stat()
    except OSError as err:
        raise PlanError(f"{spec_text(spec)}: cannot open {path}: {err.strerror}") from err
    if stat.S_ISREG(st.st_mode):
        raise PlanError(
            f"{spec_text(spec)} is a regular file, not a block device: "
            f"configure it as `image: {path}` instead"
        )
    if not stat.S_ISBLK(st.st_mode):
        raise PlanError(f"{spec_text(spec)}: {path} is not a block device")
    offset, size = _region(spec, _block_size(path), "device")
    real = os.path.realpath(path)
    return Device(real, offset, size, is_block=True, rdev=st.st_rdev, spec=spec)


def _block_size(path: str) -> int:
    """The size of a block device in bytes, asked of the kernel on a read-only descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise PlanError(f"cannot open {path} to read its size: {err.strerror}") from err
    try:
        raw = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    except OSError as err:
        raise PlanError(f"cannot read the size of {path}: {err.strerror}") from err
    finally:
        os.close(fd)
    (size,) = struct.unpack("=Q", raw)
    return int(size)


def _region(spec: PartSpec, capacity: int, what: str) -> tuple[int, int]:
    """(offset, size) of the part inside something of ``capacity`` bytes, or PlanError."""
    if spec.offset < 0 or (spec.size is not None and spec.size <= 0):
        raise PlanError(f"{spec_text(spec)}: offset must be >= 0 and size > 0")
    if spec.offset >= capacity:
        raise PlanError(
            f"{spec_text(spec)}: offset {spec.offset} is past the end of the {what} "
            f"({capacity} bytes)"
        )
    size = capacity - spec.offset if spec.size is None else spec.size
    if spec.offset + size > capacity:
        raise PlanError(
            f"{spec_text(spec)}: the part ends at byte {spec.offset + size}, past the end of the "
            f"{what} ({capacity} bytes)"
        )
    return spec.offset, size


# --------------------------------------------------------------------------------------------
# Finding partitions by PARTUUID / PARTLABEL


def _find_part_nodes(kind: str, value: str) -> list[str]:
    """Device nodes whose partition entry has this PARTUUID or PARTLABEL.

    Asked of udev first (the authority on a running system), then of udev's symlinks (when
    pyudev cannot read its database), then of ``blkid`` (which probes the disks itself and works
    without udev, e.g. in an initramfs-like rescue system). The first source that knows any
    match answers; the caller refuses zero or several.
    """
    finders: tuple[Callable[[], list[str]], ...] = (
        lambda: _udev_nodes(_UDEV_PROPERTY[kind], value, casefold=kind == "partuuid"),
        lambda: _symlink_nodes(_BY_DIR[kind], value, casefold=kind == "partuuid"),
        lambda: _blkid_nodes(_BLKID_TAG[kind], value.lower() if kind == "partuuid" else value),
    )
    for finder in finders:
        nodes = finder()
        if nodes:
            return nodes
    return []


def _udev_nodes(prop: str, value: str, *, casefold: bool) -> list[str]:
    """Block device nodes whose udev property ``prop`` equals ``value``.

    pyudev is imported here, not at module level, so that importing this module (the CLI, tests)
    does not load libudev. Property values are compared after undoing udev's ``\\xHH`` encoding.
    """
    try:
        import pyudev  # deliberately lazy: see the docstring

        context = pyudev.Context()
        devices = list(context.list_devices(subsystem="block"))
    except (ImportError, OSError):  # no libudev, no /sys: let the next finder answer
        return []
    found: list[str] = []
    for dev in devices:
        have = dev.properties.get(prop)
        node = dev.device_node
        if have is not None and node and _same_name(_udev_unescape(have), value, casefold):
            found.append(str(node))
    return _dedupe_nodes(found)


def _symlink_nodes(subdir: str, value: str, *, casefold: bool) -> list[str]:
    """Nodes behind udev's ``/dev/disk/by-part*/`` symlinks whose name matches ``value``."""
    try:
        links = list((Path(DISK_BY_DIR) / subdir).iterdir())
    except OSError:
        return []
    found = [link for link in links if _same_name(_udev_unescape(link.name), value, casefold)]
    return _dedupe_nodes(os.path.realpath(link) for link in found)


def _blkid_nodes(tag: str, value: str) -> list[str]:
    """``blkid -t TAG=value -o device``; [] when blkid is missing, fails or finds nothing."""
    blkid = shutil.which("blkid")
    if blkid is None:
        return []
    try:
        out = subprocess.run(
            [blkid, "-t", f"{tag}={value}", "-o", "device"],
            capture_output=True,
            text=True,
            timeout=BLKID_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return _dedupe_nodes(line.strip() for line in out.stdout.splitlines() if line.strip())


def _same_name(have: str, want: str, casefold: bool) -> bool:
    return have.lower() == want.lower() if casefold else have == want


def _udev_unescape(text: str) -> str:
    r"""Undo udev's string encoding (``\x20`` for a space in a GPT label)."""
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def _dedupe_nodes(paths: Iterable[str]) -> list[str]:
    """The same partition seen through two names is one match, not two."""
    seen: dict[str, str] = {}
    for path in paths:
        seen.setdefault(os.path.realpath(path), path)
    return sorted(seen)


# --------------------------------------------------------------------------------------------
# The kernel command line and the booted slot


def parse_cmdline_root(cmdline_text: str) -> str | None:
    """The value of the last ``root=`` on a kernel command line; ``None`` if absent or empty.

    The kernel lets a later ``root=`` override an earlier one and stops reading its own
    parameters at ``--`` (the rest goes to init), so this does the same. Double quotes group
    words as the kernel's parser does; nothing else is special.
    """
    root: str | None = None
    for word in _split_cmdline(cmdline_text):
        if word == "--":
            break
        if word.startswith("root="):
            root = word[len("root=") :] or None
    return root


def _split_cmdline(text: str) -> list[str]:
    """Split on whitespace outside double quotes, dropping the quotes."""
    words: list[str] = []
    current: list[str] = []
    in_quote = False
    started = False
    for char in text:
        if char == '"':
            in_quote = not in_quote
            started = True
        elif char.isspace() and not in_quote:
            if started:
                words.append("".join(current))
            current, started = [], False
        else:
            current.append(char)
            started = True
    if started:
        words.append("".join(current))
    return words


def other_slot(name: str) -> str:
    """The slot that is not ``name``: the one an update is written to."""
    others = {"A": "B", "B": "A"}
    if name not in others:
        raise ValueError(f"unknown slot {name!r} (expected 'A' or 'B')")
    return others[name]


def booted_slot(config: Config) -> str:
    """The name of the slot the running system was booted from, or PlanError.

    The kernel command line's ``root=`` says which slot the bootloader meant to start; the device
    mounted at ``/`` says what actually runs. When the two disagree (a stale cmdline.txt, a
    fallback the bootloader made on its own, a rescue system) writing "the other slot" could
    overwrite the running system, so the install is refused.
    """
    cmdline = _read_text(config.system.cmdline, "the kernel command line")
    root = parse_cmdline_root(cmdline)
    if root is None:
        raise PlanError(
            f"cannot tell which slot is booted: {config.system.cmdline} has no root= argument"
        )
    name = _slot_for_root(config, root)
    _cross_check_mounted_root(config, name, root)
    return name


def _slot_for_root(config: Config, root: str) -> str:
    """The one slot whose root part is what ``root=`` names."""
    names = sorted(
        name
        for name, slot in config.slots.items()
        if "root" in slot.parts and _root_matches(slot.parts["root"], root)
    )
    if len(names) == 1:
        return names[0]
    if not names:
        raise PlanError(f"cannot tell which slot is booted: root={root} matches {_none_of(config)}")
    raise PlanError(
        f"cannot tell which slot is booted: root={root} matches slots {' and '.join(names)}; "
        "the slots' root parts must differ"
    )


def _none_of(config: Config) -> str:
    names = sorted(config.slots)
    if len(names) == 2:
        return f"neither slot {names[0]} nor {names[1]}"
    return f"no configured slot ({', '.join(names) or 'none configured'})"


def _root_matches(spec: PartSpec, root: str) -> bool:
    """Does a ``root=`` value name this root part spec?

    ``PARTUUID=`` compares case-insensitively (the kernel does; tools print either case) against
    a partuuid spec or the spec's ``partuuid`` attribute; ``PARTLABEL=`` compares exactly against
    a partlabel spec; a path compares against a device spec by real path, then by device number
    (``/dev/root``-style aliases and nodes created elsewhere). Other forms (``UUID=``, ``MAJ:MIN``,
    ``/dev/nfs``) never match: slots are identified by partition, not by file system.
    """
    if root.startswith("PARTUUID="):
        want = root[len("PARTUUID=") :].lower()
        ids = [spec.partuuid, spec.value if spec.kind == "partuuid" else None]
        return any(i is not None and i.lower() == want for i in ids)
    if root.startswith("PARTLABEL="):
        return spec.kind == "partlabel" and spec.value == root[len("PARTLABEL=") :]
    if root.startswith("/") and spec.kind == "device":
        return _same_block_path(root, spec.value)
    return False


def _same_block_path(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    ra, rb = _block_rdev(a), _block_rdev(b)
    return ra is not None and ra == rb


def _cross_check_mounted_root(config: Config, name: str, root: str) -> None:
    """Refuse when the device mounted at ``/`` is not slot ``name``'s root part.

    Only possible when the root part resolves to a block device here (not for image-file parts,
    and skipped when resolution itself fails: the install will then fail on the target anyway).
    Through device-mapper, md or a loop the mounted device is followed down its ``slaves/``;
    through an overlay (read-only root with a tmpfs upper layer) its ``lowerdir`` mount is
    followed. This is best effort: any device found on the way that is the root part agrees.
    """
    try:
        device = resolve_part(config.slots[name].parts["root"])
    except PlanError:
        return
    if not device.is_block or device.rdev is None:
        return
    mounts = _read_mountinfo(config.system.mountinfo)
    mounted = _last_mount_at(mounts, "/")
    if mounted is None:
        raise PlanError(f"{config.system.mountinfo} shows nothing mounted at /")
    if device.rdev in _backing_devices(mounted, mounts):
        return
    raise PlanError(
        f"the kernel command line and the mounted root disagree: root={root} is slot {name}'s "
        f"root {device.describe()} ({_majmin(device.rdev)}), but / is mounted from "
        f"{mounted.source} ({mounted.majmin_text}); refusing to guess which slot is running"
    )


def _backing_devices(mount: _Mount, mounts: list[_Mount], depth: int = 0) -> set[int]:
    """The device numbers a mount stands on: its own, their slaves, recursively.

    The source path is only consulted when MAJ:MIN is anonymous (major 0: btrfs, overlay), as
    the path is whatever was typed at mount time while MAJ:MIN is the kernel's own answer.
    """
    found: set[int] = set()
    if os.major(mount.rdev) != 0:
        found.add(mount.rdev)
    elif mount.source.startswith("/"):
        source_rdev = _block_rdev(mount.source)
        found |= set() if source_rdev is None else {source_rdev}
    for rdev in list(found):
        found |= _slaves_closure(rdev)
    lower = _overlay_lowerdir(mount)
    if lower is not None and depth < 4:
        below = _last_mount_at(mounts, lower)
        if below is not None and below is not mount:
            found |= _backing_devices(below, mounts, depth + 1)
    return found


def _overlay_lowerdir(mount: _Mount) -> str | None:
    """The first ``lowerdir`` of an overlay mount (read-only roots keep the real root there)."""
    if mount.fstype != "overlay":
        return None
    for option in mount.super_options.split(","):
        if option.startswith("lowerdir=") or option.startswith("lowerdir+="):
            first = option.split("=", 1)[1].split(":")[0]
            return _unescape_octal(first).rstrip("/") or "/"
    return None


# --------------------------------------------------------------------------------------------
# mountinfo, swaps, sysfs


@dataclass(frozen=True, slots=True)
class _Mount:
    """One line of ``/proc/PID/mountinfo``, with the mount point unescaped."""

    rdev: int
    mount_point: str
    fstype: str
    source: str
    super_options: str

    @property
    def majmin_text(self) -> str:
        return _majmin(self.rdev)


def _read_mountinfo(path: str) -> list[_Mount]:
    """Parse a mountinfo file; a line that does not parse is an error, never skipped.

    Skipping a line could hide exactly the mount that makes a device busy.
    """
    text = _read_text(path, "the mount table")
    mounts: list[_Mount] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            mounts.append(_parse_mountinfo_line(line, path, number))
    return mounts


def _parse_mountinfo_line(line: str, path: str, number: int) -> _Mount:
    """``id parent MAJ:MIN root mountpoint opts [optional...] - fstype source superopts``."""
    fields = line.split()
    try:
        sep = fields.index("-", 6)
        major, minor = (int(n) for n in fields[2].split(":"))
        fstype, source = fields[sep + 1], fields[sep + 2]
    except (ValueError, IndexError) as err:
        raise PlanError(f"{path}: line {number} is not a mountinfo line: {line!r}") from err
    super_options = fields[sep + 3] if len(fields) > sep + 3 else ""
    return _Mount(
        rdev=os.makedev(major, minor),
        mount_point=_unescape_octal(fields[4]),
        fstype=fstype,
        source=_unescape_octal(source),
        super_options=super_options,
    )


def _last_mount_at(mounts: list[_Mount], point: str) -> _Mount | None:
    """The mount visible at ``point``: the kernel stacks mounts, so the last line wins."""
    at = [m for m in mounts if m.mount_point == point]
    return at[-1] if at else None


def _unescape_octal(text: str) -> str:
    r"""Undo the kernel's ``\040``-style escapes (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _read_swaps(path: str) -> list[str]:
    """The swap areas in use (device or file paths); a missing table means none."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return []
    except OSError as err:
        raise PlanError(f"cannot read the swap table {path}: {err.strerror}") from err
    lines = text.splitlines()[1:]  # the first line is the header
    return [_unescape_octal(line.split()[0]) for line in lines if line.split()]


def _read_text(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as err:
        raise PlanError(f"cannot read {what} {path}: {err.strerror}") from err


def _majmin(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _block_rdev(path: str) -> int | None:
    """The device number of a block device path, or None (missing, not a block device)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else None


def _sys_dir(rdev: int) -> Path:
    return Path(SYS_DEV_BLOCK) / _majmin(rdev)


def _read_dev_file(path: Path) -> int | None:
    """A sysfs ``dev`` file (``MAJ:MIN``) as a device number."""
    try:
        major, minor = path.read_text(encoding="ascii").strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def _listed_devices(directory: Path) -> list[int]:
    """Device numbers of the entries of a sysfs ``holders/`` or ``slaves/`` directory."""
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return []
    numbers = (_read_dev_file(entry / "dev") for entry in entries)
    return [n for n in numbers if n is not None]


def _slaves_closure(rdev: int) -> set[int]:
    """Every device below ``rdev`` (dm, md, ...), following ``slaves/`` down to the disks."""
    found: set[int] = set()
    todo = _listed_devices(_sys_dir(rdev) / "slaves")
    while todo:
        dev = todo.pop()
        if dev not in found:
            found.add(dev)
            todo.extend(_listed_devices(_sys_dir(dev) / "slaves"))
    return found


def _partitions(rdev: int) -> list[int]:
    """The partitions of a whole disk (sub-directories that have a ``partition`` file)."""
    try:
        children = sorted(_sys_dir(rdev).iterdir())
    except OSError:
        return []
    numbers = (_read_dev_file(c / "dev") for c in children if (c / "partition").is_file())
    return [n for n in numbers if n is not None]


def _parent_disk(rdev: int) -> int | None:
    """The whole disk a partition belongs to, or None for a whole disk."""
    directory = _sys_dir(rdev)
    if not (directory / "partition").is_file():
        return None
    return _read_dev_file(directory.resolve().parent / "dev")


def _dev_name(rdev: int) -> str:
    """``/dev/NAME`` for a device number, from sysfs; ``MAJ:MIN`` when sysfs does not know it."""
    directory = _sys_dir(rdev)
    if directory.exists():
        return f"/dev/{directory.resolve().name}"
    return _majmin(rdev)


@dataclass(frozen=True, slots=True)
class _Loop:
    """An attached loop device: what it reads from, and which bytes of it."""

    name: str
    rdev: int
    backing: str
    offset: int
    sizelimit: int  # 0: up to the end of the backing file

    def overlaps(self, offset: int, size: int | None) -> bool:
        """Whether this loop's window and ``[offset, offset + size)`` share a byte."""
        loop_end = None if self.sizelimit == 0 else self.offset + self.sizelimit
        end = None if size is None else offset + size
        return (loop_end is None or offset < loop_end) and (end is None or self.offset < end)

    def describe(self) -> str:
        size = "to the end" if self.sizelimit == 0 else f"size {self.sizelimit}"
        return f"/dev/{self.name} (offset {self.offset}, {size})"


def _attached_loops() -> list[_Loop]:
    """Every loop device that has a backing file (``/sys/block/loopN/loop/`` exists only then)."""
    loops: list[_Loop] = []
    for directory in sorted(Path(SYS_BLOCK).glob("loop*")):
        loop = _read_loop(directory)
        if loop is not None:
            loops.append(loop)
    return loops


def _read_loop(directory: Path) -> _Loop | None:
    try:
        backing = (directory / "loop" / "backing_file").read_text(encoding="utf-8").rstrip("\n")
        offset = int((directory / "loop" / "offset").read_text(encoding="ascii"))
        sizelimit = int((directory / "loop" / "sizelimit").read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None  # not attached, or detached while we looked
    rdev = _read_dev_file(directory / "dev")
    if rdev is None:
        return None
    return _Loop(directory.name, rdev, backing.removesuffix(" (deleted)"), offset, sizelimit)


def _loops_over_file(target: os.stat_result, offset: int, size: int) -> list[_Loop]:
    """Loop devices reading overlapping bytes of the regular file ``target``.

    Files are compared by device and inode, not by path: the path a loop was attached with may
    be a different name (a symlink, a bind mount) for the same file.
    """
    return [
        loop
        for loop in _attached_loops()
        if _same_file(loop.backing, target) and loop.overlaps(offset, size)
    ]


def _loops_over_block(rdev: int) -> list[int]:
    """Loop devices reading (any part of) the block device ``rdev``."""
    return [loop.rdev for loop in _attached_loops() if _block_rdev(loop.backing) == rdev]


def _same_file(path: str, target: os.stat_result) -> bool:
    try:
        st = Path(path).stat()
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)


# --------------------------------------------------------------------------------------------
# Is it in use?


@dataclass(frozen=True, slots=True)
class _Usage:
    """What the kernel uses right now: device number -> mount points; swap areas."""

    mounted: dict[int, list[str]]
    swaps: list[str]

    def of_block(self, rdev: int) -> str | None:
        points = self.mounted.get(rdev)
        if points:
            return "mounted at " + ", ".join(points)
        if any(_block_rdev(s) == rdev for s in self.swaps):
            return "used as swap"
        return None

    def of_file(self, target: os.stat_result) -> str | None:
        if any(_same_file(s, target) for s in self.swaps):
            return "used as a swap file"
        return None


def _current_usage(mountinfo_path: str) -> _Usage:
    """Index the mount table by device number: its MAJ:MIN and, for a device path, its source.

    The source counts too because some file systems (btrfs) report an anonymous MAJ:MIN.
    """
    mounted: dict[int, list[str]] = {}
    for mount in _read_mountinfo(mountinfo_path):
        source = _block_rdev(mount.source) if mount.source.startswith("/") else None
        for rdev in {mount.rdev} if source is None else {mount.rdev, source}:
            mounted.setdefault(rdev, []).append(mount.mount_point)
    return _Usage(mounted, _read_swaps(PROC_SWAPS))


def in_use_reason(device: Device, mountinfo_path: str) -> str | None:
    """Why ``device`` must not be written now, or None when nothing uses it.

    A block device is busy when it, or anything stacked on it (its partitions if it is a whole
    disk, its holders such as dm-crypt or md, loop devices reading it, and so on upwards), is
    mounted or used as swap, or when the whole disk it is a partition of is mounted. Loop devices
    over a block device are counted whatever their offset (conservative). An image file region
    is busy when a loop device reading overlapping bytes of the same file is (so) in use, or
    when the file is a swap file. A loop device that is merely attached does not make it busy.
    """
    usage = _current_usage(mountinfo_path)
    if device.is_block and device.rdev is not None:
        use = _block_use(device.rdev, usage)
    else:
        use = _image_use(device, usage)
    return None if use is None else f"{device.describe()} {use}"


def _block_use(rdev: int, usage: _Usage) -> str | None:
    """How the block device ``rdev`` is used, as the predicate of a sentence, or None."""
    for dev in _stacked_above(rdev):
        reason = usage.of_block(dev)
        if reason is None:
            continue
        if dev == rdev:
            return f"is {reason}"
        return f"carries {_dev_name(dev)} ({_majmin(dev)}), which is {reason}"
    parent = _parent_disk(rdev)
    reason = None if parent is None else usage.of_block(parent)
    if parent is not None and reason is not None:
        return f"is a partition of {_dev_name(parent)}, which is {reason}"
    return None


def _image_use(device: Device, usage: _Usage) -> str | None:
    """How an image file region is used (swap file, or under a used loop device), or None."""
    try:
        target = Path(device.path).stat()
    except OSError as err:
        raise PlanError(f"cannot check whether {device.describe()} is in use: {err}") from err
    reason = usage.of_file(target)
    if reason is not None:
        return f"is {reason}"
    for loop in _loops_over_file(target, device.offset, device.size):
        use = _block_use(loop.rdev, usage)
        if use is not None:
            return f"overlaps {loop.describe()}, which {use}"
    return None


def _stacked_above(rdev: int) -> list[int]:
    """``rdev`` and every device built on it: partitions, holders, loops; breadth first."""
    order = [rdev]
    for dev in order:  # grows while we walk it
        for above in _directly_above(dev):
            if above not in order:
                order.append(above)
    return order


def _directly_above(rdev: int) -> list[int]:
    holders = _listed_devices(_sys_dir(rdev) / "holders")
    return _partitions(rdev) + holders + _loops_over_block(rdev)
