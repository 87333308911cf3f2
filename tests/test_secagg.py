"""Secure aggregation (SecAgg+ and complete-graph SecAgg).

Correctness under dropouts, masking uniformity, tampering, a server that lies about dropouts,
encoding limits, the k/t choice, Shamir sharing and the mask generator.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mmshield.crypto import shamir
from mmshield.crypto.encoding import FixedPointEncoder, SecAggConfigError
from mmshield.crypto.graph import (
    assess,
    choose_parameters,
    degrees,
    harary_neighbours,
    neighbour_graph,
)
from mmshield.crypto.prg import MaskExpander, expand
from mmshield.crypto.secagg import (
    AdvertiseKeys,
    KeyBroadcast,
    MaskedInput,
    Phase,
    ProtocolError,
    SecAggClient,
    SecAggServer,
    Setup,
    ShareBundle,
    ShareDecryptionError,
    ShareKeys,
    TooManyDropoutsError,
    UnmaskRefusedError,
    UnmaskRequest,
    UnmaskResponse,
    decode_message,
    run_in_memory,
)
from mmshield.errors import MMShieldError, SecAggError

D = 1000


def _inputs(n: int, enc: FixedPointEncoder, seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    floats = {u: rng.uniform(-0.9, 0.9, D) * enc.clip_range for u in range(n)}
    return floats, {u: enc.encode(x).values for u, x in floats.items()}


def _plain_sum(encoded: dict, ids: tuple[int, ...], bits: int) -> np.ndarray:
    acc = sum(encoded[u].astype(object) for u in ids)
    return np.array([int(v) % (1 << bits) for v in acc], dtype=np.uint64)


class _Stepper:
    """Drives clients and server by hand up to the masked inputs (for attack tests)."""

    def __init__(self, n: int, k: int, t: int, d: int = D, bits: int = 32) -> None:
        self.server = SecAggServer(range(n), d, k=k, t=t, bits=bits)
        self.clients = {u: SecAggClient(u) for u in range(n)}
        self.setups = self.server.setup()
        self.adverts = [self.clients[u].on_setup(m) for u, m in self.setups.items()]
        self.broadcasts = self.server.collect_keys(self.adverts)
        self.shares = [self.clients[u].on_keys(m) for u, m in self.broadcasts.items()]
        self.bundles = self.server.route_shares(self.shares)
        self.inputs = {
            u: np.zeros(d, dtype=np.uint32 if bits <= 32 else np.uint64) for u in range(n)
        }

    def mask(self) -> dict[int, MaskedInput]:
        return {u: self.clients[u].on_shares(m, self.inputs[u]) for u, m in self.bundles.items()}


# ------------------------------------------------------------------------- protocol correctness

SCENARIOS = {
    "none": {},
    "after_advertise": {Phase.SHARE_KEYS: 1},
    "after_share_keys": {Phase.MASKED_INPUT: 1},
    "after_masked_input": {Phase.UNMASKING: 1},
    "at_advertise": {Phase.ADVERTISE_KEYS: 1},
    "every_phase": {p: 1 for p in Phase},
}
GRAPHS = {
    # (n, k, t): SecAgg+ with even and odd k, and complete-graph SecAgg
    "secagg+_even_k": (25, 10, 6),
    "secagg+_odd_k": (24, 11, 6),
    "secagg+_odd_k_odd_n": (25, 11, 7),  # one client has k + 1 neighbours, so t > (k + 1) / 2
    "secagg_complete": (24, 23, 12),
}


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_unmasked_sum_is_exact_under_dropouts(graph: str, scenario: str) -> None:
    n, k, t = GRAPHS[graph]
    enc = FixedPointEncoder(bits=32, clip_range=2.0, num_clients=n)
    floats, encoded = _inputs(n, enc, seed=list(GRAPHS).index(graph) * 10 + len(scenario))
    rng = np.random.default_rng(len(scenario) * 7 + k)
    ids = rng.permutation(n).tolist()
    drop = {}
    for phase, count in SCENARIOS[scenario].items():
        drop[phase] = {ids.pop() for _ in range(count)}  # at most 4 in all: k - t >= 4 here
    server = SecAggServer(range(n), D, k=k, t=t)
    assert {len(nb) for nb in server.graph.values()} <= {k, k + 1}
    report = run_in_memory(server, encoded, drop)
    res = report.result
    excluded = set().union(*(drop.get(p, set()) for p in Phase if p is not Phase.UNMASKING))
    assert set(res.included) == set(range(n)) - excluded
    assert not report.client_errors
    assert np.array_equal(res.total.astype(np.uint64), _plain_sum(encoded, res.included, 32))
    decoded = enc.decode(res.total, len(res.included))
    plain = np.sum([floats[u] for u in res.included], axis=0)
    assert np.max(np.abs(decoded - plain)) <= enc.max_sum_error
    for phase in (Phase.ADVERTISE_KEYS, Phase.SHARE_KEYS, Phase.MASKED_INPUT):
        assert set(res.dropped.get(phase, ())) == drop.get(phase, set())


def test_random_dropouts_with_formula_parameters() -> None:
    n = 30
    p = choose_parameters(n, dropout=0.05)
    assert p.k < n - 1 and p.t >= p.k // 2 + 1
    enc = FixedPointEncoder(bits=32, clip_range=1.0, num_clients=n)
    _, encoded = _inputs(n, enc, seed=3)
    rng = np.random.default_rng(11)
    ids = rng.permutation(n).tolist()
    # about 10% in all, spread over the phases (k - t = 9 leaves room for any 4)
    drop = {
        Phase.SHARE_KEYS: {ids[0]},
        Phase.MASKED_INPUT: {ids[1], ids[2]},
        Phase.UNMASKING: {ids[3]},
    }
    report = run_in_memory(SecAggServer(range(n), D, k=p.k, t=p.t), encoded, drop)
    res = report.result
    assert len(res.included) == n - 3
    assert np.array_equal(res.total.astype(np.uint64), _plain_sum(encoded, res.included, 32))


@pytest.mark.parametrize("bits", [20, 40, 64])
def test_other_ring_sizes(bits: int) -> None:
    n = 9
    enc = FixedPointEncoder(bits=bits, clip_range=1.0, num_clients=n)
    floats, encoded = _inputs(n, enc, seed=bits)
    report = run_in_memory(
        SecAggServer(range(n), D, k=4, t=3, bits=bits), encoded, {Phase.MASKED_INPUT: {2}}
    )
    res = report.result
    assert np.array_equal(res.total.astype(np.uint64), _plain_sum(encoded, res.included, bits))
    plain = np.sum([floats[u] for u in res.included], axis=0)
    assert np.max(np.abs(enc.decode(res.total, len(res.included)) - plain)) <= enc.max_sum_error


def test_too_many_dropouts_names_client_and_phase() -> None:
    n, k, t = 12, 4, 3
    server = SecAggServer(range(n), D, k=k, t=t)
    victim_neighbours = set(server.graph[0][:2])
    enc = FixedPointEncoder(bits=32, clip_range=1.0, num_clients=n)
    _, encoded = _inputs(n, enc)
    with pytest.raises(TooManyDropoutsError, match="phase ShareKeys") as info:
        run_in_memory(server, encoded, {Phase.SHARE_KEYS: victim_neighbours})
    err = info.value
    assert err.phase is Phase.SHARE_KEYS and err.need == t
    assert len(set(server.graph[err.client]) - victim_neighbours) < t
    assert f"client {err.client}" in str(err)
    assert isinstance(err, MMShieldError)


# -------------------------------------------------------------------------------- uniformity


def _chi2_top_byte(values: np.ndarray) -> float:
    from scipy.stats import chisquare

    top = (values.astype(np.uint64) >> np.uint64(24)).astype(np.int64)
    counts = np.bincount(top, minlength=256)
    return float(chisquare(counts).pvalue)


def test_masked_update_is_uniform_and_input_is_not() -> None:
    pytest.importorskip("scipy")
    d = 20_000
    enc = FixedPointEncoder(bits=32, clip_range=1.0, num_clients=6)
    x = enc.encode(np.random.default_rng(0).normal(0, 0.1, d)).values
    # sanity: the test can fail: the plain encoding's top bytes are 0x00 or 0xFF
    assert _chi2_top_byte(x) < 1e-3
    # a false alarm has probability 1e-3 per try; a real bias fails every try
    for _attempt in range(2):
        st = _Stepper(6, 5, 3, d=d)
        st.inputs[0] = x
        y = st.mask()[0].masked
        p = _chi2_top_byte(y)
        if p > 1e-3:
            break
    assert p > 1e-3
    low = np.bincount((y & np.uint32(0xFF)).astype(np.int64), minlength=256)
    from scipy.stats import chisquare

    assert chisquare(low).pvalue > 1e-6


# -------------------------------------------------------------------------------- tampering


def test_tampered_share_ciphertext_is_rejected() -> None:
    st = _Stepper(8, 4, 3)
    u = 0
    bundle = st.bundles[u]
    v = next(iter(bundle.ciphertexts))
    ct = bytearray(bundle.ciphertexts[v])
    ct[20] ^= 0x01
    bad = ShareBundle(bundle.round_id, u, {**bundle.ciphertexts, v: bytes(ct)})
    with pytest.raises(ShareDecryptionError, match=f"from client {v}.*AES-GCM") as info:
        st.clients[u].on_shares(bad, st.inputs[u])
    assert info.value.sender == v and info.value.receiver == u
    # the client withdrew: it answers nothing more in this round
    with pytest.raises(ProtocolError, match="withdrew"):
        st.clients[u].on_shares(bundle, st.inputs[u])


def test_misrouted_share_ciphertext_is_rejected() -> None:
    """A valid ciphertext for another receiver fails too (AAD binds sender and receiver)."""
    st = _Stepper(8, 7, 4)
    b0, b1 = st.bundles[0], st.bundles[1]
    other = b1.ciphertexts[2]  # 2 -> 1, delivered to 0 as if 2 -> 0
    bad = ShareBundle(b0.round_id, 0, {**b0.ciphertexts, 2: other})
    with pytest.raises(ShareDecryptionError):
        st.clients[0].on_shares(bad, st.inputs[0])


def test_tampering_in_a_round_drops_the_receiver_and_keeps_the_sum_exact() -> None:
    n, k, t = 12, 6, 4
    server = SecAggServer(range(n), D, k=k, t=t)
    sender = server.graph[5][0]
    enc = FixedPointEncoder(bits=32, clip_range=1.0, num_clients=n)
    _, encoded = _inputs(n, enc)
    report = run_in_memory(server, encoded, tamper={(sender, 5): b"\x00" * 124})
    assert "AES-GCM" in report.client_errors[5] and set(report.client_errors) == {5}
    res = report.result
    assert 5 not in res.included and res.dropped[Phase.MASKED_INPUT] == (5,)
    assert np.array_equal(res.total.astype(np.uint64), _plain_sum(encoded, res.included, 32))


# ---------------------------------------------------------------------- lying about dropouts


def test_client_refuses_overlapping_survived_and_dropped() -> None:
    st = _Stepper(7, 6, 4)
    masked = st.mask()
    st.server.collect_masked(masked.values())
    others = [v for v in range(7) if v != 1]
    req = UnmaskRequest(st.server.round_id, 1, tuple(others), (0,))
    with pytest.raises(UnmaskRefusedError, match="both as survived and dropped"):
        st.clients[1].on_unmask(req)


def test_lying_server_cannot_get_both_secrets_of_a_client() -> None:
    """The server claims client 0 dropped (to get its key shares) to half its neighbours and
    that it survived (to get its self-mask shares) to the other half, then asks again."""
    n, k, t = 7, 6, 4  # complete graph: t = 4 > k / 2
    st = _Stepper(n, k, t)
    masked = st.mask()
    st.server.collect_masked(masked.values())  # client 0 did send its masked input
    rid = st.server.round_id
    b_shares, s_shares = {}, {}
    for w in range(1, n):
        rest = tuple(v for v in range(1, n) if v != w)
        if w <= 3:
            req = UnmaskRequest(rid, w, (0, *rest), ())
            b_shares[w] = st.clients[w].on_unmask(req).self_mask_shares[0]
        else:
            req = UnmaskRequest(rid, w, rest, (0,))
            s_shares[w] = st.clients[w].on_unmask(req).key_shares[0]
    # each side has 3 < t shares; asking the same clients for the other kind is refused
    for w in range(1, n):
        rest = tuple(v for v in range(1, n) if v != w)
        flip = (
            UnmaskRequest(rid, w, rest, (0,)) if w <= 3 else UnmaskRequest(rid, w, (0, *rest), ())
        )
        with pytest.raises(UnmaskRefusedError, match=r"already revealed the other kind"):
            st.clients[w].on_unmask(flip)
    # ... while a repeated consistent request is answered
    again = UnmaskRequest(rid, 1, (0, *[v for v in range(2, n)]), ())
    assert st.clients[1].on_unmask(again).self_mask_shares[0] == b_shares[1]

    def rebuild(shares: dict[int, bytes]) -> bytes | None:
        pts = np.array([[w + 1 for w in shares]])
        arr = np.stack([np.frombuffer(b, "<u4").astype(np.int64) for b in shares.values()])[None]
        try:
            return shamir.reconstruct_bytes(pts, arr, 32)[0]
        except SecAggError:
            return None

    assert rebuild(b_shares) != st.clients[0]._b_seed
    assert len(b_shares) < t and len(s_shares) < t


def test_unsafe_threshold_is_refused_by_server_and_client() -> None:
    with pytest.raises(SecAggError, match="unsafe"):
        SecAggServer(range(7), D, k=6, t=3)
    client = SecAggClient(0)
    setup = Setup(b"r" * 16, 0, 3, 32, D, (1, 2, 3, 4, 5, 6))
    with pytest.raises(ProtocolError, match="honest majority"):
        client.on_setup(setup)


def test_messages_round_trip_and_bad_bytes_are_refused() -> None:
    st = _Stepper(5, 4, 3)
    masked = st.mask()
    reqs = st.server.collect_masked(masked.values())
    resp = st.clients[1].on_unmask(reqs[1])
    msgs = [
        st.setups[0],
        st.adverts[0],
        st.broadcasts[0],
        st.shares[0],
        st.bundles[0],
        masked[0],
        reqs[1],
        resp,
    ]
    kinds = (Setup, AdvertiseKeys, KeyBroadcast, ShareKeys, ShareBundle, MaskedInput)
    assert all(isinstance(m, c) for m, c in zip(msgs, kinds, strict=False))
    for m in msgs:
        back = decode_message(m.to_bytes())
        assert type(back) is type(m) and back.to_bytes() == m.to_bytes()
        if not isinstance(m, MaskedInput):
            assert back == m
    assert np.array_equal(MaskedInput.from_bytes(masked[0].to_bytes()).masked, masked[0].masked)
    assert UnmaskResponse.from_bytes(resp.to_bytes()) == resp
    with pytest.raises(ProtocolError, match="truncated"):
        decode_message(masked[0].to_bytes()[:-3])
    with pytest.raises(ProtocolError, match="trailing"):
        decode_message(masked[0].to_bytes() + b"\0")
    with pytest.raises(ProtocolError, match="bad magic"):
        decode_message(b"XXXX" + masked[0].to_bytes()[4:])
    with pytest.raises(ProtocolError, match="expected a Setup"):
        Setup.from_bytes(masked[0].to_bytes())
    # the server refuses messages from another round and out-of-order steps
    st2 = _Stepper(5, 4, 3)
    with pytest.raises(ProtocolError, match="another round"):
        st2.server.collect_masked([MaskedInput(b"x" * 16, 0, masked[0].masked)])
    with pytest.raises(ProtocolError, match="out of order"):
        st2.server.setup()


# -------------------------------------------------------------------------------- encoding


def test_overflow_prone_configuration_is_refused() -> None:
    with pytest.raises(SecAggConfigError, match=r"bits >= \d+.*clip_range <=.*scale <=") as info:
        FixedPointEncoder(bits=16, clip_range=8.0, num_clients=100, scale=1024)
    assert "wrap around" in str(info.value)
    with pytest.raises(SecAggConfigError):
        FixedPointEncoder(bits=8, clip_range=1.0, num_clients=1000)  # not even 1 level fits
    enc = FixedPointEncoder(bits=32, clip_range=8.0, num_clients=100)
    assert enc.num_clients * enc.q_max <= 2**31 - 1
    # the auto scale is the finest power of two that fits: doubling it would overflow
    with pytest.raises(SecAggConfigError):
        FixedPointEncoder(bits=32, clip_range=8.0, num_clients=100, scale=2 * enc.scale)


def test_out_of_range_values_are_counted_and_extremes_sum_exactly() -> None:
    n = 50
    enc = FixedPointEncoder(bits=24, clip_range=1.0, num_clients=n)
    x = np.array([0.5, -3.0, 2.0, 1.0, -1.0, np.float64(1.0000001)])
    out = enc.encode(x)
    assert out.clipped == 3
    total = np.zeros(len(x), dtype=np.uint32)
    for _ in range(n):  # n worst-case values: no wrap-around
        total = (total + out.values) & np.uint32((1 << 24) - 1)
    decoded = enc.decode(total, n)
    assert np.allclose(decoded, n * np.clip(x, -1, 1), atol=enc.max_sum_error)
    with pytest.raises(SecAggError, match="non-finite"):
        enc.encode(np.array([0.0, np.nan]))
    with pytest.raises(SecAggError, match="overflowed"):
        enc.decode(total, n + 1)


@pytest.mark.parametrize("bits", [20, 32, 40])
def test_float32_updates_encode_exactly_as_their_float64_values(bits: int) -> None:
    enc = FixedPointEncoder(bits=bits, clip_range=1.0, num_clients=30)
    rng = np.random.default_rng(bits)
    x = (rng.normal(0, 0.5, 5000) * rng.choice([0.001, 1.0, 4.0], 5000)).astype(np.float32)
    x[:4] = [1.0, -1.0, np.nextafter(np.float32(1.0), np.float32(2.0)), 2.0**-140]
    a, b = enc.encode(x), enc.encode(x.astype(np.float64))
    assert a.clipped == b.clipped > 0
    assert a.values.dtype == b.values.dtype and np.array_equal(a.values, b.values)
    inside = np.clip(x, -0.9, 0.9)
    a, b = enc.encode(inside), enc.encode(inside.astype(np.float64))
    assert a.clipped == b.clipped == 0 and np.array_equal(a.values, b.values)
    # a clip range that float32 cannot hold exactly takes the float64 route: still identical
    enc = FixedPointEncoder(bits=bits, clip_range=0.1, num_clients=30)
    a, b = enc.encode(x), enc.encode(x.astype(np.float64))
    assert a.clipped == b.clipped and np.array_equal(a.values, b.values)
    with pytest.raises(SecAggError, match="non-finite"):
        enc.encode(np.array([0.0, np.inf], dtype=np.float32))


# -------------------------------------------------------------------------------- k, t, graph


@pytest.mark.parametrize("n,k", [(10, 4), (10, 5), (11, 4), (11, 5), (11, 10), (12, 11), (7, 2)])
def test_harary_graph_even_and_odd_k(n: int, k: int) -> None:
    ring = harary_neighbours(n, k)
    dmin, dmax = degrees(n, k)
    degs = [len(nb) for nb in ring]
    assert min(degs) == dmin and max(degs) == dmax and dmin == min(k, n - 1)
    assert sum(d == k + 1 for d in degs) == (1 if n % 2 and k % 2 and k < n - 1 else 0)
    for i, nb in enumerate(ring):
        assert i not in nb and all(i in ring[j] for j in nb)
    g = neighbour_graph(list(range(100, 100 + n)), k)
    assert set(g) == set(range(100, 100 + n))
    assert all(u in g[v] for u in g for v in g[u])


def test_graph_order_is_random() -> None:
    graphs = {tuple(sorted(neighbour_graph(list(range(40)), 6).items())) for _ in range(3)}
    assert len(graphs) == 3


def test_threshold_formula() -> None:
    p = choose_parameters(100, dropout=0.1)
    assert p.t >= p.k // 2 + 1 and p.k < 99
    assert p.log2_failure <= -20 and p.log2_privacy_failure <= -20
    assert 10 <= p.k <= 4 * math.log2(100) * 2  # O(log n)
    # smaller k would miss the target
    _, dmax = degrees(100, p.k - 1)
    assert assess(100, p.k - 1, dmax // 2 + 1, 0.1).log2_failure > -20
    big = choose_parameters(10_000, dropout=0.1)
    assert big.k < 3 * p.k  # grows like log n
    colluding = choose_parameters(100, dropout=0.1, collusion=0.1)
    assert colluding.t > colluding.k // 2 + 1
    assert choose_parameters(20, dropout=0.01).t >= choose_parameters(20, 0.01).k // 2 + 1
    with pytest.raises(SecAggConfigError, match="best found is k=99"):
        choose_parameters(100, dropout=0.3)


def _failures(n: int, k: int, t: int, dropout: float, graphs: int, rounds: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    bad = 0
    # The ring order is drawn from ``secrets`` (unseeded), so the graph here is the unpermuted
    # Harary graph: with i.i.d. dropouts a relabelling does not change the failure distribution,
    # and a fixed graph keeps this test deterministic (the formula allows ~0.03 expected failures
    # in 20,000 rounds, which a random graph occasionally realises).
    adj = np.zeros((n, n), dtype=np.int32)
    for u, nb in enumerate(harary_neighbours(n, k)):
        adj[u, list(nb)] = 1
    for _ in range(graphs):
        alive = (rng.random((rounds, n)) >= dropout).astype(np.int32)
        kept = alive @ adj  # surviving neighbours of every client, every round
        bad += int(np.any(kept < t, axis=1).sum())
    return bad


def test_survivors_keep_threshold_neighbours_at_declared_dropout() -> None:
    n, dropout = 100, 0.1
    p = choose_parameters(n, dropout=dropout)
    # 20,000 simulated rounds; the formula promises failure <= 2^-20 per round
    assert _failures(n, p.k, p.t, dropout, graphs=10, rounds=2000, seed=1) == 0
    # sanity: the simulation does catch a bad choice (Flower's k = 13, t = 7 at 30% dropout)
    assert _failures(n, 13, 7, 0.3, graphs=2, rounds=500, seed=2) > 50
    odd = choose_parameters(99, dropout=dropout)
    assert _failures(99, odd.k, odd.t, dropout, graphs=4, rounds=1000, seed=3) == 0
    # at a loose target the observed failure rate stays under the (union) bound
    loose = choose_parameters(n, dropout=dropout, failure_bits=6)
    observed = _failures(n, loose.k, loose.t, dropout, graphs=10, rounds=2000, seed=4) / 20_000
    assert observed <= 2.0**loose.log2_failure


# -------------------------------------------------------------------------------- primitives


def test_shamir_any_t_of_n_and_not_t_minus_1() -> None:
    rng = np.random.default_rng(0)
    n, t, m = 12, 5, 40
    secrets_ = shamir.random_field((m, 11))
    points = np.arange(1, n + 1) * 7919  # arbitrary distinct points
    shares = shamir.split(secrets_, points, t)
    assert shares.shape == (n, m, 11)
    for _ in range(10):
        pick = rng.choice(n, size=t, replace=False)
        pts = np.broadcast_to(points[pick], (m, t))
        got = shamir.reconstruct(pts, shares[pick].transpose(1, 0, 2))
        assert np.array_equal(got, secrets_)
        more = rng.choice(n, size=t + 2, replace=False)
        got = shamir.reconstruct(
            np.broadcast_to(points[more], (m, t + 2)), shares[more].transpose(1, 0, 2)
        )
        assert np.array_equal(got, secrets_)
        few = pick[: t - 1]
        wrong = shamir.reconstruct(
            np.broadcast_to(points[few], (m, t - 1)), shares[few].transpose(1, 0, 2)
        )
        assert np.mean(wrong == secrets_) < 0.01
    # bytes round trip, with the vectorised Lagrange checked against a plain-Python oracle
    data = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(3)]
    bshares = shamir.split_bytes(data, points, t)
    assert (
        shamir.reconstruct_bytes(
            np.broadcast_to(points[:t], (3, t)), bshares[:t].transpose(1, 0, 2), 32
        )
        == data
    )
    xs = [int(v) for v in points[:t]]
    lam = [
        math.prod(xj for xj in xs if xj != xi)
        * pow(math.prod(xj - xi for xj in xs if xj != xi), -1, shamir.P)
        % shamir.P
        for xi in xs
    ]
    assert shamir.lagrange_at_zero(np.array([xs])).tolist() == [lam]
    with pytest.raises(SecAggError):
        shamir.reconstruct_bytes(
            np.broadcast_to(points[: t - 1], (3, t - 1)), bshares[: t - 1].transpose(1, 0, 2), 32
        )


def test_threaded_mask_expansion_gives_the_same_words() -> None:
    dim = 1 << 20  # 6 seeds x 1M words: above the threading threshold
    # the last seed's counter wraps around 2^128 inside the vector
    seeds = [bytes([i]) * 32 for i in range(5)] + [bytes(16) + b"\xff" * 16]
    signs = [1, -1, 1, 1, -1, 1]
    exp = MaskExpander(dim, 32)
    start = exp.expand(bytes(range(32)))
    one, three = start.copy(), start.copy()
    exp.add_many(one, seeds, signs, threads=1)
    exp.add_many(three, seeds, signs, threads=3)
    assert np.array_equal(one, three) and not np.array_equal(one, start)


def test_prg_is_aes_ctr_and_reduced_mod_2_bits() -> None:
    seed = bytes(range(32))
    ref = Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor().update(bytes(400))
    assert np.array_equal(expand(seed, 100, 32), np.frombuffer(ref, "<u4"))
    assert np.array_equal(expand(seed, 100, 20), np.frombuffer(ref, "<u4") & np.uint32(2**20 - 1))
    assert not np.array_equal(expand(seed, 100, 32), expand(bytes(32), 100, 32))
    assert expand(seed, 50, 40).dtype == np.uint64
    exp = MaskExpander(100, 32)
    acc = np.zeros(100, dtype=np.uint32)
    exp.add_many(acc, [seed, seed, bytes(32)], [1, -1, 1])
    assert np.array_equal(acc, expand(bytes(32), 100, 32))
    # longer than one keystream chunk (256 KiB) and not a whole number of chunks or blocks
    for dim, bits, word in ((150_001, 32, "<u4"), (40_003, 64, "<u8")):
        nbytes = dim * np.dtype(word).itemsize
        ref = (
            Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:]))
            .encryptor()
            .update(bytes(nbytes))
        )
        stream = np.frombuffer(ref, word)
        assert np.array_equal(expand(seed, dim, bits), stream)
        exp = MaskExpander(dim, bits)
        x = np.arange(dim, dtype=stream.dtype)
        assert np.array_equal(exp.masked(x, seed), x + stream)
        acc = x.copy()
        exp.add(acc, seed, -1)
        assert np.array_equal(acc, x - stream)
