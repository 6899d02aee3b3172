"""``make demo``: the install flow on this machine, with no Raspberry Pi.

A stand-in A/B disk (loop devices when root, image-file regions otherwise), a private nginx over
HTTPS with a test CA, and our fault-injecting proxy in front of it. Then:

1. the plan of a three-file task (boot FAT image, ext4 root image, a config file), written nowhere;
2. the install through a link that is cut three times: it resumes, the slot is byte-identical;
3. the same task again: nothing is fetched;
4. a task whose digest is wrong: refused with exit 4 and step -3, the running slot untouched.

Everything is cleaned up at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.harness import Fault, FaultProxy, LoopDevices, Nginx, make_tls_files
from tests.harness.device import Device, MiB, build_device, task_for
from tests.harness.reboot import RebootHarness

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def show(cmd: list[str], *, live: bool = False) -> int:
    """Run ``rpi-updater`` and show its output (``live``: straight to the terminal, for the bar)."""
    shown = " ".join(["rpi-updater", *cmd[cmd.index("--config") :]])
    print(f"{DIM}$ {shown}{RESET}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    if live:
        code = subprocess.run(cmd, env=env, check=False).returncode
    else:
        result = subprocess.run(
            cmd, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, check=False
        )
        for line in result.stdout.splitlines():
            print(f"  {line}")
        code = result.returncode
    print(f"  {DIM}(exit {code}){RESET}")
    return code


def make_boot_image(work: Path, size: int) -> Path:
    """A FAT boot partition image with config.txt and cmdline.txt (mtools, nothing mounted)."""
    image = work / "boot.img"
    subprocess.run(
        ["mkfs.vfat", "-C", "-n", "BOOT", str(image), str(size // 1024)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    for name, text in {
        "config.txt": "dtparam=watchdog=on\n",
        "cmdline.txt": "console=serial0,115200 root=PARTUUID=1234abcd-06 rootwait panic=10\n",
    }.items():
        src = work / name
        src.write_text(text)
        subprocess.run(["mcopy", "-i", str(image), str(src), f"::{name}"], check=True)
    return image


def make_root_image(work: Path, size: int) -> Path:
    """An ext4 root filesystem image from a small tree (mke2fs -d, nothing mounted)."""
    tree = work / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "os-release").write_text('PRETTY_NAME="demo rootfs b1"\n')
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "payload").write_bytes(os.urandom(3 * MiB))
    image = work / "rootfs.img"
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), str(image), str(size // 1024)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return image


def main() -> int:
    if shutil.which("mkfs.vfat") is None or shutil.which("mke2fs") is None:
        print("demo: needs dosfstools, mtools and e2fsprogs (make demo installs them as root)")
        return 1
    with tempfile.TemporaryDirectory(prefix="rpi-demo-") as tmp:
        work = Path(tmp)
        tls = make_tls_files(work / "tls")
        root = os.geteuid() == 0
        with (
            Nginx(work / "www", tls, work / "nginx") as nginx,
            LoopDevices() as loops,
            FaultProxy(nginx.plain_port, tls) as proxy,
        ):
            return run_demo(work, nginx, proxy, loops if root else None)


def run_demo(work: Path, nginx: Nginx, proxy: FaultProxy, loops: LoopDevices | None) -> int:
    root = loops is not None
    step("a stand-in Raspberry Pi: slot A boots, slot B is free")
    device = build_device(
        work / "device", loops=loops, ca_file=nginx.ca_file, boot_size=8 * MiB, root_size=32 * MiB
    )
    for name, region in device.parts.items():
        where = region.path if region.offset == 0 else f"{region.path}@{region.offset}"
        print(f"  {name:7} {region.size // MiB:3} MiB  {where}")
    print(f"  kernel command line: {(device.root / 'cmdline').read_text().strip()}")
    build = work / "build"
    build.mkdir()
    files = {
        "boot.img": make_boot_image(build, 8 * MiB),
        "rootfs.img": make_root_image(build, 24 * MiB),
        "app.conf": build / "app.conf",
    }
    files["app.conf"].write_text("mode = production\n")
    for name, path in files.items():
        shutil.copy(path, nginx.root / name)
    (device.etc / "app.conf").write_text("mode = factory\n")
    import hashlib

    entries = [
        (name, proxy.url(name), path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        for name, path in files.items()
    ]
    pushed = task_for(entries, version="a1b1c1")
    data = pushed["data"]
    assert isinstance(data, dict)
    data["extData"] = {"versions": {"boot.img": "a1", "rootfs.img": "b1", "app.conf": "c1"}}
    task = device.task_file(pushed)
    print(f"\n  the task ({task.name}), as the IoT Platform would push it:")
    for line in json.dumps(data, indent=1).splitlines()[:12]:
        print(f"  {DIM}{line}{RESET}")
    harness = RebootHarness(device, "tryboot")
    harness.configure("now")
    health = Path(tempfile.mkdtemp(prefix="rpi-demo-health-", dir="/run" if root else None))
    health.chmod(0o755)
    (health / "10-app").write_text("#!/bin/sh\necho checking the app; exit 0\n")
    (health / "10-app").chmod(0o755)
    device.write_config(health={"system_running": False, "directory": str(health)})

    step("1. the plan: every check before the first byte is written")
    show(device.command("install", "--dry-run", str(task)))

    step("2. install through a link that drops three times; arm slot B; reboot")
    size = files["rootfs.img"].stat().st_size
    proxy.script(
        Fault(),
        Fault(cut_after=size // 4),
        Fault(reset_after=size // 3),
        Fault(stall_after=size // 5, stall_seconds=3),
    )
    if show(device.command("install", "--progress", "bar", str(task)), live=True) != 0:
        return 1
    proxy.wait_idle()
    ok = all(
        device.parts[part].read(path.stat().st_size) == path.read_bytes()
        for part, path in (("B.boot", files["boot.img"]), ("B.root", files["rootfs.img"]))
    )
    print(f"  slot B holds the images byte for byte: {ok}")
    print(
        f"  {proxy.body_bytes_total} bytes sent by the server for "
        f"{sum(e[2] for e in entries)} bytes of files"
    )
    fsck = subprocess.run(
        ["e2fsck", "-f", "-n", str(_region_file(device, "B.root", work))],
        capture_output=True,
        text=True,
        check=False,
    )
    print(f"  e2fsck of slot B's root: {'clean' if fsck.returncode == 0 else fsck.stdout}")
    print(f"  reboot requested: systemctl reboot {harness.reboot_requests()[-1]!r}")

    step("3. the same task again (a duplicate push): nothing fetched, nothing done")
    before = proxy.body_bytes_total
    show(device.command("install", str(task)))
    print(f"  bytes fetched: {proxy.body_bytes_total - before}")

    step("4. the reboot: the firmware tries slot B once; the health check commits it")
    print(f"  the firmware booted slot {harness.boot()} (tryboot)")
    show(device.command("health-check"))
    show(device.command("status"))
    print(f"  after a plain reset the device runs slot {harness.boot()}")
    booted_before = {k: v for k, v in device.snapshot().items() if k.startswith("B.")}

    step("5. a task whose rootfs digest is wrong: refused, step -3")
    bad = [(n, u, s, ("0" * 64 if n == "rootfs.img" else d)) for n, u, s, d in entries]
    bad_push = task_for(bad, version="a2b2c2")
    bad_data = bad_push["data"]
    assert isinstance(bad_data, dict)
    bad_data["extData"] = {"versions": {"boot.img": "a2", "rootfs.img": "b2", "app.conf": "c2"}}
    bad_task = device.task_file(bad_push, "bad-task.json")
    show(device.command("install", "--progress", "json", str(bad_task)))
    untouched = {k: v for k, v in device.snapshot().items() if k.startswith("B.")} == booted_before
    print(f"\n  the running slot B was never written: {untouched}")
    shutil.rmtree(health, ignore_errors=True)
    return 0 if ok and untouched else 1


def _region_file(device: Device, part: str, work: Path) -> Path:
    """A copy of one part as a file, for e2fsck (which wants a whole device or file)."""
    out = work / f"{part}.copy"
    out.write_bytes(device.parts[part].read())
    return out


if __name__ == "__main__":
    sys.exit(main())
