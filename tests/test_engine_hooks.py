"""Hooks, hook targets and write failures, end to end: the CLI, real nginx over HTTPS, image files.

What the install engine promises about hooks (README "How an install works", hooks/README.md):
pre-install runs once per file before the file's first byte, post-install once per file after
every file was verified and the ``file`` targets were renamed into place, each with exactly the
documented environment; a failing hook fails the update with exit 5 and puts ``file`` targets
back; an untrusted hook is refused before anything is written; a ``hook`` target gets the bytes
on stdin and sees EOF only for a verified file. Also: a full disk under the slots (exit 5, step
-4) and a ``file`` target whose directory is missing (exit 2).

Where the hook programs live: the updater refuses a program unless it and every directory above
it are root-owned and neither group/world-writable nor sticky, so pytest's ``tmp_path`` (under
``/tmp``, mode 1777) is refused by design. :func:`hook_dir` makes a private 0755 directory under
``/run`` (checked first: root-owned, 0755 on Debian) and removes it afterwards. What the hooks
write (logs, markers, received bytes) stays in ``tmp_path``: only the programs need a trusted
place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Docroot, FaultProxy, LoopDevices, Nginx, make_sparse_image, require
from tests.harness.device import Device, MiB, build_device, task_for
from tests.harness.nginx import ServedFile

HOOK_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# -- fixtures and helpers ------------------------------------------------------------------------


def _trusted_dir_problem(path: Path) -> str | None:
    """Why ``path`` (a directory) would make a hook below it untrusted, or None."""
    st = path.lstat()
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a directory"
    if st.st_uid != 0:
        return f"{path} is owned by uid {st.st_uid}, not root"
    if mode & 0o022 or mode & stat.S_ISVTX:
        return f"{path} has mode {mode:04o} (group/world-writable or sticky)"
    return None


@pytest.fixture
def hook_dir() -> Iterator[Path]:
    """A private root-owned 0755 directory under /run for hook programs; removed afterwards."""
    require(os.geteuid() == 0, "hook programs must be root-owned: run the tests as root")
    for parent in (Path("/"), Path("/run")):
        problem = _trusted_dir_problem(parent)
        require(problem is None, f"no trusted place for hook programs: {problem}")
    path = Path(tempfile.mkdtemp(prefix="rpi-updater-engine-hooks-", dir="/run"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path)


def write_hook(where: Path, name: str, body: str, mode: int = 0o755) -> Path:
    """An executable ``sh`` script ``where/name`` (root-owned: the tests run as root)."""
    path = where / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


@pytest.fixture
def image_device(tmp_path: Path, nginx: Nginx) -> Device:
    """Image-file slots: the subject here is the engine, not the block layer."""
    device = build_device(tmp_path / "dev", loops=None, ca_file=nginx.ca_file)
    device.write_config(hooks={"timeout": 20})
    return device


def entry(served: ServedFile, url: str) -> tuple[str, str, int, str]:
    return (served.name, url, served.size, served.sha256)


def json_events(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def failed_event(stdout: str) -> dict[str, object]:
    failed = [e for e in json_events(stdout) if e["event"] == "failed"]
    assert len(failed) == 1, stdout
    return failed[0]


def targets(device: Device) -> list[dict[str, object]]:
    """A fresh copy of the device's default targets (boot, rootfs, config), to add hooks to."""
    listed = device.config["targets"]
    assert isinstance(listed, list)
    return [dict(t) for t in listed]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dir_listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# -- an observing hook: what a hook sees, written to a log ---------------------------------------

Record = tuple[dict[str, str], dict[str, str]]  # (the environment, observations)


