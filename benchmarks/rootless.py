"""`python -m benchmarks rootless`: the overlay suite's rows, run by a real unprivileged user
against layerfs-overlay and fuse-overlayfs, both mounted by that user.

The user is made for the run and removed after it (tests/rootless.py: its own uid, access to
/dev/fuse by an ACL entry where it lacks one, and to the layers, which the overlay suite
builds and caches, read-only; the lowers are copied for it). Each row mounts the same lowers
with a fresh upper; every command runs as the user (a FUSE mount without allow_other is closed
to everyone else, root included), root only drops the caches before a cold row. A warm row
runs its command once, untimed, on the same mount first. Times are the wall-clock time of the
user's command, or what the command measured itself (`benchmarks.ops`, where interpreter
start-up would drown the operation); daemon CPU comes from /proc/PID/stat. layerfs runs with
the fsync of copied-up data (its default) and, on the rows that copy data up, with `fsync=0`,
fuse-overlayfs's durability, which is the column its ratio compares there.

Left out of the overlay suite's rows: the kernel's overlayfs and the plain directory (a user
mounts an overlay only in a user namespace of its own, where these commands would not run as
the user outside), `chown -R` to another owner (a user may not give files away, through
either daemon) and the copy-ups on the loop-mounted xfs, btrfs and ext4 (root mounts those).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import statistics
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import mounts
from benchmarks.checkout import REPO, ensure_checkout
from benchmarks.layers import (
    BIG_FILE,
    DB_FILE,
    FULL,
    PYTHON,
    QUICK,
    RM_TREE,
    SPARSE_FILE,
    TREE,
    Layers,
    TreeSpec,
    ensure_layers,
    size_name,
    sized_file,
)
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
NO_FSYNC = "layerfs fsync=0"
PEER = "fuse-overlayfs"
CREATE_FILES = 10_000
COPY_UPS = 2_000
RANDOM_SEED = 6  # as the overlay suite's: the same offsets on every system and every run


@dataclass(frozen=True, slots=True)
class Row:
    """One row: a fresh mount by the user, then `script` as the user under bash ("$1" is the
    mountpoint; {python} the venv's interpreter, {ops} `python -m benchmarks.ops`, and the
    layers' paths and counts, see `_script`)."""

    key: str
    label: str
    script: str
    cold: bool = False  # caches dropped after the mount; else a sync, so no earlier writeback
    warm_up: str | None = None  # run first on the same mount, untimed (a warm row's first pass)
    self_timed: bool = False  # the script prints its own seconds last (benchmarks.ops)
    checkout: bool = False  # the git checkout is the one lower, not the main layers
    copies_data: bool = False  # layerfs fsyncs what it copies up: `fsync=0` runs too
    mount_time: bool = False  # the row is the mount command itself, from cold caches


def _twice(key: str, label: str, script: str, warm_label: str, *, self_timed: bool = False,
           checkout: bool = False) -> list[Row]:
    """A cold row and its warm twin: the same script, run again on a mount that ran it once."""
    return [Row(key + "_cold", label, script, cold=True, self_timed=self_timed,
                checkout=checkout),
            Row(key + "_warm", warm_label, script, warm_up=script, self_timed=self_timed,
                checkout=checkout)]


_TAR_TREE = 'tar -C "$1" -cf - tree | cat > /dev/null'
_PARALLEL = ('for list in {read_lists}; do (tar -C "$1/tree" --null --no-recursion -T "$list" '
             '-cf - | cat > /dev/null) & done; status=0; '
             'for job in $(jobs -p); do wait "$job" || status=1; done; exit $status')
_APPEND = (f'"{{python}}" -c \'import os, stat, sys\nleft = {COPY_UPS}\n'
           'for top, _, files in os.walk(sys.argv[1] + "/tree"):\n'
           '    for name in files:\n'
           '        path = os.path.join(top, name)\n'
           '        st = os.lstat(path)\n'
           '        if left and stat.S_ISREG(st.st_mode) and st.st_mode & 0o200 '
           'and st.st_size < 65536:\n'
           '            with open(path, "ab") as f: f.write(b"x")\n'
           '            left -= 1\' "$1"')
_CREATE = (f'"{{python}}" -c \'import os, sys\nd = sys.argv[1] + "/tree/bench-create"\n'
           f'os.mkdir(d)\nfor i in range({CREATE_FILES}):\n'
           f'    with open(f"{{{{d}}}}/f{{{{i}}}}", "wb") as f: f.write(b"x" * 100)\' "$1"')


def _first_write(key: str, label: str, path: str) -> Row:
    return Row(key, label, f'{{ops}} write-first-byte "$1/{path}"', warm_up=f'cat "$1/{path}" '
               "> /dev/null", self_timed=True, copies_data=True)


def rows(spec: TreeSpec) -> list[Row]:
    """Every row, in the overlay suite's order; the keys of the eight first rows are kept
    from before (walk, ls, read, create, untar, copy_up, chmod, rm)."""
    return [
        Row("mount", "mount (cold caches)", "true", mount_time=True),
        Row("walk", "cold `find` of the tree", 'find "$1/tree" > /dev/null', cold=True),
        Row("walk_warm", "warm `find`", 'find "$1/tree" > /dev/null',
            warm_up='find "$1/tree" > /dev/null'),
        Row("stat_warm", "stat {stat_paths} paths warm", '{ops} stat "$1" "{stat_list}"',
            self_timed=True),
        Row("stat_cold", "stat {stat_paths} paths cold", '{ops} stat-cold "$1" "{stat_list}"',
            cold=True, self_timed=True),
        Row("ls", "cold `ls -lR` of the tree", 'ls -lR "$1/tree" > /dev/null', cold=True),
        Row("ls_warm", "warm `ls -lR`", 'ls -lR "$1/tree" > /dev/null',
            warm_up='ls -lR "$1/tree" > /dev/null'),
        Row("read", "read every file cold (`tar`)", _TAR_TREE, cold=True),
        Row("read_warm", "read every file warm (`tar`)", _TAR_TREE, warm_up=_TAR_TREE),
        Row("read_parallel_cold", "{readers} readers at once, each walking and reading its "
            "quarter of the tree's files, cold (`tar`)", _PARALLEL, cold=True),
        *_twice("read_big", "read the {big_size} file cold (`dd`)",
                'dd if="$1/{big_file}" of=/dev/null bs=1M status=none',
                "read the {big_size} file warm (`dd`)"),
        *_twice("read_random", "{random_reads} random 4 KiB reads of the {big_size} file, "
                "cold", '{ops} random-read "$1/{big_file}" {random_reads} ' + str(RANDOM_SEED),
                "the same reads warm", self_timed=True),
        *_twice("python", "`python3 -c 'import email, json, http.client'`, the interpreter "
                "in the mount, cold", '"$1/{python_in_image}" -I -B -c '
                "'import email, json, http.client'", "the same start-up warm"),
        *_twice("git_status", "`git status` in a checkout of {checkout_files} files on a "
                "lower, cold", 'git -C "$1/{repo}" status --porcelain > /dev/null',
                "`git status` again, warm", checkout=True),
        *(_first_write(f"copy_up_{size_name(size).replace(' ', '')}",
                       f"first write to a {size_name(size)} file (copy-up)", sized_file(size))
          for size in spec.copy_up_sizes),
        _first_write("copy_up_big", "first write to the {big_size} file (copy-up)", BIG_FILE),
        _first_write("copy_up_sparse", "first write to the sparse {sparse_size} file",
                     SPARSE_FILE),
        Row("chmod_big", "chmod of the {big_size} file (a copy-up of its data: no metacopy in "
            "the `user.overlay.` format)", '{ops} chmod "$1/{big_file}" 600', self_timed=True,
            copies_data=True),
        Row("create", f"create {CREATE_FILES:,} files of 100 B", _CREATE),
        Row("create_fsync", "create, write, fsync {fsync_files} files of 100 B",
            '{ops} create "$1/tree/bench-fsync" {fsync_files} yes', self_timed=True),
        Row("untar", "untar 5,000 files", 'mkdir "$1/untar" && tar -C "$1/untar" -xf "{untar}"'),
        Row("copy_up", f"append a line to {COPY_UPS:,} small lower files (copy-up)", _APPEND,
            copies_data=True),
        Row("chmod", "`chmod -R` of the tree (copy-up of every file)", 'chmod -R u+w "$1/tree"',
            copies_data=True),
        Row("rm", "`rm -rf` of a lower tree", f'rm -rf "$1/{RM_TREE}"'),
        Row("sqlite", "SQLite: rewrite every row of the lower database (one transaction)",
            '{ops} sqlite-rewrite "$1/{db_file}"', self_timed=True, copies_data=True),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=None, help="runs of every row (default 3; "
                        "1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="the small layers, 1 run")
    parser.add_argument("--only", action="append", default=[], metavar="ROW",
                        help="only the rows whose key matches (shell patterns, repeatable): "
                        + ", ".join(row.key for row in rows(FULL)))
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
    selected = [row for row in rows(layers.spec)
                if not args.only or any(fnmatch.fnmatchcase(row.key, p) for p in args.only)]
    checkout = (ensure_checkout(args.cache, layers, layers.spec.checkout_files)
                if any(row.checkout for row in selected) else None)
    times: dict[str, dict[str, list[float]]] = {row.key: {} for row in selected}
    cpu: dict[str, dict[str, list[float]]] = {row.key: {} for row in selected}
    user = create_user("bench")
    try:
        user.grant_reach(layers.root, *layers.read_lists, layers.stat_list)
        lowers = _users_copy(user, layers.lowers, "lowers")
        checkout_lower = ""
        if checkout is not None:
            checkout_lower = _users_copy(user, checkout.lowers, "checkout")
            # The copy's files have inode numbers and change times of their own: the index
            # learns them once, here, or every `git status` would read all the files again.
            user.run(["git", "-C", f"{checkout_lower}/{REPO}", "update-index", "--refresh",
                      "-q"], timeout=600, check=False)
        scratch = user.work / "home" / "runs"
        user.mkdirs(scratch)
        spread_subdirs(scratch)
        for run_index in range(runs):
            for row in selected:
                systems = [name for name in SYSTEMS if name != NO_FSYNC or row.copies_data]
                if run_index % 2:
                    systems.reverse()
                for system in systems:
                    seconds, used = _measure(user, layers, scratch, system, row,
                                             checkout_lower if row.checkout else lowers)
                    times[row.key].setdefault(system, []).append(seconds)
                    if used is not None:
                        cpu[row.key].setdefault(system, []).append(used)
                    print(f"run {run_index + 1}/{runs} {row.key:20} {system:16} "
                          f"{seconds:9.4f} s", file=sys.stderr)
    finally:
        remove_user(user)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    text = _markdown(selected, times, cpu, runs, layers)
    (args.out / f"rootless-{stamp}.md").write_text(text)
    (args.out / f"rootless-{stamp}.json").write_text(json.dumps(
        {"runs": runs, "spec": layers.spec.name, "times": times, "daemon_cpu": cpu}, indent=1))
    print(text)
    return 0


def _users_copy(user: RootlessUser, lowers: tuple[Path, ...], into: str) -> str:
    """The lowers as the user's own (a user's daemon reads what the user may read: the
    suite's layers hold root's private files); the `lowerdir=` of the copy."""
    import subprocess

    copies = []
    for lower in lowers:
        copy = user.work / into / lower.name
        copy.parent.mkdir(exist_ok=True)
        subprocess.run(["cp", "-a", "--reflink=auto", str(lower), str(copy)], check=True)
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(copy)], check=True)
        copies.append(str(copy))
    return ":".join(copies)


