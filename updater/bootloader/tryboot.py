"""The Raspberry Pi firmware's tryboot A/B switch (Pi 4/400/CM4 with a 2022-11+ EEPROM, Pi 5).

The firmware reads ``autoboot.txt`` (at most 512 bytes, FAT partition 1) before anything else::

    [all]
    tryboot_a_b=1
    boot_partition=2      <- the primary slot: every ordinary boot
    [tryboot]
    boot_partition=3      <- used only by the one boot after the one-shot tryboot flag was set

The flag is cleared by the bootloader before the OS starts, so any reset after the trial boots
``[all]`` again: rollback is a reset, commit is swapping the two numbers. The firmware tells the OS
what it did under ``/proc/device-tree/chosen/bootloader/`` (4-byte big-endian ``partition``,
``tryboot``, ``capabilities``).

Power safety (see :func:`plan_rewrite`): FAT has no journal and a rename is not atomic on it, so
the file is only ever rewritten in place, at its own length or longer, never truncated, and every
byte state a power cut can leave behind (any prefix of a write over the old bytes) is checked,
before the first write, to be a file the firmware boots from one of the slots.

Arming sets the one-shot flag through the firmware mailbox (``/dev/vcio``) when there is one;
otherwise the reboot sets it (``systemctl reboot "0 tryboot"``).
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import struct
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal, NamedTuple

from updater.bootloader import SLOTS, BootloaderError

NAME = "tryboot"
MAX_AUTOBOOT_SIZE = 512  # the firmware reads no more of autoboot.txt
MIGRATED_SIZE = 128  # a non-canonical file grows to at least this to make room for the migration
DEFAULT_PARTITIONS: Mapping[str, int] = MappingProxyType({"A": 2, "B": 3})
DEVICE_TREE = Path("/proc/device-tree/chosen/bootloader")
VCIO = Path("/dev/vcio")
REBOOT_ARGUMENT = "0 tryboot"  # partition 0 (default), " tryboot" arms the one-shot flag

CAP_TRYBOOT_A_B = 0x4  # capabilities bit 2: the EEPROM understands tryboot_a_b
CAP_TRYBOOT = 0x8  # capabilities bit 3: the EEPROM can do a tryboot at all
OLD_EEPROM = (
    "the bootloader EEPROM is too old for tryboot A/B: update it (rpi-eeprom-update), "
    "or use the uboot backend"
)

_KEYS = ("boot_partition", "tryboot_a_b")
_NUMBER = re.compile(r"[0-9]{1,3}")
_WHITESPACE = " \t\r"


def _error(message: str) -> BootloaderError:
    return BootloaderError(NAME, message)


# --------------------------------------------------------------------------- reading autoboot.txt


LineKind = Literal["blank", "comment", "header", "setting", "other"]  # setting: a key we read


class Line(NamedTuple):
    """One line of autoboot.txt as byte offsets: ``data[start:end]`` (``end`` is the ``\\n``)."""

    start: int
    end: int
    kind: LineKind
    section: str  # the section in force: "all", "tryboot" or another filter's name
    key: str = ""  # for a setting


@dataclass(frozen=True, slots=True)
class Autoboot:
    """What the firmware makes of autoboot.txt: the partition it boots normally and on a trial."""

    primary: int
    trial: int | None  # None: no [tryboot] boot_partition, a trial boots ``primary`` too
    lines: tuple[Line, ...]


def parse_autoboot(data: bytes, partitions: Collection[int]) -> Autoboot:
    """Read autoboot.txt the way the firmware does, and refuse what this updater cannot manage.

    Tolerated as the firmware tolerates them: CRLF, blank lines, ``#`` comments, whitespace around
    keys, values and section names, unknown lines and keys (ignored), a missing final newline, a
    setting repeated (the last one counts, as in config.txt). Refused, because guessing would risk
    booting the wrong slot: no ``tryboot_a_b=1`` in ``[all]``, any ``boot_partition`` that is not
    one of ``partitions``, the two keys under another filter (``[pi4]``...), a malformed ``[``
    line, a value that is not a plain number, more than 512 bytes.
    """
    if len(data) > MAX_AUTOBOOT_SIZE:
        raise _error(f"autoboot.txt is {len(data)} bytes; the firmware reads only 512")
    section = "all"
    values: dict[tuple[str, str], int] = {}
    lines: list[Line] = []
    start = 0
    for raw in data.decode("latin-1").split("\n"):
        end = start + len(raw)
        text = raw.strip(_WHITESPACE)
        kind: LineKind = "other"
        key = ""
        if not text:
            kind = "blank"
        elif text[0] == "#":
            kind = "comment"
        elif text[0] == "[":
            section, kind = _section_name(text), "header"
        elif "=" in text:
            key, value = text.split("=", 1)
            key = key.rstrip(_WHITESPACE)
            if _is_setting(key, section):
                values[section, key] = _setting_value(key, value.lstrip(_WHITESPACE), partitions)
                kind = "setting"
            else:
                key = ""
        if start < len(data):  # not the empty piece after a final newline
            lines.append(Line(start, end, kind, section, key))
        start = end + 1
    if values.get(("all", "tryboot_a_b")) != 1:
        raise _error("autoboot.txt lacks tryboot_a_b=1 in [all]")
    if ("all", "boot_partition") not in values:
        raise _error("autoboot.txt has no boot_partition in [all]")
    return Autoboot(
        values["all", "boot_partition"], values.get(("tryboot", "boot_partition")), tuple(lines)
    )


def _section_name(text: str) -> str:
    if not text.endswith("]"):
        raise _error(f"autoboot.txt: malformed section line {text!r}")
    return text[1:-1].strip(_WHITESPACE).lower()


def _is_setting(key: str, section: str) -> bool:
    """Whether ``key`` is one of ours; refuses ours where the firmware's reading is not certain."""
    if key.lower() in _KEYS and key not in _KEYS:
        raise _error(f"autoboot.txt: write {key.lower()} in lower case, not {key!r}")
    if key not in _KEYS:
        return False
    if section == "tryboot" and key == "tryboot_a_b":
        raise _error("autoboot.txt: tryboot_a_b belongs in [all], not [tryboot]")
    if section not in ("all", "tryboot"):
        raise _error(f"autoboot.txt: {key} under [{section}]: only [all] and [tryboot] are managed")
    return True


def _setting_value(key: str, value: str, partitions: Collection[int]) -> int:
    if not _NUMBER.fullmatch(value):
        raise _error(f"autoboot.txt: {key}={value!r} is not a plain number")
    number = int(value)
    if key == "boot_partition" and number not in partitions:
        wanted = ", ".join(str(p) for p in sorted(partitions))
        raise _error(f"autoboot.txt: boot_partition={number} is not a slot partition ({wanted})")
    return number


# --------------------------------------------------------------------------- the canonical layout

_PAD_TEXT = b"# padding: this file is rewritten in place at a fixed length "


def canonical_autoboot(primary: int, trial: int) -> bytes:
    """The documented autoboot.txt; both variants of a slot pair have the same length."""
    return (
        f"[all]\ntryboot_a_b=1\nboot_partition={primary}\n[tryboot]\nboot_partition={trial}\n"
    ).encode()


def padding(size: int) -> bytes:
    """A comment line of exactly ``size`` bytes (one ``\\n`` when ``size`` is 1)."""
    if size <= 0:
        return b""
    return (_PAD_TEXT + b"#" * size)[: size - 1] + b"\n"


def autoboot_layout(primary: int, trial: int, size: int) -> bytes:
    """The canonical text padded with a trailing comment to ``size`` bytes (if it is longer)."""
    text = canonical_autoboot(primary, trial)
    return text + padding(size - len(text))


def _layout_pair(data: bytes, partitions: Collection[int]) -> tuple[int, int] | None:
    for primary in partitions:
        for trial in partitions:
            if data == autoboot_layout(primary, trial, len(data)):
                return primary, trial
    return None


# --------------------------------------------------------------------------- power-safe rewrites


def torn_states(before: bytes, after: bytes) -> Iterator[bytes]:
    """Every file a power cut can leave while ``after`` is written at offset 0 over ``before``.

    The model: the write lands in order, so a cut leaves ``after[:k] + before[k:]`` for some k.
    Only the k after a changed byte give a new state; ``after`` itself is the last one.
    """
    for k in range(1, len(after) + 1):
        if k > len(before) or after[k - 1] != before[k - 1]:
            yield after[:k] + before[k:]


def _check_plan(
    current: bytes, states: list[bytes], allowed: set[int], parts: Collection[int]
) -> None:
    """Refuse a plan, before anything is written, if one byte state on the way is not a file the
    firmware boots from ``allowed`` (the old or the new primary) with tryboot_a_b=1 intact."""
    before = current
    for state in states:
        if len(state) > MAX_AUTOBOOT_SIZE or len(state) < len(before):
            raise _error("internal: a rewrite plan would truncate or overgrow autoboot.txt")
        for torn in torn_states(before, state):
            primary = _primary_or_reason(torn, frozenset(parts))
            if isinstance(primary, str):
                raise _error(f"cannot rewrite autoboot.txt power-safely ({primary})")
            if primary not in allowed:
                raise _error("cannot rewrite autoboot.txt power-safely: a cut would switch slots")
        before = state


@functools.lru_cache(maxsize=1024)
def _primary_or_reason(data: bytes, partitions: frozenset[int]) -> int | str:
    """The primary partition of ``data``, or why it is refused. Cached: a plan checks a few
    hundred states, and a rerun after a cut meets most of them again."""
    try:
        return parse_autoboot(data, partitions).primary
    except BootloaderError as err:
        return str(err)


def plan_rewrite(
    current: bytes, primary: int, trial: int, partitions: Collection[int]
) -> list[bytes]:
    """The file states to write, in order, to turn ``current`` into the canonical layout for
    (``primary``, ``trial``); empty when it is already there. Each state is written whole at
    offset 0 and fsynced before the next; each was proven safe against a cut at every byte.

    The usual case, a file already in the canonical layout: one same-length write. The two
    variants differ only in the two partition digits, ``[all]``'s first. A cut leaves the old
    file, or ``[all]`` already naming the new primary (the commit has taken effect; ``[tryboot]``
    still names it too, harmless: a trial armed later fixes ``[tryboot]`` first), or the new file.

    Any other layout (CRLF, comments, whitespace, other order, another length, partition numbers
    of different widths) is migrated once by :func:`_migration_states`, and the result, padded
    with a trailing comment to ``max(len, 128)`` bytes, takes the usual path from then on. The
    length only ever grows: a shorter file cannot be reached without a truncation, and a same
    length one leaves no room to keep a valid copy of the deciding lines while the front is
    rewritten.

    Outside the model (a write landing in order): a medium that tears a sector some other way.
    The file is one 512-byte sector, which SD cards and eMMC program at once in practice
    (unconfirmed); the read-back after fsync catches a write that did not land.
    """
    parsed = parse_autoboot(current, partitions)
    allowed = {parsed.primary, primary}
    if _layout_pair(current, partitions) is not None:
        target = autoboot_layout(primary, trial, len(current))
        if target == current:
            return []
        if len(target) == len(current):
            try:
                _check_plan(current, [target], allowed, partitions)
            except BootloaderError:
                pass  # e.g. 2 <-> 10: a cut could leave "1"; migrate instead
            else:
                return [target]
    states = _migration_states(current, primary, trial, partitions)
    _check_plan(current, states, allowed, partitions)
    return states


class _Editor:
    """A byte buffer that records each state to write; every edit below is one of four kinds
    whose torn states stay valid: kill (a line becomes ``#`` bytes, first byte first), stage (a
    line written into ``#`` filler with its first byte still ``#``), activate (that one byte),
    pad (``#`` filler becomes the padding comment)."""

    def __init__(self, data: bytes, partitions: Collection[int]) -> None:
        self.data = bytearray(data)
        self.partitions = partitions
        self.states: list[bytes] = []
        self._last = data

    def commit_state(self) -> None:
        """Close a step: what was edited since the last one is written (and fsynced) at once."""
        state = bytes(self.data)
        if state != self._last:
            self.states.append(state)
            self._last = state

    def lines(self) -> tuple[Line, ...]:
        return parse_autoboot(bytes(self.data), self.partitions).lines

    def kill(self, line: Line) -> None:
        self.data[line.start : line.end] = b"#" * (line.end - line.start)


def _essential(lines: tuple[Line, ...]) -> list[Line]:
    """The lines that decide the ordinary boot: the last tryboot_a_b and boot_partition in [all]."""
    found: dict[str, Line] = {}
    for line in lines:
        if line.kind == "setting" and line.section == "all":
            found[line.key] = line
    return [found["tryboot_a_b"], found["boot_partition"]]


def _migration_states(
    current: bytes, primary: int, trial: int, partitions: Collection[int]
) -> list[bytes]:
    """Rewrite any valid layout into ``autoboot_layout(primary, trial, size)`` one safe step at a
    time, ``size = max(len(current), 128)``: the firmware sees a valid file at every byte.

    1. Kill every line except the two that decide the ordinary boot (last ``tryboot_a_b`` and
       ``boot_partition`` in ``[all]``): comments, blanks, ``[tryboot]``'s settings, the rest.
    2. Kill the section headers. Only now: a ``[tryboot]`` header killed before its settings
       would move them into ``[all]``. The cut lands in order, so an ``[all]`` header dies after
       every header before it: the two lines stay in ``[all]`` in every torn state.
    3. Grow to ``size`` by appending a comment (old bytes untouched; on vfat, fsync writes the
       data before the directory entry's new size). After 1-2 no torn state can look canonical,
       so a rerun after a cut aims at the same size.
    4. Copy those two lines that lie in the first ``len(canonical)`` bytes into the filler
       behind them: stage (``#ryboot_a_b=1``), activate (one byte), kill the originals.
    5. Stage the canonical text, commented, over the now empty front; activate ``[all]``,
       ``tryboot_a_b=1``, ``boot_partition=<new>`` (the old value behind still wins: last one).
    6. Kill the old lines behind (the new primary now decides), then activate ``[tryboot]`` and
       its ``boot_partition`` (header first) and turn the filler into the padding comment.
    """
    size = max(len(current), MIGRATED_SIZE)
    text = canonical_autoboot(primary, trial)
    starts = [0, *(i + 1 for i, byte in enumerate(text[:-1]) if byte == ord("\n"))]
    edit = _Editor(current, partitions)
    keep = _essential(edit.lines())
    for line in edit.lines():  # 1
        if line.kind != "header" and line not in keep:
            edit.kill(line)
    edit.commit_state()
    for line in edit.lines():  # 2
        if line.kind == "header":
            edit.kill(line)
    edit.commit_state()
    _grow(edit, size)  # 3
    _move_behind(edit, len(text))  # 4
    edit.data[: len(text)] = _commented(text, starts)  # 5
    edit.commit_state()
    for start in starts[:3]:
        edit.data[start] = text[start]
    edit.commit_state()
    for line in edit.lines():  # 6
        if line.kind == "setting" and line.start >= len(text):
            edit.kill(line)
    edit.commit_state()
    for start in starts[3:]:
        edit.data[start] = text[start]
    edit.data[len(text) :] = padding(size - len(text))
    edit.commit_state()
    if edit.states[-1] != autoboot_layout(primary, trial, size):
        raise _error("internal: the migration plan does not end in the canonical layout")
    return edit.states


def _grow(edit: _Editor, size: int) -> None:
    """Step 3: append a comment up to ``size``; a ``\\n`` first ends an unterminated line."""
    grow = size - len(edit.data)
    if grow <= 0:
        return
    if edit.data.endswith(b"\n"):
        edit.data += b"#" * (grow - 1) + b"\n"
    else:
        edit.data += b"\n" + b"#" * (grow - 2) + b"\n" if grow >= 2 else b"\n"
    edit.commit_state()


def _commented(text: bytes, starts: list[int]) -> bytes:
    staged = bytearray(text)
    for start in starts:
        staged[start] = ord("#")
    return bytes(staged)


def _move_behind(edit: _Editor, front: int) -> None:
    """Step 4 of the migration: copy the deciding lines found in ``[0, front)`` behind it."""
    keep = _essential(edit.lines())
    moving = [line for line in keep if line.start < front]
    if not moving:
        return
    taken = [(line.start, line.end + 1) for line in keep]
    copies: list[tuple[int, bytes]] = []
    for line in moving:
        value = bytes(edit.data[line.start : line.end]).split(b"=", 1)[1].strip(b" \t\r")
        copy = line.key.encode() + b"=" + value + b"\n"
        at = _free_run(len(edit.data), front, len(copy) + 1, taken)
        taken.append((at, at + len(copy) + 1))
        copies.append((at + 1, copy))
    for at, copy in copies:  # stage: "\n#ryboot_a_b=1\n" into filler, a comment
        edit.data[at - 1 : at + len(copy)] = b"\n#" + copy[1:]
    edit.commit_state()
    for at, copy in copies:  # activate: one byte each
        edit.data[at] = copy[0]
    edit.commit_state()
    for line in moving:
        edit.kill(line)
    edit.commit_state()


def _free_run(size: int, start: int, length: int, taken: list[tuple[int, int]]) -> int:
    at = start
    while at + length <= size:
        clash = [end for begin, end in taken if begin < at + length and at < end]
        if not clash:
            return at
        at = max(clash)
    raise _error(
        "autoboot.txt is laid out so that it cannot be rewritten power-safely; "
        "replace it with the canonical layout (see docs/raspberry-pi-ab.md)"
    )


# --------------------------------------------------------------------------- writing in place

_pwrite = os.pwrite  # a seam: tests cut the power after k bytes


def _write_states(path: Path, states: list[bytes]) -> None:
    """Write each state whole at offset 0 in place (no O_TRUNC, no rename: FAT has neither
    safely), fsync, then read it back from the medium and compare before the next one."""
    if not states:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as err:
        raise _error(f"cannot open {path} for writing: {err}") from err
    try:
        for state in states:
            _write_all(fd, state)
            os.fsync(fd)
            _verify(path, state)
    except OSError as err:
        raise _error(f"cannot write {path}: {err}") from err
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    done = 0
    while done < len(data):
        done += _pwrite(fd, data[done:], done)


def _verify(path: Path, expected: bytes) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # The pages are clean after fsync: dropping them makes the read come from the medium.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        found = os.read(fd, MAX_AUTOBOOT_SIZE + 1)
    finally:
        os.close(fd)
    if found != expected:
        raise _error(f"{path} reads back different from what was written and synced")


# --------------------------------------------------------------------------- the firmware's view


def read_u32(path: Path) -> int | None:
    """A device-tree cell (4 bytes, big-endian), or None when the property is absent."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise _error(f"cannot read {path}: {err}") from err
    if len(data) != 4:
        raise _error(f"{path}: expected a 4-byte big-endian value, found {len(data)} bytes")
    return int.from_bytes(data, "big")


# --------------------------------------------------------------------------- the firmware mailbox

TAG_GET_REBOOT_FLAGS = 0x00030064
TAG_SET_REBOOT_FLAGS = 0x00038064
MBOX_REQUEST = 0x00000000
MBOX_SUCCESS = 0x80000000  # buffer code of a processed request; also the tag's response bit
_PROPERTY = struct.Struct("<7I")


def mbox_property_ioctl(pointer_size: int = struct.calcsize("P")) -> int:
    """``IOCTL_MBOX_PROPERTY = _IOWR(100, 0, char *)``: direction read|write (3) in bits 30-31,
    the argument size (a pointer: 8 on arm64, 4 on armhf) in bits 16-29, type 100 in bits 8-15,
    number 0. 0xC0086400 on a 64-bit kernel, 0xC0046400 on a 32-bit one."""
    return (3 << 30) | (pointer_size << 16) | (100 << 8) | 0


def encode_property(tag: int, value: int) -> bytearray:
    """One property-tag request with a single u32 value, seven little-endian u32 words:

    ====  =====================  =========================================================
    0     buffer size            28
    4     buffer code            0: a request
    8     tag                    0x00038064 set / 0x00030064 get the reboot (tryboot) flags
    12    value buffer size      4
    16    tag code               0 in a request; the firmware sets bit 31 and the length
    20    value                  1 arms the one-shot tryboot, 0 clears it (ignored by get)
    24    end tag                0
    ====  =====================  =========================================================
    """
    return bytearray(_PROPERTY.pack(_PROPERTY.size, MBOX_REQUEST, tag, 4, 0, value, 0))


def decode_property(buffer: bytes | bytearray, tag: int) -> int:
    """The u32 value of the firmware's answer to :func:`encode_property`, checked."""
    _size, code, answered, _room, tag_code, value, _end = _PROPERTY.unpack(buffer)
    if code != MBOX_SUCCESS:
        raise _error(f"firmware mailbox: request not processed (code {code:#010x})")
    if answered != tag or not tag_code & MBOX_SUCCESS or (tag_code & ~MBOX_SUCCESS) < 4:
        raise _error(f"firmware mailbox: no answer to tag {tag:#010x} (tag code {tag_code:#x})")
    return int(value)


def _vcio_ioctl(fd: int, buffer: bytearray) -> None:
    """The one call that needs a Pi; a seam for tests."""
    fcntl.ioctl(fd, mbox_property_ioctl(), buffer, True)


def mailbox_property(vcio: Path, tag: int, value: int) -> int:
    """Send one property tag through ``/dev/vcio`` and return the firmware's value."""
    buffer = encode_property(tag, value)
    try:
        fd = os.open(vcio, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _vcio_ioctl(fd, buffer)
        finally:
            os.close(fd)
    except OSError as err:
        raise _error(f"firmware mailbox {vcio}: {err}") from err
    return decode_property(buffer, tag)


# --------------------------------------------------------------------------- the backend


class Tryboot:
    """The :class:`~updater.bootloader.Bootloader` verbs over autoboot.txt and the firmware."""

    name = NAME

    def __init__(
        self,
        *,
        autoboot: Path,
        partitions: Mapping[str, int] = DEFAULT_PARTITIONS,
        device_tree: Path = DEVICE_TREE,
        vcio: Path = VCIO,
    ) -> None:
        self._autoboot = autoboot
        self._partitions = _checked_partitions(partitions)
        self._device_tree = device_tree
        self._vcio = vcio
        self._flag_set = False  # this process set the one-shot flag through the mailbox

    def check(self) -> None:
        """Refuse an EEPROM without tryboot A/B; a Pi 5 has no ``capabilities``: accepted."""
        capabilities = read_u32(self._device_tree / "capabilities")
        needed = CAP_TRYBOOT_A_B | CAP_TRYBOOT
        if capabilities is not None and capabilities & needed != needed:
            raise _error(OLD_EEPROM)
        self._read()

    def booted_slot(self) -> str | None:
        """From the firmware's ``partition``; None without one, or for a partition that holds
        no slot (the firmware fell back to something else)."""
        partition = read_u32(self._device_tree / "partition")
        return None if partition is None else self._slot_of(partition)

    def is_trial(self) -> bool:
        """The firmware's ``tryboot`` cell: 1 only on the boot that consumed the one-shot flag."""
        return read_u32(self._device_tree / "tryboot") == 1

    def primary_slot(self) -> str:
        """From ``[all] boot_partition``, read the way the firmware reads it."""
        primary = self._read().primary
        return next(slot for slot, number in self._partitions.items() if number == primary)

    def arm(self, slot: str) -> None:
        """Point ``[tryboot]`` at ``slot`` (no write when the canonical file does already; any
        other layout is made canonical, power-safely), then set the one-shot flag through the
        mailbox; without one, the reboot argument sets it."""
        self._flag_set = False
        partition = self._partition(slot)
        primary = self._read().primary
        if primary == partition:
            raise _error(f"refusing to arm slot {slot}: it is the primary slot already")
        self._rewrite(primary, partition)  # state first, then the side effect
        if self._vcio.exists():
            self._set_flag(1)
            self._flag_set = True

    def reboot_argument(self, armed: bool) -> str | None:
        """``"0 tryboot"`` when the trial is armed but the flag is not set yet (no mailbox, or
        another process armed it): the kernel sets the flag on reboot. The partition stays 0:
        the slot is chosen by autoboot.txt alone."""
        if armed and not self._flag_set:
            return REBOOT_ARGUMENT
        return None

    def reboot_command(self, armed: bool) -> list[str] | None:
        """The whole command: ``["systemctl", "reboot", "0 tryboot"]``, or None (plain reboot)."""
        argument = self.reboot_argument(armed)
        return None if argument is None else ["systemctl", "reboot", argument]

    def commit(self, slot: str) -> None:
        """Rewrite autoboot.txt to the canonical layout with ``slot`` primary and the other slot
        in ``[tryboot]`` (see :func:`plan_rewrite`); no write when it is that already."""
        self._rewrite(self._partition(slot), self._partition(_other(slot)))

    def mark_bad(self, slot: str) -> None:
        """The other slot primary (a commit, no write when it is already) and the flag cleared."""
        self.commit(_other(slot))
        if self._vcio.exists():
            self._set_flag(0)
        self._flag_set = False

    # ---------------------------------------------------------------- internals

    def _partition(self, slot: str) -> int:
        if slot not in self._partitions:
            raise _error(f"unknown slot {slot!r} (slots: {', '.join(SLOTS)})")
        return self._partitions[slot]

    def _slot_of(self, partition: int) -> str | None:
        for slot, number in self._partitions.items():
            if number == partition:
                return slot
        return None

    def _read_bytes(self) -> bytes:
        try:
            with self._autoboot.open("rb") as f:
                return f.read(MAX_AUTOBOOT_SIZE + 1)
        except OSError as err:
            raise _error(f"cannot read {self._autoboot}: {err}") from err

    def _read(self) -> Autoboot:
        return parse_autoboot(self._read_bytes(), self._partitions.values())

    def _rewrite(self, primary: int, trial: int) -> None:
        current = self._read_bytes()
        _write_states(
            self._autoboot, plan_rewrite(current, primary, trial, self._partitions.values())
        )

    def _set_flag(self, value: int) -> None:
        mailbox_property(self._vcio, TAG_SET_REBOOT_FLAGS, value)
        found = mailbox_property(self._vcio, TAG_GET_REBOOT_FLAGS, 0)
        if found != value:
            raise _error(f"firmware mailbox: tryboot flag reads {found} after setting {value}")


def _other(slot: str) -> str:
    if slot not in SLOTS:
        raise _error(f"unknown slot {slot!r} (slots: {', '.join(SLOTS)})")
    return SLOTS[1 - SLOTS.index(slot)]


def _checked_partitions(partitions: Mapping[str, int]) -> dict[str, int]:
    checked = dict(partitions)
    if sorted(checked) != sorted(SLOTS):
        raise _error(f"partitions must name slots {' and '.join(SLOTS)}, got {sorted(checked)}")
    for slot, number in checked.items():
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= 999:
            raise _error(f"slot {slot}: boot partition {number!r} is not a partition number")
    if len(set(checked.values())) != len(checked):
        raise _error("slots A and B need different boot partitions")
    return checked
