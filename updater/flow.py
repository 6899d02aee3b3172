"""The whole update, driven by the state machine: one handler per state, each returning an event.

Entry points (the CLI holds the state lock around each):

- :meth:`Flow.install`: a new task: Download -> Install -> Armed, then reboot per the config (or
  Commit at once when the task brings no slot part);
- :meth:`Flow.resume`: whatever the persisted state says, after a restart or at boot (the health
  check): a trial boot is checked and committed or rolled back; a device that came back on the old
  slot records why the trial failed;
- :meth:`Flow.mark_good` / :meth:`Flow.mark_bad`: an operator's verdict on the booted slot.

Every handler is idempotent, because a kill -9 or a power cut may make it run again.
"""

from __future__ import annotations

import logging
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from updater.bootloader import Bootloader, make_bootloader
from updater.config import Config
from updater.errors import (
    InvalidInput,
    PlanError,
    StateError,
    UpdaterError,
    VerificationError,
)
from updater.health import run_checks
from updater.install import (
    Installer,
    cancellable_sleep,
    commit_file_targets,
    undo_file_targets,
)
from updater.journal import Journal
from updater.machine import RESUME, Event, Record, State, StateStore, next_state
from updater.plan import InstallPlan, make_plan
from updater.progress import Progress, ProgressEvent
from updater.slots import booted_slot
from updater.task import Task, parse_task, task_to_json
from updater.trust import check_task
from updater.versions import check_package_version, combined_version

log = logging.getLogger("updater.flow")


class BusyError(InvalidInput):
    """Another update is under way or waits for its reboot: refused, nothing written."""


