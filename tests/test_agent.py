"""The MQTT agent end to end: mosquitto (TLS, passwords, ACL), nginx, the daemon as a process.

The assertions are on what the broker saw (the recorder subscribes to everything as admin) and
on the bytes that landed on the slots.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Docroot, FaultProxy, Mosquitto, Nginx, Recorder
from tests.harness.device import REPO, Device, MiB, build_device, task_for
from tests.harness.faultproxy import Fault
from tests.harness.nginx import ServedFile
from tests.harness.reboot import RebootHarness
from tests.harness.signing import Key, Vendor

PK, DN = "a1B2c3D4e5F", "pi-0001"
INFORM = f"/ota/device/inform/{PK}/{DN}"
UPGRADE = f"/ota/device/upgrade/{PK}/{DN}"
PROGRESS = f"/ota/device/progress/{PK}/{DN}"
GET = f"/sys/{PK}/{DN}/thing/ota/firmware/get"


@pytest.fixture
def device(tmp_path: Path, nginx: Nginx, mosquitto: Mosquitto, trusted_dir: Path) -> Device:
    dev = build_device(tmp_path / "dev", loops=None, ca_file=nginx.ca_file)
    (trusted_dir / "10-ok").write_text("#!/bin/sh\nexit 0\n")
    (trusted_dir / "10-ok").chmod(0o755)
    identity = tmp_path / "identity.yaml"
    identity.write_text(
        f"product_key: {PK}\ndevice_name: {DN}\nusername: device_user\npassword: device_pass\n"
    )
    identity.chmod(0o600)
    dev.write_config(
        mqtt={
            "host": mosquitto.host,
            "port": mosquitto.port,
            "ca_file": str(mosquitto.ca_file),
            "login": "plain",
            "identity_file": str(identity),
            "keepalive": 30,
            "reconnect_max": 1,
        },
        factory_versions={"boot": "a0", "rootfs": "b0", "config": "c0"},
        health={"system_running": False, "directory": str(trusted_dir)},
    )
    return dev


@pytest.fixture
def harness(device: Device) -> RebootHarness:
    h = RebootHarness(device, "tryboot")
    h.configure("now")
    return h


class Daemon:
    """``rpi-updater daemon`` as its own process, its log in a file."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.log = device.root / f"daemon-{time.monotonic_ns()}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                device.command("daemon"),
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def text(self) -> str:
        return self.log.read_text()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.alive():
            daemon.proc.kill()
            daemon.proc.wait()


def start(device: Device, daemons: list[Daemon]) -> Daemon:
    daemon = Daemon(device)
    daemons.append(daemon)
    return daemon


def push(
    files: dict[str, ServedFile], url: object, version: str, versions: dict[str, str]
) -> dict[str, object]:
    entries = [(name, url(f.name), f.size, f.sha256) for name, f in files.items()]  # type: ignore[operator]
    task = task_for(entries, version=version)
    data = task["data"]
    assert isinstance(data, dict)
    data["extData"] = {"versions": versions}
    return task


def numbered(files: dict[str, ServedFile], url: object, n: int) -> dict[str, object]:
    """Package number n: version an bn cn, each file's version in extData."""
    versions = {"boot.img": f"a{n}", "rootfs.img": f"b{n}", "app.conf": f"c{n}"}
    return push(files, url, f"a{n}b{n}c{n}", versions)


