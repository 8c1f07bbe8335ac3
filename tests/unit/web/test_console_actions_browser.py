"""Start, stop and move on the Appliances screen, in real Chromium (in-memory cluster).

An operator stops an appliance, starts it again and moves it to a replica
holder, and sees each change without reloading; a viewer sees no such
buttons, and the API refuses the viewer's POST even with its CSRF token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from meshcloud.core.models import ApplianceSpec, DiskSpec
from meshcloud.lab.browser import browser_unavailable, chromium, run_in_thread
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.users import UserStore
from tests.unit.web.fake_cluster import FAST_HASHER, PASSWORDS, MemoryControl, write_users

pytestmark = [
    pytest.mark.slow,  # Chromium and two logins: about 10 s
    pytest.mark.skipif(browser_unavailable() is not None, reason=str(browser_unavailable())),
]
UI_MS = 15_000


class Rack:
    """The web app on a loopback port, in a thread of its own."""

    def __init__(self, users_file: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.users_file = users_file
        self.control = MemoryControl()
        self.runner: web.AppRunner | None = None
        self.port = 0

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=15)

    async def _start(self) -> None:
        spec = ApplianceSpec("tiles", "demo", disks=(DiskSpec("data", 1),), replicas=2)
        await self.control.put_appliance(spec)
        users = UserStore(self.users_file, hasher=FAST_HASHER)
        app = create_app(WebContext("rack-1", "north", "t" * 64, control=self.control, users=users))
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture
def rack(tmp_path: Path) -> Iterator[Rack]:
    write_users(tmp_path / "users.json")
    r = Rack(tmp_path / "users.json")
    r.thread.start()
    r._call(r._start())
    try:
        yield r
    finally:
        assert r.runner is not None
        r._call(r.runner.cleanup())
        r.loop.call_soon_threadsafe(r.loop.stop)
        r.thread.join(timeout=10)


def test_an_operator_stops_starts_and_moves_and_a_viewer_cannot(rack: Rack) -> None:
    run_in_thread(lambda: story(rack))


def log_in(page: Any, rack: Rack, user: str) -> None:
    page.goto(rack.url)
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", PASSWORDS[user])
    page.click("form.login button[type=submit]")
    page.locator("[data-testid=summary]").wait_for(timeout=UI_MS)
    page.goto(rack.url + "#/appliances")


def story(rack: Rack) -> None:
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 900, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        dialogs: list[str] = []

        def accept(dialog: Any) -> None:
            dialogs.append(dialog.message)
            dialog.accept()

        page.on("dialog", accept)
        log_in(page, rack, "oper")
        card = page.locator("[data-app=tiles]")
        source = rack.control.assignments["tiles"].primary
        assert source is not None

        # stop: asked first, then the card says stopped and offers Start instead
        card.locator("button[data-action=stop]").click()
        card.filter(has_text="stopped by an operator").wait_for(timeout=UI_MS)
        assert dialogs and "Stop tiles?" in dialogs[-1]
        assert rack.control.stopped == {"tiles"}
        assert card.locator("button[data-action=move]").is_disabled()
        card.locator("button[data-action=start]").click()
        card.locator("button[data-action=stop]").wait_for(timeout=UI_MS)
        assert rack.control.stopped == set()

        # move to a chosen replica holder: the card shows the move and its downtime
        target = next(r for r in rack.control.assignments["tiles"].replicas)
        card.locator("select[data-testid=move-to]").select_option(target)
        card.locator("button[data-action=move]").click()
        card.locator("[data-testid=move]").filter(
            has_text=f"moved from {source} to {target}, down"
        ).wait_for(timeout=UI_MS)
        assert f"Move tiles to {target}?" in dialogs[-1]
        assert rack.control.assignments["tiles"].primary == target
        assert errors == []

        # a viewer sees no action and the API refuses it even with its CSRF token
        page.click("#who button.link")  # log out
        page.locator("form.login").wait_for(timeout=UI_MS)
        log_in(page, rack, "view")
        card.wait_for(timeout=UI_MS)
        assert card.locator("[data-action]").count() == 0
        status = page.evaluate(
            """async () => {
                const me = await (await fetch("/api/v1/session")).json();
                const r = await fetch("/api/v1/appliances/tiles/stop",
                    {method: "POST", headers: {"X-CSRF-Token": me.csrf}});
                return r.status;
            }"""
        )
        assert status == 403 and rack.control.stopped == set()
        assert errors == []
