"""Sample-level DP-SGD through the config, the run and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from mmshield.api import build_job, plan_privacy, simulate_job
from mmshield.cli import main
from mmshield.config import config_from_dict
from mmshield.errors import ConfigError, PrivacyError
from mmshield.report.store import RunStore

BASE = {
    "dataset": {"name": "fedprox-synthetic", "alpha": 0.5, "beta": 0.5},
    "partition": {"clients": 30, "scheme": "natural"},
    "model": {"fusion": "concat", "fusion_hidden": 0},
    "training": {"rounds": 2, "clients_per_round": 5, "local_epochs": 1, "batch_size": 16},
}


def _config(**privacy: object):
    return config_from_dict({**BASE, "privacy": privacy})


def test_calibrated_run_meets_its_target_and_reports_it(tmp_path: Path) -> None:
    cfg = {**BASE, "privacy": {"sample_level": {"epsilon": 4.0, "delta": 1e-5}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = tmp_path / "m.db"
    assert main(["run", str(path), "--store", str(store), "--quiet"]) == 0
    run = RunStore(store).list_runs()[0]
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert 3.9 <= summary["epsilon"] <= 4.0 and summary["delta"] == 1e-5
    assert any("DP-SGD" in p for p in summary["protections"])
    html = (run.run_dir / "report.html").read_text()
    assert "ε" in html and 'data-plot="epsilon"' in html


def test_unreachable_epsilon_is_refused_before_training(tmp_path: Path) -> None:
    cfg = {**BASE, "privacy": {"sample_level": {"epsilon": 1e-4}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = tmp_path / "m.db"
    assert main(["run", str(path), "--store", str(store), "--quiet"]) == 2
    run = RunStore(store).list_runs()[0]
    assert run.status == "failed" and "smallest reachable ε" in (run.error or "")
    assert RunStore(store).metrics(run.run_id) == {}  # not a single round ran
    with pytest.raises(PrivacyError, match="smallest reachable"):
        plan_privacy(build_job(_config(sample_level={"epsilon": 1e-4})))


def test_seeded_noise_reproduces_and_secure_noise_does_not() -> None:
    seeded = _config(sample_level={"noise_multiplier": 1.0}, secure_noise=False)
    job = build_job(seeded)
    a = simulate_job(job).model
    b = simulate_job(build_job(seeded)).model
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    secure = _config(sample_level={"noise_multiplier": 1.0})
    c = simulate_job(build_job(secure)).model
    d = simulate_job(build_job(secure)).model
    assert not all(
        torch.equal(pc, pd) for pc, pd in zip(c.parameters(), d.parameters(), strict=True)
    )


def test_unsound_or_ambiguous_privacy_configs_are_refused() -> None:
    with pytest.raises(ConfigError, match="exactly one of"):
        _config(sample_level={"epsilon": 1.0, "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="fedbuff"):
        config_from_dict(
            {**BASE, "server": {"strategy": "fedbuff"}, "privacy": {"sample_level": {"epsilon": 1}}}
        )
