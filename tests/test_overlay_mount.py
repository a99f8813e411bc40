"""The `layerfs-overlay` command: both call forms, refusals, and the daemon's life and death."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fsapi import (
    OVERLAY_CMD,
    Layers,
    MountFS,
    daemon_pid,
    is_mounted,
    mounted_overlay,
    unmount,
)


@pytest.fixture
def layers(tmp_path: Path) -> Layers:
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "big").write_bytes(os.urandom(1 << 20))
    (lower / "dir").mkdir()
    (lower / "dir" / "f").write_bytes(b"f")
    return Layers([lower], upper, work)


@pytest.fixture
def mnt(tmp_path: Path) -> Path:
    path = tmp_path / "mnt"
    path.mkdir()
    return path


def run_overlay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OVERLAY_CMD, *args], capture_output=True, text=True, timeout=30)


def wait_gone(pid: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    raise AssertionError(f"daemon {pid} did not exit")


def test_mount_fuse3_call_form_with_generic_options(layers: Layers, mnt: Path) -> None:
    result = run_overlay("overlay", str(mnt), "-o", f"rw,dev,suid,noatime,{layers.option()}")
    assert result.returncode == 0, result.stderr
    try:
        assert MountFS(mnt).listdir() == ["big", "dir"]
    finally:
        unmount(mnt)


@pytest.mark.parametrize("name", [b"with space", b"tab\tand\\backslash", b"not-utf8-\xff"],
                         ids=["space", "tab-backslash", "not-utf8"])
def test_a_mountpoint_of_any_name_mounts(layers: Layers, tmp_path: Path, name: bytes) -> None:
    """mountinfo escapes some bytes and need not be UTF-8: the daemon must still see that its
    mount is up (it used to take the mount for dead and fail)."""
    mnt = os.fsencode(tmp_path) + b"/" + name
    os.mkdir(mnt)
    result = subprocess.run([os.fsencode(OVERLAY_CMD), b"-o", layers.option().encode(), mnt],
                            capture_output=True, timeout=30)
    try:
        assert result.returncode == 0, result.stderr
        assert os.listdir(mnt + b"/dir") == [b"f"]
    finally:
        subprocess.run([b"fusermount3", b"-u", b"-z", mnt], capture_output=True, check=False)


def test_mount_through_mount8(layers: Layers, mnt: Path) -> None:
    if not Path("/usr/local/bin/layerfs-overlay").exists():
        pytest.skip("tools/setup links layerfs-overlay into /usr/local/bin for mount(8)")
    subprocess.run(["mount", "-t", "fuse.layerfs-overlay", "overlay", str(mnt), "-o",
                    layers.option()], check=True)
    try:
        assert MountFS(mnt).read("dir/f") == b"f"
    finally:
        unmount(mnt)


def test_lowerdir_alone_is_read_only(layers: Layers, mnt: Path) -> None:
    result = run_overlay("-o", f"lowerdir={layers.lowers[0]}", str(mnt))
    assert result.returncode == 0, result.stderr
    try:
        with pytest.raises(OSError) as info:
            MountFS(mnt).write("new", b"x")
        assert info.value.errno == 30  # EROFS
    finally:
        unmount(mnt)


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda L, m: ["-o", L.option(), str(m / "missing")], "does not exist"),
        (lambda L, m: ["-o", L.option(), str(L.lowers[0] / "big")], "not a directory"),
        (lambda L, m: ["-o", L.option(), str(L.upper)], "inside upperdir"),
        (lambda L, m: ["-o", L.option(), str(L.lowers[0] / "dir")], "inside lowerdir"),
        (lambda L, m: ["-o", L.option().replace("lower,", "nolower,"), str(m)],
         "lowerdir"),
        (lambda L, m: ["-o", L.option() + ",bogus=1", str(m)], "bogus: unknown option"),
        (lambda L, m: ["-o", f"upperdir={L.upper},workdir={L.work}", str(m)], "lowerdir"),
        (lambda L, m: ["-o", L.option().replace(f"workdir={L.work}", "workdir=/dev/shm"),
                       str(m)], "not on the filesystem"),
    ],
)
def test_bad_requests_are_refused_before_mounting(
    layers: Layers, mnt: Path, make_args: object, message: str
) -> None:
    result = run_overlay(*make_args(layers, mnt))  # type: ignore[operator]
    assert result.returncode != 0
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not is_mounted(mnt)


def test_second_mount_of_a_live_upper_is_refused(layers: Layers, mnt: Path,
                                                 tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with mounted_overlay(layers, mnt):
        result = run_overlay("-o", layers.option(), str(other))
        assert result.returncode != 0
        assert "in use by another live mount" in result.stderr
        assert not is_mounted(other)


def test_sigterm_unmounts_cleanly(layers: Layers, mnt: Path) -> None:
    assert run_overlay("-o", layers.option(), str(mnt)).returncode == 0
    pid = daemon_pid(mnt)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid)
    assert not is_mounted(mnt)


def test_fusermount_unmount_ends_the_daemon(layers: Layers, mnt: Path) -> None:
    assert run_overlay("-o", layers.option(), str(mnt)).returncode == 0
    pid = daemon_pid(mnt)
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    wait_gone(pid)


def test_sigkill_leaves_the_upper_consistent_and_remount_works(
    layers: Layers, mnt: Path
) -> None:
    assert run_overlay("-o", layers.option(), str(mnt)).returncode == 0
    fs = MountFS(mnt)
    fs.write("dir/new", b"new")
    before = fs.stat("big").st_ino
    pid = daemon_pid(mnt)
    # kill it in the middle of work: a copy-up of the big file
    writer = subprocess.Popen(["sh", "-c", f"echo x >> {mnt}/big"],
                              stderr=subprocess.DEVNULL)
    os.kill(pid, signal.SIGKILL)
    writer.wait(timeout=10)
    wait_gone(pid)
    unmount(mnt)  # the kernel keeps the dead mount (ENOTCONN) until it is unmounted
    for entry in layers.upper.rglob("*"):
        assert not entry.name.startswith("#"), f"staged copy under its real name: {entry}"
    with mounted_overlay(layers, mnt) as fs2:
        assert fs2.read("dir/new") == b"new"
        big = fs2.read("big")
        lower = (layers.lowers[0] / "big").read_bytes()
        assert big in (lower, lower + b"x\n")  # old state or new one, never half
        assert fs2.stat("big").st_ino == before
    assert not any(p.name.startswith("#") for p in layers.work.iterdir())


def test_inode_numbers_survive_remount(layers: Layers, mnt: Path) -> None:
    with mounted_overlay(layers, mnt) as fs:
        before = {n: fs.stat(n).st_ino for n in ("big", "dir", "dir/f")}
        fs.chmod("big", 0o600)
        fs.rename("dir", "dir2")
    with mounted_overlay(layers, mnt) as fs:
        after = {"big": fs.stat("big").st_ino, "dir": fs.stat("dir2").st_ino,
                 "dir/f": fs.stat("dir2/f").st_ino}
    assert before == after


def test_chroot_runs_a_static_busybox(tmp_path: Path, mnt: Path) -> None:
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("busybox-static is installed by tools/setup")
    lower, upper, work = (tmp_path / n for n in ("rootfs", "up", "wk"))
    for d in (lower / "bin", upper, work):
        d.mkdir(parents=True)
    (lower / "bin" / "busybox").write_bytes(busybox.read_bytes())
    os.chmod(lower / "bin" / "busybox", 0o755)
    os.symlink("busybox", lower / "bin" / "sh")
    with mounted_overlay(Layers([lower], upper, work), mnt):
        out = subprocess.run(
            ["chroot", str(mnt), "/bin/sh", "-c", "echo hi > /greeting; busybox cat /greeting"],
            capture_output=True, text=True, check=True,
        )
        assert out.stdout == "hi\n"
    assert (upper / "greeting").read_text() == "hi\n"


def test_concurrent_writers_of_a_big_lower_file_share_one_copy_up(
    tmp_path: Path, mnt: Path
) -> None:
    lower, upper, work = (tmp_path / n for n in ("lo", "up", "wk"))
    for d in (lower, upper, work):
        d.mkdir()
    data = os.urandom(16 << 20)  # above the size copied up in a worker thread
    (lower / "big").write_bytes(data)
    with mounted_overlay(Layers([lower], upper, work), mnt):
        script = (
            "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY); "
            "os.pwrite(fd, b'WWWW', int(sys.argv[2]))"
        )
        writers = [
            subprocess.Popen(["python3", "-c", script, str(mnt / "big"), str(off)])
            for off in (0, 8 << 20, (16 << 20) - 4)
        ]
        assert all(w.wait(timeout=60) == 0 for w in writers)
        listing = MountFS(mnt).listdir()  # the mount answered while copying
        merged = MountFS(mnt).read("big")
    expected = bytearray(data)
    for off in (0, 8 << 20, (16 << 20) - 4):
        expected[off : off + 4] = b"WWWW"
    assert listing == ["big"]
    assert merged == bytes(expected)
    assert (upper / "big").read_bytes() == bytes(expected)


def test_o_direct_writes_of_any_size_work(layers: Layers, mnt: Path) -> None:
    with mounted_overlay(layers, mnt):
        fd = os.open(mnt / "direct", os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
        try:
            assert os.write(fd, b"x" * 100) == 100  # not a multiple of the block size
        finally:
            os.close(fd)
        assert (mnt / "direct").read_bytes() == b"x" * 100
