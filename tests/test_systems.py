"""Systems heterogeneity: partial work, dropouts, availability, deadlines, simulated clock."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmshield.config import config_from_dict
from mmshield.data.dataset import FederatedDataset
from mmshield.data.partition import dirichlet_partition
from mmshield.errors import ConfigError
from mmshield.fl.client import LocalTraining, client_seed, train_client_sequential
from mmshield.models import build_model
from mmshield.runtime.simulation import sample_clients, simulate
from mmshield.runtime.systems import (
    ClientSystems,
    Distribution,
    SystemsProfile,
    steps_per_epoch,
)

from conftest import make_toy

TRAINING = LocalTraining(local_epochs=3, batch_size=8, lr=0.1, momentum=0.5)


def _federation(clients: int = 8):
    data = make_toy(n=200)
    parts = dirichlet_partition(data.labels.numpy(), clients, alpha=0.5, seed=3)
    fed = FederatedDataset(train=data, client_indices=parts, test=make_toy(n=40, seed=9))
    model = build_model(data.specs, 4, embed_dim=8, fusion="concat", fusion_hidden=8, seed=1)
    return fed, model


def _model_bytes(model: torch.nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _reference_round(model, fed, training, seed, clients, steps):
    """FedAvg over ``clients``, each trained for ``steps[i]`` steps, one at a time."""
    start = _params(model)
    sums = {k: torch.zeros_like(v) for k, v in start.items()}
    total = 0.0
    for c, s in zip(clients, steps, strict=True):
        local = copy.deepcopy(model)
        state, _ = train_client_sequential(
            local, fed.client(int(c)), training, client_seed(seed, 1, int(c)), max_steps=int(s)
        )
        n = len(fed.client_indices[int(c)])
        for k in sums:
            sums[k] += n * (state[k] - start[k])
        total += n
    return {k: start[k] + sums[k] / total for k in start}


@pytest.mark.parametrize("policy", ["aggregate", "drop"])
def test_stragglers_partial_work_equals_truncated_reference(policy: str) -> None:
    fed, model = _federation()
    profile = SystemsProfile(stragglers=0.5, partial_work=policy)  # type: ignore[arg-type]
    result = simulate(
        model, fed, rounds=1, clients_per_round=8, training=TRAINING, seed=4, systems=profile
    )
    sizes = np.array([len(ix) for ix in fed.client_indices])
    population = ClientSystems(profile, fed.num_clients, 4, _model_bytes(model))
    clients = np.arange(8)
    plan = population.plan(1, clients, steps_per_epoch(sizes, 8), 3)
    full = steps_per_epoch(sizes, 8) * 3
    assert int(plan.partial.sum()) == 4
    if policy == "aggregate":
        assert (plan.steps[plan.partial] < full[plan.partial]).all()
        assert (plan.steps[plan.partial] % steps_per_epoch(sizes, 8)[plan.partial] == 0).all()
    else:
        assert (plan.steps[plan.partial] == 0).all()
    keep = plan.contributes
    expected = _reference_round(model, fed, TRAINING, 4, clients[keep], plan.steps[keep])
    got = _params(result.model)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-5)
    record = result.history[0]
    assert record.sampled == 8 and record.partial == 4
    assert record.clients == (8 if policy == "aggregate" else 4)


def test_everyone_dropping_out_leaves_the_model_and_says_so() -> None:
    fed, model = _federation()
    result = simulate(
        model,
        fed,
        rounds=2,
        clients_per_round=5,
        training=TRAINING,
        systems=SystemsProfile(dropout=1.0, deadline=30.0),
    )
    for k, v in _params(result.model).items():
        torch.testing.assert_close(v, dict(model.named_parameters())[k].detach(), rtol=0, atol=0)
    for r in result.history:
        assert r.clients == 0 and r.dropped == 5 and np.isnan(r.train_loss)
        assert r.simulated_seconds == 30.0  # the server waited for the deadline
    assert result.simulated_seconds == 60.0


def test_partial_dropout_trains_only_survivors() -> None:
    fed, model = _federation()
    profile = SystemsProfile(dropout=0.4)
    result = simulate(model, fed, rounds=3, clients_per_round=8, training=TRAINING, systems=profile)
    dropped = [r.dropped for r in result.history]
    assert sum(dropped) > 0
    assert all(r.clients + r.dropped == 8 for r in result.history)
    assert all(r.bytes_up < r.bytes_down for r in result.history if r.dropped)


def test_only_online_clients_are_sampled() -> None:
    profile = SystemsProfile(availability=Distribution("beta", a=1.0, b=1.0))
    population = ClientSystems(profile, 200, seed=3, model_bytes=1000)
    for rnd in range(1, 6):
        online = population.online(rnd)
        assert online is not None
        chosen = sample_clients(200, 20, 3, rnd, online)
        assert len(chosen) == 20 and online[chosen].all()
    # Often-online clients are sampled more often than rarely-online ones.
    counts = np.zeros(200)
    for rnd in range(1, 200):
        online = population.online(rnd)
        assert online is not None
        counts[online] += 1
    corr = np.corrcoef(counts, population.availability)[0, 1]
    assert corr > 0.9
    # Fewer online than requested: all online clients take part.
    few = np.zeros(200, dtype=bool)
    few[[3, 7]] = True
    assert sample_clients(200, 20, 3, 1, few).tolist() == [3, 7]


def test_sampling_without_systems_is_unchanged() -> None:
    for rnd in range(1, 4):
        rng = np.random.default_rng(np.random.SeedSequence([5, rnd, 0xC11E]))
        expected = np.sort(rng.choice(100, size=10, replace=False))
        assert sample_clients(100, 10, 5, rnd).tolist() == expected.tolist()


def test_deadline_cuts_slow_clients_and_bounds_the_round() -> None:
    profile = SystemsProfile(
        speed=Distribution("lognormal", sigma=1.5), step_seconds=1.0, deadline=20.0
    )
    population = ClientSystems(profile, 500, seed=1, model_bytes=4000)
    spe = np.full(500, 5)
    plan = population.plan(1, np.arange(500), spe, 2)
    assert plan.partial.any() and not plan.partial.all()
    assert (plan.seconds <= 20.0).all()
    # A cut client did exactly the steps that fit before the deadline.
    cut = np.flatnonzero(plan.partial)
    fit = np.floor(20.0 * population.speed[cut])
    np.testing.assert_array_equal(plan.steps[cut], np.minimum(fit, 10))
    assert population.round_seconds(plan) <= 20.0


def test_simulated_clock_with_bandwidth() -> None:
    profile = SystemsProfile(step_seconds=0.5, bandwidth_mbps=8.0)
    population = ClientSystems(profile, 3, seed=0, model_bytes=1_000_000)
    plan = population.plan(1, np.arange(3), np.array([2, 4, 3]), 2)
    # 1 MB down and 1 MB up at 8 Mbit/s = 2 s; the slowest client takes 8 steps of 0.5 s.
    assert population.round_seconds(plan) == pytest.approx(2.0 + 8 * 0.5)


def test_pareto_speeds_are_heavy_tailed_slowness() -> None:
    rng = np.random.default_rng(0)
    speed = Distribution("pareto", shape=1.1).sample(rng, 100_000)
    assert speed.max() <= 1.0
    slowness = 1 / speed
    assert np.median(slowness) < 2 and np.quantile(slowness, 0.999) > 100


def test_systems_are_deterministic_per_seed() -> None:
    fed, model = _federation()
    profile = SystemsProfile(
        speed=Distribution("lognormal", sigma=1.0), dropout=0.2, stragglers=0.3, deadline=4.0
    )
    a = simulate(model, fed, rounds=2, clients_per_round=6, training=TRAINING, systems=profile)
    b = simulate(model, fed, rounds=2, clients_per_round=6, training=TRAINING, systems=profile)
    assert [r.simulated_seconds for r in a.history] == [r.simulated_seconds for r in b.history]
    for k, v in _params(a.model).items():
        assert torch.equal(v, _params(b.model)[k])


def test_systems_config_is_validated() -> None:
    cfg = config_from_dict(
        {"systems": {"speed": {"kind": "pareto", "shape": 1.2}, "deadline": 10, "dropout": 0.1}}
    )
    assert cfg.systems is not None and cfg.systems.speed.kind == "pareto"
    with pytest.raises(ConfigError, match=r"systems\.availability"):
        config_from_dict({"systems": {"availability": {"kind": "lognormal"}}})
    with pytest.raises(ConfigError, match=r"systems\.dropout"):
        config_from_dict({"systems": {"dropout": 1.5}})
    with pytest.raises(ConfigError, match="allowed keys here"):
        config_from_dict({"systems": {"sped": {"kind": "constant"}}})
