"""Shared benchmark harness (see /work/shared/BENCHMARKS.md for the contract).

Every ``bench/NAME.py`` does::

    args = parse_args("NAME", "what it measures")
    ... measure ...
    write_result("NAME", args, params=..., results=..., headline=..., baseline=...)
    print_table("NAME: ...", [("label", "value"), ...])

``write_result`` refuses a headline whose keys differ from the table in
BENCHMARKS.md, so that runs stay comparable without reading the code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# The "headline" keys of each benchmark, exactly as BENCHMARKS.md names them.
HEADLINE_KEYS: dict[str, tuple[str, ...]] = {
    "failover": (
        "rto_p50_s",
        "rto_p99_s",
        "rto_max_s",
        "detect_p99_s",
        "double_run_violations",
        "trials",
    ),
    "replication": (
        "speedup_vs_rsync_inplace_1pct",
        "speedup_vs_rsync_default_1pct",
        "source_read_over_changed_1pct",
        "sent_over_changed_1pct",
    ),
    "replication_lag": ("lag_p99_s_lan", "lag_p99_s_shaped", "link_utilisation_shaped"),
    "discovery": ("form_p99_s", "join_p99_s"),
    "placement": ("place_ms_1000x100", "moves_over_lower_bound"),
    "api": ("cluster_get_rps", "cluster_get_p99_ms", "sse_clients"),
    "console": ("first_load_bytes", "first_render_s_throttled"),
    "flash": ("write_speedup_vs_dd", "verify_s"),
}


def parse_args(
    name: str, description: str, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """``--quick`` (a reduced run, under 60 s on 2 cores) and ``--out FILE``."""
    parser = argparse.ArgumentParser(prog=f"bench/{name}.py", description=description)
    parser.add_argument(
        "--quick", action="store_true", help="reduced run that finishes in under 60 s"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help=f"where to write the JSON document (default bench/results/{name}.json)",
    )
    return parser.parse_args(argv)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1024 * 1024), 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} must be between 0 and 100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def distribution(values: Iterable[float], digits: int = 3) -> dict[str, float]:
    """p50, p95, p99 and max (and the count), rounded to ``digits``."""
    vals = list(values)
    return {
        "p50": round(percentile(vals, 50), digits),
        "p95": round(percentile(vals, 95), digits),
        "p99": round(percentile(vals, 99), digits),
        "max": round(max(vals), digits),
        "n": len(vals),
    }


def time_ms(fn: Callable[[], object]) -> tuple[float, object]:
    """Run ``fn`` once; return (milliseconds, its result)."""
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1000.0, result


def time_wall_cpu_ms(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Run ``fn`` once; return (wall ms, this process's CPU ms, its result).

    On a shared, busy machine the CPU time shows what the code costs when the
    wall time is inflated by other processes' load.
    """
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = fn()
    return (time.perf_counter() - wall0) * 1000.0, (time.process_time() - cpu0) * 1000.0, result


def load_average() -> tuple[float, float, float] | None:
    """The 1, 5 and 15 minute load averages, to judge how busy the machine was."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def write_result(
    name: str,
    args: argparse.Namespace,
    *,
    params: Mapping[str, Any],
    results: Mapping[str, Any],
    headline: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
) -> Path:
    """Write the benchmark's JSON document to ``args.out`` and return the path."""
    expected = HEADLINE_KEYS.get(name)
    if expected is not None and set(headline) != set(expected):
        raise ValueError(
            f"headline keys of {name} must be exactly {sorted(expected)},"
            f" not {sorted(headline)} (see BENCHMARKS.md)"
        )
    doc = {
        "benchmark": name,
        "quick": bool(args.quick),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "load_average_at_end": load_average()},
        "params": dict(params),
        "results": dict(results),
        "headline": dict(headline),
        "baseline": dict(baseline or {}),
    }
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(out)
    return out


def print_table(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """A short two-column table for people."""
    width = max((len(label) for label, _ in rows), default=0)
    print(title)
    print("-" * max(len(title), width + 20))
    for label, value in rows:
        print(f"{label.ljust(width)}  {value}")


def fmt_dist(dist: Mapping[str, float], unit: str = "") -> str:
    """``p50 1.2  p95 1.9  p99 2.4  max 3.1 ms``."""
    body = "  ".join(f"{k} {dist[k]:g}" for k in ("p50", "p95", "p99", "max"))
    return f"{body} {unit}".rstrip()
