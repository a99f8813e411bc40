"""The filesystems the overlay's layers live on in the tests: loop-mounted ext4, xfs and btrfs
images, tmpfs mounts, and lowers seen through a read-only bind mount or a read-only kernel
overlay mount (stacked layers).

`ScratchFilesystems` makes each filesystem once per test session, on first use, and unmounts
and detaches everything it made at the end. Tests get fresh directories on them
(`ScratchFilesystems.dir`), so one image serves many tests. `Placement` names one case of the
matrix: which filesystem holds the lowers, which the upper (and work) dir, and how the lowers
are shown to the overlay. `placed_lowers` turns lowers built on plain directories into what that
case mounts.

A small filesystem of a test's own (a full upper, a full store) is `mounted_filesystem` with
a size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tests.fsapi import is_mounted, unmount

if TYPE_CHECKING:
    from collections.abc import Iterator

LOOP_KINDS = ("ext4", "xfs", "btrfs")
KINDS = (*LOOP_KINDS, "tmpfs")
IMAGE_BYTES = 2 << 30
"""Sparse: only what the tests write takes host disk. Room for the 1 GiB reflink test."""

_MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"],
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result.stdout.strip()


@contextlib.contextmanager
def mounted_filesystem(kind: str, mnt: Path, size: int = IMAGE_BYTES) -> Iterator[Path]:
    """A new, empty filesystem of `kind` mounted at `mnt` (made if missing); on the way out it
    is unmounted, its loop device detached and its image deleted."""
    mnt.mkdir(exist_ok=True)
    if kind == "tmpfs":
        _run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mnt)])
        try:
            yield mnt
        finally:
            unmount(mnt)
        return
    image = mnt.with_name(mnt.name + ".img")
    with open(image, "wb") as f:
        f.truncate(size)
    device = ""
    try:
        _run([*_MKFS[kind], str(image)])
        device = _run(["losetup", "--find", "--show", str(image)])
        _run(["mount", "-t", kind, device, str(mnt)])
        yield mnt
    finally:
        if is_mounted(mnt):
            unmount(mnt)
        if device:
            _run(["losetup", "--detach", device])
        image.unlink()


class ScratchFilesystems:
    """One filesystem of each kind for the session, made when first asked for."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._mounted: dict[str, Path] = {}
        self._stack = contextlib.ExitStack()

    def dir(self, kind: str, prefix: str = "t") -> Path:
        """A fresh empty directory on a filesystem of `kind` ("host": the session's tmp)."""
        if kind == "host":
            root = self._base
        else:
            root = self._mounted.get(kind)
            if root is None:
                root = self._stack.enter_context(mounted_filesystem(kind, self._base / kind))
                self._mounted[kind] = root
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))

    def close(self) -> None:
        self._stack.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """One case of the matrix: where the lowers and the upper live, and how lowers are shown."""

    name: str
    lower_fs: str
    upper_fs: str
    lower_view: str = "plain"
    """"plain"; "ro-bind": through a read-only bind mount; "ro-overlay": the bottom lower
    is a read-only kernel overlay mount of two layers made from it."""


PLACEMENTS = (
    Placement("ext4", "ext4", "ext4"),
    Placement("xfs", "xfs", "xfs"),
    Placement("btrfs", "btrfs", "btrfs"),
    Placement("tmpfs", "tmpfs", "tmpfs"),
    Placement("tmpfs-lowers-ext4-upper", "tmpfs", "ext4"),
    Placement("ext4-lowers-tmpfs-upper", "ext4", "tmpfs"),
    Placement("ro-bind-lowers", "ext4", "ext4", "ro-bind"),
    Placement("ro-overlay-lowers", "ext4", "ext4", "ro-overlay"),
)
BY_NAME = {p.name: p for p in PLACEMENTS}


@contextlib.contextmanager
def placed_lowers(placement: Placement, lowers: list[Path]) -> Iterator[list[Path]]:
    """The lowers as `placement` shows them to an overlay (top first), built from `lowers`,
    which must share one parent directory; the mounts made for it go on the way out."""
    if placement.lower_view == "plain":
        yield lowers
        return
    parent = lowers[0].parent
    assert all(p.parent == parent for p in lowers)
    if placement.lower_view == "ro-bind":
        view = parent.with_name(parent.name + ".ro")
        view.mkdir()
        _run(["mount", "--bind", str(parent), str(view)])
        try:
            _run(["mount", "-o", "remount,bind,ro", str(view)])
            yield [view / p.name for p in lowers]
        finally:
            unmount(view)
            view.rmdir()
        return
    assert placement.lower_view == "ro-overlay"
    bottom = lowers[-1]
    source = bottom.with_name(bottom.name + ".bottom")
    top = bottom.with_name(bottom.name + ".top")
    bottom.rename(source)
    bottom.mkdir()
    _split_layer(source, top)
    # nfs_export: file handles, without which an overlay above this one (the kernel's oracle)
    # falls back to index=off and breaks lower hard links on copy-up
    options = f"ro,lowerdir={top}:{source},redirect_dir=nofollow,nfs_export=on"
    _run(["mount", "-t", "overlay", "overlay", "-o", options, str(bottom)])
    try:
        yield lowers
    finally:
        unmount(bottom)


def _split_layer(source: Path, top: Path) -> None:
    """Make `source` two layers: every other top-level file moves to the new layer `top`,
    whose root takes the source root's owner, mode and times (an overlay root shows the top
    layer's). Hard-linked files stay, so that their groups stay whole."""
    st = os.lstat(source)
    top.mkdir()
    names = sorted(e.name for e in os.scandir(source)
                   if not e.is_dir(follow_symlinks=False)
                   and e.stat(follow_symlinks=False).st_nlink == 1)
    for name in names[::2]:
        os.rename(source / name, top / name)
    os.chown(top, st.st_uid, st.st_gid)
    os.chmod(top, st.st_mode & 0o7777)
    os.utime(top, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))

