"""Where one file's bytes land: a slot partition, a file beside its destination, a hook's stdin.

Every sink writes at explicit offsets (``pwrite``), so the writer never depends on a file position
that a crash could leave anywhere. ``sync`` makes everything written so far durable; the
stream records an offset as durable only after ``sync`` returned.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from pathlib import Path
from typing import Protocol

from updater.errors import WriteError
from updater.hooks import HookContext, HookStream
from updater.journal import fsync_dir
from updater.slots import Device


class Sink(Protocol):
    """A target that receives one file's bytes."""

    #: Whether a restarted process may continue from a durable prefix (false for a pipe).
    resumable: bool

    def write_at(self, offset: int, data: memoryview) -> None: ...

    def read_at(self, offset: int, length: int) -> bytes: ...

    def sync(self) -> None: ...

    def reset(self) -> None:
        """Forget everything written: the file starts over from byte 0."""

    def close(self) -> None: ...


def _write_fully(fd: int, offset: int, data: memoryview) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


class PartitionSink:
    """A slot part: a block device (opened O_EXCL, so the kernel refuses it while mounted) or a
    region of an image file. Writes never leave ``[device.offset, device.offset + device.size)``.
    """

    resumable = True

    def __init__(
        self, device: Device, *, file_name: str, target: str, read_only: bool = False
    ) -> None:
        self.device = device
        self.file_name = file_name
        self.target = target
        flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        if device.is_block and not read_only:
            flags |= os.O_EXCL
        try:
            self.fd = os.open(device.path, flags)
        except OSError as err:
            raise self._error("cannot open", err) from err
        # Large aligned writes go around the page cache (O_DIRECT): no copy of every byte into
        # kernel memory, and an image of gigabytes does not push a small Pi's working set out.
        # Not O_EXCL: the claim of the first descriptor already keeps the device unmounted.
        self._direct = -1
        if not read_only:
            with contextlib.suppress(OSError, AttributeError):
                self._direct = os.open(device.path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)

    def _error(self, what: str, err: OSError) -> WriteError:
        return WriteError(
            f"{what} {self.device.describe()}: {err.strerror or err}",
            file_name=self.file_name,
            target=self.target,
        )

    def write_at(self, offset: int, data: memoryview) -> None:
        if offset + len(data) > self.device.size:
            raise WriteError(
                f"write beyond the end of {self.device.describe()}",
                file_name=self.file_name,
                target=self.target,
            )
        position = self.device.offset + offset
        try:
            if self._direct >= 0 and _direct_ok(position, data):
                try:
                    _write_fully(self._direct, position, data)
                    return
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    self._close_direct()  # this device or file system will not: buffered
            _write_fully(self.fd, position, data)
        except OSError as err:
            raise self._error("cannot write", err) from err

    def _close_direct(self) -> None:
        if self._direct >= 0:
            os.close(self._direct)
            self._direct = -1

    def read_at(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, self.device.offset + offset)
        except OSError as err:
            raise self._error("cannot read back", err) from err

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            raise self._error("cannot sync", err) from err

    def reset(self) -> None:
        """Nothing to undo: the bytes will be overwritten from offset 0."""

    def close(self) -> None:
        self._close_direct()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


DIRECT_ALIGN = 4096  # offsets, lengths and memory: a multiple of any logical block size


def _direct_ok(position: int, data: memoryview) -> bool:
    """Whether O_DIRECT may write ``data`` at ``position``: all three aligned, and the memory
    writable (a read-only view cannot be asked for its address; it goes buffered)."""
    if position % DIRECT_ALIGN or len(data) % DIRECT_ALIGN or not len(data):
        return False
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(data))
    except (TypeError, ValueError, BufferError):
        return False
    return address % DIRECT_ALIGN == 0


def staging_path(dest: Path) -> Path:
    """The temporary file beside ``dest`` that receives the new content (same filesystem, so
    that the final rename is atomic)."""
    return dest.with_name(f".{dest.name}.rpi-updater-new")


def kept_path(dest: Path) -> Path:
    """Where the previous content of ``dest`` is kept until the update is committed."""
    return dest.with_name(f".{dest.name}.rpi-updater-old")


