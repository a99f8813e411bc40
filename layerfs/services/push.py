"""`push`: an image from the store to a registry, as docker pushes.

Each blob (layers, then the config) is checked with HEAD first and skipped if the registry
has it; else mounted from another repository of the same registry that is known to hold it;
else uploaded, in one PUT when small and in PATCH chunks when big. The manifest goes last,
as the exact bytes stored, so the image's digest is the same on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs.errors import UsageError
from layerfs.reference import Reference
from layerfs.services import registries

if TYPE_CHECKING:
    from collections.abc import Callable

    from layerfs.digest import Digest
    from layerfs.services.pull import PullProgress
    from layerfs.store.store import Store


@dataclass(frozen=True, slots=True)
class Pushed:
    reference: Reference
    digest: Digest
    size: int


def push(
    store: Store, text: str, *, insecure: bool = False, progress: PullProgress | None = None
) -> Pushed:
    ref = Reference.parse(text)
    if ref.tag is None:
        raise UsageError(f"{text}: push needs a tag")
    image = store.resolve(text)
    what = str(ref)
    blobs = [*(layer.digest for layer in image.manifest.layers), image.manifest.config.digest]
    with registries.client_for(store, ref.domain, insecure=insecure) as client:
        for digest in blobs:
            short = digest.removeprefix("sha256:")[:12]
            if client.blob_exists(ref.path, digest, f"{what}: blob {short}"):
                _say(progress, digest, "Layer already exists")
                continue
            mounted = False
            for source in registries.blob_sources(store, ref.domain, digest):
                if source != ref.path and client.mount_blob(
                    ref.path, digest, source, f"{what}: blob {short}"
                ):
                    _say(progress, digest, f"Mounted from {source}")
                    mounted = True
                    break
            if mounted:
                continue
            size = store.blobs.size(digest)
            with store.blobs.open(digest) as f:
                client.upload_blob(
                    ref.path,
                    digest,
                    f,
                    size,
                    f"{what}: blob {short}",
                    _reporter(progress, digest, size),
                )
            _say(progress, digest, "Pushed")
        client.put_manifest(ref.path, ref.tag, image.manifest.raw, image.manifest.media_type, what)
    registries.remember_sources(store, ref.domain, ref.path, blobs)
    return Pushed(ref, image.manifest_digest, len(image.manifest.raw))


def _reporter(progress: PullProgress | None, digest: Digest, size: int) -> Callable[[int], None]:
    def report(done: int) -> None:
        _say(progress, digest, "Pushing", done, size)

    return report


def _say(
    progress: PullProgress | None, digest: Digest, status: str, done: int = 0, total: int = 0
) -> None:
    if progress is not None:
        progress.layer(digest, status, done, total)
