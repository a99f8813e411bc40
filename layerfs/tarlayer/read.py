"""Safe unpacking of one layer tar stream into a layer directory (overlayfs on-disk format).

Owns: turning the entries of a layer tar (gzip, zstd or plain) into files under a new, empty
directory, and the diff_id of the tar, computed in the same pass. OCI whiteouts become what
the kernel's overlayfs reads: `.wh.NAME` a character device 0/0 named NAME, `.wh..wh..opq`
the xattr `trusted.overlay.opaque=y` on its directory (`user.overlay.opaque=y` when not root:
the kernel's `userxattr` form, see `overlay_xattrs`). Where those cannot be made (a kernel
before 5.8 refuses the device to users, a filesystem without user xattrs), the marker files
are kept as they are, which the engine reads as well. Kept from the tar:
regular files (sparse ones with their holes), directories, symlinks, hard links, device nodes,
fifos, all permission bits (setuid, setgid, sticky), numeric owners, mtimes (nanoseconds from
PAX), and xattrs from PAX `SCHILY.xattr.*` records (security.capability written last).

Safety, whatever the tar says: nothing is written outside `dest` and no symlink is ever
followed. Names are checked first (absolute names, `..` components, NUL bytes, `.wh.` names
used as directories and whiteouts that name nothing are refused with `LayerError` naming the
entry); then every write happens relative to a directory fd reached by an openat walk from
`dest` with O_NOFOLLOW|O_DIRECTORY, so a symlink planted by an earlier entry is refused
instead of traversed; hard links are made with linkat from such fds, without following. A
later entry with the name of an earlier one replaces it, as Docker does (a tree is removed
with fd-relative calls), except that a directory over a directory only updates its metadata
and a whiteout never removes an entry of its own layer (a whiteout hides lower layers only).
Sizes are bounded (`UnpackLimits`), truncated or corrupt streams and tar headers raise
`LayerError`; nothing is ever silently short.

Does not know: the store. The caller hands over a new empty directory and makes the result
atomic and durable (temp dir, syncfs, rename): this module neither fsyncs nor cleans up
after an error. Nor does it compare the diff_id with anything: it returns it.

`tarfile` parses headers only (never `extract`, whose filters break container roots). It
runs in its 'r:' mode over a forward-only reader that hashes everything read: tarfile sees
a file that can only seek forwards, reads headers itself, and this module reads file data
with `readinto` into one reusable buffer. (Stream mode 'r|' wraps the input in a buffer that
is re-sliced on every small read and cannot `readinto`.)

Concurrency: one call unpacks one layer, synchronously, in the calling thread; it blocks
(disk and decompression), so async callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Final, TypeVar, cast

from layerfs import overlay_xattrs
from layerfs.compression import Compression, open_reader
from layerfs.digest import DiffID, Hasher
from layerfs.errors import LayerError
from layerfs.oci.whiteout import is_opaque_marker, is_whiteout_name, whiteout_target
from layerfs.overlay_xattrs import CAPABILITY, is_private
from layerfs.tarlayer.safedir import DIR_FLAGS, DirWalker, PathRefused

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from layerfs.digest import Digest, Reader

_T = TypeVar("_T")

COPY_BUFFER_SIZE: Final = 1 << 20
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_XATTR_PREFIX: Final = "SCHILY.xattr."
_ZERO_BLOCK: Final = bytes(tarfile.BLOCKSIZE)
# Errors of the disk, not of the tar: they pass through as OSError.
_DISK_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})
# Errors of an xattr the filesystem or our privileges cannot keep: recorded, not fatal
# (Docker does the same: it warns and goes on).
_XATTR_SKIPPABLE: Final = frozenset({errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.EINVAL})
_FILE_TYPES: Final = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})


def member_xattrs(member: tarfile.TarInfo) -> list[tuple[str, bytes]]:
    """The xattrs of a tar member (PAX `SCHILY.xattr.*`), in the order to set them:
    security.capability last, as writing data or changing the owner clears it."""
    items = [(key[len(_XATTR_PREFIX) :], value.encode("utf-8", "surrogateescape"))
             for key, value in member.pax_headers.items() if key.startswith(_XATTR_PREFIX)]
    items.sort(key=lambda item: item[0] == CAPABILITY)
    return items


@dataclass(frozen=True, slots=True)
class UnpackLimits:
    """Bounds on what a layer may claim; past them it is refused as absurd."""

    max_file_size: int = 256 << 30
    """Largest regular file (its header size)."""
    max_header_size: int = 16 << 20
    """Largest PAX record block or GNU long name: tarfile reads these into memory."""
    max_depth: int = 256
    """Most path components in a name (the openat walk holds one fd per level)."""


@dataclass(frozen=True, slots=True)
class UnpackStats:
    diff_id: DiffID
    tar_size: int
    """Bytes of uncompressed tar hashed, trailing padding included."""
    entries: int = 0
    files: int = 0
    data_bytes: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    whiteouts: int = 0
    opaques: int = 0
    markers_kept: bool = False
    """True when whiteouts or opaque markers stayed `.wh.` files (no privilege for the
    kernel's forms)."""
    dropped: tuple[str, ...] = ()
    """What could not be kept (xattrs the filesystem refused, owners when not root), one
    "entry: what: why" line each; Docker warns about the same and goes on."""


@dataclass(slots=True)
class _Counts:
    entries: int = 0
    files: int = 0
    data_bytes: int = 0
    directories: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    whiteouts: int = 0
    opaques: int = 0
    owners_dropped: int = 0
    dropped: list[str] = field(default_factory=list)


def unpack_layer(
    stream: Reader,
    dest: Path,
    *,
    name: str | None = None,
    limits: UnpackLimits | None = None,
    compression: Compression | None = None,
) -> UnpackStats:
    """Unpack the layer tar `stream` into the empty directory `dest`.

    `compression` None detects it from the first bytes; a caller that already decompressed
    says `Compression.NONE`. `name` names the layer in error messages (default: the
    stream's file name, or "layer").
    Returns the counts and the diff_id: the sha256 of the whole uncompressed tar, read to
    EOF. Raises LayerError for a hostile or malformed tar, a damaged stream, or an entry
    that cannot be made (a device node when not root); OSError for errors of the disk
    (ENOSPC, EIO, ...). After an error `dest` holds a partial layer that the caller removes.
    `dest` gets mode 0755 unless the tar has an entry for its root (`./`).
    """
    if name is None:
        stream_name = getattr(stream, "name", None)
        name = os.path.basename(stream_name) if isinstance(stream_name, str) else "layer"
    unpacker = _Unpacker(dest, name, limits or UnpackLimits())
    try:
        return unpacker.run(stream, compression)
    finally:
        unpacker.close()


class _HashingRaw(io.RawIOBase):
    """The uncompressed tar as a raw stream, hashed as it is pulled: in large chunks."""

    def __init__(self, stream: Reader) -> None:
        self._stream = stream
        self.hasher = Hasher()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._stream.readinto(buffer) or 0
        if n:
            self.hasher.update(memoryview(buffer)[:n])
        return n


class _Source:
    """The tar as tarfile sees it: a file that only seeks forwards, with bounded reads.

    Every byte is hashed once, below a large read buffer, so headers cost no hashing call of
    their own; `drain()` at the end makes the digest cover the stream to EOF.
    """

    def __init__(self, stream: Reader, name: str, max_read: int) -> None:
        self._raw = _HashingRaw(stream)
        buffered = io.BufferedReader(self._raw, COPY_BUFFER_SIZE)
        self._read = buffered.read
        self._readinto = buffered.readinto
        self._name = name
        self._max_read = max_read
        self._pos = 0
        self._scratch = bytearray(COPY_BUFFER_SIZE)
        self.last_at = -1
        self.last = b""

    def read(self, size: int = -1) -> bytes:
        # tarfile calls read() for headers, PAX records and GNU long names only; file data
        # goes through readinto. An unbounded read would let a header claim all memory.
        if size < 0 or size > self._max_read:
            raise LayerError(
                f"{self._name}: tar header block of {size} bytes at offset {self._pos} "
                f"exceeds the limit of {self._max_read}"
            )
        data = self._read(size)
        self.last_at = self._pos
        self.last = data
        self._pos += len(data)
        return data

    def readinto(self, buffer: memoryview) -> int:
        n = self._readinto(buffer)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._pos + offset
        if whence not in (0, 1) or target < self._pos:
            raise io.UnsupportedOperation(f"{self._name}: cannot seek backwards in a stream")
        if target > self._pos:
            self.skip(target - self._pos)
        return self._pos

    def skip(self, count: int) -> int:
        """Read `count` bytes (fewer at EOF) into the void; return how many."""
        view = memoryview(self._scratch)
        done = 0
        while done < count:
            n = self.readinto(view[: min(count - done, len(view))])
            if not n:
                break
            done += n
        return done

    def drain(self) -> int:
        """Read to EOF; return how many bytes were left."""
        view = memoryview(self._scratch)
        done = 0
        while n := self.readinto(view):
            done += n
        return done

    @property
    def size(self) -> int:
        return self._pos

    def digest(self) -> Digest:
        return self._raw.hasher.digest()


class _Unpacker:
    def __init__(self, dest: Path, name: str, limits: UnpackLimits) -> None:
        self._name = name
        self._limits = limits
        self._root = os.open(dest, DIR_FLAGS)
        if os.listdir(self._root):
            os.close(self._root)
            raise LayerError(f"{dest}: not an empty directory")
        os.fchmod(self._root, 0o755)
        # Every write goes through a directory fd from this walk: no symlink is followed.
        self._walker = DirWalker(self._root)
        # Directory metadata applied at the end (their mtimes change as entries are added).
        self._dirs: dict[tuple[bytes, ...], tuple[int, int]] = {}
        self._buffer = bytearray(COPY_BUFFER_SIZE)
        self._whiteout_markers = False
        self._opaque_markers = False
        self._is_root = os.geteuid() == 0
        self._counts = _Counts()

    def close(self) -> None:
        self._walker.close()
        os.close(self._root)

    # -- the stream --------------------------------------------------------------------

    def run(self, stream: Reader, compression: Compression | None) -> UnpackStats:
        reader = open_reader(stream, self._name, compression)
        try:
            source = _Source(reader, self._name, self._limits.max_header_size)
            self._read_entries(source)
            source.drain()
        finally:
            reader.close()
        self._apply_directory_metadata()
        if not self._is_root:
            self._mark_overrides()
        c = self._counts
        if c.owners_dropped:
            c.dropped.append(f"{c.owners_dropped} entries: owners not kept: not root")
        return UnpackStats(
            diff_id=DiffID(source.digest()),
            tar_size=source.size,
            entries=c.entries,
            files=c.files,
            data_bytes=c.data_bytes,
            directories=c.directories,
            symlinks=c.symlinks,
            hardlinks=c.hardlinks,
            devices=c.devices,
            fifos=c.fifos,
            whiteouts=c.whiteouts,
            opaques=c.opaques,
            markers_kept=self._whiteout_markers or self._opaque_markers,
            dropped=tuple(c.dropped),
        )

    def _read_entries(self, source: _Source) -> None:
        try:
            archive = tarfile.open(  # noqa: SIM115 - closed below; it leaves `source` open
                fileobj=cast("IO[bytes]", source),
                mode="r:",
                encoding="utf-8",
                errors="surrogateescape",
            )
        except tarfile.ReadError as exc:
            if source.size == 0:
                return  # an empty stream is an empty layer, as Docker reads it
            raise self._malformed(source, exc) from exc
        except (tarfile.TarError, ValueError, UnicodeError, OverflowError) as exc:
            raise self._malformed(source, exc) from exc
        with archive:
            self._read_members(archive, source)

    def _read_members(self, archive: tarfile.TarFile, source: _Source) -> None:
        while True:
            try:
                member = archive.next()
            except (tarfile.TarError, ValueError, UnicodeError, OverflowError) as exc:
                raise self._malformed(source, exc) from exc
            if member is None:
                break
            # tarfile keeps every header it reads; a layer of 100k entries needs none of them.
            archive.members.clear()  # type: ignore[attr-defined]
            self._counts.entries += 1
            self._entry(member, source)
        self._check_end(source, archive.offset)

    def _malformed(self, source: _Source, exc: Exception) -> LayerError:
        if "unexpected end of data" in str(exc):
            return LayerError(f"{self._name}: truncated tar: the stream ends inside an entry")
        return LayerError(f"{self._name}: malformed tar near offset {source.tell()}: {exc}")

    def _check_end(self, source: _Source, offset: int) -> None:
        """tarfile ends quietly on a truncated or invalid header; a layer may not.

        The end is good when the last header read, at `offset`, met the end of the stream on
        a block boundary or the end-of-archive zero block (Go's archive/tar, and so Docker,
        accept both). Anything else (a partial header, a bad checksum, a PAX record tarfile
        could not parse) means entries were lost.
        """
        if source.last_at == offset and source.last in (b"", _ZERO_BLOCK):
            return
        if source.last_at == offset and len(source.last) < tarfile.BLOCKSIZE:
            raise LayerError(f"{self._name}: truncated tar: the stream ends inside a header")
        raise LayerError(f"{self._name}: malformed tar: invalid header at offset {offset}")

    # -- one entry -----------------------------------------------------------------------

    def _entry(self, member: tarfile.TarInfo, source: _Source) -> None:
        label = _label(member.name)
        try:
            self._dispatch(member, label, source)
        except LayerError:
            raise
        except PathRefused as exc:
            raise self._refuse(label, str(exc)) from exc
        except OSError as exc:
            if exc.errno in _DISK_ERRNOS:
                raise
            why = exc.strerror or str(exc)
            raise LayerError(f"{self._name}: {label}: {why}") from exc
        except (ValueError, OverflowError) as exc:
            raise LayerError(f"{self._name}: {label}: {exc}") from exc

    def _refuse(self, label: str, why: str) -> LayerError:
        return LayerError(f"{self._name}: {label}: {why}")

    def _split(self, text: str, label: str) -> tuple[bytes, ...]:
        raw = text.encode("utf-8", "surrogateescape")
        if raw.startswith(b"/"):
            raise self._refuse(label, "absolute path refused (names are relative to the layer)")
        if b"\0" in raw:
            raise self._refuse(label, "NUL byte in name")
        parts = tuple(p for p in raw.split(b"/") if p and p != b".")
        if b".." in parts:
            raise self._refuse(label, "'..' component refused (it would leave the layer)")
        if len(parts) > self._limits.max_depth:
            raise self._refuse(label, f"deeper than {self._limits.max_depth} components")
        for part in parts[:-1]:
            if is_whiteout_name(part):
                raise self._refuse(label, "a whiteout name used as a directory")
        return parts

    def _dispatch(self, member: tarfile.TarInfo, label: str, source: _Source) -> None:
        parts = self._split(member.name, label)
        kind = member.type
        if not parts:
            if kind != tarfile.DIRTYPE:
                raise self._refuse(label, "the layer root can only be a directory")
            self._owner(self._root, None, member, label)
            self._xattrs(self._root, None, member, label)
            self._dirs[()] = (member.mode & 0o7777, _mtime_ns(member))
            return
        leaf = parts[-1]
        if is_whiteout_name(leaf):
            self._whiteout(parts, member, label, source)
            return
        parent = self._walker.parent(parts[:-1])
        if kind in _FILE_TYPES or kind == tarfile.GNUTYPE_SPARSE:
            self._file(parent, parts, member, label, source)
        elif kind == tarfile.DIRTYPE:
            self._directory(parent, parts, member, label)
        elif kind == tarfile.SYMTYPE:
            self._symlink(parent, parts, member, label)
        elif kind == tarfile.LNKTYPE:
            self._hardlink(parent, parts, member, label)
        elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
            self._special(parent, parts, member, label)
        else:
            raise self._refuse(label, f"unsupported tar entry type {kind.decode('latin-1')!r}")

    # -- creating names --------------------------------------------------------------------

    def _replace(self, parent: int, parts: tuple[bytes, ...]) -> None:
        """Remove what an earlier entry made at `parts`, to make room for a later one."""
        if self._walker.remove(parent, parts[-1]):
            depth = len(parts)
            for key in [k for k in self._dirs if k[:depth] == parts]:
                del self._dirs[key]

    def _make(self, parent: int, parts: tuple[bytes, ...], make: Callable[[], _T]) -> _T:
        try:
            return make()
        except FileExistsError:
            self._replace(parent, parts)
            return make()

    def _file(
        self,
        parent: int,
        parts: tuple[bytes, ...],
        member: tarfile.TarInfo,
        label: str,
        source: _Source,
        with_data: bool = True,
    ) -> None:
        size = member.size
        if size < 0:
            raise self._refuse(label, f"invalid size {size}")
        if size > self._limits.max_file_size:
            raise self._refuse(
                label, f"size {size} exceeds the limit of {self._limits.max_file_size} bytes"
            )
        leaf = parts[-1]
        fd = self._make(parent, parts, lambda: os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=parent))
        try:
            if with_data:
                source.seek(member.offset_data)
                if member.sparse is not None:
                    self._copy_sparse(fd, member, label, source)
                else:
                    self._copy(fd, 0, size, label, source)
                self._counts.data_bytes += size
            self._owner(fd, None, member, label)
            os.fchmod(fd, member.mode & 0o7777)
            self._xattrs(fd, None, member, label)
            mtime = _mtime_ns(member)
            os.utime(fd, ns=(mtime, mtime))
        finally:
            os.close(fd)
        self._counts.files += 1

    def _copy(self, fd: int, offset: int, size: int, label: str, source: _Source) -> None:
        view = memoryview(self._buffer)
        readinto = source.readinto
        remaining = size
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        while remaining:
            n = readinto(view[:remaining] if remaining < len(view) else view)
            if not n:
                raise self._refuse(
                    label,
                    f"truncated tar: the entry claims {size} bytes, the stream ends after "
                    f"{size - remaining}",
                )
            chunk = view[:n]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
            remaining -= n

    def _copy_sparse(self, fd: int, member: tarfile.TarInfo, label: str, source: _Source) -> None:
        sparse = cast("list[tuple[int, int]]", member.sparse)
        end = 0
        for offset, length in sparse:
            if length == 0:
                continue  # tarfile reports the end of an old GNU map as (0, 0)
            if offset < end or length < 0 or offset + length > member.size:
                raise self._refuse(label, "invalid sparse map")
            self._copy(fd, offset, length, label, source)
            end = offset + length
        os.ftruncate(fd, member.size)

    def _directory(
        self, parent: int, parts: tuple[bytes, ...], member: tarfile.TarInfo, label: str
    ) -> None:
        leaf = parts[-1]
        try:
            os.mkdir(leaf, 0o700, dir_fd=parent)
        except FileExistsError:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):  # a directory over a directory merges
                self._replace(parent, parts)
                os.mkdir(leaf, 0o700, dir_fd=parent)
        self._owner(parent, leaf, member, label)
        if _has_xattrs(member):
            fd = os.open(leaf, DIR_FLAGS, dir_fd=parent)
            try:
                self._xattrs(fd, None, member, label)
            finally:
                os.close(fd)
        self._dirs[parts] = (member.mode & 0o7777, _mtime_ns(member))
        self._counts.directories += 1

    def _symlink(
        self, parent: int, parts: tuple[bytes, ...], member: tarfile.TarInfo, label: str
    ) -> None:
        target = member.linkname.encode("utf-8", "surrogateescape")
        if not target or b"\0" in target:
            raise self._refuse(label, "symlink with an empty or NUL-bearing target")
        leaf = parts[-1]
        self._make(parent, parts, lambda: os.symlink(target, leaf, dir_fd=parent))
        self._finish_special(parent, leaf, member, label, chmod=False)
        self._counts.symlinks += 1

    def _hardlink(
        self, parent: int, parts: tuple[bytes, ...], member: tarfile.TarInfo, label: str
    ) -> None:
        target = self._split(member.linkname, label)
        if not target:
            raise self._refuse(label, "hard link to the layer root")
        if target == parts:
            raise self._refuse(label, "hard link to itself")
        if is_whiteout_name(target[-1]):
            raise self._refuse(label, "hard link to a whiteout")
        target_label = _label(member.linkname)
        fds: list[int] = []
        try:
            try:
                fds = self._walker.walk(target[:-1])
            except PathRefused as exc:
                raise self._refuse(label, f"hard link target {target_label}: {exc}") from exc
            source_dir = fds[-1] if fds else self._root
            self._make(
                parent,
                parts,
                lambda: os.link(
                    target[-1],
                    parts[-1],
                    src_dir_fd=source_dir,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                ),
            )
        except FileNotFoundError as exc:
            why = f"hard link target {target_label} is not in the layer (yet)"
            raise self._refuse(label, why) from exc
        except PermissionError as exc:
            why = f"hard link target {target_label} is a directory"
            raise self._refuse(label, why) from exc
        finally:
            for fd in fds:
                os.close(fd)
        self._counts.hardlinks += 1

    def _special(
        self, parent: int, parts: tuple[bytes, ...], member: tarfile.TarInfo, label: str
    ) -> None:
        leaf = parts[-1]
        if member.type == tarfile.FIFOTYPE:
            self._make(parent, parts, lambda: os.mkfifo(leaf, 0o600, dir_fd=parent))
            self._counts.fifos += 1
        else:
            kind = stat.S_IFCHR if member.type == tarfile.CHRTYPE else stat.S_IFBLK
            device = os.makedev(member.devmajor, member.devminor)
            try:
                self._make(
                    parent, parts, lambda: os.mknod(leaf, kind | 0o600, device, dir_fd=parent)
                )
            except PermissionError as exc:
                why = "cannot create a device node: not permitted (needs root)"
                raise self._refuse(label, why) from exc
            self._counts.devices += 1
        self._finish_special(parent, leaf, member, label, chmod=True)

    def _finish_special(
        self, parent: int, leaf: bytes, member: tarfile.TarInfo, label: str, *, chmod: bool
    ) -> None:
        """Owner, mode, xattrs, mtime of a name that cannot be opened safely (no fd)."""
        self._owner(parent, leaf, member, label)
        if chmod:  # the leaf was just made by us and is no symlink: fchmodat is safe
            os.chmod(leaf, member.mode & 0o7777, dir_fd=parent)
        self._xattrs(parent, leaf, member, label)
        mtime = _mtime_ns(member)
        os.utime(leaf, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)

    # -- whiteouts ---------------------------------------------------------------------------

    def _whiteout(
        self, parts: tuple[bytes, ...], member: tarfile.TarInfo, label: str, source: _Source
    ) -> None:
        leaf = parts[-1]
        if is_opaque_marker(leaf):
            parent = self._walker.parent(parts[:-1])
            self._counts.opaques += 1
            if not self._opaque_markers:
                try:
                    os.setxattr(parent, overlay_xattrs.active().opaque, b"y")
                    return
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP):
                        raise
                    self._opaque_markers = True  # not root: keep the marker file
            self._file(parent, parts, member, label, source, with_data=False)
            self._counts.files -= 1
            return
        target = whiteout_target(leaf)
        if target is None:
            raise self._refuse(label, "whiteout that names nothing (lone .wh., . or ..)")
        parent = self._walker.parent(parts[:-1])
        self._counts.whiteouts += 1
        if not self._whiteout_markers:
            try:
                os.mknod(target, stat.S_IFCHR, os.makedev(0, 0), dir_fd=parent)
                return
            except FileExistsError:
                return  # an entry of this very layer: a whiteout hides lower layers only
            except PermissionError:
                self._whiteout_markers = True  # not root: keep the marker file
        try:
            os.stat(target, dir_fd=parent, follow_symlinks=False)
            return  # as above
        except FileNotFoundError:
            pass
        self._file(parent, parts, member, label, source, with_data=False)
        self._counts.files -= 1

    # -- metadata ---------------------------------------------------------------------------

    def _owner(self, fd: int, leaf: bytes | None, member: tarfile.TarInfo, label: str) -> None:
        if not self._is_root:
            # chown to another user needs CAP_CHOWN: every file and directory keeps its
            # owner in the override xattr, as containers-storage does (fuse-overlayfs wants
            # one on each where the layer's root has one); other kinds stay ours, which
            # stands for root's in the image, and other owners of theirs are counted lost
            if not self._record_owner(fd, leaf, member) and (member.uid, member.gid) != (0, 0):
                self._counts.owners_dropped += 1
            return
        if leaf is None:
            os.fchown(fd, member.uid, member.gid)
        else:
            os.chown(leaf, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)

    def _record_owner(self, fd: int, leaf: bytes | None, member: tarfile.TarInfo) -> bool:
        if not (member.isreg() or member.isdir()):
            return False  # user.* xattrs exist on files and directories only
        target = fd if leaf is None else b"/proc/self/fd/%d/%s" % (fd, leaf)
        try:
            overlay_xattrs.set_override(target, member.uid, member.gid, member.mode)
        except OSError as exc:
            if exc.errno not in _XATTR_SKIPPABLE:
                raise
            return False
        return True

    def _mark_overrides(self) -> None:
        """Not root: the layer's root says that owners are kept in override xattrs, which
        is where fuse-overlayfs looks; the root without an entry of its own, and parent
        directories the tar did not list, are root's."""
        for _path, _dirs, _files, fd in os.fwalk(dir_fd=self._root):
            try:
                os.getxattr(fd, overlay_xattrs.OVERRIDE_STAT)
            except OSError:
                with contextlib.suppress(OSError):
                    overlay_xattrs.set_override(fd, 0, 0, stat.S_IMODE(os.fstat(fd).st_mode))

    def _xattrs(self, fd: int, leaf: bytes | None, member: tarfile.TarInfo, label: str) -> None:
        if not _has_xattrs(member):
            return
        items: list[tuple[str, bytes]] = []
        for xname, data in member_xattrs(member):
            if is_private(xname.encode("utf-8", "surrogateescape")):
                # The overlay's own xattrs (opaque, redirect) come from whiteout
                # entries only: a tar may not steer the overlay directly.
                self._counts.dropped.append(f"{label}: xattr {xname}: overlay-private")
                continue
            items.append((xname, data))
        # A name without an fd is set through its parent's fd, never following the leaf.
        path = b"/proc/self/fd/%d/%s" % (fd, leaf) if leaf is not None else None
        for xname, data in items:
            try:
                if path is None:
                    os.setxattr(fd, xname, data)
                else:
                    os.setxattr(path, xname, data, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _XATTR_SKIPPABLE:
                    raise
                self._counts.dropped.append(f"{label}: xattr {xname}: {exc.strerror}")

    def _apply_directory_metadata(self) -> None:
        """Modes and mtimes of directories, deepest first, once nothing is added to them."""
        for parts, (mode, mtime) in sorted(self._dirs.items(), key=_deepest_first):
            if not parts:
                fd = self._root
            else:
                try:
                    parent = self._walker.parent(parts[:-1], create=False)
                    fd = os.open(parts[-1], DIR_FLAGS, dir_fd=parent)
                except (FileNotFoundError, NotADirectoryError, PathRefused):
                    continue  # replaced by a later entry that was no directory
            try:
                os.fchmod(fd, mode)
                os.utime(fd, ns=(mtime, mtime))
            finally:
                if fd != self._root:
                    os.close(fd)
        self._walker.close()


def _label(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _has_xattrs(member: tarfile.TarInfo) -> bool:
    return bool(member.pax_headers) and any(
        key.startswith(_XATTR_PREFIX) for key in member.pax_headers
    )


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The mtime in nanoseconds; PAX keeps fractions that tarfile's float would round."""
    text = member.pax_headers.get("mtime") if member.pax_headers else None
    if text is not None:
        seconds, _, fraction = text.lstrip("+-").partition(".")
        if seconds.isdigit() and (not fraction or fraction.isdigit()):
            ns = int(seconds) * 1_000_000_000 + int(fraction[:9].ljust(9, "0"))
            return -ns if text.startswith("-") else ns
    return int(member.mtime) * 1_000_000_000


def _deepest_first(
    item: tuple[tuple[bytes, ...], tuple[int, int]],
) -> tuple[int, tuple[bytes, ...]]:
    return (-len(item[0]), item[0])


__all__ = ["UnpackLimits", "UnpackStats", "unpack_layer"]