class FileSink:
    """A named file target: the bytes go to a staging file beside the destination; the engine
    renames it over the destination only once every file of the package is verified.

    ``keep`` is the durable prefix a resumed install continues after (0: start afresh). A fresh
    staging file is created exclusively (``O_EXCL|O_NOFOLLOW``, mode 0600) after removing any
    leftover, and its directory entry is made durable before any offset is recorded; a resumed
    one must still be ours (a regular file owned by us, one link, at least ``keep`` bytes),
    otherwise WriteError and the caller starts afresh.
    """

    resumable = True

    def __init__(self, dest: Path, *, file_name: str, target: str, keep: int) -> None:
        self.dest = dest
        self.path = staging_path(dest)
        self.file_name = file_name
        self.target = target
        self.fd = -1
        try:
            if keep:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
                self._check_ours(keep)
                os.ftruncate(self.fd, keep)
            else:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
                self.fd = os.open(self.path, flags, 0o600)
                fsync_dir(dest.parent)
        except OSError as err:
            self.close()
            raise self._error("cannot open", err) from err
        except WriteError:
            self.close()
            raise

    def _check_ours(self, keep: int) -> None:
        st = os.fstat(self.fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_uid != os.geteuid() or st.st_nlink != 1:
            problem = "was replaced or linked by someone else"
        elif st.st_size < keep:
            problem = f"holds {st.st_size} bytes, the journal says {keep}"
        if problem:
            raise WriteError(
                f"staged file {self.path} {problem}", file_name=self.file_name, target=self.target
            )

    def _error(self, what: str, err: OSError) -> WriteError:
        return WriteError(
            f"{what} {self.path}: {err.strerror or err}",
            file_name=self.file_name,
            target=self.target,
        )

    def write_at(self, offset: int, data: memoryview) -> None:
        try:
            _write_fully(self.fd, offset, data)
        except OSError as err:
            raise self._error("cannot write", err) from err

    def read_at(self, offset: int, length: int) -> bytes:
        try:
            return os.pread(self.fd, length, offset)
        except OSError as err:
            raise self._error("cannot read back", err) from err

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as err:
            raise self._error("cannot sync", err) from err

    def reset(self) -> None:
        try:
            os.ftruncate(self.fd, 0)
        except OSError as err:
            raise self._error("cannot truncate", err) from err

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def apply_file(dest: Path) -> bool:
    """Move the verified staging file over ``dest``, keeping the old content as a hard link.

    Returns whether an old content was kept. Mode and ownership of an existing destination carry
    over to the new file. Every step is atomic and followed by a directory fsync.
    """
    new = staging_path(dest)
    old = kept_path(dest)
    kept = False
    try:
        fd = os.open(new, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            try:
                st = dest.lstat()
            except FileNotFoundError:
                os.fchmod(fd, 0o644)
            else:
                if not stat.S_ISREG(st.st_mode):
                    raise WriteError(f"{dest} is not a regular file", target=str(dest))
                os.fchown(fd, st.st_uid, st.st_gid)
                os.fchmod(fd, stat.S_IMODE(st.st_mode))
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
                os.link(dest, old, follow_symlinks=False)
                kept = True
            os.fsync(fd)
        finally:
            os.close(fd)
        new.replace(dest)
        fsync_dir(dest.parent)
    except OSError as err:
        raise WriteError(f"cannot install {dest}: {err.strerror or err}", target=str(dest)) from err
    return kept


def restore_file(dest: Path, *, had_old: bool) -> None:
    """Undo :func:`apply_file`: the kept old content goes back, or a new file is removed."""
    old = kept_path(dest)
    try:
        if had_old:
            if old.exists():
                old.replace(dest)
        else:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
        fsync_dir(dest.parent)
    except OSError as err:
        raise WriteError(f"cannot restore {dest}: {err.strerror or err}", target=str(dest)) from err


def discard_staging(dest: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        staging_path(dest).unlink()


class HookSink:
    """A hook target: bytes go to the program's stdin, strictly in order, from byte 0.

    Not resumable across restarts: a restarted install feeds the program the whole file again.
    """

    resumable = False

    def __init__(
        self, program: str, ctx: HookContext, *, timeout: float, file_name: str, target: str
    ) -> None:
        self.program = program
        self.ctx = ctx
        self.timeout = timeout
        self.file_name = file_name
        self.target = target
        self.position = 0
        self.stream = HookStream.start(program, ctx, timeout)

    def write_at(self, offset: int, data: memoryview) -> None:
        if offset != self.position:
            raise WriteError(
                f"hook target {self.program} needs its bytes in order",
                file_name=self.file_name,
                target=self.target,
            )
        self.stream.write(data)
        self.position += len(data)

    def read_at(self, offset: int, length: int) -> bytes:
        raise WriteError("a hook target cannot be read back", file_name=self.file_name)

    def sync(self) -> None:
        """A pipe has nothing to make durable."""

    def reset(self) -> None:
        self.stream.abort()
        self.position = 0
        self.stream = HookStream.start(self.program, self.ctx, self.timeout)

    def finish(self) -> None:
        self.stream.finish()

    def close(self) -> None:
        """Abort unless :meth:`finish` ran: the program never sees EOF for unverified bytes."""
        self.stream.abort()