def observer_body(log: Path, device: Device) -> str:
    """A hook that appends its exact environment and what it sees on the device to ``log``.

    Observations (lines ``@ key=value``): the digests of slot B's two regions, of the config
    target's destination, of its staging and kept files beside it (or ``absent``), and the
    journal as it is while the hook runs.
    """
    boot, root = device.parts["B.boot"], device.parts["B.root"]
    conf = device.etc / "app.conf"
    new = device.etc / ".app.conf.rpi-updater-new"
    old = device.etc / ".app.conf.rpi-updater-old"
    image = shlex.quote(str(device.image))
    journal = shlex.quote(str(device.state_dir / "journal.json"))
    return f"""set -eu
region() {{ tail -c +$(($1 + 1)) {image} | head -c "$2" | sha256sum | cut -d' ' -f1; }}
digest() {{ if [ -e "$1" ]; then sha256sum < "$1" | cut -d' ' -f1; else echo absent; fi; }}
{{
  echo '== record'
  tr '\\0' '\\n' < /proc/$$/environ
  echo "@ B.boot=$(region {boot.offset} {boot.size})"
  echo "@ B.root=$(region {root.offset} {root.size})"
  echo "@ conf=$(digest {shlex.quote(str(conf))})"
  echo "@ staged=$(digest {shlex.quote(str(new))})"
  echo "@ kept=$(digest {shlex.quote(str(old))})"
  echo "@ journal=$(tr -d '\\n' < {journal})"
  echo '== end'
}} >> {shlex.quote(str(log))}
"""


def read_records(log: Path) -> list[Record]:
    records: list[Record] = []
    if not log.exists():
        return records
    env: dict[str, str] = {}
    seen: dict[str, str] = {}
    for line in log.read_text().splitlines():
        if line == "== record":
            env, seen = {}, {}
        elif line == "== end":
            records.append((env, seen))
        elif line.startswith("@ "):
            key, _, value = line[2:].partition("=")
            seen[key] = value
        else:
            key, _, value = line.partition("=")
            env[key] = value
    return records


def expected_env(
    device: Device,
    *,
    stage: str,
    file: str,
    target: str,
    kind: str,
    task_id: str,
    version: str,
    part: str | None = None,
    dest: Path | None = None,
    slot: str = "B",
) -> dict[str, str]:
    """The complete environment hooks/README.md documents for one hook run."""
    env = {
        "PATH": HOOK_PATH,
        "LANG": "C.UTF-8",
        "RPI_UPDATER_TASK_ID": task_id,
        "RPI_UPDATER_VERSION": version,
        "RPI_UPDATER_FILE": file,
        "RPI_UPDATER_TARGET": target,
        "RPI_UPDATER_TARGET_KIND": kind,
        "RPI_UPDATER_STAGE": stage,
    }
    if part is not None:
        region = device.parts[f"B.{part}"]
        env |= {
            "RPI_UPDATER_DEVICE": str(device.image),
            "RPI_UPDATER_DEVICE_OFFSET": str(region.offset),
            "RPI_UPDATER_DEVICE_SIZE": str(region.size),
            "RPI_UPDATER_SLOT": slot,
        }
    else:
        env |= {
            "RPI_UPDATER_DEVICE": str(dest) if dest is not None else "",
            "RPI_UPDATER_DEVICE_OFFSET": "0",
            "RPI_UPDATER_SLOT": slot,
        }
    return env


# -- 1. pre-install and post-install: once per file, exact environment, documented order --------


