"""The FileStream pipeline (fill, hash, write, sync threads) on a sink we control: errors from
any of its threads reach the caller, and a sync from before a restart never counts."""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from updater.config import PartSpec
from updater.errors import WriteError
from updater.sinks import PartitionSink, _direct_ok
from updater.slots import Device
from updater.stream import FileStream

MiB = 1 << 20


class Sink:
    """In memory; a sync on the syncer thread fails late, as an fdatasync returning EIO to
    only one of two callers does."""

    resumable = True

    def __init__(self, fail_syncer: bool = False) -> None:
        self.data = bytearray()
        self.syncs: list[str] = []
        self.fail_syncer = fail_syncer

    def write_at(self, offset: int, view: memoryview) -> None:
        self.data[offset : offset + len(view)] = view

    def read_at(self, offset: int, n: int) -> bytes:
        return bytes(self.data[offset : offset + n])

    def sync(self) -> None:
        name = threading.current_thread().name
        self.syncs.append(name)
        if self.fail_syncer and name.startswith("syncer"):
            time.sleep(0.2)
            raise WriteError("cannot sync: Input/output error")

    def reset(self) -> None:
        self.data.clear()

    def close(self) -> None:
        pass


def stream(sink: Sink, durable: list[int], size: int = 4 * MiB) -> FileStream:
    return FileStream(
        sink,
        size=size,
        digest_method="sha256",
        buffer_size=MiB,
        fsync_interval=MiB,
        file_name="f",
        on_durable=durable.append,
        on_bytes=lambda n: None,
    )


def test_a_failed_watermark_sync_fails_the_finish() -> None:
    durable: list[int] = []
    sink = Sink(fail_syncer=True)
    s = stream(sink, durable)
    try:
        s.write(b"x" * (4 * MiB))
        with pytest.raises(WriteError, match="Input/output error"):
            s.finish()
    finally:
        s.close()
    assert 4 * MiB not in durable, "the end was never durable"


def test_the_pipeline_hashes_and_writes_every_byte_in_order() -> None:
    data = bytes(range(256)) * (5 * MiB // 256) + b"tail"
    durable: list[int] = []
    sink = Sink()
    s = stream(sink, durable, size=len(data))
    try:
        for i in range(0, len(data), 100_000):
            s.write(data[i : i + 100_000])
        assert s.finish() == hashlib.sha256(data).hexdigest()
    finally:
        s.close()
        s.close()  # idempotent
    assert bytes(sink.data) == data
    assert durable == sorted(durable) and durable[-1] == len(data)


def test_a_restart_resets_durable_before_anything_else() -> None:
    durable: list[int] = []
    sink = Sink()
    s = stream(sink, durable)
    try:
        s.write(b"a" * (3 * MiB))
        s.checkpoint()
        s.restart()
        assert durable[-1] == 0 and s.durable == 0
        s.write(b"b" * (4 * MiB))
        assert s.finish() == hashlib.sha256(b"b" * (4 * MiB)).hexdigest()
    finally:
        s.close()
    assert durable[-1] == 4 * MiB


# -- the partition sink's O_DIRECT path ------------------------------------------------------------


def _image_sink(path: Path, size: int) -> PartitionSink:
    with path.open("wb") as f:
        f.truncate(size)
    part = Device(str(path), 4096, size - 4096, False, None, PartSpec("image", str(path)))
    return PartitionSink(part, file_name="f", target="rootfs")


def test_aligned_buffers_go_direct_and_the_rest_buffered_with_the_same_bytes() -> None:
    """Aligned writes take O_DIRECT; an unaligned offset, length or a read-only buffer goes
    through the page cache; the bytes are the same either way."""
    path = Path(tempfile.mkdtemp(dir="/var/tmp")) / "part.img"
    sink = _image_sink(path, 4 * MiB)
    try:
        assert sink._direct >= 0, "ext4 has O_DIRECT"
        aligned = mmap.mmap(-1, MiB)
        aligned.write(os.urandom(MiB))
        assert _direct_ok(4096 + MiB, memoryview(aligned))
        sink.write_at(MiB, memoryview(aligned))
        tail = os.urandom(1000)
        assert not _direct_ok(4096 + 2 * MiB, memoryview(tail))  # read-only, short
        sink.write_at(2 * MiB, memoryview(tail))
        assert not _direct_ok(4096 + 5, memoryview(aligned))  # misaligned offset
        sink.write_at(5, memoryview(aligned)[:4096])
        sink.sync()
        assert sink.read_at(MiB, MiB) == aligned[:]
        assert sink.read_at(2 * MiB, 1000) == tail
        assert sink.read_at(5, 4096) == aligned[:4096]
    finally:
        sink.close()
        shutil.rmtree(path.parent)


def test_a_device_that_refuses_direct_writes_is_written_buffered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    path = Path(tempfile.mkdtemp(dir="/var/tmp")) / "part.img"
    sink = _image_sink(path, 4 * MiB)
    real = os.pwrite

    def pwrite(fd: int, data: Any, offset: int) -> int:
        if fd == sink._direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    try:
        aligned = mmap.mmap(-1, MiB)
        aligned.write(os.urandom(MiB))
        sink.write_at(0, memoryview(aligned))
        assert sink._direct == -1, "O_DIRECT given up after EINVAL"
        sink.write_at(MiB, memoryview(aligned))
        assert sink.read_at(0, MiB) == sink.read_at(MiB, MiB) == aligned[:]
    finally:
        sink.close()
        shutil.rmtree(path.parent)
