"""A qemu VM with Debian's U-Boot as firmware, driven through its serial console.

The system tests boot the A/B disk image the way a Pi boots it: firmware (U-Boot) runs the boot
script, which picks a slot, and a guest reboot or kernel panic (``panic=5``) goes back through
U-Boot. So qemu runs *without* ``-no-reboot``: a reboot stays in the same qemu process with the
same disk, and every boot starts with U-Boot's banner, which :attr:`VM.boots` counts. A power cut
is SIGKILL of qemu: the disk file keeps exactly what the guest had written to the virtual disk.

Only the 32-bit ROM (``qemu-x86``) works; the x86_64 one hangs after "Loading bzImage". One vCPU:
``-smp 2`` hung once. The guest reaches the host's loopback services as 10.0.2.2 (user network).
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import functools
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["QEMU", "UBOOT_ROM", "VM", "Accel", "VMTimeout", "accelerator"]

QEMU = "qemu-system-x86_64"
UBOOT_ROM = Path("/usr/lib/u-boot/qemu-x86/u-boot.rom")
BANNER = re.compile(r"^U-Boot \d{4}\.\d\d")
AUTOBOOT = r"Hit any key to stop autoboot"
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # \r, backspaces of U-Boot's countdown, ...
# A line with no newline yet can match once no output came for this long: a prompt, not a
# line half written (a pattern like r"bootcount \d+" must not see "bootcount 1" of "... 12").
_PROMPT_IDLE = 0.5
# KVM stops the guest and qemu sits there paused: treat this stderr line as the VM's death.
_FATAL = re.compile(r"KVM internal error")
_KVM_ARGS = ("-accel", "kvm", "-cpu", "qemu64")
_TCG_ARGS = ("-accel", "tcg,thread=multi")


def _clean(text: str) -> str:
    return _CONTROL.sub("", _ANSI.sub("", text))


class VMTimeout(AssertionError):
    """An expected console line did not come in time, or qemu died before it came."""


@dataclass(frozen=True)
class Accel:
    """How qemu runs the guest: its qemu arguments, ``kvm`` or ``tcg``, and why (one line)."""

    name: str
    args: tuple[str, ...]
    reason: str


def _die_with_us() -> Callable[[], None]:
    """A ``preexec_fn``: the kernel SIGKILLs qemu when the starting thread dies (even kill -9).

    So a killed test run leaves no qemu behind; hence: start a VM in the thread that outlives it.
    """
    libc, parent = ctypes.CDLL(None, use_errno=True), os.getpid()

    def setup() -> None:
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return setup


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill and wait for qemu; also run by the finalizer at exit, so no qemu outlives a test."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


class VM:
    """One qemu process; its console is kept in memory (for :meth:`expect`) and in ``log``.

    ``expect`` looks at lines from a cursor on and moves it past the match, so a scenario reads
    the console in order; :meth:`mark` and :meth:`lines_since` look back at a stretch of it. A
    prompt with no newline yet (``=> ``, ``login: ``) can match too, once output pauses.
    """

    def __init__(
        self,
        disk: Path | None,
        *,
        log: Path,
        memory_mib: int = 1024,
        extra_args: Sequence[str] = (),
        accel: Accel | None = None,
    ) -> None:
        self.disk, self.log_path, self.memory_mib = disk, log, memory_mib
        self.extra_args = tuple(extra_args)
        self.accel = accel if accel is not None else accelerator()
        self.lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.boots = 0
        self._cursor = 0
        self._partial = ""
        self._last_output = 0.0
        self._eof = False
        self._cond = threading.Condition()
        self._proc: subprocess.Popen[bytes] | None = None
        self._threads: list[threading.Thread] = []
        self._log: IO[str] | None = None
        self._t0 = 0.0

    def command(self) -> list[str]:
        cmd = [QEMU, "-machine", "pc", "-m", str(self.memory_mib), "-smp", "1"]
        cmd += [*self.accel.args, "-bios", str(UBOOT_ROM)]
        if self.disk is not None:
            cmd += ["-drive", f"file={self.disk},format=raw,if=virtio"]
        cmd += ["-nic", "user,model=virtio-net-pci", "-display", "none", "-monitor", "none"]
        return [*cmd, "-serial", "stdio", *self.extra_args]

    def start(self) -> Self:
        if self._proc is not None:
            raise RuntimeError("VM already started")
        self._log = self.log_path.open("a", encoding="utf-8")
        self._t0 = time.monotonic()
        cmd = self.command()
        self._note(f"{self.accel.reason}; {' '.join(cmd)}")
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_us(),
            )
        except OSError:
            self._log.close()
            raise
        weakref.finalize(self, _reap, self._proc)
        assert self._proc.stdout is not None and self._proc.stderr is not None
        readers = ((self._read_console, self._proc.stdout), (self._read_stderr, self._proc.stderr))
        for target, stream in readers:
            thread = threading.Thread(target=target, args=(stream,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None, "VM not started"
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    # -- reader threads --------------------------------------------------------------------

    def _write_log(self, text: str) -> None:  # caller holds self._cond
        if self._log is not None and not self._log.closed:
            self._log.write(f"{time.monotonic() - self._t0:8.2f} {text}\n")
            self._log.flush()

    def _note(self, text: str) -> None:
        with self._cond:
            self._write_log(f"[vm] {text}")

    def _add_line(self, raw: str) -> None:  # caller holds self._cond
        line = _clean(raw)
        self.lines.append(line)
        self.boots += bool(BANNER.match(line))
        self._write_log(line)

    def _read_console(self, stream: IO[bytes]) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(stream.fileno(), 65536):
            with self._cond:
                self._last_output = time.monotonic()
                *done, self._partial = (self._partial + decoder.decode(chunk)).split("\n")
                for raw in done:
                    self._add_line(raw)
                self._cond.notify_all()
        with self._cond:
            if self._partial:
                self._add_line(self._partial)
            self._partial, self._eof = "", True
            self._cond.notify_all()

    def _read_stderr(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = _clean(raw.decode("utf-8", "replace"))
            with self._cond:
                self.stderr_lines.append(line)
                self._write_log(f"[qemu stderr] {line}")
                self._cond.notify_all()

    # -- reading the console ---------------------------------------------------------------

    def mark(self) -> int:
        """The cursor: the index of the first line the next :meth:`expect` looks at."""
        return self._cursor

    def lines_since(self, mark: int) -> list[str]:
        with self._cond:
            return self.lines[mark:]

    def console_tail(self, n: int = 80) -> str:
        with self._cond:
            tail = self.lines[-n:] + ([_clean(self._partial)] if self._partial else [])
        return "\n".join(tail)

    def expect(self, pattern: str | re.Pattern[str], timeout: float, *, what: str) -> re.Match[str]:
        """Wait for a line matching ``pattern`` (``re.search``) at or after the cursor.

        Moves the cursor past that line. Raises :class:`VMTimeout` after ``timeout`` seconds, or
        at once when qemu exits or KVM stops the guest; the message names ``what``.
        """
        return self._wait({"": re.compile(pattern)}, timeout, what)[1]

    def expect_any(self, patterns: Mapping[str, str], timeout: float, *, what: str) -> str:
        """Wait for the first line matching any of ``patterns``; returns the key that matched."""
        return self._wait({k: re.compile(p) for k, p in patterns.items()}, timeout, what)[0]

    def _wait(
        self, patterns: dict[str, re.Pattern[str]], timeout: float, what: str
    ) -> tuple[str, re.Match[str]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                idle = time.monotonic() - self._last_output
                fresh = bool(self._partial) and idle < _PROMPT_IDLE  # maybe half a line
                pending = [_clean(self._partial)] if self._partial and not fresh else []
                for i, line in enumerate(self.lines[self._cursor :] + pending):
                    for key, regex in patterns.items():
                        if match := regex.search(line):
                            self._cursor += i + 1
                            return key, match
                # Nothing before here matched: start there next time (not before a matched prompt).
                self._cursor = max(self._cursor, len(self.lines))
                left = deadline - time.monotonic()
                if self._proc is None:
                    why = "the VM was never started"
                elif self._eof:
                    why = "qemu exited before it came"
                elif any(_FATAL.search(s) for s in self.stderr_lines):
                    why = "KVM stopped the guest (KVM internal error)"
                elif left <= 0:
                    why = "not seen in time"
                else:
                    self._cond.wait(min(left, _PROMPT_IDLE - idle + 0.01) if fresh else left)
                    continue
                break
        shown = [p.pattern for p in patterns.values()]
        head = f"VM: {what}: {why} (timeout {timeout:g} s, patterns {shown})"
        raise VMTimeout(f"{head}\n{self._state()}")

    def _state(self) -> str:
        """qemu's state, its stderr and the console's tail, for a failure message."""
        if self._proc is None:
            return ""
        if self._eof:  # stdout closed: qemu is exiting; let its stderr and exit code arrive
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5)
            self._threads[1].join(2)
        code = self._proc.poll()
        state = f"still running (pid {self._proc.pid})" if code is None else f"exited with {code}"
        with self._cond:
            stderr = "\n".join(self.stderr_lines) or "(empty)"
        return (
            f"qemu {state}; {self.boots} U-Boot banner(s); log {self.log_path}\n"
            f"--- qemu stderr ---\n{stderr}\n--- last serial lines ---\n{self.console_tail()}"
        )

    # -- ending it -------------------------------------------------------------------------

    def power_cut(self) -> None:
        """Pull the plug: SIGKILL qemu and reap it. The disk keeps what the guest wrote to it."""
        self._end(0.0, "power cut (SIGKILL)")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM qemu, SIGKILL it after ``grace`` seconds; idempotent."""
        self._end(grace, "stop")

    def _end(self, grace: float, why: str) -> None:
        proc = self._proc
        if proc is None or self._log is None or self._log.closed:
            return
        if proc.poll() is None:
            self._note(why)
            if grace > 0:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace)
        _reap(proc)
        for thread in self._threads:
            thread.join(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        with self._cond:
            self._write_log(f"[vm] qemu exited with {proc.returncode}")
            self._log.close()

    def __enter__(self) -> Self:
        return self.start() if self._proc is None else self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- choosing KVM or TCG -------------------------------------------------------------------


@functools.cache
def _probe_kvm(timeout: float = 20.0) -> tuple[bool, str]:
    """Whether ``-accel kvm -cpu qemu64`` runs the U-Boot ROM here, and why (not).

    /dev/kvm existing is not enough: a kvm_pvm host boots the ROM to its banner, then stops it
    with "KVM internal error ... emulation failure". So the probe waits for U-Boot's autoboot
    countdown, which comes after its driver setup, and gives up on a KVM error on stderr.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not usable"
    with tempfile.TemporaryDirectory(prefix="vm-kvm-probe-") as tmp:
        candidate = Accel("kvm", _KVM_ARGS, "KVM probe")
        with VM(None, log=Path(tmp) / "probe.log", memory_mib=256, accel=candidate) as vm:
            try:
                vm.expect(AUTOBOOT, timeout, what="U-Boot autoboot prompt under KVM")
            except VMTimeout:
                time.sleep(0.3)  # the rest of qemu's complaint ("emulation failure")
                errors = [s for s in vm.stderr_lines if re.search(r"KVM|emulation failure|rror", s)]
                detail = "; ".join(errors[:3]) or f"no autoboot prompt within {timeout:g} s"
                code = vm.returncode
                seen = "after U-Boot's banner" if vm.boots else "before U-Boot's banner"
                exited = "" if code is None else f", qemu exited with {code}"
                return False, f"U-Boot under KVM failed {seen}: {detail}{exited}"
            return True, "U-Boot's ROM reached its autoboot prompt under KVM"


def accelerator() -> Accel:
    """KVM (``-accel kvm -cpu qemu64``) when it can run U-Boot here, else TCG; probed once.

    ``RPI_VM_ACCEL=tcg`` forces TCG without probing; ``RPI_VM_ACCEL=kvm`` forces KVM and fails
    clearly when the probe fails. TCG is slower (~11 s per boot) but runs everywhere.
    """
    forced = os.environ.get("RPI_VM_ACCEL", "").strip().lower()
    if forced == "tcg":
        return Accel("tcg", _TCG_ARGS, "TCG: forced by RPI_VM_ACCEL=tcg")
    if forced not in ("", "kvm"):
        raise ValueError(f"RPI_VM_ACCEL must be kvm or tcg, not {forced!r}")
    ok, why = _probe_kvm()
    if ok:
        return Accel("kvm", _KVM_ARGS, f"KVM: {why}" + (" (RPI_VM_ACCEL=kvm)" if forced else ""))
    if forced:
        raise RuntimeError(f"RPI_VM_ACCEL=kvm, but KVM cannot run U-Boot here: {why}")
    return Accel("tcg", _TCG_ARGS, f"TCG: KVM probe failed: {why}")
