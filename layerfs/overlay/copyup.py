"""Copy-up: make a private copy of a lower object in the work dir, ready to be renamed into place.

The copy keeps mode (setuid bits included), owner, times, all xattrs (security.capability
last, since writing data or changing the owner clears it) and the holes of sparse files; data
moves by reflink where the filesystem shares extents, else by copy_file_range over the data
segments. Nothing here knows the merge: the engine decides what to copy and where it goes, and
renames the staged copy into the upper dir, which is what makes copy-up atomic.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat

from layerfs import overlay_xattrs as xattrs
from layerfs import realfs, syscalls

_counter = itertools.count()
_pid = os.getpid()  # in work names; a fork server's child is another process


def _reset_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_reset_pid)
_no_clone: set[tuple[bytes, int]] = set()
"""(work dir, source device) pairs where FICLONE failed: not worth a syscall per copy-up."""
_MUST_COPY = ("system.posix_acl_access", "system.posix_acl_default", "security.")
_made_by: dict[bytes, tuple[int, int, int]] = {}
"""Work dir → (uid, gid, umask) that an object this process makes there is born with."""


def _birth(work: bytes) -> tuple[int, int, int]:
    """Who owns what we make in `work`, and what masks its mode: the umask, or everything
    where the work dir has a default ACL, which would mask it instead (read once: the daemon
    changes neither, and the work dir is its own)."""
    found = _made_by.get(work)
    if found is None:
        work_st = realfs.lstat(work)
        # A setgid dir hands on its group, and so does every dir on a filesystem mounted with
        # grpid; only where the dir's group is ours or it is setgid do both rules agree.
        known = work_st.st_mode & stat.S_ISGID or work_st.st_gid == os.getegid()
        inherits = xattrs.get_xattr(work, "system.posix_acl_default") is not None
        masked = 0o7777 if inherits or not known else syscalls.process_umask()
        found = _made_by[work] = (os.geteuid(), work_st.st_gid, masked)
    return found


def learn_work_dir(work: bytes) -> None:
    """Read now, at mount, what the first copy-up into `work` would otherwise read in its own
    time (see `_birth`)."""
    _birth(work)


def work_name(work: bytes) -> bytes:
    """A fresh name in the work dir; the work dir is private to one mount."""
    return b"%s/#%x-%x" % (work, _pid, next(_counter))


def clean_work(work: bytes) -> None:
    """Remove what a killed daemon left staged in the work dir. Never touches the upper."""
    with realfs.scandir(work) as it:
        for entry in it:
            if entry.name.startswith(b"#"):
                remove_tree(work + b"/" + entry.name)


def remove_tree(path: bytes) -> None:
    """rm -rf of a staged object, without following symlinks."""
    try:
        st = realfs.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        with realfs.scandir(path) as it:
            children = [path + b"/" + entry.name for entry in it]
        for child in children:
            remove_tree(child)
        realfs.rmdir(path)
    else:
        realfs.unlink(path)


def _copy_meta(path: bytes, st: os.stat_result, src: bytes, *, is_link: bool,
               born_right: bool = False) -> None:
    """`born_right`: `path` was made with `st`'s owner and mode (see `_born_as`)."""
    if not born_right:
        realfs.chown(path, st.st_uid, st.st_gid)
        if not is_link:
            # after chown, which clears setuid and setgid
            realfs.chmod(path, stat.S_IMODE(st.st_mode))
    for name, value in xattrs.user_xattrs(src):
        with contextlib.suppress(OSError) if is_link else contextlib.nullcontext():
            try:
                realfs.setxattr(path, name, value)
            except OSError as exc:
                # as the kernel's ovl_copy_xattr: an upper without this namespace (user.* on
                # an older tmpfs) loses the xattr, but ACLs and security.* must come along
                if exc.errno != errno.EOPNOTSUPP or name.startswith(_MUST_COPY):
                    raise
    realfs.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_metadata(path: bytes, st: os.stat_result, src: bytes) -> None:
    """Make `path`'s owner, mode, xattrs and times those of `src` (whose stat is `st`)."""
    for name in realfs.listxattr(path):
        if not xattrs.is_private(name.encode()):
            realfs.removexattr(path, name)
    _copy_meta(path, st, src, is_link=False)


