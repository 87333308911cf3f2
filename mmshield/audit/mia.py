"""Membership inference: loss threshold, LiRA, exact ROC metrics and the DP bound on any attack.

Attacks
-------
* **Loss threshold** (Yeom, Giacomelli, Fredrikson, Jha 2018, "Privacy Risk in Machine Learning:
  Analyzing the Connection to Overfitting"): a record is called a member when the model's loss
  on it is low. The attack score is minus the loss; sweeping the threshold gives the whole ROC
  curve (Yeom et al. fix it at the mean training loss, :func:`yeom_threshold`).
* **LiRA**, the likelihood-ratio attack (Carlini, Chien, Nasr, Song, Terzis, Tramèr 2022,
  "Membership Inference Attacks From First Principles"). Shadow models are trained on random
  halves of a population that contains the target records, arranged so that every record is
  in exactly half of them (as in the authors' code). For each record the model's confidence on
  the true label is logit-scaled, ``φ = log p_y - log(1 - p_y)`` (computed from logits as
  ``z_y - logsumexp_{j != y} z_j``), which makes it close to Gaussian across shadow models.

  - *online*: fit ``N(μ_in, σ_in²)`` to φ over the shadows trained **with** the record and
    ``N(μ_out, σ_out²)`` over those trained **without** it; the score is the log-likelihood
    ratio ``log N(φ_target; μ_in, σ_in²) - log N(φ_target; μ_out, σ_out²)``;
  - *offline*: only the out fit; the score is the one-sided ``log Φ((φ_target - μ_out) /
    σ_out)`` (the paper's ``1 - Pr[Z > φ_target]``, in logs so the tails still rank).

  With fewer than 64 shadow models the paper recommends one **global** variance per
  distribution instead of per-record variances; here that is the pooled within-record variance
  (squared deviations from each record's own mean, summed over records, divided by the count
  minus the number of records). Means are per record, as in the paper's Algorithm 1.

  Shadow training is the caller's: ``train(indices)`` fits a model on those population records
  and returns a scorer ``indices -> logits``, so the module works with any model.

Metrics
-------
ROC points are exact: one point per distinct score threshold ("member if score >= t"), counted
from the scores without interpolation. AUC is the Mann-Whitney statistic (ties count 1/2, equal
to the trapezoidal area under the exact ROC). ``TPR at FPR = x`` is the largest empirical TPR over
thresholds whose empirical FPR is at most ``x`` (as in the LiRA paper's code; with ``n``
non-members, FPR 0.1 % means at most ``floor(0.001 n)`` false positives).

Bound for DP mechanisms
-----------------------
If the training mechanism is (ε, δ)-DP, every membership test between two neighbouring data sets
(the record in or out) has ``(FPR, TPR)`` in the (ε, δ) privacy region of Kairouz, Oh and
Viswanath (2015, Theorem 2.1; Wasserman and Zhou 2010): type-I error α = FPR and type-II error
β = 1 - TPR satisfy ``α + e^ε β >= 1 - δ`` and ``e^ε α + β >= 1 - δ``, i.e.

    TPR <= min(e^ε FPR + δ, 1 - e^{-ε} (1 - δ - FPR), 1).

The region is symmetric in the two neighbours and holds for any attack, including one that
randomises. An ROC pooled over many records is an average of per-record points, and the bound is
concave in FPR, so the pooled curve obeys it too **provided membership was decided at random**
(each record in with probability 1/2, or a random half of an exchangeable pool); members and
non-members that differ in distribution are outside the bound's scope.

:func:`check_dp_bound` compares empirical points with the bound while allowing for sampling
error: a point is flagged only when the one-sided Clopper-Pearson **lower** confidence limit of
its TPR exceeds the bound evaluated at the Clopper-Pearson **upper** limit of its FPR, each limit
at level ``significance / (2 · points)`` (Bonferroni over the points and the two counts). When the
per-record outcomes are independent (one record audited per model, or points from independent
runs) a correct (ε, δ)-DP mechanism is flagged with probability at most ``significance`` (default
0.05) whatever the number of points. Records scored by one shared model are not independent; the
allowance is then the usual approximation, and a statistically rigorous claim from a single model
is the one-run audit of :mod:`mmshield.audit.one_run`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from scipy import special, stats

__all__ = [
    "DEFAULT_FPRS",
    "BoundCheck",
    "MIAResult",
    "Scorer",
    "ShadowSet",
    "Trainer",
    "check_dp_bound",
    "cross_entropy_loss",
    "dp_tpr_bound",
    "evaluate_attack",
    "lira",
    "lira_scores",
    "logit_confidence",
    "loss_threshold_scores",
    "roc_auc",
    "roc_curve",
    "shadow_membership",
    "tpr_at_fpr",
    "train_shadows",
    "yeom_threshold",
]

DEFAULT_FPRS = (0.001, 0.01)
"""The low false-positive rates reported by default (0.1 % and 1 %)."""

_MIN_STD = 1e-8  # floor on fitted standard deviations (shadows that agree exactly)


class Scorer(Protocol):
    """A trained model as the attack sees it: population indices -> logits ``(n, classes)``."""

    def __call__(self, indices: np.ndarray, /) -> object: ...


Trainer = Callable[[np.ndarray], Scorer]
"""``train(indices) -> scorer``: fit a shadow model on those population records."""


def _to_numpy(x: object, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite values")
    return arr


def _as_membership(is_member: object, n: int) -> np.ndarray:
    m = np.asarray(is_member)
    if m.dtype != bool:
        raise ValueError(f"is_member must be a boolean array, got dtype {m.dtype}")
    if m.shape != (n,):
        raise ValueError(f"is_member has shape {m.shape} for {n} scores")
    if m.all() or not m.any():
        raise ValueError("need at least one member and one non-member to evaluate an attack")
    return m


# --------------------------------------------------------------------------------------------
# Per-record statistics


def cross_entropy_loss(logits: object, labels: object) -> np.ndarray:
    """Per-record cross-entropy ``logsumexp(z) - z_y`` of ``logits (n, C)`` at ``labels (n,)``."""
    z = _to_numpy(logits, "logits")
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise ValueError(f"need logits (n, C) and labels (n,), got {z.shape} and {y.shape}")
    return np.asarray(special.logsumexp(z, axis=1) - z[np.arange(z.shape[0]), y])


def logit_confidence(logits: object, labels: object) -> np.ndarray:
    """LiRA's logit-scaled confidence ``log p_y - log(1 - p_y)`` from logits, computed stably.

    Parameters
    ----------
    logits
        ``(n, C)`` with ``C >= 2`` (numpy or torch).
    labels
        ``(n,)`` true labels.

    Returns
    -------
    numpy.ndarray
        ``(n,)``: ``z_y - logsumexp_{j != y} z_j``.
    """
    z = _to_numpy(logits, "logits")
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if z.ndim != 2 or z.shape[1] < 2 or y.shape != (z.shape[0],):
        raise ValueError(f"need logits (n, C>=2) and labels (n,), got {z.shape} and {y.shape}")
    rows = np.arange(z.shape[0])
    correct = z[rows, y]
    others = z.copy()
    others[rows, y] = -np.inf
    return np.asarray(correct - special.logsumexp(others, axis=1))


def loss_threshold_scores(losses: object) -> np.ndarray:
    """Attack scores of the loss-threshold attack: minus the loss (higher = member)."""
    return -_to_numpy(losses, "losses")


def yeom_threshold(member_losses: object) -> float:
    """Yeom et al.'s threshold: the mean training loss (call a record a member below it)."""
    losses = _to_numpy(member_losses, "member_losses")
    if losses.size == 0:
        raise ValueError("need at least one training loss")
    return float(losses.mean())


