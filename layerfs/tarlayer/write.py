"""Deterministic layer tars from a list of changes (the other half of `tarlayer.read`).

Owns the tar form of a layer: entries in the order given (the caller sorts them, parents
first), PAX headers for long names and xattrs (`SCHILY.xattr.*`), numeric owners without names,
integer mtimes (clamped to SOURCE_DATE_EPOCH when set), hard links as tar links (type 1) to
the first name of the same inode, deletions as empty `.wh.NAME` files and opaque directories
as an empty `.wh..wh..opq` right after the directory. Markers carry no metadata of their own
(mode 0644, owner 0, mtime 0), so the same change always gives the same bytes.

Does not know the overlay: it reads the real paths it is given.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from layerfs import overlay_xattrs
from layerfs.oci.whiteout import OPAQUE_MARKER, whiteout_name
from layerfs.overlay_xattrs import to_visible

if TYPE_CHECKING:
    from collections.abc import Iterable

COPY_BUFFER = 1 << 20
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


@dataclass(frozen=True, slots=True)
class LayerEntry:
    path: bytes
    """Relative to the layer root, no leading slash."""
    real: bytes | None
    """The object to archive; None for a deletion of `path`."""
    opaque: bool = False
    data: bytes | None = None
    """Where a regular file's content is read from, if not from `real`."""


def _name(path: bytes) -> str:
    return path.decode(_ENCODING, _ERRORS)


def _clamp(mtime: int) -> int:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch and epoch.isdigit():
        return min(mtime, int(epoch))
    return mtime


def _marker(path: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(_name(path))
    info.mode = 0o644
    info.mtime = 0
    return info


def _xattr_headers(real: bytes) -> dict[str, str]:
    try:
        names = os.listxattr(real, follow_symlinks=False)
    except OSError:
        return {}
    headers = {}
    for name in sorted(names):
        visible = to_visible(name.encode())
        if visible is None:
            continue
        try:
            value = os.getxattr(real, name, follow_symlinks=False)
        except OSError:
            continue
        headers["SCHILY.xattr." + visible.decode(_ENCODING, _ERRORS)] = value.decode(
            _ENCODING, _ERRORS
        )
    return headers


def write_layer(entries: Iterable[LayerEntry], out: IO[bytes],
                store_owner: tuple[int, int] | None = None) -> int:
    """Write the layer tar of `entries` to `out`; returns the number of tar entries.
    `store_owner`: a rootless store's ids, which stand for root's, other owners and modes
    being in override xattrs (`overlay_xattrs.OVERRIDE_STAT`)."""
    count = 0
    first_name: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT,
                      encoding=_ENCODING, errors=_ERRORS) as tar:
        tar.copybufsize = COPY_BUFFER  # type: ignore[attr-defined]  # in 3.11, unstubbed
        for entry in entries:
            head, _, base = entry.path.rpartition(b"/")
            parent = head + b"/" if head else b""
            if entry.real is None:
                tar.addfile(_marker(parent + whiteout_name(base)))
                count += 1
                continue
            st = os.lstat(entry.real)
            info = tarfile.TarInfo(_name(entry.path))
            info.mode = stat.S_IMODE(st.st_mode)
            info.uid, info.gid = st.st_uid, st.st_gid
            if store_owner is not None:
                override = None
                if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                    override = overlay_xattrs.override_of(entry.real)
                if override is not None:
                    info.uid, info.gid, info.mode = override
                else:
                    info.uid, info.gid = overlay_xattrs.owner_in_image(st.st_uid, st.st_gid,
                                                                       store_owner)
            info.uname = info.gname = ""
            info.mtime = _clamp(int(st.st_mtime))
            info.pax_headers = _xattr_headers(entry.real)
            mode = st.st_mode
            data: IO[bytes] | None = None
            key = (st.st_dev, st.st_ino)
            if stat.S_ISREG(mode) and st.st_nlink > 1 and key in first_name:
                info.type = tarfile.LNKTYPE
                info.linkname = first_name[key]
            elif stat.S_ISREG(mode):
                info.type = tarfile.REGTYPE
                info.size = st.st_size
                data = open(entry.data or entry.real, "rb")  # noqa: SIM115 - closed below
                if st.st_nlink > 1:
                    first_name[key] = info.name
            elif stat.S_ISDIR(mode):
                info.type = tarfile.DIRTYPE
            elif stat.S_ISLNK(mode):
                info.type = tarfile.SYMTYPE
                info.linkname = os.readlink(entry.real).decode(_ENCODING, _ERRORS)
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
                info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif stat.S_ISFIFO(mode):
                info.type = tarfile.FIFOTYPE
            else:
                continue  # sockets do not go into layers, as with docker
            try:
                tar.addfile(info, data)
            finally:
                if data is not None:
                    data.close()
            count += 1
            if entry.opaque and stat.S_ISDIR(mode):
                tar.addfile(_marker(entry.path + b"/" + OPAQUE_MARKER))
                count += 1
    return count
