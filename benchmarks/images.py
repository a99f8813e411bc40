"""`python -m benchmarks images`: layerfs's image-side jobs next to their peers, in one run.

import (tarball) and load (OCI layout) against `umoci unpack`; mount of a stored image against
fuse-overlayfs and the kernel's overlayfs over the same layer dir; commit of 10,000 changed files
(and of one) against `umoci repack`; pull from a loopback registry against `skopeo copy` +
`umoci unpack`; `dpkg -i` of a set of .debs in a chroot of the image mounted by layerfs,
fuse-overlayfs and the kernel's overlayfs, and in a plain copy. See benchmarks/README.md for what
is timed and under which conditions.

Order of work: refuse to start where a tool is missing (naming it), take the cache dir's lock
(shared with the overlay benchmark, so that the two never measure each other), build or reuse
the inputs, start the registry and push the image once, then for each run and each group run
every trial, the first one rotating from run to run. A trial that fails is recorded and the
benchmark goes on; its ExitStack has already unmounted what it mounted. Anything left mounted
under the run dir after a trial stops the benchmark.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import charts, images_dpkg, images_registry, mounts, report
from benchmarks.images_inputs import DEFAULT_TARBALL, LAYOUT_VERSION, ensure_inputs
from benchmarks.images_report import ROWS, _counts, markdown, median_imports, ratio, targets
from benchmarks.images_workloads import GROUPS, Context, Group, Trial
from benchmarks.overlay import (
    DEFAULT_CACHE,
    DEFAULT_OUT,
    Interrupted,
    SetupError,
    _lock,
    _run_dir,
    handle_signals,
)
from benchmarks.procs import REPO_ROOT, CommandError, own_forkserver, run
from benchmarks.systems import _version_of

if TYPE_CHECKING:
    import argparse

DEFAULT_LAYERFS = REPO_ROOT / ".venv" / "bin" / "layerfs"
FULL_CHANGES, QUICK_CHANGES = 10_000, 1_000
FULL_MOUNT_SAMPLES, QUICK_MOUNT_SAMPLES = 3, 1
# Every module a layerfs command imports (the CLI loads command modules lazily) and our own child.
WARM_IMPORTS = ("import layerfs.cli.main, layerfs.cli.commands_containers, "
                "layerfs.cli.commands_images, layerfs.cli.commands_registry, "
                "layerfs.cli.overlay_main, benchmarks.images_ops")
ALL_GROUPS: tuple[Group, ...] = (*GROUPS, Group("dpkg", images_dpkg.TRIALS))
# What `--skip` may name (a trial is left out when it needs one of them) and the tools each needs.
SKIPPABLE: dict[str, tuple[str, ...]] = {
    "layerfs": ("fusermount3",), "fuse-overlayfs": ("fuse-overlayfs", "fusermount3"),
    "kernel": (), "plain": (), "umoci": ("umoci",), "skopeo": ("skopeo",),
}
TOOLS = ("tar", "gzip")  # always: the floors, and the commit floor's `tar | gzip`

LABELS = {
    "import": "import", "import_none": "import --compression none", "load": "load",
    "unpack": "umoci unpack", "extract": "tar -x", "mount": "mount + stat",
    "py_start": "python start-up", "cli_imports": "python + mount imports",
    "cli_imports_exit": "python + mount imports, os._exit",
    "commit_many": "commit many", "commit_one": "commit one", "change_many": "apply changes",
    "pull": "pull + unpack", "pull_copy": "skopeo copy", "pull_unpack": "umoci unpack (pulled)",
    "dpkg": "dpkg -i in a chroot",
}
SYSTEMS = ["layerfs", "layerfs, no fork server", "layerfs-overlay", "umoci", "skopeo",
           "skopeo+umoci", "fuse-overlayfs", "kernel", "tar", "tar|gzip", "plain dir", "python"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=None,
                        help="runs of every trial (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"1 run, 1 mount sample, {QUICK_CHANGES:,} changes: for developing")
    parser.add_argument("--skip", action="append", default=[], metavar="SYSTEM",
                        help=f"leave out the trials that use a system (repeatable): "
                             f"{', '.join(SKIPPABLE)}")
    parser.add_argument("--only", action="append", default=[], metavar="GROUP",
                        help="run only these groups (repeatable; shell patterns): "
                             f"{', '.join(group.key for group in ALL_GROUPS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for the JSON and markdown results")
    parser.add_argument("--layerfs", type=Path, default=DEFAULT_LAYERFS,
                        help=f"layerfs program (default {DEFAULT_LAYERFS}); layerfs-overlay and "
                             "python are taken from its directory")
    parser.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL,
                        help="Debian root tarball (built with mmdebstrap when missing)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where inputs are built once and trials run ({DEFAULT_CACHE})")


def main(args: argparse.Namespace) -> int:
    handle_signals()
    try:
        outcome = run_suite(args)
    except SetupError as exc:
        print(f"benchmarks images: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:  # building the inputs, the registry, or a mount left behind
        print(f"benchmarks images: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"benchmarks images: interrupted by {exc}; everything it mounted is unmounted",
              file=sys.stderr)
        return 128 + exc.signum
    return 1 if outcome.failures else 0


def run_suite(args: argparse.Namespace) -> report.Outcome:
    """Run the benchmark as `args` says; write its JSON, markdown and chart to `args.out`.

    `args.stamp` (optional) names the files (`images-STAMP.*`). Raises SetupError before
    anything is built or mounted when a selected trial cannot run here.
    """
    selected = check(args)
    runs = args.runs if args.runs is not None else 1 if args.quick else 3
    cache_dir = args.cache.resolve()
    started = time.perf_counter()
    keys = {group.key for group in selected}
    with ExitStack() as stack:
        _lock(stack, cache_dir)
        inputs = ensure_inputs(cache_dir, args.tarball.resolve(),
                               QUICK_CHANGES if args.quick else FULL_CHANGES)
        run_dir = _run_dir(stack, cache_dir)
        bytecode = _bytecode_cache(cache_dir, _python_of(args.layerfs))
        own_forkserver(stack, run_dir)  # started by the mount trial's warm-up
        machine = report.machine_facts(cache_dir)
        ctx = Context(
            layerfs=args.layerfs, overlay_program=args.layerfs.parent / "layerfs-overlay",
            python=_python_of(args.layerfs), inputs=inputs, run_dir=run_dir,
            mount_samples=QUICK_MOUNT_SAMPLES if args.quick else FULL_MOUNT_SAMPLES,
        )
        if "dpkg" in keys:
            ctx.debs = images_dpkg.ensure_debs(cache_dir)
            inputs.facts["debs"] = len(ctx.debs.files)
        if "pull" in keys:
            address = images_registry.start(stack, run_dir / "registry")
            ctx.registry_ref = images_registry.push(inputs.image, address)
        results = _measure(ctx, selected, runs)
        document = _document(args, runs, ctx, results, machine, started, bytecode)
        document["machine_after"] = report.machine_facts(cache_dir)
    stem = f"images-{getattr(args, 'stamp', None) or time.strftime('%Y%m%d-%H%M%S')}"
    args.out.mkdir(parents=True, exist_ok=True)
    drawn = _charts(args.out, stem, results, inputs.facts)
    document["charts"] = [path.name for _, path in drawn]
    table = markdown(results, _title(args, runs, inputs.facts), inputs.facts, ctx.import_samples,
                     drawn)
    path = report.write_outputs(args.out, stem, document, table)
    print(table)
    print(f"results: {path} and {path.with_suffix('.json')}")
    return report.Outcome("images", path, path.with_suffix(".json"),
                          tuple(chart for _, chart in drawn), len(results.failures),
                          time.perf_counter() - started, results.summary(), results.labels,
                          inputs.facts, machine)


def check(args: argparse.Namespace) -> tuple[Group, ...]:
    """The groups to run, each with the trials `--skip` leaves; SetupError naming what is
    missing for them (or when nothing is left)."""
    unknown = set(args.skip) - set(SKIPPABLE)
    if unknown:
        raise SetupError(f"--skip {', '.join(sorted(unknown))}: unknown system; one of "
                         f"{', '.join(SKIPPABLE)}")
    selected = tuple(
        Group(group.key, trials)
        for group in ALL_GROUPS
        if not args.only or any(fnmatch.fnmatchcase(group.key, name) for name in args.only)
        if (trials := tuple(trial for trial in group.trials
                            if not set(trial.needs) & set(args.skip)))
    )
    if not selected:
        raise SetupError("nothing left to run: --only and --skip leave out every trial; groups: "
                         f"{', '.join(group.key for group in ALL_GROUPS)}")
    _check_tools(args, selected)
    return selected


def _check_tools(args: argparse.Namespace, selected: tuple[Group, ...]) -> None:
    if os.geteuid() != 0:
        raise SetupError("must run as root (it mounts, and umoci unpacks as root)")
    needs = {name for group in selected for trial in group.trials for name in trial.needs}
    tools = [*TOOLS, *(tool for name in sorted(needs) for tool in SKIPPABLE[name])]
    if not (args.cache.resolve() / f"images-v{LAYOUT_VERSION}" / "READY").exists():
        tools.append("umoci")  # to build the OCI layout, once
    keys = {group.key for group in selected}
    if "pull" in keys:
        tools += ["docker-registry", "skopeo"]
    if "dpkg" in keys:
        tools.append("chroot")
    missing = [tool for tool in dict.fromkeys(tools) if shutil.which(tool) is None]
    if "dpkg" in keys and (reason := images_dpkg.debs_missing(args.cache.resolve())):
        missing.append(reason)
    if "layerfs" in needs:
        for program in (args.layerfs, args.layerfs.parent / "layerfs-overlay"):
            if not os.access(program, os.X_OK):
                missing.append(f"{program} (pip install -e ., or pass --layerfs PATH)")
    if "kernel" in needs and "\toverlay\n" not in Path("/proc/filesystems").read_text():
        missing.append("the kernel's overlayfs (modprobe overlay)")
    if missing:
        raise SetupError(f"missing: {', '.join(missing)}; or --skip the systems that need them "
                         f"({', '.join(SKIPPABLE)})")


def _bytecode_cache(cache_dir: Path, python: Path) -> str:
    """Give every Python child a warm bytecode cache of its own, as an installed program has.

    Why: a session may set PYTHONDONTWRITEBYTECODE (this one did), and then every module whose
    .pyc in the source tree is stale is compiled again by every command, which would be counted
    as layerfs's start-up. The cache goes under the benchmark's cache dir, not into the tree.
    """
    prefix = cache_dir / "pycache"
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)
    run([str(python), "-c", WARM_IMPORTS])
    return f"PYTHONPYCACHEPREFIX={prefix}, warmed before the first trial"


def _python_of(layerfs: Path) -> Path:
    """The interpreter named by the layerfs script's #! line, which is what its mount pays for."""
    first = layerfs.read_bytes().split(b"\n", 1)[0]
    if first.startswith(b"#!") and Path(os.fsdecode(first[2:].strip())).exists():
        return Path(os.fsdecode(first[2:].strip()))
    return Path(sys.executable)


