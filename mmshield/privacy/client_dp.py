"""Client-level DP-FedAvg (McMahan et al. 2018), fixed or adaptive clipping (Andrew et al. 2021).

The unit of privacy is a whole client. Each round:

1. clients join by **Poisson sampling** with rate ``q`` (what the accountant assumes);
2. each sampled client's update (all parameters together) is clipped to L2 norm ``S``;
3. the server sums the clipped updates, adds Gaussian noise of standard deviation ``z S`` and
   divides by the *expected* number of clients ``q N`` (a data-independent denominator, so the
   sensitivity of the mean is ``S / (q N)``); every client weighs the same (example- or
   modality-weighted means have unbounded sensitivity, so they are switched off).

Adaptive clipping tracks a quantile ``γ`` of the update norms: the fraction of clients whose norm
is at most ``S`` is released with its own Gaussian noise ``σ_b`` and ``S`` moves geometrically,
``S ← S exp(-η (b̃ - γ))``. Releasing the count costs privacy; as in the paper the value noise is
then lowered to ``z_Δ = (z^-2 - (2 σ_b)^-2)^-1/2`` so that the pair is exactly as private as one
Gaussian mechanism with multiplier ``z``, which is what the accountant is told.

Where the noise is added (``placement``):

``central``
    The server adds ``N(0, (z S)²)`` to the sum (step 3 above). Trusts the server.
``distributed``
    Each sampled client adds a share ``N(0, (z S)² / m_s)`` to its clipped update and the server
    adds nothing, where ``m_s = ρ q N`` is the number of shares that together carry the planned
    noise (``ρ``: ``reporting_fraction``, the safety factor below). This is the form secure
    aggregation needs: the server only ever sees the sum. If ``k`` clients' shares reach the
    sum, its noise has variance ``(k / m_s) (z S)²``, an **effective multiplier**
    ``z_k = z sqrt(k / m_s)``. Fewer reports than planned (a Poisson draw below ``m_s``,
    dropouts) mean less noise, so the accountant is told each round's real ``z_k``
    (:class:`ReleaseAccount`); a round with ``k = 0`` releases nothing data-dependent and
    costs nothing. The adaptive clipped-count bit follows the same model (each client adds
    ``N(0, σ_b² / m_s)`` to its bit), so the value-and-count pair still has multiplier
    ``z_k``. Without secure aggregation the server sees every update with its own share only:
    per round, one Gaussian with multiplier ``z / sqrt(m_s)`` about that client.
``local``
    Each client adds the full ``N(0, (z S)²)``: local DP against the server itself, no trust
    needed. The server knows who took part, so against it there is no amplification by
    sampling: a client's guarantee is one Gaussian with multiplier ``z`` per round it took
    part in. Adaptive clipping is refused (the count would need local DP too).

**Adjacency.** The effective multiplier models the sum's noise as what the ``k`` shares that
reached it add up to; this is exact when neighbouring federations differ in one client's
*update* with its noise share present in both ("zero-out" adjacency, the usual treatment of
distributed DP, Kairouz et al. 2021). Whether a client took part at all is hidden by Poisson
sampling from anyone who does not know the sample, but its own share also changes the noise
variance by a factor ``k / (k - 1)``, which this accounting does not price.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import dp_accounting as dpa
import numpy as np
import torch
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss

from mmshield.errors import PrivacyError
from mmshield.privacy.accountant import Method, SampledGaussian, _accountant, _quiet_absl
from mmshield.privacy.noise import NoiseSource

Placement = Literal["central", "distributed", "local"]
PLACEMENTS: tuple[Placement, ...] = ("central", "distributed", "local")


@dataclass(frozen=True)
class AdaptiveClipping:
    """Quantile-tracking clip norm.

    Parameters
    ----------
    target_quantile
        ``γ``: the fraction of client updates that should fit under the clip norm.
    learning_rate
        ``η`` of the geometric update.
    count_noise
        ``σ_b``: standard deviation of the noise on the clipped count (in clients); must exceed
        ``z / 2`` so that the value noise stays positive.
    """

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise: float | None = None


class ReleaseAccount:
    """The ε a client-level DP run has actually spent, charged release by release.

    The budget is fixed before the run, but the noise that reaches an aggregate under
    distributed noise is known only once clients have reported. Before each release the account
    computes the run's cumulative ε *with* that release and refuses it (raises) if the budget
    would be exceeded, so a run stops at the first round it cannot afford, having spent exactly
    what its earlier releases cost.

    Parameters
    ----------
    delta
        δ of the guarantee.
    budget
        The most ε the run may spend (its planned ε, what the ledger reserved).
    sampling_rate
        Poisson client sampling rate ``q`` of :meth:`sampled_round`.
    method
        ``pld`` (on the coarse grid: a valid upper bound) or ``rdp``.
    """

    RELATIVE_TOLERANCE = 1e-6
    """Slack for floating-point differences between planning and incremental composition."""

    def __init__(
        self, delta: float, budget: float, sampling_rate: float, method: Method = "pld"
    ) -> None:
        self.delta = delta
        self.budget = budget
        self.sampling_rate = sampling_rate
        self.method = method
        self.spent = 0.0
        self._accountant = _accountant(method, dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, True)

    def _check(self, eps: float, where: str, why: str) -> None:
        if eps > self.budget * (1 + self.RELATIVE_TOLERANCE):
            raise PrivacyError(
                f"{where}: releasing this round would bring the run's ε to {eps:.4g} "
                f"(δ = {self.delta:g}), above its budget {self.budget:.4g}{why}. Nothing of "
                f"this round was released; the run stops having spent ε = {self.spent:.4g}, "
                "which the ledger keeps"
            )

    def sampled_round(self, multiplier: float | None, where: str, why: str = "") -> float:
        """Charge one round: a Poisson-sampled Gaussian with ``multiplier`` (``None``: none).

        Returns the cumulative ε; raises :class:`PrivacyError` (charging nothing) when it would
        exceed the budget.
        """
        if multiplier is None:
            return self.spent
        trial = copy.deepcopy(self._accountant)
        with _quiet_absl():
            trial.compose(SampledGaussian(multiplier, 1, "poisson", self.sampling_rate).event())
            eps = float(trial.get_epsilon(self.delta))
        self._check(eps, where, why)
        self._accountant, self.spent = trial, eps
        return eps

    def gaussian_total(self, multiplier: float | None, where: str, why: str = "") -> float:
        """Charge the worst-off client's whole history so far: one Gaussian, ``multiplier``.

        (Gaussians compose into a Gaussian: ``n`` releases with ``z`` are one with
        ``z / sqrt(n)``.) ``None``: nothing released yet.
        """
        if multiplier is None:
            return self.spent
        eps = gaussian_epsilon(multiplier, self.delta)
        self._check(eps, where, why)
        self.spent = eps
        return eps


def gaussian_epsilon(multiplier: float, delta: float) -> float:
    """ε of one (unsampled) Gaussian mechanism with ``multiplier`` at ``delta``, exactly.

    From ``dp-accounting``'s closed-form δ(ε) of the Gaussian mechanism (Balle & Wang 2018),
    solved for ε by bisection to a relative 1e-9 (rounded up); no discretisation grid, so it stays
    fast and exact for the tiny multipliers of a single client's noise share.
    """
    if not multiplier > 0 or not 0 < delta < 1:
        raise PrivacyError(f"need multiplier > 0 and 0 < δ < 1, got {multiplier}, {delta}")
    loss = GaussianPrivacyLoss(multiplier, sensitivity=1.0)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while loss.get_delta_for_epsilon(high) > delta:
        low, high = high, 2 * high
    while high - low > 1e-9 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if loss.get_delta_for_epsilon(mid) > delta else (low, mid)
    return high


class ClientLevelDP:
    """DP-FedAvg's clip and noise (client half) and noisy mean (server half).

    Parameters
    ----------
    clip_norm
        Initial (or fixed) ``S``.
    noise_multiplier
        ``z``, the multiplier the accountant uses.
    expected_clients
        ``m = q N``, the mean's denominator.
    source
        Server-side noise (central placement) and client sampling.
    adaptive
        Adaptive clipping, or ``None`` for a fixed norm.
    placement
        ``central``, ``distributed`` or ``local`` (see the module docstring).
    noise_shares
        Distributed: ``m_s``, the number of client shares that together carry the planned noise
        (default ``expected_clients``; ``ρ m`` for a safety factor ``ρ``).
    client_source
        Noise the clients draw (default ``source``); in a deployment each client has its own.
    account
        Charges each release before it happens and stops the run beyond the budget
        (distributed and local placements; central runs are planned exactly).
    """

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: float,
        source: NoiseSource,
        adaptive: AdaptiveClipping | None = None,
        placement: Placement = "central",
        noise_shares: float | None = None,
        client_source: NoiseSource | None = None,
        account: ReleaseAccount | None = None,
    ) -> None:
        if not clip_norm > 0 or noise_multiplier < 0 or not expected_clients > 0:
            raise ValueError("clip_norm and expected_clients must be > 0, noise_multiplier >= 0")
        if placement not in PLACEMENTS:
            raise ValueError(f"noise placement {placement!r} is unknown; use one of {PLACEMENTS}")
        if placement == "local" and adaptive is not None:
            raise ValueError(
                "adaptive clipping cannot be used with local noise: the clipped-count bit would "
                "need local DP too; use a fixed clip norm"
            )
        self.noise_shares = expected_clients if noise_shares is None else noise_shares
        if not self.noise_shares > 0:
            raise ValueError(f"noise_shares must be > 0, got {self.noise_shares}")
        self.clip_norm = self.initial_clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_clients = expected_clients
        self.source = source
        self.client_source = client_source or source
        self.placement = placement
        self.account = account
        self.adaptive = adaptive
        self.count_noise = 0.0
        self.value_noise_multiplier = noise_multiplier
        if adaptive is not None:
            self.count_noise = (
                adaptive.count_noise
                if adaptive.count_noise is not None
                else expected_clients / 20  # the paper's default σ_b = q N / 20
            )
            if noise_multiplier > 0:
                if not self.count_noise > noise_multiplier / 2:
                    raise ValueError(
                        f"count_noise {self.count_noise:g} must exceed noise_multiplier / 2 "
                        f"= {noise_multiplier / 2:g}"
                    )
                self.value_noise_multiplier = (
                    noise_multiplier**-2 - (2 * self.count_noise) ** -2
                ) ** -0.5
        self._sum: dict[str, torch.Tensor] = {}
        self._unclipped = 0
        self._clients = 0
        self._bit_noise = 0.0
        self._round_clients: list[np.ndarray] = []
        self._anonymous = False
        self.history: list[dict[str, float]] = []
        self.effective_multipliers: list[float | None] = []
        """Per round, the multiplier of the noise the aggregate carried (``None``: no report)."""
        self.rounds_taken: dict[int, int] = {}
        """Distributed and local: rounds each client's update reached the server."""
        self.secagg_precision: dict[int, float] = {}
        """Distributed: per client, the sum over its rounds of ``1 / z_k²``."""
        self._anonymous_rounds = 0
        self._anonymous_precision = 0.0

    def client_noise_std(self) -> float:
        """Standard deviation of the noise each client adds to its clipped update."""
        if self.placement == "distributed":
            return self.value_noise_multiplier * self.clip_norm / math.sqrt(self.noise_shares)
        if self.placement == "local":
            return self.noise_multiplier * self.clip_norm
        return 0.0

    def effective_multiplier(self, reports: int) -> float | None:
        """Multiplier of the noise in a sum of ``reports`` updates (``None``: nothing released).

        Central: ``z`` (the server adds it all). Distributed: ``z sqrt(k / m_s)``. Local:
        ``z sqrt(k)`` (each update carries ``z``).
        """
        if self.placement == "central":
            return self.noise_multiplier
        if reports == 0:
            return None
        if self.placement == "distributed":
            return self.noise_multiplier * math.sqrt(reports / self.noise_shares)
        return self.noise_multiplier * math.sqrt(reports)

    def server_share_multiplier(self) -> float | None:
        """Per round, the multiplier of the noise on one update that the server sees alone."""
        if self.placement == "distributed":
            return self.noise_multiplier / math.sqrt(self.noise_shares)
        if self.placement == "local":
            return self.noise_multiplier
        return None

    def max_rounds_taken(self) -> int:
        """The most rounds any one client's update reached the server."""
        return max(self.rounds_taken.values(), default=0) + self._anonymous_rounds

    def epsilon_vs_server(self, delta: float) -> float | None:
        """ε of the worst-off client against a server that sees each update (no secure agg.).

        The server knows who took part, so there is no amplification by sampling: each round a
        client took part is one Gaussian with :meth:`server_share_multiplier`. ``None`` for
        central noise (the server is trusted).
        """
        share, n = self.server_share_multiplier(), self.max_rounds_taken()
        if share is None or share == 0:
            return None
        return 0.0 if n == 0 else gaussian_epsilon(share / math.sqrt(n), delta)

    def epsilon_vs_server_with_secagg(self, delta: float) -> float | None:
        """Distributed: ε of the worst-off client against a server that sees only the sums.

        The server still knows who took part (no amplification): each round the client took
        part is one Gaussian with that round's effective multiplier ``z_k``.
        """
        if self.placement != "distributed" or self.noise_multiplier == 0:
            return None
        precision = max(self.secagg_precision.values(), default=0.0) + self._anonymous_precision
        return 0.0 if precision == 0 else gaussian_epsilon(precision**-0.5, delta)

    def release(
        self, deltas: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Client half: clip ``K`` stacked updates and add each client's own noise (if any).

        Returns what the clients send (for distributed and local placements, with their noise)
        and the norms before clipping. The noise is drawn as one ``(K, *shape)`` tensor per
        parameter.
        """
        clipped, norms = self.clip(deltas)
        std = self.client_noise_std()
        if std > 0:
            clipped = {
                k: d + self.client_source.normal(d.shape, std, device=d.device, dtype=d.dtype)
                for k, d in clipped.items()
            }
        return clipped, norms

    def clip(
        self, deltas: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Clip each of ``K`` stacked client updates to the current norm; return them, norms."""
        squared = sum(d.flatten(1).pow(2).sum(1) for d in deltas.values())
        norms = torch.as_tensor(squared).sqrt()
        factor = (self.clip_norm / norms.clamp_min(1e-12)).clamp(max=1.0)
        clipped = {
            k: d * factor.view(-1, *[1] * (d.dim() - 1)).to(d.dtype) for k, d in deltas.items()
        }
        return clipped, norms

    def add(
        self, deltas: Mapping[str, torch.Tensor], clients: np.ndarray | None = None
    ) -> torch.Tensor:
        """Clip (and noise) a cohort's updates and add them to the round's sum; return norms.

        ``clients`` (their ids, in the order of ``deltas``) lets distributed and local
        placements track how often each client took part; without it every round counts for
        every client (a valid upper bound).
        """
        released, norms = self.release(deltas)
        for k, d in released.items():
            s = d.sum(0)
            self._sum[k] = self._sum[k] + s if k in self._sum else s
        n = int(norms.shape[0])
        self._unclipped += int((norms <= self.clip_norm).sum())
        self._clients += n
        if self.placement == "distributed" and self.adaptive is not None and self.count_noise:
            # Each client noises its own bit with a share of σ_b² (sensitivity 1/2 as central).
            std = self.count_noise / math.sqrt(self.noise_shares)
            self._bit_noise += float(
                self.client_source.normal((n,), std, dtype=torch.float64).sum()
            )
        if clients is None:
            self._anonymous = self._anonymous or n > 0
        else:
            self._round_clients.append(np.asarray(clients, dtype=np.int64))
        return norms

    def _charge(self, reports: int) -> float | None:
        """Charge the account for the release about to happen; return its effective multiplier."""
        where = f"round {len(self.history) + 1}"
        z_eff = self.effective_multiplier(reports)
        ids = np.concatenate(self._round_clients) if self._round_clients else np.zeros(0, np.int64)
        if self.placement == "local":
            # The worst-off client's count if this round is released (an anonymous round
            # counts for every client).
            here = max((self.rounds_taken.get(int(c), 0) + 1 for c in ids), default=0)
            before = max(self.rounds_taken.values(), default=0)
            n_max = max(before, here) + self._anonymous_rounds + int(self._anonymous)
            if self.account is not None and n_max:
                self.account.gaussian_total(
                    self.noise_multiplier / math.sqrt(n_max),
                    where,
                    f" (the worst-off client's update has now been seen {n_max} times, each "
                    f"with noise multiplier {self.noise_multiplier:.3f})",
                )
        elif self.account is not None:
            why = ""
            if self.placement == "distributed" and (z_eff or 0.0) < self.noise_multiplier:
                why = (
                    f": only {reports} noise share(s) reached the sum where {self.noise_shares:g} "
                    f"carry the planned noise (effective multiplier "
                    f"{0.0 if z_eff is None else z_eff:.3f} < {self.noise_multiplier:.3f}); "
                    "lower privacy.client_level.reporting_fraction for more headroom"
                )
            self.account.sampled_round(z_eff, where, why)
        # Charged: the release goes ahead. (Central: the server is trusted, nothing to track.)
        if self.placement != "central":
            precision = z_eff**-2 if self.placement == "distributed" and z_eff else 0.0
            for c in ids.tolist():
                self.rounds_taken[c] = self.rounds_taken.get(c, 0) + 1
                self.secagg_precision[c] = self.secagg_precision.get(c, 0.0) + precision
            if self._anonymous:
                self._anonymous_rounds += 1
                self._anonymous_precision += precision
        self.effective_multipliers.append(z_eff)
        return z_eff

    def noisy_mean(self, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The round's noisy mean update; updates the clip norm when adaptive; resets the sum.

        Central placement adds the noise here; distributed and local ones added it on the
        clients (:meth:`release`). With an :attr:`account`, the release is charged first and
        refused (:class:`PrivacyError`, nothing released) if it would exceed the budget.
        """
        self._charge(self._clients)
        std = self.value_noise_multiplier * self.clip_norm if self.placement == "central" else 0.0
        mean = {}
        for k, t in template.items():
            total = self._sum.get(k, torch.zeros_like(t))
            if std > 0:
                total = total + self.source.normal(t.shape, std, device=t.device, dtype=t.dtype)
            mean[k] = total / self.expected_clients
        record = {"clip_norm": self.clip_norm, "unclipped": float(self._unclipped)}
        if self.adaptive is not None:
            # Centred bits b_i - 1/2 have sensitivity 1/2, the paper's convention behind z_Δ.
            centred = (
                self._unclipped
                - self._clients / 2
                + (
                    float(self.source.normal((1,), self.count_noise)[0])
                    if self.count_noise and self.placement == "central"
                    else self._bit_noise
                )
            )
            fraction = centred / self.expected_clients + 0.5
            self.clip_norm *= math.exp(
                -self.adaptive.learning_rate * (fraction - self.adaptive.target_quantile)
            )
            record["noisy_unclipped_fraction"] = fraction
        self.history.append(record)
        self._sum, self._unclipped, self._clients, self._bit_noise = {}, 0, 0, 0.0
        self._round_clients, self._anonymous = [], False
        return mean


def poisson_clients(num_clients: int, rate: float, source: NoiseSource) -> np.ndarray:
    """Clients of one round under Poisson sampling (each joins independently with ``rate``)."""
    return np.flatnonzero(source.uniform(num_clients) < rate)


def client_level_statement(
    mech: ClientLevelDP,
    sampling_rate: float,
    rounds: int,
    planned_epsilon: float,
    delta: float,
    accountant: str,
) -> str:
    """The plain-language guarantee of client-level DP-FedAvg, before or after a run.

    Before training (nothing released yet) it states the plan; afterwards, for distributed and
    local noise, the ε the releases actually spent and what the server itself could learn.
    """
    z, m, acc = mech.noise_multiplier, mech.expected_clients, accountant.upper()
    start = mech.initial_clip_norm
    clipping = (
        f"an adaptive clip norm (starting at {start:g}, tracking the "
        f"{mech.adaptive.target_quantile:g} quantile of update norms)"
        if mech.adaptive is not None
        else f"clip norm {start:g}"
    )
    sampled = f"clients joined each round by Poisson sampling (rate {sampling_rate:.3g})"
    account = mech.account if mech.effective_multipliers else None
    if mech.placement == "central":
        return (
            f"client-level DP-FedAvg: {sampled}; each client's whole update was clipped "
            f"({clipping}) and the server added Gaussian noise (multiplier {z:.3f}) to the sum; "
            f"(ε = {planned_epsilon:.3g}, δ = {delta:g}) per client over {rounds} rounds under "
            f"{acc} accounting"
        )
    if mech.placement == "local":
        spent = (
            f"(ε ≤ {planned_epsilon:.3g}, δ = {delta:g}) per client, even one taking part in "
            f"all {rounds} rounds"
            if account is None
            else f"(ε = {account.spent:.3g}, δ = {delta:g}) for the worst-off client, whose "
            f"update the server saw in {mech.max_rounds_taken()} of {rounds} rounds"
        )
        return (
            f"client-level DP-FedAvg with local noise: {sampled}; each client clipped its whole "
            f"update ({clipping}) and added Gaussian noise (multiplier {z:.3f}) before it left, "
            "so the server needs no trust. Against the server, which sees every update and "
            f"knows who took part (no amplification by sampling): {spent}, exact Gaussian "
            "accounting"
        )
    shares, share_z = mech.noise_shares, mech.server_share_multiplier() or 0.0
    head = (
        f"client-level DP-FedAvg with distributed noise: {sampled}; each client's whole update "
        f"was clipped ({clipping}) and the client added its own Gaussian noise share "
        f"(multiplier {share_z:.3f}), sized so that {shares:g} of the expected {m:g} clients' "
        f"shares carry noise multiplier {z:.3f}; the server added none. "
    )
    if account is None:
        return head + (
            f"Against anyone who sees only the aggregates, not who took part: (ε ≤ "
            f"{planned_epsilon:.3g}, δ = {delta:g}) per client over {rounds} rounds under {acc} "
            "accounting of the noise that actually reaches each round's sum (multiplier "
            f"z·sqrt(k/{shares:g}) for k reports); a round with too few reports to stay within "
            "that budget is refused and the run stops. This run has no secure aggregation, so "
            "the server sees each update with its own share only (add a secure_aggregation "
            "block: the clients then add Skellam shares inside the secure sum)"
        )
    released = [v for v in mech.effective_multipliers if v is not None]
    low = f"{min(released):.3f}" if released else "n/a"
    return head + (
        f"Against anyone who sees only the aggregates, not who took part: (ε = "
        f"{account.spent:.3g}, δ = {delta:g}) per client over {rounds} rounds (budget "
        f"{planned_epsilon:.3g}) under {acc} accounting of the noise that actually reached each "
        f"round's sum (multiplier z·sqrt(k/{shares:g}) for k reports; lowest {low}). Against "
        "the server it does not hold: this run had no secure aggregation (add a "
        "secure_aggregation block to have the clients add Skellam shares inside the secure "
        "sum), so the server saw each update with its own share only, and the "
        f"worst-off client, whose update it saw in {mech.max_rounds_taken()} round(s), has "
        f"ε = {mech.epsilon_vs_server(delta) or 0.0:.3g} against it (one Gaussian with "
        f"multiplier {share_z:.3f} per round, no amplification: the server knows who took part)"
    )


def client_level_summary(
    mech: ClientLevelDP | None, planned_epsilon: float | None, delta: float | None
) -> dict[str, object]:
    """Summary fields of a finished client-level DP run (empty without one).

    ``noise_placement``; for distributed and local noise the ε actually spent (``epsilon``),
    the budget (``epsilon_budget``), ``epsilon_vs_server`` (the worst-off client against a
    server that sees each update) and ``max_rounds_per_client``; for distributed noise also
    ``min_effective_noise_multiplier`` (the lowest any round's sum carried), the per-round
    multipliers, ``noise_shares`` and ``epsilon_vs_server_with_secagg`` (against a server that
    would see only the sums but knows who took part, as under secure aggregation).
    """
    if mech is None:
        return {}
    out: dict[str, object] = {"noise_placement": mech.placement}
    if mech.account is None or delta is None:
        return out
    released = [v for v in mech.effective_multipliers if v is not None]
    out |= {
        "epsilon": mech.account.spent,
        "epsilon_budget": planned_epsilon,
        "epsilon_vs_server": mech.epsilon_vs_server(delta),
        "max_rounds_per_client": mech.max_rounds_taken(),
    }
    if mech.placement == "distributed":
        out |= {
            "noise_shares": mech.noise_shares,
            "min_effective_noise_multiplier": min(released) if released else None,
            "effective_noise_multipliers": list(mech.effective_multipliers),
            "epsilon_vs_server_with_secagg": mech.epsilon_vs_server_with_secagg(delta),
        }
    return out
