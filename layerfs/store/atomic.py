"""Atomic writes and staging: temp file or dir in the store, fsync, rename.

Staging lives under `tmp/` on the store's filesystem, one dir per process named by its pid, so
that a killed process's leftovers can be told from a live one's and removed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from collections.abc import Iterator


_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(path: Path) -> None:
    """Flush the whole filesystem holding `path`: one call for a tree of thousands of files."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: a crash leaves the old content or the new one."""
    fd, tmp = _new_file(path.parent, ".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _unique_name(parent: Path, prefix: str) -> str:
    return os.path.join(parent, prefix + os.urandom(6).hex())


def _new_file(parent: Path, prefix: str = "tmp") -> tuple[int, str]:
    """A new file with a random name in `parent`, open for writing, mode 0600.

    tempfile's mkstemp without its import (random, shutil...: ~3 ms of every command)."""
    while True:
        name = _unique_name(parent, prefix)
        try:
            return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), name
        except FileExistsError:
            continue


def _new_dir(parent: Path) -> Path:
    while True:
        name = _unique_name(parent, "tmp")
        try:
            os.mkdir(name, 0o700)
            return Path(name)
        except FileExistsError:
            continue


def process_tmp(tmp_root: Path) -> Path:
    """This process's staging dir, removed when the process exits (if it is empty)."""
    path = tmp_root / f"{os.getpid()}"
    if path not in _registered:
        path.mkdir(parents=True, exist_ok=True)
        _registered.add(path)
        atexit.register(_remove_if_empty, path)
    return path


_registered: set[Path] = set()


def release_staging() -> None:
    """Remove this process's (empty) staging dirs now, for a process about to `os._exit`."""
    for path in list(_registered):
        _remove_if_empty(path)


def _remove_if_empty(path: Path) -> None:
    if path.name == str(os.getpid()):  # not in a forked child that inherited the handler
        with contextlib.suppress(OSError):
            path.rmdir()


@contextlib.contextmanager
def staging_dir(tmp_root: Path) -> Iterator[Path]:
    """A fresh dir to build something in; removed on the way out unless renamed away."""
    path = _new_dir(process_tmp(tmp_root))
    try:
        yield path
    finally:
        if path.exists():
            remove_tree(path)


@contextlib.contextmanager
def staging_file(tmp_root: Path) -> Iterator[tuple[Path, BinaryIO]]:
    fd, name = _new_file(process_tmp(tmp_root))
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield path, f
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_tree(path: Path) -> None:
    """rm -rf that also gets through read-only dirs, never following symlinks."""
    import shutil  # only here: a command that removes nothing does not pay for it

    def make_writable(_func: object, p: str, _exc: object) -> None:
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)

    shutil.rmtree(path, onerror=make_writable)


def clean_dead_staging(tmp_root: Path) -> None:
    """Remove the staging of processes that are gone (killed in the middle of work)."""
    if not tmp_root.is_dir():
        return
    for entry in tmp_root.iterdir():
        if entry.name.isdigit() and not _alive(int(entry.name)):
            remove_tree(entry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_file(f: BinaryIO) -> None:
    os.fsync(f.fileno())
