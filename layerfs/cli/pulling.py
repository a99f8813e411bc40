"""Pulling with docker's output, for `pull` and for the implicit pull of `mount` and `run`.

The registry client is imported only when a pull happens.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING

import click

from layerfs.cli.main import human_size
from layerfs.errors import NotFoundError, ReferenceError_
from layerfs.reference import Reference
from layerfs.services import images as images_service

if TYPE_CHECKING:
    from layerfs.digest import Digest
    from layerfs.store.store import Image, Store


class LineProgress:
    """Docker's per-layer status lines, one per change of status (no byte counts)."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}
        self._lock = threading.Lock()

    def layer(self, digest: Digest, status: str, done: int = 0, total: int = 0) -> None:
        short = digest.removeprefix("sha256:")[:12]
        with self._lock:
            if self._last.get(short) == status:
                return
            self._last[short] = status
            if status in ("Downloading", "Pushing") and not sys.stdout.isatty():
                return
            suffix = f" {human_size(done)}/{human_size(total)}" if total and done else ""
            click.echo(f"{short}: {status}{suffix}")


def pull_image(
    store: Store, text: str, *, platform: str | None = None, insecure: bool = False
) -> Image:
    """Pull with docker's output; returns the image."""
    ref = Reference.parse(text)
    click.echo(
        f"{ref.tag or ref.digest}: Pulling from {ref.familiar()}"
    )
    from layerfs.services import pull as pull_service

    pulled = pull_service.pull(
        store, text, platform=platform, insecure=insecure, progress=LineProgress()
    )
    click.echo(f"Digest: {pulled.digest}")
    name = f"{ref.familiar()}:{ref.tag}" if ref.tag else f"{ref.familiar()}@{ref.digest}"
    if pulled.up_to_date:
        click.echo(f"Status: Image is up to date for {name}")
    else:
        click.echo(f"Status: Downloaded newer image for {name}")
    return pulled.image


def resolve_or_pull(store: Store, text: str) -> Image:
    """docker run's rule: an image missing from the store is pulled first."""
    try:
        return images_service.resolve(store, text)
    except NotFoundError:
        try:
            Reference.parse(text)
        except ReferenceError_:
            raise NotFoundError(f"{text}: no such image") from None
        click.echo(f"Unable to find image '{text}' locally", err=True)
        return pull_image(store, text)


