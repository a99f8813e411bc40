"""`search`: Docker Hub's search API, or a self-hosted registry's catalog filtered by a term.

`TERM` alone searches Docker Hub; `REGISTRY/TERM` (a first component with `.` or `:`, or
`localhost`) lists that registry's catalog and keeps the repositories containing TERM, since
the distribution API has no search.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from layerfs.errors import UsageError
from layerfs.services import registries

if TYPE_CHECKING:
    from layerfs.store.store import Store

HUB_SEARCH = "https://index.docker.io/v1/search"


@dataclass(frozen=True, slots=True)
class SearchResult:
    name: str
    description: str
    stars: int
    official: bool
    automated: bool


def _is_domain(text: str) -> bool:
    return "." in text or ":" in text or text == "localhost"


def search(
    store: Store, term: str, *, limit: int = 25, insecure: bool = False
) -> list[SearchResult]:
    head, slash, rest = term.partition("/")
    if slash and _is_domain(head):
        with registries.client_for(store, head, insecure=insecure) as client:
            repos = client.catalog()
        return [SearchResult(f"{head}/{r}", "", 0, False, False) for r in repos if rest in r][
            :limit
        ]
    with registries.client_for(store, "docker.io") as client:
        query = urllib.parse.urlencode({"q": term, "n": limit})
        resp = client.request("GET", f"{HUB_SEARCH}?{query}", scope="", what=f"search {term}")
        results = resp.json().get("results") or []
    return [
        SearchResult(
            str(r.get("name", "")),
            str(r.get("description") or ""),
            int(r.get("star_count") or 0),
            bool(r.get("is_official")),
            bool(r.get("is_automated")),
        )
        for r in results
        if isinstance(r, dict)
    ][:limit]


def apply_filters(results: list[SearchResult], filters: list[str]) -> list[SearchResult]:
    for item in filters:
        key, _, value = item.partition("=")
        if key == "is-official":
            results = [r for r in results if r.official == (value == "true")]
        elif key == "is-automated":
            results = [r for r in results if r.automated == (value == "true")]
        elif key == "stars" and value.isdigit():
            results = [r for r in results if r.stars >= int(value)]
        else:
            raise UsageError(f"{item}: unknown filter (is-official, is-automated, stars)")
    return results
