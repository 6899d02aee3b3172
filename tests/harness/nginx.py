"""A private nginx serving a docroot over HTTPS (and plain HTTP for the fault proxy).

The downloader is tested against the server it meets in the field: real ETags, real Range
handling, sendfile. Each instance has its own prefix, config, pid, logs and temp paths under a
work directory, runs in the foreground (``daemon off;``) as our child, and keeps its two ports
across ``stop()``/``start()`` so a test can take the server away for a few seconds and bring it
back at the same URL. Under ``/redirect...`` the HTTPS server answers with 302 redirects (to
another host name of itself, scheme-relative, to plain HTTP, or to any given ``Location``): see
:meth:`Nginx.redirect_url` and its siblings; every other path is served as before.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .tls import TlsFiles

__all__ = ["Docroot", "Nginx", "NginxError", "ServedFile", "find_nginx", "free_port"]

_CONFIG = """\
{user}
worker_processes 1;
daemon off;
master_process on;
pid {work}/nginx.pid;
error_log {work}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;

    types {{
        application/json json;
        text/plain txt;
    }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30s;

    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost 127.0.0.1;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
        location / {{ }}

        # Redirects, for the download host allowlist (see Nginx.redirect_url): this server is
        # both 127.0.0.1 and localhost, so a redirect it follows fetches the same docroot.
        location ~ ^/redirect/([^/]+)/(.*)$ {{
            return 302 https://$1:{port}/$2;
        }}
        location ~ ^/redirect-relative/([^/]+)/(.*)$ {{
            absolute_redirect off;
            return 302 //$1:{port}/$2;
        }}
        location ~ ^/redirect-http/(.*)$ {{
            return 302 http://127.0.0.1:{plain_port}/$1;
        }}
        location = /redirect-to {{
            absolute_redirect off;
            return 302 $arg_to;
        }}
    }}

    server {{
        listen 127.0.0.1:{plain_port};
        server_name localhost 127.0.0.1;
        root {root};
        location / {{ }}
    }}
}}
"""


class NginxError(RuntimeError):
    """nginx would not start or stop; the message carries the tail of its error log."""


def find_nginx() -> str | None:
    """The nginx binary, also when /usr/sbin is not on PATH (a non-root shell)."""
    found = shutil.which("nginx")
    if found is not None:
        return found
    for candidate in (Path("/usr/sbin/nginx"), Path("/usr/local/sbin/nginx")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Nginx:
    """One nginx process; ``start()`` and ``stop()`` may be called again and again."""

    def __init__(
        self,
        root: Path,
        tls: TlsFiles,
        work_dir: Path,
        *,
        binary: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        found = binary or find_nginx()
        if found is None:
            raise NginxError("nginx not found (Debian package nginx-light)")
        self.binary = found
        self.root = root
        self.tls = tls
        self.ca_file = tls.ca_file
        self.work_dir = work_dir
        self.start_timeout = start_timeout
        self.port = free_port()
        self.plain_port = free_port()
        self.conf_file = work_dir / "nginx.conf"
        self.error_log = work_dir / "error.log"
        self.access_log = work_dir / "access.log"
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        """The HTTPS URL of ``name`` in the docroot (what the device would be told)."""
        return f"https://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def redirect_url(self, host: str, name: str) -> str:
        """An HTTPS URL of this server that answers 302 to ``name`` on ``host`` (this server's
        port): ``https://127.0.0.1:P/redirect/localhost/x`` -> ``https://localhost:P/x``.
        Redirects chain: ``name`` may itself be a ``redirect/<host>/...`` path."""
        return self.url(f"redirect/{host}/{name.lstrip('/')}")

    def relative_redirect_url(self, host: str, name: str) -> str:
        """As :meth:`redirect_url`, with a scheme-relative ``Location: //host:P/name``."""
        return self.url(f"redirect-relative/{host}/{name.lstrip('/')}")

    def http_redirect_url(self, name: str) -> str:
        """An HTTPS URL that answers 302 to ``name`` over plain HTTP on 127.0.0.1."""
        return self.url(f"redirect-http/{name.lstrip('/')}")

    def raw_redirect_url(self, location: str) -> str:
        """An HTTPS URL that answers 302 with exactly ``Location: <location>`` (which must not
        need percent-encoding in a query string: no spaces, '&', '#' or '%')."""
        return self.url(f"redirect-to?to={location}")

    def plain_url(self, name: str) -> str:
        """The plain-HTTP URL of ``name``; meant for the fault proxy, not for the client."""
        return f"http://127.0.0.1:{self.plain_port}/{name.lstrip('/')}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.work_dir / "tmp").mkdir(parents=True, exist_ok=True)
        # Workers must read a docroot under a 0700 pytest tmp dir: as root that needs `user root`;
        # as anybody else nginx cannot switch users and warns about the directive, so omit it.
        user = "user root;" if os.geteuid() == 0 else ""
        self.conf_file.write_text(
            _CONFIG.format(
                user=user,
                work=self.work_dir,
                port=self.port,
                plain_port=self.plain_port,
                cert=self.tls.cert_file,
                key=self.tls.key_file,
                root=self.root,
            )
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.error_log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no error log)"

    def start(self) -> None:
        """Start nginx and return once both ports accept connections."""
        if self.running:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        with (self.work_dir / "stderr.log").open("ab") as stderr:
            self._process = subprocess.Popen(
                [
                    *(self.binary, "-p", f"{self.work_dir}/"),
                    *("-c", str(self.conf_file), "-e", str(self.error_log)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        deadline = time.monotonic() + self.start_timeout
        while not (_accepts(self.port) and _accepts(self.plain_port)):
            if self._process.poll() is not None:
                self._process = None
                raise NginxError(f"nginx exited at start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise NginxError(f"nginx did not listen within {self.start_timeout}s")
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGTERM): open transfers are cut, as when a server goes away."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise NginxError(f"nginx ignored SIGTERM for {timeout}s:\n{self._log_tail()}") from None

    def __enter__(self) -> Nginx:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class ServedFile:
    """A file in the docroot with the digests a task would announce for it."""

    name: str
    path: Path
    size: int
    sha256: str
    md5: str

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()


class Docroot:
    """Puts files into nginx's docroot for one test and removes them afterwards.

    Files are written beside their final name and renamed into place, so nginx never serves a
    half-written file. Replacing a file always moves its mtime to a later second: nginx's ETag
    and Last-Modified are built from mtime (in seconds) and size, and a same-size replacement
    within one second would otherwise look unchanged to a resuming client.
    """

    _CHUNK = 1 << 20

    def __init__(self, root: Path) -> None:
        self.root = root
        self._created: list[Path] = []

    def add_random(
        self, size: int, *, name: str | None = None, seed: int | None = None
    ) -> ServedFile:
        """A file of ``size`` random bytes (reproducible with ``seed``), streamed to disk."""
        rng = random.Random(seed) if seed is not None else None
        chunks = (
            (rng.randbytes(n) if rng is not None else os.urandom(n))
            for n in _chunk_sizes(size, self._CHUNK)
        )
        return self._write(name or f"blob-{secrets.token_hex(4)}-{size}.bin", chunks)

    def add_bytes(self, name: str, data: bytes) -> ServedFile:
        """A file with exactly ``data`` (e.g. a manifest or a small image)."""
        return self._write(name, iter([data]))

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Remove every file this instance created."""
        for path in self._created:
            path.unlink(missing_ok=True)
        self._created.clear()

    def _write(self, name: str, chunks: Iterator[bytes]) -> ServedFile:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        sha256, md5, size = hashlib.sha256(), hashlib.md5(), 0
        with tmp.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
                sha256.update(chunk)
                md5.update(chunk)
                size += len(chunk)
        existed = path.exists()
        if existed:
            old_mtime = int(path.stat().st_mtime)
            if int(tmp.stat().st_mtime) <= old_mtime:
                os.utime(tmp, (old_mtime + 1, old_mtime + 1))
        tmp.replace(path)
        if not existed:  # a file this instance did not create is not its to remove
            self._created.append(path)
        return ServedFile(name, path, size, sha256.hexdigest(), md5.hexdigest())


def _chunk_sizes(total: int, chunk: int) -> Iterator[int]:
    for start in range(0, total, chunk):
        yield min(chunk, total - start)
