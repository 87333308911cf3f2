"""Membership inference: exact metrics, loss threshold and LiRA on an overfit model, the DP bound.

The attacked model is an unregularised multinomial logistic regression on the standardised
log-mel audio of 600 av-digits training records (1,248 features), fitted by L-BFGS on a random
half: it reaches 100 % training accuracy and about 78 % on the other half, so it leaks
membership. Shadow models are the same recipe on halves of the same 600 records.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import dp_accounting as dpa
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from mmshield.audit.mia import (
    MIAResult,
    Scorer,
    ShadowSet,
    check_dp_bound,
    cross_entropy_loss,
    dp_tpr_bound,
    evaluate_attack,
    lira,
    lira_scores,
    logit_confidence,
    loss_threshold_scores,
    roc_auc,
    roc_curve,
    shadow_membership,
    tpr_at_fpr,
    train_shadows,
    yeom_threshold,
)
from mmshield.data.av_digits import load_av_digits

N = 600


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread avoids oversubscribing shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _LogReg:
    """Trainer: unregularised softmax regression on population rows, full-batch L-BFGS."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.x, self.y = features, labels

    def __call__(self, indices: np.ndarray) -> Scorer:
        idx = torch.as_tensor(indices)
        x, y = self.x[idx], self.y[idx]
        w = torch.zeros(self.x.shape[1], 10, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(10, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b], max_iter=100, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y)
            loss.backward()
            return loss

        opt.step(closure)
        wd, bd = w.detach(), b.detach()
        return lambda ii: (self.x[torch.as_tensor(ii)] @ wd + bd).numpy()


@pytest.fixture(scope="module")
def attack_setup() -> dict[str, object]:
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        train, _ = load_av_digits()
        x = train.inputs["audio"][:N].reshape(N, -1).double()
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        y = train.labels[:N]
        trainer = _LogReg(x, y)
        member = np.random.default_rng(123).random(N) < 0.5
        target = trainer(np.flatnonzero(member))
        shadows = train_shadows(trainer, y, n_shadows=8, seed=1)
    return {"y": y, "member": member, "target": target, "trainer": trainer, "shadows": shadows}


def test_target_overfits(attack_setup: dict) -> None:
    logits = attack_setup["target"](np.arange(N))
    member = attack_setup["member"]
    correct = logits.argmax(1) == attack_setup["y"].numpy()
    assert correct[member].mean() == 1.0
    assert correct[~member].mean() < 0.85


def _loss_attack(attack_setup: dict) -> MIAResult:
    losses = cross_entropy_loss(attack_setup["target"](np.arange(N)), attack_setup["y"])
    return evaluate_attack(loss_threshold_scores(losses), attack_setup["member"])


def test_loss_threshold_attack(attack_setup: dict) -> None:
    """Loss threshold (Yeom et al.): AUC 0.619 here, but no TPR at 0.1 % or 1 % FPR."""
    result = _loss_attack(attack_setup)
    assert result.auc > 0.55
    assert (result.n_members, result.n_nonmembers) == (307, 293)
    # Yeom's fixed threshold (mean training loss) is one point of the ROC.
    logits = attack_setup["target"](np.arange(N))
    losses = cross_entropy_loss(logits, attack_setup["y"])
    member = attack_setup["member"]
    tau = yeom_threshold(losses[member])
    tpr, fpr = (losses[member] <= tau).mean(), (losses[~member] <= tau).mean()
    assert tpr > fpr
    assert any(
        abs(f - fpr) < 1e-12 and abs(t - tpr) < 1e-12
        for f, t in zip(result.fpr, result.tpr, strict=True)
    )


