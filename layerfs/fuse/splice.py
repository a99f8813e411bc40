"""READ replies spliced from the file: its data goes from the page cache into the kernel's FUSE
request without passing through the daemon's memory.

A reply written with writev costs two copies of its data: page cache to our buffer (preadv), our
buffer to the request's pages. splice(2) moves references to the page-cache pages into a pipe,
and the FUSE device copies them once, from the pipe into the request (as libfuse does for
fuse-overlayfs). It costs two syscalls more (the size, the header into the pipe), which even a
single page's copy outweighs: a cold `tar` of 60k files took the daemon 12.0-13.1 s of CPU
reading and writing, 11.4 s splicing reads of 8 KiB and more, 10.9-11.1 s splicing them all.

The header goes into the pipe first and carries the reply's length, so the length must be known
before the data is read: it is what the file's size leaves of the request. Should splice still
yield less (the file shrank meanwhile, which nobody may do to a lower), the pipe is emptied and
the caller reads the ordinary way, which knows a short read from the end of the file. The
pipe is non-blocking: a reply that does not fit fails with EAGAIN instead of waiting for a
reader that is ourselves.
"""

from __future__ import annotations

import errno
import fcntl
import os

from layerfs.fuse import protocol as P

SPLICE_MIN = 4096
"""Smallest read spliced: the page cache reads whole pages; smaller reads are O_DIRECT ones."""
_PIPE_SIZES = (2 << 20, 1 << 20)
"""What we ask for: room for the largest read and its header (256 pages and one), beyond
pipe-max-size's default, which root may pass; else that default, which anyone may have (the
largest reads are then read the ordinary way)."""


class SplicedReplies:
    """A pipe, on the loop thread only, through which READ replies go from a file to the device."""

    def __init__(self, device_fd: int) -> None:
        self._device = device_fd
        self._r, self._w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        for wanted in _PIPE_SIZES:
            try:
                fcntl.fcntl(self._w, fcntl.F_SETPIPE_SZ, wanted)
                break
            except OSError:  # EPERM: over pipe-max-size or the user's quota
                continue
        self._slots = fcntl.fcntl(self._w, fcntl.F_GETPIPE_SZ) // P.PAGE_SIZE

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)

    def reply(self, unique: int, fd: int, off: int, size: int) -> bool:
        """Answer READ `unique` with up to `size` bytes of `fd` at `off`; False, having sent
        nothing, where the caller should read the ordinary way (a read past the end, too big
        for the pipe, from a file that cannot splice or that shrank meanwhile)."""
        length = min(size, os.fstat(fd).st_size - off)
        # a pipe buffer per page the data touches, and one for the header
        if length <= 0 or (off % P.PAGE_SIZE + length - 1) // P.PAGE_SIZE + 2 > self._slots:
            return False
        os.write(self._w, P.OUT_HEADER.pack(P.OUT_HEADER.size + length, 0, unique))
        got = 0
        try:
            while got < length:
                n = os.splice(fd, self._w, length - got, offset_src=off + got)
                if n == 0:
                    break
                got += n
        except OSError as exc:
            self._drain()
            if exc.errno in (errno.EINVAL, errno.EAGAIN, errno.EOPNOTSUPP):
                return False
            raise
        if got < length:  # shorter than its size said
            self._drain()
            return False
        try:
            os.splice(self._r, self._device, P.OUT_HEADER.size + length)
        except OSError as exc:
            self._drain()
            if exc.errno != errno.ENOENT:  # ENOENT: the kernel gave up on the request
                raise
        return True

    def _drain(self) -> None:
        """Empty the pipe of a reply that will not be sent."""
        while True:
            try:
                if not os.read(self._r, _PIPE_SIZES[0]):
                    return
            except BlockingIOError:
                return
