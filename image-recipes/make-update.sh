#!/bin/bash
# make-update.sh: build a signed update package for devices made by make-ab-image.sh, from the
# same kind of inputs (a directory of boot files, a root file system tree):
#
#   boot.img    the boot partition's FAT32, --boot-size large, cmdline.txt in slot A's form
#               (root=PARTUUID=<disk id>-05): the boot target's post-install hook
#               (hooks/boot-post, /etc/rpi-updater/hooks/boot-post on the device) points it at
#               slot B's root when the device writes it into slot B
#   rootfs.img  the root partition's ext4 (mke2fs -d), exactly --root-size large
#
# then `rpi-updater bundle` signs them into a package: the files, manifest.json and task.json
# (README.md, "Publishing an update"). Both images are built by the functions that build the
# disk image (lib.sh), so a device updated with them has what a freshly flashed one has.
#
# Run with --help for the options; image-recipes/README.md explains the inputs.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$(readlink -f "$0")")/lib.sh"

usage() {
    cat <<EOF
Usage: $PROG --boot DIR --rootfs DIR --key KEY --out DIR --base-url URL --board MODEL
             --boot-version V --rootfs-version V [options]

Inputs (as for make-ab-image.sh):
  --boot DIR            boot files: firmware, kernel, DTBs, overlays, config.txt, cmdline.txt
  --rootfs DIR          the root file system tree

The package (rpi-updater bundle):
  --key KEY             the signing key (rpi-updater keygen's .key)
  --out DIR             the package directory (files, manifest.json, task.json)
  --base-url URL        https:// URL the package's files will be served at
  --board MODEL         a board model it is for, e.g. "Raspberry Pi 4 Model B" (repeatable)
  --boot-version V      the version of boot.img (the device's "boot" target)
  --rootfs-version V    the version of rootfs.img (the device's "rootfs" target)
  --file PATH=TARGET=V  another payload file (repeatable), after boot.img and rootfs.img
  --version V           the package version: by default the files' versions concatenated in
                        the order above, which is what the device expects when its targets
                        are in that order (bundle refuses anything else)
  --boot-target NAME    the device's target for boot.img (default boot)
  --rootfs-target NAME  the device's target for rootfs.img (default rootfs)
  --compress X          zstd (default), xz, gzip or none; passed to bundle
  --allow-downgrade     a rollback release; passed to bundle

Layout (must match the devices' image; sizes in MiB, or with M/G):
  --disk-id ID          MBR disk signature (default 0x$DEFAULT_DISK_ID)
  --boot-size N         boot.img size = the boot partition's (default $DEFAULT_BOOT_MIB)
  --root-size N         rootfs.img size = the root partition's (default $DEFAULT_ROOT_MIB)
  --uboot               the devices use the U-Boot flow (/etc/fw_env.config in the root)
  --no-watchdog         add no watchdog settings (as make-ab-image.sh --no-watchdog)
  --platform P          pi (default) or qemu-x86 (as make-ab-image.sh --platform: the U-Boot
                        flow, boot.img holds the --boot files as they are)

  --images DIR          keep boot.img and rootfs.img there (default: a temporary directory)
  -h, --help            this text

The updater: \$RPI_UPDATER if set (a command, e.g. "rpi-updater"); else, inside a checkout of
the repository, python -m updater.cli from it; else rpi-updater from PATH.
EOF
}

# --- arguments ----------------------------------------------------------------------------------

boot_dir='' root_dir='' key='' out='' base_url='' version='' images=''
boot_version='' rootfs_version='' boot_target=boot rootfs_target=rootfs
id=$DEFAULT_DISK_ID boot_mib=$DEFAULT_BOOT_MIB root_mib=$DEFAULT_ROOT_MIB uboot=0 watchdog=1
boards=() extra_files=() bundle_options=()

while [ $# -gt 0 ]; do
    option=$1
    case $option in
        -h | --help) usage; exit 0 ;;
        --uboot) uboot=1; shift; continue ;;
        --no-watchdog) watchdog=0; shift; continue ;;
        --allow-downgrade) bundle_options+=(--allow-downgrade); shift; continue ;;
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
        --key) key=$value ;;
        --out) out=$value ;;
        --base-url) base_url=$value ;;
        --board) boards+=("$value") ;;
        --boot-version) boot_version=$value ;;
        --rootfs-version) rootfs_version=$value ;;
        --file) extra_files+=("$value") ;;
        --version) version=$value ;;
        --boot-target) boot_target=$value ;;
        --rootfs-target) rootfs_target=$value ;;
        --compress) bundle_options+=(--compress "$value") ;;
        --disk-id) id=$(disk_id "$value") ;;
        --platform) PLATFORM=$(platform "$value") ;;
        --boot-size) boot_mib=$(size_mib "$value" "$option") ;;
        --root-size) root_mib=$(size_mib "$value" "$option") ;;
        --images) images=$value ;;
        *) die "unknown option $option (see --help)" ;;
    esac
