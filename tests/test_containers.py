"""Containers, diff, commit and run through the `layerfs` command, on a busybox root (fast).

Every test gets its own store with the busybox image imported as `bb:base`; every mount it
makes, also those `layerfs run` makes for itself, is unmounted on the way out, and a test that
leaves one mounted fails.
"""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from typing import TYPE_CHECKING

import pytest

from tests.containertools import (
    USER_UID,
    ContainerStore,
    busybox_user_tarball,
    mounts_by_source,
)
from tests.imagetools import LAYERFS, umoci_unpack
from tests.treecmp import diff, snapshot

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

IMAGE = "bb:base"


@pytest.fixture(scope="module")
def base_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_user_tarball(tmp_path_factory.mktemp("busybox"))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, base_tar: Path) -> Path:
    """A store with the busybox image imported, copied for each test (imports cost time)."""
    root = tmp_path_factory.mktemp("template") / "store"
    ContainerStore(root).ok("import", str(base_tar), IMAGE)
    return root


@pytest.fixture
def store(tmp_path: Path, template: Path) -> Iterator[ContainerStore]:
    s = ContainerStore.copy_of(template, tmp_path / "store")
    try:
        yield s
    finally:
        s.cleanup()


def ps_rows(store: ContainerStore, *args: str) -> list[dict[str, str]]:
    """`layerfs ps` as dicts, cut at the header's column starts."""
    lines = store.ok("ps", *args).splitlines()
    header = lines[0]
    names = ["CONTAINER ID", "IMAGE", "CREATED", "MOUNTPOINT", "STATUS", "SIZE", "NAMES"]
    starts = [header.index(n) for n in names]
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


# -- mount, ps, umount, rm ------------------------------------------------------------------------


def test_two_containers_of_one_image_each_see_only_their_own_writes(
    store: ContainerStore, tmp_path: Path
) -> None:
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    id1 = store.mount(IMAGE, m1, "--name", "one")
    id2 = store.mount(IMAGE, m2, "--name", "two")
    assert id1 != id2
    (m1 / "root" / "from-one").write_text("1")
    (m2 / "root" / "from-two").write_text("2")
    with open(m1 / "etc" / "motd", "a") as f:
        f.write("one was here\n")
    (m2 / "bin" / "ls").unlink()

    assert sorted(os.listdir(m1 / "root")) == ["from-one"]
    assert sorted(os.listdir(m2 / "root")) == ["from-two"]
    assert (m1 / "etc" / "motd").read_text() == "base motd\none was here\n"
    assert (m2 / "etc" / "motd").read_text() == "base motd\n"
    assert (m1 / "bin" / "ls").is_symlink()
    assert not (m2 / "bin" / "ls").exists()

    rows = {r["NAMES"]: r for r in ps_rows(store)}
    assert set(rows) == {"one", "two"}
    assert rows["one"]["MOUNTPOINT"] == str(m1)
    assert rows["two"]["MOUNTPOINT"] == str(m2)
    assert rows["one"]["CONTAINER ID"] == id1[:12]
    assert {r["STATUS"] for r in rows.values()} == {"Mounted"}
    assert {r["IMAGE"] for r in rows.values()} == {IMAGE}
    assert set(store.diff("one")) == {"C /etc", "C /etc/motd", "C /root", "A /root/from-one"}
    assert set(store.diff("two")) == {"C /bin", "D /bin/ls", "C /root", "A /root/from-two"}

    store.ok("umount", "one")
    assert [r["NAMES"] for r in ps_rows(store)] == ["two"]
    all_rows = {r["NAMES"]: r for r in ps_rows(store, "-a")}
    assert all_rows["one"]["STATUS"] == "Unmounted"
    assert all_rows["one"]["MOUNTPOINT"] == ""
    assert store.ok("umount", "./m2", cwd=tmp_path) == ""  # by its mountpoint, relative
    assert ps_rows(store) == []

    # a container remounted elsewhere still has its own changes
    store.mount("one", tmp_path / "again")
    assert (tmp_path / "again" / "root" / "from-one").read_text() == "1"
    assert not (tmp_path / "again" / "root" / "from-two").exists()


