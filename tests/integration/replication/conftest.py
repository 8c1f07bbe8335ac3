"""Fixtures: a source volume set, a receiving rack behind a real sshd (forced command: rsync daemon + serve)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshcloud.replication.manifest import Manifest
from meshcloud.replication.source import ApplianceSource, ReplicaLink
from meshcloud.replication.store import ReplicaStore
from meshcloud.replication.testbed import LoopbackSshd, have_sshd
from meshcloud.replication.transport import RsyncSettings

pytestmark = pytest.mark.root

DISK_BYTES = 64 << 20


def wait_for(
    cond: Callable[[], object], timeout_s: float = 30.0, what: str = "condition"
) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def qemu_write(image: Path, offset: int, length: int, pattern: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", str(image)],
        check=True,
        capture_output=True,
    )


def same_content(qcow2: Path, raw: Path) -> bool:
    out = subprocess.run(
        ["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)],
        capture_output=True,
        text=True,
    )
    if out.returncode not in (0, 1):
        raise AssertionError(f"qemu-img compare failed: {out.stderr}")
    return out.returncode == 0


@dataclass
class Pair:
    """A source rack's volumes and a replica rack reached over real ssh."""

    tmp: Path
    sshd: LoopbackSshd
    link: ReplicaLink
    source: ApplianceSource
    store: ReplicaStore
    saved: dict[int, Path] = field(default_factory=dict)

    def write(self, offset: int, length: int, pattern: int, disk: str = "data") -> None:
        qemu_write(self.source.active_paths()[disk], offset, length, pattern)

    def save_generation(self, m: Manifest) -> None:
        """Keep a raw copy of every frozen generation (the reference a replica must match)."""
        frozen = self.source.volume.file("data", m.chain("data").files[-2])
        out = self.tmp / "saved" / f"g{m.generation}.raw"
        out.parent.mkdir(exist_ok=True)
        subprocess.run(
            ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(frozen), str(out)],
            check=True,
            capture_output=True,
        )
        self.saved[m.generation] = out

    def replica_top(self) -> Path:
        vs = self.store.volume(self.source.appliance)
        m = vs.load()
        return vs.top_path(m, "data")

    def replica_generation(self) -> int:
        return self.store.volume(self.source.appliance).load().generation

    def replica_matches(self, generation: int | None = None) -> bool:
        gen = self.replica_generation() if generation is None else generation
        return same_content(self.replica_top(), self.saved[gen])


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    if not have_sshd():
        pytest.skip("needs root, sshd and rsync")
    sshd = LoopbackSshd(tmp_path / "sshd", tmp_path / "replica")
    sshd.start()
    control = Path(tempfile.mkdtemp(prefix="mcctl-"))  # socket paths must stay short
    link = ReplicaLink("rack-b", sshd.target(control), RsyncSettings(compress=False))
    source = ApplianceSource.create(tmp_path / "source", "app", {"data": DISK_BYTES}, epoch=1)
    p = Pair(tmp_path, sshd, link, source, ReplicaStore(tmp_path / "replica"))
    source.on_frozen = p.save_generation
    try:
        yield p
    finally:
        source.transport.close()
        sshd.stop()
        shutil.rmtree(control, ignore_errors=True)
