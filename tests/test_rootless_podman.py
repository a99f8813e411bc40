"""Rootless podman with `mount_program = layerfs-overlay`, run by a real unprivileged user
(tests/rootless.py): it mounts its containers' roots with layerfs, runs one and commits it.

Offline: the image comes from the official busybox OCI layout (`oci:` transport), the
containers have no network, the registries podman knows are never asked (`--pull=never`).
On a machine with cgroup v1 (or hybrid) crun refuses to run at all; runc runs there, without
cgroups as rootless podman does on v1.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.imagetools import IMAGES
from tests.rootless import VENV_BIN

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.rootless import RootlessUser

BUSYBOX_LAYOUT = IMAGES / "busybox-1.38.0-musl-amd64-oci"
IMAGE = "localhost/podman-busybox:1"

pytestmark = pytest.mark.skipif(shutil.which("podman") is None, reason="podman not installed")


def _runtime() -> list[str]:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return ["--cgroups=disabled"] if shutil.which("crun") else []
    if shutil.which("runc") is None:
        pytest.skip("cgroup v1 here and no runc: crun cannot run containers on it")
    return []


@pytest.fixture
def podman(rootless_user: RootlessUser) -> Iterator[list[str]]:
    user = rootless_user
    user.grant_reach(BUSYBOX_LAYOUT)
    home = user.work / "home"
    conf = home / ".config" / "containers"
    user.mkdirs(home / ".config", conf)
    (conf / "storage.conf").write_text(textwrap.dedent(f"""\
        [storage]
        driver = "overlay"
        graphroot = "{home}/podman-storage"
        runroot = "{user.work}/run/containers"
        [storage.options.overlay]
        mount_program = "{VENV_BIN}/layerfs-overlay"
        """))
    v1 = not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    (conf / "containers.conf").write_text(textwrap.dedent(f"""\
        [engine]
        cgroup_manager = "cgroupfs"
        events_logger = "file"
        {'runtime = "runc"' if v1 else ''}
        """))
    for path in conf.iterdir():
        os.chown(path, user.uid, user.gid)
    command = ["podman"]
    user.run([*command, "pull", "-q", f"oci:{BUSYBOX_LAYOUT}"], timeout=300)
    image_id = user.run([*command, "images", "-q"]).stdout.split()[0]
    user.run([*command, "tag", image_id, IMAGE])
    try:
        yield command
    finally:
        user.run([*command, "system", "reset", "-f"], check=False, timeout=300)
        shutil.rmtree(home / "podman-storage", ignore_errors=True)
        shutil.rmtree(home / ".config", ignore_errors=True)


def test_podman_runs_and_commits_on_layerfs(rootless_user: RootlessUser,
                                            podman: list[str]) -> None:
    user = rootless_user
    run = [*podman, "run", *_runtime(), "--pull=never", "--network", "none"]
    script = "echo made > /made && rm /bin/vi && id -u && grep ' / / ' /proc/self/mountinfo"
    out = user.run([*run, "--name", "c", IMAGE, "sh", "-c", script],
                   timeout=300).stdout.splitlines()
    assert out[0] == "0"  # root in podman's user namespace
    assert " - fuse.layerfs layerfs-overlay " in out[1]  # the container's root is ours
    user.run([*podman, "commit", "-q", "c", "localhost/committed:1"], timeout=300)
    after = user.run([*run, "--rm", "localhost/committed:1", "sh", "-c",
                      "cat /made; ls /bin/vi 2>&1 || true; stat -c '%u %g %a' /bin/busybox"],
                     timeout=300).stdout.splitlines()
    assert after[0] == "made"
    assert "No such file" in after[1]  # the whiteout made it into the committed layer
    assert after[2] == "0 0 755"
