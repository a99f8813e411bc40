"""Pulling with docker's output, for `pull` and for the implicit pull of `mount` and `run`.

The registry client is imported only when a pull happens.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import TYPE_CHECKING

import click

from layerfs.errors import NotFoundError, ReferenceError_
from layerfs.reference import Reference
from layerfs.services import images as images_service

if TYPE_CHECKING:
    from rich.progress import TaskID

    from layerfs.digest import Digest
    from layerfs.store.store import Image, Store


class LineProgress:
    """Docker's per-layer status lines when the output is not a terminal: one line per change
    of status, byte counts left out."""

    def __init__(self) -> None:
        self._last: dict[str, str] = {}
        self._lock = threading.Lock()

    def layer(self, digest: Digest, status: str, done: int = 0, total: int = 0) -> None:
        short = digest.removeprefix("sha256:")[:12]
        with self._lock:
            if self._last.get(short) == status:
                return
            self._last[short] = status
            if status in ("Downloading", "Pushing"):
                return
            click.echo(f"{short}: {status}")


class BarProgress:
    """On a terminal: a line per layer with its status and a progress bar, as docker draws."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                  DownloadColumn(), transient=False)
        self._tasks: dict[str, TaskID] = {}
        self._totals: dict[str, int] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> BarProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def layer(self, digest: Digest, status: str, done: int = 0, total: int = 0) -> None:
        short = digest.removeprefix("sha256:")[:12]
        with self._lock:
            task = self._tasks.get(short)
            description = f"{short}: {status}"
            if total:
                self._totals[short] = total
            size = self._totals.get(short)
            if task is None:
                self._tasks[short] = self._progress.add_task(description, total=size,
                                                             completed=done)
                return
            finished = status in ("Pull complete", "Already exists", "Pushed",
                                  "Layer already exists") or status.startswith("Mounted")
            self._progress.update(task, description=description, total=size,
                                  completed=size if finished else done or None)


def progress_for_output() -> contextlib.AbstractContextManager[LineProgress | BarProgress]:
    if sys.stdout.isatty():
        return BarProgress()
    return contextlib.nullcontext(LineProgress())


def pull_image(
    store: Store, text: str, *, platform: str | None = None, insecure: bool = False
) -> Image:
    """Pull with docker's output; returns the image."""
    ref = Reference.parse(text)
    click.echo(f"{ref.tag or ref.digest}: Pulling from {ref.familiar()}")
    from layerfs.services import pull as pull_service

    with progress_for_output() as progress:
        pulled = pull_service.pull(store, text, platform=platform, insecure=insecure,
                                   progress=progress)
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


