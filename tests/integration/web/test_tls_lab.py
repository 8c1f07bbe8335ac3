"""A three-rack lab with TLS on (``Lab.up(tls=True)``): everything between racks is HTTPS.

The racks only speak HTTPS, so forming one cluster proves admission over
HTTPS; a spent emergency code refused by another rack proves the users sync;
a follower showing the leader's judgement proves the leader-view fetch. A
client trusting another CA is refused; plain HTTP gets no answer. A late
rack gets its certificate and joins. With Chromium installed, the console
opens over HTTPS with the rack's key pinned (as a laptop that accepted the
fingerprint).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshcloud.lab.api import ApiError, LabApi
from meshcloud.lab.browser import Forwarder, browser_unavailable, chromium, run_in_thread
from meshcloud.lab.lab import Lab
from meshcloud.lab.pki import write_ca
from meshcloud.lab.plan import API_PORT
from meshcloud.lab.pytest_plugin import MakeLab
from meshcloud.lab.wait import wait_for
from tests.integration.web.codes import spend_code_and_see_it_refused
from tests.unit.web.fake_cluster import CODES, PASSWORDS, write_users

pytestmark = [pytest.mark.root, pytest.mark.slow]

FORM_S = 60.0
UI_S = 20_000  # ms


def spki_sha256(cert_file: Path) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list pins: base64 SHA-256 of the SPKI."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def plain_http_answers(lab: Lab, rack: str) -> bool:
    """True if ``rack`` answers a plain-HTTP request on its API port."""
    conn = http.client.HTTPConnection(lab.rack(rack).ip, API_PORT, timeout=5)
    sock = lab.socket(None)
    sock.settimeout(5)
    try:
        sock.connect((lab.rack(rack).ip, API_PORT))
        conn.sock = sock
        conn.request("GET", "/api/v1/health")
        conn.getresponse().read()
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    return True


def test_a_tls_lab_speaks_https_between_racks(lab_factory: MakeLab, tmp_path: Path) -> None:
    lab: Lab = lab_factory(racks=3, tls=True)
    api = LabApi(lab)
    assert lab.tls and api.scheme == "https"
    racks = lab.racks()
    write_users(lab.dir / "kit-users.json")
    for rack in racks:
        (lab.state_dir(rack) / "console").mkdir(parents=True, exist_ok=True)
        shutil.copy(lab.dir / "kit-users.json", lab.state_dir(rack) / "console" / "users.json")
        log = (lab.log_dir(rack) / "daemon.log").read_text()
        assert f"API and console at https://{lab.rack(rack).ip}:{API_PORT}/" in log

    # admission over HTTPS: one cluster of three
    uuid = wait_for(lambda: api.one_cluster(racks), FORM_S, "one cluster of 3 over https")
    leader = wait_for(lambda: api.leader_of(racks), 30, "an agreed leader")
    follower = next(r for r in racks if r != leader)

    # the follower shows the leader's judgement, fetched from the leader over HTTPS
    def judged_by_leader() -> bool:
        health = api.cluster(follower)["health"]
        states = {r["state"] for r in health["racks"].values()}
        return bool(health["judged_by"] == leader and states == {"alive"})

    wait_for(judged_by_leader, 30, f"{follower} to show {leader}'s judgement")

    # users sync over HTTPS: a code spent on the follower is spent on the leader too
    spend_code_and_see_it_refused(api, follower, leader, CODES)

    # a client trusting another CA is refused; plain HTTP gets no answer
    other_ca = write_ca(tmp_path / "other-kit", "other")
    with pytest.raises(ApiError, match="CERTIFICATE_VERIFY_FAILED"):
        LabApi(lab, ca=other_ca).health(leader)
    assert not plain_http_answers(lab, leader)

    # a late rack gets a certificate of the lab's CA and joins over HTTPS
    late = lab.add_rack()
    everyone = [*racks, late]
    assert wait_for(lambda: api.one_cluster(everyone), FORM_S, "the late rack joined") == uuid

    if browser_unavailable() is None:
        pin = spki_sha256(lab.rack_dir(leader) / "tls" / "rack.crt")
        with Forwarder(lab, leader) as fwd:
            assert fwd.url.startswith("https://")
            run_in_thread(lambda: console_over_https(fwd.url, pin, everyone))


def console_over_https(url: str, pin: str, racks: list[str]) -> None:
    from playwright.sync_api import Error as BrowserError

    with chromium() as browser:  # a laptop that neither trusts the CA nor pinned the rack
        stranger: Any = browser.new_page()
        with pytest.raises(BrowserError, match="ERR_CERT_AUTHORITY_INVALID"):
            stranger.goto(url)
    with chromium(extra_args=[f"--ignore-certificate-errors-spki-list={pin}"]) as browser:
        page: Any = browser.new_context(locale="en-GB").new_page()
        page.goto(url)
        page.fill("input[name=user]", "admin")
        page.fill("input[name=password]", PASSWORDS["admin"])
        page.click("form.login button[type=submit]")
        page.wait_for_selector("[data-testid=summary]", timeout=UI_S)
        for rack in racks:
            page.locator(f".tiles [data-rack={rack}] .badge span").filter(
                has_text="Alive"
            ).wait_for(timeout=UI_S)
        assert page.evaluate("location.protocol") == "https:"
