"""POSIX ACLs and the umask through the mount, against the kernel's overlayfs on the same layers.

Each scenario runs on a layerfs-overlay mount and on a kernel overlayfs mount of copies of the
same layers and records what a user sees (modes, ACL xattrs, whether `nobody` may read); the two
records must be equal. The kernel enforces ACLs on both; what a new object inherits from its
directory's default ACL, and where the umask applies instead, is the filesystem's to decide.
What must not be done as root runs in a forked child that is nobody; creations run in a child
process with the umask the scenario names.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import struct
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from tests.fsapi import Layers, kernel_overlay, mounted_overlay

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

ACCESS, DEFAULT = "system.posix_acl_access", "system.posix_acl_default"
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
NOBODY = 65534
STAFF = 1000  # a group nobody is not in
Record = dict[str, object]


def acl_xattr(*entries: tuple[int, int, int]) -> bytes:
    """The xattr form of an ACL: version 2, then (tag, perm, id) per entry, sorted as the
    kernel wants them (by tag, then id)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in sorted(entries))


def nobody_may_read(owner: int) -> bytes:
    """An access ACL: the owner's permissions as given, read for nobody, nothing for others."""
    return acl_xattr((USER_OBJ, owner, 0xFFFFFFFF), (USER, 4, NOBODY),
                     (GROUP_OBJ, 0, 0xFFFFFFFF), (MASK, 4, 0xFFFFFFFF),
                     (OTHER, 0, 0xFFFFFFFF))


INHERITED = acl_xattr((USER_OBJ, 7, 0xFFFFFFFF), (USER, 7, NOBODY), (GROUP_OBJ, 5, 0xFFFFFFFF),
                      (MASK, 7, 0xFFFFFFFF), (OTHER, 0, 0xFFFFFFFF))


def build(base: Path) -> Layers:
    lower, upper, work = (base / name for name in ("lower", "upper", "work"))
    for path in (lower, upper, work):
        path.mkdir()
    (lower / "secret").write_bytes(b"lower secret")
    os.chmod(lower / "secret", 0o600)
    os.setxattr(lower / "secret", ACCESS, nobody_may_read(6))
    (lower / "inherit").mkdir()
    os.chmod(lower / "inherit", 0o755)
    os.setxattr(lower / "inherit", DEFAULT, INHERITED)
    (lower / "plain").mkdir()
    return Layers([lower], upper, work)


def as_nobody(root: Path, action: Callable[[], object]) -> str:
    """Run `action` in a child that is nobody (no groups) in directory `root`: "ok" or the
    name of the errno it failed with."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 255
        try:
            os.chdir(root)  # as root: the test's tmp dir is closed to others
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            action()
            code = 0
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else errno.errorcode.get(code, f"exit {code}")


def read_as_nobody(root: Path, name: str) -> str:
    return as_nobody(root, lambda: open(name, "rb").read())


def as_root(root: Path, code: str, *, umask: int) -> None:
    subprocess.run([sys.executable, "-c", code], cwd=root, umask=umask, check=True, timeout=30)


def observe(root: Path, name: str) -> Record:
    path = root / name
    st = os.lstat(path)
    record: Record = {"mode": oct(stat.S_IMODE(st.st_mode)), "type": stat.S_IFMT(st.st_mode)}
    for xattr in (ACCESS, DEFAULT):
        try:
            record[xattr] = os.getxattr(path, xattr, follow_symlinks=False).hex()
        except OSError as exc:
            record[xattr] = errno.errorcode[exc.errno or 0]
    return record


@contextlib.contextmanager
def both(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A layerfs mount and a kernel overlayfs mount, each of its own copy of the layers."""
    mounts: list[Path] = []
    with contextlib.ExitStack() as stack:
        for name, mount in (("layerfs", mounted_overlay), ("kernel", kernel_overlay)):
            base = tmp_path / name
            base.mkdir()
            mnt = base / "mnt"
            mnt.mkdir()
            os.chmod(base, 0o755)
            stack.enter_context(mount(build(base), mnt))
            mounts.append(mnt)
        yield mounts[0], mounts[1]


def same_on_both(tmp_path: Path, scenario: Callable[[Path], Record]) -> Record:
    with both(tmp_path) as (ours, kernel):
        seen_ours, seen_kernel = scenario(ours), scenario(kernel)
    assert seen_ours == seen_kernel
    return seen_ours


@pytest.fixture(autouse=True)
def _needs_acls(tmp_path: Path) -> None:
    probe = tmp_path / "acl-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, ACCESS, nobody_may_read(6))
    except OSError as exc:
        pytest.skip(f"{tmp_path}: no POSIX ACLs on this filesystem ({exc})")
    finally:
        probe.unlink()
    if shutil.which("mount") is None:
        pytest.skip("mount(8) is missing")


def test_an_acl_from_a_lower_layer_is_enforced(tmp_path: Path) -> None:
    seen = same_on_both(tmp_path, lambda root: {"nobody": read_as_nobody(root, "secret"),
                                                **observe(root, "secret")})
    assert seen["nobody"] == "ok" and seen["mode"] == "0o640"  # the mask shows as group bits


