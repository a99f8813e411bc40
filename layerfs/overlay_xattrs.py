"""The owner of the overlay's on-disk xattr names (the kernel overlayfs format).

The kernel's overlayfs keeps its own xattrs (opaque, redirect, metacopy) in one of two
namespaces, chosen per mount: `trusted.overlay.`, which only CAP_SYS_ADMIN may read or write,
and, with the `userxattr` mount option, `user.overlay.`, which is how an unprivileged user's
overlay works. A process uses one of them (`active()`): `trusted` as root of the machine,
`user` otherwise or when a mount asks for it (`select`). In the user namespace the kernel turns
redirects and metacopy off (`userxattr` implies `redirect_dir=nofollow,metacopy=off`), so a
directory with lower parts cannot be renamed (EXDEV) and chmod copies a file's data up: the
same dirs then mount the same way under the kernel. Names of the other namespace are plain
xattrs, as they are to the kernel.

Names under the active prefix on disk are the overlay's own and never shown, with one
exception that the kernel (6.7 and later) defines: a user may store an xattr named
`PREFIX.X` through the mount, which lands on disk *escaped* as `PREFIX.overlay.X`, and is
shown unescaped again. `to_real`/`to_visible` are the two directions of that mapping.
`PREFIX.layerfs.ino` is our own: the inode number a copied-up file had in its lower layer, so
that `st_ino` survives copy-up and remount. The kernel ignores names it does not know.
"""

from __future__ import annotations

import errno
import os

from layerfs import realfs

CAPABILITY = "security.capability"
OVERRIDE_STAT = "user.containers.override_stat"
"""containers-storage's record, on a regular file or directory, of the owner and permission
bits that a rootless store could not give it for real: `UID:GID:0MODE`. fuse-overlayfs reads
it in the layers whose root directory has one; so do we, in the `user.overlay.` format."""
_OVERRIDE_NAME = OVERRIDE_STAT.encode()


class XattrFormat:
    """The overlay's xattr names in one namespace (`trusted` or `user`)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.prefix = f"{namespace}.overlay.".encode()
        self.escaped_prefix = self.prefix + b"overlay."
        self.opaque = f"{namespace}.overlay.opaque"
        self.redirect = f"{namespace}.overlay.redirect"
        self.metacopy = f"{namespace}.overlay.metacopy"
        self.origin_ino = f"{namespace}.overlay.layerfs.ino"
        # as the kernel with userxattr: no redirects, no metadata-only copies
        self.moves_merged_dirs = namespace == "trusted"
        self.copies_meta_only = namespace == "trusted"

    def __repr__(self) -> str:
        return f"XattrFormat({self.namespace!r})"


TRUSTED = XattrFormat("trusted")
USER = XattrFormat("user")


def _is_machine_root() -> bool:
    """Root in the machine's user namespace: the one that may write trusted.* xattrs."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map", "rb") as f:
            return f.read().split() == [b"0", b"0", b"4294967295"]
    except OSError:
        return True


_active = TRUSTED if _is_machine_root() else USER


def active() -> XattrFormat:
    return _active


def select(fmt: XattrFormat) -> None:
    """Use `fmt` in this process from now on (a mount's `userxattr` option)."""
    global _active
    _active = fmt


def to_real(name: bytes) -> bytes:
    """The on-disk name of an xattr a user names through the mount."""
    fmt = _active
    if name.startswith(fmt.prefix):
        return fmt.escaped_prefix + name[len(fmt.prefix) :]
    return name


def to_visible(real: bytes) -> bytes | None:
    """The name a user sees for an on-disk xattr; None for the overlay's private ones."""
    fmt = _active
    if real.startswith(fmt.escaped_prefix):
        return fmt.prefix + real[len(fmt.escaped_prefix) :]
    if real.startswith(fmt.prefix) or (real == _OVERRIDE_NAME and fmt is USER):
        return None
    return real


