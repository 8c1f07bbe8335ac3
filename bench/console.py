"""Console benchmark: bytes and time of a first visit in Chromium on a 1 Mbit/s, 300 ms link.

A three-rack lab with the real daemon runs two appliances. For each trial a
fresh browser context (empty cache, no cookies) opens the leader's console
through a loopback forwarder, with Chromium's network emulation (CDP
``Network.emulateNetworkConditions``: 1 Mbit/s each way, 300 ms latency per
request). Measured per trial:

- ``login``: from navigation start until the login form is on screen (the
  first render), its first contentful paint, and the bytes on the wire;
- ``overview``: from pressing "Log in" until the overview shows every rack
  (login, session, event stream with the cluster document), and its bytes;
- ``revisit``: a reload with a warm cache until the overview shows again.

Headline: ``first_load_bytes`` is the median of all bytes received for a
first visit until the overview shows data (login included);
``first_render_s_throttled`` is the median time to the login form.

Run as root: ``python bench/console.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import distribution, fmt_dist, parse_args, print_table, write_result

from meshcloud.lab.api import LabApi
from meshcloud.lab.browser import Forwarder, chromium, run_in_thread
from meshcloud.lab.lab import Lab
from meshcloud.lab.wait import wait_for
from tests.unit.web.fake_cluster import PASSWORDS, write_users

RATE_BYTES_S = 1_000_000 / 8  # 1 Mbit/s
LATENCY_MS = 300
APPLIANCES = ("tiles", "voip")
TIMEOUT_MS = 120_000


class Wire:
    """Bytes received by one page, from CDP network events (streams included)."""

    def __init__(self, cdp: Any) -> None:
        self.chunks: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        cdp.on("Network.dataReceived", self._data)
        cdp.on("Network.loadingFinished", self._done)

    def _data(self, ev: dict[str, Any]) -> None:
        rid = ev["requestId"]
        self.chunks[rid] = self.chunks.get(rid, 0) + int(ev.get("encodedDataLength", 0))

    def _done(self, ev: dict[str, Any]) -> None:
        self.finished[ev["requestId"]] = int(ev.get("encodedDataLength", 0))

    def total(self) -> int:
        ids = set(self.chunks) | set(self.finished)
        return sum(max(self.chunks.get(i, 0), self.finished.get(i, 0)) for i in ids)


def overview_shows_every_rack(page: Any, racks: list[str]) -> None:
    for rack in racks:
        page.locator(f".tiles [data-rack={rack}]").wait_for(timeout=TIMEOUT_MS)


def one_visit(browser: Any, url: str, racks: list[str]) -> dict[str, float]:
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    try:
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": False})
        cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": LATENCY_MS,
             "downloadThroughput": RATE_BYTES_S, "uploadThroughput": RATE_BYTES_S},
        )  # fmt: skip
        wire = Wire(cdp)
        page.goto(url, wait_until="commit", timeout=TIMEOUT_MS)
        page.wait_for_selector("form.login input[name=user]", timeout=TIMEOUT_MS)
        login_s = page.evaluate("performance.now()") / 1000
        fcp = page.evaluate(
            "(performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime || 0"
        )
        login_bytes = wire.total()
        page.fill("input[name=user]", "view")
        page.fill("input[name=password]", PASSWORDS["view"])
        start = page.evaluate("performance.now()")
        page.click("form.login button[type=submit]")
        overview_shows_every_rack(page, racks)
        overview_s = (page.evaluate("performance.now()") - start) / 1000
        total_bytes = wire.total()
        # a revisit with a warm cache (the session cookie still set)
        before = wire.total()
        t0 = time.monotonic()
        page.reload(wait_until="commit", timeout=TIMEOUT_MS)
        overview_shows_every_rack(page, racks)
        revisit_s = time.monotonic() - t0
        revisit_bytes = wire.total() - before
        return {
            "login_s": login_s,
            "fcp_s": fcp / 1000,
            "login_bytes": login_bytes,
            "overview_after_login_s": overview_s,
            "first_visit_bytes": total_bytes,
            "revisit_s": revisit_s,
            "revisit_bytes": revisit_bytes,
        }
    finally:
        context.close()


def main() -> int:
    args = parse_args("console", __doc__.splitlines()[0])
    trials = 4 if args.quick else 20
    lab = Lab("bconsole")
    if lab.exists():
        lab.down()
    try:
        lab.up(racks=3, sites="north,north,south")
        api = LabApi(lab)
        racks = lab.racks()
        for rack in racks:  # every rack gets its own hashes: fine, the bench only logs in
            write_users(lab.state_dir(rack) / "console" / "users.json")
        wait_for(lambda: api.one_cluster(racks), 60, "one cluster of 3")
        leader = wait_for(lambda: api.leader_of(racks), 30, "an agreed leader")
        for name in APPLIANCES:
            api.put_appliance(leader, {"name": name, "image": "demo", "replicas": 1})
        doc_bytes = len(str(api.cluster(leader)).encode())
        with Forwarder(lab, leader) as fwd:

            def run() -> list[dict[str, float]]:
                with chromium() as browser:
                    one_visit(browser, fwd.url, racks)  # warm-up: daemon caches, page compile
                    return [one_visit(browser, fwd.url, racks) for _ in range(trials)]

            visits = run_in_thread(run)
    finally:
        lab.down()

    def dist(key: str, digits: int = 3) -> dict[str, float]:
        return distribution([v[key] for v in visits], digits)

    results = {key: dist(key) for key in visits[0]}
    headline = {
        "first_load_bytes": int(results["first_visit_bytes"]["p50"]),
        "first_render_s_throttled": results["login_s"]["p50"],
    }
    write_result(
        "console",
        args,
        params={
            "racks": 3,
            "appliances": len(APPLIANCES),
            "trials": trials,
            "link": {"rate_bit_s": int(RATE_BYTES_S * 8), "latency_ms": LATENCY_MS},
            "cluster_document_bytes_approx": doc_bytes,
            "budget_bytes": 150 * 1024,
        },
        results=results,
        headline=headline,
    )
    print_table(
        f"console: first visit on 1 Mbit/s, {LATENCY_MS} ms ({trials} trials)",
        [
            ("login form shown (s)", fmt_dist(results["login_s"])),
            ("first contentful paint (s)", fmt_dist(results["fcp_s"])),
            ("bytes to the login form", fmt_dist(results["login_bytes"])),
            ("login -> overview with data (s)", fmt_dist(results["overview_after_login_s"])),
            ("bytes, first visit to overview", fmt_dist(results["first_visit_bytes"])),
            ("revisit, warm cache (s)", fmt_dist(results["revisit_s"])),
            ("revisit bytes", fmt_dist(results["revisit_bytes"])),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
