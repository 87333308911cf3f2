"""Smoke test of the DP-SGD benchmark, so that its code cannot rot.

Runs ``python -m benchmarks.dpsgd --quick`` (2 timed rounds at 1 thread, one clipping norm
checked) in a subprocess, writing its JSON to a temporary file, and checks the JSON's shape and
that mmshield's clipped gradient sums (book-keeping and per-sample) equal Opacus's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

METHODS = {
    "plain",
    "mmshield",
    "mmshield_per_sample",
    "opacus_hooks",
    "opacus_ghost",
    "mmshield_noise_only",
}
OPACUS = {"opacus_hooks", "opacus_ghost"}


@pytest.mark.slow
def test_dpsgd_benchmark_runs_and_writes_expected_json(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    pytest.importorskip("opacus")
    out = tmp_path / "dpsgd.json"
    _, payload = run_benchmark("dpsgd", out)

    for key in ("cpu", "cores", "torch"):
        assert key in payload["machine"]
    assert payload["benchmark"] == "dpsgd" and payload["quick"] is True
    assert payload["settings"]["batch"] == 256
    assert len(payload["load_average_start"]) == 3 and len(payload["load_average_end"]) == 3
    assert payload["profile"] is None

    workloads = payload["workloads"]
    assert set(workloads) == {"cnn", "av-digits", "av-digits-attention"}
    assert workloads["cnn"]["parameters"] < workloads["av-digits"]["parameters"]
    assert workloads["cnn"]["opacus"] and not workloads["av-digits-attention"]["opacus"]

    # Correctness: clipped sums equal Opacus's (hooks and ghost clipping) within tolerance.
    assert payload["correctness_passed"] is True
    assert payload["noise_like_bit_identical"] is True
    for key, corr in payload["correctness"].items():
        assert corr["passed"] is True
        for case in corr["cases"]:
            assert 0.0 < case["clipped_fraction"] < 1.0  # clipping is exercised
            assert case["mmshield_vs_per_sample"]["passed"]
            if workloads[key]["opacus"]:
                for mode in ("hooks", "ghost"):
                    for method in ("mmshield", "per_sample"):
                        cmp = case[f"{method}_vs_opacus_{mode}"]
                        assert cmp["passed"] and cmp["max_diff_over_1_plus_abs"] <= 1e-4

    timings = payload["timings"]
    assert set(timings) == {"1t"}
    for key, block in timings["1t"].items():
        methods = block["methods"]
        expected = METHODS if workloads[key]["opacus"] else METHODS - OPACUS
        assert set(methods) == expected
        assert methods["plain"]["ratio"] == pytest.approx(1.0)
        for m in methods.values():
            assert m["median_ms"] > 0 and len(m["samples_ms"]) == payload["rounds"]
        assert len(block["foreign_cores_attempts"]) == 1

    sim = payload["simulator"]
    assert sim["threads"] == 1 and sim["records_per_step"] == sim["clients"] * sim["batch"]
    assert set(sim["methods"]) == {
        "plain",
        "mmshield",
        "mmshield_per_sample",
        "mmshield_noise_only",
    }
    assert sim["bookkeeping_vs_per_sample_at_sigma_0"]["passed"] is True
    assert len(sim["foreign_cores_attempts"]) == 1

    targets = payload["targets"]
    assert set(targets) == {f"{k}_mmshield_over_plain" for k in workloads}
    for t in targets.values():
        assert set(t) >= {"value", "goal", "op", "unit"}
        assert t["goal"] == 1.3 and t["op"] == "<=" and t["value"] > 0
