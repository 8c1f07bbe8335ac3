"""Discovery with real multicast between network namespaces.

Three honest racks find each other over mDNS, admit each other and form one
cluster; a rack with the wrong secret, garbage TXT records and an impostor
that knows the (public) cluster id but not the secret are never admitted
and crash nobody.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from discovery_mesh import (
    SECRET,
    Mesh,
    admitted,
    events,
    formed,
    start_node,
    wait_for,
    write_config,
)

from meshcloud.discovery.proof import ClusterKeys

pytestmark = [pytest.mark.root, pytest.mark.slow]

WRONG_SECRET = "f9e8d7c6b5a4938271605f4e3d2c1b0a"
HOSTILE = Path(__file__).with_name("hostile_announcer.py")


@pytest.mark.timeout(120)
def test_racks_find_admit_and_form_one_cluster_over_multicast(
    mesh: Callable[[int], Mesh], tmp_path: Path
) -> None:
    net = mesh(5)
    honest = ["rack-a", "rack-b", "rack-c"]
    outputs: dict[str, tuple[Path, Path]] = {}
    # The wrong-secret rack also knocks at rack-a directly, and rack-a at it.
    wrong_rack, evil_rack = net.racks[3], net.racks[4]
    for name, rack in zip(honest, net.racks, strict=False):
        peers = [f"{wrong_rack.address}:8440"] if name == "rack-a" else []
        config = write_config(tmp_path, name, rack, SECRET, peers)
        outputs[name] = start_node(net, tmp_path, name, rack, config)
    wrong_config = write_config(
        tmp_path, "rack-w", wrong_rack, WRONG_SECRET, [f"{net.racks[0].address}:8440"]
    )
    outputs["rack-w"] = start_node(net, tmp_path, "rack-w", wrong_rack, wrong_config)
    cluster_id = ClusterKeys.from_secret(SECRET).cluster_id
    targets = ",".join(f"{r.address}:8440" for r in net.racks[:3])
    hostile_out, hostile_err = tmp_path / "hostile.events", tmp_path / "hostile.log"
    hostile = net.spawn(
        evil_rack,
        net.python(
            *(str(HOSTILE), "--address", evil_rack.address),
            *("--cluster-id", cluster_id, "--targets", targets),
        ),
        hostile_out,
        hostile_err,
    )

    def diagnostics() -> str:
        return (
            "\n".join(
                f"--- {name}\n{out.read_text()[-3000:]}\n{err.read_text()[-3000:]}"
                for name, (out, err) in outputs.items()
            )
            + f"\n--- hostile\n{hostile_out.read_text()[-2000:]}\n{hostile_err.read_text()[-2000:]}"
        )

    try:
        wait_for(
            lambda: all(admitted(outputs[n][0]) >= set(honest) - {n} for n in honest),
            30,
            "the honest racks to admit each other",
        )
        wait_for(lambda: all(formed(outputs[n][0]) for n in honest), 30, "one cluster to form")
        # The hostile records were seen and refused: wait until each honest rack logged them.
        wait_for(
            lambda: all(
                "mDNS record" in outputs[n][1].read_text()
                and "did not prove it holds the cluster secret" in outputs[n][1].read_text()
                for n in honest
            ),
            30,
            "the honest racks to see and refuse the hostile records",
        )
        wait_for(
            lambda: sum(1 for e in events(hostile_out) if e.get("status") == 403) >= 3,
            30,
            "the impostor's own hellos to be refused",
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{diagnostics()}") from None

    founders = [n for n in honest if formed(outputs[n][0])[0]["how"] == "founded"]
    assert founders == ["rack-a"], diagnostics()
    uuids = {formed(outputs[n][0])[0]["cluster_uuid"] for n in honest}
    assert len(uuids) == 1, diagnostics()
    for name in honest:
        assert admitted(outputs[name][0]) == set(honest) - {name}, diagnostics()
    assert admitted(outputs["rack-w"][0]) == set(), diagnostics()
    assert "another cluster" in outputs["rack-a"][1].read_text()  # static knock at rack-w
    knocks = [e for e in events(hostile_out) if e["event"] == "knock"]
    assert knocks and all(e["status"] in (403, None) for e in knocks), knocks
    assert not [e for e in events(hostile_out) if e["event"] == "impostor-admitted"]
    # Nobody crashed: every node is still running.
    for proc in net.procs:
        assert proc.poll() is None, diagnostics()
    assert hostile.poll() is None
