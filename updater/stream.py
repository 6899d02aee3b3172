"""The path of one file's bytes from the network to its sink: buffer, hash, write, make durable.

The download thread (libcurl's callbacks) only copies bytes into large buffers; a writer thread
hashes each full buffer and writes it at its offset. hashlib and ``pwrite`` release the GIL, so
TLS decryption, hashing and writing overlap on two cores. Buffers end on multiples of the
buffer size, so writes stay aligned even after a resume from an odd offset.

Every ``fsync_interval`` bytes (and at every checkpoint) the writer syncs the sink and reports the
durable offset, which the engine records in the journal: after a power cut, the prefix up to that
offset is known to be on the target.
"""

from __future__ import annotations

import hashlib
import mmap
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from updater.errors import DownloadError, UpdaterError, WriteError

if TYPE_CHECKING:
    from updater.sinks import Sink

READ_BACK_CHUNK = 4 << 20
QUEUE_DEPTH = 2  # buffers waiting at each stage (hasher, writer)
BUFFERS = 2 * QUEUE_DEPTH  # besides the one being filled


def new_hasher(method: str) -> hashlib._Hash:
    return hashlib.md5(usedforsecurity=False) if method == "md5" else hashlib.sha256()


class Digests:
    """One pass of the bytes, several digests: the task's own method, and SHA-256 when a signed
    manifest vouches for the file but the task speaks MD5."""

    __slots__ = ("_hashers", "methods")

    def __init__(self, methods: tuple[str, ...]) -> None:
        self.methods = tuple(dict.fromkeys(methods))  # the same method twice is hashed once
        self._hashers = [new_hasher(m) for m in self.methods]

    def update(self, data: bytes | memoryview) -> None:
        for hasher in self._hashers:
            hasher.update(data)

    def hexdigests(self) -> dict[str, str]:
        return {m: h.hexdigest() for m, h in zip(self.methods, self._hashers, strict=True)}


class _Flush:
    """A request to the writer thread: sync, then signal."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_Item = tuple[int, mmap.mmap, int] | _Flush | None


def _buffer(size: int) -> mmap.mmap:
    """A page-aligned buffer (anonymous memory): a sink may hand it to the kernel with
    O_DIRECT, which needs aligned memory, and skip the page cache's copy."""
    return mmap.mmap(-1, size)


