# shellcheck shell=bash
# shellcheck disable=SC2034 # the constants are used by the scripts that source this file
# lib.sh: what make-ab-image.sh and make-update.sh share. Sourced by them, not run.
#
# Everything here works on image FILES: nothing is mounted, no loop device is needed (FAT with
# mkfs.vfat + mtools, ext4 with mke2fs -d + debugfs), so the scripts run in containers and as
# an ordinary user too (but see the ownership note in README.md).
#
# The layout and the defaults come from the project's A/B design (docs: raspberry-pi-ab.md,
# section 3) and examples/config.yaml; change them here, in one place, for both scripts.

# --- the layout ---------------------------------------------------------------------------------

readonly MIB=1048576
readonly SECTORS_PER_MIB=2048 # 512-byte sectors: every partition starts on a 1 MiB boundary

readonly DEFAULT_DISK_ID=1234abcd # MBR disk signature: PARTUUIDs are 1234abcd-01 .. -07
readonly DEFAULT_AUTOBOOT_MIB=64  # p1 (doc: 32-64 MiB; FAT32 needs more than 32)
readonly DEFAULT_BOOT_MIB=256     # p2, p3 (doc: at least 256 MiB)
readonly DEFAULT_ROOT_MIB=2048    # p5, p6 (doc: at least 2 GiB)
readonly DEFAULT_DATA_MIB=256     # p7 (doc: "the rest": grow it on the device, see README.md)
readonly MIN_FAT_MIB=40           # below ~33 MiB a FAT32 has too few clusters to be a FAT32
readonly MIN_EXT4_MIB=8

# Partition numbers of the slots, as examples/config.yaml and image-recipes/uboot/boot.cmd
# (rpi_boot_A/B, rpi_root_A/B) have them.
readonly BOOT_PART_A=2 BOOT_PART_B=3 ROOT_PART_A=5 ROOT_PART_B=6

# What the U-Boot flow needs (image-recipes/uboot/README.md).
readonly UBOOT_KERNEL=kernel8.img # boot.cmd's default rpi_kernel, loaded from the slot's p2/p3

# The machine the image is for (--platform). "pi": a Raspberry Pi (the firmware reads config.txt
# and cmdline.txt; tryboot, or U-Boot started by the firmware). "qemu-x86": the system test's
# virtual machine (tests/system): qemu-system-x86_64 with Debian's u-boot-qemu as its firmware,
# always the U-Boot flow. Its slots' boot partitions hold vmlinuz (and initrd.img) only; the
# boot script builds the whole kernel command line; U-Boot there stores no environment of its
# own, so the image carries uboot.env and image-recipes/uboot/qemu-x86.cmd loads and saves it.
PLATFORM=pi
readonly QEMU_KERNEL=vmlinuz QEMU_INITRD=initrd.img

# platform VALUE: check a --platform value.
platform() {
    case $1 in
        pi | qemu-x86) echo "$1" ;;
        *) die "--platform '$1': expected pi or qemu-x86" ;;
    esac
}

# The systemd watchdog drop-in added to a root file system that sets no RuntimeWatchdogSec.
readonly WATCHDOG_DROPIN=/etc/systemd/system.conf.d/rpi-ab-watchdog.conf
# Where examples/config.yaml expects the boot target's post-install hook.
readonly BOOT_POST_HOOK=/etc/rpi-updater/hooks/boot-post

RECIPES=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly RECIPES

# --- messages -----------------------------------------------------------------------------------

PROG=${0##*/}
# Results (the layout, the task path) go to stdout; progress, notes and errors to stderr.
die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}
warn() { printf '%s: warning: %s\n' "$PROG" "$*" >&2; }
note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# need TOOL PACKAGE: refuse to start when a tool is missing, naming the Debian package.
need() {
    command -v "$1" >/dev/null 2>&1 ||
        die "missing tool '$1': install the Debian package '$2' (apt-get install $2)"
}

# --- argument checks ----------------------------------------------------------------------------

