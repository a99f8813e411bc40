"""The benchmark's input: two lower layers cut from this host's OS tree, built once and cached.

Owns everything under `CACHE/layers-<spec>-v<N>/`:

    lower0/            bottom layer: tree/usr/share, tree/etc ..., rmtree/ (the rm -rf victim),
                       sizes/*.bin (one file per copy-up size below the big file), sparse/sparse.bin
                       (a sparse file: a few MiB of data, the rest holes) and db/bench.sqlite
    lower1/            top layer: tree/usr/include, tree/usr/bin ..., tree/usr/share/man (shadowing
                       the bottom's copy, so that merged directories span both layers), big/big.bin
    plain/             the merged tree as a plain directory (the floor), made by copying the bottom
                       and then the top over it (the lowers hold no whiteouts, so that is the merge)
    untar.tar          regular files to unpack in the untar workload
    stat-paths         NUL-separated relative paths for the stat workload, spread over the tree
    read-list.0 ...    the tree's files (not directories) in sorted order, cut into one
                       contiguous part per parallel reader
    READY              JSON facts about the build; written last, so a directory without it is a
                       build that was cut short and is rebuilt from scratch

The layers are only ever read after the build (the kernel's overlayfs requires lowers not to change
while mounted), so every system shares them; what a workload changes goes to a fresh upper dir.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.procs import run

if TYPE_CHECKING:
    from collections.abc import Iterator

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
# Bump when the layout or the content changes: a new version builds a new cache dir.
LAYOUT_VERSION = 3

# Paths inside every layer, the merged mount and the plain copy.
TREE = "tree"
BIG_FILE = "big/big.bin"
RM_TREE = "rmtree"
SIZES_DIR = "sizes"
SPARSE_FILE = "sparse/sparse.bin"
SPARSE_CHUNK = MiB  # the data extents of the sparse file, 4 of them (at 0, 1/4, 1/2, the end)
DB_DIR = "db"
DB_FILE = "db/bench.sqlite"
PYTHON = "tree/usr/bin/python3.11"  # with tree/usr/lib/python3.11: an interpreter in the image
PARALLEL_READERS = 4


@dataclass(frozen=True, slots=True)
class TreeSpec:
    """What to copy where. Sources missing on this host are skipped and listed in the facts."""

    name: str
    bottom: tuple[tuple[str, str], ...]  # (host directory, path inside the layer)
    top: tuple[tuple[str, str], ...]
    rm_source: str
    big_size: int
    stat_count: int
    untar_source: str
    untar_count: int
    create_count: int
    copy_up_sizes: tuple[int, ...]  # files in sizes/ (the big file is the largest point)
    sparse_size: int
    random_reads: int  # 4 KiB preads of the big file
    fsync_count: int  # files created, written and fsynced
    sqlite_rows: int  # about 100 bytes each
    checkout_files: int  # in the git checkout of the `git status` rows (benchmarks.checkout)


FULL = TreeSpec(
    name="full",
    bottom=(("/usr/share", "tree/usr/share"), ("/etc", "tree/etc")),
    top=(
        ("/usr/include", "tree/usr/include"),
        ("/usr/lib/python3", "tree/usr/lib/python3"),
        ("/usr/lib/python3.11", "tree/usr/lib/python3.11"),
        ("/usr/bin", "tree/usr/bin"),
        ("/usr/sbin", "tree/usr/sbin"),
        ("/usr/share/man", "tree/usr/share/man"),
    ),
    rm_source="/usr/share/doc",
    big_size=1024 * MiB,
    stat_count=50_000,
    untar_source="/usr/include",
    untar_count=5_000,
    create_count=10_000,
    copy_up_sizes=(4 * KiB, 64 * KiB, MiB, 16 * MiB, 256 * MiB),
    sparse_size=4 * GiB,
    random_reads=20_000,
    fsync_count=10_000,
    sqlite_rows=1_000_000,
    checkout_files=50_000,
)

QUICK = TreeSpec(
    name="quick",
    bottom=(("/usr/share/doc", "tree/usr/share/doc"), ("/etc", "tree/etc")),
    top=(
        ("/usr/include", "tree/usr/include"),
        ("/usr/share/man/man1", "tree/usr/share/man/man1"),
        ("/usr/lib/python3.11", "tree/usr/lib/python3.11"),
        ("/usr/bin/python3.11", PYTHON),
    ),
    rm_source="/usr/share/doc",
    big_size=256 * MiB,
    stat_count=50_000,
    untar_source="/usr/include",
    untar_count=5_000,
    create_count=10_000,
    copy_up_sizes=(4 * KiB, 64 * KiB, MiB, 16 * MiB),
    sparse_size=GiB,
    random_reads=5_000,
    fsync_count=2_000,
    sqlite_rows=100_000,
    checkout_files=10_000,
)


def size_name(size: int) -> str:
    """`4 KiB`, `16 MiB`, `1 GiB`: for labels and file names (with the space dropped)."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def sized_file(size: int) -> str:
    """The path of the copy-up file of `size` bytes, inside lower0 and the merged tree."""
    return f"{SIZES_DIR}/{size_name(size).replace(' ', '')}.bin"


