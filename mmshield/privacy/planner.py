"""Noise per training phase from per-modality budgets ("adaptive privacy budgeting").

A run may train in phases that read different modalities: an audio-only phase that trains the
audio encoder, then the fused model on everything. Every phase's DP mechanism is charged to each
modality it reads, so a modality's ε is the composition of the phases that read it. Given a budget
per modality, the planner picks each phase's noise multiplier by **water-filling** (max-min
fairness): raise one common noise level on all phases until the tightest modality just fits its
budget, fix the phases that modality reads at that level, and repeat with the remaining phases,
which can then use the slack that looser modalities have left. With one phase reading everything
this is plain calibration to the smallest budget; with an audio-only phase and a fused phase under
a tight image budget, the fused phase gets the noise the image budget demands and the audio-only
phase spends what remains of the audio budget.

The unit of privacy is a record (sample-level DP-SGD): a record's client may hold a different
number of records in each phase (a phase only trains on records holding one of its modalities),
so ε is computed per client and the worst client counts. A record's label is read with every
modality.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from mmshield.errors import PrivacyError
from mmshield.privacy.accountant import (
    MAX_NOISE_MULTIPLIER,
    Method,
    SampledGaussian,
    epsilon,
)

# The clients whose records are least protected (ranked by fast RDP) that the exact accountant
# then checks; the others are dominated in every configuration we have seen.
CANDIDATES = 3


@dataclass(frozen=True)
class PhaseNeeds:
    """What one phase releases about a record, for the planner.

    Parameters
    ----------
    name
        Shown in the plan and the report.
    modalities
        The modalities whose data the phase reads (its charges go to each of them).
    releases
        One entry per client: the mechanism that phase applies to each record of that client
        (its noise multiplier is ignored), or ``None`` when the client trains nothing in it.
    """

    name: str
    modalities: frozenset[str]
    releases: Sequence[SampledGaussian | None]


@dataclass(frozen=True)
class PhasePlan:
    """The planner's answer: a noise multiplier per phase and the ε each modality spends."""

    noise_multipliers: tuple[float, ...]
    epsilon_by_modality: dict[str, float]
    bottleneck: tuple[str, ...]
    """For each phase, the modality whose budget set its noise."""
    worst_clients: dict[str, list[int]]
    """Per modality, the clients whose records are least protected (:func:`candidates`)."""


def _with_sigma(m: SampledGaussian, sigma: float) -> SampledGaussian:
    return replace(m, noise_multiplier=sigma)


def modality_epsilon(
    phases: Sequence[PhaseNeeds],
    sigmas: Sequence[float],
    modality: str,
    delta: float,
    method: Method = "pld",
    clients: Sequence[int] | None = None,
    coarse: bool = False,
) -> float:
    """ε of ``modality``'s records: the worst client's composition of the phases reading it."""
    n = len(phases[0].releases) if phases else 0
    worst = 0.0
    for c in range(n) if clients is None else clients:
        mechs = [
            _with_sigma(m, s)
            for p, s in zip(phases, sigmas, strict=True)
            if modality in p.modalities and (m := p.releases[c]) is not None
        ]
        if mechs:
            worst = max(worst, epsilon(mechs, delta, method, coarse=coarse))
    return worst


def candidates(phases: Sequence[PhaseNeeds], modality: str, delta: float) -> list[int]:
    """The clients least protected at σ = 1 for ``modality`` (RDP ranking; fast).

    Clients with the same releases in every phase are ranked once.
    """
    n = len(phases[0].releases) if phases else 0
    first: dict[tuple[SampledGaussian | None, ...], int] = {}
    for c in range(n):
        first.setdefault(tuple(p.releases[c] for p in phases), c)
    ones = [1.0] * len(phases)
    ranked = sorted(
        first.values(),
        key=lambda c: modality_epsilon(phases, ones, modality, delta, "rdp", [c], coarse=True),
        reverse=True,
    )
    return ranked[:CANDIDATES]


