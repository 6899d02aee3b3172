"""The IoT Platform OTA protocol on the wire: topics, uplink payloads, login, downlink parsing.

Pure: no I/O, no MQTT client. The agent owns the connection; this module only says what to
publish where, what to log in with, and what an incoming message means. Everything follows
``docs/ota-protocol.md`` (Alibaba Cloud IoT Platform as spoken by Link SDK for C 4.x), so a
fleet can be driven by the real platform or by any MQTT broker with a publisher that sends the
same messages.

Uplink payloads are compact JSON (no whitespace) in UTF-8, keys in the order of the protocol's
examples. The module ``default`` is the whole-device firmware, which the protocol expresses by
*not* naming a module: every builder omits ``"module"`` for ``None`` and for ``"default"``
alike, and :func:`task_module` maps a task's module the same way.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Final

from updater.task import NoTaskPending, Task, parse_task

DEFAULT_MODULE: Final = "default"
"""The platform's name for the whole-device firmware; never sent, absence means the same."""

STEP_MIN: Final = -4
"""-1 update failed, -2 download failed, -3 verification failed, -4 writing failed."""
STEP_MAX: Final = 100
MAX_DESC_CHARS: Final = 512
"""Longer ``desc`` texts are cut to this many characters, the last one an ellipsis."""
ELLIPSIS: Final = "\u2026"

SDK_TIMESTAMP: Final = "2524608000000"
"""The fixed timestamp Link SDK for C puts in the clientId (and so in the signed text)."""
SECURE_MODES: Final = frozenset({2, 3})
"""``securemode`` 2: TLS; 3: plain TCP (which the platform refuses for new devices)."""

GET_METHOD: Final = "thing.ota.firmware.get"
GET_VERSION: Final = "1.0"

_TOPIC_FORBIDDEN: Final = frozenset("/+#\x00")
# Separators of the clientId (``|``, ``,``, ``=``) and the username (``&``).
_LOGIN_FORBIDDEN: Final = frozenset("|,=&")
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")


# --- topics --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Topics:
    """The five OTA topics of one device (there are no per-module topics)."""

    inform: str
    """device -> cloud: the version report."""
    upgrade: str
    """cloud -> device: the update push (subscribe explicitly)."""
    progress: str
    """device -> cloud: progress and failure reports."""
    get: str
    """device -> cloud: ask for a pending update."""
    get_reply: str
    """cloud -> device: the answer to ``get`` (subscribe explicitly)."""


def topics(product_key: str, device_name: str) -> Topics:
    """The OTA topics of device ``device_name`` of product ``product_key``.

    Raises ValueError for a ProductKey or DeviceName that would break a topic: empty, or
    holding ``/``, ``+``, ``#``, whitespace, NUL or another non-printable character.
    """
    pk = _topic_level(product_key, "product_key")
    dn = _topic_level(device_name, "device_name")
    return Topics(
        inform=f"/ota/device/inform/{pk}/{dn}",
        upgrade=f"/ota/device/upgrade/{pk}/{dn}",
        progress=f"/ota/device/progress/{pk}/{dn}",
        get=f"/sys/{pk}/{dn}/thing/ota/firmware/get",
        get_reply=f"/sys/{pk}/{dn}/thing/ota/firmware/get_reply",
    )


def _topic_level(value: object, name: str) -> str:
    """One topic level: non-empty, printable, no whitespace, no separator or wildcard."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    for char in value:
        if char in _TOPIC_FORBIDDEN or char.isspace() or not char.isprintable():
            raise ValueError(f"{name} {value!r} must not contain {char!r}")
    return value


# --- message ids ---------------------------------------------------------------------------------


class MessageIds:
    """Increasing message ids 1, 2, 3, ... for the uplinks of one process; thread-safe.

    The agent keeps one instance for its lifetime. The ids are never reused within it, so a
    reply (``get_reply`` echoes the id) can be matched to its request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    def next(self) -> int:
        """The next id; no two calls, from any threads, return the same one."""
        with self._lock:
            return next(self._counter)


# --- device -> cloud payloads --------------------------------------------------------------------


def inform_payload(msg_id: int, version: str, module: str | None = None) -> bytes:
    """The version report: ``{"id":N,"params":{"version":V}}``, plus ``"module"`` if not default.

    One module per message. The platform counts an update as successful only when the device
    informs the new version (progress 100 is not success).
    """
    params: dict[str, object] = {"version": _version(version)}
    _add_module(params, module)
    return _encode({"id": _msg_id(msg_id), "params": params})


def progress_payload(msg_id: int, step: int, desc: str = "", module: str | None = None) -> bytes:
    """A progress report: ``{"id":N,"params":{"step":"45","desc":""}}``, plus ``"module"``.

    ``step`` is 0..100 (percent) or -1..-4 (update, download, verification, writing failed);
    anything else raises ValueError, as no other code exists. It travels as a JSON *string*
    holding the signed integer. ``desc`` (a human-readable reason, mostly for failures) is cut
    to :data:`MAX_DESC_CHARS` characters ending in an ellipsis; lone surrogates (file names
    decoded with ``surrogateescape``) become U+FFFD so that the payload is always valid UTF-8.
    """
    params: dict[str, object] = {"step": str(_step(step)), "desc": _desc(desc)}
    _add_module(params, module)
    return _encode({"id": _msg_id(msg_id), "params": params})


def get_payload(msg_id: int, module: str | None = None) -> bytes:
    """The query for a pending update, in the documentation's long form.

    ``{"id":N,"version":"1.0","params":{},"method":"thing.ota.firmware.get"}``, with
    ``{"module":M}`` as params when a non-default module is asked about.
    """
    params: dict[str, object] = {}
    _add_module(params, module)
    return _encode(
        {"id": _msg_id(msg_id), "version": GET_VERSION, "params": params, "method": GET_METHOD}
    )


