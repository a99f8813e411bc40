"""Twelve Dockerfiles in the style of real ones, with their build contexts: the corpus that
`tests/test_build_buildah.py` builds with layerfs and buildah and compares, and that
`python -m benchmarks build` times.

Every build is offline: the bases are the official busybox image (an OCI layout), the Alpine
minirootfs and a Debian minbase root, each loaded into both tools before a build; packages
come from local .debs that `write_context` makes with dpkg-deb.

A case's `edit` is the one-line change near the end that the benchmark makes for its
"changed" rebuild: (line as written, line after the change).
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

BUSYBOX = "busybox:1.38.0-musl"
ALPINE = "alpine:3.20"
DEBIAN = "debian:bookworm"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The configs Docker Hub's images have; `layerfs import -c` gives them to the rootfs tarballs.
BASE_CHANGES = {
    ALPINE: (f"ENV {DEFAULT_PATH}", 'CMD ["/bin/sh"]'),
    DEBIAN: (f"ENV {DEFAULT_PATH}", 'CMD ["bash"]'),
}


@dataclass(frozen=True, slots=True)
class Deb:
    """A binary package that dpkg-deb builds into the context: files by path, and the
    maintainer scripts among them under DEBIAN/."""

    name: str
    version: str
    files: dict[str, tuple[bytes, int]]  # path -> (content, mode)
    depends: str = ""
    conffiles: tuple[str, ...] = ()

    def control(self) -> bytes:
        lines = [f"Package: {self.name}", f"Version: {self.version}", "Architecture: all",
                 "Maintainer: layerfs tests <tests@example.invalid>", "Section: misc",
                 "Priority: optional"]
        if self.depends:
            lines.append(f"Depends: {self.depends}")
        lines.append(f"Description: {self.name}, a package of the layerfs build corpus")
        return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    bases: tuple[str, ...]  # the images its FROM lines and COPY --from name
    dockerfile: str
    files: dict[str, bytes] = field(default_factory=dict)  # context files, by relative path
    symlinks: dict[str, str] = field(default_factory=dict)  # context symlinks -> target
    debs: tuple[Deb, ...] = ()  # built into debs/NAME_VERSION_all.deb
    build_args: dict[str, str] = field(default_factory=dict)
    edit: tuple[str, str] = ("", "")

    def edited(self) -> str:
        """The Dockerfile with `edit` made: the same but for one line near the end."""
        before, after = self.edit
        assert self.dockerfile.count(before + "\n") == 1, (self.name, before)
        return self.dockerfile.replace(before + "\n", after + "\n")

    def steps_after_edit(self) -> int:
        """How many steps of the last stage a rebuild after `edit` must run: the edited one
        and every one after it."""
        lines = [line for line in self.dockerfile.splitlines()
                 if line.strip() and not line.startswith(("#", " ", "\t"))]
        return len(lines) - lines.index(self.edit[0])


def write_context(case: Case, ctx: Path) -> Path:
    """Write the case's Dockerfile and context into `ctx` (made here); return `ctx`."""
    ctx.mkdir(parents=True)
    (ctx / "Dockerfile").write_text(case.dockerfile)
    for rel, data in case.files.items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        (ctx / rel).write_bytes(data)
    for rel, target in case.symlinks.items():
        (ctx / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, ctx / rel)
    if case.debs:
        (ctx / "debs").mkdir(exist_ok=True)
    for deb in case.debs:
        _build_deb(deb, ctx / "debs" / f"{deb.name}_{deb.version}_all.deb")
    return ctx


def _build_deb(deb: Deb, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="layerfs-deb-") as staging:
        root = os.path.join(staging, deb.name)
        files = dict(deb.files)
        files["DEBIAN/control"] = (deb.control(), 0o644)
        if deb.conffiles:
            files["DEBIAN/conffiles"] = ("".join(f"/{c}\n" for c in deb.conffiles).encode(),
                                         0o644)
        for rel, (data, mode) in files.items():
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, mode)
        subprocess.run(["dpkg-deb", "--root-owner-group", "--build", root, str(out)],
                       check=True, capture_output=True)


