"""updater.trust and what it relies on: the download host allowlist (redirects included, against
a real nginx), host patterns (``config.host_allowed``) and the natural version order
(``versions.version_key``).

A redirect is judged on its ``Location`` before libcurl follows it: a host the allowlist does
not admit fails the transfer (a :class:`DownloadError`, step -2) before a byte is accepted, and
the file is never requested. nginx answers for both ``127.0.0.1`` and ``localhost``, so a
redirect to ``localhost`` that were followed would fetch the very same file: the test would see
it arrive.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness import Docroot, Nginx
from tests.harness.device import BOARD_MODEL, MiB
from tests.harness.signing import Vendor
from updater.config import Config, host_allowed, parse_config
from updater.errors import DownloadError, TransientDownloadError
from updater.fetch import Transfer
from updater.task import Task, parse_task
from updater.trust import check_task, fetch_manifest, manifest_spec
from updater.versions import version_key

SRC = "/etc/rpi-updater/config.yaml"
BASE: dict[str, Any] = {
    "slots": {
        "A": {"boot": "PARTUUID=1234abcd-02", "root": "PARTUUID=1234abcd-05"},
        "B": {"boot": "PARTUUID=1234abcd-03", "root": "PARTUUID=1234abcd-06"},
    },
    "targets": [
        {"name": "boot", "match": "boot.img", "slot_part": "boot"},
        {"name": "rootfs", "match": "rootfs.img", "slot_part": "root"},
        {"name": "config", "match": "app.conf", "file": "/etc/app/app.conf"},
    ],
}


def make_config(
    allowed_hosts: list[str] | None,
    *,
    ca_file: Path | None = None,
    security: dict[str, object] | None = None,
    system: dict[str, object] | None = None,
) -> Config:
    """BASE with ``security.allowed_hosts`` (absent for None) and quick downloads pinned to
    ``ca_file``."""
    data: dict[str, Any] = {**BASE, "security": dict(security or {})}
    if allowed_hosts is not None:
        data["security"]["allowed_hosts"] = allowed_hosts
    if system is not None:
        data["system"] = system
    if ca_file is not None:
        data["download"] = {
            "ca_file": str(ca_file),
            "connect_timeout": 5,
            "retries": 2,
            "backoff_initial": 0.01,
            "backoff_max": 0.02,
        }
    return parse_config(data, SRC)


class Sink:
    """A receiver that keeps what it is given and counts the calls."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.offset = 0
        self.writes = 0
        self.restarts = 0

    def write(self, data: bytes) -> None:
        self.data += data
        self.offset += len(data)
        self.writes += 1

    def checkpoint(self) -> int:
        return self.offset

    def restart(self) -> None:
        self.data.clear()
        self.offset = 0
        self.restarts += 1


def transfer(url: str, size: int, config: Config) -> Transfer:
    """A Transfer wired as the updater wires it: the allowlist of ``config`` for redirects."""
    return Transfer(
        url,
        size,
        config.download,
        file_name="payload.bin",
        host_allowed=lambda host: host_allowed(config, host),
        sleep=lambda seconds: None,
    )


_REQUEST = re.compile(r'"GET (\S+) HTTP/[\d.]+" (\d{3}) ')


def served(nginx: Nginx) -> list[tuple[str, int]]:
    """(path, status) of every request nginx logged, in order."""
    text = nginx.access_log.read_text(errors="replace")
    return [(m.group(1), int(m.group(2))) for m in _REQUEST.finditer(text)]


def wait_served(nginx: Nginx, request: tuple[str, int], timeout: float = 5) -> None:
    """nginx logs a request once its response is sent, which may be a moment after the client
    has it all."""
    deadline = time.monotonic() + timeout
    while request not in served(nginx):
        assert time.monotonic() < deadline, served(nginx)[-10:]
        time.sleep(0.01)


@pytest.fixture
def payload(docroot: Docroot) -> tuple[str, bytes]:
    """A file in the docroot, under a name no other test uses: (name, content)."""
    name = f"redir-{secrets.token_hex(4)}.bin"
    return name, docroot.add_random(300 * 1024, name=name).read_bytes()


# -- redirects ----------------------------------------------------------------------------------

Redirect = Callable[[Nginx, str], str]

REFUSED: list[Any] = [
    pytest.param(lambda n, f: n.redirect_url("localhost", f), "localhost", id="other-host"),
    pytest.param(
        lambda n, f: n.redirect_url("evil.example.com", f), "evil.example.com", id="unresolvable"
    ),
    pytest.param(lambda n, f: n.redirect_url("LOCALHOST", f), "localhost", id="upper-case"),
    pytest.param(
        lambda n, f: n.relative_redirect_url("localhost", f), "localhost", id="scheme-relative"
    ),
    pytest.param(
        lambda n, f: n.redirect_url("127.0.0.1", f"redirect/localhost/{f}"),
        "localhost",
        id="second-hop",
    ),
]


