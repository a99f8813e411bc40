"""The image-side workloads, each as trials: one system's way of doing the same job.

A trial gets a fresh scratch dir under the run dir and an ExitStack; every mount registers its
unmount (and the stop of the FUSE daemon it started, `systems._unmount_fuse`) on an ExitStack
before its mount command runs. A trial returns `(workload, system, seconds)` rows.

Conditions: the input a step reads (the tarball, the OCI layout's blobs, the registry's storage)
is read into the page cache right before it, so that the disk is not what is measured (a DAMON
scheme evicts page cache idle for about a minute here); dirty pages are flushed (`sync`) before
each clock starts and the clock stops when the command returns, without a trailing sync: a tool
that fsyncs (layerfs does, for every blob and layer) pays for it, as its users do.
"""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import mounts
from benchmarks.images_inputs import IMAGE, TAG, Inputs
from benchmarks.images_report import IMPORTS, parse_importtime
from benchmarks.procs import CommandError, run, sync, timed, timed_shell, wait_for_forkserver
from benchmarks.systems import MOUNT_DEADLINE, _unmount_fuse

if TYPE_CHECKING:
    from collections.abc import Callable

    from benchmarks.images_dpkg import Debs

Row = tuple[str, str, float]  # workload, system, seconds

BREAKDOWN_SAMPLES = 5


@dataclass(slots=True)
class Context:
    """What every trial may use; `store()` makes each run's shared store on first use."""

    layerfs: Path  # the `layerfs` command
    overlay_program: Path  # `layerfs-overlay`
    python: Path  # the interpreter layerfs runs on (for the mount breakdown)
    inputs: Inputs
    run_dir: Path
    mount_samples: int
    registry_ref: str = ""
    debs: Debs | None = None  # the dpkg workload's .debs, when that group runs
    mount_lines: dict[str, str] = field(default_factory=dict)
    import_samples: list[dict[str, float]] = field(default_factory=list)
    _stores: dict[int, tuple[Path, Path]] = field(default_factory=dict)

    def cli(self, store: Path, *args: str) -> list[str]:
        return [str(self.layerfs), "--root", str(store), *args]

    def store(self, run_index: int) -> tuple[Path, Path]:
        """This run's store with IMAGE imported (untimed), and the image's one layer dir.

        Shared by the mount and commit workloads of one run; a new run gets a new store, so
        that nothing a run committed is already in the store the next run commits to.
        """
        if run_index not in self._stores:
            store = self.run_dir / f"store-{run_index}"
            run(self.cli(store, "import", str(self.inputs.tarball), IMAGE))
            layer_dirs = list((store / "layers").glob("*/diff"))
            if len(layer_dirs) != 1:
                raise CommandError(f"{store}: expected one layer after import, not "
                                   f"{len(layer_dirs)}")
            self._stores[run_index] = (store, layer_dirs[0])
        return self._stores[run_index]


@dataclass(frozen=True, slots=True)
class Trial:
    name: str  # unique in its group, used in scratch dir names
    run: Callable[[Context, ExitStack, Path, int], list[Row]]
    # The systems (`--skip` names) it uses: skipping one of them leaves the trial out.
    needs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Group:
    key: str
    trials: tuple[Trial, ...]


def warm(path: Path) -> None:
    """Read a file, or every file under a dir, into the page cache (no mount is ever read)."""
    if path.is_dir():
        run(["find", str(path), "-xdev", "-type", "f", "-exec", "cat", "{}", "+"])
    else:
        run(["cat", str(path)])


def _timed_after_sync(argv: list[str]) -> float:
    sync()
    return timed(argv)


# --- import and load: a tarball or an OCI layout into an unpacked root --------------------------

