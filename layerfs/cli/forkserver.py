"""The fork server: a resident process that has imported what `layerfs mount` and
`layerfs-overlay` need and runs each such command in a fork of itself (why, and how clients
find it: `forkserver_client`).

Whom it serves: only its own user (SO_PEERCRED), and only a caller in the same context as
itself, so that a command run here is the command the caller would have run: the same
namespaces, root directory, cgroup, login session (loginuid, sessionid: what the audit log
records), credentials and groups, capabilities, no_new_privs and seccomp mode, CPU and memory
affinity, nice value, OOM score, resource limits and security label (all read from /proc for
both). It declines anything else, and the caller runs the
command itself. What may differ between callers comes with the request: argv, environment,
umask, working directory, and stdin, stdout and stderr.

How: single-threaded, because it forks. A poll loop accepts requests and watches its
children through pidfds; a child runs the command and exits, and the server sends the
caller its exit status. The server ends after `IDLE_SECONDS` without a request, when its
socket is removed or replaced, or on SIGTERM (once its running children have). When one of
its source files has changed (inotify says so, see `SourceWatch`) it declines the request
that noticed with "retired", stops
listening and lets go of its lock, so that the caller starts a server with the new code; it
ends once its running children have.

Run as `python -P -m layerfs.cli.forkserver SOCKET` (the client does that).
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import marshal
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import NoReturn

from layerfs import syscalls
from layerfs.cli import forkserver_client as client

IDLE_SECONDS = 600.0
_TICK_MS = 30_000
_MAX_REQUEST = 1 << 20
_REQUEST_TIMEOUT = 1.0
"""A client sends its request right after it connects; one that does not is not waited for
longer (the server serves one connection at a time)."""
_PRELOAD = ("layerfs.cli.main", "layerfs.cli.commands_containers", "layerfs.cli.overlay_main",
            "concurrent.futures.thread", "traceback")
"""What `layerfs mount`, `layerfs-overlay` and the daemon import, so that a child imports
nothing."""

_NAMESPACES = ("mnt", "net", "pid", "user", "ipc", "uts", "cgroup")
_STATUS_FIELDS = (b"Uid:", b"Gid:", b"Groups:", b"Cap", b"NoNewPrivs:", b"Seccomp",
                  b"Cpus_allowed_list:", b"Mems_allowed_list:")


def context(pid: int | str) -> tuple[object, ...]:
    """What a process runs with beyond its arguments, as far as a command can tell (OSError
    if /proc will not say)."""
    proc = f"/proc/{pid}"
    namespaces = tuple(os.stat(f"{proc}/ns/{name}").st_ino for name in _NAMESPACES)
    root = os.stat(f"{proc}/root")
    with open(f"{proc}/status", "rb") as f:
        status = tuple(line for line in f if line.startswith(_STATUS_FIELDS))
    with open(f"{proc}/stat", "rb") as f:
        nice = f.read().rsplit(b")", 1)[1].split()[16]
    files = []
    for name in ("cgroup", "limits", "oom_score_adj", "loginuid", "sessionid"):
        with open(f"{proc}/{name}", "rb") as f:
            files.append(f.read())
    try:
        with open(f"{proc}/attr/current", "rb") as f:
            files.append(f.read())
    except OSError:  # no LSM: missing, or EINVAL
        files.append(b"")
    return namespaces, (root.st_dev, root.st_ino), status, nice, tuple(files)


def _sources() -> dict[str, tuple[int, int, int]]:
    """The files whose change makes this server's code stale: every loaded module of layerfs
    and of its CLI library, and the interpreter."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = {os.path.realpath(sys.executable)}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and (name.split(".")[0] in ("layerfs", "click") or path.startswith(package)):
            paths.add(path)
    return {path: _identity(path) for path in paths}


