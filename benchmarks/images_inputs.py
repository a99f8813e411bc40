"""The images benchmark's input: a Debian root tarball, an OCI layout of it and the change lists.

Owns `CACHE/images-v<N>/`, built once and reused:

    oci/               OCI layout made from the tarball by umoci (init, new, unpack, untar into
                       the rootfs, repack, gc): one gzip layer, tagged `bench`. The peers'
                       input, and the source of `layerfs load` and of the registry push
    changes-N.tsv      the commit workload's changes (see `benchmarks.images_ops`): N/2 appends
                       to existing regular files spread evenly over the sorted paths, N/2 new
                       100-byte files in dirs of 100 under usr/local/share/layerfs-bench/
    READY              JSON facts about the build; written last, so that a cut-short build is
                       rebuilt; it names the tarball's size and mtime, and a changed tarball
                       means a rebuild

The tarball lives outside the cache (`--tarball`, by default the test suite's
`/var/tmp/layerfs-test-cache/debian-bookworm.tar`); when missing it is built with
`mmdebstrap --variant=minbase bookworm` (needs the network, 20-30 s) beside its final name and
renamed into place.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import run

LAYOUT_VERSION = 1
DEFAULT_TARBALL = Path("/var/tmp/layerfs-test-cache/debian-bookworm.tar")
TAG = "bench"  # the tag of the one image in the OCI layout
IMAGE = "debian:bench"  # its name in layerfs stores
ONE_FILE = "etc/debian_version"  # the one file changed by the small commit
CREATE_DIR = "usr/local/share/layerfs-bench"
FILES_PER_DIR = 100
BUILD_TIMEOUT = 1800.0


@dataclass(frozen=True, slots=True)
class Inputs:
    tarball: Path
    layout: Path  # OCI layout dir; its image is `layout:TAG`
    changes: Path  # the big change list
    one_change: Path  # the one-file change list
    facts: dict[str, object]

    @property
    def image(self) -> str:
        """The layout's image as umoci and skopeo name it: `DIR:TAG`."""
        return f"{self.layout}:{TAG}"


def ensure_inputs(cache_dir: Path, tarball: Path, change_count: int) -> Inputs:
    """Return the cached inputs, building the tarball, the layout and the change list as needed."""
    if not tarball.exists():
        build_tarball(tarball)
    root = cache_dir / f"images-v{LAYOUT_VERSION}"
    stat = tarball.stat()
    key = {"tarball": str(tarball), "bytes": stat.st_size, "mtime": int(stat.st_mtime)}
    ready = root / "READY"
    if not ready.exists() or json.loads(ready.read_text()).get("tarball_key") != key:
        _build(root, tarball, key)
    facts = json.loads(ready.read_text())
    changes = root / f"changes-{change_count}.tsv"
    if not changes.exists():
        _write_changes(tarball, changes, change_count)
    one_change = root / "changes-1.tsv"
    if not one_change.exists():
        one_change.write_text(f"A\t{ONE_FILE}\n")
    facts["change_files"] = change_count
    facts["change_appends"] = sum(1 for line in changes.read_text().splitlines()
                                  if line.startswith("A\t"))
    facts["change_appended_bytes"] = _appended_bytes(tarball, changes)
    return Inputs(tarball, root / "oci", changes, one_change, facts)


def build_tarball(tarball: Path) -> None:
    print(f"building {tarball} with mmdebstrap (once; needs the network)...", flush=True)
    partial = tarball.with_name(tarball.stem + ".tmp.tar")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    run(["mmdebstrap", "--variant=minbase", "bookworm", str(partial)], timeout=BUILD_TIMEOUT)
    partial.rename(tarball)


def _build(root: Path, tarball: Path, key: dict[str, object]) -> None:
    """Make the OCI layout the way an umoci user would, from the same tarball layerfs imports."""
    partial = root.with_name(root.name + ".partial")
    for stale in (partial, root):
        if stale.exists():
            shutil.rmtree(stale)
    started = time.perf_counter()
    print(f"building the OCI layout in {root} (once; cached for later runs)...", flush=True)
    layout, bundle = partial / "oci", partial / "bundle"
    partial.mkdir(parents=True)
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:{TAG}"])
    run(["umoci", "unpack", "--image", f"{layout}:{TAG}", str(bundle)])
    run(["tar", "-C", str(bundle / "rootfs"), "--xattrs", "--xattrs-include=*", "--numeric-owner",
         "-xpf", str(tarball)], timeout=BUILD_TIMEOUT)
    run(["umoci", "repack", "--image", f"{layout}:{TAG}", str(bundle)], timeout=BUILD_TIMEOUT)
    run(["umoci", "gc", "--layout", str(layout)])
    run(["rm", "-rf", "--one-file-system", str(bundle)])
    entries, files = _count_members(tarball)
    blobs = sorted((layout / "blobs" / "sha256").iterdir(), key=lambda blob: blob.stat().st_size)
    facts = {
        "tarball_key": key,
        "tarball": str(tarball),
        "tarball_bytes": tarball.stat().st_size,
        "tarball_entries": entries,
        "tarball_regular_files": files,
        "layer_blob_bytes": blobs[-1].stat().st_size,
        "layer_blob_digest": f"sha256:{blobs[-1].name}",
        "index": json.loads((layout / "index.json").read_text()),
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    (partial / "READY").write_text(json.dumps(facts, indent=2) + "\n")
    run(["sync"])
    partial.rename(root)
    print(f"OCI layout built in {facts['build_seconds']} s", flush=True)


def _regular_files(tarball: Path) -> dict[str, int]:
    """Regular files of the tarball (no hard links), by normalized path, with their sizes."""
    found = {}
    with tarfile.open(tarball) as archive:
        for member in archive:
            name = member.name.removeprefix("./")
            if member.isreg() and "\n" not in name and "\t" not in name:
                found[name] = member.size
    return found


def _count_members(tarball: Path) -> tuple[int, int]:
    with tarfile.open(tarball) as archive:
        members = archive.getmembers()
    return len(members), sum(1 for member in members if member.isreg())


def _write_changes(tarball: Path, destination: Path, count: int) -> None:
    """Half appends to existing files, spread evenly over the sorted paths; half new files."""
    paths = sorted(_regular_files(tarball))
    appends = min(count // 2, len(paths))
    lines = [f"A\t{paths[index * len(paths) // appends]}" for index in range(appends)]
    creates = count - appends
    lines += [f"C\t{CREATE_DIR}/d{index // FILES_PER_DIR:03d}/f{index % FILES_PER_DIR:03d}"
              for index in range(creates)]
    partial = destination.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.rename(destination)


def _appended_bytes(tarball: Path, changes: Path) -> int:
    """How much data the appended files hold: every append copies its whole file up."""
    sizes = _regular_files(tarball)
    return sum(sizes[line[2:]] for line in changes.read_text().splitlines()
               if line.startswith("A\t"))
