"""The ``rpi-updater`` command. The only place that turns errors into exit codes.

Exit codes of ``install``: 0 done, 2 invalid task or configuration (nothing written),
3 download failed, 4 verification failed, 5 write or hook failed, 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from updater import __version__
from updater.config import DEFAULT_CONFIG_PATH, Config, load_config
from updater.errors import TaskError, UpdaterError, VerificationError
from updater.journal import StateLock
from updater.logctx import ContextFilter, set_context
from updater.machine import State
from updater.progress import JsonLines, Progress, ProgressEvent, TerminalBar

if TYPE_CHECKING:
    from updater.flow import Flow
    from updater.task import Task

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
    sub.add_parser("daemon", help="the MQTT agent: hear tasks, install them, report")
    sub.add_parser("health-check", help="at boot: commit a healthy trial boot or roll back")
    status = sub.add_parser("status", help="slots, state, versions, last result")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("mark-good", help="keep the booted slot (commit it)")
    sub.add_parser("mark-bad", help="drop the booted slot or the pending update (roll back)")
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair to sign packages with")
    keygen.add_argument("--out", required=True, type=Path, help="directory for NAME.key/.pub")
    keygen.add_argument("--name", default="signing", help="file name of the pair (signing)")
    bundle = sub.add_parser("bundle", help="build a signed package: files, manifest, task")
    bundle.add_argument("--key", required=True, type=Path, help="the private key (keygen's .key)")
    bundle.add_argument("--out", required=True, type=Path, help="directory to write the package")
    bundle.add_argument(
        "--version", required=True, dest="package_version", help="the package version"
    )
    bundle.add_argument(
        "--board", required=True, action="append", help="a board model it is for (repeatable)"
    )
    bundle.add_argument("--base-url", required=True, help="https:// URL the files are served at")
    bundle.add_argument(
        "--sign-method", default="SHA256", help="the task's per-file digest: SHA256 or MD5"
    )
    bundle.add_argument(
        "--allow-downgrade",
        action="store_true",
        help="a rollback release: devices may install it over a higher version",
    )
    bundle.add_argument(
        "--compress",
        default="zstd",
        help="zstd (the default: resumable frame by frame), xz, gzip or none",
    )
    bundle.add_argument("--level", type=int, help="compression level (zstd 3, xz 6, gzip 6)")
    bundle.add_argument(
        "--frame-size",
        type=int,
        default=4,
        help="zstd: MiB of image per independent frame (the most a device fetches again)",
    )
    bundle.add_argument(
        "--max-file-size",
        type=int,
        default=1000,
        help="MiB a served file may have (the IoT Platform's limit: 1000)",
    )
    bundle.add_argument("files", nargs="+", metavar="FILE=TARGET=VERSION", help="payload files")
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


def _flow(config: Config, sinks: Sequence[Callable[[ProgressEvent], None]] = ()) -> Flow:
    from updater.flow import Flow

    return Flow(config, progress_sinks=sinks)


def cmd_install(args: argparse.Namespace) -> int:
    from updater.task import parse_task

    sinks = _progress_sinks(args.progress)
    planned = False
    task: Task | None = None
    try:
        task = parse_task(_read_task(args.task))
        config = load_config(args.config)
        plan = _flow(config).prepare(task)  # no lock yet: nothing is written
        planned = True
        if args.dry_run:
            print(plan.describe())
            return 0
        set_context(task=task.task_id, version=task.version, slot=plan.slot)
        with StateLock(Path(config.state_dir)):
            flow = _flow(config, sinks)
            record = flow.install(task, plan)
    except UpdaterError as err:
        if not planned:
            # Refused before anything was written; a JSON consumer still gets its "failed" line.
            Progress(0, sinks).failed(err.step, err.desc, err.file_name)
            if (
                isinstance(err, VerificationError)
                and task is not None
                and _flow(config).under_way(task)
            ):
                with StateLock(Path(config.state_dir)):
                    _flow(config).abandon(task)
        raise
    if flow.error is not None:  # logged by the flow; the exit code says which kind
        return flow.error.exit_code
    if record.state == State.ARMED:
        what = "rebooting into it" if flow.rebooted else "reboot required"
        log.info("version %s installed in slot %s; %s", task.version, record.slot, what)
    elif record.last_result.get("result") == "committed":
        log.info("version %s installed (nothing to reboot)", task.version)
    return 0


def cmd_health_check(args: argparse.Namespace) -> int:
    """At boot: judge a trial boot (commit or roll back), or record why the trial failed."""
    config = load_config(args.config)
    with StateLock(Path(config.state_dir)):
        flow = _flow(config)
        before = flow.record.state
        record = flow.resume()
    if before == State.IDLE:
        log.info("no update pending")
        return 0
    result = record.last_result.get("result")
    if record.state == State.IDLE and result != "committed":
        log.error(
            "update %s failed: %s",
            record.last_result.get("version"),
            record.last_result.get("reason"),
        )
        return 1
    log.info("state %s%s", record.state, f" (update {result})" if result else "")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    info = _flow(config).status()
    if args.json:
        print(json.dumps(info, indent=1, sort_keys=True))
        return 0
    versions = info.get("versions")
    assert isinstance(versions, dict)
    print(f"booted slot:   {info.get('booted') or info.get('booted_error')}")
    print(f"primary slot:  {info.get('primary') or info.get('bootloader_error')}")
    print(f"trial boot:    {'yes' if info.get('trial') else 'no'}  ({info['bootloader']})")
    print(f"state:         {info['state']}")
    update = info.get("update")
    if isinstance(update, dict):
        print(
            f"update:        version {update['version']} -> slot {update['slot']}"
            + ("  (reboot required)" if update["reboot_required"] else "")
        )
    print(f"version:       {versions.get('combined') or 'unknown'}")
    for target, version in versions.items():
        if target != "combined":
            print(f"  {target:12} {version}")
    last = info.get("last_result")
    if isinstance(last, dict):
        reason = f": {last['reason']}" if last.get("reason") else ""
        print(f"last result:   {last.get('result')} {last.get('version')}{reason}")
    return 0


def cmd_mark_good(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    with StateLock(Path(config.state_dir)):
        flow = _flow(config)
        flow.mark_good()
    return flow.error.exit_code if flow.error else 0


def cmd_mark_bad(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    with StateLock(Path(config.state_dir)):
        flow = _flow(config)
        flow.mark_bad()
    return flow.error.exit_code if flow.error else 0


def cmd_daemon(args: argparse.Namespace) -> int:
    """The MQTT agent (a systemd Type=notify service)."""
    from updater.agent import run_daemon

    return run_daemon(load_config(args.config), args.config)


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write a signing key pair; print the key id (what a keyring's ``revoked`` file lists)."""
    from updater.bundle import write_key_pair

    key_path, pub_path, key_id = write_key_pair(args.out, args.name)
    log.info("wrote %s (keep it secret) and %s (for the devices' keyring)", key_path, pub_path)
    print(key_id)
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """Build a signed package ready to upload, and the task that announces it."""
    from updater.bundle import (
        build_bundle,
        parse_compression,
        parse_file_argument,
        parse_sign_method,
        read_key_file,
    )

    result = build_bundle(
        [parse_file_argument(text) for text in args.files],
        private_pem=read_key_file(args.key),
        out_dir=args.out,
        version=args.package_version,
        boards=args.board,
        base_url=args.base_url,
        sign_method=parse_sign_method(args.sign_method),
        allow_downgrade=args.allow_downgrade,
        compression=parse_compression(args.compress, args.level, args.frame_size << 20),
        max_file_size=args.max_file_size << 20,
    )
    print(result.describe())
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "install": cmd_install,
    "daemon": cmd_daemon,
    "health-check": cmd_health_check,
    "status": cmd_status,
    "mark-good": cmd_mark_good,
    "mark-bad": cmd_mark_bad,
    "keygen": cmd_keygen,
    "bundle": cmd_bundle,
}


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
        format=f"{clear}rpi-updater: %(levelname)s: %(ctx)s%(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(ContextFilter())
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
