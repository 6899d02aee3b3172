"""Tests of updater.manifest: the signed manifest, the keyring, the checks against a task.

Refusals are tables whose rows name the expected words of the message, because the message is
what an operator reads in the ``desc`` of the failed (-3) progress report. The properties check
the promise the engine relies on: whatever arrives, the parsers return or raise ManifestError.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Final

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import require
from updater.errors import VerificationError
from updater.manifest import (
    MANIFEST_NAME,
    MAX_DEPTH,
    MAX_ENVELOPE_BYTES,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    PAYLOAD_TYPE,
    Keyring,
    Manifest,
    ManifestError,
    ManifestFile,
    check_board,
    check_task_against_manifest,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    manifest_to_json,
    pae,
    parse_manifest,
    public_key_id,
    sign_manifest,
    verify_digestsign,
    verify_envelope,
)
from updater.task import parse_task

KEY: Final = generate_key()
OTHER: Final = generate_key()
KEY_ID: Final = public_key_id(KEY[1])
OTHER_ID: Final = public_key_id(OTHER[1])
SHA_BOOT: Final = hashlib.sha256(b"boot").hexdigest()
SHA_ROOT: Final = hashlib.sha256(b"root").hexdigest()
DROP: Final = object()
PI4: Final = "Raspberry Pi 4 Model B"

PROPERTY_SETTINGS: Final = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
needs_root = pytest.mark.usefixtures("as_root")


@pytest.fixture
def as_root() -> None:
    """Ownership checks need root; under CI=true its absence fails the test (require)."""
    require(os.geteuid() == 0, "ownership checks need root")


# --- builders ------------------------------------------------------------------------------------


def file_entry(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "boot.img",
        "size": 4,
        "sha256": SHA_BOOT,
        "version": "a1",
        "target": "boot",
    }
    return _apply(base, changes)


def body(**changes: object) -> dict[str, object]:
    """A valid manifest body (two files) with ``changes`` applied; DROP removes a key."""
    base: dict[str, object] = {
        "schema": 1,
        "version": "a1b1",
        "boards": [PI4, "Raspberry Pi 5 Model B"],
        "files": [
            file_entry(),
            file_entry(name="rootfs.img", size=4, sha256=SHA_ROOT, version="b1", target="rootfs"),
        ],
        "created": "2024-05-01T12:00:00+00:00",
        "allow_downgrade": False,
    }
    return _apply(base, changes)


def _apply(base: dict[str, object], changes: dict[str, object]) -> dict[str, object]:
    result = dict(base)
    for key, value in changes.items():
        if value is DROP:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


def signed(doc: object = None, key: tuple[bytes, bytes] = KEY) -> dict[str, object]:
    """The envelope of ``doc`` (default: a valid body) as a dict, to tamper with."""
    envelope = json.loads(sign_manifest(encode(body() if doc is None else doc), key[0]))
    assert isinstance(envelope, dict)
    return envelope


def envelope_with(payload: bytes, key: tuple[bytes, bytes] = KEY) -> bytes:
    """Sign any payload as a DSSE envelope (sign_manifest refuses invalid bodies)."""
    private = load_private_key(key[0])
    sig = private.sign(pae(PAYLOAD_TYPE, payload))
    return encode(
        {
            "payloadType": PAYLOAD_TYPE,
            "payload": base64.b64encode(payload).decode(),
            "signatures": [{"keyid": key_id(private.public_key()), "sig": b64(sig)}],
        }
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def ring(*keys: tuple[bytes, bytes], revoked: tuple[str, ...] = ()) -> Keyring:
    return Keyring.from_public_keys([k[1] for k in keys], revoked)


def refusal(call: Callable[[], object]) -> str:
    with pytest.raises(ManifestError) as info:
        call()
    return str(info.value)


# --- sign and verify -----------------------------------------------------------------------------


def test_sign_verify_round_trip() -> None:
    manifest = verify_envelope(sign_manifest(encode(body()), KEY[0]), ring(KEY, OTHER))
    assert manifest == parse_manifest(encode(body()))
    assert manifest.version == "a1b1"
    assert manifest.boards == (PI4, "Raspberry Pi 5 Model B")
    assert manifest.files[1] == ManifestFile("rootfs.img", 4, SHA_ROOT, "b1", "rootfs")
    assert manifest.created == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert manifest.versions_by_target() == {"boot": "a1", "rootfs": "b1"}
    assert manifest.file("boot.img") == manifest.files[0]
    assert manifest.file("nope") is None


def test_envelope_is_dsse() -> None:
    envelope = signed()
    assert envelope["payloadType"] == PAYLOAD_TYPE
    assert base64.b64decode(str(envelope["payload"])) == encode(body())
    signatures = envelope["signatures"]
    assert isinstance(signatures, list) and len(signatures) == 1
    sig = signatures[0]
    assert sig["keyid"] == KEY_ID
    public = load_public_key(KEY[1])
    public.verify(base64.b64decode(sig["sig"]), pae(PAYLOAD_TYPE, encode(body())))


def test_pae_matches_the_dsse_spec_example() -> None:
    expected = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    assert pae("http://example.com/HelloWorld", b"hello world") == expected


def test_key_id_is_the_sha256_of_the_raw_key() -> None:
    public = load_public_key(KEY[1])
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert KEY_ID == hashlib.sha256(raw).hexdigest()[:16] == key_id(public)
    assert KEY_ID != OTHER_ID


def test_unknown_signatures_are_ignored_when_a_trusted_one_verifies() -> None:
    envelope = signed()
    stranger = signed(key=OTHER)["signatures"]
    assert isinstance(stranger, list) and isinstance(envelope["signatures"], list)
    envelope["signatures"] = stranger + envelope["signatures"]
    assert verify_envelope(encode(envelope), ring(KEY)).version == "a1b1"


def test_signature_without_keyid_is_tried_against_every_trusted_key() -> None:
    envelope = signed()
    envelope["signatures"] = [{"sig": envelope["signatures"][0]["sig"]}]  # type: ignore[index]
    assert verify_envelope(encode(envelope), ring(OTHER, KEY)).version == "a1b1"


def test_url_safe_base64_is_accepted() -> None:
    envelope = signed()
    envelope["payload"] = base64.urlsafe_b64encode(encode(body())).decode()
    assert verify_envelope(encode(envelope), ring(KEY)).version == "a1b1"


def test_sign_refuses_an_invalid_body() -> None:
    assert "schema" in refusal(lambda: sign_manifest(encode(body(schema=2)), KEY[0]))


def _tampered_payload() -> bytes:
    envelope = signed()
    envelope["payload"] = b64(encode(body(version="a9b9")))
    return encode(envelope)


def _tampered_signature() -> bytes:
    envelope = signed()
    sig = envelope["signatures"][0]  # type: ignore[index]
    raw = bytearray(base64.b64decode(sig["sig"]))
    raw[0] ^= 1
    sig["sig"] = b64(bytes(raw))
    return encode(envelope)


def _revoked_key_claiming_another_id() -> bytes:
    envelope = signed()
    envelope["signatures"][0]["keyid"] = OTHER_ID  # type: ignore[index]
    return encode(envelope)


def _with(**changes: object) -> bytes:
    return encode(_apply(signed(), changes))


def _with_signature(**changes: object) -> bytes:
    envelope = signed()
    sig = envelope["signatures"][0]  # type: ignore[index]
    envelope["signatures"] = [_apply(sig, changes)]
    return encode(envelope)


VERIFY_REFUSALS: Final[list[tuple[str, Callable[[], bytes], Keyring, str]]] = [
    ("tampered payload", _tampered_payload, ring(KEY), f"key {KEY_ID} does not verify"),
    ("tampered signature", _tampered_signature, ring(KEY), f"key {KEY_ID} does not verify"),
    (
        "unknown key",
        lambda: encode(signed(key=OTHER)),
        ring(KEY),
        f"no trusted key signed this manifest (signed by '{OTHER_ID}'",
    ),
    (
        "revoked key",
        lambda: encode(signed()),
        ring(KEY, OTHER, revoked=(KEY_ID,)),
        f"signed by key {KEY_ID}, which is revoked",
    ),
    (
        "revoked key under a trusted key's id",
        _revoked_key_claiming_another_id,
        ring(KEY, OTHER, revoked=(KEY_ID,)),
        f"signed by key {KEY_ID}, which is revoked",
    ),
    (
        "wrong payloadType",
        lambda: _with(payloadType="application/vnd.in-toto+json"),
        ring(KEY),
        "payloadType 'application/vnd.in-toto+json' is not",
    ),
    ("not JSON", lambda: b"{", ring(KEY), "not valid JSON"),
    ("not UTF-8", lambda: b'{"a": "\xff"}', ring(KEY), "not UTF-8"),
    ("an array", lambda: b"[]", ring(KEY), "must be a JSON object, not array"),
    ("no payload", lambda: _with(payload=DROP), ring(KEY), "payload is missing"),
    ("no signatures", lambda: _with(signatures=DROP), ring(KEY), "signatures is missing"),
    ("unknown field", lambda: _with(extra=1), ring(KEY), "unknown key 'extra'"),
    ("empty signatures", lambda: _with(signatures=[]), ring(KEY), "needs 1..16 signatures"),
    ("signatures object", lambda: _with(signatures={}), ring(KEY), "must be an array"),
    ("payload number", lambda: _with(payload=1), ring(KEY), "payload must be a base64 string"),
    ("payload not base64", lambda: _with(payload="a*b="), ring(KEY), "payload is not base64"),
    ("payload unpadded", lambda: _with(payload="YWJj" + "YQ"), ring(KEY), "is not base64"),
    ("sig missing", lambda: _with_signature(sig=DROP), ring(KEY), "sig is missing"),
    ("sig not base64", lambda: _with_signature(sig="@@@@"), ring(KEY), "sig is not base64"),
    ("sig too long", lambda: _with_signature(sig="A" * 2000), ring(KEY), "more than 1024"),
    ("keyid number", lambda: _with_signature(keyid=5), ring(KEY), "keyid must be"),
    ("signature unknown key", lambda: _with_signature(cert="x"), ring(KEY), "unknown key 'cert'"),
    ("signature a string", lambda: _with(signatures=["x"]), ring(KEY), "must be an object"),
    (
        "17 signatures",
        lambda: _with(signatures=signed()["signatures"] * 17),  # type: ignore[operator]
        ring(KEY),
        "needs 1..16 signatures",
    ),
    ("NaN", lambda: b'{"payload": NaN}', ring(KEY), "NaN is not a JSON value"),
    ("duplicate keys", lambda: b'{"a": 1, "a": 2}', ring(KEY), "duplicate key 'a'"),
    (
        "deep nesting",
        lambda: b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1),
        ring(KEY),
        "deeper than 8",
    ),
    (
        "too large",
        lambda: b" " * (MAX_ENVELOPE_BYTES + 1),
        ring(KEY),
        f"more than {MAX_ENVELOPE_BYTES}",
    ),
    (
        "payload too large",
        lambda: _with(payload=b64(b" " * (MAX_MANIFEST_BYTES + 3))),
        ring(KEY),
        "more than",
    ),
    (
        "a signed payload that is no manifest",
        lambda: envelope_with(encode(body(files=[]))),
        ring(KEY),
        "manifest field files: must list 1..20 files, not 0",
    ),
]


@pytest.mark.parametrize(
    ("envelope", "keyring", "expected"),
    [row[1:] for row in VERIFY_REFUSALS],
    ids=[row[0] for row in VERIFY_REFUSALS],
)
def test_verify_refusals(envelope: Callable[[], bytes], keyring: Keyring, expected: str) -> None:
    message = refusal(lambda: verify_envelope(envelope(), keyring))
    assert expected in message


def test_manifest_error_is_a_verification_failure() -> None:
    with pytest.raises(ManifestError) as info:
        verify_envelope(encode(signed(key=OTHER)), ring(KEY))
    assert isinstance(info.value, VerificationError)
    assert (info.value.step, info.value.exit_code) == (-3, 4)


# --- the manifest body ---------------------------------------------------------------------------


def test_parse_manifest_normalizes_digests_and_reads_the_flags() -> None:
    manifest = parse_manifest(
        encode(body(files=[file_entry(sha256=SHA_BOOT.upper())], allow_downgrade=True))
    )
    assert manifest.files[0].sha256 == SHA_BOOT
    assert manifest.allow_downgrade is True


def test_manifest_to_json_round_trips() -> None:
    manifest = parse_manifest(encode(body()))
    assert parse_manifest(manifest_to_json(manifest)) == manifest


def _files(*entries: dict[str, object]) -> dict[str, object]:
    return body(files=list(entries))


def _file(**changes: object) -> dict[str, object]:
    return _files(file_entry(**changes))


MANIFEST_REFUSALS: Final[list[tuple[str, object, str]]] = [
    ("schema 2", body(schema=2), "unsupported schema 2"),
    ("schema string", body(schema="1"), "schema: must be an integer, not string"),
    ("no schema", body(schema=DROP), "schema: is missing"),
    ("no version", body(version=DROP), "version: is missing"),
    ("no created", body(created=DROP), "created: is missing"),
    ("unknown key", body(signer="me"), "unknown key 'signer'"),
    ("version space", body(version="a1 b1"), "printable ASCII without whitespace"),
    ("version unicode", body(version="a1b\u00e9"), "printable ASCII without whitespace"),
    ("version long", body(version="v" * 65), "must be 1..64 chars, not 65"),
    ("version empty", body(version=""), "must be 1..64 chars, not 0"),
    ("boards empty", body(boards=[]), "boards: must list 1..32 board models, not 0"),
    ("boards 33", body(boards=["b"] * 33), "not 33"),
    ("boards string", body(boards=PI4), "must be an array of board models"),
    ("board number", body(boards=[4]), "boards[0]: must be a string, not integer"),
    ("board control char", body(boards=["Pi\n4"]), "printable"),
    ("files empty", _files(), "must list 1..20 files, not 0"),
    (
        "files 21",
        _files(*(file_entry(name=f"f{i}", target=f"t{i}") for i in range(MAX_FILES + 1))),
        "not 21",
    ),
    ("files object", body(files={}), "files: must be an array, not object"),
    ("file a string", body(files=["boot.img"]), "files[0]: must be an object, not string"),
    ("file unknown key", _file(url="https://x/y"), "unknown key 'url'"),
    ("file no sha256", _file(sha256=DROP), "files[0].sha256: is missing"),
    ("name slash", _file(name="a/b"), "must not contain / or \\"),
    ("name backslash", _file(name="a\\b"), "must not contain / or \\"),
    ("name NUL", _file(name="a\0b"), "non-printable"),
    ("name dot", _file(name="."), "'.' is not allowed"),
    ("name dotdot", _file(name=".."), "'..' is not allowed"),
    ("name long", _file(name="n" * 256), "1..255 chars, not 256"),
    ("name empty", _file(name=""), "1..255 chars, not 0"),
    ("name of the manifest", _file(name=MANIFEST_NAME), "the manifest's own name"),
    (
        "duplicate name",
        _files(file_entry(), file_entry(target="other")),
        "files[1].name: duplicates files[0].name 'boot.img'",
    ),
    (
        "duplicate target",
        _files(file_entry(), file_entry(name="other.img")),
        "files[1].target: duplicates files[0].target 'boot'",
    ),
    ("size 0", _file(size=0), "size: must be 1..68719476736 bytes, not 0"),
    ("size too big", _file(size=MAX_FILE_SIZE + 1), "not 68719476737"),
    ("size negative", _file(size=-1), "not -1"),
    ("size bool", _file(size=True), "must be an integer, not boolean"),
    ("size float", _file(size=4.0), "must be an integer, not number"),
    ("sha256 short", _file(sha256=SHA_BOOT[:63]), "must be 64 hex digits"),
    ("sha256 not hex", _file(sha256="g" * 64), "must be 64 hex digits"),
    ("target upper", _file(target="Boot"), "must match [a-z0-9][a-z0-9_-]*"),
    ("target long", _file(target="t" * 65), "at most 64 chars"),
    ("file version space", _file(version="a 1"), "files[0].version"),
    ("created garbage", body(created="yesterday"), "'yesterday' is not an ISO 8601 time"),
    ("created no zone", body(created="2024-05-01T12:00:00"), "has no time zone"),
    ("created number", body(created=1714564800), "must be a string, not integer"),
    ("created long", body(created="2024-05-01T12:00:00+00:00" + " " * 60), "not an ISO"),
    ("downgrade string", body(allow_downgrade="no"), "must be true or false, not string"),
    ("downgrade null", body(allow_downgrade=None), "must be true or false, not null"),
    ("an array", [], "must be a JSON object, not array"),
    ("a number", 1, "must be a JSON object, not integer"),
]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [row[1:] for row in MANIFEST_REFUSALS],
    ids=[row[0] for row in MANIFEST_REFUSALS],
)
def test_manifest_refusals(doc: object, expected: str) -> None:
    assert expected in refusal(lambda: parse_manifest(encode(doc)))


DOCUMENT_REFUSALS: Final[list[tuple[str, object, str]]] = [
    ("too large", b" " * (MAX_MANIFEST_BYTES + 1), f"more than {MAX_MANIFEST_BYTES}"),
    ("deep", b'{"a":' * (MAX_DEPTH + 1) + b"1" + b"}" * (MAX_DEPTH + 1), "deeper than 8"),
    ("very deep", b"[" * 60_000, "deeper than 8"),
    ("NaN", b'{"schema": NaN}', "NaN is not a JSON value"),
    ("Infinity", b'{"schema": -Infinity}', "-Infinity is not a JSON value"),
    ("huge float", b'{"schema": 1e999}', "out of range"),
    ("huge integer", b'{"schema": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ("duplicate key", b'{"schema": 1, "schema": 1}', "duplicate key 'schema'"),
    ("not UTF-8", b'{"version": "\xc3"}', "not UTF-8"),
    ("BOM", b"\xef\xbb\xbf{}", "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("a string", "{}", "must be bytes, not str"),
]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [row[1:] for row in DOCUMENT_REFUSALS],
    ids=[row[0] for row in DOCUMENT_REFUSALS],
)
def test_document_refusals(raw: bytes, expected: str) -> None:
    assert expected in refusal(lambda: parse_manifest(raw))


def test_depth_scan_ignores_brackets_in_strings() -> None:
    doc = body(boards=["[[[[[[[[[[{{{{{{{{{{" * 3])
    assert parse_manifest(encode(doc)).boards == ("[[[[[[[[[[{{{{{{{{{{" * 3,)


# --- keys ----------------------------------------------------------------------------------------


def _rsa_private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return _rsa_private()


def _pem_public(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem_private(key: rsa.RSAPrivateKey, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def test_key_loaders_refuse_other_keys(rsa_key: rsa.RSAPrivateKey) -> None:
    assert "an RSA key, not an Ed25519 key" in refusal(
        lambda: load_public_key(_pem_public(rsa_key))
    )
    assert "an RSA key, not an Ed25519 key" in refusal(
        lambda: load_private_key(_pem_private(rsa_key))
    )
    assert "not a PEM public key" in refusal(lambda: load_public_key(b"garbage"))
    assert "not a PEM private key" in refusal(lambda: load_private_key(KEY[1]))
    assert "20000 bytes, more than 16384" in refusal(lambda: load_public_key(b"x" * 20_000))
    encrypted = load_private_key(KEY[0]).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    assert "encrypted private keys are not supported" in refusal(
        lambda: load_private_key(encrypted)
    )


def test_generated_keys_load() -> None:
    private = load_private_key(KEY[0])
    assert key_id(private.public_key()) == KEY_ID
    assert KEY[0].startswith(b"-----BEGIN PRIVATE KEY-----")
    assert KEY[1].startswith(b"-----BEGIN PUBLIC KEY-----")


def test_keyring_from_keys_refuses_empty_and_all_revoked() -> None:
    assert "holds no public keys" in refusal(lambda: Keyring.from_public_keys([]))
    assert "every key is revoked" in refusal(lambda: ring(KEY, revoked=(KEY_ID,)))
    keyring = ring(KEY, OTHER, revoked=(OTHER_ID,))
    assert set(keyring.trusted) == {KEY_ID}
    assert set(keyring.revoked_keys) == {OTHER_ID}


# --- the keyring directory -----------------------------------------------------------------------


@pytest.fixture
def keyring_dir() -> Iterator[Path]:
    """A root-owned 0755 directory under /run (/tmp is 1777, which the keyring refuses)."""
    directory = Path(tempfile.mkdtemp(dir="/run", prefix="keyring-test-"))
    try:
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory)


def put(path: Path, data: bytes, mode: int = 0o644, uid: int = 0) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    os.chown(path, uid, 0)
    return path


@needs_root
def test_keyring_loads_keys_and_revocations(keyring_dir: Path) -> None:
    put(keyring_dir / "vendor-2024.pub", KEY[1])
    put(keyring_dir / "vendor-2023.pub", OTHER[1])
    put(keyring_dir / "README", b"not a key")
    put(keyring_dir / "revoked", f"# leaked in 2024\n\n{OTHER_ID.upper()}  # old laptop\n".encode())
    keyring = Keyring.load(keyring_dir)
    assert set(keyring.trusted) == {KEY_ID}
    assert keyring.revoked == {OTHER_ID}
    assert verify_envelope(encode(signed()), keyring).version == "a1b1"
    assert "which is revoked" in refusal(
        lambda: verify_envelope(encode(signed(key=OTHER)), keyring)
    )


@needs_root
def test_keyring_through_a_root_owned_symlink(keyring_dir: Path) -> None:
    put(keyring_dir / "k.pub", KEY[1])
    link = Path(tempfile.mkdtemp(dir="/run", prefix="keyring-link-"))
    try:
        link.chmod(0o755)
        (link / "keys").symlink_to(keyring_dir)
        assert set(Keyring.load(link / "keys").trusted) == {KEY_ID}
    finally:
        shutil.rmtree(link)


def _setup_dir_mode(mode: int) -> Callable[[Path], Path]:
    def setup(d: Path) -> Path:
        put(d / "k.pub", KEY[1])
        d.chmod(mode)
        return d

    return setup


def _setup_dir_owner(d: Path) -> Path:
    put(d / "k.pub", KEY[1])
    os.chown(d, 1000, 0)
    return d


def _setup_parent_writable(d: Path) -> Path:
    sub = d / "keys"
    sub.mkdir(mode=0o755)
    put(sub / "k.pub", KEY[1])
    d.chmod(0o775)
    return sub


def _setup_file(mode: int = 0o644, uid: int = 0, name: str = "k.pub") -> Callable[[Path], Path]:
    def setup(d: Path) -> Path:
        put(d / name, KEY[1] if name.endswith(".pub") else b"", mode, uid)
        if not name.endswith(".pub"):
            put(d / "k.pub", KEY[1])
        return d

    return setup


def _setup_symlinked_key(d: Path) -> Path:
    put(d / "real", KEY[1])
    (d / "k.pub").symlink_to(d / "real")
    return d


def _setup_key_dir(d: Path) -> Path:
    (d / "k.pub").mkdir()
    return d


def _setup_contents(files: dict[str, bytes]) -> Callable[[Path], Path]:
    def setup(d: Path) -> Path:
        for name, data in files.items():
            put(d / name, data)
        return d

    return setup


KEYRING_REFUSALS: Final[list[tuple[str, Callable[[Path], Path], str]]] = [
    ("group-writable dir", _setup_dir_mode(0o775), "is writable by group (mode 0775)"),
    ("world-writable dir", _setup_dir_mode(0o757), "is writable by others (mode 0757)"),
    ("sticky dir", _setup_dir_mode(0o1755), "has the sticky bit set"),
    ("dir not root's", _setup_dir_owner, "is owned by uid 1000, not root"),
    ("parent writable", _setup_parent_writable, "is writable by group (mode 0775)"),
    ("key writable", _setup_file(mode=0o664), "k.pub is writable by group"),
    ("key not root's", _setup_file(uid=1000), "k.pub is owned by uid 1000, not root"),
    ("revoked writable", _setup_file(mode=0o646, name="revoked"), "revoked is writable by others"),
    ("revoked not root's", _setup_file(uid=1000, name="revoked"), "owned by uid 1000"),
    ("key a symlink", _setup_symlinked_key, "k.pub: a symbolic link"),
    ("key a directory", _setup_key_dir, "k.pub is not a regular file"),
    ("no keys", _setup_contents({"README": b"x"}), "holds no public keys (*.pub)"),
    (
        "all revoked",
        _setup_contents({"k.pub": KEY[1], "revoked": KEY_ID.encode()}),
        "every key is revoked",
    ),
    (
        "bad revoked line",
        _setup_contents({"k.pub": KEY[1], "revoked": b"# ok\n" + KEY_ID.encode() + b"x\n"}),
        f"revoked line 2: '{KEY_ID}x' is not a key id",
    ),
    (
        "not Ed25519",
        _setup_contents({"k.pub": _pem_public(_rsa_private())}),
        "k.pub: an RSA key, not an Ed25519 key",
    ),
    ("not a key", _setup_contents({"k.pub": b"hello"}), "k.pub: not a PEM public key"),
    ("key too large", _setup_contents({"k.pub": b"x" * 20_000}), "larger than 16384 bytes"),
]


@needs_root
@pytest.mark.parametrize(
    ("setup", "expected"),
    [row[1:] for row in KEYRING_REFUSALS],
    ids=[row[0] for row in KEYRING_REFUSALS],
)
def test_keyring_refusals(keyring_dir: Path, setup: Callable[[Path], Path], expected: str) -> None:
    directory = setup(keyring_dir)
    assert expected in refusal(lambda: Keyring.load(directory))


def test_keyring_under_tmp_is_refused(tmp_path: Path) -> None:
    (tmp_path / "k.pub").write_bytes(KEY[1])
    message = refusal(lambda: Keyring.load(tmp_path))
    assert message.startswith(f"keyring {tmp_path} refused: ")
    if str(tmp_path).startswith("/tmp/"):
        assert "/tmp has the sticky bit set" in message


def test_missing_keyring_is_refused() -> None:
    assert "No such file or directory" in refusal(lambda: Keyring.load(Path("/run/no-such-ring")))


# --- the task against the manifest ---------------------------------------------------------------


def task_doc(**changes: object) -> dict[str, object]:
    """A SHA-256 task for body(): the manifest first, then both files."""
    files: list[dict[str, object]] = [
        {
            "fileName": MANIFEST_NAME,
            "fileSize": 900,
            "fileUrl": "https://h/m",
            "fileSign": "a" * 64,
        },
        {"fileName": "boot.img", "fileSize": 4, "fileUrl": "https://h/b", "fileSign": SHA_BOOT},
        {"fileName": "rootfs.img", "fileSize": 4, "fileUrl": "https://h/r", "fileSign": SHA_ROOT},
    ]
    base: dict[str, object] = {"version": "a1b1", "signMethod": "SHA256", "files": files}
    return _apply(base, changes)


def _task_files(edit: Callable[[list[dict[str, object]]], object]) -> dict[str, object]:
    doc = task_doc()
    files = doc["files"]
    assert isinstance(files, list)
    edit(files)
    return doc


def test_task_matching_the_manifest_passes() -> None:
    manifest = parse_manifest(encode(body()))
    check_task_against_manifest(parse_task(task_doc()), manifest)
    # Without the manifest's own entry too (the engine may strip it).
    check_task_against_manifest(parse_task(_task_files(lambda f: f.pop(0))), manifest)


def test_md5_tasks_are_checked_by_name_and_size() -> None:
    def md5(files: list[dict[str, object]]) -> None:
        for entry in files:
            entry["fileSign"] = hashlib.md5(str(entry["fileName"]).encode()).hexdigest()

    doc = _task_files(md5)
    doc["signMethod"] = "Md5"
    check_task_against_manifest(parse_task(doc), parse_manifest(encode(body())))


TASK_MISMATCHES: Final[list[tuple[str, dict[str, object], str, str]]] = [
    (
        "missing file",
        _task_files(lambda f: f.pop(2)),
        "rootfs.img",
        "file rootfs.img: is listed in the manifest but missing from the task",
    ),
    (
        "extra file",
        _task_files(
            lambda f: f.append(
                {
                    "fileName": "evil.sh",
                    "fileSize": 1,
                    "fileUrl": "https://h/e",
                    "fileSign": "b" * 64,
                }
            )
        ),
        "evil.sh",
        "file evil.sh: is not listed in the manifest",
    ),
    (
        "size",
        _task_files(lambda f: f[1].update(fileSize=10)),
        "boot.img",
        "file boot.img: size 10 != 4 in the manifest",
    ),
    (
        "digest",
        _task_files(lambda f: f[1].update(fileSign=SHA_ROOT)),
        "boot.img",
        f"file boot.img: SHA-256 {SHA_ROOT} != {SHA_BOOT} in the manifest",
    ),
    (
        "version",
        task_doc(version="a1b2"),
        "",
        "the task is version 'a1b2' but the manifest says 'a1b1'",
    ),
]


@pytest.mark.parametrize(
    ("doc", "file_name", "expected"),
    [row[1:] for row in TASK_MISMATCHES],
    ids=[row[0] for row in TASK_MISMATCHES],
)
def test_task_mismatches(doc: dict[str, object], file_name: str, expected: str) -> None:
    with pytest.raises(ManifestError) as info:
        check_task_against_manifest(parse_task(doc), parse_manifest(encode(body())))
    assert str(info.value) == expected
    assert info.value.file_name == (file_name or None)
    assert info.value.step == -3


# --- the board -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [b"Raspberry Pi 4 Model B Rev 1.4\0", b"Raspberry Pi 4 Model B\0", b"Raspberry Pi 5 Model B"],
)
def test_board_listed(tmp_path: Path, model: bytes) -> None:
    (tmp_path / "model").write_bytes(model)
    check_board(parse_manifest(encode(body())), tmp_path / "model")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            b"Raspberry Pi 3 Model B Plus Rev 1.3\0",
            "this board (Raspberry Pi 3 Model B Plus Rev 1.3) is not one the package is for: "
            "Raspberry Pi 4 Model B, Raspberry Pi 5 Model B",
        ),
        (b"Raspberry Pi 4 Model B2\0", "this board (Raspberry Pi 4 Model B2) is not one"),
        (b"\0", "holds no usable board model"),
        (b"\xff\xfe\0", "is not UTF-8"),
    ],
)
def test_board_refused(tmp_path: Path, model: bytes, expected: str) -> None:
    (tmp_path / "model").write_bytes(model)
    assert expected in refusal(
        lambda: check_board(parse_manifest(encode(body())), tmp_path / "model")
    )


def test_board_model_unreadable(tmp_path: Path) -> None:
    message = refusal(lambda: check_board(parse_manifest(encode(body())), tmp_path / "none"))
    assert f"cannot read the board model from {tmp_path / 'none'}" in message


# --- digestsign ----------------------------------------------------------------------------------


def _digestsign(key: rsa.RSAPrivateKey, digest: str) -> str:
    return b64(key.sign(bytes.fromhex(digest), padding.PKCS1v15(), hashes.SHA256()))


@pytest.mark.parametrize("digest", [SHA_BOOT, hashlib.md5(b"boot").hexdigest()])
def test_digestsign_valid(rsa_key: rsa.RSAPrivateKey, digest: str) -> None:
    verify_digestsign(digest, _digestsign(rsa_key, digest), _pem_public(rsa_key))
    verify_digestsign(digest.upper(), _digestsign(rsa_key, digest), _pem_public(rsa_key))


def test_digestsign_refusals(rsa_key: rsa.RSAPrivateKey) -> None:
    sig = _digestsign(rsa_key, SHA_BOOT)
    pem = _pem_public(rsa_key)
    assert "digestsign does not verify" in refusal(lambda: verify_digestsign(SHA_ROOT, sig, pem))
    other = _pem_public(_rsa_private())
    assert "digestsign does not verify" in refusal(lambda: verify_digestsign(SHA_BOOT, sig, other))
    assert "not base64" in refusal(lambda: verify_digestsign(SHA_BOOT, "!!!!", pem))
    assert "32 or 64 hex digits" in refusal(lambda: verify_digestsign("abc", sig, pem))
    assert "not hexadecimal" in refusal(lambda: verify_digestsign("z" * 64, sig, pem))
    ed = load_private_key(KEY[0])
    assert "an Ed25519 key, not an RSA key" in refusal(
        lambda: verify_digestsign(SHA_BOOT, sig, _pem_public(ed))
    )
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert "RSA-1024 is too weak" in refusal(
        lambda: verify_digestsign(SHA_BOOT, _digestsign(weak, SHA_BOOT), _pem_public(weak))
    )


# --- properties ----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=25,
)
hex_sha256 = st.text("0123456789abcdef", min_size=64, max_size=64)
versions = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64)
printable_text = st.text(
    st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")),
    min_size=1,
    max_size=40,
).filter(str.isprintable)
file_names = printable_text.map(lambda s: s.replace("/", "_").replace("\\", "_")).filter(
    lambda s: s not in (".", "..", MANIFEST_NAME)
)
targets = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True)
zones = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    """A random valid Manifest, as parse_manifest would return it."""
    names = draw(st.lists(file_names, min_size=1, max_size=MAX_FILES, unique=True))
    names_targets = draw(st.lists(targets, min_size=len(names), max_size=len(names), unique=True))
    files = tuple(
        ManifestFile(
            name=name,
            size=draw(st.integers(1, MAX_FILE_SIZE)),
            sha256=draw(hex_sha256),
            version=draw(versions),
            target=target,
        )
        for name, target in zip(names, names_targets, strict=True)
    )
    return Manifest(
        version=draw(versions),
        boards=tuple(draw(st.lists(printable_text, min_size=1, max_size=32))),
        files=files,
        created=draw(st.datetimes(datetime(2000, 1, 1), datetime(2200, 1, 1), timezones=zones)),
        allow_downgrade=draw(st.booleans()),
    )


@PROPERTY_SETTINGS
@given(manifests())
def test_valid_manifests_round_trip_through_an_envelope(manifest: Manifest) -> None:
    raw = manifest_to_json(manifest)
    assert parse_manifest(raw) == manifest
    assert verify_envelope(sign_manifest(raw, KEY[0]), ring(KEY)) == manifest


def _returns_or_refuses(call: Callable[[], object]) -> None:
    with contextlib.suppress(ManifestError):
        call()


@PROPERTY_SETTINGS
@given(st.binary(max_size=400))
def test_any_bytes_give_a_manifest_or_a_manifest_error(raw: bytes) -> None:
    _returns_or_refuses(lambda: parse_manifest(raw))
    _returns_or_refuses(lambda: verify_envelope(raw, ring(KEY)))


@PROPERTY_SETTINGS
@given(json_values)
def test_any_json_gives_a_manifest_or_a_manifest_error(value: object) -> None:
    raw = json.dumps(value).encode()  # NaN and Infinity included
    _returns_or_refuses(lambda: parse_manifest(raw))
    _returns_or_refuses(lambda: verify_envelope(raw, ring(KEY)))
    _returns_or_refuses(lambda: verify_envelope(envelope_with(raw), ring(KEY)))


@PROPERTY_SETTINGS
@given(st.sampled_from(list(body())), json_values, st.data())
def test_near_valid_manifests_give_a_manifest_or_a_manifest_error(
    key: str, value: object, data: st.DataObject
) -> None:
    """One field of a valid body (or of its first file) replaced by any JSON value."""
    doc = body(**{key: value})
    if data.draw(st.booleans()):
        field = data.draw(st.sampled_from(list(file_entry())))
        doc = body(files=[file_entry(**{field: value})])
    raw = json.dumps(doc).encode()
    _returns_or_refuses(lambda: parse_manifest(raw))
    _returns_or_refuses(lambda: verify_envelope(envelope_with(raw), ring(KEY)))


@PROPERTY_SETTINGS
@given(st.sampled_from(["payloadType", "payload", "signatures", "extra"]), json_values)
def test_near_valid_envelopes_give_a_manifest_or_a_manifest_error(key: str, value: object) -> None:
    raw = encode(_apply(signed(), {key: value}))
    _returns_or_refuses(lambda: verify_envelope(raw, ring(KEY)))


@PROPERTY_SETTINGS
@given(st.dictionaries(st.sampled_from(["keyid", "sig", "x"]), json_values, max_size=3))
def test_any_signature_entry_gives_a_manifest_or_a_manifest_error(
    entry: dict[str, object],
) -> None:
    envelope = signed()
    envelope["signatures"] = [entry]
    _returns_or_refuses(lambda: verify_envelope(encode(envelope), ring(KEY)))
