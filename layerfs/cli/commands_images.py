"""Image commands: import, images, tag, rmi, history, inspect, tree, system df/prune."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, cast

import click

from layerfs.cli.main import (
    Context,
    cli,
    echo_json,
    handle_errors,
    human_size,
    parse_refs,
    pass_ctx,
    since,
    table,
)
from layerfs.compression import Compression
from layerfs.errors import LayerfsError, UsageError
from layerfs.reference import Reference
from layerfs.services import images as images_service

if TYPE_CHECKING:
    import io

    from layerfs.store.store import Image


@cli.command("import")
@click.argument("source")
@click.argument("repository", required=False)
@click.option("-m", "--message", help="Commit message for the imported image.")
@click.option(
    "-c",
    "--change",
    "changes",
    multiple=True,
    help="Apply a Dockerfile instruction (CMD, ENV, WORKDIR, ...).",
)
@click.option(
    "--compression",
    type=click.Choice(["gzip", "zstd", "none"]),
    default="gzip",
    show_default=True,
    help="How the layer blob is compressed.",
)
@pass_ctx
@handle_errors
def import_(
    ctx: Context,
    source: str,
    repository: str | None,
    message: str | None,
    changes: tuple[str, ...],
    compression: str,
) -> None:
    """Make a one-layer image from a root filesystem tarball (FILE, URL, or - for stdin)."""
    from layerfs.services.importing import import_tarball, import_url, is_url

    refs = parse_refs([repository] if repository else [])
    if is_url(source):
        image = import_url(ctx.store, source, refs, message=message, changes=list(changes),
                           compression=Compression(compression))
    elif source == "-":
        stdin = cast("io.BufferedReader", sys.stdin.buffer)
        image = import_tarball(
            ctx.store,
            stdin,
            "-",
            refs,
            message=message,
            changes=list(changes),
            compression=Compression(compression),
        )
    else:
        with open(source, "rb") as stream:
            image = import_tarball(
                ctx.store,
                stream,
                source,
                refs,
                message=message,
                changes=list(changes),
                compression=Compression(compression),
            )
    click.echo(image.id)


@cli.command("images")
@click.argument("repository", required=False)
@click.option("-a", "--all", "show_all", is_flag=True, help="Show untagged images too.")
@click.option("-q", "--quiet", is_flag=True, help="Only image ids.")
@click.option("--digests", is_flag=True, help="Show manifest digests.")
@click.option("--no-trunc", is_flag=True, help="Do not truncate ids.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@pass_ctx
@handle_errors
def images(
    ctx: Context,
    repository: str | None,
    show_all: bool,
    quiet: bool,
    digests: bool,
    no_trunc: bool,
    fmt: str,
) -> None:
    """List images."""
    store = ctx.store
    rows = []
    for image in sorted(store.images(), key=lambda i: i.added, reverse=True):
        size = images_service.image_size(store, image)
        names: list[tuple[str, str]] = []
        for ref_text in image.refs:
            ref = Reference.parse(ref_text)
            names.append((ref.familiar(), ref.tag or "<none>"))
        if not names:
            if not show_all and not quiet:
                continue
            names = [("<none>", "<none>")]
        for repo, tag in names:
            if repository and repo != repository and repo != Reference.parse(repository).familiar():
                continue
            rows.append((repo, tag, image, size))
    if fmt == "json":
        echo_json(
            [
                {
                    "Repository": r,
                    "Tag": t,
                    "ID": i.id,
                    "Digest": i.repo_digest,
                    "CreatedAt": i.config.created,
                    "Size": s,
                }
                for r, t, i, s in rows
            ]
        )
        return

    def ident(image: Image) -> str:
        return image.id if no_trunc else image.short_id

    if quiet:
        seen: list[str] = []
        for _r, _t, image, _s in rows:
            if ident(image) not in seen:
                seen.append(ident(image))
        click.echo("\n".join(seen)) if seen else None
        return
    header = ["REPOSITORY", "TAG", *(["DIGEST"] if digests else []), "IMAGE ID", "CREATED", "SIZE"]
    table(
        [
            [
                r,
                t,
                *([i.repo_digest] if digests else []),
                ident(i),
                since(i.config.created),
                human_size(s),
            ]
            for r, t, i, s in rows
        ],
        header,
    )


@cli.command()
@click.argument("source")
@click.argument("target")
@pass_ctx
@handle_errors
def tag(ctx: Context, source: str, target: str) -> None:
    """Give an image another name: SOURCE[:TAG] TARGET[:TAG]."""
    images_service.tag(ctx.store, source, target)


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Untag everywhere, even if in use.")
@pass_ctx
@handle_errors
def rmi(ctx: Context, names: tuple[str, ...], force: bool) -> None:
    """Remove images (and the layers that nothing else uses)."""
    removed = images_service.remove(ctx.store, list(names), force=force)
    for ref in removed.untagged:
        click.echo(f"Untagged: {Reference.parse(ref).familiar()}:{ref.rsplit(':', 1)[1]}")
    for image_id in removed.deleted:
        click.echo(f"Deleted: {image_id}")


@cli.command()
@click.argument("image")
@click.option("--no-trunc", is_flag=True)
@click.option("-H", "--human", default=True, type=bool, help="Human-readable sizes and dates.")
@pass_ctx
@handle_errors
def history(ctx: Context, image: str, no_trunc: bool, human: bool) -> None:
    """Show the history of an image: one row per step, newest first."""
    img = images_service.resolve(ctx.store, image)
    rows = images_service.history(ctx.store, img)

    def cut(text: str) -> str:
        return text if no_trunc or len(text) <= 45 else text[:44] + "…"

    table(
        [
            [
                r.image,
                since(r.created) if human else (r.created or ""),
                cut(r.created_by),
                human_size(r.size) if human else str(r.size),
                r.comment,
            ]
            for r in rows
        ],
        ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
    )


def inspect_doc(ctx: Context, image: Image) -> dict[str, object]:
    config = image.config.doc
    return {
        "Id": image.id,
        "RepoTags": [f"{Reference.parse(r).familiar()}:{r.rsplit(':', 1)[1]}" for r in image.refs],
        "RepoDigests": [
            f"{Reference.parse(r).familiar()}@{image.repo_digest}" for r in image.refs
        ],
        "Created": config.get("created"),
        "Author": config.get("author", ""),
        "Comment": image.config.history[-1].comment if image.config.history else "",
        "Config": config.get("config", {}),
        "Architecture": config.get("architecture"),
        "Os": config.get("os"),
        "Size": images_service.image_size(ctx.store, image),
        "RootFS": {"Type": "layers", "Layers": list(image.diff_ids)},
        "Manifest": {"Digest": image.manifest_digest, "MediaType": image.manifest.media_type},
        "GraphDriver": {
            "Name": "layerfs",
            "Data": {"LowerDirs": [str(p) for p in ctx.store.lower_dirs(image)]},
        },
    }


@cli.command()
@click.argument("names", nargs=-1, required=True)
@pass_ctx
@handle_errors
def inspect(ctx: Context, names: tuple[str, ...]) -> None:
    """Show an image's metadata as JSON."""
    echo_json([inspect_doc(ctx, images_service.resolve(ctx.store, n)) for n in names])


