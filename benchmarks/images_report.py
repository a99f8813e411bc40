"""The images benchmark's table: layerfs next to its peer and the floor, ratios, targets met.

Knows nothing about how timings were taken. Reuses `benchmarks.report` for the summary (median,
min, max) and its cell formatting; the overlay table has one column per system, this one has one
row per job, because each job has its own peer (umoci, fuse-overlayfs, skopeo+umoci) and floor.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from benchmarks import report
from benchmarks.report import _row, _seconds, _table_head

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

# What `layerfs mount` imports before it can do anything (the daemon forks from that process).
IMPORTS = "import layerfs.cli.main, layerfs.cli.commands_containers"
MOUNT_TARGET = 0.100  # seconds


@dataclass(frozen=True, slots=True)
class Cell:
    workload: str
    system: str
    name: str  # what the table calls it


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    layerfs: Cell
    peer: Cell | None = None
    floor: Cell | None = None
    target: str = ""  # "faster" (than the peer), "mount" (< MOUNT_TARGET), or "" for none


ROWS: tuple[Row, ...] = (
    Row("import Debian tarball", Cell("import", "layerfs", "`layerfs import`"),
        Cell("unpack", "umoci", "`umoci unpack`"), Cell("extract", "tar", "`tar -x`"), "faster"),
    Row("import, uncompressed blob", Cell("import_none", "layerfs",
                                          "`layerfs import --compression none`"),
        Cell("unpack", "umoci", "`umoci unpack`"), Cell("extract", "tar", "`tar -x`")),
    Row("load OCI layout", Cell("load", "layerfs", "`layerfs load`"),
        Cell("unpack", "umoci", "`umoci unpack`"), Cell("extract", "tar", "`tar -x`")),
    Row("mount image + stat", Cell("mount", "layerfs", "`layerfs mount`"),
        Cell("mount", "fuse-overlayfs", "fuse-overlayfs"), Cell("mount", "kernel", "kernel"),
        "mount"),
    Row("mount image + stat, no fork server", Cell("mount", "layerfs, no fork server",
                                                   "`LAYERFS_FORKSERVER=0 layerfs mount`"),
        Cell("mount", "fuse-overlayfs", "fuse-overlayfs"), Cell("mount", "kernel", "kernel")),
    Row("mount layer dir + stat", Cell("mount", "layerfs-overlay", "`layerfs-overlay`"),
        Cell("mount", "fuse-overlayfs", "fuse-overlayfs"), Cell("mount", "kernel", "kernel")),
    Row("commit {change_files} changed files", Cell("commit_many", "layerfs", "`layerfs commit`"),
        Cell("commit_many", "umoci", "`umoci repack`"),
        Cell("commit_many", "tar|gzip", "`tar \\| gzip -1` of upper"), "faster"),
    Row("commit 1 changed file", Cell("commit_one", "layerfs", "`layerfs commit`"),
        Cell("commit_one", "umoci", "`umoci repack`"),
        Cell("commit_one", "tar|gzip", "`tar \\| gzip -1` of upper")),
    Row("pull + unpack (loopback registry)", Cell("pull", "layerfs", "`layerfs pull`"),
        Cell("pull", "skopeo+umoci", "`skopeo copy` + `umoci unpack`"), None, "faster"),
    Row("`dpkg -i` of {debs} .debs in a chroot of the image", Cell("dpkg", "layerfs",
                                                                   "`layerfs mount`"),
        Cell("dpkg", "fuse-overlayfs", "fuse-overlayfs"), Cell("dpkg", "kernel", "kernel"),
        "faster"),
)

# Rows that are not compared but explain others (components, setup steps).
DETAILS: tuple[Row, ...] = (
    Row("pull: `skopeo copy` alone", Cell("pull_copy", "skopeo", "`skopeo copy`")),
    Row("pull: `umoci unpack` alone", Cell("pull_unpack", "umoci", "`umoci unpack`")),
    Row("commit setup: apply {change_files} changes through the mount",
        Cell("change_many", "layerfs", "layerfs mount"),
        Cell("change_many", "plain dir", "umoci's rootfs")),
    Row("`dpkg -i`: plain copy of the image", Cell("dpkg", "plain dir", "plain dir")),
    Row("python -c pass", Cell("py_start", "python", "python")),
    Row(f"python -c '{IMPORTS}'", Cell("cli_imports", "python", "python")),
    Row("the same, ending with `os._exit(0)`", Cell("cli_imports_exit", "python", "python")),
)

Summary = dict[str, dict[str, dict[str, float]]]


def _stats(summary: Summary, cell: Cell | None) -> dict[str, float] | None:
    return summary.get(cell.workload, {}).get(cell.system) if cell else None


def _median(summary: Summary, cell: Cell | None) -> str:
    stats = _stats(summary, cell)
    return _seconds(stats["median"]) if stats else "—"


def _range(summary: Summary, cell: Cell | None) -> str:
    stats = _stats(summary, cell)
    return f"{_seconds(stats['min'])} - {_seconds(stats['max'])}" if stats else "—"


def ratio(summary: Summary, row: Row) -> float | None:
    ours, theirs = _stats(summary, row.layerfs), _stats(summary, row.peer)
    if not ours or not theirs or theirs["median"] <= 0:
        return None
    return ours["median"] / theirs["median"]


def target(summary: Summary, row: Row) -> tuple[str, bool | None]:
    """The target's wording and whether the medians meet it (None: no target or no data)."""
    if row.target == "faster" and row.peer is not None:
        value = ratio(summary, row)
        return f"faster than {row.peer.name}", None if value is None else value < 1
    if row.target == "mount":
        stats = _stats(summary, row.layerfs)
        return f"< {MOUNT_TARGET * 1000:.0f} ms", None if not stats else (
            stats["median"] < MOUNT_TARGET)
    return "", None


