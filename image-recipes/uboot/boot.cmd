# boot.cmd: A/B slot choice with a boot counter, for U-Boot (rpi-ab-updater). On a Raspberry Pi
# this file alone is the boot script; on another platform a preamble in front of it says how that
# platform stores the environment and starts a kernel, and the A/B decision below stays the same.
#
# Raspberry Pi (partition 1 holds boot.scr, u-boot.bin, the firmware and uboot.env):
#   mkimage -A arm64 -O linux -T script -C none -n "rpi-ab boot" -d boot.cmd boot.scr
# qemu x86 VM (Debian's u-boot-qemu; see qemu-x86.cmd):
#   cat qemu-x86.cmd boot.cmd >boot-qemu-x86.cmd
#   mkimage -A x86 -O linux -T script -C none -n "rpi-ab boot" -d boot-qemu-x86.cmd boot.scr
# (docs: raspberry-pi-ab.md, section 2; image-recipes/uboot/README.md).
#
# THE ENVIRONMENT CONTRACT (Linux reads and writes it with fw_printenv/fw_setenv, see
# fw_env.config; the updater's side is updater/bootloader/uboot.py):
#   rpi_slot           A or B: the slot this script boots
#   upgrade_available  1 while rpi_slot is on trial (armed by the updater, not yet committed)
#   bootcount          trial boots so far: counted here, reset to 0 by commit and by rollback
#   bootlimit          trial boots allowed before the rollback (default 3). Keep it 1..8:
#                      bootcount must stay a single digit (<= 9), see step 2. Any other value
#                      counts as 3 (step 1)
#   rpi_boot_A/B       boot partition (FAT: kernel) of each slot, 2 and 3
#   rpi_root_A/B       root partition (ext4) of each slot, 5 and 6
#   rpi_disk           the MBR disk signature, 8 hex digits: root=PARTUUID=${rpi_disk}-0N
#   rpi_kernel         kernel file on the boot partition (default kernel8.img, arm64 Image)
#
# THE PLATFORM CONTRACT: what a preamble may set before this file runs. Each one unset means the
# Raspberry Pi, so boot.cmd alone is the Pi's script, and that is how the Pi runs it.
#   rpi_save           commands ("run rpi_save") that store the A/B variables where fw_printenv
#                      reads them, and FAIL when they could not ("run" returns the status of the
#                      last command the value ran, so the write must be the last, or an if whose
#                      status is the write's). Unset: saveenv (the Pi's U-Boot keeps the whole
#                      environment in uboot.env on partition 1; it returns 1 when it could not
#                      write it)
#   rpi_boot           commands ("run rpi_boot") that load and start the kernel of partition
#                      ${rpi_bootpart}, with ${rpi_bootargs} on its command line; they return
#                      only when they could not. Unset: the Pi's firmware device tree and command
#                      line, fatload ${rpi_kernel}, booti
#   rpi_dev rpi_devnum the disk holding the slots' partitions. Unset: mmc 0
#   rpi_kernel         as above; a preamble sets its platform's kernel file
# This script hands to rpi_boot (helpers, set after the last save):
#   rpi_saved          1 if step 2's save worked, 0 if not (set only on a trial boot)
#   rpi_bootpart, rpi_rootpart  the chosen slot's partitions
#   rpi_bootargs       "root=PARTUUID=${rpi_disk}-0${rpi_rootpart} rootwait rpi_updater.slot=${rpi_slot}":
#                      the chosen root, and the slot the updater reads from /proc/cmdline
# Helpers never reach the stored environment: saveenv stores all that is in memory, so on the Pi
# nothing but the contract variables above and U-Boot's own is set before the last save, and a
# platform's rpi_save stores the A/B variables only. Every line this script and its preamble
# echo starts with "rpi-ab:" (tests watch the console for them).
#
# THE DECISION, in this order:
#   1. Missing variables get defaults (in memory only). A bootlimit that is not one of 1..8
#      (9 or more would never roll back, 0 or junk would roll back at once) becomes 3, in memory
#      (a save of this boot stores it). If rpi_slot is not A or B, the stored environment is new
#      or unreadable (the Pi's U-Boot then runs on its built-in default after "bad CRC"; a
#      preamble reports its own): slot A, no trial, and one save, so Linux can read a valid
#      environment again.
#   2. If upgrade_available=1: bootcount = bootcount + 1. If then bootcount > bootlimit, the
#      trial slot failed bootlimit times: rpi_slot = the other slot, upgrade_available=0,
#      bootcount=0 (the rollback). Then one save, BEFORE the kernel starts, so that a trial that
#      hangs or panics has been counted. (One write per boot, not two: the count and the
#      rollback land together, or neither does.) If that save fails (a damaged FAT, a failing
#      write) on a trial boot, the count is lost, and a trial that panics would boot uncounted
#      forever: so the trial slot does not boot. rpi_slot = the other slot, upgrade_available=0,
#      bootcount=0 in memory only (no second save), and that slot boots; the stored environment
#      still arms the trial, and Linux, booted on the old slot (rpi_updater.slot=), sees the
#      trial as failed. If the rollback's save fails, the rolled-back slot boots all the same,
#      and the next boot rolls back again.
#   3. Boot rpi_slot: load the kernel from its boot partition and hand it ${rpi_bootargs} (the
#      Pi keeps the firmware's device tree and command line, cmdline.txt on partition 1 without
#      root=, and appends them). If the kernel cannot be started during a trial: reset (the next
#      boot counts again, and after bootlimit rolls back).
#
# Boots of a trial slot B with bootlimit=3: B (bootcount 1), B (2), B (3), then A (rollback),
# unless Linux commits (upgrade_available=0, bootcount=0) or marks B bad in between.
#
# Why the script counts: on a real device CONFIG_BOOTCOUNT_LIMIT + CONFIG_BOOTCOUNT_ENV can do
# the counting (U-Boot increments bootcount while upgrade_available=1 and runs altbootcmd past
# bootlimit). Stock Raspberry Pi U-Boot builds do not necessarily enable them, nor setexpr (the
# qemu build has none of the three), so this script counts with test and setenv alone and runs
# on any build with test, run and its platform's commands (Pi: saveenv, fdt, fatload, booti).
# Do not enable both: every boot would then count twice.
#
# Quoting, as U-Boot's hush does it: "..." expands ${} when the command runs, '...' never (a
# preamble's 'run' commands expand when run). A ' inside "..." still quotes: ${} between two of
# them stays unexpanded, so no echo here puts quotes around a variable.
#
# tests/harness/ubootsim.py interprets THIS FILE (no copy of the logic) over a real env file, for
# the Pi and behind qemu-x86.cmd; it knows only the commands used here and there: setenv, test,
# echo, run, saveenv, fdt, fatload, fatwrite, env import/export, booti, bootz, zboot, reset and
# if/elif/else/fi, and which of them each platform's U-Boot has. Use a new command there first,
# or the tests fail.

