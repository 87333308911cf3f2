"""Encrypted aggregation (mmshield.crypto.ckks): exact sums, no secret key on the server, clear
errors for ciphertexts from another key, other parameters or of the wrong size, refused
overflow-prone configurations, counted clipping, and the packing and serialisation underneath.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import struct

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi

from mmshield.crypto import ckks
from mmshield.crypto.ckks import (
    SECURITY_BOUNDS_TC128,
    Aggregator,
    EncryptedUpdate,
    HEConfigError,
    HEParams,
    KeyHolder,
    UpdateEncryptor,
)
from mmshield.errors import ConfigError, EncryptionError, MMShieldError

N_CLIENTS = 10
D = 100_000
CLIP = 1.0


def realistic_updates(n: int, d: int, seed: int = 0) -> list[np.ndarray]:
    """float32 model updates: 24 "layers" whose scales span 1e-4..1e-2, Student-t(5) tails, and
    a direction shared by all clients plus each client's own part (like real FL updates)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, d), size=23, replace=False))
    sizes = np.diff(np.concatenate([[0], cuts, [d]]))
    scale = np.repeat(10.0 ** rng.uniform(-4, -2, sizes.size), sizes)
    shared = rng.standard_t(5, d)
    return [(scale * (0.5 * shared + rng.standard_t(5, d))).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def params() -> HEParams:
    return HEParams.choose(N_CLIENTS, CLIP)


@pytest.fixture(scope="module")
def holder(params: HEParams) -> KeyHolder:
    return KeyHolder(params)


@pytest.fixture(scope="module")
def public(holder: KeyHolder) -> bytes:
    return holder.public_context()


@pytest.fixture(scope="module")
def encryptor(public: bytes) -> UpdateEncryptor:
    return UpdateEncryptor(public)


@pytest.fixture(scope="module")
def updates() -> list[np.ndarray]:
    return realistic_updates(N_CLIENTS, D)


@pytest.fixture(scope="module")
def encrypted(encryptor: UpdateEncryptor, updates: list[np.ndarray]) -> dict[str, bytes]:
    out = {}
    for i, x in enumerate(updates):
        e = encryptor.encrypt(x, client=f"c{i}")
        assert e.clipped == 0  # the workload lies inside the clip range
        out[f"c{i}"] = e.to_bytes()
    return out


# ------------------------------------------------------------------------------ end to end


def test_decrypted_aggregate_equals_plaintext_sum(
    params: HEParams, holder: KeyHolder, public: bytes, updates, encrypted
) -> None:
    agg = Aggregator(public, num_params=D)
    aggregate = agg.sum(encrypted)
    assert aggregate.count == N_CLIENTS and agg.clients == list(encrypted)
    total = holder.decrypt(aggregate.to_bytes())
    exact = np.sum([x.astype(np.float64) for x in updates], axis=0)
    rel = np.linalg.norm(total - exact) / np.linalg.norm(exact)
    assert rel <= 1e-6, rel
    assert np.abs(total - exact).max() <= params.max_sum_error
    # Exactness of the encrypted arithmetic: the decryption is the sum of the quantised values.
    quantised = np.sum([np.rint(x.astype(np.float64) * params.scale) for x in updates], axis=0)
    np.testing.assert_array_equal(total * params.scale, quantised)
    # Not trivially small: the sums are of the order of the updates.
    assert np.abs(exact).max() > 1e-2


def test_update_is_at_most_ten_bytes_per_parameter(params: HEParams, encrypted) -> None:
    size = len(next(iter(encrypted.values())))
    assert size == params.update_bytes(D)
    assert params.bytes_per_param <= 10.0
    assert params.update_bytes(1_000_000) / 1_000_000 <= 10.0
    # 128-bit security: total modulus bits within the HE standard's bound, as SEAL enforces.
    used, bound = params.security_bits_used
    assert used <= bound == SECURITY_BOUNDS_TC128[4096] == 109
    assert used <= sealapi.CoeffModulus.MaxBitCount(4096, sealapi.SEC_LEVEL_TYPE.TC128)


def test_server_and_clients_hold_no_secret_key(holder: KeyHolder, public: bytes) -> None:
    agg = Aggregator(public)
    enc = UpdateEncryptor(public)
    for ctx in (agg.context, enc.context):
        assert ctx.has_secret_key() is False
        assert ctx.is_private() is False and ctx.is_public() is True
        with pytest.raises(ValueError, match="doesn't hold a Secret key"):
            ctx.secret_key()
    # The raw TenSEAL payload of the public context is public too.
    head = 9 + struct.unpack_from("<I", public, 5)[0]
    assert ts.context_from(public[head:]).has_secret_key() is False
    # The key holder's own context does hold it (the assertions above could fail).
    assert holder._context.has_secret_key() is True


def test_context_with_secret_key_is_refused(params: HEParams, holder: KeyHolder) -> None:
    secret_blob = holder._context.serialize(save_secret_key=True)
    meta = holder.public_context()[: 9 + struct.unpack_from("<I", holder.public_context(), 5)[0]]
    leaked = meta + secret_blob
    for cls in (Aggregator, UpdateEncryptor):
        with pytest.raises(EncryptionError, match="holds the secret key"):
            cls(leaked)


def test_numpy_addition_equals_seal_addition(public: bytes, holder: KeyHolder, encrypted) -> None:
    """The server adds ciphertexts in NumPy; the result is SEAL's Evaluator.add, bit for bit."""
    a, b = (EncryptedUpdate.from_bytes(x) for x in list(encrypted.values())[:2])
    agg = Aggregator(public)
    agg.add(a)
    agg.add(b)
    ours = agg.result()
    q = holder.params.data_prime
    files = holder._files
    seal = holder._context.seal_context().data
    evaluator = sealapi.Evaluator(seal)
    for i in (0, a.num_ciphertexts - 1):
        ca = files.load(ckks._restore_c0(a, q, "a")[i], a.c1[i])
        cb = files.load(ckks._restore_c0(b, q, "b")[i], b.c1[i])
        evaluator.add_inplace(ca, cb)
        got = files.extract(ca)
        np.testing.assert_array_equal(got[0], ours.c0[i])
        np.testing.assert_array_equal(got[1], ours.c1[i])


def test_key_holder_round_trip_keeps_keys(holder: KeyHolder, encrypted) -> None:
    restored = KeyHolder.from_bytes(holder.to_bytes())
    assert restored.fingerprint == holder.fingerprint
    assert restored.public_context() == holder.public_context()
    one = next(iter(encrypted.values()))
    np.testing.assert_array_equal(restored.decrypt(one), holder.decrypt(one))


# -------------------------------------------------------------------------- refused inputs


def test_update_from_another_key_holder_is_refused(params: HEParams, public: bytes) -> None:
    other = KeyHolder(params)  # same parameters, another key pair
    stranger = UpdateEncryptor(other.public_context()).encrypt(np.zeros(1000))
    agg = Aggregator(public)
    with pytest.raises(EncryptionError, match=r"client mallory's update was encrypted under anoth"):
        agg.add(stranger.to_bytes(), client="mallory")
    with pytest.raises(EncryptionError, match="another key or context"):
        KeyHolder(params).decrypt(stranger)  # a key holder refuses it too


def test_update_under_other_parameters_is_refused(public: bytes, holder: KeyHolder) -> None:
    other = KeyHolder(HEParams.choose(5, 0.5))
    foreign = UpdateEncryptor(other.public_context()).encrypt(np.zeros(1000))
    with pytest.raises(EncryptionError, match="another key or context"):
        Aggregator(public).add(foreign, client=3)
    # Same key material but a forged header claiming our fingerprint: the size check catches a
    # ciphertext count that does not match the claimed length.
    forged = EncryptedUpdate.from_bytes(foreign.to_bytes())
    forged.fingerprint = holder.fingerprint
    forged.num_params = 50_000
    with pytest.raises(EncryptionError, match="carries 1 ciphertexts for 50,000 parameters"):
        Aggregator(public).add(forged, client=4)


def test_wrong_size_and_truncated_updates_are_refused(
    encryptor: UpdateEncryptor, public: bytes, encrypted
) -> None:
    agg = Aggregator(public, num_params=D)
    short = encryptor.encrypt(np.zeros(D - 1, dtype=np.float32))
    with pytest.raises(EncryptionError, match=r"client 7's update has 99,999 parameters"):
        agg.add(short.to_bytes(), client=7)
    good = encrypted["c0"]
    with pytest.raises(EncryptionError, match="truncated or corrupted in transit"):
        agg.add(good[:-1], client="c0")
    with pytest.raises(EncryptionError, match="truncated or corrupted in transit"):
        agg.add(good + b"\0", client="c0")
    with pytest.raises(EncryptionError, match="not an mmshield encrypted update"):
        agg.add(b"\x00" * 100, client="c0")
    with pytest.raises(EncryptionError, match="not an mmshield public context"):
        Aggregator(b"garbage")
    # The aggregator's state is untouched by the refused updates.
    assert agg.count == 0
    agg.add(good, client="c0")
    with pytest.raises(EncryptionError, match="already added"):
        agg.add(good, client="c0")


def test_more_clients_than_configured_are_refused(
    encryptor: UpdateEncryptor, public: bytes
) -> None:
    agg = Aggregator(public)
    update = encryptor.encrypt(np.zeros(100)).to_bytes()
    for i in range(N_CLIENTS):
        agg.add(update, client=i)
    with pytest.raises(EncryptionError, match="at most 10 per aggregate"):
        agg.add(update, client=N_CLIENTS)


def test_corrupt_aggregate_is_detected(holder: KeyHolder, public: bytes, encrypted) -> None:
    aggregate = Aggregator(public).sum(list(encrypted.values())[:3])
    aggregate.c1[0, :] = aggregate.c1[1, :]  # a ciphertext that decrypts to garbage
    with pytest.raises(EncryptionError, match="outside the range"):
        holder.decrypt(aggregate)
    aggregate.c1[0, 0] = holder.params.data_prime  # not below the modulus
    with pytest.raises(EncryptionError, match="not below the modulus"):
        holder.decrypt(aggregate)
    with pytest.raises(EncryptionError, match="fewer than min_count"):
        holder.decrypt(Aggregator(public).sum(list(encrypted.values())[:1]), min_count=2)


def test_overflow_prone_configurations_are_refused() -> None:
    with pytest.raises(HEConfigError, match=r"would wrap around\. Fix one of: scale <="):
        HEParams.choose(10, 1.0, scale=2.0**45)
    with pytest.raises(HEConfigError, match="every value would encode to 0"):
        HEParams.choose(10, 1.0, scale=0.25)
    with pytest.raises(HEConfigError, match="over the budget"):
        HEParams.choose(10, 1.0, scale=2.0**40 / 2**10, max_bytes_per_param=10)
    with pytest.raises(HEConfigError, match="num_clients"):
        HEParams.choose(0, 1.0)
    with pytest.raises(HEConfigError, match="clip_range"):
        HEParams.choose(10, math.nan)
    assert issubclass(HEConfigError, ConfigError) and issubclass(HEConfigError, MMShieldError)
    # The finest scale is chosen up to the edge: one bit more and the sum would not fit.
    p = HEParams.choose(10, 1.0)
    assert p.bytes_per_param <= 10
    assert HEParams.choose(10, 1.0, scale=2 * p.scale).bytes_per_param > 10


def test_out_of_range_values_are_counted_not_hidden(
    encryptor: UpdateEncryptor, holder: KeyHolder
) -> None:
    x = np.linspace(-0.5, 0.5, 1000)
    x[[3, 500, 999]] = [2.0, -7.0, 1.5]
    e = encryptor.encrypt(x)
    assert e.clipped == 3
    assert EncryptedUpdate.from_bytes(e.to_bytes()).clipped is None  # not sent to the server
    out = holder.decrypt(e)
    np.testing.assert_allclose(out[[3, 500, 999]], [1.0, -1.0, 1.0])
    x[10] = np.nan
    with pytest.raises(EncryptionError, match=r"1 non-finite value\(s\) \(first at index 10\)"):
        encryptor.encrypt(x, client=2)
    with pytest.raises(EncryptionError, match="empty update"):
        encryptor.encrypt(np.zeros(0))


# ---------------------------------------------------------------------- packing and noise


@pytest.mark.parametrize("num_clients", [1, 3, 10, 100])
def test_packing_holds_extreme_sums_exactly(num_clients: int) -> None:
    p = HEParams.choose(num_clients, 1.0)
    lay = p.layout
    assert lay.values >= lay.slots  # never fewer than one value per slot
    u_max = 2 * p.q_max
    for d, fill in itertools.product((3 * lay.values, 3 * lay.values + 1), (0, u_max, None)):
        u = (
            np.random.default_rng(1).integers(0, u_max + 1, d, dtype=np.uint64)
            if fill is None
            else np.full(d, fill, dtype=np.uint64)
        )
        slots = ckks._pack_slots(p, u)
        total = slots * np.uint64(num_clients)  # n clients all sending the extreme
        assert int(total.max()) < p.plain_modulus  # never reaches t: no wrap-around
        out = ckks._unpack_slots(p, total, d, num_clients)
        expect = (u.astype(np.float64) - p.q_max) * num_clients / p.scale
        np.testing.assert_array_equal(out, expect)


def test_plain_modulus_respects_noise_bound_and_security(params: HEParams) -> None:
    q, t = params.data_prime, params.plain_modulus
    assert q.bit_length() == 60 and t % (2 * 4096) == 1
    assert sealapi.Modulus(t).is_prime()
    assert 2 * params.noise_bound + 2 <= q / t
    # 10 clients, 2^-64 failure per coefficient: the Hoeffding bound stays near 2^10.
    assert 2**9 < params.noise_bound < 2**11
    # More clients, more noise: a smaller plaintext modulus.
    assert HEParams.choose(1000, 1.0).plain_modulus < t


def test_scaled_plaintext_is_within_three_quarters(params: HEParams) -> None:
    q, t = params.data_prime, params.plain_modulus
    m = np.concatenate(
        [np.arange(50, dtype=np.uint64), np.uint64(t) - np.arange(1, 51, dtype=np.uint64)]
    )
    m = np.concatenate([m, np.random.default_rng(0).integers(0, t, 5000, dtype=np.uint64)])
    got = ckks._scale_plain(m, q, t)
    exact = [(q * int(v) + t // 2) // t for v in m]
    assert max(abs(int(g) - e) for g, e in zip(got, exact, strict=True)) <= 1
    assert all(int(g) < q for g in got)


@pytest.mark.parametrize("width", [1, 7, 49, 54, 55, 60, 64])
def test_bit_packing_round_trips(width: int) -> None:
    rng = np.random.default_rng(width)
    for count in (1, 5, 4097):
        v = rng.integers(0, 2 ** min(width, 63), count, dtype=np.uint64)
        if width == 64:
            v[0] = np.uint64(2**64 - 1)
        blob = ckks._pack_bits(v, width)
        assert len(blob) == (count * width + 7) // 8
        np.testing.assert_array_equal(ckks._unpack_bits(blob, width, count), v)


def test_fresh_ciphertext_noise_leaves_budget(params: HEParams, holder: KeyHolder) -> None:
    """SEAL's own noise measure agrees that a 10-client sum keeps a positive budget."""
    enc = UpdateEncryptor(holder.public_context())
    agg = Aggregator(holder.public_context())
    for _ in range(N_CLIENTS):
        agg.add(enc.encrypt(np.zeros(4096)))
    aggregate = agg.result()
    ct = holder._files.load(aggregate.c0[0], aggregate.c1[0])
    assert holder._decryptor.invariant_noise_budget(ct) >= 1


def test_extraction_falls_back_when_seal_compresses(
    monkeypatch: pytest.MonkeyPatch, holder: KeyHolder
) -> None:
    """If zstd ever compresses a ciphertext block, coefficients are read one by one instead."""
    enc = UpdateEncryptor(holder.public_context())
    x = np.linspace(-0.1, 0.1, 5000)
    expected = holder.decrypt(enc.encrypt(x))
    monkeypatch.setattr(ckks, "_seal_body", lambda blob: None)
    e = enc.encrypt(x)
    assert enc._files.fallbacks == e.num_ciphertexts
    np.testing.assert_array_equal(holder.decrypt(e), expected)


def test_tampered_parameters_are_refused(params: HEParams) -> None:
    greedy = dataclasses.replace(
        params, plain_modulus=ckks._plain_modulus(1, 4096, params.data_prime, (), 0)
    )
    with pytest.raises(HEConfigError, match="too little noise room"):
        greedy.validate()
    insecure = dataclasses.replace(params, coeff_mod_bit_sizes=(60, 60))
    with pytest.raises(HEConfigError, match="exceeds the 128-bit bound"):
        insecure.validate()
    with pytest.raises(HEConfigError, match="too little noise room"):
        KeyHolder(greedy)
