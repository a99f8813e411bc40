"""Content-addressed blobs: a blob is named by the sha256 of its bytes, verified before naming.

Writers stream into a staging file while hashing, fsync, and rename to `blobs/sha256/HEX` only
once the digest is known (and, if one was promised, equal to it). Existing blobs are never
rewritten: same name, same bytes. Every blob this process names is listed in `added`, so that
a command that fails half-way can take back what it brought (`services.images.all_or_nothing`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from layerfs.digest import CHUNK_SIZE, Digest, Hasher, digest_bytes, verify
from layerfs.errors import NotFoundError
from layerfs.store import atomic

if TYPE_CHECKING:
    import io
    from pathlib import Path

    from layerfs.digest import Reader
    from layerfs.store.layout import Layout


class Blobs:
    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self.added: list[Digest] = []
        """The blobs this process named, in order (appended from worker threads too)."""

    def path(self, digest: Digest) -> Path:
        return self._layout.blob(digest)

    def has(self, digest: Digest) -> bool:
        return self._layout.blob(digest).is_file()

    def size(self, digest: Digest) -> int:
        return self._layout.blob(digest).stat().st_size

    def read(self, digest: Digest) -> bytes:
        try:
            return self._layout.blob(digest).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"{digest}: blob not in the store") from None

    def open(self, digest: Digest) -> io.BufferedReader:
        try:
            return open(self._layout.blob(digest), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"{digest}: blob not in the store") from None

    def put_bytes(self, data: bytes, expected: Digest | None = None) -> Digest:
        digest = digest_bytes(data)
        if expected is not None:
            verify(expected, digest, "blob")
        if not self.has(digest):
            with atomic.staging_file(self._layout.tmp) as (tmp, f):
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                self._commit(tmp, digest)
        return digest

    def put_stream(self, stream: Reader, expected: Digest | None = None,
                   what: str = "blob") -> tuple[Digest, int]:
        """Copy `stream` into the store; DigestError (nothing stored) if not `expected`."""
        hasher = Hasher()
        size = 0
        with atomic.staging_file(self._layout.tmp) as (tmp, f):
            while chunk := stream.read(CHUNK_SIZE):
                hasher.update(chunk)
                f.write(chunk)
                size += len(chunk)
            digest = hasher.digest()
            if expected is not None:
                verify(expected, digest, what)
            f.flush()
            os.fsync(f.fileno())
            if not self.has(digest):
                self._commit(tmp, digest)
        return digest, size

    def adopt(self, tmp: Path, digest: Digest) -> None:
        """Name a staged file whose digest the caller computed while writing it."""
        if self.has(digest):
            tmp.unlink()
            return
        self._commit(tmp, digest)

    def _commit(self, tmp: Path, digest: Digest) -> None:
        final = self._layout.blob(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
        self.added.append(digest)

    def all(self) -> list[Digest]:
        if not self._layout.blobs.is_dir():
            return []
        return [Digest("sha256:" + p.name) for p in self._layout.blobs.iterdir()
                if not p.name.startswith(".")]

    def delete(self, digest: Digest) -> None:
        try:
            self._layout.blob(digest).unlink()
        except FileNotFoundError:
            pass
