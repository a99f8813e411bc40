"""`python -m benchmarks syscalls`: the syscalls of each FUSE overlay daemon per operation.

Every daemon (layerfs-overlay, fuse-overlayfs) mounts the same small lower (`COUNT` files of
4 KiB in one directory) with a fresh upper. The daemon is traced with `strace -f -y` only around
the operations, done `COUNT` times by this process on distinct files: the first write to a lower
file (open O_WRONLY, pwrite 1 byte, close: a copy-up), the same first write to the one file of a
lower directory of its own (the copy-up of the directory, then of the file: what the first write
in a fresh container costs), the create of a new file (O_CREAT|O_EXCL, write 100 bytes, close),
a chmod of a lower file and an unlink of one (a whiteout). Lookups are done before the trace
starts (every file is stat'ed), and so is the copy-up of the files' directory (one file is
copied up untraced), so that the counts are what each operation costs on its own, as in a
long-lived mount.

Each traced syscall falls in one of four classes: a request read from /dev/fuse, a reply written
to it, waiting (poll, futex, a read that found nothing: of /dev/fuse the spin before sleeping,
of the wakeup pipe the end of a sleep) and work: everything else, the syscalls that do the
operation. The table gives requests and work
per operation, and the work by syscall.

The daemon is started without the fork server (`LAYERFS_FORKSERVER=0`) so that its command line
names the mountpoint and it can be found by it; what a request costs does not depend on that.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import mounts
from benchmarks.procs import CommandError, run
from benchmarks.systems import DEFAULT_LAYERFS

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator

DEFAULT_COUNT = 200
FILE_SIZE = 4096
ATTACH_DEADLINE = 10.0  # seconds for strace to attach to every thread of the daemon
SETTLE_SECONDS = 0.3  # RELEASE of a closed file reaches the daemon after close(2) returns
OPS = ("copy_up", "copy_up_dir", "create", "chmod", "unlink")
OP_LABELS = {
    "copy_up": "first write to a 4 KiB lower file (copy-up)",
    "copy_up_dir": "the same, of the only file of a lower dir (copy-up of the dir and the file)",
    "create": "create a 100-byte file",
    "chmod": "chmod of a 4 KiB lower file",
    "unlink": "unlink of a lower file (whiteout)",
}
WAITING = frozenset({"poll", "ppoll", "epoll_wait", "epoll_pwait", "futex", "select",
                     "pselect6", "nanosleep", "clock_nanosleep", "sched_yield", "restart_syscall"})
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path("/var/tmp/layerfs-bench")

# `PID name(args...` or `PID <... name resumed>...`, as strace -f writes them to -o
_LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")
_FUSE_FD = re.compile(r"^\d+\s+\w+\(\d+</dev/fuse>")


@dataclass(slots=True)
class Counts:
    requests: int = 0
    replies: int = 0
    waiting: int = 0
    work: collections.Counter[str] = field(default_factory=collections.Counter)

    def per_op(self, count: int) -> dict[str, object]:
        return {
            "requests": self.requests / count,
            "replies": self.replies / count,
            "waiting": self.waiting / count,
            "work": sum(self.work.values()) / count,
            "work_by_syscall": {name: calls / count
                                for name, calls in sorted(self.work.items())},
        }


def parse_trace(lines: Iterator[str]) -> Counts:
    """Classify the calls of an `strace -f -y -o` trace (see the module docstring)."""
    counts = Counts()
    pending: dict[str, tuple[str, bool]] = {}  # pid -> (syscall, on /dev/fuse) left unfinished
    for line in lines:
        match = _LINE.match(line)
        if match is None:
            continue  # signals, exits
        pid, _resumed, started = match.groups()
        if started is not None:
            on_fuse = _FUSE_FD.match(line) is not None
            if line.rstrip().endswith("<unfinished ...>"):
                pending[pid] = (started, on_fuse)
                continue
            _count(counts, started, on_fuse, line)
        elif pid in pending:
            name, on_fuse = pending.pop(pid)
            _count(counts, name, on_fuse, line)
    return counts


def _count(counts: Counts, name: str, on_fuse: bool, line: str) -> None:
    if name in WAITING or (name in ("read", "readv") and "EAGAIN" in line):
        # a read that found nothing did no work: of /dev/fuse, the spin before sleeping; of
        # the session's wakeup pipe, the end of a sleep (how many there are is timing)
        counts.waiting += 1
    elif on_fuse and name in ("read", "readv"):
        if "EAGAIN" in line or "ENOENT" in line:  # nothing there, or an interrupted request
            counts.waiting += 1
        else:
            counts.requests += 1
    elif on_fuse and name in ("write", "writev"):
        counts.replies += 1
    else:
        counts.work[name] += 1


@dataclass(frozen=True, slots=True)
class Daemon:
    name: str
    argv: tuple[str, ...]  # the mount command, without the mountpoint

    def mount(self, stack: ExitStack, lower: Path, scratch: Path) -> tuple[Path, int]:
        upper, work, mountpoint = scratch / "upper", scratch / "work", scratch / "mnt"
        for directory in (upper, work, mountpoint):
            directory.mkdir()
        options = f"lowerdir={lower},upperdir={upper},workdir={work}"
        stack.callback(_unmount, mountpoint)
        env = {**os.environ, "LAYERFS_FORKSERVER": "0"}
        subprocess.run([*self.argv, "-o", options, str(mountpoint)], check=True, env=env,
                       stdin=subprocess.DEVNULL, timeout=60, cwd="/")
        mounts.wait_until_mounted(mountpoint, 60)
        found = mounts.daemons_serving(mountpoint)
        if len(found) != 1:
            raise CommandError(f"{self.name}: {len(found)} daemons name {mountpoint}, not one")
        return mountpoint, found[0].pid


def _unmount(mountpoint: Path) -> None:
    daemons = mounts.daemons_serving(mountpoint)
    mounts.unmount(mountpoint, ["fusermount3", "-u"], ["fusermount3", "-u", "-z"])
    for daemon in daemons:
        mounts.stop_daemon(daemon)


def _prepare(mnt: Path, count: int) -> None:
    """Untraced: look up every file, copy up their directory, and make the dir for creates."""
    for i in range(count):
        os.lstat(mnt / "files" / f"f{i:04d}")
        os.lstat(mnt / "dirs" / f"d{i:04d}" / "f")
    os.close(os.open(mnt / "files" / "warm", os.O_WRONLY))
    (mnt / "files" / "new").mkdir()


def _operation(op: str, mnt: Path, count: int) -> Callable[[], None]:
    """The traced part: `op` done `count` times, each on a file of its own."""
    files = [mnt / "files" / f"f{i:04d}" for i in range(count)]

    def first_writes(paths: list[Path]) -> None:
        for path in paths:
            fd = os.open(path, os.O_WRONLY)
            os.pwrite(fd, b"x", 0)
            os.close(fd)

    def copy_up() -> None:
        first_writes(files)

    def copy_up_dir() -> None:
        first_writes([mnt / "dirs" / f"d{i:04d}" / "f" for i in range(count)])

    def create() -> None:
        for i in range(count):
            fd = os.open(mnt / "files" / "new" / f"n{i:04d}",
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, b"x" * 99 + b"\n")
            os.close(fd)

    def chmod() -> None:
        for path in files:
            os.chmod(path, 0o600)

    def unlink() -> None:
        for path in files:
            os.unlink(path)

    return {"copy_up": copy_up, "copy_up_dir": copy_up_dir, "create": create, "chmod": chmod,
            "unlink": unlink}[op]


def _trace(pid: int, out: Path, operation: Callable[[], None]) -> None:
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-y", "-o", str(out), "-p", str(pid)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    try:
        _wait_attached(pid, tracer)
        operation()
        time.sleep(SETTLE_SECONDS)
    finally:
        tracer.send_signal(signal.SIGINT)
        _stdout, stderr = tracer.communicate(timeout=30)
    if tracer.returncode not in (0, -signal.SIGINT):
        raise CommandError(f"strace: exit {tracer.returncode}: {stderr.decode().strip()}")


def _wait_attached(pid: int, tracer: subprocess.Popen[bytes]) -> None:
    """Until every thread of `pid` has a tracer (strace attaches to them one by one)."""
    deadline = time.monotonic() + ATTACH_DEADLINE
    while True:
        if tracer.poll() is not None:
            raise CommandError(f"strace: exited ({tracer.returncode}) before attaching to {pid}")
        tids = os.listdir(f"/proc/{pid}/task")
        if all(_tracer_of(pid, tid) not in (None, 0) for tid in tids):
            return
        if time.monotonic() > deadline:
            raise CommandError(f"strace: not attached to every thread of {pid}")
        time.sleep(0.01)


def _tracer_of(pid: int, tid: str) -> int | None:
    try:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return None


def _make_lower(lower: Path, count: int) -> None:
    files = lower / "files"
    files.mkdir(parents=True)
    for name in [f"f{i:04d}" for i in range(count)] + ["warm"]:
        (files / name).write_bytes(os.urandom(FILE_SIZE))
    for i in range(count):
        directory = lower / "dirs" / f"d{i:04d}"
        directory.mkdir(parents=True)
        (directory / "f").write_bytes(os.urandom(FILE_SIZE))


def measure(daemons: list[Daemon], count: int, scratch_root: Path) -> dict[str, dict[str, object]]:
    """Counts per op for each daemon: {daemon: {op: Counts.per_op}}."""
    lower = scratch_root / "lower"
    _make_lower(lower, count)
    results: dict[str, dict[str, object]] = {}
    for daemon in daemons:
        per_op: dict[str, object] = {}
        for op in OPS:
            scratch = scratch_root / f"{daemon.name}-{op}"
            scratch.mkdir()
            with ExitStack() as stack:
                mnt, pid = daemon.mount(stack, lower, scratch)
                _prepare(mnt, count)
                trace = scratch / "trace"
                _trace(pid, trace, _operation(op, mnt, count))
                with trace.open() as lines:
                    per_op[op] = parse_trace(lines).per_op(count)
        results[daemon.name] = per_op
    return results


def render(results: dict[str, dict[str, object]], count: int) -> str:
    names = list(results)
    lines = [f"Per operation, averaged over {count} operations on distinct files (strace -f of "
             "the daemon; the kernel's overlayfs does its work without syscalls).", "",
             "| operation | " + " | ".join(f"{n}: requests | {n}: work syscalls" for n in names)
             + " |", "| --- |" + " ---: | ---: |" * len(names)]
    for op in OPS:
        cells = []
        for name in names:
            counts = results[name][op]
            assert isinstance(counts, dict)
            cells += [f"{counts['requests']:.1f}", f"{counts['work']:.1f}"]
        lines.append(f"| {OP_LABELS[op]} | " + " | ".join(cells) + " |")
    lines += ["", "Work syscalls by name, per operation:", ""]
    for op in OPS:
        for name in names:
            counts = results[name][op]
            assert isinstance(counts, dict)
            by_name = counts["work_by_syscall"]
            assert isinstance(by_name, dict)
            listed = ", ".join(f"{syscall} {calls:g}" for syscall, calls
                               in sorted(by_name.items(), key=lambda item: -item[1])
                               if calls >= 0.05)
            lines.append(f"- {op}, {name}: {listed or 'none'}")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help=f"operations per kind (default {DEFAULT_COUNT})")
    parser.add_argument("--layerfs", type=Path, default=DEFAULT_LAYERFS,
                        help=f"layerfs-overlay program (default {DEFAULT_LAYERFS})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for the JSON and markdown results")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where the lower and the mounts go ({DEFAULT_CACHE})")


def main(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("syscalls: run as root (it mounts and traces the daemons)", file=sys.stderr)
        return 2
    for tool in ("strace", "fusermount3", "fuse-overlayfs"):
        if shutil.which(tool) is None:
            print(f"syscalls: {tool} not found (apt-get install {tool.rstrip('3')})",
                  file=sys.stderr)
            return 2
    daemons = [Daemon("layerfs", (str(args.layerfs),)), Daemon("fuse-overlayfs",
                                                                 ("fuse-overlayfs",))]
    args.cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="syscalls-", dir=args.cache) as scratch_root:
        results = measure(daemons, args.count, Path(scratch_root))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    table = render(results, args.count)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"syscalls-{stamp}.md").write_text(f"# Syscalls per operation\n\n{table}")
    facts = {"count": args.count, "kernel": os.uname().release,
             "layerfs": run([str(args.layerfs), "--version"], capture=True).strip(),
             "fuse-overlayfs": run(["fuse-overlayfs", "--version"], capture=True).strip(),
             "results": results}
    (args.out / f"syscalls-{stamp}.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(table)
    print(f"written: {args.out}/syscalls-{stamp}.md, .json")
    return 0
