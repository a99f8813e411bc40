"""Helpers for the differential overlay tests: lower layers, mounts, tree snapshots.

This module owns everything the differential suite does outside the operations themselves:
it builds three deterministic lower layers in the kernel overlayfs on-disk format, copies them
so that each system gets fresh identical layers, mounts the kernel's overlayfs (the oracle) and
the FUSE overlay under test over them, and snapshots a mounted tree into comparable values.

It knows nothing about layerfs internals: the FUSE overlay is an external command
(`LAYERFS_OVERLAY_CMD`) speaking fuse-overlayfs's command line, so the same tests judge
fuse-overlayfs and layerfs-overlay alike.

Every mount is owned by a context manager that unmounts it on exit, also when the test failed.
A FUSE mount that will not unmount cleanly is detached lazily and its connection aborted (so no
thread stays blocked on it), and that is reported as a failure: a busy mount is a bug.
Nothing here kills processes; the FUSE daemon exits by itself once its mount is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

T = TypeVar("T")

# --- lower layers -------------------------------------------------------------------------

LAYER_NAMES = ("l1", "l2", "l3")  # top first, the order of lowerdir=

WHITEOUT_DEV = os.makedev(0, 0)
OPAQUE_XATTR = "trusted.overlay.opaque"

# Each layer gets its own fixed mtime so that a stat answered from the wrong layer, or a
# copy-up that loses the time, shows up as a difference of years (see `MTIME_TOLERANCE_NS`).
_LAYER_MTIME_NS = {
    "l1": 1_000_000_000 * 10**9,
    "l2": 990_000_000 * 10**9,
    "l3": 980_000_000 * 10**9,
}

# Paths in the lower layers, for the operation strategies: every name that exists in some layer,
# visible or hidden (whited out, behind an opaque dir), so that sequences hit them often.
LOWER_PATHS: tuple[str, ...] = (
    "a", "a/f1", "a/f2", "a/sub", "a/sub/g", "a/hl2",
    "merged", "merged/x1", "merged/x2", "merged/x3", "merged/shared",
    "d_lower", "d_lower/inner", "d_lower/deep", "d_lower/deep/leaf",
    "opq", "opq/hidden", "opq/visible",
    "whited", "gone_dir", "gone_dir/x", "wo_only", "wo_only/x", "wo_only/y",
    "emptymerged", "hl1", "fifo", "cdev", "suid", "xat", "top", "sym", "dsym", "dsym/f1",
)  # fmt: skip


def _file(path: Path, data: bytes, mode: int = 0o644, owner: tuple[int, int] = (0, 0)) -> None:
    path.write_bytes(data)
    os.chown(path, *owner)  # before chmod: a chown clears the setuid bit
    os.chmod(path, mode)  # rather than a create mode: chmod is not subject to the umask


def _dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    return path


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, WHITEOUT_DEV)


def _build_l3(root: Path) -> None:
    """The bottom layer: the things the upper layers hide, merge with or rename."""
    _dir(root / "a")
    _file(root / "a/f1", b"a/f1 from l3\n")
    _dir(root / "a/sub")
    _file(root / "a/sub/g", b"g from l3\n", 0o640, (1000, 1000))
    _dir(root / "merged")
    _file(root / "merged/x3", b"x3\n")
    _file(root / "merged/shared", b"shared from l3\n")
    _dir(root / "d_lower", 0o750)
    _file(root / "d_lower/inner", b"inner\n")
    _dir(root / "d_lower/deep")
    _file(root / "d_lower/deep/leaf", b"leaf\n")
    _dir(root / "opq")
    _file(root / "opq/hidden", b"hidden by the opaque opq in l1\n")
    _file(root / "whited", b"whited out in l2\n")
    _dir(root / "gone_dir")
    _file(root / "gone_dir/x", b"the dir is whited out in l2\n")
    _dir(root / "wo_only")
    _file(root / "wo_only/x", b"whited out in l2\n")
    _file(root / "wo_only/y", b"whited out in l2\n")
    _dir(root / "emptymerged")
    # One file with two names in this one layer: copy-up must keep them together (index=on).
    _file(root / "hl1", b"hard linked, two names in l3\n")
    os.link(root / "hl1", root / "a/hl2")
    os.mkfifo(root / "fifo", 0o644)
    os.mknod(root / "cdev", stat.S_IFCHR | 0o644, os.makedev(1, 3))


def _build_l2(root: Path) -> None:
    """The middle layer: whiteouts, a merged level, a setuid file and a file with xattrs."""
    _whiteout(root / "whited")
    _whiteout(root / "gone_dir")
    _dir(root / "wo_only")
    _whiteout(root / "wo_only/x")
    _whiteout(root / "wo_only/y")
    _dir(root / "a")
    _file(root / "a/f2", b"a/f2 from l2\n")
    _dir(root / "merged")
    _file(root / "merged/x2", b"x2\n")
    _file(root / "merged/shared", b"shared from l2\n")
    _dir(root / "emptymerged")
    _file(root / "suid", b"#!/bin/sh\n", 0o4755)
    _file(root / "xat", b"file with xattrs\n")
    os.setxattr(root / "xat", "user.foo", b"bar")
    os.setxattr(root / "xat", "trusted.foo", b"baz")


def _build_l1(root: Path) -> None:
    """The top layer: an opaque dir over l3's, symlinks, a file owned by someone else."""
    _dir(root / "merged")
    _file(root / "merged/x1", b"x1\n")
    _file(root / "merged/shared", b"shared from l1\n")
    os.setxattr(root / "merged", "user.dirattr", b"on a merged dir")
    _dir(root / "opq")
    os.setxattr(root / "opq", OPAQUE_XATTR, b"y")
    _file(root / "opq/visible", b"visible\n")
    _dir(root / "emptymerged")
    _file(root / "top", b"top from l1\n", 0o600, (1000, 1000))
    os.symlink("a/f1", root / "sym")
    os.symlink("a", root / "dsym")


