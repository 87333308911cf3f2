"""Systems heterogeneity: how fast, how available and how reliable each simulated client is.

Real federations are slow and unreliable: phones are busy or offline, some sites have old hardware,
connections drop. The simulator models this on a simulated clock:

- every client has a compute **speed** (drawn once from a distribution; a speed-1 client needs
  ``step_seconds`` per local step) and an **availability** (the probability that it is online in a
  round, also drawn once);
- a sampled client may **drop out** (it sends nothing; the server learns it at once, as a closed
  connection);
- a fraction of the sampled clients are **stragglers** that finish only part of their local work,
  as in FedProx's experiments (Li et al. 2020): a uniformly drawn number of epochs in
  ``[1, E - 1]`` (with one local epoch: of steps in ``[1, S - 1]``);
- an optional round **deadline** cuts the work of every client that would finish later;
- the server then either aggregates partial work (``partial_work="aggregate"``, FedProx) or drops
  every client that did not finish its full local work (``"drop"``, FedAvg as FedProx's paper runs
  it).

The draws use NumPy generators keyed by the run seed (reproducible, not secret: they decide
simulated timing, never a key or a noise value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

DistributionKind = Literal["constant", "uniform", "lognormal", "pareto", "beta"]


@dataclass(frozen=True)
class Distribution:
    """A distribution of one per-client quantity (speed or availability).

    Parameters
    ----------
    kind
        ``constant`` (``value``), ``uniform`` (``low``..``high``), ``lognormal`` (median
        ``value``, log-standard deviation ``sigma``), ``pareto`` (heavy-tailed *slowness*:
        ``value / X`` with ``X`` Pareto-distributed with tail index ``shape`` and minimum 1, so a
        few clients are very slow), ``beta`` (``a``, ``b``; for availabilities).
    """

    kind: DistributionKind = "constant"
    value: float = 1.0
    low: float = 0.0
    high: float = 1.0
    sigma: float = 1.0
    shape: float = 1.5
    a: float = 1.0
    b: float = 1.0

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` values."""
        if self.kind == "constant":
            return np.full(n, self.value, dtype=np.float64)
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high, n)
        if self.kind == "lognormal":
            return self.value * rng.lognormal(0.0, self.sigma, n)
        if self.kind == "pareto":
            return self.value / (1.0 + rng.pareto(self.shape, n))
        return rng.beta(self.a, self.b, n)

    @property
    def is_constant_one(self) -> bool:
        """True for the default (every client identical, always there)."""
        return self.kind == "constant" and self.value == 1.0


@dataclass(frozen=True)
class SystemsProfile:
    """How heterogeneous the simulated clients' systems are.

    Parameters
    ----------
    speed
        Per-client relative compute speed (1 = ``step_seconds`` per local step).
    step_seconds
        Seconds per local step of a speed-1 client.
    bandwidth_mbps
        Link speed of every client in Mbit/s, each way (``None``: communication is free).
    availability
        Per-client probability of being online in a round; the server samples among the online
        clients only.
    dropout
        Probability that a sampled client drops out and sends nothing.
    stragglers
        Fraction of sampled clients that do only part of their local work.
    deadline
        Simulated seconds after which the server closes a round; later work is cut.
    partial_work
        ``"aggregate"``: partial work of stragglers and deadline-cut clients is aggregated;
        ``"drop"``: such clients are left out of the round.
    """

    speed: Distribution = field(default_factory=Distribution)
    step_seconds: float = 0.1
    bandwidth_mbps: float | None = None
    availability: Distribution = field(default_factory=Distribution)
    dropout: float = 0.0
    stragglers: float = 0.0
    deadline: float | None = None
    partial_work: Literal["aggregate", "drop"] = "aggregate"


@dataclass
class WorkPlan:
    """What each client of one round (or one asynchronous launch) does.

    Attributes
    ----------
    steps
        Local steps whose result reaches the server (0: the client contributes nothing).
    seconds
        Simulated seconds from the start of the task until the client reports (or is known
        to be gone).
    dropped
        The client dropped out.
    partial
        The client did (or, with ``partial_work="drop"``, would have contributed) only part
        of its local work.
    """

    steps: np.ndarray
    seconds: np.ndarray
    dropped: np.ndarray
    partial: np.ndarray

    @property
    def contributes(self) -> np.ndarray:
        """Clients whose update reaches the server."""
        return self.steps > 0


