"""Helpers for the image store acceptance tests: build layer tars, OCI layouts and docker-save
archives; run the `layerfs` CLI on a store under tmp_path; unpack with umoci (the oracle);
make real root filesystems (busybox from Debian's busybox-static, Debian by mmdebstrap, cached).

Everything here drives real programs as a user would: the CLI as a subprocess, umoci and skopeo
as the peers that read and write the same formats. Mounts made through `Store.mounted` are
always unmounted on the way out, also when the test fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import treecmp

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

LAYERFS = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "layerfs"
IMAGES = Path(os.environ.get("LAYERFS_TEST_IMAGES", "/work/shared/images"))
CACHE = Path(os.environ.get("LAYERFS_TEST_CACHE", "/var/tmp/layerfs-test-cache"))
BUSYBOX = Path("/bin/busybox")

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"

Entry = tuple[tarfile.TarInfo, bytes | None]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.005)


# -- layer tars -----------------------------------------------------------------------------------


def tar_info(name: str, kind: bytes, mode: int, **kw: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = 1_600_000_000
    for key, value in kw.items():
        setattr(info, key, value)
    return info


def file(name: str, data: bytes = b"", mode: int = 0o644, **kw: object) -> Entry:
    info = tar_info(name, tarfile.REGTYPE, mode, **kw)
    info.size = len(data)
    return info, data


def directory(name: str, mode: int = 0o755, **kw: object) -> Entry:
    return tar_info(name, tarfile.DIRTYPE, mode, **kw), None


def symlink(name: str, target: str, **kw: object) -> Entry:
    return tar_info(name, tarfile.SYMTYPE, 0o777, linkname=target, **kw), None


def hardlink(name: str, target: str, **kw: object) -> Entry:
    return tar_info(name, tarfile.LNKTYPE, 0o644, linkname=target, **kw), None


def device(name: str, kind: bytes, major: int, minor: int, mode: int = 0o666) -> Entry:
    return tar_info(name, kind, mode, devmajor=major, devminor=minor), None


def fifo(name: str, mode: int = 0o644) -> Entry:
    return tar_info(name, tarfile.FIFOTYPE, mode), None


def whiteout(path: str) -> Entry:
    """The OCI whiteout hiding `path` of the layers below."""
    parent, _, base = path.rpartition("/")
    return file(f"{parent}/{WHITEOUT}{base}" if parent else f"{WHITEOUT}{base}")


def opaque(dirname: str) -> Entry:
    """The OCI opaque marker: `dirname` hides everything the layers below have in it."""
    return file(f"{dirname.rstrip('/')}/{OPAQUE}")


def make_tar(*entries: Entry, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def raw_header(info: tarfile.TarInfo) -> bytes:
    """The header blocks of `info` and no data: for sizes that tarfile would not write."""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=1, mtime=0)


# -- OCI layouts and docker-save archives ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """What a writer produced, for checking what the store made of it."""

    manifest_digest: str
    config_digest: str
    diff_ids: tuple[str, ...]
    layer_digests: tuple[str, ...]


def image_config(diff_ids: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/bin/sh"], **(extra or {})},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"}
                    for i in range(len(diff_ids))],
    }


def _put_blob(layout: Path, data: bytes) -> str:
    digest = sha256(data)
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return digest


def _put_file_blob(layout: Path, path: Path) -> tuple[str, int]:
    """A big uncompressed layer tar into the layout, by hard link (or copy)."""
    digest = sha256_file(path)
    blob = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        try:
            os.link(path, blob)
        except OSError:
            shutil.copyfile(path, blob)
    return digest, path.stat().st_size


def write_oci_layout(layout: Path, tag: str, layers: list[bytes | Path], *,
                     compress: bool = True,
                     config_extra: dict[str, Any] | None = None) -> BuiltImage:
    """Add an image to the OCI layout dir `layout` (made if missing), named `tag` by the
    ref-name annotation in index.json. `layers` are plain tars, bottom first, as bytes (gzipped
    unless `compress` is False) or as files (stored uncompressed)."""
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    diff_ids: list[str] = []
    layer_digests: list[str] = []
    descriptors: list[dict[str, Any]] = []
    for tar in layers:
        if isinstance(tar, Path):
            digest, size = _put_file_blob(layout, tar)
            diff_ids.append(digest)
            media_type = OCI_LAYER
        else:
            blob = gzip_bytes(tar) if compress else tar
            digest, size = _put_blob(layout, blob), len(blob)
            diff_ids.append(sha256(tar))
            media_type = OCI_LAYER_GZIP if compress else OCI_LAYER
        layer_digests.append(digest)
        descriptors.append({"mediaType": media_type, "digest": digest, "size": size})
    config_raw = json.dumps(image_config(diff_ids, config_extra), sort_keys=True).encode()
    config_digest = _put_blob(layout, config_raw)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
        "layers": descriptors,
    }
    manifest_raw = json.dumps(manifest).encode()
    manifest_digest = _put_blob(layout, manifest_raw)
    index_path = layout / "index.json"
    index: dict[str, Any] = ({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
                             if not index_path.exists() else json.loads(index_path.read_text()))
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get(REF_NAME) != tag]
    index["manifests"].append({"mediaType": OCI_MANIFEST, "digest": manifest_digest,
                               "size": len(manifest_raw), "annotations": {REF_NAME: tag}})
    index_path.write_text(json.dumps(index))
    return BuiltImage(manifest_digest, config_digest, tuple(diff_ids), tuple(layer_digests))


def write_docker_archive(path: Path, repo_tags: list[str], layers: list[bytes],
                         config_extra: dict[str, Any] | None = None) -> BuiltImage:
    """A `docker save` archive (pre-25 shape: ID/layer.tar, ID.json, manifest.json)."""
    diff_ids = [sha256(tar) for tar in layers]
    config_raw = json.dumps(image_config(diff_ids, config_extra), sort_keys=True).encode()
    config_digest = sha256(config_raw)
    members: list[tuple[str, bytes]] = []
    layer_names = []
    for diff_id, tar in zip(diff_ids, layers, strict=True):
        name = f"{diff_id.removeprefix('sha256:')}/layer.tar"
        members.append((name, tar))
        layer_names.append(name)
    config_name = f"{config_digest.removeprefix('sha256:')}.json"
    members.append((config_name, config_raw))
    manifest = [{"Config": config_name, "RepoTags": repo_tags, "Layers": layer_names}]
    members.append(("manifest.json", json.dumps(manifest).encode()))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return BuiltImage("", config_digest, tuple(diff_ids), tuple(diff_ids))


def layout_manifest(layout: Path, tag: str) -> dict[str, Any]:
    """The index.json entry of `tag` in an OCI layout."""
    index = json.loads((layout / "index.json").read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get(REF_NAME) == tag:
            return dict(entry)
    raise AssertionError(f"{layout}: no image named {tag}")


def layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def layout_config_digest(layout: Path, tag: str) -> str:
    manifest = json.loads(layout_blob(layout, layout_manifest(layout, tag)["digest"]))
    return str(manifest["config"]["digest"])


def oci_archive(layout: Path, out: Path) -> Path:
    """The layout as an OCI archive (a tar of the layout dir)."""
    run(["tar", "-C", str(layout), "-cf", str(out), "."])
    return out


# -- peers: umoci and skopeo ----------------------------------------------------------------------


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a helper program; fail with its stderr if it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, **kw)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}\n{result.stderr}")
    return result


def umoci_unpack(layout: Path, tag: str, bundle: Path) -> Path:
    """The oracle: `umoci unpack` as root (never --rootless); returns the rootfs dir."""
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
    return bundle / "rootfs"


def umoci_image_from_rootfs(rootfs_tar: Path, layout: Path, tag: str, work: Path) -> None:
    """A one-layer OCI image made by umoci from a rootfs tarball (the way a peer makes it)."""
    bundle = work / "bundle"
    if not (layout / "oci-layout").exists():
        run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:{tag}"])
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
    run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", str(rootfs_tar),
         "-C", str(bundle / "rootfs")])
    run(["umoci", "repack", "--image", f"{layout}:{tag}", str(bundle)])
    shutil.rmtree(bundle)


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return run(["skopeo", "--insecure-policy", *args])


def docker_archive_from_layout(layout: Path, tag: str, out: Path, name: str) -> Path:
    """`skopeo copy oci:LAYOUT:TAG docker-archive:OUT:NAME`."""
    skopeo("copy", "-q", f"oci:{layout}:{tag}", f"docker-archive:{out}:{name}")
    return out


# -- the layerfs CLI on a store -------------------------------------------------------------------


@dataclass
class Store:
    """A store under tmp_path, driven through the `layerfs` command."""

    root: Path
    mounts: list[Path] = field(default_factory=list)

    def run(self, *args: str, input: bytes | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(LAYERFS), "--root", str(self.root), *args], input=input,
            capture_output=True, cwd=cwd, timeout=timeout,
        )
        return subprocess.CompletedProcess(result.args, result.returncode,
                                           result.stdout.decode(errors="replace"),
                                           result.stderr.decode(errors="replace"))

    def ok(self, *args: str, **kw: Any) -> str:
        """Run; the command must succeed; its stdout."""
        result = self.run(*args, **kw)
        assert result.returncode == 0, f"layerfs {' '.join(args)}: {result.stderr}"
        return result.stdout

    def fails(self, *args: str, **kw: Any) -> str:
        """Run; the command must fail with exit code != 0 and one line on stderr; that line."""
        result = self.run(*args, **kw)
        assert result.returncode != 0, f"layerfs {' '.join(args)} succeeded: {result.stdout}"
        lines = result.stderr.splitlines()
        assert len(lines) == 1, f"layerfs {' '.join(args)}: not one line on stderr: {lines}"
        assert lines[0].startswith("layerfs: "), lines
        return lines[0]

    def images_json(self, *args: str) -> list[dict[str, Any]]:
        doc = json.loads(self.ok("images", "--format", "json", *args))
        assert isinstance(doc, list)
        return doc

    def inspect(self, name: str) -> dict[str, Any]:
        doc = json.loads(self.ok("inspect", name))
        assert isinstance(doc, list) and len(doc) == 1
        return dict(doc[0])

    def image_id(self, name: str) -> str:
        return str(self.inspect(name)["Id"])

    def layer_dirs(self) -> set[str]:
        """Names of the unpacked layers on disk (layers/HEX holding a diff/)."""
        base = self.root / "layers"
        return {p.name for p in base.iterdir() if (p / "diff").is_dir()} if base.is_dir() else set()

    def blob_names(self) -> set[str]:
        base = self.root / "blobs" / "sha256"
        return {p.name for p in base.iterdir()} if base.is_dir() else set()

    def listing(self) -> dict[str, tuple[int, int]]:
        """Every path in the store (the lock file aside) with its type bits and size."""
        out: dict[str, tuple[int, int]] = {}
        if not self.root.exists():
            return out
        for path in sorted(self.root.rglob("*")):
            rel = str(path.relative_to(self.root))
            if rel == "lock":
                continue
            st = path.lstat()
            out[rel] = (st.st_mode, st.st_size)
        return out

    @contextlib.contextmanager
    def mounted(self, source: str, mountpoint: Path, *extra: str) -> Iterator[Path]:
        """`layerfs mount SOURCE MNT`; unmounted on the way out whatever happens."""
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.mounts.append(mountpoint)
        try:
            self.ok("mount", source, str(mountpoint), *extra)
            assert is_mounted(mountpoint), f"{mountpoint}: layerfs mount returned, not mounted"
            yield mountpoint
        finally:
            self.unmount(mountpoint)

    def unmount(self, mountpoint: Path) -> None:
        """`layerfs umount MNT`, falling back to fusermount3 (lazily, last) if that fails."""
        if not is_mounted(mountpoint):
            return
        result = self.run("umount", str(mountpoint.resolve()))
        if result.returncode != 0 or is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
        assert result.returncode == 0, f"layerfs umount {mountpoint}: {result.stderr}"

    def cleanup(self) -> None:
        for mountpoint in self.mounts:
            with contextlib.suppress(AssertionError):
                self.unmount(mountpoint)
        leftover = [m for m in self.mounts if is_mounted(m)]
        assert not leftover, f"still mounted: {leftover}"


def staged(store: Store) -> list[str]:
    """What is left under ROOT/tmp (staging: nothing, once no layerfs process runs)."""
    tmp = store.root / "tmp"
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")) if tmp.is_dir() else []


def is_mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts", errors="surrogateescape") as f:
        return any(mount_field(line.split()[1]) == target for line in f)


def mount_field(field: str) -> str:
    """A field of /proc/self/mounts or mountinfo, read with errors="surrogateescape" (a path
    need not be UTF-8): the kernel writes space, tab, newline and backslash as octal escapes
    (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


# -- trees ----------------------------------------------------------------------------------------


def assert_same_tree(expected_root: Path, actual_root: Path) -> None:
    """Same paths, types, modes, owners, sizes, contents, symlink targets, devices, xattrs
    (tests/treecmp.py), and the same hard-link groups."""
    expected, actual = treecmp.snapshot(expected_root), treecmp.snapshot(actual_root)
    problems = treecmp.diff(expected, actual)
    assert not problems, "\n".join(problems)
    assert hardlink_groups(expected_root) == hardlink_groups(actual_root)


def chroot_echo(root: Path) -> None:
    """The root runs a program: `chroot ROOT /bin/busybox echo hi`."""
    result = subprocess.run(["chroot", str(root), "/bin/busybox", "echo", "hi"],
                            capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stdout) == (0, "hi\n"), result.stderr


def hardlink_groups(root: Path) -> set[frozenset[str]]:
    """Paths that share an inode (regular files with more than one name), as sets."""
    groups: dict[int, set[str]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if st.st_nlink > 1 and not os.path.islink(path):
                groups.setdefault(st.st_ino, set()).add(os.path.relpath(path, root))
    return {frozenset(g) for g in groups.values() if len(g) > 1}


# -- root filesystems -----------------------------------------------------------------------------


def new_file(path: Path, data: bytes, mode: int = 0o644) -> Path:
    """Create `path` with `data`; fails if anything, a symlink above all, is already there.

    The applet symlinks of a busybox root point at /bin/busybox: writing through one of them
    would overwrite the host's busybox. O_EXCL never follows a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), mode)  # umask aside
    return path


def busybox_rootfs(dest: Path) -> Path:
    """A small runnable root from Debian's busybox-static: /bin/busybox and its applet
    symlinks (`busybox --install -s` in a chroot), /etc/passwd, /tmp 1777, a device, a fifo,
    a hard link, a setuid file, a user xattr and a file capability: one of each thing a root
    can hold. Every file is made with `new_file`, never through an applet symlink."""
    if not BUSYBOX.exists():
        pytest.skip("busybox-static is not installed (/bin/busybox)")
    for sub in ("bin", "etc", "root", "tmp", "proc", "dev", "usr/share/doc", "usr/sbin"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    new_file(dest / "bin" / "busybox", BUSYBOX.read_bytes(), 0o755)
    run(["chroot", str(dest), "/bin/busybox", "--install", "-s", "/bin"])
    (dest / "tmp").chmod(0o1777)
    new_file(dest / "etc" / "passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    new_file(dest / "etc" / "group", b"root:x:0:\n")
    new_file(dest / "etc" / "group-", b"root:x:0:\n")
    os.link(dest / "etc" / "group", dest / "etc" / "group.lnk", follow_symlinks=False)
    os.mknod(dest / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mkfifo(dest / "dev" / "fifo", 0o600)
    doc = new_file(dest / "usr" / "share" / "doc" / "README", b"a busybox root\n")
    os.chown(doc, 1000, 1000, follow_symlinks=False)
    os.setxattr(doc, "user.note", b"kept", follow_symlinks=False)
    new_file(dest / "usr" / "sbin" / "suid-tool", b"#!/bin/sh\n", 0o4755)
    cap = new_file(dest / "usr" / "sbin" / "cap-tool", b"#!/bin/sh\n", 0o755)
    os.setxattr(cap, "security.capability", CAP_NET_RAW, follow_symlinks=False)
    return dest


# A file capability, `setcap cap_net_raw+ep`: VFS_CAP_REVISION_2 with the effective flag,
# then permitted/inheritable low words, then the high words.
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def tar_dir(src: Path, out: Path) -> Path:
    """A rootfs tarball of `src` with GNU tar: numeric owners, xattrs, devices."""
    run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-C", str(src), "-cf",
         str(out), "."])
    return out


def busybox_tarball(work: Path) -> Path:
    return tar_dir(busybox_rootfs(work / "busybox-rootfs"), work / "busybox.tar")


DEBIAN_TAR = CACHE / "debian-bookworm.tar"


def debian_tarball() -> Path:
    """A minbase bookworm rootfs tarball from mmdebstrap, built once (under a lock, renamed
    into place when complete) and reused across runs; skips if it cannot be built."""
    if DEBIAN_TAR.is_file():
        return DEBIAN_TAR
    if shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if DEBIAN_TAR.is_file():
            return DEBIAN_TAR
        tmp = CACHE / f".build-{os.getpid()}-debian-bookworm.tar"  # mmdebstrap wants .tar
        result = subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=minbase", "bookworm", str(tmp)],
            capture_output=True, text=True, timeout=900,
        )
        if result.returncode != 0 or not tmp.is_file():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"mmdebstrap could not build a Debian root (offline?): {last}")
        os.replace(tmp, DEBIAN_TAR)
    return DEBIAN_TAR
