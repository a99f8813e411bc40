"""The POSIX ACLs and mode of a new object, from its directory's default ACL and the umask.

The mount hands ACLs to the kernel (FUSE_POSIX_ACL), which enforces them, and the umask to us,
with the mode unmasked (FUSE_DONT_MASK): what a new object gets is ours to decide, as it is the
filesystem's in the kernel (`posix_acl_create`). The engine makes most objects in the work dir,
where nothing would be inherited, so the inheritance is computed here and written explicitly, as
the kernel's overlayfs writes it on its upper objects: a directory without a default ACL gives
`mode & ~umask` and no ACL; one with a default ACL gives a copy of it masked by the mode (the
umask ignored), stored as the access ACL unless the mode says as much, and, to a directory, the
default ACL itself.

The xattr form (`posix_acl_xattr`): a little-endian u32 version 2, then (u16 tag, u16 perm,
u32 id) per entry.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass

ACCESS = "system.posix_acl_access"
DEFAULT = "system.posix_acl_default"

_VERSION = 2
_HEADER = struct.Struct("<I")
_ENTRY = struct.Struct("<HHI")
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_RWX = 0o7


@dataclass(frozen=True, slots=True)
class NewObjectAcl:
    mode: int
    """Permission bits of the new object (setuid, setgid and sticky as asked)."""
    access: bytes | None
    """Its access ACL, where the inherited ACL says more than the mode bits can."""
    default: bytes | None
    """Its default ACL: a directory's copy of its parent's."""


def for_new_object(parent_default: bytes | None, mode: int, umask: int,
                   is_dir: bool) -> NewObjectAcl:
    """What a new object asked for with permission bits `mode` under `umask` gets in a directory
    whose default ACL is `parent_default` (None: it has none). OSError(EIO) for a malformed
    default ACL, as the kernel answers."""
    if parent_default is None:
        return NewObjectAcl(mode & ~(umask & 0o777), None, None)
    entries = _parse(parent_default)
    new_mode, not_equivalent = _create_masq(entries, mode)
    access = _pack(entries) if not_equivalent else None
    return NewObjectAcl(new_mode, access, parent_default if is_dir else None)


def _parse(value: bytes) -> list[list[int]]:
    if len(value) < _HEADER.size or (len(value) - _HEADER.size) % _ENTRY.size:
        raise OSError(errno.EIO, os.strerror(errno.EIO), "malformed default ACL")
    (version,) = _HEADER.unpack_from(value)
    if version != _VERSION:
        raise OSError(errno.EIO, os.strerror(errno.EIO), "unknown ACL version")
    return [list(entry) for entry in _ENTRY.iter_unpack(value[_HEADER.size:])]


def _pack(entries: list[list[int]]) -> bytes:
    return _HEADER.pack(_VERSION) + b"".join(_ENTRY.pack(*entry) for entry in entries)


def _create_masq(entries: list[list[int]], mode: int) -> tuple[int, bool]:
    """The kernel's posix_acl_create_masq: mask `entries` (in place) by the mode's permission
    bits, and the mode by theirs. Returns the new mode and whether the ACL holds more than it."""
    bits = mode & 0o777
    not_equivalent = False
    group_obj: list[int] | None = None
    mask: list[int] | None = None
    for entry in entries:
        tag = entry[0]
        if tag == _USER_OBJ:
            entry[1] &= (bits >> 6) & _RWX
            bits &= (entry[1] << 6) | 0o077
        elif tag in (_USER, _GROUP):
            not_equivalent = True
        elif tag == _GROUP_OBJ:
            group_obj = entry
        elif tag == _OTHER:
            entry[1] &= bits & _RWX
            bits &= entry[1] | 0o770
        elif tag == _MASK:
            mask = entry
            not_equivalent = True
        else:
            raise OSError(errno.EIO, os.strerror(errno.EIO), "unknown ACL entry")
    group_class = mask if mask is not None else group_obj
    if group_class is None:
        raise OSError(errno.EIO, os.strerror(errno.EIO), "ACL without a group entry")
    group_class[1] &= (bits >> 3) & _RWX
    bits &= (group_class[1] << 3) | 0o707
    return (mode & ~0o777) | bits, not_equivalent
