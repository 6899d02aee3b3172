"""The update state machine as data: states, events, one transition table, a resume map.

Mender's words, which field engineers know::

    Idle -> Download -> Install -> Armed (reboot pending) -> VerifyReboot -> Commit -> Report
                  \\          \\         \\                        \\
                   +----------+---------+------------------------+--> Rollback -> Report

A handler per state (in :mod:`updater.flow`) does that state's work and returns an
:class:`Event`; :func:`next_state` looks the pair up in :data:`TRANSITIONS`; a missing row is a bug
and raises. The state is persisted *before* its side effects run (on entry), so a kill -9 or a
power cut resumes by mapping the persisted state through :data:`RESUME`. A state resumed more than
``health.max_resumes`` times in a row is treated as a boot loop and rolls back.

The record also keeps what outlives one update: the committed version of each target, the slots
that failed their trial per package (never armed again for that package), and the last result.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from updater.errors import StateError
from updater.journal import atomic_write_json, read_json


class State(StrEnum):
    IDLE = "idle"
    DOWNLOAD = "download"
    INSTALL = "install"
    ARMED = "armed"
    VERIFY_REBOOT = "verify-reboot"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    REPORT = "report"


class Event(StrEnum):
    TASK = "task"  # a task was accepted for installation
    DOWNLOADED = "downloaded"  # every file streamed and verified, missing parts cloned
    INSTALLED = "installed"  # staged files in place, post-install hooks passed, slot armed
    NOTHING_TO_BOOT = "nothing-to-boot"  # a task without slot parts: no reboot, commit now
    REBOOT_PENDING = "reboot-pending"  # still the boot that armed: wait for the reboot
    TRIAL_BOOTED = "trial-booted"  # this boot is the trial of the armed slot
    OLD_SLOT_BOOTED = "old-slot-booted"  # back on the old slot: the trial never got through
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled-back"
    FAILED = "failed"  # the state's work failed (download, write, hook, bootloader)
    REPORTED = "reported"
    TOO_MANY_RESUMES = "too-many-resumes"


S, E = State, Event

#: (state, event) -> next state. Every pair a handler can return is here; anything else is a bug.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.IDLE, E.TASK): S.DOWNLOAD,
    (S.DOWNLOAD, E.DOWNLOADED): S.INSTALL,
    (S.DOWNLOAD, E.FAILED): S.ROLLBACK,
    (S.DOWNLOAD, E.TOO_MANY_RESUMES): S.ROLLBACK,
    (S.INSTALL, E.INSTALLED): S.ARMED,
    (S.INSTALL, E.NOTHING_TO_BOOT): S.COMMIT,
    (S.INSTALL, E.FAILED): S.ROLLBACK,
    (S.INSTALL, E.TOO_MANY_RESUMES): S.ROLLBACK,
    (S.ARMED, E.REBOOT_PENDING): S.ARMED,
    (S.ARMED, E.TRIAL_BOOTED): S.VERIFY_REBOOT,
    (S.ARMED, E.OLD_SLOT_BOOTED): S.ROLLBACK,
    (S.ARMED, E.FAILED): S.ROLLBACK,
    (S.ARMED, E.TOO_MANY_RESUMES): S.ROLLBACK,
    (S.VERIFY_REBOOT, E.HEALTHY): S.COMMIT,
    (S.VERIFY_REBOOT, E.UNHEALTHY): S.ROLLBACK,
    (S.VERIFY_REBOOT, E.OLD_SLOT_BOOTED): S.ROLLBACK,
    (S.VERIFY_REBOOT, E.FAILED): S.ROLLBACK,
    (S.VERIFY_REBOOT, E.TOO_MANY_RESUMES): S.ROLLBACK,
    (S.COMMIT, E.COMMITTED): S.REPORT,
    (S.COMMIT, E.OLD_SLOT_BOOTED): S.ROLLBACK,  # a reset during the commit, back on the old slot
    (S.COMMIT, E.FAILED): S.ROLLBACK,
    (S.COMMIT, E.TOO_MANY_RESUMES): S.ROLLBACK,
    (S.ROLLBACK, E.ROLLED_BACK): S.REPORT,
    (S.ROLLBACK, E.FAILED): S.REPORT,  # recorded as such; nothing more we can do
    (S.ROLLBACK, E.TOO_MANY_RESUMES): S.REPORT,
    (S.REPORT, E.REPORTED): S.IDLE,
    (S.REPORT, E.TOO_MANY_RESUMES): S.IDLE,
}

#: What a persisted state means after a restart: run its handler again ("resume"; every handler
#: is idempotent) or give up on the update ("rollback"). States not listed roll back.
RESUME: dict[State, str] = {
    S.IDLE: "resume",
    S.DOWNLOAD: "resume",  # the engine continues from its journal
    S.INSTALL: "resume",  # renames and hooks are journaled and idempotent
    S.ARMED: "resume",  # the boot id tells "not rebooted yet" from "came back"
    S.VERIFY_REBOOT: "resume",  # the checks run again on this boot, or the boot changed
    S.COMMIT: "resume",
    S.ROLLBACK: "resume",
    S.REPORT: "resume",
}


class TransitionError(StateError):
    """A handler returned an event its state has no row for: a bug, reported loudly."""


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise TransitionError(f"no transition from {state} on {event}") from None


@dataclass(slots=True)
class Record:
    """The persisted update state (``state.json`` in the state directory)."""

    state: State = State.IDLE
    task_id: str | None = None
    version: str | None = None  # the package version being installed
    task: dict[str, Any] | None = None  # the task as received (to resume without the platform)
    manifest: str | None = None  # its verified manifest envelope (verified again on a resume)
    slot: str | None = None  # the slot written and armed
    from_slot: str | None = None  # the slot that was booted when the update started
    boot_id: str | None = None  # the boot during which the state was entered
    armed_boot_id: str | None = None  # the boot that armed the trial (the next one tries it)
    resumes: int = 0
    pending_versions: dict[str, str] = field(default_factory=dict)  # target -> new version
    reason: str = ""  # why the update is failing (Rollback, Report)
    step: int = 0  # the IoT Platform code of the failure (-1..-4), 0 for none
    installed: dict[str, str] = field(default_factory=dict)  # target -> committed version
    failed_trials: dict[str, str] = field(default_factory=dict)  # task id -> slot that failed
    #: slot -> the versions of the committed image it holds (absent: unknown or being written)
    slot_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    last_result: dict[str, Any] = field(default_factory=dict)
    reboot_required: bool = False
    reboot_issued: bool = False  # the reboot into the trial was asked for (not just armed)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = str(self.state)
        return data

    @classmethod
    def from_json(cls, data: object, path: Path) -> Record:
        if not isinstance(data, dict):
            raise StateError(f"{path} does not hold a JSON object")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        try:
            known["state"] = State(known.get("state", "idle"))
            return cls(**known)
        except (TypeError, ValueError) as err:
            raise StateError(f"{path} is not a state record: {err}") from err

    def finish(self, result: str) -> None:
        """Close the current update: keep what outlives it, forget the rest."""
        self.last_result = {
            "task_id": self.task_id,
            "version": self.version,
            "slot": self.slot,
            "result": result,
            "reason": self.reason,
            "step": self.step,
            "time": int(time.time()),
        }
        self.task_id = self.version = self.task = self.manifest = None
        self.slot = self.from_slot = None
        self.boot_id = self.armed_boot_id = None
        self.pending_versions = {}
        self.reason = ""
        self.step = 0
        self.reboot_required = self.reboot_issued = False


class StateStore:
    """Loads and saves the :class:`Record` atomically."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"

    def load(self) -> Record:
        data = read_json(self.path)
        return Record() if data is None else Record.from_json(data, self.path)

    def save(self, record: Record) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_json(self.path, record.to_json())