def package(docroot: Docroot, tag: str, size: int = 3 * MiB) -> dict[str, ServedFile]:
    return {
        "boot.img": docroot.add_random(size // 3, name=f"boot-{tag}.img"),
        "rootfs.img": docroot.add_random(size, name=f"rootfs-{tag}.img"),
        "app.conf": docroot.add_bytes(f"app-{tag}.conf", f"version = {tag}\n".encode()),
    }


def steps(broker_log: Recorder) -> list[tuple[int, str]]:
    out = []
    for message in broker_log.json(PROGRESS):
        params = message["params"]
        out.append((int(params["step"]), str(params.get("desc", ""))))
    return out


def wait_step(broker_log: Recorder, step: int, timeout: float = 30) -> dict[str, object]:
    seen = broker_log.wait_for(
        lambda m: m.topic == PROGRESS and json.loads(m.payload)["params"]["step"] == str(step),
        timeout=timeout,
    )
    data = json.loads(seen.payload)
    assert isinstance(data, dict)
    return data


def informs(broker_log: Recorder) -> list[str]:
    return [str(m["params"]["version"]) for m in broker_log.json(INFORM)]


# -- the whole flow --------------------------------------------------------------------------------


def test_a_push_is_installed_reported_and_informed_after_the_health_check(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    nginx: Nginx,
    broker_log: Recorder,
    daemons: list[Daemon],
) -> None:
    files = package(docroot, "v1", size=12 * MiB)
    daemon = start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)
    broker_log.wait_for(GET, timeout=5)
    assert informs(broker_log) == ["a0b0c0"], "the current version on connect"
    # The broker granted both subscriptions; paho 1.6 reports that as a tuple of QoS values
    # (the system test found it logged as a refusal with Debian 12's paho).
    assert "refused" not in daemon.text(), daemon.text()

    broker_log.publish(
        UPGRADE,
        numbered(files, nginx.url, 1),
    )
    wait_step(broker_log, 100)
    deadline = time.monotonic() + 20
    while not harness.reboot_requests():
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.05)

    sequence = [s for s, _ in steps(broker_log)]
    assert sequence[0] == 0 and sequence[-1] == 100
    assert sequence == sorted(set(sequence)), "strictly increasing"
    assert all(s % 5 == 0 for s in sequence), "round steps"
    times = [m.time for m in broker_log.messages(PROGRESS)]
    assert len(times) <= 2 + 4 * (times[-1] - times[0] + 1), "a few messages a second at most"
    assert harness.reboot_requests() == ["0 tryboot"]
    assert daemon.stop() == 0

    # The reboot: the trial boot, the health check at boot, the daemon again.
    assert harness.boot() == "B"
    assert device.run("health-check").returncode == 0
    broker_log.clear()
    start(device, daemons)
    seen = broker_log.wait_for(INFORM, timeout=20)
    assert json.loads(seen.payload)["params"] == {"version": "a1b1c1"}
    assert device.parts["B.root"].read(files["rootfs.img"].size) == files["rootfs.img"].read_bytes()
    assert device.parts["B.boot"].read(files["boot.img"].size) == files["boot.img"].read_bytes()
    assert (device.etc / "app.conf").read_bytes() == b"version = v1\n"


# -- bad input never stops the daemon -------------------------------------------------------------


@pytest.mark.parametrize("case", ["malformed", "unknown-file", "wrong-digest"])
def test_bad_pushes_get_the_right_negative_step_and_the_daemon_lives_on(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    nginx: Nginx,
    broker_log: Recorder,
    daemons: list[Daemon],
    case: str,
) -> None:
    daemon = start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)
    files = package(docroot, "v2")
    if case == "malformed":
        payload: dict[str, object] | str = (
            '{"code":"1000","data":{"version":"x","files":[{"fileName":'
        )
        expected, where = -1, "malformed task"
    elif case == "unknown-file":
        files["kernel8.img"] = files.pop("boot.img")
        payload = push(files, nginx.url, "v2", {})
        expected, where = -1, "kernel8.img"
    else:
        task = numbered(files, nginx.url, 2)
        data = task["data"]
        assert isinstance(data, dict)
        data["files"][1]["fileSign"] = "0" * 64
        payload = task
        expected, where = -3, "rootfs.img"

    broker_log.publish(UPGRADE, payload)
    failure = wait_step(broker_log, expected)

    params = failure["params"]
    assert isinstance(params, dict) and where in str(params["desc"])
    time.sleep(0.5)
    assert daemon.alive(), daemon.text()
    assert harness.reboot_requests() == []
    assert daemon.stop() == 0


# -- duplicates, outages ---------------------------------------------------------------------------


