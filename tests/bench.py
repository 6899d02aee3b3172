"""``make bench``: the updater against the strongest plain pipeline, on the same device, same run.

For each image size (1 GiB and 4 GiB by default; ``BENCH_SIZES_MIB=256,1024`` to change), an
image that is half random, half zeros is made into a signed package by the bundle code
(``manifest.json`` first, then the image, stored uncompressed so that both sides move the same
bytes), served by nginx over HTTPS on 127.0.0.1 and written into the same loop device,
alternately by:

- the baseline: ``curl | tee >(sha256sum) | dd conv=fsync`` of the image (what a shell script
  would do; it checks nothing);
- ``rpi-updater install`` of the package as a device runs it in production: no
  ``security.allow_unsigned``, the keyring in a root-owned directory under /run; so each run
  fetches the manifest, verifies its Ed25519 signature, the board and the task against it, then
  streams the image (TLS verified, SHA-256 on the fly against the manifest, fsync at
  watermarks, journal).

Then (``BENCH_ZSTD_MIB``, 2048 by default; 0 skips it) a real ext4 image, 40 % copies of /usr,
5 % random, the rest free, bundled as zstd frames (bundle's defaults), against
``curl | zstd -d | dd`` (which checks nothing) and the same with ``tee >(sha256sum)``; the
device is written once before the timed runs, and the two sides alternate who goes first.

Each is run ``BENCH_RUNS`` times (3 by default) and the medians are printed side by side with
their ratio, plus the updater's CPU time and peak RSS. The machines are noisy: read the ratios.
Needs root (loop devices, the keyring) and about 3x the largest size in free disk space while a
package is built (the image, its copy in the package, the loop device's backing file).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness import LoopDevices, Nginx, make_tls_files
from tests.harness.device import MiB, build_device
from tests.harness.signing import BOARD, Vendor
from updater.bundle import NO_COMPRESSION, PayloadFile, build_bundle
from updater.encode import Compression

CHUNK = 4 * MiB


@dataclass(frozen=True, slots=True)
class Run:
    wall: float
    cpu: float
    rss_mib: float


def make_image(path: Path, size: int) -> str:
    """Half random, half zeros, in 4 MiB runs (like a filesystem image); returns the sha256."""
    digest = hashlib.sha256()
    zeros = bytes(CHUNK)
    with path.open("wb") as f:
        for i, start in enumerate(range(0, size, CHUNK)):
            n = min(CHUNK, size - start)
            block = os.urandom(n) if i % 2 == 0 else zeros[:n]
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def _hwm_kib(pid: int) -> int:
    """The process's peak RSS so far (VmHWM), or 0 once it is gone."""
    try:
        with Path(f"/proc/{pid}/status").open() as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def timed(cmd: list[str], **kwargs: object) -> Run:
    """Wall time, CPU time (user + system of the process tree) and peak RSS of one command.

    The peak RSS is VmHWM sampled from /proc while the command runs: ``ru_maxrss`` would count
    the benchmark's own memory, which a child inherits at fork-and-exec.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, **kwargs)  # type: ignore[call-overload]
    peak = 0
    while True:
        peak = max(peak, _hwm_kib(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.02)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {cmd[0]} failed with {proc.returncode}")
    return Run(wall, usage.ru_utime + usage.ru_stime, peak / 1024)


def baseline(url: str, ca: Path, device: Path, size: int) -> Run:
    script = (
        "set -euo pipefail; "
        f"curl -sS --fail --cacert {ca} {url} "
        "| tee >(sha256sum > /dev/null) "
        f"| dd of={device} bs=1M iflag=fullblock conv=fsync status=none"
    )
    return timed(["bash", "-c", script])


def median(runs: list[Run]) -> Run:
    return Run(
        statistics.median(r.wall for r in runs),
        statistics.median(r.cpu for r in runs),
        max(r.rss_mib for r in runs),
    )


def publish(vendor: Vendor, size: int, work: Path, nginx: Nginx) -> tuple[str, str, Path]:
    """A signed package of one image, in nginx's docroot: the image's URL, its sha256 and the
    package's directory (``task.json`` is the push)."""
    name = f"rootfs-{size // MiB}.img"
    source = work / name
    sha256 = make_image(source, size)
    prefix = f"pkg-{size // MiB}"
    package = nginx.root / prefix
    try:
        build_bundle(
            [PayloadFile(source, "rootfs", f"b{size // MiB}")],
            private_pem=vendor.key.private_pem,
            out_dir=package,
            version=f"b{size // MiB}",
            boards=[BOARD],
            base_url=nginx.url(prefix),
            # Stored as is: the baseline streams the same uncompressed bytes.
            compression=NO_COMPRESSION,
            # Served by our own nginx, not the IoT Platform's storage (1000 MiB a file).
            max_file_size=size,
        )
    finally:
        source.unlink()  # the package holds its own copy
    return nginx.url(f"{prefix}/{name}"), sha256, package


