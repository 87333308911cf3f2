"""FedAvg, FedProx and SCAFFOLD on ``fedprox-synthetic(1, 1)``, same seeds, same run.

Run ``python -m benchmarks.strategies`` (``--quick``: 10 rounds instead of 40). Workload: the 30
users of synthetic(1, 1) (Li et al. 2020), 10 sampled per round, 20 local epochs of SGD (batch 10,
lr 0.01) of a 60-64-10 MLP, as in FedProx's paper. Two conditions:

- no stragglers: FedAvg, FedProx (μ = 1, the value its paper uses for this data set) and
  SCAFFOLD (option II control variates);
- FedProx's systems-heterogeneity setting: 90% of the sampled clients are stragglers that run a
  uniformly drawn number of epochs in [1, 19]. FedAvg drops them (as the paper runs it), FedProx
  aggregates their partial work, with μ = 0 and μ = 1.

Prints each run's final and mean-of-last-5-rounds test accuracy and writes
``benchmarks/results/strategies.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mmshield.data.synthetic import fedprox_synthetic
from mmshield.fl.client import LocalTraining
from mmshield.models import build_model
from mmshield.runtime.simulation import simulate
from mmshield.runtime.systems import SystemsProfile

from benchmarks._common import machine_info, machine_line, target, update_results_md, write_json

NAME = "strategies"


SETUPS: dict[str, dict[str, Any]] = {
    "fedavg": {"mu": 0.0, "scaffold": False, "stragglers": 0.0},
    "fedprox": {"mu": 1.0, "scaffold": False, "stragglers": 0.0},
    "scaffold": {"mu": 0.0, "scaffold": True, "stragglers": 0.0},
    "fedavg, 90% stragglers dropped": {"mu": 0.0, "scaffold": False, "stragglers": 0.9},
    "fedprox mu=0, 90% stragglers": {"mu": 0.0, "scaffold": False, "stragglers": 0.9},
    "fedprox mu=1, 90% stragglers": {"mu": 1.0, "scaffold": False, "stragglers": 0.9},
}


def run(rounds: int) -> dict[str, dict[str, Any]]:
    """Train each setup on the same data, model initialisation and client sampling."""
    fed = fedprox_synthetic(1.0, 1.0, seed=0)
    out: dict[str, dict[str, Any]] = {}
    for name, setup in SETUPS.items():
        training = LocalTraining(local_epochs=20, batch_size=10, lr=0.01, proximal_mu=setup["mu"])
        systems = None
        if setup["stragglers"]:
            policy = "drop" if name.startswith("fedavg") else "aggregate"
            systems = SystemsProfile(stragglers=setup["stragglers"], partial_work=policy)
        model = build_model(fed.train.specs, 10, fusion="concat", fusion_hidden=0, seed=0)
        t0 = time.perf_counter()
        result = simulate(
            model, fed, rounds=rounds, clients_per_round=10, training=training, seed=0,
            scaffold=setup["scaffold"], systems=systems, progress=True,
        )  # fmt: skip
        accs = [float(r.test_accuracy or 0.0) for r in result.history]
        out[name] = {
            "final_accuracy": accs[-1],
            "last5_accuracy": sum(accs[-5:]) / len(accs[-5:]),
            "curve": accs,
            "client_updates": sum(r.clients for r in result.history),
            "wall_seconds": time.perf_counter() - t0,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.strategies")
    parser.add_argument("--quick", action="store_true", help="10 rounds instead of 40")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 10 if args.quick else 40
    results = run(rounds)
    table = Table(title=f"fedprox-synthetic(1, 1), {rounds} rounds, 10 of 30 clients per round")
    for col in ("strategy", "final acc", "mean of last 5", "client updates", "wall s"):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['final_accuracy']:.3f}",
            f"{r['last5_accuracy']:.3f}",
            str(r["client_updates"]),
            f"{r['wall_seconds']:.0f}",
        )
    Console().print(table)
    pairs = (
        ("scaffold", "fedavg", "no stragglers"),
        ("fedprox", "fedavg", "no stragglers"),
        ("fedprox mu=1, 90% stragglers", "fedavg, 90% stragglers dropped", "90% stragglers"),
    )
    for a, b, condition in pairs:
        ra, rb = results[a]["last5_accuracy"], results[b]["last5_accuracy"]
        verdict = "beats" if ra > rb else "does not beat"
        Console().print(f"{condition}: {a} {ra:.3f} {verdict} {b} {rb:.3f} (mean of last 5 rounds)")
    avg = results["fedavg"]["last5_accuracy"]
    targets = {
        "scaffold_minus_fedavg": target(
            results["scaffold"]["last5_accuracy"] - avg, 0.0, ">=", "abs"
        ),
        "fedprox_minus_fedavg_90pct_stragglers": target(
            results["fedprox mu=1, 90% stragglers"]["last5_accuracy"]
            - results["fedavg, 90% stragglers dropped"]["last5_accuracy"],
            0.0,
            ">=",
            "abs",
        ),
    }
    payload = {"quick": args.quick, "rounds": rounds, "results": results, "targets": targets}
    write_json(NAME, payload, args.out)
    if not args.quick and args.out is None:
        lines = [
            f"`python -m benchmarks.strategies`; machine: {machine_line(machine_info())}.",
            "",
            "| setup | final accuracy | mean of last 5 rounds | client updates |",
            "|---|---|---|---|",
            *[
                f"| {n} | {r['final_accuracy']:.3f} | {r['last5_accuracy']:.3f} "
                f"| {r['client_updates']} |"
                for n, r in results.items()
            ],
            "",
            "Stragglers as in FedProx's paper: 90% of the sampled clients run a uniform number "
            "of epochs in [1, 19]; FedAvg drops them, FedProx aggregates their partial work.",
        ]
        update_results_md(NAME, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