def test_the_same_push_twice_runs_once(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    fault_proxy: FaultProxy,
    broker_log: Recorder,
    daemons: list[Daemon],
) -> None:
    files = package(docroot, "v3")
    fault_proxy.default = Fault(stall_after=1 * MiB, stall_seconds=0.3)
    start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)
    message = numbered(files, fault_proxy.url, 3)

    broker_log.publish(UPGRADE, message)
    wait_step(broker_log, 0)
    broker_log.publish(UPGRADE, message)  # while it runs
    wait_step(broker_log, 100)
    broker_log.publish(UPGRADE, message)  # after it is armed
    time.sleep(1)

    assert [s for s, _ in steps(broker_log)].count(0) == 1
    fault_proxy.wait_idle()
    total = sum(f.size for f in files.values())
    assert fault_proxy.body_bytes_total == total, "every byte fetched once"
    assert harness.reboot_requests() == ["0 tryboot"]


def test_a_broker_outage_during_the_download_loses_no_report(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    fault_proxy: FaultProxy,
    mosquitto: Mosquitto,
    broker_log: Recorder,
    daemons: list[Daemon],
) -> None:
    files = package(docroot, "v4", size=6 * MiB)
    fault_proxy.default = Fault(stall_after=1 * MiB, stall_seconds=0.4)
    daemon = start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)
    broker_log.publish(
        UPGRADE,
        numbered(files, fault_proxy.url, 4),
    )
    wait_step(broker_log, 0)
    try:
        mosquitto.kill()
        time.sleep(2)  # the download goes on without the broker
    finally:
        mosquitto.start()
    broker_log.wait_ready()

    wait_step(broker_log, 100, timeout=60)

    assert daemon.alive(), daemon.text()
    assert device.parts["B.root"].read(files["rootfs.img"].size) == files["rootfs.img"].read_bytes()
    deadline = time.monotonic() + 20
    while not harness.reboot_requests():
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.05)


def test_the_iot_platform_login_is_accepted_by_a_broker_that_knows_the_signature(
    device: Device,
    tls_files: object,
    tmp_path: Path,
    daemons: list[Daemon],
) -> None:
    """A broker whose password file holds the signed login computed in the test from the
    protocol description (username dn&pk, HMAC-SHA256 password): the daemon's own signing
    gets it in."""
    import hashlib
    import hmac

    from tests.harness import TlsFiles

    assert isinstance(tls_files, TlsFiles)
    secret = "s3cr3tS3cr3tS3cr3tS3cr3tS3cr3t12"
    signed = f"clientId{PK}.{DN}deviceName{DN}productKey{PK}timestamp2524608000000"
    password = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()
    broker = Mosquitto(
        tls_files, tmp_path / "aliyun", device_user=f"{DN}&{PK}", device_password=password
    )
    broker.start()
    try:
        identity = tmp_path / "identity-aliyun.yaml"
        identity.write_text(f"product_key: {PK}\ndevice_name: {DN}\ndevice_secret: {secret}\n")
        identity.chmod(0o600)
        mqtt = dict(device.config["mqtt"])  # type: ignore[call-overload]
        mqtt.update(port=broker.port, login="iot-platform", identity_file=str(identity))
        device.write_config(mqtt=mqtt)
        recorder = Recorder(broker).start()
        try:
            daemon = start(device, daemons)
            seen = recorder.wait_for(INFORM, timeout=20)
            assert json.loads(seen.payload)["params"] == {"version": "a0b0c0"}
            assert daemon.stop() == 0
            assert secret not in daemon.text() and password not in daemon.text()
        finally:
            recorder.stop()
    finally:
        broker.stop()


def test_an_identity_file_others_can_read_is_refused(device: Device) -> None:
    identity = Path(str(device.config["mqtt"]["identity_file"]))  # type: ignore[index]
    identity.chmod(0o644)

    result = device.run("daemon")

    assert result.returncode == 2
    assert "lets others read it: chmod 600" in result.stderr
    assert "device_pass" not in result.stderr


# -- restarts, replacement, systemd -------------------------------------------------------------


