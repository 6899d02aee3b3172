"""Task + configuration + this device -> an InstallPlan, with every check that can fail made
before the first byte is written (RAUC's ``make_plans`` + ``pre_install_checks``).

Nothing here writes. A plan names, for every file of the task, its target and where its bytes go;
and, when the package brings only some parts of a slot, which parts are cloned from the booted
slot so that the slot about to be tried is whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from updater.config import Config, TargetConfig, match_target
from updater.errors import HookError, ManifestError, PlanError
from updater.hooks import check_trusted
from updater.manifest import MANIFEST_NAME, Manifest
from updater.slots import Device, booted_slot, in_use_reason, other_slot, resolve_part
from updater.task import FileSpec, Task
from updater.trust import UNSIGNED, Trusted


@dataclass(frozen=True, slots=True)
class FileItem:
    """One file of the task and where it goes."""

    spec: FileSpec
    target: TargetConfig
    device: Device | None = None  # slot targets: the inactive slot's part
    dest: Path | None = None  # file targets
    program: str | None = None  # hook targets
    sha256: str | None = None  # what the signed manifest says the bytes hash to
    version: str | None = None  # what the signed manifest says the file's version is
    encoding: str | None = None  # how the bytes travel compressed (the signed manifest says)
    image_size: int | None = None  # the size on the target, when it differs from the transfer

    @property
    def size(self) -> int:
        """The bytes that land on the target (the image, once decompressed)."""
        return self.image_size if self.image_size is not None else self.spec.size

    @property
    def where(self) -> str:
        if self.device is not None:
            return self.device.describe()
        if self.dest is not None:
            return str(self.dest)
        return f"stdin of {self.program}"


@dataclass(frozen=True, slots=True)
class CloneItem:
    """A slot part the package does not bring: copied from the booted slot.

    ``target`` is the slot target for this part, when the configuration has one: its
    post-install hook runs on the copy too, since whatever the hook makes right for the slot
    written (a boot partition's ``cmdline.txt`` naming that slot's root) is wrong in a copy
    of the other slot's part."""

    part: str
    source: Device
    dest: Device
    target: TargetConfig | None = None


@dataclass(frozen=True, slots=True)
class InstallPlan:
    task: Task
    booted: str | None  # None when the task has no slot targets and no slot could be told
    slot: str | None  # the slot written (the inactive one), None when no slot part is touched
    items: tuple[FileItem, ...]
    clones: tuple[CloneItem, ...]
    trusted: Trusted = UNSIGNED

    @property
    def manifest(self) -> Manifest | None:
        return self.trusted.manifest

    @property
    def total_bytes(self) -> int:
        """The bytes still to stream (the manifest was fetched and verified before the plan)."""
        return sum(item.spec.size for item in self.items)

    def describe(self) -> str:
        signed = "signed" if self.manifest is not None else "UNSIGNED"
        lines = [f"task {self.task.task_id} version {self.task.version} ({signed})"]
        if self.slot:
            lines.append(f"booted slot {self.booted}, installing into slot {self.slot}")
        for item in self.items:
            how = f", {item.encoding} to {item.size} bytes" if item.encoding else ""
            lines.append(
                f"  {item.spec.name} ({item.spec.size} bytes{how}) -> {item.target.kind} "
                f"target {item.target.name}: {item.where}"
            )
        for clone in self.clones:
            lines.append(
                f"  clone part {clone.part}: {clone.source.describe()} -> {clone.dest.describe()}"
            )
        return "\n".join(lines)


def make_plan(task: Task, config: Config, trusted: Trusted = UNSIGNED) -> InstallPlan:
    """Decide where every file goes and refuse, with PlanError, anything unsafe.

    ``trusted`` holds the verified manifest (see :func:`updater.trust.check_task`): the task's
    entry for it is not planned (it is fetched and verified already), and each file must go to
    the target the manifest names.
    """
    manifest = trusted.manifest
    files = [f for f in task.files if manifest is None or f.name != MANIFEST_NAME]
    targets = [_target_for(f, config) for f in files]
    _refuse_shared_targets(files, targets)
    uses_slot = any(t.kind == "slot" for t in targets)
    booted = booted_slot(config) if uses_slot else None
    slot = other_slot(booted) if booted else None
    booted_parts = _resolve_slot(config, booted) if booted else {}
    slot_parts = _resolve_slot(config, slot) if slot else {}

    items = []
    for spec, target in zip(files, targets, strict=True):
        entry = manifest.file(spec.name) if manifest is not None else None
        size = entry.size if entry is not None else spec.size
        item = _plan_file(spec, target, size, config, slot_parts, booted_parts)
        if manifest is not None:
            item = _signed(item, manifest)
        items.append(item)
        for hook in (target.pre_install, target.post_install):
            if hook:
                _check_hook(hook, spec.name)
    if any(item.dest is not None for item in items):
        _refuse_files_on_slots(items, config)

    clones = []
    if slot:
        brought = {t.part for t in targets if t.kind == "slot"}
        for part, dest in slot_parts.items():
            if part not in brought:
                clones.append(_plan_clone(part, booted_parts[part], dest, config, booted_parts))
    return InstallPlan(task, booted, slot, tuple(items), tuple(clones), trusted)


