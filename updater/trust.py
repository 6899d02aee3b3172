"""What a package must prove before a byte of it is written.

The platform's per-file ``sign`` is a checksum anyone who can publish a task can compute, so a
device installs only what its vendor signed (:mod:`updater.manifest`). For a new task, in this
order, each refusal a :class:`~updater.errors.ManifestError` (step -3) unless said otherwise:

1. every file URL's host is one ``security.allowed_hosts`` admits (when the list is set);
2. ``digestsign`` verifies with the product's RSA key, when ``security.digestsign_key`` is set
   (then a task without it is refused);
3. the task's ``manifest.json`` is fetched into memory (at most
   :data:`~updater.manifest.MAX_ENVELOPE_BYTES`, the size checked before the request; a failed
   fetch is a download error, step -2), its protocol digest checked, its DSSE signature verified
   against the keyring, its board list checked against this board, and every file of the task
   matched against it (name, size, SHA-256); a task without a manifest is refused unless
   ``security.allow_unsigned`` says otherwise.

The verified envelope is kept in the update's state, so a restart (or a reboot in the middle of a
download) verifies it again offline instead of fetching it again: a presigned URL may have
expired by then. Each file's SHA-256 is then checked while it streams (:mod:`updater.install`),
and the version policy at plan time (:mod:`updater.versions`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from updater.config import Config, host_allowed
from updater.errors import DownloadError, ManifestError
from updater.fetch import Transfer
from updater.keyring import MAX_KEY_FILE_BYTES, Keyring, read_trusted_file
from updater.manifest import (
    MANIFEST_NAME,
    MAX_ENVELOPE_BYTES,
    Manifest,
    check_board,
    check_task_against_manifest,
    verify_digestsign,
    verify_envelope,
)
from updater.stream import new_hasher
from updater.task import FileSpec, Task

log = logging.getLogger("updater.trust")


@dataclass(frozen=True, slots=True)
class Trusted:
    """The outcome of the checks: the verified manifest and its envelope as received, or
    neither for an unsigned package the configuration allows."""

    manifest: Manifest | None = None
    envelope: str | None = None


UNSIGNED: Final = Trusted()


def manifest_spec(task: Task) -> FileSpec | None:
    """The task's entry for the manifest, if it has one."""
    return next((f for f in task.files if f.name == MANIFEST_NAME), None)


def check_task(
    task: Task,
    config: Config,
    *,
    envelope: str | None = None,
    sleep: Callable[[float], None] | None = None,
) -> Trusted:
    """Every check of a task's authenticity that can be made before the download.

    ``envelope`` is a manifest envelope verified earlier for this same task (kept in the
    state): it is verified again, not fetched again.
    """
    check_hosts(task, config)
    check_digestsign(task, config)
    spec = manifest_spec(task)
    if spec is None:
        if not config.security.allow_unsigned:
            raise ManifestError(
                f"the package is not signed (the task has no {MANIFEST_NAME}); this device "
                f"installs only signed packages (security.allow_unsigned is off in {config.path})"
            )
        log.warning("task %s is not signed: installing it (security.allow_unsigned)", task.task_id)
        return UNSIGNED
    raw = (
        envelope.encode("utf-8")
        if envelope is not None
        else fetch_manifest(spec, task, config, sleep)
    )
    return Trusted(verify(raw, task, config), raw.decode("utf-8"))


def verify(envelope: bytes, task: Task, config: Config) -> Manifest:
    """The manifest's signature, board and files, checked against this device and ``task``."""
    keyring = Keyring.load(Path(config.security.keyring))
    manifest = verify_envelope(envelope, keyring)
    check_board(manifest, Path(config.system.model))
    check_task_against_manifest(task, manifest)
    return manifest


def fetch_manifest(
    spec: FileSpec, task: Task, config: Config, sleep: Callable[[float], None] | None = None
) -> bytes:
    """The manifest's bytes, fetched into memory like any file (TLS pinned, resumed, retried),
    and checked against the task's digest of it."""
    if spec.size > MAX_ENVELOPE_BYTES:
        raise ManifestError(
            f"the task says the manifest is {spec.size} bytes, more than {MAX_ENVELOPE_BYTES}",
            file_name=spec.name,
        )
    receiver = _Memory(spec.size, spec.name)
    transfer = Transfer(
        spec.url,
        spec.size,
        config.download,
        file_name=spec.name,
        host_allowed=lambda host: host_allowed(config, host),
        sleep=sleep or time.sleep,
    )
    transfer.run(receiver)
    data = bytes(receiver.data)
    hasher = new_hasher(task.digest_method)
    hasher.update(data)
    if hasher.hexdigest() != spec.digest:
        raise ManifestError(
            f"{task.digest_method} digest mismatch: got {hasher.hexdigest()}, the task says "
            f"{spec.digest}",
            file_name=spec.name,
        )
    return data


class _Memory:
    """A :class:`~updater.fetch.Receiver` for a small file: bytes kept in memory."""

    def __init__(self, size: int, file_name: str) -> None:
        self.size = size
        self.file_name = file_name
        self.data = bytearray()
        self.offset = 0

    def write(self, data: bytes) -> None:
        if self.offset + len(data) > self.size:
            raise DownloadError(
                f"the server sent more than the {self.size} bytes the task declares",
                offset=self.offset,
                file_name=self.file_name,
            )
        self.data += data
        self.offset += len(data)

    def checkpoint(self) -> int:
        return self.offset

    def restart(self) -> None:
        self.data.clear()
        self.offset = 0


def check_hosts(task: Task, config: Config) -> None:
    """Every file is fetched from a host the configuration admits (any, when it lists none)."""
    for spec in task.files:
        host = urlsplit(spec.url).hostname or ""
        if not host_allowed(config, host):
            raise ManifestError(
                f"host {host!r} is not in security.allowed_hosts of {config.path}",
                file_name=spec.name,
            )


def check_digestsign(task: Task, config: Config) -> None:
    """The platform's "secure OTA" signature, required once the product's key is configured.

    It covers the raw bytes of ``sign``: of the one file of a single-file task, of the first
    file's ``fileSign`` in a multi-file task (the bundle tool puts the manifest first, so the
    signature covers the manifest, which covers every file).
    """
    key_path = config.security.digestsign_key
    if key_path is None:
        if task.digestsign is not None:
            log.debug("task %s: digestsign ignored (no security.digestsign_key)", task.task_id)
        return
    if task.digestsign is None:
        raise ManifestError(
            f"the task has no digestsign, and security.digestsign_key in {config.path} requires one"
        )
    pem = read_trusted_file(key_path, MAX_KEY_FILE_BYTES, "security.digestsign_key")
    verify_digestsign(task.files[0].digest, task.digestsign, pem)
