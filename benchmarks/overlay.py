"""`python -m benchmarks overlay`: the copy-on-write benchmark, every system over the same layers.

Order of work: check that every selected system can run (refuse otherwise, naming the fix), take
the cache dir's lock, build or reuse the layers, then for each run, each workload group and each
system (rotated per run, so that no system is always first after a cache drop) mount, measure and
unmount. A group that fails is recorded and the benchmark goes on; its ExitStack has already
unmounted what it mounted and stopped the daemons it started. The groups on a loop filesystem
(`copy_up_xfs` ...) get their filesystem once per suite run, before the first group, and lose it
when the suite ends (`benchmarks.filesystems`). Anything left mounted under the run dir at the end
is an error.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time
from contextlib import ExitStack
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import charts, mounts, overlay_notes, report
from benchmarks.checkout import ensure_checkout
from benchmarks.filesystems import LoopFilesystem, loop_filesystems
from benchmarks.layers import (
    BIG_FILE,
    DB_FILE,
    FULL,
    QUICK,
    SPARSE_FILE,
    Layers,
    ensure_layers,
    sized_file,
)
from benchmarks.procs import CommandError, drop_caches, own_forkserver, run, sync
from benchmarks.systems import DEFAULT_LAYERFS, FuseOverlay, System, all_systems
from benchmarks.workloads import (
    MOUNT_KEY,
    Group,
    copy_up_points,
    filesystem_key,
    groups,
    keys_of,
    row_labels,
    select,
)

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
    parser.add_argument("--only", action="append", default=[], metavar="ROW",
                        help="run only the groups with this key or row key (repeatable; "
                             "shell patterns: 'copy_up*'); see benchmarks/README.md")
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
    handle_signals()
    try:
        outcome = run_suite(args)
    except SetupError as exc:
        print(f"benchmarks overlay: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"benchmarks overlay: interrupted by {exc}; everything it mounted is unmounted",
              file=sys.stderr)
        return 128 + exc.signum
    return 1 if outcome.failures else 0


def handle_signals() -> None:
    """Turn SIGINT and SIGTERM into `Interrupted`, which unwinds (and unmounts) everything."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    # A second signal must not cut the cleanup short and leave a mount behind: ignore it.
    for other in (signal.SIGINT, signal.SIGTERM):
        signal.signal(other, signal.SIG_IGN)
    print(f"\n{signal.Signals(signum).name}: unmounting and stopping daemons...",
          file=sys.stderr, flush=True)
    raise Interrupted(signum)


def check(args: argparse.Namespace) -> tuple[list[System], tuple[Group, ...]]:
    """The systems and groups to run; SetupError if one cannot run here or none is left."""
    systems = _select_systems(args.layerfs, args.skip)
    every = groups(QUICK if args.quick else FULL)
    selected = select(every, args.only) if args.only else every
    if not selected:
        names = ", ".join(dict.fromkeys(key for group in every
                                        for key in (group.key, *keys_of(group))))
        raise SetupError(f"--only {' '.join(args.only)}: no such group or row; one of {names}")
    return systems, selected


