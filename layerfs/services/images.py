"""The image verbs over the store: find, tag, remove, history, disk usage, garbage collection.

No printing: the CLI renders what these return.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs.errors import LayerfsError, StoreError, UsageError
from layerfs.reference import Reference
from layerfs.services import containers as containers_service
from layerfs.store import atomic
from layerfs.store.lock import locked
from layerfs.store.state import State
from layerfs.store.store import ref_key

if TYPE_CHECKING:
    from collections.abc import Iterator

    from layerfs.digest import DiffID, Digest
    from layerfs.store.store import Image, Store


SCRATCH = "scratch"


def resolve(store: Store, text: str) -> Image:
    """An image by reference or id; `scratch` is the empty image, made on first use."""
    if text == SCRATCH:
        from layerfs.services.importing import scratch  # the import machinery, on demand

        return scratch(store)
    return store.resolve(text)


def tag(store: Store, source: str, target: str) -> Reference:
    image = resolve(store, source)
    ref = Reference.parse(target)
    if ref.digest is not None:
        raise UsageError(f"{target}: a tag cannot name a digest")
    store.tag(image, ref)
    return ref


def image_size(store: Store, image: Image) -> int:
    return sum(store.layer_info(d).size for d in image.diff_ids)


@dataclass(frozen=True, slots=True)
class Removed:
    untagged: list[str]
    deleted: list[Digest]


def remove(store: Store, texts: list[str], *, force: bool = False) -> Removed:
    """`rmi`: untag, and delete images that nothing names or uses any more; then collect."""
    untagged: list[str] = []
    deleted: list[Digest] = []
    used = {c.image for c in containers_service.list_containers(store)}
    with locked(store.layout.lock):
        state = State.load(store.layout.state)
        for text in texts:
            image = store.resolve(text)
            refs = [r for r in state.refs if state.image_of_manifest(state.refs[r]) == image.id]
            by_ref = _ref_named(text, refs)
            if by_ref is not None:
                targets = [by_ref]
            elif len(refs) > 1 and not force:
                raise StoreError(f"{text}: image is referenced in {len(refs)} repositories "
                                 "(remove them by name, or use -f)")
            else:
                targets = refs
            in_use = image.id in used
            remaining = [r for r in refs if r not in targets]
            if in_use and not force and not remaining:
                raise StoreError(f"{text}: image is used by a container (remove it first, "
                                 "or use -f)")
            for ref in targets:
                del state.refs[ref]
                untagged.append(ref)
            if not remaining and not in_use:
                del state.images[image.id]
                deleted.append(image.id)
        state.save(store.layout.state)
    collect_garbage(store)
    return Removed(untagged, deleted)


def _ref_named(text: str, refs: list[str]) -> str | None:
    try:
        ref = Reference.parse(text)
    except LayerfsError:
        return None
    if ref.digest is not None:
        return None
    key = ref_key(ref)
    return key if key in refs else None


def referenced(store: Store, state: State) -> tuple[set[Digest], set[Digest]]:
    """Blobs and layers that an image in the index or a container's image needs."""
    blobs: set[Digest] = set()
    layers: set[Digest] = set()
    for image_id in state.images:
        image = store.image(image_id, state)
        blobs |= {image.manifest_digest, image.manifest.config.digest}
        blobs |= {layer.digest for layer in image.manifest.layers}
        layers |= set(image.diff_ids)
    return blobs, layers


@contextlib.contextmanager
def all_or_nothing(store: Store) -> Iterator[None]:
    """What the block adds to the store (blobs, layers) stays only if the block ends without
    an error: a pull, import, load or commit that fails half-way, say on a full disk, takes
    back what it brought, unless an image (of another process, by now) uses it. The index is
    not touched here: its one atomic write is the last step of each of them."""
    blobs, layers = len(store.blobs.added), len(store.added_layers)
    try:
        yield
    except BaseException:
        undo(store, [*store.blobs.added[blobs:], *store.added_layers[layers:]])
        raise


def undo(store: Store, added: list[Digest]) -> None:
    """Remove the blobs and layers in `added` that no image uses. Best effort, and never
    with an error of its own: the caller is already failing with the one that matters, and
    what is left is garbage that `system prune` removes."""
    if not added:
        return
    with contextlib.suppress(OSError, LayerfsError), locked(store.layout.lock):
        blobs, layers = referenced(store, State.load(store.layout.state))
        for digest in added:
            if digest not in blobs:
                store.blobs.delete(digest)
            if digest not in layers and store.has_layer(digest):
                atomic.remove_tree(store.layout.layer(digest))