def bench_size(
    size: int, runs: int, work: Path, nginx: Nginx, loops: LoopDevices, vendor: Vendor
) -> None:
    print(f"== {size // MiB} MiB image (half random): preparing a signed package", flush=True)
    url, sha256, package = publish(vendor, size, work, nginx)
    dev_root = work / f"dev-{size // MiB}"
    device = build_device(
        dev_root, loops=loops, ca_file=nginx.ca_file, root_size=size, fill_booted=False
    )
    device.write_config(
        download={
            "ca_file": str(nginx.ca_file),
            "buffer_size": 1 * MiB,
            "fsync_interval": 64 * MiB,
        },
        # The production default: signatures required (no allow_unsigned).
        security={"keyring": str(vendor.keyring)},
    )
    target = device.parts["B.root"].path
    task = package / "task.json"
    ours: list[Run] = []
    theirs: list[Run] = []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for i in range(runs):
        theirs.append(baseline(url, nginx.ca_file, target, size))
        shutil.rmtree(device.state_dir, ignore_errors=True)  # a fresh install every time
        ours.append(
            timed(
                device.command("install", str(task), "--progress", "none"),
                env=env,
                stderr=subprocess.DEVNULL,
            )
        )
        print(
            f"   run {i + 1}: baseline {theirs[-1].wall:.2f} s, updater {ours[-1].wall:.2f} s",
            flush=True,
        )
    assert device_sha256(target, size) == sha256, "the device does not hold the image"
    b, u = median(theirs), median(ours)
    mib = size / MiB
    print(f"{'':28}{'wall s':>9}{'MiB/s':>9}{'CPU s':>9}{'peak RSS MiB':>14}")
    print(f"{'curl|tee(sha256sum)|dd':28}{b.wall:9.2f}{mib / b.wall:9.0f}{b.cpu:9.2f}{'-':>14}")
    print(
        f"{'rpi-updater install':28}{u.wall:9.2f}{mib / u.wall:9.0f}{u.cpu:9.2f}{u.rss_mib:14.1f}"
    )
    print("  (the updater: signed package, manifest fetched and verified first, keyring required)")
    print(f"ratio updater/baseline (wall): {u.wall / b.wall:.2f}  (target <= 1.10)")
    print(f"ratio updater/baseline (CPU):  {u.cpu / b.cpu:.2f}", flush=True)
    shutil.rmtree(package)
    loops.detach_all()


# -- compressed: a 2 GiB ext4 image in zstd frames against curl | zstd -d | dd ------------------


