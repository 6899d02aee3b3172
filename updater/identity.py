"""The device's identity and secrets for the broker, from a file only root can read.

The configuration names the file (``mqtt.identity_file``); the file holds the ProductKey and
DeviceName (they make the topics) and either the IoT Platform's DeviceSecret or a plain broker's
username and password (or client certificate). It is refused unless it is owned by root and
neither group- nor world-readable, so a secret never sits where another user can read it; and
nothing here ever logs a secret.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from updater.errors import ConfigError

KEYS = (
    "product_key",
    "device_name",
    "device_secret",
    "username",
    "password",
    "client_id",
    "client_cert",
    "client_key",
)


@dataclass(frozen=True, slots=True)
class Identity:
    product_key: str
    device_name: str
    device_secret: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


def load_identity(path: str, login: str) -> Identity:
    """Read and check the identity file for ``login`` ("iot-platform" or "plain")."""
    _check_private(path)
    try:
        with Path(path).open("rb") as f:
            data = yaml.safe_load(f.read(64 * 1024))
    except OSError as err:
        raise ConfigError(path, "", f"cannot read: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(path, "", f"not valid YAML: {err.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise ConfigError(path, "", "must be a mapping")
    values: dict[str, str] = {}
    for key, value in data.items():
        if key not in KEYS:
            raise ConfigError(path, str(key), f"unknown key; expected one of: {', '.join(KEYS)}")
        if not isinstance(value, str) or not value or "\0" in value:
            raise ConfigError(path, key, "must be a non-empty string")  # never echo the value
        values[key] = value
    for key in ("product_key", "device_name"):
        if key not in values:
            raise ConfigError(path, key, "missing (required)")
        if any(c in values[key] for c in "/+#") or not values[key].isprintable():
            raise ConfigError(path, key, "must not contain '/', '+', '#' or control characters")
    if login == "iot-platform" and "device_secret" not in values:
        raise ConfigError(path, "device_secret", "missing (required for the IoT Platform login)")
    if login == "plain" and "username" not in values and "client_cert" not in values:
        raise ConfigError(path, "username", "a plain login needs username/password or client_cert")
    if ("client_cert" in values) != ("client_key" in values):
        raise ConfigError(path, "client_key", "client_cert and client_key go together")
    for key in ("client_cert", "client_key"):
        if key in values and not values[key].startswith("/"):
            raise ConfigError(path, key, "must be an absolute path")
    if "client_key" in values:
        _check_private(values["client_key"])
    return Identity(**values)


def _check_private(path: str) -> None:
    try:
        st = os.stat(path)  # noqa: PTH116 - we want the stat result of the file itself
    except OSError as err:
        raise ConfigError(path, "", f"cannot read: {err.strerror or err}") from err
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(path, "", "is not a regular file")
    if st.st_uid != 0:
        raise ConfigError(path, "", f"is owned by uid {st.st_uid}; secrets must be owned by root")
    if st.st_mode & 0o077:
        raise ConfigError(
            path, "", f"mode {stat.S_IMODE(st.st_mode):04o} lets others read it: chmod 600"
        )