def _layerfs_import(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    warm(ctx.inputs.tarball)
    argv = ctx.cli(scratch / "store", "import", str(ctx.inputs.tarball), IMAGE)
    return [("import", "layerfs", _timed_after_sync(argv))]


def _layerfs_import_plain(
    ctx: Context, stack: ExitStack, scratch: Path, run_index: int
) -> list[Row]:
    warm(ctx.inputs.tarball)
    argv = ctx.cli(scratch / "store", "import", "--compression", "none", str(ctx.inputs.tarball),
                   IMAGE)
    return [("import_none", "layerfs", _timed_after_sync(argv))]


def _layerfs_load(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    warm(ctx.inputs.layout)
    argv = ctx.cli(scratch / "store", "load", "-i", str(ctx.inputs.layout), "--repository",
                   IMAGE.split(":")[0])
    return [("load", "layerfs", _timed_after_sync(argv))]


def _umoci_unpack(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    warm(ctx.inputs.layout)
    argv = ["umoci", "unpack", "--image", ctx.inputs.image, str(scratch / "bundle")]
    return [("unpack", "umoci", _timed_after_sync(argv))]


def _tar_extract(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    warm(ctx.inputs.tarball)
    root = scratch / "root"
    root.mkdir()
    argv = ["tar", "-C", str(root), "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
            str(ctx.inputs.tarball)]
    return [("extract", "tar", _timed_after_sync(argv))]


# --- mount: command start to a mount that answers a stat ----------------------------------------

def _mount_samples(
    ctx: Context, scratch: Path, system: str,
    mount: Callable[[ExitStack, Path, int], list[str]],
) -> list[Row]:
    """One untimed warm-up, then `mount_samples` timed mounts, each unmounted before the next.

    `mount(stack, dir, i)` prepares a fresh mount in `dir`, registers its unmount on `stack`
    and returns the mount command; the clock runs from that command's start to the end of
    `stat MNT/etc/os-release`.
    """
    rows = []
    for index in range(ctx.mount_samples + 1):
        with ExitStack() as stack:
            sample = scratch / f"{index}"
            sample.mkdir()
            argv = mount(stack, sample, index)
            mountpoint = Path(argv[-1])
            sync()
            start = time.perf_counter()
            run(argv, timeout=MOUNT_DEADLINE)
            run(["stat", str(mountpoint / "etc/os-release")], timeout=MOUNT_DEADLINE)
            seconds = time.perf_counter() - start
            entry = mounts.entry_at(mountpoint)
            ctx.mount_lines[system] = entry.describe() if entry else "not in the mount table"
        if index > 0:
            rows.append(("mount", system, seconds))
    return rows


def _mount_layerfs(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    """Through the fork server: the warm-up mount starts it if it is not up yet."""
    store, _ = ctx.store(run_index)

    def mount(inner: ExitStack, sample: Path, index: int) -> list[str]:
        mountpoint = sample / "mnt"
        mountpoint.mkdir()
        inner.callback(_unmount_fuse, mountpoint)
        if index == 1:
            wait_for_forkserver(ctx.run_dir / "runtime")
        return ctx.cli(store, "mount", "--name", f"m{run_index}-{index}", IMAGE, str(mountpoint))

    return _mount_samples(ctx, scratch, "layerfs", mount)


def _mount_layerfs_alone(ctx: Context, stack: ExitStack, scratch: Path,
                         run_index: int) -> list[Row]:
    """Without the fork server (`LAYERFS_FORKSERVER=0`, through `env`: about 1 ms more): what
    a first mount costs, and every mount where no server may run."""
    store, _ = ctx.store(run_index)

    def mount(inner: ExitStack, sample: Path, index: int) -> list[str]:
        mountpoint = sample / "mnt"
        mountpoint.mkdir()
        inner.callback(_unmount_fuse, mountpoint)
        return ["env", "LAYERFS_FORKSERVER=0",
                *ctx.cli(store, "mount", "--name", f"a{run_index}-{index}", IMAGE,
                         str(mountpoint))]

    return _mount_samples(ctx, scratch, "layerfs, no fork server", mount)


def overlay_mount_command(
    program: str, stack: ExitStack, sample: Path, lower: Path, kernel: bool
) -> list[str]:
    upper, work, mountpoint = sample / "upper", sample / "work", sample / "mnt"
    for directory in (upper, work, mountpoint):
        directory.mkdir()
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    if kernel:
        stack.callback(mounts.unmount, mountpoint, ["umount"], ["umount", "-l"])
        return ["mount", "-t", "overlay", "overlay", "-o", options, str(mountpoint)]
    stack.callback(_unmount_fuse, mountpoint)
    return [program, "-o", options, str(mountpoint)]


def _dir_mount_trial(system: str, kernel: bool = False) -> Trial:
    def trial(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
        _, lower = ctx.store(run_index)
        program = str(ctx.overlay_program) if system == "layerfs-overlay" else system
        return _mount_samples(
            ctx, scratch, system,
            lambda inner, sample, index: overlay_mount_command(program, inner, sample, lower,
                                                               kernel),
        )

    # The lower is the layer dir `layerfs import` made: every mount trial needs layerfs.
    needs = ("layerfs",) if system == "layerfs-overlay" else ("layerfs", system)
    return Trial(system, trial, needs=needs)


def _python_breakdown(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    """Interpreter start-up, the mount command's imports (wall), and importtime by package."""
    rows: list[Row] = []
    for _ in range(BREAKDOWN_SAMPLES):
        rows.append(("py_start", "python", timed([str(ctx.python), "-c", "pass"])))
        rows.append(("cli_imports", "python", timed([str(ctx.python), "-c", IMPORTS])))
        # The same without the interpreter's shutdown (module teardown, GC), which a daemonizing
        # command pays too after its work is done.
        rows.append(("cli_imports_exit", "python",
                     timed([str(ctx.python), "-c", f"{IMPORTS}, os; os._exit(0)"])))
        output = run(["bash", "-c", '"$0" -X importtime -c "$1" 2>&1 >/dev/null',
                      str(ctx.python), IMPORTS], capture=True)
        ctx.import_samples.append(parse_importtime(output))
    return rows


# --- commit: 10,000 changed files, and one ------------------------------------------------------

def _commit_layerfs(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    store, _ = ctx.store(run_index)
    rows: list[Row] = []
    for workload, listing in (("commit_many", ctx.inputs.changes),
                              ("commit_one", ctx.inputs.one_change)):
        name = f"{workload}-{run_index}"
        mountpoint = scratch / name
        mountpoint.mkdir()
        with ExitStack() as inner:
            inner.callback(_unmount_fuse, mountpoint)
            output = run(ctx.cli(store, "mount", "--name", name, IMAGE, str(mountpoint)),
                         capture=True, timeout=MOUNT_DEADLINE)
            container_id = output.split()[-1]
            change = _apply_change(mountpoint, listing)
            run(ctx.cli(store, "umount", str(mountpoint)), timeout=MOUNT_DEADLINE)
        upper = store / "containers" / container_id / "upper"
        if not upper.is_dir():
            raise CommandError(f"{upper}: no upper dir for container {name}")
        rows.append((workload, "layerfs", _timed_after_sync(
            ctx.cli(store, "commit", name, f"bench:{name}"))))
        sync()
        floor = timed_shell('tar -C "$1" -cf - . | gzip -1 > "$2"', str(upper),
                            str(scratch / f"{name}.tar.gz"))
        rows.append((workload, "tar|gzip", floor))
        if workload == "commit_many":
            rows.append(("change_many", "layerfs", change))
    return rows


def _commit_umoci(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    layout = scratch / "oci"
    run(["cp", "-a", str(ctx.inputs.layout), str(layout)])  # repack adds blobs: use a copy
    rows: list[Row] = []
    for workload, listing in (("commit_many", ctx.inputs.changes),
                              ("commit_one", ctx.inputs.one_change)):
        bundle = scratch / f"bundle-{workload}"
        run(["umoci", "unpack", "--image", f"{layout}:{TAG}", str(bundle)])
        change = _apply_change(bundle / "rootfs", listing)
        rows.append((workload, "umoci", _timed_after_sync(
            ["umoci", "repack", "--image", f"{layout}:{workload}", str(bundle)])))
        if workload == "commit_many":
            rows.append(("change_many", "plain dir", change))
    return rows


def _apply_change(root: Path, listing: Path) -> float:
    output = run([sys.executable, "-m", "benchmarks.images_ops", str(root), str(listing)],
                 capture=True)
    return float(output.strip().splitlines()[-1])


# --- pull: download, verify and unpack from a loopback registry ---------------------------------

def _registry_storage(ctx: Context) -> Path:
    return ctx.run_dir / "registry" / "storage"


def _pull_layerfs(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    warm(_registry_storage(ctx))
    argv = ctx.cli(scratch / "store", "pull", ctx.registry_ref)
    return [("pull", "layerfs", _timed_after_sync(argv))]


def _pull_peer(ctx: Context, stack: ExitStack, scratch: Path, run_index: int) -> list[Row]:
    warm(_registry_storage(ctx))
    copy = _timed_after_sync(["skopeo", "copy", "--src-tls-verify=false",
                              f"docker://{ctx.registry_ref}", f"oci:{scratch / 'oci'}:1"])
    unpack = _timed_after_sync(["umoci", "unpack", "--image", f"{scratch / 'oci'}:1",
                                str(scratch / "bundle")])
    return [("pull", "skopeo+umoci", copy + unpack), ("pull_copy", "skopeo", copy),
            ("pull_unpack", "umoci", unpack)]


# `needs`: the OCI layout that `layerfs load` reads and the registry serves is made by umoci,
# and the image is pushed to the registry with skopeo.
GROUPS: tuple[Group, ...] = (
    Group("import", (
        Trial("layerfs-import", _layerfs_import, needs=("layerfs",)),
        Trial("umoci-unpack", _umoci_unpack, needs=("umoci",)),
        Trial("tar-extract", _tar_extract, needs=("plain",)),
        Trial("layerfs-load", _layerfs_load, needs=("layerfs", "umoci")),
        Trial("layerfs-import-none", _layerfs_import_plain, needs=("layerfs",)),
    )),
    Group("mount", (
        Trial("layerfs", _mount_layerfs, needs=("layerfs",)),
        Trial("layerfs-alone", _mount_layerfs_alone, needs=("layerfs",)),
        _dir_mount_trial("layerfs-overlay"),
        _dir_mount_trial("fuse-overlayfs"),
        _dir_mount_trial("kernel", kernel=True),
        Trial("python", _python_breakdown, needs=("layerfs",)),
    )),
    Group("commit", (
        Trial("layerfs", _commit_layerfs, needs=("layerfs",)),
        Trial("umoci", _commit_umoci, needs=("umoci",)),
    )),
    Group("pull", (
        Trial("layerfs", _pull_layerfs, needs=("layerfs", "skopeo", "umoci")),
        Trial("skopeo-umoci", _pull_peer, needs=("skopeo", "umoci")),
    )),
)
