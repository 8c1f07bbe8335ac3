"""API benchmark: GET /api/v1/cluster under load, and the event stream fanned out to 100 clients.

A three-rack lab runs the real daemons with ten demo appliances deployed.
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


def main() -> int:
    args = parse_args("api", __doc__.splitlines()[0])
    duration_s = 5 if args.quick else 20
    rounds = 1 if args.quick else 3
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
            spec = {"name": f"app{i}", "image": "demo", "memory_mib": 128, "replicas": 1,
                    "disks": [{"name": "data", "size_gib": 1}]}  # fmt: skip
            wait_for(lambda s=spec: deploy(api, s), 30, f"deploying {spec['name']}")

        def all_placed() -> bool:
            doc = api.cluster("r1")
            return len(doc["assignments"]) == APPLIANCES

        wait_for(all_placed, 120, "every appliance placed")
        url = f"http://{lab.rack('r2').ip}:8440{URL_PATH}"
        runs = []
        fixed: list[dict[str, object]] = []
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
            rate_client = Path(__file__).resolve().parent / "_rate_client.py"
            for _ in range(rounds):
                proc = lab.exec(None, [sys.executable, str(rate_client), url, api.token, str(RATE),
                                       str(duration_s * 2), str(RATE_CONNECTIONS)],
                                timeout=duration_s * 2 + 60)  # fmt: skip
                fixed.append(json.loads(proc.stdout))
        finally:
            stop.set()
            watcher.join()
        # the event stream fanned out to 100 clients
        sse_url = f"http://{lab.rack('r3').ip}:8440/api/v1/events"
        helper = Path(__file__).resolve().parent / "_sse_clients.py"
        proc = lab.popen(None, [sys.executable, str(helper), sse_url, api.token, str(SSE_CLIENTS)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"SSE clients did not connect: {line!r}")
        marker = f"fanout{int(time.time())}"
        proc.stdin.write(marker + "\n")
        proc.stdin.flush()
        api.put_appliance("r1", {"name": marker, "image": "demo", "replicas": 0})
        fan = json.loads(proc.stdout.readline())
        proc.wait(30)
    finally:
        lab.down()
    rps = [r["rps"] for r in runs]
    p99_saturated = [r["p99_ms"] for r in runs]
    fixed_rounds = []
    for f in fixed:
        lat = distribution([x * 1000 for x in f.pop("latency_s")])  # type: ignore[union-attr]
        fixed_rounds.append(f | {"latency_ms": lat})
    p99 = [float(f["latency_ms"]["p99"]) for f in fixed_rounds]
    failed = sum(int(f["sent"]) - int(f["statuses"].get("200", 0)) for f in fixed_rounds)
    fan_lat = distribution(fan["latency_s"]) if fan["latency_s"] else {}
    results = {
        "cluster_get_saturated": {
            "rounds": runs,
            "rps": distribution(rps),
            "p99_ms": distribution(p99_saturated),
        },
        "cluster_get_at_rate": {"rate": RATE, "rounds": fixed_rounds, "failed": failed},
        "lease_age_max_s_under_load": worst[0],
        "racks_seen_lost_under_load": worst[1],
        "sse": {"clients": fan["clients"], "received": fan["received"], "latency_s": fan_lat},
    }
    write_result(
        "api",
        args,
        params={
            "racks": 3,
            "appliances": APPLIANCES,
            "wrk": "2 threads, 32 connections",
            "open_loop_rate": RATE,
            "open_loop_connections": RATE_CONNECTIONS,
            "duration_s": duration_s,
            "rounds": rounds,
            "sse_clients": SSE_CLIENTS,
        },
        results=results,
        headline={
            "cluster_get_rps": min(rps),
            "cluster_get_p99_ms": max(p99),
            "sse_clients": fan["received"],
        },
    )
    print_table(
        f"api: GET {URL_PATH} on a 3-rack lab with {APPLIANCES} appliances",
        [
            ("wrk, most requests/s (per round)", ", ".join(f"{r:.0f}" for r in rps)),
            ("wrk, p99 at saturation (ms)", ", ".join(f"{p:.1f}" for p in p99_saturated)),
            (
                f"at {RATE:.0f} requests/s: achieved, p50 / p99 (ms)",
                "; ".join(
                    f"{f['achieved_rps']:.0f}, {f['latency_ms']['p50']:.1f} / "
                    f"{f['latency_ms']['p99']:.1f}"
                    for f in fixed_rounds
                ),
            ),
            ("failed requests at that rate", f"{failed}"),
            ("max lease age under load (s)", f"{worst[0]:.2f}"),
            ("racks seen lost under load", f"{worst[1]:.0f}"),
            (
                f"event fan-out to {fan['clients']} clients",
                f"{fan['received']} received, {fmt_dist(fan_lat, 's') if fan_lat else '-'}",
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
