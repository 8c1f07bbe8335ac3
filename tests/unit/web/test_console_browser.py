"""The console in real Chromium against the in-memory cluster (no lab, a few seconds).

What the lab test does not reach: a forced password change, an emergency
code at the login page, copies kept aside, and the banner when the rack
stops answering (and its disappearance when it answers again).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from meshcloud.core.models import ApplianceSpec
from meshcloud.lab.browser import browser_unavailable, chromium, run_in_thread
from meshcloud.web.app import WebContext, create_app
from meshcloud.web.users import UserStore
from tests.unit.web.fake_cluster import CODES, FAST_HASHER, PASSWORDS, MemoryControl, write_users

pytestmark = [
    pytest.mark.slow,  # ~20 s: Chromium, two logins, a rack stopped and started again
    pytest.mark.skipif(browser_unavailable() is not None, reason=str(browser_unavailable())),
]
UI_MS = 15_000
KEPT = {
    "rack": "rack-3", "id": "voip.e2-1", "appliance": "voip", "epoch": 2,
    "common_generation": 11, "last_generation": 14, "bytes": 48 << 20,
    "first_write_at": time.time() - 600, "last_write_at": time.time() - 300,
    "kept_at": time.time() - 60, "reason": "rack-3 wrote after it was cut off", "discard": False,
}  # fmt: skip


class Rack:
    """The web app on a loopback port, in a thread; ``stop``/``start`` cut and restore it."""

    def __init__(self, users_file: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.users_file = users_file
        self.port = 0
        self.runner: web.AppRunner | None = None

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=15)

    async def _start(self) -> None:
        control = MemoryControl()
        await control.put_appliance(ApplianceSpec("voip", "demo", replicas=1))
        users = UserStore(self.users_file, hasher=FAST_HASHER)
        app = create_app(WebContext("rack-1", "north", "t" * 64, control=control, users=users))

        async def diverged(_request: web.Request) -> web.Response:
            return web.json_response({"diverged": [KEPT]})

        app.router.add_get("/api/v1/diverged", diverged)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def start(self) -> None:
        self._call(self._start())

    def stop(self) -> None:
        assert self.runner is not None
        self._call(self.runner.cleanup())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"


@pytest.fixture
def rack(tmp_path: Path) -> Iterator[Rack]:
    write_users(tmp_path / "users.json", must_change=("oper",))
    r = Rack(tmp_path / "users.json")
    r.thread.start()
    r.start()
    try:
        yield r
    finally:
        r.stop()
        r.loop.call_soon_threadsafe(r.loop.stop)
        r.thread.join(timeout=10)


def test_password_change_code_kept_copies_and_the_banner(rack: Rack) -> None:
    run_in_thread(lambda: story(rack))


def story(rack: Rack) -> None:
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 900, "height": 700})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("dialog", lambda dialog: dialog.accept())

        # a user whose password was set for them must choose a new one first
        page.goto(rack.url)
        page.fill("input[name=user]", "oper")
        page.fill("input[name=password]", PASSWORDS["oper"])
        page.click("form.login button[type=submit]")
        page.locator("input[name=new_password]").wait_for(timeout=UI_MS)
        page.fill("input[name=new_password]", "a-much-better-one")
        page.fill("input[name=again]", "a-much-better-one")
        page.click("form.stack button[type=submit]")
        page.locator("[data-testid=summary]").wait_for(timeout=UI_MS)
        page.click("#who button.link")  # log out
        page.locator("form.login").wait_for(timeout=UI_MS)

        # an emergency code opens an admin session once
        page.click("form.login button.link")
        page.fill("input[name=code]", CODES[1].lower())
        page.click("form.login button[type=submit]")
        page.locator("#nav a[href='#/users']").wait_for(timeout=UI_MS)

        # the copy kept aside needs attention, and shows on Appliances
        page.locator(".attention").filter(has_text="kept on rack-3").wait_for(timeout=UI_MS)
        page.goto(rack.url + "#/appliances")
        page.locator("[data-testid=kept-aside]").filter(has_text="generations 12 to 14").wait_for(
            timeout=UI_MS
        )

        # the rack stops answering: a banner says so; it goes when the rack is back
        page.goto(rack.url + "#/overview")
        page.locator("[data-testid=summary]").wait_for(timeout=UI_MS)
        assert page.locator("#banner").is_hidden()
        rack.stop()
        page.locator("#banner").filter(has_text="Connection lost").wait_for(timeout=UI_MS)
        page.locator("body.offline").wait_for(timeout=UI_MS)
        rack.start()  # sessions live in the rack's memory: a restarted rack asks to log in
        page.locator("form.login, [data-testid=summary]").first.wait_for(timeout=30_000)
        page.locator("#banner").wait_for(state="hidden", timeout=30_000)
        assert errors == []
