"""What the replication key can do on a receiving rack, through the real sshd and forced command.

A sender holding the cluster's key may drop files into ``volumes/.incoming``
with rsync and run the replication verbs; nothing else: no reads, no
deletions, no paths outside incoming, no other command.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from meshcloud.replication.transport import (
    RSYNC_MODULE,
    RsyncSettings,
    rsync_push_argv,
    rsync_rsh,
    ssh_options,
)

from .conftest import Pair

pytestmark = pytest.mark.root


def _rsync(pair: Pair, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["rsync", "-e", rsync_rsh(pair.link.target), "--timeout=30", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _remote(pair: Pair, path: str = "") -> str:
    return f"{pair.link.target.destination}::{path}"


def _ssh(pair: Pair, command: str) -> subprocess.CompletedProcess[str]:
    t = pair.link.target
    argv = ["ssh", *ssh_options(t), t.destination, command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def _incoming(pair: Pair) -> Path:
    return pair.sshd.volumes / ".incoming"


def test_the_key_pushes_into_incoming(pair: Pair, tmp_path: Path) -> None:
    src = tmp_path / "delta.bin"
    src.write_bytes(os.urandom(70_000))
    argv = rsync_push_argv(pair.link.target, src, "app/data", RsyncSettings(compress=False))
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    landed = _incoming(pair) / "app" / "data" / "delta.bin"
    assert landed.read_bytes() == src.read_bytes()
    assert (landed.stat().st_mode & 0o777) == 0o600


def test_paths_cannot_leave_incoming(pair: Pair, tmp_path: Path) -> None:
    src = tmp_path / "escape.bin"
    src.write_bytes(b"x" * 100)
    for dest in (f"{RSYNC_MODULE}/../", f"{RSYNC_MODULE}/a/../../", f"{RSYNC_MODULE}//etc/"):
        _rsync(pair, "--mkpath", str(src), _remote(pair, dest))
    inside = {p.relative_to(_incoming(pair)) for p in _incoming(pair).rglob("escape.bin")}
    outside = [
        p
        for p in [*pair.sshd.volumes.rglob("escape.bin"), *tmp_path.parent.rglob("escape.bin")]
        if _incoming(pair) not in p.parents and p != src
    ]
    assert not outside, f"a file landed outside incoming: {outside}"
    assert inside  # the sanitised path kept it inside (or the push was refused altogether)
    assert not Path("/etc/escape.bin").exists()


def test_nothing_can_be_read_listed_or_deleted(pair: Pair, tmp_path: Path) -> None:
    secret = _incoming(pair) / "app" / "data" / "g000000000001.qcow2"
    secret.parent.mkdir(parents=True)
    secret.write_bytes(b"replica data")
    out = tmp_path / "out"
    out.mkdir()
    pull = _rsync(pair, _remote(pair, f"{RSYNC_MODULE}/app/data/g000000000001.qcow2"), str(out))
    assert pull.returncode != 0 and not any(out.iterdir())
    listing = _rsync(pair, _remote(pair))
    assert RSYNC_MODULE not in listing.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    delete = _rsync(pair, "-r", "--delete", f"{empty}/", _remote(pair, f"{RSYNC_MODULE}/app/"))
    assert delete.returncode != 0 and "refuse" in delete.stderr.lower()
    assert secret.read_bytes() == b"replica data"


@pytest.mark.parametrize(
    "command",
    [
        "id",
        "touch {marker}",
        "rsync --server --daemon . ; touch {marker}",
        "rsync --server --daemon .' ; touch {marker} ; echo '",
        "$(touch {marker})",
        "rsync --server -e.LsfxCIvu . /",
        "meshcloud-replica status ../etc",
    ],
)
def test_other_commands_run_nothing(pair: Pair, tmp_path: Path, command: str) -> None:
    marker = tmp_path / "pwned"
    run = _ssh(pair, command.format(marker=marker))
    assert not marker.exists()
    assert run.returncode != 0
    if not command.startswith("rsync --server --daemon"):
        assert '"ok": false' in run.stdout
    if command.startswith("rsync --server -e"):
        assert "daemon over SSH" in run.stdout
