"""Homomorphically encrypted aggregation in the simulator: the server adds ciphertexts only.

Each round the reporting clients' contributions (weighted updates, weights and training losses,
flattened as for secure aggregation) are encrypted with
:class:`~mmshield.crypto.ckks.UpdateEncryptor` under the key holder's public key, serialised to
bytes, added by an :class:`~mmshield.crypto.ckks.Aggregator` that holds only the public
context, and the sum is
decrypted by the :class:`~mmshield.crypto.ckks.KeyHolder`. One key pair serves the whole run
(generated when the run starts, as a designated key holder would). A client that drops out simply
sends nothing: the sum is over those that reported.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mmshield.crypto.ckks import Aggregator, HEParams, KeyHolder, UpdateEncryptor

BYTES_PER_FLOAT32 = 4


@dataclass(frozen=True)
class EncryptedRound:
    """What encrypted aggregation did in one round (for the run's records and report)."""

    clients: int
    clipped_values: int
    """Values outside ``[-clip_range, clip_range]`` that were clipped before encryption."""
    ciphertext_bytes: int
    """Bytes the clients uploaded (serialised encrypted updates)."""
    plaintext_bytes: int
    """What the same contributions would have been as float32."""
    seconds: float
    """Encryption by the clients, addition by the server and decryption by the key holder."""


class EncryptedSum:
    """Sums per-client vectors under homomorphic encryption (see :mod:`mmshield.crypto.ckks`).

    Parameters
    ----------
    max_clients
        The most contributions one sum holds (sizes the plaintext headroom).
    clip_range
        Values are quantised in ``[-clip_range, clip_range]``; outside they are clipped and
        counted (:attr:`EncryptedRound.clipped_values`).
    max_bytes_per_param
        Ciphertext budget: the finest fixed-point scale that fits it is used.
    key_holder
        ``client``: one designated client holds the secret key; ``shared``: every client does
        (the ciphertexts are the same; only who must not collude with the server changes).

    Raises
    ------
    mmshield.crypto.ckks.HEConfigError
        If the sums of ``max_clients`` updates cannot fit the budget.
    """

    def __init__(
        self,
        max_clients: int,
        clip_range: float = 1.0,
        max_bytes_per_param: float = 10.0,
        key_holder: Literal["client", "shared"] = "client",
    ) -> None:
        self.params = HEParams.choose(
            max(2, max_clients), clip_range, max_bytes_per_param=max_bytes_per_param
        )
        self.key_holder = key_holder
        self._keys = KeyHolder(self.params)
        self.public_context = self._keys.public_context()
        self._encryptor = UpdateEncryptor(self.public_context)
        self.rounds: list[EncryptedRound] = []

    def sum(
        self, contributions: Mapping[int, np.ndarray], where: str = "round"
    ) -> tuple[np.ndarray, tuple[int, ...], EncryptedRound] | None:
        """The decrypted sum of the contributions (``None`` when no client reported).

        Returns
        -------
        total, included, record
            The float64 sum, the clients in it and what the round did.
        """
        if not contributions:
            return None
        start = time.perf_counter()
        dim = len(next(iter(contributions.values())))
        server = Aggregator(self.public_context, dim)
        clipped = uploaded = 0
        for c in sorted(contributions):
            encrypted = self._encryptor.encrypt(contributions[c], client=f"{where}, client {c}")
            clipped += encrypted.clipped or 0  # the client reports it; not in the ciphertext
            blob = encrypted.to_bytes()
            uploaded += len(blob)
            server.add(blob, client=f"{where}, client {c}")
        total = self._keys.decrypt(server.result().to_bytes(), min_count=len(contributions))
        record = EncryptedRound(
            clients=len(contributions),
            clipped_values=clipped,
            ciphertext_bytes=uploaded,
            plaintext_bytes=len(contributions) * dim * BYTES_PER_FLOAT32,
            seconds=time.perf_counter() - start,
        )
        self.rounds.append(record)
        return total, tuple(sorted(contributions)), record
