"""Content digests: the `sha256:<hex>` strings that name blobs, layers and images.

Owns: the digest NewTypes (`Digest`, `DiffID`, `ChainID`), their validation, hashing of bytes
and of streams as they pass, and the OCI chain id (image-spec `config.md`, "Layer ChainID").

Does not know what is hashed (a blob, a config, an uncompressed layer tar): callers say that,
and decide what a mismatch means; `verify` only raises `DigestError` with their words. Only
sha256 is accepted: it is what Docker and the OCI specs use, and a store keyed by one
algorithm has one name per content.

Concurrency: plain values and per-stream objects; nothing shared.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import TYPE_CHECKING, NewType, Protocol

from layerfs.errors import DigestError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

Digest = NewType("Digest", str)
"""`sha256:` + 64 lowercase hex digits, validated."""

DiffID = NewType("DiffID", Digest)
"""The digest of an uncompressed layer tar: names an unpacked layer."""

ChainID = NewType("ChainID", Digest)
"""The digest naming a stack of layers, bottom first (see `chain_ids`)."""

ALGORITHM = "sha256"
_PREFIX = "sha256:"
# The OCI image-spec pattern for sha256 (descriptor.md, "Registered algorithms"): lowercase only.
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)

Bytes = bytes | bytearray | memoryview


class Reader(Protocol):
    """What layerfs reads streams through: a binary file's `read` and `readinto`.

    Files opened "rb", `io.BytesIO`, and the readers of `layerfs.compression` all fit.
    """

    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...


class Writer(Protocol):
    """What layerfs writes streams through: a binary file's `write` and `flush`."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...

    def flush(self) -> None: ...


# Streams are drained in chunks of this size; large enough that per-call overhead vanishes.
CHUNK_SIZE = 1 << 20


def parse_digest(text: str) -> Digest:
    """Validate `text` as `sha256:<64 lowercase hex>`; raise DigestError otherwise."""
    if _DIGEST_RE.fullmatch(text) is None:
        algorithm, sep, _ = text.partition(":")
        if sep and algorithm != ALGORITHM:
            why = f"unsupported digest algorithm {algorithm!r} (only sha256)"
        else:
            why = "not a digest (expected sha256:<64 lowercase hex digits>)"
        raise DigestError(f"{text!r}: {why}")
    return Digest(text)


def is_digest(text: str) -> bool:
    return _DIGEST_RE.fullmatch(text) is not None


def encoded(digest: Digest) -> str:
    """The hex part of a digest, as used for file names under `blobs/sha256/`."""
    return digest[len(_PREFIX) :]


def from_hex(hex_digest: str) -> Digest:
    """The digest for a hex string (a file name in `blobs/sha256/`); DigestError if malformed."""
    return parse_digest(_PREFIX + hex_digest)


def digest_bytes(data: Bytes) -> Digest:
    """The digest of `data`. Manifests and configs are hashed as the exact bytes kept."""
    return Digest(_PREFIX + hashlib.sha256(data).hexdigest())


def verify(expected: Digest, actual: Digest, what: str) -> None:
    """Raise DigestError naming `what` unless the two digests are equal."""
    if expected != actual:
        raise DigestError(f"{what}: digest mismatch: expected {expected}, got {actual}")


class Hasher:
    """A streaming sha256 that also counts bytes: feed it with `update`, read `digest()`."""

    __slots__ = ("_hash", "size")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, data: Bytes) -> None:
        self._hash.update(data)
        self.size += memoryview(data).nbytes

    def digest(self) -> Digest:
        return Digest(_PREFIX + self._hash.hexdigest())


class HashingReader:
    """Wraps a binary stream and hashes every byte read through it, in order.

    Looks enough like a read-only file for `tarfile`: `read`, `readinto`, `tell`, and a
    forward-only `seek` that reads (and hashes) the bytes it skips, so the digest always
    covers a contiguous prefix of the stream. A backward seek raises `io.UnsupportedOperation`.
    Call `drain()` at the end so that the digest covers the stream up to EOF (a tar's trailing
    zero blocks and padding are part of its diff_id).
    """

    def __init__(self, stream: Reader) -> None:
        self._stream = stream
        self._hasher = Hasher()
        self._scratch: bytearray | None = None

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._hasher.update(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        n = self._stream.readinto(buffer)
        if n is None:  # a non-blocking raw stream; layerfs never makes one
            raise OSError("stream would block")
        if n:
            self._hasher.update(memoryview(buffer)[:n])
        return n

    def tell(self) -> int:
        return self._hasher.size

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self._hasher.size + offset if whence == 1 else -1
        if target < self._hasher.size:
            raise io.UnsupportedOperation(f"cannot seek backwards to {offset} (whence {whence})")
        self.skip(target - self._hasher.size)
        return self._hasher.size

    def _scratch_view(self, size: int) -> memoryview:
        # One buffer for skipping, grown to what is asked (at most CHUNK_SIZE), then kept.
        if self._scratch is None or len(self._scratch) < size:
            self._scratch = bytearray(max(size, 1 << 16))
        return memoryview(self._scratch)

    def skip(self, count: int) -> int:
        """Read and hash `count` bytes, or fewer at EOF; return how many were skipped."""
        if count <= 0:
            return 0
        view = self._scratch_view(min(count, CHUNK_SIZE))
        done = 0
        while done < count:
            n = self.readinto(view[: min(count - done, len(view))])
            if n == 0:
                break
            done += n
        return done

    def drain(self) -> int:
        """Read and hash to EOF; return the number of bytes that were left."""
        view = self._scratch_view(CHUNK_SIZE)
        done = 0
        while n := self.readinto(view):
            done += n
        return done

    @property
    def size(self) -> int:
        """Bytes read so far."""
        return self._hasher.size

    def digest(self) -> Digest:
        """The digest of everything read so far."""
        return self._hasher.digest()


def digest_stream(stream: Reader) -> tuple[Digest, int]:
    """Hash `stream` to EOF; return its digest and size."""
    reader = HashingReader(stream)
    reader.drain()
    return reader.digest(), reader.size


def chain_ids(diff_ids: Iterable[DiffID]) -> list[ChainID]:
    """The chain id of each prefix of a layer stack, bottom layer first.

    image-spec config.md: ChainID(L0) = DiffID(L0), and
    ChainID(L0|...|Ln) = sha256(ChainID(L0|...|Ln-1) + " " + DiffID(Ln)), hashing the
    text of both digests.
    """
    out: list[ChainID] = []
    for diff_id in diff_ids:
        if not out:
            out.append(ChainID(diff_id))
        else:
            out.append(ChainID(digest_bytes(f"{out[-1]} {diff_id}".encode("ascii"))))
    return out


def chain_id(diff_ids: Sequence[DiffID]) -> ChainID:
    """The chain id of a whole stack, bottom first; DigestError for an empty stack."""
    if not diff_ids:
        raise DigestError("chain id: an empty layer stack has none")
    return chain_ids(diff_ids)[-1]
