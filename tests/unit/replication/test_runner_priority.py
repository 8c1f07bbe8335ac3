"""Replication's processes run below the control plane's CPU priority."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.replication.runner import ProcessRunner, lowered_argv
from meshcloud.replication.transport import authorized_keys_line
from meshcloud.replication.volume import lowered_qemu_runner

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyFakeKeyFakeKeyFakeKeyFakeKey0 meshcloud-replication"
# prints this process's nice (field 19 of /proc/self/stat) and its autogroup line
PROBE = ["sh", "-c", "cut -d' ' -f19 /proc/self/stat; cat /proc/self/autogroup 2>/dev/null || true"]


def test_lowered_argv_passes_words_as_arguments() -> None:
    assert lowered_argv(["rsync", "a b", "$(x)"], 0) == ["rsync", "a b", "$(x)"]
    assert lowered_argv(["qemu-img", "info"], 10, own_session=False) == [
        "nice", "-n", "10", "qemu-img", "info",
    ]  # fmt: skip
    argv = lowered_argv(["rsync", "a b", "$(x)"], 10)
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["10", "rsync", "a b", "$(x)"]
    with pytest.raises(ValueError):
        lowered_argv(["x"], 20)


def test_the_runner_lowers_its_process_and_its_autogroup() -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    out = ProcessRunner(nice=7).run(PROBE).stdout.split("\n")
    assert int(out[0]) == min(19, base + 7)
    if out[1]:  # kernels with autogroups: the new session's group is lowered too
        assert out[1].rstrip().endswith("nice 7")
    assert int(ProcessRunner().run(PROBE).stdout.split("\n")[0]) == base


def test_the_argument_words_reach_the_program_unchanged(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    words = ["printf", "%s|", "a b", f"$(touch {marker})", "'"]
    assert ProcessRunner(nice=5).run(words).stdout == f"a b|$(touch {marker})|'|"
    assert not marker.exists()


def test_qemu_img_runner_is_lowered_in_the_callers_session(monkeypatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(
        "meshcloud.replication.volume.run_qemu_img",
        lambda argv, timeout_s: seen.append(list(argv)) or "",
    )
    lowered_qemu_runner(10)(["qemu-img", "create"])
    assert seen == [["nice", "-n", "10", "qemu-img", "create"]]


def test_the_receivers_rsync_daemon_is_lowered() -> None:
    line = authorized_keys_line(KEY, Path("/p"), Path("/v"), Path("/c/rsyncd.conf"), nice=10)
    assert (
        "'rsync --server --daemon .') { echo 10 > /proc/self/autogroup;"
        " echo 10 > /proc/$PPID/autogroup; } 2>/dev/null;"
        " exec nice -n 10 /usr/bin/rsync --server --daemon --config=/c/rsyncd.conf . ;;"
    ) in line
    assert "*) exec /p -m meshcloud.replication.serve /v ;; esac" in line
    with pytest.raises(InvalidInput):
        authorized_keys_line(KEY, Path("/p"), Path("/v"), Path("/c"), nice=-1)


def test_a_process_past_its_timeout_is_killed_with_its_children(tmp_path: Path) -> None:
    from meshcloud.core.errors import ReplicationError

    pidfile = tmp_path / "child.pid"
    runner = ProcessRunner()
    with pytest.raises(ReplicationError, match=r"took longer than 0\.3 s"):
        runner.run(["sh", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], timeout_s=0.3)
    child = int(pidfile.read_text())
    # the whole session was killed: the background sleep too (a zombie at most, reaped by init)
    state = Path(f"/proc/{child}/stat")
    assert not state.exists() or state.read_text().split(")")[1].split()[0] == "Z"
    assert runner.running_pids() == []
    assert runner.run(["true"], timeout_s=5).returncode == 0
