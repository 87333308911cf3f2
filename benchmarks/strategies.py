"""FedAvg, FedProx and SCAFFOLD on ``fedprox-synthetic(1, 1)``, same seeds, same run.

Run ``python -m benchmarks.strategies`` (``--quick``: 10 rounds instead of 40). Workload: the 30
users of synthetic(1, 1) (Li et al. 2020), 10 sampled per round, 20 local epochs of SGD (batch 10,
lr 0.01) of a 60-64-10 MLP, FedProx μ = 1 (the value its paper uses for this data set). Prints
each strategy's final and mean-of-last-5-rounds test accuracy and writes
``benchmarks/results/strategies.json``.

Caveat: FedProx's paper also makes 90% of clients stragglers that do only part of their local
work; the simulator has no stragglers yet (issue 3, systems heterogeneity), so FedProx runs here
without its main advantage.
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

from benchmarks._common import machine_info, machine_line, target, update_results_md, write_json

NAME = "strategies"


def run(rounds: int) -> dict[str, dict[str, Any]]:
    """Train each strategy on the same data, model initialisation and client sampling."""
    fed = fedprox_synthetic(1.0, 1.0, seed=0)
    base = LocalTraining(local_epochs=20, batch_size=10, lr=0.01)
    setups: dict[str, tuple[LocalTraining, bool]] = {
        "fedavg": (base, False),
        "fedprox": (LocalTraining(local_epochs=20, batch_size=10, lr=0.01, proximal_mu=1.0), False),
        "scaffold": (base, True),
    }
    out: dict[str, dict[str, Any]] = {}
    for name, (training, scaffold) in setups.items():
        model = build_model(fed.train.specs, 10, fusion="concat", fusion_hidden=0, seed=0)
        t0 = time.perf_counter()
        result = simulate(
            model, fed, rounds=rounds, clients_per_round=10, training=training, seed=0,
            scaffold=scaffold, progress=True,
        )  # fmt: skip
        accs = [float(r.test_accuracy or 0.0) for r in result.history]
        out[name] = {
            "final_accuracy": accs[-1],
            "last5_accuracy": sum(accs[-5:]) / len(accs[-5:]),
            "curve": accs,
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
    for col in ("strategy", "final acc", "mean of last 5", "wall s"):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['final_accuracy']:.3f}",
            f"{r['last5_accuracy']:.3f}",
            f"{r['wall_seconds']:.0f}",
        )
    Console().print(table)
    avg = results["fedavg"]["last5_accuracy"]
    targets = {
        "scaffold_minus_fedavg": target(
            results["scaffold"]["last5_accuracy"] - avg, 0.0, ">=", "abs"
        ),
        "fedprox_minus_fedavg": target(
            results["fedprox"]["last5_accuracy"] - avg, 0.0, ">=", "abs"
        ),
    }
    payload = {"quick": args.quick, "rounds": rounds, "results": results, "targets": targets}
    write_json(NAME, payload, args.out)
    if not args.quick and args.out is None:
        lines = [
            f"`python -m benchmarks.strategies`; machine: {machine_line(machine_info())}.",
            "",
            "| strategy | final accuracy | mean of last 5 rounds |",
            "|---|---|---|",
            *[
                f"| {n} | {r['final_accuracy']:.3f} | {r['last5_accuracy']:.3f} |"
                for n, r in results.items()
            ],
            "",
            "FedProx runs without stragglers here (not yet simulated), its paper's main setting.",
        ]
        update_results_md(NAME, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
