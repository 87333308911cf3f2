"""Privacy accounting on Google's ``dp-accounting``: sampled Gaussian mechanisms, RDP and PLD.

Every noisy release in mmshield is a Gaussian mechanism applied to a *sampled* subset — records in
a DP-SGD batch, clients in a DP-FedAvg round — and repeated over steps and rounds. The accountant
turns such a history into (ε, δ) and, the other way round, calibrates the noise multiplier for a
target (ε, δ). It only accounts for sampling schemes whose analysis is proven:

- ``poisson``: each record (or client) joins independently with probability ``q``. Both RDP
  (Mironov et al. 2019) and PLD (Koskela et al.; Doroshenko et al. 2022) handle it; PLD is the
  tighter and the default.
- ``without_replacement``: a uniformly drawn fixed-size subset (Wang, Balle, Kasiviswanathan 2019),
  under the replace-one relation; RDP only, so asking for PLD is refused rather than silently
  switched.

Anything else — notably shuffled fixed-size minibatches, which most DP-SGD code accounts for *as if*
they were Poisson — is refused with a :class:`~mmshield.errors.PrivacyError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import dp_accounting as dpa
from dp_accounting import pld, rdp

from mmshield.errors import PrivacyError

Method = Literal["pld", "rdp"]
Sampling = Literal["poisson", "without_replacement", "none"]

# Calibration searches noise multipliers up to this value; beyond it a model learns nothing.
MAX_NOISE_MULTIPLIER = 1_000.0


@dataclass(frozen=True)
class SampledGaussian:
    """A Gaussian mechanism on a sampled subset, repeated ``steps`` times.

    Parameters
    ----------
    noise_multiplier
        Noise standard deviation divided by the sensitivity (the clipping norm).
    steps
        How many times it is applied (DP-SGD steps, or federated rounds).
    sampling
        ``poisson`` (rate ``sampling_rate``), ``without_replacement`` (``sample_size`` of
        ``population``) or ``none`` (everyone, every time).
    sampling_rate
        Poisson inclusion probability ``q``.
    population, sample_size
        For ``without_replacement``.
    """

    noise_multiplier: float
    steps: int
    sampling: Sampling = "poisson"
    sampling_rate: float = 1.0
    population: int = 0
    sample_size: int = 0

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise PrivacyError(f"noise multiplier must be > 0, got {self.noise_multiplier}")
        if self.steps < 0:
            raise PrivacyError(f"steps must be >= 0, got {self.steps}")
        if self.sampling == "poisson" and not 0 < self.sampling_rate <= 1:
            raise PrivacyError(f"Poisson sampling rate must be in (0, 1], got {self.sampling_rate}")
        if self.sampling == "without_replacement" and not (0 < self.sample_size <= self.population):
            raise PrivacyError(
                f"sampling without replacement needs 0 < sample_size <= population, got "
                f"{self.sample_size} of {self.population}"
            )
        if self.sampling not in ("poisson", "without_replacement", "none"):
            raise PrivacyError(
                f"sampling scheme {self.sampling!r} has no proven accounting; use Poisson "
                "sampling (records or clients join independently) or sampling without replacement"
            )

    def event(self) -> dpa.DpEvent:
        """The ``dp-accounting`` event."""
        gaussian = dpa.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "poisson":
            one: dpa.DpEvent = (
                gaussian
                if self.sampling_rate == 1
                else dpa.PoissonSampledDpEvent(self.sampling_rate, gaussian)
            )
        elif self.sampling == "without_replacement":
            one = dpa.SampledWithoutReplacementDpEvent(self.population, self.sample_size, gaussian)
        else:
            one = gaussian
        return dpa.SelfComposedDpEvent(one, self.steps)


def _relation(mechanisms: Sequence[SampledGaussian]) -> dpa.NeighboringRelation:
    kinds = {m.sampling for m in mechanisms if m.sampling != "none"}
    if kinds == {"without_replacement"}:
        return dpa.NeighboringRelation.REPLACE_ONE
    if len(kinds) > 1:
        raise PrivacyError(
            "Poisson sampling and sampling without replacement use different neighbouring "
            "relations (add/remove one vs replace one) and cannot be composed in one account"
        )
    return dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    # dp-accounting's RDP logs a warning for every fractional order whose series does not
    # converge and that it therefore (soundly) leaves out; hundreds per calibration.
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _accountant(
    method: Method, relation: dpa.NeighboringRelation, coarse: bool = False
) -> dpa.PrivacyAccountant:
    if method == "rdp":
        # Fractional orders at large sampling rates cost ~1,000 series terms each; integer
        # orders alone are fast and give a slightly larger (still valid) ε.
        orders = [*range(2, 65), 80, 96, 128, 256, 512, 1024] if coarse else None
        return rdp.RdpAccountant(orders, neighboring_relation=relation)
    if method == "pld":
        if relation != dpa.NeighboringRelation.ADD_OR_REMOVE_ONE:
            raise PrivacyError(
                "PLD accounting supports Poisson sampling only; use method 'rdp' for sampling "
                "without replacement, or switch the sampler to Poisson"
            )
        # The PLD is discretised pessimistically: a coarser grid is faster and gives a slightly
        # larger (still valid) ε, which is what noise calibration wants.
        return pld.PLDAccountant(relation, value_discretization_interval=1e-3 if coarse else 1e-4)
    raise PrivacyError(f"accounting method {method!r} is unknown; use 'pld' or 'rdp'")


def epsilon(
    mechanisms: Sequence[SampledGaussian],
    delta: float,
    method: Method = "pld",
    coarse: bool = False,
) -> float:
    """ε of the composition of ``mechanisms`` at ``delta``.

    Parameters
    ----------
    mechanisms
        Everything released about the same data (one entry per training phase or round type).
    delta
        Target δ (usually well below 1 / number of records).
    method
        ``pld`` (tight; default) or ``rdp``.
    coarse
        Trade a little tightness for speed (integer RDP orders, a coarser PLD grid); the ε is
        still a valid upper bound.
    """
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")
    accountant = _accountant(method, _relation(mechanisms), coarse)
    event = dpa.ComposedDpEvent([m.event() for m in mechanisms])
    if not accountant.supports(event):
        raise PrivacyError(f"the {method} accountant cannot account for {event}")
    with _quiet_absl():
        accountant.compose(event)
        return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    template: SampledGaussian,
    method: Method = "pld",
    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER,
) -> float:
    """Smallest noise multiplier for which ``template`` (its σ replaced) meets (ε, δ).

    Parameters
    ----------
    target_epsilon, delta
        The guarantee asked for.
    template
        The mechanism's sampling and steps (its own noise multiplier is ignored).
    method
        Accountant.
    max_noise_multiplier
        The largest σ considered.

    Raises
    ------
    PrivacyError
        When even ``max_noise_multiplier`` does not reach ``target_epsilon``; the message names
        the smallest reachable ε.
    """
    if not target_epsilon > 0:
        raise PrivacyError(f"target epsilon must be > 0, got {target_epsilon}")

    def with_sigma(sigma: float) -> SampledGaussian:
        return SampledGaussian(
            sigma,
            template.steps,
            template.sampling,
            template.sampling_rate,
            template.population,
            template.sample_size,
        )

    floor = epsilon([with_sigma(max_noise_multiplier)], delta, method, coarse=True)
    if floor > target_epsilon:
        raise PrivacyError(
            f"ε = {target_epsilon:g} at δ = {delta:g} cannot be reached with {template.steps} "
            f"steps at this sampling: the smallest reachable ε is {floor:.4g} (at noise "
            f"multiplier {max_noise_multiplier:g}); lower the number of steps or the sampling "
            "rate, or raise δ or ε"
        )
    relation = _relation([template])

    def solve(m: Method, bracket: dpa.mechanism_calibration.BracketInterval) -> float:
        with _quiet_absl():
            return float(
                dpa.calibrate_dp_mechanism(
                    lambda: _accountant(m, relation, coarse=True),
                    lambda sigma: with_sigma(sigma).event(),
                    target_epsilon,
                    delta,
                    bracket,
                    tol=1e-4,
                )
            )

    # RDP is fast at any σ; PLD is slow (and memory-hungry) at small σ. PLD's ε is never above
    # RDP's, so the RDP answer bounds the PLD one from above; PLD needs at most a few tens of
    # percent less, which keeps its search away from tiny σ.
    sigma_rdp = solve("rdp", dpa.LowerEndpointAndGuess(1e-2, 1.0))
    if method == "rdp":
        return sigma_rdp
    return solve("pld", dpa.ExplicitBracketInterval(0.5 * sigma_rdp, sigma_rdp))
