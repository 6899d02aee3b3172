"""The vendor's side of signed updates: key pairs and signed packages.

``rpi-updater keygen`` makes the Ed25519 key pair a vendor signs with (the ``.pub`` goes into
every device's keyring). ``rpi-updater bundle`` turns the files of an update into a package
directory ready to upload: the files themselves, ``manifest.json`` (the signed DSSE envelope of
:mod:`updater.manifest`) and ``task.json``, an IoT Platform multi-file push whose first file is
the manifest, so that a device can fetch and verify it before any payload.

The bundle tool checks its own output the way a device will (:func:`~updater.task.parse_task`
on the task, :func:`~updater.manifest.verify_envelope` with the signing key's public key), so a
package it writes is one the updater accepts. Files are written under a temporary name and
renamed, so an interrupted run never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, Final
from urllib.parse import quote, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from updater.encode import Compression
from updater.errors import InvalidInput, ManifestError, TaskError
from updater.keyring import MAX_KEY_FILE_BYTES, Keyring, generate_key, key_id, load_private_key
from updater.manifest import (
    MANIFEST_NAME,
    MAX_FILE_SIZE,
    Manifest,
    ManifestFile,
    check_task_against_manifest,
    manifest_to_json,
    parse_manifest,
    sign_manifest,
    verify_envelope,
)
from updater.task import MAX_FILES, DigestMethod, Task, parse_task

TASK_NAME: Final = "task.json"
DEFAULT_KEY_NAME: Final = "signing"
SIGN_METHODS: Final[dict[str, DigestMethod]] = {"SHA256": "sha256", "MD5": "md5"}
_METHOD_NAMES: Final[dict[DigestMethod, str]] = {v: k for k, v in SIGN_METHODS.items()}
_KEY_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CHUNK: Final = 1 << 20
_PLACEHOLDER_SHA256: Final = "0" * 64
DEFAULT_MAX_FILE_SIZE: Final = 1000 << 20  # the IoT Platform's limit for one file of a package
NO_COMPRESSION: Final = Compression(encoding=None)


class BundleError(InvalidInput):
    """The bundle tool's inputs are unusable, or its output could not be written (exit 2)."""


@dataclass(frozen=True, slots=True)
class PayloadFile:
    """One file of a package as given on the command line: ``path=target=version``."""

    path: Path
    target: str
    version: str

    @property
    def name(self) -> str:
        """The name in the package (and the task): the path's last component."""
        return self.path.name


@dataclass(frozen=True, slots=True)
class BundleResult:
    """What ``bundle`` wrote, as the device will read it."""

    directory: Path
    manifest: Manifest
    task: Task
    key_id: str

    def describe(self) -> str:
        files = ", ".join(f"{f.name} ({f.target} {f.version})" for f in self.manifest.files)
        return (
            f"package {self.manifest.version} in {self.directory}: {files}; "
            f"{MANIFEST_NAME} signed by key {self.key_id}; publish {TASK_NAME}"
        )


# --- keygen --------------------------------------------------------------------------------------


def write_key_pair(out_dir: Path, name: str = DEFAULT_KEY_NAME) -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (mode 0600) and ``NAME.pub`` into ``out_dir``; return both and the id.

    Existing files are never overwritten: losing a signing key is worse than a second run.
    """
    if not _KEY_NAME_RE.fullmatch(name):
        raise BundleError(f"key name {name!r} must match [A-Za-z0-9][A-Za-z0-9._-]* (<= 64)")
    private_pem, public_pem = generate_key()
    key_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (key_path, pub_path):
        if path.exists() or path.is_symlink():
            raise BundleError(f"{path} already exists; not overwriting a key")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_new(key_path, private_pem, 0o600)
        try:
            _write_new(pub_path, public_pem, 0o644)
        except BaseException:
            key_path.unlink()
            raise
    except OSError as err:
        raise BundleError(f"cannot write the key pair in {out_dir}: {err}") from err
    return key_path, pub_path, key_id(load_private_key(private_pem).public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` exclusively with ``mode`` (set before any byte is in it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)  # whatever the umask
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_key_file(path: Path) -> bytes:
    """A private key file, bounded (a key is a few hundred bytes)."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE_BYTES + 1)
    except OSError as err:
        raise BundleError(f"cannot read the key {path}: {err.strerror or err}") from err
    if len(data) > MAX_KEY_FILE_BYTES:
        raise BundleError(f"{path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key")
    return data


# --- arguments -----------------------------------------------------------------------------------


def parse_file_argument(text: str) -> PayloadFile:
    """``path=target=version``; split from the right, so a path may contain '='."""
    parts = text.rsplit("=", 2)
    if len(parts) != 3 or not all(parts):
        raise BundleError(f"{text!r}: expected PATH=TARGET=VERSION")
    path, target, version = parts
    return PayloadFile(Path(path), target, version)


def parse_sign_method(text: str) -> DigestMethod:
    """``SHA256`` or ``MD5`` (any case): the task's per-file digest."""
    method = SIGN_METHODS.get(text.upper())
    if method is None:
        raise BundleError(f"sign method {text!r}: expected SHA256 or MD5")
    return method


