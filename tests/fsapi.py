"""One path-based filesystem API over two backends, so each scenario runs twice:
directly against the engine (no mount) and through a real FUSE mount (system calls).

Both raise OSError with the errno the operation got; paths are relative to the merged root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layerfs import syscalls
from tests.imagetools import mount_field

if TYPE_CHECKING:
    from collections.abc import Iterator

    from layerfs.overlay.engine import Engine
    from layerfs.overlay.nodes import Node

VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"
OVERLAY_CMD = str(VENV_BIN / "layerfs-overlay")


@dataclass
class Layers:
    """Real dirs of one overlay: lowers top first, upper, work."""

    lowers: list[Path]
    upper: Path
    work: Path

    def option(self) -> str:
        lower = ":".join(str(p) for p in self.lowers)
        return f"lowerdir={lower},upperdir={self.upper},workdir={self.work}"


class MountFS:
    """System calls on a mounted tree."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def p(self, path: str) -> str:
        return str(self.root / path) if path else str(self.root)

    def read(self, path: str) -> bytes:
        with open(self.p(path), "rb") as f:
            return f.read()

    def write(self, path: str, data: bytes, offset: int = 0, *, create: bool = True) -> None:
        flags = os.O_WRONLY | (os.O_CREAT if create else 0)
        fd = os.open(self.p(path), flags, 0o644)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def stat(self, path: str) -> os.stat_result:
        return os.lstat(self.p(path))

    def listdir(self, path: str = "") -> list[str]:
        return sorted(os.listdir(self.p(path)))

    def dir_inos(self, path: str = "") -> dict[str, int]:
        with os.scandir(self.p(path)) as it:
            return {e.name: e.inode() for e in it}

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        os.mkdir(self.p(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self.p(path))

    def unlink(self, path: str) -> None:
        os.unlink(self.p(path))

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        syscalls.renameat2(os.fsencode(self.p(old)), os.fsencode(self.p(new)), flags)

    def link(self, old: str, new: str) -> None:
        os.link(self.p(old), self.p(new))

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self.p(path))

    def readlink(self, path: str) -> str:
        return os.readlink(self.p(path))

    def mknod(self, path: str, mode: int, rdev: int = 0) -> None:
        os.mknod(self.p(path), mode, rdev)

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self.p(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self.p(path), uid, gid, follow_symlinks=False)

    def truncate(self, path: str, size: int) -> None:
        os.truncate(self.p(path), size)

    def utime(self, path: str, ns: tuple[int, int]) -> None:
        os.utime(self.p(path), ns=ns, follow_symlinks=False)

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        os.setxattr(self.p(path), name, value, follow_symlinks=False)

    def getxattr(self, path: str, name: str) -> bytes:
        return os.getxattr(self.p(path), name, follow_symlinks=False)

    def listxattr(self, path: str) -> list[str]:
        return sorted(os.listxattr(self.p(path), follow_symlinks=False))

    def removexattr(self, path: str, name: str) -> None:
        os.removexattr(self.p(path), name, follow_symlinks=False)

    def open_read(self, path: str) -> int:
        return os.open(self.p(path), os.O_RDONLY)

    def pread(self, fd: int, size: int, off: int) -> bytes:
        return os.pread(fd, size, off)

    def close(self, fd: int) -> None:
        os.close(fd)


