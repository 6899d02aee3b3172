"""The tryboot backend against a stand-in firmware (tests/harness/pifirmware.py).

What runs for real: the backend's reads and in-place writes of an autoboot.txt file, its device-tree
reads, its plan checks. What is a stand-in: the firmware (an independent reading of autoboot.txt
and the device-tree files it writes), and, in the mailbox tests, the one ioctl on /dev/vcio, which
needs a Pi: a fake firmware answers the exact buffers the backend builds.

Power cuts are simulated two ways: by writing each torn state (``new[:k] + old[k:]`` for every k of
every write a rewrite makes) ourselves, and by a ``pwrite`` that stops after k bytes.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.pifirmware import FirmwareFallback, PiFirmware
from updater.bootloader import BootloaderError
from updater.bootloader import tryboot as tryboot_module
from updater.bootloader.tryboot import (
    OLD_EEPROM,
    TAG_GET_REBOOT_FLAGS,
    TAG_SET_REBOOT_FLAGS,
    Tryboot,
    autoboot_layout,
    canonical_autoboot,
    decode_property,
    encode_property,
    mbox_property_ioctl,
)

# A primary, B the trial; and B primary.
CANONICAL_A = b"[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"
CANONICAL_B = b"[all]\ntryboot_a_b=1\nboot_partition=3\n[tryboot]\nboot_partition=2\n"

# Layouts a person or another tool may have left, all with A primary and B as the trial.
NON_CANONICAL = {
    "crlf": CANONICAL_A.replace(b"\n", b"\r\n"),
    "no final newline": CANONICAL_A[:-1],
    "comments and whitespace": (
        b"# A/B boot, see the docs\n  [all]  \n tryboot_a_b = 1\t\n\n"
        b"boot_partition= 2 \n# the trial\n[tryboot]\nboot_partition=3\n"
    ),
    "no [all] header, same length": (
        b"tryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n# abcd\n"
    ),
    "sections swapped, repeated setting": (
        b"[tryboot]\nboot_partition=3\n[all]\nboot_partition=3\nboot_partition=2\ntryboot_a_b=1\n"
    ),
    "long comment in front, crlf": b"#" * 150 + b"\r\n" + CANONICAL_A.replace(b"\n", b"\r\n"),
    "long comment behind": CANONICAL_A + b"# " + b"x" * 150 + b"\n",
    "hand-padded": CANONICAL_A + b"# written by hand\n",
}


@dataclass
class Rig:
    autoboot: Path
    device_tree: Path
    vcio: Path
    firmware: PiFirmware

    def backend(self, **partitions: int) -> Tryboot:
        """A fresh backend, as a new updater process after a reboot would build it."""
        return Tryboot(
            autoboot=self.autoboot,
            partitions=partitions or {"A": 2, "B": 3},
            device_tree=self.device_tree,
            vcio=self.vcio,
        )

    def write_cell(self, name: str, value: int) -> None:
        (self.device_tree / name).write_bytes(value.to_bytes(4, "big"))


@pytest.fixture
def files(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: the power-cut tests rerun a rewrite from hundreds
    of torn states, each step fsynced, and they check content, not the disk's durability."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="test-tryboot-") as directory:
        yield Path(directory)


@pytest.fixture
def rig(files: Path) -> Rig:
    """autoboot.txt with A primary, booted once by the stand-in firmware; no /dev/vcio."""
    autoboot = files / "p1" / "autoboot.txt"
    autoboot.parent.mkdir()
    autoboot.write_bytes(CANONICAL_A)
    firmware = PiFirmware(autoboot, files / "chosen" / "bootloader", {"A": 2, "B": 3})
    firmware.boot(tryboot_flag=False)
    return Rig(autoboot, firmware.device_tree, files / "vcio", firmware)


# --------------------------------------------------------------------------- readings


def test_readings_come_from_autoboot_and_device_tree(rig: Rig) -> None:
    backend = rig.backend()
    assert (backend.primary_slot(), backend.booted_slot(), backend.is_trial()) == ("A", "A", False)
    rig.write_cell("partition", 3)
    rig.write_cell("tryboot", 1)
    assert (backend.primary_slot(), backend.booted_slot(), backend.is_trial()) == ("A", "B", True)


def test_booted_slot_unknown_without_a_slot_partition(rig: Rig) -> None:
    backend = rig.backend()
    rig.write_cell("partition", 1)  # the firmware fell back to something that is no slot
    assert backend.booted_slot() is None
    (rig.device_tree / "partition").unlink()
    (rig.device_tree / "tryboot").unlink()
    assert backend.booted_slot() is None
    assert backend.is_trial() is False


def test_malformed_device_tree_cell_is_refused(rig: Rig) -> None:
    (rig.device_tree / "partition").write_bytes(b"\x00\x02")
    with pytest.raises(BootloaderError, match=r"^tryboot: .*expected a 4-byte big-endian value"):
        rig.backend().booted_slot()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"[all]\nboot_partition=2\n[tryboot]\nboot_partition=3\n", "lacks tryboot_a_b=1"),
        (CANONICAL_A.replace(b"a_b=1", b"a_b=0"), "lacks tryboot_a_b=1"),
        (CANONICAL_A.replace(b"partition=2", b"partition=5"), r"boot_partition=5 is not a slot"),
        (CANONICAL_A.replace(b"partition=3", b"partition=1"), r"boot_partition=1 is not a slot"),
        (CANONICAL_A.replace(b"partition=2", b"partition=2 # A"), "not a plain number"),
        (CANONICAL_A.replace(b"partition=2", b"partition=0x2"), "not a plain number"),
        (CANONICAL_A.replace(b"[tryboot]", b"[tryboot"), "malformed section"),
        (CANONICAL_A.replace(b"boot_partition=2", b"BOOT_PARTITION=2"), "lower case"),
        (CANONICAL_A + b"[pi4]\nboot_partition=3\n", r"under \[pi4\]"),
        (CANONICAL_A + b"[tryboot]\ntryboot_a_b=1\n", "belongs in"),
        (b"[all]\ntryboot_a_b=1\n", "no boot_partition"),
        (CANONICAL_A + b"#" * 500, "only 512"),
    ],
)
def test_malformed_autoboot_is_refused(rig: Rig, content: bytes, message: str) -> None:
    rig.autoboot.write_bytes(content)
    backend = rig.backend()
    with pytest.raises(BootloaderError, match=r"^tryboot: .*" + message):
        backend.check()
    with pytest.raises(BootloaderError, match=message):
        backend.commit("B")
    assert rig.autoboot.read_bytes() == content  # nothing written


def test_tolerated_like_the_firmware(rig: Rig) -> None:
    rig.autoboot.write_bytes(
        b"\r\n# comment\r\n[ALL]\r\nfoo=bar\r\n  tryboot_a_b =1\r\nboot_partition=3\r\n"
        b"boot_partition = 2\r\n[pi4]\r\ngpu_mem=16\r\n[tryboot]\r\nboot_partition=3"
    )
    backend = rig.backend()
    backend.check()
    assert backend.primary_slot() == "A"


def test_missing_autoboot_is_refused(rig: Rig) -> None:
    rig.autoboot.unlink()
    with pytest.raises(BootloaderError, match=r"^tryboot: cannot read .*autoboot.txt"):
        rig.backend().check()


# --------------------------------------------------------------------------- check()


@pytest.mark.parametrize("capabilities", [0xC, 0xF, None])
def test_check_accepts_tryboot_capable_eeprom(rig: Rig, capabilities: int | None) -> None:
    rig.firmware.capabilities = capabilities  # None: a Pi 5, which has no capabilities
    rig.firmware.boot(tryboot_flag=False)
    rig.backend().check()


@pytest.mark.parametrize("capabilities", [0x4, 0x8, 0x0])
def test_check_refuses_an_old_eeprom(rig: Rig, capabilities: int) -> None:
    rig.firmware.capabilities = capabilities
    rig.firmware.boot(tryboot_flag=False)
    with pytest.raises(BootloaderError) as caught:
        rig.backend().check()
    assert str(caught.value) == f"tryboot: {OLD_EEPROM}"
    assert "rpi-eeprom-update" in str(caught.value)


# --------------------------------------------------------------------------- arm, commit, mark_bad


def test_arm_refuses_the_primary(rig: Rig) -> None:
    with pytest.raises(BootloaderError, match="refusing to arm slot A: it is the primary"):
        rig.backend().arm("A")
    with pytest.raises(BootloaderError, match="unknown slot 'C'"):
        rig.backend().arm("C")


def test_arm_without_mailbox_needs_the_tryboot_reboot(rig: Rig, no_writes: None) -> None:
    backend = rig.backend()
    assert backend.reboot_command(armed=True) == ["systemctl", "reboot", "0 tryboot"]
    backend.arm("B")  # [tryboot] is right already: nothing written (no_writes)
    assert backend.reboot_command(armed=True) == ["systemctl", "reboot", "0 tryboot"]
    assert backend.reboot_argument(armed=True) == "0 tryboot"
    assert backend.reboot_command(armed=False) is None
    assert backend.reboot_argument(armed=False) is None


@pytest.mark.parametrize(
    "content",
    [
        CANONICAL_A.replace(b"partition=3", b"partition=2"),  # [tryboot] names the primary
        b"[all]\ntryboot_a_b=1\nboot_partition=2\n",  # no [tryboot] at all
    ],
)
def test_arm_points_tryboot_at_the_slot(rig: Rig, content: bytes) -> None:
    rig.autoboot.write_bytes(content)
    rig.backend().arm("B")
    assert rig.firmware.read().trial == 3
    assert rig.autoboot.read_bytes() == autoboot_layout(2, 3, len(rig.autoboot.read_bytes()))
    assert rig.firmware.reboot("0 tryboot") == 3


def test_commit_rewrites_in_place_and_is_idempotent(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    inode = rig.autoboot.stat().st_ino
    backend = rig.backend()
    backend.commit("B")
    assert rig.autoboot.read_bytes() == CANONICAL_B
    assert rig.autoboot.stat().st_ino == inode  # no rename: the same file, same length
    assert backend.primary_slot() == "B"
    _forbid_writes(monkeypatch)
    backend.commit("B")
    rig.backend().commit("B")
    assert rig.autoboot.read_bytes() == CANONICAL_B


def test_mark_bad_after_a_failed_trial_leaves_the_primary(rig: Rig, no_writes: None) -> None:
    backend = rig.backend()
    backend.arm("B")
    backend.mark_bad("B")
    assert rig.autoboot.read_bytes() == CANONICAL_A
    assert backend.primary_slot() == "A"


def test_mark_bad_of_the_primary_commits_the_other(rig: Rig) -> None:
    rig.autoboot.write_bytes(CANONICAL_B)
    backend = rig.backend()
    backend.mark_bad("B")
    assert rig.autoboot.read_bytes() == CANONICAL_A
    assert rig.firmware.reboot(None) == 2


def test_partitions_are_checked() -> None:
    for partitions, message in [
        ({"A": 2}, "must name slots A and B"),
        ({"A": 2, "B": 2}, "different boot partitions"),
        ({"A": 2, "B": 0}, "not a partition number"),
        ({"A": 2, "B": True}, "not a partition number"),
    ]:
        with pytest.raises(BootloaderError, match=message):
            Tryboot(autoboot=Path("/nonexistent"), partitions=partitions)


# --------------------------------------------------------------------------- the boot cycle


def test_cycle_trial_then_commit(rig: Rig) -> None:
    backend = rig.backend()
    backend.arm("B")
    assert rig.firmware.reboot(backend.reboot_argument(armed=True)) == 3
    after_reboot = rig.backend()
    assert (after_reboot.booted_slot(), after_reboot.is_trial()) == ("B", True)
    assert after_reboot.primary_slot() == "A"  # not committed yet
    after_reboot.commit("B")
    assert rig.firmware.reboot(None) == 3  # a plain reboot stays on B now
    assert (after_reboot.booted_slot(), after_reboot.is_trial()) == ("B", False)
    assert rig.firmware.boots == [(2, False), (3, True), (3, False)]


def test_cycle_trial_without_commit_rolls_back_on_any_reset(rig: Rig) -> None:
    backend = rig.backend()
    backend.arm("B")
    assert rig.firmware.reboot(backend.reboot_argument(armed=True)) == 3
    assert rig.firmware.boot(tryboot_flag=False) == 2  # watchdog, panic, power cut: flag gone
    after_reset = rig.backend()
    assert (after_reset.booted_slot(), after_reset.is_trial()) == ("A", False)
    after_reset.mark_bad("B")
    assert rig.firmware.reboot(None) == 2


def test_cycle_back_and_forth(rig: Rig) -> None:
    for slot, partition in [("B", 3), ("A", 2), ("B", 3)]:
        backend = rig.backend()
        backend.arm(slot)
        assert rig.firmware.reboot(backend.reboot_argument(armed=True)) == partition
        rig.backend().commit(slot)
        assert rig.firmware.reboot(None) == partition
    assert rig.autoboot.read_bytes() == CANONICAL_B


# --------------------------------------------------------------------------- power cuts


class PowerCut(Exception):
    """The power went at a chosen byte."""


@pytest.fixture
def no_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_writes(monkeypatch)


def _forbid_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, data: bytes, offset: int) -> int:
        raise AssertionError("autoboot.txt was written")

    monkeypatch.setattr(tryboot_module, "_pwrite", refuse)


def _recorded_writes(
    monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]
) -> list[tuple[int, bytes]]:
    writes: list[tuple[int, bytes]] = []

    def record(fd: int, data: bytes, offset: int) -> int:
        writes.append((offset, bytes(data)))
        return os.pwrite(fd, data, offset)

    with monkeypatch.context() as patch:
        patch.setattr(tryboot_module, "_pwrite", record)
        action()
    return writes


def _torn(before: bytes, offset: int, data: bytes) -> Iterator[bytes]:
    """What the file holds after the first k bytes of ``data`` landed at ``offset``, every k."""
    for k in range(len(data) + 1):
        after = bytearray(before)
        after[offset : offset + k] = data[:k]
        yield bytes(after)


def _every_torn_state(start: bytes, writes: list[tuple[int, bytes]]) -> list[bytes]:
    seen: dict[bytes, None] = {}  # in order, without repeats
    content = start
    for offset, data in writes:
        for torn in _torn(content, offset, data):
            seen.setdefault(torn)
            content = torn
    return list(seen)


def _assert_power_safe(
    rig: Rig,
    monkeypatch: pytest.MonkeyPatch,
    start: bytes,
    action: Callable[[Tryboot], None],
    primaries: set[int],
    partitions: dict[str, int] | None = None,
) -> int:
    """Cut the power at every byte of every write ``action`` makes; each torn file must boot a
    slot from ``primaries`` (the old or the new) with tryboot_a_b=1 intact (else the stand-in
    raises FirmwareFallback), and ``action`` run again on it must end in exactly the content of
    the uninterrupted run. Returns the number of distinct torn states tried."""
    parts = partitions or {"A": 2, "B": 3}
    rig.autoboot.write_bytes(start)
    writes = _recorded_writes(monkeypatch, lambda: action(rig.backend(**parts)))
    final = rig.autoboot.read_bytes()
    assert writes, "the action wrote nothing"
    assert all(offset == 0 for offset, _ in writes)  # whole states at offset 0, in place
    states = _every_torn_state(start, writes)
    for torn in states:
        rig.autoboot.write_bytes(torn)
        reading = rig.firmware.read()  # FirmwareFallback here would fail the test
        assert reading.normal in primaries, torn
        assert rig.firmware.boot(tryboot_flag=True) in set(parts.values())
        action(rig.backend(**parts))
        assert rig.autoboot.read_bytes() == final, torn
    return len(states)


def test_commit_power_cut_at_every_byte_canonical(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual commit: one 64-byte write; every prefix of it over the old file is checked."""
    for k in range(len(CANONICAL_B) + 1):
        torn = CANONICAL_B[:k] + CANONICAL_A[k:]
        rig.autoboot.write_bytes(torn)
        assert rig.firmware.read().normal in (2, 3)
        assert rig.firmware.boot(tryboot_flag=False) in (2, 3)
        rig.backend().commit("B")
        assert rig.autoboot.read_bytes() == CANONICAL_B
    tried = _assert_power_safe(rig, monkeypatch, CANONICAL_A, lambda b: b.commit("B"), {2, 3})
    assert tried == 3  # old, [all] switched, new: only the two digits differ


