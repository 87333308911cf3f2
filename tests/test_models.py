"""Models: absent modalities are masked exactly, parameters are addressed by name."""

from __future__ import annotations

import pytest
import torch

from mmshield.models import build_model, modality_of_parameter

from conftest import make_toy


@pytest.mark.parametrize("fusion", ["attention", "concat"])
def test_garbage_in_absent_slot_changes_no_output_or_gradient(fusion: str) -> None:
    data = make_toy(n=16)
    model = build_model(data.specs, data.num_classes, embed_dim=8, fusion=fusion, seed=0)
    present = {
        m: torch.rand(16, generator=torch.Generator().manual_seed(i)) > 0.5
        for i, m in enumerate(data.modalities)
    }
    present["tab"][:] = True  # every sample keeps at least one modality
    clean = model(data.inputs, present)
    garbage = {m: x.clone() for m, x in data.inputs.items()}
    for m, x in garbage.items():
        absent = ~present[m]
        if x.is_floating_point():
            x[absent] = float("nan")
            x[absent & (torch.arange(16) % 2 == 0)] = 1e30
        else:
            x[absent] = torch.randint(1, 64, x[absent].shape)
    dirty = model(garbage, present)
    assert torch.isfinite(dirty).all()
    assert torch.equal(clean, dirty)
    # Gradients are unaffected too (NaN garbage must not leak through 0 * NaN).
    grads = []
    for inputs in (data.inputs, garbage):
        model.zero_grad()
        model(inputs, present).sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k


def test_sample_output_independent_of_other_samples() -> None:
    data = make_toy(n=8)
    model = build_model(data.specs, data.num_classes, embed_dim=8, seed=0)
    full = model(data.inputs, data.present)
    one = model(
        {m: x[:1] for m, x in data.inputs.items()}, {m: p[:1] for m, p in data.present.items()}
    )
    torch.testing.assert_close(full[:1], one)


def test_parameters_addressed_by_modality() -> None:
    data = make_toy(n=4)
    model = build_model(data.specs, data.num_classes, seed=0)
    names = [n for n, _ in model.named_parameters()]
    assert {modality_of_parameter(n) for n in names} == {"image", "text", "tab", None}
    assert any(n.startswith("fusion.") for n in names) and any(n.startswith("head.") for n in names)


def test_single_tabular_concat_is_plain_mlp() -> None:
    from mmshield.data.dataset import ModalitySpec

    model = build_model(
        [ModalitySpec("x", "tabular", (64,))], 10, embed_dim=64, fusion="concat", fusion_hidden=0
    )
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(64, 64), (64,), (10, 64), (10,)]


def test_same_seed_same_initialisation() -> None:
    data = make_toy(n=4)
    a = build_model(data.specs, 4, seed=3).state_dict()
    b = build_model(data.specs, 4, seed=3).state_dict()
    c = build_model(data.specs, 4, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
