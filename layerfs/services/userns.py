"""A rootless user's ids: the user's own and its subordinate ranges (/etc/subuid, /etc/subgid,
which `newuidmap`/`newgidmap` of the `uidmap` package honour), as podman uses them.

Image id 0 is the user, image ids 1..N are the first subordinate range. A `layerfs mount`
shows the image's owners through that map (the user owns, outside, what root owns in the
image); `run`, every `build` step and `unshare` work in a user namespace with the same map
(`call_as_root_inside`, `with_own_mounts`), where the image's owners are themselves again.
Without a range only root maps; other owners show as the overflow id.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pwd
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from layerfs import syscalls
from layerfs.errors import LayerfsError
from layerfs.fuse.idmap import IdMap

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

Ranges = tuple[tuple[int, int, int], ...]
"""(inside, outside, count) triples: image ids and the ids that stand for them outside."""


@dataclass(frozen=True, slots=True)
class IdRanges:
    uids: Ranges
    gids: Ranges

    def mount_map(self) -> IdMap:
        """The mount's mapping: ids on disk (the image's, see overlay_xattrs.OVERRIDE_STAT)
        shown as the ids outside that stand for them."""
        return IdMap(uids=self.uids, gids=self.gids)

    @property
    def has_subordinates(self) -> bool:
        return len(self.uids) > 1 and len(self.gids) > 1


def _subordinate(path: str, name: str, ident: int) -> tuple[int, int] | None:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[0] in (name, str(ident)):
            try:
                start, count = int(parts[1]), int(parts[2])
            except ValueError:
                continue
            if count > 0:
                return start, count
    return None


def ranges_of_this_user() -> IdRanges:
    uid, gid = os.geteuid(), os.getegid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    uids: list[tuple[int, int, int]] = [(0, uid, 1)]
    gids: list[tuple[int, int, int]] = [(0, gid, 1)]
    sub_uid = _subordinate("/etc/subuid", name, uid)
    sub_gid = _subordinate("/etc/subgid", name, uid)
    if sub_uid is not None and sub_gid is not None and shutil.which("newuidmap") \
            and shutil.which("newgidmap"):
        uids.append((1, *sub_uid))
        gids.append((1, *sub_gid))
    return IdRanges(tuple(uids), tuple(gids))


def write_maps(pid: int, ranges: IdRanges) -> None:
    """Give the user namespace of process `pid` (which has just unshared it) the ranges:
    through newuidmap/newgidmap with subordinate ranges, else by writing the one-id maps
    ourselves, which the kernel lets a process do for its own user (setgroups denied)."""
    if ranges.has_subordinates:
        for tool, triples in (("newuidmap", ranges.uids), ("newgidmap", ranges.gids)):
            args = [str(n) for triple in triples for n in triple]
            result = subprocess.run([tool, str(pid), *args], capture_output=True, text=True,
                                    check=False)
            if result.returncode != 0:
                why = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
                raise LayerfsError(f"{tool}: cannot map the user's ids: {why}")
        return
    try:
        with open(f"/proc/{pid}/uid_map", "w") as f:
            f.write(f"0 {ranges.uids[0][1]} 1\n")
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
        with open(f"/proc/{pid}/gid_map", "w") as f:
            f.write(f"0 {ranges.gids[0][1]} 1\n")
    except OSError as exc:
        raise LayerfsError(f"cannot map the user's ids in a user namespace: {exc.strerror}") \
            from None


def fork_in_user_namespace(ranges: IdRanges) -> int:
    """fork(), as os.fork does; in the child (0) the process has become root of a user
    namespace of its own, which the parent has mapped with `ranges` by the time fork returns
    there. The parent gets the child's pid once the maps are written (LayerfsError where the
    namespace cannot be made or mapped; the child is then gone)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        try:
            syscalls.unshare(syscalls.CLONE_NEWUSER)
        except OSError:
            os._exit(126)
        os.write(ready_w, b"u")
        os.close(ready_w)
        if os.read(go_r, 1) != b"g":
            os._exit(126)
        os.close(go_r)
        return 0
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"u":
            raise LayerfsError("cannot make a user namespace (unshare refused)")
        write_maps(pid, ranges)
        os.write(go_w, b"g")
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(ready_r)
        os.close(go_w)
    return pid


def call_as_root_inside(fn: Callable[[], T]) -> T:
    """`fn()` in a child process that is root in a user namespace mapped with the user's
    ranges, as `run`'s process is: it may write and chown in a rootless mount as the image's
    root would. Its result or exception comes back (pickled: our own child's)."""
    out_r, out_w = os.pipe()
    try:
        pid = fork_in_user_namespace(ranges_of_this_user())
    except BaseException:
        os.close(out_r)
        os.close(out_w)
        raise
    if pid == 0:  # the child: nothing here may return
        os.close(out_r)
        try:
            payload = pickle.dumps((True, fn()))
        except BaseException as exc:
            try:
                payload = pickle.dumps((False, exc))
            except Exception:
                payload = pickle.dumps((False, LayerfsError(f"{type(exc).__name__}: {exc}")))
        with contextlib.suppress(BaseException), os.fdopen(out_w, "wb") as out:
            out.write(payload)
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0)
    os.close(out_w)
    try:
        with os.fdopen(out_r, "rb") as source:
            payload = source.read()
    finally:
        os.waitpid(pid, 0)
    if not payload:
        raise LayerfsError("the user namespace's process ended without an answer")
    ok, value = pickle.loads(payload)
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def with_own_mounts(fn: Callable[[], T]) -> T:
    """`fn()` as root of a user namespace with the user's ids (`call_as_root_inside`) and in
    a mount namespace of that one's own, private: a FUSE mount made there is the namespace's
    (the kernel then shows owners through its map, and `allow_other` lets every process of
    the namespace in, whatever its user) and goes with it."""
    def inside() -> T:
        syscalls.unshare(syscalls.CLONE_NEWNS)
        syscalls.mount("none", "/", syscalls.MS_REC | syscalls.MS_PRIVATE)
        return fn()

    return call_as_root_inside(inside)
