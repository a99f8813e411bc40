"""The workloads, grouped by the mount they run on; `groups(spec)` lists them in table order.

A group is one fresh mount (a fresh upper dir for the overlays) and the measurements taken on it,
in order. Read groups start cold: caches dropped before the mount (so the mount time is cold too)
and again after it, so that nothing the mount command read is still cached. Write groups start
from a warm page cache for the lower data they touch, read straight from the lowers, so that they
measure the filesystem's own work rather than the disk; writeback is flushed before the clock
starts and the time stops when the operation returns (no trailing sync: a system that fsyncs
inside the operation pays for it, as its users do).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.checkout import REPO
from benchmarks.extents import allocation, used_bytes
from benchmarks.filesystems import KINDS as FILESYSTEM_KINDS
from benchmarks.folios import folio_sizes
from benchmarks.layers import (
    BIG_FILE,
    DB_DIR,
    DB_FILE,
    PYTHON,
    RM_TREE,
    SPARSE_FILE,
    TREE,
    Layers,
    TreeSpec,
    size_name,
    sized_file,
)
from benchmarks.procs import run_op, timed, timed_shell

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from benchmarks.systems import Root

CREATE_DIR = f"{TREE}/usr/share/bench-create"  # under a lower dir: its parents get copied up
FSYNC_DIR = f"{TREE}/usr/share/bench-fsync"
UNTAR_DIR = "untar"
RANDOM_SEED = 6  # the same offsets on every system and every run
FOLIO_SAMPLE = 64 << 20  # bytes of the big file whose folios are counted after the warm read
CHOWN_OWNER = "65534:65534"  # nobody:nogroup, numeric: no name lookup inside the timing


@dataclass(frozen=True, slots=True)
class Measure:
    key: str
    label: str  # may name counts from the layer facts, e.g. {tree_entries}
    run: Callable[[Path, Layers], float]
    # Facts to record after the run (e.g. blocks allocated to the upper copy), from the root.
    check: Callable[[Root], dict[str, object]] | None = None
    # Facts taken just before the clock starts, recorded with the check's (e.g. space in use).
    before: Callable[[Root], dict[str, object]] | None = None


@dataclass(frozen=True, slots=True)
class Group:
    key: str
    measures: tuple[Measure, ...]
    cold: bool = False  # drop caches before and after mounting
    record_mount: bool = False  # report the (cold) mount command's duration
    changes: tuple[str, ...] | None = None  # paths the group changes; None: it only reads
    warm: tuple[str, ...] = ()  # lower paths to bring into the page cache first
    # The loop-mounted filesystem (one of `benchmarks.filesystems.KINDS`) that holds the group's
    # lower and scratch dir; None: the cache dir's own, with the full layers.
    filesystem: str | None = None
    checkout: bool = False  # reads the git checkout (benchmarks.checkout), not the main layers


MOUNT_KEY = "mount"
MOUNT_LABEL = "mount (cold caches)"


def _find(root: Path, layers: Layers) -> float:
    return timed(["find", str(root)])


def _stat_warm(root: Path, layers: Layers) -> float:
    return run_op("stat", str(root), str(layers.stat_list))


def _stat_cold(root: Path, layers: Layers) -> float:
    return run_op("stat-cold", str(root), str(layers.stat_list))


def _ls(root: Path, layers: Layers) -> float:
    # -l: every entry is stat'ed (and symlinks read) besides being listed.
    return timed(["ls", "-lR", str(root)])


def _read_tree(root: Path, layers: Layers) -> float:
    # GNU tar skips reading file data when its archive is /dev/null; a pipe makes it read it all.
    return timed_shell('tar -C "$1" -cf - . | cat > /dev/null', str(root / TREE))


def _read_big(root: Path, layers: Layers) -> float:
    return timed(["dd", f"if={root / BIG_FILE}", "of=/dev/null", "bs=1M", "status=none"])


def _read_parallel(root: Path, layers: Layers) -> float:
    # Each reader in a subshell of its own; the script fails if any of them does.
    script = ('root=$1; shift; for list; do (tar -C "$root" --null --no-recursion -T "$list" '
              '-cf - | cat > /dev/null) & done; status=0; '
              'for job in $(jobs -p); do wait "$job" || status=1; done; exit $status')
    return timed_shell(script, str(root / TREE), *(str(path) for path in layers.read_lists))


def _python_imports(root: Path, layers: Layers) -> float:
    # -I: nothing from the environment or the user's site dir; -B: no .pyc written (the
    # image's own are read); the interpreter finds its library next to itself, in the mount.
    return timed([str(root / PYTHON), "-I", "-B", "-c", "import email, json, http.client"])


def _git_status(root: Path, layers: Layers) -> float:
    return timed(["git", "-C", str(root / REPO), "status", "--porcelain"])


def _random_reads(root: Path, layers: Layers) -> float:
    return run_op("random-read", str(root / BIG_FILE), str(layers.spec.random_reads),
                  str(RANDOM_SEED))


def _copy_up(root: Path, layers: Layers) -> float:
    return run_op("write-first-byte", str(root / BIG_FILE))


def _copy_up_of(path: str) -> Callable[[Path, Layers], float]:
    def copy_up(root: Path, layers: Layers) -> float:
        return run_op("write-first-byte", str(root / path))

    return copy_up


def _sparse_blocks(root: Root) -> dict[str, object]:
    """What the sparse file's copy occupies after the first write: in the upper dir (the copy
    itself; for the plain dir, the file) and as `stat` reports it through the mount."""
    found: dict[str, object] = {}
    for where, base in (("stored", root.upper or root.path), ("through_mount", root.path)):
        try:
            stat = os.lstat(base / SPARSE_FILE)
        except FileNotFoundError:
            found[f"{where}_allocated_bytes"] = None
        else:
            found[f"{where}_allocated_bytes"] = stat.st_blocks * 512
            found["size"] = stat.st_size
    return found


def _space_before(root: Root) -> dict[str, object]:
    return {"fs_used_bytes_before": used_bytes(str(root.upper or root.path))}


def _clone_check(root: Root) -> dict[str, object]:
    """Was the big file's copy a clone? Its extents shared with the lower file, and the space the
    filesystem took during the copy-up (with `_space_before`): after a sync, since a copy nobody
    fsynced may still be in the page cache. The plain dir's copy was made before the clock
    started, by `cp -a` (a reflink where it can be): its growth is the first write alone."""
    os.sync()
    copy = (root.upper or root.path) / BIG_FILE
    found: dict[str, object] = {"fs_used_bytes_after": used_bytes(str(root.upper or root.path)),
                                "copy_found": copy.is_file()}
    if found["copy_found"]:
        try:
            found.update(allocation(str(copy)))
        except OSError as exc:  # no FIEMAP here: the used space still tells
            found["fiemap_error"] = str(exc)
    return found


def _big_folios(root: Root) -> dict[str, object]:
    """The folios holding the big file's first 64 MiB in the page cache, seen through the root
    (a FUSE mount's own cache; the lower file's for the kernel's overlayfs): see `folios`."""
    return {"folios_first_64MiB": folio_sizes(str(root.path / BIG_FILE), FOLIO_SAMPLE)}


def _chmod_big(root: Path, layers: Layers) -> float:
    return run_op("chmod", str(root / BIG_FILE), "600")


def _create(root: Path, layers: Layers) -> float:
    return run_op("create", str(root / CREATE_DIR), str(layers.spec.create_count))


def _create_fsync(root: Path, layers: Layers) -> float:
    return run_op("create", str(root / FSYNC_DIR), str(layers.spec.fsync_count), "yes")


def _untar(root: Path, layers: Layers) -> float:
    (root / UNTAR_DIR).mkdir()
    return timed(["tar", "-xf", str(layers.untar_archive), "-C", str(root / UNTAR_DIR)])


def _rm_rf(root: Path, layers: Layers) -> float:
    return timed(["rm", "-rf", str(root / RM_TREE)])


def _chmod_tree(root: Path, layers: Layers) -> float:
    # o-rwx changes every file's and directory's mode; chmod -R never follows symlinks.
    return timed(["chmod", "-R", "o-rwx", str(root / RM_TREE)])


def _chown_tree(root: Path, layers: Layers) -> float:
    # chown -R without -H/-L changes symlinks themselves (lchown), never what they point at.
    return timed(["chown", "-R", CHOWN_OWNER, str(root / RM_TREE)])


def _sqlite(root: Path, layers: Layers) -> float:
    return run_op("sqlite-rewrite", str(root / DB_FILE))


def groups(spec: TreeSpec) -> tuple[Group, ...]:
    """Every group, in run and table order, for the layers built from `spec`."""
    return _READ_GROUPS + _copy_up_groups(spec) + _WRITE_GROUPS


def copy_up_points(layers: Layers) -> dict[str, int]:
    """Copy-up row key → the size of the (dense) file it writes to, smallest first."""
    points = {_copy_up_key(size): size for size in layers.spec.copy_up_sizes}
    points["copy_up"] = layers.spec.big_size
    return points


def select(all_groups: Iterable[Group], patterns: Iterable[str]) -> tuple[Group, ...]:
    """The groups named by a pattern (fnmatch) matching the group's key or one of its rows."""
    wanted = list(patterns)
    return tuple(
        group for group in all_groups
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in wanted
               for name in (group.key, *keys_of(group)))
    )


