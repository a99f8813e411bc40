"""Registry credentials and auth challenges.

Credentials come from the store's `auth.json` (written by `layerfs login`, mode 0600) and from
docker's `~/.docker/config.json` (`auths`, base64 `user:password`), read only. Challenges are
parsed from `WWW-Authenticate` (RFC 7235): `Bearer realm=...,service=...,scope=...` for the
token flow that Docker Hub uses, `Basic realm=...` for htpasswd registries.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from layerfs.errors import StoreError

_PARAM = re.compile(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')

# Docker's own names for Docker Hub in config.json; all mean docker.io.
_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3) or ""
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


def _keys_for(domain: str) -> list[str]:
    if domain == "docker.io":
        return list(_HUB_KEYS)
    return [domain, f"https://{domain}", f"http://{domain}"]


def _decode(entry: object) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        with contextlib.suppress(ValueError):
            user, _, password = base64.b64decode(auth).decode().partition(":")
            return Credentials(user, password)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str):
        return Credentials(name, secret)
    return None


class CredentialStore:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self, path: Path) -> dict[str, object]:
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise StoreError(f"{path}: not valid JSON: {exc}") from None
        auths = doc.get("auths") if isinstance(doc, dict) else None
        return auths if isinstance(auths, dict) else {}

    def get(self, domain: str) -> Credentials | None:
        docker = Path(os.path.expanduser("~/.docker/config.json"))
        for source in (self.path, docker):
            auths = self._read(source)
            for key in _keys_for(domain):
                creds = _decode(auths.get(key))
                if creds is not None:
                    return creds
        return None

    def save(self, domain: str, creds: Credentials) -> None:
        auths = self._read(self.path)
        raw = f"{creds.username}:{creds.password}".encode()
        auths[domain] = {"auth": base64.b64encode(raw).decode()}
        self._write(auths)

    def remove(self, domain: str) -> bool:
        auths = self._read(self.path)
        found = [k for k in _keys_for(domain) if k in auths]
        for key in found:
            del auths[key]
        self._write(auths)
        return bool(found)

    def _write(self, auths: dict[str, object]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"auths": auths}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
