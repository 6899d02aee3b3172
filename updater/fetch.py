"""HTTPS transfer of one file with libcurl (pycurl), resumed with ``Range`` until it is whole.

The resume contract: the receiver owns the offset. Each attempt asks for ``bytes=<offset>-``
with ``If-Range`` set to the validator (ETag, else Last-Modified) of the first response, so a
file that changed on the server comes back whole (200) instead of being spliced. Every answer is
checked against the task before a body byte is accepted:

====================  =====================================================================
206                   Content-Range must start at our offset and end at the task's size
200 to a range        the server ignored Range: skip the prefix we have, if unchanged
200 with a new ETag   the file changed: start that file over (bounded by ``max_restarts``)
416                   the server's file is shorter than the task says: fail
5xx, 408, 429         transient: back off and resume
other 3xx/4xx         fail (a presigned URL that expired will not heal by retrying)
====================  =====================================================================

Transient failures (cuts, resets, stalls under the low-speed limit, 5xx) are retried with capped
exponential back-off; the retry budget counts consecutive attempts that brought no new byte,
so a link that keeps dropping but keeps making progress is followed to the end.
pycurl's errors become the project's errors in :func:`translate_error`, and only there.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import pycurl

from updater.config import DownloadConfig
from updater.errors import DownloadError, RemoteChangedError, TransientDownloadError

log = logging.getLogger("updater.fetch")

#: libcurl error codes worth another attempt: the network, not the request, failed.
TRANSIENT_CURL_ERRORS = frozenset(
    {
        pycurl.E_COULDNT_RESOLVE_HOST,  # DNS on a device coming online
        pycurl.E_COULDNT_CONNECT,
        pycurl.E_OPERATION_TIMEDOUT,  # includes the low-speed limit: a stall
        pycurl.E_PARTIAL_FILE,  # the connection closed before Content-Length
        pycurl.E_GOT_NOTHING,
        pycurl.E_SEND_ERROR,
        pycurl.E_RECV_ERROR,  # a reset
        pycurl.E_SSL_CONNECT_ERROR,  # a reset during the handshake
        getattr(pycurl, "E_HTTP2", 16),
        getattr(pycurl, "E_HTTP2_STREAM", 92),
    }
)
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)", re.IGNORECASE)


class Receiver(Protocol):
    """Takes the bytes of one file in order (see :class:`updater.stream.FileStream`)."""

    offset: int

    def write(self, data: bytes) -> None: ...

    def checkpoint(self) -> int: ...

    def restart(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How long to keep trying: an immutable value, so tests can make it fast."""

    retries: int = 10
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    max_restarts: int = 3

    @classmethod
    def from_config(cls, cfg: DownloadConfig) -> RetryPolicy:
        return cls(cfg.retries, cfg.backoff_initial, cfg.backoff_max, cfg.max_restarts)

    def delay(self, failures: int, *, jitter: float = 1.0) -> float:
        """Back-off before attempt ``failures + 1``: doubling from the initial delay, capped.

        ``jitter`` in [0.5, 1] scales it, so that a fleet that lost its server at the same moment
        does not come back in lockstep.
        """
        exponent = min(max(0, failures - 1), 62)
        return min(self.backoff_max, self.backoff_initial * 2.0**exponent) * jitter


@dataclass(frozen=True, slots=True)
class Validator:
    """What identifies one version of the remote file (strong ETag preferred)."""

    etag: str | None = None
    last_modified: str | None = None

    def if_range(self) -> str | None:
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def differs(self, other: Validator) -> bool:
        """True when both sides identify the file and the identities differ."""
        if self.etag and other.etag:
            return self.etag != other.etag
        if self.last_modified and other.last_modified:
            return self.last_modified != other.last_modified
        return False


@dataclass(slots=True)
class FetchStats:
    attempts: int = 0
    bytes_received: int = 0  # body bytes received from the network, including discarded ones
    bytes_discarded: int = 0  # body bytes skipped (a 200 answer to a range request)
    restarts: int = 0  # times the file started over because it changed on the server


