"""The images suite's real install: `dpkg -i` of a fixed set of .debs in a Debian chroot.

Owns `CACHE/debs-v<N>/`: the .deb files of PACKAGES (none of them in the minbase image; their
dependencies are), fetched once with `apt-get download` from the host's configured apt sources
(bookworm, as the image is), and READY with their names, sizes and sha256 digests, written last.

Trials, one per system, each on a fresh root showing the same Debian image:

    layerfs          `layerfs --root STORE mount --name N debian:bench MNT` (the image mount)
    fuse-overlayfs   over the store's unpacked layer dir, a fresh upper and work dir
    kernel           the kernel's overlayfs over the same layer dir
    plain            `tar -xp` of the image's tarball into a fresh dir (the floor)

Before the clock: the .debs are copied into `ROOT/tmp/layerfs-bench-debs/` (through the mount),
the layer dir is read into the page cache and dirty pages are flushed. Timed: `chroot ROOT dpkg -i
DEBS...` with a clean environment, which unpacks, runs the maintainer scripts (update-alternatives)
and the libc-bin trigger (ldconfig). dpkg fsyncs what it unpacks, and each system pays for that as
its users do. Afterwards `dpkg-query` inside the root must show every package installed.

Safety: nothing is bind-mounted; the only paths written outside the chroot's own processes are a
fresh dir under the root's `tmp`, which must be a real directory (not a symlink: a planted link
could point into the host). Commands run as children with a timeout, so that a hung FUSE daemon
cannot hang the benchmark.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.images_inputs import IMAGE
from benchmarks.images_workloads import Context, Row, Trial, overlay_mount_command, warm
from benchmarks.procs import CommandError, run, sync, timed
from benchmarks.systems import MOUNT_DEADLINE, _unmount_fuse

if TYPE_CHECKING:
    from contextlib import ExitStack

DEBS_VERSION = 1
# Small to medium packages outside minbase whose dependencies minbase has: two with
# update-alternatives in their postinst (xz-utils, openssl's is a no-op without args), shared
# libraries that fire the libc-bin trigger, and a 6 MB library (libssl3).
PACKAGES = ("file", "libmagic1", "libmagic-mgc", "jq", "libjq1", "libonig5", "xz-utils", "zstd",
            "libssl3", "openssl")
DEBS_DIR = "tmp/layerfs-bench-debs"  # inside the root
CHROOT_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C", "DEBIAN_FRONTEND=noninteractive")
DOWNLOAD_TIMEOUT = 600.0


@dataclass(frozen=True, slots=True)
class Debs:
    files: tuple[Path, ...]
    facts: dict[str, object]


def ensure_debs(cache_dir: Path) -> Debs:
    """The cached .debs, downloaded first (apt-get download; needs apt's sources) if missing."""
    root = cache_dir / f"debs-v{DEBS_VERSION}"
    if not (root / "READY").exists():
        _download(root)
    facts = json.loads((root / "READY").read_text())
    files = tuple(root / name for name in facts["files"])
    return Debs(files, facts)


def debs_missing(cache_dir: Path) -> str | None:
    """Why the .debs cannot be had here, or None (cached, or apt-get is there to fetch them)."""
    if (cache_dir / f"debs-v{DEBS_VERSION}" / "READY").exists() or shutil.which("apt-get"):
        return None
    return "apt-get (to download the .debs once)"


def _download(root: Path) -> None:
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    print(f"downloading {len(PACKAGES)} .debs into {root} (once; apt-get download)...", flush=True)
    # apt-get download writes into its working directory; our children run in /, hence `cd`.
    run(["bash", "-c", 'cd "$1" && shift && exec apt-get download -q "$@"', "bench",
         str(partial), *PACKAGES], timeout=DOWNLOAD_TIMEOUT)
    files = sorted(path.name for path in partial.glob("*.deb"))
    if len(files) != len(PACKAGES):
        raise CommandError(f"apt-get download: got {len(files)} .debs for {len(PACKAGES)} "
                           f"packages: {', '.join(files)}")
    facts = {
        "packages": list(PACKAGES),
        "files": files,
        "bytes": sum((partial / name).stat().st_size for name in files),
        "sha256": {name: hashlib.sha256((partial / name).read_bytes()).hexdigest()
                   for name in files},
    }
    (partial / "READY").write_text(json.dumps(facts, indent=2) + "\n")
    partial.rename(root)


def _install(ctx: Context, root: Path, lower: Path | None) -> float:
    """Copy the .debs in, warm the lower, then time `chroot ROOT dpkg -i`; check the result."""
    if ctx.debs is None:
        raise CommandError("dpkg: the .debs were not prepared")
    # A real dir, not a symlink into the host; then a fresh dir of ours inside it.
    run(["bash", "-c", 'test -d "$1" && ! test -L "$1"', "bench", str(root / "tmp")],
        timeout=MOUNT_DEADLINE)
    target = root / DEBS_DIR
    run(["mkdir", "--", str(target)], timeout=MOUNT_DEADLINE)
    run(["cp", "--", *(str(deb) for deb in ctx.debs.files), str(target)])
    if lower is not None:
        warm(lower)
    sync()
    inside = [f"/{DEBS_DIR}/{deb.name}" for deb in ctx.debs.files]
    seconds = timed(_in_chroot(root, "dpkg", "-i", *inside))
    status = run(_in_chroot(root, "dpkg-query", "-W", "-f", "${db:Status-Abbrev}${Package}\n",
                            *PACKAGES), capture=True, timeout=MOUNT_DEADLINE)
    broken = [line for line in status.splitlines() if not line.startswith("ii ")]
    if broken or len(status.splitlines()) != len(PACKAGES):
        raise CommandError(f"dpkg -i: not every package is installed: {status.strip()}")
    return seconds


def _in_chroot(root: Path, *argv: str) -> list[str]:
    # env -i: nothing of the benchmark's environment (PYTHONPATH, PYTHONPYCACHEPREFIX) leaks in.
    return ["chroot", str(root), "/usr/bin/env", "-i", *CHROOT_ENV, *argv]


def _dpkg_layerfs(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    store, lower = ctx.store(run_index)
    mountpoint = scratch / "mnt"
    mountpoint.mkdir()
    stack.callback(_unmount_fuse, mountpoint)
    run(ctx.cli(store, "mount", "--name", f"dpkg-{run_index}", IMAGE, str(mountpoint)),
        timeout=MOUNT_DEADLINE)
    return [("dpkg", "layerfs", _install(ctx, mountpoint, lower))]


def _dpkg_overlay(system: str, kernel: bool) -> Trial:
    def trial(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
        _, lower = ctx.store(run_index)
        argv = overlay_mount_command(system, stack, scratch, lower, kernel)
        run(argv, timeout=MOUNT_DEADLINE)
        return [("dpkg", system, _install(ctx, Path(argv[-1]), lower))]

    return Trial(system, trial, needs=("layerfs", system))


def _dpkg_plain(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    root = scratch / "root"
    root.mkdir()
    run(["tar", "-C", str(root), "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
         str(ctx.inputs.tarball)])
    return [("dpkg", "plain dir", _install(ctx, root, None))]


TRIALS: tuple[Trial, ...] = (
    Trial("layerfs", _dpkg_layerfs, needs=("layerfs",)),
    _dpkg_overlay("fuse-overlayfs", kernel=False),
    _dpkg_overlay("kernel", kernel=True),
    Trial("plain", _dpkg_plain, needs=("plain",)),
)
