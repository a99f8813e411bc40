"""`layerfs build` next to buildah (`bud --isolation chroot --storage-driver vfs`) on the same
Dockerfiles over the official busybox image: the final trees (types, modes, owners, sizes,
link targets, contents) and the config fields must be equal.

buildah never pulls (`--pull-never`): both tools load the image from the same OCI layout.
What buildah adds for its own runtime is left out of the comparison, each with its reason in
BUILDAH_RUNTIME. Two known differences are kept out of the Dockerfiles, and layerfs follows
docker in both: buildah makes a WORKDIR's directory only if a RUN follows (docker always
makes it), and makes VOLUME mountpoints in the image when a RUN follows (buildkit never does).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from typing import TYPE_CHECKING, Any

import pytest

from tests.containertools import ContainerStore
from tests.imagetools import IMAGES

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

LAYOUT = IMAGES / "busybox-1.38.0-musl-amd64-oci"
BASE = "busybox:1.38.0-musl"
BUILDAH_RUNTIME = {
    "etc/hostname", "etc/hosts", "etc/resolv.conf",  # files buildah binds into each RUN
    "run",  # buildah's runtime dir (/run/.containerenv)
    "proc", "sys",  # mountpoints layerfs makes for a RUN and removes after it
}
CONFIG_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts",
                 "Volumes", "StopSignal")

pytestmark = pytest.mark.skipif(shutil.which("buildah") is None or not LAYOUT.is_dir(),
                                reason="buildah or the busybox OCI layout is missing")


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


@pytest.fixture(scope="module")
def buildah(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Buildah]:
    root = tmp_path_factory.mktemp("buildah")
    tool = Buildah(root)
    image_id = tool("pull", f"oci:{LAYOUT}").strip().splitlines()[-1]
    tool("tag", image_id, BASE)
    try:
        yield tool
    finally:
        subprocess.run([*tool.base, "rm", "--all"], capture_output=True)
        subprocess.run([*tool.base, "rmi", "--all", "--force"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ContainerStore]:
    s = ContainerStore(tmp_path / "store")
    s.ok("load", "-i", str(LAYOUT))
    try:
        yield s
    finally:
        s.cleanup()


def snapshot(root: str) -> dict[str, tuple[object, ...]]:
    """Every path under `root` but BUILDAH_RUNTIME's: type and mode, owner, size, link target
    and content digest (mtimes differ between any two builds)."""
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
            if os.path.isfile(path) and not link:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            size = st.st_size if digest else None
            out[rel] = (oct(st.st_mode), st.st_uid, st.st_gid, size, link, digest)
    return out


def _tar(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.mtime = len(data), 0o750, 7, 8, 1
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


CASES: dict[str, tuple[str, dict[str, bytes]]] = {
    "users-dirs-and-metadata": ("""\
FROM busybox:1.38.0-musl
RUN adduser -D -u 1000 app && rm -rf /etc/motd /usr/sbin
COPY --chown=app:app --chmod=640 conf/*.conf /etc/app/
COPY tree /srv/tree
COPY link /srv/
USER app
WORKDIR /home/app/work/deep
ENV GREETING="hello there" LEVEL=${LEVEL:-3}
RUN echo "$GREETING $LEVEL" > greeting
VOLUME /data /cache
EXPOSE 8080 53/udp
LABEL org.example.name=demo version=1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo $GREETING"]
""", {"conf/a.conf": b"a\n", "conf/b.conf": b"b\n", "conf/c.txt": b"c\n",
      "tree/x/y": b"y\n", "tree/z": b"z\n", "link": b"target\n"}),
    "multi-stage-and-args": ("""\
ARG VARIANT=musl
FROM busybox:1.38.0-${VARIANT} AS builder
ARG OUT=/out
RUN mkdir -p $OUT/bin && echo built > $OUT/bin/tool && chmod 755 $OUT/bin/tool
FROM scratch
COPY --from=builder /out/bin/tool /usr/local/bin/tool
COPY --from=builder /bin/busybox /bin/busybox
CMD ["/bin/busybox", "sh"]
""", {}),
    "add-tarball-and-dockerignore": ("""\
FROM busybox:1.38.0-musl
ADD pkg.tar.gz /opt/
COPY . /ctx/
RUN ls -R /ctx > /listing && rm /opt/pkg/remove-me
""", {".dockerignore": b"*.log\nsecret/\n!secret/public\n",
      "pkg.tar.gz": _tar({"pkg/bin/run": b"#!/bin/sh\n", "pkg/remove-me": b"x"}),
      "keep.txt": b"k\n", "debug.log": b"l\n", "secret/key": b"s\n", "secret/public": b"p\n"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_tree_and_config_as_buildah(name: str, store: ContainerStore, buildah: Buildah,
                                         tmp_path: Path) -> None:
    dockerfile, files = CASES[name]
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(dockerfile)
    for rel, data in files.items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_bytes(data)
    if name == "users-dirs-and-metadata":
        os.symlink("link", ctx / "tree" / "rel-link")
    tag = f"peer-{name}"
    buildah("bud", "--isolation", "chroot", "--pull-never", "--layers", "-t", tag, str(ctx))
    store.ok("build", "-q", "-t", tag, str(ctx))

    expected = buildah.tree(tag)
    with store.mounted(tag, tmp_path / "mnt") as root:
        actual = snapshot(str(root))
    differing = sorted(p for p in expected.keys() | actual.keys()
                       if expected.get(p) != actual.get(p))
    assert not differing, [(p, expected.get(p), actual.get(p)) for p in differing[:10]]

    theirs = buildah.config(tag)
    labels = dict(theirs.get("Labels") or {})
    labels.pop("io.buildah.version", None)  # buildah's own label
    theirs["Labels"] = labels or None
    ours = store.image(tag).config["config"]
    for field in CONFIG_FIELDS:
        assert (ours.get(field) or None) == (theirs.get(field) or None), field
