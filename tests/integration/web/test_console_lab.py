"""The console in real Chromium against a three-rack lab with the real daemon.

One lab for the whole story (bringing a lab up is the slow part): an
emergency code spent on one rack is refused by another; log in, see
the overview, deploy an appliance, watch a rack's loss and recovery without a
reload, a viewer changes nothing, a change without the CSRF token is
refused, French end to end, a 360 px screen, right-to-left. Screenshots go
to tmp_path, or to docs/console/ with MESHCLOUD_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from meshcloud.lab.api import LabApi
from meshcloud.lab.browser import Forwarder, browser_unavailable, chromium, run_in_thread
from meshcloud.lab.lab import Lab
from meshcloud.lab.pytest_plugin import MakeLab
from meshcloud.lab.wait import wait_for
from tests.integration.web.codes import spend_code_and_see_it_refused
from tests.unit.web.fake_cluster import CODES, PASSWORDS, write_users

pytestmark = [pytest.mark.root, pytest.mark.slow]

DOCS_SHOTS = Path(__file__).resolve().parents[3] / "docs" / "console"
UI_S = 20_000  # ms: generous bound for the console to show what the API already says
LOSS_S = 30_000  # ms: lease_s + margin_s (5 s) plus the leader's cycle, with room for a busy box


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    if os.environ.get("MESHCLOUD_UPDATE_SCREENSHOTS") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        return DOCS_SHOTS
    return tmp_path


def login(page: Any, url: str, user: str) -> None:
    page.goto(url)
    page.fill("input[name=user]", user)
    page.fill("input[name=password]", PASSWORDS[user])
    page.click("form.login button[type=submit]")
    page.wait_for_selector("[data-testid=summary]", timeout=UI_S)


def rack_badge(page: Any, rack: str) -> Any:
    return page.locator(f".tiles [data-rack={rack}] .badge span")


def fetch_status(page: Any, method: str, path: str, body: Any, csrf: bool) -> int:
    """A change sent from the page's own origin, with or without the CSRF header."""
    status: int = page.evaluate(
        """async ([method, path, body, csrf]) => {
            const me = await (await fetch("/api/v1/session")).json();
            const headers = {"Content-Type": "application/json"};
            if (csrf) headers["X-CSRF-Token"] = me.csrf;
            const r = await fetch(path, {method, headers, body: JSON.stringify(body)});
            return r.status;
        }""",
        [method, path, body, csrf],
    )
    return status


@pytest.mark.skipif(browser_unavailable() is not None, reason=str(browser_unavailable()))
def test_console_in_chromium_on_a_lab(lab_factory: MakeLab, shots: Path) -> None:
    lab: Lab = lab_factory(racks=3, sites="north,north,south")
    api = LabApi(lab)
    racks = lab.racks()
    write_users(lab.dir / "kit-users.json")  # one kit: every rack starts from the same file
    for rack in racks:
        (lab.state_dir(rack) / "console").mkdir(parents=True, exist_ok=True)
        shutil.copy(lab.dir / "kit-users.json", lab.state_dir(rack) / "console" / "users.json")
    wait_for(lambda: api.one_cluster(racks), 60, "one cluster of 3")
    leader = wait_for(lambda: api.leader_of(racks), 30, "an agreed leader")
    victim = next(r for r in racks if r != leader)
    other = next(r for r in racks if r not in (leader, victim))
    # an emergency code spent through one rack is refused by every other
    spend_code_and_see_it_refused(api, other, leader, CODES)
    with Forwarder(lab, leader) as fwd:
        run_in_thread(lambda: story(lab, api, fwd.url, leader, victim, shots))