def tarball(entries: dict[str, bytes | str | None], *, compression: str = "gz",
            xattrs: dict[str, dict[str, str]] | None = None) -> bytes:
    """A tar archive: bytes are files (mode 0750, owner 7:8), a str is a symlink to it, None
    a directory; `xattrs` are PAX xattr records by path; compression "", "gz" or "xz"."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.mode, info.uid, info.gid, info.mtime = 0o750, 7, 8, 1
            info.pax_headers = {f"SCHILY.xattr.{key}": value
                                for key, value in (xattrs or {}).get(name, {}).items()}
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if compression == "gz":
        return gzip.compress(raw, mtime=0)
    if compression == "xz":
        return lzma.compress(raw)
    return raw


HELLO_DEB = Deb("layerfs-hello", "1.0", {
    "usr/bin/layerfs-hello": (b'#!/bin/sh\nprintf "hello from %s\\n" "$(cat /etc/layerfs-hello'
                              b'.conf)"\n', 0o755),
    "etc/layerfs-hello.conf": (b"the corpus\n", 0o644),
    "usr/share/doc/layerfs-hello/README": (b"A package made by the layerfs tests.\n", 0o644),
}, depends="layerfs-hello-data (= 1.0)", conffiles=("etc/layerfs-hello.conf",))
HELLO_DATA_DEB = Deb("layerfs-hello-data", "1.0", {
    "usr/share/layerfs-hello/words": (b"one\ntwo\nthree\n", 0o644),
    "DEBIAN/postinst": (b"#!/bin/sh\nset -e\nif [ \"$1\" = configure ]; then\n"
                        b"  groupadd --system --gid 990 hello\n"
                        b"  useradd --system --uid 990 --gid hello --home-dir /var/lib/hello"
                        b" --create-home --shell /usr/sbin/nologin hello\n"
                        b"  install -d -o hello -g hello -m 0750 /var/lib/hello/spool\n"
                        b"fi\n", 0o755),
}, depends="passwd")

TOOL_PACKAGE = {
    "pkg/DEBIAN/control": (b"Package: layerfs-tool\nVersion: 2.1\nArchitecture: all\n"
                           b"Maintainer: layerfs tests <tests@example.invalid>\n"
                           b"Description: a tool packaged in a build stage\n"),
    "pkg/DEBIAN/postinst": b"#!/bin/sh\nset -e\nmkdir -p /var/lib/layerfs-tool\n"
                           b"echo configured > /var/lib/layerfs-tool/state\n",
    "pkg/usr/bin/layerfs-tool": b"#!/bin/sh\necho \"tool $(cat /usr/share/layerfs-tool/v)\"\n",
    "pkg/usr/share/layerfs-tool/v": b"2.1\n",
}

CASES: tuple[Case, ...] = (
    Case("busybox-users-dirs-and-metadata", (BUSYBOX,), """\
