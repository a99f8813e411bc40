"""Paths as long as the kernel takes them: PATH_MAX-1 bytes from /, and names of NAME_MAX.

The same operations run on the kernel's overlayfs and on layerfs-overlay, each over its own copy
of one lower layer, mounted at paths of equal length, so that one merged path is exactly
PATH_MAX-1 bytes long on both. The layer dirs' own paths are longer than the mount point's, so
every real path the daemon works on is beyond PATH_MAX: what the kernel accepts through the
mount must work below it too.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from tests.fsapi import Layers, kernel_overlay, mounted_overlay

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

PATH_MAX = 4096
NAME_MAX = 255
DIR_NAME = b"d" * 250


def _chain(mnt: Path) -> tuple[bytes, bytes]:
    """The relative deep dir under `mnt` and a leaf name in it, such that mnt/dir/leaf is
    PATH_MAX-1 bytes long."""
    base = len(os.fsencode(mnt))
    parts: list[bytes] = []
    while base + sum(len(p) + 1 for p in parts) + 1 + NAME_MAX < PATH_MAX - 1:
        parts.append(DIR_NAME)
    used = base + sum(len(p) + 1 for p in parts) + 1
    leaf = b"f" * (PATH_MAX - 1 - used)
    assert 1 <= len(leaf) <= NAME_MAX
    return b"/".join(parts), leaf


def _make_deep_lower(lower: Path, deep_dir: bytes) -> None:
    """The deep dir chain and a file at its end, made through dir fds (the lower's own path
    is too long to name in one call)."""
    fd = os.open(lower, os.O_RDONLY | os.O_DIRECTORY)
    for part in deep_dir.split(b"/"):
        os.mkdir(part, 0o755, dir_fd=fd)
        next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = next_fd
    file_fd = os.open(b"lowerfile", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(file_fd, b"from the lower layer\n")
    os.close(file_fd)
    os.setxattr(f"/proc/self/fd/{fd}/lowerfile", "user.deep", b"yes")
    os.close(fd)


def _layers(side: Path, deep_dir: bytes) -> Layers:
    # the layer dirs' names are longer than the mount point's: their real paths overflow
    dirs = [side / name for name in ("lower-layer-dir", "upper-layer-dir", "work-layer-dir")]
    for d in dirs:
        d.mkdir(parents=True)
    _make_deep_lower(dirs[0], deep_dir)
    return Layers([dirs[0]], dirs[1], dirs[2])


Operation = tuple[str, "Callable[[], object]"]


def _operations(root: bytes, deep_dir: bytes, leaf: bytes) -> list[Operation]:
    deep = root + b"/" + deep_dir
    p = deep + b"/" + leaf
    q = deep + b"/" + leaf[:-1] + b"g"
    lower_file = deep + b"/lowerfile"
    long_name = root + b"/" + b"n" * NAME_MAX
    too_long_name = root + b"/" + b"n" * (NAME_MAX + 1)

    def create_and_write() -> object:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            return os.write(fd, b"deep data")
        finally:
            os.close(fd)

    def read(path: bytes) -> Callable[[], object]:
        def run() -> object:
            with open(path, "rb") as f:
                return f.read()
        return run

    def append_lower() -> object:
        with open(lower_file, "ab") as f:
            return f.write(b"and more\n")

    def shape(path: bytes) -> Callable[[], object]:
        def run() -> object:
            st = os.lstat(path)
            return (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink)
        return run

    return [
        ("length", lambda: len(p)),
        ("stat deep dir", lambda: stat.S_ISDIR(os.stat(deep).st_mode)),
        ("listdir deep dir", lambda: sorted(os.listdir(deep))),
        ("read lower file", read(lower_file)),
        ("getxattr lower file", lambda: os.getxattr(lower_file, "user.deep")),
        ("copy-up lower file", append_lower),
        ("read copied-up file", read(lower_file)),
        ("mkdir", lambda: os.mkdir(p, 0o750)),
        ("stat dir", shape(p)),
        ("rmdir", lambda: os.rmdir(p)),
        ("create and write", create_and_write),
        ("read", read(p)),
        ("chmod", lambda: os.chmod(p, 0o600)),
        ("chown", lambda: os.chown(p, 1000, 1001)),
        ("truncate", lambda: os.truncate(p, 4)),
        ("setxattr", lambda: os.setxattr(p, "user.k", b"v")),
        ("listxattr", lambda: sorted(os.listxattr(p))),
        ("stat file", shape(p)),
        ("link", lambda: os.link(p, q)),
        ("stat link", shape(q)),
        ("unlink link", lambda: os.unlink(q)),
        ("symlink", lambda: os.symlink(b"target", q)),
        ("readlink", lambda: os.readlink(q)),
        ("unlink symlink", lambda: os.unlink(q)),
        ("mkfifo", lambda: os.mkfifo(q, 0o644)),
        ("stat fifo", shape(q)),
        ("unlink fifo", lambda: os.unlink(q)),
        ("mknod", lambda: os.mknod(q, stat.S_IFCHR | 0o600, os.makedev(1, 3))),
        ("stat device", shape(q)),
        ("unlink device", lambda: os.unlink(q)),
        ("rename", lambda: os.rename(p, q)),
        ("rename back", lambda: os.rename(q, p)),
        ("unlink", lambda: os.unlink(p)),
        ("unlink lower file", lambda: os.unlink(lower_file)),
        ("listdir at the end", lambda: sorted(os.listdir(deep))),
        ("one byte beyond PATH_MAX", lambda: os.stat(p + b"x")),
        ("create NAME_MAX", lambda: os.close(os.open(long_name, os.O_CREAT | os.O_WRONLY))),
        ("rename to NAME_MAX+1", lambda: os.rename(long_name, too_long_name)),
        ("create NAME_MAX+1", lambda: os.open(too_long_name, os.O_CREAT | os.O_WRONLY)),
        ("mkdir NAME_MAX+1", lambda: os.mkdir(too_long_name)),
        ("unlink NAME_MAX", lambda: os.unlink(long_name)),
    ]


def _outcomes(root: Path, deep_dir: bytes, leaf: bytes) -> list[tuple[str, object]]:
    results: list[tuple[str, object]] = []
    for what, run in _operations(os.fsencode(root), deep_dir, leaf):
        try:
            results.append((what, run()))
        except OSError as exc:
            results.append((what, errno.errorcode.get(exc.errno or 0, exc.errno)))
    return results


def test_paths_up_to_path_max_and_names_up_to_name_max_work_as_in_the_kernel(
    tmp_path: Path,
) -> None:
    kernel_mnt, fuse_mnt = tmp_path / "k" / "mnt", tmp_path / "f" / "mnt"
    deep_dir, leaf = _chain(kernel_mnt)
    assert _chain(fuse_mnt) == (deep_dir, leaf)  # mount points of one length
    kernel_layers = _layers(tmp_path / "k", deep_dir)
    fuse_layers = _layers(tmp_path / "f", deep_dir)
    for mnt in (kernel_mnt, fuse_mnt):
        mnt.mkdir()
    with kernel_overlay(kernel_layers, kernel_mnt):
        expected = _outcomes(kernel_mnt, deep_dir, leaf)
    with mounted_overlay(fuse_layers, fuse_mnt, log=tmp_path / "daemon.log"):
        actual = _outcomes(fuse_mnt, deep_dir, leaf)
    differences = [f"{k[0]}: kernel {k[1]!r}, layerfs {f[1]!r}"
                   for k, f in zip(expected, actual, strict=True) if k != f]
    assert not differences, "\n".join(differences)
    # the oracle took every operation within the limits and refused those beyond them
    refused = {what for what, result in expected if result == "ENAMETOOLONG"}
    assert refused == {"one byte beyond PATH_MAX", "rename to NAME_MAX+1", "create NAME_MAX+1",
                       "mkdir NAME_MAX+1"}
    assert not [r for r in expected if isinstance(r[1], str) and r[0] not in refused]
    assert dict(expected)["length"] == PATH_MAX - 1


def _beyond_path_max(root: Path, deep_dir: bytes) -> list[object]:
    """Three levels more below the deep dir, through directory descriptors: merged paths
    longer than PATH_MAX, which only a working directory or an open directory can reach."""
    results: list[object] = []
    fd = os.open(os.fsencode(root) + b"/" + deep_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(3):
            os.mkdir(DIR_NAME, 0o700, dir_fd=fd)
            next_fd = os.open(DIR_NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        file_fd = os.open(b"file", os.O_WRONLY | os.O_CREAT, 0o640, dir_fd=fd)
        results.append(os.write(file_fd, b"beyond"))
        os.close(file_fd)
        os.symlink(b"file", b"link", dir_fd=fd)
        os.rename(b"file", b"renamed", src_dir_fd=fd, dst_dir_fd=fd)
        st = os.stat(b"renamed", dir_fd=fd)
        results.append((stat.filemode(st.st_mode), st.st_size))
        results.append(sorted(os.listdir(fd)))
        os.unlink(b"link", dir_fd=fd)
        os.unlink(b"renamed", dir_fd=fd)
        results.append(sorted(os.listdir(fd)))
    finally:
        os.close(fd)
    return results


def test_merged_paths_beyond_path_max_work_as_in_the_kernel(tmp_path: Path) -> None:
    kernel_mnt, fuse_mnt = tmp_path / "k" / "mnt", tmp_path / "f" / "mnt"
    deep_dir, _ = _chain(kernel_mnt)
    kernel_layers = _layers(tmp_path / "k", deep_dir)
    fuse_layers = _layers(tmp_path / "f", deep_dir)
    for mnt in (kernel_mnt, fuse_mnt):
        mnt.mkdir()
    with kernel_overlay(kernel_layers, kernel_mnt):
        expected = _beyond_path_max(kernel_mnt, deep_dir)
    with mounted_overlay(fuse_layers, fuse_mnt):
        actual = _beyond_path_max(fuse_mnt, deep_dir)
    assert actual == expected
    assert expected[-1] == []
