"""Registry fixtures: real `docker-registry` processes (plain, htpasswd Basic auth, token auth with
a test token issuer), a scriptable fake registry for faults, skopeo and the `layerfs` CLI.

Everything listens on 127.0.0.1 only and every request goes to 127.0.0.1. The real registries are
distribution 2.8 (`docker-registry serve CONFIG`) with a config written per fixture (never the
packaged one); each is started once per session, answers `GET /v2/` before it is handed out, and is
terminated and waited for in the fixture's finalizer. Its access log (stdout) is kept in a file so
that a test can see which requests a client sent (blob GETs, HEADs, cross-repo mounts, uploads).

The token issuer plays Docker Hub's auth server: `GET /token?service=..&scope=..` with Basic auth,
answering a JWT signed (ES256) with a throwaway key whose self-signed certificate is the registry's
`rootcertbundle`; the certificate travels in the JWT header (`x5c`), so the registry's own token
validation checks every request. Valid users get what the scope asks; anonymous callers get `pull`
on `public/*` only (Hub's anonymous pulls); bad credentials get 401.

The fake registry is an http.server whose routes answer scripted replies in order (the last one
repeats): lies (bytes that do not match their digest), truncated bodies, connection resets, Range
requests answered with 206, 429/500 before success. It logs every request it gets.

No sleeps: servers are polled with a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import socket
import struct
import subprocess
import tarfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

LOOPBACK = "127.0.0.1"
LAYERFS = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "layerfs"
IMAGES = Path(os.environ.get("LAYERFS_TEST_IMAGES", "/work/shared/images"))
MUSL = IMAGES / "busybox-1.38.0-musl-amd64-oci"
GLIBC = IMAGES / "busybox-1.38.0-glibc-amd64-oci"

# The official busybox 1.38.0 amd64 images (see PROVENANCE.md next to them).
MUSL_MANIFEST = "sha256:a34ce92094b7b100a98fbd21411a92825f6827b1bc5f6918c253516c90556998"
MUSL_CONFIG = "sha256:654fc8fd836e35f4a64586bddf8f59b9029b48cf80f520834c6c98ca8ab5def9"
MUSL_LAYER = "sha256:5c3b447848a98e48dce106cb3e6acbd4fb6f9b26ee778798137349ce01f4d3c1"
GLIBC_MANIFEST = "sha256:1cfa4e2b09e127b9c4ed43578d3f3c18e7d44ea47b9ea98475c0cbe9086525f8"
GLIBC_CONFIG = "sha256:c6348fa86ba0fb2108c9334f5fe913ddc6d853313e655891f133a0127c30099f"
GLIBC_LAYER = "sha256:b05093807bb0294152bb9cf86d64da722732dddaf7f8882fa1f120477dbc4db3"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ALL_MANIFESTS = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))

USER = "user"
PASSWORD = "pass"
TOKEN_SERVICE = "layerfs-test-registry"
TOKEN_ISSUER = "layerfs-test-issuer"

START_TIMEOUT = 15.0


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def require_images() -> None:
    if not (MUSL / "index.json").is_file() or not (GLIBC / "index.json").is_file():
        pytest.skip(f"the busybox OCI layouts are not in {IMAGES} (set LAYERFS_TEST_IMAGES)")


def require_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


# -- helper programs ------------------------------------------------------------------------------


def run(argv: list[str], env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a helper program; fail with its stderr if it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {result.returncode}\n{result.stderr}")
    return result


@dataclass(frozen=True, slots=True)
class Skopeo:
    """skopeo with its own HOME and an empty auth file: the user's credentials never leak in."""

    home: Path

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR")}
        env["HOME"] = str(self.home)
        env["REGISTRY_AUTH_FILE"] = str(self.home / "auth.json")
        return env

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["skopeo", "--insecure-policy", *args]
        if check:
            return run(argv, env=self.env)
        return subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=120)

    def push(self, layout: Path, dest: str, *, creds: str | None = None, fmt: str | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
        """`skopeo copy oci:LAYOUT docker://DEST` (DEST is HOST:PORT/NAME:TAG, plain HTTP)."""
        args = ["copy", "-q", "--dest-tls-verify=false"]
        if creds is not None:
            args += ["--dest-creds", creds]
        if fmt is not None:
            args += ["--format", fmt]
        return self.run(*args, f"oci:{layout}", f"docker://{dest}", check=check)

    def inspect(self, ref: str, *, creds: str | None = None, raw: bool = False) -> dict[str, Any]:
        args = ["inspect", "--tls-verify=false"]
        if creds is not None:
            args += ["--creds", creds]
        if raw:
            args.append("--raw")
        doc = json.loads(self.run(*args, f"docker://{ref}").stdout)
        assert isinstance(doc, dict)
        return doc


def make_skopeo(base: Path) -> Skopeo:
    home = base / "skopeo-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "auth.json").write_text('{"auths": {}}')
    return Skopeo(home)


# -- real registries ------------------------------------------------------------------------------

_ACCESS = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


@dataclass(frozen=True, slots=True)
class Access:
    """One line of a registry's access log."""

    method: str
    path: str
    status: int


@dataclass
class Registry:
    """A running `docker-registry` on 127.0.0.1:port."""

    port: int
    root: Path
    log: Path
    process: subprocess.Popen[bytes]
    auth: str  # "none", "basic" or "token"

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"

    def sync(self) -> None:
        """Wait until the access log shows a request sent now: the lines of requests that were
        answered before it (the registry logs a request after answering it) are in by then."""
        sentinel = f"/v2/?sync={secrets.token_hex(8)}"
        httpx.get(self.url + sentinel, timeout=10)
        wait_for(lambda: sentinel.encode() in self.log.read_bytes(), f"{sentinel} in the log")

    def log_mark(self) -> int:
        """A position in the access log; `accesses(since=mark)` lists what came after it."""
        self.sync()
        return len(self.log.read_bytes())

    def accesses(self, since: int = 0) -> list[Access]:
        """The requests logged since `since`, up to now (synced), sentinels left out."""
        self.sync()
        text = self.log.read_bytes()[since:].decode(errors="replace")
        return [Access(m.group(1), urllib.parse.unquote(m.group(2)), int(m.group(3)))
                for m in _ACCESS.finditer(text) if not m.group(2).startswith("/v2/?sync=")]


def _registry_config(port: int, root: Path, auth: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": False}},
        "storage": {"filesystem": {"rootdirectory": str(root)}, "delete": {"enabled": True},
                    "cache": {"blobdescriptor": "inmemory"}},
        "http": {"addr": f"{LOOPBACK}:{port}", "secret": secrets.token_hex(16)},
    }
    if auth is not None:
        config["auth"] = auth
    return config


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/v2/", timeout=1.0).status_code in (200, 401)
    except httpx.TransportError:
        return False


@contextlib.contextmanager
def running_registry(base: Path, auth_kind: str = "none",
                     auth: dict[str, Any] | None = None) -> Iterator[Registry]:
    """Start `docker-registry serve` with its own config (JSON, which is YAML) on a free loopback
    port; yield it once `GET /v2/` answers; terminate and wait for it on the way out."""
    require_tools("docker-registry")
    base.mkdir(parents=True, exist_ok=True)
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        root = base / f"storage-{port}"
        root.mkdir(exist_ok=True)
        config = base / f"config-{port}.yml"
        config.write_text(json.dumps(_registry_config(port, root, auth), indent=1))
        log = base / f"registry-{port}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        registry = Registry(port, root, log, process, auth_kind)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while process.poll() is None and not _answers(registry.url):
                if time.monotonic() > deadline:
                    raise AssertionError(f"docker-registry on {registry.host} did not answer "
                                         f"within {START_TIMEOUT:.0f} s: {log.read_text()}")
                time.sleep(0.02)
            if process.poll() is not None:
                if "address already in use" in log.read_text():
                    continue
                raise AssertionError(f"docker-registry exited {process.returncode}: "
                                     f"{log.read_text()}")
            yield registry
            return
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    raise AssertionError("docker-registry: no free port after 3 attempts")


def htpasswd_auth(base: Path, users: dict[str, str]) -> dict[str, Any]:
    """The `auth.htpasswd` config for a bcrypt htpasswd file holding `users`."""
    require_tools("htpasswd")
    path = base / "htpasswd"
    lines = [run(["htpasswd", "-Bbn", user, password]).stdout.strip()
             for user, password in users.items()]
    path.write_text("\n".join(lines) + "\n")
    return {"htpasswd": {"realm": "layerfs-test", "path": str(path)}}


# -- the token issuer -----------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request the issuer answered: who asked (None: anonymous), for what, and the answer."""

    user: str | None
    service: str
    scopes: tuple[str, ...]
    status: int
    granted: tuple[dict[str, Any], ...]


class TokenIssuer:
    """A Docker-style token server on 127.0.0.1 signing ES256 JWTs with a test certificate."""

    def __init__(self, base: Path, users: dict[str, str], service: str = TOKEN_SERVICE,
                 issuer: str = TOKEN_ISSUER, public_prefix: str = "public/") -> None:
        self.users = users
        self.service = service
        self.issuer = issuer
        self.public_prefix = public_prefix
        self.requests: list[TokenRequest] = []
        self._lock = threading.Lock()
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "layerfs test token issuer")])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        base.mkdir(parents=True, exist_ok=True)
        self.cert_path = base / "token-issuer.pem"
        self.cert_path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="token-issuer",
                                        daemon=True)

    @property
    def realm(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/token"

    def registry_auth(self) -> dict[str, Any]:
        """The registry's `auth.token` config trusting this issuer."""
        return {"token": {"realm": self.realm, "service": self.service, "issuer": self.issuer,
                          "rootcertbundle": str(self.cert_path)}}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def sign(self, subject: str, access: list[dict[str, Any]], ttl: int = 300) -> str:
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + ttl,
                  "nbf": now - 10, "iat": now, "jti": secrets.token_hex(16), "access": access}
        signing_input = (_b64url(json.dumps(header).encode()) + "."
                         + _b64url(json.dumps(claims).encode()))
        r, s = decode_dss_signature(self._key.sign(signing_input.encode(),
                                                   ec.ECDSA(hashes.SHA256())))
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        """What `user` (None: anonymous) gets of the scopes asked for."""
        access: list[dict[str, Any]] = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if not name:
                continue
            wanted = [a for a in actions.split(",") if a]
            if user is None:
                wanted = ([a for a in wanted if a == "pull"]
                          if kind == "repository" and name.startswith(self.public_prefix) else [])
            if wanted:
                access.append({"type": kind, "name": name, "actions": wanted})
        return access

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, doc: dict[str, Any],
                        headers: dict[str, str] | None = None) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                if url.path != "/token":
                    self._answer(404, {"details": "not found"})
                    return
                query = urllib.parse.parse_qs(url.query)
                service = query.get("service", [""])[0]
                scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
                user: str | None = None
                header = self.headers.get("Authorization", "")
                status = 200
                if header:
                    scheme, _, value = header.partition(" ")
                    try:
                        name, _, password = base64.b64decode(value).decode().partition(":")
                    except ValueError:
                        name, password = "", ""
                    if scheme.lower() != "basic" or issuer.users.get(name) != password \
                            or not name:
                        status = 401
                    user = name
                if service != issuer.service:
                    status = 400
                granted = issuer.grant(user, scopes) if status == 200 else []
                with issuer._lock:
                    issuer.requests.append(TokenRequest(
                        user, service, tuple(scopes), status, tuple(granted)))
                if status == 401:
                    self._answer(401, {"details": "incorrect username or password"},
                                 {"WWW-Authenticate": 'Basic realm="layerfs-test-issuer"'})
                    return
                if status == 400:
                    self._answer(400, {"details": f"unknown service {service!r}"})
                    return
                token = issuer.sign(user or "", granted)
                self._answer(200, {"token": token, "access_token": token, "expires_in": 300,
                                   "issued_at": datetime.datetime.now(datetime.UTC)
                                   .strftime("%Y-%m-%dT%H:%M:%SZ")})

        return Handler


