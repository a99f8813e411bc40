"""Which build of the hot path runs: the mypyc-compiled modules, or the pure-Python ones.

The request loop, the protocol packing and the engine (`COMPILED`) are compiled with mypyc at
install time, into extension modules beside their sources, which Python then imports first. The
sources stay the fallback, taken whole (the compiled modules call each other natively, so a mix
would run two versions of one module):

- `LAYERFS_PURE=1` asks for them;
- no compiled build is installed (no compiler at install time, say);
- a source is newer than the build: an edit since the last `pip install`, which the build
  does not have yet.

`select()` runs at the first import of `layerfs` and, for the pure case, puts a finder first
on `sys.meta_path` that imports layerfs modules from their sources only.
"""

from __future__ import annotations

import _imp
import os
import sys

TYPE_CHECKING = False  # typing's own costs every start-up an import; mypy honours the name alone
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

COMPILED = (
    "layerfs/fuse/protocol.py", "layerfs/fuse/session.py", "layerfs/fuse/ops.py",
    "layerfs/fuse/passthrough.py", "layerfs/fuse/splice.py", "layerfs/overlay/engine.py",
    "layerfs/overlay/tree.py", "layerfs/overlay/nodes.py", "layerfs/overlay/lowers.py",
    "layerfs/overlay/copyup.py", "layerfs/overlay/acl.py", "layerfs/realfs.py",
    "layerfs/overlay_xattrs.py",
)
"""The modules mypyc compiles (setup.py reads this list): what every request runs through."""

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_EXTENSION = _imp.extension_suffixes()[0]  # importlib.machinery's first, without its import


def _why_pure() -> str | None:
    """Why the pure-Python modules run; None when the compiled ones do."""
    if os.environ.get("LAYERFS_PURE") == "1":
        return "LAYERFS_PURE=1"
    for source in COMPILED:
        path = os.path.join(_ROOT, source)
        try:
            built = os.stat(path[: -len(".py")] + _EXTENSION).st_mtime_ns
        except FileNotFoundError:
            return "no compiled build installed"
        if os.stat(path).st_mtime_ns > built:
            return f"{source} is newer than its compiled build (pip install -e . rebuilds it)"
    return None


class _SourcesOnly:
    """A meta path finder that imports layerfs modules from their .py files, never from an
    extension module beside them."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if not fullname.startswith("layerfs.") or path is None:
            return None
        import importlib.machinery  # only here: a pure start-up is the slow one anyway

        loaders = [(importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)]
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, *loaders).find_spec(fullname, target)
            if spec is not None:
                return spec
        return None


PURE_REASON: str | None = None
"""Why the pure modules run (see `_why_pure`), or None: the compiled ones do."""


def select() -> None:
    global PURE_REASON
    PURE_REASON = _why_pure()
    if PURE_REASON is not None and not any(isinstance(f, _SourcesOnly) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcesOnly())


def description() -> str:
    """For --version: which build runs, and why the pure one if it does."""
    if PURE_REASON is None:
        return "compiled (mypyc)"
    return f"pure Python ({PURE_REASON})"
