"""Plots and figure tables for docs/benchmarks.md, from the results JSON in bench/results/.

    python bench/plot.py            # draw docs/benchmarks/NAME.png for every result found
    python bench/plot.py --doc      # also rewrite each benchmark's figures in docs/benchmarks.md
    python bench/plot.py --results DIR --only failover

Each benchmark's figures in docs/benchmarks.md sit between the markers
``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``; ``--doc`` replaces
only what is between them (the headline figures, the goals, the run's date,
machine and load), so the prose around them stays as written. failover.py
draws its own plot (``--replot``); the others get a generic one: each
distribution in the results (p50, p95, p99, max) as a group of bars.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "benchmarks.md"
PLOTS = ROOT / "docs" / "benchmarks"
ORDER = (
    "failover",
    "replication",
    "replication_lag",
    "discovery",
    "placement",
    "api",
    "console",
    "flash",
)
# Goals per headline figure: (operator, value). Where a part's doc states one, it is that one.
GOALS: dict[str, dict[str, tuple[str, float]]] = {
    "failover": {"rto_p99_s": ("<=", 10.0), "double_run_violations": ("==", 0)},
    "replication": {
        "speedup_vs_rsync_inplace_1pct": (">=", 100.0),
        "source_read_over_changed_1pct": ("<=", 2.0),
    },
    "replication_lag": {
        "lag_p99_s_lan": ("<=", 5.0),
        "lag_p99_s_shaped": ("<=", 30.0),
        "link_utilisation_shaped": (">=", 0.8),
    },
    "discovery": {"form_p99_s": ("<=", 5.0), "join_p99_s": ("<=", 5.0)},
    "placement": {"place_ms_1000x100": ("<=", 100.0), "moves_over_lower_bound": ("<=", 1.0)},
    "api": {
        "cluster_get_rps": (">=", 1000.0),
        "cluster_get_p99_ms": ("<=", 50.0),
        "sse_clients": (">=", 100),
    },
    "console": {"first_load_bytes": ("<=", 153600), "first_render_s_throttled": ("<=", 3.0)},
    "flash": {"write_speedup_vs_dd": (">=", 1.0)},
}


def met(op: str, value: float, goal: float) -> bool:
    return {"<=": value <= goal, ">=": value >= goal, "==": value == goal}[op]


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def figures_block(doc: Mapping[str, Any], plot: Path | None) -> str:
    """The Markdown between a benchmark's markers: headline, goals, run details."""
    name = doc["benchmark"]
    goals = GOALS.get(name, {})
    rows = ["| figure | value | goal | met |", "|---|---|---|---|"]
    for key, value in doc.get("headline", {}).items():
        goal = goals.get(key)
        if goal is None or not isinstance(value, int | float):
            rows.append(f"| `{key}` | {fmt(value)} | | |")
        else:
            ok = "yes" if met(goal[0], value, goal[1]) else "**no**"
            rows.append(f"| `{key}` | {fmt(value)} | {goal[0]} {fmt(goal[1])} | {ok} |")
    machine = doc.get("machine", {})
    load = machine.get("load_average_at_end") or doc.get("params", {}).get("load_average_at_start")
    load_text = " / ".join(f"{x:.1f}" for x in load) if load else "not recorded"
    run = "quick run (`--quick`)" if doc.get("quick") else "full run"
    hardware = ", ".join(
        str(x)
        for x in (
            f"{machine.get('cores', '?')} cores",
            machine.get("cpu"),
            f"{machine['memory_gib']} GiB" if machine.get("memory_gib") else None,
            f"kernel {machine.get('kernel', '?')}",
            f"Python {machine.get('python', '?')}",
        )
        if x
    )
    params = ", ".join(f"{k}={v}" for k, v in doc.get("params", {}).items() if k != "machine")
    lines = [
        *rows,
        "",
        f"Measured {doc.get('date') or 'at an unrecorded date'}, {run}, on {hardware};"
        f" load average (1/5/15 min) at the end: {load_text}. Parameters: {params}.",
    ]
    if plot is not None:
        lines += ["", f"![{name}](benchmarks/{plot.name})"]
    return "\n".join(lines)


def rewrite_doc(text: str, name: str, block: str) -> str:
    """Replace what stands between a benchmark's markers; the markers must be there."""
    start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"docs/benchmarks.md has no {start} ... {end} section")
    return pattern.sub(lambda _: f"{start}\n{block}\n{end}", text)


