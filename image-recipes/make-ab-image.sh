#!/bin/bash
# make-ab-image.sh: build the A/B disk image of rpi-ab-updater (docs: raspberry-pi-ab.md,
# section 3) from a directory of boot files and a root file system tree. Nothing is mounted:
# sfdisk writes the MBR, mkfs.vfat + mtools make the FAT file systems, mke2fs -d the ext4 ones,
# each in a file of its own that dd then puts in place.
#
#   p1  FAT32 0x0c  autoboot: autoboot.txt only (tryboot), or firmware + U-Boot (--uboot)
#   p2  FAT32 0x0c  boot A: the boot files; cmdline.txt root=PARTUUID=<disk id>-05
#   p3  FAT32 0x0c  boot B: the same files;  cmdline.txt root=PARTUUID=<disk id>-06
#   p4  0x05        extended partition, holding:
#   p5  ext4 0x83   root A: the root tree
#   p6  ext4 0x83   root B: a byte copy of root A
#   p7  ext4 0x83   data: persistent (the updater's state directory, --data contents)
#
# Run with --help for the options; image-recipes/README.md explains the inputs and flashing.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG --boot DIR --rootfs DIR --out IMAGE [options]

Inputs:
  --boot DIR           boot files: firmware, kernel, DTBs, overlays, config.txt, and a
                       cmdline.txt template (its root= is replaced for each slot)
  --rootfs DIR         the root file system tree (both slots start with it)
  --data DIR           files for the data partition (optional; copied as they are)
  --out IMAGE          the disk image to write (refused if it exists, unless --force)

Layout (sizes in MiB, or with M/G: 256, 256M, 2G):
  --disk-id ID         MBR disk signature, fixes every PARTUUID (default 0x$DEFAULT_DISK_ID)
  --autoboot-size N    p1 (default $DEFAULT_AUTOBOOT_MIB, at least $MIN_FAT_MIB)
  --boot-size N        p2 and p3 each (default $DEFAULT_BOOT_MIB)
  --root-size N        p5 and p6 each (default $DEFAULT_ROOT_MIB)
  --data-size N        p7 (default $DEFAULT_DATA_MIB; grow it on the device)
  --state-dir PATH     the updater's state_dir as the device sees it; made on the data
                       partition when under --data-mount (default: state_dir of the tree's
                       /etc/rpi-updater/config.yaml, else /data/rpi-updater as in
                       examples/config.yaml)
  --data-mount PATH    where the device mounts p7 (default /data)

Boot flow:
  (default)            firmware tryboot: p1 holds autoboot.txt only
  --uboot              U-Boot: p1 holds the firmware, config.txt (kernel=u-boot.bin),
                       cmdline.txt without root=, u-boot.bin and boot.scr (compiled from
                       image-recipes/uboot/boot.cmd); /etc/fw_env.config in the root
  --uboot-bin FILE     u-boot.bin for --uboot (required with it)
  --uboot-env FILE     U-Boot's u-boot-initial-env: build uboot.env from it plus the slot
                       variables (without it, U-Boot's first boot writes uboot.env itself)
  --platform P         pi (default) or qemu-x86: the system test's virtual machine (U-Boot
                       flow, U-Boot is the machine's firmware so no --uboot-bin; --boot holds
                       vmlinuz and initrd.img; p1 holds boot.scr, compiled from
                       uboot/qemu-x86.cmd + uboot/boot.cmd, and uboot.env with the slot
                       variables; no config.txt, cmdline.txt or watchdog settings)
  --no-watchdog        add no watchdog settings (dtparam=watchdog=on, panic=10, systemd's
                       RuntimeWatchdogSec): only when the inputs already have their own

  --force              overwrite IMAGE
  -h, --help           this text
EOF
}

# --- arguments ----------------------------------------------------------------------------------

