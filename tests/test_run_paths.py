"""`run` reads the image's /etc/passwd and /etc/group as a chrooted process would."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from layerfs.services.run import read_in_root

if TYPE_CHECKING:
    from pathlib import Path


def test_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pw").write_bytes(b"root:x:0:0::/root:/bin/sh\n")
    os.symlink("/data/pw", tmp_path / "etc" / "passwd")
    assert read_in_root(tmp_path, "etc/passwd") == b"root:x:0:0::/root:/bin/sh\n"
    os.symlink("../../../../../data", tmp_path / "etc" / "up")
    assert read_in_root(tmp_path, "etc/up/pw").startswith(b"root:")


def test_a_symlink_to_a_host_file_is_not_followed_out(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    os.symlink("/etc/hostname", tmp_path / "etc" / "passwd")  # the host has this file
    with pytest.raises(FileNotFoundError):
        read_in_root(tmp_path, "etc/passwd")


def test_symlink_loops_end(tmp_path: Path) -> None:
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    with pytest.raises(OSError, match="Too many levels"):
        read_in_root(tmp_path, "a")
