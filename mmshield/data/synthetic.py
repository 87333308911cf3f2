"""The ``fedprox-synthetic(α, β)`` generator of Li et al. (2020), as in ``litian96/FedProx``.

Each of 30 users draws u_k ~ N(0, α) and B_k ~ N(0, β) (α, β used as standard deviations, as in
the original code); W_k ~ N(u_k, 1) (60 × 10), b_k ~ N(u_k, 1); v_k[j] ~ N(B_k, 1);
x ~ N(v_k, diag(j^-1.2)); y = argmax softmax(x W_k + b_k). A user holds
int(lognormal(4, 2)) + 50 samples, split 90/10 into train and test.
"""

from __future__ import annotations

import numpy as np
import torch

from mmshield.data.dataset import FederatedDataset, ModalitySpec, MultimodalDataset

DIMENSION = 60
NUM_CLASSES = 10


def fedprox_synthetic(
    alpha: float = 1.0, beta: float = 1.0, num_users: int = 30, seed: int = 0
) -> FederatedDataset:
    """Generate ``synthetic(α, β)`` with its natural partition (one client per user).

    Parameters
    ----------
    alpha
        Spread of the users' models (standard deviation of u_k).
    beta
        Spread of the users' feature means (standard deviation of B_k).
    num_users
        Number of users (clients); 30 in the paper.
    seed
        Seed.

    Returns
    -------
    FederatedDataset
        One tabular modality ``"features"`` of size 60, 10 classes; the test set is the union
        of the users' 10% test splits (``test.meta["client_of_row"]`` says whose).
    """
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_users).astype(int) + 50
    mean_w = rng.normal(0, alpha, num_users)
    b_users = rng.normal(0, beta, num_users)
    cov_diag = np.power(np.arange(1, DIMENSION + 1, dtype=np.float64), -1.2)
    xs_train, ys_train, xs_test, ys_test, owner_test = [], [], [], [], []
    client_indices = []
    offset = 0
    for k in range(num_users):
        v = rng.normal(b_users[k], 1, DIMENSION)
        w = rng.normal(mean_w[k], 1, (DIMENSION, NUM_CLASSES))
        b = rng.normal(mean_w[k], 1, NUM_CLASSES)
        x = v + rng.standard_normal((sizes[k], DIMENSION)) * np.sqrt(cov_diag)
        y = np.argmax(x @ w + b, axis=1)
        n_train = int(0.9 * sizes[k])
        xs_train.append(x[:n_train])
        ys_train.append(y[:n_train])
        xs_test.append(x[n_train:])
        ys_test.append(y[n_train:])
        owner_test.append(np.full(sizes[k] - n_train, k))
        client_indices.append(np.arange(offset, offset + n_train))
        offset += n_train
    spec = ModalitySpec("features", "tabular", (DIMENSION,))
    classes = [str(c) for c in range(NUM_CLASSES)]

    def build(xs: list[np.ndarray], ys: list[np.ndarray], split: str) -> MultimodalDataset:
        x = torch.as_tensor(np.concatenate(xs), dtype=torch.float32)
        return MultimodalDataset(
            specs=[spec],
            inputs={"features": x},
            present={"features": torch.ones(x.shape[0], dtype=torch.bool)},
            labels=torch.as_tensor(np.concatenate(ys), dtype=torch.int64),
            classes=classes,
            name=f"fedprox-synthetic({alpha:g},{beta:g}) {split}",
        )

    train = build(xs_train, ys_train, "train")
    test = build(xs_test, ys_test, "test")
    test.meta["client_of_row"] = np.concatenate(owner_test)
    return FederatedDataset(train=train, client_indices=client_indices, test=test)
