"""The owner of every path in the store. Nobody else joins a store path.

    ROOT/
      lock                    flock: held for each mutation of state.json, layers and blobs
      state.json              refs (name:tag -> manifest digest) and images (id -> manifest)
      blobs/sha256/HEX        content-addressed: layer tars, configs, manifests
      layers/HEX/diff/        a layer unpacked once per diff_id, overlay on-disk format
      layers/HEX/meta.json    its size and entry count
      containers/ID/          upper/ work/ state.json: one copy-on-write layer per container
      tmp/PID-*/              staging, same filesystem; a dead process's staging is removed

The root is `/var/lib/layerfs` for root, `$XDG_DATA_HOME/layerfs` otherwise; `--root` and
`LAYERFS_ROOT` override.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from layerfs.digest import Digest, encoded
from layerfs.errors import StoreError


def default_root() -> Path:
    env = os.environ.get("LAYERFS_ROOT")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/layerfs")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "layerfs"


class Layout:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    def blob(self, digest: Digest) -> Path:
        return self.blobs / encoded(digest)

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    def layer(self, diff_id: Digest) -> Path:
        return self.layers / encoded(diff_id)

    def layer_diff(self, diff_id: Digest) -> Path:
        return self.layer(diff_id) / "diff"

    def layer_meta(self, diff_id: Digest) -> Path:
        return self.layer(diff_id) / "meta.json"

    @property
    def containers(self) -> Path:
        return self.root / "containers"

    def container(self, container_id: str) -> Path:
        return self.containers / container_id

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def create(self) -> None:
        """Make the store's directories where missing. Not root: the store is the user's
        alone (0700, as podman's), and one that belongs to someone else is refused before
        anything is written (StoreError)."""
        if os.geteuid() != 0:
            self.root.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.root.mkdir(mode=0o700)
            owner = self.root.stat().st_uid
            if owner != os.geteuid():
                raise StoreError(f"{self.root}: the store belongs to uid {owner}, not to this "
                                 "user (name another with --root or LAYERFS_ROOT)")
        for path in (self.blobs, self.layers, self.containers, self.tmp):
            path.mkdir(parents=True, exist_ok=True)
