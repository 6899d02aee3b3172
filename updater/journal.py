"""Durable state: JSON files replaced atomically, so a power cut leaves the old or the new content.

The write order is the classic one: write a temporary file in the same directory, fsync it,
rename it over the old name, fsync the directory. A reader never sees a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from updater.errors import StateError

MAX_STATE_BYTES = 4 << 20


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename, directory fsync."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        fsync_dir(path.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StateError(f"cannot write {path}: {err.strerror or err}") from err


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n")


def read_json(path: Path) -> object:
    """The decoded content of ``path``, or None when it does not exist."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StateError(f"cannot read {path}: {err.strerror or err}") from err
    if len(data) > MAX_STATE_BYTES:
        raise StateError(f"{path} is larger than {MAX_STATE_BYTES} bytes")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise StateError(f"{path} is not valid JSON: {err}") from err


class Journal:
    """One JSON document in the state directory, updated in memory and saved atomically.

    Thread-safe: the download's writer thread records durable offsets while the main thread
    records other progress.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.data: dict[str, Any] = {}
        self.reload()

    def reload(self) -> None:
        """Read the document again (another process may have written it before we took the lock)."""
        loaded = read_json(self.path)
        if loaded is not None and not isinstance(loaded, dict):
            raise StateError(f"{self.path} does not hold a JSON object")
        with self._lock:
            self.data = loaded or {}

    @classmethod
    def open(cls, state_dir: Path, name: str = "journal.json") -> Journal:
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            raise StateError(f"cannot create state directory {state_dir}: {err}") from err
        return cls(state_dir / name)

    def save(self) -> None:
        with self._lock:
            atomic_write_json(self.path, self.data)

    def reset(self, data: dict[str, Any]) -> None:
        with self._lock:
            self.data = data
            atomic_write_json(self.path, self.data)

    def update_file(self, name: str, **fields: object) -> None:
        """Merge ``fields`` into the record of one file and save."""
        with self._lock:
            files: dict[str, dict[str, Any]] = self.data.setdefault("files", {})
            files.setdefault(name, {}).update(fields)
            atomic_write_json(self.path, self.data)

    def file(self, name: str) -> dict[str, Any]:
        with self._lock:
            record: dict[str, Any] = dict(self.data.get("files", {}).get(name, {}))
            return record


class StateLock:
    """An exclusive lock on the state directory: one install at a time per device.

    ``flock`` is released by the kernel when the process dies, so a kill -9 never leaves a stale
    lock behind; the file holds the owner's pid only to name it in the error.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self.fd = -1

    def acquire(self) -> None:
        import fcntl

        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise StateError(f"cannot open {self.path}: {err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateError(
                f"another rpi-updater (pid {owner}) is installing; {self.path} is locked"
            ) from None
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as err:
            self.release()
            raise StateError(f"cannot write {self.path}: {err.strerror or err}") from err

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StateLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
