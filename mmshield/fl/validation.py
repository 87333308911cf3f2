"""Server-side validation of client updates as they arrive.

Each update is checked against the global parameters before anything is aggregated: the
parameter names, shapes and dtypes, finiteness, an optional bound on its L2 norm, and its
staleness (the round it was trained from). A bad update is rejected with a reason that names the
client, the round and the parameter, and the round goes on with the others.

Why hand-written: Flower's server hands a strategy whatever each client sent (arrays and a
claimed ``num_examples``) and checks none of it; one client's NaN, a wrong-shaped array from an
out-of-date model or a huge crafted update would otherwise crash the round half-way or silently
poison the average. The checks work on the simulator's stacked layout (``name -> (K, *shape)``
plus client ids, without a copy per client) and on one client's ``name -> tensor`` as a Flower
``ServerApp`` receives it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from mmshield.errors import ConfigError

Tensor = torch.Tensor

RejectionKind = Literal[
    "stale", "weight", "missing", "unexpected", "shape", "dtype", "non_finite", "norm"
]
REJECTION_KINDS: tuple[RejectionKind, ...] = (
    "stale",
    "weight",
    "missing",
    "unexpected",
    "shape",
    "dtype",
    "non_finite",
    "norm",
)
"""Rejection reasons, in the order the checks run (a client is rejected for the first one)."""


@dataclass(frozen=True)
class Rejection:
    """One rejected update.

    Attributes
    ----------
    client
        The client's id.
    kind
        Which check failed (one of :data:`REJECTION_KINDS`).
    reason
        What was wrong and how to fix it, without the client prefix.
    round
        The server round it was received in, if known.
    """

    client: int
    kind: RejectionKind
    reason: str
    round: int | None = None

    @property
    def message(self) -> str:
        """``"round 3, client 7: parameter 'head.weight' has shape ..."``."""
        where = f"round {self.round}, " if self.round is not None else ""
        return f"{where}client {self.client}: {self.reason}"

    def __str__(self) -> str:
        return self.message


@dataclass
class ValidationReport:
    """Which updates were accepted and why the others were not.

    Attributes
    ----------
    clients
        ``(K,)`` the ids of the updates checked, in input order.
    mask
        ``(K,)`` True where accepted.
    rejections
        One :class:`Rejection` per rejected client, in input order.
    round
        The server round, if known.
    """

    clients: np.ndarray
    mask: np.ndarray
    rejections: list[Rejection] = field(default_factory=list)
    round: int | None = None

    @property
    def accepted(self) -> np.ndarray:
        """Ids of the accepted clients, in input order."""
        return self.clients[self.mask]

    def counts(self) -> dict[str, int]:
        """Rejected clients per reason (every reason of :data:`REJECTION_KINDS`, zeros too)."""
        out: dict[str, int] = dict.fromkeys(REJECTION_KINDS, 0)
        for r in self.rejections:
            out[r.kind] += 1
        return out

    def summary(self) -> str:
        """One line, e.g. ``"round 3: 18 of 20 updates accepted; rejected: 1 norm, 1 stale"``."""
        where = f"round {self.round}: " if self.round is not None else ""
        line = f"{where}{int(self.mask.sum())} of {len(self.mask)} updates accepted"
        parts = [f"{n} {k}" for k, n in self.counts().items() if n]
        return line + (f"; rejected: {', '.join(parts)}" if parts else "")

    def select(self, stacked: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The accepted rows of ``name -> (K, ...)`` tensors (deltas, or per-client weights)."""
        out = {}
        for name, t in stacked.items():
            out[name] = t[torch.as_tensor(self.mask, device=t.device)]
        return out


