"""The harness itself: if these fail, no download or install test below them means anything.

Every transfer goes through pycurl (the downloader's library) with the test CA and full
verification, so what passes here is what the updater's client will see.
"""

from __future__ import annotations

import hashlib
import io
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pycurl
import pytest

from tests.harness import (
    Docroot,
    Fault,
    FaultProxy,
    LoopDevices,
    Nginx,
    TlsFiles,
    make_sparse_image,
    make_tls_files,
    random_cuts,
    require,
)

# libcurl's error codes, as the downloader will see them.
E_COULDNT_CONNECT = 7
E_PARTIAL_FILE = 18
E_OPERATION_TIMEDOUT = 28
E_PEER_FAILED_VERIFICATION = 60
E_RECV_ERROR = 56


@dataclass(slots=True)
class Fetched:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    error: int | None = None
    seconds: float = 0.0


def fetch(
    url: str,
    ca_file: Path,
    *,
    byte_range: str | None = None,
    timeout_ms: int = 10_000,
) -> Fetched:
    """One GET with TLS verified against ``ca_file``; curl errors are returned, not raised."""
    body = io.BytesIO()
    headers: dict[str, str] = {}

    def on_header(line: bytes) -> None:
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()

    curl = pycurl.Curl()
    curl.setopt(pycurl.URL, url)
    curl.setopt(pycurl.CAINFO, str(ca_file))
    curl.setopt(pycurl.SSL_VERIFYPEER, 1)
    curl.setopt(pycurl.SSL_VERIFYHOST, 2)
    curl.setopt(pycurl.WRITEDATA, body)
    curl.setopt(pycurl.HEADERFUNCTION, on_header)
    curl.setopt(pycurl.TIMEOUT_MS, timeout_ms)
    if byte_range is not None:
        curl.setopt(pycurl.RANGE, byte_range)
    error: int | None = None
    started = time.monotonic()
    try:
        curl.perform()
    except pycurl.error as err:
        error = int(err.args[0])
    seconds = time.monotonic() - started
    status = int(curl.getinfo(pycurl.RESPONSE_CODE))
    curl.close()
    return Fetched(status, body.getvalue(), headers, error, seconds)


# -- nginx ----------------------------------------------------------------------------------


def test_nginx_serves_whole_file_and_ranges(nginx: Nginx, docroot: Docroot) -> None:
    served = docroot.add_random(100_000, seed=1)
    data = served.read_bytes()
    assert hashlib.sha256(data).hexdigest() == served.sha256
    assert hashlib.md5(data).hexdigest() == served.md5

    whole = fetch(nginx.url(served.name), nginx.ca_file)
    assert (whole.error, whole.status) == (None, 200)
    assert whole.body == data
    assert whole.headers["etag"].startswith('"')

    part = fetch(nginx.url(served.name), nginx.ca_file, byte_range="1000-1999")
    assert (part.error, part.status) == (None, 206)
    assert part.body == data[1000:2000]
    assert part.headers["content-range"] == "bytes 1000-1999/100000"


def test_nginx_comes_back_on_the_same_port(nginx: Nginx, docroot: Docroot) -> None:
    served = docroot.add_bytes("small.txt", b"hello\n")
    port = nginx.port
    nginx.stop()
    assert fetch(nginx.url(served.name), nginx.ca_file).error == E_COULDNT_CONNECT
    nginx.start()
    assert nginx.port == port
    assert fetch(nginx.url(served.name), nginx.ca_file).body == b"hello\n"


def test_replaced_file_gets_a_new_etag(nginx: Nginx, docroot: Docroot) -> None:
    first = docroot.add_random(4096, name="changing.bin", seed=1)
    etag = fetch(nginx.url(first.name), nginx.ca_file).headers["etag"]
    second = docroot.add_random(4096, name="changing.bin", seed=2)
    again = fetch(nginx.url(second.name), nginx.ca_file)
    assert again.body == second.read_bytes()
    assert again.headers["etag"] != etag


def test_an_untrusted_ca_is_rejected(nginx: Nginx, docroot: Docroot, tmp_path: Path) -> None:
    served = docroot.add_bytes("small.txt", b"hello\n")
    other = make_tls_files(tmp_path / "other-ca")
    result = fetch(nginx.url(served.name), other.ca_file)
    assert result.error == E_PEER_FAILED_VERIFICATION