class SourceWatch:
    """Whether any of the server's source files has changed since it started.

    inotify on their directories answers with one read per request; a stat of each file
    instead (60 of them) took 2.5 ms of a 30 ms mount with cold caches. Where inotify is not
    to be had (no instances or watches left), the stats it is.
    """

    _MASK = (syscalls.IN_MODIFY | syscalls.IN_ATTRIB | syscalls.IN_MOVED_FROM
             | syscalls.IN_MOVED_TO | syscalls.IN_CREATE | syscalls.IN_DELETE
             | syscalls.IN_DELETE_SELF | syscalls.IN_MOVE_SELF | syscalls.IN_ONLYDIR)
    _GONE = (syscalls.IN_Q_OVERFLOW | syscalls.IN_IGNORED | syscalls.IN_DELETE_SELF
             | syscalls.IN_MOVE_SELF)
    """The watch itself lost: anything may have changed since."""
    _EVENT = struct.Struct("iIII")
    """struct inotify_event: wd, mask, cookie, len (of the name that follows)"""

    def __init__(self, sources: dict[str, tuple[int, int, int]]) -> None:
        self.sources = sources
        self._stale = False
        self._names: dict[int, set[bytes]] = {}
        """watch descriptor -> the names of sources in its directory"""
        self._fd: int | None = None
        by_dir: dict[bytes, set[bytes]] = {}
        for path in sources:
            parent, _, name = os.fsencode(path).rpartition(b"/")
            by_dir.setdefault(parent or b"/", set()).add(name)
        try:
            fd = syscalls.inotify_init()
        except OSError:
            return
        try:
            for parent, names in by_dir.items():
                self._names[syscalls.inotify_add_watch(fd, parent, self._MASK)] = names
        except OSError:
            os.close(fd)
            self._names.clear()
            return
        self._fd = fd
        # what changed before the watches were set, they cannot tell
        self._stale = self._stat_changed()

    def fds(self) -> list[int]:
        """What a child must close (the mount daemon it becomes lives on)."""
        return [self._fd] if self._fd is not None else []

    def _stat_changed(self) -> bool:
        return any(_identity(path) != identity for path, identity in self.sources.items())

    def changed(self) -> bool:
        if self._stale:
            return True
        if self._fd is None:
            self._stale = self._stat_changed()
            return self._stale
        while not self._stale:
            try:
                events = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                break
            at = 0
            while at < len(events):
                wd, mask, _cookie, length = self._EVENT.unpack_from(events, at)
                name = events[at + self._EVENT.size:at + self._EVENT.size + length].rstrip(b"\0")
                at += self._EVENT.size + length
                if mask & self._GONE or name in self._names.get(wd, ()):
                    self._stale = True
        return self._stale


