"""Lookups from several threads at once in directories not listed yet, as `git status` makes
them, while the daemon lists each lower directory once and keeps the listing
(`layerfs.overlay.lowers`): what every thread sees, cold and again warm, must be what the
kernel's overlayfs shows on the same layers (files of either lower, names a whiteout of the
top lower deletes, directories it makes opaque)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tests.fsapi import Layers, drop_caches, kernel_overlay, mounted_overlay

if TYPE_CHECKING:
    from pathlib import Path

DIRS = 120
FILES = 15
THREADS = 8


def _layers(base: Path) -> Layers:
    bottom, top, upper, work = (base / n for n in ("bottom", "top", "upper", "work"))
    for d in (bottom, top, upper, work):
        d.mkdir(parents=True)
    for i in range(DIRS):
        for j in range(FILES):
            path = bottom / f"d{i}" / f"f{j}"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(b"b" * (i + j))
        top_dir = top / f"d{i}"
        top_dir.mkdir()
        (top_dir / f"f{i % FILES}").write_bytes(b"top")  # hides the bottom's
        os.mknod(top_dir / f"f{(i + 1) % FILES}", 0o600 | 0o020000, 0)  # a whiteout
        (top_dir / f"new{i}").write_bytes(b"new")
        if i % 10 == 0:
            os.setxattr(top_dir, "trusted.overlay.opaque", b"y")
    return Layers([top, bottom], upper, work)


def _names() -> list[str]:
    names = [f"d{i}/f{j}" for i in range(DIRS) for j in range(FILES)]
    names += [f"d{i}/new{i}" for i in range(DIRS)] + [f"d{i}/missing" for i in range(DIRS)]
    return names


def _seen(mnt: Path) -> dict[str, tuple[int, int] | None]:
    """Each name's (mode, size), or None where it does not exist, looked up by THREADS
    threads at once, each through the names of its own directories first."""
    names = _names()
    drop_caches()

    def look(name: str) -> tuple[str, tuple[int, int] | None]:
        try:
            st = os.lstat(mnt / name)
        except FileNotFoundError:
            return name, None
        return name, (st.st_mode, st.st_size)

    shares = [names[k::THREADS] for k in range(THREADS)]
    with ThreadPoolExecutor(THREADS) as pool:
        results = pool.map(lambda share: [look(n) for n in share], shares)
        return dict(pair for share in results for pair in share)


def test_parallel_cold_lookups_see_what_the_kernels_overlay_shows(tmp_path: Path) -> None:
    seen = {}
    for name, mount in (("kernel", kernel_overlay), ("layerfs", mounted_overlay)):
        layers = _layers(tmp_path / name)
        mnt = tmp_path / name / "mnt"
        mnt.mkdir()
        with mount(layers, mnt):
            seen[name] = _seen(mnt)
            seen[f"{name} again"] = _seen(mnt)  # the listings kept
    assert seen["layerfs"] == seen["kernel"]
    assert seen["layerfs again"] == seen["kernel"]
    assert seen["kernel again"] == seen["kernel"]
    assert sum(v is None for v in seen["kernel"].values()) == DIRS * 2 + 12 * (FILES - 2)
