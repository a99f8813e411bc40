"""FUSE passthrough: the kernel reads and writes the real file without asking the daemon, where
no copy-up can move the data (every file of a read-only mount, files in the upper).

Whether a read went through the daemon shows in what the daemon itself read (`rchar` of
/proc/PID/io): a passthrough read of 32 MiB costs it a few requests, a served one 32 MiB.
Semantics are the kernel overlayfs's, compared on the same kind of layers: a reader of a lower
file reads the copy once another process copies the file up (fuse-overlayfs shows it the
copy's data too); with `passthrough=all` it keeps the lower file, and opens for writing are
refused (ETXTBSY) until it closes it.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import subprocess
from functools import partial
from typing import TYPE_CHECKING

from tests.fsapi import (
    Layers,
    daemon_pid,
    daemon_rchar,
    kernel_overlay,
    mounted_overlay,
    unmount,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

SIZE = 32 << 20
SERVED = SIZE // 2
"""More than this read by the daemon: the file's data went through it."""


def _layers(base: Path) -> Layers:
    dirs = [base / n for n in ("lower", "upper", "work")]
    for d in dirs:
        d.mkdir(parents=True)
    (dirs[0] / "big").write_bytes(os.urandom(1 << 20) * (SIZE >> 20))
    (dirs[0] / "small").write_bytes(b"lower data\n")
    return Layers([dirs[0]], dirs[1], dirs[2])


def _read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _daemon_reads(mnt: Path, action: Callable[[], object]) -> int:
    pid = daemon_pid(mnt)
    before = daemon_rchar(pid)
    action()
    return daemon_rchar(pid) - before


