"""The fork server that runs `layerfs mount` for callers in its own context.

Each test has a runtime dir of its own, so it sees the server start, serve, decline and go.
`LAYERFS_DEBUG=1` makes the client say where the command ran; what the tests check beyond
that is what a user sees: the mount, the output, the exit status, the error line.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click
import pytest

from layerfs.cli.entry import handed_over
from layerfs.cli.forkserver_client import is_server
from tests.containertools import ContainerStore, busybox_user_tarball
from tests.imagetools import LAYERFS, is_mounted

if TYPE_CHECKING:
    from collections.abc import Iterator

IMAGE = "bb:base"
RAN = "ran the command"
STARTED = "none is up; starting one"


@pytest.mark.parametrize(("args", "expected"), [
    (["mount", "img", "/mnt"], True),
    (["--root", "/s", "mount", "--name", "web", "img", "/mnt"], True),
    (["--root=/s", "mount", "--name=web", "img", "/mnt"], True),
    (["mount", "-f", "img", "/mnt"], False),
    (["mount", "img", "/mnt", "--foreground"], False),
    (["mount", "--help"], False),
    (["--debug", "mount", "img", "/mnt"], False),
    (["umount", "/mnt"], False),
    (["run", "mount", "/mnt"], False),
    (["--root"], False),
    ([], False),
])
def test_only_a_plain_background_mount_is_handed_over(args: list[str], expected: bool) -> None:
    assert handed_over(args) is expected


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "store"
    tar = busybox_user_tarball(tmp_path_factory.mktemp("busybox"))
    ContainerStore(root).ok("import", str(tar), IMAGE)
    return root


@pytest.fixture
def store(tmp_path: Path, template: Path) -> Iterator[ContainerStore]:
    s = ContainerStore.copy_of(template, tmp_path / "store")
    try:
        yield s
    finally:
        s.cleanup()


def mount(store: ContainerStore, runtime: Path, mountpoint: Path, *wrapper: str,
          create: bool = True) -> subprocess.CompletedProcess[str]:
    """`layerfs mount IMAGE MNT` with the client's trace on; unmounted by the store's cleanup."""
    if create:
        mountpoint.mkdir(exist_ok=True)
    store.mounts.append(mountpoint)
    return subprocess.run(
        [*wrapper, str(LAYERFS), "--root", str(store.root), "mount", IMAGE, str(mountpoint)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "LAYERFS_RUNTIME_DIR": str(runtime), "LAYERFS_DEBUG": "1"},
    )


def server_pid(runtime: Path, timeout: float = 30.0) -> int:
    """The pid of the server in `runtime` once it listens (it writes its pid then)."""
    deadline = time.monotonic() + timeout
    while True:
        for lock in runtime.glob("forkserver-*.sock.lock"):
            text = lock.read_text().strip()
            if text.isdigit() and is_server(int(text)):
                return int(text)
        assert time.monotonic() < deadline, "no fork server started"
        time.sleep(0.01)


def test_the_first_mount_starts_a_server_and_the_next_ones_run_in_it(
        store: ContainerStore, runtime: Path, tmp_path: Path) -> None:
    first = mount(store, runtime, tmp_path / "m1")
    assert first.returncode == 0, first.stderr
    assert STARTED in first.stderr
    pid = server_pid(runtime)

    # a relative mountpoint, an environment variable and a umask of the caller's own
    (tmp_path / "work").mkdir()
    (tmp_path / "m2").mkdir()
    second = subprocess.run(
        ["sh", "-c", f'umask 027; exec "$0" --root "$1" mount {IMAGE} ../m2', str(LAYERFS),
         str(store.root)],
        capture_output=True, text=True, cwd=tmp_path / "work", timeout=60,
        env={**os.environ, "LAYERFS_RUNTIME_DIR": str(runtime), "LAYERFS_DEBUG": "1"},
    )
    store.mounts.append(tmp_path / "m2")
    assert second.returncode == 0, second.stderr
    assert RAN in second.stderr
    assert is_mounted(tmp_path / "m2")
    container_id = second.stdout.strip()
    assert len(container_id) == 64
    # the container's dirs were made with the caller's umask, not the server's
    work = store.root / "containers" / container_id / "work"
    assert work.stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "m2" / "etc" / "motd").read_text() == "base motd\n"
    assert server_pid(runtime) == pid  # the same server serves on


def test_a_failing_mount_reports_its_error_and_status_through_the_server(
        store: ContainerStore, runtime: Path, tmp_path: Path) -> None:
    assert mount(store, runtime, tmp_path / "m1").returncode == 0
    server_pid(runtime)
    result = mount(store, runtime, tmp_path / "missing", create=False)
    assert RAN in result.stderr
    assert result.returncode == 1
    error = f"layerfs: {tmp_path / 'missing'}: mountpoint does not exist"
    assert error in result.stderr.splitlines()


@pytest.mark.parametrize("wrapper", [("nice", "-n", "5"), ("unshare", "--mount")],
                         ids=["nice", "mount-namespace"])
def test_a_caller_in_another_context_runs_the_command_itself(
        store: ContainerStore, runtime: Path, tmp_path: Path, wrapper: tuple[str, ...]) -> None:
    assert mount(store, runtime, tmp_path / "m1").returncode == 0
    server_pid(runtime)
    (tmp_path / "m2").mkdir()
    if wrapper[0] == "unshare":
        # the mount must land in the caller's namespace: check it from inside, then unmount
        script = (f'"$0" --root "$1" mount {IMAGE} "$2" && cat "$2/etc/motd" && '
                  f'fusermount3 -u "$2"')
        result = subprocess.run(
            [*wrapper, "sh", "-c", script, str(LAYERFS), str(store.root), str(tmp_path / "m2")],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "LAYERFS_RUNTIME_DIR": str(runtime), "LAYERFS_DEBUG": "1"})
        assert result.returncode == 0, result.stderr
        assert "base motd" in result.stdout
        assert not is_mounted(tmp_path / "m2")
    else:
        result = mount(store, runtime, tmp_path / "m2", *wrapper)
        assert result.returncode == 0, result.stderr
        assert is_mounted(tmp_path / "m2")
    assert "declined: the caller runs in another context" in result.stderr


def test_a_caller_with_stdout_closed_runs_the_command_itself(
        store: ContainerStore, runtime: Path, tmp_path: Path) -> None:
    assert mount(store, runtime, tmp_path / "m1").returncode == 0
    server_pid(runtime)
    (tmp_path / "m2").mkdir()
    store.mounts.append(tmp_path / "m2")
    result = subprocess.run(
        ["sh", "-c", f'exec "$0" --root "$1" mount {IMAGE} "$2" >&-', str(LAYERFS),
         str(store.root), str(tmp_path / "m2")],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "LAYERFS_RUNTIME_DIR": str(runtime), "LAYERFS_DEBUG": "1"})
    assert result.returncode == 0, result.stderr
    assert "declined: file descriptor 1 is closed" in result.stderr
    assert is_mounted(tmp_path / "m2")


def test_a_killed_server_is_replaced(store: ContainerStore, runtime: Path,
                                     tmp_path: Path) -> None:
    assert mount(store, runtime, tmp_path / "m1").returncode == 0
    pid = server_pid(runtime)
    os.kill(pid, signal.SIGKILL)
    while is_server(pid):
        time.sleep(0.01)
    result = mount(store, runtime, tmp_path / "m2")  # its socket is still there: refused
    assert result.returncode == 0, result.stderr
    assert STARTED in result.stderr
    assert server_pid(runtime) != pid
    third = mount(store, runtime, tmp_path / "m3")
    assert third.returncode == 0 and RAN in third.stderr, third.stderr


def test_a_runtime_dir_open_to_others_is_not_used(store: ContainerStore, tmp_path: Path) -> None:
    runtime = tmp_path / "shared"
    runtime.mkdir()
    runtime.chmod(0o777)
    for name in ("m1", "m2"):
        result = mount(store, runtime, tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert is_mounted(tmp_path / name)
    assert list(runtime.iterdir()) == []


def test_layerfs_overlay_runs_in_the_server_too(runtime: Path, tmp_path: Path) -> None:
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for directory in (lower, upper, work):
        directory.mkdir()
    (lower / "hello").write_text("hi\n")
    program = LAYERFS.parent / "layerfs-overlay"
    env = {**os.environ, "LAYERFS_RUNTIME_DIR": str(runtime), "LAYERFS_DEBUG": "1"}

    def overlay(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(program), *args], capture_output=True, text=True,
                              env=env, timeout=60)

    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    mountpoints = [tmp_path / "m1", tmp_path / "m2"]
    try:
        for index, mountpoint in enumerate(mountpoints):
            mountpoint.mkdir()
            result = overlay("-o", options, str(mountpoint))
            assert result.returncode == 0, result.stderr
            assert (mountpoint / "hello").read_text() == "hi\n"
            if index == 0:
                assert STARTED in result.stderr
                server_pid(runtime)
            else:
                assert RAN in result.stderr
                # its daemon shows the caller's command line, not the server's
                assert daemons_with_command_line(
                    [str(program), "-o", options, str(mountpoint)]) != []
            assert subprocess.run(["fusermount3", "-u", str(mountpoint)]).returncode == 0
        refused = overlay("-o", f"bogus=1,{options}", str(mountpoints[0]))
        assert RAN in refused.stderr
        assert refused.returncode == 2
        assert "layerfs-overlay: bogus: unknown option" in refused.stderr.splitlines()
    finally:
        for mountpoint in mountpoints:
            if is_mounted(mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)])


def daemons_with_command_line(argv: list[str]) -> list[int]:
    """Processes named layerfs-overlay whose /proc/PID/cmdline is `argv`: as separate
    arguments, or joined by spaces where the server may not move its argument area."""
    args = [os.fsencode(arg) for arg in argv]
    wanted = (b"\0".join(args) + b"\0", b" ".join(args))
    found = []
    for name in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            comm = Path(f"/proc/{name}/comm").read_text().strip()
        except (OSError, NotADirectoryError):
            continue
        if (cmdline == wanted[0] or cmdline.rstrip(b"\0 ") == wanted[1]) and (
                comm == "layerfs-overlay"):
            found.append(int(name))
    return found


def test_a_changed_source_file_retires_the_server(
        store: ContainerStore, runtime: Path, tmp_path: Path) -> None:
    assert mount(store, runtime, tmp_path / "m1").returncode == 0
    pid = server_pid(runtime)
    # a module the server has loaded, touched with its own times: only inotify can tell
    source = Path(click.__file__)
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = mount(store, runtime, tmp_path / "m2")
    assert second.returncode == 0, second.stderr
    assert STARTED in second.stderr  # "retired": the caller starts a server with the new code
    deadline = time.monotonic() + 30
    while server_pid(runtime) == pid:
        assert time.monotonic() < deadline, "no new server"
        time.sleep(0.01)
    third = mount(store, runtime, tmp_path / "m3")
    assert third.returncode == 0 and RAN in third.stderr, third.stderr
    # the daemon forked from the server keeps none of the server's descriptors
    daemons = [pid for pid in processes_naming(tmp_path / "m3") if pid != server_pid(runtime)]
    assert daemons
    for daemon in daemons:
        held = [os.readlink(f"/proc/{daemon}/fd/{fd}") for fd in os.listdir(f"/proc/{daemon}/fd")]
        assert not [link for link in held if "inotify" in link or "socket" in link], held


def processes_naming(path: Path) -> list[int]:
    """Processes with `path` among their arguments (separate, or joined by spaces: see
    `daemons_with_command_line`)."""
    wanted = os.fsencode(path)
    found = []
    for name in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
        except (OSError, NotADirectoryError):
            continue
        if wanted in cmdline.replace(b"\0", b" ").split():
            found.append(int(name))
    return found


def test_sigterm_ends_the_server_and_removes_its_socket(
        store: ContainerStore, runtime: Path, tmp_path: Path) -> None:
    assert mount(store, runtime, tmp_path / "m1").returncode == 0
    pid = server_pid(runtime)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while is_server(pid):
        assert time.monotonic() < deadline, "the server did not end on SIGTERM"
        time.sleep(0.01)
    assert list(runtime.glob("forkserver-*.sock")) == []
    assert mount(store, runtime, tmp_path / "m2").returncode == 0  # and a new one starts


def test_concurrent_mounts_each_get_their_own_child_and_status(
        store: ContainerStore, runtime: Path, tmp_path: Path) -> None:
    assert mount(store, runtime, tmp_path / "m0").returncode == 0
    server_pid(runtime)
    env = {**os.environ, "LAYERFS_RUNTIME_DIR": str(runtime), "LAYERFS_DEBUG": "1"}
    mountpoints = [tmp_path / f"m{index}" for index in range(1, 5)]
    for mountpoint in mountpoints:
        mountpoint.mkdir()
        store.mounts.append(mountpoint)
    # and one that fails, among them
    argvs = [[str(LAYERFS), "--root", str(store.root), "mount", IMAGE, str(mountpoint)]
             for mountpoint in [*mountpoints, tmp_path / "missing"]]
    running = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env) for argv in argvs]
    results = [(process.wait(timeout=60), *process.communicate()) for process in running]
    for code, out, err in results[:-1]:
        assert code == 0, err
        assert RAN in err
        assert len(out.strip()) == 64
    code, _out, err = results[-1]
    assert code == 1 and RAN in err and "mountpoint does not exist" in err
    assert all(is_mounted(mountpoint) for mountpoint in mountpoints)
    assert len({out for _, out, _ in results[:-1]}) == len(mountpoints)


def test_a_caller_with_fewer_capabilities_is_not_served(
        store: ContainerStore, runtime: Path, tmp_path: Path) -> None:
    """The server runs as root with root's capabilities: a root process that dropped some must
    not get them back by asking the server."""
    if shutil.which("capsh") is None:
        pytest.skip("capsh (libcap2-bin) is not installed")
    assert mount(store, runtime, tmp_path / "m1").returncode == 0
    server_pid(runtime)
    mountpoint = tmp_path / "m2"
    mountpoint.mkdir()
    store.mounts.append(mountpoint)
    command = f'exec "{LAYERFS}" --root "{store.root}" mount {IMAGE} "{mountpoint}"'
    result = subprocess.run(
        ["capsh", "--drop=cap_sys_admin", "--", "-c", command],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "LAYERFS_RUNTIME_DIR": str(runtime), "LAYERFS_DEBUG": "1"})
    assert "declined: the caller runs in another context" in result.stderr
    assert RAN not in result.stderr
