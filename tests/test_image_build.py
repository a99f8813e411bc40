"""`layerfs build` through the command, on a busybox root: steps, the cache, stages, COPY and
ADD, and bad input. The same Dockerfiles against buildah are in test_build_peer.py.

Each test has its own store with busybox imported as `bb:base`, and leaves no container and
no mount behind (the store fixture fails a test that does).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from typing import TYPE_CHECKING

import pytest

from benchmarks.builds import _LAYERFS_CACHED, _LAYERFS_STEP, steps_run
from tests.containertools import USER_UID, ContainerStore, busybox_user_tarball

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.containertools import ImageFacts

IMAGE = "bb:base"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "store"
    tarball = busybox_user_tarball(tmp_path_factory.mktemp("busybox"))
    ContainerStore(root).ok("import", str(tarball), IMAGE)
    return root


@pytest.fixture
def store(tmp_path: Path, template: Path) -> Iterator[ContainerStore]:
    s = ContainerStore.copy_of(template, tmp_path / "store")
    try:
        yield s
    finally:
        s.cleanup()
        left = [c for c in s.container_ids() if json.loads(
            (s.root / "containers" / c / "state.json").read_text())["image_ref"].startswith(
            "build:")]
        assert left == [], "a build left a container behind"


def context(tmp_path: Path, dockerfile: str, files: dict[str, bytes | str] | None = None,
            name: str = "ctx") -> Path:
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile)
    for path, data in (files or {}).items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        target.write_bytes(data)
    return root


def build(store: ContainerStore, ctx: Path, *args: str) -> str:
    return store.ok("build", *args, str(ctx))


def files_of(store: ContainerStore, image: str, mnt: Path, *paths: str) -> dict[str, str]:
    """Each path's content in a container of `image` (None-less: missing paths fail)."""
    with store.mounted(image, mnt) as root:
        return {p: (root / p.lstrip("/")).read_text() for p in paths}