def translate_error(
    err: pycurl.error, *, url: str, offset: int, file_name: str | None
) -> DownloadError:
    """The one place where libcurl's error codes become the project's errors."""
    code = err.args[0] if err.args else -1
    text = err.args[1] if len(err.args) > 1 else str(err)
    kind = TransientDownloadError if code in TRANSIENT_CURL_ERRORS else DownloadError
    if code == pycurl.E_OPERATION_TIMEDOUT:
        text = f"stalled or timed out ({text})"
    elif code == pycurl.E_PEER_FAILED_VERIFICATION:
        text = f"TLS verification failed ({text})"
    return kind(f"curl error {code}: {text}", url=url, offset=offset, file_name=file_name)


class Transfer:
    """Fetches one URL into a receiver, resuming until ``size`` bytes have been accepted."""

    def __init__(
        self,
        url: str,
        size: int,
        settings: DownloadConfig,
        *,
        file_name: str,
        policy: RetryPolicy | None = None,
        validator: Validator | None = None,
        on_validator: Callable[[Validator], None] = lambda v: None,
        sleep: Callable[[float], None] = time.sleep,
        host_allowed: Callable[[str], bool] = lambda host: True,
    ) -> None:
        self.url = url
        self.host_allowed = host_allowed
        self.size = size
        self.settings = settings
        self.file_name = file_name
        self.policy = policy or RetryPolicy.from_config(settings)
        self.validator = validator or Validator()
        self.on_validator = on_validator
        self.sleep = sleep
        self.stats = FetchStats()
        self._curl = self._make_curl()

    def _make_curl(self) -> pycurl.Curl:
        s = self.settings
        c = pycurl.Curl()
        c.setopt(pycurl.URL, self.url)
        c.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTPS)
        # Redirects are followed by _attempt, not libcurl: each hop's URL, as libcurl resolves
        # it, is checked (https, an allowed host) before a request goes there.
        c.setopt(pycurl.FOLLOWLOCATION, 0)
        c.setopt(pycurl.SSL_VERIFYPEER, 1)
        c.setopt(pycurl.SSL_VERIFYHOST, 2)
        if s.ca_file:
            # Pin: only this bundle. Debian's libcurl also trusts CAPATH=/etc/ssl/certs by
            # default, which would let any public CA vouch for the update server.
            c.setopt(pycurl.CAINFO, s.ca_file)
            c.unsetopt(pycurl.CAPATH)
        elif Path(SYSTEM_CA_BUNDLE).is_file():
            # The system trust store; a libcurl built elsewhere (a wheel) may look for another path.
            c.setopt(pycurl.CAINFO, SYSTEM_CA_BUNDLE)
        c.setopt(pycurl.CONNECTTIMEOUT_MS, int(s.connect_timeout * 1000))
        c.setopt(pycurl.LOW_SPEED_LIMIT, s.low_speed_limit)
        c.setopt(pycurl.LOW_SPEED_TIME, s.low_speed_time)
        c.setopt(pycurl.NOSIGNAL, 1)
        c.setopt(pycurl.ACCEPT_ENCODING, None)  # identity: the digest is over the raw bytes
        c.setopt(pycurl.HTTP_CONTENT_DECODING, 0)
        c.setopt(pycurl.USERAGENT, "rpi-ab-updater")
        # Fewer, larger callbacks; libcurl caps this at its own maximum.
        c.setopt(pycurl.BUFFERSIZE, 128 * 1024)
        return c

    def close(self) -> None:
        self._curl.close()

    def run(self, receiver: Receiver) -> FetchStats:
        """Fetch until the receiver holds ``size`` bytes; raise DownloadError when out of budget."""
        failures = 0
        try:
            while receiver.offset < self.size:
                before = receiver.offset
                try:
                    self._attempt(receiver)
                except RemoteChangedError as err:
                    self.stats.restarts += 1
                    if self.stats.restarts > self.policy.max_restarts:
                        raise DownloadError(
                            f"the file kept changing on the server ({self.stats.restarts} times)",
                            url=self.url,
                            offset=receiver.offset,
                            file_name=self.file_name,
                        ) from err
                    log.warning("%s: %s; starting it over", self.file_name, err.message)
                    receiver.restart()
                    failures = 0
                    continue
                except TransientDownloadError as err:
                    failures = 1 if receiver.offset > before else failures + 1
                    if failures > self.policy.retries:
                        raise DownloadError(
                            f"gave up after {failures} attempts without progress: {err.message}",
                            url=self.url,
                            offset=receiver.offset,
                            file_name=self.file_name,
                        ) from err
                    receiver.checkpoint()
                    pause = self.policy.delay(failures, jitter=random.uniform(0.5, 1.0))  # noqa: S311
                    if err.retry_after is not None:
                        pause = min(max(pause, err.retry_after), self.policy.backoff_max)
                    log.info(
                        "%s: %s at byte %d; resuming in %.1f s",
                        self.file_name,
                        err.message,
                        receiver.offset,
                        pause,
                    )
                    self.sleep(pause)
        finally:
            self.close()
        return self.stats

    def _attempt(self, receiver: Receiver) -> None:
        """One HTTP request from the receiver's offset, following redirects (each checked)."""
        self.stats.attempts += 1
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            location = self._request(url, receiver)
            if location is None:
                return
            url = self._redirect_target(location, receiver)
        raise DownloadError(
            f"more than {MAX_REDIRECTS} redirects",
            url=self.url,
            offset=receiver.offset,
            file_name=self.file_name,
        )

    def _redirect_target(self, location: str, receiver: Receiver) -> str:
        parts = urlsplit(location)
        host = parts.hostname or ""
        if parts.scheme.lower() != "https":
            why = f"to {parts.scheme or 'a relative'} URL, not https"
        elif not self.host_allowed(host):
            why = f"to {host!r}, not an allowed host"
        else:
            return location
        raise DownloadError(
            f"the server redirects {why}",
            url=self.url,
            offset=receiver.offset,
            file_name=self.file_name,
        )

    def _request(self, url: str, receiver: Receiver) -> str | None:
        """One request of ``url``; the redirect target (as libcurl resolves it) or None."""
        attempt = _Attempt(self, receiver)
        c = self._curl
        c.setopt(pycurl.URL, url)
        headers = []
        if receiver.offset > 0:
            c.setopt(pycurl.RANGE, f"{receiver.offset}-")
            tag = self.validator.if_range()
            if tag:
                headers.append(f"If-Range: {tag}")
        else:
            c.setopt(pycurl.RANGE, None)
        if headers:
            c.setopt(pycurl.HTTPHEADER, headers)
        else:
            c.unsetopt(pycurl.HTTPHEADER)  # setopt with [] would keep the previous list
        c.setopt(pycurl.HEADERFUNCTION, attempt.header)
        c.setopt(pycurl.WRITEFUNCTION, attempt.body)
        try:
            c.perform()
        except pycurl.error as err:
            if attempt.failure is not None:
                raise attempt.failure from None
            raise translate_error(
                err, url=self.url, offset=receiver.offset, file_name=self.file_name
            ) from err
        finally:
            c.setopt(pycurl.HEADERFUNCTION, _ignore)
            c.setopt(pycurl.WRITEFUNCTION, _ignore)
        if attempt.failure is not None:
            raise attempt.failure
        if attempt.redirect:
            location = c.getinfo(pycurl.REDIRECT_URL)
            if not location:
                raise attempt.error(f"HTTP {attempt.status} without a Location")
            return str(location)
        attempt.check_status()  # a body-less answer (416, 503 with no body) lands here
        if receiver.offset < attempt.promised_end:
            raise TransientDownloadError(
                f"the connection ended at byte {receiver.offset} of {self.size}",
                url=self.url,
                offset=receiver.offset,
                file_name=self.file_name,
            )
        # A 206 may cover less than asked (RFC 9110): the loop asks for the rest at once.
        return None


