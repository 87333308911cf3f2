"""Randomness for privacy mechanisms: Gaussian noise and Poisson sampling decisions.

Differential privacy's guarantee assumes the adversary cannot predict the noise or who was sampled.
``secure=True`` (the default for real deployments) draws both from ChaCha20 (``cryptography``)
keyed with 32 bytes from the operating system; ``secure=False`` draws them from a ChaCha20 stream
keyed by a hash of the run seed, so research runs are reproducible bit for bit. Gaussians come
from the Box-Muller transform of 53-bit uniforms (computed in float64, cast at the end).

Written by hand because no maintained library offers a vectorised, cryptographically keyed normal
sampler for PyTorch tensors; the primitive itself (ChaCha20) is ``cryptography``'s.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms


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

    def _uint64(self, n: int) -> np.ndarray:
        return np.frombuffer(self._stream.update(b"\x00" * (8 * n)), dtype=np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 uniforms in the open interval (0, 1)."""
        return ((self._uint64(n) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53

    def normal(
        self,
        shape: tuple[int, ...] | torch.Size,
        std: float | torch.Tensor = 1.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Gaussian noise of ``shape`` with standard deviation ``std`` (broadcastable)."""
        n = math.prod(shape)
        half = (n + 1) // 2
        u = self.uniform(2 * half)
        radius = np.sqrt(-2.0 * np.log(u[:half]))
        angle = 2.0 * np.pi * u[half:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        out = torch.from_numpy(z.reshape(tuple(shape))).to(device=device, dtype=dtype)
        return out * std
