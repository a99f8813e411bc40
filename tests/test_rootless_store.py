"""The `layerfs` verbs run by a real unprivileged user (tests/rootless.py), judged by root.

The user's store lives under its XDG_DATA_HOME; owners that it cannot give are kept in
containers-storage's override xattr; `run` puts the process in a user namespace mapped with
newuidmap from the user's subordinate ids, where the image's owners are themselves. What the
user's container shows must be what root's container of the same image shows, what the user
commits must carry the owners made inside, and fuse-overlayfs must read the user's layers alike.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.imagetools import IMAGES
from tests.rootless import VENV_BIN, create_user, remove_user

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.imagetools import Store
    from tests.registry_fixtures import Registry
    from tests.rootless import RootlessUser

ALPINE_TARBALL = IMAGES / "alpine-minirootfs-3.20.3-x86_64.tar.gz"
BUSYBOX_LAYOUT = IMAGES / "busybox-1.38.0-musl-amd64-oci"
LAYERFS = str(VENV_BIN / "layerfs")

pytestmark = pytest.mark.skipif(not ALPINE_TARBALL.exists(), reason="no Alpine minirootfs")
pytest_plugins = ["tests.registry_fixtures"]  # the registry on 127.0.0.1

# Every path of the container with owner, group, mode, type and size (busybox stat);
# /proc, /sys and /dev are the host's, seen from two different namespaces.
LISTING = ("find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o "
           "-exec stat -c '%n|%u|%g|%a|%F|%s' {} + | sort")
CHANGES = ("echo hi > /hi && chown 42:43 /hi && chmod 4755 /hi && mkdir /d && chown 7:8 /d"
           " && ln -s hi /l && adduser -D -u 1234 bob && rm /etc/motd")


@pytest.fixture(scope="module")
def user_with_images(rootless_user: RootlessUser) -> Iterator[RootlessUser]:
    rootless_user.grant_reach(IMAGES)
    store = rootless_user.work / "data" / "layerfs"
    rootless_user.run([LAYERFS, "import", str(ALPINE_TARBALL), "alpine:3.20"])
    rootless_user.run([LAYERFS, "load", "-i", str(BUSYBOX_LAYOUT)])
    try:
        yield rootless_user
    finally:
        rootless_user.run([LAYERFS, "system", "prune", "-a", "-f"], check=False)
        shutil.rmtree(store, ignore_errors=True)


def listing(output: str) -> list[str]:
    return [line for line in output.splitlines() if line and not line.startswith("/etc/resolv")]


def test_the_store_is_the_users(user_with_images: RootlessUser) -> None:
    user = user_with_images
    root = user.work / "data" / "layerfs"
    st = root.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o700)
    for dirpath, dirs, files in os.walk(root):
        if os.path.relpath(dirpath, root).split("/")[0] in ("layers", "containers"):
            continue  # image contents: their own modes, unreachable behind the 0700 root
        for name in [*dirs, *files]:
            path_st = os.lstat(os.path.join(dirpath, name))
            assert path_st.st_uid == user.uid, name
            assert not path_st.st_mode & 0o022, f"{name}: {oct(path_st.st_mode)}"


def test_run_shows_the_image_as_root_sees_it(user_with_images: RootlessUser, store: Store,
                                             ) -> None:
    store.ok("import", str(ALPINE_TARBALL), "alpine:3.20")
    theirs = listing(store.ok("run", "--rm", "alpine:3.20", "sh", "-c", LISTING))
    ours = listing(user_with_images.run(
        [LAYERFS, "run", "--rm", "alpine:3.20", "sh", "-c", LISTING]).stdout)
    assert len(ours) > 500
    assert ours == theirs
    shadow = next(line for line in ours if line.startswith("/etc/shadow|"))
    assert shadow.split("|")[1:4] == ["0", "42", "640"]


def test_changes_made_in_run_commit_with_their_owners(user_with_images: RootlessUser,
                                                      store: Store, tmp_path: Path) -> None:
    user = user_with_images
    user.run([LAYERFS, "run", "--name", "changes", "alpine:3.20", "sh", "-c", CHANGES])
    user.run([LAYERFS, "commit", "-m", "rootless", "changes", "mine:1"])
    archive = user.work / "home" / "mine.tar"
    user.run([LAYERFS, "save", "-o", str(archive), "mine:1"])
    with tarfile.open(archive) as outer:
        manifest = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        top = outer.extractfile(manifest[0]["Layers"][-1])
        assert top is not None
        with tarfile.open(fileobj=top) as layer:
            members = {m.name: m for m in layer.getmembers()}
    hi, d, link = members["hi"], members["d"], members["l"]
    assert (hi.uid, hi.gid, hi.mode) == (42, 43, 0o4755)
    assert (d.uid, d.gid, d.isdir()) == (7, 8, True)
    assert (link.uid, link.gid, link.linkname) == (0, 0, "hi")
    assert (members["home/bob"].uid, members["home/bob"].gid) == (1234, 1234)
    assert members["etc/.wh.motd"].isfile()
    # the same image loaded by root shows the same tree as the user's container does
    shutil.copy(archive, tmp_path / "mine.tar")
    store.ok("load", "-i", str(tmp_path / "mine.tar"))
    theirs = listing(store.ok("run", "--rm", "mine:1", "sh", "-c", LISTING))
    ours = listing(user.run([LAYERFS, "run", "--rm", "mine:1", "sh", "-c", LISTING]).stdout)
    assert ours == theirs
    assert "/hi|42|43|4755|regular file|3" in ours


def test_mount_shows_the_image_through_the_users_ids(user_with_images: RootlessUser) -> None:
    """Outside a namespace the user owns what root owns in the image, and a subordinate id
    stands for each other owner, as with podman; so the user may write in its container."""
    user = user_with_images
    mnt = user.work / "home" / "mnt"
    user.mkdirs(mnt)
    user.run([LAYERFS, "mount", "alpine:3.20", str(mnt)])
    try:
        out = user.run(["sh", "-c", f"stat -c '%u %g %a' {mnt}/etc/shadow {mnt}/etc; "
                                    f"echo hi > {mnt}/new && stat -c '%u %g' {mnt}/new; "
                                    f"grep ' {mnt} ' /proc/mounts"]).stdout.splitlines()
        # in the namespace of run and build (podman unshare's): the image's own owners, and
        # root may chown there
        inside = user.run([LAYERFS, "unshare", "sh", "-c",
                           f"stat -c '%u %g %a' {mnt}/etc/shadow; chown 42:43 {mnt}/new && "
                           f"stat -c '%u %g' {mnt}/new"]).stdout.splitlines()
        outside = user.run(["stat", "-c", "%u %g", f"{mnt}/new"]).stdout.strip()
    finally:
        user.run([LAYERFS, "umount", str(mnt)])
    _check_fork_server(user)
    sub = _subordinate_start(user)
    assert out[0] == f"{user.uid} {sub + 41} 640"
    assert out[1] == f"{user.uid} {user.gid} 755"
    assert out[2] == f"{user.uid} {user.gid}"
    assert inside == ["0 42 640", "42 43"]
    assert outside == f"{sub + 41} {sub + 42}"
    options = out[3].split()[3].split(",")
    assert "nosuid" in options and "nodev" in options  # setuid gains nothing outside


def _check_fork_server(user: RootlessUser) -> None:
    """The mount started the user's fork server: its socket is the user's, in a dir closed to
    others, and the server answers nobody else, not even root (who can reach the socket)."""
    runtime = user.work / "run" / "layerfs"
    st = runtime.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (user.uid, 0o700)
    [sock_path] = runtime.glob("forkserver-*.sock")
    assert sock_path.stat().st_uid == user.uid
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(sock_path))
        try:
            sock.sendmsg([b"layerfs\0images\0"], [])
            answer = sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""  # closed before it read a thing
        assert answer == b""  # closed without an answer


def _subordinate_start(user: RootlessUser) -> int:
    for line in Path("/etc/subgid").read_text().splitlines():
        name, start, _count = line.strip().split(":")
        if name == user.name:
            return int(start)
    raise AssertionError(f"{user.name} has no subordinate gids")


@pytest.mark.skipif(shutil.which("fuse-overlayfs") is None, reason="no fuse-overlayfs")
def test_fuse_overlayfs_reads_the_users_layers_alike(user_with_images: RootlessUser) -> None:
    user = user_with_images
    layers = user.work / "data" / "layerfs" / "layers"
    image = json.loads(user.run([LAYERFS, "inspect", "alpine:3.20"]).stdout)[0]
    [diff_id] = image["RootFS"]["Layers"]
    lower = layers / diff_id.split(":")[1] / "diff"
    sub = _subordinate_start(user)
    mapping = f"uidmapping=0:{user.uid}:1:1:{sub}:65536,gidmapping=0:{user.gid}:1:1:{sub}:65536"
    views = {}
    for tool in ("layerfs-overlay", "fuse-overlayfs"):
        mnt = user.work / "home" / f"view-{tool}"
        user.mkdirs(mnt)
        program = str(VENV_BIN / tool) if tool == "layerfs-overlay" else tool
        user.run([program, "-o", f"lowerdir={lower},{mapping}", str(mnt)])
        try:
            views[tool] = user.run(["sh", "-c", f"cd {mnt} && find . -exec stat -c "
                                    "'%n|%u|%g|%a|%F|%s' {} + | sort"]).stdout.splitlines()
        finally:
            user.run(["fusermount3", "-u", str(mnt)])
    assert len(views["layerfs-overlay"]) > 500
    # fuse-overlayfs shows a symlink's owner on disk (the user's); for us the store's own ids
    # are root's in the image, whatever the type: compare symlinks without their owners
    def comparable(lines: list[str]) -> list[str]:
        out = []
        for line in lines:
            name, uid, gid, mode, kind, size = line.split("|")
            out.append("|".join([name, mode, kind, size] if kind == "symbolic link" else
                                [name, uid, gid, mode, kind, size]))
        return out
    assert comparable(views["layerfs-overlay"]) == comparable(views["fuse-overlayfs"])


def test_refusals_are_one_line_and_write_nothing(rootless_user: RootlessUser) -> None:
    other = create_user("b", fuse=False, subordinate=False)
    try:
        work = other.work / "home"
        other.mkdirs(work / "lower", work / "mnt")
        if not os.stat("/dev/fuse").st_mode & 0o006:
            result = other.run([str(VENV_BIN / "layerfs-overlay"), "-o",
                                f"lowerdir={work}/lower", f"{work}/mnt"], check=False)
            assert result.returncode != 0
            assert result.stderr.splitlines() == [
                "layerfs-overlay: /dev/fuse: this user may not open it (read and write access "
                "comes from its mode, its group or an ACL entry)"]
        # a store that belongs to someone else
        theirs = rootless_user.work / "data" / "layerfs"
        rootless_user.run([LAYERFS, "images"])
        before = sorted(os.listdir(theirs))
        result = other.run([LAYERFS, "--root", str(theirs), "images"], check=False)
        assert result.returncode != 0
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        line = lines[0]
        assert line.startswith(f"layerfs: {theirs}: the store belongs to uid {rootless_user.uid}")
        assert sorted(os.listdir(theirs)) == before
        # no subordinate ids: run maps only the user, other owners show as the overflow id
        other.grant_reach(IMAGES)
        other.run([LAYERFS, "import", str(ALPINE_TARBALL), "alpine:3.20"])
        if os.stat("/dev/fuse").st_mode & 0o006 == 0:
            other.grant_fuse()
        out = other.run([LAYERFS, "run", "--rm", "alpine:3.20", "sh", "-c",
                         "id -u; stat -c '%u %g' /etc/shadow /etc/passwd"]).stdout.split("\n")
        assert out[:3] == ["0", "0 65534", "0 0"]
    finally:
        remove_user(other)


BUILD = """\
FROM alpine:3.20 AS base
RUN adduser -D -u 1234 bob && mkdir -p /srv/data && chown 7:8 /srv/data
COPY --chown=bob:bob f /home/bob/f
COPY --chmod=4755 f /usr/local/bin/g
WORKDIR /srv/app
USER bob
WORKDIR /home/bob/w
RUN id > /home/bob/w/id && touch /home/bob/w/made
FROM alpine:3.20
COPY --from=base /home/bob /bob
COPY --from=base --chown=42:43 /srv/data /data
"""


def test_build_gives_the_image_roots_build_gives(user_with_images: RootlessUser, store: Store,
                                                 tmp_path: Path) -> None:
    """COPY, ADD and WORKDIR write as the image's root, a RUN as another USER gets in (the
    rootless container is mounted in the user namespace), and the result is root's."""
    user = user_with_images
    ctx = user.work / "home" / "ctx"
    user.mkdirs(ctx)
    for parent in (ctx, tmp_path / "ctx"):
        parent.mkdir(exist_ok=True)
        (parent / "Dockerfile").write_text(BUILD)
        (parent / "f").write_text("hello\n")
    for path in (ctx, ctx / "Dockerfile", ctx / "f"):
        os.chown(path, user.uid, user.gid)
    store.ok("import", str(ALPINE_TARBALL), "alpine:3.20")
    views = []
    for target in ("base", None):
        args = ["build", "-q", "-t", f"built:{target or 'final'}"] + (
            ["--target", target] if target else [])
        user.run([LAYERFS, *args, str(ctx)])
        store.ok(*args, str(tmp_path / "ctx"))
        name = f"built:{target or 'final'}"
        ours = listing(user.run([LAYERFS, "run", "--rm", name, "sh", "-c", LISTING]).stdout)
        theirs = listing(store.ok("run", "--rm", name, "sh", "-c", LISTING))
        assert ours == theirs
        views.append(ours)
    base, final = views
    assert "/home/bob/w/made|1234|1234|644|regular empty file|0" in base
    assert "/usr/local/bin/g|0|0|4755|regular file|6" in base
    assert any(line.startswith("/data|42|43|755|directory|") for line in final)
    out = user.run([LAYERFS, "run", "--rm", "built:base", "cat", "/home/bob/w/id"]).stdout
    assert out.startswith("uid=1234(bob) gid=1234(bob)")


def test_push_and_pull_between_the_user_and_root(user_with_images: RootlessUser,
                                                 registry: Registry, store: Store) -> None:
    """What the user pushes, root pulls and sees as the user does; what root pushes, the
    user pulls (a registry on 127.0.0.1) and sees as root does."""
    user = user_with_images
    mine = registry.ref("rootless/alpine:1")
    user.run([LAYERFS, "tag", "alpine:3.20", mine])
    user.run([LAYERFS, "push", mine])
    store.ok("pull", mine)
    ours = listing(user.run([LAYERFS, "run", "--rm", mine, "sh", "-c", LISTING]).stdout)
    assert ours == listing(store.ok("run", "--rm", mine, "sh", "-c", LISTING))
    theirs = registry.ref("root/busybox:1")
    store.ok("load", "-i", str(BUSYBOX_LAYOUT))
    store.ok("tag", "busybox:1.38.0-musl", theirs)
    store.ok("push", theirs)
    user.run([LAYERFS, "pull", theirs])
    ours = listing(user.run([LAYERFS, "run", "--rm", theirs, "sh", "-c", LISTING]).stdout)
    assert len(ours) > 300
    assert ours == listing(store.ok("run", "--rm", theirs, "sh", "-c", LISTING))
