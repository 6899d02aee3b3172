"""Update tasks: the IoT Platform push (single- or multi-file) parsed into a validated value.

Pure: no I/O. Intake paths (MQTT push, get_reply, ``rpi-updater install TASK.json``) all end here,
so this is the one place where untrusted task text meets the updater. It refuses anything it
cannot vouch for with a :class:`~updater.errors.TaskError` whose ``field`` names the culprit,
and it never lets any other exception escape, whatever the input.

Field names in errors are relative to the ``data`` object (``files[2].fileSize``), whichever
envelope carried it, so that one message means the same thing on every intake path. Two special
fields: ``"data"`` (the envelope's ``data`` itself) and ``"$"`` (the document as a whole: size,
nesting, encoding, syntax, non-JSON values).

A JSON ``null`` in an optional field means the same as an absent field: the protocol's sources
do not settle whether the platform ever sends one, so this is the liberal reading.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import unquote, urlsplit

from updater.errors import TaskError

DigestMethod = Literal["md5", "sha256"]

DOCUMENT: Final = "$"
"""The ``field`` of errors about the document as a whole rather than one of its fields."""

MAX_JSON_BYTES: Final = 256 * 1024
MAX_DEPTH: Final = 32
MAX_FILE_SIZE: Final = 64 << 30
MAX_FILES: Final = 20  # the Link SDK's limit: the platform never sends more
MAX_URL_CHARS: Final = 4096
MAX_VERSION_CHARS: Final = 64
MAX_MODULE_CHARS: Final = 64
MAX_NAME_CHARS: Final = 255
MAX_DIGESTSIGN_CHARS: Final = 1024

_DIGEST_CHARS: Final[dict[DigestMethod, int]] = {"md5": 32, "sha256": 64}
_METHOD_NAMES: Final[dict[DigestMethod, str]] = {"md5": "MD5", "sha256": "SHA256"}
_TASK_ID_DOMAIN: Final = b"rpi-ab-updater/task-id/v1\n"

_VERSION_RE: Final = re.compile(r"[\x21-\x7e]+")
_HEX_RE: Final = re.compile(r"[0-9a-fA-F]+")
_BASE64_RE: Final = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_URL_CHAR_RE: Final = re.compile(r"[\x21-\x7e]+")
# Outside strings only brackets and quotes matter for nesting; inside a string (entered after
# its opening quote) an escape is a backslash and one character. Possessive quantifiers keep a
# hostile unterminated string linear.
_STRUCTURAL_RE: Final = re.compile(r'[\[\]{}"]')
_STRING_REST_RE: Final = re.compile(r'[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)


class NoTaskPending(TaskError):
    """The envelope's ``data`` is ``{}``: the platform has nothing pending for this device.

    A subclass of TaskError so that callers that only want a task can treat it as one more
    refusal, while the agent can tell "nothing to do" from "malformed" with one ``except``.
    """

    def __init__(self, field: str = "data", message: str = "no update is pending") -> None:
        super().__init__(field, message)


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One file of a task. ``name`` is only ever matched against targets, never used as a path."""

    name: str
    size: int
    url: str
    digest: str  # lowercase hex, length fixed by the task's digest method


