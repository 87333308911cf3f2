"""FedBuff (asynchronous buffered aggregation) and quality-aware weighting."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmshield.config import config_from_dict
from mmshield.data.dataset import FederatedDataset
from mmshield.data.partition import dirichlet_partition, drop_modalities, iid_partition
from mmshield.errors import ConfigError, TrainingError
from mmshield.fl.aggregate import ClientQuality, ModalityAwareMean
from mmshield.fl.client import LocalTraining, client_seed, train_client_sequential
from mmshield.fl.fedbuff import FedBuffBuffer, staleness_weight
from mmshield.models import build_model
from mmshield.runtime.asynchronous import simulate_buffered
from mmshield.runtime.simulation import simulate
from mmshield.runtime.systems import Distribution, SystemsProfile

from conftest import make_toy

TRAINING = LocalTraining(local_epochs=2, batch_size=8, lr=0.1)


def _federation(clients: int = 6, missing: float = 0.0):
    data = make_toy(n=150)
    parts = dirichlet_partition(data.labels.numpy(), clients, alpha=0.5, seed=3)
    train, _, _ = drop_modalities(data, parts, {m: missing for m in data.modalities}, seed=3)
    fed = FederatedDataset(train=train, client_indices=parts, test=make_toy(n=40, seed=9))
    model = build_model(train.specs, 4, embed_dim=8, fusion="concat", fusion_hidden=8, seed=1)
    return fed, model


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_staleness_discount_shrinks_stale_updates_without_renormalising() -> None:
    template = {"head.weight": torch.zeros(3)}
    buffer = FedBuffBuffer(template, size=2, exponent=0.5)
    deltas = {"head.weight": torch.tensor([[1.0, 1.0, 1.0], [3.0, 3.0, 3.0]])}
    examples = torch.tensor([10.0, 30.0])
    buffer.add(deltas, examples, {}, torch.tensor([0, 3]))
    assert buffer.full
    mean, staleness = buffer.drain()
    expected = (10 * 1.0 + 30 * 3.0 * 0.5) / 40  # (1 + 3)^-0.5 = 0.5
    torch.testing.assert_close(mean["head.weight"], torch.full((3,), expected))
    assert staleness == [0, 3] and len(buffer) == 0
    assert float(staleness_weight(torch.tensor(0))) == 1.0


def test_first_server_step_equals_fedavg_of_fresh_updates() -> None:
    """Equal clients start together and finish together: step 1 is a FedAvg round of them.

    (With unequal sizes a small client would finish, restart and deliver twice before a large
    one delivers once, which is FedBuff working as intended.)
    """
    data = make_toy(n=150)
    n = 6
    fed = FederatedDataset(data, iid_partition(150, n, seed=1), make_toy(n=40, seed=9))
    model = build_model(data.specs, 4, embed_dim=8, fusion="concat", fusion_hidden=8, seed=1)
    result = simulate_buffered(
        model, fed, updates=1, concurrency=n, buffer_size=n, training=TRAINING, seed=7
    )
    start = _params(model)
    sums = {k: torch.zeros_like(v) for k, v in start.items()}
    total = 0.0
    for c in range(n):  # clients are launched sorted, so task number c is client c
        state, _ = train_client_sequential(
            copy.deepcopy(model), fed.client(c), TRAINING, client_seed(7, c, c)
        )
        for k in sums:
            sums[k] += len(fed.client_indices[c]) * (state[k] - start[k])
        total += len(fed.client_indices[c])
    got = _params(result.model)
    for k in start:
        torch.testing.assert_close(got[k], start[k] + sums[k] / total, atol=1e-5, rtol=1e-5)
    assert result.history[0].staleness == 0.0 and result.history[0].clients == n


def test_fedbuff_is_deterministic_and_runs_on_the_simulated_clock() -> None:
    fed, model = _federation(clients=10)
    profile = SystemsProfile(speed=Distribution("pareto", shape=1.2), dropout=0.1, stragglers=0.2)
    kwargs = {
        "updates": 6,
        "concurrency": 5,
        "buffer_size": 3,
        "training": TRAINING,
        "seed": 2,
        "systems": profile,
    }
    a = simulate_buffered(model, fed, **kwargs)  # type: ignore[arg-type]
    b = simulate_buffered(model, fed, **kwargs)  # type: ignore[arg-type]
    for k, v in _params(a.model).items():
        assert torch.equal(v, _params(b.model)[k])
    assert [r.simulated_seconds for r in a.history] == [r.simulated_seconds for r in b.history]
    assert len(a.history) == 6 and all(r.clients == 3 for r in a.history)
    assert all((r.simulated_seconds or 0.0) >= 0 for r in a.history)
    assert a.simulated_seconds is not None and a.simulated_seconds > 0
    assert any((r.staleness or 0.0) > 0 for r in a.history)  # asynchrony really happened


def test_fedbuff_refuses_runs_that_can_never_deliver() -> None:
    fed, model = _federation()
    with pytest.raises(TrainingError, match="dropout is 1"):
        simulate_buffered(
            model,
            fed,
            updates=1,
            concurrency=2,
            buffer_size=2,
            training=TRAINING,
            systems=SystemsProfile(dropout=1.0),
        )
    with pytest.raises(TrainingError, match="availability"):
        simulate_buffered(
            model,
            fed,
            updates=1,
            concurrency=2,
            buffer_size=2,
            training=TRAINING,
            systems=SystemsProfile(availability=Distribution("constant", value=0.0)),
        )


def test_encoder_is_unchanged_by_clients_lacking_its_modality() -> None:
    """Modality-aware weighting: a client without audio cannot move the audio encoder."""
    template = {"encoders.audio.w": torch.zeros(2), "head.w": torch.zeros(2)}
    acc = ModalityAwareMean(template)
    deltas = {
        "encoders.audio.w": torch.tensor([[1.0, 1.0], [100.0, 100.0]]),
        "head.w": torch.tensor([[1.0, 1.0], [3.0, 3.0]]),
    }
    # Client 1 holds no audio: its (garbage) audio-encoder delta must not count at all.
    acc.add(deltas, torch.tensor([1.0, 1.0]), {"audio": torch.tensor([5.0, 0.0])})
    mean = acc.mean()
    torch.testing.assert_close(mean["encoders.audio.w"], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(mean["head.w"], torch.tensor([2.0, 2.0]))


def test_quality_scores_reweight_clients_and_modalities() -> None:
    quality = ClientQuality({1: 0.25, 2: {"audio": 0.0}}, 3, ["image", "audio"])
    examples = torch.tensor([10.0, 10.0, 10.0])
    by_mod = {"image": torch.tensor([10.0, 10.0, 10.0]), "audio": torch.tensor([4.0, 4.0, 4.0])}
    w, wm = quality.apply(np.arange(3), examples, by_mod)
    torch.testing.assert_close(w, torch.tensor([10.0, 2.5, 10.0]))
    torch.testing.assert_close(wm["image"], torch.tensor([10.0, 2.5, 10.0]))
    torch.testing.assert_close(wm["audio"], torch.tensor([4.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="client 5 does not exist"):
        ClientQuality({5: 1.0}, 3, ["image"])
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        ClientQuality({0: {"video": 1.0}}, 3, ["image"])


def test_zero_quality_modality_leaves_encoder_to_the_other_clients() -> None:
    fed, model = _federation(clients=4)
    modality = fed.train.modalities[0]
    others = [m for m in fed.train.modalities if m != modality]
    # Clients 0..2 score 0 on this modality: only client 3 may move its encoder, exactly as if
    # the others lacked it; every other parameter is unaffected by the score.
    scores = {c: {modality: 0.0} for c in range(3)}
    quality = ClientQuality(scores, 4, fed.train.modalities)  # type: ignore[arg-type]
    with_q = simulate(model, fed, rounds=1, clients_per_round=4, training=TRAINING, quality=quality)
    plain = simulate(model, fed, rounds=1, clients_per_round=4, training=TRAINING)
    s, _ = train_client_sequential(
        copy.deepcopy(model), fed.client(3), TRAINING, client_seed(0, 1, 3)
    )
    a, p = _params(with_q.model), _params(plain.model)
    for k in a:
        if k.startswith(f"encoders.{modality}."):
            torch.testing.assert_close(a[k], s[k], atol=1e-5, rtol=1e-5)
        elif k.startswith(tuple(f"encoders.{m}." for m in others)) or k.startswith("head"):
            torch.testing.assert_close(a[k], p[k], atol=1e-6, rtol=1e-6)


def test_fedbuff_and_quality_config() -> None:
    cfg = config_from_dict(
        {
            "server": {
                "strategy": "fedbuff",
                "buffer_size": 4,
                "client_quality": {"3": 0.5, "7": {"audio": 0.0}},
            }
        }
    )
    assert cfg.server.client_quality == {3: 0.5, 7: {"audio": 0.0}}
    with pytest.raises(ConfigError, match=r"server\.client_quality"):
        config_from_dict({"server": {"client_quality": {"1": -2.0}}})
    with pytest.raises(ConfigError, match=r"server\.buffer_size"):
        config_from_dict({"server": {"buffer_size": 0}})
