"""Byzantine-robust aggregation of client updates.

Coordinate-wise median, trimmed mean, Krum, Multi-Krum, Bulyan (El Mhamdi et al. 2018), FLTrust
(Cao et al. 2021) and norm bounding (Sun et al. 2019), behind one interface that a runtime
calls in place of :class:`mmshield.fl.aggregate.ModalityAwareMean`.

Why hand-written rather than Flower's ``aggregate_median``/``aggregate_krum``/
``aggregate_bulyan``/``aggregate_trimmed_avg``: those take one list of NumPy arrays per client and
return only the new parameters. Here the updates are the simulator's stacked tensors
``name -> (K, *shape)`` (on CPU or GPU, never copied client by client into NumPy), a client whose
modality is absent must not vote on that encoder (Flower would count its untouched zeros as a vote
for "no change"), and the audit and the report need each client's anomaly score and whether it was
selected. FLTrust and norm bounding have no Flower counterpart in this form. Flower's functions
are the oracles of the tests: on the same inputs, with every client holding every parameter, the
results agree.

Missing modalities
------------------
``weights[name][k] == 0`` means client ``k`` does not hold parameter ``name`` (it lacks that
encoder's modality); its values there are ignored, whatever they are (even NaN).

* Coordinate-wise methods (median, trimmed mean, Bulyan's second stage) aggregate each parameter
  over the clients that hold it.
* Distance-based selection (Krum, Multi-Krum, Bulyan's first stage) compares two clients over the
  parameters both hold, and rescales the squared distance to the full dimension:
  ``d2(i, j) = sum_{p held by i and j} ||x_i[p] - x_j[p]||^2 * N / n_ij`` with ``n_ij`` the
  coordinates compared and ``N`` the coordinates of all held parameters. A client thus cannot
  escape scrutiny on an encoder by lacking another modality, and a client holding fewer modalities
  is not made to look closer than one holding more. Two clients sharing no parameter are at
  infinite distance (neither vouches for the other). When every client holds everything,
  ``n_ij = N`` and this is the textbook distance.
* Selection is of whole clients; each parameter is then aggregated over the selected clients
  that hold it. A parameter held by some client but by no selected one is left out of the result
  (not moved this round) and named in :attr:`RobustResult.skipped`, never filled from an
  unselected client.
* FLTrust compares each client with the server's root update over the parameters the client
  holds (cosine and norm rescaling both restricted to them), then averages each parameter over
  its holders weighted by trust.
* Norm bounding clips the norm of what a client holds, then takes the per-parameter weighted mean
  over holders (exactly :class:`~mmshield.fl.aggregate.ModalityAwareMean` when nothing is
  clipped).

A client holding no parameter at all is absent: it is not counted against the aggregator's
requirements, is never selected and scores NaN.

Weights
-------
Median, trimmed mean, Krum, Bulyan and FLTrust are unweighted, as in their papers (an attacker
claiming many records gains nothing): the weights only say who holds what. Multi-Krum (like
Flower's) and norm bounding take the weighted mean of what they keep.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from mmshield.errors import ConfigError

# The same per-parameter weight rule as the plain modality-aware mean, so the two cannot drift.
from mmshield.fl.aggregate import weight_of

Tensor = torch.Tensor


def parameter_weights(
    names: Sequence[str], examples: Tensor, modality_examples: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Per-parameter aggregation weights from the simulator's per-client weights.

    Parameters
    ----------
    names
        Parameter names (``encoders.<modality>.*`` take that modality's weight).
    examples
        ``(K,)`` weight of shared parameters (fusion, head): records each client holds.
    modality_examples
        ``modality -> (K,)`` records holding that modality; 0 means the client lacks it.

    Returns
    -------
    dict
        ``name -> (K,)``, as :meth:`ModalityAwareMean.contributions` computes them.
    """
    return {name: weight_of(name, examples, modality_examples) for name in names}


