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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from mmshield.privacy.noise import NoiseSource


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


class ClientLevelDP:
    """DP-FedAvg's clip (client half) and noisy mean (server half).

    Parameters
    ----------
    clip_norm
        Initial (or fixed) ``S``.
    noise_multiplier
        ``z``, the multiplier the accountant uses.
    expected_clients
        ``q N``.
    source
        Noise source.
    adaptive
        Adaptive clipping, or ``None`` for a fixed norm.
    """

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        expected_clients: float,
        source: NoiseSource,
        adaptive: AdaptiveClipping | None = None,
    ) -> None:
        if not clip_norm > 0 or noise_multiplier < 0 or not expected_clients > 0:
            raise ValueError("clip_norm and expected_clients must be > 0, noise_multiplier >= 0")
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_clients = expected_clients
        self.source = source
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
        self.history: list[dict[str, float]] = []

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

    def add(self, deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Clip a cohort's updates and add them to the round's sum; return their norms."""
        clipped, norms = self.clip(deltas)
        for k, d in clipped.items():
            s = d.sum(0)
            self._sum[k] = self._sum[k] + s if k in self._sum else s
        self._unclipped += int((norms <= self.clip_norm).sum())
        self._clients += int(norms.shape[0])
        return norms

    def noisy_mean(self, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The round's noisy mean update; updates the clip norm when adaptive; resets the sum."""
        std = self.value_noise_multiplier * self.clip_norm
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
                    if self.count_noise
                    else 0.0
                )
            )
            fraction = centred / self.expected_clients + 0.5
            self.clip_norm *= math.exp(
                -self.adaptive.learning_rate * (fraction - self.adaptive.target_quantile)
            )
            record["noisy_unclipped_fraction"] = fraction
        self.history.append(record)
        self._sum, self._unclipped, self._clients = {}, 0, 0
        return mean


def poisson_clients(num_clients: int, rate: float, source: NoiseSource) -> np.ndarray:
    """Clients of one round under Poisson sampling (each joins independently with ``rate``)."""
    return np.flatnonzero(source.uniform(num_clients) < rate)
