"""bench/plot.py: docs/benchmarks.md has a figures section per benchmark, rewritten in place."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def load_plot():
    spec = importlib.util.spec_from_file_location("bench_plot", ROOT / "bench" / "plot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot = load_plot()


def test_every_benchmark_has_a_section_with_markers() -> None:
    benches = {p.stem for p in (ROOT / "bench").glob("[!_]*.py")} - {"plot"}
    assert set(plot.ORDER) == benches
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for name in plot.ORDER:
        assert f"<!-- figures:{name} -->" in text and f"<!-- /figures:{name} -->" in text, name
        assert (ROOT / "docs" / "benchmarks" / f"{name}.png").exists(), name


DOC = {
    "benchmark": "failover",
    "quick": True,
    "date": "2026-11-22T08:18:05+00:00",
    "machine": {
        "cores": 2,
        "kernel": "6.1",
        "python": "3.11.7",
        "load_average_at_end": [8.7, 8.0, 8.9],
    },
    "params": {"racks": 5},
    "results": {"rto_s": {"p50": 6.2, "p95": 12.6, "p99": 13.1, "max": 13.2}},
    "headline": {"rto_p99_s": 31.5, "double_run_violations": 0, "trials": 84},
}


def test_the_figures_block_says_when_where_and_whether_goals_are_met() -> None:
    block = plot.figures_block(DOC, Path("failover.png"))
    assert "| `rto_p99_s` | 31.5 | <= 10 | **no** |" in block
    assert "| `double_run_violations` | 0 | == 0 | yes |" in block
    assert "2026-11-22T08:18:05+00:00, quick run" in block and "8.7 / 8.0 / 8.9" in block
    assert "![failover](benchmarks/failover.png)" in block


def test_rewrite_replaces_only_between_the_markers() -> None:
    text = "intro\n<!-- figures:failover -->\nold\n<!-- /figures:failover -->\nafter\n"
    new = plot.rewrite_doc(text, "failover", "NEW")
    assert new == "intro\n<!-- figures:failover -->\nNEW\n<!-- /figures:failover -->\nafter\n"
    with pytest.raises(SystemExit, match="figures:api"):
        plot.rewrite_doc(text, "api", "NEW")


def test_distributions_are_found_at_any_depth() -> None:
    results = {
        "a_s": {"p50": 1, "p99": 2, "max": 3},
        "per": {"x": {"b_ms": {"p50": 1, "p99": 1, "max": 1}}},
    }
    assert set(plot.distributions(results)) == {"a_s", "per.x.b_ms"}
