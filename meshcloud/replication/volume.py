"""An appliance's volume directory on one rack: layout, durable manifest, local chain work.

Layout under the volumes root (``<state_dir>/volumes``)::

    <appliance>/manifest.json        the durable record (see manifest.py)
    <appliance>/.lock                flock: manifest read-modify-write
    <appliance>/.merge-lock          flock: one merger at a time
    <appliance>/<disk>/g<N>.qcow2    the chain files, bottom first
    <appliance>/<disk>/outbox/       primary only: hard links of frozen deltas to ship
    .incoming/<appliance>/<disk>/    where rsync (its daemon module) lands deltas
    .diverged/<appliance>.e<E>.g<G>.<n>/   copies kept aside after a divergence

The manifest is replaced durably: written to a temporary name, fsynced,
renamed over the old one, and the directory fsynced. A chain file is never
modified in place except the bottom, and only by ``qemu-img commit`` of the
overlay right above it, which leaves the chain reading the same at every
instant.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import xxhash

from meshcloud.core.errors import Conflict, InvalidInput, NotFound, ReplicationError
from meshcloud.core.names import validate_name
from meshcloud.hypervisor.qemu_img import run_qemu_img
from meshcloud.replication import manifest as mf
from meshcloud.replication.manifest import Manifest, Role, generation_file
from meshcloud.replication.qemu import (
    Qcow2Header,
    commit_argv,
    parse_qcow2_header,
    repair_leaks_argv,
)
from meshcloud.replication.runner import lowered_argv
from meshcloud.replication.transport import CHECKSUM_CHOICE

MANIFEST = "manifest.json"
INCOMING = ".incoming"
DIVERGED = ".diverged"
OUTBOX = "outbox"

QemuRunner = Callable[[Sequence[str]], str]


def default_qemu_runner(argv: Sequence[str]) -> str:
    return run_qemu_img(argv, timeout_s=3600.0)


def lowered_qemu_runner(nice: int) -> QemuRunner:
    """A qemu-img runner at CPU priority ``nice`` (qemu-img stays in the caller's session)."""
    if nice == 0:
        return default_qemu_runner

    def run(argv: Sequence[str]) -> str:
        return run_qemu_img(lowered_argv(argv, nice, own_session=False), timeout_s=3600.0)

    return run


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> os.stat_result:
    """Replace ``path`` with ``data``: temp file, fsync, rename, fsync the directory.

    Returns the new file's status (its inode and mtime stay those after the rename).
    """
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
        written_stat = os.fstat(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(path.parent)
    return written_stat


# Parsed manifests by path, with the (inode, mtime, size) they were read from. A
# manifest is only ever replaced by a rename (write_durably), never rewritten in
# place, so an unchanged key means unchanged content: the engine's scheduler, the
# lag it publishes and the API read manifests many times a second, and parsing one
# (with up to HISTORY_MAX generation records) costs about a millisecond.
_manifest_cache: dict[Path, tuple[tuple[int, int, int], Manifest]] = {}
_MANIFEST_CACHE_MAX = 4096


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _remember(path: Path, key: tuple[int, int, int], manifest: Manifest) -> None:
    if len(_manifest_cache) >= _MANIFEST_CACHE_MAX:
        _manifest_cache.clear()
    _manifest_cache[path] = (key, manifest)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


CHECKSUM_ALGORITHMS = (CHECKSUM_CHOICE, "sha1")  # new checksums: what rsync is told to use


def file_checksum(path: Path, algorithm: str = CHECKSUM_ALGORITHMS[0]) -> str:
    """``<algorithm>:<hex>`` of a file, as rsync's ``%C`` reports it for that checksum choice.

    xxh128 (XXH3, 128 bits) is what rsync ships with now: about ten times
    faster than SHA-1 on both sides, and as good at catching a damaged
    transfer (the link itself is authenticated by SSH). SHA-1 is still
    verified for checksums recorded before.
    """
    digest: Any
    if algorithm == "xxh128":
        digest = xxhash.xxh3_128()
    elif algorithm == "sha1":
        digest = hashlib.sha1(usedforsecurity=False)
    else:
        raise InvalidInput(f"checksum algorithm {algorithm!r}: use one of {CHECKSUM_ALGORITHMS}")
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"{algorithm}:{digest.hexdigest()}"


def checksum_like(path: Path, expected: str) -> str:
    """The checksum of ``path`` with the algorithm ``expected`` names (to compare with it)."""
    return file_checksum(path, expected.split(":", 1)[0])


def read_qcow2_header(path: Path) -> Qcow2Header:
    with path.open("rb") as f:
        return parse_qcow2_header(f.read(4096))


def rewrite_backing_name(path: Path, new_name: str) -> bool:
    """Point a (not yet used) overlay at ``new_name`` by rewriting the name in place.

    Only when the stored name is a chain file name of the same length (the
    usual case: ``g<12 digits>.qcow2``), so that the header's offset and
    size fields stay as they are and a single write of 19 bytes inside the
    first sector does it. Returns False when it does not apply (the caller
    then runs ``qemu-img rebase -u``).
    """
    with path.open("r+b") as f:
        head = f.read(4096)
        header = parse_qcow2_header(head)
        old = header.backing_name
        if (
            mf.parse_generation_file(old) is None
            or mf.parse_generation_file(new_name) is None
            or len(old) != len(new_name)
        ):
            return False
        offset = header.backing_offset
        if offset < 72 or offset + len(new_name) > 512:
            return False
        f.seek(offset)
        f.write(new_name.encode())
    return True


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


class VolumeSet:
    """One appliance's disks on this rack (either role)."""

    def __init__(self, root: Path, appliance: str, *, qemu: QemuRunner = default_qemu_runner):
        self.root = root
        self.appliance = validate_name("appliance", appliance)
        self.dir = root / appliance
        self.qemu = qemu

    # -- layout ----------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.dir / MANIFEST

    def disk_dir(self, disk: str) -> Path:
        return self.dir / validate_name("disk", disk)

    def file(self, disk: str, name: str) -> Path:
        if mf.parse_generation_file(name) is None:
            raise InvalidInput(f"{name!r} is not a chain file name")
        return self.disk_dir(disk) / name

    def outbox_file(self, disk: str, generation: int) -> Path:
        return self.disk_dir(disk) / OUTBOX / generation_file(generation)

    def incoming_dir(self, disk: str) -> Path:
        return self.root / INCOMING / self.appliance / validate_name("disk", disk)

    def top_path(self, manifest: Manifest, disk: str) -> Path:
        """The file a VM (or qemu-img) opens to see the disk: the chain's top."""
        return self.file(disk, manifest.chain(disk).top)

    # -- manifest --------------------------------------------------------

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def load(self) -> Manifest:
        path = self.manifest_path
        try:
            key = _stat_key(os.stat(path))
            cached = _manifest_cache.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
            with path.open("rb") as f:  # key and bytes of the same inode
                key = _stat_key(os.fstat(f.fileno()))
                raw = f.read()
        except FileNotFoundError:
            raise NotFound(f"no volumes of appliance {self.appliance} on this rack") from None
        m = Manifest.from_json(raw)
        if m.appliance != self.appliance:
            raise ReplicationError(
                f"{self.manifest_path} names appliance {m.appliance!r}: move it back or remove it"
            )
        _remember(path, key, m)
        return m

    def save(self, manifest: Manifest) -> None:
        if manifest.appliance != self.appliance:
            raise InvalidInput("manifest of another appliance")
        self.dir.mkdir(parents=True, exist_ok=True)
        written = write_durably(self.manifest_path, manifest.to_json())
        _remember(self.manifest_path, _stat_key(written), manifest)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the manifest lock (short critical sections only)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with _flock(self.dir / ".lock"):
            yield

    # -- recovery ----------------------------------------------------------

    def recover(self, manifest: Manifest) -> Manifest:
        """Finish what a killed process left half-done; call with the lock held."""
        m = manifest
        for pending in m.pending_renames:
            source = self.file(pending.disk, pending.source)
            target = self.file(pending.disk, pending.target)
            if source.exists():
                os.rename(source, target)
                fsync_dir(source.parent)
            m = mf.rename_done(m, pending.disk)
        if m is not manifest:
            self.save(m)
        return m

    def remove_strays(self, manifest: Manifest) -> list[Path]:
        """Delete chain-named files no manifest entry uses (failed freezes, merged overlays)."""
        removed = []
        for chain in manifest.disks:
            ddir = self.disk_dir(chain.disk)
            if not ddir.is_dir():
                continue
            keep = set(chain.files) | {p.source for p in manifest.pending_renames}
            for entry in ddir.iterdir():
                if entry.is_file() and (
                    (mf.parse_generation_file(entry.name) is not None and entry.name not in keep)
                    or entry.name.startswith(".recv-")
                ):
                    entry.unlink()
                    removed.append(entry)
        return removed

    # -- merging -----------------------------------------------------------

    def merge_step(self) -> bool:
        """Merge the lowest overlay of each disk into its bottom (replica, or stopped primary).

        Returns True if something was merged. Restartable: killed at any
        point, the chain still reads as its manifest says, and the next call
        finishes the work. The data copy runs without the manifest lock, so
        new deltas keep arriving meanwhile.
        """
        with _flock(self.dir / ".merge-lock", blocking=False) as got:
            if not got:
                return False
            with self.locked():
                m = self.recover(self.load())
            merged = False
            for disk in m.disk_names:
                with self.locked():
                    m = self.load()
                    pair = mf.begin_merge(m, disk)
                marker = self.disk_dir(disk) / ".merging"
                if marker.exists():
                    # A merge was killed: the file it wrote into (the current bottom,
                    # renamed or not) may hold leaked clusters: harmless, but wasted
                    # space. Reclaim them first.
                    self.qemu(repair_leaks_argv(self.file(disk, m.chain(disk).bottom)))
                    marker.unlink()
                if pair is None:
                    continue
                bottom, overlay = pair
                marker.write_text(f"{bottom} <- {overlay}\n")
                self.qemu(commit_argv(self.file(disk, overlay)))
                with self.locked():
                    m = self.load()
                    if m.chain(disk).files[:2] != pair:
                        raise Conflict(f"{self.appliance}/{disk}: chain changed during a merge")
                    m = mf.merged_on_replica(m, disk, bottom, overlay)
                    self.save(m)
                    self.recover(m)
                marker.unlink(missing_ok=True)
                merged = True
            return merged

    def merge_all(self) -> int:
        """Merge until every chain is flat (replica) or bottom + active (primary)."""
        steps = 0
        while self.merge_step():
            steps += 1
        return steps

    # -- keeping a copy aside ----------------------------------------------

    def keep_aside(self, reason: str) -> Path:
        """Move this volume set to ``.diverged/`` whole (nothing is deleted); return its path.

        Used when this rack's copy diverged from the new primary's (it wrote
        after the last common generation): an operator decides later.
        """
        with self.locked():
            m = self.load()
            target_root = self.root / DIVERGED
            target_root.mkdir(parents=True, exist_ok=True)
            n = 0
            while True:
                target = target_root / f"{self.appliance}.e{m.epoch}.g{m.generation}.{n}"
                if not target.exists():
                    break
                n += 1
            (self.dir / "diverged-reason.txt").write_text(reason + "\n")
            os.rename(self.dir, target)
            fsync_dir(target_root)
            fsync_dir(self.root)
            return target

    def remove(self) -> None:
        """Delete this volume set (an operator's or a reseed's decision)."""
        if self.dir.exists():
            shutil.rmtree(self.dir)
        inc = self.root / INCOMING / self.appliance
        if inc.exists():
            shutil.rmtree(inc)

    def used_bytes(self) -> int:
        total = 0
        for path in self.dir.rglob("*"):
            if path.is_file():
                total += path.stat().st_blocks * 512
        return total


def list_appliances(root: Path) -> list[str]:
    """Appliances with a manifest under ``root``."""
    if not root.is_dir():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).exists()
    )


def ensure_role(manifest: Manifest, role: Role) -> None:
    if manifest.role != role:
        raise Conflict(f"{manifest.appliance} is {manifest.role} on this rack, not {role}")
