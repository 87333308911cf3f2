"""Encrypted aggregation in runs: the server adds ciphertexts, the key holder decrypts the sum;
the model equals the plaintext run's; bytes with and without encryption are reported."""

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


def test_encrypted_sums_train_the_same_model_and_dropouts_just_leave_the_sum() -> None:
    systems = {"dropout": 0.3}
    plain = simulate_job(build_job(_config(systems=systems)))
    he = simulate_job(build_job(_config(systems=systems, encryption={"clip_range": 4.0})))
    # Only fixed-point rounding (2^-28 at 6 clients) separates them.
    assert _max_diff(plain.model, he.model) < 1e-5
    assert [r.clients for r in he.history] == [r.clients for r in plain.history]
    assert min(r.clients for r in he.history) < 6  # some clients dropped and sent nothing
    for rec in he.history:
        assert rec.encrypted is not None and rec.encrypted.clients == rec.clients
        assert rec.bytes_up == rec.encrypted.ciphertext_bytes
        # at most 10 bytes per value (plus a header per update) against 4 for float32
        per_value = 4 * rec.encrypted.ciphertext_bytes / rec.encrypted.plaintext_bytes
        assert 2.0 < per_value <= 10.05


def test_an_encrypted_run_reports_protection_bytes_and_clipping(tmp_path: Path) -> None:
    outcome = run(_config(encryption={"clip_range": 1e-3}), store_path=tmp_path / "runs.db")
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    he = summary["encryption"]
    assert he["rounds"] == 2 and he["key_holder"] == "client"
    assert he["ciphertext_bytes_up"] > he["plaintext_bytes_up"] > 0
    assert summary["bytes_up"] == he["ciphertext_bytes_up"]
    assert he["clipped_values"] > 0  # a range of 1e-3 clips real updates, and says so
    statement = next(p for p in summary["protections"] if p.startswith("homomorphic"))
    assert "key holder" in statement and "must not collude" in statement
    html = outcome.report_path.read_text()
    assert "Homomorphic encryption hid each client" in html and "Encrypted uploads" in html


def test_unsound_combinations_are_refused() -> None:
    enc = {"encryption": {}}
    with pytest.raises(ConfigError, match="secure_aggregation together"):
        _config(secure_aggregation={}, **enc)
    with pytest.raises(ConfigError, match="fedbuff"):
        _config(server={"strategy": "fedbuff"}, **enc)
    with pytest.raises(ConfigError, match="scaffold"):
        _config(server={"strategy": "scaffold"}, **enc)
    with pytest.raises(ConfigError, match="un-noised sum"):
        _config(privacy={"client_level": {"epsilon": 1.0}}, **enc)
    # a byte budget too small for the sum of the round's clients: refused before training
    job = build_job(_config(encryption={"max_bytes_per_param": 1.0}))
    with pytest.raises(ConfigError, match="encryption"):
        simulate_job(job)