def _measure(ctx: Context, selected: tuple[Group, ...], runs: int) -> report.Results:
    results = report.Results(SYSTEMS, LABELS)
    for run_index in range(runs):
        for group in selected:
            shift = run_index % len(group.trials)
            for trial in group.trials[shift:] + group.trials[:shift]:
                _run_trial_safely(ctx, group, trial, run_index, results)
    return results


def _run_trial_safely(
    ctx: Context, group: Group, trial: Trial, run_index: int, results: report.Results
) -> None:
    """Run one trial; record a failure and go on, unless something is left mounted."""
    print(f"run {run_index + 1} {group.key:<7} {trial.name:<20}", end=" ", flush=True)
    results.note_load(group.key, trial.name, run_index)
    rows = []
    try:
        with ExitStack() as stack:
            scratch = ctx.run_dir / f"{group.key}-{trial.name}-{run_index}"
            scratch.mkdir()
            rows = trial.run(ctx, stack, scratch, run_index)
    except (CommandError, OSError, ValueError) as exc:
        print(f"FAILED: {exc}", flush=True)
        results.fail(group.key, trial.name, run_index, exc)
    leftovers = mounts.mounts_under(ctx.run_dir)
    if leftovers:
        names = ", ".join(entry.mount_point for entry in leftovers)
        raise CommandError(f"{names}: still mounted after {group.key}/{trial.name}; stopping")
    for workload, system, seconds in rows:
        results.add(workload, system, seconds)
    if rows:
        print("  ".join(f"{workload}/{system}={seconds:.3f}"
                        for workload, system, seconds in rows), flush=True)