def test_a_daemon_killed_mid_download_resumes_when_restarted(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    fault_proxy: FaultProxy,
    broker_log: Recorder,
    daemons: list[Daemon],
) -> None:
    files = package(docroot, "v5", size=8 * MiB)
    fault_proxy.default = Fault(stall_after=2 * MiB, stall_seconds=0.3)
    daemon = start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)
    broker_log.publish(
        UPGRADE,
        numbered(files, fault_proxy.url, 5),
    )
    wait_step(broker_log, 40, timeout=30)
    daemon.proc.kill()  # a hung daemon killed by systemd's watchdog, say
    daemon.proc.wait()

    start(device, daemons)  # systemd restarts it

    wait_step(broker_log, 100, timeout=60)
    fault_proxy.wait_idle()
    total = sum(f.size for f in files.values())
    assert fault_proxy.body_bytes_total - total <= 64 * MiB // 16 + 2 * MiB, "the prefix kept"
    assert device.parts["B.root"].read(files["rootfs.img"].size) == files["rootfs.img"].read_bytes()


def test_a_newer_task_replaces_one_still_downloading(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    fault_proxy: FaultProxy,
    broker_log: Recorder,
    daemons: list[Daemon],
) -> None:
    old = package(docroot, "v6", size=8 * MiB)
    new = package(docroot, "v7", size=2 * MiB)
    fault_proxy.default = Fault(stall_after=1 * MiB, stall_seconds=0.5)
    daemon = start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)
    broker_log.publish(
        UPGRADE,
        numbered(old, fault_proxy.url, 6),
    )
    wait_step(broker_log, 5, timeout=30)

    broker_log.publish(
        UPGRADE,
        numbered(new, fault_proxy.url, 7),
    )

    wait_step(broker_log, 100, timeout=60)
    assert "replaces task" in daemon.text()
    status = json.loads(device.run("status", "--json").stdout)
    assert status["update"]["version"] == "a7b7c7" and status["state"] == "armed"
    assert device.parts["B.root"].read(new["rootfs.img"].size) == new["rootfs.img"].read_bytes()


def test_a_failure_recorded_at_boot_is_reported_once_by_the_daemon(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    nginx: Nginx,
    broker_log: Recorder,
    daemons: list[Daemon],
    trusted_dir: Path,
) -> None:
    (trusted_dir / "20-app").write_text("#!/bin/sh\necho the app does not answer >&2\nexit 1\n")
    (trusted_dir / "20-app").chmod(0o755)
    files = package(docroot, "v8")
    task = device.task_file(numbered(files, nginx.url, 8))
    assert device.run("install", str(task)).returncode == 0
    assert harness.boot() == "B"
    assert device.run("health-check").returncode == 1
    assert harness.boot() == "A"

    start(device, daemons)
    failure = wait_step(broker_log, -1, timeout=20)
    params = failure["params"]
    assert isinstance(params, dict) and "the app does not answer" in str(params["desc"])
    assert informs(broker_log)[-1] == "a0b0c0", "the old version stays"
    daemons[-1].stop()
    broker_log.clear()
    start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)
    time.sleep(0.5)
    assert steps(broker_log) == [], "reported once"


def test_systemd_hears_ready_status_and_watchdog(
    device: Device, broker_log: Recorder, tmp_path: Path, daemons: list[Daemon]
) -> None:
    import socket

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(10)
    os.environ["NOTIFY_SOCKET"] = str(sock_path)
    os.environ["WATCHDOG_USEC"] = "2000000"
    try:
        daemon = start(device, daemons)
    finally:
        del os.environ["NOTIFY_SOCKET"], os.environ["WATCHDOG_USEC"]
    heard: list[str] = []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (
            "READY=1" in heard and heard.count("WATCHDOG=1") >= 2
        ):
            heard.append(sock.recv(4096).decode())
    finally:
        sock.close()
    assert "READY=1" in heard, heard
    assert any(h.startswith("STATUS=") for h in heard), heard
    assert heard.count("WATCHDOG=1") >= 2, heard
    assert daemon.stop() == 0


