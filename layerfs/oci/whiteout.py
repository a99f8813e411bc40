"""The owner of the OCI whiteout naming rules (image-spec `layer.md`).

A layer tar marks a deleted name NAME with an entry `.wh.NAME` in the same directory, and a
directory whose lower contents are hidden with an entry `.wh..wh..opq`. The same names are the
rootless stand-ins on disk where a character device 0/0 cannot be made. Nobody else spells
these prefixes.
"""

from __future__ import annotations

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"


def is_whiteout_name(name: bytes) -> bool:
    """True for any `.wh.` entry, the opaque marker included."""
    return name.startswith(WHITEOUT_PREFIX)


def is_opaque_marker(name: bytes) -> bool:
    return name == OPAQUE_MARKER


def whiteout_target(name: bytes) -> bytes | None:
    """The name a `.wh.NAME` entry deletes; None for the opaque marker and for other names.

    A lone `.wh.` and whiteouts of `.` or `..` name nothing that can be deleted: they are
    answered with None as well, and the caller decides whether that is an error.
    """
    if not name.startswith(WHITEOUT_PREFIX) or name == OPAQUE_MARKER:
        return None
    target = name[len(WHITEOUT_PREFIX) :]
    if target in (b"", b".", b"..") or b"/" in target:
        return None
    return target


def whiteout_name(target: bytes) -> bytes:
    return WHITEOUT_PREFIX + target
