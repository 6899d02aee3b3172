"""The U-Boot backend and the shipped boot.cmd, against env files and the real libubootenv tools.

Reboots are :class:`~tests.harness.ubootsim.UBootSim` runs: it interprets
image-recipes/uboot/boot.cmd itself, alone as on the Raspberry Pi (persisting with the real
``fw_setenv``) and behind qemu-x86.cmd as in the VM (persisting with ``env export`` + ``fatwrite``
into the same file), so what these tests see in the env file is what U-Boot would have left
there. Linux's side is the real backend reading the command line the simulated U-Boot produced.
The A/B scenarios run on both platforms (the ``platform`` fixture): one decision, two platforms.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.harness import require
from tests.harness.ubootsim import (
    BOARD_ENV,
    BOOT_CMD,
    BUILTIN_ENV,
    IMAGE_ENV,
    MAXARGS,
    PI,
    QEMU_CMD,
    QEMU_X86,
    Block,
    Command,
    Platform,
    SimError,
    UBootSim,
    commands,
    env_image,
    make_env,
    parse_script,
    printenv,
    simple_strtol,
    u_boot_test,
)
from updater.bootloader import BootloaderError
from updater.bootloader.uboot import MAX_BOOTLIMIT, VAR_COUNT, VAR_LIMIT, VAR_SLOT, VAR_TRIAL, UBoot

#: What the simulated U-Boot's saveenv adds to IMAGE_ENV: its defaults and the board's fdt_addr.
SAVED_EXTRAS = {
    "fdt_addr": "0x2eff2e00",
    "kernel_addr_r": "0x00080000",
    "rpi_kernel": "kernel8.img",
}


#: Names boot.cmd sets that are not part of its environment contract: they must never be saved.
HELPERS = frozenset(
    {
        "rpi_bootpart",
        "rpi_rootpart",
        "rpi_dev",
        "rpi_devnum",
        "rpi_bootargs",
        "bootargs",
        "rpi_saved",
    }
)
#: The console lines the system test (tests/system/test_system.py) waits for.
BOOTING = re.compile(
    r"rpi-ab: booting slot ([AB]) \(boot partition \d+, trial ([01]), bootcount (\d+)/(\d+)\)"
)


@pytest.fixture(autouse=True)
def _libubootenv() -> None:
    require(shutil.which("fw_setenv") is not None, "fw_setenv missing (package libubootenv-tool)")


@pytest.fixture(params=[PI, QEMU_X86], ids=lambda platform: platform.name)
def platform(request: pytest.FixtureRequest) -> Platform:
    """The Raspberry Pi (boot.cmd alone) and the qemu VM (qemu-x86.cmd + boot.cmd)."""
    chosen: Platform = request.param
    return chosen


class Rig:
    """An env file, the backend reading it, and U-Boot booting from it. On the qemu platform the
    env file's directory is FAT partition 1, where the preamble loads and saves uboot.env."""

    def __init__(
        self, root: Path, *, platform: Platform = PI, redundant: bool = False, **env: str | None
    ) -> None:
        variables = {k: v for k, v in {**IMAGE_ENV, **env}.items() if v is not None}
        self.config = make_env(root / "boot", variables, redundant=redundant)
        self.env_file = self.config.parent / "uboot.env"
        self.cmdline = root / "cmdline"
        self.cmdline.write_text("console=tty1 root=PARTUUID=1234abcd-05 rpi_updater.slot=A\n")
        self.uboot = UBoot(fw_env_config=self.config, cmdline=self.cmdline)
        self.sim = UBootSim(self.config, platform=platform, cmdline_out=self.cmdline)

    def env(self) -> dict[str, str]:
        variables = printenv(self.config)
        assert variables is not None, "fw_printenv could not read the environment"
        return variables

    def ab(self) -> tuple[str, str, str]:
        """(rpi_slot, upgrade_available, bootcount) as stored."""
        env = self.env()
        return env[VAR_SLOT], env[VAR_TRIAL], env[VAR_COUNT]


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- a fresh environment


def test_fresh_env_is_slot_a_without_trial(tmp_path: Path, platform: Platform) -> None:
    rig = Rig(tmp_path, platform=platform)
    out = subprocess.run(
        ["fw_printenv", "-c", str(rig.config)], capture_output=True, text=True, check=True
    ).stdout
    assert "rpi_slot=A\n" in out
    assert "upgrade_available=0\n" in out
    rig.uboot.check()
    assert rig.uboot.primary_slot() == "A"
    assert rig.uboot.booted_slot() == "A"
    assert not rig.uboot.is_trial()
    assert rig.sim.boot() == "A"
    assert "root=PARTUUID=1234abcd-05" in rig.sim.last.cmdline
    assert rig.sim.last.boot_partition == 2
    assert rig.env() == IMAGE_ENV  # a boot without a trial writes nothing


def test_qemu_first_boot_without_uboot_env_writes_it(tmp_path: Path) -> None:
    """The VM's first power-on finds no uboot.env on partition 1: the preamble reports it, the
    script takes its fresh-environment path and writes the file, and Linux can read it."""
    rig = Rig(tmp_path, platform=QEMU_X86)
    rig.env_file.unlink()
    assert rig.sim.boot() == "A"
    assert rig.sim.last.env_was_default
    assert "rpi-ab: no uboot.env on virtio 0:1: using the default environment" in rig.sim.last.log
    assert "rpi-ab: no valid rpi_slot (): writing a fresh environment, slot A" in rig.sim.last.log
    assert rig.env() == IMAGE_ENV
    rig.uboot.check()
    assert rig.sim.boot() == "A"
    assert not rig.sim.last.env_was_default


