"""Compressed payloads end to end: packages built by the bundle code with zstd (frames), xz and
gzip, installed by ``rpi-updater install`` into loop-backed slots, through faults.

What lands on the partition must be the image byte for byte; a stream that is truncated,
corrupt, or decompresses to more than the manifest declares fails with step -3 and the slot is
not armed; a restart of a zstd file fetches again at most about one frame.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.harness import Docroot, Nginx
from tests.harness.device import Device, MiB, build_device
from tests.harness.faultproxy import Fault, FaultProxy
from tests.harness.loopdev import LoopDevices
from tests.harness.signing import Vendor
from updater.encode import Compression
from updater.manifest import ManifestFile

FRAME = 256 * 1024  # small frames, so that a 12 MiB image has many resume points


@pytest.fixture
def vendor(trusted_dir: Path, tmp_path: Path) -> Vendor:
    return Vendor.create(trusted_dir, tmp_path / "vendor")


@pytest.fixture
def device(tmp_path: Path, nginx: Nginx, vendor: Vendor, loop_devices: LoopDevices) -> Device:
    dev = build_device(
        tmp_path / "dev", loops=loop_devices, ca_file=nginx.ca_file, root_size=32 * MiB
    )
    dev.write_config(security={"keyring": str(vendor.keyring)})
    return dev


def image(size: int, seed: int) -> bytes:
    """Compressible like a filesystem image: random blocks between runs of zeros and text."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        kind = rng.random()
        n = rng.randrange(4096, 256 * 1024)
        if kind < 0.3:
            out += rng.randbytes(n)
        elif kind < 0.7:
            out += bytes(n)
        else:
            out += (b"ext4 inode table %d " % rng.randrange(10**6)) * (n // 24)
    return bytes(out[:size])


def package_files(seed: int = 1, rootfs_size: int = 12 * MiB) -> list[tuple[str, bytes, str, str]]:
    return [
        ("boot.img", image(1 * MiB, seed), "boot", "a1"),
        ("rootfs.img", image(rootfs_size, seed + 1), "rootfs", "b1"),
        ("app.conf", b"version = 1\n" * 40, "config", "c1"),
    ]


def install(device: Device, task: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    result = device.run("install", str(device.task_file(task)), "--progress", "json")
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result, lines


def manifest_entries(package_dir: Path) -> dict[str, dict[str, Any]]:
    import base64

    envelope = json.loads((package_dir / "manifest.json").read_text())
    body = json.loads(base64.b64decode(envelope["payload"]))
    return {f["name"]: f for f in body["files"]}


def assert_installed(device: Device, files: list[tuple[str, bytes, str, str]]) -> None:
    assert device.parts["B.boot"].read(len(files[0][1])) == files[0][1]
    assert device.parts["B.root"].read(len(files[1][1])) == files[1][1]
    assert (device.etc / "app.conf").read_bytes() == files[2][1]
    state = json.loads((device.state_dir / "state.json").read_text())
    assert state["state"] == "armed"


def assert_failed_unarmed(
    device: Device, result: Any, lines: list[dict[str, Any]], reason: str
) -> None:
    assert result.returncode == 4, result.stderr
    failed = [line for line in lines if line["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["step"] == -3, lines
    assert reason in failed[0]["desc"], failed[0]["desc"]
    state = json.loads((device.state_dir / "state.json").read_text())
    assert state["state"] == "idle" and state["last_result"]["step"] == -3
    assert not state["reboot_required"]
    assert not (device.etc / "app.conf").exists()


# -- every encoding, end to end ------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["zstd", "xz", "gzip"])
def test_compressed_package_lands_byte_for_byte(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx, encoding: str
) -> None:
    files = package_files()
    package = vendor.publish(
        docroot, nginx, files, compression=Compression(encoding, frame_size=FRAME)
    )
    entries = manifest_entries(package.directory)
    assert entries["rootfs.img"]["encoding"] == encoding
    served = (package.directory / "rootfs.img").stat().st_size
    assert served == entries["rootfs.img"]["encoded_size"] < len(files[1][1]) // 2
    before_a = (device.snapshot()["A.boot"], device.snapshot()["A.root"])

    result, lines = install(device, package.task)

    assert result.returncode == 0, result.stderr
    assert_installed(device, files)
    assert (device.snapshot()["A.boot"], device.snapshot()["A.root"]) == before_a
    done = lines[-1]
    assert done["event"] == "done" and done["percent"] == 100
    assert done["total"] == sum(  # progress counts the bytes transferred
        (package.directory / name).stat().st_size for name in ("boot.img", "rootfs.img", "app.conf")
    )


def test_zstd_frames_written_by_bundle_are_independent_with_sizes(
    vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    files = package_files()
    package = vendor.publish(
        docroot, nginx, files, compression=Compression("zstd", frame_size=FRAME)
    )
    data = (package.directory / "rootfs.img").read_bytes()
    frames = 0
    offset = 0
    while offset < len(data):
        params = zstandard.get_frame_parameters(data[offset:])
        assert params.content_size == min(FRAME, len(files[1][1]) - frames * FRAME)
        assert params.has_checksum
        one = zstandard.ZstdDecompressor().decompressobj()
        one.decompress(data[offset:])
        offset = len(data) - len(one.unused_data)
        frames += 1
    assert frames == -(-len(files[1][1]) // FRAME)


def test_incompressible_file_is_stored_as_is(
    vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    files = [("boot.img", os.urandom(1 * MiB), "boot", "a1")]
    package = vendor.publish(docroot, nginx, files, version="a1", compression=Compression("zstd"))
    entry = manifest_entries(package.directory)["boot.img"]
    assert "encoding" not in entry
    assert (package.directory / "boot.img").read_bytes() == files[0][1]


# -- faults during a zstd stream ------------------------------------------------------------------


def test_cuts_during_a_zstd_stream_resume_into_the_same_decoder(
    device: Device, vendor: Vendor, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    files = package_files(seed=3)
    rootfs = files[1]
    package = vendor.publish(
        docroot, fault_proxy, [rootfs], compression=Compression("zstd", frame_size=FRAME)
    )
    served = (package.directory / "rootfs.img").stat().st_size
    # Cut at 8 random points of the file: each resumed answer's body starts at the last cut.
    points = sorted(random.Random(5).sample(range(1, served), 8))
    cuts = [Fault(cut_after=b - a) for a, b in zip([0, *points], points, strict=False)]
    fault_proxy.script(Fault(), *cuts)  # the manifest, then rootfs

    result, _ = install(device, package.task)

    assert result.returncode == 0, result.stderr
    assert device.parts["B.root"].read(len(rootfs[1])) == rootfs[1]
    ranges = [r.headers.get("range") for r in fault_proxy.requests if r.path.endswith("rootfs.img")]
    assert len(ranges) == 9 and ranges[0] is None and all(ranges[1:]), ranges
    assert (
        fault_proxy.body_bytes_total
        == served + (package.directory / "manifest.json").stat().st_size
    )


def test_kill_9_during_a_zstd_stream_refetches_at_most_about_a_frame(
    device: Device,
    vendor: Vendor,
    docroot: Docroot,
    fault_proxy: FaultProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = package_files(seed=7, rootfs_size=24 * MiB)
    package = vendor.publish(
        docroot, fault_proxy, files, compression=Compression("zstd", frame_size=FRAME)
    )
    names = ("manifest.json", "boot.img", "rootfs.img", "app.conf")
    total = sum((package.directory / n).stat().st_size for n in names)
    rootfs_served = (package.directory / "rootfs.img").stat().st_size
    fault_proxy.default = Fault(stall_after=512 * 1024, stall_seconds=0.15)
    # A durable checkpoint at every frame end (download.fsync_interval = the frame size): what
    # a restart fetches again is then the frame in progress and what was in flight.
    download = dict(device.config["download"])  # type: ignore[call-overload]
    download["fsync_interval"] = FRAME
    device.write_config(download=download)
    task = device.task_file(package.task)
    rng = random.Random(11)
    kills = 0
    resumed_at: list[int] = []
    for k in range(4):
        goal = int(rootfs_served * (k + rng.uniform(0.2, 0.8)) / 4)
        proc = device.start("install", str(task), "--progress", "none")
        deadline = time.monotonic() + 60
        while encoded_offset(device) < goal:
            assert proc.poll() is None, "the install ended before it could be killed"
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        kills += 1
        resumed_at.append(encoded_offset(device))
    fault_proxy.default = None

    result = device.run("install", str(task))

    assert result.returncode == 0, result.stderr
    assert_installed(device, files)
    fault_proxy.wait_idle()
    twice = fault_proxy.body_bytes_total - total
    with capsys.disabled():
        print(f"\nzstd kill -9 x{kills}: resumed at {resumed_at}; {twice} bytes fetched twice")
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] > 0
    # Per kill: the frame in progress, plus the writer's queue in flight (two 256 KiB
    # buffers): at most three frames of image, and the bytes counted here are compressed.
    assert twice <= kills * 3 * FRAME
    ranges = {r.headers.get("range") for r in fault_proxy.requests if r.path.endswith("rootfs.img")}
    for offset in resumed_at:
        assert f"bytes={offset}-" in ranges, f"resumed from compressed byte {offset}"


def encoded_offset(device: Device) -> int:
    try:
        files = device.journal().get("files", {})
    except json.JSONDecodeError:
        raise AssertionError("the journal was seen half-written") from None
    assert isinstance(files, dict)
    record = files.get("rootfs.img", {})
    return int(record.get("encoded_offset") or 0)


# -- hostile streams under a valid signature ------------------------------------------------------


def raw_entry(
    name: str, target: str, version: str, img: bytes, served: bytes, encoding: str = "zstd"
) -> ManifestFile:
    return ManifestFile(
        name=name,
        size=len(img),
        sha256=hashlib.sha256(img).hexdigest(),
        version=version,
        target=target,
        encoding=encoding,
        encoded_size=len(served),
        encoded_sha256=hashlib.sha256(served).hexdigest(),
    )


def frames_of(data: bytes, size: int = FRAME) -> bytes:
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
    return b"".join(cctx.compress(data[i : i + size]) for i in range(0, len(data), size))


def test_truncated_zstd_stream_fails_verification_and_arms_nothing(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    img = image(4 * MiB, 21)
    served = frames_of(img)[:-1000]
    package = vendor.publish_raw(
        docroot, nginx, [(raw_entry("rootfs.img", "rootfs", "b1", img, served), served)]
    )

    result, lines = install(device, package.task)

    assert_failed_unarmed(device, result, lines, "truncated")


def test_corrupt_zstd_stream_fails_verification_and_arms_nothing(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    img = image(4 * MiB, 22)
    served = bytearray(frames_of(img))
    served[len(served) // 2] ^= 0x55
    package = vendor.publish_raw(
        docroot,
        nginx,
        [(raw_entry("rootfs.img", "rootfs", "b1", img, bytes(served)), bytes(served))],
    )

    result, lines = install(device, package.task)

    assert_failed_unarmed(device, result, lines, "corrupt zstd stream")


@pytest.mark.parametrize("encoding", ["zstd", "xz", "gzip"])
def test_decompression_bomb_is_stopped_at_the_declared_size(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx, encoding: str
) -> None:
    import gzip
    import lzma

    declared = 1 * MiB
    bomb = bytes(30 * MiB)  # fits the 32 MiB slot, so only the declared size can stop it
    served = {
        "zstd": lambda: zstandard.ZstdCompressor(level=19).compress(bomb),
        "xz": lambda: lzma.compress(bomb),
        "gzip": lambda: gzip.compress(bomb),
    }[encoding]()
    entry = raw_entry("rootfs.img", "rootfs", "b1", bomb[:declared], served, encoding)
    package = vendor.publish_raw(docroot, nginx, [(entry, served)])
    marker = b"untouched" * 1000
    device.parts["B.root"].write(bytes(declared) + marker)

    result, lines = install(device, package.task)

    assert_failed_unarmed(device, result, lines, f"decompresses to more than the {declared} bytes")
    after = device.parts["B.root"].read(declared + len(marker))
    assert after[declared:] == marker, "bytes beyond the declared size were written"


def test_decompressed_size_must_fit_the_partition(
    device: Device, vendor: Vendor, docroot: Docroot, nginx: Nginx
) -> None:
    img = bytes(40 * MiB)  # the slot's root part is 32 MiB; compressed it is tiny
    served = frames_of(img, 4 * MiB)
    package = vendor.publish_raw(
        docroot, nginx, [(raw_entry("rootfs.img", "rootfs", "b1", img, served), served)]
    )
    before = device.snapshot()

    result, _ = install(device, package.task)

    assert result.returncode == 2, result.stderr
    assert f"{40 * MiB} bytes do not fit" in result.stderr
    assert device.snapshot() == before


# -- the journal's resume fields stay true --------------------------------------------------------


class _Journal:
    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.log: list[dict[str, Any]] = []

    def point(self, p: Any) -> None:
        update = {
            "durable": p.image_offset,
            "encoded_offset": p.offset or None,
            "transfer_state": p.transfer_state or None,
        }
        self.fields.update(update)
        self.log.append(update)


def _decoded_stream(tmp_path: Path, size: int, journal: _Journal) -> Any:
    from updater.config import PartSpec
    from updater.decode import DecodedStream, make_decoder
    from updater.sinks import PartitionSink
    from updater.slots import Device as Part
    from updater.stream import FileStream

    path = tmp_path / "part.img"
    with path.open("wb") as f:
        f.truncate(size)
    sink = PartitionSink(
        Part(str(path), 0, size, False, None, PartSpec("image", str(path))),
        file_name="f",
        target="rootfs",
    )
    holder: list[Any] = []
    stream = FileStream(
        sink,
        size=size,
        digest_method="sha256",
        buffer_size=256 * 1024,
        fsync_interval=256 * 1024,
        file_name="f",
        on_durable=lambda n: holder[0].image_durable(n) if holder else None,
        on_bytes=lambda n: None,
    )
    decoded = DecodedStream(
        stream,
        make_decoder("zstd", "f"),
        digest_method="sha256",
        file_name="f",
        on_bytes=lambda n: None,
        on_resume_point=journal.point,
    )
    holder.append(decoded)
    return sink, stream, decoded


def test_a_file_that_starts_over_clears_its_resume_point_first(tmp_path: Path) -> None:
    """The file changed on the server: the journal must not keep the old version's resume
    point (a power cut then would splice the old prefix onto the new file)."""
    img = image(2 * MiB, 31)
    journal = _Journal()
    sink, stream, decoded = _decoded_stream(tmp_path, len(img), journal)
    served = frames_of(img)
    try:
        decoded.write(served[: len(served) * 3 // 4])
        decoded.checkpoint()
        assert journal.fields["encoded_offset"], "a resume point was recorded"

        decoded.restart()

        assert journal.fields == {"durable": 0, "encoded_offset": None, "transfer_state": None}
        decoded.write(served)
        transfer, image_sha256 = decoded.finish()
    finally:
        stream.close()
        sink.close()
    assert image_sha256 == hashlib.sha256(img).hexdigest()
    assert transfer == hashlib.sha256(served).hexdigest()


def test_an_unusable_transfer_state_starts_the_file_over(
    device: Device, vendor: Vendor, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    files = package_files(seed=41)
    package = vendor.publish(
        docroot, fault_proxy, files, compression=Compression("zstd", frame_size=FRAME)
    )
    fault_proxy.default = Fault(stall_after=512 * 1024, stall_seconds=0.2)
    task = device.task_file(package.task)
    proc = device.start("install", str(task), "--progress", "none")
    deadline = time.monotonic() + 60
    while encoded_offset(device) == 0:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    fault_proxy.default = None
    journal_path = device.state_dir / "journal.json"
    journal = json.loads(journal_path.read_text())
    journal["files"]["rootfs.img"]["transfer_state"] = "sha256:" + "00" * 112  # inconsistent
    journal_path.write_text(json.dumps(journal))

    result = device.run("install", str(task))

    assert result.returncode == 0, result.stderr
    assert_installed(device, files)
    ranges = [r.headers.get("range") for r in fault_proxy.requests if r.path.endswith("rootfs.img")]
    assert ranges[-1] is None, "the last request of rootfs.img started from byte 0"
