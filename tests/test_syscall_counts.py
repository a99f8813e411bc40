"""Syscalls per operation in the daemon of a real layerfs-overlay mount, counted by strace as
`python -m benchmarks syscalls` counts them (benchmarks/syscall_counts.py).

The bounds are the counts of this version: a change that makes a copy-up or a create cost more
syscalls fails here, and has to say why in the bound it raises. The kernel's overlayfs does a
copy-up of a regular file in about 15 steps (fs/overlayfs/copy_up.c: the parent's attributes,
a temp file in the work dir, the open of the lower file, the data, an fsync, the xattrs, the
origin, the mode, owner and times, the rename, the parent's times, and the open of the copy).
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest

from benchmarks import syscall_counts
from tests.overlay_harness import overlay_cmd

if TYPE_CHECKING:
    from pathlib import Path

    from tests.fsmatrix import ScratchFilesystems

COUNT = 20

BOUNDS = {
    # work syscalls, requests
    "copy_up": (18, 3),  # 2 of the 18 register and drop the passthrough backing file
    # the 18 above and 5 for the dir: mkdir, xattrs, times, rename, its parent's times
    "copy_up_dir": (23, 3),
    "create": (8, 5),
    "chmod": (13, 1),
    "unlink": (3, 3),
}


def _counts(scratch: Path, count: int) -> dict[str, dict[str, object]]:
    if shutil.which("strace") is None:
        pytest.fail("strace is missing: tools/setup installs it")
    cmd = overlay_cmd()
    if "layerfs-overlay" not in cmd[0]:
        pytest.skip("the counts are layerfs-overlay's")
    results = syscall_counts.measure([syscall_counts.Daemon("layerfs", tuple(cmd))], count,
                                     scratch)
    by_op = results["layerfs"]
    assert isinstance(by_op, dict)
    return by_op


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return _counts(tmp_path_factory.mktemp("syscalls"), COUNT)


@pytest.mark.parametrize("op", syscall_counts.OPS)
def test_an_operation_costs_no_more_syscalls_than_it_did(
    counts: dict[str, dict[str, object]], op: str,
) -> None:
    work_bound, request_bound = BOUNDS[op]
    found = counts[op]
    assert isinstance(found["work"], float) and isinstance(found["requests"], float)
    # + 0.5: what the first operation alone pays (a directory's default ACL read once) is
    # spread over COUNT; one syscall more per operation is not
    assert found["work"] <= work_bound + 0.5, found["work_by_syscall"]
    assert found["requests"] <= request_bound + 0.5, found
    assert found["work"] >= 1  # the trace saw the operation at all


def test_the_counter_sees_the_copy_and_the_fsync(counts: dict[str, dict[str, object]]) -> None:
    by_name = counts["copy_up"]["work_by_syscall"]
    assert isinstance(by_name, dict)
    assert by_name.get("fdatasync") == 1.0  # the copy is synced before its rename, as the kernel
    assert by_name.get("renameat2") == 1.0


def test_a_clone_is_not_synced(scratch_filesystems: ScratchFilesystems) -> None:
    """On xfs the copy-up is a clone (FICLONE, one ioctl more than the two of the backing
    file), and a clone is not fsynced: its extents are on disk already, and the kernel's
    overlayfs does not sync one either."""
    by_name = _counts(scratch_filesystems.dir("xfs"), 5)["copy_up"]["work_by_syscall"]
    assert isinstance(by_name, dict)
    assert by_name.get("ioctl") == 3.0, by_name
    assert "fdatasync" not in by_name, by_name
    assert by_name.get("renameat2") == 1.0
