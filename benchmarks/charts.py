"""PNG charts of a summary (matplotlib, headless): ratio bars per workload and the copy-up curve.

Knows nothing about how timings were taken: it draws medians from `Results.summary()`. matplotlib
is an optional dependency (`pip install -e .[bench]`); without it the charts are left out with a
note on stderr and the rest of the results are written as usual. Every chart is written beside the
markdown that references it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path
    from types import ModuleType

Summary = dict[str, dict[str, dict[str, float]]]

# One colour per system across every chart, so that a reader learns them once.
COLOURS = {
    "layerfs": "#d62728", "fuse-overlayfs": "#1f77b4", "kernel": "#2ca02c", "plain": "#7f7f7f",
    "layerfs / peer": "#d62728", "layerfs-fsync=0": "#ff9896",
}
MARKERS = {"layerfs": "o", "layerfs-fsync=0": "v", "fuse-overlayfs": "s", "kernel": "^",
           "plain": "D"}
LABEL_WIDTH = 66  # characters of a row label kept on a bar chart's axis


def ratio_bars(
    path: Path, title: str, rows: Mapping[str, str], series: Mapping[str, Sequence[float | None]],
    reference: str,
) -> Path | None:
    """Horizontal grouped bars: for each row (key → label, top to bottom), one bar per series,
    on a log axis around a line at 1 (`reference`'s own time). A None value leaves a gap.
    Returns the path written, or None without matplotlib."""
    pyplot = _pyplot()
    if pyplot is None or not rows:
        return None
    labels = [_shorten(label) for label in rows.values()]
    names = list(series)
    height = 0.8 / max(1, len(names))
    figure, axes = pyplot.subplots(figsize=(10, 1.2 + 0.16 * len(labels) * max(2, len(names))))
    for index, name in enumerate(names):
        positions = [row + (index - (len(names) - 1) / 2) * height for row in range(len(labels))]
        values = [value if value is not None and value > 0 else float("nan")
                  for value in series[name]]
        axes.barh(positions, values, height=height, label=name, color=COLOURS.get(name))
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(f"median time relative to {reference} (log scale; < 1 is faster)")
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def system_ratios(
    summary: Summary, rows: Mapping[str, str], systems: Sequence[str], reference: str
) -> dict[str, list[float | None]]:
    """Each system's median over `reference`'s, per row; the reference itself is left out."""
    series: dict[str, list[float | None]] = {}
    for system in systems:
        if system == reference:
            continue
        values: list[float | None] = []
        for key in rows:
            ours, theirs = summary.get(key, {}).get(system), summary.get(key, {}).get(reference)
            values.append(ours["median"] / theirs["median"]
                          if ours and theirs and theirs["median"] > 0 else None)
        series[system] = values
    return series


def copy_up_curve(
    path: Path, title: str, summary: Summary, points: Mapping[str, int], systems: Sequence[str]
) -> Path | None:
    """Median first-write latency by file size, one line per system, log-log. `points` maps a
    row key to its file size. Returns the path written, or None without matplotlib or data."""
    pyplot = _pyplot()
    if pyplot is None:
        return None
    figure, axes = pyplot.subplots(figsize=(8, 5))
    drawn = False
    for system in systems:
        measured = [(size, summary[key][system]) for key, size in sorted(points.items(),
                                                                            key=lambda kv: kv[1])
                    if system in summary.get(key, {})]
        if not measured:
            continue
        sizes = [size for size, _ in measured]
        axes.plot(sizes, [stats["median"] for _, stats in measured], label=system,
                  color=COLOURS.get(system), marker=MARKERS.get(system, "o"))
        # min-max as a shaded band: the spread of the runs
        axes.fill_between(sizes, [stats["min"] for _, stats in measured],
                          [stats["max"] for _, stats in measured], color=COLOURS.get(system),
                          alpha=0.15, linewidth=0)
        drawn = True
    if not drawn:
        pyplot.close(figure)
        return None
    sizes = sorted(points.values())
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xticks(sizes, [_size_label(size) for size in sizes], fontsize=8)
    axes.set_xlabel("lower file size (log scale)")
    axes.set_ylabel("first write: open, pwrite 1 byte, close (seconds, log scale)")
    axes.set_title(title, fontsize=10)
    axes.grid(which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def _pyplot() -> ModuleType | None:
    """matplotlib.pyplot on the Agg backend, imported on first use (it takes ~0.5 s)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as pyplot
    except ImportError as exc:
        print(f"note: charts left out: matplotlib is not installed ({exc}); "
              "pip install -e '.[bench]'", file=sys.stderr)
        return None
    return pyplot


def _shorten(label: str) -> str:
    label = label.replace("`", "")
    return label if len(label) <= LABEL_WIDTH else label[: LABEL_WIDTH - 1] + "…"


def _size_label(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"
