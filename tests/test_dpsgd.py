"""Per-sample clipped gradient sums against Opacus (the oracle)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from mmshield.data.dataset import ModalitySpec, MultimodalDataset
from mmshield.models import build_model
from mmshield.models.fusion import AttentionFusion
from mmshield.models.model import MultimodalModel
from mmshield.privacy.bookkeeping import BookKeeping
from mmshield.privacy.dpsgd import DPSGD, clipped_grad_sum
from mmshield.privacy.noise import NoiseSource

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


# --- Book-keeping clipping (ghost norms): against Opacus and the per-sample path -----------------

AV_SPECS = [
    ModalitySpec("image", "image", (1, 28, 28)),
    ModalitySpec("audio", "audio", (1, 32, 39)),
    ModalitySpec("text", "text", (96,), vocab_size=4096),
]


def _av_batch(specs: list[ModalitySpec], n: int, seed: int) -> MultimodalDataset:
    """Random records shaped like av-digits; some modalities absent, text padded and repeating."""
    g = torch.Generator().manual_seed(seed)
    inputs: dict[str, torch.Tensor] = {}
    for s in specs:
        if s.kind == "text":
            ids = torch.randint(1, 40, (n, *s.shape), generator=g)  # few ids: many repeats
            ids[:, 60:] = 0  # padding
            inputs[s.name] = ids
        else:
            inputs[s.name] = torch.rand((n, *s.shape), generator=g)
    present = {s.name: torch.rand(n, generator=g) > 0.2 for s in specs}
    return MultimodalDataset(
        specs=specs,
        inputs=inputs,
        present=present,
        labels=torch.randint(0, 10, (n,), generator=g),
        classes=[str(c) for c in range(10)],
    )


def _median_norm(model, batch) -> tuple[float, torch.Tensor]:
    params = {k: v.detach() for k, v in model.named_parameters()}
    _, _, norms = clipped_grad_sum(model, 1.0)(
        params, batch.inputs, batch.present, batch.labels, torch.ones(len(batch))
    )
    return float(norms.median()), norms


@pytest.mark.parametrize("workload", ["cnn", "av-digits-concat"])
def test_bookkeeping_equals_opacus(workload: str) -> None:
    specs = AV_SPECS[:1] if workload == "cnn" else AV_SPECS
    model = build_model(specs, 10, embed_dim=64, fusion="concat", fusion_hidden=64, seed=1)
    batch = _av_batch(specs, 32, seed=4)
    c, norms = _median_norm(model, batch)  # about half the records clipped, half not
    assert (norms > c).any() and (norms < c).any()
    expected = _opacus_clipped_sum(model, batch, c)
    params = {k: v.detach() for k, v in model.named_parameters()}
    fn = BookKeeping(model, c)
    got, _, got_norms = fn(params, batch.inputs, batch.present, batch.labels, torch.ones(32))
    rules = {u.rule for u in fn._plan(params, dict(batch.inputs), dict(batch.present)).units}
    assert rules == (
        {"conv", "linear", "layer_norm"} | ({"embedding"} if workload != "cnn" else set())
    )
    torch.testing.assert_close(got_norms, norms, atol=1e-5, rtol=1e-5)
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-5)


def test_bookkeeping_equals_per_sample_on_attention_fusion() -> None:
    """Opacus cannot wrap the attention fusion; the per-sample path is the oracle here."""
    model = build_model(AV_SPECS, 10, embed_dim=32, fusion="attention", fusion_hidden=32, seed=3)
    batch = _av_batch(AV_SPECS, 24, seed=5)
    batch.present["image"][:3] = False  # some records with a single modality, one with none
    batch.present["audio"][:3] = False
    batch.present["text"][1:3] = False
    params = {k: v.detach() for k, v in model.named_parameters()}
    c, norms = _median_norm(model, batch)
    args = (params, batch.inputs, batch.present, batch.labels, torch.ones(24))
    expected, loss, _ = clipped_grad_sum(model, c)(*args)
    got, got_loss, got_norms = BookKeeping(model, c)(*args)
    torch.testing.assert_close(got_norms, norms, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_loss, loss)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["concat", "attention"])
def test_bookkeeping_under_vmap_over_clients_with_padding(fusion: str) -> None:
    data = make_toy(n=30, seed=6)
    model = build_model(data.specs, 4, embed_dim=8, fusion=fusion, fusion_hidden=8, seed=2)
    params = {k: v.detach() for k, v in model.named_parameters()}
    rows = torch.arange(30).view(3, 10)
    weight = torch.ones(3, 10)
    weight[1, 6:] = 0  # client 1 holds 6 records, then padding
    weight[2, 1:] = 0  # client 2 holds 1 record
    inputs = {m: data.inputs[m][rows] for m in data.modalities}
    present = {m: data.present[m][rows] for m in data.modalities}
    stacked = {k: v.unsqueeze(0).expand(3, *v.shape) for k, v in params.items()}
    _, _, norms = clipped_grad_sum(model, 1.0)(
        params, data.inputs, data.present, data.labels, torch.ones(30)
    )
    c = float(norms.median())
    fn = BookKeeping(model, c)
    got, loss, got_norms = vmap(fn)(stacked, inputs, present, data.labels[rows], weight)
    ref, ref_loss, _ = vmap(clipped_grad_sum(model, c))(
        stacked, inputs, present, data.labels[rows], weight
    )
    torch.testing.assert_close(got_norms, norms.view(3, 10), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss)
    for k in range(3):
        real = rows[k][weight[k] > 0]
        assert (norms[real] > c).any() or k == 2
        alone, _, _ = clipped_grad_sum(model, c)(
            params,
            {m: data.inputs[m][real] for m in data.modalities},
            {m: data.present[m][real] for m in data.modalities},
            data.labels[real],
            torch.ones(len(real)),
        )
        for name in params:
            torch.testing.assert_close(got[name][k], ref[name][k], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[name][k], alone[name], atol=1e-5, rtol=1e-5)
    assert (norms < c).any() and (norms > c).any()


class _Gate(nn.Module):
    """A module no fast rule knows: its own parameter, a child layer, a keyword input."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.linspace(-1.0, 1.0, d))
        self.inner = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return torch.tanh(self.inner(x)) * torch.sigmoid(self.gate) * scale


