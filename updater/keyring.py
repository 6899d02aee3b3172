"""The device's trust: Ed25519 keys and the keyring of public keys a package must be signed by.

A keyring is a root-owned directory of ``*.pub`` files (several, so a vendor can rotate keys:
ship the new key in one update, sign with it from the next) and an optional ``revoked`` file of
key ids that must never be accepted again, even while their ``.pub`` is still on file. Whoever
can write there decides what the device installs, so the directory, every directory above it
and every file read follow the rules of hook programs (:func:`updater.hooks.check_trusted`).

Key ids are 16 hex digits of the SHA-256 of the raw public key: short, stable and the same
whatever tool computes them. A signature's key id is only a hint; what decides is which key
verifies it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Final, NoReturn

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from updater.errors import ManifestError

# One rule set for "who may have written this": the same as for hook programs.
from updater.hooks import _ownership_problems, resolve_trusted_path

MAX_KEY_FILE_BYTES: Final = 16 * 1024
MAX_REVOKED_BYTES: Final = 64 * 1024
MAX_KEYS: Final = 64
KEY_ID_CHARS: Final = 16
_KEY_ID_RE: Final = re.compile(r"[0-9a-f]{16}")


def _preview(value: object, limit: int = 40) -> str:
    """A short repr: messages echo hostile input, so never at full length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- keys ----------------------------------------------------------------------------------------


def generate_key() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PKCS#8 PEM, public SubjectPublicKeyInfo PEM)."""
    private = ed25519.Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return private_pem, _public_pem(private.public_key())


def _public_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(key: ed25519.Ed25519PublicKey) -> str:
    """16 hex chars of the SHA-256 of the raw public key: short, stable, tool-independent."""
    # public_bytes(Raw, Raw) rather than public_bytes_raw(): the latter needs cryptography 40.
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_CHARS]


def load_private_key(pem: bytes, source: str = "private key") -> ed25519.Ed25519PrivateKey:
    """An unencrypted Ed25519 private key in PEM; anything else is refused by name."""
    _check_pem_size(pem, source)
    try:
        key = serialization.load_pem_private_key(bytes(pem), password=None)
    except TypeError as err:  # encrypted, and no password given
        raise ManifestError(f"{source}: encrypted private keys are not supported") from err
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ManifestError(f"{source}: not a PEM private key") from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ManifestError(f"{source}: an {_key_kind(key)} key, not an Ed25519 key")
    return key


