"""The overlay engine: the changing side of a merged tree, equal to the kernel's overlayfs.

Input: ordered read-only lower dirs (top first), one upper dir and a work dir on the upper's
filesystem. The upper and the lowers use the kernel overlayfs on-disk format, so the kernel can
mount the same dirs. Lookups, listings and attributes are `tree.MergedTree`'s, which this class
extends with copy-up, creation, removal, rename, setattr, xattr writes and open files. Every
method takes and returns nodes (`layerfs.overlay.nodes`) and raises
`OSError` with the errno the kernel's overlayfs answers; names are bytes.

What the engine does not know: FUSE, the kernel's caches, threads. It is synchronous and not
thread-safe: the caller serializes calls (the FUSE adapter runs one request at a time).
Permission checks are the kernel's (`default_permissions`); the engine acts with the daemon's
rights and gives new objects the caller's owner.

Beyond the kernel's defaults: renaming a directory that has lower parts works (recorded with the
kernel's `redirect` xattr, as with redirect_dir=on; not in the `user.overlay.` format, where
the kernel has no redirects: EXDEV there, as the kernel answers), and copying up one name of a
lower hard-linked group copies the whole visible group as one upper inode.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from layerfs import overlay_xattrs as xattrs
from layerfs import realfs, syscalls
from layerfs.overlay import acl, copyup
from layerfs.overlay.lowers import is_whiteout_stat
from layerfs.overlay.nodes import UPPER, Node, make_ino
from layerfs.overlay.tree import NAME_MAX, Attr, Found, MergedTree, os_error

SLOW_COPY_UP_BYTES = 1 << 20
"""Copy-ups moving more data than this are worth a worker thread (see `CopyUpJob`)."""
_ACCMODE = os.O_RDONLY | os.O_WRONLY | os.O_RDWR
# Open flags that stay with the caller's open: the kernel has applied them (creation), or they
# would only break our buffered requests on the real file (O_DIRECT wants aligned buffers).
_NOT_PASSED = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_DIRECT


@dataclass(slots=True, frozen=True)
class CopyUpJob:
    """The data part of a copy-up, which the caller may run in a worker thread."""

    src: bytes
    st: os.stat_result
    data_len: int | None
    slow: bool
    """Whether moving its data may take long enough to hold up other requests."""
    may_clone: bool
    """Whether it can still turn out to be a clone, which takes no time at any size."""


@dataclass(slots=True, eq=False)
class Handle:
    """An open file: the real descriptor and the layer it was opened in."""

    node: Node
    fd: int
    layer: int
    flags: int
    data_gen: int = 0
    nowait: bool = True
    """Whether `fd` takes page-cache-only reads (preadv2 RWF_NOWAIT); tmpfs refuses them."""




class Engine(MergedTree):
    def __init__(self, lowers: list[bytes], upper: bytes | None, work: bytes | None) -> None:
        """`work` None with an upper: a reader of the merged tree that must not change it."""
        super().__init__(lowers, upper)
        self.work = os.path.realpath(work) if work is not None else None
        self.sync_copy_up = True
        # Who the upper filesystem makes our new objects belong to (the daemon's ids).
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._umask = syscalls.process_umask()
        if self.work is not None and upper is not None:
            copyup.learn_work_dir(self.work)
        if self.override_layers and self.upper is not None and self.work is not None:
            self._mark_upper_overrides()

    def _mark_upper_overrides(self) -> None:
        """Lowers that keep owners in override xattrs: so does the upper, where chown and
        new objects of other owners record theirs (its root says so, as the lowers' do)."""
        assert self.upper is not None
        if UPPER not in self.override_layers:
            # the container's root is the image's: its top layer's root says whose
            top = xattrs.override_of(self.lowers.root(1)) if self.lowers.count else None
            uid, gid, mode = top or (0, 0, stat.S_IMODE(realfs.lstat(self.upper).st_mode))
            xattrs.set_override(self.upper, uid, gid, mode)
            self.override_layers = self.override_layers | {UPPER}

    @property
    def _records_owners(self) -> bool:
        return UPPER in self.override_layers

    def _give_owner(self, target: bytes | int, kind: int, uid: int, gid: int,
                    mode: int) -> None:
        """Make a new upper object `uid:gid`'s: for real, or where the upper records owners
        (a rootless store), in its override xattr (files and directories; other kinds keep
        ours, which stands for root's)."""
        if self._records_owners:
            if kind in (stat.S_IFREG, stat.S_IFDIR):
                xattrs.set_override(target, uid, gid, mode)
            return  # the object stays ours, which stands for root's
        if isinstance(target, int):
            os.fchown(target, uid, gid)
        else:
            realfs.chown(target, uid, gid)

    def drop_setid(self, node: Node) -> None:
        """What a write or truncate by a caller without CAP_FSETID does to the file (the
        kernel's should_remove_suid): setuid goes, setgid too where group-execute is set."""
        if not node.in_upper or node.is_dir:
            return
        real = self._upper_path(node)
        mode = realfs.lstat(real).st_mode
        kill = mode & stat.S_ISUID
        if mode & stat.S_ISGID and mode & stat.S_IXGRP:
            kill |= stat.S_ISGID
        if kill and self._records_owners:
            self._set_recorded_owner(node, real, None, None, self.getattr(node).mode & ~kill)
        elif kill:
            realfs.chmod(real, stat.S_IMODE(mode) & ~kill)

    def setattr(
        self,
        node: Node,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        handle: Handle | None = None,
    ) -> Attr:
        if size is not None and node.is_dir:
            raise os_error(errno.EISDIR)
        self._require_upper()
        self.copy_up(node, data_len=size, meta_only=size is None)
        node.setgid_group = None
        real = self._upper_path(node)
        if (uid is not None or gid is not None or mode is not None) and self._records_owners:
            self._set_recorded_owner(node, real, uid, gid, mode)
        else:
            if uid is not None or gid is not None:
                realfs.chown(real, -1 if uid is None else uid, -1 if gid is None else gid)
            if mode is not None:
                realfs.chmod(real, stat.S_IMODE(mode))
        if size is not None:
            if handle is not None and handle.layer == UPPER and handle.flags & _ACCMODE:
                os.ftruncate(handle.fd, size)
            else:
                realfs.truncate(real, size)
        if atime_ns is not None or mtime_ns is not None:
            if atime_ns is None or mtime_ns is None:
                st = realfs.lstat(real)
                atime_ns = st.st_atime_ns if atime_ns is None else atime_ns
                mtime_ns = st.st_mtime_ns if mtime_ns is None else mtime_ns
            realfs.utime(real, ns=(atime_ns, mtime_ns))
        return self.getattr(node)

    def _set_recorded_owner(self, node: Node, real: bytes, uid: int | None, gid: int | None,
                            mode: int | None) -> None:
        """chown and chmod where the upper records owners: the mode for real (setuid and
        the like need it), owner and mode in the override xattr of a file or directory."""
        attr = self.getattr(node)
        new_uid = attr.uid if uid is None else uid
        new_gid = attr.gid if gid is None else gid
        new_mode = stat.S_IMODE(attr.mode if mode is None else mode)
        kind = stat.S_IFMT(attr.mode)
        if (uid is not None or gid is not None) and kind != stat.S_IFDIR and mode is None:
            # as chown(2): an owner change clears setuid, and setgid where group-exec is set
            new_mode &= ~(stat.S_ISUID | (stat.S_ISGID if new_mode & stat.S_IXGRP else 0))
        if kind != stat.S_IFLNK and (mode is not None or new_mode != stat.S_IMODE(attr.mode)):
            realfs.chmod(real, new_mode)
        if kind in (stat.S_IFREG, stat.S_IFDIR):
            xattrs.set_override(real, new_uid, new_gid, new_mode)
        # other kinds cannot record an owner: they stay ours, root's in the image (as a
        # rootless fuse-overlayfs drops what it cannot chown)

    def setxattr(self, node: Node, name: bytes, value: bytes, flags: int = 0,
                 *, kill_sgid: bool = False) -> None:
        """Set an xattr; `kill_sgid`: the kernel says an access ACL set by someone outside the
        file's group drops the setgid bit, which we must do (as root we keep it otherwise)."""
        self._require_upper()
        self.copy_up(node, meta_only=True)
        node.default_acl = node.setgid_group = None
        real = self._upper_path(node)
        if kill_sgid:
            st = realfs.lstat(real)
            if st.st_mode & stat.S_ISGID and not stat.S_ISLNK(st.st_mode):
                realfs.chmod(real, stat.S_IMODE(st.st_mode) & ~stat.S_ISGID)
        realfs.setxattr(real, xattrs.to_real(name), value, flags)

    def removexattr(self, node: Node, name: bytes) -> None:
        self._require_upper()
        real_name = xattrs.to_real(name)
        if not node.in_upper:
            # as the kernel: removing what is not there copies nothing up
            realfs.getxattr(self.real_path(node), real_name)
        self.copy_up(node, meta_only=True)
        node.default_acl = node.setgid_group = None
        realfs.removexattr(self._upper_path(node), real_name)

    def _require_upper(self) -> None:
        if self.upper is None:
            raise os_error(errno.EROFS)

    def _work(self) -> bytes:
        if self.work is None:
            raise os_error(errno.EROFS)
        return self.work

    def needs_copy_up(self, node: Node, *, meta_only: bool = False) -> bool:
        return not node.in_upper or (node.metacopy and not meta_only)

    def copy_up(self, node: Node, *, data_len: int | None = None,
                meta_only: bool = False) -> None:
        """Give `node` an upper copy (atomic: staged in work, renamed into place).

        `meta_only`: the caller changes metadata only (chmod, chown, utimes, xattrs), so a
        lower regular file with one link gets a metadata-only copy, as the kernel's
        metacopy=on makes it: a sparse file of the same size marked `trusted.overlay.metacopy`,
        whose data stays the lower file's until something writes it. Not in the
        `user.overlay.` format, where the kernel has no metacopy: the data comes up too.
        """
        if not self.needs_copy_up(node, meta_only=meta_only):
            return
        if node.is_dir:
            self._copy_up_dir(node)
            return
        assert node.lower_st is not None and node.lower is not None
        st = node.lower_st
        if (meta_only and stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size
                and not node.in_upper and xattrs.active().copies_meta_only):
            tmp = copyup.stage_object(self._work(), node.lower[1], st, data_len=0, sync=False)
            xattrs.set_metacopy(tmp)
            self.finish_copy_up(node, tmp, metacopy=True)
            return
        self.finish_copy_up(node, self.stage(self.copy_up_job(node, data_len)))

    def copy_up_job(self, node: Node, data_len: int | None = None) -> CopyUpJob:
        """What staging the copy of lower non-directory `node` needs; see `stage`."""
        assert node.lower is not None and node.lower_st is not None and not node.is_dir
        st = node.lower_st
        copied = st.st_size if data_len is None else min(st.st_size, data_len)
        regular = stat.S_ISREG(st.st_mode)
        return CopyUpJob(node.lower[1], st, data_len, regular and copied > SLOW_COPY_UP_BYTES,
                         regular and copyup.may_clone(self._work(), st))

    def stage(self, job: CopyUpJob) -> bytes:
        """Copy a lower object into the work dir. Touches nothing but the work dir and the
        (immutable) source, so it may run in another thread while the engine goes on."""
        return copyup.stage_object(self._work(), job.src, job.st, data_len=job.data_len,
                                   sync=self.sync_copy_up)

    def stage_clone(self, job: CopyUpJob) -> bytes | None:
        """`stage` for a regular file, where it can be a clone; None (nothing staged) where
        the filesystems refuse to clone it."""
        try:
            return copyup.stage_object(self._work(), job.src, job.st, data_len=job.data_len,
                                       sync=self.sync_copy_up, clone_only=True)
        except copyup.CannotClone:
            return None

    def finish_copy_up(self, node: Node, tmp: bytes, *, metacopy: bool = False) -> None:
        """Rename a staged copy into place under every visible name of `node`.

        The tree may have changed while the copy was staged: a node copied up meanwhile keeps
        its copy (ours is dropped), a node with no visible name left is not copied (ENOENT).
        Over a metadata-only copy, the staged data takes the upper's metadata and replaces it.
        """
        if node.in_upper and node.metacopy and not metacopy:
            self._replace_metacopy(node, tmp)
            return
        if node.in_upper:
            copyup.remove_tree(tmp)
            return
        names = self._visible_names(node)
        if not names:
            copyup.remove_tree(tmp)
            raise os_error(errno.ENOENT)
        for parent, _name in names:
            self._copy_up_dir(parent)
        xattrs.set_origin_ino(tmp, node.ino)
        first = self.upper_child(names[0][0], names[0][1])
        times = self._parent_times(names[0][0])
        realfs.renameat2(tmp, first, syscalls.RENAME_NOREPLACE)
        self._restore_parent_times(names[0][0], times)
        for parent, name in names[1:]:
            times = self._parent_times(parent)
            realfs.link(first, self.upper_child(parent, name))
            self._restore_parent_times(parent, times)
            node.links.add((parent, name))
            parent.changed()
        node.in_upper = True
        node.metacopy = metacopy
        if not metacopy:
            node.data_gen += 1

    def _replace_metacopy(self, node: Node, tmp: bytes) -> None:
        upper = self._upper_path(node)
        st = realfs.lstat(upper)
        copyup.copy_metadata(tmp, st, upper)
        xattrs.set_origin_ino(tmp, node.ino)
        parent = next(iter(node.links))[0]
        times = self._parent_times(parent)
        realfs.rename(tmp, upper)
        self._restore_parent_times(parent, times)
        node.metacopy = False
        node.data_gen += 1

    # Copy-up changes no merged timestamp: the parent's times are taken before the copy is
    # renamed into it and put back after (plain calls: a generator's context manager cost
    # more than the two syscalls' Python).
    def _parent_times(self, parent: Node) -> tuple[int, int]:
        st = realfs.lstat(self._upper_path(parent))
        return st.st_atime_ns, st.st_mtime_ns

    def _restore_parent_times(self, parent: Node, times: tuple[int, int]) -> None:
        realfs.utime(self._upper_path(parent), ns=times)

    def _visible_names(self, node: Node) -> list[tuple[Node, bytes]]:
        """The names under which the merged tree shows this lower file, for copy-up.

        For a lower hard-linked file, that is every name of its group still visible, so that
        the upper copy keeps the group together as one inode.
        """
        assert node.lower is not None and node.lower_st is not None
        candidates = set(node.links)
        if node.lower_st.st_nlink > 1:
            for rel in self.lowers.hardlink_names(node.lower[0], node.lower_st.st_ino):
                parts = rel.split(b"/")
                parent = self.nodes.root
                try:
                    for part in parts[:-1]:
                        parent = self._lookup_node(parent, part)
                except OSError:
                    continue
                if parent.is_dir:
                    candidates.add((parent, parts[-1]))
        names: list[tuple[Node, bytes]] = []
        for parent, name in sorted(candidates, key=lambda link: (link[0].path(), link[1])):
            found = self._lookup(parent, name)
            if found is not None and not found.is_dir and self._ino_of(found) == node.ino:
                names.append((parent, name))
        node.links = set(names)
        return names

    def _copy_up_dir(self, node: Node) -> None:
        if node.in_upper:
            return
        assert node.parent is not None
        self._copy_up_dir(node.parent)
        src = node.lowers[0][1]
        listing = self.lowers.listing(src)
        assert listing is not None
        tmp = copyup.stage_dir(self._work(), src, listing.st)
        times = self._parent_times(node.parent)
        realfs.renameat2(tmp, self.upper_child(node.parent, node.name), syscalls.RENAME_NOREPLACE)
        self._restore_parent_times(node.parent, times)
        node.in_upper = True

    def _prepare_create(self, parent: Node, name: bytes, *, exclusive: bool = False) -> bool:
        """Check that `name` is free and the parent is in the upper; True over a whiteout.

        `exclusive`: the caller creates with O_EXCL, which finds whatever the upper holds
        under the name (see `create`), so the upper is only asked where a lower shows it."""
        self._require_upper()
        if len(name) > NAME_MAX:
            raise os_error(errno.ENAMETOOLONG, name)
        in_lower = self.lower_has(parent, name)
        over_whiteout = False
        if parent.in_upper and (in_lower or not exclusive):
            try:
                st = realfs.lstat(self.upper_child(parent, name))
            except FileNotFoundError:
                pass
            else:
                if not is_whiteout_stat(st):
                    raise os_error(errno.EEXIST, name)
                over_whiteout = True
        if in_lower and not over_whiteout:
            raise os_error(errno.EEXIST, name)
        self._copy_up_dir(parent)
        parent.changed()
        return over_whiteout

    def _owner(self, parent: Node, uid: int, gid: int, is_dir: bool) -> tuple[int, int, int, int]:
        """Owner and extra mode bits of a new object: a setgid directory hands on its group;
        and the group the upper filesystem gives an object we make there (ours, or that)."""
        group = parent.setgid_group
        if group is None:  # read once: creates come in bursts, like the default ACL
            pst = realfs.lstat(self._upper_path(parent))
            group = parent.setgid_group = pst.st_gid if pst.st_mode & stat.S_ISGID else -1
        if group >= 0:
            return uid, group, stat.S_ISGID if is_dir else 0, group
        return uid, gid, 0, self._egid

    def _place(self, tmp: bytes, target: bytes, over_whiteout: bool, is_dir: bool) -> None:
        """Move a staged new object to its name, replacing a whiteout atomically."""
        if not over_whiteout:
            realfs.renameat2(tmp, target, syscalls.RENAME_NOREPLACE)
        elif is_dir:
            realfs.renameat2(tmp, target, syscalls.RENAME_EXCHANGE)
            realfs.unlink(tmp)  # the whiteout, swapped into the work dir
        else:
            realfs.rename(tmp, target)

    def _masked_bits(self, parent: Node) -> int:
        """The mode bits that making an object in `parent` (in the upper, its default ACL
        read) may take away: the umask, or any where a default ACL masks instead; setuid and
        setgid always, which the kernel may strip from a file it makes."""
        masked = 0o7777 if parent.default_acl else self._umask
        return masked | stat.S_ISUID | stat.S_ISGID

    def _new_acl(self, parent: Node, mode: int, umask: int, is_dir: bool) -> acl.NewObjectAcl:
        """Mode and ACLs of a new object in `parent` (in the upper by now), as inherited."""
        default = parent.default_acl
        if default is None:  # read once: creates come in bursts, an ACL change resets it
            default = parent.default_acl = (
                xattrs.get_xattr(self._upper_path(parent), acl.DEFAULT) or b"")
        return acl.for_new_object(default or None, stat.S_IMODE(mode), umask, is_dir)

    @staticmethod
    def _set_acls(target: bytes | int, new: acl.NewObjectAcl) -> None:
        """Give a new object (a path not to follow, or an open descriptor) its inherited ACLs.

        After the chmod: setting an access ACL keeps the mode in step with it, and it was
        masked by that very mode."""
        for name, value in ((acl.ACCESS, new.access), (acl.DEFAULT, new.default)):
            if value is None:
                continue
            if isinstance(target, int):
                os.setxattr(target, name, value)
            else:
                realfs.setxattr(target, name, value)

    def _new_object(
        self, parent: Node, name: bytes, kind: int, mode: int, uid: int, gid: int,
        *, rdev: int = 0, target: bytes = b"", umask: int = 0, over_whiteout: bool,
    ) -> Node:
        is_dir = kind == stat.S_IFDIR
        uid, gid, extra, _ = self._owner(parent, uid, gid, is_dir)
        new = None if kind == stat.S_IFLNK else self._new_acl(parent, mode, umask, is_dir)
        tmp = copyup.work_name(self._work())
        if is_dir:
            realfs.mkdir(tmp, 0o700)
        elif kind == stat.S_IFLNK:
            realfs.symlink(target, tmp)
        elif kind == stat.S_IFREG:
            os.close(realfs.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        else:
            realfs.mknod(tmp, kind | 0o600, rdev)
        self._give_owner(tmp, kind, uid, gid, (new.mode | extra) if new is not None else 0o777)
        if new is not None:
            realfs.chmod(tmp, new.mode | extra)
            self._set_acls(tmp, new)
        if is_dir and over_whiteout:
            xattrs.set_opaque(tmp)
        real = self.upper_child(parent, name)
        self._place(tmp, real, over_whiteout, is_dir)
        found = self._lookup(parent, name)
        assert found is not None
        node = self._attach(parent, name, found)
        node.lookups += 1
        return node

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int,
              umask: int = 0) -> Node:
        return self._new_object(parent, name, stat.S_IFDIR, mode, uid, gid, umask=umask,
                                over_whiteout=self._prepare_create(parent, name))

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int,
              umask: int = 0) -> Node:
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise os_error(errno.EINVAL, name)
        if kind == stat.S_IFCHR and rdev == 0:
            raise os_error(errno.EPERM, name)  # as the kernel: that is a whiteout
        return self._new_object(parent, name, kind, mode, uid, gid, rdev=rdev, umask=umask,
                                over_whiteout=self._prepare_create(parent, name))

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int) -> Node:
        return self._new_object(parent, name, stat.S_IFLNK, 0o777, uid, gid, target=target,
                                over_whiteout=self._prepare_create(parent, name))

    def create(
        self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int,
        umask: int = 0,
    ) -> tuple[Node, Handle, Attr]:
        """A new regular file, open, and its attributes. Where no whiteout is in the way it
        is made in place, as the kernel does, and the descriptor that made it is the handle."""
        if self._prepare_create(parent, name, exclusive=True):
            return self._create_over_whiteout(parent, name, mode, flags, uid, gid, umask)
        owner_uid, owner_gid, _extra, made_gid = self._owner(parent, uid, gid, False)
        new = self._new_acl(parent, mode, umask, False)
        real = self.upper_child(parent, name)
        keep = flags & ~(_ACCMODE | _NOT_PASSED | os.O_TRUNC)
        # Born with its mode where nothing follows that could widen it meanwhile (a chown)
        # or that the mode would mask: no chmod then.
        born_right = (owner_uid == self._euid and owner_gid == made_gid and new.access is None
                      and not new.mode & self._masked_bits(parent) and not self._records_owners)
        try:
            fd = realfs.open(real, keep | os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                             | os.O_NOFOLLOW, new.mode if born_right else 0o600)
        except FileExistsError:
            if not self._is_upper_whiteout(real):  # a whiteout no lower needs any more
                raise
            return self._create_over_whiteout(parent, name, mode, flags, uid, gid, umask)
        uid, gid = owner_uid, owner_gid
        try:
            if not born_right:
                if uid != self._euid or gid != made_gid or self._records_owners:
                    self._give_owner(fd, stat.S_IFREG, uid, gid, new.mode)
                os.fchmod(fd, new.mode)  # after the chown, which would clear setuid and setgid
            self._set_acls(fd, new)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            realfs.unlink(real)
            raise
        # A new file has no origin to ask its number of.
        node = self._attach(parent, name, Found(False, UPPER, real, st),
                            ino=make_ino(UPPER, st.st_ino))
        node.lookups += 1
        node.opens += 1
        node.open_fds = (*node.open_fds, fd)
        return node, Handle(node, fd, UPPER, flags), self.getattr(node, st)

    def _create_over_whiteout(
        self, parent: Node, name: bytes, mode: int, flags: int, uid: int, gid: int, umask: int,
    ) -> tuple[Node, Handle, Attr]:
        node = self._new_object(parent, name, stat.S_IFREG, mode, uid, gid, umask=umask,
                                over_whiteout=True)
        handle = self.open(node, flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
        return node, handle, self.getattr(node)

    def link(self, node: Node, new_parent: Node, new_name: bytes) -> Node:
        if node.is_dir:
            raise os_error(errno.EPERM, new_name)
        over_whiteout = self._prepare_create(new_parent, new_name)
        self.copy_up(node)
        target = self.upper_child(new_parent, new_name)
        source = self._upper_path(node)
        if over_whiteout:
            tmp = copyup.work_name(self._work())
            realfs.link(source, tmp)
            realfs.rename(tmp, target)
        else:
            realfs.link(source, target)
        node.links.add((new_parent, new_name))
        node.lookups += 1
        return node

    def unlink(self, parent: Node, name: bytes) -> None:
        found = self._lookup(parent, name)
        if found is None:
            raise os_error(errno.ENOENT, name)
        if found.is_dir:
            raise os_error(errno.EISDIR, name)
        self._require_upper()
        node = self._attach(parent, name, found)
        if self._in_lower_group(found):
            # one name of a lower hard-linked group goes: the group moves up together first,
            # so that the names left count their links right (as the kernel's index=on does)
            self.copy_up(node)
            found = self._lookup(parent, name)
            assert found is not None
        self._remove(parent, name, found)
        node.links.discard((parent, name))
        if found.layer == UPPER and found.st.st_nlink <= 1:
            node.dead = True
        self.nodes.maybe_drop(node)

    def rmdir(self, parent: Node, name: bytes) -> None:
        found = self._lookup(parent, name)
        if found is None:
            raise os_error(errno.ENOENT, name)
        if not found.is_dir:
            raise os_error(errno.ENOTDIR, name)
        self._require_upper()
        node = self._attach(parent, name, found)
        if node is self.nodes.root:
            raise os_error(errno.EBUSY, name)
        if not self.is_empty(node):
            raise os_error(errno.ENOTEMPTY, name)
        self._remove(parent, name, found)
        node.dead = True
        self.nodes.maybe_drop(node)

    @staticmethod
    def _in_lower_group(found: Found) -> bool:
        """A regular file of a lower layer with more than one name."""
        return (found.layer != UPPER and found.st.st_nlink > 1
                and stat.S_ISREG(found.st.st_mode))

    def _remove(self, parent: Node, name: bytes, found: Found) -> None:
        """Delete a merged name: unlink the upper object, leave a whiteout where a lower shows."""
        needs_whiteout = self.lower_has(parent, name)
        self._copy_up_dir(parent)
        parent.changed()
        real = self.upper_child(parent, name)
        if found.layer != UPPER:
            realfs.make_whiteout(real)
            return
        if needs_whiteout:
            tmp = copyup.work_name(self._work())
            realfs.make_whiteout(tmp)
            if found.is_dir:
                realfs.renameat2(tmp, real, syscalls.RENAME_EXCHANGE)
                copyup.remove_tree(tmp)  # the old dir: empty but for whiteouts
            else:
                realfs.rename(tmp, real)
        elif found.is_dir:
            self._clear_whiteouts(real)
            realfs.rmdir(real)
        else:
            realfs.unlink(real)

    @staticmethod
    def _clear_whiteouts(real: bytes) -> None:
        """Empty an upper directory whose merged view is empty: only whiteouts are left."""
        with realfs.scandir(real) as it:
            names = [entry.name for entry in it]
        for name in names:
            realfs.unlink(real + b"/" + name)

    def rename(
        self, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes,
        flags: int = 0,
    ) -> None:
        noreplace = bool(flags & syscalls.RENAME_NOREPLACE)
        exchange = bool(flags & syscalls.RENAME_EXCHANGE)
        if flags & ~(syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE) or (
            noreplace and exchange
        ):
            raise os_error(errno.EINVAL)
        if len(new_name) > NAME_MAX:
            raise os_error(errno.ENAMETOOLONG, new_name)
        src = self._lookup(old_parent, old_name)
        if src is None:
            raise os_error(errno.ENOENT, old_name)
        dst = self._lookup(new_parent, new_name)
        if dst is not None and noreplace:
            raise os_error(errno.EEXIST, new_name)
        if dst is None and exchange:
            raise os_error(errno.ENOENT, new_name)
        self._require_upper()
        snode = self._attach(old_parent, old_name, src)
        dnode = self._attach(new_parent, new_name, dst) if dst is not None else None
        if snode is dnode:
            return  # two names of one file, or the same name: nothing to do
        if snode.is_dir and snode.is_ancestor_of(new_parent):
            raise os_error(errno.EINVAL, new_name)
        if exchange and dnode is not None and dnode.is_dir and dnode.is_ancestor_of(old_parent):
            raise os_error(errno.EINVAL, old_name)
        if dst is not None and not exchange:
            if src.is_dir and not dst.is_dir:
                raise os_error(errno.ENOTDIR, new_name)
            if not src.is_dir and dst.is_dir:
                raise os_error(errno.EISDIR, new_name)
        if not xattrs.active().moves_merged_dirs and (
            self._has_lower_parts(snode) or (exchange and self._has_lower_parts(dnode))
        ):
            raise os_error(errno.EXDEV, old_name)  # as the kernel's ovl_can_move, no redirects
        if (dst is not None and not exchange and dst.is_dir and dnode is not None
                and not self.is_empty(dnode)):
            raise os_error(errno.ENOTEMPTY, new_name)
        if exchange:
            self._rename_exchange(old_parent, old_name, snode, new_parent, new_name, dnode)
        else:
            self._rename_move(old_parent, old_name, snode, new_parent, new_name, dst, dnode)
        old_parent.changed()
        new_parent.changed()

    @staticmethod
    def _has_lower_parts(node: Node | None) -> bool:
        return node is not None and node.is_dir and bool(node.lowers)

    def _rename_move(
        self, old_parent: Node, old_name: bytes, snode: Node,
        new_parent: Node, new_name: bytes, dst: Found | None, dnode: Node | None,
    ) -> None:
        leave_whiteout = self.lower_has(old_parent, old_name)
        self._copy_up_dir(old_parent)
        self._copy_up_dir(new_parent)
        self.copy_up(snode)
        if dnode is not None and dst is not None and self._in_lower_group(dst):
            # the name replaced belongs to a lower hard-linked group: the group moves up first,
            # so that the names left count their links right (as the kernel's index=on does)
            self.copy_up(dnode)
            dst = self._lookup(new_parent, new_name)
        old_real = self.upper_child(old_parent, old_name)
        new_real = self.upper_child(new_parent, new_name)
        if snode.is_dir:
            self._mark_moved_dir(snode, old_real, new_parent, new_name)
        if dst is not None and dst.is_dir and dst.layer == UPPER:
            self._clear_whiteouts(new_real)
        if dst is None and snode.is_dir and self._is_upper_whiteout(new_real):
            # a directory cannot replace the whiteout by rename: swap them instead
            realfs.renameat2(old_real, new_real, syscalls.RENAME_EXCHANGE)
            if not leave_whiteout:
                realfs.unlink(old_real)
        elif leave_whiteout:
            realfs.rename_leaving_whiteout(old_real, new_real)
        else:
            realfs.renameat2(old_real, new_real)
        if dnode is not None:
            if dnode.is_dir:
                dnode.dead = True
            else:
                dnode.links.discard((new_parent, new_name))
                if dst is not None and dst.layer == UPPER and dst.st.st_nlink <= 1:
                    dnode.dead = True
            self.nodes.maybe_drop(dnode)
        self._move_node(snode, old_parent, old_name, new_parent, new_name)

    def _rename_exchange(
        self, old_parent: Node, old_name: bytes, snode: Node,
        new_parent: Node, new_name: bytes, dnode: Node | None,
    ) -> None:
        assert dnode is not None
        self._copy_up_dir(old_parent)
        self._copy_up_dir(new_parent)
        self.copy_up(snode)
        self.copy_up(dnode)
        old_real = self.upper_child(old_parent, old_name)
        new_real = self.upper_child(new_parent, new_name)
        if snode.is_dir:
            self._mark_moved_dir(snode, old_real, new_parent, new_name)
        if dnode.is_dir:
            self._mark_moved_dir(dnode, new_real, old_parent, old_name)
        realfs.renameat2(old_real, new_real, syscalls.RENAME_EXCHANGE)
        self._move_node(snode, old_parent, old_name, new_parent, new_name)
        self._move_node(dnode, new_parent, new_name, old_parent, old_name)

    def _mark_moved_dir(self, node: Node, real: bytes, new_parent: Node, new_name: bytes) -> None:
        """Before a directory moves: keep its lower parts (redirect) or hide the new place's.

        Set before the rename, so a crash cannot leave a moved directory merged with the wrong
        lower directory.
        """
        if node.lowers:
            layer, lower_real = node.lowers[0]
            xattrs.set_redirect(real, lower_real[len(self.lowers.root(layer)) :] or b"/")
        elif self.lower_has(new_parent, new_name):
            xattrs.set_opaque(real)

    @staticmethod
    def _move_node(
        node: Node, old_parent: Node, old_name: bytes, new_parent: Node, new_name: bytes
    ) -> None:
        if node.is_dir:
            node.move(new_parent, new_name)
        else:
            node.links.discard((old_parent, old_name))
            node.links.add((new_parent, new_name))

    def open(self, node: Node, flags: int) -> Handle:
        """Open the real object; writing (or O_TRUNC) copies up, reading never does."""
        if node.is_dir:
            raise os_error(errno.EISDIR)
        writing = bool(flags & (os.O_WRONLY | os.O_RDWR)) or bool(flags & os.O_TRUNC)
        if writing:
            self._require_upper()
            self.copy_up(node, data_len=0 if flags & os.O_TRUNC else None)
        real = self.data_path(node)
        open_flags = flags & ~_NOT_PASSED | os.O_CLOEXEC
        fd = realfs.open(real, open_flags | os.O_NOFOLLOW)
        node.opens += 1
        node.open_fds = (*node.open_fds, fd)
        layer = UPPER if node.in_upper and not node.metacopy else 1
        return Handle(node, fd, layer, flags, node.data_gen)

    def read(self, handle: Handle, off: int, size: int) -> bytes:
        return os.pread(self.reading_fd(handle), size, off)

    def lseek(self, handle: Handle, off: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE answered by the real file (ENXIO past the end)."""
        return os.lseek(self.reading_fd(handle), off, whence)

    def reading_fd(self, handle: Handle) -> int:
        """The descriptor that reads `handle`'s data now (the copy, once copied up)."""
        node = handle.node
        if handle.data_gen != node.data_gen:
            # copied up since it was opened: read what the merged tree shows now
            fd = realfs.open(self.data_path(node), os.O_RDONLY | os.O_CLOEXEC)
            self._forget_fd(handle)
            handle.fd, handle.data_gen, handle.nowait = fd, node.data_gen, True
            handle.layer = UPPER if node.in_upper and not node.metacopy else 1
            node.open_fds = (*node.open_fds, fd)
        return handle.fd

    def write(self, handle: Handle, off: int, data: bytes | memoryview) -> int:
        return os.pwrite(handle.fd, data, off)

    def fallocate(self, handle: Handle, mode: int, off: int, length: int) -> None:
        """On the upper copy (the kernel opens for writing first, which copied it up)."""
        if handle.layer != UPPER or not handle.flags & _ACCMODE:
            raise os_error(errno.EBADF)
        syscalls.fallocate(handle.fd, mode, off, length)

    def fsync(self, handle: Handle, datasync: bool) -> None:
        if datasync:
            os.fdatasync(handle.fd)
        else:
            os.fsync(handle.fd)

    @staticmethod
    def _forget_fd(handle: Handle) -> None:
        os.close(handle.fd)
        fds = handle.node.open_fds
        if handle.fd in fds:
            handle.node.open_fds = tuple(fd for fd in fds if fd != handle.fd)

    def release(self, handle: Handle) -> None:
        self._forget_fd(handle)
        handle.node.opens -= 1
        self.nodes.maybe_drop(handle.node)
