"""FedBuff against FedAvg on the simulated clock when client speeds are heavy-tailed, same run.

Run ``python -m benchmarks.async`` (``--quick``: a short version for the smoke test). Workload: the
30 users of ``fedprox-synthetic(1, 1)`` (Li et al. 2020) with a 60-64-10 MLP; local training 2
epochs of SGD (batch 10, lr 0.01); every client's compute speed is heavy-tailed: its slowness
(1 / speed) is Pareto-distributed with tail index 1.5 (median 1.6×, 1 in 100 clients more than
20× slower than the fastest), and a speed-1 client takes 0.1 simulated seconds per local step.
Clients' data sizes (50 to several thousand records) add to the spread of their round times.

- **FedAvg**: 10 clients per round, the server waits for the last one; ``--rounds`` rounds.
- **FedBuff** (Nguyen et al. 2022): 10 clients train concurrently, the server steps every 5
  arrivals with staleness discount ``(1 + τ)^-0.5`` and server lr 1, for ``4 × rounds`` server
  steps (the same number of client updates as FedAvg's ``2 × rounds`` rounds).

Target accuracy: FedAvg's final accuracy, taken as the mean of its last 5 evaluations. A run's
time-to-accuracy is the first simulated time at which the mean of its last 3 evaluations reaches
the target (smoothing, because single evaluations on this non-IID data jump by several points).
Both runs use the same data, initial model, seed and speeds. Prints both curves' time-to-accuracy,
their ratio and the client updates each used; writes ``benchmarks/results/async.json`` and a plot
``benchmarks/results/async.png`` (accuracy against simulated time).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mmshield.data.synthetic import fedprox_synthetic
from mmshield.fl.client import LocalTraining
from mmshield.models import build_model
from mmshield.runtime.asynchronous import simulate_buffered
from mmshield.runtime.simulation import SimulationResult, simulate
from mmshield.runtime.systems import Distribution, SystemsProfile

from benchmarks._common import (
    RESULTS_DIR,
    machine_info,
    machine_line,
    target,
    update_results_md,
    write_json,
)

NAME = "async"
SPEEDS = SystemsProfile(speed=Distribution("pareto", shape=1.5), step_seconds=0.1)
TRAINING = LocalTraining(local_epochs=2, batch_size=10, lr=0.01)
CONCURRENCY = 10
BUFFER = 5
SMOOTH = 3


def curve(result: SimulationResult) -> tuple[list[float], list[float], list[int]]:
    """Simulated time, test accuracy and cumulative client updates after each server step."""
    times, accs, used = [], [], []
    clock, updates = 0.0, 0
    for r in result.history:
        clock += r.simulated_seconds or 0.0
        updates += r.clients
        if r.test_accuracy is not None:
            times.append(clock)
            accs.append(float(r.test_accuracy))
            used.append(updates)
    return times, accs, used


def time_to_accuracy(
    times: list[float], accs: list[float], used: list[int], goal: float
) -> tuple[float | None, int | None]:
    """First time (and updates) at which the mean of the last ``SMOOTH`` evaluations >= goal."""
    for i in range(SMOOTH - 1, len(accs)):
        if float(np.mean(accs[i - SMOOTH + 1 : i + 1])) >= goal:
            return times[i], used[i]
    return None, None


def run(rounds: int, seed: int = 0) -> dict[str, Any]:
    """Run FedAvg, then FedBuff until it reaches FedAvg's final accuracy (or its step budget)."""
    fed = fedprox_synthetic(1.0, 1.0, seed=seed)

    def model() -> torch.nn.Module:
        return build_model(fed.train.specs, 10, fusion="concat", fusion_hidden=0, seed=seed)

    t0 = time.perf_counter()
    avg = simulate(
        model(), fed, rounds=rounds, clients_per_round=CONCURRENCY, training=TRAINING,
        seed=seed, systems=SPEEDS, progress=True,
    )  # fmt: skip
    avg_wall = time.perf_counter() - t0
    a_t, a_acc, a_used = curve(avg)
    goal = float(np.mean(a_acc[-5:]))
    a_tta, a_upd = time_to_accuracy(a_t, a_acc, a_used, goal)

    t0 = time.perf_counter()
    buff = simulate_buffered(
        model(), fed, updates=4 * rounds, concurrency=CONCURRENCY, buffer_size=BUFFER,
        training=TRAINING, seed=seed, systems=SPEEDS, progress=True,
    )  # fmt: skip
    buff_wall = time.perf_counter() - t0
    b_t, b_acc, b_used = curve(buff)
    b_tta, b_upd = time_to_accuracy(b_t, b_acc, b_used, goal)
    return {
        "goal_accuracy": goal,
        "fedavg": {
            "time_to_accuracy": a_tta,
            "updates_to_accuracy": a_upd,
            "final_accuracy": a_acc[-1],
            "simulated_seconds": a_t[-1],
            "wall_seconds": avg_wall,
            "curve": {"seconds": a_t, "accuracy": a_acc, "updates": a_used},
        },
        "fedbuff": {
            "time_to_accuracy": b_tta,
            "updates_to_accuracy": b_upd,
            "final_accuracy": b_acc[-1],
            "simulated_seconds": b_t[-1],
            "wall_seconds": buff_wall,
            "mean_staleness": float(np.mean([r.staleness or 0.0 for r in buff.history])),
            "curve": {"seconds": b_t, "accuracy": b_acc, "updates": b_used},
        },
    }


