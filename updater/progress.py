"""One progress stream for a whole package, and the sinks that show or report it.

:class:`Progress` counts bytes over all files of a package (the IoT Platform hears one stream per
package, see ota-protocol.md "Progress semantics") and hands :class:`ProgressEvent` values to
sinks, plain callables. Sinks: :class:`TerminalBar` (a one-line bar on a terminal),
:class:`JsonLines` (machine-readable lines), :class:`StepReporter` (the platform's ``step``
rule: 0 at start, every gain of 5 %, never 100 before done, a negative code on failure).

Percent is ``floor(100 * done / total)``, but never 100 before the ``done`` event, and 0 while the
total is 0. Events reach the sinks in order, one at a time (under a lock), from whichever thread
calls :class:`Progress`. A sink that raises is logged (once) and otherwise ignored: progress
display must not fail an update.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TextIO

log = logging.getLogger("updater.progress")

EventKind = Literal["start", "file", "bytes", "verified", "done", "failed"]
Sink = Callable[["ProgressEvent"], None]

#: Seconds between "bytes" events when the percent does not change.
HEARTBEAT = 0.2
#: The IoT Platform's failure codes: update, download, verification, writing failed.
FAILURE_STEPS = frozenset({-1, -2, -3, -4})

_MIB = 1024 * 1024


def percent_of(done: int, total: int, *, finished: bool = False) -> int:
    """``floor(100 * done / total)`` within 0..99, or 100 when ``finished``; 0 for total 0."""
    if finished:
        return 100
    if total <= 0 or done <= 0:
        return 0
    return min(99, done * 100 // total)


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    kind: EventKind
    done_bytes: int
    total_bytes: int
    percent: int
    file_name: str | None = None
    step: int | None = None  # failures only: -1..-4
    desc: str = ""


class Progress:
    """Bytes done over the whole package; emits :class:`ProgressEvent` to ``sinks``.

    :meth:`advance` is meant for a download callback: it is thread-safe and cheap, and emits a
    "bytes" event only when the percent changed or :data:`HEARTBEAT` seconds passed since the
    last event. After :meth:`done` or :meth:`failed` everything is ignored (late callbacks).
    """

    def __init__(
        self,
        total_bytes: int,
        sinks: Sequence[Sink],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total_bytes < 0:
            raise ValueError("total_bytes must be >= 0")
        self.total_bytes = total_bytes
        self._sinks = tuple(sinks)
        self._clock = clock
        self._lock = threading.Lock()
        self._done = 0
        self._percent = 0
        self._last_emit = clock()
        self._file: str | None = None
        self._finished = False
        self._broken_sinks: set[int] = set()

    @property
    def done_bytes(self) -> int:
        return self._done

    @property
    def percent(self) -> int:
        return self._percent

    @property
    def finished(self) -> bool:
        return self._finished

    def start(self) -> None:
        with self._lock:
            if not self._finished:
                self._emit("start")

    def begin_file(self, name: str) -> None:
        with self._lock:
            if not self._finished:
                self._file = name
                self._emit("file")

    def advance(self, n: int) -> None:
        """Add ``n`` bytes newly done (of the current file) to the package."""
        if n:
            with self._lock:
                if not self._finished:
                    self._update(self._done + n)

    def set_done(self, n: int) -> None:
        """Set the bytes done for the package (a resume re-hashed a prefix, a file restarted)."""
        with self._lock:
            if not self._finished:
                self._update(n)

    def file_verified(self, name: str) -> None:
        with self._lock:
            if not self._finished:
                self._emit("verified", file_name=name)

    def done(self) -> None:
        """Every file is verified: percent 100, done bytes = total."""
        with self._lock:
            if self._finish("done"):
                self._done = self.total_bytes
                self._percent = 100
                self._emit("done")

    def failed(self, step: int, desc: str, file_name: str | None = None) -> None:
        """The package failed with IoT Platform code ``step`` (-1..-4), ``desc`` saying why."""
        if step not in FAILURE_STEPS:
            raise ValueError(f"step must be one of -1..-4, not {step}")
        with self._lock:
            if self._finish("failed"):
                self._emit("failed", file_name=file_name, step=step, desc=desc)

    def _finish(self, kind: str) -> bool:
        if self._finished:
            log.warning("progress: %s after the package already ended; ignored", kind)
            return False
        self._finished = True
        return True

    def _update(self, done: int) -> None:
        self._done = max(0, done)
        percent = percent_of(self._done, self.total_bytes)
        if percent != self._percent or self._clock() - self._last_emit >= HEARTBEAT:
            self._percent = percent
            self._emit("bytes")

    def _emit(
        self,
        kind: EventKind,
        *,
        file_name: str | None = None,
        step: int | None = None,
        desc: str = "",
    ) -> None:
        self._last_emit = self._clock()
        event = ProgressEvent(
            kind=kind,
            done_bytes=self._done,
            total_bytes=self.total_bytes,
            percent=self._percent,
            file_name=file_name if file_name is not None else self._file,
            step=step,
            desc=desc,
        )
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                if id(sink) not in self._broken_sinks:
                    self._broken_sinks.add(id(sink))
                    log.exception("progress sink %r failed (further failures not logged)", sink)


def _failure_desc(event: ProgressEvent) -> str:
    if event.file_name and event.file_name not in event.desc:
        return f"{event.file_name}: {event.desc}" if event.desc else event.file_name
    return event.desc


class TerminalBar:
    """A one-line bar redrawn with ``\\r`` at most 10 times a second, a newline at the end.

    ``[#######-------]  42%  120.0/285.5 MiB  11.3 MiB/s  rootfs.img``; the speed is measured
    over the last few seconds.
    """

    WIDTH = 30
    INTERVAL = 0.1
    SPEED_WINDOW = 3.0

    def __init__(
        self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._last_draw: float | None = None
        self._last_len = 0
        self._samples: deque[tuple[float, int]] = deque()

    def __call__(self, event: ProgressEvent) -> None:
        now = self._clock()
        self._sample(now, event.done_bytes)
        final = event.kind in ("done", "failed")
        if not final and self._last_draw is not None and now - self._last_draw < self.INTERVAL:
            return
        self._last_draw = now
        filled = self.WIDTH * event.percent // 100
        line = (
            f"[{'#' * filled}{'-' * (self.WIDTH - filled)}] {event.percent:3d}%  "
            f"{event.done_bytes / _MIB:.1f}/{event.total_bytes / _MIB:.1f} MiB  "
            f"{self._speed() / _MIB:.1f} MiB/s"
        )
        if event.kind == "failed":
            line += f"  FAILED ({event.step}): {_failure_desc(event)}"
        elif event.kind == "done":
            line += "  done"
        elif event.file_name:
            line += f"  {event.file_name}"
        pad = " " * max(0, self._last_len - len(line))
        self._last_len = len(line)
        self._stream.write(f"\r{line}{pad}" + ("\n" if final else ""))
        self._stream.flush()

    def _sample(self, now: float, done: int) -> None:
        if self._samples and done < self._samples[-1][1]:
            self._samples.clear()  # went backwards (a file restarted): start measuring again
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.SPEED_WINDOW:
            self._samples.popleft()

    def _speed(self) -> float:
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0


class JsonLines:
    """One JSON object per line, flushed: ``{"event", "percent", "done", "total", "file",
    "step", "desc"}``.

    Every start/file/verified/done/failed event is written; a "bytes" event only when its
    percent differs from the last line's, and not within 0.1 s of the previous "bytes" line.
    """

    INTERVAL = 0.1

    def __init__(
        self, stream: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._last_percent: int | None = None
        self._last_bytes_line: float | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == "bytes":
            now = self._clock()
            if event.percent == self._last_percent:
                return
            if self._last_bytes_line is not None and now - self._last_bytes_line < self.INTERVAL:
                return
            self._last_bytes_line = now
        self._last_percent = event.percent
        record = {
            "event": event.kind,
            "percent": event.percent,
            "done": event.done_bytes,
            "total": event.total_bytes,
            "file": event.file_name,
            "step": event.step,
            "desc": event.desc,
        }
        self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._stream.flush()


class StepReporter:
    """The IoT Platform ``step`` rule: ``publish(step, desc)`` with

    0 at start; then, each time the percent reaches the next multiple of ``step_percent``, that
    multiple (5, 10, 15, ...: the platform's console shows round steps, and a device's sequence
    does not depend on how the bytes happened to arrive); never 100 before done; 100 at done; on
    failure the negative code and a ``desc`` naming the file and the reason. Nothing after done
    or failure.
    """

    def __init__(self, step_percent: int = 5, *, publish: Callable[[int, str], None]) -> None:
        if not 1 <= step_percent <= 100:
            raise ValueError("step_percent must be within 1..100")
        self._step = step_percent
        self._publish = publish
        self._last: int | None = None
        self._ended = False

    def __call__(self, event: ProgressEvent) -> None:
        if self._ended:
            return
        if event.kind == "start":
            self._last = 0
            self._publish(0, "")
        elif event.kind == "done":
            self._ended = True
            self._publish(100, "")
        elif event.kind == "failed":
            self._ended = True
            self._publish(event.step if event.step is not None else -1, _failure_desc(event))
        else:
            last = self._last if self._last is not None else 0
            reached = event.percent // self._step * self._step
            if event.percent < 100 and reached > last:
                self._last = reached
                self._publish(reached, "")
