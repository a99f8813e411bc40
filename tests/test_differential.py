"""Differential tests: the FUSE overlay under test against the kernel's overlayfs.

Each example copies the same three lower layers twice, mounts the kernel's overlayfs on one copy
and the FUSE overlay (`LAYERFS_OVERLAY_CMD`, see `overlay_harness.overlay_cmd`) on the other,
applies one sequence of operations to both through the same relative paths, and requires the same
outcome (value or errno) at every step and the same tree at the end. Hypothesis generates the
sequences and shrinks a failure to a short one; the hand-written scenarios below pin the cases
that random sequences reach only rarely.

The kernel is the oracle, so everything here runs as root with overlayfs and /dev/fuse available.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests import fsmatrix
from tests import overlay_harness as harness

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from tests.fsmatrix import ScratchFilesystems

OP_TIMEOUT_S = 20.0  # far above any single operation; only a hung daemon reaches it

# --- operations ---------------------------------------------------------------------------
#
# An operation is a frozen dataclass of relative paths and arguments; `run` performs it under a
# mount root and returns a comparable value (None for most mutations), raising OSError on failure.


class Op:
    octal_fields: ClassVar[tuple[str, ...]] = ("mode",)

    def run(self, root: str) -> object:
        raise NotImplementedError

    def __repr__(self) -> str:  # compact, and modes in octal, so failure reports read easily
        args = []
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            args.append(oct(value) if field.name in self.octal_fields else repr(value))
        return f"{type(self).__name__}({', '.join(args)})"


def _at(root: str, rel: str) -> str:
    return os.path.join(root, rel) if rel else root


class _DeviceNotOpened(Exception):
    """Opening a device node tests the mount's nodev flag (fuse-overlayfs mounts nodev, the
    kernel overlay does not), not overlay semantics: both sides report it without opening."""


def _open(path: str, flags: int, mode: int = 0o644) -> int:
    try:
        st_mode = os.stat(path).st_mode
    except OSError:
        st_mode = 0  # missing or unreachable: let open() report it
    if stat.S_ISCHR(st_mode) or stat.S_ISBLK(st_mode):
        raise _DeviceNotOpened
    # O_NONBLOCK: opening a fifo must not wait for a peer (a writer gets ENXIO instead).
    return os.open(path, flags | os.O_NONBLOCK, mode)


def _summary(data: bytes) -> object:
    return data if len(data) <= 48 else f"{len(data)} bytes, {data[:16]!r}…{data[-16:]!r}"


@dataclasses.dataclass(frozen=True, repr=False)
class Create(Op):
    path: str
    mode: int
    how: Literal["excl", "trunc", "plain"]

    def run(self, root: str) -> object:
        extra = {"excl": os.O_EXCL, "trunc": os.O_TRUNC, "plain": 0}[self.how]
        os.close(_open(_at(root, self.path), os.O_WRONLY | os.O_CREAT | extra, self.mode))
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class Write(Op):
    path: str
    offset: int
    data: bytes

    def run(self, root: str) -> object:
        fd = _open(_at(root, self.path), os.O_WRONLY)
        try:
            return os.pwrite(fd, self.data, self.offset)
        finally:
            os.close(fd)


@dataclasses.dataclass(frozen=True, repr=False)
class Read(Op):
    path: str

    def run(self, root: str) -> object:
        fd = _open(_at(root, self.path), os.O_RDONLY)
        try:  # not os.fdopen: it refuses a directory before read(2) answers, and leaks the fd
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return _summary(b"".join(chunks))
        finally:
            os.close(fd)


@dataclasses.dataclass(frozen=True, repr=False)
class Truncate(Op):
    path: str
    length: int

    def run(self, root: str) -> object:
        os.truncate(_at(root, self.path), self.length)
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class Fallocate(Op):
    """Reserve, or punch a hole, through a descriptor open for writing; the size it shows."""

    path: str
    mode: int
    offset: int
    length: int

    def run(self, root: str) -> object:
        fd = _open(_at(root, self.path), os.O_WRONLY)
        try:
            harness.fallocate(fd, self.mode, self.offset, self.length)
            return os.fstat(fd).st_size
        finally:
            os.close(fd)


@dataclasses.dataclass(frozen=True, repr=False)
class Chmod(Op):
    path: str
    mode: int

    def run(self, root: str) -> object:
        os.chmod(_at(root, self.path), self.mode)  # follows symlinks: Linux has no lchmod
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class Chown(Op):
    path: str
    uid: int
    gid: int

    def run(self, root: str) -> object:
        os.chown(_at(root, self.path), self.uid, self.gid, follow_symlinks=False)
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class Utimens(Op):
    path: str
    mtime_ns: int
    follow: bool

    def run(self, root: str) -> object:
        times = (self.mtime_ns - 10**9, self.mtime_ns)
        os.utime(_at(root, self.path), ns=times, follow_symlinks=self.follow)
        return None


RenameFlag = Literal["", "NOREPLACE", "EXCHANGE"]
_RENAME_FLAGS = {"": 0, "NOREPLACE": harness.RENAME_NOREPLACE, "EXCHANGE": harness.RENAME_EXCHANGE}


@dataclasses.dataclass(frozen=True, repr=False)
class Rename(Op):
    src: str
    dst: str
    flags: RenameFlag = ""

    def run(self, root: str) -> object:
        harness.renameat2(_at(root, self.src), _at(root, self.dst), _RENAME_FLAGS[self.flags])
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class Link(Op):
    src: str
    dst: str

    def run(self, root: str) -> object:
        os.link(_at(root, self.src), _at(root, self.dst), follow_symlinks=False)
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class Unlink(Op):
    path: str

    def run(self, root: str) -> object:
        os.unlink(_at(root, self.path))
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class Mkdir(Op):
    path: str
    mode: int = 0o755

    def run(self, root: str) -> object:
        os.mkdir(_at(root, self.path), self.mode)
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class Rmdir(Op):
    path: str

    def run(self, root: str) -> object:
        os.rmdir(_at(root, self.path))
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class Symlink(Op):
    target: str
    path: str

    def run(self, root: str) -> object:
        os.symlink(self.target, _at(root, self.path))
        return None


_MKNOD_KINDS = {
    "fifo": (stat.S_IFIFO | 0o644, 0),
    "chr": (stat.S_IFCHR | 0o644, os.makedev(1, 3)),
    # A 0/0 char device is the on-disk whiteout: the kernel refuses to create one (EPERM).
    "whiteout": (stat.S_IFCHR | 0o644, harness.WHITEOUT_DEV),
}


@dataclasses.dataclass(frozen=True, repr=False)
class Mknod(Op):
    path: str
    kind: Literal["fifo", "chr", "whiteout"]

    def run(self, root: str) -> object:
        mode, device = _MKNOD_KINDS[self.kind]
        os.mknod(_at(root, self.path), mode, device)
        return None


_XATTR_FLAGS = {"": 0, "CREATE": os.XATTR_CREATE, "REPLACE": os.XATTR_REPLACE}


@dataclasses.dataclass(frozen=True, repr=False)
class SetXattr(Op):
    path: str
    name: str
    value: bytes
    flags: Literal["", "CREATE", "REPLACE"] = ""

    def run(self, root: str) -> object:
        flags = _XATTR_FLAGS[self.flags]
        os.setxattr(_at(root, self.path), self.name, self.value, flags, follow_symlinks=False)
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class RemoveXattr(Op):
    path: str
    name: str

    def run(self, root: str) -> object:
        os.removexattr(_at(root, self.path), self.name, follow_symlinks=False)
        return None


@dataclasses.dataclass(frozen=True, repr=False)
class GetXattr(Op):
    path: str
    name: str

    def run(self, root: str) -> object:
        return os.getxattr(_at(root, self.path), self.name, follow_symlinks=False)


@dataclasses.dataclass(frozen=True, repr=False)
class ListXattr(Op):
    path: str

    def run(self, root: str) -> object:
        return harness.xattrs_of(_at(root, self.path))


@dataclasses.dataclass(frozen=True, repr=False)
class ListDir(Op):
    path: str

    def run(self, root: str) -> object:
        return sorted(os.listdir(_at(root, self.path)))


@dataclasses.dataclass(frozen=True, repr=False)
class Stat(Op):
    """lstat, reduced to what `overlay_harness.Entry` compares (no times: see its docstring)."""

    path: str

    def run(self, root: str) -> object:
        st_ = os.lstat(_at(root, self.path))
        kind = harness.kind_of(st_.st_mode)
        fields = [kind, oct(stat.S_IMODE(st_.st_mode)), st_.st_uid, st_.st_gid]
        if kind != "dir":
            mtime = harness.mtime_class(st_.st_mtime_ns)
            fields += [f"size={st_.st_size}", f"nlink={st_.st_nlink}", f"mtime={mtime}"]
        return tuple(fields)


@dataclasses.dataclass(frozen=True, repr=False)
class Mtime(Op):
    """The mtime class of any path, directories included: for the scenarios only, since a
    directory's time is not comparable in general (see `overlay_harness.Entry`)."""

    path: str

    def run(self, root: str) -> object:
        return harness.mtime_class(os.lstat(_at(root, self.path)).st_mtime_ns)