# --------------------------------------------------------------------------------------------
# Metrics


def roc_curve(scores: object, is_member: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC points of the rule "member if score >= t" over every distinct threshold.

    Parameters
    ----------
    scores
        One score per record, higher meaning "member".
    is_member
        Boolean ground truth.

    Returns
    -------
    fpr, tpr, thresholds
        Non-decreasing rates starting at ``(0, 0)`` (threshold ``+inf``) and ending at
        ``(1, 1)``; ``thresholds`` are the scores in decreasing order.
    """
    s = _to_numpy(scores, "scores")
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    member = _as_membership(is_member, s.size)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(member[order])
    fp = np.cumsum(~member[order])
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1]  # end of each tie block
    n_pos, n_neg = int(member.sum()), int((~member).sum())
    tpr = np.r_[0.0, tp[last] / n_pos]
    fpr = np.r_[0.0, fp[last] / n_neg]
    return fpr, tpr, np.r_[np.inf, s_sorted[last]]


def roc_auc(scores: object, is_member: object) -> float:
    """Area under the ROC curve: P(member score > non-member score) + P(tie) / 2."""
    s = _to_numpy(scores, "scores")
    member = _as_membership(is_member, s.size)
    ranks = stats.rankdata(s)
    n_pos, n_neg = int(member.sum()), int((~member).sum())
    u = float(ranks[member].sum()) - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def tpr_at_fpr(scores: object, is_member: object, fpr: float) -> float:
    """Largest empirical TPR among thresholds whose empirical FPR is at most ``fpr``.

    No interpolation: with ``n`` non-members at most ``floor(fpr · n)`` of them may be
    called members.
    """
    if not 0 <= fpr <= 1:
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    f, t, _ = roc_curve(scores, is_member)
    return float(t[f <= fpr + 1e-12].max())


@dataclass(frozen=True)
class MIAResult:
    """Metrics of a membership-inference attack.

    Attributes
    ----------
    auc
        ROC AUC.
    tpr_at
        ``FPR -> TPR`` at the requested low false-positive rates.
    n_members, n_nonmembers
        Records of each kind evaluated.
    fpr, tpr
        The exact ROC curve (for plots and :func:`check_dp_bound`).
    """

    auc: float
    tpr_at: dict[float, float]
    n_members: int
    n_nonmembers: int
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)

    @property
    def tpr_at_0_1_percent(self) -> float:
        """TPR at 0.1 % FPR."""
        return self.tpr_at[0.001]

    @property
    def tpr_at_1_percent(self) -> float:
        """TPR at 1 % FPR."""
        return self.tpr_at[0.01]

    def check_dp_bound(
        self, epsilon: float, delta: float = 0.0, significance: float = 0.05
    ) -> BoundCheck:
        """Compare this ROC with the (ε, δ) bound (see :func:`check_dp_bound`)."""
        return check_dp_bound(
            self.fpr, self.tpr, self.n_members, self.n_nonmembers, epsilon, delta, significance
        )


def evaluate_attack(
    scores: object, is_member: object, fprs: tuple[float, ...] = DEFAULT_FPRS
) -> MIAResult:
    """AUC, TPR at low FPRs and the exact ROC of an attack's scores (higher = member).

    Parameters
    ----------
    scores
        One score per record.
    is_member
        Boolean ground truth.
    fprs
        False-positive rates at which to report the TPR (0.1 % and 1 % by default; both are
        always included so the named properties work).
    """
    s = _to_numpy(scores, "scores")
    member = _as_membership(is_member, s.size)
    f, t, _ = roc_curve(s, member)
    wanted = sorted(set(fprs) | set(DEFAULT_FPRS))
    tpr_at = {x: float(t[f <= x + 1e-12].max()) for x in wanted}
    return MIAResult(
        auc=roc_auc(s, member),
        tpr_at=tpr_at,
        n_members=int(member.sum()),
        n_nonmembers=int((~member).sum()),
        fpr=f,
        tpr=t,
    )


# --------------------------------------------------------------------------------------------
# LiRA


def shadow_membership(n_population: int, n_shadows: int, seed: int = 0) -> np.ndarray:
    """Which records each shadow model trains on: every record in exactly half of the shadows.

    Parameters
    ----------
    n_population
        Records in the attack population.
    n_shadows
        Shadow models (at least 2; odd numbers put each record in ``n_shadows // 2``).
    seed
        Seed of the assignment (not secret: the attacker chooses it).

    Returns
    -------
    numpy.ndarray
        Boolean ``(n_shadows, n_population)``.
    """
    if n_shadows < 2:
        raise ValueError(f"LiRA needs at least 2 shadow models, got {n_shadows}")
    if n_population < 2:
        raise ValueError(f"need at least 2 records in the population, got {n_population}")
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((n_shadows, n_population)), axis=0)
    return np.asarray(ranks < n_shadows // 2)


@dataclass(frozen=True)
class ShadowSet:
    """Logit-scaled confidences of shadow models on the population.

    Attributes
    ----------
    confidences
        ``(n_shadows, n_population)`` φ of each shadow on each record.
    membership
        ``(n_shadows, n_population)`` whether the shadow trained on the record.
    """

    confidences: np.ndarray
    membership: np.ndarray


def train_shadows(train: Trainer, labels: object, n_shadows: int = 8, seed: int = 0) -> ShadowSet:
    """Train ``n_shadows`` shadow models on random halves of the population and score it.

    Parameters
    ----------
    train
        ``train(indices) -> scorer``; ``scorer(indices)`` returns logits ``(n, classes)`` of the
        trained model on those population records.
    labels
        ``(n_population,)`` true labels of the population.
    n_shadows
        Number of shadow models.
    seed
        Seed of the half assignment (see :func:`shadow_membership`).
    """
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    n = y.shape[0]
    membership = shadow_membership(n, n_shadows, seed)
    everyone = np.arange(n)
    conf = np.empty((n_shadows, n))
    for k in range(n_shadows):
        scorer = train(np.flatnonzero(membership[k]))
        conf[k] = logit_confidence(scorer(everyone), y)
    return ShadowSet(conf, membership)


def _fit(
    values: np.ndarray, mask: np.ndarray, global_variance: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per-record mean and std of ``values`` over the shadows where ``mask`` holds."""
    counts = mask.sum(axis=0)
    if counts.min() < 1:
        raise ValueError(
            f"record {int(np.argmin(counts))} has no shadow model on this side; use the "
            "assignment of shadow_membership (every record in exactly half of the shadows)"
        )
    mean = np.where(mask, values, 0.0).sum(axis=0) / counts
    sq = np.where(mask, (values - mean) ** 2, 0.0)
    if global_variance:
        dof = int(counts.sum()) - values.shape[1]
        if dof < 1:
            raise ValueError("a global variance needs at least 2 shadows on each side of a record")
        std = np.full(values.shape[1], math.sqrt(sq.sum() / dof))
    else:
        if counts.min() < 2:
            raise ValueError(
                "per-record variances need at least 2 shadow models on each side of every "
                "record (at least 4 shadows); use global_variance=True"
            )
        std = np.sqrt(sq.sum(axis=0) / (counts - 1))
    return mean, np.maximum(std, _MIN_STD)


def lira_scores(
    target_confidences: object,
    shadows: ShadowSet,
    *,
    online: bool = True,
    global_variance: bool | None = None,
) -> np.ndarray:
    """LiRA membership scores (higher = member) from precomputed confidences.

    Parameters
    ----------
    target_confidences
        ``(n_population,)`` φ of the target model (see :func:`logit_confidence`).
    shadows
        Shadow confidences and membership (see :func:`train_shadows`).
    online
        Fit in and out distributions (online LiRA) or only the out one (offline).
    global_variance
        One variance per distribution instead of one per record; ``None`` chooses it when there
        are fewer than 64 shadow models, as the paper recommends.

    Returns
    -------
    numpy.ndarray
        ``(n_population,)`` scores.
    """
    phi = _to_numpy(target_confidences, "target_confidences")
    conf, member = shadows.confidences, np.asarray(shadows.membership, dtype=bool)
    if conf.ndim != 2 or conf.shape != member.shape or phi.shape != (conf.shape[1],):
        raise ValueError(
            f"shadow confidences {conf.shape}, membership {member.shape} and target "
            f"confidences {phi.shape} do not match (need (S, N), (S, N) and (N,))"
        )
    if global_variance is None:
        global_variance = conf.shape[0] < 64
    mu_out, sd_out = _fit(conf, ~member, global_variance)
    if not online:
        return np.asarray(stats.norm.logcdf((phi - mu_out) / sd_out))
    mu_in, sd_in = _fit(conf, member, global_variance)
    return np.asarray(stats.norm.logpdf(phi, mu_in, sd_in) - stats.norm.logpdf(phi, mu_out, sd_out))


def lira(
    target: Scorer,
    train: Trainer,
    labels: object,
    *,
    n_shadows: int = 8,
    online: bool = True,
    global_variance: bool | None = None,
    seed: int = 0,
    shadows: ShadowSet | None = None,
) -> np.ndarray:
    """Run LiRA against ``target`` on a population: train shadows, fit, score every record.

    Parameters
    ----------
    target
        The attacked model: ``target(indices) -> logits``.
    train
        Shadow trainer, ``train(indices) -> scorer``; it should mimic the target's training.
    labels
        ``(n_population,)`` true labels.
    n_shadows
        Shadow models to train (ignored when ``shadows`` is given).
    online, global_variance
        See :func:`lira_scores`.
    seed
        Seed of the shadows' half assignment.
    shadows
        Reuse already trained shadows (e.g. to run both variants).

    Returns
    -------
    numpy.ndarray
        ``(n_population,)`` membership scores, higher = member.
    """
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if shadows is None:
        shadows = train_shadows(train, y, n_shadows, seed)
    phi = logit_confidence(target(np.arange(y.shape[0])), y)
    return lira_scores(phi, shadows, online=online, global_variance=global_variance)


# --------------------------------------------------------------------------------------------
# The DP bound


def dp_tpr_bound(fpr: object, epsilon: float, delta: float = 0.0) -> np.ndarray:
    """Largest TPR any membership test can reach at ``fpr`` against an (ε, δ)-DP mechanism.

    ``min(e^ε FPR + δ, 1 - e^{-ε} (1 - δ - FPR), 1)`` (the privacy region of Kairouz, Oh and
    Viswanath 2015).
    """
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    f = np.asarray(fpr, dtype=np.float64)
    if np.any((f < 0) | (f > 1)):
        raise ValueError("fpr must lie in [0, 1]")
    first = math.exp(epsilon) * f + delta
    second = 1.0 - math.exp(-epsilon) * (1.0 - delta - f)
    return np.asarray(np.minimum(np.minimum(first, second), 1.0))


@dataclass(frozen=True)
class BoundCheck:
    """Empirical ROC points compared with the (ε, δ) bound.

    Attributes
    ----------
    fpr, tpr
        The points.
    bound
        The bound at each point's empirical FPR (for plots).
    tpr_lower, fpr_upper
        Clopper-Pearson limits used for the decision.
    violates
        Points whose TPR is above the bound beyond sampling error.
    epsilon, delta, significance
        The claim and the overall false-alarm probability.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    bound: np.ndarray
    tpr_lower: np.ndarray
    fpr_upper: np.ndarray
    violates: np.ndarray
    epsilon: float
    delta: float
    significance: float

    @property
    def ok(self) -> bool:
        """No point is above the bound beyond sampling error."""
        return not bool(self.violates.any())

    @property
    def above_raw(self) -> np.ndarray:
        """Points whose raw empirical TPR exceeds the bound (sampling error not allowed for)."""
        return np.asarray(self.tpr > self.bound + 1e-12)


def _clopper_pearson(k: np.ndarray, n: int, level: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided lower and upper Clopper-Pearson limits, each failing with probability level."""
    lower = np.where(k > 0, stats.beta.ppf(level, np.maximum(k, 1), n - k + 1), 0.0)
    upper = np.where(k < n, stats.beta.ppf(1 - level, k + 1, np.maximum(n - k, 1)), 1.0)
    return lower, upper


def check_dp_bound(
    fpr: object,
    tpr: object,
    n_members: int,
    n_nonmembers: int,
    epsilon: float,
    delta: float = 0.0,
    significance: float = 0.05,
) -> BoundCheck:
    """Check empirical ``(FPR, TPR)`` points against the (ε, δ) bound with a binomial allowance.

    Parameters
    ----------
    fpr, tpr
        Empirical rates (e.g. :attr:`MIAResult.fpr` and :attr:`MIAResult.tpr`), computed from
        ``n_nonmembers`` and ``n_members`` records.
    n_members, n_nonmembers
        The counts behind the rates.
    epsilon, delta
        The claimed guarantee.
    significance
        Probability of flagging a correct mechanism, split by Bonferroni over the points and
        the two rates of each point.

    Returns
    -------
    BoundCheck
    """
    f = np.atleast_1d(np.asarray(fpr, dtype=np.float64))
    t = np.atleast_1d(np.asarray(tpr, dtype=np.float64))
    if f.shape != t.shape or f.ndim != 1:
        raise ValueError(f"fpr {f.shape} and tpr {t.shape} must be 1-D of equal length")
    if n_members < 1 or n_nonmembers < 1:
        raise ValueError("need at least one member and one non-member")
    if np.any((f < 0) | (f > 1) | (t < 0) | (t > 1)):
        raise ValueError("rates must lie in [0, 1]")
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    level = significance / (2 * f.size)
    tp = np.rint(t * n_members).astype(np.int64)
    fp = np.rint(f * n_nonmembers).astype(np.int64)
    tpr_lower, _ = _clopper_pearson(tp, n_members, level)
    _, fpr_upper = _clopper_pearson(fp, n_nonmembers, level)
    violates = tpr_lower > dp_tpr_bound(fpr_upper, epsilon, delta) + 1e-12
    return BoundCheck(
        fpr=f,
        tpr=t,
        bound=dp_tpr_bound(f, epsilon, delta),
        tpr_lower=tpr_lower,
        fpr_upper=fpr_upper,
        violates=np.asarray(violates),
        epsilon=epsilon,
        delta=delta,
        significance=significance,
    )
