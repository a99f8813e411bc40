"""`python -m benchmarks overlay`: the copy-on-write benchmark, every system over the same layers.

Order of work: check that every selected system can run (refuse otherwise, naming the fix), take
the cache dir's lock, build or reuse the layers, then for each run, each workload group and each
system (rotated per run, so that no system is always first after a cache drop) mount, measure and
unmount. A group that fails is recorded and the benchmark goes on; its ExitStack has already
unmounted what it mounted and stopped the daemons it started. Anything left mounted under the run
dir at the end is an error.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import mounts, report
from benchmarks.layers import BIG_FILE, FULL, QUICK, Layers, ensure_layers
from benchmarks.procs import CommandError, drop_caches, run, sync
from benchmarks.systems import DEFAULT_LAYERFS, System, all_systems
from benchmarks.workloads import GROUPS, MOUNT_KEY, Group, row_labels

if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence

DEFAULT_CACHE = Path("/var/tmp/layerfs-bench")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


class SetupError(RuntimeError):
    """The benchmark cannot start here; the message says why and what to do."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(system.name for system in all_systems(DEFAULT_LAYERFS))
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per workload (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="small tree, 256 MiB big file, 1 run: for developing the benchmark")
    parser.add_argument("--skip", action="append", default=[], metavar="SYSTEM",
                        help=f"leave out a system (repeatable): {names}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for the JSON and markdown results")
    parser.add_argument("--layerfs", type=Path, default=DEFAULT_LAYERFS,
                        help=f"layerfs-overlay program (default {DEFAULT_LAYERFS})")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where layers are built once and mounts happen ({DEFAULT_CACHE})")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; raised to unwind every ExitStack (unmounting on the way)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main(args: argparse.Namespace) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        return _benchmark(args)
    except SetupError as exc:
        print(f"benchmarks overlay: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"benchmarks overlay: interrupted by {exc}; everything it mounted is unmounted",
              file=sys.stderr)
        return 128 + exc.signum


def _interrupt(signum: int, frame: object) -> None:
    # A second signal must not cut the cleanup short and leave a mount behind: ignore it.
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    print(f"\n{signal.Signals(signum).name}: unmounting and stopping daemons...",
          file=sys.stderr, flush=True)
    raise Interrupted(signum)


def _benchmark(args: argparse.Namespace) -> int:
    systems = _select_systems(args.layerfs, args.skip)
    runs = args.runs if args.runs is not None else 1 if args.quick else 3
    cache_dir = args.cache.resolve()
    with ExitStack() as stack:
        _lock(stack, cache_dir)
        layers = ensure_layers(cache_dir, QUICK if args.quick else FULL)
        run_dir = _run_dir(stack, cache_dir)
        started = time.perf_counter()
        machine = report.machine_facts(cache_dir)
        results = _measure(systems, layers, run_dir, runs)
        document = _document(args, runs, systems, layers, results, machine, started)
        document["machine_after"] = report.machine_facts(cache_dir)
    table = report.markdown(results, _title(args, runs, layers))
    path = report.write_outputs(args.out, time.strftime("overlay-%Y%m%d-%H%M%S"), document, table)
    print(table)
    print(f"results: {path} and {path.with_suffix('.json')}")
    return 1 if results.failures else 0


def _measure(systems: list[System], layers: Layers, run_dir: Path, runs: int) -> report.Results:
    """Every group on every system, `runs` times; each group's systems run back to back, so
    that they are measured under the same conditions, first one rotating from run to run."""
    results = report.Results([system.name for system in systems], row_labels(layers))
    for run_index in range(runs):
        order = systems[run_index % len(systems):] + systems[: run_index % len(systems)]
        for group in GROUPS:
            for system in order:
                _run_group_safely(system, group, layers, run_dir, run_index, results)
    return results


def _select_systems(layerfs_program: Path, skip: Sequence[str]) -> list[System]:
    systems = all_systems(layerfs_program)
    unknown = set(skip) - {system.name for system in systems}
    if unknown:
        raise SetupError(f"--skip {', '.join(sorted(unknown))}: unknown system")
    if os.geteuid() != 0:
        raise SetupError("must run as root (it mounts and drops the page cache)")
    selected = [system for system in systems if system.name not in skip]
    missing = [reason for system in selected if (reason := system.missing())]
    if missing:
        raise SetupError("; ".join(missing))
    if not selected:
        raise SetupError("every system was skipped")
    return selected


