"""FUSE passthrough: the kernel reads, writes and maps a file's backing file itself.

An open answered with FOPEN_PASSTHROUGH and a backing id sends no READ or WRITE to the daemon.
The kernel's rules, which this module keeps: a backing file is registered on the connection's
descriptor (FUSE_DEV_IOC_BACKING_OPEN, which needs CAP_SYS_ADMIN) and one inode has one backing
file for all its passthrough opens; an inode is either in passthrough mode or in cached mode
(opens served through the page cache by READ and WRITE), never both at once, or the open fails.
So an inode's backing id lives as long as it has passthrough opens, and an open of an inode with
cached opens stays cached.

A backing file holds one generation of a node's data. With `passthrough=all` a lower file of a
read-write mount passes through too, and a copy-up while it is open leaves its readers on the
lower file; every later open of the inode, until those close, must still name that backing file,
so it is answered with FOPEN_DIRECT_IO as well: its reads and writes come to the daemon, which
serves them from the copy. An `mmap` of such an open maps the backing file all the same (the
kernel opens it with the opener's flags), so an open for writing must never get one: while a
lower file backs an inode, opening it for writing is refused (ETXTBSY), before any copy-up.

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
    data_gen: int = 0
    """The generation of the node's data that the backing file holds."""
    lower: bool = False
    """Whether the backing file is a lower layer's, which nothing may write."""
    passthrough_opens: int = 0
    cached_opens: int = 0


@dataclass(slots=True)
class BackingFiles:
    """The backing files of one connection and each inode's mode."""

    device_fd: int
    enabled: bool
    _inodes: dict[int, _Inode] = field(default_factory=dict)

    def backs_lower(self, ino: int) -> bool:
        """Whether a lower file is the backing file of `ino` now (see the module's text)."""
        inode = self._inodes.get(ino)
        return inode is not None and inode.lower and bool(inode.backing_id)

    def open(self, ino: int, fd: int, data_gen: int, wanted: bool,
             lower: bool) -> tuple[int, bool]:
        """Account one open of `ino` (real file `fd`, of a lower layer if `lower`, holding
        generation `data_gen` of the node's data): the backing id to answer it with, or 0 for
        a cached open (not `wanted`, refused, or other opens of `ino` are cached); and whether
        the backing file holds an older generation, so that the daemon must serve this open's
        reads and writes."""
        inode = self._inodes.get(ino)
        if inode is None:
            inode = self._inodes[ino] = _Inode()
        if wanted and self.enabled and not inode.cached_opens:
            if not inode.backing_id:
                inode.backing_id = self._register(fd)
                inode.data_gen, inode.lower = data_gen, lower
            if inode.backing_id:
                inode.passthrough_opens += 1
                return inode.backing_id, inode.data_gen != data_gen
        if inode.passthrough_opens:
            # the kernel refuses a cached open of an inode in passthrough mode: this one
            # passes through as well (it may be a read of a file that only the upper holds)
            inode.passthrough_opens += 1
            return inode.backing_id, inode.data_gen != data_gen
        inode.cached_opens += 1
        return 0, False

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