@dataclass
class RobustResult:
    """What a robust aggregator made of one round's updates.

    Attributes
    ----------
    mean
        ``name -> delta`` to hand to the server optimiser; parameters that nobody (or nobody
        selected) holds are absent, so no optimiser moves them.
    scores
        ``(K,)`` anomaly score per client, higher is more suspicious (the aggregator's
        :attr:`RobustAggregator.score_meaning` says what it is); NaN for a client holding nothing.
    selected
        ``(K,)`` whether the client's update entered the result. Median, trimmed mean and norm
        bounding select no clients as a whole: every client holding something is marked.
    skipped
        Parameters some client holds but that were left out of :attr:`mean` because no selected
        (or trusted) client holds them.
    details
        Aggregator-specific per-client arrays (``"trust"``, ``"norm"``, ``"clipped"``).
    """

    mean: dict[str, Tensor]
    scores: np.ndarray
    selected: np.ndarray
    skipped: tuple[str, ...] = ()
    details: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class _Round:
    """Validated inputs of one aggregation."""

    names: list[str]
    deltas: dict[str, Tensor]
    weights: dict[str, Tensor]
    holds: dict[str, np.ndarray]
    k: int
    present: np.ndarray
    where: str

    def mask(self, name: str, rows: np.ndarray | None = None) -> Tensor:
        """Boolean row mask (on the parameter's device): holders of ``name``, within ``rows``."""
        m = self.holds[name] if rows is None else self.holds[name] & rows
        return torch.as_tensor(m, device=self.deltas[name].device)

    @property
    def dimension(self) -> int:
        """Coordinates of all parameters held by at least one client."""
        return sum(self.deltas[n][0].numel() for n in self.names if self.holds[n].any())


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _who(i: int, clients: Sequence[int] | np.ndarray | None) -> str:
    return f"client {int(clients[i])}" if clients is not None else f"the client at row {i}"