def test_pre_and_post_install_hooks_run_once_per_file_in_order_with_their_environment(
    image_device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path, tmp_path: Path
) -> None:
    device = image_device
    log = tmp_path / "hooks.log"
    observe = write_hook(hook_dir, "observe", observer_body(log, device))
    configured = targets(device)
    for configured_target in configured:
        configured_target["pre_install"] = str(observe)
        configured_target["post_install"] = str(observe)
    device.write_config(targets=configured)
    boot = docroot.add_random(3 * MiB + 123, name="boot.img")
    rootfs = docroot.add_random(5 * MiB + 7, name="rootfs.img")
    conf = docroot.add_bytes("app.conf", b"answer = 42\n")
    (device.etc / "app.conf").write_bytes(b"answer = 41\n")
    old_conf = sha256(b"answer = 41\n")
    before = device.snapshot()
    task = task_for([entry(f, nginx.url(f.name)) for f in (boot, rootfs, conf)], version="h1")

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    after = device.snapshot()
    assert device.parts["B.boot"].read(boot.size) == boot.read_bytes()
    assert device.parts["B.root"].read(rootfs.size) == rootfs.read_bytes()
    assert (device.etc / "app.conf").read_bytes() == b"answer = 42\n"
    journal = device.journal()
    task_id = str(journal["task_id"])
    assert len(task_id) == 16 and int(task_id, 16) >= 0

    records = read_records(log)
    runs = [(env.get("RPI_UPDATER_STAGE"), env.get("RPI_UPDATER_FILE")) for env, _ in records]
    assert sorted(runs) == sorted(
        (stage, name)
        for stage in ("pre-install", "post-install")
        for name in ("boot.img", "rootfs.img", "app.conf")
    ), "each hook runs exactly once per file"
    stages = [stage for stage, _ in runs]
    assert stages == ["pre-install"] * 3 + ["post-install"] * 3, "every pre before any post"
    by_run = {
        (env["RPI_UPDATER_STAGE"], env["RPI_UPDATER_FILE"]): (env, seen) for env, seen in records
    }

    # The exact environment of a slot target's hooks, nothing of the updater's own.
    for stage in ("pre-install", "post-install"):
        for name, target, part in (("boot.img", "boot", "boot"), ("rootfs.img", "rootfs", "root")):
            env = by_run[(stage, name)][0]
            assert env == expected_env(
                device,
                stage=stage,
                file=name,
                target=target,
                kind="slot",
                task_id=task_id,
                version="h1",
                part=part,
            ), (stage, name)
        # The file target: its destination, offset 0, no size (the slot: see the test below).
        expected = expected_env(
            device,
            stage=stage,
            file="app.conf",
            target="config",
            kind="file",
            task_id=task_id,
            version="h1",
            dest=device.etc / "app.conf",
        )
        assert _without_slot(by_run[(stage, "app.conf")][0]) == _without_slot(expected)

    # pre-install: before the first byte of its file reached the target.
    assert after["B.boot"] != before["B.boot"] and after["B.root"] != before["B.root"]
    assert by_run[("pre-install", "boot.img")][1]["B.boot"] == before["B.boot"]
    assert by_run[("pre-install", "rootfs.img")][1]["B.root"] == before["B.root"]
    pre_conf = by_run[("pre-install", "app.conf")][1]
    assert pre_conf["conf"] == old_conf and pre_conf["staged"] == "absent"
    for env, seen in records[:3]:
        files = json.loads(seen["journal"]).get("files", {})
        assert not files.get(env["RPI_UPDATER_FILE"], {}).get("verified")

    # post-install: after every file was verified and the file target renamed into place.
    for env, seen in records[3:]:
        what = env["RPI_UPDATER_FILE"]
        assert seen["B.boot"] == after["B.boot"], f"{what}: boot B not yet written"
        assert seen["B.root"] == after["B.root"], f"{what}: root B not yet written"
        assert seen["conf"] == conf.sha256, f"{what}: app.conf not yet renamed into place"
        assert seen["staged"] == "absent" and seen["kept"] == old_conf
        state = json.loads(seen["journal"])
        assert state["state"] == "applying"
        files = state["files"]
        assert all(files[n]["verified"] for n in ("boot.img", "rootfs.img", "app.conf")), what


def _without_slot(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "RPI_UPDATER_SLOT"}


def test_hooks_of_a_file_target_get_an_empty_slot(
    image_device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path, tmp_path: Path
) -> None:
    """hooks/README.md: RPI_UPDATER_SLOT is "empty for targets outside a slot", also in a task
    that writes a slot as well."""
    device = image_device
    log = tmp_path / "hooks.log"
    observe = write_hook(hook_dir, "observe", observer_body(log, device))
    configured = targets(device)
    configured[2] |= {"pre_install": str(observe), "post_install": str(observe)}
    device.write_config(targets=configured)
    boot = docroot.add_random(1 * MiB, name="boot.img")
    conf = docroot.add_bytes("app.conf", b"x = 2\n")
    task = task_for([entry(f, nginx.url(f.name)) for f in (boot, conf)])

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    slots = [(env["RPI_UPDATER_STAGE"], env["RPI_UPDATER_SLOT"]) for env, _ in read_records(log)]
    assert slots == [("pre-install", ""), ("post-install", "")]


