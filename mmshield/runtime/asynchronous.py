"""Asynchronous buffered federated training (FedBuff) on a simulated clock.

``concurrency`` clients train at any time, each from the global model that was current when it
started. A client finishes after the time its speed gives it (:mod:`mmshield.runtime.systems`);
its update enters the server's buffer (:class:`mmshield.fl.fedbuff.FedBuffBuffer`), and every
``buffer_size`` arrivals the server steps. A new client starts as soon as one finishes, so fast
clients keep the model moving while slow ones are still working, instead of every round waiting
for its slowest client.

Vectorised like the synchronous simulator: a client's update depends only on its starting model,
its data and its task number, not on when it runs, so the clients that started from the same model
version are trained together in one vectorised cohort, lazily, when the first of them is due.

Determinism: client choice and timing are drawn from generators keyed by the seed and the task
number, so the same seed gives the same run bit for bit.
"""

from __future__ import annotations

import copy
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mmshield.data.dataset import FederatedDataset
from mmshield.errors import TrainingError
from mmshield.fl.aggregate import ClientQuality
from mmshield.fl.client import LocalTraining
from mmshield.fl.evaluate import evaluate
from mmshield.fl.fedavg import FedAvg
from mmshield.fl.fedbuff import FedBuffBuffer
from mmshield.fl.strategy import ServerOptimizer
from mmshield.models.model import MultimodalModel
from mmshield.runtime.simulation import (
    BYTES_PER_PARAMETER,
    CohortTrainer,
    RoundRecord,
    SimulationResult,
    check_finite,
    progress_bar,
)
from mmshield.runtime.systems import ClientSystems, SystemsProfile, steps_per_epoch

# Launch attempts in a row that deliver nothing before the run is declared stuck.
_MAX_FRUITLESS_LAUNCHES = 10_000


# (deltas, loss, examples, modality examples) of one client, each with a leading axis of 1.
_Update = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class _Task:
    """One client's asynchronous training task."""

    number: int
    client: int
    version: int
    finish: float
    steps: int
    dropped: bool
    partial: bool
    update: (
        tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None
    ) = None


