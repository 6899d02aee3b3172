"""Versions: each target's version, and the device's combined version string.

The device's version is the targets' versions concatenated in the configured target order
(``a1`` + ``b1`` + ``c1`` = ``a1b1c1``): what the IoT Platform waits to hear after an update. A
signed package names each file's version in its manifest. An unsigned one (where the
configuration allows them) tells it in the task: the target's ``version_pattern`` matched
against the file name, else ``extData.versions`` (an object, or a JSON string, mapping file
names to versions), else, when the device has a single target, the task's version. When some
target's version cannot be told, the device reports the last committed package's version.

Versions only go up, target by target, unless ``security.allow_downgrade`` or the signed
manifest's ``allow_downgrade`` (a rollback release, signed as such) says otherwise. They are
compared in "natural" order, as ``sort -V`` does: runs of digits as numbers, the rest as text
(``1.9`` < ``1.10``, ``a1`` < ``a2`` < ``b1``).
"""

from __future__ import annotations

import json
import re

from updater.config import Config
from updater.errors import ManifestError, PlanError
from updater.plan import InstallPlan

_RUN = re.compile(r"[0-9]+|[^0-9]+")  # ASCII digits: str.isdigit() also takes "²"


def file_versions(plan: InstallPlan, config: Config) -> dict[str, str]:
    """target name -> the version this task installs into it (when the task tells)."""
    if plan.manifest is not None:
        return {item.target.name: item.version or "" for item in plan.items}
    task = plan.task
    declared = _ext_versions(task.ext_data)
    versions: dict[str, str] = {}
    for item in plan.items:
        name, target = item.spec.name, item.target
        if target.version_pattern:
            m = re.search(target.version_pattern, name)
            if not m or not m.group(1):
                raise PlanError(
                    f"version_pattern of target {target.name!r} does not match", file_name=name
                )
            versions[target.name] = m.group(1)
        elif name in declared:
            versions[target.name] = declared[name]
        elif len(task.files) == 1 and len(config.targets) == 1:  # the package is the device
            versions[target.name] = task.version
        # else: unknown; the device then reports the package version as a whole
    return versions


def _ext_versions(ext_data: dict[str, object]) -> dict[str, str]:
    raw = ext_data.get("versions")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise PlanError("extData.versions is not valid JSON") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in raw.items()
    ):
        raise PlanError("extData.versions must map file names to non-empty version strings")
    return dict(raw)


def combined_version(config: Config, versions: dict[str, str]) -> str | None:
    """The targets' versions concatenated in configuration order; None unless all are known."""
    if not all(target.name in versions for target in config.targets):
        return None
    return "".join(versions[target.name] for target in config.targets)


def check_package_version(
    config: Config, plan: InstallPlan, installed: dict[str, str]
) -> dict[str, str]:
    """The version each target of the task will hold ("" when the task does not tell); refuse a
    package whose declared version is not the concatenation (when every version is known)."""
    new = file_versions(plan, config)
    pending = {item.target.name: new.get(item.target.name, "") for item in plan.items}
    if "" in pending.values():
        _refuse_downgrade(config, plan, installed, {k: v for k, v in new.items() if v})
        return pending  # some file's version is unknown: nothing to check it against
    _refuse_downgrade(config, plan, installed, new)
    after = {**installed, **new}
    combined = combined_version(config, after)
    if combined is not None and combined != plan.task.version:
        raise PlanError(
            f"the package says version {plan.task.version!r}, but its files make "
            f"{combined!r} ({' + '.join(after[t.name] for t in config.targets)})"
        )
    return pending


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key of the natural order: digit runs compare as numbers (by length without leading
    zeros, then digit by digit: no int() of a hostile 5000-digit run) and before text."""
    key = []
    for run in _RUN.findall(version):
        if run[0] in "0123456789":
            digits = run.lstrip("0")
            key.append((0, len(digits), digits))
        else:
            key.append((1, 0, run))
    return tuple(key)


def _refuse_downgrade(
    config: Config, plan: InstallPlan, installed: dict[str, str], new: dict[str, str]
) -> None:
    """Refuse (step -3, before anything is written) a target whose version would go down."""
    manifest = plan.manifest
    if config.security.allow_downgrade or (manifest is not None and manifest.allow_downgrade):
        return
    for target, version in new.items():
        old = installed.get(target)
        if old is not None and version_key(version) < version_key(old):
            raise ManifestError(
                f"target {target} would go down from version {old!r} to {version!r}: refused "
                f"(a rollback release must be signed with allow_downgrade, or "
                f"security.allow_downgrade set in {config.path})"
            )