def test_qemu_boots_the_bzimage_with_its_initrd(tmp_path: Path) -> None:
    """zboot gets the slot's vmlinuz and initrd.img (at 0x8000000, clear of the decompressing
    kernel) and a command line with the serial console, panic=5 and the A/B part."""
    rig = Rig(tmp_path, platform=QEMU_X86)
    rig.uboot.arm("B")
    assert rig.sim.boot() == "B"
    boot = rig.sim.last
    assert (boot.boot_partition, boot.kernel, boot.initrd) == (3, "vmlinuz", "initrd.img")
    assert boot.command[0] == "zboot"
    assert (boot.command[1], boot.command[3]) == ("0x1000000", "0x8000000")
    assert boot.cmdline == (
        "console=ttyS0,115200 rw panic=5 root=PARTUUID=1234abcd-06 rootwait rpi_updater.slot=B"
    )
    assert rig.uboot.booted_slot() == "B"


@pytest.mark.parametrize("redundant", [False, True])
def test_env_image_is_what_mkenvimage_makes(tmp_path: Path, redundant: bool) -> None:
    require(shutil.which("mkenvimage") is not None, "mkenvimage missing (package u-boot-tools)")
    text = tmp_path / "env.txt"
    text.write_text("".join(f"{k}={v}\n" for k, v in sorted(IMAGE_ENV.items())))
    out = tmp_path / "env.bin"
    flags = ["-r"] if redundant else []
    subprocess.run(
        ["mkenvimage", "-s", "0x4000", "-p", "0", *flags, "-o", str(out), str(text)], check=True
    )
    assert out.read_bytes() == env_image(IMAGE_ENV, flags=1 if redundant else None)


# --------------------------------------------------------------------------- arm, commit, mark bad


