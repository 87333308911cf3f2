"""Fixed-point encoding of float updates into Z_{2^b} for secure aggregation.

A value ``x`` is clipped to ``[-c, c]`` (``c = clip_range``), multiplied by ``scale`` and rounded
to the nearest integer ``q``, stored in two's complement mod ``2^b``. The sum of ``n`` encodings is
decoded by reading it as a signed ``b``-bit integer and dividing by ``scale``; this is exact as long
as the true integer sum stays inside ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, which
:class:`FixedPointEncoder` guarantees at construction:

    n * q_max <= 2^(b-1) - 1,   q_max = floor(c * scale + 1/2)

(the same as ``n * (2 c scale) < 2^b`` up to rounding). A configuration that could overflow is
refused with a message that says which of bits, range, precision or client count to change.

Values outside ``[-c, c]`` are clipped **and counted**: :meth:`FixedPointEncoder.encode` returns
the count with the encoding, and the caller must report it (a masked update hides its values from
the server, so the client is the only one who can). Non-finite values are refused outright.

Precision: each value is rounded by at most ``1 / (2 scale)``, so a decoded sum of ``n`` unclipped
updates is within ``n / (2 scale)`` of the float sum, plus float64 rounding
(:attr:`FixedPointEncoder.max_sum_error`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from mmshield.crypto.prg import ring_dtype
from mmshield.errors import ConfigError, SecAggError


class SecAggConfigError(SecAggError, ConfigError):
    """A secure-aggregation configuration cannot be used safely (the message says how to fix)."""


class EncodedUpdate(NamedTuple):
    """An update encoded into Z_{2^b}.

    Attributes
    ----------
    values
        The encoding, ``uint32`` (``bits <= 32``) or ``uint64``.
    clipped
        How many input values lay outside ``[-clip_range, clip_range]`` and were clipped.
    """

    values: np.ndarray
    clipped: int


class FixedPointEncoder:
    """Encode float vectors into Z_{2^bits} so that the sum of ``num_clients`` cannot overflow.

    Parameters
    ----------
    bits
        Ring size exponent ``b`` (2..64); 32 keeps uploads at 4 bytes per value.
    clip_range
        ``c``: values are clipped to ``[-c, c]`` (and counted when they are).
    num_clients
        The most encodings that will ever be summed (the cohort size).
    scale
        Fixed-point scale (``1 / scale`` is the resolution). ``None`` picks the largest power of
        two that cannot overflow, i.e. the finest precision the ring allows.

    Raises
    ------
    SecAggConfigError
        If the sum of ``num_clients`` values of magnitude ``c * scale`` does not fit in ``b`` bits.
    """

    def __init__(
        self, bits: int, clip_range: float, num_clients: int, scale: float | None = None
    ) -> None:
        if not 2 <= bits <= 64:
            raise SecAggConfigError(f"secure_aggregation.bits must be in [2, 64], got {bits}")
        if not (math.isfinite(clip_range) and clip_range > 0):
            raise SecAggConfigError(
                f"secure_aggregation.clip_range must be a positive number, got {clip_range}"
            )
        if num_clients < 1:
            raise SecAggConfigError(f"num_clients must be at least 1, got {num_clients}")
        self.bits = bits
        self.clip_range = float(clip_range)
        self.num_clients = num_clients
        self.dtype = ring_dtype(bits)
        limit = (1 << (bits - 1)) - 1
        if scale is None:
            # Largest power of two with n * (c * scale + 1/2) <= limit.
            room = limit / num_clients - 0.5
            if room <= 0:
                raise SecAggConfigError(self._overflow_message(1.0, limit))
            scale = 2.0 ** math.floor(math.log2(room / self.clip_range))
        if not (math.isfinite(scale) and scale > 0):
            raise SecAggConfigError(f"secure_aggregation.scale must be positive, got {scale}")
        self.scale = float(scale)
        self.q_max = math.floor(self.clip_range * self.scale + 0.5)
        if num_clients * self.q_max > limit:
            raise SecAggConfigError(self._overflow_message(self.scale, limit))
        if self.q_max < 1:
            raise SecAggConfigError(
                f"secure_aggregation: with bits={bits}, clip_range={clip_range} and "
                f"{num_clients} clients the resolution 1/scale = {1 / self.scale:g} exceeds the "
                "clip range, so every value would encode to 0. Use more bits, fewer clients per "
                "aggregate or a larger clip_range."
            )
        # float32 input may be encoded in float32 arithmetic with the very same result: scaling
        # by a power of two is exact, the clip bound is a float32 value, and every rounded
        # value fits in int32 (|q| <= q_max < 2^31 when bits <= 32).
        mantissa, exponent = math.frexp(self.scale)
        self._float32_exact = (
            bits <= 32
            and mantissa == 0.5
            and -100 < exponent < 100
            and float(np.float32(self.clip_range)) == self.clip_range
        )

    def _overflow_message(self, scale: float, limit: int) -> str:
        n, c = self.num_clients, self.clip_range
        worst = n * math.floor(c * scale + 0.5)
        need_bits = max(2, math.ceil(math.log2(max(worst, 1) + 1)) + 1)
        max_c = (limit / n - 0.5) / scale
        max_scale = (limit / n - 0.5) / c
        max_n = limit // max(1, math.floor(c * scale + 0.5))
        fixes = [f"bits >= {need_bits}"]
        if max_c > 0:
            fixes.append(f"clip_range <= {max_c:.4g}")
        if max_scale > 0:
            fixes.append(f"scale <= {max_scale:.4g} (fewer bits of precision)")
        if max_n >= 1:
            fixes.append(f"at most {max_n} clients per aggregate")
        return (
            f"secure_aggregation: the sum of {n} clients' values in [-{c:g}, {c:g}] at scale "
            f"{scale:g} can reach ±{worst}, but {self.bits}-bit arithmetic holds only ±{limit}; "
            f"the sum would wrap around silently. Fix one of: {', '.join(fixes)}."
        )

    @property
    def resolution(self) -> float:
        """Quantisation step ``1 / scale``."""
        return 1.0 / self.scale

    @property
    def max_sum_error(self) -> float:
        """Bound on ``|decode(sum) - float sum|`` for ``num_clients`` unclipped updates.

        Rounding to the grid (``1 / (2 scale)`` per value) plus float64 rounding of the decoded
        and float sums (``c * 2^-52`` per value, which dominates only for ``bits`` near 64).
        """
        return self.num_clients * (0.5 / self.scale + self.clip_range * 2.0**-52)

    def encode(self, x: np.ndarray) -> EncodedUpdate:
        """Clip, scale, round and wrap ``x`` into Z_{2^bits}.

        Parameters
        ----------
        x
            Float vector (any shape; flattened).

        Returns
        -------
        EncodedUpdate
            The encoding and the number of values that were clipped.

        Raises
        ------
        SecAggError
            If ``x`` holds NaN or infinite values.
        """
        v = np.asarray(x).ravel()
        single = v.dtype == np.float32 and self._float32_exact
        if not single:
            v = v.astype(np.float64, copy=False)
        c = self.clip_range
        clipped = 0
        # min/max are NaN when a NaN is present, so one check covers range and finiteness.
        if v.size and not (-c <= float(v.min()) and float(v.max()) <= c):
            finite = np.isfinite(v)
            if not finite.all():
                bad = int((~finite).sum())
                raise SecAggError(
                    f"cannot encode an update with {bad} non-finite value(s) (first at index "
                    f"{int(np.argmin(finite))}); check the client's training for divergence"
                )
            clipped = int(np.count_nonzero((v < -c) | (v > c)))
            scaled = np.clip(v, -c, c)
            scaled *= self.scale
        else:
            scaled = v * self.scale
        np.rint(scaled, out=scaled)
        if single:
            words = scaled.astype(np.int32).view(np.uint32)
            if self.bits < 32:
                words &= np.uint32((1 << self.bits) - 1)
            return EncodedUpdate(words, clipped)
        q = scaled.astype(np.int64)
        if self.bits == 64:
            return EncodedUpdate(q.view(np.uint64), clipped)
        values = (q & ((1 << self.bits) - 1)).astype(self.dtype)
        return EncodedUpdate(values, clipped)

    def decode(self, total: np.ndarray, num_included: int) -> np.ndarray:
        """Decode a sum of ``num_included`` encodings to float64.

        Raises
        ------
        SecAggError
            If more encodings were summed than the encoder was configured for (the sum may have
            wrapped around).
        """
        if not 0 <= num_included <= self.num_clients:
            raise SecAggError(
                f"decode: {num_included} updates summed but the encoder was sized for "
                f"{self.num_clients}; the sum may have overflowed {self.bits} bits"
            )
        t = np.asarray(total)
        if self.bits == 64:
            signed = t.astype(np.uint64).view(np.int64)
        else:
            signed = (t.astype(np.int64)) & ((1 << self.bits) - 1)
            signed = np.where(signed >= 1 << (self.bits - 1), signed - (1 << self.bits), signed)
        return signed.astype(np.float64) / self.scale