def targets(summary: Summary, facts: dict[str, object]) -> list[dict[str, object]]:
    """The targets as data, for the JSON."""
    found: list[dict[str, object]] = []
    for row in ROWS:
        wording, met = target(summary, row)
        if wording and _measured(summary, row):
            found.append({"row": row.label.format(**_counts(facts)), "target": wording,
                          "met": met, "ratio": ratio(summary, row)})
    return found


def _measured(summary: Summary, row: Row) -> bool:
    return any(_stats(summary, cell) for cell in (row.layerfs, row.peer, row.floor))


def markdown(results: report.Results, title: str, facts: dict[str, object],
             import_samples: list[dict[str, float]],
             charts: Sequence[tuple[str, Path]] = ()) -> str:
    """The compared rows (those with any timing), their ranges and details, the mount
    breakdown and commit scaling where measured, the `charts`, then load and failures."""
    summary = results.summary()
    counts = _counts(facts)
    lines = [f"### {title}", "",
             "Median seconds (lower is better); each row names its peer and its floor.", "",
             *_table_head(["workload", "layerfs", "peer", "peer s", "layerfs/peer", "floor",
                           "floor s", "target", "met?"])]
    for row in (row for row in ROWS if _measured(summary, row)):
        value = ratio(summary, row)
        wording, met = target(summary, row)
        lines.append(_row([
            f"{row.label.format(**counts)} ({row.layerfs.name})", _median(summary, row.layerfs),
            row.peer.name if row.peer else "—", _median(summary, row.peer),
            f"{value:.2f}" if value is not None else "—",
            row.floor.name if row.floor else "—", _median(summary, row.floor),
            wording or "—", {True: "**yes**", False: "**no**", None: "—"}[met] if wording else "—",
        ]))
    lines += ["", "Min - max seconds, and the details.", "",
              *_table_head(["workload", "layerfs", "peer", "floor"])]
    for row in (row for row in ROWS + DETAILS if _measured(summary, row)):
        lines.append(_row([row.label.format(**counts), _range(summary, row.layerfs),
                           _range(summary, row.peer), _range(summary, row.floor)]))
    if "mount" in summary:
        lines += ["", *_mount_breakdown(summary, import_samples)]
    if scaling := _commit_scaling(summary, counts):
        lines += ["", *scaling]
    lines += report.chart_lines(charts)
    lines += report.footer(results, "trials")
    return "\n".join(lines) + "\n"


