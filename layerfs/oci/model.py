"""Manifests, indexes and image configs parsed from the exact bytes received.

A document is kept as the bytes it came in (they are what its digest names, see STYLE rule 11)
next to a parsed view; nothing here re-serializes a document that has a digest. Parsing checks
the shape and raises `StoreError` naming the document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, cast

from layerfs.digest import DiffID, Digest, parse_digest
from layerfs.errors import StoreError
from layerfs.oci import mediatypes


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: dict[str, str] | None = None
    annotations: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        return out


def _load(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise StoreError(f"{what}: not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{what}: not a JSON object")
    return cast("dict[str, Any]", doc)


def _descriptor(obj: Any, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise StoreError(f"{what}: descriptor is not an object")
    try:
        size = obj["size"]
        if not isinstance(size, int) or size < 0:
            raise StoreError(f"{what}: descriptor size {size!r} is not a size")
        return Descriptor(
            media_type=str(obj.get("mediaType", "")),
            digest=parse_digest(str(obj["digest"])),
            size=size,
            platform=obj.get("platform"),
            annotations=obj.get("annotations"),
        )
    except KeyError as exc:
        raise StoreError(f"{what}: descriptor without {exc.args[0]}") from None


@dataclass(frozen=True, slots=True)
class Manifest:
    raw: bytes
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, raw: bytes, media_type: str | None = None, what: str = "manifest") -> Manifest:
        doc = _load(raw, what)
        media_type = doc.get("mediaType") or media_type or mediatypes.OCI_MANIFEST
        if media_type not in mediatypes.MANIFESTS:
            raise StoreError(f"{what}: unsupported manifest media type {media_type!r}")
        if doc.get("schemaVersion") != 2:
            raise StoreError(f"{what}: schemaVersion {doc.get('schemaVersion')!r} is not 2")
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise StoreError(f"{what}: no layers list")
        return cls(raw, media_type, _descriptor(doc.get("config"), what),
                   tuple(_descriptor(layer, what) for layer in layers))


@dataclass(frozen=True, slots=True)
class Index:
    raw: bytes
    media_type: str
    manifests: tuple[Descriptor, ...]

    @classmethod
    def parse(cls, raw: bytes, media_type: str | None = None, what: str = "index") -> Index:
        doc = _load(raw, what)
        media_type = doc.get("mediaType") or media_type or mediatypes.OCI_INDEX
        manifests = doc.get("manifests")
        if not isinstance(manifests, list):
            raise StoreError(f"{what}: no manifests list")
        return cls(raw, media_type, tuple(_descriptor(m, what) for m in manifests))


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    created: str | None
    created_by: str
    comment: str
    author: str
    empty_layer: bool


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The parts of an image config that layerfs reads; `doc` keeps the rest."""

    raw: bytes
    doc: dict[str, Any]
    diff_ids: tuple[DiffID, ...]
    history: tuple[HistoryEntry, ...] = field(default=())

    @classmethod
    def parse(cls, raw: bytes, what: str = "config") -> ImageConfig:
        doc = _load(raw, what)
        rootfs = doc.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise StoreError(f"{what}: no rootfs.diff_ids")
        diff_ids = tuple(DiffID(parse_digest(str(d))) for d in rootfs["diff_ids"])
        history = tuple(
            HistoryEntry(
                created=h.get("created"),
                created_by=str(h.get("created_by", "")),
                comment=str(h.get("comment", "")),
                author=str(h.get("author", "")),
                empty_layer=bool(h.get("empty_layer", False)),
            )
            for h in doc.get("history") or []
            if isinstance(h, dict)
        )
        return cls(raw, doc, diff_ids, history)

    @property
    def created(self) -> str | None:
        value = self.doc.get("created")
        return value if isinstance(value, str) else None

    @property
    def container_config(self) -> dict[str, Any]:
        value = self.doc.get("config")
        return value if isinstance(value, dict) else {}

    @property
    def platform(self) -> str:
        return f"{self.doc.get('os', 'linux')}/{self.doc.get('architecture', 'amd64')}"


def canonical_json(doc: dict[str, Any]) -> bytes:
    """How layerfs serializes a document it creates, once, before hashing it."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