def test_the_containers_root_has_the_images_mode_whatever_the_umask(
    store: ContainerStore, tmp_path: Path
) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    store.mounts.append(mountpoint)
    subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", str(LAYERFS), "--root",
                    str(store.root), "mount", IMAGE, str(mountpoint)], check=True,
                   capture_output=True)
    (layer,) = (store.root / "layers").iterdir()
    image_root = (layer / "diff").stat()
    root = mountpoint.stat()
    assert (stat.S_IMODE(root.st_mode), root.st_uid, root.st_gid) == (
        stat.S_IMODE(image_root.st_mode), image_root.st_uid, image_root.st_gid)
    assert stat.S_IMODE(root.st_mode) == 0o755


def test_a_scratch_container_root_is_0755_whatever_the_umask(tmp_path: Path) -> None:
    store = ContainerStore(tmp_path / "fresh")  # scratch's empty lower not made yet
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    store.mounts.append(mountpoint)
    try:
        subprocess.run(["sh", "-c", 'umask 077; exec "$@"', "sh", str(LAYERFS), "--root",
                        str(store.root), "mount", "scratch", str(mountpoint)], check=True,
                       capture_output=True)
        assert stat.S_IMODE(mountpoint.stat().st_mode) == 0o755
    finally:
        store.cleanup()


def test_rm_refuses_a_mounted_container_and_rm_f_unmounts_it(
    store: ContainerStore, tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "busy")
    line = store.fails("rm", "busy")
    assert "busy" in line
    assert os.path.ismount(mnt)
    # nor can its image go while the container exists
    assert IMAGE in store.fails("rmi", IMAGE)
    assert (mnt / "bin" / "busybox").is_file()
    assert store.ok("rm", "-f", "busy").split() == ["busy"]
    assert not os.path.ismount(mnt)
    assert ps_rows(store, "-a") == []
    assert store.container_ids() == []
    # the name is free again, and the new container starts from the image
    store.mount(IMAGE, mnt, "--name", "busy")
    assert store.diff("busy") == []
    store.ok("rm", "-f", "busy")
    store.ok("rmi", IMAGE)


def test_diff_lists_added_changed_deleted_like_docker(
    store: ContainerStore, tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "d")
    (mnt / "root" / "new").write_text("new")
    with open(mnt / "etc" / "motd", "a") as f:
        f.write("more\n")
    (mnt / "bin" / "ls").unlink()
    (mnt / "new" / "sub").mkdir(parents=True)
    (mnt / "new" / "sub" / "f").write_text("f")
    os.chmod(mnt / "usr" / "share" / "doc" / "README", 0o600)  # metadata only
    (mnt / "tmp" / "scratch").write_text("gone again")  # made and removed: no trace
    (mnt / "tmp" / "scratch").unlink()

    lines = store.diff("d")
    assert lines == sorted(lines, key=lambda ln: ln[2:]), "sorted by path, parents first"
    assert set(lines) == {
        "C /bin", "D /bin/ls",
        "C /etc", "C /etc/motd",
        "A /new", "A /new/sub", "A /new/sub/f",
        "C /root", "A /root/new",
        "C /tmp",
        "C /usr", "C /usr/share", "C /usr/share/doc", "C /usr/share/doc/README",
    }


def test_diff_of_a_replaced_directory(store: ContainerStore, tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "r")
    for name in os.listdir(mnt / "opt" / "data"):
        (mnt / "opt" / "data" / name).unlink()
    (mnt / "opt" / "data").rmdir()
    (mnt / "opt" / "data").mkdir()
    (mnt / "opt" / "data" / "fresh").write_text("fresh")
    assert os.listdir(mnt / "opt" / "data") == ["fresh"]

    lines = store.diff("r")
    # Docker's overlay2 prints a replaced (opaque) directory as D and then its new content as A;
    # layerfs may call it C. Either way: it was not added, the new file was, and the old files,
    # hidden by the opaque directory, are not listed as still there.
    assert "C /opt" in lines
    assert "A /opt/data/fresh" in lines
    assert ("C /opt/data" in lines) != ("D /opt/data" in lines), lines
    assert not [ln for ln in lines if ln[0] in "AC" and "/opt/data/old" in ln]
    assert not [ln for ln in lines if not ln.startswith(("C /opt", "D /opt", "A /opt"))]


