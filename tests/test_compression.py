"""Compression: detection, round trips, determinism, and damage that must not pass."""

from __future__ import annotations

import gzip
import io
import os

import pytest

from layerfs.compression import (
    Compression,
    compress,
    decompress,
    detect,
    open_reader,
    open_writer,
)
from layerfs.errors import LayerError

DATA = os.urandom(100_000) + b"\0" * 3_000_000 + b"tail"


@pytest.mark.parametrize("kind", list(Compression))
def test_round_trip_and_detection(kind: Compression) -> None:
    packed = compress(DATA, kind)
    assert detect(packed[:4]) is kind
    assert decompress(packed) == DATA
    reader = open_reader(io.BytesIO(packed), "x")
    assert reader.compression is kind
    buf = bytearray(1 << 16)
    out = bytearray()
    while n := reader.readinto(buf):
        out += buf[:n]
    assert bytes(out) == DATA


def test_gzip_is_deterministic_and_standard() -> None:
    class Named(io.BytesIO):
        name = "/tmp/some-file.tar"

    out = Named()
    with open_writer(out, Compression.GZIP) as w:
        w.write(DATA)
    packed = out.getvalue()
    assert packed[4:8] == b"\0\0\0\0"  # mtime 0
    assert not packed[3] & 0x08  # no FNAME field, whatever the file is called
    assert packed == compress(DATA, Compression.GZIP)
    assert gzip.decompress(packed) == DATA
    assert not out.closed  # closing the writer leaves the stream open


def test_concatenated_gzip_members_are_one_stream() -> None:
    packed = compress(b"abc", Compression.GZIP) + compress(b"def", Compression.GZIP)
    assert decompress(packed) == b"abcdef"


@pytest.mark.parametrize("kind", [Compression.GZIP, Compression.ZSTD])
@pytest.mark.parametrize("cut", [4, 10, 100, -9, -1])
def test_truncated_stream_is_an_error(kind: Compression, cut: int) -> None:
    packed = compress(DATA, kind)
    with pytest.raises(LayerError, match=rf"^layer\.tar\.x: truncated {kind.value} stream$"):
        decompress(packed[:cut], "layer.tar.x")


@pytest.mark.parametrize("kind", [Compression.GZIP, Compression.ZSTD])
def test_corrupt_stream_is_an_error(kind: Compression) -> None:
    packed = bytearray(compress(DATA, kind))
    packed[len(packed) // 2] ^= 0xFF
    with pytest.raises(LayerError, match=rf"^blob: (corrupt|truncated) {kind.value} stream"):
        decompress(bytes(packed), "blob")


def test_gzip_crc_is_checked() -> None:
    packed = bytearray(compress(DATA, Compression.GZIP))
    packed[-5] ^= 0x01  # inside the CRC32 trailer
    with pytest.raises(LayerError, match="corrupt gzip stream"):
        decompress(bytes(packed), "blob")


def test_reader_accepts_streams_without_peek() -> None:
    class Plain:
        def __init__(self, data: bytes) -> None:
            self._io = io.BytesIO(data)

        def read(self, size: int = -1, /) -> bytes:
            return self._io.read(size)

        def readinto(self, buffer: bytearray | memoryview, /) -> int:
            return self._io.readinto(buffer)

    assert open_reader(Plain(compress(DATA, Compression.ZSTD))).read() == DATA
