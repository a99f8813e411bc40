"""`python -m benchmarks rootless`: the overlay workloads that users feel, run by a real
unprivileged user against layerfs-overlay and fuse-overlayfs, both mounted by that user.

The user is made for the run and removed after it (tests/rootless.py: its own uid, access to
/dev/fuse by an ACL entry where it lacks one, and to the layers, which the overlay suite
builds and caches, read-only). Each system mounts the same lowers with a fresh upper for
every group; every command runs as the user (a FUSE mount without allow_other is closed to
everyone else, root included), root only drops the caches before a cold row. Times are the
wall-clock time of the user's command; daemon CPU comes from /proc/PID/stat. layerfs runs
with the fsync of copied-up data (its default) and with `fsync=0`, fuse-overlayfs's
durability, which is the column its ratio compares.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import mounts
from benchmarks.layers import FULL, QUICK, RM_TREE, TREE, Layers, ensure_layers
from benchmarks.overlay import DEFAULT_CACHE, DEFAULT_OUT, spread_subdirs
from benchmarks.procs import REPO_ROOT, drop_caches, sync

if TYPE_CHECKING:
    import argparse

    from tests.rootless import RootlessUser

SYSTEMS = {
    "layerfs": ["{venv}/layerfs-overlay", "-o", "{options}"],
    "layerfs fsync=0": ["{venv}/layerfs-overlay", "-o", "{options},fsync=0"],
    "fuse-overlayfs": ["fuse-overlayfs", "-o", "{options}"],
}
COMPARED = ("layerfs fsync=0", "fuse-overlayfs")
CREATE_FILES = 10_000
COPY_UPS = 2_000

# (key, label, cold, script): scripts run as the user under bash, "$1" is the mountpoint.
ROWS = (
    ("walk", "cold `find` of the tree", True, 'find "$1/tree" > /dev/null'),
    ("ls", "cold `ls -lR` of the tree", True, 'ls -lR "$1/tree" > /dev/null'),
    ("read", "read every file cold (`tar`)", True, 'tar -C "$1" -cf - tree | cat > /dev/null'),
    ("create", f"create {CREATE_FILES:,} files of 100 B", False,
     f'"{{python}}" -c \'import os, sys\nd = sys.argv[1] + "/tree/bench-create"\n'
     f'os.mkdir(d)\nfor i in range({CREATE_FILES}):\n'
     f'    with open(f"{{{{d}}}}/f{{{{i}}}}", "wb") as f: f.write(b"x" * 100)\' "$1"'),
    ("untar", "untar 5,000 files", False, 'mkdir "$1/untar" && tar -C "$1/untar" -xf "{untar}"'),
    ("copy_up", f"append a line to {COPY_UPS:,} small lower files (copy-up)", False,
     f'"{{python}}" -c \'import os, stat, sys\nleft = {COPY_UPS}\n'
     'for top, _, files in os.walk(sys.argv[1] + "/tree"):\n'
     '    for name in files:\n'
     '        path = os.path.join(top, name)\n'
     '        st = os.lstat(path)\n'
     '        if left and stat.S_ISREG(st.st_mode) and st.st_mode & 0o200 '
     'and st.st_size < 65536:\n'
     '            with open(path, "ab") as f: f.write(b"x")\n'
     '            left -= 1\' "$1"'),
    ("chmod", "`chmod -R` of the tree (metadata copy-up)", False, 'chmod -R u+w "$1/tree"'),
    ("rm", "`rm -rf` of a lower tree", False, f'rm -rf "$1/{RM_TREE}"'),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=None, help="runs of every row (default 3; "
                        "1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the small layers, 1 run")
    parser.add_argument("--only", action="append", default=[], metavar="ROW",
                        help=f"only these rows: {', '.join(key for key, *_ in ROWS)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)


def main(args: argparse.Namespace) -> int:
    import os

    if os.geteuid() != 0:
        print("benchmarks rootless: run as root (it makes the unprivileged user)",
              file=sys.stderr)
        return 2
    if shutil.which("fuse-overlayfs") is None:
        print("benchmarks rootless: fuse-overlayfs is not installed", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_ROOT))
    from tests.rootless import create_user, remove_user

    runs = args.runs or (1 if args.quick else 3)
    layers = ensure_layers(args.cache, QUICK if args.quick else FULL)
    rows = [row for row in ROWS if not args.only or row[0] in args.only]
    user = create_user("bench")
    times: dict[str, dict[str, list[float]]] = {row[0]: {s: [] for s in SYSTEMS} for row in rows}
    cpu: dict[str, dict[str, list[float]]] = {row[0]: {s: [] for s in SYSTEMS} for row in rows}
    try:
        user.grant_reach(layers.root)
        lowers = _users_copy(user, layers)
        scratch = user.work / "home" / "runs"
        user.mkdirs(scratch)
        spread_subdirs(scratch)
        for run_index in range(runs):
            order = list(SYSTEMS) if run_index % 2 == 0 else list(reversed(SYSTEMS))
            for key, _label, cold, script in rows:
                for system in order:
                    seconds, used = _measure(user, layers, lowers, scratch, system, cold,
                                             script)
                    times[key][system].append(seconds)
                    if used is not None:
                        cpu[key][system].append(used)
                    print(f"run {run_index + 1}/{runs} {key:8} {system:16} {seconds:8.3f} s",
                          file=sys.stderr)
    finally:
        remove_user(user)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    text = _markdown(rows, times, cpu, runs, layers)
    (args.out / f"rootless-{stamp}.md").write_text(text)
    (args.out / f"rootless-{stamp}.json").write_text(json.dumps(
        {"runs": runs, "spec": layers.spec.name, "times": times, "daemon_cpu": cpu}, indent=1))
    print(text)
    return 0


def _users_copy(user: RootlessUser, layers: Layers) -> str:
    """The lowers as the user's own (a user's daemon reads what the user may read: the
    suite's layers hold root's private files); the `lowerdir=` of the copy."""
    import subprocess

    copies = []
    for lower in layers.lowers:
        copy = user.work / "lowers" / lower.name
        copy.parent.mkdir(exist_ok=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(lower), str(copy)], check=True)
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(copy)], check=True)
        copies.append(str(copy))
    return ":".join(copies)


def _measure(user: RootlessUser, layers: Layers, lowers: str, scratch: Path, system: str,
             cold: bool, script: str) -> tuple[float, float | None]:
    """One row on a fresh mount of `system` by the user: seconds, and the daemon's CPU.

    The row's upper stays until the user is removed at the end: deleting it at once would
    make the next system's creates pay for the inodes it freed (see `spread_subdirs`)."""
    from tests.rootless import VENV_BIN

    with ExitStack() as stack:
        base = scratch / f"bench-{time.monotonic_ns()}"
        upper, work, mnt = base / "upper", base / "work", base / "mnt"
        user.mkdirs(base, upper, work, mnt)
        options = f"lowerdir={lowers},upperdir={upper},workdir={work}"
        argv = [part.format(venv=VENV_BIN, options=options) for part in SYSTEMS[system]]
        user.run([*argv, str(mnt)])
        stack.callback(lambda: user.run(["fusermount3", "-u", str(mnt)], check=False))
        daemons = mounts.daemons_serving(mnt)
        if cold:
            drop_caches()
        else:
            sync()  # the last row's dirty pages (a copy of the whole tree) are not this one's
        body = script.format(python=VENV_BIN / "python", untar=layers.untar_archive)
        before = mounts.cpu_seconds(daemons[0]) if daemons else None
        start = time.perf_counter()
        user.run(["bash", "-o", "pipefail", "-c", body, "bench", str(mnt)], timeout=3600)
        seconds = time.perf_counter() - start
        after = mounts.cpu_seconds(daemons[0]) if daemons else None
        used = after - before if before is not None and after is not None else None
        return seconds, used


def _markdown(rows: list[tuple[str, str, bool, str]], times: dict[str, dict[str, list[float]]],
              cpu: dict[str, dict[str, list[float]]], runs: int, layers: Layers) -> str:
    names = list(SYSTEMS)
    lines = [
        f"### Rootless overlay rows: layerfs-overlay and fuse-overlayfs mounted by an "
        f"unprivileged user ({layers.spec.name} layers, {TREE}/ of "
        f"{layers.facts.get('tree_entries', '?')} entries)",
        "",
        f"Median seconds of {runs} run(s), daemon CPU seconds in parentheses; the ratio is "
        f"{COMPARED[0]} / {COMPARED[1]} (equal durability).",
        "",
        "| row | " + " | ".join(names) + " | ratio |",
        "| --- |" + " ---: |" * (len(names) + 1),
    ]
    for key, label, _cold, _script in rows:
        cells = []
        for name in names:
            median = statistics.median(times[key][name])
            used = cpu[key][name]
            cells.append(f"{median:.3f}" + (f" ({statistics.median(used):.2f})" if used else ""))
        ratio = (statistics.median(times[key][COMPARED[0]])
                 / statistics.median(times[key][COMPARED[1]]))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines) + "\n"
