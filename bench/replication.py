"""Benchmark: meshcloud's delta cycle against rsync, on the same disk and the same changes.

    python bench/replication.py [--quick] [--out FILE] [--size-gib=S] [--reps=N] [--fractions=F,...]

A disk of S GiB (4 GiB; 256 MiB with --quick) of random bytes exists three
times at the source: as a raw file for the rsync baselines, and as
meshcloud's qcow2 volume (4 KiB-cluster bottom + active overlay), each
replicated to a receiving "rack" (a real sshd on loopback with the
cluster's forced command: rsync's daemon mode write-only into incoming,
and the replication verbs). For each fraction f of 4 KiB blocks (0.1 %, 1 %, 10 %)
and each repetition, the same f of blocks, at the same random offsets with
the same bytes, is written to both source copies; then, in an order that
rotates between repetitions:

- **meshcloud**: one cycle (freeze, ship over rsync+ssh, replica commit)
  until the replica has acknowledged the new generation, then the local
  merge (timed and counted apart: it runs after the replica is consistent;
  with no cache drop before it, since in the daemon it runs during the
  ship and reads the delta the ship has just read);
- **rsync --no-whole-file --inplace** of the raw image over the same ssh;
- **default rsync** (delta transfer to a temporary file, then rename).

Before each run the source and replica files are flushed and dropped from
the page cache (posix_fadvise DONTNEED), so every method starts cold.
"Bytes read at the source" is the block-layer ``read_bytes`` of the
source-side processes (the benchmark and the rsync/ssh/qemu-img children it
reaps, from /proc/self/io); "bytes sent" is rsync's ``Total bytes sent``
(plus meshcloud's commit requests). After the last repetition of each
fraction every replica is compared with its source (`cmp`, `qemu-img
compare`): a mismatch is a safety violation and must be 0.

Headline (median over repetitions at 1 %): ``speedup_vs_rsync_inplace_1pct``,
``speedup_vs_rsync_default_1pct`` (rsync time / meshcloud time to a
consistent replica), ``source_read_over_changed_1pct``,
``sent_over_changed_1pct`` (meshcloud's bytes over the changed bytes).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    distribution,
    parse_args,
    print_table,
    write_result,
)
from meshcloud.replication.source import ApplianceSource, ReplicaLink  # noqa: E402
from meshcloud.replication.testbed import LoopbackSshd, have_sshd  # noqa: E402
from meshcloud.replication.transport import (  # noqa: E402
    RSYNC_MODULE,
    RsyncSettings,
    SshTarget,
    parse_rsync_output,
    rsync_rsh,
)

BLOCK = 4096
GIB = 1 << 30
FRACTIONS = (0.001, 0.01, 0.1)
METHODS = ("meshcloud", "rsync_inplace", "rsync_default")


def io_counters() -> dict[str, int]:
    """This process's I/O counters, including every child it has reaped."""
    out = {}
    with open("/proc/self/io", encoding="ascii") as f:
        for line in f:
            key, value = line.split(":")
            out[key.strip()] = int(value)
    return out


def measure(fn: Callable[[], Any]) -> tuple[float, int, int, Any]:
    """(seconds, block-layer bytes read, bytes read incl. pipes, result) of ``fn``."""
    before = io_counters()
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    after = io_counters()
    return (
        elapsed,
        after["read_bytes"] - before["read_bytes"],
        after["rchar"] - before["rchar"],
        result,
    )


def drop_cache(*roots: Path) -> None:
    """Flush and evict every file under ``roots`` from the page cache (cold start)."""
    for root in roots:
        paths = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)