# -- 2. a failing pre-install hook ---------------------------------------------------------------


def test_failing_pre_install_hook_exits_5_before_any_byte(
    image_device: Device, docroot: Docroot, fault_proxy: FaultProxy, hook_dir: Path, tmp_path: Path
) -> None:
    device = image_device
    marker = tmp_path / "rootfs-pre-ran"
    refuse = write_hook(hook_dir, "boot-pre", 'echo "boot-pre: the board is too old" >&2\nexit 1\n')
    rootfs_pre = write_hook(hook_dir, "rootfs-pre", f"touch {shlex.quote(str(marker))}\n")
    configured = targets(device)
    configured[0]["pre_install"] = str(refuse)
    configured[1]["pre_install"] = str(rootfs_pre)
    device.write_config(targets=configured)
    boot = docroot.add_random(1 * MiB, name="boot.img")
    rootfs = docroot.add_random(2 * MiB, name="rootfs.img")
    before = device.snapshot()
    task = task_for([entry(f, fault_proxy.url(f.name)) for f in (boot, rootfs)])

    result = device.run("install", str(device.task_file(task)), "--progress", "json")

    assert result.returncode == 5, result.stderr
    assert f"hook {refuse} exited with status 1: boot-pre: the board is too old" in result.stderr
    failed = failed_event(result.stdout)
    assert failed["step"] == -4 and str(refuse) in str(failed["desc"])
    assert failed["file"] == "boot.img"
    assert device.snapshot() == before, "slot B (boot and root) was written, or A"
    assert not marker.exists(), "the next file's pre-install ran after a failure"
    fault_proxy.wait_idle()
    assert fault_proxy.requests == [], "a byte was fetched although pre-install failed"
    journal = device.journal()
    assert journal["state"] == "failed"
    error = journal["error"]
    assert isinstance(error, dict) and error["step"] == -4 and error["file"] == "boot.img"


# -- 3. a failing post-install hook after a file target was renamed -----------------------------


def _post_install_fails(
    device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], Path, Path, int]:
    """app.conf (old content, mode 0640) and boot.img; config's post-install fails. Returns the
    result, the task file, the hook (for the caller to repair) and the old file's inode."""
    seen = tmp_path / "seen-by-post"
    post = write_hook(
        hook_dir,
        "config-post",
        f'cp "$RPI_UPDATER_DEVICE" {shlex.quote(str(seen))}\n'
        'echo "config-post: the service refuses the new config" >&2\nexit 1\n',
    )
    configured = targets(device)
    configured[2]["post_install"] = str(post)
    device.write_config(targets=configured)
    dest = device.etc / "app.conf"
    dest.write_bytes(b"answer = 41\n")
    dest.chmod(0o640)
    inode = dest.stat().st_ino
    boot = docroot.add_random(1 * MiB, name="boot.img")
    conf = docroot.add_bytes("app.conf", b"answer = 42\n")
    task = device.task_file(task_for([entry(f, nginx.url(f.name)) for f in (boot, conf)]))
    result = device.run("install", str(task), "--progress", "json")
    assert seen.read_bytes() == b"answer = 42\n", "post-install ran before the rename"
    return result, task, post, inode


def test_failing_post_install_hook_puts_the_old_file_back(
    image_device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path, tmp_path: Path
) -> None:
    device = image_device
    dest = device.etc / "app.conf"

    result, _, post, inode = _post_install_fails(device, docroot, nginx, hook_dir, tmp_path)

    assert result.returncode == 5, result.stderr
    assert f"hook {post} exited with status 1: config-post: the service refuses" in result.stderr
    failed = failed_event(result.stdout)
    assert failed["step"] == -4 and failed["file"] == "app.conf"
    st = dest.stat()
    assert dest.read_bytes() == b"answer = 41\n"
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_ino == inode, "the very file that was there is back (not a copy)"
    # Neither the staging file (.app.conf.rpi-updater-new) nor the kept one (-old) is left.
    assert dir_listing(device.etc) == ["app.conf"]
    assert device.journal()["state"] == "failed"


