"""Shamir secret sharing over the prime field GF(2^31 - 1), vectorised with NumPy.

Field choice. ``P = 2^31 - 1`` (a Mersenne prime) keeps every product of two field elements below
``2^62``, so multiplication is one ``int64`` multiply followed by ``% P``, with no overflow and no
object arrays; a sum of up to ``2^32`` such reduced products still fits in ``int64`` before the
final reduction. A larger field (``2^61 - 1``) would need 128-bit products split by hand for no
gain: Shamir's secrecy is information-theoretic per field element whatever the field size, and the
field only has to hold the evaluation points (participant ids ``< P - 1``).

A byte secret (a 32-byte seed or X25519 private key) is split into 24-bit chunks, each one field
element, and all chunks of all secrets are shared at once: the polynomials are evaluated with
Horner's rule over the degree (``t - 1`` NumPy steps, each over every share x secret x chunk), and
reconstruction computes the Lagrange coefficients at 0 for a whole batch of secrets, each with its
own set of share holders, with a vectorised Fermat inverse. There is no Python loop over chunks or
shares.

Randomness for the polynomial coefficients comes from ``os.urandom``, never from NumPy's or
Python's pseudo-random generators.
"""

from __future__ import annotations

import os

import numpy as np

from mmshield.errors import SecAggError

P = (1 << 31) - 1
"""The field modulus, the Mersenne prime 2^31 - 1."""

CHUNK_BYTES = 3
"""Bytes of secret per field element (24 bits < 31 bits, so every chunk is a field element)."""


