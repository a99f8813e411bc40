"""Plain HTTP(S) downloads: the tarball of `layerfs import URL`, as `docker import` takes one.

The body streams: nothing is kept in memory or written anywhere but where the reader puts it.
Redirects are followed. A body that ends before its Content-Length (a cut connection) raises,
so that the import fails and the store keeps nothing of it; so does an error status.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import httpx

from layerfs.errors import DownloadError

if TYPE_CHECKING:
    from collections.abc import Iterator

CHUNK = 1 << 20


class _Body:
    """A response body as a `Reader` (read, readinto)."""

    def __init__(self, response: httpx.Response, url: str) -> None:
        self._chunks = response.iter_bytes(CHUNK)
        self._pending = b""
        self._url = url

    def _next(self) -> bytes:
        try:
            return next(self._chunks, b"")
        except httpx.HTTPError as exc:  # cut in the middle: h11 checks Content-Length
            raise DownloadError(f"{self._url}: {_reason(exc)}") from exc

    def readinto(self, buffer: bytearray | memoryview, /) -> int:
        if not self._pending:
            self._pending = self._next()
        count = min(len(buffer), len(self._pending))
        buffer[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            parts = [self._pending]
            self._pending = b""
            while chunk := self._next():
                parts.append(chunk)
            return b"".join(parts)
        if not self._pending:
            self._pending = self._next()
        data, self._pending = self._pending[:size], self._pending[size:]
        return data


@contextlib.contextmanager
def open_url(url: str, *, timeout: float = 60.0) -> Iterator[_Body]:
    """The body at `url`, streaming; DownloadError if it cannot be had whole."""
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), follow_redirects=True,
                          headers={"User-Agent": "layerfs/0.1"}) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise DownloadError(f"{url}: {response.status_code} {response.reason_phrase}"
                                    .rstrip())
            yield _Body(response, url)
    except httpx.InvalidURL as exc:
        raise DownloadError(f"{url}: invalid URL: {_reason(exc)}") from exc
    except httpx.HTTPError as exc:
        raise DownloadError(f"{url}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
