"""Partitioners are deterministic under a seed and follow their parameters."""

from __future__ import annotations

import numpy as np
import pytest

from mmshield.data.partition import (
    dirichlet_partition,
    drop_modalities,
    iid_partition,
    label_counts,
    quantity_skew_partition,
)
from mmshield.data.synthetic import fedprox_synthetic
from mmshield.errors import ConfigError

from conftest import make_toy

LABELS = np.repeat(np.arange(10), 300)


def _is_partition(parts: list[np.ndarray], n: int) -> bool:
    allrows = np.concatenate(parts)
    return len(allrows) == n and len(np.unique(allrows)) == n


@pytest.mark.parametrize(
    "split",
    [
        lambda s: iid_partition(3000, 20, s),
        lambda s: dirichlet_partition(LABELS, 20, 0.5, s),
        lambda s: quantity_skew_partition(3000, 20, 0.5, s),
    ],
)
def test_deterministic_and_complete(split) -> None:
    a, b, c = split(1), split(1), split(2)
    assert _is_partition(a, 3000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _mean_label_entropy(parts: list[np.ndarray]) -> float:
    counts = label_counts(LABELS, parts, 10).astype(float)
    p = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return float(ent.mean())


def test_dirichlet_follows_alpha() -> None:
    ent = {
        a: np.mean([_mean_label_entropy(dirichlet_partition(LABELS, 20, a, s)) for s in range(5)])
        for a in (0.1, 0.5, 100.0)
    }
    assert ent[0.1] < ent[0.5] < ent[100.0]
    assert ent[100.0] > 0.95 * np.log(10)  # near IID
    assert ent[0.1] < 0.5 * np.log(10)  # few classes per client


def test_quantity_skew_varies_sizes_not_labels() -> None:
    parts = quantity_skew_partition(3000, 20, 0.3, seed=0)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 2 and sizes.max() > 5 * np.median(sizes) / 2
    iid_sizes = np.array([len(p) for p in iid_partition(3000, 20, 0)])
    assert sizes.std() > 10 * iid_sizes.std()


def test_missing_modalities_per_client() -> None:
    data = make_toy(n=400)
    parts = iid_partition(400, 200, seed=0)
    out, holds, rescued = drop_modalities(
        data, parts, {"image": 0.3, "text": 0.6, "tab": 0.0}, seed=0
    )
    assert abs(1 - holds[:, 0].mean() - 0.3) < 0.08
    assert abs(1 - holds[:, 1].mean() - 0.6) < 0.08
    assert holds[:, 2].all() and rescued == 0
    for k, rows in enumerate(parts):
        for j, m in enumerate(out.modalities):
            assert bool(out.present[m][rows].all()) == bool(holds[k, j])
            assert bool(out.present[m][rows].any()) == bool(holds[k, j])
    again = drop_modalities(data, parts, {"image": 0.3, "text": 0.6}, seed=0)[1]
    assert np.array_equal(holds, again)


def test_client_with_no_modality_keeps_one() -> None:
    data = make_toy(n=100)
    parts = iid_partition(100, 50, seed=0)
    _, holds, rescued = drop_modalities(data, parts, dict.fromkeys(data.modalities, 1.0), seed=0)
    assert rescued == 50 and (holds.sum(1) == 1).all()


def test_bad_partition_parameters_are_named() -> None:
    with pytest.raises(ConfigError, match=r"partition\.alpha"):
        dirichlet_partition(LABELS, 5, 0.0, 0)
    with pytest.raises(ConfigError, match=r"partition\.clients"):
        iid_partition(10, 20, 0)
    with pytest.raises(ConfigError, match="missing_modality"):
        drop_modalities(make_toy(10), [np.arange(10)], {"video": 0.5}, 0)


def test_fedprox_synthetic_matches_definition() -> None:
    fed = fedprox_synthetic(1.0, 1.0, seed=0)
    assert fed.num_clients == 30
    assert fed.train.spec("features").shape == (60,)
    sizes = np.array([len(ix) for ix in fed.client_indices])
    assert sizes.min() >= int(0.9 * 50)

    # Heterogeneity: users' label distributions differ a lot for (1, 1) and less for (0, 0).
    def spread(f) -> float:
        c = label_counts(f.train.labels.numpy(), f.client_indices, 10).astype(float)
        p = c / c.sum(1, keepdims=True)
        return float(np.abs(p - p.mean(0)).sum(1).mean())

    assert spread(fed) > spread(fedprox_synthetic(0.0, 0.0, seed=0))
    again = fedprox_synthetic(1.0, 1.0, seed=0)
    assert np.array_equal(
        fed.train.inputs["features"].numpy(), again.train.inputs["features"].numpy()
    )
