"""Smoke test of the privacy-utility benchmark, so that its code cannot rot.

Runs ``python -m benchmarks.privacy_utility --quick`` (2 rounds, ε ∈ {8, ∞}, both levels) in a
subprocess, writing its JSON and plot to a temporary directory, and checks the JSON's shape: the
target, the machine, accuracies in [0, 1], the calibrated noise present exactly where privacy is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.mark.slow
def test_privacy_utility_benchmark_runs_and_writes_expected_json(
    tmp_path: Path, run_benchmark: Callable[..., Any]
) -> None:
    out = tmp_path / "privacy_utility.json"
    _, payload = run_benchmark("privacy_utility", out, timeout=600)

    for key in ("cpu", "cores", "torch"):
        assert key in payload["machine"]
    assert payload["benchmark"] == "privacy_utility" and payload["quick"] is True
    assert Path(payload["plot"]) == out.with_suffix(".png") and Path(payload["plot"]).exists()

    gap = payload["targets"]["sample_level_gap_at_eps8_points"]
    assert set(gap) >= {"value", "goal", "op", "unit"}
    assert gap["goal"] == 1.0 and gap["op"] == "<=" and gap["unit"] == "points"

    results = payload["results"]
    assert set(results) == {"sample_level", "client_level"}
    for level, cells in results.items():
        assert set(cells) == {"8", "inf"}
        for k, cell in cells.items():
            assert cell["level"] == level
            assert 0.0 <= cell["final_accuracy"] <= 1.0
            assert 0.0 <= cell["last3_accuracy"] <= 1.0
            assert all(0.0 <= acc <= 1.0 for _, acc in cell["curve"])
            assert cell["wall_seconds"] > 0
            if k == "inf":  # the same config without privacy
                assert cell["noise_multiplier"] is None and cell["planned_epsilon"] is None
                assert "privacy" not in cell["config"]
            else:
                assert cell["noise_multiplier"] > 0
                assert cell["planned_epsilon"] == pytest.approx(8.0, rel=1e-2)
                assert set(cell["config"]["privacy"]) >= {level}
        private, public = dict(cells["8"]["config"]), dict(cells["inf"]["config"])
        private.pop("privacy")
        private.pop("name"), public.pop("name")
        assert private == public
    final = results["sample_level"]
    expected = 100 * (final["inf"]["final_accuracy"] - final["8"]["final_accuracy"])
    assert gap["value"] == pytest.approx(expected)
    client = results["client_level"]["8"]["config"]
    assert client["partition"]["clients"] >= 1000
