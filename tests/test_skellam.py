"""The distributed Skellam mechanism: accounting, sampler, rotation, encode/decode, the ring."""

from __future__ import annotations

import itertools
import math
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
from scipy import linalg, stats

from mmshield.errors import PrivacyError
from mmshield.privacy import skellam as sk
from mmshield.privacy.noise import NoiseSource

BETA = math.exp(-0.5)

# Reference values: google-research/federated distributed_dp/accounting_utils.py (commit
# 5e27a86), `skellam_epsilon(scale, central_stddev, l2_sens, beta, dim, q=1, steps, delta)`,
# transcribed (its functions are plain NumPy) with `tfp.get_privacy_spent` replaced by
# dp_accounting's `compute_epsilon` (the same improved conversion) and its RDP_ORDERS
# (2..128, 256). Columns: scale, central stddev (float units), clip, beta, dim, steps, delta,
# and the reference's rounded Δ2 and Δ1 (integer units) and ε.
REFERENCE = [
    # scale, central stddev, clip, beta, dim, steps, delta
    (1024.0, 20.0, 1.0, BETA, 2**16, 100, 1e-5),
    (64.0, 5.0, 1.0, BETA, 2**10, 10, 1e-5),
    (16.0, 10.0, 1.0, BETA, 2**12, 1, 1e-6),
    (256.0, 8.0, 0.5, 0.0, 2**14, 20, 1e-5),
    (2.0, 30.0, 1.0, BETA, 2**12, 5, 1e-5),
]
REFERENCE_VALUES = [
    # rounded Δ2, rounded Δ1 (integer units), ε
    (1032.5269972257383, 264326.911289789, 2.1889151809035443),
    (66.57326790837296, 2130.3445730679346, 2.9453780653950288),
    (36.4417343165772, 1328.0, 1.0344705516570638),
    (256.0, 32768.0, 2.4529299478268975),
    (32.58834147360065, 1062.0000000000002, 5.941764795153157),
]


def _reference_skellam_rdp(
    l1_sens: float, l2_sens: float, central_var: float, scale: float, order: int
) -> float:
    """The reference's `_skellam_rdp`, in its own (unscaled) parametrisation."""
    a, s, mu = order, scale, central_var
    rdp = a / (2 * mu) * l2_sens**2
    rdp += min(
        ((2 * a - 1) * s * l2_sens**2 + 6 * l1_sens) / (4 * s**3 * mu**2),
        3 * l1_sens / (2 * s * mu),
    )
    return rdp


@pytest.mark.parametrize(("config", "values"), list(zip(REFERENCE, REFERENCE_VALUES, strict=True)))
def test_epsilon_matches_reference_code(
    config: tuple[float, ...], values: tuple[float, float, float]
) -> None:
    scale, stddev, clip, beta, dim, steps, delta = config
    ref_l2, ref_l1, ref_eps = values
    l1, l2 = sk.skellam_sensitivities(clip, scale, int(dim), beta)
    assert l2 == pytest.approx(ref_l2, rel=1e-12)
    assert l1 == pytest.approx(ref_l1, rel=1e-12)
    mu = (scale * stddev) ** 2  # integer-domain variance
    eps = sk.skellam_epsilon([mu] * int(steps), delta, l1, l2)
    assert eps == pytest.approx(ref_eps, rel=1e-9)
    # Order by order, in the reference's unscaled units.
    for order in (2, 7, 64, 256):
        ref = _reference_skellam_rdp(l1 / scale, l2 / scale, stddev**2, scale, order)
        assert float(sk.skellam_rdp(order, l1, l2, mu)) == pytest.approx(ref, rel=1e-12)


def test_rounded_l2_bound_formula() -> None:
    # β = 0: no conditioning, c' + sqrt(d).
    assert sk.rounded_l2_bound(1.0, 100.0, 400, 0.0) == pytest.approx(120.0)
    # Otherwise the smaller of the two bounds of Kairouz et al. (Theorem 1).
    c, d = 50.0, 1024
    b2 = math.sqrt(c**2 + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (c + math.sqrt(d) / 2))
    assert sk.rounded_l2_bound(1.0, c, d, BETA) == pytest.approx(min(c + 32, b2))
    assert sk.rounded_l1_bound(3.0, 100) == 9.0
    assert sk.rounded_l1_bound(30.0, 100) == 300.0


