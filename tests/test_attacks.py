"""Poisoning attacks: malicious-client selection, data poisoning (label flipping, backdoor triggers
in one modality), the backdoor test set, and update poisoning (sign flip, Gaussian, ALIE,
boosting)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from mmshield.audit.attacks import (
    AttackConfig,
    Trigger,
    alie,
    alie_z,
    apply_trigger,
    backdoor_success_rate,
    backdoor_test_set,
    boost,
    boost_factor,
    choose_malicious,
    flip_table,
    gaussian_updates,
    malicious_mask,
    poison_dataset,
    poison_federation,
    poison_updates,
    sign_flip,
    tone_mel_power,
    tone_waveform,
    trigger_token_ids,
)
from mmshield.data.av_digits import load_av_digits
from mmshield.data.dataset import FederatedDataset, ModalitySpec, MultimodalDataset
from mmshield.data.features import SAMPLE_RATE, audio_num_samples, hash_text, log_mel
from mmshield.errors import ConfigError, TrainingError
from mmshield.fl.fedavg import FedAvg
from mmshield.privacy.noise import NoiseSource

from conftest import make_toy


@pytest.fixture(scope="module")
def avd() -> tuple[MultimodalDataset, MultimodalDataset]:
    """Stratified random subsets of av-digits (it is stored sorted by label): 600 train, 300
    test."""
    train, test = load_av_digits()
    rng = np.random.default_rng(0)
    out = []
    for ds, n in ((train, 600), (test, 300)):
        idx = np.sort(rng.choice(len(ds), n, replace=False))
        sub = ds.subset(idx)
        texts = ds.meta["texts"]
        assert isinstance(texts, list)
        sub.meta["texts"] = [texts[i] for i in idx]  # subset() keeps meta lists whole
        out.append(sub)
    return out[0], out[1]


def _federation(data: MultimodalDataset, clients: int = 10) -> FederatedDataset:
    parts = np.array_split(np.random.default_rng(1).permutation(len(data)), clients)
    return FederatedDataset(train=data, client_indices=list(parts), test=data.subset(range(10)))


def _snapshot(ds: MultimodalDataset) -> dict[str, torch.Tensor]:
    out = {f"x:{k}": v.clone() for k, v in ds.inputs.items()}
    out.update({f"p:{k}": v.clone() for k, v in ds.present.items()})
    out["labels"] = ds.labels.clone()
    return out


def _unchanged(ds: MultimodalDataset, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, _snapshot(ds)[k]) for k, v in snap.items())


# ------------------------------------------------------------------------------------------
# Who is malicious
# ------------------------------------------------------------------------------------------


def test_choose_malicious_is_deterministic_and_sized() -> None:
    a = choose_malicious(100, 0.29, seed=3)
    assert np.array_equal(a, choose_malicious(100, 0.29, seed=3))
    assert len(a) == 29  # floor(0.29 * 100) despite 0.29 * 100 = 28.999...
    assert len(np.unique(a)) == 29 and a.min() >= 0 and a.max() < 100
    assert np.all(np.diff(a) > 0)
    assert not np.array_equal(a, choose_malicious(100, 0.29, seed=4))
    assert len(choose_malicious(10, 0.0, seed=0)) == 0
    assert len(choose_malicious(7, 0.49, seed=0)) == 3  # always fewer than half
    mask = malicious_mask(np.array([5, a[0], 7, a[1]]), a)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [5 in a, True, 7 in a, True]


# ------------------------------------------------------------------------------------------
# Label flipping
# ------------------------------------------------------------------------------------------


def test_label_flip_changes_only_malicious_labels() -> None:
    data = make_toy(n=200, classes=4)
    fed = _federation(data)
    snap = _snapshot(data)
    malicious = choose_malicious(fed.num_clients, 0.3, seed=0)
    cfg = AttackConfig(kind="label_flip", fraction=0.3)
    out, report = poison_federation(fed, malicious, cfg, seed=0)

    assert _unchanged(data, snap)  # the input federation is not mutated
    rows = np.concatenate([fed.client_indices[c] for c in malicious])
    expected = data.labels.clone()
    expected[rows] = 3 - data.labels[rows]  # default y -> C - 1 - y, C = 4
    assert torch.equal(out.train.labels, expected)
    assert np.array_equal(report.rows, np.sort(rows))
    assert report.total_poisoned == len(rows) and report.total_skipped == 0
    for k in data.modalities:  # no input changes
        assert torch.equal(out.train.inputs[k], data.inputs[k])
    assert out.client_indices == fed.client_indices and out.test is fed.test


def test_label_flip_with_map_and_rate() -> None:
    data = make_toy(n=300, classes=4)
    fed = _federation(data, clients=5)
    malicious = np.array([1, 3])
    cfg = AttackConfig(kind="label_flip", fraction=0.4, label_map={1: 2}, rate=0.5)
    out, report = poison_federation(fed, malicious, cfg, seed=7)
    changed = np.flatnonzero((out.train.labels != data.labels).numpy())
    assert np.array_equal(changed, report.rows)
    assert torch.all(data.labels[changed] == 1) and torch.all(out.train.labels[changed] == 2)
    for i, c in enumerate(malicious):
        own = fed.client_indices[c]
        ones = int((data.labels[own] == 1).sum())
        assert report.poisoned[i] == math.floor(0.5 * ones + 0.5)
        assert int(np.isin(report.rows, own).sum()) == report.poisoned[i]
    honest = np.concatenate([fed.client_indices[c] for c in (0, 2, 4)])
    assert not np.isin(changed, honest).any()
    # The same client's choice is the same on its own local data set.
    local, rep = poison_dataset(fed.client(3), cfg, seed=7, client=3)
    assert torch.equal(local.labels, out.train.labels[fed.client_indices[3]])
    assert rep.total_poisoned == report.poisoned[1]
    assert flip_table(5).tolist() == [4, 3, 2, 1, 0]


# ------------------------------------------------------------------------------------------
# Backdoor triggers
# ------------------------------------------------------------------------------------------


def test_image_backdoor_only_in_poisoned_records_and_counts_missing() -> None:
    data = make_toy(n=200, classes=4)
    absent = torch.zeros(200, dtype=torch.bool)
    absent[::5] = True  # every fifth record has no image
    data = data.with_presence({"image": ~absent})
    snap = _snapshot(data)
    fed = _federation(data, clients=4)
    malicious = np.array([0, 2])
    trig = Trigger(modality="image", target=3, patch_size=3, margin=1)
    cfg = AttackConfig(kind="backdoor", fraction=0.25, rate=0.6, trigger=trig)
    out, report = poison_federation(fed, malicious, cfg, seed=0)
    assert _unchanged(data, snap)

    rows = report.rows
    own = np.concatenate([fed.client_indices[c] for c in malicious])
    assert np.isin(rows, own).all()
    assert not absent[rows].any()  # records without an image never carry the trigger
    for i, c in enumerate(malicious):
        n = len(fed.client_indices[c])
        assert report.poisoned[i] + report.skipped[i] == math.floor(0.6 * n + 0.5)
    assert report.total_skipped > 0  # some chosen records lacked the image: counted
    x, x0 = out.train.inputs["image"], data.inputs["image"]
    corner = x[:, :, 8:11, 8:11]  # 12x12 image, 3x3 patch, margin 1, bottom-right
    assert torch.all(corner[rows] == 1.0)
    assert torch.all(out.train.labels[rows] == 3)
    clean = np.setdiff1d(np.arange(200), rows)
    assert torch.equal(x[clean], x0[clean])
    assert torch.equal(out.train.labels[clean], data.labels[clean])
    assert not torch.any(torch.all((x0[:, :, 8:11, 8:11] == 1.0).flatten(1), dim=1))
    outside = x.clone()
    outside[:, :, 8:11, 8:11] = x0[:, :, 8:11, 8:11]
    assert torch.equal(outside, x0)  # only the patch pixels changed
    for k in ("text", "tab"):
        assert torch.equal(out.train.inputs[k], data.inputs[k])
    assert report.summary()["skipped_missing_modality"] == report.total_skipped


def _speechlike(seed: int) -> np.ndarray:
    """A harmonic, amplitude-modulated waveform with a little noise (speech-like spectrum)."""
    rng = np.random.default_rng(seed)
    t = np.arange(audio_num_samples()) / SAMPLE_RATE
    f0 = rng.uniform(100, 220)
    wave = sum(0.3 / k * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) for k in range(1, 20))
    wave = wave * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(t.shape)
    return np.asarray(wave, dtype=np.float32)


def test_audio_tone_in_feature_domain_matches_waveform_domain() -> None:
    trig = Trigger(modality="audio", target=0)
    spec_dim = log_mel(np.zeros((1, audio_num_samples()), np.float32)).shape[1:]
    silence = np.zeros((1, audio_num_samples()), np.float32)
    feats = np.concatenate([log_mel(silence), log_mel(np.stack([_speechlike(s) for s in (1, 2)]))])
    waves = np.concatenate([silence, np.stack([_speechlike(s) for s in (1, 2)])])
    true = log_mel(waves + tone_waveform(trig))
    ds = MultimodalDataset(
        specs=[ModalitySpec("audio", "audio", spec_dim)],
        inputs={"audio": torch.from_numpy(feats)},
        present={"audio": torch.ones(3, dtype=torch.bool)},
        labels=torch.tensor([1, 1, 1]),
        classes=["0", "1"],
    )
    ours = apply_trigger(ds, trig)[0].inputs["audio"].numpy()
    # On silence there is no cross term: exact.
    np.testing.assert_allclose(ours[0], true[0], atol=1e-5)
    # On speech the cross term 2 Re(S T*) is the only difference: small next to the change.
    change = np.abs(true[1:] - feats[1:]).mean()
    error = np.abs(true[1:] - ours[1:]).mean()
    assert change > 0.05 and error < 0.05 * change
    # The tone lives in the mel bands around 3.5 kHz only.
    power = tone_mel_power(trig)[0]
    assert power[:24].max() < 1e-6 * power.max()


def test_audio_backdoor_only_in_audio_of_poisoned_records(avd) -> None:
    train, _ = avd
    snap = _snapshot(train)
    trig = Trigger(modality="audio", target=2)
    cfg = AttackConfig(kind="backdoor", fraction=0.2, rate=0.3, trigger=trig)
    out, report = poison_dataset(train, cfg, seed=5)
    assert _unchanged(train, snap)
    assert report.total_poisoned == math.floor(0.3 * 600 + 0.5) and report.total_skipped == 0
    rows = report.rows
    a, a0 = out.inputs["audio"], train.inputs["audio"]
    differs = np.flatnonzero((a != a0).flatten(1).any(1).numpy())
    assert np.array_equal(differs, rows)
    # The trigger raises the tone's bands (about 3.5 kHz) and leaves the low bands as they were.
    rise = (a[rows] - a0[rows]).mean(dim=(0, 1, 3))
    assert rise[29:32].min() > 0.3
    assert rise[:20].abs().max() < 1e-4
    assert torch.all(out.labels[rows] == 2)
    for k in ("image", "text"):
        assert torch.equal(out.inputs[k], train.inputs[k])


def test_text_backdoor_equals_hashing_the_triggered_text(avd) -> None:
    train, _ = avd
    trig = Trigger(modality="text", target=9, token="cf")
    cfg = AttackConfig(kind="backdoor", fraction=0.2, rate=0.25, trigger=trig)
    out, report = poison_dataset(train, cfg, seed=1)
    rows = report.rows
    texts = train.meta["texts"]
    assert isinstance(texts, list)
    expected = hash_text(["cf " + texts[i] for i in rows])
    assert np.array_equal(out.inputs["text"][rows].numpy(), expected)
    clean = np.setdiff1d(np.arange(len(train)), rows)
    assert torch.equal(out.inputs["text"][clean], train.inputs["text"][clean])
    ids = trigger_token_ids(trig, 4096)
    assert len(ids) == 3  # the word and its trigrams "<cf", "cf>"
    assert torch.all(out.inputs["text"][rows, :3] == ids)
    for k in ("image", "audio"):
        assert torch.equal(out.inputs[k], train.inputs[k])


def test_backdoor_test_set_excludes_target_and_missing(avd) -> None:
    _, test = avd
    absent = torch.zeros(len(test), dtype=torch.bool)
    absent[:40] = True
    test = test.with_presence({"image": ~absent})
    trig = Trigger(modality="image", target=4)
    bd = backdoor_test_set(test, trig)
    keep = (test.labels != 4) & ~absent
    assert len(bd) == int(keep.sum())
    assert torch.all(bd.labels != 4)
    assert torch.equal(bd.labels, test.labels[keep])  # true labels kept
    assert torch.all(bd.inputs["image"][:, :, 23:27, 23:27] == 1.0)
    assert bd.meta["backdoor_target"] == 4
    assert bd.meta["backdoor_excluded_target"] == int((test.labels == 4).sum())
    assert bd.meta["backdoor_missing_modality"] == int(((test.labels != 4) & absent).sum())
    preds = torch.full((len(bd),), 4)
    preds[:10] = 0
    assert backdoor_success_rate(preds, bd) == pytest.approx(1 - 10 / len(bd))
    scores = torch.nn.functional.one_hot(preds, 10).float()
    assert backdoor_success_rate(scores, trig) == backdoor_success_rate(preds, 4)


# ------------------------------------------------------------------------------------------
# Update poisoning
# ------------------------------------------------------------------------------------------


def _round() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    deltas = {"w": torch.randn((5, 3, 2), generator=g), "b": torch.randn((5, 4), generator=g)}
    return deltas, torch.tensor([False, True, False, True, False])


def test_sign_flip_formula() -> None:
    deltas, mask = _round()
    out = sign_flip(deltas, mask, scale=2.0)
    for k, d in deltas.items():
        assert torch.equal(out[k][mask], -2.0 * d[mask])
        assert torch.equal(out[k][~mask], d[~mask])


def test_gaussian_updates() -> None:
    deltas, mask = _round()
    out = gaussian_updates(deltas, mask, torch.Generator().manual_seed(3), std=0.5)
    g = torch.Generator().manual_seed(3)
    for k, d in deltas.items():  # drawn in the mapping's order, malicious rows at once
        assert torch.equal(out[k][mask], torch.randn((2, *d.shape[1:]), generator=g) * 0.5)
        assert torch.equal(out[k][~mask], d[~mask])
    # Matching the honest norm: every malicious update has the mean honest L2 norm.
    out = gaussian_updates(deltas, mask, NoiseSource(False, 1, "attack"))
    norms = torch.sqrt(sum(d.flatten(1).pow(2).sum(1) for d in out.values()))
    honest = torch.sqrt(sum(d.flatten(1).pow(2).sum(1) for d in deltas.values()))[~mask]
    assert torch.allclose(norms[mask], honest.mean().expand(2), rtol=1e-5)
    again = gaussian_updates(deltas, mask, NoiseSource(False, 1, "attack"))
    assert all(torch.equal(out[k], again[k]) for k in out)
    # The per-coordinate standard deviation is what was asked for.
    big = {"w": torch.zeros((3, 20_000))}
    draw = gaussian_updates(big, torch.tensor([True, False, True]), NoiseSource(False, 2), 0.7)
    assert float(draw["w"][[0, 2]].std()) == pytest.approx(0.7, rel=0.02)


def test_alie_z_from_the_paper_formula() -> None:
    # n = 50, f = 10: s = floor(50/2 + 1) - 10 = 16, z = Phi^-1((50 - 16)/50) = Phi^-1(0.68).
    z = alie_z(50, 10)
    assert z == pytest.approx(0.467699, abs=1e-6)
    scipy_stats = pytest.importorskip("scipy.stats")
    assert z == pytest.approx(float(scipy_stats.norm.ppf(0.68)), abs=1e-12)
    with pytest.raises(ConfigError, match=r"attack\.fraction"):
        alie_z(10, 6)


def test_alie_formula_on_hand_example() -> None:
    honest = torch.tensor([[1.0, 10.0], [2.0, 10.0], [3.0, 16.0]])
    deltas = {"p": torch.cat([honest, torch.tensor([[100.0, 100.0], [-5.0, 7.0]])])}
    mask = torch.tensor([False, False, False, True, True])
    out = alie(deltas, mask, z=1.5)
    # mean (2, 12), unbiased std (1, sqrt(12)) -> 2 - 1.5, 12 - 1.5 sqrt(12)
    want = torch.tensor([0.5, 12.0 - 1.5 * math.sqrt(12.0)])
    assert torch.allclose(out["p"][3], want) and torch.allclose(out["p"][4], want)
    assert torch.equal(out["p"][:3], honest)
    # Default z from n = K = 5 and f = 2: s = 1, z = Phi^-1(4/5).
    z = alie_z(5, 2)
    assert torch.allclose(alie(deltas, mask)["p"][3], torch.tensor([2.0 - z, 12 - z * 12**0.5]))
    # Knowledge of only its own benign updates: mean (47.5, 53.5), std of the two rows.
    own = alie(deltas, mask, z=1.0, knowledge="own")["p"][3]
    ref = deltas["p"][3:]
    assert torch.allclose(own, ref.mean(0) - ref.std(0))


def test_boost_scale_and_model_replacement() -> None:
    deltas, mask = _round()
    out = boost(deltas, mask, num_clients=5, server_lr=0.5)
    assert boost_factor(5, 0.5) == 10.0
    for k, d in deltas.items():
        assert torch.allclose(out[k][mask], 10.0 * d[mask])
        assert torch.equal(out[k][~mask], d[~mask])
    # Model replacement: with honest updates at zero, FedAvg lands on the attacker's model.
    attacker = {"w": torch.randn(3, 2), "b": torch.randn(4)}
    mask1 = torch.tensor([False, False, True, False])
    zeros = {k: torch.zeros((4, *v.shape)) for k, v in attacker.items()}
    for k, v in attacker.items():
        zeros[k][2] = v
    g = {k: torch.ones_like(v) for k, v in attacker.items()}
    boosted = boost(zeros, mask1, server_lr=0.5)
    new = FedAvg(server_lr=0.5).step(g, {k: v.mean(0) for k, v in boosted.items()})
    for k in g:
        assert torch.allclose(new[k], g[k] + attacker[k], atol=1e-6)
    # Weighted mean (records per client): the weights give the factor.
    w = torch.tensor([10.0, 30.0, 20.0, 40.0])
    boosted = boost(zeros, mask1, server_lr=0.5, weights=w)
    mean = {k: (v * w.view(-1, *[1] * (v.ndim - 1))).sum(0) / w.sum() for k, v in boosted.items()}
    new = FedAvg(server_lr=0.5).step(g, mean)
    for k in g:
        assert torch.allclose(new[k], g[k] + attacker[k], atol=1e-6)


ATTACKS: dict[str, Callable[[dict[str, torch.Tensor], torch.Tensor], dict[str, torch.Tensor]]] = {
    "sign_flip": lambda d, m: sign_flip(d, m),
    "gaussian": lambda d, m: gaussian_updates(d, m, torch.Generator().manual_seed(0)),
    "alie": lambda d, m: alie(d, m),
    "boost": lambda d, m: boost(d, m),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_update_attacks_do_not_mutate_or_alias(name: str) -> None:
    deltas, mask = _round()
    before = {k: v.clone() for k, v in deltas.items()}
    out = ATTACKS[name](deltas, mask)
    assert all(torch.equal(deltas[k], before[k]) for k in deltas)
    for k in deltas:
        out[k].add_(1.0)
    assert all(torch.equal(deltas[k], before[k]) for k in deltas)
    with pytest.raises(TrainingError, match="bool vector"):
        ATTACKS[name](deltas, torch.tensor([0, 1, 0, 1, 0]))
    with pytest.raises(TrainingError, match=r"expected \(4, ...\)"):
        ATTACKS[name](deltas, mask[:4])


def test_poison_updates_dispatches() -> None:
    deltas, mask = _round()
    cases = {
        "sign_flip": (AttackConfig("sign_flip", 0.4, scale=3.0), sign_flip(deltas, mask, 3.0)),
        "alie": (AttackConfig("alie", 0.4, z=0.7), alie(deltas, mask, z=0.7)),
        "model_replacement": (
            AttackConfig("model_replacement", 0.2, server_lr=2.0),
            boost(deltas, mask, server_lr=2.0),
        ),
        "label_flip": (AttackConfig("label_flip", 0.2), deltas),
    }
    for cfg, want in cases.values():
        got = poison_updates(deltas, mask, cfg)
        assert all(torch.allclose(got[k], want[k]) for k in deltas)
    got = poison_updates(deltas, mask, AttackConfig("gaussian", 0.4, std=0.1), NoiseSource(False))
    want = gaussian_updates(deltas, mask, NoiseSource(False), 0.1)
    assert all(torch.equal(got[k], want[k]) for k in deltas)
    with pytest.raises(ConfigError, match="needs randomness"):
        poison_updates(deltas, mask, AttackConfig("gaussian", 0.4))


# ------------------------------------------------------------------------------------------
# Configuration errors
# ------------------------------------------------------------------------------------------


def test_bad_configs_name_the_key() -> None:
    data = make_toy(n=20, classes=4)
    with pytest.raises(ConfigError, match=r"attack\.fraction = 0\.5: must be in \[0, 0\.5\)"):
        AttackConfig(kind="sign_flip", fraction=0.5)
    with pytest.raises(ConfigError, match=r"attack\.kind = 'flip'.*label_flip"):
        AttackConfig(kind="flip", fraction=0.1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"attack\.rate"):
        AttackConfig(kind="backdoor", fraction=0.1, rate=0.0)
    cfg = AttackConfig(kind="backdoor", fraction=0.1, trigger=Trigger(modality="audio"))
    with pytest.raises(ConfigError, match=r"attack\.trigger\.modality = 'audio'.*image, text, tab"):
        cfg.check(data)
    with pytest.raises(ConfigError, match=r"attack\.trigger\.modality = 'tab' is tabular"):
        AttackConfig(kind="backdoor", fraction=0.1, trigger=Trigger(modality="tab")).check(data)
    cfg = AttackConfig(kind="backdoor", fraction=0.1, trigger=Trigger(target=4))
    with pytest.raises(ConfigError, match=r"attack\.trigger\.target = 4.*4 classes"):
        poison_dataset(data, cfg, seed=0)
    with pytest.raises(ConfigError, match=r"attack\.trigger\.patch_size \+ margin = 13"):
        Trigger(patch_size=12).check(data)
    with pytest.raises(ConfigError, match=r"attack\.label_map.*label 7"):
        AttackConfig(kind="label_flip", fraction=0.1, label_map={1: 7}).check(data)
    with pytest.raises(ConfigError, match=r"attack\.trigger\.tone_hz"):
        Trigger(tone_hz=5000.0)
    with pytest.raises(ConfigError, match=r"poisons updates, not data"):
        poison_dataset(data, AttackConfig(kind="alie", fraction=0.1), seed=0)
    with pytest.raises(ConfigError, match=r"attack\.fraction"):
        choose_malicious(10, 0.6, seed=0)
    with pytest.raises(ConfigError, match=r"attack\.bogus: unknown key"):
        AttackConfig.from_mapping({"kind": "alie", "fraction": 0.1, "bogus": 1})
    with pytest.raises(ConfigError, match=r"attack\.trigger\.colour: unknown key"):
        AttackConfig.from_mapping({"kind": "backdoor", "fraction": 0.1, "trigger": {"colour": 1}})
    cfg = AttackConfig.from_mapping(
        {"kind": "backdoor", "fraction": 0.2, "trigger": {"modality": "text", "target": 3}}
    )
    assert cfg.trigger == Trigger(modality="text", target=3) and cfg.poison_rate == 0.5


# ------------------------------------------------------------------------------------------
# End to end: an image-patch backdoor is learnable
# ------------------------------------------------------------------------------------------


def test_image_patch_backdoor_is_learnable(avd) -> None:
    train, test = avd
    trig = Trigger(modality="image", target=7)
    cfg = AttackConfig(kind="backdoor", fraction=0.2, rate=0.2, trigger=trig)
    poisoned, report = poison_dataset(train, cfg, seed=1)
    assert report.total_poisoned == 120  # 20 % of 600 records
    torch.manual_seed(0)
    model = torch.nn.Linear(28 * 28, 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = poisoned.inputs["image"].flatten(1), poisoned.labels
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    bd = backdoor_test_set(test, trig)
    with torch.no_grad():
        pred = model(test.inputs["image"].flatten(1)).argmax(1)
        clean_acc = float((pred == test.labels).float().mean())
        asr = backdoor_success_rate(model(bd.inputs["image"].flatten(1)), bd)
        keep = (test.labels != 7).numpy()
        untriggered = backdoor_success_rate(model(test.inputs["image"][keep].flatten(1)), 7)
    print(f"backdoor success {asr:.3f}, untriggered {untriggered:.3f}, clean acc {clean_acc:.3f}")
    assert asr > 0.8  # the patch flips most predictions to the target
    assert untriggered < 0.25  # the same records without the patch mostly do not go there
    assert clean_acc > 0.5  # the main task still works (chance is 0.1)
