"""Committing a live container: its daemon holds every change while the commit reads the
upper dir (as docker pauses a container), reads go on, and writers resume afterwards."""

from __future__ import annotations

import subprocess
import tarfile
import time
from typing import TYPE_CHECKING

import pytest

from layerfs.services import containers as containers_service
from layerfs.store.store import Store
from tests.fsapi import VENV_BIN, is_mounted

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

LAYERFS = str(VENV_BIN / "layerfs")


def layerfs(root: Path, *args: str) -> str:
    result = subprocess.run([LAYERFS, "--root", str(root), *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    root, mnt = tmp_path / "store", tmp_path / "mnt"
    mnt.mkdir()
    tarball = tmp_path / "root.tar"
    with tarfile.open(tarball, "w") as tar:
        for name in ("etc", "data"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
    layerfs(root, "import", str(tarball), "base:1")
    layerfs(root, "mount", "--name", "live", "base:1", str(mnt))
    yield root, mnt, "live"
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)


def test_a_frozen_mount_holds_writers_and_serves_readers(mounted: tuple[Path, Path, str]
                                                         ) -> None:
    root, mnt, name = mounted
    (mnt / "etc" / "before").write_text("before\n")
    store = Store(root)
    container = containers_service.find(store, name)
    with containers_service.frozen(store, container):
        writer = subprocess.Popen(["sh", "-c", f"echo during > {mnt}/data/during"])
        assert (mnt / "etc" / "before").read_text() == "before\n"  # reads go on
        time.sleep(0.3)  # long enough for an unheld write to finish many times over
        assert writer.poll() is None, "a write went through a frozen mount"
        upper = containers_service.upper_dir(store, container)
        assert not (upper / "data" / "during").exists()
    assert writer.wait(timeout=30) == 0
    assert (mnt / "data" / "during").read_text() == "during\n"


def test_commit_of_a_live_container_sees_what_was_written(mounted: tuple[Path, Path, str]
                                                           ) -> None:
    root, mnt, name = mounted
    (mnt / "data" / "file").write_text("committed\n")
    image_id = layerfs(root, "commit", name, "live:1").strip()
    assert image_id.startswith("sha256:")
    (mnt / "data" / "after").write_text("after the commit\n")  # the mount is thawed
    check = mnt.parent / "check"
    check.mkdir()
    layerfs(root, "mount", "live:1", str(check))
    try:
        assert (check / "data" / "file").read_text() == "committed\n"
        assert not (check / "data" / "after").exists()
    finally:
        layerfs(root, "umount", str(check))
