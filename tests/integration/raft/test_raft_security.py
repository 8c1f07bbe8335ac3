"""Defect (g): what an attacker on the mesh can do to the Raft port.

pysyncobj unpickles what it receives. Without a password it unpickles the
first frame of any connection, so anyone who can reach the port runs code
on the rack. With a password it still reads whatever length a frame
announces before authenticating: a 2 GiB length prefix and a stream of
junk make it burn CPU (it copies its read buffer for every chunk) and stop
ticking, so the cluster elects a new leader. meshcloud always sets the
password, caps frame sizes (1 KiB until the peer has proved the secret),
drops unauthenticated connections after 2 s, caps their number, and
disables the admin utility commands.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import secrets
import socket
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pysyncobj.utility import TcpUtility, UtilityException
from raftcluster import SECRET, RaftCluster, RaftNode, wait_until

from meshcloud.raft.syncobj_store import raft_password


class WriteMarker:
    """Unpickling this creates a file: proof that code from the wire ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def frame(obj: object) -> bytes:
    data = zlib.compress(pickle.dumps(obj, protocol=2), 3)
    return struct.pack("i", len(data)) + data


def send_and_watch(node: RaftNode, payload: bytes, wait_s: float = 3.0) -> bool:
    """Send raw bytes to the node's Raft port; True if the node closed the connection."""
    with socket.create_connection((node.address, node.port), timeout=wait_s) as sock:
        try:
            sock.sendall(payload)
            return sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def _healthy(cluster: RaftCluster, value: str) -> int:
    """A write commits and every node applies it; return the leader's term."""
    leader = await cluster.leader()
    assert (await leader.append("h", value))["ok"]
    for node in cluster.nodes:
        await wait_until(lambda n=node: _has(n, value), 10.0, f"{node.name} to apply {value}")
    return int((await leader.status())["term"])


async def _has(node: RaftNode, value: str) -> bool:
    return value in await node.values("h")


# --- code execution -------------------------------------------------------------------


async def test_stock_without_password_runs_a_pickle_from_anyone(
    clusters: Callable[..., RaftCluster], tmp_path: Path
) -> None:
    cluster = clusters("stock", 1)  # no password: how pysyncobj ships
    await cluster.start_all()
    marker = tmp_path / "pwned"
    await asyncio.to_thread(send_and_watch, cluster.nodes[0], frame(WriteMarker(str(marker))))
    await wait_until(lambda: _exists(marker), 5.0, "the pickle to run")


async def _exists(path: Path) -> bool:
    return path.exists()


async def test_hardened_runs_nothing_and_keeps_working(
    clusters: Callable[..., RaftCluster], tmp_path: Path
) -> None:
    cluster = clusters("hardened", 3)
    await cluster.start_all()
    term = await _healthy(cluster, "before")
    leader = await cluster.leader()
    marker = tmp_path / "pwned"
    attacks = {
        "pickle as first frame": frame(WriteMarker(str(marker))),
        "pickle in a short frame": frame(["add", "127.0.0.1:1"]),
        "raw junk": secrets.token_bytes(64 * 1024),
        "negative length": struct.pack("i", -5) + b"x" * 100,
        "apply_command": frame({"type": "apply_command", "command": b"\x00" + pickle.dumps(1)}),
    }
    for name, payload in attacks.items():
        for node in cluster.nodes:
            closed = await asyncio.to_thread(send_and_watch, node, payload)
            assert closed, f"{name}: {node.name} kept the connection open"
    assert await _healthy(cluster, "after") == term, "the attacks caused an election"
    assert await cluster.leader() is leader
    assert not marker.exists()


# --- a huge length prefix ------------------------------------------------------------------

ATTACK_S = 3.0


def flood(node: RaftNode) -> int:
    """Announce a 2 GiB frame, then stream junk for ATTACK_S; return the bytes sent."""
    chunk = secrets.token_bytes(1 << 20)
    sent = 0
    deadline = time.monotonic() + ATTACK_S
    with socket.create_connection((node.address, node.port), timeout=ATTACK_S) as sock:
        try:
            sock.sendall(struct.pack("i", 2**31 - 1))
            while time.monotonic() < deadline:
                sent += sock.send(chunk)
        except OSError:
            pass
    return sent