def field_elements(nbytes: int) -> int:
    """Number of field elements that hold ``nbytes`` of secret (11 for 32 bytes)."""
    return -(-nbytes // CHUNK_BYTES)


def bytes_to_field(secrets: np.ndarray) -> np.ndarray:
    """Split byte secrets into field elements.

    Parameters
    ----------
    secrets
        ``uint8`` array of shape ``(m, nbytes)``: ``m`` secrets of ``nbytes`` each.

    Returns
    -------
    numpy.ndarray
        ``int64`` array of shape ``(m, field_elements(nbytes))``, each entry in ``[0, 2^24)``.
    """
    secrets = np.asarray(secrets, dtype=np.uint8)
    if secrets.ndim != 2:
        raise SecAggError(f"bytes_to_field expects a (secrets, bytes) array, got {secrets.shape}")
    m, nbytes = secrets.shape
    padded = np.zeros((m, field_elements(nbytes) * CHUNK_BYTES), dtype=np.int64)
    padded[:, :nbytes] = secrets
    chunks = padded.reshape(m, -1, CHUNK_BYTES)
    return (chunks[..., 0] << 16) | (chunks[..., 1] << 8) | chunks[..., 2]


def field_to_bytes(elements: np.ndarray, nbytes: int) -> np.ndarray:
    """Inverse of :func:`bytes_to_field`: ``(m, L)`` field elements to ``(m, nbytes)`` bytes.

    Raises
    ------
    SecAggError
        If an element does not fit in 24 bits (the shares were inconsistent or corrupted).
    """
    elements = np.asarray(elements, dtype=np.int64)
    if elements.ndim != 2 or elements.shape[1] != field_elements(nbytes):
        raise SecAggError(
            f"field_to_bytes: expected shape (m, {field_elements(nbytes)}), got {elements.shape}"
        )
    if np.any((elements < 0) | (elements >= 1 << (8 * CHUNK_BYTES))):
        raise SecAggError(
            "a reconstructed secret chunk is outside 24 bits: the shares used were inconsistent "
            "(corrupted, from different secrets, or fewer than the threshold)"
        )
    out = np.empty((elements.shape[0], elements.shape[1], CHUNK_BYTES), dtype=np.uint8)
    out[..., 0] = elements >> 16
    out[..., 1] = (elements >> 8) & 0xFF
    out[..., 2] = elements & 0xFF
    return out.reshape(elements.shape[0], -1)[:, :nbytes]


def random_field(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform field elements in ``[0, P)`` from ``os.urandom`` (rejection sampling, no bias)."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = np.frombuffer(os.urandom(4 * count), dtype=np.uint32).astype(np.int64) & P
    bad = raw == P  # 2^31 - 1 itself is not a field element: redraw (probability 2^-31 each)
    while np.any(bad):
        nbad = int(bad.sum())
        raw[bad] = np.frombuffer(os.urandom(4 * nbad), dtype=np.uint32).astype(np.int64) & P
        bad = raw == P
    return raw.reshape(shape)


def _check_points(points: np.ndarray) -> None:
    if np.any((points <= 0) | (points >= P)):
        raise SecAggError(f"Shamir evaluation points must lie in [1, {P - 1}]")


def split(secrets: np.ndarray, points: np.ndarray, threshold: int) -> np.ndarray:
    """Share field-element secrets among holders with the given evaluation points.

    Each secret element ``s`` gets its own random polynomial ``f`` of degree ``threshold - 1``
    with ``f(0) = s``; holder ``j`` receives ``f(points[j])``. Any ``threshold`` shares determine
    ``s``; any ``threshold - 1`` reveal nothing about it.

    Parameters
    ----------
    secrets
        ``int64`` array of shape ``(m, L)`` with entries in ``[0, P)``.
    points
        Distinct evaluation points, shape ``(h,)``, in ``[1, P - 1]`` (e.g. holder id + 1).
    threshold
        Shares needed to reconstruct, ``1 <= threshold <= h``.

    Returns
    -------
    numpy.ndarray
        ``int64`` shares of shape ``(h, m, L)``.
    """
    secrets = np.asarray(secrets, dtype=np.int64)
    points = np.asarray(points, dtype=np.int64)
    h = points.shape[0]
    if not 1 <= threshold <= h:
        raise SecAggError(f"Shamir threshold must be in [1, {h}] for {h} holders, got {threshold}")
    _check_points(points)
    if len(np.unique(points)) != h:
        raise SecAggError("Shamir evaluation points must be distinct")
    if np.any((secrets < 0) | (secrets >= P)):
        raise SecAggError("Shamir secrets must be field elements in [0, P)")
    coeffs = random_field((threshold - 1, *secrets.shape))
    x = points.reshape(h, *([1] * secrets.ndim))
    # Horner from the highest coefficient: acc = acc * x + c_j, reduced at every step.
    acc = np.zeros((h, *secrets.shape), dtype=np.int64)
    for j in range(threshold - 2, -1, -1):
        acc = (acc * x + coeffs[j]) % P
    return (acc * x + secrets) % P


def _pow_mod(base: np.ndarray, exponent: int) -> np.ndarray:
    """Element-wise ``base ** exponent mod P`` by square-and-multiply (31 vector steps)."""
    result = np.ones_like(base)
    b = base % P
    e = exponent
    while e:
        if e & 1:
            result = (result * b) % P
        b = (b * b) % P
        e >>= 1
    return result


def lagrange_at_zero(points: np.ndarray) -> np.ndarray:
    """Lagrange coefficients at 0 for a batch of point sets.

    Parameters
    ----------
    points
        ``(m, t)`` evaluation points, distinct within each row.

    Returns
    -------
    numpy.ndarray
        ``(m, t)`` coefficients ``lambda_i = prod_{j != i} x_j / (x_j - x_i) mod P``.
    """
    x = np.asarray(points, dtype=np.int64)
    if x.ndim != 2:
        raise SecAggError(f"lagrange_at_zero expects (secrets, shares) points, got {x.shape}")
    _check_points(x)
    m, t = x.shape
    num = np.ones((m, t), dtype=np.int64)
    den = np.ones((m, t), dtype=np.int64)
    for j in range(t):  # loop over the t share holders, vectorised over secrets
        xj = x[:, j : j + 1]
        diff = (xj - x) % P
        mask = np.arange(t) != j
        num = np.where(mask, (num * xj) % P, num)
        den = np.where(mask, (den * diff) % P, den)
    if np.any(den == 0):
        raise SecAggError("Shamir reconstruction: evaluation points repeat within one secret")
    return (num * _pow_mod(den, P - 2)) % P


def reconstruct(points: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Reconstruct a batch of secrets, each from its own set of shares.

    Parameters
    ----------
    points
        ``(m, t)`` evaluation points of the shares used for each of ``m`` secrets.
    shares
        ``(m, t, L)`` share values: ``shares[i, j]`` is holder ``points[i, j]``'s share of
        secret ``i``.

    Returns
    -------
    numpy.ndarray
        ``(m, L)`` secrets. With at least ``threshold`` consistent shares per secret this is the
        shared value; with fewer it is an unrelated field element (Shamir cannot tell).
    """
    shares = np.asarray(shares, dtype=np.int64)
    lam = lagrange_at_zero(points)
    if shares.shape[:2] != lam.shape:
        raise SecAggError(f"reconstruct: points {lam.shape} do not match shares {shares.shape}")
    # Each product < 2^62 is reduced before summing, and t reduced terms sum below 2^63.
    return ((lam[:, :, None] * (shares % P)) % P).sum(axis=1) % P


def split_bytes(secrets: list[bytes], points: np.ndarray, threshold: int) -> np.ndarray:
    """Share byte strings of equal length: ``(h, m, field_elements(nbytes))`` shares."""
    if not secrets:
        raise SecAggError("split_bytes: no secrets given")
    nbytes = len(secrets[0])
    if any(len(s) != nbytes for s in secrets):
        raise SecAggError("split_bytes: secrets must have equal lengths")
    arr = np.frombuffer(b"".join(secrets), dtype=np.uint8).reshape(len(secrets), nbytes)
    return split(bytes_to_field(arr), points, threshold)


def reconstruct_bytes(points: np.ndarray, shares: np.ndarray, nbytes: int) -> list[bytes]:
    """Reconstruct byte secrets from ``(m, t)`` points and ``(m, t, L)`` shares."""
    elements = reconstruct(points, shares)
    raw = field_to_bytes(elements, nbytes)
    return [bytes(row) for row in raw]
