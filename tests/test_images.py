"""Acceptance tests of the image store, through the real `layerfs` command and real mounts.

Images come from the places users get them: a rootfs tarball (`import`), OCI layouts and
archives written by umoci and by these tests, docker-save archives written by skopeo and by
these tests, and the official busybox OCI layouts. Each mounted image is compared with
`umoci unpack` of the same image: paths, types, modes, owners, sizes, contents, symlink
targets, device numbers and xattrs (tests/treecmp.py), and hard-link groups.

Needs root (mount, chroot, umoci unpack without --rootless); skipped otherwise.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import signal
import subprocess
import tarfile
from typing import TYPE_CHECKING

import pytest

from tests import imagetools as it
from tests.imagetools import (
    Store,
    device,
    directory,
    fifo,
    file,
    hardlink,
    make_tar,
    opaque,
    symlink,
    whiteout,
)
from tests.treecmp import snapshot

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, chroot, umoci")

BUSYBOX_MUSL = it.IMAGES / "busybox-1.38.0-musl-amd64-oci"
BUSYBOX_GLIBC = it.IMAGES / "busybox-1.38.0-glibc-amd64-oci"
BUSYBOX_MUSL_ID = "sha256:654fc8fd836e35f4a64586bddf8f59b9029b48cf80f520834c6c98ca8ab5def9"
BUSYBOX_MUSL_MANIFEST = "sha256:a34ce92094b7b100a98fbd21411a92825f6827b1bc5f6918c253516c90556998"


@pytest.fixture
def busybox_tar(tmp_path: Path) -> Path:
    work = tmp_path / "bbsrc"
    work.mkdir()
    return it.busybox_tarball(work)


def table(text: str) -> tuple[list[str], list[list[str]]]:
    """A docker-style table: columns are separated by two spaces or more."""
    lines = text.splitlines()
    split = [re.split(r" {2,}", line.strip()) for line in lines]
    return split[0], split[1:]


# -- busybox root: import, and a peer's OCI image loaded three ways ------------------------------


def test_imported_busybox_root_mounts_as_umoci_unpacks_its_saved_image(
    store: Store, busybox_tar: Path, tmp_path: Path
) -> None:
    image_id = store.ok("import", str(busybox_tar), "bb:imported").strip()
    doc = store.inspect("bb:imported")
    assert doc["Id"] == image_id
    assert doc["RootFS"]["Layers"] == [it.sha256_file(busybox_tar)]  # diff_id: sha256 of the tar
    # The oracle: umoci unpacks what `save` wrote (an OCI layout in a tar).
    saved = tmp_path / "saved.tar"
    store.ok("save", "-o", str(saved), "bb:imported")
    layout = tmp_path / "saved-layout"
    layout.mkdir()
    it.run(["tar", "-C", str(layout), "-xf", str(saved)])
    oracle = it.umoci_unpack(layout, "imported", tmp_path / "bundle")
    with store.mounted("bb:imported", tmp_path / "mnt") as mnt:
        it.assert_same_tree(oracle, mnt)
        it.assert_same_tree(tmp_path / "bbsrc" / "busybox-rootfs", mnt)
        it.chroot_echo(mnt)
        cap = mnt / "usr" / "sbin" / "cap-tool"
        assert os.getxattr(cap, "security.capability") == it.CAP_NET_RAW
        assert os.getxattr(mnt / "usr" / "share" / "doc" / "README", "user.note") == b"kept"
        assert (mnt / "usr" / "sbin" / "suid-tool").stat().st_mode & 0o7777 == 0o4755


@pytest.fixture
def busybox_layout(busybox_tar: Path, tmp_path: Path) -> Path:
    """A one-layer OCI image made by umoci from the busybox root, tagged `t`."""
    layout = tmp_path / "umoci-layout"
    it.umoci_image_from_rootfs(busybox_tar, layout, "t", tmp_path / "umoci-work")
    return layout


@pytest.mark.parametrize("form", ["oci-dir", "oci-archive", "docker-archive"])
def test_peer_made_busybox_image_loads_and_mounts_as_umoci_unpacks_it(
    store: Store, busybox_layout: Path, tmp_path: Path, form: str
) -> None:
    layout = busybox_layout
    manifest_digest = it.layout_manifest(layout, "t")["digest"]
    if form == "oci-dir":
        source = layout
    elif form == "oci-archive":
        source = it.oci_archive(layout, tmp_path / "oci.tar")
    else:
        source = it.docker_archive_from_layout(layout, "t", tmp_path / "docker.tar", "bb:t")
    out = store.ok("load", "-i", str(source), "--repository", "bb")
    assert out == "Loaded image: bb:t\n"
    doc = store.inspect("bb:t")
    assert doc["Id"] == it.layout_config_digest(layout, "t")
    if form != "docker-archive":  # skopeo writes a manifest of its own into docker archives
        assert doc["Manifest"]["Digest"] == manifest_digest
    oracle = it.umoci_unpack(layout, "t", tmp_path / "bundle")
    with store.mounted("bb:t", tmp_path / "mnt") as mnt:
        it.assert_same_tree(oracle, mnt)
        it.chroot_echo(mnt)


def test_loading_one_image_through_two_manifests_keeps_every_tag(
    store: Store, busybox_layout: Path, tmp_path: Path
) -> None:
    store.ok("load", "-i", str(busybox_layout), "--repository", "oci")
    docker = it.docker_archive_from_layout(busybox_layout, "t", tmp_path / "d.tar", "dock:t")
    store.ok("load", "-i", str(docker))
    image_id = it.layout_config_digest(busybox_layout, "t")
    assert store.image_id("dock:t") == image_id
    assert store.image_id("oci:t") == image_id
    assert {(r["Repository"], r["Tag"]) for r in store.images_json()} == {
        ("oci", "t"), ("dock", "t")}


# -- a three-layer image: whiteouts, opaque dirs, a file replaced by a directory and back ---------


def three_layers() -> list[bytes]:
    xattr = {"SCHILY.xattr.user.origin": "layer1"}
    base = make_tar(
        directory("etc"),
        file("etc/keep", b"kept\n"),
        file("etc/gone", b"deleted in layer 2\n"),
        file("etc/shadow", b"secret\n", mode=0o640, gid=42),
        directory("opq"),
        file("opq/a", b"a"),
        directory("opq/sub"),
        file("opq/sub/b", b"b"),
        directory("deldir"),
        file("deldir/old", b"old"),
        file("flip", b"a file in layer 1\n"),
        directory("flop"),
        file("flop/old", b"a child in layer 1"),
        directory("dev"),
        device("dev/null", tarfile.CHRTYPE, 1, 3),
        device("dev/sda", tarfile.BLKTYPE, 8, 0, mode=0o660),
        fifo("dev/initctl", mode=0o600),
        directory("bin"),
        file("bin/tool", b"#!/bin/sh\n", mode=0o4755),
        symlink("bin/sh", "tool"),
        symlink("dangling", "/nowhere/at/all"),
        directory("home"),
        directory("home/user", mode=0o700, uid=1000, gid=1000),
        file("home/user/.profile", b"export A=b\n", uid=1000, gid=1000),
        file("xattr", b"with an xattr", pax_headers=xattr),
        directory("tmp", mode=0o1777),
    )
    middle = make_tar(
        whiteout("etc/gone"),
        file("etc/new", b"added in layer 2\n"),
        opaque("opq"),
        file("opq/fresh", b"only this remains"),
        whiteout("deldir"),
        directory("flip"),  # a file replaced by a directory
        file("flip/inside", b"flip is a directory in layer 2"),
        file("flop", b"a directory replaced by a file\n"),
        file("bin/tool", b"#!/bin/sh\necho v2\n", mode=0o4755),
        whiteout("dangling"),
    )
    top = make_tar(
        file("flip", b"a file again in layer 3\n"),  # ... and back
        directory("flop"),  # and the other way round
        file("flop/new", b"new child"),
        directory("deldir"),  # re-created after its whiteout: its old content stays hidden
        file("deldir/new", b"new"),
        directory("links"),
        file("links/a", b"linked"),
        hardlink("links/b", "links/a"),
        whiteout("etc/keep"),
        file("etc/keep", b"whiteout and file in one layer: the file stays\n"),
        directory("home/user", mode=0o700, uid=1000, gid=1000),
        opaque("home/user"),
    )
    return [base, middle, top]


def test_three_layer_image_mounts_as_umoci_unpacks_it(store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    built = it.write_oci_layout(layout, "three", list(three_layers()))
    assert store.ok("load", "-i", str(layout), "--repository", "multi") == \
        "Loaded image: multi:three\n"
    doc = store.inspect("multi:three")
    assert doc["Id"] == built.config_digest
    assert doc["RootFS"]["Layers"] == list(built.diff_ids)
    assert doc["Manifest"]["Digest"] == built.manifest_digest
    assert store.layer_dirs() == {d.removeprefix("sha256:") for d in built.diff_ids}
    oracle = it.umoci_unpack(layout, "three", tmp_path / "bundle")
    with store.mounted("multi:three", tmp_path / "mnt") as mnt:
        it.assert_same_tree(oracle, mnt)
        # What the layers say, independently of umoci:
        assert sorted(os.listdir(mnt / "opq")) == ["fresh"]
        assert sorted(os.listdir(mnt / "deldir")) == ["new"]
        assert sorted(os.listdir(mnt / "flop")) == ["new"]
        assert sorted(os.listdir(mnt / "home" / "user")) == []
        assert (mnt / "flip").read_bytes() == b"a file again in layer 3\n"
        assert not (mnt / "etc" / "gone").exists()
        assert not os.path.lexists(mnt / "dangling")
        assert (mnt / "etc" / "keep").read_bytes().startswith(b"whiteout and file")
        assert (mnt / "bin" / "tool").stat().st_mode & 0o7777 == 0o4755
        assert os.getxattr(mnt / "xattr", "user.origin") == b"layer1"
        assert (mnt / "links" / "a").stat().st_ino == (mnt / "links" / "b").stat().st_ino
        assert os.major((mnt / "dev" / "sda").stat().st_rdev) == 8


@pytest.mark.xfail(strict=True, reason="a directory that a layer names only as the parent of "
                   "its entries (no entry of its own) is made 0755 root:root in that layer's "
                   "dir and hides the lower directory's mode and owner; umoci (and containerd, "
                   "which applies a layer on top of its parents) keep the lower metadata")
def test_implied_parent_dir_keeps_the_lower_dirs_metadata(store: Store, tmp_path: Path) -> None:
    base = make_tar(directory("home"), directory("home/user", mode=0o700, uid=1000, gid=1000),
                    file("home/user/old", b"old", uid=1000))
    top = make_tar(file("home/user/new", b"new"), opaque("home/user"))
    layout = tmp_path / "layout"
    it.write_oci_layout(layout, "implied", [base, top])
    store.ok("load", "-i", str(layout), "--repository", "implied")
    oracle = it.umoci_unpack(layout, "implied", tmp_path / "bundle")
    assert sorted(os.listdir(oracle / "home" / "user")) == ["new"]
    with store.mounted("implied:implied", tmp_path / "mnt") as mnt:
        it.assert_same_tree(oracle, mnt)


# -- the official busybox images ----------------------------------------------------------------


@pytest.mark.parametrize("layout", [BUSYBOX_MUSL, BUSYBOX_GLIBC], ids=["musl", "glibc"])
def test_official_busybox_loads_with_its_ids_mounts_and_runs(
    store: Store, tmp_path: Path, layout: Path
) -> None:
    if not layout.is_dir():
        pytest.skip(f"{layout}: the official busybox layouts are not here (LAYERFS_TEST_IMAGES)")
    entry = json.loads((layout / "index.json").read_text())["manifests"][0]
    name = entry["annotations"][it.REF_NAME]
    manifest = json.loads(it.layout_blob(layout, entry["digest"]))
    assert store.ok("load", "-i", str(layout)) == f"Loaded image: {name}\n"
    doc = store.inspect(name)
    assert doc["Id"] == manifest["config"]["digest"]
    assert doc["Manifest"]["Digest"] == entry["digest"]
    if layout == BUSYBOX_MUSL:
        assert (doc["Id"], entry["digest"]) == (BUSYBOX_MUSL_ID, BUSYBOX_MUSL_MANIFEST)
    [row] = store.images_json()
    assert (row["Repository"], row["Tag"], row["ID"]) == ("busybox", name.split(":")[1],
                                                          doc["Id"])
    oracle = it.umoci_unpack(layout, name, tmp_path / "bundle")
    with store.mounted(name, tmp_path / "mnt") as mnt:
        it.chroot_echo(mnt)
        it.assert_same_tree(oracle, mnt)


# -- sharing: one copy of a common base --------------------------------------------------------


def test_images_with_a_common_base_keep_one_copy_of_it(
    store: Store, busybox_tar: Path, tmp_path: Path
) -> None:
    base = busybox_tar.read_bytes()
    top_a = make_tar(directory("etc"), file("etc/a", b"a" * 100_000))
    top_b = make_tar(directory("etc"), file("etc/b", b"b" * 100_000))
    top_c = make_tar(directory("etc"), file("etc/c", b"c" * 100_000))
    layout = tmp_path / "layout"
    a = it.write_oci_layout(layout, "a", [base, top_a])
    b = it.write_oci_layout(layout, "b", [base, top_b])
    store.ok("load", "-i", str(layout), "--repository", "shared")
    c = it.write_docker_archive(tmp_path / "c.tar", ["shared:c"], [base, top_c])
    store.ok("load", "-i", str(tmp_path / "c.tar"))
    imported = store.ok("import", str(busybox_tar), "shared:base").strip()
    assert store.image_id("shared:base") == imported
    diff_ids = {d for image in (a, b, c) for d in image.diff_ids}
    assert len(diff_ids) == 4  # the base once, three tops
    assert store.layer_dirs() == {d.removeprefix("sha256:") for d in diff_ids}
    assert sorted(p.name for p in (store.root / "layers").iterdir()
                  if p.name != "empty") == sorted(store.layer_dirs())
    header, rows = table(store.ok("system", "df"))
    assert header[:3] == ["TYPE", "TOTAL", "SIZE"]
    by_type = {row[0]: row for row in rows}
    assert by_type["Images"][1] == "4"
    assert by_type["Layers"][1] == "4"
    assert not by_type["Images"][3].endswith(" 0B")  # something is shared
    # rmi keeps what another image uses: a's top goes, the base stays.
    store.ok("rmi", "shared:a", "shared:base")
    assert store.layer_dirs() == {d.removeprefix("sha256:") for d in diff_ids
                                  if d != a.diff_ids[1]}
    # Every image sees the base; each sees its own top only.
    for tag, own in (("b", "etc/b"), ("c", "etc/c")):
        with store.mounted(f"shared:{tag}", tmp_path / f"mnt-{tag}") as mnt:
            assert sorted(os.listdir(mnt / "etc")) == sorted(
                ["group", "group-", "group.lnk", "passwd", own.split("/")[1]])
            it.chroot_echo(mnt)


def test_concurrent_loads_of_images_with_a_common_base_share_it(
    store: Store, busybox_tar: Path, tmp_path: Path
) -> None:
    base = [busybox_tar.read_bytes(), make_tar(file("big", os.urandom(20 << 20)))]
    a = it.write_oci_layout(tmp_path / "A", "a", [*base, make_tar(file("a", b"a"))])
    b = it.write_oci_layout(tmp_path / "B", "b", [*base, make_tar(file("b", b"b"))])
    procs = [subprocess.Popen([str(it.LAYERFS), "--root", str(store.root), "load", "-i",
                               str(tmp_path / name), "--repository", "conc"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name in ("A", "B")]
    for proc in procs:
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert store.layer_dirs() == {d.removeprefix("sha256:") for d in {*a.diff_ids, *b.diff_ids}}
    assert len(store.layer_dirs()) == 4
    assert it.staged(store) == []
    assert {(r["Tag"], r["ID"]) for r in store.images_json()} == {
        ("a", a.config_digest), ("b", b.config_digest)}


# -- save and load ------------------------------------------------------------------------------


def test_save_then_load_into_a_fresh_store_keeps_ids_and_digests(
    store: Store, busybox_tar: Path, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    built = it.write_oci_layout(layout, "three", list(three_layers()))
    store.ok("load", "-i", str(layout), "--repository", "multi")
    store.ok("import", str(busybox_tar), "bb:imported")
    before = {name: store.inspect(name) for name in ("multi:three", "bb:imported")}
    archive = tmp_path / "saved.tar"
    store.ok("save", "-o", str(archive), "multi:three", "bb:imported")
    fresh = Store(tmp_path / "fresh")
    out = fresh.ok("load", "-i", str(archive))
    assert sorted(out.splitlines()) == ["Loaded image: bb:imported", "Loaded image: multi:three"]
    for name, doc in before.items():
        again = fresh.inspect(name)
        assert again["Id"] == doc["Id"]
        assert again["Manifest"]["Digest"] == doc["Manifest"]["Digest"]
        assert again["RootFS"] == doc["RootFS"]
    assert before["multi:three"]["Manifest"]["Digest"] == built.manifest_digest
    assert fresh.layer_dirs() == store.layer_dirs()
    assert fresh.blob_names() == store.blob_names()


def test_saved_archive_is_read_by_skopeo_as_docker_and_oci_archive(
    store: Store, busybox_tar: Path, tmp_path: Path
) -> None:
    store.ok("import", str(busybox_tar), "bb:imported")
    doc = store.inspect("bb:imported")
    archive = tmp_path / "saved.tar"
    store.ok("save", "-o", str(archive), "bb:imported")
    as_docker = json.loads(
        it.skopeo("inspect", f"docker-archive:{archive}:bb:imported").stdout)
    as_oci = json.loads(it.skopeo("inspect", f"oci-archive:{archive}:imported").stdout)
    assert as_oci["Digest"] == doc["Manifest"]["Digest"]
    for seen in (as_docker, as_oci):
        assert seen["Architecture"] == "amd64" and seen["Os"] == "linux"
        assert len(seen["Layers"]) == 1
    config = json.loads(it.skopeo("inspect", "--config",
                                  f"oci-archive:{archive}:imported").stdout)
    assert config["rootfs"]["diff_ids"] == doc["RootFS"]["Layers"]


# -- the image verbs, as docker's ---------------------------------------------------------------


def test_images_columns_tag_and_rmi_as_docker(
    store: Store, busybox_tar: Path, tmp_path: Path
) -> None:
    image_id = store.ok("import", str(busybox_tar), "bb:1").strip()
    other = store.ok("import", "-", "other", input=make_tar(file("x", b"x"))).strip()
    store.ok("tag", "bb:1", "example.com/team/bb:v2")
    header, rows = table(store.ok("images"))
    assert header == ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]
    short = image_id.removeprefix("sha256:")[:12]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted([
        ("bb", "1", short), ("example.com/team/bb", "v2", short),
        ("other", "latest", other.removeprefix("sha256:")[:12])])
    assert all(re.fullmatch(r"[0-9.]+(B|kB|MB)", r[4]) for r in rows), rows
    header, rows = table(store.ok("images", "--digests"))
    assert header == ["REPOSITORY", "TAG", "DIGEST", "IMAGE ID", "CREATED", "SIZE"]
    assert sorted(store.ok("images", "-q").split()) == sorted(
        {short, other.removeprefix("sha256:")[:12]})
    bb_layer = store.inspect("bb:1")["RootFS"]["Layers"][0].removeprefix("sha256:")
    # rmi by id of an image with two names is refused, as docker refuses it
    assert "2 repositories" in store.fails("rmi", short)
    # rmi of one of two tags untags only
    assert store.ok("rmi", "example.com/team/bb:v2") == "Untagged: example.com/team/bb:v2\n"
    assert store.image_id("bb:1") == image_id
    assert bb_layer in store.layer_dirs()
    # rmi of the last tag deletes the image, its blobs and its layer; the other image stays
    assert store.ok("rmi", "bb:1") == f"Untagged: bb:1\nDeleted: {image_id}\n"
    assert bb_layer not in store.layer_dirs()
    assert image_id.removeprefix("sha256:") not in store.blob_names()
    assert [r["Repository"] for r in store.images_json("-a")] == ["other"]
    assert store.layer_dirs() == {
        store.inspect("other")["RootFS"]["Layers"][0].removeprefix("sha256:")}
    assert "bb:1" in store.fails("rmi", "bb:1")


def test_rmi_of_an_image_a_container_uses_needs_force(
    store: Store, busybox_tar: Path, tmp_path: Path
) -> None:
    store.ok("import", str(busybox_tar), "bb:1")
    layer = store.inspect("bb:1")["RootFS"]["Layers"][0].removeprefix("sha256:")
    with store.mounted("bb:1", tmp_path / "mnt", "--name", "box"):
        pass
    message = store.fails("rmi", "bb:1")
    assert "bb:1" in message and "container" in message
    assert store.image_id("bb:1")
    assert "Untagged: bb:1" in store.ok("rmi", "-f", "bb:1")
    assert store.images_json() == []
    # The container still has its image's layers: it mounts again.
    with store.mounted("box", tmp_path / "mnt") as mnt:
        it.chroot_echo(mnt)
    store.ok("rm", "box")
    store.ok("system", "prune")
    assert layer not in store.layer_dirs()
    assert store.images_json("-a") == []


def test_load_refuses_an_invalid_repository(store: Store, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    it.write_oci_layout(layout, "example.com/full/name:v1", [make_tar(file("x", b"x"))])
    message = store.fails("load", "-i", str(layout), "--repository", "Not/Valid")
    assert "Not/Valid" in message
    assert store.images_json("-a") == []


def test_umount_takes_a_mountpoint_relative_to_the_cwd(
    store: Store, tmp_path: Path
) -> None:
    store.ok("import", "-", "x:1", input=make_tar(file("x", b"x")))
    with store.mounted("x:1", tmp_path / "mnt"):
        store.ok("umount", "./mnt", cwd=tmp_path)
        assert not it.is_mounted(tmp_path / "mnt")


def test_umount_takes_a_relative_path_with_a_slash(store: Store, tmp_path: Path) -> None:
    store.ok("import", "-", "x:1", input=make_tar(file("x", b"x")))
    with store.mounted("x:1", tmp_path / "sub" / "mnt"):
        store.ok("umount", "sub/mnt", cwd=tmp_path)
        assert not it.is_mounted(tmp_path / "sub" / "mnt")


INVALID: list[tuple[list[str], str]] = [
    (["tag", "bb:1", "Bad/Name"], "Bad/Name"),
    (["tag", "bb:1", "bb:"], "bb:"),
    (["tag", "bb:1", "bb@sha256:1234"], "bb@sha256:1234"),
    (["tag", "no-such:image", "x:y"], "no-such:image"),
    (["rmi", "UPPER"], "UPPER"),
    (["rmi", "a b"], "a b"),
    (["inspect", "bb::1"], "bb::1"),
    (["history", "bb@sha256:zz"], "bb@sha256:zz"),
    (["mount", "bb:1:2", "MNT"], "bb:1:2"),
    (["import", "TAR", "Bad:Tag"], "Bad:Tag"),
    (["import", "TAR", "bb:" + "t" * 129], "t" * 129),
    (["save", "-o", "OUT", "nothere"], "nothere"),
]


def test_invalid_references_are_refused_with_the_reason(store: Store, tmp_path: Path) -> None:
    """Each refusal: exit code != 0, one line on stderr naming the reference, store as it was."""
    tar = tmp_path / "small.tar"
    tar.write_bytes(make_tar(file("x", b"x")))
    store.ok("import", str(tar), "bb:1")
    before = store.listing()
    (tmp_path / "mnt").mkdir()
    paths = {"MNT": str(tmp_path / "mnt"), "TAR": str(tar), "OUT": str(tmp_path / "o")}
    problems = []
    for argv, named in INVALID:
        try:
            message = store.fails(*[paths.get(a, a) for a in argv])
            assert named in message, f"{message!r} does not name {named!r}"
            assert store.listing() == before, "the store changed"
            assert not it.is_mounted(tmp_path / "mnt") and not (tmp_path / "o").exists()
        except AssertionError as exc:
            problems.append(f"{argv}: {exc}")
    assert not problems, "\n".join(problems)


def test_history_and_inspect(store: Store, busybox_tar: Path, tmp_path: Path) -> None:
    image_id = store.ok("import", "-m", "a busybox root", "-c", 'CMD ["/bin/sh"]',
                        "-c", "ENV A=b", str(busybox_tar), "bb:1").strip()
    doc = store.inspect("bb:1")
    assert doc["Config"]["Cmd"] == ["/bin/sh"]
    assert doc["Config"]["Env"] == ["A=b"]
    assert doc["Comment"] == "a busybox root"
    assert doc["RepoTags"] == ["bb:1"]
    assert doc["RepoDigests"] == [f"bb@{doc['Manifest']['Digest']}"]
    assert (doc["Architecture"], doc["Os"]) == ("amd64", "linux")
    header, rows = table(store.ok("history", "bb:1"))
    assert header == ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]
    assert len(rows) == 1
    assert rows[0][0] == image_id.removeprefix("sha256:")[:12]
    assert rows[0][-1] == "a busybox root"
    layout = tmp_path / "layout"
    it.write_oci_layout(layout, "three", list(three_layers()))
    store.ok("load", "-i", str(layout), "--repository", "multi")
    header, rows = table(store.ok("history", "multi:three"))
    assert [r[0] for r in rows][1:] == ["<missing>", "<missing>"]
    assert [r[2] for r in rows] == ["layer 2", "layer 1", "layer 0"]
    assert store.inspect(image_id)["Id"] == image_id  # by id
    assert store.inspect(image_id.removeprefix("sha256:")[:12])["Id"] == image_id  # by prefix
    assert store.inspect(f"bb@{doc['Manifest']['Digest']}")["Id"] == image_id  # by digest


def test_mount_scratch_gives_an_empty_root(store: Store, tmp_path: Path) -> None:
    with store.mounted("scratch", tmp_path / "mnt") as mnt:
        assert os.listdir(mnt) == []
        (mnt / "new").write_text("copy-on-write works on scratch too")
    assert store.layer_dirs() == set()


# -- hostile tarballs through `layerfs import` --------------------------------------------------


def gzip_cut(data: bytes) -> bytes:
    whole = gzip.compress(data, mtime=0)
    return whole[: len(whole) // 2]


def absurd_size() -> bytes:
    info = tarfile.TarInfo("huge")
    info.size = 1 << 50
    return it.raw_header(info) + b"\0" * 4096


HOSTILE: dict[str, tuple[Callable[[Path], bytes], str]] = {
    # case: (the tarball, given the sentinel dir outside the store; what the refusal says)
    "parent traversal": (lambda out: make_tar(file("../outside/pwned", b"x")),
                         "../outside/pwned: '..' component"),
    "deep traversal": (lambda out: make_tar(directory("a"), file("a/../../outside/pwned", b"x")),
                       "'..' component"),
    "absolute path": (lambda out: make_tar(file(str(out / "pwned"), b"x")), "absolute path"),
    "write through a planted symlink": (
        lambda out: make_tar(symlink("link", str(out)), file("link/pwned", b"x")),
        "link is a symlink"),
    "write through a relative symlink": (
        lambda out: make_tar(directory("d"), symlink("d/up", "../../../../../../../.." + str(out)),
                             file("d/up/pwned", b"x")),
        "d/up is a symlink"),
    "hard link to outside": (lambda out: make_tar(hardlink("h", str(out / "sentinel"))),
                             "h: absolute path"),
    "hard link up and out": (lambda out: make_tar(hardlink("h", "../outside/sentinel")),
                             "h: '..' component"),
    "hard link through a symlink": (
        lambda out: make_tar(symlink("s", str(out)), hardlink("h", "s/sentinel")),
        "s is a symlink"),
    "lone .wh.": (lambda out: make_tar(file(".wh.")), "whiteout that names nothing"),
    "whiteout of ..": (lambda out: make_tar(directory("d"), file("d/.wh...")),
                       "whiteout that names nothing"),
    "whiteout of .. at the top": (lambda out: make_tar(file(".wh...")),
                                  "whiteout that names nothing"),
    "absurd size": (lambda out: absurd_size(), "huge: size"),
    "truncated gzip": (lambda out: gzip_cut(make_tar(file("big", os.urandom(200_000)))),
                       "truncated"),
    "file under a file": (lambda out: make_tar(file("f", b"x"), file("f/x", b"y")),
                          "f is not a directory"),
    "not a tar": (lambda out: b"this is not a tar archive at all\n" * 40, "malformed tar"),
}


def store_untouched(store: Store, tmp_path: Path) -> Callable[[], None]:
    """A check that nothing changed in the store and nothing in tmp_path outside it."""
    store_before = store.listing()
    outside_before = snapshot(tmp_path, skip=frozenset({"store"}))

    def check() -> None:
        assert store.listing() == store_before, "the store changed"
        assert snapshot(tmp_path, skip=frozenset({"store"})) == outside_before, \
            "something outside the store changed"
        assert it.staged(store) == [], "staging left behind"
    return check


def test_hostile_tarballs_are_refused_and_the_store_is_left_as_it_was(
    store: Store, tmp_path: Path
) -> None:
    store.ok("import", "-", "base", input=make_tar(directory("etc"), file("etc/x", b"x")))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "sentinel").write_bytes(b"keep")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    check = store_untouched(store, tmp_path)
    problems = []
    for case, (make, reason) in HOSTILE.items():
        try:
            message = store.fails("import", "-", "hostile:1", input=make(outside), cwd=cwd)
            assert reason in message, f"{message!r} does not say {reason!r}"
            check()
        except AssertionError as exc:
            problems.append(f"{case}: {exc}")
    assert [(r["Repository"], r["Tag"]) for r in store.images_json("-a")] == [("base", "latest")]
    assert (outside / "sentinel").read_bytes() == b"keep"
    assert not problems, "\n".join(problems)


def test_replacing_entries_are_contained_later_wins(store: Store, tmp_path: Path) -> None:
    outside_before = snapshot(tmp_path, skip=frozenset({"store"}))
    tar = make_tar(
        file("dup", b"one"), file("dup", b"two"),
        directory("d"), file("d/x", b"x"), file("d", b"a file where a directory was"),
        file("e", b"a file"), directory("e"), file("e/x", b"then a directory"),
        symlink("l", "/etc"), file("l", b"a file over a symlink"),
        directory("m"), symlink("m/up", str(tmp_path)), file("m/up", b"contained"),
    )
    store.ok("import", "-", "odd:1", input=tar)
    with store.mounted("odd:1", tmp_path / "mnt") as mnt:
        for name, data in {"dup": b"two", "d": b"a file where a directory was",
                           "e/x": b"then a directory", "l": b"a file over a symlink",
                           "m/up": b"contained"}.items():
            assert not (mnt / name).is_symlink()
            assert (mnt / name).read_bytes() == data
    assert snapshot(tmp_path, skip=frozenset({"store", "mnt"})) == outside_before
    assert it.staged(store) == []


def test_a_refused_import_leaves_no_staging_dir(store: Store, tmp_path: Path) -> None:
    store.fails("import", "-", input=make_tar(file("../x")))
    assert it.staged(store) == []


def test_a_command_leaves_no_staging_behind(store: Store) -> None:
    store.ok("import", "-", "x:1", input=make_tar(file("x", b"x")))
    assert os.listdir(store.root / "tmp") == []


# -- SIGKILL in the middle of import and load ---------------------------------------------------


@pytest.fixture(scope="module")
def big_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 200 MB of random files in a plain tar."""
    path = tmp_path_factory.mktemp("big") / "big.tar"
    chunk = os.urandom(4 << 20)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(50):
            data = chunk[i:] + chunk[:i]
            info = tarfile.TarInfo(f"data/file{i:02d}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def kill_when_staging(store: Store, argv: list[str], staged: Callable[[Path], bool]) -> int:
    """Start `layerfs ARGV`, SIGKILL it once `staged(ROOT/tmp/PID)` holds; its pid."""
    proc = subprocess.Popen([str(it.LAYERFS), "--root", str(store.root), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    staging = store.root / "tmp" / str(proc.pid)
    try:
        it.wait_for(lambda: proc.poll() is not None or staged(staging),
                    f"{staging} to fill", timeout=60)
        assert proc.poll() is None, f"finished before it was killed: {proc.stderr}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert staging.is_dir()  # the dead process's staging is there until the next command
    return proc.pid


def has_data(staging: Path, minimum: int = 8 << 20) -> bool:
    """The staging dir holds at least `minimum` bytes of files (the writing has begun)."""
    total = 0
    for dirpath, _dirs, files in os.walk(staging):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total >= minimum


def store_state(store: Store) -> tuple[set[str], set[str], list[tuple[str, str, str]]]:
    """Layers, blobs and images (repository, tag, id) of a store."""
    images = [(r["Repository"], r["Tag"], r["ID"]) for r in store.images_json("-a")]
    return store.layer_dirs(), store.blob_names(), images


def assert_consistent_after_kill(store: Store, pid: int,
                                 before: tuple[set[str], set[str], list[tuple[str, str, str]]],
                                 ) -> None:
    after = store_state(store)  # the next command: finds the store consistent
    assert not (store.root / "tmp" / str(pid)).exists(), "the dead process's staging is left"
    assert it.staged(store) == []
    for layer in (store.root / "layers").iterdir():  # no half-made layer
        if layer.name != "empty":
            assert (layer / "diff").is_dir() and (layer / "meta.json").is_file(), layer
    layers, blobs, images = after
    assert images == before[2]
    assert layers == before[0]
    for name in blobs - before[1]:  # a blob named before its digest was verified?
        assert it.sha256_file(store.root / "blobs" / "sha256" / name) == f"sha256:{name}"


def test_sigkill_during_import_leaves_the_store_consistent(
    store: Store, big_tar: Path, busybox_tar: Path
) -> None:
    store.ok("import", str(busybox_tar), "bb:1")
    before = store_state(store)
    pid = kill_when_staging(store, ["import", str(big_tar), "big:1"], has_data)
    assert_consistent_after_kill(store, pid, before)
    store.ok("import", "-", "small:1", input=make_tar(file("x", b"x")))  # the store works on


def unpacking(staging: Path) -> bool:
    """The layer's files are being written (the blob is copied and verified by then)."""
    return any((stage / "diff" / "data").is_dir() and any((stage / "diff" / "data").iterdir())
               for stage in staging.glob("*") if stage.is_dir())


@pytest.mark.parametrize("stage", [has_data, unpacking], ids=["copying", "unpacking"])
def test_sigkill_during_load_leaves_the_store_consistent(
    store: Store, big_tar: Path, busybox_tar: Path, tmp_path: Path,
    stage: Callable[[Path], bool],
) -> None:
    store.ok("import", str(busybox_tar), "bb:1")
    layout = tmp_path / "layout"
    base = busybox_tar.read_bytes()
    it.write_oci_layout(layout, "big", [base, big_tar], compress=False)
    before = store_state(store)
    pid = kill_when_staging(store, ["load", "-i", str(layout), "--repository", "big"], stage)
    assert_consistent_after_kill(store, pid, before)
    assert store.ok("load", "-i", str(layout), "--repository", "big") == \
        "Loaded image: big:big\n"