def test_a_failure_after_100_percent_is_reported_at_once_and_only_once(
    device: Device,
    harness: RebootHarness,
    docroot: Docroot,
    nginx: Nginx,
    broker_log: Recorder,
    daemons: list[Daemon],
    trusted_dir: Path,
) -> None:
    hook = trusted_dir / "conf-post"
    hook.write_text("#!/bin/sh\necho the service rejects the config >&2\nexit 3\n")
    hook.chmod(0o755)
    targets = device.config["targets"]
    assert isinstance(targets, list)
    targets[2]["post_install"] = str(hook)
    device.write_config(targets=targets)
    files = package(docroot, "v9")
    daemon = start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)

    broker_log.publish(
        UPGRADE,
        numbered(files, nginx.url, 9),
    )

    failure = wait_step(broker_log, -4, timeout=30)
    params = failure["params"]
    assert isinstance(params, dict) and "the service rejects the config" in str(params["desc"])
    assert [s for s, _ in steps(broker_log)][-2:] == [100, -4]
    assert harness.reboot_requests() == []
    assert daemon.stop() == 0
    broker_log.clear()
    start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)
    time.sleep(0.5)
    assert steps(broker_log) == [], "not reported again after a restart"


# -- signed packages ---------------------------------------------------------------------------


@pytest.fixture
def vendor(device: Device, trusted_dir: Path, tmp_path: Path) -> Vendor:
    """A vendor whose keyring the daemon trusts, with the production default: signatures
    required (no security.allow_unsigned). The health checks move to their own directory so
    that the keyring is not taken for one."""
    health = trusted_dir / "health.d"
    health.mkdir(mode=0o755)
    (trusted_dir / "10-ok").rename(health / "10-ok")
    signer = Vendor.create(trusted_dir, tmp_path / "vendor")
    device.write_config(
        security={"keyring": str(signer.keyring)},
        health={"system_running": False, "directory": str(health)},
    )
    return signer


def signed_payload(n: int) -> list[tuple[str, bytes, str, str]]:
    """Package number n as the vendor builds it: (name, content, target, version)."""
    return [
        ("boot.img", os.urandom(1 * MiB), "boot", f"a{n}"),
        ("rootfs.img", os.urandom(2 * MiB), "rootfs", f"b{n}"),
        ("app.conf", f"version = {n}\n".encode(), "config", f"c{n}"),
    ]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_record(device: Device) -> dict[str, Any]:
    data = json.loads((device.state_dir / "state.json").read_text())
    assert isinstance(data, dict)
    return data


def wait_reboot_request(harness: RebootHarness, daemon: Daemon, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not harness.reboot_requests():
        assert daemon.alive(), daemon.text()
        assert time.monotonic() < deadline, daemon.text()
        time.sleep(0.05)


def assert_installed(
    device: Device, files: list[tuple[str, bytes, str, str]], n: int, key: Key
) -> None:
    """Package n is armed in slot B: its bytes on B, its file target, the manifest's versions
    and the envelope ``key`` signed, kept for a resume."""
    boot, rootfs, conf = (content for _, content, _, _ in files)
    assert device.parts["B.boot"].read(len(boot)) == boot
    assert device.parts["B.root"].read(len(rootfs)) == rootfs
    assert (device.etc / "app.conf").read_bytes() == conf
    record = state_record(device)
    assert (record["state"], record["version"], record["slot"]) == ("armed", f"a{n}b{n}c{n}", "B")
    assert record["pending_versions"] == {"boot": f"a{n}", "rootfs": f"b{n}", "config": f"c{n}"}
    envelope = json.loads(str(record["manifest"]))
    assert [s["keyid"] for s in envelope["signatures"]] == [key.key_id]


def test_a_signed_push_is_verified_installed_and_reported_up_to_100(
    device: Device,
    harness: RebootHarness,
    vendor: Vendor,
    docroot: Docroot,
    nginx: Nginx,
    broker_log: Recorder,
    daemons: list[Daemon],
) -> None:
    security = device.config["security"]
    assert security == {"keyring": str(vendor.keyring)}, "signatures required, as in production"
    files = signed_payload(1)
    package = vendor.publish(docroot, nginx, files)
    daemon = start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)

    broker_log.publish(UPGRADE, package.task)

    wait_step(broker_log, 100)
    wait_reboot_request(harness, daemon)
    sequence = [s for s, _ in steps(broker_log)]
    assert sequence[0] == 0 and sequence[-1] == 100, sequence
    assert sequence == sorted(set(sequence)), "strictly increasing, no negative step"
    assert all(s % 5 == 0 for s in sequence), sequence
    assert all(desc == "" for _, desc in steps(broker_log))
    assert harness.reboot_requests() == ["0 tryboot"]
    assert_installed(device, files, 1, vendor.key)
    status = json.loads(device.run("status", "--json").stdout)
    assert status["state"] == "armed" and status["update"]["version"] == "a1b1c1"
    assert daemon.alive(), daemon.text()
    assert daemon.stop() == 0


