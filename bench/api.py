"""API benchmark: GET /api/v1/cluster under load, and the event stream fanned out to 100 clients.

A three-rack lab runs the real daemons with ten demo appliances deployed and
running (under TCG), in two scenarios, each its own lab: **control_loop**,
the appliances without replicas (placement, the racks' agents, leases and
Raft at work: the issue's lab), and **replicating**, one replica each,
seeded and shipping a delta every 2 s (rsync and ssh processes on both
sides, snapshots and merges).
From the lab's observer namespace, beside the racks, `GET /api/v1/cluster`
on one rack is loaded twice: by `wrk` (closed loop, 32 connections), which
finds the most requests per second the rack serves, and by an open-loop
generator (`_rate_client.py`) at a fixed 1,000 requests/s, whose latencies
run from each request's due time (no coordinated omission): the latency at
the goal's load. Meanwhile the benchmark watches the racks' leases (the
control loop must keep its pace: no rack may be seen as lost). Then 100
clients hold the event stream open and the time from a change to each
client seeing it is measured.

Run as root: ``python bench/api.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import distribution, fmt_dist, parse_args, print_table, write_result

from meshcloud.demo import demo_image_files, seed_lab_image
from meshcloud.lab.api import ApiError, LabApi
from meshcloud.lab.lab import Lab
from meshcloud.lab.wait import wait_for

APPLIANCES = 10
SSE_CLIENTS = 100
RATE = 1000.0  # requests/s offered by the open-loop generator (the goal)
RATE_CONNECTIONS = 32
URL_PATH = "/api/v1/cluster"
# (name, replicas per appliance): the lab (appliances and the control loop:
# placement, agents, leases, Raft), then the same with replication running too
SCENARIOS = (("control_loop", 0), ("replicating", 1))


def parse_wrk(text: str) -> dict[str, float]:
    """Requests/s and latency percentiles (ms) from `wrk --latency` output."""
    units = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    out: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        out["rps"] = float(m.group(1))
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        out[f"p{pct}_ms"] = float(value) * units[unit]
    m = re.search(r"(\d+) requests in", text)
    if m:
        out["requests"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = float(m.group(1)) if m else 0.0
    return out


def deploy(api: LabApi, spec: dict[str, object]) -> bool:
    try:
        api.put_appliance("r1", spec)
    except ApiError:
        return False
    return True


def watch_leases(api: LabApi, racks: list[str], stop: threading.Event, worst: list[float]) -> None:
    """Record the largest lease age the leader reports while the load runs."""
    while not stop.is_set():
        for rack in racks:
            h = api.health_or_none(rack)
            if h is None:
                continue
            try:
                doc = api.cluster(rack)
            except Exception:
                continue
            for info in doc.get("health", {}).get("racks", {}).values():
                age = info.get("lease_age_s")
                if isinstance(age, int | float):
                    worst[0] = max(worst[0], float(age))
                if info.get("state") == "lost":
                    worst[1] += 1
            break
        stop.wait(0.5)


def run_scenario(replicas: int, duration_s: int, rounds: int) -> dict[str, Any]:
    """One lab: ten appliances with ``replicas`` replicas each, loaded; the raw figures."""
    lab = Lab("bapi")
    if lab.exists():
        lab.down()
    try:
        lab.up(racks=3)
        api = LabApi(lab)
        racks = lab.racks()
        wait_for(lambda: api.one_cluster(racks), 60, "one cluster")
        manifest, files = demo_image_files()
        seed_lab_image(lab, manifest, files)
        for i in range(APPLIANCES):
            spec = {"name": f"app{i}", "image": "demo", "memory_mib": 128, "replicas": replicas,
                    "disks": [{"name": "data", "size_gib": 1}]}  # fmt: skip
            wait_for(lambda s=spec: deploy(api, s), 30, f"deploying {spec['name']}")

        def steady() -> bool:
            # every appliance booted and (if replicated) its replica seeded and fed:
            # the load runs beside a cluster at work, not one still starting
            doc = api.cluster("r1")
            gens = doc["replica_generations"]
            return len(doc["assignments"]) == APPLIANCES and all(
                a["state"] == "running"
                and len(a["replicas"]) == replicas
                and all(gens.get(name, {}).get(r, -1) >= 2 for r in a["replicas"])
                for name, a in doc["assignments"].items()
            )

        wait_for(steady, 300, "every appliance running (and replicated)", interval=1.0)
        print(
            f"{APPLIANCES} appliances running, {replicas} replica(s) each; loading {URL_PATH}",
            flush=True,
        )
        url = f"http://{lab.rack('r2').ip}:8440{URL_PATH}"
        runs: list[dict[str, float]] = []
        fixed: list[dict[str, Any]] = []
        worst = [0.0, 0.0]
        stop = threading.Event()
        watcher = threading.Thread(target=watch_leases, args=(api, racks, stop, worst))
        watcher.start()
        try:
            for _ in range(rounds):
                proc = lab.exec(None, ["wrk", "-t2", "-c32", f"-d{duration_s}s", "--latency",
                                       "-H", f"Authorization: Bearer {api.token}", url],
                                timeout=duration_s + 60)  # fmt: skip
                runs.append(parse_wrk(proc.stdout))
                print(f"  wrk round: {runs[-1]}", flush=True)
            rate_client = Path(__file__).resolve().parent / "_rate_client.py"
            for _ in range(rounds):
                proc = lab.exec(None, [sys.executable, str(rate_client), url, api.token, str(RATE),
                                       str(duration_s * 2), str(RATE_CONNECTIONS)],
                                timeout=duration_s * 2 + 60)  # fmt: skip
                fixed.append(json.loads(proc.stdout))
                f = fixed[-1]
                print(
                    f"  {RATE:.0f}/s round: achieved {f['achieved_rps']:.0f}/s,"
                    f" {f['answered']} of {f['sent']} answered, errors {f['errors']}, p99"
                    f" {sorted(f['latency_s'])[int(0.99 * len(f['latency_s']))] * 1000:.1f} ms"
                    if f["latency_s"]
                    else "  no answers",
                    flush=True,
                )
        finally:
            stop.set()
            watcher.join()
        # the event stream fanned out to 100 clients
        sse_url = f"http://{lab.rack('r3').ip}:8440/api/v1/events"
        helper = Path(__file__).resolve().parent / "_sse_clients.py"
        clients = lab.popen(None, [sys.executable, str(helper), sse_url, api.token, str(SSE_CLIENTS)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert clients.stdout is not None and clients.stdin is not None
        line = clients.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"SSE clients did not connect: {line!r}")
        marker = f"fanout{int(time.time())}"
        clients.stdin.write(marker + "\n")
        clients.stdin.flush()
        api.put_appliance("r1", {"name": marker, "image": "demo", "replicas": 0})
        fan = json.loads(clients.stdout.readline())
        clients.wait(30)
    finally:
        lab.down()
    return summarise(runs, fixed, worst, fan)


def summarise(
    runs: list[dict[str, float]],
    fixed: list[dict[str, Any]],
    worst: list[float],
    fan: dict[str, Any],
) -> dict[str, Any]:
    rps = [r["rps"] for r in runs]
    fixed_rounds = []
    for f in fixed:
        lat = distribution([x * 1000 for x in f.pop("latency_s")])
        fixed_rounds.append(f | {"latency_ms": lat})
    failed = sum(int(f["sent"]) - int(f["statuses"].get("200", 0)) for f in fixed_rounds)
    fan_lat = distribution(fan["latency_s"]) if fan["latency_s"] else {}
    return {
        "cluster_get_saturated": {
            "rounds": runs,
            "rps": distribution(rps),
            "p99_ms": distribution([r["p99_ms"] for r in runs]),
        },
        "cluster_get_at_rate": {"rate": RATE, "rounds": fixed_rounds, "failed": failed},
        "lease_age_max_s_under_load": worst[0],
        "racks_seen_lost_under_load": worst[1],
        "sse": {"clients": fan["clients"], "received": fan["received"], "latency_s": fan_lat},
    }


def rows(title: str, r: dict[str, Any]) -> list[tuple[str, str]]:
    sat = r["cluster_get_saturated"]
    at = r["cluster_get_at_rate"]
    sse = r["sse"]
    return [
        (f"{title}: wrk, most requests/s (per round)",
         ", ".join(f"{x['rps']:.0f}" for x in sat["rounds"])),
        ("  wrk, p99 at saturation (ms)", ", ".join(f"{x['p99_ms']:.1f}" for x in sat["rounds"])),
        (f"  at {RATE:.0f} requests/s: achieved, p50 / p99 (ms)",
         "; ".join(f"{f['achieved_rps']:.0f}, {f['latency_ms']['p50']:.1f} /"
                   f" {f['latency_ms']['p99']:.1f}" for f in at["rounds"])),
        ("  failed requests at that rate", f"{at['failed']}"),
        ("  max lease age under load (s)", f"{r['lease_age_max_s_under_load']:.2f}"),
        ("  racks seen lost under load", f"{r['racks_seen_lost_under_load']:.0f}"),
        (f"  event fan-out to {sse['clients']} clients",
         f"{sse['received']} received,"
         f" {fmt_dist(sse['latency_s'], 's') if sse['latency_s'] else '-'}"),
    ]  # fmt: skip


def main() -> int:
    args = parse_args("api", __doc__.splitlines()[0])
    duration_s = 5 if args.quick else 20
    rounds = 1 if args.quick else 3
    results: dict[str, Any] = {}
    for name, replicas in SCENARIOS:
        print(f"scenario {name}: ten appliances, {replicas} replica(s) each", flush=True)
        results[name] = run_scenario(replicas, duration_s, rounds)

    def headline_of(r: dict[str, Any]) -> tuple[float, float, int]:
        rps = min(x["rps"] for x in r["cluster_get_saturated"]["rounds"])
        p99 = max(f["latency_ms"]["p99"] for f in r["cluster_get_at_rate"]["rounds"])
        return rps, p99, r["sse"]["received"]

    rps, p99, sse = headline_of(results["control_loop"])
    rps_r, p99_r, _ = headline_of(results["replicating"])
    results["replicating_headline"] = {"cluster_get_rps": rps_r, "cluster_get_p99_ms": p99_r}
    write_result(
        "api",
        args,
        params={
            "racks": 3,
            "appliances": APPLIANCES,
            "scenarios": dict(SCENARIOS),
            "wrk": "2 threads, 32 connections",
            "open_loop_rate": RATE,
            "open_loop_connections": RATE_CONNECTIONS,
            "duration_s": duration_s,
            "rounds": rounds,
            "sse_clients": SSE_CLIENTS,
        },
        results=results,
        headline={
            "cluster_get_rps": rps,
            "cluster_get_p99_ms": p99,
            "sse_clients": sse,
        },
    )
    print_table(
        f"api: GET {URL_PATH} on a 3-rack lab with {APPLIANCES} appliances",
        rows("control loop (no replicas)", results["control_loop"])
        + rows("replicating (1 replica each, every 2 s)", results["replicating"]),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