def story(lab: Lab, api: LabApi, url: str, leader: str, victim: str, shots: Path) -> None:
    racks = lab.racks()
    with chromium() as browser:
        admin = browser.new_context(viewport={"width": 1100, "height": 760}, locale="en-GB")
        page = admin.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(url)
        page.wait_for_selector("form.login")
        page.screenshot(path=shots / "login.png")

        # log in, see every rack alive on the overview
        login(page, url, "admin")
        for rack in racks:
            rack_badge(page, rack).filter(has_text="Alive").wait_for(timeout=UI_S)
        page.locator("[data-testid=summary]").filter(has_text="All is well").wait_for(timeout=UI_S)
        page.screenshot(path=shots / "overview.png")

        # deploy an appliance from the form; the placement shows up live
        page.goto(url + "#/appliances")
        page.click("details.deploy-box summary")
        page.fill("form.deploy input[name=name]", "tiles")
        page.fill("form.deploy input[name=replicas]", "1")
        page.click("form.deploy button[type=submit]")
        card = page.locator(".cards [data-app=tiles]")
        card.filter(has_text="Placed on").wait_for(timeout=UI_S)
        assert api.cluster(leader)["appliances"]["tiles"]["replicas"] == 1
        page.screenshot(path=shots / "appliances.png", full_page=True)

        # a change without the CSRF token is refused; with it, accepted
        spec = {"name": "probe", "image": "demo", "replicas": 0}
        assert fetch_status(page, "PUT", "/api/v1/appliances/probe", spec, csrf=False) == 403
        assert "probe" not in api.appliances(leader)
        assert fetch_status(page, "PUT", "/api/v1/appliances/probe", spec, csrf=True) == 200
        assert fetch_status(page, "DELETE", "/api/v1/appliances/probe", None, csrf=True) == 200

        # a rack dies: the open page shows the loss, then the recovery, without a reload
        page.goto(url + "#/overview")
        page.evaluate("window.__same_page = true")
        lab.kill(victim)
        rack_badge(page, victim).filter(has_text="Lost").wait_for(timeout=LOSS_S)
        page.locator("[data-testid=summary]").filter(has_text="need").wait_for(timeout=UI_S)
        page.locator(".attention").filter(has_text=f"Rack {victim} is lost").wait_for()
        page.screenshot(path=shots / "overview-rack-lost.png", full_page=True)
        page.goto(url + "#/topology")
        page.locator(f"g.node.bad[data-rack={victim}]").wait_for(timeout=UI_S)
        page.screenshot(path=shots / "topology.png")
        page.goto(url + "#/racks")
        page.locator(f".cards [data-rack={victim}]").filter(has_text="Lost").wait_for()
        page.screenshot(path=shots / "racks.png", full_page=True)
        lab.restart(victim)
        page.goto(url + "#/overview")
        rack_badge(page, victim).filter(has_text="Alive").wait_for(timeout=60_000)
        assert page.evaluate("window.__same_page") is True  # never reloaded

        page.goto(url + "#/events")
        events = page.locator("[data-testid=events] li")
        events.filter(has_text=f"saw rack {victim} become lost").wait_for(timeout=UI_S)
        events.filter(has_text=f"saw rack {victim} come back").wait_for(timeout=UI_S)
        page.screenshot(path=shots / "events.png")
        page.emulate_media(media="print")
        page.screenshot(path=shots / "incident-report-print.png")
        page.emulate_media(media="screen")
        page.goto(url + "#/users")
        page.locator(".cards [data-user=view]").wait_for(timeout=UI_S)
        page.screenshot(path=shots / "users.png", full_page=True)

        # French, end to end: switch, then a fresh visit remembers it
        page.goto(url + "#/overview")
        page.select_option("#who select", "fr")
        page.locator("#nav a").filter(has_text="Baies").wait_for()
        page.reload()
        rack_badge(page, leader).filter(has_text="Vivante").wait_for(timeout=UI_S)
        assert page.evaluate("document.documentElement.lang") == "fr"
        page.screenshot(path=shots / "overview-fr.png")
        admin.close()

        # a viewer sees everything and can change nothing, on a 360 px screen in French
        viewer = browser.new_context(viewport={"width": 360, "height": 740}, locale="fr-FR")
        vpage = viewer.new_page()
        vpage.on("pageerror", lambda exc: errors.append(str(exc)))
        login(vpage, url, "view")
        vpage.goto(url + "#/appliances")
        vpage.locator(".cards [data-app=tiles]").wait_for(timeout=UI_S)
        assert vpage.locator("form.deploy").count() == 0
        assert vpage.locator(".cards button").count() == 0
        assert vpage.evaluate("document.documentElement.scrollWidth") <= 360
        vpage.screenshot(path=shots / "appliances-viewer-360-fr.png", full_page=True)
        assert fetch_status(vpage, "DELETE", "/api/v1/appliances/tiles", None, csrf=True) == 403
        assert "tiles" in api.appliances(leader)
        # right-to-left does not break the layout
        vpage.goto(url + "#/racks")
        vpage.evaluate("document.documentElement.dir = 'rtl'")
        vpage.locator(".cards [data-rack]").first.wait_for(timeout=UI_S)
        assert vpage.evaluate("document.documentElement.scrollWidth") <= 360
        vpage.screenshot(path=shots / "racks-rtl-360.png")
        viewer.close()
    assert errors == []
