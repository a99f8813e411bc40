"""Plain HTTP only where allowed: loopback, `--insecure`, or the store's insecure-registries."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from layerfs.services import registries
from layerfs.store.store import Store

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


def scheme(store: Store, domain: str, *, insecure: bool = False) -> str:
    with registries.client_for(store, domain, insecure=insecure) as client:
        return client.base.split("://")[0]


def test_https_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERFS_INSECURE_REGISTRIES", raising=False)
    store = Store(tmp_path / "store")
    assert scheme(store, "registry.test:5000") == "https"
    assert scheme(store, "docker.io") == "https"
    assert scheme(store, "127.0.0.1:5000") == "http"
    assert scheme(store, "localhost:5000") == "http"
    assert scheme(store, "[::1]:5000") == "http"
    assert scheme(store, "registry.test:5000", insecure=True) == "http"
    (store.root / "config.json").write_text(
        json.dumps({"insecure-registries": ["registry.test:5000"]}))
    assert scheme(store, "registry.test:5000") == "http"
    assert scheme(store, "other.test") == "https"
    monkeypatch.setenv("LAYERFS_INSECURE_REGISTRIES", "other.test")
    assert scheme(store, "other.test") == "http"


def test_docker_hub_is_reached_at_its_api_host(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    with registries.client_for(store, "docker.io") as client:
        assert client.base == "https://registry-1.docker.io"
