"""Loop-mounted xfs, btrfs and ext4 filesystems holding the big file, for the copy-up rows on them.

Why: whether a copy-up is a clone (FICLONE, milliseconds) or a copy (every byte written) depends
on the filesystem under the lower and the upper, and a clone needs both on the same one. The
cache dir's filesystem is one kind; these rows put a one-layer copy of the big file and the
group's upper, work and mount dirs on a fresh filesystem of each kind.

Owns, per kind, once per suite run, under the run dir: `fs-KIND.img` (a sparse image), its loop
device and its mount at `fs-KIND/`, holding `layers/lower/big/big.bin` (the only lower, which
is also the plain directory: one layer is its own merge) and `scratch/` (the groups' scratch
dirs). Every step registers its undo on the caller's ExitStack on the line that does it, so an
interrupt or a failure unmounts, detaches the loop device and deletes the image. A kind whose
mkfs is missing or that cannot be made here is skipped with a reason, never an error.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks import mounts
from benchmarks.layers import BIG_FILE, Layers, MiB
from benchmarks.procs import CommandError, run, sync

if TYPE_CHECKING:
    from collections.abc import Iterable
    from contextlib import ExitStack
    from pathlib import Path

MKFS = {
    # reflink=1 is the default of recent xfsprogs; said anyway, the rows are about clones.
    "xfs": ("mkfs.xfs", "-q", "-f", "-m", "reflink=1"),
    "btrfs": ("mkfs.btrfs", "-q", "-f"),
    # Inode tables and journal written now, not by ext4lazyinit in the background of a timing.
    "ext4": ("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"),
}
KINDS = tuple(MKFS)  # in table order: two that clone, one that copies
_PACKAGES = {"xfs": "xfsprogs", "btrfs": "btrfs-progs", "ext4": "e2fsprogs"}
# An image holds twice the big file (the lower and one copy-up at a time: each group's copy is
# deleted after it) and this much more for the filesystem's own metadata (btrfs keeps two copies
# of its metadata on one device).
SPARE_BYTES = 512 * MiB


@dataclass(frozen=True, slots=True)
class LoopFilesystem:
    kind: str
    layers: Layers  # the big file alone, as the one lower
    scratch: Path  # where the groups on it make their upper, work and mount dirs
    facts: dict[str, object]


def loop_filesystems(
    stack: ExitStack, kinds: Iterable[str], layers: Layers, run_dir: Path
) -> tuple[dict[str, LoopFilesystem], dict[str, str]]:
    """Make each filesystem of `kinds` (undone when `stack` closes), the big file of `layers`
    on it; return them by kind, and the kinds skipped with the reason why."""
    made: dict[str, LoopFilesystem] = {}
    skipped: dict[str, str] = {}
    for kind in kinds:
        if shutil.which(MKFS[kind][0]) is None:
            skipped[kind] = f"{MKFS[kind][0]} not found (install {_PACKAGES[kind]})"
            continue
        try:
            made[kind] = _make(stack, kind, layers, run_dir)
        except (CommandError, OSError) as exc:
            skipped[kind] = f"could not be made here: {exc}"
    return made, skipped



def _make(stack: ExitStack, kind: str, layers: Layers, run_dir: Path) -> LoopFilesystem:
    print(f"making a {kind} filesystem for the copy-up rows on it...", flush=True)
    image, mount_point = run_dir / f"fs-{kind}.img", run_dir / f"fs-{kind}"
    size = 2 * int(str(layers.facts["big_file_bytes"])) + SPARE_BYTES
    with image.open("xb") as file:
        stack.callback(image.unlink)
        file.truncate(size)  # sparse: only what is written takes room on the cache dir's disk
    run([*MKFS[kind], str(image)], timeout=300)
    # Direct I/O: the image's blocks are not cached a second time in the host's page cache, so
    # "warm" and "written" mean the same on these rows as on the others.
    device = run(["losetup", "--find", "--show", "--direct-io=on", str(image)],
                 capture=True, timeout=60).strip()
    stack.callback(run, ["losetup", "--detach", device], timeout=60)
    mount_point.mkdir()
    stack.callback(mounts.unmount, mount_point, ["umount"], ["umount", "-l"])
    run(["mount", "-t", kind, device, str(mount_point)], timeout=60)
    entry = mounts.wait_until_mounted(mount_point, 60)
    lower = mount_point / "layers" / "lower"
    (lower / BIG_FILE).parent.mkdir(parents=True)
    # Plain cp: the source is on another filesystem, so this writes every byte, as a layer does.
    run(["cp", "-a", str(layers.lowers[0] / BIG_FILE), str(lower / BIG_FILE)])
    scratch = mount_point / "scratch"
    scratch.mkdir()
    sync()
    facts: dict[str, object] = {
        "mkfs": " ".join(MKFS[kind]), "image_bytes": size, "device": device,
        "mount": entry.describe(),
    }
    one_layer = dataclasses.replace(layers, root=mount_point / "layers", lowers=(lower,),
                                    plain=lower)
    return LoopFilesystem(kind, one_layer, scratch, facts)
