"""Sample-level DP-SGD pieces: per-sample gradients, per-sample clipping, the clipped sum.

Two ways to the clipped sum, both ``torch.func`` functions that the simulator nests inside its
``vmap`` over clients, so that it clips every record of every client of a cohort in one pass
(Opacus instead hooks every layer of one model):

- book-keeping with ghost norms (:class:`mmshield.privacy.bookkeeping.BookKeeping`, the default
  of :class:`DPSGD`): per-record norms and the clipped sum from one forward and one backward
  pass, about the cost of a non-private step;
- per-sample gradients (:func:`clipped_grad_sum`, the reference and the fallback): ``vmap`` over
  the records of a batch of ``grad`` of one record's loss, which materialises every record's
  whole gradient.

Clipping follows Abadi et al. (2016) and Opacus: each record's whole gradient (all parameters
together) is scaled to norm at most ``max_grad_norm``; padded slots (weight 0) contribute nothing.

Losses that couple records in a batch (contrastive losses) have no per-sample gradient and are not
supported here; they need batch-level clipping (DP-CLIP), which is refused until built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from mmshield.errors import PrivacyError
from mmshield.models.model import MultimodalModel
from mmshield.privacy.accountant import (
    Method,
    SampledGaussian,
    calibrate_noise_multiplier,
    epsilon,
)
from mmshield.privacy.bookkeeping import BookKeeping
from mmshield.privacy.noise import NoiseSource


def per_sample_loss_fn(
    model: MultimodalModel,
) -> Callable[..., torch.Tensor]:
    """Cross-entropy of a single record, as a function of the parameters (for ``torch.func``)."""
    buffers = dict(model.named_buffers())

    def loss(
        params: dict[str, torch.Tensor],
        inputs: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
        label: torch.Tensor,
    ) -> torch.Tensor:
        batch_inputs = {m: x.unsqueeze(0) for m, x in inputs.items()}
        batch_present = {m: p.unsqueeze(0) for m, p in present.items()}
        logits = functional_call(model, (params, buffers), (batch_inputs, batch_present))
        return F.cross_entropy(logits, label.unsqueeze(0))

    return loss


def clipped_grad_sum(
    model: MultimodalModel,
    max_grad_norm: float,
) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """A function returning the sum over a batch of per-sample clipped gradients.

    The returned function takes ``(params, inputs, present, labels, weight)`` for one batch
    (``weight``: 1 for a real record, 0 for padding) and returns ``(clipped_sum, loss_sum,
    norms)``: ``name -> tensor`` sums of the clipped gradients, the summed loss of the real
    records and each record's unclipped gradient norm. It can be wrapped in ``vmap`` over
    clients.
    """
    per_sample = vmap(
        grad_and_value(per_sample_loss_fn(model)), in_dims=(None, 0, 0, 0), randomness="different"
    )

    def fn(
        params: dict[str, torch.Tensor],
        inputs: Mapping[str, torch.Tensor],
        present: Mapping[str, torch.Tensor],
        labels: torch.Tensor,
        weight: torch.Tensor,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        grads, losses = per_sample(params, dict(inputs), dict(present), labels)
        squared = sum(g.flatten(1).pow(2).sum(1) for g in grads.values())
        norms = torch.as_tensor(squared).sqrt()
        scale = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * weight
        clipped = {k: torch.tensordot(scale, g, dims=1) for k, g in grads.items()}
        return clipped, (losses * weight).sum(), norms

    return fn


Clipping = Literal["bookkeeping", "per_sample"]


def poisson_schedules(
    sizes: np.ndarray,
    batch_size: int,
    local_epochs: int,
    source: NoiseSource,
    max_steps: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Poisson-sampled minibatches for many clients at once.

    Client ``c`` with ``n`` records takes ``local_epochs * ceil(n / batch_size)`` steps; at each
    step every record joins independently with probability ``q = min(1, batch_size / n)`` (the
    sampling the accountant assumes). Batches vary in size, so they are padded to the largest.

    Returns
    -------
    index, weight, lengths
        ``(K, steps, max_batch)`` local record indices, ``(K, steps, max_batch)`` float32 weights
        (1 real, 0 padding) and ``(K,)`` each client's number of steps (a step whose batch came
        out empty still counts: it releases noise).
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    k = len(sizes)
    lengths = local_epochs * -(-sizes // batch_size)
    if max_steps is not None:
        lengths = np.minimum(lengths, np.asarray(max_steps, dtype=np.int64))
    steps, n_max = int(lengths.max(initial=0)), int(sizes.max(initial=0))
    if k == 0 or steps == 0 or n_max == 0:
        empty = np.zeros((k, steps, 1))
        return empty.astype(np.int64), empty.astype(np.float32), lengths
    rate = np.minimum(1.0, batch_size / np.maximum(sizes, 1))
    u = source.uniform(k * steps * n_max).reshape(k, steps, n_max)
    valid = (np.arange(n_max)[None, None, :] < sizes[:, None, None]) & (
        np.arange(steps)[None, :, None] < lengths[:, None, None]
    )
    chosen = (u < rate[:, None, None]) & valid
    order = np.argsort(~chosen, axis=2, kind="stable")  # chosen records first, in index order
    counts = chosen.sum(2)
    width = max(int(counts.max()), 1)
    index = order[:, :, :width]
    weight = (np.arange(width)[None, None, :] < counts[:, :, None]).astype(np.float32)
    return np.where(weight > 0, index, 0), weight, lengths


class DPSGD:
    """Sample-level DP-SGD for the vectorised trainer: clip per record, sum, add noise.

    Each step of each client releases ``sum_i clip(g_i) + N(0, (noise_multiplier *
    max_grad_norm)^2)`` divided by the expected batch size, as Opacus does. Pass it to
    :func:`mmshield.fl.client.train_stacked` as ``private``.

    Parameters
    ----------
    max_grad_norm
        Per-record clipping norm ``C``.
    noise_multiplier
        ``σ``; the noise standard deviation is ``σ C``.
    source
        Where the noise comes from (:class:`NoiseSource`).
    clipping
        How the clipped sum is computed: ``"bookkeeping"`` (ghost norms and book-keeping, about
        the cost of a non-private step; falls back to the per-sample path for models it cannot
        handle) or ``"per_sample"`` (``vmap(grad)``, :func:`clipped_grad_sum`). Both give the
        same sums up to floating-point summation order.
    """

    def __init__(
        self,
        max_grad_norm: float,
        noise_multiplier: float,
        source: NoiseSource,
        clipping: Clipping = "bookkeeping",
    ):
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if clipping not in get_args(Clipping):
            raise ValueError(f"clipping must be one of {get_args(Clipping)}, got {clipping!r}")
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.source = source
        self.clipping = clipping
        # Reused while the model and norm stay the same: it learns each input shape once.
        self._clipper: BookKeeping | None = None

    def clipped_sum_fn(
        self, model: MultimodalModel
    ) -> Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
        """Per-batch clipped gradient sum (see :func:`clipped_grad_sum`), vmappable."""
        per_sample = clipped_grad_sum(model, self.max_grad_norm)
        if self.clipping == "per_sample":
            return per_sample
        c = self._clipper
        if c is None or c.model is not model or c.max_grad_norm != self.max_grad_norm:
            c = self._clipper = BookKeeping(model, self.max_grad_norm, fallback=per_sample)
        return c

    def noise(self, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fresh Gaussian noise shaped like each of ``like``'s tensors (one draw for all)."""
        std = self.noise_multiplier * self.max_grad_norm
        if std == 0:
            return {k: torch.zeros_like(v) for k, v in like.items()}
        return self.source.normal_like(like, std)


