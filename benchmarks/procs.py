"""Running commands and dropping caches: the one place the benchmark starts a child process.

Every child runs with a timeout, stdin closed and its working directory at `/`, so that no child
ever holds a mountpoint busy. A timed command is measured with `perf_counter` around the child's
whole life: every system pays the same fork/exec cost, which is small next to what is measured.
Children that run Python (`benchmarks.ops`) time themselves and print the seconds instead, because
interpreter start-up (~30 ms) would drown the fast operations.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from contextlib import ExitStack

REPO_ROOT = Path(__file__).resolve().parent.parent

# A slow Python FUSE daemon may take minutes on the big workloads; an hour means it hangs.
COMMAND_TIMEOUT = 3600.0


class CommandError(RuntimeError):
    """A child exited non-zero or timed out; the message names the command and its stderr tail."""


def run(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT, capture: bool = False) -> str:
    """Run `argv` to completion and return its stdout (empty unless `capture`).

    Raises CommandError on a non-zero exit or a timeout (the child is killed first).
    """
    try:
        completed = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout,
            check=False,
            cwd="/",
            env=_child_env(),
        )
    except subprocess.TimeoutExpired as exc:
        message = f"{argv[0]}: timed out after {timeout:.0f} s: {_describe(argv)}"
        raise CommandError(message) from exc
    if completed.returncode != 0:
        stderr = completed.stderr.decode(errors="replace").strip()[-600:]
        raise CommandError(
            f"{argv[0]}: exit {completed.returncode}: {_describe(argv)}: {stderr or 'no stderr'}"
        )
    return completed.stdout.decode(errors="replace") if capture else ""


def timed(argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT) -> float:
    """Run `argv` and return its wall-clock duration in seconds."""
    start = time.perf_counter()
    run(argv, timeout=timeout)
    return time.perf_counter() - start


def timed_shell(script: str, *args: str) -> float:
    """Time a bash pipeline; `pipefail` so that a failing first stage is not hidden by `cat`."""
    return timed(["bash", "-o", "pipefail", "-c", script, "bench", *args])


def run_op(op: str, *args: str) -> float:
    """Run `python -m benchmarks.ops OP ARGS` and return the seconds it measured itself."""
    output = run([sys.executable, "-m", "benchmarks.ops", op, *args], capture=True)
    return float(output.strip().splitlines()[-1])


def sync() -> None:
    """Flush dirty pages so that writeback of an earlier step does not land inside a timing."""
    os.sync()


def drop_caches() -> None:
    """Make the next access cold: write back, then drop the page cache, dentries and inodes.

    On a FUSE mount, dropping dentries and inodes also sends FORGETs, so the daemon's kernel-side
    caches go too (its own in-process caches do not; that is why cold runs also mount afresh).
    """
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _child_env() -> dict[str, str]:
    # `python -m benchmarks.ops` runs with cwd=/ and must still find this package.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["LC_ALL"] = "C"
    return env


def _describe(argv: Sequence[str]) -> str:
    text = " ".join(argv)
    return text if len(text) <= 300 else text[:297] + "..."


def own_forkserver(stack: ExitStack, run_dir: Path, warm_up: Sequence[str] | None = None,
                   unmount: Sequence[str] | None = None) -> Path:
    """Give this run a layerfs fork server of its own (`layerfs mount` and `layerfs-overlay`
    hand themselves to one), stopped when `stack` closes; its runtime dir.

    `warm_up` (a mount command) and `unmount` start the server before anything is timed, so
    that no timed mount pays for starting it; the server is up once its socket is there."""
    from layerfs.cli import forkserver_client

    runtime = run_dir / "runtime"
    runtime.mkdir(mode=0o700)
    os.environ["LAYERFS_RUNTIME_DIR"] = str(runtime)
    stack.callback(forkserver_client.stop_servers, str(runtime))
    if warm_up is not None and unmount is not None:
        run(warm_up)
        run(unmount)
        wait_for_forkserver(runtime)
    return runtime


def wait_for_forkserver(runtime: Path, timeout: float = 30.0) -> None:
    """A warm-up mount started the run's fork server: wait until it listens (its socket's
    name depends on the children's environment, which `_child_env` changes: any will do)."""
    deadline = time.monotonic() + timeout
    while not any(runtime.glob("forkserver-*.sock")):
        if time.monotonic() > deadline:
            raise CommandError(f"{runtime}: no fork server after a warm-up mount")
        time.sleep(0.01)
