"""Test plumbing: Raft node processes on loopback addresses, and loopback partitions.

Nodes listen on 127.B.C.x (a block picked per test run) and are driven
through raftnode.py's Unix socket. Partitions are nftables rules in a table
the test creates and always deletes; they only match the test's own
loopback addresses, so no traffic leaves the host and nothing else is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

RAFTNODE = Path(__file__).with_name("raftnode.py")
SECRET = "raft-test-secret-0123456789-abcdefghij"
TABLE_PREFIX = "mcrafttest"
FAST_TIMERS = {
    "raftMinTimeout": 0.2,
    "raftMaxTimeout": 0.6,
    "appendEntriesPeriod": 0.05,
    "connectionTimeout": 1.5,
    "connectionRetryTime": 0.5,
}
T = TypeVar("T")
_counter = itertools.count()


async def wait_until(
    check: Callable[[], Awaitable[T]], timeout_s: float, what: str, interval_s: float = 0.1
) -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while True:
        try:
            last = await check()
        except (OSError, ValueError, KeyError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s} s waiting for {what} (last: {last!r})"
            )
        await asyncio.sleep(interval_s)


def nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)


def cleanup_leftover_tables() -> None:
    """Delete tables a crashed earlier run of these tests left behind."""
    out = subprocess.run(["nft", "list", "tables"], text=True, capture_output=True, check=False)
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].startswith(TABLE_PREFIX):
            pid = parts[2].removeprefix(TABLE_PREFIX).split("x")[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                subprocess.run(["nft", "delete", "table", parts[1], parts[2]], check=False)


class LoopbackFirewall:
    """Partitions between loopback addresses, in a dedicated nftables table."""

    def __init__(self) -> None:
        self.table = f"{TABLE_PREFIX}{os.getpid()}x{next(_counter)}"
        nft(
            f"table inet {self.table} {{\n"
            "  chain input { type filter hook input priority -50; policy accept; }\n"
            "}\n"
        )

    def partition(self, *groups: Iterable[RaftNode], reject: bool = False) -> None:
        """Cut Raft traffic between nodes of different groups (both ways).

        Packets are dropped (a silent link: connection attempts back off in the
        kernel), or with ``reject`` answered by a TCP reset (attempts fail at
        once). Rules match the nodes' addresses and Raft port only.
        """
        verdict = "reject with tcp reset" if reject else "drop"
        sides = [list(g) for g in groups]
        rules = [f"flush chain inet {self.table} input"]
        for i, a_side in enumerate(sides):
            for j, b_side in enumerate(sides):
                if i == j:
                    continue
                for a in a_side:
                    for b in b_side:
                        match = f"ip saddr {a.address} ip daddr {b.address}"
                        for end in ("sport", "dport"):
                            rules.append(
                                f"add rule inet {self.table} input {match} tcp {end} {b.port}"
                                f" {verdict}"
                            )
        nft("\n".join(rules) + "\n")

    def heal(self) -> None:
        nft(f"flush chain inet {self.table} input\n")

    def delete(self) -> None:
        subprocess.run(
            ["nft", "delete", "table", "inet", self.table], check=False, capture_output=True
        )


def _free_port(addresses: Sequence[str]) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((addresses[0], 0))
            port = probe.getsockname()[1]
        try:
            for address in addresses:
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((address, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port on the test's loopback addresses")


@dataclass
class RaftNode:
    name: str
    address: str
    port: int
    directory: Path
    config: dict[str, Any]
    process: subprocess.Popen[bytes] | None = None

    @property
    def id(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def control(self) -> str:
        return str(self.directory / "control.sock")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    async def request(self, payload: dict[str, Any], timeout_s: float = 30.0) -> Any:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(self.control, limit=1 << 24), 5.0
        )
        try:
            writer.write(json.dumps(payload).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout_s)
        finally:
            writer.close()
        if not line:
            raise OSError(f"{self.name}: control connection closed")
        return json.loads(line)

    async def status(self) -> dict[str, Any]:
        return await self.request({"op": "status"}, 5.0)  # type: ignore[no-any-return]

    async def propose(self, command: dict[str, Any], timeout_s: float = 3.0) -> dict[str, Any]:
        return await self.request(  # type: ignore[no-any-return]
            {"op": "propose", "command": command, "timeout": timeout_s}, timeout_s + 10
        )

    async def append(self, key: str, value: str | int, timeout_s: float = 3.0) -> dict[str, Any]:
        return await self.propose({"op": "append", "key": key, "value": value}, timeout_s)

    async def append_many(
        self, key: str, values: Sequence[str | int], timeout_s: float = 3.0
    ) -> list[dict[str, Any]]:
        """Propose all values at once (concurrently, inside the node); one result each."""
        return await self.request(  # type: ignore[no-any-return]
            {"op": "append_many", "key": key, "values": list(values), "timeout": timeout_s},
            timeout_s + 30,
        )

    async def values(self, key: str) -> list[Any]:
        answer = await self.request({"op": "log", "key": key})
        return list(answer["values"])


@dataclass
class RaftCluster:
    """N node processes of one mode (stock, hardened or store) with static voters."""

    directory: Path
    mode: str
    size: int
    conf: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    nodes: list[RaftNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        block = random.randrange(20, 250)
        sub = random.randrange(1, 250)
        addresses = [f"127.{block}.{sub}.{i + 1}" for i in range(self.size)]
        port = _free_port(addresses)
        peers = [f"{a}:{port}" for a in addresses]
        for i, address in enumerate(addresses):
            name = f"n{i + 1}"
            directory = self.directory / name
            directory.mkdir(parents=True, exist_ok=True)
            config = {
                "mode": self.mode,
                "name": name,
                "address": address,
                "port": port,
                "peers": peers,
                "state_dir": str(directory / "state"),
                "control": str(directory / "control.sock"),
                "secret": SECRET,
                "conf": {**FAST_TIMERS, **self.conf},
                **self.extra,
            }
            self.nodes.append(RaftNode(name, address, port, directory, config))

    def start(self, node: RaftNode) -> None:
        assert not node.running(), f"{node.name} is already running"
        path = node.directory / "config.json"
        path.write_text(json.dumps(node.config))
        if os.path.exists(node.control):
            os.unlink(node.control)
        log = open(node.directory / "node.log", "ab")  # noqa: SIM115 - the child owns it
        node.process = subprocess.Popen(
            [sys.executable, str(RAFTNODE), str(path)], stdout=log, stderr=log, cwd=node.directory
        )
        log.close()

    async def start_all(self) -> None:
        for node in self.nodes:
            self.start(node)
        for node in self.nodes:
            await self.wait_ready(node)

    async def wait_ready(self, node: RaftNode, timeout_s: float = 20.0) -> None:
        async def ready() -> bool:
            if not node.running():
                raise AssertionError(f"{node.name} exited: {self.log_tail(node)}")
            return bool(await node.status())

        await wait_until(ready, timeout_s, f"{node.name} to answer")

    def kill(self, node: RaftNode) -> None:
        """A power cut: SIGKILL, nothing said on the way down beyond what the kernel does."""
        if node.running():
            assert node.process is not None
            node.process.send_signal(signal.SIGKILL)
            node.process.wait(10)

    async def stop(self, node: RaftNode) -> None:
        if not node.running():
            return
        assert node.process is not None
        with contextlib.suppress(OSError):
            await node.request({"op": "stop"}, 5.0)
        try:
            await asyncio.to_thread(node.process.wait, 10)
        except subprocess.TimeoutExpired:
            self.kill(node)

    async def restart(self, node: RaftNode) -> None:
        self.kill(node)
        self.start(node)
        await self.wait_ready(node)

    def shutdown(self) -> None:
        for node in self.nodes:
            self.kill(node)

    def log_tail(self, node: RaftNode, lines: int = 20) -> str:
        try:
            text = (node.directory / "node.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def others(self, *nodes: RaftNode) -> list[RaftNode]:
        return [n for n in self.nodes if n not in nodes]

    async def leader(
        self, among: Sequence[RaftNode] | None = None, timeout_s: float = 15.0
    ) -> RaftNode:
        """The node that a majority of ``among`` (default: all) follows, once there is one."""
        group = list(among or self.nodes)

        async def find() -> RaftNode | None:
            seen: dict[str, int] = {}
            for node in group:
                if not node.running():
                    continue
                try:
                    status = await node.status()
                except OSError:
                    continue
                leader = status.get("leader_address", status.get("leader"))
                if leader:
                    seen[leader] = seen.get(leader, 0) + 1
            for address, count in seen.items():
                if count > len(group) / 2:
                    for node in group:
                        if node.id == address and node.running():
                            return node
            return None

        return await wait_until(find, timeout_s, "a leader followed by a majority")


async def fill_ballast(node: RaftNode, count: int, timeout_s: float = 120.0) -> None:
    """Commit ``count`` random 190-character values under the key "ballast" through ``node``.

    Ballast makes the map (and so a snapshot) big. It is not under test: a
    batch that fails while the machine is busy (a proposal timing out, an
    election discarding it) is simply written again.
    """
    import secrets

    deadline = time.monotonic() + timeout_s
    done = 0
    while done < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {done} of {count} ballast values committed")
        size = min(200, count - done)
        answers = await node.append_many(
            "ballast", [secrets.token_urlsafe(190) for _ in range(size)]
        )
        done += sum(1 for a in answers if a["ok"])
