"""Smoke test of the private-embedding utility benchmark, so that its code cannot rot.

Runs ``python -m benchmarks.embed_utility --quick`` (3 training epochs, one noise draw per ε) in a
subprocess, writing its JSON and plot to a temporary directory, and checks the JSON's shape and
the properties the benchmark exists to show: σ follows the shipped analytic Gaussian, the probe
works on clean embeddings and falls towards chance as ε shrinks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mmshield.privacy.embed import gaussian_sigma

EPSILONS = ["0.5", "1", "2", "4", "8", "16"]


@pytest.mark.slow
def test_embed_utility_benchmark_runs_and_writes_expected_json(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "embed_utility.json"
    _, payload = run_benchmark("embed_utility", out)

    for key in ("cpu", "cores", "torch"):
        assert key in payload["machine"]
    assert payload["benchmark"] == "embed_utility" and payload["quick"] is True
    assert payload["targets"] == {}  # the issue names no numeric target
    assert payload["split"] == {"public": 2000, "device": 2000, "test": 1000}
    assert Path(payload["plot"]) == out.with_suffix(".png") and Path(payload["plot"]).exists()

    settings = payload["settings"]
    delta, clip = settings["delta"], settings["clip_norm"]
    dim = payload["encoder"]["embed_dim"]
    assert 0.5 < payload["encoder"]["head_accuracy_test"] <= 1.0
    sigmas = [payload["noise"][e]["sigma"] for e in EPSILONS]
    assert sigmas == sorted(sigmas, reverse=True)
    for e in EPSILONS:
        n = payload["noise"][e]
        assert n["sigma"] == pytest.approx(gaussian_sigma(float(e), delta, clip))
        assert n["snr"] == pytest.approx(clip / (n["sigma"] * math.sqrt(dim)))

    for variant in ("shipped", "centred"):
        res = payload["results"][variant]
        assert set(res) == {"inf", *EPSILONS}
        assert res["inf"]["clean_test"] > 0.6  # the probe works without noise
        for e in EPSILONS:
            for key in ("private_test", "clean_test", "oracle_private_test"):
                assert 0.0 <= res[e][key]["mean"] <= 1.0 and len(res[e][key]["values"]) == 1
        # At ε = 0.5 (SNR < 0.01) both-sides-private accuracy is near chance (0.1); with less
        # noise the probe recovers the classes on clean test embeddings.
        assert res["0.5"]["private_test"]["mean"] < 0.2
        assert res["16"]["clean_test"]["mean"] > res["0.5"]["clean_test"]["mean"] + 0.3
        assert res["16"]["private_test"]["mean"] > res["0.5"]["private_test"]["mean"]
