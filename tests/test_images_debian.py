"""A real Debian root (mmdebstrap minbase bookworm, ~8,700 entries, devices in /dev) through
the image store: one import, one load of the same root made into an OCI image by umoci, one
mount compared with `umoci unpack` of that image. Economical on purpose: the rootfs tarball is
built once and cached in /var/tmp (tests/imagetools.py); the rest takes ~25 s.

Marked slow; still run by default. Needs root; skipped if mmdebstrap cannot build (offline).
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import TYPE_CHECKING

import pytest

from tests import imagetools as it
from tests.treecmp import diff, snapshot

if TYPE_CHECKING:
    from pathlib import Path

    from tests.imagetools import Store

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts, chroot, umoci"),
]


def test_debian_root_imports_loads_and_mounts_as_umoci_unpacks_it(
    store: Store, tmp_path: Path
) -> None:
    debian = it.debian_tarball()
    # import: one layer whose diff_id is the sha256 of the tarball
    image_id = store.ok("import", str(debian), "debian:imported").strip()
    imported = store.inspect("debian:imported")
    assert imported["Id"] == image_id
    [diff_id] = imported["RootFS"]["Layers"]
    assert diff_id == it.sha256_file(debian)
    meta = json.loads((store.root / "layers" / diff_id.removeprefix("sha256:") / "meta.json")
                      .read_text())
    assert meta["entries"] > 8000

    # load: the same root made into an OCI image by umoci
    layout = tmp_path / "layout"
    it.umoci_image_from_rootfs(debian, layout, "bookworm", tmp_path / "umoci-work")
    assert store.ok("load", "-i", str(layout), "--repository", "debian") == \
        "Loaded image: debian:bookworm\n"
    loaded = store.inspect("debian:bookworm")
    assert loaded["Id"] == it.layout_config_digest(layout, "bookworm")
    assert loaded["Manifest"]["Digest"] == it.layout_manifest(layout, "bookworm")["digest"]
    assert len(store.layer_dirs()) == 2

    oracle = it.umoci_unpack(layout, "bookworm", tmp_path / "bundle")
    expected = snapshot(oracle)
    assert len(expected) > 8000
    # The imported layer, unpacked on disk, is the same tree (a rootfs has no whiteouts).
    layer_dir = store.root / "layers" / diff_id.removeprefix("sha256:") / "diff"
    problems = diff(expected, snapshot(layer_dir))
    assert not problems, "\n".join(problems)

    with store.mounted("debian:bookworm", tmp_path / "mnt") as mnt:
        problems = diff(expected, snapshot(mnt))
        assert not problems, "\n".join(problems)
        assert it.hardlink_groups(oracle) == it.hardlink_groups(mnt)
        result = subprocess.run(
            ["chroot", str(mnt), "/bin/sh", "-c",
             "dpkg-query -W -f '${Status}\\n' | sort -u; apt-get --version | head -1"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, result.stderr
        status, apt = result.stdout.splitlines()
        assert status == "install ok installed"  # every package, as dpkg sees it in the mount
        assert apt.startswith("apt ")