def steps(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Step ")]


BASIC = """\
FROM bb:base
ARG GREETING=hello
ENV NAME=world WHO="two words"
RUN echo "$GREETING $NAME" > /greeting && mkdir -p /data && echo one > /data/one
WORKDIR /app
COPY hello.txt ./
COPY dir/ /app/dir/
USER 1000:1000
EXPOSE 8080 53/udp
VOLUME /data
LABEL org.example.name="basic" version=1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo $NAME"]
"""


def test_basic_build_makes_layers_config_and_history(store: ContainerStore,
                                                     tmp_path: Path) -> None:
    ctx = context(tmp_path, BASIC, {"hello.txt": "hi\n", "dir/a": "a\n", "dir/sub/b": "b\n"})
    out = build(store, ctx, "-t", "basic:1")
    assert [s.split(" : ")[0] for s in steps(out)] == [f"Step {i}/14" for i in range(1, 15)]
    assert "Step 4/14 : RUN echo \"$GREETING $NAME\"" in out
    assert re.search(r"^Successfully built [0-9a-f]{12}$", out, re.M)
    assert out.rstrip().endswith("Successfully tagged basic:1")

    facts: ImageFacts = store.image("basic:1")
    config = facts.config["config"]
    assert "NAME=world" in config["Env"] and "WHO=two words" in config["Env"]
    assert not any(e.startswith("GREETING=") for e in config["Env"]), "ARG must not persist"
    assert config["WorkingDir"] == "/app"
    assert config["User"] == "1000:1000"
    assert config["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert config["Volumes"] == {"/data": {}}
    assert config["Labels"] == {"org.example.name": "basic", "version": "1"}
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["/bin/sh", "-c"]
    assert config["Cmd"] == ["echo $NAME"]
    base_layers = len(store.image(IMAGE).diff_ids)
    # RUN, WORKDIR (it makes /app), COPY, COPY: four layers; the rest only change the config
    assert len(facts.diff_ids) == base_layers + 4
    history = facts.config["history"][-14 + 1:]
    empty = [h.get("empty_layer", False) for h in history]
    assert empty.count(False) == 4
    assert history[-1]["created_by"] == '/bin/sh -c #(nop)  CMD ["echo $NAME"]'

    got = files_of(store, "basic:1", tmp_path / "mnt", "/greeting", "/app/hello.txt",
                   "/app/dir/a", "/app/dir/sub/b", "/data/one")
    assert got == {"/greeting": "hello world\n", "/app/hello.txt": "hi\n", "/app/dir/a": "a\n",
                   "/app/dir/sub/b": "b\n", "/data/one": "one\n"}


def test_rebuild_with_nothing_changed_runs_no_step(store: ContainerStore,
                                                   tmp_path: Path) -> None:
    ctx = context(tmp_path, BASIC, {"hello.txt": "hi\n", "dir/a": "a\n"})
    first = build(store, ctx, "-t", "basic:1")
    image = store.image_id("basic:1")
    again = build(store, ctx, "-t", "basic:2")
    assert "Running in" not in again
    assert again.count(" ---> Using cache") == 13  # every step but FROM
    assert store.image_id("basic:2") == image
    assert first.count("Running in") == 4


def test_changed_file_reruns_from_its_copy_only(store: ContainerStore, tmp_path: Path) -> None:
    dockerfile = ("FROM bb:base\nRUN echo first > /first\nCOPY a.txt /a.txt\n"
                  "RUN cat /a.txt > /copy\n")
    ctx = context(tmp_path, dockerfile, {"a.txt": "one\n"})
    build(store, ctx, "-t", "x")
    (ctx / "a.txt").write_text("two\n")
    out = build(store, ctx, "-t", "x")
    blocks = out.split("Step ")
    assert "Using cache" in blocks[2]  # RUN echo first
    assert "Using cache" not in blocks[3] and "Using cache" not in blocks[4]
    assert files_of(store, "x", tmp_path / "mnt", "/copy") == {"/copy": "two\n"}
    os.utime(ctx / "a.txt", (1, 1))  # touched, not changed: still cached
    assert "Running in" not in build(store, ctx, "-t", "x")


def test_one_line_changed_near_the_end_reruns_only_what_follows(
        store: ContainerStore, tmp_path: Path) -> None:
    """The benchmark's "changed" build, and its reading of the output (`steps_run`)."""
    dockerfile = ("ARG V=1\nFROM bb:base\nRUN echo $V > /v\nCOPY a.txt /a.txt\n"
                  "ENV X=1\nRUN cat /a.txt > /copy\nCMD [\"sh\"]\n")
    ctx = context(tmp_path, dockerfile, {"a.txt": "one\n"})
    assert steps_run(build(store, ctx, "-t", "x"), _LAYERFS_STEP, _LAYERFS_CACHED) == 5
    assert steps_run(build(store, ctx, "-t", "x"), _LAYERFS_STEP, _LAYERFS_CACHED) == 0
    (ctx / "Dockerfile").write_text(dockerfile.replace("ENV X=1", "ENV X=2"))
    out = build(store, ctx, "-t", "x")
    assert steps_run(out, _LAYERFS_STEP, _LAYERFS_CACHED) == 3
    assert out.count("Using cache") == 2 and out.count("Running in") == 1


def test_no_cache_runs_every_step(store: ContainerStore, tmp_path: Path) -> None:
    ctx = context(tmp_path, "FROM bb:base\nRUN echo a > /a\n")
    build(store, ctx)
    out = build(store, ctx, "--no-cache")
    assert "Using cache" not in out and "Running in" in out


def test_build_args_meta_args_and_defaults(store: ContainerStore, tmp_path: Path) -> None:
    dockerfile = """\
ARG BASE=bb:base
FROM ${BASE}
ARG FLAVOUR
ARG LEVEL=3
ENV OUT=/out-${FLAVOUR:-plain} LEVEL_ENV=$LEVEL
RUN echo "$FLAVOUR $LEVEL" > $OUT
"""
    ctx = context(tmp_path, dockerfile)
    build(store, ctx, "-t", "plain")
    assert files_of(store, "plain", tmp_path / "m1", "/out-plain") == {"/out-plain": " 3\n"}
    out = build(store, ctx, "-t", "spicy", "--build-arg", "FLAVOUR=spicy",
                "--build-arg", "UNUSED=1")
    assert "[Warning] One or more build-args ['UNUSED'] were not consumed" in out
    assert files_of(store, "spicy", tmp_path / "m2", "/out-spicy") == {"/out-spicy": "spicy 3\n"}
    env = store.image("spicy").config["config"]["Env"]
    assert "LEVEL_ENV=3" in env and "OUT=/out-spicy" in env


def test_multi_stage_copy_from_and_target(store: ContainerStore, tmp_path: Path) -> None:
    dockerfile = """\
FROM bb:base AS builder
RUN mkdir /build && echo built > /build/artifact && echo junk > /build/junk
FROM bb:base AS tester
RUN echo tested > /tested
FROM scratch
COPY --from=builder /build/artifact /artifact
COPY --from=1 /tested /tested
COPY --from=bb:base /bin/busybox /bin/busybox
CMD ["/bin/busybox", "true"]
"""
    ctx = context(tmp_path, dockerfile)
    build(store, ctx, "-t", "final")
    facts = store.image("final")
    assert len(facts.diff_ids) == 3
    with store.mounted("final", tmp_path / "mnt") as root:
        assert sorted(os.listdir(root)) == ["artifact", "bin", "tested"]
        assert (root / "artifact").read_text() == "built\n"
        assert os.access(root / "bin" / "busybox", os.X_OK)
    build(store, ctx, "-t", "onlybuilder", "--target", "builder")
    assert len(store.image("onlybuilder").diff_ids) == len(store.image(IMAGE).diff_ids) + 1
    line = store.fails("build", "--target", "nope", str(ctx))
    assert line == f"layerfs: nope: no such stage in {ctx}/Dockerfile"


def test_copy_chown_chmod_globs_and_dockerignore(store: ContainerStore, tmp_path: Path) -> None:
    dockerfile = """\
FROM bb:base
COPY --chown=user:user --chmod=640 *.conf /etc/app/
COPY src /src
"""
    ctx = context(tmp_path, dockerfile, {
        "a.conf": "a", "b.conf": "b", "c.txt": "c",
        "src/keep.py": "k", "src/build/out.o": "o", "src/build/important.o": "i",
        "src/notes.md": "n",
        ".dockerignore": "# comment\nsrc/build\n!src/build/important.o\n**/*.md\n",
    })
    build(store, ctx, "-t", "cp")
    with store.mounted("cp", tmp_path / "mnt") as root:
        assert sorted(os.listdir(root / "etc/app")) == ["a.conf", "b.conf"]
        st = os.lstat(root / "etc/app/a.conf")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (USER_UID, USER_UID, 0o640)
        found = sorted(str(p.relative_to(root / "src")) for p in (root / "src").rglob("*"))
        assert found == ["build", "build/important.o", "keep.py"]
        assert os.lstat(root / "src/keep.py").st_uid == 0


def test_add_unpacks_a_tarball_inside_the_root(store: ContainerStore, tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("pkg/bin/tool", b"#!/bin/sh\necho tool\n"),
                           ("../../escape", b"x"), ("/abs", b"y")):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), 0o755, 1234, 4321
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("pkg/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    ctx = context(tmp_path, "FROM bb:base\nADD pkg.tar.gz /opt/\nRUN /opt/pkg/bin/tool > /ran\n",
                  {"pkg.tar.gz": buf.getvalue()})
    build(store, ctx, "-t", "added")
    with store.mounted("added", tmp_path / "mnt") as root:
        st = os.lstat(root / "opt/pkg/bin/tool")
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 4321, 0o755)
        assert (root / "ran").read_text() == "tool\n"
        assert (root / "escape").read_text() == "x"  # `..` stops at the root
        assert (root / "opt/abs").read_text() == "y"
        assert os.readlink(root / "opt/pkg/link") == "/etc/passwd"
    assert not (tmp_path / "escape").exists()


