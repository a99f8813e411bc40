"""Containers: an image plus its own copy-on-write layer, mounted through the FUSE driver.

A container is `containers/ID/` in the store: `upper/` and `work/` (the overlay's, on the
store's filesystem) and `state.json` (id, name, image, created, last mountpoint and daemon
pid). Many containers may use one image at once; each has its own upper. Names and ids are
made as docker makes them. Creating and removing happen under the store lock, so two
processes never take one name.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from layerfs.errors import MountError, NotFoundError, StoreError, UsageError
from layerfs.fuse.idmap import IDENTITY
from layerfs.fuse.mount import (
    FREEZE_SIGNAL,
    THAW_SIGNAL,
    OverlaySpec,
    default_fuse_options,
    frozen_marker,
    mount_overlay,
)
from layerfs.overlay.changes import Change, walk_changes
from layerfs.services import userns
from layerfs.store import atomic
from layerfs.store.lock import locked
from layerfs.store.store import now

if TYPE_CHECKING:
    from collections.abc import Iterator

    from layerfs.store.store import Image, Store

_LEFT = ("admiring", "brave", "clever", "dazzling", "eager", "focused", "gallant", "happy",
         "jolly", "keen", "lucid", "modest", "nifty", "quirky", "serene", "trusting", "vibrant",
         "wizardly", "zealous", "bold")
_RIGHT = ("babbage", "curie", "dijkstra", "einstein", "feynman", "hopper", "kernighan",
          "lovelace", "mccarthy", "noether", "pike", "ritchie", "shannon", "thompson", "torvalds",
          "turing", "wozniak", "yalow", "zuse", "hamilton")


@dataclass
class Container:
    id: str
    name: str
    image: str
    image_ref: str
    created: str
    mountpoint: str | None = None
    pid: int | None = None

    @property
    def short_id(self) -> str:
        return self.id[:12]


def _state_path(store: Store, container_id: str) -> Path:
    return store.layout.container(container_id) / "state.json"


def _save(store: Store, container: Container) -> None:
    atomic.write_file(_state_path(store, container.id), json.dumps(asdict(container)).encode())


def _load(path: Path) -> Container | None:
    try:
        return Container(**json.loads(path.read_bytes()))
    except (OSError, ValueError, TypeError):
        return None


def list_containers(store: Store) -> list[Container]:
    out = []
    for entry in sorted(store.layout.containers.iterdir()):
        container = _load(entry / "state.json")
        if container is not None:
            out.append(container)
    return sorted(out, key=lambda c: c.created, reverse=True)


def find(store: Store, text: str) -> Container:
    """A container by name, id or id prefix, or by the mountpoint it is mounted on."""
    containers = list_containers(store)
    matches = [] if "/" in text else [c for c in containers
                                      if c.name == text or c.id.startswith(text)]
    if not matches and os.path.isdir(text):
        real = os.path.realpath(text)
        mounted = [c for c in containers if c.mountpoint == real and is_mounted(c)]
        if mounted:
            return mounted[0]
        raise NotFoundError(f"{text}: no container is mounted there")
    if not matches:
        raise NotFoundError(f"{text}: no such container")
    exact = [c for c in matches if c.name == text or c.id == text]
    if len(matches) > 1 and len(exact) != 1:
        raise UsageError(f"{text}: ambiguous, matches {len(matches)} containers")
    return exact[0] if exact else matches[0]


def create(store: Store, image: Image, image_ref: str, name: str | None = None) -> Container:
    if name is not None and not _valid_name(name):
        raise UsageError(f"{name}: invalid container name (letters, digits, _ . - only)")
    with locked(store.layout.lock):
        taken = {c.name for c in list_containers(store)}
        if name is not None and name in taken:
            raise UsageError(f"{name}: container name already in use")
        while name is None or name in taken:
            name = f"{secrets.choice(_LEFT)}_{secrets.choice(_RIGHT)}"
            if name in taken:
                name += f"_{secrets.randbelow(100)}"
        container = Container(secrets.token_hex(32), name, image.id, image_ref, now())
        with atomic.staging_dir(store.layout.tmp) as stage:
            _make_upper(stage / "upper", store.lower_dirs(image)[0])
            (stage / "work").mkdir()
            (stage / "state.json").write_text(json.dumps(asdict(container)))
            os.rename(stage, store.layout.container(container.id))
    return container


def _make_upper(upper: Path, top_lower: Path) -> None:
    """The upper dir's own mode and owner are those of the container's root directory: take
    the image's (docker's overlay2 does too), not whatever the caller's umask leaves."""
    st = os.stat(top_lower)
    upper.mkdir()
    if os.geteuid() == 0:
        os.chown(upper, st.st_uid, st.st_gid)
    os.chmod(upper, st.st_mode & 0o7777)


