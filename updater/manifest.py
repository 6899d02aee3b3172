"""Signed manifests: what the vendor promised, checked before a byte reaches a partition.

The platform's per-file ``sign`` is only a checksum: whoever can publish a task can compute it.
So a package carries one more small file, ``manifest.json``: a DSSE envelope
(https://github.com/secure-systems-lab/dsse, protocol v1) whose payload lists every file's name,
size, SHA-256, version and target, the package version and the compatible board models, signed
with Ed25519. A device trusts the public keys in a root-owned keyring directory (several, for
rotation; a ``revoked`` file lists key ids that must never be accepted again).

Order of use on a device (the install engine wires it in): :func:`verify_envelope` (signature,
then :func:`parse_manifest`), :func:`check_board`, :func:`check_task_against_manifest`; then each
file is hashed while it streams and compared with its manifest entry. :func:`verify_digestsign`
checks the platform's own "secure OTA" signature where a product uses it.

Left for later, on purpose: ``check_version_order`` (no downgrade unless the configuration or a
manifest's ``allow_downgrade`` permits it) needs the versions installed on the device, which
live in the journal; it belongs with the engine wiring, not here.

Every refusal is a :class:`ManifestError` (a VerificationError: step -3, exit 4) whose message
says what is wrong; no other exception escapes the parsers, whatever the input.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Final, NoReturn

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from updater.errors import ManifestError
from updater.keyring import (
    Keyring,
    _check_pem_size,
    _key_kind,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    public_key_id,
)
from updater.task import Task

__all__ = [  # the keyring's names are re-exported: callers see one module for signatures
    "Keyring",
    "ManifestError",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_id",
]

log = logging.getLogger("updater.manifest")

PAYLOAD_TYPE: Final = "application/vnd.rpi-ab-updater.manifest+json"
MANIFEST_NAME: Final = "manifest.json"
"""The manifest's own file name in a task; no file listed in a manifest may have it."""
SCHEMA: Final = 1
DEFAULT_MODEL_PATH: Final = Path("/proc/device-tree/model")

MAX_MANIFEST_BYTES: Final = 64 * 1024
MAX_ENVELOPE_BYTES: Final = 128 * 1024
MAX_DEPTH: Final = 8
MAX_FILES: Final = 20
MAX_FILE_SIZE: Final = 64 << 30
MAX_BOARDS: Final = 32
MAX_BOARD_CHARS: Final = 128
MAX_NAME_CHARS: Final = 255
MAX_VERSION_CHARS: Final = 64
MAX_TARGET_CHARS: Final = 64
MAX_CREATED_CHARS: Final = 64
MAX_SIGNATURES: Final = 16
MAX_KEYID_CHARS: Final = 256
MAX_SIG_CHARS: Final = 1024
MAX_MODEL_BYTES: Final = 4096
MIN_RSA_BITS: Final = 2048

_MANIFEST_KEYS: Final = ("schema", "version", "boards", "files", "created", "allow_downgrade")
_FILE_KEYS: Final = (
    "name",
    "size",
    "sha256",
    "version",
    "target",
    "encoding",
    "encoded_size",
    "encoded_sha256",
)
_ENCODED_KEYS: Final = ("encoding", "encoded_size", "encoded_sha256")
ENCODINGS: Final = ("zstd", "xz", "gzip")
"""How a file may travel compressed; the manifest declares it (a device never guesses)."""
_ENVELOPE_KEYS: Final = ("payloadType", "payload", "signatures")
_VERSION_RE: Final = re.compile(r"[\x21-\x7e]+")
_SHA256_RE: Final = re.compile(r"[0-9a-fA-F]{64}")
_HEX_RE: Final = re.compile(r"[0-9a-fA-F]+")
_TARGET_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]*")
_BASE64_RE: Final = re.compile(
    r"(?:[A-Za-z0-9+/_-]{4})*+(?:[A-Za-z0-9+/_-]{2}==|[A-Za-z0-9+/_-]{3}=)?"
)
# As in updater.task: outside strings only brackets and quotes matter for nesting.
_STRUCTURAL_RE: Final = re.compile(r'[\[\]{}"]')
_STRING_REST_RE: Final = re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)


