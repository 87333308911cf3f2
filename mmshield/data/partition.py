"""Seeded partitioners: who holds which records and which modalities.

All functions are deterministic functions of their ``seed``.

Missing modalities are simulated per client: with probability ``p[m]`` a client holds no ``m`` at
all (its records keep their tensors but their presence mask for ``m`` is ``False``). A client left
with no modality at all keeps exactly one, chosen uniformly among the modalities it lost, so that
every client still holds usable data; :func:`drop_modalities` reports how many clients this
happened to (so the realised missing rate can be slightly below ``p``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from mmshield.data.dataset import MultimodalDataset
from mmshield.errors import ConfigError


def _rng(seed: int, tag: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, tag]))


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Split ``n`` records uniformly at random into ``num_clients`` near-equal parts."""
    _check_clients(n, num_clients)
    perm = _rng(seed, 1).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients in Dirichlet(α) proportions.

    Smaller ``alpha`` gives more skew (α → ∞ approaches IID). Proportions are redrawn (up to
    100 times) until every client holds at least ``min_size`` records, as in Hsu et al. (2019)
    and most FL benchmarks.

    Parameters
    ----------
    labels
        ``(N,)`` integer labels.
    num_clients
        Number of clients.
    alpha
        Dirichlet concentration (> 0).
    seed
        Seed.
    min_size
        Minimum records per client.
    """
    labels = np.asarray(labels)
    _check_clients(len(labels), num_clients)
    if alpha <= 0:
        raise ConfigError(f"partition.alpha must be > 0, got {alpha}")
    rng = _rng(seed, 2)
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(
        f"partition.alpha={alpha} with {num_clients} clients leaves some client with fewer than "
        f"{min_size} records after 100 draws; raise alpha or lower partition.clients"
    )


def quantity_skew_partition(
    n: int, num_clients: int, beta: float, seed: int, min_size: int = 2
) -> list[np.ndarray]:
    """Quantity-skewed split: client sizes follow Dirichlet(β) proportions, labels stay IID.

    Parameters
    ----------
    n
        Number of records.
    num_clients
        Number of clients.
    beta
        Dirichlet concentration of the size proportions (smaller is more skewed).
    seed
        Seed.
    min_size
        Every client gets at least this many records.
    """
    _check_clients(n, num_clients * min_size)
    if beta <= 0:
        raise ConfigError(f"partition.beta must be > 0, got {beta}")
    rng = _rng(seed, 3)
    props = rng.dirichlet(np.full(num_clients, beta))
    extra = n - num_clients * min_size
    sizes = min_size + np.floor(props * extra).astype(int)
    sizes[np.argmax(props)] += n - sizes.sum()
    perm = rng.permutation(n)
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(part) for part in np.split(perm, cuts)]


def drop_modalities(
    dataset: MultimodalDataset,
    client_indices: list[np.ndarray],
    missing: Mapping[str, float],
    seed: int,
) -> tuple[MultimodalDataset, np.ndarray, int]:
    """Remove whole modalities from some clients.

    Parameters
    ----------
    dataset
        Training records (not modified).
    client_indices
        Rows each client holds.
    missing
        ``modality -> probability`` that a client lacks that modality entirely.
    seed
        Seed.

    Returns
    -------
    dataset, holds, rescued
        A copy with updated presence masks; a ``(clients, modalities)`` bool matrix of which
        client holds which modality; and the number of clients that would have held no modality
        and were given one back.
    """
    unknown = set(missing) - set(dataset.modalities)
    if unknown:
        raise ConfigError(
            f"partition.missing_modality names {sorted(unknown)}, which the data set does not "
            f"have; its modalities are {dataset.modalities}"
        )
    for m, p in missing.items():
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"partition.missing_modality.{m} must be in [0, 1], got {p}")
    rng = _rng(seed, 4)
    mods = dataset.modalities
    probs = np.array([missing.get(m, 0.0) for m in mods])
    holds = rng.random((len(client_indices), len(mods))) >= probs
    rescued = 0
    for k in range(len(client_indices)):
        if not holds[k].any():
            holds[k, rng.integers(len(mods))] = True
            rescued += 1
    present = {m: dataset.present[m].clone() for m in mods}
    for k, rows in enumerate(client_indices):
        r = torch.as_tensor(rows, dtype=torch.int64)
        for j, m in enumerate(mods):
            if not holds[k, j]:
                present[m][r] = False
    return dataset.with_presence(present), holds, rescued


def label_counts(
    labels: np.ndarray, client_indices: list[np.ndarray], num_classes: int
) -> np.ndarray:
    """``(clients, classes)`` matrix of record counts."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[ix], minlength=num_classes) for ix in client_indices])


def _check_clients(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"partition.clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise ConfigError(
            f"cannot split {n} records among {num_clients} clients; lower partition.clients"
        )
