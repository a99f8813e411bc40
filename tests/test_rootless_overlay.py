"""layerfs-overlay run by a real unprivileged user (tests/rootless.py), judged by the kernel.

The user mounts through fusermount3 and writes the `user.overlay.` format: whiteouts as
character devices 0/0 (which the kernel lets anyone make), opaque directories as
`user.overlay.opaque`, no redirects and no metadata-only copies. The same changes made in the
kernel's overlayfs, mounted by the same user in a user namespace with `-o userxattr`, give the
same errno for every step and the same tree; and the upper that layerfs wrote reads back the
same under the kernel and under fuse-overlayfs, both run by that user.
"""

from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING, Any

import pytest

from tests.rootless import VENV_BIN

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.rootless import RootlessUser

pytestmark = pytest.mark.skipif(shutil.which("fuse-overlayfs") is None,
                                reason="fuse-overlayfs is not installed (tools/setup)")

# Two lower layers, top first: the top one deletes with the overlay's own forms.
MAKE_LAYERS = r"""
import os, sys
top, bottom = sys.argv[1:3]
def file(path, data=b"x", mode=0o644):
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
for d in ("d/sub", "e", "o", "keep"):
    os.makedirs(os.path.join(bottom, d))
file(f"{bottom}/d/f", b"lower f\n")
file(f"{bottom}/d/sub/x", b"x\n")
file(f"{bottom}/e/g", b"g\n", 0o755)
file(f"{bottom}/e/h", b"h\n")
file(f"{bottom}/o/old", b"old\n")
file(f"{bottom}/keep/k", b"k\n")
file(f"{bottom}/big", os.urandom(1 << 20))
os.symlink("d/f", f"{bottom}/link")
os.mkfifo(f"{bottom}/fifo")
os.setxattr(f"{bottom}/e/g", "user.origin", b"bottom")
for d in ("d", "e", "o"):
    os.makedirs(os.path.join(top, d))
file(f"{top}/d/f2", b"top f2\n")
os.mknod(f"{top}/e/h", 0o020000, os.makedev(0, 0))
file(f"{top}/o/new", b"new\n")
os.setxattr(f"{top}/o", "user.overlay.opaque", b"y")
"""

# The changes, each step's errno recorded (0: done), then the tree.
CHANGE_AND_LOOK = r"""
import errno, json, os, sys
root = sys.argv[1]
sys.path.insert(0, sys.argv[2])
from tests.treecmp import snapshot
steps = []
def step(name, fn, *args):
    # the arguments before the first non-path (bytes, a number, an xattr name) are paths
    paths = [a for a in args[:2] if isinstance(a, str) and not a.startswith(("user.", "trusted."))]
    rest = args[len(paths):]
    try:
        fn(*[os.path.join(root, a) for a in paths], *rest)
        steps.append([name, 0])
    except OSError as exc:
        steps.append([name, errno.errorcode[exc.errno]])
def write(path, data, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC):
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
def remove_tree(path):
    for dirpath, dirs, files in os.walk(path, topdown=False):
        for name in files:
            os.unlink(os.path.join(dirpath, name))
        for name in dirs:
            os.rmdir(os.path.join(dirpath, name))
    os.rmdir(path)
if sys.argv[3] == "change":
    step("unlink lower file", os.unlink, "d/f")
    step("rename merged dir", os.rename, "d", "d2")
    step("rename lower dir", os.rename, "keep", "keep2")
    step("replace lower tree", remove_tree, "o")
    step("mkdir over it", os.mkdir, "o")
    step("new file there", write, "o/fresh", b"fresh\n")
    step("mkdir new", os.mkdir, "n")
    step("rename new dir", os.rename, "n", "n2")
    step("file in new dir", write, "n2/f", b"n\n")
    step("chmod lower file", os.chmod, "e/g", 0o600)
    step("user xattr", os.setxattr, "e/g", "user.plain", b"1")
    step("overlay-named xattr", os.setxattr, "n2", "user.overlay.x", b"escaped")
    step("trusted xattr", os.setxattr, "n2", "trusted.t", b"no")
    step("truncate lower file", os.truncate, "big", 10)
    step("append", write, "d/f2", b"more\n", os.O_WRONLY | os.O_APPEND)
    step("create over whiteout", write, "e/h", b"again\n")
    step("hard link lower file", os.link, "d/sub/x", "e/x2")
    step("rename over lower file", os.rename, "e/x2", "d/f2")
    step("symlink", os.symlink, "e/g", "s")
    step("fifo", os.mkfifo, "e/p")
    step("device", os.mknod, "dev", 0o020644, os.makedev(1, 3))
    step("rmdir non-empty", os.rmdir, "e")
print(json.dumps({"steps": steps, "tree": {k: [v[0], v[1], v[2], v[3],
                  list(v[4]) if isinstance(v[4], tuple) else v[4],
                  [[n, x.hex()] for n, x in v[5]]] for k, v in snapshot(root).items()}}))
"""