done

for required in boot_dir:--boot root_dir:--rootfs key:--key out:--out base_url:--base-url \
    boot_version:--boot-version rootfs_version:--rootfs-version; do
    name=${required%%:*}
    [ -n "${!name}" ] || die "${required#*:} is required (see --help)"
done
[ "${#boards[@]}" -gt 0 ] || die "--board MODEL is required at least once (see --help)"
[ -d "$(dirname "$out")" ] || die "--out '$out': the directory $(dirname "$out") does not exist"
[ -f "$key" ] || die "--key '$key' is not a file (make one with: rpi-updater keygen --out DIR)"
at_least "$boot_mib" "$MIN_FAT_MIB" --boot-size
at_least "$root_mib" "$MIN_EXT4_MIB" --root-size
if [ "$PLATFORM" = qemu-x86 ]; then uboot=1 watchdog=0; fi
check_boot_dir "$boot_dir" "$uboot"
check_root_dir "$root_dir" --rootfs
for spec in "${extra_files[@]}"; do
    path=${spec%=*=*}
    [ "$path" != "$spec" ] || die "--file '$spec': expected PATH=TARGET=VERSION"
    [ -f "$path" ] || die "--file '$spec': $path is not a file"
done
if [ -z "$version" ]; then
    version=$boot_version$rootfs_version
    for spec in "${extra_files[@]}"; do version=$version${spec##*=}; done
fi

need mkfs.vfat dosfstools
need fsck.vfat dosfstools
need mcopy mtools
need mke2fs e2fsprogs
need e2fsck e2fsprogs
need debugfs e2fsprogs

# The updater that signs: $RPI_UPDATER, the repository this script is in, or the installed one.
if [ -n "${RPI_UPDATER:-}" ]; then
    read -r -a updater <<<"$RPI_UPDATER"
elif [ -f "$RECIPES/../updater/cli.py" ]; then
    repo=$(cd "$RECIPES/.." && pwd)
    python=python3
    [ -x "$repo/.venv/bin/python" ] && python=$repo/.venv/bin/python
    updater=(env "PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}" "$python" -m updater.cli)
elif command -v rpi-updater >/dev/null 2>&1; then
    updater=(rpi-updater)
else
    die "no rpi-updater to sign with: install the rpi-ab-updater package, or set RPI_UPDATER"
fi

make_workdir
if [ -z "$images" ]; then
    images=$WORK/images
fi
mkdir -p "$images"

# --- the images ---------------------------------------------------------------------------------

note "boot.img ($boot_mib MiB, slot A's cmdline.txt; the device's boot-post hook adapts it)"
make_boot_fat "$WORK/boot.img" "$boot_mib" "$boot_dir" "$id" "$ROOT_PART_A" "$watchdog"
fat_check "$WORK/boot.img"
mv -f "$WORK/boot.img" "$images/boot.img"

note "rootfs.img ($root_mib MiB ext4 from $root_dir)"
make_root_ext4 "$WORK/rootfs.img" "$root_mib" "$root_dir" "$id" "$uboot" "$watchdog"
if [ "$uboot" = 1 ]; then
    advise_fstab "$root_dir" "$id" /boot/firmware /data
else
    advise_fstab "$root_dir" "$id" /boot/autoboot /data
fi
if [ ! -d "$root_dir/etc/rpi-updater" ]; then
    warn "the root tree has no /etc/rpi-updater: a device updated to it has no updater configured"
fi
mv -f "$WORK/rootfs.img" "$images/rootfs.img"

# --- the package --------------------------------------------------------------------------------

set -- "${updater[@]}" bundle --key "$key" --out "$out" --version "$version" --base-url "$base_url"
for board in "${boards[@]}"; do set -- "$@" --board "$board"; done
set -- "$@" "${bundle_options[@]}" \
    "$images/boot.img=$boot_target=$boot_version" \
    "$images/rootfs.img=$rootfs_target=$rootfs_version" "${extra_files[@]}"
note "signing: ${*@Q}"
"$@" || die "rpi-updater bundle failed (its message is above)"
[ -f "$out/task.json" ] || die "rpi-updater bundle wrote no $out/task.json"
echo "task: $(cd "$out" && pwd)/task.json"
