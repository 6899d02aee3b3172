"""Tests of updater/progress.py: percent math, throttling (injected clock), the sinks."""

from __future__ import annotations

import io
import json
import logging
import threading
from itertools import pairwise

import pytest

from updater.progress import (
    JsonLines,
    Progress,
    ProgressEvent,
    StepReporter,
    TerminalBar,
    percent_of,
)


class Clock:
    """A settable clock; tests step it by binary fractions (1/8, 1/32 s) to stay exact."""

    def __init__(self) -> None:
        self.now = 64.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def __call__(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


def run_package(progress: Progress, files: list[tuple[str, int]], chunk: int) -> None:
    progress.start()
    for name, size in files:
        progress.begin_file(name)
        left = size
        while left:
            n = min(chunk, left)
            progress.advance(n)
            left -= n
        progress.file_verified(name)
    progress.done()


THREE_FILES = [("boot.img", 400), ("rootfs.img", 350), ("app.conf", 250)]


# --------------------------------------------------------------------------------------------
# Percent


@pytest.mark.parametrize(
    ("done", "total", "finished", "expected"),
    [
        (0, 0, False, 0),
        (5, 0, False, 0),
        (0, 0, True, 100),
        (0, 1000, False, 0),
        (9, 1000, False, 0),
        (10, 1000, False, 1),
        (1, 3, False, 33),
        (2, 3, False, 66),
        (999, 1000, False, 99),
        (1000, 1000, False, 99),
        (1500, 1000, False, 99),
        (-5, 1000, False, 0),
        (1000, 1000, True, 100),
        (10**12 - 1, 10**12, False, 99),
    ],
)
def test_percent_of(done: int, total: int, finished: bool, expected: int) -> None:
    assert percent_of(done, total, finished=finished) == expected


def test_never_100_before_done_and_100_at_done() -> None:
    rec = Recorder()
    p = Progress(1000, [rec], clock=Clock())
    run_package(p, THREE_FILES, 30)
    assert all(e.percent < 100 for e in rec.events[:-1])
    last = rec.events[-1]
    assert (last.kind, last.percent, last.done_bytes, last.total_bytes) == ("done", 100, 1000, 1000)
    before_done = [e for e in rec.events if e.kind == "verified"][-1]
    assert (before_done.percent, before_done.done_bytes) == (99, 1000)


def test_event_sequence_and_fields() -> None:
    rec = Recorder()
    p = Progress(200, [rec], clock=Clock())
    p.start()
    p.begin_file("a.img")
    p.advance(50)
    p.file_verified("a.img")
    p.begin_file("b.img")
    p.advance(150)
    p.done()
    assert rec.events == [
        ProgressEvent("start", 0, 200, 0, None, None, ""),
        ProgressEvent("file", 0, 200, 0, "a.img", None, ""),
        ProgressEvent("bytes", 50, 200, 25, "a.img", None, ""),
        ProgressEvent("verified", 50, 200, 25, "a.img", None, ""),
        ProgressEvent("file", 50, 200, 25, "b.img", None, ""),
        ProgressEvent("bytes", 200, 200, 99, "b.img", None, ""),
        ProgressEvent("done", 200, 200, 100, "b.img", None, ""),
    ]


def test_empty_package_stays_at_0_until_done() -> None:
    rec = Recorder()
    p = Progress(0, [rec], clock=Clock())
    p.start()
    p.begin_file("empty")
    p.advance(0)
    p.set_done(0)
    p.file_verified("empty")
    p.done()
    assert [(e.kind, e.percent) for e in rec.events] == [
        ("start", 0),
        ("file", 0),
        ("verified", 0),
        ("done", 100),
    ]


def test_failed_carries_step_desc_and_file_and_ends_the_stream() -> None:
    rec = Recorder()
    p = Progress(1000, [rec], clock=Clock())
    p.start()
    p.begin_file("rootfs.img")
    p.advance(420)
    p.failed(-3, "sha256 mismatch", "rootfs.img")
    p.advance(100)  # a late download callback
    p.done()
    p.failed(-1, "again")
    assert rec.kinds() == ["start", "file", "bytes", "failed"]
    failed = rec.events[-1]
    assert (failed.step, failed.desc, failed.file_name, failed.percent) == (
        -3,
        "sha256 mismatch",
        "rootfs.img",
        42,
    )
    assert p.finished


@pytest.mark.parametrize("step", [0, -5, 1, 100])
def test_failed_accepts_only_platform_codes(step: int) -> None:
    with pytest.raises(ValueError):
        Progress(10, []).failed(step, "x")


def test_negative_total_is_refused() -> None:
    with pytest.raises(ValueError):
        Progress(-1, [])


# --------------------------------------------------------------------------------------------
# Throttling


def test_advance_emits_on_percent_change_or_every_0_2_s() -> None:
    clock = Clock()
    rec = Recorder()
    p = Progress(10_000, [rec], clock=clock)
    p.start()
    rec.events.clear()
    p.advance(10)  # 0 %: nothing new, 0 s since start
    clock.now += 0.125
    p.advance(10)
    assert rec.events == []
    clock.now += 0.125  # >= 0.2 s since the last event: a heartbeat
    p.advance(10)
    assert [(e.kind, e.done_bytes, e.percent) for e in rec.events] == [("bytes", 30, 0)]
    p.advance(70)  # 100 bytes = 1 %: at once, whatever the time
    assert [(e.done_bytes, e.percent) for e in rec.events][-1] == (100, 1)
    for _ in range(50):
        p.advance(1)  # same percent, no time passes
    assert len(rec.events) == 2
    clock.now += 0.125
    p.advance(1)
    assert len(rec.events) == 2
    clock.now += 0.125
    p.advance(1)
    assert len(rec.events) == 3
    assert rec.events[-1].done_bytes == 152


def test_set_done_is_absolute_and_may_go_back() -> None:
    clock = Clock()
    rec = Recorder()
    p = Progress(1000, [rec], clock=clock)
    p.start()
    p.set_done(600)  # a resume re-hashed the written prefix
    p.set_done(200)  # a file changed on the server and starts over
    p.advance(50)
    assert [(e.done_bytes, e.percent) for e in rec.events[1:]] == [(600, 60), (200, 20), (250, 25)]
    assert p.done_bytes == 250


def test_advance_is_thread_safe_and_events_stay_ordered() -> None:
    rec = Recorder()
    p = Progress(8 * 5000, [rec])
    p.start()

    def work() -> None:
        for _ in range(5000):
            p.advance(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.done_bytes == 40_000
    done = [e.done_bytes for e in rec.events]
    assert done == sorted(done)
    assert [e.percent for e in rec.events if e.kind == "bytes"][-1] == 99


def test_a_failing_sink_is_logged_once_and_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(event: ProgressEvent) -> None:
        raise BrokenPipeError("stdout closed")

    rec = Recorder()
    p = Progress(100, [broken, rec], clock=Clock())
    with caplog.at_level(logging.ERROR, logger="updater.progress"):
        run_package(p, [("a", 100)], 10)
    assert rec.kinds()[-1] == "done"
    assert len([r for r in caplog.records if "progress sink" in r.getMessage()]) == 1


# --------------------------------------------------------------------------------------------
# StepReporter


def test_step_reporter_for_a_three_file_package() -> None:
    published: list[tuple[int, str]] = []
    p = Progress(
        1000,
        [StepReporter(5, publish=lambda step, desc: published.append((step, desc)))],
        clock=Clock(),
    )
    run_package(p, THREE_FILES, 30)
    # 30-byte chunks of 1000 bytes: percents 3, 6, 9, ...; each multiple of 5 reached is
    # published once, whatever the chunk that reached it; 1000/1000 is 99 until done.
    assert [s for s, _ in published] == [0, *range(5, 100, 5), 100]
    assert all(desc == "" for _, desc in published)


def test_step_reporter_failure_and_resume() -> None:
    published: list[tuple[int, str]] = []
    clock = Clock()
    p = Progress(
        1000,
        [StepReporter(10, publish=lambda step, desc: published.append((step, desc)))],
        clock=clock,
    )
    p.start()
    p.begin_file("boot.img")
    p.set_done(420)  # resume: the prefix re-hashed: 40 reached
    p.set_done(300)  # went back: nothing to publish
    p.advance(100)  # 40 again: already published
    p.advance(50)  # 45
    p.advance(80)  # 53: 50 reached
    p.failed(-2, "connection reset after 3 attempts", "boot.img")
    p.done()
    assert published == [
        (0, ""),
        (40, ""),
        (50, ""),
        (-2, "boot.img: connection reset after 3 attempts"),
    ]


def test_step_reporter_desc_does_not_repeat_the_file_name() -> None:
    published: list[tuple[int, str]] = []
    reporter = StepReporter(publish=lambda step, desc: published.append((step, desc)))
    reporter(ProgressEvent("failed", 0, 10, 0, "a.img", -4, "a.img: disk full"))
    reporter(ProgressEvent("done", 10, 10, 100))
    assert published == [(-4, "a.img: disk full")]


def test_step_reporter_small_steps_and_validation() -> None:
    published: list[int] = []
    p = Progress(100, [StepReporter(1, publish=lambda s, d: published.append(s))], clock=Clock())
    run_package(p, [("f", 100)], 1)
    assert published == [*range(100), 100]
    with pytest.raises(ValueError):
        StepReporter(0, publish=lambda s, d: None)


# --------------------------------------------------------------------------------------------
# JsonLines


def test_json_lines_parse_and_cover_every_kind_event() -> None:
    out = io.StringIO()
    clock = Clock()
    p = Progress(1000, [JsonLines(out, clock=clock)], clock=clock)
    p.start()
    for name, size in THREE_FILES:
        p.begin_file(name)
        for _ in range(size // 50):
            clock.now += 0.15
            p.advance(50)
        p.file_verified(name)
    p.done()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all(
        set(r) == {"event", "percent", "done", "total", "file", "step", "desc"} for r in records
    )
    assert records[0] == {
        "event": "start",
        "percent": 0,
        "done": 0,
        "total": 1000,
        "file": None,
        "step": None,
        "desc": "",
    }
    assert [r["event"] for r in records if r["event"] != "bytes"] == [
        "start",
        *[k for name, _ in THREE_FILES for k in ("file", "verified")],
        "done",
    ]
    # 0.15 s apart, so every change of percent (5 % per chunk) is written; 1000/1000 is 99.
    assert [r["percent"] for r in records if r["event"] == "bytes"] == [*range(5, 100, 5), 99]
    assert records[-1]["percent"] == 100


def test_json_lines_limit_bytes_lines_to_10_a_second() -> None:
    out = io.StringIO()
    clock = Clock()
    p = Progress(10_000, [JsonLines(out, clock=clock)], clock=clock)
    p.start()
    for _ in range(100):  # 1 % each, 0.01 s apart: 1 s in all
        clock.now += 0.01
        p.advance(100)
    p.failed(-4, "write error", "rootfs.img")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    bytes_lines = [r for r in records if r["event"] == "bytes"]
    assert 9 <= len(bytes_lines) <= 11
    assert records[-1] == {
        "event": "failed",
        "percent": 99,
        "done": 10_000,
        "total": 10_000,
        "file": "rootfs.img",
        "step": -4,
        "desc": "write error",
    }


# --------------------------------------------------------------------------------------------
# TerminalBar


def test_terminal_bar_redraws_at_most_10_times_a_second() -> None:
    clock = Clock()
    draws: list[tuple[float, str]] = []

    class Stream(io.StringIO):
        def write(self, s: str) -> int:
            draws.append((clock.now, s))
            return super().write(s)

    out = Stream()
    p = Progress(100 << 20, [TerminalBar(out, clock=clock)], clock=clock)
    p.start()
    p.begin_file("rootfs.img")
    for _ in range(100):  # 1 MiB every 1/32 s: 32 MiB/s, 3.125 s in all
        clock.now += 1 / 32
        p.advance(1 << 20)
    p.done()
    times = [t for t, _ in draws[:-1]]  # the final line is always drawn
    assert all(b - a >= 0.1 for a, b in pairwise(times))
    assert len(draws) >= 3.125 * 10 * 0.75
    assert all(s.startswith("\r") for _, s in draws)
    text = out.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    middle = draws[len(draws) // 2][1]
    assert "  32.0 MiB/s  rootfs.img" in middle
    assert draws[-1][1].startswith("\r[" + "#" * 30 + "] 100%  100.0/100.0 MiB")


def test_terminal_bar_shows_a_failure_on_its_last_line() -> None:
    out = io.StringIO()
    p = Progress(1000, [TerminalBar(out, clock=Clock())], clock=Clock())
    p.start()
    p.advance(500)
    p.failed(-3, "md5 mismatch", "boot.img")
    last = out.getvalue().split("\r")[-1]
    assert " 50%" in last
    assert last.endswith("FAILED (-3): boot.img: md5 mismatch\n")
