"""COPY and ADD: files of the build context, of another stage or image, or of a URL, into a
container's root, with docker's rules.

- Sources are relative to their root (the context, or a stage's root for `--from`) and can
  never leave it: `..` stops at the root and symlinks on the way resolve inside it
  (`rootpath`). Wildcards follow Go's filepath.Match, component by component. Context files
  that `.dockerignore` excludes do not exist for COPY.
- A source directory copies its contents, not itself. Several sources, or a wildcard, need a
  destination directory written with a trailing `/`. A destination that is relative is under
  the working directory. Destination paths resolve inside the container root.
- Copies keep the source's mode and mtime; they belong to 0:0, or to `--chown`, whose names
  are looked up in the container's /etc/passwd and /etc/group; `--chmod` sets the mode.
  Symlinks inside a copied directory stay symlinks.
- ADD of a local tar archive (plain, gzip, bzip2, xz) unpacks it, owners and modes kept, each
  member resolved inside the root, its PAX xattrs set; ADD of a URL downloads one file
  (mode 0600).

`checksum` hashes what a COPY would take (names, types, modes, contents), which is the build
cache's key for the step: an edited file makes a new step, a touched one does not.

Does not know containers or images: it is given host paths of roots.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs.dockerfile.ignore import IgnoreRules, has_magic, match
from layerfs.errors import BuildError
from layerfs.services import rootpath
from layerfs.tarlayer.read import member_xattrs

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass(frozen=True, slots=True)
class SourceRoot:
    """Where COPY sources are found: the context (with its ignore rules) or a stage's root."""

    path: str
    ignore: IgnoreRules | None = None

    def excluded(self, relative: str) -> bool:
        return self.ignore is not None and bool(relative) and self.ignore.excluded(relative)


@dataclass(frozen=True, slots=True)
class Owner:
    uid: int
    gid: int


ROOT_OWNER = Owner(0, 0)


def find_sources(root: SourceRoot, patterns: list[str], what: str) -> list[str]:
    """The host paths that `patterns` name in `root`, in order; BuildError if one names
    nothing."""
    found: list[str] = []
    for pattern in patterns:
        matches = _expand(root, pattern)
        if not matches:
            if has_magic(pattern):
                raise BuildError(f"{what}: no source files were specified by {pattern!r}")
            raise BuildError(f"{what}: {pattern}: no such file or directory in the build "
                             "context (or excluded by .dockerignore)")
        found.extend(matches)
    return found


def _expand(root: SourceRoot, pattern: str) -> list[str]:
    """Host paths of what `pattern` names; the last component of each is not resolved (a
    symlink named as a source is copied under its own name, with its target's content)."""
    candidates = [""]  # relative to the root, unresolved
    for part in rootpath.split(pattern):
        if not has_magic(part):
            candidates = [f"{rel}/{part}" for rel in candidates]
            continue
        found: list[str] = []
        for rel in candidates:
            real = rootpath.resolve(root.path, rel)
            try:
                names = sorted(os.listdir(real))
            except (NotADirectoryError, FileNotFoundError):
                continue
            base = rootpath.inside(root.path, real)
            found.extend(f"{base}/{name}" for name in names if match(part, name))
        candidates = found
    out = []
    for rel in candidates:
        path = rootpath.resolve(root.path, rel, follow_last=False)
        relative = rootpath.inside(root.path, path)
        if os.path.lexists(path) and not (root.excluded(relative)
                                          and not _has_included(root, path, relative)):
            out.append(path)
    return out


def _has_included(root: SourceRoot, path: str, relative: str) -> bool:
    """An excluded directory still counts when an exception (`!`) brings back a file in it."""
    if root.ignore is None or not root.ignore.has_exceptions:
        return False
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        return False
    return any(True for _ in _walk(root, path, relative))


