"""Per-sample clipped gradient sums against Opacus (the oracle)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from mmshield.models import build_model
from mmshield.privacy.dpsgd import clipped_grad_sum

from conftest import make_toy


def _opacus_clipped_sum(model, batch, max_grad_norm: float) -> dict[str, torch.Tensor]:
    opacus = pytest.importorskip("opacus")
    from opacus.optimizers import DPOptimizer

    gsm = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="sum")
    opt = DPOptimizer(
        torch.optim.SGD(gsm.parameters(), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=1,
        loss_reduction="sum",
    )
    logits = gsm(batch.inputs, batch.present)
    F.cross_entropy(logits, batch.labels, reduction="sum").backward()
    opt.pre_step()  # clip per sample, sum, add (zero) noise, scale by 1 / expected batch size
    return {
        name.removeprefix("_module."): p.grad.detach().clone() for name, p in gsm.named_parameters()
    }


@pytest.mark.parametrize("max_grad_norm", [0.05, 1.0, 100.0])
def test_clipped_sum_equals_opacus(max_grad_norm: float) -> None:
    data = make_toy(n=24, seed=3)
    # Some records miss modalities: their encoders get no gradient from them.
    data.present["image"][::3] = False
    data.present["text"][1::4] = False
    model = build_model(data.specs, 4, embed_dim=8, fusion="concat", fusion_hidden=8, seed=2)
    expected = _opacus_clipped_sum(model, data, max_grad_norm)
    params = {k: v.detach() for k, v in model.named_parameters()}
    fn = clipped_grad_sum(model, max_grad_norm)
    got, _, norms = fn(params, data.inputs, data.present, data.labels, torch.ones(len(data)))
    assert (norms > max_grad_norm).any() == (max_grad_norm < 100.0)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-5)


def test_clipped_sum_vectorises_over_clients_and_ignores_padding() -> None:
    data = make_toy(n=16, seed=5)
    model = build_model(data.specs, 4, embed_dim=8, fusion="concat", fusion_hidden=8, seed=2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    fn = clipped_grad_sum(model, 0.5)
    weight = torch.ones(2, 8)
    weight[1, 5:] = 0  # client 1 has 5 records, then padding
    halves = [torch.arange(8), torch.arange(8, 16)]

    def batch(ix):
        return (
            {m: data.inputs[m][ix] for m in data.modalities},
            {m: data.present[m][ix] for m in data.modalities},
            data.labels[ix],
        )

    stacked_params = {k: v.unsqueeze(0).expand(2, *v.shape) for k, v in params.items()}
    parts = [batch(ix) for ix in halves]
    inputs = {m: torch.stack([p[0][m] for p in parts]) for m in data.modalities}
    present = {m: torch.stack([p[1][m] for p in parts]) for m in data.modalities}
    labels = torch.stack([p[2] for p in parts])
    got, _, _ = vmap(fn)(stacked_params, inputs, present, labels, weight)
    for c, ix in enumerate([halves[0], halves[1][:5]]):
        alone, _, _ = fn(params, *batch(ix), torch.ones(len(ix)))
        for name in alone:
            torch.testing.assert_close(got[name][c], alone[name], atol=1e-6, rtol=1e-5)


def test_vectorised_dpsgd_equals_opacus_per_client_training() -> None:
    """σ = 0 isolates clipping and Poisson batches: K clients at once vs Opacus one by one."""
    opacus = pytest.importorskip("opacus")
    from opacus.optimizers import DPOptimizer

    from mmshield.data.partition import dirichlet_partition
    from mmshield.fl.client import LocalTraining, train_stacked
    from mmshield.privacy.dpsgd import DPSGD, poisson_schedules
    from mmshield.privacy.noise import NoiseSource

    data = make_toy(n=90, seed=4)
    parts = dirichlet_partition(data.labels.numpy(), 4, alpha=1.0, seed=2)
    model = build_model(data.specs, 4, embed_dim=8, fusion="concat", fusion_hidden=8, seed=2)
    training = LocalTraining(local_epochs=2, batch_size=6, lr=0.2)
    sizes = np.array([len(p) for p in parts])
    local, weight, lengths = poisson_schedules(sizes, 6, 2, NoiseSource(False, 3, "poisson"))
    rows = [torch.as_tensor(p)[torch.from_numpy(local[c])] for c, p in enumerate(parts)]
    index = torch.stack(rows)
    params = {k: v.detach().unsqueeze(0).expand(4, *v.shape) for k, v in model.named_parameters()}
    dp = DPSGD(0.7, 0.0, NoiseSource(False, 0))
    got, _ = train_stacked(
        model, params, data, index, torch.from_numpy(weight), training, None, dp,
        torch.from_numpy(lengths), torch.from_numpy(np.minimum(sizes, 6)),
    )  # fmt: skip
    for c in range(4):
        gsm = opacus.GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=0.2),
            noise_multiplier=0.0,
            max_grad_norm=0.7,
            expected_batch_size=int(min(sizes[c], 6)),
            loss_reduction="mean",
        )
        for s in range(int(lengths[c])):
            batch = index[c, s][torch.from_numpy(weight[c, s]) > 0]
            if len(batch) == 0:
                continue  # zero gradient, no noise at σ = 0: the step changes nothing
            opt.zero_grad()
            logits = gsm({m: data.inputs[m][batch] for m in data.modalities},
                         {m: data.present[m][batch] for m in data.modalities})  # fmt: skip
            F.cross_entropy(logits, data.labels[batch]).backward()
            opt.step()
        for name, p in gsm.named_parameters():
            key = name.removeprefix("_module.")
            torch.testing.assert_close(got[key][c], p.detach(), atol=1e-5, rtol=1e-5)


def test_noise_and_sampling_statistics() -> None:
    from mmshield.privacy.dpsgd import DPSGD, poisson_schedules
    from mmshield.privacy.noise import NoiseSource

    dp = DPSGD(2.0, 1.5, NoiseSource(True))
    z = dp.noise({"w": torch.zeros(200_000)})["w"]
    assert abs(float(z.mean())) < 0.03 and float(z.std()) == pytest.approx(3.0, rel=0.01)
    # Seeded sources reproduce; secure ones do not repeat each other.
    a, b = NoiseSource(False, 5).normal((8,)), NoiseSource(False, 5).normal((8,))
    assert torch.equal(a, b)
    assert not torch.equal(NoiseSource(True).normal((8,)), NoiseSource(True).normal((8,)))
    # Poisson batches: each record joins each step with probability batch / n.
    sizes = np.array([100, 40, 3])
    local, weight, lengths = poisson_schedules(sizes, 10, 50, NoiseSource(False, 1))
    assert lengths.tolist() == [500, 200, 50]
    for c, n in enumerate(sizes):
        picks = np.zeros(n)
        steps = weight[c, : lengths[c]]
        np.add.at(picks, local[c, : lengths[c]][steps > 0], 1)
        rate = picks.sum() / (lengths[c] * n)
        assert rate == pytest.approx(min(1.0, 10 / n), rel=0.05)
