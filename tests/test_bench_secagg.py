"""Smoke test of the secure-aggregation benchmark, so that its code cannot rot.

Runs ``python -m benchmarks.secagg --quick`` (20 clients x 10,000 values, Flower's simulation
engine skipped, the large run at 100 x 20,000) in a subprocess, writing its JSON to a temporary
directory, and checks the JSON's shape and what the benchmark exists to show: mmshield's unmasked
sum equals the plaintext sum, Flower's primitives ran on the same workload, and the targets are
reported (``null`` where not measured).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mmshield.crypto.graph import choose_parameters


@pytest.mark.slow
def test_secagg_benchmark_runs_and_writes_expected_json(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    out = tmp_path / "results" / "secagg.json"
    _, payload = run_benchmark("secagg", out)

    for key in ("cpu", "cores", "torch", "flwr"):
        assert key in payload["machine"]
    assert payload["benchmark"] == "secagg" and payload["quick"] is True
    assert payload["failures"] == []
    targets = payload["targets"]
    assert set(targets) == {"av_digits_secagg_overhead", "speedup_vs_flower_secaggplus"}
    for t in targets.values():
        assert {"value", "goal", "op", "unit"} <= set(t)
    overhead = targets["av_digits_secagg_overhead"]
    assert overhead["goal"] == 1.5 and overhead["op"] == "<=" and overhead["value"] > 0
    # Flower's engine is skipped with --quick, so the framework ratio is not measured.
    assert targets["speedup_vs_flower_secaggplus"]["value"] is None
    assert targets["speedup_vs_flower_secaggplus"]["goal"] == 20 and payload["flower_engine"] == []

    n, d = 20, 10_000
    rows = payload["rows"]
    mm = {(r["config"], r["dropout"]): r for r in rows if r["system"] == "mmshield"}
    fl = {(r["config"], r["dropout"]): r for r in rows if r["system"] == "flower-primitives"}
    assert set(mm) == {(c, p) for c in ("secagg+ chosen", "secagg+ 13/7", "secagg complete")
                       for p in (0.0, 0.1)}  # fmt: skip
    # 20 clients cannot meet the 2^-20 bounds at 10% dropout with any graph: reported, not run.
    assert "error" in mm[("secagg+ chosen", 0.1)]
    p = choose_parameters(n, 0.0)
    assert (mm[("secagg+ chosen", 0.0)]["k"], mm[("secagg+ chosen", 0.0)]["t"]) == (p.k, p.t)
    assert (mm[("secagg complete", 0.0)]["k"], mm[("secagg complete", 0.0)]["t"]) == (19, 10)
    for key, r in mm.items():
        if "error" in r:
            continue
        assert (r["n"], r["d"]) == (n, d)
        assert r["dropped"] == round(key[1] * n) and r["included"] == n - r["dropped"]
        # the unmasked sum equals the plaintext sum of the encodings, bit for bit
        assert r["sum_exact"] is True
        assert r["max_abs_error"] <= r["error_bound"]
        assert r["clipped_values"] == 0
        assert 4 * d < r["bytes_up_per_client"] < 4 * d + 4_000  # uint32 words + keys, shares
        assert 0 < r["client_cpu_median_s"] <= r["client_cpu_max_s"]
        assert r["server_cpu_s"] > 0 and r["plain_sum_cpu_s"] >= 0
        assert r["protocol_cpu_s"] >= r["server_cpu_s"]
        assert len(r["repeats"]) >= 1
    assert (("secagg+ 13/7", 0.0) in fl) and (("secagg+ 13/7", 0.1) in fl)
    assert fl[("secagg complete", 0.0)]["num_shares"] == n
    for r in fl.values():
        assert (r["n"], r["d"]) == (n, d)
        assert r["bytes_up_per_client"] > 8 * d  # Flower uploads int64 words
        assert r["max_abs_error_of_mean"] < 1e-2  # its 22-bit quantisation of weight/1000
        assert r["client_cpu_median_s"] > 0 and r["server_cpu_s"] > 0
    assert payload["ratios"]["primitives_over_mmshield_cpu_n20_drop0_13_7"] > 1

    large = payload["large"]
    p = choose_parameters(100, 0.1)
    assert (large["n"], large["d"], large["k"], large["t"]) == (100, 20_000, p.k, p.t)
    assert large["dropped"] == 10 and large["sum_exact"] is True and large["peak_rss_mb"] > 0
    av = payload["av_digits"]
    assert av["clients"] == 10 and av["secagg"]["k"] <= 9
    assert av["accuracy_gap_points"] <= 0.5  # same model up to fixed-point rounding
    assert payload["profile"]["top"] and payload["profile"]["n"] == n
