"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum on the mean update.

Follows PyTorch's SGD convention, as Flower's ``FedAvgM`` does: the momentum buffer starts at the
first round's update and then accumulates ``momentum * buffer + update``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class FedAvgM:
    """FedAvg with server-side heavy-ball momentum.

    Parameters
    ----------
    server_lr
        Server learning rate.
    momentum
        Server momentum (0 is FedAvg with a server learning rate).
    """

    server_lr: float = 1.0
    momentum: float = 0.0
    _buffer: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    def step(
        self,
        global_params: Mapping[str, torch.Tensor],
        mean_delta: Mapping[str, torch.Tensor],
        round: int = 1,
    ) -> dict[str, torch.Tensor]:
        """Return the new global parameters (parameters without an update are kept)."""
        out = dict(global_params)
        for k, delta in mean_delta.items():
            if self.momentum > 0:
                buf = self._buffer.get(k)
                delta = delta.clone() if buf is None else self.momentum * buf + delta
                self._buffer[k] = delta
            out[k] = global_params[k] + self.server_lr * delta
        return out