class _GatedTabular(nn.Module):
    def __init__(self, d_in: int, d: int, case: str = "") -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d)
        self.gate = _Gate(d)
        self.case = case

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(self.proj(x), scale=2.0)
        if self.case == "module_called_twice":
            return self.gate(h)
        if self.case == "weight_read_outside_its_module":
            return h + F.linear(h, self.gate.inner.weight)
        return h


def _custom_model(case: str = "") -> MultimodalModel:
    torch.manual_seed(0)
    data = make_toy(n=4)
    encoders = {"image": build_model(data.specs[:1], 4, embed_dim=8).encoders["image"]}
    encoders["tab"] = _GatedTabular(5, 8, case)
    model = MultimodalModel(encoders, AttentionFusion(2, 8, 0), nn.Linear(8, 4))
    if case == "tied_weights":
        model.head.weight = nn.Parameter(torch.randn(4, 8))
        model.fusion.value.weight = model.fusion.key.weight  # the same Parameter twice
    return model


def _custom_args(model: MultimodalModel, n: int = 12):
    data = make_toy(n=n, seed=8)
    inputs = {m: data.inputs[m] for m in ("image", "tab")}
    present = {m: data.present[m] for m in ("image", "tab")}
    present["tab"][::4] = False
    params = {k: v.detach() for k, v in model.named_parameters()}
    weight = torch.ones(n)
    weight[-2:] = 0
    return params, inputs, present, data.labels, weight


def test_bookkeeping_handles_modules_without_a_fast_rule() -> None:
    model = _custom_model()
    args = _custom_args(model)
    fn = BookKeeping(model, 2.0)
    rules = {u.name: u.rule for u in fn._plan(args[0], args[1], args[2]).units}
    assert rules["encoders.tab.gate"] == "generic" and rules["encoders.tab.gate.inner"] == "linear"
    assert rules["fusion"] == "generic"  # its own parameters (query, modality embedding)
    expected, _, norms = clipped_grad_sum(model, 2.0)(*args)
    assert (norms > 2.0).any() and (norms < 2.0).any()
    got, _, got_norms = fn(*args)
    torch.testing.assert_close(got_norms, norms, atol=1e-5, rtol=1e-5)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-5)
    # A subset of the parameters: the others are constants, as with functional_call.
    subset = {k: v for k, v in args[0].items() if not k.startswith("encoders.image")}
    got, _, _ = fn(subset, *args[1:])
    expected, _, _ = clipped_grad_sum(model, 2.0)(subset, *args[1:])
    assert set(got) == set(subset)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "case", ["module_called_twice", "tied_weights", "weight_read_outside_its_module"]
)
def test_bookkeeping_falls_back_where_it_cannot_apply(case: str) -> None:
    model = _custom_model(case)
    args = _custom_args(model)
    with pytest.raises(NotImplementedError, match=r"runs 2 times|tied|used outside"):
        BookKeeping(model, 2.0)(*args)
    expected, _, _ = clipped_grad_sum(model, 2.0)(*args)
    got, _, _ = DPSGD(2.0, 0.0, NoiseSource(False)).clipped_sum_fn(model)(*args)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g)
    # No hook stays on the model after a call.
    assert not any(m._forward_hooks for m in model.modules())


