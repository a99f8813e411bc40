"""Read-only views of the lower layers: cached directory listings and hard-link groups.

Lower layers never change while mounted (the overlay contract, as for the kernel), so each lower
directory is listed once, with `lstat` results cached on the entries, and answers every later
lookup from memory. This module knows the whiteout and opacity forms that may appear in a lower
layer (character device 0/0, `.wh.NAME` files, `.wh..wh..opq`, the opaque and redirect xattrs)
and nothing of the upper layer or of the merge.

Single-threaded: the engine calls it under its own lock.
"""

from __future__ import annotations

import stat
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs import overlay_xattrs as xattrs
from layerfs import realfs
from layerfs.oci import whiteout

if TYPE_CHECKING:
    import os


def is_whiteout_stat(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class Hidden:
    """The answer for a name that a whiteout in this directory deletes."""


WHITEOUT = Hidden()


@dataclass(slots=True)
class LowerDir:
    """One real directory of one lower layer, listed once."""

    real: bytes
    st: os.stat_result
    entries: dict[bytes, os.stat_result]
    """Every name but the whiteouts, with its `lstat`."""
    whiteouts: frozenset[bytes]
    """The names this layer deletes: `.wh.NAME` files and character devices 0/0."""
    opaque: bool
    redirect: bytes | None

    def classify(self, name: bytes) -> os.stat_result | Hidden | None:
        """The `lstat` of `name`, WHITEOUT if this layer deletes it, None if it says nothing."""
        st = self.entries.get(name)
        if st is None:
            return WHITEOUT if name in self.whiteouts else None
        return st


LISTING_BUDGET = 250_000
"""Lower entries whose listings are kept (each, with its lstat, takes about 0.8 KB): beyond that,
the directories used least recently are dropped and listed again when next needed, so that a
walk of a huge image does not keep the whole of it in the daemon's memory."""


class LowerLayers:
    """The ordered lower layers (index 1 is the top one) and their cached listings."""

    def __init__(self, roots: list[bytes]) -> None:
        self.roots = roots
        self._dirs: OrderedDict[bytes, LowerDir | None] = OrderedDict()
        self._budget = LISTING_BUDGET
        self.cached_entries = 0
        """What the kept listings hold: their entries, and one for each directory or non-dir."""
        self._groups: dict[int, dict[int, list[bytes]]] = {}

    def root(self, layer: int) -> bytes:
        return self.roots[layer - 1]

    @property
    def count(self) -> int:
        return len(self.roots)

    def listing(self, real: bytes) -> LowerDir | None:
        """The listing of a real lower directory; None where there is no directory."""
        dirs = self._dirs
        try:
            cached = dirs[real]
        except KeyError:
            pass
        else:
            dirs.move_to_end(real)
            return cached
        result = self._list(real)
        dirs[real] = result
        self.cached_entries += _weight(result)
        while self.cached_entries > self._budget and len(dirs) > 1:
            _, dropped = dirs.popitem(last=False)
            self.cached_entries -= _weight(dropped)
        return result

    @staticmethod
    def _list(real: bytes) -> LowerDir | None:
        try:
            st = realfs.lstat(real)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        entries: dict[bytes, os.stat_result] = {}
        hidden: set[bytes] = set()
        opaque = False
        with realfs.scandir(real) as it:
            for entry in it:
                name = entry.name
                if name.startswith(whiteout.WHITEOUT_PREFIX):
                    if whiteout.is_opaque_marker(name):
                        opaque = True
                    else:
                        target = whiteout.whiteout_target(name)
                        if target is not None:
                            hidden.add(target)
                    continue
                entry_st = entry.stat(follow_symlinks=False)
                if entry_st.st_rdev == 0 and stat.S_ISCHR(entry_st.st_mode):
                    hidden.add(name)  # the overlay form of a whiteout
                else:
                    entries[name] = entry_st
        opaque = opaque or xattrs.is_opaque_dir(real)
        redirect = xattrs.redirect_of(real)
        return LowerDir(real, st, entries, frozenset(hidden), opaque, redirect)

    def hardlink_names(self, layer: int, st_ino: int) -> list[bytes]:
        """Every path (relative to the layer root) of lower file `st_ino` in `layer`.

        Built on first use by one walk of the layer, for files with more than one link.
        """
        groups = self._groups.get(layer)
        if groups is None:
            groups = self._index_hardlinks(self.root(layer))
            self._groups[layer] = groups
        return groups.get(st_ino, [])

    @staticmethod
    def _index_hardlinks(root: bytes) -> dict[int, list[bytes]]:
        groups: dict[int, list[bytes]] = {}
        pending = [b""]
        while pending:
            rel = pending.pop()
            with realfs.scandir(root + rel) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(rel + b"/" + entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        if st.st_nlink > 1:
                            groups.setdefault(st.st_ino, []).append((rel + b"/" + entry.name)[1:])
        return groups


def _weight(listing: LowerDir | None) -> int:
    return 1 if listing is None else 1 + len(listing.entries)
