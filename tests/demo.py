"""``make demo``: the whole update flow on this machine, with no Raspberry Pi.

The device's A/B disk image as ``image-recipes/make-ab-image.sh`` builds it for a fleet, its
slot partitions attached as loop devices, a private nginx over HTTPS (test CA) with our
fault-injecting proxy in front of it, a private mosquitto (TLS, passwords, an ACL) standing in
for the IoT Platform, and the updater as the daemon it is on a device. Then:

0. the vendor: a key pair (``rpi-updater keygen``), its public key in the device's root-owned
   keyring, and a signed three-file package (``rpi-updater bundle``: boot a1, rootfs b1,
   config c1) uploaded to the server;
1. the device comes up: the daemon connects and informs its version, a0b0c0;
2. the platform pushes the update; the download goes through a link that drops; the platform
   sees the progress; slot B is armed and a reboot asked for;
3. the reboot: the firmware tries slot B once, the health check at boot commits it, and the
   daemon informs a1b1c1;
4. a second update (a2b2c2) whose health check fails: the trial boot is rolled back, the
   platform hears why (step -1), the device runs a1b1c1 again;
5. a forged package (the files and the task edited, the signature kept): refused before the
   download with step -3, the slots untouched;

and what the platform received, message by message. Needs root: loop devices, and the keyring
and the health checks must be root-owned all the way up (a directory under /run here, as on a
device). Everything is cleaned up at the end.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.harness import (
    Fault,
    FaultProxy,
    LoopDevices,
    Mosquitto,
    Nginx,
    Recorder,
    make_tls_files,
)
from tests.harness.device import BOARD_MODEL, Device, MiB, build_device
from tests.harness.reboot import RebootHarness

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
REPO = Path(__file__).resolve().parent.parent
BOARD = BOARD_MODEL.rsplit(" Rev ", 1)[0]  # vendors list models; every revision matches
KEY_NAME = "vendor-2026"
PK, DN = "a1B2c3D4e5F", "pi-0001"
UPGRADE = f"/ota/device/upgrade/{PK}/{DN}"


def step(title: str) -> None:
    print(f"\n{BOLD}== {title}{RESET}", flush=True)


def rpi_updater(*args: str) -> list[str]:
    """``rpi-updater ARGS`` as this checkout runs it (``python -m updater.cli``)."""
    return [sys.executable, "-m", "updater.cli", *args]


def _wrapped(words: list[str], width: int = 96) -> str:
    """A shell command line, continued with backslashes before ``width``; an option stays on
    the line of its value."""
    units: list[str] = []
    for word in (shlex.quote(w) for w in words):
        takes_value = units and units[-1].startswith("--") and " " not in units[-1]
        if takes_value and not word.startswith("-"):
            units[-1] += f" {word}"
        else:
            units.append(word)
    lines, line = [], ""
    for unit in units:
        if line and len(line) + 1 + len(unit) > width - 2:
            lines.append(line)
            line = "    " + unit
        else:
            line = f"{line} {unit}" if line else unit
    return " \\\n".join([*lines, line])


def show(cmd: list[str], cwd: Path, *, live: bool = False) -> int:
    """Run ``cmd`` in ``cwd`` and show it and its output (``live``: to the terminal, the bar)."""
    shown = _wrapped(["rpi-updater", *cmd[cmd.index("updater.cli") + 1 :]])
    print(f"{DIM}$ {shown}{RESET}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if live:
        code = subprocess.run(cmd, cwd=cwd, env=env, check=False).returncode
    else:
        result = subprocess.run(
            cmd,
            cwd=cwd,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
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
    missing = [b for b in ("mkfs.vfat", "mcopy", "mke2fs", "sfdisk") if shutil.which(b) is None]
    if missing:
        print(f"demo: needs {', '.join(missing)} (make demo installs them as root)")
        return 1
    if os.geteuid() != 0:
        print("demo: needs root (loop devices; the keyring must be root-owned)", file=sys.stderr)
        return 1
    # The device's trusted directory (keyring, health checks): root-owned and 0755 all the way
    # up, which /tmp (1777) is not.
    trusted = Path(tempfile.mkdtemp(prefix="rpi-demo-trusted-", dir="/run"))
    try:
        trusted.chmod(0o755)
        with tempfile.TemporaryDirectory(prefix="rpi-demo-") as tmp:
            work = Path(tmp)
            tls = make_tls_files(work / "tls")
            with (
                Nginx(work / "www", tls, work / "nginx") as nginx,
                LoopDevices() as loops,
                FaultProxy(nginx.plain_port, tls) as proxy,
                Mosquitto(tls, work / "mosquitto", product_key=PK, device_name=DN) as broker,
                Recorder(broker) as platform,
            ):
                return Demo(work, trusted, nginx, proxy, loops, broker, platform).run()
    finally:
        shutil.rmtree(trusted, ignore_errors=True)


class Demo:
    def __init__(
        self,
        work: Path,
        trusted: Path,
        nginx: Nginx,
        proxy: FaultProxy,
        loops: LoopDevices,
        broker: Mosquitto,
        platform: Recorder,
    ) -> None:
        self.work, self.trusted, self.nginx, self.proxy = work, trusted, nginx, proxy
        self.loops, self.broker, self.platform = loops, broker, platform
        self.daemon: subprocess.Popen[bytes] | None = None
        self.shown = 0  # platform messages printed so far

    # -- the pieces ------------------------------------------------------------------------------

    def on_device(self, *args: str) -> list[str]:
        return rpi_updater("--config", str(self.device.config_path.relative_to(self.work)), *args)

    def start_daemon(self) -> None:
        log = (self.work / "daemon.log").open("ab")
        self.daemon = subprocess.Popen(
            self.on_device("daemon"),
            cwd=self.work,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        print(f"{DIM}$ rpi-updater daemon &{RESET}   (as systemd starts it: rpi-updater.service)")

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.terminate()
            self.daemon.wait(timeout=30)
        self.daemon = None

    def received(self, until: Callable[[dict[str, Any]], bool], timeout: float = 60) -> None:
        """Print what the platform receives from the device, until a message matches."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.platform.messages()[self.shown :]:
                self.shown += 1
                if message.topic.startswith("harness/") or message.topic == UPGRADE:
                    continue
                payload = json.loads(message.payload)
                params = payload.get("params", {})
                kind = message.topic.split("/")[3] if message.topic.startswith("/ota") else "get"
                print(f"  {BOLD}platform <- {kind:8}{RESET} {json.dumps(params)}")
                if until({"kind": kind, **params}):
                    return
            if time.monotonic() >= deadline:
                if timeout == 0:
                    return
                raise SystemExit(
                    f"demo: the platform heard nothing more; see {self.work}/daemon.log"
                )
            time.sleep(0.05)

    def push(self, task_path: Path) -> None:
        task = json.loads(task_path.read_text())
        print(
            f"  {BOLD}platform -> upgrade{RESET}  version {task['data']['version']}, "
            f"{len(task['data']['files'])} files ({task_path.relative_to(self.work)})"
        )
        self.platform.publish(UPGRADE, task)

    def wait_reboot_request(self) -> None:
        deadline = time.monotonic() + 20
        while not self.harness.reboot_requests():
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: no reboot was asked for; see {self.work}/daemon.log")
            time.sleep(0.05)

    def drain(self) -> None:
        """Print what the platform received meanwhile (a moment for the last messages)."""
        time.sleep(0.3)
        self.received(lambda m: False, timeout=0)

    def reboot(self, why: str) -> str:
        self.drain()
        requests = self.harness.reboot_requests()
        if requests:
            argument = f" {requests[-1]!r}" if requests[-1] else ""
            print(f"  reboot requested: systemctl reboot{argument}")
        self.stop_daemon()
        slot = self.harness.boot()
        print(f"  {BOLD}-- reboot ({why}): the firmware booted slot {slot}{RESET}")
        return slot

    # -- the story -------------------------------------------------------------------------------

    def run(self) -> int:
        started = time.monotonic()
        try:
            ok = self.story()
        finally:
            self.stop_daemon()
        print(f"\n{DIM}demo done in {time.monotonic() - started:.1f} s{RESET}")
        return 0 if ok else 1

    def story(self) -> bool:
        work = self.work
        step("a stand-in Raspberry Pi: the A/B disk image, slot A runs version a0b0c0")
        disk = self.make_disk()
        self.device = device = build_device(
            work / "device", loops=self.loops, ca_file=self.nginx.ca_file, disk=disk
        )
        print("  its slot partitions, attached as loop devices (what the kernel would show):")
        for name, region in device.parts.items():
            print(f"  {name:7} {region.size // MiB:3} MiB  {region.path}")
        print(f"  kernel command line: {(device.root / 'cmdline').read_text().strip()}")
        print(f"  board model:         {BOARD_MODEL}")
        (device.etc / "app.conf").write_text("mode = factory\n")
        self.harness = RebootHarness(device, "tryboot")
        self.harness.configure("now")
        health = self.trusted / "health.d"
        health.mkdir(mode=0o755)
        (health / "10-app").write_text("#!/bin/sh\necho checking the app; exit 0\n")
        (health / "10-app").chmod(0o755)
        keyring = self.trusted / "keyring"
        keyring.mkdir(mode=0o755)
        identity = work / "identity.yaml"
        identity.write_text(
            f"product_key: {PK}\ndevice_name: {DN}\n"
            f"username: {self.broker.device_user}\npassword: {self.broker.device_password}\n"
        )
        identity.chmod(0o600)
        # The production defaults: a package must be signed by a key in the keyring, for this
        # board; TLS verified against the broker's CA.
        device.write_config(
            security={"keyring": str(keyring)},
            health={"system_running": False, "directory": str(health)},
            mqtt={
                "host": self.broker.host,
                "port": self.broker.port,
                "ca_file": str(self.broker.ca_file),
                "login": "plain",
                "identity_file": str(identity),
                "keepalive": 30,
                "reconnect_max": 1,
            },
            factory_versions={"boot": "a0", "rootfs": "b0", "config": "c0"},
        )
        print(f"  the platform: mosquitto on {self.broker.host}:{self.broker.port} (TLS, ACL)")

        step("0. the vendor: a signing key, the device's keyring, a signed package")
        if show(rpi_updater("keygen", "--out", "keys", "--name", KEY_NAME), work) != 0:
            return False
        shutil.copy(work / "keys" / f"{KEY_NAME}.pub", keyring / f"{KEY_NAME}.pub")
        (keyring / f"{KEY_NAME}.pub").chmod(0o644)
        print(f"  on the device: {keyring}/{KEY_NAME}.pub  (root-owned, 0755 all the way up)")
        first = self.package("1", "production")
        print(f"  uploaded to {self.proxy.url('pkg1')}/")

        step("1. the device comes up: the daemon connects and informs its version")
        self.start_daemon()
        self.received(lambda m: m["kind"] == "get")

        step("2. the platform pushes a1b1c1; the link drops twice; slot B is armed")
        served = json.loads((first / "task.json").read_text())["data"]["files"]
        size = next(f["fileSize"] for f in served if f["fileName"] == "rootfs.img")
        self.proxy.script(
            Fault(),  # manifest.json
            Fault(),  # boot.img
            Fault(cut_after=size // 3),
            Fault(reset_after=size // 3),
        )
        self.push(first / "task.json")
        self.received(lambda m: m["kind"] == "progress" and int(m["step"]) in (100, -1, -2, -3, -4))
        self.wait_reboot_request()
        build = work / "build1"
        ok = all(
            device.parts[part].read(path.stat().st_size) == path.read_bytes()
            for part, path in (("B.boot", build / "boot.img"), ("B.root", build / "rootfs.img"))
        )
        print(f"  slot B holds the images byte for byte: {ok}")

        step("3. the reboot: slot B on trial, the health check at boot commits it")
        if self.reboot("into the trial") != "B":
            return False
        show(self.on_device("health-check"), work)
        self.start_daemon()
        self.received(lambda m: m["kind"] == "inform" and m.get("version") == "a1b1c1")

        step("4. a2b2c2, whose app does not start: the trial is rolled back")
        (health / "20-app").write_text("#!/bin/sh\necho the app does not answer >&2; exit 1\n")
        (health / "20-app").chmod(0o755)
        second = self.package("2", "broken")
        self.proxy.script()
        self.push(second / "task.json")
        self.received(lambda m: m["kind"] == "progress" and int(m["step"]) in (100, -1, -2, -3, -4))
        self.wait_reboot_request()
        if self.reboot("into the trial") != "A":
            return False
        show(self.on_device("health-check"), work)
        rolled = self.reboot("back to the committed slot")
        self.start_daemon()
        self.received(lambda m: m["kind"] == "progress" and int(m["step"]) < 0)
        self.received(lambda m: m["kind"] == "inform")
        (health / "20-app").unlink()

        step("5. a forged package: refused before the download, step -3")
        print(
            "  rootfs.img swapped, its manifest entry and the task edited to match, the vendor's\n"
            "  signature kept: what someone with the bucket and the topic but no key can do"
        )
        task = json.loads((first / "task.json").read_text())
        envelope = json.loads((first / "manifest.json").read_bytes())
        forged = forge(work, first, self.nginx, self.proxy, task, envelope)
        snapshot = device.snapshot()
        self.push(forged)
        self.received(lambda m: m["kind"] == "progress" and int(m["step"]) < 0)
        untouched = device.snapshot() == snapshot
        print(f"  slots A and B untouched: {untouched}")
        status = json.loads(device.run("status", "--json").stdout)
        print(
            f"  the device runs slot {status['booted']}, version {status['versions']['combined']}"
        )
        return ok and rolled == "B" and untouched and status["versions"]["combined"] == "a1b1c1"

    def make_disk(self) -> Path:
        """The device's disk, as image-recipes/make-ab-image.sh builds it for a fleet."""
        boot, tree = self.work / "image" / "boot", self.work / "image" / "rootfs"
        boot.mkdir(parents=True)
        (boot / "config.txt").write_text("arm_64bit=1\n")
        (boot / "cmdline.txt").write_text("console=serial0,115200 root=/dev/mmcblk0p2 rootwait\n")
        (boot / "kernel8.img").write_bytes(os.urandom(MiB))  # a stand-in kernel
        (tree / "etc").mkdir(parents=True)
        (tree / "etc" / "os-release").write_text('PRETTY_NAME="demo rootfs b0"\n')
        image = self.work / "image" / "disk.img"
        cmd = [
            str(REPO / "image-recipes" / "make-ab-image.sh"),
            "--boot", "image/boot", "--rootfs", "image/rootfs", "--out", "image/disk.img",
            "--autoboot-size", "40", "--boot-size", "40", "--root-size", "32",
            "--data-size", "16",
        ]  # fmt: skip
        print(f"{DIM}$ {_wrapped(['image-recipes/make-ab-image.sh', *cmd[1:]])}{RESET}")
        result = subprocess.run(cmd, cwd=self.work, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"demo: make-ab-image.sh failed:\n{result.stderr}")
        for line in result.stdout.splitlines():
            if line.startswith(("p", "#", "/")):
                print(f"  {line}")
        return image

    def package(self, n: str, mode: str) -> Path:
        """Build and upload package ``n`` (versions an bn cn) with ``rpi-updater bundle``."""
        build = self.work / f"build{n}"
        build.mkdir()
        make_boot_image(build, 8 * MiB)
        make_root_image(build, 24 * MiB)
        (build / "app.conf").write_text(f"mode = {mode}\n")
        bundle = rpi_updater(
            "bundle",
            "--key",
            f"keys/{KEY_NAME}.key",
            "--out",
            f"pkg{n}",
            "--version",
            f"a{n}b{n}c{n}",
            "--board",
            BOARD,
            "--base-url",
            self.proxy.url(f"pkg{n}"),
            f"build{n}/boot.img=boot=a{n}",
            f"build{n}/rootfs.img=rootfs=b{n}",
            f"build{n}/app.conf=config=c{n}",
        )
        if show(bundle, self.work) != 0:
            raise SystemExit("demo: bundle failed")
        shutil.copytree(self.work / f"pkg{n}", self.nginx.root / f"pkg{n}")  # the upload
        return self.work / f"pkg{n}"


def forge(
    work: Path,
    package: Path,
    nginx: Nginx,
    proxy: FaultProxy,
    task: dict[str, object],
    envelope: dict[str, object],
) -> Path:
    """The package as an attacker without the key would make it: another rootfs.img, the
    manifest's payload and the task changed to match it, the signature left as it was."""
    rootfs = bytearray((package / "rootfs.img").read_bytes())
    tail = min(MiB, len(rootfs) // 2)
    rootfs[-tail:] = os.urandom(tail)  # "a backdoor"
    served = nginx.root / "forged"
    shutil.copytree(package, served)
    (served / "rootfs.img").write_bytes(rootfs)
    sha256 = hashlib.sha256(rootfs).hexdigest()
    payload = envelope["payload"]
    assert isinstance(payload, str)
    body = json.loads(base64.b64decode(payload))
    for f in body["files"]:
        if f["name"] == "rootfs.img":  # the digest of what is served, compressed or not
            f["encoded_sha256" if "encoded_sha256" in f else "sha256"] = sha256
            f["version"] = "b2"
    body["version"] = "a1b2c1"
    envelope = {**envelope, "payload": base64.b64encode(json.dumps(body).encode()).decode()}
    manifest = json.dumps(envelope).encode()
    (served / "manifest.json").write_bytes(manifest)
    forged = copy.deepcopy(task)
    data = forged["data"]
    assert isinstance(data, dict)
    data["version"] = "a1b2c1"
    data["extData"]["versions"]["rootfs.img"] = "b2"
    for f in data["files"]:
        f["fileUrl"] = proxy.url(f"forged/{f['fileName']}")
        if f["fileName"] == "manifest.json":
            f["fileSize"], f["fileSign"] = len(manifest), hashlib.sha256(manifest).hexdigest()
        elif f["fileName"] == "rootfs.img":
            f["fileSign"] = sha256
    forged["id"] = int(time.time() * 1000)
    path = work / "forged-task.json"
    path.write_text(json.dumps(forged, indent=1))
    return path


def _region_file(device: Device, part: str, work: Path) -> Path:
    """A copy of one part as a file, for e2fsck (which wants a whole device or file)."""
    out = work / f"{part}.copy"
    out.write_bytes(device.parts[part].read())
    return out


if __name__ == "__main__":
    sys.exit(main())
