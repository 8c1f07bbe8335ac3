"""Raft nodes (raftnode.py) as the daemons of lab racks: real network namespaces."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from raftcluster import FAST_TIMERS, RAFTNODE, SECRET, RaftNode, wait_until

from meshcloud.lab.lab import Lab

RAFT_PORT = 7440
NODE_ARGV = [sys.executable, str(RAFTNODE), "{rack_dir}/raft.json"]


def configure_rack(
    lab: Lab, rack: str, mode: str, peers: list[str], conf: dict[str, Any], **extra: Any
) -> RaftNode:
    """Write the rack's raftnode config (the lab starts it as the rack's daemon)."""
    info = lab.rack(rack)
    config: dict[str, Any] = {
        "mode": mode, "name": rack, "address": info.ip, "port": RAFT_PORT, "peers": peers,
        "site": info.site, "state_dir": str(info.state_dir / "raft"),
        "control": str(info.rack_dir / "control.sock"), "secret": SECRET,
        "conf": {**FAST_TIMERS, **conf}, **extra,
    }  # fmt: skip
    if mode == "stock":
        config.setdefault("password", "stock-lab-password")
    (info.rack_dir / "raft.json").write_text(json.dumps(config))
    return RaftNode(rack, info.ip, RAFT_PORT, info.rack_dir, config)


def start_lab(
    lab_factory: Callable[..., Lab],
    mode: str,
    racks: int,
    *,
    sites: str | None = None,
    conf: dict[str, Any] | None = None,
    max_voters: int = 5,
    start: int | None = None,
) -> tuple[Lab, dict[str, RaftNode]]:
    """A lab whose racks run Raft nodes; ``store`` mode: r1 founds, the others join through it.

    Only the first ``start`` racks (default: all) are started.
    """
    lab = lab_factory(racks, sites=sites, daemon_argv=NODE_ARGV, start_daemons=False)
    names = lab.racks()
    if mode == "store":
        founder = f"{lab.rack(names[0]).ip}:{RAFT_PORT}"
        peers_of = {r: [founder] for r in names}
    else:
        everyone = [f"{lab.rack(r).ip}:{RAFT_PORT}" for r in names]
        peers_of = {r: everyone for r in names}
    nodes = {}
    for i, rack in enumerate(names):
        extra: dict[str, Any] = {"max_voters": max_voters}
        if mode == "store" and i == 0:
            extra["found"] = True
        nodes[rack] = configure_rack(lab, rack, mode, peers_of[rack], conf or {}, **extra)
    for rack in names[: start if start is not None else len(names)]:
        lab.start_daemon(rack, wait=False)
    return lab, nodes


async def answering(node: RaftNode) -> bool:
    return bool(await node.status())


async def wait_answering(nodes: dict[str, RaftNode] | list[RaftNode]) -> None:
    for node in nodes.values() if isinstance(nodes, dict) else nodes:
        await wait_until(lambda n=node: answering(n), 30.0, f"{node.name} to start")


async def leader_rack(nodes: dict[str, RaftNode], timeout_s: float = 20.0) -> str:
    """The rack a majority of the given racks follows."""
    by_address = {f"{n.address}:{n.port}": name for name, n in nodes.items()}

    async def find() -> str | None:
        votes: dict[str, int] = {}
        for node in nodes.values():
            try:
                status = await node.status()
            except OSError:
                continue
            leader = status.get("leader_address", status.get("leader"))
            if leader in by_address:
                votes[by_address[leader]] = votes.get(by_address[leader], 0) + 1
        winners = [rack for rack, count in votes.items() if count > len(nodes) / 2]
        return winners[0] if winners else None

    return await wait_until(find, timeout_s, "a leader followed by a majority")
