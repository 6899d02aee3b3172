"""A private mosquitto broker for the MQTT side of the updater, and a recorder of what it carries.

The agent is tested against the broker software it could meet in the field, with the access
rules of the IoT Platform: a device logs in over TLS with a password and may only publish its
uplinks and read its downlinks (the ACL below). Each :class:`Mosquitto` has its own config,
password file, ACL file, pid file and log under a work directory, runs in the foreground as our
child, and keeps its port across ``stop()``/``kill()``/``start()`` so a test can take the broker
away and bring it back at the same address.

:class:`Recorder` is the other end: an admin client subscribed to ``#`` that records every
message in order (the test's view of "the cloud") and publishes the pushes. It reconnects and
subscribes again by itself after the broker comes back; ``wait_ready()`` returns once it really
records again (a probe message went round), so nothing a test publishes afterwards is missed.

Running as root: mosquitto started as root switches to the user ``mosquitto`` unless the config
says ``user root``. The config says so (only when we are root): the certificate key, password
and ACL files live in pytest's 0700 temporary directories and the key is 0600; making all that
readable to ``mosquitto`` would mean chowning files and opening every directory up to the pytest
base dir, and the log and pid files would need the same. A broker that listens on 127.0.0.1 only
and lives for one test session does not need the privilege drop. As anybody else mosquitto
cannot switch users, so the line is left out (as nginx's ``user`` is, see nginx.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import paho.mqtt.client as mqtt

from .nginx import free_port
from .tls import TlsFiles

__all__ = [
    "DeviceTopics",
    "Mosquitto",
    "MosquittoError",
    "Recorder",
    "RecorderError",
    "Seen",
    "find_mosquitto",
    "mosquitto_available",
]

_CONFIG = """\
# Written by tests/harness/mosquitto.py: a private broker for the tests.
{user}
per_listener_settings false
allow_anonymous false
password_file {password_file}
acl_file {acl_file}
persistence false
pid_file {pid_file}
log_dest file {log_file}
log_type all
log_timestamp true
log_timestamp_format %Y-%m-%dT%H:%M:%S
connection_messages true
set_tcp_nodelay true

listener {port} {host}
cafile {ca_file}
certfile {cert_file}
keyfile {key_file}
require_certificate false
"""

_ACL = """\
# Written by tests/harness/mosquitto.py.
# The device: its own OTA topics only, each in the direction the protocol uses it.
user {device_user}
topic write {topics.inform}
topic write {topics.progress}
topic write {topics.get}
topic read {topics.upgrade}
topic read {topics.get_reply}

# The tests' recorder and publisher of pushes.
user {admin_user}
topic readwrite #
"""

_TOPIC_FORBIDDEN: Final = frozenset("/+#\x00")
_LOGIN_FORBIDDEN: Final = frozenset(":")
_RECONNECT_DELAY: Final = 0.25
"""Seconds between the recorder's attempts to reach a broker that went away."""


class MosquittoError(RuntimeError):
    """mosquitto would not start or stop; the message carries the tail of its log."""


class RecorderError(RuntimeError):
    """The recorder could not connect, subscribe or publish in time."""


def find_mosquitto() -> str | None:
    """The mosquitto binary, also when /usr/sbin is not on PATH (a non-root shell)."""
    return _find("mosquitto", "/usr/sbin", "/usr/local/sbin")


