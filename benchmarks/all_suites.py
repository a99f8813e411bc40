"""`python -m benchmarks all` (or no command): the overlay suite, then the images suite.

Both suites are checked before either starts (a missing system or tool stops it there), then
run one after the other with the options they share, their files named with one time stamp:
`overlay-STAMP.*`, `images-STAMP.*` (JSON, markdown, PNG charts) and `all-STAMP.md`, the combined
summary: machine, wall times, the targets of issue 6 with the medians that meet or miss them, then
both suites' tables and charts. A suite that fails to set up (its inputs cannot be built) is
recorded in the summary and the next one still runs; an interrupt stops everything, after the
running suite has unmounted what it mounted.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import images, overlay
from benchmarks.images_inputs import DEFAULT_TARBALL
from benchmarks.images_report import ROWS, _counts, ratio, target
from benchmarks.layers import FULL, QUICK
from benchmarks.overlay import DEFAULT_CACHE, DEFAULT_OUT, Interrupted, SetupError
from benchmarks.procs import CommandError
from benchmarks.report import _seconds, equal_durability
from benchmarks.systems import DEFAULT_LAYERFS, NO_FSYNC, PASSTHROUGH_ALL, all_systems
from benchmarks.workloads import groups, keys_of

if TYPE_CHECKING:
    from collections.abc import Callable

    from benchmarks.report import Outcome

Summary = dict[str, dict[str, dict[str, float]]]

# Issue 6's targets for the overlay suite: row key, the bound on layerfs/kernel, the wording.
KERNEL_TARGETS: tuple[tuple[str, float, str], ...] = (
    ("stat_warm", 1.2, "within 1.2x of the kernel"),
    ("read_big_warm", 1.5, "within 1.5x of the kernel"),
    ("walk_warm", 2.0, "within 2x of the kernel"),
    ("copy_up_256MiB", 1.0, "no slower than the kernel"),
    ("copy_up", 1.0, "no slower than the kernel"),
)
METACOPY_TARGET = ("chmod_big", 0.010, "metadata only: milliseconds (< 10 ms)")
# Issue 13's: the reads against the kernel, and the daemon's CPU against fuse-overlayfs's.
KERNEL_TARGETS_13: tuple[tuple[str, float, str], ...] = (
    ("read_tree_cold", 1.2, "within 1.2x of the kernel (13)"),
    ("read_big_cold", 1.2, "within 1.2x of the kernel (13)"),
    ("read_tree_warm", 1.1, "within 1.1x of the kernel (13)"),
    ("read_big_warm", 1.1, "within 1.1x of the kernel (13)"),
)
CPU_TARGET_ROWS = ("walk_cold", "create", "untar")
WALK_CPU_PER_ENTRY = 7e-6
"""Half of the 14 us of daemon CPU per cold-walk entry that issue 13 started from."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    overlay_names = [system.name for system in all_systems(DEFAULT_LAYERFS)]
    names = ", ".join(dict.fromkeys([*overlay_names, *images.SKIPPABLE]))
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per workload (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller inputs, 1 run: a few minutes, for developing")
    parser.add_argument("--skip", action="append", default=[], metavar="SYSTEM",
                        help=f"leave out a system in both suites (repeatable): {names}")
    parser.add_argument("--only", action="append", default=[], metavar="ROW",
                        help="run only these groups or rows of either suite (repeatable; shell "
                             "patterns); a suite none of them names is left out")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for the JSON, markdown and PNG results")
    parser.add_argument("--layerfs", type=Path, default=images.DEFAULT_LAYERFS,
                        help=f"layerfs program (default {images.DEFAULT_LAYERFS}); "
                             "layerfs-overlay is taken from its directory")
    parser.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL,
                        help="Debian root tarball for the images suite")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where inputs are built once and mounts happen ({DEFAULT_CACHE})")


def main(args: argparse.Namespace) -> int:
    overlay.handle_signals()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    try:
        plan = _plan(args, stamp)
        outcomes: list[Outcome] = []
        errors: dict[str, str] = {}
        for name, run_suite, namespace in plan:
            print(f"=== {name} ===", flush=True)
            try:
                outcomes.append(run_suite(namespace))
            except CommandError as exc:  # its inputs or its registry: the next suite may work
                print(f"benchmarks {name}: {exc}", file=sys.stderr)
                errors[name] = str(exc)
    except SetupError as exc:
        print(f"benchmarks all: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"benchmarks all: interrupted by {exc}; everything it mounted is unmounted",
              file=sys.stderr)
        return 128 + exc.signum
    path = _write_summary(args, stamp, outcomes, errors, time.perf_counter() - started)
    print(f"summary: {path}")
    return 1 if errors or any(outcome.failures for outcome in outcomes) else 0


