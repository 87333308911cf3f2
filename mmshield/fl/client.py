"""Client-side local training: the batch schedule, the vectorised trainer and its reference.

Local training is minibatch SGD (PyTorch's ``torch.optim.SGD`` semantics: weight decay added to
the gradient, heavy-ball momentum without dampening) over ``local_epochs`` shuffled passes of the
client's data. :func:`batch_schedule` fixes which records form each step, so the vectorised trainer
(:func:`train_stacked`, all clients of a cohort at once with ``torch.func.vmap``) and the plain
per-client loop (:func:`train_client_sequential`, the reference and what a real site runs) do the
same work and give the same update up to floating-point summation order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from mmshield.data.dataset import MultimodalDataset
from mmshield.models.model import MultimodalModel


@dataclass(frozen=True)
class LocalTraining:
    """Hyper-parameters of local training.

    Parameters
    ----------
    local_epochs
        Passes over the client's data per round.
    batch_size
        Records per step (the last step of an epoch may be smaller).
    lr
        Learning rate.
    momentum
        Heavy-ball momentum (0 for plain SGD); the buffer starts at zero every round.
    weight_decay
        L2 penalty added to the gradient.
    proximal_mu
        FedProx's proximal term (Li et al. 2020): ``mu / 2 * ||w - w_global||^2`` is added to the
        local loss, pulling local models toward the round's global model (0 is FedAvg).
    """

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0

    def steps(self, n: int) -> int:
        """Number of local steps a client with ``n`` records takes."""
        return self.local_epochs * math.ceil(n / self.batch_size) if n > 0 else 0


def client_seed(seed: int, round: int, client: int) -> int:
    """Seed of one client's shuffling in one round, derived from the run seed.

    A hash rather than ``numpy.random.SeedSequence``, which costs 30 µs per call: with thousands
    of clients per round that was a visible share of the simulator's overhead. Not secret.
    """
    digest = hashlib.blake2b(f"{seed}/{round}/{client}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def batch_schedule(n: int, training: LocalTraining, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which local records form each step.

    Parameters
    ----------
    n
        Number of records the client holds.
    training
        Local training settings.
    seed
        Client's seed for this round (:func:`client_seed`).

    Returns
    -------
    index, weight
        ``(steps, batch_size)`` int64 local indices and float32 weights (1 for a real record,
        0 for padding in the last, partial batch of an epoch).
    """
    b = training.batch_size
    per_epoch = math.ceil(n / b) if n > 0 else 0
    rng = np.random.default_rng(seed)
    index = np.zeros((training.local_epochs, per_epoch * b), dtype=np.int64)
    for e in range(training.local_epochs):
        index[e, :n] = rng.permutation(n)
    weight = np.zeros((training.local_epochs, per_epoch * b), dtype=np.float32)
    weight[:, :n] = 1.0
    return torch.from_numpy(index.reshape(-1, b)), torch.from_numpy(weight.reshape(-1, b))


