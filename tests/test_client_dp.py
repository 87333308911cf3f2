"""Client-level DP-FedAvg: clipping, the noisy mean, adaptive clipping, Poisson clients, runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mmshield.cli import main
from mmshield.config import config_from_dict
from mmshield.errors import ConfigError, PrivacyError
from mmshield.privacy.accountant import SampledGaussian, epsilon
from mmshield.privacy.client_dp import (
    AdaptiveClipping,
    ClientLevelDP,
    ReleaseAccount,
    gaussian_epsilon,
    poisson_clients,
)
from mmshield.privacy.ledger import PrivacyLedger
from mmshield.privacy.noise import NoiseSource
from mmshield.report.store import RunStore


def test_clipped_uniform_mean_with_a_fixed_denominator() -> None:
    dp = ClientLevelDP(1.0, 0.0, expected_clients=4.0, source=NoiseSource(False))
    deltas = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.tensor([[0.0], [0.0]])}
    norms = dp.add(deltas)
    torch.testing.assert_close(norms, torch.tensor([5.0, 0.5]))
    mean = dp.noisy_mean({"a": torch.zeros(2), "b": torch.zeros(1)})
    # Client 0 is scaled to norm 1, client 1 is kept; divided by the expected 4 clients.
    torch.testing.assert_close(mean["a"], (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])) / 4)
    assert dp.history[-1] == {"clip_norm": 1.0, "unclipped": 1.0}


def test_noise_has_the_calibrated_scale() -> None:
    dp = ClientLevelDP(2.0, 1.5, expected_clients=10.0, source=NoiseSource(True))
    mean = dp.noisy_mean({"w": torch.zeros(100_000)})
    assert float(mean["w"].std()) == pytest.approx(1.5 * 2.0 / 10.0, rel=0.02)


def test_adaptive_value_noise_keeps_the_total_privacy() -> None:
    dp = ClientLevelDP(1.0, 1.0, 10.0, NoiseSource(False), AdaptiveClipping(count_noise=1.0))
    # (z^-2 - (2 σ_b)^-2)^-1/2 with z = 1, σ_b = 1.
    assert dp.value_noise_multiplier == pytest.approx((1 - 0.25) ** -0.5)
    with pytest.raises(ValueError, match="count_noise"):
        ClientLevelDP(1.0, 4.0, 10.0, NoiseSource(False), AdaptiveClipping(count_noise=1.0))


def test_adaptive_clip_norm_tracks_the_target_quantile() -> None:
    norms = torch.linspace(1.0, 100.0, 50)
    dp = ClientLevelDP(
        1.0, 0.0, 50.0, NoiseSource(False), AdaptiveClipping(0.5, 0.2, count_noise=1e-9)
    )
    for _ in range(300):
        dp.add({"w": torch.diag(norms)})  # client i's update has norm norms[i]
        dp.noisy_mean({"w": torch.zeros(50)})
    assert dp.clip_norm == pytest.approx(50.5, rel=0.1)


def test_poisson_client_sampling_rate() -> None:
    src = NoiseSource(False, 3)
    counts = np.zeros(1000)
    for _ in range(200):
        counts[poisson_clients(1000, 0.05, src)] += 1
    assert counts.sum() / (200 * 1000) == pytest.approx(0.05, rel=0.05)
    assert counts.std() > 0


def test_client_level_run_end_to_end(tmp_path: Path) -> None:
    cfg = {
        "dataset": {"name": "fedprox-synthetic", "alpha": 0.5, "beta": 0.5},
        "partition": {"clients": 200, "scheme": "iid"},
        "model": {"fusion": "concat", "fusion_hidden": 0},
        "training": {"rounds": 4, "clients_per_round": 20, "local_epochs": 1, "lr": 0.05},
        "privacy": {
            "client_level": {"epsilon": 3.0, "delta": 1e-3, "clip_norm": 0.5, "adaptive": {}}
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = tmp_path / "m.db"
    assert main(["run", str(path), "--store", str(store), "--quiet"]) == 0
    run = RunStore(store).list_runs()[0]
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert 2.9 <= summary["epsilon"] <= 3.0
    assert any("client-level DP-FedAvg" in p for p in summary["protections"])
    clients = [v for _, v in RunStore(store).metrics(run.run_id)["clients"]]
    assert len(set(clients)) > 1  # Poisson sampling: the number of clients varies


def test_unsound_client_level_combinations_are_refused() -> None:
    dp = {"client_level": {"epsilon": 1.0}}
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        config_from_dict({"server": {"strategy": "scaffold"}, "privacy": dp})
    with pytest.raises(ConfigError, match="unit of privacy"):
        config_from_dict({"privacy": {**dp, "sample_level": {"epsilon": 1.0}}})


# ---------------------------------------------------------------- distributed and local noise

Z, S, M, Q, DELTA = 1.5, 2.0, 10.0, 0.1, 1e-3
D = 40_000  # coordinates: the variance of the sum is estimated to ~1%


def _distributed(budget: float = 1e9, shares: float | None = None) -> ClientLevelDP:
    account = ReleaseAccount(DELTA, budget, Q)
    source = NoiseSource(False, 1)
    return ClientLevelDP(
        S, Z, M, source, placement="distributed", noise_shares=shares, account=account
    )


def _round(dp: ClientLevelDP, k: int, first_id: int = 0) -> torch.Tensor:
    """One round in which ``k`` clients with zero updates report; return the noisy sum."""
    if k:
        dp.add({"w": torch.zeros(k, D)}, np.arange(first_id, first_id + k))
    return dp.noisy_mean({"w": torch.zeros(D)})["w"] * dp.expected_clients


def _coarse(*multipliers: float) -> float:
    mechs = [SampledGaussian(z, 1, "poisson", Q) for z in multipliers]
    return epsilon(mechs, DELTA, "pld", coarse=True)


def test_distributed_noise_with_every_expected_client_has_the_central_variance() -> None:
    dp = _distributed()
    assert dp.client_noise_std() == pytest.approx(Z * S / M**0.5)
    total = _round(dp, int(M))
    assert float(total.var()) == pytest.approx((Z * S) ** 2, rel=0.03)
    assert dp.effective_multipliers == [pytest.approx(Z)]
    assert dp.account is not None
    assert dp.account.spent == pytest.approx(_coarse(Z), rel=1e-6)


def test_fewer_reports_carry_less_noise_and_are_charged_for_it() -> None:
    dp = _distributed()
    first = _round(dp, int(M))
    k = 4
    second = _round(dp, k, first_id=100)
    assert float(first.var()) == pytest.approx((Z * S) ** 2, rel=0.03)
    assert float(second.var()) == pytest.approx(k / M * (Z * S) ** 2, rel=0.03)
    smaller = Z * (k / M) ** 0.5
    assert dp.effective_multipliers == [pytest.approx(Z), pytest.approx(smaller)]
    assert dp.account is not None
    # The ledger's figure is the accountant's ε of the noise actually present, round by round.
    assert dp.account.spent == pytest.approx(_coarse(Z, smaller), rel=1e-6)
    assert dp.account.spent > _coarse(Z, Z)
    # A round nobody reported in releases nothing data-dependent and costs nothing.
    spent = dp.account.spent
    assert float(_round(dp, 0).abs().max()) == 0.0
    assert dp.account.spent == spent and dp.effective_multipliers[-1] is None


def test_safety_factor_shares_reach_the_planned_noise_with_fewer_reports() -> None:
    dp = _distributed(shares=0.8 * M)
    total = _round(dp, 8)
    assert float(total.var()) == pytest.approx((Z * S) ** 2, rel=0.03)
    assert dp.effective_multipliers == [pytest.approx(Z)]


def test_a_release_beyond_the_budget_is_refused_and_nothing_is_charged() -> None:
    budget = _coarse(Z, Z)
    dp = _distributed(budget=budget)
    _round(dp, int(M))
    assert dp.account is not None
    spent = dp.account.spent
    dp.add({"w": torch.zeros(2, D)}, np.arange(2))
    with pytest.raises(PrivacyError, match=r"round 2: .*above its budget.*reporting_fraction"):
        dp.noisy_mean({"w": torch.zeros(D)})
    assert dp.account.spent == spent and len(dp.history) == 1
    assert dp.effective_multipliers == [pytest.approx(Z)]


def test_distributed_guarantees_against_the_server() -> None:
    dp = _distributed()
    _round(dp, int(M))
    _round(dp, 4)  # clients 0-3 take part twice
    # Without secure aggregation: one Gaussian with z / sqrt(m) per round taken part in.
    vs_server = dp.epsilon_vs_server(DELTA)
    assert vs_server == pytest.approx(
        epsilon([SampledGaussian(Z / M**0.5, 2, "none")], DELTA, "pld"), rel=1e-3
    )
    # With it (the server sees the sums but knows who took part): z_k per round.
    precision = 1 / Z**2 + 1 / (Z**2 * 4 / M)
    secagg = dp.epsilon_vs_server_with_secagg(DELTA)
    assert secagg == pytest.approx(gaussian_epsilon(precision**-0.5, DELTA))
    assert dp.account is not None
    assert dp.account.spent < secagg < vs_server  # type: ignore[operator]


def test_distributed_count_noise_shares_add_up_to_the_central_count_noise() -> None:
    sigma_b = 2.0
    adaptive = AdaptiveClipping(0.5, 1e-9, sigma_b)
    dp = ClientLevelDP(1.0, 1.0, M, NoiseSource(False, 2), adaptive, placement="distributed")
    for _ in range(600):
        dp.add({"w": torch.zeros(int(M), 1)})  # every client unclipped: bits all 1
        dp.noisy_mean({"w": torch.zeros(1)})
    fractions = np.array([h["noisy_unclipped_fraction"] for h in dp.history])
    assert fractions.std() == pytest.approx(sigma_b / M, rel=0.1)
    assert fractions.mean() == pytest.approx(1.0, abs=3 * sigma_b / M / 600**0.5)


def test_local_noise_gives_every_released_update_the_full_variance() -> None:
    account = ReleaseAccount(DELTA, 1e9, Q)
    dp = ClientLevelDP(S, Z, M, NoiseSource(False, 3), placement="local", account=account)
    released, _ = dp.release({"w": torch.zeros(3, D)})
    for row in released["w"]:
        assert float(row.var()) == pytest.approx((Z * S) ** 2, rel=0.03)
    # Rounds: clients {0, 1}, then {1, 2}: client 1's update was seen twice.
    for ids in ([0, 1], [1, 2]):
        dp.add({"w": torch.zeros(2, 8)}, np.array(ids))
        mean = dp.noisy_mean({"w": torch.zeros(8)})["w"]
        assert float(mean.abs().max()) > 0  # the clients' noise, none from the server
    assert dp.max_rounds_taken() == 2
    local = epsilon([SampledGaussian(Z, 2, "none")], DELTA, "pld")
    assert account.spent == pytest.approx(local, rel=1e-3)
    assert dp.epsilon_vs_server(DELTA) == pytest.approx(local, rel=1e-3)
    with pytest.raises(ValueError, match="local noise"):
        ClientLevelDP(S, Z, M, NoiseSource(False), AdaptiveClipping(), placement="local")


def test_central_placement_draws_no_client_noise() -> None:
    dp = ClientLevelDP(S, Z, M, NoiseSource(False, 4))
    released, _ = dp.release({"w": torch.zeros(3, 5)})
    assert float(released["w"].abs().max()) == 0.0
    assert dp.effective_multiplier(0) == Z and dp.epsilon_vs_server(DELTA) is None


def test_noise_placement_config_is_checked() -> None:
    def client_level(**kw: object) -> object:
        return config_from_dict({"privacy": {"client_level": {"epsilon": 1.0, **kw}}})

    with pytest.raises(ConfigError, match=r"privacy\.client_level\.adaptive"):
        client_level(noise="local", adaptive={})
    with pytest.raises(ConfigError, match=r"privacy\.client_level\.noise.*'central'"):
        client_level(noise="secure")
    with pytest.raises(ConfigError, match=r"reporting_fraction only applies"):
        client_level(noise="central", reporting_fraction=0.5)
    with pytest.raises(ConfigError, match=r"reporting_fraction"):
        client_level(noise="distributed", reporting_fraction=1.5)
    cfg = client_level(noise="distributed", adaptive={})
    assert cfg.privacy.client_level.noise == "distributed"  # type: ignore[attr-defined]


DISTRIBUTED_RUN = {
    "dataset": {"name": "fedprox-synthetic", "alpha": 0.5, "beta": 0.5},
    "partition": {"clients": 100, "scheme": "iid"},
    "model": {"fusion": "concat", "fusion_hidden": 0},
    "training": {"rounds": 3, "clients_per_round": 10, "local_epochs": 1, "lr": 0.05},
    "simulation": {"threads": 1},
    "privacy": {
        "client_level": {"epsilon": 4.0, "delta": 1e-3, "clip_norm": 0.5, "noise": "distributed"},
        "secure_noise": False,
    },
}


def _run(tmp_path: Path, cfg: dict[str, object]) -> tuple[int, RunStore, Path]:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = tmp_path / "m.db"
    return main(["run", str(path), "--store", str(store), "--quiet"]), RunStore(store), path


def test_distributed_run_end_to_end_charges_what_it_released(tmp_path: Path) -> None:
    code, store, _ = _run(tmp_path, DISTRIBUTED_RUN)
    assert code == 0
    run = store.list_runs()[0]
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["noise_placement"] == "distributed"
    multipliers = [z for z in summary["effective_noise_multipliers"] if z is not None]
    assert summary["min_effective_noise_multiplier"] == min(multipliers)
    assert len(summary["effective_noise_multipliers"]) == 3
    # The ledger's total is the accountant's composition of the per-round charges.
    (entry,) = PrivacyLedger().history()
    assert entry["rounds_charged"] == 3
    assert entry["spent_epsilon"] == pytest.approx(summary["epsilon"])
    assert summary["epsilon"] == pytest.approx(_coarse_at(multipliers, 10 / 100), rel=1e-6)
    assert summary["epsilon"] <= summary["epsilon_budget"] <= 4.0
    per_round = [v for _, v in store.metrics(run.run_id)["epsilon"]]
    assert per_round == sorted(per_round) and per_round[-1] == pytest.approx(summary["epsilon"])
    assert summary["epsilon_vs_server"] > summary["epsilon_vs_server_with_secagg"]
    statement = next(p for p in summary["protections"] if "distributed noise" in p)
    assert "secure aggregation" in statement and "no secure aggregation" in statement


def _coarse_at(multipliers: list[float], rate: float) -> float:
    mechs = [SampledGaussian(z, 1, "poisson", rate) for z in multipliers]
    return epsilon(mechs, 1e-3, "pld", coarse=True)


def test_dropouts_that_would_overspend_stop_the_run_at_that_round(tmp_path: Path) -> None:
    cfg = {
        **DISTRIBUTED_RUN,
        "systems": {"dropout": 0.7},
        "privacy": {
            "client_level": {
                "epsilon": 4.0,
                "clip_norm": 0.5,
                "noise": "distributed",
                "reporting_fraction": 1.0,
            },
            "secure_noise": False,
        },
    }
    code, store, _ = _run(tmp_path, cfg)
    assert code == 2
    run = store.list_runs()[0]
    assert run.status == "failed" and "above its budget" in (run.error or "")
    (entry,) = PrivacyLedger().history()
    completed = len(store.metrics(run.run_id).get("epsilon", []))
    assert entry["rounds_charged"] == completed < 3
    assert entry["spent_epsilon"] <= entry["planned_epsilon"]  # type: ignore[operator]