def collect_garbage(store: Store) -> tuple[int, int]:
    """Delete blobs and layers that nothing references; (blobs, layers) removed."""
    with locked(store.layout.lock):
        state = State.load(store.layout.state)
        blobs, layers = referenced(store, state)
        removed_blobs = removed_layers = 0
        for digest in store.blobs.all():
            if digest not in blobs:
                store.blobs.delete(digest)
                removed_blobs += 1
        for diff_id in store.layers():
            if diff_id not in layers:
                atomic.remove_tree(store.layout.layer(diff_id))
                removed_layers += 1
    return removed_blobs, removed_layers


def prune(store: Store, *, all_unused: bool = False) -> tuple[list[Digest], int, int]:
    """Remove dangling images (or all unused ones), then unreferenced blobs and layers."""
    used = {c.image for c in containers_service.list_containers(store)}
    removed: list[Digest] = []
    with store.transaction() as state:
        named = {state.image_of_manifest(d) for d in state.refs.values()}
        for image_id in list(state.images):
            if image_id in used or (image_id in named and not all_unused):
                continue
            del state.images[image_id]
            removed.append(image_id)
    blobs, layers = collect_garbage(store)
    return removed, blobs, layers


@dataclass(frozen=True, slots=True)
class HistoryRow:
    image: str
    created: str | None
    created_by: str
    size: int
    comment: str


def history(store: Store, image: Image) -> list[HistoryRow]:
    """docker history: newest first; a non-empty step takes the next layer's size."""
    diff_ids: list[DiffID] = list(image.diff_ids)
    rows: list[HistoryRow] = []
    layer_index = 0
    entries = image.config.history
    if not entries:  # images without history: one row per layer
        return [HistoryRow("<missing>", image.config.created, "", store.layer_info(d).size, "")
                for d in reversed(diff_ids)]
    for entry in entries:
        size = 0
        if not entry.empty_layer and layer_index < len(diff_ids):
            size = store.layer_info(diff_ids[layer_index]).size
            layer_index += 1
        rows.append(HistoryRow("<missing>", entry.created, entry.created_by, size,
                               entry.comment))
    rows.reverse()
    if rows:
        rows[0] = HistoryRow(image.short_id, rows[0].created, rows[0].created_by, rows[0].size,
                             rows[0].comment)
    return rows


@dataclass(frozen=True, slots=True)
class DiskUsage:
    images: int
    images_size: int
    layers: int
    layers_size: int
    shared_size: int
    """Bytes that images would hold twice or more without sharing."""
    containers: int
    containers_size: int
    blobs: int
    blobs_size: int


def disk_usage(store: Store) -> DiskUsage:
    images = store.images()
    layer_ids = store.layers()
    layer_sizes = {d: store.layer_info(d).size for d in layer_ids}
    counted = sum(layer_sizes.get(d, 0) for image in images for d in set(image.diff_ids))
    unique = sum(layer_sizes.values())
    containers = containers_service.list_containers(store)
    blob_digests = store.blobs.all()
    return DiskUsage(
        images=len(images),
        images_size=counted,
        layers=len(layer_ids),
        layers_size=unique,
        shared_size=max(0, counted - unique),
        containers=len(containers),
        containers_size=sum(containers_service.size_of_upper(store, c) for c in containers),
        blobs=len(blob_digests),
        blobs_size=sum(store.blobs.size(d) for d in blob_digests),
    )


@dataclass(frozen=True, slots=True)
class TreeLayer:
    diff_id: DiffID
    size: int
    shared_with: list[str]


def tree(store: Store, texts: list[str]) -> list[tuple[Image, list[TreeLayer]]]:
    """Each image's layers (bottom first), with the other images that share each one."""
    all_images = store.images()
    chosen = [resolve(store, t) for t in texts] if texts else all_images
    users: dict[DiffID, list[Image]] = {}
    for image in all_images:
        for diff_id in image.diff_ids:
            users.setdefault(diff_id, []).append(image)
    out = []
    for image in chosen:
        layers = [
            TreeLayer(d, store.layer_info(d).size,
                      [_label(other) for other in users.get(d, []) if other.id != image.id])
            for d in image.diff_ids
        ]
        out.append((image, layers))
    return out


def _label(image: Image) -> str:
    if image.refs:
        return Reference.parse(image.refs[0]).familiar() + ":" + image.refs[0].rsplit(":", 1)[1]
    return image.short_id

