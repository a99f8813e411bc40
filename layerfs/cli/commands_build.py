"""`build`: an image from a Dockerfile, with the output of docker's classic builder."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from layerfs.cli.main import Context, cli, handle_errors, parse_refs, pass_ctx
from layerfs.cli.pulling import resolve_or_pull
from layerfs.errors import UsageError

if TYPE_CHECKING:
    from layerfs.store.store import Image


def _pairs(texts: tuple[str, ...], what: str) -> dict[str, str]:
    """`K=V` options; a bare `K` takes the value of the environment variable K, as docker
    (and is left out if there is none)."""
    out: dict[str, str] = {}
    for text in texts:
        key, eq, value = text.partition("=")
        if not key:
            raise UsageError(f"{what} {text!r}: not KEY=VALUE")
        if eq:
            out[key] = value
        elif key in os.environ:
            out[key] = os.environ[key]
    return out


@cli.command()
@click.argument("context", type=click.Path(file_okay=False, path_type=Path))
@click.option("-t", "--tag", "tags", multiple=True, help="Name and optionally a tag (NAME:TAG).")
@click.option("-f", "--file", "dockerfile", help="The Dockerfile (default CONTEXT/Dockerfile; "
              "- reads it from stdin).")
@click.option("--build-arg", "build_args", multiple=True, help="Set a build-time variable K=V.")
@click.option("--target", help="Build up to this stage.")
@click.option("--no-cache", is_flag=True, help="Run every step; use no cached one.")
@click.option("--label", "labels", multiple=True, help="Set a label K=V on the image.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the image id.")
@click.option("--network", type=click.Choice(["host", "none"]), default="host",
              show_default=True, help="The network of RUN steps.")
@pass_ctx
@handle_errors
def build(ctx: Context, context: Path, tags: tuple[str, ...], dockerfile: str | None,
          build_args: tuple[str, ...], target: str | None, no_cache: bool,
          labels: tuple[str, ...], quiet: bool, network: str) -> None:
    """Build an image from a Dockerfile and a context directory."""
    from layerfs.services import build as build_service

    if not context.is_dir():
        raise UsageError(f"{context}: the build context must be a directory")
    if dockerfile == "-":
        text, name = sys.stdin.read(), "-"
    else:
        path = Path(dockerfile) if dockerfile else context / "Dockerfile"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UsageError(f"{path}: no such Dockerfile") from None
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not a text file") from None
        name = str(path)
    store = ctx.store
    refs = tuple(parse_refs(list(tags)))

    def report(line: str) -> None:
        if not quiet:
            click.echo(line)

    def resolve(text: str) -> Image:
        return resolve_or_pull(store, text)

    with tempfile.TemporaryFile(prefix="layerfs-build-") as output:
        sys.stdout.flush()
        options = build_service.BuildOptions(
            context=context, dockerfile_text=text, dockerfile_name=name, tags=refs,
            build_args=_pairs(build_args, "--build-arg"), target=target, no_cache=no_cache,
            labels=_pairs(labels, "--label"), network=network == "host",
            run_output=output.fileno() if quiet else None)
        try:
            image = build_service.build(store, options, resolve, report)
        except BaseException:
            if quiet:  # what the failed step printed, which -q held back
                output.seek(0)
                sys.stderr.buffer.write(output.read())
                sys.stderr.flush()
            raise
    if quiet:
        click.echo(image.id)
        return
    click.echo(f"Successfully built {image.short_id}")
    for ref in refs:
        click.echo(f"Successfully tagged {ref.familiar()}:{ref.tag or 'latest'}")
