"""Mount table queries, unmounting, and stopping the FUSE daemons this benchmark started.

The rule this module enforces: the benchmark only ever unmounts mountpoints it created and only
ever signals processes it started. A FUSE daemon forks away from the command that mounted it, so it
is found by its command line, which names our mountpoint; that path is a fresh directory under our
run dir, so no other process can carry it. A daemon is signalled only while its start time still
matches the one recorded when it was found (a recycled pid is left alone).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import CommandError, run

UNMOUNT_DEADLINE = 15.0  # seconds of retrying a busy unmount before detaching lazily
DAEMON_EXIT_DEADLINE = 10.0  # seconds a daemon gets to exit on its own after its unmount
POLL_INTERVAL = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class MountEntry:
    mount_point: str
    fs_type: str
    source: str
    mount_options: str
    super_options: str

    def describe(self) -> str:
        return f"{self.fs_type} {self.source} {self.mount_options} {self.super_options}"


@dataclass(frozen=True, slots=True)
class Daemon:
    pid: int
    start_time: str  # field 22 of /proc/PID/stat, in clock ticks since boot


def mount_entries() -> list[MountEntry]:
    """Parse /proc/self/mountinfo (see proc(5)); mount points are unescaped (`\\040` → space)."""
    entries = []
    for line in Path("/proc/self/mountinfo").read_text(errors="surrogateescape").splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        entries.append(
            MountEntry(
                mount_point=_unescape(fields[4]),
                fs_type=tail[0],
                source=_unescape(tail[1]) if len(tail) > 1 else "",
                mount_options=fields[5],
                super_options=tail[2] if len(tail) > 2 else "",
            )
        )
    return entries


def entry_at(path: Path) -> MountEntry | None:
    """The topmost mount whose mount point is exactly `path`, or None."""
    matches = [entry for entry in mount_entries() if entry.mount_point == str(path)]
    return matches[-1] if matches else None


def mounts_under(directory: Path) -> list[MountEntry]:
    prefix = str(directory).rstrip("/") + "/"
    return [entry for entry in mount_entries() if entry.mount_point.startswith(prefix)]


def filesystem_of(path: Path) -> MountEntry:
    """The mount that holds `path`: the longest mount point that is a prefix of it."""
    resolved = str(path.resolve())
    candidates = [
        entry
        for entry in mount_entries()
        if resolved == entry.mount_point
        or resolved.startswith(entry.mount_point.rstrip("/") + "/")
    ]
    return max(candidates, key=lambda entry: len(entry.mount_point))


def wait_until_mounted(path: Path, deadline: float) -> MountEntry:
    """Poll the mount table until `path` is a mount point; raise CommandError at the deadline."""
    end = time.monotonic() + deadline
    while (entry := entry_at(path)) is None:
        if time.monotonic() > end:
            raise CommandError(f"{path}: not mounted {deadline:.0f} s after the mount command")
        time.sleep(POLL_INTERVAL)
    return entry


def unmount(path: Path, command: list[str], lazy_command: list[str]) -> None:
    """Unmount `path`, retrying while busy; detach lazily at the deadline rather than leave it.

    A lazy unmount is reported on stderr: it means something still held the mount.
    """
    end = time.monotonic() + UNMOUNT_DEADLINE
    error: CommandError | None = None
    while entry_at(path) is not None:
        if time.monotonic() > end:
            print(f"warning: {path}: still busy ({error}); detaching lazily", file=sys.stderr)
            run([*lazy_command, str(path)])
            return
        try:
            run([*command, str(path)], timeout=60)
        except CommandError as exc:
            error = exc
            time.sleep(0.2)


def daemons_serving(path: Path) -> list[Daemon]:
    """Processes other than us whose command line names `path` as an argument.

    Also where the arguments were written over the process's own as one string, joined by
    spaces (as layerfs's fork server shows a mount's command when it cannot point the
    kernel at new memory for them): our mountpoints have no spaces."""
    wanted = os.fsencode(str(path))
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            start_time = _start_time(int(proc.name))
        except OSError:
            continue  # exited while we looked
        words = argv if len(argv) > 2 else b" ".join(argv).split(b" ")
        if wanted in words and start_time is not None:
            found.append(Daemon(int(proc.name), start_time))
    return found


def stop_daemon(daemon: Daemon) -> None:
    """Wait for an unmounted daemon to exit; SIGTERM, then SIGKILL, only if it is still ours."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and _start_time(daemon.pid) == daemon.start_time:
            print(f"warning: daemon {daemon.pid} outlived its unmount; sending {sig.name}",
                  file=sys.stderr)
            os.kill(daemon.pid, sig)
        end = time.monotonic() + DAEMON_EXIT_DEADLINE
        while _start_time(daemon.pid) == daemon.start_time:
            if time.monotonic() > end:
                break
            time.sleep(POLL_INTERVAL)
        else:
            return
    raise CommandError(f"daemon {daemon.pid}: still running after SIGKILL")


def cpu_seconds(daemon: Daemon) -> float | None:
    """User plus system CPU time of the daemon's threads so far (the live ones and the ones
    that exited), from /proc/PID/stat in clock ticks; None once it is gone."""
    try:
        stat = Path(f"/proc/{daemon.pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[19] != daemon.start_time:
        return None  # another process has the pid now
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie has exited; only its parent's wait is missing
    return fields[19]


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape") if "\\" in field else field
