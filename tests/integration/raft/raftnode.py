"""One Raft node in its own process, driven by tests over a Unix socket (JSON lines).

    python raftnode.py CONFIG.json

``mode`` is ``stock`` (pysyncobj 0.3.17 exactly as shipped, autoTick thread
and all), ``hardened`` (meshcloud.raft.hardening.HardenedSyncObj) or
``store`` (the full meshcloud.raft.syncobj_store.SyncObjStore). Stock and
hardened nodes run the same placement state machine with the same static
voters, so a test compares the libraries and nothing else.

The only change made to stock pysyncobj: outgoing sockets are bound to the
node's own loopback address before connecting (the kernel would pick
127.0.0.1 for every node), so that nftables rules can tell nodes apart.
Requests: propose, status, log, compact, probe, stop (see ``handle``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import pysyncobj.tcp_connection
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf
from pysyncobj.node import TCPNode

from meshcloud.core.errors import MeshcloudError
from meshcloud.core.models import Capacity, Rack

log = logging.getLogger("raftnode")


def bind_stock_sockets(source: str) -> None:
    """Make stock pysyncobj's outgoing sockets start from ``source`` (test plumbing only)."""

    class BoundSocket(socket.socket):
        def connect(self, address: Any) -> None:
            if self.family == socket.AF_INET:
                self.bind((source, 0))
            super().connect(address)

    proxy = types.ModuleType("socket")
    proxy.__dict__.update(socket.__dict__)
    proxy.socket = BoundSocket  # type: ignore[attr-defined]
    pysyncobj.tcp_connection.socket = proxy  # type: ignore[attr-defined]


