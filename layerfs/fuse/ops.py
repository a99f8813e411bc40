"""The pyfuse3 adapter: FUSE requests to engine calls, `OSError` to `FUSEError`.

Each handler maps inode numbers to nodes, calls the engine and answers; errno translation
happens in one place, `fuse_handler`. An unexpected exception is logged with its traceback and
answered with EIO, so that a bug never kills the daemon (a dead daemon is ENOTCONN for every
process in a chroot); with LAYERFS_STRICT=1, as the tests set it, the daemon stops instead.

Kernel cache hints: lower data never changes and the upper changes only through this mount, so
entries (negative ones too), attributes and file pages are cached by the kernel for a long time;
our code runs on cache misses and on writes. Requests are served one at a time (the engine is
not thread-safe).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import pyfuse3
import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Coroutine, Sequence

    from layerfs.overlay.engine import Engine, Handle
    from layerfs.overlay.nodes import Node
    from layerfs.overlay.tree import Attr

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 86400.0
"""Seconds the kernel may trust an entry or attributes: nothing changes behind our back."""

P = ParamSpec("P")
R = TypeVar("R")


def _strict() -> bool:
    return os.environ.get("LAYERFS_STRICT") == "1"


def fuse_handler(func: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Turn OSError into FUSEError(errno) and anything unexpected into a logged EIO."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await func(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", func.__name__)
            if _strict():
                pyfuse3.terminate()
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def mutating(func: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """A request that changes the upper dir: it waits while the mount is frozen (commit)."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ops = args[0]
        assert isinstance(ops, OverlayOperations)
        async with ops.mutation():
            return await func(*args, **kwargs)

    return wrapper


class _DirHandle:
    __slots__ = ("names", "node")

    def __init__(self, node: Node, names: list[bytes]) -> None:
        self.node = node
        self.names = names


class OverlayOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine
        self._files: dict[int, Handle] = {}
        self._dirs: dict[int, _DirHandle] = {}
        self._next_fh = 1
        self._copy_up_locks: dict[int, trio.Lock] = {}
        self._thawed: trio.Event | None = None  # set while frozen; fires on thaw
        self._mutations = 0
        self._quiet = trio.Event()
        # Attributes of objects that live in a lower layer only never change: made once.
        self._lower_entries: dict[tuple[int, int], pyfuse3.EntryAttributes] = {}

    # -------------------------------------------------------------- freezing
    @contextlib.asynccontextmanager
    async def mutation(self) -> AsyncIterator[None]:
        while self._thawed is not None:
            await self._thawed.wait()
        self._mutations += 1
        try:
            yield
        finally:
            self._mutations -= 1
            if not self._mutations:
                self._quiet.set()

    async def freeze(self) -> None:
        """Hold every request that would change the upper dir; return once none is running.

        What `commit` of a live container asks for (docker pauses a container to commit it):
        the upper dir is then a consistent snapshot until `thaw`.
        """
        if self._thawed is None:
            self._thawed = trio.Event()
        while self._mutations:
            self._quiet = trio.Event()
            await self._quiet.wait()

    def thaw(self) -> None:
        if self._thawed is not None:
            self._thawed.set()
            self._thawed = None

    # -------------------------------------------------------------- helpers
    def _node(self, inode: int) -> Node:
        node = self._engine.nodes.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def _copy_up(self, node: Node, data_len: int | None = None) -> None:
        """Copy a big lower file up in a worker thread, so other requests go on meanwhile.

        Small copies and directories are left to the engine, inline. A per-inode lock makes a
        second writer wait for the first copy instead of making its own; the engine re-checks
        the tree when it places the copy.
        """
        if node.is_dir or self._engine.upper is None or not self._engine.needs_copy_up(node):
            return
        job = self._engine.copy_up_job(node, data_len)
        if not job.slow:
            return
        lock = self._copy_up_locks.setdefault(node.ino, trio.Lock())
        try:
            async with lock:
                if not self._engine.needs_copy_up(node):
                    return
                tmp = await trio.to_thread.run_sync(self._engine.stage, job)
                self._engine.finish_copy_up(node, tmp)
        finally:
            if not lock.statistics().tasks_waiting:
                self._copy_up_locks.pop(node.ino, None)

    @staticmethod
    def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
        st = attr.st
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attr.ino
        entry.generation = attr.generation
        entry.entry_timeout = CACHE_TIMEOUT
        entry.attr_timeout = CACHE_TIMEOUT
        entry.st_mode = st.st_mode
        entry.st_nlink = attr.nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_size = st.st_size
        entry.st_blksize = st.st_blksize
        entry.st_blocks = attr.blocks
        entry.st_atime_ns = st.st_atime_ns
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        return entry

    def _node_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        if node.in_upper:
            return self._entry(self._engine.getattr(node))
        key = (node.ino, node.generation)
        entry = self._lower_entries.get(key)
        if entry is None:
            entry = self._lower_entries[key] = self._entry(self._engine.getattr(node))
        return entry

    # -------------------------------------------------------------- lookup and attributes
    @fuse_handler
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        try:
            node = self._engine.lookup(self._node(parent_inode), name)
        except FileNotFoundError:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = 0  # a negative entry, cached like the positive ones
            negative.entry_timeout = CACHE_TIMEOUT
            return negative
        return self._node_entry(node)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, nlookup in inode_list:
            self._engine.forget(inode, nlookup)

    @fuse_handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._node_entry(self._node(inode))

    @fuse_handler
    @mutating
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
        fh: int | None, ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        if fields.update_size:
            await self._copy_up(node, attr.st_size)
        result = self._engine.setattr(
            node,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            handle=self._files.get(fh) if fh is not None else None,
        )
        return self._entry(result)

    @fuse_handler
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self._engine.readlink(self._node(inode))

    @fuse_handler
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        gids = [ctx.gid, *pyfuse3.get_sup_groups(ctx.pid)] if ctx.uid else [ctx.gid]
        try:
            self._engine.access(self._node(inode), mode, ctx.uid, gids)
        except PermissionError:
            return False
        return True

    @fuse_handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self._engine.statfs()
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(sv, field))
        return data

    # -------------------------------------------------------------- creating and removing
    @fuse_handler
    @mutating
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._engine.mknod(self._node(parent_inode), name, mode, rdev, ctx.uid, ctx.gid)
        return self._node_entry(node)

    @fuse_handler
    @mutating
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._engine.mkdir(self._node(parent_inode), name, mode, ctx.uid, ctx.gid)
        return self._node_entry(node)

    @fuse_handler
    @mutating
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        node = self._engine.symlink(self._node(parent_inode), name, target, ctx.uid, ctx.gid)
        return self._node_entry(node)

    @fuse_handler
    @mutating
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        source = self._node(inode)
        await self._copy_up(source)
        node = self._engine.link(source, self._node(new_parent_inode), new_name)
        return self._node_entry(node)

    @fuse_handler
    @mutating
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._engine.unlink(self._node(parent_inode), name)

    @fuse_handler
    @mutating
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._engine.rmdir(self._node(parent_inode), name)

    @fuse_handler
    @mutating
    async def rename(
        self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
        flags: int, ctx: pyfuse3.RequestContext,
    ) -> None:
        old_parent, new_parent = self._node(parent_inode_old), self._node(parent_inode_new)
        for parent, name in ((old_parent, name_old), (new_parent, name_new)):
            node = self._engine.child(parent, name)
            if node is not None and (parent is old_parent or flags & pyfuse3.RENAME_EXCHANGE):
                await self._copy_up(node)
        self._engine.rename(old_parent, name_old, new_parent, name_new, flags)

    # -------------------------------------------------------------- xattrs
    @fuse_handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self._engine.getxattr(self._node(inode), name)

    @fuse_handler
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self._engine.listxattr(self._node(inode))

    @fuse_handler
    @mutating
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self._node(inode)
        self._engine.setxattr(node, name, value)

    @fuse_handler
    @mutating
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._engine.removexattr(self._node(inode), name)

    # -------------------------------------------------------------- files
    def _file_info(self, handle: Handle) -> pyfuse3.FileInfo:
        fh = self._fh()
        self._files[fh] = handle
        # Every change goes through this mount, so cached pages stay right.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @fuse_handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if not flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC):
            return self._file_info(self._engine.open(node, flags))
        async with self.mutation():
            if not flags & os.O_TRUNC:
                await self._copy_up(node)
            return self._file_info(self._engine.open(node, flags))

    @fuse_handler
    @mutating
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node, handle = self._engine.create(
            self._node(parent_inode), name, mode, flags, ctx.uid, ctx.gid
        )
        return self._file_info(handle), self._node_entry(node)

    @fuse_handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self._engine.read(self._files[fh], off, size)

    @fuse_handler
    @mutating
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self._engine.write(self._files[fh], off, buf)

    @fuse_handler
    async def flush(self, fh: int) -> None:
        return None

    @fuse_handler
    async def fsync(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(self._engine.fsync, self._files[fh], datasync)

    @fuse_handler
    async def release(self, fh: int) -> None:
        self._engine.release(self._files.pop(fh))

    # -------------------------------------------------------------- directories
    @fuse_handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        node = self._node(inode)
        if not node.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        fh = self._fh()
        self._dirs[fh] = _DirHandle(node, self._engine.listdir(node))
        return fh

    @fuse_handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self._dirs[fh]
        node = handle.node
        # "." and ".." first, as real filesystems list them; the kernel takes no
        # reference on them, so they count no lookup.
        if start_id == 0:
            if not pyfuse3.readdir_reply(token, b".", self._node_entry(node), 1):
                return
            start_id = 1
        if start_id == 1:
            dotdot = node.parent or node
            if not pyfuse3.readdir_reply(token, b"..", self._node_entry(dotdot), 2):
                return
            start_id = 2
        names = handle.names
        for index in range(start_id - 2, len(names)):
            name = names[index]
            child = self._engine.child(node, name)
            if child is None:
                continue
            if not pyfuse3.readdir_reply(token, name, self._node_entry(child), index + 3):
                return
            child.lookups += 1

    @fuse_handler
    async def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    @fuse_handler
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._dirs[fh]
        fd = os.open(self._engine.real_path(handle.node), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
