"""The primary's side: freeze a generation, ship it to every replica, merge it locally.

One :class:`ApplianceSource` per appliance this rack runs. A cycle:

1. **freeze**: create a new empty overlay (4 KiB clusters, relative backing
   name) above each disk's active overlay and switch the running guest to
   them with one atomic disk-only snapshot (or, if the guest is stopped,
   just start using them). The old active overlays are now generation N+1:
   exactly the writes since the previous freeze. They are hard-linked into
   ``outbox/`` and the manifest is saved.
2. **ship**: for each replica rack, rsync every generation it lacks (from
   the outbox) into its incoming directory, then ask it to commit. The
   replica acknowledges after its manifest is durable. A replica without a
   copy, or too far behind for the outbox, is seeded with a full copy.
3. **merge**: fold the frozen overlay into the bottom of the local chain
   (live block commit, or qemu-img when stopped), so the chain stays short.

Every step names the appliance's epoch; a replica that has seen a newer
epoch refuses, and the source stops (it was fenced).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from meshcloud.core.errors import (
    Conflict,
    InvalidInput,
    MeshcloudError,
    NotFound,
    ReplicationError,
    Unavailable,
)
from meshcloud.core.names import validate_name
from meshcloud.hypervisor.priority import deprioritise
from meshcloud.replication import manifest as mf
from meshcloud.replication.manifest import (
    DiskDelta,
    GenerationRecord,
    Manifest,
    Role,
    StaleEpoch,
)
from meshcloud.replication.qemu import (
    create_blank_argv,
    create_overlay_named_argv,
    flatten_argv,
    resize_argv,
)
from meshcloud.replication.runner import ProcessRunner
from meshcloud.replication.schedule import replication_lag_s
from meshcloud.replication.store import SEED_NAME
from meshcloud.replication.transport import (
    RsyncResult,
    RsyncSettings,
    SshTarget,
    master_check_argv,
    master_exit_argv,
    parse_master_pid,
    parse_progress2,
    parse_rsync_output,
    remote_disk_dir,
    rsync_push_argv,
    ssh_argv,
)
from meshcloud.replication.volume import (
    OUTBOX,
    QemuRunner,
    VolumeSet,
    default_qemu_runner,
    file_checksum,
    fsync_dir,
    read_qcow2_header,
)

VERB = "meshcloud-replica"
# Pending generations go to a replica in one rsync run per disk, up to this many
# bytes (at least one generation): each run costs a few round trips of handshake.
BATCH_BYTES = 256 << 20
BATCH_GENERATIONS = 64
ProgressCallback = Callable[[str, int, int], None]  # (rack, bytes done, bytes total)


class LiveOps(Protocol):
    """What the source needs from the hypervisor for a running guest (see live.LibvirtLiveOps)."""

    def running(self) -> bool: ...

    def freeze(self, new_overlays: Mapping[str, Path], description: str) -> None: ...

    def commit(self, disk: str, top: Path, base: Path) -> None: ...

    def sources(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class ReplicaLink:
    """A replica rack and how to reach it."""

    rack: str
    target: SshTarget
    settings: RsyncSettings = field(default_factory=RsyncSettings)

    def __post_init__(self) -> None:
        validate_name("rack", self.rack)


@dataclass
class ShipReport:
    rack: str
    from_generation: int
    to_generation: int
    bytes_sent: int = 0
    files: int = 0
    runs: int = 0  # rsync runs (several pending generations share one)
    seconds: float = 0.0
    seeded: bool = False
    push_s: float = 0.0  # rsync time
    commit_s: float = 0.0  # replica's commit (checksum, stack, durable manifest) round trip


@dataclass
class CycleReport:
    """What one cycle did, with one sentence saying so."""

    appliance: str
    epoch: int
    generation: int
    data_bytes: int = 0
    freeze_s: float = 0.0
    ship_s: float = 0.0
    merge_s: float = 0.0
    shipped: dict[str, ShipReport] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    # the local merge failed: the chain reads the same, the next cycle retries
    merge_error: str = ""
    reason: str = ""


class Transport:
    """rsync and replication verbs over SSH, through one process runner."""

    def __init__(self, runner: ProcessRunner | None = None) -> None:
        self.runner = runner or ProcessRunner()
        self._sessions: dict[tuple[str, SshTarget], _Session] = {}
        self._sessions_lock = threading.Lock()
        self._pushed_to: set[SshTarget] = set()  # their rsync connection masters outlive runs
        self._lowered: set[SshTarget] = set()  # masters already at the runner's priority

    def push(
        self,
        link: ReplicaLink,
        local: Path | Sequence[Path],
        remote_dir: str,
        *,
        sparse: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> RsyncResult:
        """rsync one file, or several in one run (one ssh channel, one rsync handshake)."""
        files = [local] if isinstance(local, Path) else list(local)
        argv = rsync_push_argv(
            link.target, files, remote_dir, link.settings, sparse=sparse, progress=bool(on_progress)
        )
        handler = None
        if on_progress is not None:
            total = sum(f.stat().st_size for f in files)
            progress_cb = on_progress

            def handler(chunk: str) -> None:
                got = parse_progress2(chunk)
                if got is not None:
                    progress_cb(got[0], total)

        with self._sessions_lock:
            self._pushed_to.add(link.target)
        result = self.runner.run(argv, on_output=handler)
        if result.returncode == 0 and self.runner.nice:
            self._lower_master(link.target)
        if result.returncode != 0:
            if result.returncode == 255 or "connection" in result.stderr.lower():
                raise Unavailable(
                    f"rack {link.rack} unreachable for rsync (exit {result.returncode}):"
                    f" {result.stderr.strip()[-300:]}; it will be retried"
                )
            raise ReplicationError(
                f"rsync to {link.rack} failed (exit {result.returncode}):"
                f" {result.stderr.strip()[-300:]}; the replica keeps its previous generation"
            )
        return parse_rsync_output(result.stdout)

    def _lower_master(self, target: SshTarget) -> None:
        """Lower the target's connection master once (it left our session when it daemonised)."""
        with self._sessions_lock:
            if target in self._lowered:
                return
            self._lowered.add(target)
        argv = master_check_argv(target)
        if argv is None:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            pid = parse_master_pid(out.stderr)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError, InvalidInput):
                    deprioritise(pid, self.runner.nice)  # its threads and its autogroup

    def call(
        self, link: ReplicaLink, words: list[str], request: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run one replication verb on the link's rack, over its long-lived session.

        A broken session is reopened once (every verb is idempotent).
        """
        for attempt in (1, 2):
            session = self._session(link)
            try:
                reply = session.request(words, request)
                break
            except Unavailable:
                self._drop_session(link)
                if attempt == 2:
                    raise
        if reply.get("ok"):
            return reply
        kind = {
            "StaleEpoch": StaleEpoch,
            "Conflict": Conflict,
            "NotFound": NotFound,
            "InvalidInput": InvalidInput,
        }.get(str(reply.get("error")), ReplicationError)
        raise kind(f"rack {link.rack}: {reply.get('message', 'refused')}")

    def _session(self, link: ReplicaLink) -> _Session:
        with self._sessions_lock:
            key = (link.rack, link.target)
            session = self._sessions.get(key)
            if session is None or not session.alive():
                session = _Session(link, ssh_argv(link.target, [VERB, "session"]))
                self._sessions[key] = session
            return session

    def _drop_session(self, link: ReplicaLink) -> None:
        with self._sessions_lock:
            session = self._sessions.pop((link.rack, link.target), None)
        if session is not None:
            session.close()

    def close(self) -> None:
        """Close every session, kill running transfers, end the connection masters."""
        with self._sessions_lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
            targets = list(self._pushed_to)
            self._pushed_to.clear()
            self._lowered.clear()
        for session in sessions:
            session.close()
        self.runner.cancel_all()
        # a master persists ControlPersist seconds after its last use: ask each to exit once
        exits = {tuple(argv) for argv in map(master_exit_argv, targets) if argv is not None}
        for argv in exits:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(argv, capture_output=True, timeout=10, check=False)


class _Session:
    """One ``meshcloud-replica session`` over ssh: JSON lines in and out."""

    def __init__(self, link: ReplicaLink, argv: list[str], timeout_s: float = 600.0) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            start_new_session=True,
        )
        self._buffer = b""

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
        return " / ".join(ln for ln in lines if "chdir to home" not in ln)[-300:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def request(self, words: list[str], request: Mapping[str, Any] | None) -> dict[str, Any]:
        line = json.dumps({"words": words, "request": request}).encode() + b"\n"
        with self.lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            try:
                self.proc.stdin.write(line)
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                raise Unavailable(f"rack {self.link.rack}: replication session closed") from None
            deadline = time.monotonic() + self.timeout_s
            fd = self.proc.stdout.fileno()
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                ready, _, _ = select.select([fd], [], [], max(0.0, left))
                if not ready:
                    self.close()
                    raise Unavailable(
                        f"rack {self.link.rack} did not answer {words[0]} in {self.timeout_s} s"
                    )
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise Unavailable(
                        f"rack {self.link.rack}: replication session ended"
                        f" ({self.stderr_tail() or 'no message'}); it will be reopened"
                    )
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(raw)
        except ValueError:
            raise Unavailable(f"rack {self.link.rack} answered garbage to {words[0]}") from None
        if not isinstance(reply, dict):
            raise Unavailable(f"rack {self.link.rack} answered garbage to {words[0]}")
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._stderr.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _empty_overlay_bytes(path: Path) -> int:
    return path.stat().st_size


class ApplianceSource:
    """The primary side of one appliance's replication (one cycle at a time)."""

    def __init__(
        self,
        root: Path,
        appliance: str,
        *,
        transport: Transport | None = None,
        live: LiveOps | None = None,
        qemu: QemuRunner = default_qemu_runner,
        clock: Callable[[], float] = time.time,
        max_outbox_bytes: int = 1 << 40,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        self.volume = VolumeSet(root, appliance, qemu=qemu)
        self.batch_bytes = batch_bytes
        self.appliance = self.volume.appliance
        self.transport = transport or Transport()
        self.live = live
        self.qemu = qemu
        self.clock = clock
        self.max_outbox_bytes = max_outbox_bytes
        self._cycle_lock = threading.Lock()
        self._empty_bytes: dict[str, int] = {}
        self.on_frozen: Callable[[Manifest], None] | None = None  # tests: save a copy

    # -- creation ----------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: Path,
        appliance: str,
        disks: Mapping[str, int],
        epoch: int,
        *,
        templates: Mapping[str, Path] | None = None,
        template_format: str = "qcow2",
        **kwargs: Any,
    ) -> ApplianceSource:
        """Make a new volume set: per disk a bottom (blank, or a copy of a template) and an active overlay."""
        src = cls(root, appliance, **kwargs)
        vs = src.volume
        if vs.exists():
            raise Conflict(f"appliance {appliance} already has volumes on this rack")
        now = src.clock()
        m = mf.new_manifest(appliance, Role.PRIMARY, epoch, disks, active_opened_at=now)
        for chain in m.disks:
            ddir = vs.disk_dir(chain.disk)
            (ddir / OUTBOX).mkdir(parents=True, exist_ok=True)
            bottom = vs.file(chain.disk, chain.bottom)
            template = (templates or {}).get(chain.disk)
            if template is not None:
                src.qemu(flatten_argv(template, bottom, source_format=template_format))
                have = read_qcow2_header(bottom).virtual_size
                if have > chain.virtual_size:
                    bottom.unlink()
                    raise InvalidInput(
                        f"disk {chain.disk}: the template is {have} bytes, more than the"
                        f" {chain.virtual_size} asked for: give a size of at least {have}"
                    )
                if have < chain.virtual_size:  # grow it to the size the spec asks for
                    src.qemu(resize_argv(bottom, chain.virtual_size))
            else:
                src.qemu(create_blank_argv(bottom, chain.virtual_size))
            src.qemu(create_overlay_named_argv(vs.file(chain.disk, chain.top), chain.bottom))
            fsync_dir(ddir)
        vs.save(m)
        return src

    # -- queries ---------------------------------------------------------

    def manifest(self) -> Manifest:
        return self.volume.load()

    def active_paths(self) -> dict[str, Path]:
        """Where each disk's guest writes go now: the hypervisor starts the VM on these."""
        m = self.manifest()
        return {d.disk: self.volume.top_path(m, d.disk) for d in m.disks}

    def lag_s(self, rack: str, now: float | None = None) -> float:
        m = self.manifest()
        return replication_lag_s(
            m.history, m.acked.get(rack, 0), m.generation, self.clock() if now is None else now
        )

    # -- freeze ------------------------------------------------------------

    def active_dirty(self) -> bool:
        """Whether the active overlays may hold writes (False only if provably empty)."""
        m = self.manifest()
        for chain in m.disks:
            empty = self._empty_bytes.get(chain.disk)
            path = self.volume.top_path(m, chain.disk)
            if empty is None or path.stat().st_size != empty:
                return True
        return False

    def _next_overlay(self, disk: str, generation: int) -> Path:
        return self.volume.disk_dir(disk) / f".next-{mf.generation_file(generation)}"

    def freeze(self, epoch: int) -> GenerationRecord:
        """Make the writes since the last freeze generation N+1 (atomic across disks)."""
        vs = self.volume
        with vs.locked():
            m = vs.recover(vs.load())
            if m.role != Role.PRIMARY:
                raise Conflict(f"{self.appliance} is a replica on this rack: it cannot freeze")
            mf.check_epoch(m, epoch, "a freeze")
            gen = m.generation + 1
            new_overlays: dict[str, Path] = {}
            try:
                for chain in m.disks:
                    new = vs.file(chain.disk, mf.generation_file(gen + 1))
                    if new.exists():
                        new.unlink()
                    ready = self._next_overlay(chain.disk, gen + 1)
                    if ready.exists():  # made empty after the last freeze, off the critical path
                        os.rename(ready, new)
                    else:
                        self.qemu(create_overlay_named_argv(new, chain.top))
                    new_overlays[chain.disk] = new
                empty = {d: _empty_overlay_bytes(p) for d, p in new_overlays.items()}
                if self.live is not None and self.live.running():
                    self.live.freeze(new_overlays, f"meshcloud {self.appliance} generation {gen}")
            except BaseException:
                if not self._guest_switched(m):
                    for path in new_overlays.values():
                        path.unlink(missing_ok=True)
                    raise
                # the snapshot took effect although it reported a failure: keep it
                empty = {d: 0 for d in new_overlays}
            new_m = self._finish_freeze(m, epoch, empty)
        if self.on_frozen is not None:
            self.on_frozen(new_m)
        record = new_m.record(gen)
        assert record is not None
        return record

    def _guest_switched(self, m: Manifest) -> bool:
        """Whether the running guest already writes to the overlays of generation N+2."""
        if self.live is None:
            return False
        try:
            if not self.live.running():
                return False
            sources = self.live.sources()
        except MeshcloudError:
            return False
        return all(
            sources.get(d) == str(self.volume.file(d, mf.generation_file(m.generation + 2)))
            for d in m.disk_names
        )

    def _finish_freeze(self, m: Manifest, epoch: int, empty: Mapping[str, int]) -> Manifest:
        """Link the frozen overlays into the outbox and save the manifest (lock held)."""
        vs = self.volume
        gen = m.generation + 1
        now = self.clock()
        data_bytes = 0
        for chain in m.disks:
            frozen = vs.file(chain.disk, chain.top)
            link = vs.outbox_file(chain.disk, gen)
            link.parent.mkdir(exist_ok=True)
            link.unlink(missing_ok=True)
            os.link(frozen, link)
            data_bytes += max(0, frozen.stat().st_size - empty.get(chain.disk, 0))
            fsync_dir(link.parent)
        new_m = mf.freeze_primary(m, epoch, now, data_bytes)
        vs.save(new_m)
        self._empty_bytes = dict(empty)
        return new_m

    def prepare_next(self) -> None:
        """Make, empty, the overlays the next freeze will switch to (off its critical path).

        A cycle does it while (or after) shipping; a freeze that finds none
        makes them itself. Any other prepared overlay is stale and removed.
        """
        m = self.manifest()
        if m.role != Role.PRIMARY:
            return
        for chain in m.disks:
            ready = self._next_overlay(chain.disk, m.generation + 2)
            for stale in self.volume.disk_dir(chain.disk).glob(".next-*"):
                if stale != ready:
                    stale.unlink(missing_ok=True)
            if not ready.exists():
                tmp = ready.with_name(f".tmp{ready.name}")
                tmp.unlink(missing_ok=True)
                self.qemu(create_overlay_named_argv(tmp, chain.top))
                os.rename(tmp, ready)  # never a half-made overlay under the name freeze uses

    def reconcile(self, epoch: int) -> bool:
        """After a crash between a snapshot and its manifest save, adopt what the guest uses.

        Call once when taking charge of a running appliance (the engine does).
        Returns True if an interrupted freeze was completed.
        """
        with self.volume.locked():
            m = self.volume.recover(self.volume.load())
            if m.role != Role.PRIMARY or not self._guest_switched(m):
                return False
            self._finish_freeze(m, epoch, {})
            return True

    # -- shipping ----------------------------------------------------------

    def _remote_head(self, link: ReplicaLink) -> dict[str, Any] | None:
        try:
            return self.transport.call(link, ["status", self.appliance])
        except NotFound:
            return None

    def ship_to(
        self, link: ReplicaLink, epoch: int, *, on_progress: ProgressCallback | None = None
    ) -> ShipReport:
        """Bring ``link.rack`` to this rack's latest frozen generation."""
        start = time.monotonic()
        m = self.manifest()
        mf.check_epoch(m, epoch, "shipping")
        replica_gen = m.acked.get(link.rack)
        if replica_gen is None:
            status = self._remote_head(link)
            if status is None:
                return self.seed(link, epoch, on_progress=on_progress)
            if status["epoch"] > epoch:
                raise StaleEpoch(
                    f"rack {link.rack} has seen epoch {status['epoch']} for {self.appliance},"
                    f" this rack runs it under {epoch}: stop; this rack was fenced"
                )
            their_lineage = [tuple(e) for e in status["lineage"]]
            common = mf.last_common_generation(
                their_lineage, status["generation"], m.lineage, m.generation
            )
            if common < status["generation"]:
                raise Conflict(
                    f"rack {link.rack} holds generation {status['generation']} of"
                    f" {self.appliance} which diverged from this rack's history at {common}:"
                    " it must keep its copy aside before it can be reseeded"
                )
            replica_gen = status["generation"]
        report = ShipReport(link.rack, replica_gen, replica_gen)
        for gen in range(replica_gen + 1, m.generation + 1):
            if m.record(gen) is None or not all(
                self.volume.outbox_file(d, gen).exists() for d in m.disk_names
            ):
                seeded = self.seed(link, epoch, on_progress=on_progress)
                seeded.from_generation = replica_gen
                return seeded
        pending = list(range(replica_gen + 1, m.generation + 1))
        for batch in batch_generations(pending, self._outbox_sizes(m, pending), self.batch_bytes):
            reported = self._push_generations(link, m, batch, report)
            for gen in batch:
                self._ship_generation(link, epoch, gen, reported, report)
        report.seconds = time.monotonic() - start
        return report

    def _outbox_sizes(self, m: Manifest, gens: list[int]) -> dict[int, int]:
        return {
            g: sum(self.volume.outbox_file(d, g).stat().st_size for d in m.disk_names) for g in gens
        }

    def _push_generations(
        self, link: ReplicaLink, m: Manifest, gens: list[int], report: ShipReport
    ) -> dict[tuple[str, int], str]:
        """rsync the deltas of ``gens`` (one run per disk); ``{(disk, gen): checksum}`` seen."""
        seen: dict[tuple[str, int], str] = {}
        for disk in m.disk_names:
            files = [self.volume.outbox_file(disk, g) for g in gens]
            t0 = time.monotonic()
            result = self.transport.push(link, files, remote_disk_dir(self.appliance, disk))
            report.push_s += time.monotonic() - t0
            report.bytes_sent += result.bytes_sent
            report.files += len(files)
            report.runs += 1
            by_name = {PurePosixPath(name).name: c for name, (_, c) in result.files.items() if c}
            for g in gens:
                checksum = by_name.get(mf.generation_file(g), "")
                if checksum:
                    seen[(disk, g)] = checksum
        return seen

    def _ship_generation(
        self,
        link: ReplicaLink,
        epoch: int,
        gen: int,
        reported: Mapping[tuple[str, int], str],
        report: ShipReport,
    ) -> None:
        """Ask the replica to commit ``gen`` (its deltas are in its incoming directory)."""
        m = self.manifest()
        record = m.record(gen)
        if record is None:
            raise ReplicationError(f"{self.appliance}: generation {gen} has no record; reseed")
        deltas: list[DiskDelta] = []
        for disk in m.disk_names:
            local = self.volume.outbox_file(disk, gen)
            # rsync's own whole-file checksum of what it sent; none when it found the
            # file already complete on the receiver (a retry): the recorded one, or read it
            checksum = reported.get((disk, gen), "")
            if not checksum:
                known = record.delta(disk)
                checksum = known.checksum if known else file_checksum(local)
            deltas.append(DiskDelta(disk, mf.generation_file(gen), local.stat().st_size, checksum))
        new_checksums = not record.deltas
        record = mf.replace_deltas(record, deltas)
        parent = (gen - 1, m.epoch_of(gen - 1))
        request = {
            "appliance": self.appliance,
            "epoch": epoch,
            "parent": list(parent),
            "record": record.to_dict(),
        }
        t0 = time.monotonic()
        self.transport.call(link, ["commit"], request)
        report.commit_s += time.monotonic() - t0
        # one durable manifest write for both: the checksums learnt while sending (a
        # crash before it costs a re-read of the delta on a retry, nothing more) and
        # the acknowledgement
        self._acknowledge(link.rack, gen, deltas if new_checksums else None)
        report.to_generation = gen

    def _acknowledge(self, rack: str, gen: int, deltas: list[DiskDelta] | None = None) -> None:
        with self.volume.locked():
            m = self.volume.load()
            if deltas is not None:
                m = mf.record_checksums(m, gen, deltas)
            self.volume.save(mf.acknowledge(m, rack, gen))

    # -- seeding -----------------------------------------------------------

    def seed(
        self, link: ReplicaLink, epoch: int, *, on_progress: ProgressCallback | None = None
    ) -> ShipReport:
        """Give ``link.rack`` a full copy of the latest frozen generation (sparse, resumable).

        Reads the frozen chain (so merges must not run meanwhile: call it
        from the cycle, as ship_to does). An interrupted transfer leaves a
        partial file on the receiver that the next attempt builds on.
        """
        start = time.monotonic()
        m = self.manifest()
        gen = m.generation
        report = ShipReport(link.rack, 0, gen, seeded=True)
        disks: dict[str, list[Any]] = {}
        for chain in m.disks:
            frozen_top = self.volume.file(chain.disk, chain.files[-2])
            seed_dir = self.volume.disk_dir(chain.disk) / f".seed-{mf.generation_file(gen)}"
            local = seed_dir / SEED_NAME
            if not local.exists():
                seed_dir.mkdir(exist_ok=True)
                tmp = seed_dir / ".flatten.tmp"
                tmp.unlink(missing_ok=True)
                self.qemu(flatten_argv(frozen_top, tmp))
                os.rename(tmp, local)
            remote = remote_disk_dir(self.appliance, chain.disk)
            progress = _rack_progress(on_progress, link.rack)
            result = self.transport.push(link, local, remote, sparse=True, on_progress=progress)
            checksum = next((c for _, c in result.files.values() if c), "") or file_checksum(local)
            report.bytes_sent += result.bytes_sent
            report.files += 1
            disks[chain.disk] = [chain.virtual_size, checksum]
        record = m.record(gen)
        request = {
            "appliance": self.appliance,
            "epoch": epoch,
            "generation": gen,
            "lineage": [list(e) for e in m.lineage],
            "disks": disks,
            "record": record.to_dict() if record else None,
        }
        self.transport.call(link, ["seed"], request)
        self._acknowledge(link.rack, gen)
        for chain in m.disks:
            for old in self.volume.disk_dir(chain.disk).glob(".seed-*"):
                shutil.rmtree(old, ignore_errors=True)
        report.seconds = time.monotonic() - start
        return report

    # -- merging -----------------------------------------------------------

    def merge(self) -> int:
        """Fold every frozen overlay into the bottom of its chain; return merges done."""
        merges = 0
        if self.live is not None and self.live.running():
            m = self.manifest()
            for disk in m.disk_names:
                while True:
                    m = self.manifest()
                    pair = mf.begin_merge(m, disk)
                    if pair is None:
                        break
                    bottom, overlay = pair
                    self.live.commit(
                        disk, self.volume.file(disk, overlay), self.volume.file(disk, bottom)
                    )
                    with self.volume.locked():
                        self.volume.save(mf.merged_on_primary(self.volume.load(), disk, overlay))
                    self.volume.file(disk, overlay).unlink(missing_ok=True)  # outbox keeps a link
                    merges += 1
            return merges
        return self.volume.merge_all()

    def prune_outbox(self, replicas: list[str]) -> int:
        """Drop outbox deltas every current replica holds (and forget racks no longer replicas)."""
        with self.volume.locked():
            m = self.volume.load()
            for rack in list(m.acked):
                if rack not in replicas:
                    m = mf.forget_replica(m, rack)
            self.volume.save(m)
        floor = min((m.acked.get(r, 0) for r in replicas), default=m.generation)
        removed = 0
        sizes: list[tuple[int, Path]] = []
        for disk in m.disk_names:
            outbox = self.volume.disk_dir(disk) / OUTBOX
            if not outbox.is_dir():
                continue
            for entry in outbox.iterdir():
                gen = mf.parse_generation_file(entry.name)
                if gen is None:
                    continue
                if gen <= floor:
                    entry.unlink()
                    removed += 1
                else:
                    sizes.append((gen, entry))
        total = sum(p.stat().st_size for _, p in sizes)
        for _gen, path in sorted(sizes):
            if total <= self.max_outbox_bytes:
                break
            total -= path.stat().st_size
            path.unlink()  # that replica will be reseeded
            removed += 1
        return removed

    # -- the cycle ---------------------------------------------------------

    def cycle(
        self,
        epoch: int,
        links: list[ReplicaLink],
        *,
        on_progress: ProgressCallback | None = None,
        merge: bool = True,
    ) -> CycleReport:
        """Freeze, ship to every replica, merge. A failing replica does not stop the others."""
        with self._cycle_lock:
            t0 = time.monotonic()
            record = self.freeze(epoch)
            report = CycleReport(self.appliance, epoch, record.generation, record.data_bytes)
            report.freeze_s = time.monotonic() - t0
            # The merge folds frozen overlays into the bottom while the deltas ship
            # (from their outbox links): it only moves data the chain already shows.
            # Not while a replica may need a seed, which reads the frozen chain.
            merger: Future[float] | None = None
            pool: ThreadPoolExecutor | None = None
            if merge and links and not self._may_seed(links):
                pool = ThreadPoolExecutor(1, thread_name_prefix=f"mc-merge-{self.appliance}")
                merger = pool.submit(self._prepare_and_merge)
            t1 = time.monotonic()
            try:
                for link in links:
                    try:
                        report.shipped[link.rack] = self.ship_to(
                            link, epoch, on_progress=on_progress
                        )
                    except StaleEpoch:
                        raise  # this rack was fenced: stop everything for this appliance
                    except Conflict as exc:
                        # a gap or a divergence: ask the replica afresh next time
                        report.errors[link.rack] = str(exc)
                        with self.volume.locked():
                            self.volume.save(mf.forget_replica(self.volume.load(), link.rack))
                    except MeshcloudError as exc:
                        report.errors[link.rack] = str(exc)
            finally:
                report.ship_s = time.monotonic() - t1
                if pool is not None:
                    pool.shutdown()  # never leave the merge running past the cycle
            # A failed merge (say, another process reading the chain holds a lock the
            # block commit needs) changed nothing the guest or a replica sees: the
            # next cycle merges again. Shipping already counted, so it is no failure.
            try:
                if merger is not None:
                    report.merge_s = merger.result()  # raises what the merge raised
                else:
                    self._prepare_next_quietly()
                    if merge:
                        report.merge_s = self._timed_merge()
            except MeshcloudError as exc:
                report.merge_error = str(exc)
            self.prune_outbox([link.rack for link in links])
            report.reason = _cycle_sentence(report)
            return report

    def _prepare_next_quietly(self) -> None:
        with contextlib.suppress(MeshcloudError):  # the next freeze makes them itself
            self.prepare_next()

    def _prepare_and_merge(self) -> float:
        """Prepare the next overlays and merge; the seconds the merge took."""
        self._prepare_next_quietly()
        return self._timed_merge()

    def _timed_merge(self) -> float:
        t0 = time.monotonic()
        self.merge()
        return time.monotonic() - t0

    def _may_seed(self, links: list[ReplicaLink]) -> bool:
        """Whether shipping to ``links`` could need a seed (an unknown replica or a pruned outbox)."""
        m = self.manifest()
        for link in links:
            acked = m.acked.get(link.rack)
            if acked is None:
                return True
            for gen in range(acked + 1, m.generation + 1):
                if m.record(gen) is None or not all(
                    self.volume.outbox_file(d, gen).exists() for d in m.disk_names
                ):
                    return True
        return False

    def final_sync(self, epoch: int, links: list[ReplicaLink]) -> CycleReport:
        """For a planned move: with the guest paused or stopped, ship the last writes.

        Raises ReplicationError unless every link acknowledged the final
        generation: the caller must not start the appliance elsewhere then.
        """
        report = self.cycle(epoch, links, merge=False)
        if report.errors:
            raise ReplicationError(
                f"final sync of {self.appliance} failed for {', '.join(sorted(report.errors))}:"
                f" {'; '.join(report.errors.values())}; do not move it yet"
            )
        return report


def batch_generations(
    gens: Sequence[int],
    sizes: Mapping[int, int],
    max_bytes: int,
    max_count: int = BATCH_GENERATIONS,
) -> list[list[int]]:
    """Split pending generations, in order, into rsync runs of at most ``max_bytes``.

    Every batch holds at least one generation (a larger one goes alone).
    """
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for g in gens:
        size = sizes.get(g, 0)
        if current and (total + size > max_bytes or len(current) >= max_count):
            batches.append(current)
            current, total = [], 0
        current.append(g)
        total += size
    if current:
        batches.append(current)
    return batches


def _rack_progress(
    on_progress: ProgressCallback | None, rack: str
) -> Callable[[int, int], None] | None:
    if on_progress is None:
        return None
    callback = on_progress

    def progress(done: int, total: int) -> None:
        callback(rack, done, total)

    return progress


def _cycle_sentence(r: CycleReport) -> str:
    ok = ", ".join(
        f"{rack} at {s.to_generation}{' (seeded)' if s.seeded else ''}"
        for rack, s in sorted(r.shipped.items())
    )
    failed = ", ".join(f"{rack} ({msg[:80]})" for rack, msg in sorted(r.errors.items()))
    parts = [f"{r.appliance}: froze generation {r.generation} ({r.data_bytes} bytes)"]
    if ok:
        parts.append(f"replicas {ok}")
    if failed:
        parts.append(f"failed: {failed}")
    if r.merge_error:
        parts.append(f"local merge deferred to the next cycle ({r.merge_error[:120]})")
    return "; ".join(parts)