def test_a_rerun_after_a_failed_post_install_installs_the_file(
    image_device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path, tmp_path: Path
) -> None:
    """README: "Running the same command again after a failure ... resumes". Once the hook is
    repaired, the same task must end with the new content in place, not report success with
    the old one."""
    device = image_device
    result, task, post, _ = _post_install_fails(device, docroot, nginx, hook_dir, tmp_path)
    assert result.returncode == 5, result.stderr
    post.write_text("#!/bin/sh\nexit 0\n")

    again = device.run("install", str(task))

    assert again.returncode == 0, again.stderr
    assert device.journal()["state"] == "installed"
    assert (device.etc / "app.conf").read_bytes() == b"answer = 42\n", (
        "the rerun reports success but left the old content in place"
    )


# -- 4. untrusted hooks are refused at plan time -------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["group-writable-pre-install", "world-writable-dir-post-install", "group-writable-hook-target"],
)
def test_untrusted_hook_is_refused_before_anything_is_written(
    image_device: Device,
    docroot: Docroot,
    nginx: Nginx,
    hook_dir: Path,
    tmp_path: Path,
    case: str,
) -> None:
    device = image_device
    marker = tmp_path / "ran"
    body = f"touch {shlex.quote(str(marker))}\ncat > /dev/null\n"
    configured = targets(device)
    mcu = docroot.add_random(64 * 1024, name="mcu-1.bin")
    if case == "group-writable-pre-install":
        hook = write_hook(hook_dir, "pre", body, mode=0o775)
        configured[0]["pre_install"] = str(hook)
        why = f"{hook} is writable by group (mode 0775)"
    elif case == "world-writable-dir-post-install":
        loose = hook_dir / "loose"
        loose.mkdir()
        loose.chmod(0o777)
        hook = write_hook(loose, "post", body)
        configured[1]["post_install"] = str(hook)
        why = f"{loose} is writable by others (mode 0777)"
    else:
        hook = write_hook(hook_dir, "flash", body, mode=0o775)
        why = f"{hook} is writable by group (mode 0775)"
    configured.append({"name": "mcu", "match": "mcu-*.bin", "hook": str(hook_dir / "flash")})
    if case != "group-writable-hook-target":
        write_hook(hook_dir, "flash", "cat > /dev/null\n")
    device.write_config(targets=configured)
    boot = docroot.add_random(1 * MiB, name="boot.img")
    rootfs = docroot.add_random(1 * MiB, name="rootfs.img")
    before = device.snapshot()
    task = task_for([entry(f, nginx.url(f.name)) for f in (boot, rootfs, mcu)])

    result = device.run("install", str(device.task_file(task)), "--progress", "json")

    assert result.returncode == 2, result.stderr
    assert "hook refused" in result.stderr and why in result.stderr
    assert failed_event(result.stdout)["step"] == -1
    assert device.snapshot() == before
    assert not device.state_dir.exists(), "a refused task created the state directory"
    assert not marker.exists(), "the untrusted program ran"
    assert dir_listing(device.etc) == []


# -- 5. a hook target: the bytes on stdin, EOF only for a verified file --------------------------


def _flash_hook(hook_dir: Path, out: Path, *, ignore_term: bool) -> Path:
    # The marker appears only once cat read a clean EOF and exited 0. Ignoring SIGTERM (shell
    # and cat alike) makes that deterministic: closing stdin before SIGKILL would let cat finish.
    trap = "trap '' TERM\n" if ignore_term else ""
    q = shlex.quote
    return write_hook(
        hook_dir,
        "flash",
        f"{trap}tr '\\0' '\\n' < /proc/$$/environ > {q(f'{out}.env')}\n"
        f"cat > {q(f'{out}.data')} && touch {q(f'{out}.complete')}\n",
    )


def _with_mcu_target(device: Device, program: Path) -> None:
    configured = targets(device)
    configured.append({"name": "mcu", "match": "mcu-*.bin", "hook": str(program)})
    device.write_config(targets=configured)