def _ignore(data: bytes) -> None:
    return None


class _Attempt:
    """State of one request: its response headers and the decision taken on the first body byte."""

    def __init__(self, transfer: Transfer, receiver: Receiver) -> None:
        self.t = transfer
        self.receiver = receiver
        self.requested = receiver.offset
        self.promised_end = transfer.size  # where this response's body ends in the file
        self.status = 0
        self.headers: dict[str, str] = {}
        self.decided = False
        self.skip = 0
        self.start_over = False
        self.failure: BaseException | None = None
        self._fresh: Validator | None = None

    def error(self, message: str, kind: type[DownloadError] = DownloadError) -> DownloadError:
        return kind(
            message, url=self.t.url, offset=self.receiver.offset, file_name=self.t.file_name
        )

    def header(self, line: bytes) -> int | None:
        text = line.decode("iso-8859-1").strip()
        if text.upper().startswith("HTTP/"):
            parts = text.split(None, 2)
            self.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            self.headers = {}  # a new response (after a redirect or a 100)
        elif ":" in text:
            name, value = text.split(":", 1)
            self.headers[name.strip().lower()] = value.strip()
        return None

    @property
    def redirect(self) -> bool:
        return self.status in REDIRECTS

    def body(self, data: bytes) -> int | None:
        if self.redirect:
            return None  # a redirect's own body is not the file
        try:
            if not self.decided:
                self.check_status()
                self.decided = True
                if self.start_over:
                    self._start_over()
            self.t.stats.bytes_received += len(data)
            if self.skip:
                dropped = min(self.skip, len(data))
                self.skip -= dropped
                self.t.stats.bytes_discarded += dropped
                data = data[dropped:]
                if not data:
                    return None
            self.receiver.write(data)
        except BaseException as err:  # kept with its type (a full disk is not a download error,
            self.failure = err  # Ctrl-C is Ctrl-C) and raised again once libcurl returned
            return 0  # anything but len(data) makes libcurl abort with a write error
        return None

    def check_status(self) -> None:
        """Judge the response before accepting its body; raise to refuse it."""
        if self.decided:
            return
        status, size = self.status, self.t.size
        if status in TRANSIENT_HTTP:
            err = TransientDownloadError(
                f"HTTP {status} from the server",
                url=self.t.url,
                offset=self.receiver.offset,
                file_name=self.t.file_name,
            )
            after = self.headers.get("retry-after", "")
            if after.isdigit():
                err.retry_after = float(after)
            raise err
        if status == 416:
            m = _UNSATISFIED_RANGE.search(self.headers.get("content-range", ""))
            has = f" (the server has {m.group(1)} bytes)" if m else ""
            raise self.error(
                f"HTTP 416: range from byte {self.requested} refused; the task says "
                f"{size} bytes{has}"
            )
        if status not in (200, 206):
            raise self.error(f"HTTP {status} from the server")
        fresh = Validator(self.headers.get("etag"), self.headers.get("last-modified"))
        changed = self.t.validator.differs(fresh)
        if status == 206:
            self._check_partial(changed)
        else:
            self._check_whole(fresh, changed)
        if fresh != self.t.validator and (fresh.etag or fresh.last_modified):
            # After a start-over only: the journal must never pair the new file's validator
            # with the old file's durable prefix (a power cut in between would splice them).
            self._fresh = fresh
            if not self.start_over:
                self._record_validator()

    def _record_validator(self) -> None:
        if self._fresh is not None:
            self.t.validator = self._fresh
            self.t.on_validator(self._fresh)
            self._fresh = None

    def _check_partial(self, changed: bool) -> None:
        m = _CONTENT_RANGE.search(self.headers.get("content-range", ""))
        if not m:
            raise self.error("HTTP 206 without a usable Content-Range")
        first, last, total = int(m.group(1)), int(m.group(2)), m.group(3)
        if total != "*" and int(total) != self.t.size:
            raise self.error(f"the server has {total} bytes, the task says {self.t.size}")
        if first != self.requested or not first <= last < self.t.size:
            raise self.error(f"asked for bytes {self.requested}-, the server sent {first}-{last}")
        if changed:
            # If-Range should have made this a 200; a server that ignores it still must not
            # splice two versions of the file.
            raise self.error("the file changed on the server", RemoteChangedError)
        self.promised_end = last + 1

    def _check_whole(self, fresh: Validator, changed: bool) -> None:
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) != self.t.size:
            raise self.error(
                f"the server sends {length} bytes (Content-Length), the task says {self.t.size}"
            )
        if self.requested == 0:
            return
        comparable = bool(
            (fresh.etag and self.t.validator.etag)
            or (fresh.last_modified and self.t.validator.last_modified)
        )
        if changed or not comparable:
            # The whole file comes anyway: take it from byte 0 rather than splice it onto a
            # prefix that may belong to another version.
            self.start_over = True
            return
        # The server ignored our Range for the same file: the prefix comes again; drop it.
        log.info(
            "%s: the server answered 200 to a range request; skipping %d bytes",
            self.t.file_name,
            self.requested,
        )
        self.skip = self.requested

    def _start_over(self) -> None:
        stats = self.t.stats
        stats.restarts += 1
        if stats.restarts > self.t.policy.max_restarts:
            raise self.error(f"the file kept changing on the server ({stats.restarts} times)")
        log.warning(
            "%s: the server sent the whole file, which changed or cannot be compared; "
            "taking it from byte 0",
            self.t.file_name,
        )
        self.receiver.restart()
        self._record_validator()
