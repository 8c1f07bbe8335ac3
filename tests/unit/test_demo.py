"""The demo's pure parts: its appliances, its bookkeeping, ending only what it started."""

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from meshcloud.core.errors import MeshcloudError
from meshcloud.demo import (
    IMAGE,
    SEGMENT_GATEWAY,
    SEGMENT_PREFIX_LEN,
    DemoState,
    appliance_ports,
    demo_appliances,
    end_process,
    process_start_ticks,
    usage_text,
)


def test_state_round_trip(tmp_path: Path) -> None:
    state = DemoState(state_dir=str(tmp_path), lab_root="/x", forwarder_pid=12, api="127.0.0.1:1")
    state.appliances["tiles"] = "127.0.0.1:8481"
    state.save()
    assert DemoState.load(tmp_path) == state
    assert DemoState.load(tmp_path / "missing") is None


def test_a_state_file_from_another_version_says_what_to_do(tmp_path: Path) -> None:
    DemoState.path(tmp_path).write_text('{"state_dir": "/x", "netns": ["mcdemo-r1"]}')
    with pytest.raises(MeshcloudError, match="lab -n demo down"):
        DemoState.load(tmp_path)


def test_end_process_checks_the_start_time() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = process_start_ticks(proc.pid)
        assert start is not None
        assert not end_process(proc.pid, start + 1)  # a reused PID is left alone
        assert proc.poll() is None
        assert end_process(proc.pid, start)
        assert proc.wait(timeout=10) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert process_start_ticks(proc.pid) is None
    assert not end_process(proc.pid, start)


def test_the_demo_appliances_fit_the_segment_and_boot() -> None:
    specs = demo_appliances()
    assert len(specs) == 2
    segment = ipaddress.ip_network(f"{SEGMENT_GATEWAY}/{SEGMENT_PREFIX_LEN}", strict=False)
    ips = [ipaddress.ip_address(s.ip or "") for s in specs]
    assert len(set(ips)) == len(ips) and all(ip in segment for ip in ips)
    assert ipaddress.ip_address(SEGMENT_GATEWAY) not in ips
    for spec in specs:
        assert spec.image == IMAGE
        assert spec.memory_mib >= 128  # the demo kernel does not boot in 64 MiB
        assert [d.name for d in spec.disks] == ["data"]  # the image's disk template
        assert any(p.name == "http" for p in spec.ports)
    assert len({s.priority for s in specs}) == len(specs)  # shows priorities at work


def test_appliance_ports_count_up_from_the_first() -> None:
    ports = appliance_ports(9000)
    assert sorted(ports.values()) == [9000, 9001]
    assert set(ports) == {s.name for s in demo_appliances()}


def test_usage_names_the_api_the_token_and_the_cli() -> None:
    state = DemoState(state_dir="/x", api="127.0.0.1:8440")
    state.appliances = {"tiles": "127.0.0.1:8481", "wiki": "127.0.0.1:8482"}
    text = usage_text(state, "t0ken")
    assert "http://127.0.0.1:8440/api/v1/cluster" in text
    assert "MESHCLOUD_API=http://127.0.0.1:8440 MESHCLOUD_TOKEN=t0ken" in text
    assert "meshcloud status" in text and "http://127.0.0.1:8482/" in text
    assert "demo-down" in text
