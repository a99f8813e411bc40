"""A rootless user's ids: the user's own and its subordinate ranges (/etc/subuid, /etc/subgid,
which `newuidmap`/`newgidmap` of the `uidmap` package honour), as podman uses them.

Image id 0 is the user, image ids 1..N are the first subordinate range: a rootless mount
shows the image's owners that way (so the user owns, outside, what root owns inside), and
`run` puts its process in a user namespace with the same map, where the image's owners are
themselves again. Without a range only root maps; other owners show as the overflow id.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass

from layerfs.errors import LayerfsError
from layerfs.fuse.idmap import IdMap

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
