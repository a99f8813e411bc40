"""`commit`: a container's upper layer becomes one new layer and a new image on its image.

The upper is walked in layer order (`overlay.changes`), written as a deterministic tar
(`tarlayer.write`) by a thread into a pipe, and the other end of the pipe goes through the
same one-pass path as an import: diff_id, compressed blob and unpacked layer together. Then a
new config (the old one, the new diff_id, a history entry, author, the `-c` changes) and a
manifest (the old layers plus the new one) are stored and tagged. A commit that fails (a full
disk) leaves the store as it was (`images.all_or_nothing`); the container is not touched.

A mounted container is flushed with syncfs first, so that what its processes wrote is in the
upper; the walk reads the upper as it is then.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import threading
from typing import TYPE_CHECKING, Any

from layerfs.compression import Compression
from layerfs.oci.model import Descriptor
from layerfs.overlay.changes import walk_changes
from layerfs.services import containers as containers_service
from layerfs.services.changes import apply_changes
from layerfs.services.images import all_or_nothing
from layerfs.services.importing import store_image
from layerfs.services.layers import NewLayer, add_tar_stream
from layerfs.store.store import now
from layerfs.tarlayer.write import LayerEntry, write_layer

if TYPE_CHECKING:
    from layerfs.reference import Reference
    from layerfs.services.containers import Container
    from layerfs.store.store import Image, Store


def _entries(lowers: list[bytes], upper: bytes) -> list[LayerEntry]:
    return [LayerEntry(c.path, c.real, c.opaque, c.data) for c in walk_changes(lowers, upper)]


def commit(
    store: Store, container: Container, refs: list[Reference], *,
    message: str | None = None, author: str | None = None, changes: list[str] | None = None,
    compression: Compression = Compression.GZIP, created_by: str | None = None,
) -> Image:
    """`created_by`: the history entry's (a build gives the instruction); by default it names
    the container."""
    base = store.image(container.image)  # type: ignore[arg-type]
    config: dict[str, Any] = copy.deepcopy(base.config.doc)
    container_config = config.setdefault("config", {})
    apply_changes(container_config, changes or [])  # a bad change fails before any work
    upper = os.fsencode(containers_service.upper_dir(store, container))
    lowers = [os.fsencode(p) for p in store.lower_dirs(base)]
    with all_or_nothing(store):
        with containers_service.frozen(store, container):
            entries = _entries(lowers, upper)
            layer = _write_and_add(store, entries, f"commit of {container.name}", compression)
        _add_layer(config, base, layer, created_by or f"layerfs commit {container.name}",
                   author, message)
        descriptors = [*base.manifest.layers,
                       Descriptor(layer.media_type, layer.blob, layer.blob_size)]
        return store_image(store, config, descriptors, refs)


def _add_layer(config: dict[str, Any], base: Image, layer: NewLayer, created_by: str,
               author: str | None, message: str | None) -> None:
    """The base image's config, edited in place into the new image's: one more layer."""
    created = now()
    config["created"] = created
    if author:
        config["author"] = author
    config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    config["rootfs"]["diff_ids"] = [*base.diff_ids, layer.diff_id]
    entry: dict[str, Any] = {"created": created, "created_by": created_by}
    if author:
        entry["author"] = author
    if message:
        entry["comment"] = message
    config["history"] = [*config.get("history", []), entry]


def _write_and_add(store: Store, entries: list[LayerEntry], name: str,
                   compression: Compression) -> NewLayer:
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_fd, "wb", buffering=1 << 20) as out:
                write_layer(entries, out, None if os.geteuid() == 0 else
                            (os.geteuid(), os.getegid()))
        except BaseException as exc:  # handed to the consumer's thread
            failure.append(exc)

    writer = threading.Thread(target=produce, name="layer-tar", daemon=True)
    writer.start()
    try:
        with io.BufferedReader(io.FileIO(read_fd, "r"), 1 << 20) as source:
            try:
                layer = add_tar_stream(store, source, name, compression)
            finally:
                with contextlib.suppress(OSError):
                    source.read()  # unblock the writer if the reader stopped early
    finally:
        writer.join()
    if failure:
        raise failure[0]
    return layer