def _prepare(
    deltas: Mapping[str, Tensor],
    weights: Mapping[str, Tensor],
    clients: Sequence[int] | np.ndarray | None,
    where: str,
) -> _Round:
    """Check shapes, weights and finiteness; work out who holds what."""
    pre = _prefix(where)
    if not deltas:
        raise ValueError(f"{pre}no parameters to aggregate (deltas is empty)")
    k: int | None = None
    holds: dict[str, np.ndarray] = {}
    cast: dict[str, Tensor] = {}
    for name, d in deltas.items():
        if d.dim() < 1:
            raise ValueError(
                f"{pre}parameter {name!r} has shape {tuple(d.shape)}; deltas must be stacked "
                "as (K, *shape), one row per client"
            )
        if k is None:
            k = int(d.shape[0])
        elif int(d.shape[0]) != k:
            raise ValueError(
                f"{pre}parameter {name!r} stacks {d.shape[0]} clients, the others {k}; every "
                "parameter must have one row per client, in the same order"
            )
        if name not in weights:
            raise ValueError(
                f"{pre}no weights for parameter {name!r}; pass one (K,) weight per parameter "
                "(see mmshield.fl.robust.parameter_weights)"
            )
        w = weights[name]
        if tuple(w.shape) != (k,):
            raise ValueError(
                f"{pre}weights of {name!r} have shape {tuple(w.shape)}, expected ({k},)"
            )
        wn = w.detach().to("cpu", torch.float64).numpy()
        bad = np.flatnonzero(~(np.isfinite(wn) & (wn >= 0)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{pre}{_who(i, clients)}: weight {wn[i]} of {name!r} is not a finite number "
                ">= 0; reject such clients before aggregating (mmshield.fl.validation)"
            )
        h = wn > 0
        if h.any():
            finite = torch.isfinite(d.detach().reshape(k, -1)).all(dim=1).cpu().numpy()
            bad = np.flatnonzero(h & ~finite)
            if bad.size:
                raise ValueError(
                    f"{pre}{_who(int(bad[0]), clients)} has non-finite values in {name!r}; "
                    "reject non-finite updates with mmshield.fl.validation.UpdateValidator "
                    "before robust aggregation"
                )
        holds[name] = h
        cast[name] = w.detach().to(device=d.device, dtype=d.dtype)
    assert k is not None
    if clients is not None and len(clients) != k:
        raise ValueError(f"{pre}{len(clients)} client ids for {k} stacked updates")
    present = np.zeros(k, dtype=bool)
    for h in holds.values():
        present |= h
    detached = {n: d.detach() for n, d in deltas.items()}
    return _Round(list(deltas), detached, cast, holds, k, present, where)


def _weighted_mean(delta: Tensor, w: Tensor, rows: Tensor) -> Tensor:
    """Weighted mean of ``delta[rows]`` (a single row comes back unchanged)."""
    ww = w[rows]
    return torch.tensordot(ww / ww.sum(), delta[rows], dims=1)


def _median(x: Tensor) -> Tensor:
    """Median along dim 0, averaging the two middle values when the count is even (NumPy's)."""
    n = x.shape[0]
    s = x.sort(dim=0).values
    return (s[(n - 1) // 2] + s[n // 2]) / 2


def _pairwise(r: _Round) -> np.ndarray:
    """``(K, K)`` squared distances over commonly held coordinates, rescaled to full dimension.

    ``inf`` between clients sharing no parameter; the diagonal is 0.
    """
    d2 = np.zeros((r.k, r.k))
    n = np.zeros((r.k, r.k))
    for name in r.names:
        h = r.holds[name]
        if not h.any():
            continue
        x = r.deltas[name].reshape(r.k, -1).to(torch.float64)
        idx = torch.as_tensor(np.flatnonzero(h), device=x.device)
        x = x[idx]
        sq = (x * x).sum(dim=1)
        g = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_min(0).cpu().numpy()
        sel = np.ix_(np.flatnonzero(h), np.flatnonzero(h))
        d2[sel] += g
        n[sel] += x.shape[1]
    total = r.dimension
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(n == total, d2, d2 * total / n)
    out[n == 0] = np.inf
    np.fill_diagonal(out, 0.0)
    return out


def _krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each row of ``dist``: the sum of its ``n - f - 2`` smallest distances to
    the others (at least 1, as Flower), the client itself excluded."""
    n = dist.shape[0]
    if n == 1:
        return np.zeros(1)
    closest = min(max(1, n - f - 2), n - 1)
    off = dist + np.diag(np.full(n, np.inf))
    return np.sort(off, axis=1)[:, :closest].sum(axis=1)


def _distance_to(r: _Round, mean: Mapping[str, Tensor]) -> np.ndarray:
    """Each client's L2 distance to ``mean`` over the parameters it holds, rescaled to the full
    dimension (as :func:`_pairwise`); NaN for a client holding none of ``mean``'s parameters."""
    sq = np.zeros(r.k)
    n = np.zeros(r.k)
    for name, m in mean.items():
        h = r.holds[name]
        diff = (r.deltas[name] - m.unsqueeze(0)).reshape(r.k, -1).to(torch.float64)
        sq += np.where(h, (diff * diff).sum(dim=1).cpu().numpy(), 0.0)
        n += np.where(h, m.numel(), 0)
    total = sum(m.numel() for m in mean.values())
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sqrt(sq * total / n)
    out[n == 0] = np.nan
    return np.asarray(out)


def _int_param(value: object, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"server.robust.{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class RobustAggregator(ABC):
    """Interface of the robust aggregators.

    Parameters
    ----------
    f
        Assumed number of Byzantine clients per round (``server.robust.f``).
    """

    name: ClassVar[str]
    """The method's name in :data:`ROBUST_AGGREGATORS`."""
    score_meaning: ClassVar[str]
    """What :attr:`RobustResult.scores` holds for this method."""

    def __init__(self, f: int = 0) -> None:
        self.f = _int_param(f, "f", 0)

    def min_clients(self) -> int:
        """Fewest client updates (holding at least one parameter) a round needs."""
        return 1

    def _requirement(self) -> str:
        return "at least one update"

    def check(self, num_clients: int, where: str = "") -> None:
        """Raise :class:`ConfigError` if ``num_clients`` updates are too few for the settings.

        A runtime can call this before aggregating to skip a round instead of failing it.
        """
        if num_clients < self.min_clients():
            raise ConfigError(
                f"{_prefix(where)}server.robust.method {self.name!r} with f={self.f} needs "
                f"{self._requirement()} (at least {self.min_clients()} client updates), but "
                f"{num_clients} arrived; lower server.robust.f or sample more clients per round "
                "(training.clients_per_round)"
            )

    def aggregate(
        self,
        deltas: Mapping[str, Tensor],
        weights: Mapping[str, Tensor],
        root: Mapping[str, Tensor] | None = None,
        *,
        clients: Sequence[int] | np.ndarray | None = None,
        where: str = "",
    ) -> RobustResult:
        """Aggregate one round's updates.

        Parameters
        ----------
        deltas
            ``name -> (K, *shape)`` client updates (local minus global), one row per client.
        weights
            ``name -> (K,)`` non-negative weights; 0 means the client does not hold the
            parameter (see :func:`parameter_weights`).
        root
            ``name -> shape`` the server's own update on its root data set (FLTrust only).
        clients
            Client ids of the rows, for error messages.
        where
            Context for error messages, e.g. ``"round 3"``.

        Raises
        ------
        ValueError
            Mismatched shapes, negative or non-finite weights, non-finite values in a held
            parameter (validate updates first: :mod:`mmshield.fl.validation`).
        ConfigError
            Too few clients hold anything for the aggregator's settings.
        """
        r = _prepare(deltas, weights, clients, where)
        self.check(int(r.present.sum()), where)
        return self._aggregate(r, root)

    @abstractmethod
    def _aggregate(self, r: _Round, root: Mapping[str, Tensor] | None) -> RobustResult: ...


class _CoordinateWise(RobustAggregator):
    """Shared part of the coordinate-wise methods: per parameter, over its holders."""

    score_meaning = (
        "L2 distance of the client's update to the aggregate, over the parameters it holds, "
        "rescaled to the full dimension"
    )

    @abstractmethod
    def _reduce(self, x: Tensor) -> Tensor: ...

    def _aggregate(self, r: _Round, root: Mapping[str, Tensor] | None) -> RobustResult:
        mean = {}
        for name in r.names:
            rows = r.mask(name)
            if bool(rows.any()):
                mean[name] = self._reduce(r.deltas[name][rows])
        return RobustResult(mean, _distance_to(r, mean), r.present.copy())


class CoordinateMedian(_CoordinateWise):
    """Coordinate-wise median (Yin et al. 2018); NumPy's median for an even count.

    Parameters
    ----------
    f
        Assumed Byzantine clients: the median needs an honest majority, ``K > 2f``.
    """

    name = "median"

    def min_clients(self) -> int:
        return 2 * self.f + 1

    def _requirement(self) -> str:
        return "an honest majority, K > 2f"

    def _reduce(self, x: Tensor) -> Tensor:
        return _median(x)


class TrimmedMean(_CoordinateWise):
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Per coordinate, ``floor(beta * n)`` of the ``n`` holders' values are dropped at each end and
    the rest averaged (Flower's and SciPy's ``trim_mean`` convention).

    Parameters
    ----------
    beta
        Fraction trimmed at each end, ``0 <= beta < 0.5`` (``server.robust.beta``).
    f
        Assumed Byzantine clients: with ``K`` clients, ``floor(beta * K) >= f`` is required so
        that every attacker can be trimmed.
    """

    name = "trimmed_mean"

    def __init__(self, beta: float, f: int = 0) -> None:
        super().__init__(f)
        if not (isinstance(beta, int | float) and 0 <= beta < 0.5):
            raise ConfigError(
                f"server.robust.beta must be a fraction in [0, 0.5) trimmed at each end, "
                f"got {beta!r}"
            )
        self.beta = float(beta)
        if self.f > 0 and self.beta == 0:
            raise ConfigError(
                f"server.robust.beta = 0 trims nothing, but server.robust.f = {self.f} attackers "
                "are assumed; set server.robust.beta >= f / clients per round"
            )

    def min_clients(self) -> int:
        k = max(1, math.floor(self.f / self.beta)) if self.beta > 0 else 1
        while math.floor(self.beta * k) < self.f:
            k += 1
        return k

    def check(self, num_clients: int, where: str = "") -> None:
        if num_clients >= 1 and math.floor(self.beta * num_clients) < self.f:
            cut = math.floor(self.beta * num_clients)
            raise ConfigError(
                f"{_prefix(where)}server.robust.method 'trimmed_mean' trims "
                f"floor({self.beta} * {num_clients}) = {cut} value(s) at each end of "
                f"{num_clients}, fewer than the f={self.f} assumed attackers; raise "
                f"server.robust.beta to at least {self.f / num_clients:.3g} or lower "
                "server.robust.f"
            )
        super().check(num_clients, where)

    def _reduce(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        cut = int(self.beta * n)
        return x.sort(dim=0).values[cut : n - cut].mean(dim=0)


class Krum(RobustAggregator):
    """Krum (Blanchard et al. 2017): keep the one client closest to its neighbours.

    A client's score is the sum of squared distances to its ``K - f - 2`` nearest other clients;
    the client with the lowest score is selected and its update is the result.

    Parameters
    ----------
    f
        Assumed Byzantine clients; ``K > 2f + 2`` is required.
    """

    name = "krum"
    score_meaning = (
        "Krum score: sum of squared distances to the K - f - 2 nearest other clients (over "
        "commonly held parameters, rescaled to the full dimension)"
    )

    def min_clients(self) -> int:
        return 2 * self.f + 3

    def _requirement(self) -> str:
        return "K > 2f + 2"

    def keep(self, num_clients: int) -> int:
        """Number of clients kept out of ``num_clients``."""
        return 1

    def _aggregate(self, r: _Round, root: Mapping[str, Tensor] | None) -> RobustResult:
        idx = np.flatnonzero(r.present)
        scores = np.full(r.k, np.nan)
        scores[idx] = _krum_scores(_pairwise(r)[np.ix_(idx, idx)], self.f)
        order = idx[np.argsort(scores[idx], kind="stable")]
        selected = np.zeros(r.k, dtype=bool)
        selected[order[: self.keep(len(idx))]] = True
        mean, skipped = _mean_over(r, selected)
        return RobustResult(mean, scores, selected, skipped)


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017): the weighted mean of the ``m`` best Krum scores.

    The mean uses the weights as given, as Flower's ``aggregate_krum`` weights by
    ``num_examples``; pass equal weights for the paper's unweighted mean.

    Parameters
    ----------
    f
        Assumed Byzantine clients; ``K > 2f + 2`` is required.
    m
        Clients kept, ``1 <= m <= K - f`` (``server.robust.m``); ``None`` keeps ``K - f``.
    """

    name = "multi_krum"

    def __init__(self, f: int = 0, m: int | None = None) -> None:
        super().__init__(f)
        self.m = None if m is None else _int_param(m, "m", 1)

    def min_clients(self) -> int:
        return max(2 * self.f + 3, (self.m or 0) + self.f)

    def _requirement(self) -> str:
        if self.m is None:
            return "K > 2f + 2"
        return f"K > 2f + 2 and K >= m + f with m={self.m} (or lower server.robust.m)"

    def keep(self, num_clients: int) -> int:
        return num_clients - self.f if self.m is None else self.m


def _mean_over(r: _Round, selected: np.ndarray) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Weighted mean of each parameter over its selected holders; names nobody selected holds."""
    mean, skipped = {}, []
    for name in r.names:
        if not r.holds[name].any():
            continue
        rows = r.mask(name, selected)
        if bool(rows.any()):
            mean[name] = _weighted_mean(r.deltas[name], r.weights[name], rows)
        else:
            skipped.append(name)
    return mean, tuple(skipped)


class Bulyan(RobustAggregator):
    """Bulyan (El Mhamdi et al. 2018) over Krum.

    Krum is applied repeatedly, each time to the clients not yet picked, until
    ``theta = K - 2f`` are picked; then, per coordinate, the ``beta = theta - 2f`` picked values
    closest to the picked values' median are averaged. Needs ``K >= 4f + 3``.

    With missing modalities, a parameter held by ``n_p`` picked clients averages the
    ``max(1, n_p - 2f)`` values closest to their median (just the nearest to the median when
    ``n_p <= 2f``, where no trimming can be trusted more).
    """

    name = "bulyan"
    score_meaning = (
        "Krum score among all clients (sum of squared distances to the K - f - 2 nearest), "
        "before Bulyan's first pick"
    )

    def min_clients(self) -> int:
        return 4 * self.f + 3

    def _requirement(self) -> str:
        return "K >= 4f + 3"

    def _aggregate(self, r: _Round, root: Mapping[str, Tensor] | None) -> RobustResult:
        idx = np.flatnonzero(r.present)
        dist = _pairwise(r)[np.ix_(idx, idx)]
        scores = np.full(r.k, np.nan)
        scores[idx] = _krum_scores(dist, self.f)
        remaining = list(range(len(idx)))
        picked: list[int] = []
        for _ in range(len(idx) - 2 * self.f):
            s = _krum_scores(dist[np.ix_(remaining, remaining)], self.f)
            picked.append(remaining.pop(int(np.argmin(s))))
        selected = np.zeros(r.k, dtype=bool)
        selected[idx[picked]] = True
        mean, skipped = {}, []
        for name in r.names:
            if not r.holds[name].any():
                continue
            rows = r.mask(name, selected)
            if not bool(rows.any()):
                skipped.append(name)
                continue
            x = r.deltas[name][rows]
            med = _median(x)
            keep = max(1, x.shape[0] - 2 * self.f)
            near = (x - med).abs().topk(keep, dim=0, largest=False).indices
            mean[name] = x.gather(0, near).mean(dim=0)
        return RobustResult(mean, scores, selected, tuple(skipped))


class FLTrust(RobustAggregator):
    """FLTrust (Cao et al. 2021): trust clients by their agreement with the server's root update.

    ``trust_i = ReLU(cos(g_i, g_0))`` with ``g_0`` the server's update on its clean root data
    set; each ``g_i`` is rescaled to ``||g_0||`` and the result is
    ``sum_i trust_i * g_i * ||g_0|| / ||g_i|| / sum_i trust_i``. Both the cosine and the norms are
    taken over the parameters client ``i`` holds; each parameter is averaged over its holders.
    A client with a zero update gets no trust. A parameter whose holders all have zero trust is
    left out (the paper's update is then zero). Record counts play no part, as in the paper.
    """

    name = "fltrust"
    score_meaning = "cosine distance 1 - cos(client update, root update), in [0, 2]; >= 1: no trust"

    def _aggregate(self, r: _Round, root: Mapping[str, Tensor] | None) -> RobustResult:
        pre = _prefix(r.where)
        if root is None:
            raise ValueError(
                f"{pre}FLTrust needs the server's root update (root=...): the server trains "
                "the global model on its own small clean data set each round"
            )
        dot, nn, rr = np.zeros(r.k), np.zeros(r.k), np.zeros(r.k)
        for name in r.names:
            h = r.holds[name]
            if not h.any():
                continue
            if name not in root:
                raise ValueError(f"{pre}the root update lacks parameter {name!r}")
            g0 = root[name].detach()
            if tuple(g0.shape) != tuple(r.deltas[name].shape[1:]):
                raise ValueError(
                    f"{pre}root update {name!r} has shape {tuple(g0.shape)}, expected "
                    f"{tuple(r.deltas[name].shape[1:])}"
                )
            if not bool(torch.isfinite(g0).all()):
                raise ValueError(f"{pre}the root update has non-finite values in {name!r}")
            x = r.deltas[name].reshape(r.k, -1).to(torch.float64)
            g = g0.reshape(-1).to(device=x.device, dtype=torch.float64)
            dot += np.where(h, (x @ g).cpu().numpy(), 0.0)
            nn += np.where(h, (x * x).sum(dim=1).cpu().numpy(), 0.0)
            rr += np.where(h, float(g @ g), 0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where((nn > 0) & (rr > 0), dot / np.sqrt(nn * rr), 0.0)
            scale = np.where(nn > 0, np.sqrt(rr / nn), 0.0)
        cos = np.clip(cos, -1.0, 1.0)
        trust = np.where(r.present, np.maximum(cos, 0.0), 0.0)
        mean, skipped = {}, []
        for name in r.names:
            h = r.holds[name]
            if not h.any():
                continue
            t = torch.as_tensor(
                np.where(h, trust, 0.0), device=r.deltas[name].device, dtype=torch.float64
            )
            if float(t.sum()) <= 0:
                skipped.append(name)
                continue
            c = t * torch.as_tensor(scale, device=t.device, dtype=torch.float64) / t.sum()
            rows = t > 0
            d = r.deltas[name]
            mean[name] = torch.tensordot(c[rows].to(d.dtype), d[rows], dims=1)
        scores = np.where(r.present, 1.0 - cos, np.nan)
        return RobustResult(
            mean, scores, trust > 0, tuple(skipped), {"trust": trust, "cosine": cos}
        )


class NormBound(RobustAggregator):
    """Norm bounding (Sun et al. 2019): clip each update's L2 norm, then the weighted mean.

    ``g_i * min(1, bound / ||g_i||)``, the norm taken over the parameters client ``i`` holds;
    then, per parameter, the weighted mean over its holders (with an infinite bound, exactly the
    plain modality-aware mean).

    Parameters
    ----------
    bound
        L2 norm bound ``> 0`` (``server.robust.norm_bound``).
    """

    name = "norm_bound"
    score_meaning = "the update's L2 norm divided by the bound (> 1: clipped)"

    def __init__(self, bound: float, f: int = 0) -> None:
        super().__init__(f)
        if not (isinstance(bound, int | float) and not isinstance(bound, bool) and bound > 0):
            raise ConfigError(
                f"server.robust.norm_bound must be a number > 0 (the largest L2 norm an update "
                f"keeps), got {bound!r}"
            )
        self.bound = float(bound)

    def _aggregate(self, r: _Round, root: Mapping[str, Tensor] | None) -> RobustResult:
        sq = np.zeros(r.k)
        for name in r.names:
            x = r.deltas[name].reshape(r.k, -1).to(torch.float64)
            sq += np.where(r.holds[name], (x * x).sum(dim=1).cpu().numpy(), 0.0)
        norm = np.sqrt(sq)
        with np.errstate(divide="ignore"):
            factor = np.where(norm > self.bound, self.bound / norm, 1.0)
        mean = {}
        for name in r.names:
            rows = r.mask(name)
            if not bool(rows.any()):
                continue
            d, w = r.deltas[name], r.weights[name]
            ww = w[rows]
            c = ww / ww.sum() * torch.as_tensor(factor, device=d.device, dtype=d.dtype)[rows]
            mean[name] = torch.tensordot(c, d[rows], dims=1)
        scores = np.where(r.present, norm / self.bound, np.nan)
        return RobustResult(
            mean, scores, r.present.copy(), (), {"norm": norm, "clipped": factor < 1}
        )


ROBUST_AGGREGATORS = (
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "fltrust",
    "norm_bound",
)


def make_robust_aggregator(
    name: str,
    *,
    f: int = 0,
    beta: float | None = None,
    m: int | None = None,
    norm_bound: float | None = None,
    num_clients: int | None = None,
) -> RobustAggregator:
    """Build a robust aggregator by name (``server.robust.*``).

    Parameters
    ----------
    name
        One of :data:`ROBUST_AGGREGATORS`.
    f
        Assumed number of Byzantine clients per round.
    beta
        Trimmed mean: fraction trimmed at each end (required).
    m
        Multi-Krum: clients kept (default ``K - f``); Krum keeps 1.
    norm_bound
        Norm bounding: the L2 bound (required).
    num_clients
        Clients expected per round; when given, the settings are checked against it now, so a
        bad configuration fails before the first round rather than during it.

    Raises
    ------
    ConfigError
        Unknown name, a parameter out of range, a parameter the method does not take, or too
        few clients for the settings (naming the ``server.robust`` key to change).
    """
    unused = {
        "beta": beta is not None and name != "trimmed_mean",
        "m": m is not None and name != "multi_krum",
        "norm_bound": norm_bound is not None and name != "norm_bound",
    }
    extra = [k for k, bad in unused.items() if bad]
    if name in ROBUST_AGGREGATORS and extra:
        raise ConfigError(
            f"server.robust.{extra[0]} does not apply to server.robust.method {name!r}; remove it"
        )
    agg: RobustAggregator
    if name == "median":
        agg = CoordinateMedian(f)
    elif name == "trimmed_mean":
        if beta is None:
            raise ConfigError(
                "server.robust.beta (fraction trimmed at each end, in [0, 0.5)) is required "
                "for 'trimmed_mean'"
            )
        agg = TrimmedMean(beta, f)
    elif name == "krum":
        agg = Krum(f)
    elif name == "multi_krum":
        agg = MultiKrum(f, m)
    elif name == "bulyan":
        agg = Bulyan(f)
    elif name == "fltrust":
        agg = FLTrust(f)
    elif name == "norm_bound":
        if norm_bound is None:
            raise ConfigError(
                "server.robust.norm_bound (largest L2 norm an update keeps) is required for "
                "'norm_bound'"
            )
        agg = NormBound(norm_bound, f)
    else:
        raise ConfigError(
            f"server.robust.method {name!r} is unknown; use one of {list(ROBUST_AGGREGATORS)}"
        )
    if num_clients is not None:
        agg.check(num_clients)
    return agg