boot_dir='' root_dir='' data_dir='' out='' force=0 uboot=0 uboot_bin='' uboot_env='' watchdog=1
id=$DEFAULT_DISK_ID state_dir='' data_mount=/data
autoboot_mib=$DEFAULT_AUTOBOOT_MIB boot_mib=$DEFAULT_BOOT_MIB
root_mib=$DEFAULT_ROOT_MIB data_mib=$DEFAULT_DATA_MIB

while [ $# -gt 0 ]; do
    option=$1
    case $option in
        -h | --help) usage; exit 0 ;;
        --force) force=1; shift; continue ;;
        --uboot) uboot=1; shift; continue ;;
        --no-watchdog) watchdog=0; shift; continue ;;
        --*=*) set -- "${option%%=*}" "${option#*=}" "${@:2}"; continue ;;
        --?*) ;;
        *) die "unexpected argument '$option' (options only, see --help)" ;;
    esac
    [ $# -ge 2 ] || die "$option needs a value (see --help)"
    value=$2
    shift 2
    case $option in
        --boot) boot_dir=$value ;;
        --rootfs) root_dir=$value ;;
        --data) data_dir=$value ;;
        --out) out=$value ;;
        --disk-id) id=$(disk_id "$value") ;;
        --platform) PLATFORM=$(platform "$value") ;;
        --autoboot-size) autoboot_mib=$(size_mib "$value" "$option") ;;
        --boot-size) boot_mib=$(size_mib "$value" "$option") ;;
        --root-size) root_mib=$(size_mib "$value" "$option") ;;
        --data-size) data_mib=$(size_mib "$value" "$option") ;;
        --state-dir) state_dir=$value ;;
        --data-mount) data_mount=${value%/} ;;
        --uboot-bin) uboot_bin=$value ;;
        --uboot-env) uboot_env=$value ;;
        *) die "unknown option $option (see --help)" ;;
    esac
done

[ -n "$boot_dir" ] || die "--boot DIR is required (see --help)"
[ -n "$root_dir" ] || die "--rootfs DIR is required (see --help)"
[ -n "$out" ] || die "--out IMAGE is required (see --help)"
at_least "$autoboot_mib" "$MIN_FAT_MIB" --autoboot-size
at_least "$boot_mib" "$MIN_FAT_MIB" --boot-size
at_least "$root_mib" "$MIN_EXT4_MIB" --root-size
at_least "$data_mib" "$MIN_EXT4_MIB" --data-size
if [ "$PLATFORM" = qemu-x86 ]; then
    if [ -n "$uboot_bin" ] || [ -n "$uboot_env" ]; then
        die "--platform qemu-x86: U-Boot is the machine's firmware, no --uboot-bin or --uboot-env"
    fi
    [ -f "$RECIPES/uboot/qemu-x86.cmd" ] || die "$RECIPES/uboot/qemu-x86.cmd is missing"
    uboot=1 watchdog=0
fi
if [ "$uboot" = 1 ] && [ "$PLATFORM" = pi ]; then
    [ -n "$uboot_bin" ] || die "--uboot needs --uboot-bin FILE (U-Boot built for this board)"
    [ -f "$uboot_bin" ] || die "--uboot-bin '$uboot_bin' is not a file"
    [ -s "$uboot_bin" ] || die "--uboot-bin '$uboot_bin' is empty"
    [ -z "$uboot_env" ] || [ -f "$uboot_env" ] || die "--uboot-env '$uboot_env' is not a file"
elif [ -n "$uboot_bin" ] || [ -n "$uboot_env" ]; then
    die "--uboot-bin and --uboot-env belong to --uboot"
fi
if [ "$uboot" = 1 ]; then
    [ -f "$RECIPES/uboot/boot.cmd" ] || die "$RECIPES/uboot/boot.cmd is missing"
    [ -f "$RECIPES/uboot/fw_env.config" ] || die "$RECIPES/uboot/fw_env.config is missing"
