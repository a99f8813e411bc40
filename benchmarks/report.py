"""Results: raw timings, their summary, the markdown table and the machine facts.

Knows nothing about how timings were taken; it only turns them into the JSON and markdown files
(charts are `benchmarks.charts`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import mounts
from benchmarks.procs import REPO_ROOT, CommandError, run
from benchmarks.systems import NO_FSYNC

if TYPE_CHECKING:
    from collections.abc import Sequence

EQUAL_DURABILITY = "layerfs@fuse-overlayfs's durability"
"""A column that is not a system: layerfs-fsync=0 where it ran (the rows that fsync copied-up
data), else layerfs (where fsync=0 changes nothing): layerfs at fuse-overlayfs's durability."""
RATIOS = (("layerfs", "kernel"), (EQUAL_DURABILITY, "fuse-overlayfs"))
CPU_SYSTEMS = ("layerfs", NO_FSYNC, "fuse-overlayfs")
"""The systems with a daemon whose CPU time is recorded (the kernel's has none to read)."""


@dataclass(slots=True)
class Results:
    systems: list[str]
    labels: dict[str, str]  # workload key → row label, in row order
    timings: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    failures: list[dict[str, object]] = field(default_factory=list)
    # The 1-minute load average as each group started: other work on the CPUs explains outliers.
    loads: list[dict[str, object]] = field(default_factory=list)
    # Facts a workload records beside its timing (e.g. blocks allocated): key → system → runs.
    checks: dict[str, dict[str, list[dict[str, object]]]] = field(default_factory=dict)
    # A FUSE daemon's CPU seconds (user + system) during each measurement: key → system → runs.
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def note_load(self, group: str, system: str, run_index: int) -> None:
        load = float(Path("/proc/loadavg").read_text().split()[0])
        self.loads.append({"group": group, "system": system, "run": run_index, "load1": load})

    def add(self, workload: str, system: str, seconds: float) -> None:
        self.timings.setdefault(workload, {}).setdefault(system, []).append(seconds)

    def add_cpu(self, workload: str, system: str, seconds: float) -> None:
        self.cpu.setdefault(workload, {}).setdefault(system, []).append(seconds)

    def add_check(self, workload: str, system: str, facts: dict[str, object]) -> None:
        self.checks.setdefault(workload, {}).setdefault(system, []).append(facts)

    def fail(self, group: str, system: str, run_index: int, error: BaseException) -> None:
        self.failures.append(
            {"group": group, "system": system, "run": run_index, "error": str(error)}
        )

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        return {
            workload: {
                system: {
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "runs": len(values),
                    **self._cpu_summary(workload, system),
                }
                for system, values in by_system.items()
            }
            for workload, by_system in self.timings.items()
        }

    def _cpu_summary(self, workload: str, system: str) -> dict[str, float]:
        values = self.cpu.get(workload, {}).get(system)
        if not values:
            return {}
        return {"cpu_median": statistics.median(values), "cpu_min": min(values),
                "cpu_max": max(values)}


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one suite wrote, for the combined summary of `python -m benchmarks all`."""

    suite: str
    markdown: Path
    json: Path
    charts: tuple[Path, ...]
    failures: int
    wall_seconds: float
    summary: dict[str, dict[str, dict[str, float]]]  # `Results.summary()`
    labels: dict[str, str]  # workload key → label
    facts: dict[str, object]  # the inputs' facts (counts named in labels)
    machine: dict[str, object]


def markdown(results: Results, title: str, notes: Sequence[str] = (),
             charts: Sequence[tuple[str, Path]] = ()) -> str:
    """Medians in seconds with layerfs ratios, then min-max per cell, then `notes` (paragraphs),
    the `charts` (alt text, PNG next to the markdown) and any failures."""
    summary = results.summary()
    present = {*results.systems, *([EQUAL_DURABILITY] * ("layerfs" in results.systems))}
    ratios = [pair for pair in RATIOS if set(pair) <= present]
    header = ["workload", *results.systems,
              *(f"layerfs/{b} (equal durability)" if a == EQUAL_DURABILITY else f"{a}/{b}"
                for a, b in ratios)]
    lines = [f"### {title}", "", "Median seconds (lower is better). The ratio to "
             "fuse-overlayfs is at equal durability: layerfs-fsync=0 on the rows where it ran "
             "(layerfs fsyncs copied-up data there, fuse-overlayfs does not), layerfs elsewhere.",
             "", *_table_head(header)]
    for key, label in results.labels.items():
        cells = [_median_cell(summary, key, system) for system in results.systems]
        cells += [_ratio_cell(summary, key, a, b) for a, b in ratios]
        lines.append(_row([label, *cells]))
    lines += ["", "Min - max seconds.", "", *_table_head(["workload", *results.systems])]
    for key, label in results.labels.items():
        lines.append(_row([label, *(_range_cell(summary, key, s) for s in results.systems)]))
    lines += _cpu_table(results, summary)
    for note in notes:
        lines += ["", note]
    lines += chart_lines(charts)
    lines += footer(results, "groups")
    return "\n".join(lines) + "\n"


def chart_lines(charts: Sequence[tuple[str, Path]]) -> list[str]:
    """Markdown images, linked by file name: the charts live next to the markdown."""
    lines: list[str] = []
    for alt, path in charts:
        lines += ["", f"![{alt}]({path.name})"]
    return lines


def footer(results: Results, units: str) -> list[str]:
    """The load the runs met and what failed, under a table."""
    lines: list[str] = []
    if results.loads:
        loads = [float(str(entry["load1"])) for entry in results.loads]
        lines += ["", f"1-minute load average as {units} started: {min(loads):.1f} - "
                      f"{max(loads):.1f} (median {statistics.median(loads):.1f}) "
                      f"on {os.cpu_count()} CPUs."]
    if results.failures:
        lines += ["", "Failures:", ""]
        lines += [f"- {f['system']} / {f['group']} (run {f['run']}): {f['error']}"
                  for f in results.failures]
    return lines


def machine_facts(cache_dir: Path) -> dict[str, object]:
    cache_fs = mounts.filesystem_of(cache_dir)
    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory": _meminfo("MemTotal"),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        # Other FUSE and overlay mounts hint at other work sharing the CPUs during the run.
        "other_fuse_or_overlay_mounts": sum(
            1 for entry in mounts.mount_entries()
            if (entry.fs_type == "overlay" or entry.fs_type.startswith("fuse"))
            and not entry.mount_point.startswith(str(cache_dir) + "/")
        ),
        "cache_dir": str(cache_dir),
        "cache_dir_filesystem": {"type": cache_fs.fs_type, "source": cache_fs.source,
                                 "options": cache_fs.mount_options,
                                 "super_options": cache_fs.super_options},
        "cache_dir_ext4_journal": _ext4_journal(cache_fs.source),
        "page_cache_reclaim": _damon_pageout(),
        "python": platform.python_version(),
        "fusermount3": _first_line(["fusermount3", "--version"]),
        "layerfs_git": _first_line(["git", "-C", str(REPO_ROOT), "describe", "--always",
                                    "--dirty"]),
    }


def write_outputs(out_dir: Path, stem: str, document: dict[str, object], table: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(document, indent=2) + "\n")
    (out_dir / f"{stem}.md").write_text(table)
    return out_dir / f"{stem}.md"


def _table_head(header: list[str]) -> list[str]:
    return [_row(header), _row(["---", *(["---:"] * (len(header) - 1))])]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _median_cell(summary: dict[str, dict[str, dict[str, float]]], key: str, system: str) -> str:
    stats = summary.get(key, {}).get(system)
    return _seconds(stats["median"]) if stats else "—"


def _range_cell(summary: dict[str, dict[str, dict[str, float]]], key: str, system: str) -> str:
    stats = summary.get(key, {}).get(system)
    return f"{_seconds(stats['min'])} - {_seconds(stats['max'])}" if stats else "—"


def _cpu_table(results: Results, summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Each daemon's CPU seconds per row (median), and layerfs's over fuse-overlayfs's."""
    systems = [system for system in CPU_SYSTEMS if system in results.systems]
    if not results.cpu or not systems:
        return []
    lines = ["", "Daemon CPU seconds, user + system, during the workload (median; /proc/PID/stat, "
             f"in ticks of {1 / mounts.CLOCK_TICKS:g} s).", "",
             *_table_head(["workload", *systems, "layerfs/fuse-overlayfs"])]
    for key, label in results.labels.items():
        if key not in results.cpu:
            continue
        cells = []
        for system in systems:
            stats = summary.get(key, {}).get(system, {})
            cells.append(f"{stats['cpu_median']:.2f}" if "cpu_median" in stats else "—")
        ours = summary.get(key, {}).get("layerfs", {}).get("cpu_median")
        theirs = summary.get(key, {}).get("fuse-overlayfs", {}).get("cpu_median")
        cells.append(f"{ours / theirs:.2f}" if ours is not None and theirs else "—")
        lines.append(_row([label, *cells]))
    return lines


