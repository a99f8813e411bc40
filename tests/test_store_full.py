"""`layerfs import`, `pull`, `load` and `commit` with the store on a full filesystem: one line
on stderr naming the lack of space, no traceback, the store exactly as it was (every path, its
type, mode, owner, size and content digest; no staging left over; the same `images`), and the
same command succeeds once space is freed, so nothing half-written was left in its way.

The store lives on a small filesystem of the test's own (tests/fsmatrix.py: a tmpfs, or a
loop-mounted ext4 with its journal, delayed allocation and reserved blocks), next to a filler
file that takes all the space but what a test leaves. Each command then brings a `BIG` file
of random bytes (incompressible, so its blob is as big as its layer), and each test runs twice:
with `LEFT` free (nothing fits) and with `BIG + LEFT` (a blob fits, its unpacked layer does
not: what was written first must be taken back).

Container uppers are in the store too (`containers/ID/upper`): the commit test writes its big
file into the upper first, and only then fills the disk, so that the commit has no room.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import TYPE_CHECKING, Any

import pytest

# The fixtures module is a plugin (below) and a helper module: rewrite its asserts.
pytest.register_assert_rewrite("tests.registry_fixtures")

from tests.containertools import ContainerStore, busybox_user_tarball  # noqa: E402
from tests.fsmatrix import mounted_filesystem  # noqa: E402
from tests.imagetools import (  # noqa: E402
    Store,
    directory,
    file,
    make_tar,
    write_oci_layout,
)

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.registry_fixtures import Registry, Skopeo

pytest_plugins = ["tests.registry_fixtures"]

BIG = 24 << 20
"""What each command brings: more than is left."""
LEFT = 6 << 20
"""What the filler leaves free at least: room for the index and staging dirs."""
LEAVE = [pytest.param(LEFT, id="nothing-fits"), pytest.param(BIG + LEFT, id="blob-fits")]
FS_SIZE = 128 << 20
"""The base image, a `BIG` upper, and after the filler goes a `BIG` blob and layer."""
BASE = "bb:base"
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"

KINDS = ["tmpfs", "ext4"]

Listing = dict[str, tuple[Any, ...]]


# -- the full filesystem --------------------------------------------------------------------------


def fill(filler: Path, leave: int) -> None:
    """Write `filler` until its filesystem says no, then give back `leave` bytes.

    Written to ENOSPC rather than to statvfs' f_bavail: root may write into ext4's reserved
    blocks, and so does layerfs when the tests run as root. Again after each fsync, in
    smaller pieces: ext4 says no early while delayed allocation holds back room for metadata
    it gives back once the data is on disk."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for size in (1 << 20, 64 << 10, 4 << 10):
            chunk = b"\xa5" * size
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                        raise
                    break
            os.fsync(fd)
        size = os.fstat(fd).st_size
        assert size > leave, f"{filler}: the filesystem was full before the filler"
        os.ftruncate(fd, size - leave)
        os.fsync(fd)
    finally:
        os.close(fd)