SuiteRun = tuple[str, "Callable[[argparse.Namespace], Outcome]", argparse.Namespace]


def _plan(args: argparse.Namespace, stamp: str) -> list[SuiteRun]:
    """Each suite's own options; check both before anything runs (SetupError otherwise)."""
    overlay_names = {system.name for system in all_systems(DEFAULT_LAYERFS)}
    unknown = set(args.skip) - overlay_names - set(images.SKIPPABLE)
    if unknown:
        raise SetupError(f"--skip {', '.join(sorted(unknown))}: unknown system")
    overlay_rows = list(dict.fromkeys(key for group in groups(QUICK if args.quick else FULL)
                                      for key in (group.key, *keys_of(group))))
    image_groups = [group.key for group in images.ALL_GROUPS]
    overlay_only = [name for name in args.only if fnmatch.filter(overlay_rows, name)]
    images_only = [name for name in args.only if fnmatch.filter(image_groups, name)]
    unmatched = set(args.only) - set(overlay_only) - set(images_only)
    if unmatched:
        raise SetupError(f"--only {', '.join(sorted(unmatched))}: no such group or row; overlay: "
                         f"{', '.join(overlay_rows)}; images: {', '.join(image_groups)}")
    shared = {"runs": args.runs, "quick": args.quick, "out": args.out, "cache": args.cache,
              "stamp": stamp}
    plan: list[SuiteRun] = []
    if not args.only or overlay_only:
        namespace = argparse.Namespace(
            **shared, skip=[name for name in args.skip if name in overlay_names],
            only=overlay_only, layerfs=args.layerfs.parent / "layerfs-overlay")
        overlay.check(namespace)
        plan.append(("overlay", overlay.run_suite, namespace))
    if not args.only or images_only:
        namespace = argparse.Namespace(
            **shared, skip=[name for name in args.skip if name in images.SKIPPABLE],
            only=images_only, layerfs=args.layerfs, tarball=args.tarball)
        images.check(namespace)
        plan.append(("images", images.run_suite, namespace))
    return plan