def test_train_stacked_bookkeeping_ends_where_per_sample_does() -> None:
    from mmshield.data.partition import dirichlet_partition
    from mmshield.fl.client import LocalTraining, train_stacked
    from mmshield.privacy.dpsgd import poisson_schedules

    data = make_toy(n=80, seed=4)
    data.present["text"][::5] = False
    parts = dirichlet_partition(data.labels.numpy(), 4, alpha=1.0, seed=2)
    model = build_model(data.specs, 4, embed_dim=8, fusion="attention", fusion_hidden=8, seed=2)
    training = LocalTraining(local_epochs=2, batch_size=6, lr=0.2, momentum=0.5)
    sizes = np.array([len(p) for p in parts])
    local, weight, lengths = poisson_schedules(sizes, 6, 2, NoiseSource(False, 3, "poisson"))
    index = torch.stack(
        [torch.as_tensor(p)[torch.from_numpy(local[c])] for c, p in enumerate(parts)]
    )
    params = {k: v.detach().unsqueeze(0).expand(4, *v.shape) for k, v in model.named_parameters()}
    out = {}
    for clipping in ("per_sample", "bookkeeping"):
        dp = DPSGD(0.5, 0.0, NoiseSource(False, 0), clipping=clipping)  # type: ignore[arg-type]
        out[clipping], _ = train_stacked(
            model, params, data, index, torch.from_numpy(weight), training, None, dp,
            torch.from_numpy(lengths), torch.from_numpy(np.minimum(sizes, 6)),
        )  # fmt: skip
    moved = max(float((out["per_sample"][k] - params[k]).abs().max()) for k in params)
    assert moved > 1e-2
    for k in params:
        torch.testing.assert_close(
            out["bookkeeping"][k], out["per_sample"][k], atol=1e-5, rtol=1e-5
        )
    with pytest.raises(ValueError, match="clipping"):
        DPSGD(0.5, 0.0, NoiseSource(False), clipping="ghost")  # type: ignore[arg-type]


def test_dpsgd_noise_is_one_draw_of_the_shipped_sampler() -> None:
    like = {
        "a": torch.zeros(3, 5),
        "b": torch.zeros(7),
        "c": torch.zeros(2, 350_001),  # more than one chunk of the sampler
        "d": torch.zeros(0),
    }
    total = sum(v.numel() for v in like.values())
    dp = DPSGD(2.0, 1.5, NoiseSource(False, 3, "x"))
    got = dp.noise(like)
    flat = NoiseSource(False, 3, "x").normal((total,), 3.0)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in like.items()}
    assert torch.equal(torch.cat([v.flatten() for v in got.values()]), flat)
    # The stream continues where one draw of all the elements leaves it.
    src, ref = NoiseSource(False, 3, "x"), NoiseSource(False, 3, "x")
    src.normal_like(like, 1.0)
    ref.normal((total,))
    assert np.array_equal(src.uniform(5), ref.uniform(5))
    # Other dtypes: cast from float64, as normal() does; mixing dtypes keeps the stream.
    mixed = {"a": torch.zeros(5, dtype=torch.float64), "b": torch.zeros(4, dtype=torch.float16)}
    got = NoiseSource(False, 1).normal_like(mixed, 0.5)
    ref = NoiseSource(False, 1).normal((9,), dtype=torch.float64)
    assert torch.equal(got["a"], ref[:5] * 0.5)
    assert torch.equal(got["b"], ref[5:].half() * 0.5)


def test_gaussians_are_box_muller_of_the_chacha20_words_whatever_the_threads() -> None:
    n = 3 * 2**18 + 11  # several chunks and an odd count
    words = np.frombuffer(NoiseSource(False, 9)._stream.update(bytes(8 * (n + 1))), np.uint64)
    u = ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    half = (n + 1) // 2
    radius = np.sqrt(-2.0 * np.log(u[:half]))
    z = np.concatenate(
        [radius * np.cos(2 * np.pi * u[half:]), radius * np.sin(2 * np.pi * u[half:])]
    )
    threads = torch.get_num_threads()
    try:
        draws = []
        for t in (1, 2):
            torch.set_num_threads(t)
            draws.append(NoiseSource(False, 9).normal((n,), dtype=torch.float64))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1])
    # NumPy's and torch's float64 log/cos/sin may differ in the last bit, nothing more.
    np.testing.assert_allclose(draws[0].numpy(), z[:n], rtol=1e-14, atol=1e-14)
