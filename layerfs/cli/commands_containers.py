"""Container commands: mount, umount, ps, rm."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from layerfs.cli.main import (
    Context,
    cli,
    handle_errors,
    human_size,
    parse_refs,
    pass_ctx,
    since,
    table,
)
from layerfs.cli.pulling import resolve_or_pull
from layerfs.compression import Compression
from layerfs.errors import NotFoundError
from layerfs.services import containers as containers_service
from layerfs.store.atomic import release_staging


@cli.command()
@click.argument("source")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--name", help="Name of the new container.")
@click.option("--foreground", "-f", is_flag=True, help="Stay attached until unmounted.")
@pass_ctx
@handle_errors
def mount(ctx: Context, source: str, mountpoint: str, name: str | None, foreground: bool) -> None:
    """Mount an image with a new copy-on-write layer (a container), or an existing container.

    Returns once the mount answers; the filesystem daemon stays in the background.
    """
    store = ctx.store
    try:
        container = containers_service.find(store, source)
        if name is not None:
            raise click.UsageError("--name applies to a new container only")
        image = store.image(container.image)  # type: ignore[arg-type]
        containers_service.mount(store, container, image, mountpoint, foreground=foreground)
    except NotFoundError:
        image = resolve_or_pull(store, source)
        containers_service.check_mountpoint(mountpoint)  # before a container exists
        container = containers_service.create(store, image, source, name)
        try:
            containers_service.mount(store, container, image, mountpoint,
                                     foreground=foreground)
        except BaseException:
            if not foreground:
                containers_service.remove(store, container)
            raise
    if not foreground:
        click.echo(container.id)
        # The mount answers and nothing is left to do: skip the interpreter's teardown
        # (tens of ms of module and object cleanup, in a command that aims at 100 ms).
        if sys.stdout is not None:  # None when started with stdout closed
            sys.stdout.flush()
        release_staging()
        os._exit(0)


@cli.command()
@click.argument("target")
@pass_ctx
@handle_errors
def umount(ctx: Context, target: str) -> None:
    """Unmount a container, named by its mountpoint, name or id."""
    containers_service.umount(ctx.store, containers_service.find(ctx.store, target))


@cli.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Show unmounted containers too.")
@click.option("-q", "--quiet", is_flag=True)
@pass_ctx
@handle_errors
def ps(ctx: Context, show_all: bool, quiet: bool) -> None:
    """List containers."""
    store = ctx.store
    rows = []
    for c in containers_service.list_containers(store):
        mounted = containers_service.is_mounted(c)
        if not mounted and not show_all:
            continue
        if quiet:
            click.echo(c.short_id)
            continue
        rows.append(
            [
                c.short_id,
                c.image_ref,
                since(c.created),
                (c.mountpoint or "") if mounted else "",
                "Mounted" if mounted else "Unmounted",
                human_size(containers_service.size_of_upper(store, c)),
                c.name,
            ]
        )
    if not quiet:
        table(rows, ["CONTAINER ID", "IMAGE", "CREATED", "MOUNTPOINT", "STATUS", "SIZE", "NAMES"])


@cli.command()
@click.argument("names", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Unmount first if mounted.")
@pass_ctx
@handle_errors
def rm(ctx: Context, names: tuple[str, ...], force: bool) -> None:
    """Remove containers and their copy-on-write layers."""
    for name in names:
        container = containers_service.find(ctx.store, name)
        containers_service.remove(ctx.store, container, force=force)
        click.echo(name)


@cli.command()
@click.argument("container")
@click.argument("repository", required=False)
@click.option("-m", "--message", help="Commit message.")
@click.option("-a", "--author", help='Author (e.g. "Jane <jane@example.com>").')
@click.option(
    "-c",
    "--change",
    "changes",
    multiple=True,
    help="Apply a Dockerfile instruction (CMD, ENTRYPOINT, ENV, ...).",
)
@click.option(
    "--compression", type=click.Choice(["gzip", "zstd", "none"]), default="gzip", show_default=True
)
@pass_ctx
@handle_errors
def commit(
    ctx: Context,
    container: str,
    repository: str | None,
    message: str | None,
    author: str | None,
    changes: tuple[str, ...],
    compression: str,
) -> None:
    """Make a new image from a container's changes (one new layer)."""
    store = ctx.store
    found = containers_service.find(store, container)
    refs = parse_refs([repository] if repository else [])
    from layerfs.services import commit as commit_service

    image = commit_service.commit(
        store,
        found,
        refs,
        message=message,
        author=author,
        changes=list(changes),
        compression=Compression(compression),
    )
    click.echo(image.id)


@cli.command()
@click.argument("container")
@pass_ctx
@handle_errors
def diff(ctx: Context, container: str) -> None:
    """List what a container changed: A added, C changed, D deleted."""
    found = containers_service.find(ctx.store, container)
    for change in containers_service.changes(ctx.store, found):
        click.echo(f"{change.kind} /{os.fsdecode(change.path)}")


@cli.command(context_settings={"allow_interspersed_args": False})
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--name", help="Name of the new container.")
@click.option("--rm", "remove_after", is_flag=True, help="Remove the container afterwards.")
@click.option("-e", "--env", "env", multiple=True, help="Set an environment variable K=V.")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.option("-u", "--user", help="User (name or uid[:gid]) to run as.")
@pass_ctx
@handle_errors
def run(
    ctx: Context,
    image: str,
    command: tuple[str, ...],
    name: str | None,
    remove_after: bool,
    env: tuple[str, ...],
    workdir: str | None,
    user: str | None,
) -> None:
    """Run a command in a new container of IMAGE (its Entrypoint/Cmd by default)."""
    import tempfile  # here, not at the top: `mount` should not pay for it

    from layerfs.services import run as run_service
    from layerfs.services import userns

    store = ctx.store
    img = resolve_or_pull(store, image)
    container = containers_service.create(store, img, image, name)

    def mounted_run() -> int:
        process = None
        with tempfile.TemporaryDirectory(prefix="layerfs-run-") as mnt:
            containers_service.mount(store, container, img, mnt)
            try:
                process = run_service.process_for(
                    Path(mnt),
                    img.config.container_config,
                    list(command),
                    list(env),
                    workdir,
                    user,
                    image,
                )
                return run_service.run_in(Path(mnt), process)
            finally:
                containers_service.umount(store, container)
                if remove_after or process is None:
                    containers_service.remove(store, container)

    # rootless: mount and run in a user namespace with the user's ids, as podman does
    sys.exit(mounted_run() if os.geteuid() == 0 else userns.with_own_mounts(mounted_run))


@cli.command(context_settings={"allow_interspersed_args": False})
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def unshare(command: tuple[str, ...]) -> None:
    """Run COMMAND (default $SHELL) in the user namespace that rootless run and build use,
    as podman unshare does: root is the user, the image's other ids its subordinate ones,
    so that a rootless mount shows the image's own owners there."""
    from layerfs.errors import UsageError
    from layerfs.services import userns

    if os.geteuid() == 0:
        raise UsageError("unshare: only for a rootless user (root has the ids already)")
    argv = list(command) or [os.environ.get("SHELL") or "/bin/sh"]

    def execute() -> int:
        import subprocess

        try:
            return subprocess.run(argv, check=False).returncode
        except FileNotFoundError:
            raise UsageError(f"{argv[0]}: command not found") from None

    sys.exit(userns.call_as_root_inside(execute))
