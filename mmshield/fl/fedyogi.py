"""FedYogi (Reddi et al. 2021): Yogi's additive, sign-controlled second moment."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmshield.fl.fedopt import FedOpt


@dataclass
class FedYogi(FedOpt):
    """Adaptive server optimiser with Yogi's second moment (default ``eta`` 0.01, as Flower)."""

    eta: float = 0.01

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``v - (1 - beta_2) * delta**2 * sign(v - delta**2)``."""
        d2 = delta**2
        return v - (1 - self.beta_2) * d2 * torch.sign(v - d2)