def _identity(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class _Refusal(Exception):
    def __init__(self, answer: bytes) -> None:
        super().__init__(answer)
        self.answer = answer
        """b"N" and why (the caller runs the command itself) or b"R" and why (and starts a
        new server too)"""


class Server:
    def __init__(self, path: str, lock_fd: int) -> None:
        self.path = path
        self.lock_fd: int | None = lock_fd
        self.sources = SourceWatch(_sources())
        self.listener: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a dead predecessor's; we hold the lock
        umask = os.umask(0o077)
        try:
            self.listener.bind(path)
        finally:
            os.umask(umask)
        self.listener.listen(64)
        self.socket_ino = os.stat(path).st_ino
        self.poller = select.poll()
        self.poller.register(self.listener, select.POLLIN)
        self.children: dict[int, tuple[int, socket.socket]] = {}
        """pidfd -> (pid, the caller's connection)"""

    def run(self) -> None:
        last_request = time.monotonic()
        while self.listener is not None or self.children:
            for fd, _events in self.poller.poll(_TICK_MS if self.listener else None):
                if self.listener is not None and fd == self.listener.fileno():
                    last_request = time.monotonic()
                    try:
                        self._accept()
                    except Exception:
                        # one bad request must not end the server; its connection is closed
                        # and its caller runs the command itself
                        pass
                elif fd in self.children:
                    self._reap(fd)
            if self.listener is not None and not self.children and (
                    time.monotonic() - last_request > IDLE_SECONDS or not self._socket_is_ours()):
                self.retire()

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with contextlib.ExitStack() as stack:
            stack.callback(conn.close)
            fds: list[int] = []
            stack.callback(lambda: _close_all(fds))
            peer_pid, peer_uid, _gid = struct.unpack(
                "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if peer_uid != os.geteuid():
                return
            conn.settimeout(_REQUEST_TIMEOUT)
            try:
                message, fds, flags, _ = socket.recv_fds(conn, _MAX_REQUEST, 4)
            except OSError:
                return
            try:
                program, argv, env, umask = self._request(message, fds, flags, peer_pid)
            except _Refusal as refusal:
                with contextlib.suppress(OSError):
                    conn.send(refusal.answer)
                if refusal.answer.startswith(b"R"):
                    self.retire()
                return
            pid = os.fork()
            if pid == 0:
                _child(program, argv, env, umask, fds, self._inherited(conn))
            pidfd = os.pidfd_open(pid)
            stack.pop_all()
            for fd in fds:
                os.close(fd)
            try:
                conn.send(b"Y" + struct.pack("!i", pid))
            except OSError:
                pass  # the caller is gone; its command runs to the end all the same
            self.children[pidfd] = (pid, conn)
            self.poller.register(pidfd, select.POLLIN)

    def _request(self, message: bytes, fds: list[int], flags: int,
                 peer_pid: int) -> tuple[str, list[str], dict[bytes, bytes], int]:
        """The command to run: program, argv, environment, umask; `_Refusal` if it cannot run
        here."""
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 4:
            raise _Refusal(b"Nmalformed request")
        try:
            protocol, installation, program, argv, env, umask = marshal.loads(message)
        except (EOFError, ValueError, TypeError):
            raise _Refusal(b"Nmalformed request") from None
        if (protocol != client.PROTOCOL or installation != client.installation()
                or program not in client.PROGRAMS or not isinstance(argv, list)
                or not isinstance(env, dict) or not isinstance(umask, int)):
            raise _Refusal(b"Nanother version of layerfs")
        if self.sources.changed():
            raise _Refusal(b"Rretired: its code has changed")
        try:
            same = context(peer_pid) == context("self")
        except OSError:
            same = False
        if not same:
            raise _Refusal(b"Nthe caller runs in another context (namespaces, cgroup, "
                           b"credentials)")
        return program, argv, env, umask

    def _reap(self, pidfd: int) -> None:
        pid, conn = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        with contextlib.suppress(OSError):
            conn.send(b"S" + struct.pack("!i", code if code >= 0 else 128 - code))
        conn.close()

    def _inherited(self, conn: socket.socket) -> list[int]:
        """In a child: what it must close. It must not keep the server's lock, socket or other
        callers' connections alive: the mount daemon it starts lives as long as the mount. The
        socket objects give their descriptors up, so that none of them later closes a number
        the command has reused."""
        sockets = [conn, *(other for _, other in self.children.values())]
        if self.listener is not None:
            sockets.append(self.listener)
        fds = [sock.detach() for sock in sockets]
        fds += self.children  # their pidfds
        fds += self.sources.fds()
        if self.lock_fd is not None:
            fds.append(self.lock_fd)
        return fds

    def _socket_is_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.socket_ino
        except OSError:
            return False

    def retire(self) -> None:
        """Stop listening and let a successor start; running children still get reported."""
        if self.listener is None:
            return
        if self._socket_is_ours():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        self.poller.unregister(self.listener)
        self.listener.close()
        self.listener = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _child(program: str, argv: list[str], env: dict[bytes, bytes], umask: int, fds: list[int],
           inherited: list[int]) -> NoReturn:
    """Become the caller's command: its directory, stdio, environment and umask; then run."""
    code = 1
    try:
        for fd in inherited:
            os.close(fd)
        cwd, *stdio = fds
        os.fchdir(cwd)
        os.close(cwd)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
            os.close(fd)
        _reopen_stdio()
        os.umask(umask)
        os.environb.clear()
        os.environb.update(env)
        sys.argv = list(argv)
        _show_command_line(argv)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if program == "layerfs-overlay":
            from layerfs.cli import overlay_main

            code = overlay_main.main()
        else:
            from layerfs.cli.main import main

            main()
            code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


_PR_SET_NAME = 15
_PR_SET_MM, _PR_SET_MM_ARG_START, _PR_SET_MM_ARG_END = 35, 8, 9
_command_line: object = None
"""The buffer /proc/self/cmdline points to once `_show_command_line` moved it: kept alive."""


def _show_command_line(argv: list[str]) -> None:
    """Make ps, pgrep -f and /proc/PID/cmdline show the caller's command, not the server's:
    a mount's daemon (forked from this child) is found by it, as fuse-overlayfs's is.

    With CAP_SYS_RESOURCE the kernel points the process's argument area at new memory
    (PR_SET_MM), and the arguments stay separate. Without it the command is written over the
    server's own arguments and environment strings, joined by spaces (the old environment is
    no longer used: the caller's replaced it), which /proc shows as one string (setproctitle's
    way). Must run after the environment is replaced."""
    import ctypes

    global _command_line
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]  # addresses: not C ints
    name = ctypes.create_string_buffer(os.path.basename(os.fsencode(argv[0]))[:15])
    libc.prctl(_PR_SET_NAME, ctypes.addressof(name), 0, 0, 0)
    args = [os.fsencode(arg) for arg in argv]
    text = b"\0".join(args) + b"\0"
    buffer = ctypes.create_string_buffer(text, len(text))
    start, end = ctypes.addressof(buffer), ctypes.addressof(buffer) + len(text)
    # each step must leave arg_start <= arg_end: which end moves first depends on where
    # the new memory lies
    for first, second in ((_PR_SET_MM_ARG_START, start), (_PR_SET_MM_ARG_END, end)), \
            ((_PR_SET_MM_ARG_END, end), (_PR_SET_MM_ARG_START, start)):
        if (libc.prctl(_PR_SET_MM, first[0], first[1], 0, 0) == 0
                and libc.prctl(_PR_SET_MM, second[0], second[1], 0, 0) == 0):
            _command_line = buffer
            return
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    arg_start, arg_end, env_start, env_end = (int(field) for field in fields[45:49])
    room = (env_end if env_start == arg_end else arg_end) - arg_start
    title = b" ".join(args)[:room - 1]
    if len(title) < arg_end - arg_start:  # the last argument byte must not be NUL
        title = title.ljust(arg_end - arg_start, b" ")
    ctypes.memmove(arg_start, title + b"\0" * (room - len(title)), room)


def _reopen_stdio() -> None:
    """New stream objects over fds 0-2, buffered as the interpreter would for these files (a
    terminal is line-buffered) rather than as it did for the server's /dev/null."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        old = getattr(sys, name)
        line_buffered = fd == 2 or (fd == 1 and os.isatty(fd))
        stream = open(fd, "r" if fd == 0 else "w", buffering=1 if line_buffered else -1,  # noqa: SIM115
                      encoding=old.encoding, errors=old.errors, closefd=False)
        setattr(sys, name, stream)


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    sys.stderr.write(f"{value}\n")
    return 1


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -P -m layerfs.cli.forkserver SOCKET")
    path = sys.argv[1]
    # whatever the spawning command had open (a pipe its caller reads to the end, say) must
    # not live on in a process that lives for minutes
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.chdir("/")
    lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another server is up, or starting
    import importlib

    for name in _PRELOAD:
        importlib.import_module(name)
    server = Server(path, lock_fd)
    gc.collect()
    gc.freeze()  # children share the imported objects' pages instead of copying them

    own_pid = os.getpid()

    def terminate(signum: int, frame: object) -> None:
        if os.getpid() != own_pid:
            os._exit(128 + signum)  # a child not yet past its own handler's reset
        # stop listening at once; the callers of running children still get their status
        server.retire()
        if not server.children:
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    os.ftruncate(lock_fd, 0)  # the pid, once it listens and ends cleanly
    os.write(lock_fd, f"{os.getpid()}\n".encode())
    server.run()


if __name__ == "__main__":
    main()
