"""Paths inside a container root, resolved as a process chrooted there would resolve them.

Owns: the one rule that a build's COPY, ADD and WORKDIR follow for the paths they write and
read: every symlink met on the way, absolute ones included, resolves inside the root, and
`..` never climbs above it. So an image with `/usr/local -> /opt` gets its files in `/opt`,
and an image with `/x -> /../../etc` can never make a build write in the host's /etc.

Concurrency: the tree is assumed still while a path is resolved and used (a build step has
the container to itself); this is not a defence against a process racing the resolver.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_LINKS = 40


def split(path: str) -> list[str]:
    """The components of `path`, without empty ones and `.`."""
    return [part for part in path.split("/") if part not in ("", ".")]


def resolve(root: str, path: str, *, follow_last: bool = True) -> str:
    """The host path of `path` inside `root`, symlinks resolved inside it.

    Missing components are kept as they are, so the result names what to create. The last
    component is not resolved when `follow_last` is false (a symlink to replace, not to
    write through). ELOOP after MAX_LINKS symlinks, as the kernel.
    """
    parts = split(path)
    stack: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if stack:
                stack.pop()
            continue
        if not parts and not follow_last:
            stack.append(part)
            break
        candidate = os.path.join(root, *stack, part)
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            stack.append(part)
            continue
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                stack = []
            parts = split(target) + parts
            continue
        stack.append(part)
    return os.path.join(root, *stack)


def inside(root: str, path: str) -> str:
    """`path` relative to `root`, "/"-separated; ValueError if it is not under it."""
    relative = os.path.relpath(path, root)
    if relative == ".":
        return ""
    if relative == ".." or relative.startswith("../"):
        raise ValueError(f"{path}: outside {root}")
    return relative


def make_dirs(root: str, path: str, mode: int, uid: int, gid: int) -> str:
    """Directory `path` inside `root`, made with its missing parents (each `mode`, owned by
    `uid:gid`, whatever the umask); its host path. NotADirectoryError if something that is
    not a directory is in the way."""
    target = resolve(root, path)
    relative = inside(root, target)
    current = root
    for part in split(relative):
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, mode)
            os.lchown(current, uid, gid)
            os.chmod(current, mode)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), "/" + relative)
    return target
