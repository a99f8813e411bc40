"""Shared pytest configuration: the `--long` option for the long differential run and the
whole filesystem matrix, a fork server runtime dir of the run's own, the scratch filesystems
of the matrix, and an empty store driven through the `layerfs` command (the container tests
have their own `store`, with an image in it), and a real unprivileged user for the rootless
tests."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from layerfs.cli.forkserver_client import stop_servers
from tests.fsmatrix import ScratchFilesystems
from tests.imagetools import Store
from tests.rootless import RootlessUser, create_user, remove_user

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", help="run the tests marked `long`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long run: use --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def forkserver_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every `layerfs mount` of the run goes through a fork server of the run's own, as a
    user's would (the first one starts it); the run stops it at the end."""
    runtime = tmp_path_factory.mktemp("runtime")
    runtime.chmod(0o700)
    saved = os.environ.get("LAYERFS_RUNTIME_DIR")
    os.environ["LAYERFS_RUNTIME_DIR"] = str(runtime)
    try:
        yield runtime
    finally:
        if saved is None:
            del os.environ["LAYERFS_RUNTIME_DIR"]
        else:
            os.environ["LAYERFS_RUNTIME_DIR"] = saved
        stop_servers(str(runtime))


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Path]:
    """A fork server runtime dir of the test's own, so that it sees a server start, serve,
    decline and go; its servers are stopped at the end."""
    path = tmp_path / "runtime"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        stop_servers(str(path))


@pytest.fixture(scope="session")
def scratch_filesystems(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScratchFilesystems]:
    """Loop-mounted ext4, xfs and btrfs and a tmpfs, each made on first use, gone at the end."""
    scratch = ScratchFilesystems(tmp_path_factory.mktemp("filesystems"))
    try:
        yield scratch
    finally:
        scratch.close()


def every_filesystem(config: pytest.Config, definition: pytest.Function) -> bool:
    """Whether a test runs on every filesystem of the matrix: all do with --long, and the
    representative ones (marked `every_fs`) always."""
    return bool(config.getoption("--long") or definition.get_closest_marker("every_fs"))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    try:
        yield s
    finally:
        s.cleanup()


@pytest.fixture(scope="session")
def rootless_user() -> Iterator[RootlessUser]:
    """A real unprivileged user, made for the run and removed after it (tests/rootless.py)."""
    user = create_user()
    try:
        yield user
    finally:
        remove_user(user)