def random_file(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    chunk = 64 << 20
    with path.open("wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(rng.randbytes(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def apply_changes(raw: Path, overlay: Path, blocks: list[int], seed: int) -> None:
    """Write the same pattern bytes at the same blocks into the raw file and the qcow2 overlay."""
    patterns = [1 + (seed + b) % 254 for b in blocks]
    fd = os.open(raw, os.O_WRONLY)
    try:
        for b, p in zip(blocks, patterns, strict=True):
            os.pwrite(fd, bytes([p]) * BLOCK, b * BLOCK)
        os.fsync(fd)
    finally:
        os.close(fd)
    script = "".join(
        f"write -q -P {p} {b * BLOCK} {BLOCK}\n" for b, p in zip(blocks, patterns, strict=True)
    )
    # -t unsafe: no flush per write (a guest's page cache would batch them too); fsync after
    subprocess.run(
        ["qemu-io", "-t", "unsafe", "-f", "qcow2", str(overlay)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )
    fd = os.open(overlay, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rsync_baseline(target: SshTarget, src: Path, remote_dir: str, inplace: bool) -> dict[str, Any]:
    argv = ["rsync", "--stats", "--times", "--timeout=600"]
    if inplace:
        argv += ["--no-whole-file", "--inplace"]
    # through the same forced command as meshcloud's deltas: rsync's daemon module
    dest = f"{target.destination}::{RSYNC_MODULE}/{remote_dir}/"
    argv += ["-e", rsync_rsh(target), str(src), dest]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"rsync failed: {proc.stderr[-500:]}")
    r = parse_rsync_output(proc.stdout)
    return {"bytes_sent": r.bytes_sent, "literal_bytes": r.literal_bytes}


def images_equal_raw(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def qcow2_equals_raw(qcow2: Path, raw: Path) -> bool:
    argv = ["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F", "raw", str(qcow2), str(raw)]
    return subprocess.run(argv, check=False).returncode == 0


def main() -> int:
    own = [a for a in sys.argv[1:] if a.startswith(("--size-gib=", "--reps=", "--fractions="))]
    rest = [a for a in sys.argv[1:] if a not in own]
    args = parse_args("replication", __doc__.splitlines()[0], rest)
    size_gib = 0.25 if args.quick else 4.0
    reps = 2 if args.quick else 3
    fractions = FRACTIONS
    for extra in own:
        if extra.startswith("--size-gib="):
            size_gib = float(extra.split("=", 1)[1])
        if extra.startswith("--reps="):
            reps = int(extra.split("=", 1)[1])
        if extra.startswith("--fractions="):  # a developer's partial run, e.g. --fractions=0.01
            fractions = tuple(float(f) for f in extra.split("=", 1)[1].split(","))
    if not have_sshd():
        print("bench/replication.py needs root, sshd and rsync", file=sys.stderr)
        return 1
    size = int(size_gib * GIB) // BLOCK * BLOCK
    nblocks = size // BLOCK
    work = Path(tempfile.mkdtemp(prefix="mc-bench-repl-", dir="/var/tmp"))
    control = Path(tempfile.mkdtemp(prefix="mcb-"))
    sshd = LoopbackSshd(work / "sshd", work / "replica")
    trials: list[dict[str, Any]] = []
    violations = 0
    seed_info: dict[str, Any] = {}
    t_start = time.monotonic()
    try:
        print(f"setting up a {size_gib:g} GiB disk in {work} ...", flush=True)
        base = work / "base.raw"
        random_file(base, size, seed=1)
        rsync_src = work / "rsync-src" / "disk.raw"
        rsync_src.parent.mkdir()
        shutil.copyfile(base, rsync_src)
        sshd.start()
        incoming = work / "replica" / ".incoming"
        for name in ("baseline-inplace", "baseline-default"):
            (incoming / name).mkdir(parents=True)
            shutil.copyfile(base, incoming / name / "disk.raw")
        target = sshd.target(control)
        # as the daemon ships: rsync does not fsync, the replica's commit fsyncs each
        # delta before it enters the chain and the manifest before it acknowledges
        link = ReplicaLink("rack-b", target, RsyncSettings(compress=False))
        source = ApplianceSource.create(
            work / "source", "bench", {"data": size}, epoch=1,
            templates={"data": base}, template_format="raw",
        )  # fmt: skip
        base.unlink()
        drop_cache(work)
        seconds, read, _, report = measure(lambda: source.cycle(1, [link]))
        if report.errors:
            raise RuntimeError(f"seeding failed: {report.errors}")
        ship = report.shipped["rack-b"]
        seed_info = {
            "seconds": round(seconds, 2),
            "bytes_sent": ship.bytes_sent,
            "source_read_bytes": read,
            "disk_bytes": size,
        }
        print(f"seeded the replica in {seconds:.1f} s", flush=True)
        rng = random.Random(7)
        for fraction in fractions:
            changed_blocks = max(1, round(nblocks * fraction))
            for rep in range(reps):
                blocks = sorted(rng.sample(range(nblocks), changed_blocks))
                apply_changes(rsync_src, source.active_paths()["data"], blocks, seed=rep)
                changed = changed_blocks * BLOCK
                order = METHODS[rep % 3 :] + METHODS[: rep % 3]
                row: dict[str, Any] = {"fraction": fraction, "rep": rep, "changed_bytes": changed}
                for method in order:
                    drop_cache(work)
                    if method == "meshcloud":
                        secs, read, rchar, rep_ = measure(
                            lambda: source.cycle(1, [link], merge=False)
                        )
                        if rep_.errors:
                            raise RuntimeError(f"cycle failed: {rep_.errors}")
                        sent = rep_.shipped["rack-b"].bytes_sent + 2048  # + the commit request
                        # no cache drop here: in the daemon the merge runs during the
                        # ship, while the delta it reads is still in the page cache
                        # (QEMU writes the disk through it: cache=writeback)
                        msecs, mread, _, _ = measure(source.merge)
                        source.prune_outbox(["rack-b"])
                        row[method] = {
                            "seconds": rep_.freeze_s + rep_.ship_s,
                            "cycle_seconds": secs,
                            "freeze_seconds": rep_.freeze_s,
                            "rsync_seconds": rep_.shipped["rack-b"].push_s,
                            "commit_seconds": rep_.shipped["rack-b"].commit_s,
                            "source_read_bytes": read,
                            "source_rchar_bytes": rchar,
                            "bytes_sent": sent,
                            "merge_seconds": msecs,
                            "merge_read_bytes": mread,
                            "generation": rep_.generation,
                        }
                    else:
                        inplace = method == "rsync_inplace"
                        remote = "baseline-inplace" if inplace else "baseline-default"
                        secs, read, rchar, res = measure(
                            lambda inplace=inplace, remote=remote: rsync_baseline(
                                target, rsync_src, remote, inplace
                            )
                        )
                        row[method] = {
                            "seconds": secs,
                            "source_read_bytes": read,
                            "source_rchar_bytes": rchar,
                            **res,
                        }
                    print(
                        f"  f={fraction:.1%} rep {rep} {method:14s} {row[method]['seconds']:8.3f} s"
                        f"  read {row[method]['source_read_bytes'] / 1e6:9.1f} MB"
                        f"  sent {row[method]['bytes_sent'] / 1e6:9.1f} MB",
                        flush=True,
                    )
                trials.append(row)
            # safety: every replica must equal its source
            drop_cache(work)
            m = source.manifest()
            store_top = _replica_top(work / "replica", "bench")
            src_raw = work / "check.raw"
            subprocess.run(
                ["qemu-img", "convert", "-U", "-O", "raw",
                 str(source.volume.file("data", m.chain("data").files[-2])), str(src_raw)],
                check=True,
            )  # fmt: skip
            ok = {
                "meshcloud": qcow2_equals_raw(store_top, src_raw),
                "meshcloud_source": images_equal_raw(src_raw, rsync_src),
                "rsync_inplace": images_equal_raw(
                    rsync_src, incoming / "baseline-inplace" / "disk.raw"
                ),
                "rsync_default": images_equal_raw(
                    rsync_src, incoming / "baseline-default" / "disk.raw"
                ),
            }
            src_raw.unlink()
            bad = [k for k, v in ok.items() if not v]
            violations += len(bad)
            print(
                f"  f={fraction:.1%} replicas identical to their sources: {not bad} {bad}",
                flush=True,
            )
    finally:
        with_source = locals().get("source")
        if with_source is not None:
            with_source.transport.close()
        sshd.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(control, ignore_errors=True)

    results: dict[str, Any] = {
        "seed": seed_info,
        "per_fraction": {},
        "safety_violations": violations,
    }
    for fraction in fractions:
        rows = [t for t in trials if t["fraction"] == fraction]
        changed = rows[0]["changed_bytes"]
        entry: dict[str, Any] = {"changed_bytes": changed}
        for method in METHODS:
            entry[method] = {
                "seconds": distribution(r[method]["seconds"] for r in rows),
                "source_read_bytes": statistics.median(
                    r[method]["source_read_bytes"] for r in rows
                ),
                "bytes_sent": statistics.median(r[method]["bytes_sent"] for r in rows),
            }
        entry["meshcloud"]["merge_seconds"] = distribution(
            r["meshcloud"]["merge_seconds"] for r in rows
        )
        entry["meshcloud"]["merge_read_bytes"] = statistics.median(
            r["meshcloud"]["merge_read_bytes"] for r in rows
        )
        entry["speedup_vs_rsync_inplace"] = statistics.median(
            r["rsync_inplace"]["seconds"] / r["meshcloud"]["seconds"] for r in rows
        )
        entry["speedup_vs_rsync_default"] = statistics.median(
            r["rsync_default"]["seconds"] / r["meshcloud"]["seconds"] for r in rows
        )
        entry["source_read_over_changed"] = statistics.median(
            r["meshcloud"]["source_read_bytes"] / changed for r in rows
        )
        entry["source_read_with_merge_over_changed"] = statistics.median(
            (r["meshcloud"]["source_read_bytes"] + r["meshcloud"]["merge_read_bytes"]) / changed
            for r in rows
        )
        entry["sent_over_changed"] = statistics.median(
            r["meshcloud"]["bytes_sent"] / changed for r in rows
        )
        entry["rsync_inplace_read_over_changed"] = statistics.median(
            r["rsync_inplace"]["source_read_bytes"] / changed for r in rows
        )
        results["per_fraction"][f"{fraction * 100:g}pct"] = entry
    results["trials"] = trials
    one = results["per_fraction"]["1pct"]
    headline = {
        "speedup_vs_rsync_inplace_1pct": round(one["speedup_vs_rsync_inplace"], 1),
        "speedup_vs_rsync_default_1pct": round(one["speedup_vs_rsync_default"], 1),
        "source_read_over_changed_1pct": round(one["source_read_over_changed"], 2),
        "sent_over_changed_1pct": round(one["sent_over_changed"], 2),
    }
    params = {
        "disk_gib": size_gib,
        "block_bytes": BLOCK,
        "fractions": list(fractions),
        "reps": reps,
        "transport": "rsync over ssh to a loopback sshd (forced command: rsync daemon module), no compression",
        "cache": "source and replica files flushed and evicted before every run",
        "wall_seconds": round(time.monotonic() - t_start, 1),
    }
    out = write_result(
        "replication", args, params=params, results=results, headline=headline,
        baseline={"rsync_inplace": "rsync --no-whole-file --inplace", "rsync_default": "rsync"},
    )  # fmt: skip
    rows_out = []
    for key, entry in results["per_fraction"].items():
        rows_out.append(
            (
                f"{key} changed ({entry['changed_bytes'] / 1e6:.1f} MB)",
                f"meshcloud {entry['meshcloud']['seconds']['p50']:.3f} s,"
                f" inplace {entry['rsync_inplace']['seconds']['p50']:.2f} s,"
                f" default {entry['rsync_default']['seconds']['p50']:.2f} s;"
                f" speedup {entry['speedup_vs_rsync_inplace']:.0f}x / {entry['speedup_vs_rsync_default']:.0f}x;"
                f" read {entry['source_read_over_changed']:.2f}x"
                f" (+merge {entry['source_read_with_merge_over_changed']:.2f}x),"
                f" sent {entry['sent_over_changed']:.2f}x changed",
            )
        )
    rows_out.append(("safety violations", str(violations)))
    rows_out.append(("headline", json.dumps(headline)))
    print_table(f"replication ({size_gib:g} GiB disk, {reps} reps)", rows_out)
    print(f"wrote {out}")
    return 0 if violations == 0 else 1


def _replica_top(root: Path, appliance: str) -> Path:
    from meshcloud.replication.store import ReplicaStore

    vs = ReplicaStore(root).volume(appliance)
    m = vs.load()
    return vs.top_path(m, "data")


if __name__ == "__main__":
    sys.exit(main())