@dataclass(frozen=True, slots=True)
class Layers:
    root: Path
    lowers: tuple[Path, ...]  # top first, the order of lowerdir=
    plain: Path
    untar_archive: Path
    stat_list: Path
    read_lists: tuple[Path, ...]  # one per parallel reader
    spec: TreeSpec
    facts: dict[str, object]

    def lowerdir_option(self) -> str:
        return ":".join(str(lower) for lower in self.lowers)


def ensure_layers(cache_dir: Path, spec: TreeSpec) -> Layers:
    """Return the cached layers for `spec`, building them first if no complete build exists."""
    root = cache_dir / f"layers-{spec.name}-v{LAYOUT_VERSION}"
    if not (root / "READY").exists():
        _build(root, spec)
    facts = json.loads((root / "READY").read_text())
    return Layers(
        root=root,
        lowers=(root / "lower1", root / "lower0"),
        plain=root / "plain",
        untar_archive=root / "untar.tar",
        stat_list=root / "stat-paths",
        read_lists=tuple(root / f"read-list.{index}" for index in range(PARALLEL_READERS)),
        spec=spec,
        facts=facts,
    )


def _build(root: Path, spec: TreeSpec) -> None:
    # Build beside the final name and rename at the end, so a cut-short build is never used.
    partial = root.with_name(root.name + ".partial")
    for stale in (partial, root):
        if stale.exists():
            shutil.rmtree(stale)
    started = time.perf_counter()
    print(f"building layers in {root} (once; cached for later runs)...", flush=True)
    lower0, lower1 = partial / "lower0", partial / "lower1"
    skipped = _copy_sources(lower0, spec.bottom) + _copy_sources(lower1, spec.top)
    _copy(spec.rm_source, lower0 / RM_TREE)
    _write_big_file(lower1 / BIG_FILE, spec.big_size)
    for size in spec.copy_up_sizes:
        _write_big_file(lower0 / sized_file(size), size)
    _write_sparse_file(lower0 / SPARSE_FILE, spec.sparse_size)
    _write_database(lower0 / DB_FILE, spec.sqlite_rows)
    plain = partial / "plain"
    plain.mkdir()
    for lower in (lower0, lower1):  # bottom first: the top's files overwrite the bottom's
        run(["cp", "-a", f"{lower}/.", f"{plain}/"])
    stat_count = _write_stat_list(plain, partial / "stat-paths", spec.stat_count)
    untar_count = _write_untar_archive(spec, partial)
    parallel_files = _write_read_lists(plain, partial)
    facts = {
        "spec": spec.name,
        "lower0_entries": _count_entries(lower0),
        "lower1_entries": _count_entries(lower1),
        "merged_entries": _count_entries(plain),
        "tree_entries": _count_entries(plain / TREE),
        "tree_bytes": _count_bytes(plain / TREE),
        "rm_tree_entries": _count_entries(plain / RM_TREE),
        "rm_tree_files": _count_files(plain / RM_TREE),
        "big_file_bytes": spec.big_size,
        "stat_paths": stat_count,
        "untar_files": untar_count,
        "parallel_readers": PARALLEL_READERS,
        "parallel_files": parallel_files,
        "python": (plain / PYTHON).exists(),
        "create_files": spec.create_count,
        "copy_up_sizes": list(spec.copy_up_sizes),
        "sparse_bytes": spec.sparse_size,
        "sparse_data_bytes": 4 * SPARSE_CHUNK,
        "sparse_allocated_bytes": (lower0 / SPARSE_FILE).stat().st_blocks * 512,
        "random_reads": spec.random_reads,
        "fsync_files": spec.fsync_count,
        "sqlite_rows": spec.sqlite_rows,
        "sqlite_bytes": (lower0 / DB_FILE).stat().st_size,
        "skipped_sources": skipped,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (partial / "READY").write_text(json.dumps(facts, indent=2) + "\n")
    run(["sync"])
    partial.rename(root)
    print(f"layers built in {facts['build_seconds']} s", flush=True)


def _copy_sources(layer: Path, sources: tuple[tuple[str, str], ...]) -> list[str]:
    layer.mkdir(parents=True)
    skipped = []
    for source, inside in sources:
        if Path(source).exists():
            _copy(source, layer / inside)
        else:
            skipped.append(source)
    return skipped


def _copy(source: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    run(["cp", "-a", source, str(destination)])


def _write_big_file(path: Path, size: int) -> None:
    """Write `size` bytes of random-looking, incompressible data, with no holes.

    Each MiB is a window into an 8 MiB random pool at a shifting offset: neighbouring blocks
    differ, and urandom is paid for 8 MiB instead of the whole file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    pool = memoryview(os.urandom(8 * MiB))
    with path.open("wb") as file:
        for block in range(-(-size // MiB)):  # the last block may be short (the 4 KiB file)
            offset = (block * 7919 * 4096) % (len(pool) - MiB)
            file.write(pool[offset : offset + min(MiB, size - block * MiB)])
    path.chmod(0o644)


def _write_sparse_file(path: Path, size: int) -> None:
    """`size` bytes of which four SPARSE_CHUNK extents hold random data; the rest are holes.

    The last extent ends the file, so its size needs no truncate (which some copies lose).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        for offset in (0, size // 4, size // 2, size - SPARSE_CHUNK):
            file.seek(offset)
            file.write(os.urandom(SPARSE_CHUNK))
    path.chmod(0o644)


def _write_database(path: Path, rows: int) -> None:
    """A SQLite database with one table `t(id INTEGER PRIMARY KEY, v TEXT)` of ~100-byte rows.

    Built without a journal (a cut-short build is rebuilt anyway); the file is left in the
    default rollback-journal mode, which is what the rewrite workload runs under.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = OFF")
        connection.execute("PRAGMA synchronous = OFF")
        connection.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        connection.execute("BEGIN")
        connection.executemany(
            "INSERT INTO t (id, v) VALUES (?, ?)",
            ((index, f"row {index:09d} " * 6 + f"{index * 2654435761 % (1 << 32):08x}")
             for index in range(rows)),
        )
        connection.execute("COMMIT")
    finally:
        connection.close()
    path.chmod(0o644)


def _write_stat_list(plain: Path, destination: Path, count: int) -> int:
    """Pick `count` paths spread evenly over the sorted tree (all of them if there are fewer)."""
    paths = sorted(os.path.relpath(path, plain) for path in _walk(plain / TREE))
    if len(paths) > count:
        paths = [paths[index * len(paths) // count] for index in range(count)]
    destination.write_bytes(b"\0".join(os.fsencode(path) for path in paths))
    return len(paths)


def _write_read_lists(plain: Path, destination: Path) -> int:
    """The tree's non-directories, sorted (a reader walks a region of the tree, as a build job
    does), cut into PARALLEL_READERS contiguous lists of paths relative to the tree."""
    tree = plain / TREE
    files = sorted(os.fsencode(os.path.relpath(path, tree)) for path in _walk(tree)
                   if not path.is_dir() or path.is_symlink())
    for index in range(PARALLEL_READERS):
        part = files[index * len(files) // PARALLEL_READERS:
                     (index + 1) * len(files) // PARALLEL_READERS]
        (destination / f"read-list.{index}").write_bytes(b"\0".join(part))
    return len(files)


def _write_untar_archive(spec: TreeSpec, destination: Path) -> int:
    files = sorted(
        path
        for path in _walk(Path(spec.untar_source))
        if path.is_file() and not path.is_symlink()
    )[: spec.untar_count]
    listing = destination / "untar.list"
    listing.write_bytes(b"\0".join(os.fsencode(path.relative_to("/")) for path in files))
    run(["tar", "-cf", str(destination / "untar.tar"), "-C", "/", "--null", "-T", str(listing)])
    listing.unlink()
    return len(files)


def _walk(top: Path) -> Iterator[Path]:
    """Every entry below `top` (not `top` itself), without following symlinks."""
    for directory, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            yield Path(directory, name)


def _count_entries(top: Path) -> int:
    return sum(1 for _ in _walk(top))


def _count_files(top: Path) -> int:
    return sum(1 for path in _walk(top) if path.is_file() and not path.is_symlink())


def _count_bytes(top: Path) -> int:
    return sum(
        path.lstat().st_size for path in _walk(top) if path.is_file() and not path.is_symlink()
    )
