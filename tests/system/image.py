"""The system test's disk and packages, built the way a vendor builds them for a fleet.

- The root file system: Debian 12 by mmdebstrap (cached, :func:`tests.harness.debroot.base_tarball`,
  keyed on its package list), our .deb installed into it with apt, then configured as a vendor
  configures a device: the updater's config.yaml (the U-Boot backend, the platform at the
  host's loopback as qemu's user network shows it, 10.0.2.2), the device identity, the test CA,
  the vendor's key in the keyring, a health check, fstab, a static network.
- The disk: ``image-recipes/make-ab-image.sh --platform qemu-x86`` from that tree and the
  kernel and initrd Debian installed in it.
- The updates: ``image-recipes/make-update.sh --platform qemu-x86``, signed with the vendor's key
  (boot.img, rootfs.img and app.conf: three targets, three versions).

Nothing here knows a scenario; tests/system/test_system.py decides what each package holds.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.harness.debroot import (
    REPO,
    Built,
    Root,
    base_tarball,
    deb_field,
    extract,
    ok,
    relations,
    run,
    system_env,
)

__all__ = [
    "BOARD",
    "DEVICE_IP",
    "HOST_IP",
    "Layout",
    "VmTree",
    "build_tree",
    "make_disk",
    "make_package",
    "panic_init",
    "partition",
]

#: What the guest sees of the host through qemu's user network: the host's loopback.
HOST_IP = "10.0.2.2"
DEVICE_IP = "10.0.2.15"
#: The board model the packages are signed for, and where the guest reads it (config.yaml
#: ``system.model``): a file the image carries, as x86 has no device tree model.
BOARD = "rpi-ab-updater qemu-x86 test machine"
MODEL_FILE = "/etc/rpi-updater/board-model"
#: Besides the package's Depends and Recommends: an init, udev (PARTUUIDs), a kernel that
#: boots under qemu, and its initramfs.
VM_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-image-cloud-amd64",
    "initramfs-tools",
)
#: Kept out of the image: documentation and translations (the slot images stay small, and
#: every scenario downloads a root file system).
SLIM = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info")
RECIPES = REPO / "image-recipes"


@dataclass(frozen=True)
class Layout:
    """Partition sizes in MiB: the disk and every package must agree on them."""

    firmware: int = 40
    boot: int = 40
    root: int = 480
    data: int = 64


@dataclass(frozen=True)
class VmTree:
    """A configured root tree and the boot files Debian installed into it."""

    root: Root
    boot: Path  # vmlinuz, initrd.img

    @property
    def path(self) -> Path:
        return self.root.path

    def write(self, path: str, content: str | bytes, mode: int = 0o644) -> None:
        """A root-owned file in the tree (parents made 0755)."""
        target = self.path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        target.write_bytes(content)
        target.chmod(mode)

    def remove(self, path: str) -> None:
        (self.path / path.lstrip("/")).unlink(missing_ok=True)


def vm_tarball(built: Built) -> Path:
    field = deb_field(built.deb, "Depends") + "," + deb_field(built.deb, "Recommends")
    return base_tarball("vm", sorted({*relations(field), *VM_PACKAGES}), variant="minbase")


def build_tree(
    built: Built,
    work: Path,
    *,
    config: Mapping[str, object],
    files: Mapping[str, tuple[str | bytes, int]],
    enable: Sequence[str] = (),
) -> VmTree:
    """Debian 12 with our package, ``config`` as /etc/rpi-updater/config.yaml and ``files``
    (path -> (content, mode)) written over it, the units ``enable`` enabled; the kernel and
    initrd copied out for the boot partitions."""
    tree = Root(work / "rootfs")
    extract(vm_tarball(built), tree.path)
    tree.install(built.deb)
    ok(tree.run("systemctl", "enable", "systemd-networkd.service"), "enabling systemd-networkd")
    for slim in SLIM:
        shutil.rmtree(tree.path / slim, ignore_errors=True)
    vm = VmTree(tree, work / "boot")
    vm.boot.mkdir()
    for name, pattern in (("vmlinuz", "vmlinuz-*"), ("initrd.img", "initrd.img-*")):
        found = sorted((tree.path / "boot").glob(pattern))
        assert len(found) == 1, f"expected one /boot/{pattern} in the root, found {found}"
        shutil.copy(found[0], vm.boot / name)
    vm.write("/etc/rpi-updater/config.yaml", yaml.safe_dump(dict(config), sort_keys=False))
    for path, (content, mode) in files.items():
        vm.write(path, content, mode)
    for unit in enable:
        ok(tree.run("systemctl", "enable", unit), f"systemctl enable {unit}")
    return vm


def _recipe(script: str, *args: str, timeout: float = 600) -> str:
    # The vendor's side signs with this checkout's updater (the interpreter running the tests).
    env = system_env(RPI_UPDATER=f"env PYTHONPATH={REPO} {sys.executable} -m updater.cli")
    proc = run([str(RECIPES / script), *args], timeout=timeout, env=env, cwd=REPO)
    return ok(proc, script) + proc.stderr


def make_disk(tree: VmTree, out: Path, layout: Layout, data: Path) -> str:
    """The device's disk, by the image recipe, with ``data`` on the data partition; returns
    what the recipe printed."""
    return _recipe(
        "make-ab-image.sh",
        "--platform", "qemu-x86",
        "--boot", str(tree.boot),
        "--rootfs", str(tree.path),
        "--out", str(out),
        "--autoboot-size", str(layout.firmware),
        "--boot-size", str(layout.boot),
        "--root-size", str(layout.root),
        "--data-size", str(layout.data),
        "--data", str(data),
    )  # fmt: skip


def make_package(
    *,
    boot: Path,
    rootfs: Path,
    out: Path,
    key: Path,
    base_url: str,
    versions: tuple[str, str, str],
    app_conf: Path,
    root_mib: int,
    layout: Layout,
    images: Path,
) -> dict[str, object]:
    """A signed three-file package by the update recipe: boot.img (boot), rootfs.img (rootfs,
    ``root_mib`` MiB) and app.conf (app-config); returns its task.json. The images, as they
    must land on the partitions (before compression), are kept in ``images``."""
    a, b, c = versions
    _recipe(
        "make-update.sh",
        "--platform", "qemu-x86",
        "--boot", str(boot),
        "--rootfs", str(rootfs),
        "--key", str(key),
        "--out", str(out),
        "--base-url", base_url,
        "--board", BOARD,
        "--boot-version", a,
        "--rootfs-version", b,
        "--file", f"{app_conf}=app-config={c}",
        "--boot-size", str(layout.boot),
        "--root-size", str(root_mib),
        "--images", str(images),
    )  # fmt: skip
    task: dict[str, object] = json.loads((out / "task.json").read_text())
    return task


def panic_init(message: str) -> bytes:
    """A static x86-64 ELF that writes ``message`` to stdout and exits 1: as /sbin/init of a
    root file system, the kernel panics ("Attempted to kill init!") right after the switch
    from the initramfs, and panic=5 reboots into U-Boot: a root that cannot boot."""
    text = message.encode()
    base = 0x400000
    header_size = 64 + 56  # ELF header + one program header
    code = (
        b"\xb8\x01\x00\x00\x00"  # mov eax, 1 (write)
        b"\xbf\x01\x00\x00\x00"  # mov edi, 1
        b"\x48\x8d\x35"
        + struct.pack("<i", 19)  # lea rsi, [rip + 19]: the message
        + b"\xba"
        + struct.pack("<I", len(text))  # mov edx, len
        + b"\x0f\x05"  # syscall
        b"\xb8\x3c\x00\x00\x00"  # mov eax, 60 (exit)
        b"\xbf\x01\x00\x00\x00"  # mov edi, 1
        b"\x0f\x05"  # syscall
    )
    assert len(code) == 36
    size = header_size + len(code) + len(text)
    elf = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian, version 1, System V
        2, 0x3E, 1,  # ET_EXEC, x86-64, version
        base + header_size,  # entry
        64, 0,  # program headers at 64, no section headers
        0, 64, 56, 1, 0, 0, 0,
    )  # fmt: skip
    program = struct.pack(
        "<IIQQQQQQ",
        1, 5,  # PT_LOAD, R+X
        0, base, base,  # the whole file at base
        size, size, 0x1000,
    )  # fmt: skip
    return elf + program + code + text


def host_runs(binary: bytes, tmp: Path) -> subprocess.CompletedProcess[bytes]:
    """Run an x86-64 ELF on this (x86-64) host: the panic init is checked before it is used."""
    path = tmp / "init"
    path.write_bytes(binary)
    path.chmod(0o755)
    return subprocess.run([str(path)], capture_output=True, timeout=10, check=False)


def partition(disk: Path, number: int, size: int) -> bytes:
    """The first ``size`` bytes of partition ``number`` of the disk image (sfdisk's table)."""
    table = json.loads(ok(run(["sfdisk", "-J", str(disk)], timeout=60), "sfdisk -J"))
    parts = table["partitiontable"]["partitions"]
    start = next(p["start"] for p in parts if p["node"].endswith(str(number)))
    with disk.open("rb") as f:
        f.seek(start * 512)
        return f.read(size)