def test_an_acl_set_through_the_mount_is_enforced_and_follows_chmod(tmp_path: Path) -> None:
    def scenario(root: Path) -> Record:
        (root / "f").write_bytes(b"mine")
        os.chmod(root / "f", 0o600)
        denied_before = read_as_nobody(root, "f")
        os.setxattr(root / "f", ACCESS, nobody_may_read(6))
        granted = read_as_nobody(root, "f")
        after_set = observe(root, "f")
        os.chmod(root / "f", 0o600)  # the mask goes with the group bits: nobody loses read
        after_chmod = read_as_nobody(root, "f")
        os.chmod(root / "f", 0o640)
        os.removexattr(root / "f", ACCESS)
        after_remove = read_as_nobody(root, "f")
        return {"before": denied_before, "granted": granted, "set": after_set,
                "chmod": after_chmod, "chmod_acl": observe(root, "f"), "removed": after_remove}

    seen = same_on_both(tmp_path, scenario)
    assert (seen["before"], seen["granted"], seen["chmod"], seen["removed"]) == (
        "EACCES", "ok", "EACCES", "EACCES")


@pytest.mark.parametrize("parent", ["inherit", "madehere"])
def test_new_objects_inherit_the_default_acl_and_ignore_the_umask(tmp_path: Path,
                                                                  parent: str) -> None:
    """In a lower directory with a default ACL (copied up by the first create) and in one
    given a default ACL through the mount: files, directories and fifos take it, masked by the
    mode asked for; the umask does not apply; a directory hands the default ACL on."""
    def scenario(root: Path) -> Record:
        if parent == "madehere":
            os.mkdir(root / parent, 0o755)
            os.setxattr(root / parent, DEFAULT, INHERITED)
        as_root(root, f"""
import os
os.close(os.open('{parent}/file', os.O_CREAT | os.O_WRONLY, 0o666))
os.close(os.open('{parent}/exec', os.O_CREAT | os.O_WRONLY, 0o4755))
os.mkdir('{parent}/dir', 0o777)
os.mkfifo('{parent}/fifo', 0o640)
os.symlink('file', '{parent}/link')
os.mkdir('{parent}/dir/deeper', 0o700)
""", umask=0o077)
        record = {name: observe(root, f"{parent}/{name}")
                  for name in ("file", "exec", "dir", "fifo", "dir/deeper")}
        record["nobody"] = read_as_nobody(root, f"{parent}/file")
        return record

    seen = same_on_both(tmp_path, scenario)
    assert seen["nobody"] == "ok"
    assert seen["file"]["mode"] == "0o660" and seen["dir"]["mode"] == "0o770"
    assert seen["dir"][DEFAULT] == INHERITED.hex()


def test_without_a_default_acl_the_umask_applies(tmp_path: Path) -> None:
    def scenario(root: Path) -> Record:
        as_root(root, """
import os
os.close(os.open('plain/file', os.O_CREAT | os.O_WRONLY, 0o666))
os.mkdir('plain/dir', 0o777)
os.mknod('plain/fifo', 0o666 | 0o010000)
os.close(os.open('top', os.O_CREAT | os.O_WRONLY, 0o4777))
""", umask=0o027)
        return {name: observe(root, name) for name in ("plain/file", "plain/dir", "plain/fifo",
                                                       "top")}

    seen = same_on_both(tmp_path, scenario)
    assert [seen[name]["mode"] for name in ("plain/file", "plain/dir", "plain/fifo", "top")] == [
        "0o640", "0o750", "0o640", "0o4750"]


def test_an_acl_set_by_someone_outside_the_group_drops_setgid(tmp_path: Path) -> None:
    def scenario(root: Path) -> Record:
        (root / "shared").write_bytes(b"")
        os.chown(root / "shared", NOBODY, STAFF)
        os.chmod(root / "shared", 0o2770)
        done = as_nobody(root, lambda: os.setxattr("shared", ACCESS, nobody_may_read(7)))
        return {"nobody sets": done, **observe(root, "shared")}

    seen = same_on_both(tmp_path, scenario)
    assert seen["nobody sets"] == "ok" and seen["mode"] == "0o740"


def test_a_changed_default_acl_applies_to_the_next_create(tmp_path: Path) -> None:
    """Creates in a row read the directory's default ACL once; changing it must count."""
    def scenario(root: Path) -> Record:
        os.mkdir(root / "d", 0o755)
        as_root(root, "open('d/before', 'w').close()", umask=0o022)
        os.setxattr(root / "d", DEFAULT, INHERITED)
        as_root(root, "open('d/with', 'w').close()", umask=0o022)
        os.removexattr(root / "d", DEFAULT)
        as_root(root, "open('d/after', 'w').close()", umask=0o022)
        return {name: observe(root, f"d/{name}") for name in ("before", "with", "after")}

    seen = same_on_both(tmp_path, scenario)
    assert [seen[name]["mode"] for name in ("before", "with", "after")] == [
        "0o644", "0o660", "0o644"]
