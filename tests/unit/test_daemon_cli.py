"""The daemon's start-up checks, through the real CLI."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

MESHCLOUD = [sys.executable, "-m", "meshcloud.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, cluster: dict[str, object]) -> Path:
    cfg = {
        "rack": {"name": "rack-1"},
        "cluster": cluster,
        "network": {"bind_address": "127.0.0.1", "api_port": free_port(), "raft_port": free_port()},
        "state_dir": str(tmp_path / "state"),
    }
    path = tmp_path / "daemon.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize(
    ("cluster", "expected"),
    [
        ({}, "refuses to start without a cluster secret"),
        ({"secret": ""}, "empty or a well-known default"),
        ({"secret": "changeme"}, "empty or a well-known default"),
        ({"secret": "too-short"}, "at least 32 are needed"),
    ],
)
def test_daemon_refuses_to_start_without_a_good_secret(
    tmp_path: Path, cluster: dict[str, object], expected: str
) -> None:
    path = write_config(tmp_path, cluster)
    proc = subprocess.run(
        [*MESHCLOUD, "daemon", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert expected in proc.stderr
    assert not (tmp_path / "state").exists()


def test_daemon_starts_and_answers_health(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"secret": "s" * 40, "bootstrap_expect": 1})
    port = yaml.safe_load(path.read_text())["network"]["api_port"]
    proc = subprocess.Popen(
        [*MESHCLOUD, "daemon", "--config", str(path)], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        doc = None
        while time.monotonic() < deadline and doc is None:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/health", timeout=2
                ) as r:
                    doc = json.load(r)
            except OSError:
                time.sleep(0.1)  # polling interval while waiting for the port, not synchronisation
        assert doc is not None, "daemon did not answer within 60 s"
        assert doc["rack"] == "rack-1"
    finally:
        proc.terminate()
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the daemon logs what each task waits for
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            proc.kill()  # never leave a daemon behind, even when it stops too slowly
            _, err = proc.communicate()
            raise AssertionError(f"the daemon did not stop within 30 s:\n{err[-20000:]}") from None
        assert code == 0
