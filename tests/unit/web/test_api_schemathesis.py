"""Property-based API testing from the OpenAPI file: no input makes the API fail with a 5xx.

schemathesis generates requests (valid and invalid) for every operation in
docs/api/openapi.yaml and sends them to a real aiohttp server backed by an
in-memory cluster; every response must be a non-5xx that conforms to the
schema's status codes and content types.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings

from meshcloud.core.errors import NotFound
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.auth import api_token
from meshcloud.web.users import UserStore

from .fake_cluster import FAST_HASHER, MemoryControl, write_users

pytestmark = pytest.mark.slow

SPEC = Path(__file__).resolve().parents[3] / "docs" / "api" / "openapi.yaml"
TOKEN = api_token("s" * 40)
schema = schemathesis.openapi.from_path(str(SPEC))


class MemoryFailover:
    """The failover view with one kept-aside copy."""

    def __init__(self) -> None:
        self.copies = [{"rack": "rack-1", "id": "voip.e1.g7.1", "appliance": "voip"}]

    def diverged(self) -> list[dict[str, Any]]:
        return list(self.copies)

    async def discard_diverged(self, rack: str, ident: str) -> dict[str, Any]:
        for copy in self.copies:
            if (copy["rack"], copy["id"]) == (rack, ident):
                return {**copy, "discard": True}
        raise NotFound(f"no kept-aside copy {ident} on {rack}")

    def replication_status(self) -> dict[str, Any]:
        return {"rack": "rack-1", "shipping": True, "fenced": False, "lag_s": {}}

    def metrics_text(self) -> str:
        return "meshcloud_diverged_copies 1\n"

    async def start_drill(self, appliance: str | None, restore: bool) -> dict[str, Any]:
        if appliance not in (None, "voip"):
            raise NotFound(f"appliance {appliance} does not exist")
        return {
            "id": "drill-1",
            "appliance": "voip",
            "rack": "rack-1",
            "outcome": None,
            "steps": [],
        }

    def drill_status(self, ident: str | None) -> dict[str, Any]:
        return {"current": None, "report": None}

    async def end_drill(self) -> dict[str, Any]:
        from meshcloud.core.errors import Conflict

        raise Conflict("no drill is under way")


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server on loopback, in its own thread and event loop."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, object] = {}

    async def start() -> None:
        users_file = tmp_path_factory.mktemp("users") / "users.json"
        write_users(users_file)
        users = UserStore(users_file, hasher=FAST_HASHER)
        ctx = WebContext(
            "rack-1", "a", TOKEN, control=MemoryControl(), failover=MemoryFailover(), users=users
        )
        app = create_app(ctx)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["port"] = runner.addresses[0][1]
        started.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    assert started.wait(30)
    yield f"http://127.0.0.1:{holder['port']}"
    runner = holder["runner"]
    assert isinstance(runner, web.AppRunner)
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@schema.exclude(path="/api/v1/events").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_with_5xx(case: schemathesis.Case, base_url: str) -> None:
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {TOKEN}"}
    response = case.call(base_url=base_url)
    assert response.status_code < 500, (
        f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
    )
    case.validate_response(response, checks=_checks())


def _checks() -> tuple[object, ...]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    return (not_a_server_error, status_code_conformance, content_type_conformance)
