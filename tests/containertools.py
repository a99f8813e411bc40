"""Helpers for the container acceptance tests (mount, diff, commit, run) on top of
`tests.imagetools`: a store driven through the `layerfs` CLI whose every mount, also the ones
`layerfs run` makes on its own, is unmounted on the way out; a busybox root with a second user
and a few things to change; reading a committed layer back with tarfile.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from backports import zstd

from tests.imagetools import Store, is_mounted, mount_field, tar_dir

LayerMember = tuple[tarfile.TarInfo, bytes | None]


def mounts_by_source() -> list[tuple[str, str]]:
    """(source, mountpoint) of every mount this process sees."""
    out = []
    with open("/proc/self/mounts", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            out.append((mount_field(fields[0]), mount_field(fields[1])))
    return out


@dataclass
class ContainerStore(Store):
    """A `Store` that also mounts without a `with` block and cleans up after `layerfs run`."""

    @classmethod
    def copy_of(cls, template: Path, root: Path) -> ContainerStore:
        """A new store holding what `template` holds (a store is relocatable: no paths inside)."""
        subprocess.run(["cp", "-a", str(template), str(root)], check=True)
        return cls(root)

    def mount(self, source: str, mountpoint: Path, *extra: str) -> str:
        """`layerfs mount SOURCE MNT ...`: the container id; unmounted by `cleanup`."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mounts.append(mountpoint)
        out = self.ok("mount", source, str(mountpoint), *extra).strip()
        assert is_mounted(mountpoint), f"{mountpoint}: layerfs mount returned, not mounted"
        return out

    def container_ids(self) -> list[str]:
        base = self.root / "containers"
        return sorted(p.name for p in base.iterdir()) if base.is_dir() else []

    def own_mounts(self) -> list[str]:
        """Mountpoints served for this store's containers (fsname `layerfs:ID12`)."""
        sources = {f"layerfs:{cid[:12]}" for cid in self.container_ids()}
        return [target for source, target in mounts_by_source() if source in sources]

    def cleanup(self) -> None:
        """Unmount everything this store mounted, then fail if anything is left."""
        problems = []
        try:
            super().cleanup()
        except AssertionError as exc:
            problems.append(str(exc))
        for target in self.own_mounts():
            problems.append(f"left mounted: {target}")
            result = subprocess.run(["fusermount3", "-u", target], capture_output=True)
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-uz", target], capture_output=True)
        assert not problems, "; ".join(problems)

    # -- images and their blobs ----------------------------------------------------------------

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def image(self, name: str) -> ImageFacts:
        """`layerfs inspect NAME` (one call) with the manifest and config it names."""
        doc = self.inspect(name)
        manifest = json.loads(self.blob(doc["Manifest"]["Digest"]).read_bytes())
        config = json.loads(self.blob(manifest["config"]["digest"]).read_bytes())
        return ImageFacts(self, doc, manifest, config)

    def diff(self, container: str) -> list[str]:
        return self.ok("diff", container).splitlines()


@dataclass(frozen=True)
class ImageFacts:
    """What `inspect` says of an image, and the manifest and config it has in the store."""

    store: ContainerStore
    inspect: dict[str, Any]
    manifest: dict[str, Any]
    config: dict[str, Any]

    @property
    def diff_ids(self) -> list[str]:
        return list(self.inspect["RootFS"]["Layers"])

    @property
    def top_layer(self) -> tuple[str, str, str]:
        """(diff_id, blob digest, media type) of the image's last layer."""
        descriptor = self.manifest["layers"][-1]
        return self.diff_ids[-1], str(descriptor["digest"]), str(descriptor["mediaType"])

    def top_layer_members(self) -> dict[str, LayerMember]:
        """The tar entries of the image's last layer, by name (without a leading ./ or /)."""
        _diff_id, digest, media_type = self.top_layer
        return layer_members(self.store.blob(digest).read_bytes(), media_type)


def decompress(blob: bytes, media_type: str) -> bytes:
    if media_type.endswith("+gzip") or media_type.endswith(".gzip"):
        assert blob[:2] == b"\x1f\x8b", f"{media_type}: not a gzip stream"
        return gzip.decompress(blob)
    if media_type.endswith("+zstd") or media_type.endswith(".zstd"):
        assert blob[:4] == b"\x28\xb5\x2f\xfd", f"{media_type}: not a zstd stream"
        return zstd.decompress(blob)
    return blob