def keys_of(group: Group) -> list[str]:
    """The row keys a group reports: its measures, and the mount time if it records it."""
    return [MOUNT_KEY] * group.record_mount + [measure.key for measure in group.measures]


def filesystem_key(kind: str) -> str:
    """The group and row key of the big file's copy-up on a loop-mounted `kind`."""
    return f"copy_up_{kind}"


def _copy_up_key(size: int) -> str:
    return "copy_up_" + size_name(size).replace(" ", "")


def _copy_up_groups(spec: TreeSpec) -> tuple[Group, ...]:
    """One group per size (each a fresh mount with only its own file warm), then the big file
    (row key `copy_up`, as before the sizes were added), the big file again on each loop-mounted
    filesystem (`copy_up_xfs` ...: a clone or a copy), then the sparse file."""
    sized = tuple(
        Group(
            _copy_up_key(size),
            changes=(sized_file(size),),
            warm=(sized_file(size),),
            measures=(Measure(_copy_up_key(size),
                              f"first write to {size_name(size)} file (copy-up)",
                              _copy_up_of(sized_file(size))),),
        )
        for size in spec.copy_up_sizes
    )
    return (
        *sized,
        Group(
            "copy_up",
            changes=(BIG_FILE,),
            warm=(BIG_FILE,),
            measures=(Measure("copy_up", "first write to {big_size} file (copy-up)", _copy_up),),
        ),
        *(
            Group(
                filesystem_key(kind),
                changes=(BIG_FILE,),
                warm=(BIG_FILE,),
                filesystem=kind,
                measures=(Measure(filesystem_key(kind),
                                  f"first write to the {{big_size}} file on {kind} (copy-up)",
                                  _copy_up, check=_clone_check, before=_space_before),),
            )
            for kind in FILESYSTEM_KINDS
        ),
        Group(
            "copy_up_sparse",
            changes=(SPARSE_FILE,),
            warm=(SPARSE_FILE,),
            measures=(Measure("copy_up_sparse",
                              "first write to sparse {sparse_size} file ({sparse_data} of data)",
                              _copy_up_of(SPARSE_FILE), check=_sparse_blocks),),
        ),
    )


