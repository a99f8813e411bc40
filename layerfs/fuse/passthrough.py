"""FUSE passthrough: the kernel reads, writes and maps a file's backing file itself.

An open answered with FOPEN_PASSTHROUGH and a backing id sends no READ or WRITE to the daemon.
The kernel's rules, which this module keeps: a backing file is registered on the connection's
descriptor (FUSE_DEV_IOC_BACKING_OPEN, which needs CAP_SYS_ADMIN) and one inode has one backing
file for all its passthrough opens; an inode is either in passthrough mode or in cached mode
(opens served through the page cache by READ and WRITE), never both at once, or the open fails.
So an inode's backing id lives as long as it has passthrough opens, and an open of an inode with
cached opens stays cached.

Where the kernel refuses (no CAP_SYS_ADMIN, no CONFIG_FUSE_PASSTHROUGH: EPERM; a backing file on
a stacked filesystem: ELOOP) the open is served the ordinary way; EPERM turns passthrough off for
the connection, since every later attempt would fail the same way.
"""

from __future__ import annotations

import errno
import fcntl
from dataclasses import dataclass, field

from layerfs.fuse import protocol as P

_REFUSED_FOR_GOOD = (errno.EPERM, errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP)


@dataclass(slots=True)
class _Inode:
    backing_id: int = 0
    passthrough_opens: int = 0
    cached_opens: int = 0


@dataclass(slots=True)
class BackingFiles:
    """The backing files of one connection and each inode's mode."""

    device_fd: int
    enabled: bool
    _inodes: dict[int, _Inode] = field(default_factory=dict)

    def open(self, ino: int, fd: int, wanted: bool) -> int:
        """Account one open of `ino` (real file `fd`); the backing id to answer it with, or 0
        for a cached open (not `wanted`, refused, or other opens of `ino` are cached)."""
        inode = self._inodes.get(ino)
        if inode is None:
            inode = self._inodes[ino] = _Inode()
        if wanted and self.enabled and not inode.cached_opens:
            if not inode.backing_id:
                inode.backing_id = self._register(fd)
            if inode.backing_id:
                inode.passthrough_opens += 1
                return inode.backing_id
        if inode.passthrough_opens:
            # the kernel refuses a cached open of an inode in passthrough mode: this one
            # passes through as well (it may be a read of a file that only the upper holds)
            inode.passthrough_opens += 1
            return inode.backing_id
        inode.cached_opens += 1
        return 0

    def release(self, ino: int, backing_id: int) -> None:
        """One open of `ino` is closed: the backing file goes with its last passthrough open."""
        inode = self._inodes.get(ino)
        if inode is None:
            return
        if backing_id:
            inode.passthrough_opens -= 1
            if not inode.passthrough_opens:
                self._unregister(inode.backing_id)
                inode.backing_id = 0
        else:
            inode.cached_opens -= 1
        if not inode.passthrough_opens and not inode.cached_opens:
            del self._inodes[ino]

    def _register(self, fd: int) -> int:
        # a mutable buffer: then ioctl returns the call's result (the id), not the buffer
        request = bytearray(P.BACKING_MAP.pack(fd, 0, 0))
        try:
            backing_id: int = fcntl.ioctl(self.device_fd, P.DEV_IOC_BACKING_OPEN, request, True)
        except OSError as exc:
            if exc.errno in _REFUSED_FOR_GOOD:
                self.enabled = False
            return 0  # this file cannot pass through (ELOOP: it is on an overlay, say)
        return backing_id

    def _unregister(self, backing_id: int) -> None:
        fcntl.ioctl(self.device_fd, P.DEV_IOC_BACKING_CLOSE,
                    bytearray(P.BACKING_ID.pack(backing_id)), True)
