"""A loopback registry for the pull workload: Debian's `docker-registry` (distribution 2.8).

It gets a config of our own (the packaged one enables auth and listens on every interface):
`http.addr` on 127.0.0.1 and a port that was free a moment before, storage under the caller's
scratch dir. The process is ours: started in a new session (so that a Ctrl-C reaches only the
benchmark, which then stops it), stopped by its pid on the caller's ExitStack, SIGTERM then
SIGKILL. The image is pushed to it once with skopeo from the OCI layout.
"""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING

from benchmarks.procs import CommandError, run

if TYPE_CHECKING:
    from contextlib import ExitStack
    from pathlib import Path

READY_DEADLINE = 30.0  # seconds for /v2/ to answer after the start
STOP_DEADLINE = 10.0
REPOSITORY = "bench/debian"
TAG = "1"

CONFIG = """\
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: {storage}
http:
  addr: 127.0.0.1:{port}
"""


def start(stack: ExitStack, scratch: Path) -> str:
    """Start a registry on 127.0.0.1; return its `HOST:PORT` once `/v2/` answers."""
    scratch.mkdir(parents=True)
    port = _free_port()
    config = scratch / "config.yml"
    config.write_text(CONFIG.format(storage=scratch / "storage", port=port))
    log = stack.enter_context((scratch / "registry.log").open("wb"))
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd="/",
        start_new_session=True,
    )
    stack.callback(_stop, process)
    address = f"127.0.0.1:{port}"
    end = time.monotonic() + READY_DEADLINE
    while not _answers(f"http://{address}/v2/"):
        if process.poll() is not None or time.monotonic() > end:
            tail = (scratch / "registry.log").read_text(errors="replace")[-600:]
            raise CommandError(f"docker-registry: not answering on {address}: {tail}")
        time.sleep(0.05)
    return address


def push(layout_image: str, address: str) -> str:
    """Push `DIR:TAG` of an OCI layout; return the reference it can be pulled by."""
    reference = f"{address}/{REPOSITORY}:{TAG}"
    run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout_image}",
         f"docker://{reference}"], timeout=600)
    return reference


def version() -> str:
    try:
        output = run(["docker-registry", "--version"], capture=True, timeout=30)
    except (CommandError, OSError) as exc:
        return f"unknown ({exc})"
    # Keep the version only: the first word is the project's import path, a host name.
    words = output.split()
    return words[-1] if words else "unknown"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(url: str) -> bool:
    # No proxy, whatever the environment says: the registry is on loopback.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()  # by pid: the Popen object knows its own child
    try:
        process.wait(timeout=STOP_DEADLINE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_DEADLINE)