class ClientSystems:
    """The systems of a population of ``num_clients`` clients under ``profile``.

    Parameters
    ----------
    profile
        Distributions and rates.
    num_clients
        Population size.
    seed
        Run seed.
    model_bytes
        Size of the model on the wire (for the communication time).
    """

    def __init__(
        self, profile: SystemsProfile, num_clients: int, seed: int, model_bytes: int
    ) -> None:
        self.profile = profile
        self.seed = seed
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5BEED]))
        self.speed = np.maximum(profile.speed.sample(rng, num_clients), 1e-9)
        self.availability = np.clip(profile.availability.sample(rng, num_clients), 0.0, 1.0)
        bandwidth = profile.bandwidth_mbps
        # Download the model, upload the update.
        self.comm_seconds = 0.0 if bandwidth is None else 2 * model_bytes * 8 / (bandwidth * 1e6)

    def online(self, key: int) -> np.ndarray | None:
        """Which clients are online at round (or launch) ``key``; ``None`` when all always are."""
        if self.profile.availability.is_constant_one:
            return None
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, key, 0x0A11]))
        return rng.random(len(self.availability)) < self.availability

    def plan(
        self,
        key: int,
        clients: np.ndarray,
        steps_per_epoch: np.ndarray,
        local_epochs: int,
    ) -> WorkPlan:
        """Decide what each of ``clients`` does in round (or launch) ``key``.

        Parameters
        ----------
        key
            Round number (synchronous) or launch number (asynchronous); keys the draws.
        clients
            Client ids.
        steps_per_epoch
            Each client's local steps per epoch.
        local_epochs
            Configured local epochs.
        """
        p = self.profile
        k = len(clients)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, key, 0x5157]))
        full = steps_per_epoch.astype(np.int64) * local_epochs
        dropped = rng.random(k) < p.dropout
        planned = full.copy()
        # round(x k) stragglers would give none when clients start one at a time (FedBuff):
        # floor(x k), plus one more with probability frac(x k), keeps the expected fraction
        # exact and, for 10 clients at 90%, is exactly the paper's 9.
        expected = p.stragglers * k
        n_stragglers = int(expected) + int(rng.random() < expected - int(expected))
        if n_stragglers:
            who = rng.choice(k, size=n_stragglers, replace=False)
            for i in who:
                if local_epochs > 1:
                    planned[i] = int(rng.integers(1, local_epochs)) * int(steps_per_epoch[i])
                elif full[i] > 1:
                    planned[i] = int(rng.integers(1, full[i]))
        step_s = p.step_seconds / self.speed[clients]
        if p.deadline is not None:
            fit = np.floor(np.maximum(p.deadline - self.comm_seconds, 0.0) / step_s)
            planned = np.minimum(planned, fit.astype(np.int64))
        partial = planned < full
        seconds = self.comm_seconds + planned * step_s
        if p.deadline is not None:
            seconds = np.minimum(seconds, p.deadline)
        steps = np.where(dropped, 0, planned)
        if p.partial_work == "drop":
            steps = np.where(partial, 0, steps)
        seconds = np.where(dropped, 0.0, seconds)
        return WorkPlan(steps=steps, seconds=seconds, dropped=dropped, partial=partial & ~dropped)

    def round_seconds(self, plan: WorkPlan) -> float:
        """A synchronous round lasts until its last client reports (or the deadline)."""
        waiting = plan.seconds[~plan.dropped]
        if waiting.size:
            return float(waiting.max())
        return float(self.profile.deadline or 0.0)


def steps_per_epoch(sizes: np.ndarray, batch_size: int) -> np.ndarray:
    """Local steps per epoch of clients holding ``sizes`` records."""
    return np.array([math.ceil(int(n) / batch_size) for n in sizes], dtype=np.int64)
