"""The merged tree, read side: lookups, listings, attributes and inode numbers over lower
dirs (top first) and an upper dir in the kernel overlayfs on-disk format.

Owns how a merged name resolves (top-down, stopping at whiteouts and opaque dirs, following
the kernel's `redirect` xattr), which node and number an object gets, and what `stat`,
`readdir` and `getxattr` show. Changes are `engine.Engine`'s, which builds on this class.

Synchronous and not thread-safe: the caller serializes calls. Errors are `OSError` with the
errno the kernel's overlayfs answers; names are bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs import overlay_xattrs as xattrs
from layerfs import realfs
from layerfs.overlay.lowers import WHITEOUT, Hidden, LowerLayers, is_whiteout_stat
from layerfs.overlay.nodes import ROOT_INO, UPPER, Node, NodeTable, make_ino

if TYPE_CHECKING:
    from collections.abc import Sequence

_S_IFMT = 0o170000
_S_IFDIR = stat.S_IFDIR

NAME_MAX = 255

def os_error(code: int, what: bytes | str = "") -> OSError:
    """The OSError a system call would raise with `code`."""
    return OSError(code, os.strerror(code), what)


_NO_XATTRS: dict[bytes, bytes] = {}
"""Shared by every lower object without xattrs (most of them); never changed."""


@dataclass(slots=True)
class Attr:
    """What `stat` shows for a node: the real object's stat with the merged number, and the
    owner and mode, which an override xattr may have changed (`overlay_xattrs.OVERRIDE_STAT`)."""

    ino: int
    generation: int
    st: os.stat_result
    nlink: int
    blocks: int
    uid: int
    gid: int
    mode: int


@dataclass(slots=True)
class Found:
    """Where a merged name lives: the top object, and for a directory what merges beneath."""

    is_dir: bool
    layer: int
    real: bytes
    st: os.stat_result
    lowers: tuple[tuple[int, bytes], ...] = ()
    bottom_st: os.stat_result | None = None
    data: tuple[int, bytes, os.stat_result] | None = None
    """For an upper file with metadata only: the lower file that holds its data."""




class MergedTree:
    def __init__(self, lowers: list[bytes], upper: bytes | None) -> None:
        # resolved once, as the kernel resolves the dirs it is given at mount (podman names
        # its layers by symlinks, overlay/l/ID)
        self.lowers = LowerLayers([os.path.realpath(p) for p in lowers])
        self.upper = os.path.realpath(upper) if upper is not None else None
        root = Node(ino=ROOT_INO, is_dir=True)
        root.in_upper = self.upper is not None
        self.nodes = NodeTable(root)
        self._init_root(root)
        self.override_layers = self._layers_with_overrides()
        """The layers (UPPER for the upper) of a rootless store: owners and modes may be in
        override xattrs, as fuse-overlayfs decides where the layer's root has one (in the
        `user.overlay.` format), and objects of the store's owner are root's."""
        self.store_owner = (os.geteuid(), os.getegid())

    def _layers_with_overrides(self) -> frozenset[int]:
        if xattrs.active() is not xattrs.USER:
            return frozenset()
        roots = [(layer, self.lowers.root(layer)) for layer in range(1, self.lowers.count + 1)]
        if self.upper is not None:
            roots.append((UPPER, self.upper))
        return frozenset(layer for layer, root in roots
                         if xattrs.get_xattr(root, xattrs.OVERRIDE_STAT) is not None)

    def _init_root(self, root: Node) -> None:
        plan = [(layer, self.lowers.root(layer)) for layer in range(1, self.lowers.count + 1)]
        lowers: list[tuple[int, bytes]] = []
        if self.upper is not None and xattrs.is_opaque_dir(self.upper):
            plan = []
        for layer, real in plan:
            listing = self.lowers.listing(real)
            if listing is None:
                raise os_error(errno.ENOENT, real)
            lowers.append((layer, real))
            if listing.opaque:
                break
        root.lowers = tuple(lowers)

    def _upper_path(self, node: Node) -> bytes:
        assert self.upper is not None
        if node.is_dir:
            return self.upper + node.path()
        for parent, name in node.links:
            return self.upper + parent.path() + b"/" + name
        raise os_error(errno.ENOENT)

    def data_path(self, node: Node) -> bytes:
        """The real file that holds `node`'s data now: the lower one for a metadata-only copy."""
        if node.metacopy and node.lower is not None:
            return node.lower[1]
        return self.real_path(node)

    def real_path(self, node: Node) -> bytes:
        """The real object that holds `node`'s attributes now (and its data, but see
        `data_path`)."""
        if node.in_upper:
            return self._upper_path(node)
        if node.is_dir:
            return node.lowers[0][1]
        assert node.lower is not None
        return node.lower[1]

    def _lookup(self, parent: Node, name: bytes) -> Found | None:
        """Resolve `name` in directory `parent`, top-down, as the kernel's ovl_lookup does."""
        top: Found | None = None
        # Where to look below: the parent's lower dirs and the name, unless a redirect says
        # other dirs and another name.
        plan: Sequence[tuple[int, bytes]] = parent.lowers
        nm = name
        if parent.in_upper:
            real = self._upper_path(parent) + b"/" + name
            try:
                st = realfs.lstat(real)
            except FileNotFoundError:
                st = None
            if st is not None:
                if is_whiteout_stat(st):
                    return None
                if not stat.S_ISDIR(st.st_mode):
                    found = Found(False, UPPER, real, st)
                    if stat.S_ISREG(st.st_mode) and xattrs.is_metacopy(real):
                        found.data = self._lower_data(parent, name)
                    return found
                top = Found(True, UPPER, real, st, bottom_st=st)
                if xattrs.is_opaque_dir(real):
                    return top
                redirect = xattrs.redirect_of(real)
                if redirect is not None:
                    plan, nm = self._redirect_plan(parent, UPPER, redirect)
        listing_of = self.lowers.listing
        lowers: list[tuple[int, bytes]] = []
        i = 0
        while i < len(plan):
            layer, pdir = plan[i]
            i += 1
            listing = listing_of(pdir)
            if listing is None:
                continue
            entry = listing.classify(nm)
            if entry is None:
                continue
            if isinstance(entry, Hidden):
                break
            real = pdir + b"/" + nm
            if entry.st_mode & _S_IFMT != _S_IFDIR:
                if top is None:
                    return Found(False, layer, real, entry)
                break
            if top is None:
                top = Found(True, layer, real, entry)
            lowers.append((layer, real))
            top.bottom_st = entry
            sub = listing_of(real)
            if sub is None or sub.opaque:
                break
            if sub.redirect is not None:
                plan, nm = self._redirect_plan(parent, layer, sub.redirect)
                i = 0
        if top is not None:
            top.lowers = tuple(lowers)
        return top

    def _lower_data(self, parent: Node, name: bytes) -> tuple[int, bytes, os.stat_result] | None:
        """The lower regular file under `name` that a metadata-only upper copy stands on."""
        for layer, pdir in parent.lowers:
            listing = self.lowers.listing(pdir)
            if listing is None:
                continue
            st = listing.classify(name)
            if st is None:
                continue
            if isinstance(st, Hidden):
                return None
            return (layer, pdir + b"/" + name, st) if stat.S_ISREG(st.st_mode) else None
        return None

    def _redirect_plan(
        self, parent: Node, layer: int, redirect: bytes
    ) -> tuple[list[tuple[int, bytes]], bytes]:
        """Where lookup goes on below `layer` for a directory with a redirect xattr: the
        directories to look in, and the name to look for there."""
        parts = [p for p in redirect.split(b"/") if p]
        if not parts or any(p in (b".", b"..") for p in parts):
            return [], b""  # a redirect that names nothing or climbs out: look no further
        if redirect.startswith(b"/"):
            head = b"".join(b"/" + p for p in parts[:-1])
            return [(k, self.lowers.root(k) + head)
                    for k in range(layer + 1, self.lowers.count + 1)], parts[-1]
        if len(parts) != 1:
            return [], b""
        return [(k, pdir) for k, pdir in parent.lowers if k > layer], parts[0]

    def _ino_of(self, found: Found) -> int:
        if found.is_dir:
            bottom_layer = found.lowers[-1][0] if found.lowers else found.layer
            assert found.bottom_st is not None
            return make_ino(bottom_layer, found.bottom_st.st_ino)
        if found.layer == UPPER:
            origin = xattrs.origin_ino(found.real)
            if origin is not None:
                return origin
        return make_ino(found.layer, found.st.st_ino)

    def _attach(self, parent: Node, name: bytes, found: Found, ino: int | None = None) -> Node:
        """The node for a resolved name, its location brought up to date; `ino` when the
        caller knows the number (a new object, with no origin to look up)."""
        node = self.nodes.claim(self._ino_of(found) if ino is None else ino, found.is_dir)
        if found.is_dir:
            if node.parent is not parent or node.name != name:
                node.move(parent, name)
            node.lowers = found.lowers
            node.in_upper = found.layer == UPPER
        else:
            node.links.add((parent, name))
            if found.layer == UPPER:
                node.in_upper = True
                node.metacopy = found.data is not None
                if found.data is not None:
                    node.lower, node.lower_st = found.data[:2], found.data[2]
            else:
                node.in_upper = False
                node.lower = (found.layer, found.real)
                node.lower_st = found.st
        return node

    def lookup(self, parent: Node, name: bytes) -> Node:
        """The node named `name` in `parent` (ENOENT, ENAMETOOLONG); one more kernel lookup."""
        node = self._lookup_node(parent, name)
        node.lookups += 1
        return node

    def _lookup_node(self, parent: Node, name: bytes) -> Node:
        if name == b".":
            return parent
        if name == b"..":
            return parent.parent or parent
        if len(name) > NAME_MAX:
            raise os_error(errno.ENAMETOOLONG, name)
        found = self._lookup(parent, name)
        if found is None:
            raise os_error(errno.ENOENT, name)
        return self._attach(parent, name, found)

    def forget(self, ino: int, count: int) -> None:
        self.nodes.forget(ino, count)

    def getattr(self, node: Node, st: os.stat_result | None = None) -> Attr:
        """What `stat` shows; `st`, where given, is the real object's own stat, just taken."""
        if st is None:
            st = self._real_stat(node)
        nlink = st.st_nlink
        if node.is_dir and (len(node.lowers) + node.in_upper) > 1:
            nlink = 1  # as the kernel: counting subdirectories of a merge is not worth it
        blocks = st.st_blocks
        if node.metacopy and node.lower_st is not None:
            blocks = node.lower_st.st_blocks  # as the kernel: the data's blocks
        if self.override_layers:
            override = self._override(node, st)
            if override is not None:
                return Attr(node.ino, node.generation, st, nlink, blocks, override[0],
                            override[1], stat.S_IFMT(st.st_mode) | override[2])
            if self._layer_of(node) in self.override_layers:
                uid, gid = xattrs.owner_in_image(st.st_uid, st.st_gid, self.store_owner)
                return Attr(node.ino, node.generation, st, nlink, blocks, uid, gid, st.st_mode)
        return Attr(node.ino, node.generation, st, nlink, blocks, st.st_uid, st.st_gid,
                    st.st_mode)

    @staticmethod
    def _layer_of(node: Node) -> int:
        """The layer that holds `node`'s attributes."""
        if node.in_upper:
            return UPPER
        if node.is_dir:
            return node.lowers[0][0]
        assert node.lower is not None
        return node.lower[0]

    def _override(self, node: Node, st: os.stat_result) -> tuple[int, int, int] | None:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            return None
        if self._layer_of(node) not in self.override_layers:
            return None
        if node.in_upper and not node.is_dir and not node.links and node.open_fds:
            try:
                raw = os.getxattr(node.open_fds[0], xattrs.OVERRIDE_STAT)
            except OSError:
                return None
            return xattrs.parse_override(raw)
        return xattrs.override_of(self.real_path(node))

    def _real_stat(self, node: Node) -> os.stat_result:
        if node.in_upper and not node.is_dir and not node.links and node.open_fds:
            return os.fstat(node.open_fds[0])  # unlinked, still open
        if node.in_upper:
            return realfs.lstat(self._upper_path(node))
        if node.is_dir:
            listing = self.lowers.listing(node.lowers[0][1])
            assert listing is not None
            return listing.st
        assert node.lower_st is not None
        return node.lower_st

    def readlink(self, node: Node) -> bytes:
        return realfs.readlink(self.real_path(node))

    def getxattr(self, node: Node, name: bytes) -> bytes:
        real_name = xattrs.to_real(name)
        if node.in_upper:
            return realfs.getxattr(self.real_path(node), real_name)
        values = self._lower_xattrs(node)
        if values is None:
            return realfs.getxattr(self.real_path(node), real_name)
        try:
            return values[real_name]
        except KeyError:
            raise os_error(errno.ENODATA, name) from None

    def listxattr(self, node: Node) -> list[bytes]:
        values = None if node.in_upper else self._lower_xattrs(node)
        if values is None:
            names = [os.fsencode(n) for n in
                     realfs.listxattr(self.real_path(node))]
        else:
            names = list(values)
        visible = (xattrs.to_visible(n) for n in names)
        return [n for n in visible if n is not None]

    def _lower_xattrs(self, node: Node) -> dict[bytes, bytes] | None:
        """All xattrs of a lower object, read once: lower layers never change, and `ls -l`
        asks for security.selinux (absent) of every entry. None where they cannot be listed."""
        if node.lower_xattrs is None:
            real = self.real_path(node)
            try:
                names = realfs.listxattr(real)
                node.lower_xattrs = {os.fsencode(n): realfs.getxattr(real, n)
                                     for n in names} if names else _NO_XATTRS
            except OSError:
                return None
        return node.lower_xattrs

    def listdir(self, node: Node) -> list[bytes]:
        """The merged names of a directory, computed once until the directory changes."""
        if node.listing is None:
            node.listing = self._merge_listing(node)
        return node.listing

    def _merge_listing(self, node: Node) -> list[bytes]:
        seen: dict[bytes, None] = {}
        hidden: set[bytes] = set()
        if node.in_upper:
            with realfs.scandir(self._upper_path(node)) as it:
                for entry in it:
                    if _maybe_device(entry) and is_whiteout_stat(entry.stat(follow_symlinks=False)):
                        hidden.add(entry.name)
                    else:
                        seen[entry.name] = None
        for _layer, real in node.lowers:
            listing = self.lowers.listing(real)
            if listing is None:
                continue
            for name in listing.entries:
                if name not in seen and name not in hidden:
                    seen[name] = None
            hidden |= listing.whiteouts
        return sorted(seen)

    def child(self, node: Node, name: bytes) -> Node | None:
        """The node of `name` in `parent` without counting a lookup; None if there is none.

        Remembered until the directory changes, so that a repeated readdir is dict lookups.
        """
        inos = node.child_inos
        if inos is None:
            inos = node.child_inos = {}
        else:
            ino = inos.get(name)
            if ino is not None:
                cached = self.nodes.get(ino)
                if cached is not None and not cached.dead:
                    return cached
        found = self._lookup(node, name)
        if found is None:
            return None
        child = self._attach(node, name, found)
        inos[name] = child.ino
        return child

    def is_empty(self, node: Node) -> bool:
        return not self.listdir(node)

    def upper_child(self, parent: Node, name: bytes) -> bytes:
        return self._upper_path(parent) + b"/" + name

    def lower_has(self, parent: Node, name: bytes) -> bool:
        """Whether the lower layers show `name` in `parent` (so deleting it needs a whiteout)."""
        for _layer, pdir in parent.lowers:
            listing = self.lowers.listing(pdir)
            if listing is None:
                continue
            found = listing.classify(name)
            if found is WHITEOUT:
                return False
            if found is not None:
                return True
        return False

    @staticmethod
    def _is_upper_whiteout(real: bytes) -> bool:
        try:
            return is_whiteout_stat(realfs.lstat(real))
        except FileNotFoundError:
            return False

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(self.upper if self.upper is not None else self.lowers.root(1))

    def access(self, node: Node, mode: int, uid: int, gids: list[int]) -> None:
        """access(2) from the attributes (EACCES), as the kernel's generic_permission does."""
        if mode == os.F_OK:
            return
        if mode & os.W_OK and self.upper is None:
            raise os_error(errno.EROFS)
        attr = self.getattr(node)
        if uid == 0:
            if mode & os.X_OK and not node.is_dir and not attr.mode & 0o111:
                raise os_error(errno.EACCES)
            return
        if attr.uid == uid:
            bits = (attr.mode >> 6) & 7
        elif attr.gid in gids:
            bits = (attr.mode >> 3) & 7
        else:
            bits = attr.mode & 7
        if mode & ~bits & 7:
            raise os_error(errno.EACCES)


def _maybe_device(entry: os.DirEntry[bytes]) -> bool:
    """d_type says neither dir, file nor symlink: a device, fifo or socket, worth a stat."""
    return not (
        entry.is_dir(follow_symlinks=False)
        or entry.is_file(follow_symlinks=False)
        or entry.is_symlink()
    )
