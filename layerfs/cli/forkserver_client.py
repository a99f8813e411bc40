"""The client half of the fork server: find it, hand it a command, relay its exit status.

`layerfs mount` spends most of its time importing Python modules (about 80 ms of a 120 ms
command on a small VM). The fork server (`layerfs.cli.forkserver`) has imported them once;
each command it runs is a fork of it, in the caller's working directory, with the caller's
stdin, stdout and stderr (passed as file descriptors), environment and umask. It runs a command
only for a caller in the same context as itself (namespaces, root, cgroup, credentials,
capabilities, limits: see the server), and declines otherwise; the caller then runs the
command itself, as it does when no server is up.

This module is imported by every `layerfs` command before anything else, so it imports only
what the interpreter has already loaded or what costs microseconds: `_socket` and `_signal`
rather than `socket` and `signal`, whose enum classes alone take 5-8 ms to import here.

Where: one socket per user and per installation (the interpreter, the package directory, the
PYTHON* variables and LAYERFS_PURE), in `LAYERFS_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/layerfs`,
else `/run/layerfs` for root and `/tmp/layerfs-UID` for others. That directory must belong to the
user and be closed to others: whoever can put a socket there would see our commands and our
terminal. `LAYERFS_FORKSERVER=0` turns the whole thing off.

`layerfs-overlay` has a second client, in C (launcher.c, built by tools/setup), which hands a
mount over without starting an interpreter and execs this one for everything else: a change of
PROTOCOL, of the request or of `installation()` must be made there too.
"""

from __future__ import annotations

import _socket
import marshal
import os
import stat
import struct
import sys
import zlib

TYPE_CHECKING = False  # typing's own costs an import; mypy honours the name alone
if TYPE_CHECKING:
    import signal as _signal  # the same functions and numbers, with types
else:
    import _signal

PROTOCOL = 1
"""Changes whenever a message changes shape; both ends also share one interpreter (marshal)."""

_STATUS = struct.Struct("!i")
_CREDENTIALS = struct.Struct("3i")
"""struct ucred: pid, uid, gid"""
_MAX_REPLY = 4096


def enabled() -> bool:
    return os.environ.get("LAYERFS_FORKSERVER", "1") != "0"


def runtime_dir() -> str:
    explicit = os.environ.get("LAYERFS_RUNTIME_DIR")
    if explicit:
        return explicit
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "layerfs")
    uid = os.geteuid()
    return "/run/layerfs" if uid == 0 else f"/tmp/layerfs-{uid}"