def _set_layer_times(root: Path, mtime_ns: int) -> None:
    """Give every entry of a layer the same mtime, children before their directory."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            os.utime(os.path.join(dirpath, name), ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    os.utime(root, ns=(mtime_ns, mtime_ns))


def build_layers(base: Path, *, userxattr: bool = False) -> list[Path]:
    """Build the three pristine lower layers under `base`; returns them top first.
    `userxattr`: the overlay's xattrs in the `user.overlay.` namespace (a rootless format)."""
    builders = {"l1": _build_l1, "l2": _build_l2, "l3": _build_l3}
    layers = []
    for name in LAYER_NAMES:
        root = _dir(base / name)
        builders[name](root)
        if userxattr:
            _to_user_namespace(root)
        _set_layer_times(root, _LAYER_MTIME_NS[name])
        layers.append(root)
    return layers


def _to_user_namespace(root: Path) -> None:
    for dirpath, dirs, files in os.walk(root):
        for path in [dirpath, *(os.path.join(dirpath, n) for n in dirs + files)]:
            for name in os.listxattr(path, follow_symlinks=False):
                if name.startswith("trusted.overlay."):
                    value = os.getxattr(path, name, follow_symlinks=False)
                    os.setxattr(path, "user." + name.removeprefix("trusted."), value)
                    os.removexattr(path, name, follow_symlinks=False)


@dataclasses.dataclass(frozen=True, slots=True)
class OverlayDirs:
    lowers: tuple[Path, ...]  # top first
    upper: Path
    work: Path
    mnt: Path

    def options(self) -> str:
        lowers = ":".join(str(p) for p in self.lowers)
        return f"lowerdir={lowers},upperdir={self.upper},workdir={self.work}"


def fresh_copy(pristine: list[Path], dest: Path, upper_dest: Path | None = None) -> OverlayDirs:
    """Copy the pristine layers into `dest` (one `cp -a`, xattrs kept) with empty upper/work/mnt
    there, or in `upper_dest` (another filesystem, say)."""
    dest.mkdir()
    subprocess.run(["cp", "-a", *map(str, pristine), str(dest)], check=True)
    # cp -a quietly drops xattrs it cannot copy; the opaque marker is the one that matters.
    opaque = [n for n in os.listxattr(dest / "l1/opq") if n.endswith(".overlay.opaque")]
    if not opaque or os.getxattr(dest / "l1/opq", opaque[0]) != b"y":
        raise RuntimeError(f"{dest}: cp -a did not keep the opaque marker of l1/opq")
    if upper_dest is None:
        upper_dest = dest
    else:
        upper_dest.mkdir()
    dirs = [_dir(upper_dest / name) for name in ("upper", "work", "mnt")]
    return OverlayDirs(tuple(dest / p.name for p in pristine), *dirs)


# --- mounts -------------------------------------------------------------------------------

MOUNT_TIMEOUT_S = 30.0
UNMOUNT_RETRY_S = 3.0