def listing(root: Path) -> Listing:
    """Every path under the store with its type and mode, owner, size and content digest
    (symlinks: their target; devices: their number). A directory's size is left out: ext4
    never shrinks a directory once an entry made it grow, and its entries are listed anyway."""
    out: Listing = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, root)
            meta = (st.st_mode, st.st_uid, st.st_gid)
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                out[rel] = (*meta, st.st_size, h.hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = (*meta, os.readlink(path))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                out[rel] = (*meta, st.st_rdev)
            else:
                out[rel] = meta
    return out


def random_tar(name: str, seed: bytes) -> bytes:
    """A layer / rootfs tar holding one `BIG` file of incompressible bytes."""
    data = hashlib.shake_256(seed).digest(BIG)
    return make_tar(directory("data"), file(f"data/{name}", data))


class FullStore:
    """A store on a small filesystem of its own, with a filler file beside it (not in it)."""

    def __init__(self, mnt: Path) -> None:
        self.mnt = mnt
        self.store = ContainerStore(mnt / "store")
        self.filler = mnt / "filler"

    def fill(self, leave: int) -> None:
        fill(self.filler, leave)

    def free(self) -> None:
        self.filler.unlink()

    def images(self) -> str:
        return self.store.ok("images", "-a", "--no-trunc", "--digests", "--format", "json")

    def fails_for_space(self, *args: str) -> None:
        """`layerfs ARGS` on the full store: one line saying no space, nothing changed."""
        assert not self.attempt(*args), f"layerfs {' '.join(args)} succeeded on a full store"

    def attempt(self, *args: str) -> bool:
        """`layerfs ARGS`: whether it succeeded; if not, it must have said so in one line
        naming the lack of space, and left the store and `layerfs images` as they were."""
        before, images = listing(self.store.root), self.images()
        result = self.store.run(*args)
        if result.returncode == 0:
            return True
        assert "Traceback" not in result.stderr, result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1, f"layerfs {' '.join(args)}: not one line:\n{result.stderr}"
        assert lines[0].startswith("layerfs: ") and NO_SPACE in lines[0], lines[0]
        print(f"layerfs {' '.join(args)} -> {lines[0]}")  # shown by `pytest -rP`
        after = listing(self.store.root)
        changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        assert not changed, f"the store changed: {changed}"
        assert self.images() == images
        return False


@pytest.fixture(scope="module")
def base_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_user_tarball(tmp_path_factory.mktemp("busybox"))


@pytest.fixture(params=KINDS)
def full(request: pytest.FixtureRequest, tmp_path: Path, base_tar: Path) -> Iterator[FullStore]:
    """A store with the busybox image `bb:base` on a small filesystem (not filled yet)."""
    with mounted_filesystem(request.param, tmp_path / "fs", FS_SIZE) as mnt:
        fs = FullStore(mnt)
        try:
            fs.store.ok("import", str(base_tar), BASE)
            yield fs
        finally:
            fs.store.cleanup()


# -- the four commands ----------------------------------------------------------------------------


@pytest.mark.parametrize("leave", LEAVE)
def test_import_of_a_tarball_bigger_than_the_free_space(
    full: FullStore, leave: int, tmp_path: Path
) -> None:
    tarball = tmp_path / "big-rootfs.tar"
    tarball.write_bytes(random_tar("import", b"import"))
    full.fill(leave)
    full.fails_for_space("import", str(tarball), "big:import")
    full.free()
    full.store.ok("import", str(tarball), "big:import")
    assert "big" in full.store.ok("images")


@pytest.mark.parametrize("leave", LEAVE)
def test_load_of_an_archive_bigger_than_the_free_space(
    full: FullStore, leave: int, tmp_path: Path
) -> None:
    maker = Store(tmp_path / "maker-store")  # on the host: where the archive is made
    tarball = tmp_path / "big-rootfs.tar"
    tarball.write_bytes(random_tar("load", b"load"))
    maker.ok("import", str(tarball), "big:load")
    archive = tmp_path / "big.tar"
    maker.ok("save", "-o", str(archive), "big:load")
    full.fill(leave)
    full.fails_for_space("load", "-i", str(archive))
    full.free()
    assert "Loaded image: big:load" in full.store.ok("load", "-i", str(archive))
    assert full.store.image_id("big:load") == maker.image_id("big:load")


@pytest.mark.parametrize("leave", LEAVE)
def test_pull_of_an_image_bigger_than_the_free_space(
    full: FullStore, leave: int, tmp_path: Path, registry: Registry, skopeo_tool: Skopeo
) -> None:
    layout = tmp_path / "oci"
    built = write_oci_layout(layout, "big", [random_tar("pull", b"pull")])
    ref = registry.ref(f"test/full-{tmp_path.name.lower()}:big")
    skopeo_tool.push(layout, ref)
    full.fill(leave)
    full.fails_for_space("pull", ref)
    full.free()
    full.store.ok("pull", ref)
    assert full.store.image_id(ref) == built.config_digest


@pytest.mark.parametrize("leave", LEAVE)
def test_commit_of_an_upper_bigger_than_the_free_space(
    full: FullStore, leave: int, tmp_path: Path
) -> None:
    mnt = tmp_path / "m"
    full.store.mount(BASE, mnt, "--name", "c")
    (mnt / "root" / "big").write_bytes(hashlib.shake_256(b"commit").digest(BIG))
    full.store.unmount(mnt)
    upper = full.store.root / "containers" / full.store.container_ids()[0] / "upper"
    assert (upper / "root" / "big").stat().st_size == BIG, "the upper is not in the store"
    full.fill(leave)
    full.fails_for_space("commit", "c", "big:commit")
    full.free()
    full.store.ok("commit", "c", "big:commit")
    assert "big" in full.store.ok("images")


# -- every step a command can fail at -------------------------------------------------------------


@pytest.fixture
def tmpfs_full(tmp_path: Path, base_tar: Path) -> Iterator[FullStore]:
    with mounted_filesystem("tmpfs", tmp_path / "fs", FS_SIZE) as mnt:
        fs = FullStore(mnt)
        try:
            fs.store.ok("import", str(base_tar), BASE)
            yield fs
        finally:
            fs.store.cleanup()


@pytest.mark.parametrize("command", ["import", "commit"])
def test_a_disk_that_fills_at_any_step_leaves_the_store_as_it_was(
    tmpfs_full: FullStore, tmp_path: Path, command: str
) -> None:
    """From just enough for the blob and the layer, a page more each time, until the command
    succeeds: on the way the disk fills while the layer is installed, then the config, the
    manifest, the index are written (tmpfs counts pages exactly), and every failure leaves
    the store as it was."""
    full = tmpfs_full
    if command == "import":
        tarball = tmp_path / "big-rootfs.tar"
        tarball.write_bytes(random_tar("scan", b"scan"))
        args = ["import", str(tarball), "big:scan"]
    else:
        mnt = tmp_path / "m"
        full.store.mount(BASE, mnt, "--name", "c")
        (mnt / "root" / "big").write_bytes(hashlib.shake_256(b"scan").digest(BIG))
        full.store.unmount(mnt)
        args = ["commit", "c", "big:scan"]
    failures = 0
    for page in range(64):
        full.fill(2 * BIG + page * 4096)
        done = full.attempt(*args)
        full.free()
        if done:
            break
        failures += 1
    else:
        raise AssertionError(f"layerfs {command} failed with {64 * 4096} bytes to spare")
    assert failures >= 3, f"layerfs {command}: the disk filled at {failures} steps only"
    assert "big" in full.store.ok("images")
