"""Safe layer unpacking: a hostile-tarball corpus, the overlay on-disk format, real images.

Hostile tars are built here with tarfile (and by hand where tarfile will not write them);
each must be refused with a message naming the entry, or contained, and a sentinel
directory next to the layer must stay untouched. Device nodes, whiteout devices and owners
need root: those tests are skipped otherwise; one test runs the unpacker as `nobody`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest

from layerfs.compression import Compression, compress
from layerfs.errors import LayerError
from layerfs.tarlayer.read import UnpackLimits, UnpackStats, unpack_layer
from tests.imagetools import (
    Entry,
    device,
    directory,
    file,
    hardlink,
    make_tar,
    symlink,
    tar_info,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

IMAGES = Path(os.environ.get("LAYERFS_TEST_IMAGES", "/work/shared/images"))
ALPINE = IMAGES / "alpine-minirootfs-3.20.3-x86_64.tar.gz"
BUSYBOX = IMAGES / "busybox-1.38.0-musl-amd64-oci"
IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mknod, chown, trusted.*)")

def raw_header(info: tarfile.TarInfo, fmt: Literal[0, 1, 2] = tarfile.PAX_FORMAT) -> bytes:
    """The header blocks of `info`, with no data: for sizes that tarfile would not write."""
    return info.tobuf(fmt, "utf-8", "surrogateescape")


# -- fixtures -------------------------------------------------------------------------------------


class Layer:
    """A new empty layer dir, with a sentinel dir beside it that nothing may touch."""

    def __init__(self, root: Path) -> None:
        root.mkdir()
        self.dest = root / "layer"
        self.dest.mkdir()
        self.outside = root / "outside"
        self.outside.mkdir()
        (self.outside / "sentinel").write_bytes(b"keep")
        self._before = self._snapshot()

    def _snapshot(self) -> list[tuple[str, int, int, float]]:
        rows = []
        for path in sorted(self.outside.parent.rglob("*")):
            if path == self.dest or self.dest in path.parents:
                continue
            st = path.lstat()
            rows.append((str(path), st.st_mode, st.st_size, st.st_mtime))
        return rows

    def unpack(self, data: bytes, fresh: bool = True, **kw: object) -> UnpackStats:
        """Unpack `data` into the layer dir, emptied first unless `fresh` is False."""
        if fresh:
            shutil.rmtree(self.dest)
            self.dest.mkdir()
        return unpack_layer(io.BytesIO(data), self.dest, **kw)  # type: ignore[arg-type]

    def refused(self, data: bytes, match: str, fresh: bool = True, **kw: object) -> LayerError:
        with pytest.raises(LayerError, match=match) as info:
            self.unpack(data, fresh, **kw)
        self.assert_outside_untouched()
        return info.value

    def assert_outside_untouched(self) -> None:
        assert self._snapshot() == self._before
        assert (self.outside / "sentinel").read_bytes() == b"keep"

    def __truediv__(self, name: str) -> Path:
        return self.dest / name


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[Layer]:
    lay = Layer(tmp_path / "box")
    yield lay
    lay.assert_outside_untouched()


# -- hostile tars: refused, with the entry named --------------------------------------------------


def test_parent_traversal_is_refused(layer: Layer) -> None:
    err = layer.refused(make_tar(file("../outside/sentinel", b"pwned")), r"'\.\.' component")
    assert "../outside/sentinel" in str(err)
    layer.refused(make_tar(file("a/../../x", b"x")), r"a/\.\./\.\./x: '\.\.' component")


def test_absolute_path_is_refused(layer: Layer) -> None:
    abs_name = str(layer.outside / "sentinel")
    assert abs_name.startswith("/")
    layer.refused(make_tar(file(abs_name, b"pwned")), rf"{abs_name}: absolute path refused")
    layer.refused(make_tar(file("/etc/x", b"pwned")), "/etc/x: absolute path refused")


@pytest.mark.parametrize("target", ["ABS", "../outside", "../../../../../../../tmp"])
def test_write_through_a_planted_symlink_is_refused(layer: Layer, target: str) -> None:
    target = str(layer.outside) if target == "ABS" else target
    tar = make_tar(symlink("a", target), file("a/sentinel", b"pwned"))
    layer.refused(tar, r"a/sentinel: a is a symlink \(never followed\)")
    tar = make_tar(symlink("a", target), directory("a/sub"))
    layer.refused(tar, "a/sub: a is a symlink")


def test_deep_write_through_a_planted_symlink_is_refused(layer: Layer) -> None:
    tar = make_tar(
        directory("d"), directory("d/e"), symlink("d/e/f", str(layer.outside)), file("d/e/f/x")
    )
    layer.refused(tar, "d/e/f/x: d/e/f is a symlink")


def test_symlink_over_a_parent_after_use_is_refused(layer: Layer) -> None:
    # The openat chain for d/ is cached from the first entry; d is then replaced by a symlink.
    tar = make_tar(file("d/one"), symlink("d", str(layer.outside)), file("d/sentinel", b"x"))
    layer.refused(tar, "d/sentinel: d is a symlink")


def test_hardlink_out_of_the_layer_is_refused(layer: Layer) -> None:
    layer.refused(make_tar(hardlink("h", "../../etc/passwd")), r"h: '\.\.' component")
    layer.refused(make_tar(hardlink("h", "/etc/passwd")), "h: absolute path refused")


def test_hardlink_through_a_symlink_is_refused(layer: Layer) -> None:
    tar = make_tar(symlink("s", str(layer.outside)), hardlink("h", "s/sentinel"))
    layer.refused(tar, "h: hard link target s/sentinel: s is a symlink")
    assert os.stat(layer.outside / "sentinel").st_nlink == 1


def test_hardlink_to_a_symlink_links_the_symlink(layer: Layer) -> None:
    layer.unpack(make_tar(symlink("s", "/etc/passwd"), hardlink("h", "s")))
    st = os.lstat(layer / "h")
    assert stat.S_ISLNK(st.st_mode)
    assert st.st_ino == os.lstat(layer / "s").st_ino
    assert os.readlink(layer / "h") == "/etc/passwd"


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([hardlink("h", "missing")], "h: hard link target missing is not in the layer"),
        ([hardlink("h", "d/missing")], "h: hard link target d/missing is not in the layer"),
        ([directory("d"), hardlink("h", "d")], "h: hard link target d is a directory"),
        ([hardlink("h", "h")], "h: hard link to itself"),
        ([hardlink("h", ".")], "h: hard link to the layer root"),
        ([file("f"), hardlink("h", "f/x")], "h: hard link target f/x: f is not a directory"),
    ],
)
def test_bad_hardlinks_are_refused(layer: Layer, entries: list[Entry], match: str) -> None:
    layer.refused(make_tar(*entries), match)


@pytest.mark.parametrize("name", [".wh.", "d/.wh.", ".wh..", ".wh...", "d/.wh.."])
def test_whiteouts_naming_nothing_are_refused(layer: Layer, name: str) -> None:
    layer.refused(make_tar(file(name)), f"{name}: whiteout that names nothing")


def test_whiteout_used_as_a_directory_is_refused(layer: Layer) -> None:
    layer.refused(make_tar(file(".wh.d/x")), r"\.wh\.d/x: a whiteout name used as a directory")


def test_absurd_sizes_are_refused(layer: Layer) -> None:
    info, _ = file("big")
    info.size = 1 << 50
    layer.refused(raw_header(info), r"big: size 1125899906842624 exceeds the limit")
    small = UnpackLimits(max_file_size=1000)
    layer.refused(make_tar(file("f", b"x" * 1001)), "f: size 1001 exceeds the limit", limits=small)


def test_file_larger_than_the_stream_is_refused(layer: Layer) -> None:
    info, _ = file("f")
    info.size = 10_000
    tar = raw_header(info) + b"x" * 100
    layer.refused(tar, r"f: truncated tar: the entry claims 10000 bytes, the stream ends after 100")
    layer.refused(gzip.compress(tar), "f: truncated tar")


def test_skipped_data_beyond_the_stream_is_refused(layer: Layer) -> None:
    # A whiteout's data is not read by us but skipped by tarfile; the skip meets the end.
    info, _ = file(".wh.x")
    info.size = 100_000
    layer.refused(raw_header(info) + b"w" * 1000, "truncated tar: the stream ends inside an entry")


def test_end_without_end_of_archive_marker_is_an_end(layer: Layer) -> None:
    # As Go's archive/tar (and so Docker) reads it: EOF at a header boundary is a clean end.
    tar = make_tar(file("a", b"x" * 600))
    layer.unpack(tar[: 512 * 3])
    assert (layer / "a").read_bytes() == b"x" * 600


def test_unknown_entry_type_is_refused(layer: Layer) -> None:
    tar = make_tar((tar_info("v", b"V", 0o644), None))
    layer.refused(tar, r"v: unsupported tar entry type 'V'")


def test_truncated_gzip_is_refused(layer: Layer) -> None:
    tar = make_tar(file("a", os.urandom(50_000)), file("b", os.urandom(50_000)))
    packed = compress(tar, Compression.GZIP)
    err = layer.refused(
        packed[: len(packed) // 2], r"^layer\.tar\.gz: truncated gzip stream$", name="layer.tar.gz"
    )
    assert isinstance(err.__cause__, EOFError)


@pytest.mark.parametrize("kind", [Compression.GZIP, Compression.ZSTD])
def test_truncated_compressed_tail_is_refused(layer: Layer, kind: Compression) -> None:
    # Cut in the trailer: every tar byte is there but the stream is not whole.
    packed = compress(make_tar(file("a", b"hello")), kind)
    layer.refused(packed[:-3], f"truncated {kind.value} stream")


def test_truncated_tar_header_is_refused(layer: Layer) -> None:
    tar = make_tar(file("a", b"x" * 600), file("b", b"y"))
    layer.refused(tar[: 512 * 3 + 100], "truncated tar: the stream ends inside a header")


def test_garbage_header_is_refused(layer: Layer) -> None:
    tar = make_tar(file("a", b"x"))
    layer.refused(tar[:1024] + b"\x01" * 512 + bytes(1024), "malformed tar: invalid header")
    layer.refused(b"\x01" * 4096, "malformed tar")


def test_garbage_pax_record_is_refused(layer: Layer) -> None:
    # tarfile treats a PAX block it cannot parse as the end of the archive: entries after
    # it would be lost without a word.
    info, data = file("f", b"x")
    info.pax_headers = {"comment": "hello"}
    tar = make_tar((info, data), file("after", b"a"))
    assert b"17 comment=hello\n" in tar
    bad = tar.replace(b"17 comment=hello\n", b"00 comment=hello\n")  # length 0
    layer.refused(bad, "malformed tar")


def test_huge_pax_header_is_refused(layer: Layer) -> None:
    info, data = file("f", b"x")
    info.pax_headers = {"comment": "c" * 100_000}
    tar = make_tar((info, data))
    layer.refused(
        tar, "tar header block of .* exceeds the limit", limits=UnpackLimits(max_header_size=65536)
    )


def test_file_under_a_file_is_refused(layer: Layer) -> None:
    layer.refused(make_tar(file("f"), file("f/x")), "f/x: f is not a directory")


def test_too_deep_is_refused(layer: Layer) -> None:
    layer.refused(make_tar(file("a/" * 300 + "f")), "deeper than 256 components")


def test_dest_must_be_empty(layer: Layer) -> None:
    (layer / "x").write_bytes(b"")
    layer.refused(make_tar(file("a")), "not an empty directory", fresh=False)


# -- duplicates: a later entry replaces an earlier one --------------------------------------------


def test_later_file_replaces_earlier(layer: Layer) -> None:
    layer.unpack(make_tar(file("f", b"one"), file("f", b"two", mode=0o600)))
    assert (layer / "f").read_bytes() == b"two"
    assert stat.S_IMODE(os.lstat(layer / "f").st_mode) == 0o600


def test_directory_over_directory_updates_metadata_only(layer: Layer) -> None:
    tar = make_tar(directory("d", 0o700), file("d/keep", b"k"), directory("d", 0o751))
    layer.unpack(tar)
    assert (layer / "d/keep").read_bytes() == b"k"
    assert stat.S_IMODE(os.lstat(layer / "d").st_mode) == 0o751


def test_file_where_a_directory_was(layer: Layer) -> None:
    tar = make_tar(directory("d"), directory("d/e"), file("d/e/f", b"x"), file("d", b"now a file"))
    layer.unpack(tar)
    assert (layer / "d").read_bytes() == b"now a file"


def test_directory_where_a_file_was(layer: Layer) -> None:
    layer.unpack(make_tar(file("d", b"x"), directory("d", 0o750), file("d/f", b"y")))
    assert stat.S_IMODE(os.lstat(layer / "d").st_mode) == 0o750
    assert (layer / "d/f").read_bytes() == b"y"


def test_file_over_a_symlink_replaces_the_symlink(layer: Layer) -> None:
    layer.unpack(make_tar(symlink("l", str(layer.outside / "sentinel")), file("l", b"mine")))
    assert not (layer / "l").is_symlink()
    assert (layer / "l").read_bytes() == b"mine"


def test_symlink_over_a_tree_removes_only_the_tree(layer: Layer) -> None:
    tar = make_tar(
        directory("d"), file("d/f"), symlink("d/out", str(layer.outside)), symlink("d", "/etc")
    )
    layer.unpack(tar)
    assert os.readlink(layer / "d") == "/etc"


# -- the overlay on-disk format -------------------------------------------------------------------


@needs_root
def test_whiteout_becomes_a_char_device_0_0(layer: Layer) -> None:
    stats = layer.unpack(make_tar(directory("etc"), file("etc/.wh.passwd"), file(".wh.top")))
    for path in (layer / "etc/passwd", layer / "top"):
        st = os.lstat(path)
        assert stat.S_ISCHR(st.st_mode)
        assert st.st_rdev == 0
    assert not (layer / "etc/.wh.passwd").exists()
    assert stats.whiteouts == 2
    assert not stats.markers_kept


@needs_root
def test_whiteout_of_a_same_layer_entry_keeps_the_entry(layer: Layer) -> None:
    layer.unpack(make_tar(file("a", b"here"), file(".wh.a"), file(".wh.b"), file("b", b"new")))
    assert (layer / "a").read_bytes() == b"here"  # a whiteout hides lower layers only
    assert (layer / "b").read_bytes() == b"new"


@needs_root
def test_opaque_marker_becomes_the_xattr(layer: Layer) -> None:
    tar = make_tar(
        directory("d"), file("d/.wh..wh..opq"), file("d/kept", b"k"), file("e/.wh..wh..opq")
    )
    stats = layer.unpack(tar)
    assert os.getxattr(layer / "d", "trusted.overlay.opaque") == b"y"
    assert os.getxattr(layer / "e", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(layer / "d")) == ["kept"]
    assert stats.opaques == 2


def test_hardlinks_share_the_inode(layer: Layer) -> None:
    stats = layer.unpack(
        make_tar(
            file("bin/busybox", b"ELF", mode=0o755),
            hardlink("bin/sh", "./bin/busybox"),
            hardlink("usr/bin/env", "bin/busybox"),
        )
    )
    inos = {os.lstat(layer / p).st_ino for p in ("bin/busybox", "bin/sh", "usr/bin/env")}
    assert len(inos) == 1
    assert os.lstat(layer / "bin/sh").st_nlink == 3
    assert stats.hardlinks == 2


@needs_root
def test_special_bits_owners_and_devices_are_kept(layer: Layer) -> None:
    tar = make_tar(
        file("usr/bin/passwd", b"x", mode=0o4755, uid=0, gid=0),
        file("usr/bin/wall", b"x", mode=0o2755, uid=0, gid=5),
        file("home/u/f", b"x", mode=0o640, uid=1000, gid=1001),
        directory("tmp", 0o1777),
        directory("var/mail", 0o2775, uid=0, gid=8),
        symlink("home/u/link", "f", uid=1000, gid=1001),
        device("dev/null", tarfile.CHRTYPE, 1, 3),
        device("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660),
        (tar_info("run/fifo", tarfile.FIFOTYPE, 0o620, uid=7, gid=8), None),
    )
    stats = layer.unpack(tar)
    mode = {
        p: os.lstat(layer / p).st_mode
        for p in (
            "usr/bin/passwd",
            "usr/bin/wall",
            "tmp",
            "var/mail",
            "dev/null",
            "dev/sda",
            "run/fifo",
        )
    }
    assert stat.S_IMODE(mode["usr/bin/passwd"]) == 0o4755
    assert stat.S_IMODE(mode["usr/bin/wall"]) == 0o2755
    assert stat.S_IMODE(mode["tmp"]) == 0o1777
    assert stat.S_IMODE(mode["var/mail"]) == 0o2775
    assert stat.S_ISCHR(mode["dev/null"]) and stat.S_IMODE(mode["dev/null"]) == 0o666
    assert os.lstat(layer / "dev/null").st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(mode["dev/sda"]) and os.lstat(layer / "dev/sda").st_rdev == os.makedev(8, 0)
    assert stat.S_ISFIFO(mode["run/fifo"]) and stat.S_IMODE(mode["run/fifo"]) == 0o620
    for path, owner in [
        ("usr/bin/wall", (0, 5)),
        ("home/u/f", (1000, 1001)),
        ("home/u/link", (1000, 1001)),
        ("var/mail", (0, 8)),
        ("run/fifo", (7, 8)),
    ]:
        st = os.lstat(layer / path)
        assert (st.st_uid, st.st_gid) == owner, path
    assert (stats.devices, stats.fifos) == (2, 1)


@needs_root
def test_xattrs_are_kept_capability_after_chown(layer: Layer) -> None:
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
    info, data = file("bin/ping", b"ELF", mode=0o755, uid=0, gid=1000)
    info.pax_headers = {
        "SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape"),
        "SCHILY.xattr.user.mime": "application/x-executable",
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",  # the overlay's own: not from a tar
    }
    dinfo, _ = directory("d")
    dinfo.pax_headers = {"SCHILY.xattr.user.dir": "yes"}
    linfo, _ = symlink("l", "bin/ping")
    linfo.pax_headers = {"SCHILY.xattr.trusted.note": "on a symlink"}
    stats = layer.unpack(make_tar((info, data), (dinfo, None), (linfo, None)))
    assert os.getxattr(layer / "bin/ping", "security.capability") == cap
    assert os.getxattr(layer / "bin/ping", "user.mime") == b"application/x-executable"
    assert os.getxattr(layer / "d", "user.dir") == b"yes"
    assert os.getxattr(layer / "l", "trusted.note", follow_symlinks=False) == b"on a symlink"
    assert "trusted.overlay.redirect" not in os.listxattr(layer / "bin/ping")
    assert stats.dropped == ("bin/ping: xattr trusted.overlay.redirect: overlay-private",)


def test_mtimes_are_kept_directories_last(layer: Layer) -> None:
    dinfo, _ = directory("d", mtime=1_000_000_000)
    finfo, fdata = file("d/f", b"x", mtime=1_100_000_000)
    sinfo, _ = symlink("d/s", "f", mtime=1_200_000_000)
    pinfo, pdata = file("d/precise", b"p")
    pinfo.pax_headers = {"mtime": "1300000000.123456789"}
    rinfo, _ = directory(".", mtime=900_000_000)
    layer.unpack(
        make_tar(
            (rinfo, None),
            (dinfo, None),
            (finfo, fdata),
            (sinfo, None),
            (pinfo, pdata),
            file("d/sub/late", b"added after d's entry"),
        )
    )
    assert os.lstat(layer / "d").st_mtime == 1_000_000_000
    assert os.lstat(layer / "d/f").st_mtime == 1_100_000_000
    assert os.lstat(layer / "d/s").st_mtime == 1_200_000_000
    assert os.lstat(layer / "d/precise").st_mtime_ns == 1_300_000_000_123_456_789
    assert os.lstat(layer.dest).st_mtime == 900_000_000


def test_missing_parents_are_made_0755(layer: Layer) -> None:
    old = os.umask(0o077)
    try:
        layer.unpack(make_tar(file("a/b/c", b"x")))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(layer / "a").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(layer / "a/b").st_mode) == 0o755
    assert stat.S_IMODE(os.lstat(layer.dest).st_mode) == 0o755


def test_names_long_odd_and_dotted(layer: Layer) -> None:
    long = "x" * 150 + "/" + "y" * 200
    odd = "caf\udce9"  # the byte 0xE9: not UTF-8, kept as bytes
    tar = make_tar(
        file("./dot/a", b"1"),
        file(long, b"2"),
        file(odd, b"3"),
        file("sp ace", b"4"),
        directory("./"),
        file(".//dot//./b", b"5"),
    )
    layer.unpack(tar)
    assert (layer / "dot/a").read_bytes() == b"1"
    assert (layer / long).read_bytes() == b"2"
    assert os.path.exists(os.fsencode(layer.dest) + b"/caf\xe9")
    assert (layer / "dot/b").read_bytes() == b"5"


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("kind", list(Compression))
def test_diff_id_is_the_sha256_of_the_whole_tar(layer: Layer, fmt: int, kind: Compression) -> None:
    tar = make_tar(file("a", os.urandom(3000)), directory("d"), file("d/b", b""), fmt=fmt)
    tar += bytes(10240)  # extra trailing padding, as some writers add: part of the diff_id
    stats = layer.unpack(compress(tar, kind))
    assert stats.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
    assert stats.tar_size == len(tar)
    assert (stats.entries, stats.files, stats.directories, stats.data_bytes) == (3, 2, 1, 3000)


def test_empty_layers(layer: Layer) -> None:
    assert layer.unpack(b"").diff_id == "sha256:" + hashlib.sha256(b"").hexdigest()
    assert os.listdir(layer.dest) == []
    tar = make_tar()
    assert layer.unpack(tar).diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()


def test_large_file_crosses_buffer_boundaries(layer: Layer) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    layer.unpack(compress(make_tar(file("big", data), file("after", b"a")), Compression.GZIP))
    assert (layer / "big").read_bytes() == data
    assert (layer / "after").read_bytes() == b"a"


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_files_keep_their_holes(tmp_path: Path, layer: Layer, fmt: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(8 << 20)
        f.write(b"middle")
        f.truncate(16 << 20)
    (src / "after").write_bytes(b"after")
    tar = subprocess.run(
        ["tar", "--sparse", f"--format={fmt}", "-C", src, "-cf", "-", "."],
        check=True,
        capture_output=True,
    ).stdout
    layer.unpack(tar)
    assert (layer / "sparse").read_bytes() == (src / "sparse").read_bytes()
    assert os.lstat(layer / "sparse").st_blocks * 512 < 1 << 20
    assert (layer / "after").read_bytes() == b"after"


# -- rootless: markers are kept, devices refused --------------------------------------------------

ROOTLESS_SCRIPT = textwrap.dedent(
    """
    import io, json, os, sys
    from pathlib import Path
    from layerfs.errors import LayerError
    from layerfs.tarlayer.read import unpack_layer
    out = {}
    for key in ("markers", "device"):
        dest = Path(sys.argv[1]) / key
        dest.mkdir()
        data = open(Path(sys.argv[1]) / (key + ".tar"), "rb").read()
        try:
            stats = unpack_layer(io.BytesIO(data), dest)
            listing = [(str(p.relative_to(dest)), oct(p.lstat().st_mode)) for p in dest.rglob("*")]
            opaque = [str(p.relative_to(dest)) for p in dest.rglob("*")
                      if p.is_dir() and "user.overlay.opaque" in os.listxattr(p)]
            name = "user.containers.override_stat"
            overrides = {str(p.relative_to(dest)): os.getxattr(p, name).decode()
                         for p in [dest, *dest.rglob("*")]
                         if name in os.listxattr(p, follow_symlinks=False)}
            out[key] = {"listing": sorted(listing), "opaque": opaque, "overrides": overrides,
                        "markers_kept": stats.markers_kept, "dropped": list(stats.dropped)}
        except LayerError as exc:
            out[key] = {"error": str(exc)}
    print(json.dumps(out))
    """
)


@needs_root
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv not installed")
def test_rootless_writes_the_user_overlay_format_and_refuses_devices(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    work = Path(os.path.realpath(tmp_path_factory.mktemp("rootless")))
    # nobody must reach it: open up the chain of private pytest dirs for this one test dir.
    for d in [work, *work.parents]:
        if d == Path("/tmp") or d == Path("/"):
            break
        os.chmod(d, os.stat(d).st_mode | 0o711)
    os.chown(work, 65534, 65534)
    (work / "markers.tar").write_bytes(
        make_tar(file("d/.wh..wh..opq"), file("d/.wh.gone"), file("d/x", b"x", uid=1000))
    )
    (work / "device.tar").write_bytes(make_tar(device("dev/null", tarfile.CHRTYPE, 1, 3)))
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            sys.executable,
            "-c",
            ROOTLESS_SCRIPT,
            str(work),
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    out = json.loads(result.stdout)
    listing = dict(out["markers"]["listing"])
    # trusted.* needs CAP_SYS_ADMIN: opacity goes to user.overlay.opaque (the kernel's
    # userxattr form), which fuse-overlayfs reads too
    assert out["markers"]["opaque"] == ["d"]
    # Linux >= 5.8 lets anyone make the 0/0 whiteout device; older kernels keep the marker.
    gone = listing.pop("d/gone", None)
    assert gone == oct(stat.S_IFCHR) or listing.pop("d/.wh.gone") == oct(0o100644)
    assert sorted(listing) == ["d", "d/x"]
    assert out["markers"]["markers_kept"] is (gone is None)
    # owners that cannot be given: kept in containers-storage's override xattr, as fuse-overlayfs
    # reads it (the layer root says so), so nothing is reported dropped
    assert out["markers"]["dropped"] == []
    assert out["markers"]["overrides"] == {".": "0:0:0755", "d": "0:0:0755", "d/x": "1000:0:0644"}
    assert out["device"]["error"] == (
        "layer: dev/null: cannot create a device node: not permitted (needs root)"
    )


# -- real images ----------------------------------------------------------------------------------


def _tree(root: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything `tar -xp` promises to keep, per path; hard links by group."""
    rows: dict[bytes, tuple[object, ...]] = {}
    inodes: dict[int, list[bytes]] = {}
    hashes: dict[int, str] = {}  # per inode: busybox has 400 names for one binary
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [b"", *dirnames, *filenames] if dirpath == base else [*dirnames, *filenames]:
            path = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            extra: object = None
            if stat.S_ISREG(st.st_mode):
                if st.st_ino not in hashes:
                    with open(path, "rb") as f:
                        hashes[st.st_ino] = hashlib.file_digest(f, "sha256").hexdigest()
                extra = hashes[st.st_ino]
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                extra = st.st_rdev
            xattrs = tuple(
                sorted(
                    (n, os.getxattr(path, n, follow_symlinks=False))
                    for n in os.listxattr(path, follow_symlinks=False)
                )
            )
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None
            rows[rel] = (st.st_mode, st.st_uid, st.st_gid, size, int(st.st_mtime), extra, xattrs)
    for group in inodes.values():
        for rel in group:
            rows[rel] += (tuple(sorted(group)),)
    return rows


