"""Overlay semantics, each scenario run on the engine directly and on real FUSE mounts: in the
run's tmp dir, and (the scenarios marked `every_fs`; all of them with --long) with the layers on
each filesystem of `tests.fsmatrix`.

The layers are built here in the kernel overlayfs on-disk format (and the rootless `.wh.`
forms); where the upper dir must have a particular shape afterwards, the test looks at it and,
for directory renames, mounts it with the kernel's overlayfs to check that it reads the same.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

import pytest

from layerfs import syscalls
from layerfs.overlay.engine import Engine
from tests import fsmatrix
from tests.conftest import every_filesystem
from tests.fsapi import EngineFS, Layers, MountFS, kernel_overlay, mounted_overlay

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.fsmatrix import ScratchFilesystems

FS = EngineFS | MountFS
SPARSE_SIZE = 8 << 20
DATA = bytes(range(256)) * 8192  # 2 MiB


def build_layers(base: Path, upper_base: Path | None = None) -> Layers:
    """The scenarios' two lowers under `base`, and an empty upper and work dir under
    `upper_base` (by default `base` too)."""
    upper_base = base if upper_base is None else upper_base
    l1, l2, upper, work = base / "l1", base / "l2", upper_base / "upper", upper_base / "work"
    for d in (l1, l2, upper, work):
        d.mkdir()
    # bottom layer
    (l2 / "a").write_bytes(b"lower2-a")
    (l2 / "d" / "sub").mkdir(parents=True)
    (l2 / "d" / "f1").write_bytes(b"f1")
    (l2 / "d" / "sub" / "g").write_bytes(b"g")
    (l2 / "gone").mkdir()
    (l2 / "gone" / "x").write_bytes(b"x")
    (l2 / "rootless").write_bytes(b"hidden by a .wh. file")
    (l2 / "hl1").write_bytes(b"hard")
    os.link(l2 / "hl1", l2 / "hl2")
    (l2 / "suid").write_bytes(b"#!/bin/sh\n")
    os.chown(l2 / "suid", 1000, 1000)
    os.chmod(l2 / "suid", 0o4755)
    (l2 / "xf").write_bytes(b"xattrs")
    os.setxattr(l2 / "xf", "user.color", b"blue")
    os.setxattr(l2 / "xf", "trusted.t", b"1")
    with open(l2 / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(SPARSE_SIZE - 4)
        f.write(b"tail")
    os.symlink("a", l2 / "sym")
    (l2 / "opq").mkdir()
    (l2 / "opq" / "old").write_bytes(b"old")
    (l2 / "opq2").mkdir()
    (l2 / "opq2" / "o").write_bytes(b"o")
    os.mknod(l2 / "dev", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (l2 / "data").write_bytes(DATA)
    os.utime(l2 / "a", ns=(1_000_000_000, 2_000_000_000))
    # top lower layer
    (l1 / "a").write_bytes(b"lower1-a")
    os.utime(l1 / "a", ns=(1_000_000_000, 3_000_000_000))
    (l1 / "d").mkdir()
    (l1 / "d" / "f2").write_bytes(b"f2")
    syscalls.make_whiteout(os.fsencode(l1 / "gone"))
    (l1 / ".wh.rootless").write_bytes(b"")
    (l1 / "opq").mkdir()
    os.setxattr(l1 / "opq", "trusted.overlay.opaque", b"y")
    (l1 / "opq" / "new").write_bytes(b"new")
    (l1 / "opq2").mkdir()
    (l1 / "opq2" / ".wh..wh..opq").write_bytes(b"")
    (l1 / "opq2" / "n").write_bytes(b"n")
    return Layers([l1, l2], upper, work)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each scenario on the engine and on a mount in the run's tmp dir; on a mount on each
    filesystem of the matrix too where `every_filesystem` says so."""
    if "env" not in metafunc.fixturenames:
        return
    tiers = ["engine", "mount"]
    if every_filesystem(metafunc.config, metafunc.definition):
        tiers += [f"mount-{p.name}" for p in fsmatrix.PLACEMENTS]
    metafunc.parametrize("env", tiers, indirect=True)