# --- running a sequence on both systems ----------------------------------------------------

Outcome = tuple[str, object]  # ("ok", value) or ("err", errno name)


def outcome(op: Op, root: str) -> Outcome:
    try:
        return ("ok", op.run(root))
    except _DeviceNotOpened:
        return ("ok", "device node, not opened")
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno or 0, str(exc.errno)))


@dataclasses.dataclass(frozen=True, slots=True)
class Step:
    op: Op
    kernel: Outcome
    fuse: Outcome


def format_steps(steps: Sequence[Step]) -> str:
    lines = []
    for number, step in enumerate(steps, 1):
        mark = "   " if step.kernel == step.fuse else "!!!"
        lines.append(f"{mark} {number:2}. {step.op!r}")
        lines.append(f"         kernel: {step.kernel[0]} {step.kernel[1]!r}")
        if step.kernel != step.fuse:
            lines.append(f"         fuse:   {step.fuse[0]} {step.fuse[1]!r}")
    return "\n".join(lines)


class OutcomeMismatch(AssertionError):
    """An operation answered differently. Its own class, like `TreeMismatch`, so that
    Hypothesis reports the two kinds of failure as distinct bugs and shrinks each."""


class TreeMismatch(AssertionError):
    """Every operation answered alike, but the final trees differ."""


