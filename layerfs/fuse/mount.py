"""Mount lifecycle: check the request, mount, serve, unmount; as a daemon or in the foreground.

`mount_overlay` returns only once the mount answers (or raises `MountError` with the reason
the daemon gave). The daemon holds an exclusive lock on its work dir for its whole life, so a
second mount of the same upper is refused while the first is alive; on start it removes what a
killed predecessor left staged in the work dir, so the upper itself is never half-written.
SIGTERM, SIGINT, `fusermount3 -u` and `umount` end it cleanly.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from layerfs import overlay_xattrs
from layerfs.errors import MountError
from layerfs.fuse import channel
from layerfs.fuse.idmap import IDENTITY, IdMap
from layerfs.fuse.ops import OverlayOperations
from layerfs.fuse.session import Session
from layerfs.overlay import copyup
from layerfs.overlay.engine import Engine

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

LOCK_NAME = ".layerfs.lock"
READAHEAD_KIB = 1024
"""One FUSE read request's worth (max_pages): a cold 1 GiB read went from 2.4 s to 0.7 s."""


@dataclass(frozen=True, slots=True)
class OverlaySpec:
    """What to mount: lower dirs (top first), an optional upper and work dir, where."""

    lowers: tuple[str, ...]
    upper: str | None
    work: str | None
    mountpoint: str
    fsname: str = "layerfs"
    fuse_options: frozenset[str] = field(default_factory=frozenset)
    sync_copy_up: bool = True
    passthrough: bool = True
    passthrough_lowers: bool = False
    """Lower files of a read-write mount pass through too (`passthrough=all`)."""
    log_file: str | None = None
    userxattr: bool = False
    """The `user.overlay.` on-disk format even as root (it is the only one otherwise)."""
    ids: IdMap = IDENTITY
    """How owners on disk are shown (uidmapping, gidmapping, squash options)."""


def default_fuse_options() -> set[str]:
    """allow_other and the kernel's permission checks: other users and setuid programs
    use the mount (a chroot); dev and suid as root, since a root filesystem needs both.
    Not root: allow_other only where /etc/fuse.conf lets users ask for it (fusermount3
    refuses it otherwise), and never dev or suid (fusermount3 would drop them)."""
    if os.geteuid() == 0:
        return {"allow_other", "default_permissions", "dev", "suid"}
    if _users_may_allow_other():
        return {"allow_other", "default_permissions"}
    return {"default_permissions"}