def _write_summary(
    args: argparse.Namespace, stamp: str, outcomes: list[Outcome], errors: dict[str, str],
    wall: float,
) -> Path:
    kind = "quick" if args.quick else "full"
    lines = [f"# layerfs benchmarks: all suites ({kind}, {stamp})", ""]
    if outcomes:
        machine = outcomes[0].machine
        filesystem = machine["cache_dir_filesystem"]
        lines += [f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory']}"
                  f" of memory, kernel {machine['kernel']}, cache dir on "
                  f"{filesystem['type'] if isinstance(filesystem, dict) else filesystem}; "
                  f"layerfs at `{machine['layerfs_git']}`.", ""]
    walls = ", ".join(f"{outcome.suite} {outcome.wall_seconds / 60:.1f} min"
                      for outcome in outcomes)
    lines += [f"Wall time {wall / 60:.1f} min ({walls or 'no suite ran'}).", ""]
    for suite, error in errors.items():
        lines += [f"**{suite} did not run to the end**: {error}", ""]
    lines += _targets(outcomes)
    for outcome in outcomes:
        files = [outcome.json.name, *(chart.name for chart in outcome.charts)]
        lines += [f"## {outcome.suite}", "",
                  f"Files: [`{outcome.markdown.name}`]({outcome.markdown.name}), "
                  + ", ".join(f"`{name}`" for name in files) + ".", "",
                  outcome.markdown.read_text().rstrip(), ""]
    out: Path = args.out
    path = out / f"all-{stamp}.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _targets(outcomes: list[Outcome]) -> list[str]:
    """One table of issue 6's targets that this run measured: layerfs's median, the bound."""
    rows: list[list[str]] = []
    for outcome in outcomes:
        if outcome.suite == "overlay":
            rows += _overlay_targets(outcome.summary, outcome.labels, outcome.facts)
        elif outcome.suite == "images":
            rows += _images_targets(outcome.summary, outcome.facts)
    if not rows:
        return []
    lines = ["## Targets (issues 6 and 13)", "",
             "Medians of this run. A quick run uses smaller inputs and one run: read it as a "
             "smoke test, not as the result.", "",
             "| row | layerfs s | against | their s | ratio | target | met? |",
             "| --- | ---: | --- | ---: | ---: | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, "", *_slower_than_peer(outcomes)]


def _overlay_targets(summary: Summary, labels: dict[str, str],
                     facts: dict[str, object]) -> list[list[str]]:
    rows = []
    for key, bound, wording in KERNEL_TARGETS:
        ours, kernel = _median(summary, key, "layerfs"), _median(summary, key, "kernel")
        if ours is not None and kernel:
            rows.append([labels[key], _seconds(ours), "kernel", _seconds(kernel),
                         f"{ours / kernel:.2f}", wording, _verdict(ours / kernel <= bound)])
    key, limit, wording = METACOPY_TARGET
    ours = _median(summary, key, "layerfs")
    if ours is not None:
        rows.append([labels[key], _seconds(ours), "—", "—", "—", wording, _verdict(ours < limit)])
    for key, bound, wording in KERNEL_TARGETS_13:
        for system in ("layerfs", PASSTHROUGH_ALL):
            ours, kernel = _median(summary, key, system), _median(summary, key, "kernel")
            label = labels[key] + ("" if system == "layerfs" else f" (`{system}`)")
            if ours is not None and kernel:
                rows.append([label, _seconds(ours), "kernel", _seconds(kernel),
                             f"{ours / kernel:.2f}", wording, _verdict(ours / kernel <= bound)])
    compared = [key for key in labels if _equal(summary, key) is not None
                and _median(summary, key, "fuse-overlayfs") is not None]
    slower = [key for key in compared
              if (_equal(summary, key) or 0) >= (_median(summary, key, "fuse-overlayfs") or 0)]
    if compared:
        rows.append([f"every overlay row ({len(compared)}), at equal durability", "—",
                     "fuse-overlayfs", "—", "—", "faster than fuse-overlayfs",
                     _verdict(not slower) + (f" (slower on {len(slower)}, listed below)"
                                             if slower else "")])
    rows += _cpu_targets(summary, labels, facts)
    return rows


def _cpu_targets(summary: Summary, labels: dict[str, str],
                 facts: dict[str, object]) -> list[list[str]]:
    """Issue 13's CPU targets: the daemon's CPU below fuse-overlayfs's, and per walked entry."""
    rows = []
    for key in CPU_TARGET_ROWS:
        ours, theirs = _cpu(summary, key, "layerfs"), _cpu(summary, key, "fuse-overlayfs")
        if key in labels and ours is not None and theirs is not None:
            rows.append([f"{labels[key]}: daemon CPU", _seconds(ours), "fuse-overlayfs",
                         _seconds(theirs), f"{ours / theirs:.2f}" if theirs else "—",
                         "less CPU than fuse-overlayfs (13)", _verdict(ours < theirs)])
    ours = _cpu(summary, "walk_cold", "layerfs")
    entries = facts.get("merged_entries")
    if ours is not None and isinstance(entries, int) and entries:
        rows.append(["daemon CPU per cold-walk entry", f"{ours / entries * 1e6:.1f} us", "—",
                     "—", "—", f"at most {WALK_CPU_PER_ENTRY * 1e6:.0f} us (13)",
                     _verdict(ours / entries <= WALK_CPU_PER_ENTRY)])
    return rows


def _equal(summary: Summary, key: str) -> float | None:
    stats = equal_durability(summary, key)
    return stats["median"] if stats else None


def _cpu(summary: Summary, key: str, system: str) -> float | None:
    return summary.get(key, {}).get(system, {}).get("cpu_median")


def _slower_than_peer(outcomes: list[Outcome]) -> list[str]:
    """The overlay rows where layerfs, at fuse-overlayfs's durability, is not faster than it."""
    slower = [f"{outcome.labels[key]} ({ours / theirs:.2f}x)"
              for outcome in outcomes if outcome.suite == "overlay"
              for key in outcome.labels
              if (ours := _equal(outcome.summary, key)) is not None
              and (theirs := _median(outcome.summary, key, "fuse-overlayfs"))
              and ours >= theirs]
    if not slower:
        return []
    return [f"Overlay rows where layerfs is not faster than fuse-overlayfs at equal durability "
            f"(`{NO_FSYNC}` where it ran, the ratio of their medians): {'; '.join(slower)}.", ""]


def _images_targets(summary: Summary, facts: dict[str, object]) -> list[list[str]]:
    rows = []
    for row in ROWS:
        wording, met = target(summary, row)
        ours = _median(summary, row.layerfs.workload, row.layerfs.system)
        if not wording or ours is None:
            continue
        theirs = (_median(summary, row.peer.workload, row.peer.system)
                  if row.peer is not None else None)
        value = ratio(summary, row)
        rows.append([f"{row.label.format(**_counts(facts))} ({row.layerfs.name})", _seconds(ours),
                     row.peer.name if row.peer else "—",
                     "—" if theirs is None else _seconds(theirs),
                     "—" if value is None else f"{value:.2f}", wording, _verdict(met)])
    return rows


def _median(summary: Summary, key: str, system: str) -> float | None:
    stats = summary.get(key, {}).get(system)
    return stats["median"] if stats else None


def _verdict(met: bool | None) -> str:
    return "—" if met is None else "**yes**" if met else "**no**"
