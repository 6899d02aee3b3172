"""Tests of updater/hooks.py and of the example hooks in hooks/, run for real.

Where the hook fixtures live: :func:`check_trusted` demands that every directory from ``/`` down
to a hook is root-owned and neither group/world-writable nor sticky. pytest's ``tmp_path`` is
under ``/tmp`` (mode 1777), and ``/var/tmp`` is 1777 too, so hooks there are (rightly) refused.
The fixture :func:`trusted_dir` therefore makes a private directory (``mkdtemp``, mode 0755)
under the first of ``/run``, ``/var/lib``, ``/root`` whose whole chain passes the check (``/run``
on Debian: root:root 0755 under ``/``), and removes it afterwards. The data the hooks look at
(images, output files) stays in ``tmp_path``: only the programs need a trusted place.

These tests need root (chown, losetup). Missing root or tools skip locally, and fail under
``CI=true``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import require
from updater import hooks
from updater.errors import HookError, WriteError
from updater.hooks import (
    HookContext,
    HookStream,
    check_trusted,
    hook_environment,
    run_hook,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "hooks"
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _unavailable(why: str) -> None:
    require(False, why)


def _require_root() -> None:
    if os.geteuid() != 0:
        _unavailable("these tests must run as root")


def _require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n, path=SBIN_PATH) is None]
    if missing:
        _unavailable(f"missing tools: {', '.join(missing)}")


@pytest.fixture
def trusted_dir() -> Iterator[Path]:
    _require_root()
    for base in ("/run", "/var/lib", "/root"):
        if not Path(base).is_dir():
            continue
        d = Path(tempfile.mkdtemp(prefix="rpi-updater-test-", dir=base))
        d.chmod(0o755)
        probe = d / "probe"
        probe.write_text("#!/bin/sh\n")
        probe.chmod(0o755)
        try:
            check_trusted(str(probe))
        except HookError:
            shutil.rmtree(d)
            continue
        probe.unlink()
        try:
            yield d
        finally:
            shutil.rmtree(d)
        return
    _unavailable("no root-owned, non-writable directory for hook fixtures (/run, /var/lib, /root)")


ScriptMaker = Callable[..., Path]


@pytest.fixture
def script(trusted_dir: Path) -> ScriptMaker:
    """Write an executable hook script into the trusted directory."""

    def make(body: str, name: str = "hook", mode: int = 0o755, where: Path | None = None) -> Path:
        path = (where or trusted_dir) / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(mode)
        return path

    return make


def ctx(**changes: object) -> HookContext:
    values: dict[str, object] = {
        "task_id": "task-7",
        "version": "b2",
        "file_name": "rootfs.img",
        "target": "rootfs",
        "target_kind": "slot",
        "device": "/dev/null",
        "slot": "B",
        "stage": "post-install",
    }
    values.update(changes)
    return HookContext(**values)  # type: ignore[arg-type]


def _alive(pid: int) -> bool:
    """A process exists and is not a zombie (an unreaped orphan counts as gone)."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _refused(path: Path | str) -> str:
    with pytest.raises(HookError) as info:
        check_trusted(str(path))
    assert info.value.hook == str(path)
    assert info.value.step == -4
    return str(info.value)


# --------------------------------------------------------------------------------------------
# check_trusted


def test_trusted_hook_is_accepted(script: ScriptMaker) -> None:
    check_trusted(str(script("exit 0\n")))


def test_world_writable_directory_is_refused_naming_it(
    trusted_dir: Path, script: ScriptMaker
) -> None:
    loose = trusted_dir / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    message = _refused(script("exit 0\n", where=loose))
    assert f"{loose} is writable by group (mode 0777)" in message
    assert f"{loose} is writable by others (mode 0777)" in message


def test_group_writable_directory_is_refused(trusted_dir: Path, script: ScriptMaker) -> None:
    shared = trusted_dir / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    assert f"{shared} is writable by group (mode 0775)" in _refused(script("", where=shared))


def test_sticky_directory_is_refused_even_when_not_writable(
    trusted_dir: Path, script: ScriptMaker
) -> None:
    sticky = trusted_dir / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1755)
    assert f"{sticky} has the sticky bit set" in _refused(script("", where=sticky))


