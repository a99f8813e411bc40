"""An OCI distribution API client over httpx: manifests, blobs, uploads, catalog.

Auth: anonymous first; a 401 answer's challenge says what to do: `Bearer` (Docker Hub's flow:
ask the realm for a token for this scope, with Basic credentials if we have them, then retry)
or `Basic`. Tokens are kept per scope for the life of the client.

Faults: 429 and 5xx answers and connection errors are retried with exponential backoff
(Retry-After honoured); a blob download cut in the middle goes on with a Range request; every
blob is verified against its digest while it streams, every manifest fetched by digest against
it. Errors raise `RegistryError`, "what: why", naming the registry and the object.

Not thread-safe per instance for auth state changes, but httpx.Client is: pull runs one client
from several threads, and the token cache is updated atomically (a dict assignment).
"""

from __future__ import annotations

import ipaddress
import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

import httpx

from layerfs.digest import Digest, Hasher, digest_bytes
from layerfs.errors import DigestError, RegistryError
from layerfs.oci import mediatypes
from layerfs.reference import api_host
from layerfs.registry.auth import Challenge, Credentials, parse_challenge

if TYPE_CHECKING:
    from collections.abc import Callable

MAX_ATTEMPTS = 5
BACKOFF_BASE = 0.25
MAX_MANIFEST_BYTES = 4 << 20
CHUNK = 1 << 20
MONOLITHIC_MAX = 32 << 20
"""Blobs up to this size go up in one PUT; bigger ones in PATCH chunks of this size."""
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def is_loopback(domain: str) -> bool:
    host = domain.rsplit(":", 1)[0] if not domain.startswith("[") else domain[1:].split("]")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    raw: bytes
    media_type: str
    digest: Digest


def _error_text(resp: httpx.Response) -> str:
    """The registry's own words for an error answer (its `errors` list), or the status."""
    try:
        doc = json.loads(resp.read() or b"{}")
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if errors:
            first = errors[0]
            code = str(first.get("code", "")).lower()
            message = str(first.get("message", "")).strip()
            return f"{code}: {message}" if message else code
    except (ValueError, httpx.HTTPError, AttributeError):
        pass
    return f"{resp.status_code} {resp.reason_phrase}".strip()


