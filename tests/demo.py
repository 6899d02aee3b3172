"""``make demo``: a signed update on this machine, with no Raspberry Pi.

A stand-in A/B disk on loop devices, a private nginx over HTTPS with a test CA, and our
fault-injecting proxy in front of it. Then, the production path end to end:

0. the vendor: a key pair (``rpi-updater keygen``), its public key in the device's root-owned
   keyring, and a package (``rpi-updater bundle``: the files, the signed ``manifest.json``, the
   ``task.json`` to publish) uploaded to the server; the device refuses unsigned packages;
1. the plan: the manifest fetched and verified, every check before the first byte is written;
2. the install through a link that is cut three times: it resumes, the slot is byte-identical;
3. the same task again: nothing is fetched;
4. the reboot, the health check commits, the combined version from the signed manifest;
5. a forged package (another rootfs, its manifest entry and the task edited to match): refused
   with exit 4 and step -3 before the download, both slots untouched.

Needs root: loop devices, and the keyring and the health checks must be root-owned all the way
up (a directory under /run here, as on a device). Everything is cleaned up at the end.
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
from pathlib import Path

from tests.harness import Fault, FaultProxy, LoopDevices, Nginx, make_tls_files
from tests.harness.device import BOARD_MODEL, Device, MiB, build_device
from tests.harness.reboot import RebootHarness

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")
REPO = Path(__file__).resolve().parent.parent
BOARD = BOARD_MODEL.rsplit(" Rev ", 1)[0]  # vendors list models; every revision matches
KEY_NAME = "vendor-2026"


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
    missing = [b for b in ("mkfs.vfat", "mcopy", "mke2fs") if shutil.which(b) is None]
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
            ):
                return run_demo(work, trusted, nginx, proxy, loops)
    finally:
        shutil.rmtree(trusted, ignore_errors=True)


def run_demo(work: Path, trusted: Path, nginx: Nginx, proxy: FaultProxy, loops: LoopDevices) -> int:
    started = time.monotonic()
    step("a stand-in Raspberry Pi: slot A boots, slot B is free")
    device = build_device(
        work / "device", loops=loops, ca_file=nginx.ca_file, boot_size=8 * MiB, root_size=32 * MiB
    )
    for name, region in device.parts.items():
        print(f"  {name:7} {region.size // MiB:3} MiB  {region.path}")
    print(f"  kernel command line: {(device.root / 'cmdline').read_text().strip()}")
    print(f"  board model:         {BOARD_MODEL}")
    (device.etc / "app.conf").write_text("mode = factory\n")
    harness = RebootHarness(device, "tryboot")
    harness.configure("now")
    health = trusted / "health.d"
    health.mkdir(mode=0o755)
    (health / "10-app").write_text("#!/bin/sh\necho checking the app; exit 0\n")
    (health / "10-app").chmod(0o755)
    keyring = trusted / "keyring"
    keyring.mkdir(mode=0o755)
    # The production default: no security.allow_unsigned, a package must be signed by a key
    # in the keyring, for this board.
    device.write_config(
        security={"keyring": str(keyring)},
        health={"system_running": False, "directory": str(health)},
    )
    config = device.config_path.relative_to(work)

    def on_device(*args: str) -> list[str]:
        return rpi_updater("--config", str(config), *args)

    step("0. the vendor: a signing key, the device's keyring, a signed package")
    if show(rpi_updater("keygen", "--out", "keys", "--name", KEY_NAME), work) != 0:
        return 1
    shutil.copy(work / "keys" / f"{KEY_NAME}.pub", keyring / f"{KEY_NAME}.pub")
    (keyring / f"{KEY_NAME}.pub").chmod(0o644)
    print(f"  on the device: {keyring}/{KEY_NAME}.pub  (root-owned, 0755 all the way up)")
    print(f"  its config:    security: {{keyring: {keyring}}}  (unsigned packages refused)")
    build = work / "build"
    build.mkdir()
    make_boot_image(build, 8 * MiB)
    make_root_image(build, 24 * MiB)
    (build / "app.conf").write_text("mode = production\n")
    bundle = rpi_updater(
        "bundle",
        "--key",
        f"keys/{KEY_NAME}.key",
        "--out",
        "pkg",
        "--version",
        "a1b1c1",
        "--board",
        BOARD,
        "--base-url",
        proxy.url("pkg"),
        "build/boot.img=boot=a1",
        "build/rootfs.img=rootfs=b1",
        "build/app.conf=config=c1",
    )
    if show(bundle, work) != 0:
        return 1
    pkg = work / "pkg"
    shutil.copytree(pkg, nginx.root / "pkg")  # the upload
    task_path = pkg / "task.json"
    task = json.loads(task_path.read_text())
    files = task["data"]["files"]
    served = {f["fileName"]: f["fileSize"] for f in files}
    print(f"\n  uploaded; the task to publish ({task_path.relative_to(work)}), manifest first:")
    for f in files:
        print(f"  {DIM}  {f['fileName']:14}{f['fileSize']:>10} bytes  {f['fileUrl']}{RESET}")
    envelope = json.loads((pkg / "manifest.json").read_bytes())
    body = json.loads(base64.b64decode(envelope["payload"]))
    signer = envelope["signatures"][0]["keyid"]
    print(f"  manifest.json: signed by key {signer}, for the boards {body['boards']}:")
    for f in body["files"]:
        how = f"  (served {f['encoding']})" if f.get("encoding") else ""
        print(
            f"  {DIM}  {f['name']:14}{f['size']:>10} bytes  sha256 {f['sha256'][:16]}...  "
            f"{f['target']} {f['version']}{how}{RESET}"
        )

    step("1. the plan: the manifest fetched and verified, every check before a byte is written")
    show(on_device("install", "--dry-run", "pkg/task.json"), work)

    step("2. install through a link that drops three times; arm slot B; reboot")
    size = served["rootfs.img"]  # the bytes on the wire (compressed, if the bundle did)
    proxy.script(
        Fault(),  # manifest.json
        Fault(),  # boot.img
        Fault(cut_after=size // 4),
        Fault(reset_after=size // 3),
        Fault(stall_after=size // 5, stall_seconds=3),
    )
    before = proxy.body_bytes_total
    if show(on_device("install", "--progress", "bar", "pkg/task.json"), work, live=True) != 0:
        return 1
    proxy.wait_idle()
    ok = all(
        device.parts[part].read(path.stat().st_size) == path.read_bytes()
        for part, path in (("B.boot", build / "boot.img"), ("B.root", build / "rootfs.img"))
    )
    print(f"  slot B holds the images byte for byte: {ok}")
    print(
        f"  {proxy.body_bytes_total - before} bytes sent by the server for "
        f"{sum(f['fileSize'] for f in files)} bytes of files (the manifest included)"
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
    show(on_device("install", "pkg/task.json"), work)
    print(f"  bytes fetched: {proxy.body_bytes_total - before}")

    step("4. the reboot: the firmware tries slot B once; the health check commits it")
    print(f"  the firmware booted slot {harness.boot()} (tryboot)")
    show(on_device("health-check"), work)
    show(on_device("status"), work)
    print(f"  after a plain reset the device runs slot {harness.boot()}")

    step("5. a forged package: refused before the download, step -3")
    print(
        "  someone who can upload files and publish tasks, but has no key: rootfs.img swapped,\n"
        "  its manifest entry and the task edited to match, the vendor's signature kept"
    )
    forged = forge(work, nginx, proxy, task, envelope)
    snapshot = device.snapshot()
    before = proxy.body_bytes_total
    code = show(on_device("install", "--progress", "json", forged.name), work)
    proxy.wait_idle()
    untouched = device.snapshot() == snapshot
    status = json.loads(device.run("status", "--json").stdout)
    print(f"\n  bytes fetched: {proxy.body_bytes_total - before} (the manifest, no payload)")
    print(f"  slots A and B untouched: {untouched}")
    print(
        f"  the device still runs slot {status['booted']}, version {status['versions']['combined']}"
    )
    print(f"\n{DIM}demo done in {time.monotonic() - started:.1f} s{RESET}")
    return 0 if ok and untouched and code == 4 else 1


def forge(
    work: Path,
    nginx: Nginx,
    proxy: FaultProxy,
    task: dict[str, object],
    envelope: dict[str, object],
) -> Path:
    """The package as an attacker without the key would make it: another rootfs.img, the
    manifest's payload and the task changed to match it, the signature left as it was."""
    rootfs = bytearray((work / "pkg" / "rootfs.img").read_bytes())
    tail = min(MiB, len(rootfs) // 2)
    rootfs[-tail:] = os.urandom(tail)  # "a backdoor"
    served = nginx.root / "forged"
    shutil.copytree(work / "pkg", served)
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
