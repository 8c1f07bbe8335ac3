"""Static peers between network namespaces, mDNS off: one cluster forms, a late rack joins.

Each rack lists only rack-a (and rack-a lists nobody): inbound admission
spreads the picture. The late rack lists only rack-c and still joins the
cluster that rack-a founded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from discovery_mesh import SECRET, Mesh, admitted, formed, start_node, wait_for, write_config

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.mark.timeout(120)
def test_static_peers_form_one_cluster_and_a_late_rack_joins(
    mesh: Callable[[int], Mesh], tmp_path: Path
) -> None:
    net = mesh(4)
    a, b, c, d = net.racks
    peers = {
        "rack-a": [],
        "rack-b": [f"{a.address}:8440"],
        "rack-c": [f"{a.address}:8440"],
        "rack-d": [f"{c.address}:8440"],
    }
    outputs = {}
    for name, rack in (("rack-a", a), ("rack-b", b), ("rack-c", c)):
        config = write_config(tmp_path, name, rack, SECRET, peers[name], mdns=False)
        outputs[name] = start_node(net, tmp_path, name, rack, config)
    honest = ["rack-a", "rack-b", "rack-c"]

    def diagnostics() -> str:
        return "\n".join(
            f"--- {name}\n{out.read_text()[-3000:]}\n{err.read_text()[-2000:]}"
            for name, (out, err) in outputs.items()
        )

    try:
        wait_for(lambda: all(formed(outputs[n][0]) for n in honest), 40, "one cluster")
        assert [n for n in honest if formed(outputs[n][0])[0]["how"] == "founded"] == ["rack-a"]
        cluster = formed(outputs["rack-a"][0])[0]["cluster_uuid"]
        config = write_config(tmp_path, "rack-d", d, SECRET, peers["rack-d"], mdns=False)
        outputs["rack-d"] = start_node(net, tmp_path, "rack-d", d, config)
        wait_for(lambda: bool(formed(outputs["rack-d"][0])), 40, "the late rack to join")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnostics()}") from None
    late = formed(outputs["rack-d"][0])[0]
    assert (late["how"], late["cluster_uuid"]) == ("joined", cluster), diagnostics()
    assert {formed(outputs[n][0])[0]["cluster_uuid"] for n in honest} == {cluster}
    assert admitted(outputs["rack-b"][0]) >= {"rack-a", "rack-c"}
    for proc in net.procs:
        assert proc.poll() is None, diagnostics()
