"""Tests of image-recipes/: make-ab-image.sh, make-update.sh and hooks/boot-post.

The scripts are run as an operator runs them, on a tiny boot directory and root tree, and what
they build is read back with other tools than the ones that wrote it: ``sfdisk -J`` and
``partx`` (libblkid) for the partition table, ``fsck.vfat``/``e2fsck`` on every file system,
mtools and debugfs for the files, ``fw_printenv`` for uboot.env. Then the updater's own code
judges the result: its slot resolution and booted-slot logic on the image's partitions and
command lines, its autoboot.txt parser and the firmware stand-in, U-Boot's boot.scr run by the
U-Boot stand-in, the bundle's task and signed manifest, and the boot hook run as a hook.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import pytest

from tests.harness import require
from tests.harness.pifirmware import PiFirmware
from tests.harness.ubootsim import UBootSim, printenv
from updater.bootloader.tryboot import canonical_autoboot, parse_autoboot
from updater.bundle import write_key_pair
from updater.config import Config, parse_config
from updater.hooks import HookContext, run_hook
from updater.manifest import MANIFEST_NAME, Keyring, check_task_against_manifest, verify_envelope
from updater.slots import booted_slot, other_slot, resolve_part
from updater.task import parse_task

REPO: Final = Path(__file__).resolve().parent.parent
RECIPES: Final = REPO / "image-recipes"
MAKE_IMAGE: Final = RECIPES / "make-ab-image.sh"
MAKE_UPDATE: Final = RECIPES / "make-update.sh"
BOOT_HOOK: Final = RECIPES / "hooks" / "boot-post"
MiB: Final = 1 << 20
SECTOR: Final = 512

# Small sizes keep the test fast; the layout rules are the same as at the default sizes.
SIZES: Final = {"autoboot": 40, "boot": 48, "root": 64, "data": 16}
SIZE_ARGS: Final = [
    *("--autoboot-size", str(SIZES["autoboot"])),
    *("--boot-size", str(SIZES["boot"])),
    *("--root-size", str(SIZES["root"])),
    *("--data-size", str(SIZES["data"])),
]
DISK_ID: Final = "1234abcd"
UBOOT_DISK_ID: Final = "cafe0042"
BOARD: Final = "Raspberry Pi 4 Model B"
CMDLINE: Final = (
    "console=serial0,115200 console=tty1 root=PARTUUID=deadbeef-02 rootfstype=ext4 "
    "fsck.repair=yes rootwait\n"
)
CONFIG_TXT: Final = "# from the template\narm_64bit=1\ndtoverlay=vc4-kms-v3d"  # no final newline
OS_RELEASE: Final = 'PRETTY_NAME="rpi-ab test image b1"\nID=test\n'
TOOLS: Final = {
    "sfdisk": "fdisk",
    "partx": "util-linux",
    "mkfs.vfat": "dosfstools",
    "fsck.vfat": "dosfstools",
    "mcopy": "mtools",
    "mtype": "mtools",
    "mdir": "mtools",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mkimage": "u-boot-tools",
    "mkenvimage": "u-boot-tools",
    "fw_printenv": "libubootenv-tool",
    "fw_setenv": "libubootenv-tool",
    "zstd": "zstd",
    "bash": "bash",
}
MTOOLS_ENV: Final = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def require_tools() -> None:
    for tool, package in TOOLS.items():
        require(shutil.which(tool) is not None, f"{tool} not installed (Debian package {package})")


def run(
    *args: str | Path, env: Mapping[str, str] | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(env) if env is not None else None,
        check=False,
    )
    if ok:
        assert result.returncode == 0, (
            f"{args} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


# --- reading an image ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    number: int
    start: int  # sectors
    size: int  # sectors
    type: str
    bootable: bool

    @property
    def offset(self) -> int:
        return self.start * SECTOR

    @property
    def length(self) -> int:
        return self.size * SECTOR


def partition_table(image: Path) -> tuple[dict[str, object], dict[int, Part]]:
    """``sfdisk -J``: the table's header and its partitions by number."""
    table = json.loads(run("sfdisk", "-J", image).stdout)["partitiontable"]
    parts = {}
    for entry in table["partitions"]:
        number = int(entry["node"].removeprefix(str(image)))
        parts[number] = Part(
            number, entry["start"], entry["size"], entry["type"], entry.get("bootable", False)
        )
    return table, parts


def extract(image: Path, part: Part, dest: Path) -> Path:
    """The partition's bytes as a file of its own (for fsck, debugfs, comparisons)."""
    with image.open("rb") as src, dest.open("wb") as out:
        src.seek(part.offset)
        left = part.length
        while left:
            chunk = src.read(min(left, 4 * MiB))
            assert chunk, f"{image} ends inside partition {part.number}"
            out.write(chunk)
            left -= len(chunk)
    return dest


def region(image: Path, part: Part) -> bytes:
    with image.open("rb") as f:
        f.seek(part.offset)
        return f.read(part.length)


def fat(image: Path, part: Part) -> str:
    """mtools' name for the FAT file system at the partition's offset."""
    return f"{image}@@{part.offset}"


def fat_names(image: Path, part: Part) -> list[str]:
    out = run("mdir", "-b", "-i", fat(image, part), "::/", env=MTOOLS_ENV).stdout
    return sorted(line.removeprefix("::/") for line in out.split())


