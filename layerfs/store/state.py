"""The store's index: refs (name:tag → manifest digest) and images (id → manifest digest).

One JSON file, replaced atomically under the store lock. An image id is the digest of the
image's config, as docker's; a ref names a manifest, which names the config and the layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from layerfs.digest import Digest, parse_digest
from layerfs.errors import StoreError
from layerfs.store import atomic

if TYPE_CHECKING:
    from pathlib import Path


@dataclass
class ImageEntry:
    manifest: Digest
    added: str


@dataclass
class State:
    refs: dict[str, Digest] = field(default_factory=dict)
    """Full reference (docker.io/library/busybox:latest) → manifest digest."""
    images: dict[Digest, ImageEntry] = field(default_factory=dict)
    """Image id (config digest) → its manifest and when it came into the store."""
    indexes: dict[Digest, Digest] = field(default_factory=dict)
    """Digest of an index (a multi-platform image) pulled → the manifest chosen from it."""
    aliases: dict[Digest, Digest] = field(default_factory=dict)
    """Another manifest of an image already stored (say, the same image loaded from a docker
    archive) → the image's own manifest."""
    build_cache: dict[str, Digest] = field(default_factory=dict)
    """A build step (the digest of its parent image, instruction and inputs) → the image it
    made. An entry whose image is gone is a miss."""

    @classmethod
    def load(cls, path: Path) -> State:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return cls()
        try:
            doc: dict[str, Any] = json.loads(raw)
            return cls(
                refs={k: parse_digest(v) for k, v in doc.get("refs", {}).items()},
                images={
                    parse_digest(k): ImageEntry(parse_digest(v["manifest"]), str(v["added"]))
                    for k, v in doc.get("images", {}).items()
                },
                indexes={parse_digest(k): parse_digest(v)
                         for k, v in doc.get("indexes", {}).items()},
                aliases={parse_digest(k): parse_digest(v)
                         for k, v in doc.get("aliases", {}).items()},
                build_cache={str(k): parse_digest(v)
                             for k, v in doc.get("build_cache", {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(f"{path}: store index is damaged: {exc}") from None

    def save(self, path: Path) -> None:
        doc = {
            "refs": dict(sorted(self.refs.items())),
            "images": {
                k: {"manifest": v.manifest, "added": v.added}
                for k, v in sorted(self.images.items())
            },
            "indexes": dict(sorted(self.indexes.items())),
            "aliases": dict(sorted(self.aliases.items())),
            "build_cache": {k: v for k, v in sorted(self.build_cache.items())
                            if v in self.images},
        }
        atomic.write_file(path, json.dumps(doc, indent=1).encode() + b"\n")

    def image_of_manifest(self, manifest: Digest) -> Digest | None:
        """The image a manifest digest (or the digest of an index it came from) names."""
        manifest = self.indexes.get(manifest, manifest)
        manifest = self.aliases.get(manifest, manifest)
        for image_id, entry in self.images.items():
            if entry.manifest == manifest:
                return image_id
        return None
