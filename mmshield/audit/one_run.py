"""Empirical ε lower bounds by one-run privacy auditing (Steinke, Nasr, Jagielski 2023).

Method
------
Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
arXiv:2305.08846). Take ``m`` canaries and include each one in the mechanism's input
independently with probability 1/2 (``S_i = +1`` in, ``-1`` out), drawn from a source the
mechanism cannot predict. Run the mechanism **once**, score every canary from its output (a higher
score means "more likely included"; e.g. minus the canary's loss, or the output coordinate a canary
moves), then guess "in" for the ``k+`` highest scores, "out" for the ``k-`` lowest and abstain on
the rest: ``r = k+ + k-`` guesses, ``v`` of them correct.

If the mechanism is (ε, δ)-DP with respect to each canary, the paper's main theorem bounds the
number of correct guesses ``W`` by (almost) a binomial: with ``q = e^ε / (1 + e^ε)`` (the accuracy
of ε-randomised response) and ``f(v) = P[Binomial(r, q) >= v]``,

    P[W >= v] <= f(v) + 2 m δ · max_{1 <= i <= v} (f(v - i) - f(v)) / i   =: p(ε).

``p(ε)`` is the p-value of the claim "(ε, δ)-DP" after seeing ``v`` correct guesses; it increases
with ε. The empirical ε (a lower bound, valid with probability at least ``1 - significance`` over
the mechanism's randomness and the canaries' inclusion) is the ε at which ``p(ε)`` reaches the
significance level: every smaller ε is rejected. This is the computation of the paper's Appendix D
code and of ``jax_privacy``'s ``epsilon_one_run``, with the bisection replaced by Brent's method.
The default significance is **0.05 (95 % confidence)**, the paper's; at it this module reproduces
the published figures ``(m, r, v, δ) = (1000, 100, 100, 0) -> 3.493``, ``(1000, 100, 90, 1e-5)
-> 1.626`` and ``(1000, 1000, 1000, 0) -> 5.809``.

Choosing ``k+``/``k-`` after looking at the result is a form of multiple testing:
:func:`audit_one_run_sweep` tries several guess counts and applies a Bonferroni correction (each
candidate is tested at ``significance / number of candidates``), so its bound stays valid.

The bound is for the mechanism as run, on these canaries: an empirical ε far below the claimed
one does not prove the claim (audits with one run are loose, especially at small ``m`` or large
ε), but an empirical ε **above** the claimed one means the claim is false (or the canaries'
inclusion leaked to the scorer) with probability at least ``1 - significance``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

from mmshield.privacy.noise import NoiseSource

__all__ = [
    "DEFAULT_SIGNIFICANCE",
    "OneRunAudit",
    "audit_one_run",
    "audit_one_run_sweep",
    "count_correct",
    "draw_inclusion",
    "epsilon_one_run",
    "guesses_from_scores",
    "one_run_p_value",
]

DEFAULT_SIGNIFICANCE = 0.05
"""The paper's default: the lower bound holds with probability at least 95 %."""

_EPS_CAP = 1_000.0  # beyond this q = 1 in float64: every ε is rejected only with infinite data


def _check_counts(m: int, r: int, v: int) -> None:
    if not 0 <= v <= r <= m:
        raise ValueError(
            f"one-run audit needs 0 <= correct (v={v}) <= guesses (r={r}) <= canaries (m={m})"
        )


