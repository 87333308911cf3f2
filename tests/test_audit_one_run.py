"""One-run privacy auditing (Steinke, Nasr, Jagielski 2023): reference values and a real audit.

The audited mechanism is the paper's idealised one: ``m`` canaries, canary ``i`` adds the unit
vector ``e_i`` when included (L2 sensitivity 1 per canary), plus ``N(0, σ²)`` on every coordinate,
with σ from the analytic Gaussian mechanism (Balle & Wang 2018) for the claimed (ε, δ). The score
of canary ``i`` is coordinate ``i`` of the output.
"""

from __future__ import annotations

import dp_accounting as dpa
import numpy as np
import pytest

from mmshield.audit.one_run import (
    DEFAULT_SIGNIFICANCE,
    audit_one_run,
    audit_one_run_sweep,
    count_correct,
    draw_inclusion,
    epsilon_one_run,
    guesses_from_scores,
    one_run_p_value,
)
from mmshield.privacy.noise import NoiseSource

DELTA = 1e-5
M = 1000


@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "expected"),
    [
        (1000, 100, 100, 0.0, 3.493),
        (1000, 100, 90, 1e-5, 1.626),
        (1000, 1000, 1000, 0.0, 5.809),
    ],
)
def test_reference_values(m: int, r: int, v: int, delta: float, expected: float) -> None:
    """ANCHORS (jax_privacy epsilon_one_run, the paper's Appendix D) at 95 % confidence."""
    assert DEFAULT_SIGNIFICANCE == 0.05
    assert round(epsilon_one_run(m, r, v, delta), 3) == expected


def test_bound_is_the_root_of_the_p_value() -> None:
    eps = epsilon_one_run(1000, 100, 90, 1e-5)
    assert one_run_p_value(1000, 100, 90, eps, 1e-5) == pytest.approx(0.05, rel=1e-6)
    assert one_run_p_value(1000, 100, 90, eps - 0.01, 1e-5) < 0.05
    assert one_run_p_value(1000, 100, 90, eps + 0.01, 1e-5) > 0.05
    # δ > 0 only ever weakens the evidence; higher confidence gives a lower bound.
    assert epsilon_one_run(1000, 100, 90, 1e-3) < eps < epsilon_one_run(1000, 100, 90, 0.0)
    assert epsilon_one_run(1000, 100, 90, 1e-5, significance=0.01) < eps
    # Chance-level guessing proves nothing.
    assert epsilon_one_run(1000, 100, 50) == 0.0
    assert epsilon_one_run(1000, 0, 0) == 0.0


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="correct"):
        epsilon_one_run(1000, 100, 101)
    with pytest.raises(ValueError, match="guesses"):
        epsilon_one_run(100, 200, 10)
    with pytest.raises(ValueError, match="significance"):
        epsilon_one_run(1000, 100, 90, significance=0.0)
    with pytest.raises(ValueError, match="delta"):
        epsilon_one_run(1000, 100, 90, delta=2.0)


def test_draw_inclusion() -> None:
    a = draw_inclusion(10_000, seed=3)
    assert a.dtype == bool and a.shape == (10_000,)
    assert np.array_equal(a, draw_inclusion(10_000, seed=3))
    assert not np.array_equal(a, draw_inclusion(10_000, seed=4))
    assert abs(a.mean() - 0.5) < 0.02
    secure = draw_inclusion(10_000)
    assert not np.array_equal(secure, draw_inclusion(10_000))
    with pytest.raises(ValueError):
        draw_inclusion(0)


def test_guesses_and_counts() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.5, 0.8, 0.0])
    g = guesses_from_scores(scores, k_plus=2, k_minus=2)
    assert g.tolist() == [1, -1, 0, 0, 1, -1]
    # Ties are broken by index, never by the inclusion.
    assert guesses_from_scores(scores, k_plus=3).tolist() == [1, 0, 0, 1, 1, 0]
    included = np.array([True, False, True, False, False, True])
    assert count_correct(g, included) == (4, 2)
    with pytest.raises(ValueError, match="k_plus"):
        guesses_from_scores(scores, k_plus=4, k_minus=3)
    with pytest.raises(ValueError, match="non-finite"):
        guesses_from_scores([0.1, np.nan], k_plus=1)
    with pytest.raises(ValueError, match="boolean"):
        audit_one_run(scores, included.astype(int), k_plus=1)


def _gaussian_mechanism(
    epsilon: float, seed: int, factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Scores and inclusion of one run; ``factor`` scales the calibrated σ (0.1: broken)."""
    included = draw_inclusion(M, seed=seed)
    sigma = dpa.get_sigma_gaussian(epsilon, DELTA) * factor
    noise = NoiseSource(secure=False, seed=seed, purpose="test-one-run").normal((M,), sigma)
    return included.astype(np.float64) + noise.double().numpy(), included


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
def test_calibrated_gaussian_passes_the_audit(epsilon: float) -> None:
    """A correctly calibrated mechanism is never refuted (20 runs; each fails w.p. <= 5 %)."""
    bounds = []
    for seed in range(20):
        scores, included = _gaussian_mechanism(epsilon, seed)
        audit = audit_one_run_sweep(scores, included, delta=DELTA)
        assert audit.candidates == 6 and audit.confidence == pytest.approx(0.95)
        assert not audit.refutes(epsilon)
        bounds.append(audit.epsilon)
    # The audit is not vacuous: best of 20 runs 0.44 at ε = 1 and 0.89 at ε = 2 (mean 0.21, 0.63).
    assert max(bounds) > 0.3 * epsilon


@pytest.mark.parametrize("epsilon", [1.0, 2.0])
def test_broken_gaussian_is_caught(epsilon: float) -> None:
    """Noise 10x too small: the empirical ε exceeds the claimed one (3.79 and 4.35 here)."""
    scores, included = _gaussian_mechanism(epsilon, seed=0, factor=0.1)
    audit = audit_one_run_sweep(scores, included, delta=DELTA)
    assert audit.refutes(epsilon), audit
    assert audit.epsilon > epsilon + 1.5
    # A rule fixed in advance catches it too (no multiple-testing correction needed).
    fixed = audit_one_run(scores, included, k_plus=100, k_minus=100, delta=DELTA)
    assert fixed.guesses == 200 and fixed.correct >= 195
    assert fixed.epsilon > epsilon
    assert fixed.epsilon == epsilon_one_run(M, fixed.guesses, fixed.correct, DELTA)
