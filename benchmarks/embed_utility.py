"""Utility of private on-device embeddings: linear-probe accuracy on av-digits against ε.

Run ``python -m benchmarks.embed_utility`` (``--quick``: 3 training epochs instead of 10 and one
noise draw per ε instead of 5). Workload:

- **Split.** av-digits' 4,000 training records are split in two stratified halves (200 records
  per class each, drawn with seed 0; the shipped train split is ordered by label, so its literal
  first half would hold only the digits 0-4). The *public* half (2,000 records) trains the
  embedding model; the other 2,000 training records and the 1,000 test records are *devices*,
  each holding one record that the encoder never saw.
- **Embedding model.** The demo config's model (``mmshield/configs/demo.yaml``: per-modality
  encoders, attention fusion, 64-dimensional fused embedding after a 64-unit ReLU layer) trained
  non-privately on the public half with the library's simulator, as a single client holding all
  2,000 records (plain minibatch SGD: batch 32, lr 0.05, momentum 0.9, one epoch per round).
- **Release.** Each device embeds its record (:func:`mmshield.privacy.embed.embed_records`) and
  releases it through the shipped :func:`mmshield.privacy.embed.privatise`: clip to L2 norm
  ``C = 1`` (the CLI's default), then analytic-Gaussian noise for sensitivity ``2C`` at
  ε ∈ {0.5, 1, 2, 4, 8, 16} and δ = 1e-5, drawn from the shipped ``NoiseSource`` (seeded here so
  the figures are reproducible; deployments key it from the OS). Why ``C = 1``: every fused
  embedding has norm well above 1 (smallest ≈ 3.5, median ≈ 12.6 in the recorded run; see
  ``embedding_norms`` in the JSON), so with ``C = 1`` every record is clipped to norm exactly
  ``C`` (a unit-norm direction). Since σ ∝ C, the signal-to-noise ratio
  ``C / (σ √d)`` is then the same for any ``C`` below the smallest norm, while a larger ``C``
  (e.g. the median norm) leaves short records under the bound and only wastes budget.
- **Variants.** ``shipped``: exactly what ``mmshield embed --clip 1`` releases. ``centred``: the
  device first subtracts the mean embedding of the *public* half (free: no private data is used),
  then the same ``privatise``; the fused embeddings share a large common component (ReLU output)
  that otherwise takes up most of the norm budget.
- **Linear probe.** Multinomial logistic regression (scikit-learn, lbfgs, standardised features)
  trained on the 2,000 privatised device-record embeddings; its L2 strength is chosen from
  {1e-3 .. 10} by 5-fold cross-validation on those same private embeddings (no test data).
  Accuracy on (a) the privatised test embeddings at the same ε (both sides private: the realistic
  on-device case) and (b) the clean (clipped, noise-free) test embeddings. ε = ∞ is the same probe
  on clean embeddings. For reference: the trained model's own head accuracy, and an *oracle* for
  (a): nearest clean class mean (means of the clean device embeddings) applied to the private
  test embeddings, the accuracy one would get with perfectly known class means, so a probe near
  it is not what limits (a).

Prints per ε the noise σ per coordinate, the per-record SNR ``C / (σ √d)`` and the accuracies
(mean ± sd over noise draws); writes ``benchmarks/results/embed_utility.json`` and a plot
``benchmarks/results/embed_utility.png``. The issue sets no numeric target, so ``targets`` is
empty.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

import mmshield
from mmshield.api import model_for
from mmshield.config import load_config
from mmshield.data.av_digits import load_av_digits
from mmshield.data.dataset import FederatedDataset, MultimodalDataset
from mmshield.fl.client import LocalTraining
from mmshield.fl.evaluate import evaluate
from mmshield.models.model import MultimodalModel
from mmshield.privacy.embed import embed_records, gaussian_sigma, privatise
from mmshield.privacy.noise import NoiseSource
from mmshield.runtime.simulation import simulate

from benchmarks._common import (
    RESULTS_DIR,
    machine_info,
    machine_line,
    update_results_md,
    write_json,
)

NAME = "embed_utility"
SEED = 0
EPSILONS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
DELTA = 1e-5
CLIP = 1.0
PUBLIC_PER_CLASS = 200
PROBE_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
VARIANTS = ("shipped", "centred")


def split_public(labels: np.ndarray, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified public / device halves of the training records (sorted indices)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xE3B]))
    public = np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    )
    public = np.sort(public)
    return public, np.setdiff1d(np.arange(len(labels)), public)


def train_encoder(
    public: MultimodalDataset, test: MultimodalDataset, epochs: int
) -> tuple[MultimodalModel, float]:
    """The demo config's model trained centrally (one client, all records) on ``public``."""
    config = load_config(Path(mmshield.__file__).parent / "configs" / "demo.yaml")
    model = model_for(config, public)
    t = config.training
    training = LocalTraining(
        local_epochs=1, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum, weight_decay=0.0
    )
    data = FederatedDataset(train=public, client_indices=[np.arange(len(public))], test=test)
    t0 = time.perf_counter()
    result = simulate(
        model, data, rounds=epochs, clients_per_round=1, training=training, seed=SEED,
        eval_every=epochs,
    )  # fmt: skip
    return result.model, time.perf_counter() - t0