def test_rdp_approaches_gaussian_for_large_mu() -> None:
    # Fixed ratio Δ2² / μ = 0.09: the Skellam RDP tends to the Gaussian α Δ2² / (2 μ) from above.
    alpha = np.array([2.0, 10.0, 100.0])
    excess = []
    for s in (1e1, 1e3, 1e5):
        l2 = 3.0 * s
        l1 = sk.rounded_l1_bound(l2, 2**16)
        gauss = alpha * 0.09 / 2
        rdp = sk.skellam_rdp(alpha, l1, l2, 100.0 * s * s)
        assert np.all(rdp >= gauss)
        excess.append(float(np.max(rdp / gauss - 1)))
    assert excess[0] > excess[1] > excess[2]
    assert excess[2] < 1e-6
    # And in (ε, δ), against dp-accounting's Gaussian RDP over the same orders.
    rounds, delta, z = 50, 1e-5, 10.0
    accountant = dpa.rdp.RdpAccountant(list(sk.RDP_ORDERS))
    accountant.compose(dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z), rounds))
    gauss_eps = accountant.get_epsilon(delta)
    for s, tol in ((1.0, 0.5), (1e4, 1e-4)):
        l2 = 100.0 * s
        eps = sk.skellam_epsilon([(z * l2) ** 2] * rounds, delta, sk.rounded_l1_bound(l2, 4096), l2)
        assert gauss_eps <= eps <= gauss_eps * (1 + tol)


def test_rdp_monotone_in_mu_and_alpha() -> None:
    l1, l2 = sk.skellam_sensitivities(1.0, 64.0, 1024)
    alphas = np.arange(2, 200)
    previous = np.full(alphas.shape, np.inf)
    for mu in np.geomspace(10.0, 1e8, 30):
        rdp = sk.skellam_rdp(alphas, l1, l2, float(mu))
        assert np.all(np.diff(rdp) > 0)
        assert np.all(rdp < previous)
        previous = rdp
    eps = [sk.skellam_epsilon([float(mu)] * 5, 1e-5, l1, l2) for mu in np.geomspace(1e4, 1e7, 10)]
    assert all(a > b for a, b in itertools.pairwise(eps))


def test_rdp_refuses_fractional_orders_and_bad_inputs() -> None:
    with pytest.raises(PrivacyError, match="integer orders"):
        sk.skellam_rdp(2.5, 1.0, 1.0, 1.0)
    with pytest.raises(PrivacyError):
        sk.skellam_rdp(2, 0.0, 1.0, 1.0)
    assert math.isinf(float(sk.skellam_rdp(2, 1.0, 1.0, 0.0)))
    assert sk.skellam_epsilon([0.0], 1e-5, 1.0, 1.0) == math.inf


def test_calibration_meets_target_within_one_percent() -> None:
    l1, l2 = sk.skellam_sensitivities(1.0, 256.0, 2**14)
    for target, rounds in ((1.0, 1), (4.0, 200)):
        mu = sk.calibrate_mu(target, 1e-5, rounds, l1, l2)
        eps = sk.skellam_epsilon([mu] * rounds, 1e-5, l1, l2)
        assert 0.99 * target <= eps <= target
        assert sk.skellam_epsilon([mu * 0.98] * rounds, 1e-5, l1, l2) > target


# -- sampler ----------------------------------------------------------------------------------


