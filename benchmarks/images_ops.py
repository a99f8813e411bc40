"""The container change of the commit workload, run as `python -m benchmarks.images_ops ROOT LIST`.

LIST (written by `images_inputs`) names one change a line: `A<TAB>path` appends a line to an
existing regular file, `C<TAB>path` creates a new 100-byte file (and its missing parent dirs).
The same list is applied to a layerfs container through its mountpoint (every append copies a
file up) and to umoci's unpacked rootfs directly, so both commits see the same change. It runs in
a child so that the parent can enforce a timeout when a FUSE daemon hangs, and so that nothing in
the parent holds a mount busy. It prints the seconds it took on the last line of stdout.

Opens never follow a symlink in the last component (`O_NOFOLLOW`), so a change can never write
outside ROOT through a planted link; the list only names paths the tarball holds as regular files
(appends) or paths under a fresh directory of our own (creates).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

APPENDED = b"changed by the layerfs images benchmark\n"
CREATED = b"y" * 99 + b"\n"  # 100 bytes, like the overlay suite's created files


def apply(root: bytes, listing: bytes) -> int:
    """Apply every change in `listing` under `root`; return how many were made.

    Raises OSError (FileNotFoundError for a missing file to append to) on the first failure.
    """
    count = 0
    made_dirs: set[bytes] = set()
    for line in listing.splitlines():
        kind, _, relative = line.partition(b"\t")
        path = os.path.join(root, relative)
        if kind == b"A":
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
            try:
                os.write(fd, APPENDED)
            finally:
                os.close(fd)
        elif kind == b"C":
            parent = os.path.dirname(path)
            if parent not in made_dirs:
                os.makedirs(parent, exist_ok=True)
                made_dirs.add(parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, CREATED)
            finally:
                os.close(fd)
        else:
            raise ValueError(f"{line!r}: not a change line (A or C, a tab, a path)")
        count += 1
    return count


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.images_ops ROOT LIST", file=sys.stderr)
        return 2
    root, listing = os.fsencode(argv[0]), Path(argv[1]).read_bytes()
    start = time.perf_counter()
    apply(root, listing)
    print(f"{time.perf_counter() - start:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