@pytest.fixture
def env(
    request: pytest.FixtureRequest, tmp_path: Path, scratch_filesystems: ScratchFilesystems
) -> Iterator[tuple[FS, Layers]]:
    tier: str = request.param
    if tier.startswith("mount-"):
        placement = fsmatrix.BY_NAME[tier.removeprefix("mount-")]
        layers = build_layers(scratch_filesystems.dir(placement.lower_fs),
                              scratch_filesystems.dir(placement.upper_fs))
        with fsmatrix.placed_lowers(placement, layers.lowers) as lowers:
            yield from _mounted(Layers(lowers, layers.upper, layers.work), tmp_path)
        return
    layers = build_layers(tmp_path)
    if tier == "engine":
        engine = Engine(
            [os.fsencode(p) for p in layers.lowers],
            os.fsencode(layers.upper),
            os.fsencode(layers.work),
        )
        yield EngineFS(engine), layers
        return
    yield from _mounted(layers, tmp_path)


def _mounted(layers: Layers, tmp_path: Path) -> Iterator[tuple[FS, Layers]]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted_overlay(layers, mnt, log=tmp_path / "daemon.log") as fs:
        yield fs, layers
    log = (tmp_path / "daemon.log").read_text() if (tmp_path / "daemon.log").exists() else ""
    assert "ERROR" not in log and "Traceback" not in log, log


def errno_of(func: object, *args: object) -> int:
    try:
        func(*args)  # type: ignore[operator]
    except OSError as exc:
        return exc.errno or 0
    return 0


