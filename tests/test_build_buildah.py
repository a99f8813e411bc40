"""`layerfs build` next to buildah (`bud --isolation chroot --storage-driver vfs`) on the
twelve Dockerfiles of `benchmarks.build_corpus` over busybox, Alpine and Debian: the final
trees (types, modes, owners, sizes, link targets, contents, xattrs) and the config fields
must be equal.

buildah writes docker's image format (`--format docker`), in which it honours SHELL as docker
does, and never pulls (`--pull-never`): busybox comes to both tools from the official OCI
layout; Alpine and Debian are imported by layerfs from their rootfs tarballs and reach
buildah through `layerfs save`, so both start from the same bytes and config.

What buildah adds for its own runtime is left out of the comparison, each with its reason in
BUILDAH_RUNTIME; files that record the time they were written, or whose new content buildah
misses, are compared but for their contents (STAMPED). Two known differences are kept out of
the Dockerfiles, and layerfs follows docker in both: buildah makes a WORKDIR's directory only
if a RUN follows (docker always makes it), and makes VOLUME mountpoints in the image when a
RUN follows (buildkit never does).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

import pytest

from benchmarks.build_corpus import ALPINE, BASE_CHANGES, BUSYBOX, CASES, write_context
from tests.containertools import ContainerStore
from tests.imagetools import IMAGES, debian_tarball

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


LAYOUT = IMAGES / "busybox-1.38.0-musl-amd64-oci"
ALPINE_TARBALL = IMAGES / "alpine-minirootfs-3.20.3-x86_64.tar.gz"
BUILDAH_RUNTIME = {
    "etc/hostname", "etc/hosts", "etc/resolv.conf",  # files buildah binds into each RUN
    "run",  # buildah's runtime dir (/run/.containerenv)
    "proc", "sys",  # mountpoints layerfs makes for a RUN and removes after it
}
STAMPED = {
    "var/log/dpkg.log",  # a line per action, with its time
    # groupadd backs /etc/group up to group- with the old file's size and mtime, which are
    # the base's group-'s too: buildah's vfs layer diff compares only size and mtime and
    # keeps the base's content (a chroot on a plain directory gets what layerfs gets)
    "etc/group-",
}
CONFIG_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts",
                 "Volumes", "StopSignal")
BY_NAME = {case.name: case for case in CASES}

pytestmark = pytest.mark.skipif(
    shutil.which("buildah") is None or not LAYOUT.is_dir() or not ALPINE_TARBALL.is_file(),
    reason="buildah, the busybox OCI layout or the Alpine minirootfs is missing")


class Buildah:
    def __init__(self, root: Path) -> None:
        self.base = ["buildah", "--root", str(root / "storage"), "--runroot",
                     str(root / "run"), "--storage-driver", "vfs"]

    def __call__(self, *args: str) -> str:
        result = subprocess.run([*self.base, *args], capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"buildah {' '.join(args)}: {result.stderr}"
        return result.stdout

    def config(self, image: str) -> dict[str, Any]:
        doc = json.loads(self("inspect", "--type", "image", image))
        return dict(doc["OCIv1"]["config"])

    def tree(self, image: str) -> dict[str, tuple[object, ...]]:
        container = self("from", "--pull-never", image).strip()
        try:
            return snapshot(self("mount", container).strip())
        finally:
            self("umount", container)
            self("rm", container)


class Bases:
    """The corpus's base images, each loaded into a tool on first use (both tools share one
    store each across the module, as a user's builds would)."""

    def __init__(self, store: ContainerStore, buildah: Buildah, work: Path) -> None:
        self.store, self.buildah, self.work = store, buildah, work
        self.loaded: set[str] = set()

    def need(self, names: tuple[str, ...]) -> None:
        for name in names:
            if name not in self.loaded:
                self._load(name)
                self.loaded.add(name)

    def _load(self, name: str) -> None:
        if name == BUSYBOX:
            self.store.ok("load", "-i", str(LAYOUT))
            image_id = self.buildah("pull", f"oci:{LAYOUT}").strip().splitlines()[-1]
            self.buildah("tag", image_id, name)
            return
        tarball = ALPINE_TARBALL if name == ALPINE else debian_tarball()
        changes = [arg for change in BASE_CHANGES[name] for arg in ("-c", change)]
        self.store.ok("import", *changes, str(tarball), name, timeout=600)
        archive = self.work / f"{name.replace(':', '-')}.tar"
        self.store.ok("save", "-o", str(archive), name)
        image_id = self.buildah("pull", f"docker-archive:{archive}").strip().splitlines()[-1]
        self.buildah("tag", image_id, name)
        archive.unlink()


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bases]:
    root = tmp_path_factory.mktemp("buildah")
    tool = Buildah(root)
    store = ContainerStore(root / "layerfs-store")
    try:
        yield Bases(store, tool, root)
    finally:
        subprocess.run([*tool.base, "rm", "--all"], capture_output=True)
        subprocess.run([*tool.base, "rmi", "--all", "--force"], capture_output=True)
        store.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def snapshot(root: str) -> dict[str, tuple[object, ...]]:
    """Every path under `root` but BUILDAH_RUNTIME's: type and mode, owner, size, link target,
    content digest and xattrs (mtimes differ between any two builds)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(rel_dir, d))
                   not in BUILDAH_RUNTIME]
        for name in [*dirs, *files]:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in BUILDAH_RUNTIME:
                continue
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            link = os.readlink(path) if os.path.islink(path) else None
            digest = None
            if os.path.isfile(path) and not link and rel not in STAMPED:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            size = st.st_size if digest else None
            xattrs = sorted((key, os.getxattr(path, key, follow_symlinks=False))
                            for key in os.listxattr(path, follow_symlinks=False))
            out[rel] = (oct(st.st_mode), st.st_uid, st.st_gid, size, link, digest, xattrs)
    return out


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_same_tree_and_config_as_buildah(name: str, bases: Bases, tmp_path: Path) -> None:
    case = BY_NAME[name]
    bases.need(case.bases)
    ctx = write_context(case, tmp_path / "ctx")
    tag = f"peer-{name}"
    build_args = [arg for key, value in case.build_args.items()
                  for arg in ("--build-arg", f"{key}={value}")]
    bases.buildah("bud", "--isolation", "chroot", "--pull-never", "--layers", "--format",
                  "docker", *build_args,
                  "-t", tag, str(ctx))
    bases.store.ok("build", "-q", *build_args, "-t", tag, str(ctx), timeout=600)

    expected = bases.buildah.tree(tag)
    with bases.store.mounted(tag, tmp_path / "mnt") as root:
        actual = snapshot(str(root))
    differing = sorted(p for p in expected.keys() | actual.keys()
                       if expected.get(p) != actual.get(p))
    assert not differing, [(p, expected.get(p), actual.get(p)) for p in differing[:10]]

    theirs = bases.buildah.config(tag)
    labels = dict(theirs.get("Labels") or {})
    labels.pop("io.buildah.version", None)  # buildah's own label
    theirs["Labels"] = labels or None
    ours = bases.store.image(tag).config["config"]
    for field in CONFIG_FIELDS:
        assert (ours.get(field) or None) == (theirs.get(field) or None), field
