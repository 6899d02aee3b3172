"""Bootloader backends behind a few verbs (RAUC's ``r_boot_*``, SWUpdate's ``env_get/env_set``).

A backend knows how to: tell which slot booted and whether this boot is a trial; tell which slot
is primary (boots by default); arm the other slot for exactly one trial boot; commit a slot
(make it primary, end the trial); mark a slot bad (make sure it does not boot again). Errors are
:class:`BootloaderError` with the backend's name as prefix, so an operator knows which layer
failed. Backends are built from a plain dict at start-up (:data:`BACKENDS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from updater.errors import WriteError

if TYPE_CHECKING:
    from updater.config import BootloaderConfig as BootloaderSettings

SLOTS = ("A", "B")


class BootloaderError(WriteError):
    """The bootloader could not be read or changed; the message starts with the backend name."""

    def __init__(self, backend: str, message: str) -> None:
        super().__init__(f"{backend}: {message}", target=f"bootloader {backend}")
        self.backend = backend


class Bootloader(Protocol):
    """The verbs every backend offers. Slots are named "A" and "B"."""

    name: str

    def check(self) -> None:
        """Refuse, clearly, a bootloader that cannot do A/B trial boots (e.g. an old EEPROM)."""

    def booted_slot(self) -> str | None:
        """The slot the bootloader says it booted this time, or None when it cannot tell."""

    def is_trial(self) -> bool:
        """Whether this boot is the one trial boot of an armed slot."""

    def primary_slot(self) -> str:
        """The slot that boots by default (after any reset that is not a trial)."""

    def arm(self, slot: str) -> None:
        """Make the next boot, and only the next, try ``slot`` (never the primary)."""

    def reboot_argument(self, armed: bool) -> str | None:
        """The reboot argument that arms the trial when arming needs one (tryboot without the
        firmware mailbox: ``"0 tryboot"``, as in ``systemctl reboot "0 tryboot"``), else None:
        reboot plainly."""

    def commit(self, slot: str) -> None:
        """``slot`` becomes primary; its trial is over. Idempotent."""

    def mark_bad(self, slot: str) -> None:
        """``slot`` must not boot again: the other slot is primary and no trial is armed."""


def make_bootloader(config: BootloaderSettings, cmdline: str) -> Bootloader:
    """The configured backend (:data:`BACKENDS`), built from plain settings."""
    try:
        build = BACKENDS[config.type]
    except KeyError:
        raise BootloaderError(config.type, "no such bootloader backend") from None
    return build(config, cmdline)


def _tryboot(config: BootloaderSettings, cmdline: str) -> Bootloader:
    from pathlib import Path

    from updater.bootloader.tryboot import Tryboot

    return Tryboot(
        autoboot=Path(config.autoboot),
        partitions=config.partitions,
        device_tree=Path(config.device_tree),
        vcio=Path(config.vcio),
    )


def _uboot(config: BootloaderSettings, cmdline: str) -> Bootloader:
    from pathlib import Path

    from updater.bootloader.uboot import UBoot

    return UBoot(
        fw_env_config=Path(config.fw_env_config),
        cmdline=Path(cmdline),
        bootlimit=config.bootlimit,
    )


BACKENDS: dict[str, Callable[[BootloaderSettings, str], Bootloader]] = {
    "tryboot": _tryboot,
    "uboot": _uboot,
}