# size_mib VALUE OPTION: "256", "256M", "256MiB", "2G", "2GiB" -> a number of MiB.
size_mib() {
    local value=$1 option=$2 number unit
    number=${value%%[!0-9]*}
    unit=${value#"$number"}
    [ -n "$number" ] || die "$option '$value': expected a size in MiB (256, 256M, 2G)"
    number=$((10#$number))
    case $unit in
        '' | M | MiB) echo "$number" ;;
        G | GiB) echo $((number * 1024)) ;;
        *) die "$option '$value': expected a size in MiB (256, 256M, 2G)" ;;
    esac
}

# at_least MIB MINIMUM OPTION
at_least() {
    [ "$1" -ge "$2" ] || die "$3 $1 MiB is too small: at least $2 MiB"
}

# disk_id VALUE: the MBR disk signature as 8 lowercase hex digits (0x prefix optional).
disk_id() {
    local id=${1#0x}
    id=${id#0X}
    case $id in
        *[!0-9a-fA-F]* | '') die "--disk-id '$1': expected 8 hex digits (e.g. 0x1234abcd)" ;;
    esac
    [ "${#id}" -eq 8 ] || die "--disk-id '$1': expected exactly 8 hex digits (e.g. 0x1234abcd)"
    id=$(printf '%s' "$id" | tr 'A-F' 'a-f')
    [ "$id" != 00000000 ] || die "--disk-id 0x00000000 means 'no signature': choose another"
    echo "$id"
}

# partuuid DISK_ID NUMBER: the MBR PARTUUID the kernel and udev use (1234abcd-05).
partuuid() { printf '%s-%02x' "$1" "$2"; }

# check_boot_dir DIR UBOOT: the boot files must hold config.txt and a one-line cmdline.txt
# (on the qemu-x86 platform: the kernel).
check_boot_dir() {
    local dir=$1 uboot=$2 lines file
    [ -d "$dir" ] || die "--boot '$dir' is not a directory"
    if [ "$PLATFORM" = qemu-x86 ]; then
        for file in "$QEMU_KERNEL" "$QEMU_INITRD"; do
            [ -f "$dir/$file" ] ||
                die "--boot '$dir' has no $file: qemu-x86.cmd loads it from the slot's boot partition"
        done
        return 0
    fi
    [ -f "$dir/config.txt" ] || die "--boot '$dir' has no config.txt (the firmware's configuration)"
    [ -f "$dir/cmdline.txt" ] || die "--boot '$dir' has no cmdline.txt (the kernel command line template)"
    lines=$(tr -d '\r' <"$dir/cmdline.txt" | awk 'NF' | wc -l)
    [ "$lines" -eq 1 ] ||
        die "$dir/cmdline.txt must hold the command line on one line (it has $lines non-blank lines)"
    # Raspberry Pi OS's first-boot script gives the disk a random signature (docs, section 3):
    # every PARTUUID of both slots would change, and only the mounted cmdline.txt be fixed.
    if grep -Eq '(^|[[:space:]])init=[^[:space:]]*(firstboot|init_resize)' "$dir/cmdline.txt"; then
        die "$dir/cmdline.txt runs Raspberry Pi OS's first-boot script (init=...), which randomises" \
            "the disk signature and so every PARTUUID: remove that init= from the template"
    fi
    if [ "$uboot" = 1 ]; then
        [ -f "$dir/$UBOOT_KERNEL" ] ||
            die "--boot '$dir' has no $UBOOT_KERNEL: boot.cmd loads it from the slot's boot partition"
    elif [ -z "$(find "$dir" -maxdepth 1 -name 'kernel*.img' -print -quit)" ]; then
        warn "--boot '$dir' has no kernel*.img: the firmware will find no kernel to start"
    fi
}

# check_root_dir DIR: a directory, and a warning when its files would not be root's in the image
# (mke2fs -d copies owners as they are: build the tree as root, or under fakeroot).
check_root_dir() {
    local dir=$1 option=$2 stranger
    [ -d "$dir" ] || die "$option '$dir' is not a directory"
    stranger=$(find "$dir" ! -uid 0 -print -quit 2>/dev/null || true)
    if [ -n "$stranger" ]; then
        warn "$option: $stranger (and maybe more) is not owned by root; it keeps its owner" \
            "(uid $(stat -c %u "$stranger")) in the image: build the tree as root or under fakeroot"
    fi
}

# --- temporary files ----------------------------------------------------------------------------

# make_workdir: $WORK, removed on exit. Under TMPDIR, else /var/tmp (images are large; /tmp is
# often a small tmpfs).
make_workdir() {
    WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/rpi-ab-image.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

# --- text files ---------------------------------------------------------------------------------

# write_cmdline TEMPLATE OUT ROOT PANIC
#   ROOT "PARTUUID=1234abcd-05": every root= is replaced by this one (appended when there is
#        none) and rootwait is added when missing (the SD card may appear late);
#   ROOT "": every root= is dropped (U-Boot's partition 1: boot.scr appends the slot's root=).
#   PANIC 1: panic=10 is added when the template sets no panic= (docs, section 1: a panicking
#        trial boot must reset, so that the old slot boots again).
# Words are kept in order and joined by single spaces; CR line ends are dropped.
write_cmdline() {
    awk -v root="$3" -v panic="$4" '
        function add(word) { out = (out == "" ? word : out " " word) }
        { sub(/\r$/, "") }
        NF == 0 { next }
        {
            for (i = 1; i <= NF; i++) {
                word = $i
                if (word ~ /^root=/) {
                    if (root == "" || placed) continue
                    word = "root=" root
                    placed = 1
                }
                if (word == "rootwait") waits = 1
                if (word ~ /^panic=/) panics = 1
                add(word)
            }
        }
        END {
            if (root != "" && !placed) add("root=" root)
            if (root != "" && !waits) add("rootwait")
            if (panic && !panics) add("panic=10")
            print out
        }' "$1" >"$2"
}

# has_watchdog CONFIG_TXT: true when config.txt already enables the BCM2835 watchdog
# (dtparam=watchdog[=on], alone or in a list, or kernel_watchdog_timeout=N).
has_watchdog() {
    grep -Eq '^[[:space:]]*(dtparam=([^#]*,)?watchdog(=on)?[[:space:]]*(,|$)|kernel_watchdog_timeout=[1-9])' "$1"
}

# write_config_txt SOURCE OUT WATCHDOG UBOOT_P1: config.txt with what the A/B flow needs appended
# (later settings win in config.txt, and [all] undoes any filter the source left open).
write_config_txt() {
    local source=$1 out=$2 watchdog=$3 uboot_p1=$4
    tr -d '\r' <"$source" >"$out"
    if [ -s "$out" ] && [ -n "$(tail -c 1 "$out")" ]; then
        echo >>"$out" # a last line without its newline would swallow ours
    fi
    if [ "$watchdog" = 1 ] && ! has_watchdog "$out"; then
        printf '\n[all]\n%s\n%s\n' \
            '# rpi-ab-updater: a hung trial boot must reset the board (bcm2835_wdt)' \
            'dtparam=watchdog=on' >>"$out"
    fi
    if [ "$uboot_p1" = 1 ]; then
        printf '\n[all]\n%s\n%s\n%s\n' \
            '# rpi-ab-updater U-Boot flow: the firmware starts U-Boot, boot.scr picks the slot' \
            'kernel=u-boot.bin' 'arm_64bit=1' >>"$out"
    fi
}

# autoboot_txt OUT: autoboot.txt with slot A as primary and slot B for the trial boot, exactly
# as the updater writes it (updater/bootloader/tryboot.py, canonical_autoboot).
autoboot_txt() {
    printf '[all]\ntryboot_a_b=1\nboot_partition=%s\n[tryboot]\nboot_partition=%s\n' \
        "$BOOT_PART_A" "$BOOT_PART_B" >"$1"
}

# compile_boot_scr ARCH DISK_ID OUT CMD...: boot.scr from the CMD files concatenated (a platform
# preamble, then boot.cmd), with this image's disk signature as rpi_disk's default.
compile_boot_scr() {
    local arch=$1 id=$2 scr=$3
    shift 3
    cat "$@" | sed "s/^\([[:space:]]*if test -z \"\${rpi_disk}\"; then setenv rpi_disk\) [0-9a-fA-F]\{8\};/\1 $id;/" \
        >"$WORK/boot.cmd"
    grep -q "setenv rpi_disk $id;" "$WORK/boot.cmd" ||
        die "could not set the disk id in a copy of boot.cmd (its 'setenv rpi_disk' line changed?)"
    mkimage -A "$arch" -O linux -T script -C none -n "rpi-ab boot" -d "$WORK/boot.cmd" \
        "$scr" >/dev/null || die "mkimage could not compile boot.cmd"
}

# slot_env OUT DISK_ID INITIAL_ENV: uboot.env, as large as fw_env.config says (U-Boot's
# CONFIG_ENV_SIZE), holding INITIAL_ENV's variables (U-Boot's u-boot-initial-env: a valid
# uboot.env replaces U-Boot's built-in environment whole) and the slot variables, slot A.
slot_env() {
    local out=$1 id=$2 initial=$3 env_size ours
    env_size=$(awk '$1 !~ /^#/ && NF >= 3 { print $3; exit }' "$RECIPES/uboot/fw_env.config")
    ours='rpi_slot|upgrade_available|bootcount|bootlimit|rpi_boot_A|rpi_root_A|rpi_boot_B|rpi_root_B|rpi_disk'
    {
        tr -d '\r' <"$initial" | grep -Ev "^($ours)=" || true
        printf '%s\n' rpi_slot=A upgrade_available=0 bootcount=0 bootlimit=3 \
            "rpi_boot_A=$BOOT_PART_A" "rpi_root_A=$ROOT_PART_A" \
            "rpi_boot_B=$BOOT_PART_B" "rpi_root_B=$ROOT_PART_B" "rpi_disk=$id"
    } >"$WORK/env.txt"
    mkenvimage -s "$env_size" -o "$out" "$WORK/env.txt" ||
        die "mkenvimage could not build uboot.env (more than $env_size bytes?)"
}

# --- FAT (mkfs.vfat + mtools) ---------------------------------------------------------------------

export MTOOLS_SKIP_CHECK=1 # mkfs.vfat's geometry need not be one mtools calls "standard"

# fat_new IMG MIB LABEL: an empty FAT32 file system in a new file of MIB MiB.
fat_new() {
    rm -f "$1"
    truncate -s "$(($2 * MIB))" "$1"
    mkfs.vfat -F 32 -n "$3" "$1" >/dev/null || die "mkfs.vfat failed on $1"
}

# fat_copy_dir IMG DIR [EXCLUDE_GLOB]: DIR's contents (recursively) into the FAT's root.
fat_copy_dir() {
    local img=$1 dir=$2 exclude=${3:-} entry name
    while IFS= read -r entry; do
        name=${entry##*/}
        if [ -n "$exclude" ]; then
            # shellcheck disable=SC2254 # EXCLUDE_GLOB is a pattern on purpose
            case $name in $exclude) continue ;; esac
        fi
        mcopy -Q -s -m -i "$img" "$entry" ::/ ||
            die "cannot copy $entry into the FAT image (more than its size? see --boot-size)"
    done < <(find "$dir" -mindepth 1 -maxdepth 1 | LC_ALL=C sort)
}

# fat_put IMG FILE NAME: FILE as ::/NAME, replacing what is there.
fat_put() {
    mcopy -Q -o -i "$1" "$2" "::/$3" || die "cannot write $3 into the FAT image $1"
}

# fat_check IMG: fsck.vfat, read-only; refuse an image it finds anything wrong with.
fat_check() {
    fsck.vfat -n "$1" >/dev/null 2>&1 || {
        fsck.vfat -n "$1" >&2 || true
        die "fsck.vfat finds problems in $1"
    }
}

# --- ext4 (mke2fs -d + debugfs) -------------------------------------------------------------------

# ext4_new IMG MIB LABEL TREE: an ext4 file system of MIB MiB holding TREE (mke2fs -d). The
# features are the build host's /etc/mke2fs.conf defaults (MKE2FS_CONFIG picks another file).
ext4_new() {
    local img=$1 mib=$2 label=$3 tree=$4
    rm -f "$img"
    truncate -s "$((mib * MIB))" "$img"
    mke2fs -t ext4 -q -F -L "$label" -E root_owner=0:0 -d "$tree" "$img" ||
        die "mke2fs -d $tree failed (does it fit in $mib MiB?)"
}

# ext4_has IMG PATH: is PATH in the file system?
ext4_has() {
    debugfs -R "stat \"$2\"" "$1" 2>/dev/null | grep -q '^Inode:'
}

# ext4_mkdir IMG DIR MODE: DIR (and any missing parent, 0755) owned by root. debugfs does not
# fail on a failed request, so the result is checked afterwards.
ext4_mkdir() {
    local img=$1 dir=$2 mode=$3 path='' rest=${2#/} part perm cmds
    cmds=$(mktemp "$WORK/debugfs.XXXXXX")
    while [ -n "$rest" ]; do
        part=${rest%%/*}
        if [ "$part" = "$rest" ]; then rest=''; else rest=${rest#*/}; fi
        path=$path/$part
        ext4_has "$img" "$path" && continue
        perm=0755
        [ "$path" = "$dir" ] && perm=$mode
        printf 'mkdir "%s"\nsif "%s" mode 040%s\nsif "%s" uid 0\nsif "%s" gid 0\n' \
            "$path" "$path" "${perm#0}" "$path" "$path" >>"$cmds"
    done
    debugfs -w -f "$cmds" "$img" >/dev/null 2>&1 || true
    ext4_has "$img" "$dir" || die "debugfs could not create $dir in $img"
}

# ext4_install IMG SOURCE DEST MODE: a root-owned regular file DEST with SOURCE's bytes.
ext4_install() {
    local img=$1 source=$2 dest=$3 mode=$4 cmds
    ext4_mkdir "$img" "${dest%/*}" 0755
    cmds=$(mktemp "$WORK/debugfs.XXXXXX")
    printf 'write "%s" "%s"\nsif "%s" mode 0100%s\nsif "%s" uid 0\nsif "%s" gid 0\n' \
        "$source" "$dest" "$dest" "${mode#0}" "$dest" "$dest" >"$cmds"
    debugfs -w -f "$cmds" "$img" >/dev/null 2>&1 || true
    debugfs -R "cat \"$dest\"" "$img" 2>/dev/null | cmp -s - "$source" ||
        die "debugfs could not write $dest into $img"
}

# ext4_check IMG: a forced read-only e2fsck; refuse an image it finds anything wrong with.
ext4_check() {
    e2fsck -f -n "$1" >/dev/null 2>&1 || {
        e2fsck -f -n "$1" >&2 || true
        die "e2fsck finds problems in $1"
    }
}

# --- the slot images: the same functions build the disk image and the update package --------------

# make_boot_fat IMG MIB BOOT_DIR DISK_ID ROOT_PART WATCHDOG
# A slot's boot partition: every file of BOOT_DIR, with cmdline.txt naming ROOT_PART's PARTUUID
# and config.txt with the watchdog. Slot A's form (ROOT_PART 5) is also the update's boot.img.
make_boot_fat() {
    local img=$1 mib=$2 dir=$3 id=$4 part=$5 watchdog=$6
    fat_new "$img" "$mib" BOOT
    fat_copy_dir "$img" "$dir"
    # qemu-x86: the boot script names the root on the command line it builds; no files to adapt.
    [ "$PLATFORM" != qemu-x86 ] || return 0
    write_cmdline "$dir/cmdline.txt" "$WORK/cmdline.txt" "PARTUUID=$(partuuid "$id" "$part")" "$watchdog"
    fat_put "$img" "$WORK/cmdline.txt" cmdline.txt
    write_config_txt "$dir/config.txt" "$WORK/config.txt" "$watchdog" 0
    fat_put "$img" "$WORK/config.txt" config.txt
}

# set_boot_root IMG DISK_ID ROOT_PART WATCHDOG BOOT_DIR: point a built boot FAT at another root.
set_boot_root() {
    [ "$PLATFORM" != qemu-x86 ] || return 0
    write_cmdline "$5/cmdline.txt" "$WORK/cmdline.txt" "PARTUUID=$(partuuid "$2" "$3")" "$4"
    fat_put "$1" "$WORK/cmdline.txt" cmdline.txt
}

# systemd_watchdog_set TREE: does the tree's systemd already set RuntimeWatchdogSec?
systemd_watchdog_set() {
    local tree=$1 file
    for file in "$tree/etc/systemd/system.conf" "$tree"/etc/systemd/system.conf.d/*.conf \
        "$tree"/usr/lib/systemd/system.conf.d/*.conf "$tree"/lib/systemd/system.conf.d/*.conf; do
        [ -f "$file" ] || continue
        grep -Eq '^[[:space:]]*RuntimeWatchdogSec=[[:space:]]*[^[:space:]0]' "$file" && return 0
    done
    return 1
}

# make_root_ext4 IMG MIB TREE DISK_ID UBOOT WATCHDOG
# A slot's root file system: TREE, plus what the A/B flow needs that the tree lacks (each only
# when the tree has no such file, so an operator's own version always wins):
#   /etc/fw_env.config                       U-Boot flow: where fw_setenv finds uboot.env
#   /etc/systemd/system.conf.d/rpi-ab-watchdog.conf   RuntimeWatchdogSec=14s (docs, section 1)
#   /etc/rpi-updater/hooks/boot-post         the boot target's post-install hook (README.md),
#                                            when the tree has /etc/rpi-updater (the updater);
#                                            not on qemu-x86, whose boot partitions have no
#                                            cmdline.txt to adapt
# The root partition of the image and the update's rootfs.img are made by this same function.
make_root_ext4() {
    local img=$1 mib=$2 tree=$3 id=$4 uboot=$5 watchdog=$6
    ext4_new "$img" "$mib" rootfs "$tree"
    if [ "$uboot" = 1 ]; then
        if [ -e "$tree/etc/fw_env.config" ]; then
            note "root: keeping the tree's own /etc/fw_env.config"
        else
            ext4_install "$img" "$RECIPES/uboot/fw_env.config" /etc/fw_env.config 0644
            note "root: added /etc/fw_env.config (image-recipes/uboot/fw_env.config)"
        fi
    fi
    if [ "$watchdog" = 1 ] && ! systemd_watchdog_set "$tree"; then
        printf '%s\n' \
            '# Added by rpi-ab-updater image-recipes: systemd pets the BCM2835 watchdog, so a' \
            '# hung system resets (15 s is the hardware maximum). docs: raspberry-pi-ab.md, 1.' \
            '[Manager]' 'RuntimeWatchdogSec=14s' >"$WORK/watchdog.conf"
        ext4_install "$img" "$WORK/watchdog.conf" "$WATCHDOG_DROPIN" 0644
        note "root: added $WATCHDOG_DROPIN (RuntimeWatchdogSec=14s)"
    fi
    if [ "$PLATFORM" = pi ] && [ -d "$tree/etc/rpi-updater" ] && [ ! -e "$tree$BOOT_POST_HOOK" ]; then
        # The hook learns the image's disk id here, so it never has to guess it on the device.
        sed "s/^disk_id=.*/disk_id=$id/" "$RECIPES/hooks/boot-post" >"$WORK/boot-post"
        ext4_install "$img" "$WORK/boot-post" "$BOOT_POST_HOOK" 0755
        note "root: added $BOOT_POST_HOOK (image-recipes/hooks/boot-post, disk id $id)"
    fi
    ext4_check "$img"
}

# advise_fstab TREE MOUNT...: warn about what the tree's /etc/fstab should have but lacks, and
# about slot partitions in it (a root file system serves both slots: it must not name either).
advise_fstab() {
    local tree=$1 id=$2 fstab mount
    shift 2
    fstab=$tree/etc/fstab
    if [ ! -f "$fstab" ]; then
        warn "the root tree has no /etc/fstab: mount $* there (see image-recipes/README.md)"
        return 0
    fi
    for mount in "$@"; do
        awk -v m="$mount" '$1 !~ /^#/ && $2 == m { found = 1 } END { exit !found }' "$fstab" ||
            warn "/etc/fstab of the root tree mounts nothing at $mount (see image-recipes/README.md)"
    done
    if grep -Eiq "^[^#]*PARTUUID=$id-0[2356]" "$fstab"; then
        warn "/etc/fstab of the root tree names a slot partition (PARTUUID=$id-02/03/05/06):" \
            "both slots boot the same root file system, so it may name only p1 and p7"
    fi
}