@dataclass(frozen=True, slots=True)
class Task:
    """A validated update task; ``parse_task`` never sets ``is_diff`` (diffs are refused)."""

    version: str
    digest_method: DigestMethod
    files: tuple[FileSpec, ...]
    module: str | None = None
    ext_data: dict[str, object] = field(default_factory=dict, hash=False, compare=False)
    digestsign: str | None = None
    is_diff: bool = False

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def task_id(self) -> str:
        """A stable id for this task: 16 hex chars of a SHA-256 over a canonical JSON.

        The JSON holds version, module, digest method and each file's name, size and digest,
        with sorted keys and no whitespace, so a re-delivery of the same push (MQTT QoS 1
        duplicates, a get_reply for a push already seen) gives the same id, while any change in
        what would be installed gives another. URLs are left out on purpose: object storage
        presigns a new URL (signature, expiry) each time the platform re-sends a package, and a
        resume after a restart must still recognise it. ``ext_data`` and ``digestsign`` are left
        out too: they describe the task, they do not change which bytes land where.
        """
        canonical = {
            "version": self.version,
            "module": self.module,
            "digest_method": self.digest_method,
            "files": [{"name": f.name, "size": f.size, "digest": f.digest} for f in self.files],
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(_TASK_ID_DOMAIN + text.encode("ascii")).hexdigest()[:16]


# --- public entry points -------------------------------------------------------------------------


def parse_task(raw: bytes | str | object) -> Task:
    """Parse a push envelope, a get_reply envelope, or a bare ``data`` object into a Task.

    ``raw`` is JSON text (``bytes`` must be UTF-8) or an already-decoded JSON value. Raises
    :class:`NoTaskPending` for an envelope with ``"data": {}`` and :class:`TaskError` for
    anything else it refuses; no other exception escapes, whatever ``raw`` holds.
    """
    try:
        return _task_from_data(_unwrap(_load_document(raw)))
    except TaskError:
        raise
    except (ValueError, TypeError, RecursionError, OverflowError) as err:
        # A safety net: every expected failure is already a TaskError with a precise field.
        raise TaskError(DOCUMENT, f"unreadable task: {type(err).__name__}: {err}") from err


def task_to_json(task: Task) -> dict[str, object]:
    """The task as a multi-file ``data`` object, which :func:`parse_task` accepts back.

    Multi-file even for one file: it is the only form that carries the file name explicitly
    (single-file tasks derive it from the URL). For tests, task files and bundle tooling.
    """
    data: dict[str, object] = {
        "version": task.version,
        "signMethod": _METHOD_NAMES[task.digest_method],
        "files": [
            {"fileName": f.name, "fileSize": f.size, "fileUrl": f.url, "fileSign": f.digest}
            for f in task.files
        ],
    }
    if task.module is not None:
        data["module"] = task.module
    if task.ext_data:
        data["extData"] = json.loads(json.dumps(task.ext_data))  # a deep copy, JSON only
    if task.digestsign is not None:
        data["digestsign"] = task.digestsign
    if task.is_diff:
        data["isDiff"] = 1
    return data


# --- the document: bytes/str/object -> a plain JSON value ---------------------------------------


def _load_document(raw: object) -> object:
    """Turn any input into freshly decoded JSON, within the size and depth limits.

    Already-decoded objects are checked, re-encoded and decoded again: one code path for all
    inputs, the same limits for all of them, and a Task that shares nothing mutable with the
    caller's object.
    """
    if isinstance(raw, bytes | bytearray):
        return _decode_json(_text_from_bytes(raw))
    if isinstance(raw, str):
        _check_text_size(raw)
        return _decode_json(raw)
    _check_json_value(raw)
    return _decode_json(_encode_json(raw))


def _text_from_bytes(raw: bytes | bytearray) -> str:
    """Decode UTF-8 (RFC 8259's only encoding; a leading BOM is tolerated for hand-made files)."""
    if len(raw) > MAX_JSON_BYTES:
        raise TaskError(DOCUMENT, f"JSON text is {len(raw)} bytes, more than {MAX_JSON_BYTES}")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise TaskError(DOCUMENT, f"JSON text is not UTF-8: {err}") from err


def _check_text_size(text: str) -> None:
    """Apply the byte limit to text as it would travel (UTF-8), cheaply for huge strings."""
    size = len(text) if len(text) > MAX_JSON_BYTES else _utf8_size(text)
    if size > MAX_JSON_BYTES:
        raise TaskError(DOCUMENT, f"JSON text is {size} bytes, more than {MAX_JSON_BYTES}")


def _utf8_size(text: str) -> int:
    """UTF-8 length, counting lone surrogates (legal in a Python str) as 3 bytes each."""
    return len(text.encode("utf-8", "surrogatepass"))


def _decode_json(text: str) -> object:
    """Strict JSON: depth checked first, no NaN/Infinity, finite numbers, no duplicate keys."""
    _check_text_depth(text)
    try:
        return json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            object_pairs_hook=_object_without_duplicates,
        )
    except json.JSONDecodeError as err:
        raise TaskError(DOCUMENT, f"invalid JSON: {err}") from err
    except (ValueError, RecursionError) as err:  # e.g. an integer of more than 4300 digits
        raise TaskError(DOCUMENT, f"invalid JSON: {err}") from err


