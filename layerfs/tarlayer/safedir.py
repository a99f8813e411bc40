"""Directory fds inside one root, reached without ever following a symlink.

Owns: the openat walk that `tarlayer.read` writes through. A path is a tuple of name
components (bytes, already checked to hold no `/`, `.` or `..`); each component is opened
with O_NOFOLLOW|O_DIRECTORY relative to the fd of the one before, starting at the root fd, so
a symlink anywhere on the way is refused instead of traversed, whatever it points at, and
nothing outside the root can be reached. The walk to the last parent is kept open and reused
while the next path shares its prefix (tar entries come grouped by directory), so a walk
costs one openat per new component rather than one per component per entry.

Does not know tar, layers or whiteouts. Refusals raise `PathRefused` with the reason ("d/e
is a symlink (never followed)"); the caller names the entry. Other errors are OSError.

Concurrency: one walker per root and thread; it assumes that nobody else changes the tree
under it (a layer being unpacked is private to its unpacker).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from typing import Final

DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

Parts = tuple[bytes, ...]


class PathRefused(Exception):
    """A path that would go through something other than a directory."""


def _show(parts: Parts) -> str:
    return b"/".join(parts).decode("utf-8", "backslashreplace")


class DirWalker:
    """Hands out fds of directories under `root_fd` (which the walker does not own)."""

    def __init__(self, root_fd: int, implicit_mode: int = 0o755) -> None:
        self.root = root_fd
        self._implicit_mode = implicit_mode
        self._chain: list[tuple[bytes, int]] = []

    def close(self) -> None:
        self._truncate(0)

    def _truncate(self, keep: int) -> None:
        chain = self._chain
        while len(chain) > keep:
            os.close(chain.pop()[1])

    def parent(self, parts: Parts, create: bool = True) -> int:
        """The fd of directory `parts`, valid until the next call; made (0755) if missing.

        Raises PathRefused when a component is a symlink or no directory, FileNotFoundError
        when one is missing and `create` is false.
        """
        chain = self._chain
        common = 0
        for (name, _), part in zip(chain, parts, strict=False):
            if name != part:
                break
            common += 1
        self._truncate(common)
        fd = chain[-1][1] if chain else self.root
        for i in range(common, len(parts)):
            fd = self._open(fd, parts, i, create)
            chain.append((parts[i], fd))
        return fd

    def walk(self, parts: Parts) -> list[int]:
        """Fds of each directory on the way to `parts`, uncached; the caller closes them.

        For a second path needed at the same time as `parent()`'s (a hard link's target).
        Never creates; raises as `parent` does.
        """
        fds: list[int] = []
        try:
            for i in range(len(parts)):
                fds.append(self._open(fds[-1] if fds else self.root, parts, i, False))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _open(self, parent: int, parts: Parts, i: int, create: bool) -> int:
        name = parts[i]
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            # Linux answers ENOTDIR for a symlink opened O_DIRECTORY|O_NOFOLLOW; ELOOP is
            # what O_NOFOLLOW alone would say. Both: look at what it is, and refuse.
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
                what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
                raise PathRefused(f"{_show(parts[: i + 1])} is {what} (never followed)") from exc
            if exc.errno != errno.ENOENT or not create:
                raise
        os.mkdir(name, self._implicit_mode, dir_fd=parent)
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        os.fchmod(fd, self._implicit_mode)  # whatever the umask
        return fd

    def remove(self, parent: int, name: bytes) -> bool:
        """Remove `name` in directory `parent`, a whole tree if it is a directory.

        The tree goes with fd-relative calls that never follow symlinks; the walk's cached
        fds stay valid because `parent` is the deepest of them. True if it was a directory.
        """
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            # `parent` is the end of the cached walk: no fd of ours points into the tree.
            assert (self._chain[-1][1] if self._chain else self.root) == parent
            shutil.rmtree(name, dir_fd=parent)
            return True
        os.unlink(name, dir_fd=parent)
        return False