class Engine:
    """A Raft node behind one small interface, whatever the mode."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.mode = cfg["mode"]
        self.view: dict[str, Any] = {}
        self.loop = asyncio.get_running_loop()
        self.store: Any = None
        self.node: Any = None
        self.machine: Any = None

    async def start(self) -> None:
        cfg = self.cfg
        me = f"{cfg['address']}:{cfg['port']}"
        peers = [p for p in cfg["peers"] if p != me]
        state_dir = Path(cfg["state_dir"])
        state_dir.mkdir(parents=True, exist_ok=True)
        overrides = dict(cfg.get("conf", {}))
        if self.mode == "store":
            from meshcloud.raft.syncobj_store import RaftSettings, SyncObjStore

            rack = Rack(cfg["name"], cfg.get("site", "a"), Capacity(4, 4096, 100),
                        address=cfg["address"], raft_port=cfg["port"])  # fmt: skip
            settings = RaftSettings(
                rack=rack, state_dir=state_dir, secret=cfg["secret"], peers=tuple(peers),
                found=cfg.get("found", False), cluster_id="test", max_voters=cfg.get("max_voters", 5),
                compaction_min_entries=overrides.get("logCompactionMinEntries", 5000),
            )  # fmt: skip
            self.store = SyncObjStore(settings)
            await self.store.start()
            return
        from meshcloud.raft.machine import PlacementMachine

        self.machine = PlacementMachine()
        dump = str(state_dir / "dump")
        journal = str(state_dir / "journal")
        if self.mode == "stock":
            bind_stock_sockets(cfg["address"])
            kwargs: dict[str, Any] = {
                "password": cfg.get("password"),
                "bindAddress": me,
                "dynamicMembershipChange": True,
            }
            if cfg.get("journal", True):
                kwargs["journalFile"] = journal
            if cfg.get("dump", True):
                kwargs["fullDumpFile"] = dump
            kwargs.update(overrides)
            conf = SyncObjConf(**kwargs)
            self.node = SyncObj(me, peers, conf, consumers=[self.machine])
            self.node.addOnTickCallback(self._capture)
            return
        from meshcloud.raft.hardening import HardenedSyncObj, HardeningOptions
        from meshcloud.raft.syncobj_store import raft_password

        kwargs = {
            "password": raft_password(cfg["secret"]),
            "bindAddress": me,
            "dynamicMembershipChange": True,
            "autoTick": False,
            "commandsWaitLeader": False,
            "leaderFallbackTimeout": 1.0,
            "useFork": False,
            "fullDumpFile": dump,
        }
        kwargs.update(overrides)
        options = HardeningOptions(**cfg.get("hardening", {}))
        self.node = HardenedSyncObj(
            me, peers, SyncObjConf(**kwargs), [self.machine], journal_path=journal,
            hardening=options, on_tick=lambda n: self._capture(),
        )  # fmt: skip
        self.node.start()

    def _capture(self) -> None:
        """Runs in the Raft thread: a consistent status snapshot."""
        node = self.node
        status = node.getStatus()
        leader = status.get("leader")
        self.view = {
            "self": f"{self.cfg['address']}:{self.cfg['port']}",
            "leader": leader.id if isinstance(leader, TCPNode) else None,
            "is_leader": status.get("state") == 2,
            "term": status.get("raft_term"),
            "commit_index": status.get("commit_idx"),
            "last_applied": status.get("last_applied"),
            "log_len": status.get("log_len"),
            "revision": self.machine.state.revision,
            "recovering": getattr(node, "recovering_from", None) is not None,
            "connected": sorted(
                k.removeprefix("partner_node_status_server_")
                for k, v in status.items()
                if k.startswith("partner_node_status_server_") and v == 2
            ),
        }

    def status(self) -> dict[str, Any]:
        if self.store is not None:
            st = self.store.status()
            view = self.store._view or {}
            return {
                **st.to_dict(),
                "is_leader": bool(view.get("is_leader")),
                "leader_address": view.get("leader"),
                "log_first": view.get("log_first"),
                "revision": self.store.state().revision,
                "voters": sorted(self.store.state().voters),
                "raft_voters": sorted(view.get("voters", [])),
                "racks": sorted(self.store.state().racks),
                "connected": sorted(view.get("connected", [])),
            }
        return dict(self.view)

    def state(self) -> Any:
        if self.store is not None:
            return self.store.state()
        return self.machine.state

    async def propose(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        if self.store is not None:
            try:
                result = await self.store.propose(command, timeout_s=timeout_s)
            except MeshcloudError as exc:
                return {"ok": False, "error": type(exc).__name__, "message": str(exc)}
            return {"ok": True, "result": result}
        from meshcloud.raft.machine import encode_command

        future: asyncio.Future[tuple[Any, int]] = self.loop.create_future()

        def settle(result: Any, error: int) -> None:
            if not future.done():
                future.set_result((result, error))

        def callback(result: Any, error: int) -> None:
            self.loop.call_soon_threadsafe(settle, result, error)

        self.machine.apply_json(encode_command(command), callback=callback)
        if self.mode == "hardened":
            self.node.wake()
        try:
            result, error = await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            return {"ok": False, "error": "timeout", "message": f"no answer in {timeout_s} s"}
        if error != FAIL_REASON.SUCCESS:
            return {"ok": False, "error": f"fail_reason_{error}", "message": ""}
        if not result.get("ok"):
            return {"ok": False, "error": result.get("error"), "message": result.get("message")}
        return {"ok": True, "result": result}

    def probe(self, address: str) -> bool:
        """Send a harmless message straight to a peer: does the transport think it went?"""
        node = self.node
        transport = node._SyncObj__transport
        target = next((n for n in node.otherNodes if n.id == address), None)
        if target is None:
            return False
        return bool(transport.send(target, {"type": "mc_ping"}))

    async def stop(self) -> None:
        if self.store is not None:
            await self.store.stop()
        elif self.mode == "hardened":
            await asyncio.to_thread(self.node.stop)
        else:
            await asyncio.to_thread(self.node.destroy_synchronous)


async def handle(engine: Engine, request: dict[str, Any], stopping: asyncio.Event) -> Any:
    op = request.get("op")
    if op == "propose":
        return await engine.propose(request["command"], float(request.get("timeout", 3.0)))
    if op == "append_many":
        timeout_s = float(request.get("timeout", 3.0))
        return await asyncio.gather(
            *(
                engine.propose({"op": "append", "key": request["key"], "value": v}, timeout_s)
                for v in request["values"]
            )
        )
    if op == "status":
        return engine.status()
    if op == "log":
        return {"values": list(engine.state().logs.get(request["key"], ()))}
    if op == "state":
        return engine.state().to_dict()
    if op == "compact":
        (engine.store._node if engine.store else engine.node).forceLogCompaction()
        return {"ok": True}
    if op == "probe":
        return {"sent": engine.probe(request["address"])}
    if op == "stop":
        stopping.set()
        return {"ok": True}
    return {"error": f"unknown op {op!r}"}


async def main(config_path: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {cfg['name']} %(name)s %(message)s",
        stream=sys.stderr,
    )  # fmt: skip
    engine = Engine(cfg)
    await engine.start()
    stopping = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                answer = await handle(engine, json.loads(line), stopping)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    control = cfg["control"]
    if os.path.exists(control):
        os.unlink(control)
    server = await asyncio.start_unix_server(serve, path=control)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    log.info(
        "ready at %s (%s mode, pid %d, t=%.3f)", control, engine.mode, os.getpid(), time.time()
    )
    await stopping.wait()
    server.close()
    await engine.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