FROM busybox:1.38.0-musl
RUN adduser -D -u 1000 app && rm -rf /etc/motd /usr/sbin
COPY --chown=app:app --chmod=640 conf/*.conf /etc/app/
COPY tree /srv/tree
COPY link /srv/
USER app
WORKDIR /home/app/work/deep
ENV GREETING="hello there" LEVEL=${LEVEL:-3}
RUN echo "$GREETING $LEVEL" > greeting
VOLUME /data /cache
EXPOSE 8080 53/udp
LABEL org.example.name=demo version=1
STOPSIGNAL SIGTERM
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["echo $GREETING"]
""", {"conf/a.conf": b"a\n", "conf/b.conf": b"b\n", "conf/c.txt": b"c\n",
      "tree/x/y": b"y\n", "tree/z": b"z\n", "link": b"target\n"},
         symlinks={"tree/rel-link": "link"},
         edit=("EXPOSE 8080 53/udp", "EXPOSE 8081 53/udp")),
    Case("busybox-multi-stage-and-args", (BUSYBOX,), """\
ARG VARIANT=musl
FROM busybox:1.38.0-${VARIANT} AS builder
ARG OUT=/out
RUN mkdir -p $OUT/bin && echo built > $OUT/bin/tool && chmod 755 $OUT/bin/tool
FROM scratch
COPY --from=builder /out/bin/tool /usr/local/bin/tool
COPY --from=builder /bin/busybox /bin/busybox
CMD ["/bin/busybox", "sh"]
""", edit=('CMD ["/bin/busybox", "sh"]', 'CMD ["/bin/busybox", "ash"]')),
    Case("busybox-add-tarball-and-dockerignore", (BUSYBOX,), """\
FROM busybox:1.38.0-musl
ADD pkg.tar.gz /opt/
COPY . /ctx/
RUN ls -R /ctx > /listing && rm /opt/pkg/remove-me
""", {".dockerignore": b"*.log\nsecret/\n!secret/public\n",
      "pkg.tar.gz": tarball({"pkg/bin/run": b"#!/bin/sh\n", "pkg/remove-me": b"x"}),
      "keep.txt": b"k\n", "debug.log": b"l\n", "secret/key": b"s\n", "secret/public": b"p\n"},
         edit=("RUN ls -R /ctx > /listing && rm /opt/pkg/remove-me",
               "RUN ls -lR /ctx > /listing && rm /opt/pkg/remove-me")),
    Case("busybox-copy-and-add-forms", (BUSYBOX,), """\
FROM busybox:1.38.0-musl
COPY a.txt b.txt /dest/
COPY dir /dest/dir-contents
COPY dir/ /dest/dir-again/
COPY --chmod=700 scripts/*.sh /usr/local/bin/
COPY part* /merged/
COPY a.txt /dest/renamed.txt
COPY ["name with spaces.txt", "/dest/"]
COPY --from=busybox:1.38.0-musl /bin/busybox /opt/busybox-copy
ADD plain.tar /opt/plain/
ADD archive.tar.xz /opt/xz
ADD --chown=10:20 notatar.gz /opt/
WORKDIR /dest
RUN find /dest /opt /merged | sort > /inventory
""", {"a.txt": b"a\n", "b.txt": b"b\n", "dir/one": b"1\n", "dir/sub/two": b"2\n",
      "scripts/start.sh": b"#!/bin/sh\necho start\n", "scripts/stop.sh": b"#!/bin/sh\n",
      "scripts/README": b"not a script\n", "part1/p": b"p1\n", "part2/q": b"p2\n",
      "name with spaces.txt": b"spaces\n",
      "plain.tar": tarball({"etc/": None, "etc/plain.conf": b"plain\n",
                            "etc/plain.link": "plain.conf"}, compression=""),
      "archive.tar.xz": tarball({"deep/er/file": b"xz\n"}, compression="xz"),
      "notatar.gz": b"\x1f\x8b\x08\x00not really a gzip stream\n"},
         edit=("WORKDIR /dest", "WORKDIR /dest/dir-contents")),
    Case("alpine-build-test-and-runtime-stages", (ALPINE, BUSYBOX), """\
FROM alpine:3.20 AS build
WORKDIR /src
COPY src/ .
RUN sh ./build.sh /out && cd /out && find . -type f | sort | xargs sha256sum > /dist.sha256
FROM alpine:3.20 AS test
COPY --from=build /out /opt/tool
RUN /opt/tool/bin/tool --selftest > /selftest.txt
FROM busybox:1.38.0-musl
COPY --from=build /out/ /opt/tool/
COPY --from=test /selftest.txt /opt/tool/share/
COPY --from=build /dist.sha256 /srv/
ENV PATH=/opt/tool/bin:$PATH
ENTRYPOINT ["tool"]
CMD ["--help"]
""", {"src/build.sh": b"#!/bin/sh\nset -e\nout=$1\nmkdir -p $out/bin $out/share $out/lib\n"
                      b"cp tool.sh $out/bin/tool\nchmod 0755 $out/bin/tool\n"
                      b"ln -s ../bin/tool $out/lib/tool-link\n"
                      b"sed 's/VERSION/3.4/' version.in > $out/share/version\n",
      "src/tool.sh": b"#!/bin/sh\ncase \"$1\" in --selftest) echo ok;; *) echo usage;; esac\n",
      "src/version.in": b"tool VERSION\n"},
         edit=('CMD ["--help"]', 'CMD ["--selftest"]')),
    Case("alpine-env-and-arg-substitution", (ALPINE,), """\
ARG BASE=alpine:3.20
FROM ${BASE}
ARG VERSION=1.2.3
ARG FLAVOR
ARG EMPTY=
ENV APP_VERSION=$VERSION \\
    APP_FLAVOR=${FLAVOR:-plain} \\
    APP_EXTRA=${EMPTY:+set} \\
    APP_ALT=${VERSION:+v$VERSION}
ENV APP_HOME=/opt/app-$APP_VERSION APP_LOG=$APP_HOME/log
LABEL version="${VERSION}" flavor=${APP_FLAVOR} "quoted key"='single $VERSION'
RUN echo "$APP_VERSION $APP_FLAVOR [$APP_EXTRA] $APP_ALT $VERSION $FLAVOR" > /versions
WORKDIR $APP_HOME
RUN printf '%s|%s\\n' "$APP_LOG" "$EMPTY" > paths
EXPOSE ${PORT:-8080}/tcp
CMD echo $APP_VERSION
""", build_args={"FLAVOR": "extra"},
         edit=("EXPOSE ${PORT:-8080}/tcp", "EXPOSE ${PORT:-9090}/tcp")),
    Case("alpine-shells-and-exec-forms", (ALPINE,), """\
FROM alpine:3.20
SHELL ["/bin/sh", "-e", "-c"]
RUN set -u; mkdir -p /etc/app && echo 'shell form' > /etc/app/shell
RUN ["/bin/sh", "-c", "echo exec form > /etc/app/exec"]
RUN ["mkdir", "-p", "/var/lib/app/cache"]
SHELL ["/bin/ash", "-c"]
RUN echo "$0" > /etc/app/shell-name && addgroup -g 3000 -S grp && adduser -S -u 3000 -G grp u
USER 3000:3000
RUN id -u > /tmp/uid && id -g > /tmp/gid
USER root
RUN chown 3000:3000 /var/lib/app/cache && chmod 2770 /var/lib/app/cache
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/bin/ash", "-c", "exec \\"$@\\"", "--"]
CMD ["cat", "/etc/app/shell"]
""", edit=('CMD ["cat", "/etc/app/shell"]', 'CMD ["cat", "/etc/app/exec"]')),
    Case("alpine-special-files", (ALPINE,), """\
FROM alpine:3.20
ADD special.tar /opt/special/
RUN chmod 4755 /opt/special/bin/suid && chmod 2775 /opt/special/bin \\
 && chown -R 1234:5678 /opt/special/data && mkfifo -m 0620 /opt/special/fifo
RUN mkdir -p "/srv/with space/unicode-\u00fc\u00f1" \\
 && echo x > "/srv/with space/unicode-\u00fc\u00f1/f" \\
 && ln "/srv/with space/unicode-\u00fc\u00f1/f" /srv/hardlink \\
 && ln -s "/srv/with space" /srv/abs-link && ln -s ../nowhere /srv/dangling
RUN rm -rf /etc/apk/protected_paths.d && touch -d 2001-01-01 /etc/apk/world
CMD ["/bin/sh"]
""", {"special.tar": tarball({"bin/": None, "bin/suid": b"#!/bin/sh\n", "bin/tool": b"t\n",
                              "data/": None, "data/file": b"d\n", "data/link": "file"},
                             compression="", xattrs={"bin/tool": {"user.origin": "corpus"}})},
         edit=('CMD ["/bin/sh"]', 'CMD ["/bin/ash"]')),
    Case("debian-dpkg-install-local-debs", (DEBIAN,), """\
FROM debian:bookworm
ENV DEBIAN_FRONTEND=noninteractive
COPY debs/ /tmp/debs/
RUN dpkg -i /tmp/debs/*.deb && rm -rf /tmp/debs
RUN layerfs-hello > /hello.out && dpkg -s layerfs-hello | grep -q 'Status: install ok'
USER hello
WORKDIR /var/lib/hello/spool
RUN touch queued
CMD ["layerfs-hello"]
""", debs=(HELLO_DEB, HELLO_DATA_DEB),
         edit=('CMD ["layerfs-hello"]', 'CMD ["/usr/bin/layerfs-hello"]')),
    Case("debian-package-built-in-a-stage", (DEBIAN,), """\
FROM debian:bookworm AS pkg
WORKDIR /build
COPY pkg/ ./layerfs-tool/
RUN chmod 0755 layerfs-tool/DEBIAN/postinst layerfs-tool/usr/bin/layerfs-tool \\
 && dpkg-deb --root-owner-group --build layerfs-tool /build/layerfs-tool.deb
FROM debian:bookworm
COPY --from=pkg /build/layerfs-tool.deb /tmp/
RUN dpkg -i /tmp/layerfs-tool.deb && rm /tmp/layerfs-tool.deb
RUN layerfs-tool > /etc/tool-output
LABEL org.opencontainers.image.title=layerfs-tool
CMD ["layerfs-tool"]
""", TOOL_PACKAGE,
         edit=("LABEL org.opencontainers.image.title=layerfs-tool",
               "LABEL org.opencontainers.image.title=the-layerfs-tool")),
    Case("debian-service-user-and-workdirs", (DEBIAN,), """\
FROM debian:bookworm
RUN groupadd -g 2000 svc && useradd -m -u 2000 -g svc -s /bin/bash svc
WORKDIR /srv/app
COPY --chown=svc:svc app/ ./
RUN chown svc:svc /srv/app && chmod 750 /srv/app
USER svc
WORKDIR data
RUN id > whoami && touch .ready && mkdir -p cache/tmp
USER svc:svc
ENV APP_HOME=/srv/app APP_DATA=/srv/app/data
EXPOSE 8000/tcp 8443
VOLUME ["/srv/app/data/cache"]
CMD ["/bin/bash", "-c", "cat $APP_DATA/whoami"]
""", {"app/main.sh": b"#!/bin/bash\necho main\n", "app/conf/app.ini": b"[app]\nx=1\n"},
         edit=("EXPOSE 8000/tcp 8443", "EXPOSE 8000/tcp 9443")),
    Case("debian-trim-and-replace-dirs", (DEBIAN,), """\
FROM debian:bookworm
RUN rm -rf /usr/share/doc/* /usr/share/man /usr/share/locale/[a-d]* \\
 && mkdir -p /usr/share/man/man1 && echo 'kept' > /usr/share/doc/.keep
RUN rm -rf /etc/cron.daily && mkdir /etc/cron.daily \\
 && printf '#!/bin/sh\\nexit 0\\n' > /etc/cron.daily/app && chmod 0755 /etc/cron.daily/app
RUN ln /etc/cron.daily/app /usr/local/bin/app-daily && ln -s ../share /usr/local/share-link \\
 && mv /etc/motd /etc/motd.orig && rmdir /media 2>/dev/null || true
RUN rm -f /etc/motd.orig && echo replaced > /etc/issue && truncate -s 0 /etc/issue.net
CMD ["bash"]
""", edit=('CMD ["bash"]', 'CMD ["/bin/bash"]')),
)