def test_hook_target_receives_the_file_exactly_on_stdin(
    image_device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path, tmp_path: Path
) -> None:
    device = image_device
    out = tmp_path / "flash"
    _with_mcu_target(device, _flash_hook(hook_dir, out, ignore_term=False))
    firmware = docroot.add_random(3 * MiB + 4099, name="mcu-7.bin")
    before = device.snapshot()
    task = task_for([entry(firmware, nginx.url(firmware.name))], version="m7")

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    assert Path(f"{out}.complete").exists()
    assert Path(f"{out}.data").read_bytes() == firmware.read_bytes()
    env = dict(line.split("=", 1) for line in Path(f"{out}.env").read_text().splitlines())
    assert env == expected_env(
        device,
        stage="install",
        file="mcu-7.bin",
        target="mcu",
        kind="hook",
        task_id=str(device.journal()["task_id"]),
        version="m7",
        slot="",
    )
    assert device.snapshot() == before, "a hook-only task wrote a slot"


def test_hook_target_never_sees_eof_for_a_wrong_digest(
    image_device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path, tmp_path: Path
) -> None:
    device = image_device
    out = tmp_path / "flash"
    _with_mcu_target(device, _flash_hook(hook_dir, out, ignore_term=True))
    firmware = docroot.add_random(1 * MiB + 17, name="mcu-7.bin")
    task = task_for([(firmware.name, nginx.url(firmware.name), firmware.size, "0" * 64)])

    result = device.run("install", str(device.task_file(task)), "--progress", "json")

    assert result.returncode == 4, result.stderr
    assert "digest mismatch" in result.stderr
    assert failed_event(result.stdout)["step"] == -3
    assert Path(f"{out}.env").exists(), "the program was never started"
    assert not Path(f"{out}.complete").exists(), "the program read EOF for unverified bytes"
    assert device.journal()["state"] == "failed"


# -- 6. a full disk under the slots --------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path, loop_devices: LoopDevices) -> Iterator[Path]:
    """A 24 MiB ext4 file system (no reserved blocks) mounted from a loop device."""
    for tool in ("mkfs.ext4", "mount", "umount"):
        require(shutil.which(tool, path=SBIN_PATH) is not None, f"{tool} not installed")
    image = make_sparse_image(tmp_path / "fs.img", 24 * MiB)
    loop = loop_devices.attach(image)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-m", "0", str(loop.device)], check=True, capture_output=True
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", str(loop.device), str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        # Unmounted before loop_devices (set up earlier) detaches the device.
        subprocess.run(["umount", str(mnt)], check=True, capture_output=True)