@dataclasses.dataclass(frozen=True, slots=True)
class Differential:
    """Runs operation sequences on a fresh kernel overlay and a fresh FUSE overlay."""

    pristine: list[Path]
    workspace: Path
    cmd: list[str]
    upper_workspace: Path | None = None
    """Where the upper dirs go, if not beside the lowers (another filesystem)."""
    placement: fsmatrix.Placement = fsmatrix.BY_NAME["ext4"]
    """How the lowers are shown to both overlays (plain dirs, or through a read-only mount)."""
    userxattr: bool = False
    """Both overlays in the rootless `user.overlay.` format (`-o userxattr`)."""

    def run(self, ops: Sequence[Op]) -> list[Step]:
        """Apply `ops` to both mounts; AssertionError at the first difference, with the
        sequence so far and the daemon's log. Returns the steps for further checks."""
        example = Path(tempfile.mkdtemp(dir=self.workspace))
        upper_example = example
        if self.upper_workspace is not None:
            upper_example = Path(tempfile.mkdtemp(dir=self.upper_workspace))
        log = upper_example / "fuse.log"
        try:
            kernel_dirs, fuse_dirs = (
                harness.fresh_copy(self.pristine, example / side, upper_example / side
                                   if upper_example != example else None)
                for side in ("kernel", "fuse")
            )
            with (
                self._placed(kernel_dirs) as kernel_dirs,
                self._placed(fuse_dirs) as fuse_dirs,
                harness.kernel_overlay(kernel_dirs, userxattr=self.userxattr) as kernel_mnt,
                self._system_under_test(fuse_dirs, log) as fuse_mnt,
            ):
                try:
                    return self._compare(ops, str(kernel_mnt), str(fuse_mnt))
                except (OutcomeMismatch, TreeMismatch) as exc:
                    log_text = harness.log_tail(log)
                    raise type(exc)(f"{exc}\n--- {self.cmd[0]} log:\n{log_text}") from None
        finally:
            # after the mounts are gone (the `with` closed first)
            harness.remove_tree(example)
            harness.remove_tree(upper_example)

    @contextlib.contextmanager
    def _placed(self, dirs: harness.OverlayDirs) -> Iterator[harness.OverlayDirs]:
        with fsmatrix.placed_lowers(self.placement, list(dirs.lowers)) as lowers:
            yield dataclasses.replace(dirs, lowers=tuple(lowers))

    def _system_under_test(
        self, dirs: harness.OverlayDirs, log: Path
    ) -> contextlib.AbstractContextManager[Path]:
        if self.cmd == [harness.SELF_CHECK]:
            return harness.kernel_overlay(dirs, userxattr=self.userxattr)
        return harness.fuse_overlay(dirs, self.cmd, log,
                                    ",userxattr" if self.userxattr else "")

    def _compare(self, ops: Sequence[Op], kernel_mnt: str, fuse_mnt: str) -> list[Step]:
        steps: list[Step] = []
        for op in ops:
            expected = outcome(op, kernel_mnt)
            actual = harness.call_with_timeout(
                functools.partial(outcome, op, fuse_mnt), OP_TIMEOUT_S, repr(op)
            )
            steps.append(Step(op, expected, actual))
            if expected != actual:
                raise OutcomeMismatch(
                    f"outcomes differ at step {len(steps)}:\n{format_steps(steps)}"
                )
        kernel_tree = harness.snapshot(Path(kernel_mnt))
        try:
            fuse_tree = harness.call_with_timeout(
                lambda: harness.snapshot(Path(fuse_mnt)), OP_TIMEOUT_S, "snapshot"
            )
        except OSError as exc:  # the kernel's tree could be walked, so this is a difference
            message = f"walking the FUSE tree: {exc}\nafter:\n{format_steps(steps)}"
            raise TreeMismatch(message) from exc
        if diffs := harness.tree_differences(kernel_tree, fuse_tree):
            raise TreeMismatch(
                "final trees differ (kernel first):\n  "
                + "\n  ".join(diffs)
                + f"\nafter:\n{format_steps(steps)}"
            )
        return steps