# --- 1. defaults -----------------------------------------------------------------------------
if test -z "${bootlimit}"; then setenv bootlimit 3; fi
# A bootlimit other than 1..8 counts as the default 3: with 9 or more a trial would never roll
# back (bootcount stops at 9, step 2), with 0 or junk (read as 0) it would at once. Two tests,
# as one command takes at most 16 words (CONFIG_SYS_MAXARGS).
if test "${bootlimit}" != 1 -a "${bootlimit}" != 2 -a "${bootlimit}" != 3 -a "${bootlimit}" != 4; then
    if test "${bootlimit}" != 5 -a "${bootlimit}" != 6 -a "${bootlimit}" != 7 -a "${bootlimit}" != 8; then
        echo "rpi-ab: bootlimit ${bootlimit} is not 1..8: using 3"
        setenv bootlimit 3
    fi
fi
if test -z "${bootcount}"; then setenv bootcount 0; fi
if test -z "${upgrade_available}"; then setenv upgrade_available 0; fi
if test -z "${rpi_boot_A}"; then setenv rpi_boot_A 2; fi
if test -z "${rpi_root_A}"; then setenv rpi_root_A 5; fi
if test -z "${rpi_boot_B}"; then setenv rpi_boot_B 3; fi
if test -z "${rpi_root_B}"; then setenv rpi_root_B 6; fi
# The image's fixed disk signature: the image recipe replaces it when it builds boot.scr.
if test -z "${rpi_disk}"; then setenv rpi_disk 1234abcd; fi
# The Pi's kernel and load address (other platforms set theirs before this runs).
if test -z "${rpi_kernel}"; then setenv rpi_kernel kernel8.img; fi
if test -z "${kernel_addr_r}"; then setenv kernel_addr_r 0x00080000; fi