def test_copy_through_an_image_symlink_stays_in_the_root(store: ContainerStore,
                                                         tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dockerfile = f"""\
FROM bb:base
RUN ln -s {outside} /escape && ln -s ../../../../../../{outside} /escape2
COPY f.txt /escape/
COPY f.txt /escape2/g.txt
"""
    ctx = context(tmp_path, dockerfile, {"f.txt": "inside\n"})
    build(store, ctx, "-t", "links")
    assert list(outside.iterdir()) == []
    with store.mounted("links", tmp_path / "mnt") as root:
        inner = root / str(outside).lstrip("/")
        assert (inner / "f.txt").read_text() == "inside\n"
        assert (inner / "g.txt").read_text() == "inside\n"


def test_failing_run_tags_nothing_and_leaves_nothing(store: ContainerStore,
                                                     tmp_path: Path) -> None:
    ctx = context(tmp_path, "FROM bb:base\nRUN echo good > /good\nRUN echo bad-output; exit 3\n")
    result = store.run("build", "-t", "broken", str(ctx))
    assert result.returncode != 0
    assert "bad-output" in result.stdout
    assert result.stderr.strip() == (f"layerfs: {ctx}/Dockerfile:3: The command "
                                     "'/bin/sh -c echo bad-output; exit 3' returned a non-zero "
                                     "code: 3")
    assert "broken" not in store.ok("images")
    assert store.ok("ps", "-a", "-q").strip() == ""


def test_quiet_prints_only_the_id(store: ContainerStore, tmp_path: Path) -> None:
    ctx = context(tmp_path, "FROM bb:base\nRUN echo noisy\n")
    out = store.ok("build", "-q", "-t", "q", str(ctx))
    assert out.strip() == store.image_id("q")
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", out)
    bad = context(tmp_path, "FROM bb:base\nRUN echo why-it-failed; false\n", name="bad")
    result = store.run("build", "-q", str(bad))
    assert result.returncode != 0 and result.stdout == ""
    assert "why-it-failed" in result.stderr


def test_dockerfile_from_stdin_and_label_option(store: ContainerStore, tmp_path: Path) -> None:
    ctx = tmp_path / "empty"
    ctx.mkdir()
    out = store.ok("build", "-f", "-", "--label", "a=b", "-t", "stdin", str(ctx),
                   input=b"FROM bb:base\nCMD [\"true\"]\n")
    assert "Step 3/3 : LABEL" in out
    assert store.image("stdin").config["config"]["Labels"] == {"a": "b"}


def test_onbuild_triggers_run_in_the_child(store: ContainerStore, tmp_path: Path) -> None:
    parent = context(tmp_path, "FROM bb:base\nONBUILD RUN echo triggered > /trigger\n",
                     name="parent")
    build(store, parent, "-t", "parent")
    assert store.image("parent").config["config"]["OnBuild"] == [
        "RUN echo triggered > /trigger"]
    child = context(tmp_path, "FROM parent\nRUN cat /trigger > /seen\n", name="child")
    out = build(store, child, "-t", "child")
    assert "# Executing 1 build trigger" in out
    assert files_of(store, "child", tmp_path / "mnt", "/seen") == {"/seen": "triggered\n"}
    assert not store.image("child").config["config"].get("OnBuild")


def test_shell_and_run_exec_form(store: ContainerStore, tmp_path: Path) -> None:
    dockerfile = """\
FROM bb:base
SHELL ["/bin/sh", "-ec"]
RUN echo "$0" > /shell
RUN ["/bin/sh", "-c", "echo exec > /exec"]
CMD echo from-cmd
"""
    build(store, context(tmp_path, dockerfile), "-t", "sh")
    got = files_of(store, "sh", tmp_path / "mnt", "/shell", "/exec")
    assert got == {"/shell": "/bin/sh\n", "/exec": "exec\n"}
    config = store.image("sh").config["config"]
    assert config["Cmd"] == ["/bin/sh", "-ec", "echo from-cmd"]
    assert config["Shell"] == ["/bin/sh", "-ec"]


def test_run_without_network_has_no_interfaces(store: ContainerStore, tmp_path: Path) -> None:
    ctx = context(tmp_path, "FROM bb:base\nRUN cat /proc/net/dev > /netdev\n")
    build(store, ctx, "--network", "none", "-t", "nonet")
    devices = files_of(store, "nonet", tmp_path / "mnt", "/netdev")["/netdev"]
    names = [line.split(":")[0].strip() for line in devices.splitlines()[2:]]
    assert names == ["lo"]


@pytest.mark.parametrize(("dockerfile", "message"), [
    ("FROM bb:base\nFOO bar\n", "Dockerfile:2: unknown instruction: FOO"),
    ("RUN true\n", "Dockerfile:1: "),
    ("FROM bb:base\nCOPY ../outside /x\n", "outside"),
    ("FROM bb:base\nCOPY missing.txt /x\n", "missing.txt: no such file or directory"),
    ("FROM bb:base\nCOPY --from=127.0.0.1:9/nostage /x /x\n", "Dockerfile:2: 127.0.0.1:9/nostage"),
    ("FROM 127.0.0.1:9/no-such-image:1\n", "Dockerfile:1: 127.0.0.1:9/no-such-image:1: "),
    ("FROM bb:base\nENV A=${B:?must be set}\n", "Dockerfile:2: "),
    ("FROM bb:base\nCOPY --chown=nobody-here a /a\n", "nobody-here"),
])
def test_bad_input_is_one_line(store: ContainerStore, tmp_path: Path, dockerfile: str,
                               message: str) -> None:
    # images named for a pull are on a closed loopback port: refused at once, never outside
    (tmp_path / "outside").write_text("secret")
    ctx = context(tmp_path, dockerfile, {"a": "a"})
    result = store.run("build", "-t", "bad", str(ctx))
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    if lines[0].startswith("Unable to find image"):  # docker's note before the implicit pull
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), lines
    assert message in lines[0], lines[0]
    # by name: the image ids are hex, and "bad" is a word of hex digits
    assert "bad" not in {row["Repository"] for row in store.images_json()}