# -- commit ---------------------------------------------------------------------------------------


def make_changes(mnt: Path) -> None:
    """One of each kind of change a layer must carry."""
    (mnt / "root" / "h1").write_text("linked\n")
    os.link(mnt / "root" / "h1", mnt / "root" / "h2")  # a new hard-linked pair
    with open(mnt / "etc" / "group.lnk", "a") as f:  # one name of a lower hard-link group
        f.write("extra:x:77:\n")
    os.chmod(mnt / "usr" / "share" / "doc" / "README", 0o600)  # metadata only
    (mnt / "bin" / "ls").unlink()
    for name in os.listdir(mnt / "opt" / "data"):
        (mnt / "opt" / "data" / name).unlink()
    (mnt / "opt" / "data").rmdir()
    (mnt / "opt" / "data").mkdir()
    (mnt / "opt" / "data" / "fresh").write_text("fresh\n")
    (mnt / "tmp" / "scratch").write_text("gone again")
    (mnt / "tmp" / "scratch").unlink()


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_commit_twice_gives_the_same_layer(
    store: ContainerStore, tmp_path: Path, compression: str
) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "c")
    make_changes(mnt)
    first = store.ok("commit", "--compression", compression, "c", "bb:one").strip()
    second = store.ok("commit", "--compression", compression, "c", "bb:two").strip()
    assert first.startswith("sha256:") and second.startswith("sha256:")
    one, two, base = store.image("bb:one"), store.image("bb:two"), store.image(IMAGE)
    assert one.inspect["Id"] == first and two.inspect["Id"] == second
    diff_id1, blob1, type1 = one.top_layer
    diff_id2, blob2, type2 = two.top_layer
    assert (diff_id1, blob1) == (diff_id2, blob2)
    assert type1 == type2 == f"application/vnd.oci.image.layer.v1.tar+{compression}"
    assert one.diff_ids[:-1] == base.diff_ids
    assert one.manifest["layers"][:-1] == base.manifest["layers"]


def test_commit_with_gzip_zstd_and_none_has_one_diff_id(
    store: ContainerStore, tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "c")
    make_changes(mnt)
    layers = {}
    for compression in ("gzip", "zstd", "none"):
        store.ok("commit", "--compression", compression, "c", f"bb:{compression}")
        layers[compression] = store.image(f"bb:{compression}").top_layer
    assert len({diff_id for diff_id, _blob, _type in layers.values()}) == 1
    assert len({blob for _diff_id, blob, _type in layers.values()}) == 3
    # uncompressed, the blob is the tar itself: its digest is the diff_id
    assert layers["none"][1] == layers["none"][0]
    assert layers["none"][2] == "application/vnd.oci.image.layer.v1.tar"


