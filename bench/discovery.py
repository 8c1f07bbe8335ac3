"""Discovery benchmark: time for N racks to form one cluster, and for a late rack to join.

Each trial brings up a lab of ``racks`` racks on a shaped link (every rack
receives with the given delay and loss), starts every daemon at once, and
measures from the moment the last daemon was started until every rack
answers from one cluster whose map holds all of them (formation). Then it
adds one more rack and measures from its daemon's start until every rack,
the new one included, has it in the map (join).

Probing goes through the API from the lab's observer. Each rack is polled
on its own (one thread per rack, every ``POLL_S``), and a rack counts from
the moment its first answer holding the whole map *arrived* at the
observer; the figure is the latest of these, once every rack has answered
so and all name the same cluster. So each figure includes that rack's
probe: the link delay, the poll interval, and a retransmission when the
1 % loss hits the probe (a lost SYN costs a second). Polling the racks in
lockstep instead (one round asks all racks and waits for the slowest)
added a lost probe packet on any rack to every rack's time.

Run as root: ``python bench/discovery.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import distribution, fmt_dist, parse_args, print_table, write_result

from meshcloud.lab.api import ApiError, LabApi
from meshcloud.lab.lab import Lab
from meshcloud.lab.wait import wait_for

LINK = "delay=50ms loss=1%"
POLL_S = 0.05
TIMEOUT_S = 120.0


def first_full_map(api: LabApi, names: list[str], since: float) -> float:
    """Seconds from ``since`` until every rack of ``names`` answered with all of them."""
    seen: dict[str, tuple[float, str]] = {}
    stop = threading.Event()

    def poll(rack: str) -> None:
        while not stop.is_set():
            try:
                doc = api.cluster(rack)
            except ApiError:
                doc = None
            if doc is not None and sorted(doc["racks"]) == sorted(names):
                seen[rack] = (time.monotonic(), doc["cluster_id"])
                return
            stop.wait(POLL_S)

    threads = [threading.Thread(target=poll, args=(r,), daemon=True) for r in names]
    for t in threads:
        t.start()
    deadline = time.monotonic() + TIMEOUT_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    missing = sorted(set(names) - set(seen))
    if missing:
        raise TimeoutError(f"racks {', '.join(missing)} never showed the whole map")
    clusters = {cluster for _, cluster in seen.values()}
    if len(clusters) != 1:
        raise AssertionError(f"the racks answered from {len(clusters)} clusters: {clusters}")
    return max(at for at, _ in seen.values()) - since


def one_trial(index: int, racks: int) -> tuple[float, float]:
    lab = Lab(f"bdisc{index}")
    if lab.exists():
        lab.down()
    try:
        lab.up(racks=racks, link=LINK, start_daemons=False, bootstrap_expect=racks)
        api = LabApi(lab)
        names = lab.racks()
        for rack in names:
            lab.start_daemon(rack, wait=False)
        last_start = time.monotonic()
        formed_s = first_full_map(api, names, last_start)
        wait_for(lambda: api.one_cluster(names), TIMEOUT_S, "one cluster", interval=POLL_S)
        late = lab.add_rack(start_daemon=False)
        start = time.monotonic()
        lab.start_daemon(late, wait=False)
        joined_s = first_full_map(api, [*names, late], start)
        return formed_s, joined_s
    finally:
        lab.down()


def main() -> int:
    args = parse_args("discovery", __doc__.splitlines()[0])
    racks = 5
    trials = 3 if args.quick else 20
    formed, joined = [], []
    for i in range(trials):
        f, j = one_trial(i, racks)
        formed.append(f)
        joined.append(j)
        print(f"trial {i + 1}/{trials}: formed in {f:.2f} s, late rack joined in {j:.2f} s")
    form, join = distribution(formed), distribution(joined)
    write_result(
        "discovery",
        args,
        params={"racks": racks, "trials": trials, "link": LINK, "poll_s": POLL_S},
        results={
            "form_s": form,
            "join_s": join,
            "form_samples_s": formed,
            "join_samples_s": joined,
        },
        headline={"form_p99_s": form["p99"], "join_p99_s": join["p99"]},
    )
    print_table(
        f"discovery: {racks} racks, link {LINK}, {trials} trials",
        [("formation (s)", fmt_dist(form)), ("late join (s)", fmt_dist(join))],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
