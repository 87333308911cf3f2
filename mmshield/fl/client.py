"""Client-side local training: the batch schedule, the vectorised trainer and its reference.

Local training is minibatch SGD (PyTorch's ``torch.optim.SGD`` semantics: weight decay added to
the gradient, heavy-ball momentum without dampening) over ``local_epochs`` shuffled passes of the
client's data. :func:`batch_schedule` fixes which records form each step, so the vectorised trainer
(:func:`train_stacked`, all clients of a cohort at once with ``torch.func.vmap``) and the plain
per-client loop (:func:`train_client_sequential`, the reference and what a real site runs) do the
same work and give the same update up to floating-point summation order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from mmshield.data.dataset import MultimodalDataset
from mmshield.models.model import MultimodalModel


class PrivateGradient(Protocol):
    """What sample-level DP plugs into the trainer (:class:`mmshield.privacy.dpsgd.DPSGD`)."""

    def clipped_sum_fn(
        self, model: MultimodalModel
    ) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
        """A vmappable ``(params, inputs, present, labels, weight) -> (sums, loss_sum, norms)``."""
        ...

    def noise(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Noise shaped like ``like``."""
        ...


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


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_PADDING_KEY = np.uint64(np.iinfo(np.uint64).max)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a ``uint64`` array: a fast, well-mixed hash (not secret)."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2^64 is the point
        z = np.atleast_1d(x).astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def client_seeds(seed: int, key: int | np.ndarray, clients: np.ndarray) -> np.ndarray:
    """Seeds of the clients' shuffling for a round (or per-client asynchronous task ``key``).

    A counter-based hash of ``(seed, key, client)``, vectorised over clients, so that seeding
    ten thousand clients costs microseconds. Not secret: it only orders local minibatches.
    """
    with np.errstate(over="ignore"):
        base = _mix(np.asarray(seed, dtype=np.int64).astype(np.uint64))
        keyed = _mix(base + np.asarray(key, dtype=np.int64).astype(np.uint64))
        return _mix(keyed + np.asarray(clients, dtype=np.int64).astype(np.uint64)) >> np.uint64(1)


def client_seed(seed: int, round: int, client: int) -> int:
    """Seed of one client's shuffling in one round (see :func:`client_seeds`)."""
    return int(client_seeds(seed, round, np.array([client]))[0])


