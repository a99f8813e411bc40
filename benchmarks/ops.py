"""Workloads that no stock tool does exactly, run as `python -m benchmarks.ops OP ARGS...`.

Each op does its untimed preparation, times only the operation with `perf_counter` and prints the
seconds on the last line of stdout. It runs in a child so that the parent can enforce a timeout
and kill it when a FUSE daemon hangs, and so that nothing in the parent holds a mount busy.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

SMALL_FILE = b"x" * 99 + b"\n"  # 100 bytes, the size of a typical config or marker file
FILES_PER_DIR = 100  # spread created files like a package install does, not one huge directory
READ_SIZE = 4096  # random reads: one page at a page-aligned offset


def stat_paths(root: str, listing: str) -> float:
    """lstat every listed path once to warm the caches, then time a second pass.

    lstat, not stat: the tree's symlinks point at absolute host paths outside the mount.
    Raises FileNotFoundError if a path is missing: the mount must show the whole merged tree.
    """
    paths = _read_listing(root, listing)
    for path in paths:
        os.lstat(path)
    return _time_lstat(paths)


def stat_paths_cold(root: str, listing: str) -> float:
    """Time one lstat pass over the listed paths, as they come (the caller dropped the caches)."""
    return _time_lstat(_read_listing(root, listing))


def _read_listing(root: str, listing: str) -> list[bytes]:
    with open(listing, "rb") as file:
        return [os.path.join(os.fsencode(root), path) for path in file.read().split(b"\0")]


def _time_lstat(paths: list[bytes]) -> float:
    start = time.perf_counter()
    for path in paths:
        os.lstat(path)
    return time.perf_counter() - start


def random_reads(path: str, count: str, seed: str) -> float:
    """Time `count` 4 KiB preads at page-aligned offsets drawn with a fixed seed.

    The same seed gives the same offsets on every system and in the warm pass that follows the
    cold one. Raises OSError on a short read: the mount must return the lower file's data.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = os.fstat(fd).st_size // READ_SIZE
        draw = random.Random(int(seed))
        offsets = [draw.randrange(pages) * READ_SIZE for _ in range(int(count))]
        start = time.perf_counter()
        for offset in offsets:
            if len(os.pread(fd, READ_SIZE, offset)) != READ_SIZE:
                raise OSError(f"{path}: short read at {offset}")
        return time.perf_counter() - start
    finally:
        os.close(fd)


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


def create_files(directory: str, count: str, fsync: str = "no") -> float:
    """Time creating `count` 100-byte files (create, write, [fsync,] close) in subdirs of 100
    files each; `fsync` is "yes" to fsync every file before closing it, as a package manager or
    a database does."""
    total, durable = int(count), fsync == "yes"
    start = time.perf_counter()
    os.makedirs(directory)
    for index in range(total):
        subdir = os.path.join(directory, f"d{index // FILES_PER_DIR:04d}")
        if index % FILES_PER_DIR == 0:
            os.mkdir(subdir)
        fd = os.open(os.path.join(subdir, f"f{index:05d}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        os.write(fd, SMALL_FILE)
        if durable:
            os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - start


def sqlite_rewrite(path: str) -> float:
    """Time an in-place rewrite of every row of the database's table `t` in one transaction.

    The clock covers opening the database (on an overlay the first open for writing copies
    the file up), the UPDATE and its COMMIT (rollback journal, synchronous=FULL: the defaults,
    which fsync) and the close. Raises ValueError if the rewrite did not land.
    """
    start = time.perf_counter()
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN")
        connection.execute("UPDATE t SET v = v || 'x'")
        connection.execute("COMMIT")
    finally:
        connection.close()
    seconds = time.perf_counter() - start
    check = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = check.execute("SELECT v FROM t ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        check.close()
    if row is None or not str(row[0]).endswith("x"):
        raise ValueError(f"{path}: the rewrite is not visible after COMMIT")
    return seconds


OPS: dict[str, Callable[..., float]] = {
    "stat": stat_paths,
    "stat-cold": stat_paths_cold,
    "random-read": random_reads,
    "sqlite-rewrite": sqlite_rewrite,
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
