"""Discovery with real multicast between lab racks (network namespaces).

Three honest racks find each other over mDNS, admit each other and form one
cluster; a rack with the wrong secret, garbage TXT records and an impostor
that knows the (public) cluster id but not the secret are never admitted
and crash nobody.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from discovery_helpers import (
    API_PORT,
    NODE_ARGV,
    admitted,
    edit_config,
    events,
    formed,
    log_text,
    tails,
)

from meshcloud.discovery.proof import ClusterKeys
from meshcloud.lab.lab import Lab
from meshcloud.lab.wait import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

HOSTILE = Path(__file__).with_name("hostile_announcer.py")
HONEST = ["r1", "r2", "r3"]


@pytest.mark.timeout(180)
def test_racks_find_admit_and_form_one_cluster_over_multicast(
    lab_factory: Callable[..., Lab], tmp_path: Path
) -> None:
    lab = lab_factory(5, daemon_argv=NODE_ARGV, start_daemons=False, bootstrap_expect=3)
    wrong, evil = lab.rack("r4"), lab.rack("r5")
    # r1 also knocks at the wrong-secret rack directly, and that rack at r1.
    edit_config(lab, "r1", peers=[f"{wrong.ip}:{API_PORT}"])
    for rack in HONEST:
        lab.start_daemon(rack, wait=False)
    wrong_secret = tmp_path / "wrong.secret"
    wrong_secret.write_text("f9e8d7c6b5a4938271605f4e3d2c1b0a\n")
    wrong_config = edit_config(
        lab,
        "r4",
        tmp_path / "r4-wrong.yaml",
        secret_file=str(wrong_secret),
        peers=[f"{lab.rack('r1').ip}:{API_PORT}"],
    )
    lab.start_service("r4", "wrong", [*NODE_ARGV[:3], "--config", str(wrong_config)])
    secret = lab.secret_file.read_text().strip()
    targets = ",".join(f"{lab.rack(r).ip}:{API_PORT}" for r in HONEST)
    lab.start_service(
        "r5",
        "hostile",
        [sys.executable, str(HOSTILE), "--address", evil.ip,
         "--cluster-id", ClusterKeys.from_secret(secret).cluster_id, "--targets", targets],
    )  # fmt: skip

    def describe() -> str:
        return tails(lab, HONEST) + "\n" + tails(lab, ["r4"], ("wrong",))

    wait_for(
        lambda: all(admitted(lab, r) >= set(HONEST) - {r} for r in HONEST),
        60,
        "the honest racks to admit each other",
        describe=describe,
    )
    wait_for(lambda: all(formed(lab, r) for r in HONEST), 60, "one cluster", describe=describe)
    # The hostile records reached every honest rack and were refused.
    wait_for(
        lambda: all(
            "mDNS record" in log_text(lab, r)
            and "did not prove it holds the cluster secret" in log_text(lab, r)
            for r in HONEST
        ),
        60,
        "the honest racks to see and refuse the hostile records",
        describe=describe,
    )
    wait_for(
        lambda: sum(1 for e in events(lab, "r5", "hostile") if e.get("status") == 403) >= 3,
        60,
        "the impostor's own hellos to be refused",
        describe=lambda: tails(lab, ["r5"], ("hostile",)),
    )

    founded = [r for r in HONEST if formed(lab, r)["how"] == "founded"]
    assert founded == ["r1"], describe()
    assert len({formed(lab, r)["cluster_uuid"] for r in HONEST}) == 1, describe()
    for rack in HONEST:
        assert admitted(lab, rack) == set(HONEST) - {rack}, describe()
    assert admitted(lab, "r4", "wrong") == set(), describe()
    assert "another cluster" in log_text(lab, "r1")  # r1's static knock at the wrong rack
    knocks = [e for e in events(lab, "r5", "hostile") if e["event"] == "knock"]
    assert knocks and all(e["status"] in (403, None) for e in knocks), knocks
    assert not [e for e in events(lab, "r5", "hostile") if e["event"] == "impostor-admitted"]
    # Nobody crashed.
    for status in lab.status().racks:
        for process in status.processes:
            assert process.alive, (status.name, process.name, describe())