def distributions(results: Mapping[str, Any], prefix: str = "") -> dict[str, dict[str, float]]:
    """Every {p50, p95, p99, max} found in the results, by dotted path."""
    out: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        if isinstance(value, Mapping):
            if {"p50", "p99", "max"} <= set(value):
                out[prefix + key] = {
                    q: value[q] for q in ("p50", "p95", "p99", "max") if q in value
                }
            else:
                out.update(distributions(value, f"{prefix}{key}."))
    return out


def unit_of(path: str) -> str:
    for suffix, unit in (("_ms", "ms"), ("_s", "s"), ("bytes", "bytes"), ("seconds", "s")):
        if path.endswith(suffix) or path.split(".")[-1].startswith(suffix.strip("_")):
            return unit
    return ""


def plot_generic(doc: Mapping[str, Any], path: Path) -> None:
    """Each distribution as a group of bars (p50, p95, p99, max), one panel per unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists = distributions(doc["results"])
    by_unit: dict[str, dict[str, dict[str, float]]] = {}
    for key, dist in dists.items():
        by_unit.setdefault(unit_of(key), {})[key] = dist
    units = sorted(by_unit) or [""]
    fig, axes = plt.subplots(len(units), 1, figsize=(9, 2.2 + 0.45 * max(len(dists), 1)))
    axes = [axes] if len(units) == 1 else list(axes)
    hatches = ("", "//", "..", "xx")
    for ax, unit in zip(axes, units, strict=True):
        items = by_unit.get(unit, {})
        names = list(items)
        for j, q in enumerate(("p50", "p95", "p99", "max")):
            ys = [i + (j - 1.5) * 0.2 for i in range(len(names))]
            xs = [items[n].get(q, 0) for n in names]
            ax.barh(ys, xs, height=0.2, color=str(0.15 + 0.2 * j), hatch=hatches[j], label=q)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit or "value")
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(fontsize=8, ncols=4, loc="lower right")
    run = "quick" if doc.get("quick") else "full"
    axes[0].set_title(f"{doc['benchmark']} ({run} run, {str(doc.get('date') or '')[:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_replication(doc: Mapping[str, Any], path: Path) -> None:
    """Seconds per cycle at each changed fraction: meshcloud against both rsyncs (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = doc["results"]["per_fraction"]
    fractions = list(per)
    tools = [
        ("meshcloud", "0.1", ""),
        ("rsync_inplace", "0.5", "//"),
        ("rsync_default", "0.8", ".."),
    ]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for j, (tool, colour, hatch) in enumerate(tools):
        xs = [i + (j - 1) * 0.27 for i in range(len(fractions))]
        ys = [per[f][tool]["seconds"]["p50"] for f in fractions]
        ax.bar(xs, ys, width=0.27, color=colour, hatch=hatch, edgecolor="black", label=tool)
    ax.set_yscale("log")
    ax.set_xticks(range(len(fractions)), [f"{f} changed" for f in fractions])
    ax.set_ylabel("seconds per cycle (p50, log)")
    disk = doc.get("params", {}).get("disk_gib")
    ax.set_title(f"replication of a {disk} GiB disk ({str(doc.get('date') or '')[:10]})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw(doc: Mapping[str, Any], result: Path, out: Path) -> Path:
    name = doc["benchmark"]
    png = out / f"{name}.png"
    out.mkdir(parents=True, exist_ok=True)
    if name == "failover":
        argv = [
            sys.executable,
            str(HERE / "failover.py"),
            "--replot",
            str(result),
            "--plot",
            str(png),
        ]
        subprocess.run(argv, check=True)
    elif name == "replication":
        plot_replication(doc, png)
    else:
        plot_generic(doc, png)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=PLOTS, help="where the PNGs go")
    parser.add_argument(
        "--doc", action="store_true", help="rewrite the figures in docs/benchmarks.md"
    )
    parser.add_argument("--only", action="append", choices=ORDER, help="only this benchmark")
    args = parser.parse_args(argv)
    text = DOC.read_text(encoding="utf-8") if args.doc else ""
    for name in args.only or ORDER:
        result = args.results / f"{name}.json"
        if not result.exists():
            print(f"{name}: no {result}, skipped")
            continue
        doc = json.loads(result.read_text(encoding="utf-8"))
        png = draw(doc, result, args.out)
        print(f"{name}: {png}")
        if args.doc:
            text = rewrite_doc(text, name, figures_block(doc, png))
    if args.doc:
        DOC.write_text(text, encoding="utf-8")
        print(f"rewrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
