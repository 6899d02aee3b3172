"""The whole system in a virtual machine: real U-Boot, real kernel and systemd, real reboots.

One x86-64 machine (qemu, Debian's u-boot-qemu as its firmware) boots the A/B disk that
``image-recipes/make-ab-image.sh --platform qemu-x86`` builds from a Debian 12 root with the
built rpi-ab-updater package in it. The platform is mosquitto and nginx on this host's loopback,
which the guest reaches only through qemu's user network (10.0.2.2). The scenarios run in order
on the same machine, as one device lives them:

1. a signed three-file update (boot a1, rootfs b1, app.conf c1): downloaded by the updater in
   the guest, slot B armed in the U-Boot environment, a real reboot, U-Boot boots B as a trial,
   the health check at boot commits it, the platform hears ``a1b1c1``;
2. a package whose health check fails: the trial boot of slot A fails its check, the updater
   marks it bad and reboots, U-Boot boots B again, the platform hears step -1 and why;
3. a package whose root cannot boot (its /sbin/init exits: a kernel panic, panic=5 reboots):
   U-Boot counts the trial boots, rolls back to B past bootlimit, and the updater on B reports
   the failure;
4. a power cut (qemu killed) in the middle of the root file system's download: the machine
   boots again, the updater resumes the download where the journal says, and completes the
   update; a second power cut in its trial boot, before the health check: U-Boot counts a
   second trial boot, which commits;
5. a forged package (the signed manifest edited, the signature kept): refused with step -3
   after fetching only the manifest; the inactive slot untouched, no reboot.

What it does not prove: the Raspberry Pi firmware's tryboot (no VM has it; the tryboot backend
is tested against a model of its documented behaviour, tests/harness/pifirmware.py), the Pi's
hardware watchdog, and SD-card power-loss behaviour (qemu keeps what reached the virtual disk).

Run with ``make system-test`` (root, Debian's mirror for the first mmdebstrap; the root is then
cached). Each scenario has its own time limit; a failure shows the serial console.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Fault, FaultProxy, Mosquitto, Nginx, Recorder, make_tls_files, require
from tests.harness.debroot import Built, build_package
from tests.harness.mosquitto import Seen
from tests.system.conftest import CONSOLES
from tests.system.image import (
    BOARD,
    HOST_IP,
    MODEL_FILE,
    Layout,
    VmTree,
    build_tree,
    host_runs,
    make_disk,
    make_package,
    panic_init,
    partition,
)
from tests.system.vm import VM
from updater.bundle import write_key_pair

PK, DN = "a1B2c3D4e5F", "vm-0001"
MiB = 1 << 20
TOPIC = {kind: f"/ota/device/{kind}/{PK}/{DN}" for kind in ("inform", "upgrade", "progress")}
KEY_NAME = "vendor-vm"
RELEASE_UNIT = "rpi-vm-release.service"
LAYOUT = Layout()
FAILED_STEPS = ("-1", "-2", "-3", "-4")
#: What boot.cmd echoes before it loads the chosen slot's kernel.
BOOTING = r"rpi-ab: booting slot ([AB]) \(boot partition \d+, trial ([01]), bootcount (\d+)/(\d+)\)"

# Time limits (TCG: a boot to the updater takes about 15-25 s; a 480 MiB root downloads,
# decompresses and verifies in the guest in about a minute).
BOOT = 180
UPDATE = 600


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    work: Path
    built: Built
    nginx: Nginx
    proxy: FaultProxy
    broker: Mosquitto
    platform: Recorder
    tree: VmTree
    disk: Path
    key: Path
    vm: VM | None = None
    seen: int = 0  # platform messages consumed by earlier scenarios
    packages: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- the machine --------------------------------------------------------------------------

    def power_on(self) -> VM:
        vm = VM(self.disk, log=self.work / "console.log")
        CONSOLES["the device"] = vm
        self.vm = vm.start()
        return vm

    @property
    def machine(self) -> VM:
        assert self.vm is not None, "the machine is off"
        return self.vm

    def booted(self, slot: str, *, trial: bool, timeout: float = BOOT) -> str:
        """Wait for U-Boot's choice of the next boot; the line is returned."""
        match = self.machine.expect(
            BOOTING,
            timeout,
            what=f"U-Boot booting slot {slot}",
        )
        assert (match.group(1), match.group(2)) == (slot, "1" if trial else "0"), (
            f"U-Boot booted {match.group(0)!r}; expected slot {slot}, trial {int(trial)}"
        )
        return match.group(0)

    def running(self, release: str, device: str, timeout: float = BOOT) -> None:
        """The root file system ``release`` (its /etc/rpi-vm-release) runs, mounted from
        ``device``: the slot's partition really holds the package's root."""
        match = self.machine.expect(
            r"rpi-vm-release: (\S+) on (\S+)", timeout, what=f"release {release} running"
        )
        assert match.groups() == (release, device), (
            f"running {match.group(1)} from {match.group(2)}; expected {release} from {device}"
        )

    # -- the platform ---------------------------------------------------------------------------

    def messages(self) -> list[Seen]:
        return [m for m in self.platform.messages() if m.topic.startswith("/ota/device/")]

    def wait(
        self, predicate: Callable[[str, dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        """The next platform message (after those consumed) that ``predicate(kind, params)``
        accepts; the ones before it are consumed too."""
        deadline = time.monotonic() + timeout
        while True:
            messages = self.messages()
            for i in range(self.seen, len(messages)):
                kind = messages[i].topic.split("/")[3]
                params: dict[str, Any] = messages[i].json().get("params", {})
                if predicate(kind, params):
                    self.seen = i + 1
                    return params
            if time.monotonic() > deadline:
                tail = "\n".join(
                    f"  {m.topic} {m.payload[:300]!r}" for m in messages[self.seen :][-20:]
                )
                raise AssertionError(
                    f"the platform heard no {what} within {timeout} s; since the last one:\n"
                    f"{tail or '  nothing'}"
                )
            if self.vm is not None and self.vm.returncode is not None:
                raise AssertionError(f"qemu exited ({self.vm.returncode}) while waiting for {what}")
            time.sleep(0.2)

    def failure(self, version: str, timeout: float = BOOT) -> dict[str, Any]:
        """The failure report of ``version``: a progress message with step -1 (the trial
        failed), its params returned for the ``desc``."""
        params = self.wait(
            lambda k, p: k == "progress" and p.get("step") in FAILED_STEPS,
            timeout,
            f"the failure of {version}",
        )
        assert params["step"] == "-1", params
        return params

    def reported_once(self, start: int) -> None:
        """Since message ``start``: one failure report, however many boots the failure took."""
        time.sleep(2)  # a second report would follow the first at once (the outbox flush)
        failed = [p for p in self.progress_between(start, None) if p["step"] in FAILED_STEPS]
        assert len(failed) == 1, f"the failure was reported {len(failed)} times: {failed}"

    def inform(self, version: str, timeout: float = BOOT) -> None:
        self.wait(
            lambda k, p: k == "inform" and p.get("version") == version,
            timeout,
            f"inform of version {version}",
        )

    def progress_between(self, start: int, end: int | None) -> list[dict[str, Any]]:
        return [
            m.json().get("params", {})
            for m in self.messages()[start:end]
            if m.topic == TOPIC["progress"]
        ]

    def push(self, name: str) -> int:
        """Publish package ``name``'s task on the device's upgrade topic; returns the index of
        the first message the device sends after it."""
        start = len(self.messages())
        self.platform.publish(TOPIC["upgrade"], self.packages[name])
        return start

    # -- packages -------------------------------------------------------------------------------

    def landed(self, name: str, part: int) -> bool:
        """Whether package ``name``'s boot.img is on partition ``part`` of the disk, byte for
        byte (the boot partitions are not mounted in the guest, so nothing changes them)."""
        image = (self.work / f"build-{name}" / "images" / "boot.img").read_bytes()
        return partition(self.disk, part, len(image)) == image

    def package(
        self,
        name: str,
        versions: tuple[str, str, str],
        *,
        rootfs: Path | None = None,
        root_mib: int = LAYOUT.root,
        via_proxy: bool = False,
    ) -> dict[str, Any]:
        """Build, sign and upload package ``name`` from the current tree (or ``rootfs``)."""
        build = self.work / f"build-{name}"
        build.mkdir()
        app_conf = build / "app.conf"
        app_conf.write_text(f"# app configuration {versions[2]}\nmode = {name}\n")
        out = self.work / f"pkg-{name}"
        port = self.proxy.port if via_proxy else self.nginx.port
        task = make_package(
            boot=self.tree.boot,
            rootfs=rootfs or self.tree.path,
            out=out,
            key=self.key,
            base_url=f"https://{HOST_IP}:{port}/{name}",
            versions=versions,
            app_conf=app_conf,
            root_mib=root_mib,
            layout=LAYOUT,
            images=build / "images",
        )
        shutil.copytree(out, self.nginx.root / name)  # the upload
        self.packages[name] = task
        return task


def _guest_config(broker: Mosquitto) -> dict[str, object]:
    """/etc/rpi-updater/config.yaml of the device: the production defaults (signatures, TLS
    verification, no downgrades) and the U-Boot backend."""
    return {
        "state_dir": "/data/rpi-updater",
        "slots": {
            "A": {"boot": "PARTUUID=1234abcd-02", "root": "PARTUUID=1234abcd-05"},
            "B": {"boot": "PARTUUID=1234abcd-03", "root": "PARTUUID=1234abcd-06"},
        },
        "targets": [
            {"name": "boot", "match": "boot.img", "slot_part": "boot"},
            {"name": "rootfs", "match": "rootfs.img", "slot_part": "root"},
            {"name": "app-config", "match": "app.conf", "file": "/data/app/app.conf"},
        ],
        "download": {"ca_file": "/etc/rpi-updater/ca.pem", "backoff_max": 5},
        "system": {"model": MODEL_FILE},
        "security": {"keyring": "/etc/rpi-updater/keyring"},
        "bootloader": {"type": "uboot", "fw_env_config": "/etc/fw_env.config", "bootlimit": 3},
        "reboot": {"policy": "now"},
        "health": {"timeout": 120},
        "mqtt": {
            "host": HOST_IP,
            "port": broker.port,
            "ca_file": "/etc/rpi-updater/ca.pem",
            "login": "plain",
            "identity_file": "/etc/rpi-updater/identity.yaml",
            "keepalive": 30,
            "reconnect_max": 5,
        },
        "factory_versions": {"boot": "a0", "rootfs": "b0", "app-config": "c0"},
    }


def _guest_files(ca_file: Path, broker: Mosquitto, pub: Path) -> dict[str, tuple[str | bytes, int]]:
    console = "[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n"
    return {
        "/etc/hostname": ("vm-0001\n", 0o644),
        "/etc/fstab": (
            "# the firmware partition (boot.scr, uboot.env) and the data partition: both slots\n"
            "PARTUUID=1234abcd-01 /boot/firmware vfat defaults 0 0\n"
            "PARTUUID=1234abcd-07 /data ext4 defaults 0 2\n",
            0o644,
        ),
        "/etc/systemd/network/10-qemu.network": (
            "[Match]\nType=ether\n\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n",
            0o644,
        ),
        # The updater's log on the serial console too (the test reads it there).
        "/etc/systemd/system/rpi-updater.service.d/console.conf": (console, 0o644),
        "/etc/systemd/system/rpi-updater-health.service.d/console.conf": (console, 0o644),
        "/etc/rpi-updater/identity.yaml": (
            f"product_key: {PK}\ndevice_name: {DN}\n"
            f"username: {broker.device_user}\npassword: {broker.device_password}\n",
            0o600,
        ),
        "/etc/rpi-updater/ca.pem": (ca_file.read_bytes(), 0o644),
        f"/etc/rpi-updater/keyring/{KEY_NAME}.pub": (pub.read_bytes(), 0o644),
        MODEL_FILE: (BOARD + "\n", 0o644),
        "/etc/rpi-updater/health.d/10-app": (
            "#!/bin/sh\n# the app's configuration must be there\n"
            "test -r /data/app/app.conf || { echo 'no /data/app/app.conf' >&2; exit 1; }\n",
            0o755,
        ),
        "/etc/rpi-vm-release": ("b0\n", 0o644),
        # Which root file system runs, from which partition: the test reads it on the console.
        f"/etc/systemd/system/{RELEASE_UNIT}": (
            "[Unit]\nDescription=Say which root file system runs (the system test reads it)\n"
            "After=local-fs.target\n\n[Service]\nType=oneshot\n"
            "ExecStart=/bin/sh -c 'echo \"rpi-vm-release: $(cat /etc/rpi-vm-release)"
            " on $(findmnt -no SOURCE /)\"'\n"
            "StandardOutput=journal+console\n\n[Install]\nWantedBy=multi-user.target\n",
            0o644,
        ),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    for tool in ("qemu-system-x86_64", "mmdebstrap", "mkimage", "mkenvimage", "sfdisk"):
        require(shutil.which(tool) is not None, f"{tool} not installed (`make deps`)")
    require(Path("/usr/lib/u-boot/qemu-x86/u-boot.rom").is_file(), "u-boot-qemu not installed")
    require(os.geteuid() == 0, "building the root file system and installing the .deb needs root")
    work = tmp_path_factory.mktemp("system")
    started = time.monotonic()
    built = build_package(work / "dist")
    tls = make_tls_files(work / "tls", extra_ips=[HOST_IP])
    key, pub, _ = write_key_pair(work / "keys", KEY_NAME)  # what `rpi-updater keygen` does
    with (
        Nginx(work / "www", tls, work / "nginx") as nginx,
        FaultProxy(nginx.plain_port, tls) as proxy,
        Mosquitto(tls, work / "mosquitto", product_key=PK, device_name=DN) as broker,
        Recorder(broker) as platform,
    ):
        tree = build_tree(
            built,
            work,
            config=_guest_config(broker),
            files=_guest_files(tls.ca_file, broker, pub),
            enable=[RELEASE_UNIT],
        )
        disk = work / "disk.img"
        data = work / "data"
        (data / "app").mkdir(parents=True)  # where the app-config target's file lives
        print(make_disk(tree, disk, LAYOUT, data))
        print(f"system test: package, root and disk built in {time.monotonic() - started:.0f} s")
        world = World(work, built, nginx, proxy, broker, platform, tree, disk, key)
        try:
            yield world
        finally:
            if world.vm is not None:
                world.vm.stop()
            CONSOLES.clear()
            tree.root.remove()


# --------------------------------------------------------------------------- the scenarios


def test_0_first_boot_reports_the_factory_version(world: World) -> None:
    vm = world.power_on()
    world.booted("A", trial=False)
    world.running("b0", "/dev/vda5")
    world.inform("a0b0c0")
    vm.expect(r"Reached target.*Multi-User System", BOOT, what="multi-user.target")


def test_1_signed_update_reboots_into_the_new_slot_and_commits(world: World) -> None:
    world.tree.write("/etc/rpi-vm-release", "b1\n")
    world.package("1", ("a1", "b1", "c1"))
    active_boot = partition(world.disk, 2, LAYOUT.boot * MiB)
    start = world.push("1")
    final = world.wait(
        lambda k, p: k == "progress" and p.get("step") in ("100", *FAILED_STEPS),
        UPDATE,
        "final progress of a1b1c1",
    )
    assert final["step"] == "100", final
    world.booted("B", trial=True, timeout=BOOT)
    world.running("b1", "/dev/vda6")
    world.inform("a1b1c1")
    assert world.landed("1", 3), "slot B's boot partition is not boot.img of a1b1c1"
    assert partition(world.disk, 2, LAYOUT.boot * MiB) == active_boot, "the active slot changed"
    steps = [int(p["step"]) for p in world.progress_between(start, world.seen)]
    assert steps == sorted(set(steps)) and steps[0] >= 0, f"steps not increasing: {steps}"
    assert steps[-1] == 100, steps


def test_2_failing_health_check_goes_back_to_the_old_slot(world: World) -> None:
    world.tree.write("/etc/rpi-vm-release", "b2\n")
    world.tree.write(
        "/etc/rpi-updater/health.d/50-app",
        "#!/bin/sh\necho 'the app does not answer' >&2\nexit 1\n",
        0o755,
    )
    try:
        world.package("2", ("a2", "b2", "c2"))
    finally:
        world.tree.remove("/etc/rpi-updater/health.d/50-app")
        world.tree.write("/etc/rpi-vm-release", "b1\n")
    start = world.push("2")
    world.booted("A", trial=True, timeout=UPDATE)
    world.running("b2", "/dev/vda5")
    world.booted("B", trial=False)  # the updater marked A bad and rebooted
    world.running("b1", "/dev/vda6")
    failure = world.failure("a2b2c2")
    assert "health check failed" in failure["desc"], failure
    assert "the app does not answer" in failure["desc"], failure
    world.inform("a1b1c1")
    world.reported_once(start)


def test_3_root_that_panics_is_rolled_back_by_the_boot_counter(
    world: World, tmp_path: Path
) -> None:
    init = panic_init("rpi-ab-vm: this root file system cannot boot\n")
    probe = host_runs(init, tmp_path)
    assert probe.returncode == 1 and b"cannot boot" in probe.stdout, probe
    broken = tmp_path / "broken-root"
    # The mount points the initramfs moves /dev, /proc, /sys and /run onto: without them it
    # stops before the switch ("No init found") instead of starting this init.
    for mount_point in ("dev", "proc", "sys", "run", "sbin"):
        (broken / mount_point).mkdir(parents=True)
    (broken / "sbin" / "init").write_bytes(init)
    (broken / "sbin" / "init").chmod(0o755)
    world.package("3", ("a3", "b3", "c3"), rootfs=broken, root_mib=16)
    start = world.push("3")
    vm = world.machine
    for count in (1, 2, 3):
        line = world.booted("A", trial=True, timeout=UPDATE if count == 1 else BOOT)
        assert f"bootcount {count}/3" in line, line
        vm.expect(r"rpi-ab-vm: this root file system cannot boot", BOOT, what="the broken init")
        vm.expect(r"Kernel panic - not syncing: Attempted to kill init", BOOT, what="the panic")
    vm.expect(r"rpi-ab: slot A failed 3 trial boots: rolling back", BOOT, what="the rollback")
    world.booted("B", trial=False)
    world.running("b1", "/dev/vda6")
    failure = world.failure("a3b3c3")
    assert "came back on slot B" in failure["desc"], failure
    world.inform("a1b1c1")
    world.reported_once(start)


def test_4_power_cuts_during_the_download_and_the_trial_boot_are_survived(world: World) -> None:
    world.tree.write("/etc/rpi-vm-release", "b4\n")
    task = world.package("4", ("a4", "b4", "c4"), via_proxy=True)
    rootfs = next(f for f in task["data"]["files"] if f["fileName"] == "rootfs.img")
    cut_at = rootfs["fileSize"] // 2
    # manifest.json, boot.img, then rootfs.img stalls half-way: the plug is pulled there.
    world.proxy.clear()
    world.proxy.script(Fault(), Fault(), Fault(stall_after=cut_at, stall_seconds=600))
    world.push("4")
    deadline = time.monotonic() + UPDATE
    while not any(
        r.path.endswith("rootfs.img") and r.body_bytes >= cut_at for r in world.proxy.requests
    ):
        assert time.monotonic() < deadline, f"rootfs.img never got half-way: {world.proxy.requests}"
        time.sleep(0.5)
    time.sleep(3)  # what the guest had in flight lands on its virtual disk, or does not
    world.machine.power_cut()
    before = len(world.proxy.requests)

    world.power_on()
    world.booted("B", trial=False)  # nothing armed yet: the power went mid-download
    line = world.booted("A", trial=True, timeout=UPDATE)
    assert "bootcount 1/3" in line, line
    world.running("b4", "/dev/vda5")
    # Again, in the trial boot before its health check: U-Boot counts a second trial boot, and
    # that one commits (a reset during the check is not a failed trial, up to bootlimit).
    world.machine.power_cut()
    world.power_on()
    line = world.booted("A", trial=True)
    assert "bootcount 2/3" in line, line
    world.running("b4", "/dev/vda5")
    world.inform("a4b4c4")
    assert world.landed("4", 2), "slot A's boot partition is not boot.img of a4b4c4"
    resumed = [r for r in world.proxy.requests[before:] if r.path.endswith("rootfs.img")]
    assert resumed, "rootfs.img was not requested again after the power cut"
    first = resumed[0].headers.get("range") or resumed[0].headers.get("Range") or ""
    assert first.startswith("bytes="), f"the download started over: {resumed[0].headers}"
    offset = int(first.removeprefix("bytes=").split("-")[0])
    assert 0 < offset <= cut_at, f"resumed at {offset}, the cut was at {cut_at}"
    # What was fetched twice: at most what lies after the last durable checkpoint (64 MiB of
    # image, download.fsync_interval; fewer bytes compressed).
    assert cut_at - offset <= 64 * MiB, f"{cut_at - offset} bytes fetched again"
    print(
        f"power cut at byte {cut_at} of {rootfs['fileSize']} of rootfs.img (zstd); resumed at "
        f"{offset}: {cut_at - offset} bytes fetched twice"
    )


def test_5_a_forged_package_is_refused_before_anything_is_written(world: World) -> None:
    """Package a4b4c4 as someone with the bucket and the topic but not the key would change it:
    another rootfs.img, the signed manifest's digest edited to match, the signature kept. The
    installed package's defaults (signatures required, the keyring in /etc) refuse it: step -3,
    only the manifest fetched, the inactive slot untouched, no reboot."""
    genuine = world.nginx.root / "4"
    forged = world.nginx.root / "5"
    shutil.copytree(genuine, forged)
    backdoor = b"a root file system with a backdoor\n"
    (forged / "rootfs.img").write_bytes(backdoor)
    digest = hashlib.sha256(backdoor).hexdigest()
    envelope = json.loads((genuine / "manifest.json").read_bytes())
    body = json.loads(base64.b64decode(envelope["payload"]))
    for entry in body["files"]:
        if entry["name"] == "rootfs.img":
            entry.update(size=len(backdoor), sha256=digest, version="b5")
            for key in ("encoding", "encoded_size", "encoded_sha256"):
                entry.pop(key, None)
    body["version"] = "a4b5c4"
    envelope["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    manifest = json.dumps(envelope).encode()
    (forged / "manifest.json").write_bytes(manifest)
    task = copy.deepcopy(world.packages["4"])
    task["id"] = int(time.time() * 1000)
    task["data"]["version"] = "a4b5c4"
    task["data"]["extData"]["versions"]["rootfs.img"] = "b5"
    for entry in task["data"]["files"]:
        entry["fileUrl"] = f"https://{HOST_IP}:{world.proxy.port}/5/{entry['fileName']}"
        if entry["fileName"] == "manifest.json":
            entry["fileSize"], entry["fileSign"] = (
                len(manifest),
                hashlib.sha256(manifest).hexdigest(),
            )
        elif entry["fileName"] == "rootfs.img":
            entry["fileSize"], entry["fileSign"] = len(backdoor), digest
    world.packages["5"] = task
    inactive_boot = partition(world.disk, 3, LAYOUT.boot * MiB)  # slot B's, after scenario 4
    boots = world.machine.boots
    world.proxy.clear()

    world.push("5")

    refusal = world.wait(
        lambda k, p: k == "progress" and p.get("step") in FAILED_STEPS, BOOT, "the refusal"
    )
    assert refusal["step"] == "-3", refusal
    assert "does not verify" in refusal["desc"], refusal
    time.sleep(5)  # anything that still followed the refusal would have started by now
    assert [r.path for r in world.proxy.requests] == ["/5/manifest.json"]
    assert partition(world.disk, 3, LAYOUT.boot * MiB) == inactive_boot
    assert world.machine.boots == boots, "the device rebooted"
