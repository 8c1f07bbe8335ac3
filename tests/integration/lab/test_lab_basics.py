"""The lab's racks: reachability (TCP, multicast, SSH), config, teardown and crash clean-up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshcloud.config import load_config
from meshcloud.lab import netns, plan, procs
from meshcloud.lab.lab import Lab, standin_daemon_argv
from meshcloud.lab.pytest_plugin import reap_orphan_labs

from .helpers import (
    API_PORT,
    can_connect,
    health,
    multicast_receiver,
    multicast_send,
)

pytestmark = pytest.mark.root

GROUP, MPORT = "239.77.0.1", 5407


@pytest.mark.lab(racks=3, sites="a,a,b", standin=True)
def test_racks_reach_each_other_over_tcp_multicast_and_ssh(lab: Lab) -> None:
    racks = lab.racks()
    assert racks == ["r1", "r2", "r3"]
    for src in racks:
        for dst in racks:
            assert health(lab, src, lab.rack(dst).ip)["rack"] == dst
    # The observer reaches every rack.
    assert health(lab, None, lab.rack("r3").ip)["rack"] == "r3"

    receivers = {r: multicast_receiver(lab, r, GROUP, MPORT) for r in ("r2", "r3")}
    try:
        multicast_send(lab, "r1", GROUP, MPORT, b"hello racks")
        for rack, sock in receivers.items():
            data, (sender, _port) = sock.recvfrom(100)
            assert data == b"hello racks", rack
            assert sender == lab.rack("r1").ip
    finally:
        for sock in receivers.values():
            sock.close()

    # Each rack runs its own sshd on its lab address; the lab key gets in.
    out = lab.exec("r1", lab.ssh_argv("r2", "cat", "/proc/net/tcp"), timeout=20)
    assert out.returncode == 0
    listening = lab.exec("r2", ["ss", "-Hltn", "sport", "= :22"]).stdout
    assert f"{lab.rack('r2').ip}:22" in listening and "0.0.0.0:22" not in listening


@pytest.mark.lab(racks=2, sites="a,b", standin=True, bootstrap_expect=2)
def test_daemon_config_follows_the_schema(lab: Lab) -> None:
    info = lab.rack("r2")
    cfg = load_config(info.config_path)
    assert cfg.rack.name == "r2" and cfg.rack.site == "b"
    assert cfg.network.bind_address == info.ip == "10.77.0.2"
    assert cfg.cluster.bootstrap_expect == 2
    assert cfg.state_dir == info.state_dir
    assert cfg.libvirt_uri() == f"qemu:///embed?root={info.state_dir / 'libvirt'}"
    assert len(cfg.read_secret()) == 64
    assert os.stat(lab.secret_file).st_mode & 0o077 == 0
    # The appliance bridge exists inside the rack, not in the root namespace.
    assert netns.link_exists(plan.APPLIANCE_BRIDGE, info.netns)


def test_late_rack_and_late_daemon(lab_factory) -> None:  # type: ignore[no-untyped-def]
    lab = lab_factory(2, standin=True, start_daemons=["r1"])
    assert lab.pid("r2") is None and not can_connect(lab, "r1", "10.77.0.2", API_PORT)
    lab.start_daemon("r2")
    assert health(lab, "r1", "10.77.0.2")["rack"] == "r2"
    name = lab.add_rack(site="c")
    assert name == "r3"
    assert health(lab, "r1", lab.rack("r3").ip)["rack"] == "r3"


def test_down_leaves_no_namespace_link_or_process(lab_factory) -> None:  # type: ignore[no-untyped-def]
    lab = lab_factory(2, standin=True, link="delay=10ms")
    extra = lab.popen("r1", ["sleep", "600"])
    status = lab.status()
    pids = [p.pid for r in status.racks for p in r.processes] + [extra.pid]
    assert any(p.name == "shaper" for r in status.racks for p in r.processes)
    # Nothing of the lab lives in the root namespace: no root link has an end in the lab.
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f"mcl-{lab.name}-" not in root_links
    lab.down()
    assert extra.wait(timeout=10) is not None
    for pid in pids:
        assert procs.proc_stat(pid) is None or procs.proc_stat(pid)[0] == "Z", pid  # type: ignore[index]
    pattern = plan.netns_pattern(lab.name)
    assert [ns for ns in netns.list_netns() if pattern.match(ns)] == []
    assert not lab.dir.exists()


def test_down_cleans_up_after_a_crashed_lab(lab_factory) -> None:  # type: ignore[no-untyped-def]
    lab = lab_factory(2, standin=True)
    pids = [p.pid for r in lab.status().racks for p in r.processes]
    # The crash: the state is gone, the namespaces and processes are not.
    (lab.dir / "state.json").unlink()
    status = Lab(lab.name).status()
    assert not status.up
    assert set(status.leftovers) == {
        f"mcl-{lab.name}-net",
        f"mcl-{lab.name}-r1",
        f"mcl-{lab.name}-r2",
    }
    Lab(lab.name).down()
    assert Lab(lab.name).status().leftovers == ()
    for pid in pids:
        stat = procs.proc_stat(pid)
        assert stat is None or stat[0] == "Z"


def test_labs_of_a_dead_test_run_are_reaped(tmp_path: Path) -> None:
    from meshcloud.lab.pytest_plugin import lab_unavailable

    if lab_unavailable():
        pytest.skip(lab_unavailable())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # A private root: other test sessions reap dead owners' labs in the shared root too.
    lab = Lab("tdead" + os.urandom(2).hex()[:3], root=tmp_path)
    alive = Lab("tlive" + os.urandom(2).hex()[:3], root=tmp_path)
    try:
        lab.up(1, daemon_argv=standin_daemon_argv(), owner_pid=dead.pid)
        alive.up(1, daemon_argv=standin_daemon_argv(), owner_pid=os.getpid())
        assert reap_orphan_labs(tmp_path) == [lab.name]
        assert not lab.exists() and alive.exists()
        assert not netns.netns_exists(plan.rack_netns(lab.name, "r1"))
    finally:
        lab.down()
        alive.down()


def test_a_lab_never_touches_another_labs_namespaces(lab_factory) -> None:  # type: ignore[no-untyped-def]
    first = lab_factory(1, standin=True)
    second = lab_factory(1, standin=True)
    # Same addresses, separate segments: each lab's r1 answers inside its own lab.
    assert health(first, None, "10.77.0.1")["rack"] == "r1"
    second.down()
    assert first.pid("r1") is not None
    assert health(first, None, "10.77.0.1")["rack"] == "r1"


def test_socket_belongs_to_the_rack_namespace(lab_factory) -> None:  # type: ignore[no-untyped-def]
    lab = lab_factory(1, standin=True)
    sock = lab.socket("r1", socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.bind((lab.rack("r1").ip, 0))  # only possible inside r1
    with pytest.raises(OSError):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            s.bind((lab.rack("r1").ip, 0))


MDNS_REGISTER = """
import socket, sys, time
from zeroconf import ServiceInfo, Zeroconf
zc = Zeroconf(interfaces=[sys.argv[1]])
info = ServiceInfo("_mcltest._tcp.local.", "rack-one._mcltest._tcp.local.",
                   addresses=[socket.inet_aton(sys.argv[1])], port=9, properties={"rack": "r1"})
