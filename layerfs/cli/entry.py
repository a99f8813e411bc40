"""The `layerfs` and `layerfs-overlay` programs: a mount goes to the fork server when one is
up; everything else, and a mount the server declines, runs in this process (see
`forkserver_client`).

Only a plain background mount is handed over: it is the command whose latency is a target
(under 100 ms, as the start of a container), it needs no terminal, and it ends as soon as the
mount answers. `--foreground`, `--help` or `--debug` run here.
"""

from __future__ import annotations

import os
import sys

from layerfs.cli import forkserver_client


def handed_over(args: list[str]) -> bool:
    """True for `[--root DIR] mount [--name NAME] SOURCE MOUNTPOINT`."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] == "--root":
            i += 2
        elif args[i].startswith("--root="):
            i += 1
        else:
            return False
    if args[i:i + 1] != ["mount"]:
        return False
    rest = args[i + 1:]
    j = 0
    while j < len(rest):
        if rest[j] == "--name":
            j += 2
        elif rest[j].startswith("-") and not rest[j].startswith("--name="):
            return False
        else:
            j += 1
    return True


def main() -> None:
    """`layerfs`"""
    if forkserver_client.enabled() and handed_over(sys.argv[1:]):
        _hand_over("layerfs")
    from layerfs.cli.main import main as run_here

    run_here()


def overlay_main() -> None:
    """`layerfs-overlay`: every call but a foreground one (`-f`) or a request for help."""
    if forkserver_client.enabled() and not set(sys.argv[1:]) & _OVERLAY_HERE:
        _hand_over("layerfs-overlay")
    from layerfs.cli import overlay_main as run_here

    sys.exit(run_here.main())


_OVERLAY_HERE = {"-f", "-d", "-h", "--help", "-V", "--version"}


def _hand_over(program: str) -> None:
    """Exit with the status of `program` run by the fork server; return if it cannot run it
    (then it starts one, unless one is up and declined)."""
    try:
        code = forkserver_client.call(program, sys.argv)
    except forkserver_client.Declined as exc:
        _trace(f"declined: {exc}; running the command here")
        return
    except KeyboardInterrupt:  # before the child runs; after, SIGINT goes to the child
        sys.stderr.write(f"{program}: interrupted\n")
        sys.exit(130)
    if code is not None:
        _trace("ran the command")
        sys.exit(code)
    _trace("none is up; starting one, and running the command here")
    forkserver_client.spawn()


def _trace(what: str) -> None:
    """With LAYERFS_DEBUG=1, say where the command ran: why a mount was slow shows here."""
    if os.environ.get("LAYERFS_DEBUG") == "1":
        sys.stderr.write(f"layerfs: fork server {forkserver_client.socket_path()}: {what}\n")
