"""The console shows each rack's power (in real Chromium, against the in-memory cluster)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from meshcloud.core.models import ClusterSnapshot
from meshcloud.core.power import PowerSource, RackPower
from meshcloud.lab.browser import browser_unavailable, chromium, run_in_thread
from tests.unit.web.fake_cluster import PASSWORDS, MemoryControl, write_users
from tests.unit.web.test_console_browser import UI_MS, Rack

pytestmark = [
    pytest.mark.slow,  # Chromium
    pytest.mark.skipif(browser_unavailable() is not None, reason=str(browser_unavailable())),
]

POWER = {
    "rack-1": RackPower("rack-1"),
    "rack-2": RackPower(
        "rack-2", PowerSource.NUT, True, True, 8.0, 120.0, 600.0, 1.0, "OB DISCHRG LB"
    ),
    "rack-3": RackPower(
        "rack-3", PowerSource.NUT, True, False, 80.0, 2820.0, 600.0, 1.0, "OB DISCHRG"
    ),
}


class PoweredControl(MemoryControl):
    def snapshot(self) -> ClusterSnapshot:
        return replace(super().snapshot(), power=POWER)


def test_racks_and_overview_show_power(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tests.unit.web.test_console_browser.MemoryControl", PoweredControl)
    write_users(tmp_path / "users.json")
    rack = Rack(tmp_path / "users.json")
    rack.thread.start()
    rack.start()
    try:
        run_in_thread(lambda: story(rack))
    finally:
        rack.stop()
        rack.loop.call_soon_threadsafe(rack.loop.stop)
        rack.thread.join(timeout=10)


def story(rack: Rack) -> None:
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 900, "height": 700})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(rack.url)
        page.fill("input[name=user]", "view")
        page.fill("input[name=password]", PASSWORDS["view"])
        page.click("form.login button[type=submit]")
        attention = page.locator(".attention")
        attention.filter(
            has_text="Rack rack-2 is on battery (2 min left): its appliances"
        ).wait_for(timeout=UI_MS)
        attention.filter(has_text="Rack rack-3 is on battery (47 min left)").wait_for(timeout=UI_MS)
        page.goto(rack.url + "#/racks")
        card = page.locator("[data-rack=rack-2]")
        card.filter(has_text="On battery: 2 min left; its appliances are moving away").wait_for(
            timeout=UI_MS
        )
        page.locator("[data-rack=rack-1]").filter(has_text="Mains (no UPS)").wait_for(timeout=UI_MS)
        assert errors == []