def batch_schedules(
    sizes: np.ndarray,
    training: LocalTraining,
    seeds: np.ndarray,
    max_steps: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Which local records form each step, for many clients at once.

    Each epoch is a fresh shuffle of the client's records: the records sorted by a hash of
    (client seed, epoch, record), which is a uniformly random permutation computed for every
    client in one vectorised sort. Epoch ``e`` occupies steps ``e * ceil(n / B)`` onwards; the
    last batch of an epoch is padded.

    Parameters
    ----------
    sizes
        ``(K,)`` records each client holds.
    training
        Local training settings.
    seeds
        ``(K,)`` client seeds (:func:`client_seeds`).
    max_steps
        Optional ``(K,)`` cut of each client's schedule (a straggler's partial work).

    Returns
    -------
    index, weight
        ``(K, steps, batch_size)`` int64 local record indices and float32 weights (1 for a real
        record, 0 for padding); ``steps`` is the longest schedule. A client's real steps come
        first.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    k, b, epochs = len(sizes), training.batch_size, training.local_epochs
    per_epoch = -(-sizes // b)  # ceil
    width = int(per_epoch.max(initial=0)) * b
    lengths = epochs * per_epoch
    if max_steps is not None:
        lengths = np.minimum(lengths, np.asarray(max_steps, dtype=np.int64))
    steps = int(lengths.max(initial=0))
    if k == 0 or steps == 0:
        return np.zeros((k, 0, b), dtype=np.int64), np.zeros((k, 0, b), dtype=np.float32)
    record = np.arange(width, dtype=np.uint64)
    epoch_keys = _mix(
        np.asarray(seeds, dtype=np.uint64)[:, None] + np.arange(epochs, dtype=np.uint64)[None, :]
    )  # (K, E)
    with np.errstate(over="ignore"):
        keys = _mix(epoch_keys[:, :, None] ^ (record * _GOLDEN))  # (K, E, width)
    padding = record[None, None, :] >= sizes[:, None, None].astype(np.uint64)
    keys = np.where(padding, _PADDING_KEY, keys)
    perm = np.argsort(keys, axis=2, kind="stable")  # real records first, in random order
    t = np.arange(steps)
    spe = np.maximum(per_epoch, 1)[:, None]
    epoch = np.minimum(t[None, :] // spe, epochs - 1)  # (K, steps)
    slot = (t[None, :] % spe)[:, :, None] * b + np.arange(b)  # (K, steps, B)
    real = (slot < sizes[:, None, None]) & (t[None, :] < lengths[:, None])[:, :, None]
    rows = np.arange(k)[:, None, None]
    index = np.where(real, perm[rows, epoch[:, :, None], np.minimum(slot, width - 1)], 0)
    return index, real.astype(np.float32)


def batch_schedule(n: int, training: LocalTraining, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One client's schedule (:func:`batch_schedules` for a single client).

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
    index, weight = batch_schedules(np.array([n]), training, np.array([seed], dtype=np.uint64))
    return torch.from_numpy(index[0]), torch.from_numpy(weight[0])


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
    private: PrivateGradient | None = None,
    lengths: torch.Tensor | None = None,
    expected_batch: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Train a cohort of clients at once, vectorised over clients with ``torch.func.vmap``.

    Parameters
    ----------
    model
        The architecture (its own parameters are not used; buffers are shared).
    params
        ``name -> (K, *shape)`` stacked starting parameters, one slice per client (not modified;
        may be a broadcast view).
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
    private
        Sample-level DP (e.g. :class:`mmshield.privacy.dpsgd.DPSGD`): each step's gradient is
        the sum of per-record clipped gradients plus noise, over the expected batch size
        ``training.batch_size`` (fewer for a client holding fewer records).
    lengths
        ``(K,)`` steps per client, when a step may have an empty batch (Poisson sampling);
        default: the steps holding at least one real record.
    expected_batch
        ``(K,)`` DP-SGD's divisor per client (``min(batch_size, records)``); default
        ``training.batch_size``.

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
    private_fn = vmap(private.clipped_sum_fn(model)) if private is not None else None
    k_clients = index.shape[0]
    # A client's schedule is a prefix of the steps (its real steps come first). Sorting clients
    # by schedule length, longest first, makes the clients still training at any step a prefix of
    # the cohort, so each step computes on a view of that prefix and skips finished clients.
    if lengths is None:
        lengths = (weight.sum(2) > 0).sum(1)  # (K,)
    lengths = lengths.to(weight.device)
    presorted = bool((lengths[:-1] >= lengths[1:]).all())
    order = None if presorted else torch.argsort(lengths, descending=True, stable=True)

    def ordered(v: torch.Tensor) -> torch.Tensor:
        # Always a fresh dense copy: ``params`` may be a broadcast view of one global model.
        if order is None:
            return torch.empty(v.shape, dtype=v.dtype, device=v.device).copy_(v)
        return v[order]

    if order is not None:
        index, weight, lengths = index[order], weight[order], lengths[order]
    current = {k: ordered(v) for k, v in params.items()}
    # The anchor of FedProx's proximal term.
    start = {k: ordered(v) for k, v in params.items()} if training.proximal_mu else {}
    corr = {k: ordered(v) for k, v in correction.items()} if correction is not None else None
    momentum = {k: torch.zeros_like(v) for k, v in current.items()} if training.momentum else {}
    loss_sum = torch.zeros(k_clients, device=weight.device)
    # DP-SGD divides by the expected batch size, never by the sampled one (which would leak).
    if expected_batch is None:
        batch_div = torch.full((k_clients,), float(training.batch_size), device=weight.device)
    else:
        batch_div = ordered(expected_batch.to(weight.device, torch.float32))
    modalities = data.modalities
    steps = int(lengths[0]) if k_clients else 0
    for s in range(steps):
        n = int((lengths > s).sum())
        rows = index[:n, s]
        w = weight[:n, s]
        inputs = {m: data.inputs[m][rows] for m in modalities}
        present = {m: data.present[m][rows] for m in modalities}
        active = {k: v[:n] for k, v in current.items()}
        if private_fn is not None and private is not None:
            sums, loss_total, _ = private_fn(active, inputs, present, data.labels[rows], w)
            noise = private.noise(sums)
            grads = {
                k: (v + noise[k]) / batch_div[:n].view(-1, *[1] * (v.dim() - 1))
                for k, v in sums.items()
            }
            loss = loss_total / w.sum(1).clamp_min(1.0)
        else:
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
                p.add_(g, alpha=-training.lr)
            loss_sum[:n] += loss.detach()
    mean_loss = loss_sum / lengths.clamp_min(1).to(loss_sum.dtype)
    if order is None:
        return current, mean_loss
    inverse = torch.argsort(order)
    return {k: v[inverse] for k, v in current.items()}, mean_loss[inverse]