# ---------------------------------------------------------------- lookup and listing
@pytest.mark.every_fs
def test_upper_layers_shadow_lower_and_dirs_merge(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    assert fs.read("a") == b"lower1-a"
    assert fs.listdir("d") == ["f1", "f2", "sub"]
    assert fs.read("d/sub/g") == b"g"
    assert fs.readlink("sym") == "a"
    assert fs.stat("a").st_mtime_ns == 3_000_000_000


def test_whiteouts_and_opaque_dirs_hide_lower_names(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    names = fs.listdir()
    assert "gone" not in names and "rootless" not in names
    assert not any(n.startswith(".wh.") for n in names)
    assert errno_of(fs.stat, "gone") == errno.ENOENT
    assert errno_of(fs.stat, "rootless") == errno.ENOENT
    assert fs.listdir("opq") == ["new"]
    assert fs.listdir("opq2") == ["n"]


def test_readdir_inode_numbers_agree_with_stat(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    inos = fs.dir_inos()
    for name, ino in inos.items():
        if name in (".", ".."):
            continue
        assert fs.stat(name).st_ino == ino, name
    assert len(set(inos.values())) == len(inos) - (1 if "hl1" in inos else 0)
    assert fs.stat("hl1").st_ino == fs.stat("hl2").st_ino


def test_device_nodes_and_setuid_bits_show_as_they_are(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    st = fs.stat("dev")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    st = fs.stat("suid")
    assert st.st_mode & 0o7777 == 0o4755 and (st.st_uid, st.st_gid) == (1000, 1000)


# ---------------------------------------------------------------- copy-up
def test_reading_never_copies_up(env: tuple[FS, Layers]) -> None:
    fs, layers = env
    fs.read("a")
    fs.read("d/sub/g")
    fs.listdir("d/sub")
    assert list(layers.upper.iterdir()) == []


@pytest.mark.every_fs
def test_write_copies_up_keeping_metadata(env: tuple[FS, Layers]) -> None:
    fs, layers = env
    before = fs.stat("suid")
    fs.write("suid", b"#!", 0, create=False)
    up = os.lstat(layers.upper / "suid")
    assert up.st_mode & 0o7777 == 0o4755
    assert (up.st_uid, up.st_gid) == (1000, 1000)
    assert fs.stat("suid").st_ino == before.st_ino
    fs.write("xf", b"X", 0, create=False)
    assert os.getxattr(layers.upper / "xf", "user.color") == b"blue"
    assert os.getxattr(layers.upper / "xf", "trusted.t") == b"1"
    assert fs.read("xf") == b"Xattrs"


@pytest.mark.every_fs
def test_copy_up_keeps_mtime_and_holes(env: tuple[FS, Layers]) -> None:
    fs, layers = env
    fs.chmod("a", 0o600)
    assert os.lstat(layers.upper / "a").st_mtime_ns == 3_000_000_000
    fs.write("sparse", b"H", 0, create=False)
    up = os.lstat(layers.upper / "sparse")
    assert up.st_size == SPARSE_SIZE
    assert up.st_blocks * 512 < SPARSE_SIZE // 4  # the hole survived
    assert fs.read("sparse")[-4:] == b"tail"


def test_truncate_and_chown_of_lower_files(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    fs.truncate("a", 3)
    assert fs.read("a") == b"low"
    fs.truncate("d/f1", 0)
    assert fs.read("d/f1") == b""
    fs.chown("d/sub/g", 1234, 5678)
    st = fs.stat("d/sub/g")
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert fs.listdir("d") == ["f1", "f2", "sub"]


@pytest.mark.every_fs
def test_read_handle_sees_later_copy_up(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    fd = fs.open_read("d/f1")
    try:
        fs.write("d/f1", b"F", 0, create=False)
        assert fs.pread(fd, 10, 0) == b"F1"
    finally:
        fs.close(fd)


# ---------------------------------------------------------------- deleting
@pytest.mark.every_fs
def test_unlink_of_lower_file_leaves_whiteout(env: tuple[FS, Layers]) -> None:
    fs, layers = env
    fs.unlink("d/f1")
    assert fs.listdir("d") == ["f2", "sub"]
    st = os.lstat(layers.upper / "d" / "f1")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    fs.write("d/f1", b"again")
    assert fs.read("d/f1") == b"again"
    assert stat.S_ISREG(os.lstat(layers.upper / "d" / "f1").st_mode)


def test_unlink_of_upper_only_file_leaves_nothing(env: tuple[FS, Layers]) -> None:
    fs, layers = env
    fs.write("new", b"n")
    fs.unlink("new")
    assert not (layers.upper / "new").exists()
    assert errno_of(fs.unlink, "new") == errno.ENOENT


@pytest.mark.every_fs
def test_rmdir_then_mkdir_gives_an_opaque_dir(env: tuple[FS, Layers]) -> None:
    fs, layers = env
    assert errno_of(fs.rmdir, "d") == errno.ENOTEMPTY
    for name in ("d/sub/g", "d/f1", "d/f2"):
        fs.unlink(name)
    fs.rmdir("d/sub")
    fs.rmdir("d")
    assert "d" not in fs.listdir()
    assert stat.S_ISCHR(os.lstat(layers.upper / "d").st_mode)
    fs.mkdir("d")
    assert fs.listdir("d") == []
    assert os.getxattr(layers.upper / "d", "trusted.overlay.opaque") == b"y"


def test_errors_match_posix(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    assert errno_of(fs.mkdir, "d") == errno.EEXIST
    assert errno_of(fs.rmdir, "a") == errno.ENOTDIR
    assert errno_of(fs.unlink, "d") == errno.EISDIR
    assert errno_of(fs.stat, "nothing") == errno.ENOENT
    assert errno_of(fs.rename, "d", "d/sub/inside") == errno.EINVAL
    assert errno_of(fs.rename, "a", "d") == errno.EISDIR
    assert errno_of(fs.rename, "d", "a") == errno.ENOTDIR
    assert errno_of(fs.rename, "opq", "d") == errno.ENOTEMPTY
    assert errno_of(fs.link, "d", "dlink") == errno.EPERM
    assert errno_of(fs.symlink, "x", "a") == errno.EEXIST


# ---------------------------------------------------------------- rename
def test_rename_of_a_lower_directory_works_and_kernel_reads_it(
    env: tuple[FS, Layers], tmp_path: Path
) -> None:
    fs, layers = env
    fs.rename("d", "moved")
    assert fs.listdir("moved") == ["f1", "f2", "sub"]
    assert fs.read("moved/sub/g") == b"g"
    fs.write("moved/sub/h", b"h")
    fs.rename("moved/sub", "sub2")
    assert "d" not in fs.listdir()
    assert fs.listdir("sub2") == ["g", "h"]
    if isinstance(fs, MountFS):
        return  # the kernel may only mount the dirs once our mount is gone: engine case
    kmnt = tmp_path / "kernel"
    kmnt.mkdir()
    with kernel_overlay(layers, kmnt) as kfs:
        assert kfs.listdir("moved") == ["f1", "f2"]
        assert kfs.listdir("sub2") == ["g", "h"]
        assert "d" not in kfs.listdir()


@pytest.mark.every_fs
def test_rename_flags(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    assert errno_of(fs.rename, "a", "xf", syscalls.RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(fs.rename, "a", "nothing", syscalls.RENAME_EXCHANGE) == errno.ENOENT
    fs.rename("a", "d", syscalls.RENAME_EXCHANGE)
    assert fs.read("d") == b"lower1-a"
    assert fs.listdir("a") == ["f1", "f2", "sub"]
    fs.rename("xf", "fresh", syscalls.RENAME_NOREPLACE)
    assert fs.read("fresh") == b"xattrs" and "xf" not in fs.listdir()


def test_rename_over_an_empty_merged_dir(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    fs.unlink("opq/new")
    fs.rename("d", "opq")
    assert fs.listdir("opq") == ["f1", "f2", "sub"]
    assert "d" not in fs.listdir()


def test_rename_of_upper_dir_over_whiteout_is_opaque(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    fs.mkdir("fresh")
    fs.write("fresh/x", b"x")
    for name in ("d/sub/g", "d/f1", "d/f2"):
        fs.unlink(name)
    fs.rmdir("d/sub")
    fs.rmdir("d")
    fs.rename("fresh", "d")
    assert fs.listdir("d") == ["x"]


# ---------------------------------------------------------------- links
@pytest.mark.every_fs
def test_hard_links_stay_together_on_copy_up(env: tuple[FS, Layers]) -> None:
    fs, layers = env
    fs.write("hl1", b"HARD", 0, create=False)
    assert fs.read("hl2") == b"HARD"
    assert fs.stat("hl1").st_nlink == 2
    assert os.lstat(layers.upper / "hl1").st_ino == os.lstat(layers.upper / "hl2").st_ino


def test_unlinking_one_name_of_a_lower_group_counts_the_rest(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    fs.unlink("hl2")
    assert fs.stat("hl1").st_nlink == 1
    assert fs.read("hl1") == b"hard"


def test_link_count_is_right_at_once(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    fs.link("a", "a2")
    assert fs.stat("a").st_nlink == 2 and fs.stat("a2").st_nlink == 2
    fs.write("a2", b"L", 0, create=False)
    assert fs.read("a") == b"Lower1-a"
    fs.unlink("a")
    assert fs.stat("a2").st_nlink == 1


def test_symlinks_fifos_and_devices_can_be_made(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    fs.symlink("../a", "d/up")
    assert fs.readlink("d/up") == "../a"
    fs.mknod("fifo", stat.S_IFIFO | 0o600)
    assert stat.S_ISFIFO(fs.stat("fifo").st_mode)
    fs.mknod("zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    assert fs.stat("zero").st_rdev == os.makedev(1, 5)


# ---------------------------------------------------------------- xattrs
@pytest.mark.every_fs
def test_xattrs_private_names_hidden_and_escaped(env: tuple[FS, Layers]) -> None:
    fs, layers = env
    assert "trusted.overlay.opaque" not in fs.listxattr("opq")
    assert errno_of(fs.getxattr, "opq", "trusted.overlay.opaque") == errno.ENODATA
    assert fs.listxattr("xf") == ["trusted.t", "user.color"]
    assert errno_of(fs.removexattr, "xf", "user.none") == errno.ENODATA
    assert list(layers.upper.iterdir()) == []  # a failed remove copies nothing up
    fs.setxattr("xf", "trusted.overlay.mine", b"v")
    assert fs.getxattr("xf", "trusted.overlay.mine") == b"v"
    assert os.getxattr(layers.upper / "xf", "trusted.overlay.overlay.mine") == b"v"
    fs.removexattr("xf", "user.color")
    assert fs.listxattr("xf") == ["trusted.overlay.mine", "trusted.t"]


def test_inode_numbers_stable_across_copy_up(env: tuple[FS, Layers]) -> None:
    fs, _ = env
    before = {n: fs.stat(n).st_ino for n in ("a", "d", "d/f1", "hl1")}
    fs.chmod("a", 0o600)
    fs.write("d/f1", b"x", 0, create=False)
    fs.write("hl1", b"x", 0, create=False)
    fs.rename("d", "d3")
    after = {
        "a": fs.stat("a").st_ino,
        "d": fs.stat("d3").st_ino,
        "d/f1": fs.stat("d3/f1").st_ino,
        "hl1": fs.stat("hl1").st_ino,
    }
    assert before == after


# ---------------------------------------------------------------- metadata-only copy-up
@pytest.mark.every_fs
def test_chmod_of_a_lower_file_copies_no_data(env: tuple[FS, Layers]) -> None:
    fs, layers = env
    fs.chmod("data", 0o600)
    up = os.lstat(layers.upper / "data")
    assert up.st_size == len(DATA) and up.st_blocks <= 8  # metadata only, no data blocks
    assert os.getxattr(layers.upper / "data", "trusted.overlay.metacopy") == b""
    st = fs.stat("data")
    assert st.st_mode & 0o777 == 0o600 and st.st_size == len(DATA) and st.st_blocks > 8
    assert fs.read("data") == DATA
    assert "trusted.overlay.metacopy" not in fs.listxattr("data")


def test_writing_a_metadata_only_copy_copies_the_data_and_keeps_the_metadata(
    env: tuple[FS, Layers]
) -> None:
    fs, layers = env
    fs.chown("data", 123, 456)
    fs.chmod("data", 0o640)
    fs.setxattr("data", "user.k", b"v")
    fs.utime("data", (5_000_000_000, 6_000_000_000))
    fd = fs.open_read("data")
    try:
        assert fs.pread(fd, 4, 0) == DATA[:4]
        fs.write("data", b"XY", 1, create=False)
        assert fs.pread(fd, 4, 0) == DATA[:1] + b"XY" + DATA[3:4]  # the reader follows
    finally:
        fs.close(fd)
    up = os.lstat(layers.upper / "data")
    assert "trusted.overlay.metacopy" not in os.listxattr(layers.upper / "data")
    assert (up.st_uid, up.st_gid, up.st_mode & 0o777) == (123, 456, 0o640)
    assert os.getxattr(layers.upper / "data", "user.k") == b"v"
    assert fs.read("data") == DATA[:1] + b"XY" + DATA[3:]
    assert fs.stat("data").st_ino == fs.stat("data").st_ino


def test_a_metadata_only_copy_survives_a_new_engine(tmp_path: Path) -> None:
    layers = build_layers(tmp_path)
    args = ([os.fsencode(p) for p in layers.lowers], os.fsencode(layers.upper),
            os.fsencode(layers.work))
    first = EngineFS(Engine(*args))
    ino = first.stat("data").st_ino
    first.chmod("data", 0o600)
    second = EngineFS(Engine(*args))
    assert second.read("data") == DATA
    assert second.stat("data").st_ino == ino
    assert second.stat("data").st_mode & 0o777 == 0o600
    second.truncate("data", 10)
    assert second.read("data") == DATA[:10]