fi
check_boot_dir "$boot_dir" "$uboot"
check_root_dir "$root_dir" --rootfs
[ -z "$data_dir" ] || check_root_dir "$data_dir" --data
case $data_mount in /?*) ;; *) die "--data-mount '$data_mount' must be an absolute path" ;; esac
[ -d "$(dirname "$out")" ] || die "--out '$out': the directory $(dirname "$out") does not exist"
if [ -e "$out" ] || [ -L "$out" ]; then
    if [ ! -f "$out" ] || [ -L "$out" ]; then
        die "--out '$out' exists and is not a regular file"
    fi
    [ "$force" = 1 ] || die "--out '$out' exists: remove it or add --force"
fi

need sfdisk fdisk
need partx util-linux
need mkfs.vfat dosfstools
need fsck.vfat dosfstools
need mcopy mtools
need mtype mtools
need mke2fs e2fsprogs
need e2fsck e2fsprogs
need debugfs e2fsprogs
if [ "$uboot" = 1 ]; then
    need mkimage u-boot-tools
    if [ -n "$uboot_env" ] || [ "$PLATFORM" = qemu-x86 ]; then need mkenvimage u-boot-tools; fi
fi

# The state directory: on the data partition when the updater's state_dir lies under its mount.
if [ -z "$state_dir" ]; then
    config=$root_dir/etc/rpi-updater/config.yaml
    if [ -f "$config" ]; then
        # A top-level "state_dir: /path" line (quotes and a trailing comment allowed).
        state_dir=$(sed -n "s/^state_dir:[[:space:]]*[\"']\{0,1\}\([^\"'#[:space:]]*\).*/\1/p" "$config" | tail -n 1)
        [ -n "$state_dir" ] || state_dir=/var/lib/rpi-updater # the updater's default
    else
        state_dir=$data_mount/rpi-updater # examples/config.yaml
    fi
fi
case $state_dir in
    "$data_mount"/?*) state_rel=/${state_dir#"$data_mount"/} ;;
    *) state_rel='' ;;
esac

# --- the layout, in 512-byte sectors ------------------------------------------------------------
# Every partition starts on a 1 MiB boundary; each logical partition has 1 MiB before it for its
# extended boot record, as fdisk and sfdisk leave it.

s=$SECTORS_PER_MIB
p1_start=$s                                  p1_size=$((autoboot_mib * s))
p2_start=$((p1_start + p1_size))             p2_size=$((boot_mib * s))
p3_start=$((p2_start + p2_size))             p3_size=$((boot_mib * s))
p4_start=$((p3_start + p3_size))
p5_start=$((p4_start + s))                   p5_size=$((root_mib * s))
p6_start=$((p5_start + p5_size + s))         p6_size=$((root_mib * s))
p7_start=$((p6_start + p6_size + s))         p7_size=$((data_mib * s))
total=$((p7_start + p7_size))
p4_size=$((total - p4_start))

make_workdir
partial=$out.partial
rm -f "$partial"
trap 'rm -rf "$WORK"; rm -f "$partial"' EXIT

note "partition table (MBR, disk id 0x$id, $((total / s)) MiB)"
truncate -s "$((total * 512))" "$partial"
bootable=''
# U-Boot's distro boot looks for boot.scr on the partitions marked bootable: mark p1 only.
if [ "$uboot" = 1 ]; then bootable=', bootable'; fi
sfdisk --quiet --no-reread --no-tell-kernel "$partial" <<EOF || die "sfdisk could not write the partition table"
label: dos
label-id: 0x$id
unit: sectors

start=$p1_start, size=$p1_size, type=c$bootable
start=$p2_start, size=$p2_size, type=c
start=$p3_start, size=$p3_size, type=c
start=$p4_start, size=$p4_size, type=5
start=$p5_start, size=$p5_size, type=83
start=$p6_start, size=$p6_size, type=83
start=$p7_start, size=$p7_size, type=83
EOF

# --- the file systems, each built in a file of its own ------------------------------------------

