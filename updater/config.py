"""YAML configuration -> frozen dataclasses. Every error names the file and the key.

The configuration decides which bytes land on which block device, so it is read strictly: unknown
keys, duplicated keys, relative paths, ambiguous types (``yes`` read as a boolean) and two parts
or targets pointing at the same thing are all refused with a :class:`ConfigError` whose ``key``
is a dotted path (``slots.B.root.offset``, ``targets[2].match``; ``""`` for the file as a whole).
A mistake found here costs one edit; the same mistake found while writing a slot costs a device.

:func:`parse_config` is pure (no I/O), so the checks are testable on plain data;
:func:`load_config` adds reading the file and YAML. Nothing here touches the devices or paths
named by the configuration: whether they exist, and who owns the hooks, is checked at run time.
See the "Configuration" section of README.md for the format.
"""

from __future__ import annotations

import difflib
import math
import posixpath
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import date
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Literal, TypeVar

import yaml

from updater.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_STATE_DIR",
    "PART_NAMES",
    "SLOT_NAMES",
    "Config",
    "DownloadConfig",
    "HooksConfig",
    "PartKind",
    "PartSpec",
    "SlotConfig",
    "SystemConfig",
    "TargetConfig",
    "TargetKind",
    "load_config",
    "match_target",
    "parse_config",
]

DEFAULT_CONFIG_PATH = "/etc/rpi-updater/config.yaml"
DEFAULT_STATE_DIR = "/var/lib/rpi-updater"

PartKind = Literal["partuuid", "partlabel", "device", "image"]
TargetKind = Literal["slot", "file", "hook"]

SLOT_NAMES = ("A", "B")
PART_NAMES = ("boot", "root")  # in this order in SlotConfig.parts, whatever the file's order

SECTOR = 512  # image offsets and sizes: what losetup -o/--sizelimit and partition tables use
PAGE = 4096  # buffer sizes: whole pages keep O_DIRECT-friendly, aligned writes possible
MIN_BUFFER_SIZE = 64 << 10
MAX_BUFFER_SIZE = 64 << 20


@dataclass(frozen=True, slots=True)
class PartSpec:
    """Where one slot part lives.

    ``kind``/``value``: ``PARTUUID=x`` -> ("partuuid", "x"); ``PARTLABEL=x`` -> ("partlabel", "x");
    ``/dev/...`` -> ("device", "/dev/..."); ``{image: F, offset: O, size: S}`` -> ("image", F).
    ``offset``/``size`` bound the part inside an image file (size None: to the end of the
    device or file). ``partuuid`` is the identity the kernel cmdline uses for this part when
    ``kind`` does not carry one (image files and device paths in tests and demos).
    """

    kind: PartKind
    value: str
    offset: int = 0
    size: int | None = None
    partuuid: str | None = None


@dataclass(frozen=True, slots=True)
class SlotConfig:
    """One slot: its parts by name, always in :data:`PART_NAMES` order."""

    name: str  # "A" or "B"
    parts: dict[str, PartSpec]  # "boot", "root"


@dataclass(frozen=True, slots=True)
class TargetConfig:
    """Where files whose name matches ``match`` go: exactly one of ``part``/``path``/``program``."""

    name: str
    match: tuple[str, ...]  # exact file names or fnmatch globs
    kind: TargetKind
    part: str | None = None  # slot: the part name ("boot", "root")
    path: str | None = None  # file: the destination path
    program: str | None = None  # hook: the program that reads the bytes on stdin
    pre_install: str | None = None
    post_install: str | None = None
    #: A regular expression matched against the file name; its first group is the version the
    #: file installs (``boot-(.+)\.img``). Without it the version comes from the task.
    version_pattern: str | None = None


@dataclass(frozen=True, slots=True)
class DownloadConfig:
    ca_file: str | None = None  # None: the system's trust store (still verified)
    connect_timeout: float = 20.0
    low_speed_limit: int = 1024  # bytes/s below which ...
    low_speed_time: int = 30  # ... for this many seconds counts as a stall
    retries: int = 10  # consecutive attempts without progress before giving up
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    buffer_size: int = 1 << 20  # bytes per write to the target (a multiple of 4096)
    fsync_interval: int = 64 << 20  # bytes between durable checkpoints
    max_restarts: int = 3  # times a file may start over because it changed on the server


@dataclass(frozen=True, slots=True)
class SystemConfig:
    cmdline: str = "/proc/cmdline"
    mountinfo: str = "/proc/self/mountinfo"
    boot_id: str = "/proc/sys/kernel/random/boot_id"  # tells one boot from the next
    model: str = "/proc/device-tree/model"  # the board model a signed package must list


@dataclass(frozen=True, slots=True)
class HooksConfig:
    timeout: float = 300.0


BootloaderKind = Literal["tryboot", "uboot"]
RebootPolicy = Literal["now", "delay", "never"]


