"""Distributed DP for secure aggregation: the distributed Skellam mechanism.

Agarwal, Kairouz and Liu, "The Skellam Mechanism for Differentially Private Federated Learning"
(NeurIPS 2021, arXiv:2110.04995), on the client pipeline of Kairouz, Liu and Steinke, "The
Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation" (ICML
2021, arXiv:2102.06387). Each client, on its own update ``x`` (float, length ``d``):

1. clips it to L2 norm ``c``;
2. pads it with zeros to ``d' = 2^ceil(log2 d)`` and rotates it with the randomized Hadamard
   transform ``R x = H D x / sqrt(d')`` (``D``: random signs from a **public** per-round seed, so
   every client and the server use the same ``R``; ``H``: Walsh-Hadamard). ``R`` is orthogonal,
   so norms are unchanged, and it spreads the vector's mass evenly over the coordinates, which
   keeps the modular sum far from the ring's edge;
3. multiplies by the fixed-point scale ``γ``;
4. rounds each coordinate to a neighbouring integer at random (up with probability equal to its
   fractional part), retrying until the rounded vector's L2 norm is at most
   :func:`rounded_l2_bound` ("conditional randomized rounding"), so that one client moves the
   integer sum by at most ``Δ2`` in L2 norm and ``Δ1 = Δ2 min(sqrt(d'), Δ2)`` in L1 norm;
5. adds integer noise ``Skellam(μ / (2 m), μ / (2 m))`` per coordinate (``m``: the number of
   noise shares planned, usually the expected number of clients; Skellam is the difference of two
   independent Poissons, so shares add up: ``k`` shares make ``Skellam(k μ / 2m, k μ / 2m)``);
6. reduces mod ``2^bits``, ready for secure aggregation (SecAgg+ sums in the same ring).

The server unmasks only the sum, reads it as signed ``bits``-bit integers, rotates back and
divides by ``γ``. It never sees a sum with less noise than the shares of the clients in it: when
all ``m`` planned clients report, the sum carries variance ``μ`` per coordinate, which is what the
accountant is told; when only ``k`` report (dropouts, a small Poisson draw), the noise is
``k μ / m`` and :meth:`DistributedSkellam.effective_mu` says so, so each round can be accounted
with its real noise (the guarantee degrades gracefully and is reported, never overstated).

**Privacy accounting.** The RDP of the Skellam mechanism (:func:`skellam_rdp`) adds over rounds;
(ε, δ) comes from ``dp_accounting``'s RDP conversion. The unit is one client, zero-out
adjacency (neighbouring federations differ in one client's rounded update, its noise share
present in both; replace-one would double ``Δ1`` and ``Δ2``). **No amplification by sampling**:
the server runs secure aggregation with the clients of the round and so knows who took part,
and ``dp-accounting`` offers no subsampled-Skellam event (a general subsampled-RDP bound exists,
Zhu & Wang 2019, but it protects only against parties who do not know the sample). Every round
a client takes part in counts fully.

**Sampling.** The noise comes from :class:`~mmshield.privacy.noise.NoiseSource` (ChaCha20),
never from NumPy's or Python's generators. Poisson variates are exact up to the 53-bit
resolution of the uniforms and float64 rounding: inversion of the Poisson CDF (computed by
``scipy.special.pdtr``/``pdtrc``, lower tail from the CDF and upper tail from the survival
function so both tails keep full precision) for ``λ < 2^14``, and Hörmann's transformed
rejection with squeeze (PTRS, 1993; the algorithm NumPy uses) for larger ``λ``, with the Poisson
log-pmf evaluated by Loader's saddle-point form (``stirlerr`` and ``bd0``) so the acceptance test
does not lose digits to cancellation at large ``λ``. ``λ`` is capped at ``2^40`` per draw.

**The ring.** The construction checks that the sum of ``max_clients`` encodings fits in
``bits`` bits except with probability :attr:`RingBudget.wrap_probability` per round
(``modclip_prob`` for the noise tail, plus as much again for the rotated signal under the
default ``high_probability`` check; see :meth:`DistributedSkellam.ring_budget`), and refuses,
naming bits and scale, when it does not. :meth:`DistributedSkellam.decode` counts coordinates
that lie beyond that bound (wrap-arounds, as far as the server can see them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from scipy import special

from mmshield.errors import ConfigError, PrivacyError
from mmshield.privacy.noise import NoiseSource

DEFAULT_BETA = math.exp(-0.5)
"""Conditional rounding's ``β`` (TensorFlow Federated's default)."""

RDP_ORDERS: tuple[int, ...] = (*range(2, 129), 256)
"""Integer RDP orders, those of the reference code (``accounting_utils.RDP_ORDERS``)."""

MAX_LAMBDA = 2.0**40
"""Largest Poisson mean one draw may have (the samplers' float64 exactness limit)."""

RingCheck = Literal["high_probability", "worst_case"]

_INVERSION_LIMIT = 2.0**14  # inversion below, PTRS above
_MAX_ROUNDING_ATTEMPTS = 1_000
_LOG_2PI = math.log(2.0 * math.pi)


class SkellamConfigError(PrivacyError, ConfigError):
    """A distributed-Skellam configuration cannot be used safely (the message says how to fix)."""


# --------------------------------------------------------------------------------------------
# Accounting


def _check_sensitivities(l1: float, l2: float) -> None:
    if not (math.isfinite(l1) and math.isfinite(l2) and l1 > 0 and l2 > 0):
        raise PrivacyError(f"Skellam sensitivities must be positive and finite, got {l1}, {l2}")


def skellam_rdp(
    alpha: float | Sequence[float] | np.ndarray, l1: float, l2: float, mu: float
) -> np.ndarray:
    """RDP of the multidimensional Skellam mechanism, at integer orders ``alpha``.

    For integer vectors with L1 sensitivity ``Δ1`` and L2 sensitivity ``Δ2`` and noise
    ``Skellam(μ / 2, μ / 2)`` per coordinate (variance ``μ``)::

        ε(α) = α Δ2² / (2 μ) + min( ((2α - 1) Δ2² + 6 Δ1) / (4 μ²),  3 Δ1 / (2 μ) )

    Agarwal, Kairouz, Liu 2021 (arXiv:2110.04995), the multidimensional Skellam RDP bound (a
    derived copy of the reference code cites it as Corollary 4.1; the formula was checked, not
    the theorem's numbering). Checked against the authors' code,
    ``google-research/federated`` ``distributed_dp/accounting_utils.py::_skellam_rdp`` (commit
    5e27a86), which writes the same bound in unscaled units (sensitivities divided by the scale
    ``s``, ``μ`` divided by ``s²``); two derived copies (dordis, Skellam-mixture code) agree.
    Note the second term of the minimum uses ``Δ1`` (not ``Δ2``) in that code; ``Δ1 >= Δ2`` so
    this is the conservative reading. The reference evaluates integer orders only, and so does
    this function.

    Parameters
    ----------
    alpha
        RDP order(s), integers ``>= 2``.
    l1, l2
        ``Δ1`` and ``Δ2`` in the integer domain.
    mu
        Total noise variance per coordinate (``μ >= 0``; ``0`` gives infinite RDP).

    Returns
    -------
    numpy.ndarray
        ``ε(α)``, shaped like ``alpha``.
    """
    a = np.asarray(alpha, dtype=np.float64)
    if not np.all((a >= 2) & (a == np.floor(a))):
        raise PrivacyError(f"Skellam RDP is evaluated at integer orders >= 2, got {alpha}")
    _check_sensitivities(l1, l2)
    if not mu >= 0:
        raise PrivacyError(f"Skellam variance μ must be >= 0, got {mu}")
    if mu == 0:
        return np.full(a.shape, np.inf)
    first = a * l2**2 / (2.0 * mu)
    second = np.minimum(((2.0 * a - 1.0) * l2**2 + 6.0 * l1) / (4.0 * mu**2), 1.5 * l1 / mu)
    out: np.ndarray = first + second
    return out


def skellam_epsilon(
    mus: Sequence[float],
    delta: float,
    l1: float,
    l2: float,
    orders: Sequence[int] = RDP_ORDERS,
) -> float:
    """ε at ``delta`` of releases with Skellam variances ``mus`` (one per round), composed.

    RDP adds over rounds; the conversion is ``dp_accounting``'s
    ``rdp_privacy_accountant.compute_epsilon`` (the improved conversion of Canonne, Kamath and
    Steinke 2020, Prop. 12: ``ε = rdp + log((α-1)/α) - (log δ + log α) / (α - 1)``, minimised
    over the orders). A round with ``μ = 0`` releases an un-noised sum (ε = ∞); rounds in which
    nothing was released must be left out by the caller.
    """
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    if not mus:
        return 0.0
    total = np.zeros(len(orders))
    for mu in mus:
        total += skellam_rdp(orders, l1, l2, mu)
    if not np.all(np.isfinite(total)):
        return math.inf
    eps, _ = compute_epsilon(list(orders), total.tolist(), delta)
    return float(eps)


def calibrate_mu(
    target_epsilon: float,
    delta: float,
    rounds: int,
    l1: float,
    l2: float,
    orders: Sequence[int] = RDP_ORDERS,
) -> float:
    """Smallest total variance ``μ`` (to a relative 1e-7, rounded up) for which ``rounds``
    Skellam releases with sensitivities ``l1``, ``l2`` meet (``target_epsilon``, ``delta``).

    Bisection on ``log μ``; ε decreases in ``μ`` (every term of :func:`skellam_rdp` does).
    """
    if not target_epsilon > 0:
        raise PrivacyError(f"target ε must be > 0, got {target_epsilon}")
    if rounds < 1:
        raise PrivacyError(f"rounds must be >= 1, got {rounds}")
    _check_sensitivities(l1, l2)

    def eps(mu: float) -> float:
        return skellam_epsilon([mu] * rounds, delta, l1, l2, orders)

    low, high = 0.0, l2**2
    for _ in range(400):
        if eps(high) <= target_epsilon:
            break
        low, high = high, 2.0 * high
    else:  # pragma: no cover - ε(μ) -> 0 as μ -> ∞
        raise PrivacyError(f"no Skellam variance reaches ε = {target_epsilon} at δ = {delta}")
    while low == 0.0 or high / low - 1.0 > 1e-7:
        mid = math.sqrt(low * high) if low > 0 else high / 2.0
        if eps(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
        if low == 0.0 and high < 1e-300:  # pragma: no cover - degenerate
            break
    return high


def rounded_l2_bound(clip: float, scale: float, dim: int, beta: float = DEFAULT_BETA) -> float:
    """L2 norm bound ``Δ2`` of a scaled vector after conditional randomized rounding.

    A vector of L2 norm at most ``c' = γ c`` in ``d`` dimensions, rounded coordinate-wise at
    random to a neighbouring integer, has norm at most ``c' + sqrt(d)`` always, and at most::

        sqrt( c'² + d / 4 + sqrt(2 ln(1/β)) (c' + sqrt(d) / 2) )

    with probability at least ``1 - β`` (Kairouz, Liu, Steinke 2021, Theorem 1 / Eq. 2 /
    Proposition 22 of arXiv:2102.06387). Conditional rounding retries until the rounded norm is
    at most the smaller of the two, so that is a hard bound. Checked against
    ``google-research/federated`` ``distributed_dp/accounting_utils.py::rounded_l2_norm_bound``
    and ``compression_utils.py::stochastic_rounding`` (same formula; ``β = 0`` means no
    conditioning and the first bound).

    Parameters
    ----------
    clip
        ``c``, the L2 clip norm of the float update.
    scale
        ``γ``, the fixed-point scale.
    dim
        ``d``, the (padded) dimension of the rounded vector.
    beta
        In ``[0, 1)``.
    """
    if not (clip > 0 and scale > 0 and dim >= 1 and 0 <= beta < 1):
        raise PrivacyError(
            f"need clip > 0, scale > 0, dim >= 1 and 0 <= beta < 1, got {clip}, {scale}, "
            f"{dim}, {beta}"
        )
    c = clip * scale
    bound_1 = c + math.sqrt(dim)
    if beta == 0:
        return bound_1
    squared_2 = (
        c**2 + 0.25 * dim + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + 0.5 * math.sqrt(dim))
    )
    return min(bound_1, math.sqrt(squared_2))


def rounded_l1_bound(l2: float, dim: int) -> float:
    """``Δ1 <= Δ2 min(sqrt(d), Δ2)`` for integer vectors (``|v_i| <= v_i²`` for integers)."""
    return l2 * min(math.sqrt(dim), l2)


def skellam_sensitivities(
    clip: float, scale: float, dim: int, beta: float = DEFAULT_BETA
) -> tuple[float, float]:
    """``(Δ1, Δ2)`` of one client's rounded vector (``dim``: the padded dimension)."""
    l2 = rounded_l2_bound(clip, scale, dim, beta)
    return rounded_l1_bound(l2, dim), l2


# --------------------------------------------------------------------------------------------
# Sampling


@functools.lru_cache(maxsize=32)
def _poisson_tables(lam: float) -> tuple[int, np.ndarray, np.ndarray]:
    """``lo``, CDF and survival function of Poisson(``lam``) on ``lo .. hi``.

    The range covers every value a 53-bit uniform can reach: ``cdf(lo - 1) < 2^-54`` and
    ``sf(hi) < 2^-54``.
    """
    tiny = 2.0**-54
    width = 10.0 * math.sqrt(lam) + 45.0
    lo = max(0, math.floor(lam - width))
    while lo > 0 and special.pdtr(lo - 1, lam) >= tiny:
        lo = max(0, lo - math.ceil(width))
    hi = math.ceil(lam + width)
    while special.pdtrc(hi, lam) >= tiny:
        hi += math.ceil(width)
    k = np.arange(lo, hi + 1, dtype=np.float64)
    cdf = special.pdtr(k, lam)
    sf = special.pdtrc(k, lam)
    cdf.setflags(write=False)
    sf.setflags(write=False)
    return lo, cdf, sf


def _poisson_inversion(n: int, lam: float, source: NoiseSource) -> np.ndarray:
    """Poisson(``lam``) by inversion: ``min{k : F(k) >= u}``.

    For ``u < 1/2`` the CDF table is searched; for ``u >= 1/2`` the equivalent condition
    ``sf(k) <= 1 - u`` (``1 - u`` is exact for these uniforms), so the upper tail is resolved as
    finely as the lower one.
    """
    lo, cdf, sf = _poisson_tables(lam)
    u = source.uniform(n)
    low = u < 0.5
    out = np.empty(n, dtype=np.int64)
    out[low] = np.searchsorted(cdf, u[low], side="left")
    out[~low] = np.searchsorted(-sf, -(1.0 - u[~low]), side="left")
    return out + lo


def _stirlerr(k: np.ndarray) -> np.ndarray:
    """``log k! - ((k + 1/2) log k - k + log(2π) / 2)`` for integers ``k >= 1`` (float64)."""
    out = np.empty_like(k)
    small = k <= 15
    ks = k[small]
    out[small] = special.gammaln(ks + 1.0) - (ks + 0.5) * np.log(ks) + ks - 0.5 * _LOG_2PI
    kb = k[~small]
    k2 = 1.0 / (kb * kb)
    s0, s1, s2, s3, s4 = 1 / 12, 1 / 360, 1 / 1260, 1 / 1680, 1 / 1188
    out[~small] = (s0 - (s1 - (s2 - (s3 - s4 * k2) * k2) * k2) * k2) / kb
    return out


def _bd0(x: np.ndarray, m: float) -> np.ndarray:
    """``x log(x / m) + m - x`` without cancellation (Loader 2000), for ``x >= 1``, ``m > 0``."""
    out = x * np.log(x / m) + m - x
    near = np.abs(x - m) < 0.1 * (x + m)
    if near.any():
        xn = x[near]
        v = (xn - m) / (xn + m)
        s = (xn - m) * v
        term = 2.0 * xn * v
        v2 = v * v
        for j in range(1, 16):  # |v| < 0.1: 16 terms reach far below float64 resolution
            term = term * v2
            s = s + term / (2 * j + 1)
        out[near] = s
    return out


def _poisson_logpmf(k: np.ndarray, lam: float) -> np.ndarray:
    """``log P(X = k)`` for ``X ~ Poisson(lam)``, ``k >= 0`` integers (float64), stably."""
    out = np.full(k.shape, -lam)
    pos = k >= 1
    kp = k[pos]
    out[pos] = -_stirlerr(kp) - _bd0(kp, lam) - 0.5 * (_LOG_2PI + np.log(kp))
    return out


def _poisson_ptrs(n: int, lam: float, source: NoiseSource) -> np.ndarray:
    """Poisson(``lam``), ``lam >= 10``: Hörmann's PTRS, vectorised over the pending draws."""
    slam = math.sqrt(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    vr = 0.9277 - 3.6224 / (b - 2.0)
    out = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    while pending.size:
        m = pending.size
        u = source.uniform(m) - 0.5
        v = source.uniform(m)
        us = 0.5 - np.abs(u)
        k = np.floor((2.0 * a / us + b) * u + lam + 0.43)
        accept = (us >= 0.07) & (v <= vr)
        maybe = ~accept & (k >= 0) & ~((us < 0.013) & (v > us))
        idx = np.flatnonzero(maybe)
        if idx.size:
            lhs = np.log(v[idx]) + log_inv_alpha - np.log(a / (us[idx] * us[idx]) + b)
            accept[idx] = lhs <= _poisson_logpmf(k[idx], lam)
        out[pending[accept]] = k[accept].astype(np.int64)
        pending = pending[~accept]
    return out


def poisson_noise(n: int, lam: float, source: NoiseSource) -> np.ndarray:
    """``n`` independent Poisson(``lam``) integers (int64) from ``source``'s uniforms."""
    if not (math.isfinite(lam) and 0 <= lam <= MAX_LAMBDA):
        raise PrivacyError(
            f"Poisson mean {lam:g} is outside [0, 2^40], the range the sampler is exact on; "
            "lower the fixed-point scale (the noise variance grows with its square)"
        )
    if n == 0 or lam == 0:
        return np.zeros(n, dtype=np.int64)
    if lam < _INVERSION_LIMIT:
        return _poisson_inversion(n, lam, source)
    return _poisson_ptrs(n, lam, source)


def skellam_noise(shape: int | tuple[int, ...], mu: float, source: NoiseSource) -> np.ndarray:
    """Integer noise ``Skellam(μ/2, μ/2) = Poisson(μ/2) - Poisson(μ/2)`` of ``shape`` (int64).

    Mean 0, variance ``μ``, symmetric. Exact in distribution up to the 53-bit resolution of the
    uniforms (see the module docstring); never a Gaussian approximation.
    """
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    n = math.prod(dims)
    if not mu >= 0:
        raise PrivacyError(f"Skellam variance μ must be >= 0, got {mu}")
    both = poisson_noise(2 * n, mu / 2.0, source)
    return (both[:n] - both[n:]).reshape(dims)


# --------------------------------------------------------------------------------------------
# Rotation


def fwht(x: np.ndarray) -> np.ndarray:
    """Unnormalised fast Walsh-Hadamard transform along the last axis (length a power of 2).

    Returns a new float64 array ``x H`` (``H`` Sylvester-ordered, symmetric, ``H H = n I``).
    """
    y = np.array(x, dtype=np.float64)
    n = y.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}")
    lead = y.shape[:-1]
    h = 1
    while h < n:
        blocks = y.reshape(*lead, n // (2 * h), 2, h)
        first, second = blocks[..., 0, :], blocks[..., 1, :]
        y = np.stack((first + second, first - second), axis=-2).reshape(*lead, n)
        h *= 2
    return y


def padded_dim(dim: int) -> int:
    """The power of two the rotation works in: ``2^ceil(log2 dim)``."""
    return 1 << max(0, (dim - 1).bit_length())


def rotation_signs(dim: int, round_seed: int) -> np.ndarray:
    """The diagonal ``D`` (±1, float64) of the public randomized Hadamard rotation of a round.

    Drawn from a ChaCha20 stream keyed by ``round_seed`` (public: every client and the server
    derive the same rotation; its secrecy plays no part in the privacy guarantee).
    """
    u = NoiseSource(secure=False, seed=round_seed, purpose="skellam-rotation").uniform(dim)
    return np.where(u < 0.5, -1.0, 1.0)


def rotate(x: np.ndarray, round_seed: int) -> np.ndarray:
    """``R x = H D x / sqrt(n)`` along the last axis (length ``n``, a power of 2)."""
    n = x.shape[-1]
    return fwht(x * rotation_signs(n, round_seed)) / math.sqrt(n)


def unrotate(y: np.ndarray, round_seed: int) -> np.ndarray:
    """``R^T y = D H y / sqrt(n)``, the exact inverse of :func:`rotate`."""
    n = y.shape[-1]
    out: np.ndarray = fwht(y) * (rotation_signs(n, round_seed) / math.sqrt(n))
    return out


# --------------------------------------------------------------------------------------------
# The mechanism


class SkellamEncoding(NamedTuple):
    """One client's contribution.

    Attributes
    ----------
    values
        The noised integer vector mod ``2^bits`` (``uint32`` for ``bits <= 32``, else
        ``uint64``), length :attr:`DistributedSkellam.padded_dim`.
    clipped
        Whether the update's norm exceeded the clip norm (the client must report it: its masked
        update hides that from the server).
    rounding_attempts
        How many randomized roundings conditional rounding drew (1 in the usual case).
    """

    values: np.ndarray
    clipped: bool
    rounding_attempts: int


class SkellamDecoded(NamedTuple):
    """The server's decoding of a sum.

    Attributes
    ----------
    values
        The float64 sum of the included clients' clipped updates plus noise, length ``dim``.
    mu_effective
        The integer-domain noise variance per coordinate this sum carries (what to account).
    suspect_wraps
        Coordinates whose signed sum lies beyond the bound the ring was sized for: each is a
        wrap-around (or a tail event of probability below ``modclip_prob``). Wrap-arounds whose
        value lands back inside the bound cannot be told apart from ordinary values, so this is
        a lower bound on the number of wrapped coordinates.
    """

    values: np.ndarray
    mu_effective: float
    suspect_wraps: int


@dataclass(frozen=True)
class RingBudget:
    """How the ring's half-range ``2^(bits-1) - 1`` is spent (integer units).

    Attributes
    ----------
    signal
        Bound on the sum of ``max_clients`` rounded, rotated updates in one coordinate.
    noise
        Bound on the sum of their noise in one coordinate (Bernstein, union over coordinates).
    limit
        ``2^(bits-1) - 1``.
    wrap_probability
        Probability per round that some coordinate's sum exceeds ``signal + noise``.
    """

    signal: float
    noise: float
    limit: int
    wrap_probability: float

    @property
    def total(self) -> float:
        """``signal + noise``: the bound the sum stays within."""
        return self.signal + self.noise


class DistributedSkellam:
    """The distributed Skellam mechanism: client :meth:`encode`, server :meth:`decode`.

    Parameters
    ----------
    dim
        Length ``d`` of the (flattened) updates; the mechanism works in ``d' = 2^ceil(log2 d)``.
    clip
        L2 clip norm ``c`` of an update.
    scale
        Fixed-point scale ``γ`` (integer units per float unit).
    mu
        Total noise variance per coordinate, integer units, when all ``noise_shares`` shares
        reach the sum (``0``: no noise, for tests only).
    noise_shares
        ``m``: how many clients' shares together carry ``mu`` (usually the expected number of
        clients per round, times a safety factor ``< 1`` if dropouts are expected). Each client
        adds variance ``mu / m``.
    bits
        Ring ``Z_{2^bits}`` of the secure sum (2..64).
    beta
        Conditional rounding's ``β`` in ``[0, 1)``.
    max_clients
        The most encodings ever summed (default ``ceil(noise_shares)``).
    modclip_prob
        Allowed probability per round that the sum wraps around the ring.
    ring_check
        ``high_probability`` (default): a sum's coordinates are bounded with Hoeffding's
        inequality over the rotation's random signs (the flattening of Kairouz et al.), which
        assumes the clients' updates do not depend on the round's rotation seed. ``worst_case``:
        any vectors within the clip norm fit (no assumption on the data; many more bits).

    Raises
    ------
    SkellamConfigError
        If the sum can wrap around with probability above ``modclip_prob``, or the noise is
        outside the sampler's range.
    """

    def __init__(
        self,
        dim: int,
        clip: float,
        scale: float,
        mu: float,
        noise_shares: float,
        bits: int = 32,
        beta: float = DEFAULT_BETA,
        max_clients: int | None = None,
        modclip_prob: float = 1e-9,
        ring_check: RingCheck = "high_probability",
    ) -> None:
        if dim < 1:
            raise SkellamConfigError(f"distributed_dp: dim must be >= 1, got {dim}")
        if not (math.isfinite(clip) and clip > 0):
            raise SkellamConfigError(f"distributed_dp.clip must be positive, got {clip}")
        if not (math.isfinite(scale) and scale > 0):
            raise SkellamConfigError(f"distributed_dp.scale must be positive, got {scale}")
        if not (math.isfinite(mu) and mu >= 0):
            raise SkellamConfigError(f"distributed_dp: μ must be >= 0, got {mu}")
        if not (math.isfinite(noise_shares) and noise_shares > 0):
            raise SkellamConfigError(
                f"distributed_dp.noise_shares must be positive, got {noise_shares}"
            )
        if not 2 <= bits <= 64:
            raise SkellamConfigError(f"distributed_dp.bits must be in [2, 64], got {bits}")
        if not 0 <= beta < 1:
            raise SkellamConfigError(f"distributed_dp.beta must be in [0, 1), got {beta}")
        if not 0 < modclip_prob < 1:
            raise SkellamConfigError(
                f"distributed_dp.modclip_prob must be in (0, 1), got {modclip_prob}"
            )
        if ring_check not in ("high_probability", "worst_case"):
            raise SkellamConfigError(
                f"distributed_dp.ring_check {ring_check!r} is unknown; use 'high_probability' "
                "or 'worst_case'"
            )
        self.dim = dim
        self.padded_dim = padded_dim(dim)
        self.clip = float(clip)
        self.scale = float(scale)
        self.mu = float(mu)
        self.noise_shares = float(noise_shares)
        self.bits = bits
        self.beta = beta
        self.max_clients = math.ceil(noise_shares) if max_clients is None else max_clients
        if self.max_clients < 1:
            raise SkellamConfigError(f"distributed_dp.max_clients must be >= 1, got {max_clients}")
        self.modclip_prob = modclip_prob
        self.ring_check = ring_check
        self.dtype: type[np.unsignedinteger] = np.uint32 if bits <= 32 else np.uint64
        self.l1, self.l2 = skellam_sensitivities(clip, scale, self.padded_dim, beta)
        # Rounded vectors are summed and squared in int64: keep ‖·‖² below 2^62.
        if (self.clip * self.scale + math.sqrt(self.padded_dim)) ** 2 >= 2.0**62:
            raise SkellamConfigError(
                f"distributed_dp: scale {scale:g} times clip {clip:g} exceeds 2^31 integer "
                "units; lower the scale (no precision is gained beyond the noise)"
            )
        lam = self.mu / (2.0 * self.noise_shares)
        if lam > MAX_LAMBDA:
            raise SkellamConfigError(
                f"distributed_dp: each client's noise share would need Poisson means of "
                f"{lam:.4g} > 2^40 (μ = {mu:.4g} over {noise_shares:g} shares); lower the scale "
                f"(now {scale:g}): the noise variance grows with its square and a finer grid "
                "than the noise buys nothing"
            )
        self.budget = self.ring_budget()
        if self.budget.total > self.budget.limit:
            raise SkellamConfigError(self._overflow_message())

    # -- sizing ---------------------------------------------------------------------------------

    def ring_budget(self) -> RingBudget:
        """Per-coordinate bounds on the sum of ``max_clients`` encodings (see :class:`RingBudget`).

        Noise: the sum's noise in a coordinate is Skellam with variance
        ``V = max_clients μ / m``; Bernstein's inequality (increments of size 1) gives
        ``P(|X| >= t) <= 2 exp(-t² / (2 (V + t/3)))``, and a union bound over the ``d'``
        coordinates at failure ``p = modclip_prob`` gives ``t = L/3 + sqrt(L²/9 + 2 V L)``,
        ``L = ln(2 d' / p)``.

        Signal, ``worst_case``: each rounded vector has L2 norm (hence every coordinate) at most
        ``Δ2``, so ``max_clients Δ2``. ``high_probability``: the sum of the clients' rotated
        vectors is ``γ H D s / sqrt(d')`` with ``‖s‖ <= max_clients c``, and with ``D``'s random
        signs each coordinate is a Rademacher sum: Hoeffding and a union bound at failure ``p``
        give ``max_clients γ c sqrt(2 L / d')``, plus ``max_clients`` for the rounding (each
        client moves a coordinate by less than 1), capped by the worst case.
        """
        n, d, p = self.max_clients, self.padded_dim, self.modclip_prob
        log_term = math.log(2.0 * d / p)
        variance = n * self.mu / self.noise_shares
        noise = log_term / 3.0 + math.sqrt(log_term**2 / 9.0 + 2.0 * variance * log_term)
        worst = n * math.floor(self.l2)
        if self.ring_check == "worst_case":
            signal, failure = float(worst), p
        else:
            flat = n * self.scale * self.clip * math.sqrt(2.0 * log_term / d) + n
            signal, failure = float(min(worst, flat)), 2 * p
        return RingBudget(signal, noise, (1 << (self.bits - 1)) - 1, failure)

    def _overflow_message(self) -> str:
        b = self.budget
        need_bits = math.ceil(math.log2(b.total + 1)) + 1
        # Both parts grow about linearly with the scale when μ keeps the same noise in float
        # units (μ ∝ scale²), so the scale must shrink by about limit / total.
        shrink = b.limit / b.total
        fixes = [
            f"bits >= {need_bits}",
            f"scale <= {self.scale * shrink:.4g} with μ recalibrated for it (about "
            f"{self.mu * shrink**2:.4g}: the same noise in float units)",
            "fewer clients per sum (max_clients)",
        ]
        if self.ring_check == "high_probability":
            fixes.append(f"a larger modclip_prob (now {self.modclip_prob:g})")
        else:
            fixes.append("ring_check='high_probability' (bounds the rotated sum, fewer bits)")
        return (
            f"distributed_dp: the sum of {self.max_clients} clients' encodings (clip "
            f"{self.clip:g}, scale {self.scale:g}, dimension {self.padded_dim}) can reach "
            f"±{b.signal:.4g} from the updates plus ±{b.noise:.4g} from the noise "
            f"(μ = {self.mu:.4g}, failure probability {self.modclip_prob:g}), but "
            f"{self.bits}-bit arithmetic holds only ±{b.limit}; the sum would wrap around. "
            f"Fix one of: {', '.join(fixes)}."
        )

    # -- accounting -----------------------------------------------------------------------------

    @property
    def share_variance(self) -> float:
        """Variance each client adds per coordinate (integer units): ``μ / m``."""
        return self.mu / self.noise_shares

    @property
    def noise_std(self) -> float:
        """Standard deviation of the full noise in float units: ``sqrt(μ) / γ``."""
        return math.sqrt(self.mu) / self.scale

    def effective_mu(self, n_reported: int, colluding: int = 0) -> float:
        """The noise variance a sum of ``n_reported`` clients' encodings really carries.

        ``(n_reported - colluding) μ / m``: only the shares that reached the sum count, and a
        coalition of ``colluding`` clients (together with the server) can subtract its own
        shares. Account each round with this value: it is below ``μ`` whenever fewer than ``m``
        clients reported.
        """
        if n_reported < 0 or colluding < 0:
            raise PrivacyError(f"need n_reported, colluding >= 0, got {n_reported}, {colluding}")
        return max(0, n_reported - colluding) * self.share_variance

    def epsilon_for(
        self,
        rounds: int,
        mu_effective: float | None = None,
        delta: float = 1e-5,
        orders: Sequence[int] = RDP_ORDERS,
    ) -> float:
        """ε at ``delta`` after ``rounds`` releases with variance ``mu_effective`` (default μ),
        no amplification by sampling."""
        mu = self.mu if mu_effective is None else mu_effective
        return skellam_epsilon([mu] * rounds, delta, self.l1, self.l2, orders)

    @classmethod
    def for_target(
        cls,
        target_epsilon: float,
        delta: float,
        rounds: int,
        dim: int,
        clip: float,
        noise_shares: float,
        bits: int = 32,
        scale: float | None = None,
        beta: float = DEFAULT_BETA,
        max_clients: int | None = None,
        modclip_prob: float = 1e-9,
        ring_check: RingCheck = "high_probability",
    ) -> DistributedSkellam:
        """A mechanism whose ``μ`` meets (``target_epsilon``, ``delta``) over ``rounds``.

        ``scale=None`` picks the largest power of two for which the ring holds the sum (the
        finest grid: rounding then inflates the sensitivity least).
        """

        def build(gamma: float) -> DistributedSkellam:
            l1, l2 = skellam_sensitivities(clip, gamma, padded_dim(dim), beta)
            mu = calibrate_mu(target_epsilon, delta, rounds, l1, l2)
            return cls(
                dim,
                clip,
                gamma,
                mu,
                noise_shares,
                bits=bits,
                beta=beta,
                max_clients=max_clients,
                modclip_prob=modclip_prob,
                ring_check=ring_check,
            )

        if scale is not None:
            return build(scale)
        low, high = -40, 62  # exponents of 2
        best: DistributedSkellam | None = None
        error: SkellamConfigError | None = None
        while low <= high:
            mid = (low + high) // 2
            try:
                best, low = build(2.0**mid), mid + 1
            except SkellamConfigError as err:
                error, high = err, mid - 1
        if best is None:
            assert error is not None
            raise SkellamConfigError(f"no scale fits: at the smallest scale tried, {error}")
        return best

    # -- client and server halves -------------------------------------------------------------

    def _round(self, w: np.ndarray, source: NoiseSource) -> tuple[np.ndarray, int]:
        """Conditional randomized rounding of ``w`` to integers with ‖·‖₂ <= Δ2."""
        floor = np.floor(w)
        frac = w - floor
        base = floor.astype(np.int64)
        bound_sq = self.l2 * self.l2
        for attempt in range(1, _MAX_ROUNDING_ATTEMPTS + 1):
            r = base + (source.uniform(w.size) < frac)
            if int(np.dot(r, r)) <= bound_sq:
                return r, attempt
        raise PrivacyError(  # probability at most β^1000
            f"distributed_dp: conditional rounding failed {_MAX_ROUNDING_ATTEMPTS} times "
            f"(bound Δ2 = {self.l2:.6g}); the update is probably not clipped"
        )

    def encode(
        self, update: np.ndarray, source: NoiseSource, *, round_seed: int
    ) -> SkellamEncoding:
        """Client side: clip, rotate, scale, round, add a noise share, wrap into the ring.

        Parameters
        ----------
        update
            The client's float update (any shape; ``dim`` values).
        source
            The client's own secret randomness (rounding and noise).
        round_seed
            The round's public rotation seed (the same for every client and the server; fresh
            each round).
        """
        v = np.asarray(update, dtype=np.float64).ravel()
        if v.size != self.dim:
            raise PrivacyError(f"encode: update has {v.size} values, expected dim = {self.dim}")
        finite = np.isfinite(v)
        if not finite.all():
            raise PrivacyError(
                f"encode: update has {int((~finite).sum())} non-finite value(s) (first at "
                f"index {int(np.argmin(finite))}); check the client's training for divergence"
            )
        norm = float(np.linalg.norm(v))
        clipped = norm > self.clip
        if clipped:
            v = v * (self.clip / norm)
        padded = np.zeros(self.padded_dim)
        padded[: self.dim] = v
        w = rotate(padded, round_seed) * self.scale
        rounded, attempts = self._round(w, source)
        noisy = rounded + skellam_noise(self.padded_dim, self.share_variance, source)
        if self.bits == 64:
            values = noisy.view(np.uint64)
        else:
            values = (noisy & ((1 << self.bits) - 1)).astype(self.dtype)
        return SkellamEncoding(values, clipped, attempts)

    def decode(self, total: np.ndarray, n_included: int, *, round_seed: int) -> SkellamDecoded:
        """Server side: read the ring sum of ``n_included`` encodings as floats.

        Parameters
        ----------
        total
            Sum of the encodings mod ``2^bits`` (length ``padded_dim``).
        n_included
            How many clients' encodings are in it.
        round_seed
            The round's public rotation seed.
        """
        if not 0 <= n_included <= self.max_clients:
            raise PrivacyError(
                f"decode: {n_included} encodings summed but the ring was sized for "
                f"{self.max_clients} (distributed_dp.max_clients); the sum may have wrapped"
            )
        t = np.asarray(total)
        if t.shape != (self.padded_dim,):
            raise PrivacyError(
                f"decode: the sum has shape {t.shape}, expected ({self.padded_dim},)"
            )
        if self.bits == 64:
            signed = t.astype(np.uint64).view(np.int64)
        else:
            signed = t.astype(np.int64) & ((1 << self.bits) - 1)
            signed = np.where(signed >= 1 << (self.bits - 1), signed - (1 << self.bits), signed)
        suspect = int(np.count_nonzero(np.abs(signed) > self.budget.total))
        values = unrotate(signed.astype(np.float64), round_seed)[: self.dim] / self.scale
        return SkellamDecoded(values, self.effective_mu(n_included), suspect)


class SkellamAccount:
    """The ε a distributed-Skellam run has spent, charged round by round before release.

    Each round's noise is known only once the clients have reported; :meth:`charge` adds the
    round's RDP at its effective ``μ`` and refuses (raises, charging nothing) if the run's ε
    would exceed ``budget``. No amplification by sampling (see the module docstring). A round
    in which no sum was released (no client reported, or the protocol failed) must not be
    charged; one whose sum carries no noise (``mu_effective = 0``) costs ε = ∞ and is refused.

    Charged with the ids of the clients in each sum, the account tracks every client's own RDP
    (a client is charged only for the rounds it took part in, which the server knows) and
    :attr:`spent` is the ε of the pointwise maximum of those RDP curves over clients: an upper
    bound on the worst-off client's ε, equal to it when the rounds' noise is the same.

    Parameters
    ----------
    delta
        δ of the guarantee.
    budget
        The most ε the run (its worst-off client) may spend.
    l1, l2
        The mechanism's sensitivities (:attr:`DistributedSkellam.l1`, ``l2``).
    """

    RELATIVE_TOLERANCE = 1e-6

    def __init__(
        self,
        delta: float,
        budget: float,
        l1: float,
        l2: float,
        orders: Sequence[int] = RDP_ORDERS,
    ) -> None:
        if not 0 < delta < 1:
            raise PrivacyError(f"delta must be in (0, 1), got {delta}")
        _check_sensitivities(l1, l2)
        self.delta, self.budget, self.l1, self.l2 = delta, budget, l1, l2
        self.orders = tuple(orders)
        self.rdp = np.zeros(len(self.orders))
        """Pointwise maximum over clients of their RDP so far."""
        self._everyone = np.zeros(len(self.orders))  # charged without client ids
        self._by_client: dict[int, np.ndarray] = {}
        self.spent = 0.0
        self.mus: list[float] = []
        self.participation: dict[int, int] = {}
        """Rounds each client (charged by id) took part in."""

    def charge(
        self, mu_effective: float, where: str = "round", clients: Sequence[int] | None = None
    ) -> float:
        """Charge one release with noise variance ``mu_effective``; return the cumulative ε.

        ``clients``: the ids of the clients whose updates are in the sum (``None``: charge every
        client, the run-level account).

        Raises
        ------
        PrivacyError
            If the release would bring ε above the budget (nothing is charged).
        """
        step = skellam_rdp(self.orders, self.l1, self.l2, mu_effective)
        if clients is None:
            trial = self.rdp + step
        else:
            zero = np.zeros(len(self.orders))
            trial = self.rdp.copy()
            for c in clients:
                np.maximum(trial, self._everyone + self._by_client.get(c, zero) + step, out=trial)
        if np.all(np.isfinite(trial)):
            eps = float(compute_epsilon(list(self.orders), trial.tolist(), self.delta)[0])
        else:
            eps = math.inf
        if eps > self.budget * (1 + self.RELATIVE_TOLERANCE):
            raise PrivacyError(
                f"{where}: releasing this sum (noise variance {mu_effective:.4g}) would bring the "
                f"run's ε to {eps:.4g} (δ = {self.delta:g}), above its budget {self.budget:.4g}. "
                f"Nothing of it was released; the run stops having spent ε = {self.spent:.4g}"
            )
        if clients is None:
            self._everyone += step
        else:
            for c in clients:
                self._by_client[c] = self._by_client.get(c, zero) + step
                self.participation[c] = self.participation.get(c, 0) + 1
        self.rdp, self.spent = trial, eps
        self.mus.append(mu_effective)
        return eps
