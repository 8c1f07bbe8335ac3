"""The console's files: served from memory, compressed, cached, translated, small."""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshcloud.web.app import WebContext, create_app
from meshcloud.web.headers import CONTENT_SECURITY_POLICY
from meshcloud.web.static import assets
from meshcloud.web.users import UserStore
from tests.unit.web.fake_cluster import FAST_HASHER, MemoryControl

STATIC = Path(__file__).resolve().parents[3] / "meshcloud" / "web" / "static"
FIRST_LOAD_BUDGET_BYTES = 150 * 1024


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    users = UserStore(tmp_path / "users.json", hasher=FAST_HASHER)
    app = create_app(WebContext("rack-1", "north", "t" * 64, control=MemoryControl(), users=users))
    async with TestClient(TestServer(app)) as c:
        yield c


def catalogs() -> dict[str, dict[str, str]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((STATIC / "i18n").glob("*.json"))}


def test_every_string_is_in_every_catalog() -> None:
    source = "\n".join(p.read_text() for p in STATIC.glob("*.js"))
    used = set(re.findall(r'\bt\("([a-z0-9_]+)"', source))
    used |= {
        f"{k}_{form}"
        for k in re.findall(r'\btn\("([a-z0-9_]+)"', source)
        for form in ("one", "other")
    }
    dynamic = {  # keys built as t(`prefix_${value}`)
        "nav_": ["overview", "racks", "appliances", "events", "topology", "users"],
        "role_": ["viewer", "operator", "admin"],
        "sev_": ["info", "warning", "critical"],
        "state_": ["running", "stopped", "waiting"],
        "level_": ["ok", "warn", "bad", "unknown"],
    }
    used |= {prefix + value for prefix, values in dynamic.items() for value in values}
    cats = catalogs()
    assert {"en", "fr"} <= set(cats)
    for code, cat in cats.items():
        missing = sorted(used - set(cat))
        assert not missing, f"{code}.json lacks {missing}"
        assert set(cat) == set(cats["en"]), f"{code}.json and en.json have different keys"
        assert cat["_meta"]["name"]


def test_no_external_resources_and_no_inline_script() -> None:
    for path in STATIC.rglob("*"):
        if path.suffix in {".html", ".js", ".css"}:
            text = path.read_text()
            assert not re.search(r"(src|href)=\"(https?:)?//", text), path
            assert "@import" not in text and "url(http" not in text, path
    html = (STATIC / "index.html").read_text()
    for script in re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S):
        assert 'type="module" src=' in script[0] or 'type="application/json"' in script[0]


async def test_index_embeds_the_language_and_sets_a_strict_policy(client: TestClient) -> None:
    resp = await client.get("/", headers={"Accept-Language": "fr-FR,fr;q=0.9,en;q=0.5"})
    assert resp.status == 200
    text = await resp.text()
    assert '<html lang="fr" dir="ltr">' in text and "Baies" in text
    assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert resp.headers["X-Frame-Options"] == "DENY"
    resp = await client.get("/", headers={"Accept-Language": "fr"}, cookies={"mc_lang": "en"})
    assert '<html lang="en"' in await resp.text()


async def test_assets_are_compressed_and_cached_for_good(client: TestClient) -> None:
    _, version = assets()
    resp = await client.get(f"/static/{version}/app.js", headers={"Accept-Encoding": "gzip"},
                            auto_decompress=False)  # fmt: skip
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == "gzip"
    assert "immutable" in resp.headers["Cache-Control"]
    assert resp.headers["Content-Type"].startswith("text/javascript")
    body = gzip.decompress(await resp.read())
    assert body == (STATIC / "app.js").read_bytes()
    again = await client.get(
        f"/static/{version}/app.js", headers={"If-None-Match": resp.headers["ETag"]}
    )
    assert again.status == 304
    stale = await client.get("/static/000000000000/app.js")
    assert stale.status == 200 and stale.headers["Cache-Control"] == "no-cache"
    assert (await client.get(f"/static/{version}/../users.py")).status == 404
    assert (await client.get(f"/static/{version}/index.html")).status == 404


async def test_first_load_fits_the_budget(client: TestClient) -> None:
    """Everything the first visit fetches, compressed as served, is well under 150 KB."""
    page = await client.get("/", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    total = len(await page.read())
    html = await (await client.get("/")).text()
    for url in re.findall(r'(?:href|src)="(/static/[^"]+)"', html):
        resp = await client.get(url, headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
        assert resp.status == 200, url
        total += len(await resp.read())
    assert total < FIRST_LOAD_BUDGET_BYTES / 3, total