def _check_delta_significance(delta: float, significance: float) -> None:
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if not 0 < significance < 1:
        raise ValueError(
            f"significance must be in (0, 1), got {significance} (0.05 means 95 % confidence)"
        )


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """p-value of the claim "(ε, δ)-DP" given ``v`` correct out of ``r`` guesses on ``m`` canaries.

    Parameters
    ----------
    m
        Canaries, each included independently with probability 1/2.
    r
        Guesses made (abstentions excluded).
    v
        Correct guesses.
    epsilon, delta
        The privacy claim under test (the null hypothesis).

    Returns
    -------
    float
        An upper bound on the probability of ``v`` or more correct guesses under the claim.
    """
    _check_counts(m, r, v)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    q = float(special.expit(epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    # P[v - i <= Binomial(r, q) < v] / i, maximised over i.
    alpha = float(np.max((stats.binom.sf(v - i - 1, r, q) - beta) / i, initial=0.0))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_one_run(
    m: int,
    r: int,
    v: int,
    delta: float = 0.0,
    significance: float = DEFAULT_SIGNIFICANCE,
) -> float:
    """Empirical ε lower bound from ``v`` correct of ``r`` guesses on ``m`` canaries.

    Parameters
    ----------
    m
        Canaries, each included independently with probability 1/2.
    r
        Guesses made (abstentions excluded).
    v
        Correct guesses.
    delta
        The δ of the claim being audited.
    significance
        One minus the confidence; the default 0.05 is the paper's.

    Returns
    -------
    float
        The largest ε whose claim "(ε, δ)-DP" the observation rejects at ``significance`` (to
        1e-9); 0 when even ε = 0 is not rejected.

    Examples
    --------
    >>> round(epsilon_one_run(1000, 100, 100), 3)
    3.493
    """
    _check_counts(m, r, v)
    _check_delta_significance(delta, significance)

    def gap(eps: float) -> float:  # positive while (eps, delta) is rejected
        return significance - one_run_p_value(m, r, v, eps, delta)

    if gap(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while gap(hi) > 0:
        if hi >= _EPS_CAP:
            return _EPS_CAP
        lo, hi = hi, 2 * hi
    return float(optimize.brentq(gap, lo, hi, xtol=1e-10, rtol=1e-12))


def draw_inclusion(m: int, seed: int | None = None) -> np.ndarray:
    """Include each of ``m`` canaries independently with probability 1/2.

    Parameters
    ----------
    m
        Number of canaries.
    seed
        ``None`` (the default) draws from ChaCha20 keyed by the operating system, so nobody can
        predict the inclusion; an integer gives a reproducible ChaCha20 stream (for tests and
        research; a mechanism that could read the seed could fake a good audit).

    Returns
    -------
    numpy.ndarray
        Boolean ``(m,)``: ``True`` where the canary is included.
    """
    if m < 1:
        raise ValueError(f"need at least one canary, got m={m}")
    source = NoiseSource(secure=seed is None, seed=seed or 0, purpose="audit/one-run/inclusion")
    return np.asarray(source.uniform(m) < 0.5)


def _as_scores(scores: object, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = np.flatnonzero(~np.isfinite(arr))
        raise ValueError(f"{name} has {bad.size} non-finite value(s), first at index {bad[0]}")
    return arr


def guesses_from_scores(scores: object, k_plus: int, k_minus: int = 0) -> np.ndarray:
    """Guess "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest.

    Ties are broken by canary index (a fixed order, independent of the inclusion).

    Parameters
    ----------
    scores
        One score per canary, higher meaning "more likely included".
    k_plus, k_minus
        Numbers of positive and negative guesses; ``k_plus + k_minus <= m``.

    Returns
    -------
    numpy.ndarray
        int8 ``(m,)``: ``+1`` (guess in), ``-1`` (guess out) or ``0`` (abstain).
    """
    s = _as_scores(scores)
    m = s.size
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(
            f"need k_plus >= 0, k_minus >= 0 and k_plus + k_minus <= m={m}; "
            f"got k_plus={k_plus}, k_minus={k_minus}"
        )
    order = np.argsort(s, kind="stable")
    out = np.zeros(m, dtype=np.int8)
    if k_plus:
        out[order[m - k_plus :]] = 1
    out[order[:k_minus]] = -1
    return out


def count_correct(guesses: np.ndarray, included: object) -> tuple[int, int]:
    """Return ``(r, v)``: the number of guesses made and of correct ones.

    Parameters
    ----------
    guesses
        ``+1`` / ``-1`` / ``0`` per canary (see :func:`guesses_from_scores`).
    included
        Boolean inclusion per canary (see :func:`draw_inclusion`).
    """
    g = np.asarray(guesses)
    inc = np.asarray(included, dtype=bool)
    if g.shape != inc.shape:
        raise ValueError(f"{g.shape[0] if g.ndim else 0} guesses for {inc.size} canaries")
    truth = np.where(inc, 1, -1)
    r = int(np.count_nonzero(g))
    v = int(np.count_nonzero((g != 0) & (g == truth)))
    return r, v


@dataclass(frozen=True)
class OneRunAudit:
    """Result of a one-run audit.

    Attributes
    ----------
    epsilon
        The empirical ε lower bound.
    m
        Canaries (each included with probability 1/2).
    guesses, correct
        ``r`` and ``v``.
    k_plus, k_minus
        Positive and negative guesses of the chosen rule.
    delta
        δ of the audited claim.
    significance
        Overall significance (one minus the confidence) of the bound.
    candidates
        Guess rules tried; the bound of each was computed at ``significance / candidates``.
    """

    epsilon: float
    m: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    delta: float
    significance: float
    candidates: int = 1

    @property
    def confidence(self) -> float:
        """Probability with which the bound holds."""
        return 1.0 - self.significance

    def refutes(self, claimed_epsilon: float) -> bool:
        """Whether the audit shows that the mechanism is not (``claimed_epsilon``, δ)-DP."""
        return self.epsilon > claimed_epsilon


def _prepare(scores: object, included: object) -> tuple[np.ndarray, np.ndarray]:
    s = _as_scores(scores)
    inc = np.asarray(included)
    if inc.dtype != bool:
        raise ValueError(f"included must be a boolean array, got dtype {inc.dtype}")
    if inc.shape != s.shape:
        raise ValueError(f"{s.size} scores for {inc.size} inclusion flags")
    return s, inc


def audit_one_run(
    scores: object,
    included: object,
    *,
    k_plus: int,
    k_minus: int = 0,
    delta: float = 0.0,
    significance: float = DEFAULT_SIGNIFICANCE,
) -> OneRunAudit:
    """Audit one run with one fixed guess rule (``k_plus`` top and ``k_minus`` bottom scores).

    Parameters
    ----------
    scores
        One score per canary from the mechanism's output, higher meaning "more likely included"
        (for a loss, pass minus the loss). Scores must not depend on ``included`` other than
        through the mechanism's output.
    included
        The canaries' true inclusion (boolean), drawn as by :func:`draw_inclusion`.
    k_plus, k_minus
        Numbers of "in" and "out" guesses; fix them before looking at the outcome, or use
        :func:`audit_one_run_sweep`.
    delta
        δ of the audited claim.
    significance
        One minus the confidence (default 0.05).

    Returns
    -------
    OneRunAudit
    """
    s, inc = _prepare(scores, included)
    r, v = count_correct(guesses_from_scores(s, k_plus, k_minus), inc)
    eps = epsilon_one_run(s.size, r, v, delta, significance)
    return OneRunAudit(eps, s.size, r, v, k_plus, k_minus, delta, significance)


def audit_one_run_sweep(
    scores: object,
    included: object,
    *,
    rules: Sequence[tuple[int, int]] | None = None,
    delta: float = 0.0,
    significance: float = DEFAULT_SIGNIFICANCE,
) -> OneRunAudit:
    """Audit one run with the best of several guess rules (Bonferroni-corrected).

    Parameters
    ----------
    scores, included
        As for :func:`audit_one_run`.
    rules
        ``(k_plus, k_minus)`` pairs to try. The default tries symmetric rules ``k_plus = k_minus
        = k`` for ``k`` in 1 %, 2 %, 5 %, 10 %, 20 % and 50 % of ``m`` (rounded, at least 1).
    delta
        δ of the audited claim.
    significance
        Overall significance; each rule is tested at ``significance / len(rules)``, so the best
        bound holds with probability at least ``1 - significance``.

    Returns
    -------
    OneRunAudit
        The rule with the highest bound (the first such one on ties).
    """
    s, inc = _prepare(scores, included)
    m = s.size
    if rules is None:
        ks = sorted({max(1, round(f * m)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)})
        rules = [(k, k) for k in ks if 2 * k <= m] or [(1, 0)]
    if not rules:
        raise ValueError("rules is empty: give at least one (k_plus, k_minus) pair")
    _check_delta_significance(delta, significance)
    level = significance / len(rules)
    best: OneRunAudit | None = None
    for k_plus, k_minus in rules:
        audit = audit_one_run(
            s, inc, k_plus=k_plus, k_minus=k_minus, delta=delta, significance=level
        )
        if best is None or audit.epsilon > best.epsilon:
            best = audit
    assert best is not None
    return OneRunAudit(
        best.epsilon,
        m,
        best.guesses,
        best.correct,
        best.k_plus,
        best.k_minus,
        delta,
        significance,
        candidates=len(rules),
    )
