"""Hook programs: trust checks, a clean environment, bounded output, timeouts that kill the group.

Two uses:

* ``pre-install`` / ``post-install`` programs of a target, run to completion by :func:`run_hook`;
* ``hook`` targets, programs that receive a file's bytes on stdin: :class:`HookStream`.

Every program is checked by :func:`check_trusted` first (root-owned, not group/world writable all
the way up to ``/``), runs with the environment of :func:`hook_environment` only (nothing of the
updater's own environment leaks through: it may hold secrets), stdin ``/dev/null`` (or the data
pipe), cwd ``/``, in a new session and so in its own process group. Its stdout and stderr are
drained by threads that keep the last :data:`TAIL_BYTES` of each; they are logged through the
``updater.hooks`` logger when the program ends. When a program runs too long, the whole process
group gets SIGTERM and, :data:`KILL_GRACE` seconds later, SIGKILL. A hook's process group never
outlives the hook: processes it left behind in its group are terminated the same way once the
program itself has exited (a real daemon leaves the group with ``setsid``; better still, ask
systemd to start it).

Every failure is a :class:`~updater.errors.HookError` (step -4) naming the program.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import re
import select
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO, Final, Literal, NoReturn, get_args

from updater.config import TargetKind
from updater.errors import HookError

log = logging.getLogger("updater.hooks")

HookStage = Literal["pre-install", "post-install", "install"]

#: The whole environment of a hook, besides its ``RPI_UPDATER_*`` variables.
BASE_ENVIRONMENT: Final[Mapping[str, str]] = MappingProxyType(
    {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
)
ENV_PREFIX: Final = "RPI_UPDATER_"
#: Bytes of stdout and of stderr kept (the last ones) for the log and for error messages.
TAIL_BYTES: Final = 4096
#: Seconds between SIGTERM and SIGKILL when a process group is stopped.
KILL_GRACE: Final = 5.0

_MAX_SYMLINKS: Final = 40
_EXTRA_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_STANDARD_KEYS: Final = frozenset(
    {
        "TASK_ID",
        "VERSION",
        "FILE",
        "TARGET",
        "TARGET_KIND",
        "DEVICE",
        "DEVICE_OFFSET",
        "SLOT",
        "STAGE",
    }
)


# --------------------------------------------------------------------------------------------
# Trust


def check_trusted(path: str) -> None:
    """Refuse a hook program that anyone but root could have written or replaced.

    ``path`` must be absolute. It is resolved component by component with ``lstat`` (following
    symbolic links, at most 40), and every directory on the way, from ``/`` to the one holding
    the program, including the directories that symbolic links lead through, must be owned by
    root and writable neither by its group nor by others; a directory with the sticky bit (a
    shared one like ``/tmp``) is refused too. Symbolic links must be owned by root. The final
    file must be a regular file owned by root, not group- or world-writable, and executable.

    Raises :class:`HookError` (``hook=path``) saying exactly what is wrong, e.g.
    ``hook /etc/h/post refused: /etc/h is writable by group (mode 0775)``.
    """
    _resolve_trusted(path)


def _resolve_trusted(path: str, *, file_name: str | None = None, target: str | None = None) -> str:
    """:func:`check_trusted`, returning the resolved path of the program."""

    def refuse(why: str) -> NoReturn:
        raise HookError(
            f"hook {path} refused: {why}", hook=path, file_name=file_name, target=target
        )

    if not path.startswith("/"):
        refuse("not an absolute path")
    program, st = resolve_trusted_path(path, refuse)
    if not stat.S_ISREG(st.st_mode):
        refuse(f"{program} is not a regular file")
    problems = _ownership_problems(program, st, directory=False)
    if problems:
        refuse("; ".join(problems))
    mode = stat.S_IMODE(st.st_mode)
    if not mode & 0o111:
        refuse(f"{program} is not executable (mode {mode:04o})")
    if not os.access(program, os.X_OK):
        refuse(f"{program} cannot be executed (a noexec mount?)")
    return program


def resolve_trusted_path(
    path: str, refuse: Callable[[str], NoReturn]
) -> tuple[str, os.stat_result]:
    """Resolve the absolute ``path`` component by component with ``lstat`` and return the final
    component's resolved path and ``lstat``, for the caller to judge (a program, a keyring).

    Symbolic links are followed (at most 40) and must be owned by root; every directory passed
    through, from ``/`` on and including those links lead through, must be owned by root and
    writable neither by its group nor by others, nor sticky (a shared directory like ``/tmp``).
    Anything wrong goes to ``refuse`` with a sentence saying exactly what.
    """
    if "\0" in path:
        refuse("the path contains a NUL byte")

    def lstat(p: str) -> os.stat_result:
        try:
            return os.lstat(p)
        except FileNotFoundError:
            refuse(f"{p} does not exist")
        except OSError as err:
            refuse(f"{p}: {err.strerror or err}")

    def check_directory(p: str, st: os.stat_result) -> None:
        if not stat.S_ISDIR(st.st_mode):
            refuse(f"{p} is not a directory")
        problems = _ownership_problems(p, st, directory=True)
        if problems:
            refuse("; ".join(problems))

    check_directory("/", lstat("/"))
    current = "/"
    pending = [c for c in path.split("/") if c not in ("", ".")]
    links = 0
    while pending:
        name = pending.pop(0)
        if name == "..":
            current = current.rsplit("/", 1)[0] or "/"
            continue
        candidate = f"{current.rstrip('/')}/{name}"
        st = lstat(candidate)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                refuse(f"too many levels of symbolic links at {candidate}")
            if st.st_uid != 0:
                refuse(f"{candidate} (a symbolic link) is owned by uid {st.st_uid}, not root")
            link = str(Path(candidate).readlink())
            if link.startswith("/"):
                current = "/"
            pending[:0] = [c for c in link.split("/") if c not in ("", ".")]
            continue
        if not pending:
            return candidate, st
        check_directory(candidate, st)
        current = candidate
    return current, lstat(current)


def _ownership_problems(p: str, st: os.stat_result, *, directory: bool) -> list[str]:
    mode = stat.S_IMODE(st.st_mode)
    problems = []
    if st.st_uid != 0:
        problems.append(f"{p} is owned by uid {st.st_uid}, not root")
    if mode & stat.S_IWGRP:
        problems.append(f"{p} is writable by group (mode {mode:04o})")
    if mode & stat.S_IWOTH:
        problems.append(f"{p} is writable by others (mode {mode:04o})")
    if directory and mode & stat.S_ISVTX:
        problems.append(f"{p} has the sticky bit set, a shared directory (mode {mode:04o})")
    return problems


# --------------------------------------------------------------------------------------------
# Context and environment


@dataclass(frozen=True, slots=True)
class HookContext:
    """What a hook is told about the step it runs in (see :func:`hook_environment`).

    ``device`` is the path written (a block device, an image file, or a ``file`` target's
    destination; may be empty), ``device_offset`` the byte offset of the written region inside
    it (non-zero for a partition inside an image file), ``slot`` the slot written (``"B"``;
    empty for targets outside a slot). ``extra`` adds ``RPI_UPDATER_<KEY>`` variables; keys
    match ``[A-Za-z][A-Za-z0-9_]*``, are upper-cased, and may not shadow a standard variable.
    Raises :class:`ValueError` for values that cannot be passed (a NUL byte, a bad key).
    """

    task_id: str
    version: str
    file_name: str
    target: str
    target_kind: TargetKind
    device: str
    slot: str
    stage: HookStage
    device_offset: int = 0
    extra: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.target_kind not in get_args(TargetKind):
            raise ValueError(f"target_kind must be one of {get_args(TargetKind)}")
        if self.stage not in get_args(HookStage):
            raise ValueError(f"stage must be one of {get_args(HookStage)}")
        if (
            isinstance(self.device_offset, bool)
            or not isinstance(self.device_offset, int)
            or self.device_offset < 0
        ):
            raise ValueError("device_offset must be an integer >= 0")
        for name in ("task_id", "version", "file_name", "target", "device", "slot"):
            value = getattr(self, name)
            if not isinstance(value, str) or "\0" in value:
                raise ValueError(f"{name} must be a string without NUL bytes")
        extra: dict[str, str] = {}
        for key, value in self.extra.items():
            if not isinstance(key, str) or not _EXTRA_KEY.fullmatch(key):
                raise ValueError(f"extra key {key!r} must match [A-Za-z][A-Za-z0-9_]*")
            upper = key.upper()
            if upper in _STANDARD_KEYS:
                raise ValueError(f"extra key {key!r} would shadow {ENV_PREFIX}{upper}")
            if upper in (k.upper() for k in extra):
                raise ValueError(f"extra key {key!r} given twice (keys are upper-cased)")
            if not isinstance(value, str) or "\0" in value:
                raise ValueError(f"extra value of {key!r} must be a string without NUL bytes")
            extra[key] = value
        object.__setattr__(self, "extra", MappingProxyType(extra))


def hook_environment(ctx: HookContext) -> dict[str, str]:
    """The complete environment of a hook: :data:`BASE_ENVIRONMENT` and ``RPI_UPDATER_*``.

    Nothing of the updater's own environment is passed through.
    """
    env = dict(BASE_ENVIRONMENT)
    env.update(
        {
            f"{ENV_PREFIX}TASK_ID": ctx.task_id,
            f"{ENV_PREFIX}VERSION": ctx.version,
            f"{ENV_PREFIX}FILE": ctx.file_name,
            f"{ENV_PREFIX}TARGET": ctx.target,
            f"{ENV_PREFIX}TARGET_KIND": ctx.target_kind,
            f"{ENV_PREFIX}DEVICE": ctx.device,
            f"{ENV_PREFIX}DEVICE_OFFSET": str(ctx.device_offset),
            f"{ENV_PREFIX}SLOT": ctx.slot,
            f"{ENV_PREFIX}STAGE": ctx.stage,
        }
    )
    for key, value in ctx.extra.items():
        env[f"{ENV_PREFIX}{key.upper()}"] = value
    return env


# --------------------------------------------------------------------------------------------
# Running a program


class _Tail(threading.Thread):
    """Drains one pipe until EOF, keeping its last :data:`TAIL_BYTES`."""

    def __init__(self, stream: IO[bytes], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stream = stream
        self._lock = threading.Lock()
        self._buf = bytearray()
        self.dropped = 0

    def run(self) -> None:
        fd = self._stream.fileno()
        try:
            while chunk := os.read(fd, 65536):
                with self._lock:
                    self._buf += chunk
                    excess = len(self._buf) - TAIL_BYTES
                    if excess > 0:
                        del self._buf[:excess]
                        self.dropped += excess
        except OSError:
            pass
        finally:
            self._stream.close()

    def text(self) -> str:
        with self._lock:
            return self._buf.decode("utf-8", errors="replace")


def _group_has_live_members(pgid: int) -> bool | None:
    """Whether a process other than a zombie is in process group ``pgid``; None: unknown."""
    try:
        names = [entry.name for entry in os.scandir("/proc")]
    except OSError:
        return None
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            fields = data[data.rindex(b")") + 2 :].split()
            state, pgrp = fields[0], int(fields[2])
        except (OSError, ValueError, IndexError):
            continue
        if pgrp == pgid and state not in (b"Z", b"X"):
            return True
    return False


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel SIGKILL the hook when the updater dies.

    Without it a hook target would read a clean EOF of a partial file after a kill -9 of the
    updater (the pipe's only writer is gone). libc is loaded here, in the parent, so that the
    child does nothing but two system calls between fork and exec.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the updater died before prctl took effect
            os._exit(1)

    return setup


class _Child:
    """A started hook program: its own process group, drained output, unreaped until the end.

    The leader is waited for without being reaped (a pidfd, or ``waitid(WNOWAIT)``), so that
    its process group id cannot be reused while the group is being signalled.
    """

    def __init__(self, program: str, real: str, ctx: HookContext, stdin: int) -> None:
        self.program = program
        try:
            self.proc = subprocess.Popen(
                [program],
                executable=real,
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=hook_environment(ctx),
                cwd="/",
                start_new_session=True,
                close_fds=True,
                preexec_fn=_die_with_parent(os.getpid()),
            )
        except OSError as err:
            raise HookError(
                f"hook {program} could not be started: {err.strerror or err}",
                hook=program,
                file_name=ctx.file_name,
                target=ctx.target,
            ) from err
        self.pid = self.proc.pid
        self._pidfd: int | None
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            self._pidfd = None
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.out = _Tail(self.proc.stdout, f"hook-stdout-{self.pid}")
        self.err = _Tail(self.proc.stderr, f"hook-stderr-{self.pid}")
        self.out.start()
        self.err.start()
        self.returncode: int | None = None

    def exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the program to exit, without reaping it."""
        if self.returncode is not None:
            return True
        if self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            return bool(poller.poll(max(0, int(timeout * 1000))))
        deadline = time.monotonic() + timeout
        while True:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.returncode is None:  # the unreaped leader keeps the group id ours
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def stop_group(self) -> None:
        """SIGTERM to the whole group, SIGKILL :data:`KILL_GRACE` s later; then reap the program."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE
        while time.monotonic() < deadline:
            alive = _group_has_live_members(self.pid)
            if alive is False or (alive is None and self.exited(0)):
                break
            time.sleep(0.02)
        self._signal_group(signal.SIGKILL)
        self.reap()

    def reap(self) -> int:
        """After the program exited: stop what it left in its group, reap it, collect output."""
        if self.returncode is None:
            if _group_has_live_members(self.pid) is not False:
                # Left-overs (the leader is a zombie by now, or nearly): same treatment.
                self._signal_group(signal.SIGTERM)
                deadline = time.monotonic() + KILL_GRACE
                while time.monotonic() < deadline and _group_has_live_members(self.pid):
                    time.sleep(0.02)
                self._signal_group(signal.SIGKILL)
            self.returncode = self.proc.wait()
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        for tail in (self.out, self.err):
            tail.join(2.0)
            if tail.is_alive():
                log.warning(
                    "hook %s: a process outside its group still holds its %s",
                    self.program,
                    "stdout" if tail is self.out else "stderr",
                )
        return self.returncode

    def log_output(self, level: int) -> None:
        for what, tail in (("stdout", self.out), ("stderr", self.err)):
            text = tail.text()
            if tail.dropped:
                log.log(
                    level,
                    "hook %s %s: [%d earlier bytes dropped]",
                    self.program,
                    what,
                    tail.dropped,
                )
            for line in text.splitlines():
                log.log(level, "hook %s %s: %s", self.program, what, line)

    def last_stderr_line(self) -> str:
        lines = [line.strip() for line in self.err.text().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def describe_status(self) -> str:
        """``exited with status 3`` or ``was killed by signal SIGKILL``, plus stderr's last line."""
        code = self.returncode
        if code is None:
            what = "is still running"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = str(-code)
            what = f"was killed by signal {name}"
        else:
            what = f"exited with status {code}"
        last = self.last_stderr_line()
        return f"{what}: {last}" if last else what