def parse_compression(text: str, level: int | None, frame_size: int) -> Compression:
    """``--compress``, ``--level`` and ``--frame-size`` as one value; ``none`` stores as is."""
    encoding = None if text.lower() == "none" else text.lower()
    try:
        return Compression(encoding, level, frame_size)
    except ValueError as err:
        raise BundleError(str(err)) from err


def check_base_url(base_url: str) -> str:
    """An https URL with a host and no query or fragment; returned without a trailing '/'."""
    try:
        parts = urlsplit(base_url)
        host = parts.hostname
        _ = parts.port
    except ValueError as err:
        raise BundleError(f"base URL {base_url!r} is not a valid URL: {err}") from err
    if parts.scheme.lower() != "https":
        raise BundleError(f"base URL {base_url!r} must be https:// (devices refuse anything else)")
    if not host:
        raise BundleError(f"base URL {base_url!r} has no host")
    if parts.query or parts.fragment:
        raise BundleError(f"base URL {base_url!r} must not have a query or a fragment")
    return base_url.rstrip("/")


# --- bundle --------------------------------------------------------------------------------------


def build_bundle(
    files: Sequence[PayloadFile],
    *,
    private_pem: bytes,
    out_dir: Path,
    version: str,
    boards: Sequence[str],
    base_url: str,
    sign_method: DigestMethod = "sha256",
    created: datetime | None = None,
    allow_downgrade: bool = False,
    compression: Compression = NO_COMPRESSION,
    max_file_size: int = DEFAULT_MAX_FILE_SIZE,
) -> BundleResult:
    """Copy ``files`` into ``out_dir``, sign their manifest and write the task to publish.

    Everything that can be checked without reading the files is checked first: the base URL,
    names, the package version against the files' versions, the key, and the manifest fields.
    """
    base = check_base_url(base_url)
    _check_files(files, version)
    key = _signing_key(private_pem)
    when = created or datetime.now(UTC).replace(microsecond=0)
    _dry_run_manifest(files, version, boards, when)
    for spec in files:
        _check_source(spec.path, os.stat)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = [
            _copy_file(spec, out_dir, sign_method, compression, max_file_size) for spec in files
        ]
    except OSError as err:
        raise BundleError(f"cannot write the package in {out_dir}: {err}") from err
    manifest = Manifest(
        version=version,
        boards=tuple(boards),
        files=tuple(e[0] for e in entries),
        created=when,
        allow_downgrade=allow_downgrade,
    )
    envelope = sign_manifest(manifest_to_json(manifest), private_pem)
    manifest_digest = _digests(envelope)[sign_method]
    task_doc = _task_document(manifest, base, sign_method, envelope, manifest_digest, entries)
    task = _self_check(task_doc, envelope, private_pem)
    try:
        _write_replacing(out_dir / MANIFEST_NAME, envelope)
        _write_replacing(out_dir / TASK_NAME, (json.dumps(task_doc, indent=1) + "\n").encode())
    except OSError as err:
        raise BundleError(f"cannot write the package in {out_dir}: {err}") from err
    return BundleResult(out_dir, manifest, task, key_id(key.public_key()))


def _check_files(files: Sequence[PayloadFile], version: str) -> None:
    """Names unique and not reserved; the package version the concatenation of the files'."""
    if not files:
        raise BundleError("a package needs at least one file")
    if len(files) > MAX_FILES - 1:
        raise BundleError(
            f"{len(files)} files: a task holds at most {MAX_FILES}, one of them the manifest"
        )
    seen: set[str] = set()
    for spec in files:
        if spec.name in (MANIFEST_NAME, TASK_NAME):
            raise BundleError(f"{spec.path}: the name {spec.name!r} is reserved for the package")
        if spec.name in seen:
            raise BundleError(f"{spec.path}: another file is already named {spec.name!r}")
        seen.add(spec.name)
    combined = "".join(spec.version for spec in files)
    if combined != version:
        parts = " + ".join(repr(spec.version) for spec in files)
        raise BundleError(
            f"the package version {version!r} is not the concatenation of the file versions "
            f"in the order given: {parts} = {combined!r}"
        )


def _signing_key(private_pem: bytes) -> ed25519.Ed25519PrivateKey:
    try:
        return load_private_key(private_pem, "signing key")
    except ManifestError as err:
        raise BundleError(err.message) from err


def _dry_run_manifest(
    files: Sequence[PayloadFile], version: str, boards: Sequence[str], created: datetime
) -> None:
    """Validate every manifest field before copying gigabytes: sizes and digests are stand-ins."""
    stand_in = Manifest(
        version=version,
        boards=tuple(boards),
        files=tuple(
            ManifestFile(f.name, 1, _PLACEHOLDER_SHA256, f.version, f.target) for f in files
        ),
        created=created,
    )
    try:
        parse_manifest(manifest_to_json(stand_in))
    except ManifestError as err:
        raise BundleError(f"the manifest would be refused: {err.message}") from err