def mountpoints() -> set[str]:
    """Mount points from mountinfo, read without touching any mount (a hung FUSE mount
    would block a stat)."""
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:
        return {line.split()[4].replace("\\040", " ") for line in f}


def is_mounted(path: Path) -> bool:
    return str(path) in mountpoints()


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)


def _unmount_or_fail(mnt: Path, argv: list[str]) -> None:
    """Unmount with `argv`, retrying briefly while busy; lazily detach and fail as a last resort."""
    deadline = time.monotonic() + UNMOUNT_RETRY_S
    while True:
        result = _run(argv)
        if not is_mounted(mnt):
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a retry interval, not a wait for a state change we could poll
    _abort_fuse_connection(mnt)
    _run(["umount", "-l", str(mnt)])
    raise AssertionError(f"{mnt}: busy, detached lazily: {result.stderr.strip()}")


def _abort_fuse_connection(mnt: Path) -> None:
    """Abort the FUSE connection of `mnt`, if it is one, so that blocked callers return."""
    with open("/proc/self/mountinfo", errors="surrogateescape") as f:
        lines = f.readlines()
    for line in lines:
        fields = line.split()
        if fields[4] == str(mnt) and line.split(" - ")[1].startswith("fuse"):
            minor = fields[2].split(":")[1]
            with contextlib.suppress(OSError):
                Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")


@contextlib.contextmanager
def _owned_mount(mnt: Path, unmount: list[str]) -> Iterator[None]:
    """Unmount `mnt` with `unmount` on the way out, whichever way out: also after a failed or
    interrupted mount command, which may have left the mount up."""
    try:
        yield
    finally:
        if is_mounted(mnt):
            _unmount_or_fail(mnt, unmount)


@contextlib.contextmanager
def kernel_overlay(dirs: OverlayDirs, *, userxattr: bool = False) -> Iterator[Path]:
    """The oracle: the kernel's overlayfs with the features layerfs matches (dir rename, index);
    `userxattr`: the rootless format instead, where the kernel has neither."""
    options = dirs.options() + (",userxattr" if userxattr else ",redirect_dir=on,index=on")
    with _owned_mount(dirs.mnt, ["umount", str(dirs.mnt)]):
        result = _run(["mount", "-t", "overlay", "overlay", "-o", options, str(dirs.mnt)])
        if result.returncode != 0:
            raise RuntimeError(f"{dirs.mnt}: kernel overlay mount failed: {result.stderr.strip()}")
        yield dirs.mnt


# LAYERFS_OVERLAY_CMD=kernel puts the kernel's overlayfs on both sides: the harness's self-check.
# Every test must pass that way; a difference there is noise in the harness, not a finding.
SELF_CHECK = "kernel"


def overlay_cmd() -> list[str]:
    """The FUSE overlay under test: $LAYERFS_OVERLAY_CMD, else layerfs-overlay, else
    fuse-overlayfs (the stand-in while layerfs-overlay does not exist)."""
    if cmd := os.environ.get("LAYERFS_OVERLAY_CMD"):
        return cmd.split()
    ours = Path(__file__).resolve().parent.parent / ".venv/bin/layerfs-overlay"
    return [str(ours)] if ours.exists() else ["fuse-overlayfs"]


@contextlib.contextmanager
def fuse_overlay(dirs: OverlayDirs, cmd: list[str], log: Path,
                 extra_options: str = "") -> Iterator[Path]:
    """The system under test: `CMD -o lowerdir=…,upperdir=…,workdir=… MNT`, which returns once
    the mount answers. Its output goes to `log`, not a pipe: a daemon that keeps the pipe open
    would make us wait for it to exit."""
    env = dict(os.environ, LAYERFS_STRICT="1")
    with _owned_mount(dirs.mnt, ["fusermount3", "-u", str(dirs.mnt)]):
        with log.open("wb") as out:
            result = subprocess.run(
                [*cmd, "-o", dirs.options() + extra_options, str(dirs.mnt)],
                stdout=out,
                stderr=out,
                env=env,
                timeout=MOUNT_TIMEOUT_S,
            )
        if result.returncode != 0 or not is_mounted(dirs.mnt):
            raise RuntimeError(
                f"{dirs.mnt}: {cmd[0]} exited {result.returncode},"
                f" mounted={is_mounted(dirs.mnt)}: {log_tail(log)}"
            )
        yield dirs.mnt


