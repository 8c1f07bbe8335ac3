"""The fencing helper, with real processes: it kills QEMU when the deadline passes."""

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshcloud import clock
from meshcloud.agent.fencer import parse_message
from meshcloud.agent.watchdog import FencerWatchdog
from meshcloud.lab import netns


@pytest.mark.parametrize(
    ("data", "expected"), [(b"arm 12.5", 12.5), (b"arm 3\n", 3.0), (b"disarm", None)]
)
def test_parse_message(data: bytes, expected: float | None) -> None:
    assert parse_message(data) == expected


@pytest.mark.parametrize(
    "data", [b"", b"arm", b"arm nan", b"arm inf", b"kill 3", b"\xff\xfe", b"arm 1 2"]
)
def test_bad_messages_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        parse_message(data)


def wait_until(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def netns_name() -> Iterator[str]:
    """A network namespace of the test's own: the fencer only ever kills QEMU inside it."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace of its own)")
    name = f"mctf-{os.getpid()}"
    netns.delete_netns(name)
    netns.add_netns(name)
    yield name
    netns.delete_netns(name)


@pytest.fixture
def fake_qemu(tmp_path: Path, netns_name: str) -> Iterator[subprocess.Popen[bytes]]:
    """A process whose name starts with qemu-system- (a renamed `sleep`), in the namespace."""
    exe = tmp_path / "qemu-system-fake"
    shutil.copy("/bin/sleep", exe)
    proc = subprocess.Popen(netns.in_netns(netns_name, [str(exe), "600"]))
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def fencer(tmp_path: Path, netns_name: str) -> Iterator[Path]:
    sock = tmp_path / "fencer.sock"
    argv = [
        sys.executable,
        "-m",
        "meshcloud.agent.fencer",
        "--socket",
        str(sock),
        "--scope",
        "netns",
    ]
    proc = subprocess.Popen(netns.in_netns(netns_name, argv))
    assert wait_until(sock.exists, 30), "fencer did not start"
    yield sock
    proc.terminate()
    assert proc.wait(timeout=10) == 0


def test_fencer_kills_qemu_when_not_rearmed(
    fencer: Path, fake_qemu: subprocess.Popen[bytes]
) -> None:
    assert (os.stat(fencer).st_mode & 0o777) == 0o600
    dog = FencerWatchdog(fencer)
    dog.arm(clock.now() + 1.5)
    for _ in range(5):  # re-armed in time: nothing happens
        dog.arm(clock.now() + 1.5)
        time.sleep(0.3)  # the daemon's renewal period, not synchronisation
        assert fake_qemu.poll() is None
    # stop re-arming: the deadline passes and the process dies
    assert wait_until(lambda: fake_qemu.poll() is not None, 10)
    assert fake_qemu.returncode == -9


def test_disarmed_fencer_kills_nothing_and_ignores_garbage(
    fencer: Path, fake_qemu: subprocess.Popen[bytes]
) -> None:
    dog = FencerWatchdog(fencer)
    dog.arm(clock.now() + 0.5)
    dog.disarm()
    dog._send("garbage that is not a message")
    # a later arm still works, so the garbage did not kill the fencer
    time.sleep(1.0)  # longer than the disarmed deadline: proves nothing fires
    assert fake_qemu.poll() is None
    dog.arm(clock.now() + 0.2)
    assert wait_until(lambda: fake_qemu.poll() is not None, 10)