def test_arm_writes_the_trial_in_one_go(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.uboot.arm("B")
    assert rig.env() == {**IMAGE_ENV, "rpi_slot": "B", "upgrade_available": "1", "bootcount": "0"}
    assert rig.uboot.primary_slot() == "A"  # what boots if the trial is abandoned
    assert not rig.uboot.is_trial()  # armed, but this boot (A) is not the trial
    assert rig.uboot.reboot_argument(armed=True) is None


def test_arm_adds_bootlimit_only_when_missing(tmp_path: Path) -> None:
    rig = Rig(tmp_path, bootlimit=None)
    UBoot(fw_env_config=rig.config, cmdline=rig.cmdline, bootlimit=5).arm("B")
    assert rig.env()[VAR_LIMIT] == "5"
    rig2 = Rig(tmp_path / "2", bootlimit="2")
    UBoot(fw_env_config=rig2.config, cmdline=rig2.cmdline, bootlimit=5).arm("B")
    assert rig2.env()[VAR_LIMIT] == "2"


def test_arming_the_primary_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    with pytest.raises(BootloaderError, match=r"^uboot: refusing to arm slot A"):
        rig.uboot.arm("A")
    rig.uboot.arm("B")
    with pytest.raises(BootloaderError, match="primary"):
        rig.uboot.arm("A")  # during the trial A is primary
    rig.uboot.arm("B")  # re-arming the armed slot is allowed: it restarts the count
    with pytest.raises(BootloaderError, match="unknown slot"):
        rig.uboot.arm("C")


def test_trial_boot_then_commit(tmp_path: Path, platform: Platform) -> None:
    rig = Rig(tmp_path, platform=platform)
    rig.uboot.arm("B")
    assert rig.sim.boot() == "B"
    assert rig.sim.last.boot_partition == 3
    assert rig.sim.last.cmdline.endswith("root=PARTUUID=1234abcd-06 rootwait rpi_updater.slot=B")
    assert rig.ab() == ("B", "1", "1")
    assert rig.uboot.booted_slot() == "B"
    assert rig.uboot.is_trial()
    assert rig.uboot.primary_slot() == "A"

    rig.uboot.commit("B")  # the health check passed
    assert rig.ab() == ("B", "0", "0")
    assert rig.uboot.primary_slot() == "B"
    assert not rig.uboot.is_trial()
    for _ in range(4):
        assert rig.sim.boot() == "B"
        assert rig.ab() == ("B", "0", "0")
        assert not rig.uboot.is_trial()


def test_saveenv_persists_what_u_boot_would(tmp_path: Path) -> None:
    """The trial boot's saveenv writes the whole in-memory env: the count, U-Boot's defaults and
    board variables, but none of the helpers set after it (rpi_bootpart, bootargs)."""
    rig = Rig(tmp_path)
    rig.uboot.arm("B")
    rig.sim.boot()
    expected = {**IMAGE_ENV, **SAVED_EXTRAS, "rpi_slot": "B", "upgrade_available": "1"}
    assert rig.env() == {**expected, "bootcount": "1"}


def test_pi_never_saves_helper_variables(tmp_path: Path) -> None:
    """saveenv stores all of memory: through a fresh env, a counted trial and a rollback the
    stored env is the contract plus U-Boot's own, never a helper of step 3 (the header's
    promise), and HELPERS is every name boot.cmd sets beyond its contract."""
    set_by_script = {
        c.words[1] for c in commands(parse_script(BOOT_CMD.read_text())) if c.words[0] == "setenv"
    }
    assert set_by_script - set(IMAGE_ENV) - set(SAVED_EXTRAS) == HELPERS
    rig = Rig(tmp_path)
    _flip_byte(rig.env_file, 10)
    assert rig.sim.boot() == "A"  # the fresh-environment save, from the built-in default
    assert rig.env() == {**BUILTIN_ENV, **BOARD_ENV, **IMAGE_ENV, **SAVED_EXTRAS}
    rig.uboot.arm("B")
    saved = []
    for _ in range(4):  # three counted trial boots, then the rollback
        rig.sim.boot()
        saved.append(rig.env())
    assert [s["bootcount"] for s in saved] == ["1", "2", "3", "0"]
    for stored in saved:
        assert not HELPERS & set(stored), stored
        assert set(stored) == {*BUILTIN_ENV, *BOARD_ENV, *IMAGE_ENV, *SAVED_EXTRAS}


def test_qemu_saves_exactly_the_ab_variables(tmp_path: Path) -> None:
    """The VM's save is env export -c of the A/B variables alone: U-Boot's defaults, distro
    boot's variables, the preamble's and the script's helpers all stay in memory. The file is
    byte for byte what mkenvimage makes of those variables."""
    rig = Rig(tmp_path, platform=QEMU_X86)
    rig.uboot.arm("B")
    expected = {**IMAGE_ENV, "rpi_slot": "B", "upgrade_available": "1"}
    for count in ("1", "2", "3"):
        assert rig.sim.boot() == "B"
        assert rig.env() == {**expected, "bootcount": count}
        assert rig.env_file.read_bytes() == env_image({**expected, "bootcount": count})
    assert rig.sim.boot() == "A"  # the rollback's save
    assert rig.env_file.read_bytes() == env_image(IMAGE_ENV)
    _flip_byte(rig.env_file, 10)
    assert rig.sim.boot() == "A"  # the fresh-environment save
    assert rig.env_file.read_bytes() == env_image(IMAGE_ENV)


def test_qemu_imports_only_the_ab_variables(tmp_path: Path) -> None:
    """Whatever else Linux put into uboot.env is neither imported (it cannot replace the
    preamble's rpi_boot or rpi_kernel) nor kept by U-Boot's next save."""
    rig = Rig(tmp_path, platform=QEMU_X86, rpi_boot="reset", rpi_kernel="kernel8.img", other="1")
    rig.uboot.arm("B")
    assert rig.sim.boot() == "B"
    assert (rig.sim.last.kernel, rig.sim.last.resets) == ("vmlinuz", 0)
    assert rig.env() == {**IMAGE_ENV, "rpi_slot": "B", "upgrade_available": "1", "bootcount": "1"}


@pytest.mark.parametrize("bootlimit", [1, 3, MAX_BOOTLIMIT])
def test_uncommitted_trial_rolls_back_after_bootlimit(
    tmp_path: Path, platform: Platform, bootlimit: int
) -> None:
    rig = Rig(tmp_path, platform=platform, bootlimit=None)
    UBoot(fw_env_config=rig.config, cmdline=rig.cmdline, bootlimit=bootlimit).arm("B")
    for count in range(1, bootlimit + 1):
        assert rig.sim.boot() == "B"
        assert rig.ab() == ("B", "1", str(count))
        assert rig.uboot.is_trial()
    assert rig.sim.boot() == "A"
    assert rig.ab() == ("A", "0", "0")
    assert any("rolling back" in line for line in rig.sim.last.log)
    assert rig.uboot.booted_slot() == "A"
    assert rig.uboot.primary_slot() == "A"
    assert not rig.uboot.is_trial()
    assert rig.sim.boot() == "A"


@pytest.mark.parametrize("stored", [*map(str, range(MAX_BOOTLIMIT + 1)), "9", "a", "x"])
def test_bootcount_counts_without_setexpr(tmp_path: Path, platform: Platform, stored: str) -> None:
    """The if/elif ladder: with bootlimit 8, 0..7 count on; 8 counts to 9, past the limit, and
    anything else becomes 9 as well, so a value the updater never writes rolls back too."""
    rig = Rig(
        tmp_path, platform=platform, rpi_slot="B", upgrade_available="1", bootlimit="8",
        bootcount=stored,
    )  # fmt: skip
    slot = rig.sim.boot()
    if stored in map(str, range(MAX_BOOTLIMIT)):
        assert (slot, rig.ab()) == ("B", ("B", "1", str(int(stored) + 1)))
    else:
        assert (slot, rig.ab()) == ("A", ("A", "0", "0"))


@pytest.mark.parametrize("stored", [str(MAX_BOOTLIMIT + 1), "10", "0", "x"])
def test_bootlimit_outside_1_to_8_counts_as_3(
    tmp_path: Path, platform: Platform, stored: str
) -> None:
    """bootlimit 9 or more never rolled back (bootcount stops at 9, and 9 -gt 9 is false), 0 or
    junk rolled back at once: the script takes 3 instead, in memory; the trial's save stores it,
    and the trial rolls back after 3 boots."""
    rig = Rig(
        tmp_path, platform=platform, rpi_slot="B", upgrade_available="1", bootcount="0",
        bootlimit=stored,
    )  # fmt: skip
    for count in ("1", "2", "3"):
        assert rig.sim.boot() == "B"
        assert rig.ab() == ("B", "1", count)
        assert rig.env()[VAR_LIMIT] == "3"
    assert f"rpi-ab: bootlimit {stored} is not 1..8: using 3" in rig.sim.boots[0].log
    assert rig.sim.boot() == "A"
    assert "rpi-ab: slot B failed 3 trial boots: rolling back" in rig.sim.last.log
    assert rig.ab() == ("A", "0", "0")


def test_bootlimit_is_corrected_in_memory_only(tmp_path: Path, platform: Platform) -> None:
    """Without a trial nothing is saved: the stored bootlimit stays as it was."""
    rig = Rig(tmp_path, platform=platform, bootlimit="9")
    before = rig.env_file.read_bytes()
    assert rig.sim.boot() == "A"
    assert "rpi-ab: bootlimit 9 is not 1..8: using 3" in rig.sim.last.log
    assert any(BOOTING.fullmatch(line) and line.endswith("0/3)") for line in rig.sim.last.log)
    assert rig.env_file.read_bytes() == before


def test_mark_bad_during_trial_boots_the_other_slot(tmp_path: Path, platform: Platform) -> None:
    rig = Rig(tmp_path, platform=platform)
    rig.uboot.arm("B")
    assert rig.sim.boot() == "B"
    rig.uboot.mark_bad("B")  # the health check failed
    assert rig.ab() == ("A", "0", "0")
    assert rig.uboot.primary_slot() == "A"
    assert rig.sim.boot() == "A"
    assert not rig.uboot.is_trial()


def test_commit_is_idempotent_and_writes_nothing_when_committed(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    env_file = rig.config.parent / "uboot.env"
    before = env_file.read_bytes()
    rig.uboot.commit("A")
    assert env_file.read_bytes() == before


def test_missing_kernel_during_trial_resets_until_rollback(
    tmp_path: Path, platform: Platform
) -> None:
    """A trial slot whose kernel will not load: the script resets, each run counts, and after
    bootlimit runs slot A boots, all within one power-on."""
    rig = Rig(tmp_path, platform=platform)
    sim = UBootSim(
        rig.config, platform=platform, cmdline_out=rig.cmdline, missing_kernels=frozenset({3})
    )
    rig.uboot.arm("B")
    assert sim.boot() == "A"
    assert sim.last.resets == 3
    assert rig.ab() == ("A", "0", "0")
    assert sum("cannot boot" in line for line in sim.last.log) == 3


# --------------------------------------------------------------------------- damaged environments


def test_corrupt_env_is_an_error_not_a_reading(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.uboot.arm("B")
    env_file = rig.config.parent / "uboot.env"
    _flip_byte(env_file, 10)  # inside the variables: the CRC no longer matches
    damaged = env_file.read_bytes()
    tool = subprocess.run(["fw_printenv", "-c", str(rig.config)], capture_output=True, text=True)
    assert tool.returncode != 0
    assert "Cannot read environment" in tool.stderr
    for verb in (rig.uboot.check, rig.uboot.primary_slot, rig.uboot.is_trial):
        with pytest.raises(BootloaderError, match=r"^uboot: cannot read .* fails its CRC"):
            verb()
    with pytest.raises(BootloaderError, match="fails its CRC"):
        rig.uboot.commit("A")
    with pytest.raises(BootloaderError, match="fails its CRC"):
        rig.uboot.mark_bad("B")
    assert env_file.read_bytes() == damaged  # nothing written over it


def test_u_boot_repairs_a_corrupt_env_by_booting_slot_a(tmp_path: Path, platform: Platform) -> None:
    """What the device does next: U-Boot runs on its built-in default env, the script sees no
    rpi_slot, boots A and saves a complete env, which Linux can read again."""
    rig = Rig(tmp_path, platform=platform)
    _flip_byte(rig.config.parent / "uboot.env", 10)
    assert rig.sim.boot() == "A"
    assert rig.sim.last.env_was_default
    assert any("bad CRC" in line for line in rig.sim.last.log)
    rig.uboot.check()
    assert rig.ab() == ("A", "0", "0")
    assert {k: rig.env()[k] for k in IMAGE_ENV} == IMAGE_ENV


def test_default_env_fallback_is_refused(tmp_path: Path) -> None:
    """On a machine with /etc/u-boot-initial-env, fw_printenv answers a bad CRC with the default
    environment and exit 0; the backend must still refuse (a wrapper adds ``-f`` here)."""
    rig = Rig(tmp_path)
    _flip_byte(rig.config.parent / "uboot.env", 10)
    defaults = tmp_path / "u-boot-initial-env"
    defaults.write_text("rpi_slot=B\nupgrade_available=0\n")
    wrapper = tmp_path / "fw_printenv"
    wrapper.write_text(f'#!/bin/sh\nexec fw_printenv -f "{defaults}" "$@"\n')
    wrapper.chmod(0o755)
    fallback = subprocess.run([str(wrapper), "-c", str(rig.config)], capture_output=True, text=True)
    assert fallback.returncode == 0
    assert "rpi_slot=B" in fallback.stdout  # a plausible, wrong answer
    assert "Cannot read environment, using default" in fallback.stderr
    uboot = UBoot(fw_env_config=rig.config, cmdline=rig.cmdline, tools=(str(wrapper), "fw_setenv"))
    with pytest.raises(BootloaderError, match="fails its CRC"):
        uboot.primary_slot()


def test_env_without_a_valid_slot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BootloaderError, match=r"rpi_slot='C'.*expected A or B"):
        Rig(tmp_path / "c", rpi_slot="C").uboot.check()
    with pytest.raises(BootloaderError, match=r"rpi_slot=''"):
        Rig(tmp_path / "none", rpi_slot=None).uboot.check()
    with pytest.raises(BootloaderError, match="upgrade_available='yes'"):
        Rig(tmp_path / "trial", upgrade_available="yes").uboot.primary_slot()
    with pytest.raises(BootloaderError, match=r"bootlimit=9 in the environment"):
        Rig(tmp_path / "limit", bootlimit="9").uboot.check()


# --------------------------------------------------------------------------- a save that fails


def _failing_fw_setenv(tmp_path: Path) -> str:
    wrapper = tmp_path / "fw_setenv_fails"
    wrapper.write_text('#!/bin/sh\necho "Cannot write environment" >&2\nexit 1\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def test_trial_is_not_booted_when_its_count_cannot_be_saved(
    tmp_path: Path, platform: Platform
) -> None:
    """A damaged partition 1 (saveenv on the Pi, fatwrite in the VM fail): a trial boot that
    cannot be counted would, if it panics, come back uncounted forever. So U-Boot boots the old
    slot instead, changing nothing stored, and Linux sees a failed trial; once the partition
    takes writes again, the trial goes on where it was."""
    rig = Rig(tmp_path, platform=platform)
    rig.uboot.arm("B")
    armed = rig.env_file.read_bytes()
    rig.sim.unwritable = {1}
    for _ in range(4):
        assert rig.sim.boot() == "A"
        log = rig.sim.last.log
        assert (
            "rpi-ab: cannot save the environment: not booting trial slot B uncounted, booting A"
        ) in log
        booting = [m for m in map(BOOTING.fullmatch, log) if m]
        assert [m.groups() for m in booting] == [("A", "0", "0", "3")]
        assert rig.sim.last.boot_partition == 2
        assert rig.sim.last.cmdline.endswith(
            "root=PARTUUID=1234abcd-05 rootwait rpi_updater.slot=A"
        )
        assert rig.env_file.read_bytes() == armed
    # Linux's view: booted A while B is armed: not the trial, A is primary (a failed trial).
    assert rig.uboot.booted_slot() == "A"
    assert not rig.uboot.is_trial()
    assert rig.uboot.primary_slot() == "A"
    rig.sim.unwritable.clear()
    assert rig.sim.boot() == "B"
    assert rig.ab() == ("B", "1", "1")


def test_trial_of_slot_a_falls_back_to_b_when_the_save_fails(
    tmp_path: Path, platform: Platform
) -> None:
    rig = Rig(tmp_path, platform=platform, rpi_slot="A", upgrade_available="1", bootcount="1")
    rig.sim.unwritable = {1}
    assert rig.sim.boot() == "B"
    assert (
        "rpi-ab: cannot save the environment: not booting trial slot A uncounted, booting B"
    ) in rig.sim.last.log
    assert rig.ab() == ("A", "1", "1")


def test_rollback_boots_even_when_it_cannot_be_saved(tmp_path: Path, platform: Platform) -> None:
    """The rollback's save fails: the old slot boots all the same, and the next boot, which
    finds the trial still at its limit, rolls back again."""
    rig = Rig(tmp_path, platform=platform, rpi_slot="B", upgrade_available="1", bootcount="3")
    rig.sim.unwritable = {1}
    for _ in range(2):
        assert rig.sim.boot() == "A"
        log = rig.sim.last.log
        assert "rpi-ab: slot B failed 3 trial boots: rolling back" in log
        assert (
            "rpi-ab: cannot save the environment: the rollback to slot A is not stored, "
            "the next boot rolls back again"
        ) in log
        assert rig.ab() == ("B", "1", "3")
    rig.sim.unwritable.clear()
    assert rig.sim.boot() == "A"
    assert rig.ab() == ("A", "0", "0")


def test_pi_saveenv_fails_when_fw_setenv_does(tmp_path: Path) -> None:
    """The Pi's saveenv is the real fw_setenv here: when that fails, saveenv returns 1, and the
    trial does not boot."""
    rig = Rig(tmp_path)
    rig.uboot.arm("B")
    sim = UBootSim(
        rig.config, cmdline_out=rig.cmdline, tools=("fw_printenv", _failing_fw_setenv(tmp_path))
    )
    assert sim.boot() == "A"
    assert any("Failed (1)" in line and "Cannot write" in line for line in sim.last.log)
    assert rig.ab() == ("B", "1", "0")


def test_a_fresh_environment_that_cannot_be_saved_still_boots_a(
    tmp_path: Path, platform: Platform
) -> None:
    """No trial, nothing lost: the fresh-environment save fails and slot A boots; the stored
    environment stays unreadable (Linux refuses to update until a save works)."""
    rig = Rig(tmp_path, platform=platform)
    _flip_byte(rig.env_file, 10)
    damaged = rig.env_file.read_bytes()
    rig.sim.unwritable = {1}
    assert rig.sim.boot() == "A"
    assert rig.env_file.read_bytes() == damaged
    assert printenv(rig.config) is None


# --------------------------------------------------------------------------- a short uboot.env


@pytest.mark.parametrize("length", [0, 0x100, 0x3FFF])
def test_qemu_short_uboot_env_is_a_fresh_environment(tmp_path: Path, length: int) -> None:
    """A uboot.env shorter than 0x4000 bytes: fw_printenv cannot read it, and env import -c would
    take the rest of the CRC's span from leftover RAM. The preamble says so and boot.cmd writes a
    fresh environment, which Linux can read again."""
    rig = Rig(tmp_path, platform=QEMU_X86)
    rig.uboot.arm("B")
    rig.env_file.write_bytes(rig.env_file.read_bytes()[:length])
    assert printenv(rig.config) is None
    assert rig.sim.boot() == "A"
    assert rig.sim.last.env_was_default
    assert (
        f"rpi-ab: uboot.env is short ({length:#x} of 0x4000 bytes): using the default environment"
    ) in rig.sim.last.log
    assert "rpi-ab: no valid rpi_slot (): writing a fresh environment, slot A" in rig.sim.last.log
    assert rig.env_file.read_bytes() == env_image(IMAGE_ENV)


def test_qemu_reads_the_first_0x4000_bytes_of_a_longer_uboot_env(tmp_path: Path) -> None:
    """As fw_printenv and the Pi's U-Boot do: bytes past the environment's size are ignored."""
    rig = Rig(tmp_path, platform=QEMU_X86)
    rig.uboot.arm("B")
    rig.env_file.write_bytes(rig.env_file.read_bytes() + b"\xff" * 0x1000)
    assert printenv(rig.config) is not None
    assert rig.sim.boot() == "B"
    assert "rpi-ab: environment loaded from uboot.env" in rig.sim.last.log
    assert rig.ab() == ("B", "1", "1")


# --------------------------------------------------------------------------- redundant copies


def test_redundant_env_alternates_copies_through_a_trial(tmp_path: Path) -> None:
    rig = Rig(tmp_path, redundant=True)
    first, second = rig.config.parent / "uboot.env", rig.config.parent / "uboot-redund.env"
    rig.uboot.check()
    rig.uboot.arm("B")
    assert second.read_bytes()[4] == 2  # the older copy took the write, flags 0 -> 2
    assert first.read_bytes() == env_image(IMAGE_ENV, flags=1)  # the previous state, intact
    assert rig.sim.boot() == "B"
    assert rig.uboot.is_trial()
    rig.uboot.commit("B")
    assert rig.ab() == ("B", "0", "0")
    assert rig.sim.boot() == "B"


def test_redundant_env_survives_a_torn_write(tmp_path: Path) -> None:
    """A write cut half-way leaves the copy it wrote with a bad CRC: both libubootenv and U-Boot
    then take the other copy, the state from before the write."""
    rig = Rig(tmp_path, redundant=True)
    rig.uboot.arm("B")
    _flip_byte(rig.config.parent / "uboot-redund.env", 20)  # the copy arm() wrote
    assert rig.ab() == ("A", "0", "0")
    assert rig.uboot.primary_slot() == "A"
    assert rig.sim.boot() == "A"
    assert not rig.sim.last.env_was_default


# --------------------------------------------------------------------------- the backend alone


def test_booted_slot_comes_from_the_command_line(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    uboot = UBoot(fw_env_config=tmp_path / "none", cmdline=cmdline)
    assert uboot.booted_slot() is None  # no file
    cmdline.write_text("root=PARTUUID=1234abcd-06 rootwait\n")
    assert uboot.booted_slot() is None
    cmdline.write_text("rpi_updater.slot=A rpi_updater.slot=B quiet\n")
    assert uboot.booted_slot() == "B"  # the last one, as the kernel reads it
    cmdline.write_text("rpi_updater.slot=X\n")
    assert uboot.booted_slot() is None


def test_check_names_what_is_missing(tmp_path: Path) -> None:
    config = make_env(tmp_path)
    with pytest.raises(BootloaderError, match="fw_nothere not found"):
        UBoot(fw_env_config=config, tools=("fw_nothere", "fw_setenv")).check()
    with pytest.raises(BootloaderError, match="missing: fw_printenv cannot work"):
        UBoot(fw_env_config=tmp_path / "absent.config").check()
    with pytest.raises(BootloaderError, match=r"bootlimit 9 is outside 1\.\.8"):
        UBoot(fw_env_config=config, bootlimit=MAX_BOOTLIMIT + 1)


# --------------------------------------------------------------------------- boot.cmd itself


def _node_shape(nodes: Block) -> list[object]:
    """A parsed script without its line numbers and file names: what it runs."""
    shape: list[object] = []
    for node in nodes:
        if isinstance(node, Command):
            shape.append(node.words)
        else:
            branches = [(_node_shape(c), _node_shape(b)) for c, b in node.branches]
            shape.append(("if", branches, _node_shape(node.orelse)))
    return shape


#: mkimage -A for each platform, and the legacy header's ih_arch it writes (IH_ARCH_*).
MKIMAGE_ARCH = {PI.name: ("arm64", 22, "AArch64"), QEMU_X86.name: ("x86", 3, "Intel x86")}


@pytest.mark.parametrize("chosen", [PI, QEMU_X86], ids=lambda platform: platform.name)
def test_boot_scr_carries_exactly_the_script_ubootsim_runs(
    tmp_path: Path, chosen: Platform
) -> None:
    """The platform's boot.scr, built as image-recipes/uboot/README.md says (the preamble and
    boot.cmd concatenated, then mkimage -T script): a legacy script image whose header checks out
    and whose one payload is the concatenated text, byte for byte, which U-Boot's ``source`` can
    run (no NUL ends it early, no CR glued to a keyword) and which parses into the very program
    the simulator interprets for that platform. (mkimage does not parse scripts: the content is
    checked by parsing the payload here.)"""
    require(shutil.which("mkimage") is not None, "mkimage missing (package u-boot-tools)")
    arch, ih_arch, arch_name = MKIMAGE_ARCH[chosen.name]
    source = tmp_path / "boot.cmd"
    source.write_bytes(b"".join(path.read_bytes() for path in chosen.scripts))
    scr = tmp_path / "boot.scr"
    result = subprocess.run(
        ["mkimage", "-A", arch, "-O", "linux", "-T", "script", "-C", "none", "-n", "rpi-ab boot",
         "-d", str(source), str(scr)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{arch_name} Linux Script (uncompressed)" in result.stdout
    image = scr.read_bytes()
    header, body = image[:64], image[64:]
    magic, hcrc, _time, size, _load, _ep, dcrc = struct.unpack(">7I", header[:28])
    assert magic == 0x27051956
    assert zlib.crc32(header[:4] + b"\0" * 4 + header[8:]) == hcrc
    assert (size, zlib.crc32(body)) == (len(body), dcrc)
    assert tuple(header[28:32]) == (5, ih_arch, 6, 0)  # IH_OS_LINUX, arch, IH_TYPE_SCRIPT, none
    assert header[32:64].rstrip(b"\0") == b"rpi-ab boot"
    length, end = struct.unpack(">2I", body[:8])  # one part, then the 0 that ends the table
    payload = body[8:]
    assert (end, length) == (0, len(payload))
    assert payload == source.read_bytes()
    assert b"\0" not in payload and b"\r" not in payload and payload.endswith(b"\n")
    program = UBootSim(make_env(tmp_path / "env"), platform=chosen).program
    assert _node_shape(parse_script(payload.decode(), "boot.scr")) == _node_shape(program)


def test_boot_cmd_and_backend_share_the_contract() -> None:
    """The names the backend reads and writes are the ones the script tests and sets, and the
    script states the same bootlimit range: a rename on one side fails here."""
    text = BOOT_CMD.read_text()
    program = parse_script(text)
    set_by_script = {c.words[1] for c in commands(program) if c.words[0] in ("setenv", "setexpr")}
    for name in (VAR_SLOT, VAR_TRIAL, VAR_COUNT, VAR_LIMIT):
        assert "${" + name + "}" in text, name
        assert name in set_by_script, name
    assert f"Keep it 1..{MAX_BOOTLIMIT}" in text
    assert "test ${bootcount} -gt ${bootlimit}" in text
    assert set(IMAGE_ENV) <= set_by_script  # the script has a default for every image variable


def test_preamble_saves_the_image_variables_and_leaves_the_disk_id_to_boot_cmd() -> None:
    """qemu-x86.cmd exports exactly the variables the image ships (the A/B contract), and the
    one line the image recipe's sed rewrites (the disk signature) is boot.cmd's alone, so the
    same sed works on boot.cmd and on the preamble + boot.cmd."""
    setenvs = {
        c.words[1]: c.words[2:]
        for c in commands(parse_script(QEMU_CMD.read_text()))
        if c.words[0] == "setenv"
    }
    assert setenvs["rpi_vars"][0].strip('"').split() == list(IMAGE_ENV)
    assert len(setenvs["rpi_vars"][0].split()) + 6 <= MAXARGS  # env export -c -s SIZE ADDR names
    disk_line = re.compile(
        r'^[ \t]*if test -z "\$\{rpi_disk\}"; then setenv rpi_disk [0-9a-fA-F]{8};', re.M
    )
    assert len(disk_line.findall(BOOT_CMD.read_text())) == 1
    assert not disk_line.findall(QEMU_CMD.read_text())
    assert "rpi_disk" not in setenvs


def test_boot_cmd_alone_needs_the_preamble_on_qemu(tmp_path: Path) -> None:
    """Without its preamble boot.cmd takes the Pi's path, and the qemu build has no saveenv,
    setexpr or firmware device tree: the simulator says so instead of pretending."""
    config = make_env(tmp_path / "env", IMAGE_ENV)
    sim = UBootSim(config, platform=QEMU_X86, script=BOOT_CMD)
    with pytest.raises(SimError, match=r"boot.cmd line \d+: the qemu-x86 U-Boot has no 'saveenv'"):
        sim.boot()  # nothing imported: the fresh-environment save
    with pytest.raises(SimError, match="has no 'setexpr'"):
        sim.execute("setexpr bootcount 1 + 1")
    with pytest.raises(SimError, match="has no 'zboot'"):
        UBootSim(config).execute("zboot 0x1000000 100")


@pytest.mark.parametrize(
    ("snippet", "printed"),
    [
        # Each as U-Boot 2023.01 (Debian's qemu-x86 build) printed it at its prompt.
        ("setenv b hello; setenv a 'x ${b} y'; echo ${a}", ["x ${b} y"]),
        ('setenv b hello; setenv c "v ${b}"; echo ${c}', ["v hello"]),
        ("setenv b hello; setenv s 'echo one; echo two ${b}'; run s", ["one", "two hello"]),
        ("setenv b hello; echo \"slot '${b}': x\"", ["slot ${b}: x"]),  # ' quotes inside "
        ("setenv v 'a;b'; echo ${v}", ["a;b"]),  # no ; in a value: one command
        ("setenv b hello; setenv w '${b}'; echo ${w}", ["${b}"]),  # no second expansion
        ("setenv h '#x y'; echo A ${h} B", ["A"]),  # a value's # comments out the rest
        ("setenv dq 'say \"two words\"'; echo ${dq}", ["say two words"]),
        ('setenv t "1 = 1"; if test ${t}; then echo split; fi', ["split"]),
        ("setenv f 'test 1 = 2'; if run f; then echo t; else echo f; fi", ["f"]),
        (
            "setenv r 'if test 1 = 2; then echo x; fi'; if run r; then echo 0; else echo 1; fi",
            ["1"],
        ),
        ("run none; echo after", ['## Error: "none" not defined', "after"]),
        # run's status is the last command's, not "any failed" (boot.cmd's "if run rpi_save")
        (
            "setenv s 'test 1 = 2; test 1 = 1'; if run s; then echo last; else echo any; fi",
            ["last"],
        ),
        ("setenv s 'test 1 = 1; test 1 = 2'; if run s; then echo last; else echo any; fi", ["any"]),
        (
            "setenv x 1; setenv y 'setenv x 2; test 1 = 1'; if run y; then echo ok ${x}; fi",
            ["ok 2"],
        ),
    ],
)
def test_hush_as_u_boot_runs_it(tmp_path: Path, snippet: str, printed: list[str]) -> None:
    sim = UBootSim(make_env(tmp_path / "env"), platform=QEMU_X86)
    assert list(sim.execute(snippet).log) == printed


def test_setenv_with_an_empty_value_sets_it(tmp_path: Path) -> None:
    """U-Boot: ``setenv e "${none}"`` stores e as empty, ``setenv e`` deletes it."""
    sim = UBootSim(make_env(tmp_path / "env"), platform=QEMU_X86)
    assert sim.execute('setenv e "${none}"').env["e"] == ""
    assert "e" not in sim.execute('setenv e "${none}"; setenv e ${none}').env


def test_hush_limits_the_simulator_enforces(tmp_path: Path) -> None:
    sim = UBootSim(make_env(tmp_path / "env"), platform=QEMU_X86)
    assert sim.execute("echo " + " ".join(map(str, range(1, MAXARGS)))).status == 0
    with pytest.raises(SimError, match="CONFIG_SYS_MAXARGS"):
        sim.execute("echo " + " ".join(map(str, range(1, MAXARGS + 1))))
    with pytest.raises(SimError, match="unterminated"):
        sim.execute('setenv b x; setenv q "it\'s ${b}"')  # hush waits for the closing '
    with pytest.raises(SimError, match="where the kernel decompresses"):
        sim.execute(
            "fatload virtio 0:2 ${kernel_addr_r} vmlinuz; setenv k ${filesize}; "
            "fatload virtio 0:2 ${ramdisk_addr_r} initrd.img; "
            "zboot ${kernel_addr_r} ${k} ${ramdisk_addr_r} ${filesize}"
        )


def test_fatload_bytes_and_leftover_ram(tmp_path: Path) -> None:
    """fatload FILE BYTES reads at most BYTES and sets filesize (hex) to what it read, as the
    qemu-x86 ROM printed it (0x5000, 0x100 and 0x4000 byte files); reading past what was loaded
    is leftover RAM, which the simulator refuses to make up."""
    sim = UBootSim(make_env(tmp_path / "env"), platform=QEMU_X86)
    (tmp_path / "env" / "long.env").write_bytes(env_image(IMAGE_ENV) + b"x" * 0x1000)
    (tmp_path / "env" / "short.env").write_bytes(env_image(IMAGE_ENV)[:0x100])
    load = "fatload virtio 0:1 0x3000000 {} {}; echo ${{filesize}}"
    assert sim.execute(load.format("long.env", "0x4000")).log == ("4000",)
    assert sim.execute(load.format("long.env", "")).log == ("5000",)
    assert sim.execute(load.format("short.env", "0x4000")).log == ("100",)
    ran = sim.execute(
        load.format("long.env", "0x4000") + "; env import -c 0x3000000 0x4000 rpi_slot"
    )
    assert (ran.status, ran.env["rpi_slot"]) == (0, "A")
    with pytest.raises(SimError, match="leftover RAM"):
        sim.execute(load.format("short.env", "0x4000") + "; env import -c 0x3000000 0x4000")


def test_unwritable_partition_fails_the_writes(tmp_path: Path) -> None:
    config = make_env(tmp_path / "env")
    before = (tmp_path / "env" / "uboot.env").read_bytes()
    sim = UBootSim(config, platform=QEMU_X86, unwritable=[1])
    ran = sim.execute(
        "env export -c -s 0x4000 0x3000000 rpi_slot; "
        "if fatwrite virtio 0:1 0x3000000 uboot.env 0x4000; then echo wrote; else echo failed; fi"
    )
    assert ran.log == ("** Unable to write file uboot.env **", "failed")
    assert UBootSim(config, unwritable=[1]).execute("saveenv").status == 1
    assert (tmp_path / "env" / "uboot.env").read_bytes() == before
    assert UBootSim(config).execute("saveenv").status == 0


def test_every_echo_is_an_rpi_ab_line() -> None:
    """The system test watches the serial console for "rpi-ab:" lines: every echo of both
    scripts, those in the preamble's run commands too, starts with it."""
    found: list[Command] = []
    for path in (QEMU_CMD, BOOT_CMD):
        program = commands(parse_script(path.read_text(), path.name))
        found += program
        for c in program:  # the single-quoted commands a preamble defines for "run"
            if c.words[0] == "setenv" and len(c.words) == 3 and c.words[2].startswith("'"):
                found += commands(parse_script(c.words[2].strip("'"), f"run {c.words[1]}"))
    echoes = [c for c in found if c.words[0] == "echo"]
    assert len(echoes) >= 6
    for c in echoes:
        assert c.words[1].startswith('"rpi-ab: '), (c.source, c.line, c.words)


def test_readme_lists_every_console_line() -> None:
    """image-recipes/uboot/README.md's table of console lines: each example is a line one of the
    scripts prints, and each echo of the scripts has an example there."""
    templates: dict[str, re.Pattern[str]] = {}
    for path in (QEMU_CMD, BOOT_CMD):
        for c in commands(parse_script(path.read_text(), path.name)):
            if c.words[0] == "echo":
                text = c.words[1].strip('"')
                pattern = re.sub(r"\\\$\\\{\w+\\\}", ".*", re.escape(text))
                templates[text] = re.compile(pattern)
    readme = (BOOT_CMD.parent / "README.md").read_text()
    examples = re.findall(r"^\| `(rpi-ab: [^`]*)` \|", readme, re.M)
    unmatched = [e for e in examples if not any(t.fullmatch(e) for t in templates.values())]
    assert not unmatched, unmatched
    missing = [k for k, t in templates.items() if not any(t.fullmatch(e) for e in examples)]
    assert not missing, missing


def test_simulator_refuses_commands_it_does_not_know(tmp_path: Path) -> None:
    script = tmp_path / "boot.cmd"
    script.write_text("setenv rpi_slot A\nmmc rescan\n")
    with pytest.raises(SimError, match=r"boot.cmd line 2: ubootsim does not know 'mmc'"):
        UBootSim(make_env(tmp_path / "env"), script=script).boot()
    script.write_text('echo "a\\"b"\n')
    with pytest.raises(SimError, match="backslash"):
        parse_script(script.read_text())
    script.write_text("test -n x && setenv a b\n")
    with pytest.raises(SimError, match="outside the supported hush subset"):
        parse_script(script.read_text())
    script.write_text("if test 1 -eq 1; then echo yes\n")
    with pytest.raises(SimError, match="expected one of"):
        parse_script(script.read_text())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-z", ""], True),
        (["-z"], False),  # fewer than two arguments: false (an unquoted empty variable)
        (["-n", "x"], True),
        (["A", "=", "A"], True),
        (["A", "!=", "A"], False),
        (["4", "-gt", "3"], True),
        (["3", "-gt", "3"], False),
        (["0x10", "-gt", "9"], True),  # base 0: hex with 0x
        (["a", "-gt", "9"], False),  # setexpr's "a" (ten) reads as 0: why bootlimit <= 8
        (["!", "1", "-eq", "2"], True),
        (["1", "-eq", "2", "-o", "2", "-eq", "2"], True),
        (["1", "-eq", "1", "-a", "2", "-eq", "3"], False),
        (["word", "word2"], True),  # cmd/test.c: an unreadable expression is true
    ],
)
def test_u_boot_test_semantics(args: list[str], expected: bool) -> None:
    assert u_boot_test(args) is expected


def test_setexpr_counts_in_hex(tmp_path: Path) -> None:
    assert simple_strtol("9", 16) + 1 == 10
    script = tmp_path / "boot.cmd"
    script.write_text(
        "setexpr bootcount 9 + 1\nsetenv bootargs rpi_updater.slot=${bootcount}\n"
        "fatload mmc 0:2 ${kernel_addr_r} k\nbooti ${kernel_addr_r} - ${fdt_addr}\n"
    )
    sim = UBootSim(make_env(tmp_path / "env", {"kernel_addr_r": "0x80000"}), script=script)
    assert sim.boot() == "a"
    assert re.search(r"slot=a$", sim.last.cmdline)
