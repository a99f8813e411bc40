"""The lower listings the engine keeps: bounded, and the same tree when read again."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from layerfs.overlay import lowers
from layerfs.overlay.engine import Engine
from tests.fsapi import EngineFS

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

DIRS, FILES = 40, 15


def build(base: Path) -> tuple[list[bytes], bytes, bytes]:
    top, bottom, upper, work = (base / name for name in ("top", "bottom", "upper", "work"))
    for path in (top, bottom, upper, work):
        path.mkdir(parents=True)
    for d in range(DIRS):
        for layer in (top, bottom):
            (layer / f"d{d}").mkdir()
        for f in range(FILES):
            layer = top if f % 2 else bottom
            (layer / f"d{d}" / f"f{f}").write_bytes(f"{layer.name} {d} {f}".encode())
    (top / "d0" / ".wh.f2").write_bytes(b"")  # a whiteout in the top layer hides a bottom file
    return [os.fsencode(top), os.fsencode(bottom)], os.fsencode(upper), os.fsencode(work)


def walk(fs: EngineFS) -> dict[str, tuple[int, int, bytes]]:
    seen: dict[str, tuple[int, int, bytes]] = {}
    for d in sorted(fs.listdir("")):
        for name in sorted(fs.listdir(d)):
            path = f"{d}/{name}"
            st = fs.stat(path)
            seen[path] = (st.st_ino, st.st_size, fs.read(path))
    return seen


def test_a_small_budget_bounds_the_listings_and_changes_nothing_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unbounded = Engine(*build(tmp_path / "a"))
    expected = walk(EngineFS(unbounded))
    assert unbounded.lowers.cached_entries > 2 * DIRS * FILES // 2

    budget = 2 * (DIRS + 1) + 4 * (FILES + 1)  # both roots and a few directories
    monkeypatch.setattr(lowers, "LISTING_BUDGET", budget)
    bounded = Engine(*build(tmp_path / "b"))
    fs = EngineFS(bounded)
    first = walk(fs)
    assert bounded.lowers.cached_entries <= budget < unbounded.lowers.cached_entries
    again = walk(fs)  # every listing read anew, numbers and contents as before

    def relative(seen: dict[str, tuple[int, int, bytes]]) -> dict[str, tuple[int, bytes]]:
        return {path: (size, data) for path, (_, size, data) in seen.items()}  # numbers differ

    assert relative(first) == relative(expected)
    assert again == first
    assert "d0/f2" not in first and "d0/f3" in first
    assert len(first) == DIRS * FILES - 1