def fat_text(image: Path, part: Part, name: str) -> str:
    return run("mtype", "-i", fat(image, part), f"::/{name}", env=MTOOLS_ENV).stdout


def fat_bytes(image: Path, part: Part, name: str, dest: Path) -> bytes:
    run("mcopy", "-n", "-i", fat(image, part), f"::/{name}", dest, env=MTOOLS_ENV)
    return dest.read_bytes()


def ext4_cat(fs: Path, path: str) -> bytes:
    return subprocess.run(
        ["debugfs", "-R", f'cat "{path}"', str(fs)], capture_output=True, check=True
    ).stdout


def ext4_stat(fs: Path, path: str) -> tuple[int, int]:
    """(mode, uid) of ``path`` in the file system."""
    out = run("debugfs", "-R", f'stat "{path}"', fs).stdout
    fields = out.split()
    assert "Mode:" in fields, f"{path} not in {fs}: {out}"
    mode = int(fields[fields.index("Mode:") + 1], 8)
    uid = int(fields[fields.index("User:") + 1])
    return mode, uid


def tree_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def ext4_files(fs: Path, work: Path) -> dict[str, bytes]:
    """Every regular file in an ext4 image, read back with debugfs rdump."""
    dest = work / f"rdump-{fs.name}"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir()
    run("debugfs", "-R", f'rdump / "{dest}"', fs)
    return {k: v for k, v in tree_files(dest).items() if not k.startswith("lost+found")}


def cmdline_root(cmdline: str) -> list[str]:
    return [w for w in cmdline.split() if w.startswith("root=")]


# --- inputs and builds, once for the module ------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    boot: Path
    root: Path
    data: Path
    uboot_bin: Path
    uboot_env: Path


@dataclass(frozen=True)
class Built:
    image: Path
    table: dict[str, object]
    parts: dict[int, Part]
    stdout: str
    stderr: str
    work: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    require_tools()
    base = tmp_path_factory.mktemp("inputs")
    boot = base / "boot"
    (boot / "overlays").mkdir(parents=True)
    (boot / "config.txt").write_text(CONFIG_TXT)
    (boot / "cmdline.txt").write_text(CMDLINE)
    (boot / "kernel8.img").write_bytes(os.urandom(600 * 1024))
    (boot / "start4.elf").write_bytes(os.urandom(20 * 1024))
    (boot / "fixup4.dat").write_bytes(os.urandom(4 * 1024))
    (boot / "bcm2711-rpi-4-b.dtb").write_bytes(os.urandom(8 * 1024))
    (boot / "overlays" / "disable-bt.dtbo").write_bytes(os.urandom(1024))
    root = base / "rootfs"
    for directory in ("etc/rpi-updater", "usr/bin", "var/log"):
        (root / directory).mkdir(parents=True)
    (root / "etc" / "os-release").write_text(OS_RELEASE)
    (root / "etc" / "hostname").write_text("pi-test\n")
    (root / "etc" / "fstab").write_text(
        f"PARTUUID={DISK_ID}-01 /boot/autoboot vfat defaults 0 2\n"
        f"PARTUUID={DISK_ID}-07 /data ext4 defaults 0 2\n"
    )
    (root / "etc" / "rpi-updater" / "config.yaml").write_text(
        "# the device's configuration\nstate_dir: /data/rpi-updater   # on p7\n"
    )
    (root / "usr" / "bin" / "app").write_bytes(os.urandom(256 * 1024))
    data = base / "data"
    (data / "app").mkdir(parents=True)
    (data / "app" / "app.conf").write_text("mode=factory\n")
    uboot_bin = base / "u-boot.bin"
    uboot_bin.write_bytes(os.urandom(30 * 1024))
    uboot_env = base / "u-boot-initial-env"
    uboot_env.write_text(
        "arch=arm\nbootcmd=run distro_bootcmd\nkernel_addr_r=0x00080000\n"
        "fdt_addr_r=0x02600000\nrpi_slot=B\n"  # a stale slot variable: the recipe's must win
    )
    return Inputs(boot, root, data, uboot_bin, uboot_env)


def build_image(work: Path, inputs: Inputs, *extra: str) -> Built:
    work.mkdir(parents=True, exist_ok=True)
    image = work / "disk.img"
    args: list[str | Path] = [MAKE_IMAGE, "--boot", inputs.boot, "--rootfs", inputs.root]
    args += ["--data", inputs.data, "--out", image, *SIZE_ARGS, *extra]
    result = run(*args, env={**os.environ, "TMPDIR": str(work)})
    table, parts = partition_table(image)
    return Built(image, table, parts, result.stdout, result.stderr, work)


