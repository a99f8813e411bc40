"""The overlay as a FUSE filesystem: requests to engine calls, `OSError` to the reply's errno.

Each handler maps node ids to nodes, calls the engine and packs the answer; errno translation
happens in one place, the session. Handlers run under `lock` (the engine is not thread-safe):
on the loop thread, or on a worker when they `Defer` because they would block for long; a
worker drops the lock around the slow part (`blocking`) and re-checks afterwards.

Kernel cache hints: lower data never changes and the upper changes only through this mount, so
entries (negative ones too), attributes, symlinks and file pages are cached by the kernel for a
long time, and directories are opened without us (OPENDIR answers ENOSYS): the kernel then keeps
each listing it has read in its page cache until the directory changes. Our code runs on cache
misses and on writes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from typing import TYPE_CHECKING

from layerfs.fuse import protocol as P
from layerfs.fuse.idmap import IDENTITY, IdMap
from layerfs.fuse.passthrough import BackingFiles
from layerfs.fuse.session import MAX_WRITE, Defer, Reply, Request
from layerfs.fuse.splice import SPLICE_MIN, SplicedReplies
from layerfs.overlay.nodes import UPPER

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from layerfs.overlay.engine import Engine, Handle
    from layerfs.overlay.nodes import Node
    from layerfs.overlay.tree import Attr

CACHE_TIMEOUT = 86400
"""Seconds the kernel may trust an entry or attributes: nothing changes behind our back."""

_NEGATIVE_ENTRY = P.ENTRY_OUT.pack(0, 0, CACHE_TIMEOUT, 0, 0, 0, *(0,) * 16)
_NO_ENTRY = bytes(P.ENTRY_OUT.size)
"""In a READDIRPLUS reply: no attributes (the kernel takes no reference), as for . and .."""
_ATTR_PREFIX = P.ATTR_OUT.pack(CACHE_TIMEOUT, 0, 0, *(0,) * 16)[:16]
_ENTRY_HEADER = 40  # fuse_entry_out before its fuse_attr
_DIRENTPLUS_FIXED = P.ENTRY_OUT.size + P.DIRENT.size
_DOT_COOKIES = 2  # offsets 1 and 2 are "." and ".."; names start at 3


def _name(body: memoryview | bytes) -> bytes:
    return bytes(body[:-1])  # one NUL-terminated name fills the body


def _two_names(body: memoryview | bytes) -> tuple[bytes, bytes]:
    first, second, _ = bytes(body).split(b"\0", 2)
    return first, second


class _Cookies:
    """Stable readdir offsets for one directory: a name keeps its slot while it exists, so a
    listing read over several requests neither skips nor repeats a name that did not change."""

    __slots__ = ("index", "listing", "slots")

    def __init__(self) -> None:
        self.listing: list[bytes] | None = None
        self.slots: list[bytes | None] = []
        self.index: dict[bytes, int] = {}

    def update(self, listing: list[bytes]) -> list[bytes | None]:
        if listing is self.listing:
            return self.slots
        present = set(listing)
        for slot, name in enumerate(self.slots):
            if name is not None and name not in present:
                self.slots[slot] = None
                del self.index[name]
        for name in listing:
            if name not in self.index:
                self.index[name] = len(self.slots)
                self.slots.append(name)
        self.listing = listing
        return self.slots


class OverlayOperations:
    def __init__(self, engine: Engine, *, passthrough: bool = True,
                 passthrough_lowers: bool = False, ids: IdMap = IDENTITY) -> None:
        """`passthrough`: let the kernel read and write files whose data no copy-up can move
        (all files of a read-only mount, files in the upper) without asking us.
        `passthrough_lowers`: lower files of a read-write mount too, whose readers then keep
        the lower file when another process copies it up, and which nobody may open for
        writing meanwhile (`layerfs.fuse.passthrough`). `ids`: how owners on disk are shown,
        and callers' ids stored (`layerfs.fuse.idmap`)."""
        self._ids = ids
        self.lock = threading.Lock()
        self.requests_waiting: Callable[[], bool] = lambda: True  # the session's, once attached
        self.kernel_flags = 0  # the session's, after INIT
        self.device_fd = -1  # the session's
        self.wants_passthrough = passthrough
        self._passthrough_lowers = passthrough_lowers
        self._engine = engine
        self._backing: BackingFiles | None = None  # made at the first open, after INIT
        self._backing_ids: dict[int, int] = {}
        """fh -> the backing id it was opened with; 0 for a cached open."""
        self._loop_thread = threading.get_ident()
        self._files: dict[int, Handle] = {}
        self._next_fh = 1
        self._copy_up_locks: dict[int, tuple[threading.Lock, list[int]]] = {}
        self._cookies: dict[int, _Cookies] = {}
        self._read_buffer = bytearray(MAX_WRITE)  # the loop's: its reply is written at once
        self._spliced: SplicedReplies | None = None  # the loop's, made at its first read

    def handlers(self) -> dict[int, Callable[[Request], Reply]]:
        op = P.Op
        return {
            op.LOOKUP: self.lookup, op.FORGET: self.forget, op.BATCH_FORGET: self.batch_forget,
            op.GETATTR: self.getattr, op.SETATTR: self.setattr, op.READLINK: self.readlink,
            op.ACCESS: self.access, op.STATFS: self.statfs, op.MKNOD: self.mknod,
            op.MKDIR: self.mkdir, op.SYMLINK: self.symlink, op.LINK: self.link,
            op.UNLINK: self.unlink, op.RMDIR: self.rmdir, op.RENAME: self.rename,
            op.RENAME2: self.rename2, op.GETXATTR: self.getxattr, op.LISTXATTR: self.listxattr,
            op.SETXATTR: self.setxattr, op.REMOVEXATTR: self.removexattr, op.OPEN: self.open,
            op.CREATE: self.create, op.READ: self.read, op.WRITE: self.write,
            op.FLUSH: self.flush, op.FSYNC: self.fsync, op.RELEASE: self.release,
            op.LSEEK: self.lseek, op.FALLOCATE: self.fallocate, op.OPENDIR: self.opendir,
            op.READDIR: self.readdir, op.READDIRPLUS: self.readdirplus,
            op.RELEASEDIR: self.releasedir, op.FSYNCDIR: self.fsyncdir, op.DESTROY: self.destroy,
        }

    # -------------------------------------------------------------- helpers
    def _node(self, inode: int) -> Node:
        node = self._engine.nodes.get(inode)
        if node is None:
            raise OSError(errno.ESTALE, "stale node id")
        return node

    def _handle(self, fh: int) -> Handle:
        handle = self._files.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return handle

    @contextlib.contextmanager
    def blocking(self) -> Iterator[None]:
        """Run a slow syscall without the lock, on a worker; on the loop thread, defer to
        one, unless no other request waits (then waiting here is cheapest)."""
        if threading.get_ident() == self._loop_thread:
            if self.requests_waiting():
                raise Defer
            yield
            return
        self.lock.release()
        try:
            yield
        finally:
            self.lock.acquire()

    def _copy_up(self, node: Node, data_len: int | None = None) -> None:
        """Copy a big lower file up on a worker, so other requests go on meanwhile.

        Small copies and directories are left to the engine, inline, and so is a big file
        where it may be cloned: a clone takes no time at any size, and a handoff to a worker
        takes more than the clone (the clone is tried first; the data moves on a worker where
        the filesystems refuse it). A per-inode lock makes a second writer wait for the first
        copy instead of making its own; the engine re-checks the tree when it places the copy.
        """
        engine = self._engine
        if node.is_dir or engine.upper is None or not engine.needs_copy_up(node):
            return
        job = engine.copy_up_job(node, data_len)
        if not job.slow:
            return
        if threading.get_ident() == self._loop_thread:
            if not job.may_clone or node.ino in self._copy_up_locks:
                raise Defer
            cloned = engine.stage_clone(job)
            if cloned is None:
                raise Defer
            engine.finish_copy_up(node, cloned)
            return
        ino_lock, users = self._copy_up_locks.setdefault(node.ino, (threading.Lock(), [0]))
        users[0] += 1
        try:
            with self.blocking():
                ino_lock.acquire()
            try:
                if not engine.needs_copy_up(node):
                    return
                with self.blocking():
                    tmp = engine.stage(job)
                engine.finish_copy_up(node, tmp)
            finally:
                ino_lock.release()
        finally:
            users[0] -= 1
            if not users[0]:
                del self._copy_up_locks[node.ino]

    def _entry(self, attr: Attr) -> bytes:
        uid, gid = attr.uid, attr.gid
        if not self._ids.is_identity:
            uid, gid = self._ids.shown(uid, gid)
        return P.pack_entry(attr.ino, attr.generation, CACHE_TIMEOUT, attr.st, attr.nlink,
                            attr.blocks, attr.mode, uid, gid)

    def _caller(self, req: Request) -> tuple[int, int]:
        """The caller's ids as a new object's owner on disk."""
        return self._ids.on_disk_uid(req.uid), self._ids.on_disk_gid(req.gid)

    def _node_entry(self, node: Node) -> bytes:
        if node.in_upper:
            return self._entry(self._engine.getattr(node))
        entry = node.lower_entry
        if entry is None:
            entry = node.lower_entry = self._entry(self._engine.getattr(node))
        return entry

    def _attr_reply(self, entry: bytes) -> bytes:
        return _ATTR_PREFIX + entry[_ENTRY_HEADER:]

    def _new_fh(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = handle
        return fh

    def _refuse_writer_of_lower_backing(self, node: Node, flags: int) -> None:
        """ETXTBSY for an open for writing while a lower file backs `node`'s readers
        (passthrough=all): the kernel would map that file for the writer's mmap too."""
        if flags & (os.O_WRONLY | os.O_RDWR) and self._backing is not None and \
                self._backing.backs_lower(node.ino):
            raise OSError(errno.ETXTBSY, "a lower file backs readers of this file")

    def _open_reply(self, handle: Handle) -> bytes:
        # Every change goes through this mount, so cached pages stay right; and a close has
        # nothing for us to do (no locks, writes are not buffered), so the kernel sends no FLUSH.
        backing = self._backing
        if backing is None:
            backing = self._backing = BackingFiles(
                self.device_fd, self.wants_passthrough and bool(self.kernel_flags & P.PASSTHROUGH))
        fh = self._new_fh(handle)
        # A lower file of a read-write mount may be copied up while open, and its readers must
        # then read the copy (as on the kernel's overlayfs): only we can move them, unless the
        # mount says they may stay on the lower file (passthrough=all).
        # O_DIRECT stays ours: we serve it buffered, where the backing file would refuse
        # unaligned requests (EINVAL)
        direct = bool(handle.flags & os.O_DIRECT)
        wanted = (handle.layer == UPPER or self._engine.upper is None
                  or self._passthrough_lowers) and not direct
        backing_id, stale = backing.open(handle.node.ino, handle.fd, handle.data_gen, wanted,
                                         handle.layer != UPPER)
        if backing_id:
            self._backing_ids[fh] = backing_id
            # of an inode in passthrough mode, every open must name its backing file, also
            # one that is O_DIRECT or must see newer data than the backing file holds;
            # FOPEN_DIRECT_IO sends its reads and writes to us all the same
            served = P.FOPEN_DIRECT_IO if direct or stale else 0
            return P.OPEN_OUT.pack(fh, P.FOPEN_PASSTHROUGH | P.FOPEN_NOFLUSH | served, backing_id)
        return P.OPEN_OUT.pack(fh, P.FOPEN_KEEP_CACHE | P.FOPEN_NOFLUSH, 0)

    # -------------------------------------------------------------- lookup and attributes
    def lookup(self, req: Request) -> Reply:
        try:
            node = self._engine.lookup(self._node(req.nodeid), _name(req.body))
        except FileNotFoundError:
            return _NEGATIVE_ENTRY  # cached like the positive ones
        return self._node_entry(node)

    def forget(self, req: Request) -> Reply:
        (nlookup,) = P.FORGET_IN.unpack_from(req.body)
        self._forget(req.nodeid, nlookup)
        return None

    def batch_forget(self, req: Request) -> Reply:
        count, _ = P.BATCH_FORGET_IN.unpack_from(req.body)
        for index in range(count):
            ino, nlookup = P.FORGET_ONE.unpack_from(
                req.body, P.BATCH_FORGET_IN.size + index * P.FORGET_ONE.size)
            self._forget(ino, nlookup)
        return None

    def _forget(self, ino: int, nlookup: int) -> None:
        self._engine.forget(ino, nlookup)
        if ino in self._cookies and self._engine.nodes.get(ino) is None:
            del self._cookies[ino]

    def getattr(self, req: Request) -> Reply:
        return self._attr_reply(self._node_entry(self._node(req.nodeid)))

    def setattr(self, req: Request) -> Reply:
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atime_ns, mtime_ns, _ctime_ns, mode,
         _, uid, gid, _) = P.SETATTR_IN.unpack_from(req.body)
        node = self._node(req.nodeid)
        if valid & P.FATTR_SIZE:
            self._copy_up(node, size)
        now = time.time_ns()
        atime_total: int | None = None
        if valid & P.FATTR_ATIME_NOW:
            atime_total = now
        elif valid & P.FATTR_ATIME:
            atime_total = atime * 1_000_000_000 + atime_ns
        mtime_total: int | None = None
        if valid & P.FATTR_MTIME_NOW:
            mtime_total = now
        elif valid & P.FATTR_MTIME:
            mtime_total = mtime * 1_000_000_000 + mtime_ns
        result = self._engine.setattr(
            node,
            mode=mode if valid & P.FATTR_MODE else None,
            uid=self._ids.on_disk_uid(uid) if valid & P.FATTR_UID else None,
            gid=self._ids.on_disk_gid(gid) if valid & P.FATTR_GID else None,
            size=size if valid & P.FATTR_SIZE else None,
            atime_ns=atime_total,
            mtime_ns=mtime_total,
            handle=self._files.get(fh) if valid & P.FATTR_FH else None,
        )
        # With handle_killpriv_v2 dropping setuid/setgid is ours: the kernel says so for an
        # unprivileged chown or truncate, and a chown(f, -1, -1), which drops them too, comes
        # as a SETATTR of nothing.
        if valid & P.FATTR_KILL_SUIDGID or (valid == 0 and not node.is_dir):
            self._engine.drop_setid(node)
            result = self._engine.getattr(node)
        return self._attr_reply(self._entry(result))

    def readlink(self, req: Request) -> Reply:
        return self._engine.readlink(self._node(req.nodeid))

    def access(self, req: Request) -> Reply:
        (mask, _) = P.ACCESS_IN.unpack_from(req.body)
        gids = [req.gid, *_supplementary_groups(req.pid)] if req.uid else [req.gid]
        if not self._ids.is_identity:
            if self._ids.squash_uid is not None or self._ids.squash_gid is not None:
                return b""  # the kernel judged the squashed owner already
            gids = [self._ids.on_disk_gid(g) for g in gids]
        self._engine.access(self._node(req.nodeid), mask, self._ids.on_disk_uid(req.uid), gids)
        return b""

    def statfs(self, req: Request) -> Reply:
        sv = self._engine.statfs()
        return P.STATFS_OUT.pack(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
                                 sv.f_bsize, sv.f_namemax, sv.f_frsize, 0)

    # -------------------------------------------------------------- creating and removing
    def mknod(self, req: Request) -> Reply:
        mode, rdev, umask, _ = P.MKNOD_IN.unpack_from(req.body)
        name = _name(req.body[P.MKNOD_IN.size:])
        node = self._engine.mknod(self._node(req.nodeid), name, mode, P.decode_dev(rdev),
                                  *self._caller(req), umask)
        return self._node_entry(node)

    def mkdir(self, req: Request) -> Reply:
        mode, umask = P.MKDIR_IN.unpack_from(req.body)
        name = _name(req.body[P.MKDIR_IN.size:])
        node = self._engine.mkdir(self._node(req.nodeid), name, mode, *self._caller(req), umask)
        return self._node_entry(node)

    def symlink(self, req: Request) -> Reply:
        name, target = _two_names(req.body)
        node = self._engine.symlink(self._node(req.nodeid), name, target, *self._caller(req))
        return self._node_entry(node)

    def link(self, req: Request) -> Reply:
        (old_inode,) = P.LINK_IN.unpack_from(req.body)
        source = self._node(old_inode)
        self._copy_up(source)
        new_name = _name(req.body[P.LINK_IN.size:])
        node = self._engine.link(source, self._node(req.nodeid), new_name)
        return self._node_entry(node)

    def unlink(self, req: Request) -> Reply:
        self._engine.unlink(self._node(req.nodeid), _name(req.body))
        return b""

    def rmdir(self, req: Request) -> Reply:
        self._engine.rmdir(self._node(req.nodeid), _name(req.body))
        return b""

    def rename(self, req: Request) -> Reply:
        (new_dir,) = P.RENAME_IN.unpack_from(req.body)
        old, new = _two_names(req.body[P.RENAME_IN.size:])
        return self._rename(req.nodeid, old, new_dir, new, 0)

    def rename2(self, req: Request) -> Reply:
        new_dir, flags, _ = P.RENAME2_IN.unpack_from(req.body)
        old, new = _two_names(req.body[P.RENAME2_IN.size:])
        return self._rename(req.nodeid, old, new_dir, new, flags)

    def _rename(self, old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> Reply:
        old_parent, new_parent = self._node(old_dir), self._node(new_dir)
        for parent, name in ((old_parent, old), (new_parent, new)):
            node = self._engine.child(parent, name)
            if node is not None and (parent is old_parent or flags & _RENAME_EXCHANGE):
                self._copy_up(node)
        self._engine.rename(old_parent, old, new_parent, new, flags)
        return b""

    # -------------------------------------------------------------- xattrs
    def getxattr(self, req: Request) -> Reply:
        size, _ = P.GETXATTR_IN.unpack_from(req.body)
        value = self._engine.getxattr(self._node(req.nodeid),
                                      _name(req.body[P.GETXATTR_IN.size:]))
        return _sized(value, size)

    def listxattr(self, req: Request) -> Reply:
        size, _ = P.GETXATTR_IN.unpack_from(req.body)
        names = self._engine.listxattr(self._node(req.nodeid))
        return _sized(b"".join(name + b"\0" for name in names), size)

    def setxattr(self, req: Request) -> Reply:
        if self.kernel_flags & P.SETXATTR_EXT:
            size, flags, setxattr_flags, _ = P.SETXATTR_EXT_IN.unpack_from(req.body)
            rest = bytes(req.body[P.SETXATTR_EXT_IN.size:])
        else:
            size, flags = P.SETXATTR_IN.unpack_from(req.body)
            setxattr_flags = 0
            rest = bytes(req.body[P.SETXATTR_IN.size:])
        end = rest.index(b"\0")
        name, value = rest[:end], rest[end + 1:end + 1 + size]
        self._engine.setxattr(self._node(req.nodeid), name, value, flags,
                              kill_sgid=bool(setxattr_flags & P.SETXATTR_ACL_KILL_SGID))
        return b""

    def removexattr(self, req: Request) -> Reply:
        self._engine.removexattr(self._node(req.nodeid), _name(req.body))
        return b""

    # -------------------------------------------------------------- files
    def open(self, req: Request) -> Reply:
        flags, open_flags = P.OPEN_IN.unpack_from(req.body)
        node = self._node(req.nodeid)
        self._refuse_writer_of_lower_backing(node, flags)  # before it copies up
        if flags & (os.O_WRONLY | os.O_RDWR) and not flags & os.O_TRUNC:
            self._copy_up(node)
        handle = self._engine.open(node, flags)
        if open_flags & P.OPEN_KILL_SUIDGID:
            self._engine.drop_setid(node)
        return self._open_reply(handle)

    def create(self, req: Request) -> Reply:
        flags, mode, umask, open_flags = P.CREATE_IN.unpack_from(req.body)
        name = _name(req.body[P.CREATE_IN.size:])
        node, handle, attr = self._engine.create(self._node(req.nodeid), name, mode, flags,
                                                 *self._caller(req), umask)
        try:  # a new file, unless its inode number folded onto one a lower file backs
            self._refuse_writer_of_lower_backing(node, flags)
        except OSError:
            self._engine.release(handle)
            self._forget(node.ino, 1)  # the kernel never hears of this entry
            raise
        if open_flags & P.OPEN_KILL_SUIDGID:  # O_TRUNC of an existing file
            self._engine.drop_setid(node)
            attr = self._engine.getattr(node)
        return [self._entry(attr), self._open_reply(handle)]

    def read(self, req: Request) -> Reply:
        """On the loop thread: spliced from the file when no other request waits, else what
        the page cache holds, at once; what needs the disk then goes to a worker."""
        fh, off, size, *_ = P.READ_IN.unpack_from(req.body)
        handle = self._handle(fh)
        fd = self._engine.reading_fd(handle)
        if threading.get_ident() == self._loop_thread and size <= len(self._read_buffer):
            # Spliced when nobody waits, since splice may wait for the disk: else what the
            # page cache holds is served at once and the rest deferred.
            if size >= SPLICE_MIN and not self.requests_waiting():
                spliced = self._spliced
                if spliced is None:
                    spliced = self._spliced = SplicedReplies(self.device_fd)
                if spliced.reply(req.unique, fd, off, size):
                    return None
            view = memoryview(self._read_buffer)[:size]
            n = self._read_cached(handle, fd, view, off)
            # A short read means end of file to the kernel: only the real end may be one.
            if n == size or (n >= 0 and off + n >= os.fstat(fd).st_size):
                return [view[:n]]
            if self.requests_waiting():
                raise Defer
            # Nobody waits behind us: going to disk here costs less than handing over to a
            # worker (about 110 us a read here).
            return [view[:os.preadv(fd, [view], off)]]
        fd = os.dup(fd)  # the handle may move to the upper copy while we read
        try:
            with self.blocking():
                return os.pread(fd, size, off)
        finally:
            os.close(fd)

    @staticmethod
    def _read_cached(handle: Handle, fd: int, view: memoryview, off: int) -> int:
        """What the page cache holds at `off`, without waiting for the disk; -1 for nothing.

        A filesystem without RWF_NOWAIT reads (tmpfs, some FUSE and network ones) answers
        EOPNOTSUPP: the handle then reads the normal way from here on."""
        if not handle.nowait:
            return -1
        try:
            return os.preadv(fd, [view], off, os.RWF_NOWAIT)
        except BlockingIOError:
            return -1
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            handle.nowait = False
            return -1

    def write(self, req: Request) -> Reply:
        fh, off, size, write_flags, *_ = P.WRITE_IN.unpack_from(req.body)
        data = req.body[P.WRITE_IN.size:P.WRITE_IN.size + size]
        handle = self._handle(fh)
        written = self._engine.write(handle, off, data)
        if write_flags & P.WRITE_KILL_SUIDGID:
            self._engine.drop_setid(handle.node)
        return P.WRITE_OUT.pack(written, 0)

    def flush(self, req: Request) -> Reply:
        return b""

    def fsync(self, req: Request) -> Reply:
        fh, flags, _ = P.FSYNC_IN.unpack_from(req.body)
        handle = self._handle(fh)
        with self.blocking():
            self._engine.fsync(handle, bool(flags & P.FSYNC_FDATASYNC))
        return b""

    def release(self, req: Request) -> Reply:
        fh, *_ = P.RELEASE_IN.unpack_from(req.body)
        handle = self._files.pop(fh, None)
        if handle is not None:
            if self._backing is not None:
                self._backing.release(handle.node.ino, self._backing_ids.pop(fh, 0))
            self._engine.release(handle)
        return b""

    def fallocate(self, req: Request) -> Reply:
        fh, off, length, mode, _ = P.FALLOCATE_IN.unpack_from(req.body)
        with self.blocking():
            self._engine.fallocate(self._handle(fh), mode, off, length)
        return b""

    def lseek(self, req: Request) -> Reply:
        fh, off, whence, _ = P.LSEEK_IN.unpack_from(req.body)
        return P.LSEEK_OUT.pack(self._engine.lseek(self._handle(fh), off, whence))

    def destroy(self, req: Request) -> Reply:
        if self._spliced is not None:
            self._spliced.close()
            self._spliced = None
        return b""

    # -------------------------------------------------------------- directories
    def opendir(self, req: Request) -> Reply:
        # The kernel then opens directories itself and caches their listings (FOPEN_CACHE_DIR);
        # READDIR names the directory by its node id.
        raise OSError(errno.ENOSYS, "directories need no open")

    def releasedir(self, req: Request) -> Reply:
        return b""

    def readdirplus(self, req: Request) -> Reply:
        return self._readdir(req, plus=True)

    def readdir(self, req: Request) -> Reply:
        return self._readdir(req, plus=False)

    def _readdir(self, req: Request, *, plus: bool) -> Reply:
        _fh, offset, size, *_ = P.READ_IN.unpack_from(req.body)
        node = self._node(req.nodeid)
        if not node.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        engine = self._engine
        cookies = self._cookies.get(node.ino)
        if cookies is None:
            cookies = self._cookies[node.ino] = _Cookies()
        slots = cookies.update(engine.listdir(node))
        parts: list[bytes] = []
        used = 0
        fixed = _DIRENTPLUS_FIXED if plus else P.DIRENT.size
        # "." and ".." first, as real filesystems list them; the kernel takes no reference on
        # them, so they count no lookup.
        while offset < _DOT_COOKIES:
            dot = node if offset == 0 else node.parent or node
            dot_name = b"." if offset == 0 else b".."
            record = P.pack_dirent(dot.ino, offset + 1, dot_name, P.dirent_type(0o040000))
            if used + len(record) + (_NO_ENTRY_SIZE if plus else 0) > size:
                return parts
            if plus:
                parts.append(_NO_ENTRY)
                used += _NO_ENTRY_SIZE
            parts.append(record)
            used += len(record)
            offset += 1
        # The loop a cold walk spends its time in: what it calls per name is inlined here.
        child_of, pack, zeros = engine.child, P.DIRENT.pack, _PADDING
        entry_size = fixed - _DIRENT_SIZE  # 0 without attributes
        for slot in range(offset - _DOT_COOKIES, len(slots)):
            name = slots[slot]
            if name is None:
                continue
            child = child_of(node, name)
            if child is None:
                continue
            length = len(name)
            padding = zeros[length % 8]
            record_size = _DIRENT_SIZE + length + len(padding)
            if used + entry_size + record_size > size:
                break
            entry = child.lower_entry
            if entry is None or child.in_upper:
                entry = self._node_entry(child)
            kind = entry[_MODE_OFFSET + 1] >> 4  # the file type: bits 12-15 of the mode
            if plus:
                parts.append(entry)
                child.lookups += 1
            parts.append(pack(child.ino, slot + _DOT_COOKIES + 1, length, kind) + name + padding)
            used += entry_size + record_size
        return parts

    def fsyncdir(self, req: Request) -> Reply:
        node = self._node(req.nodeid)
        path = self._engine.real_path(node)
        with self.blocking():
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return b""


_NO_ENTRY_SIZE = len(_NO_ENTRY)
_RENAME_EXCHANGE = 2
_MODE_OFFSET = _ENTRY_HEADER + 8 * 6 + 4 * 3


_DIRENT_SIZE = P.DIRENT.size
_PADDING = tuple(bytes(-length % 8) for length in range(8))
"""The padding after a name whose length is this modulo 8: dirents are 8-byte aligned."""


def _sized(value: bytes, size: int) -> bytes:
    """A getxattr/listxattr answer: the size alone when asked with 0, ERANGE if too small."""
    if size == 0:
        return P.GETXATTR_OUT.pack(len(value), 0)
    if len(value) > size:
        raise OSError(errno.ERANGE, "buffer too small")
    return value


def _supplementary_groups(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except OSError:
        pass
    return []
