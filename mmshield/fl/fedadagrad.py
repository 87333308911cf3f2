"""FedAdagrad (Reddi et al. 2021): ``v`` accumulates squared pseudo-gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmshield.fl.fedopt import FedOpt


@dataclass
class FedAdagrad(FedOpt):
    """Adaptive server optimiser with Adagrad's second moment (``beta_1`` defaults to 0)."""

    beta_1: float = 0.0

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``v + delta**2``."""
        return v + delta**2