def run_suite(args: argparse.Namespace) -> report.Outcome:
    """Run the benchmark as `args` says; write its JSON, markdown and charts to `args.out`.

    `args.stamp` (optional) names the files (`overlay-STAMP.*`), so that `all` can give both
    suites one. Raises SetupError before anything is mounted when it cannot run here.
    """
    systems, selected = check(args)
    runs = args.runs if args.runs is not None else 1 if args.quick else 3
    cache_dir = args.cache.resolve()
    began = time.perf_counter()
    with ExitStack() as stack:
        _lock(stack, cache_dir)
        layers = ensure_layers(cache_dir, QUICK if args.quick else FULL)
        run_dir = _run_dir(stack, cache_dir)
        _start_forkserver(stack, systems, layers, run_dir)
        kinds = dict.fromkeys(group.filesystem for group in selected if group.filesystem)
        filesystems, skipped = loop_filesystems(stack, kinds, layers, run_dir)
        for kind, reason in skipped.items():
            print(f"note: {filesystem_key(kind)} left out: {kind}: {reason}", file=sys.stderr)
        runnable = [group for group in selected
                    if group.filesystem is None or group.filesystem in filesystems]
        checkout = (ensure_checkout(cache_dir, layers, layers.spec.checkout_files)
                    if any(group.checkout for group in runnable) else None)
        started = time.perf_counter()
        machine = report.machine_facts(cache_dir)
        results = _measure(systems, runnable, layers, run_dir, filesystems, checkout, runs)
        document = _document(args, runs, systems, layers, results, machine, started)
        document["filesystems"] = {kind: loop.facts for kind, loop in filesystems.items()}
        document["filesystems_skipped"] = skipped
        document["machine_after"] = report.machine_facts(cache_dir)
    stem = f"overlay-{getattr(args, 'stamp', None) or time.strftime('%Y%m%d-%H%M%S')}"
    args.out.mkdir(parents=True, exist_ok=True)
    drawn = _charts(args.out, stem, results, layers)
    document["charts"] = [path.name for _, path in drawn]
    table = report.markdown(results, _title(args, runs, layers),
                            overlay_notes.notes(results, layers, skipped), drawn)
    path = report.write_outputs(args.out, stem, document, table)
    print(table)
    print(f"results: {path} and {path.with_suffix('.json')}")
    return report.Outcome("overlay", path, path.with_suffix(".json"),
                          tuple(chart for _, chart in drawn), len(results.failures),
                          time.perf_counter() - began, results.summary(), results.labels,
                          layers.facts, machine)


def _start_forkserver(stack: ExitStack, systems: list[System], layers: Layers,
                      run_dir: Path) -> None:
    """layerfs-overlay hands each mount to a fork server: start the run's own with an untimed
    read-only mount, so that the first timed mount does not pay for starting it."""
    program = next((system.program for system in systems
                    if isinstance(system, FuseOverlay) and system.name.startswith("layerfs")),
                   None)
    if program is None:
        own_forkserver(stack, run_dir)
        return
    mountpoint = run_dir / "forkserver-warm-up"
    mountpoint.mkdir()
    own_forkserver(stack, run_dir, [program, "-o", f"lowerdir={layers.lowers[0]}",
                                    str(mountpoint)], ["fusermount3", "-u", str(mountpoint)])


def _measure(
    systems: list[System], selected: Sequence[Group], layers: Layers, run_dir: Path,
    filesystems: dict[str, LoopFilesystem], checkout: Layers | None, runs: int,
) -> report.Results:
    """Every group on every system, `runs` times; each group's systems run back to back, so
    that they are measured under the same conditions, first one rotating from run to run.
    A group on a loop filesystem reads its layers there and keeps its scratch dir there."""
    results = report.Results([system.name for system in systems], row_labels(layers, selected))
    for run_index in range(runs):
        order = systems[run_index % len(systems):] + systems[: run_index % len(systems)]
        for group in selected:
            if group.checkout:
                assert checkout is not None
                group_layers, scratch_base = checkout, run_dir
            elif group.filesystem is None:
                group_layers, scratch_base = layers, run_dir
            else:
                loop = filesystems[group.filesystem]
                group_layers, scratch_base = loop.layers, loop.scratch
            for system in order:
                if system.only and not any(fnmatch(group.key, pattern)
                                           for pattern in system.only):
                    continue
                _run_group_safely(system, group, group_layers, scratch_base, run_index, results)
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
    spread_subdirs(run_dir)
    return run_dir


def spread_subdirs(run_dir: Path) -> None:
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
    system: System, group: Group, layers: Layers, scratch_base: Path, run_index: int,
    results: report.Results,
) -> None:
    """Run one group; record a failure and go on, unless cleaning up after it failed too."""
    label = f"run {run_index + 1} {group.key:<10} {system.name:<14}"
    print(label, end=" ", flush=True)
    results.note_load(group.key, system.name, run_index)
    try:
        scratch = scratch_base / f"{group.key}-{system.name}-{run_index}"
        timings = _run_group(system, group, layers, scratch, results)
    except (CommandError, OSError, ValueError) as exc:
        print(f"FAILED: {exc}", flush=True)
        results.fail(group.key, system.name, run_index, exc)
        # Under the group's own dir: the run dir also holds the loop filesystems' mounts.
        if mounts.mounts_under(scratch):
            raise  # cleanup did not work: stop before anything else piles up
        return
    for key, seconds in timings.items():
        results.add(key, system.name, seconds)
    print("  ".join(f"{key}={seconds:.3f}" for key, seconds in timings.items()), flush=True)


