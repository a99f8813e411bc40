"""Registry commands: pull, push, login, logout, search; and the implicit pull of mount/run."""

from __future__ import annotations

import sys

import click

from layerfs.cli.main import Context, cli, handle_errors, pass_ctx, table
from layerfs.cli.pulling import progress_for_output, pull_image
from layerfs.errors import RegistryError, UsageError
from layerfs.reference import Reference
from layerfs.registry.auth import Credentials
from layerfs.services import pull as pull_service
from layerfs.services import push as push_service
from layerfs.services import registries
from layerfs.services import search as search_service


@cli.command()
@click.argument("name")
@click.option("--platform", help="os/arch[/variant] (default: this host's).")
@click.option("-a", "--all-tags", is_flag=True, help="Pull every tag of the repository.")
@click.option("--insecure", is_flag=True, help="Plain HTTP to this registry.")
@pass_ctx
@handle_errors
def pull(ctx: Context, name: str, platform: str | None, all_tags: bool, insecure: bool) -> None:
    """Pull an image from a registry: NAME[:TAG|@DIGEST]."""
    if all_tags:
        for tagged in pull_service.all_tags(ctx.store, name, insecure=insecure):
            pull_image(ctx.store, tagged, platform=platform, insecure=insecure)
        return
    pull_image(ctx.store, name, platform=platform, insecure=insecure)


@cli.command()
@click.argument("name")
@click.option("--insecure", is_flag=True, help="Plain HTTP to this registry.")
@pass_ctx
@handle_errors
def push(ctx: Context, name: str, insecure: bool) -> None:
    """Push an image to a registry: NAME[:TAG]."""
    ref = Reference.parse(name)
    click.echo(f"The push refers to repository [{ref.name}]")
    with progress_for_output() as progress:
        pushed = push_service.push(ctx.store, name, insecure=insecure, progress=progress)
    click.echo(f"{pushed.reference.tag}: digest: {pushed.digest} size: {pushed.size}")


@cli.command()
@click.argument("registry", default="docker.io")
@click.option("-u", "--username")
@click.option("-p", "--password")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--insecure", is_flag=True)
@pass_ctx
@handle_errors
def login(
    ctx: Context,
    registry: str,
    username: str | None,
    password: str | None,
    password_stdin: bool,
    insecure: bool,
) -> None:
    """Log in to a registry; the credentials go to the store's auth.json (mode 0600)."""
    domain = _domain(registry)
    if password_stdin:
        password = sys.stdin.read().rstrip("\n")
    if username is None:
        username = click.prompt("Username")
    if password is None:
        password = click.prompt("Password", hide_input=True)
    creds = Credentials(username, password)
    store = ctx.store
    with registries.client_for(store, domain, insecure=insecure, creds=creds) as client:
        try:
            client.ping()
        except RegistryError as exc:
            raise RegistryError(f"login to {domain} failed: {exc}") from None
    registries.credentials(store).save(domain, creds)
    click.echo("Login Succeeded")


@cli.command()
@click.argument("registry", default="docker.io")
@pass_ctx
@handle_errors
def logout(ctx: Context, registry: str) -> None:
    """Remove the credentials stored for a registry."""
    domain = _domain(registry)
    if not registries.credentials(ctx.store).remove(domain):
        raise UsageError(f"{domain}: not logged in")
    click.echo(f"Removing login credentials for {domain}")


def _domain(text: str) -> str:
    text = text.removeprefix("https://").removeprefix("http://").rstrip("/")
    if text.endswith("/v1"):
        text = text[:-3]
    return {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}.get(text, text)


@cli.command()
@click.argument("term")
@click.option("--limit", type=int, default=25, show_default=True)
@click.option(
    "-f",
    "--filter",
    "filters",
    multiple=True,
    help="is-official=true|false, is-automated=true|false, stars=N.",
)
@click.option("--insecure", is_flag=True)
@pass_ctx
@handle_errors
def search(ctx: Context, term: str, limit: int, filters: tuple[str, ...], insecure: bool) -> None:
    """Search Docker Hub, or a registry's catalog with REGISTRY/TERM."""
    results = search_service.search(ctx.store, term, limit=limit, insecure=insecure)
    results = search_service.apply_filters(results, list(filters))
    table(
        [
            [
                r.name,
                r.description[:45],
                str(r.stars),
                "[OK]" if r.official else "",
                "[OK]" if r.automated else "",
            ]
            for r in results
        ],
        ["NAME", "DESCRIPTION", "STARS", "OFFICIAL", "AUTOMATED"],
    )