def _check_text_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH before json builds a single object.

    A scan of brackets outside strings, without recursion. Malformed text (unbalanced,
    unterminated) is left to the decoder, which reports it better.
    """
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return  # the common case: a task has a handful of containers
    depth = 0
    pos = 0
    while (match := _STRUCTURAL_RE.search(text, pos)) is not None:
        char = match.group()
        pos = match.end()
        if char == '"':
            rest = _STRING_REST_RE.match(text, pos)
            if rest is None:
                return
            pos = rest.end()
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise TaskError(DOCUMENT, f"JSON nesting is deeper than {MAX_DEPTH}")
        else:
            depth -= 1


def _refuse_constant(name: str) -> object:
    """``NaN``, ``Infinity`` and ``-Infinity`` are Python's extensions, not JSON."""
    raise TaskError(DOCUMENT, f"{name} is not a JSON value")


def _finite_float(literal: str) -> float:
    """``1e999`` decodes to infinity, which nothing downstream could represent back."""
    value = float(literal)
    if not math.isfinite(value):
        raise TaskError(DOCUMENT, f"number {_preview(literal)} is out of range")
    return value


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Refuse duplicate keys: parsers disagree on which one wins, so the task is ambiguous."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise TaskError(DOCUMENT, f"duplicate key {_preview(key)} in a JSON object")
            seen.add(key)
    return result


def _check_json_value(value: object) -> None:
    """Check a caller's decoded value without recursion: JSON types, depth, and a size bound.

    Every node and every string character costs at least one byte of JSON text, so their sum
    is a lower bound of the encoded size: exceeding MAX_JSON_BYTES stops the walk early, before
    a huge or cyclic structure is traversed (a cycle also exceeds MAX_DEPTH).
    """
    budget = MAX_JSON_BYTES
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        budget -= 1 + _own_chars(item, depth)
        if budget < 0:
            raise TaskError(DOCUMENT, f"JSON text would be more than {MAX_JSON_BYTES} bytes")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _own_chars(item: object, depth: int) -> int:
    """Validate one node of a decoded value; return the characters it holds itself."""
    if isinstance(item, str):
        return len(item)
    if item is None or isinstance(item, int):
        return 0
    if isinstance(item, float):
        if not math.isfinite(item):
            raise TaskError(DOCUMENT, f"{item!r} is not a JSON value")
        return 0
    if not isinstance(item, dict | list):
        raise TaskError(DOCUMENT, f"a {type(item).__name__} is not a JSON value")
    if depth > MAX_DEPTH:
        raise TaskError(DOCUMENT, f"JSON nesting is deeper than {MAX_DEPTH}")
    if isinstance(item, list):
        return len(item)
    return sum(_key_chars(key) for key in item)


def _key_chars(key: object) -> int:
    """JSON object keys are strings; json.dumps would silently stringify anything else."""
    if not isinstance(key, str):
        raise TaskError(DOCUMENT, f"an object key of type {type(key).__name__} is not a string")
    return len(key) + 1


