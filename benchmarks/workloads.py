"""The workloads, grouped by the mount they run on.

A group is one fresh mount (a fresh upper dir for the overlays) and the measurements taken on it,
in order. Read groups start cold: caches dropped before the mount (so the mount time is cold too)
and again after it, so that nothing the mount command read is still cached. Write groups start
from a warm page cache for the lower data they touch, read straight from the lowers, so that they
measure the filesystem's own work rather than the disk; writeback is flushed before the clock
starts and the time stops when the operation returns (no trailing sync: a system that fsyncs
inside the operation pays for it, as its users do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks.layers import BIG_FILE, RM_TREE, TREE, Layers
from benchmarks.procs import run_op, timed, timed_shell

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

CREATE_DIR = f"{TREE}/usr/share/bench-create"  # under a lower dir: its parents get copied up
UNTAR_DIR = "untar"


@dataclass(frozen=True, slots=True)
class Measure:
    key: str
    label: str  # may name counts from the layer facts, e.g. {tree_entries}
    run: Callable[[Path, Layers], float]


@dataclass(frozen=True, slots=True)
class Group:
    key: str
    measures: tuple[Measure, ...]
    cold: bool = False  # drop caches before and after mounting
    record_mount: bool = False  # report the (cold) mount command's duration
    changes: tuple[str, ...] | None = None  # paths the group changes; None: it only reads
    warm: tuple[str, ...] = ()  # lower paths to bring into the page cache first


MOUNT_KEY = "mount"
MOUNT_LABEL = "mount (cold caches)"


def _find(root: Path, layers: Layers) -> float:
    return timed(["find", str(root)])


def _stat_warm(root: Path, layers: Layers) -> float:
    return run_op("stat", str(root), str(layers.stat_list))


def _read_tree(root: Path, layers: Layers) -> float:
    # GNU tar skips reading file data when its archive is /dev/null; a pipe makes it read it all.
    return timed_shell('tar -C "$1" -cf - . | cat > /dev/null', str(root / TREE))


def _read_big(root: Path, layers: Layers) -> float:
    return timed(["dd", f"if={root / BIG_FILE}", "of=/dev/null", "bs=1M", "status=none"])


def _copy_up(root: Path, layers: Layers) -> float:
    return run_op("write-first-byte", str(root / BIG_FILE))


def _chmod_big(root: Path, layers: Layers) -> float:
    return run_op("chmod", str(root / BIG_FILE), "600")


def _create(root: Path, layers: Layers) -> float:
    return run_op("create", str(root / CREATE_DIR), str(layers.spec.create_count))


def _untar(root: Path, layers: Layers) -> float:
    (root / UNTAR_DIR).mkdir()
    return timed(["tar", "-xf", str(layers.untar_archive), "-C", str(root / UNTAR_DIR)])


def _rm_rf(root: Path, layers: Layers) -> float:
    return timed(["rm", "-rf", str(root / RM_TREE)])


def _chmod_tree(root: Path, layers: Layers) -> float:
    # o-rwx changes every file's and directory's mode; chmod -R never follows symlinks.
    return timed(["chmod", "-R", "o-rwx", str(root / RM_TREE)])


GROUPS: tuple[Group, ...] = (
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
        "read_tree",
        cold=True,
        measures=(
            Measure("read_tree_cold", "read every file cold (`tar`, {tree_mib} MiB)", _read_tree),
        ),
    ),
    Group(
        "read_big",
        cold=True,
        measures=(
            Measure("read_big_cold", "read {big_mib} MiB file cold (`dd`)", _read_big),
            Measure("read_big_warm", "read {big_mib} MiB file warm (`dd`)", _read_big),
        ),
    ),
    Group(
        "copy_up",
        changes=(BIG_FILE,),
        warm=(BIG_FILE,),
        measures=(Measure("copy_up", "first write to {big_mib} MiB file (copy-up)", _copy_up),),
    ),
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
)


def row_labels(layers: Layers) -> dict[str, str]:
    """Workload key → table label with this build's counts filled in, in table order."""
    facts = dict(layers.facts)
    facts["tree_mib"] = round(int(str(facts["tree_bytes"])) / (1 << 20))
    facts["big_mib"] = int(str(facts["big_file_bytes"])) >> 20
    counts = {key: f"{value:,}" if isinstance(value, int) else value
              for key, value in facts.items()}
    labels = {MOUNT_KEY: MOUNT_LABEL}
    for group in GROUPS:
        for measure in group.measures:
            labels[measure.key] = measure.label.format(**counts)
    return labels
