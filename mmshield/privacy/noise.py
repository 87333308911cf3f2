"""Randomness for privacy mechanisms: Gaussian noise and Poisson sampling decisions.

Differential privacy's guarantee assumes the adversary cannot predict the noise or who was sampled.
``secure=True`` (the default for real deployments) draws both from ChaCha20 (``cryptography``)
keyed with 32 bytes from the operating system; ``secure=False`` draws them from a ChaCha20 stream
keyed by a hash of the run seed, so research runs are reproducible bit for bit. Gaussians come
from the Box-Muller transform of 53-bit uniforms (computed in float64, cast at the end), in torch:
its vectorised, multithreaded ``log``/``cos``/``sin`` work in place on cache-sized chunks, so one
draw for a whole model's gradients (:meth:`NoiseSource.normal_like`) costs little more than
ChaCha20 itself. The values do not depend on the number of threads; float32 draws equal those of
the earlier NumPy implementation (float64 ones may differ from them in the last bit, where
NumPy's and torch's ``log``/``cos``/``sin`` round differently).

Written by hand because no maintained library offers a vectorised, cryptographically keyed normal
sampler for PyTorch tensors; the primitive itself (ChaCha20) is ``cryptography``'s.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_CHUNK = 1 << 16  # Box-Muller pairs per chunk: the float64 scratch buffers stay in cache
_MASK53 = (1 << 53) - 1


class NoiseSource:
    """A stream of uniforms and Gaussians for DP mechanisms.

    Parameters
    ----------
    secure
        Key from ``os.urandom`` (unpredictable) instead of from ``seed``.
    seed
        Run seed, used when ``secure`` is false.
    purpose
        Separates streams keyed by the same seed (e.g. ``"dpsgd-noise"``, ``"poisson"``).
    """

    def __init__(self, secure: bool, seed: int = 0, purpose: str = "noise") -> None:
        self.secure = secure
        if secure:
            key = os.urandom(32)
        else:
            key = hashlib.blake2b(f"mmshield/{purpose}/{seed}".encode(), digest_size=32).digest()
        nonce = b"\x00" * 16
        self._stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        # Scratch reused between draws (fresh buffers cost more in page faults than ChaCha20
        # itself): ``_first`` grows to the largest draw (4 bytes per Gaussian), the others to
        # one chunk.
        self._zeros = b""
        self._first = torch.empty(0, dtype=torch.int64)
        self._second = torch.empty(0, dtype=torch.int64)
        self._scratch = torch.empty(3, 0, dtype=torch.float64)

    def _uint64(self, n: int) -> np.ndarray:
        return np.frombuffer(self._stream.update(b"\x00" * (8 * n)), dtype=np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms in the open interval (0, 1)."""
        return ((self._uint64(n) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def _words_into(self, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous int64 tensor ``out`` with the stream's next 64-bit words."""
        view = out.numpy().data.cast("B")
        if len(self._zeros) < min(len(view), 8 * _CHUNK):
            self._zeros = bytes(min(len(view), 8 * _CHUNK))
        for lo in range(0, len(view), len(self._zeros)):
            hi = min(len(view), lo + len(self._zeros))
            self._stream.update_into(memoryview(self._zeros)[: hi - lo], view[lo:hi])
        return out

    def _standard_normal(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """``n`` standard Gaussians: Box-Muller in float64 of the next ``2 ceil(n / 2)`` words.

        Word ``i`` of the first half and word ``i`` of the second half make the uniforms of the
        ``i``-th pair; its cosine half goes to element ``i``, its sine half to element
        ``ceil(n / 2) + i``. The result is a fresh float32 tensor when ``dtype`` is float32
        (each float64 value rounded once), else float64.
        """
        half = (n + 1) // 2
        work = torch.float32 if dtype == torch.float32 else torch.float64
        z = torch.empty(2 * half, dtype=work)
        if half == 0:
            return z
        if self._first.numel() < half:
            self._first = torch.empty(half, dtype=torch.int64)
        if self._second.numel() < min(half, _CHUNK):
            self._second = torch.empty(min(half, _CHUNK), dtype=torch.int64)
            self._scratch = torch.empty(3, min(half, _CHUNK), dtype=torch.float64)
        first = self._words_into(self._first[:half])
        for lo in range(0, half, _CHUNK):
            hi = min(half, lo + _CHUNK)
            second = self._words_into(self._second[: hi - lo])
            u1, u2, tmp = self._scratch[:, : hi - lo]
            # In place on scratch: (word >> 11) & (2^53 - 1), + 0.5, * 2^-53 (exact scalings).
            u1.copy_(first[lo:hi].bitwise_right_shift_(11).bitwise_and_(_MASK53))
            u2.copy_(second.bitwise_right_shift_(11).bitwise_and_(_MASK53))
            radius = u1.add_(0.5).mul_(2.0**-53).log_().mul_(-2.0).sqrt_()
            angle = u2.add_(0.5).mul_(2.0**-53 * 2.0 * math.pi)  # 2 pi u, exactly as (2 pi) * u
            z[lo:hi] = torch.cos(angle, out=tmp).mul_(radius)
            z[half + lo : half + hi] = angle.sin_().mul_(radius)
        return z[:n]

    def normal(
        self,
        shape: tuple[int, ...] | torch.Size,
        std: float | torch.Tensor = 1.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Gaussian noise of ``shape`` with standard deviation ``std`` (broadcastable)."""
        z = self._standard_normal(math.prod(shape), dtype)
        out = z.reshape(tuple(shape)).to(device=device, dtype=dtype)
        return out * std

    def normal_like(self, like: Mapping[str, torch.Tensor], std: float) -> dict[str, torch.Tensor]:
        """Gaussian noise shaped like each of ``like``'s tensors, from one draw.

        The numbers are those of ``normal((total,), std)`` for the concatenation of all the
        tensors' elements (in ``like``'s order), cast to each tensor's dtype and moved to its
        device: the same stream position and the same values bit for bit as drawing them in one
        :meth:`normal` call. Float32 CPU results are views of one fresh buffer.

        Parameters
        ----------
        like
            ``name -> tensor``; only shapes, dtypes and devices are used.
        std
            Standard deviation.
        """
        if not like:
            return {}
        sizes = [v.numel() for v in like.values()]
        dtypes = {v.dtype for v in like.values()}
        work = torch.float32 if dtypes <= {torch.float32} else torch.float64
        z = self._standard_normal(sum(sizes), work)
        if work == torch.float32:
            z.mul_(std)  # as normal(): the float32 draw times std, in float32
        out: dict[str, torch.Tensor] = {}
        for (k, v), part in zip(like.items(), z.split(sizes), strict=True):
            part = part.view(v.shape).to(device=v.device, dtype=v.dtype)
            out[k] = part if work == torch.float32 else part * std
        return out
