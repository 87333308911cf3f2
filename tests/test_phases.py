"""Training phases: per-phase data views and frozen parameters, per-modality DP budgets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmshield.api import build_job, run, simulate_job
from mmshield.config import config_from_dict
from mmshield.errors import ConfigError, PrivacyError
from mmshield.privacy.accountant import SampledGaussian
from mmshield.privacy.dpsgd import calibrate_sample_level
from mmshield.privacy.ledger import PrivacyLedger
from mmshield.privacy.planner import PhaseNeeds, modality_epsilon, plan_phase_noise

BASE = {
    "dataset": {"name": "av-digits"},
    "partition": {"clients": 4, "scheme": "iid", "missing_modality": {"audio": 0.25}},
    "model": {"embed_dim": 8, "fusion": "concat", "fusion_hidden": 0},
    "training": {
        "local_epochs": 1,
        "batch_size": 128,
        "phases": [
            {"name": "audio-warm-up", "rounds": 1, "modalities": ["audio"]},
            {"name": "fused", "rounds": 1},
        ],
    },
    "simulation": {"threads": 1},
}


def _config(**extra: object):
    return config_from_dict({**BASE, **extra})


def test_a_phase_reads_only_its_modalities_and_trains_only_its_parameters() -> None:
    job = build_job(_config())
    warm, fused = job.phases
    assert warm.modalities == ("audio",) and fused.trainable is None
    assert warm.trainable is not None
    assert all(n.startswith(("encoders.audio.", "fusion.", "head.")) for n in warm.trainable)
    train = warm.data.train
    assert not train.present["image"].any() and not train.inputs["image"].any()
    assert not train.present["text"].any()
    # Records without audio sit the phase out; every kept record holds audio.
    for full, kept in zip(job.data.client_indices, warm.data.client_indices, strict=True):
        assert set(kept) == {int(i) for i in full if job.data.train.present["audio"][i]}
    assert sum(map(len, warm.data.client_indices)) < sum(map(len, job.data.client_indices))

    start = {n: p.detach().clone() for n, p in job.model.named_parameters()}
    only_warm = build_job(
        _config(
            training={
                **BASE["training"],
                "phases": [{"name": "audio-warm-up", "rounds": 1, "modalities": ["audio"]}],
            }
        )
    )
    trained = simulate_job(only_warm).model
    for n, p in trained.named_parameters():
        changed = not torch.equal(p, start[n])
        assert changed == n.startswith(("encoders.audio.", "fusion.", "head.")), n


def test_phases_continue_round_numbers_and_label_records() -> None:
    result = simulate_job(build_job(_config()))
    assert [(r.round, r.phase) for r in result.history] == [
        (1, "audio-warm-up"),
        (2, "fused"),
    ]


def test_bad_phases_are_refused_with_the_key() -> None:
    phases = [{"name": "a", "rounds": 1, "modalities": ["smell"]}]
    with pytest.raises(ConfigError, match=r"training.phases\[0\] \('a'\).modalities.*smell"):
        build_job(_config(training={"phases": phases}))
    phases = [{"name": "a", "rounds": 1, "trainable": ["encoders.nose.*"]}]
    with pytest.raises(ConfigError, match=r"trainable: 'encoders.nose.\*' matches no parameter"):
        build_job(_config(training={"phases": phases}))
    with pytest.raises(ConfigError, match="phases add up to 2"):
        _config(training={"rounds": 5, "phases": BASE["training"]["phases"]})  # type: ignore[index]
    with pytest.raises(ConfigError, match="client_level"):
        _config(privacy={"client_level": {"epsilon": 1.0}})


def _needs(sizes: list[int], rounds: tuple[int, int]) -> list[PhaseNeeds]:
    def rel(r: int) -> list[SampledGaussian | None]:
        return [SampledGaussian(1.0, r * -(-n // 32), "poisson", min(1.0, 32 / n)) for n in sizes]

    return [
        PhaseNeeds("audio-only", frozenset({"audio"}), rel(rounds[0])),
        PhaseNeeds("fused", frozenset({"audio", "image"}), rel(rounds[1])),
    ]


def test_one_phase_plans_what_plain_calibration_gives() -> None:
    sizes = [60, 200, 500]
    needs = [PhaseNeeds("all", frozenset({"image", "audio"}), _needs(sizes, (0, 10))[1].releases)]
    plan = plan_phase_noise(needs, {"image": 3.0, "audio": 3.0}, 1e-5)
    sigma, eps = calibrate_sample_level(np.array(sizes), 32, 1, 10, 3.0, 1e-5)
    assert plan.noise_multipliers[0] == pytest.approx(sigma, rel=5e-3)
    assert max(plan.epsilon_by_modality.values()) <= 3.0 + 1e-9
    assert max(plan.epsilon_by_modality.values()) == pytest.approx(eps, rel=1e-2)


def test_water_filling_spends_each_modality_budget() -> None:
    needs = _needs([80, 150, 300], (5, 10))
    budgets = {"image": 1.0, "audio": 4.0}
    plan = plan_phase_noise(needs, budgets, 1e-5)
    audio_sigma, fused_sigma = plan.noise_multipliers
    assert plan.bottleneck == ("audio", "image")
    # The image budget sets the fused phase's noise; audio's slack goes to the audio phase.
    assert audio_sigma < fused_sigma
    for m, budget in budgets.items():
        spent = modality_epsilon(needs, plan.noise_multipliers, m, 1e-5)
        assert spent <= budget + 1e-9
        assert spent == pytest.approx(budget, rel=1e-2)  # nothing left unused
    with pytest.raises(PrivacyError, match="no ε budget"):
        plan_phase_noise(needs, {"image": 1.0}, 1e-5)
    with pytest.raises(PrivacyError, match="smallest reachable ε"):
        plan_phase_noise(needs, {"image": 1e-6, "audio": 1.0}, 1e-5)


def test_a_phased_dp_run_charges_each_modality_what_it_read(tmp_path: Path) -> None:
    budgets = {"image": 2.0, "audio": 6.0, "text": 2.0}
    cfg = _config(
        privacy={
            "sample_level": {"epsilon": budgets},
            "secure_noise": False,
            "ledger": str(tmp_path / "ledger.db"),
        }
    )
    outcome = run(cfg, store_path=tmp_path / "runs.db")
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["privacy_unit"] == "record" and summary["accountant"] == "pld"
    by_modality = summary["epsilon_by_modality"]
    assert by_modality["audio"] > 1.5 * by_modality["image"]
    assert [p["set_by"] for p in summary["privacy_split"]] == ["audio", "image"]
    spend = {
        s.modality: s.spent_epsilon
        for s in PrivacyLedger(tmp_path / "ledger.db").spend("av-digits")
    }
    assert spend == pytest.approx(summary["epsilon_by_modality"])
    assert all(spend[m] <= budgets[m] + 1e-9 for m in budgets)
    html = outcome.report_path.read_text()
    assert "Noise per training phase" in html and "audio-warm-up" in html
    assert 'data-plot="epsilon"' in html


def test_the_shipped_phased_config_plans_within_its_budgets() -> None:
    from importlib import resources

    from mmshield.api import plan_privacy
    from mmshield.config import load_config

    path = resources.files("mmshield") / "configs" / "phased-dp.yaml"
    cfg = load_config(str(path))
    plan = plan_privacy(build_job(cfg))
    budgets = cfg.privacy.sample_level.epsilon  # type: ignore[union-attr]
    assert isinstance(budgets, dict) and plan.epsilon_by_modality is not None
    for m, e in plan.epsilon_by_modality.items():
        assert e <= budgets[m] + 1e-9
    warm, fused = plan.phase_split
    assert warm["set_by"] == "audio" and fused["set_by"] in ("image", "text")
    assert warm["noise_multiplier"] < fused["noise_multiplier"]
