"""Update validation: every rejection reason with its message, the accepted set, the counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmshield.errors import ConfigError
from mmshield.fl.validation import REJECTION_KINDS, UpdateValidator

REFERENCE = {"encoders.image.w": torch.zeros(3, 4), "head.weight": torch.zeros(10, 64)}


def _update(scale: float = 0.01, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(v.shape, generator=g) for n, v in REFERENCE.items()}


def _stack(k: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    ups = [_update(scale, seed=i) for i in range(k)]
    return {n: torch.stack([u[n] for u in ups]) for n in REFERENCE}


def test_good_update_is_accepted() -> None:
    v = UpdateValidator(REFERENCE, max_norm=10.0, max_staleness=2)
    assert v.check(3, _update(), trained_round=4, current_round=5) is None


@pytest.mark.parametrize(
    ("mutate", "kind", "message"),
    [
        (
            lambda u: u.update({"head.weight": torch.zeros(10, 32)}),
            "shape",
            "round 5, client 7: parameter 'head.weight' has shape (10, 32), expected (10, 64)",
        ),
        (
            lambda u: u.update({"head.weight": torch.zeros(10, 64, dtype=torch.float64)}),
            "dtype",
            "round 5, client 7: parameter 'head.weight' has dtype torch.float64, expected "
            "torch.float32",
        ),
        (
            lambda u: u["encoders.image.w"].__setitem__((0, 1), float("nan")),
            "non_finite",
            "round 5, client 7: parameter 'encoders.image.w' has 1 non-finite value(s) "
            "(NaN or inf) of 12",
        ),
        (
            lambda u: u["head.weight"].__setitem__((2, 2), float("-inf")),
            "non_finite",
            "parameter 'head.weight' has 1 non-finite value(s)",
        ),
        (
            lambda u: u.update({"head.weight": torch.full((10, 64), 1.0)}),
            "norm",
            "round 5, client 7: update L2 norm 25.3 exceeds server.validation.max_norm = 10",
        ),
        (
            lambda u: u.pop("head.weight"),
            "missing",
            "round 5, client 7: update lacks parameter(s) 'head.weight'",
        ),
        (
            lambda u: u.update({"head.bias": torch.zeros(10)}),
            "unexpected",
            "round 5, client 7: update has parameter(s) 'head.bias' that the global model does "
            "not have",
        ),
    ],
)
def test_each_reason_single_client(mutate, kind: str, message: str) -> None:
    v = UpdateValidator(REFERENCE, max_norm=10.0)
    update = _update()
    mutate(update)
    rej = v.check(7, update, current_round=5)
    assert rej is not None
    assert rej.kind == kind and rej.client == 7 and rej.round == 5
    assert message in str(rej)


def test_staleness_and_future_rounds() -> None:
    v = UpdateValidator(REFERENCE, max_staleness=2)
    assert v.check(1, _update(), trained_round=3, current_round=5) is None
    rej = v.check(1, _update(), trained_round=2, current_round=5)
    assert rej is not None and rej.kind == "stale"
    assert (
        "trained from round 2 is 3 rounds old, more than server.validation.max_staleness = 2"
        in (rej.message)
    )
    rej = v.check(1, _update(), trained_round=6, current_round=5)
    assert rej is not None and rej.kind == "stale" and "after the current round 5" in rej.reason
    # Without a bound, only the impossible future round is refused.
    free = UpdateValidator(REFERENCE)
    assert free.check(1, _update(), trained_round=0, current_round=50) is None
    with pytest.raises(ValueError, match="trained_round"):
        v.check(1, _update(), current_round=5)


def test_reported_weight() -> None:
    v = UpdateValidator(REFERENCE)
    for bad in (-3.0, float("nan"), float("inf")):
        rej = v.check(2, _update(), examples=bad)
        assert rej is not None and rej.kind == "weight" and "number of examples" in rej.reason
    assert v.check(2, _update(), examples=0) is None


def test_first_failing_check_wins() -> None:
    v = UpdateValidator(REFERENCE, max_norm=1.0, max_staleness=0)
    update = {"head.weight": torch.full((10, 32), float("nan"))}  # missing, shape, NaN
    rej = v.check(4, update, trained_round=1, current_round=2)
    assert rej is not None and rej.kind == "stale"
    rej = v.check(4, update, trained_round=2, current_round=2)
    assert rej is not None and rej.kind == "missing"


def test_allow_missing() -> None:
    v = UpdateValidator(REFERENCE, allow_missing=True)
    assert v.check(0, {"head.weight": torch.zeros(10, 64)}) is None


def test_validate_many_clients() -> None:
    v = UpdateValidator(REFERENCE, max_norm=10.0, max_staleness=1)
    updates = {c: _update(seed=c) for c in (10, 11, 12, 13, 14)}
    updates[11]["head.weight"][0, 0] = float("nan")
    updates[13]["head.weight"] = updates[13]["head.weight"] * 1e4
    rounds = {10: 8, 11: 8, 12: 6, 13: 8, 14: 7}
    report = v.validate(updates, trained_rounds=rounds, current_round=8)
    assert report.accepted.tolist() == [10, 14]
    assert [(r.client, r.kind) for r in report.rejections] == [
        (11, "non_finite"),
        (12, "stale"),
        (13, "norm"),
    ]
    counts = report.counts()
    assert list(counts) == list(REJECTION_KINDS)
    assert counts == {**dict.fromkeys(REJECTION_KINDS, 0), "non_finite": 1, "stale": 1, "norm": 1}
    assert report.summary() == (
        "round 8: 2 of 5 updates accepted; rejected: 1 stale, 1 non_finite, 1 norm"
    )


def test_validate_stacked() -> None:
    v = UpdateValidator(REFERENCE, max_norm=10.0, max_staleness=2)
    k = 6
    deltas = _stack(k)
    clients = np.array([40, 41, 42, 43, 44, 45])
    deltas["encoders.image.w"][1, 2, 3] = float("inf")
    deltas["head.weight"][3] = 5.0  # norm 5 * sqrt(640) = 126
    deltas["head.weight"][4, 0, 0] = float("nan")
    deltas["head.weight"][4, 1, 1] = 1e9  # would fail the norm too: non-finite comes first
    examples = torch.tensor([10.0, 10.0, 10.0, 10.0, 10.0, -1.0])
    trained = np.array([9, 9, 5, 9, 9, 9])
    report = v.validate_stacked(
        deltas, clients, trained_rounds=trained, current_round=9, examples=examples
    )
    assert report.mask.tolist() == [True, False, False, False, False, False]
    assert report.accepted.tolist() == [40]
    kinds = {r.client: r.kind for r in report.rejections}
    assert kinds == {41: "non_finite", 42: "stale", 43: "norm", 44: "non_finite", 45: "weight"}
    msg = {r.client: r.message for r in report.rejections}
    assert msg[41].startswith("round 9, client 41: parameter 'encoders.image.w' has 1 non-finite")
    assert msg[43].startswith("round 9, client 43: update L2 norm 126.5 exceeds")
    assert report.counts()["non_finite"] == 2
    kept = report.select(deltas)
    assert kept["head.weight"].shape == (1, 10, 64)
    torch.testing.assert_close(kept["head.weight"][0], deltas["head.weight"][0])
    assert report.select({"w": examples})["w"].tolist() == [10.0]


def test_stacked_single_round_for_all() -> None:
    v = UpdateValidator(REFERENCE, max_staleness=0)
    report = v.validate_stacked(_stack(3), [0, 1, 2], trained_rounds=4, current_round=4)
    assert report.mask.all() and report.rejections == []
    assert report.summary() == "round 4: 3 of 3 updates accepted"


def test_stacked_structure_rejects_every_client() -> None:
    v = UpdateValidator(REFERENCE)
    deltas = _stack(3)
    deltas["head.weight"] = torch.zeros(3, 10, 32)
    report = v.validate_stacked(deltas, [5, 6, 7])
    assert not report.mask.any()
    assert [r.kind for r in report.rejections] == ["shape"] * 3
    assert str(report.rejections[1]) == (
        "client 6: parameter 'head.weight' has shape (10, 32), expected (10, 64); the client's "
        "model architecture differs from the server's"
    )
    deltas = _stack(3)
    deltas["extra"] = torch.zeros(3, 2)
    report = v.validate_stacked(deltas, [5, 6, 7])
    assert report.counts()["unexpected"] == 3
    deltas = _stack(3)
    deltas["head.weight"] = deltas["head.weight"].double()
    assert v.validate_stacked(deltas, [5, 6, 7]).counts()["dtype"] == 3
    deltas = _stack(3)
    del deltas["head.weight"]
    assert v.validate_stacked(deltas, [5, 6, 7]).counts()["missing"] == 3


def test_stacked_caller_errors() -> None:
    v = UpdateValidator(REFERENCE)
    with pytest.raises(ValueError, match=r"expected \(4, \.\.\.\) for the 4 client ids"):
        v.validate_stacked(_stack(3), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="trained_rounds"):
        UpdateValidator(REFERENCE, max_staleness=1).validate_stacked(_stack(3), [0, 1, 2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_norm": 0.0}, r"server\.validation\.max_norm must be a finite number > 0"),
        ({"max_norm": float("nan")}, r"server\.validation\.max_norm"),
        ({"max_staleness": -1}, r"server\.validation\.max_staleness must be an integer >= 0"),
    ],
)
def test_bad_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        UpdateValidator(REFERENCE, **kwargs)
