"""The ``rpi-updater`` command. The only place that turns errors into exit codes.

Exit codes of ``install``: 0 done, 2 invalid task or configuration (nothing written),
3 download failed, 4 verification failed, 5 write or hook failed, 1 anything else.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from updater import __version__
from updater.config import DEFAULT_CONFIG_PATH, load_config
from updater.errors import TaskError, UpdaterError
from updater.progress import JsonLines, Progress, ProgressEvent, TerminalBar

log = logging.getLogger("updater")

MAX_TASK_FILE = 1 << 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rpi-updater", description="Over-the-air A/B updates for Raspberry Pi fleets."
    )
    p.add_argument("--version", action="version", version=f"rpi-updater {__version__}")
    p.add_argument(
        "--config", default=DEFAULT_CONFIG_PATH, help=f"configuration file ({DEFAULT_CONFIG_PATH})"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    inst = sub.add_parser("install", help="install an update task from a JSON file")
    inst.add_argument("task", help="task JSON: an IoT Platform push, its data, or '-' for stdin")
    inst.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    inst.add_argument(
        "--progress",
        choices=("auto", "bar", "json", "none"),
        default="auto",
        help="progress display: a bar on a terminal, JSON lines on stdout, or none",
    )
    return p


def _read_task(name: str) -> bytes:
    if name == "-":
        data = sys.stdin.buffer.read(MAX_TASK_FILE + 1)
    else:
        try:
            with Path(name).open("rb") as f:
                data = f.read(MAX_TASK_FILE + 1)
        except OSError as err:
            raise TaskError("(file)", f"cannot read {name}: {err.strerror or err}") from err
    if len(data) > MAX_TASK_FILE:
        raise TaskError("(file)", f"{name} is larger than {MAX_TASK_FILE} bytes")
    return data


def _progress_sinks(mode: str) -> list[Callable[[ProgressEvent], None]]:
    if mode == "json":
        return [JsonLines(sys.stdout)]
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return [TerminalBar(sys.stderr)]
    return []


def cmd_install(args: argparse.Namespace) -> int:
    from updater.install import Installer
    from updater.plan import make_plan
    from updater.task import parse_task

    sinks = _progress_sinks(args.progress)
    try:
        task = parse_task(_read_task(args.task))
        config = load_config(args.config)
        plan = make_plan(task, config)
    except UpdaterError as err:
        # Refused before anything was written; a JSON consumer still gets its "failed" line.
        Progress(0, sinks).failed(err.step, err.desc, err.file_name)
        raise
    if args.dry_run:
        print(plan.describe())
        return 0
    progress = Progress(plan.total_bytes, sinks)
    result = Installer(plan, config, progress).run()
    if not result.already_installed:
        log.info(
            "task %s installed%s: %d bytes received for %d bytes of files",
            result.task_id,
            f" into slot {result.slot}" if result.slot else "",
            result.bytes_received,
            plan.total_bytes,
        )
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"install": cmd_install}


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (systemd stopping us) unwinds like Ctrl-C: cleanup runs, hooks are killed, the
    journal stays resumable, and the platform is not told the update failed."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = _parser().parse_args(argv)
    # On a terminal a log line first clears the progress bar's line; the bar redraws below it.
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"{clear}rpi-updater: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return COMMANDS[args.command](args)
    except UpdaterError as err:
        log.error("%s (step %d)", err.desc, err.step)
        return err.exit_code
    except KeyboardInterrupt as err:
        log.error("interrupted (%s); run the same command again to resume", err or "SIGINT")
        return 143 if str(err) == "SIGTERM" else 130


if __name__ == "__main__":
    sys.exit(main())
