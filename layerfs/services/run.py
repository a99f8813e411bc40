"""`run`: a process in a container's root, with the image's Entrypoint, Cmd, Env, WorkingDir
and User, as docker runs it (without namespaces beyond the mount namespace, nor cgroups).

The child gets its own mount namespace, made private so that nothing leaks back, binds the
host's /proc, /sys and /dev (recursively) into the container root, chroots, drops to the
image's user, changes to its working dir and execs. stdin, stdout and stderr are passed
through; the exit status comes back (128+N for a signal, as a shell reports it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from layerfs import syscalls
from layerfs.errors import LayerfsError, UsageError

if TYPE_CHECKING:
    from pathlib import Path

BIND_MOUNTS = ("proc", "sys", "dev")
HOST_FILES = ("etc/resolv.conf",)
"""Bound read-only from the host where the network is the host's, as docker and buildah do,
so that names resolve in the container as on the host."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

@dataclass(frozen=True, slots=True)
class Process:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int
    groups: list[int]


def process_for(root: Path, config: dict[str, Any], command: list[str], env: list[str],
                workdir: str | None, user: str | None, image_name: str) -> Process:
    """What to execute: docker's rules for Entrypoint, Cmd, Env, WorkingDir and User."""
    entrypoint = list(config.get("Entrypoint") or [])
    cmd = command or list(config.get("Cmd") or [])
    argv = entrypoint + cmd
    if not argv:
        raise UsageError(f"{image_name}: no command given and the image has no Cmd")
    environment: dict[str, str] = {"PATH": DEFAULT_PATH}
    for item in [*(config.get("Env") or []), *env]:
        key, eq, value = item.partition("=")
        if not eq:
            if key in os.environ:
                environment[key] = os.environ[key]
            continue
        environment[key] = value
    uid, gid, groups, home = user_of(root, user if user is not None else config.get("User") or "")
    environment.setdefault("HOME", home)
    environment.setdefault("HOSTNAME", os.uname().nodename)
    cwd = workdir or config.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise UsageError(f"{cwd}: the working directory must be absolute")
    return Process(argv, environment, cwd, uid, gid, groups)


def user_of(root: Path, spec: str) -> tuple[int, int, list[int], str]:
    """uid, gid, supplementary groups and home of `user[:group]` inside the image."""
    if not spec:
        return 0, 0, [], "/root"
    name, _, group = spec.partition(":")
    passwd = _table(root, "etc/passwd")
    uid = gid = -1
    home = "/"
    for fields in passwd:
        if len(fields) >= 6 and (fields[0] == name or (name.isdigit() and fields[2] == name)):
            uid, gid, home = int(fields[2]), int(fields[3]), fields[5]
            name = fields[0]
            break
    else:
        if not name.isdigit():
            raise UsageError(f"{spec}: no such user in the image's /etc/passwd")
        uid, gid = int(name), 0  # as runc: a uid without a passwd entry gets group 0
    groups_table = _table(root, "etc/group")
    if group:
        for fields in groups_table:
            if len(fields) >= 3 and (fields[0] == group or fields[2] == group):
                gid = int(fields[2])
                break
        else:
            if not group.isdigit():
                raise UsageError(f"{spec}: no such group in the image's /etc/group")
            gid = int(group)
    extra = [int(f[2]) for f in groups_table
             if len(f) >= 4 and name in f[3].split(",") and f[2].isdigit()]
    return uid, gid, extra, home


