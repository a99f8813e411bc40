"""The registry client against real registries (distribution 2.8 on 127.0.0.1: anonymous,
htpasswd Basic auth, token auth with a test issuer) and against a fake registry that lies, cuts
and throttles. skopeo and umoci are the peers: layerfs pulls what skopeo pushed and skopeo pulls
what layerfs pushed.

The first group checks the fixtures themselves with skopeo and httpx only; the tests that drive
`layerfs pull/push/login/logout/search` are skipped while the installed CLI lacks the command.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import subprocess
import tarfile
from typing import TYPE_CHECKING

import httpx
import pytest

# The fixtures module is a plugin (pytest_plugins below) and a helper module: rewrite its asserts.
pytest.register_assert_rewrite("tests.registry_fixtures")

from tests.registry_fixtures import (  # noqa: E402
    ALL_MANIFESTS,
    DOCKER_MANIFEST,
    GLIBC,
    GLIBC_CONFIG,
    GLIBC_MANIFEST,
    LAYERFS,
    MUSL,
    MUSL_CONFIG,
    MUSL_LAYER,
    MUSL_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    PASSWORD,
    USER,
    FakeImage,
    FakeRegistry,
    LayerfsStore,
    Registry,
    Reply,
    Seeded,
    Skopeo,
    TokenIssuer,
    error_body,
    free_port,
    layerfs_commands,
    make_fake_image,
    require_images,
    sha256,
    wait_for,
)

if TYPE_CHECKING:
    from pathlib import Path

pytest_plugins = ["tests.registry_fixtures"]

COMMANDS = layerfs_commands()


def needs(*commands: str) -> pytest.MarkDecorator:
    missing = [c for c in commands if c not in COMMANDS]
    return pytest.mark.skipif(bool(missing),
                              reason=f"layerfs has no {', '.join(missing)} command yet")


CREDS = f"{USER}:{PASSWORD}"


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


# -- the fixtures, checked with skopeo and httpx --------------------------------------------------


def test_plain_registry_answers_and_holds_the_seeded_images(seeded: Seeded,
                                                            skopeo_tool: Skopeo) -> None:
    reg = seeded.registry
    assert reg.process.poll() is None
    assert httpx.get(reg.url + "/v2/").status_code == 200
    musl = skopeo_tool.inspect(reg.ref("library/busybox:musl"))
    assert musl["Digest"] == MUSL_MANIFEST
    glibc = skopeo_tool.inspect(reg.ref("library/busybox:glibc"))
    assert glibc["Digest"] == GLIBC_MANIFEST
    index = httpx.get(f"{reg.url}/v2/test/multi/manifests/latest",
                      headers={"Accept": ALL_MANIFESTS})
    assert index.headers["Content-Type"] == OCI_INDEX
    assert index.headers["Docker-Content-Digest"] == seeded.index_digest
    platforms = {m["platform"]["architecture"]: m["digest"] for m in index.json()["manifests"]}
    assert platforms == {"amd64": MUSL_MANIFEST, "arm64": GLIBC_MANIFEST}
    # the v2s2 copy keeps the config bytes, so the image id is the same
    assert seeded.v2s2_config == MUSL_CONFIG
    assert seeded.v2s2_manifest != MUSL_MANIFEST
    catalog = httpx.get(reg.url + "/v2/_catalog").json()["repositories"]
    assert {"library/busybox", "test/multi", "test/stacked"} <= set(catalog)
    # the access log is readable
    assert any(a.method == "PUT" and a.path == "/v2/test/multi/manifests/latest"
               for a in reg.accesses())


def test_range_get_on_a_real_registry_answers_206(seeded: Seeded) -> None:
    url = f"{seeded.registry.url}/v2/library/busybox/blobs/{MUSL_LAYER}"
    response = httpx.get(url, headers={"Range": "bytes=100-"}, follow_redirects=True)
    assert response.status_code == 206
    whole = (MUSL / "blobs" / "sha256" / MUSL_LAYER[7:]).read_bytes()
    assert response.content == whole[100:]


def test_basic_registry_needs_the_password(basic_registry: Registry, skopeo_tool: Skopeo) -> None:
    require_images()
    assert httpx.get(basic_registry.url + "/v2/").status_code == 401
    denied = skopeo_tool.push(MUSL, basic_registry.ref("library/busybox:musl"), check=False)
    assert denied.returncode != 0
    wrong = skopeo_tool.push(MUSL, basic_registry.ref("library/busybox:musl"),
                             creds=f"{USER}:wrong", check=False)
    assert wrong.returncode != 0
    skopeo_tool.push(MUSL, basic_registry.ref("library/busybox:musl"), creds=CREDS)
    inspected = skopeo_tool.inspect(basic_registry.ref("library/busybox:musl"), creds=CREDS)
    assert inspected["Digest"] == MUSL_MANIFEST


def test_token_registry_runs_the_bearer_flow(token_registry: Registry, token_issuer: TokenIssuer,
                                             skopeo_tool: Skopeo) -> None:
    require_images()
    challenge = httpx.get(token_registry.url + "/v2/")
    assert challenge.status_code == 401
    assert challenge.headers["WWW-Authenticate"].startswith(
        f'Bearer realm="{token_issuer.realm}"')
    denied = skopeo_tool.push(MUSL, token_registry.ref("library/busybox:musl"), check=False)
    assert denied.returncode != 0
    wrong = skopeo_tool.push(MUSL, token_registry.ref("library/busybox:musl"),
                             creds=f"{USER}:wrong", check=False)
    assert wrong.returncode != 0
    assert any(r.status == 401 for r in token_issuer.requests)
    skopeo_tool.push(MUSL, token_registry.ref("library/busybox:musl"), creds=CREDS)
    skopeo_tool.push(MUSL, token_registry.ref("public/busybox:musl"), creds=CREDS)
    granted = [r for r in token_issuer.requests if r.user == USER and r.status == 200]
    assert any(g["name"] == "library/busybox" and "push" in g["actions"]
               for r in granted for g in r.granted)
    inspected = skopeo_tool.inspect(token_registry.ref("library/busybox:musl"), creds=CREDS)
    assert inspected["Digest"] == MUSL_MANIFEST
    # anonymous: public/* can be pulled, the rest cannot
    assert skopeo_tool.inspect(token_registry.ref("public/busybox:musl"))["Digest"] == \
        MUSL_MANIFEST
    private = skopeo_tool.run("inspect", "--tls-verify=false",
                              f"docker://{token_registry.ref('library/busybox:musl')}",
                              check=False)
    assert private.returncode != 0
    # the registry really checks the signature: a token from another key is refused
    other = TokenIssuer(token_registry.root.parent / "other-issuer", {USER: PASSWORD})
    forged = other.sign(USER, [{"type": "repository", "name": "library/busybox",
                                "actions": ["pull"]}])
    response = httpx.get(f"{token_registry.url}/v2/library/busybox/manifests/musl",
                         headers={"Authorization": f"Bearer {forged}", "Accept": ALL_MANIFESTS})
    assert response.status_code == 401
    good = token_issuer.sign(USER, [{"type": "repository", "name": "library/busybox",
                                     "actions": ["pull"]}])
    response = httpx.get(f"{token_registry.url}/v2/library/busybox/manifests/musl",
                         headers={"Authorization": f"Bearer {good}", "Accept": ALL_MANIFESTS})
    assert response.status_code == 200
    assert response.headers["Docker-Content-Digest"] == MUSL_MANIFEST


def test_fake_registry_scripts_replies(fake_registry: FakeRegistry) -> None:
    image = make_fake_image()
    fake_registry.serve_image("fake/img", "1", image)
    half = len(image.layer) // 2
    path = f"/v2/fake/img/blobs/{image.layer_digest}"
    fake_registry.route(path, FakeRegistry.blob(image.layer, send_only=half),
                        FakeRegistry.blob(image.layer))
    base = f"http://{fake_registry.host}"
    assert httpx.get(base + "/v2/").status_code == 200
    manifest = httpx.get(f"{base}/v2/fake/img/manifests/1")
    assert manifest.content == image.manifest
    assert manifest.headers["Content-Type"] == OCI_MANIFEST
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(base + path)
    resumed = httpx.get(base + path, headers={"Range": f"bytes={half}-"})
    assert resumed.status_code == 206
    assert resumed.headers["Content-Range"] == f"bytes {half}-{len(image.layer) - 1}/" \
        f"{len(image.layer)}"
    assert image.layer[:half] + resumed.content == image.layer
    assert fake_registry.requests_for(path)[-1].headers["range"] == f"bytes={half}-"
    fake_registry.route(path, FakeRegistry.blob(image.layer, send_only=half, reset=True))
    with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
        httpx.get(base + path)
    fake_registry.route(path, Reply(500, b"oops"), FakeRegistry.blob(image.layer))
    assert httpx.get(base + path).status_code == 500
    assert httpx.get(base + path).content == image.layer
    assert httpx.get(f"{base}/v2/fake/img/manifests/2").status_code == 404


# -- pull: what skopeo pushed ---------------------------------------------------------------------


def pull_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if line.strip()]


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def blob_gets(reg: Registry, since: int) -> list[str]:
    return [a.path for a in reg.accesses(since) if a.method == "GET" and "/blobs/" in a.path]


@needs("pull")
def test_pull_by_tag_gives_the_same_digest_and_image_id(seeded: Seeded,
                                                        client: LayerfsStore) -> None:
    ref = seeded.registry.ref("library/busybox:musl")
    out = client.ok("pull", ref)
    lines = pull_lines(out)
    assert f"{short(MUSL_LAYER)}: Pull complete" in lines, out
    assert f"Digest: {MUSL_MANIFEST}" in lines, out
    assert f"Status: Downloaded newer image for {ref}" in lines, out
    info = client.inspect(ref)
    assert info["Id"] == MUSL_CONFIG
    assert info["Manifest"]["Digest"] == MUSL_MANIFEST
    assert info["Manifest"]["MediaType"] == OCI_MANIFEST
    assert (client.root / "blobs" / "sha256" / MUSL_LAYER[7:]).is_file()


@needs("pull")
def test_pull_by_digest(seeded: Seeded, client: LayerfsStore) -> None:
    ref = seeded.registry.ref(f"library/busybox@{MUSL_MANIFEST}")
    out = client.ok("pull", ref)
    assert f"Digest: {MUSL_MANIFEST}" in pull_lines(out), out
    assert client.inspect(ref)["Id"] == MUSL_CONFIG


@needs("pull")
def test_second_pull_is_up_to_date_and_downloads_nothing(seeded: Seeded,
                                                         client: LayerfsStore) -> None:
    ref = seeded.registry.ref("library/busybox:glibc")
    client.ok("pull", ref)
    before = client.snapshot()
    mark = seeded.registry.log_mark()
    out = client.ok("pull", ref)
    lines = pull_lines(out)
    assert f"Status: Image is up to date for {ref}" in lines, out
    assert f"Digest: {GLIBC_MANIFEST}" in lines, out
    assert not any("Pull complete" in line for line in lines), out
    assert blob_gets(seeded.registry, mark) == []
    assert client.snapshot().blobs == before.blobs
    assert client.inspect(ref)["Id"] == GLIBC_CONFIG


@needs("pull")
def test_shared_layers_already_exist(seeded: Seeded, client: LayerfsStore) -> None:
    client.ok("pull", seeded.registry.ref("library/busybox:musl"))
    mark = seeded.registry.log_mark()
    out = client.ok("pull", seeded.registry.ref("test/stacked:1"))
    lines = pull_lines(out)
    assert f"{short(MUSL_LAYER)}: Already exists" in lines, out
    assert f"{short(seeded.stacked_top_layer)}: Pull complete" in lines, out
    assert f"Digest: {seeded.stacked_manifest}" in lines, out
    assert not any(MUSL_LAYER in path for path in blob_gets(seeded.registry, mark))
    assert len(list((client.root / "layers").iterdir())) == 2


@needs("pull")
def test_index_gives_the_host_platform(seeded: Seeded, client: LayerfsStore) -> None:
    ref = seeded.registry.ref("test/multi:latest")
    out = client.ok("pull", ref)
    expected = {"amd64": MUSL_CONFIG, "arm64": GLIBC_CONFIG}.get(host_arch())
    if expected is None:
        pytest.skip(f"no image for this host's platform ({host_arch()}) in the index")
    info = client.inspect(ref)
    assert info["Id"] == expected
    # docker prints, and records as the repo digest, the digest the tag names: the index's
    assert f"Digest: {seeded.index_digest}" in pull_lines(out), out
    assert f"{seeded.registry.ref('test/multi')}@{seeded.index_digest}" in info["RepoDigests"]


@needs("pull")
def test_index_by_digest(seeded: Seeded, client: LayerfsStore) -> None:
    ref = seeded.registry.ref(f"test/multi@{seeded.index_digest}")
    client.ok("pull", "--platform", "linux/arm64", ref)
    assert client.inspect(ref)["Id"] == GLIBC_CONFIG


@needs("pull")
def test_index_platform_option_picks_the_other(seeded: Seeded, client: LayerfsStore) -> None:
    ref = seeded.registry.ref("test/multi:latest")
    client.ok("pull", "--platform", "linux/arm64", ref)
    assert client.inspect(ref)["Id"] == GLIBC_CONFIG
    client.ok("pull", "--platform", "linux/amd64", ref)
    assert client.inspect(ref)["Id"] == MUSL_CONFIG


@needs("pull")
def test_index_without_the_platform_is_a_clear_error(seeded: Seeded,
                                                     client: LayerfsStore) -> None:
    ref = seeded.registry.ref("test/multi:latest")
    before = client.snapshot()
    line = client.fails("pull", "--platform", "linux/s390x", ref)
    assert "test/multi" in line
    assert "linux/s390x" in line
    client.assert_unchanged(before)


@needs("pull")
def test_docker_schema2_manifest(seeded: Seeded, client: LayerfsStore) -> None:
    ref = seeded.registry.ref("test/busybox-v2s2:musl")
    out = client.ok("pull", ref)
    assert f"Digest: {seeded.v2s2_manifest}" in pull_lines(out), out
    info = client.inspect(ref)
    assert info["Id"] == MUSL_CONFIG
    assert info["Manifest"]["MediaType"] == DOCKER_MANIFEST
    assert info["Manifest"]["Digest"] == seeded.v2s2_manifest
    # and the OCI one next to it shares the layer
    out = client.ok("pull", seeded.registry.ref("library/busybox:musl"))
    assert f"{short(MUSL_LAYER)}: Already exists" in pull_lines(out) or \
        "Image is up to date" in out, out


@needs("pull")
def test_missing_tag_is_a_404_error(seeded: Seeded, client: LayerfsStore) -> None:
    ref = seeded.registry.ref("library/busybox:no-such-tag")
    before = client.snapshot()
    line = client.fails("pull", ref)
    assert "library/busybox" in line and "no-such-tag" in line, line
    assert any(word in line.lower() for word in ("not found", "unknown", "404")), line
    client.assert_unchanged(before)


@needs("pull")
def test_registry_down(client: LayerfsStore) -> None:
    ref = f"127.0.0.1:{free_port()}/library/busybox:musl"
    before = client.snapshot()
    line = client.fails("pull", ref, timeout=60)
    assert "library/busybox" in line, line
    client.assert_unchanged(before)


@needs("pull")
def test_pull_all_tags(seeded: Seeded, client: LayerfsStore) -> None:
    client.ok("pull", "-a", seeded.registry.ref("library/busybox"))
    assert client.inspect(seeded.registry.ref("library/busybox:musl"))["Id"] == MUSL_CONFIG
    assert client.inspect(seeded.registry.ref("library/busybox:glibc"))["Id"] == GLIBC_CONFIG


@needs("push")
def test_push_errors(seeded: Seeded, client: LayerfsStore, tmp_path: Path) -> None:
    missing = seeded.registry.ref("test/never-made:1")
    line = client.fails("push", missing)
    assert "test/never-made" in line, line
    client.ok("import", str(rootfs_tarball(tmp_path / "root.tar", b"x\n")), "test/down:1")
    down = f"127.0.0.1:{free_port()}/test/down:1"
    client.ok("tag", "test/down:1", down)
    before = client.snapshot()
    line = client.fails("push", down, timeout=60)
    assert "test/down" in line, line
    client.assert_unchanged(before)


@needs("pull")
def test_concurrent_pulls_share_one_layer(seeded: Seeded, client: LayerfsStore) -> None:
    ref = seeded.registry.ref("test/stacked:1")
    argv = [str(LAYERFS), "--root", str(client.root), "pull", ref]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=client.env) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for code, _out, err in results:
        assert code == 0, err
    assert client.inspect(ref)["Config"] is not None
    assert len(list((client.root / "layers").iterdir())) == 2
    assert not client.snapshot().tmp


@needs("search")
def test_search_limit(seeded: Seeded, client: LayerfsStore) -> None:
    out = client.ok("search", "--limit", "1", seeded.registry.ref("busy"))
    rows = [line for line in out.splitlines()[1:] if line.strip()]
    assert len(rows) == 1, out


@needs("search")
def test_search_lists_the_catalog(seeded: Seeded, client: LayerfsStore) -> None:
    out = client.ok("search", seeded.registry.ref("busy"))
    lines = out.splitlines()
    assert lines and lines[0].split()[:2] == ["NAME", "DESCRIPTION"], out
    names = [line.split()[0] for line in lines[1:] if line.strip()]
    assert any(name.endswith("library/busybox") for name in names), out
    assert any(name.endswith("test/busybox-v2s2") for name in names), out
    assert not any("test/multi" in name or "test/stacked" in name for name in names), out


@needs("pull", "umount")
def test_mount_pulls_a_missing_image(seeded: Seeded, client: LayerfsStore, tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    ref = seeded.registry.ref("library/busybox:musl")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        client.ok("mount", ref, str(mnt))
        assert (mnt / "bin" / "busybox").is_file()
        assert client.inspect(ref)["Id"] == MUSL_CONFIG
    finally:
        if os.path.ismount(mnt):
            result = client.run("umount", str(mnt))
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
            assert result.returncode == 0, result.stderr


# -- push: what skopeo pulls ----------------------------------------------------------------------


def rootfs_tarball(path: Path, marker: bytes) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in (("etc/marker", marker, 0o644),
                                 ("bin/hello", b"#!/bin/sh\necho hello\n", 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("var/empty")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
        tar.addfile(info)
    return path


def uploads(reg: Registry, since: int, repo: str) -> list[str]:
    """Blob upload requests into `repo` (POST starts, PATCH chunks, PUT completions)."""
    return [f"{a.method} {a.path}" for a in reg.accesses(since)
            if a.path.startswith(f"/v2/{repo}/blobs/uploads")]


def blob_digests(reg: Registry, ref: str) -> list[str]:
    """The layer digests of the manifest `ref` (HOST/REPO:TAG) names in `reg`."""
    repo, _, tag = ref.removeprefix(reg.host + "/").rpartition(":")
    manifest = httpx.get(f"{reg.url}/v2/{repo}/manifests/{tag}",
                         headers={"Accept": ALL_MANIFESTS}).json()
    return [layer["digest"] for layer in manifest["layers"]]


def assert_layers_mounted(reg: Registry, since: int, repo: str, source: str,
                          layers: list[str]) -> None:
    """Each layer went into `repo` by a cross-repository mount from `source`, never uploaded.
    (The config may be uploaded: docker does not mount configs either.)"""
    requests = [a for a in reg.accesses(since) if a.path.startswith(f"/v2/{repo}/blobs/uploads")]
    shown = [f"{a.method} {a.path[:160]} {a.status}" for a in requests]
    for digest in layers:
        assert any(a.method == "POST" and f"mount={digest}" in a.path
                   and f"from={source}" in a.path and a.status == 201
                   for a in requests), f"{digest} not mounted from {source}: {shown}"
        assert not any(a.method in ("PUT", "PATCH") and f"digest={digest}" in a.path
                       for a in requests), f"{digest} uploaded: {shown}"


@needs("push")
def test_skopeo_pulls_what_layerfs_pushed(seeded: Seeded, client: LayerfsStore,
                                          skopeo_tool: Skopeo, tmp_path: Path) -> None:
    reg = seeded.registry
    marker = f"pushed by layerfs {tmp_path.name}\n".encode()
    client.ok("import", str(rootfs_tarball(tmp_path / "root.tar", marker)), "test/img:1")
    ref = reg.ref("test/img:1")
    client.ok("tag", "test/img:1", ref)
    local = client.inspect(ref)
    mark = reg.log_mark()
    client.ok("push", ref)
    assert uploads(reg, mark, "test/img"), "no blob was uploaded"
    assert reg.accesses(mark)[-1].method == "PUT" or any(
        a.method == "PUT" and "/manifests/" in a.path for a in reg.accesses(mark))
    remote = skopeo_tool.inspect(ref)
    assert remote["Digest"] == local["Manifest"]["Digest"]
    raw = skopeo_tool.inspect(ref, raw=True)
    assert raw["config"]["digest"] == local["Id"]
    # skopeo copies it out, umoci unpacks it
    layout = tmp_path / "oci"
    skopeo_tool.run("copy", "-q", "--src-tls-verify=false", f"docker://{ref}",
                    f"oci:{layout}:pushed")
    bundle = tmp_path / "bundle"
    result = subprocess.run(["umoci", "unpack", "--image", f"{layout}:pushed", str(bundle)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (bundle / "rootfs" / "etc" / "marker").read_bytes() == marker
    assert (bundle / "rootfs" / "bin" / "hello").stat().st_mode & 0o777 == 0o755
    # a fresh store pulls it back to the same image
    other = LayerfsStore(tmp_path / "store2", client.home)
    other.ok("pull", ref)
    assert other.inspect(ref)["Id"] == local["Id"]


@needs("push")
def test_push_again_uploads_nothing_and_another_repo_mounts(seeded: Seeded,
                                                            client: LayerfsStore,
                                                            tmp_path: Path) -> None:
    reg = seeded.registry
    marker = f"mount test {tmp_path.name}\n".encode()
    client.ok("import", str(rootfs_tarball(tmp_path / "root.tar", marker)), "test/mnt-a:1")
    first, second = reg.ref("test/mnt-a:1"), reg.ref("test/mnt-b:1")
    client.ok("tag", "test/mnt-a:1", first)
    client.ok("tag", "test/mnt-a:1", second)
    client.ok("push", first)
    mark = reg.log_mark()
    client.ok("push", first)
    again = reg.accesses(mark)
    assert uploads(reg, mark, "test/mnt-a") == [], again
    assert any(a.method == "HEAD" and "/blobs/" in a.path for a in again), again
    mark = reg.log_mark()
    client.ok("push", second)
    assert_layers_mounted(reg, mark, "test/mnt-b", "test/mnt-a", blob_digests(reg, first))
    local = client.inspect(second)
    response = httpx.get(f"{reg.url}/v2/test/mnt-b/manifests/1",
                         headers={"Accept": ALL_MANIFESTS})
    assert response.headers["Docker-Content-Digest"] == local["Manifest"]["Digest"]


@needs("push")
def test_push_pulled_image_to_another_repo(seeded: Seeded, client: LayerfsStore) -> None:
    """The official busybox, pulled then pushed under another name, keeps its manifest bytes."""
    reg = seeded.registry
    client.ok("pull", reg.ref("library/busybox:musl"))
    target = reg.ref("test/busybox-copy:1")
    client.ok("tag", reg.ref("library/busybox:musl"), target)
    mark = reg.log_mark()
    client.ok("push", target)
    assert_layers_mounted(reg, mark, "test/busybox-copy", "library/busybox", [MUSL_LAYER])
    response = httpx.head(f"{reg.url}/v2/test/busybox-copy/manifests/1",
                          headers={"Accept": ALL_MANIFESTS})
    assert response.headers["Docker-Content-Digest"] == MUSL_MANIFEST


# -- Basic auth -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_seeded(basic_registry: Registry, skopeo_tool: Skopeo) -> Registry:
    require_images()
    skopeo_tool.push(MUSL, basic_registry.ref("library/busybox:musl"), creds=CREDS)
    return basic_registry


def auth_entries(client: LayerfsStore) -> dict[str, object]:
    path = client.root / "auth.json"
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    auths = doc.get("auths", doc)
    assert isinstance(auths, dict)
    return auths


@needs("pull", "login", "logout")
def test_basic_auth_login_pull_push_logout(basic_seeded: Registry, client: LayerfsStore) -> None:
    reg = basic_seeded
    ref = reg.ref("library/busybox:musl")
    before = client.snapshot()
    line = client.fails("pull", ref)
    assert "library/busybox" in line, line
    client.assert_unchanged(before)
    client.ok("login", "-u", USER, "-p", PASSWORD, reg.host)
    assert any(reg.host in key for key in auth_entries(client)), auth_entries(client)
    assert (client.root / "auth.json").stat().st_mode & 0o077 == 0
    client.ok("pull", ref)
    assert client.inspect(ref)["Id"] == MUSL_CONFIG
    target = reg.ref("test/pushed:1")
    client.ok("tag", ref, target)
    client.ok("push", target)
    response = httpx.get(f"{reg.url}/v2/test/pushed/manifests/1", auth=(USER, PASSWORD),
                         headers={"Accept": ALL_MANIFESTS})
    assert response.headers["Docker-Content-Digest"] == MUSL_MANIFEST
    client.ok("logout", reg.host)
    assert not any(reg.host in key for key in auth_entries(client))
    client.ok("rmi", ref)
    line = client.fails("pull", ref)
    assert "library/busybox" in line, line


@needs("login")
def test_basic_auth_wrong_password(basic_seeded: Registry, client: LayerfsStore) -> None:
    line = client.fails("login", "-u", USER, "-p", "wrong", basic_seeded.host)
    assert basic_seeded.host in line, line
    assert auth_entries(client) == {}


@needs("login")
def test_login_password_stdin(basic_seeded: Registry, client: LayerfsStore) -> None:
    client.ok("login", "-u", USER, "--password-stdin", basic_seeded.host, input=PASSWORD + "\n")
    assert any(basic_seeded.host in key for key in auth_entries(client))


@needs("pull")
def test_basic_auth_from_docker_config(basic_seeded: Registry, client: LayerfsStore) -> None:
    docker = client.home / ".docker"
    docker.mkdir()
    auth = base64.b64encode(CREDS.encode()).decode()
    (docker / "config.json").write_text(json.dumps(
        {"auths": {basic_seeded.host: {"auth": auth}}}))
    ref = basic_seeded.ref("library/busybox:musl")
    client.ok("pull", ref)
    assert client.inspect(ref)["Id"] == MUSL_CONFIG


# -- token auth -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_seeded(token_registry: Registry, skopeo_tool: Skopeo) -> Registry:
    require_images()
    skopeo_tool.push(MUSL, token_registry.ref("library/busybox:musl"), creds=CREDS)
    skopeo_tool.push(GLIBC, token_registry.ref("public/busybox:glibc"), creds=CREDS)
    return token_registry


@needs("pull", "login")
def test_token_auth_pull_and_push(token_seeded: Registry, token_issuer: TokenIssuer,
                                  client: LayerfsStore) -> None:
    reg = token_seeded
    client.ok("login", "-u", USER, "-p", PASSWORD, reg.host)
    asked = len(token_issuer.requests)
    ref = reg.ref("library/busybox:musl")
    client.ok("pull", ref)
    assert client.inspect(ref)["Id"] == MUSL_CONFIG
    issued = token_issuer.requests[asked:]
    assert any(r.user == USER and r.status == 200 and
               any(g["name"] == "library/busybox" for g in r.granted) for r in issued), issued
    target = reg.ref("team/busybox:1")
    client.ok("tag", ref, target)
    client.ok("push", target)
    good = token_issuer.sign(USER, [{"type": "repository", "name": "team/busybox",
                                     "actions": ["pull"]}])
    response = httpx.head(f"{reg.url}/v2/team/busybox/manifests/1",
                          headers={"Authorization": f"Bearer {good}", "Accept": ALL_MANIFESTS})
    assert response.headers["Docker-Content-Digest"] == MUSL_MANIFEST
    issued = token_issuer.requests[asked:]
    assert any("push" in g["actions"] and g["name"] == "team/busybox"
               for r in issued for g in r.granted), issued


@needs("pull")
def test_token_auth_anonymous_public_pull(token_seeded: Registry, client: LayerfsStore) -> None:
    ref = token_seeded.ref("public/busybox:glibc")
    client.ok("pull", ref)
    assert client.inspect(ref)["Id"] == GLIBC_CONFIG


@needs("pull")
def test_token_auth_private_repo_without_credentials(token_seeded: Registry,
                                                     client: LayerfsStore) -> None:
    ref = token_seeded.ref("library/busybox:musl")
    before = client.snapshot()
    line = client.fails("pull", ref)
    assert "library/busybox" in line, line
    assert any(word in line.lower() for word in
               ("unauthorized", "authentication", "401", "denied", "credentials")), line
    client.assert_unchanged(before)


@needs("login")
def test_token_auth_wrong_password(token_seeded: Registry, client: LayerfsStore) -> None:
    line = client.fails("login", "-u", USER, "-p", "wrong", token_seeded.host)
    assert token_seeded.host in line, line
    assert auth_entries(client) == {}


# -- faults: a registry that lies, cuts, throttles ------------------------------------------------


@pytest.fixture
def fake_image() -> FakeImage:
    return make_fake_image()


def assert_pull_fails(client: LayerfsStore, ref: str, repo: str, *words: str) -> str:
    before = client.snapshot()
    line = client.fails("pull", ref, timeout=90)
    assert repo in line, f"the error does not name {repo}: {line}"
    if words:
        assert any(w in line.lower() for w in words), f"expected one of {words}: {line}"
    client.assert_unchanged(before)
    return line


@needs("pull")
def test_fake_layer_bytes_do_not_match_the_digest(fake_registry: FakeRegistry,
                                                  fake_image: FakeImage,
                                                  client: LayerfsStore) -> None:
    fake_registry.serve_image("fault/lies", "1", fake_image)
    layer = bytearray(fake_image.layer)
    layer[len(layer) // 2] ^= 0xFF  # same size, other bytes
    fake_registry.route(f"/v2/fault/lies/blobs/{fake_image.layer_digest}",
                        FakeRegistry.blob(bytes(layer)))
    assert_pull_fails(client, fake_registry.ref("fault/lies:1"), "fault/lies", "digest")


@needs("pull")
def test_fake_config_does_not_match_the_digest(fake_registry: FakeRegistry,
                                               fake_image: FakeImage,
                                               client: LayerfsStore) -> None:
    fake_registry.serve_image("fault/config", "1", fake_image)
    fake_registry.route(f"/v2/fault/config/blobs/{fake_image.config_digest}",
                        FakeRegistry.blob(fake_image.config.replace(b"amd64", b"arm64")))
    assert_pull_fails(client, fake_registry.ref("fault/config:1"), "fault/config", "digest")


@needs("pull")
def test_fake_manifest_does_not_match_the_pinned_digest(fake_registry: FakeRegistry,
                                                        fake_image: FakeImage,
                                                        client: LayerfsStore) -> None:
    fake_registry.serve_image("fault/manifest", "1", fake_image)
    lie = fake_image.manifest + b"\n"
    fake_registry.route(f"/v2/fault/manifest/manifests/{fake_image.manifest_digest}",
                        Reply(body=lie, headers=(("Content-Type", OCI_MANIFEST),
                                                 ("Docker-Content-Digest",
                                                  fake_image.manifest_digest))))
    ref = fake_registry.ref(f"fault/manifest@{fake_image.manifest_digest}")
    assert_pull_fails(client, ref, "fault/manifest", "digest")


@needs("pull")
def test_fake_truncated_layer(fake_registry: FakeRegistry, fake_image: FakeImage,
                              client: LayerfsStore) -> None:
    fake_registry.serve_image("fault/short", "1", fake_image)
    path = f"/v2/fault/short/blobs/{fake_image.layer_digest}"
    fake_registry.route(path, FakeRegistry.blob(fake_image.layer,
                                                send_only=len(fake_image.layer) // 3,
                                                ranges=False))
    assert_pull_fails(client, fake_registry.ref("fault/short:1"), "fault/short")
    assert len(fake_registry.requests_for(path, "GET")) < 20, "retried without end"


@needs("pull")
def test_fake_connection_reset_mid_layer(fake_registry: FakeRegistry, fake_image: FakeImage,
                                         client: LayerfsStore) -> None:
    fake_registry.serve_image("fault/reset", "1", fake_image)
    path = f"/v2/fault/reset/blobs/{fake_image.layer_digest}"
    fake_registry.route(path, FakeRegistry.blob(fake_image.layer,
                                                send_only=len(fake_image.layer) // 2,
                                                reset=True, ranges=False))
    assert_pull_fails(client, fake_registry.ref("fault/reset:1"), "fault/reset")


@needs("pull")
def test_fake_unknown_manifest_media_type(fake_registry: FakeRegistry, fake_image: FakeImage,
                                          client: LayerfsStore) -> None:
    weird = "application/vnd.example.unknown.v1+json"
    body = fake_image.manifest.replace(OCI_MANIFEST.encode(), weird.encode())
    fake_registry.route("/v2/fault/weird/manifests/1", Reply(body=body, headers=(
        ("Content-Type", weird), ("Docker-Content-Digest", sha256(body)))))
    line = assert_pull_fails(client, fake_registry.ref("fault/weird:1"), "fault/weird")
    assert weird in line or "media type" in line.lower(), line


@needs("pull")
def test_fake_429_with_retry_after_is_retried(fake_registry: FakeRegistry,
                                              fake_image: FakeImage,
                                              client: LayerfsStore) -> None:
    fake_registry.serve_image("fault/busy", "1", fake_image)
    path = "/v2/fault/busy/manifests/1"
    ok = Reply(body=fake_image.manifest, headers=(
        ("Content-Type", OCI_MANIFEST), ("Docker-Content-Digest", fake_image.manifest_digest)))
    throttled = Reply(429, error_body("TOOMANYREQUESTS", "slow down"), (
        ("Content-Type", "application/json"), ("Retry-After", "1")))
    fake_registry.route(path, throttled, ok)
    ref = fake_registry.ref("fault/busy:1")
    client.ok("pull", ref, timeout=60)
    assert len(fake_registry.requests_for(path)) >= 2
    assert client.inspect(ref)["Id"] == fake_image.config_digest


@needs("pull")
def test_fake_500_twice_then_success(fake_registry: FakeRegistry, fake_image: FakeImage,
                                     client: LayerfsStore) -> None:
    fake_registry.serve_image("fault/flaky", "1", fake_image)
    path = f"/v2/fault/flaky/blobs/{fake_image.layer_digest}"
    failing = Reply(500, error_body("UNKNOWN", "internal error"),
                    (("Content-Type", "application/json"),))
    fake_registry.route(path, failing, failing, FakeRegistry.blob(fake_image.layer))
    ref = fake_registry.ref("fault/flaky:1")
    client.ok("pull", ref, timeout=60)
    assert len(fake_registry.requests_for(path, "GET")) >= 3
    assert client.inspect(ref)["Id"] == fake_image.config_digest


@needs("pull")
def test_fake_toomanyrequests_is_a_clear_error(fake_registry: FakeRegistry,
                                               fake_image: FakeImage,
                                               client: LayerfsStore) -> None:
    fake_registry.route("/v2/fault/limit/manifests/1", Reply(429, error_body(
        "TOOMANYREQUESTS", "You have reached your pull rate limit."),
        (("Content-Type", "application/json"),)))
    assert_pull_fails(client, fake_registry.ref("fault/limit:1"), "fault/limit",
                      "toomanyrequests", "too many requests", "rate limit")


@needs("pull")
@pytest.mark.parametrize("size", [3 << 20, 64 << 10], ids=["3MiB", "64KiB"])
def test_fake_cut_layer_is_resumed_with_range(fake_registry: FakeRegistry, size: int,
                                              client: LayerfsStore) -> None:
    """Cut once after half the bytes, then honour `Range: bytes=N-` with 206: the pull succeeds
    and goes on from the bytes it has (the small layer is cut before 1 MiB has arrived)."""
    image = make_fake_image(payload_size=size)
    fake_registry.serve_image("fault/resume", "1", image)
    path = f"/v2/fault/resume/blobs/{image.layer_digest}"
    half = len(image.layer) // 2
    fake_registry.route(path, FakeRegistry.blob(image.layer, send_only=half),
                        FakeRegistry.blob(image.layer))
    ref = fake_registry.ref("fault/resume:1")
    client.ok("pull", ref, timeout=60)
    assert client.inspect(ref)["Id"] == image.config_digest
    ranges = [r.headers.get("range", "") for r in fake_registry.requests_for(path, "GET")]
    resumed = [r for r in ranges if r.startswith("bytes=") and r != "bytes=0-"]
    assert resumed, f"no Range request after the cut at {half} of {len(image.layer)}: {ranges}"
    start = int(resumed[0].removeprefix("bytes=").split("-")[0])
    assert 0 < start <= half, ranges
    assert not client.snapshot().tmp


def test_wait_for_reports_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match="the impossible"):
        wait_for(lambda: False, "the impossible", timeout=0.05)


@needs("push")
def test_a_big_layer_goes_up_in_chunks(seeded: Seeded, client: LayerfsStore,
                                       skopeo_tool: Skopeo, tmp_path: Path) -> None:
    reg = seeded.registry
    big = os.urandom(40 << 20)  # incompressible: the gzip blob stays above the chunk size
    tarball = tmp_path / "big.tar"
    with tarfile.open(tarball, "w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("data/big.bin")
        info.size, info.mode, info.mtime = len(big), 0o644, 1_600_000_000
        tar.addfile(info, io.BytesIO(big))
    ref = reg.ref("test/big:1")
    client.ok("import", str(tarball), ref)
    mark = reg.log_mark()
    client.ok("push", ref)
    sent = uploads(reg, mark, "test/big")
    assert sum(1 for line in sent if line.startswith("PATCH")) >= 2, sent
    assert skopeo_tool.inspect(ref)["Digest"] == client.inspect(ref)["Manifest"]["Digest"]
    other = LayerfsStore(tmp_path / "store2", client.home)
    other.ok("pull", ref)
    assert other.inspect(ref)["Id"] == client.inspect(ref)["Id"]