@pytest.mark.parametrize("online", [True, False])
def test_lira_beats_loss_threshold_at_low_fpr(attack_setup: dict, online: bool) -> None:
    """8 linear shadows. Online: AUC 0.673, TPR 9.1 % / 10.4 % at 0.1 % / 1 % FPR; offline:
    0.701, 7.5 % / 9.4 %; loss threshold: 0.619, 0 % / 0 %."""
    loss = _loss_attack(attack_setup)
    scores = lira(
        attack_setup["target"],
        attack_setup["trainer"],
        attack_setup["y"],
        online=online,
        shadows=attack_setup["shadows"],
    )
    result = evaluate_attack(scores, attack_setup["member"])
    assert result.tpr_at_0_1_percent >= loss.tpr_at_0_1_percent
    assert result.tpr_at_1_percent >= loss.tpr_at_1_percent
    assert result.tpr_at_1_percent > 0.05
    if online:
        assert result.auc > loss.auc


def test_lira_end_to_end_trains_its_shadows(attack_setup: dict) -> None:
    """``lira`` without precomputed shadows calls the trainer on exactly-half splits."""
    calls: list[np.ndarray] = []
    trainer = attack_setup["trainer"]

    def counting(indices: np.ndarray) -> Scorer:
        calls.append(np.asarray(indices))
        return trainer(indices)

    scores = lira(attack_setup["target"], counting, attack_setup["y"], n_shadows=4, seed=5)
    assert len(calls) == 4
    assert np.all(np.bincount(np.concatenate(calls), minlength=N) == 2)
    assert scores.shape == (N,) and np.all(np.isfinite(scores))


def test_shadow_membership_is_exactly_half() -> None:
    m = shadow_membership(50, 8, seed=0)
    assert m.shape == (8, 50) and m.dtype == bool
    assert np.all(m.sum(axis=0) == 4)
    assert not np.array_equal(m, shadow_membership(50, 8, seed=1))
    with pytest.raises(ValueError, match="at least 2 shadow"):
        shadow_membership(50, 1)


def test_lira_scores_on_known_gaussians() -> None:
    """Confidences drawn from the model LiRA assumes: in ~ N(2, 1), out ~ N(0, 1)."""
    rng = np.random.default_rng(0)
    n, s = 400, 16
    member_sh = shadow_membership(n, s, seed=0)
    conf = rng.normal(0, 1, (s, n)) + 2.0 * member_sh
    target_in = rng.random(n) < 0.5
    phi = rng.normal(0, 1, n) + 2.0 * target_in
    shadows = ShadowSet(conf, member_sh)
    for online in (True, False):
        for global_variance in (True, False):
            scores = lira_scores(phi, shadows, online=online, global_variance=global_variance)
            # The optimal test here has AUC Φ(2 / √2) = 0.92.
            assert roc_auc(scores, target_in) > 0.85
    with pytest.raises(ValueError, match="do not match"):
        lira_scores(phi[:-1], shadows)
    with pytest.raises(ValueError, match="at least 2 shadow models on each side"):
        lira_scores(phi, ShadowSet(conf[:2], shadow_membership(n, 2)), global_variance=False)
    with pytest.raises(ValueError, match="no shadow model on this side"):
        lira_scores(phi, ShadowSet(conf[:2], member_sh[:2]))


def test_logit_confidence_is_stable() -> None:
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [800.0, 0.0, 0.0]])
    labels = np.array([0, 1, 0])
    phi = logit_confidence(logits, labels)
    p = np.exp(logits[:2] - logits[:2].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p[np.arange(2), labels[:2]]
    assert np.allclose(phi[:2], np.log(py) - np.log1p(-py))
    assert phi[2] == pytest.approx(800.0 - math.log(2.0))  # 1 - p_y = 2e-800: no log(0)
    assert np.allclose(cross_entropy_loss(logits[:2], labels[:2]), -np.log(py))
    assert np.allclose(logit_confidence(torch.tensor(logits), torch.tensor(labels)), phi)


def test_exact_roc_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    member = rng.random(3000) < 0.4
    scores = np.round(rng.normal(0, 1, 3000) + 0.7 * member, 1)  # many ties
    fpr, tpr, thr = roc_curve(scores, member)
    sk_fpr, sk_tpr, _ = sk_roc_curve(member, scores, drop_intermediate=False)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)
    assert roc_auc(scores, member) == pytest.approx(roc_auc_score(member, scores), abs=1e-12)
    assert thr[0] == np.inf and np.all(np.diff(thr[1:]) < 0)
    # TPR at FPR: the best threshold with at most floor(fpr · n_neg) false positives.
    n_neg = int((~member).sum())
    for target in (0.001, 0.01, 0.1):
        best = max(t for f, t in zip(fpr, tpr, strict=True) if f * n_neg <= target * n_neg + 1e-9)
        assert tpr_at_fpr(scores, member, target) == best
    result = evaluate_attack(scores, member, fprs=(0.1,))
    assert set(result.tpr_at) == {0.001, 0.01, 0.1}
    with pytest.raises(ValueError, match="one member and one non-member"):
        evaluate_attack(scores, np.ones(3000, dtype=bool))