def plot(results: dict[str, Any], path: Path) -> Path:
    """Accuracy against simulated time for both strategies, with the goal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("fedavg", "fedbuff"):
        c = results[name]["curve"]
        ax.plot(c["seconds"], c["accuracy"], label=name)
        tta = results[name]["time_to_accuracy"]
        if tta is not None:
            ax.axvline(tta, linestyle=":", color=ax.lines[-1].get_color())
    ax.axhline(results["goal_accuracy"], color="grey", linestyle="--", label="goal")
    ax.set_xscale("log")
    ax.set_xlabel("simulated seconds (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title("fedprox-synthetic(1, 1), Pareto(1.5) client slowness")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "not reached" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.async")
    parser.add_argument("--quick", action="store_true", help="6 rounds instead of 40")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rounds = 6 if args.quick else 40
    results = run(rounds)
    table = Table(
        title=(
            f"time to FedAvg's final accuracy ({results['goal_accuracy']:.3f}), "
            "fedprox-synthetic(1, 1), heavy-tailed client speeds"
        )
    )
    for col in ("strategy", "simulated s to goal", "updates to goal", "final acc", "wall s"):
        table.add_column(col)
    for name in ("fedavg", "fedbuff"):
        r = results[name]
        table.add_row(
            name,
            _fmt(r["time_to_accuracy"]),
            _fmt(r["updates_to_accuracy"], ","),
            f"{r['final_accuracy']:.3f}",
            f"{r['wall_seconds']:.0f}",
        )
    Console().print(table)
    a, b = results["fedavg"]["time_to_accuracy"], results["fedbuff"]["time_to_accuracy"]
    speedup = a / b if a is not None and b is not None and b > 0 else 0.0
    Console().print(f"FedBuff reaches the goal {speedup:.1f}x sooner in simulated time")
    targets = {"fedbuff_time_to_accuracy_speedup": target(speedup, 1.0, ">=", "x")}
    png = plot(results, (args.out.with_suffix(".png") if args.out else RESULTS_DIR / "async.png"))
    payload = {
        "quick": args.quick,
        "rounds": rounds,
        "workload": {
            "dataset": "fedprox-synthetic(1, 1), 30 users",
            "speed": "slowness ~ Pareto(tail index 1.5), 0.1 s per step at speed 1",
            "local_epochs": TRAINING.local_epochs,
            "batch_size": TRAINING.batch_size,
            "lr": TRAINING.lr,
            "concurrency": CONCURRENCY,
            "buffer_size": BUFFER,
            "smoothing": SMOOTH,
        },
        "results": results,
        "speedup": speedup,
        "plot": str(png),
        "targets": targets,
    }
    write_json(NAME, payload, args.out)
    if not args.quick and args.out is None:
        fa, fb = results["fedavg"], results["fedbuff"]
        lines = [
            f"`python -m benchmarks.async`; machine: {machine_line(machine_info())}.",
            "",
            "fedprox-synthetic(1, 1), 30 users, 60-64-10 MLP, 2 local epochs; client slowness "
            "Pareto(1.5). FedAvg: 10 clients per round, 40 rounds, waits for the slowest. "
            "FedBuff: 10 concurrent clients, server step every 5 arrivals, staleness "
            "discount (1 + τ)^-0.5. Goal: FedAvg's final accuracy (mean of its last 5 "
            f"evaluations) = {results['goal_accuracy']:.3f}; reached when the mean of the last "
            "3 evaluations gets there.",
            "",
            "| strategy | simulated s to goal | client updates to goal | final accuracy |",
            "|---|---|---|---|",
            f"| fedavg | {_fmt(fa['time_to_accuracy'])} | {_fmt(fa['updates_to_accuracy'], ',')} "
            f"| {fa['final_accuracy']:.3f} |",
            f"| fedbuff | {_fmt(fb['time_to_accuracy'])} | "
            f"{_fmt(fb['updates_to_accuracy'], ',')} | {fb['final_accuracy']:.3f} |",
            "",
            f"FedBuff reaches the goal **{speedup:.1f}× sooner** in simulated time (target ≥ 1×); "
            f"mean staleness {fb['mean_staleness']:.1f} server steps. Plot: "
            "`benchmarks/results/async.png`.",
        ]
        update_results_md(NAME, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
