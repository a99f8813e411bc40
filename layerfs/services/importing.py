"""`import`: a root filesystem tarball becomes a one-layer image; `scratch`, the empty image.

Configs and manifests made here are serialized once (canonical JSON) and stored as those
bytes; their digests are computed over them. An import that fails (a bad tarball, a cut
download, a full disk) leaves the store as it was (`images.all_or_nothing`).
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Any

from layerfs.compression import Compression
from layerfs.oci import mediatypes
from layerfs.oci.model import Descriptor, canonical_json
from layerfs.services.changes import apply_changes
from layerfs.services.images import all_or_nothing
from layerfs.services.layers import add_tar_stream
from layerfs.store.store import now

if TYPE_CHECKING:
    from layerfs.digest import DiffID, Reader
    from layerfs.reference import Reference
    from layerfs.store.store import Image, Store


_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386",
           "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def host_architecture() -> str:
    machine = platform.machine()
    return _ARCHES.get(machine, machine)


def build_config(diff_ids: list[DiffID], history: list[dict[str, Any]],
                 container_config: dict[str, Any], created: str) -> dict[str, Any]:
    return {
        "architecture": host_architecture(),
        "os": "linux",
        "created": created,
        "config": container_config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": history,
    }


def store_image(store: Store, config: dict[str, Any], layers: list[Descriptor],
                refs: list[Reference]) -> Image:
    """Serialize a new config and its manifest, store both, record the image."""
    config_raw = canonical_json(config)
    config_digest = store.blobs.put_bytes(config_raw)
    manifest = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_MANIFEST,
        "config": Descriptor(mediatypes.OCI_CONFIG, config_digest, len(config_raw)).to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    return store.add_image(canonical_json(manifest), refs)


def import_tarball(
    store: Store, stream: Reader, source: str, refs: list[Reference], *,
    message: str | None = None, changes: list[str] | None = None,
    compression: Compression = Compression.GZIP,
) -> Image:
    """`docker import`: one layer from a rootfs tarball (gzip, zstd or plain)."""
    container_config: dict[str, Any] = {}
    apply_changes(container_config, changes or [])  # a bad change fails before any work
    with all_or_nothing(store):
        layer = add_tar_stream(store, stream, source, compression)
        created = now()
        history = [{"created": created, "comment": message or f"Imported from {source}"}]
        config = build_config([layer.diff_id], history, container_config, created)
        descriptor = Descriptor(layer.media_type, layer.blob, layer.blob_size)
        return store_image(store, config, [descriptor], refs)


def is_url(source: str) -> bool:
    """What `import` fetches instead of opening: http and https URLs, as docker takes them."""
    return source.startswith(("http://", "https://"))


def import_url(
    store: Store, url: str, refs: list[Reference], *,
    message: str | None = None, changes: list[str] | None = None,
    compression: Compression = Compression.GZIP,
) -> Image:
    """`docker import URL`: the tarball streams from the server into the store; a download
    that fails or is cut short leaves the store as it was (DownloadError)."""
    from layerfs.registry.download import open_url  # httpx: only for a URL

    with open_url(url) as body:
        return import_tarball(store, body, url, refs, message=message, changes=changes,
                              compression=compression)


def scratch(store: Store) -> Image:
    """The empty image: no layers; mounting it gives an empty root."""
    config = build_config([], [], {}, "1970-01-01T00:00:00Z")
    return store_image(store, config, [], [])
