"""Static peers between lab racks, mDNS off, on a lossy link: one cluster, then a late join.

r2 and r3 list only r1, and r1 lists nobody: inbound admission and the
peers' reports spread the picture. The late rack lists only r3 and still
joins the cluster that r1 founded. Links have 50 ms delay and 1 % loss.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from discovery_helpers import API_PORT, NODE_ARGV, admitted, edit_config, formed, tails

from meshcloud.lab.lab import Lab
from meshcloud.lab.wait import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.timeout(180)
def test_static_peers_form_one_cluster_and_a_late_rack_joins(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = lab_factory(
        4,
        daemon_argv=NODE_ARGV,
        start_daemons=False,
        bootstrap_expect=3,
        link="delay=50ms loss=1%",
    )
    r1, r3 = lab.rack("r1").ip, lab.rack("r3").ip
    peers = {
        "r1": [],
        "r2": [f"{r1}:{API_PORT}"],
        "r3": [f"{r1}:{API_PORT}"],
        "r4": [f"{r3}:{API_PORT}"],
    }
    for rack, listed in peers.items():
        edit_config(lab, rack, peers=listed, mdns=False)
    honest = ["r1", "r2", "r3"]
    for rack in honest:
        lab.start_daemon(rack, wait=False)

    def describe() -> str:
        return tails(lab, lab.racks())

    wait_for(lambda: all(formed(lab, r) for r in honest), 60, "one cluster", describe=describe)
    assert [r for r in honest if formed(lab, r)["how"] == "founded"] == ["r1"], describe()
    cluster = formed(lab, "r1")["cluster_uuid"]
    assert admitted(lab, "r2") >= {"r1", "r3"}, describe()

    lab.start_daemon("r4", wait=False)
    late = wait_for(lambda: formed(lab, "r4"), 60, "the late rack to join", describe=describe)
    assert (late["how"], late["cluster_uuid"]) == ("joined", cluster), describe()
    assert {formed(lab, r)["cluster_uuid"] for r in honest} == {cluster}