def _error(message: str, program: str, ctx: HookContext) -> HookError:
    return HookError(message, hook=program, file_name=ctx.file_name, target=ctx.target)


def run_hook(program: str, ctx: HookContext, *, timeout: float) -> None:
    """Run a ``pre-install``/``post-install`` program to completion.

    Checks it (:func:`check_trusted`), runs it with :func:`hook_environment`, stdin
    ``/dev/null``, cwd ``/``, in its own process group, and logs the tails of its stdout and
    stderr. Raises :class:`HookError` when it is refused, cannot start, runs longer than
    ``timeout`` seconds (its whole process group is then stopped: SIGTERM, SIGKILL 5 s later),
    or exits non-zero (the message names the status or signal and the last line of stderr).
    """
    real = _resolve_trusted(program, file_name=ctx.file_name, target=ctx.target)
    log.info("running hook %s (%s of %s, target %s)", program, ctx.stage, ctx.file_name, ctx.target)
    child = _Child(program, real, ctx, subprocess.DEVNULL)
    if not child.exited(timeout):
        child.stop_group()
        child.log_output(logging.WARNING)
        last = child.last_stderr_line()
        raise _error(
            f"hook {program} timed out after {timeout:g} s" + (f": {last}" if last else ""),
            program,
            ctx,
        )
    code = child.reap()
    child.log_output(logging.INFO if code == 0 else logging.WARNING)
    if code != 0:
        raise _error(f"hook {program} {child.describe_status()}", program, ctx)
    log.info("hook %s succeeded", program)