def _lock(stack: ExitStack, cache_dir: Path) -> None:
    """One benchmark at a time per cache dir; and refuse to start over mounts left by another."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = stack.enter_context((cache_dir / ".lock").open("w"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        raise SetupError(f"{cache_dir}: another benchmark is running") from exc
    leftovers = mounts.mounts_under(cache_dir)
    if leftovers:
        names = ", ".join(entry.mount_point for entry in leftovers)
        raise SetupError(f"{names}: still mounted from an earlier run; unmount it first")


def _run_dir(stack: ExitStack, cache_dir: Path) -> Path:
    run_dir = cache_dir / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    stack.callback(_remove_run_dir, run_dir)  # registered first, so it runs after every unmount
    _spread_subdirs(run_dir)
    return run_dir


def _spread_subdirs(run_dir: Path) -> None:
    """Ask ext4 to place each group's scratch dir in a block group of its own (Orlov top dir).

    Why: ext4 skips inodes freed in the last 60 s (360 s while their table block is dirty; see
    `recently_deleted()`, checked when the filesystem has no journal, as here) and re-reads one
    inode table block per skipped inode on every create. With every scratch dir in the same block
    group, the files one group deleted (an rm -rf, an overlay's temporary whiteouts) made the next
    group's creates up to 30 times slower, whichever system came next. Best effort: other
    filesystems do not know the flag and do not need it.
    """
    try:
        run(["chattr", "+T", str(run_dir)], timeout=30)
    except (CommandError, OSError) as exc:
        print(f"note: {run_dir}: chattr +T failed ({exc}); continuing", file=sys.stderr)


def _remove_run_dir(run_dir: Path) -> None:
    leftovers = mounts.mounts_under(run_dir)
    if leftovers:
        names = ", ".join(entry.mount_point for entry in leftovers)
        raise CommandError(f"{names}: still mounted after the benchmark; left {run_dir} in place")
    print(f"removing {run_dir}...", flush=True)
    # --one-file-system: a second guard against ever descending into a mount.
    run(["rm", "-rf", "--one-file-system", str(run_dir)])


def _run_group_safely(
    system: System, group: Group, layers: Layers, run_dir: Path, run_index: int,
    results: report.Results,
) -> None:
    """Run one group; record a failure and go on, unless cleaning up after it failed too."""
    label = f"run {run_index + 1} {group.key:<10} {system.name:<14}"
    print(label, end=" ", flush=True)
    results.note_load(group.key, system.name, run_index)
    try:
        scratch = run_dir / f"{group.key}-{system.name}-{run_index}"
        timings = _run_group(system, group, layers, scratch)
    except (CommandError, OSError, ValueError) as exc:
        print(f"FAILED: {exc}", flush=True)
        results.fail(group.key, system.name, run_index, exc)
        if mounts.mounts_under(run_dir):
            raise  # cleanup did not work: stop before anything else piles up
        return
    for key, seconds in timings.items():
        results.add(key, system.name, seconds)
    print("  ".join(f"{key}={seconds:.3f}" for key, seconds in timings.items()), flush=True)


def _run_group(system: System, group: Group, layers: Layers, scratch: Path) -> dict[str, float]:
    timings: dict[str, float] = {}
    with ExitStack() as stack:
        scratch.mkdir()
        stack.callback(_remove_big_copies, scratch)  # first in, last out: after the unmount
        if group.cold:
            drop_caches()
        root = system.mount(stack, layers, scratch, group.changes)
        if group.record_mount and root.mount_seconds is not None:
            timings[MOUNT_KEY] = root.mount_seconds
        if group.cold:
            drop_caches()
        else:
            system.warm(layers, group.warm)
            sync()
        for measure in group.measures:
            timings[measure.key] = measure.run(root.path, layers)
    return timings


def _remove_big_copies(scratch: Path) -> None:
    """Delete the group's copies of the big file now, to bound disk use; the rest waits.

    Why the rest waits for the end of the benchmark: freeing thousands of inodes slows the creates
    that follow on ext4 (see `_spread_subdirs`); two inodes do not matter.
    """
    if mounts.mounts_under(scratch):
        return  # never delete through a mount; the unmount failure is already on its way up
    for directory in ("upper", "root"):
        big = scratch / directory / BIG_FILE
        if big.is_file() and not big.is_symlink():
            big.unlink()


def _document(
    args: argparse.Namespace, runs: int, systems: Sequence[System], layers: Layers,
    results: report.Results, machine: dict[str, object], started: float,
) -> dict[str, object]:
    return {
        "benchmark": "overlay",
        "config": {"runs": runs, "quick": args.quick, "skip": args.skip,
                   "layerfs": str(args.layerfs), "wall_seconds": time.perf_counter() - started},
        "machine": machine,
        "layers": {"root": str(layers.root), **layers.facts,
                   "lowers_top_first": [str(lower) for lower in layers.lowers]},
        "systems": {system.name: system.facts() for system in systems},
        "workloads": results.labels,
        "timings": results.timings,
        "summary": results.summary(),
        "failures": results.failures,
        "load_at_group_start": results.loads,
    }


def _title(args: argparse.Namespace, runs: int, layers: Layers) -> str:
    kind = "quick" if args.quick else "full"
    entries = layers.facts["merged_entries"]
    return f"overlay benchmark ({kind}, {runs} run{'s' if runs != 1 else ''}, {entries:,} entries)"
