"""The image store: blobs, unpacked layers shared by every image that has them, refs, images.

Every mutation of the index or of the set of layers happens under the store's file lock and is
an atomic rename of something complete; the long parts (unpacking, hashing, downloading) run
before the lock is taken, in this process's staging dir. A process killed at any point leaves
the old state or the new one, plus staging that the next process removes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs.digest import DiffID, Digest, is_digest
from layerfs.errors import NotFoundError, ReferenceError_, StoreError
from layerfs.oci.model import ImageConfig, Manifest
from layerfs.reference import Reference
from layerfs.store import atomic
from layerfs.store.blobs import Blobs
from layerfs.store.layout import Layout
from layerfs.store.lock import locked
from layerfs.store.state import ImageEntry, State

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@dataclass(frozen=True, slots=True)
class Image:
    id: Digest
    manifest_digest: Digest
    manifest: Manifest
    config: ImageConfig
    refs: tuple[str, ...]
    added: str
    repo_digest: Digest
    """The digest a registry knows the image by: its index's, if it came from one."""

    @property
    def diff_ids(self) -> tuple[DiffID, ...]:
        return self.config.diff_ids

    @property
    def short_id(self) -> str:
        return self.id.removeprefix("sha256:")[:12]


@dataclass(frozen=True, slots=True)
class LayerInfo:
    diff_id: DiffID
    size: int
    entries: int


def ref_key(ref: Reference) -> str:
    """How a tag reference is keyed in the index: full name and tag, no digest."""
    return f"{ref.name}:{ref.tag or 'latest'}"


