"""Smoke test of the simulator benchmark, so that its code cannot rot.

Runs ``python -m benchmarks.simulator --quick --mmshield-only`` (Flower skipped, one round of the
demo workload) in a subprocess, writing its JSON to a temporary file, and checks the JSON's shape.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_simulator_benchmark_runs_and_writes_expected_json(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    out = tmp_path / "simulator.json"
    _, payload = run_benchmark("simulator", out, "--mmshield-only", "--demo-rounds", "1")

    machine = payload["machine"]
    for key in ("cpu", "cores", "torch", "flwr"):
        assert key in machine
    assert payload["quick"] is True and payload["flower"] is False
    assert payload["protocol"]["retries"] == 0

    targets = payload["targets"]
    frac = targets["local_training_fraction_of_peak"]
    assert set(frac) >= {"value", "goal", "op", "unit"}
    assert frac["op"] in (">=", "<=") and frac["unit"] == "fraction"
    assert 0.0 < frac["value"] < 1.5
    # Flower-dependent targets are only reported when Flower ran.
    assert "overhead_speedup" not in targets

    assert payload["matmul_peak_gflops"] > 0
    for name, rounds in (("overhead", 3), ("demo", 1)):
        entry = payload["workloads"][name]
        mm = entry["mmshield"]
        assert mm["wall_seconds"] > 0
        assert len(mm["round_seconds"]) == rounds
        assert 0.0 <= mm["accuracy"] <= 1.0
        assert entry["workload"]["rounds"] == rounds
        assert len(mm["attempts"]) == 1 and "foreign_cores" in mm
        assert len(mm["fingerprint"]) == 16
    assert len(payload["workloads"]["overhead"]["mmshield"]["warm_wall_seconds"]) == 2
    overhead = payload["workloads"]["overhead"]["workload"]
    assert overhead["clients"] == 100 and overhead["clients_per_round"] == 100
    assert overhead["records_per_client"] == {"min": 50, "max": 50, "mean": 50.0}
    assert overhead["parameters"] == 64 * 64 + 64 + 64 * 10 + 10
    demo = payload["workloads"]["demo"]["workload"]
    assert demo["clients"] == 20 and demo["modalities"] == ["image", "audio", "text"]


@pytest.mark.slow
def test_async_benchmark_runs_and_writes_expected_json(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    out = tmp_path / "async.json"
    stdout, payload = run_benchmark("async", out)
    assert "sooner in simulated time" in stdout
    assert payload["quick"] is True and "machine" in payload
    speedup = payload["targets"]["fedbuff_time_to_accuracy_speedup"]
    assert speedup["op"] == ">=" and speedup["unit"] == "x"
    for name in ("fedavg", "fedbuff"):
        r = payload["results"][name]
        assert len(r["curve"]["seconds"]) == len(r["curve"]["accuracy"]) > 0
        assert r["curve"]["seconds"] == sorted(r["curve"]["seconds"])
    assert 0.0 < payload["results"]["goal_accuracy"] < 1.0
    assert Path(payload["plot"]).exists()
