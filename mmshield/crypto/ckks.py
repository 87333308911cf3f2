"""Encrypted aggregation of model updates on TenSEAL (Microsoft SEAL): small, fast ciphertexts.

A designated **key holder** generates a key pair and hands out a *public context* (parameters and
public key, never the secret key). **Clients** quantise their update, pack it densely and encrypt
it with the public key; the **server** adds ciphertexts without being able to read them; the key
holder decrypts only the sum::

    key holder                  clients                       server
    KeyHolder(params)
    public_context() ------->   UpdateEncryptor(ctx)          Aggregator(ctx)
                                encrypt(update) --bytes-->    add(update) ... result()
    decrypt(aggregate) <---------------------------------------- aggregate bytes

Why hand-written code around TenSEAL: the straightforward TenSEAL recipe (ANCHORS.md: CKKS,
N = 8192, moduli [60, 40, 40, 60], one ``ckks_vector`` per 4,096 floats) costs 81 bytes of
ciphertext and 2.7 µs of encryption per parameter, 20x the float32 update. Addition needs no
multiplicative depth, rotations or approximate arithmetic, so this module keeps only what
addition needs and spends every ciphertext bit on payload: fixed-point quantisation, several
values per plaintext slot, the smallest sound modulus chain, and a bit-packed serialisation.

Scheme: BFV, not CKKS (the public names are scheme-neutral)
-----------------------------------------------------------
A fixed-point update is a vector of integers and its sum must be exact, so BFV's exact integer
arithmetic fits: at the same ciphertext size (``2 N log2 q`` bits) a BFV plaintext holds ``N``
integers mod ``t`` (``t`` up to 2^60), while CKKS holds ``N / 2`` approximate reals (``N`` with
complex packing), whose noise is amplified by the canonical embedding (about ``sqrt(N)``, 6 bits
here) and whose decoding goes through a double-precision FFT that cannot return integers above
2^53 exactly. Packing integers into CKKS slots would lose bits to both; BFV loses neither. The
values are the plaintext polynomial's coefficients (no batching transform: ciphertext addition
adds coefficients). The module keeps the file name ``ckks.py`` the design gave it.

Parameters and the 128-bit bound
--------------------------------
``N = 4096``, coefficient modulus ``[60, 49]`` bits: a 60-bit data prime ``q`` and a 49-bit
special prime ``p`` (109 bits in all). The HE standard's (homomorphicencryption.org, 2018) bounds
for 128-bit classical security with ternary secrets, which SEAL enforces (``sec_level tc128``;
checked again here with ``CoeffModulus.MaxBitCount``):

    =========  =======  =======  =======  =======  ========  ========
    N           1024     2048     4096     8192     16384     32768
    max log q   27       54       109      218      438       881
    =========  =======  =======  =======  =======  ========  ========

``N = 4096`` is the smallest ring with a 60-bit data prime (SEAL's largest) plus a special prime.
Ciphertexts live at the data level (mod ``q`` only), so they carry 60 bits per coefficient; ``p``
never travels but divides the public-key encryption noise away: SEAL encrypts at ``q p`` and
switches down to ``q``, leaving only the rounding noise ``r0 + r1 s`` (``r0, r1`` uniform in
``[-1/2, 1/2]``, ``s`` the ternary secret; a standard deviation of about ``sqrt(N / 18) = 15``).
A larger ``N`` only adds noise (``sqrt N``); a second data prime doubles the ciphertext while SEAL
caps ``t`` at 60 bits; ``N = 2048`` allows one 54-bit prime and no special prime (noise 2^8).

Noise budget and the plaintext modulus ``t``. Summing ``n`` ciphertexts adds their noise. The
random part is a sum of ``n (1 + ||s||_1)`` independent rounding terms of range 1 (``||s||_1 <=
N``) and, for compressed ``c0`` (below), ``n`` terms of range ``2^k``; by Hoeffding's inequality it
exceeds ``x = sqrt(n (N + 1 + 4^k) ln(2 / delta) / 2)`` with probability at most ``delta = 2^-64``
per coefficient. The deterministic part (rounding of the scaled message, at most 3/4, and the
key-level noise divided by ``p``, below 2^-30) adds ``n (3/4 + 2^-30)``. Decryption is exact while
the noise stays below ``q / (2 t)``, so ``t`` is the largest prime ``= 1 mod 2N`` (TenSEAL's
contexts require a batching prime) with ``t <= q / (2 (x + n (3/4 + 2^-30)) + 2)``: about 2^48.9
for ``n = 10`` and ``k = 5`` (:attr:`HEParams.noise_bound`; SEAL's ``invariant_noise_budget`` of
such a 10-client sum measures 2 bits to spare).

Packing and encryption: bytes per parameter
-------------------------------------------
1. **Quantise** each value to ``round(x * scale)``, clipped to ``[-c, c]`` (``c = clip_range``;
   clipped values are counted, never silently), and offset it to ``u in [0, U]``, ``U = 2 q_max``,
   ``q_max = floor(c * scale + 1/2)``. The sum of ``n`` offsets fits in ``[0, n U]``.
2. **Pack** values into plaintext coefficients ("slots") in mixed radix: a slot holds fields
   ``f_0 + R_0 (f_1 + R_1 (...))`` whose radices ``R_i = n * max(f_i) + 1`` leave room for the sum
   of ``n`` clients, so adding ciphertexts never carries between fields while ``prod R_i <= t``.
   A value that does not fit whole in what is left of a slot is split: its low bits fill the
   slot and its high bits open the next one (each piece pays its own headroom, ``log2 n`` bits).
   The layout repeats every ``r`` slots holding ``m`` values (:class:`PackingLayout`, chosen
   greedily for the best ``m / r``): for ``n = 10`` and 29-bit offsets, 3 values in 2 slots.
3. **Encrypt**: SEAL encrypts zero under the public key (``Encryptor.encrypt_zero``, its own
   randomness) and the client adds the scaled plaintext ``round(q m / t)`` to ``c0`` in NumPy;
   that is BFV encryption, minus SEAL's batch encoding and per-coefficient 128-bit division.
4. **Serialise** ``c1`` in 60 bits per coefficient and ``c0`` without its ``k`` low bits
   (Kyber-style ciphertext compression: rounding ``c0`` adds at most ``2^(k-1)`` to the noise
   directly, and the budget above counts it; ``c1`` is multiplied by ``s`` when decrypting, so it
   is sent whole). SEAL's own serialisation stores 64-bit words and its zstd pass cannot shrink
   uniform 60-bit words (16 bytes per slot, measured), hence the bit packing. (TenSEAL's
   ``sealapi`` moves ciphertexts only through files: :class:`_SealFiles`.)

Bytes per parameter ``= (60 + 60 - k) / 8 * r / m`` plus a 44-byte header per update. For
``n = 10`` and ``c = 1``, :meth:`HEParams.choose` picks ``scale = 2^27`` and ``k = 5``:
``14.375 * 2 / 3 = 9.58`` bytes per parameter, against 81 for the straightforward recipe and 4 for
float32 plaintext. It picks ``scale`` as the finest power of two whose packing fits a byte budget
(10 by default) and ``k`` as the cheapest for that scale; :attr:`HEParams.bytes_per_param`
states the result. Without splitting values (one per slot) it would be 14.4 bytes.

Encryption time: SEAL's public-key ``encrypt_zero`` (about 1 ms per 4,096 slots here) is most of
it; the rest is NumPy (quantise, pack, scale, bit-pack) and moving coefficients out of SEAL.
Encryptions of zero do not depend on the update and could be made ahead of time (not done here).

Precision: each value is rounded by at most ``1 / (2 scale)``, so the decrypted sum of ``n``
unclipped updates is within ``n / (2 scale)`` of the float sum (:attr:`HEParams.max_sum_error`):
for ``c = 1`` and ``scale = 2^27``, ``3.7e-8`` per value; the relative L2 error on independent
updates with RMS ``sigma`` is about ``1 / (sqrt(12) scale sigma)``, below 1e-6 for ``sigma >=
2.2e-3 c`` (a clip range up to about 460x the updates' RMS).

Threat model: who must not collude with the server
--------------------------------------------------
- **The key holder must not collude with the server.** It holds the only secret key: with the
  server's ciphertexts it reads every client's update. It must also decrypt only genuine
  aggregates and publish only their result. The count in an aggregate is the server's word: the
  server holds the public key, so it can pad one client's ciphertext with its own encryptions of
  zeros and present that as a sum. So the server must follow the protocol (honest-but-curious,
  as in DESIGN.md), or the updates must carry their own protection (client-level DP noise, or
  secure aggregation on top).
- **Other clients need no trust**: they hold only the public key and cannot decrypt anyone's
  ciphertext, even together with the server. Colluders still learn what the published sum
  implies (the sum minus their own updates: with one honest client, its update).
- **A key shared by the clients** (:meth:`KeyHolder.to_bytes` handed to every client, so that any
  of them can decrypt) makes every client a key holder: then *no* client may collude with the
  server. Ciphertexts stay public-key encryptions (the same size); the seeded symmetric
  ciphertexts that a shared key would permit (about half the bytes) are not implemented.
- **Malicious clients** can send ill-formed ciphertexts (out-of-range values, inflated noise)
  that corrupt the sum: there are no proofs of well-formedness. Decoding checks every field's
  range and raises on a sum that cannot come from honest inputs, which catches gross corruption
  but not a subtle one. Robust aggregation needs the individual updates and cannot run here.
- The transport must be authenticated (Flower TLS): the context fingerprint in every ciphertext
  detects mistakes (another key, other parameters), not forgeries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import threading
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from mmshield.errors import ConfigError, EncryptionError

__all__ = [
    "COEFF_MOD_BIT_SIZES",
    "POLY_MODULUS_DEGREE",
    "SECURITY_BOUNDS_TC128",
    "Aggregator",
    "EncryptedUpdate",
    "HEConfigError",
    "HEParams",
    "KeyHolder",
    "PackingLayout",
    "UpdateEncryptor",
]

POLY_MODULUS_DEGREE = 4096
"""Ring dimension ``N``: the smallest that holds a 60-bit data prime and a special prime."""
COEFF_MOD_BIT_SIZES = (60, 49)
"""The data prime ``q`` (travels in every ciphertext) and the special prime ``p`` (never)."""
SECURITY_BOUNDS_TC128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
"""HE standard: the largest ``log2(q p)`` for 128-bit classical security, by ``N``."""

DEFAULT_MAX_BYTES_PER_PARAM = 10.0
_LOG2_FAILURE = -64  # decryption failure probability bound per coefficient (Hoeffding)
_MAX_C0_DROP = 10  # c0 low bits that may be dropped
_MAX_GROUP_SLOTS = 12  # longest packing period tried
_CONTEXT_MAGIC = b"MHEC"
_UPDATE_MAGIC = b"MHEU"
_VERSION = 1
_FINGERPRINT_BYTES = 16
# magic, version, q bits, c0 shift, reserved, fingerprint, params, count, ciphertexts, N
_UPDATE_HEADER = struct.Struct(f"<4sBBBB{_FINGERPRINT_BYTES}sQIII")
_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, size, major, minor, compression, reserved, total
_ZSTD_MAGIC = 0xFD2FB528


class HEConfigError(EncryptionError, ConfigError):
    """Encryption parameters cannot be used safely (the message says what to change)."""


# ------------------------------------------------------------------------------------- helpers


def _who(client: object | None) -> str:
    return "update" if client is None else f"client {client}'s update"


@functools.lru_cache(maxsize=8)
def _coeff_modulus(n: int, bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """SEAL's (deterministic) primes for ``bit_sizes``: the data primes, then the special one."""
    return tuple(m.value() for m in sealapi.CoeffModulus.Create(n, list(bit_sizes)))


