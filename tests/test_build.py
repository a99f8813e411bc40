"""The compiled hot path and its pure-Python fallback (layerfs/build.py): which one runs, and
that `--version` says so. The rest of the suite runs whichever this run has (tools/test runs
it compiled, and a part of it again with LAYERFS_PURE=1)."""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from layerfs import build
from tests.fsapi import OVERLAY_CMD, daemon_pid, unmount

ROOT = Path(__file__).resolve().parent.parent
_EXTENSION = importlib.machinery.EXTENSION_SUFFIXES[0]
COMPILED_BUILD = all(Path(str(ROOT / source)[: -len(".py")] + _EXTENSION).exists()
                     for source in build.COMPILED)
needs_build = pytest.mark.skipif(not COMPILED_BUILD, reason="no compiled build installed")


def _version(env: dict[str, str], cwd: Path = Path("/")) -> str:
    return subprocess.run([sys.executable, "-c", "from layerfs.cli import overlay_main; "
                           "overlay_main.main(['--version'])"], capture_output=True, text=True,
                          env=env, cwd=cwd, check=False).stdout.strip()


@needs_build
def test_the_compiled_build_runs_unless_pure_is_asked_for() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LAYERFS_PURE"}
    assert _version(env).endswith("compiled (mypyc)")
    assert _version({**env, "LAYERFS_PURE": "1"}).endswith("pure Python (LAYERFS_PURE=1)")


@needs_build
def test_a_source_newer_than_its_build_makes_the_sources_run(tmp_path: Path) -> None:
    """An edit since the last install must not run stale compiled code: all sources run."""
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copytree(ROOT / "layerfs", copy / "layerfs", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for group in ROOT.glob("*__mypyc*"):
        shutil.copy2(group, copy)
    env = {k: v for k, v in os.environ.items() if k != "LAYERFS_PURE"}
    env["PYTHONPATH"] = str(copy)
    assert _version(env).endswith("compiled (mypyc)")
    edited = copy / "layerfs/overlay/tree.py"
    built = Path(str(edited)[: -len(".py")] + _EXTENSION).stat().st_mtime_ns
    os.utime(edited, ns=(built, built + 10**9))
    assert "layerfs/overlay/tree.py is newer than its compiled build" in _version(env)
    probe = "import layerfs.overlay.engine as m; print(m.__file__)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            env=env, cwd="/", check=True).stdout.strip()
    assert loaded == str(copy / "layerfs/overlay/engine.py")


@pytest.mark.parametrize("pure", [False, True])
def test_the_daemon_runs_the_build_it_says(pure: bool, tmp_path: Path) -> None:
    if not pure and not COMPILED_BUILD:
        pytest.skip("no compiled build installed")
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    mnt.mkdir()
    (lower / "f").write_bytes(b"f")
    env = {k: v for k, v in os.environ.items() if k != "LAYERFS_PURE"}
    if pure:
        env["LAYERFS_PURE"] = "1"
    subprocess.run([OVERLAY_CMD, "-o", f"lowerdir={lower}", str(mnt)], check=True, env=env,
                   timeout=30)
    try:
        assert (mnt / "f").read_bytes() == b"f"
        maps = Path(f"/proc/{daemon_pid(mnt)}/maps").read_text()
        assert ("__mypyc" in maps) is not pure
    finally:
        unmount(mnt)


@needs_build
def test_the_pure_build_passes_the_overlay_scenarios() -> None:
    """The fallback is tested too, on the tests that drive the hot path hardest (the rest of
    the suite runs the compiled build)."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_overlay_scenarios.py", "tests/test_fuse_session.py",
         "tests/test_overlay_passthrough.py"],
        cwd=ROOT, env={**os.environ, "LAYERFS_PURE": "1"}, capture_output=True, text=True,
        timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