@cli.command("tree")
@click.argument("names", nargs=-1)
@pass_ctx
@handle_errors
def tree(ctx: Context, names: tuple[str, ...]) -> None:
    """Show which layers each image has and which images share them."""
    from rich.console import Console
    from rich.tree import Tree

    console = Console(highlight=False)
    for image, layers in images_service.tree(ctx.store, list(names)):
        label = (
            ", ".join(Reference.parse(r).familiar() + ":" + r.rsplit(":", 1)[1] for r in image.refs)
            or "<none>"
        )
        root = Tree(
            f"[bold]{label}[/bold]  {image.short_id}  "
            f"{human_size(sum(layer.size for layer in layers))}"
        )
        for index, layer in enumerate(reversed(layers)):
            shared = (
                f"  [cyan]shared with {', '.join(layer.shared_with)}[/cyan]"
                if layer.shared_with
                else ""
            )
            root.add(
                f"layer {len(layers) - index}: {layer.diff_id.removeprefix('sha256:')[:12]}"
                f"  {human_size(layer.size)}{shared}"
            )
        if not layers:
            root.add("(no layers)")
        console.print(root)


@cli.group()
def system() -> None:
    """Store-wide commands."""


@system.command("df")
@pass_ctx
@handle_errors
def system_df(ctx: Context) -> None:
    """Show disk usage: images, layers (each stored once), containers, blobs."""
    usage = images_service.disk_usage(ctx.store)
    table(
        [
            [
                "Images",
                str(usage.images),
                human_size(usage.images_size),
                f"shared {human_size(usage.shared_size)}",
            ],
            ["Layers", str(usage.layers), human_size(usage.layers_size), "unpacked, one copy each"],
            ["Containers", str(usage.containers), human_size(usage.containers_size), "upper dirs"],
            ["Blobs", str(usage.blobs), human_size(usage.blobs_size), "compressed"],
        ],
        ["TYPE", "TOTAL", "SIZE", "NOTE"],
    )


