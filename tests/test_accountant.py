"""The accountant against published values (ANCHORS.md) and Opacus's accountants as oracle."""

from __future__ import annotations

import numpy as np
import pytest

from mmshield.errors import PrivacyError
from mmshield.privacy.accountant import SampledGaussian, calibrate_noise_multiplier, epsilon

# (q, sigma, steps, delta, method, expected, relative tolerance)
ANCHORS = [
    (0.0025, 1.3, 6_000, 1e-5, "rdp", 0.7242234026, 1e-3),  # TF Privacy unit test
    (0.001, 1.0, 30_000, 1e-7, "rdp", 1.4154988, 1e-3),  # TF Privacy unit test
    (0.04, 1.5, 2_250, 1e-5, "rdp", 7.32911, 1e-3),  # Opacus unit test
    (256 / 60_000, 1.1, 14_063, 1e-5, "rdp", 2.597, 1e-3),  # dp-accounting 0.6
    (256 / 60_000, 1.1, 14_063, 1e-5, "pld", 2.382, 1e-3),
    (0.01, 4.0, 10_000, 1e-5, "rdp", 1.036, 1e-3),
    (0.01, 4.0, 10_000, 1e-5, "pld", 0.947, 1e-3),
]


@pytest.mark.parametrize(("q", "sigma", "steps", "delta", "method", "expected", "rtol"), ANCHORS)
def test_reference_values(q, sigma, steps, delta, method, expected, rtol) -> None:
    got = epsilon([SampledGaussian(sigma, steps, "poisson", q)], delta, method)
    assert got == pytest.approx(expected, rel=max(rtol, 0.5e-3 / expected))


def test_pld_matches_opacus_prv_reference() -> None:
    # Opacus's unit test: PRV 6.77740 for q = 0.04, sigma = 1.5, 2,250 steps; PLD vs PRV +-0.02.
    got = epsilon([SampledGaussian(1.5, 2_250, "poisson", 0.04)], 1e-5, "pld")
    assert abs(got - 6.77740) <= 0.02


def _random_configs(n: int, seed: int) -> list[tuple[float, float, int]]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        q = float(10 ** rng.uniform(np.log10(3e-4), np.log10(0.1)))
        sigma = float(rng.uniform(0.7, 4.0))
        steps = int(10 ** rng.uniform(1, 4))
        out.append((q, sigma, steps))
    return out


def test_agrees_with_opacus_on_random_configurations() -> None:
    accountants = pytest.importorskip("opacus.accountants")
    rdp_agree = 0
    checked = 0
    for q, sigma, steps in _random_configs(40, seed=11):
        mech = [SampledGaussian(sigma, steps, "poisson", q)]
        prv = accountants.PRVAccountant()
        prv.history = [(sigma, q, steps)]
        ours_pld = epsilon(mech, 1e-5, "pld")
        # PLD and PRV are both numerically tight: they agree within 0.02 everywhere.
        assert abs(ours_pld - prv.get_epsilon(1e-5)) <= 0.02, (q, sigma, steps)
        ours_rdp = epsilon(mech, 1e-5, "rdp")
        opacus_rdp = accountants.RDPAccountant()
        opacus_rdp.history = [(sigma, q, steps)]
        theirs = opacus_rdp.get_epsilon(1e-5)
        assert ours_pld <= ours_rdp * (1 + 1e-3)  # PLD is never looser than RDP
        if ours_rdp >= 0.2:  # the ordinary regime (ANCHORS.md: orders differ below 0.2)
            checked += 1
            rdp_agree += abs(ours_rdp - theirs) <= 1e-3 * theirs
    assert checked >= 20
    assert rdp_agree >= checked - 2, f"RDP agreed with Opacus on {rdp_agree} of {checked}"


@pytest.mark.parametrize("method", ["pld", "rdp"])
def test_calibration_meets_the_target_tightly(method: str) -> None:
    template = SampledGaussian(1.0, 2_000, "poisson", 0.01)
    sigma = calibrate_noise_multiplier(2.0, 1e-5, template, method)  # type: ignore[arg-type]
    eps = epsilon([SampledGaussian(sigma, 2_000, "poisson", 0.01)], 1e-5, method)  # type: ignore[arg-type]
    assert 2.0 * 0.98 <= eps <= 2.0
    looser = epsilon([SampledGaussian(sigma * 0.97, 2_000, "poisson", 0.01)], 1e-5, method)  # type: ignore[arg-type]
    assert looser > 2.0


def test_unreachable_epsilon_names_the_smallest_reachable() -> None:
    template = SampledGaussian(1.0, 100_000, "none")
    with pytest.raises(PrivacyError, match=r"smallest reachable ε is [0-9.]+") as info:
        calibrate_noise_multiplier(0.05, 1e-5, template, max_noise_multiplier=50.0)
    floor = float(str(info.value).split("smallest reachable ε is ")[1].split(" ")[0])
    assert floor == pytest.approx(epsilon([SampledGaussian(50.0, 100_000, "none")], 1e-5), rel=1e-3)


def test_sampling_without_replacement_is_rdp_only_and_mixing_is_refused() -> None:
    wor = SampledGaussian(1.3, 600, "without_replacement", population=1000, sample_size=10)
    assert epsilon([wor], 1e-5, "rdp") > 0
    with pytest.raises(PrivacyError, match="PLD accounting supports Poisson sampling only"):
        epsilon([wor], 1e-5, "pld")
    with pytest.raises(PrivacyError, match="neighbouring"):
        epsilon([wor, SampledGaussian(1.0, 10, "poisson", 0.1)], 1e-5, "rdp")


def test_unproven_sampling_schemes_are_refused() -> None:
    with pytest.raises(PrivacyError, match="no proven accounting"):
        SampledGaussian(1.0, 10, "shuffle")  # type: ignore[arg-type]
    with pytest.raises(PrivacyError, match="rate must be in"):
        SampledGaussian(1.0, 10, "poisson", 0.0)


def test_composition_adds_up() -> None:
    a = SampledGaussian(1.2, 500, "poisson", 0.02)
    both = epsilon([a, a], 1e-5, "rdp")
    double = epsilon([SampledGaussian(1.2, 1000, "poisson", 0.02)], 1e-5, "rdp")
    assert both == pytest.approx(double, rel=1e-9)
