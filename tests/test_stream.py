"""The FileStream pipeline (fill, hash, write, sync threads) on a sink we control: errors from
any of its threads reach the caller, and a sync from before a restart never counts."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from updater.errors import WriteError
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