@pytest.fixture(scope="module")
def differential(tmp_path_factory: pytest.TempPathFactory) -> Differential:
    if os.geteuid() != 0:
        pytest.skip("the kernel overlay oracle needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    cmd = harness.overlay_cmd()
    pristine = harness.build_layers(tmp_path_factory.mktemp("layers"))
    return Differential(pristine, tmp_path_factory.mktemp("examples"), cmd)


# --- strategies ---------------------------------------------------------------------------

# Where new names go: merged, opaque, whited-out, emptied, renamed-to and not-yet-made dirs.
_NEW_NAME_DIRS = (
    "",
    "a",
    "merged",
    "opq",
    "d_lower",
    "d_lower/deep",
    "emptymerged",
    "wo_only",
    "gone_dir",
    "renamed",
    "newdir",
)
NEW_PATHS: tuple[str, ...] = (
    *(os.path.join(d, n) for d in _NEW_NAME_DIRS for n in ("new", "n2")),
    "renamed", "newdir", "renamed/inner", "renamed/deep", "renamed/deep/leaf",
)  # fmt: skip

# Two parts names from the layers to one part new names: most operations need an existing name
# to do more than fail with ENOENT, and the lower names are where overlay semantics live.
_lower_paths = st.sampled_from(harness.LOWER_PATHS)
paths = st.one_of(_lower_paths, _lower_paths, st.sampled_from(NEW_PATHS))
# Directory renames and removals are where overlays differ most (redirects, whiteouts, opaque
# dirs), and a random path is rarely a directory: give directories, lower ones and those a
# sequence makes, a good chance as the source of a rename and the target of rmdir and listing.
_DIRS = (
    "d_lower", "a", "merged", "opq", "emptymerged", "wo_only", "a/sub", "d_lower/deep",
    "gone_dir", "newdir", "renamed", "renamed/deep",
)  # fmt: skip
dir_paths = st.one_of(st.sampled_from(_DIRS), paths)

modes = st.sampled_from((0o644, 0o600, 0o755, 0o4755, 0o2755, 0o1777, 0o000))
ids = st.sampled_from((-1, 0, 1000, 65534))
# Far from "now" and from the layers' times, with odd nanoseconds to catch rounding.
times_ns = st.sampled_from((1_100_000_000_123_456_789, 1_200_000_000_000_000_001))
# The overlay's own names must behave as in the kernel: with trusted.* xattrs (a root mount),
# a trusted.overlay.* name set through the mount is stored escaped and reads back (kernel 6.7+),
# and user.overlay.* names are plain xattrs with no overlay meaning.
xattr_names = st.sampled_from((
    "user.foo", "user.new", "trusted.foo", "trusted.new", "trusted.overlay.foo",
    "trusted.overlay.opaque", "user.overlay.foo", "user.overlay.opaque", "user.overlay.redirect",
))  # fmt: skip
# No "..": a symlink made anywhere resolves inside the mount, so writes stay inside it.
symlink_targets = st.sampled_from(("new", "f1", "a/f1", "x1", "missing", "sub"))

operations: st.SearchStrategy[Op] = st.one_of(
    st.builds(Read, paths),
    st.builds(
        Write, paths, st.sampled_from((0, 5, 4096, 70_000)), st.binary(min_size=1, max_size=8)
    ),
    st.builds(Create, paths, modes, st.sampled_from(("excl", "trunc", "plain"))),
    st.builds(Unlink, paths),
    st.builds(Mkdir, paths, st.sampled_from((0o755, 0o700, 0o1777, 0o2755))),
    st.builds(Rmdir, dir_paths),
    st.builds(Rename, dir_paths, paths, st.sampled_from(("", "NOREPLACE", "EXCHANGE"))),
    st.builds(Truncate, paths, st.sampled_from((0, 3, 100, 70_000))),
    st.builds(
        Fallocate, paths,
        st.sampled_from((0, harness.FALLOC_FL_KEEP_SIZE,
                         harness.FALLOC_FL_PUNCH_HOLE | harness.FALLOC_FL_KEEP_SIZE)),
        st.sampled_from((0, 2)), st.sampled_from((1, 8192)),
    ),
    st.builds(Link, paths, paths),
    st.builds(Symlink, symlink_targets, paths),
    st.builds(Chmod, paths, modes),
    st.builds(Chown, paths, ids, ids),
    st.builds(Utimens, paths, times_ns, st.booleans()),
    st.builds(Mknod, paths, st.sampled_from(("fifo", "chr", "whiteout"))),
    st.builds(
        SetXattr,
        paths,
        xattr_names,
        st.sampled_from((b"v1", b"", b"y")),  # "y": what an opaque marker holds
        st.sampled_from(("", "CREATE", "REPLACE")),
    ),
    st.builds(RemoveXattr, paths, xattr_names),
    st.builds(GetXattr, paths, xattr_names),
    st.builds(ListXattr, paths),
    st.builds(ListDir, dir_paths),
    st.builds(Stat, paths),
)
sequences = st.lists(operations, max_size=25)

_SETTINGS = {
    "deadline": None,  # each example mounts two filesystems: seconds, not milliseconds
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}


def run_and_count(differential: Differential, ops: list[Op]) -> None:
    """Run `ops`; tally each operation's kernel outcome for `--hypothesis-show-statistics`,
    which shows whether the sequences reach the interesting cases or mostly fail early."""
    for step in differential.run(ops):
        result = step.kernel[1] if step.kernel[0] == "err" else "ok"
        event(f"{type(step.op).__name__}: {result}")


@settings(max_examples=40, **_SETTINGS)  # type: ignore[arg-type]
@given(ops=sequences)
def test_random_sequences(differential: Differential, ops: list[Op]) -> None:
    run_and_count(differential, ops)


@pytest.mark.long
@pytest.mark.slow
@settings(max_examples=1000, **_SETTINGS)  # type: ignore[arg-type]
@given(ops=sequences)
def test_random_sequences_long(differential: Differential, ops: list[Op]) -> None:
    run_and_count(differential, ops)


@pytest.fixture(scope="module")
def userxattr_differential(tmp_path_factory: pytest.TempPathFactory,
                           differential: Differential) -> Differential:
    """Both overlays in the rootless on-disk format, mounted as root with `-o userxattr`
    (the kernel's overlayfs then has no redirects, no metacopy, no index).

    One difference is by choice, so the layers here have no hard links: without an index the
    kernel breaks a lower hard-linked group on copy-up (the other names keep the old data)
    and goes on showing the lower link count after one name is deleted; layerfs copies the
    group up as one inode and counts right, as the kernel does with index=on.
    """
    pristine = harness.build_layers(tmp_path_factory.mktemp("user-layers"), userxattr=True)
    for layer in pristine:
        for dirpath, _dirs, files in os.walk(layer):
            for name in files:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    shutil.copy2(path, path + ".tmp")
                    os.chown(path + ".tmp", st.st_uid, st.st_gid)
                    os.rename(path + ".tmp", path)
    return dataclasses.replace(differential, pristine=pristine, userxattr=True)


@settings(max_examples=30, **_SETTINGS)  # type: ignore[arg-type]
@given(ops=sequences)
def test_random_sequences_userxattr(userxattr_differential: Differential,
                                    ops: list[Op]) -> None:
    run_and_count(userxattr_differential, ops)


@pytest.fixture(scope="module", params=fsmatrix.PLACEMENTS, ids=lambda p: p.name)
def placed_differential(
    request: pytest.FixtureRequest, differential: Differential,
    scratch_filesystems: ScratchFilesystems,
) -> Differential:
    """The differential with both overlays' layers on one filesystem of the matrix."""
    placement: fsmatrix.Placement = request.param
    return dataclasses.replace(
        differential,
        workspace=scratch_filesystems.dir(placement.lower_fs, "examples"),
        upper_workspace=scratch_filesystems.dir(placement.upper_fs, "uppers"),
        placement=placement,
    )


@settings(max_examples=6, **_SETTINGS)  # type: ignore[arg-type]
@given(ops=sequences)
def test_random_sequences_on_every_filesystem(
    placed_differential: Differential, ops: list[Op]
) -> None:
    run_and_count(placed_differential, ops)


@pytest.mark.long
@pytest.mark.slow
@settings(max_examples=150, **_SETTINGS)  # type: ignore[arg-type]
@given(ops=sequences)
def test_random_sequences_on_every_filesystem_long(
    placed_differential: Differential, ops: list[Op]
) -> None:
    run_and_count(placed_differential, ops)


# --- hand-written scenarios ---------------------------------------------------------------
#
# Each also checks the kernel's own answer where the scenario is about it, so that a change in
# the oracle (mount options, kernel version) cannot turn a scenario into a vacuous comparison.

OK: Outcome = ("ok", None)


def test_rename_lower_dir_then_create_inside(differential: Differential) -> None:
    steps = differential.run(
        [
            Rename("d_lower", "renamed"),
            Create("renamed/new", 0o644, "excl"),
            Write("renamed/new", 0, b"fresh"),
            Write("renamed/inner", 0, b"changed"),
            Mkdir("renamed/deep/sub"),
            ListDir("renamed"),
            ListDir("renamed/deep"),
            Stat("d_lower"),
            Mkdir("d_lower"),
            ListDir("d_lower"),
        ]
    )
    assert steps[0].kernel == OK
    assert steps[5].kernel == ("ok", ["deep", "inner", "new"])
    assert steps[9].kernel == ("ok", [])


def test_rename_over_empty_merged_dir(differential: Differential) -> None:
    steps = differential.run(
        [
            Rename("d_lower", "emptymerged"),
            ListDir("emptymerged"),
            Mkdir("newdir"),
            Create("newdir/new", 0o644, "excl"),
            Rename("newdir", "merged/new"),
            Unlink("emptymerged/deep/leaf"),
            Rename("merged/new", "emptymerged/deep"),
            Rename("a/sub", "emptymerged/deep"),
            ListDir("emptymerged/deep"),
        ]
    )
    assert steps[0].kernel == OK
    assert steps[1].kernel == ("ok", ["deep", "inner"])
    assert steps[6].kernel == OK  # over a lower dir that holds only a whiteout now
    assert steps[7].kernel == ("err", "ENOTEMPTY")
    assert steps[8].kernel == ("ok", ["new"])


def test_rmdir_of_dir_with_only_whiteouts(differential: Differential) -> None:
    steps = differential.run(
        [
            ListDir("wo_only"),
            Rmdir("wo_only"),
            Stat("wo_only"),
            Mkdir("wo_only"),
            ListDir("wo_only"),
            Unlink("merged/x1"),
            Unlink("merged/x2"),
            Unlink("merged/x3"),
            Unlink("merged/shared"),
            Rmdir("merged"),
            Mkdir("merged"),
            ListDir("merged"),
        ]
    )
    assert steps[0].kernel == ("ok", [])
    assert steps[1].kernel == OK
    assert steps[4].kernel == ("ok", [])
    assert steps[11].kernel == ("ok", [])


def test_copy_up_of_hard_linked_lower_file(differential: Differential) -> None:
    steps = differential.run(
        [
            Write("hl1", 0, b"HARD"),
            Read("a/hl2"),
            Stat("a/hl2"),
            Write("a/hl2", 4, b"-LINK"),
            Read("hl1"),
            Chmod("a/hl2", 0o600),
            Stat("hl1"),
            Link("hl1", "merged/new"),
            Stat("a/hl2"),
            Unlink("hl1"),
            Read("merged/new"),
        ]
    )
    assert steps[1].kernel == ("ok", b"HARD linked, two names in l3\n")
    assert steps[4].kernel == ("ok", b"HARD-LINKed, two names in l3\n")


def test_exchange_lower_file_and_upper_dir(differential: Differential) -> None:
    steps = differential.run(
        [
            Mkdir("newdir"),
            Create("newdir/new", 0o600, "excl"),
            Rename("a/f1", "newdir", "EXCHANGE"),
            Read("newdir"),
            ListDir("a/f1"),
            ListDir("a"),
            Rename("merged/x3", "a/f1", "EXCHANGE"),
            ListDir("merged/x3"),
            Read("a/f1"),
        ]
    )
    assert steps[2].kernel == OK
    assert steps[3].kernel == ("ok", b"a/f1 from l3\n")
    assert steps[4].kernel == ("ok", ["new"])


def test_whiteout_opaque_and_private_xattrs(differential: Differential) -> None:
    steps = differential.run(
        [
            Stat("whited"),
            Create("whited", 0o644, "excl"),
            Read("whited"),
            ListDir("opq"),
            Stat("opq/hidden"),
            Mkdir("gone_dir"),
            ListDir("gone_dir"),
            SetXattr("merged/x1", "trusted.overlay.foo", b"v1"),
            SetXattr("opq", "trusted.overlay.opaque", b"n"),
            GetXattr("opq", "trusted.overlay.opaque"),
            ListXattr("opq"),
            Mknod("merged/new", "whiteout"),
            SetXattr("xat", "user.foo", b"new", "REPLACE"),
            ListXattr("xat"),
        ]
    )
    assert steps[0].kernel == ("err", "ENOENT")
    assert steps[2].kernel == ("ok", b"")
    assert steps[3].kernel == ("ok", ["visible"])
    assert steps[6].kernel == ("ok", [])
    assert steps[11].kernel == ("err", "EPERM")


def test_copy_up_keeps_parent_mtime(differential: Differential) -> None:
    steps = differential.run(
        [
            Write("a/f1", 0, b"A"),
            Mtime("a"),
            Mtime("a/f1"),
            Chmod("merged/x3", 0o600),
            Mtime("merged"),
            Mtime("merged/x3"),
            SetXattr("d_lower/deep/leaf", "user.new", b"v1"),
            Mtime("d_lower/deep"),
            Mtime("d_lower"),
            Create("d_lower/new", 0o644, "excl"),
            Mtime("d_lower"),
        ]
    )
    assert steps[1].kernel == ("ok", 990_000_000 * 10**9)  # l2's time: a is merged l2/l3
    assert steps[2].kernel == ("ok", "recent")
    assert steps[5].kernel == ("ok", 980_000_000 * 10**9)
    assert steps[10].kernel == ("ok", "recent")


def test_user_overlay_xattrs_are_plain(differential: Differential) -> None:
    steps = differential.run(
        [
            SetXattr("a", "user.overlay.opaque", b"y"),
            SetXattr("merged/x1", "user.overlay.foo", b"v1"),
            ListDir(""),
            ListDir("a"),
            ListXattr("a"),
            GetXattr("merged/x1", "user.overlay.foo"),
            SetXattr("d_lower", "user.overlay.redirect", b"/a"),
            ListDir(""),
            ListDir("d_lower"),
        ]
    )
    assert steps[3].kernel == ("ok", ["f1", "f2", "hl2", "sub"])
    assert steps[8].kernel == ("ok", ["deep", "inner"])


def test_rename_over_one_name_of_lower_hard_link(differential: Differential) -> None:
    steps = differential.run(
        [
            Rename("a/f1", "hl1"),
            Stat("a/hl2"),
            Read("hl1"),
            Link("a/hl2", "merged/new"),
            Stat("merged/new"),
            Rename("merged/new", "a/hl2"),
            Stat("a/hl2"),
        ]
    )
    # The renamed-over name is gone, so its lower partner counts one link (index=on keeps count).
    l3_time = f"mtime={980_000_000 * 10**9}"
    assert steps[1].kernel == ("ok", ("file", "0o644", 0, 0, "size=29", "nlink=1", l3_time))


def test_fallocate_of_lower_and_new_files(placed_differential: Differential) -> None:
    """fallocate copies a lower file up and reserves or punches in the copy, on every
    filesystem (tmpfs, xfs and btrfs each answer some modes their own way)."""
    keep, punch = harness.FALLOC_FL_KEEP_SIZE, harness.FALLOC_FL_PUNCH_HOLE
    steps = placed_differential.run(
        [
            Fallocate("a/f1", 0, 2, 8192),
            Fallocate("merged/x3", punch | keep, 0, 2),
            Read("merged/x3"),
            Create("new", 0o644, "excl"),
            Fallocate("new", keep, 0, 8192),
            Stat("new"),
            Fallocate("cdev", 0, 0, 1),
            Fallocate("a", 0, 0, 1),
        ]
    )
    assert steps[0].kernel == ("ok", 8194)
    assert steps[2].kernel[0] == "ok"
