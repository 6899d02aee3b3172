"""Real servers and devices for the tests: nginx, a fault-injecting proxy, loop devices, a test CA.

The updater is judged by what happens against the real parts it meets on a device (see
docs/design.md, "Tests: real parts"). When one of them is missing, a developer's run skips the
tests that need it, but a CI run (``CI=true``) fails them: a green CI must mean they ran.
"""

from __future__ import annotations

import os

import pytest

from .faultproxy import Fault, FaultProxy, RequestLog, random_cuts
from .loopdev import LoopDevice, LoopDevices, loop_device, loop_devices_available, make_sparse_image
from .mosquitto import (
    DeviceTopics,
    Mosquitto,
    MosquittoError,
    Recorder,
    RecorderError,
    Seen,
    find_mosquitto,
    mosquitto_available,
)
from .nginx import Docroot, Nginx, ServedFile, find_nginx, free_port
from .tls import TlsFiles, make_tls_files

__all__ = [
    "DeviceTopics",
    "Docroot",
    "Fault",
    "FaultProxy",
    "LoopDevice",
    "LoopDevices",
    "Mosquitto",
    "MosquittoError",
    "Nginx",
    "Recorder",
    "RecorderError",
    "RequestLog",
    "Seen",
    "ServedFile",
    "TlsFiles",
    "find_mosquitto",
    "find_nginx",
    "free_port",
    "in_ci",
    "loop_device",
    "loop_devices_available",
    "make_sparse_image",
    "make_tls_files",
    "mosquitto_available",
    "random_cuts",
    "require",
]


def in_ci() -> bool:
    """True in a CI run, where every test must run: nothing may be skipped."""
    return os.environ.get("CI") == "true"


def require(condition: bool, why: str) -> None:
    """Skip the current test when ``condition`` is false; under CI=true fail it instead."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"CI=true and a requirement is missing: {why}", pytrace=False)
    pytest.skip(why)