note "boot A and B: $boot_dir"
make_boot_fat "$WORK/boot-a.fat" "$boot_mib" "$boot_dir" "$id" "$ROOT_PART_A" "$watchdog"
cp --sparse=always "$WORK/boot-a.fat" "$WORK/boot-b.fat"
set_boot_root "$WORK/boot-b.fat" "$id" "$ROOT_PART_B" "$watchdog" "$boot_dir"
fat_check "$WORK/boot-a.fat"
fat_check "$WORK/boot-b.fat"

if [ "$uboot" = 0 ]; then
    note "autoboot: autoboot.txt (slot A primary, slot B on a tryboot)"
    fat_new "$WORK/p1.fat" "$autoboot_mib" AUTOBOOT
    autoboot_txt "$WORK/autoboot.txt"
    fat_put "$WORK/p1.fat" "$WORK/autoboot.txt" autoboot.txt
elif [ "$PLATFORM" = qemu-x86 ]; then
    note "firmware partition: boot.scr (uboot/qemu-x86.cmd + uboot/boot.cmd), uboot.env"
    fat_new "$WORK/p1.fat" "$autoboot_mib" FIRMWARE
    compile_boot_scr x86 "$id" "$WORK/boot.scr" "$RECIPES/uboot/qemu-x86.cmd" "$RECIPES/uboot/boot.cmd"
    fat_put "$WORK/p1.fat" "$WORK/boot.scr" boot.scr
    # U-Boot here keeps no environment of its own: uboot.env holds the slot variables only.
    slot_env "$WORK/uboot.env" "$id" /dev/null
    fat_put "$WORK/p1.fat" "$WORK/uboot.env" uboot.env
else
    note "firmware partition: $boot_dir (without kernel*.img), U-Boot, boot.scr"
    fat_new "$WORK/p1.fat" "$autoboot_mib" FIRMWARE
    fat_copy_dir "$WORK/p1.fat" "$boot_dir" 'kernel*.img'
    # The firmware reads config.txt and cmdline.txt from p1 and hands the command line to
    # U-Boot in the device tree; boot.scr appends root= for the slot it picks.
    write_config_txt "$boot_dir/config.txt" "$WORK/config.txt" "$watchdog" 1
    fat_put "$WORK/p1.fat" "$WORK/config.txt" config.txt
    write_cmdline "$boot_dir/cmdline.txt" "$WORK/cmdline.txt" '' "$watchdog"
    fat_put "$WORK/p1.fat" "$WORK/cmdline.txt" cmdline.txt
    fat_put "$WORK/p1.fat" "$uboot_bin" u-boot.bin
    compile_boot_scr arm64 "$id" "$WORK/boot.scr" "$RECIPES/uboot/boot.cmd"
    fat_put "$WORK/p1.fat" "$WORK/boot.scr" boot.scr
    if [ -n "$uboot_env" ]; then
        # A valid uboot.env replaces U-Boot's built-in environment whole: it must carry U-Boot's
        # own defaults (u-boot-initial-env) as well as the slot variables, and be exactly as
        # large as fw_env.config says (U-Boot's CONFIG_ENV_SIZE).
        slot_env "$WORK/uboot.env" "$id" "$uboot_env"
        fat_put "$WORK/p1.fat" "$WORK/uboot.env" uboot.env
    fi
fi
fat_check "$WORK/p1.fat"

note "root A: $root_dir (root B is a copy)"
make_root_ext4 "$WORK/root.ext4" "$root_mib" "$root_dir" "$id" "$uboot" "$watchdog"
if [ "$uboot" = 1 ]; then
    advise_fstab "$root_dir" "$id" /boot/firmware "$data_mount"
else
    advise_fstab "$root_dir" "$id" /boot/autoboot "$data_mount"
fi

note "data: ${data_dir:-(empty)}${state_rel:+, state directory $state_rel}"
data_tree=$data_dir
if [ -z "$data_tree" ]; then
    data_tree=$WORK/empty
    mkdir "$data_tree"