def _encode_json(value: object) -> str:
    """Encode a checked value compactly and apply the text size limit to the result."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (ValueError, TypeError) as err:  # e.g. an integer of more than 4300 digits
        raise TaskError(DOCUMENT, f"not encodable as JSON: {err}") from err
    _check_text_size(text)
    return text


# --- envelopes -----------------------------------------------------------------------------------


def _unwrap(document: object) -> dict[str, object]:
    """Return the ``data`` object of a push or get_reply envelope, or the bare object itself.

    An object with a ``data`` key is an envelope (a bare ``data`` object never has one). Its
    ``code``/``id``/``message`` are not checked: the two envelopes differ in them and the
    protocol says to treat both alike.
    """
    if not isinstance(document, dict):
        raise TaskError(DOCUMENT, f"must be a JSON object, not {_kind(document)}")
    if "data" not in document:
        return document
    data = document["data"]
    if not isinstance(data, dict):
        raise TaskError("data", f"must be an object, not {_kind(data)}")
    if not data:
        raise NoTaskPending()
    return data


# --- the data object -----------------------------------------------------------------------------


def _task_from_data(data: dict[str, object]) -> Task:
    """Validate every field of a ``data`` object; refusals of the transfer mode come first."""
    _check_dprotocol(data.get("dProtocol"))
    _check_is_diff(data.get("isDiff"))
    version = _version(_required(data, "version", "version"), "version")
    method = _sign_method(_required(data, "signMethod", "signMethod"), "signMethod")
    has_files = data.get("files") is not None
    files = _multi_files(data, method) if has_files else _single_file(data, method)
    return Task(
        version=version,
        digest_method=method,
        files=files,
        module=_module(data.get("module"), "module"),
        ext_data=_ext_data(data.get("extData"), "extData"),
        digestsign=_digestsign(data.get("digestsign"), "digestsign"),
    )


def _check_dprotocol(value: object) -> None:
    """Only HTTPS downloads are implemented; MQTT streams are refused by name, not by accident."""
    if value is None:
        return
    protocol = _expect_str(value, "dProtocol").lower()
    if protocol == "mqtt":
        raise TaskError("dProtocol", "download over MQTT streams is not supported (only HTTPS)")
    if protocol not in ("", "https"):
        raise TaskError("dProtocol", f"unknown download protocol {_preview(value)} (only HTTPS)")


def _check_is_diff(value: object) -> None:
    """Diff packages need the old image to patch against; this updater installs whole files."""
    if value is None:
        return
    flag = _expect_int(value, "isDiff")
    if flag == 1:
        raise TaskError("isDiff", "diff packages are not supported")
    if flag != 0:
        raise TaskError("isDiff", f"must be 0 or 1, not {flag}")


def _single_file(data: dict[str, object], method: DigestMethod) -> tuple[FileSpec, ...]:
    """A single-file task: the file's name is the last segment of its URL's path."""
    url = _url(_required(data, "url", "url", hint=" (a task needs url/size/sign or files)"), "url")
    name = _name_from_url(url, "url")
    size = _size(_required(data, "size", "size"), "size")
    digest = _pick_digest(data, method, sign_key="sign", md5_key="md5", prefix="")
    return (FileSpec(name=name, size=size, url=url, digest=digest),)


def _multi_files(data: dict[str, object], method: DigestMethod) -> tuple[FileSpec, ...]:
    """A multi-file task: 1..MAX_FILES entries with distinct names, nothing single-file beside."""
    for key in ("url", "size", "sign"):
        if data.get(key) is not None:
            raise TaskError(key, "is not allowed together with files")
    entries = data["files"]
    if not isinstance(entries, list):
        raise TaskError("files", f"must be an array, not {_kind(entries)}")
    if not entries:
        raise TaskError("files", "must not be empty")
    if len(entries) > MAX_FILES:
        raise TaskError("files", f"has {len(entries)} entries, more than {MAX_FILES}")
    specs = tuple(_file_entry(entry, method, f"files[{i}]") for i, entry in enumerate(entries))
    _check_unique_names(specs)
    return specs


def _file_entry(entry: object, method: DigestMethod, prefix: str) -> FileSpec:
    """One element of ``files``; unknown keys (e.g. a per-file version) are ignored."""
    if not isinstance(entry, dict):
        raise TaskError(prefix, f"must be an object, not {_kind(entry)}")
    name_field, size_field, url_field = (
        f"{prefix}.fileName",
        f"{prefix}.fileSize",
        f"{prefix}.fileUrl",
    )
    return FileSpec(
        name=_file_name(_required(entry, "fileName", name_field), name_field),
        size=_size(_required(entry, "fileSize", size_field), size_field),
        url=_url(_required(entry, "fileUrl", url_field), url_field),
        digest=_pick_digest(entry, method, sign_key="fileSign", md5_key="fileMd5", prefix=prefix),
    )


def _check_unique_names(specs: tuple[FileSpec, ...]) -> None:
    """Names select targets: two files with one name would make the target ambiguous."""
    first_index: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if spec.name in first_index:
            raise TaskError(
                f"files[{index}].fileName",
                f"duplicates files[{first_index[spec.name]}].fileName {_preview(spec.name)}",
            )
        first_index[spec.name] = index


def _pick_digest(
    obj: dict[str, object], method: DigestMethod, *, sign_key: str, md5_key: str, prefix: str
) -> str:
    """The file's digest from ``sign`` (or ``fileSign``), or from its MD5 twin for MD5 tasks.

    Some platform clients read the MD5 field instead of the sign field, so either is accepted
    when the method is MD5, and when both are present they must agree: a task that promises two
    digests for one file is corrupt. For SHA-256 tasks the MD5 twin is not used at all.
    """
    sign_field, md5_field = (f"{prefix}.{k}" if prefix else k for k in (sign_key, md5_key))
    raw_sign = obj.get(sign_key)
    sign = None if raw_sign is None else _digest(raw_sign, method, sign_field)
    raw_md5 = obj.get(md5_key) if method == "md5" else None
    md5 = None if raw_md5 is None else _digest(raw_md5, "md5", md5_field)
    if sign is not None and md5 is not None and sign != md5:
        raise TaskError(md5_field, f"disagrees with {sign_key}")
    digest = sign if sign is not None else md5
    if digest is None:
        also = f" (and so is {md5_key})" if method == "md5" else ""
        raise TaskError(sign_field, f"is missing{also}")
    return digest


# --- field validators ----------------------------------------------------------------------------


def _required(obj: dict[str, object], key: str, field: str, *, hint: str = "") -> object:
    """The value of a required key (null counts as missing)."""
    value = obj.get(key)
    if value is None:
        raise TaskError(field, f"is missing{hint}")
    return value


def _expect_str(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise TaskError(field, f"must be a string, not {_kind(value)}")
    return value


def _expect_int(value: object, field: str) -> int:
    """An integer, and only that: ``true`` is not 1 and ``1.0`` is not a size."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskError(field, f"must be an integer, not {_kind(value)}")
    return value