def parse_importtime(output: str) -> dict[str, float]:
    """`python -X importtime` output → self import time in seconds, by the package that caused it.

    A module's self time goes to the nearest module on its import chain (itself included) that
    is not in the standard library, by top-level package: `ssl` imported by trio counts for
    trio, `importlib.metadata` imported by pyfuse3 for pyfuse3, `json` imported by layerfs for
    layerfs. Standard modules that nothing else caused (site, encodings) are `python start-up`.
    `total` is the sum of every self time.
    """
    parsed = []
    for line in output.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        fields = line.removeprefix("import time:").split("|")
        if len(fields) != 3:
            continue
        name = fields[2].lstrip()
        depth = (len(fields[2]) - len(name) - 1) // 2  # two spaces per level after one space
        parsed.append((int(fields[0]) / 1e6, depth, name.strip().split(".")[0]))
    by_package: dict[str, float] = {}
    # Lines come children first; read backwards, a module's parent is the last one seen a level up.
    cause_at_depth: dict[int, str | None] = {}
    for seconds, depth, top in reversed(parsed):
        is_standard = top in sys.stdlib_module_names or top.startswith("_")
        cause = None if is_standard else top
        if cause is None and depth > 0:
            cause = cause_at_depth.get(depth - 1)
        cause_at_depth[depth] = cause
        package = cause or "python start-up"
        by_package[package] = by_package.get(package, 0.0) + seconds
        by_package["total"] = by_package.get("total", 0.0) + seconds
    return by_package


def median_imports(samples: list[dict[str, float]]) -> dict[str, float]:
    packages = {package for sample in samples for package in sample}
    return {package: statistics.median(sample.get(package, 0.0) for sample in samples)
            for package in packages}


def _mount_breakdown(summary: Summary, import_samples: list[dict[str, float]]) -> list[str]:
    served = summary.get("mount", {}).get("layerfs")
    alone = summary.get("mount", {}).get("layerfs, no fork server")
    start = summary.get("py_start", {}).get("python")
    imports = summary.get("cli_imports", {}).get("python")
    no_exit = summary.get("cli_imports_exit", {}).get("python")
    if not served or not alone or not start or not imports or not no_exit:
        return ["Mount breakdown: not measured."]
    floor = start["median"]
    shutdown = max(imports["median"] - no_exit["median"], 0.0)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms"

    lines = [
        f"Where `layerfs mount` spends its {ms(served['median'])} (medians): the client's "
        f"interpreter start-up {ms(floor)}; the rest ({ms(served['median'] - floor)}) is "
        f"handing the command to the fork server and the forked command (CLI dispatch, "
        f"container dir and state, the daemon's fork, FUSE init and mount) and the `stat`.",
        "",
        f"Without the fork server it takes {ms(alone['median'])}: interpreter start-up "
        f"{ms(floor)}, importing `layerfs.cli.main` and `layerfs.cli.commands_containers` "
        f"{ms(no_exit['median'] - floor)}, everything else "
        f"{ms(max(alone['median'] - no_exit['median'], 0.0))} (the command ends with "
        f"`os._exit`, skipping the interpreter's shutdown, which would add {ms(shutdown)}).",
    ]
    if import_samples:
        medians = median_imports(import_samples)
        ranked = sorted(((seconds, package) for package, seconds in medians.items()
                         if package != "total"), reverse=True)
        parts = ", ".join(f"{package} {seconds * 1000:.0f}" for seconds, package in ranked[:8])
        lines.append(f"Import time by the package that caused it (`python -X importtime`, which "
                     f"inflates it; a standard module counts for the package importing it; "
                     f"median of {len(import_samples)}, total {medians['total'] * 1000:.0f} ms), "
                     f"in ms: {parts}.")
    return lines


def _commit_scaling(summary: Summary, counts: dict[str, object]) -> list[str]:
    many = summary.get("commit_many", {}).get("layerfs")
    one = summary.get("commit_one", {}).get("layerfs")
    if not many or not one:
        return []
    return [f"Commit scaling: 1 changed file takes {one['median']:.3g} s, "
            f"{one['median'] / many['median'] * 100:.1f}% of the {counts['change_files']} "
            f"file commit ({many['median']:.3g} s)."]


def _counts(facts: dict[str, object]) -> dict[str, object]:
    return {key: f"{value:,}" if isinstance(value, int) else value for key, value in facts.items()}
