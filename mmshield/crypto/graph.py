r"""The SecAgg+ neighbour graph and the choice of its degree ``k`` and threshold ``t``.

Graph (Bell et al. 2020). Clients are placed on a ring in a uniformly random order (a permutation
drawn from ``secrets``), and each is joined to its ``m = floor(k/2)`` nearest ring neighbours on
either side: the Harary graph ``H(k, n)``. For odd ``k`` each client is also joined to the client
opposite it on the ring; when ``n`` is odd as well, no ``k``-regular graph exists and, as in
Harary's construction, one client gets ``k + 1`` neighbours. ``k = n - 1`` is the complete graph,
i.e. the original SecAgg of Bonawitz et al. 2017. Even and odd ``k`` both work.

Every client Shamir-shares its self-mask seed ``b_u`` and its mask key ``s_u`` among its
neighbours with threshold ``t``, and masks pairwise only with them. With a per-round failure
budget of ``2^-sigma`` (correctness) and ``2^-eta`` (privacy), :func:`choose_parameters` returns
the smallest ``k`` and, for it, the smallest ``t`` that satisfy, with ``deg`` ranging over the
graph's degrees, independent dropout of each client with probability ``delta`` over the round and
a fraction ``gamma`` of clients colluding with the server (placed independently of the random
ring order):

1. **Secret-pair secrecy** (no client's update is ever unmasked): an honest client ``u`` with
   ``c_u`` colluding neighbours gives out, per neighbour ``v``, either ``v``'s self-mask share or
   its key share, never both (the client keeps state and refuses a contradicting request). The
   server therefore holds at most ``c_u + h_u = deg`` shares of ``b_v`` and ``s_v`` together from
   ``v``'s neighbours, ``c_u`` of them of both kinds; it can learn both secrets only if
   ``2t <= deg + c_v``. So we require ``c_v <= 2t - deg - 1`` for every honest ``v``:

   .. math:: n \cdot P[\mathrm{Bin}(\deg_{max}, \gamma) \ge 2t - \deg_{max}] \le 2^{-\eta}

   With no collusion (``gamma = 0``) this is the honest-majority rule ``t >= floor(deg/2) + 1``,
   which is always enforced: below it an honest-but-curious server could ask half the neighbours
   for ``b_v`` and the other half for ``s_v`` and unmask ``v``.
2. **Correctness** (every secret the server needs can be rebuilt): each client's secrets need
   ``t`` neighbours that stay to the end; a neighbour stays with probability ``1 - delta``:

   .. math:: n \cdot P[\mathrm{Bin}(\deg_{min}, 1 - \delta) < t] \le 2^{-\sigma}

   (union bound over the ``n`` clients: every survivor keeps ``>= t`` responsive neighbours).
3. **Connectivity** (``k < n - 1`` only; the server learns only the total, not sums of parts):
   removing the colluding and dropped clients (each position independently with probability at
   most ``rho = gamma + (1 - gamma) delta``) leaves the Harary graph connected unless two disjoint
   runs of ``m`` consecutive ring positions are all removed (one run leaves a path); by a union
   bound over pairs of starting positions

   .. math:: \binom{n}{2} \rho^{2m} \le 2^{-\eta}.

The binomial tails are exact (log-space sums). Conditions 1 and 3 assume the corrupted set is
chosen independently of the ring order, which the server samples freshly each round; against a
server that picks the graph maliciously the seed would have to come from a joint coin toss (not
implemented: our server is honest-but-curious, see :mod:`mmshield.crypto.secagg`).

If no ``k <= n - 1`` satisfies all three, :func:`choose_parameters` raises and says how close the
complete graph comes. Rough feasibility: ``delta < (1 - gamma) / 2``.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np

from mmshield.crypto.encoding import SecAggConfigError


def _log2_binom_tail_ge(n: int, p: float, a: int) -> float:
    """``log2 P[Bin(n, p) >= a]`` computed exactly in log space (``-inf`` when impossible)."""
    if a <= 0:
        return 0.0
    if a > n or p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return 0.0
    i = np.arange(1, n + 1, dtype=np.float64)
    logc = np.concatenate([[0.0], np.cumsum(np.log(n - i + 1) - np.log(i))])  # log C(n, i)
    j = np.arange(a, n + 1, dtype=np.float64)
    terms = logc[a:] + j * math.log(p) + (n - j) * math.log1p(-p)
    top = float(terms.max())
    return (top + math.log(float(np.exp(terms - top).sum()))) / math.log(2)


def _log2_binom_tail_lt(n: int, p: float, a: int) -> float:
    """``log2 P[Bin(n, p) < a]`` (= ``P[Bin(n, 1-p) > n - a]``)."""
    return _log2_binom_tail_ge(n, 1.0 - p, n - a + 1)


def degrees(n: int, k: int) -> tuple[int, int]:
    """Minimum and maximum degree of the graph :func:`neighbour_graph` builds for ``(n, k)``."""
    if k >= n - 1:
        return n - 1, n - 1
    if k % 2 == 1 and n % 2 == 1:
        return k, k + 1
    return k, k


@dataclass(frozen=True)
class GraphParameters:
    """A SecAgg+ configuration and what it guarantees.

    Attributes
    ----------
    n, k, t
        Clients, neighbours per client (``n - 1``: complete graph, i.e. SecAgg) and threshold.
    dropout, collusion
        The declared dropout rate ``delta`` and colluding fraction ``gamma``.
    log2_failure
        ``log2`` of the bound on the probability that some client's secrets cannot be rebuilt.
    log2_privacy_failure
        ``log2`` of the bound on the probability that the server could unmask a client or a
        partial sum (max of conditions 1 and 3 in the module docstring).
    """

    n: int
    k: int
    t: int
    dropout: float
    collusion: float
    log2_failure: float
    log2_privacy_failure: float

    @property
    def complete(self) -> bool:
        """Whether the graph is complete (plain SecAgg)."""
        return self.k >= self.n - 1


def assess(n: int, k: int, t: int, dropout: float, collusion: float = 0.0) -> GraphParameters:
    """The guarantees of a given ``(n, k, t)`` under dropout ``delta`` and collusion ``gamma``.

    Raises
    ------
    SecAggConfigError
        If ``t`` is below the honest-majority bound ``floor(deg_max / 2) + 1`` or above ``k``.
    """
    if n < 2:
        raise SecAggConfigError(f"secure aggregation needs at least 2 clients, got {n}")
    if not 1 <= k <= n - 1:
        raise SecAggConfigError(f"neighbours k must be in [1, n - 1 = {n - 1}], got {k}")
    for name, value in (("dropout", dropout), ("collusion", collusion)):
        if not 0.0 <= value < 1.0:
            raise SecAggConfigError(f"secure_aggregation.{name} must be in [0, 1), got {value}")
    dmin, dmax = degrees(n, k)
    if not dmax // 2 + 1 <= t <= dmin:
        raise SecAggConfigError(
            f"threshold t={t} with {dmax} neighbours: t must be in [{dmax // 2 + 1}, {dmin}] "
            f"(at least floor(k/2)+1 so that an honest majority of neighbours never hands the "
            f"server both a client's self-mask and its key shares)"
        )
    log_n = math.log2(n)
    fail = log_n + _log2_binom_tail_lt(dmin, 1.0 - dropout, t)
    secrecy = log_n + _log2_binom_tail_ge(dmax, collusion, 2 * t - dmax)
    if k >= n - 1:
        connect = -math.inf
    elif k < 2:
        connect = 0.0  # a perfect matching: never connected for n > 2
    else:
        rho = collusion + (1.0 - collusion) * dropout
        m = k // 2
        pairs = math.log2(n * (n - 1) / 2)
        connect = pairs + 2 * m * math.log2(rho) if rho > 0 else -math.inf
    return GraphParameters(
        n=n,
        k=min(k, n - 1),
        t=t,
        dropout=dropout,
        collusion=collusion,
        log2_failure=min(0.0, fail),
        log2_privacy_failure=min(0.0, max(secrecy, connect)),
    )


def choose_parameters(
    n: int,
    dropout: float = 0.1,
    collusion: float = 0.0,
    failure_bits: float = 20.0,
    privacy_bits: float = 20.0,
) -> GraphParameters:
    """Smallest ``k`` (and smallest ``t`` for it) meeting the guarantees in the module docstring.

    Parameters
    ----------
    n
        Clients in the round.
    dropout
        ``delta``: probability that a client drops out at some point of the round.
    collusion
        ``gamma``: fraction of clients that may collude with the server.
    failure_bits
        ``sigma``: the round fails (a secret cannot be rebuilt) with probability ``<= 2^-sigma``.
    privacy_bits
        ``eta``: the server learns more than the sum with probability ``<= 2^-eta``.

    Returns
    -------
    GraphParameters
        ``k = n - 1`` (complete graph, SecAgg) when no sparser graph qualifies.

    Raises
    ------
    SecAggConfigError
        If even the complete graph misses a target; the message gives the best achievable.
    """
    best: GraphParameters | None = None
    best_gap = math.inf
    # k = 1 is a perfect matching (never connected); from k = 2 on, H(k, n) is connected.
    for k in range(min(2, n - 1), n):
        t = _smallest_secret_threshold(n, k, collusion, privacy_bits)
        if t is None:
            continue
        p = assess(n, k, t, dropout, collusion)
        gap = max(p.log2_failure + failure_bits, p.log2_privacy_failure + privacy_bits)
        if gap <= 0:
            return p
        if gap < best_gap:
            best, best_gap = p, gap
    detail = (
        f"the best found is k={best.k}, t={best.t} with failure 2^{best.log2_failure:.1f} and "
        f"privacy failure 2^{best.log2_privacy_failure:.1f}"
        if best is not None
        else "no threshold keeps a colluding minority away from both secrets of a client"
    )
    raise SecAggConfigError(
        f"secure_aggregation: with {n} clients, dropout {dropout:g} and collusion {collusion:g} "
        f"no neighbour count meets failure <= 2^-{failure_bits:g} and privacy failure <= "
        f"2^-{privacy_bits:g}; {detail}. Declare a lower dropout rate or collusion fraction, "
        "accept smaller failure_bits/privacy_bits, or aggregate more clients per round."
    )


def _smallest_secret_threshold(n: int, k: int, collusion: float, privacy_bits: float) -> int | None:
    """Smallest ``t`` meeting condition 1 (binary search: the tail falls as ``t`` grows)."""
    dmin, dmax = degrees(n, k)

    def ok(t: int) -> bool:
        return math.log2(n) + _log2_binom_tail_ge(dmax, collusion, 2 * t - dmax) <= -privacy_bits

    lo, hi = dmax // 2 + 1, dmin
    if lo > hi or not ok(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def harary_neighbours(n: int, k: int) -> list[list[int]]:
    """Neighbours of each ring position in the Harary graph ``H(k, n)`` (before permutation)."""
    if not 1 <= k <= n - 1:
        raise SecAggConfigError(f"neighbours k must be in [1, {n - 1}] for {n} clients, got {k}")
    adj: list[set[int]] = [set() for _ in range(n)]
    if k >= n - 1:
        for i in range(n):
            adj[i] = set(range(n)) - {i}
        return [sorted(a) for a in adj]
    m = k // 2
    for i in range(n):
        for j in range(1, m + 1):
            adj[i].add((i + j) % n)
            adj[i].add((i - j) % n)
    if k % 2 == 1:
        if n % 2 == 0:
            for i in range(n // 2):
                adj[i].add(i + n // 2)
                adj[i + n // 2].add(i)
        else:
            half = (n + 1) // 2
            for i in range((n - 1) // 2 + 1):
                j = (i + half) % n
                adj[i].add(j)
                adj[j].add(i)
    return [sorted(a) for a in adj]


def neighbour_graph(client_ids: list[int], k: int) -> dict[int, tuple[int, ...]]:
    """A random SecAgg+ graph over ``client_ids``: Harary ``H(k, n)`` on a random ring order.

    Parameters
    ----------
    client_ids
        Distinct client ids.
    k
        Neighbours per client (``len(client_ids) - 1`` for the complete graph).

    Returns
    -------
    dict
        ``client id -> sorted tuple of neighbour ids`` (symmetric).
    """
    n = len(client_ids)
    if len(set(client_ids)) != n:
        raise SecAggConfigError("neighbour_graph: client ids must be distinct")
    order = list(client_ids)
    secrets.SystemRandom().shuffle(order)  # ring position -> client, from the OS's CSPRNG
    ring = harary_neighbours(n, k)
    return {order[i]: tuple(sorted(order[j] for j in ring[i])) for i in range(n)}