def _version(value: object, field: str) -> str:
    """Versions are concatenated and compared as text, and reported back verbatim."""
    version = _expect_str(value, field)
    _check_length(version, field, 1, MAX_VERSION_CHARS)
    if not _VERSION_RE.fullmatch(version):
        raise TaskError(field, "must be printable ASCII without whitespace")
    return version


def _sign_method(value: object, field: str) -> DigestMethod:
    """The platform writes ``Md5``, ``MD5``, ``SHA256``, ``Sha256``: compare without case."""
    name = _expect_str(value, field).lower()
    if name == "md5":
        return "md5"
    if name == "sha256":
        return "sha256"
    raise TaskError(field, f"unsupported digest method {_preview(value)} (only MD5 and SHA256)")


def _size(value: object, field: str) -> int:
    size = _expect_int(value, field)
    if not 1 <= size <= MAX_FILE_SIZE:
        raise TaskError(field, f"must be between 1 and {MAX_FILE_SIZE} bytes, not {_preview(size)}")
    return size


def _digest(value: object, method: DigestMethod, field: str) -> str:
    """Hex of exactly the method's length, in any case; stored lowercase for comparisons."""
    text = _expect_str(value, field)
    length = _DIGEST_CHARS[method]
    if len(text) != length:
        name = _METHOD_NAMES[method]
        raise TaskError(field, f"must be {length} hex digits for {name}, not {len(text)} chars")
    if not _HEX_RE.fullmatch(text):
        raise TaskError(field, "must be hexadecimal")
    return text.lower()