def now() -> str:
    """RFC 3339 in UTC with microseconds: two commits in one second are two images."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Store:
    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)
        try:
            self.layout.create()
        except OSError as exc:
            raise StoreError(f"{root}: cannot create the store: {exc.strerror}") from None
        self.blobs = Blobs(self.layout)
        self.added_layers: list[DiffID] = []
        """The layers this process installed, in order (see `Blobs.added`)."""
        atomic.clean_dead_staging(self.layout.tmp)

    @property
    def root(self) -> Path:
        return self.layout.root

    # -------------------------------------------------------------- index
    @contextlib.contextmanager
    def transaction(self) -> Iterator[State]:
        """The index, locked; saved atomically when the block ends without an error."""
        with locked(self.layout.lock):
            state = State.load(self.layout.state)
            yield state
            state.save(self.layout.state)

    def state(self) -> State:
        return State.load(self.layout.state)

    # -------------------------------------------------------------- layers
    def has_layer(self, diff_id: Digest) -> bool:
        return self.layout.layer_diff(diff_id).is_dir()

    def layer_dir(self, diff_id: Digest) -> Path:
        path = self.layout.layer_diff(diff_id)
        if not path.is_dir():
            raise NotFoundError(f"{diff_id}: layer not in the store")
        return path

    def layer_info(self, diff_id: DiffID) -> LayerInfo:
        try:
            meta = json.loads(self.layout.layer_meta(diff_id).read_bytes())
            return LayerInfo(diff_id, int(meta["size"]), int(meta["entries"]))
        except (OSError, ValueError, KeyError):
            return LayerInfo(diff_id, 0, 0)

    def layers(self) -> list[DiffID]:
        return [DiffID(Digest("sha256:" + p.name)) for p in self.layout.layers.iterdir()
                if (p / "diff").is_dir()]

    @contextlib.contextmanager
    def staged_layer(self) -> Iterator[Path]:
        """A staging dir whose `diff/` the caller fills; `install_layer` takes it over."""
        with atomic.staging_dir(self.layout.tmp) as stage:
            (stage / "diff").mkdir()
            yield stage

    def install_layer(self, stage: Path, diff_id: DiffID, size: int, entries: int) -> None:
        """Make a fully unpacked layer visible under its diff_id (atomic; kept if present)."""
        (stage / "meta.json").write_text(json.dumps({"size": size, "entries": entries}))
        atomic.syncfs(stage)  # the layer's files are on disk before its name is
        target = self.layout.layer(diff_id)
        with locked(self.layout.lock):
            if (target / "diff").is_dir():
                return
            if target.exists():  # a damaged leftover without diff/: replace it
                atomic.remove_tree(target)
            os.rename(stage, target)
            self.added_layers.append(diff_id)
            atomic.fsync_dir(target.parent)

    @property
    def empty_dir(self) -> Path:
        """An empty directory: the only lower layer of an image without layers (scratch)."""
        path = self.layout.layers / "empty"
        try:
            path.mkdir()
            path.chmod(0o755)  # the root of scratch containers: not the first caller's umask
        except FileExistsError:
            pass
        return path

    # -------------------------------------------------------------- images
    def add_image(self, manifest_raw: bytes, refs: list[Reference],
                  manifest_digest: Digest | None = None,
                  index_digest: Digest | None = None) -> Image:
        """Record an image whose config and layers are in the store; point `refs` at it.

        `index_digest`: the multi-platform index it was chosen from, a name for it as well.
        """
        manifest = Manifest.parse(manifest_raw)
        config = ImageConfig.parse(self.blobs.read(manifest.config.digest),
                                   what=f"config {manifest.config.digest}")
        if len(config.diff_ids) != len(manifest.layers):
            raise StoreError(
                f"{manifest.config.digest}: config lists {len(config.diff_ids)} layers, "
                f"the manifest {len(manifest.layers)}"
            )
        for diff_id in config.diff_ids:
            self.layer_dir(diff_id)
        digest = self.blobs.put_bytes(manifest_raw, manifest_digest)
        image_id = manifest.config.digest
        with self.transaction() as state:
            entry = state.images.get(image_id)
            if entry is None:
                state.images[image_id] = ImageEntry(digest, now())
            elif entry.manifest != digest:
                # the same image through another manifest: the first one stays the image's,
                # the new digest becomes another name for it, so no ref loses its image
                state.aliases[digest] = entry.manifest
                digest = entry.manifest
            for ref in refs:
                state.refs[ref_key(ref)] = digest
            if index_digest is not None:
                state.indexes[index_digest] = digest
        return self.image(image_id)

    def image(self, image_id: Digest, state: State | None = None) -> Image:
        state = state or self.state()
        entry = state.images.get(image_id)
        if entry is None:
            raise NotFoundError(f"{image_id}: no such image")
        manifest = Manifest.parse(self.blobs.read(entry.manifest), what=entry.manifest)
        config = ImageConfig.parse(self.blobs.read(manifest.config.digest),
                                   what=manifest.config.digest)
        refs = tuple(sorted(r for r, d in state.refs.items()
                            if state.image_of_manifest(d) == image_id))
        repo_digest = next((i for i, m in state.indexes.items() if m == entry.manifest),
                           entry.manifest)
        return Image(image_id, entry.manifest, manifest, config, refs, entry.added, repo_digest)

    def images(self) -> list[Image]:
        state = self.state()
        return [self.image(image_id, state) for image_id in state.images]

    def resolve(self, text: str) -> Image:
        """An image by reference (`busybox`, `name:tag`, `name@sha256:...`) or by id (prefix)."""
        state = self.state()
        image_id = self._find(text, state)
        if image_id is None:
            raise NotFoundError(f"{text}: no such image in the store")
        return self.image(image_id, state)

    def _find(self, text: str, state: State) -> Digest | None:
        if is_digest(text) and Digest(text) in state.images:
            return Digest(text)
        hex_prefix = text.removeprefix("sha256:")
        if len(hex_prefix) >= 4 and all(c in "0123456789abcdef" for c in hex_prefix):
            matches = [i for i in state.images if i.removeprefix("sha256:").startswith(hex_prefix)]
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ReferenceError_(f"{text}: ambiguous image id prefix")
        try:
            ref = Reference.parse(text)
        except ReferenceError_:
            if len(hex_prefix) >= 4 and all(c in "0123456789abcdef" for c in hex_prefix):
                return None
            raise
        if ref.digest is not None:
            image_id = state.image_of_manifest(ref.digest)
            if image_id is None and ref.digest in state.images:
                image_id = ref.digest
            return image_id
        manifest = state.refs.get(ref_key(ref))
        return state.image_of_manifest(manifest) if manifest is not None else None

    def tag(self, image: Image, ref: Reference) -> None:
        with self.transaction() as state:
            state.refs[ref_key(ref)] = image.manifest_digest

    def lower_dirs(self, image: Image) -> list[Path]:
        """The image's unpacked layers as overlay lower dirs, top layer first."""
        dirs = [self.layer_dir(d) for d in reversed(image.diff_ids)]
        return dirs or [self.empty_dir]
