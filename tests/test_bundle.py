"""Tests of updater.bundle and the ``keygen``/``bundle`` commands, end to end.

The end-to-end tests run the CLI as a vendor would, then read the package as a device would
(``parse_task`` on task.json, ``verify_envelope`` on manifest.json with a keyring holding the
public key): the promise of the bundle tool is that what it writes, the updater accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import pytest

from tests.harness import require
from updater.bundle import (
    BundleError,
    PayloadFile,
    build_bundle,
    check_base_url,
    parse_file_argument,
    parse_sign_method,
    write_key_pair,
)
from updater.cli import main
from updater.errors import InvalidInput
from updater.manifest import (
    MANIFEST_NAME,
    Keyring,
    check_task_against_manifest,
    generate_key,
    public_key_id,
    verify_envelope,
)
from updater.task import parse_task

BASE_URL: Final = "https://cdn.example.com/fleet/v2/"
PI4: Final = "Raspberry Pi 4 Model B"
PAYLOAD: Final = {"boot.img": b"boot" * 100, "rootfs.img": b"root" * 1000, "app conf": b"c=1\n"}


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    directory = tmp_path / "build"
    directory.mkdir()
    for name, data in PAYLOAD.items():
        (directory / name).write_bytes(data)
    return directory


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert main(["keygen", "--out", str(tmp_path / "keys"), "--name", "vendor"]) == 0
    capsys.readouterr()
    return tmp_path / "keys"


def file_args(sources: Path) -> list[str]:
    return [
        f"{sources / 'boot.img'}=boot=a1",
        f"{sources / 'rootfs.img'}=rootfs=b1",
        f"{sources / 'app conf'}=config=c1",
    ]


def bundle_args(keys: Path, out: Path, *extra: str) -> list[str]:
    return [
        "bundle",
        "--key",
        str(keys / "vendor.key"),
        "--out",
        str(out),
        "--board",
        PI4,
        "--board",
        "Raspberry Pi 5",
        "--base-url",
        BASE_URL,
        *extra,
    ]


# --- keygen --------------------------------------------------------------------------------------


def test_keygen_writes_a_pair_and_prints_its_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "keys"
    assert main(["keygen", "--out", str(out), "--name", "vendor-2024"]) == 0
    printed = capsys.readouterr().out.strip()
    public = (out / "vendor-2024.pub").read_bytes()
    assert printed == public_key_id(public)
    assert stat.S_IMODE((out / "vendor-2024.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "vendor-2024.pub").stat().st_mode) == 0o644
    assert (out / "vendor-2024.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_keygen_default_name_and_no_overwrite(tmp_path: Path) -> None:
    key_path, pub_path, _ = write_key_pair(tmp_path)
    assert (key_path.name, pub_path.name) == ("signing.key", "signing.pub")
    before = key_path.read_bytes()
    assert main(["keygen", "--out", str(tmp_path)]) == 2
    assert key_path.read_bytes() == before


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65])
def test_keygen_refuses_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(BundleError, match="key name"):
        write_key_pair(tmp_path, name)
    assert list(tmp_path.iterdir()) == []


# --- bundle end to end ---------------------------------------------------------------------------


def test_bundle_end_to_end(
    tmp_path: Path, sources: Path, keys: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "package"
    args = bundle_args(keys, out, "--version", "a1b1c1", "--compress", "none", *file_args(sources))
    assert main(args) == 0
    assert "package a1b1c1" in capsys.readouterr().out

    task = parse_task((out / "task.json").read_bytes())
    keyring = Keyring.from_public_keys([(keys / "vendor.pub").read_bytes()])
    manifest = verify_envelope((out / MANIFEST_NAME).read_bytes(), keyring)
    check_task_against_manifest(task, manifest)

    assert task.version == manifest.version == "a1b1c1"
    assert task.digest_method == "sha256"
    assert [f.name for f in task.files] == [MANIFEST_NAME, "boot.img", "rootfs.img", "app conf"]
    assert task.files[0].size == (out / MANIFEST_NAME).stat().st_size
    assert task.files[0].digest == hashlib.sha256((out / MANIFEST_NAME).read_bytes()).hexdigest()
    assert task.files[3].url == "https://cdn.example.com/fleet/v2/app%20conf"
    assert task.ext_data == {"versions": {"boot.img": "a1", "rootfs.img": "b1", "app conf": "c1"}}
    assert manifest.boards == (PI4, "Raspberry Pi 5")
    assert manifest.versions_by_target() == {"boot": "a1", "rootfs": "b1", "config": "c1"}
    for spec, entry in zip(task.files[1:], manifest.files, strict=True):
        data = PAYLOAD[spec.name]
        assert (out / spec.name).read_bytes() == data
        assert spec.size == entry.size == len(data)
        assert spec.digest == entry.sha256 == hashlib.sha256(data).hexdigest()
        assert spec.url.startswith(BASE_URL)

    envelope = json.loads((out / "task.json").read_bytes())
    assert (envelope["code"], envelope["message"]) == ("1000", "success")
    assert isinstance(envelope["id"], int)
    assert sorted(p.name for p in out.iterdir()) == sorted([*PAYLOAD, MANIFEST_NAME, "task.json"])


def test_bundle_with_md5(tmp_path: Path, sources: Path, keys: Path) -> None:
    out = tmp_path / "package"
    args = bundle_args(
        keys, out, "--version", "a1b1c1", "--sign-method", "md5", "--compress", "none"
    )
    assert main([*args, *file_args(sources)]) == 0
    task = parse_task((out / "task.json").read_bytes())
    assert task.digest_method == "md5"
    assert task.files[1].digest == hashlib.md5(PAYLOAD["boot.img"]).hexdigest()
    keyring = Keyring.from_public_keys([(keys / "vendor.pub").read_bytes()])
    check_task_against_manifest(task, verify_envelope((out / MANIFEST_NAME).read_bytes(), keyring))


def test_bundle_compresses_with_zstd_by_default(tmp_path: Path, sources: Path, keys: Path) -> None:
    import zstandard

    out = tmp_path / "package"
    assert main(bundle_args(keys, out, "--version", "a1b1c1", *file_args(sources))) == 0
    task = parse_task((out / "task.json").read_bytes())
    keyring = Keyring.from_public_keys([(keys / "vendor.pub").read_bytes()])
    manifest = verify_envelope((out / MANIFEST_NAME).read_bytes(), keyring)
    check_task_against_manifest(task, manifest)
    for spec, entry in zip(task.files[1:], manifest.files, strict=True):
        served = (out / spec.name).read_bytes()
        data = PAYLOAD[spec.name]
        assert entry.size == len(data) and entry.sha256 == hashlib.sha256(data).hexdigest()
        assert spec.size == len(served) and spec.digest == hashlib.sha256(served).hexdigest()
        if entry.encoding is None:  # not smaller compressed: stored as is
            assert served == data
            continue
        assert entry.encoding == "zstd" and len(served) < len(data)
        assert entry.encoded_size == len(served)
        assert entry.encoded_sha256 == spec.digest
        reader = zstandard.ZstdDecompressor().stream_reader(served, read_across_frames=True)
        assert reader.read() == data
    assert any(entry.encoding == "zstd" for entry in manifest.files)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--compress", "lz4"], "compression 'lz4': expected zstd, xz, gzip or none"),
        (["--compress", "zstd", "--level", "30"], "zstd level 30: expected 1..22"),
        (["--frame-size", "64"], "frame size 67108864"),
        (["--max-file-size", "0"], "is more than the limit of 0"),
    ],
)
def test_bundle_refuses_bad_compression_settings_clearly(
    tmp_path: Path,
    sources: Path,
    keys: Path,
    caplog: pytest.LogCaptureFixture,
    args: list[str],
    message: str,
) -> None:
    out = tmp_path / "package"
    code = main(bundle_args(keys, out, "--version", "a1b1c1", *args, *file_args(sources)))
    assert code == 2
    assert message in caplog.text
    assert not (out / "task.json").exists() and not (out / MANIFEST_NAME).exists()


def test_bundle_verifies_with_a_keyring_directory(
    tmp_path: Path, sources: Path, keys: Path
) -> None:
    require(os.geteuid() == 0, "a root-owned keyring needs root")
    out = tmp_path / "package"
    assert main(bundle_args(keys, out, "--version", "a1b1c1", *file_args(sources))) == 0
    directory = Path(tempfile.mkdtemp(dir="/run", prefix="keyring-test-"))
    try:
        directory.chmod(0o755)
        shutil.copyfile(keys / "vendor.pub", directory / "vendor.pub")
        manifest = verify_envelope((out / MANIFEST_NAME).read_bytes(), Keyring.load(directory))
        assert manifest.version == "a1b1c1"
    finally:
        shutil.rmtree(directory)


def test_bundle_in_place_keeps_the_sources(sources: Path) -> None:
    private, _ = generate_key()
    files = [PayloadFile(sources / "boot.img", "boot", "a1")]
    result = build_bundle(
        files, private_pem=private, out_dir=sources, version="a1", boards=[PI4], base_url=BASE_URL
    )
    assert (sources / "boot.img").read_bytes() == PAYLOAD["boot.img"]
    assert [f.name for f in result.task.files] == [MANIFEST_NAME, "boot.img"]
    assert not [p for p in sources.iterdir() if p.name.startswith(".")]


def test_bundle_records_the_creation_time(tmp_path: Path, sources: Path) -> None:
    private, public = generate_key()
    when = datetime(2024, 5, 1, 12, tzinfo=UTC)
    result = build_bundle(
        [PayloadFile(sources / "boot.img", "boot", "a1")],
        private_pem=private,
        out_dir=tmp_path / "out",
        version="a1",
        boards=[PI4],
        base_url=BASE_URL,
        created=when,
    )
    assert result.manifest.created == when
    assert result.key_id == public_key_id(public)


# --- refusals ------------------------------------------------------------------------------------


def _payload(sources: Path, *specs: tuple[str, str, str]) -> list[PayloadFile]:
    return [PayloadFile(sources / name, target, version) for name, target, version in specs]


BOOT: Final = ("boot.img", "boot", "a1")
ROOT: Final = ("rootfs.img", "rootfs", "b1")


@pytest.mark.parametrize(
    ("specs", "version", "changes", "expected"),
    [
        (
            [BOOT, ROOT],
            "b1a1",
            {},
            "the package version 'b1a1' is not the concatenation of the file versions in the "
            "order given: 'a1' + 'b1' = 'a1b1'",
        ),
        ([BOOT, ("../elsewhere/boot.img", "other", "b1")], "a1b1", {}, "already named"),
        ([(MANIFEST_NAME, "boot", "a1")], "a1", {}, "'manifest.json' is reserved"),
        ([("task.json", "boot", "a1")], "a1", {}, "'task.json' is reserved"),
        ([], "", {}, "at least one file"),
        ([BOOT], "a1", {"base_url": "http://cdn.example.com/"}, "must be https://"),
        ([BOOT], "a1", {"base_url": "https://cdn.example.com/?a=1"}, "must not have a query"),
        ([BOOT], "a1", {"base_url": "https:///x"}, "has no host"),
        ([BOOT], "a1", {"base_url": "https://h:99999/"}, "not a valid URL"),
        ([("boot.img", "Boot", "a1")], "a1", {}, "must match [a-z0-9][a-z0-9_-]*"),
        ([("boot.img", "boot", "a 1")], "a 1", {}, "printable ASCII without whitespace"),
        ([BOOT], "a1", {"boards": []}, "must list 1..32 board models"),
        ([BOOT], "a1", {"private_pem": b"junk"}, "signing key: not a PEM private key"),
        ([("missing.img", "boot", "a1")], "a1", {}, "missing.img: No such file or directory"),
        ([("empty.img", "boot", "a1")], "a1", {}, "0 bytes; a file needs 1.."),
    ],
    ids=[
        "version not the concatenation",
        "duplicate name",
        "manifest.json",
        "task.json",
        "no files",
        "http",
        "query",
        "no host",
        "bad port",
        "bad target",
        "bad version",
        "no boards",
        "bad key",
        "missing file",
        "empty file",
    ],
)
def test_bundle_refusals(
    tmp_path: Path,
    sources: Path,
    specs: list[tuple[str, str, str]],
    version: str,
    changes: dict[str, object],
    expected: str,
) -> None:
    (sources / "empty.img").write_bytes(b"")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "boot.img").write_bytes(b"x")
    files = _payload(sources, *specs)
    kwargs: dict[str, object] = {
        "private_pem": generate_key()[0],
        "out_dir": tmp_path / "out",
        "version": version,
        "boards": [PI4],
        "base_url": BASE_URL,
    }
    kwargs.update(changes)
    with pytest.raises(InvalidInput) as info:
        build_bundle(files, **kwargs)  # type: ignore[arg-type]
    assert expected in str(info.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_bundle_refuses_a_non_ed25519_key(tmp_path: Path, sources: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(BundleError, match="signing key: an EC key, not an Ed25519 key"):
        build_bundle(
            _payload(sources, BOOT),
            private_pem=pem,
            out_dir=tmp_path / "out",
            version="a1",
            boards=[PI4],
            base_url=BASE_URL,
        )


def test_bundle_refuses_too_many_files(tmp_path: Path) -> None:
    files = [PayloadFile(tmp_path / f"f{i}", f"t{i}", "v") for i in range(20)]
    with pytest.raises(BundleError, match="at most 20, one of them the manifest"):
        build_bundle(
            files,
            private_pem=generate_key()[0],
            out_dir=tmp_path / "out",
            version="v" * 20,
            boards=[PI4],
            base_url=BASE_URL,
        )


def test_cli_bundle_refusal_exit_code(
    tmp_path: Path, sources: Path, keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = bundle_args(keys, tmp_path / "out", "--version", "a1b2c1", *file_args(sources))
    assert main(args) == 2
    assert "is not the concatenation" in caplog.text
    assert "'a1b2c1'" in caplog.text and "'a1b1c1'" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a/boot.img=boot=a1", PayloadFile(Path("a/boot.img"), "boot", "a1")),
        ("a=b.img=boot=a1", PayloadFile(Path("a=b.img"), "boot", "a1")),
    ],
)
def test_file_arguments(text: str, expected: PayloadFile) -> None:
    assert parse_file_argument(text) == expected
    assert parse_file_argument(text).name == expected.path.name


@pytest.mark.parametrize("text", ["boot.img", "boot.img=boot", "=boot=a1", "boot.img=boot="])
def test_file_argument_refusals(text: str) -> None:
    with pytest.raises(BundleError, match="PATH=TARGET=VERSION"):
        parse_file_argument(text)


def test_sign_methods_and_base_url() -> None:
    assert parse_sign_method("SHA256") == "sha256"
    assert parse_sign_method("Md5") == "md5"
    with pytest.raises(BundleError, match="SHA256 or MD5"):
        parse_sign_method("sha1")
    assert check_base_url("HTTPS://h.example/a/") == "HTTPS://h.example/a"
