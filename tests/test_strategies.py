"""Server optimisers against Flower's strategies (the oracle), given the same client updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmshield.fl.aggregate import ModalityAwareMean
from mmshield.fl.strategy import make_server_optimizer

flwr = pytest.importorskip("flwr")
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import strategy as flower  # noqa: E402

SHAPES = {"encoders.image.w": (3, 4), "fusion.b": (5,), "head.w": (2, 3)}


def _clients(rng: np.random.Generator, k: int) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    states = [
        {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(k)
    ]
    return states, [int(x) for x in rng.integers(5, 50, size=k)]


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({n: Array(v) for n, v in state.items()})


def _replies(states: list[dict[str, np.ndarray]], examples: list[int]) -> list[Message]:
    return [
        Message(
            RecordDict({"arrays": _record(s), "metrics": MetricRecord({"num-examples": n})}),
            dst_node_id=0,
            message_type="train",
        )
        for s, n in zip(states, examples, strict=True)
    ]


def _mmshield_round(opt, global_params, states, examples, rnd):
    acc = ModalityAwareMean(global_params)
    deltas = {
        n: torch.stack([torch.from_numpy(s[n]) for s in states]) - global_params[n] for n in SHAPES
    }
    acc.add(deltas, torch.tensor(examples, dtype=torch.float32), {})
    return opt.step(global_params, acc.mean(), rnd)


CASES = [
    (
        "fedavgm",
        lambda: flower.FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
        {"lr": 0.7, "momentum": 0.9},
    ),
    (
        "fedadam",
        lambda: flower.FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
        {"lr": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    ),
    (
        "fedyogi",
        lambda: flower.FedYogi(eta=0.01, beta_1=0.9, beta_2=0.99, tau=1e-3),
        {"lr": 0.01, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    ),
    ("fedadagrad", lambda: flower.FedAdagrad(eta=0.1, tau=1e-3), {"lr": 0.1, "tau": 1e-3}),
    ("fedavg", lambda: flower.FedProx(proximal_mu=0.1), {}),  # FedProx aggregates as FedAvg
]


@pytest.mark.parametrize(("name", "make_flower", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_aggregate_equals_flower(name, make_flower, kwargs, monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # Flower stamps messages with the identity of the running task; give it one.
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    rng = np.random.default_rng(0)
    init = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    ours = make_server_optimizer(name, **kwargs)
    theirs = make_flower()
    # configure_train stores the current model in the strategy, as at the start of each round.
    current = _record(init)
    global_params = {n: torch.from_numpy(v.copy()) for n, v in init.items()}
    for rnd in range(1, 5):
        theirs.configure_train(rnd, current, flwr.app.ConfigRecord({}), _FakeGrid(4))
        states, examples = _clients(rng, 4)
        # Clients move near the current model so deltas are realistic in size.
        base = {n: a.numpy() for n, a in current.items()}
        states = [{n: base[n] + 0.1 * s[n] for n in SHAPES} for s in states]
        current, _ = theirs.aggregate_train(rnd, _replies(states, examples))
        global_params = _mmshield_round(ours, global_params, states, examples, rnd)
        for n in SHAPES:
            np.testing.assert_allclose(
                global_params[n].numpy(), current[n].numpy(), atol=1e-6, rtol=1e-6, err_msg=n
            )


class _FakeGrid:
    """Just enough of Flower's Grid for ``configure_train`` to sample every node."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def test_adaptive_optimiser_leaves_unheld_encoder_alone() -> None:
    params = {n: torch.zeros(s) for n, s in SHAPES.items()}
    opt = make_server_optimizer("fedadam")
    delta = {n: torch.full((2, *s), 0.5) for n, s in SHAPES.items()}
    acc = ModalityAwareMean(params)
    acc.add(delta, torch.tensor([3.0, 4.0]), {"image": torch.tensor([3.0, 0.0])})
    first = opt.step(params, acc.mean(), 1)
    assert not torch.equal(first["encoders.image.w"], params["encoders.image.w"])
    # Next round nobody holds images: the image encoder must not move (no momentum drift).
    acc = ModalityAwareMean(first)
    acc.add(delta, torch.tensor([3.0, 4.0]), {"image": torch.tensor([0.0, 0.0])})
    second = opt.step(first, acc.mean(), 2)
    assert torch.equal(second["encoders.image.w"], first["encoders.image.w"])
    assert not torch.equal(second["head.w"], first["head.w"])
