"""layerfs-overlay's launcher (layerfs/cli/launcher.c): the fork server's client in C.

It must name the same server and send the same request as the Python client, and leave
everything else to the Python entry point, which then behaves as it always has. `LAYERFS_DEBUG=1`
makes both say where the command ran; the launcher's line ends in "(launcher)".
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from layerfs.cli import forkserver_client
from tests.imagetools import is_mounted
from tests.test_forkserver import RAN, STARTED, daemons_with_command_line, server_pid

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / ".venv/bin/layerfs-overlay"
BY_LAUNCHER = "ran the command (launcher)"


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[tuple[str, list[Path]]]:
    """Overlay options over a lower with one file, and a list to put mountpoints in (each
    unmounted at the end)."""
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for directory in (lower, upper, work):
        directory.mkdir()
    (lower / "hello").write_text("hi\n")
    mountpoints: list[Path] = []
    try:
        yield f"lowerdir={lower},upperdir={upper},workdir={work}", mountpoints
    finally:
        for mountpoint in mountpoints:
            if is_mounted(mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def overlay(runtime: Path, *args: str | bytes, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LAUNCHER), *args], capture_output=True, text=True, cwd=cwd, timeout=60,
        env={**os.environ, **(env or {}), "LAYERFS_RUNTIME_DIR": str(runtime),
             "LAYERFS_DEBUG": "1"})


def unmount(mountpoint: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)


def test_setup_built_the_launcher_for_this_protocol() -> None:
    assert LAUNCHER.read_bytes()[:4] == b"\x7fELF", "tools/setup builds the launcher"
    source = (REPO / "layerfs/cli/launcher.c").read_text()
    found = re.search(r"^#define PROTOCOL (\d+)", source, re.MULTILINE)
    assert found is not None and int(found[1]) == forkserver_client.PROTOCOL


def test_the_launcher_hands_the_mount_to_the_server_a_python_client_started(
        runtime: Path, layers: tuple[str, list[Path]], tmp_path: Path) -> None:
    options, mountpoints = layers
    # PYTHON* variables and LAYERFS_PURE are part of the server's identity
    env = {"PYTHONDONTWRITEBYTECODE": "1", "LAYERFS_PURE": "0"}
    first, second = tmp_path / "m1", tmp_path / "m2"
    for mountpoint in (first, second):
        mountpoint.mkdir()
        mountpoints.append(mountpoint)
    started = overlay(runtime, "-o", options, str(first), env=env)
    assert started.returncode == 0, started.stderr
    assert STARTED in started.stderr  # no server was up: the Python entry point ran it
    server_pid(runtime)
    unmount(first)  # one upper dir serves one mount at a time

    # a relative mountpoint: the command runs in the caller's working directory
    handed = overlay(runtime, "-o", options, "m2", env=env, cwd=tmp_path)
    assert handed.returncode == 0, handed.stderr
    assert BY_LAUNCHER in handed.stderr
    assert (second / "hello").read_text() == "hi\n"
    assert daemons_with_command_line([str(LAUNCHER), "-o", options, "m2"]) != []

    refused = overlay(runtime, "-o", f"bogus=1,{options}", str(first), env=env)
    assert BY_LAUNCHER in refused.stderr
    assert refused.returncode == 2  # the command's own status, through the server
    assert "layerfs-overlay: bogus: unknown option" in refused.stderr.splitlines()


def test_what_the_launcher_cannot_encode_goes_to_the_python_client(
        runtime: Path, layers: tuple[str, list[Path]], tmp_path: Path) -> None:
    options, mountpoints = layers
    first = tmp_path / "m1"
    first.mkdir()
    mountpoints.append(first)
    assert overlay(runtime, "-o", options, str(first)).returncode == 0
    server_pid(runtime)
    unmount(first)  # one upper dir serves one mount at a time
    # not UTF-8: only Python encodes it as the server decodes it (a surrogate escape)
    odd = os.fsencode(tmp_path) + b"/m\xff"
    os.mkdir(odd)
    mountpoints.append(Path(os.fsdecode(odd)))
    result = subprocess.run(
        [os.fsencode(LAUNCHER), b"-o", options.encode(), odd], capture_output=True,
        timeout=60, env={**os.environ, "LAYERFS_RUNTIME_DIR": str(runtime),
                         "LAYERFS_DEBUG": "1"})
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    assert RAN in stderr and BY_LAUNCHER not in stderr
    assert (Path(os.fsdecode(odd)) / "hello").read_text() == "hi\n"


def test_a_caller_with_stdout_closed_is_left_to_the_python_client(
        runtime: Path, layers: tuple[str, list[Path]], tmp_path: Path) -> None:
    options, mountpoints = layers
    first, second = tmp_path / "m1", tmp_path / "m2"
    for mountpoint in (first, second):
        mountpoint.mkdir()
        mountpoints.append(mountpoint)
    assert overlay(runtime, "-o", options, str(first)).returncode == 0
    server_pid(runtime)
    unmount(first)  # one upper dir serves one mount at a time
    result = subprocess.run(
        ["sh", "-c", 'exec "$0" -o "$1" "$2" >&-', str(LAUNCHER), options, str(second)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "LAYERFS_RUNTIME_DIR": str(runtime), "LAYERFS_DEBUG": "1"})
    assert result.returncode == 0, result.stderr
    assert "declined: file descriptor 1 is closed" in result.stderr
    assert is_mounted(second)


@pytest.mark.parametrize("args", [["--version"], ["-h"]])
def test_calls_that_are_not_a_background_mount_run_the_python_entry_point(
        runtime: Path, args: list[str]) -> None:
    result = overlay(runtime, *args)
    assert result.returncode == 0, result.stderr
    assert "layerfs" in result.stdout
    assert list(runtime.iterdir()) == []  # no server was asked, none started