def _users_may_allow_other(conf: str = "/etc/fuse.conf") -> bool:
    try:
        with open(conf) as f:
            return any(line.split("#")[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def check_spec(spec: OverlaySpec) -> None:
    """Refuse, before anything is mounted, what cannot work (MountError, one line)."""
    mnt = spec.mountpoint
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        # fusermount3 opens it with the caller's rights
        raise MountError("/dev/fuse: this user may not open it (read and write access comes "
                         "from its mode, its group or an ACL entry)")
    if not os.path.exists(mnt):
        raise MountError(f"{mnt}: mountpoint does not exist")
    if not os.path.isdir(mnt):
        raise MountError(f"{mnt}: mountpoint is not a directory")
    if not spec.lowers:
        raise MountError("lowerdir: at least one lower directory is needed")
    real_mnt = os.path.realpath(mnt)
    dirs = [("lowerdir", p) for p in spec.lowers]
    if spec.upper is not None:
        if spec.work is None:
            raise MountError("workdir: an upperdir needs a workdir")
        dirs += [("upperdir", spec.upper), ("workdir", spec.work)]
    for what, path in dirs:
        if not os.path.isdir(path):
            raise MountError(f"{path}: {what} does not exist or is not a directory")
        real = os.path.realpath(path)
        if real_mnt == real or real_mnt.startswith(real.rstrip("/") + "/"):
            raise MountError(f"{mnt}: mountpoint is inside {what} {path}")
        if what == "lowerdir" and real.startswith(real_mnt.rstrip("/") + "/"):
            raise MountError(f"{path}: {what} is inside the mountpoint {mnt}")
    if spec.upper is not None and spec.work is not None:
        if os.stat(spec.upper).st_dev != os.stat(spec.work).st_dev:
            raise MountError(f"{spec.work}: workdir is not on the filesystem of {spec.upper}")
        real_upper, real_work = os.path.realpath(spec.upper), os.path.realpath(spec.work)
        if real_work.startswith(real_upper.rstrip("/") + "/") or real_upper == real_work:
            raise MountError(f"{spec.work}: workdir must not be inside upperdir")


@contextlib.contextmanager
def _work_lock(spec: OverlaySpec) -> Iterator[None]:
    if spec.work is None:
        yield
        return
    fd = os.open(os.path.join(spec.work, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MountError(f"{spec.upper}: upperdir is in use by another live mount") from None
        yield
    finally:
        os.close(fd)


def serve(spec: OverlaySpec, ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled; `ready` runs once the mount answers."""
    with _work_lock(spec), contextlib.ExitStack() as stack:
        if spec.work is not None:
            copyup.clean_work(os.fsencode(spec.work))
            _remove_marker(spec)  # a killed predecessor's
        if spec.userxattr:
            overlay_xattrs.select(overlay_xattrs.USER)
        engine = Engine(
            [os.fsencode(p) for p in spec.lowers],
            os.fsencode(spec.upper) if spec.upper is not None else None,
            os.fsencode(spec.work) if spec.work is not None else None,
        )
        engine.sync_copy_up = spec.sync_copy_up
        options = set(spec.fuse_options)
        if spec.upper is None:
            options.add("ro")
        operations = OverlayOperations(engine, passthrough=spec.passthrough,
                                       passthrough_lowers=spec.passthrough_lowers, ids=spec.ids)
        session_signals = (signal.SIGTERM, signal.SIGINT, FREEZE_SIGNAL, THAW_SIGNAL)
        session: Session | None = None

        def catch(signum: int, frame: object) -> None:
            if session is not None:
                session.catch(signum)

        for signum in session_signals:
            stack.callback(signal.signal, signum, signal.signal(signum, catch))
        real_mountpoint = os.path.realpath(spec.mountpoint)  # before it is ours to answer
        fd = channel.open_mounted(spec.mountpoint, options, fsname=spec.fsname,
                                  subtype="layerfs")
        stack.callback(os.close, fd)
        session = Session(fd, operations, strict=os.environ.get("LAYERFS_STRICT") == "1")
        signalled = False

        def on_signal(signum: int) -> None:
            nonlocal signalled
            assert session is not None
            if signum == FREEZE_SIGNAL:
                session.freeze()
                _write_marker(spec)
            elif signum == THAW_SIGNAL:
                _remove_marker(spec)
                session.thaw()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                signalled = True
                session.thaw()
                session.stop()

        def answered() -> None:
            # after INIT: its answer caps readahead at what the kernel offered (128 KiB)
            channel.set_readahead(real_mountpoint, READAHEAD_KIB)
            ready()

        try:
            session.run(answered, on_signal)
        finally:
            # after `fusermount3 -u` the mount is gone already; unmount only what is ours
            # (asked of mountinfo: a stat of the mountpoint would wait for us to answer)
            if signalled or channel.is_mounted(real_mountpoint):
                with contextlib.suppress(OSError):
                    channel.unmount(spec.mountpoint)


FREEZE_SIGNAL = signal.SIGUSR1
THAW_SIGNAL = signal.SIGUSR2
FROZEN_MARKER = ".frozen"
"""In the work dir while the daemon holds all changes to the upper dir (see `freeze`)."""


def frozen_marker(work: str) -> str:
    return os.path.join(work, FROZEN_MARKER)


def _write_marker(spec: OverlaySpec) -> None:
    if spec.work is not None:
        with open(frozen_marker(spec.work), "w") as f:
            f.write(f"{os.getpid()}\n")


def _remove_marker(spec: OverlaySpec) -> None:
    if spec.work is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(frozen_marker(spec.work))


def mount_overlay(spec: OverlaySpec, *, foreground: bool = False) -> int:
    """Mount; in the background unless `foreground`. Returns the daemon's pid (ours if fg)."""
    check_spec(spec)
    if foreground:
        _setup_logging(spec.log_file, to_stderr=True)
        serve(spec, lambda: None)
        return os.getpid()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_fd)
        _daemon_main(spec, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read()
    if answer.startswith(b"ok"):
        return pid
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    reason = answer.decode(errors="replace").strip() or "the mount daemon died while starting"
    raise MountError(reason)


def _daemon_main(spec: OverlaySpec, status_fd: int) -> None:
    code = 0
    try:
        os.setsid()
        _detach_stdio(spec.log_file)
        _setup_logging(spec.log_file, to_stderr=False)

        def ready() -> None:
            os.write(status_fd, b"ok\n")
            os.close(status_fd)

        serve(spec, ready)
    except MountError as exc:
        _report(status_fd, str(exc))
        code = 1
    except BaseException as exc:
        log.exception("mount daemon failed")
        _report(status_fd, f"{spec.mountpoint}: mount daemon failed: {exc}")
        code = 1
    finally:
        os._exit(code)


def _report(status_fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(status_fd, message.encode() + b"\n")


def _detach_stdio(log_file: str | None) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    out = null
    if log_file is not None:
        out = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)


def _setup_logging(log_file: str | None, *, to_stderr: bool) -> None:
    if log_file is None and not to_stderr:
        return
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if log_file is None or to_stderr
        else logging.FileHandler(log_file)
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO if os.environ.get("LAYERFS_DEBUG") != "1" else logging.DEBUG)