def is_private(real: bytes) -> bool:
    """True for on-disk names that belong to the overlay and are never copied or shown."""
    fmt = _active
    return real.startswith(fmt.prefix) and not real.startswith(fmt.escaped_prefix)


def get_xattr(path: bytes, name: str) -> bytes | None:
    """The value of xattr `name` of `path` (not followed), None where it has none."""
    try:
        return realfs.getxattr(path, name)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def is_opaque_dir(path: bytes) -> bool:
    """The xattr form of opacity; the `.wh..wh..opq` form is seen in the listing."""
    return get_xattr(path, _active.opaque) == b"y"


def redirect_of(path: bytes) -> bytes | None:
    fmt = _active
    return get_xattr(path, fmt.redirect) if fmt.moves_merged_dirs else None


def is_metacopy(path: bytes) -> bool:
    """An upper file that holds metadata only: its data is the lower file's (kernel format)."""
    fmt = _active
    return fmt.copies_meta_only and get_xattr(path, fmt.metacopy) is not None


def set_metacopy(path: bytes) -> None:
    realfs.setxattr(path, _active.metacopy, b"")


def origin_ino(path: bytes) -> int | None:
    raw = get_xattr(path, _active.origin_ino)
    if raw is None or len(raw) != 8:
        return None
    return int.from_bytes(raw, "little")


def set_origin_ino(path: bytes, ino: int) -> None:
    try:
        realfs.setxattr(path, _active.origin_ino, ino.to_bytes(8, "little"))
    except PermissionError:
        # user.* xattrs exist on files and directories only: a symlink, fifo or device
        # copied up in the user format gets a new st_ino at the next mount (as in the kernel)
        if _active is TRUSTED:
            raise


def set_opaque(path: bytes) -> None:
    realfs.setxattr(path, _active.opaque, b"y")


def set_redirect(path: bytes, target: bytes) -> None:
    realfs.setxattr(path, _active.redirect, target)


def user_xattrs(path: bytes) -> list[tuple[str, bytes]]:
    """All on-disk xattrs of `path` that are not the overlay's own, capability last.

    security.capability goes last because writing file data or changing the owner after it
    clears it; copy-up writes the list in this order.
    """
    try:
        names = realfs.listxattr(path)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return []
        raise
    out: list[tuple[str, bytes]] = []
    cap: list[tuple[str, bytes]] = []
    for name in names:
        if is_private(name.encode()):
            continue
        try:
            value = realfs.getxattr(path, name)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
        (cap if name == CAPABILITY else out).append((name, value))
    return out + cap


def override_of(path: bytes) -> tuple[int, int, int] | None:
    """The owner and permission bits an override xattr records; None without one (or a
    malformed one, which the owner on disk then stands for)."""
    raw = get_xattr(path, OVERRIDE_STAT)
    return None if raw is None else parse_override(raw)


def parse_override(raw: bytes) -> tuple[int, int, int] | None:
    parts = raw.split(b":")
    if len(parts) < 3:
        return None
    try:
        uid, gid, mode = int(parts[0]), int(parts[1]), int(parts[2], 8)
    except ValueError:
        return None
    if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32 and 0 <= mode <= 0o7777):
        return None
    return uid, gid, mode


def owner_in_image(uid: int, gid: int, store_owner: tuple[int, int]) -> tuple[int, int]:
    """The owner a rootless store's object without an override has in the image: the
    store's own ids stand for root's (symlinks and the like can carry no override)."""
    return (0 if uid == store_owner[0] else uid, 0 if gid == store_owner[1] else gid)


def format_override(uid: int, gid: int, mode: int) -> bytes:
    return b"%d:%d:0%o" % (uid, gid, mode & 0o7777)


def set_override(target: bytes | int, uid: int, gid: int, mode: int) -> None:
    """Record an owner and permission bits on a file or directory (a path, not followed, or
    an open descriptor)."""
    value = format_override(uid, gid, mode)
    if isinstance(target, int):
        os.setxattr(target, OVERRIDE_STAT, value)
    else:
        realfs.setxattr(target, OVERRIDE_STAT, value)
