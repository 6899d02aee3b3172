"""U-Boot backend: the A/B choice lives in the U-Boot environment, read and written from Linux
with libubootenv's ``fw_printenv``/``fw_setenv`` (docs: raspberry-pi-ab.md, section 2).

The boot script ``image-recipes/uboot/boot.cmd`` decides each boot from these variables (the
contract; the script's header says the same):

- ``rpi_slot``: ``A`` or ``B``, the slot U-Boot boots;
- ``upgrade_available``: ``1`` while ``rpi_slot`` is on trial, else ``0`` (missing reads as 0);
- ``bootcount``: trial boots so far, counted by the script (one digit: an if/elif ladder today,
  ``setexpr`` in hex in boot scripts before it, so it is read as hex);
- ``bootlimit``: trial boots allowed (1..8); one more and the script switches ``rpi_slot`` back.

Unlike firmware tryboot, arming does not leave the default alone for one special boot: it moves
``rpi_slot`` to the new slot at once, and the counter brings the old one back after
``bootlimit`` failed boots (or on ``mark_bad``). So the *primary* slot, the one that boots when
the trial is abandoned, is ``rpi_slot`` when ``upgrade_available=0`` and the *other* slot while a
trial is armed. A trial also survives more than one boot: up to ``bootlimit`` (e.g. 3), so a
reset during the health check does not by itself roll back.

Every change is one ``fw_setenv -s SCRIPT`` call: libubootenv rewrites the whole environment
once, and with two copies in fw_env.config it writes the older copy, so a cut write leaves the
previous environment readable. A read that libubootenv could only answer from a default
environment (bad CRC, "Cannot read environment") is an error here, never a reading: an
updater that trusted it could arm or commit the wrong slot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from updater.bootloader import SLOTS, BootloaderError

__all__ = [
    "MAX_BOOTLIMIT",
    "VAR_COUNT",
    "VAR_LIMIT",
    "VAR_SLOT",
    "VAR_TRIAL",
    "UBoot",
    "UBootEnv",
]

NAME = "uboot"
VAR_SLOT = "rpi_slot"
VAR_TRIAL = "upgrade_available"
VAR_COUNT = "bootcount"
VAR_LIMIT = "bootlimit"
#: boot.cmd counts bootcount one digit at a time (0..8 become one more, anything else 9; older
#: boot scripts used ``setexpr``, which counts in hex): with ``bootlimit`` at most 8,
#: ``bootcount`` stays one digit (<= 9), where hex, decimal and ``test -gt`` all agree.
MAX_BOOTLIMIT = 8
#: What libubootenv prints when the stored environment failed its CRC and it fell back to a
#: default environment (0.3.x and later, fw_printenv and fw_setenv alike).
_UNREADABLE = "Cannot read environment"
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True, slots=True)
class UBootEnv:
    """The A/B variables as read, already validated (``rpi_slot`` is A or B)."""

    slot: str  # rpi_slot
    trial: bool  # upgrade_available == "1"
    bootcount: int
    bootlimit: int | None  # None when the variable is missing
    variables: dict[str, str]  # the whole environment, for diagnostics


class UBoot:
    """The U-Boot environment as a :class:`~updater.bootloader.Bootloader`."""

    name = NAME

    def __init__(
        self,
        *,
        fw_env_config: Path = Path("/etc/fw_env.config"),
        cmdline: Path = Path("/proc/cmdline"),
        bootlimit: int = 3,
        tools: tuple[str, str] = ("fw_printenv", "fw_setenv"),
        timeout: float = 10.0,
    ) -> None:
        if not 1 <= bootlimit <= MAX_BOOTLIMIT:
            raise BootloaderError(
                NAME,
                f"bootlimit {bootlimit} is outside 1..{MAX_BOOTLIMIT} "
                "(boot.cmd counts one digit: bootcount must stay at most 9)",
            )
        self.fw_env_config = fw_env_config
        self.cmdline = cmdline
        self.bootlimit = bootlimit
        self.printenv, self.setenv = tools
        self.timeout = timeout

    # ------------------------------------------------------------------ Bootloader protocol

    def check(self) -> None:
        """Refuse a device whose environment this backend cannot use: missing tools, missing
        fw_env.config, an unreadable environment, or one that boot.cmd never wrote (no
        ``rpi_slot``), so that an update is refused before anything is written."""
        for tool in (self.printenv, self.setenv):
            if shutil.which(tool) is None:
                raise BootloaderError(NAME, f"{tool} not found (Debian package libubootenv-tool)")
        if not self.fw_env_config.is_file():
            raise BootloaderError(NAME, f"{self.fw_env_config} missing: fw_printenv cannot work")
        env = self.read()
        if env.bootlimit is not None and not 1 <= env.bootlimit <= MAX_BOOTLIMIT:
            raise BootloaderError(
                NAME, f"bootlimit={env.bootlimit} in the environment is outside 1..{MAX_BOOTLIMIT}"
            )
        if self.booted_slot() is None:
            # Without it no boot can be recognised as the trial: every update would roll back.
            raise BootloaderError(
                NAME,
                f"no rpi_updater.slot= on the kernel command line ({self.cmdline}): the boot "
                "script is not the one image-recipes/uboot/boot.cmd ships",
            )

    def booted_slot(self) -> str | None:
        """``rpi_updater.slot=`` from the kernel command line: boot.cmd appends the slot it chose,
        so this is U-Boot's word, not a guess from the environment (which Linux may have
        changed since)."""
        try:
            words = self.cmdline.read_text(encoding="utf-8", errors="replace").split()
        except OSError:
            return None
        for word in reversed(words):  # the kernel, too, takes the last of repeated arguments
            if word.startswith("rpi_updater.slot="):
                slot = word.partition("=")[2]
                return slot if slot in SLOTS else None
        return None

    def is_trial(self) -> bool:
        """A trial is armed and this boot is of the armed slot (not a boot of the old slot,
        e.g. after a rollback that Linux has not noticed yet)."""
        env = self.read()
        return env.trial and self.booted_slot() == env.slot

    def primary_slot(self) -> str:
        """The slot that boots when no trial is running or the running one is abandoned:
        ``rpi_slot``, or during a trial the other slot, which the counter falls back to."""
        env = self.read()
        return _other(env.slot) if env.trial else env.slot

    def arm(self, slot: str) -> None:
        """``rpi_slot=slot upgrade_available=1 bootcount=0`` (and ``bootlimit`` if missing):
        the next boots try ``slot``, at most ``bootlimit`` times. Re-arming an armed slot
        restarts its count."""
        _check_slot(slot)
        env = self.read()
        primary = _other(env.slot) if env.trial else env.slot
        if slot == primary:
            raise BootloaderError(NAME, f"refusing to arm slot {slot}: it is the primary slot")
        changes = {VAR_SLOT: slot, VAR_TRIAL: "1", VAR_COUNT: "0"}
        if env.bootlimit is None:
            changes[VAR_LIMIT] = str(self.bootlimit)
        self.write(changes)

    def reboot_argument(self, armed: bool) -> str | None:
        """None: the environment already says what boots next; a plain reboot does it."""
        return None

    def commit(self, slot: str) -> None:
        """``rpi_slot=slot upgrade_available=0 bootcount=0``; no write when already so."""
        _check_slot(slot)
        env = self.read()
        if env.slot == slot and not env.trial and env.bootcount == 0:
            return
        self.write({VAR_SLOT: slot, VAR_TRIAL: "0", VAR_COUNT: "0"})

    def mark_bad(self, slot: str) -> None:
        """``rpi_slot=<other> upgrade_available=0 bootcount=0``: the next boot is of the other
        slot, with no trial left that could bring ``slot`` back."""
        _check_slot(slot)
        self.write({VAR_SLOT: _other(slot), VAR_TRIAL: "0", VAR_COUNT: "0"})

    # ------------------------------------------------------------------ the environment

    def read(self) -> UBootEnv:
        """The environment, validated: one ``fw_printenv`` call for all variables."""
        return _validate(self.read_variables(), self.fw_env_config)

    def read_variables(self) -> dict[str, str]:
        """Every variable as ``fw_printenv -c CONFIG`` prints it; refuses a default env."""
        out = self._run([self.printenv, "-c", str(self.fw_env_config)], "read")
        return _parse_printenv(out)

    def write(self, changes: dict[str, str]) -> None:
        """Set all ``changes`` in one ``fw_setenv -s`` write (libubootenv's one atomic step).

        The environment is read first: ``fw_setenv`` on an unreadable environment would start
        from a default one, and the write would bury the state it replaced.
        """
        self.read()
        script = "".join(f"{name}={_value(name, value)}\n" for name, value in changes.items())
        with tempfile.TemporaryDirectory(prefix="rpi-updater-uboot-") as tmp:
            path = Path(tmp) / "fw_setenv.script"
            path.write_text(script, encoding="utf-8")
            self._run([self.setenv, "-c", str(self.fw_env_config), "-s", str(path)], "write")

    def _run(self, argv: list[str], what: str) -> str:
        """Run a tool without a shell, LANG=C, with a timeout; any sign of trouble raises."""
        env = {"LANG": "C", "LC_ALL": "C", "PATH": os.environ.get("PATH", _DEFAULT_PATH)}
        try:
            result = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, env=env, check=False
            )
        except FileNotFoundError as err:
            raise BootloaderError(NAME, f"{argv[0]} not found (libubootenv-tool)") from err
        except subprocess.TimeoutExpired as err:
            raise BootloaderError(NAME, f"{argv[0]} did not finish in {self.timeout:g} s") from err
        stderr = " / ".join(line for line in result.stderr.splitlines() if line.strip())
        if _UNREADABLE in result.stderr:
            raise BootloaderError(
                NAME,
                f"cannot {what} the environment in {self.fw_env_config}: it fails its CRC "
                f"(torn write, never written, or wrong size in the config): {stderr}",
            )
        if result.returncode != 0:
            raise BootloaderError(
                NAME, f"{argv[0]} failed ({what}, exit {result.returncode}): {stderr or '-'}"
            )
        return result.stdout


# ---------------------------------------------------------------------- helpers


def _other(slot: str) -> str:
    return "B" if slot == "A" else "A"


def _check_slot(slot: str) -> None:
    if slot not in SLOTS:
        raise BootloaderError(NAME, f"unknown slot {slot!r} (A or B)")


def _value(name: str, value: str) -> str:
    """A value fit for a ``fw_setenv`` script line: one line, not empty (empty deletes)."""
    if not value or "\n" in value or "\r" in value:
        raise BootloaderError(NAME, f"refusing to write {name}={value!r}")
    return value


def _parse_printenv(out: str) -> dict[str, str]:
    """``name=value`` lines; the value is everything after the first ``=``."""
    variables: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, value = line.partition("=")
        if not sep or not name:
            raise BootloaderError(NAME, f"fw_printenv printed an unexpected line: {line!r}")
        variables[name] = value
    return variables


def _validate(variables: dict[str, str], config: Path) -> UBootEnv:
    """The A/B variables, or a clear error naming what is wrong and where."""
    slot = variables.get(VAR_SLOT, "")
    if slot not in SLOTS:
        raise BootloaderError(
            NAME,
            f"{VAR_SLOT}={slot!r} in {config}: expected A or B "
            "(an environment boot.cmd never wrote, or not this updater's U-Boot script)",
        )
    trial = variables.get(VAR_TRIAL, "0")
    if trial not in ("0", "1"):
        raise BootloaderError(NAME, f"{VAR_TRIAL}={trial!r} in {config}: expected 0 or 1")
    return UBootEnv(
        slot=slot,
        trial=trial == "1",
        bootcount=_number(variables, VAR_COUNT, 16, config) or 0,
        bootlimit=_number(variables, VAR_LIMIT, 10, config),
        variables=variables,
    )


def _number(variables: dict[str, str], name: str, base: int, config: Path) -> int | None:
    """``bootcount`` is read as hex (older boot scripts' ``setexpr`` wrote it so; one digit is
    the same either way), ``bootlimit`` decimal (``test`` reads it)."""
    text = variables.get(name)
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        raise BootloaderError(NAME, f"{name}={text!r} in {config} is not a number") from None
