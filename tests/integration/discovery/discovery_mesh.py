"""A small mesh for discovery tests: namespaces joined by a bridge, with real multicast.

:func:`build_mesh` creates ``count`` rack namespaces plus one namespace
holding the bridge, each rack with ``eth0`` on 10.77.0.0/24, loopback up,
multicast allowed (a 224.0.0.0/4 route, IGMP snooping off on the bridge).
Processes are started inside with :meth:`Mesh.spawn`. :meth:`Mesh.teardown`
removes everything it created (processes by pid, then namespaces, whose
links go with them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshcloud.lab import netns

SUBNET = "10.77.0"
SECRET = "a0f3c9e1b7d24f6a8c5e0b3d9f1a7c2e"  # a test-only cluster secret


def can_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2"
    return None


@dataclass
class RackNs:
    netns: str
    address: str


@dataclass
class Mesh:
    prefix: str
    bridge_netns: str
    racks: list[RackNs] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def spawn(
        self, rack: RackNs, argv: Sequence[str], stdout: Path, stderr: Path
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``rack``'s namespace, output to files."""
        with stdout.open("wb") as out, stderr.open("wb") as err:
            proc = subprocess.Popen(
                netns.in_netns(rack.netns, argv),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=Path(__file__).resolve().parents[3],
            )
        self.procs.append(proc)
        return proc

    def python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for rack in self.racks:
            netns.delete_netns(rack.netns)
        netns.delete_netns(self.bridge_netns)


def build_mesh(prefix: str, count: int) -> Mesh:
    mesh = Mesh(prefix=prefix, bridge_netns=f"{prefix}-net")
    try:
        netns.add_netns(mesh.bridge_netns)
        netns.add_bridge("br0", netns=mesh.bridge_netns)
        netns.run(
            netns.ip("link", "set", "br0", "type", "bridge", "mcast_snooping", "0",
                     netns=mesh.bridge_netns)
        )  # fmt: skip
        for index in range(1, count + 1):
            rack = RackNs(netns=f"{prefix}-r{index}", address=f"{SUBNET}.{10 + index}")
            mesh.racks.append(rack)
            netns.add_netns(rack.netns)
            inside, outside = f"{prefix}i{index}", f"{prefix}o{index}"
            netns.add_veth(inside, outside, a_netns=rack.netns, b_netns=mesh.bridge_netns)
            netns.run(netns.ip("link", "set", inside, "name", "eth0", netns=rack.netns))
            netns.add_address("eth0", f"{rack.address}/24", netns=rack.netns)
            netns.set_up("eth0", netns=rack.netns)
            netns.run(netns.ip("route", "add", "224.0.0.0/4", "dev", "eth0", netns=rack.netns))
            netns.set_master(outside, "br0", netns=mesh.bridge_netns)
            netns.set_up(outside, netns=mesh.bridge_netns)
    except BaseException:
        mesh.teardown()
        raise
    return mesh


# --- running standalone discovery nodes (python -m meshcloud.discovery) -------------


def events(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` (a safety bound, not a synchronisation sleep)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def write_config(
    tmp: Path,
    name: str,
    rack: RackNs,
    secret: str,
    peers: list[str] | None = None,
    mdns: bool = True,
) -> Path:
    (tmp / f"{name}.secret").write_text(secret)
    config = {
        "rack": {"name": name, "site": "north"},
        "cluster": {
            "secret_file": str(tmp / f"{name}.secret"),
            "bootstrap_expect": 3,
            "peers": peers or [],
            "mdns": mdns,
        },
        "network": {"bind_address": rack.address, "api_port": 8440, "raft_port": 7440},
        "state_dir": str(tmp / name),
    }
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def start_node(mesh: Mesh, tmp: Path, name: str, rack: RackNs, config: Path) -> tuple[Path, Path]:
    out, err = tmp / f"{name}.events", tmp / f"{name}.log"
    mesh.spawn(
        rack,
        mesh.python("-m", "meshcloud.discovery", "--config", str(config), "--simulate-formation"),
        out,
        err,
    )
    return out, err


def admitted(path: Path) -> set[str]:
    return {e["peer"] for e in events(path) if e["event"] in ("admitted", "updated")}


def formed(path: Path) -> list[dict[str, Any]]:
    return [e for e in events(path) if e["event"] == "formed"]
