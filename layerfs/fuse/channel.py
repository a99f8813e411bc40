"""The FUSE channel: a `/dev/fuse` descriptor mounted on a directory, and its unmount.

As root, `mount(2)` is called directly (what libfuse does as root; it saves a fusermount3
process per mount). Anyone else goes through the setuid `fusermount3`, which mounts and hands
the descriptor back over a socket (`_FUSE_COMMFD`), as libfuse does it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import stat
from typing import TYPE_CHECKING

from layerfs.errors import MountError

if TYPE_CHECKING:
    from collections.abc import Iterable

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)  # the C library the interpreter runs on

_PASSED_TO_KERNEL = {"allow_other", "default_permissions"}


def open_mounted(
    mountpoint: str, options: Iterable[str], *, fsname: str, subtype: str
) -> int:
    """Mount a fresh FUSE connection on `mountpoint`; return its descriptor (MountError)."""
    opts = set(options)
    if os.geteuid() == 0:
        return _mount_as_root(mountpoint, opts, fsname, subtype)
    return _mount_with_fusermount(mountpoint, opts, fsname, subtype)


def _mount_as_root(mountpoint: str, opts: set[str], fsname: str, subtype: str) -> int:
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = 0
        if "ro" in opts:
            flags |= MS_RDONLY
        if "suid" not in opts:
            flags |= MS_NOSUID
        if "dev" not in opts:
            flags |= MS_NODEV
        root_mode = stat.S_IFMT(os.stat(mountpoint).st_mode)
        data = [f"fd={fd}", f"rootmode={root_mode:o}", f"user_id={os.getuid()}",
                f"group_id={os.getgid()}", *sorted(opts & _PASSED_TO_KERNEL)]
        if _libc.mount(os.fsencode(fsname), os.fsencode(mountpoint),
                       f"fuse.{subtype}".encode(), flags, ",".join(data).encode()) != 0:
            err = ctypes.get_errno()
            raise MountError(f"{mountpoint}: cannot mount: {os.strerror(err)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mount_with_fusermount(mountpoint: str, opts: set[str], fsname: str, subtype: str) -> int:
    import socket  # here: as root (no fusermount3) a mount should start fast
    import subprocess

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        wanted = sorted(opts & (_PASSED_TO_KERNEL | {"ro"}))
        wanted += [f"fsname={fsname}", f"subtype={subtype}"]
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        result = subprocess.run(
            ["fusermount3", "-o", ",".join(wanted), "--", mountpoint],
            env=env, pass_fds=(theirs.fileno(),), capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            reason = result.stderr.strip().splitlines()[-1:] or ["fusermount3 failed"]
            raise MountError(f"{mountpoint}: cannot mount: {reason[0]}")
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise MountError(f"{mountpoint}: cannot mount: fusermount3 sent no descriptor")
        os.set_inheritable(fds[0], False)
        return fds[0]


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily, as libfuse does): users still inside keep their files."""
    if os.geteuid() == 0:
        if _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), mountpoint)
        return
    import subprocess

    result = subprocess.run(["fusermount3", "-u", "-z", "--", mountpoint], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise OSError(errno.EBUSY, result.stderr.strip() or "fusermount3 -u failed", mountpoint)


def _fuse_device(mountpoint: str) -> str | None:
    """The "major:minor" of the FUSE mount on resolved path `mountpoint`, from mountinfo.

    Read as bytes, since a path need not be UTF-8, with the octal escapes of space, tab,
    newline and backslash undone (fs/proc_namespace.c: mangle)."""
    wanted = os.fsencode(mountpoint)
    device = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.split()
            if (_unmangle(fields[4]) == wanted
                    and fields[fields.index(b"-") + 1].startswith(b"fuse")):
                device = fields[2].decode()  # the last one is on top
    return device


def _unmangle(field: bytes) -> bytes:
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field)


def is_mounted(mountpoint: str) -> bool:
    """Whether a FUSE filesystem is mounted on resolved path `mountpoint`."""
    return _fuse_device(mountpoint) is not None


def set_readahead(mountpoint: str, kib: int) -> None:
    """Let the kernel read ahead `kib` on this mount (FUSE starts at 128 KiB, which caps a
    cold sequential read at a third of the disk's speed here). Root only; else a no-op.

    `mountpoint` must be absolute and resolved before mounting: resolving it now, or a stat,
    would wait for our own answer. The device comes from mountinfo.
    """
    try:
        device = _fuse_device(mountpoint)
        if device is not None:
            with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
                f.write(str(kib))
    except OSError:
        pass
