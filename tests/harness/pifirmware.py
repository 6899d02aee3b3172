"""A stand-in for the Raspberry Pi firmware's documented boot decision (docs/raspberry-pi-ab.md, 1).

What it models: the bootloader reads ``autoboot.txt``; with the one-shot tryboot flag set it boots
the ``[tryboot]`` section's ``boot_partition`` (``[all]``'s when ``[tryboot]`` has none), else
``[all]``'s; the flag is consumed by that boot, so any later reset boots ``[all]`` again. It then
tells the OS what it did under ``/chosen/bootloader`` (4-byte big-endian ``partition``,
``tryboot``, ``capabilities``, ``boot-mode``), written here into a stand-in directory.

It reads autoboot.txt with its own parser, on purpose independent of the updater's: a test that
checked the updater's writes with the updater's own reading would prove nothing. It is also
stricter than the firmware: anything short of a clean A/B file (an unknown key, a line it cannot
parse, a partition that holds no slot, no ``tryboot_a_b=1``) raises :class:`FirmwareFallback`,
the firmware's "fall back to the first bootable partition", which a test asserts never happens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

AUTOBOOT_LIMIT = 512
CAPABILITIES_PI4 = 0xC  # bit 2 TRYBOOT_A_B, bit 3 TRYBOOT: a 2022-11+ Pi 4 EEPROM

_HEADER = re.compile(r"\[\s*([A-Za-z0-9_]+)\s*\]")
_SETTING = re.compile(r"([A-Za-z0-9_]+)[ \t]*=[ \t]*([0-9]+)")


class FirmwareFallback(Exception):
    """The firmware would not have booted a slot: a damaged, missing or non-A/B autoboot.txt."""


@dataclass(frozen=True, slots=True)
class AutobootReading:
    """The two decisions autoboot.txt encodes."""

    normal: int  # [all] boot_partition: every boot without the flag
    trial: int  # [tryboot] boot_partition (or ``normal``): the one boot with the flag


@dataclass
class PiFirmware:
    """``boot(tryboot_flag)`` returns the partition booted and writes the device-tree files."""

    autoboot: Path
    device_tree: Path
    partitions: Mapping[str, int] | Iterable[int] = (2, 3)  # slot -> partition, or the numbers
    capabilities: int | None = CAPABILITIES_PI4  # None: a Pi 5, which has no such property
    boots: list[tuple[int, bool]] = field(default_factory=list)  # (partition, tryboot) per boot

    def read(self) -> AutobootReading:
        """What the firmware makes of autoboot.txt now; FirmwareFallback if it is not a slot."""
        try:
            data = self.autoboot.read_bytes()
        except FileNotFoundError:
            raise FirmwareFallback(f"{self.autoboot} is missing") from None
        if len(data) > AUTOBOOT_LIMIT:
            raise FirmwareFallback(f"autoboot.txt is {len(data)} bytes, over {AUTOBOOT_LIMIT}")
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise FirmwareFallback("autoboot.txt holds non-ASCII bytes") from None
        settings = _settings(text)
        if settings.get(("all", "tryboot_a_b")) != 1:
            raise FirmwareFallback("no tryboot_a_b=1 in [all]: not an A/B autoboot.txt")
        normal = settings.get(("all", "boot_partition"))
        trial = settings.get(("tryboot", "boot_partition"), normal)
        bootable = set(
            self.partitions.values() if isinstance(self.partitions, Mapping) else self.partitions
        )
        if normal not in bootable or trial not in bootable:
            raise FirmwareFallback(f"boot_partition {normal}/{trial} holds no slot ({bootable})")
        assert normal is not None and trial is not None
        return AutobootReading(normal, trial)

    def boot(self, tryboot_flag: bool) -> int:
        """One boot: the partition chosen, with the device tree written as the firmware does."""
        reading = self.read()
        partition = reading.trial if tryboot_flag else reading.normal
        self._write_device_tree(partition, tryboot_flag)
        self.boots.append((partition, tryboot_flag))
        return partition

    def reboot(self, argument: str | None) -> int:
        """A reboot through the kernel: ``" tryboot"`` in the argument sets the one-shot flag.

        The argument's first word is the partition to reboot into: the updater must leave it 0,
        so that autoboot.txt alone decides (docs/raspberry-pi-ab.md, 1).
        """
        if argument is not None and argument.split()[:1] != ["0"]:
            raise AssertionError(f"reboot argument {argument!r} chooses a partition")
        return self.boot(tryboot_flag=argument is not None and " tryboot" in argument)

    def _write_device_tree(self, partition: int, tryboot: bool) -> None:
        self.device_tree.mkdir(parents=True, exist_ok=True)
        cells = {"partition": partition, "tryboot": int(tryboot), "boot-mode": 1}
        if self.capabilities is not None:
            cells["capabilities"] = self.capabilities
        else:
            (self.device_tree / "capabilities").unlink(missing_ok=True)
        for name, value in cells.items():
            (self.device_tree / name).write_bytes(value.to_bytes(4, "big"))


def _settings(text: str) -> dict[tuple[str, str], int]:
    """(section, key) -> value, the last one winning; strict: FirmwareFallback on anything odd."""
    section = "all"
    settings: dict[tuple[str, str], int] = {}
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip(" \t\r")
        if not line or line.startswith("#"):
            continue
        header = _HEADER.fullmatch(line)
        if header:
            section = header.group(1).lower()
            if section not in ("all", "tryboot"):
                raise FirmwareFallback(f"line {number}: filter [{section}] is not modelled")
            continue
        setting = _SETTING.fullmatch(line)
        if not setting or setting.group(1) not in ("boot_partition", "tryboot_a_b"):
            raise FirmwareFallback(f"line {number}: cannot read {raw!r}")
        settings[section, setting.group(1)] = int(setting.group(2))
    return settings
