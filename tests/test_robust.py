"""Robust aggregators against Flower's (the oracle), a hand-computed FLTrust round, attacks, and
missing modalities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmshield.errors import ConfigError
from mmshield.fl.aggregate import ModalityAwareMean
from mmshield.fl.robust import (
    ROBUST_AGGREGATORS,
    Bulyan,
    CoordinateMedian,
    FLTrust,
    Krum,
    MultiKrum,
    NormBound,
    TrimmedMean,
    make_robust_aggregator,
    parameter_weights,
)

flwr = pytest.importorskip("flwr")
from flwr.server.strategy.aggregate import (  # noqa: E402
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

SHAPES = {"encoders.image.w": (3, 4), "fusion.b": (5,), "head.w": (2, 3)}


def _stack(rng: np.random.Generator, k: int, dtype: type = np.float64) -> dict[str, torch.Tensor]:
    return {n: torch.as_tensor(rng.normal(size=(k, *s)).astype(dtype)) for n, s in SHAPES.items()}


def _flower(deltas: dict[str, torch.Tensor], examples: list[int]) -> list[tuple[list, int]]:
    """Flower's layout: one (list of arrays in parameter order, num_examples) per client."""
    k = len(examples)
    return [([deltas[n][i].numpy() for n in SHAPES], examples[i]) for i in range(k)]