def _find(name: str, *extra_dirs: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in extra_dirs:
        candidate = Path(directory) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def mosquitto_available() -> tuple[bool, str]:
    """Whether the broker and its password tool are installed, and if not, why (``require``)."""
    if find_mosquitto() is None:
        return False, "mosquitto not installed (Debian package mosquitto)"
    if _find("mosquitto_passwd", "/usr/bin", "/usr/local/bin") is None:
        return False, "mosquitto_passwd not installed (Debian package mosquitto)"
    return True, ""


@dataclass(frozen=True, slots=True)
class DeviceTopics:
    """The five OTA topics of one device, written out here independently of ``updater.protocol``
    (the ACL is a second statement of the protocol, not a copy of the code under test)."""

    inform: str
    upgrade: str
    progress: str
    get: str
    get_reply: str

    @classmethod
    def of(cls, product_key: str, device_name: str) -> DeviceTopics:
        for name, value in (("product_key", product_key), ("device_name", device_name)):
            bad = [c for c in value if c in _TOPIC_FORBIDDEN or c.isspace()]
            if not value or bad:
                raise ValueError(f"{name} {value!r} cannot be one topic level")
        pk, dn = product_key, device_name
        return cls(
            inform=f"/ota/device/inform/{pk}/{dn}",
            upgrade=f"/ota/device/upgrade/{pk}/{dn}",
            progress=f"/ota/device/progress/{pk}/{dn}",
            get=f"/sys/{pk}/{dn}/thing/ota/firmware/get",
            get_reply=f"/sys/{pk}/{dn}/thing/ota/firmware/get_reply",
        )


def _check_login(kind: str, value: str) -> str:
    if not value or any(c in _LOGIN_FORBIDDEN or c.isspace() for c in value):
        raise ValueError(f"{kind} {value!r} cannot go into a mosquitto password/ACL file")
    return value


def _tls_context(ca_file: Path) -> ssl.SSLContext:
    """Full verification (chain and host name) against the test CA only."""
    return ssl.create_default_context(cafile=str(ca_file))


class Mosquitto:
    """One mosquitto process; ``start()``, ``stop()``, ``kill()`` may be called again and again.

    The device logs in as ``device_user``/``device_password`` (by default ``device_user`` and
    ``device_pass``), the tests as ``admin``/``admin_pass``. ``topics`` are the device's OTA
    topics, the only ones its ACL lets it use.
    """

    host: Final = "127.0.0.1"

    def __init__(
        self,
        tls: TlsFiles,
        work_dir: Path,
        *,
        product_key: str = "a1B2c3D4e5F",
        device_name: str = "pi-0001",
        device_user: str = "device_user",
        device_password: str = "device_pass",
        binary: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        found = binary or find_mosquitto()
        if found is None:
            raise MosquittoError("mosquitto not found (Debian package mosquitto)")
        self.binary = found
        self.tls = tls
        self.ca_file = tls.ca_file
        self.work_dir = work_dir
        self.start_timeout = start_timeout
        self.product_key = product_key
        self.device_name = device_name
        self.topics = DeviceTopics.of(product_key, device_name)
        self.device_user = _check_login("device_user", device_user)
        self.device_password = device_password
        self.admin_user = "admin"
        self.admin_password = "admin_pass"
        self.port = free_port()
        self.conf_file = work_dir / "mosquitto.conf"
        self.password_file = work_dir / "passwd"
        self.acl_file = work_dir / "acl"
        self.pid_file = work_dir / "mosquitto.pid"
        self.log_file = work_dir / "mosquitto.log"
        self.stderr_file = work_dir / "stderr.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running and self._process is not None else None

    # --- files -------------------------------------------------------------------------------

    def _write_files(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._write_password_file()
        self.acl_file.write_text(
            _ACL.format(
                device_user=self.device_user, admin_user=self.admin_user, topics=self.topics
            )
        )
        self.conf_file.write_text(
            _CONFIG.format(
                user="user root" if os.geteuid() == 0 else "",
                password_file=self.password_file,
                acl_file=self.acl_file,
                pid_file=self.pid_file,
                log_file=self.log_file,
                port=self.port,
                host=self.host,
                ca_file=self.tls.ca_file,
                cert_file=self.tls.cert_file,
                key_file=self.tls.key_file,
            )
        )

    def _write_password_file(self) -> None:
        passwd = _find("mosquitto_passwd", "/usr/bin", "/usr/local/bin")
        if passwd is None:
            raise MosquittoError("mosquitto_passwd not found (Debian package mosquitto)")
        tmp = self.password_file.with_name(f".{self.password_file.name}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.touch(mode=0o600)
        users = ((self.device_user, self.device_password), (self.admin_user, self.admin_password))
        for user, password in users:
            result = subprocess.run(
                [passwd, "-b", str(tmp), user, password],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise MosquittoError(
                    f"mosquitto_passwd failed for {user!r}: {result.stderr.strip()}"
                )
        tmp.replace(self.password_file)

    def log_text(self) -> str:
        """The broker's whole log (all sessions of this instance, appended)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.stderr_file, self.log_file):
            try:
                text = path.read_text(errors="replace").splitlines()[-lines:]
            except FileNotFoundError:
                continue
            if text:
                parts.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(parts) or "(no log)"

    # --- process -----------------------------------------------------------------------------

    def _accepts_tls(self) -> bool:
        """A full TLS handshake against the test CA succeeds on the port."""
        try:
            with (
                socket.create_connection((self.host, self.port), timeout=0.5) as raw,
                _tls_context(self.ca_file).wrap_socket(raw, server_hostname=self.host),
            ):
                return True
        except OSError:  # ssl.SSLError is an OSError
            return False

    def start(self) -> None:
        """Start mosquitto and return once its port completes TLS handshakes.

        The port stays the same for the life of this object. Only at the very first start, if
        another process took the free port in the meantime, a new one is picked.
        """
        if self.running:
            return
        for _attempt in range(3):
            self._write_files()
            if self._spawn():
                self._started_once = True
                return
            if self._started_once or "Address already in use" not in self.log_tail():
                break
            self.port = free_port()
        raise MosquittoError(f"mosquitto exited at start on port {self.port}:\n{self.log_tail()}")

    def _spawn(self) -> bool:
        """Run the broker; True once it accepts TLS, False if it exited (start failed)."""
        with self.stderr_file.open("ab") as stderr:
            process = subprocess.Popen(
                [self.binary, "-c", str(self.conf_file)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        self._process = process
        deadline = time.monotonic() + self.start_timeout
        while not self._accepts_tls():
            if process.poll() is not None:
                self._process = None
                return False
            if time.monotonic() > deadline:
                self.kill()
                raise MosquittoError(
                    f"mosquitto did not accept TLS on port {self.port} within "
                    f"{self.start_timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """Orderly shutdown (SIGTERM): clients see their connection closed."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise MosquittoError(
                f"mosquitto ignored SIGTERM for {timeout}s:\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL: the broker dies on the spot (no will handling, no clean close)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.kill()
        process.wait()

    def restart(self) -> None:
        """``stop()`` then ``start()``, on the same port."""
        self.stop()
        self.start()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- the recorder ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seen:
    """One message the recorder received; ``time`` is ``time.monotonic()`` at arrival."""

    topic: str
    payload: bytes
    time: float

    def json(self) -> Any:
        return json.loads(self.payload)


def _new_client(client_id: str) -> mqtt.Client:
    """A paho client with the VERSION2 callbacks of paho-mqtt 2.x, or a paho-mqtt 1.x client.

    Both call the callbacks below with the same leading arguments; the 2.x-only trailing ones
    are taken as ``*args``. VERSION1 under paho 2.x would raise a DeprecationWarning.
    """
    api = getattr(mqtt, "CallbackAPIVersion", None)
    if api is not None:
        return mqtt.Client(
            api.VERSION2, client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311
        )
    legacy: Any = mqtt.Client  # paho-mqtt 1.x: no callback_api_version parameter
    client: mqtt.Client = legacy(client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311)
    return client


def _no_delay(client: mqtt.Client, userdata: object, sock: Any) -> None:
    """``on_socket_open``: paho leaves Nagle on, and every QoS 1 round trip then waits ~40 ms
    for a delayed ACK; with TCP_NODELAY a publish and its PUBACK take well under a millisecond.
    """
    with contextlib.suppress(AttributeError, OSError):  # a socket without TCP options
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _is_failure(code: object) -> bool:
    """For a paho 2.x ReasonCode, or a paho 1.x CONNACK result / granted QoS (int)."""
    failure = getattr(code, "is_failure", None)
    if isinstance(failure, bool):
        return failure
    return isinstance(code, int) and code not in (0, 1, 2)


def _is_connack_failure(code: object) -> bool:
    failure = getattr(code, "is_failure", None)
    if isinstance(failure, bool):
        return failure
    return code != 0


class Recorder:
    """An admin client subscribed to ``#`` (QoS 1) that records every message, in order.

    Messages on ``harness/recorder/...`` (its own probes) are not recorded. It verifies the
    broker against the test CA, tries to reconnect every quarter second while the broker is
    away and subscribes again once it is back; call ``wait_ready()`` after bringing the broker
    back (``start()`` and ``broker_log`` have already waited).
    """

    PROBE_PREFIX: Final = "harness/recorder/"

    def __init__(
        self,
        broker: Mosquitto,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.broker = broker
        self.client_id = client_id or f"recorder-{secrets.token_hex(4)}"
        self._probe_topic = f"{self.PROBE_PREFIX}{self.client_id}"
        self._cond = threading.Condition()
        self._seen: list[Seen] = []
        self._probes: set[str] = set()
        self._acked: set[int] = set()
        self._connected = False
        self._subscribed = False
        self._subscribe_mid: int | None = None
        self._connections = 0
        self._last_problem = ""
        self._started = False

        client = _new_client(self.client_id)
        client.username_pw_set(username or broker.admin_user, password or broker.admin_password)
        client.tls_set_context(_tls_context(broker.ca_file))
        # paho types the delays as int but only does time arithmetic with them (1.x and 2.x);
        # a quarter second keeps a broker restart in a test short.
        delay: Any = _RECONNECT_DELAY
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client

    # --- callbacks (paho's network thread) ----------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: Any, reason: Any, *rest: Any
    ) -> None:
        if _is_connack_failure(reason):
            with self._cond:
                self._last_problem = f"CONNACK refused: {reason}"
                self._cond.notify_all()
            return
        result, mid = client.subscribe("#", qos=1)
        with self._cond:
            self._connected = True
            self._subscribe_mid = mid
            self._last_problem = "connected, no SUBACK for # yet"
            if result != mqtt.MQTT_ERR_SUCCESS:
                self._last_problem = f"SUBSCRIBE not sent: {mqtt.error_string(result)}"
            self._cond.notify_all()

    def _on_disconnect(self, client: mqtt.Client, userdata: object, *args: Any) -> None:
        with self._cond:
            self._connected = False
            self._subscribed = False
            self._last_problem = f"disconnected: {args[1] if len(args) > 1 else args[0]}"
            self._cond.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, granted: Any, *rest: Any
    ) -> None:
        with self._cond:
            if mid != self._subscribe_mid:
                return
            if any(_is_failure(code) for code in granted):
                self._last_problem = f"SUBSCRIBE # refused: {list(granted)}"
            else:
                self._subscribed = True
                self._connections += 1
                self._last_problem = ""
            self._cond.notify_all()

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, *rest: Any) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        topic = message.topic
        with self._cond:
            if topic.startswith(self.PROBE_PREFIX):
                if topic == self._probe_topic:
                    self._probes.add(bytes(message.payload).decode(errors="replace"))
            else:
                self._seen.append(Seen(topic, bytes(message.payload), now))
            self._cond.notify_all()

    # --- life cycle ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected and subscribed to ``#`` (as far as the client knows)."""
        with self._cond:
            return self._subscribed

    @property
    def connections(self) -> int:
        """How many times it has connected and subscribed: 1 after start, +1 per reconnect."""
        with self._cond:
            return self._connections

    def start(self, timeout: float = 10.0) -> Recorder:
        """Connect (raising OSError/ssl.SSLError as paho does), subscribe, ``wait_ready()``."""
        if self._started:
            raise RecorderError("a Recorder starts once; make a new one")
        self._started = True
        try:
            self._client.connect(self.broker.host, self.broker.port, keepalive=30)
            self._client.loop_start()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the recorder records: a probe it publishes comes back through ``#``.

        Right after a broker restart the client may not even have noticed the old connection
        drop; the round trip proves the current connection and subscription work.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            with self._cond:
                if remaining <= 0:
                    raise RecorderError(
                        f"recorder not ready within {timeout}s (broker port {self.broker.port}, "
                        f"running={self.broker.running}; last: {self._last_problem or 'none'})"
                    )
                self._cond.wait_for(lambda: self._subscribed, remaining)
                if not self._subscribed:
                    continue
            if self._probe(max(0.0, min(0.5, deadline - time.monotonic()))):
                return

    def _probe(self, timeout: float) -> bool:
        """Publish a probe; True if it came back through ``#`` within ``timeout``."""
        token = secrets.token_hex(8)
        info = self._client.publish(self._probe_topic, token, qos=0)
        with self._cond:
            arrived = self._cond.wait_for(lambda: token in self._probes, timeout)
            self._acked.discard(info.mid)
            self._probes.clear()
            return arrived

    def stop(self) -> None:
        """Disconnect and end the network thread (also while the broker is down)."""
        if not self._started:
            return
        self._started = False
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what was seen ------------------------------------------------------------------------

    def messages(self, topic_prefix: str | None = None) -> list[Seen]:
        """Everything recorded since the start or the last ``clear()``, in arrival order."""
        with self._cond:
            if topic_prefix is None:
                return list(self._seen)
            return [m for m in self._seen if m.topic.startswith(topic_prefix)]

    def json(self, topic: str) -> list[dict[str, Any]]:
        """The payloads on exactly ``topic``, each decoded as a JSON object, in order."""
        decoded: list[dict[str, Any]] = []
        for message in self.messages():
            if message.topic != topic:
                continue
            value = json.loads(message.payload)
            if not isinstance(value, dict):
                raise ValueError(f"{topic}: payload is not a JSON object: {message.payload!r}")
            decoded.append(value)
        return decoded

    def wait_for(self, predicate: Callable[[Seen], bool] | str, timeout: float = 10.0) -> Seen:
        """The first recorded message (since the last ``clear()``) that matches; waits for one.

        ``predicate`` may be a topic (exact match). Raises TimeoutError listing what was seen.
        """
        match = (lambda m: m.topic == predicate) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        checked = 0
        with self._cond:
            while True:
                for message in self._seen[checked:]:
                    if match(message):
                        return message
                checked = len(self._seen)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = "\n".join(f"  {m.topic} {m.payload[:200]!r}" for m in self._seen[-20:])
                    raise TimeoutError(
                        f"no matching message within {timeout}s; last seen:\n{seen or '  nothing'}"
                    )
                self._cond.wait(remaining)

    def clear(self) -> None:
        """Forget everything recorded so far."""
        with self._cond:
            self._seen.clear()

    # --- publishing ---------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes | str | Mapping[str, Any],
        qos: int = 1,
        *,
        retain: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Publish as admin (the pushes); return once the broker acknowledged it (QoS 1, 2) or
        it was written to the socket (QoS 0); RecorderError after ``timeout``.

        A mapping is sent as compact JSON. Waits for the connection first, so it may be called
        right after the broker was restarted.
        """
        if isinstance(payload, Mapping):
            data: bytes | str = json.dumps(payload, separators=(",", ":"))
        else:
            data = payload
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._cond.wait_for(lambda: self._connected, timeout):
                raise RecorderError(f"publish to {topic}: not connected within {timeout}s")
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        with self._cond:
            done = self._cond.wait_for(
                lambda: info.mid in self._acked, max(0.0, deadline - time.monotonic())
            )
            self._acked.discard(info.mid)
        if not done:
            raise RecorderError(
                f"publish to {topic} not acknowledged within {timeout}s "
                f"(rc {info.rc}; last: {self._last_problem or 'none'})"
            )
