"""What an upper dir changes in the merged tree, in layer order: `docker diff` and commit.

Walks the upper dir (through a read-only engine over the same layers) and yields, sorted,
parents before children:

- added (A) and changed (C) objects, with the real path holding their content now (changed
  includes metadata-only changes: a copied-up file is in the upper in full);
- deleted (D) names: a whiteout in the upper over a name that a lower layer shows;
- opaque directories: created over a deleted one, or made opaque by a rename over lower
  content; a directory renamed with a redirect is opaque as well, and its merged content,
  from whatever layer, is yielded in full, since a layer tar has no redirects.

Does not know tar: `layerfs.tarlayer.write` turns the changes into a layer.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs import overlay_xattrs as xattrs
from layerfs import realfs
from layerfs.overlay.lowers import is_whiteout_stat
from layerfs.overlay.tree import MergedTree

if TYPE_CHECKING:
    from collections.abc import Iterator

    from layerfs.overlay.nodes import Node

ADDED, CHANGED, DELETED = "A", "C", "D"


@dataclass(frozen=True, slots=True)
class Change:
    path: bytes
    """Relative to the root, no leading slash."""
    kind: str
    real: bytes | None
    """Where the object is now; None for a deletion."""
    opaque: bool = False
    data: bytes | None = None
    """Where a regular file's data is, when not in `real` (a metadata-only copy-up)."""


def walk_changes(lowers: list[bytes], upper: bytes) -> Iterator[Change]:
    engine = MergedTree(lowers, upper)
    yield from _walk_upper(engine, engine.nodes.root, b"")


def _walk_upper(engine: MergedTree, node: Node, prefix: bytes) -> Iterator[Change]:
    real_dir = engine.real_path(node)
    with realfs.scandir(real_dir) as it:
        names = sorted(entry.name for entry in it)
    for name in names:
        path = prefix + name
        real = real_dir + b"/" + name
        st = realfs.lstat(real)
        if is_whiteout_stat(st):
            if engine.lower_has(node, name):
                yield Change(path, DELETED, None)
            continue
        kind = CHANGED if engine.lower_has(node, name) else ADDED
        if not stat.S_ISDIR(st.st_mode):
            data = None
            if stat.S_ISREG(st.st_mode):
                child = engine.child(node, name)
                if child is not None and child.metacopy:
                    data = engine.data_path(child)
            yield Change(path, kind, real, data=data)
            continue
        child = engine.child(node, name)
        assert child is not None and child.is_dir
        if xattrs.redirect_of(real) is not None:
            yield Change(path, kind, real, opaque=True)
            yield from _walk_merged(engine, child, path + b"/")
        else:
            yield Change(path, kind, real, opaque=xattrs.is_opaque_dir(real) and kind == CHANGED)
            yield from _walk_upper(engine, child, path + b"/")


def _walk_merged(engine: MergedTree, node: Node, prefix: bytes) -> Iterator[Change]:
    """Everything the merged tree shows under `node`, as additions."""
    for name in engine.listdir(node):
        child = engine.child(node, name)
        if child is None:
            continue
        real = engine.real_path(child)
        data = engine.data_path(child) if child.metacopy else None
        yield Change(prefix + name, ADDED, real, data=data)
        if child.is_dir:
            yield from _walk_merged(engine, child, prefix + name + b"/")
