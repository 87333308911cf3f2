"""Client-level DP-FedAvg with distributed Skellam noise, for sums taken by secure aggregation.

Each invited client clips its whole update to L2 norm ``S``, encodes it with the distributed
Skellam mechanism (:class:`~mmshield.privacy.skellam.DistributedSkellam`: random rotation from
a public per-round seed, fixed-point scale, conditional randomized rounding, its own Skellam
noise share, reduction into ``Z_{2^bits}``) and hands the ring vector to secure aggregation. The
server receives only the sum, decodes it and divides by the expected number of clients ``m``
(a data-independent denominator; every client weighs the same, as in DP-FedAvg). No party sees
a sum with less noise than the shares of the clients in it, and the server never sees an
un-noised one.

**Accounting.** The server runs the protocol and so knows who took part: there is no
amplification by sampling against it, and a client is charged (Skellam RDP) for each round its
update reached a sum, at the noise that sum really carried: ``(k - c) μ / m_s`` for ``k``
reports, ``c = ceil(γ k)`` of them possibly colluding with the server (their shares subtracted)
and ``m_s = ρ m`` shares planned to carry ``μ`` (``ρ``: the reporting fraction). Dropouts and
small rounds therefore cost more ε, and each round is charged before its sum is released:
:class:`~mmshield.privacy.skellam.SkellamAccount` refuses a release that would take the worst-off
client past the budget. ``μ`` is planned so that a client taking part in ``P`` rounds
(``max_participation``) with all planned shares present spends exactly the target ε; clients
that have taken part ``P`` times are not invited again, so the plan is a guarantee rather than
a likely outcome.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mmshield.errors import PrivacyError
from mmshield.privacy.noise import NoiseSource
from mmshield.privacy.skellam import DistributedSkellam, SkellamAccount


@dataclass(frozen=True)
class SkellamRound:
    """What one released sum carried (for the run's records and report)."""

    reports: int
    """Clients whose encodings are in the sum."""
    colluding: int
    """Of those, how many are assumed to collude with the server (shares not counted)."""
    mu_effective: float
    """Noise variance per coordinate the sum carried, integer units."""
    effective_multiplier: float
    """Gaussian-equivalent noise multiplier ``sqrt(μ_eff) / (γ S)`` of the sum."""
    clipped: int
    """Clients whose update norm exceeded ``S``."""
    suspect_wraps: int
    """Coordinates beyond the ring's planned bound (wrap-arounds; see ``SkellamDecoded``)."""
    epsilon: float
    """The worst-off client's ε after this release."""


class SkellamFedAvg:
    """DP-FedAvg's client half (clip and encode) and server half (charge, decode, mean).

    Parameters
    ----------
    mechanism
        The distributed Skellam mechanism (its ``dim`` is the number of trained parameters,
        its ``max_clients`` the most clients invited to one sum, its ``clip`` the clip norm
        ``S`` of a whole update).
    expected_clients
        ``m``, the mean's denominator (clients invited per round).
    account
        Charges each release before it happens (per client, no amplification by sampling).
    client_source
        The clients' secret randomness (rounding and noise shares).
    seed_source
        Draws each round's public rotation seed.
    collusion
        ``γ``: the fraction of reporting clients assumed to collude with the server.
    max_participation
        ``P``: the most rounds one client may take part in.
    """

    def __init__(
        self,
        mechanism: DistributedSkellam,
        expected_clients: int,
        account: SkellamAccount,
        client_source: NoiseSource,
        seed_source: NoiseSource,
        collusion: float = 0.0,
        max_participation: int | None = None,
    ) -> None:
        if not 0 <= collusion < 1:
            raise PrivacyError(f"collusion must be in [0, 1), got {collusion}")
        self.mechanism = mechanism
        self.expected_clients = expected_clients
        self.account = account
        self.client_source = client_source
        self.seed_source = seed_source
        self.collusion = collusion
        self.max_participation = max_participation
        self.history: list[SkellamRound] = []

    @property
    def clip_norm(self) -> float:
        """``S``, the clip norm of a whole update (the mechanism's)."""
        return self.mechanism.clip

    @property
    def planned_multiplier(self) -> float:
        """Gaussian-equivalent multiplier ``sqrt(μ) / (γ S)`` when all planned shares arrive."""
        m = self.mechanism
        return math.sqrt(m.mu) / (m.scale * self.clip_norm)

    def eligible(self, num_clients: int) -> np.ndarray:
        """Mask of the clients that may still be invited (below ``max_participation``)."""
        mask = np.ones(num_clients, dtype=bool)
        if self.max_participation is not None:
            for c, n in self.account.participation.items():
                if n >= self.max_participation and c < num_clients:
                    mask[c] = False
        return mask

    def round_seed(self) -> int:
        """A fresh public rotation seed for one round (drawn after the clients have trained)."""
        return int(self.seed_source.uniform(1)[0] * 2.0**53)

    def encode(
        self, deltas: Mapping[str, torch.Tensor], clients: np.ndarray, round_seed: int
    ) -> tuple[dict[int, np.ndarray], int]:
        """Client half for a cohort: clip, rotate, scale, round, add a noise share, wrap.

        Parameters
        ----------
        deltas
            ``name -> (K, *shape)`` stacked updates of ``clients`` (in the template's order).
        clients
            Their ids.
        round_seed
            The round's public rotation seed.

        Returns
        -------
        inputs, clipped
            ``client -> ring vector`` and how many clients' updates exceeded the clip norm.
        """
        k = len(clients)
        rows = torch.cat([d.reshape(k, -1).to(torch.float64).cpu() for d in deltas.values()], 1)
        flat = rows.numpy()
        out, clipped = {}, 0
        for i, c in enumerate(clients):
            enc = self.mechanism.encode(flat[i], self.client_source, round_seed=round_seed)
            out[int(c)] = enc.values
            clipped += int(enc.clipped)
        return out, clipped

    def release(
        self,
        total: np.ndarray,
        included: tuple[int, ...],
        round_seed: int,
        template: Mapping[str, torch.Tensor],
        where: str,
        clipped: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Server half: charge the release (refusing it beyond the budget), decode, divide.

        Raises
        ------
        PrivacyError
            If the release would take a client past the budget; nothing is released.
        """
        k = len(included)
        colluding = math.ceil(self.collusion * k)
        mu = self.mechanism.effective_mu(k, colluding)
        eps = self.account.charge(mu, where, list(included))
        decoded = self.mechanism.decode(total, k, round_seed=round_seed)
        flat = torch.from_numpy(decoded.values / self.expected_clients)
        mean, offset = {}, 0
        for name, t in template.items():
            mean[name] = flat[offset : offset + t.numel()].view(t.shape).to(t)
            offset += t.numel()
        m = self.mechanism
        self.history.append(
            SkellamRound(
                reports=k,
                colluding=colluding,
                mu_effective=mu,
                effective_multiplier=math.sqrt(mu) / (m.scale * self.clip_norm),
                clipped=clipped,
                suspect_wraps=decoded.suspect_wraps,
                epsilon=eps,
            )
        )
        return mean

    def summary(self) -> dict[str, object]:
        """Summary fields of the mechanism and what its releases carried."""
        m, h = self.mechanism, self.history
        return {
            "mechanism": "distributed Skellam (Agarwal et al. 2021) under secure aggregation",
            "clip_norm": self.clip_norm,
            "scale": m.scale,
            "bits": m.bits,
            "mu": m.mu,
            "noise_shares": m.noise_shares,
            "planned_noise_multiplier": self.planned_multiplier,
            "effective_noise_multipliers": [r.effective_multiplier for r in h],
            "min_effective_noise_multiplier": min(
                (r.effective_multiplier for r in h), default=None
            ),
            "reports_per_round": [r.reports for r in h],
            "colluding_assumed": [r.colluding for r in h],
            "clipped_updates": sum(r.clipped for r in h),
            "suspect_wraps": sum(r.suspect_wraps for r in h),
            "max_participation": self.max_participation,
            "max_rounds_per_client": max(self.account.participation.values(), default=0),
            "modclip_prob": m.modclip_prob,
        }


def default_max_participation(rounds: int, clients_per_round: int, num_clients: int) -> int:
    """A participation cap that uniform sampling rarely reaches: mean plus four standard
    deviations of the Binomial(rounds, q) count, at least 1, at most ``rounds``."""
    q = min(1.0, clients_per_round / num_clients)
    mean = rounds * q
    return max(1, min(rounds, math.ceil(mean + 4.0 * math.sqrt(mean * (1.0 - q)))))


def skellam_statement(fedavg: SkellamFedAvg, rounds: int, budget: float) -> str:
    """The plain-language guarantee, before a run (the plan) or after it (what it spent)."""
    m, acc = fedavg.mechanism, fedavg.account
    head = (
        f"client-level DP-FedAvg with distributed Skellam noise inside secure aggregation: "
        f"each invited client clipped its whole update to norm {fedavg.clip_norm:g}, rotated "
        "it (randomised Hadamard, public per-round seed), scaled it by "
        f"{m.scale:g}, rounded it and added its own Skellam noise share before masking it; "
        f"the server decoded only the {m.bits}-bit sum, sized so that {m.noise_shares:g} of "
        f"the {fedavg.expected_clients} invited clients' shares carry noise multiplier "
        f"{fedavg.planned_multiplier:.3f} (variance {m.mu:.4g} in integer units). "
    )
    collusion = (
        f" It assumes at most a fraction {fedavg.collusion:g} of the reporting clients "
        "collude with the server; their shares are not counted."
        if fedavg.collusion
        else " It assumes no client colludes with the server (a colluder could subtract its "
        "own share; declare secure_aggregation.collusion to account for that)."
    )
    cap = fedavg.max_participation
    if not fedavg.history:
        return (
            head + f"Against the server itself, which knows who took part (no amplification by "
            f"sampling), and anyone else: (ε ≤ {budget:.3g}, δ = {acc.delta:g}) per client "
            f"taking part in at most {cap} of {rounds} rounds, under RDP accounting of the "
            "noise that actually reaches each sum; a round whose reports are too few to "
            "afford is refused and the run stops." + collusion
        )
    low = min(r.effective_multiplier for r in fedavg.history)
    most = max(acc.participation.values(), default=0)
    return (
        head + f"Against the server itself, which knows who took part (no amplification by "
        f"sampling), and anyone else: (ε = {acc.spent:.3g}, δ = {acc.delta:g}) for the "
        f"worst-off client (budget {budget:.3g}), who took part in {most} round(s) (cap "
        f"{cap}), under RDP accounting of the noise that actually reached each of the "
        f"{len(fedavg.history)} released sums (lowest effective multiplier {low:.3f}: fewer "
        "reports, less noise, more ε)." + collusion
    )
