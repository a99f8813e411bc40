"""The owner of the overlay's on-disk xattr names (the kernel overlayfs format).

Root mounts use the `trusted.overlay.` namespace, as the kernel does; the `user.overlay.`
namespace is read as well, since rootless tools write it. Everything under either prefix is
private to the overlay: hidden from listxattr and refused to get/set, as the kernel does.
`trusted.overlay.layerfs.ino` is our own: the inode number a copied-up file had in its lower
layer, so that `st_ino` survives copy-up and remount. The kernel ignores names it does not know.
"""

from __future__ import annotations

import errno
import os

TRUSTED_PREFIX = b"trusted.overlay."
USER_PREFIX = b"user.overlay."

OPAQUE = "trusted.overlay.opaque"
REDIRECT = "trusted.overlay.redirect"
ORIGIN_INO = "trusted.overlay.layerfs.ino"
CAPABILITY = "security.capability"

_USER_OPAQUE = "user.overlay.opaque"
_USER_REDIRECT = "user.overlay.redirect"


def is_private(name: bytes) -> bool:
    return name.startswith(TRUSTED_PREFIX) or name.startswith(USER_PREFIX)


def _get(path: bytes, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return None
        raise


def is_opaque_dir(path: bytes) -> bool:
    """The xattr form of opacity; the `.wh..wh..opq` form is seen in the listing."""
    return _get(path, OPAQUE) == b"y" or _get(path, _USER_OPAQUE) == b"y"


def redirect_of(path: bytes) -> bytes | None:
    return _get(path, REDIRECT) or _get(path, _USER_REDIRECT)


def origin_ino(path: bytes) -> int | None:
    raw = _get(path, ORIGIN_INO)
    if raw is None or len(raw) != 8:
        return None
    return int.from_bytes(raw, "little")


def set_origin_ino(path: bytes, ino: int) -> None:
    os.setxattr(path, ORIGIN_INO, ino.to_bytes(8, "little"), follow_symlinks=False)


def set_opaque(path: bytes) -> None:
    os.setxattr(path, OPAQUE, b"y", follow_symlinks=False)


def set_redirect(path: bytes, target: bytes) -> None:
    os.setxattr(path, REDIRECT, target, follow_symlinks=False)


def user_xattrs(path: bytes) -> list[tuple[str, bytes]]:
    """All xattrs of `path` that are not the overlay's own, capability last.

    security.capability goes last because writing file data or changing the owner after it
    clears it; copy-up writes the list in this order.
    """
    try:
        names = os.listxattr(path, follow_symlinks=False)
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
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                continue
            raise
        (cap if name == CAPABILITY else out).append((name, value))
    return out + cap