_READ_GROUPS: tuple[Group, ...] = (
    Group(
        "walk",
        cold=True,
        record_mount=True,
        measures=(
            Measure("walk_cold", "walk cold (`find`, {merged_entries} entries)", _find),
            Measure("walk_warm", "walk warm (`find`)", _find),
            Measure("stat_warm", "stat {stat_paths} paths warm", _stat_warm),
        ),
    ),
    Group(
        "stat_cold",
        cold=True,
        measures=(Measure("stat_cold", "stat {stat_paths} paths cold", _stat_cold),),
    ),
    Group(
        "ls",
        cold=True,
        measures=(
            Measure("ls_cold", "`ls -lR` cold", _ls),
            Measure("ls_warm", "`ls -lR` warm", _ls),
        ),
    ),
    Group(
        "read_tree",
        cold=True,
        measures=(
            Measure("read_tree_cold", "read every file cold (`tar`, {tree_mib} MiB)", _read_tree),
            Measure("read_tree_warm", "read every file warm (`tar`)", _read_tree),
        ),
    ),
    Group(
        "read_parallel",
        cold=True,
        measures=(
            Measure("read_parallel_cold", "{parallel_readers} readers at once, each walking and "
                    "reading its quarter of the tree's files, cold (`tar`)", _read_parallel),
        ),
    ),
    Group(
        "read_big",
        cold=True,
        measures=(
            Measure("read_big_cold", "read {big_mib} MiB file cold (`dd`)", _read_big),
            Measure("read_big_warm", "read {big_mib} MiB file warm (`dd`)", _read_big,
                    check=_big_folios),
        ),
    ),
    Group(
        "read_random",
        cold=True,
        measures=(
            Measure("read_random_cold",
                    "{random_reads} random 4 KiB reads of {big_size} file cold", _random_reads),
            Measure("read_random_warm", "the same reads warm", _random_reads),
        ),
    ),
    Group(
        "python",
        cold=True,
        measures=(
            Measure("python_cold", "`python3 -c 'import email, json, http.client'`, "
                    "the interpreter and its library in the mount, cold", _python_imports),
            Measure("python_warm", "the same start-up warm", _python_imports),
        ),
    ),
    Group(
        "git_status",
        cold=True,
        checkout=True,
        changes=(REPO,),  # the first `git status` rewrites the index
        measures=(
            Measure("git_status_cold", "`git status` in a checkout of {checkout_files} files "
                    "on a lower, cold", _git_status),
            Measure("git_status_warm", "`git status` again, warm", _git_status),
        ),
    ),
)