def _noise_bound(num_clients: int, n: int, c0_drop: int) -> float:
    """High-probability bound on the noise of a sum of ``num_clients`` fresh ciphertexts."""
    ranges = n + 1 + (4.0**c0_drop if c0_drop else 0.0)  # sum of squared term ranges
    hoeffding = math.sqrt(num_clients * ranges * (1 - _LOG2_FAILURE) * math.log(2) / 2)
    return hoeffding + num_clients * (0.75 + 2.0**-30)


@functools.lru_cache(maxsize=256)
def _plain_modulus(
    num_clients: int, n: int, q: int, forbidden: tuple[int, ...], c0_drop: int
) -> int:
    """Largest prime ``t = 1 mod 2n`` with ``t <= q / (2 * noise + 2)`` (0 if none)."""
    bound = int(q / (2 * _noise_bound(num_clients, n, c0_drop) + 2))
    bound = min(bound, (1 << 60) - 1)
    t = bound - (bound - 1) % (2 * n)
    while t > 2 * n:
        if t not in forbidden and sealapi.Modulus(t).is_prime():
            return t
        t -= 2 * n
    return 0


@dataclass(frozen=True)
class _Field:
    slot: int  # slot within the group
    value: int  # value within the group
    shift: int  # low bit of the piece within the offset value
    mask: int  # piece = (u >> shift) & mask
    radix: int  # num_clients * max piece + 1
    place: int  # product of the radices below it in its slot


@dataclass(frozen=True)
class PackingLayout:
    """How ``values`` quantised values are packed into ``slots`` plaintext slots (repeating).

    Attributes
    ----------
    values, slots
        Values per group and slots per group.
    fields
        One entry per piece: which slot and value, the bit shift and mask of the piece, its radix
        (room for the sum of every client) and its place value in the slot.
    """

    values: int
    slots: int
    fields: tuple[_Field, ...]

    @property
    def values_per_slot(self) -> float:
        """Average number of values per plaintext slot."""
        return self.values / self.slots