if test "${rpi_slot}" != "A"; then
    if test "${rpi_slot}" != "B"; then
        echo "rpi-ab: no valid rpi_slot (${rpi_slot}): writing a fresh environment, slot A"
        setenv rpi_slot A
        setenv upgrade_available 0
        setenv bootcount 0
        if test -n "${rpi_save}"; then run rpi_save; else saveenv; fi
    fi
fi

# --- 2. count the trial, roll back past the limit ---------------------------------------------
if test "${upgrade_available}" = "1"; then
    # bootcount + 1 without setexpr: 0..8 count on; anything else (9, or what the updater never
    # writes) becomes 9, which is past every bootlimit of 1..8 and so rolls back.
    if test "${bootcount}" = "0"; then setenv bootcount 1
    elif test "${bootcount}" = "1"; then setenv bootcount 2
    elif test "${bootcount}" = "2"; then setenv bootcount 3
    elif test "${bootcount}" = "3"; then setenv bootcount 4
    elif test "${bootcount}" = "4"; then setenv bootcount 5
    elif test "${bootcount}" = "5"; then setenv bootcount 6
    elif test "${bootcount}" = "6"; then setenv bootcount 7
    elif test "${bootcount}" = "7"; then setenv bootcount 8
    else setenv bootcount 9
    fi
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
    # The save, and whether it worked (rpi_saved is a helper: set after the save, never stored).
    if test -n "${rpi_save}"; then
        if run rpi_save; then setenv rpi_saved 1; else setenv rpi_saved 0; fi
    elif saveenv; then
        setenv rpi_saved 1
    else
        setenv rpi_saved 0
    fi
    if test "${rpi_saved}" != "1"; then
        if test "${upgrade_available}" = "1"; then
            # The count is not stored: a trial that panics would come back uncounted, forever.
            # Boot the other slot instead, in memory only (no second save); Linux sees it booted
            # the old slot while the environment still arms the trial: a failed trial.
            if test "${rpi_slot}" = "B"; then
                echo "rpi-ab: cannot save the environment: not booting trial slot B uncounted, booting A"
                setenv rpi_slot A
            else
                echo "rpi-ab: cannot save the environment: not booting trial slot A uncounted, booting B"
                setenv rpi_slot B
            fi
            setenv upgrade_available 0
            setenv bootcount 0
        else
            echo "rpi-ab: cannot save the environment: the rollback to slot ${rpi_slot} is not stored, the next boot rolls back again"
        fi
    fi
fi

# --- 3. boot the chosen slot --------------------------------------------------------------------
# Set after the last save, so these helpers never reach the stored environment.
if test "${rpi_slot}" = "B"; then
    setenv rpi_bootpart ${rpi_boot_B}
    setenv rpi_rootpart ${rpi_root_B}
else
    setenv rpi_bootpart ${rpi_boot_A}
    setenv rpi_rootpart ${rpi_root_A}
fi
if test -z "${rpi_dev}"; then setenv rpi_dev mmc; fi
if test -z "${rpi_devnum}"; then setenv rpi_devnum 0; fi
setenv rpi_bootargs "root=PARTUUID=${rpi_disk}-0${rpi_rootpart} rootwait rpi_updater.slot=${rpi_slot}"

echo "rpi-ab: booting slot ${rpi_slot} (boot partition ${rpi_bootpart}, trial ${upgrade_available}, bootcount ${bootcount}/${bootlimit})"
if test -n "${rpi_boot}"; then
    run rpi_boot
else
    # The firmware passed its device tree at ${fdt_addr}, with config.txt's overlays applied and
    # cmdline.txt in /chosen/bootargs: keep both and append ours (the kernel takes the last root=).
    fdt addr ${fdt_addr}
    fdt get value bootargs /chosen bootargs
    setenv bootargs "${bootargs} ${rpi_bootargs}"
    # 32-bit kernels: rpi_kernel=zImage and bootz instead of booti.
    if fatload ${rpi_dev} ${rpi_devnum}:${rpi_bootpart} ${kernel_addr_r} ${rpi_kernel}; then
        booti ${kernel_addr_r} - ${fdt_addr}
    fi
fi

echo "rpi-ab: cannot boot ${rpi_kernel} from ${rpi_dev} ${rpi_devnum}:${rpi_bootpart} (slot ${rpi_slot})"
if test "${upgrade_available}" = "1"; then
    reset
fi