# -- the fake registry ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A scripted answer. `send_only`: announce the whole body but send only that many bytes,
    then close (`reset`: with a TCP RST rather than a FIN). `ranges`: honour `Range: bytes=N-`
    with 206 (else the whole body, 200)."""

    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    send_only: int | None = None
    reset: bool = False
    ranges: bool = True


@dataclass(frozen=True, slots=True)
class FakeRequest:
    method: str
    path: str
    headers: dict[str, str]


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()


@dataclass(frozen=True, slots=True)
class FakeImage:
    """A small one-layer image in memory, for the fake registry."""

    manifest: bytes
    config: bytes
    layer: bytes
    media_type: str = OCI_MANIFEST

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest)

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def layer_digest(self) -> str:
        return sha256(self.layer)

    @property
    def blobs(self) -> dict[str, bytes]:
        return {self.config_digest: self.config, self.layer_digest: self.layer}


def make_fake_image(payload_size: int = 64 * 1024, seed: bytes = b"layerfs") -> FakeImage:
    """An OCI image with one gzip layer holding /hello and /data (incompressible, so the layer
    blob is at least `payload_size` bytes: big enough to be cut in the middle)."""
    data = random.Random(seed).randbytes(payload_size)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in (("hello", b"hello from the fake registry\n"),
                              ("data", data)):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mode = 0o644
            info.mtime = 1_600_000_000
            tar.addfile(info, io.BytesIO(content))
    tar_bytes = out.getvalue()
    layer = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(tar_bytes)]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "fake"}],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": sha256(layer), "size": len(layer)}],
    }, indent=2).encode()
    return FakeImage(manifest, config, layer)


class FakeRegistry:
    """A registry that answers what the test scripts, on 127.0.0.1. `GET /v2/` answers 200;
    unscripted paths answer 404 with a distribution error body."""

    API_HEADERS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("Docker-Distribution-API-Version", "registry/2.0"),)

    def __init__(self) -> None:
        self.requests: list[FakeRequest] = []
        self._routes: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((LOOPBACK, 0), self._handler())
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-registry",
                                        daemon=True)

    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def reset(self) -> None:
        with self._lock:
            self._routes.clear()
            self.requests.clear()

    def route(self, path: str, *replies: Reply) -> None:
        """Answer `path` with `replies` in turn; the last one repeats."""
        with self._lock:
            self._routes[path] = list(replies)

    def serve_image(self, repo: str, tag: str, image: FakeImage) -> None:
        """Routes for a whole image: the manifest by tag and by digest, and its blobs."""
        manifest = Reply(body=image.manifest, headers=(
            ("Content-Type", image.media_type),
            ("Docker-Content-Digest", image.manifest_digest)))
        self.route(f"/v2/{repo}/manifests/{tag}", manifest)
        self.route(f"/v2/{repo}/manifests/{image.manifest_digest}", manifest)
        for digest, blob in image.blobs.items():
            self.route(f"/v2/{repo}/blobs/{digest}", self.blob(blob))

    @staticmethod
    def blob(data: bytes, **kw: Any) -> Reply:
        return Reply(body=data, headers=(("Content-Type", "application/octet-stream"),
                                         ("Docker-Content-Digest", sha256(data))), **kw)

    def requests_for(self, path: str, method: str | None = None) -> list[FakeRequest]:
        with self._lock:
            return [r for r in self.requests
                    if r.path == path and (method is None or r.method == method)]

    def _next(self, path: str) -> Reply | None:
        with self._lock:
            replies = self._routes.get(path)
            if not replies:
                return None
            return replies.pop(0) if len(replies) > 1 else replies[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self, with_body: bool) -> None:
                path = urllib.parse.urlsplit(self.path).path
                with fake._lock:
                    fake.requests.append(FakeRequest(
                        self.command, path, {k.lower(): v for k, v in self.headers.items()}))
                if path in ("/v2/", "/v2"):
                    reply: Reply | None = Reply(body=b"{}", headers=(
                        ("Content-Type", "application/json"),))
                else:
                    reply = fake._next(path)
                if reply is None:
                    reply = Reply(404, error_body("NAME_UNKNOWN", f"{path}: not scripted"),
                                  (("Content-Type", "application/json"),))
                self._send(reply, with_body)

            def _send(self, reply: Reply, with_body: bool) -> None:
                body, status = reply.body, reply.status
                headers = list(reply.headers)
                wanted = self.headers.get("Range", "")
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted.strip())
                if match and reply.ranges and status == 200 and reply.send_only is None:
                    start = int(match.group(1))
                    end = int(match.group(2)) if match.group(2) else len(body) - 1
                    if start >= len(body):
                        status, body = 416, b""
                        headers.append(("Content-Range", f"bytes */{len(reply.body)}"))
                    else:
                        status, body = 206, body[start:end + 1]
                        headers.append(("Content-Range",
                                        f"bytes {start}-{start + len(body) - 1}"
                                        f"/{len(reply.body)}"))
                self.send_response(status)
                for key, value in (*fake.API_HEADERS, *headers):
                    self.send_header(key, value)
                if status == 200 or status == 206:
                    self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not with_body:
                    return
                if reply.send_only is None:
                    self.wfile.write(body)
                    return
                self.wfile.write(body[:reply.send_only])
                self.wfile.flush()
                if reply.reset:  # linger 0: close() sends an RST
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                else:
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_WR)
                self.close_connection = True

            def do_GET(self) -> None:
                self._serve(with_body=True)

            def do_HEAD(self) -> None:
                self._serve(with_body=False)

            def _refuse(self) -> None:
                self._serve(with_body=True)

            do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

        return Handler


# -- the layerfs CLI on a store -------------------------------------------------------------------


def layerfs_commands() -> set[str]:
    """The subcommands the installed `layerfs` offers (empty if it is not installed)."""
    if not LAYERFS.exists():
        return set()
    result = subprocess.run([str(LAYERFS), "--help"], capture_output=True, text=True,
                            timeout=60)
    commands: set[str] = set()
    in_commands = False
    for line in result.stdout.splitlines():
        if line.strip() == "Commands:":
            in_commands = True
        elif in_commands and line.startswith("  ") and line.strip():
            commands.add(line.split()[0])
    return commands


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    blobs: frozenset[str]
    layers: frozenset[str]
    state: str
    tmp: frozenset[str]  # everything under tmp/, directories with a trailing /


@dataclass
class LayerfsStore:
    """A store under a test's tmp dir, driven through the `layerfs` command with its own HOME
    (so `~/.docker/config.json` is the test's, never the user's)."""

    root: Path
    home: Path
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE", "LAYERFS_ROOT",
                            "XDG_RUNTIME_DIR", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                            "http_proxy", "https_proxy", "all_proxy")}
        env.update({"HOME": str(self.home), "LAYERFS_STRICT": "1", "NO_PROXY": "*",
                    "no_proxy": "*", **self.extra_env})
        return env

    def run(self, *args: str, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(LAYERFS), "--root", str(self.root), *args], input=input,
                              capture_output=True, text=True, timeout=timeout, env=self.env)

    def ok(self, *args: str, **kw: Any) -> str:
        """Run; the command must succeed; its stdout."""
        result = self.run(*args, **kw)
        assert result.returncode == 0, (
            f"layerfs {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result.stdout

    def fails(self, *args: str, **kw: Any) -> str:
        """Run; the command must fail with exit != 0 and one `layerfs: ` line on stderr."""
        result = self.run(*args, **kw)
        assert result.returncode != 0, f"layerfs {' '.join(args)} succeeded: {result.stdout}"
        lines = result.stderr.splitlines()
        assert len(lines) == 1, f"layerfs {' '.join(args)}: not one line on stderr:\n" + \
            result.stderr
        assert lines[0].startswith("layerfs: "), lines
        print(f"layerfs {' '.join(args)} -> {lines[0]}")  # shown by `pytest -rP`
        return lines[0]

    def inspect(self, name: str) -> dict[str, Any]:
        doc = json.loads(self.ok("inspect", name))
        assert isinstance(doc, list) and len(doc) == 1
        return dict(doc[0])

    def state(self) -> dict[str, Any]:
        path = self.root / "state.json"
        return dict(json.loads(path.read_text())) if path.exists() else {}

    def snapshot(self) -> StoreSnapshot:
        def names(path: Path) -> frozenset[str]:
            return frozenset(p.name for p in path.iterdir()) if path.is_dir() else frozenset()

        tmp = self.root / "tmp"
        staged = frozenset(str(p.relative_to(tmp)) + ("/" if p.is_dir() else "")
                           for p in tmp.rglob("*")) if tmp.is_dir() else frozenset()
        state = self.root / "state.json"
        return StoreSnapshot(names(self.root / "blobs" / "sha256"), names(self.root / "layers"),
                             state.read_text() if state.exists() else "", staged)

    def assert_unchanged(self, before: StoreSnapshot) -> None:
        """Nothing partial: no new blob, no new layer, the same refs, an empty tmp."""
        after = self.snapshot()
        assert after.blobs == before.blobs, f"blobs changed: {sorted(after.blobs ^ before.blobs)}"
        assert after.layers == before.layers, (
            f"layers changed: {sorted(after.layers ^ before.layers)}")
        refs = (json.loads(before.state).get("refs", {}) if before.state else {},
                json.loads(after.state).get("refs", {}) if after.state else {})
        assert refs[0] == refs[1], f"refs changed: {refs[0]} -> {refs[1]}"
        assert not after.tmp, f"left in tmp/: {sorted(after.tmp)}"


# -- content for the registries -------------------------------------------------------------------


def stacked_layout(dest: Path) -> tuple[Path, str]:
    """An OCI layout whose image is musl busybox plus one small layer on top (shares the base
    layer with busybox:musl); returns the layout and the top layer's blob digest."""
    dest.mkdir(parents=True, exist_ok=True)
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (dest / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def put(data: bytes) -> str:
        digest = sha256(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    base_hex = MUSL_LAYER.removeprefix("sha256:")
    shutil.copyfile(MUSL / "blobs" / "sha256" / base_hex, blobs / base_hex)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        content = b"stacked on busybox\n"
        info = tarfile.TarInfo("etc/stacked")
        info.size, info.mode, info.mtime = len(content), 0o644, 1_600_000_000
        tar.addfile(info, io.BytesIO(content))
    top_tar = out.getvalue()
    top = put(gzip.compress(top_tar, compresslevel=1, mtime=0))
    config = json.loads((MUSL / "blobs" / "sha256" / MUSL_CONFIG.removeprefix("sha256:"))
                        .read_bytes())
    config["rootfs"]["diff_ids"].append(sha256(top_tar))
    config.setdefault("history", []).append(
        {"created": "2024-01-01T00:00:00Z", "created_by": "layerfs test: stacked layer"})
    config_raw = json.dumps(config).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": put(config_raw), "size": len(config_raw)},
        "layers": [
            {"mediaType": OCI_LAYER_GZIP, "digest": MUSL_LAYER,
             "size": (blobs / base_hex).stat().st_size},
            {"mediaType": OCI_LAYER_GZIP, "digest": top,
             "size": (blobs / top.removeprefix("sha256:")).stat().st_size},
        ],
    }).encode()
    manifest_digest = put(manifest)
    (dest / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest,
                       "size": len(manifest)}],
    }))
    return dest, top