def layer_members(blob: bytes, media_type: str) -> dict[str, LayerMember]:
    tar_bytes = decompress(blob, media_type)
    out: dict[str, LayerMember] = {}
    with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
        for info in tar:
            name = info.name.removeprefix("./").strip("/")
            assert name not in out, f"duplicate path in layer: {name}"
            data = None
            if info.isreg():
                extracted = tar.extractfile(info)
                assert extracted is not None
                data = extracted.read()
            out[name] = (info, data)
    return out


# -- root filesystems -----------------------------------------------------------------------------

USER_UID = 1000
BUSYBOX = Path("/bin/busybox")


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    """Write a file of the root being built, never through a symlink (`busybox --install -s`
    leaves absolute links to /bin/busybox that would lead to the host's)."""
    assert not path.is_symlink(), f"{path}: a symlink, would write outside the root"
    path.write_text(text)
    path.chmod(mode)


def busybox_user_rootfs(dest: Path) -> Path:
    """A small runnable root from Debian's busybox-static: /bin/busybox and its applet links,
    root and a user `user` (1000:1000, home /home/user) in a group `staff` (50) as well, /tmp
    1777, /dev/null, a fifo, a hard-linked pair (/etc/group, /etc/group.lnk), a file owned by
    the user with an xattr, /etc/motd, and /opt/data with two files: a directory to replace."""
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (/bin/busybox)")
    with open(BUSYBOX, "rb") as f:
        assert f.read(4) == b"\x7fELF", f"{BUSYBOX} is not a program any more: reinstall " \
            "busybox-static (apt-get install --reinstall busybox-static)"
    for sub in ("bin", "etc", "root", "tmp", "proc", "dev", "usr/share/doc", "home/user",
                "opt/data"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    subprocess.run(["chroot", str(dest), "/bin/busybox", "--install", "-s", "/bin"], check=True)
    (dest / "tmp").chmod(0o1777)
    etc = dest / "etc"
    _write(etc / "passwd", "root:x:0:0:root:/root:/bin/sh\n"
                           f"user:x:{USER_UID}:{USER_UID}:user:/home/user:/bin/sh\n")
    groups = f"root:x:0:\nuser:x:{USER_UID}:\nstaff:x:50:user\n"
    _write(etc / "group", groups)
    _write(etc / "group-", groups)
    os.link(etc / "group", etc / "group.lnk")
    _write(etc / "motd", "base motd\n")
    os.mknod(dest / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(dest / "dev" / "fifo", 0o600)
    doc = dest / "usr" / "share" / "doc" / "README"
    _write(doc, "a busybox root\n")
    os.chown(doc, USER_UID, USER_UID)
    os.setxattr(doc, "user.note", b"kept")
    os.chown(dest / "home" / "user", USER_UID, USER_UID)
    _write(dest / "opt" / "data" / "old1", "old one\n")
    _write(dest / "opt" / "data" / "old2", "old two\n")
    return dest


def busybox_user_tarball(work: Path) -> Path:
    return tar_dir(busybox_user_rootfs(work / "busybox-user-rootfs"), work / "busybox-user.tar")


def apt_download(package: str, dest: Path) -> Path:
    """`apt-get download PACKAGE` into `dest` on the host; skips when apt cannot fetch it."""
    if shutil.which("apt-get") is None:
        pytest.skip("apt-get is not available to download a .deb")
    dest.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(PermissionError):
        dest.chmod(0o777)  # apt's _apt user writes there when it can
    result = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True,
                            text=True, timeout=300)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"apt-get download {package} failed (no mirror reachable?): {last}")
    return debs[0]


def chroot(root: Path, *argv: str, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command chrooted into a mounted container, with a plain environment."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "LC_ALL": "C", "DEBIAN_FRONTEND": "noninteractive", "HOME": "/root"}
    result = subprocess.run(["chroot", str(root), *argv], capture_output=True, text=True,
                            env=env, input=input, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"chroot {root} {' '.join(argv)}: exit {result.returncode}\n"
                             f"{result.stdout}\n{result.stderr}")
    return result
