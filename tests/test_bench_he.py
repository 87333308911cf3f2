"""Smoke test of the encrypted-aggregation benchmark, so that its code cannot rot.

Runs ``python -m benchmarks.he --quick`` (10 clients x 100,000 parameters) in a subprocess,
writing its JSON to a temporary directory, and checks the JSON's shape and what the benchmark
exists to show: both systems ran on the same updates, mmshield's decrypted sum is within 1e-6
relative of the float sum with small ciphertexts, and the targets are reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_he_benchmark_runs_and_writes_expected_json(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    out = tmp_path / "results" / "he.json"
    stdout, payload = run_benchmark("he", out, timeout=600)

    for key in ("cpu", "cores", "torch"):
        assert key in payload["machine"]
    assert payload["benchmark"] == "he" and payload["quick"] is True
    assert (payload["n_clients"], payload["d"]) == (10, 100_000)
    targets = payload["targets"]
    assert {"bytes_per_param", "encryption_speedup", "relative_error"} <= set(targets)
    for t in targets.values():
        assert {"value", "goal", "op", "unit", "met"} <= set(t)
    assert targets["bytes_per_param"]["goal"] == 10 and targets["encryption_speedup"]["goal"] == 5
    if payload["inference"] is None:
        assert "inference_per_query_ms" not in targets
    else:
        assert targets["inference_per_query_ms"]["goal"] == 100

    peer, mine = payload["systems"]["tenseal_ckks"], payload["systems"]["mmshield"]
    for r in (peer, mine):
        assert len(r["encrypt_s"]) == len(r["server_add_s"]) == 10
        assert r["encrypt_s_median"] > 0 and r["decrypt_s"] > 0
        assert r["relative_l2_error"] <= 1e-6
    assert 78 < peer["bytes_per_param"] < 90  # the ANCHORS recipe: about 81 B/param
    # 100k parameters leave the last ciphertext part-empty; 1M reach the asymptotic figure.
    assert mine["bytes_per_param"] <= 1.05 * mine["params"]["bytes_per_param_asymptotic"] <= 10.5
    assert mine["params"]["bytes_per_param_asymptotic"] <= 10
    assert mine["max_abs_error"] <= mine["error_bound_max_abs"]
    assert mine["clipped_values"] == 0
    assert payload["ratios"]["encrypt_and_serialise_speedup"] > 1
    assert "target encryption_speedup" in stdout