def _charts(
    out_dir: Path, stem: str, results: report.Results, facts: dict[str, object]
) -> list[tuple[str, Path]]:
    """One bar per compared row: layerfs's median over its peer's."""
    summary = results.summary()
    rows = {row.label: f"{row.label.format(**_counts(facts))} (vs {row.peer.name})"
            for row in ROWS if row.peer is not None and ratio(summary, row) is not None}
    values: list[float | None] = [ratio(summary, row) for row in ROWS if row.label in rows]
    path = charts.ratio_bars(out_dir / f"{stem}-ratios.png", "layerfs's median relative to "
                             "its peer's", rows, {"layerfs / peer": values}, "the peer")
    return [] if path is None else [("layerfs's median relative to its peer's, per row", path)]


def _document(
    args: argparse.Namespace, runs: int, ctx: Context, results: report.Results,
    machine: dict[str, object], started: float, bytecode: str,
) -> dict[str, object]:
    summary = results.summary()
    return {
        "benchmark": "images",
        "config": {"runs": runs, "quick": args.quick, "skip": args.skip, "only": args.only,
                   "layerfs": str(args.layerfs),
                   "python": str(ctx.python), "mount_samples_per_run": ctx.mount_samples,
                   "wall_seconds": round(time.perf_counter() - started, 1),
                   "bytecode_cache": bytecode,
                   "registry": "docker-registry on 127.0.0.1 (port chosen per run)"},
        "machine": machine,
        "inputs": {"layout": str(ctx.inputs.layout), **ctx.inputs.facts},
        "debs": ctx.debs.facts if ctx.debs else None,
        "versions": {
            "umoci": _version_of("umoci"), "skopeo": _version_of("skopeo"),
            "fuse-overlayfs": _version_of("fuse-overlayfs"),
            "docker-registry": images_registry.version(),
        },
        "mount_lines": ctx.mount_lines,
        "rows": [row.label for row in ROWS],
        "targets": targets(summary, ctx.inputs.facts),
        "import_self_seconds_by_package": median_imports(ctx.import_samples)
        if ctx.import_samples else {},
        "workloads": results.labels,
        "timings": results.timings,
        "summary": summary,
        "failures": results.failures,
        "load_at_trial_start": results.loads,
    }


def _title(args: argparse.Namespace, runs: int, facts: dict[str, object]) -> str:
    kind = "quick" if args.quick else "full"
    megabytes = int(str(facts["tarball_bytes"])) / 1e6
    return (f"images benchmark ({kind}, {runs} run{'s' if runs != 1 else ''}, Debian bookworm "
            f"minbase: {megabytes:.0f} MB tarball, {facts['tarball_entries']:,} entries)")
