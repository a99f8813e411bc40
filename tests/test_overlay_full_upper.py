"""An upper dir on a filesystem that fills up: ENOSPC where the kernel's overlayfs gives it,
nothing half-copied under a real name, a clean work dir after the next mount, and a daemon
that goes on serving once space is freed.

The lower layer is on the run's tmp dir; upper and work are on a small filesystem of the
test's own (tests/fsmatrix.py), filled with a ballast file until little space is left.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

import pytest

from tests.fsapi import Layers, kernel_overlay, mounted_overlay
from tests.fsmatrix import mounted_filesystem

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

BIG = 24 << 20  # more than is left on the upper
SMALL_FS = {"tmpfs": 64 << 20, "ext4": 64 << 20, "xfs": 320 << 20, "btrfs": 256 << 20}
LEFT = 4 << 20
"""What the ballast leaves free: room for small things, not for the big lower file."""

KINDS = [
    "tmpfs", "ext4",
    pytest.param("xfs", marks=pytest.mark.long), pytest.param("btrfs", marks=pytest.mark.long),
]


def _errno(fn: Callable[[], object]) -> int:
    try:
        fn()
    except OSError as exc:
        return exc.errno or 0
    return 0


def _fill(path: Path, leave: int) -> None:
    """A ballast file that takes all the space of `path`'s filesystem but `leave` bytes."""
    sv = os.statvfs(path.parent)
    free = sv.f_bavail * sv.f_frsize
    with open(path, "wb") as f:
        chunk = b"\xa5" * (1 << 20)
        while free - f.tell() > leave + len(chunk):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _write_until_full(path: Path) -> int:
    """Append to `path` until the filesystem says no; the errno it says it with."""
    chunk = b"x" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for _ in range(1024):
            os.write(fd, chunk)
            os.fsync(fd)
    except OSError as exc:
        return exc.errno or 0
    finally:
        os.close(fd)
    raise AssertionError(f"{path}: 1 GiB written to a small filesystem")


def _create_until_full(dir_: Path) -> int:
    os.mkdir(dir_)
    try:
        for i in range(1_000_000):
            with open(dir_ / f"f{i}", "wb") as f:
                f.write(b"y" * 4096)
    except OSError as exc:
        return exc.errno or 0
    raise AssertionError(f"{dir_}: a million files on a small filesystem")


@pytest.fixture(params=KINDS)
def small_upper(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A lower dir with one big file and a small one, and a small filesystem for the upper."""
    lower = tmp_path / "lower"
    lower.mkdir()
    with open(lower / "big", "wb") as f:
        f.write(os.urandom(1 << 20) * (BIG >> 20))
    (lower / "small").write_bytes(b"small lower file\n")
    with mounted_filesystem(request.param, tmp_path / "upperfs", SMALL_FS[request.param]) as fs:
        yield lower, fs


def _layers(lower: Path, fs: Path, name: str) -> Layers:
    upper, work = fs / f"{name}-upper", fs / f"{name}-work"
    upper.mkdir()
    work.mkdir()
    return Layers([lower], upper, work)


def _behaviour(mnt: Path, ballast: Path, big_head: bytes) -> list[tuple[str, object]]:
    """What a user sees on a full upper, step by step; the same on both overlays."""
    steps: list[tuple[str, object]] = []
    _fill(ballast, LEFT)
    steps.append(("copy-up of a big lower file", _errno(lambda: open(mnt / "big", "ab").close())))
    with open(mnt / "big", "rb") as f:
        steps.append(("big reads as the lower", f.read(16) == big_head))
    steps.append(("chmod of a small lower file", _errno(lambda: os.chmod(mnt / "small", 0o600))))
    steps.append(("write until full", _write_until_full(mnt / "grow")))
    steps.append(("create until full", _create_until_full(mnt / "many") in (errno.ENOSPC,)))
    # space again: the overlay goes on as if nothing had happened
    os.unlink(ballast)
    os.unlink(mnt / "grow")
    for name in os.listdir(mnt / "many"):
        os.unlink(mnt / "many" / name)
    steps.append(("copy-up once freed", _errno(lambda: open(mnt / "big", "ab").close())))
    steps.append(("big size", os.stat(mnt / "big").st_size))
    steps.append(("write once freed", _errno(lambda: (mnt / "new").write_bytes(b"n" * 8192))))
    return steps


def _upper_names(layers: Layers) -> set[str]:
    return {str(p.relative_to(layers.upper)) for p in layers.upper.rglob("*")}


def test_a_full_upper_gives_enospc_and_loses_nothing(
    small_upper: tuple[Path, Path], tmp_path: Path
) -> None:
    lower, fs = small_upper
    big_head = (lower / "big").read_bytes()[:16]
    results = {}
    for name, mount in (("kernel", kernel_overlay), ("layerfs", mounted_overlay)):
        layers = _layers(lower, fs, name)
        mnt = tmp_path / "mnt"
        mnt.mkdir(exist_ok=True)
        with mount(layers, mnt):
            results[name] = _behaviour(mnt, fs / f"{name}-ballast", big_head)
        assert "big" in _upper_names(layers)
        for entry in os.listdir(layers.upper / "many"):
            pytest.fail(f"{name}: {entry} left in many/")
    assert results["layerfs"] == results["kernel"]
    assert dict(results["kernel"])["copy-up of a big lower file"] == errno.ENOSPC


def test_a_failed_copy_up_leaves_no_name_and_the_next_mount_a_clean_work_dir(
    small_upper: tuple[Path, Path], tmp_path: Path
) -> None:
    lower, fs = small_upper
    layers = _layers(lower, fs, "layerfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted_overlay(layers, mnt):
        _fill(fs / "ballast", LEFT)
        assert _errno(lambda: open(mnt / "big", "ab").close()) == errno.ENOSPC
        assert not (layers.upper / "big").exists()  # nothing half-copied under its name
        assert (mnt / "big").stat().st_size == BIG
        assert _errno(lambda: (mnt / "new").write_bytes(b"z" * (8 << 20))) == errno.ENOSPC
        assert (mnt / "new").stat().st_size < 8 << 20
    # a staged copy-up the daemon could not clean up (killed, say) goes at the next mount
    os.unlink(fs / "ballast")
    stale = layers.work / "#stale-copy-up"
    stale.write_bytes(b"half a file")
    with mounted_overlay(layers, mnt):
        assert not stale.exists()
        with open(mnt / "big", "ab") as f:
            f.write(b"!")
        assert (mnt / "big").stat().st_size == BIG + 1
    assert [p.name for p in layers.work.iterdir() if p.name.startswith("#")] == []
