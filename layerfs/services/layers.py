"""Layers into the store: unpack a stored blob, or take a tar stream in one pass.

One pass over a tar stream gives everything a new layer needs: the unpacked layer dir, its
diff_id (sha256 of the tar), and a compressed blob with its digest, because the tar bytes the
unpacker reads are teed into a compressor whose output is hashed as it is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from layerfs.compression import Compression, open_reader, open_writer
from layerfs.digest import DiffID, Digest, Hasher
from layerfs.errors import DigestError
from layerfs.oci import mediatypes
from layerfs.store import atomic
from layerfs.tarlayer.read import unpack_layer

if TYPE_CHECKING:
    from layerfs.digest import Reader, Writer
    from layerfs.store.store import Store


@dataclass(frozen=True, slots=True)
class NewLayer:
    diff_id: DiffID
    blob: Digest
    blob_size: int
    media_type: str


class _TeeReader:
    """Reads from `stream` and writes every byte read to `sink`."""

    def __init__(self, stream: Reader, sink: Writer) -> None:
        self._stream = stream
        self._sink = sink

    def read(self, size: int = -1, /) -> bytes:
        data = self._stream.read(size)
        self._sink.write(data)
        return data

    def readinto(self, buffer: bytearray | memoryview, /) -> int:
        n = self._stream.readinto(buffer) or 0
        if n:
            self._sink.write(memoryview(buffer)[:n])
        return n


class _HashingWriter:
    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.hasher = Hasher()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        self.hasher.update(data)
        self.size += len(data)
        return self._out.write(data)

    def flush(self) -> None:
        self._out.flush()


def unpack_blob(store: Store, blob: Digest, diff_id: DiffID | None = None) -> DiffID:
    """Unpack a stored layer blob (once per diff_id); DigestError if its diff_id is wrong."""
    if diff_id is not None and store.has_layer(diff_id):
        return diff_id
    with store.staged_layer() as stage, store.blobs.open(blob) as stream:
        stats = unpack_layer(stream, stage / "diff", name=blob)
        if diff_id is not None and stats.diff_id != diff_id:
            raise DigestError(
                f"{blob}: layer diff_id mismatch: expected {diff_id}, got {stats.diff_id}"
            )
        store.install_layer(stage, stats.diff_id, stats.data_bytes, stats.entries)
        return stats.diff_id


def add_tar_stream(
    store: Store, stream: Reader, name: str, compression: Compression = Compression.GZIP
) -> NewLayer:
    """A tar stream (any compression) becomes a layer and a blob, in one pass."""
    source = open_reader(stream, name)
    with atomic.staging_file(store.layout.tmp) as (blob_tmp, blob_file), \
            store.staged_layer() as stage:
        hashing = _HashingWriter(blob_file)
        writer = open_writer(hashing, compression)
        tee = _TeeReader(source, writer)
        stats = unpack_layer(tee, stage / "diff", name=name)
        writer.close()
        blob_file.flush()
        os.fsync(blob_file.fileno())
        blob_digest = hashing.hasher.digest()
        store.blobs.adopt(blob_tmp, blob_digest)
        store.install_layer(stage, stats.diff_id, stats.data_bytes, stats.entries)
    media_type = mediatypes.layer_type(compression.value)
    return NewLayer(stats.diff_id, blob_digest, hashing.size, media_type)