def stage_dir(work: bytes, src: bytes, st: os.stat_result) -> bytes:
    """An empty copy of directory `src` (mode, owner, xattrs, times) in the work dir.

    Made with its final mode where it is born with the right owner (see `_born_as`), as a
    regular file is: the work dir is private, so an empty dir's mode guards nothing there.
    """
    tmp = work_name(work)
    born_right = _born_as(work, st)
    realfs.mkdir(tmp, stat.S_IMODE(st.st_mode) if born_right else 0o700)
    _copy_meta(tmp, st, src, is_link=False, born_right=born_right)
    return tmp


def _born_as(work_dir: bytes, st: os.stat_result) -> bool:
    """Whether an object made in `work_dir` with `st`'s mode gets `st`'s owner and exactly that
    mode, so that no chown or chmod has to follow (the common case: root copying up root's
    files).

    Never for setuid or setgid objects: a file's bits are set last, after the data is in, and a
    setgid dir's group decides its children's."""
    uid, gid, umask = _birth(work_dir)
    mode = stat.S_IMODE(st.st_mode)
    return (st.st_uid, st.st_gid) == (uid, gid) and not mode & (umask | stat.S_ISUID
                                                                 | stat.S_ISGID)


class CannotClone(Exception):
    """A copy-up asked to be a clone only (see `stage_object`) met filesystems that cannot."""


def may_clone(work: bytes, st: os.stat_result) -> bool:
    """Whether a copy of `st`'s file into `work` can still turn out to be a clone: FICLONE
    has not been refused for its filesystem there."""
    return (work, st.st_dev) not in _no_clone


def stage_object(
    work: bytes, src: bytes, st: os.stat_result, *, data_len: int | None = None,
    sync: bool = True, clone_only: bool = False,
) -> bytes:
    """A copy of non-directory `src` in the work dir.

    `data_len` limits the data copied (0 when the caller truncates it right after); the size
    is kept. Copied data is fsynced before the copy can be renamed into place, as the kernel
    does, unless `sync` is False; a clone is not, as in the kernel: its extents are on disk
    already, and the journal orders the clone before the rename that publishes it.
    `clone_only`: raise CannotClone rather than move data (the caller would rather move it
    elsewhere, on a worker).
    """
    tmp = work_name(work)
    try:
        _stage_object(tmp, src, st, data_len=data_len, sync=sync, clone_only=clone_only)
    except BaseException:
        remove_tree(tmp)  # a full disk or a vanished source leaves nothing staged
        raise
    return tmp


def _stage_object(
    tmp: bytes, src: bytes, st: os.stat_result, *, data_len: int | None, sync: bool,
    clone_only: bool,
) -> None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        work_dir = tmp.rpartition(b"/")[0]
        born_right = _born_as(work_dir, st)
        fd = realfs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         stat.S_IMODE(mode) if born_right else 0o600)
        try:
            size = st.st_size if data_len is None else min(st.st_size, data_len)
            copied = False
            if size:
                src_fd = realfs.open(src, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    if not _clone(work_dir, st, src_fd, fd):
                        if clone_only:
                            raise CannotClone
                        syscalls.copy_data(src_fd, fd, size,
                                           dense=st.st_blocks * 512 >= st.st_size)
                        copied = True
                finally:
                    os.close(src_fd)
            if size != st.st_size:
                os.ftruncate(fd, st.st_size)
            if sync and copied:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        _copy_meta(tmp, st, src, is_link=False, born_right=born_right)
    elif stat.S_ISLNK(mode):
        realfs.symlink(realfs.readlink(src), tmp)
        _copy_meta(tmp, st, src, is_link=True)
    else:
        realfs.mknod(tmp, stat.S_IFMT(mode) | 0o600, st.st_rdev)
        _copy_meta(tmp, st, src, is_link=False)


def _clone(work_dir: bytes, st: os.stat_result, src_fd: int, fd: int) -> bool:
    """Clone `src_fd` (whose stat is `st`) into `fd` where its filesystem may; remember
    where it cannot."""
    if not may_clone(work_dir, st):
        return False
    refused = syscalls.clone_data(src_fd, fd)
    if refused in syscalls.NO_CLONE:
        _no_clone.add((work_dir, st.st_dev))
    return not refused