def _valid_name(name: str) -> bool:
    return bool(name) and name[0].isalnum() and all(c.isalnum() or c in "_.-" for c in name)


def check_mountpoint(mountpoint: str) -> None:
    """MountError unless `mountpoint` is an empty directory that nothing is mounted on."""
    real = os.path.realpath(mountpoint)
    if not os.path.exists(real):
        raise MountError(f"{mountpoint}: mountpoint does not exist")
    if not os.path.isdir(real):
        raise MountError(f"{mountpoint}: mountpoint is not a directory")
    if os.path.ismount(real):
        raise MountError(f"{mountpoint}: mountpoint is in use")
    if os.listdir(real):
        raise MountError(f"{mountpoint}: not an empty directory")


def upper_dir(store: Store, container: Container) -> Path:
    return store.layout.container(container.id) / "upper"


def is_mounted(container: Container) -> bool:
    if container.mountpoint is None:
        return False
    target = container.mountpoint
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == target and fields[0] == f"layerfs:{container.id[:12]}":
                return True
    return False


def mount(store: Store, container: Container, image: Image, mountpoint: str, *,
          foreground: bool = False) -> Container:
    """Mount the container at `mountpoint`; returns once the mount answers."""
    if is_mounted(container):
        raise MountError(f"{container.name}: already mounted on {container.mountpoint}")
    check_mountpoint(mountpoint)
    real = os.path.realpath(mountpoint)
    base = store.layout.container(container.id)
    spec = OverlaySpec(
        lowers=tuple(str(p) for p in store.lower_dirs(image)),
        upper=str(base / "upper"),
        work=str(base / "work"),
        mountpoint=real,
        fsname=f"layerfs:{container.id[:12]}",
        fuse_options=frozenset(default_fuse_options()),
        log_file=str(base / "daemon.log"),
        # rootless: the image's owners as the ids that stand for them outside (userns.py)
        ids=IDENTITY if os.geteuid() == 0 else userns.ranges_of_this_user().mount_map(),
    )
    container.mountpoint = real
    if foreground:
        container.pid = os.getpid()
        _save(store, container)
        mount_overlay(spec, foreground=True)
        return container
    container.pid = mount_overlay(spec)
    _save(store, container)
    return container


def umount(store: Store, container: Container) -> None:
    """Unmount and wait for the daemon to finish (MountError if busy)."""
    if not is_mounted(container):
        raise MountError(f"{container.name}: not mounted")
    assert container.mountpoint is not None
    import subprocess  # here: `layerfs mount` should not pay for it

    result = subprocess.run(["fusermount3", "-u", container.mountpoint],
                            capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
        raise MountError(f"{container.mountpoint}: cannot unmount: {reason}")
    _wait_for_exit(container.pid)
    container.pid = None
    _save(store, container)


def _wait_for_exit(pid: int | None, timeout: float = 10.0) -> None:
    if pid is None or pid == os.getpid():
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not _running(pid):
            return
        time.sleep(0.005)


def _running(pid: int) -> bool:
    """Alive and not a zombie: a daemon that exited waits as a zombie until init reaps it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


@contextlib.contextmanager
def frozen(store: Store, container: Container, timeout: float = 60.0) -> Iterator[None]:
    """The container's upper dir held still: a mounted container's daemon holds every change
    until the block ends (docker pauses a container to commit it). Unmounted: nothing to do."""
    if not is_mounted(container) or container.pid is None or container.mountpoint is None:
        yield
        return
    atomic.syncfs(Path(container.mountpoint))
    marker = Path(frozen_marker(str(store.layout.container(container.id) / "work")))
    os.kill(container.pid, FREEZE_SIGNAL)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            if not _running(container.pid):
                raise MountError(f"{container.name}: the mount daemon is gone")
            if time.monotonic() > deadline:
                raise MountError(f"{container.name}: the mount did not hold still in "
                                 f"{timeout:.0f} s")
            time.sleep(0.002)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(container.pid, THAW_SIGNAL)


def remove(store: Store, container: Container, *, force: bool = False) -> None:
    if is_mounted(container):
        if not force:
            raise StoreError(f"{container.name}: container is mounted (umount it, or use -f)")
        umount(store, container)
    with locked(store.layout.lock):
        path = store.layout.container(container.id)
        if path.exists():
            atomic.remove_tree(path)


def size_of_upper(store: Store, container: Container) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(upper_dir(store, container)):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def changes(store: Store, container: Container) -> list[Change]:
    """What the container changed against its image (`docker diff`)."""
    image = store.image(container.image)  # type: ignore[arg-type]
    lowers = [os.fsencode(p) for p in store.lower_dirs(image)]
    return list(walk_changes(lowers, os.fsencode(upper_dir(store, container))))