def _table(root: Path, name: str) -> list[list[str]]:
    """The lines of a colon-separated file of the image (passwd, group), split."""
    try:
        text = read_in_root(root, name).decode(errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def read_in_root(root: Path, name: str, max_links: int = 40) -> bytes:
    """Read file `name` of the tree at `root` as a process chrooted there would: symlinks,
    absolute ones included, resolve inside `root`, so that the image can never make us read
    a file of the host."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    stack: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if stack:
                stack.pop()
            continue
        path = os.path.join(root, *stack, part)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > max_links:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)
            target = os.readlink(path)
            if target.startswith("/"):
                stack = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        stack.append(part)
    fd = os.open(os.path.join(root, *stack), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read(16 << 20)


def _enter(root: str, process: Process, binds: list[str], files: list[str],
           network: bool) -> None:
    """In the child, before exec: private mounts (and without `network` a network namespace
    of its own, with no interfaces up), binds, chroot, working dir, user.

    The working directory is made after the chroot, so that a symlink in the image can
    never lead it out of the container.
    """
    syscalls.unshare(syscalls.CLONE_NEWNS | (0 if network else syscalls.CLONE_NEWNET))
    syscalls.mount("none", "/", syscalls.MS_REC | syscalls.MS_PRIVATE)
    for name in binds:
        syscalls.mount(f"/{name}", os.path.join(root, name), syscalls.MS_BIND | syscalls.MS_REC)
    for name in files:
        target = os.path.join(root, name)
        syscalls.mount(f"/{name}", target, syscalls.MS_BIND)
        syscalls.mount("none", target,
                       syscalls.MS_BIND | syscalls.MS_REMOUNT | syscalls.MS_RDONLY)
    os.chroot(root)
    os.chdir("/")
    if not os.path.isdir(process.cwd):
        os.makedirs(process.cwd)
        os.chown(process.cwd, process.uid, process.gid)
    try:
        os.setgroups(process.groups)
    except PermissionError:
        if not _setgroups_denied():
            raise
    os.setgid(process.gid)
    os.setuid(process.uid)
    with contextlib.suppress(OSError):
        os.chdir(process.cwd)


def run_in(root: Path, process: Process, *, bind: bool = True, network: bool = True,
           host_files: bool = False, stdout: int | None = None) -> int:
    """Run `process` chrooted into `root`; its exit status (128+N if killed by signal N).

    Mountpoints the image lacks are made for the run and removed after it, so that they do
    not show in the container's diff (docker keeps them in a hidden init layer). A missing
    working directory is created, as docker does. `network` false: no network at all;
    `host_files`: the host's HOST_FILES bound read-only. `stdout`: an fd for the output
    (stdout and stderr) instead of ours.
    """
    made: list[Path] = []
    binds: list[str] = []
    files: list[str] = []
    for name in HOST_FILES if host_files and network else ():
        path = root / name
        if not os.path.isfile(f"/{name}") or not stat.S_ISDIR(_lstat_mode(path.parent)):
            continue
        mode = _lstat_mode(path)
        if mode == 0:
            path.touch(0o644)
            made.append(path)
        elif not stat.S_ISREG(mode):
            continue  # a symlink of the image: never bound through
        files.append(name)
    for name in BIND_MOUNTS if bind else ():
        path = root / name
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)  # never through a symlink
        except FileNotFoundError:
            path.mkdir()
            made.append(path)
            is_dir = True
        if is_dir:
            binds.append(name)
    try:
        return _run(root, process, binds, files, network, stdout)
    finally:
        for path in reversed(made):
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()


def _lstat_mode(path: Path) -> int:
    """The mode of `path` itself, 0 if it does not exist."""
    try:
        return os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return 0


def _setgroups_denied() -> bool:
    """A user namespace whose maps the user wrote alone: no setgroups(2) in it, by design."""
    try:
        with open("/proc/self/setgroups") as f:
            return f.read().strip() == "deny"
    except OSError:
        return False


def _run(root: Path, process: Process, binds: list[str], files: list[str], network: bool,
         stdout: int | None) -> int:
    try:
        child = subprocess.Popen(
            process.argv, env=process.env, close_fds=True, stdout=stdout,
            stderr=subprocess.STDOUT if stdout is not None else None,
            preexec_fn=lambda: _enter(str(root), process, binds, files, network),
        )
    except subprocess.SubprocessError as exc:
        raise LayerfsError(f"{process.argv[0]}: cannot start in the container: {exc}") from None
    except FileNotFoundError:
        raise LayerfsError(
            f"{process.argv[0]}: executable file not found in the container"
        ) from None
    except PermissionError:
        raise LayerfsError(f"{process.argv[0]}: permission denied in the container") from None
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:  # the child got the SIGINT too; wait for it to finish
            continue
    return 128 - code if code < 0 else code

