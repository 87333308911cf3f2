"""Private on-device embeddings: clipping, calibrated noise, ledger charges, no network."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmshield.cli import main
from mmshield.errors import PrivacyError
from mmshield.privacy.embed import gaussian_sigma, privatise
from mmshield.privacy.ledger import PrivacyLedger
from mmshield.privacy.noise import NoiseSource
from mmshield.report.store import RunStore


def test_sigma_is_the_analytic_gaussian_for_sensitivity_2c() -> None:
    # ANCHORS.md: at ε = 1, δ = 1e-5 the analytic mechanism needs σ = 3.73 Δ (classic: 4.84 Δ).
    assert gaussian_sigma(1.0, 1e-5, 0.5) == pytest.approx(3.7306 * 2 * 0.5, rel=1e-3)
    with pytest.raises(PrivacyError):
        gaussian_sigma(0.0, 1e-5, 1.0)


def test_privatise_clips_before_adding_noise() -> None:
    x = np.array([[300.0, 400.0], [0.3, 0.4]])
    out = privatise(x, 1e6, 1e-5, 1.0, NoiseSource(False))  # ε huge: noise negligible
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.3, 0.4]], atol=1e-2)
    noisy = privatise(np.zeros((20_000, 4)), 2.0, 1e-5, 1.0, NoiseSource(True))
    assert noisy.std() == pytest.approx(gaussian_sigma(2.0, 1e-5, 1.0), rel=0.02)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_embed_cli_is_offline_and_charges_the_device(tmp_path: Path, no_network: None) -> None:
    cfg = {
        "dataset": {"name": "fedprox-synthetic"},
        "partition": {"clients": 30, "scheme": "natural"},
        "model": {"fusion": "concat", "fusion_hidden": 0, "embed_dim": 16},
        "training": {"rounds": 1, "clients_per_round": 3},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    store = tmp_path / "m.db"
    assert main(["run", str(path), "--store", str(store), "--quiet"]) == 0
    run_dir = RunStore(store).list_runs()[0].run_dir
    out = tmp_path / "emb.npy"
    args = ["embed", str(run_dir), "--epsilon", "2", "--device", "phone-7", "--limit", "50"]
    assert main([*args, "--out", str(out)]) == 0
    emb = np.load(out)
    assert emb.shape == (50, 16) and np.isfinite(emb).all()
    ledger = PrivacyLedger()
    (spend,) = ledger.spend("device:phone-7")
    assert spend.spent_epsilon == 2.0 and spend.reserved_epsilon == 0.0
    ledger.set_budget("device:phone-7", 3.0, 1e-3)
    assert main([*args, "--out", str(tmp_path / "again.npy")]) == 2  # 1 left, 2 asked
    assert not (tmp_path / "again.npy").exists()