def clip_rows(x: np.ndarray, clip_norm: float) -> np.ndarray:
    """Rows scaled to L2 norm at most ``clip_norm`` (the clipping ``privatise`` applies)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))


def probe(x: np.ndarray, y: np.ndarray) -> tuple[Pipeline, float]:
    """Logistic-regression probe, L2 strength chosen by 5-fold CV on ``(x, y)`` only."""

    def make(c: float) -> Pipeline:
        return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))

    folds = StratifiedKFold(5, shuffle=True, random_state=SEED)
    scores = [float(cross_val_score(make(c), x, y, cv=folds).mean()) for c in PROBE_CS]
    best = PROBE_CS[int(np.argmax(scores))]
    return make(best).fit(x, y), best


def nearest_mean_accuracy(
    clean_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
) -> float:
    """Accuracy of the nearest clean class mean on ``x_test`` (oracle for private test data)."""
    classes = np.unique(y_train)
    means = np.stack([clean_train[y_train == c].mean(0) for c in classes])
    d2 = ((x_test[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    return float((classes[np.argmin(d2, axis=1)] == y_test).mean())


def evaluate_variant(
    variant: str,
    device_x: np.ndarray,
    test_x: np.ndarray,
    y_device: np.ndarray,
    y_test: np.ndarray,
    repeats: int,
) -> dict[str, Any]:
    """Probe accuracies at every ε (and ∞) for one preprocessing of the embeddings."""
    clean_dev, clean_test = clip_rows(device_x, CLIP), clip_rows(test_x, CLIP)
    model, c = probe(clean_dev, y_device)
    out: dict[str, Any] = {
        "inf": {"clean_test": float(model.score(clean_test, y_test)), "probe_C": [c]}
    }
    for eps in EPSILONS:
        private, clean, oracle, cs = [], [], [], []
        for r in range(repeats):
            stream = f"embed-utility/{variant}/eps={eps:g}/draw={r}"
            dev_p = privatise(device_x, eps, DELTA, CLIP, NoiseSource(False, SEED, f"{stream}/dev"))
            test_p = privatise(test_x, eps, DELTA, CLIP, NoiseSource(False, SEED, f"{stream}/test"))
            model, c = probe(dev_p, y_device)
            private.append(float(model.score(test_p, y_test)))
            clean.append(float(model.score(clean_test, y_test)))
            oracle.append(nearest_mean_accuracy(clean_dev, y_device, test_p, y_test))
            cs.append(c)
        out[f"{eps:g}"] = {
            "private_test": summary(private),
            "clean_test": summary(clean),
            "oracle_private_test": summary(oracle),
            "probe_C": cs,
        }
    return out


def summary(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the values themselves."""
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": float(np.mean(values)), "sd": sd, "values": values}