def _url(value: object, field: str) -> str:
    """An https URL with a host, kept byte for byte (presigned query strings must survive).

    Only printable ASCII: a URL on the wire is ASCII (RFC 3986), and whitespace or control
    characters are how header and request injection start.
    """
    url = _expect_str(value, field)
    _check_length(url, field, 1, MAX_URL_CHARS)
    if not _URL_CHAR_RE.fullmatch(url):
        raise TaskError(field, "must be printable ASCII without whitespace or control chars")
    if url[:8].lower() != "https://":
        raise TaskError(field, f"must start with https://, not {_preview(url, 30)}")
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a port that is not a number in range
    except ValueError as err:
        raise TaskError(field, f"is not a valid URL: {err}") from err
    if not host:
        raise TaskError(field, "has no host")
    return url


def _name_from_url(url: str, field: str) -> str:
    """The last path segment, percent-decoded (strict UTF-8); the query is not part of it."""
    segment = urlsplit(url).path.rpartition("/")[2]
    if not segment:
        raise TaskError(field, "has no file name at the end of its path")
    try:
        name = unquote(segment, errors="strict")
    except UnicodeDecodeError as err:
        raise TaskError(field, "the file name in its path is not UTF-8") from err
    return _file_name(name, field)


def _file_name(value: object, field: str) -> str:
    """A name matched against targets: printable, and unusable as a path even by mistake."""
    name = _expect_str(value, field)
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise TaskError(field, f"file name must be 1..{MAX_NAME_CHARS} chars, not {len(name)}")
    if not name.isprintable():
        raise TaskError(field, f"file name {_preview(name)} has non-printable characters")
    if "/" in name or "\\" in name:
        raise TaskError(field, f"file name {_preview(name)} must not contain / or \\")
    if name in (".", ".."):
        raise TaskError(field, f"file name {name!r} is not allowed")
    return name


def _module(value: object, field: str) -> str | None:
    """The module name travels back in progress and inform messages."""
    if value is None:
        return None
    module = _expect_str(value, field)
    _check_length(module, field, 1, MAX_MODULE_CHARS)
    if not module.isprintable():
        raise TaskError(field, "must be printable")
    return module


def _ext_data(value: object, field: str) -> dict[str, object]:
    """Free key/values from the console, kept as they are (``_package_udi`` stays a string)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TaskError(field, f"must be an object, not {_kind(value)}")
    return value


def _digestsign(value: object, field: str) -> str | None:
    """A base64 RSA signature over the digest; checked later against a key, here only shaped.

    An empty string is taken as absent: it is what a platform without secure OTA would send.
    """
    if value is None:
        return None
    text = _expect_str(value, field)
    if not text:
        return None
    if len(text) > MAX_DIGESTSIGN_CHARS:
        raise TaskError(field, f"is {len(text)} chars, more than {MAX_DIGESTSIGN_CHARS}")
    if not _BASE64_RE.fullmatch(text):
        raise TaskError(field, "must be base64 (A-Z a-z 0-9 + / and = padding)")
    return text


def _check_length(text: str, field: str, low: int, high: int) -> None:
    if not low <= len(text) <= high:
        raise TaskError(field, f"must be {low}..{high} chars, not {len(text)}")


# --- messages ------------------------------------------------------------------------------------


def _kind(value: object) -> str:
    """The JSON name of a value's type, for messages ("must be a string, not boolean")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _preview(value: object, limit: int = 40) -> str:
    """A short repr: messages echo hostile input, so never at full length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