def _equal(k: int, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    return {n: torch.ones(k, dtype=dtype) for n in SHAPES}


def _close(mean: dict[str, torch.Tensor], ref: list[np.ndarray], tol: float = 1e-10) -> None:
    assert list(mean) == list(SHAPES)
    for (name, got), want in zip(mean.items(), ref, strict=True):
        np.testing.assert_allclose(got.numpy(), want, rtol=tol, atol=tol, err_msg=name)


# -- agreement with Flower ---------------------------------------------------------------------


@pytest.mark.parametrize("k", [7, 10])
def test_median_matches_flower(k: int) -> None:
    rng = np.random.default_rng(k)
    deltas = _stack(rng, k)
    got = CoordinateMedian().aggregate(deltas, _equal(k))
    _close(got.mean, aggregate_median(_flower(deltas, [1] * k)))
    assert got.selected.all()


@pytest.mark.parametrize(("k", "beta"), [(10, 0.0), (10, 0.2), (11, 0.25), (9, 0.49)])
def test_trimmed_mean_matches_flower(k: int, beta: float) -> None:
    rng = np.random.default_rng(int(beta * 100) + k)
    deltas = _stack(rng, k)
    got = TrimmedMean(beta).aggregate(deltas, _equal(k))
    _close(got.mean, aggregate_trimmed_avg(_flower(deltas, [1] * k), beta))


@pytest.mark.parametrize(("k", "f"), [(7, 1), (11, 2), (12, 3)])
def test_krum_matches_flower(k: int, f: int) -> None:
    rng = np.random.default_rng(100 + k)
    deltas = _stack(rng, k)
    got = Krum(f).aggregate(deltas, _equal(k))
    ref = aggregate_krum(_flower(deltas, [1] * k), num_malicious=f, to_keep=0)
    _close(got.mean, ref, tol=0)  # Krum returns the chosen client's update itself
    assert got.selected.sum() == 1
    chosen = int(np.flatnonzero(got.selected)[0])
    assert chosen == int(np.nanargmin(got.scores))
    assert all(
        np.array_equal(deltas[n][chosen].numpy(), r) for n, r in zip(SHAPES, ref, strict=True)
    )


@pytest.mark.parametrize(("k", "f", "m"), [(10, 2, 5), (11, 1, 10), (9, 3, 4)])
def test_multi_krum_matches_flower(k: int, f: int, m: int) -> None:
    # Flower's Multi-Krum averages the kept clients weighted by num_examples; passing the same
    # num_examples as every parameter's weight is the matching convention. (The paper averages
    # unweighted: equal weights, tested below.)
    rng = np.random.default_rng(200 + k)
    deltas = _stack(rng, k)
    examples = [int(x) for x in rng.integers(5, 50, size=k)]
    w = {n: torch.tensor(examples, dtype=torch.float64) for n in SHAPES}
    got = MultiKrum(f, m).aggregate(deltas, w)
    _close(got.mean, aggregate_krum(_flower(deltas, examples), num_malicious=f, to_keep=m))
    assert got.selected.sum() == m
    # The kept clients are those with the m lowest scores.
    assert set(np.flatnonzero(got.selected)) == set(np.argsort(got.scores)[:m])
    equal = MultiKrum(f, m).aggregate(deltas, _equal(k))
    rows = torch.as_tensor(equal.selected)
    for n in SHAPES:
        torch.testing.assert_close(equal.mean[n], deltas[n][rows].mean(dim=0))


@pytest.mark.parametrize(("k", "f"), [(11, 2), (15, 2), (8, 1), (3, 0)])
def test_bulyan_matches_flower(k: int, f: int) -> None:
    rng = np.random.default_rng(300 + k)
    deltas = _stack(rng, k)
    got = Bulyan(f).aggregate(deltas, _equal(k))
    ref = aggregate_bulyan(
        _flower(deltas, [1] * k), num_malicious=f, aggregation_rule=aggregate_krum, to_keep=0
    )
    _close(got.mean, ref)
    assert got.selected.sum() == k - 2 * f


def test_float32_agrees_with_flower() -> None:
    rng = np.random.default_rng(5)
    k = 11
    deltas = _stack(rng, k, np.float32)
    flower = _flower(deltas, [1] * k)
    w = _equal(k, torch.float32)
    _close(CoordinateMedian().aggregate(deltas, w).mean, aggregate_median(flower), 1e-6)
    _close(TrimmedMean(0.2).aggregate(deltas, w).mean, aggregate_trimmed_avg(flower, 0.2), 1e-6)
    _close(Krum(2).aggregate(deltas, w).mean, aggregate_krum(flower, 2, 0), 0)
    ref = aggregate_bulyan(list(flower), 2, aggregate_krum, to_keep=0)
    _close(Bulyan(2).aggregate(deltas, w).mean, ref, 1e-6)


# -- FLTrust and norm bounding -----------------------------------------------------------------


def test_fltrust_hand_computed() -> None:
    # Root g0 = (3, 4), |g0| = 5.
    #   g1 = (6, 8):   cos 1,   trust 1,   rescaled to (3, 4)
    #   g2 = (1, 0):   cos 0.6, trust 0.6, rescaled to (5, 0)
    #   g3 = (-3, -4): cos -1,  trust 0
    # mean = (1 * (3, 4) + 0.6 * (5, 0)) / 1.6 = (6, 4) / 1.6 = (3.75, 2.5)
    deltas = {"head.w": torch.tensor([[6.0, 8.0], [1.0, 0.0], [-3.0, -4.0]], dtype=torch.float64)}
    weights = {"head.w": torch.tensor([10.0, 1.0, 100.0], dtype=torch.float64)}  # no effect
    root = {"head.w": torch.tensor([3.0, 4.0], dtype=torch.float64)}
    got = FLTrust().aggregate(deltas, weights, root)
    torch.testing.assert_close(got.mean["head.w"], torch.tensor([3.75, 2.5], dtype=torch.float64))
    np.testing.assert_allclose(got.scores, [0.0, 0.4, 2.0], atol=1e-12)
    np.testing.assert_allclose(got.details["trust"], [1.0, 0.6, 0.0], atol=1e-12)
    assert got.selected.tolist() == [True, True, False]


def test_fltrust_over_held_parameters() -> None:
    # Client 1 lacks the image modality: its (garbage) image row is ignored; its cosine and
    # rescaling use the head only. Root g0 = image (1, 0), head (0, 2).
    #   client 0: image (2, 0), head (0, 4): cos 1, |g0| / |g0 on all| = sqrt(5)/sqrt(20) = 0.5
    #             rescaled: image (1, 0), head (0, 2), trust 1
    #   client 1: head (3, 3): cos over head = 6 / (sqrt(18) * 2) = 1/sqrt(2) -> trust 0.7071
    #             rescaled to |g0 on head| = 2: head (sqrt(2), sqrt(2))
    # image = (1, 0) (only client 0 holds it); head = (1 * (0, 2) + t * (s, s)) / (1 + t)
    nan = float("nan")
    deltas = {
        "encoders.image.w": torch.tensor([[2.0, 0.0], [nan, 1e9]], dtype=torch.float64),
        "head.w": torch.tensor([[0.0, 4.0], [3.0, 3.0]], dtype=torch.float64),
    }
    weights = {
        "encoders.image.w": torch.tensor([5.0, 0.0], dtype=torch.float64),
        "head.w": torch.tensor([5.0, 5.0], dtype=torch.float64),
    }
    root = {
        "encoders.image.w": torch.tensor([1.0, 0.0], dtype=torch.float64),
        "head.w": torch.tensor([0.0, 2.0], dtype=torch.float64),
    }
    got = FLTrust().aggregate(deltas, weights, root)
    t, s = 1 / np.sqrt(2), np.sqrt(2)
    head = (np.array([0.0, 2.0]) + t * np.array([s, s])) / (1 + t)
    np.testing.assert_allclose(got.mean["encoders.image.w"].numpy(), [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(got.mean["head.w"].numpy(), head, atol=1e-12)
    np.testing.assert_allclose(got.details["trust"], [1.0, t], atol=1e-12)


def test_fltrust_needs_root() -> None:
    deltas = {"head.w": torch.ones(3, 2)}
    with pytest.raises(ValueError, match="root update"):
        FLTrust().aggregate(deltas, {"head.w": torch.ones(3)})


def test_fltrust_untrusted_parameter_is_skipped() -> None:
    deltas = {"head.w": -torch.ones(3, 2)}
    got = FLTrust().aggregate(deltas, {"head.w": torch.ones(3)}, {"head.w": torch.ones(2)})
    assert got.mean == {}
    assert got.skipped == ("head.w",)
    assert not got.selected.any()


def test_norm_bound_clips_then_weighted_mean() -> None:
    deltas = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "b": torch.tensor([[0.0], [0.0]])}
    weights = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([1.0, 3.0])}
    got = NormBound(1.0).aggregate(deltas, weights)
    # client 0 (norm 5) is clipped to (0.6, 0.8); client 1 (norm 0.5) is kept.
    want = (torch.tensor([0.6, 0.8]) + 3 * torch.tensor([0.3, 0.4])) / 4
    torch.testing.assert_close(got.mean["a"], want)
    np.testing.assert_allclose(got.scores, [5.0, 0.5], rtol=1e-6)
    assert got.details["clipped"].tolist() == [True, False]


def test_norm_bound_without_clipping_is_modality_aware_mean() -> None:
    rng = np.random.default_rng(9)
    k = 6
    deltas = _stack(rng, k, np.float32)
    examples = torch.tensor([5.0, 7.0, 1.0, 3.0, 9.0, 2.0])
    modality = {"image": torch.tensor([5.0, 0.0, 1.0, 0.0, 4.0, 2.0])}
    acc = ModalityAwareMean({n: v[0] for n, v in deltas.items()})
    acc.add(deltas, examples, modality)
    weights = parameter_weights(list(deltas), examples, modality)
    got = NormBound(1e9).aggregate(deltas, weights)
    for n, v in acc.mean().items():
        torch.testing.assert_close(got.mean[n], v)


# -- robustness --------------------------------------------------------------------------------


def _attacked(attack: str, k: int = 20, bad: int = 4, d: int = 40, seed: int = 0):
    """``k`` updates, the last ``bad`` of them malicious; returns deltas and the honest mean."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(d, generator=g, dtype=torch.float64)
    honest = center + 0.3 * torch.randn(k - bad, d, generator=g, dtype=torch.float64)
    if attack == "sign_flip":
        evil = -4.0 * honest[:bad]
    else:
        evil = 30.0 * torch.randn(bad, d, generator=g, dtype=torch.float64)
    stacked = torch.cat([honest, evil])
    deltas = {"head.w": stacked[:, :30].reshape(k, 5, 6), "fusion.b": stacked[:, 30:]}
    mean = honest.mean(dim=0)
    return deltas, {"head.w": mean[:30].reshape(5, 6), "fusion.b": mean[30:]}, center


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in b)))


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian"])
def test_robust_aggregators_resist_attack(attack: str) -> None:
    k, bad = 20, 4
    deltas, honest, center = _attacked(attack, k, bad)
    weights = {n: torch.ones(k, dtype=torch.float64) for n in deltas}
    plain = {n: v.mean(dim=0) for n, v in deltas.items()}
    plain_err = _distance(plain, honest)
    root = {n: v + 0.05 * torch.ones_like(v) for n, v in honest.items()}  # a clean root update
    aggs = {
        "median": CoordinateMedian(bad),
        "trimmed_mean": TrimmedMean(0.2, bad),
        "krum": Krum(bad),
        "multi_krum": MultiKrum(bad),
        "bulyan": Bulyan(bad),
        "fltrust": FLTrust(),
        "norm_bound": NormBound(float(center.norm()) * 1.5),
    }
    flat = torch.cat([v.reshape(k, -1) for v in deltas.values()], dim=1)[: k - bad]
    mean = torch.cat([v.reshape(-1) for v in honest.values()])
    radius = float((flat - mean).norm(dim=1).max())  # the honest cloud around its mean
    for name, agg in aggs.items():
        got = agg.aggregate(deltas, weights, root)
        err = _distance(got.mean, honest)
        assert err < plain_err, (name, err, plain_err)
        if isinstance(agg, NormBound):
            # Norm bounding only limits the damage: each attacker moves the mean by at most
            # (|honest mean| + bound) / K.
            limit = bad / k * (_distance(honest, {n: 0 * v for n, v in honest.items()}) + agg.bound)
            assert err <= limit + 1e-9, (err, limit)
        else:
            assert err < radius, (name, err, radius)
            assert err < plain_err / 3, (name, err, plain_err)
        # The attackers score highest.
        assert set(np.argsort(got.scores)[-bad:]) == set(range(k - bad, k)), (name, got.scores)
        if name in ("krum", "multi_krum", "bulyan"):
            assert not got.selected[k - bad :].any(), name
        if name == "fltrust":  # a random direction may keep a little trust, never much
            trust = got.details["trust"]
            assert trust[k - bad :].max() < 0.5 * trust[: k - bad].min(), trust
    assert plain_err > radius


# -- missing modalities ------------------------------------------------------------------------


def _partial(k: int = 9, seed: int = 1):
    """Clients 0-2 lack the image modality (weight 0, garbage rows)."""
    rng = np.random.default_rng(seed)
    deltas = _stack(rng, k)
    deltas["encoders.image.w"][:3] = float("nan")
    deltas["encoders.image.w"][1] = 1e12
    examples = torch.tensor(rng.integers(5, 50, size=k), dtype=torch.float64)
    image = examples.clone()
    image[:3] = 0
    return deltas, parameter_weights(list(deltas), examples, {"image": image})


@pytest.mark.parametrize("agg", [CoordinateMedian(), TrimmedMean(0.2)])
def test_coordinate_wise_over_holders(agg) -> None:
    deltas, weights = _partial()
    got = agg.aggregate(deltas, weights)
    holders = {n: v[3:] for n, v in deltas.items()}
    want = agg.aggregate(holders, {n: w[3:] for n, w in weights.items()}).mean
    torch.testing.assert_close(got.mean["encoders.image.w"], want["encoders.image.w"])
    # Shared parameters still use every client.
    full = agg.aggregate(
        {n: v for n, v in deltas.items() if n != "encoders.image.w"},
        {n: w for n, w in weights.items() if n != "encoders.image.w"},
    )
    torch.testing.assert_close(got.mean["head.w"], full.mean["head.w"])
    assert np.isfinite(got.scores).all()


def test_krum_distances_over_common_parameters() -> None:
    deltas, weights = _partial()
    got = MultiKrum(1, 4).aggregate(deltas, weights)
    assert np.isfinite(got.scores).all()  # the garbage image rows play no part
    # The image encoder is the weighted mean over the selected clients that hold it.
    rows = got.selected.copy()
    rows[:3] = False
    w = weights["encoders.image.w"][rows]
    want = torch.tensordot(w / w.sum(), deltas["encoders.image.w"][rows], dims=1)
    if rows.any():
        torch.testing.assert_close(got.mean["encoders.image.w"], want)
    # The distance formula on three clients, client 0 lacking the image (N = 3 coordinates):
    x = {
        "encoders.image.w": torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]]),
        "head.w": torch.tensor([[0.0], [2.0], [1.0]]),
    }
    w3 = {"encoders.image.w": torch.tensor([0.0, 1.0, 1.0]), "head.w": torch.ones(3)}
    # d2(0, 1) = (0-2)^2 * 3 / 1 = 12; d2(0, 2) = 1 * 3 = 3; d2(1, 2) = 4 + 1 + 1 = 6.
    # Krum with f=0, K=3: one nearest neighbour: scores 3, 6, 3.
    s = Krum(0).aggregate(x, w3).scores
    np.testing.assert_allclose(s, [3.0, 6.0, 3.0])


def test_krum_result_leaves_out_parameters_nobody_selected_holds() -> None:
    # Client 0 is the Krum choice and lacks audio: audio is not moved this round.
    x = {
        "encoders.audio.w": torch.tensor([[9.0], [5.0], [-5.0], [0.0], [0.0]]),
        "head.w": torch.tensor([[0.0], [0.1], [-0.1], [0.2], [-0.2]]),
    }
    w = {
        "encoders.audio.w": torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]),
        "head.w": torch.ones(5),
    }
    got = Krum(0).aggregate(x, w)
    assert int(np.flatnonzero(got.selected)[0]) == 0
    assert "encoders.audio.w" not in got.mean
    assert got.skipped == ("encoders.audio.w",)


def test_bulyan_over_holders() -> None:
    deltas, weights = _partial(k=11)
    got = Bulyan(2).aggregate(deltas, weights)
    assert np.isfinite(got.scores).all()
    assert got.selected.sum() == 11 - 4
    for v in got.mean.values():
        assert torch.isfinite(v).all()
    # The image encoder comes only from selected holders: its value is a mean of their values.
    rows = torch.as_tensor(got.selected & (weights["encoders.image.w"] > 0).numpy())
    held = deltas["encoders.image.w"][rows]
    assert (got.mean["encoders.image.w"] >= held.min(dim=0).values - 1e-12).all()
    assert (got.mean["encoders.image.w"] <= held.max(dim=0).values + 1e-12).all()


def test_client_holding_nothing_is_absent() -> None:
    rng = np.random.default_rng(3)
    deltas = _stack(rng, 8)
    weights = _equal(8)
    for w in weights.values():
        w[7] = 0
    got = Krum(2).aggregate(deltas, weights)
    assert np.isnan(got.scores[7]) and not got.selected[7]
    ref = Krum(2).aggregate({n: v[:7] for n, v in deltas.items()}, _equal(7))
    np.testing.assert_allclose(got.scores[:7], ref.scores)
    two_absent = {n: torch.cat([torch.ones(6), torch.zeros(2)]).double() for n in SHAPES}
    with pytest.raises(ConfigError, match="6 arrived"):
        Krum(2).aggregate(deltas, two_absent)


# -- configuration and input errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("krum", {"f": 2, "num_clients": 6}, r"K > 2f \+ 2.*6 arrived"),
        ("multi_krum", {"f": 1, "m": 9, "num_clients": 9}, r"K >= m \+ f.*server\.robust\.m"),
        ("bulyan", {"f": 2, "num_clients": 10}, r"K >= 4f \+ 3.*at least 11"),
        ("median", {"f": 3, "num_clients": 6}, "honest majority"),
        ("trimmed_mean", {"beta": 0.5}, r"server\.robust\.beta.*\[0, 0\.5\)"),
        ("trimmed_mean", {"beta": 0.1, "f": 2, "num_clients": 10}, "fewer than the f=2"),
        ("trimmed_mean", {}, r"server\.robust\.beta .*required"),
        ("trimmed_mean", {"beta": 0.0, "f": 1}, "trims nothing"),
        ("norm_bound", {}, r"server\.robust\.norm_bound .*required"),
        ("norm_bound", {"norm_bound": -1.0}, r"must be a number > 0"),
        ("krum", {"f": -1}, r"server\.robust\.f must be an integer >= 0"),
        ("krum", {"beta": 0.1}, r"server\.robust\.beta does not apply"),
        ("geomed", {}, "unknown"),
    ],
)
def test_factory_validates(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_robust_aggregator(name, **kwargs)


def test_factory_builds_every_method() -> None:
    params = {"trimmed_mean": {"beta": 0.2}, "norm_bound": {"norm_bound": 1.0}}
    for name in ROBUST_AGGREGATORS:
        agg = make_robust_aggregator(name, f=1, num_clients=11, **params.get(name, {}))
        assert agg.name == name
        assert agg.min_clients() <= 11
    assert TrimmedMean(0.2, f=2).min_clients() == 10
    assert MultiKrum(2, m=8).min_clients() == 10


def test_round_with_too_few_clients_says_where() -> None:
    deltas = {"head.w": torch.randn(5, 3)}
    with pytest.raises(ConfigError, match=r"^round 4: .*bulyan.*5 arrived"):
        Bulyan(1).aggregate(deltas, {"head.w": torch.ones(5)}, where="round 4")


def test_non_finite_held_values_are_refused() -> None:
    deltas = {"head.w": torch.randn(5, 3)}
    deltas["head.w"][2, 1] = float("inf")
    with pytest.raises(ValueError, match=r"client 12 has non-finite values in 'head\.w'"):
        CoordinateMedian().aggregate(
            deltas, {"head.w": torch.ones(5)}, clients=[10, 11, 12, 13, 14]
        )
    with pytest.raises(ValueError, match="not a finite number >= 0"):
        CoordinateMedian().aggregate({"head.w": torch.randn(5, 3)}, {"head.w": -torch.ones(5)})
    with pytest.raises(ValueError, match="no weights for parameter"):
        CoordinateMedian().aggregate({"head.w": torch.randn(5, 3)}, {})
