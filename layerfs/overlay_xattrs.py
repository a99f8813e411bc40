"""The owner of the overlay's on-disk xattr names (the kernel overlayfs format).

Mounts as root use the `trusted.overlay.` namespace, as the kernel does; `user.overlay.` names
are plain xattrs there, as they are to the kernel without `userxattr` (rootless layers mark
opaque directories with `.wh..wh..opq`, which the engine reads from the listing).

Names under `trusted.overlay.` on disk are the overlay's own and never shown, with one exception
that the kernel (6.7 and later) defines: a user may store an xattr named `trusted.overlay.X`
through the mount, which lands on disk *escaped* as `trusted.overlay.overlay.X`, and is shown
unescaped again. `to_real`/`to_visible` are the two directions of that mapping.
`trusted.overlay.layerfs.ino` is our own: the inode number a copied-up file had in its lower
layer, so that `st_ino` survives copy-up and remount. The kernel ignores names it does not know.
"""

from __future__ import annotations

import errno

from layerfs import realfs

TRUSTED_PREFIX = b"trusted.overlay."

OPAQUE = "trusted.overlay.opaque"
REDIRECT = "trusted.overlay.redirect"
ORIGIN_INO = "trusted.overlay.layerfs.ino"
METACOPY = "trusted.overlay.metacopy"
CAPABILITY = "security.capability"



_ESCAPED_PREFIX = b"trusted.overlay.overlay."


def to_real(name: bytes) -> bytes:
    """The on-disk name of an xattr a user names through the mount."""
    if name.startswith(TRUSTED_PREFIX):
        return _ESCAPED_PREFIX + name[len(TRUSTED_PREFIX) :]
    return name


def to_visible(real: bytes) -> bytes | None:
    """The name a user sees for an on-disk xattr; None for the overlay's private ones."""
    if real.startswith(_ESCAPED_PREFIX):
        return TRUSTED_PREFIX + real[len(_ESCAPED_PREFIX) :]
    if real.startswith(TRUSTED_PREFIX):
        return None
    return real


def is_private(real: bytes) -> bool:
    """True for on-disk names that belong to the overlay and are never copied or shown."""
    return real.startswith(TRUSTED_PREFIX) and not real.startswith(_ESCAPED_PREFIX)


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
    return get_xattr(path, OPAQUE) == b"y"


def redirect_of(path: bytes) -> bytes | None:
    return get_xattr(path, REDIRECT)


def is_metacopy(path: bytes) -> bool:
    """An upper file that holds metadata only: its data is the lower file's (kernel format)."""
    return get_xattr(path, METACOPY) is not None


def set_metacopy(path: bytes) -> None:
    realfs.setxattr(path, METACOPY, b"")


def origin_ino(path: bytes) -> int | None:
    raw = get_xattr(path, ORIGIN_INO)
    if raw is None or len(raw) != 8:
        return None
    return int.from_bytes(raw, "little")


def set_origin_ino(path: bytes, ino: int) -> None:
    realfs.setxattr(path, ORIGIN_INO, ino.to_bytes(8, "little"))


def set_opaque(path: bytes) -> None:
    realfs.setxattr(path, OPAQUE, b"y")


def set_redirect(path: bytes, target: bytes) -> None:
    realfs.setxattr(path, REDIRECT, target)


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
