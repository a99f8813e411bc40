"""How a file's cached pages are grouped into folios, as seen through a mount.

Why it is measured: a warm read that never reaches a daemon still costs the kernel one lookup, one
copy setup and one LRU update per folio. ext4 (and so the kernel's overlayfs, which reads the
lower file's cache) caches a big file in folios of 64 KiB to 1 MiB; FUSE, on kernels without its
large-folio support, in 4 KiB ones. The histogram recorded beside the warm read row shows which
case a run was in.

How: map the file copy-on-write (ACCESS_COPY, which ctypes can take the address of; nothing
is written, so every mapped page is the page cache's own), touch each page, read its frame
number from /proc/self/pagemap and its flags from /proc/kpageflags (root only). A compound
head starts a large folio, tails extend it; any other page is a folio of its own.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

PAGE = mmap.PAGESIZE
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1
_COMPOUND_TAIL = 1 << 16
_ENTRY = struct.Struct("=Q")


def folio_sizes(path: str, limit: int) -> dict[str, int]:
    """Folios (by size, "4 KiB": count) holding the first `limit` bytes of `path`'s cached data,
    plus "not cached" pages. Touching a page that is not cached reads it in: call it after the
    file was read. Raises OSError without root (kpageflags) or on an empty file."""
    with open(path, "rb") as file:
        size = min(os.fstat(file.fileno()).st_size, limit) // PAGE * PAGE
        if size == 0:
            raise OSError(f"{path}: nothing to map")
        mapping = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(mapping)
        base = ctypes.addressof(anchor) // PAGE
        del anchor  # a live export would keep the mapping from closing
        with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
            frames = [_frame(mapping, pagemap.fileno(), base, index)
                      for index in range(size // PAGE)]
    finally:
        mapping.close()
    return _histogram(frames)


def _frame(mapping: mmap.mmap, pagemap: int, base: int, index: int) -> int | None:
    mapping[index * PAGE]  # fault the page in (it is in the page cache: no I/O)
    (entry,) = _ENTRY.unpack(os.pread(pagemap, 8, (base + index) * 8))
    return entry & _PFN_MASK if entry & _PRESENT else None


def _histogram(frames: list[int | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    run = 0  # pages in the folio being measured

    def close_folio() -> None:
        if run:
            name = _size_name(run * PAGE)
            counts[name] = counts.get(name, 0) + 1

    with open("/proc/kpageflags", "rb", buffering=0) as kpageflags:
        for frame in frames:
            if frame is None:
                close_folio()
                run = 0
                counts["not cached"] = counts.get("not cached", 0) + 1
                continue
            (flags,) = _ENTRY.unpack(os.pread(kpageflags.fileno(), 8, frame * 8))
            if flags & _COMPOUND_TAIL and run:
                run += 1
                continue
            close_folio()
            run = 1
    close_folio()
    return counts


def _size_name(size: int) -> str:
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"
