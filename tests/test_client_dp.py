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
from mmshield.errors import ConfigError
from mmshield.privacy.client_dp import AdaptiveClipping, ClientLevelDP, poisson_clients
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
