"""SCAFFOLD (Karimireddy et al. 2020): control variates that correct client drift.

Each client keeps a control variate ``c_i`` and the server keeps ``c``. A client's local steps use
the corrected gradient ``g + c - c_i``; afterwards it sets (option II of the paper)
``c_i+ = c_i - c + (x - y_i) / (K_i * lr)`` with ``K_i`` its number of local steps, and the server
moves ``c`` by ``|S| / N`` times the mean of the clients' ``c_i+ - c_i``. The model itself is
averaged as in FedAvg.

Modality-aware: a client that lacks a modality leaves that encoder's part of ``c`` alone (its
``c_i`` for that encoder carries no information about the encoder's gradient).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mmshield.fl.aggregate import ModalityAwareMean


class Scaffold:
    """Server and client control variates of SCAFFOLD.

    Parameters
    ----------
    template
        ``name -> tensor`` of the model's parameters (shapes, dtype, device).
    num_clients
        ``N``, the size of the population.
    """

    def __init__(self, template: Mapping[str, torch.Tensor], num_clients: int) -> None:
        self.server = {k: torch.zeros_like(v) for k, v in template.items()}
        self.clients: dict[int, dict[str, torch.Tensor]] = {}
        self.num_clients = num_clients
        self._round: ModalityAwareMean | None = None

    def _stacked(self, clients: Sequence[int]) -> dict[str, torch.Tensor]:
        """``c_i`` of ``clients`` stacked: ``name -> (K, *shape)`` (zero for a new client)."""
        zero = {k: torch.zeros_like(v) for k, v in self.server.items()}
        controls = [self.clients.get(int(c), zero) for c in clients]
        return {k: torch.stack([c[k] for c in controls]) for k in self.server}

    def correction(self, clients: Sequence[int]) -> dict[str, torch.Tensor]:
        """``c - c_i`` stacked for ``clients``: ``name -> (K, *shape)``."""
        return {k: self.server[k] - ci for k, ci in self._stacked(clients).items()}

    def add_cohort(
        self,
        clients: Sequence[int],
        start: Mapping[str, torch.Tensor],
        trained: Mapping[str, torch.Tensor],
        steps: torch.Tensor,
        lr: float,
        modality_examples: Mapping[str, torch.Tensor],
    ) -> None:
        """Update the cohort's ``c_i`` (option II) and collect their changes for the server.

        Parameters
        ----------
        clients
            Client ids, in the order of the stacked tensors.
        start
            The round's global parameters ``x``.
        trained
            ``name -> (K, *shape)`` local models ``y_i``.
        steps
            ``(K,)`` local steps each client took.
        lr
            Local learning rate.
        modality_examples
            ``modality -> (K,)`` records holding it (0: the client lacks it).
        """
        if self._round is None:
            self._round = ModalityAwareMean(self.server)
        k_steps = (steps.to(torch.float32) * lr).clamp_min(1e-12)
        old = self._stacked(clients)
        new: dict[str, torch.Tensor] = {}
        for name, y in trained.items():
            scale = k_steps.view(-1, *([1] * (y.dim() - 1)))
            new[name] = old[name] - self.server[name] + (start[name] - y) / scale
        for i, c in enumerate(clients):
            self.clients[int(c)] = {name: v[i] for name, v in new.items()}
        changes = {name: new[name] - old[name] for name in new}
        # The paper averages control-variate changes without weights: one vote per client
        # (per client holding the modality, for an encoder).
        ones = (steps > 0).to(torch.float32)
        holds = {m: (v > 0).to(torch.float32) * ones for m, v in modality_examples.items()}
        self._round.add(changes, ones, holds)

    def finish_round(self, sampled: int) -> None:
        """Move ``c`` by ``|S| / N`` times the mean change of the sampled clients' ``c_i``."""
        if self._round is None:
            return
        for name, mean_change in self._round.mean().items():
            self.server[name] = self.server[name] + sampled / self.num_clients * mean_change
        self._round = None
