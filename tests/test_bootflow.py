"""The A/B boot flow end to end with both backends (tryboot, U-Boot): install, arm, reboot,
health check, commit or roll back, through the reboot harness (the bootloader's documented
decision: the Pi firmware's one-shot tryboot; the shipped boot.cmd over the real U-Boot env).

Each step is a separate ``rpi-updater`` process, as across real reboots.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.harness import Docroot, Nginx, require
from tests.harness.device import Device, MiB, build_device, task_for
from tests.harness.nginx import ServedFile
from tests.harness.reboot import RebootHarness


@pytest.fixture
def device(tmp_path: Path, nginx: Nginx, trusted_dir: Path) -> Device:
    dev = build_device(tmp_path / "dev", loops=None, ca_file=nginx.ca_file)
    health = dict(dev.config["health"])  # type: ignore[call-overload]
    health["directory"] = str(trusted_dir)
    dev.write_config(health=health)
    return dev


@pytest.fixture(params=["tryboot", "uboot"])
def harness(request: pytest.FixtureRequest, device: Device) -> RebootHarness:
    if request.param == "uboot":
        require(shutil.which("fw_setenv") is not None, "fw_setenv (libubootenv-tool) is missing")
    h = RebootHarness(device, request.param)
    h.configure("now")
    return h


def trial_request(harness: RebootHarness) -> list[str]:
    """What the reboot that starts a trial asks for: tryboot arms through the argument."""
    return ["0 tryboot"] if harness.bootloader == "tryboot" else [""]


def health_check(trusted_dir: Path, ok: bool) -> None:
    script = trusted_dir / "10-app"
    script.write_text(
        "#!/bin/sh\n" + ("exit 0\n" if ok else "echo app did not start >&2\nexit 1\n")
    )
    script.chmod(0o755)


def package(
    docroot: Docroot, nginx: Nginx, tag: str
) -> tuple[dict[str, object], dict[str, ServedFile]]:
    files = {
        "boot.img": docroot.add_random(1 * MiB, name=f"boot-{tag}.img"),
        "rootfs.img": docroot.add_random(2 * MiB, name=f"rootfs-{tag}.img"),
        "app.conf": docroot.add_bytes(f"app-{tag}.conf", f"version = {tag}\n".encode()),
    }
    entries = [(name, nginx.url(f.name), f.size, f.sha256) for name, f in files.items()]
    task = task_for(entries, version=f"{tag}-boot{tag}-root{tag}-conf")
    data = task["data"]
    assert isinstance(data, dict)
    data["extData"] = {
        "versions": {
            "boot.img": f"{tag}-boot",
            "rootfs.img": f"{tag}-root",
            "app.conf": f"{tag}-conf",
        }
    }
    data["version"] = f"{tag}-boot{tag}-root{tag}-conf"
    return task, files


def status(device: Device) -> dict[str, object]:
    result = device.run("status", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert isinstance(info, dict)
    return info


def primary(device: Device) -> object:
    return status(device)["primary"]


# -- the cycles ----------------------------------------------------------------------------------


def test_success_commits_the_new_slot_and_records_the_versions(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    health_check(trusted_dir, ok=True)
    task, files = package(docroot, nginx, "a1")
    (device.etc / "app.conf").write_bytes(b"version = a0\n")

    installed = device.run("install", str(device.task_file(task)))

    assert installed.returncode == 0, installed.stderr
    assert harness.reboot_requests() == trial_request(harness), installed.stderr
    assert status(device)["state"] == "armed"
    assert primary(device) == "A", "after a failed trial, slot A boots"

    assert harness.boot() == "B"
    checked = device.run("health-check")

    assert checked.returncode == 0, checked.stderr
    info = status(device)
    assert info["state"] == "idle"
    assert info["booted"] == "B" and info["primary"] == "B"
    assert info["versions"] == {
        "combined": "a1-boota1-roota1-conf",
        "boot": "a1-boot",
        "rootfs": "a1-root",
        "config": "a1-conf",
    }
    last = info["last_result"]
    assert isinstance(last, dict) and last["result"] == "committed"
    assert (device.etc / "app.conf").read_bytes() == b"version = a1\n"
    assert not (device.etc / ".app.conf.rpi-updater-old").exists(), "kept content dropped"
    assert device.parts["B.root"].read(files["rootfs.img"].size) == files["rootfs.img"].read_bytes()
    assert harness.boot() == "B", "a plain reset keeps the committed slot"


def test_a_failed_health_check_rolls_back_and_reboots_into_the_old_slot(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    health_check(trusted_dir, ok=False)
    task, _ = package(docroot, nginx, "a1")
    (device.etc / "app.conf").write_bytes(b"version = a0\n")
    task_path = device.task_file(task)
    assert device.run("install", str(task_path)).returncode == 0
    assert harness.boot() == "B"

    checked = device.run("health-check")

    assert checked.returncode == 1
    assert "health check failed: 10-app failed: app did not start" in checked.stderr
    assert harness.reboot_requests() == [""], "a plain reboot back to the old slot"
    assert (device.etc / "app.conf").read_bytes() == b"version = a0\n", "file target restored"
    assert primary(device) == "A"
    assert harness.boot() == "A"
    assert device.run("health-check").returncode == 0  # nothing pending any more
    info = status(device)
    assert info["state"] == "idle" and info["booted"] == "A"
    last = info["last_result"]
    assert isinstance(last, dict) and last["result"] == "failed"
    assert "app did not start" in str(last["reason"])

    again = device.run("install", str(task_path))

    assert again.returncode == 2
    assert "slot B already failed its trial boot for this package" in again.stderr
    assert harness.reboot_requests() == []


def test_a_trial_that_never_reaches_the_health_check_is_recorded(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    health_check(trusted_dir, ok=True)
    task, _ = package(docroot, nginx, "a1")
    assert device.run("install", str(device.task_file(task))).returncode == 0
    assert harness.boot() == "B"
    # The new kernel hangs; the watchdog resets the board before the health check ran, again
    # and again: tryboot gives one try, U-Boot's counter bootlimit (3) tries.
    while harness.boot() == "B":
        assert len(harness.history) < 10, "never came back to slot A"
    assert harness.history[1:] == (
        ["B", "A"] if harness.bootloader == "tryboot" else ["B"] * 3 + ["A"]
    )

    checked = device.run("health-check")

    assert checked.returncode == 1
    info = status(device)
    assert info["state"] == "idle" and info["booted"] == "A" and info["primary"] == "A"
    last = info["last_result"]
    assert isinstance(last, dict)
    assert "did not reach the health check: the device came back on slot A" in str(last["reason"])


def test_a_second_update_after_a_rollback_succeeds(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    health_check(trusted_dir, ok=False)
    first, _ = package(docroot, nginx, "a1")
    assert device.run("install", str(device.task_file(first, "first.json"))).returncode == 0
    harness.boot()
    assert device.run("health-check").returncode == 1
    assert harness.boot() == "A"
    health_check(trusted_dir, ok=True)
    second, _ = package(docroot, nginx, "a2")

    assert device.run("install", str(device.task_file(second, "second.json"))).returncode == 0
    assert harness.boot() == "B"
    assert device.run("health-check").returncode == 0

    info = status(device)
    assert info["booted"] == "B" and info["primary"] == "B"
    versions = info["versions"]
    assert isinstance(versions, dict) and versions["combined"] == "a2-boota2-roota2-conf"


def test_an_update_while_a_reboot_is_pending_is_refused(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx
) -> None:
    harness.configure("never")
    first, _ = package(docroot, nginx, "a1")
    assert device.run("install", str(device.task_file(first, "first.json"))).returncode == 0
    assert harness.reboot_requests() == []
    assert status(device)["update"] == {
        "task_id": status(device)["update"]["task_id"],  # type: ignore[index]
        "version": "a1-boota1-roota1-conf",
        "slot": "B",
        "from_slot": "A",
        "reboot_required": True,
        "reason": "",
    }
    second, _ = package(docroot, nginx, "a2")

    result = device.run("install", str(device.task_file(second, "second.json")))

    assert result.returncode == 2
    assert "is installed in slot B and waits for a reboot" in result.stderr


# -- refusals before anything is written ---------------------------------------------------------


def test_install_is_refused_when_the_firmware_and_the_kernel_disagree(
    device: Device, docroot: Docroot, nginx: Nginx
) -> None:
    """root= says slot A, but the firmware says it booted partition 3 (slot B)."""
    (device.root / "device-tree" / "partition").write_bytes((3).to_bytes(4, "big"))
    before = device.snapshot()
    task, _ = package(docroot, nginx, "a1")

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 2, result.stderr
    assert (
        "the kernel runs slot A but the tryboot bootloader says it booted slot B" in result.stderr
    )
    assert device.snapshot() == before


def test_install_is_refused_on_an_eeprom_too_old_for_tryboot(
    device: Device, docroot: Docroot, nginx: Nginx
) -> None:
    (device.root / "device-tree" / "capabilities").write_bytes((0x4).to_bytes(4, "big"))
    before = device.snapshot()
    task, _ = package(docroot, nginx, "a1")

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 2, result.stderr
    assert "the bootloader EEPROM is too old for tryboot A/B" in result.stderr
    assert device.snapshot() == before
    assert not (device.state_dir / "state.json").exists()


# -- the operator's verdicts ---------------------------------------------------------------------


def test_mark_good_commits_a_trial_without_the_health_check(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    health_check(trusted_dir, ok=False)  # would fail: the operator overrides it
    task, _ = package(docroot, nginx, "a1")
    assert device.run("install", str(device.task_file(task))).returncode == 0
    assert harness.boot() == "B"

    result = device.run("mark-good")

    assert result.returncode == 0, result.stderr
    info = status(device)
    assert info["state"] == "idle" and info["primary"] == "B"
    assert harness.boot() == "B"


def test_mark_bad_drops_a_pending_update(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx
) -> None:
    harness.configure("never")
    task, _ = package(docroot, nginx, "a1")
    (device.etc / "app.conf").write_bytes(b"version = a0\n")
    assert device.run("install", str(device.task_file(task))).returncode == 0
    assert (device.etc / "app.conf").read_bytes() == b"version = a1\n"

    result = device.run("mark-bad")

    assert result.returncode == 0, result.stderr
    info = status(device)
    assert info["state"] == "idle" and info["primary"] == "A"
    assert (device.etc / "app.conf").read_bytes() == b"version = a0\n"
    last = info["last_result"]
    assert isinstance(last, dict) and last["reason"] == "marked bad by the operator"
    assert harness.boot() == "A"


def test_a_health_check_that_keeps_crashing_is_a_boot_loop_and_rolls_back(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    """The check kills the updater every time (as a hang + restart would): after
    health.max_resumes resumes of the same state the update is given up."""
    killer = trusted_dir / "10-crash"
    killer.write_text("#!/bin/sh\nkill -9 $PPID\nsleep 5\n")
    killer.chmod(0o755)
    task, _ = package(docroot, nginx, "a1")
    assert device.run("install", str(device.task_file(task))).returncode == 0
    assert harness.boot() == "B"

    codes = [device.run("health-check").returncode for _ in range(5)]

    # The first run and 3 resumes (max_resumes) crash; the 4th resume gives up.
    assert codes == [-9, -9, -9, -9, 1]
    info = status(device)
    assert info["state"] == "idle" and info["primary"] == "A"
    last = info["last_result"]
    assert isinstance(last, dict) and "kept failing" in str(last["reason"])


def test_status_for_operators(device: Device, harness: RebootHarness) -> None:
    result = device.run("status")

    assert result.returncode == 0, result.stderr
    assert "booted slot:   A" in result.stdout
    assert "primary slot:  A" in result.stdout
    assert "state:         idle" in result.stdout


def test_reboot_policy_delay_reboots_later_in_the_background(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx
) -> None:
    import time

    command = [str(harness.recorder), "{reboot_arg}"]
    device.write_config(reboot={"policy": "delay", "delay": 1, "command": command})
    task, _ = package(docroot, nginx, "a1")

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert harness.reboot_requests() == [], "not at once"
    deadline = time.monotonic() + 10
    while not harness.reboot_requests():
        assert time.monotonic() < deadline, "the delayed reboot never came"
        time.sleep(0.1)
    assert harness.reboot_requests() == trial_request(harness)


def test_mark_bad_when_idle_goes_back_to_the_previous_committed_slot(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    health_check(trusted_dir, ok=True)
    factory = {"boot": "a0-boot", "rootfs": "a0-root", "config": "a0-conf"}
    device.write_config(factory_versions=factory)

    refused = device.run("mark-bad")  # slot B has never held a committed image

    assert refused.returncode == 2
    assert "slot B holds no committed image" in refused.stderr
    task, _ = package(docroot, nginx, "a1")
    assert device.run("install", str(device.task_file(task))).returncode == 0
    assert harness.boot() == "B"
    assert device.run("health-check").returncode == 0

    result = device.run("mark-bad")

    assert result.returncode == 0, result.stderr
    assert harness.boot() == "A"
    info = status(device)
    assert info["booted"] == "A" and info["primary"] == "A"
    assert info["versions"] == {"combined": "a0-boota0-roota0-conf", **factory}


def test_a_second_update_after_a_commit_needs_no_reboot_in_between(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    """The first boot of a committed slot is still the firmware's trial boot (tryboot's flag
    lasts the whole boot): the next update must not wait for a reboot."""
    health_check(trusted_dir, ok=True)
    first, _ = package(docroot, nginx, "a1")
    assert device.run("install", str(device.task_file(first, "first.json"))).returncode == 0
    assert harness.boot() == "B"
    assert device.run("health-check").returncode == 0
    second, files = package(docroot, nginx, "a2")

    result = device.run("install", str(device.task_file(second, "second.json")))

    assert result.returncode == 0, result.stderr
    assert status(device)["state"] == "armed"
    rootfs = files["rootfs.img"]
    assert device.parts["A.root"].read(rootfs.size) == rootfs.read_bytes()
    assert harness.boot() == "A"
    assert device.run("health-check").returncode == 0
    assert status(device)["versions"]["combined"] == "a2-boota2-roota2-conf"  # type: ignore[index]


def killed_reboot(
    device: Device,
    harness: RebootHarness,
    monkeypatch: pytest.MonkeyPatch,
    *,
    signal: str,
    state: str,
) -> None:
    """The reboot command records the request, then dies by ``signal``; ``systemctl
    is-system-running`` answers ``state`` (a script first on PATH: no systemd runs here)."""
    script = device.root / "reboot-then-killed"
    script.write_text(f'#!/bin/sh\n"{harness.recorder}" "$@"\nkill -{signal} $$\n')
    script.chmod(0o755)
    device.write_config(reboot={"policy": "now", "command": [str(script), "{reboot_arg}"]})
    tools = device.root / "tools"
    tools.mkdir()
    systemctl = tools / "systemctl"
    systemctl.write_text(
        f'#!/bin/sh\n[ "$1" = is-system-running ] && {{ echo {state}; exit 1; }}\nexit 3\n'
    )
    systemctl.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tools}:{os.environ['PATH']}")


@pytest.mark.parametrize(("signal", "state"), [("SEGV", "stopping"), ("TERM", "running")])
def test_a_reboot_command_killed_otherwise_is_a_failed_reboot(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    nginx: Nginx,
    monkeypatch: pytest.MonkeyPatch,
    signal: str,
    state: str,
) -> None:
    """A crash of the command, or a SIGTERM with no shutdown running: no reboot is coming."""
    killed_reboot(device, harness, monkeypatch, signal=signal, state=state)
    task, _ = package(docroot, nginx, "a1")

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert "reboot required" in result.stderr and "under way" not in result.stderr
    assert status(device)["state"] == "armed"


def test_a_reboot_command_ended_by_the_shutdown_it_started_counts_as_asked(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    nginx: Nginx,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without logind, ``systemctl reboot`` waits for the reboot job until the shutdown kills it
    (SIGTERM), as the system test saw in its VM. The reboot was asked for: when the trial then
    never reaches Linux (a panic, a hang), the old slot's boot reports the failure instead of
    arming the same trial again (and again)."""
    killed_reboot(device, harness, monkeypatch, signal="TERM", state="stopping")
    task, _ = package(docroot, nginx, "a1")

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert "reboot required" not in result.stderr and "the reboot is under way" in result.stderr
    assert harness.reboot_requests() == trial_request(harness)
    # The trial boots of B die before the health check; the bootloader brings A back: tryboot
    # after one try, U-Boot's counter after bootlimit (3) of them.
    trials = 1 if harness.bootloader == "tryboot" else 3
    assert [harness.boot() for _ in range(trials + 1)] == ["B"] * trials + ["A"]

    checked = device.run("health-check")

    assert "arming again" not in checked.stderr, checked.stderr
    assert harness.reboot_requests() == [], "the failed trial was armed again"
    info = status(device)
    assert info["state"] == "idle" and info["booted"] == "A" and info["primary"] == "A"
    last = info["last_result"]
    assert isinstance(last, dict) and "did not reach the health check" in str(last["reason"])


def test_the_updater_stopped_by_the_shutdown_its_reboot_started_ends_quietly(
    device: Device, harness: RebootHarness, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    """The health check that rolls back reboots, and the shutdown stops the health check itself
    (SIGTERM, as in the system test's VM): the rollback is done and saved, so the command ends
    normally instead of asking to be run again."""
    health_check(trusted_dir, ok=False)
    task, _ = package(docroot, nginx, "a1")
    assert device.run("install", str(device.task_file(task))).returncode == 0
    assert harness.boot() == "B"
    script = device.root / "reboot-stops-us"
    script.write_text(f'#!/bin/sh\n"{harness.recorder}" "$@"\nkill -TERM $PPID\nexec sleep 5\n')
    script.chmod(0o755)
    device.write_config(reboot={"policy": "now", "command": [str(script), "{reboot_arg}"]})

    checked = device.run("health-check")

    assert "the reboot is under way" in checked.stderr, checked.stderr
    assert "interrupted" not in checked.stderr, checked.stderr
    assert harness.reboot_requests() == [""]  # back to the primary slot: no tryboot argument
    assert harness.boot() == "A"
    info = status(device)
    assert info["state"] == "idle" and info["primary"] == "A"
