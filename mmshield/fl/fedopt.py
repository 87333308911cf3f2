"""Adaptive server optimisers of Reddi et al. (2021), "Adaptive Federated Optimization".

The mean client delta is a pseudo-gradient; the server keeps a first moment ``m`` and a second
moment ``v`` per parameter and steps ``x + eta * m / (sqrt(v) + tau)``. FedAdagrad, FedAdam and
FedYogi differ only in how ``v`` is updated (one file each). The state update and the bias
correction of FedAdam follow Flower's implementations so that, given the same client updates,
both give the same model (Flower is the test oracle).

A parameter that no sampled client could update in a round (nobody held its modality) gets no
step and its moments are left as they were.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class FedOpt:
    """Shared state and step of the adaptive server optimisers.

    Parameters
    ----------
    eta
        Server learning rate.
    beta_1
        First-moment decay.
    beta_2
        Second-moment decay (unused by FedAdagrad).
    tau
        Adaptivity: added to ``sqrt(v)``.
    """

    eta: float = 0.1
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    _m: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)
    _v: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Updated second moment; each optimiser defines its own."""
        raise NotImplementedError

    def step_size(self, round: int) -> float:
        """Server step size in ``round`` (FedAdam adds bias correction)."""
        return self.eta

    def step(
        self,
        global_params: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        round: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Return the new global parameters (parameters without an update are kept)."""
        out = dict(global_params)
        eta = self.step_size(round)
        for k, delta in mean_delta.items():
            m = self._m.get(k, torch.zeros_like(delta))
            v = self._v.get(k, torch.zeros_like(delta))
            m = self.beta_1 * m + (1 - self.beta_1) * delta
            v = self.second_moment(v, delta)
            self._m[k], self._v[k] = m, v
            out[k] = global_params[k] + eta * m / (torch.sqrt(v) + self.tau)
        return out
