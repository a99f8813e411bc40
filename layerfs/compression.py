"""Layer compression: detect it, undo it while reading, apply it while writing.

Owns: the magic numbers of gzip and zstd, the choice of implementation (isal's igzip for
gzip, which is several times faster than zlib; `backports.zstd` for zstd), and the rule that a
damaged stream is an error: a truncated or corrupt stream raises `LayerError` ("layer.tar.gz:
truncated gzip stream"), it never reads as a shorter stream.

Does not know what the bytes are (tar or not), nor media types: a layer's media type says
what its producer meant, the magic bytes say what it is, and the caller decides which to
trust. Writers are deterministic: gzip headers carry mtime 0 and no file name.

Concurrency: one reader or writer per stream, used from one thread at a time.
"""

from __future__ import annotations

import enum
import functools
import io
from typing import TYPE_CHECKING, Final, cast

from layerfs.errors import LayerError

if TYPE_CHECKING:
    from typing import BinaryIO

    from layerfs.digest import Reader, Writer

GZIP_MAGIC: Final = b"\x1f\x8b"
ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
# Reads from the compressed side in chunks this large: few calls, little per-call overhead.
READ_BUFFER_SIZE: Final = 1 << 20
# isal offers levels 0-3; 2 is its default and near zlib level 6 in ratio, several times faster.
GZIP_LEVEL: Final = 2
ZSTD_LEVEL: Final = 3


# The codecs are imported on first use: commands that compress nothing (`layerfs mount`)
# start faster without them.


@functools.cache
def _damage() -> tuple[type[Exception], ...]:
    """What the decompressors raise for damaged input; OSError from the stream below is not
    one. (isal's stub declares IsalError as an instance, hence the cast.)"""
    import isal.igzip
    import isal.igzip_lib
    from backports import zstd

    return (EOFError, isal.igzip.BadGzipFile, cast("type[Exception]", isal.igzip_lib.IsalError),
            zstd.ZstdError)


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


def detect(head: bytes) -> Compression:
    """The compression of a stream that starts with `head` (4 bytes suffice)."""
    if head.startswith(GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.NONE


class _RawAdapter(io.RawIOBase):
    """Presents any `Reader` as a raw stream, so that `io.BufferedReader` can wrap it."""

    def __init__(self, stream: Reader) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int | None:  # type: ignore[override]
        return self._stream.readinto(buffer)


class DecompressingReader(io.BufferedIOBase):
    """The uncompressed bytes of a stream; damage raises `LayerError` naming the stream.

    Closing it does not close the compressed stream it reads from: whoever opened that
    closes it.
    """

    def __init__(self, inner: io.BufferedIOBase, compression: Compression, name: str) -> None:
        self._inner = inner
        self.compression = compression
        self.name = name

    def readable(self) -> bool:
        return True

    def _fail(self, exc: Exception) -> LayerError:
        kind = self.compression.value
        if isinstance(exc, EOFError):
            return LayerError(f"{self.name}: truncated {kind} stream")
        return LayerError(f"{self.name}: corrupt {kind} stream: {exc}")

    def read(self, size: int | None = -1, /) -> bytes:
        try:
            return self._inner.read(size)
        except _damage() as exc:
            raise self._fail(exc) from exc

    def read1(self, size: int = -1, /) -> bytes:
        try:
            return self._inner.read1(size)
        except _damage() as exc:
            raise self._fail(exc) from exc

    def readinto(self, buffer: bytearray | memoryview, /) -> int:  # type: ignore[override]
        try:
            return self._inner.readinto(buffer)
        except _damage() as exc:
            raise self._fail(exc) from exc

    def close(self) -> None:
        if not self.closed:
            if self.compression is not Compression.NONE:
                self._inner.close()  # the decompressor only; it leaves its fileobj open
            super().close()


def _buffered(stream: Reader) -> io.BufferedReader:
    if isinstance(stream, io.BufferedReader):
        return stream
    return io.BufferedReader(_RawAdapter(stream), READ_BUFFER_SIZE)


def open_reader(
    stream: Reader, name: str = "layer", compression: Compression | None = None
) -> DecompressingReader:
    """A reader of the uncompressed bytes of `stream`.

    `compression` None detects it from the magic bytes. `name` names the stream in errors
    (a file name or a blob digest). Errors: LayerError for a truncated or corrupt stream,
    raised by the reads that meet the damage; OSError from `stream` itself passes through.
    """
    buffered = _buffered(stream)
    if compression is None:
        compression = detect(buffered.peek(4)[:4])
    inner: io.BufferedIOBase
    if compression is Compression.GZIP:
        import isal.igzip

        inner = isal.igzip.IGzipFile(fileobj=buffered, mode="rb")  # type: ignore[no-untyped-call]
    elif compression is Compression.ZSTD:
        from backports import zstd

        inner = zstd.ZstdFile(buffered, mode="r")
    else:
        inner = buffered
    return DecompressingReader(inner, compression, name)


def open_writer(
    stream: Writer, compression: Compression, level: int | None = None
) -> io.BufferedIOBase:
    """A writer that compresses into `stream`; close it to finish the stream.

    Closing the writer flushes the compressor and writes the trailer; it does not close
    `stream`. Output is deterministic for a given input, library version and level: the gzip
    header has mtime 0, no file name.
    """
    if compression is Compression.GZIP:
        import isal.igzip

        return isal.igzip.IGzipFile(  # type: ignore[no-untyped-call]
            filename="",
            mode="wb",
            compresslevel=GZIP_LEVEL if level is None else level,
            fileobj=stream,
            mtime=0,
        )
    if compression is Compression.ZSTD:
        from backports import zstd

        options: dict[int, int] = {
            zstd.CompressionParameter.compression_level: ZSTD_LEVEL if level is None else level,
            # A frame checksum, as Docker's encoder (klauspost/compress) writes by default: a
            # reader then detects damage without the blob digest.
            zstd.CompressionParameter.checksum_flag: 1,
        }
        # (ZstdFile never closes a file object it was given; its stub asks for close anyway.)
        return zstd.ZstdFile(cast("BinaryIO", stream), mode="w", options=options)
    return _Uncloseable(stream)


class _Uncloseable(io.BufferedIOBase):
    """The identity writer: passes writes through, and its close leaves `stream` open."""

    def __init__(self, stream: Writer) -> None:
        self._stream = stream

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        return self._stream.write(data)

    def flush(self) -> None:
        if not self.closed:
            self._stream.flush()


def compress(data: bytes, compression: Compression, level: int | None = None) -> bytes:
    """`data` compressed, as `open_writer` would write it."""
    out = io.BytesIO()
    with open_writer(out, compression, level) as writer:
        writer.write(data)
    return out.getvalue()


def decompress(data: bytes, name: str = "data") -> bytes:
    """`data` decompressed (compression detected); LayerError if damaged."""
    with open_reader(io.BytesIO(data), name) as reader:
        return reader.read()


__all__ = [
    "Compression",
    "DecompressingReader",
    "compress",
    "decompress",
    "detect",
    "open_reader",
    "open_writer",
]