def installation() -> str:
    """What a server must share with its clients: the interpreter, the package's directory, and
    the PYTHON* variables and LAYERFS_PURE, which decide what an import finds (compiled or pure
    modules, see `layerfs.build`) and how the interpreter runs; and the login session and
    cgroup, so that each session (each SSH login, each systemd unit) gets a server of its own,
    whose children the audit log and the unit's stop see as its own."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    python = sorted(f"{key}={value}" for key, value in os.environ.items()
                    if key.startswith("PYTHON") or key == "LAYERFS_PURE")
    session = [_proc_self(name) for name in ("loginuid", "sessionid", "cgroup")]
    return "\0".join([os.path.realpath(sys.executable), package, *python, *session])


def _proc_self(name: str) -> str:
    try:
        with open(f"/proc/self/{name}", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def socket_path(directory: str | None = None) -> str:
    key = zlib.crc32(installation().encode(errors="surrogateescape"))
    return os.path.join(directory or runtime_dir(), f"forkserver-{key:08x}.sock")


def private_dir(directory: str) -> bool:
    """True if `directory` is a real directory of ours that nobody else may write to."""
    try:
        st = os.lstat(directory)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & 0o022)


class Declined(Exception):
    """The server is there but will not run this command (its reason is the message)."""


PROGRAMS = ("layerfs", "layerfs-overlay")


def call(program: str, argv: list[str]) -> int | None:
    """Run `program` (one of PROGRAMS) with `argv` (`argv[0]` included) in a child of the fork
    server; its exit status.

    None when no server answers at the socket, or the one there has retired (the caller runs
    the command itself, and may start a server); `Declined` when one answers but will not run
    it here.
    """
    directory = runtime_dir()
    if not private_dir(directory):
        return None
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # closed: our socket would take its number and be passed as stdio
            raise Declined(f"file descriptor {fd} is closed") from None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    try:
        try:
            sock.connect(socket_path(directory))
        except OSError:
            return None
        creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _CREDENTIALS.size)
        if _CREDENTIALS.unpack(creds)[1] != os.geteuid():
            raise Declined("the fork server runs as another user")
        umask = os.umask(0o022)
        os.umask(umask)
        request = marshal.dumps((PROTOCOL, installation(), program, argv, dict(os.environb),
                                 umask))
        try:
            cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise Declined(f"working directory: {exc.strerror}") from None
        try:
            fds = struct.pack("4i", cwd, 0, 1, 2)
            sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        except OSError as exc:
            raise Declined(f"cannot pass the command: {exc.strerror}") from None
        finally:
            os.close(cwd)
        reply = sock.recv(_MAX_REPLY)
        if reply.startswith(b"R"):
            return None  # it retired for new code: as if none were up
        if not reply.startswith(b"Y"):
            # Nothing at all: the server failed before it forked. (Had it died right after
            # the fork, the command would run twice; a mount's second try then finds its
            # mountpoint taken. The window is a few instructions wide.)
            raise Declined(reply[1:].decode(errors="replace") or "the fork server went away")
        child = _STATUS.unpack(reply[1:])[0]
        return _relay(sock, child)
    finally:
        sock.close()


def _relay(sock: _socket.socket, child: int) -> int:
    """Pass our signals on to the child until the server reports how it ended."""

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for signum in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT):
        _signal.signal(signum, forward)
    reply = sock.recv(_MAX_REPLY)
    if not reply.startswith(b"S"):
        sys.stderr.write("layerfs: the fork server went away while running the command\n")
        return 1
    return int(_STATUS.unpack(reply[1:])[0])


def spawn() -> None:
    """Start a fork server in the background, if this user's runtime dir can hold one.

    It takes a lock before it imports anything, so a second one started meanwhile ends at
    once; the command that spawned it does not wait for it.
    """
    directory = runtime_dir()
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return
    if not private_dir(directory):
        return
    null = os.devnull
    try:
        os.posix_spawn(
            sys.executable,
            [sys.executable, "-P", "-m", "layerfs.cli.forkserver", socket_path(directory)],
            dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_OPEN, fd, null, os.O_RDWR, 0) for fd in (0, 1, 2)],
            setsid=True,
        )
    except OSError:
        pass  # no server this time; the command runs all the same


def stop_servers(directory: str, timeout: float = 10.0) -> list[int]:
    """SIGTERM the fork servers of `directory` and wait until they are gone; their pids. For
    whoever made the directory (a test run, a benchmark) to clean up after itself.

    A server is known by its command line, which names its socket: this finds one that is
    still starting too, before it has taken its lock or written its pid."""
    import time

    pids = [pid for pid in _pids() if _serves(pid, directory)]
    for pid in pids:
        try:
            os.kill(pid, _signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while any(is_server(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"fork servers {pids} still running after {timeout:.0f} s")
        time.sleep(0.01)
    return pids


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _serves(pid: int, directory: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return (b"layerfs.cli.forkserver" in argv and len(argv) >= 2
            and os.path.dirname(os.fsdecode(argv[-2])) == directory.rstrip("/"))


def is_server(pid: int) -> bool:
    """Alive (not a zombie) and a fork server, not whatever reused the pid."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return b"layerfs.cli.forkserver" in cmdline and state not in (b"Z", b"X")