async def _under_flood(cluster: RaftCluster) -> tuple[int, float, int, int]:
    """Flood the leader; return (term increase, victim CPU s, victim RSS growth, bytes sent)."""
    await cluster.start_all()
    term = await _healthy(cluster, "before")
    victim = await cluster.leader()
    cpu, rss = cpu_seconds(victim.pid), rss_bytes(victim.pid)
    sent = await asyncio.to_thread(flood, victim)
    cpu_used, rss_growth = cpu_seconds(victim.pid) - cpu, rss_bytes(victim.pid) - rss
    terms = [int((await n.status())["term"]) for n in cluster.others(victim)]
    return max(terms) - term, cpu_used, rss_growth, sent


@pytest.mark.slow
async def test_stock_huge_length_prefix_burns_cpu_and_causes_an_election(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = clusters("stock", 3, extra={"password": "stock-test-password"})
    elections, cpu, rss, sent = await _under_flood(cluster)
    print(
        f"stock: {elections} elections, {cpu:.1f} s CPU, RSS +{rss >> 20} MiB, sent {sent >> 20} MiB"
    )
    assert elections > 0  # its Raft thread was stuck reading junk (CPU depends on the machine)


async def test_hardened_huge_length_prefix_costs_nothing(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = clusters("hardened", 3)
    elections, cpu, rss, sent = await _under_flood(cluster)
    print(
        f"hardened: {elections} elections, {cpu:.1f} s CPU, RSS +{rss >> 20} MiB, sent {sent >> 20} MiB"
    )
    assert elections == 0
    assert cpu < 0.5
    assert rss < 16 << 20
    assert await _healthy(cluster, "after") > 0


# --- silent connections and admin commands -----------------------------------------------


def open_silent(node: RaftNode, count: int) -> list[socket.socket]:
    return [socket.create_connection((node.address, node.port), timeout=5) for _ in range(count)]


def closed_within(sockets: list[socket.socket], seconds: float) -> int:
    """How many of ``sockets`` the peer closes within ``seconds``."""
    deadline = time.monotonic() + seconds
    closed = 0
    for sock in sockets:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(1) == b"":
                closed += 1
        except (ConnectionResetError, BrokenPipeError):
            closed += 1
        except TimeoutError:
            pass
        finally:
            sock.close()
    return closed


async def test_stock_keeps_silent_connections_forever(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = clusters("stock", 1, extra={"password": "stock-test-password"})
    await cluster.start_all()
    sockets = await asyncio.to_thread(open_silent, cluster.nodes[0], 10)
    assert await asyncio.to_thread(closed_within, sockets, 4.0) == 0


async def test_hardened_drops_silent_connections_and_caps_them(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = clusters("hardened", 3)
    await cluster.start_all()
    term = await _healthy(cluster, "before")
    node = cluster.nodes[0]
    sockets = await asyncio.to_thread(open_silent, node, 40)
    # Past the cap of 32 pending handshakes, connections are closed at once; the
    # rest after the 2 s authentication deadline.
    assert await asyncio.to_thread(closed_within, sockets, 4.0) == 40
    assert await _healthy(cluster, "after") == term


def run_utility(node: RaftNode, password: str) -> Any:
    return TcpUtility(password=password, timeout=3.0).executeCommand(node.id, ["status"])


async def test_stock_admin_commands_answer_anyone_with_the_password(
    clusters: Callable[..., RaftCluster],
) -> None:
    cluster = clusters("stock", 1, extra={"password": "stock-test-password"})
    await cluster.start_all()
    status = await asyncio.to_thread(run_utility, cluster.nodes[0], "stock-test-password")
    assert isinstance(status, dict) and "raft_term" in status


async def test_hardened_admin_commands_are_disabled(clusters: Callable[..., RaftCluster]) -> None:
    cluster = clusters("hardened", 1)
    await cluster.start_all()
    with pytest.raises(UtilityException):
        await asyncio.to_thread(run_utility, cluster.nodes[0], raft_password(SECRET))
