"""The lab's faults: silent kill, restart, freeze/thaw, partition/heal, degraded links."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from meshcloud.core.errors import Conflict, InvalidInput
from meshcloud.lab import netns, procs
from meshcloud.lab.lab import Lab
from meshcloud.lab.wait import wait_for

from .helpers import API_PORT, ECHO_PORT, can_connect, connect, connect_time, health

pytestmark = pytest.mark.root

# A stand-in for QEMU: any process in the rack that is not the daemon.
COUNTER = "import sys,time,pathlib\np=pathlib.Path(sys.argv[1])\ni=0\nwhile True:\n i+=1; p.write_text(str(i)); time.sleep(0.02)\n"


def _echo_connection(lab: Lab, src: str, dst: str) -> socket.socket:
    sock = connect(lab, src, lab.rack(dst).ip, ECHO_PORT)
    sock.sendall(b"ping")
    assert sock.recv(4) == b"ping"
    return sock


@pytest.mark.lab(racks=3, standin=True)
def test_kill_is_a_silent_power_cut_and_restart_brings_the_rack_back(lab: Lab) -> None:
    r1 = lab.rack("r1")
    marker = r1.state_dir / "kept-across-power-cuts"
    marker.write_text("journal")
    vm = lab.popen("r1", [sys.executable, "-c", COUNTER, str(r1.rack_dir / "counter")])
    # A real QEMU that daemonized itself: the lab never saw its pid, the kill must find it.
    qemu_pidfile = r1.rack_dir / "qemu.pid"
    lab.exec("r1", ["qemu-system-x86_64", "-machine", "none", "-display", "none", "-S",
                    "-daemonize", "-pidfile", str(qemu_pidfile)])  # fmt: skip
    qemu_pid = int(qemu_pidfile.read_text())
    assert procs.proc_stat(qemu_pid) is not None
    to_r1 = _echo_connection(lab, "r2", "r1")
    to_r3 = _echo_connection(lab, "r2", "r3")
    try:
        lab.kill("r1")
        # Every process of the rack is dead, the QEMU stand-in included.
        assert vm.wait(timeout=10) is not None
        assert procs.proc_stat(qemu_pid) is None or procs.proc_stat(qemu_pid)[0] == "Z"  # type: ignore[index]
        assert lab.pid("r1") is None and lab.pid("r1", "sshd") is None
        assert not netns.netns_exists(r1.netns)
        # The peer hears nothing: no FIN, no RST, within a generous bound.
        to_r1.settimeout(2.0)
        with pytest.raises(TimeoutError):
            to_r1.recv(1)
        # By contrast, a process that exits normally closes its connections.
        lab.stop_daemon("r3")
        to_r3.settimeout(5.0)
        assert to_r3.recv(1) == b""

        with pytest.raises(Conflict):
            lab.kill("r1")
        lab.restart("r1")
        assert health(lab, "r2", r1.ip)["rack"] == "r1"
        assert marker.read_text() == "journal"
        assert lab.pid("r1", "sshd") is not None
        # The restarted rack forgot the old connection, as a rebooted machine does.
        to_r1.settimeout(1.0)

        def reset() -> bool:
            try:
                to_r1.sendall(b"x")
                to_r1.recv(1)
            except (ConnectionResetError, BrokenPipeError):
                return True
            except TimeoutError:
                return False
            return False

        wait_for(reset, 15.0, "the restarted rack to reset the old connection")
        with pytest.raises(Conflict):
            lab.restart("r1")
    finally:
        to_r1.close()
        to_r3.close()
        vm.kill()
        vm.wait()


@pytest.mark.lab(racks=2, standin=True)
def test_freeze_stops_the_daemon_only_and_thaw_resumes_it(lab: Lab, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    vm = lab.popen("r1", [sys.executable, "-c", COUNTER, str(counter)])
    try:
        wait_for(lambda: counter.exists() and counter.read_text(), 10, "the VM stand-in to count")
        pid = lab.freeze("r1")
        assert pid == lab.pid("r1")
        assert lab.is_frozen("r1")
        procs = {p.name: p for p in lab.status().racks[0].processes}
        assert procs["daemon"].frozen
        assert not procs["sshd"].frozen
        assert not procs["fencer"].frozen  # the fencing helper must keep running
        # The hung daemon does not answer; the "VM" keeps running.
        with pytest.raises(TimeoutError):
            health(lab, "r2", "10.77.0.1", timeout=1.0)
        before = int(counter.read_text() or 0)
        wait_for(lambda: int(counter.read_text() or 0) > before + 5, 10, "the VM to keep counting")
        assert lab.pid("r1", "sshd") is not None and not lab.is_frozen("r1", "sshd")
        lab.thaw("r1")
        assert not lab.is_frozen("r1")
        assert health(lab, "r2", "10.77.0.1")["rack"] == "r1"
    finally:
        vm.kill()
        vm.wait()


@pytest.mark.lab(racks=3, standin=True)
def test_partition_blocks_between_groups_not_within_and_heal_restores(lab: Lab) -> None:
    ip = {r: lab.rack(r).ip for r in lab.racks()}

    def reaches(src: str | None, dst: str) -> bool:
        # Allow for ARP retries after a blocked attempt: a generous deadline, not a sleep.
        return bool(
            wait_for(lambda: can_connect(lab, src, ip[dst], API_PORT), 5.0, f"{src} -> {dst}")
        )

    assert lab.partition("r1", "r2,r3") == [["r1"], ["r2", "r3"]]
    assert not can_connect(lab, "r1", ip["r2"], API_PORT)
    assert not can_connect(lab, "r3", ip["r1"], API_PORT)
    assert reaches("r2", "r3")
    assert reaches(None, "r1")  # the observer is never partitioned
    assert lab.status().partition == (("r1",), ("r2", "r3"))
    # A new partition replaces the old one.
    lab.partition("r1,r2")
    assert reaches("r1", "r2")
    assert not can_connect(lab, "r2", ip["r3"], API_PORT)
    lab.heal()
    assert lab.status().partition is None
    for src in ip:
        for dst in ip:
            assert reaches(src, dst)
    with pytest.raises(InvalidInput):
        lab.partition("r1,r9")


@pytest.mark.lab(racks=2, standin=True)
def test_degrade_adds_delay_loss_and_rate_and_clear_removes_them(lab: Lab) -> None:
    r2 = lab.rack("r2").ip
    assert min(connect_time(lab, "r1", r2, API_PORT) for _ in range(3)) < 0.05
    lab.degrade("r2", "delay=200ms")
    assert lab.rack("r2").link == "delay=200ms"
    samples = [connect_time(lab, "r1", r2, API_PORT) for _ in range(3)]
    assert min(samples) >= 0.2, samples
    assert max(samples) < 2.0, samples

    lab.degrade("r2", "loss=100%")
    assert not can_connect(lab, "r1", r2, API_PORT)

    lab.degrade("r2", "rate=4mbit")
    sock = connect(lab, "r1", r2, ECHO_PORT, timeout=30)
    with sock:
        payload = b"x" * 1_000_000  # 8 Mbit at 4 Mbit/s: about 2 s
        start = time.monotonic()
        sock.sendall(payload)
        got = 0
        while got < len(payload):
            got += len(sock.recv(65536))
        elapsed = time.monotonic() - start
    assert elapsed >= 1.2, elapsed

    lab.degrade("r2", "clear")
    assert lab.rack("r2").link == ""
    assert min(connect_time(lab, "r1", r2, API_PORT) for _ in range(3)) < 0.05
    with pytest.raises(InvalidInput):
        lab.degrade("r2", "delay=50ms; reboot")


def test_up_link_shapes_every_rack_and_survives_restart(lab_factory) -> None:  # type: ignore[no-untyped-def]
    lab = lab_factory(2, standin=True, link="delay=100ms")
    ip = {r: lab.rack(r).ip for r in lab.racks()}
    assert connect_time(lab, "r1", ip["r2"], API_PORT) >= 0.1
    assert connect_time(lab, "r2", ip["r1"], API_PORT) >= 0.1
    lab.kill("r2")
    lab.restart("r2")
    assert lab.rack("r2").link == "delay=100ms"
    assert connect_time(lab, "r1", ip["r2"], API_PORT) >= 0.1