@pytest.mark.parametrize(("redirect", "host"), REFUSED)
def test_a_redirect_to_another_host_is_refused_before_a_byte_is_accepted(
    nginx: Nginx, payload: tuple[str, bytes], redirect: Redirect, host: str
) -> None:
    name, content = payload
    url = redirect(nginx, name)
    fetch = transfer(url, len(content), make_config(["127.0.0.1"], ca_file=nginx.ca_file))
    sink = Sink()

    with pytest.raises(DownloadError) as caught:
        fetch.run(sink)

    err = caught.value
    assert not isinstance(err, TransientDownloadError), "refused at once, never retried"
    assert err.message == f"the server redirects to {host!r}, not an allowed host"
    assert str(err) == f"payload.bin: {err.message}"
    assert (err.url, err.offset, err.file_name, err.step) == (url, 0, "payload.bin", -2)
    assert (sink.writes, sink.restarts, bytes(sink.data)) == (0, 0, b"")
    assert (fetch.stats.attempts, fetch.stats.bytes_received) == (1, 0)
    assert (f"/{name}", 200) not in served(nginx), "the file was requested from the other host"


FOLLOWED: list[Any] = [
    pytest.param(lambda n, f: n.redirect_url("127.0.0.1", f), id="absolute"),
    pytest.param(lambda n, f: n.raw_redirect_url(f"/{f}"), id="path-only"),
    pytest.param(lambda n, f: n.relative_redirect_url("127.0.0.1", f), id="scheme-relative"),
    pytest.param(
        lambda n, f: n.redirect_url("127.0.0.1", f"redirect/127.0.0.1/{f}"), id="two-hops"
    ),
]


@pytest.mark.parametrize("redirect", FOLLOWED)
def test_a_redirect_within_the_allowed_host_is_followed_and_the_file_arrives_whole(
    nginx: Nginx, payload: tuple[str, bytes], redirect: Redirect
) -> None:
    name, content = payload
    fetch = transfer(
        redirect(nginx, name), len(content), make_config(["127.0.0.1"], ca_file=nginx.ca_file)
    )
    sink = Sink()

    stats = fetch.run(sink)

    assert bytes(sink.data) == content
    assert (sink.offset, sink.restarts) == (len(content), 0)
    assert (stats.attempts, stats.bytes_received, stats.bytes_discarded) == (1, len(content), 0)
    wait_served(nginx, (f"/{name}", 200))


def test_a_redirect_to_any_host_is_followed_when_the_allowlist_is_empty(
    nginx: Nginx, payload: tuple[str, bytes]
) -> None:
    name, content = payload
    sink = Sink()

    transfer(
        nginx.redirect_url("localhost", name),
        len(content),
        make_config(None, ca_file=nginx.ca_file),
    ).run(sink)

    assert bytes(sink.data) == content


def test_a_redirect_to_plain_http_is_refused_even_on_an_allowed_host(
    nginx: Nginx, payload: tuple[str, bytes]
) -> None:
    name, content = payload
    fetch = transfer(
        nginx.http_redirect_url(name),
        len(content),
        make_config(["127.0.0.1"], ca_file=nginx.ca_file),
    )
    sink = Sink()

    with pytest.raises(DownloadError) as caught:
        fetch.run(sink)

    err = caught.value
    assert not isinstance(err, TransientDownloadError)
    assert err.message == "the server redirects to http URL, not https", err.message
    assert (err.file_name, err.offset, err.step) == ("payload.bin", 0, -2)
    assert (sink.writes, fetch.stats.attempts) == (0, 1)
    assert (f"/{name}", 200) not in served(nginx)


@pytest.mark.parametrize("slashes", ["/", "///"], ids=["one-slash", "three-slashes"])
def test_a_location_libcurl_and_urllib_read_differently_is_still_held_to_the_allowlist(
    nginx: Nginx, payload: tuple[str, bytes], slashes: str
) -> None:
    name, content = payload
    location = f"https:{slashes}localhost:{nginx.port}/{name}"  # libcurl: host localhost
    fetch = transfer(
        nginx.raw_redirect_url(location),
        len(content),
        make_config(["127.0.0.1"], ca_file=nginx.ca_file),
    )
    sink = Sink()

    with pytest.raises(DownloadError, match="the server redirects to 'localhost'"):
        fetch.run(sink)

    assert sink.writes == 0


# -- the manifest fetch -------------------------------------------------------------------------