def test_a_read_only_mount_passes_every_file_through(tmp_path: Path) -> None:
    layers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    expected = _read_all(layers.lowers[0] / "big")
    with mounted_overlay(Layers(layers.lowers, layers.upper, layers.work), mnt, "-o", "ro"):
        assert _daemon_reads(mnt, lambda: _read_all(mnt / "big") == expected) < SERVED
        with open(mnt / "big", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            assert m[SIZE - 16:] == expected[-16:]


def test_upper_files_pass_through_with_attributes_as_the_kernels(tmp_path: Path) -> None:
    """Writes through a passthrough file, and stat during and after them, as the kernel's."""
    results = {}
    for name, mount in (("kernel", kernel_overlay), ("layerfs", mounted_overlay)):
        layers = _layers(tmp_path / name)
        mnt = tmp_path / name / "mnt"
        mnt.mkdir()
        with mount(layers, mnt):
            steps: list[object] = []
            fd = os.open(mnt / "new", os.O_RDWR | os.O_CREAT, 0o644)
            reader = os.open(mnt / "new", os.O_RDONLY)
            try:
                steps.append(os.pwrite(fd, b"a" * 5000, 0))
                steps.append(os.fstat(reader).st_size)
                steps.append(os.pread(reader, 10, 4995))
                os.ftruncate(fd, 100)
                steps.append(os.stat(mnt / "new").st_size)
                os.posix_fallocate(fd, 0, 1 << 20)
                steps.append(os.stat(mnt / "new").st_size)
                steps.append(os.pwrite(fd, b"end", (1 << 20) + 7))
                steps.append(os.fstat(fd).st_size)
                with open(mnt / "new", "r+b") as f, mmap.mmap(f.fileno(), 0) as m:
                    m[0:4] = b"MMAP"
                steps.append(os.pread(reader, 6, 0))
            finally:
                os.close(fd)
                os.close(reader)
            steps.append(_read_all(mnt / "new")[-3:])
            st = os.stat(mnt / "new")
            steps.append((st.st_size, st.st_mtime_ns >= os.stat(mnt).st_mtime_ns - 10**9))
            if name == "layerfs":
                written = _daemon_reads(mnt, partial((mnt / "new").write_bytes, b"w" * SIZE))
                steps.append(("daemon saw the data", written > SERVED))
                read = _daemon_reads(mnt, partial(_read_all, mnt / "new"))
                steps.append(("daemon saw the data", read > SERVED))
            else:
                steps += [("daemon saw the data", False)] * 2
            results[name] = steps
    assert results["layerfs"] == results["kernel"]


@contextlib.contextmanager
def _fuse_overlayfs(layers: Layers, mnt: Path) -> Iterator[None]:
    subprocess.run(["fuse-overlayfs", "-o", layers.option(), str(mnt)], check=True,
                   capture_output=True)
    try:
        yield
    finally:
        unmount(mnt)


def _passthrough_all(layers: Layers, mnt: Path) -> contextlib.AbstractContextManager[object]:
    return mounted_overlay(layers, mnt, "-o", "passthrough=all")


def _readers_across_a_copy_up(mnt: Path) -> list[bytes]:
    """A reader opened before another process copies the file up and writes it, one opened
    after (while the first is still open), and a read once both are closed."""
    seen = []
    early = os.open(mnt / "small", os.O_RDONLY)
    try:
        seen.append(os.pread(early, 100, 0))
        writer = os.open(mnt / "small", os.O_RDWR)
        try:
            os.pwrite(writer, b"UPPER", 0)
            late = os.open(mnt / "small", os.O_RDONLY)
            try:
                seen.append(os.pread(late, 100, 0))
                os.pwrite(writer, b" more", 5)
                seen.append(os.pread(late, 100, 0))
            finally:
                os.close(late)
        finally:
            os.close(writer)
        seen.append(os.pread(early, 100, 0))
    finally:
        os.close(early)
    seen.append(_read_all(mnt / "small"))
    return seen


def test_a_reader_of_a_lower_file_sees_the_copy_on_every_peer(tmp_path: Path) -> None:
    """Readers opened before and during a copy-up, by default: the kernel's semantics, kept by
    serving lower files of a read-write mount (not passing them through). The kernel's
    overlayfs moves the early reader to the copy, fuse-overlayfs shows it the copy's data
    through FUSE's page cache of the inode, layerfs serves it from the copy."""
    results = {}
    for name, mount in (("kernel", kernel_overlay), ("fuse-overlayfs", _fuse_overlayfs),
                        ("layerfs", mounted_overlay)):
        layers = _layers(tmp_path / name)
        mnt = tmp_path / name / "mnt"
        mnt.mkdir()
        with mount(layers, mnt):
            results[name] = _readers_across_a_copy_up(mnt)
            if name == "layerfs":  # lower files of a read-write mount are served
                assert _daemon_reads(mnt, partial(_read_all, mnt / "big")) > SERVED
        assert (layers.upper / "small").read_bytes() == b"UPPER more\n"
        assert (layers.lowers[0] / "small").read_bytes() == b"lower data\n"
    assert results["kernel"] == results["fuse-overlayfs"] == results["layerfs"] == [
        b"lower data\n", b"UPPER data\n", b"UPPER more\n", b"UPPER more\n", b"UPPER more\n"]


def test_passthrough_all_leaves_early_readers_on_the_lower_file(tmp_path: Path) -> None:
    """`passthrough=all`: lower files of a read-write mount pass through as well. A reader
    that opened one keeps the lower file until it closes it, so nothing may open it for
    writing meanwhile (ETXTBSY): an mmap of that open would map the lower file. A copy-up
    without an open (truncate) is served: later readers read the copy through the daemon."""
    layers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with _passthrough_all(layers, mnt):
        expected = _read_all(layers.lowers[0] / "big")
        assert _daemon_reads(mnt, lambda: _read_all(mnt / "big") == expected) < SERVED
        early = os.open(mnt / "small", os.O_RDONLY)
        try:
            assert os.pread(early, 100, 0) == b"lower data\n"
            for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):
                try:
                    os.close(os.open(mnt / "small", flags))
                except OSError as exc:
                    assert exc.errno == errno.ETXTBSY
                else:
                    raise AssertionError(f"open({flags:#o}) of a passed-through lower file")
            os.truncate(mnt / "small", 5)
            assert os.pread(early, 100, 0) == b"lower data\n"
            assert _read_all(mnt / "small") == b"lower"
        finally:
            os.close(early)
        (mnt / "small").write_bytes(b"written\n")
        assert _read_all(mnt / "small") == b"written\n"
        with open(mnt / "big", "r+b") as f:  # a copy-up: from now on the upper's passes through
            f.write(b"UPPER")
        assert _daemon_reads(mnt, partial(_read_all, mnt / "big")) < SERVED
    assert (layers.upper / "small").read_bytes() == b"written\n"
    assert (layers.lowers[0] / "small").read_bytes() == b"lower data\n"
    assert _read_all(layers.upper / "big")[:5] == b"UPPER"
    assert _read_all(layers.lowers[0] / "big") == expected


def test_passthrough_0_serves_every_read(tmp_path: Path) -> None:
    layers = _layers(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted_overlay(layers, mnt, "-o", "ro,passthrough=0"):
        assert _daemon_reads(mnt, lambda: _read_all(mnt / "big")) > SERVED


def test_a_file_the_kernel_will_not_back_is_served(tmp_path: Path) -> None:
    """A backing file on a stacked filesystem (here a read-only kernel overlay as the lower)
    is beyond the stacking depth we announce: the kernel refuses it (ELOOP) and the file is
    served by the daemon, with the same data."""
    layers = _layers(tmp_path)
    empty, stacked = tmp_path / "empty", tmp_path / "stacked"
    empty.mkdir()
    stacked.mkdir()
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"ro,lowerdir={empty}:{layers.lowers[0]}", str(stacked)], check=True)
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        with mounted_overlay(Layers([stacked], layers.upper, layers.work), mnt, "-o", "ro"):
            expected = _read_all(layers.lowers[0] / "big")
            assert _daemon_reads(mnt, lambda: _read_all(mnt / "big") == expected) > SERVED
            assert _read_all(mnt / "big") == expected
    finally:
        unmount(stacked)