def _compare_with_gnu_tar(tarball: Path, dest: Path, tmp_path: Path) -> None:
    reference = tmp_path / "gnu-tar"
    reference.mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            tarball,
            "-C",
            reference,
        ],
        check=True,
    )
    ours, theirs = _tree(dest), _tree(reference)
    assert sorted(ours) == sorted(theirs)
    for path in ours:
        assert ours[path] == theirs[path], path


needs_images = pytest.mark.skipif(not IMAGES.is_dir(), reason=f"no test images at {IMAGES}")


@needs_images
@needs_root
@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_alpine_minirootfs_matches_gnu_tar(layer: Layer, tmp_path: Path) -> None:
    if not ALPINE.exists():
        pytest.skip(f"{ALPINE} is absent")
    with open(ALPINE, "rb") as f:
        stats = unpack_layer(f, layer.dest)
    assert stats.entries == 518
    with gzip.open(ALPINE) as f:
        assert stats.diff_id == "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    _compare_with_gnu_tar(ALPINE, layer.dest, tmp_path)


def _busybox_layer() -> tuple[Path, str]:
    blobs = BUSYBOX / "blobs" / "sha256"
    if not blobs.is_dir():
        pytest.skip(f"{BUSYBOX} is absent")
    index = json.loads((BUSYBOX / "index.json").read_bytes())
    manifest = json.loads((blobs / index["manifests"][0]["digest"].split(":")[1]).read_bytes())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_bytes())
    largest = max(blobs.iterdir(), key=lambda p: p.stat().st_size)
    assert f"sha256:{largest.name}" == manifest["layers"][0]["digest"]
    return largest, config["rootfs"]["diff_ids"][0]


@needs_images
def test_busybox_layer_diff_id_matches_its_config(layer: Layer) -> None:
    blob, diff_id = _busybox_layer()
    with open(blob, "rb") as f:
        stats = unpack_layer(f, layer.dest)
    assert stats.diff_id == diff_id
    assert stats.hardlinks > 300  # busybox applets are hard links to one binary
    assert os.lstat(layer / "bin/sh").st_ino == os.lstat(layer / "bin/busybox").st_ino


@needs_images
@needs_root
@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar not installed")
def test_busybox_layer_matches_gnu_tar(layer: Layer, tmp_path: Path) -> None:
    blob, _ = _busybox_layer()
    with open(blob, "rb") as f:
        unpack_layer(f, layer.dest)
    _compare_with_gnu_tar(blob, layer.dest, tmp_path)