def manifest_task(url: str, data: bytes) -> Task:
    return parse_task(
        {
            "version": "a1",
            "signMethod": "SHA256",
            "files": [
                {
                    "fileName": "manifest.json",
                    "fileUrl": url,
                    "fileSize": len(data),
                    "fileSign": hashlib.sha256(data).hexdigest(),
                }
            ],
        }
    )


def test_fetch_manifest_holds_redirects_to_the_allowlist(nginx: Nginx, docroot: Docroot) -> None:
    data = os.urandom(4096)
    name = docroot.add_bytes(f"m-{secrets.token_hex(4)}/manifest.json", data).name
    config = make_config(["127.0.0.1"], ca_file=nginx.ca_file)
    same = manifest_task(nginx.redirect_url("127.0.0.1", name), data)
    other = manifest_task(nginx.redirect_url("localhost", name), data)

    assert fetch_manifest(same.files[0], same, config) == data
    with pytest.raises(DownloadError) as caught:
        fetch_manifest(other.files[0], other, config)
    assert str(caught.value) == (
        "manifest.json: the server redirects to 'localhost', not an allowed host"
    )
    assert caught.value.step == -2
    open_config = make_config(None, ca_file=nginx.ca_file)
    assert fetch_manifest(other.files[0], other, open_config) == data


@pytest.fixture
def vendor(trusted_dir: Path, tmp_path: Path) -> Vendor:
    return Vendor.create(trusted_dir, tmp_path / "vendor")


def test_check_task_verifies_a_manifest_behind_a_same_host_redirect_only(
    nginx: Nginx, docroot: Docroot, vendor: Vendor, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    model.write_bytes(BOARD_MODEL.encode() + b"\0")
    files = [
        ("boot.img", os.urandom(4096), "boot", "a1"),
        ("rootfs.img", os.urandom(1 * MiB), "rootfs", "b1"),
        ("app.conf", b"version = 1\n", "config", "c1"),
    ]
    package = vendor.publish(docroot, nginx, files)
    config = make_config(
        ["127.0.0.1"],
        ca_file=nginx.ca_file,
        security={"keyring": str(vendor.keyring)},
        system={"model": str(model)},
    )
    entry = package.task["data"]["files"][0]  # type: ignore[index]
    assert entry["fileName"] == "manifest.json"
    served_manifest = package.served("manifest.json").read_bytes()

    entry["fileUrl"] = nginx.redirect_url("127.0.0.1", f"{package.prefix}/manifest.json")
    trusted = check_task(parse_task(package.task), config)

    assert trusted.envelope == served_manifest.decode()
    assert trusted.manifest is not None
    assert [(f.name, f.target, f.version) for f in trusted.manifest.files] == [
        (name, target, version) for name, _, target, version in files
    ]

    entry["fileUrl"] = nginx.redirect_url("localhost", f"{package.prefix}/manifest.json")
    task = parse_task(package.task)
    spec = manifest_spec(task)
    assert spec is not None and spec.url == entry["fileUrl"]
    with pytest.raises(DownloadError) as caught:
        check_task(task, config)
    assert str(caught.value) == (
        "manifest.json: the server redirects to 'localhost', not an allowed host"
    )


# -- host patterns ------------------------------------------------------------------------------

HOSTS: list[Any] = [
    # exact names
    pytest.param(["ota.example.com"], "ota.example.com", True, id="exact"),
    pytest.param(["ota.example.com"], "OTA.Example.COM", True, id="exact-host-case"),
    pytest.param(["OTA.Example.com"], "ota.example.com", True, id="exact-pattern-case"),
    pytest.param(["ota.example.com"], "ota.example.com.", True, id="exact-trailing-dot"),
    pytest.param(["ota.example.com"], "a.ota.example.com", False, id="exact-not-subdomain"),
    pytest.param(["ota.example.com"], "example.com", False, id="exact-not-parent"),
    pytest.param(["ota.example.com"], "xota.example.com", False, id="exact-not-prefixed"),
    pytest.param(["ota.example.com"], "ota.example.com.evil.net", False, id="exact-not-suffix"),
    pytest.param(["ota.example.com"], "", False, id="exact-empty-host"),
    # wildcards
    pytest.param(["*.example.com"], "a.example.com", True, id="wildcard"),
    pytest.param(["*.example.com"], "a.b.example.com", True, id="wildcard-deeper"),
    pytest.param(["*.example.com"], "A.EXAMPLE.COM", True, id="wildcard-host-case"),
    pytest.param(["*.Example.COM"], "a.example.com", True, id="wildcard-pattern-case"),
    pytest.param(["*.example.com"], "a.example.com.", True, id="wildcard-trailing-dot"),
    pytest.param(["*.example.com"], "example.com", False, id="wildcard-not-the-domain"),
    pytest.param(["*.example.com"], "example.com.", False, id="wildcard-not-domain-dot"),
    pytest.param(["*.example.com"], "badexample.com", False, id="wildcard-not-glued"),
    pytest.param(["*.example.com"], "a.example.com.evil.net", False, id="wildcard-not-inside"),
    pytest.param(["*.example.com"], "a.example.co", False, id="wildcard-other-tld"),
    # addresses, several patterns, none
    pytest.param(["127.0.0.1"], "127.0.0.1", True, id="address"),
    pytest.param(["127.0.0.1"], "127.0.0.10", False, id="address-longer"),
    pytest.param(["127.0.0.1"], "localhost", False, id="address-not-its-name"),
    pytest.param(["a.example.net", "*.cdn.example.com"], "x.cdn.example.com", True, id="any"),
    pytest.param(["a.example.net", "*.cdn.example.com"], "cdn.example.com", False, id="none"),
    pytest.param(None, "anything.example", True, id="no-list-any-host"),
    pytest.param([], "anything.example", True, id="empty-list-any-host"),
]


@pytest.mark.parametrize(("patterns", "host", "allowed"), HOSTS)
def test_host_allowed(patterns: list[str] | None, host: str, allowed: bool) -> None:
    assert host_allowed(make_config(patterns), host) is allowed


# -- natural version order ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("1.9", "1.10"),
        ("a1", "a2"),
        ("a2", "b1"),
        ("a9", "a10"),
        ("b9", "b10"),
        ("2", "10"),
        ("1.2.9", "1.2.10"),
        ("v1.9.9", "v1.10.0"),
        ("1.0", "1.0.1"),
        ("1", "1a"),
        ("1", "a"),  # digit runs before text
        ("a1b1c1", "a1b1c2"),
        ("a1b10c1", "a2b1c1"),
    ],
    ids=repr,
)
def test_version_key_is_natural_order(lower: str, higher: str) -> None:
    assert version_key(lower) < version_key(higher)
    assert not version_key(higher) < version_key(lower)
    assert sorted([higher, lower], key=version_key) == [lower, higher]


