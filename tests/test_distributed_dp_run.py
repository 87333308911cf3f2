"""Client-level DP with distributed Skellam noise inside secure aggregation: the server decodes
only noised sums, each release is charged for the noise that really reached it, the ledger and
the summary agree, and unsound combinations are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmshield.api import build_job, plan_privacy, run
from mmshield.config import config_from_dict
from mmshield.errors import ConfigError, PrivacyError
from mmshield.privacy.accountant import SampledGaussian, calibrate_noise_multiplier
from mmshield.privacy.distributed_dp import SkellamFedAvg
from mmshield.privacy.ledger import PrivacyLedger
from mmshield.privacy.noise import NoiseSource
from mmshield.privacy.skellam import DistributedSkellam, SkellamAccount

BASE = {
    "dataset": {"name": "av-digits"},
    "partition": {"clients": 12, "scheme": "iid"},
    "model": {"embed_dim": 8, "fusion": "concat", "fusion_hidden": 0},
    "training": {
        "rounds": 3,
        "local_epochs": 1,
        "batch_size": 128,
        "lr": 0.1,
        "clients_per_round": 6,
    },
    "simulation": {"threads": 1},
    "secure_aggregation": {"protocol": "secagg", "dropout": 0.05, "failure_bits": 4},
}


def _config(client_level: dict[str, object], **extra: object):
    dp = {"epsilon": 20.0, "delta": 1e-3, "noise": "distributed", **client_level}
    return config_from_dict({**BASE, "privacy": {"client_level": dp}, **extra})


def test_release_is_the_clipped_mean_plus_the_noise_of_the_shares_that_arrived() -> None:
    k, dim, m = 8, 300, 10
    mech = DistributedSkellam(dim, clip=1.0, scale=2.0**10, mu=4e6, noise_shares=m, bits=32)
    fedavg = SkellamFedAvg(
        mech,
        m,
        SkellamAccount(1e-5, 1e9, mech.l1, mech.l2),
        NoiseSource(False, 1, "clients"),
        NoiseSource(False, 1, "seed"),
    )
    rng = np.random.default_rng(0)
    updates = torch.from_numpy(rng.normal(0.0, 0.2, (k, dim)))  # norms ~3.5: all clipped
    deltas = {"a": updates[:, :100].reshape(k, 10, 10), "b": updates[:, 100:]}
    seed = fedavg.round_seed()
    errors = []
    for _ in range(20):
        inputs, clipped = fedavg.encode(deltas, np.arange(k), seed)
        assert clipped == k and all(v.dtype == np.uint32 for v in inputs.values())
        total = sum(v.astype(np.uint64) for v in inputs.values()) % np.uint64(1 << 32)
        template = {"a": torch.zeros(10, 10, dtype=torch.float64), "b": torch.zeros(200)}
        mean = fedavg.release(total, tuple(range(k)), seed, template, "round 1")
        assert mean["a"].shape == (10, 10) and mean["b"].dtype == torch.float32
        got = torch.cat([mean["a"].reshape(-1), mean["b"].double()])
        clipped_sum = (updates / updates.norm(dim=1, keepdim=True)).sum(0)
        errors.append((got - clipped_sum / m).numpy())
    # The sum carries k of m shares: variance k μ / m per coordinate (integer units).
    expected = k * mech.mu / m / mech.scale**2 / m**2
    measured = np.var(np.concatenate(errors))
    assert measured == pytest.approx(expected, rel=0.05)  # 6,000 samples: ~2% s.e.
    assert fedavg.history[-1].mu_effective == pytest.approx(k * mech.mu / m)


def test_skellam_noise_matches_the_gaussian_it_approximates() -> None:
    # At large μ the Skellam mechanism's RDP tends to the Gaussian's: the planned multiplier for
    # (ε, δ) over P rounds without amplification is that of the Gaussian (to calibration
    # tolerance; the rounding's sensitivity inflation is negligible at this fine a scale).
    job = build_job(_config({"epsilon": 4.0, "delta": 1e-5, "max_participation": 3}))
    plan = plan_privacy(job)
    assert plan.distributed_dp is not None and plan.epsilon == pytest.approx(4.0, rel=1e-3)
    z = calibrate_noise_multiplier(4.0, 1e-5, SampledGaussian(1.0, 3, "none"), "rdp")
    ratio = plan.distributed_dp.planned_multiplier / z
    assert ratio == pytest.approx(1.0, abs=0.01)


def test_a_run_charges_the_ledger_what_each_release_carried(tmp_path: Path) -> None:
    cfg = _config({"reporting_fraction": 0.5}, systems={"dropout": 0.25})
    outcome = run(cfg, store_path=tmp_path / "runs.db")
    s = json.loads((outcome.run_dir / "summary.json").read_text())
    dd = s["distributed_dp"]
    assert s["privacy_unit"] == "client" and s["noise_placement"] == "distributed"
    reports = dd["reports_per_round"]
    assert len(reports) == 3 and min(reports) < 6  # some invited clients dropped out
    # Fewer reports, less noise: the multiplier follows sqrt(k / m_s).
    planned = dd["planned_noise_multiplier"]
    for k, z in zip(reports, dd["effective_noise_multipliers"], strict=True):
        assert z == pytest.approx(planned * math.sqrt(k / dd["noise_shares"]), rel=1e-9)
    assert s["secure_aggregation"]["dropped_per_round"] == [6 - k for k in reports]
    assert 0 < s["epsilon"] <= s["epsilon_budget"]
    ledger = PrivacyLedger(cfg.privacy.ledger)
    entry = ledger.history()[0]
    assert entry["spent_epsilon"] == pytest.approx(s["epsilon"], rel=1e-9)
    assert entry["rounds_charged"] == 3 and entry["status"] == "finished"
    statement = next(p for p in s["protections"] if "Skellam" in p)
    assert "no amplification" in statement and "worst-off client" in statement


def test_too_few_reports_stop_the_run_before_the_unaffordable_release(tmp_path: Path) -> None:
    # Shares sized for all 6 invited clients and every client in every round: any dropout makes
    # a round carry less noise than planned, so the last round cannot be afforded.
    cfg = _config(
        {"reporting_fraction": 1.0},
        partition={"clients": 6, "scheme": "iid"},
        systems={"dropout": 0.3},
    )
    with pytest.raises(PrivacyError, match="budget") as err:
        run(cfg, store_path=tmp_path / "runs.db")
    assert "Nothing of it was released" in str(err.value)
    entry = PrivacyLedger(cfg.privacy.ledger).history()[0]
    assert entry["status"] == "failed" and 0 < float(entry["spent_epsilon"]) <= 20.0


def test_participation_cap_is_honoured() -> None:
    from mmshield.api import simulate_job

    cfg = _config({"max_participation": 1}, partition={"clients": 18, "scheme": "iid"})
    job = build_job(cfg)
    plan = plan_privacy(job)
    simulate_job(job, privacy=plan)
    fedavg = plan.distributed_dp
    assert fedavg is not None and fedavg.max_participation == 1
    assert max(fedavg.account.participation.values()) == 1
    assert sorted(fedavg.account.participation) == list(range(18))  # 3 rounds x 6 clients


def test_colluding_clients_shares_are_not_counted() -> None:
    mech = DistributedSkellam(64, clip=1.0, scale=2.0**8, mu=1e6, noise_shares=10, bits=32)
    account = SkellamAccount(1e-5, 1e9, mech.l1, mech.l2)
    fedavg = SkellamFedAvg(
        mech,
        10,
        account,
        NoiseSource(False, 0, "c"),
        NoiseSource(False, 0, "s"),
        collusion=0.2,
    )
    inputs, _ = fedavg.encode({"w": torch.zeros(7, 64)}, np.arange(7), 3)
    total = sum(v.astype(np.uint64) for v in inputs.values()) % np.uint64(1 << 32)
    fedavg.release(total, tuple(range(7)), 3, {"w": torch.zeros(64)}, "round 1")
    r = fedavg.history[0]
    assert r.colluding == 2 and r.mu_effective == pytest.approx(5 * mech.share_variance)
    assert account.participation == dict.fromkeys(range(7), 1)


def test_unsound_combinations_are_refused() -> None:
    with pytest.raises(ConfigError, match="noise 'central' is refused"):
        _config({"noise": "central"})
    with pytest.raises(ConfigError, match="noise 'local' is refused"):
        _config({"noise": "local"})
    with pytest.raises(ConfigError, match="adaptive"):
        _config({"adaptive": {}})
    with pytest.raises(ConfigError, match="epsilon"):
        _config({"epsilon": None, "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="max_participation"):
        config_from_dict(
            {
                **{k: v for k, v in BASE.items() if k != "secure_aggregation"},
                "privacy": {
                    "client_level": {"epsilon": 1.0, "noise": "distributed", "max_participation": 2}
                },
            }
        )


def test_the_shipped_secure_dp_config_plans_within_its_budget() -> None:
    from importlib import resources

    from mmshield.config import load_config

    cfg = load_config(str(resources.files("mmshield") / "configs" / "secure-dp.yaml"))
    plan = plan_privacy(build_job(cfg))
    assert plan.distributed_dp is not None and plan.distributed_dp.max_participation == 10
    assert plan.epsilon == pytest.approx(8.0, rel=1e-3)
    assert "Skellam" in (plan.statement or "")