def simulate_buffered(
    model: MultimodalModel,
    data: FederatedDataset,
    *,
    updates: int,
    concurrency: int,
    buffer_size: int,
    training: LocalTraining,
    seed: int = 0,
    server: ServerOptimizer | None = None,
    staleness_exponent: float = 0.5,
    systems: SystemsProfile | None = None,
    quality: ClientQuality | None = None,
    device: str = "cpu",
    cohort_size: int | None = None,
    eval_every: int = 1,
    progress: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> SimulationResult:
    """Run FedBuff: asynchronous clients, buffered, staleness-weighted server steps.

    Parameters
    ----------
    model
        Initial global model (not modified).
    data
        The federation.
    updates
        Server steps to run (each record of the result's history is one).
    concurrency
        Clients training at any time.
    buffer_size
        Client updates per server step.
    training
        Local training settings.
    seed
        Drives client choice, timing and local shuffling.
    server
        Server optimiser applied to each buffer's mean (default FedAvg, server lr 1).
    staleness_exponent
        ``a`` in the staleness discount ``(1 + τ)^-a`` (0.5 in the paper; 0: none).
    systems
        Client speeds, availability, dropouts, stragglers, deadline (per task); default:
        identical clients, ``step_seconds`` 0.1.
    quality
        Per-client (and per-modality) quality scores multiplying the aggregation weights.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    cohort_size
        Most clients trained in one vectorised pass (default: no limit beyond ``concurrency``).
    eval_every
        Evaluate every this many server steps (and after the last).
    progress
        Show a rich progress bar.
    on_round
        Called with each server step's record.

    Returns
    -------
    SimulationResult
        ``history[i].simulated_seconds`` is the time between server steps ``i`` and ``i + 1``.
    """
    if concurrency < 1 or buffer_size < 1:
        raise TrainingError(
            f"FedBuff needs concurrency >= 1 and buffer_size >= 1 (got {concurrency}, "
            f"{buffer_size}); set training.clients_per_round and server.buffer_size"
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    server = server or FedAvg()
    profile = systems or SystemsProfile()
    if profile.dropout >= 1.0:
        raise TrainingError("systems.dropout is 1: no client update could ever arrive")
    start_wall = time.perf_counter()
    global_model = copy.deepcopy(model).to(dev)
    trainer = CohortTrainer(global_model, data, training, seed, dev, quality)
    n_clients = data.num_clients
    concurrency = min(concurrency, n_clients)
    cohort_limit = cohort_size or concurrency
    model_bytes = sum(p.numel() for p in global_model.parameters()) * BYTES_PER_PARAMETER
    population = ClientSystems(profile, n_clients, seed, model_bytes)
    per_epoch = steps_per_epoch(trainer.sizes, training.batch_size)
    result = SimulationResult(model=global_model, cohort_size=cohort_limit)

    snapshots: dict[int, dict[str, torch.Tensor]] = {0: _snapshot(global_model)}
    untrained: dict[int, list[_Task]] = {}
    events: list[tuple[float, int, _Task]] = []
    busy = np.zeros(n_clients, dtype=bool)
    counters = {"tasks": 0, "launches": 0, "fruitless": 0}
    version = 0
    buffer = FedBuffBuffer(snapshots[0], buffer_size, staleness_exponent)
    window = {"launched": 0, "dropped": 0, "partial": 0}
    losses: list[float] = []

    def launch(n: int, now: float) -> int:
        key = counters["launches"]
        counters["launches"] += 1
        online = population.online(key)
        idle = ~busy if online is None else ~busy & online
        pool = np.flatnonzero(idle)
        if pool.size == 0:
            return 0
        rng = np.random.default_rng(np.random.SeedSequence([seed, key, 0xA5C]))
        chosen = np.sort(rng.choice(pool, size=min(n, pool.size), replace=False))
        plan = population.plan(key, chosen, per_epoch[chosen], training.local_epochs)
        for i, c in enumerate(chosen):
            task = _Task(
                number=counters["tasks"],
                client=int(c),
                version=version,
                finish=now + float(plan.seconds[i]),
                steps=int(plan.steps[i]),
                dropped=bool(plan.dropped[i]),
                partial=bool(plan.partial[i]),
            )
            counters["tasks"] += 1
            busy[c] = True
            heapq.heappush(events, (task.finish, task.number, task))
            if task.steps > 0:
                untrained.setdefault(version, []).append(task)
        window["launched"] += len(chosen)
        return len(chosen)

    def train_pending(v: int) -> None:
        tasks = untrained.pop(v)
        start = snapshots[v]
        for c0 in range(0, len(tasks), cohort_limit):
            group = tasks[c0 : c0 + cohort_limit]
            update = trainer.train(
                start,
                np.array([t.client for t in group]),
                np.array([t.number for t in group]),
                f"server step {version + 1} (tasks {group[0].number}..{group[-1].number})",
                max_steps=np.array([t.steps for t in group]),
            )
            for i, position in enumerate(update.order):
                t = group[int(position)]
                t.update = (
                    {k: d[i : i + 1] for k, d in update.deltas.items()},
                    update.loss[i : i + 1],
                    update.examples[i : i + 1],
                    {m: e[i : i + 1] for m, e in update.modality_examples.items()},
                )
        forget_old_versions()

    def forget_old_versions() -> None:
        # A version's parameters are needed while it is current or has untrained tasks.
        for old in [k for k in snapshots if k != version and k not in untrained]:
            del snapshots[old]

    bar = progress_bar(progress)
    task_id = bar.add_task("server steps", total=updates, status="") if bar else None
    clock = last_step_clock = 0.0
    step_wall = time.perf_counter()
    try:
        if bar:
            bar.start()
        launch(concurrency, 0.0)
        while version < updates:
            if not events:
                # Nobody is training (all offline or busy): wait a step's time and retry.
                clock += profile.step_seconds
                counters["fruitless"] += 1
                if counters["fruitless"] > _MAX_FRUITLESS_LAUNCHES:
                    raise TrainingError(
                        f"server step {version + 1}: no client could be started in "
                        f"{_MAX_FRUITLESS_LAUNCHES} attempts; raise systems.availability"
                    )
                launch(concurrency, clock)
                continue
            clock, _, task = heapq.heappop(events)
            busy[task.client] = False
            window["dropped"] += task.dropped
            window["partial"] += task.partial
            if task.steps > 0:
                counters["fruitless"] = 0
                if task.update is None:
                    train_pending(task.version)
                assert task.update is not None
                deltas, loss, examples, mod_examples = task.update
                task.update = None
                staleness = torch.tensor([version - task.version])
                buffer.add(deltas, examples, mod_examples, staleness)
                losses.append(float(loss[0]))
            else:
                counters["fruitless"] += 1
                if counters["fruitless"] > _MAX_FRUITLESS_LAUNCHES:
                    raise TrainingError(
                        f"server step {version + 1}: {_MAX_FRUITLESS_LAUNCHES} clients in a row "
                        "delivered nothing (dropouts, deadline); lower systems.dropout or raise "
                        "systems.deadline"
                    )
            if buffer.full:
                n_updates = len(buffer)
                mean, staleness_list = buffer.drain()
                new_params = server.step(snapshots[version], mean, version + 1)
                version += 1
                check_finite(new_params, f"server step {version}")
                with torch.no_grad():
                    for name, p in global_model.named_parameters():
                        p.copy_(new_params[name])
                snapshots[version] = _snapshot(global_model)
                forget_old_versions()
                test_loss = test_acc = None
                if version % eval_every == 0 or version == updates:
                    test_loss, test_acc = evaluate(global_model, data.test)
                record = RoundRecord(
                    round=version,
                    clients=n_updates,
                    train_loss=float(np.mean(losses)),
                    test_loss=test_loss,
                    test_accuracy=test_acc,
                    seconds=time.perf_counter() - step_wall,
                    bytes_up=n_updates * model_bytes,
                    bytes_down=window["launched"] * model_bytes,
                    sampled=window["launched"],
                    dropped=window["dropped"],
                    partial=window["partial"],
                    simulated_seconds=clock - last_step_clock,
                    staleness=float(np.mean(staleness_list)),
                )
                result.history.append(record)
                if on_round is not None:
                    on_round(record)
                if bar and task_id is not None:
                    acc_txt = f" acc {test_acc:.3f}" if test_acc is not None else ""
                    bar.update(
                        task_id,
                        advance=1,
                        status=f"t={clock:,.0f}s loss {record.train_loss:.3f}{acc_txt}",
                    )
                last_step_clock, step_wall = clock, time.perf_counter()
                window = {"launched": 0, "dropped": 0, "partial": 0}
                losses = []
            launch(1, clock)
    finally:
        if bar:
            bar.stop()
    result.wall_seconds = time.perf_counter() - start_wall
    return result


def _snapshot(model: MultimodalModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}
