"""Signed packages end to end: built by the bundle tool, served by nginx, installed by
``rpi-updater install`` as a separate process, against a root-owned keyring.

Every refusal is checked the same way: exit 4, one "failed" progress line with step -3 and a
reason naming the cause, and nothing written: the slots' bytes, the file target and (when the
refusal comes before the download) the state directory are as they were.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.harness import Docroot, Nginx
from tests.harness.device import Device, MiB, build_device
from tests.harness.faultproxy import Fault, FaultProxy
from tests.harness.reboot import RebootHarness
from tests.harness.signing import Key, Package, Vendor

Files = list[tuple[str, bytes, str, str]]


@pytest.fixture
def vendor(trusted_dir: Path, tmp_path: Path) -> Vendor:
    return Vendor.create(trusted_dir, tmp_path / "vendor")


@pytest.fixture
def device(tmp_path: Path, nginx: Nginx, vendor: Vendor, trusted_dir: Path) -> Device:
    dev = build_device(tmp_path / "dev", loops=None, ca_file=nginx.ca_file)
    health = trusted_dir / "health.d"
    health.mkdir(mode=0o755)
    dev.write_config(
        security={"keyring": str(vendor.keyring)},  # the production default: signatures required
        health={"system_running": False, "directory": str(health)},
    )
    return dev


def payload(tag: str = "1", *, rootfs_size: int = 2 * MiB) -> Files:
    return [
        ("boot.img", os.urandom(1 * MiB), "boot", f"a{tag}"),
        ("rootfs.img", os.urandom(rootfs_size), "rootfs", f"b{tag}"),
        ("app.conf", f"version = {tag}\n".encode(), "config", f"c{tag}"),
    ]


def install(device: Device, task: dict[str, Any], *args: str) -> tuple[Any, list[dict[str, Any]]]:
    result = device.run("install", str(device.task_file(task)), "--progress", "json", *args)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result, lines


def task_files(task: dict[str, Any]) -> list[dict[str, Any]]:
    files = task["data"]["files"]
    assert isinstance(files, list)
    return files


def entry(task: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in task_files(task) if f["fileName"] == name)


def journal_files(device: Device) -> list[dict[str, Any]]:
    try:
        files = device.journal().get("files", {})
    except json.JSONDecodeError:
        raise AssertionError("the journal was seen half-written") from None
    assert isinstance(files, dict)
    return list(files.values())


def kill_install_once(device: Device, task: Path, ready: Callable[[], bool]) -> None:
    """``rpi-updater install TASK`` in the background, kill -9 once ``ready()`` holds."""
    proc = device.start("install", str(task), "--progress", "none")
    deadline = time.monotonic() + 60
    while not ready():
        assert proc.poll() is None, "the install ended before it could be killed"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def state(device: Device) -> dict[str, Any]:
    data = json.loads((device.state_dir / "state.json").read_text())
    assert isinstance(data, dict)
    return data


def assert_refused(
    device: Device,
    result: Any,
    lines: list[dict[str, Any]],
    before: dict[str, str],
    reason: str,
    *,
    before_download: bool = True,
) -> None:
    assert result.returncode == 4, result.stderr
    failed = [line for line in lines if line["event"] == "failed"]
    assert len(failed) == 1, lines
    assert failed[0]["step"] == -3
    assert reason in failed[0]["desc"], failed[0]["desc"]
    assert reason in result.stderr
    assert not (device.etc / "app.conf").exists(), "the file target was written"
    if before_download:
        assert device.snapshot() == before, "a slot was written"
        assert not device.state_dir.exists(), "refused before the download, yet state was kept"
    else:
        now = device.snapshot()
        assert (now["A.boot"], now["A.root"]) == (before["A.boot"], before["A.root"])
        record = state(device)
        assert record["state"] == "idle"
        assert record["last_result"]["result"] == "failed"
        assert record["last_result"]["step"] == -3
        assert record["installed"] == {}
        assert not record["reboot_required"]
        assert (device.root / "autoboot" / "autoboot.txt").read_text().count("boot_partition=2")


# -- the happy path ---------------------------------------------------------------------------


def test_signed_package_installs_boots_and_reports_the_manifest_versions(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    harness = RebootHarness(device, "tryboot")
    harness.configure("now")
    files = payload("1")
    package = vendor.publish(docroot, nginx, files)
    assert task_files(package.task)[0]["fileName"] == "manifest.json"

    result, lines = install(device, package.task)

    assert result.returncode == 0, result.stderr
    assert lines[-1]["event"] == "done" and lines[-1]["percent"] == 100
    assert lines[-1]["total"] == sum(len(f[1]) for f in files), "the manifest is not payload"
    b_boot, b_root = device.parts["B.boot"], device.parts["B.root"]
    assert b_boot.read(len(files[0][1])) == files[0][1]
    assert b_root.read(len(files[1][1])) == files[1][1]
    assert (device.etc / "app.conf").read_bytes() == files[2][1]
    record = state(device)
    assert record["state"] == "armed"
    assert record["pending_versions"] == {"boot": "a1", "rootfs": "b1", "config": "c1"}
    assert json.loads(record["manifest"])["payloadType"].endswith("manifest+json")

    assert harness.boot() == "B"
    assert device.run("health-check").returncode == 0
    status = json.loads(device.run("status", "--json").stdout)
    assert status["versions"] == {
        "combined": "a1b1c1",
        "boot": "a1",
        "rootfs": "b1",
        "config": "c1",
    }


def test_dry_run_verifies_the_signature_and_says_signed(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    before = device.snapshot()

    result = device.run("install", "--dry-run", str(device.task_file(package.task)))

    assert result.returncode == 0, result.stderr
    assert "(signed)" in result.stdout
    assert "manifest.json" not in result.stdout, "the manifest is not a file to install"
    assert device.snapshot() == before


def test_md5_task_is_still_held_to_the_manifest_sha256(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    """The platform's console speaks MD5; the manifest's SHA-256 is checked all the same."""
    package = vendor.publish(docroot, nginx, payload(), sign_method="md5")
    evil = os.urandom(2 * MiB)
    docroot.add_bytes(f"{package.prefix}/rootfs.img", evil)
    entry(package.task, "rootfs.img")["fileSign"] = hashlib.md5(evil).hexdigest()
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "the signed manifest says", before_download=False)


# -- refused before a byte is written -----------------------------------------------------------


def test_tampered_file_is_caught_at_the_end_of_its_stream_and_nothing_is_armed(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    docroot.add_bytes(f"{package.prefix}/rootfs.img", os.urandom(2 * MiB))  # same size
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "sha256 digest mismatch", before_download=False)


def _tamper_manifest(package: Package, docroot: Docroot) -> None:
    """Change what the manifest says (rootfs version) and fix the task up to match it: what
    someone who controls both the bucket and the topic, but not the key, can do."""
    envelope = json.loads(package.served("manifest.json").read_bytes())
    body = json.loads(base64.b64decode(envelope["payload"]))
    body["files"][1]["version"] = "b9"
    body["version"] = "a1b9c1"
    envelope["payload"] = base64.b64encode(json.dumps(body).encode()).decode()
    data = json.dumps(envelope).encode()
    docroot.add_bytes(f"{package.prefix}/manifest.json", data)
    manifest = entry(package.task, "manifest.json")
    manifest["fileSize"], manifest["fileSign"] = len(data), hashlib.sha256(data).hexdigest()
    package.task["data"]["version"] = "a1b9c1"  # type: ignore[index]


def test_tampered_manifest_is_refused(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    _tamper_manifest(package, docroot)
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "does not verify")


def test_manifest_that_does_not_match_the_task_digest_is_refused(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    entry(package.task, "manifest.json")["fileSign"] = "0" * 64
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "manifest.json: sha256 digest mismatch")


def test_unknown_key_is_refused(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    stranger = Key.new()
    package = vendor.publish(docroot, nginx, payload(), key=stranger)
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "no trusted key signed this manifest")
    assert stranger.key_id in result.stderr


def test_revoked_key_is_refused_even_with_its_public_key_on_file(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    vendor.trust(Key.new(), "next")  # the rotation's new key
    vendor.revoke(vendor.key)
    package = vendor.publish(docroot, nginx, payload())
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(
        device, result, lines, before, f"signed by key {vendor.key.key_id}, which is revoked"
    )


def test_rotated_key_is_accepted(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    new = Key.new()
    vendor.trust(new, "2027")
    package = vendor.publish(docroot, nginx, payload(), key=new)

    result, _ = install(device, package.task)

    assert result.returncode == 0, result.stderr
    assert state(device)["state"] == "armed"


def test_wrong_board_is_refused(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload(), boards=("Raspberry Pi 5 Model B",))
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "is not one the package is for")
    assert "Raspberry Pi 4 Model B Rev 1.4" in result.stderr


def test_missing_manifest_is_refused_unless_unsigned_packages_are_allowed(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    files = task_files(package.task)
    files[:] = [f for f in files if f["fileName"] != "manifest.json"]
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "the package is not signed")

    device.write_config(security={"keyring": str(vendor.keyring), "allow_unsigned": True})
    package.task["data"]["extData"] = {  # type: ignore[index]
        "versions": {"boot.img": "a1", "rootfs.img": "b1", "app.conf": "c1"}
    }
    result, _ = install(device, package.task)
    assert result.returncode == 0, result.stderr
    assert "is not signed: installing it" in result.stderr


def test_file_the_manifest_does_not_list_is_refused(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    extra = docroot.add_bytes(f"{package.prefix}/boot-extra.img", b"x" * 4096)
    task_files(package.task).append(
        {
            "fileName": "boot-extra.img",
            "fileUrl": nginx.url(f"{package.prefix}/boot-extra.img"),
            "fileSize": extra.size,
            "fileSign": extra.sha256,
        }
    )
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "boot-extra.img: is not listed in the manifest")


def test_manifest_listing_a_file_the_task_lacks_is_refused(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    files = task_files(package.task)
    files[:] = [f for f in files if f["fileName"] != "app.conf"]
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "missing from the task")


def test_manifest_target_must_be_the_configured_one(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    files = payload()
    files[2] = ("app.conf", files[2][1], "kernel", "c1")  # the vendor meant another target
    package = vendor.publish(docroot, nginx, files)
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "the manifest says target 'kernel'")


def test_downgrade_is_refused_unless_signed_or_configured_as_allowed(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    device.write_config(factory_versions={"boot": "a2", "rootfs": "b10", "config": "c2"})
    older = vendor.publish(docroot, nginx, [*payload("9")[:2], payload("3")[2]])  # b9 < b10
    before = device.snapshot()

    result, lines = install(device, older.task)

    assert_refused(device, result, lines, before, "target rootfs would go down from version 'b10'")

    rollback = vendor.publish(docroot, nginx, payload("1"), allow_downgrade=True)
    assert device.run("install", "--dry-run", str(device.task_file(rollback.task))).returncode == 0
    device.write_config(security={"keyring": str(vendor.keyring), "allow_downgrade": True})
    result, _ = install(device, older.task)
    assert result.returncode == 0, result.stderr
    assert state(device)["pending_versions"] == {"boot": "a9", "rootfs": "b9", "config": "c3"}


def test_host_allowlist_is_enforced_before_the_download(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    task = device.task_file(package.task)
    device.write_config(
        security={"keyring": str(vendor.keyring), "allowed_hosts": ["*.example.com"]}
    )
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(
        device, result, lines, before, "host '127.0.0.1' is not in security.allowed_hosts"
    )
    device.write_config(security={"keyring": str(vendor.keyring), "allowed_hosts": ["127.0.0.1"]})
    assert device.run("install", "--dry-run", str(task)).returncode == 0


def test_oversized_manifest_is_refused_before_it_is_fetched(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    entry(package.task, "manifest.json")["fileSize"] = 10 * MiB
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "more than 131072")


def test_keyring_writable_by_others_is_refused(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    package = vendor.publish(docroot, nginx, payload())
    vendor.keyring.chmod(0o777)
    before = device.snapshot()

    result, lines = install(device, package.task)

    assert_refused(device, result, lines, before, "writable by")


# -- digestsign, the platform's "secure OTA" ----------------------------------------------------


def test_digestsign_is_required_and_checked_once_the_product_key_is_configured(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx, trusted_dir: Path
) -> None:
    product = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = trusted_dir / "product.pem"
    pem.write_bytes(
        product.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    pem.chmod(0o644)
    device.write_config(security={"keyring": str(vendor.keyring), "digestsign_key": str(pem)})
    package = vendor.publish(docroot, nginx, payload())
    first = bytes.fromhex(str(task_files(package.task)[0]["fileSign"]))
    good = product.sign(first, padding.PKCS1v15(), hashes.SHA256())
    before = device.snapshot()

    result, lines = install(device, package.task)  # none at all
    assert_refused(device, result, lines, before, "the task has no digestsign")

    package.task["data"]["digestsign"] = base64.b64encode(  # type: ignore[index]
        product.sign(b"\0" * 32, padding.PKCS1v15(), hashes.SHA256())
    ).decode()
    result, lines = install(device, package.task)  # over another digest
    assert_refused(device, result, lines, before, "digestsign")

    package.task["data"]["digestsign"] = base64.b64encode(good).decode()  # type: ignore[index]
    result, _ = install(device, package.task)
    assert result.returncode == 0, result.stderr


# -- resumes ------------------------------------------------------------------------------------


def test_a_killed_install_resumes_with_its_verified_manifest_not_a_second_fetch(
    device: Device, vendor: Vendor, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    """The verified envelope is kept in the state: after a kill -9 the manifest's presigned URL
    may be gone, and the resume does not need it."""
    files = payload(rootfs_size=12 * MiB)
    package = vendor.publish(docroot, fault_proxy, files)
    fault_proxy.default = Fault(stall_after=2 * MiB, stall_seconds=0.3)
    task = device.task_file(package.task)
    kill_install_once(device, task, lambda: any(f.get("durable") for f in journal_files(device)))
    assert state(device)["state"] == "download"
    docroot.remove(f"{package.prefix}/manifest.json")  # expired
    fault_proxy.default = Fault()

    result = device.run("install", str(task), "--progress", "none")

    assert result.returncode == 0, result.stderr
    assert device.parts["B.root"].read(len(files[1][1])) == files[1][1]
    assert state(device)["state"] == "armed"


def test_resume_verifies_the_kept_manifest_again(
    device: Device, vendor: Vendor, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    """A key revoked between the kill and the resume stops the update (it rolls back)."""
    files = payload(rootfs_size=12 * MiB)
    package = vendor.publish(docroot, fault_proxy, files)
    fault_proxy.default = Fault(stall_after=2 * MiB, stall_seconds=0.3)
    task = device.task_file(package.task)
    kill_install_once(
        device,
        task,
        lambda: (device.state_dir / "state.json").exists() and state(device)["state"] == "download",
    )
    vendor.trust(Key.new(), "next")
    vendor.revoke(vendor.key)
    fault_proxy.default = Fault()

    result = device.run("install", str(task), "--progress", "none")

    assert result.returncode == 4, result.stderr
    assert "which is revoked" in result.stderr
    record = state(device)
    assert record["state"] == "idle" and record["last_result"]["step"] == -3
    assert not (device.etc / "app.conf").exists()


def test_bundle_cli_output_is_accepted_by_the_device(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx, tmp_path: Path
) -> None:
    """The operator's path from the README: keygen, bundle, publish, install."""
    keys, out = tmp_path / "keys", tmp_path / "pkg"
    run = [device.command()[0], "-m", "updater.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    made = subprocess.run(
        [*run, "keygen", "--out", str(keys), "--name", "vendor-2026"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    vendor.trust(Key(b"", (keys / "vendor-2026.pub").read_bytes()), "vendor-2026")
    src = tmp_path / "build"
    src.mkdir()
    for name, content, _, _ in payload():
        (src / name).write_bytes(content)
    prefix = f"cli-{os.getpid()}-{time.monotonic_ns()}"
    built = subprocess.run(
        [
            *run,
            "bundle",
            "--key",
            str(keys / "vendor-2026.key"),
            "--out",
            str(out),
            "--version",
            "a1b1c1",
            "--board",
            "Raspberry Pi 4 Model B",
            "--base-url",
            nginx.url(prefix),
            f"{src}/boot.img=boot=a1",
            f"{src}/rootfs.img=rootfs=b1",
            f"{src}/app.conf=config=c1",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    for path in out.iterdir():
        docroot.add_bytes(f"{prefix}/{path.name}", path.read_bytes())

    result = device.run("install", str(out / "task.json"))

    assert result.returncode == 0, result.stderr
    assert (device.etc / "app.conf").read_bytes() == (src / "app.conf").read_bytes()


def test_an_altered_copy_of_the_task_under_way_does_not_roll_it_back(
    device: Device, vendor: Vendor, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    """The task id leaves out what a copy can change: a copy refused for itself must not make
    the device drop the genuine update it is downloading."""
    files = payload(rootfs_size=12 * MiB)
    package = vendor.publish(docroot, fault_proxy, files)
    fault_proxy.default = Fault(stall_after=2 * MiB, stall_seconds=0.3)
    task = device.task_file(package.task, "genuine.json")
    kill_install_once(device, task, lambda: any(f.get("durable") for f in journal_files(device)))
    fault_proxy.default = Fault()
    altered = json.loads(json.dumps(package.task))
    entry(altered, "rootfs.img")["fileSize"] += 1  # the manifest disagrees: refused

    refused, lines = install(device, altered)

    assert refused.returncode == 4, refused.stderr
    assert "size" in lines[-1]["desc"]
    assert state(device)["state"] == "download", "the genuine update is still under way"
    result = device.run("install", str(task), "--progress", "none")
    assert result.returncode == 0, result.stderr
    assert device.parts["B.root"].read(len(files[1][1])) == files[1][1]