def load_public_key(pem: bytes, source: str = "public key") -> ed25519.Ed25519PublicKey:
    """An Ed25519 public key in PEM (SubjectPublicKeyInfo); anything else is refused by name."""
    _check_pem_size(pem, source)
    try:
        key = serialization.load_pem_public_key(bytes(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ManifestError(f"{source}: not a PEM public key") from err
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ManifestError(f"{source}: an {_key_kind(key)} key, not an Ed25519 key")
    return key


def public_key_id(public_pem: bytes) -> str:
    """The key id of a PEM public key (what ``keygen`` prints and ``revoked`` lists)."""
    return key_id(load_public_key(public_pem))


def _check_pem_size(pem: object, source: str) -> None:
    if not isinstance(pem, bytes | bytearray):
        raise ManifestError(f"{source}: must be PEM bytes, not {type(pem).__name__}")
    if len(pem) > MAX_KEY_FILE_BYTES:
        raise ManifestError(f"{source}: {len(pem)} bytes, more than {MAX_KEY_FILE_BYTES}")


def _key_kind(key: object) -> str:
    """A key's algorithm by name, the same whatever the cryptography version's class names."""
    kinds: tuple[tuple[type, str], ...] = (
        (rsa.RSAPublicKey, "RSA"),
        (rsa.RSAPrivateKey, "RSA"),
        (ec.EllipticCurvePublicKey, "EC"),
        (ec.EllipticCurvePrivateKey, "EC"),
        (ed25519.Ed25519PublicKey, "Ed25519"),
        (ed25519.Ed25519PrivateKey, "Ed25519"),
    )
    return next((name for kind, name in kinds if isinstance(key, kind)), type(key).__name__)


# --- the keyring ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Keyring:
    """Trusted public keys by key id, and the ids that must never be accepted again.

    ``revoked_keys`` holds the public keys still on file whose ids are revoked: a signature
    they verify is refused whatever key id it claims (key ids are unauthenticated hints).
    """

    trusted: Mapping[str, ed25519.Ed25519PublicKey]
    revoked: frozenset[str]
    revoked_keys: Mapping[str, ed25519.Ed25519PublicKey]
    source: str = "keyring"

    @classmethod
    def from_public_keys(
        cls, pems: Iterable[bytes], revoked: Iterable[str] = (), source: str = "keyring"
    ) -> Keyring:
        """A keyring from PEM public keys; an empty result (nothing left trusted) is refused."""
        return cls._build([(f"{source}: public key", pem) for pem in pems], revoked, source)

    @classmethod
    def load(cls, directory: Path) -> Keyring:
        """Every ``*.pub`` in ``directory`` and its ``revoked`` file (ids, one a line, # comments).

        The directory, every directory above it and every file read must be owned by root and
        writable by no one else (the rules of hook programs): whoever can write a key there
        decides what the device installs.
        """
        source = f"keyring {directory}"
        real = _trusted_directory(str(directory), source)
        try:
            names = sorted(entry.name for entry in Path(real).iterdir())
        except OSError as err:
            raise ManifestError(f"{source}: cannot list: {err.strerror or err}") from err
        pub_names = [name for name in names if name.endswith(".pub")]
        if len(pub_names) > MAX_KEYS:
            raise ManifestError(f"{source}: {len(pub_names)} keys, more than {MAX_KEYS}")
        pems = [
            (f"{source}: {name}", _read_trusted_file(f"{real}/{name}", MAX_KEY_FILE_BYTES, source))
            for name in pub_names
        ]
        revoked: list[str] = []
        if "revoked" in names:
            text = _read_trusted_file(f"{real}/revoked", MAX_REVOKED_BYTES, source)
            revoked = _parse_revoked(text, f"{source}: revoked")
        return cls._build(pems, revoked, source)

    @classmethod
    def _build(cls, pems: list[tuple[str, bytes]], revoked: Iterable[str], source: str) -> Keyring:
        revoked_ids = frozenset(kid.lower() for kid in revoked)
        keys = {}
        for where, pem in pems:
            key = load_public_key(pem, where)
            keys[key_id(key)] = key  # the same key twice is harmless
        if not keys:
            raise ManifestError(f"{source} holds no public keys (*.pub)")
        trusted = {kid: key for kid, key in keys.items() if kid not in revoked_ids}
        if not trusted:
            raise ManifestError(f"{source}: every key is revoked ({', '.join(sorted(keys))})")
        return cls(
            trusted=MappingProxyType(trusted),
            revoked=revoked_ids,
            revoked_keys=MappingProxyType(
                {kid: key for kid, key in keys.items() if kid in revoked_ids}
            ),
            source=source,
        )


def _parse_revoked(data: bytes, where: str) -> list[str]:
    """Key ids, one a line; ``#`` starts a comment. A typo must not leave a key trusted."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{where}: not UTF-8") from err
    ids = []
    for number, line in enumerate(text.splitlines(), 1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        if not _KEY_ID_RE.fullmatch(word.lower()):
            raise ManifestError(
                f"{where} line {number}: {_preview(word)} is not a key id "
                f"({KEY_ID_CHARS} hex digits)"
            )
        ids.append(word.lower())
    return ids


def _trusted_directory(path: str, source: str) -> str:
    """Resolve ``path`` as hooks.check_trusted does for programs (every directory on the way and
    every symbolic link followed checked); the keyring itself must be such a directory too."""

    def refuse(why: str) -> NoReturn:
        raise ManifestError(f"{source} refused: {why}")

    if not path.startswith("/"):
        path = f"{Path.cwd()}/{path}"
    if not os.path.lexists(path):
        refuse(f"{path}: No such file or directory")
    resolved, st = resolve_trusted_path(path, refuse)
    if not stat.S_ISDIR(st.st_mode):
        refuse(f"{resolved} is not a directory")
    problems = _ownership_problems(resolved, st, directory=True)
    if problems:
        refuse("; ".join(problems))
    return resolved


def _read_trusted_file(path: str, limit: int, source: str) -> bytes:
    """Read a regular, root-owned file not writable by others; symbolic links are refused.

    Checked on the open descriptor (fstat), so what is checked is what is read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        why = "a symbolic link" if err.errno == errno.ELOOP else (err.strerror or str(err))
        raise ManifestError(f"{source} refused: {path}: {why}") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError(f"{source} refused: {path} is not a regular file")
        problems = _ownership_problems(path, st, directory=False)
        if problems:
            raise ManifestError(f"{source} refused: {'; '.join(problems)}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise ManifestError(f"{source}: cannot read {path}: {err.strerror or err}") from err
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ManifestError(f"{source} refused: {path} is larger than {limit} bytes")
    return data


def read_trusted_file(path: str, limit: int, source: str) -> bytes:
    """A single root-owned file (a product's public key named in the configuration): the
    directories on its way and any symbolic link followed are checked as for a keyring."""

    def refuse(why: str) -> NoReturn:
        raise ManifestError(f"{source} refused: {why}")

    if not path.startswith("/"):
        refuse(f"{path} is not an absolute path")
    if not os.path.lexists(path):
        refuse(f"{path}: No such file or directory")
    resolved, _ = resolve_trusted_path(path, refuse)
    return _read_trusted_file(resolved, limit, source)
