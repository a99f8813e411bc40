"""What our own FUSE session adds below the engine: readdir offsets that survive changes,
reads that need the disk served off the loop, SEEK_DATA/SEEK_HOLE, setuid dropped for
unprivileged writers, and the readahead of the mount. The kernel's overlayfs is the reference
where semantics are compared."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.fsapi import Layers, MountFS, kernel_overlay, mounted_overlay

if TYPE_CHECKING:
    import contextlib
    from collections.abc import Iterator


def make_layers(root: Path) -> Layers:
    lower, upper, work = (root / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    return Layers([lower], upper, work)


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    return make_layers(tmp_path / "layers")


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def test_listing_read_in_parts_survives_deletions_between_parts(
    layers: Layers, mnt: Path
) -> None:
    # 3,000 names need many READDIRPLUS requests; deleting names between two reads of one
    # open directory must neither skip nor repeat a name that stayed.
    big = layers.lowers[0] / "big"
    big.mkdir()
    names = [f"entry-{i:05d}-{'x' * 40}" for i in range(3000)]
    for name in names:
        (big / name).write_bytes(b"")
    with mounted_overlay(layers, mnt):
        seen: list[str] = []
        with os.scandir(mnt / "big") as it:
            for entry in it:
                seen.append(entry.name)
                if len(seen) == 500:
                    for gone in names[:400] + names[2000:2100]:
                        os.unlink(mnt / "big" / gone)
                    (mnt / "big" / "added-late").write_bytes(b"")
        stayed = set(names) - set(names[:400]) - set(names[2000:2100])
        assert len(seen) == len(set(seen)), "a name came twice"
        assert stayed <= set(seen), f"{len(stayed - set(seen))} names were skipped"
        assert sorted(os.listdir(mnt / "big")) == sorted(stayed | {"added-late"})


def test_reads_that_need_the_disk_are_right_and_do_not_stall_the_mount(
    layers: Layers, mnt: Path
) -> None:
    data = os.urandom(48 << 20)
    (layers.lowers[0] / "cold.bin").write_bytes(data)
    (layers.lowers[0] / "small").write_bytes(b"small")
    with mounted_overlay(layers, mnt):
        # Out of the page cache: the real file's pages and the mount's.
        for path in (layers.lowers[0] / "cold.bin", mnt / "cold.bin"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        digests: list[str] = []
        reader = threading.Thread(
            target=lambda: digests.append(hashlib.sha256((mnt / "cold.bin").read_bytes())
                                          .hexdigest()))
        reader.start()
        for _ in range(50):
            assert (mnt / "small").read_bytes() == b"small"
        reader.join(timeout=60)
        assert digests == [hashlib.sha256(data).hexdigest()]
        # a read across the end of the file is short only at the real end
        with open(mnt / "cold.bin", "rb") as f:
            f.seek(len(data) - 100)
            assert f.read(4096) == data[-100:]


def test_seek_data_and_hole_see_the_holes_of_a_lower_file(layers: Layers, mnt: Path) -> None:
    path = layers.lowers[0] / "sparse"
    with open(path, "wb") as f:
        f.seek(64 << 20)
        f.write(b"data")
    with mounted_overlay(layers, mnt):
        fd = os.open(mnt / "sparse", os.O_RDONLY)
        try:
            first_data = os.lseek(fd, 0, os.SEEK_DATA)
            assert (64 << 20) - (1 << 20) <= first_data <= 64 << 20
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        finally:
            os.close(fd)
        # `cp` keeps the holes through the mount
        subprocess.run(["cp", "--sparse=auto", str(mnt / "sparse"), str(mnt / "copy")],
                       check=True)
        st = os.stat(layers.upper / "copy")
        assert st.st_size == (64 << 20) + 4
        assert st.st_blocks * 512 < 1 << 20


def _write_as_nobody(path: Path) -> None:
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    "sh", "-c", f"printf x >> '{path}'"], check=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory that others may traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="layerfs-test-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _setuid_tool_layers(root: Path, mode: int) -> tuple[Layers, Path]:
    """Layers whose lower holds `tool` with `mode` (setuid bits included), and an empty mnt."""
    layers = make_layers(root / "layers")
    os.chmod(root / "layers", 0o755)
    tool = layers.lowers[0] / "tool"
    tool.write_bytes(b"#!/bin/sh\n")
    os.chmod(tool, mode)
    mnt = root / "mnt"
    mnt.mkdir()
    return layers, mnt


def _mount(system: str, layers: Layers, mnt: Path) -> contextlib.AbstractContextManager[MountFS]:
    return mounted_overlay(layers, mnt) if system == "layerfs" else kernel_overlay(layers, mnt)


@pytest.mark.parametrize("system", ["layerfs", "kernel"])
def test_an_unprivileged_write_drops_setuid_as_the_kernel_does(
    open_dir: Path, system: str
) -> None:
    layers, mnt = _setuid_tool_layers(open_dir, 0o6777)
    with _mount(system, layers, mnt):
        _write_as_nobody(mnt / "tool")
        mode = os.stat(mnt / "tool").st_mode
    assert not mode & stat.S_ISUID
    assert not mode & stat.S_ISGID  # group-executable: setgid goes too
    assert stat.S_IMODE(mode) == 0o777
    assert (layers.upper / "tool").read_bytes() == b"#!/bin/sh\nx"


def test_the_mount_reads_ahead_one_request(layers: Layers, mnt: Path) -> None:
    with mounted_overlay(layers, mnt):
        device = os.stat(mnt).st_dev
        kib = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        assert kib.read_text().strip() == "1024"


@pytest.mark.parametrize("system", ["layerfs", "kernel"])
@pytest.mark.parametrize("owner", [(-1, -1), (0, -1)])
def test_chown_drops_setuid_as_the_kernel_does(
    tmp_path: Path, system: str, owner: tuple[int, int]
) -> None:
    # With handle_killpriv_v2 this is the filesystem's job; chown(f, -1, -1) reaches it as a
    # SETATTR of nothing (the long differential run found it).
    layers, mnt = _setuid_tool_layers(tmp_path, 0o6755)
    with _mount(system, layers, mnt):
        os.chown(mnt / "tool", *owner)
        mode = os.stat(mnt / "tool").st_mode
    assert stat.S_IMODE(mode) == 0o755
