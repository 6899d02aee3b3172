"""A power cut after every durable write of a whole update cycle, with both bootloaders.

The cycle is what a device lives: ``install`` (download, apply, arm, reboot), the trial boot, the
health check at boot (commit), a plain reset. For each k, the k-th durable state write
(``state.json`` or the install journal, always fsynced) is the last one before the power goes:
the device resets (the reboot harness applies the bootloader's decision), then does what it
does at every boot or what an operator or the platform does next (the health check; the same
task again while it was still downloading), until nothing is pending.

Whatever k, the device must end consistent: idle, with the update either committed everywhere
(slot B primary and booted, the new files, the new versions) or rolled back everywhere (slot A,
the old files), slot A's bytes never written, and autoboot.txt / the U-Boot env always readable.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import updater.journal
import updater.machine
from tests.harness import Docroot, Nginx, require
from tests.harness.device import Device, MiB, build_device, task_for
from tests.harness.reboot import RebootHarness
from updater.cli import main


class PowerCut(BaseException):
    """The power goes: nothing after this point happens (not an Exception: nothing catches it)."""


def cut_after_write(
    monkeypatch: pytest.MonkeyPatch, k: int | None, seen: list[str] | None = None
) -> Callable[[], int]:
    """Make the k-th durable state write (1-based) the last one; returns the write counter.

    Writes from the download's writer thread (durable offsets) are counted, but the cut comes
    at the next write of the main thread: an exception cannot stop a whole process from another
    thread. (kill -9 during downloads is covered for real by test_install.py.)
    """
    real = updater.journal.atomic_write_json
    count = 0
    due = False

    def write(path: Path, obj: object) -> None:
        nonlocal count, due
        real(path, obj)
        count += 1
        if seen is not None and isinstance(obj, dict):
            seen.append(f"{path.name}:{obj.get('state')}")
        due = due or (k is not None and count == k)
        if due and threading.current_thread() is threading.main_thread():
            raise PowerCut(f"power cut after write {count} ({path.name})")

    monkeypatch.setattr(updater.journal, "atomic_write_json", write)
    monkeypatch.setattr(updater.machine, "atomic_write_json", write)
    return lambda: count


def cli(device: Device, *args: str) -> int:
    return main(["--config", str(device.config_path), *args])


def state(device: Device) -> dict[str, object]:
    path = device.state_dir / "state.json"
    data = json.loads(path.read_text()) if path.exists() else {"state": "idle"}
    assert isinstance(data, dict)
    return data


def live(device: Device, harness: RebootHarness, task: Path) -> None:
    """The device's life from here on: boots, health checks, the platform re-sending the task."""
    for _ in range(12):
        if harness.reboot_requests():
            harness.boot()
            cli(device, "health-check")  # what runs at every boot
        current = state(device)["state"]
        if current in ("download", "install"):
            cli(device, "install", str(task), "--progress", "none")  # the platform re-sends
        elif current != "idle":
            cli(device, "health-check")
        elif not harness.reboot_requests():
            return
    raise AssertionError(f"the device never settled: {state(device)}")


def cycle(device: Device, harness: RebootHarness, task: Path) -> None:
    """The uninterrupted cycle: install, trial boot, health check, a plain reset."""
    assert cli(device, "install", str(task), "--progress", "none") == 0
    harness.boot()
    assert cli(device, "health-check") == 0
    harness.boot()


def setup(
    tmp_path: Path, nginx: Nginx, docroot: Docroot, trusted_dir: Path, bootloader: str
) -> tuple[Device, RebootHarness, Path, dict[str, bytes]]:
    device = build_device(
        tmp_path / "dev", loops=None, ca_file=nginx.ca_file, boot_size=1 * MiB, root_size=2 * MiB
    )
    device.write_config(health={"system_running": False, "directory": str(trusted_dir)})
    harness = RebootHarness(device, bootloader)
    harness.configure("now")
    boot = docroot.add_random(300_000, name="boot.img", seed=1)
    rootfs = docroot.add_random(700_000, name="rootfs.img", seed=2)
    conf = docroot.add_bytes("app.conf", b"new\n")
    (device.etc / "app.conf").write_bytes(b"old\n")
    entries = [(f.name, nginx.url(f.name), f.size, f.sha256) for f in (boot, rootfs, conf)]
    task = task_for(entries, version="b1r1c1")
    data = task["data"]
    assert isinstance(data, dict)
    data["extData"] = {"versions": {"boot.img": "b1", "rootfs.img": "r1", "app.conf": "c1"}}
    path = device.task_file(task)
    return device, harness, path, {"boot": boot.read_bytes(), "root": rootfs.read_bytes()}