def put_index(registry: Registry, repo: str, tag: str,
              entries: list[tuple[str, int, str]]) -> str:
    """PUT an OCI index into `repo:tag` naming manifests already in `repo`:
    (digest, size, architecture) each, all linux. Returns the index digest."""
    index = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                       "platform": {"architecture": arch, "os": "linux"}}
                      for digest, size, arch in entries],
    }, indent=2).encode()
    response = httpx.put(f"{registry.url}/v2/{repo}/manifests/{tag}", content=index,
                         headers={"Content-Type": OCI_INDEX}, timeout=30)
    assert response.status_code == 201, f"PUT index: {response.status_code} {response.text}"
    assert response.headers["Docker-Content-Digest"] == sha256(index)
    return sha256(index)


@dataclass(frozen=True, slots=True)
class Seeded:
    """What the session pushed into the plain registry with skopeo."""

    registry: Registry
    index_digest: str  # test/multi:latest, linux/amd64 -> musl, linux/arm64 -> glibc
    stacked_top_layer: str  # test/stacked:1's second layer (the first is MUSL_LAYER)
    stacked_manifest: str
    v2s2_manifest: str  # test/busybox-v2s2:musl, the musl image as Docker schema 2
    v2s2_config: str


# -- pytest fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registries")


@pytest.fixture(scope="session")
def skopeo_tool(registry_base: Path) -> Skopeo:
    require_tools("skopeo")
    return make_skopeo(registry_base)