@pytest.mark.parametrize("case", ["unknown-key", "tampered-rootfs"])
def test_a_refused_signed_push_is_reported_once_and_a_good_one_installs_after_it(
    device: Device,
    harness: RebootHarness,
    vendor: Vendor,
    docroot: Docroot,
    nginx: Nginx,
    broker_log: Recorder,
    daemons: list[Daemon],
    case: str,
) -> None:
    daemon = start(device, daemons)
    broker_log.wait_for(INFORM, timeout=20)
    files = signed_payload(1)
    if case == "unknown-key":
        stranger = Key.new()
        bad = vendor.publish(docroot, nginx, files, key=stranger)
        desc = (
            f"no trusted key signed this manifest (signed by '{stranger.key_id}'; "
            f"trusted: {vendor.key.key_id})"
        )
    else:
        bad = vendor.publish(docroot, nginx, files)
        evil = os.urandom(len(files[1][1]))  # same size: only the digest can tell
        docroot.add_bytes(f"{bad.prefix}/rootfs.img", evil)
        desc = (
            f"rootfs.img: sha256 digest mismatch: got {sha256(evil)}, "
            f"the task says {sha256(files[1][1])}"
        )
    before = device.snapshot()

    broker_log.publish(UPGRADE, bad.task)

    failure = wait_step(broker_log, -3)
    assert failure["params"] == {"step": "-3", "desc": desc}
    if case == "unknown-key":
        assert steps(broker_log) == [(-3, desc)], "refused before the download: no step 0"
        assert device.snapshot() == before, "a slot was written"
        assert not (device.state_dir / "state.json").exists(), "refused, yet a state was kept"
        assert not (device.state_dir / "journal.json").exists()
    else:
        sequence = [s for s, _ in steps(broker_log)]
        assert sequence[0] == 0 and sequence[-1] == -3, sequence
        now = device.snapshot()
        assert (now["A.boot"], now["A.root"]) == (before["A.boot"], before["A.root"])
        # The step goes out from the failing download; the rollback and the record follow,
        # marked as reported (a restart must not report it again).
        deadline = time.monotonic() + 10
        while not state_record(device)["last_result"].get("reported"):
            assert time.monotonic() < deadline, daemon.text()
            time.sleep(0.05)
        record = state_record(device)
        assert record["state"] == "idle"
        last = record["last_result"]
        assert isinstance(last, dict)
        assert (last["result"], last["step"], last["reason"]) == ("failed", -3, desc)
    assert not (device.etc / "app.conf").exists(), "the file target was written"
    time.sleep(0.5)
    assert daemon.alive(), daemon.text()
    assert harness.reboot_requests() == []
    assert desc in daemon.text()

    good_files = signed_payload(2)
    good = vendor.publish(docroot, nginx, good_files)
    broker_log.publish(UPGRADE, good.task)

    wait_step(broker_log, 100)
    wait_reboot_request(harness, daemon)
    negative = [(s, d) for s, d in steps(broker_log) if s < 0]
    assert negative == [(-3, desc)], "the refusal is reported once"
    assert harness.reboot_requests() == ["0 tryboot"]
    assert_installed(device, good_files, 2, vendor.key)
    assert daemon.stop() == 0
