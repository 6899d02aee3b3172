"""System tests: the A/B disk image booted in qemu by U-Boot, with real systemd and reboots."""
