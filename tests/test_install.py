"""The install engine end to end: real nginx over HTTPS, our fault proxy, loop devices, the CLI.

Every test compares what landed on the partitions byte for byte and proves that slot A (booted)
was never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Docroot, Fault, FaultProxy, LoopDevices, Nginx
from tests.harness.device import Device, MiB, build_device, mounted_ext4, task_for
from tests.harness.nginx import ServedFile


@pytest.fixture(params=["loop", "image"])
def device(
    request: pytest.FixtureRequest, tmp_path: Path, nginx: Nginx, loop_devices: LoopDevices
) -> Iterator[Device]:
    loops = loop_devices if request.param == "loop" else None
    yield build_device(tmp_path / "dev", loops=loops, ca_file=nginx.ca_file)


@pytest.fixture
def image_device(tmp_path: Path, nginx: Nginx) -> Device:
    """Image-file slots only: for tests whose subject is not the block layer."""
    return build_device(tmp_path / "dev", loops=None, ca_file=nginx.ca_file)


def entry(served: ServedFile, url: str, name: str | None = None) -> tuple[str, str, int, str]:
    return (name or served.name, url, served.size, served.sha256)


def assert_untouched_a(device: Device, before: dict[str, str]) -> None:
    now = device.snapshot()
    assert now["A.boot"] == before["A.boot"], "the booted slot's boot part was written"
    assert now["A.root"] == before["A.root"], "the booted slot's root part was written"


def json_events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# -- the whole flow ------------------------------------------------------------------------------


def test_multi_file_task_lands_byte_for_byte(
    device: Device, docroot: Docroot, nginx: Nginx
) -> None:
    boot = docroot.add_random(3 * MiB + 123, name="boot.img")
    rootfs = docroot.add_random(11 * MiB + 7, name="rootfs.img")
    conf = docroot.add_bytes("app.conf", b"answer = 42\n")
    (device.etc / "app.conf").write_bytes(b"answer = 41\n")
    before = device.snapshot()
    task = task_for([entry(f, nginx.url(f.name)) for f in (boot, rootfs, conf)])

    result = device.run("install", str(device.task_file(task)), "--progress", "json")

    assert result.returncode == 0, result.stderr
    assert device.parts["B.boot"].read(boot.size) == boot.read_bytes()
    assert device.parts["B.root"].read(rootfs.size) == rootfs.read_bytes()
    assert (device.etc / "app.conf").read_bytes() == b"answer = 42\n"
    kept = device.etc / ".app.conf.rpi-updater-old"
    assert kept.read_bytes() == b"answer = 41\n", "the old content is kept for a rollback"
    assert_untouched_a(device, before)
    journal = device.journal()
    assert journal["state"] == "installed" and journal["slot"] == "B"
    events = json_events(result.stdout)
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    seen = [(str(e["event"]), int(str(e["percent"]))) for e in events]
    percents = [p for _, p in seen]
    assert percents == sorted(percents) and percents[-1] == 100
    assert all(p < 100 for kind, p in seen if kind != "done"), "100 only when all is verified"
    verified = [e["file"] for e in events if e["event"] == "verified"]
    assert verified == ["boot.img", "rootfs.img", "app.conf"]


def test_a_part_the_package_does_not_bring_is_cloned(
    device: Device, docroot: Docroot, nginx: Nginx
) -> None:
    rootfs = docroot.add_random(5 * MiB, name="rootfs.img")
    before = device.snapshot()
    task = task_for([entry(rootfs, nginx.url(rootfs.name))], version="b2")

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert device.parts["B.root"].read(rootfs.size) == rootfs.read_bytes()
    assert device.parts["B.boot"].digest() == before["A.boot"], "boot B is a clone of boot A"
    assert_untouched_a(device, before)


def test_installing_the_same_task_again_fetches_nothing(
    image_device: Device, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    boot = docroot.add_random(2 * MiB, name="boot.img")
    task = image_device.task_file(task_for([entry(boot, fault_proxy.url(boot.name))]))
    assert image_device.run("install", str(task)).returncode == 0
    fault_proxy.wait_idle()
    fetched = fault_proxy.body_bytes_total

    again = image_device.run("install", str(task))

    assert again.returncode == 0, again.stderr
    fault_proxy.wait_idle()
    assert fault_proxy.body_bytes_total == fetched
    assert "already installed" in again.stderr


def test_dry_run_prints_the_plan_and_writes_nothing(
    device: Device, docroot: Docroot, nginx: Nginx
) -> None:
    boot = docroot.add_random(1 * MiB, name="boot.img")
    conf = docroot.add_bytes("app.conf", b"x = 1\n")
    before = device.snapshot()
    task = task_for([entry(f, nginx.url(f.name)) for f in (boot, conf)])

    result = device.run("install", "--dry-run", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert "boot.img" in result.stdout and "slot B" in result.stdout
    assert "clone part root" in result.stdout
    assert device.snapshot() == before
    assert not (device.etc / "app.conf").exists()
    assert not device.state_dir.exists()


# -- faults on the wire --------------------------------------------------------------------------


def test_twenty_cuts_at_random_offsets(
    device: Device, docroot: Docroot, fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    rootfs = docroot.add_random(12 * MiB + 5, name="rootfs.img")
    # Twenty distinct cut points in the file; each request is cut where the next one lies.
    points = sorted(random.Random(20).sample(range(1, rootfs.size), 20))
    gaps = [b - a for a, b in zip([0, *points], points, strict=False)]
    fault_proxy.script(*(Fault(cut_after=gap) for gap in gaps))
    task = task_for([entry(rootfs, fault_proxy.url(rootfs.name))])

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert device.parts["B.root"].read(rootfs.size) == rootfs.read_bytes()
    fault_proxy.wait_idle()
    requests = fault_proxy.requests
    assert len(requests) == 21
    twice = fault_proxy.body_bytes_total - rootfs.size
    with capsys.disabled():
        print(
            f"\n20 cuts: {fault_proxy.body_bytes_total} bytes sent for {rootfs.size}: {twice} twice"
        )
    assert twice == 0, "a cut must resume exactly where the last byte arrived"
    starts = [int(r.headers["range"].split("=")[1].rstrip("-")) for r in requests[1:]]
    assert starts == points, "every resume starts at the byte where the cut came"


@pytest.mark.parametrize(
    "faults",
    [
        pytest.param([Fault(reset_after=300_000), Fault(reset_after=900_000)], id="reset"),
        pytest.param([Fault(status=503), Fault(status=502), Fault(status=500)], id="5xx"),
        pytest.param([Fault(stall_after=500_000, stall_seconds=8)], id="stall"),
        pytest.param([Fault(cut_after=700_000), Fault(strip_range=True)], id="200-to-range"),
        pytest.param(
            [Fault(cut_after=100_000), Fault(strip_range=True, cut_after=400_000)],
            id="200-to-range-cut-again",
        ),
    ],
)
def test_faults_are_survived(
    image_device: Device, docroot: Docroot, fault_proxy: FaultProxy, faults: list[Fault]
) -> None:
    boot = docroot.add_random(2 * MiB + 11, name="boot.img")
    fault_proxy.script(*faults)
    task = task_for([entry(boot, fault_proxy.url(boot.name))])

    result = image_device.run("install", str(image_device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert image_device.parts["B.boot"].read(boot.size) == boot.read_bytes()
    assert fault_proxy.pending == 0, "every scripted fault was met"


def test_a_file_that_changed_on_the_server_starts_over(
    image_device: Device, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    old = docroot.add_random(2 * MiB, name="boot-old.img")
    new = docroot.add_random(2 * MiB, name="boot.img")
    # nginx's ETag is mtime and size: the replaced file is older than its replacement.
    os.utime(old.path, (old.path.stat().st_atime, old.path.stat().st_mtime - 3600))
    # The first answer is the old file, cut; then the server has the new one.
    fault_proxy.script(Fault(rewrite_path="/boot-old.img", cut_after=600_000))
    task = task_for([entry(new, fault_proxy.url(new.name))])

    result = image_device.run("install", str(image_device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert image_device.parts["B.boot"].read(new.size) == new.read_bytes()
    fault_proxy.wait_idle()
    requests = fault_proxy.requests
    assert requests[1].headers.get("if-range"), "the resume carried If-Range"
    # nginx answered the stale If-Range with the whole new file: taken as it came, no 3rd request.
    assert len(requests) == 2 and requests[1].status == 200
    assert fault_proxy.body_bytes_total == 600_000 + new.size
    assert old.read_bytes() != new.read_bytes()


def test_a_200_to_a_range_without_validators_is_taken_from_byte_0(
    image_device: Device, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    """Without ETag or Last-Modified nothing proves the prefix is the same file: never splice."""
    boot = docroot.add_random(2 * MiB, name="boot.img")
    fault_proxy.script(
        Fault(strip_validators=True, cut_after=700_000),
        Fault(strip_validators=True, strip_range=True),
    )
    task = task_for([entry(boot, fault_proxy.url(boot.name))])

    result = image_device.run("install", str(image_device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert image_device.parts["B.boot"].read(boot.size) == boot.read_bytes()
    assert "taking it from byte 0" in result.stderr
    fault_proxy.wait_idle()
    assert fault_proxy.requests[1].headers.get("range") == "bytes=700000-"
    assert "if-range" not in fault_proxy.requests[1].headers


@pytest.mark.parametrize(
    ("faults", "message"),
    [
        pytest.param([Fault(status=404)], "HTTP 404", id="404"),
        pytest.param([Fault(status=403)], "HTTP 403", id="403-expired-url"),
        pytest.param([Fault(status=503)] * 8, "gave up after 6 attempts", id="budget"),
        pytest.param(
            [Fault(cut_after=1_500_000), Fault(status=416)],
            "HTTP 416",
            id="416",
        ),
    ],
)
def test_download_failures_exit_3(
    image_device: Device,
    docroot: Docroot,
    fault_proxy: FaultProxy,
    faults: list[Fault],
    message: str,
) -> None:
    boot = docroot.add_random(2 * MiB, name="boot.img")
    fault_proxy.script(*faults)
    task = task_for([entry(boot, fault_proxy.url(boot.name))])

    result = image_device.run("install", str(image_device.task_file(task)), "--progress", "json")

    assert result.returncode == 3, result.stderr
    assert message in result.stderr
    failed = [e for e in json_events(result.stdout) if e["event"] == "failed"]
    assert failed and failed[0]["step"] == -2 and "boot.img" in str(failed[0]["desc"])
    assert image_device.journal()["state"] == "failed"


def test_content_length_that_disagrees_with_the_task(
    image_device: Device, docroot: Docroot, nginx: Nginx
) -> None:
    boot = docroot.add_random(2 * MiB, name="boot.img")
    task = task_for([("boot.img", nginx.url(boot.name), boot.size + 1, boot.sha256)])

    result = image_device.run("install", str(image_device.task_file(task)))

    assert result.returncode == 3
    assert "Content-Length" in result.stderr and str(boot.size + 1) in result.stderr


# -- verification --------------------------------------------------------------------------------


def test_digest_mismatch_exits_4_and_nothing_is_installed(
    device: Device, docroot: Docroot, nginx: Nginx
) -> None:
    boot = docroot.add_random(1 * MiB, name="boot.img")
    docroot.add_bytes("app.conf", b"new\n")
    (device.etc / "app.conf").write_bytes(b"old\n")
    before = device.snapshot()
    wrong = "0" * 64
    task = task_for(
        [entry(boot, nginx.url(boot.name)), ("app.conf", nginx.url("app.conf"), 4, wrong)]
    )

    result = device.run("install", str(device.task_file(task)), "--progress", "json")

    assert result.returncode == 4, result.stderr
    assert "digest mismatch" in result.stderr and "app.conf" in result.stderr
    failed = [e for e in json_events(result.stdout) if e["event"] == "failed"]
    assert failed[0]["step"] == -3
    assert (device.etc / "app.conf").read_bytes() == b"old\n"
    assert sorted(p.name for p in device.etc.iterdir()) == ["app.conf"]
    journal = device.journal()
    assert journal["state"] == "failed"
    assert_untouched_a(device, before)


# -- hostile input: exit 2, nothing written ------------------------------------------------------


def _hostile(name: str, nginx: Nginx, boot: ServedFile) -> dict[str, object]:
    good = {
        "fileName": "boot.img",
        "fileUrl": nginx.url("boot.img"),
        "fileSize": boot.size,
        "fileSign": boot.sha256,
    }
    cases: dict[str, list[dict[str, object]]] = {
        "string-size": [{**good, "fileSize": str(boot.size)}],
        "negative-size": [{**good, "fileSize": -1}],
        "huge-size": [{**good, "fileSize": 1 << 50}],
        "short-digest": [{**good, "fileSign": boot.sha256[:63]}],
        "md5-length-under-sha256": [{**good, "fileSign": boot.md5}],
        "http-url": [{**good, "fileUrl": nginx.url("boot.img").replace("https", "http")}],
        "unknown-file-name": [{**good, "fileName": "kernel8.img"}],
        "duplicate-names": [good, good],
        "path-in-name": [{**good, "fileName": "../boot.img"}],
        "larger-than-partition": [{**good, "fileSize": 4 * MiB + 1}],
        "two-files-one-target": [good, {**good, "fileName": "boot-2.img"}],
    }
    return {"version": "v9", "signMethod": "SHA256", "files": cases[name]}


HOSTILE = [
    "string-size",
    "negative-size",
    "huge-size",
    "short-digest",
    "md5-length-under-sha256",
    "http-url",
    "unknown-file-name",
    "duplicate-names",
    "path-in-name",
    "larger-than-partition",
    "two-files-one-target",
]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_task_exits_2_and_writes_nothing(
    device: Device, docroot: Docroot, nginx: Nginx, case: str
) -> None:
    boot = docroot.add_random(1 * MiB, name="boot.img")
    before = device.snapshot()

    result = device.run("install", str(device.task_file(_hostile(case, nginx, boot))))

    assert result.returncode == 2, result.stderr
    assert device.snapshot() == before
    assert not device.state_dir.exists()


def test_mqtt_download_protocol_is_refused(image_device: Device) -> None:
    task = {
        "version": "v1",
        "size": 10,
        "url": "https://127.0.0.1/x.img",
        "sign": "0" * 32,
        "signMethod": "Md5",
        "dProtocol": "mqtt",
    }
    result = image_device.run("install", str(image_device.task_file(task)))
    assert result.returncode == 2
    assert "dProtocol" in result.stderr


def test_a_target_on_the_booted_slot_is_refused(
    image_device: Device, docroot: Docroot, nginx: Nginx
) -> None:
    """Slot B's root named through a symlink to the image, at slot A's root offset."""
    alias = image_device.root / "alias.img"
    alias.symlink_to(image_device.image)
    slots = image_device.config["slots"]
    assert isinstance(slots, dict)
    a_root = slots["A"]["root"]
    slots["B"]["root"] = {**a_root, "image": str(alias), "partuuid": "1234abcd-06"}
    image_device.write_config(slots=slots)
    rootfs = docroot.add_random(1 * MiB, name="rootfs.img")
    before = image_device.snapshot()
    task = task_for([entry(rootfs, nginx.url(rootfs.name))])

    result = image_device.run("install", str(image_device.task_file(task)))

    assert result.returncode == 2, result.stderr
    assert "booted slot" in result.stderr
    assert image_device.snapshot() == before


def test_a_mounted_target_is_refused(
    tmp_path: Path, docroot: Docroot, nginx: Nginx, loop_devices: LoopDevices
) -> None:
    dev = build_device(tmp_path / "dev", loops=loop_devices, ca_file=nginx.ca_file)
    with mounted_ext4(dev.parts["B.root"].path, tmp_path / "mnt") as mnt:
        # The stand-in mountinfo must show it too: the engine reads the configured file.
        real = "".join(
            line
            for line in Path("/proc/self/mountinfo").read_text().splitlines(keepends=True)
            if line.split()[4] != "/"
        )
        mountinfo = Path(str(dev.config["system"]["mountinfo"]))  # type: ignore[index]
        mountinfo.write_text(mountinfo.read_text() + real)
        rootfs = docroot.add_random(1 * MiB, name="rootfs.img")
        (mnt / "canary").write_bytes(b"mounted and in use\n")
        task = task_for([entry(rootfs, nginx.url(rootfs.name))])

        result = dev.run("install", str(dev.task_file(task)))

        assert result.returncode == 2, result.stderr
        assert "mounted" in result.stderr and str(mnt) in result.stderr
        # The filesystem itself writes to its device while mounted; what must hold is that the
        # updater never opened it: the image's bytes are nowhere, the canary is intact.
        subprocess.run(["sync"], check=True)
        assert rootfs.read_bytes()[:65536] not in dev.parts["B.root"].read()
        assert (mnt / "canary").read_bytes() == b"mounted and in use\n"


# -- kill -9 and resume --------------------------------------------------------------------------


def durable_total(device: Device) -> int:
    """Bytes the journal records as durable, over all files."""
    try:
        files = device.journal().get("files", {})
    except json.JSONDecodeError:
        raise AssertionError("the journal was seen half-written") from None
    assert isinstance(files, dict)
    return sum(int(f.get("durable", 0)) for f in files.values())


def test_kill_9_five_times_then_resume(
    device: Device, docroot: Docroot, fault_proxy: FaultProxy, capsys: pytest.CaptureFixture[str]
) -> None:
    import signal
    import time

    rootfs = docroot.add_random(14 * MiB + 3, name="rootfs.img")
    boot = docroot.add_random(3 * MiB, name="boot.img")
    # Slow the transfer so that kills land mid-stream: every request stalls after 3 MiB.
    fault_proxy.default = Fault(stall_after=3 * MiB, stall_seconds=0.2)
    task = device.task_file(task_for([entry(f, fault_proxy.url(f.name)) for f in (boot, rootfs)]))
    total = boot.size + rootfs.size
    rng = random.Random(9)
    durable_at_kill: list[int] = []
    resume_points: list[tuple[str, int]] = []
    sizes = {boot.name: boot.size, rootfs.name: rootfs.size}
    for k in range(5):
        # Kill once the durable total passed a random point in the k-th sixth of the package.
        target = int(total * (k + rng.uniform(0.3, 0.9)) / 6)
        proc = device.start("install", str(task), "--progress", "none")
        deadline = time.monotonic() + 60
        while durable_total(device) < target:
            assert proc.poll() is None, "the install ended before it could be killed"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        durable_at_kill.append(durable_total(device))
        files = device.journal()["files"]
        assert isinstance(files, dict)
        resume_points.extend(
            (f"/{name}", int(rec["durable"]))
            for name, rec in files.items()
            if not rec.get("verified") and 0 < int(rec.get("durable", 0)) < sizes[name]
        )
    fault_proxy.default = None

    result = device.run("install", str(task))

    assert result.returncode == 0, result.stderr
    assert device.parts["B.boot"].read(boot.size) == boot.read_bytes()
    assert device.parts["B.root"].read(rootfs.size) == rootfs.read_bytes()
    fault_proxy.wait_idle()
    twice = fault_proxy.body_bytes_total - total
    with capsys.disabled():
        print(f"\nkill -9 x5: durable at kills {durable_at_kill}; {twice} bytes fetched twice")
    assert durable_at_kill == sorted(durable_at_kill) and durable_at_kill[-1] > 0
    # Each restart refetches at most what was not yet durable: one fsync interval, plus what
    # was in flight in the pipeline when the kill came.
    assert twice <= 5 * (1 * MiB + 2 * MiB)
    ranges = {(r.path, r.headers.get("range")) for r in fault_proxy.requests}
    for path, durable in resume_points:
        assert (path, f"bytes={durable}-") in ranges, f"{path} resumed from byte {durable}"


def test_a_second_install_while_one_runs_is_refused(
    image_device: Device, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    import time

    boot = docroot.add_random(2 * MiB, name="boot.img")
    fault_proxy.script(Fault(stall_after=1 * MiB, stall_seconds=3))
    task = image_device.task_file(task_for([entry(boot, fault_proxy.url(boot.name))]))
    first = image_device.start("install", str(task))
    try:
        deadline = time.monotonic() + 20
        while not fault_proxy.requests:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        second = image_device.run("install", str(task))
        assert second.returncode == 1
        assert f"another rpi-updater (pid {first.pid}) is installing" in second.stderr
    finally:
        assert first.wait(timeout=30) == 0
    assert image_device.parts["B.boot"].read(boot.size) == boot.read_bytes()


def test_a_file_target_on_a_slot_filesystem_is_refused(
    tmp_path: Path, docroot: Docroot, nginx: Nginx, loop_devices: LoopDevices
) -> None:
    """/etc of the booted root is the running system; a file target belongs on the data part."""
    dev = build_device(tmp_path / "dev", loops=loop_devices, ca_file=nginx.ca_file)
    with mounted_ext4(dev.parts["A.root"].path, tmp_path / "root-a") as mnt:
        (mnt / "etc").mkdir()
        (mnt / "etc" / "app.conf").write_bytes(b"running\n")
        configured = dev.config["targets"]
        assert isinstance(configured, list)
        configured[2]["file"] = str(mnt / "etc" / "app.conf")
        dev.write_config(targets=configured)
        docroot.add_bytes("app.conf", b"new\n")
        digest = hashlib.sha256(b"new\n").hexdigest()
        task = task_for([("app.conf", nginx.url("app.conf"), 4, digest)])

        result = dev.run("install", str(dev.task_file(task)))

        assert result.returncode == 2, result.stderr
        assert "is on part 'root' of slot A" in result.stderr
        assert (mnt / "etc" / "app.conf").read_bytes() == b"running\n"
        assert sorted(p.name for p in (mnt / "etc").iterdir()) == ["app.conf"]
