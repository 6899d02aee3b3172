"""Versions: each target's version, and the device's combined version string.

The device's version is the targets' versions concatenated in the configured target order
(``a1`` + ``b1`` + ``c1`` = ``a1b1c1``): what the IoT Platform waits to hear after an update. Until
the signed manifest names each file's version, it comes from the task: the target's
``version_pattern`` matched against the file name, else ``extData.versions`` (an object, or a JSON
string, mapping file names to versions), else, when the device has a single target, the task's
version. When some
target's version cannot be told, the device reports the last committed package's version.
"""

from __future__ import annotations

import json
import re

from updater.config import Config
from updater.errors import PlanError
from updater.plan import InstallPlan


def file_versions(plan: InstallPlan, config: Config) -> dict[str, str]:
    """target name -> the version this task installs into it (when the task tells)."""
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
        return pending  # some file's version is unknown: nothing to check it against
    after = {**installed, **new}
    combined = combined_version(config, after)
    if combined is not None and combined != plan.task.version:
        raise PlanError(
            f"the package says version {plan.task.version!r}, but its files make "
            f"{combined!r} ({' + '.join(after[t.name] for t in config.targets)})"
        )
    return pending
