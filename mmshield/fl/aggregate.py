"""Streaming, modality-aware weighted averaging of client updates.

Clients arrive in cohorts; the accumulator keeps only one running sum per parameter, so memory
does not grow with the number of clients. An encoder's parameters are averaged only over the
clients that hold that modality: a client without audio never pulls the audio encoder toward the
global value it started from.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mmshield.models.model import modality_of_parameter


class ModalityAwareMean:
    """Weighted mean of client deltas; an encoder's weights count only records holding its modality.

    Parameters
    ----------
    template
        ``name -> tensor`` giving the parameter names, shapes, dtype and device.
    """

    def __init__(self, template: Mapping[str, torch.Tensor]) -> None:
        self._sum = {k: torch.zeros_like(v) for k, v in template.items()}
        self._weight = {
            k: torch.zeros((), dtype=v.dtype, device=v.device) for k, v in template.items()
        }
        self.clients = 0

    def add(
        self,
        deltas: Mapping[str, torch.Tensor],
        examples: torch.Tensor,
        modality_examples: Mapping[str, torch.Tensor],
    ) -> None:
        """Add a cohort of ``K`` client updates.

        Parameters
        ----------
        deltas
            ``name -> (K, *shape)`` local minus global parameters.
        examples
            ``(K,)`` number of records each client trained on: the weight of shared parameters
            (fusion, head).
        modality_examples
            ``modality -> (K,)`` records in which that modality is present: the weight of that
            modality's encoder, so a client with 0 is left out of its average and a client
            holding the modality in few records counts for few.
        """
        self.clients += int(examples.shape[0])
        for name, delta in deltas.items():
            modality = modality_of_parameter(name)
            w = examples.to(delta.dtype)
            if modality is not None and modality in modality_examples:
                # An encoder learns only from the records that hold its modality.
                w = modality_examples[modality].to(delta.dtype)
            self._sum[name] += torch.tensordot(w, delta, dims=1)
            self._weight[name] += w.sum()

    def mean(self) -> dict[str, torch.Tensor]:
        """Weighted mean delta of every parameter that at least one client could update.

        A parameter no client contributed to (nobody held its modality) is left out, so that
        no server optimiser moves it.
        """
        return {k: s / self._weight[k] for k, s in self._sum.items() if float(self._weight[k]) > 0}
