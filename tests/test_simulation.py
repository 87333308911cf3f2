"""The vectorised simulator against a per-client sequential reference, and aggregation rules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mmshield.data.dataset import FederatedDataset
from mmshield.data.partition import dirichlet_partition, drop_modalities
from mmshield.fl.client import LocalTraining, client_seed, train_client_sequential
from mmshield.models import build_model
from mmshield.runtime.simulation import simulate

from conftest import make_toy


def _federation(fusion: str = "attention", missing: float = 0.0):
    data = make_toy(n=150)
    parts = dirichlet_partition(data.labels.numpy(), 6, alpha=0.5, seed=3)
    train, _, _ = drop_modalities(data, parts, {m: missing for m in data.modalities}, seed=3)
    fed = FederatedDataset(train=train, client_indices=parts, test=make_toy(n=40, seed=9))
    model = build_model(train.specs, 4, embed_dim=8, fusion=fusion, fusion_hidden=8, seed=1)
    return fed, model


def _sequential_round(model, fed, training, seed, rnd=1):
    """FedAvg round written the plain way: one client at a time, modality-aware average."""
    global_state = {k: v.detach().clone() for k, v in model.named_parameters()}
    sums = {k: torch.zeros_like(v) for k, v in global_state.items()}
    weights = {k: 0.0 for k in global_state}
    for c in range(fed.num_clients):
        local = copy.deepcopy(model)
        client_data = fed.client(c)
        state, _ = train_client_sequential(local, client_data, training, client_seed(seed, rnd, c))
        for name, value in state.items():
            parts = name.split(".")
            if parts[0] == "encoders" and not bool(client_data.present[parts[1]].any()):
                continue
            sums[name] += len(client_data) * (value - global_state[name])
            weights[name] += len(client_data)
    return {
        k: global_state[k] + (sums[k] / weights[k] if weights[k] else 0.0) for k in global_state
    }


@pytest.mark.parametrize("fusion", ["attention", "concat"])
@pytest.mark.parametrize(("momentum", "mu"), [(0.0, 0.0), (0.9, 0.0), (0.9, 0.5)])
def test_batched_training_equals_sequential_reference(
    fusion: str, momentum: float, mu: float
) -> None:
    fed, model = _federation(fusion, missing=0.4)
    sizes = [len(ix) for ix in fed.client_indices]
    assert len(set(sizes)) > 1, "clients must differ in size for this test to mean anything"
    training = LocalTraining(
        local_epochs=2, batch_size=8, lr=0.1, momentum=momentum, weight_decay=1e-3, proximal_mu=mu
    )
    expected = _sequential_round(model, fed, training, seed=5)
    result = simulate(
        model, fed, rounds=1, clients_per_round=6, training=training, seed=5, cohort_size=4
    )
    got = dict(result.model.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value, atol=1e-5, rtol=1e-5, msg=name)


def test_encoder_not_pulled_by_clients_without_the_modality() -> None:
    fed, model = _federation()
    # Only client 0 keeps "tab": the tab encoder must move by client 0's delta alone.
    holds = {c: c == 0 for c in range(fed.num_clients)}
    present = fed.train.present["tab"].clone()
    for c, rows in enumerate(fed.client_indices):
        if not holds[c]:
            present[torch.as_tensor(rows)] = False
    fed = FederatedDataset(fed.train.with_presence({"tab": present}), fed.client_indices, fed.test)
    training = LocalTraining(local_epochs=1, batch_size=8, lr=0.1)
    result = simulate(model, fed, rounds=1, clients_per_round=6, training=training, seed=2)
    local = copy.deepcopy(model)
    state, _ = train_client_sequential(local, fed.client(0), training, client_seed(2, 1, 0))
    for name in state:
        if name.startswith("encoders.tab."):
            torch.testing.assert_close(
                dict(result.model.named_parameters())[name].detach(), state[name]
            )


def test_same_seed_same_model_and_cohort_size_changes_only_rounding() -> None:
    fed, model = _federation(missing=0.3)
    training = LocalTraining(local_epochs=1, batch_size=8, lr=0.1)
    runs = [
        simulate(
            model, fed, rounds=2, clients_per_round=4, training=training, seed=7, cohort_size=c
        )
        for c in (2, 2, 4)
    ]
    a, b, c = (dict(r.model.named_parameters()) for r in runs)
    for name in a:
        assert torch.equal(a[name], b[name]), name
        torch.testing.assert_close(a[name], c[name], atol=1e-5, rtol=1e-5)


def test_federated_training_learns_and_records_history() -> None:
    fed, model = _federation(missing=0.3)
    training = LocalTraining(local_epochs=2, batch_size=8, lr=0.1)
    result = simulate(model, fed, rounds=12, clients_per_round=6, training=training, seed=0)
    accs = [r.test_accuracy for r in result.history]
    assert len(result.history) == 12 and all(a is not None for a in accs)
    assert accs[-1] > 0.55, accs  # chance is 0.25
    n_params = sum(p.numel() for p in model.parameters())
    assert result.bytes_up == 12 * 6 * n_params * 4
    # The input model is untouched.
    assert not np.allclose(
        next(model.parameters()).detach().numpy(), next(result.model.parameters()).detach().numpy()
    )


def _scaffold_reference(model, fed, training, seed, rounds, per_round):
    """SCAFFOLD (option II) written the plain way, one client at a time."""
    from mmshield.runtime.simulation import sample_clients

    x = {k: v.detach().clone() for k, v in model.named_parameters()}
    c = {k: torch.zeros_like(v) for k, v in x.items()}
    controls: dict[int, dict[str, torch.Tensor]] = {}
    n_clients = fed.num_clients
    for rnd in range(1, rounds + 1):
        sums = {k: torch.zeros_like(v) for k, v in x.items()}
        weights = dict.fromkeys(x, 0.0)
        dc_sum = {k: torch.zeros_like(v) for k, v in x.items()}
        dc_n = dict.fromkeys(x, 0)
        for client in sample_clients(n_clients, per_round, seed, rnd).tolist():
            local = copy.deepcopy(model)
            with torch.no_grad():
                for k, p in local.named_parameters():
                    p.copy_(x[k])
            data = fed.client(client)
            ci = controls.get(client, {k: torch.zeros_like(v) for k, v in x.items()})
            corr = {k: c[k] - ci[k] for k in x}
            seed_k = client_seed(seed, rnd, client)
            y, _ = train_client_sequential(local, data, training, seed_k, corr)
            steps = training.steps(len(data))
            new_ci = {k: ci[k] - c[k] + (x[k] - y[k]) / (steps * training.lr) for k in x}
            for k in x:
                parts = k.split(".")
                if parts[0] == "encoders" and not bool(data.present[parts[1]].any()):
                    continue
                sums[k] += len(data) * (y[k] - x[k])
                weights[k] += len(data)
                dc_sum[k] += new_ci[k] - ci[k]
                dc_n[k] += 1
            controls[client] = new_ci
        for k in x:
            if dc_n[k]:
                c[k] = c[k] + per_round / n_clients * dc_sum[k] / dc_n[k]
            if weights[k]:
                x[k] = x[k] + sums[k] / weights[k]
    return x


def test_scaffold_equals_sequential_reference() -> None:
    fed, model = _federation("concat", missing=0.4)
    training = LocalTraining(local_epochs=2, batch_size=8, lr=0.1, momentum=0.5)
    expected = _scaffold_reference(model, fed, training, seed=4, rounds=3, per_round=4)
    result = simulate(
        model,
        fed,
        rounds=3,
        clients_per_round=4,
        training=training,
        seed=4,
        cohort_size=3,
        scaffold=True,
    )
    plain = simulate(model, fed, rounds=3, clients_per_round=4, training=training, seed=4)
    got = dict(result.model.named_parameters())
    differs = False
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value, atol=1e-5, rtol=1e-4, msg=name)
        differs |= not torch.allclose(value, dict(plain.model.named_parameters())[name], atol=1e-4)
    assert differs, "the control variates must change the result"


def test_encoder_weighted_by_records_that_hold_its_modality() -> None:
    from mmshield.fl.aggregate import ModalityAwareMean

    template = {"encoders.audio.w": torch.zeros(2), "head.w": torch.zeros(2)}
    acc = ModalityAwareMean(template)
    deltas = {
        "encoders.audio.w": torch.tensor([[1.0, 1.0], [3.0, 3.0]]),
        "head.w": torch.tensor([[1.0, 1.0], [3.0, 3.0]]),
    }
    # Client 0: 10 records, 9 with audio; client 1: 30 records, 1 with audio.
    acc.add(deltas, torch.tensor([10.0, 30.0]), {"audio": torch.tensor([9.0, 1.0])})
    mean = acc.mean()
    torch.testing.assert_close(mean["encoders.audio.w"], torch.full((2,), (9 * 1 + 1 * 3) / 10))
    torch.testing.assert_close(mean["head.w"], torch.full((2,), (10 * 1 + 30 * 3) / 40))


def test_vectorised_schedules_equal_per_client_ones_and_shuffle_uniformly() -> None:
    import collections

    from mmshield.fl.client import batch_schedule, batch_schedules, client_seeds

    training = LocalTraining(local_epochs=3, batch_size=4)
    sizes = np.array([10, 3, 0, 5, 17])
    seeds = client_seeds(4, 2, np.arange(5))
    index, weight = batch_schedules(sizes, training, seeds, max_steps=np.array([99, 99, 99, 4, 7]))
    for c, n in enumerate(sizes):
        ix, w = batch_schedule(int(n), training, int(seeds[c]))
        m = min(len(ix), [99, 99, 99, 4, 7][c])
        np.testing.assert_array_equal(index[c, :m], ix[:m].numpy())
        np.testing.assert_array_equal(weight[c, :m], w[:m].numpy())
        assert not weight[c, m:].any()
        # Each full epoch visits every record exactly once.
        per_epoch = -(-int(n) // 4)
        for e in range(m // per_epoch if per_epoch else 0):
            block = slice(e * per_epoch, (e + 1) * per_epoch)
            real = ix[block][w[block] > 0]
            assert sorted(real.tolist()) == list(range(n))
    # All 24 orders of 4 records are equally likely (expected 1,000 each).
    counts = collections.Counter(
        tuple(batch_schedule(4, LocalTraining(batch_size=4), int(s))[0][0].tolist())
        for s in client_seeds(0, 1, np.arange(24_000))
    )
    assert len(counts) == 24
    chi2 = sum((v - 1000) ** 2 / 1000 for v in counts.values())
    assert chi2 < 49.7  # 99.9th percentile of chi-square with 23 degrees of freedom