def _walk(root: SourceRoot, path: str, relative: str) -> Iterator[tuple[str, str]]:
    """(host path, path relative to the source root) of every entry under directory `path`
    that the ignore rules keep, parents before children, names sorted."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return
    for name in names:
        child = os.path.join(path, name)
        child_relative = f"{relative}/{name}" if relative else name
        excluded = root.excluded(child_relative)
        is_dir = stat.S_ISDIR(os.lstat(child).st_mode)
        if excluded and not (is_dir and root.ignore is not None and root.ignore.has_exceptions):
            continue
        if excluded:  # a directory kept only for the exceptions inside it
            inner = list(_walk(root, child, child_relative))
            if inner:
                yield child, child_relative
                yield from inner
            continue
        yield child, child_relative
        if is_dir:
            yield from _walk(root, child, child_relative)


def checksum(root: SourceRoot, sources: list[str]) -> str:
    """sha256 over what copying `sources` would take: names, types, modes, link targets and
    contents (not owners, which COPY sets, nor mtimes, which a checkout changes)."""
    digest = hashlib.sha256()
    for source in sources:
        real = rootpath.resolve(root.path, rootpath.inside(root.path, source))
        relative = rootpath.inside(root.path, real)
        entries = [(real, rootpath.inside(root.path, source))]
        if stat.S_ISDIR(os.lstat(real).st_mode):
            entries += list(_walk(root, real, relative))
        for path, name in entries:
            st = os.lstat(path)
            digest.update(f"{name}\0{st.st_mode:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                digest.update(os.fsencode(os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
            digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def destination(dest: str, workdir: str) -> str:
    """The destination path inside the container: relative ones are under the workdir."""
    if dest.startswith("/"):
        return dest
    base = workdir.rstrip("/")
    return f"{base}/{dest}" if dest not in ("", ".") else (base or "/") + "/"


def copy(root: SourceRoot, sources: list[str], container_root: str, dest: str,
         owner: Owner, mode: int | None, *, many: bool) -> None:
    """Copy `sources` (host paths under `root`) to `dest` (absolute, inside the container).

    `many`: the instruction named several sources or a wildcard, so `dest` must be a dir.
    """
    dest_is_dir = dest.endswith("/")
    if many and not dest_is_dir:
        raise BuildError(f"{dest}: when copying more than one source, the destination must "
                         "be a directory and end with a /")
    for source in sources:
        real = rootpath.resolve(root.path, rootpath.inside(root.path, source))
        relative = rootpath.inside(root.path, real)
        if stat.S_ISDIR(os.lstat(real).st_mode):
            target = rootpath.make_dirs(container_root, dest, 0o755, owner.uid, owner.gid)
            for path, name in _walk(root, real, relative):
                inner = name[len(relative):].lstrip("/")
                _copy_entry(path, os.path.join(target, inner), owner, mode)
            continue
        into_dir = dest_is_dir or os.path.isdir(rootpath.resolve(container_root, dest))
        if into_dir:
            parent, name = rootpath.make_dirs(container_root, dest, 0o755, owner.uid,
                                              owner.gid), os.path.basename(source)
        else:
            parent = rootpath.make_dirs(container_root, os.path.dirname(dest) or "/", 0o755,
                                        owner.uid, owner.gid)
            name = os.path.basename(dest)
        _copy_entry(real, os.path.join(parent, name), owner, mode)


def _copy_entry(source: str, target: str, owner: Owner, mode: int | None) -> None:
    """One file, directory, symlink or special file; an existing non-directory at `target`
    is replaced, an existing directory is kept (its contents merge)."""
    st = os.lstat(source)
    try:
        existing = os.lstat(target)
    except FileNotFoundError:
        existing = None
    if existing is not None and not (stat.S_ISDIR(existing.st_mode)
                                     and stat.S_ISDIR(st.st_mode)):
        if stat.S_ISDIR(existing.st_mode):
            shutil.rmtree(target)
        else:
            os.unlink(target)
    final_mode = (mode if mode is not None else st.st_mode) & 0o7777
    if stat.S_ISDIR(st.st_mode):
        if existing is None:
            os.mkdir(target, 0o700)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(source), target)
        os.lchown(target, owner.uid, owner.gid)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return
    elif stat.S_ISREG(st.st_mode):
        _copy_file(source, target)
    else:
        os.mknod(target, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
    os.lchown(target, owner.uid, owner.gid)
    os.chmod(target, final_mode)  # after chown, which clears setuid bits
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_file(source: str, target: str) -> None:
    with open(source, "rb") as src, open(target, "xb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def is_archive(path: str) -> bool:
    """A local tar that ADD unpacks: plain, gzip, bzip2 or xz (what docker recognizes)."""
    if not os.path.isfile(path):
        return False
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def unpack(archive: str, container_root: str, dest: str) -> None:
    """ADD of a local archive: its members under `dest`, owners and modes as in the archive.

    Each member is resolved inside the container root (`..`, absolute names and symlinks of
    the archive or of the image never lead out); hard links must point inside the archive's
    destination.
    """
    target_root = rootpath.make_dirs(container_root, dest, 0o755, 0, 0)
    base = rootpath.inside(container_root, target_root)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _unpack_member(tar, member, container_root, base)
    except tarfile.TarError as exc:
        raise BuildError(f"{os.path.basename(archive)}: bad archive: {exc}") from None


def _unpack_member(tar: tarfile.TarFile, member: tarfile.TarInfo, container_root: str,
                   base: str) -> None:
    name = "/".join(rootpath.split(member.name))
    if not name:
        return
    path = rootpath.resolve(container_root, f"{base}/{name}", follow_last=False)
    parent = rootpath.make_dirs(container_root, rootpath.inside(container_root,
                                                                os.path.dirname(path)),
                                0o755, 0, 0)
    path = os.path.join(parent, os.path.basename(path))
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        existing = None
    if existing is not None and not (member.isdir() and stat.S_ISDIR(existing.st_mode)):
        if stat.S_ISDIR(existing.st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    if member.isdir():
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            os.mkdir(path, 0o700)
    elif member.issym():
        os.symlink(member.linkname, path)
        os.lchown(path, member.uid, member.gid)
        return
    elif member.islnk():
        link = rootpath.resolve(container_root, f"{base}/{member.linkname}", follow_last=False)
        os.link(link, path)
        return
    elif member.isfile():
        source = tar.extractfile(member)
        assert source is not None
        with source, open(path, "xb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    elif member.ischr() or member.isblk() or member.isfifo():
        kind = (stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk()
                else stat.S_IFIFO)
        os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
    else:
        return
    os.lchown(path, member.uid, member.gid)
    os.chmod(path, member.mode & 0o7777)
    for xname, data in member_xattrs(member):  # after chown, which clears a capability
        try:
            os.setxattr(path, xname, data, follow_symlinks=False)
        except OSError as exc:
            raise BuildError(f"{member.name}: xattr {xname}: {exc.strerror}") from None
    os.utime(path, (member.mtime, member.mtime))