def test_hook_under_tmp_is_refused(tmp_path: Path) -> None:
    _require_root()
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    message = _refused(hook)
    assert "/tmp is writable by others (mode 1777)" in message
    assert "/tmp has the sticky bit set" in message


def test_group_writable_file_is_refused(script: ScriptMaker) -> None:
    hook = script("exit 0\n", mode=0o775)
    assert _refused(hook) == f"hook {hook} refused: {hook} is writable by group (mode 0775)"


def test_world_writable_file_is_refused(script: ScriptMaker) -> None:
    hook = script("exit 0\n", mode=0o757)
    assert f"{hook} is writable by others (mode 0757)" in _refused(hook)


def test_file_not_owned_by_root_is_refused(script: ScriptMaker) -> None:
    hook = script("exit 0\n")
    os.chown(hook, 1000, 1000)
    assert _refused(hook) == f"hook {hook} refused: {hook} is owned by uid 1000, not root"


def test_directory_not_owned_by_root_is_refused(trusted_dir: Path, script: ScriptMaker) -> None:
    theirs = trusted_dir / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 1000, 1000)
    assert f"{theirs} is owned by uid 1000, not root" in _refused(script("", where=theirs))


def test_missing_hook_is_refused(trusted_dir: Path) -> None:
    missing = trusted_dir / "nope" / "post-install"
    assert _refused(missing) == f"hook {missing} refused: {trusted_dir / 'nope'} does not exist"


def test_not_executable_hook_is_refused(script: ScriptMaker) -> None:
    hook = script("exit 0\n", mode=0o644)
    assert _refused(hook) == f"hook {hook} refused: {hook} is not executable (mode 0644)"


def test_relative_path_directory_and_non_directory_are_refused(
    trusted_dir: Path, script: ScriptMaker
) -> None:
    assert "not an absolute path" in _refused("hooks/post-install")
    assert f"{trusted_dir} is not a regular file" in _refused(trusted_dir)
    hook = script("exit 0\n")
    assert f"{hook} is not a directory" in _refused(f"{hook}/more")


def test_symlink_to_trusted_file_is_accepted(trusted_dir: Path, script: ScriptMaker) -> None:
    real_dir = trusted_dir / "real"
    real_dir.mkdir(mode=0o755)
    hook = script("exit 0\n", where=real_dir)
    absolute = trusted_dir / "absolute"
    absolute.symlink_to(hook)
    relative = trusted_dir / "relative"
    relative.symlink_to("real/../real/hook")
    check_trusted(str(absolute))
    check_trusted(str(relative))


def test_symlink_to_untrusted_target_is_refused(trusted_dir: Path, script: ScriptMaker) -> None:
    loose = trusted_dir / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    in_loose = script("exit 0\n", where=loose)
    link = trusted_dir / "link"
    link.symlink_to(in_loose)
    assert f"{loose} is writable by others" in _refused(link)

    writable = script("exit 0\n", name="writable", mode=0o775)
    link2 = trusted_dir / "link2"
    link2.symlink_to(writable)
    assert f"{writable} is writable by group" in _refused(link2)


def test_symlink_owned_by_someone_else_or_looping_is_refused(
    trusted_dir: Path, script: ScriptMaker
) -> None:
    hook = script("exit 0\n")
    link = trusted_dir / "link"
    link.symlink_to(hook)
    os.lchown(link, 1000, 1000)
    assert f"{link} (a symbolic link) is owned by uid 1000, not root" in _refused(link)

    loop = trusted_dir / "loop"
    loop.symlink_to(loop)
    assert "too many levels of symbolic links" in _refused(loop)


# --------------------------------------------------------------------------------------------
# Context and environment


def test_hook_environment_is_exact() -> None:
    c = ctx(device="/dev/mmcblk0p3", device_offset=4096, extra={"device_size": "1024"})
    assert hook_environment(c) == {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "RPI_UPDATER_TASK_ID": "task-7",
        "RPI_UPDATER_VERSION": "b2",
        "RPI_UPDATER_FILE": "rootfs.img",
        "RPI_UPDATER_TARGET": "rootfs",
        "RPI_UPDATER_TARGET_KIND": "slot",
        "RPI_UPDATER_DEVICE": "/dev/mmcblk0p3",
        "RPI_UPDATER_DEVICE_OFFSET": "4096",
        "RPI_UPDATER_SLOT": "B",
        "RPI_UPDATER_STAGE": "post-install",
        "RPI_UPDATER_DEVICE_SIZE": "1024",
    }