def test_a_full_disk_fails_with_step_4_and_leaves_slot_a_alone(
    small_fs: Path, docroot: Docroot, nginx: Nginx, tmp_path: Path
) -> None:
    device = build_device(
        small_fs / "dev",
        loops=None,
        ca_file=nginx.ca_file,
        boot_size=4 * MiB,
        root_size=32 * MiB,
        fill_booted=False,  # slot A filled whole would not fit: mark its ends instead
    )
    for name in ("A.boot", "A.root"):
        region = device.parts[name]
        mark = hashlib.sha256(name.encode()).digest() * (64 * 1024 // 32)
        with region.path.open("r+b") as f:
            for where in (region.offset, region.offset + region.size - len(mark)):
                f.seek(where)
                f.write(mark)
    # The journal lives on another file system, as README asks of state_dir.
    device.state_dir = tmp_path / "state"
    device.write_config(state_dir=str(device.state_dir))
    assert device.image.stat().st_size > 24 * MiB, "the disk image is sparse, larger than the fs"
    vfs = os.statvfs(small_fs)
    free = vfs.f_bavail * vfs.f_frsize
    size = free + 6 * MiB
    assert size < device.parts["B.root"].size, "the image must fit the partition, not the disk"
    rootfs = docroot.add_random(size, name="rootfs.img")
    before = device.snapshot()
    task = task_for([entry(rootfs, nginx.url(rootfs.name))])

    result = device.run("install", str(device.task_file(task)), "--progress", "json")

    assert result.returncode == 5, result.stderr
    failed = failed_event(result.stdout)
    assert failed["step"] == -4 and failed["file"] == "rootfs.img"
    desc = str(failed["desc"])
    assert "No space left" in desc or "ENOSPC" in desc, desc
    after = device.snapshot()
    assert after["A.boot"] == before["A.boot"] and after["A.root"] == before["A.root"]
    assert after["B.boot"] == before["B.boot"], "boot B was cloned although rootfs failed"
    assert device.journal()["state"] == "failed"


# -- 7. a file target whose directory does not exist ---------------------------------------------


def test_file_target_in_a_missing_directory_exits_2_naming_it(
    image_device: Device, docroot: Docroot, nginx: Nginx
) -> None:
    device = image_device
    missing = device.root / "no-such-dir"
    configured = targets(device)
    configured[2]["file"] = str(missing / "app.conf")
    device.write_config(targets=configured)
    boot = docroot.add_random(1 * MiB, name="boot.img")
    conf = docroot.add_bytes("app.conf", b"x = 1\n")
    before = device.snapshot()
    task = task_for([entry(f, nginx.url(f.name)) for f in (boot, conf)])

    result = device.run("install", str(device.task_file(task)), "--progress", "json")

    assert result.returncode == 2, result.stderr
    assert f"directory {missing} of {missing / 'app.conf'} does not exist" in result.stderr
    assert failed_event(result.stdout)["step"] == -1
    assert not missing.exists(), "the updater created the directory"
    assert device.snapshot() == before
    assert not device.state_dir.exists()


# -- 8. crashes in the middle: kill -9 of the updater by its own hook, SIGTERM ---------------------


def _kill_updater_hook(hook_dir: Path, name: str) -> Path:
    """A post-install hook that kill -9s the updater (its parent): a crash right after the
    file targets were renamed into place."""
    return write_hook(hook_dir, name, "kill -9 $PPID\nsleep 5\n")


def _conf_task(
    device: Device, docroot: Docroot, nginx: Nginx, content: bytes, version: str
) -> Path:
    boot = docroot.add_random(1 * MiB, name="boot.img")
    conf = docroot.add_bytes("app.conf", content)
    files = [entry(f, nginx.url(f.name)) for f in (boot, conf)]
    return device.task_file(task_for(files, version=version), f"task-{version}.json")


def _crash_while_applying(
    device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path, content: bytes
) -> Path:
    """Install app.conf (over "original") with a post-install hook that kills the updater right
    after the rename; then remove the hook. Returns the task file."""
    dest = device.etc / "app.conf"
    dest.write_bytes(b"original\n")
    configured = targets(device)
    configured[2]["post_install"] = str(_kill_updater_hook(hook_dir, "crash"))
    device.write_config(targets=configured)
    task = _conf_task(device, docroot, nginx, content, "v2")
    crashed = device.run("install", str(task))
    assert crashed.returncode == -9
    assert device.journal()["state"] == "applying"
    assert dest.read_bytes() == content
    configured[2].pop("post_install")
    device.write_config(targets=configured)
    return task


def test_a_crash_after_the_rename_is_finished_by_the_next_run(
    image_device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path
) -> None:
    device = image_device
    task = _crash_while_applying(device, docroot, nginx, hook_dir, b"new\n")

    again = device.run("install", str(task))

    assert again.returncode == 0, again.stderr
    assert device.journal()["state"] == "installed"
    assert (device.etc / "app.conf").read_bytes() == b"new\n"
    assert (device.etc / ".app.conf.rpi-updater-old").read_bytes() == b"original\n"


def test_a_new_task_after_a_crashed_apply_rolls_the_old_one_back_first(
    image_device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path
) -> None:
    """Anything not known to be installed is rolled back: the original content must survive."""
    device = image_device
    _crash_while_applying(device, docroot, nginx, hook_dir, b"v2\n")

    result = device.run("install", str(_conf_task(device, docroot, nginx, b"v3\n", "v3")))

    assert result.returncode == 0, result.stderr
    assert (device.etc / "app.conf").read_bytes() == b"v3\n"
    assert (device.etc / ".app.conf.rpi-updater-old").read_bytes() == b"original\n", (
        "the kept content must be the original, not the half-installed v2"
    )


def test_hook_target_never_sees_eof_when_the_updater_is_killed(
    image_device: Device, docroot: Docroot, fault_proxy: FaultProxy, hook_dir: Path, tmp_path: Path
) -> None:
    import time

    from tests.harness import Fault

    device = image_device
    out = tmp_path / "flash"
    _with_mcu_target(device, _flash_hook(hook_dir, out, ignore_term=True))
    firmware = docroot.add_random(2 * MiB, name="mcu-7.bin")
    fault_proxy.script(Fault(stall_after=1 * MiB, stall_seconds=10))
    task = device.task_file(task_for([entry(firmware, fault_proxy.url(firmware.name))]))
    proc = device.start("install", str(task))
    deadline = time.monotonic() + 20
    while not (Path(f"{out}.data").exists() and Path(f"{out}.data").stat().st_size >= 1 * MiB):
        assert time.monotonic() < deadline, "the hook never received the first MiB"
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=10)
    time.sleep(0.5)
    assert not Path(f"{out}.complete").exists(), "the program read EOF of a partial file"