fi
ext4_new "$WORK/data.ext4" "$data_mib" data "$data_tree"
if [ -n "$state_rel" ]; then
    ext4_has "$WORK/data.ext4" "$state_rel" || ext4_mkdir "$WORK/data.ext4" "$state_rel" 0700
else
    note "state_dir $state_dir is not under $data_mount: nothing made for it on the data partition"
fi
ext4_check "$WORK/data.ext4"

# --- into place ---------------------------------------------------------------------------------

# place FILE START SIZE: FILE must be exactly SIZE sectors; dd it to START (whole MiB), leaving
# the image sparse where FILE is.
place() {
    local file=$1 start=$2 size=$3
    [ "$(stat -c %s "$file")" -eq "$((size * 512))" ] || die "$file is not $((size * 512)) bytes"
    dd if="$file" of="$partial" bs=1M seek="$((start / s))" conv=notrunc,sparse status=none ||
        die "dd could not write $file into $partial"
}
place "$WORK/p1.fat" "$p1_start" "$p1_size"
place "$WORK/boot-a.fat" "$p2_start" "$p2_size"
place "$WORK/boot-b.fat" "$p3_start" "$p3_size"
place "$WORK/root.ext4" "$p5_start" "$p5_size"
place "$WORK/root.ext4" "$p6_start" "$p6_size"
place "$WORK/data.ext4" "$p7_start" "$p7_size"

# Read the table back with another tool (libblkid's partx) before calling the image done.
layout=$(partx --show --noheadings -o NR,START,SECTORS,TYPE,UUID "$partial") ||
    die "partx cannot read the partition table back"
expected="1 $p1_start $p1_size 2 $p2_start $p2_size 3 $p3_start $p3_size 4 $p4_start $p4_size"
expected="$expected 5 $p5_start $p5_size 6 $p6_start $p6_size 7 $p7_start $p7_size"
[ "$(awk '{ printf "%s%s %s %s", (NR > 1 ? " " : ""), $1, $2, $3 }' <<<"$layout")" = "$expected" ] ||
    die "the partition table reads back differently from what was written:"$'\n'"$layout"
mv -f "$partial" "$out"

# --- the result ---------------------------------------------------------------------------------

if [ "$PLATFORM" = qemu-x86 ]; then
    p1_role="boot.scr, uboot.env (U-Boot flow, qemu-x86)"
elif [ "$uboot" = 1 ]; then
    p1_role="firmware, u-boot.bin, boot.scr${uboot_env:+, uboot.env} (U-Boot flow)"
else
    p1_role="autoboot.txt: boot_partition=$BOOT_PART_A, [tryboot] boot_partition=$BOOT_PART_B"
fi
roles=(
    ''
    "$p1_role"
    "boot A, cmdline.txt root=PARTUUID=$(partuuid "$id" "$ROOT_PART_A")"
    "boot B, cmdline.txt root=PARTUUID=$(partuuid "$id" "$ROOT_PART_B")"
    "extended"
    "root A (ext4)"
    "root B (ext4, a copy of root A)"
    "data (ext4)${state_rel:+, $state_rel for state_dir $state_dir}"
)
echo "$out: $((total / s)) MiB, MBR disk id 0x$id, $([ "$uboot" = 1 ] && echo U-Boot || echo tryboot) flow"
printf '%-3s %10s %10s %5s  %-12s %s\n' '#' start size type PARTUUID role
while read -r nr start sectors type uuid; do
    printf '%-3s %10s %6s MiB %5s  %-12s %s\n' "p$nr" "$start" "$((sectors / s))" "$type" \
        "$uuid" "${roles[$nr]}"
done <<<"$layout"
cat <<EOF
slots for /etc/rpi-updater/config.yaml:
  A: {boot: PARTUUID=$(partuuid "$id" "$BOOT_PART_A"), root: PARTUUID=$(partuuid "$id" "$ROOT_PART_A")}
  B: {boot: PARTUUID=$(partuuid "$id" "$BOOT_PART_B"), root: PARTUUID=$(partuuid "$id" "$ROOT_PART_B")}
EOF