@pytest.mark.parametrize(
    "changes",
    [
        {"extra": {"version": "x"}},
        {"extra": {"device_offset": "1"}},
        {"extra": {"bad-key": "x"}},
        {"extra": {"a": "x", "A": "y"}},
        {"extra": {"ok": "nul\0"}},
        {"device_offset": -1},
        {"device_offset": True},
        {"stage": "install-ish"},
        {"target_kind": "disk"},
        {"file_name": "a\0b"},
    ],
)
def test_context_rejects_what_cannot_be_passed(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ctx(**changes)


def test_context_is_frozen_and_hashable() -> None:
    source = {"reload_unit": "a.service"}
    c = ctx(extra=source)
    source["reload_unit"] = "changed.service"
    assert c.extra == {"reload_unit": "a.service"}
    assert hash(c) == hash(ctx(extra={"other": "1"}))
    with pytest.raises(TypeError):
        c.extra["x"] = "y"  # type: ignore[index]


def test_hook_sees_exactly_its_environment_stdin_cwd_and_group(
    script: ScriptMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET", "1")
    out = tmp_path / "out"
    hook = script(
        f"cat /proc/$$/environ > {out}.env\n"
        f"pwd > {out}.cwd\n"
        f"readlink /proc/$$/fd/0 > {out}.stdin\n"
        f"echo $$ $(cut -d' ' -f5,6 /proc/$$/stat) > {out}.ids\n"
    )
    c = ctx(extra={"reload_unit": "x.service"})
    run_hook(str(hook), c, timeout=10)
    env = dict(item.split("=", 1) for item in Path(f"{out}.env").read_text().split("\0") if item)
    assert env == hook_environment(c)
    assert "SECRET" not in env
    assert env["RPI_UPDATER_RELOAD_UNIT"] == "x.service"
    assert Path(f"{out}.cwd").read_text() == "/\n"
    assert Path(f"{out}.stdin").read_text() == "/dev/null\n"
    pid, pgid, sid = Path(f"{out}.ids").read_text().split()
    assert pid == pgid == sid  # its own session, so its own process group


# --------------------------------------------------------------------------------------------
# run_hook


def test_non_zero_exit_names_program_status_and_last_stderr_line(script: ScriptMaker) -> None:
    hook = script('echo "first line" >&2\necho "config.txt is missing" >&2\necho out\nexit 3\n')
    with pytest.raises(HookError) as info:
        run_hook(str(hook), ctx(), timeout=10)
    assert str(info.value) == (
        f"rootfs.img: hook {hook} exited with status 3: config.txt is missing"
    )
    assert info.value.hook == str(hook)
    assert info.value.target == "rootfs"
    assert isinstance(info.value, WriteError)
    assert info.value.step == -4


def test_death_by_signal_is_named(script: ScriptMaker) -> None:
    hook = script("kill -KILL $$\n")
    with pytest.raises(HookError, match="was killed by signal SIGKILL"):
        run_hook(str(hook), ctx(), timeout=10)


def test_untrusted_hook_is_not_run(script: ScriptMaker, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hook = script(f"touch {marker}\n", mode=0o775)
    with pytest.raises(HookError, match="writable by group"):
        run_hook(str(hook), ctx(), timeout=10)
    assert not marker.exists()


def test_hook_without_interpreter_line_fails_cleanly(trusted_dir: Path) -> None:
    hook = trusted_dir / "binary"
    hook.write_bytes(b"\x00\x01not a program")
    hook.chmod(0o755)
    with pytest.raises(HookError, match="could not be started"):
        run_hook(str(hook), ctx(), timeout=10)


def test_output_is_logged_with_bounded_tails(
    script: ScriptMaker, caplog: pytest.LogCaptureFixture
) -> None:
    hook = script(
        "head -c 100000 /dev/zero | tr '\\0' x\necho\necho END-OF-OUT\necho a-warning >&2\n"
    )
    with caplog.at_level(logging.INFO, logger="updater.hooks"):
        run_hook(str(hook), ctx(), timeout=10)
    stdout_lines = [r.getMessage() for r in caplog.records if " stdout: " in r.getMessage()]
    assert any("END-OF-OUT" in m for m in stdout_lines)
    assert any("earlier bytes dropped" in m for m in stdout_lines)
    kept = sum(len(m.split(" stdout: ", 1)[1]) for m in stdout_lines if "dropped" not in m)
    assert kept <= hooks.TAIL_BYTES
    assert f"hook {hook} stderr: a-warning" in caplog.text


def test_timeout_kills_the_whole_process_group(script: ScriptMaker, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    hook = script(f"sleep 100 &\necho $! > {pids}\necho $$ >> {pids}\nsleep 100\n")
    started = time.monotonic()
    with pytest.raises(HookError) as info:
        run_hook(str(hook), ctx(), timeout=1)
    elapsed = time.monotonic() - started
    assert str(info.value) == f"rootfs.img: hook {hook} timed out after 1 s"
    assert elapsed < 1 + 3
    grandchild, leader = (int(p) for p in pids.read_text().split())
    assert not _alive(grandchild)
    assert not _alive(leader)


def test_timeout_kills_a_group_that_ignores_sigterm(
    script: ScriptMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks, "KILL_GRACE", 0.5)
    pids = tmp_path / "pids"
    hook = script(f"trap '' TERM\nsleep 100 &\necho $! > {pids}\nsleep 100\n")
    started = time.monotonic()
    with pytest.raises(HookError, match=re.escape("timed out after 0.5 s")):
        run_hook(str(hook), ctx(), timeout=0.5)
    assert time.monotonic() - started < 0.5 + 0.5 + 2
    assert not _alive(int(pids.read_text()))


def test_leftovers_in_the_group_are_stopped_when_the_hook_exits(
    script: ScriptMaker, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    # The background sleep keeps the hook's stdout open: run_hook must not wait for it.
    hook = script(f"sleep 100 &\necho $! > {pids}\nexit 0\n")
    started = time.monotonic()
    run_hook(str(hook), ctx(), timeout=10)
    assert time.monotonic() - started < 3
    assert not _alive(int(pids.read_text()))


# --------------------------------------------------------------------------------------------
# HookStream


def _stream_ctx() -> HookContext:
    return ctx(
        file_name="blob.bin", target="blob", target_kind="hook", device="", slot="", stage="install"
    )


def test_stream_delivers_every_byte_and_eof(script: ScriptMaker, tmp_path: Path) -> None:
    out, marker = tmp_path / "out", tmp_path / "complete"
    hook = script(f"cat > {out}\necho ok > {marker}\n")
    data = os.urandom(3 * 1024 * 1024 + 17)
    stream = HookStream.start(str(hook), _stream_ctx(), timeout=10)
    view, offset = memoryview(data), 0
    for size in (1, 4095, 65536, 1 << 20, 7):  # odd sizes, memoryview slices
        stream.write(view[offset : offset + size])
        offset += size
    stream.write(bytearray(data[offset:]))
    stream.write(b"")
    assert stream.bytes_written == len(data)
    assert not marker.exists()  # no EOF yet
    stream.finish()
    assert out.read_bytes() == data
    assert marker.read_text() == "ok\n"
    with pytest.raises(ValueError):
        stream.write(b"more")


@pytest.mark.parametrize("ignore_term", [False, True], ids=["plain", "ignores-sigterm"])
def test_abort_never_gives_the_program_an_eof(
    script: ScriptMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ignore_term: bool
) -> None:
    monkeypatch.setattr(hooks, "KILL_GRACE", 0.5)
    out, marker = tmp_path / "out", tmp_path / "complete"
    # The marker appears only if cat read a clean EOF and exited 0. When SIGTERM is ignored
    # (by the shell and cat alike), closing stdin before SIGKILL would let cat finish.
    trap = "trap '' TERM\n" if ignore_term else ""
    hook = script(f"{trap}cat > {out} && touch {marker}\n")
    stream = HookStream.start(str(hook), _stream_ctx(), timeout=10)
    stream.write(b"x" * 100_000)
    stream.abort()
    stream.abort()  # idempotent
    time.sleep(0.2)
    assert not marker.exists()
    with pytest.raises(ValueError):
        stream.finish()


def test_context_manager_aborts_on_error(script: ScriptMaker, tmp_path: Path) -> None:
    marker = tmp_path / "complete"
    hook = script(f"cat > /dev/null && touch {marker}\n")
    with (
        pytest.raises(RuntimeError, match="digest mismatch"),
        HookStream.start(str(hook), _stream_ctx(), timeout=10) as stream,
    ):
        stream.write(b"data")
        raise RuntimeError("digest mismatch")
    time.sleep(0.2)
    assert not marker.exists()


def test_broken_pipe_is_an_error_with_the_status(script: ScriptMaker) -> None:
    hook = script('echo "unsupported format" >&2\nexit 3\n')
    stream = HookStream.start(str(hook), _stream_ctx(), timeout=10)
    with pytest.raises(HookError) as info:
        stream.write(b"y" * (8 << 20))
    message = str(info.value)
    assert f"hook {hook} stopped reading its input after" in message
    assert "exited with status 3: unsupported format" in message
    stream.abort()  # no-op after a failure


def test_program_that_stops_reading_but_exits_zero_is_still_an_error(
    script: ScriptMaker,
) -> None:
    hook = script("head -c 10 > /dev/null\n")
    stream = HookStream.start(str(hook), _stream_ctx(), timeout=10)
    with pytest.raises(HookError, match=r"stopped reading its input after .* exited with status 0"):
        for _ in range(64):
            stream.write(b"z" * (1 << 20))


def test_finish_reports_non_zero_exit(script: ScriptMaker) -> None:
    hook = script('cat > /dev/null\necho "bad image header" >&2\nexit 4\n')
    stream = HookStream.start(str(hook), _stream_ctx(), timeout=10)
    stream.write(b"payload")
    with pytest.raises(HookError) as info:
        stream.finish()
    assert str(info.value) == (
        f"blob.bin: hook {hook} exited with status 4: bad image header (after 7 bytes of input)"
    )


def test_write_times_out_when_the_program_stops_reading(
    script: ScriptMaker, tmp_path: Path
) -> None:
    pids = tmp_path / "pids"
    hook = script(f"echo $$ > {pids}\nsleep 100\n")
    stream = HookStream.start(str(hook), _stream_ctx(), timeout=0.5)
    started = time.monotonic()
    with pytest.raises(
        HookError, match=re.escape("timed out after 0.5 s: it stopped reading its input")
    ):
        stream.write(b"w" * (8 << 20))
    assert time.monotonic() - started < 3
    assert not _alive(int(pids.read_text()))


def test_finish_times_out(script: ScriptMaker) -> None:
    hook = script("cat > /dev/null\nsleep 100\n")
    stream = HookStream.start(str(hook), _stream_ctx(), timeout=0.5)
    stream.write(b"abc")
    with pytest.raises(
        HookError, match=re.escape("timed out after 0.5 s after the end of its input")
    ):
        stream.finish()


def test_stream_refuses_untrusted_program(script: ScriptMaker) -> None:
    hook = script("cat > /dev/null\n", mode=0o775)
    with pytest.raises(HookError, match="writable by group"):
        HookStream.start(str(hook), _stream_ctx(), timeout=1)


def test_stream_program_gets_the_clean_environment(
    script: ScriptMaker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRET", "1")
    out = tmp_path / "env"
    hook = script(f"cat /proc/$$/environ > {out}\ncat > /dev/null\n")
    stream = HookStream.start(str(hook), _stream_ctx(), timeout=10)
    stream.finish()
    env = dict(item.split("=", 1) for item in out.read_text().split("\0") if item)
    assert env == hook_environment(_stream_ctx())


# --------------------------------------------------------------------------------------------
# The example hooks in hooks/, against real file systems


@pytest.fixture
def examples(trusted_dir: Path) -> Path:
    """hooks/ copied to the trusted directory (a checkout need not be root-owned)."""
    dest = trusted_dir / "hooks"
    shutil.copytree(EXAMPLES, dest)
    for path in dest.rglob("*"):
        os.chown(path, 0, 0)
        path.chmod(0o755 if path.is_dir() or path.name != "README.md" else 0o644)
    return dest


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, env={"PATH": SBIN_PATH})


def _fat_image(path: Path, files: dict[str, str]) -> Path:
    _run(["mkfs.vfat", "-C", str(path), "4096"])
    for name, text in files.items():
        src = path.parent / name
        src.write_text(text)
        _run(["mcopy", "-i", str(path), str(src), f"::/{name}"])
    return path


def _embed(image: Path, inner: Path, offset: int) -> None:
    """Write ``inner`` into ``image`` at ``offset`` with dd, leaving room after it."""
    with image.open("wb") as f:
        f.truncate(offset + inner.stat().st_size + (1 << 20))
    _run(
        [
            "dd",
            f"if={inner}",
            f"of={image}",
            "bs=64K",
            f"seek={offset}",
            "oflag=seek_bytes",
            "conv=notrunc",
            "status=none",
        ]
    )


BOOT_FILES = {"config.txt": "arm_64bit=1\n", "cmdline.txt": "console=tty1 root=PARTUUID=x\n"}


def test_kernel_post_install_accepts_a_good_boot_image(examples: Path, tmp_path: Path) -> None:
    _require_tools("mkfs.vfat", "mcopy", "mdir")
    image = _fat_image(tmp_path / "boot.img", BOOT_FILES)
    run_hook(str(examples / "kernel" / "post-install"), ctx(device=str(image)), timeout=30)


def test_kernel_post_install_at_an_offset(examples: Path, tmp_path: Path) -> None:
    _require_tools("mkfs.vfat", "mcopy", "mdir", "dd")
    boot = _fat_image(tmp_path / "boot.img", BOOT_FILES)
    disk = tmp_path / "disk.img"
    _embed(disk, boot, 1 << 20)
    hook = str(examples / "kernel" / "post-install")
    run_hook(hook, ctx(device=str(disk), device_offset=1 << 20), timeout=30)
    with pytest.raises(HookError, match=r"no readable FAT file system on .* at offset 0$"):
        run_hook(hook, ctx(device=str(disk), device_offset=0), timeout=30)


def test_kernel_post_install_refuses_a_boot_image_without_cmdline(
    examples: Path, tmp_path: Path
) -> None:
    _require_tools("mkfs.vfat", "mcopy", "mdir")
    image = _fat_image(tmp_path / "boot.img", {"config.txt": "arm_64bit=1\n"})
    with pytest.raises(
        HookError,
        match=re.escape("exited with status 1: kernel post-install: cmdline.txt is missing"),
    ):
        run_hook(str(examples / "kernel" / "post-install"), ctx(device=str(image)), timeout=30)


def _ext4_image(path: Path, size: int = 8 << 20) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    _run(["mkfs.ext4", "-q", "-F", str(path)])
    return path


def _loops_of(image: Path) -> str:
    return subprocess.run(
        ["losetup", "-j", str(image)],
        check=True,
        capture_output=True,
        text=True,
        env={"PATH": SBIN_PATH},
    ).stdout


def test_rootfs_post_install_checks_an_ext4_image(examples: Path, tmp_path: Path) -> None:
    _require_tools("mkfs.ext4", "e2fsck")
    image = _ext4_image(tmp_path / "root.img")
    run_hook(str(examples / "rootfs" / "post-install"), ctx(device=str(image)), timeout=60)


def test_rootfs_post_install_refuses_a_corrupt_image(examples: Path, tmp_path: Path) -> None:
    _require_tools("mkfs.ext4", "e2fsck")
    image = _ext4_image(tmp_path / "root.img")
    with image.open("r+b") as f:  # clobber the group descriptors after the superblock
        f.seek(4096)
        f.write(b"\xff" * 4096)
    with pytest.raises(HookError, match="e2fsck found problems"):
        run_hook(str(examples / "rootfs" / "post-install"), ctx(device=str(image)), timeout=60)


@pytest.mark.parametrize("with_size", [False, True])
def test_rootfs_post_install_at_an_offset_uses_a_loop_device(
    examples: Path, tmp_path: Path, with_size: bool
) -> None:
    _require_tools("mkfs.ext4", "e2fsck", "losetup", "dd")
    root = _ext4_image(tmp_path / "root.img")
    disk = tmp_path / "disk.img"
    _embed(disk, root, 1 << 20)
    extra = {"device_size": str(root.stat().st_size)} if with_size else {}
    hook = str(examples / "rootfs" / "post-install")
    run_hook(hook, ctx(device=str(disk), device_offset=1 << 20, extra=extra), timeout=60)
    assert _loops_of(disk) == ""  # detached again
    with pytest.raises(HookError, match="e2fsck found problems"):
        run_hook(hook, ctx(device=str(disk), device_offset=2 << 20), timeout=60)
    assert _loops_of(disk) == ""


def _config_ctx(dest: Path | str, **extra: str) -> HookContext:
    return ctx(
        file_name="chrony.conf",
        target="config",
        target_kind="file",
        device=str(dest),
        slot="",
        stage="pre-install",
        extra=extra,
    )


def test_config_pre_install(examples: Path, tmp_path: Path) -> None:
    hook = str(examples / "config" / "pre-install")
    run_hook(hook, _config_ctx(tmp_path / "chrony.conf"), timeout=10)
    (tmp_path / "existing.conf").write_text("x\n")
    run_hook(hook, _config_ctx(tmp_path / "existing.conf"), timeout=10)

    link = tmp_path / "link.conf"
    link.symlink_to("/etc/passwd")
    with pytest.raises(HookError, match="is a symbolic link"):
        run_hook(hook, _config_ctx(link), timeout=10)
    with pytest.raises(HookError, match="does not exist"):
        run_hook(hook, _config_ctx(tmp_path / "no" / "such.conf"), timeout=10)
    with pytest.raises(HookError, match="not an absolute path"):
        run_hook(hook, _config_ctx("etc/chrony.conf"), timeout=10)
    with pytest.raises(HookError, match="not a regular file"):
        run_hook(hook, _config_ctx(tmp_path), timeout=10)


def test_config_post_install_without_unit_only_logs(
    examples: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "chrony.conf"
    dest.write_text("server ntp\n")
    with caplog.at_level(logging.INFO, logger="updater.hooks"):
        run_hook(str(examples / "config" / "post-install"), _config_ctx(dest), timeout=10)
    assert "no unit to reload" in caplog.text


def test_config_post_install_refuses_a_strange_unit(examples: Path, tmp_path: Path) -> None:
    dest = tmp_path / "chrony.conf"
    dest.write_text("server ntp\n")
    hook = str(examples / "config" / "post-install")
    for unit in ("x;reboot.service", "--now", "../x.service", "chrony"):
        with pytest.raises(HookError, match="refusing RPI_UPDATER_RELOAD_UNIT"):
            run_hook(hook, _config_ctx(dest, reload_unit=unit), timeout=10)


def test_config_post_install_reloads_the_unit(examples: Path, tmp_path: Path) -> None:
    """Run directly, with a stand-in systemctl first on PATH (a hook's PATH is fixed)."""
    dest = tmp_path / "chrony.conf"
    dest.write_text("server ntp\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "calls"
    systemctl = fake_bin / "systemctl"
    systemctl.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    systemctl.chmod(0o755)
    env = hook_environment(_config_ctx(dest, reload_unit="chrony.service"))
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    result = subprocess.run(
        [str(examples / "config" / "post-install")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert calls.read_text() == "try-reload-or-restart -- chrony.service\n"
    assert "reloading chrony.service" in result.stdout


def test_examples_are_root_owned_shell_scripts_with_set_eu() -> None:
    for name in (
        "kernel/post-install",
        "rootfs/post-install",
        "config/pre-install",
        "config/post-install",
    ):
        text = (EXAMPLES / name).read_text()
        assert text.startswith("#!/bin/sh\n"), name
        assert "\nset -eu\n" in text, name
        assert os.access(EXAMPLES / name, os.X_OK), name
