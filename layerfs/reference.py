"""Image references: Docker's grammar and normalization (distribution/reference).

Owns: parsing `[domain/]path[:tag][@digest]`, the normalization Docker applies (`ubuntu` is
`docker.io/library/ubuntu:latest`, `index.docker.io` is `docker.io`), the familiar short form
that `docker images` shows, and the one place where Docker Hub's registry API host is named.

    reference  := name [ ":" tag ] [ "@" digest ]
    name       := [ domain "/" ] path
    domain     := host [ ":" port ]          host: DNS name, IPv4, or [IPv6]
    path       := component ( "/" component )*
    component  := [a-z0-9]+ ( ( "." | "_" | "__" | "-"+ ) [a-z0-9]+ )*
    tag        := [A-Za-z0-9_] [A-Za-z0-9_.-]{0,127}
    digest     := "sha256:" 64 lowercase hex digits

The first path element is a domain when it contains `.` or `:`, is `localhost`, or has an
uppercase letter (paths are lowercase, so it cannot be one); otherwise the reference is on
Docker Hub. A reference with neither tag nor digest gets the tag `latest`.

Does not know registries, credentials or whether the image exists. Only sha256 digests are
accepted (Docker also parses sha512 ones; no registry we talk to produces them).

Concurrency: immutable values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from layerfs.digest import Digest, parse_digest
from layerfs.errors import DigestError, ReferenceError_

DEFAULT_DOMAIN: Final = "docker.io"
LEGACY_DEFAULT_DOMAIN: Final = "index.docker.io"
DOCKER_HUB_API_HOST: Final = "registry-1.docker.io"
OFFICIAL_REPO_PREFIX: Final = "library/"
LOCALHOST: Final = "localhost"
DEFAULT_TAG: Final = "latest"
NAME_TOTAL_LENGTH_MAX: Final = 255

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*", re.ASCII)
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?", re.ASCII
)
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
# A bare image id; Docker refuses it as a name so that `docker run <id>` is never a pull.
_IDENTIFIER = re.compile(r"[a-f0-9]{64}", re.ASCII)


def api_host(domain: str) -> str:
    """The host that serves the registry API for `domain` (Docker Hub's is not docker.io)."""
    return DOCKER_HUB_API_HOST if domain == DEFAULT_DOMAIN else domain


def _split_domain(name: str) -> tuple[str, str]:
    """(domain, path) of a name without tag or digest, normalized as Docker does."""
    first, slash, rest = name.partition("/")
    if not slash:
        domain, path = DEFAULT_DOMAIN, name
    elif first == LOCALHOST or any(c in first for c in ".:") or first.lower() != first:
        domain, path = first, rest
    else:
        domain, path = DEFAULT_DOMAIN, name
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    return domain, path


@dataclass(frozen=True, slots=True)
class Reference:
    """A normalized image reference. `tag` is None only when a digest pins the image."""

    domain: str
    path: str
    tag: str | None = DEFAULT_TAG
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse and normalize `text`; ReferenceError_ ("TEXT: why") if it is not a reference."""

        def fail(why: str) -> ReferenceError_:
            return ReferenceError_(f"{text}: {why}")

        if not text:
            raise ReferenceError_("'': repository name must have at least one component")
        if _IDENTIFIER.fullmatch(text):
            raise fail("an image id (64 hex digits) is not a repository name")
        name, at, digest_text = text.partition("@")
        digest: Digest | None = None
        if at:
            try:
                digest = parse_digest(digest_text)
            except DigestError as exc:
                raise fail(f"invalid digest {digest_text!r}") from exc
        tag: str | None = None
        colon = name.rfind(":")
        if colon > name.rfind("/"):
            name, tag = name[:colon], name[colon + 1 :]
            if _TAG.fullmatch(tag) is None:
                raise fail(f"invalid tag {tag!r}")
        if not name:
            raise fail("repository name must have at least one component")
        domain, path = _split_domain(name)
        if path.lower() != path:
            raise fail("repository name must be lowercase")
        if _DOMAIN.fullmatch(domain) is None:
            raise fail(f"invalid registry domain {domain!r}")
        for component in path.split("/"):
            if _PATH_COMPONENT.fullmatch(component) is None:
                why = "empty" if not component else "lowercase letters, digits and . _ - only"
                raise fail(f"invalid repository name component {component!r} ({why})")
        if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
            raise fail(f"repository name must not be more than {NAME_TOTAL_LENGTH_MAX} characters")
        if tag is None and digest is None:
            tag = DEFAULT_TAG
        return cls(domain, path, tag, digest)

    @property
    def name(self) -> str:
        """The full repository name, `domain/path` (Docker's `Name()`)."""
        return f"{self.domain}/{self.path}"

    def familiar(self) -> str:
        """The short repository name `docker images` shows: `ubuntu`, `jpetazzo/clock`."""
        if self.domain != DEFAULT_DOMAIN:
            return self.name
        rest = self.path.removeprefix(OFFICIAL_REPO_PREFIX)
        return rest if "/" not in rest else self.path

    def api_host(self) -> str:
        """The host serving this reference's registry API (`registry-1.docker.io` for Hub)."""
        return api_host(self.domain)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += ":" + self.tag
        if self.digest is not None:
            text += "@" + self.digest
        return text


def parse(text: str) -> Reference:
    """`Reference.parse(text)`."""
    return Reference.parse(text)