class Dirs:
    def __init__(self, user: RootlessUser, base: Path) -> None:
        self.user, self.base = user, base
        self.top, self.bottom = base / "top", base / "bottom"
        self.upper, self.work, self.mnt = base / "upper", base / "work", base / "mnt"
        user.mkdirs(self.top, self.bottom, self.upper, self.work, self.mnt)

    def options(self, *, upper: Path | None = None, work: Path | None = None) -> str:
        return (f"lowerdir={self.top}:{self.bottom},upperdir={upper or self.upper},"
                f"workdir={work or self.work}")

    def look(self, *, change: bool, via: list[str] | None = None) -> dict[str, Any]:
        from tests.rootless import REPO
        argv = [*(via or []), str(VENV_BIN / "python"), "-c", CHANGE_AND_LOOK, str(self.mnt),
                str(REPO), "change" if change else "look"]
        doc = json.loads(self.user.run(argv).stdout)
        assert isinstance(doc, dict)
        return doc

    def kernel(self, *, change: bool, upper: Path, work: Path) -> dict[str, Any]:
        """The kernel's overlayfs over the same lowers, mounted by the user in a user and
        mount namespace of its own (gone when the command ends); the user is root there."""
        mount = (f"mount -t overlay overlay -o userxattr,{self.options(upper=upper, work=work)} "
                 f"{self.mnt} && exec \"$@\"")
        doc = self.look(change=change, via=["unshare", "-Urm", "sh", "-c", mount, "sh"])
        for entry in doc["tree"].values():  # root in the namespace is the user outside
            entry[2] = self.user.uid if entry[2] == 0 else entry[2]
            entry[3] = self.user.gid if entry[3] == 0 else entry[3]
        return doc

    def fresh_upper(self, name: str) -> tuple[Path, Path]:
        upper, work = self.base / f"{name}-upper", self.base / f"{name}-work"
        self.user.mkdirs(upper, work)
        return upper, work