def test_version_key_numbers_ignore_leading_zeros() -> None:
    assert version_key("1.01") == version_key("1.1") == ((0, 1, "1"), (1, 0, "."), (0, 1, "1"))
    assert version_key("") == ()


# Versions as tasks and manifests carry them: printable ASCII without whitespace.
VERSIONS = st.text(alphabet="0123456789ab.-_+~", max_size=10) | st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=10
)


@settings(max_examples=300, deadline=None)
@given(versions=st.lists(VERSIONS, min_size=1, max_size=8), data=st.data())
def test_sorting_by_version_key_is_a_total_preorder(versions: list[str], data: Any) -> None:
    keys = [version_key(v) for v in versions]
    for a in keys:
        for b in keys:
            # total, and "neither is lower" is exactly "the keys are equal"
            assert (a < b) + (b < a) + (a == b) == 1
            assert (a <= b) or (b <= a)
            for c in keys:
                if a <= b <= c:
                    assert a <= c
    ordered = sorted(versions, key=version_key)
    assert all(version_key(x) <= version_key(y) for x, y in pairwise(ordered))
    shuffled = data.draw(st.permutations(versions))
    assert [version_key(v) for v in sorted(shuffled, key=version_key)] == [
        version_key(v) for v in ordered
    ], "the order does not depend on the input order, up to equal keys"


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.text(alphabet="abv.-", max_size=4),
    m=st.integers(min_value=0, max_value=10**12),
    n=st.integers(min_value=0, max_value=10**12),
    suffix=st.text(alphabet="ab.-", max_size=3),
)
def test_numbers_compare_by_value(prefix: str, m: int, n: int, suffix: str) -> None:
    a, b = version_key(f"{prefix}{m}{suffix}"), version_key(f"{prefix}{n}{suffix}")
    assert (a < b, a == b, a > b) == (m < n, m == n, m > n)


@pytest.mark.parametrize("version", ["²", "1²", "v1.0³"], ids=["sup2", "digit-sup2", "sup3"])
def test_version_key_takes_any_text(version: str) -> None:
    """extData.versions (unsigned packages) and factory_versions are not limited to ASCII."""
    assert version_key(version) < version_key(f"{version}0")


def test_version_key_takes_huge_digit_runs_without_int_conversion() -> None:
    """int() of more than 4300 digits raises; a hostile extData version must not."""
    big = "1" * 5000
    assert version_key(big) > version_key("9" * 4999)
    assert version_key(f"0{big}") == version_key(big)
    assert version_key(big + "a") > version_key(big)
