"""`python -m benchmarks build`: the Dockerfile corpus (`benchmarks.build_corpus`) built by
`layerfs build` and by `buildah bud`, in one run.

buildah runs as a user of this machine would run it without a daemon: `--isolation chroot`,
the vfs storage driver (the one that needs no kernel overlay or fuse-overlayfs under it),
`--layers` (its build cache), docker's image format, `--pull-never`.

For each case and each tool, in a store of its own that holds the case's base images
(loaded untimed: busybox from the official OCI layout, Alpine and Debian imported by layerfs
and saved for buildah, as the tests do):
- cold: the first build, nothing cached;
- cached: the same build again, every step from the cache;
- changed: the build of the Dockerfile with one line near the end changed (the case's `edit`,
  written outside the context so that the context is the same).
Each build is timed from start to exit. Beside the times the run records how many steps each
build ran rather than took from the cache (from the tools' output): none for the cached
build, the edited step and those after it for the changed one; a build that ran other steps
is recorded as a failure. Page caches are left warm: both tools read the same files.

The tools alternate which goes first from run to run; the stores are removed after each case.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import report
from benchmarks.build_corpus import ALPINE, BASE_CHANGES, BUSYBOX, CASES, DEBIAN, write_context
from benchmarks.images_inputs import DEFAULT_TARBALL, build_tarball
from benchmarks.overlay import DEFAULT_CACHE, DEFAULT_OUT, Interrupted, handle_signals
from benchmarks.procs import REPO_ROOT, CommandError, own_forkserver, run

if TYPE_CHECKING:
    import argparse

    from benchmarks.build_corpus import Case

DEFAULT_LAYERFS = REPO_ROOT / ".venv" / "bin" / "layerfs"
DEFAULT_IMAGES = Path(os.environ.get("LAYERFS_TEST_IMAGES", "/work/shared/images"))
SYSTEMS = ("layerfs", "buildah")
PHASES = ("cold", "cached", "changed")
BUILD_TIMEOUT = 1800.0
# The line that starts each step in the tools' output, and the one that says it was cached.
_LAYERFS_STEP = re.compile(r"^Step \d+/\d+ : (\S+)")
_BUILDAH_STEP = re.compile(r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: (\S+)")
_LAYERFS_CACHED = " ---> Using cache"
_BUILDAH_CACHED = "--> Using cache "

class SetupError(RuntimeError):
    """The benchmark cannot start here; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=None,
                        help="runs of every build (default 3; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="1 run, the busybox and Alpine cases only: for developing")
    parser.add_argument("--only", action="append", default=[], metavar="CASE",
                        help="build only these cases (repeatable; shell patterns): "
                             f"{', '.join(case.name for case in CASES)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for the JSON and markdown results")
    parser.add_argument("--layerfs", type=Path, default=DEFAULT_LAYERFS,
                        help=f"the layerfs program (default {DEFAULT_LAYERFS})")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="directory of the busybox OCI layout and the Alpine minirootfs")
    parser.add_argument("--tarball", type=Path, default=DEFAULT_TARBALL,
                        help="Debian root tarball (built with mmdebstrap when missing)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where the stores and contexts live during the run "
                             f"({DEFAULT_CACHE})")


@dataclass(frozen=True, slots=True)
class Bases:
    """Where each base image comes from: the busybox OCI layout, and archives that
    `layerfs save` wrote of the imported Alpine and Debian roots."""

    busybox_layout: Path
    archives: dict[str, Path]  # image name -> docker/OCI archive


