"""Linux syscalls that the os module lacks: renameat2, fallocate with a mode, FICLONE, a
sparse-aware data copy, and unshare and mount for the namespaces of `run` and rootless use.

Only this module talks to libc through ctypes. Every function raises OSError with the errno
the kernel returned.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

_AT_FDCWD = -100
_FICLONE = 0x40049409  # _IOW(0x94, 9, int)
_COPY_CHUNK = 1 << 30
_NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS)
"""FICLONE's answers for filesystems that cannot share these extents."""

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def renameat2(old: bytes, new: bytes, flags: int = 0) -> None:
    if _renameat2(_AT_FDCWD, old, _AT_FDCWD, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old, None, new)


def rename_leaving_whiteout(old: bytes, new: bytes) -> None:
    """Move `old` to `new` and leave a whiteout in its place, in one step where the
    filesystem has RENAME_WHITEOUT (ext4, xfs, btrfs, tmpfs), else in two."""
    try:
        renameat2(old, new, RENAME_WHITEOUT)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        renameat2(old, new)
        make_whiteout(old)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode (os.posix_fallocate has none): punch, zero, keep size."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def make_whiteout(path: bytes) -> None:
    """The kernel overlayfs whiteout: a character device 0/0."""
    os.mknod(path, 0o020000, os.makedev(0, 0))


def unshare(flags: int) -> None:
    """unshare(2) (os.unshare is Python 3.12's)."""
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def mount(source: str, target: str, flags: int) -> None:
    """mount(2) without a filesystem type or data: binds, remounts, propagation changes."""
    if _libc.mount(source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def process_umask() -> int:
    """This process's umask, read from /proc rather than with umask(2) twice, which would
    leave it at 0 for a moment for every other thread."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    return 0o7777  # not said: take every bit as masked, so that a mode is always set


def copy_data(src_fd: int, dst_fd: int, size: int, *, clone: bool = True,
              dense: bool = False) -> bool:
    """Copy `size` bytes of file data, sharing extents where the filesystem can; False where
    it could not clone them (so that the caller need not try again on the same filesystems).

    FICLONE first, unless `clone` is False (btrfs, xfs: instant, no data moves); else
    copy_file_range: over the whole size for a `dense` source (no holes: its blocks cover its
    size), else over the data segments only, found with SEEK_DATA/SEEK_HOLE, so that a sparse
    file stays sparse, with the target's size set by ftruncate so that a trailing hole survives.
    """
    if size == 0:
        return True
    if clone:
        try:
            fcntl.ioctl(dst_fd, _FICLONE, src_fd)
            return True
        except OSError as exc:
            if exc.errno not in (*_NO_CLONE, errno.EBADF, errno.EPERM):
                raise
            clone = exc.errno not in _NO_CLONE  # EBADF, EPERM: this file, not the filesystem
    if dense:
        _copy_range(src_fd, dst_fd, 0, size)
        return clone
    os.ftruncate(dst_fd, size)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return clone
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            # no hole map on this filesystem: all of the rest is data
            _copy_range(src_fd, dst_fd, pos, size)
            return clone
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        _copy_range(src_fd, dst_fd, start, end)
        pos = end
    return clone


def _copy_range(src_fd: int, dst_fd: int, start: int, end: int) -> None:
    off = start
    while off < end:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(end - off, _COPY_CHUNK), off, off)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            n = _copy_by_read(src_fd, dst_fd, off, end)
        if n == 0:  # the source shrank under us; the size was set already
            return
        off += n


def _copy_by_read(src_fd: int, dst_fd: int, off: int, end: int) -> int:
    buf = os.pread(src_fd, min(end - off, 1 << 20), off)
    if buf:
        os.pwrite(dst_fd, buf, off)
    return len(buf)