def _weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def train_client_sequential(
    model: MultimodalModel,
    data: MultimodalDataset,
    training: LocalTraining,
    seed: int,
    correction: Mapping[str, torch.Tensor] | None = None,
    max_steps: int | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Train one client with a plain PyTorch loop (the reference implementation).

    Parameters
    ----------
    model
        Model holding the global parameters; trained in place.
    data
        The client's local records.
    training
        Local training settings.
    seed
        Client's seed for this round (:func:`client_seed`).
    correction
        Optional ``name -> tensor`` added to every gradient (SCAFFOLD's ``c - c_i``).
    max_steps
        Stop after this many steps (a straggler's partial work); ``None``: all of them.

    Returns
    -------
    state, mean_loss
        A copy of the trained parameters and the mean training loss over the steps.
    """
    index, weight = batch_schedule(len(data), training, seed)
    if max_steps is not None:
        index, weight = index[:max_steps], weight[:max_steps]
    opt = torch.optim.SGD(
        model.parameters(),
        lr=training.lr,
        momentum=training.momentum,
        weight_decay=training.weight_decay,
    )
    model.train()
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = []
    for s in range(index.shape[0]):
        rows = index[s][weight[s] > 0]
        inputs = {m: data.inputs[m][rows] for m in data.modalities}
        present = {m: data.present[m][rows] for m in data.modalities}
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs, present), data.labels[rows])
        objective = loss
        if training.proximal_mu:
            objective = loss + training.proximal_mu / 2 * sum(
                ((p - anchor[k]) ** 2).sum() for k, p in model.named_parameters()
            )
        objective.backward()
        if correction is not None:
            for k, p in model.named_parameters():
                p.grad = correction[k].clone() if p.grad is None else p.grad + correction[k]
        opt.step()
        losses.append(float(loss.detach()))
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    return state, float(np.mean(losses)) if losses else float("nan")


def train_stacked(
    model: MultimodalModel,
    params: Mapping[str, torch.Tensor],
    data: MultimodalDataset,
    index: torch.Tensor,
    weight: torch.Tensor,
    training: LocalTraining,
    correction: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Train a cohort of clients at once, vectorised over clients with ``torch.func.vmap``.

    Parameters
    ----------
    model
        The architecture (its own parameters are not used; buffers are shared).
    params
        ``name -> (K, *shape)`` stacked starting parameters, one slice per client.
    data
        The records of all clients (on the training device).
    index
        ``(K, steps, batch)`` int64 rows of ``data`` for each client's steps (padding: any row).
    weight
        ``(K, steps, batch)`` float weights: 1 for a real record, 0 for padding. Each client's
        real steps come first; once they end, its parameters and momentum are left untouched,
        which is how clients with fewer steps than the longest one are handled exactly.
    training
        Local training settings.
    correction
        Optional ``name -> (K, *shape)`` added to each client's gradients (SCAFFOLD).

    Returns
    -------
    params, mean_loss
        Trained stacked parameters and each client's mean loss over its real steps.
    """
    buffers = dict(model.named_buffers())
    names = list(params.keys())

    def loss_fn(
        p: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
        labels: torch.Tensor,
        w: torch.Tensor,
    ) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (inputs, present))
        return _weighted_loss(logits, labels, w)

    step_fn = vmap(grad_and_value(loss_fn))
    k_clients = index.shape[0]
    # A client's schedule is a prefix of the steps (its real steps come first). Sorting clients
    # by schedule length, longest first, makes the clients still training at any step a prefix of
    # the cohort, so each step computes on a view of that prefix and skips finished clients.
    has_work = weight.sum(2) > 0  # (K, steps)
    lengths = has_work.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    index, weight, lengths = index[order], weight[order], lengths[order]
    start = {k: v[order] for k, v in params.items()}
    current = {k: v.clone() for k, v in start.items()}
    corr = {k: v[order] for k, v in correction.items()} if correction is not None else None
    momentum = {k: torch.zeros_like(v) for k, v in current.items()} if training.momentum else {}
    loss_sum = torch.zeros(k_clients, device=weight.device)
    modalities = data.modalities
    steps = int(lengths[0]) if k_clients else 0
    for s in range(steps):
        n = int((lengths > s).sum())
        rows = index[:n, s]
        w = weight[:n, s]
        inputs = {m: data.inputs[m][rows] for m in modalities}
        present = {m: data.present[m][rows] for m in modalities}
        active = {k: v[:n] for k, v in current.items()}
        grads, loss = step_fn(active, inputs, present, data.labels[rows], w)
        with torch.no_grad():
            for name in names:
                p = active[name]
                g = grads[name]
                if corr is not None:
                    g = g + corr[name][:n]
                if training.weight_decay:
                    g = g + training.weight_decay * p
                if training.proximal_mu:
                    g = g + training.proximal_mu * (p - start[name][:n])
                if training.momentum:
                    buf = momentum[name][:n]
                    buf.mul_(training.momentum).add_(g)
                    g = buf
                p.sub_(training.lr * g)
            loss_sum[:n] += loss.detach()
    inverse = torch.argsort(order)
    mean_loss = loss_sum / lengths.clamp_min(1).to(loss_sum.dtype)
    return {k: v[inverse] for k, v in current.items()}, mean_loss[inverse]
