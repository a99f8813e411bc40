"""`load` and `save`: images to and from docker-save archives and OCI layouts.

Read: an OCI image layout (a directory, as `skopeo copy ... oci:DIR` writes it), an OCI
archive (that layout as a tar), and a `docker save` archive (`manifest.json`, a config and a
tar per layer, as docker and `skopeo copy ... docker-archive:` write it). Every blob is
verified against its digest and every layer against its diff_id before the image is recorded;
an archive that fails (damaged, or a full disk) leaves the store as it was: staging is removed
and so is what it added that no image uses (`images.all_or_nothing`); images of it recorded
before the failure stay.

Written: one tar that is both formats at once, as docker 25 writes it: an OCI layout
(`oci-layout`, `index.json`, `blobs/sha256/`) plus a docker `manifest.json` pointing at the
same blobs. Manifests and configs are written as the exact bytes stored.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

from layerfs.digest import DiffID, Digest, digest_bytes, encoded, parse_digest
from layerfs.errors import LayerfsError, StoreError
from layerfs.oci import mediatypes
from layerfs.oci.model import Descriptor, ImageConfig, Index, Manifest, canonical_json
from layerfs.reference import Reference
from layerfs.services.images import all_or_nothing
from layerfs.services.importing import host_architecture
from layerfs.services.layers import add_tar_stream, unpack_blob

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from layerfs.store.store import Image, Store

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


@dataclass(frozen=True, slots=True)
class Loaded:
    image: Image
    refs: list[str]


class _Source:
    """Files of an archive or a layout dir, by relative path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        if not path.is_dir():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed by close()
            except (tarfile.TarError, OSError) as exc:
                reason = str(exc).splitlines()[0].rstrip(":") if str(exc) else "unreadable"
                raise StoreError(f"{path}: not a tar archive or an OCI layout ({reason})") \
                    from None
            self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers()}

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def exists(self, name: str) -> bool:
        if self._tar is None:
            return (self.path / name).is_file()
        return name in self._members

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[io.BufferedReader]:
        if ".." in name.split("/") or name.startswith("/"):
            raise StoreError(f"{self.path}: entry {name!r} points outside the archive")
        if self._tar is None:
            try:
                with open(self.path / name, "rb") as f:
                    yield f
            except FileNotFoundError:
                raise StoreError(f"{self.path}: {name} is missing") from None
            return
        member = self._members.get(name)
        if member is None or not member.isfile():
            raise StoreError(f"{self.path}: {name} is missing")
        stream = cast("io.BufferedReader | None", self._tar.extractfile(member))
        assert stream is not None
        with stream:
            yield stream

    def read(self, name: str, limit: int = 64 << 20) -> bytes:
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise StoreError(f"{self.path}: {name} is larger than {limit} bytes")
        return data


def load(store: Store, path: Path, repository: str | None = None) -> list[Loaded]:
    """Load every image of an archive or layout; returns them with the names they got."""
    with contextlib.closing(_Source(path)) as source, all_or_nothing(store):
        if source.exists("index.json") and source.exists("oci-layout"):
            return _load_oci(store, source, repository)
        if source.exists("manifest.json"):
            return _load_docker(store, source)
        raise StoreError(f"{path}: neither a docker archive (manifest.json) nor an OCI layout")


def _blob_name(digest: Digest) -> str:
    return f"blobs/sha256/{encoded(digest)}"


def _copy_blob(store: Store, source: _Source, descriptor: Descriptor) -> None:
    if store.blobs.has(descriptor.digest):
        return
    with source.open(_blob_name(descriptor.digest)) as stream:
        store.blobs.put_stream(stream, descriptor.digest, what=f"blob {descriptor.digest}")


def _names_for(annotations: dict[str, str] | None, repository: str | None) -> list[Reference]:
    annotations = annotations or {}
    for key in (CONTAINERD_NAME, REF_NAME):
        name = annotations.get(key)
        if not name:
            continue
        if "/" in name or ":" in name:
            with contextlib.suppress(LayerfsError):
                return [Reference.parse(name)]
        if repository is not None:  # a bare tag, as skopeo's oci:DIR:TAG writes it
            return [Reference.parse(f"{repository}:{name}")]
    return [Reference.parse(repository)] if repository else []


def _load_oci(store: Store, source: _Source, repository: str | None) -> list[Loaded]:
    index = Index.parse(source.read("index.json"), what=f"{source.path}: index.json")
    loaded = []
    for descriptor in index.manifests:
        refs = _names_for(descriptor.annotations, repository)
        manifest_descriptor = _pick_platform(store, source, descriptor)
        image = _load_oci_manifest(store, source, manifest_descriptor, refs)
        loaded.append(Loaded(image, [str(r) for r in refs]))
    return loaded


def _pick_platform(store: Store, source: _Source, descriptor: Descriptor) -> Descriptor:
    if descriptor.media_type not in mediatypes.INDEXES:
        return descriptor
    raw = source.read(_blob_name(descriptor.digest))
    if digest_bytes(raw) != descriptor.digest:
        raise StoreError(f"{source.path}: index {descriptor.digest} does not match its digest")
    nested = Index.parse(raw, what=descriptor.digest)
    arch = host_architecture()
    for candidate in nested.manifests:
        platform = candidate.platform or {}
        if platform.get("os", "linux") == "linux" and platform.get("architecture") == arch:
            return candidate
    raise StoreError(f"{source.path}: no image for linux/{arch} in index {descriptor.digest}")