class RegistryClient:
    def __init__(
        self,
        domain: str,
        *,
        insecure: bool = False,
        credentials: Credentials | None = None,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.domain = domain
        scheme = "http" if insecure else "https"
        self.base = f"{scheme}://{api_host(domain)}"
        self._credentials = credentials
        self._tokens: dict[str, str] = {}
        self._basic = False
        self._sleep = sleep
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=True,
            headers={"User-Agent": "layerfs/0.1"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def _url(self, path: str) -> str:
        return self.base + path

    def _auth_header(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token is not None:
            return f"Bearer {token}"
        if self._basic and self._credentials is not None:
            return self._credentials.basic()
        return None

    def request(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        what: str,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        stream: bool = False,
        ok: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        """One request with auth, retries and backoff; RegistryError unless status in `ok`."""
        authenticated = False
        attempt = 0
        while True:
            attempt += 1
            sent = dict(headers or {})
            auth = self._auth_header(scope)
            if auth is not None:
                sent["Authorization"] = auth
            try:
                resp = self._http.send(
                    self._http.build_request(method, url, headers=sent, content=content),
                    stream=stream,
                )
            except httpx.TransportError as exc:
                # a refused connection is retried once only: nobody is there (docker fails
                # at once); a connection that broke may well work the next time
                limit = 2 if isinstance(exc, httpx.ConnectError) else MAX_ATTEMPTS
                if attempt < limit:
                    self._sleep(BACKOFF_BASE * 2 ** (attempt - 1))
                    continue
                raise RegistryError(f"{what}: cannot reach {self.domain}: {_reason(exc)}") from None
            if resp.status_code == 401 and not authenticated:
                challenge = parse_challenge(resp.headers.get("www-authenticate", ""))
                resp.close()
                self._authenticate(challenge, scope, what)
                authenticated = True
                continue
            if resp.status_code in _RETRY_STATUS and attempt < MAX_ATTEMPTS:
                delay = _retry_after(resp) or BACKOFF_BASE * 2 ** (attempt - 1)
                resp.close()
                self._sleep(min(delay, 30.0))
                continue
            if resp.status_code not in ok:
                text = _error_text(resp)
                resp.close()
                raise RegistryError(f"{what}: {text}")
            return resp

    def _authenticate(self, challenge: Challenge | None, scope: str, what: str) -> None:
        if challenge is None:
            raise RegistryError(
                f"{what}: unauthorized: the registry asks for credentials without saying how"
            )
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise RegistryError(
                    f"{what}: unauthorized: authentication required (layerfs login {self.domain})"
                )
            self._basic = True
            return
        if challenge.scheme != "bearer" or "realm" not in challenge.params:
            raise RegistryError(f"{what}: unsupported auth challenge {challenge.scheme!r}")
        params = {"service": challenge.params.get("service", "")}
        if scope:
            params["scope"] = scope
        headers = {}
        if self._credentials is not None:
            headers["Authorization"] = self._credentials.basic()
        try:
            resp = self._http.get(challenge.params["realm"], params=params, headers=headers)
        except httpx.TransportError as exc:
            raise RegistryError(f"{what}: cannot reach the token service: {_reason(exc)}") from None
        if resp.status_code != 200:
            raise RegistryError(f"{what}: unauthorized: the token service said {_error_text(resp)}")
        try:
            doc = resp.json()
            token = doc.get("token") or doc.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{what}: the token service sent no token")
        self._tokens[scope] = token

    # ------------------------------------------------------------------ reading
    def ping(self) -> None:
        self.request("GET", self._url("/v2/"), scope="", what=self.domain)

    def get_manifest(self, repo: str, reference: str, what: str) -> FetchedManifest:
        resp = self.request(
            "GET",
            self._url(f"/v2/{repo}/manifests/{reference}"),
            scope=f"repository:{repo}:pull",
            what=what,
            headers={"Accept": ", ".join(mediatypes.ACCEPT_MANIFESTS)},
            stream=True,
        )
        try:
            raw = b""
            for chunk in resp.iter_bytes():
                raw += chunk
                if len(raw) > MAX_MANIFEST_BYTES:
                    raise RegistryError(f"{what}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
        except httpx.TransportError as exc:
            raise RegistryError(f"{what}: reading the manifest failed: {_reason(exc)}") from None
        finally:
            resp.close()
        media_type = resp.headers.get("content-type", "").split(";")[0].strip()
        try:
            declared = json.loads(raw).get("mediaType")
        except (ValueError, AttributeError):
            raise RegistryError(f"{what}: the manifest is not JSON") from None
        if isinstance(declared, str) and declared:
            media_type = declared
        digest = digest_bytes(raw)
        if reference.startswith("sha256:") and digest != reference:
            raise DigestError(
                f"{what}: manifest digest mismatch: asked for {reference}, got {digest}"
            )
        return FetchedManifest(raw, media_type, digest)

    def get_blob_bytes(
        self, repo: str, digest: Digest, what: str, limit: int = MAX_MANIFEST_BYTES
    ) -> bytes:
        resp = self.request(
            "GET",
            self._url(f"/v2/{repo}/blobs/{digest}"),
            scope=f"repository:{repo}:pull",
            what=what,
        )
        data = resp.content
        if len(data) > limit:
            raise RegistryError(f"{what}: larger than {limit} bytes")
        if digest_bytes(data) != digest:
            raise DigestError(
                f"{what}: digest mismatch: expected {digest}, got {digest_bytes(data)}"
            )
        return data

    def fetch_blob(
        self,
        repo: str,
        digest: Digest,
        out: IO[bytes],
        what: str,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Stream a blob into `out`, verifying its digest; a cut transfer resumes with Range."""
        hasher = Hasher()
        offset = 0
        failures = 0
        url = self._url(f"/v2/{repo}/blobs/{digest}")
        while True:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            resp = self.request(
                "GET",
                url,
                scope=f"repository:{repo}:pull",
                what=what,
                headers=headers,
                stream=True,
                ok=(200, 206),
            )
            try:
                if offset and resp.status_code == 200:  # the server ignored Range: start over
                    out.seek(0)
                    out.truncate()
                    hasher, offset = Hasher(), 0
                for chunk in resp.iter_raw():  # as it arrives: a cut loses nothing
                    out.write(chunk)
                    hasher.update(chunk)
                    offset += len(chunk)
                    if progress is not None:
                        progress(offset)
                expected = resp.headers.get("content-length")
                if resp.status_code == 200 and expected and int(expected) != offset:
                    raise httpx.RemoteProtocolError("body shorter than its Content-Length")
                break
            except httpx.TransportError as exc:
                failures += 1
                if failures >= MAX_ATTEMPTS:
                    raise RegistryError(
                        f"{what}: download failed after {failures} attempts: {_reason(exc)}"
                    ) from None
                self._sleep(BACKOFF_BASE * 2 ** (failures - 1))
            finally:
                resp.close()
        actual = hasher.digest()
        if actual != digest:
            raise DigestError(f"{what}: digest mismatch: expected {digest}, got {actual}")
        return offset

    def tags(self, repo: str) -> list[str]:
        resp = self.request(
            "GET",
            self._url(f"/v2/{repo}/tags/list"),
            scope=f"repository:{repo}:pull",
            what=f"{self.domain}/{repo}",
        )
        tags = resp.json().get("tags") or []
        return [t for t in tags if isinstance(t, str)]

    def catalog(self, limit: int = 1000) -> list[str]:
        resp = self.request(
            "GET",
            self._url(f"/v2/_catalog?n={limit}"),
            scope="registry:catalog:*",
            what=self.domain,
        )
        repos = resp.json().get("repositories") or []
        return [r for r in repos if isinstance(r, str)]

    # ------------------------------------------------------------------ writing
    def blob_exists(self, repo: str, digest: Digest, what: str) -> bool:
        resp = self.request(
            "HEAD",
            self._url(f"/v2/{repo}/blobs/{digest}"),
            scope=f"repository:{repo}:pull,push",
            what=what,
            ok=(200, 404),
        )
        resp.close()
        return resp.status_code == 200

    def mount_blob(self, repo: str, digest: Digest, source_repo: str, what: str) -> bool:
        """Cross-repository mount; False if the registry wants an upload instead."""
        query = urllib.parse.urlencode({"mount": digest, "from": source_repo})
        scope = f"repository:{repo}:pull,push repository:{source_repo}:pull"
        resp = self.request(
            "POST",
            self._url(f"/v2/{repo}/blobs/uploads/?{query}"),
            scope=scope,
            what=what,
            ok=(201, 202),
        )
        resp.close()
        if resp.status_code == 202:
            location = resp.headers.get("location")
            if location:  # an upload session we do not need
                self.request(
                    "DELETE",
                    self._absolute(location),
                    scope=scope,
                    what=what,
                    ok=(200, 202, 204, 404),
                ).close()
            return False
        return True

    def _absolute(self, location: str) -> str:
        return urllib.parse.urljoin(self.base + "/", location)

    def upload_blob(
        self,
        repo: str,
        digest: Digest,
        source: IO[bytes],
        size: int,
        what: str,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        scope = f"repository:{repo}:pull,push"
        resp = self.request(
            "POST", self._url(f"/v2/{repo}/blobs/uploads/"), scope=scope, what=what, ok=(202,)
        )
        resp.close()
        location = self._absolute(resp.headers["location"])
        sent = 0
        if size > MONOLITHIC_MAX:
            while sent < size:
                chunk = source.read(MONOLITHIC_MAX)
                if not chunk:
                    break
                resp = self.request(
                    "PATCH",
                    location,
                    scope=scope,
                    what=what,
                    content=chunk,
                    ok=(202,),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{sent}-{sent + len(chunk) - 1}",
                        "Content-Length": str(len(chunk)),
                    },
                )
                resp.close()
                location = self._absolute(resp.headers.get("location", location))
                sent += len(chunk)
                if progress is not None:
                    progress(sent)
            body = b""
        else:
            body = source.read()
        separator = "&" if "?" in location else "?"
        resp = self.request(
            "PUT",
            f"{location}{separator}digest={urllib.parse.quote(digest)}",
            scope=scope,
            what=what,
            content=body,
            ok=(201, 204),
            headers={"Content-Type": "application/octet-stream"},
        )
        resp.close()
        if progress is not None:
            progress(size)

    def put_manifest(
        self, repo: str, reference: str, raw: bytes, media_type: str, what: str
    ) -> None:
        self.request(
            "PUT",
            self._url(f"/v2/{repo}/manifests/{reference}"),
            scope=f"repository:{repo}:pull,push",
            what=what,
            content=raw,
            headers={"Content-Type": media_type},
            ok=(200, 201, 202),
        ).close()


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__
