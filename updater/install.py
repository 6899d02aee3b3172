"""The install engine: carries out an InstallPlan, resumably.

Order of work, each step recorded in the journal before its side effect:

1. stream every file into its sink (the inactive slot's part, a staging file beside a file
   target, or a hook program's stdin), hashing on the fly, then verify the digest;
2. clone the slot parts the package does not bring from the booted slot;
3. apply: rename staged files over their destinations (the old content is kept until commit),
   then run the post-install hooks. A failure here puts the old files back.

Nothing the running system uses changes before step 3, so a failure in steps 1-2 leaves the
device as it was. A killed process picks up from the journal: verified files are not fetched
again, a partly written file re-hashes its durable prefix from the target and continues.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from updater.config import Config, host_allowed
from updater.decode import DecodedStream, ResumePoint, make_decoder
from updater.errors import Cancelled, UpdaterError, VerificationError, WriteError
from updater.fetch import FetchStats, RetryPolicy, Transfer, Validator
from updater.hooks import HookContext, HookStage, run_hook
from updater.journal import Journal, StateLock
from updater.plan import CloneItem, FileItem, InstallPlan
from updater.progress import Progress
from updater.sinks import (
    FileSink,
    HookSink,
    PartitionSink,
    Sink,
    apply_file,
    discard_staging,
    kept_path,
    restore_file,
    staging_path,
)
from updater.stream import FileStream

log = logging.getLogger("updater.install")

JOURNAL_VERSION = 1
#: Journal states in which every file of the task is verified on its target.
DOWNLOADED = ("downloaded", "applying", "installed", "committed")


@dataclass(slots=True)
class InstallResult:
    task_id: str
    slot: str | None
    already_installed: bool = False
    stats: dict[str, FetchStats] = field(default_factory=dict)

    @property
    def bytes_received(self) -> int:
        return sum(s.bytes_received for s in self.stats.values())


class Installer:
    """Runs one plan. ``sleep`` is injectable so tests need not wait for back-off."""

    def __init__(
        self,
        plan: InstallPlan,
        config: Config,
        progress: Progress,
        *,
        journal: Journal | None = None,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.plan = plan
        self.cancel = cancel
        if cancel is not None and sleep is None:
            sleep = cancellable_sleep(cancel)  # a back-off must not outlast a replacement
        self.config = config
        self.progress = progress
        self.journal = journal or Journal.open(Path(config.state_dir))
        self.policy = policy or RetryPolicy.from_config(config.download)
        self.sleep = sleep
        self.result = InstallResult(plan.task.task_id, plan.slot)

    # -- the whole run -------------------------------------------------------------------------

    def run(self) -> InstallResult:
        """Download and apply, holding the state lock (the engine on its own, without the boot
        flow: see :mod:`updater.flow` for the whole update)."""
        with StateLock(Path(self.config.state_dir)):
            self.journal.reload()
            self.download()
            self.apply()
            return self.result

    def download(self) -> InstallResult:
        """Stream and verify every file, clone the parts the package does not bring.

        Progress reaches 100 here: every file is verified. The caller holds the state lock.
        """
        task = self.plan.task
        if self._same_task() and self.journal.data.get("state") in DOWNLOADED:
            log.info("task %s: every file is already verified", task.task_id)
            self.result.already_installed = True
            self.progress.start()
            self.progress.set_done(self.plan.total_bytes)
            self.progress.done()
            return self.result
        if self._same_task():
            self._finish_restores()
        else:
            self._fresh_journal()
        self.progress.start()
        self._guard(self._download)
        self._set_state("downloaded")
        self.progress.done()
        log.info(
            "task %s: %d bytes received for %d bytes of files",
            task.task_id,
            self.result.bytes_received,
            self.plan.total_bytes,
        )
        return self.result

    def apply(self) -> None:
        """Rename staged files into place and run the post-install hooks (idempotent)."""
        if self.journal.data.get("state") == "installed":
            return
        self._guard(self._apply)
        self._set_state("installed")

    def _download(self) -> None:
        for item in self.plan.items:
            self._install_file(item)
        for clone in self.plan.clones:
            self._clone(clone)

    def _guard(self, work: Callable[[], None]) -> None:
        """Run ``work``; any failure is recorded (journal, progress) before it propagates."""
        try:
            work()
        except UpdaterError as err:
            self._fail(err)
            raise
        except Exception as err:  # a bug or an unforeseen OSError: still a reported failure
            wrapped = UpdaterError(f"unexpected error: {err!r}")
            self._fail(wrapped)
            raise wrapped from err

    def _same_task(self) -> bool:
        data = self.journal.data
        return (
            data.get("journal") == JOURNAL_VERSION
            and data.get("task_id") == self.plan.task.task_id
            and data.get("slot") == self.plan.slot
        )

    def _fresh_journal(self) -> None:
        """A new task: whatever an older one left on the inactive slot is garbage now.

        File targets an unfinished older task already renamed into place are put back first
        (anything not known to be installed is rolled back).
        """
        if self.journal.data.get("state") not in ("installed", "committed"):
            self._undo_files(lambda record: bool(record.get("applied") or record.get("restoring")))
        for item in self.plan.items:
            if item.dest is not None:
                discard_staging(item.dest)
        self.journal.reset(
            {
                "journal": JOURNAL_VERSION,
                "task_id": self.plan.task.task_id,
                "version": self.plan.task.version,
                "slot": self.plan.slot,
                "state": "download",
                "files": {},
            }
        )

    def _set_state(self, state: str, **extra: object) -> None:
        self.journal.data["state"] = state
        self.journal.data.update(extra)
        self.journal.save()

    def _fail(self, err: UpdaterError) -> None:
        self.progress.failed(err.step, err.desc, err.file_name)
        try:
            self._set_state(
                "failed", error={"step": err.step, "desc": err.desc, "file": err.file_name}
            )
        except UpdaterError:
            log.exception("cannot record the failure in the journal")

    # -- step 1: stream and verify -------------------------------------------------------------

    def _context(self, item: FileItem, stage: HookStage) -> HookContext:
        return HookContext(
            task_id=self.plan.task.task_id,
            version=self.plan.task.version,
            file_name=item.spec.name,
            target=item.target.name,
            target_kind=item.target.kind,
            device=item.device.path if item.device else str(item.dest or ""),
            device_offset=item.device.offset if item.device else 0,
            slot=(self.plan.slot or "") if item.target.kind == "slot" else "",
            stage=stage,
            extra={"device_size": str(item.device.size)} if item.device else {},
        )

    def _clone_context(self, clone: CloneItem) -> HookContext:
        """A cloned part's post-install hook: no file (``RPI_UPDATER_FILE`` empty), the copy
        as the device, and where it was copied from."""
        assert clone.target is not None
        return HookContext(
            task_id=self.plan.task.task_id,
            version=self.plan.task.version,
            file_name="",
            target=clone.target.name,
            target_kind="slot",
            device=clone.dest.path,
            device_offset=clone.dest.offset,
            slot=self.plan.slot or "",
            stage="post-install",
            extra={
                "device_size": str(clone.dest.size),
                "cloned_from": clone.source.path,
                "cloned_from_offset": str(clone.source.offset),
            },
        )

    def _install_file(self, item: FileItem) -> None:
        spec = item.spec
        record = self.journal.file(spec.name)
        self.progress.begin_file(spec.name)
        if record.get("verified") and not self._staging_lost(item, record):
            log.info("%s: verified earlier, not fetched again", spec.name)
            self.progress.advance(spec.size)
            return
        if record.get("verified"):
            log.warning("%s: the verified staging file is gone; fetching it again", spec.name)
            self.journal.update_file(spec.name, verified=False, durable=0)
            record = self.journal.file(spec.name)
        if item.target.pre_install:
            run_hook(
                item.target.pre_install,
                self._context(item, "pre-install"),
                timeout=self.config.hooks.timeout,
            )
        sink = self._open_sink(item, record)
        stream, receiver = self._streams(item, sink)
        try:
            resumed = self._resume(item, stream, receiver, record)
            transfer = Transfer(
                spec.url,
                spec.size,
                self.config.download,
                file_name=spec.name,
                policy=self.policy,
                validator=Validator(record.get("etag"), record.get("last_modified"))
                if resumed
                else None,
                on_validator=lambda v: self.journal.update_file(
                    spec.name, etag=v.etag, last_modified=v.last_modified
                ),
                sleep=self.sleep or time.sleep,
                host_allowed=lambda host: host_allowed(self.config, host),
            )
            self.result.stats[spec.name] = transfer.run(receiver)
            image_sha256: str | None
            if isinstance(receiver, DecodedStream):
                digest, image_sha256 = receiver.finish()
            else:
                stream.finish()
                digests = stream.digests()
                digest, image_sha256 = digests[stream.digest_method], digests.get("sha256")
            mismatch = _mismatch(item, self.plan.task.digest_method, digest, image_sha256)
            if mismatch:
                raise VerificationError(mismatch, file_name=spec.name)
            if isinstance(sink, HookSink):
                sink.finish()
        except VerificationError:
            # The bytes on the target are wrong: never resumed from, never armed. The threads
            # stop first, so that no sync in flight records a resume point after the reset.
            stream.close()
            self._forget_progress(spec.name)
            sink.close()
            if item.dest is not None:
                discard_staging(item.dest)
            raise
        except BaseException:
            # Keep what arrived (a 403 or Ctrl-C halfway): the next run starts from there.
            if sink.resumable:
                with contextlib.suppress(Exception):
                    receiver.checkpoint()
            raise
        finally:
            stream.close()
            sink.close()
        self.journal.update_file(spec.name, verified=True, durable=item.size, digest=digest)
        self.progress.file_verified(spec.name)

    def _streams(self, item: FileItem, sink: Sink) -> tuple[FileStream, FileStream | DecodedStream]:
        """The stream writing the target, and what receives the transfer: the same stream, or
        a decoder in front of it for a compressed file."""
        name, dl = item.spec.name, self.config.download
        if item.encoding is None:
            stream = FileStream(
                sink,
                size=item.size,
                digest_method=self.plan.task.digest_method,
                buffer_size=dl.buffer_size,
                fsync_interval=dl.fsync_interval,
                file_name=name,
                on_durable=lambda n: self.journal.update_file(name, durable=n),
                on_bytes=self._on_bytes,
                extra_digests=("sha256",) if item.sha256 else (),
            )
            return stream, stream
        decoded: DecodedStream | None = None

        def durable(n: int) -> None:
            if decoded is not None:
                decoded.image_durable(n)

        stream = FileStream(
            sink,
            size=item.size,
            digest_method="sha256",  # the image's, which the manifest gives
            buffer_size=dl.buffer_size,
            fsync_interval=dl.fsync_interval,
            file_name=name,
            on_durable=durable,
            on_bytes=lambda n: None,  # progress counts the bytes transferred
        )
        decoded = DecodedStream(
            stream,
            make_decoder(item.encoding, name),
            digest_method=self.plan.task.digest_method,
            file_name=name,
            on_bytes=self._on_bytes,
            on_resume_point=lambda p: self.journal.update_file(
                name,
                durable=p.image_offset,
                encoded_offset=p.offset or None,
                transfer_state=p.transfer_state or None,
            ),
        )
        return stream, decoded

    def _resume(
        self,
        item: FileItem,
        stream: FileStream,
        receiver: FileStream | DecodedStream,
        record: dict[str, Any],
    ) -> bool:
        """Continue from what the journal says is durable; whether anything was kept."""
        name = item.spec.name
        durable = int(record.get("durable", 0)) if stream.sink.resumable else 0
        if not durable:
            return False
        if isinstance(receiver, DecodedStream):
            offset, state = record.get("encoded_offset"), record.get("transfer_state")
            if not isinstance(offset, int) or not isinstance(state, str):
                self._forget_progress(name)
                return False
            receiver.resume_from(ResumePoint(offset, durable, state))
            if not receiver.offset:  # unusable: the file starts over, and the journal says so
                self._forget_progress(name)
            else:
                log.info(
                    "%s: resuming at byte %d of %d (image byte %d of %d)",
                    name,
                    receiver.offset,
                    item.spec.size,
                    durable,
                    item.size,
                )
            return receiver.offset > 0
        stream.resume_from(durable)
        log.info("%s: resuming at byte %d of %d", name, durable, item.spec.size)
        return True

    def _forget_progress(self, name: str) -> None:
        """Nothing of this file may be resumed from (wrong bytes, or an unusable resume point)."""
        self.journal.update_file(name, durable=0, encoded_offset=None, transfer_state=None)

    def _on_bytes(self, n: int) -> None:
        """Progress, and the place where a cancellation stops the transfer (the download
        thread, inside libcurl's callback: the exception ends the transfer cleanly)."""
        self.progress.advance(n)
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("a newer task replaces this one")

    def _staging_lost(self, item: FileItem, record: dict[str, Any]) -> bool:
        """A verified file target whose staged content is neither staged nor applied."""
        if item.dest is None:
            return False
        return not staging_path(item.dest).exists() and not _applied(item.dest, record)

    def _open_sink(self, item: FileItem, record: dict[str, Any]) -> Sink:
        spec, target = item.spec, item.target
        if item.device is not None:
            return PartitionSink(item.device, file_name=spec.name, target=target.name)
        if item.dest is not None:
            durable = int(record.get("durable", 0))
            if durable:
                try:
                    return FileSink(
                        item.dest, file_name=spec.name, target=target.name, keep=durable
                    )
                except WriteError as err:
                    log.warning("%s: %s; starting over", spec.name, err.message)
                    self.journal.update_file(spec.name, durable=0)
                    record["durable"] = 0
            return FileSink(item.dest, file_name=spec.name, target=target.name, keep=0)
        assert item.program is not None
        return HookSink(
            item.program,
            self._context(item, "install"),
            timeout=self.config.hooks.timeout,
            file_name=spec.name,
            target=target.name,
        )

    # -- step 2: clone the parts the package does not bring ------------------------------------

    def _clone(self, clone: CloneItem) -> None:
        clones: dict[str, str] = self.journal.data.setdefault("clones", {})
        if clones.get(clone.part) == "done":
            return
        what = f"clone of part {clone.part}"
        log.info("%s: %s -> %s", what, clone.source.describe(), clone.dest.describe())
        dl = self.config.download
        with contextlib.ExitStack() as stack:
            src = PartitionSink(clone.source, file_name=what, target=clone.part, read_only=True)
            stack.callback(src.close)
            dst = PartitionSink(clone.dest, file_name=what, target=clone.part)
            stack.callback(dst.close)
            offset = unsynced = 0
            while offset < clone.source.size:
                data = src.read_at(offset, min(dl.buffer_size, clone.source.size - offset))
                if not data:
                    raise WriteError(f"{clone.source.describe()} ended early", file_name=what)
                dst.write_at(offset, memoryview(data))
                offset += len(data)
                unsynced += len(data)
                if unsynced >= dl.fsync_interval:  # never minutes of dirty pages
                    dst.sync()
                    unsynced = 0
            dst.sync()
        clones[clone.part] = "done"
        self.journal.save()

    # -- step 3: apply -------------------------------------------------------------------------

    def _apply(self) -> None:
        self._set_state("applying")
        try:
            for item in self.plan.items:
                if item.dest is not None:
                    self._apply_file(item)
            for item in self.plan.items:
                if item.target.post_install:
                    run_hook(
                        item.target.post_install,
                        self._context(item, "post-install"),
                        timeout=self.config.hooks.timeout,
                    )
            for clone in self.plan.clones:
                if clone.target is not None and clone.target.post_install:
                    run_hook(
                        clone.target.post_install,
                        self._clone_context(clone),
                        timeout=self.config.hooks.timeout,
                    )
        except Exception:
            # A failure puts the old files back; an interruption (SIGTERM, Ctrl-C) does not:
            # the next run continues applying where this one stopped.
            names = {item.spec.name for item in self.plan.items if item.dest is not None}
            self._undo_files(lambda record: record.get("name") in names and _was_applied(record))
            if self.journal.data.get("clones"):
                # A retry copies them again: a post-install hook may have changed the copy, or
                # refused it (a busy root copied while mounted), and a second copy may pass.
                self.journal.data["clones"] = {}
                self.journal.save()
            raise

    def _apply_file(self, item: FileItem) -> None:
        """Rename one staged file over its destination (idempotent across a restart).

        The journal says ``had_old`` before the rename and ``applied`` after it; a crash between
        the two is recognised because only the rename makes the staging file disappear.
        """
        assert item.dest is not None
        name = item.spec.name
        record = self.journal.file(name)
        if _applied(item.dest, record):
            if not record.get("applied"):
                self.journal.update_file(name, applied=True)
            return
        had_old = os.path.lexists(item.dest)
        self.journal.update_file(name, dest=str(item.dest), had_old=had_old)
        apply_file(item.dest)
        self.journal.update_file(name, applied=True)
        log.info("%s: installed %s", name, item.dest)

    def _undo_files(self, which: Callable[[dict[str, Any]], bool]) -> None:
        undo_files(self.journal, which)

    def _finish_restores(self) -> None:
        self._undo_files(lambda record: bool(record.get("restoring")))


def cancellable_sleep(cancel: threading.Event) -> Callable[[float], None]:
    """A sleep for retry back-offs that ends with :class:`Cancelled` once ``cancel`` is set
    (a newer task replaces this one)."""

    def sleep(seconds: float) -> None:
        if cancel.wait(seconds):
            raise Cancelled("a newer task replaces this one")

    return sleep


def _mismatch(item: FileItem, method: str, digest: str, image_sha256: str | None) -> str | None:
    """Why the bytes are not the promised ones (the task's digest of what was transferred,
    then the signed manifest's SHA-256 of what landed), or None."""
    if digest != item.spec.digest:
        return f"{method} digest mismatch: got {digest}, the task says {item.spec.digest}"
    if item.sha256 is not None and image_sha256 != item.sha256:
        return f"sha256 digest mismatch: got {image_sha256}, the signed manifest says {item.sha256}"
    return None


def _applied(dest: Path, record: dict[str, Any]) -> bool:
    """Whether the staged file of ``dest`` was renamed over it (see :meth:`_apply_file`)."""
    if record.get("restoring"):
        return False
    if record.get("applied"):
        return True
    return record.get("had_old") is not None and not staging_path(dest).exists()


def _was_applied(record: dict[str, Any]) -> bool:
    dest = record.get("dest")
    if not dest:
        return False
    return bool(record.get("restoring")) or _applied(Path(dest), record)


# -- file targets after the reboot: rollback and commit ----------------------------------------


def undo_files(journal: Journal, which: Callable[[dict[str, Any]], bool]) -> None:
    """Put back the old content of applied file targets; the new content is fetched again.

    Each file is marked ``restoring`` before its old content goes back, so a crash in the
    middle is finished by the next run. Every file is tried even when one fails; the first
    failure is raised at the end.
    """
    files: dict[str, dict[str, Any]] = journal.data.get("files", {})
    first: UpdaterError | None = None
    for name, record in reversed(list(files.items())):
        if not which({**record, "name": name}) or not record.get("dest"):
            continue
        try:
            journal.update_file(name, restoring=True)
            restore_file(Path(record["dest"]), had_old=bool(record.get("had_old")))
            journal.update_file(
                name,
                verified=False,
                durable=0,
                applied=False,
                had_old=None,
                restoring=False,
                digest=None,
            )
            log.info("%s: restored the previous %s", name, record["dest"])
        except UpdaterError as err:
            log.error("%s: cannot restore %s: %s", name, record["dest"], err.message)
            first = first or err
    if first is not None:
        raise first


def undo_file_targets(journal: Journal) -> None:
    """Put back every file target the journal's task applied (a rollback after the reboot).

    The journal then no longer counts as downloaded: a retry of the same task fetches the files
    whose new content went with the rollback, and applies them again.
    """
    undo_files(journal, _was_applied)
    if journal.data.get("state") in DOWNLOADED:
        journal.data["state"] = "rolled-back"
        journal.save()


def commit_file_targets(journal: Journal) -> None:
    """The update is kept: the old content of its file targets is no longer needed."""
    files: dict[str, dict[str, Any]] = journal.data.get("files", {})
    for name, record in files.items():
        dest = record.get("dest")
        if dest and record.get("applied"):
            with contextlib.suppress(FileNotFoundError):
                kept_path(Path(dest)).unlink()
            journal.update_file(name, committed=True)
    journal.data["state"] = "committed"
    journal.save()
