"""Linux syscalls that the os module lacks: renameat2, fallocate with a mode, FICLONE, a
sparse-aware data copy, inotify, and unshare and mount for the namespaces of `run` and
rootless use.

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
NO_CLONE = (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS)
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
_inotify_add_watch = _libc.inotify_add_watch
_inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_inotify_add_watch.restype = ctypes.c_int
_fallocate = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def renameat2(old: bytes, new: bytes, flags: int = 0) -> None:
    if _renameat2(_AT_FDCWD, old, _AT_FDCWD, new, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old, None, new)


IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000


def inotify_init() -> int:
    """A non-blocking, close-on-exec inotify descriptor."""
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


def inotify_add_watch(fd: int, path: bytes, mask: int) -> int:
    wd = _inotify_add_watch(fd, path, mask)
    if wd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(wd)


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


def clone_data(src_fd: int, dst_fd: int) -> int:
    """Make empty `dst_fd` share all of `src_fd`'s extents (FICLONE: btrfs, xfs; no data
    moves). 0 when done, else the errno it was refused with: one of NO_CLONE where these
    filesystems cannot clone, EBADF or EPERM where only this file cannot."""
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
    except OSError as exc:
        if exc.errno not in (*NO_CLONE, errno.EBADF, errno.EPERM):
            raise
        return exc.errno
    return 0


def copy_data(src_fd: int, dst_fd: int, size: int, *, dense: bool = False) -> None:
    """Copy `size` bytes of file data with copy_file_range: over the whole size for a `dense`
    source (no holes: its blocks cover its size), else over the data segments only, found
    with SEEK_DATA/SEEK_HOLE, so that a sparse file stays sparse, with the target's size set
    by ftruncate so that a trailing hole survives.
    """
    if size == 0:
        return
    if dense:
        _copy_range(src_fd, dst_fd, 0, size)
        return
    os.ftruncate(dst_fd, size)
    pos = 0
    while pos < size:
        try:
            start = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                return
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            # no hole map on this filesystem: all of the rest is data
            _copy_range(src_fd, dst_fd, pos, size)
            return
        end = min(os.lseek(src_fd, start, os.SEEK_HOLE), size)
        _copy_range(src_fd, dst_fd, start, end)
        pos = end


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