def _script(row: Row, layers: Layers, text: str) -> str:
    from tests.rootless import VENV_BIN

    python = VENV_BIN / "python"
    return text.format(
        python=python, ops=f'"{python}" -m benchmarks.ops', untar=layers.untar_archive,
        stat_list=layers.stat_list, read_lists=" ".join(f'"{p}"' for p in layers.read_lists),
        big_file=BIG_FILE, db_file=DB_FILE, python_in_image=PYTHON, repo=REPO,
        random_reads=layers.spec.random_reads, fsync_files=layers.spec.fsync_count,
    )


def _measure(user: RootlessUser, layers: Layers, scratch: Path, system: str, row: Row,
             lowers: str) -> tuple[float, float | None]:
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
        if row.mount_time:
            drop_caches()
        start = time.perf_counter()
        user.run([*argv, str(mnt)])
        mount_seconds = time.perf_counter() - start
        stack.callback(lambda: user.run(["fusermount3", "-u", str(mnt)], check=False))
        if row.mount_time:
            return mount_seconds, None
        daemons = mounts.daemons_serving(mnt)
        run_env = {"PYTHONPATH": str(REPO_ROOT)}
        if row.warm_up is not None:
            user.run(["bash", "-o", "pipefail", "-c", _script(row, layers, row.warm_up),
                      "bench", str(mnt)], timeout=3600, env=run_env)
        if row.cold:
            drop_caches()
        else:
            sync()  # the last row's dirty pages (a copy of the whole tree) are not this one's
        before = mounts.cpu_seconds(daemons[0]) if daemons else None
        start = time.perf_counter()
        done = user.run(["bash", "-o", "pipefail", "-c", _script(row, layers, row.script),
                         "bench", str(mnt)], timeout=3600, env=run_env)
        seconds = time.perf_counter() - start
        after = mounts.cpu_seconds(daemons[0]) if daemons else None
        if row.self_timed:
            seconds = float(done.stdout.strip().splitlines()[-1])
        used = after - before if before is not None and after is not None else None
        return seconds, used


