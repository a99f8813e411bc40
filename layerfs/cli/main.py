"""`layerfs`: the command line. The only place an exception becomes a message and an exit code.

Errors print one line, `layerfs: what: why`, and exit non-zero (`--debug` adds the
traceback). A full disk under the store is named by the store: `layerfs: ROOT: No space left
on device`. Tables look like docker's, so that habits carry over.
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import importlib
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click

from layerfs import build
from layerfs.errors import LayerfsError, UsageError
from layerfs.reference import Reference
from layerfs.store.layout import default_root
from layerfs.store.store import Store

if TYPE_CHECKING:
    from collections.abc import Callable

P = ParamSpec("P")
R = TypeVar("R")


class Context:
    def __init__(self, root: Path, debug: bool) -> None:
        self.root_path = root
        self.debug = debug
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.root_path)
        return self._store


def handle_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn layerfs errors (and OS errors) into one line on stderr and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except LayerfsError as exc:
            _fail(str(exc), exc.exit_code)
        except BrokenPipeError:
            # the reader went away (`layerfs images | head`): not an error of ours
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except OSError as exc:
            _fail(os_error_text(exc), 1)
        except KeyboardInterrupt:
            _fail("interrupted", 130)

    return wrapper


_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def os_error_text(exc: OSError) -> str:
    """`what: why` for an OS error. A full disk (ENOSPC, EDQUOT) met on a file of the store, or
    on no named file (a write), is said of the store: the file is a staging file that is gone
    by the time the message is read."""
    where = exc.filename
    if exc.errno in _NO_SPACE:
        ctx = click.get_current_context(silent=True)
        root = ctx.obj.root_path if ctx is not None and isinstance(ctx.obj, Context) else None
        if root is not None and (where is None or _inside(os.fsdecode(where), root)):
            where = root
    prefix = f"{os.fsdecode(where)}: " if where else ""
    return f"{prefix}{exc.strerror or exc}"


def _inside(path: str, root: Path) -> bool:
    top = os.path.abspath(root)
    return os.path.commonpath([os.path.abspath(path), top]) == top


def _fail(message: str, code: int) -> NoReturn:
    ctx = click.get_current_context(silent=True)
    if ctx is not None and isinstance(ctx.obj, Context) and ctx.obj.debug:
        import traceback  # --debug only

        traceback.print_exc()
    click.echo(f"layerfs: {message}", err=True)
    sys.exit(code)


pass_ctx = click.make_pass_decorator(Context)


_COMMAND_MODULES = {
    **dict.fromkeys(("import", "images", "tag", "rmi", "history", "inspect", "tree", "system",
                     "load", "save"), "commands_images"),
    **dict.fromkeys(("mount", "umount", "ps", "rm", "commit", "diff", "run", "unshare"),
                    "commands_containers"),
    **dict.fromkeys(("pull", "push", "login", "logout", "search"), "commands_registry"),
    "build": "commands_build",
}


class LazyGroup(click.Group):
    """Imports a command's module only when the command runs: `layerfs mount` should not pay
    for the registry client's imports (mount time is a target: under 100 ms)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_COMMAND_MODULES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = _COMMAND_MODULES.get(cmd_name)
        if cmd_name not in self.commands and module is not None:
            importlib.import_module(f"layerfs.cli.{module}")
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    type=click.Path(path_type=Path, readable=False),  # the store judges it, in one line
    envvar="LAYERFS_ROOT",
    help="Store directory (default /var/lib/layerfs for root, $XDG_DATA_HOME/layerfs else).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="layerfs",
                      message=f"%(prog)s %(version)s, {build.description()}")
@click.pass_context
def cli(ctx: click.Context, root: Path | None, debug: bool) -> None:
    """Container images as a FUSE copy-on-write filesystem."""
    ctx.obj = Context(root or default_root(), debug)


def table(rows: list[list[str]], header: list[str]) -> None:
    """Columns as docker prints them: left-aligned, three spaces apart."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        line = "   ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo(line.rstrip())


def human_size(size: float) -> str:
    """Docker's sizes: decimal units, three significant digits."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.3g}{unit}" if unit != "B" else f"{int(size)}B"
        size /= 1000
    return f"{size}TB"


def parse_refs(texts: tuple[str, ...] | list[str]) -> list[Reference]:
    refs = [Reference.parse(t) for t in texts if t]
    for ref in refs:
        if ref.digest is not None:
            raise UsageError(f"{ref}: a tag cannot name a digest")
    return refs


def since(timestamp: str | None) -> str:
    """Docker's CREATED column: '3 days ago'."""
    if not timestamp:
        return "N/A"
    try:
        then = dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=dt.UTC)
    seconds = (dt.datetime.now(dt.UTC) - then).total_seconds()
    for unit, length in (
        ("year", 31536000),
        ("month", 2592000),
        ("week", 604800),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
    ):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    if seconds < 2:
        return "Less than a second ago" if seconds < 1 else "1 second ago"
    return f"{int(seconds)} seconds ago"


def echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2))


def main() -> None:
    cli(prog_name="layerfs")


if __name__ == "__main__":
    main()