def _copy_file(
    spec: PayloadFile,
    out_dir: Path,
    method: DigestMethod,
    compression: Compression,
    max_file_size: int,
) -> tuple[ManifestFile, int, str]:
    """Copy one file into the package, compressed when that makes it smaller, hashing both
    sides on the way: (manifest entry, size served, protocol digest of what is served)."""
    if compression.encoding is not None:
        entry, served = _write_file(spec, out_dir, compression)
        if entry.encoded_size is not None and entry.encoded_size < entry.size:
            _check_served_size(spec, entry.encoded_size, max_file_size, compressed=True)
            return entry, entry.encoded_size, served[method]
    entry, served = _write_file(spec, out_dir, None)
    _check_served_size(spec, entry.size, max_file_size, compressed=False)
    return entry, entry.size, served[method]


def _write_file(
    spec: PayloadFile, out_dir: Path, compression: Compression | None
) -> tuple[ManifestFile, dict[DigestMethod, str]]:
    """Write the file as served; its manifest entry and the digests of what is served."""
    encoder = compression.encoder() if compression is not None else None
    image = hashlib.sha256()
    served = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    size = served_size = 0

    def serve(data: bytes, dest: BinaryIO) -> int:
        for h in served.values():
            h.update(data)
        dest.write(data)
        return len(data)

    with spec.path.open("rb") as src:
        st = _check_source(spec.path, lambda _: os.fstat(src.fileno()))
        with _replacing(out_dir / spec.name) as dest:
            while chunk := src.read(_CHUNK):
                image.update(chunk)
                size += len(chunk)
                served_size += serve(encoder.compress(chunk) if encoder else chunk, dest)
            if encoder is not None:
                served_size += serve(encoder.flush(), dest)
    if size != st.st_size:
        raise BundleError(f"{spec.path} changed while it was copied")
    entry = ManifestFile(spec.name, size, image.hexdigest(), spec.version, spec.target)
    if compression is not None:
        entry = replace(
            entry,
            encoding=compression.encoding,
            encoded_size=served_size,
            encoded_sha256=served["sha256"].hexdigest(),
        )
    return entry, {"sha256": served["sha256"].hexdigest(), "md5": served["md5"].hexdigest()}


def _check_served_size(spec: PayloadFile, size: int, limit: int, *, compressed: bool) -> None:
    if size > limit:
        what = "compressed, " if compressed else ""
        raise BundleError(
            f"{spec.path}: {size} bytes ({what}as served) is more than the limit of {limit} "
            "(the IoT Platform takes at most 1000 MiB a file; --max-file-size)"
        )


def _check_source(path: Path, stat_of: Callable[[Path], os.stat_result]) -> os.stat_result:
    """A payload is a regular file of 1 byte to 64 GiB; checked before anything is written."""
    try:
        st = stat_of(path)
    except OSError as err:
        raise BundleError(f"cannot read {path}: {err.strerror or err}") from err
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path} is not a regular file")
    if not 1 <= st.st_size <= MAX_FILE_SIZE:
        raise BundleError(f"{path}: {st.st_size} bytes; a file needs 1..{MAX_FILE_SIZE}")
    return st


def _digests(data: bytes) -> dict[DigestMethod, str]:
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "md5": hashlib.md5(data, usedforsecurity=False).hexdigest(),
    }


def _task_document(
    manifest: Manifest,
    base: str,
    method: DigestMethod,
    envelope: bytes,
    manifest_digest: str,
    entries: list[tuple[ManifestFile, int, str]],
) -> dict[str, object]:
    """The push envelope as the platform sends it: the manifest first, then the payload."""
    files = [_task_file(MANIFEST_NAME, len(envelope), manifest_digest, base)]
    files += [_task_file(entry.name, size, digest, base) for entry, size, digest in entries]
    data = {
        "version": manifest.version,
        "signMethod": _METHOD_NAMES[method],
        "files": files,
        "extData": {"versions": {f.name: f.version for f in manifest.files}},
    }
    return {"code": "1000", "data": data, "id": int(time.time() * 1000), "message": "success"}


def _task_file(name: str, size: int, digest: str, base: str) -> dict[str, object]:
    return {
        "fileName": name,
        "fileSize": size,
        "fileUrl": f"{base}/{quote(name, safe='')}",
        "fileSign": digest,
    }


def _self_check(task_doc: dict[str, object], envelope: bytes, private_pem: bytes) -> Task:
    """Read the output as a device will; a package the updater would refuse is not written."""
    try:
        task = parse_task(task_doc)
    except TaskError as err:
        raise BundleError(f"the task would be refused: {err}") from err
    public_pem = _public_pem(load_private_key(private_pem))
    keyring = Keyring.from_public_keys([public_pem], source="the signing key")
    check_task_against_manifest(task, verify_envelope(envelope, keyring))
    return task


def _public_pem(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[BinaryIO]:
    """Write to a temporary file beside ``path``, renamed over it only when complete."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bundle-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def _write_replacing(path: Path, data: bytes) -> None:
    with _replacing(path) as f:
        f.write(data)
