"""Reads the daemon serves from a lower file of a read-write mount: big ones are spliced from the
file to the FUSE device (`layerfs.fuse.splice`), small ones read and written back.

Both must give the file's bytes at any offset and size, at and past the end, aligned or not
(O_DIRECT reads reach the daemon at the offsets the caller chose), and a reader of a file copied
up meanwhile must read the copy. That spliced data does not pass through the daemon's memory
shows in `rchar` of /proc/PID/io, which counts what it read with read(2) and its kin, not splice.
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING

from tests.fsapi import Layers, daemon_pid, daemon_rchar, drop_caches, mounted_overlay

if TYPE_CHECKING:
    from pathlib import Path

SIZE = (3 << 20) + 1234  # not a whole number of pages
PAGE = os.sysconf("SC_PAGE_SIZE")


def _layers(base: Path, data: bytes) -> tuple[Layers, Path]:
    """A lower holding `data` as `file` (and its start as `small`), and a mountpoint."""
    dirs = [base / n for n in ("lower", "upper", "work", "mnt")]
    for d in dirs:
        d.mkdir(parents=True)
    (dirs[0] / "file").write_bytes(data)
    (dirs[0] / "small").write_bytes(data[:5000])
    return Layers([dirs[0]], dirs[1], dirs[2]), dirs[3]


def test_reads_at_any_offset_and_size_give_the_files_bytes(tmp_path: Path) -> None:
    data = random.Random(7).randbytes(SIZE)
    layers, mnt = _layers(tmp_path, data)
    rng = random.Random(8)
    cases = [(0, SIZE), (SIZE - 100, 1 << 20), (SIZE, 4096), (SIZE + 5000, 4096), (1, 300_000),
             (PAGE - 1, 2 * PAGE + 3)]
    cases += [(rng.randrange(SIZE + 10), rng.choice((100, 8192, 65536, 200_000, 1 << 20)))
              for _ in range(200)]
    with mounted_overlay(layers, mnt):
        for flags in (os.O_RDONLY, os.O_RDONLY | os.O_DIRECT):
            drop_caches()  # cold and warm pages alike
            fd = os.open(mnt / "file", flags)
            try:
                for off, size in cases:
                    assert os.pread(fd, size, off) == data[off:off + size], (flags, off, size)
            finally:
                os.close(fd)
        assert (mnt / "small").read_bytes() == data[:5000]


def test_big_reads_of_a_lower_file_do_not_pass_through_the_daemon(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    layers, mnt = _layers(tmp_path, data)
    with mounted_overlay(layers, mnt):
        pid = daemon_pid(mnt)
        before = daemon_rchar(pid)
        # O_DIRECT: every read reaches the daemon, one at a time, none from the page cache;
        # 512 KiB fits the pipe of any user with its header (1 MiB needs root's bigger pipe)
        fd = os.open(mnt / "file", os.O_RDONLY | os.O_DIRECT)
        try:
            got = b"".join(os.pread(fd, 1 << 19, off) for off in range(0, SIZE, 1 << 19))
        finally:
            os.close(fd)
        assert got == data
        assert daemon_rchar(pid) - before < SIZE // 4


def test_a_reader_reads_the_copy_once_the_file_is_copied_up(tmp_path: Path) -> None:
    data = os.urandom(SIZE)
    layers, mnt = _layers(tmp_path, data)
    with mounted_overlay(layers, mnt):
        reader = os.open(mnt / "file", os.O_RDONLY | os.O_DIRECT)
        try:
            assert os.pread(reader, 1 << 20, 0) == data[:1 << 20]
            with open(mnt / "file", "r+b") as writer:
                writer.seek(SIZE - 10)
                writer.write(b"X" * 20)  # copies up, and grows the file
            expected = data[:SIZE - 10] + b"X" * 20
            assert os.pread(reader, 1 << 20, SIZE - (1 << 19)) == expected[SIZE - (1 << 19):]
        finally:
            os.close(reader)
        assert (layers.lowers[0] / "file").read_bytes() == data
