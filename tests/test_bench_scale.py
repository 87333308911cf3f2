"""Smoke test of the scale benchmark, so that its code cannot rot.

Runs ``python -m benchmarks.scale --quick --mmshield-only`` (2,000 clients, 100 and 1,000 per
round, 2 rounds, Flower skipped) in a subprocess, writing its JSON to a temporary file, and checks
the JSON's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_scale_benchmark_runs_and_writes_expected_json(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    out = tmp_path / "scale.json"
    _, payload = run_benchmark("scale", out, "--mmshield-only")

    for key in ("cpu", "cores", "torch", "flwr"):
        assert key in payload["machine"]
    assert payload["benchmark"] == "scale"
    assert payload["quick"] is True and payload["flower"] is False
    assert payload["failures"] == []
    assert len(payload["load_average_start"]) == 3
    # Flower-dependent and 10,000-client targets only appear in runs that measured them.
    assert payload["targets"] == {}
    assert payload["comparisons"] == [] and payload["flower_full_population"] is None

    workload = payload["workload"]
    assert workload["population"] == 2_000 and workload["rounds"] == 2
    assert workload["records_per_client"]["min"] >= 20
    assert workload["records_per_client"]["max"] <= 50
    assert workload["parameters"] == 60 * 64 + 64 + 64 * 10 + 10

    runs = payload["mmshield"]
    seen = {(r["config"]["clients_per_round"], r["config"]["cohort"]) for r in runs}
    assert seen == {(100, None), (1_000, 100), (1_000, None)}
    for r in runs:
        cpr = r["config"]["clients_per_round"]
        assert r["clients_trained"] == [cpr, cpr]
        assert len(r["round_seconds"]) == 2 and r["wall_seconds"] > 0
        # Steady figures leave out the test-set evaluation after the last round.
        assert r["evaluation_seconds"][0] == 0.0 and r["evaluation_seconds"][1] > 0
        assert r["training_round_seconds"][1] < r["round_seconds"][1]
        assert r["cohort_size"] == (r["config"]["cohort"] or cpr)
        assert r["updates_per_second_steady"] > 0 and r["updates_per_second_whole_run"] > 0
        assert r["peak_rss_mb"] >= r["peak_rss_before_simulate_mb"] > 0
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert len(r["attempts"]) == 1 and "foreign_cores" in r
        assert "_state" not in r

    profile = payload["profile"]
    assert profile["clients_per_round"] == 1_000 and profile["torch_threads"] == 1
    assert profile["not_wrapped"] == []
    last = profile["rounds"][-1]
    parts = last["parts_seconds"]
    assert sum(parts.values()) == pytest.approx(last["round_seconds"], rel=1e-6)
    assert parts["vmapped grad steps (forward + backward)"] > 0
    assert last["calls"]["batch schedules (vectorised, per cohort)"] >= 1
    assert profile["cprofile_top"] and profile["cprofile_top"][0]["tottime"] > 0