def _smallest_sigma(
    eps_at: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    rel_tol: float,
) -> float:
    """Smallest σ in [lo, hi] with ``eps_at(σ) <= target`` (ε falls as σ grows), by bisection."""
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if eps_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _level_for(
    phases: Sequence[PhaseNeeds],
    sigmas: Sequence[float | None],
    modality: str,
    budget: float,
    delta: float,
    method: Method,
    worst: Sequence[int],
) -> float:
    """Smallest common σ for the unplanned phases reading ``modality`` within its budget."""

    def eps_at(s: float, how: Method, clients: Sequence[int] = worst) -> float:
        trial = [s if v is None else v for v in sigmas]
        return modality_epsilon(phases, trial, modality, delta, how, clients, coarse=True)

    floor = eps_at(MAX_NOISE_MULTIPLIER, "rdp")
    if floor > budget:
        raise PrivacyError(
            f"modality {modality!r}: ε = {budget:g} at δ = {delta:g} cannot be reached by "
            f"these phases: the smallest reachable ε is {floor:.4g}; give {modality!r} a larger "
            "budget, or train fewer rounds on it"
        )
    # RDP (fast) first; the exact accountant's ε is never larger, so its σ lies below.
    level = _smallest_sigma(lambda s: eps_at(s, "rdp"), budget, 1e-2, MAX_NOISE_MULTIPLIER, 1e-2)
    if method == "pld":
        # Bisect on the least protected client alone, then make sure the others fit too.
        level = _smallest_sigma(
            lambda s: eps_at(s, "pld", worst[:1]), budget, 0.5 * level, level, 2e-3
        )
        while eps_at(level, "pld") > budget:
            level *= 1.002
    return level


def plan_phase_noise(
    phases: Sequence[PhaseNeeds],
    budgets: Mapping[str, float],
    delta: float,
    method: Method = "pld",
) -> PhasePlan:
    """Noise multiplier per phase so that every modality stays within its ε budget.

    Parameters
    ----------
    phases
        The run's phases in order.
    budgets
        ε allowed per modality (every modality some phase reads must have one).
    delta
        The δ of every modality's guarantee.
    method
        Accountant (``pld`` or ``rdp``).

    Raises
    ------
    PrivacyError
        A modality has no budget, or its budget is below what even the largest noise reaches
        (the message names the smallest reachable ε).
    """
    read = sorted({m for p in phases for m in p.modalities})
    missing = [m for m in read if m not in budgets]
    if missing:
        raise PrivacyError(
            f"no ε budget for modalit{'y' if len(missing) == 1 else 'ies'} {missing}: give "
            "privacy.sample_level.epsilon as one number or a value for every modality"
        )
    sigmas: list[float | None] = [None] * len(phases)
    bottleneck: list[str] = [""] * len(phases)
    worst = {m: candidates(phases, m, delta) for m in read}
    while any(s is None for s in sigmas):
        best: tuple[float, str] | None = None
        solved: dict[tuple[frozenset[int], float], float] = {}
        for m in read:
            reads = frozenset(i for i, p in enumerate(phases) if m in p.modalities)
            if all(sigmas[i] is not None for i in reads):
                continue
            # Modalities read by the same phases under the same budget pose the same problem.
            key = (reads, budgets[m])
            if key not in solved:
                solved[key] = _level_for(phases, sigmas, m, budgets[m], delta, method, worst[m])
            if best is None or solved[key] > best[0]:
                best = (solved[key], m)
        assert best is not None
        level, m = best
        for i, p in enumerate(phases):
            if sigmas[i] is None and m in p.modalities:
                sigmas[i], bottleneck[i] = level, m
    final = [float(s) for s in sigmas if s is not None]
    spent = {m: modality_epsilon(phases, final, m, delta, method, worst[m]) for m in read}
    return PhasePlan(tuple(final), spent, tuple(bottleneck), worst)