# -- fault proxy ----------------------------------------------------------------------------


def test_proxy_passes_through(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    served = docroot.add_random(300_000)
    result = fetch(fault_proxy.url(served.name), fault_proxy.ca_file)
    assert (result.error, result.status) == (None, 200)
    assert result.body == served.read_bytes()
    assert result.headers["connection"] == "close"
    fault_proxy.wait_idle()
    [log] = fault_proxy.requests
    assert (log.method, log.path, log.status, log.fault) == ("GET", f"/{served.name}", 200, None)
    assert log.headers["host"] == f"127.0.0.1:{fault_proxy.port}"
    assert (log.body_bytes, log.error, log.done) == (300_000, None, True)
    assert fault_proxy.body_bytes_total == 300_000


def test_proxy_forwards_ranges(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    served = docroot.add_random(10_000)
    result = fetch(fault_proxy.url(served.name), fault_proxy.ca_file, byte_range="9000-")
    assert (result.status, result.body) == (206, served.read_bytes()[9000:])
    fault_proxy.wait_idle()
    assert fault_proxy.requests[0].headers["range"] == "bytes=9000-"


def test_cut_after_truncates_then_the_script_runs_out(
    fault_proxy: FaultProxy, docroot: Docroot
) -> None:
    served = docroot.add_random(200_000)
    fault_proxy.script(Fault(cut_after=5000))
    cut = fetch(fault_proxy.url(served.name), fault_proxy.ca_file)
    assert cut.error == E_PARTIAL_FILE
    assert cut.body == served.read_bytes()[:5000]
    whole = fetch(fault_proxy.url(served.name), fault_proxy.ca_file)
    assert (whole.error, whole.body) == (None, served.read_bytes())
    fault_proxy.wait_idle()
    assert [r.body_bytes for r in fault_proxy.requests] == [5000, 200_000]
    assert fault_proxy.requests[0].fault == Fault(cut_after=5000)
    assert fault_proxy.body_bytes_total == 205_000


def test_strip_range_makes_nginx_answer_200(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    served = docroot.add_random(10_000)
    fault_proxy.script(Fault(strip_range=True))
    result = fetch(fault_proxy.url(served.name), fault_proxy.ca_file, byte_range="5000-")
    assert (result.status, result.body) == (200, served.read_bytes())


def test_status_fault_answers_without_nginx(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    served = docroot.add_random(1000)
    fault_proxy.script(Fault(status=503), Fault(status=500))
    assert fetch(fault_proxy.url(served.name), fault_proxy.ca_file).status == 503
    assert fetch(fault_proxy.url(served.name), fault_proxy.ca_file).status == 500
    assert fetch(fault_proxy.url(served.name), fault_proxy.ca_file).status == 200
    fault_proxy.wait_idle()
    assert [r.status for r in fault_proxy.requests] == [503, 500, 200]
    assert fault_proxy.body_bytes_total == 1000


def test_default_fault_applies_after_the_script(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    served = docroot.add_random(1000)
    fault_proxy.default = Fault(status=500)
    fault_proxy.script(Fault())
    assert fetch(fault_proxy.url(served.name), fault_proxy.ca_file).status == 200
    assert fetch(fault_proxy.url(served.name), fault_proxy.ca_file).status == 500


def test_rewrite_path_serves_the_other_file(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    asked, other = docroot.add_random(1000), docroot.add_random(2000)
    fault_proxy.script(Fault(rewrite_path=other.name))
    result = fetch(fault_proxy.url(asked.name), fault_proxy.ca_file)
    assert result.body == other.read_bytes()
    fault_proxy.wait_idle()
    assert fault_proxy.requests[0].path == f"/{asked.name}"


def test_reset_is_a_curl_error(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    served = docroot.add_random(200_000)
    fault_proxy.script(Fault(reset_after=7000))
    result = fetch(fault_proxy.url(served.name), fault_proxy.ca_file)
    assert result.error == E_RECV_ERROR
    assert result.body == served.read_bytes()[:7000]


def test_stall_holds_the_connection_open(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    served = docroot.add_random(200_000)
    fault_proxy.script(
        Fault(stall_after=3000, stall_seconds=30.0), Fault(stall_after=3000, stall_seconds=0.3)
    )
    held = fetch(fault_proxy.url(served.name), fault_proxy.ca_file, timeout_ms=700)
    assert held.error == E_OPERATION_TIMEDOUT
    assert held.body == served.read_bytes()[:3000]
    released = fetch(fault_proxy.url(served.name), fault_proxy.ca_file)
    assert released.error == E_PARTIAL_FILE
    assert released.seconds >= 0.3
    assert released.body == served.read_bytes()[:3000]
    # stop() (in the fixture) must end the first stall at once, not after 30 s.


def test_delay_postpones_the_answer(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    served = docroot.add_random(1000)
    fault_proxy.script(Fault(delay=0.3))
    result = fetch(fault_proxy.url(served.name), fault_proxy.ca_file)
    assert result.body == served.read_bytes()
    assert result.seconds >= 0.3


def test_a_killed_client_does_not_break_the_proxy(
    fault_proxy: FaultProxy, docroot: Docroot, tls_files: TlsFiles
) -> None:
    served = docroot.add_random(8 << 20)
    context = ssl.create_default_context(cafile=str(tls_files.ca_file))
    for _ in range(3):
        with (
            socket.create_connection(("127.0.0.1", fault_proxy.port)) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as client,
        ):
            client.sendall(f"GET /{served.name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert client.recv(1000)
    fault_proxy.wait_idle()
    assert all(r.done for r in fault_proxy.requests)
    assert fault_proxy.body_bytes_total < 3 * served.size
    small = docroot.add_random(1000)
    assert fetch(fault_proxy.url(small.name), fault_proxy.ca_file).body == small.read_bytes()


def test_proxy_restarts_on_the_same_port(fault_proxy: FaultProxy, docroot: Docroot) -> None:
    served = docroot.add_random(1000)
    fault_proxy.stop()
    assert fetch(fault_proxy.url(served.name), fault_proxy.ca_file).error == E_COULDNT_CONNECT
    fault_proxy.start()
    assert fetch(fault_proxy.url(served.name), fault_proxy.ca_file).body == served.read_bytes()


def test_random_cuts_are_reproducible() -> None:
    cuts = random_cuts(5, 1000, seed=7)
    assert cuts == random_cuts(5, 1000, seed=7)
    assert all(f.cut_after is not None and 1 <= f.cut_after < 1000 for f in cuts)


# -- loop devices ---------------------------------------------------------------------------


def test_loop_device_shows_a_window_of_the_image(loop_devices: LoopDevices, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "disk.img", 4 << 20)
    assert image.stat().st_blocks == 0
    part = loop_devices.attach(image, offset=1 << 20, size_limit=2 << 20)
    size = (Path("/sys/block") / part.device.name / "size").read_text()
    assert int(size) * 512 == 2 << 20
    fd = os.open(part.device, os.O_WRONLY)
    try:
        os.write(fd, b"slot-a")
        os.fsync(fd)
    finally:
        os.close(fd)
    with image.open("rb") as disk:
        disk.seek(1 << 20)
        assert disk.read(6) == b"slot-a"


def test_loop_devices_are_detached_even_on_failure(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "loop devices need root")
    image = make_sparse_image(tmp_path / "disk.img", 1 << 20)
    with pytest.raises(RuntimeError, match="boom"), LoopDevices() as devices:
        devices.attach(image)
        raise RuntimeError("boom")
    listed = subprocess.run(
        ["losetup", "-j", str(image)], capture_output=True, text=True, check=True
    )
    assert listed.stdout == ""


# -- the CI rule ----------------------------------------------------------------------------


def test_require_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    require(True, "never")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        require(False, "missing thing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="missing thing"):
        require(False, "missing thing")


def test_a_skip_fails_a_ci_run(tmp_path: Path) -> None:
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\ndef test_skipped():\n    pytest.skip('no gizmo')\n"
    )
    repo = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["-p", "tests.conftest", "test_skips.py"]

    def run(ci: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CI": ci, "PYTHONPATH": str(repo)}
        return subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False
        )

    local, ci = run("false"), run("true")
    assert local.returncode == 0, local.stdout
    assert ci.returncode == 1, ci.stdout
    assert "skipped test(s) fail the run" in ci.stdout