def main(args: argparse.Namespace) -> int:
    handle_signals()
    try:
        cases = _selected(args)
        _check_tools(args)
        runs = args.runs if args.runs is not None else 1 if args.quick else 3
        path = run_suite(args, cases, runs)
    except SetupError as exc:
        print(f"benchmarks build: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"benchmarks build: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        print(f"benchmarks build: interrupted by {exc}; its stores are removed",
              file=sys.stderr)
        return 128 + exc.signum
    return 1 if path is None else 0


def _selected(args: argparse.Namespace) -> tuple[Case, ...]:
    cases = tuple(case for case in CASES
                  if not args.only or any(fnmatch.fnmatchcase(case.name, p) for p in args.only)
                  if not args.quick or DEBIAN not in case.bases)
    if not cases:
        raise SetupError("--only leaves no case; cases: "
                         f"{', '.join(case.name for case in CASES)}")
    return cases


def _check_tools(args: argparse.Namespace) -> None:
    if os.geteuid() != 0:
        raise SetupError("must run as root (layerfs and buildah chroot into the builds)")
    missing = [tool for tool in ("buildah", "dpkg-deb") if shutil.which(tool) is None]
    if not args.layerfs.exists():
        missing.append(f"{args.layerfs} (run tools/setup)")
    for name in (BUSYBOX_LAYOUT, ALPINE_TARBALL):
        if not (args.images / name).exists():
            missing.append(str(args.images / name))
    if missing:
        raise SetupError(f"missing: {', '.join(missing)}")


BUSYBOX_LAYOUT = "busybox-1.38.0-musl-amd64-oci"
ALPINE_TARBALL = "alpine-minirootfs-3.20.3-x86_64.tar.gz"


def run_suite(args: argparse.Namespace, cases: tuple[Case, ...], runs: int) -> Path | None:
    """Build every case `runs` times with each tool; write the results; the markdown's path,
    or None if a build failed (the others still ran)."""
    started = time.perf_counter()
    results = report.Results(list(SYSTEMS), {
        f"{case.name}/{phase}": f"{case.name}: {phase}" for case in cases for phase in PHASES})
    if any(DEBIAN in case.bases for case in cases) and not args.tarball.exists():
        build_tarball(args.tarball)
    args.cache.mkdir(parents=True, exist_ok=True)
    machine = report.machine_facts(args.cache.resolve())
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="build-bench-", dir=args.cache)))
        own_forkserver(stack, scratch)
        bases = _prepare_bases(args, scratch / "bases", {b for c in cases for b in c.bases})
        for case in cases:
            ctx = write_context(case, scratch / "contexts" / case.name)
            edited = scratch / "contexts" / f"{case.name}.Dockerfile"
            edited.write_text(case.edited())
            for run_index in range(runs):
                order = SYSTEMS if run_index % 2 == 0 else SYSTEMS[::-1]
                for system in order:
                    results.note_load(case.name, system, run_index)
                    try:
                        _measure(args, system, case, ctx, edited, bases,
                                 scratch / f"{system}-{case.name}-{run_index}", results)
                    except CommandError as exc:
                        results.fail(case.name, system, run_index, exc)
            print(f"built {case.name}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    document: dict[str, object] = {
        "runs": runs, "cases": [case.name for case in cases], "machine": machine,
        "layerfs": run([str(args.layerfs), "--version"], capture=True).strip(),
        "buildah": run(["buildah", "--version"], capture=True).strip(),
        "timings": results.timings, "checks": results.checks, "failures": results.failures,
        "summary": results.summary(), "loads": results.loads,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    table = markdown(results, runs, str(document["layerfs"]), str(document["buildah"]))
    path = report.write_outputs(args.out, f"build-{stamp}", document, table)
    print(table)
    print(f"results: {path} and {path.with_suffix('.json')}")
    return None if results.failures else path


def _prepare_bases(args: argparse.Namespace, work: Path, names: set[str]) -> Bases:
    """Import Alpine and Debian once with layerfs and save them, the archives buildah pulls
    and layerfs loads (so both tools start from the same bytes)."""
    store = work / "store"
    archives: dict[str, Path] = {}
    for name in sorted(names - {BUSYBOX}):
        tarball = args.images / ALPINE_TARBALL if name == ALPINE else args.tarball
        changes = [arg for change in BASE_CHANGES[name] for arg in ("-c", change)]
        run([str(args.layerfs), "--root", str(store), "import", *changes, str(tarball), name],
            timeout=BUILD_TIMEOUT)
        archives[name] = work / f"{name.replace(':', '-')}.tar"
        run([str(args.layerfs), "--root", str(store), "save", "-o", str(archives[name]), name],
            timeout=BUILD_TIMEOUT)
    shutil.rmtree(store)
    return Bases(args.images / BUSYBOX_LAYOUT, archives)


def _measure(args: argparse.Namespace, system: str, case: Case, ctx: Path, edited: Path,
             bases: Bases, home: Path, results: report.Results) -> None:
    """The three builds of `case` with `system` in a new store under `home`, removed after."""
    tool = _Layerfs(args.layerfs, home) if system == "layerfs" else _Buildah(home)
    try:
        for name in case.bases:
            tool.load(name, bases)
        build_args = [arg for key, value in case.build_args.items()
                      for arg in ("--build-arg", f"{key}={value}")]
        tag = f"bench-{case.name}"
        expected = {"cached": 0, "changed": case.steps_after_edit()}
        for phase in PHASES:
            dockerfile = edited if phase == "changed" else ctx / "Dockerfile"
            began = time.perf_counter()
            output = tool.build(tag, dockerfile, ctx, build_args)
            seconds = time.perf_counter() - began
            ran = tool.steps_run(output)
            results.add_check(f"{case.name}/{phase}", system, {"steps_run": ran})
            if phase in expected and ran != expected[phase]:
                raise CommandError(f"{phase} build ran {ran} steps, not {expected[phase]}")
            results.add(f"{case.name}/{phase}", system, seconds)
    finally:
        tool.remove()


class _Layerfs:
    def __init__(self, program: Path, home: Path) -> None:
        self.base = [str(program), "--root", str(home / "store")]
        self.home = home

    def load(self, name: str, bases: Bases) -> None:
        source = bases.busybox_layout if name == BUSYBOX else bases.archives[name]
        run([*self.base, "load", "-i", str(source)], timeout=BUILD_TIMEOUT)

    def build(self, tag: str, dockerfile: Path, ctx: Path, build_args: list[str]) -> str:
        return run([*self.base, "build", "-t", tag, "-f", str(dockerfile), *build_args,
                    str(ctx)], capture=True, timeout=BUILD_TIMEOUT)

    @staticmethod
    def steps_run(output: str) -> int:
        return steps_run(output, _LAYERFS_STEP, _LAYERFS_CACHED)

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)


