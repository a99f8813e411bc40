"""Copy-up shares extents where the filesystem can (xfs with reflink=1, btrfs), as the kernel's
overlayfs does: a 1 GiB lower file is copied up without its data being written again.

Lower and upper are on one scratch filesystem of the matrix (tests/fsmatrix.py): a clone needs
both ends on one filesystem.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from tests.fsapi import Layers, kernel_overlay, mounted_overlay

if TYPE_CHECKING:
    from pathlib import Path

    from tests.fsmatrix import ScratchFilesystems

GIB = 1 << 30
SHARED_SLACK = 32 << 20
"""What a clone may take of new space: metadata and the one block written, not the data."""


def _used(path: Path) -> int:
    sv = os.statvfs(path)
    return (sv.f_blocks - sv.f_bfree) * sv.f_frsize


def _big_lower(base: Path) -> Layers:
    dirs = [base / n for n in ("lower", "upper", "work")]
    for d in dirs:
        d.mkdir()
    chunk = os.urandom(1 << 20)
    with open(dirs[0] / "big", "wb") as f:
        for _ in range(GIB >> 20):
            f.write(chunk)
        os.fsync(f.fileno())
    return Layers([dirs[0]], dirs[1], dirs[2])


@pytest.mark.parametrize("kind", ["xfs", "btrfs"])
@pytest.mark.parametrize("overlay", ["kernel", "layerfs"])
def test_copy_up_of_1_gib_is_a_clone(
    kind: str, overlay: str, scratch_filesystems: ScratchFilesystems, tmp_path: Path
) -> None:
    layers = _big_lower(scratch_filesystems.dir(kind))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount = kernel_overlay if overlay == "kernel" else mounted_overlay
    try:
        with mount(layers, mnt):
            os.sync()
            before = _used(layers.upper)
            with open(mnt / "big", "r+b") as f:
                f.write(b"!")  # a write copies the whole file up
            os.sync()
            grew = _used(layers.upper) - before
            with open(mnt / "big", "rb") as f:
                assert f.read(1) == b"!"
                f.seek(GIB - 1)
                assert len(f.read(2)) == 1
        assert os.stat(layers.upper / "big").st_size == GIB
        assert grew < SHARED_SLACK, f"{overlay} on {kind}: copy-up took {grew >> 20} MiB"
    finally:
        for d in (*layers.lowers, layers.upper):
            (d / "big").unlink(missing_ok=True)