def _shape(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class UpdateValidator:
    """Checks client updates against the global parameters.

    The checks run in the order of :data:`REJECTION_KINDS` and a client is rejected for the
    first that fails: staleness, the reported weight, missing and unexpected parameters,
    shapes, dtypes, finiteness, then the L2 norm of the whole update (all parameters together).

    Parameters
    ----------
    reference
        ``name -> tensor``: the parameters clients must send, with their shapes and dtypes (the
        global model's trained parameters).
    max_norm
        Largest accepted L2 norm of a whole update (``server.validation.max_norm``); ``None``:
        no bound.
    max_staleness
        Most rounds an update may lag the current round (``server.validation.max_staleness``;
        0: only updates of the current round); ``None``: any age. An update that claims a
        round after the current one is always rejected.
    check_dtype
        Reject updates whose dtype differs from the reference's (on by default).
    allow_missing
        Accept a client's update that lacks some parameters (e.g. the encoders of modalities it
        does not hold, when the transport leaves them out). Off by default: a missing
        parameter is rejected.

    Raises
    ------
    ConfigError
        A negative or non-finite bound, or a negative staleness.
    """

    def __init__(
        self,
        reference: Mapping[str, Tensor],
        *,
        max_norm: float | None = None,
        max_staleness: int | None = None,
        check_dtype: bool = True,
        allow_missing: bool = False,
    ) -> None:
        if not reference:
            raise ValueError("reference is empty: pass the parameters clients must send")
        if max_norm is not None and not (np.isfinite(max_norm) and max_norm > 0):
            raise ConfigError(
                f"server.validation.max_norm must be a finite number > 0, got {max_norm!r}"
            )
        if max_staleness is not None and not (
            isinstance(max_staleness, int | np.integer) and max_staleness >= 0
        ):
            raise ConfigError(
                f"server.validation.max_staleness must be an integer >= 0 (rounds), "
                f"got {max_staleness!r}"
            )
        self.shapes = {k: tuple(v.shape) for k, v in reference.items()}
        self.dtypes = {k: v.dtype for k, v in reference.items()}
        self.max_norm = None if max_norm is None else float(max_norm)
        self.max_staleness = None if max_staleness is None else int(max_staleness)
        self.check_dtype = check_dtype
        self.allow_missing = allow_missing

    # -- the individual checks, each returning a reason or None --------------------------------

    def _stale(self, trained: int | None, current: int | None) -> str | None:
        if trained is None:
            if self.max_staleness is not None:
                raise ValueError(
                    "max_staleness is set but the round each update was trained from is not "
                    "given (trained_round / trained_rounds)"
                )
            return None
        if current is None:
            raise ValueError("a trained-from round needs the current round (current_round)")
        age = current - trained
        if age < 0:
            return (
                f"update claims to be trained from round {trained}, after the current round "
                f"{current}; the server never sent that model: check the client's round counter"
            )
        if self.max_staleness is not None and age > self.max_staleness:
            return (
                f"update trained from round {trained} is {age} rounds old, more than "
                f"server.validation.max_staleness = {self.max_staleness}; the client must "
                "fetch the current global model (or raise the bound)"
            )
        return None

    @staticmethod
    def _weight(examples: float | None) -> str | None:
        if examples is None or (np.isfinite(examples) and examples >= 0):
            return None
        return (
            f"reported weight (number of examples) {examples} is not a finite number >= 0; "
            "the client's report is corrupt or forged"
        )

    def _structure(self, names: Sequence[str]) -> tuple[RejectionKind, str] | None:
        present = set(names)
        missing = [n for n in self.shapes if n not in present]
        if missing and not self.allow_missing:
            return "missing", (
                f"update lacks parameter(s) {_names(missing)}; the client must send every "
                "trained parameter (its model may differ from the server's)"
            )
        unexpected = [n for n in names if n not in self.shapes]
        if unexpected:
            return "unexpected", (
                f"update has parameter(s) {_names(unexpected)} that the global model does not "
                "have; the client's model architecture differs from the server's"
            )
        return None

    def _shape_of(self, name: str, shape: Sequence[int]) -> str | None:
        if tuple(shape) == self.shapes[name]:
            return None
        return (
            f"parameter {name!r} has shape {_shape(shape)}, expected "
            f"{_shape(self.shapes[name])}; the client's model architecture differs from the "
            "server's"
        )

    def _dtype_of(self, name: str, dtype: torch.dtype) -> str | None:
        if not self.check_dtype or dtype == self.dtypes[name]:
            return None
        return (
            f"parameter {name!r} has dtype {dtype}, expected {self.dtypes[name]}; the client "
            "must send the global model's dtype"
        )

    @staticmethod
    def _non_finite(name: str, count: int, size: int) -> str:
        return (
            f"parameter {name!r} has {count} non-finite value(s) (NaN or inf) of {size}; the "
            "client's training diverged: lower its learning rate or clip its gradients"
        )

    def _norm(self, norm: float) -> str | None:
        if self.max_norm is None or norm <= self.max_norm:
            return None
        return (
            f"update L2 norm {norm:.4g} exceeds server.validation.max_norm = "
            f"{self.max_norm:.4g}; clip updates on the client (e.g. client-level DP clipping) "
            "or raise the bound"
        )

    # -- one client -----------------------------------------------------------------------------

    def check(
        self,
        client: int,
        update: Mapping[str, Tensor],
        *,
        trained_round: int | None = None,
        current_round: int | None = None,
        examples: float | None = None,
    ) -> Rejection | None:
        """Check one client's update ``name -> tensor``.

        Parameters
        ----------
        client
            The client's id (for the message).
        update
            The update as received (deltas or parameters, with the reference's shapes).
        trained_round
            The round whose global model the client trained from (needed with
            ``max_staleness``).
        current_round
            The server's current round.
        examples
            The weight the client reports (its number of examples), if any.

        Returns
        -------
        Rejection or None
            ``None`` when the update is accepted.
        """

        def reject(kind: RejectionKind, reason: str) -> Rejection:
            return Rejection(int(client), kind, reason, current_round)

        if (why := self._stale(trained_round, current_round)) is not None:
            return reject("stale", why)
        if (why := self._weight(examples)) is not None:
            return reject("weight", why)
        if (problem := self._structure(list(update))) is not None:
            return reject(*problem)
        for name, t in update.items():
            if (why := self._shape_of(name, t.shape)) is not None:
                return reject("shape", why)
        for name, t in update.items():
            if (why := self._dtype_of(name, t.dtype)) is not None:
                return reject("dtype", why)
        sq = 0.0
        for name, t in update.items():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return reject("non_finite", self._non_finite(name, bad, t.numel()))
            sq += float(t.detach().to(torch.float64).square().sum())
        if (why := self._norm(float(np.sqrt(sq)))) is not None:
            return reject("norm", why)
        return None

    def validate(
        self,
        updates: Mapping[int, Mapping[str, Tensor]],
        *,
        trained_rounds: Mapping[int, int] | None = None,
        current_round: int | None = None,
        examples: Mapping[int, float] | None = None,
    ) -> ValidationReport:
        """Check several clients' updates ``client -> {name -> tensor}`` (as :meth:`check`).

        ``trained_rounds`` and ``examples`` map client ids to their values.
        """
        clients = np.asarray(list(updates), dtype=np.int64)
        mask = np.ones(len(clients), dtype=bool)
        rejections = []
        for i, (client, update) in enumerate(updates.items()):
            rej = self.check(
                client,
                update,
                trained_round=None if trained_rounds is None else trained_rounds.get(client),
                current_round=current_round,
                examples=None if examples is None else examples.get(client),
            )
            if rej is not None:
                mask[i] = False
                rejections.append(rej)
        return ValidationReport(clients, mask, rejections, current_round)

    # -- stacked clients ------------------------------------------------------------------------

    def validate_stacked(
        self,
        deltas: Mapping[str, Tensor],
        clients: Sequence[int] | np.ndarray | Tensor,
        *,
        trained_rounds: Sequence[int] | np.ndarray | int | None = None,
        current_round: int | None = None,
        examples: Tensor | np.ndarray | None = None,
    ) -> ValidationReport:
        """Check the stacked updates of ``K`` clients.

        Parameters
        ----------
        deltas
            ``name -> (K, *shape)``, row ``i`` being client ``clients[i]``'s update. A wrong
            name, shape or dtype of a stacked tensor rejects all ``K`` clients.
        clients
            ``(K,)`` client ids.
        trained_rounds
            ``(K,)`` rounds each update was trained from, or one round for all.
        current_round
            The server's current round.
        examples
            ``(K,)`` the weights the clients report, if any.

        Raises
        ------
        ValueError
            A tensor whose leading dimension is not ``K``: a caller's error, not a client's.
        """
        ids = np.asarray(
            clients.cpu().numpy() if isinstance(clients, Tensor) else clients, dtype=np.int64
        ).reshape(-1)
        k = len(ids)
        for name, t in deltas.items():
            if t.dim() < 1 or int(t.shape[0]) != k:
                raise ValueError(
                    f"stacked parameter {name!r} has shape {_shape(t.shape)}; expected "
                    f"({k}, ...) for the {k} client ids given"
                )
        first: list[tuple[RejectionKind, str] | None] = [None] * k

        def flag(rows: Iterable[int], kind: RejectionKind, reason: str) -> None:
            for i in rows:
                if first[i] is None:
                    first[i] = (kind, reason)

        if trained_rounds is not None or self.max_staleness is not None:
            rounds = (
                None
                if trained_rounds is None
                else np.broadcast_to(np.asarray(trained_rounds, dtype=np.int64), (k,))
            )
            for i in range(k):
                trained = None if rounds is None else int(rounds[i])
                if (why := self._stale(trained, current_round)) is not None:
                    flag([i], "stale", why)
        if examples is not None:
            ex = np.asarray(
                examples.detach().cpu().numpy() if isinstance(examples, Tensor) else examples,
                dtype=np.float64,
            ).reshape(-1)
            if len(ex) != k:
                raise ValueError(f"examples has {len(ex)} entries for {k} clients")
            for i in range(k):
                if (why := self._weight(float(ex[i]))) is not None:
                    flag([i], "weight", why)
        if (problem := self._structure(list(deltas))) is not None:
            flag(range(k), *problem)
        known = {n: t for n, t in deltas.items() if n in self.shapes}
        for name, t in known.items():
            if (why := self._shape_of(name, t.shape[1:])) is not None:
                flag(range(k), "shape", why)
        for name, t in known.items():
            if (why := self._dtype_of(name, t.dtype)) is not None:
                flag(range(k), "dtype", why)
        if all(f is not None for f in first):
            return self._report(ids, first, current_round)
        sq = np.zeros(k)
        non_finite = np.zeros(k, dtype=bool)
        for name, t in deltas.items():
            flat = t.detach().reshape(k, -1)
            bad = (~torch.isfinite(flat)).sum(dim=1).cpu().numpy()
            for i in np.flatnonzero(bad).tolist():
                flag([i], "non_finite", self._non_finite(name, int(bad[i]), flat.shape[1]))
            non_finite |= bad > 0
            sq += flat.to(torch.float64).square().sum(dim=1).cpu().numpy()
        if self.max_norm is not None:
            for i in np.flatnonzero(~non_finite).tolist():
                if (why := self._norm(float(np.sqrt(sq[i])))) is not None:
                    flag([i], "norm", why)
        return self._report(ids, first, current_round)

    @staticmethod
    def _report(
        ids: np.ndarray,
        first: list[tuple[RejectionKind, str] | None],
        current_round: int | None,
    ) -> ValidationReport:
        mask = np.array([f is None for f in first], dtype=bool)
        rejections = [
            Rejection(int(ids[i]), f[0], f[1], current_round)
            for i, f in enumerate(first)
            if f is not None
        ]
        return ValidationReport(ids, mask, rejections, current_round)
