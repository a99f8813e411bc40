"""Workloads that no stock tool does exactly, run as `python -m benchmarks.ops OP ARGS...`.

Each op does its untimed preparation, times only the operation with `perf_counter` and prints the
seconds on the last line of stdout. It runs in a child so that the parent can enforce a timeout
and kill it when a FUSE daemon hangs, and so that nothing in the parent holds a mount busy.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

SMALL_FILE = b"x" * 99 + b"\n"  # 100 bytes, the size of a typical config or marker file
FILES_PER_DIR = 100  # spread created files like a package install does, not one huge directory


def stat_paths(root: str, listing: str) -> float:
    """lstat every listed path once to warm the caches, then time a second pass.

    lstat, not stat: the tree's symlinks point at absolute host paths outside the mount.
    Raises FileNotFoundError if a path is missing: the mount must show the whole merged tree.
    """
    with open(listing, "rb") as file:
        paths = [os.path.join(os.fsencode(root), path) for path in file.read().split(b"\0")]
    for path in paths:
        os.lstat(path)
    start = time.perf_counter()
    for path in paths:
        os.lstat(path)
    return time.perf_counter() - start


def write_first_byte(path: str) -> float:
    """Time open(O_WRONLY) + 1-byte write at offset 0 + close: the first write copies the file up.

    The byte written is the one already there, so the plain copy's content never changes.
    """
    with open(path, "rb") as file:
        first = file.read(1)
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, first, 0)
    os.close(fd)
    return time.perf_counter() - start


def chmod(path: str, mode: str) -> float:
    start = time.perf_counter()
    os.chmod(path, int(mode, 8))
    return time.perf_counter() - start


def create_files(directory: str, count: str) -> float:
    """Time creating `count` 100-byte files (create, write, close) in subdirs of 100 files each."""
    total = int(count)
    start = time.perf_counter()
    os.makedirs(directory)
    for index in range(total):
        subdir = os.path.join(directory, f"d{index // FILES_PER_DIR:04d}")
        if index % FILES_PER_DIR == 0:
            os.mkdir(subdir)
        fd = os.open(os.path.join(subdir, f"f{index:05d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, SMALL_FILE)
        os.close(fd)
    return time.perf_counter() - start


OPS: dict[str, Callable[..., float]] = {
    "stat": stat_paths,
    "write-first-byte": write_first_byte,
    "chmod": chmod,
    "create": create_files,
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in OPS:
        sys.exit(f"usage: python -m benchmarks.ops {{{','.join(OPS)}}} ARGS...")
    seconds = OPS[argv[0]](*argv[1:])
    print(repr(seconds))


if __name__ == "__main__":
    main(sys.argv[1:])
