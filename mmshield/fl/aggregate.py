"""Streaming, modality-aware weighted averaging of client updates.

Clients arrive in cohorts; the accumulator keeps only one running sum per parameter, so memory
does not grow with the number of clients. An encoder's parameters are averaged only over the
clients that hold that modality: a client without audio never pulls the audio encoder toward the
global value it started from.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from mmshield.models.model import modality_of_parameter


def weight_of(
    name: str, examples: torch.Tensor, modality_examples: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """A parameter's aggregation weight per client: records holding its encoder's modality."""
    modality = modality_of_parameter(name)
    if modality is not None and modality in modality_examples:
        # An encoder learns only from the records that hold its modality.
        return modality_examples[modality]
    return examples


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
        discount: torch.Tensor | None = None,
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
        discount
            Optional ``(K,)`` factors that shrink each client's contribution without entering
            the normaliser (FedBuff's staleness weighting: a stale update moves the model less).
        """
        self.clients += int(examples.shape[0])
        for name, delta in deltas.items():
            w = weight_of(name, examples, modality_examples).to(delta.dtype)
            self._weight[name] += w.sum()
            if discount is not None:
                w = w * discount.to(delta.dtype)
            self._sum[name] += torch.tensordot(w, delta, dims=1)

    @staticmethod
    def contributions(
        deltas: Mapping[str, torch.Tensor],
        examples: torch.Tensor,
        modality_examples: Mapping[str, torch.Tensor],
        discount: torch.Tensor | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Each client's share of the sums (arguments as :meth:`add`), before they are added.

        Returns ``name -> (K, *shape)`` weighted deltas and ``name -> (K,)`` weights: what a
        secure aggregation protocol sums on the server's behalf.
        """
        weighted, weights = {}, {}
        for name, delta in deltas.items():
            w = weight_of(name, examples, modality_examples).to(delta.dtype)
            weights[name] = w
            if discount is not None:
                w = w * discount.to(delta.dtype)
            weighted[name] = delta * w.view(-1, *[1] * (delta.dim() - 1))
        return weighted, weights

    def add_sums(
        self,
        weighted_sum: Mapping[str, torch.Tensor],
        weight_sum: Mapping[str, torch.Tensor],
        clients: int,
    ) -> None:
        """Add already summed contributions of ``clients`` clients (see :meth:`contributions`)."""
        self.clients += clients
        for name, total in weighted_sum.items():
            self._sum[name] += total.to(self._sum[name].dtype)
            self._weight[name] += weight_sum[name].to(self._weight[name].dtype)

    def mean(self) -> dict[str, torch.Tensor]:
        """Weighted mean delta of every parameter that at least one client could update.

        A parameter no client contributed to (nobody held its modality) is left out, so that
        no server optimiser moves it.
        """
        return {k: s / self._weight[k] for k, s in self._sum.items() if float(self._weight[k]) > 0}


class ClientQuality:
    """Per-client quality scores that multiply aggregation weights.

    A score says how much a client's data are worth relative to their size: 0.2 for a site known
    to label carelessly, 0 for an audio stream known to be broken. A plain score multiplies the
    client's weight for every parameter group; a ``modality -> score`` mapping multiplies only
    that modality's encoder weight, so a client's noisy modality does not dilute its encoder
    while the client still counts fully elsewhere.

    Parameters
    ----------
    scores
        ``client -> score`` or ``client -> {modality: score}``; absent clients score 1.
    num_clients
        Population size.
    modalities
        The data set's modalities.

    Raises
    ------
    ValueError
        Naming the client or modality that does not exist, or a negative or non-finite score.
    """

    def __init__(
        self,
        scores: Mapping[int, float | Mapping[str, float]],
        num_clients: int,
        modalities: list[str],
    ) -> None:
        self.client = np.ones(num_clients)
        self.modality = {m: np.ones(num_clients) for m in modalities}
        for client, score in scores.items():
            if not 0 <= client < num_clients:
                raise ValueError(
                    f"client {client} does not exist (clients are 0..{num_clients - 1})"
                )
            values = dict(score) if isinstance(score, Mapping) else {"": score}
            for modality, v in values.items():
                if not (np.isfinite(v) and v >= 0):
                    raise ValueError(f"client {client}: quality must be finite and >= 0, got {v}")
                if modality == "":
                    self.client[client] = v
                elif modality in self.modality:
                    self.modality[modality][client] = v
                else:
                    raise ValueError(
                        f"client {client}: unknown modality {modality!r}; "
                        f"the data set has {modalities}"
                    )

    def apply(
        self,
        clients: np.ndarray,
        examples: torch.Tensor,
        modality_examples: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weights of ``clients`` after their quality scores."""
        q = torch.as_tensor(self.client[clients], dtype=examples.dtype, device=examples.device)
        by_modality = {
            m: e * q * torch.as_tensor(self.modality[m][clients], dtype=e.dtype, device=e.device)
            for m, e in modality_examples.items()
        }
        return examples * q, by_modality
