"""A real Debian root through containers and commit: install a package with dpkg in one
container, delete and replace base files, commit, and find it all in a second container of the
new image, in what `layerfs run` shows, and in what umoci and skopeo read from `layerfs save`.

The root is a minbase bookworm from mmdebstrap (cached by `imagetools.debian_tarball`); the
package is fetched on the host with `apt-get download`. Skipped, with the reason, where either
cannot be had.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.containertools import ContainerStore, apt_download, chroot
from tests.imagetools import debian_tarball, skopeo, umoci_unpack
from tests.treecmp import Entry, diff, snapshot

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow

PACKAGE = "hello"
BASE = "debian:bookworm"
BUILT = "debian:hello"
REPLACED = "etc/apt/apt.conf.d"
NEW_CONF = 'APT::Install-Recommends "false";\n'


@dataclass(frozen=True)
class Built:
    store: ContainerStore
    work: Path
    builder: Path
    """The first container, still mounted, after the changes and the commit."""
    builder_tree: dict[str, Entry]
    base_docs: list[str]
    replaced_before: list[str]
    package_paths: list[str]
    """What the .deb holds, as dpkg-deb lists it (no leading ./)."""
    second: Path
    """A second container of the committed image, mounted."""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    work = tmp_path_factory.mktemp("debian")
    deb = apt_download(PACKAGE, work / "debs")
    tarball = debian_tarball()
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True,
                             check=True).stdout
    package_paths = _tar_names(listing)
    store = ContainerStore(work / "store")
    try:
        store.ok("import", str(tarball), BASE)
        builder = work / "builder"
        store.mount(BASE, builder, "--name", "builder")
        base_docs = sorted(os.listdir(builder / "usr" / "share" / "doc"))
        replaced_before = sorted(os.listdir(builder / REPLACED))
        assert base_docs and PACKAGE not in base_docs
        assert replaced_before

        shutil.copy(deb, builder / "tmp" / deb.name)
        chroot(builder, "sh", "-c", "rm -rf /usr/share/doc/*")
        chroot(builder, "dpkg", "-i", f"/tmp/{deb.name}")
        (builder / "tmp" / deb.name).unlink()
        chroot(builder, "sh", "-c", f"rm -rf /{REPLACED} && mkdir /{REPLACED} && "
                                    f"printf '%s' '{NEW_CONF}' > /{REPLACED}/99new")
        os.chmod(builder / "etc" / "debian_version", 0o600)  # metadata only
        builder_tree = snapshot(builder)

        store.ok("commit", "-m", f"install {PACKAGE}", "-a", "tests", "builder", BUILT)
        second = work / "second"
        store.mount(BUILT, second, "--name", "second")
        yield Built(store, work, builder, builder_tree, base_docs, replaced_before,
                    package_paths, second)
    finally:
        store.cleanup()


def _tar_names(tar_bytes: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return [n for n in (m.name.removeprefix("./").strip("/") for m in tar) if n]


def test_the_package_is_installed_in_a_second_container(built: Built) -> None:
    status = chroot(built.second, "dpkg", "-s", PACKAGE).stdout
    assert f"Package: {PACKAGE}" in status
    assert "Status: install ok installed" in status
    assert chroot(built.second, PACKAGE).stdout == "Hello, world!\n"
    listed = chroot(built.second, "dpkg", "-L", PACKAGE).stdout.split()
    assert "/usr/bin/hello" in listed
    for path in built.package_paths:
        assert os.path.lexists(built.second / path), path
    assert (built.second / "usr" / "bin" / "hello").stat().st_mode & stat.S_IXUSR
    # dpkg's database agrees with what is on disk
    chroot(built.second, "dpkg", "--verify", PACKAGE)


def test_deleted_files_are_gone_and_the_replaced_directory_is_new(built: Built) -> None:
    docs = sorted(os.listdir(built.second / "usr" / "share" / "doc"))
    assert docs == [PACKAGE]
    for name in built.base_docs:
        assert not os.path.lexists(built.second / "usr" / "share" / "doc" / name), name
    assert sorted(os.listdir(built.second / REPLACED)) == ["99new"]
    assert (built.second / REPLACED / "99new").read_text() == NEW_CONF
    for name in built.replaced_before:
        assert not os.path.lexists(built.second / REPLACED / name), name
    mode = os.stat(built.second / "etc" / "debian_version").st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_the_second_container_shows_the_tree_the_first_had(built: Built) -> None:
    problems = diff(built.builder_tree, snapshot(built.second))
    assert not problems, "\n".join(problems)
    # and the second container starts with no changes of its own
    assert built.store.diff("second") == []


def test_diff_of_the_first_container(built: Built) -> None:
    lines = set(built.store.diff("builder"))
    assert {"C /usr", "C /usr/bin", "A /usr/bin/hello", "C /var/lib/dpkg/status",
            "C /usr/share/doc", "A /usr/share/doc/hello", "C /etc/debian_version",
            f"A /{REPLACED}/99new"} <= lines
    assert {f"D /usr/share/doc/{name}" for name in built.base_docs} <= lines
    assert f"C /{REPLACED}" in lines or f"D /{REPLACED}" in lines
    assert not [ln for ln in lines if ln.startswith("A /tmp/")]


def test_the_committed_layer_holds_only_the_change(built: Built) -> None:
    image = built.store.image(BUILT)
    base = built.store.image(BASE)
    assert image.diff_ids[:-1] == base.diff_ids
    assert image.inspect["Author"] == "tests"
    members = image.top_layer_members()
    names = set(members)
    assert {f"usr/share/doc/.wh.{name}" for name in built.base_docs} <= names
    assert f"{REPLACED}/.wh..wh..opq" in names
    assert members[f"{REPLACED}/99new"][1] == NEW_CONF.encode()
    assert not [n for n in names if n.startswith(f"{REPLACED}/") and
                n.removeprefix(f"{REPLACED}/") in built.replaced_before]
    hello, data = members["usr/bin/hello"]
    assert hello.isreg() and data is not None and data.startswith(b"\x7fELF")
    assert stat.S_IMODE(hello.mode) == 0o755
    assert stat.S_IMODE(members["etc/debian_version"][0].mode) == 0o600
    assert "var/lib/dpkg/status" in names
    # nothing the change did not touch: no base binaries, no libraries
    assert "usr/bin/bash" not in names and "usr/bin/dpkg" not in names
    assert not [n for n in names if n.startswith("usr/lib/")]
    assert len(names) < 300, len(names)

    # the same change committed again (now with zstd) is the same layer tar
    built.store.ok("commit", "--compression", "zstd", "builder", "debian:again")
    again = built.store.image("debian:again")
    assert again.top_layer[0] == image.top_layer[0]
    assert again.top_layer[2].endswith("+zstd")


def test_run_in_the_committed_image(built: Built) -> None:
    assert built.store.ok("run", "--rm", BUILT, PACKAGE) == "Hello, world!\n"
    out = built.store.ok("run", "--rm", BUILT, "dpkg-query", "-W", "-f", "${Status}", PACKAGE)
    assert out == "install ok installed"
    assert built.store.ok("run", "--rm", "-u", "nobody", BUILT, "id", "-un") == "nobody\n"


def test_the_saved_image_is_what_umoci_and_skopeo_read(built: Built) -> None:
    archive = built.work / "saved.tar"
    built.store.ok("save", "-o", str(archive), BUILT)
    layout = built.work / "layout"
    layout.mkdir()
    subprocess.run(["tar", "-C", str(layout), "-xf", str(archive)], check=True)
    image = built.store.image(BUILT)
    tag = BUILT.split(":")[1]

    rootfs = umoci_unpack(layout, tag, built.work / "bundle")
    problems = diff(snapshot(rootfs), snapshot(built.second))
    assert not problems, "\n".join(problems)

    as_oci = json.loads(skopeo("inspect", f"oci:{layout}:{tag}").stdout)
    assert as_oci["Digest"] == image.inspect["Manifest"]["Digest"]
    assert as_oci["Layers"] == [d["digest"] for d in image.manifest["layers"]]
    as_docker = json.loads(skopeo("inspect", f"docker-archive:{archive}").stdout)
    assert as_docker["Layers"] == image.diff_ids