def _signed(item: FileItem, manifest: Manifest) -> FileItem:
    """The item with what the manifest vouches for; the manifest's target must be the one this
    device's configuration maps the file to (the vendor meant it for that target)."""
    entry = manifest.file(item.spec.name)
    assert entry is not None  # check_task_against_manifest: every task file is listed
    if entry.target != item.target.name:
        raise ManifestError(
            f"the manifest says target {entry.target!r}, but {item.target.name!r} is the "
            "target this device's configuration maps the file to",
            file_name=item.spec.name,
        )
    image_size = entry.size if entry.encoding is not None else None
    return replace(
        item,
        sha256=entry.sha256,
        version=entry.version,
        encoding=entry.encoding,
        image_size=image_size,
    )


def _target_for(spec: FileSpec, config: Config) -> TargetConfig:
    target = match_target(config, spec.name)
    if target is None:
        raise PlanError(f"no target in {config.path} matches this file name", file_name=spec.name)
    return target


def _refuse_shared_targets(files: list[FileSpec], targets: list[TargetConfig]) -> None:
    seen: dict[str, str] = {}
    for spec, target in zip(files, targets, strict=True):
        if target.name in seen:
            raise PlanError(
                f"files {seen[target.name]!r} and {spec.name!r} both go to target {target.name!r}",
                file_name=spec.name,
            )
        seen[target.name] = spec.name


def _resolve_slot(config: Config, name: str) -> dict[str, Device]:
    slot = config.slots[name]
    return {part: resolve_part(spec) for part, spec in slot.parts.items()}


def _overlaps(a: Device, b: Device) -> bool:
    """Whether two devices share any byte (same node, or overlapping regions of one file)."""
    if a.is_block and b.is_block and a.rdev is not None and a.rdev == b.rdev:
        return True
    try:
        same = Path(a.path).samefile(b.path)
    except OSError:
        same = a.path == b.path
    return same and a.offset < b.offset + b.size and b.offset < a.offset + a.size


def _refuse_booted(device: Device, booted_parts: dict[str, Device], file_name: str) -> None:
    for part, booted in booted_parts.items():
        if _overlaps(device, booted):
            raise PlanError(
                f"{device.describe()} is part {part!r} of the booted slot: refusing to write it",
                file_name=file_name,
            )


def _refuse_in_use(device: Device, config: Config, file_name: str) -> None:
    reason = in_use_reason(device, config.system.mountinfo)
    if reason:
        raise PlanError(f"{device.describe()} is in use: {reason}", file_name=file_name)


def _plan_file(
    spec: FileSpec,
    target: TargetConfig,
    size: int,
    config: Config,
    slot_parts: dict[str, Device],
    booted_parts: dict[str, Device],
) -> FileItem:
    if target.kind == "slot":
        assert target.part is not None
        device = slot_parts.get(target.part)
        if device is None:
            raise PlanError(f"the slots have no part {target.part!r}", file_name=spec.name)
        if size > device.size:
            raise PlanError(
                f"{size} bytes do not fit {device.describe()} ({device.size} bytes)",
                file_name=spec.name,
            )
        _refuse_booted(device, booted_parts, spec.name)
        _refuse_in_use(device, config, spec.name)
        return FileItem(spec, target, device=device)
    if target.kind == "file":
        assert target.path is not None
        return FileItem(spec, target, dest=_plan_dest(Path(target.path), spec, size))
    assert target.program is not None
    _check_hook(target.program, spec.name)
    return FileItem(spec, target, program=target.program)


def _plan_dest(dest: Path, spec: FileSpec, size: int) -> Path:
    parent = dest.parent
    try:
        if not parent.is_dir():
            raise PlanError(f"directory {parent} of {dest} does not exist", file_name=spec.name)
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            raise PlanError(f"{dest} is not a regular file", file_name=spec.name)
        st = os.statvfs(parent)
    except OSError as err:
        raise PlanError(
            f"cannot inspect {dest}: {err.strerror or err}", file_name=spec.name
        ) from err
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise PlanError(
            f"{size} bytes do not fit in {parent} ({free} bytes free)", file_name=spec.name
        )
    return dest


def _refuse_files_on_slots(items: list[FileItem], config: Config) -> None:
    """A ``file`` target must live outside both slots (on the data partition).

    On the booted slot it would write the running system; on either slot it would be lost or
    stale after the next switch. Parts that cannot be resolved here are skipped: the check is
    about block devices the kernel has mounted, which always resolve.
    """
    parts: dict[int, str] = {}
    for name, slot in config.slots.items():
        for part, spec in slot.parts.items():
            try:
                device = resolve_part(spec)
            except PlanError:
                continue
            if device.is_block and device.rdev is not None:
                parts[device.rdev] = f"part {part!r} of slot {name}"
    for item in items:
        if item.dest is None:
            continue
        where = parts.get(item.dest.parent.stat().st_dev)
        if where:
            raise PlanError(
                f"{item.dest} is on {where}: file targets must live outside the slots "
                "(on the data partition)",
                file_name=item.spec.name,
            )


def _plan_clone(
    part: str, source: Device, dest: Device, config: Config, booted_parts: dict[str, Device]
) -> CloneItem:
    what = f"clone of part {part}"
    if source.size > dest.size:
        raise PlanError(
            f"{what}: {source.describe()} ({source.size} bytes) does not fit "
            f"{dest.describe()} ({dest.size} bytes)"
        )
    _refuse_booted(dest, booted_parts, what)
    _refuse_in_use(dest, config, what)
    target = next((t for t in config.targets if t.kind == "slot" and t.part == part), None)
    if target is not None and target.post_install:
        _check_hook(target.post_install, what)
    return CloneItem(part, source, dest, target)


def _check_hook(program: str, file_name: str) -> None:
    try:
        check_trusted(program)
    except HookError as err:
        raise PlanError(f"hook refused: {err.message}", file_name=file_name) from err