def _encode(message: dict[str, object]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _msg_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"message id must be a non-negative integer, not {value!r}")
    return value


def _step(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"step must be an integer, not {type(value).__name__}")
    if not (STEP_MIN <= value <= STEP_MAX):
        raise ValueError(f"step must be 0..{STEP_MAX} or {STEP_MIN}..-1, not {value}")
    return value


def _version(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"version must be a non-empty string, not {value!r}")
    return value


def _desc(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"desc must be a string, not {type(value).__name__}")
    text = _SURROGATE_RE.sub("\ufffd", value)
    if len(text) > MAX_DESC_CHARS:
        text = text[: MAX_DESC_CHARS - len(ELLIPSIS)] + ELLIPSIS
    return text


def _add_module(params: dict[str, object], module: str | None) -> None:
    """Add ``"module"`` unless it is None or the default module (the same, on the wire)."""
    if module is None or module == DEFAULT_MODULE:
        return
    if not isinstance(module, str) or not module or not module.isprintable():
        raise ValueError(f"module must be a non-empty printable string, not {module!r}")
    params["module"] = module


# --- device login --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Login:
    """MQTT CONNECT credentials; ``password`` is kept out of ``repr`` (and so out of logs)."""

    client_id: str
    username: str
    password: str = field(repr=False)


def iot_platform_login(
    product_key: str,
    device_name: str,
    device_secret: str,
    *,
    timestamp: str = SDK_TIMESTAMP,
    securemode: int = 2,
    agent: str = "rpi-ab-updater",
) -> Login:
    """The IoT Platform's device login ("one device, one secret"), as Link SDK for C builds it.

    - clientId: ``{pk}.{dn}|timestamp={ts},_ss=1,_v={agent},securemode={mode},
      signmethod=hmacsha256|`` (one line);
    - username: ``{dn}&{pk}``;
    - password: HMAC-SHA256, keyed with the DeviceSecret, of the signed key/value pairs
      concatenated in key order, ``clientId{pk}.{dn}deviceName{dn}productKey{pk}timestamp{ts}``,
      as hex. Lowercase here, as in the console's examples; the SDK writes uppercase and the
      platform accepts both.

    Raises ValueError for a ProductKey or DeviceName unusable in a topic, or holding a
    separator of the clientId or username (``|``, ``,``, ``=``, ``&``); for an empty secret;
    a timestamp that is not decimal digits; a securemode other than 2 (TLS) or 3 (TCP); an
    agent id that is empty or holds a separator or whitespace.
    """
    pk = _login_field(_topic_level(product_key, "product_key"), "product_key")
    dn = _login_field(_topic_level(device_name, "device_name"), "device_name")
    if not isinstance(device_secret, str) or not device_secret:
        raise ValueError("device_secret must be a non-empty string")
    if not isinstance(timestamp, str) or not (timestamp.isascii() and timestamp.isdigit()):
        raise ValueError(f"timestamp must be decimal digits, not {timestamp!r}")
    if isinstance(securemode, bool) or securemode not in SECURE_MODES:
        raise ValueError(f"securemode must be 2 (TLS) or 3 (TCP), not {securemode!r}")
    _login_field(_agent(agent), "agent")

    client_id = (
        f"{pk}.{dn}|timestamp={timestamp},_ss=1,_v={agent},"
        f"securemode={securemode},signmethod=hmacsha256|"
    )
    signed = {"clientId": f"{pk}.{dn}", "deviceName": dn, "productKey": pk, "timestamp": timestamp}
    text = "".join(key + signed[key] for key in sorted(signed))
    password = hmac.new(
        device_secret.encode("utf-8"), text.encode("utf-8"), hashlib.sha256
    ).hexdigest()
    return Login(client_id=client_id, username=f"{dn}&{pk}", password=password)


def _login_field(value: str, name: str) -> str:
    for char in value:
        if char in _LOGIN_FORBIDDEN:
            raise ValueError(f"{name} {value!r} must not contain {char!r}")
    return value


def _agent(value: object) -> str:
    """The ``_v`` of the clientId: printable, no whitespace (``/`` is fine: it is no topic)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"agent must be a non-empty string, not {value!r}")
    for char in value:
        if char.isspace() or not char.isprintable():
            raise ValueError(f"agent {value!r} must not contain {char!r}")
    return value


# --- cloud -> device -----------------------------------------------------------------------------


def parse_downlink(topics: Topics, topic: str, payload: bytes | bytearray) -> Task | None:
    """The task carried by a message on the push or get_reply topic, or None if none is pending.

    ``data: {}`` means nothing is pending and gives None, on either topic (the protocol treats
    both ``data`` alike). A malformed task raises :class:`~updater.errors.TaskError`, which the
    caller reports; a message on any other topic raises ValueError (the agent subscribed to
    nothing else, so it is a wiring mistake, not a task). ``payload`` is the raw MQTT payload
    (paho hands ``bytes`` or ``bytearray``); the topic must match exactly (MQTT topics are
    case-sensitive).
    """
    if topic not in (topics.upgrade, topics.get_reply):
        raise ValueError(f"not an OTA downlink topic of this device: {topic!r}")
    try:
        return parse_task(payload)
    except NoTaskPending:
        return None


def task_module(task: Task) -> str | None:
    """The module that progress and inform messages about ``task`` carry; None for default."""
    if task.module is None or task.module == DEFAULT_MODULE:
        return None
    return task.module
