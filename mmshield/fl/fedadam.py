"""FedAdam (Reddi et al. 2021): Adam's moments on the server's pseudo-gradient."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmshield.fl.fedopt import FedOpt


@dataclass
class FedAdam(FedOpt):
    """Adaptive server optimiser with Adam's second moment and bias-corrected step size.

    The bias correction uses ``t = round + 1``, as Flower's ``FedAdam`` does.
    """

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``beta_2 * v + (1 - beta_2) * delta**2``."""
        return self.beta_2 * v + (1 - self.beta_2) * delta**2

    def step_size(self, round: int) -> float:
        """``eta * sqrt(1 - beta_2^t) / (1 - beta_1^t)`` with ``t = round + 1``."""
        t = round + 1.0
        return self.eta * math.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)