class _Buildah:
    def __init__(self, home: Path) -> None:
        self.base = ["buildah", "--root", str(home / "storage"), "--runroot", str(home / "run"),
                     "--storage-driver", "vfs"]
        self.home = home

    def load(self, name: str, bases: Bases) -> None:
        source = (f"oci:{bases.busybox_layout}" if name == BUSYBOX
                  else f"docker-archive:{bases.archives[name]}")
        image_id = run([*self.base, "pull", "-q", source], capture=True,
                       timeout=BUILD_TIMEOUT).split()[-1]
        run([*self.base, "tag", image_id, name])

    def build(self, tag: str, dockerfile: Path, ctx: Path, build_args: list[str]) -> str:
        return run([*self.base, "bud", "--isolation", "chroot", "--pull-never", "--layers",
                    "--format", "docker", "-t", tag, "-f", str(dockerfile), *build_args,
                    str(ctx)], capture=True, timeout=BUILD_TIMEOUT)

    @staticmethod
    def steps_run(output: str) -> int:
        return steps_run(output, _BUILDAH_STEP, _BUILDAH_CACHED)

    def remove(self) -> None:
        for argv in (["rm", "--all"], ["rmi", "--all", "--force"]):
            try:
                run([*self.base, *argv])
            except CommandError:
                pass  # the storage may be half made; rmtree below removes it anyway
        shutil.rmtree(self.home, ignore_errors=True)


def steps_run(output: str, step: re.Pattern[str], cached: str) -> int:
    """How many steps a build ran rather than took from its cache. FROM is no step that
    runs, and neither is an ARG before the first FROM (neither tool caches them)."""
    steps: list[tuple[str, bool]] = []  # (keyword, cached) per step, in order
    for line in output.splitlines():
        if match := step.match(line):
            steps.append((match.group(1).upper(), False))
        elif steps and line.startswith(cached):
            steps[-1] = (steps[-1][0], True)
    first_from = next((i for i, (keyword, _) in enumerate(steps) if keyword == "FROM"),
                      len(steps))
    return sum(1 for i, (keyword, was_cached) in enumerate(steps)
               if keyword != "FROM" and i > first_from and not was_cached)


def markdown(results: report.Results, runs: int, layerfs: str, buildah: str) -> str:
    summary = results.summary()
    lines = [f"### Builds of the Dockerfile corpus: {layerfs} vs {buildah}", "",
             f"Median seconds of {runs} run(s) (min - max); steps run (not from the cache) "
             "in parentheses.", "",
             "| case: build | layerfs | buildah | layerfs/buildah |",
             "| --- | ---: | ---: | ---: |"]
    ratios: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for key, label in results.labels.items():
        cells = []
        for system in SYSTEMS:
            stats = summary.get(key, {}).get(system)
            steps = results.checks.get(key, {}).get(system, [{}])[-1].get("steps_run", "?")
            cells.append(f"{stats['median']:.2f} ({stats['min']:.2f} - {stats['max']:.2f}) "
                         f"({steps})" if stats else "—")
        ours, theirs = (summary.get(key, {}).get(system) for system in SYSTEMS)
        ratio = ours["median"] / theirs["median"] if ours and theirs else None
        if ratio is not None:
            ratios[key.rsplit("/", 1)[1]].append(ratio)
        lines.append(f"| {label} | {' | '.join(cells)} | "
                     f"{f'{ratio:.2f}' if ratio is not None else '—'} |")
    lines += ["", "| build | geometric mean of layerfs/buildah | slowest layerfs/buildah |",
              "| --- | ---: | ---: |"]
    for phase, values in ratios.items():
        if values:
            lines.append(f"| {phase} | {statistics.geometric_mean(values):.2f} | "
                         f"{max(values):.2f} |")
    lines += report.footer(results, "cases")
    return "\n".join(lines) + "\n"
