"""Measure how hard ``av-digits`` is: single-modality and fused centralised accuracy.

Trains small models (Adam, lr 3e-3, batch 64, ``--epochs`` passes) on the 4,000 training
records and evaluates them on the 1,000 test records:

* ``image``, ``audio``, ``text``: the product's encoder for one modality, then ``Linear(64, 10)``;
* ``fused``: the three 64-d embeddings concatenated, then ``Linear(192, 10)``, trained jointly;
  also evaluated with each modality blanked (embedding zeroed) to show what a missing modality
  costs;
* ``fused-missing``: the same, trained with each modality of each sample blanked with
  probability ``--missing-p`` (like clients that lack a modality);
* ``late``: the sum of the three single-modality models' log-probabilities.

Usage::

    python scripts/measure_av_digits.py [--epochs 12] [--seeds 0 1 2]
        [--set "audio_snr_db=(10, 30)" --set "pattern_p=(0.5, 0.2, 0.28, 0.02)" ...]

``--set`` overrides fields of :class:`mmshield.data.av_digits.Corruption` (for tuning); without
it the shipped definition is measured. Runs on CPU with one thread (about 1.5 min per seed).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import time

import numpy as np
import torch
from torch import nn

from mmshield.data.av_digits import Corruption, build_av_digits
from mmshield.data.dataset import MultimodalDataset
from mmshield.models.encoders import build_encoder

MODALITIES = ("image", "audio", "text")
EMBED = 64


class Net(nn.Module):
    """Encoders of the chosen modalities, concatenated, then one linear layer."""

    def __init__(self, ds: MultimodalDataset, modalities: tuple[str, ...]) -> None:
        super().__init__()
        self.modalities = modalities
        self.encoders = nn.ModuleDict({m: build_encoder(ds.spec(m), EMBED) for m in modalities})
        self.head = nn.Linear(EMBED * len(modalities), ds.num_classes)

    def forward(self, inputs: dict[str, torch.Tensor], drop: str | None = None) -> torch.Tensor:
        """Logits; ``drop`` zeroes that modality's embedding."""
        embs = []
        for m in self.modalities:
            e = self.encoders[m](inputs[m])
            embs.append(torch.zeros_like(e) if m == drop else e)
        return self.head(torch.cat(embs, dim=1))


def train_eval(
    train: MultimodalDataset,
    test: MultimodalDataset,
    modalities: tuple[str, ...],
    *,
    epochs: int,
    seed: int,
    missing_p: float = 0.0,
) -> tuple[dict[str, float], torch.Tensor]:
    """Train one model with Adam and return its test accuracy (and with each modality dropped).

    Parameters
    ----------
    train, test
        The data sets.
    modalities
        Modalities the model sees.
    epochs
        Passes over the training set (batch 64, Adam, lr 3e-3).
    seed
        Seed for initialisation, batch order and missing-modality draws.
    missing_p
        During training, each modality of each sample is blanked (embedding zeroed) with this
        probability, mimicking clients that lack a modality.

    Returns
    -------
    dict
        ``{"all": accuracy}`` plus ``{"-<modality>": accuracy}`` for fused models.
    torch.Tensor
        Test log-probabilities ``(N, classes)`` with all modalities.
    """
    torch.manual_seed(seed)
    net = Net(train, modalities)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    n = len(train)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(n, generator=gen).split(64):
            embs = []
            for m in modalities:
                e = net.encoders[m](train.inputs[m][idx])
                if missing_p > 0:
                    e = e * (torch.rand(len(idx), 1, generator=gen) >= missing_p)
                embs.append(e)
            logits = net.head(torch.cat(embs, dim=1))
            loss = nn.functional.cross_entropy(logits, train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        inputs = {m: test.inputs[m] for m in modalities}
        logp = net(inputs).log_softmax(1)
        out["all"] = float((logp.argmax(1) == test.labels).float().mean())
        if len(modalities) > 1:
            for drop in modalities:
                pred = net(inputs, drop=drop).argmax(1)
                out[f"-{drop}"] = float((pred == test.labels).float().mean())
    return out, logp


def _parse_overrides(items: list[str]) -> Corruption:
    fields = {f.name for f in dataclasses.fields(Corruption)}
    kwargs: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown Corruption field {key!r}; known: {sorted(fields)}")
        kwargs[key] = ast.literal_eval(value)
    return Corruption(**kwargs)  # type: ignore[arg-type]


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument(
        "--only",
        nargs="+",
        default=["image", "audio", "text", "fused", "fused-missing"],
        help="runs: image, audio, text, fused, fused-missing (late fusion needs all singles)",
    )
    parser.add_argument(
        "--missing-p",
        type=float,
        default=0.3,
        help="per-modality blanking probability of the fused-missing run",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    corruption = _parse_overrides(args.set)
    t0 = time.perf_counter()
    train, test = build_av_digits(corruption)
    print(f"{corruption}\nloaded in {time.perf_counter() - t0:.1f} s")
    runs: dict[str, tuple[tuple[str, ...], float]] = {m: ((m,), 0.0) for m in MODALITIES}
    runs["fused"] = (MODALITIES, 0.0)
    runs["fused-missing"] = (MODALITIES, args.missing_p)
    single_logp: dict[str, list[torch.Tensor]] = {}
    for name in args.only:
        if name not in runs:
            raise SystemExit(f"unknown run {name!r}; known: {sorted(runs)}")
        t0 = time.perf_counter()
        modalities, missing_p = runs[name]
        results = []
        for s in args.seeds:
            acc, logp = train_eval(
                train, test, modalities, epochs=args.epochs, seed=s, missing_p=missing_p
            )
            results.append(acc)
            if name in MODALITIES:
                single_logp.setdefault(name, []).append(logp)
        _report(name, results, time.perf_counter() - t0)
    if set(MODALITIES) <= set(single_logp):
        # Late fusion: sum of the single-modality models' log-probabilities (same seed).
        late = [
            {"all": float((sum(lp).argmax(1) == test.labels).float().mean())}
            for lp in zip(*(single_logp[m] for m in MODALITIES), strict=True)
        ]
        _report("late", late, 0.0)


def _report(name: str, results: list[dict[str, float]], seconds: float) -> None:
    summary = ", ".join(
        f"{k} {np.mean([r[k] for r in results]):.3f}"
        + (f"±{np.std([r[k] for r in results]):.3f}" if len(results) > 1 else "")
        for k in results[0]
    )
    print(f"{name:14s} {summary}  ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
