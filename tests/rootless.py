"""A real unprivileged user for the rootless tests: made by a fixture, removed after.

The user gets a work dir of its own (home, XDG_RUNTIME_DIR, XDG_DATA_HOME inside) and the
right to reach this checkout and the interpreter of its virtualenv: where a directory on the
way is closed to others (a Python under /root, a checkout in a private dir), a POSIX ACL entry
lets this one user through, and goes again at the end. Nothing else of the machine changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SEARCH_PATH = f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_SNAPSHOT = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.treecmp import snapshot
tree = snapshot(sys.argv[1])
print(json.dumps({{k: [v[0], v[1], v[2], v[3], v[4] if not isinstance(v[4], tuple) else list(v[4]),
                   [[n, x.hex()] for n, x in v[5]]] for k, v in tree.items()}}))
"""


def _acl_is_extended(path: Path) -> bool:
    out = subprocess.run(["getfacl", "--skip-base", "--absolute-names", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return bool(out.strip())


def _named_entries(path: Path) -> list[str]:
    """The ACL entries of path that name a user or group (not the mask)."""
    out = subprocess.run(["getfacl", "--skip-base", "--absolute-names", "--omit-header",
                          str(path)], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines()
            if line.startswith(("user:", "group:")) and line.split(":")[1]]


@dataclass
class RootlessUser:
    name: str
    uid: int
    gid: int
    work: Path
    _granted: list[tuple[Path, bool]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            "HOME": str(self.work / "home"),
            "USER": self.name,
            "LOGNAME": self.name,
            "PATH": SEARCH_PATH,
            "XDG_RUNTIME_DIR": str(self.work / "run"),
            "XDG_DATA_HOME": str(self.work / "data"),
            "LANG": "C.UTF-8",
        }

    def run(self, argv: list[str], *, check: bool = True, timeout: float = 120,
            env: dict[str, str] | None = None, cwd: Path | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """`argv` as this user: its own uid and gid, no supplementary groups, a clean env."""
        full_env = dict(self.env, **(env or {}))
        # as a login would: the bounding set stays whole, or setuid fusermount3 gets no caps
        cmd = ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
               "--", *argv]
        result = subprocess.run(cmd, env=full_env, cwd=cwd or self.work / "home",
                                capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} as {self.name}: exit {result.returncode}\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def mkdirs(self, *paths: Path) -> None:
        for path in paths:
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, self.uid, self.gid)

    def snapshot(self, root: Path, *, via: list[str] | None = None) -> dict[str, Any]:
        """The tree under `root` as this user sees it (a FUSE mount without allow_other is
        closed to everyone else, root included); `via` wraps the command (`unshare ...`)."""
        argv = [*(via or []), sys.executable, "-c", _SNAPSHOT.format(repo=str(REPO)), str(root)]
        doc = json.loads(self.run(argv).stdout)
        assert isinstance(doc, dict)
        return doc

    def grant_reach(self, *paths: Path) -> None:
        """Let this user through every closed directory above and at `paths`."""
        for path in paths:
            for part in [path, *path.parents]:
                if not part.is_dir() or part.stat().st_mode & 0o001:
                    continue
                if any(p == part for p, _ in self._granted):
                    continue
                self._granted.append((part, _acl_is_extended(part)))
                subprocess.run(["setfacl", "-m", f"u:{self.uid}:x", str(part)], check=True)

    def grant_fuse(self) -> None:
        """Access to /dev/fuse, which fusermount3 opens with the caller's rights: on a
        machine where it is 0600 root, the test user needs an ACL entry of its own."""
        dev = Path("/dev/fuse")
        if os.stat(dev).st_mode & 0o006 == 0o006:
            return
        self._granted.append((dev, _acl_is_extended(dev)))
        subprocess.run(["setfacl", "-m", f"u:{self.uid}:rw", str(dev)], check=True)

    def revoke(self) -> None:
        """Take this user's entries away again, and the whole extended ACL where it made one
        and no other entry (another run's user, say) is left in it."""
        for path, was_extended in reversed(self._granted):
            subprocess.run(["setfacl", "-x", f"u:{self.uid}", str(path)], check=False)
            if not was_extended and not _named_entries(path):
                subprocess.run(["setfacl", "-b", str(path)], check=False)
        self._granted.clear()


def create_user(suffix: str = "", *, fuse: bool = True, subordinate: bool = True,
                ) -> RootlessUser:
    """`fuse`: the right to open /dev/fuse where others lack it; `subordinate`: a range of
    subordinate ids (useradd gives one; without, it is taken away again)."""
    name = f"lfsrl{os.getpid() % 100000}{suffix}"
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "--user-group", name],
                   check=True, capture_output=True, text=True)
    if not subordinate:
        for path, flag in (("/etc/subuid", "--del-subuids"), ("/etc/subgid", "--del-subgids")):
            for line in Path(path).read_text().splitlines():
                owner, start, count = line.split(":")
                if owner == name:
                    end = int(start) + int(count) - 1
                    subprocess.run(["usermod", flag, f"{start}-{end}", name], check=True)
    entry = pwd.getpwnam(name)
    work = Path(tempfile.mkdtemp(prefix="layerfs-rootless-", dir="/tmp"))
    os.chmod(work, 0o755)
    user = RootlessUser(name, entry.pw_uid, entry.pw_gid, work)
    try:
        user.mkdirs(work / "home", work / "run", work / "data")
        os.chmod(work / "run", 0o700)
        user.grant_reach(REPO, Path(os.path.realpath(sys.executable)).parent, VENV_BIN)
        if fuse:
            user.grant_fuse()
    except BaseException:
        remove_user(user)
        raise
    return user


def processes_of(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        except (OSError, StopIteration):
            continue
        if str(uid) in uids:
            pids.append(int(entry))
    return pids


def remove_user(user: RootlessUser) -> None:
    user.revoke()
    # whatever it still runs (a fork server, a daemon) goes with it, PID by PID
    for pid in processes_of(user.uid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    subprocess.run(["userdel", user.name], check=False, capture_output=True)
    subprocess.run(["groupdel", user.name], check=False, capture_output=True)
    shutil.rmtree(user.work, ignore_errors=True)