@pytest.mark.parametrize("name", NON_CANONICAL)
def test_commit_power_cut_at_every_byte_non_canonical(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    start = NON_CANONICAL[name]
    rig.autoboot.write_bytes(start)
    assert rig.firmware.read().normal == 2  # the layouts are valid to begin with
    tried = _assert_power_safe(rig, monkeypatch, start, lambda b: b.commit("B"), {2, 3})
    assert tried > 100  # a migration: many small steps, each cut at every byte
    final = rig.autoboot.read_bytes()
    assert final == autoboot_layout(3, 2, max(len(start), 128))
    assert final.startswith(CANONICAL_B)
    assert rig.firmware.reboot(None) == 3


@pytest.mark.parametrize("name", ["crlf", "comments and whitespace"])
def test_commit_of_the_primary_canonicalises_power_safely(
    rig: Rig, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    start = NON_CANONICAL[name]
    _assert_power_safe(rig, monkeypatch, start, lambda b: b.commit("A"), {2})
    assert rig.autoboot.read_bytes().startswith(CANONICAL_A)


def test_arm_fix_and_mark_bad_power_cut_at_every_byte(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_trial = b"[all]\r\ntryboot_a_b=1\r\nboot_partition=2\r\n"
    _assert_power_safe(rig, monkeypatch, no_trial, lambda b: b.arm("B"), {2})
    assert rig.firmware.read().trial == 3
    committed_b = CANONICAL_B.replace(b"\n", b"\r\n")
    _assert_power_safe(rig, monkeypatch, committed_b, lambda b: b.mark_bad("B"), {2, 3})
    assert rig.firmware.reboot(None) == 2


def test_partition_numbers_of_different_widths(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 <-> 10 cannot be a digit swap (a cut could leave boot_partition=1): it migrates."""
    rig.firmware.partitions = (2, 10)
    parts = {"A": 2, "B": 10}
    start = canonical_autoboot(2, 10)
    _assert_power_safe(rig, monkeypatch, start, lambda b: b.commit("B"), {2, 10}, parts)
    after = rig.autoboot.read_bytes()
    assert after == autoboot_layout(10, 2, 128)
    _assert_power_safe(rig, monkeypatch, after, lambda b: b.commit("A"), {2, 10}, parts)


def test_a_real_cut_leaves_the_modelled_state(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, through the code path: the pwrite stops after k bytes and the power goes."""
    start = NON_CANONICAL["comments and whitespace"]
    rig.autoboot.write_bytes(start)
    writes = _recorded_writes(monkeypatch, lambda: rig.backend().commit("B"))
    final = rig.autoboot.read_bytes()
    total = sum(len(data) for _, data in writes)
    for cut in range(0, total + 1, 7):
        rig.autoboot.write_bytes(start)
        budget = [cut]

        def cut_after(fd: int, data: bytes, offset: int, budget: list[int] = budget) -> int:
            n = min(len(data), budget[0])
            os.pwrite(fd, data[:n], offset)
            budget[0] -= n
            if n < len(data):
                raise PowerCut
            return n

        with monkeypatch.context() as patch:
            patch.setattr(tryboot_module, "_pwrite", cut_after)
            if cut < total:
                with pytest.raises(PowerCut):
                    rig.backend().commit("B")
            else:
                rig.backend().commit("B")
        torn = rig.autoboot.read_bytes()
        assert torn == _state_after(start, writes, cut)
        assert rig.firmware.read().normal in (2, 3)
        rig.backend().commit("B")
        assert rig.autoboot.read_bytes() == final


def _state_after(start: bytes, writes: list[tuple[int, bytes]], landed: int) -> bytes:
    content = bytearray(start)
    for offset, data in writes:
        n = min(len(data), landed)
        content[offset : offset + n] = data[:n]
        landed -= n
    return bytes(content)


def test_a_layout_without_room_is_refused_before_any_write(rig: Rig, no_writes: None) -> None:
    """tryboot_a_b=1 sits in the front; the only room behind is taken by a padded line."""
    start = (
        b"tryboot_a_b=1\n" + b"#" * 50 + b"\n" + b"boot_partition=" + b" " * 44 + b"2\n" + b"#\n"
    )
    assert len(start) == 128
    rig.autoboot.write_bytes(start)
    assert rig.firmware.read().normal == 2
    with pytest.raises(BootloaderError, match="cannot be rewritten power-safely"):
        rig.backend().commit("B")
    assert rig.autoboot.read_bytes() == start


def test_firmware_stand_in_catches_damage(rig: Rig) -> None:
    """The harness must fail loudly on what a cut could do wrong, or the tests above prove
    little."""
    for damaged in [
        CANONICAL_A.replace(b"boot_partition=2", b"boot_partition="),
        CANONICAL_A.replace(b"boot_partition=2", b"boot_partition=1"),
        CANONICAL_A.replace(b"tryboot_a_b=1", b"tryboot_a_b=#"),
        CANONICAL_A.replace(b"\nboot_partition=2", b"\nboot_parti###"),
        CANONICAL_A[:20],
    ]:
        rig.autoboot.write_bytes(damaged)
        with pytest.raises(FirmwareFallback):
            rig.firmware.boot(tryboot_flag=False)
    with pytest.raises(AssertionError, match="chooses a partition"):
        rig.firmware.reboot("3 tryboot")


# --------------------------------------------------------------------------- the firmware mailbox


def test_mailbox_ioctl_number() -> None:
    assert mbox_property_ioctl(8) == 0xC0086400  # arm64: sizeof(char *) == 8
    assert mbox_property_ioctl(4) == 0xC0046400  # armhf
    assert mbox_property_ioctl() == mbox_property_ioctl(struct.calcsize("P"))


def test_mailbox_buffer_encoding() -> None:
    words = "1c000000 00000000 64800300 04000000 00000000 01000000 00000000"
    assert encode_property(TAG_SET_REBOOT_FLAGS, 1) == bytes.fromhex(words)
    words = "1c000000 00000000 64000300 04000000 00000000 00000000 00000000"
    assert encode_property(TAG_GET_REBOOT_FLAGS, 0) == bytes.fromhex(words)


def test_mailbox_buffer_decoding() -> None:
    answer = struct.pack("<7I", 28, 0x80000000, TAG_GET_REBOOT_FLAGS, 4, 0x80000004, 1, 0)
    assert decode_property(answer, TAG_GET_REBOOT_FLAGS) == 1
    failed = struct.pack("<7I", 28, 0x80000001, TAG_GET_REBOOT_FLAGS, 4, 0, 0, 0)
    with pytest.raises(BootloaderError, match="request not processed"):
        decode_property(failed, TAG_GET_REBOOT_FLAGS)
    unanswered = struct.pack("<7I", 28, 0x80000000, TAG_GET_REBOOT_FLAGS, 4, 0, 0, 0)
    with pytest.raises(BootloaderError, match="no answer to tag 0x00030064"):
        decode_property(unanswered, TAG_GET_REBOOT_FLAGS)


class FakeVcio:
    """The firmware's side of the property mailbox, for the reboot-flags tags only."""

    def __init__(self) -> None:
        self.flags = 0
        self.ignore_set = False

    def ioctl(self, fd: int, buffer: bytearray) -> None:
        size, code, tag, room, tag_code, value, end = struct.unpack("<7I", buffer)
        assert (size, code, room, tag_code, end) == (28, 0, 4, 0, 0)
        if tag == TAG_SET_REBOOT_FLAGS and not self.ignore_set:
            self.flags = value
        answer = self.flags if tag == TAG_GET_REBOOT_FLAGS else value
        buffer[:] = struct.pack("<7I", 28, 0x80000000, tag, 4, 0x80000004, answer, 0)


@pytest.fixture
def vcio(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> FakeVcio:
    rig.vcio.write_bytes(b"")  # the device node exists
    fake = FakeVcio()
    monkeypatch.setattr(tryboot_module, "_vcio_ioctl", fake.ioctl)
    return fake


def test_arm_sets_the_flag_through_the_mailbox(rig: Rig, vcio: FakeVcio) -> None:
    backend = rig.backend()
    backend.arm("B")
    assert vcio.flags == 1
    assert backend.reboot_command(armed=True) is None  # a plain reboot: the flag is set
    assert rig.firmware.boot(tryboot_flag=vcio.flags == 1) == 3
    assert rig.backend().reboot_command(armed=True) == ["systemctl", "reboot", "0 tryboot"]


def test_mark_bad_clears_the_flag(rig: Rig, vcio: FakeVcio) -> None:
    backend = rig.backend()
    backend.arm("B")
    backend.mark_bad("B")
    assert vcio.flags == 0
    assert backend.primary_slot() == "A"


def test_a_flag_that_does_not_read_back_is_an_error(rig: Rig, vcio: FakeVcio) -> None:
    vcio.ignore_set = True
    with pytest.raises(BootloaderError, match="tryboot flag reads 0 after setting 1"):
        rig.backend().arm("B")