def _plan(u_max: int, num_clients: int, t: int) -> PackingLayout | None:
    """Greedy mixed-radix packing with the best values-per-slot over periods up to 12 slots."""
    if num_clients * u_max + 1 > t:
        return None
    best: PackingLayout | None = None
    for r in range(1, _MAX_GROUP_SLOTS + 1):
        fields: list[_Field] = []
        slot, value, shift, cap = 0, 0, 0, 1
        while slot < r:
            rest = u_max >> shift
            radix = num_clients * rest + 1
            if cap * radix <= t:  # the rest of the value fits whole
                fields.append(_Field(slot, value, shift, (1 << 64) - 1, radix, cap))
                cap *= radix
                value, shift = value + 1, 0
                continue
            low = 0  # the most low bits that still fit, if a later slot can take the rest
            while slot < r - 1 and cap * (num_clients * ((2 << low) - 1) + 1) <= t:
                low += 1
            if low:
                mask = (1 << low) - 1
                fields.append(_Field(slot, value, shift, mask, num_clients * mask + 1, cap))
                shift += low
            slot, cap = slot + 1, 1
        kept = tuple(f for f in fields if f.value < value)  # drop an unfinished value
        if value and (best is None or value * best.slots > best.values * r):
            best = PackingLayout(value, r, kept)
    return best


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    """The low ``width`` bits of each ``uint64`` value, concatenated little-endian.

    Values are laid out in periods of ``per`` values (``per * width`` bits, a whole number of
    bytes); each value is OR-ed into its period through an unaligned 8-byte view, plus a ninth
    byte where it spills over.
    """
    per = 8 // math.gcd(width, 8)
    period = width * per // 8
    count = values.size
    groups = -(-count // per)
    flat = np.zeros(groups * per, dtype=np.uint64)
    flat[:count] = values
    v = flat.reshape(groups, per)
    out = np.zeros((groups, period + 8), dtype=np.uint8)  # 8 bytes of slack per period
    for j in range(per):
        byte, shift = divmod(j * width, 8)
        out[:, byte : byte + 8].view(np.uint64)[:, 0] |= v[:, j] << np.uint64(shift)
        if shift + width > 64:
            out[:, byte + 8] |= (v[:, j] >> np.uint64(64 - shift)).astype(np.uint8)
    return out[:, :period].tobytes()[: (count * width + 7) // 8]


def _unpack_bits(buf: bytes | memoryview, width: int, count: int) -> np.ndarray:
    """Inverse of :func:`_pack_bits`."""
    per = 8 // math.gcd(width, 8)
    period = width * per // 8
    groups = -(-count // per)
    flat = np.frombuffer(buf, dtype=np.uint8)
    mat = np.zeros((groups, period + 8), dtype=np.uint8)
    whole = min(flat.size // period, groups)
    mat[:whole, :period] = flat[: whole * period].reshape(whole, period)
    if whole < groups:
        tail = flat[whole * period :]
        mat[whole, : tail.size] = tail
    out = np.empty((groups, per), dtype=np.uint64)
    mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(2**64 - 1)
    for j in range(per):
        byte, shift = divmod(j * width, 8)
        word = mat[:, byte : byte + 8].view(np.uint64)[:, 0] >> np.uint64(shift)
        if shift + width > 64:
            word |= mat[:, byte + 8].astype(np.uint64) << np.uint64(64 - shift)
        out[:, j] = word & mask
    return out.ravel()[:count]


# ---------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class HEParams:
    """Parameters of encrypted aggregation; build them with :meth:`choose`.

    Attributes
    ----------
    num_clients
        The most updates one aggregate may sum (noise budget and headroom are sized for it).
    clip_range
        ``c``: values outside ``[-c, c]`` are clipped and counted.
    scale
        Fixed-point scale: ``1 / scale`` is the quantisation step.
    c0_dropped_bits
        ``k``: low bits of ``c0`` dropped by the client serialisation.
    plain_modulus
        ``t``, the BFV plaintext modulus (a batching prime).
    poly_modulus_degree, coeff_mod_bit_sizes
        ``N`` and the bit sizes of the data and special primes.
    """

    num_clients: int
    clip_range: float
    scale: float
    c0_dropped_bits: int
    plain_modulus: int
    poly_modulus_degree: int = POLY_MODULUS_DEGREE
    coeff_mod_bit_sizes: tuple[int, ...] = COEFF_MOD_BIT_SIZES

    @classmethod
    def choose(
        cls,
        num_clients: int,
        clip_range: float,
        *,
        scale: float | None = None,
        max_bytes_per_param: float | None = None,
    ) -> HEParams:
        """Parameters for sums of up to ``num_clients`` updates with values in ``[-c, c]``.

        Parameters
        ----------
        num_clients
            The most updates summed into one aggregate.
        clip_range
            ``c``; choose it to cover the updates (values outside are clipped and counted).
        scale
            Fixed-point scale. ``None`` picks the largest power of two whose packing stays within
            ``max_bytes_per_param`` (the finest precision the byte budget allows).
        max_bytes_per_param
            Byte budget per parameter (default 10 when ``scale`` is ``None``, none otherwise).

        Raises
        ------
        HEConfigError
            If the sum of ``num_clients`` quantised values cannot fit a plaintext slot, or the
            budget cannot be met; the message says which value to change.
        """
        if not (isinstance(num_clients, int) and num_clients >= 1):
            raise HEConfigError(
                f"encryption.num_clients must be an integer >= 1, got {num_clients}"
            )
        if not (math.isfinite(clip_range) and clip_range > 0):
            raise HEConfigError(
                f"encryption.clip_range must be a positive number, got {clip_range}"
            )
        n, bits = POLY_MODULUS_DEGREE, COEFF_MOD_BIT_SIZES
        primes = _coeff_modulus(n, bits)
        q = primes[0]
        plains = {k: _plain_modulus(num_clients, n, q, primes, k) for k in range(_MAX_C0_DROP + 1)}
        t0 = max(plains.values())
        if t0 < 2 * n:
            raise HEConfigError(
                f"encryption: the noise of a sum of {num_clients} ciphertexts leaves no room for "
                f"a plaintext modulus in a {bits[0]}-bit data prime. Aggregate at most "
                "100,000 clients per sum (aggregate in stages above that)."
            )

        def best(s: float) -> HEParams | None:
            q_max = math.floor(clip_range * s + 0.5)
            if q_max < 1:
                return None
            found: tuple[float, HEParams] | None = None
            for k, t in plains.items():
                layout = _plan(2 * q_max, num_clients, t) if t else None
                if layout is None:
                    continue
                p = cls(num_clients, float(clip_range), float(s), k, t)
                if found is None or p.bytes_per_param < found[0] - 1e-12:
                    found = (p.bytes_per_param, p)
            return None if found is None else found[1]

        limit = (t0 - 1) // num_clients  # largest offset U whose n-fold sum fits a slot
        finest = math.floor(math.log2(max(limit / 2 - 0.5, 1e-300) / clip_range))
        if scale is not None:
            if not (math.isfinite(scale) and scale > 0):
                raise HEConfigError(f"encryption.scale must be a positive number, got {scale}")
            params = best(float(scale))
            if params is None:
                q_max = math.floor(clip_range * scale + 0.5)
                if q_max < 1:
                    raise HEConfigError(
                        f"encryption: the quantisation step 1/scale = {1 / scale:g} exceeds "
                        f"clip_range = {clip_range:g}, so every value would encode to 0. Use a "
                        "larger scale or clip_range."
                    )
                max_scale = (limit / 2 - 0.5) / clip_range
                max_clip = (limit / 2 - 0.5) / scale
                max_n = (t0 - 1) // (2 * q_max)
                raise HEConfigError(
                    f"encryption: the sum of {num_clients} values in [-{clip_range:g}, "
                    f"{clip_range:g}] at scale {scale:g} needs "
                    f"{math.log2(num_clients * 2 * q_max + 1):.1f} bits, but a plaintext slot "
                    f"holds {math.log2(t0):.1f} bits; the sum would wrap around. Fix one of: "
                    f"scale <= {max_scale:.4g}, clip_range <= {max_clip:.4g}, "
                    f"at most {max_n} clients per aggregate."
                )
            if max_bytes_per_param is not None and params.bytes_per_param > max_bytes_per_param:
                better = cls.choose(
                    num_clients, clip_range, max_bytes_per_param=max_bytes_per_param
                )
                raise HEConfigError(
                    f"encryption: scale {scale:g} packs to {params.bytes_per_param:.2f} bytes "
                    f"per parameter, over the budget of {max_bytes_per_param:g}. Use scale <= "
                    f"{better.scale:g} (step {1 / better.scale:.3g}), a smaller clip_range, or "
                    "a larger budget."
                )
            return params
        budget = DEFAULT_MAX_BYTES_PER_PARAM if max_bytes_per_param is None else max_bytes_per_param
        coarsest: HEParams | None = None
        for e in range(finest + 1, finest - 200, -1):
            if math.floor(clip_range * 2.0**e + 0.5) < 1:
                break
            params = best(2.0**e)
            if params is None:  # rounding put this scale just past the limit
                continue
            if params.bytes_per_param <= budget:
                return params
            coarsest = params
        least = "" if coarsest is None else f" (the least is {coarsest.bytes_per_param:.2f})"
        raise HEConfigError(
            f"encryption: no precision packs {num_clients} clients' values in "
            f"[-{clip_range:g}, {clip_range:g}] into {budget:g} bytes per parameter{least}. "
            "Raise max_bytes_per_param, or sum fewer clients per aggregate."
        )

    # ---- derived quantities

    @property
    def q_max(self) -> int:
        """Largest quantised magnitude ``floor(c * scale + 1/2)``."""
        return math.floor(self.clip_range * self.scale + 0.5)

    @property
    def data_prime(self) -> int:
        """``q``, the modulus of every ciphertext coefficient."""
        return _coeff_modulus(self.poly_modulus_degree, self.coeff_mod_bit_sizes)[0]

    @cached_property
    def layout(self) -> PackingLayout:
        """The packing of quantised values into plaintext slots."""
        layout = _plan(2 * self.q_max, self.num_clients, self.plain_modulus)
        if layout is None:
            raise HEConfigError(
                "encryption: these parameters cannot pack a value; build them with HEParams.choose"
            )
        return layout

    @property
    def bytes_per_slot(self) -> float:
        """Serialised ciphertext bytes per plaintext slot (``c1`` whole, ``c0`` compressed)."""
        q_bits = self.data_prime.bit_length()
        return (2 * q_bits - self.c0_dropped_bits) / 8

    @property
    def bytes_per_param(self) -> float:
        """Serialised ciphertext bytes per parameter for a large update (headers excluded)."""
        return self.bytes_per_slot * self.layout.slots / self.layout.values

    @property
    def resolution(self) -> float:
        """Quantisation step ``1 / scale``."""
        return 1.0 / self.scale

    @property
    def max_sum_error(self) -> float:
        """Bound on ``|decrypted sum - float sum|`` per value for unclipped updates."""
        return self.num_clients * (0.5 / self.scale + self.clip_range * 2.0**-52)

    @property
    def noise_bound(self) -> float:
        """The noise bound the plaintext modulus was chosen for (failure <= 2^-64/coefficient)."""
        return _noise_bound(self.num_clients, self.poly_modulus_degree, self.c0_dropped_bits)

    @property
    def security_bits_used(self) -> tuple[int, int]:
        """``(log2(q p), the 128-bit bound for N)``."""
        return (sum(self.coeff_mod_bit_sizes), SECURITY_BOUNDS_TC128[self.poly_modulus_degree])

    def ciphertexts_for(self, num_params: int) -> int:
        """Number of ciphertexts that carry ``num_params`` values."""
        groups = -(-num_params // self.layout.values)
        return -(-groups * self.layout.slots // self.poly_modulus_degree)

    def update_bytes(self, num_params: int) -> int:
        """Exact serialised size of one client's :class:`EncryptedUpdate`."""
        cts = self.ciphertexts_for(num_params) * self.poly_modulus_degree
        q_bits = self.data_prime.bit_length()
        c0 = (cts * (q_bits - self.c0_dropped_bits) + 7) // 8
        return _UPDATE_HEADER.size + c0 + (cts * q_bits + 7) // 8

    def validate(self) -> None:
        """Check the parameters against the security bound, the noise budget and packing.

        Raises
        ------
        HEConfigError
            If they are unsafe or inconsistent (e.g. read from a tampered public context).
        """
        n = self.poly_modulus_degree
        total, bound = sum(self.coeff_mod_bit_sizes), SECURITY_BOUNDS_TC128.get(n, 0)
        max_bits = sealapi.CoeffModulus.MaxBitCount(n, sealapi.SEC_LEVEL_TYPE.TC128)
        if total > min(bound, max_bits) or len(self.coeff_mod_bit_sizes) != 2:
            raise HEConfigError(
                f"encryption: N = {n} with moduli {list(self.coeff_mod_bit_sizes)} "
                f"({total} bits) exceeds the 128-bit bound ({bound} bits) or is not "
                "[data prime, special prime]"
            )
        t = self.plain_modulus
        q = self.data_prime
        if not (0 <= self.c0_dropped_bits <= _MAX_C0_DROP) or not (
            t % (2 * n) == 1 and sealapi.Modulus(t).is_prime()
        ):
            raise HEConfigError(f"encryption: plain modulus {t} is not a batching prime for N={n}")
        if 2 * self.noise_bound + 2 > q / t:
            raise HEConfigError(
                f"encryption: plain modulus {t} leaves too little noise room for sums of "
                f"{self.num_clients} ciphertexts; build the parameters with HEParams.choose"
            )
        _ = self.layout

    def to_json(self) -> dict[str, Any]:
        """JSON-safe mapping (the public context carries it)."""
        return {
            "scheme": "BFV",
            "num_clients": self.num_clients,
            "clip_range": self.clip_range,
            "scale": self.scale,
            "c0_dropped_bits": self.c0_dropped_bits,
            "plain_modulus": self.plain_modulus,
            "poly_modulus_degree": self.poly_modulus_degree,
            "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> HEParams:
        """Inverse of :meth:`to_json`, validated (:meth:`validate`)."""
        try:
            if d["scheme"] != "BFV":
                raise ValueError(f"scheme {d['scheme']!r}")
            params = cls(
                num_clients=int(d["num_clients"]),
                clip_range=float(d["clip_range"]),
                scale=float(d["scale"]),
                c0_dropped_bits=int(d["c0_dropped_bits"]),
                plain_modulus=int(d["plain_modulus"]),
                poly_modulus_degree=int(d["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(b) for b in d["coeff_mod_bit_sizes"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise EncryptionError(
                f"the public context's parameters are malformed ({exc}); ask the key holder "
                "for a fresh KeyHolder.public_context()"
            ) from exc
        params.validate()
        return params


# ----------------------------------------------------------------------------- quantisation


def _quantise(params: HEParams, x: np.ndarray, who: str) -> tuple[np.ndarray, int]:
    """Offset fixed-point encoding ``u = round(clip(x) * scale) + q_max`` and the clip count."""
    v = np.asarray(x)
    if not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
        raise EncryptionError(f"{who}: expected a numeric array, got dtype {v.dtype}")
    v = v.astype(np.float64).ravel()  # a copy: the caller's array is never touched
    c = params.clip_range
    clipped = 0
    # min/max are NaN when a NaN is present, so one check covers range and finiteness.
    if v.size and not (-c <= float(v.min()) and float(v.max()) <= c):
        finite = np.isfinite(v)
        if not finite.all():
            raise EncryptionError(
                f"{who}: cannot encrypt {int((~finite).sum())} non-finite value(s) (first at "
                f"index {int(np.argmin(finite))}); check the client's training for divergence"
            )
        clipped = int(np.count_nonzero((v < -c) | (v > c)))
        np.clip(v, -c, c, out=v)
    v *= params.scale
    np.rint(v, out=v)
    v += params.q_max
    return v.astype(np.uint64), clipped


def _scale_plain(m: np.ndarray, q: int, t: int) -> np.ndarray:
    """``round(q m / t)`` to within 3/4 for plaintext coefficients ``m < t < 2^53``.

    ``q m / t = floor(q / t) m + (q mod t) m / t``: the first term is exact in ``uint64`` (below
    ``q``), the second is rounded in float64 (relative error 2^-53 on a value below ``t``).
    The error only adds to the ciphertext noise, and the noise bound counts it.
    """
    qd, qr = divmod(q, t)
    frac = m.astype(np.float64)
    frac *= qr / t
    np.rint(frac, out=frac)
    return m * np.uint64(qd) + frac.astype(np.uint64)


def _pack_slots(params: HEParams, u: np.ndarray) -> np.ndarray:
    """Slot values (``ciphertexts * N`` of them, zero-padded) for offset values ``u``."""
    lay = params.layout
    m, r = lay.values, lay.slots
    whole = u.size // m
    groups = -(-u.size // m)
    slots = np.zeros(params.ciphertexts_for(u.size) * params.poly_modulus_degree, np.uint64)
    tail = np.full(m, params.q_max, dtype=np.uint64)  # the last group, padded with zeros
    tail[: u.size - whole * m] = u[whole * m :]
    parts = [(u[: whole * m].reshape(whole, m), slots[: whole * r].reshape(whole, r))]
    if groups > whole:
        parts.append((tail.reshape(1, m), slots[whole * r : groups * r].reshape(1, r)))
    for vals, grid in parts:
        for f in lay.fields:
            piece = vals[:, f.value] >> np.uint64(f.shift)
            if f.mask != (1 << 64) - 1:
                piece &= np.uint64(f.mask)
            piece *= np.uint64(f.place)
            grid[:, f.slot] += piece
    return slots


def _unpack_slots(params: HEParams, slots: np.ndarray, num_params: int, count: int) -> np.ndarray:
    """Float64 sums from decrypted slot sums of ``count`` updates."""
    lay = params.layout
    groups = -(-num_params // lay.values)
    grid = slots[: groups * lay.slots].reshape(groups, lay.slots).copy()
    totals = np.zeros((groups, lay.values), dtype=np.uint64)
    bad = 0
    for f in sorted(lay.fields, key=lambda f: (f.slot, f.place)):
        radix = np.uint64(f.radix)
        col = grid[:, f.slot]
        digit = col % radix
        grid[:, f.slot] = col // radix
        piece_max = min(f.mask, (2 * params.q_max) >> f.shift)
        bad += int(np.count_nonzero(digit > np.uint64(count * piece_max)))
        totals[:, f.value] += digit << np.uint64(f.shift)
    bad += int(np.count_nonzero(grid))
    if slots[groups * lay.slots :].any():
        bad += 1
    if bad:
        raise EncryptionError(
            f"the decrypted aggregate holds {bad} slot field(s) outside the range that "
            f"{count} honest update(s) can produce: a ciphertext was corrupt, crafted, or "
            "encrypted with other parameters; the aggregate cannot be trusted. Re-run the round "
            "and check which client's update breaks it (decrypt them one by one in a test)."
        )
    flat = totals.ravel()[:num_params].astype(np.int64) - count * params.q_max
    return flat.astype(np.float64) / params.scale


# ------------------------------------------------------------------------------ ciphertexts


@dataclass
class EncryptedUpdate:
    """One client's encrypted update, or the server's encrypted sum of several.

    Attributes
    ----------
    fingerprint
        First 16 bytes of SHA-256 of the public context it was made under.
    num_params
        Length of the (flattened) plaintext update.
    count
        How many client updates it sums (1 for a client's own update).
    c0, c1
        Ciphertext polynomials, shape ``(ciphertexts, N)``, ``uint64``; ``c0`` holds
        ``c0 >> c0_shift`` when the client compressed it.
    c0_shift
        Low bits dropped from ``c0`` (0 for aggregates).
    q_bits
        Bit length of the data prime (width of ``c1``).
    clipped
        How many values the client clipped to the clip range. Known only to the client that
        encrypted (not serialised: the server would learn it); ``None`` after :meth:`from_bytes`.
    """

    fingerprint: bytes
    num_params: int
    count: int
    c0: np.ndarray
    c1: np.ndarray
    c0_shift: int
    q_bits: int
    clipped: int | None = field(default=None, compare=False)

    @property
    def num_ciphertexts(self) -> int:
        """Number of BFV ciphertexts (of ``N`` slots each)."""
        return int(self.c1.shape[0])

    @property
    def nbytes(self) -> int:
        """Size of :meth:`to_bytes`."""
        coeffs = self.c1.size
        c0 = (coeffs * (self.q_bits - self.c0_shift) + 7) // 8
        return _UPDATE_HEADER.size + c0 + (coeffs * self.q_bits + 7) // 8

    def to_bytes(self) -> bytes:
        """Header (44 bytes) then ``c0`` and ``c1`` bit-packed."""
        header = _UPDATE_HEADER.pack(
            _UPDATE_MAGIC,
            _VERSION,
            self.q_bits,
            self.c0_shift,
            0,
            self.fingerprint,
            self.num_params,
            self.count,
            self.num_ciphertexts,
            int(self.c1.shape[1]),
        )
        c0 = _pack_bits(self.c0.ravel(), self.q_bits - self.c0_shift)
        c1 = _pack_bits(self.c1.ravel(), self.q_bits)
        return header + c0 + c1

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, client: object = None
    ) -> EncryptedUpdate:
        """Parse :meth:`to_bytes` output, checking its structure and size.

        Raises
        ------
        EncryptionError
            If the bytes are not an encrypted update, or are truncated or padded.
        """
        who = _who(client)
        view = memoryview(data)
        if len(view) < _UPDATE_HEADER.size or bytes(view[:4]) != _UPDATE_MAGIC:
            raise EncryptionError(
                f"{who}: {len(view)} bytes that are not an mmshield encrypted update (bad magic "
                "or shorter than the header); check what the client sent"
            )
        _, version, q_bits, shift, _, fp, num_params, count, cts, n = _UPDATE_HEADER.unpack(
            view[: _UPDATE_HEADER.size]
        )
        if version != _VERSION or not (1 <= q_bits <= 61 and shift < q_bits) or n < 1:
            raise EncryptionError(
                f"{who}: unsupported encrypted-update format (version {version}, {q_bits}-bit "
                f"modulus, c0 shift {shift}, N = {n}); client and server run different mmshield "
                "versions"
            )
        coeffs = cts * n
        c0_len = (coeffs * (q_bits - shift) + 7) // 8
        expected = _UPDATE_HEADER.size + c0_len + (coeffs * q_bits + 7) // 8
        if len(view) != expected:
            raise EncryptionError(
                f"{who} is {len(view):,} bytes but its header ({num_params:,} parameters in "
                f"{cts} ciphertexts) implies {expected:,}: the message was truncated or "
                "corrupted in transit; ask the client to resend it"
            )
        body = view[_UPDATE_HEADER.size :]
        c0 = _unpack_bits(body[:c0_len], q_bits - shift, coeffs).reshape(cts, n)
        c1 = _unpack_bits(body[c0_len:], q_bits, coeffs).reshape(cts, n)
        return cls(fp, int(num_params), int(count), c0, c1, int(shift), int(q_bits))


# ----------------------------------------------------------------- contexts and SEAL plumbing


def _serialise_public(params: HEParams, context: ts.Context) -> bytes:
    blob = context.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    meta = json.dumps(params.to_json(), sort_keys=True).encode()
    return _CONTEXT_MAGIC + struct.pack("<BI", _VERSION, len(meta)) + meta + blob


def _fingerprint(public_context: bytes) -> bytes:
    return hashlib.sha256(public_context).digest()[:_FINGERPRINT_BYTES]


def _check_context(params: HEParams, context: ts.Context) -> sealapi.SEALContext:
    """The SEAL context inside ``context``, after checking it matches ``params``."""
    seal = context.seal_context().data
    first = seal.first_context_data().parms()
    key = seal.key_context_data().parms()
    moduli = tuple(m.value() for m in key.coeff_modulus())
    expected = _coeff_modulus(params.poly_modulus_degree, params.coeff_mod_bit_sizes)
    if (
        getattr(first.scheme(), "name", "") != "BFV"
        or first.poly_modulus_degree() != params.poly_modulus_degree
        or first.plain_modulus().value() != params.plain_modulus
        or moduli != expected
        or [m.value() for m in first.coeff_modulus()] != [expected[0]]
    ):
        raise EncryptionError(
            "the TenSEAL context does not match its stated parameters (scheme, N, moduli or "
            "plain modulus differ); the public context is corrupt or was tampered with"
        )
    return seal


def _load_public(public_context: bytes, role: str) -> tuple[HEParams, ts.Context]:
    data = bytes(public_context)
    head = len(_CONTEXT_MAGIC) + 5
    if len(data) < head or data[:4] != _CONTEXT_MAGIC:
        raise EncryptionError(
            f"{role}: these {len(data)} bytes are not an mmshield public context; pass the bytes "
            "of KeyHolder.public_context()"
        )
    version, meta_len = struct.unpack_from("<BI", data, 4)
    if version != _VERSION or head + meta_len > len(data):
        raise EncryptionError(f"{role}: unsupported or truncated public context")
    try:
        meta = json.loads(data[head : head + meta_len])
    except ValueError as exc:
        raise EncryptionError(f"{role}: the public context's parameters are malformed") from exc
    params = HEParams.from_json(meta)
    try:
        context = ts.context_from(data[head + meta_len :], n_threads=1)
    except Exception as exc:  # TenSEAL raises bare ValueError / RuntimeError from C++
        raise EncryptionError(
            f"{role}: TenSEAL could not load the public context ({exc}); it is truncated or corrupt"
        ) from exc
    if context.has_secret_key() or context.is_private():
        raise EncryptionError(
            f"{role}: the context holds the secret key. Only the key holder may hold it; "
            "distribute KeyHolder.public_context(), which never contains it"
        )
    if not context.has_public_key():
        raise EncryptionError(f"{role}: the public context holds no public key")
    _check_context(params, context)
    return params, context


class _SealFiles:
    """Moves ciphertext coefficients between SEAL objects and NumPy arrays.

    TenSEAL's ``sealapi`` saves and loads SEAL objects only through file paths and has no bulk
    accessor, so ciphertexts go through files in a private scratch directory (``/dev/shm`` where
    available). Saved files are SEAL's format: a 16-byte header, then a zstd frame. Uniform
    60-bit words do not compress, so zstd stores raw blocks, which are read directly; any other
    block type falls back to reading coefficients one by one. Loading writes the uncompressed
    format, which SEAL validates (every coefficient below its modulus).
    """

    def __init__(self, seal: sealapi.SEALContext, encryptor: sealapi.Encryptor) -> None:
        self.seal = seal
        self.n = seal.first_context_data().parms().poly_modulus_degree()
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="mmshield-he-", dir=base)
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, True)
        # A reference ciphertext gives the exact bytes SEAL writes before the coefficients.
        ref = sealapi.Ciphertext(seal)
        self.version = (0, 0)
        self.prefix: bytes | None = None
        for _ in range(8):
            encryptor.encrypt_zero(ref)
            blob = self._save(ref)
            body = _seal_body(blob)
            if body is not None and len(body) > 16 * self.n:
                head = len(body) - 16 * self.n
                coeffs = np.frombuffer(body, dtype=np.uint64, offset=head)
                dyn = ref.dyn_array()  # check the layout once against SEAL's own accessor
                if int(coeffs[0]) == dyn.at(0) and int(coeffs[-1]) == dyn.at(2 * self.n - 1):
                    self.version = (blob[3], blob[4])
                    self.prefix = bytes(body[:head])
                break
        if self.prefix is None:
            raise EncryptionError(
                "cannot read SEAL's ciphertext serialisation (unexpected format): this module "
                f"supports TenSEAL 0.3.x with SEAL 4.x, found TenSEAL {ts.__version__}"
            )
        self.fallbacks = 0

    def _path(self) -> str:
        return f"{self.dir}/{threading.get_ident()}.seal"

    def _save(self, ct: sealapi.Ciphertext) -> bytes:
        path = self._path()
        ct.save(path)
        with open(path, "rb") as fh:
            return fh.read()

    def extract(self, ct: sealapi.Ciphertext) -> np.ndarray:
        """``(2, N)`` coefficients of a fresh two-polynomial, one-prime ciphertext."""
        n = self.n
        if ct.size() != 2 or ct.coeff_modulus_size() != 1 or ct.is_ntt_form():
            raise EncryptionError("internal: unexpected ciphertext shape from SEAL")
        body = _seal_body(self._save(ct))
        arr = None
        assert self.prefix is not None
        head = len(self.prefix)
        # The members before the coefficients (parms_id, sizes, scale) are the same for every
        # fresh ciphertext of this context: comparing them checks the layout of what was read.
        if body is not None and len(body) == head + 16 * n and body[:head] == self.prefix:
            arr = np.frombuffer(body, dtype=np.uint64, count=2 * n, offset=head)
        if arr is None:  # SEAL compressed the block: read the coefficients one by one
            self.fallbacks += 1
            dyn = ct.dyn_array()
            arr = np.fromiter(map(dyn.at, range(2 * n)), dtype=np.uint64, count=2 * n)
        return arr.reshape(2, n)

    def load(self, c0: np.ndarray, c1: np.ndarray) -> sealapi.Ciphertext:
        """A SEAL ciphertext with polynomials ``c0`` and ``c1`` (each ``N`` coefficients mod q)."""
        assert self.prefix is not None
        payload = self.prefix + np.ascontiguousarray(c0, np.uint64).tobytes()
        payload += np.ascontiguousarray(c1, np.uint64).tobytes()
        total = _SEAL_HEADER.size + len(payload)
        header = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *self.version, 0, 0, total)
        path = self._path()
        with open(path, "wb") as fh:
            fh.write(header + payload)
        ct = sealapi.Ciphertext(self.seal)
        try:
            ct.load(self.seal, path)
        except Exception as exc:  # SEAL's validation: coefficient out of range, bad metadata
            raise EncryptionError(
                f"SEAL rejected a ciphertext of the aggregate ({exc}); it is corrupt"
            ) from exc
        return ct

    def close(self) -> None:
        self._finalizer()


def _seal_body(blob: bytes) -> bytes | memoryview | None:
    """The uncompressed member bytes of a saved SEAL object, or None if zstd compressed them."""
    if len(blob) < _SEAL_HEADER.size:
        return None
    magic, hsize, _major, _minor, compr, _, total = _SEAL_HEADER.unpack_from(blob)
    if magic != _SEAL_MAGIC or hsize != _SEAL_HEADER.size or total != len(blob):
        return None
    data = memoryview(blob)[_SEAL_HEADER.size :]
    if compr == 0:
        return data
    if compr != 2 or len(data) < 6 or struct.unpack_from("<I", data)[0] != _ZSTD_MAGIC:
        return None
    fhd = data[4]
    single, fcs_flag, dict_flag = (fhd >> 5) & 1, fhd >> 6, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag]
    pos += (1 if single else 0, 2, 4, 8)[fcs_flag]
    out: list[bytes | memoryview] = []
    while True:
        if pos + 3 > len(data):
            return None
        block = int.from_bytes(data[pos : pos + 3], "little")
        last, kind, size = block & 1, (block >> 1) & 3, block >> 3
        pos += 3
        if kind == 0:  # raw
            if pos + size > len(data):
                return None
            out.append(data[pos : pos + size])
            pos += size
        elif kind == 1:  # run of one byte
            out.append(bytes(data[pos : pos + 1]) * size)
            pos += 1
        else:
            return None
        if last:
            return out[0] if len(out) == 1 else b"".join(out)


def _check_update(
    params: HEParams,
    fingerprint: bytes,
    update: EncryptedUpdate,
    who: str,
    role: str,
    num_params: int | None,
) -> None:
    """Raise :class:`EncryptionError` unless ``update`` was made for these parameters and key."""
    if update.fingerprint != fingerprint:
        raise EncryptionError(
            f"{who} was encrypted under another key or context (fingerprint "
            f"{update.fingerprint.hex()}; this {role} uses {fingerprint.hex()}). The client must "
            "encrypt with the public context of this round's key holder "
            "(KeyHolder.public_context()); after the key holder regenerates its keys, every "
            "party needs the new one."
        )
    q_bits = params.data_prime.bit_length()
    if update.q_bits != q_bits or update.c1.shape[1:] != (params.poly_modulus_degree,):
        raise EncryptionError(
            f"{who} has {update.q_bits}-bit coefficients in rings of degree "
            f"{update.c1.shape[1:]}, but the context uses {q_bits} bits and N = "
            f"{params.poly_modulus_degree}: it was made with other parameters"
        )
    if num_params is not None and update.num_params != num_params:
        raise EncryptionError(
            f"{who} has {update.num_params:,} parameters but the aggregate has {num_params:,}: "
            "every client must encrypt the whole update of the same model (check the model "
            "version and that nothing was filtered out)"
        )
    need = params.ciphertexts_for(update.num_params) if update.num_params else 0
    if (
        update.num_params < 1
        or update.num_ciphertexts != need
        or update.c0.shape != update.c1.shape
    ):
        raise EncryptionError(
            f"{who} carries {update.num_ciphertexts} ciphertexts for {update.num_params:,} "
            f"parameters, which need {need}: it is truncated or was packed with other parameters"
        )
    if not 1 <= update.count <= params.num_clients:
        raise EncryptionError(
            f"{who} claims to sum {update.count} updates; these parameters allow 1 to "
            f"{params.num_clients} per aggregate"
        )


def _restore_c0(update: EncryptedUpdate, q: int, who: str) -> np.ndarray:
    """Full ``c0`` (mod q) and a range check of both polynomials."""
    qq = np.uint64(q)
    if update.c1.size and int(update.c1.max()) >= q:
        raise EncryptionError(f"{who}: a ciphertext coefficient is not below the modulus: corrupt")
    k = update.c0_shift
    if k == 0:
        if update.c0.size and int(update.c0.max()) >= q:
            raise EncryptionError(
                f"{who}: a ciphertext coefficient is not below the modulus: corrupt"
            )
        return update.c0
    c0 = (update.c0 << np.uint64(k)) | np.uint64(1 << (k - 1))  # centre of the dropped range
    np.subtract(c0, qq, out=c0, where=c0 >= qq)
    return c0


class UpdateEncryptor:
    """Client side: quantise, pack and encrypt updates under the key holder's public key.

    Parameters
    ----------
    public_context
        :meth:`KeyHolder.public_context` bytes. A context that holds a secret key is refused.
    """

    def __init__(self, public_context: bytes) -> None:
        self.params, self.context = _load_public(public_context, "UpdateEncryptor")
        self.fingerprint = _fingerprint(bytes(public_context))
        seal = self.context.seal_context().data
        self._seal = seal
        self._encryptor = sealapi.Encryptor(seal, self.context.public_key().data)
        self._files = _SealFiles(seal, self._encryptor)

    def encrypt(self, update: np.ndarray, *, client: object = None) -> EncryptedUpdate:
        """Encrypt one update (any shape; flattened).

        Values outside ``[-clip_range, clip_range]`` are clipped and counted in
        :attr:`EncryptedUpdate.clipped`, which the caller must report.

        Raises
        ------
        EncryptionError
            If the update is empty or holds NaN or infinite values.
        """
        who = _who(client)
        params = self.params
        u, clipped = _quantise(params, update, who)
        if u.size == 0:
            raise EncryptionError(f"{who}: cannot encrypt an empty update")
        n = params.poly_modulus_degree
        # c0 starts as the scaled plaintext round(q m / t); each Enc_pk(0) is added onto it.
        c0 = _scale_plain(
            _pack_slots(params, u).reshape(-1, n), params.data_prime, params.plain_modulus
        )
        c1 = np.empty_like(c0)
        ct = sealapi.Ciphertext(self._seal)
        for i in range(c0.shape[0]):
            self._encryptor.encrypt_zero(ct)  # SEAL's public-key encryption and randomness
            zero = self._files.extract(ct)
            c0[i] += zero[0]  # both below q < 2^60: no uint64 overflow
            c1[i] = zero[1]
        q = np.uint64(params.data_prime)
        np.subtract(c0, q, out=c0, where=c0 >= q)
        k = params.c0_dropped_bits
        if k:
            c0 >>= np.uint64(k)
        q_bits = params.data_prime.bit_length()
        return EncryptedUpdate(self.fingerprint, int(u.size), 1, c0, c1, k, q_bits, clipped)


class Aggregator:
    """Server side: adds encrypted updates; holds the public context only, never a secret key.

    Parameters
    ----------
    public_context
        :meth:`KeyHolder.public_context` bytes. A context that holds a secret key is refused.
    num_params
        Expected update length; ``None`` takes it from the first update added.

    Attributes
    ----------
    context
        The TenSEAL context (public: ``context.has_secret_key()`` is False).
    count
        How many client updates the running sum holds.
    """

    def __init__(self, public_context: bytes, num_params: int | None = None) -> None:
        self.params, self.context = _load_public(public_context, "Aggregator")
        if self.context.has_secret_key():  # _load_public refuses it; never relax this
            raise EncryptionError("Aggregator: the server must not hold the secret key")
        self.fingerprint = _fingerprint(bytes(public_context))
        self.expected_params = num_params
        self.reset()

    def reset(self) -> None:
        """Forget the running sum (start a new round)."""
        self._c0: np.ndarray | None = None
        self._c1: np.ndarray | None = None
        self.num_params = self.expected_params
        self.count = 0
        self.clients: list[object] = []

    def add(self, update: EncryptedUpdate | bytes, *, client: object = None) -> None:
        """Add one encrypted update (or a partial aggregate) to the running sum.

        Raises
        ------
        EncryptionError
            If it was made under another key or context, has the wrong size, is corrupt, comes
            from a client already added, or would exceed ``num_clients`` updates.
        """
        who = _who(client)
        if not isinstance(update, EncryptedUpdate):
            update = EncryptedUpdate.from_bytes(update, client)
        params = self.params
        _check_update(params, self.fingerprint, update, who, "aggregator", self.num_params)
        if client is not None and client in self.clients:
            raise EncryptionError(f"{who} was already added to this aggregate")
        if self.count + update.count > params.num_clients:
            raise EncryptionError(
                f"{who}: adding it makes {self.count + update.count} updates, but the parameters "
                f"were chosen for at most {params.num_clients} per aggregate (beyond that the sum "
                "can overflow its slots or the noise budget). Have the key holder choose "
                "HEParams for more clients, or aggregate in groups."
            )
        q = params.data_prime
        c0 = _restore_c0(update, q, who)
        qq = np.uint64(q)
        if self._c0 is None or self._c1 is None:
            self._c0 = c0.copy()
            self._c1 = update.c1.copy()
        else:
            for acc, x in ((self._c0, c0), (self._c1, update.c1)):
                acc += x  # both below q < 2^60: no uint64 overflow
                np.subtract(acc, qq, out=acc, where=acc >= qq)
        self.num_params = update.num_params
        self.count += update.count
        if client is not None:
            self.clients.append(client)

    def sum(
        self, updates: Iterable[EncryptedUpdate | bytes] | Mapping[Any, EncryptedUpdate | bytes]
    ) -> EncryptedUpdate:
        """A fresh sum of ``updates`` (a mapping names the clients in errors), returned."""
        self.reset()
        items = updates.items() if isinstance(updates, Mapping) else enumerate(updates)
        for client, update in items:
            self.add(update, client=client)
        return self.result()

    def result(self) -> EncryptedUpdate:
        """The encrypted sum so far, for the key holder."""
        if self._c0 is None or self._c1 is None or self.num_params is None:
            raise EncryptionError("Aggregator.result: no update has been added")
        q_bits = self.params.data_prime.bit_length()
        return EncryptedUpdate(
            self.fingerprint,
            self.num_params,
            self.count,
            self._c0.copy(),
            self._c1.copy(),
            0,
            q_bits,
        )


class KeyHolder:
    """Generates the key pair, publishes the public context and decrypts aggregates.

    Parameters
    ----------
    params
        From :meth:`HEParams.choose`.

    Notes
    -----
    The secret key never leaves this object except through :meth:`to_bytes` (to persist it, or
    to share it with the clients: then every client is a key holder, see the module docstring).
    """

    def __init__(
        self, params: HEParams, *, _context: ts.Context | None = None, _public: bytes | None = None
    ) -> None:
        params.validate()
        context = _context
        if context is None:
            context = ts.context(
                ts.SCHEME_TYPE.BFV,
                poly_modulus_degree=params.poly_modulus_degree,
                plain_modulus=params.plain_modulus,
                coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                n_threads=1,
            )
        seal = _check_context(params, context)
        if not context.has_secret_key():
            raise EncryptionError("KeyHolder: the context holds no secret key")
        self.params = params
        self._context = context
        self._public = _public if _public is not None else _serialise_public(params, context)
        self.fingerprint = _fingerprint(self._public)
        self._decryptor = sealapi.Decryptor(seal, context.secret_key().data)
        self._files = _SealFiles(seal, sealapi.Encryptor(seal, context.public_key().data))

    def public_context(self) -> bytes:
        """Parameters and public key for clients and server; never contains the secret key."""
        return self._public

    def decrypt(self, aggregate: EncryptedUpdate | bytes, *, min_count: int = 1) -> np.ndarray:
        """Decrypt an encrypted sum to float64 (divide by ``aggregate.count`` for the mean).

        Parameters
        ----------
        aggregate
            :meth:`Aggregator.result` (or its bytes).
        min_count
            Refuse sums of fewer updates (the count is the server's claim; see the module
            docstring's threat model).

        Raises
        ------
        EncryptionError
            If it was made under another key or context, has the wrong size, sums fewer than
            ``min_count`` updates, or decrypts to values no honest sum can produce.
        """
        if not isinstance(aggregate, EncryptedUpdate):
            aggregate = EncryptedUpdate.from_bytes(aggregate)
        who = "aggregate"
        params = self.params
        _check_update(params, self.fingerprint, aggregate, who, "key holder", None)
        if aggregate.count < min_count:
            raise EncryptionError(
                f"the aggregate sums {aggregate.count} update(s), fewer than min_count = "
                f"{min_count}; refusing to decrypt it"
            )
        c0 = _restore_c0(aggregate, params.data_prime, who)
        n = params.poly_modulus_degree
        slots = np.empty(aggregate.num_ciphertexts * n, dtype=np.uint64)
        pt = sealapi.Plaintext()
        for i in range(aggregate.num_ciphertexts):
            ct = self._files.load(c0[i], aggregate.c1[i])
            self._decryptor.decrypt(ct, pt)
            k = min(pt.coeff_count(), n)  # SEAL drops high zero coefficients
            row = slots[i * n : (i + 1) * n]
            row[:k] = np.fromiter(map(pt.data, range(k)), dtype=np.uint64, count=k)
            row[k:] = 0
        return _unpack_slots(params, slots, aggregate.num_params, aggregate.count)

    def to_bytes(self) -> bytes:
        """The key holder's state **including the secret key**: keep it secret."""
        secret = self._context.serialize(
            save_public_key=True,
            save_secret_key=True,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        return b"MHEK" + struct.pack("<Q", len(self._public)) + self._public + secret

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyHolder:
        """Restore :meth:`to_bytes` (same keys, same public context and fingerprint)."""
        if len(data) < 12 or data[:4] != b"MHEK":
            raise EncryptionError("these bytes are not a saved mmshield key holder")
        (plen,) = struct.unpack_from("<Q", data, 4)
        public = bytes(data[12 : 12 + plen])
        params, _ = _load_public(public, "KeyHolder.from_bytes")
        try:
            context = ts.context_from(bytes(data[12 + plen :]), n_threads=1)
        except Exception as exc:
            raise EncryptionError(f"the saved key holder is corrupt ({exc})") from exc
        return cls(params, _context=context, _public=public)
