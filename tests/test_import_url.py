"""`layerfs import URL` against a real HTTP server on 127.0.0.1: the same image as importing
the file, redirects followed, and a download that fails or is cut short refused with one line
and nothing left in the store."""

from __future__ import annotations

import http.server
import threading
from typing import TYPE_CHECKING, ClassVar

import pytest

from tests import imagetools as it
from tests.test_images import store_untouched

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from tests.imagetools import Store


class _Handler(http.server.BaseHTTPRequestHandler):
    """/rootfs.tar.gz whole; /cut.tar.gz promises it all and sends half; /moved redirects."""

    body: ClassVar[bytes] = b""

    def do_GET(self) -> None:
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/rootfs.tar.gz")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path in ("/rootfs.tar.gz", "/cut.tar.gz"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            if self.path == "/cut.tar.gz":
                self.wfile.write(self.body[:len(self.body) // 2])
                self.wfile.flush()
                self.close_connection = True
            else:
                self.wfile.write(self.body)
        else:
            self.send_error(404, "File not found")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """The base URL of a server on 127.0.0.1 serving a busybox rootfs tarball."""
    work = tmp_path / "bbsrc"
    work.mkdir()
    _Handler.body = it.busybox_tarball(work).read_bytes()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def test_import_from_a_url_gives_the_image_the_file_gives(
        store: Store, server: str, tmp_path: Path) -> None:
    tarball = tmp_path / "rootfs.tar.gz"
    tarball.write_bytes(_Handler.body)
    store.ok("import", str(tarball), "from:file")
    store.ok("import", "-m", "over http", f"{server}/moved", "from:url")  # a redirect too
    by_file, by_url = store.inspect("from:file"), store.inspect("from:url")
    assert by_url["RootFS"] == by_file["RootFS"]
    assert len(store.layer_dirs()) == 1  # one layer, shared
    assert "over http" in store.ok("history", "from:url")
    with store.mounted("from:url", tmp_path / "mnt") as mnt:
        assert (mnt / "bin" / "busybox").is_file()


@pytest.mark.parametrize(("path", "reason"), [
    ("/cut.tar.gz", "peer closed connection without sending complete message body"),
    ("/missing.tar.gz", "404"),
])
def test_a_failed_download_is_refused_and_the_store_is_left_as_it_was(
        store: Store, server: str, tmp_path: Path, path: str, reason: str) -> None:
    store.ok("import", "-", "base", input=b"")  # an empty tar: the store exists
    check = store_untouched(store, tmp_path)
    message = store.fails("import", f"{server}{path}", "broken:1")
    assert message.startswith(f"layerfs: {server}{path}: "), message
    assert reason in message, message
    check()


def test_a_url_nothing_answers_at_is_refused_in_one_line(store: Store) -> None:
    message = store.fails("import", "http://127.0.0.1:9/rootfs.tar", "nothing:1")
    assert message.startswith("layerfs: http://127.0.0.1:9/rootfs.tar: "), message
