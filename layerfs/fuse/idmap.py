"""Owners as the mount shows them: fuse-overlayfs's `uidmapping=`/`gidmapping=` and squash
options, which a rootless user needs where the ids on disk are not the ids its processes see.

A mapping `ON_DISK:SHOWN:COUNT[:ON_DISK2:SHOWN2:COUNT2...]` shows id ON_DISK+k as SHOWN+k
(k < COUNT), and an id the kernel sends (a caller making a file, a chown) is put on disk the
other way round; an id outside every range is shown, or stored, as the overflow id 65534, as
fuse-overlayfs does. `squash_to_uid=`, `squash_to_gid=` and `squash_to_root` show every object
as owned by one id (what is stored does not change); squash_to_uid/gid win over squash_to_root.
"""

from __future__ import annotations

from dataclasses import dataclass

OVERFLOW_ID = 65534
_MAX_ID = (1 << 32) - 1


def parse_ranges(text: str) -> tuple[tuple[int, int, int], ...]:
    """`ON_DISK:SHOWN:COUNT` triples, colon-separated (ValueError naming what is wrong)."""
    try:
        numbers = [int(part) for part in text.split(":")]
    except ValueError:
        raise ValueError(f"{text}: not a list of numbers ON_DISK:SHOWN:COUNT") from None
    if not numbers or len(numbers) % 3:
        raise ValueError(f"{text}: needs triples ON_DISK:SHOWN:COUNT")
    ranges = tuple((numbers[i], numbers[i + 1], numbers[i + 2]) for i in range(0, len(numbers), 3))
    for disk, shown, count in ranges:
        if count <= 0 or min(disk, shown) < 0 or max(disk, shown) + count - 1 > _MAX_ID:
            raise ValueError(f"{text}: {disk}:{shown}:{count} is no range of ids")
    return ranges


def _through(ranges: tuple[tuple[int, int, int], ...], ident: int, *, out: bool) -> int:
    for disk, shown, count in ranges:
        source, target = (disk, shown) if out else (shown, disk)
        if source <= ident < source + count:
            return target + ident - source
    return OVERFLOW_ID


@dataclass(frozen=True, slots=True)
class IdMap:
    uids: tuple[tuple[int, int, int], ...] = ()
    gids: tuple[tuple[int, int, int], ...] = ()
    squash_uid: int | None = None
    squash_gid: int | None = None

    @property
    def is_identity(self) -> bool:
        return not (self.uids or self.gids) and self.squash_uid is None and self.squash_gid is None

    def shown(self, uid: int, gid: int) -> tuple[int, int]:
        if self.squash_uid is not None:
            uid = self.squash_uid
        elif self.uids:
            uid = _through(self.uids, uid, out=True)
        if self.squash_gid is not None:
            gid = self.squash_gid
        elif self.gids:
            gid = _through(self.gids, gid, out=True)
        return uid, gid

    def on_disk_uid(self, uid: int) -> int:
        return _through(self.uids, uid, out=False) if self.uids else uid

    def on_disk_gid(self, gid: int) -> int:
        return _through(self.gids, gid, out=False) if self.gids else gid


IDENTITY = IdMap()


def from_options(*, uidmapping: str | None, gidmapping: str | None, squash_to_root: bool,
                 squash_to_uid: str | None, squash_to_gid: str | None) -> IdMap:
    """The map the mount options ask for (ValueError naming a malformed one)."""
    def one_id(name: str, text: str | None) -> int | None:
        if text is None:
            return None
        if not text.isdigit() or int(text) > _MAX_ID:
            raise ValueError(f"{name}={text}: not a user or group id")
        return int(text)

    squash_uid = one_id("squash_to_uid", squash_to_uid)
    squash_gid = one_id("squash_to_gid", squash_to_gid)
    if squash_to_root:
        squash_uid = 0 if squash_uid is None else squash_uid
        squash_gid = 0 if squash_gid is None else squash_gid
    return IdMap(
        uids=parse_ranges(uidmapping) if uidmapping else (),
        gids=parse_ranges(gidmapping) if gidmapping else (),
        squash_uid=squash_uid, squash_gid=squash_gid,
    )