class EngineFS:
    """The same calls made on an Engine, resolving paths with lookups."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._fds: dict[int, object] = {}

    def node(self, path: str) -> Node:
        node = self.engine.nodes.root
        for part in filter(None, path.split("/")):
            if not node.is_dir:
                raise OSError(errno.ENOTDIR, "not a directory", path)
            node = self.engine.lookup(node, part.encode())
        return node

    def parent(self, path: str) -> tuple[Node, bytes]:
        head, _, name = path.rpartition("/")
        return self.node(head), name.encode()

    def read(self, path: str) -> bytes:
        h = self.engine.open(self.node(path), os.O_RDONLY)
        try:
            return self.engine.read(h, 0, 1 << 30)
        finally:
            self.engine.release(h)

    def write(self, path: str, data: bytes, offset: int = 0, *, create: bool = True) -> None:
        try:
            node = self.node(path)
            h = self.engine.open(node, os.O_WRONLY)
        except FileNotFoundError:
            if not create:
                raise
            parent, name = self.parent(path)
            _node, h, _attr = self.engine.create(parent, name, 0o644, os.O_WRONLY, 0, 0)
        try:
            self.engine.write(h, offset, data)
        finally:
            self.engine.release(h)

    def stat(self, path: str) -> os.stat_result:
        attr = self.engine.getattr(self.node(path))
        return _MergedStat(attr.st, attr.ino, attr.nlink, attr.blocks)  # type: ignore[return-value]

    def listdir(self, path: str = "") -> list[str]:
        return sorted(n.decode() for n in self.engine.listdir(self.node(path)))

    def dir_inos(self, path: str = "") -> dict[str, int]:
        node = self.node(path)
        out = {}
        for name in self.engine.listdir(node):
            child = self.engine.child(node, name)
            assert child is not None
            out[name.decode()] = child.ino
        return out

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        parent, name = self.parent(path)
        self.engine.mkdir(parent, name, mode, 0, 0)

    def rmdir(self, path: str) -> None:
        self.engine.rmdir(*self.parent(path))

    def unlink(self, path: str) -> None:
        self.engine.unlink(*self.parent(path))

    def rename(self, old: str, new: str, flags: int = 0) -> None:
        op, on = self.parent(old)
        np, nn = self.parent(new)
        self.engine.rename(op, on, np, nn, flags)

    def link(self, old: str, new: str) -> None:
        self.engine.link(self.node(old), *self.parent(new))

    def symlink(self, target: str, path: str) -> None:
        parent, name = self.parent(path)
        self.engine.symlink(parent, name, target.encode(), 0, 0)

    def readlink(self, path: str) -> str:
        return self.engine.readlink(self.node(path)).decode()

    def mknod(self, path: str, mode: int, rdev: int = 0) -> None:
        parent, name = self.parent(path)
        self.engine.mknod(parent, name, mode, rdev, 0, 0)

    def chmod(self, path: str, mode: int) -> None:
        self.engine.setattr(self.node(path), mode=mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.engine.setattr(self.node(path), uid=uid, gid=gid)

    def truncate(self, path: str, size: int) -> None:
        self.engine.setattr(self.node(path), size=size)

    def utime(self, path: str, ns: tuple[int, int]) -> None:
        self.engine.setattr(self.node(path), atime_ns=ns[0], mtime_ns=ns[1])

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        self.engine.setxattr(self.node(path), name.encode(), value)

    def getxattr(self, path: str, name: str) -> bytes:
        return self.engine.getxattr(self.node(path), name.encode())

    def listxattr(self, path: str) -> list[str]:
        return sorted(n.decode() for n in self.engine.listxattr(self.node(path)))

    def removexattr(self, path: str, name: str) -> None:
        self.engine.removexattr(self.node(path), name.encode())

    def open_read(self, path: str) -> int:
        h = self.engine.open(self.node(path), os.O_RDONLY)
        self._fds[h.fd] = h
        return h.fd

    def pread(self, fd: int, size: int, off: int) -> bytes:
        return self.engine.read(self._fds[fd], off, size)  # type: ignore[arg-type]

    def close(self, fd: int) -> None:
        self.engine.release(self._fds.pop(fd))  # type: ignore[arg-type]


class _MergedStat:
    """A real stat result seen through the merge: another inode number and link count."""

    def __init__(self, st: os.stat_result, ino: int, nlink: int, blocks: int) -> None:
        self._st, self.st_ino, self.st_nlink, self.st_blocks = st, ino, nlink, blocks

    def __getattr__(self, name: str) -> object:
        return getattr(self._st, name)


def daemon_pid(mnt: Path) -> int:
    """The pid of the daemon serving `mnt`: the layerfs-overlay process named with it."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # separate arguments, or one string of them when the fork server ran the command
        # (see layerfs.cli.forkserver._show_command_line)
        words = [word for part in cmdline for word in part.split(b" ")]
        if any(b"layerfs-overlay" in word for word in words) and str(mnt).encode() in words:
            return int(pid)
    raise AssertionError(f"no daemon found for {mnt}")


def daemon_rchar(pid: int) -> int:
    """What process `pid` has read with read(2) and its kin (`rchar` of /proc/PID/io): the file
    data that went through its memory, which passthrough and splice do not count."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/io: no rchar")


def drop_caches() -> None:
    """Write back, then drop the page, dentry and inode caches: the next access is cold."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts", errors="surrogateescape") as f:
        return any(mount_field(line.split()[1]) == target for line in f)


def unmount(path: Path) -> None:
    """Unmount, retrying a busy mount briefly; a mount that stays busy fails the test."""
    deadline = time.monotonic() + 10
    while is_mounted(path):
        result = subprocess.run(["umount", str(path)], capture_output=True, text=True)
        if result.returncode == 0:
            return
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
            raise AssertionError(f"{path}: could not unmount: {result.stderr.strip()}")
        time.sleep(0.05)


@contextlib.contextmanager
def mounted_overlay(
    layers: Layers, mnt: Path, *extra: str, log: Path | None = None
) -> Iterator[MountFS]:
    """A layerfs-overlay mount of `layers` at `mnt`, unmounted on the way out."""
    option = layers.option()
    if log is not None:
        option += f",log={log}"
    subprocess.run(
        [OVERLAY_CMD, "-o", option, *extra, str(mnt)],
        check=True,
        env={**os.environ, "LAYERFS_STRICT": "1"},
    )
    try:
        yield MountFS(mnt)
    finally:
        unmount(mnt)


@contextlib.contextmanager
def kernel_overlay(layers: Layers, mnt: Path) -> Iterator[MountFS]:
    lower = ":".join(str(p) for p in layers.lowers)
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={lower},upperdir={layers.upper},workdir={layers.work},redirect_dir=on",
            str(mnt),
        ],
        check=True,
    )
    try:
        yield MountFS(mnt)
    finally:
        unmount(mnt)