# The guard: a copy of the pipe's write end in a tiny shell that, told by the kernel that the
# updater died (PDEATHSIG SIGTERM, which it traps), SIGKILLs the hook's whole process group and
# only then lets the copy go. Without it, a kill -9 of the updater closes the pipe at once and
# a process of the hook's group that PDEATHSIG does not reach (the ``cat`` of ``sh -c 'cat >
# f && commit'``) can read a clean EOF of a partial file before the group is killed.
_GUARD_SCRIPT = (
    'trap \'kill -KILL -- "-$1" 2>/dev/null; kill "$!" 2>/dev/null; exit 0\' TERM; '
    'while :; do sleep 600 3>&- & wait "$!"; done'
)
_GUARD_FD = 3


def _guard_setup(parent: int, write_end: int, libc: ctypes.CDLL) -> Callable[[], None]:
    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        os.dup2(write_end, _GUARD_FD)

    return setup


class _Guard:
    """Holds the hook's stdin open until its process group is dead, should the updater die."""

    def __init__(self, write_end: int, pgid: int) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", _GUARD_SCRIPT, "rpi-updater-guard", str(pgid)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                cwd="/",
                close_fds=True,
                pass_fds=(_GUARD_FD,),
                start_new_session=True,
                preexec_fn=_guard_setup(os.getpid(), write_end, ctypes.CDLL(None, use_errno=True)),
            )
        except OSError as err:
            log.warning("no guard for the hook's stdin (%s): a kill -9 may show it an EOF", err)

    def release(self) -> None:
        """The updater ends the stream itself: the guard goes first (killed, not asked: its
        trap would kill the hook), so that closing our write end is what the hook sees."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class HookStream:
    """A running ``hook`` target program that receives one file's bytes on its stdin.

    Contract: **the program sees EOF on stdin only when every byte was delivered and the
    file's digest matched.** The caller streams the bytes with :meth:`write`, verifies the
    digest itself, and only then calls :meth:`finish`, which closes stdin and waits for a zero
    exit status. On any failure the caller calls :meth:`abort`, which stops the program's
    whole process group (SIGTERM, then SIGKILL) *before* stdin is closed, so the program never
    reads a clean end of a file that failed verification; it must treat a missing EOF (it is
    killed) as "discard everything". Used as a context manager, the stream is aborted when the
    block ends without :meth:`finish` (never finished implicitly).

    ``timeout`` bounds each wait: a :meth:`write` that cannot make progress for ``timeout``
    seconds (the program stopped reading) and the wait for the exit after EOF in
    :meth:`finish`. The program's stdout and stderr are drained by threads (bounded tails) so
    its pipes never block it. Errors: :class:`HookError` (a subclass of ``WriteError``, step -4).
    """

    def __init__(self, child: _Child, stdin_fd: int, ctx: HookContext, timeout: float) -> None:
        self._child = child
        self._guard = _Guard(stdin_fd, child.pid)
        self._fd = stdin_fd
        self._ctx = ctx
        self._timeout = timeout
        self._state: Literal["running", "finished", "failed", "aborted"] = "running"
        self._poller = select.poll()
        self._poller.register(stdin_fd, select.POLLOUT)
        self.bytes_written = 0

    @classmethod
    def start(cls, program: str, ctx: HookContext, timeout: float) -> HookStream:
        """Check ``program`` (:func:`check_trusted`) and start it with a pipe on its stdin."""
        real = _resolve_trusted(program, file_name=ctx.file_name, target=ctx.target)
        read_end, write_end = os.pipe()
        try:
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 1 << 20)
            log.info("starting hook target %s for %s", program, ctx.file_name)
            child = _Child(program, real, ctx, read_end)
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        os.set_blocking(write_end, False)
        return cls(child, write_end, ctx, timeout)

    @property
    def program(self) -> str:
        return self._child.program

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Deliver ``data`` completely; raise :class:`HookError` if the program stopped reading."""
        if self._state != "running":
            raise ValueError(f"write to a {self._state} HookStream")
        view = memoryview(data).cast("B")
        while view:
            try:
                n = os.write(self._fd, view)
            except BlockingIOError:
                if not self._poller.poll(max(0, int(self._timeout * 1000))):
                    self._fail_stalled()
                continue
            except BrokenPipeError:
                self._fail_broken()
            view = view[n:]
            self.bytes_written += n

    def finish(self) -> None:
        """Close stdin (the program sees EOF) and wait for it to exit with status 0."""
        if self._state != "running":
            raise ValueError(f"finish of a {self._state} HookStream")
        self._state = "finished"
        self._guard.release()
        os.close(self._fd)
        child = self._child
        if not child.exited(self._timeout):
            self._state = "failed"
            child.stop_group()
            child.log_output(logging.WARNING)
            raise self._err(
                f"hook {self.program} timed out after {self._timeout:g} s after the end of its "
                f"input ({self.bytes_written} bytes)"
            )
        code = child.reap()
        child.log_output(logging.INFO if code == 0 else logging.WARNING)
        if code != 0:
            self._state = "failed"
            raise self._err(
                f"hook {self.program} {child.describe_status()} "
                f"(after {self.bytes_written} bytes of input)"
            )
        log.info("hook target %s took %d bytes", self.program, self.bytes_written)

    def abort(self) -> None:
        """Stop the program's process group without ever closing its stdin first. Idempotent."""
        if self._state != "running":
            return
        self._state = "aborted"
        self._child.stop_group()  # the group is dead (SIGKILL at the latest) ...
        self._guard.release()
        os.close(self._fd)  # ... before its stdin closes: nobody reads a clean EOF
        self._child.log_output(logging.WARNING)
        log.warning("hook target %s aborted after %d bytes", self.program, self.bytes_written)

    def __enter__(self) -> HookStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()

    def _err(self, message: str) -> HookError:
        return _error(message, self.program, self._ctx)

    def _fail_stalled(self) -> NoReturn:
        self.abort()
        self._state = "failed"
        raise self._err(
            f"hook {self.program} timed out after {self._timeout:g} s: it stopped reading its "
            f"input after {self.bytes_written} bytes"
        )

    def _fail_broken(self) -> NoReturn:
        # No reader is left; give the program a moment to report its own status.
        self._state = "failed"
        child = self._child
        if child.exited(1.0):
            child.reap()
        else:
            child.stop_group()
        self._guard.release()
        os.close(self._fd)
        child.log_output(logging.WARNING)
        raise self._err(
            f"hook {self.program} stopped reading its input after {self.bytes_written} bytes: "
            f"it {child.describe_status()}"
        )
