"""The paragraphs under the overlay suite's table: what its checks found, row by row.

Knows the check records the workloads write (`benchmarks.workloads`: the sparse file's
allocation, the big file's folios, the loop filesystems' used space and shared extents) and
turns them into sentences; the timings are `benchmarks.report`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.filesystems import KINDS as FILESYSTEM_KINDS
from benchmarks.layers import MiB, size_name
from benchmarks.workloads import filesystem_key

if TYPE_CHECKING:
    from benchmarks.layers import Layers
    from benchmarks.report import Results


def notes(results: Results, layers: Layers, skipped: dict[str, str]) -> list[str]:
    """Paragraphs on the checks (the sparse file's holes, the big file's folios, the clones)
    and on the loop filesystems that were left out (`skipped`: kind → why)."""
    return [*_sparse_note(results, layers), *_folio_note(results),
            *_clone_note(results, layers), *_skipped_note(skipped)]


def _clone_note(results: Results, layers: Layers) -> list[str]:
    """A paragraph on the copy-ups on the loop filesystems: a clone or a copy, per system?"""
    size = int(str(layers.facts["big_file_bytes"]))
    rows = []
    for kind in FILESYSTEM_KINDS:
        by_system = results.checks.get(filesystem_key(kind), {})
        parts = [f"{system} {_clone_verdict(by_system[system], size)}"
                 for system in results.systems if by_system.get(system)]
        if parts:
            rows.append(f"{kind}: {', '.join(parts)}")
    if not rows:
        return []
    return [f"Copy-up of the {size_name(size)} file on the loop filesystems: how much the "
            "filesystem's used space grew during the first write (largest of the runs, after a "
            "sync), and how much of the copy is in extents shared with another file (FIEMAP, "
            "smallest of the runs). The plain dir's copy was made by `cp -a` before the clock "
            "started, so its growth is the write alone; its sharing says whether `cp` cloned. "
            + "; ".join(rows) + "."]


def _clone_verdict(entries: list[dict[str, object]], size: int) -> str:
    """`+0.1 MiB, 256 MiB shared (a clone)`: a clone leaves most of the copy's extents shared
    with the lower file (all but the block the first write unshared) and takes a few blocks; a
    copy shares nothing and takes the file's size. Sharing decides where FIEMAP answered."""
    if not all(entry.get("copy_found") for entry in entries):
        return "(no copy found in the upper dir)"
    growths = [int(str(entry["fs_used_bytes_after"])) - int(str(entry["fs_used_bytes_before"]))
               for entry in entries]
    shares = [int(str(entry["shared_bytes"])) for entry in entries
              if entry.get("shared_bytes") is not None]
    cloned = min(shares) > size // 2 if shares else max(growths) < size // 2
    shared = f", {min(shares) / MiB:,.0f} MiB shared" if shares else ""
    return f"+{max(growths) / MiB:,.1f} MiB{shared} ({'a clone' if cloned else 'a copy'})"


def _skipped_note(skipped: dict[str, str]) -> list[str]:
    if not skipped:
        return []
    return ["Left out: " + "; ".join(f"`{filesystem_key(kind)}` ({kind}: {reason})"
                                     for kind, reason in skipped.items()) + "."]


def _folio_note(results: Results) -> list[str]:
    """How each system cached the big file, as folio sizes: why a warm read costs what it does."""
    checks = results.checks.get("read_big_warm")
    if not checks:
        return []
    parts = []
    for system in results.systems:
        found = [entry.get("folios_first_64MiB") for entry in checks.get(system, [])]
        histogram = next((value for value in reversed(found) if isinstance(value, dict)), None)
        if histogram:
            parts.append(f"{system} " + " + ".join(f"{count:,} x {size}"
                                                   for size, count in histogram.items()))
    if not parts:
        return []
    return ["Page-cache folios holding the first 64 MiB of the big file after its warm read "
            "(last run; through the mount, from /proc/kpageflags): " + "; ".join(parts) + ". "
            "A warm read costs the kernel a lookup and an LRU update per folio."]


def _sparse_note(results: Results, layers: Layers) -> list[str]:
    """A paragraph on the sparse file: did each system's copy keep its holes?"""
    checks = results.checks.get("copy_up_sparse")
    if not checks:
        return []
    lower = int(str(layers.facts["sparse_allocated_bytes"]))
    parts = []
    for system in results.systems:
        stored = [entry.get("stored_allocated_bytes") for entry in checks.get(system, [])]
        sizes = [int(str(value)) for value in stored if value is not None]
        if not sizes:
            if system in checks:
                parts.append(f"{system}: no copy found")
            continue
        biggest = max(sizes)
        verdict = "holes kept" if biggest <= 2 * lower + (1 << 20) else "**holes filled**"
        parts.append(f"{system} {biggest / (1 << 20):,.1f} MiB ({verdict})")
    size = size_name(int(str(layers.facts["sparse_bytes"])))
    return [f"Sparse file: space the {size} file's copy takes after its first write "
            f"(`st_blocks` of the upper copy; the lower file takes {lower / (1 << 20):,.1f} "
            f"MiB): {', '.join(parts)}."]
