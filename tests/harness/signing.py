"""A vendor for tests: a signing key, the device's keyring, and packages built by the real
``rpi-updater bundle`` code and served by nginx.

The keyring must be root-owned all the way up (the updater refuses anything else), so it lives
in a directory the ``trusted_dir`` fixture made under /run, never under pytest's /tmp.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from tests.harness.device import BOARD_MODEL
from tests.harness.nginx import Docroot
from updater.bundle import NO_COMPRESSION, PayloadFile, build_bundle
from updater.encode import Compression
from updater.keyring import generate_key, public_key_id
from updater.manifest import MANIFEST_NAME, Manifest, ManifestFile, manifest_to_json, sign_manifest
from updater.task import DigestMethod


class Server(Protocol):
    """nginx, or the fault proxy in front of it: what a package's URLs point at."""

    def url(self, name: str) -> str: ...


BOARD = BOARD_MODEL.rsplit(" Rev ", 1)[0]  # vendors list models; a revision matches its model


@dataclass(frozen=True)
class Key:
    private_pem: bytes
    public_pem: bytes

    @property
    def key_id(self) -> str:
        return public_key_id(self.public_pem)

    @classmethod
    def new(cls) -> Key:
        private, public = generate_key()
        return cls(private, public)


@dataclass
class Package:
    """A published package: the task to push, and where its files are served from."""

    task: dict[str, object]
    directory: Path  # in nginx's docroot
    prefix: str  # URL path prefix of the files

    def served(self, name: str) -> Path:
        return self.directory / name


@dataclass
class Vendor:
    key: Key
    keyring: Path
    work: Path  # scratch space for the files a package is built from

    @classmethod
    def create(cls, trusted_dir: Path, work: Path) -> Vendor:
        keyring = trusted_dir / "keyring"
        keyring.mkdir(mode=0o755)
        vendor = cls(Key.new(), keyring, work)
        vendor.trust(vendor.key)
        return vendor

    def trust(self, key: Key, name: str | None = None) -> None:
        path = self.keyring / f"{name or key.key_id}.pub"
        path.write_bytes(key.public_pem)
        path.chmod(0o644)

    def revoke(self, key: Key) -> None:
        path = self.keyring / "revoked"
        old = path.read_text() if path.exists() else ""
        path.write_text(f"{old}{key.key_id}  # revoked by the test\n")
        path.chmod(0o644)

    def publish(
        self,
        docroot: Docroot,
        server: Server,
        files: Sequence[tuple[str, bytes, str, str]],
        *,
        version: str | None = None,
        boards: Sequence[str] = (BOARD,),
        sign_method: DigestMethod = "sha256",
        allow_downgrade: bool = False,
        key: Key | None = None,
        compression: Compression = NO_COMPRESSION,
    ) -> Package:
        """Bundle ``files`` (name, content, target, version) and serve the package.

        The package version defaults to the files' versions concatenated, as the bundle tool
        requires.
        """
        token = secrets.token_hex(4)
        src = self.work / f"src-{token}"
        src.mkdir(parents=True)
        payload = []
        for name, content, target, file_version in files:
            (src / name).write_bytes(content)
            payload.append(PayloadFile(src / name, target, file_version))
        out = self.work / f"pkg-{token}"
        prefix = f"pkg-{token}"
        build_bundle(
            payload,
            private_pem=(key or self.key).private_pem,
            out_dir=out,
            version=version or "".join(f[3] for f in files),
            boards=boards,
            base_url=server.url(prefix),
            sign_method=sign_method,
            allow_downgrade=allow_downgrade,
            compression=compression,
        )
        for path in sorted(out.iterdir()):
            docroot.add_bytes(f"{prefix}/{path.name}", path.read_bytes())
        task = json.loads((out / "task.json").read_text())
        return Package(task, docroot.root / prefix, prefix)

    def publish_raw(
        self,
        docroot: Docroot,
        server: Server,
        entries: Sequence[tuple[ManifestFile, bytes]],
        *,
        version: str | None = None,
    ) -> Package:
        """Serve ``entries`` (manifest entry, bytes served) exactly as given, under a manifest
        signed by the vendor's key: what a broken build (or a compromised build machine)
        publishes, to prove the device does not take the manifest's word for the stream."""
        prefix = f"raw-{secrets.token_hex(4)}"
        manifest = Manifest(
            version=version or "".join(e.version for e, _ in entries),
            boards=(BOARD,),
            files=tuple(e for e, _ in entries),
            created=datetime.now(UTC).replace(microsecond=0),
        )
        envelope = sign_manifest(manifest_to_json(manifest), self.key.private_pem)
        files = [(MANIFEST_NAME, envelope)] + [(e.name, data) for e, data in entries]
        for name, data in files:
            docroot.add_bytes(f"{prefix}/{name}", data)
        task: dict[str, object] = {
            "code": "1000",
            "id": 1,
            "message": "success",
            "data": {
                "version": manifest.version,
                "signMethod": "SHA256",
                "files": [
                    {
                        "fileName": name,
                        "fileSize": len(data),
                        "fileUrl": server.url(f"{prefix}/{name}"),
                        "fileSign": hashlib.sha256(data).hexdigest(),
                    }
                    for name, data in files
                ],
            },
        }
        return Package(task, docroot.root / prefix, prefix)