@pytest.fixture
def dirs(rootless_user: RootlessUser, request: pytest.FixtureRequest) -> Iterator[Dirs]:
    base = rootless_user.work / request.node.name
    rootless_user.mkdirs(base)
    made = Dirs(rootless_user, base)
    rootless_user.run([str(VENV_BIN / "python"), "-c", MAKE_LAYERS, str(made.top),
                       str(made.bottom)])
    try:
        yield made
    finally:
        # a mount left by a failed step: detach it (as the user: it is the user's mount)
        rootless_user.run(["fusermount3", "-u", "-z", str(made.mnt)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def mount_layerfs(dirs: Dirs, *extra: str) -> None:
    options = ",".join([dirs.options(), *extra])
    dirs.user.run([str(VENV_BIN / "layerfs-overlay"), "-o", options, str(dirs.mnt)])


def unmount(dirs: Dirs) -> None:
    dirs.user.run(["fusermount3", "-u", str(dirs.mnt)])


def test_changes_match_the_kernel_with_userxattr(dirs: Dirs) -> None:
    mount_layerfs(dirs)
    try:
        ours = dirs.look(change=True)
    finally:
        unmount(dirs)
    upper, work = dirs.fresh_upper("kernel")
    theirs = dirs.kernel(change=True, upper=upper, work=work)
    assert ours["steps"] == theirs["steps"]
    steps = dict(ours["steps"])
    # what the user.overlay. format changes: directories with lower parts stay where they are
    assert steps["rename merged dir"] == steps["rename lower dir"] == "EXDEV"
    assert steps["rename new dir"] == 0
    assert steps["user xattr"] == steps["overlay-named xattr"] == 0
    assert steps["trusted xattr"] == "EPERM" and steps["device"] == "EPERM"
    assert ours["tree"] == theirs["tree"]


def test_the_upper_reads_back_under_the_kernel_and_fuse_overlayfs(dirs: Dirs) -> None:
    mount_layerfs(dirs)
    try:
        dirs.look(change=True)
        ours = dirs.look(change=False)
    finally:
        unmount(dirs)
    _, work = dirs.fresh_upper("kernel")
    kernel = dirs.kernel(change=False, upper=dirs.upper, work=work)
    assert kernel["tree"] == ours["tree"]
    _, work = dirs.fresh_upper("fuse-overlayfs")
    dirs.user.run(["fuse-overlayfs", "-o", dirs.options(work=work), str(dirs.mnt)])
    try:
        peer = dirs.look(change=False)
    finally:
        unmount(dirs)
    # fuse-overlayfs (1.10) hides every user.overlay. name: it knows no escaped ones
    for entry in ours["tree"].values():
        entry[5] = [x for x in entry[5] if not x[0].startswith("user.overlay.")]
    assert peer["tree"] == ours["tree"]


def test_on_disk_forms(dirs: Dirs) -> None:
    """What lands in the upper: nothing in the trusted namespace, which the user cannot
    write, and the forms that both peers read."""
    mount_layerfs(dirs)
    try:
        dirs.look(change=True)
    finally:
        unmount(dirs)
    import os
    import stat
    whiteout = os.lstat(dirs.upper / "d" / "f")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    assert os.getxattr(dirs.upper / "o", "user.overlay.opaque") == b"y"
    assert os.getxattr(dirs.upper / "n2", "user.overlay.overlay.x") == b"escaped"
    for dirpath, names, files in os.walk(dirs.upper):
        for name in [*names, *files]:
            path = os.path.join(dirpath, name)
            assert os.lstat(path).st_uid == dirs.user.uid, path
            assert not [x for x in os.listxattr(path, follow_symlinks=False)
                        if x.startswith("trusted.")], path
    assert (dirs.upper / "e" / "g").stat().st_size != 0  # data copied up, not metacopy


@pytest.mark.parametrize("options", [
    "squash_to_root",
    "squash_to_uid=1234,squash_to_gid=4321",
    "uidmapping=0:7:1:1:100:5000,gidmapping=0:8:1:1:200:5000",
], ids=["squash_to_root", "squash_to_ids", "mappings"])  # ids: the test dir is named by them
def test_owner_options_show_what_fuse_overlayfs_shows(dirs: Dirs, options: str) -> None:
    """fuse-overlayfs's squash and mapping options, the same on both, over the same dirs."""
    views = []
    for program in (str(VENV_BIN / "layerfs-overlay"), "fuse-overlayfs"):
        upper, work = dirs.fresh_upper(program.rsplit("/", 1)[-1])
        dirs.user.run([program, "-o", f"{dirs.options(upper=upper, work=work)},{options}",
                       str(dirs.mnt)])
        try:
            views.append(dirs.look(change=False)["tree"])
        finally:
            unmount(dirs)
    ours, theirs = views
    for tree in views:  # fuse-overlayfs hides no user.overlay. name of ours: compare without
        for entry in tree.values():
            entry[5] = [x for x in entry[5] if not x[0].startswith("user.overlay.")]
    assert ours == theirs
    owners = {(entry[2], entry[3]) for entry in ours.values()}
    if options == "squash_to_root":
        assert owners == {(0, 0)}


def test_malformed_owner_options_are_one_line(dirs: Dirs) -> None:
    for bad, message in (("uidmapping=0:1", "0:1: needs triples ON_DISK:SHOWN:COUNT"),
                         ("squash_to_uid=me", "squash_to_uid=me: not a user or group id")):
        result = dirs.user.run([str(VENV_BIN / "layerfs-overlay"), "-o",
                                f"{dirs.options()},{bad}", str(dirs.mnt)], check=False)
        assert result.returncode != 0
        assert result.stderr.splitlines() == [f"layerfs-overlay: {message}"]