def _chi_square_p(x: np.ndarray, dist: Any, bins: int = 40) -> float:
    """p-value of a chi-square test of integer samples ``x`` against a discrete scipy ``dist``.

    Bin ``i`` is ``(e_i, e_{i+1}]``, the inner edges ``e`` near the distribution's quantiles
    (normal approximation; only the exact CDF at the edges enters the expected counts).
    """
    z = stats.norm.ppf(np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(np.floor(dist.mean() + z * dist.std()))
    probs = np.diff(np.concatenate(([0.0], dist.cdf(edges), [1.0])))
    observed = np.bincount(np.searchsorted(edges, x, side="left"), minlength=len(probs))
    expected = probs * len(x)
    assert len(probs) >= 3 and expected.min() > 20
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("mu", [0.3, 5.0, 3000.0, 2.0**16, 1e9])
def test_skellam_noise_matches_exact_pmf(mu: float) -> None:
    # mu/2 < 2^14 uses inversion, above PTRS.
    n = 200_000
    x = sk.skellam_noise(n, mu, NoiseSource(False, seed=int(mu) + 1, purpose="test-skellam"))
    assert x.dtype == np.int64 and x.shape == (n,)
    exact = stats.skellam(mu / 2, mu / 2)
    assert _chi_square_p(x, exact) > 1e-3
    # Moments: mean 0, variance μ, skew 0 (standard errors sqrt(μ/n), μ sqrt(2/n)..., sqrt(6/n)).
    assert abs(x.mean()) < 5 * math.sqrt(mu / n)
    assert x.var() / mu == pytest.approx(1.0, abs=5 * math.sqrt((2 + 1 / mu) / n))
    assert abs(stats.skew(x)) < 5 * math.sqrt(6 / n)


@pytest.mark.parametrize("lam", [10.0, 15.0, 400.0, 2.0**39])
def test_ptrs_matches_poisson_pmf(lam: float) -> None:
    # PTRS serves λ >= 2^14 in production; it is valid from λ = 10, where the pmf is skewed
    # enough for a chi-square test to see a wrong acceptance step; 2^39 is near the cap, where
    # a naive log-pmf (λ log λ - lgamma) would lose its digits to cancellation.
    source = NoiseSource(False, seed=7, purpose="test-ptrs")
    x = sk._poisson_ptrs(200_000, lam, source)
    assert x.min() >= 0
    assert _chi_square_p(x, stats.poisson(lam)) > 1e-3


def test_poisson_inversion_reaches_both_tails() -> None:
    lo, cdf, sf = sk._poisson_tables(50.0)
    assert lo == 0 or stats.poisson(50.0).cdf(lo - 1) < 2.0**-54
    assert sf[-1] < 2.0**-54 and cdf[-1] == pytest.approx(1.0)


def test_poisson_noise_refuses_means_beyond_exact_range() -> None:
    with pytest.raises(PrivacyError, match="scale"):
        sk.poisson_noise(3, 2.0**41, NoiseSource(False, 0))
    assert not sk.poisson_noise(4, 0.0, NoiseSource(False, 0)).any()


# -- rotation ---------------------------------------------------------------------------------


def test_fwht_is_the_hadamard_matrix() -> None:
    x = np.random.default_rng(0).normal(size=(5, 16))
    np.testing.assert_allclose(sk.fwht(x), x @ linalg.hadamard(16), atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        sk.fwht(np.zeros(12))


def test_rotation_is_orthogonal_with_exact_inverse() -> None:
    n = 64
    r = sk.rotate(np.eye(n), round_seed=3)  # rows: R e_i, i.e. R^T
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)
    x = np.random.default_rng(1).normal(size=4096)
    y = sk.rotate(x, round_seed=11)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    np.testing.assert_allclose(sk.unrotate(y, round_seed=11), x, atol=1e-12)
    # A public seed: the same rotation everywhere, another one next round; it flattens.
    np.testing.assert_array_equal(sk.rotate(x, round_seed=11), y)
    assert not np.allclose(sk.rotate(x, round_seed=12), y)
    spike = np.zeros(4096)
    spike[0] = 1.0
    assert np.abs(sk.rotate(spike, round_seed=5)).max() == pytest.approx(1 / 64)
    assert sk.padded_dim(1000) == 1024 and sk.padded_dim(1024) == 1024 and sk.padded_dim(1) == 1


# -- encode / decode --------------------------------------------------------------------------


def _ring_sum(values: list[np.ndarray], bits: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    total = np.zeros(values[0].shape, dtype=np.uint64)
    for v in values:
        total += v.astype(np.uint64)  # wraps mod 2^64, a multiple of 2^bits
    if bits < 64:
        total &= np.uint64((1 << bits) - 1)
    return total.astype(dtype)


def _updates(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * rng.uniform(0.2, 1.6, size=(n, 1))


def _clipped(x: np.ndarray, clip: float) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, clip / norms)


def test_round_trip_without_noise_is_within_quantisation_bound() -> None:
    n, dim, scale = 10, 1000, 2.0**12
    mech = sk.DistributedSkellam(dim, clip=1.0, scale=scale, mu=0.0, noise_shares=n, bits=32)
    x = _updates(n, dim, seed=2)
    encodings = [
        mech.encode(u, NoiseSource(False, seed=i, purpose="client"), round_seed=9)
        for i, u in enumerate(x)
    ]
    assert [e.clipped for e in encodings] == list(np.linalg.norm(x, axis=1) > 1.0)
    assert all(e.values.dtype == np.uint32 and e.values.shape == (1024,) for e in encodings)
    decoded = mech.decode(_ring_sum([e.values for e in encodings], 32, np.uint32), n, round_seed=9)
    assert decoded.values.shape == (dim,) and decoded.suspect_wraps == 0
    error = decoded.values - _clipped(x, 1.0).sum(axis=0)
    # Each client's rounding moves each of the d' coordinates by less than 1 (zero mean,
    # variance <= 1/4): ‖error‖ <= n sqrt(d') / γ always, and about sqrt(n d' / 4) / γ.
    assert np.linalg.norm(error) <= n * math.sqrt(1024) / scale
    assert np.linalg.norm(error) <= 1.1 * math.sqrt(n * 1024 / 4) / scale
    # The wrong rotation seed gives garbage: the seed is part of the encoding.
    wrong = mech.decode(_ring_sum([e.values for e in encodings], 32, np.uint32), n, round_seed=8)
    assert np.linalg.norm(wrong.values - _clipped(x, 1.0).sum(axis=0)) > 1.0


@pytest.mark.parametrize("reported", [10, 7])
def test_decoded_noise_has_the_expected_variance(reported: int) -> None:
    n, dim, scale, mu = 10, 8192, 2.0**8, 4e4
    mech = sk.DistributedSkellam(dim, clip=1.0, scale=scale, mu=mu, noise_shares=n, bits=32)
    x = _updates(reported, dim, seed=3)
    values = [
        mech.encode(u, NoiseSource(False, seed=100 + i), round_seed=4).values
        for i, u in enumerate(x)
    ]
    decoded = mech.decode(_ring_sum(values, 32, np.uint32), reported, round_seed=4)
    expected = mech.effective_mu(reported)
    assert decoded.mu_effective == expected == pytest.approx(reported * mu / n)
    error = decoded.values - _clipped(x, 1.0).sum(axis=0)
    # Noise variance μ_eff / γ² plus rounding (at most reported / 4 / γ², 0.006% here).
    ratio = error.var() * scale**2 / expected
    assert ratio == pytest.approx(1.0, abs=4 * math.sqrt(2 / dim))


def test_effective_mu_counts_only_shares_that_arrive() -> None:
    mech = sk.DistributedSkellam(100, clip=1.0, scale=64.0, mu=1000.0, noise_shares=20)
    assert mech.effective_mu(20) == pytest.approx(1000.0)
    assert mech.effective_mu(15) == pytest.approx(750.0)
    assert mech.effective_mu(15, colluding=5) == pytest.approx(500.0)
    assert mech.effective_mu(3, colluding=5) == 0.0
    # Fewer shares, more ε: the guarantee degrades and is reported.
    assert mech.epsilon_for(10, mech.effective_mu(15), 1e-5) > mech.epsilon_for(10, None, 1e-5)


def test_skellam_account_charges_each_round_and_refuses_beyond_budget() -> None:
    mech = sk.DistributedSkellam.for_target(
        2.0, 1e-5, rounds=10, dim=512, clip=1.0, noise_shares=10, scale=128.0
    )
    account = sk.SkellamAccount(1e-5, 2.0, mech.l1, mech.l2)
    for _ in range(10):
        spent = account.charge(mech.effective_mu(10))
    assert spent == pytest.approx(mech.epsilon_for(10, None, 1e-5)) and spent <= 2.0
    before = account.spent
    with pytest.raises(PrivacyError, match="budget"):
        account.charge(mech.effective_mu(10), where="round 11")
    assert account.spent == before and len(account.mus) == 10


def test_for_target_picks_the_largest_scale_that_fits() -> None:
    mech = sk.DistributedSkellam.for_target(
        3.0, 1e-5, rounds=20, dim=4096, clip=1.0, noise_shares=50, bits=20
    )
    assert mech.budget.total <= mech.budget.limit
    assert mech.epsilon_for(20, None, 1e-5) == pytest.approx(3.0, rel=0.01)
    with pytest.raises(sk.SkellamConfigError):
        sk.DistributedSkellam.for_target(
            3.0, 1e-5, 20, 4096, 1.0, 50, bits=20, scale=mech.scale * 2
        )


# -- the ring ---------------------------------------------------------------------------------


def test_overflow_prone_settings_are_refused() -> None:
    with pytest.raises(sk.SkellamConfigError, match=r"14-bit.*bits >= \d+.*scale <="):
        sk.DistributedSkellam(1024, clip=1.0, scale=2.0**12, mu=1e6, noise_shares=10, bits=14)
    # The worst case (no assumption on the data) needs more room than the rotated bound.
    ok = sk.DistributedSkellam(4096, clip=1.0, scale=2.0**12, mu=1e6, noise_shares=10, bits=16)
    assert ok.budget.signal < ok.budget.limit
    with pytest.raises(sk.SkellamConfigError, match="bits"):
        sk.DistributedSkellam(4096, 1.0, 2.0**12, 1e6, 10, bits=16, ring_check="worst_case")
    with pytest.raises(sk.SkellamConfigError, match="scale"):  # beyond the sampler's range
        sk.DistributedSkellam(16, clip=1.0, scale=2.0**20, mu=2.0**50, noise_shares=1, bits=64)
    with pytest.raises(PrivacyError, match="sized for"):
        ok.decode(np.zeros(4096, dtype=np.uint32), 11, round_seed=0)


def test_update_aligned_with_public_rotation_wraps_and_is_flagged() -> None:
    # A malicious client that knows the round's seed can concentrate its whole norm in one
    # rotated coordinate; the high-probability ring bound assumes it does not. The wrap is
    # visible to the server as a coordinate beyond the bound the ring was sized for.
    n, dim, scale = 10, 4096, 5000.0
    mech = sk.DistributedSkellam(dim, clip=1.0, scale=scale, mu=1e4, noise_shares=n, bits=16)
    spike = np.zeros(dim)
    spike[0] = 1.0
    crafted = sk.unrotate(spike, round_seed=21)  # R crafted = e_0
    values = [
        mech.encode(crafted, NoiseSource(False, seed=i), round_seed=21).values for i in range(n)
    ]
    decoded = mech.decode(_ring_sum(values, 16, np.uint32), n, round_seed=21)
    assert decoded.suspect_wraps >= 1
    # Honest updates under the same settings do not wrap.
    honest = [
        mech.encode(u, NoiseSource(False, seed=i), round_seed=21).values
        for i, u in enumerate(_updates(n, dim, seed=5))
    ]
    assert mech.decode(_ring_sum(honest, 16, np.uint32), n, round_seed=21).suspect_wraps == 0


def test_encode_refuses_bad_updates() -> None:
    mech = sk.DistributedSkellam(8, clip=1.0, scale=16.0, mu=10.0, noise_shares=2)
    with pytest.raises(PrivacyError, match="non-finite"):
        mech.encode(np.array([1.0, np.nan, 0, 0, 0, 0, 0, 0]), NoiseSource(False, 0), round_seed=0)
    with pytest.raises(PrivacyError, match="dim"):
        mech.encode(np.zeros(7), NoiseSource(False, 0), round_seed=0)