def test_dp_bound_curve() -> None:
    fpr = np.linspace(0, 1, 101)
    assert np.allclose(dp_tpr_bound(fpr, 0.0), fpr)  # ε = 0: no test beats chance
    b = dp_tpr_bound(fpr, 1.0, 1e-5)
    assert b[0] == pytest.approx(1e-5)
    assert np.all(np.diff(b) >= 0) and b[-1] == 1.0
    assert np.allclose(b, np.minimum(math.e * fpr + 1e-5, 1 - (1 - 1e-5 - fpr) / math.e))
    # Symmetric in the two neighbours: (FPR, TPR) allowed <=> (1 - TPR, 1 - FPR) allowed.
    t = dp_tpr_bound(0.2, 0.5, 0.01)
    assert dp_tpr_bound(1 - t, 0.5, 0.01) == pytest.approx(1 - 0.2)


def test_bound_check_accepts_below_and_flags_above() -> None:
    eps, delta, n = 1.0, 1e-5, 1000
    bound = float(dp_tpr_bound(0.01, eps, delta))  # 0.0272
    check = check_dp_bound([0.01, 0.01, 0.01], [0.02, 0.035, 0.5], n, n, eps, delta)
    assert check.violates.tolist() == [False, False, True]
    assert not check.ok
    # 0.035 is above the raw bound but within sampling error of 1,000 records.
    assert check.above_raw.tolist() == [False, True, True]
    assert check.tpr[1] > bound
    assert check_dp_bound([0.01, 0.01], [0.02, 0.035], n, n, eps, delta).ok


def _gaussian_mechanism_roc(factor: float, n: int = 20_000) -> MIAResult:
    """ROC of the optimal attack on a Gaussian mechanism calibrated to (1, 1e-5), σ times factor."""
    rng = np.random.default_rng(0)
    sigma = dpa.get_sigma_gaussian(1.0, 1e-5) * factor
    member = rng.random(n) < 0.5
    return evaluate_attack(member + rng.normal(0, sigma, n), member)


def test_bound_check_on_a_gaussian_mechanism() -> None:
    """Independent trials: the calibrated mechanism passes, noise 10x too small is flagged."""
    good = _gaussian_mechanism_roc(1.0)
    check = check_dp_bound(good.fpr, good.tpr, good.n_members, good.n_nonmembers, 1.0, 1e-5)
    assert check.ok
    # 273 of its 20,001 raw ROC points lie above the bound: sampling error, not a bug.
    assert check.above_raw.sum() > 100
    check = _gaussian_mechanism_roc(0.1).check_dp_bound(1.0, 1e-5)
    assert not check.ok and check.violates.sum() > 100


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="boolean"):
        roc_curve([0.1, 0.2], [1, 0])
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc([0.1, np.inf], np.array([True, False]))
    with pytest.raises(ValueError, match="equal length"):
        check_dp_bound([0.1], [0.1, 0.2], 10, 10, 1.0)
    with pytest.raises(ValueError, match="epsilon"):
        dp_tpr_bound(0.1, -1.0)
