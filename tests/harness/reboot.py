"""The reboot harness: what happens between ``systemctl reboot`` and the next boot's health check.

A real reboot cannot happen here, so the harness plays the parts no machine here has, following
their documented behaviour: the reboot command is a small recorder (it writes its arguments and
returns); :meth:`RebootHarness.boot` then applies the bootloader's decision and rewrites what the
next boot's Linux would show: the kernel command line (``root=PARTUUID=...``), the mounted root in
mountinfo, the device-tree values and a new boot id. The updater is a separate process each time,
as after a real reboot.

- tryboot (:class:`PiFirmware`): the one-shot flag, set by ``reboot "0 tryboot"``, selects the
  ``[tryboot]`` partition for one boot; any other reset boots ``[all]``.
- uboot (:class:`UBootSim`): the shipped ``boot.cmd`` interpreted over the real env file with the
  real fw_printenv/fw_setenv: the boot counter, the bootlimit, the fall-back to the old slot.
"""

from __future__ import annotations

import os
from pathlib import Path

from .device import Device
from .pifirmware import PiFirmware
from .ubootsim import UBootSim, make_env

PARTUUIDS = {"A": "1234abcd-05", "B": "1234abcd-06"}
BOOT_PARTITIONS = {"A": 2, "B": 3}


class RebootHarness:
    def __init__(self, device: Device, bootloader: str = "tryboot") -> None:
        self.device = device
        self.bootloader = bootloader
        self.root = device.root
        self.requests = self.root / "reboot-requests"
        recorder = device.hooks_dir / "reboot"
        recorder.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {self.requests}\n')
        recorder.chmod(0o755)
        self.recorder = recorder
        self.firmware = PiFirmware(
            self.root / "autoboot" / "autoboot.txt",
            self.root / "device-tree",
            partitions=BOOT_PARTITIONS,
        )
        self.boots = 1
        self.history: list[str] = ["A"]
        self.uboot: UBootSim | None = None
        if bootloader == "uboot":
            env_config = make_env(self.root / "uboot")
            self.uboot = UBootSim(env_config, cmdline_out=self._path("cmdline"))
            device.write_config(bootloader={"type": "uboot", "fw_env_config": str(env_config)})
            self.boot()  # power on: U-Boot boots slot A and Linux sees its command line
            self.history = ["A"]

    def configure(self, policy: str = "now") -> None:
        """Point the updater's reboot command at the recorder."""
        command = [str(self.recorder), "{reboot_arg}"]
        self.device.write_config(reboot={"policy": policy, "command": command})

    def reboot_requests(self) -> list[str]:
        if not self.requests.exists():
            return []
        return self.requests.read_text().splitlines()

    def boot(self) -> str:
        """The device resets (after a requested reboot, a watchdog, a power cut: the firmware
        cannot tell) and boots; returns the slot that runs now."""
        requests = self.reboot_requests()
        if self.requests.exists():
            self.requests.unlink()
        if self.uboot is not None:
            slot = self.uboot.boot()  # writes the command line U-Boot hands to Linux
        else:
            tryboot = bool(requests) and "tryboot" in requests[-1].split()
            partition = self.firmware.boot(tryboot)
            slot = next(s for s, p in BOOT_PARTITIONS.items() if p == partition)
            self._path("cmdline").write_text(
                f"console=serial0,115200 root=PARTUUID={PARTUUIDS[slot]} rootfstype=ext4 rootwait\n"
            )
        self._linux_sees(slot)
        self.history.append(slot)
        return slot

    def _path(self, key: str) -> Path:
        system = self.device.config["system"]
        assert isinstance(system, dict)
        return Path(str(system[key]))

    def _linux_sees(self, slot: str) -> None:
        mountinfo = self._path("mountinfo")
        region = self.device.parts[f"{slot}.root"]
        if region.offset == 0 and region.path.is_block_device():
            rdev = region.path.stat().st_rdev
            majmin, source = f"{os.major(rdev)}:{os.minor(rdev)}", str(region.path)
        else:
            majmin, source = "254:0", "/dev/vda"
        mountinfo.write_text(
            f"21 1 {majmin} / / rw,relatime shared:1 - ext4 {source} rw\n"
            "22 21 0:5 / /proc rw,nosuid,nodev,noexec,relatime shared:2 - proc proc rw\n"
        )
        self.boots += 1
        (self.root / "boot_id").write_text(f"boot-{self.boots}\n")