def test_committed_layer_holds_every_kind_of_change(
    store: ContainerStore, tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "c")
    make_changes(mnt)
    store.ok("commit", "c", "bb:changed")
    members = store.image("bb:changed").top_layer_members()
    names = list(members)
    for position, name in enumerate(names):
        parent = name.rpartition("/")[0]
        assert not parent or names.index(parent) < position, f"parents first: {names}"

    # metadata only: the whole file, with its new mode, its owner and its xattr
    readme, data = members["usr/share/doc/README"]
    assert readme.isreg() and data == b"a busybox root\n"
    assert stat.S_IMODE(readme.mode) == 0o600
    assert (readme.uid, readme.gid) == (1000, 1000)
    assert readme.pax_headers.get("SCHILY.xattr.user.note") == "kept"

    # a new hard-linked pair: one file and one tar link to it
    pair = [members["root/h1"][0], members["root/h2"][0]]
    assert sorted(i.type for i in pair) == sorted([tarfile.REGTYPE, tarfile.LNKTYPE])
    link = next(i for i in pair if i.islnk())
    target = next(i for i in pair if i.isreg())
    assert link.linkname.removeprefix("./").lstrip("/") == target.name.removeprefix("./")

    # a changed name of a lower hard-link group: both names, still one inode
    group = [members["etc/group"][0], members["etc/group.lnk"][0]]
    assert sorted(i.type for i in group) == sorted([tarfile.REGTYPE, tarfile.LNKTYPE])
    regular = next(i for i in group if i.isreg())
    assert members[regular.name.removeprefix("./")][1] is not None
    assert (members[regular.name.removeprefix("./")][1] or b"").endswith(b"extra:x:77:\n")

    # a deletion: an empty .wh. file; a replaced directory: the opaque marker and new content
    whiteout, data = members["bin/.wh.ls"]
    assert whiteout.isreg() and whiteout.size == 0
    assert members["opt/data/.wh..wh..opq"][0].isreg()
    assert members["opt/data"][0].isdir()
    assert members["opt/data/fresh"][1] == b"fresh\n"
    assert not [n for n in names if n.startswith("opt/data/old") or n.startswith("opt/data/.wh.o")]

    # nothing else: no trace of the file made and removed, no unchanged base file
    assert not [n for n in names if "scratch" in n]
    assert set(names) == {
        "bin", "bin/.wh.ls",
        "etc", "etc/group", "etc/group.lnk",
        "opt", "opt/data", "opt/data/.wh..wh..opq", "opt/data/fresh",
        "root", "root/h1", "root/h2",
        "tmp",
        "usr", "usr/share", "usr/share/doc", "usr/share/doc/README",
    }


def test_commit_result_mounts_as_the_container_showed_it(
    store: ContainerStore, tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "c")
    make_changes(mnt)
    store.ok("commit", "c", "bb:changed")
    new = tmp_path / "new"
    store.mount("bb:changed", new)
    assert sorted(os.listdir(new / "opt" / "data")) == ["fresh"]
    assert not (new / "bin" / "ls").exists()
    assert (new / "bin" / "cat").is_symlink()
    assert stat.S_IMODE(os.stat(new / "usr" / "share" / "doc" / "README").st_mode) == 0o600
    assert os.getxattr(new / "usr" / "share" / "doc" / "README", "user.note") == b"kept"
    assert os.stat(new / "root" / "h1").st_ino == os.stat(new / "root" / "h2").st_ino
    assert os.stat(new / "etc" / "group").st_ino == os.stat(new / "etc" / "group.lnk").st_ino
    assert (new / "etc" / "group").read_text().endswith("extra:x:77:\n")
    assert os.listdir(new / "tmp") == []
    assert store.diff(str(new)) == []


