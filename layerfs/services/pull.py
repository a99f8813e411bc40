"""`pull`: an image from a registry into the store, layers in parallel, each verified.

Manifest (an index picks the platform), config, then the layers: a layer whose diff_id the
store has is skipped ("Already exists"); the others download in parallel into staging files,
verified against their digests while they stream, and are unpacked once. The image is
recorded only when everything is in; if anything fails, what this pull added and no image uses
is removed again (`images.all_or_nothing`), so a failed pull leaves the store as it was.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from layerfs.errors import RegistryError, StoreError
from layerfs.oci import mediatypes
from layerfs.oci.model import Descriptor, ImageConfig, Index, Manifest
from layerfs.reference import Reference
from layerfs.services import registries
from layerfs.services.images import all_or_nothing
from layerfs.services.importing import host_architecture
from layerfs.services.layers import unpack_blob
from layerfs.store import atomic

if TYPE_CHECKING:
    from layerfs.digest import DiffID, Digest
    from layerfs.registry.client import RegistryClient
    from layerfs.store.store import Image, Store

PARALLEL_DOWNLOADS = 4


class PullProgress(Protocol):
    def layer(self, digest: Digest, status: str, done: int = 0, total: int = 0) -> None: ...


class SilentProgress:
    def layer(self, digest: Digest, status: str, done: int = 0, total: int = 0) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Pulled:
    image: Image
    reference: Reference
    digest: Digest
    up_to_date: bool


def host_platform() -> str:
    return f"linux/{host_architecture()}"


def _platform_matches(descriptor: Descriptor, wanted: str) -> bool:
    parts = wanted.split("/")
    platform = descriptor.platform or {}
    if platform.get("os", "") != parts[0] or platform.get("architecture", "") != parts[1]:
        return False
    return len(parts) < 3 or platform.get("variant", "") == parts[2]


def _platform_name(descriptor: Descriptor) -> str:
    platform = descriptor.platform or {}
    return f"{platform.get('os', '?')}/{platform.get('architecture', '?')}"


def _manifest_for(
    client: RegistryClient, ref: Reference, platform: str, what: str
) -> tuple[Manifest, Digest, Digest | None]:
    """The platform's manifest, its digest, and the digest of the index it came from."""
    reference = ref.digest or ref.tag or "latest"
    fetched = client.get_manifest(ref.path, reference, what)
    index_digest = None
    if fetched.media_type in mediatypes.INDEXES:
        index_digest = fetched.digest
        index = Index.parse(fetched.raw, fetched.media_type, what=what)
        chosen = next((d for d in index.manifests if _platform_matches(d, platform)), None)
        if chosen is None:
            offered = sorted({_platform_name(d) for d in index.manifests})
            raise RegistryError(
                f"{what}: no image for {platform} (the index has {', '.join(offered) or 'none'})"
            )
        fetched = client.get_manifest(ref.path, chosen.digest, what)
    if fetched.media_type not in mediatypes.MANIFESTS:
        raise RegistryError(f"{what}: unsupported manifest media type {fetched.media_type!r}")
    try:
        manifest = Manifest.parse(fetched.raw, fetched.media_type, what=what)
    except StoreError as exc:
        raise RegistryError(str(exc)) from None
    return manifest, fetched.digest, index_digest


def pull(
    store: Store,
    text: str,
    *,
    platform: str | None = None,
    insecure: bool = False,
    progress: PullProgress | None = None,
) -> Pulled:
    ref = Reference.parse(text)
    what = str(ref)
    progress = progress or SilentProgress()
    platform = platform or host_platform()
    if len(platform.split("/")) not in (2, 3):
        raise RegistryError(f"{platform}: a platform is os/arch[/variant]")
    with registries.client_for(store, ref.domain, insecure=insecure) as client:
        manifest, manifest_digest, index_digest = _manifest_for(client, ref, platform, what)
        shown = index_digest or manifest_digest
        state = store.state()
        image_id = manifest.config.digest
        tags = [ref] if ref.tag is not None else []
        if (
            image_id in state.images
            and state.images[image_id].manifest == manifest_digest
            and all(store.has_layer(d) for d in store.image(image_id, state).diff_ids)
        ):
            image = store.add_image(manifest.raw, tags, manifest_digest, index_digest)
            return Pulled(image, ref, shown, up_to_date=True)
        with all_or_nothing(store):
            if not store.blobs.has(image_id):
                config_raw = client.get_blob_bytes(ref.path, image_id, f"{what}: config")
                store.blobs.put_bytes(config_raw, image_id)
            config = ImageConfig.parse(store.blobs.read(image_id), what=f"{what}: config")
            if len(config.diff_ids) != len(manifest.layers):
                raise RegistryError(
                    f"{what}: the config lists {len(config.diff_ids)} layers, "
                    f"the manifest {len(manifest.layers)}"
                )
            _fetch_layers(store, client, ref, manifest, config.diff_ids, progress)
            image = store.add_image(manifest.raw, tags, manifest_digest, index_digest)
    registries.remember_sources(
        store, ref.domain, ref.path, [layer.digest for layer in manifest.layers]
    )
    return Pulled(image, ref, shown, up_to_date=False)


def _fetch_layers(
    store: Store,
    client: RegistryClient,
    ref: Reference,
    manifest: Manifest,
    diff_ids: tuple[DiffID, ...],
    progress: PullProgress,
) -> None:
    todo: list[tuple[Descriptor, DiffID]] = []
    for layer, diff_id in zip(manifest.layers, diff_ids, strict=True):
        if layer.media_type not in mediatypes.LAYERS and layer.media_type:
            raise RegistryError(f"{ref}: unsupported layer media type {layer.media_type!r}")
        if store.has_layer(diff_id) and store.blobs.has(layer.digest):
            progress.layer(layer.digest, "Already exists")
        else:
            progress.layer(layer.digest, "Pulling fs layer", 0, layer.size)
            todo.append((layer, diff_id))
    if not todo:
        return
    with concurrent.futures.ThreadPoolExecutor(PARALLEL_DOWNLOADS) as pool:
        futures = [
            pool.submit(_fetch_one, store, client, ref, layer, diff_id, progress)
            for layer, diff_id in todo
        ]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
        except BaseException:
            for future in futures:  # the pool waits for those already running
                future.cancel()
            raise


def _fetch_one(
    store: Store,
    client: RegistryClient,
    ref: Reference,
    layer: Descriptor,
    diff_id: DiffID,
    progress: PullProgress,
) -> None:
    short = layer.digest.removeprefix("sha256:")[:12]
    if not store.blobs.has(layer.digest):
        with atomic.staging_file(store.layout.tmp) as (tmp, out):
            client.fetch_blob(
                ref.path,
                layer.digest,
                out,
                f"{ref}: layer {short}",
                lambda done: progress.layer(layer.digest, "Downloading", done, layer.size),
            )
            out.flush()
            atomic.fsync_file(out)
            progress.layer(layer.digest, "Verifying Checksum")
            store.blobs.adopt(tmp, layer.digest)
    if not store.has_layer(diff_id):
        progress.layer(layer.digest, "Extracting")
        unpack_blob(store, layer.digest, diff_id)
    progress.layer(layer.digest, "Pull complete")


def all_tags(store: Store, text: str, *, insecure: bool = False) -> list[str]:
    ref = Reference.parse(text)
    with registries.client_for(store, ref.domain, insecure=insecure) as client:
        return [f"{ref.name}:{tag}" for tag in client.tags(ref.path)]
