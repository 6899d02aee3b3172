"""The system tests' VM runner against real qemu and Debian's U-Boot ROM (no disk image needed).

U-Boot with a blank disk is deterministic: banner, autoboot countdown, "Couldn't find partition
virtio 0:1", IDE and network boot attempts, then its ``=> `` prompt, where it stays. That is
enough to check what the scenarios lean on: banner counting, expect and its failure message, the
log, and that a power cut leaves no qemu behind.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from tests.harness import require
from tests.system import vm
from tests.system.vm import VM, VMTimeout


@pytest.fixture
def blank_disk(tmp_path: Path) -> Path:
    require(shutil.which(vm.QEMU) is not None, f"{vm.QEMU} not installed (qemu-system-x86)")
    require(vm.UBOOT_ROM.is_file(), f"{vm.UBOOT_ROM} missing (u-boot-qemu)")
    disk = tmp_path / "blank.img"
    with disk.open("wb") as f:
        f.truncate(4 << 20)
    return disk


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_boot_expect_timeout_log_and_power_cut(blank_disk: Path, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    accel = vm.accelerator()
    print(accel.reason)
    with VM(blank_disk, log=log, accel=accel) as machine:
        machine.expect(r"^U-Boot 20\d\d\.\d\d", 15, what="U-Boot banner")
        assert machine.boots == 1
        start = machine.mark()
        found = machine.expect_any(
            {"blank": r"Couldn't find partition virtio 0:1", "script": r"Found U-Boot script"},
            20,
            what="disk scan",
        )
        assert found == "blank"
        assert any("VirtIO Block Device" in line for line in machine.lines_since(start))
        assert machine.mark() > start

        t0 = time.monotonic()
        with pytest.raises(VMTimeout) as failed:
            machine.expect(r"never comes", 1.5, what="a line that never comes")
        assert time.monotonic() - t0 < 5
        message = str(failed.value)
        assert "a line that never comes" in message and "1.5 s" in message
        assert f"still running (pid {machine.pid})" in message
        assert "Couldn't find partition virtio 0:1" in message  # the serial tail
        assert "U-Boot" in machine.console_tail(200)

        prompt = machine.expect(r"^=> $", 30, what="U-Boot prompt (no newline after it)")
        assert prompt.group() == "=> "
        assert machine.boots == 1  # sat at the prompt: no reboot

        pid = machine.pid
        machine.power_cut()
        assert _gone(pid)
        assert machine.returncode == -9

    text = log.read_text()
    assert "\x1b" not in text and "\r" not in text and "\b" not in text
    stamped = [line for line in text.splitlines() if re.match(r"^ {0,4}\d+\.\d\d ", line)]
    assert stamped == text.splitlines()
    assert any(re.match(r"^ +\d+\.\d\d U-Boot 20\d\d\.\d\d", line) for line in stamped)
    assert any("[vm] power cut" in line for line in stamped)


def test_qemu_error_fails_expect_at_once_with_exit_code_and_stderr(
    blank_disk: Path, tmp_path: Path
) -> None:
    tcg = vm.Accel("tcg", ("-accel", "tcg"), "test")
    with VM(blank_disk, log=tmp_path / "log", accel=tcg, extra_args=["-no-such-option"]) as m:
        t0 = time.monotonic()
        with pytest.raises(VMTimeout) as failed:
            m.expect("U-Boot", 30, what="U-Boot banner")
        assert time.monotonic() - t0 < 10
        pid = m.pid
    assert _gone(pid)
    message = str(failed.value)
    assert "exited with 1" in message
    assert "-no-such-option" in message  # qemu's own complaint, from its stderr


def test_forced_tcg_does_not_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe() -> tuple[bool, str]:
        raise AssertionError("RPI_VM_ACCEL=tcg must not probe KVM")

    monkeypatch.setattr(vm, "_probe_kvm", no_probe)
    monkeypatch.setenv("RPI_VM_ACCEL", "tcg")
    accel = vm.accelerator()
    assert accel.name == "tcg" and "-accel" in accel.args and "RPI_VM_ACCEL" in accel.reason
    monkeypatch.setenv("RPI_VM_ACCEL", "hvf")
    with pytest.raises(ValueError, match="kvm or tcg"):
        vm.accelerator()


def test_probe_decides_and_says_why(blank_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RPI_VM_ACCEL", raising=False)
    accel = vm.accelerator()
    print(accel.reason)
    assert accel.name in ("kvm", "tcg") and accel.reason.strip()
    assert "\n" not in accel.reason
    assert accel.args == (
        ("-accel", "kvm", "-cpu", "qemu64")
        if accel.name == "kvm"
        else ("-accel", "tcg,thread=multi")
    )
    monkeypatch.setenv("RPI_VM_ACCEL", "kvm")
    if accel.name == "kvm":
        assert vm.accelerator().name == "kvm"
    else:
        with pytest.raises(RuntimeError, match="RPI_VM_ACCEL=kvm"):
            vm.accelerator()
