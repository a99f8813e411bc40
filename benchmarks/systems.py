"""The systems compared: layerfs-overlay, fuse-overlayfs, the kernel's overlayfs, a plain directory.

A system turns the shared layers into a root to run a workload on. The overlays mount the lowers
with a fresh upper and work dir under the caller's scratch dir; every mount registers its unmount
(and the stop of the daemon it started) on the caller's ExitStack before the mount command even
runs, so a failure anywhere, including a mount command that mounts and then fails, leaves nothing
mounted. The plain directory is the floor: reads use the cached merged copy; a workload that
changes files gets a fresh copy of just the paths it changes, made before the clock starts.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from benchmarks import mounts
from benchmarks.procs import REPO_ROOT, CommandError, run

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import ExitStack

    from benchmarks.layers import Layers

MOUNT_DEADLINE = 60.0  # seconds for a mount command to return and its mount to appear

DEFAULT_LAYERFS = REPO_ROOT / ".venv" / "bin" / "layerfs-overlay"
NO_FSYNC = "layerfs-fsync=0"
FSYNC_ROWS = ("copy_up*", "sqlite")
"""The groups where layerfs fsyncs copied-up data (so `fsync=0` differs from the default)."""
PASSTHROUGH_ALL = "layerfs-passthrough=all"
READ_ROWS = ("read_*", "python", "git_status")
"""The groups that read lower files of the read-write mount, which `passthrough=all` hands to
the kernel."""


@dataclass(frozen=True, slots=True)
class Root:
    path: Path
    mount_seconds: float | None  # how long the mount command took; None for the plain dir
    upper: Path | None = None  # where an overlay stores what changes; None for the plain dir
    daemon: mounts.Daemon | None = None  # a FUSE overlay's daemon, whose CPU time is recorded


class System(Protocol):
    name: str
    only: tuple[str, ...]  # shell patterns of the group keys it runs; empty: every group

    def missing(self) -> str | None:
        """Why this system cannot run here (with the fix), or None."""

    def mount(
        self, stack: ExitStack, layers: Layers, scratch: Path, changes: Sequence[str] | None
    ) -> Root:
        """A root showing the merged layers; `changes` lists the paths a workload will change."""

    def warm(self, layers: Layers, paths: Sequence[str]) -> None:
        """Bring `paths` of the lowers into the page cache, without going through the mount."""

    def facts(self) -> dict[str, object]:
        """Version, binary and mount options, for the results file."""


@dataclass(slots=True)
class _Overlay:
    """What the three overlays share: fresh upper/work dirs, warming the lowers, mount options."""

    name: str
    only: tuple[str, ...] = ()
    mount_line: str = field(default="", init=False)

    def warm(self, layers: Layers, paths: Sequence[str]) -> None:
        for lower in layers.lowers:
            for path in paths:
                _warm(lower / path)

    def _prepare(self, layers: Layers, scratch: Path) -> tuple[Path, str]:
        upper, work, mountpoint = scratch / "upper", scratch / "work", scratch / "mnt"
        for directory in (upper, work, mountpoint):
            directory.mkdir()
        options = f"lowerdir={layers.lowerdir_option()},upperdir={upper},workdir={work}"
        return mountpoint, options

    def _record(self, mountpoint: Path, seconds: float) -> Root:
        entry = mounts.wait_until_mounted(mountpoint, MOUNT_DEADLINE)
        self.mount_line = entry.describe()
        daemons = mounts.daemons_serving(mountpoint) if entry.fs_type.startswith("fuse") else []
        return Root(mountpoint, seconds, upper=mountpoint.parent / "upper",
                    daemon=daemons[0] if len(daemons) == 1 else None)


@dataclass(slots=True)
class KernelOverlay(_Overlay):
    name: str = "kernel"

    def missing(self) -> str | None:
        if "\toverlay\n" not in Path("/proc/filesystems").read_text():
            return "kernel: overlayfs is not available (modprobe overlay), or pass --skip kernel"
        return None

    def mount(
        self, stack: ExitStack, layers: Layers, scratch: Path, changes: Sequence[str] | None
    ) -> Root:
        mountpoint, options = self._prepare(layers, scratch)
        stack.callback(mounts.unmount, mountpoint, ["umount"], ["umount", "-l"])
        start = time.perf_counter()
        run(["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)])
        return self._record(mountpoint, time.perf_counter() - start)

    def facts(self) -> dict[str, object]:
        parameters = Path("/sys/module/overlay/parameters")
        return {
            "module_parameters": {
                path.name: path.read_text().strip() for path in sorted(parameters.iterdir())
            }
            if parameters.is_dir()
            else {},
            "mount": self.mount_line,
        }


@dataclass(slots=True)
class FuseOverlay(_Overlay):
    """A fuse-overlayfs-compatible program: `PROGRAM -o lowerdir=..,upperdir=..,workdir=.. MNT`,
    returning once mounted, leaving a daemon that exits when `fusermount3 -u MNT` unmounts it."""

    program: str = ""
    skip_hint: str = ""
    extra_options: str = ""  # appended to the -o options

    def missing(self) -> str | None:
        if shutil.which("fusermount3") is None:
            return f"{self.name}: fusermount3 not found (install fuse3), or pass --skip {self.name}"
        if shutil.which(self.program) is None:
            return f"{self.name}: {self.program} not found or not executable; {self.skip_hint}"
        return None

    def mount(
        self, stack: ExitStack, layers: Layers, scratch: Path, changes: Sequence[str] | None
    ) -> Root:
        mountpoint, options = self._prepare(layers, scratch)
        if self.extra_options:
            options = f"{options},{self.extra_options}"
        stack.callback(_unmount_fuse, mountpoint)
        start = time.perf_counter()
        run([self.program, "-o", options, str(mountpoint)], timeout=MOUNT_DEADLINE)
        return self._record(mountpoint, time.perf_counter() - start)

    def facts(self) -> dict[str, object]:
        return {
            "program": shutil.which(self.program),
            "version": _version_of(self.program),
            "mount": self.mount_line,
        }


@dataclass(slots=True)
class PlainDir:
    name: str = "plain"
    only: tuple[str, ...] = ()

    def missing(self) -> str | None:
        return None

    def mount(
        self, stack: ExitStack, layers: Layers, scratch: Path, changes: Sequence[str] | None
    ) -> Root:
        if changes is None:
            return Root(layers.plain, None)
        # The floor for a change is the same change to a plain file: give this run its own copy.
        root = scratch / "root"
        root.mkdir()
        for path in changes:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            run(["cp", "-a", str(layers.plain / path), str(root / path)])
        return Root(root, None)

    def warm(self, layers: Layers, paths: Sequence[str]) -> None:
        pass  # the fresh copy made by mount() is already in the page cache

    def facts(self) -> dict[str, object]:
        return {"path": "plain copy of the merged tree on the cache dir's filesystem"}


def all_systems(layerfs_program: Path) -> list[System]:
    """In table order: ours first, then its peers, then the floor.

    `layerfs-fsync=0` is layerfs without the fsync of copied-up data, on the rows that copy up
    file data (the copy-ups, SQLite's first write to its database): fuse-overlayfs does not sync
    a copy before renaming it into place, the kernel and layerfs by default do, so this is the
    comparison with fuse-overlayfs at equal durability, in the same run. Elsewhere the option
    changes nothing, and layerfs itself is that comparison.

    `layerfs-passthrough=all` passes the lower files of the read-write mount through to the
    kernel as well (a reader opened before a copy-up then stays on the lower file, and writers
    are refused until it closes it), on the rows that read them.
    """
    hint = "build it (pip install -e .), pass --layerfs PATH, or pass --skip {}"
    return [
        FuseOverlay(name="layerfs", program=str(layerfs_program),
                    skip_hint=hint.format("layerfs")),
        FuseOverlay(name=NO_FSYNC, program=str(layerfs_program),
                    skip_hint=hint.format(NO_FSYNC), extra_options="fsync=0",
                    only=FSYNC_ROWS),
        FuseOverlay(name=PASSTHROUGH_ALL, program=str(layerfs_program),
                    skip_hint=hint.format(PASSTHROUGH_ALL), extra_options="passthrough=all",
                    only=READ_ROWS),
        FuseOverlay(
            name="fuse-overlayfs",
            program="fuse-overlayfs",
            skip_hint="install fuse-overlayfs, or pass --skip fuse-overlayfs",
        ),
        KernelOverlay(),
        PlainDir(),
    ]


def _unmount_fuse(mountpoint: Path) -> None:
    # Find the daemon before unmounting: afterwards it exits and there is nothing left to check.
    daemons = mounts.daemons_serving(mountpoint)
    mounts.unmount(mountpoint, ["fusermount3", "-u"], ["fusermount3", "-u", "-z"])
    for daemon in daemons:
        mounts.stop_daemon(daemon)


def _warm(path: Path) -> None:
    if path.is_symlink() or not path.exists():
        return
    if path.is_dir():
        run(["du", "-s", str(path)])  # du stats every entry: dentries and inodes
    else:
        run(["cat", str(path)])  # stdout goes to /dev/null


def _version_of(program: str) -> str:
    try:
        output = run([program, "--version"], capture=True, timeout=30)
    except (CommandError, OSError):
        return "unknown (no --version; see machine.layerfs_git for ours)"
    # fuse-overlayfs prints its own version and those of libfuse and fusermount3: keep them all.
    return "; ".join(line.strip() for line in output.splitlines() if line.strip()) or "unknown"