def test_sigterm_stops_cleanly_and_the_next_run_resumes(
    image_device: Device, docroot: Docroot, fault_proxy: FaultProxy
) -> None:
    import signal
    import time

    from tests.harness import Fault

    device = image_device
    boot = docroot.add_random(3 * MiB, name="boot.img")
    fault_proxy.script(Fault(stall_after=2 * MiB, stall_seconds=30))
    task = device.task_file(task_for([entry(boot, fault_proxy.url(boot.name))]))
    proc = device.start("install", str(task), "--progress", "json", quiet=False)
    deadline = time.monotonic() + 20
    while not fault_proxy.requests or fault_proxy.requests[0].body_bytes < 2 * MiB:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=40)

    assert proc.returncode == 143, stderr
    assert "interrupted (SIGTERM)" in stderr
    assert not [e for e in json_events(stdout) if e["event"] == "failed"], "not a failure"
    assert device.journal()["state"] == "download"
    files = device.journal()["files"]
    assert isinstance(files, dict)
    assert files["boot.img"]["durable"] == 2 * MiB, "what arrived was made durable"

    again = device.run("install", str(task))

    assert again.returncode == 0, again.stderr
    assert device.parts["B.boot"].read(boot.size) == boot.read_bytes()
    assert fault_proxy.requests[-1].headers.get("range") == f"bytes={2 * MiB}-"


def test_a_cloned_part_gets_its_targets_post_install_hook(
    image_device: Device, docroot: Docroot, nginx: Nginx, hook_dir: Path, tmp_path: Path
) -> None:
    """A rootfs-only package: boot B is a copy of boot A, whose cmdline.txt names root A. The
    boot target's post-install hook (the one that makes a boot image right for its slot) runs
    on the copy too, after the copy is complete."""
    device = image_device
    log = tmp_path / "hooks.log"
    observe = write_hook(hook_dir, "observe", observer_body(log, device))
    configured = targets(device)
    configured[0]["post_install"] = str(observe)  # boot
    device.write_config(targets=configured)
    rootfs = docroot.add_random(2 * MiB, name="rootfs.img")
    task = task_for([entry(rootfs, nginx.url(rootfs.name))], version="r1")

    result = device.run("install", str(device.task_file(task)))

    assert result.returncode == 0, result.stderr
    records = read_records(log)
    assert len(records) == 1, records
    env, seen = records[0]
    a_boot, b_boot = device.parts["A.boot"], device.parts["B.boot"]
    assert env["RPI_UPDATER_FILE"] == ""
    assert env["RPI_UPDATER_TARGET"] == "boot"
    assert env["RPI_UPDATER_STAGE"] == "post-install"
    assert env["RPI_UPDATER_SLOT"] == "B"
    assert env["RPI_UPDATER_DEVICE"] == str(device.image)
    assert env["RPI_UPDATER_DEVICE_OFFSET"] == str(b_boot.offset)
    assert env["RPI_UPDATER_CLONED_FROM"] == str(device.image)
    assert env["RPI_UPDATER_CLONED_FROM_OFFSET"] == str(a_boot.offset)
    assert seen["B.boot"] == a_boot.digest(), "the hook saw the finished copy"