def log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def call_with_timeout(fn: Callable[[], T], timeout: float, what: str) -> T:
    """Run `fn` in a daemon thread: a hung FUSE daemon fails the test instead of hanging it.

    The thread stays blocked until the mount's finalizer aborts the connection.
    """
    box: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{what}: no answer after {timeout} s (daemon hung?)")
    if error:
        raise error[0]
    return box[0]


# --- renameat2, fallocate -----------------------------------------------------------------

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]


FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode, which os.posix_fallocate does not take; raises OSError."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def renameat2(src: str, dst: str, flags: int) -> None:
    """renameat2(2), which os.rename does not expose; raises OSError like os.rename."""
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src, None, dst)


# --- snapshots ----------------------------------------------------------------------------

# A time set by a real change is the clock's, a little different on each system; a time kept
# from a layer or set by utimens is years old (see `_LAYER_MTIME_NS` and the strategies) and must
# agree to the nanosecond. So times are compared through `mtime_class`.
RECENT_NS = time.time_ns() - 3600 * 10**9


def mtime_class(mtime_ns: int) -> int | str:
    """The exact time if it is a kept or utimens-set one, else "recent"."""
    return "recent" if mtime_ns >= RECENT_NS else mtime_ns


COMPARED_XATTR_PREFIXES = ("user.", "trusted.")


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """What the suite compares of one path. Not compared: inode numbers (each system numbers
    on its own), atime and ctime (set by the clock), a directory's size (the upper filesystem's
    block size) and a directory's nlink (the kernel reports 1 for merged dirs, whatever their
    subdirectories).

    A directory's mtime is not compared either: the kernel restores a parent's times after it
    copies a child up into it, but not on every path (a rename of a lower dir that fails with
    ENOTEMPTY still leaves the parent copied up with a new mtime), so a directory's time depends
    on the order of the kernel's internal copy-ups rather than on the operations. The scenario
    `test_copy_up_keeps_parent_mtime` checks the case that matters.
    """

    kind: str
    mode: int
    uid: int
    gid: int
    mtime: int | str | None
    size: int | None = None
    nlink: int | None = None
    sha256: str | None = None
    target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()

    def differences(self, other: Entry) -> list[str]:
        diffs = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                shown = (oct(mine), oct(theirs)) if field.name == "mode" else (mine, theirs)
                diffs.append(f"{field.name} {shown[0]!r} != {shown[1]!r}")
        return diffs


def kind_of(mode: int) -> str:
    for test, name in (
        (stat.S_ISREG, "file"),
        (stat.S_ISDIR, "dir"),
        (stat.S_ISLNK, "symlink"),
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "chr"),
        (stat.S_ISBLK, "blk"),
    ):
        if test(mode):
            return name
    return "other"


def xattrs_of(path: str) -> tuple[tuple[str, bytes], ...]:
    names = sorted(
        n
        for n in os.listxattr(path, follow_symlinks=False)
        if n.startswith(COMPARED_XATTR_PREFIXES)
    )
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)


def file_digest(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def entry_of(path: str) -> Entry:
    st = os.lstat(path)
    kind = kind_of(st.st_mode)
    is_dir = kind == "dir"
    return Entry(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        mtime=None if is_dir else mtime_class(st.st_mtime_ns),
        size=None if is_dir else st.st_size,
        nlink=None if is_dir else st.st_nlink,
        sha256=file_digest(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("chr", "blk") else None,
        xattrs=xattrs_of(path),
    )


def snapshot(root: Path) -> dict[str, Entry]:
    """Every path under `root` (and root itself, as ""), without following symlinks."""
    tree: dict[str, Entry] = {}
    pending = [""]
    while pending:
        rel = pending.pop()
        full = os.path.join(root, rel) if rel else str(root)
        entry = tree[rel] = entry_of(full)
        if entry.kind == "dir":
            pending.extend(os.path.join(rel, name) for name in sorted(os.listdir(full)))
    return tree


def tree_differences(expected: dict[str, Entry], actual: dict[str, Entry]) -> list[str]:
    """Human-readable differences, kernel (expected) first."""
    diffs = []
    for path in sorted(expected.keys() | actual.keys()):
        mine, theirs = expected.get(path), actual.get(path)
        shown = path or "/"
        if mine is None:
            diffs.append(f"{shown}: only under FUSE ({theirs})")
        elif theirs is None:
            diffs.append(f"{shown}: only under the kernel ({mine})")
        else:
            diffs.extend(f"{shown}: {d}" for d in mine.differences(theirs))
    return diffs


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
