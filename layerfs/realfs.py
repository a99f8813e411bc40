"""System calls on the layers' real objects, by path, for paths of any length.

The engine names a real object by the layer dir's path and the merged path below it, so a
merged path the kernel accepts (up to PATH_MAX bytes from the mount point, and deeper through
a working directory or an open directory) can be longer than the kernel takes in one system
call. Below PATH_MAX a path goes to the kernel as it is; beyond it, the parent directory is
reached through a chain of O_PATH descriptors (`openat` on pieces shorter than PATH_MAX) and
the object is named relative to the last one, as `/proc/self/fd/N/NAME`, which every path
system call takes (xattrs and truncate have no `*at` form). Only the kernel's limits apply.

Every function acts on the object the path names: a symlink at the end is never followed
(chown, utime and the xattr calls act on the link itself), except in `open` without
O_NOFOLLOW and `chmod`, which Linux cannot apply to a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import TYPE_CHECKING, Any, TypeVar

from layerfs import syscalls

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

T = TypeVar("T")

PATH_MAX = 4096
"""The kernel's limit on one path argument, the terminating NUL included."""
NAME_MAX = 255

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


@contextlib.contextmanager
def _reachable(path: bytes) -> Iterator[bytes]:
    """`path` as the kernel takes it: a path shorter than PATH_MAX naming the same object."""
    if len(path) < PATH_MAX:
        yield path
        return
    parent, _, name = path.rpartition(b"/")
    fd = _open_dir(parent)
    try:
        yield b"/proc/self/fd/%d/%s" % (fd, name)
    finally:
        os.close(fd)


def _open_dir(path: bytes) -> int:
    """An O_PATH descriptor of directory `path` (absolute, any length)."""
    fd = os.open(b"/", _DIR_FLAGS)
    rest = path.lstrip(b"/")
    while rest:
        if len(rest) < PATH_MAX:
            head, rest = rest, b""
        else:
            cut = rest.rfind(b"/", 0, PATH_MAX - 1)
            if cut <= 0:
                os.close(fd)
                raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
            head, rest = rest[:cut], rest[cut + 1 :]
        try:
            next_fd = os.open(head, _DIR_FLAGS, dir_fd=fd)
        finally:
            os.close(fd)
        fd = next_fd
    return fd


def _call(fn: Callable[..., T], path: bytes, *args: Any, **kwargs: Any) -> T:
    """`fn(path, ...)`, with `path` made reachable first where it is too long."""
    if len(path) < PATH_MAX:
        return fn(path, *args, **kwargs)
    with _reachable(path) as p:
        return fn(p, *args, **kwargs)


def lstat(path: bytes) -> os.stat_result:
    if len(path) < PATH_MAX:  # as `_call`, one call less: a lookup's every name comes here
        return os.lstat(path)
    with _reachable(path) as p:
        return os.lstat(p)


def getxattr(path: bytes, name: str | bytes) -> bytes:
    if len(path) < PATH_MAX:  # lookups ask for the overlay's xattrs of each upper name
        return os.getxattr(path, name, follow_symlinks=False)
    with _reachable(path) as p:
        return os.getxattr(p, name, follow_symlinks=False)


def open(path: bytes, flags: int, mode: int = 0o777) -> int:
    return _call(os.open, path, flags, mode)


def chmod(path: bytes, mode: int) -> None:
    _call(os.chmod, path, mode)


def chown(path: bytes, uid: int, gid: int) -> None:
    _call(os.chown, path, uid, gid, follow_symlinks=False)


def utime(path: bytes, ns: tuple[int, int]) -> None:
    _call(os.utime, path, ns=ns, follow_symlinks=False)


def truncate(path: bytes, size: int) -> None:
    _call(os.truncate, path, size)


def mkdir(path: bytes, mode: int) -> None:
    _call(os.mkdir, path, mode)


def rmdir(path: bytes) -> None:
    _call(os.rmdir, path)


def unlink(path: bytes) -> None:
    _call(os.unlink, path)


def symlink(target: bytes, path: bytes) -> None:
    with _reachable(path) as p:
        os.symlink(target, p)


def mknod(path: bytes, mode: int, device: int = 0) -> None:
    _call(os.mknod, path, mode, device)


def make_whiteout(path: bytes) -> None:
    _call(syscalls.make_whiteout, path)


def readlink(path: bytes) -> bytes:
    with _reachable(path) as p:
        return os.readlink(p)


def listxattr(path: bytes) -> list[str]:
    return _call(os.listxattr, path, follow_symlinks=False)


def setxattr(path: bytes, name: str | bytes, value: bytes, flags: int = 0) -> None:
    _call(os.setxattr, path, name, value, flags, follow_symlinks=False)


def removexattr(path: bytes, name: str | bytes) -> None:
    _call(os.removexattr, path, name, follow_symlinks=False)


def link(src: bytes, dst: bytes) -> None:
    if len(src) < PATH_MAX and len(dst) < PATH_MAX:  # a copy-up's every rename comes here
        os.link(src, dst, follow_symlinks=False)
        return
    with _reachable(src) as s, _reachable(dst) as d:
        os.link(s, d, follow_symlinks=False)


def rename(src: bytes, dst: bytes) -> None:
    if len(src) < PATH_MAX and len(dst) < PATH_MAX:
        os.rename(src, dst)
        return
    with _reachable(src) as s, _reachable(dst) as d:
        os.rename(s, d)


def renameat2(src: bytes, dst: bytes, flags: int = 0) -> None:
    if len(src) < PATH_MAX and len(dst) < PATH_MAX:
        syscalls.renameat2(src, dst, flags)
        return
    with _reachable(src) as s, _reachable(dst) as d:
        syscalls.renameat2(s, d, flags)


def rename_leaving_whiteout(src: bytes, dst: bytes) -> None:
    if len(src) < PATH_MAX and len(dst) < PATH_MAX:
        syscalls.rename_leaving_whiteout(src, dst)
        return
    with _reachable(src) as s, _reachable(dst) as d:
        syscalls.rename_leaving_whiteout(s, d)


@contextlib.contextmanager
def scandir(path: bytes) -> Iterator[Iterator[os.DirEntry[bytes]]]:
    """`os.scandir`, whose entries' lazy `stat` works inside the `with` only; use their
    `name`, not their `path`."""
    if len(path) + 1 + NAME_MAX < PATH_MAX:
        with os.scandir(path) as it:
            yield it
        return
    # An entry's stat names the directory's path and the entry's in one call: list the
    # directory by a short name of its own (a descriptor's), so that its entries' are short.
    # (A listing by descriptor would stat at any depth, but has str names.)
    fd = _call(os.open, path, _DIR_FLAGS)
    try:
        with os.scandir(b"/proc/self/fd/%d" % fd) as it:
            yield it
    finally:
        os.close(fd)