# --- values --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file of a package; ``name`` is only ever matched, never used as a path.

    ``size`` and ``sha256`` are those of what lands on the target. A file that travels
    compressed also has ``encoding`` and the ``encoded_size`` and ``encoded_sha256`` of the
    bytes transferred (what the task's ``fileSize`` and, for SHA-256 tasks, ``fileSign`` are).
    """

    name: str
    size: int
    sha256: str  # lowercase hex
    version: str
    target: str
    encoding: str | None = None  # one of ENCODINGS
    encoded_size: int | None = None
    encoded_sha256: str | None = None

    @property
    def transfer_size(self) -> int:
        """The bytes the task's URL serves."""
        return self.encoded_size if self.encoded_size is not None else self.size

    @property
    def transfer_sha256(self) -> str:
        return self.encoded_sha256 if self.encoded_sha256 is not None else self.sha256


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed, validated manifest body (what the vendor signed)."""

    version: str
    boards: tuple[str, ...]
    files: tuple[ManifestFile, ...]
    created: datetime  # timezone-aware
    allow_downgrade: bool = False
    schema: int = SCHEMA

    def versions_by_target(self) -> dict[str, str]:
        """target name -> the version this package installs there.

        Whether the package version is the concatenation of these is checked where the
        configured target order is known (plan time), not here.
        """
        return {f.target: f.version for f in self.files}

    def file(self, name: str) -> ManifestFile | None:
        """The entry for a file name, or None when the manifest does not list it."""
        return next((f for f in self.files if f.name == name), None)


def manifest_to_json(manifest: Manifest) -> bytes:
    """The manifest body as :func:`parse_manifest` reads it back (for the bundle tool)."""
    body = {
        "schema": manifest.schema,
        "version": manifest.version,
        "boards": list(manifest.boards),
        "files": [_file_json(f) for f in manifest.files],
        "created": manifest.created.isoformat(),
        "allow_downgrade": manifest.allow_downgrade,
    }
    return (json.dumps(body, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _file_json(f: ManifestFile) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": f.name,
        "size": f.size,
        "sha256": f.sha256,
        "version": f.version,
        "target": f.target,
    }
    if f.encoding is not None:
        entry.update(
            encoding=f.encoding, encoded_size=f.encoded_size, encoded_sha256=f.encoded_sha256
        )
    return entry


# --- strict JSON ---------------------------------------------------------------------------------


def _load_json(data: object, limit: int, what: str) -> object:
    """Decode bounded, strict JSON: size and depth before parsing, no NaN, no duplicate keys."""
    if not isinstance(data, bytes | bytearray):
        raise ManifestError(f"{what} must be bytes, not {type(data).__name__}")
    if len(data) > limit:
        raise ManifestError(f"{what} is {len(data)} bytes, more than {limit}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{what} is not UTF-8: {err}") from err
    _check_depth(text, what)
    try:
        return json.loads(
            text,
            parse_constant=lambda name: _refuse(f"{what}: {name} is not a JSON value"),
            parse_float=lambda literal: _finite(literal, what),
            object_pairs_hook=lambda pairs: _unique_keys(pairs, what),
        )
    except (ValueError, RecursionError) as err:  # JSONDecodeError, a 5000-digit integer
        raise ManifestError(f"{what} is not valid JSON: {err}") from err


def _check_depth(text: str, what: str) -> None:
    """Refuse deep nesting before json builds objects (a scan without recursion)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return
    depth = 0
    pos = 0
    while (match := _STRUCTURAL_RE.search(text, pos)) is not None:
        pos = match.end()
        char = match.group()
        if char == '"':
            rest = _STRING_REST_RE.match(text, pos)
            if rest is None:
                return  # unterminated: the decoder reports it
            pos = rest.end()
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise ManifestError(f"{what}: JSON nesting is deeper than {MAX_DEPTH}")
        else:
            depth -= 1


def _refuse(message: str) -> NoReturn:
    raise ManifestError(message)


def _finite(literal: str, what: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ManifestError(f"{what}: number {literal[:20]!r} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, object]], what: str) -> dict[str, object]:
    """Duplicate keys are ambiguous (parsers disagree on which wins): refuse them."""
    result = dict(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        dup = next(key for key in keys if keys.count(key) > 1)
        raise ManifestError(f"{what}: duplicate key {_preview(dup)}")
    return result


# --- the manifest body ---------------------------------------------------------------------------


def parse_manifest(body: bytes) -> Manifest:
    """Validate a manifest body strictly; raise :class:`ManifestError` and nothing else."""
    try:
        return _manifest_from(_load_json(body, MAX_MANIFEST_BYTES, "manifest"))
    except ManifestError:
        raise
    except (ValueError, TypeError, RecursionError, OverflowError) as err:  # a safety net
        raise ManifestError(f"unreadable manifest: {type(err).__name__}: {err}") from err


def _bad(where: str, message: str) -> NoReturn:
    raise ManifestError(f"manifest field {where}: {message}")


def _manifest_from(doc: object) -> Manifest:
    if not isinstance(doc, dict):
        raise ManifestError(f"manifest must be a JSON object, not {_kind(doc)}")
    # The schema first: a newer manifest should say so, not "unknown key".
    schema = _int(_get(doc, "schema", "schema"), "schema")
    if schema != SCHEMA:
        _bad("schema", f"unsupported schema {schema} (this updater reads {SCHEMA})")
    _only_keys(doc, _MANIFEST_KEYS, "manifest")
    return Manifest(
        schema=schema,
        version=_version(_get(doc, "version", "version"), "version"),
        boards=_boards(_get(doc, "boards", "boards")),
        files=_files(_get(doc, "files", "files")),
        created=_created(_get(doc, "created", "created")),
        allow_downgrade=_bool(_get(doc, "allow_downgrade", "allow_downgrade"), "allow_downgrade"),
    )


def _get(obj: dict[str, object], key: str, where: str) -> object:
    if key not in obj:
        _bad(where, "is missing")
    return obj[key]


def _only_keys(obj: dict[str, object], allowed: tuple[str, ...], where: str) -> None:
    """A signed document has one meaning: unknown keys are refused, not ignored."""
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ManifestError(f"{where}: unknown key {_preview(unknown[0])}")


def _files(value: object) -> tuple[ManifestFile, ...]:
    if not isinstance(value, list):
        _bad("files", f"must be an array, not {_kind(value)}")
    if not 1 <= len(value) <= MAX_FILES:
        _bad("files", f"must list 1..{MAX_FILES} files, not {len(value)}")
    files = tuple(_file(item, f"files[{i}]") for i, item in enumerate(value))
    _unique([f.name for f in files], "name")
    _unique([f.target for f in files], "target")
    return files


def _file(value: object, where: str) -> ManifestFile:
    if not isinstance(value, dict):
        _bad(where, f"must be an object, not {_kind(value)}")
    _only_keys(value, _FILE_KEYS, f"manifest field {where}")
    encoded = [key for key in _ENCODED_KEYS if key in value]
    if encoded and len(encoded) != len(_ENCODED_KEYS):
        missing = [key for key in _ENCODED_KEYS if key not in value]
        _bad(where, f"a compressed file needs {', '.join(_ENCODED_KEYS)}; missing {missing[0]}")
    file = ManifestFile(
        name=_name(_get(value, "name", f"{where}.name"), f"{where}.name"),
        size=_size(_get(value, "size", f"{where}.size"), f"{where}.size"),
        sha256=_sha256(_get(value, "sha256", f"{where}.sha256"), f"{where}.sha256"),
        version=_version(_get(value, "version", f"{where}.version"), f"{where}.version"),
        target=_target(_get(value, "target", f"{where}.target"), f"{where}.target"),
    )
    if not encoded:
        return file
    encoding = value["encoding"]
    if not isinstance(encoding, str) or encoding not in ENCODINGS:
        _bad(f"{where}.encoding", f"{_preview(encoding)} is not one of {', '.join(ENCODINGS)}")
    return replace(
        file,
        encoding=encoding,
        encoded_size=_size(value["encoded_size"], f"{where}.encoded_size"),
        encoded_sha256=_sha256(value["encoded_sha256"], f"{where}.encoded_sha256"),
    )


def _unique(values: list[str], what: str) -> None:
    """Two files with one name (or one target) would make the match ambiguous."""
    for index, item in enumerate(values):
        first = values.index(item)
        if first != index:
            _bad(f"files[{index}].{what}", f"duplicates files[{first}].{what} {_preview(item)}")


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        _bad(where, f"must be a string, not {_kind(value)}")
    return value


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _bad(where, f"must be an integer, not {_kind(value)}")
    return value


def _bool(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        _bad(where, f"must be true or false, not {_kind(value)}")
    return value


def _version(value: object, where: str) -> str:
    """Versions are concatenated, compared and reported verbatim: plain ASCII only."""
    text = _string(value, where)
    if not 1 <= len(text) <= MAX_VERSION_CHARS:
        _bad(where, f"must be 1..{MAX_VERSION_CHARS} chars, not {len(text)}")
    if not _VERSION_RE.fullmatch(text):
        _bad(where, f"{_preview(text)} must be printable ASCII without whitespace")
    return text


def _name(value: object, where: str) -> str:
    """The same rules as task file names, plus the manifest's own name being reserved."""
    name = _string(value, where)
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        _bad(where, f"file name must be 1..{MAX_NAME_CHARS} chars, not {len(name)}")
    if not name.isprintable():
        _bad(where, f"file name {_preview(name)} has non-printable characters")
    if "/" in name or "\\" in name:
        _bad(where, f"file name {_preview(name)} must not contain / or \\")
    if name in (".", ".."):
        _bad(where, f"file name {name!r} is not allowed")
    if name == MANIFEST_NAME:
        _bad(where, f"{MANIFEST_NAME!r} is the manifest's own name")
    return name


def _size(value: object, where: str) -> int:
    size = _int(value, where)
    if not 1 <= size <= MAX_FILE_SIZE:
        _bad(where, f"must be 1..{MAX_FILE_SIZE} bytes, not {_preview(size)}")
    return size


def _sha256(value: object, where: str) -> str:
    text = _string(value, where)
    if not _SHA256_RE.fullmatch(text):
        _bad(where, f"must be 64 hex digits, not {_preview(text)}")
    return text.lower()


def _target(value: object, where: str) -> str:
    """Target names as the configuration allows them (``[a-z0-9][a-z0-9_-]*``)."""
    text = _string(value, where)
    if len(text) > MAX_TARGET_CHARS or not _TARGET_RE.fullmatch(text):
        _bad(where, f"{_preview(text)} must match [a-z0-9][a-z0-9_-]* (at most 64 chars)")
    return text


def _boards(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        _bad("boards", f"must be an array of board models, not {_kind(value)}")
    if not 1 <= len(value) <= MAX_BOARDS:
        _bad("boards", f"must list 1..{MAX_BOARDS} board models, not {len(value)}")
    return tuple(_board(item, f"boards[{i}]") for i, item in enumerate(value))


def _board(value: object, where: str) -> str:
    text = _string(value, where)
    if not 1 <= len(text) <= MAX_BOARD_CHARS or not text.isprintable():
        _bad(where, f"must be 1..{MAX_BOARD_CHARS} printable characters")
    return text


def _created(value: object) -> datetime:
    """When the package was signed, with its time zone (a zoneless time is ambiguous)."""
    text = _string(value, "created")
    try:
        if len(text) > MAX_CREATED_CHARS:
            raise ValueError(f"{len(text)} chars")
        created = datetime.fromisoformat(text)
    except ValueError:
        _bad("created", f"{_preview(text)} is not an ISO 8601 time")
    if created.utcoffset() is None:
        _bad("created", f"{_preview(text)} has no time zone")
    return created


# --- the DSSE envelope ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Signature:
    keyid: str  # "" when the envelope gives none
    sig: bytes


@dataclass(frozen=True, slots=True)
class _Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[_Signature, ...]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is signed, type and body both bound in."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def sign_manifest(manifest_body: bytes, private_pem: bytes) -> bytes:
    """The DSSE envelope (JSON) of a manifest body; a body the device would refuse is refused."""
    parse_manifest(manifest_body)
    key = load_private_key(private_pem)
    signature = key.sign(pae(PAYLOAD_TYPE, manifest_body))
    envelope = {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(manifest_body).decode("ascii"),
        "signatures": [
            {"keyid": key_id(key.public_key()), "sig": base64.b64encode(signature).decode("ascii")}
        ],
    }
    return (json.dumps(envelope, indent=1) + "\n").encode("ascii")


def verify_envelope(envelope: bytes, keyring: Keyring) -> Manifest:
    """Check a DSSE envelope against the keyring, then parse the manifest it carries.

    At least one signature by a trusted key must verify. Signatures by unknown keys are
    ignored (another vendor's or a future key); one by a revoked key, named by its key id or
    verified by a revoked public key still on file, refuses the envelope outright.
    """
    try:
        parsed = _envelope_from(_load_json(envelope, MAX_ENVELOPE_BYTES, "manifest envelope"))
    except ManifestError:
        raise
    except (ValueError, TypeError, RecursionError, OverflowError) as err:  # a safety net
        raise ManifestError(f"unreadable manifest envelope: {type(err).__name__}: {err}") from err
    signer = _check_signatures(parsed, keyring)
    manifest = parse_manifest(parsed.payload)
    log.info("manifest of version %s signed by key %s", manifest.version, signer)
    return manifest


def _envelope_from(doc: object) -> _Envelope:
    where = "manifest envelope"
    if not isinstance(doc, dict):
        raise ManifestError(f"{where} must be a JSON object, not {_kind(doc)}")
    _only_keys(doc, _ENVELOPE_KEYS, where)
    for key in _ENVELOPE_KEYS:
        if key not in doc:
            raise ManifestError(f"{where}: {key} is missing")
    payload_type = doc["payloadType"]
    if payload_type != PAYLOAD_TYPE:
        raise ManifestError(f"{where}: payloadType {_preview(payload_type)} is not {PAYLOAD_TYPE}")
    payload = _b64(doc["payload"], f"{where}: payload", (MAX_MANIFEST_BYTES + 2) // 3 * 4)
    return _Envelope(PAYLOAD_TYPE, payload, _signatures(doc["signatures"], where))


def _signatures(value: object, where: str) -> tuple[_Signature, ...]:
    if not isinstance(value, list):
        raise ManifestError(f"{where}: signatures must be an array, not {_kind(value)}")
    if not 1 <= len(value) <= MAX_SIGNATURES:
        raise ManifestError(f"{where}: needs 1..{MAX_SIGNATURES} signatures, not {len(value)}")
    return tuple(_signature(item, f"{where}: signatures[{i}]") for i, item in enumerate(value))


def _signature(value: object, where: str) -> _Signature:
    if not isinstance(value, dict):
        raise ManifestError(f"{where} must be an object, not {_kind(value)}")
    _only_keys(value, ("keyid", "sig"), where)
    keyid = value.get("keyid", "")  # optional in DSSE: an unauthenticated hint
    if not isinstance(keyid, str) or len(keyid) > MAX_KEYID_CHARS or not keyid.isprintable():
        raise ManifestError(f"{where}.keyid must be a short printable string")
    if "sig" not in value:
        raise ManifestError(f"{where}.sig is missing")
    return _Signature(keyid, _b64(value["sig"], f"{where}.sig", MAX_SIG_CHARS))


def _b64(value: object, where: str, max_chars: int) -> bytes:
    """Padded base64, standard or URL-safe alphabet (DSSE allows either)."""
    if not isinstance(value, str):
        raise ManifestError(f"{where} must be a base64 string, not {_kind(value)}")
    if len(value) > max_chars:
        raise ManifestError(f"{where} is {len(value)} chars, more than {max_chars}")
    if not _BASE64_RE.fullmatch(value):
        raise ManifestError(f"{where} is not base64")
    return base64.b64decode(value.translate(str.maketrans("-_", "+/")), validate=True)


def _check_signatures(envelope: _Envelope, keyring: Keyring) -> str:
    """The id of a trusted key whose signature verifies; refuse revoked and unsigned envelopes."""
    message = pae(envelope.payload_type, envelope.payload)
    good: list[str] = []
    bad: list[str] = []
    unknown: list[str] = []
    for signature in envelope.signatures:
        _refuse_revoked(signature, message, keyring)
        candidates = [signature.keyid] if signature.keyid else list(keyring.trusted)
        for kid in candidates:
            key = keyring.trusted.get(kid)
            if key is None:
                unknown.append(kid)
            elif _verifies(key, signature.sig, message):
                good.append(kid)
            elif signature.keyid:
                bad.append(kid)
    if good:
        return good[0]
    if bad:
        raise ManifestError(
            f"the signature by key {bad[0]} does not verify: the manifest or its signature was "
            "altered"
        )
    signers = ", ".join(_preview(kid, 20) for kid in unknown) or "keys not named"
    raise ManifestError(
        f"no trusted key signed this manifest (signed by {signers}; trusted: "
        f"{', '.join(sorted(keyring.trusted))})"
    )


def _refuse_revoked(signature: _Signature, message: bytes, keyring: Keyring) -> None:
    if signature.keyid in keyring.revoked:
        raise ManifestError(f"signed by key {signature.keyid}, which is revoked")
    for kid, key in keyring.revoked_keys.items():
        if _verifies(key, signature.sig, message):
            raise ManifestError(f"signed by key {kid}, which is revoked")


def _verifies(key: ed25519.Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


# --- the package against the manifest ------------------------------------------------------------


def check_task_against_manifest(task: Task, manifest: Manifest) -> None:
    """The task must describe exactly the files the manifest lists, at its version.

    Every task file must be listed with the same size (and, for SHA-256 tasks, the same
    digest), and every listed file must be in the task. The task's entry for the manifest
    itself (named :data:`MANIFEST_NAME`, which no listed file may have) is skipped: it was
    fetched and verified first.
    """
    if task.version != manifest.version:
        raise ManifestError(
            f"the task is version {task.version!r} but the manifest says {manifest.version!r}"
        )
    for spec in task.files:
        if spec.name == MANIFEST_NAME:
            continue
        entry = manifest.file(spec.name)
        if entry is None:
            raise _file_error(spec.name, "is not listed in the manifest")
        if spec.size != entry.transfer_size:
            raise _file_error(
                spec.name, f"size {spec.size} != {entry.transfer_size} in the manifest"
            )
        if task.digest_method == "sha256" and spec.digest != entry.transfer_sha256:
            raise _file_error(
                spec.name, f"SHA-256 {spec.digest} != {entry.transfer_sha256} in the manifest"
            )
    names = {spec.name for spec in task.files}
    for entry in manifest.files:
        if entry.name not in names:
            raise _file_error(entry.name, "is listed in the manifest but missing from the task")


def _file_error(name: str, message: str) -> ManifestError:
    return ManifestError(f"file {name}: {message}", file_name=name)


def check_board(manifest: Manifest, model_path: Path = DEFAULT_MODEL_PATH) -> None:
    """The board (the device tree's NUL-terminated model string) must be one the manifest lists.

    A listed board matches the model exactly, or the model with its revision suffix
    (``Raspberry Pi 4 Model B`` matches ``Raspberry Pi 4 Model B Rev 1.4``): vendors list board
    models, and revisions of one model run the same software.
    """
    model = read_model(model_path)
    if not any(_board_matches(board, model) for board in manifest.boards):
        raise ManifestError(
            f"this board ({model}) is not one the package is for: {', '.join(manifest.boards)}"
        )


def read_model(model_path: Path = DEFAULT_MODEL_PATH) -> str:
    """The board model from the device tree (or a stand-in file), without its NUL."""
    try:
        with model_path.open("rb") as f:
            raw = f.read(MAX_MODEL_BYTES + 1)
    except OSError as err:
        raise ManifestError(
            f"cannot read the board model from {model_path}: {err.strerror or err}"
        ) from err
    raw = raw.split(b"\0", 1)[0]
    try:
        model = raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise ManifestError(f"the board model in {model_path} is not UTF-8") from err
    if not model or len(raw) > MAX_MODEL_BYTES:
        raise ManifestError(f"{model_path} holds no usable board model")
    return model


def _board_matches(board: str, model: str) -> bool:
    return model == board or model.startswith(f"{board} Rev ")


# --- the platform's "secure OTA" -----------------------------------------------------------------


def verify_digestsign(digest_hex: str, digestsign_b64: str, public_key_pem: bytes) -> None:
    """Check the platform's ``digestsign``: RSA PKCS#1 v1.5, SHA-256, over the raw digest bytes.

    ``digest_hex`` is the task's ``sign`` (MD5 or SHA-256 hex); the key is the product's RSA
    public key from the configuration (PEM). Raises :class:`ManifestError` unless it verifies.
    """
    if not isinstance(digest_hex, str) or len(digest_hex) not in (32, 64):
        raise ManifestError("digestsign: the digest must be 32 or 64 hex digits")
    if not _HEX_RE.fullmatch(digest_hex):
        raise ManifestError("digestsign: the digest is not hexadecimal")
    signature = _b64(digestsign_b64, "digestsign", MAX_SIG_CHARS)
    key = _load_rsa_public_key(public_key_pem)
    try:
        key.verify(signature, bytes.fromhex(digest_hex), padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise ManifestError(
            "digestsign does not verify with the product's public key: the digest or its "
            "signature was altered, or the key is not this product's"
        ) from None


def _load_rsa_public_key(pem: bytes) -> rsa.RSAPublicKey:
    source = "the product's public key"
    _check_pem_size(pem, source)
    try:
        key = serialization.load_pem_public_key(bytes(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ManifestError(f"{source}: not a PEM public key") from err
    if not isinstance(key, rsa.RSAPublicKey):
        raise ManifestError(f"{source}: an {_key_kind(key)} key, not an RSA key")
    if key.key_size < MIN_RSA_BITS:
        raise ManifestError(f"{source}: RSA-{key.key_size} is too weak (at least {MIN_RSA_BITS})")
    return key


# --- messages ------------------------------------------------------------------------------------


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages."""
    if value is None:
        return "null"
    for kind, name in (
        (bool, "boolean"),
        (int, "integer"),
        (float, "number"),
        (str, "string"),
        (list, "array"),
        (dict, "object"),
    ):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _preview(value: object, limit: int = 40) -> str:
    """A short repr: messages echo hostile input, so never at full length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
