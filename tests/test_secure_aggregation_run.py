"""Secure aggregation in runs: the protocol's sum drives training; unsound setups are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmshield.api import build_job, run, simulate_job
from mmshield.config import config_from_dict
from mmshield.errors import ConfigError

BASE = {
    "dataset": {"name": "av-digits"},
    "partition": {"clients": 6, "scheme": "iid"},
    "model": {"embed_dim": 8, "fusion": "concat", "fusion_hidden": 0},
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 128, "lr": 0.1},
    "simulation": {"threads": 1},
}


def _config(**extra: object):
    return config_from_dict({**BASE, **extra})


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((pa - pb).detach().abs().max())
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
    )


@pytest.mark.parametrize("protocol", ["secagg+", "secagg"])
def test_secure_sum_trains_the_same_model_as_the_plain_sum(protocol: str) -> None:
    plain = simulate_job(build_job(_config()))
    secure = simulate_job(
        build_job(
            _config(secure_aggregation={"protocol": protocol, "clip_range": 4.0, "dropout": 0.01})
        )
    )
    # Only fixed-point rounding separates them (32-bit sums of 6 clients: ~1e-8 per value).
    assert _max_diff(plain.model, secure.model) < 1e-5
    for rec in secure.history:
        assert rec.secure is not None and rec.secure.included == 6 and rec.secure.dropped == 0
        assert rec.secure.clipped_values == 0
        assert rec.bytes_up == rec.secure.bytes_up
    if protocol == "secagg":
        assert secure.history[0].secure.k == 5  # type: ignore[union-attr]


def test_dropouts_are_recovered_and_the_sum_is_the_survivors() -> None:
    systems = {"dropout": 0.2}
    sa = {"protocol": "secagg", "dropout": 0.05, "failure_bits": 4, "clip_range": 4}
    plain = simulate_job(build_job(_config(systems=systems)))
    secure = simulate_job(build_job(_config(systems=systems, secure_aggregation=sa)))
    assert all(r.secure is not None and r.secure.failure is None for r in secure.history)
    dropped = [r.secure.dropped for r in secure.history if r.secure is not None]
    assert sum(dropped) > 0  # clients went silent after sharing keys, and were unmasked away
    assert [r.clients for r in secure.history] == [r.clients for r in plain.history]
    assert _max_diff(plain.model, secure.model) < 1e-5


def test_a_round_with_too_many_dropouts_releases_nothing_and_the_run_goes_on() -> None:
    sa = {"dropout": 0.01, "failure_bits": 6, "clip_range": 4}
    job = build_job(_config(systems={"dropout": 0.6}, secure_aggregation=sa))
    result = simulate_job(job)
    failed = [r for r in result.history if r.secure is not None and r.secure.failure]
    assert failed, "with 60% dropout some round must lose a client's threshold"
    for r in failed:
        assert r.clients == 0 and "round" in (r.secure.failure or "")  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="dropout"):
        simulate_job(build_job(_config(secure_aggregation={"dropout": 0.3})))  # 6 are too few


def test_unsound_or_overflowing_configs_are_refused() -> None:
    sa = {"secure_aggregation": {}}
    with pytest.raises(ConfigError, match="fedbuff"):
        _config(server={"strategy": "fedbuff"}, **sa)
    with pytest.raises(ConfigError, match="scaffold"):
        _config(server={"strategy": "scaffold"}, **sa)
    with pytest.raises(ConfigError, match="client_level"):
        _config(privacy={"client_level": {"epsilon": 1.0}}, **sa)
    with pytest.raises(ConfigError, match="clients_per_round >= 2"):
        _config(training={**BASE["training"], "clients_per_round": 1}, **sa)  # type: ignore[dict-item]
    # 8-bit sums of 6 clients leave ~13 levels per value: refused before training.
    job = build_job(_config(secure_aggregation={"bits": 8, "clip_range": 100.0, "dropout": 0.01}))
    with pytest.raises(ConfigError, match="bits"):
        simulate_job(job)


def test_a_secure_run_reports_the_protocol_and_counts_clipped_values(tmp_path: Path) -> None:
    sa = {"protocol": "secagg", "clip_range": 1e-3, "dropout": 0.05, "failure_bits": 4}
    cfg = _config(secure_aggregation=sa, systems={"dropout": 0.2})
    outcome = run(cfg, store_path=tmp_path / "runs.db")
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    summary_sa = summary["secure_aggregation"]
    assert summary_sa["protocol"] == "secagg" and summary_sa["rounds"] == 2
    assert summary_sa["k"] == [5, 5] and all(t <= 5 for t in summary_sa["t"])
    assert summary_sa["clipped_values"] > 0  # a range of 1e-3 clips real updates, and says so
    statement = next(p for p in summary["protections"] if p.startswith("secure aggregation"))
    assert "clipped" in statement and "dropout" in statement
    assert "secure aggregation" in outcome.report_path.read_text()
