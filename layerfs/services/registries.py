"""Which registries to talk to and how: clients with credentials, plain HTTP only where allowed.

Plain HTTP is used for loopback registries (as docker does), for registries listed in the
store's `config.json` (`{"insecure-registries": ["host:port"]}`) or in the environment
variable LAYERFS_INSECURE_REGISTRIES (comma-separated), and where the user says `--insecure`.
Everything else is HTTPS. Blob sources (which repositories of a registry already hold a blob)
are remembered in `blob-sources.json`, so that a push can mount instead of uploading.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from layerfs.registry.auth import Credentials, CredentialStore
from layerfs.registry.client import RegistryClient, is_loopback
from layerfs.store import atomic
from layerfs.store.lock import locked

if TYPE_CHECKING:
    from layerfs.digest import Digest
    from layerfs.store.store import Store


def credentials(store: Store) -> CredentialStore:
    return CredentialStore(store.root / "auth.json")


def insecure_registries(store: Store) -> set[str]:
    names = {n.strip() for n in os.environ.get("LAYERFS_INSECURE_REGISTRIES", "").split(",")}
    try:
        doc = json.loads((store.root / "config.json").read_bytes())
        listed = doc.get("insecure-registries", []) if isinstance(doc, dict) else []
        names |= {str(n) for n in listed}
    except (OSError, ValueError):
        pass
    return {n for n in names if n}


def client_for(store: Store, domain: str, *, insecure: bool = False,
               creds: Credentials | None = None) -> RegistryClient:
    """A client for `domain`, with the stored credentials unless `creds` are given."""
    plain = insecure or is_loopback(domain) or domain in insecure_registries(store)
    return RegistryClient(domain, insecure=plain,
                          credentials=creds or credentials(store).get(domain))


def blob_sources(store: Store, domain: str, digest: Digest) -> list[str]:
    try:
        doc = json.loads((store.root / "blob-sources.json").read_bytes())
    except (OSError, ValueError):
        return []
    repos = doc.get(domain, {}).get(digest, []) if isinstance(doc, dict) else []
    return [r for r in repos if isinstance(r, str)]


def remember_sources(store: Store, domain: str, repo: str, digests: list[Digest]) -> None:
    path = store.root / "blob-sources.json"
    with locked(store.layout.lock):
        try:
            doc = json.loads(path.read_bytes())
            if not isinstance(doc, dict):
                doc = {}
        except (OSError, ValueError):
            doc = {}
        known = doc.setdefault(domain, {})
        for digest in digests:
            repos = known.setdefault(digest, [])
            if repo not in repos:
                repos.append(repo)
        atomic.write_file(path, json.dumps(doc).encode())