def test_commit_keeps_every_kind_of_object(store: ContainerStore, tmp_path: Path) -> None:
    """Whatever a container holds, a second container of the commit and umoci's unpack of the
    saved image show the same tree."""
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "all")
    root = mnt / "root"
    os.rename(mnt / "opt" / "data", mnt / "opt" / "moved")  # a lower dir renamed
    os.link(mnt / "bin" / "busybox", root / "bb")  # a link to a lower file
    os.unlink(mnt / "etc" / "group.lnk")  # one name of a lower hard-link group
    os.symlink("/etc/passwd", root / "sym")
    os.mkfifo(root / "fifo", 0o640)
    os.mknod(root / "tty", 0o620 | stat.S_IFCHR, os.makedev(4, 5))
    os.mknod(root / "blk", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    (root / ("x" * 150)).write_text("a long name")
    deep = root / ("d" * 120) / ("e" * 120)
    deep.mkdir(parents=True)
    (deep / "f").write_text("a long path")
    with open(os.fsencode(root) + b"/bad\xffname", "w") as f:
        f.write("not utf-8")
    (root / "\u00fcn\u00efc\u00f6de").write_text("utf-8")
    (root / "caps").write_bytes(b"\x7fELF")
    os.setxattr(root / "caps", "user.bytes", b"\x00\xff\x01")
    os.setxattr(root / "caps", "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.setxattr(root / "sym", "trusted.mine", b"on a symlink", follow_symlinks=False)
    os.chown(mnt / "etc" / "motd", USER_UID, 50)  # metadata only
    os.chmod(mnt / "tmp", 0o1770)
    subprocess.run(["rm", "-rf", str(mnt / "usr" / "share" / "doc")], check=True)
    (mnt / "bin" / "cat").unlink()
    (mnt / "bin" / "cat").mkdir()  # a file became a directory
    (mnt / "home" / "user").rmdir()
    (mnt / "home" / "user").write_text("a directory became a file")
    expected = snapshot(mnt)

    store.ok("commit", "all", "bb:all")
    members = store.image("bb:all").top_layer_members()
    assert "usr/share/.wh.doc" in members
    assert not [n for n in members if n.startswith("usr/share/doc/")]
    assert "opt/.wh.data" in members
    assert members["root/bb"][0].islnk()
    new = tmp_path / "new"
    store.mount("bb:all", new)
    problems = diff(expected, snapshot(new))
    assert not problems, "\n".join(problems)

    store.ok("save", "-o", str(tmp_path / "all.tar"), "bb:all")
    layout = tmp_path / "layout"
    layout.mkdir()
    subprocess.run(["tar", "-C", str(layout), "-xf", str(tmp_path / "all.tar")], check=True)
    rootfs = umoci_unpack(layout, "all", tmp_path / "bundle")
    problems = diff(expected, snapshot(rootfs))
    assert not problems, "umoci: " + "\n".join(problems)


CHANGES = [
    'CMD ["/bin/echo", "hi"]',
    'ENTRYPOINT ["/bin/env"]',
    'ENV A=1 B="two words"',
    "WORKDIR /srv",
    "EXPOSE 80 53/udp",
    'LABEL a=b "c d"=e',
    "USER user",
    "VOLUME /data",
]


def expect_config(config: dict[str, object]) -> None:
    assert config["Cmd"] == ["/bin/echo", "hi"]
    assert config["Entrypoint"] == ["/bin/env"]
    env = config["Env"]
    assert isinstance(env, list) and "A=1" in env and "B=two words" in env
    assert config["WorkingDir"] == "/srv"
    assert config["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert config["Labels"] == {"a": "b", "c d": "e"}
    assert config["User"] == "user"
    assert config["Volumes"] == {"/data": {}}


def test_commit_live_and_unmounted_with_message_author_and_changes(
    store: ContainerStore, tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "live")
    fd = os.open(mnt / "root" / "open-file", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"written, not closed")
        args = ["-m", "the live one", "-a", "Jane <jane@example.com>"]
        for change in CHANGES:
            args += ["-c", change]
        store.ok("commit", *args, "live", "bb:live")
    finally:
        os.close(fd)
    live = store.image("bb:live")
    assert live.top_layer_members()["root/open-file"][1] == b"written, not closed"
    doc, config = live.inspect, live.config
    assert doc["Author"] == "Jane <jane@example.com>"
    assert doc["Comment"] == "the live one"
    expect_config(doc["Config"])
    expect_config(config["config"])
    assert config["author"] == "Jane <jane@example.com>"
    assert config["history"][-1]["comment"] == "the live one"
    assert config["rootfs"]["diff_ids"] == doc["RootFS"]["Layers"]
    history = store.ok("history", "bb:live").splitlines()
    assert history[0].split()[:2] == ["IMAGE", "CREATED"]
    assert "the live one" in history[1]
    assert doc["Id"].removeprefix("sha256:")[:12] == history[1].split()[0]
    assert len(history) == 3  # the commit, the import

    store.ok("umount", "live")
    store.ok("commit", "-m", "unmounted now", "live", "bb:cold")
    cold = store.image("bb:cold")
    assert cold.top_layer[:2] == live.top_layer[:2]
    assert "unmounted now" in store.ok("history", "bb:cold").splitlines()[1]
    # the -c changes of the other commit are not inherited: the config is the base image's
    assert "Cmd" not in cold.inspect["Config"]

    # a commit of a commit: two layers on the base, the newest first in history
    store.mount("bb:live", tmp_path / "m2", "--name", "next")
    (tmp_path / "m2" / "root" / "second").write_text("2")
    store.ok("commit", "-m", "second", "next", "bb:next")
    following = store.image("bb:next")
    assert following.diff_ids[:2] == live.diff_ids
    assert len(following.diff_ids) == 3
    history = store.ok("history", "bb:next").splitlines()
    assert "second" in history[1] and "the live one" in history[2]
    expect_config(following.inspect["Config"])


def test_a_committed_image_does_not_change_with_its_container(
    store: ContainerStore, tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "c")
    (mnt / "root" / "f").write_text("committed\n")
    os.chmod(mnt / "etc" / "motd", 0o600)
    store.ok("commit", "c", "bb:snap")
    layer_before = store.image("bb:snap").top_layer
    # change the very files the commit took, in place: they are in the upper already
    with open(mnt / "root" / "f", "r+") as f:
        f.write("CHANGED!!")
    os.chmod(mnt / "etc" / "motd", 0o640)
    with open(mnt / "etc" / "motd", "a") as f:
        f.write("later\n")
    (mnt / "root" / "later").write_text("later")

    new = tmp_path / "new"
    store.mount("bb:snap", new)
    assert (new / "root" / "f").read_text() == "committed\n"
    assert (new / "etc" / "motd").read_text() == "base motd\n"
    assert stat.S_IMODE(os.stat(new / "etc" / "motd").st_mode) == 0o600
    assert not (new / "root" / "later").exists()
    assert store.image("bb:snap").top_layer == layer_before
    # and a second commit takes the later state
    store.ok("commit", "c", "bb:snap2")
    members = store.image("bb:snap2").top_layer_members()
    assert members["root/f"][1] == b"CHANGED!!\n"
    assert members["etc/motd"][1] == b"base motd\nlater\n"
    assert "root/later" in members


def test_commit_without_a_tag_makes_an_untagged_image(
    store: ContainerStore, tmp_path: Path
) -> None:
    store.mount(IMAGE, tmp_path / "m", "--name", "c")
    (tmp_path / "m" / "root" / "x").write_text("x")
    image_id = store.ok("commit", "c").strip()
    assert image_id.startswith("sha256:")
    doc = store.inspect(image_id)
    assert doc["RepoTags"] == []
    store.mount(image_id, tmp_path / "n")
    assert (tmp_path / "n" / "root" / "x").read_text() == "x"


# -- run ------------------------------------------------------------------------------------------


def test_run_passes_exit_status_and_stdin_through(store: ContainerStore) -> None:
    assert store.run("run", "--rm", IMAGE, "sh", "-c", "exit 7").returncode == 7
    assert store.run("run", "--rm", IMAGE, "true").returncode == 0
    assert store.run("run", "--rm", IMAGE, "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    result = store.run("run", "--rm", IMAGE, "cat", input=b"x\nsecond line\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "x\nsecond line\n"
    result = store.run("run", "--rm", IMAGE, "sh", "-c", "echo out; echo err >&2")
    assert (result.stdout, result.stderr) == ("out\n", "err\n")
    assert store.container_ids() == []


def test_run_uses_the_image_env_workdir_user_and_cmd(
    store: ContainerStore, base_tar: Path
) -> None:
    store.ok("import", "-c", "ENV GREETING=hello HOME=/home/user", "-c", "WORKDIR /home/user",
             "-c", "USER user",
             "-c", 'CMD ["/bin/sh", "-c", "echo $GREETING $HOME; pwd; id -u; id -g; id -G"]',
             str(base_tar), "bb:conf")
    result = store.run("run", "--rm", "bb:conf")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "hello /home/user", "/home/user", str(USER_UID), str(USER_UID), f"{USER_UID} 50",
    ]

    result = store.run("run", "--rm", "-e", "GREETING=bye", "-e", "EXTRA=1", "-w", "/tmp",
                       "-u", "root", "bb:conf", "sh", "-c",
                       "echo $GREETING $EXTRA; pwd; id -u; id -g")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["bye 1", "/tmp", "0", "0"]

    result = store.run("run", "--rm", "-u", f"{USER_UID}:50", "bb:conf", "sh", "-c",
                       "id -u; id -g")
    assert result.stdout.splitlines() == [str(USER_UID), "50"], result.stderr
    # -e NAME without a value passes the caller's variable, if set
    os.environ["LAYERFS_TEST_PASSED"] = "from the caller"
    try:
        result = store.run("run", "--rm", "-e", "LAYERFS_TEST_PASSED", "-e", "LAYERFS_TEST_UNSET",
                           IMAGE, "sh", "-c",
                           'echo "$LAYERFS_TEST_PASSED/${LAYERFS_TEST_UNSET-unset}"')
    finally:
        del os.environ["LAYERFS_TEST_PASSED"]
    assert result.stdout == "from the caller/unset\n", result.stderr
    # the command replaces Cmd, the environment stays the image's
    result = store.run("run", "--rm", "bb:conf", "sh", "-c", "echo $GREETING; id -un")
    assert result.stdout.splitlines() == ["hello", "user"], result.stderr


def test_run_entrypoint_takes_the_command_as_arguments(
    store: ContainerStore, base_tar: Path
) -> None:
    store.ok("import", "-c", 'ENTRYPOINT ["/bin/echo", "entry"]', "-c", 'CMD ["default"]',
             str(base_tar), "bb:entry")
    assert store.ok("run", "--rm", "bb:entry") == "entry default\n"
    assert store.ok("run", "--rm", "bb:entry", "given", "args") == "entry given args\n"


def test_run_keeps_the_container_for_commit_unless_rm(store: ContainerStore) -> None:
    result = store.run("run", "--name", "kept", IMAGE, "sh", "-c",
                       "echo made-by-run > /root/made; rm /etc/motd")
    assert result.returncode == 0, result.stderr
    rows = {r["NAMES"]: r for r in ps_rows(store, "-a")}
    assert rows["kept"]["STATUS"] == "Unmounted"
    lines = store.diff("kept")
    assert {"A /root/made", "D /etc/motd"} <= set(lines)
    store.ok("commit", "kept", "bb:from-run")
    members = store.image("bb:from-run").top_layer_members()
    assert members["root/made"][1] == b"made-by-run\n"
    assert "etc/.wh.motd" in members
    assert store.ok("run", "--rm", "bb:from-run", "cat", "/root/made") == "made-by-run\n"
    assert store.run("run", "--rm", "bb:from-run", "test", "-e", "/etc/motd").returncode == 1

    before = store.container_ids()
    store.ok("run", "--rm", "--name", "gone", IMAGE, "true")
    assert store.container_ids() == before
    assert "gone" not in {r["NAMES"] for r in ps_rows(store, "-a")}


def test_run_shows_proc_and_leaves_nothing_mounted(store: ContainerStore) -> None:
    out = store.ok("run", "--rm", IMAGE, "sh", "-c",
                   "cat /proc/self/stat | cut -d' ' -f2; test -e /proc/1 && echo pid1; "
                   "test -c /dev/null && echo devnull")
    assert out.splitlines() == ["(cat)", "pid1", "devnull"]
    assert store.own_mounts() == []
    assert not [t for s, t in mounts_by_source() if s.startswith("layerfs:") and
                t.startswith(str(store.root))]


def test_run_of_a_command_that_changes_nothing_leaves_an_empty_diff(
    store: ContainerStore, tmp_path: Path
) -> None:
    store.ok("run", "--name", "quiet", IMAGE, "true")
    assert store.diff("quiet") == []


def test_run_creates_a_missing_working_directory(store: ContainerStore, base_tar: Path) -> None:
    assert store.ok("run", "--rm", "-w", "/srv/new", IMAGE, "pwd") == "/srv/new\n"
    store.ok("import", "-c", "WORKDIR /srv/app", str(base_tar), "bb:wd")
    assert store.ok("run", "--rm", "bb:wd", "pwd") == "/srv/app\n"


def test_run_as_a_uid_without_passwd_entry_has_gid_0(store: ContainerStore) -> None:
    assert store.ok("run", "--rm", "-u", "4242", IMAGE, "sh", "-c", "id -u; id -g") == \
        "4242\n0\n"


# -- wrong input ----------------------------------------------------------------------------------


def test_commit_of_a_missing_container_is_refused(store: ContainerStore) -> None:
    assert "nosuch" in store.fails("commit", "nosuch", "bb:x")
    assert "nosuch" in store.fails("diff", "nosuch")
    assert "nosuch" in store.fails("umount", "nosuch")
    assert "nosuch" in store.fails("rm", "nosuch")
    assert "bb:x" not in store.ok("images")


def test_a_taken_container_name_is_refused(store: ContainerStore, tmp_path: Path) -> None:
    store.mount(IMAGE, tmp_path / "m1", "--name", "web")
    (tmp_path / "m2").mkdir()
    line = store.fails("mount", IMAGE, str(tmp_path / "m2"), "--name", "web")
    assert "web" in line and "in use" in line
    assert not os.path.ismount(tmp_path / "m2")
    assert "web" in store.fails("run", "--name", "web", IMAGE, "true")
    assert "bad name" in store.fails("mount", IMAGE, str(tmp_path / "m2"), "--name", "bad name")
    assert [r["NAMES"] for r in ps_rows(store, "-a")] == ["web"]


def test_a_mountpoint_in_use_is_refused(store: ContainerStore, tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "first")
    (mnt / "root" / "mine").write_text("first's")
    line = store.fails("mount", IMAGE, str(mnt))
    assert str(mnt) in line
    # the mount that was there is untouched
    assert (mnt / "root" / "mine").read_text() == "first's"
    assert [r["NAMES"] for r in ps_rows(store)] == ["first"]
    # a container that is mounted cannot be mounted a second time elsewhere
    line = store.fails("mount", "first", str(tmp_path / "elsewhere"))
    assert "first" in line
    assert not os.path.ismount(tmp_path / "elsewhere")
    # nor on a non-empty directory
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("f")
    assert str(tmp_path / "full") in store.fails("mount", IMAGE, str(tmp_path / "full"))


def test_umount_of_a_busy_container_is_refused(store: ContainerStore, tmp_path: Path) -> None:
    mnt = tmp_path / "m"
    store.mount(IMAGE, mnt, "--name", "held")
    with open(mnt / "etc" / "motd") as held:
        line = store.fails("umount", "held")
        assert str(mnt) in line and "busy" in line.lower()
        assert os.path.ismount(mnt)
        assert held.read() == "base motd\n"
    store.ok("umount", "held")
    assert not os.path.ismount(mnt)
    assert "held" in store.fails("umount", "held")  # not mounted any more


def test_a_refused_mount_leaves_no_container(store: ContainerStore, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("f")
    store.fails("mount", IMAGE, str(tmp_path / "full"), "--name", "web")
    store.fails("mount", IMAGE, str(tmp_path / "missing"))
    assert store.container_ids() == []
    store.mount(IMAGE, tmp_path / "ok", "--name", "web")


def test_umount_by_a_relative_mountpoint(store: ContainerStore, tmp_path: Path) -> None:
    store.mount(IMAGE, tmp_path / "m", "--name", "rel")
    result = store.run("umount", "m", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not os.path.ismount(tmp_path / "m")


def test_run_without_cmd_or_command_is_refused(store: ContainerStore) -> None:
    line = store.fails("run", IMAGE)
    assert IMAGE in line and "Cmd" in line
    assert store.container_ids() == []
    assert store.own_mounts() == []


def test_run_of_a_missing_executable_is_refused(store: ContainerStore) -> None:
    line = store.fails("run", "--rm", IMAGE, "/no/such/program")
    assert "/no/such/program" in line
    assert store.container_ids() == []


def test_an_unknown_change_instruction_is_refused(
    store: ContainerStore, tmp_path: Path, base_tar: Path
) -> None:
    store.mount(IMAGE, tmp_path / "m", "--name", "c")
    (tmp_path / "m" / "root" / "x").write_text("x")
    images_before = store.ok("images", "-a", "-q")
    blobs_before = store.blob_names()
    line = store.fails("commit", "-c", "RUN echo hi", "c", "bb:bad")
    assert "RUN" in line
    assert "CMD" in store.fails("commit", "-c", 'CMD ["unclosed"', "c", "bb:bad")
    assert "RUN" in store.fails("import", "-c", "RUN echo hi", str(base_tar), "bb:bad")
    assert store.ok("images", "-a", "-q") == images_before
    assert store.blob_names() == blobs_before
