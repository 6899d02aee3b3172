# boot.cmd: A/B slot choice with a boot counter, for U-Boot on a Raspberry Pi (rpi-ab-updater).
#
# Compile:  mkimage -A arm64 -O linux -T script -C none -n "rpi-ab boot" -d boot.cmd boot.scr
# and put boot.scr on partition 1, next to u-boot.bin, the firmware and uboot.env
# (docs: raspberry-pi-ab.md, section 2; image-recipes/uboot/README.md).
#
# THE ENVIRONMENT CONTRACT (Linux reads and writes it with fw_printenv/fw_setenv, see
# fw_env.config; the updater's side is updater/bootloader/uboot.py):
#   rpi_slot           A or B: the slot this script boots
#   upgrade_available  1 while rpi_slot is on trial (armed by the updater, not yet committed)
#   bootcount          trial boots so far: counted here, reset to 0 by commit and by rollback
#   bootlimit          trial boots allowed before the rollback (default 3). Keep it 1..8:
#                      setexpr counts in hex, so bootcount must stay a single digit (<= 9)
#   rpi_boot_A/B       boot partition (FAT: kernel) of each slot, 2 and 3
#   rpi_root_A/B       root partition (ext4) of each slot, 5 and 6
#   rpi_disk           the MBR disk signature, 8 hex digits: root=PARTUUID=${rpi_disk}-0N
#   rpi_kernel         kernel file on the boot partition (default kernel8.img, arm64 Image)
#
# THE DECISION, in this order:
#   1. Missing variables get defaults (in memory only). If rpi_slot is not A or B, the stored
#      environment is new or unreadable (U-Boot then runs on its built-in default after
#      "bad CRC"): slot A, no trial, and saveenv once so Linux can read a valid env again.
#   2. If upgrade_available=1: bootcount = bootcount + 1. If then bootcount > bootlimit, the
#      trial slot failed bootlimit times: rpi_slot = the other slot, upgrade_available=0,
#      bootcount=0 (the rollback). Then saveenv, once, BEFORE the kernel starts, so that a
#      trial that hangs or panics has been counted. (One write per boot, not two: the count and
#      the rollback land together, or neither does.)
#   3. Boot rpi_slot: load the kernel from its boot partition; keep the firmware's device tree
#      and command line (cmdline.txt on partition 1, no root= there) and append
#      "root=PARTUUID=${rpi_disk}-0N rootwait rpi_updater.slot=${rpi_slot}", so Linux can tell
#      which slot U-Boot chose. If the kernel cannot be loaded during a trial: reset (the next
#      boot counts again, and after bootlimit rolls back).
#
# Boots of a trial slot B with bootlimit=3: B (bootcount 1), B (2), B (3), then A (rollback),
# unless Linux commits (upgrade_available=0, bootcount=0) or marks B bad in between.
#
# Why the script counts: on a real device CONFIG_BOOTCOUNT_LIMIT + CONFIG_BOOTCOUNT_ENV can do
# the counting (U-Boot increments bootcount while upgrade_available=1 and runs altbootcmd past
# bootlimit). Stock Raspberry Pi U-Boot builds do not necessarily enable them, so this script
# counts itself and works with any build that has setexpr, test, fdt, fatload and booti.
# Do not enable both: every boot would then count twice.
#
# tests/harness/ubootsim.py interprets THIS FILE (no copy of the logic) over a real env file;
# it knows only the commands used here: setenv, setexpr, saveenv, test, echo, fdt, fatload,
# booti, bootz, reset and if/elif/else/fi. Use a new command there first, or the tests fail.

# --- 1. defaults -----------------------------------------------------------------------------
if test -z "${bootlimit}"; then setenv bootlimit 3; fi
if test -z "${bootcount}"; then setenv bootcount 0; fi
if test -z "${upgrade_available}"; then setenv upgrade_available 0; fi
if test -z "${rpi_boot_A}"; then setenv rpi_boot_A 2; fi
if test -z "${rpi_root_A}"; then setenv rpi_root_A 5; fi
if test -z "${rpi_boot_B}"; then setenv rpi_boot_B 3; fi
if test -z "${rpi_root_B}"; then setenv rpi_root_B 6; fi
# The image's fixed disk signature: the image recipe replaces it when it builds boot.scr.
if test -z "${rpi_disk}"; then setenv rpi_disk 1234abcd; fi
if test -z "${rpi_kernel}"; then setenv rpi_kernel kernel8.img; fi
if test -z "${kernel_addr_r}"; then setenv kernel_addr_r 0x00080000; fi

if test "${rpi_slot}" != "A"; then
    if test "${rpi_slot}" != "B"; then
        echo "rpi-ab: no valid rpi_slot '${rpi_slot}': writing a fresh environment, slot A"
        setenv rpi_slot A
        setenv upgrade_available 0
        setenv bootcount 0
        saveenv
    fi
fi

# --- 2. count the trial, roll back past the limit ---------------------------------------------
if test "${upgrade_available}" = "1"; then
    setexpr bootcount ${bootcount} + 1
    if test ${bootcount} -gt ${bootlimit}; then
        echo "rpi-ab: slot ${rpi_slot} failed ${bootlimit} trial boots: rolling back"
        if test "${rpi_slot}" = "B"; then
            setenv rpi_slot A
        else
            setenv rpi_slot B
        fi
        setenv upgrade_available 0
        setenv bootcount 0
    fi
    saveenv
fi

# --- 3. boot the chosen slot --------------------------------------------------------------------
# Set after the last saveenv, so these helpers never reach the stored environment.
if test "${rpi_slot}" = "B"; then
    setenv rpi_bootpart ${rpi_boot_B}
    setenv rpi_rootpart ${rpi_root_B}
else
    setenv rpi_bootpart ${rpi_boot_A}
    setenv rpi_rootpart ${rpi_root_A}
fi

# The firmware passed its device tree at ${fdt_addr}, with config.txt's overlays applied and
# cmdline.txt in /chosen/bootargs: keep both and append ours (the kernel takes the last root=).
fdt addr ${fdt_addr}
fdt get value bootargs /chosen bootargs
setenv bootargs "${bootargs} root=PARTUUID=${rpi_disk}-0${rpi_rootpart} rootwait rpi_updater.slot=${rpi_slot}"

echo "rpi-ab: booting slot ${rpi_slot} (boot partition ${rpi_bootpart}, trial ${upgrade_available}, bootcount ${bootcount}/${bootlimit})"
# 32-bit kernels: rpi_kernel=zImage and bootz instead of booti.
if fatload mmc 0:${rpi_bootpart} ${kernel_addr_r} ${rpi_kernel}; then
    booti ${kernel_addr_r} - ${fdt_addr}
fi

echo "rpi-ab: cannot boot ${rpi_kernel} from mmc 0:${rpi_bootpart} (slot ${rpi_slot})"
if test "${upgrade_available}" = "1"; then
    reset
fi
