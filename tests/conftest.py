"""Shared pytest configuration: the `--long` option for the long differential run, and a
fork server runtime dir of the run's own."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the tests marked `long`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long run: use --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def forkserver_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every `layerfs mount` of the run goes through a fork server of the run's own, as a
    user's would (the first one starts it); the run stops it at the end."""
    runtime = tmp_path_factory.mktemp("runtime")
    runtime.chmod(0o700)
    saved = os.environ.get("LAYERFS_RUNTIME_DIR")
    os.environ["LAYERFS_RUNTIME_DIR"] = str(runtime)
    try:
        yield runtime
    finally:
        if saved is None:
            del os.environ["LAYERFS_RUNTIME_DIR"]
        else:
            os.environ["LAYERFS_RUNTIME_DIR"] = saved
        stop_forkservers(runtime)


def stop_forkservers(runtime: Path, timeout: float = 10.0) -> None:
    """SIGTERM the fork servers a run started in `runtime` (their pids are in the lock files)
    and wait until they are gone."""
    pids = []
    for lock in runtime.glob("forkserver-*.lock"):
        text = lock.read_text().strip()
        if text.isdigit():
            pids.append(int(text))
    for pid in pids:
        if is_forkserver(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(is_forkserver(pid) for pid in pids):
        assert time.monotonic() < deadline, f"fork servers {pids} still running"
        time.sleep(0.01)


def is_forkserver(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return b"layerfs.cli.forkserver" in cmdline and state not in (b"Z", b"X")
