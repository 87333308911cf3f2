"""FedAvg (McMahan et al. 2017): the server adds the weighted mean client delta to the model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass
class FedAvg:
    """Federated averaging with an optional server learning rate.

    Parameters
    ----------
    server_lr
        Step size applied to the mean delta (1.0 is plain FedAvg).
    """

    server_lr: float = 1.0

    def step(
        self,
        global_params: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        round: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Return the new global parameters.

        Parameters absent from ``mean_delta`` (no sampled client held their modality) are kept.
        """
        return {
            k: v + self.server_lr * mean_delta[k] if k in mean_delta else v
            for k, v in global_params.items()
        }
