"""FedBuff: buffered asynchronous aggregation (Nguyen et al. 2022).

Clients train asynchronously from whatever global model was current when they started; the server
buffers their updates and, once ``buffer_size`` have arrived, applies their mean with each update
shrunk by its staleness (server steps since its client started), ``s(τ) = (1 + τ)^-a`` with
``a = 0.5`` as in the paper. The buffer does the paper's weighting per parameter group on top of
mmshield's modality-aware example weighting: ``Σ s(τ_i) n_i Δ_i / Σ n_i``, so a buffer of fresh
updates is a plain weighted mean and stale ones move the model less. The driver that runs clients on
a simulated clock is :func:`mmshield.runtime.asynchronous.simulate_buffered`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mmshield.fl.aggregate import ModalityAwareMean


def staleness_weight(staleness: torch.Tensor, exponent: float = 0.5) -> torch.Tensor:
    """FedBuff's polynomial staleness discount ``(1 + τ)^-exponent``."""
    return (1.0 + staleness.to(torch.float32)).pow(-exponent)


class FedBuffBuffer:
    """The server's buffer of asynchronous client updates.

    Parameters
    ----------
    template
        ``name -> tensor``: parameter names, shapes, dtype and device.
    size
        Updates per server step (``K`` in the paper).
    exponent
        Staleness exponent ``a`` of :func:`staleness_weight` (0: no discount).
    """

    def __init__(self, template: Mapping[str, torch.Tensor], size: int, exponent: float = 0.5):
        if size < 1:
            raise ValueError(f"buffer size must be at least 1, got {size}")
        self.template = template
        self.size = size
        self.exponent = exponent
        self._reset()

    def _reset(self) -> None:
        self._mean = ModalityAwareMean(self.template)
        self.staleness: list[int] = []

    def __len__(self) -> int:
        return len(self.staleness)

    @property
    def full(self) -> bool:
        """Whether the server should step now."""
        return len(self) >= self.size

    def add(
        self,
        deltas: Mapping[str, torch.Tensor],
        examples: torch.Tensor,
        modality_examples: Mapping[str, torch.Tensor],
        staleness: torch.Tensor,
    ) -> None:
        """Add ``K`` updates (leading axis), each with its staleness in server steps."""
        self._mean.add(
            deltas, examples, modality_examples, staleness_weight(staleness, self.exponent)
        )
        self.staleness.extend(int(s) for s in staleness.tolist())

    def drain(self) -> tuple[dict[str, torch.Tensor], list[int]]:
        """The discounted mean delta and the updates' staleness; empties the buffer."""
        mean, staleness = self._mean.mean(), self.staleness
        self._reset()
        return mean, staleness
