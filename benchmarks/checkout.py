"""A git checkout of many small files as a lower layer of its own, for the `git status` rows.

Owns `CACHE/checkout-<files>-v<N>/`: `lower/repo/` is a repository with one commit of `files`
text files (200 per directory, 100-300 bytes each) and their checkout, made in place, so that
the index records the lower files' own inodes and times. It is a layer of its own, apart from
the main layers, so that adding it changed no other row. `READY` is written last.

The overlays mount it as their only lower; the plain directory gets a `cp -a` copy per run
(`git status` writes the index, and the lower must not change).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from typing import TYPE_CHECKING

from benchmarks.procs import run

if TYPE_CHECKING:
    from pathlib import Path

    from benchmarks.layers import Layers

CHECKOUT_VERSION = 1
REPO = "repo"
FILES_PER_DIR = 200


def ensure_checkout(cache_dir: Path, layers: Layers, files: int) -> Layers:
    """The main `layers` with this checkout as their one lower (built first if missing)."""
    root = cache_dir / f"checkout-{files}-v{CHECKOUT_VERSION}"
    if not (root / "READY").exists():
        _build(root, files)
    lower = root / "lower"
    facts = {**layers.facts, "checkout": json.loads((root / "READY").read_text())}
    return dataclasses.replace(layers, root=root, lowers=(lower,), plain=lower, facts=facts)


def _build(root: Path, files: int) -> None:
    partial = root.with_name(root.name + ".partial")
    for stale in (partial, root):
        if stale.exists():
            shutil.rmtree(stale)
    started = time.perf_counter()
    print(f"building a git checkout of {files:,} files in {root} (once)...", flush=True)
    repo = partial / "lower" / REPO
    for index in range(files):
        directory = repo / "src" / f"d{index // FILES_PER_DIR:04d}"
        if index % FILES_PER_DIR == 0:
            directory.mkdir(parents=True)
        line = f"file {index:06d}: {'lorem ipsum ' * (index % 20)}\n"
        (directory / f"f{index:06d}.txt").write_text(line * 2)
    git = ["git", "-C", str(repo), "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    run([*git, "init", "-q"])
    run([*git, "add", "-A"])
    run([*git, "commit", "-q", "-m", "the benchmark's checkout"])
    facts = {"files": files, "build_seconds": round(time.perf_counter() - started, 1)}
    (partial / "READY").write_text(json.dumps(facts, indent=2) + "\n")
    run(["sync"])
    partial.rename(root)