@pytest.fixture(scope="module")
def tryboot_image(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_image(tmp_path_factory.mktemp("tryboot"), inputs)


@pytest.fixture(scope="module")
def uboot_image(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build_image(
        tmp_path_factory.mktemp("uboot"),
        inputs,
        *("--uboot", "--uboot-bin", str(inputs.uboot_bin)),
        *("--uboot-env", str(inputs.uboot_env), "--disk-id", f"0x{UBOOT_DISK_ID.upper()}"),
    )


@dataclass(frozen=True)
class Package:
    out: Path
    public_key: bytes
    stdout: str
    work: Path


@pytest.fixture(scope="module")
def package(inputs: Inputs, tmp_path_factory: pytest.TempPathFactory) -> Package:
    work = tmp_path_factory.mktemp("update")
    key, pub, _ = write_key_pair(work / "keys", "vendor")
    out = work / "pkg"
    result = run(
        MAKE_UPDATE,
        *("--boot", inputs.boot, "--rootfs", inputs.root, "--key", key, "--out", out),
        *("--base-url", "https://ota.example.com/fleet/a1b1", "--board", BOARD),
        *("--boot-version", "a1", "--rootfs-version", "b1"),
        *("--boot-size", str(SIZES["boot"]), "--root-size", str(SIZES["root"])),
        env={**os.environ, "TMPDIR": str(work)},
    )
    return Package(out, pub.read_bytes(), result.stdout, work)


# --- the tryboot image ---------------------------------------------------------------------------


def test_layout_is_the_documented_one(tryboot_image: Built) -> None:
    table, parts = tryboot_image.table, tryboot_image.parts
    assert table["label"] == "dos"
    assert table["id"] == f"0x{DISK_ID}"
    assert table["sectorsize"] == SECTOR
    assert sorted(parts) == [1, 2, 3, 4, 5, 6, 7]
    assert [parts[n].type for n in sorted(parts)] == ["c", "c", "c", "5", "83", "83", "83"]
    mib = MiB // SECTOR
    expected_sizes = {
        1: SIZES["autoboot"],
        2: SIZES["boot"],
        3: SIZES["boot"],
        5: SIZES["root"],
        6: SIZES["root"],
        7: SIZES["data"],
    }
    assert {n: parts[n].size // mib for n in expected_sizes} == expected_sizes
    # Primary partitions back to back from 1 MiB; each logical one 1 MiB (its EBR) after the
    # previous one, inside the extended partition, which runs to the end of the disk.
    assert parts[1].start == mib
    assert parts[2].start == parts[1].start + parts[1].size
    assert parts[3].start == parts[2].start + parts[2].size
    assert parts[4].start == parts[3].start + parts[3].size
    assert parts[5].start == parts[4].start + mib
    assert parts[6].start == parts[5].start + parts[5].size + mib
    assert parts[7].start == parts[6].start + parts[6].size + mib
    assert parts[4].start + parts[4].size == parts[7].start + parts[7].size
    assert tryboot_image.image.stat().st_size == (parts[7].start + parts[7].size) * SECTOR
    assert all(p.start % mib == 0 for p in parts.values())
    assert not any(p.bootable for p in parts.values())
    # libblkid's PARTUUIDs: what root=PARTUUID= and the updater's slots name.
    out = run("partx", "--show", "--noheadings", "-o", "NR,UUID", tryboot_image.image).stdout
    assert dict(line.split() for line in out.splitlines()) == {
        str(n): f"{DISK_ID}-{n:02x}" for n in range(1, 8)
    }
    # The printed layout names every partition and the slots for config.yaml.
    printed = tryboot_image.stdout
    for n in (1, 2, 3, 4, 5, 6, 7):
        assert f"{DISK_ID}-0{n}" in printed
    assert f"A: {{boot: PARTUUID={DISK_ID}-02, root: PARTUUID={DISK_ID}-05}}" in printed
    assert f"B: {{boot: PARTUUID={DISK_ID}-03, root: PARTUUID={DISK_ID}-06}}" in printed


def test_every_file_system_is_clean(tryboot_image: Built) -> None:
    image, parts, work = tryboot_image.image, tryboot_image.parts, tryboot_image.work
    for n in (1, 2, 3):
        fs = extract(image, parts[n], work / f"p{n}.fat")
        result = run("fsck.vfat", "-n", fs, ok=False)
        assert result.returncode == 0, f"p{n}: {result.stdout}{result.stderr}"
        fs.unlink()
    for n in (5, 6, 7):
        fs = extract(image, parts[n], work / f"p{n}.ext4")
        result = run("e2fsck", "-f", "-n", fs, ok=False)
        assert result.returncode == 0, f"p{n}: {result.stdout}{result.stderr}"
        fs.unlink()


def test_autoboot_partition_holds_autoboot_txt_only(tryboot_image: Built, tmp_path: Path) -> None:
    image, parts = tryboot_image.image, tryboot_image.parts
    assert fat_names(image, parts[1]) == ["autoboot.txt"]
    text = fat_text(image, parts[1], "autoboot.txt")
    assert text.encode() == canonical_autoboot(2, 3)
    autoboot = parse_autoboot(text.encode(), {2, 3})
    assert (autoboot.primary, autoboot.trial) == (2, 3)
    # The firmware stand-in (its own parser): an ordinary boot takes p2, a tryboot p3.
    (tmp_path / "autoboot.txt").write_text(text)
    firmware = PiFirmware(tmp_path / "autoboot.txt", tmp_path / "dt", partitions={"A": 2, "B": 3})
    assert firmware.boot(tryboot_flag=False) == 2
    assert firmware.boot(tryboot_flag=True) == 3
    assert firmware.boot(tryboot_flag=False) == 2


def test_boot_partitions_name_their_own_root(
    tryboot_image: Built, inputs: Inputs, tmp_path: Path
) -> None:
    image, parts = tryboot_image.image, tryboot_image.parts
    source_names = sorted(p.name for p in inputs.boot.iterdir())
    for n, root_part in ((2, 5), (3, 6)):
        names = fat_names(image, parts[n])
        assert names == sorted(f"{name}/" if name == "overlays" else name for name in source_names)
        cmdline = fat_text(image, parts[n], "cmdline.txt")
        assert cmdline_root(cmdline) == [f"root=PARTUUID={DISK_ID}-0{root_part}"]
        words = cmdline.split()
        # The template's other words stay, in order; panic=10 is added (a panic must reset).
        assert words[:2] == ["console=serial0,115200", "console=tty1"]
        assert "rootwait" in words and "fsck.repair=yes" in words
        assert words.count("panic=10") == 1
        assert cmdline.endswith("\n") and cmdline.count("\n") == 1
        config = fat_text(image, parts[n], "config.txt")
        assert config.startswith(CONFIG_TXT + "\n")
        assert "\ndtparam=watchdog=on\n" in config
        for name in ("kernel8.img", "start4.elf", "bcm2711-rpi-4-b.dtb"):
            assert (
                fat_bytes(image, parts[n], name, tmp_path / name)
                == (inputs.boot / name).read_bytes()
            )
        assert (
            fat_bytes(image, parts[n], "overlays/disable-bt.dtbo", tmp_path / "o.dtbo")
            == (inputs.boot / "overlays" / "disable-bt.dtbo").read_bytes()
        )


def test_root_slots_are_copies_of_the_tree(tryboot_image: Built, inputs: Inputs) -> None:
    image, parts, work = tryboot_image.image, tryboot_image.parts, tryboot_image.work
    root_a = extract(image, parts[5], work / "rootA.ext4")
    root_b = extract(image, parts[6], work / "rootB.ext4")
    assert (
        hashlib.sha256(root_a.read_bytes()).digest() == hashlib.sha256(root_b.read_bytes()).digest()
    )
    assert ext4_cat(root_a, "/etc/os-release").decode() == OS_RELEASE
    files = ext4_files(root_a, work)
    hook_path = "etc/rpi-updater/hooks/boot-post"
    dropin = "etc/systemd/system.conf.d/rpi-ab-watchdog.conf"
    # Exactly the tree, plus what the A/B flow needs and the tree lacked.
    assert {k: v for k, v in files.items() if k not in (hook_path, dropin)} == tree_files(
        inputs.root
    )
    assert b"\nRuntimeWatchdogSec=14s\n" in files[dropin]
    hook = files[hook_path].decode()
    assert f"\ndisk_id={DISK_ID}\n" in hook
    assert hook.replace(f"\ndisk_id={DISK_ID}\n", "\ndisk_id=\n") == BOOT_HOOK.read_text()
    assert ext4_stat(root_a, "/" + hook_path) == (0o755, 0)
    assert ext4_stat(root_a, "/etc/rpi-updater/hooks") == (0o755, 0)
    assert not files.get("etc/fw_env.config")  # tryboot: no U-Boot environment
    # The data partition: --data's files and the updater's state directory (0700, root).
    data = extract(image, parts[7], work / "data.ext4")
    assert ext4_files(data, work) == {"app/app.conf": b"mode=factory\n"}
    assert ext4_stat(data, "/rpi-updater") == (0o700, 0)
    for path in (root_a, root_b, data):
        path.unlink()


@pytest.mark.parametrize("own", [True, False], ids=["tree-has-its-own", "no-watchdog"])
def test_inputs_settings_win(inputs: Inputs, tmp_path: Path, own: bool) -> None:
    """What the inputs already say is kept as it is: the scripts add only what is missing, and
    with --no-watchdog nothing of the watchdog at all."""
    boot, root = tmp_path / "boot", tmp_path / "rootfs"
    shutil.copytree(inputs.boot, boot)
    shutil.copytree(inputs.root, root)
    extra: list[str] = []
    if own:
        (boot / "config.txt").write_text("dtparam=audio=on,watchdog=on\n")
        (boot / "cmdline.txt").write_text("console=tty1 root=/dev/mmcblk0p2 panic=5\n")
        (root / "etc" / "systemd").mkdir(parents=True)
        (root / "etc" / "systemd" / "system.conf").write_text("[Manager]\nRuntimeWatchdogSec=10s\n")
        (root / "etc" / "rpi-updater" / "hooks").mkdir()
        (root / "etc" / "rpi-updater" / "hooks" / "boot-post").write_text("#!/bin/sh\n# ours\n")
    else:
        extra = ["--no-watchdog"]
    built = build_image(tmp_path / "build", replace(inputs, boot=boot, root=root), *extra)
    config_txt = fat_text(built.image, built.parts[2], "config.txt")
    cmdline = fat_text(built.image, built.parts[2], "cmdline.txt")
    files = ext4_files(extract(built.image, built.parts[5], tmp_path / "root.ext4"), tmp_path)
    assert "etc/systemd/system.conf.d/rpi-ab-watchdog.conf" not in files
    if own:
        assert config_txt == (boot / "config.txt").read_text()
        want = ["console=tty1", f"root=PARTUUID={DISK_ID}-05", "panic=5", "rootwait"]
        assert cmdline.split() == want
        assert files["etc/rpi-updater/hooks/boot-post"] == b"#!/bin/sh\n# ours\n"
    else:
        assert config_txt == CONFIG_TXT + "\n"
        assert "panic=" not in cmdline
        assert "etc/rpi-updater/hooks/boot-post" in files  # not a watchdog setting


def image_config(
    image: Path, parts: Mapping[int, Part], disk_id: str, tmp_path: Path, cmdline: str
) -> Config:
    """The updater's configuration for the image's slots, as image-file regions with the
    PARTUUIDs the kernel command line uses (tests/harness/device.py does the same), and
    ``cmdline`` as its /proc/cmdline."""
    (tmp_path / "cmdline").write_text(cmdline)
    (tmp_path / "mountinfo").write_text("21 1 254:0 / / rw - ext4 /dev/vda rw\n")

    def part(n: int) -> dict[str, object]:
        p = parts[n]
        return {
            "image": str(image),
            "offset": p.offset,
            "size": p.length,
            "partuuid": f"{disk_id}-{n:02x}",
        }

    return parse_config(
        {
            "state_dir": str(tmp_path / "state"),
            "slots": {
                "A": {"boot": part(2), "root": part(5)},
                "B": {"boot": part(3), "root": part(6)},
            },
            "targets": [
                {"name": "boot", "match": "boot.img", "slot_part": "boot"},
                {"name": "rootfs", "match": "rootfs.img", "slot_part": "root"},
            ],
            "system": {
                "cmdline": str(tmp_path / "cmdline"),
                "mountinfo": str(tmp_path / "mountinfo"),
            },
        },
        str(tmp_path / "config.yaml"),
    )


def test_the_updater_finds_the_slots_in_the_image(tryboot_image: Built, tmp_path: Path) -> None:
    image, parts = tryboot_image.image, tryboot_image.parts
    numbers = {"A": {"boot": 2, "root": 5}, "B": {"boot": 3, "root": 6}}
    for slot in ("A", "B"):
        # What the firmware passes the kernel when it boots this slot's boot partition.
        cmdline = fat_text(image, parts[numbers[slot]["boot"]], "cmdline.txt")
        config = image_config(image, parts, DISK_ID, tmp_path, cmdline)
        assert booted_slot(config) == slot
        # The slot an update writes: its parts resolve to the image's other partitions.
        inactive = other_slot(slot)
        for name, number in numbers[inactive].items():
            device = resolve_part(config.slots[inactive].parts[name])
            assert (device.path, device.offset, device.size) == (
                str(image),
                parts[number].offset,
                parts[number].length,
            )


# --- the U-Boot image ----------------------------------------------------------------------------


def test_uboot_variant(uboot_image: Built, inputs: Inputs, tmp_path: Path) -> None:
    image, parts = uboot_image.image, uboot_image.parts
    assert uboot_image.table["id"] == f"0x{UBOOT_DISK_ID}"
    assert [n for n, p in parts.items() if p.bootable] == [1]  # distro boot finds boot.scr there
    # p1: the firmware files without the kernel, config.txt starting U-Boot, U-Boot, boot.scr.
    names = fat_names(image, parts[1])
    assert {"u-boot.bin", "boot.scr", "uboot.env", "config.txt", "cmdline.txt", "start4.elf"} <= (
        set(names)
    )
    assert "kernel8.img" not in names
    assert fat_bytes(image, parts[1], "u-boot.bin", tmp_path / "u") == inputs.uboot_bin.read_bytes()
    config_txt = fat_text(image, parts[1], "config.txt")
    assert config_txt.startswith(CONFIG_TXT + "\n")
    assert config_txt.rstrip().endswith("kernel=u-boot.bin\narm_64bit=1")
    assert "\ndtparam=watchdog=on\n" in config_txt
    firmware_cmdline = fat_text(image, parts[1], "cmdline.txt")
    assert cmdline_root(firmware_cmdline) == []  # boot.scr appends the slot's root=
    for n in (2, 3):
        assert "kernel8.img" in fat_names(image, parts[n])
    # boot.scr: a U-Boot script image of boot.cmd with this image's disk id, nothing else changed.
    scr = fat_bytes(image, parts[1], "boot.scr", tmp_path / "boot.scr")
    assert "Script" in run("mkimage", "-l", tmp_path / "boot.scr").stdout
    length = int.from_bytes(scr[64:68], "big")  # legacy header, then the script's length table
    script = scr[72 : 72 + length].decode()
    original = (RECIPES / "uboot" / "boot.cmd").read_text()
    assert script == original.replace(
        "setenv rpi_disk 1234abcd;", f"setenv rpi_disk {UBOOT_DISK_ID};"
    )
    assert script != original
    # uboot.env: U-Boot's initial environment plus the slot variables, readable by the real tool.
    fat_bytes(image, parts[1], "uboot.env", tmp_path / "uboot.env")
    env_config = tmp_path / "fw_env.config"
    env_config.write_text(f"{tmp_path / 'uboot.env'} 0x0000 0x4000\n")
    env = printenv(env_config)
    assert env is not None
    assert env["bootcmd"] == "run distro_bootcmd"
    assert {k: env[k] for k in ("rpi_slot", "upgrade_available", "bootcount", "rpi_disk")} == {
        "rpi_slot": "A",
        "upgrade_available": "0",
        "bootcount": "0",
        "rpi_disk": UBOOT_DISK_ID,
    }
    assert (env["rpi_boot_A"], env["rpi_root_A"], env["rpi_boot_B"], env["rpi_root_B"]) == (
        "2",
        "5",
        "3",
        "6",
    )
    # Both roots carry /etc/fw_env.config, and they are still byte copies.
    root_a = extract(image, parts[5], tmp_path / "rootA.ext4")
    root_b = extract(image, parts[6], tmp_path / "rootB.ext4")
    assert root_a.read_bytes() == root_b.read_bytes()
    shipped = (RECIPES / "uboot" / "fw_env.config").read_bytes()
    assert ext4_cat(root_a, "/etc/fw_env.config") == shipped
    assert f"\ndisk_id={UBOOT_DISK_ID}\n".encode() in ext4_cat(
        root_a, "/etc/rpi-updater/hooks/boot-post"
    )
    # The whole chain: U-Boot runs this boot.scr over this uboot.env with the firmware's command
    # line, and the updater recognises the slot from the command line the kernel gets.
    (tmp_path / "boot.cmd").write_text(script)
    sim = UBootSim(env_config, script=tmp_path / "boot.cmd", firmware_bootargs=firmware_cmdline)
    assert sim.boot() == "A"
    assert cmdline_root(sim.last.cmdline) == [f"root=PARTUUID={UBOOT_DISK_ID}-05"]
    assert sim.last.boot_partition == 2
    config = image_config(image, parts, UBOOT_DISK_ID, tmp_path, sim.last.cmdline)
    assert booted_slot(config) == "A"
    run("fw_setenv", "-c", env_config, "rpi_slot", "B")
    assert sim.boot() == "B"
    assert cmdline_root(sim.last.cmdline) == [f"root=PARTUUID={UBOOT_DISK_ID}-06"]
    assert sim.last.boot_partition == 3
    config = image_config(image, parts, UBOOT_DISK_ID, tmp_path, sim.last.cmdline)
    assert booted_slot(config) == "B"


# --- the update package --------------------------------------------------------------------------


def unpack(package: Package, name: str, dest: Path) -> bytes:
    """A package file as the device writes it (decompressed when the bundle compressed it)."""
    source = package.out / name
    if source.read_bytes()[:4] == b"\x28\xb5\x2f\xfd":  # zstd frames
        run("zstd", "-q", "-d", "-f", source, "-o", dest)
    else:
        shutil.copyfile(source, dest)
    return dest.read_bytes()


def test_update_package_verifies_and_holds_the_images(
    package: Package, inputs: Inputs, tryboot_image: Built, tmp_path: Path
) -> None:
    task_path = package.out / "task.json"
    assert package.stdout.rstrip().splitlines()[-1] == f"task: {task_path}"
    task = parse_task(task_path.read_bytes())
    keyring = Keyring.from_public_keys([package.public_key])
    manifest = verify_envelope((package.out / MANIFEST_NAME).read_bytes(), keyring)
    check_task_against_manifest(task, manifest)
    assert manifest.version == task.version == "a1b1"
    assert manifest.boards == (BOARD,)
    assert [(f.name, f.target, f.version) for f in manifest.files] == [
        ("boot.img", "boot", "a1"),
        ("rootfs.img", "rootfs", "b1"),
    ]
    assert [f.name for f in task.files] == [MANIFEST_NAME, "boot.img", "rootfs.img"]
    for entry in manifest.files:
        data = unpack(package, entry.name, tmp_path / entry.name)
        assert len(data) == entry.size
        assert hashlib.sha256(data).hexdigest() == entry.sha256
    boot, rootfs = tmp_path / "boot.img", tmp_path / "rootfs.img"
    # Each image is exactly its partition, so it fills the slot it is written to.
    assert boot.stat().st_size == tryboot_image.parts[2].length
    assert rootfs.stat().st_size == tryboot_image.parts[5].length
    result = run("e2fsck", "-f", "-n", rootfs, ok=False)
    assert result.returncode == 0, result.stdout + result.stderr
    result = run("fsck.vfat", "-n", boot, ok=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same content as the image's root A (the tree plus the same additions) ...
    image_root = extract(tryboot_image.image, tryboot_image.parts[5], tmp_path / "rootA.ext4")
    assert ext4_files(rootfs, tmp_path) == ext4_files(image_root, tmp_path)
    assert ext4_cat(rootfs, "/etc/os-release").decode() == OS_RELEASE
    # ... and boot.img is slot A's boot partition: cmdline.txt names root A.
    boot_cmdline = run("mtype", "-i", boot, "::/cmdline.txt", env=MTOOLS_ENV).stdout
    image_cmdline = fat_text(tryboot_image.image, tryboot_image.parts[2], "cmdline.txt")
    assert boot_cmdline == image_cmdline


def test_boot_hook_points_a_slot_b_boot_image_at_root_b(
    package: Package, tryboot_image: Built, tmp_path: Path, trusted_dir: Path
) -> None:
    """What a device in slot A does with the package's boot.img: write it into p3, then run the
    boot target's post-install hook (the copy in the package's own root file system)."""
    parts = tryboot_image.parts
    disk = tmp_path / "disk.img"
    run("cp", "--sparse=always", tryboot_image.image, disk)
    boot = unpack(package, "boot.img", tmp_path / "boot.img")
    with disk.open("r+b") as f:
        f.seek(parts[3].offset)
        f.write(boot)
    rootfs = tmp_path / "rootfs.img"
    unpack(package, "rootfs.img", rootfs)
    hook = trusted_dir / "boot-post"
    hook.write_bytes(ext4_cat(rootfs, "/etc/rpi-updater/hooks/boot-post"))
    hook.chmod(0o755)

    def post_install(slot: str, part: Part) -> None:
        context = HookContext(
            task_id="1",
            version="a1b1",
            file_name="boot.img",
            target="boot",
            target_kind="slot",
            device=str(disk),
            slot=slot,
            stage="post-install",
            device_offset=part.offset,
            extra={"device_size": str(part.length)},
        )
        run_hook(str(hook), context, timeout=30)

    assert cmdline_root(fat_text(disk, parts[3], "cmdline.txt")) == [f"root=PARTUUID={DISK_ID}-05"]
    post_install("B", parts[3])
    cmdline = fat_text(disk, parts[3], "cmdline.txt")
    slot_a = fat_text(disk, parts[2], "cmdline.txt")
    assert cmdline == slot_a.replace(f"={DISK_ID}-05 ", f"={DISK_ID}-06 ")
    assert booted_slot(image_config(disk, parts, DISK_ID, tmp_path, cmdline)) == "B"
    # Again (a resumed update runs post-install hooks again): nothing changes.
    before = region(disk, parts[3])
    post_install("B", parts[3])
    assert region(disk, parts[3]) == before
    p3 = extract(disk, parts[3], tmp_path / "p3.fat")
    result = run("fsck.vfat", "-n", p3, ok=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # Slot A's own boot partition is already right: left alone.
    before = region(disk, parts[2])
    post_install("A", parts[2])
    assert region(disk, parts[2]) == before


def test_boot_hook_refuses_what_is_not_a_boot_partition(tmp_path: Path) -> None:
    require_tools()
    blank = tmp_path / "blank.img"
    run("mkfs.vfat", "-C", blank, str(40 * 1024))
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "RPI_UPDATER_DEVICE": str(blank),
        "RPI_UPDATER_DEVICE_OFFSET": "0",
        "RPI_UPDATER_SLOT": "B",
    }
    result = run(BOOT_HOOK, env=env, ok=False)
    assert result.returncode == 1
    assert "config.txt is missing" in result.stderr
    result = run(BOOT_HOOK, env={**env, "RPI_UPDATER_SLOT": ""}, ok=False)
    assert result.returncode == 1
    assert "not A or B" in result.stderr


# --- refusals ------------------------------------------------------------------------------------


@pytest.fixture
def bad_inputs(inputs: Inputs, tmp_path: Path) -> Path:
    copy = tmp_path / "boot"
    shutil.copytree(inputs.boot, copy)
    return copy


def image_args(inputs: Inputs, boot: Path, out: Path, *extra: str) -> list[str | Path]:
    return [MAKE_IMAGE, "--boot", boot, "--rootfs", inputs.root, "--out", out, *SIZE_ARGS, *extra]


@pytest.mark.parametrize(
    ("change", "extra", "message"),
    [
        ("no-cmdline", [], "has no cmdline.txt"),
        ("two-lines", [], "must hold the command line on one line"),
        ("firstboot", [], "randomises the disk signature"),
        ("no-kernel8", ["--uboot"], "has no kernel8.img"),
        ("none", ["--uboot", "--uboot-bin", "/dev/null"], "is not a file"),
        ("none", ["--disk-id", "0x123"], "expected exactly 8 hex digits"),
        ("none", ["--disk-id", "0x00000000"], "no signature"),
        ("none", ["--boot-size", "16"], "--boot-size 16 MiB is too small"),
        ("none", ["--root-size", "2X"], "expected a size in MiB"),
        ("none", ["--uboot"], "--uboot needs --uboot-bin"),
        ("none", ["--bogus", "1"], "unknown option --bogus"),
    ],
)
def test_make_image_refuses_wrong_inputs(
    inputs: Inputs,
    bad_inputs: Path,
    tmp_path: Path,
    change: str,
    extra: list[str],
    message: str,
) -> None:
    if change == "no-cmdline":
        (bad_inputs / "cmdline.txt").unlink()
    elif change == "two-lines":
        (bad_inputs / "cmdline.txt").write_text("console=tty1\nroot=/dev/sda2\n")
    elif change == "firstboot":
        (bad_inputs / "cmdline.txt").write_text(
            CMDLINE.rstrip() + " init=/usr/lib/raspberrypi-sys-mods/firstboot\n"
        )
    elif change == "no-kernel8":
        (bad_inputs / "kernel8.img").unlink()
        extra = [*extra, "--uboot-bin", str(inputs.uboot_bin)]
    out = tmp_path / "disk.img"
    result = run(*image_args(inputs, bad_inputs, out, *extra), ok=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert not out.exists()
    assert not list(tmp_path.glob("disk.img*"))


def test_make_image_refuses_a_missing_tool_and_an_existing_output(
    inputs: Inputs, tmp_path: Path
) -> None:
    out = tmp_path / "disk.img"
    # sfdisk lives in /usr/sbin: without it on PATH the script names the tool and its package.
    result = run(
        *image_args(inputs, inputs.boot, out), env={**os.environ, "PATH": "/usr/bin:/bin"}, ok=False
    )
    assert result.returncode == 1
    assert "missing tool 'sfdisk'" in result.stderr and "'fdisk'" in result.stderr
    assert not out.exists()
    out.write_bytes(b"precious")
    result = run(*image_args(inputs, inputs.boot, out), ok=False)
    assert result.returncode == 1
    assert "exists: remove it or add --force" in result.stderr
    assert out.read_bytes() == b"precious"


def test_make_update_refuses_wrong_inputs(inputs: Inputs, tmp_path: Path) -> None:
    key, _, _ = write_key_pair(tmp_path / "keys")
    common: list[str | Path] = [
        MAKE_UPDATE,
        *("--boot", inputs.boot, "--rootfs", inputs.root, "--key", key),
        *("--out", tmp_path / "pkg", "--base-url", "https://ota.example.com/x"),
        *("--boot-version", "a1", "--rootfs-version", "b1"),
        *("--boot-size", "40", "--root-size", "16"),
    ]
    result = run(*common, ok=False)
    assert result.returncode == 1
    assert "--board MODEL is required" in result.stderr
    # The package version must be the concatenation: bundle refuses, the script says so.
    result = run(*common, "--board", BOARD, "--version", "a1b2", ok=False)
    assert result.returncode == 1
    assert "not the concatenation" in result.stderr
    assert "rpi-updater bundle failed" in result.stderr
    assert not (tmp_path / "pkg" / "task.json").exists()
    result = run(*common, "--board", BOARD, "--base-url", "http://ota.example.com/x", ok=False)
    assert result.returncode == 1
    assert "must be https://" in result.stderr


def test_scripts_are_executable() -> None:
    for script in (MAKE_IMAGE, MAKE_UPDATE, BOOT_HOOK):
        assert script.stat().st_mode & stat.S_IXUSR, f"{script} is not executable"


# --- the system test's virtual machine (--platform qemu-x86) -------------------------------------


def test_qemu_x86_variant(inputs: Inputs, tmp_path: Path) -> None:
    """The system test's disk (tests/system), built quickly from stand-in files: U-Boot is the
    machine's ROM, so p1 holds the boot script and the environment only; the slots' boot
    partitions hold the kernel and the initrd as they are."""
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(os.urandom(300 * 1024))
    (boot / "initrd.img").write_bytes(os.urandom(200 * 1024))
    built = build_image(
        tmp_path / "qemu", replace(inputs, boot=boot), "--platform", "qemu-x86", "--no-watchdog"
    )
    image, parts = built.image, built.parts
    assert [n for n, p in parts.items() if p.bootable] == [1]
    assert sorted(fat_names(image, parts[1])) == ["boot.scr", "uboot.env"]
    scr = fat_bytes(image, parts[1], "boot.scr", tmp_path / "boot.scr")
    assert "x86" in run("mkimage", "-l", tmp_path / "boot.scr").stdout
    length = int.from_bytes(scr[64:68], "big")
    script = scr[72 : 72 + length].decode()
    uboot = RECIPES / "uboot"
    assert script == (uboot / "qemu-x86.cmd").read_text() + (uboot / "boot.cmd").read_text()
    # uboot.env: exactly the slot variables (this U-Boot stores no environment of its own).
    fat_bytes(image, parts[1], "uboot.env", tmp_path / "uboot.env")
    env_config = tmp_path / "fw_env.config"
    env_config.write_text(f"{tmp_path / 'uboot.env'} 0x0000 0x4000\n")
    assert printenv(env_config) == {
        "rpi_slot": "A",
        "upgrade_available": "0",
        "bootcount": "0",
        "bootlimit": "3",
        "rpi_boot_A": "2",
        "rpi_root_A": "5",
        "rpi_boot_B": "3",
        "rpi_root_B": "6",
        "rpi_disk": DISK_ID,
    }
    for n in (2, 3):  # no cmdline.txt or config.txt to adapt: the files as they are
        assert sorted(fat_names(image, parts[n])) == ["initrd.img", "vmlinuz"]
        for name in ("vmlinuz", "initrd.img"):
            got = fat_bytes(image, parts[n], name, tmp_path / f"{name}.{n}")
            assert got == (boot / name).read_bytes()
    root = extract(image, parts[5], tmp_path / "rootA.ext4")
    assert ext4_cat(root, "/etc/fw_env.config") == (uboot / "fw_env.config").read_bytes()
    files = ext4_files(root, tmp_path)
    assert "etc/rpi-updater/hooks/boot-post" not in files  # nothing to adapt on these slots
    assert not any("watchdog" in name for name in files)


def test_qemu_x86_variant_refuses_what_it_cannot_boot(inputs: Inputs, tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "vmlinuz").write_bytes(b"kernel")
    args: list[str | Path] = ["--rootfs", inputs.root, "--platform", "qemu-x86", *SIZE_ARGS]
    no_initrd = run(MAKE_IMAGE, "--boot", boot, "--out", tmp_path / "a.img", *args, ok=False)
    assert no_initrd.returncode == 1 and "has no initrd.img" in no_initrd.stderr
    (boot / "initrd.img").write_bytes(b"initrd")
    bin_given = run(
        MAKE_IMAGE, "--boot", boot, "--out", tmp_path / "b.img", *args,
        "--uboot-bin", inputs.uboot_bin, ok=False,
    )  # fmt: skip
    assert bin_given.returncode == 1 and "no --uboot-bin" in bin_given.stderr
    assert not (tmp_path / "a.img").exists() and not (tmp_path / "b.img").exists()
