"""Secure aggregation in the simulator: each round's sum is computed by the SecAgg+ protocol.

The clients' contributions to a round (their weighted updates, the weights and their training
losses, flattened into one vector per client) are encoded into ``Z_{2^b}`` and summed by the real
protocol of :mod:`mmshield.crypto.secagg`, run in-process by
:func:`~mmshield.crypto.secagg.run_in_memory`: X25519 keys, AES-GCM encrypted Shamir shares,
AES-CTR masks, unmasking. The server side of the simulator only ever receives the decoded sum.

A client that the systems profile drops out after it was sampled is modelled as going silent at
the masked-input phase, after it shared its keys: the costliest point for the protocol, since its
pairwise masks must be rebuilt from its neighbours' shares and removed.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mmshield.crypto.encoding import FixedPointEncoder, SecAggConfigError
from mmshield.crypto.graph import GraphParameters, assess, choose_parameters
from mmshield.crypto.secagg import Phase, SecAggServer, TooManyDropoutsError, run_in_memory

# Fewest fixed-point levels in [0, clip_range] we accept: rounding error below 0.2% of the range.
MIN_LEVELS = 256


@dataclass(frozen=True)
class SecureRound:
    """What secure aggregation did in one round (for the run's records and report)."""

    invited: int
    included: int
    dropped: int
    k: int
    t: int
    clipped_values: int
    """Values outside ``[-clip_range, clip_range]`` that were clipped before encoding."""
    seconds: float
    """Protocol compute of all clients and the server together."""
    bytes_up: int
    bytes_down: int
    failure: str | None = None
    """Why the round released nothing (too many dropouts), or ``None``."""


class SecureSum:
    """Sums per-client vectors with SecAgg+ (or SecAgg's complete graph).

    Parameters
    ----------
    protocol
        ``"secagg+"`` (sparse neighbour graph, ``k`` and ``t`` from the dropout and collusion
        rates) or ``"secagg"`` (complete graph).
    bits
        Ring size: sums are computed mod ``2^bits``.
    clip_range
        Values are encoded in ``[-clip_range, clip_range]``; values outside are clipped and
        counted (:attr:`SecureRound.clipped_values`).
    dropout, collusion
        The dropout rate to tolerate and the fraction of clients that may collude with the
        server (see :mod:`mmshield.crypto.graph`).
    failure_bits
        At the declared dropout rate a round fails (some dropped client's masks cannot be
        removed) with probability at most ``2^-failure_bits``. A failed round releases nothing
        and the run goes on (:attr:`SecureRound.failure` says why).
    """

    def __init__(
        self,
        protocol: Literal["secagg+", "secagg"] = "secagg+",
        bits: int = 32,
        clip_range: float = 1.0,
        dropout: float = 0.1,
        collusion: float = 0.0,
        failure_bits: float = 10.0,
    ) -> None:
        self.protocol = protocol
        self.failure_bits = failure_bits
        self.bits = bits
        self.clip_range = clip_range
        self.dropout = dropout
        self.collusion = collusion
        self.rounds: list[SecureRound] = []

    def parameters(self, n: int) -> GraphParameters:
        """Neighbours ``k`` and threshold ``t`` for ``n`` invited clients.

        Raises
        ------
        SecAggConfigError
            When no graph meets the failure and privacy bounds for this dropout rate.
        """
        if self.protocol == "secagg+":
            return choose_parameters(n, self.dropout, self.collusion, self.failure_bits)
        k = n - 1
        for t in range(k // 2 + 1, k + 1):
            p = assess(n, k, t, self.dropout, self.collusion)
            if p.log2_failure <= -self.failure_bits and p.log2_privacy_failure <= -20:
                return p
        raise SecAggConfigError(
            f"secure_aggregation: SecAgg over {n} clients cannot tolerate dropout "
            f"{self.dropout:g} with collusion {self.collusion:g} (failure above "
            f"2^-{self.failure_bits:g} or privacy failure above 2^-20 for every threshold); "
            "declare lower rates or smaller failure_bits, or invite more clients per round"
        )

    def check(self, n: int) -> None:
        """Refuse configurations that would overflow, leave too little precision, or cannot
        tolerate the dropout, before a run starts."""
        self._encoder(n)
        self.parameters(n)

    def _encoder(self, n: int) -> FixedPointEncoder:
        encoder = FixedPointEncoder(self.bits, self.clip_range, n)
        if encoder.q_max < MIN_LEVELS:
            raise SecAggConfigError(
                f"secure_aggregation: {self.bits}-bit sums of {n} clients leave only "
                f"{encoder.q_max} levels for values in [0, {self.clip_range:g}] (resolution "
                f"{encoder.resolution:.3g}; at least {MIN_LEVELS} are needed so that rounding "
                "does not swamp the update); use more bits or fewer clients per round"
            )
        return encoder

    def sum(
        self,
        contributions: Mapping[int, np.ndarray],
        dropped: Collection[int] = (),
        where: str = "round",
    ) -> tuple[np.ndarray | None, tuple[int, ...], SecureRound] | None:
        """The sum of the contributions of the clients that did not drop out.

        Parameters
        ----------
        contributions
            ``client -> float vector`` (all the same length) of the clients that report.
        dropped
            Invited clients that go silent after sharing their keys.

        Returns
        -------
        total, included, record
            The decoded float64 sum, the clients in it, and what the round did; ``None`` when
            fewer than two clients were invited (a sum of one is that client's update). When so
            many dropped out that the protocol could not finish, the total is ``None`` and the
            record says why (:attr:`SecureRound.failure`).
        """
        ids = sorted(set(contributions) | {int(c) for c in dropped})
        if len(ids) < 2 or len(contributions) == 0:
            return None
        encoder = self._encoder(len(ids))
        inputs, clipped = {}, 0
        for c, vector in contributions.items():
            encoded = encoder.encode(vector)
            inputs[c], clipped = encoded.values, clipped + encoded.clipped
        out = self.sum_ring(inputs, dropped, where, clipped)
        assert out is not None
        ring_total, included, record = out
        total = None if ring_total is None else encoder.decode(ring_total, len(included))
        return total, included, record

    def sum_ring(
        self,
        inputs: Mapping[int, np.ndarray],
        dropped: Collection[int] = (),
        where: str = "round",
        clipped: int = 0,
    ) -> tuple[np.ndarray | None, tuple[int, ...], SecureRound] | None:
        """The sum mod ``2^bits`` of vectors the clients encoded themselves (e.g. with
        distributed DP noise, :mod:`mmshield.privacy.skellam`).

        Parameters
        ----------
        inputs
            ``client -> ring vector`` (unsigned, values below ``2^bits``, all the same length).
        dropped
            Invited clients that go silent after sharing their keys.
        clipped
            What the clients reported clipping (recorded in :attr:`SecureRound.clipped_values`).

        Returns
        -------
        total, included, record
            As :meth:`sum`, with the ring total undecoded.
        """
        ids = sorted(set(inputs) | {int(c) for c in dropped})
        if len(ids) < 2 or len(inputs) == 0:
            return None
        first = next(iter(inputs.values()))
        dim, dtype = len(first), first.dtype
        p = self.parameters(len(ids))
        vectors = {c: inputs.get(c, np.zeros(dim, dtype=dtype)) for c in ids}  # silent: unsent
        server = SecAggServer(ids, dim, k=p.k, t=p.t, bits=self.bits)
        silent = [c for c in ids if c not in inputs]
        try:
            report = run_in_memory(server, vectors, drop={Phase.MASKED_INPUT: silent})
        except TooManyDropoutsError as err:
            failed = SecureRound(
                len(ids), 0, len(ids), p.k, p.t, clipped, 0.0, 0, 0, f"{where}: {err}"
            )
            self.rounds.append(failed)
            return None, (), failed
        included = report.result.included
        record = SecureRound(
            invited=len(ids),
            included=len(included),
            dropped=len(ids) - len(included),
            k=p.k,
            t=p.t,
            clipped_values=clipped,
            seconds=float(sum(report.client_seconds.values()) + report.server_seconds),
            bytes_up=report.bytes_up,
            bytes_down=report.bytes_down,
        )
        self.rounds.append(record)
        return report.result.total, included, record
