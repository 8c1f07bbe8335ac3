"""A standalone discovery node, for the lab, tests and diagnosis.

``python -m meshcloud.discovery --config FILE [--simulate-formation]``

Serves ``POST /api/v1/peer/hello`` on the config's bind address and API
port, announces and browses like the daemon, and prints one JSON object per
line on stdout: ``ready``, ``admitted`` (and ``updated``) peers, formation
``decision`` sentences, and with ``--simulate-formation`` also ``formed``
(founding or joining is simulated: no Raft group is started). Without that
flag the node only previews formation and never claims to be formed, so it
is safe next to real racks. Do not run it on a rack whose daemon is running:
they share the API port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from meshcloud.config import load_config
from meshcloud.core.errors import MeshcloudError
from meshcloud.core.formation import AlreadyFormed, Decision, Found, Join, decide
from meshcloud.discovery.admission import AdmittedPeer
from meshcloud.discovery.service import Discovery
from meshcloud.log import setup_logging
from meshcloud.web.tls import tls_context


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, sort_keys=True) + "\n")
    sys.stdout.flush()


def _peer_fields(peer: AdmittedPeer) -> dict[str, Any]:
    return {
        "peer": peer.name,
        "site": peer.site,
        "address": peer.address,
        "api_port": peer.api_port,
        "raft_port": peer.raft_port,
        "via": peer.via,
        "formed": peer.report.status.formed,
        "cluster_uuid": peer.report.status.cluster_uuid,
    }


class Node:
    def __init__(self, discovery: Discovery, simulate: bool) -> None:
        self.discovery = discovery
        self.simulate = simulate
        self.last_reason = ""

    def step(self) -> None:
        d = self.discovery
        decision: Decision
        if self.simulate:
            decision = d.decide_formation()
        else:
            reports = {n: p.report.formation_report() for n, p in d.peers.items()}
            decision = decide(d.rack.name, d.status, d.bootstrap_expect, reports)
        if decision.reason != self.last_reason:
            self.last_reason = decision.reason
            emit("decision", kind=type(decision).__name__, reason=decision.reason)
        if not self.simulate:
            return
        if isinstance(decision, Found):
            emit("formed", how="founded", cluster_uuid=decision.cluster_uuid)
        elif isinstance(decision, Join):
            members = {m.name: m for m in decision.members}
            members[d.rack.name] = d.rack.member()
            d.update_formation(
                True,
                decision.cluster_uuid,
                leader=decision.leader,
                members=[members[n] for n in sorted(members)],
            )
            emit("formed", how="joined", cluster_uuid=decision.cluster_uuid)
        elif isinstance(decision, AlreadyFormed) and decision.conflicting_clusters:
            emit("conflict", clusters=list(decision.conflicting_clusters))

    async def watch(self) -> None:
        seen: set[str] = set()
        self.step()
        async for peer in self.discovery.updates():
            emit("admitted" if peer.name not in seen else "updated", **_peer_fields(peer))
            seen.add(peer.name)
            self.step()


async def run(config: Path, simulate: bool) -> None:
    cfg = load_config(config)
    discovery = Discovery.from_config(cfg, cfg.read_secret())
    app = web.Application()
    discovery.add_routes(app)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        tls = tls_context(cfg.console.tls_cert, cfg.console.tls_key)
        site = web.TCPSite(runner, cfg.network.bind_address, cfg.network.api_port, ssl_context=tls)
        await site.start()
        await discovery.start()
        emit("ready", rack=cfg.rack.name, cluster_id=discovery.cluster_id)
        node = Node(discovery, simulate)
        watcher = loop.create_task(node.watch())
        await stopping.wait()
        watcher.cancel()
    finally:
        await discovery.stop()
        await runner.cleanup()
    emit("stopped", rack=cfg.rack.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshcloud.discovery", description=__doc__)
    parser.add_argument("--config", type=Path, required=True, help="daemon config file (YAML)")
    parser.add_argument(
        "--simulate-formation",
        action="store_true",
        help="found or join for real in discovery terms (no Raft): for the lab and tests",
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    setup_logging(level=args.log_level, json_lines=True)
    try:
        asyncio.run(run(args.config, args.simulate_formation))
    except MeshcloudError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