def assert_consistent(
    device: Device, harness: RebootHarness, images: dict[str, bytes], a_before: dict[str, str]
) -> str:
    info = json.loads(_status(device))
    assert info["state"] == "idle", info
    snapshot = device.snapshot()
    assert snapshot["A.boot"] == a_before["A.boot"] and snapshot["A.root"] == a_before["A.root"]
    last = info["last_result"]
    assert isinstance(last, dict)
    if last["result"] == "committed":
        assert info["booted"] == "B" and info["primary"] == "B", info
        assert (device.etc / "app.conf").read_bytes() == b"new\n"
        assert device.parts["B.root"].read(len(images["root"])) == images["root"]
        assert device.parts["B.boot"].read(len(images["boot"])) == images["boot"]
        assert info["versions"]["combined"] == "b1r1c1"
    else:
        assert last["result"] == "failed", last
        assert info["booted"] == "A" and info["primary"] == "A", info
        assert (device.etc / "app.conf").read_bytes() == b"old\n"
    leftovers = sorted(p.name for p in device.etc.iterdir() if p.name != "app.conf")
    assert leftovers in ([], [".app.conf.rpi-updater-old"]), leftovers
    assert harness.boot() == info["booted"], "a plain reset keeps the same slot"
    return str(last["result"])


def _status(device: Device) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli(device, "status", "--json") == 0
    return out.getvalue()


@pytest.mark.parametrize("bootloader", ["tryboot", "uboot"])
def test_a_power_cut_after_every_durable_write(
    tmp_path: Path,
    nginx: Nginx,
    docroot: Docroot,
    trusted_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    bootloader: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if bootloader == "uboot":
        require(shutil.which("fw_setenv") is not None, "fw_setenv (libubootenv-tool) is missing")
    (trusted_dir / "10-ok").write_text("#!/bin/sh\nexit 0\n")
    (trusted_dir / "10-ok").chmod(0o755)
    device, harness, task, images = setup(tmp_path / "ref", nginx, docroot, trusted_dir, bootloader)
    seen: list[str] = []
    writes = cut_after_write(monkeypatch, None, seen)
    cycle(device, harness, task)
    total = writes()
    assert json.loads(_status(device))["last_result"]["result"] == "committed"

    outcomes: dict[str, list[int]] = {"committed": [], "failed": []}
    for k in range(1, total + 1):
        device, harness, task, images = setup(
            tmp_path / f"cut-{k}", nginx, docroot, trusted_dir, bootloader
        )
        a_before = device.snapshot()
        cut_after_write(monkeypatch, k)
        try:
            cycle(device, harness, task)
        except PowerCut:
            harness.boot()  # the power comes back
        monkeypatch.undo()
        live(device, harness, task)
        outcomes[assert_consistent(device, harness, images, a_before)].append(k)
    with capsys.disabled():
        print(f"\n{bootloader}: {total} durable writes in a cycle; after a cut: {outcomes}")
    if bootloader == "uboot":
        # The boot counter retries the trial: no cut can cost the update.
        assert outcomes["failed"] == []
    else:
        # tryboot gives one try: only a cut between arming and the commit of the trial boot
        # costs the update (and then cleanly: slot A, the old files).
        trial = {
            k
            for k, what in enumerate(seen, start=1)
            if what in ("state.json:armed", "state.json:verify-reboot", "state.json:commit")
        }
        assert set(outcomes["failed"]) <= trial, (outcomes, seen)