@pytest.fixture(scope="session")
def registry(registry_base: Path) -> Iterator[Registry]:
    """A plain (anonymous) docker-registry on 127.0.0.1."""
    with running_registry(registry_base / "plain") as reg:
        yield reg


@pytest.fixture(scope="session")
def basic_registry(registry_base: Path) -> Iterator[Registry]:
    """A docker-registry with htpasswd Basic auth: `user`/`pass`."""
    base = registry_base / "basic"
    base.mkdir()
    auth = htpasswd_auth(base, {USER: PASSWORD})
    with running_registry(base, "basic", auth) as reg:
        yield reg


@pytest.fixture(scope="session")
def token_issuer(registry_base: Path) -> Iterator[TokenIssuer]:
    issuer = TokenIssuer(registry_base / "issuer", {USER: PASSWORD})
    issuer.start()
    try:
        yield issuer
    finally:
        issuer.stop()


@pytest.fixture(scope="session")
def token_registry(registry_base: Path, token_issuer: TokenIssuer) -> Iterator[Registry]:
    """A docker-registry with token auth trusting `token_issuer` (Docker Hub's flow)."""
    with running_registry(registry_base / "token", "token", token_issuer.registry_auth()) as reg:
        yield reg


@pytest.fixture(scope="session")
def fake_registry_server() -> Iterator[FakeRegistry]:
    fake = FakeRegistry()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture
