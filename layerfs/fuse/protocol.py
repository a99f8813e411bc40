"""The FUSE wire protocol as layerfs speaks it: opcodes, flags and message layouts.

Everything here is transcribed from the kernel's UAPI header `linux/fuse.h` (protocol 7.x,
little-endian, naturally aligned) and nothing else: no I/O, no policy. `session` reads requests
and writes replies with these layouts; `ops` never sees raw bytes except names and data.
"""

from __future__ import annotations

import os
import stat
import struct
from enum import IntEnum

KERNEL_MAJOR = 7
KERNEL_MINOR = 38
"""What we answer INIT with; 7.38 has every message below, and nothing we would ignore."""

ROOT_ID = 1


class Op(IntEnum):
    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    DESTROY = 38
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46


# INIT flags (fuse_init_in.flags / fuse_init_out.flags)
ASYNC_READ = 1 << 0
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
"""The umask comes beside the mode, not applied to it: a default ACL can overrule it."""
DO_READDIRPLUS = 1 << 13
PARALLEL_DIROPS = 1 << 18
POSIX_ACL = 1 << 20
"""The kernel enforces (and caches) POSIX ACLs; new objects' ACLs and mode are ours to set."""
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
HANDLE_KILLPRIV_V2 = 1 << 28
"""We drop setuid/setgid on writes by unprivileged callers (they say so in a flag), and the
kernel stops asking for security.capability before every write."""
SETXATTR_EXT = 1 << 29
"""SETXATTR carries flags of its own (SETXATTR_EXT_IN): ACL_KILL_SGID."""
INIT_EXT = 1 << 30
"""INIT carries a second word of flags (flags2: bits 32-63 of the flags below)."""
PASSTHROUGH = 1 << 37
"""Opens may name a backing file that the kernel reads and writes itself (FOPEN_PASSTHROUGH)."""

WRITE_KILL_SUIDGID = 1 << 2  # fuse_write_in.write_flags
OPEN_KILL_SUIDGID = 1 << 0  # fuse_open_in.open_flags, fuse_create_in.open_flags

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

# ioctls on the connection's descriptor: _IOW(229, 1, struct fuse_backing_map), _IOW(229, 2, u32)
DEV_IOC_BACKING_OPEN = 0x4010E501
DEV_IOC_BACKING_CLOSE = 0x4004E502
BACKING_MAP = struct.Struct("<iIQ")  # fd, flags, padding
BACKING_ID = struct.Struct("<I")
MAX_STACK_DEPTH = 1
"""Backing files must be on filesystems that stack on nothing (not an overlay mount); and a
kernel overlay may still use this mount as a layer."""

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_KILL_SUIDGID = 1 << 11

FSYNC_FDATASYNC = 1 << 0

MIN_READ_BUFFER = 8192
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

IN_HEADER = struct.Struct("<IIQQIIIHH")
"""len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding (40 bytes)."""
OUT_HEADER = struct.Struct("<IiQ")
"""len, error (minus errno), unique (16 bytes)."""

_ATTR = "qqqqqqIIIIIIIIII"
"""fuse_attr: ino, size, blocks, atime, mtime, ctime (seconds; signed, as the kernel reads
them), atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev, blksize, flags."""
ENTRY_OUT = struct.Struct("<QQQQII" + _ATTR)
"""nodeid, generation, entry_valid, attr_valid, entry_valid_nsec, attr_valid_nsec, attr."""
ATTR_OUT = struct.Struct("<QII" + _ATTR)
"""attr_valid, attr_valid_nsec, dummy, attr."""

INIT_IN = struct.Struct("<IIII")
"""major, minor, max_readahead, flags (flags2 and the rest follow on new kernels)."""
INIT_IN_FLAGS2 = struct.Struct("<I")
"""flags2, right after INIT_IN, where the kernel sets INIT_EXT."""
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
"""major, minor, max_readahead, flags, max_background, congestion_threshold, max_write,
time_gran, max_pages, map_alignment, flags2, max_stack_depth, unused."""

OPEN_IN = struct.Struct("<II")  # flags, open_flags
OPEN_OUT = struct.Struct("<QIi")  # fh, open_flags, backing_id (with FOPEN_PASSTHROUGH)
CREATE_IN = struct.Struct("<IIII")  # flags, mode, umask, open_flags
READ_IN = struct.Struct("<QQIIQII")  # fh, offset, size, read_flags, lock_owner, flags, padding
WRITE_IN = READ_IN  # fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_OUT = struct.Struct("<II")  # size, padding
RELEASE_IN = struct.Struct("<QIIQ")  # fh, flags, release_flags, lock_owner
FSYNC_IN = struct.Struct("<QII")  # fh, fsync_flags, padding
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
"""valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec, mtimensec,
ctimensec, mode, unused4, uid, gid, unused5."""
MKNOD_IN = struct.Struct("<IIII")  # mode, rdev, umask, padding
MKDIR_IN = struct.Struct("<II")  # mode, umask
RENAME_IN = struct.Struct("<Q")  # newdir
RENAME2_IN = struct.Struct("<QII")  # newdir, flags, padding
LINK_IN = struct.Struct("<Q")  # oldnodeid
SETXATTR_IN = struct.Struct("<II")  # size, flags (without FUSE_SETXATTR_EXT)
SETXATTR_EXT_IN = struct.Struct("<IIII")  # size, flags, setxattr_flags, padding
SETXATTR_ACL_KILL_SGID = 1 << 0  # fuse_setxattr_in.setxattr_flags
GETXATTR_IN = struct.Struct("<II")  # size, padding
GETXATTR_OUT = struct.Struct("<II")  # size, padding
ACCESS_IN = struct.Struct("<II")  # mask, padding
FORGET_IN = struct.Struct("<Q")  # nlookup
BATCH_FORGET_IN = struct.Struct("<II")  # count, dummy
FORGET_ONE = struct.Struct("<QQ")  # nodeid, nlookup
FALLOCATE_IN = struct.Struct("<QQQII")  # fh, offset, length, mode, padding
LSEEK_IN = struct.Struct("<QqII")  # fh, offset, whence, padding
LSEEK_OUT = struct.Struct("<q")
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
"""blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare."""
DIRENT = struct.Struct("<QQII")
"""ino, off (the offset of the next entry), namelen, type; the name follows, padded to 8."""

_NS = 1_000_000_000


def encode_dev(rdev: int) -> int:
    """A device number in the kernel's 32-bit encoding (new_encode_dev)."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(dev: int) -> int:
    return os.makedev((dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00))


def pack_entry(
    ino: int, generation: int, timeout: int, st: os.stat_result, nlink: int, blocks: int,
    mode: int, uid: int, gid: int,
) -> bytes:
    """A fuse_entry_out for `st` shown with merged number `ino` and the owner and mode
    given, valid for `timeout` seconds. (One pack of every field: this runs for every entry
    of a directory walk.)"""
    atime, mtime, ctime = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    rdev = st.st_rdev
    return ENTRY_OUT.pack(
        ino, generation, timeout, timeout, 0, 0,
        ino, st.st_size, blocks, atime // _NS, mtime // _NS, ctime // _NS, atime % _NS,
        mtime % _NS, ctime % _NS, mode, nlink, uid, gid,
        encode_dev(rdev) if rdev else 0, st.st_blksize, 0)


def dirent_type(mode: int) -> int:
    return stat.S_IFMT(mode) >> 12


def pack_dirent(ino: int, off: int, name: bytes, kind: int) -> bytes:
    padding = -len(name) % 8
    return DIRENT.pack(ino, off, len(name), kind) + name + b"\0" * padding