@system.command("prune")
@click.option(
    "-a",
    "--all",
    "all_unused",
    is_flag=True,
    help="Remove all images no container uses, not only untagged ones.",
)
@pass_ctx
@handle_errors
def system_prune(ctx: Context, all_unused: bool) -> None:
    """Remove untagged images, and blobs and layers that nothing uses. Containers stay."""
    removed, blobs, layers = images_service.prune(ctx.store, all_unused=all_unused)
    for image_id in removed:
        click.echo(f"Deleted: {image_id}")
    click.echo(f"Removed {blobs} blobs and {layers} layers")


@cli.command()
@click.option(
    "-i",
    "--input",
    "source",
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="docker-save archive, OCI archive, or OCI layout directory.",
)
@click.option("--repository", help="Repository for images the archive names by tag only.")
@pass_ctx
@handle_errors
def load(ctx: Context, source: Path, repository: str | None) -> None:
    """Load images from an archive or an OCI layout."""
    if repository is not None:
        named = Reference.parse(repository)
        if named.digest is not None or ":" in repository.rsplit("/", 1)[-1]:
            raise UsageError(f"{repository}: --repository takes a name without tag or digest")
    from layerfs.services import archive

    for loaded in archive.load(ctx.store, source, repository):
        if loaded.refs:
            for ref in loaded.refs:
                r = Reference.parse(ref)
                click.echo(f"Loaded image: {r.familiar()}:{r.tag}")
        else:
            click.echo(f"Loaded image ID: {loaded.image.id}")


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file (default: stdout).",
)
@pass_ctx
@handle_errors
def save(ctx: Context, names: tuple[str, ...], output: Path | None) -> None:
    """Save images to one archive that docker load and OCI tools both read."""
    from layerfs.services import archive

    chosen = []
    for name in names:
        image = images_service.resolve(ctx.store, name)
        tags = [r for r in image.refs if _names_ref(name, r)] or list(image.refs)
        chosen.append((image, [_familiar_tag(r) for r in tags]))
    if output is None:
        if sys.stdout.isatty():
            raise UsageError("refusing to write an archive to a terminal: use -o FILE")
        archive.save(ctx.store, chosen, sys.stdout.buffer)
        return
    tmp = output.with_name(f".{output.name}.tmp")
    try:
        with open(tmp, "wb") as out:
            archive.save(ctx.store, chosen, out)
        os.replace(tmp, output)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a write: name the file it was for, not the store
            raise OSError(exc.errno, exc.strerror, str(output)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _familiar_tag(ref_text: str) -> str:
    ref = Reference.parse(ref_text)
    return f"{ref.familiar()}:{ref.tag}"


def _names_ref(text: str, ref_text: str) -> bool:
    try:
        ref = Reference.parse(text)
    except LayerfsError:
        return False
    return ref.digest is None and f"{ref.name}:{ref.tag}" == ref_text