def make_ext4_image(path: Path, size: int, work: Path) -> str:
    """A real root filesystem image: ext4, filled to about 40 % with copies of /usr (text and
    binaries, what a rootfs holds) and 5 % random data, the rest free (zeros). Returns its
    sha256."""
    with path.open("wb") as f:
        f.truncate(size)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(path)],
        check=True,
    )
    mnt = work / "mnt"
    mnt.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(path), str(mnt)], check=True)
    try:
        budget = int(size * 0.40)
        copied = 0
        for top in ("/usr/share", "/usr/lib", "/usr/bin"):
            for src in sorted(Path(top).rglob("*")):
                if copied >= budget:
                    break
                if src.is_symlink() or not src.is_file():
                    continue
                try:
                    n = src.stat().st_size
                    if n > 64 * MiB:
                        continue
                    dest = mnt / src.relative_to("/")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest)
                except OSError:
                    continue
                copied += n
        with (mnt / "random.bin").open("wb") as f:
            for _ in range(int(size * 0.05) // CHUNK):
                f.write(os.urandom(CHUNK))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def zstd_baseline(url: str, ca: Path, device: Path, *, check: bool = False) -> Run:
    """``curl | zstd -d | dd`` (the issue's baseline); with ``check``, the image's sha256 is
    computed on the way too, as the updater does (it also hashes what it downloaded)."""
    script = (
        "set -euo pipefail; "
        f"curl -sS --fail --cacert {ca} {url} "
        "| zstd -d -q "
        + ("| tee >(sha256sum > /dev/null) " if check else "")
        + f"| dd of={device} bs=1M iflag=fullblock conv=fsync status=none"
    )
    return timed(["bash", "-c", script])


def bench_compressed(
    size: int, runs: int, work: Path, nginx: Nginx, loops: LoopDevices, vendor: Vendor
) -> None:
    print(f"== {size // MiB} MiB ext4 image, zstd: preparing a signed package", flush=True)
    name = "rootfs.img"
    source = work / name
    sha256 = make_ext4_image(source, size, work)
    prefix = f"zst-{size // MiB}"
    package = nginx.root / prefix
    try:
        result = build_bundle(
            [PayloadFile(source, "rootfs", "b1")],
            private_pem=vendor.key.private_pem,
            out_dir=package,
            version="b1",
            boards=[BOARD],
            base_url=nginx.url(prefix),
            compression=Compression("zstd"),  # bundle's default: level 3, 4 MiB frames
        )
    finally:
        source.unlink()
    served = (package / name).stat().st_size
    assert result.manifest.files[0].encoding == "zstd"
    print(f"   {size // MiB} MiB image -> {served / MiB:.0f} MiB of zstd frames", flush=True)
    device = build_device(
        work / f"dev-zst-{size // MiB}",
        loops=loops,
        ca_file=nginx.ca_file,
        root_size=size,
        fill_booted=False,
    )
    device.write_config(
        download={
            "ca_file": str(nginx.ca_file),
            "buffer_size": 1 * MiB,
            "fsync_interval": int(os.environ.get("BENCH_FSYNC_MIB", "64")) * MiB,
        },
        security={"keyring": str(vendor.keyring)},
    )
    target = device.parts["B.root"].path
    url = nginx.url(f"{prefix}/{name}")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    ours: list[Run] = []
    theirs: list[Run] = []
    checked: list[Run] = []

    def updater() -> Run:
        shutil.rmtree(device.state_dir, ignore_errors=True)  # a fresh install every time
        return timed(
            device.command("install", str(package / "task.json"), "--progress", "none"),
            env=env,
            stderr=subprocess.DEVNULL,
        )

    # Untimed: the first writes to the loop device's backing file allocate its blocks, and
    # whichever side ran first would pay for that.
    zstd_baseline(url, nginx.ca_file, target)
    for i in range(runs):
        # Alternate who goes first: the page cache and the disk's write-back favour neither.
        if i % 2:
            ours.append(updater())
            theirs.append(zstd_baseline(url, nginx.ca_file, target))
        else:
            theirs.append(zstd_baseline(url, nginx.ca_file, target))
            ours.append(updater())
        checked.append(zstd_baseline(url, nginx.ca_file, target, check=True))
        print(
            f"   run {i + 1}: baseline {theirs[-1].wall:.2f} s, with sha256sum "
            f"{checked[-1].wall:.2f} s, updater {ours[-1].wall:.2f} s",
            flush=True,
        )
    ours.append(updater())  # the device must end up holding the updater's work
    assert device_sha256(target, size) == sha256, "the device does not hold the image"
    b, u = median(theirs), median(ours)
    mib = size / MiB
    print(f"{'':28}{'wall s':>9}{'MiB/s':>9}{'CPU s':>9}{'peak RSS MiB':>14}")
    c = median(checked)
    print(f"{'curl|zstd -d|dd':28}{b.wall:9.2f}{mib / b.wall:9.0f}{b.cpu:9.2f}{'-':>14}")
    print(f"{'curl|zstd -d|tee(sha)|dd':28}{c.wall:9.2f}{mib / c.wall:9.0f}{c.cpu:9.2f}{'-':>14}")
    print(
        f"{'rpi-updater install':28}{u.wall:9.2f}{mib / u.wall:9.0f}{u.cpu:9.2f}{u.rss_mib:14.1f}"
    )
    print("  (MiB/s of image; the updater also checks the transfer's and the image's SHA-256)")
    print(f"ratio updater/baseline (wall): {u.wall / b.wall:.2f}  (target <= 1.10)")
    print(f"ratio updater/baseline (CPU):  {u.cpu / b.cpu:.2f}", flush=True)
    shutil.rmtree(package)
    loops.detach_all()


def device_sha256(target: Path, size: int) -> str:
    got = hashlib.sha256()
    with target.open("rb") as f:
        remaining = size
        while remaining:
            block = f.read(min(CHUNK, remaining))
            got.update(block)
            remaining -= len(block)
    return got.hexdigest()


def main() -> int:
    if os.geteuid() != 0:
        print("bench: needs root for loop devices", file=sys.stderr)
        return 1
    sizes = [int(s) * MiB for s in os.environ.get("BENCH_SIZES_MIB", "1024,4096").split(",") if s]
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    zstd_size = int(os.environ.get("BENCH_ZSTD_MIB", "2048")) * MiB
    # The keyring must be root-owned and 0755 all the way up: under /run, not /var/tmp (1777).
    trusted = Path(tempfile.mkdtemp(prefix="rpi-bench-trusted-", dir="/run"))
    try:
        trusted.chmod(0o755)
        with tempfile.TemporaryDirectory(prefix="rpi-bench-", dir="/var/tmp") as tmp:
            work = Path(tmp)
            tls = make_tls_files(work / "tls")
            vendor = Vendor.create(trusted, work / "vendor")
            with Nginx(work / "www", tls, work / "nginx") as nginx, LoopDevices() as loops:
                for size in sizes:
                    bench_size(size, runs, work, nginx, loops, vendor)
                if zstd_size:
                    bench_compressed(zstd_size, runs, work, nginx, loops, vendor)
    finally:
        shutil.rmtree(trusted, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
