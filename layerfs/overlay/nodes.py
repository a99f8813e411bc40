"""Inodes of the merged tree: identity, numbering and where each one lives.

A `Node` is what the kernel holds a reference to. Its number is stable and unique (xino
style): the layer an object comes from sits in the high bits and its real inode number in the
low bits, so a lower file keeps its number across copy-up (recorded in an xattr on the upper
copy) and across remounts, and `readdir` can give the same number as `stat` without a lookup.

Directories form a tree (`parent`, `name`): their path follows renames of any ancestor with
one assignment. Other objects can have several names (hard links), kept in `links`.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os

ROOT_INO = 1
_LAYER_SHIFT = 48
_INO_MASK = (1 << _LAYER_SHIFT) - 1

UPPER = 0
"""Layer index of the upper dir; lower layers are 1..n, top first."""


def make_ino(layer: int, st_ino: int) -> int:
    """The merged inode number of real inode `st_ino` of `layer`."""
    if st_ino > _INO_MASK:  # wider than the space we reserve: fold, accepting a rare clash
        st_ino = (st_ino ^ (st_ino >> _LAYER_SHIFT)) & _INO_MASK
    return ((layer + 1) << _LAYER_SHIFT) | st_ino


_moves = [0]
"""How many times a directory moved (renamed, or found at a new name) in this process."""


@dataclass(slots=True, eq=False)
class Node:
    ino: int
    is_dir: bool
    generation: int = 0
    lookups: int = 0
    opens: int = 0
    dead: bool = False
    in_upper: bool = False
    # directories
    parent: Node | None = None
    name: bytes = b""
    lowers: tuple[tuple[int, bytes], ...] = ()
    listing: list[bytes] | None = None
    child_inos: dict[bytes, int] | None = None
    """Name → number of the children looked up since the directory last changed."""
    default_acl: bytes | None = None
    """The upper directory's default ACL as read for a create (b"" for none), until its
    xattrs change; None when not read."""
    setgid_group: int | None = None
    """The group a setgid upper directory hands on (-1: not setgid) as read for a create,
    until its mode, owner or ACLs change; None when not read."""
    # everything else
    links: set[tuple[Node, bytes]] = field(default_factory=set)
    lower: tuple[int, bytes] | None = None
    lower_st: os.stat_result | None = None
    metacopy: bool = False
    """In the upper with its metadata only: the data is still `lower`'s."""
    data_gen: int = 0
    """Goes up when the data moves to another real file: open readers follow it."""
    open_fds: tuple[int, ...] = ()
    """The real files open for it, oldest first (a tuple: most nodes never have one)."""
    cached_path: bytes | None = None
    path_moves: int = -1
    lower_xattrs: dict[bytes, bytes] | None = None
    """The lower object's xattrs, once read (lower layers never change); with the node, the
    memory goes when the kernel forgets it."""
    lower_entry: bytes | None = None
    """The FUSE entry of an object that lives in a lower layer only, packed once (its
    attributes never change); dropped with the node, like `lower_xattrs`."""

    def changed(self) -> None:
        """The directory's entries changed: forget its cached listing and children."""
        self.listing = None
        self.child_inos = None

    def move(self, parent: Node, name: bytes) -> None:
        """A directory now lives at `name` in `parent`: every cached path may be stale."""
        if self.parent is not None:  # a node seen for the first time moved nothing
            _moves[0] += 1
        self.parent, self.name = parent, name

    def path(self) -> bytes:
        """The merged path of a directory, b"" for the root, b"/a/b" below it.

        Cached until any directory moves (rare), since every upper access builds a path.
        """
        if self.path_moves == _moves[0] and self.cached_path is not None:
            return self.cached_path
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        path = b"".join(b"/" + part for part in reversed(parts))
        self.cached_path, self.path_moves = path, _moves[0]
        return path

    def is_ancestor_of(self, other: Node) -> bool:
        node: Node | None = other
        while node is not None:
            if node is self:
                return True
            node = node.parent
        return False


class NodeTable:
    """Number → node, with the kernel's lookup counts."""

    def __init__(self, root: Node) -> None:
        self.root = root
        self._nodes: dict[int, Node] = {ROOT_INO: root}

    def __getitem__(self, ino: int) -> Node:
        return self._nodes[ino]

    def get(self, ino: int) -> Node | None:
        return self._nodes.get(ino)

    def claim(self, ino: int, is_dir: bool) -> Node:
        """The live node with number `ino`, made anew where there is none or it is dead.

        A dead node's number came back (the upper filesystem reused an inode number): the
        generation goes up so that the kernel does not take the new object for the old one.
        """
        node = self._nodes.get(ino)
        if node is not None and not node.dead and node.is_dir == is_dir:
            return node
        generation = node.generation + 1 if node is not None else 0
        fresh = Node(ino=ino, is_dir=is_dir, generation=generation)
        if node is not None:
            fresh.lookups = node.lookups
        self._nodes[ino] = fresh
        return fresh

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None or node is self.root:
            return
        node.lookups = max(0, node.lookups - count)
        self.maybe_drop(node)

    def maybe_drop(self, node: Node) -> None:
        """Drop a node nobody holds. Live directories stay: their children point at them."""
        if node.lookups or node.opens or node is self.root:
            return
        if node.is_dir and not node.dead:
            return
        if self._nodes.get(node.ino) is node:
            del self._nodes[node.ino]

    def __len__(self) -> int:
        return len(self._nodes)


def file_type(mode: int) -> int:
    return stat.S_IFMT(mode)
