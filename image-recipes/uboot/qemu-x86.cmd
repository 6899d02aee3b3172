# qemu-x86.cmd: boot.cmd's platform preamble for a qemu-system-x86_64 VM running Debian's U-Boot
# (package u-boot-qemu: /usr/lib/u-boot/qemu-x86/u-boot.rom, U-Boot 2023.01). The A/B decision is
# boot.cmd's, unchanged; this file only defines what boot.cmd's PLATFORM CONTRACT asks for.
#
#   cat qemu-x86.cmd boot.cmd >boot-qemu-x86.cmd
#   mkimage -A x86 -O linux -T script -C none -n "rpi-ab boot" -d boot-qemu-x86.cmd boot.scr
#
# The disk (virtio 0) is laid out like the Pi image: partition 1 FAT with boot.scr and uboot.env
# (the default bootcmd's distro boot finds boot.scr there), 2 and 3 FAT with each slot's vmlinuz
# and initrd.img, 5 and 6 the roots. Linux mounts partition 1 at /boot/firmware, so fw_env.config
# (uboot.env, offset 0, size 0x4000, one copy) is the Pi's.
#
# What this U-Boot build lacks, and what stands in for it here:
#   - no stored environment (CONFIG_ENV_IS_NOWHERE, no saveenv): uboot.env is read with fatload
#     (its first 0x4000 bytes; a shorter file counts as none) + "env import -c" and written with
#     "env export -c -s 0x4000" + fatwrite, which is the format fw_printenv/fw_setenv use (CRC32,
#     then name=value NUL-separated, 0x4000 bytes).
#     Only the A/B variables (rpi_vars) go either way: U-Boot's defaults and every helper stay
#     in memory, and a stray variable in the file cannot replace one set here.
#   - no setexpr: boot.cmd counts without it.
#   - no firmware device tree or cmdline.txt: rpi_boot builds the whole command line.
#   - booti: zboot starts the bzImage, with its initrd.
# CONFIG_SYS_MAXARGS is 16 in this build: "env export -c -s SIZE ADDR" and the names are one
# command, so rpi_vars holds at most 10 names.

setenv rpi_dev virtio
setenv rpi_devnum 0
setenv rpi_kernel vmlinuz
setenv rpi_initrd initrd.img
# The kernel decompresses from 0x1000000 over its init_size (0x3378000 for Debian's 6.1 cloud
# kernel), across the default ramdisk_addr_r 0x4000000: the initrd has to lie above that.
setenv rpi_initrd_addr 0x8000000
# A scratch buffer for uboot.env, used before any kernel is loaded.
setenv rpi_env_addr 0x3000000
setenv rpi_env_size 0x4000
setenv rpi_vars "rpi_slot upgrade_available bootcount bootlimit rpi_boot_A rpi_root_A rpi_boot_B rpi_root_B rpi_disk"

# Load the stored environment: its first rpi_env_size bytes, as the Pi's U-Boot and fw_printenv
# read it. A missing file, a short one (fw_printenv cannot read it, and "env import" would take
# the rest of the CRC's span from leftover RAM) or a bad CRC leaves U-Boot's built-in default,
# without rpi_slot: boot.cmd's fresh-environment case, as after "bad CRC" on the Pi. fatload
# sets filesize in hex without 0x.
if fatload ${rpi_dev} ${rpi_devnum}:1 ${rpi_env_addr} uboot.env ${rpi_env_size}; then
    if test "0x${filesize}" != "${rpi_env_size}"; then
        echo "rpi-ab: uboot.env is short (0x${filesize} of ${rpi_env_size} bytes): using the default environment"
    elif env import -c ${rpi_env_addr} ${rpi_env_size} ${rpi_vars}; then
        echo "rpi-ab: environment loaded from uboot.env"
    else
        echo "rpi-ab: uboot.env has a bad CRC: using the default environment"
    fi
else
    echo "rpi-ab: no uboot.env on ${rpi_dev} ${rpi_devnum}:1: using the default environment"
fi

# The save: exactly the A/B variables, written over uboot.env whole. The single quotes keep the
# ${} for "run" time. "run rpi_save" fails when the variables were not stored: run returns the
# status of the last command the value ran (hush's run_list_real), here the if's, which is that
# of env export when it fails and else of fatwrite. boot.cmd checks it.
setenv rpi_save '
    if env export -c -s ${rpi_env_size} ${rpi_env_addr} ${rpi_vars}; then
        fatwrite ${rpi_dev} ${rpi_devnum}:1 ${rpi_env_addr} uboot.env ${rpi_env_size}
    fi
'

# The boot: kernel and initrd from the chosen slot's boot partition, the console on the serial
# port, panic=5 so that a kernel that cannot mount its root resets and the trial counts again.
# Returns only when a file is missing or zboot fails.
setenv rpi_boot '
    setenv bootargs "console=ttyS0,115200 rw panic=5 ${rpi_bootargs}"
    if fatload ${rpi_dev} ${rpi_devnum}:${rpi_bootpart} ${kernel_addr_r} ${rpi_kernel}; then
        setenv rpi_kernel_size ${filesize}
        if fatload ${rpi_dev} ${rpi_devnum}:${rpi_bootpart} ${rpi_initrd_addr} ${rpi_initrd}; then
            zboot ${kernel_addr_r} ${rpi_kernel_size} ${rpi_initrd_addr} ${filesize}
        fi
    fi
'

# boot.cmd follows: the A/B decision.