class Flow:
    def __init__(
        self,
        config: Config,
        *,
        bootloader: Bootloader | None = None,
        progress_sinks: Sequence[Callable[[ProgressEvent], None]] = (),
        cancel: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.cancel = cancel
        self.store = StateStore(Path(config.state_dir))
        self.record = self.store.load()
        self.progress_sinks = progress_sinks
        self._bootloader = bootloader
        self._plan: InstallPlan | None = None
        self.rebooted = False
        self.error: UpdaterError | None = None  # why the last update failed, for the exit code
        self.handlers: dict[State, Callable[[], Event]] = {
            State.DOWNLOAD: self._download,
            State.INSTALL: self._install,
            State.ARMED: self._armed,
            State.VERIFY_REBOOT: self._verify_reboot,
            State.COMMIT: self._commit,
            State.ROLLBACK: self._rollback,
            State.REPORT: self._report,
        }

    # -- the pieces ------------------------------------------------------------------------------

    @property
    def bootloader(self) -> Bootloader:
        if self._bootloader is None:
            self._bootloader = make_bootloader(self.config.bootloader, self.config.system.cmdline)
        return self._bootloader

    def boot_id(self) -> str:
        try:
            return Path(self.config.system.boot_id).read_text().strip()
        except OSError as err:
            raise StateError(f"cannot read {self.config.system.boot_id}: {err}") from err

    def booted(self) -> str:
        """The running slot: the kernel's view, cross-checked with the bootloader's."""
        kernel = booted_slot(self.config)
        firmware = self.bootloader.booted_slot()
        if firmware is not None and firmware != kernel:
            raise StateError(
                f"the kernel runs slot {kernel} but the {self.bootloader.name} bootloader says "
                f"it booted slot {firmware}: refusing to guess which slot is running"
            )
        return kernel

    def task(self) -> Task:
        if self.record.task is None:
            raise StateError("the state has no task")
        return parse_task(self.record.task)

    def plan(self) -> InstallPlan:
        """The plan of the update under way, its manifest verified again (offline)."""
        if self._plan is None:
            task = self.task()
            trusted = check_task(task, self.config, envelope=self.record.manifest)
            self._plan = make_plan(task, self.config, trusted)
        return self._plan

    def prepare(self, task: Task) -> InstallPlan:
        """A new task's plan, with everything that can be refused before a write refused: its
        authenticity (:func:`updater.trust.check_task`) and where each file goes.

        The task under way keeps its verified manifest: a restart does not fetch it again.
        """
        known = self.record.manifest if self.record.task_id == task.task_id else None
        sleep = cancellable_sleep(self.cancel) if self.cancel is not None else None
        trusted = check_task(task, self.config, envelope=known, sleep=sleep)
        plan = make_plan(task, self.config, trusted)
        # The version policy too (checked again by install, under the state lock).
        check_package_version(self.config, plan, self._installed())
        return plan

    def under_way(self, task: Task) -> bool:
        """Whether ``task`` is being downloaded or installed (not yet armed)."""
        r = self.record
        return r.task_id == task.task_id and r.state in (State.DOWNLOAD, State.INSTALL)

    def abandon(self, task: Task) -> bool:
        """``task`` was refused, and an update with its id is under way: if the update *as it
        was recorded* (its task and kept manifest, not the copy just received, which anyone
        could have altered) fails its checks now (a key revoked, the keyring replaced), roll it
        back rather than leave it to be resumed. The caller holds the state lock. Returns
        whether it was rolled back."""
        if not self.under_way(task):
            return False
        try:
            self.plan()
        except VerificationError as failed:
            err: UpdaterError = failed
        else:
            return False
        r = self.record
        log.error(
            "the update under way to version %s fails its checks now: rolling back", r.version
        )
        self.error = err
        r.reason, r.step = err.desc, err.step
        self._enter(State.ROLLBACK)
        self._run(stop_at={State.IDLE})
        return True

    def _installed(self) -> dict[str, str]:
        return {**self.config.factory_versions, **self.record.installed}

    def installer(self, plan: InstallPlan) -> Installer:
        progress = Progress(plan.total_bytes, self.progress_sinks)
        return Installer(plan, self.config, progress, cancel=self.cancel)

    def journal(self) -> Journal:
        return Journal.open(Path(self.config.state_dir))

    def versions(self) -> dict[str, str | None]:
        """The combined version and each target's, in configuration order."""
        installed = {**self.config.factory_versions, **self.record.installed}
        return {
            "combined": combined_version(self.config, installed)
            or self.record.last_result.get("package_version"),
            **{t.name: installed.get(t.name) for t in self.config.targets},
        }

    # -- entry points ----------------------------------------------------------------------------

    def install(self, task: Task, plan: InstallPlan) -> Record:
        """Start (or resume) installing ``task``; stops once the slot is armed."""
        record = self.record
        last = record.last_result
        done = last.get("task_id") == task.task_id and last.get("result") == "committed"
        if record.state == State.IDLE and done:
            log.info("task %s is already installed (version %s)", task.task_id, task.version)
            return record
        waiting = (State.ARMED, State.VERIFY_REBOOT, State.COMMIT)
        if record.state in waiting and record.task_id == task.task_id:
            log.info(
                "task %s is already installed in slot %s; waiting for the reboot",
                task.task_id,
                record.slot,
            )
            return record
        if record.state in waiting:
            raise BusyError(self._busy_text())
        if record.state in (State.ROLLBACK, State.REPORT):
            self._run(stop_at={State.IDLE})  # finish the older update's ending first
        if record.state != State.IDLE and record.task_id != task.task_id:
            # Nothing is armed yet: the unfinished task is rolled back and this one replaces it.
            log.warning("task %s replaces the unfinished task %s", task.task_id, record.task_id)
            record.reason = f"superseded by task {task.task_id} (version {task.version})"
            record.step = -1
            self._plan = None
            self._enter(State.ROLLBACK)
            self._run(stop_at={State.IDLE})
        failed = record.failed_trials.get(task.task_id)
        if failed and failed == plan.slot:
            raise BusyError(
                f"slot {failed} already failed its trial boot for this package "
                f"(version {task.version}); it is not armed again for it"
            )
        if record.state == State.IDLE:
            if plan.slot is not None:
                self._check_device()
            versions = check_package_version(self.config, plan, self._installed())
            record.task_id, record.version = task.task_id, task.version
            record.task = task_to_json(task)
            record.manifest = plan.trusted.envelope
            record.slot, record.from_slot = plan.slot, plan.booted
            record.pending_versions = versions
            if plan.slot is not None:
                # What the running slot holds is known good; the slot about to be written is not.
                running = {**self.config.factory_versions, **record.installed}
                record.slot_versions.setdefault(plan.booted or "", running)
                record.slot_versions.pop(plan.slot, None)
            self._plan = plan
            self._enter(next_state(State.IDLE, Event.TASK))
        else:
            self._plan = plan
        return self._run(stop_at={State.IDLE})

    def resume(self) -> Record:
        """Continue whatever the persisted state says (the health check at boot)."""
        state = self.record.state
        if state in (State.IDLE, State.DOWNLOAD, State.INSTALL):
            # A download is continued by `install` or the daemon, never from the boot-time check
            # (it would hold up the boot, and a shutdown would count as a failed resume).
            return self.record
        if RESUME.get(state) != "resume":
            self.record.reason = self.record.reason or f"unknown state {state} after a restart"
            self._enter(State.ROLLBACK)
        return self._run(stop_at={State.IDLE}, resuming=True)

    def mark_good(self) -> Record:
        """The operator vouches for the booted slot: commit it as if the health check passed."""
        if self.record.state not in (State.ARMED, State.VERIFY_REBOOT):
            booted = self.booted()
            self.bootloader.commit(booted)
            log.info("slot %s committed by the operator", booted)
            return self.record
        if self.booted() != self.record.slot:
            raise BusyError(
                f"slot {self.record.slot} is armed but not booted: reboot into it first"
            )
        self._enter(State.COMMIT)
        return self._run(stop_at={State.IDLE})

    def mark_bad(self) -> Record:
        """The operator condemns the update (or the booted slot): roll back."""
        r = self.record
        if r.state == State.IDLE:
            booted = self.booted()
            other = "B" if booted == "A" else "A"
            if other not in r.slot_versions:
                raise BusyError(
                    f"slot {other} holds no committed image (never updated, or written since): "
                    "going back to it could leave the device unbootable"
                )
            self.bootloader.mark_bad(booted)
            r.installed = dict(r.slot_versions[other])
            r.slot_versions.pop(booted, None)
            self.store.save(r)
            log.info("slot %s marked bad by the operator; slot %s is primary", booted, other)
            self._reboot(armed=False)
            return r
        self.record.reason = "marked bad by the operator"
        self.record.step = -1
        self._enter(State.ROLLBACK)
        return self._run(stop_at={State.IDLE})

    def _check_device(self) -> None:
        """Before the first byte: the bootloader can do A/B, and agrees on the running slot."""
        try:
            bl = self.bootloader
            bl.check()
            booted = self.booted()
            # A trial that was committed during this boot is still "a trial" in the firmware's
            # eyes (tryboot's flag is a property of the boot) but its slot is primary now.
            if bl.is_trial() and bl.primary_slot() != booted:
                raise StateError(f"this boot is a trial of slot {booted}: commit or drop it first")
            if bl.primary_slot() != booted:
                raise StateError(
                    f"slot {booted} runs but slot {bl.primary_slot()} boots next: the inactive "
                    "slot would be the one the next reset boots"
                )
            if bl.reboot_argument(True) and not can_pass_reboot_argument(self.config):
                raise StateError(
                    f"reboot.command {list(self.config.reboot.command)} cannot pass the reboot "
                    f"argument {bl.reboot_argument(True)!r} that arms the trial: use systemctl "
                    "reboot, or put {reboot_arg} where the argument goes"
                )
        except UpdaterError as err:
            raise PlanError(f"refusing to install: {err.desc}") from err

    # -- the loop --------------------------------------------------------------------------------

    def _enter(self, state: State) -> None:
        """Persist the new state before any of its side effects (the boot id says which boot)."""
        self.record.state = state
        self.record.resumes = 0
        self.record.boot_id = self.boot_id()
        self.store.save(self.record)
        log.info("state %s", state)

    def _run(self, *, stop_at: set[State], resuming: bool = False) -> Record:
        while True:
            state = self.record.state
            if state == State.IDLE:
                return self.record
            if resuming and state not in (State.ARMED,):
                self.record.resumes += 1
                self.store.save(self.record)
            if resuming and self.record.resumes > self.config.health.max_resumes:
                log.error("state %s resumed %d times: giving up", state, self.record.resumes)
                self.record.reason = (
                    self.record.reason or f"state {state} kept failing (boot loop?)"
                )
                self.record.step = self.record.step or -1
                event = Event.TOO_MANY_RESUMES
                if state == State.REPORT:
                    self.record.finish("failed")
            else:
                event = self.handlers[state]()
            new = next_state(state, event)
            resuming = False
            if new == state:  # waiting (a reboot is pending)
                return self.record
            self._enter(new)
            if new in stop_at:
                return self.record

    def _fail(self, err: UpdaterError) -> Event:
        self.error = err
        self.record.reason = err.desc
        self.record.step = err.step
        log.error("%s (step %d)", err.desc, err.step)
        return Event.FAILED

    def _busy_text(self) -> str:
        r = self.record
        if r.state == State.ARMED:
            return (
                f"version {r.version} is installed in slot {r.slot} and waits for a reboot; "
                "reboot first (or run `rpi-updater mark-bad` to drop it)"
            )
        return f"an update to version {r.version} is in state {r.state}; finish it first"

    # -- handlers, one per state -----------------------------------------------------------------

    def _download(self) -> Event:
        try:
            self.installer(self.plan()).download()
        except UpdaterError as err:
            return self._fail(err)
        return Event.DOWNLOADED

    def _install(self) -> Event:
        plan = self.plan()
        try:
            self.installer(plan).apply()
        except UpdaterError as err:
            return self._fail(err)
        if plan.slot is None:
            return Event.NOTHING_TO_BOOT
        try:
            self.bootloader.check()
        except UpdaterError as err:
            return self._fail(err)
        return Event.INSTALLED

    def _armed(self) -> Event:
        r = self.record
        assert r.slot is not None
        boot = self.boot_id()
        if r.armed_boot_id is None or r.armed_boot_id == boot:
            if not r.reboot_issued:
                # Recorded before the side effect: a rollback from here on marks the slot bad.
                # Arming is idempotent, so a crash before the reboot arms again on the next run.
                r.reboot_required, r.armed_boot_id = True, boot
                self.store.save(r)
                try:
                    self.bootloader.arm(r.slot)
                except UpdaterError as err:
                    return self._fail(err)
                log.info("slot %s armed for one trial boot", r.slot)
                self._reboot(armed=True)
            return Event.REBOOT_PENDING
        return self._after_reboot()

    def _after_reboot(self) -> Event:
        r = self.record
        booted = self.booted()
        if booted == r.slot and self.bootloader.is_trial():
            return Event.TRIAL_BOOTED
        never = self.config.reboot.policy == "never"
        if r.state == State.ARMED and booted == r.from_slot and not r.reboot_issued and not never:
            # The power went before the reboot into the trial was even asked for: the trial
            # never started, so it has not failed. Arm again on this boot.
            log.warning("the device restarted before the reboot into slot %s; arming again", r.slot)
            r.reboot_required, r.armed_boot_id = False, None
            return self._armed()
        if booted == r.slot:
            r.reason = f"slot {r.slot} booted, but not as a trial: refusing to commit on that"
        else:
            r.reason = (
                f"the trial boot of slot {r.slot} did not reach the health check: the device "
                f"came back on slot {booted}"
            )
        r.step = -1
        return Event.OLD_SLOT_BOOTED

    def _verify_reboot(self) -> Event:
        r = self.record
        assert r.slot is not None
        booted = self.booted()
        if booted != r.slot or not self.bootloader.is_trial():
            return self._after_reboot()
        failures = run_checks(self.config.health, slot=r.slot, version=r.version or "")
        if failures:
            r.reason = "health check failed: " + "; ".join(failures)
            r.step = -1
            return Event.UNHEALTHY
        return Event.HEALTHY

    def _commit(self) -> Event:
        r = self.record
        if r.slot is not None and r.boot_id != self.boot_id():
            # A reset came before the commit completed: go on only if the slot still runs,
            # as a trial (U-Boot counts another try) or already primary (the bootloader part
            # was done); tryboot without its commit is back on the old slot.
            try:
                bl = self.bootloader
                keep = self.booted() == r.slot and (bl.is_trial() or bl.primary_slot() == r.slot)
            except UpdaterError as err:
                return self._fail(err)
            if not keep:
                return self._after_reboot()
        try:
            if r.slot is not None:
                self.bootloader.commit(r.slot)
            commit_file_targets(self.journal())
        except UpdaterError as err:
            return self._fail(err)
        for target, version in r.pending_versions.items():
            if version:
                r.installed[target] = version
            else:  # the package did not say: the old version is not true any more
                r.installed.pop(target, None)
        r.reboot_required = False
        if r.slot is not None:
            r.slot_versions[r.slot] = dict(r.installed)
        log.info("version %s committed%s", r.version, f" in slot {r.slot}" if r.slot else "")
        return Event.COMMITTED

    def _rollback(self) -> Event:
        r = self.record
        first: UpdaterError | None = None
        if r.slot is not None and r.reboot_required:
            if r.armed_boot_id not in (None, self.boot_id()):  # the trial boot happened
                r.failed_trials[r.task_id or ""] = r.slot
            try:
                self.bootloader.mark_bad(r.slot)
            except UpdaterError as err:
                first = err
        try:
            journal = self.journal()
            mine = journal.data.get("task_id") == r.task_id
            if mine and journal.data.get("state") != "committed":
                undo_file_targets(journal)
        except UpdaterError as err:
            first = first or err
        if first is not None:
            r.reason = f"{r.reason}; rollback incomplete: {first.desc}".lstrip("; ")
            return Event.FAILED
        return Event.ROLLED_BACK

    def _report(self) -> Event:
        r = self.record
        committed = r.step == 0 and not r.reason
        in_bad_slot = False
        if not committed and r.slot is not None and r.reboot_required:
            try:
                in_bad_slot = self.booted() == r.slot
            except UpdaterError:
                in_bad_slot = False
        package = r.version if committed else r.last_result.get("package_version")
        r.finish("committed" if committed else "failed")
        r.last_result["package_version"] = package
        log.info("update result: %s", r.last_result)
        if in_bad_slot:
            r.state = State.IDLE  # done before the reboot: a crash there must not report again
            self.store.save(r)
            self._reboot(armed=False)  # back to the good slot
        return Event.REPORTED

    # -- reboots ---------------------------------------------------------------------------------

    def _reboot(self, *, armed: bool) -> None:
        policy = self.config.reboot.policy
        command = reboot_command(self.config, self.bootloader.reboot_argument(armed))
        if policy == "never" and armed:
            log.info("reboot required (policy never): %s", shlex.join(command))
            return
        if armed:
            self.record.reboot_issued = True
            self.store.save(self.record)
        if policy == "delay" and armed:
            delay = self.config.reboot.delay
            log.info("rebooting in %g s: %s", delay, shlex.join(command))
            subprocess.Popen(  # detached: the reboot outlives this command
                ["sh", "-c", f"sleep {delay:g} && exec {shlex.join(command)}"],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return
        log.info("rebooting: %s", shlex.join(command))
        try:
            subprocess.run(command, check=True, timeout=60, stdin=subprocess.DEVNULL)
        except KeyboardInterrupt as err:
            # `rpi-updater` (cli.py) turns SIGTERM into KeyboardInterrupt("SIGTERM"): stopped
            # while its reboot command ran, by the shutdown that command started. The state is
            # saved; end normally rather than "interrupted ... run the same command again".
            if str(err) != "SIGTERM":
                raise
            log.info("stopped (SIGTERM) while rebooting: the reboot is under way")
        except subprocess.CalledProcessError as err:
            # Killed by the shutdown it started: systemd stops the service's processes, this
            # command too (without logind, `systemctl reboot` waits for the reboot job until
            # then; the system test found it). The reboot is under way: were it taken for "not
            # asked", a trial that then fails to boot would be armed again, and again. Any
            # other end (an exit status, another signal, no shutdown running) is a failure.
            if -err.returncode not in SHUTDOWN_SIGNALS or not system_stopping():
                self._reboot_failed(command, err, armed=armed)
                return
            log.info("%s ended by signal %d: the reboot is under way", command[0], -err.returncode)
        except (OSError, subprocess.SubprocessError) as err:
            self._reboot_failed(command, err, armed=armed)
            return
        self.rebooted = True

    def _reboot_failed(self, command: list[str], err: Exception, *, armed: bool) -> None:
        # The update is fine; only the reboot did not happen: say so and wait for one.
        log.error("%s failed: %s; reboot required", shlex.join(command), err)
        if armed:
            self.record.reboot_issued = False
            self.store.save(self.record)

    # -- status ----------------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        r = self.record
        info: dict[str, object] = {"state": str(r.state)}
        try:
            info["booted"] = self.booted()
        except UpdaterError as err:
            info["booted"] = None
            info["booted_error"] = err.desc
        try:
            info["primary"] = self.bootloader.primary_slot()
            info["trial"] = self.bootloader.is_trial()
        except UpdaterError as err:
            info["primary"] = None
            info["bootloader_error"] = err.desc
        info["bootloader"] = self.config.bootloader.type
        if r.state != State.IDLE:
            info["update"] = {
                "task_id": r.task_id,
                "version": r.version,
                "slot": r.slot,
                "from_slot": r.from_slot,
                "reboot_required": r.reboot_required,
                "reason": r.reason,
            }
        info["versions"] = self.versions()
        info["last_result"] = r.last_result or None
        info["failed_trials"] = r.failed_trials
        return info


#: What systemd sends a service's processes when it stops them (KillSignal=, then SIGKILL).
SHUTDOWN_SIGNALS = frozenset({signal.SIGTERM, signal.SIGKILL})


def system_stopping() -> bool:
    """systemd says the system is going down (``systemctl is-system-running``: stopping).

    Not :func:`updater.health._run` (a fixed PATH): this asks the same ``systemctl`` the reboot
    command just ran, found the same way."""
    try:
        result = subprocess.run(
            ["systemctl", "is-system-running"],
            capture_output=True,
            text=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return result.stdout.strip() == "stopping"


def reboot_command(config: Config, argument: str | None) -> list[str]:
    """The configured reboot command with the bootloader's reboot argument, if any.

    ``{reboot_arg}`` in the command is replaced by the argument (or dropped); without it the
    argument is appended only to ``systemctl reboot``, which passes it to the kernel. Other
    commands (``shutdown -r``, a script) would take it for something else: see
    :func:`can_pass_reboot_argument`.
    """
    words = list(config.reboot.command)
    if any("{reboot_arg}" in w for w in words):
        return [w.replace("{reboot_arg}", argument or "") for w in words if w or argument]
    if argument and can_pass_reboot_argument(config):
        return [*words, argument]
    return words


def can_pass_reboot_argument(config: Config) -> bool:
    words = config.reboot.command
    if any("{reboot_arg}" in w for w in words):
        return True
    return Path(words[0]).name == "systemctl" and "reboot" in words[1:]