def record_releases(
    sizes: np.ndarray,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    noise_multiplier: float = 1.0,
) -> list[SampledGaussian | None]:
    """What DP-SGD releases about one record of each client over ``rounds`` rounds.

    Client ``c`` with ``n`` records takes ``local_epochs * ceil(n / batch_size)`` steps per round
    at Poisson rate ``min(1, batch_size / n)`` (:func:`poisson_schedules`); ``None`` for a client
    with no record (it trains nothing).
    """
    out: list[SampledGaussian | None] = []
    for size in np.asarray(sizes, dtype=np.int64):
        n = int(size)
        if n <= 0:
            out.append(None)
            continue
        steps = rounds * local_epochs * -(-n // batch_size)
        out.append(SampledGaussian(noise_multiplier, steps, "poisson", min(1.0, batch_size / n)))
    return out


def record_mechanisms(
    sizes: np.ndarray, batch_size: int, local_epochs: int, rounds: int, noise_multiplier: float
) -> dict[tuple[float, int], SampledGaussian]:
    """What DP-SGD releases about one record of each client, by (sampling rate, steps).

    No credit is taken for client sampling: a record is accounted as if its client trained in
    every round (sound for any client sampler; uniform fixed-size client sampling has no
    record-level amplification result to lean on here).
    """
    unique = np.unique(np.asarray(sizes, dtype=np.int64))
    mechs = record_releases(unique, batch_size, local_epochs, rounds, noise_multiplier)
    return {(m.sampling_rate, m.steps): m for m in mechs if m is not None}


def sample_level_epsilon(
    sizes: np.ndarray,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    noise_multiplier: float,
    delta: float,
    method: Method = "pld",
    candidates: int = 3,
) -> float:
    """Record-level ε of a run: the worst over clients (their sampling rates and steps differ).

    RDP ranks the clients (fast); the ``candidates`` worst are then accounted with ``method``.
    """
    mechs = record_mechanisms(sizes, batch_size, local_epochs, rounds, noise_multiplier)
    if not mechs:
        return 0.0
    ranked = sorted(
        mechs.values(), key=lambda m: epsilon([m], delta, "rdp", coarse=True), reverse=True
    )
    return max(epsilon([m], delta, method) for m in ranked[:candidates])


def calibrate_sample_level(
    sizes: np.ndarray,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    method: Method = "pld",
) -> tuple[float, float]:
    """Noise multiplier giving every client's records at most ``target_epsilon``, and the ε
    it gives (the worst client's, under ``method``).

    Raises
    ------
    PrivacyError
        When ``target_epsilon`` is unreachable (the message names the smallest reachable ε).
    """
    mechs = record_mechanisms(sizes, batch_size, local_epochs, rounds, 1.0)
    if not mechs:
        raise PrivacyError("no client holds any record: nothing to train with DP-SGD")
    # The client whose records are least protected at σ = 1 (RDP: fast) sets the noise; the
    # check below catches the rare case where another client overtakes it at the final σ.
    worst = max(mechs.values(), key=lambda m: epsilon([m], delta, "rdp", coarse=True))
    sigma = calibrate_noise_multiplier(target_epsilon, delta, worst, method)
    # Other clients need at most what the worst needs under RDP; check the final figure.
    eps = sample_level_epsilon(sizes, batch_size, local_epochs, rounds, sigma, delta, method)
    while eps > target_epsilon * (1 + 1e-6):
        sigma *= 1.01
        eps = sample_level_epsilon(sizes, batch_size, local_epochs, rounds, sigma, delta, method)
    return sigma, eps