def fake_registry(fake_registry_server: FakeRegistry) -> FakeRegistry:
    """The fake registry with no routes and an empty request log."""
    fake_registry_server.reset()
    return fake_registry_server


@pytest.fixture(scope="session")
def seeded(registry: Registry, skopeo_tool: Skopeo, registry_base: Path) -> Seeded:
    """The plain registry holding, pushed by skopeo: library/busybox:musl and :glibc (OCI),
    test/busybox-v2s2:musl (Docker schema 2), test/stacked:1 (musl + one layer) and
    test/multi:latest (an OCI index: linux/amd64 musl, linux/arm64 glibc)."""
    require_images()
    sk = skopeo_tool
    sk.push(MUSL, registry.ref("library/busybox:musl"))
    sk.push(GLIBC, registry.ref("library/busybox:glibc"))
    sk.push(MUSL, registry.ref("test/busybox-v2s2:musl"), fmt="v2s2")
    layout, top = stacked_layout(registry_base / "stacked-oci")
    sk.push(layout, registry.ref("test/stacked:1"))
    sk.push(MUSL, registry.ref("test/multi:amd64"))
    sk.push(GLIBC, registry.ref("test/multi:arm64"))
    index = put_index(registry, "test/multi", "latest", [
        (MUSL_MANIFEST, (MUSL / "blobs" / "sha256" / MUSL_MANIFEST[7:]).stat().st_size, "amd64"),
        (GLIBC_MANIFEST, (GLIBC / "blobs" / "sha256" / GLIBC_MANIFEST[7:]).stat().st_size,
         "arm64"),
    ])
    stacked = sk.inspect(registry.ref("test/stacked:1"))
    v2s2 = sk.inspect(registry.ref("test/busybox-v2s2:musl"), raw=True)
    v2s2_digest = sk.inspect(registry.ref("test/busybox-v2s2:musl"))["Digest"]
    assert v2s2["mediaType"] == DOCKER_MANIFEST, v2s2
    return Seeded(registry, index, top, str(stacked["Digest"]), str(v2s2_digest),
                  str(v2s2["config"]["digest"]))


@pytest.fixture
def client(tmp_path: Path) -> LayerfsStore:
    """`layerfs` on a fresh store with a fresh HOME: the registry client under test."""
    home = tmp_path / "home"
    home.mkdir()
    return LayerfsStore(tmp_path / "store", home)