def _run_group(
    system: System, group: Group, layers: Layers, scratch: Path, results: report.Results
) -> dict[str, float]:
    timings: dict[str, float] = {}
    with ExitStack() as stack:
        scratch.mkdir()
        # First in, last out: after the unmount.
        stack.callback(_remove_big_copies, scratch, _big_files(layers))
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
            before = measure.before(root) if measure.before is not None else {}
            cpu_before = mounts.cpu_seconds(root.daemon) if root.daemon else None
            timings[measure.key] = measure.run(root.path, layers)
            if root.daemon and cpu_before is not None:
                cpu_after = mounts.cpu_seconds(root.daemon)
                if cpu_after is not None:
                    results.add_cpu(measure.key, system.name, cpu_after - cpu_before)
            if measure.check is not None:
                results.add_check(measure.key, system.name, {**before, **measure.check(root)})
    return timings


def _big_files(layers: Layers) -> tuple[str, ...]:
    """The files of 16 MiB and more that a group may copy (or a copy-up may fill, sparse)."""
    sized = (sized_file(size) for size in layers.spec.copy_up_sizes if size >= 16 << 20)
    return (BIG_FILE, SPARSE_FILE, DB_FILE, *sized)


def _remove_big_copies(scratch: Path, names: Sequence[str]) -> None:
    """Delete the group's copies of the big files now, to bound disk use; the rest waits.

    Why the rest waits for the end of the benchmark: freeing thousands of inodes slows the creates
    that follow on ext4 (see `spread_subdirs`); a few inodes do not matter.
    """
    if mounts.mounts_under(scratch):
        return  # never delete through a mount; the unmount failure is already on its way up
    for directory in ("upper", "root"):
        for name in names:
            big = scratch / directory / name
            if big.is_file() and not big.is_symlink():
                big.unlink()


def _charts(
    out_dir: Path, stem: str, results: report.Results, layers: Layers
) -> list[tuple[str, Path]]:
    """The ratio bars (every row, each system against the kernel) and the copy-up curve."""
    summary = results.summary()
    drawn: list[tuple[str, Path]] = []
    if "kernel" in results.systems:
        rows = {key: label for key, label in results.labels.items() if key in summary}
        series = charts.system_ratios(summary, rows, results.systems, "kernel")
        path = charts.ratio_bars(out_dir / f"{stem}-ratios.png",
                                 "Median time relative to the kernel's overlayfs", rows, series,
                                 "the kernel's overlayfs")
        if path is not None:
            drawn.append(("each system's median relative to the kernel's overlayfs", path))
    points = {key: size for key, size in copy_up_points(layers).items() if key in summary}
    if len(points) > 1:
        path = charts.copy_up_curve(out_dir / f"{stem}-copy-up.png",
                                    "Copy-up latency by file size (median, min-max band)",
                                    summary, points, results.systems)
        if path is not None:
            drawn.append(("copy-up latency by file size, one line per system", path))
    return drawn


def _document(
    args: argparse.Namespace, runs: int, systems: Sequence[System], layers: Layers,
    results: report.Results, machine: dict[str, object], started: float,
) -> dict[str, object]:
    return {
        "benchmark": "overlay",
        "config": {"runs": runs, "quick": args.quick, "skip": args.skip, "only": args.only,
                   "layerfs": str(args.layerfs), "wall_seconds": time.perf_counter() - started},
        "machine": machine,
        "layers": {"root": str(layers.root), **layers.facts,
                   "lowers_top_first": [str(lower) for lower in layers.lowers]},
        "systems": {system.name: system.facts() for system in systems},
        "workloads": results.labels,
        "timings": results.timings,
        "daemon_cpu_seconds": results.cpu,
        "summary": results.summary(),
        "checks": results.checks,
        "copy_up_points": copy_up_points(layers),
        "failures": results.failures,
        "load_at_group_start": results.loads,
    }


def _title(args: argparse.Namespace, runs: int, layers: Layers) -> str:
    kind = "quick" if args.quick else "full"
    entries = layers.facts["merged_entries"]
    return f"overlay benchmark ({kind}, {runs} run{'s' if runs != 1 else ''}, {entries:,} entries)"
