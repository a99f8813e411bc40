"""Compare two directory trees the way a root filesystem is judged: every path, its type, mode,
owner, size, content, symlink target, device number and xattrs (overlay-private ones aside)."""

from __future__ import annotations

import hashlib
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

Entry = tuple[object, ...]


def snapshot(root: Path, *, skip: frozenset[str] = frozenset()) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if rel.split("/")[0] in skip:
                continue
            out[rel] = describe(path)
    return out


def describe(path: str) -> Entry:
    st = os.lstat(path)
    mode = st.st_mode
    kind = stat.S_IFMT(mode)
    detail: object = None
    if stat.S_ISREG(mode):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        detail = (st.st_size, h.hexdigest())
    elif stat.S_ISLNK(mode):
        detail = os.readlink(path)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
    try:
        names = sorted(n for n in os.listxattr(path, follow_symlinks=False)
                       if not n.startswith("trusted.overlay."))
        xattrs = tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)
    except OSError:
        xattrs = ()
    return (kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, detail, xattrs)


def diff(expected: dict[str, Entry], actual: dict[str, Entry], limit: int = 20) -> list[str]:
    problems = []
    for path in sorted(set(expected) | set(actual)):
        if path not in actual:
            problems.append(f"missing: {path}")
        elif path not in expected:
            problems.append(f"extra: {path}")
        elif expected[path] != actual[path]:
            problems.append(f"differs: {path}: {expected[path]} != {actual[path]}")
        if len(problems) >= limit:
            break
    return problems