def plot(results: dict[str, Any], head: float, path: Path) -> Path:
    """Accuracy against ε (log axis), ε = ∞ and the model's head as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    eps = list(EPSILONS)
    colours = {"shipped": "tab:blue", "centred": "tab:orange"}
    for variant, res in results.items():
        col = colours.get(variant)
        for key, style, label in (
            ("private_test", "-o", "private test"),
            ("clean_test", "--s", "clean test"),
        ):
            mean = np.array([res[f"{e:g}"][key]["mean"] for e in eps])
            sd = np.array([res[f"{e:g}"][key]["sd"] for e in eps])
            ax.errorbar(eps, mean, yerr=sd, fmt=style, color=col, label=f"{variant}: {label}")
        ax.axhline(res["inf"]["clean_test"], ls="--", lw=1, color=col, alpha=0.6,
                   label=f"{variant}: ε = ∞ probe")  # fmt: skip
    ax.axhline(head, ls=":", color="black", label="model's own head")
    ax.axhline(0.1, ls=":", color="grey", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.set_xlabel(f"ε per released embedding (δ = {DELTA:g}, C = {CLIP:g})")
    ax.set_ylabel("linear-probe test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("av-digits: private on-device embeddings, linear probe")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(epochs: int, repeats: int) -> dict[str, Any]:
    """Train the encoder, embed, privatise and probe; return every figure."""
    train, test = load_av_digits()
    labels = train.labels.numpy()
    public_ix, device_ix = split_public(labels, PUBLIC_PER_CLASS, SEED)
    public, device = train.subset(public_ix), train.subset(device_ix)
    model, train_seconds = train_encoder(public, test, epochs)
    _, head_test = evaluate(model, test)
    _, head_device = evaluate(model, device)
    emb_public = embed_records(model, public).astype(np.float64)
    emb_device = embed_records(model, device).astype(np.float64)
    emb_test = embed_records(model, test).astype(np.float64)
    dim = emb_device.shape[1]
    y_device, y_test = labels[device_ix], test.labels.numpy()
    public_mean = emb_public.mean(0)
    prepare: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "shipped": lambda x: x,
        "centred": lambda x: x - public_mean,
    }
    results = {}
    for variant in VARIANTS:
        f = prepare[variant]
        results[variant] = evaluate_variant(
            variant, f(emb_device), f(emb_test), y_device, y_test, repeats
        )
    noise = {}
    for eps in EPSILONS:
        sigma = gaussian_sigma(eps, DELTA, CLIP)
        noise[f"{eps:g}"] = {"sigma": sigma, "snr": CLIP / (sigma * math.sqrt(dim))}
    all_norms = np.linalg.norm(np.concatenate([emb_public, emb_device, emb_test]), axis=1)
    centred_norms = np.linalg.norm(np.concatenate([emb_device, emb_test]) - public_mean, axis=1)
    pct = (0, 5, 50, 95, 100)
    return {
        "split": {"public": len(public_ix), "device": len(device_ix), "test": len(test)},
        "encoder": {
            "epochs": epochs,
            "train_seconds": train_seconds,
            "head_accuracy_test": head_test,
            "head_accuracy_device": head_device,
            "embed_dim": dim,
        },
        "embedding_norms": {
            "percentiles": list(pct),
            "shipped": np.percentile(all_norms, pct).tolist(),
            "centred": np.percentile(centred_norms, pct).tolist(),
            "public_mean_norm": float(np.linalg.norm(public_mean)),
            "clipped_fraction": {
                "shipped": float((all_norms > CLIP).mean()),
                "centred": float((centred_norms > CLIP).mean()),
            },
        },
        "noise": noise,
        "results": results,
    }


def fmt(entry: dict[str, Any]) -> str:
    """``mean ± sd`` (just the mean for a single draw)."""
    if len(entry["values"]) > 1:
        return f"{entry['mean']:.3f} ± {entry['sd']:.3f}"
    return f"{entry['mean']:.3f}"


def rows(out: dict[str, Any]) -> list[list[str]]:
    """Table rows: ε, σ, SNR, then per variant private / clean / oracle accuracy."""
    table = []
    for eps in EPSILONS:
        key = f"{eps:g}"
        row = [key, f"{out['noise'][key]['sigma']:.3f}", f"{out['noise'][key]['snr']:.4f}"]
        for variant in VARIANTS:
            r = out["results"][variant][key]
            row += [fmt(r["private_test"]), fmt(r["clean_test"]), fmt(r["oracle_private_test"])]
        table.append(row)
    last = ["∞", "0", "∞"]
    for variant in VARIANTS:
        last += ["—", f"{out['results'][variant]['inf']['clean_test']:.3f}", "—"]
    table.append(last)
    return table


COLUMNS = [
    "ε",
    "σ per coord",
    "SNR C/(σ√d)",
    *[f"{v}: {c}" for v in VARIANTS for c in ("private test", "clean test", "oracle")],
]


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embed_utility")
    parser.add_argument(
        "--quick", action="store_true", help="3 epochs and 1 noise draw (instead of 10 and 5)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (plot beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    epochs, repeats = (3, 1) if args.quick else (10, 5)
    t0 = time.perf_counter()
    with threadpool_limits(limits=1):  # BLAS threads on a shared 2-core machine
        out = run(epochs, repeats)
    wall = time.perf_counter() - t0
    enc = out["encoder"]
    console = Console(width=150)
    table = Table(
        title=(
            f"av-digits private embeddings: d = {enc['embed_dim']}, δ = {DELTA:g}, C = {CLIP:g}; "
            f"probe trained on {out['split']['device']} private device embeddings, tested on "
            f"{out['split']['test']} ({repeats} noise draw(s))"
        )
    )
    for col in COLUMNS:
        table.add_column(col)
    for row in rows(out):
        table.add_row(*row)
    console.print(table)
    norms = out["embedding_norms"]
    console.print(
        f"model's own head: {enc['head_accuracy_test']:.3f} on test, "
        f"{enc['head_accuracy_device']:.3f} on device records ({enc['epochs']} epochs on "
        f"{out['split']['public']} public records, {enc['train_seconds']:.0f} s); embedding norms "
        f"min {norms['shipped'][0]:.2f}, median {norms['shipped'][2]:.2f} (centred: min "
        f"{norms['centred'][0]:.2f}); clipped at C: {norms['clipped_fraction']['shipped']:.1%} "
        f"(centred {norms['clipped_fraction']['centred']:.1%}); wall {wall:.0f} s"
    )
    png = plot(
        out["results"],
        enc["head_accuracy_test"],
        args.out.with_suffix(".png") if args.out else RESULTS_DIR / f"{NAME}.png",
    )
    payload = {
        "quick": args.quick,
        "settings": {
            "epsilons": list(EPSILONS),
            "delta": DELTA,
            "clip_norm": CLIP,
            "seed": SEED,
            "noise_draws": repeats,
            "probe": "StandardScaler + LogisticRegression(lbfgs), C chosen by 5-fold CV on the "
            "private training embeddings from " + ", ".join(f"{c:g}" for c in PROBE_CS),
            "variants": {
                "shipped": "privatise(embedding, ε, δ, C) as `mmshield embed` does",
                "centred": "privatise(embedding - mean of public-split embeddings, ε, δ, C)",
            },
        },
        **out,
        "wall_seconds": wall,
        "plot": str(png),
        "targets": {},
    }
    write_json(NAME, payload, args.out)
    if not args.quick and args.out is None:
        header = "| " + " | ".join(COLUMNS) + " |"
        lines = [
            f"`python -m benchmarks.embed_utility`; machine: {machine_line(machine_info())}.",
            "",
            f"Encoder: the demo model trained non-privately for {enc['epochs']} epochs on a "
            f"stratified public half of av-digits train ({out['split']['public']} records); its "
            f"own head scores {enc['head_accuracy_test']:.3f} on test. Each of the other "
            f"{out['split']['device']} train records and the {out['split']['test']} test records "
            f"is a device releasing one embedding (d = {enc['embed_dim']}) clipped to C = "
            f"{CLIP:g} with analytic-Gaussian noise at (ε, δ = {DELTA:g}). Linear probe "
            "(logistic regression, L2 strength by CV on the private data) trained on the "
            "private device embeddings; accuracy on private test embeddings (both sides "
            "private), on clean test embeddings, and the oracle nearest-clean-class-mean "
            f"accuracy on private test embeddings. Mean ± sd over {repeats} noise draws. "
            "`shipped` = what `mmshield embed` releases; `centred` = the device subtracts the "
            "public split's mean embedding first.",
            "",
            header,
            "|" + "---|" * len(COLUMNS),
            *["| " + " | ".join(r) + " |" for r in rows(out)],
            "",
            "Plot: `benchmarks/results/embed_utility.png`.",
        ]
        update_results_md(NAME, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