def _load_oci_manifest(store: Store, source: _Source, descriptor: Descriptor,
                       refs: list[Reference]) -> Image:
    raw = source.read(_blob_name(descriptor.digest))
    if digest_bytes(raw) != descriptor.digest:
        raise StoreError(f"{source.path}: manifest {descriptor.digest} does not match its digest")
    manifest = Manifest.parse(raw, descriptor.media_type, what=descriptor.digest)
    _copy_blob(store, source, manifest.config)
    config = ImageConfig.parse(store.blobs.read(manifest.config.digest),
                               what=manifest.config.digest)
    if len(config.diff_ids) != len(manifest.layers):
        raise StoreError(f"{manifest.config.digest}: {len(config.diff_ids)} diff_ids for "
                         f"{len(manifest.layers)} layers")
    for layer, diff_id in zip(manifest.layers, config.diff_ids, strict=True):
        if not store.has_layer(diff_id):
            _copy_blob(store, source, layer)
            unpack_blob(store, layer.digest, diff_id)
        elif not store.blobs.has(layer.digest):
            _copy_blob(store, source, layer)
    return store.add_image(raw, refs, descriptor.digest)


def _load_docker(store: Store, source: _Source) -> list[Loaded]:
    try:
        entries = json.loads(source.read("manifest.json"))
        if not isinstance(entries, list):
            raise ValueError("not a list")
    except ValueError as exc:
        raise StoreError(f"{source.path}: manifest.json is not valid: {exc}") from None
    loaded = []
    for entry in entries:
        if not isinstance(entry, dict) or "Config" not in entry or "Layers" not in entry:
            raise StoreError(f"{source.path}: manifest.json entry without Config or Layers")
        config_raw = source.read(str(entry["Config"]))
        config = ImageConfig.parse(config_raw, what=f"{source.path}: {entry['Config']}")
        layer_names = [str(n) for n in entry["Layers"]]
        if len(layer_names) != len(config.diff_ids):
            raise StoreError(f"{source.path}: {len(layer_names)} layers for "
                             f"{len(config.diff_ids)} diff_ids")
        descriptors = []
        for name, diff_id in zip(layer_names, config.diff_ids, strict=True):
            descriptors.append(_docker_layer(store, source, name, diff_id))
        config_digest = store.blobs.put_bytes(config_raw)
        manifest = {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_MANIFEST,
            "config": Descriptor(mediatypes.OCI_CONFIG, config_digest, len(config_raw)).to_json(),
            "layers": [d.to_json() for d in descriptors],
        }
        refs = [Reference.parse(t) for t in entry.get("RepoTags") or []]
        image = store.add_image(canonical_json(manifest), refs)
        loaded.append(Loaded(image, [str(r) for r in refs]))
    return loaded


def _docker_layer(store: Store, source: _Source, name: str, diff_id: DiffID) -> Descriptor:
    """A docker-archive layer into the store. Reuses a blob we already have for it."""
    if name.startswith("blobs/sha256/"):  # docker 25+: the blob is named by its digest
        digest = parse_digest("sha256:" + name.rsplit("/", 1)[1])
        if store.blobs.has(digest) and store.has_layer(diff_id):
            return Descriptor(mediatypes.OCI_LAYER_GZIP, digest, store.blobs.size(digest))
    with source.open(name) as stream:
        layer = add_tar_stream(store, stream, f"{source.path}:{name}")
    if layer.diff_id != diff_id:
        raise StoreError(f"{source.path}: {name}: diff_id {layer.diff_id} is not the "
                         f"config's {diff_id}")
    return Descriptor(layer.media_type, layer.blob, layer.blob_size)


def save(store: Store, images: list[tuple[Image, list[str]]], out: IO[bytes]) -> None:
    """Write `images` (with the names to record) as one docker + OCI archive to `out`."""
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        written: set[Digest] = set()
        index_entries: list[dict[str, Any]] = []
        docker_entries: list[dict[str, Any]] = []
        for image, names in images:
            for digest in (image.manifest_digest, image.manifest.config.digest,
                           *(layer.digest for layer in image.manifest.layers)):
                if digest not in written:
                    _add_blob(tar, store, digest)
                    written.add(digest)
            base = Descriptor(image.manifest.media_type, image.manifest_digest,
                              len(image.manifest.raw)).to_json()
            for name in names or [""]:
                entry = dict(base)
                if name:
                    entry["annotations"] = {CONTAINERD_NAME: name,
                                            REF_NAME: name.rsplit(":", 1)[1]}
                index_entries.append(entry)
            docker_entries.append({
                "Config": _blob_name(image.manifest.config.digest),
                "RepoTags": names,
                "Layers": [_blob_name(layer.digest) for layer in image.manifest.layers],
            })
        index = {"schemaVersion": 2, "mediaType": mediatypes.OCI_INDEX,
                 "manifests": index_entries}
        _add_bytes(tar, "index.json", json.dumps(index).encode())
        _add_bytes(tar, "manifest.json", json.dumps(docker_entries).encode())


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _add_blob(tar: tarfile.TarFile, store: Store, digest: Digest) -> None:
    info = tarfile.TarInfo(_blob_name(digest))
    info.size = os.stat(store.blobs.path(digest)).st_size
    info.mode = 0o644
    with store.blobs.open(digest) as f:
        tar.addfile(info, f)