_WRITE_GROUPS: tuple[Group, ...] = (
    Group(
        "chmod_big",
        changes=(BIG_FILE,),
        warm=(BIG_FILE,),
        measures=(Measure("chmod_big", "chmod {big_mib} MiB file", _chmod_big),),
    ),
    Group(
        "create",
        changes=(),
        measures=(Measure("create", "create {create_files} files of 100 B", _create),),
    ),
    Group(
        "create_fsync",
        changes=(),
        measures=(Measure("create_fsync", "create, write, fsync {fsync_files} files of 100 B",
                          _create_fsync),),
    ),
    Group(
        "untar",
        changes=(),
        measures=(Measure("untar", "untar {untar_files} files", _untar),),
    ),
    Group(
        "rm_rf",
        changes=(RM_TREE,),
        warm=(RM_TREE,),
        measures=(Measure("rm_rf", "rm -rf lower tree ({rm_tree_entries} entries)", _rm_rf),),
    ),
    Group(
        "chmod_tree",
        changes=(RM_TREE,),
        warm=(RM_TREE,),
        measures=(Measure("chmod_tree", "chmod -R lower tree", _chmod_tree),),
    ),
    Group(
        "chown_tree",
        changes=(RM_TREE,),
        warm=(RM_TREE,),
        measures=(Measure("chown_tree", "chown -R lower tree", _chown_tree),),
    ),
    Group(
        "sqlite",
        changes=(DB_DIR,),  # the dir: SQLite creates its rollback journal beside the database
        warm=(DB_DIR,),
        measures=(Measure("sqlite", "SQLite: rewrite every row of a {sqlite_mb} MB lower "
                          "database ({sqlite_rows} rows, one transaction)", _sqlite),),
    ),
)


def row_labels(layers: Layers, selected: Iterable[Group]) -> dict[str, str]:
    """Workload key → table label with this build's counts filled in, in table order."""
    facts = dict(layers.facts)
    facts["tree_mib"] = round(int(str(facts["tree_bytes"])) / (1 << 20))
    facts["big_mib"] = int(str(facts["big_file_bytes"])) >> 20
    facts["big_size"] = size_name(int(str(facts["big_file_bytes"])))
    facts["sparse_size"] = size_name(int(str(facts["sparse_bytes"])))
    facts["sparse_data"] = size_name(int(str(facts["sparse_data_bytes"])))
    facts["sqlite_mb"] = round(int(str(facts["sqlite_bytes"])) / 1e6)
    facts["checkout_files"] = layers.spec.checkout_files
    counts = {key: f"{value:,}" if isinstance(value, int) else value
              for key, value in facts.items()}
    labels = {}
    for group in selected:
        if group.record_mount:
            labels[MOUNT_KEY] = MOUNT_LABEL
        for measure in group.measures:
            labels[measure.key] = measure.label.format(**counts)
    return labels
