"""A fault-injecting HTTPS proxy in front of nginx, scripted per request.

The downloader's resume contract is only proven by breaking real transfers at known places: cut
a response after N body bytes, reset the TCP connection, stall with the socket open, drop the
Range header so the server answers 200 to a resume, serve a different file, or answer 5xx. The
proxy terminates TLS with the test certificate (so the client verifies it as usual), forwards
each request to nginx's plain-HTTP port with ``Connection: close`` and relays the answer, one
request per connection, counting the body bytes it hands to the client.

Faults are taken in order, one per request: ``proxy.script(Fault(cut_after=1000), Fault())``;
requests beyond the script get ``proxy.default`` (no fault unless set). Every request is logged
in ``proxy.requests``; call ``proxy.wait_idle()`` before asserting on the log or the byte
counters, since a client can see the last byte before the proxy has finished its bookkeeping.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import http
import random
import socket
import ssl
import struct
import termios
import threading
import time
from dataclasses import dataclass

from .tls import TlsFiles

__all__ = ["Fault", "FaultProxy", "RequestLog", "random_cuts"]

_CHUNK = 64 * 1024
_HEAD_LIMIT = 64 * 1024
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection"})
_VALIDATORS = frozenset({"etag", "last-modified"})


@dataclass(frozen=True, slots=True)
class Fault:
    """What to do to one request. Offsets count response body bytes, not headers.

    When several of ``cut_after``/``reset_after``/``stall_after`` are set, the smallest acts.
    An offset acts only if the body is longer than it: the client never loses bytes to it
    otherwise. ``status`` answers without contacting nginx (``delay`` still applies first).
    """

    cut_after: int | None = None
    reset_after: int | None = None
    stall_after: int | None = None
    stall_seconds: float = 0.0
    strip_range: bool = False
    rewrite_path: str | None = None
    status: int | None = None
    delay: float = 0.0
    #: Drop ETag and Last-Modified from the answer (a server that gives no validator).
    strip_validators: bool = False

    def break_point(self) -> tuple[int, str] | None:
        """The body offset at which the transfer is broken and how: "cut", "reset" or "stall"."""
        points = [
            (offset, kind)
            for offset, kind in (
                (self.cut_after, "cut"),
                (self.reset_after, "reset"),
                (self.stall_after, "stall"),
            )
            if offset is not None
        ]
        return min(points) if points else None


@dataclass(slots=True)
class RequestLog:
    """One request as the client sent it and what the proxy did with it.

    ``status`` is None when no answer was sent; ``error`` says why a connection ended abnormally
    (client gone, upstream down); ``done`` turns True when the proxy has closed the connection.
    """

    method: str
    path: str
    headers: dict[str, str]
    fault: Fault | None
    status: int | None = None
    body_bytes: int = 0
    error: str | None = None
    done: bool = False


def random_cuts(n: int, size: int, seed: int) -> list[Fault]:
    """``n`` faults cutting the body at reproducible random offsets in ``[1, size)``."""
    if size < 2:
        raise ValueError("size must be at least 2 to cut inside the body")
    rng = random.Random(seed)
    return [Fault(cut_after=rng.randrange(1, size)) for _ in range(n)]


def _read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """Read up to the blank line; return (head, bytes after it), or None on a silent close."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > _HEAD_LIMIT:
            raise ValueError("HTTP head too large")
        chunk = sock.recv(_CHUNK)
        if not chunk:
            if buf:
                raise ConnectionError("connection closed inside the HTTP head")
            return None
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Split a head into its first line and its header fields (names as sent)."""
    first, *lines = head.decode("latin-1").split("\r\n")
    fields: list[tuple[str, str]] = []
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"malformed header line {line!r}")
        fields.append((name.strip(), value.strip()))
    return first, fields


def _build_head(first: str, fields: list[tuple[str, str]], drop: frozenset[str]) -> bytes:
    kept = [f"{name}: {value}" for name, value in fields if name.lower() not in drop]
    return "\r\n".join([first, *kept, "Connection: close", "", ""]).encode("latin-1")


def _close_clean(sock: ssl.SSLSocket) -> None:
    """Send TLS close_notify so the client sees a clean end of stream, not a broken one."""
    with contextlib.suppress(OSError, ValueError):
        sock.settimeout(1.0)
        sock.unwrap()


def _drain(sock: socket.socket, timeout: float) -> None:
    """Wait until the kernel has no unacknowledged bytes queued for the peer (or timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        if queued == 0:
            return
        time.sleep(0.005)


class FaultProxy:
    """HTTPS on 127.0.0.1:``port`` in front of ``upstream_port`` (plain HTTP)."""

    def __init__(
        self,
        upstream_port: int,
        tls: TlsFiles,
        *,
        upstream_host: str = "127.0.0.1",
        io_timeout: float = 30.0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.ca_file = tls.ca_file
        self.io_timeout = io_timeout
        self.default: Fault | None = None
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(tls.cert_file, tls.key_file)
        self._lock = threading.Condition()
        self._script: collections.deque[Fault] = collections.deque()
        self._requests: list[RequestLog] = []
        self._body_bytes_total = 0
        self._errors: list[str] = []
        # Each live connection's control socket (a dup) lets stop() wake its blocked thread.
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._listener: socket.socket | None = self._bind(0)
        self.port: int = self._listener.getsockname()[1]

    # -- scripting and inspection ---------------------------------------------------------

    def url(self, name: str) -> str:
        return f"https://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def script(self, *faults: Fault) -> None:
        """Replace the pending script: the next requests get these faults, in order."""
        with self._lock:
            self._script = collections.deque(faults)

    def clear(self) -> None:
        """Forget the script, the request log and the byte counter (``default`` stays)."""
        with self._lock:
            self._script.clear()
            self._requests.clear()
            self._body_bytes_total = 0

    @property
    def pending(self) -> int:
        """How many scripted faults have not been used yet."""
        with self._lock:
            return len(self._script)

    @property
    def requests(self) -> list[RequestLog]:
        """A snapshot of the log; entries of open connections may still change."""
        with self._lock:
            return list(self._requests)

    @property
    def body_bytes_total(self) -> int:
        with self._lock:
            return self._body_bytes_total

    @property
    def errors(self) -> list[str]:
        """Unexpected exceptions inside the proxy (bugs in the harness); should stay empty."""
        with self._lock:
            return list(self._errors)

    def wait_idle(self, timeout: float = 5.0) -> None:
        """Block until every connection is closed and logged; TimeoutError if it takes longer."""
        with self._lock:
            if not self._lock.wait_for(lambda: not self._connections, timeout):
                raise TimeoutError(f"{len(self._connections)} proxy connection(s) still open")

    # -- lifecycle ------------------------------------------------------------------------

    def _bind(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    def start(self) -> None:
        """Listen and serve in background threads; again on the same port after ``stop()``."""
        with self._lock:
            if self._accept_thread is not None:
                return
            listener = self._listener if self._listener is not None else self._bind(self.port)
            self._listener = listener
            listener.listen(64)
            listener.settimeout(0.1)
            self._stopping.clear()
            self._accept_thread = threading.Thread(
                target=self._accept_loop, args=(listener,), name="faultproxy-accept", daemon=True
            )
            self._accept_thread.start()

    def stop(self) -> None:
        """Stop accepting, break every open connection and wait for the threads."""
        self._stopping.set()
        thread, self._accept_thread = self._accept_thread, None
        if thread is not None:
            thread.join()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            live = dict(self._connections)
        for control in live.values():
            with contextlib.suppress(OSError):
                control.shutdown(socket.SHUT_RDWR)
        for handler in live:
            handler.join(timeout=5.0)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- serving --------------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            control = raw.dup()
            handler = threading.Thread(
                target=self._serve, args=(raw, control), name="faultproxy-conn", daemon=True
            )
            with self._lock:
                self._connections[handler] = control
            handler.start()

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._script.popleft() if self._script else self.default

    def _count(self, log: RequestLog, n: int) -> None:
        with self._lock:
            log.body_bytes += n
            self._body_bytes_total += n

    def _serve(self, raw: socket.socket, control: socket.socket) -> None:
        """Handle one connection; never raises (a killed client is routine, not an error)."""
        log: RequestLog | None = None
        upstream: socket.socket | None = None
        client: ssl.SSLSocket | None = None
        try:
            raw.settimeout(self.io_timeout)
            client = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            client.do_handshake()
            received = _read_head(client)
            if received is None:
                return
            head, rest = received
            first, fields = _parse_head(head)
            method, path, version = first.split(" ", 2)
            headers: dict[str, str] = {}
            for name, value in fields:
                key = name.lower()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            fault = self._next_fault()
            log = RequestLog(method=method, path=path, headers=headers, fault=fault)
            with self._lock:
                self._requests.append(log)
            if fault is not None and fault.delay > 0:
                self._stopping.wait(fault.delay)
            if fault is not None and fault.status is not None:
                self._answer_status(client, fault.status)
                log.status = fault.status
                _close_clean(client)
                return
            drop = _HOP_BY_HOP
            if fault is not None and fault.strip_range:
                drop = drop | {"range", "if-range"}
            if fault is not None and fault.rewrite_path is not None:
                path = "/" + fault.rewrite_path.lstrip("/")
            upstream = socket.create_connection(self.upstream, timeout=self.io_timeout)
            upstream.sendall(_build_head(f"{method} {path} {version}", fields, drop) + rest)
            self._forward_request_body(client, upstream, headers, len(rest))
            self._relay(client, upstream, log, fault)
        except (OSError, ValueError) as err:
            if log is not None:
                log.error = f"{type(err).__name__}: {err}"
        except Exception as err:  # a bug here must surface in a test, not kill the thread
            with self._lock:
                self._errors.append(f"{type(err).__name__}: {err}")
            if log is not None:
                log.error = f"{type(err).__name__}: {err}"
        finally:
            for sock in (upstream, client, raw, control):
                if sock is not None:
                    sock.close()
            with self._lock:
                if log is not None:
                    log.done = True
                self._connections.pop(threading.current_thread(), None)
                self._lock.notify_all()

    def _answer_status(self, client: ssl.SSLSocket, status: int) -> None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Injected"
        body = f"{status} {phrase} (injected by the fault proxy)\n".encode()
        head = (
            f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        client.sendall(head.encode("latin-1") + body)

    def _forward_request_body(
        self, client: ssl.SSLSocket, upstream: socket.socket, headers: dict[str, str], sent: int
    ) -> None:
        remaining = int(headers.get("content-length", "0")) - sent
        while remaining > 0:
            chunk = client.recv(min(remaining, _CHUNK))
            if not chunk:
                raise ConnectionError("client closed inside the request body")
            upstream.sendall(chunk)
            remaining -= len(chunk)

    def _relay(
        self,
        client: ssl.SSLSocket,
        upstream: socket.socket,
        log: RequestLog,
        fault: Fault | None,
    ) -> None:
        received = _read_head(upstream)
        if received is None:
            raise ConnectionError("upstream closed without answering")
        head, body = received
        first, fields = _parse_head(head)
        log.status = int(first.split(" ", 2)[1])
        drop = (
            _HOP_BY_HOP | _VALIDATORS
            if fault is not None and fault.strip_validators
            else _HOP_BY_HOP
        )
        client.sendall(_build_head(first, fields, drop))
        point = fault.break_point() if fault is not None else None
        sent = 0
        while True:
            if not body:
                body = upstream.recv(_CHUNK)
                if not body:
                    break
            if point is not None and sent + len(body) > point[0]:
                piece = body[: point[0] - sent]
                if piece:
                    client.sendall(piece)
                    self._count(log, len(piece))
                self._break(client, point[1], fault)
                return
            client.sendall(body)
            sent += len(body)
            self._count(log, len(body))
            body = b""
        _close_clean(client)

    def _break(self, client: ssl.SSLSocket, kind: str, fault: Fault | None) -> None:
        if kind == "reset":
            # Let the bytes already sent reach the client, then make the final close (the caller
            # closes every fd right away) send RST: linger 0 drops whatever is still queued.
            _drain(client, timeout=1.0)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if kind == "stall" and fault is not None:
            self._stopping.wait(fault.stall_seconds)
        _close_clean(client)