def test_healthcheck_and_maintainer_are_recorded(store: ContainerStore, tmp_path: Path) -> None:
    dockerfile = ("FROM bb:base\nMAINTAINER Jane <jane@example.com>\n"
                  "HEALTHCHECK --interval=30s --retries=3 CMD wget -q localhost || exit 1\n")
    build(store, context(tmp_path, dockerfile), "-t", "hc")
    config = store.image("hc").config
    assert config["author"] == "Jane <jane@example.com>"
    assert config["config"]["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q localhost || exit 1"], "Interval": 30 * 10**9,
        "Retries": 3}


def test_workdir_makes_its_directory_volume_does_not(store: ContainerStore,
                                                   tmp_path: Path) -> None:
    dockerfile = "FROM bb:base\nUSER user\nWORKDIR /home/user/work/deep\nVOLUME /vol /data\n"
    out = build(store, context(tmp_path, dockerfile), "-t", "dirs")
    assert out.count("Running in") == 1
    with store.mounted("dirs", tmp_path / "mnt") as root:
        for path in ("home/user/work", "home/user/work/deep"):
            st = os.lstat(root / path)
            assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (USER_UID, USER_UID, 0o755)
        assert not (root / "vol").exists(), "VOLUME only records (as buildkit)"
    # a WORKDIR that exists already makes no layer
    again = build(store, context(tmp_path, "FROM dirs\nWORKDIR /etc\n", name="again"), "-t", "w")
    assert len(store.image("w").diff_ids) == len(store.image("dirs").diff_ids)
    assert "Removing intermediate container" in again