@dataclass(frozen=True, slots=True)
class BootloaderConfig:
    """Which bootloader flips the slots, and where its state lives."""

    type: BootloaderKind = "tryboot"
    # tryboot: autoboot.txt on FAT partition 1 (mounted), the boot partition of each slot, the
    # firmware's view in the device tree, and its mailbox.
    autoboot: str = "/boot/autoboot/autoboot.txt"
    partitions: dict[str, int] = field(default_factory=lambda: {"A": 2, "B": 3})
    device_tree: str = "/proc/device-tree/chosen/bootloader"
    vcio: str = "/dev/vcio"
    # uboot: the environment through fw_printenv/fw_setenv.
    fw_env_config: str = "/etc/fw_env.config"
    bootlimit: int = 3


@dataclass(frozen=True, slots=True)
class RebootConfig:
    """What ``install`` does once the new slot is armed."""

    policy: RebootPolicy = "now"
    delay: float = 60.0
    command: tuple[str, ...] = ("systemctl", "reboot")


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """What the health check after a trial boot requires before it commits the slot."""

    units: tuple[str, ...] = ()  # systemd units that must be active
    system_running: bool = True  # `systemctl is-system-running` must not say degraded
    directory: str = "/etc/rpi-updater/health.d"  # executables that must exit 0
    timeout: float = 120.0  # per check
    max_resumes: int = 3  # a state resumed more often than this rolls back (boot loops)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """What a package must prove before a byte of it is written. Every default is the strict
    one: a device accepts only packages signed by a key in its keyring, for its board, at a
    version no lower than what it runs."""

    keyring: str = "/etc/rpi-updater/keyring"  # root-owned: *.pub, and a revoked file
    allow_unsigned: bool = False  # install tasks that carry no signed manifest
    allow_downgrade: bool = False  # install a target version lower than the installed one
    digestsign_key: str | None = None  # the product's RSA public key (PEM): digestsign required
    allowed_hosts: tuple[str, ...] = ()  # download hosts (name, or *.domain); empty: any host


MqttLogin = Literal["iot-platform", "plain"]


@dataclass(frozen=True, slots=True)
class MqttConfig:
    """The IoT Platform (or any MQTT broker) the daemon listens to. Secrets live elsewhere: in
    ``identity_file``, readable by root only."""

    host: str | None = None  # None: no broker configured (the daemon refuses to start)
    port: int = 8883
    ca_file: str | None = None  # None: the system trust store (still verified)
    login: MqttLogin = "iot-platform"
    identity_file: str = "/etc/rpi-updater/identity.yaml"
    keepalive: int = 300
    module: str | None = None  # the OTA module this device reports (None: "default")
    progress_step: int = 5  # percent between progress reports
    reconnect_max: float = 60.0  # seconds, the cap of the reconnect back-off


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    slots: dict[str, SlotConfig]
    targets: tuple[TargetConfig, ...]
    download: DownloadConfig = field(default_factory=DownloadConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    hooks: HooksConfig = field(default_factory=HooksConfig)
    state_dir: str = DEFAULT_STATE_DIR
    bootloader: BootloaderConfig = field(default_factory=BootloaderConfig)
    reboot: RebootConfig = field(default_factory=RebootConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    #: Each target's version as the image was built, until an update records another.
    factory_versions: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- public functions


def load_config(path: str) -> Config:
    """Read the YAML file at ``path`` and return the validated configuration.

    A missing or unreadable file, broken YAML and duplicated keys become :class:`ConfigError`
    with ``key=""`` (or the duplicated key), so the CLI reports every failure the same way.
    """
    return parse_config(_load_yaml(_read(path), path), path)


def parse_config(data: object, path: str) -> Config:
    """Validate ``data`` (what ``yaml.safe_load`` returned for the file ``path``) into a Config.

    ``path`` is only recorded and used in error messages; nothing is read here.
    """
    try:
        return _parse_top(data, path)
    except _Invalid as err:
        # The internal error already says everything; chaining it would only repeat it.
        raise ConfigError(path, err.key, err.message) from None


def match_target(config: Config, file_name: str) -> TargetConfig | None:
    """The target for a task's ``fileName``, or None when no target claims it.

    An exact match (the name equals one of a target's patterns) wins over any glob, so a
    specific ``boot.img`` target is not shadowed by an earlier catch-all ``*.img``; among
    globs (``fnmatch.fnmatchcase``: case-sensitive, ``*`` also matches ``/`` and a leading
    ``.``), the first target in config order wins. The name is only compared, never used as a
    path: task parsing refuses names containing ``/``, and patterns may not contain one.
    """
    for target in config.targets:
        if file_name in target.match:
            return target
    for target in config.targets:
        if any(fnmatchcase(file_name, pattern) for pattern in target.match):
            return target
    return None


# --------------------------------------------------------------------------- reading the file


class _Invalid(Exception):
    """A validation failure before the file path is attached (keeps helpers free of it)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def _read(path: str) -> bytes:
    """The file's bytes; YAML itself decodes them (UTF-8/16 with or without BOM)."""
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(
            path, "", f"cannot read the configuration: {err.strerror or err}"
        ) from err


def _load_yaml(raw: bytes, path: str) -> object:
    """``yaml.safe_load`` after refusing duplicated keys, which YAML would silently collapse.

    The duplicate check composes the document with the safe loader (nodes only, no objects),
    so a repeated ``root:`` under slot B is an error instead of a quiet last-one-wins.
    """
    try:
        node = yaml.compose(raw, Loader=yaml.SafeLoader)
        if node is not None:
            _refuse_duplicate_keys(node, "", set())
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(path, "", _yaml_problem(err)) from err
    except RecursionError as err:
        raise ConfigError(path, "", "the YAML is nested too deeply") from err
    except _Invalid as err:
        raise ConfigError(path, err.key, err.message) from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line saying what is wrong and where (PyYAML's own text spans several lines)."""
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        context = f" ({err.context})" if err.context else ""
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"invalid YAML at {where}: {err.problem}{context}"
    if isinstance(err, yaml.reader.ReaderError):
        return f"not readable as text at byte {err.position}: {err.reason}"
    return "invalid YAML: " + " ".join(str(err).split())


def _refuse_duplicate_keys(node: yaml.Node, key: str, seen: set[int]) -> None:
    """Walk the node graph once (aliases may share or even nest nodes) looking for repeats."""
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{key}[{index}]", seen)
    elif isinstance(node, yaml.MappingNode):
        names: set[tuple[str, str]] = set()
        for key_node, value_node in node.value:
            child = key
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                child = _sub(key, str(key_node.value))
                if (key_node.tag, key_node.value) in names:
                    line = key_node.start_mark.line + 1
                    raise _Invalid(child, f"given twice (again at line {line})")
                names.add((key_node.tag, key_node.value))
            _refuse_duplicate_keys(value_node, child, seen)


# --------------------------------------------------------------------------- generic checks

_T = TypeVar("_T")


def _sub(key: str, child: str | int) -> str:
    """The dotted key path of ``child`` inside ``key`` (``targets[2]``, ``slots.B.root``)."""
    if isinstance(child, int):
        return f"{key}[{child}]"
    return f"{key}.{child}" if key else child


def _describe(value: object) -> str:
    """Name a value the way YAML users think of it, so type errors are understood."""
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({_short(value)})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"  # dates, sets, binary: YAML tags nobody meant here


def _short(value: object) -> str:
    """A value for a message, cut short: a 400-digit integer helps nobody."""
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _unknown(name: str, allowed: Collection[str]) -> str:
    """Refuse an unknown key, suggesting the closest known one: typos must not pass."""
    folded = [a for a in allowed if a.lower() == name.lower()]
    close = folded or difflib.get_close_matches(name, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; expected one of: {', '.join(allowed)}"


def _mapping(value: object, key: str, allowed: Collection[str]) -> dict[str, object]:
    """``value`` as a mapping whose keys are all strings among ``allowed``."""
    if not isinstance(value, dict):
        where = "the top level " if not key else ""
        raise _Invalid(key, f"{where}must be a mapping, not {_describe(value)}")
    checked: dict[str, object] = {}
    for name, item in value.items():
        if not isinstance(name, str):
            raise _Invalid(
                key, f"key {name!r} is {_describe(name)}, not a string{_quote_hint(name)}"
            )
        if name not in allowed:
            raise _Invalid(_sub(key, name), _unknown(name, allowed))
        checked[name] = item
    return checked


_S = TypeVar("_S")


def _parse_section(
    value: object, key: str, defaults: _S, parsers: Mapping[str, Callable[[object, str], object]]
) -> _S:
    """An optional section of simple keys: each given key parsed by its parser, the rest default."""
    given = _section(value, key, tuple(parsers))
    changes = {name: parsers[name](item, _sub(key, name)) for name, item in given.items()}
    return replace(defaults, **changes)  # type: ignore[type-var]


def _section(value: object, key: str, allowed: Collection[str]) -> dict[str, object]:
    """An optional section: absent or empty (``download:`` with every line commented) = defaults."""
    return {} if value is None else _mapping(value, key, allowed)


def _required(mapping: dict[str, object], key: str, name: str) -> object:
    if name not in mapping:
        raise _Invalid(_sub(key, name), "missing (required)")
    return mapping[name]


def _optional(
    mapping: dict[str, object],
    key: str,
    name: str,
    parse: Callable[[object, str], _T],
    default: _T,
) -> _T:
    """``parse`` the value of ``name`` if given, else ``default`` (``null`` is not "absent")."""
    return parse(mapping[name], _sub(key, name)) if name in mapping else default


def _string(value: object, key: str) -> str:
    """A non-empty string; YAML's surprises (``no`` -> false, ``1.10`` -> 1.1) are named."""
    if not isinstance(value, str):
        raise _Invalid(key, f"must be a string, not {_describe(value)}{_quote_hint(value)}")
    if not value:
        raise _Invalid(key, "must not be empty")
    return value


def _quote_hint(value: object) -> str:
    """YAML turns unquoted ``no``, ``on``, ``1.10`` or ``2024-01-01`` into non-strings."""
    if isinstance(value, bool):
        return "; quote it (YAML reads unquoted yes/no/on/off as booleans)"
    return "; quote it" if isinstance(value, int | float | date) else ""


def _abs_path(value: object, key: str) -> str:
    """An absolute, normalised path: relative paths would depend on the service's cwd."""
    text = _string(value, key)
    if "\0" in text:
        raise _Invalid(key, "must not contain a NUL character")
    if not text.startswith("/"):
        raise _Invalid(
            key, f"{text!r} is relative; relative paths are refused, give an absolute path"
        )
    if text != "/" and text.endswith("/"):
        raise _Invalid(key, f"{text!r} ends with '/'; give the path without a trailing slash")
    if posixpath.normpath(text) != text or text.startswith("//"):
        raise _Invalid(key, f"{text!r} must be written without '.', '..' or repeated '/'")
    return text


def _optional_abs_path(value: object, key: str) -> str | None:
    return None if value is None else _abs_path(value, key)


def _int(value: object, key: str, minimum: int) -> int:
    """An integer >= ``minimum``; booleans are refused although Python counts them as ints."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(key, f"must be an integer, not {_describe(value)}")
    if value < minimum:
        raise _Invalid(key, f"must be at least {minimum}, not {_short(value)}")
    return value


def _count(value: object, key: str) -> int:
    return _int(value, key, 0)


def _positive_int(value: object, key: str) -> int:
    return _int(value, key, 1)


def _duration(value: object, key: str) -> float:
    """Seconds: a finite number > 0 (``.inf`` would disable the timeout it configures)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(key, f"must be a number of seconds, not {_describe(value)}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond float range is no sensible duration either
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise _Invalid(key, f"must be a finite number of seconds > 0, not {_short(value)}")
    return seconds


# --------------------------------------------------------------------------- top level

_TOP_KEYS = (
    "state_dir",
    "slots",
    "targets",
    "download",
    "hooks",
    "system",
    "bootloader",
    "reboot",
    "health",
    "mqtt",
    "security",
    "factory_versions",
)


def _parse_top(data: object, path: str) -> Config:
    top = _mapping(data, "", _TOP_KEYS)
    state_dir = _optional(top, "", "state_dir", _abs_path, DEFAULT_STATE_DIR)
    slots = _parse_slots(_required(top, "", "slots"))
    targets = _parse_targets(_required(top, "", "targets"), tuple(slots["A"].parts))
    return Config(
        path=path,
        slots=slots,
        targets=targets,
        download=_parse_download(top.get("download")),
        hooks=_parse_hooks(top.get("hooks")),
        system=_parse_system(top.get("system")),
        state_dir=state_dir,
        bootloader=_parse_bootloader(top.get("bootloader")),
        reboot=_parse_reboot(top.get("reboot")),
        health=_parse_health(top.get("health")),
        mqtt=_parse_mqtt(top.get("mqtt")),
        security=_parse_security(top.get("security")),
        factory_versions=_optional(top, "", "factory_versions", _factory_versions(targets), {}),
    )


# --------------------------------------------------------------------------- slots and parts

_MBR_PARTUUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{2}")
_GPT_PARTUUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PART_FORMS = "PARTUUID=<uuid>, PARTLABEL=<label>, an absolute /dev/ path, or a mapping"
_GPT_LABEL_MAX = 36  # UTF-16 code units in a GPT entry; characters are close enough here


def _parse_slots(value: object) -> dict[str, SlotConfig]:
    """Both slots, checked to have the same parts and no part shared with another."""
    given = _mapping(value, "slots", SLOT_NAMES)
    slots = {name: _parse_slot(name, _required(given, "slots", name)) for name in SLOT_NAMES}
    _check_same_parts(slots)
    _check_distinct_parts(slots)
    return slots


def _parse_slot(name: str, value: object) -> SlotConfig:
    key = f"slots.{name}"
    given = _mapping(value, key, PART_NAMES)
    _required(given, key, "root")
    parts = {
        part: _parse_part(given[part], _sub(key, part)) for part in PART_NAMES if part in given
    }
    return SlotConfig(name=name, parts=parts)


def _check_same_parts(slots: dict[str, SlotConfig]) -> None:
    """An update writes the inactive slot whole; a part only one slot has cannot be A/B."""
    a, b = slots["A"].parts, slots["B"].parts
    for part in PART_NAMES:
        if (part in a) != (part in b):
            missing, other = ("B", "A") if part in a else ("A", "B")
            raise _Invalid(
                f"slots.{missing}.{part}", f"missing: slot {other} has it, both need the same parts"
            )


def _parse_part(value: object, key: str) -> PartSpec:
    if isinstance(value, str):
        return _parse_part_string(value, key)
    if isinstance(value, dict):
        return _parse_part_mapping(value, key)
    raise _Invalid(key, f"must be {_PART_FORMS}, not {_describe(value)}")


def _parse_part_string(text: str, key: str) -> PartSpec:
    prefix, _, rest = text.partition("=")
    if prefix == "PARTUUID":
        return PartSpec(kind="partuuid", value=_partuuid(rest, key))
    if prefix == "PARTLABEL":
        return PartSpec(kind="partlabel", value=_partlabel(rest, key))
    if text.startswith("/"):
        return PartSpec(kind="device", value=_device_path(text, key))
    if prefix.upper() in ("UUID", "LABEL"):
        # Slot images are byte copies: both slots carry the same filesystem UUID and label.
        raise _Invalid(
            key, f"{prefix}= names a filesystem, the same in both slots; use PART{prefix}="
        )
    if prefix.upper() in ("PARTUUID", "PARTLABEL"):
        raise _Invalid(key, f"write {prefix.upper()}= in capitals, as the kernel does")
    raise _Invalid(key, f"{text!r} is not {_PART_FORMS} (relative paths are refused)")


def _partuuid(text: str, key: str) -> str:
    """An MBR (``1234abcd-05``) or GPT PARTUUID, lowercased as the kernel and udev report it."""
    uuid = text.lower()
    if _MBR_PARTUUID.fullmatch(uuid):
        if uuid.endswith("-00"):
            raise _Invalid(key, f"{text!r}: MBR partitions are numbered from 01")
        return uuid
    if _GPT_PARTUUID.fullmatch(uuid):
        return uuid
    raise _Invalid(
        key, f"{text!r} is not a PARTUUID (MBR: 1234abcd-05, GPT: 8-4-4-4-12 hex digits)"
    )


def _partlabel(text: str, key: str) -> str:
    if not text or len(text) > _GPT_LABEL_MAX or not text.isprintable():
        raise _Invalid(key, f"PARTLABEL must be 1 to {_GPT_LABEL_MAX} printable characters")
    return text


def _device_path(value: object, key: str) -> str:
    path = _abs_path(value, key)
    if not path.startswith("/dev/"):
        raise _Invalid(
            key, f"{path!r} is not under /dev/; an image file is {{image: ..., offset: ...}}"
        )
    return path


def _parse_part_mapping(value: dict[object, object], key: str) -> PartSpec:
    """``{device: ...}`` or ``{image: ..., offset: ..., size: ...}``, each with ``partuuid``."""
    given = _mapping(value, key, ("device", "image", "offset", "size", "partuuid"))
    if ("device" in given) == ("image" in given):
        raise _Invalid(key, "a part mapping needs exactly one of device, image")
    partuuid = _optional(given, key, "partuuid", _bare_partuuid, None)
    if "device" in given:
        for name in ("offset", "size"):
            if name in given:
                raise _Invalid(_sub(key, name), "only an image part has an offset and size")
        return PartSpec(
            kind="device",
            value=_device_path(given["device"], _sub(key, "device")),
            partuuid=partuuid,
        )
    return PartSpec(
        kind="image",
        value=_abs_path(given["image"], _sub(key, "image")),
        offset=_optional(given, key, "offset", _sector_offset, 0),
        size=_optional(given, key, "size", _sector_size, None),
        partuuid=partuuid,
    )


def _bare_partuuid(value: object, key: str) -> str:
    text = _string(value, key)
    if text.upper().startswith("PARTUUID="):
        raise _Invalid(key, "give the bare uuid, without PARTUUID=")
    return _partuuid(text, key)


def _sector_offset(value: object, key: str) -> int:
    return _sectors(_int(value, key, 0), key)


def _sector_size(value: object, key: str) -> int | None:
    """Absent or null: the part runs to the end of the image file."""
    return None if value is None else _sectors(_int(value, key, 1), key)


def _sectors(value: int, key: str) -> int:
    if value % SECTOR:
        raise _Invalid(key, f"must be a multiple of {SECTOR} (sectors), not {value}")
    return value


def _check_distinct_parts(slots: dict[str, SlotConfig]) -> None:
    """No two parts may name the same partition: writing one slot would destroy the other.

    Only what the text shows is compared (PARTUUID, label, device path, image byte ranges);
    two different names for one device (``/dev/mmcblk0p5`` and its by-partuuid link) are
    caught at run time, when the parts are resolved.
    """
    seen: list[tuple[str, PartSpec]] = []
    for slot in slots.values():
        for part, spec in slot.parts.items():
            key = f"slots.{slot.name}.{part}"
            for earlier_key, earlier in seen:
                clash = _clash(earlier, earlier_key, spec)
                if clash:
                    raise _Invalid(key, clash)
            seen.append((key, spec))


def _clash(a: PartSpec, a_key: str, b: PartSpec) -> str | None:
    """Why ``b`` points at the same thing as ``a`` (found at ``a_key``), or None."""
    uuid_a = a.value if a.kind == "partuuid" else a.partuuid
    uuid_b = b.value if b.kind == "partuuid" else b.partuuid
    if uuid_a is not None and uuid_a == uuid_b:
        return f"has the same PARTUUID {uuid_a} as {a_key}"
    if a.kind != b.kind or a.value != b.value:
        return None
    if a.kind == "image":
        return f"overlaps {a_key} in the image {a.value}" if _overlap(a, b) else None
    what = "PARTLABEL" if a.kind == "partlabel" else "device"
    return f"has the same {what} {a.value} as {a_key}"


def _overlap(a: PartSpec, b: PartSpec) -> bool:
    """Whether two byte ranges of one image intersect (size None runs to the end)."""
    end_a = math.inf if a.size is None else a.offset + a.size
    end_b = math.inf if b.size is None else b.offset + b.size
    return a.offset < end_b and b.offset < end_a


# --------------------------------------------------------------------------- targets

_TARGET_KEYS = (
    "name",
    "match",
    "slot_part",
    "file",
    "hook",
    "pre_install",
    "post_install",
    "version_pattern",
)
_TARGET_KINDS: dict[str, TargetKind] = {"slot_part": "slot", "file": "file", "hook": "hook"}
_TARGET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_NOT_FOR_FILES = ("/dev", "/proc", "/sys")


def _parse_targets(value: object, part_names: tuple[str, ...]) -> tuple[TargetConfig, ...]:
    if not isinstance(value, list):
        raise _Invalid("targets", f"must be a list of targets, not {_describe(value)}")
    if not value:
        raise _Invalid("targets", "must list at least one target")
    targets = tuple(
        _parse_target(item, f"targets[{index}]", part_names) for index, item in enumerate(value)
    )
    _check_claims(targets)
    return targets


def _parse_target(value: object, key: str, part_names: tuple[str, ...]) -> TargetConfig:
    given = _mapping(value, key, _TARGET_KEYS)
    name = _target_name(_required(given, key, "name"), _sub(key, "name"))
    match = _parse_match(_required(given, key, "match"), _sub(key, "match"))
    kinds = [k for k in _TARGET_KINDS if k in given]
    if len(kinds) != 1:
        found = f"; found {', '.join(kinds)}" if kinds else ""
        raise _Invalid(key, f"needs exactly one of slot_part, file, hook{found}")
    dest_key = _sub(key, kinds[0])
    dest = given[kinds[0]]
    kind = _TARGET_KINDS[kinds[0]]
    return TargetConfig(
        name=name,
        match=match,
        kind=kind,
        part=_slot_part(dest, dest_key, part_names) if kind == "slot" else None,
        path=_file_path(dest, dest_key) if kind == "file" else None,
        program=_abs_path(dest, dest_key) if kind == "hook" else None,
        pre_install=_optional(given, key, "pre_install", _abs_path, None),
        post_install=_optional(given, key, "post_install", _abs_path, None),
        version_pattern=_optional(given, key, "version_pattern", _regex_with_group, None),
    )


def _regex_with_group(value: object, key: str) -> str:
    text = _string(value, key)
    try:
        compiled = re.compile(text)
    except re.error as err:
        raise _Invalid(key, f"is not a valid regular expression: {err}") from None
    if compiled.groups < 1:
        raise _Invalid(key, "needs a group, (...), that captures the version")
    return text


def _target_name(value: object, key: str) -> str:
    """Names end up in versions, logs and hook environments: keep them plain."""
    name = _string(value, key)
    if not _TARGET_NAME.fullmatch(name):
        raise _Invalid(key, f"{name!r} must match [a-z0-9][a-z0-9_-]*")
    return name


def _parse_match(value: object, key: str) -> tuple[str, ...]:
    if isinstance(value, list):
        if not value:
            raise _Invalid(key, "must not be empty")
        return tuple(_pattern(item, _sub(key, index)) for index, item in enumerate(value))
    if isinstance(value, str):
        return (_pattern(value, key),)
    raise _Invalid(
        key,
        "must be a file name pattern or a list of them, "
        f"not {_describe(value)}{_quote_hint(value)}",
    )


def _pattern(value: object, key: str) -> str:
    """A pattern with '/' could never match: task file names are plain names."""
    pattern = _string(value, key)
    if "/" in pattern:
        raise _Invalid(key, f"{pattern!r}: patterns match file names, which never contain '/'")
    return pattern


def _slot_part(value: object, key: str, part_names: tuple[str, ...]) -> str:
    part = _string(value, key)
    if part not in part_names:
        raise _Invalid(key, f"the slots have no part {part!r} (they have: {', '.join(part_names)})")
    return part


def _file_path(value: object, key: str) -> str:
    """A file target is replaced by a rename: never a device node or a kernel interface."""
    path = _abs_path(value, key)
    for root in _NOT_FOR_FILES:
        if path == root or path.startswith(root + "/"):
            raise _Invalid(key, f"{path!r} is under {root}; file targets are for regular files")
    return path


def _check_claims(targets: tuple[TargetConfig, ...]) -> None:
    """Two targets may not share a name, a pattern (the later one could never win), a slot
    part or a file (the second write would undo the first)."""
    claims: dict[str, dict[str, str]] = {"name": {}, "match": {}, "slot_part": {}, "file": {}}
    for index, target in enumerate(targets):
        owner = f"targets[{index}]"
        values = {
            "name": (target.name,),
            "match": target.match,
            "slot_part": (target.part,) if target.part else (),
            "file": (target.path,) if target.path else (),
        }
        for what, items in values.items():
            for item in items:
                first = claims[what].setdefault(item, owner)
                if first != owner:
                    raise _Invalid(_sub(owner, what), f"{item!r} is already claimed by {first}")


# --------------------------------------------------------------------------- sections


def _parse_download(value: object) -> DownloadConfig:
    key = "download"
    given = _section(value, key, [f.name for f in fields(DownloadConfig)])
    base = DownloadConfig()

    def get(name: str, parse: Callable[[object, str], _T], default: _T) -> _T:
        return _optional(given, key, name, parse, default)

    download = DownloadConfig(
        ca_file=get("ca_file", _optional_abs_path, base.ca_file),
        connect_timeout=get("connect_timeout", _duration, base.connect_timeout),
        low_speed_limit=get("low_speed_limit", _positive_int, base.low_speed_limit),
        low_speed_time=get("low_speed_time", _positive_int, base.low_speed_time),
        retries=get("retries", _count, base.retries),
        backoff_initial=get("backoff_initial", _duration, base.backoff_initial),
        backoff_max=get("backoff_max", _duration, base.backoff_max),
        buffer_size=get("buffer_size", _buffer_size, base.buffer_size),
        fsync_interval=get("fsync_interval", _positive_int, base.fsync_interval),
        max_restarts=get("max_restarts", _count, base.max_restarts),
    )
    _check_download(download, given)
    return download


def _buffer_size(value: object, key: str) -> int:
    size = _int(value, key, 1)
    if not MIN_BUFFER_SIZE <= size <= MAX_BUFFER_SIZE or size % PAGE:
        raise _Invalid(
            key, f"must be a multiple of {PAGE} from {MIN_BUFFER_SIZE} to {MAX_BUFFER_SIZE}"
        )
    return size


def _check_download(download: DownloadConfig, given: dict[str, object]) -> None:
    """Cross-field rules, reported at the key the user wrote (a default is not their mistake)."""
    if download.backoff_max < download.backoff_initial:
        name = "backoff_max" if "backoff_max" in given else "backoff_initial"
        raise _Invalid(
            f"download.{name}",
            f"backoff_max ({download.backoff_max:g}) must be >= backoff_initial "
            f"({download.backoff_initial:g})",
        )
    if download.fsync_interval % download.buffer_size:
        # A durable checkpoint must fall on a write boundary, or resume offsets drift.
        name = "fsync_interval" if "fsync_interval" in given else "buffer_size"
        raise _Invalid(
            f"download.{name}",
            f"fsync_interval ({download.fsync_interval}) must be a multiple of buffer_size "
            f"({download.buffer_size})",
        )


def _parse_hooks(value: object) -> HooksConfig:
    return _parse_section(value, "hooks", HooksConfig(), {"timeout": _duration})


def _parse_system(value: object) -> SystemConfig:
    """Where the booted slot is read from; tests and the reboot harness point these at files."""
    parsers = {
        "cmdline": _abs_path,
        "mountinfo": _abs_path,
        "boot_id": _abs_path,
        "model": _abs_path,
    }
    return _parse_section(value, "system", SystemConfig(), parsers)


# --------------------------------------------------------------------------- boot flow


def _parse_bootloader(value: object) -> BootloaderConfig:
    parsers: dict[str, Callable[[object, str], object]] = {
        "type": _bootloader_type,
        "autoboot": _abs_path,
        "partitions": _partitions,
        "device_tree": _abs_path,
        "vcio": _abs_path,
        "fw_env_config": _abs_path,
        "bootlimit": _bootlimit,
    }
    return _parse_section(value, "bootloader", BootloaderConfig(), parsers)


def _bootlimit(value: object, key: str) -> int:
    """1..8: the boot script counts one digit (its ladder stops at 9; older scripts counted with
    setexpr, in hex) and compares with test (decimal): they agree only on single digits."""
    limit = _positive_int(value, key)
    if limit > 8:
        raise _Invalid(key, f"must be at most 8 (the boot script counts in one digit), not {limit}")
    return limit


def _bootloader_type(value: object, key: str) -> BootloaderKind:
    text = _string(value, key)
    if text == "tryboot":
        return "tryboot"
    if text == "uboot":
        return "uboot"
    raise _Invalid(key, f"{text!r} is not a bootloader this updater drives: tryboot or uboot")


def _partitions(value: object, key: str) -> dict[str, int]:
    given = _mapping(value, key, SLOT_NAMES)
    parts = {name: _int(_required(given, key, name), _sub(key, name), 1) for name in SLOT_NAMES}
    if parts["A"] == parts["B"]:
        raise _Invalid(key, "slots A and B need different boot partitions")
    return parts


def _parse_reboot(value: object) -> RebootConfig:
    parsers = {"policy": _reboot_policy, "delay": _duration, "command": _command}
    return _parse_section(value, "reboot", RebootConfig(), parsers)


def _reboot_policy(value: object, key: str) -> RebootPolicy:
    text = _string(value, key)
    if text == "now":
        return "now"
    if text == "delay":
        return "delay"
    if text == "never":
        return "never"
    raise _Invalid(key, f"{text!r}: expected now, delay or never")


def _command(value: object, key: str) -> tuple[str, ...]:
    """A program and its arguments as a list (never a shell string): the first an absolute path
    or a plain program name."""
    if not isinstance(value, list) or not value:
        raise _Invalid(
            key, f"must be a non-empty list (program and arguments), not {_describe(value)}"
        )
    words = tuple(_string(item, f"{key}[{index}]") for index, item in enumerate(value))
    if "/" in words[0] and not words[0].startswith("/"):
        raise _Invalid(f"{key}[0]", f"{words[0]!r} is relative; give an absolute path or a name")
    return words


def _parse_health(value: object) -> HealthConfig:
    parsers: dict[str, Callable[[object, str], object]] = {
        "units": _units,
        "system_running": _bool,
        "directory": _abs_path,
        "timeout": _duration,
        "max_resumes": _positive_int,
    }
    return _parse_section(value, "health", HealthConfig(), parsers)


def _units(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(key, f"must be a list of systemd unit names, not {_describe(value)}")
    units = tuple(_string(item, f"{key}[{index}]") for index, item in enumerate(value))
    for index, unit in enumerate(units):
        if unit.startswith("-") or "/" in unit or any(c.isspace() for c in unit):
            raise _Invalid(f"{key}[{index}]", f"{unit!r} is not a unit name")
    return units


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(key, f"must be true or false, not {_describe(value)}")
    return value


# --------------------------------------------------------------------------- mqtt


def _parse_mqtt(value: object) -> MqttConfig:
    parsers: dict[str, Callable[[object, str], object]] = {
        "host": _host,
        "port": _port,
        "ca_file": _optional_abs_path,
        "login": _mqtt_login,
        "identity_file": _abs_path,
        "keepalive": _keepalive,
        "module": _module,
        "progress_step": _progress_step,
        "reconnect_max": _duration,
    }
    return _parse_section(value, "mqtt", MqttConfig(), parsers)


def _host(value: object, key: str) -> str:
    host = _string(value, key)
    if any(c.isspace() or c in "/@" for c in host):
        raise _Invalid(key, f"{host!r} is not a host name or address")
    return host


def _port(value: object, key: str) -> int:
    port = _positive_int(value, key)
    if port > 65535:
        raise _Invalid(key, f"must be at most 65535, not {port}")
    return port


def _mqtt_login(value: object, key: str) -> MqttLogin:
    text = _string(value, key)
    if text == "iot-platform":
        return "iot-platform"
    if text == "plain":
        return "plain"
    raise _Invalid(key, f"{text!r}: expected iot-platform or plain")


def _keepalive(value: object, key: str) -> int:
    seconds = _int(value, key, 30)
    if seconds > 1200:
        raise _Invalid(key, f"must be at most 1200 (the platform's limit), not {seconds}")
    return seconds


def _module(value: object, key: str) -> str:
    text = _string(value, key)
    if len(text) > 64 or not text.isprintable():
        raise _Invalid(key, "must be 1..64 printable characters")
    return text


def _progress_step(value: object, key: str) -> int:
    step = _positive_int(value, key)
    if step > 100:
        raise _Invalid(key, f"must be at most 100, not {step}")
    return step


# --------------------------------------------------------------------------- security

_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def _parse_security(value: object) -> SecurityConfig:
    parsers: dict[str, Callable[[object, str], object]] = {
        "keyring": _abs_path,
        "allow_unsigned": _bool,
        "allow_downgrade": _bool,
        "digestsign_key": _optional_abs_path,
        "allowed_hosts": _allowed_hosts,
    }
    return _parse_section(value, "security", SecurityConfig(), parsers)


def _allowed_hosts(value: object, key: str) -> tuple[str, ...]:
    """Host names (``ota.example.com``) or a leading wildcard (``*.example.com``, any name
    under the domain, not the domain itself); compared case-insensitively."""
    if not isinstance(value, list):
        raise _Invalid(key, f"must be a list of host names, not {_describe(value)}")
    hosts = []
    for index, item in enumerate(value):
        where = f"{key}[{index}]"
        host = _string(item, where).lower()
        name = host[2:] if host.startswith("*.") else host
        labels = name.split(".")
        if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise _Invalid(where, f"{host!r} is not a host name or *.domain")
        hosts.append(host)
    return tuple(hosts)


def host_allowed(config: Config, host: str) -> bool:
    """Whether a download host is one ``security.allowed_hosts`` admits (any, when empty)."""
    allowed = config.security.allowed_hosts
    if not allowed:
        return True
    host = host.lower().rstrip(".")
    return any(
        host.endswith(pattern[1:]) if pattern.startswith("*.") else host == pattern
        for pattern in allowed
    )


def _factory_versions(
    targets: tuple[TargetConfig, ...],
) -> Callable[[object, str], dict[str, str]]:
    names = [t.name for t in targets]

    def parse(value: object, key: str) -> dict[str, str]:
        given = _mapping(value, key, names)
        return {name: _string(item, _sub(key, name)) for name, item in given.items()}

    return parse