def equal_durability(summary: dict[str, dict[str, dict[str, float]]],
                     key: str) -> dict[str, float] | None:
    """layerfs's stats at fuse-overlayfs's durability (see EQUAL_DURABILITY)."""
    by_system = summary.get(key, {})
    return by_system.get(NO_FSYNC) or by_system.get("layerfs")


def _ratio_cell(summary: dict[str, dict[str, dict[str, float]]], key: str, a: str, b: str) -> str:
    ours = (equal_durability(summary, key) if a == EQUAL_DURABILITY
            else summary.get(key, {}).get(a))
    theirs = summary.get(key, {}).get(b)
    if not ours or not theirs or theirs["median"] <= 0:
        return "—"
    return f"{ours['median'] / theirs['median']:.2f}"


def _seconds(value: float) -> str:
    # Three significant digits, but never scientific notation: 0.000123, 0.0123, 1.23, 123.
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.6f}"


def _ext4_journal(source: str) -> str:
    # Without a journal ext4 delays reusing freed inodes by 60 s, which shapes create timings.
    task = Path("/sys/fs/ext4") / Path(source).name / "journal_task"
    return task.read_text().strip() if task.exists() else "not ext4 or unknown"


def _damon_pageout() -> str:
    """Describe a DAMON `pageout` scheme, which evicts page cache left idle (warm data decays)."""
    kdamonds = Path("/sys/kernel/mm/damon/admin/kdamonds")
    found = []
    for action in sorted(kdamonds.glob("*/contexts/*/schemes/*/action")):
        scheme = action.parent
        if action.read_text().strip() == "pageout":
            age = (scheme / "access_pattern/age/min").read_text().strip()
            quota = (scheme / "quotas/bytes").read_text().strip()
            found.append(f"DAMON pageout of regions idle for >= {age} aggregation intervals, "
                         f"quota {quota} bytes per reset interval")
    return "; ".join(found) or "none found"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _meminfo(key: str) -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _first_line(argv: list[str]) -> str:
    try:
        return run(argv, capture=True, timeout=30).strip().splitlines()[0]
    except (CommandError, OSError, IndexError) as exc:
        return f"unknown ({exc})"