zc.register_service(info)
print("registered", flush=True)
time.sleep(600)
"""

MDNS_BROWSE = """
import sys, threading
from zeroconf import ServiceBrowser, Zeroconf
found = threading.Event()
class Listener:
    def add_service(self, zc, type_, name):
        found.set()
    def update_service(self, zc, type_, name):
        pass
    def remove_service(self, zc, type_, name):
        pass
zc = Zeroconf(interfaces=[sys.argv[1]])
browser = ServiceBrowser(zc, "_mcltest._tcp.local.", Listener())
ok = found.wait(10)
records = zc.cache.entries_with_name("rack-one._mcltest._tcp.local.")
print("found" if ok else "none", " ".join(sorted(repr(r) for r in records)))
zc.close()
"""


@pytest.mark.lab(racks=2, standin=True)
def test_mdns_works_between_racks(lab: Lab) -> None:
    announcer = lab.popen(
        "r1",
        [sys.executable, "-c", MDNS_REGISTER, lab.rack("r1").ip],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert announcer.stdout is not None and announcer.stdout.readline() == "registered\n"
        out = lab.exec(
            "r2", [sys.executable, "-c", MDNS_BROWSE, lab.rack("r2").ip], timeout=30
        ).stdout
        # A browser that starts after the announcements asks, and r1 answers.
        assert out.startswith("found") and "data=10.77.0.1" in out and "rack=r1" in out, out
    finally:
        announcer.kill()
        announcer.wait()