class FileStream:
    """Receives one file's bytes in order and owns its offset, digest and durability.

    ``write`` is called from the download thread; errors of the writer thread (a full disk, an
    I/O error) surface on the next ``write`` or ``checkpoint``.
    """

    def __init__(
        self,
        sink: Sink,
        *,
        size: int,
        digest_method: str,
        buffer_size: int,
        fsync_interval: int,
        file_name: str,
        on_durable: Callable[[int], None],
        on_bytes: Callable[[int], None],
        extra_digests: tuple[str, ...] = (),
    ) -> None:
        self.sink = sink
        self.size = size
        self.digest_method = digest_method
        self.buffer_size = buffer_size
        self.fsync_interval = fsync_interval
        self.file_name = file_name
        self.on_durable = on_durable
        self.on_bytes = on_bytes
        self._methods = (digest_method, *extra_digests)
        self.hasher = Digests(self._methods)
        self.offset = 0  # bytes accepted (written or queued)
        self.durable = 0  # bytes known to be on the sink after a sync
        self._buf = _buffer(buffer_size)
        self._fill = 0
        self._buf_start = 0
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self._free.put(_buffer(buffer_size))
        # Three stages, each on its own thread: the caller fills buffers, the hasher hashes
        # them, the writer writes them. Hashing and writing are the two heavy parts; on their
        # own threads they overlap (hashlib and pwrite release the GIL).
        self._hash_queue: queue.Queue[_Item] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._unsynced = 0
        # Watermark syncs run on a thread of their own, so that the writer (and the download
        # behind it) goes on while the kernel writes the last interval back: a blocking sync
        # every interval would stall the whole pipeline for as long as the disk takes.
        self._sync_lock = threading.Lock()  # durable and on_durable, in order
        self._sync_wanted = threading.Condition()
        self._sync_request: tuple[int, int] | None = None  # (generation, offset)
        self._generation = 0  # bumped by restart(): a sync from before it must not count
        self._stopping = False
        self._closed = False
        # One sync at a time: a write-back error is reported to only one of two concurrent
        # fdatasync calls, and a checkpoint must not succeed while the syncer's failed.
        self._sync_io = threading.Lock()
        self._syncer = threading.Thread(target=self._sync_loop, name=f"syncer:{file_name}")
        self._syncer.daemon = True
        self._syncer.start()
        self._hash_thread = threading.Thread(target=self._hasher, name=f"hasher:{file_name}")
        self._hash_thread.daemon = True
        self._hash_thread.start()
        self._thread = threading.Thread(target=self._writer, name=f"writer:{file_name}")
        self._thread.daemon = True
        self._thread.start()

    # -- download side -------------------------------------------------------------------------

    def resume_from(self, durable: int) -> None:
        """Continue after a restart: hash the prefix already durable on the sink."""
        if durable <= 0 or not self.sink.resumable:
            return
        position = 0
        while position < durable:
            chunk = self.sink.read_at(position, min(READ_BACK_CHUNK, durable - position))
            if not chunk:
                raise WriteError(
                    f"the target ends at {position} bytes, the journal says {durable}",
                    file_name=self.file_name,
                )
            self.hasher.update(chunk)
            position += len(chunk)
        self.offset = self.durable = self._buf_start = durable
        self.on_bytes(durable)

    def write(self, data: bytes) -> None:
        """Accept the next bytes of the file (called from libcurl's write callback)."""
        if self._error is not None:
            raise self._error
        if self.offset + len(data) > self.size:
            raise DownloadError(
                f"the server sent more than the {self.size} bytes the task declares",
                offset=self.offset,
                file_name=self.file_name,
            )
        view = memoryview(data)
        while view:
            room = self._boundary() - (self._buf_start + self._fill)
            take = min(room, len(view))
            self._buf[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill and self._buf_start + self._fill == self._boundary():
                self._submit()
        self.offset += len(data)
        self.on_bytes(len(data))

    def _boundary(self) -> int:
        """End of the current buffer: the next multiple of the buffer size (or the file end)."""
        end = (self._buf_start // self.buffer_size + 1) * self.buffer_size
        return min(end, self.size)

    def _submit(self) -> None:
        buf = self._buf
        self._buf = self._free.get()
        self._hash_queue.put((self._buf_start, buf, self._fill))
        self._buf_start += self._fill
        self._fill = 0

    def checkpoint(self) -> int:
        """Write what is buffered, sync the sink, and return the durable offset."""
        if self._fill:
            self._submit()
        flush = _Flush()
        self._hash_queue.put(flush)
        flush.done.wait()
        if self._error is not None:
            raise self._error
        return self.durable

    def restart(self) -> None:
        """Start the file over from byte 0 (it changed on the server)."""
        self.checkpoint()
        self.sink.reset()
        self.hasher = Digests(self._methods)
        undone = self.offset
        with self._sync_lock:
            self._generation += 1
            self.offset = self.durable = self._buf_start = 0
            self.on_durable(0)
        self.on_bytes(-undone)  # last: it may raise (a cancellation), the reset is done

    def finish(self) -> str:
        """Make everything durable; return the hex digest of all bytes of the file."""
        self.checkpoint()
        return self.hasher.hexdigests()[self.digest_method]

    def digests(self) -> dict[str, str]:
        """Every digest computed (after :meth:`finish`): method -> hex."""
        return self.hasher.hexdigests()

    def close(self) -> None:
        """Stop the threads (idempotent); the sink stays open (its owner closes it)."""
        if self._closed:
            return
        self._closed = True
        self._hash_queue.put(None)  # passed on to the writer
        self._hash_thread.join()
        self._thread.join()
        with self._sync_wanted:
            self._stopping = True
            self._sync_wanted.notify()
        self._syncer.join()

    # -- writer thread -------------------------------------------------------------------------

    def _hasher(self) -> None:
        while True:
            item = self._hash_queue.get()
            if isinstance(item, tuple) and self._error is None:
                _, buf, length = item
                try:
                    self.hasher.update(memoryview(buf)[:length])
                except BaseException as err:  # surfaced on the download thread
                    self._error = _wrap(err, self)
            self._queue.put(item)
            if item is None:
                return

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, _Flush):
                self._sync()
                item.done.set()
                continue
            start, buf, length = item
            if self._error is None:
                try:
                    view = memoryview(buf)[:length]
                    self.sink.write_at(start, view)
                    self._unsynced += length
                    if self._unsynced >= self.fsync_interval:
                        self._unsynced = 0
                        self._request_sync(start + length)
                except BaseException as err:  # surfaced on the download thread
                    self._error = err if isinstance(err, UpdaterError) else _wrap(err, self)
            self._free.put(buf)

    def _sync(self) -> None:
        """A checkpoint: everything submitted so far is durable when this returns."""
        self._unsynced = 0
        self._sync_to(self._generation, self._buf_start)

    def _request_sync(self, offset: int) -> None:
        """Ask the syncer to make ``offset`` durable; a newer request replaces a waiting one."""
        with self._sync_wanted:
            self._sync_request = (self._generation, offset)
            self._sync_wanted.notify()

    def _sync_loop(self) -> None:
        while True:
            with self._sync_wanted:
                while self._sync_request is None and not self._stopping:
                    self._sync_wanted.wait()
                if self._sync_request is None:
                    return
                generation, offset = self._sync_request
                self._sync_request = None
            self._sync_to(generation, offset)

    def _sync_to(self, generation: int, offset: int) -> None:
        """Sync the sink; the bytes before ``offset`` (all written before the call) are durable."""
        with self._sync_io:
            if self._error is not None:
                return
            self._sync_locked(generation, offset)

    def _sync_locked(self, generation: int, offset: int) -> None:
        try:
            self.sink.sync()
            with self._sync_lock:
                if generation == self._generation and offset > self.durable:
                    self.durable = offset
                    self.on_durable(offset)
        except BaseException as err:
            self._error = err if isinstance(err, UpdaterError) else _wrap(err, self)


def _wrap(err: BaseException, stream: FileStream) -> WriteError:
    wrapped = WriteError(f"writing failed: {err}", file_name=stream.file_name)
    wrapped.__cause__ = err
    return wrapped