def _label(row: Row, layers: Layers) -> str:
    facts = layers.facts
    return row.label.format(
        stat_paths=f"{facts.get('stat_paths', layers.spec.stat_count):,}",
        readers=len(layers.read_lists), big_size=size_name(layers.spec.big_size),
        random_reads=f"{layers.spec.random_reads:,}", sparse_size=size_name(
            int(str(facts.get("sparse_bytes", 0)))), fsync_files=f"{layers.spec.fsync_count:,}",
        checkout_files=f"{layers.spec.checkout_files:,}",
    )


def _markdown(selected: list[Row], times: dict[str, dict[str, list[float]]],
              cpu: dict[str, dict[str, list[float]]], runs: int, layers: Layers) -> str:
    names = list(SYSTEMS)
    lines = [
        f"### Rootless overlay rows: layerfs-overlay and fuse-overlayfs mounted by an "
        f"unprivileged user ({layers.spec.name} layers, {TREE}/ of "
        f"{layers.facts.get('tree_entries', '?')} entries)",
        "",
        f"Median seconds of {runs} run(s), daemon CPU seconds in parentheses. The ratio is at "
        f"equal durability: {NO_FSYNC} / {PEER} on the rows that copy data up (where "
        f"layerfs fsyncs the copy by default and {PEER} does not), layerfs / {PEER} elsewhere "
        f"(— : not run; a row that copies nothing up is the same for both layerfs columns).",
        "",
        "| row | " + " | ".join(names) + " | ratio |",
        "| --- |" + " ---: |" * (len(names) + 1),
    ]
    behind = []
    for row in selected:
        cells = []
        for name in names:
            measured = times[row.key].get(name)
            if not measured:
                cells.append("—")
                continue
            used = cpu[row.key].get(name)
            cells.append(f"{statistics.median(measured):.4g}"
                         + (f" ({statistics.median(used):.2f})" if used else ""))
        ours = NO_FSYNC if times[row.key].get(NO_FSYNC) else "layerfs"
        ratio = statistics.median(times[row.key][ours]) / statistics.median(times[row.key][PEER])
        if ratio > 1:
            behind.append(row.key)
        lines.append(f"| {_label(row, layers)} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    lines += ["", f"Behind {PEER} on {len(behind)} of {len(selected)} rows"
              + (f": {', '.join(behind)}." if behind else ".")]
    return "\n".join(lines) + "\n"
