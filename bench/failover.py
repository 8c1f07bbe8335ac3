"""Failover benchmark: time from a silent power cut to the appliance running on a survivor.

    python bench/failover.py [--quick] [--trials N] [--out FILE]     (root)

A five-rack lab whose links all deliver with 50 ms delay and 1 % loss (each
packet shaped once, on receipt: a 100 ms round trip), the real daemon on
every rack, the demo image seeded, and two demo appliances whose disks
replicate to two other racks. Each trial hard-kills, at random, one of the
racks running an appliance (the Raft leader is one of them whenever it runs
one): the lab cuts the rack's link first, so no TCP FIN or RST tells anyone,
then kills every process in it, QEMU included. Measured per affected
appliance:

- **detection**: kill -> the leader's placement decision naming the rack lost
  (the timestamp of that sentence in the leader's log);
- **restart**: that decision -> the appliance's QEMU running (not paused) on
  a survivor, as the invariant checker sees it (it scans every rack's QEMU
  and libvirt's status files every 0.1 s);
- **RTO**: kill -> running on a survivor.

The checker also counts double runs (an appliance running on two racks at
once) and counter violations (a new primary starting below the value the map
recorded as replicated). Then the rack is powered on again and the next trial
waits until every appliance has two replicas reporting again.

``--quick``: one trial (a lab, the image, two boots and one failover do not
fit in much less than a minute on this machine; see the printed time).
Goal: ``rto_p99_s`` at most 10 s and no violation.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._common import (  # noqa: E402
    HEADLINE_KEYS,
    RESULTS_DIR,
    distribution,
    fmt_dist,
    load_average,
    print_table,
    write_result,
)

LINK = "delay=50ms loss=1%"
RACKS = 5
APPS = {"bench1": "10.90.0.21", "bench2": "10.90.0.22"}
REPLICAS = 2
TIMEOUT_S = 120.0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/failover.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one trial (about a minute)")
    parser.add_argument("--trials", type=int, default=None, help="trials (default 50, quick 1)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "failover.json")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy the racks' logs here")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the trials (PNG)")
    parser.add_argument(
        "--replot", type=Path, default=None, help="only draw --plot from this earlier JSON result"
    )
    return parser.parse_args()


def _placement_decisions(lab: Any, after_wall: float, victim: str) -> float | None:
    """Wall time of the first placement sentence after ``after_wall`` saying ``victim`` was lost."""
    best: float | None = None
    for rack in lab.racks():
        log = lab.log_dir(rack) / "daemon.log"
        try:
            lines = log.read_text(errors="replace").splitlines()[-4000:]
        except OSError:
            continue
        for line in lines:
            if '"meshcloud.leader"' not in line or f"{victim} lost" not in line:
                continue
            try:
                ts = float(json.loads(line)["ts"])
            except (ValueError, KeyError):
                continue
            if ts > after_wall and (best is None or ts < best):
                best = ts
    return best


def run(trials: int, seed: int, keep_logs: Path | None = None) -> dict[str, Any]:
    from meshcloud.core.models import ApplianceSpec, DiskSpec, PortSpec
    from meshcloud.demo import demo_image_files, seed_lab_image
    from meshcloud.lab.api import ApiError, LabApi
    from meshcloud.lab.checker import InvariantChecker
    from meshcloud.lab.lab import Lab
    from meshcloud.lab.wait import wait_for

    rng = random.Random(seed)
    lab = Lab(f"bfo{int(time.time()) % 100000}")
    t_begin = time.monotonic()
    rows: list[dict[str, Any]] = []
    try:
        lab.up(racks=RACKS, link=LINK)
        manifest, files = demo_image_files()
        seed_lab_image(lab, manifest, files)
        api = LabApi(lab, timeout_s=5.0)
        racks = lab.racks()

        def cluster() -> dict[str, Any] | None:
            for rack in racks:
                if lab.rack(rack).power != "on":
                    continue
                try:
                    doc: dict[str, Any] = api.cluster(rack)
                    return doc
                except ApiError:
                    continue
            return None

        wait_for(
            lambda: (d := cluster()) is not None and d["leader"] and len(d["racks"]) == RACKS,
            TIMEOUT_S,
            "the cluster to form",
            interval=0.5,
        )
        for name, ip in APPS.items():
            spec = ApplianceSpec(
                name, "demo", memory_mib=128, disks=(DiskSpec("data", 1),),
                ports=(PortSpec("http", 80),), ip=ip, replicas=REPLICAS,
            )  # fmt: skip
            api.request(racks[0], "PUT", f"/api/v1/appliances/{name}", spec.to_dict())
        infos = {r: lab.rack(r) for r in racks}
        checker = InvariantChecker(
            lambda: {r: (i.netns, i.state_dir) for r, i in infos.items()},
            cluster,
            available=lambda rack, _t: lab.rack(rack).power == "on",
        ).start()

        def settled() -> dict[str, Any] | None:
            """The map once every appliance runs where it says, with replicas reporting."""
            doc = cluster()
            if doc is None:
                return None
            for name in APPS:
                asg = doc["assignments"].get(name)
                if asg is None or asg["state"] != "running" or not asg["primary"]:
                    return None
                if set(checker.running_on(name)) != {asg["primary"]}:
                    return None
                reports = doc["replica_generations"].get(name, {})
                if len(asg["replicas"]) < REPLICAS or any(
                    reports.get(r, -1) < 1 for r in asg["replicas"]
                ):
                    return None
            return doc

        try:
            ready_at = time.monotonic()
            for trial in range(trials):
                doc = wait_for(settled, 3 * TIMEOUT_S, "the appliances to settle", interval=0.25)
                hosts = {doc["assignments"][n]["primary"]: n for n in APPS}
                victim = rng.choice(sorted(hosts))
                affected = [n for n in APPS if doc["assignments"][n]["primary"] == victim]
                was_leader = doc["leader"] == victim
                kill_wall = time.time()
                kill_at = lab.kill(victim)
                for name in affected:
                    at, home = wait_for(
                        lambda name=name, since=kill_at, gone=victim: checker.first_running_after(
                            name, since, [gone]
                        ),
                        TIMEOUT_S,
                        f"{name} to run off {victim}",
                        interval=0.05,
                    )
                    decided = _placement_decisions(lab, kill_wall, victim)
                    detect = (decided - kill_wall) if decided is not None else None
                    row = {
                        "trial": trial,
                        "victim": victim,
                        "leader": was_leader,
                        "appliance": name,
                        "new_primary": home,
                        "rto_s": round(at - kill_at, 3),
                        "detect_s": round(detect, 3) if detect is not None else None,
                        "restart_s": round(at - kill_at - detect, 3) if detect else None,
                        "load_1m": (load_average() or (0.0,))[0],
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                if trial + 1 < trials:  # the last victim stays off: the lab goes down next
                    lab.restart(victim)
            duration = time.monotonic() - ready_at
        finally:
            checker.stop()
        violations = [(v.kind, v.message) for v in checker.violations]
        return {
            "rows": rows,
            "double_run_violations": sum(1 for k, _ in violations if k == "double-run"),
            "counter_violations": sum(1 for k, _ in violations if k == "counter"),
            "violations": violations[:20],
            "checker": {"passes": checker.passes, "max_pass_s": round(checker.max_pass_s, 3)},
            "trial_phase_s": round(duration, 1),
            "total_s": round(time.monotonic() - t_begin, 1),
        }
    finally:
        lab.down(keep_logs=keep_logs)


def plot(doc: dict[str, Any], path: Path) -> None:
    """Each trial's RTO as detection + restart, leader kills marked; the CDF beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"]["trials"] if r["detect_s"] is not None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    xs = range(len(rows))
    detect = [r["detect_s"] for r in rows]
    restart = [r["restart_s"] for r in rows]
    left.bar(xs, detect, label="detection (kill -> leader's decision)", color="#4c72b0")
    left.bar(xs, restart, bottom=detect, label="restart (decision -> running)", color="#dd8452")
    for i, r in enumerate(rows):
        if r["leader"]:
            left.annotate("L", (i, r["rto_s"]), ha="center", va="bottom", fontsize=7)
    left.axhline(10.0, color="grey", linestyle="--", linewidth=1)
    left.set_xlabel("failover (L: the Raft leader's rack was cut)")
    left.set_ylabel("seconds")
    left.legend(loc="upper left", fontsize=8)
    rto = sorted(r["rto_s"] for r in doc["results"]["trials"])
    right.step(rto, [(i + 1) / len(rto) for i in range(len(rto))], where="post")
    right.axvline(10.0, color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("RTO, seconds (goal: p99 at most 10 s)")
    right.set_ylabel("fraction of failovers")
    p = doc["params"]
    fig.suptitle(
        f"failover: {len(rto)} power cuts, {p['racks']} racks, link {p['link']},"
        f" lease {p['lease_s']} s + margin {p['margin_s']} s ({doc['date'][:10]})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    import os

    args = _parse_args()
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.plot or args.replot.with_suffix(".png"))
        return 0
    if os.geteuid() != 0:
        print("bench/failover.py needs root (lab namespaces, libvirt)", file=sys.stderr)
        return 2
    trials = args.trials or (1 if args.quick else 50)
    seed = args.seed if args.seed is not None else int(time.time())
    out = run(trials, seed, args.keep_logs)
    rows = out["rows"]
    rto = [r["rto_s"] for r in rows]
    detect = [r["detect_s"] for r in rows if r["detect_s"] is not None]
    restart = [r["restart_s"] for r in rows if r["restart_s"] is not None]
    leader_rto = [r["rto_s"] for r in rows if r["leader"]]
    other_rto = [r["rto_s"] for r in rows if not r["leader"]]
    results = {
        "rto_s": distribution(rto),
        "detect_s": distribution(detect) if detect else None,
        "restart_s": distribution(restart) if restart else None,
        "rto_leader_killed_s": distribution(leader_rto) if leader_rto else None,
        "rto_other_killed_s": distribution(other_rto) if other_rto else None,
        "double_run_violations": out["double_run_violations"],
        "counter_violations": out["counter_violations"],
        "violations": out["violations"],
        "checker": out["checker"],
        "trials": rows,
        "total_s": out["total_s"],
    }
    headline = {
        "rto_p50_s": results["rto_s"]["p50"],
        "rto_p99_s": results["rto_s"]["p99"],
        "rto_max_s": results["rto_s"]["max"],
        "detect_p99_s": results["detect_s"]["p99"] if detect else None,
        "double_run_violations": out["double_run_violations"],
        "trials": len(rows),
    }
    assert set(headline) == set(HEADLINE_KEYS["failover"])
    from meshcloud.config import TimersConfig

    t = TimersConfig()
    params = {
        "racks": RACKS,
        "link": LINK,
        "appliances": len(APPS),
        "replicas": REPLICAS,
        "trials": trials,
        "seed": seed,
        "renew_s": t.renew_s,
        "lease_s": t.lease_s,
        "margin_s": t.margin_s,
        "pause_ahead_s": t.pause_ahead_s,
        "raft_timeouts_s": [t.raft_min_timeout_s, t.raft_max_timeout_s],
        "checker_period_s": 0.1,
    }
    path = write_result("failover", args, params=params, results=results, headline=headline)
    if args.plot is not None:
        plot(json.loads(path.read_text()), args.plot)
    print_table(
        f"failover: {len(rows)} kills on {RACKS} racks, link {LINK}",
        [
            ("RTO (kill -> running)", fmt_dist(results["rto_s"], "s")),
            ("detection", fmt_dist(results["detect_s"], "s") if detect else "-"),
            ("restart", fmt_dist(results["restart_s"], "s") if restart else "-"),
            ("leader killed", fmt_dist(results["rto_leader_killed_s"], "s") if leader_rto else "-"),
            ("other killed", fmt_dist(results["rto_other_killed_s"], "s") if other_rto else "-"),
            ("double runs", str(out["double_run_violations"])),
            ("counter violations", str(out["counter_violations"])),
            ("total time", f"{out['total_s']} s"),
            ("written", str(path)),
        ],
    )
    return 0 if out["double_run_violations"] == 0 and out["counter_violations"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
