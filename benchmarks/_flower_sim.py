"""The Flower side of the simulator benchmark: the same federated job on Flower's simulation engine.

Flower 1.41's Message API runs a ``ServerApp`` (here: a FedAvg strategy) in a thread of this process
and each virtual SuperNode's ``ClientApp`` in a pool of Ray actors. What the clients do is exactly
mmshield's reference local training (:func:`mmshield.fl.client.train_client_sequential`) with the
per-client per-round seed both runtimes use (:func:`mmshield.fl.client.client_seed`), so both
sides do the same arithmetic and only the runtime differs.

Clients get their data the way Flower users usually do it: the job (training records, client
index lists, initial model, local-training settings) is written once to a file, and each Ray actor
loads it on its first message and keeps it in a module-level cache; a client picks its rows by
``context.node_config["partition-id"]``.

Aggregation: workload (a) uses Flower's stock ``FedAvg`` (``num-examples`` weighting). With missing
modalities, :class:`ModalityAwareFedAvg` averages each ``encoders.<m>.*`` parameter only over the
clients that hold modality ``m`` (weighted by their example counts), exactly as mmshield's
:class:`mmshield.fl.aggregate.ModalityAwareMean` does; the rest is plain weighted FedAvg.
"""

from __future__ import annotations

import copy
import itertools
import logging
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from mmshield.data.dataset import FederatedDataset, MultimodalDataset
from mmshield.fl.client import LocalTraining, client_seed, train_client_sequential
from mmshield.models.model import MultimodalModel, modality_of_parameter

from benchmarks._common import CpuMonitor

# --------------------------------------------------------------------------------------------
# Client side (runs inside Ray actors)
# --------------------------------------------------------------------------------------------


@dataclass
class _ClientJob:
    """What every client of one job needs; loaded once per Ray actor."""

    model: MultimodalModel
    train: MultimodalDataset
    client_indices: list[np.ndarray]
    training: LocalTraining
    seed: int
    load_seconds: float
    partitions: dict[int, MultimodalDataset] = field(default_factory=dict)

    def client_data(self, partition_id: int) -> MultimodalDataset:
        data = self.partitions.get(partition_id)
        if data is None:
            data = self.train.subset(self.client_indices[partition_id])
            self.partitions[partition_id] = data
        return data


_JOBS: dict[str, _ClientJob] = {}
_JOBS_LOCK = threading.Lock()


def _load_job(path: str, threads: int) -> _ClientJob:
    """Load (once per process) the job file the server wrote."""
    with _JOBS_LOCK:
        job = _JOBS.get(path)
        if job is None:
            t0 = time.perf_counter()
            if threads > 0:
                torch.set_num_threads(threads)
            payload = torch.load(path, weights_only=False)
            job = _ClientJob(
                model=payload["model"],
                train=payload["train"],
                client_indices=payload["client_indices"],
                training=payload["training"],
                seed=int(payload["seed"]),
                load_seconds=time.perf_counter() - t0,
            )
            _JOBS[path] = job
        return job


client_app = ClientApp()


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """Local training of one client in one round."""
    t0 = time.perf_counter()
    config = msg.content.config_records["config"]
    job = _load_job(str(config["job-path"]), int(cast(int, config["torch-threads"])))
    t_loaded = time.perf_counter()
    partition_id = int(context.node_config["partition-id"])
    server_round = int(cast(int, config["server-round"]))
    arrays = msg.content.array_records["arrays"].to_torch_state_dict()
    model = job.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(arrays[name])
    data = job.client_data(partition_id)
    state, loss = train_client_sequential(
        model, data, job.training, client_seed(job.seed, server_round, partition_id)
    )
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": len(data),
        "train-loss": loss,
        "train-seconds": time.perf_counter() - t_loaded,
        "client-seconds": time.perf_counter() - t0,
    }
    for m in data.modalities:
        metrics[f"present-{m}"] = int(data.present[m].sum())
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


# --------------------------------------------------------------------------------------------
# Server side (runs in a thread of this process)
# --------------------------------------------------------------------------------------------


class ModalityAwareFedAvg(FedAvg):
    """FedAvg whose encoder parameters are averaged only over clients holding that modality.

    A client reports ``present-<m>`` (records in which modality ``m`` is present) next to
    ``num-examples``; a client with 0 is left out of the average of ``encoders.<m>.*`` (whose
    global value is kept if no sampled client holds ``m``). Every other parameter is the
    ``num-examples``-weighted mean, as in Flower's FedAvg.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model, then sample and configure as FedAvg does."""
        self._global = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Modality-aware weighted mean of the clients' parameters."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [msg.content for msg in valid]
        metric_records = [next(iter(c.metric_records.values())) for c in contents]
        examples = np.array([float(m[self.weighted_by_key]) for m in metric_records])  # type: ignore[arg-type]
        array_records = [next(iter(c.array_records.values())) for c in contents]
        out: dict[str, np.ndarray] = {}
        for key in array_records[0]:
            modality = modality_of_parameter(key)
            w = examples
            if modality is not None and f"present-{modality}" in metric_records[0]:
                holds = np.array([float(m[f"present-{modality}"]) > 0 for m in metric_records])  # type: ignore[arg-type]
                w = np.where(holds, examples, 0.0)
            total = float(w.sum())
            if total <= 0.0:
                assert self._global is not None
                out[key] = self._global[key].numpy()
                continue
            acc: np.ndarray | None = None
            for weight, record in zip(w / total, array_records, strict=True):
                if weight == 0.0:
                    continue
                term = record[key].numpy() * weight
                acc = term if acc is None else acc + term
            assert acc is not None
            out[key] = acc
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in out.items()}), metrics


@dataclass
class FlowerResult:
    """Outcome and timings of one Flower simulation."""

    state: dict[str, torch.Tensor]
    wall_seconds: float
    """From calling ``run_simulation`` to the final global model (strategy finished)."""
    total_seconds: float
    """Until ``run_simulation`` returned (adds Ray and actor shut-down)."""
    round_seconds: list[float]
    """Per round, from the previous round's end (round 1: from the strategy's start)."""
    startup_seconds: float
    """From calling ``run_simulation`` to the strategy's start (Ray itself starts in parallel)."""
    clients_per_round: list[int]
    client_train_seconds: float
    """Sum over all client calls of the time spent in local training (inside the actors)."""
    client_call_seconds: float
    """Sum over all client calls of the time inside the ClientApp (incl. the job load)."""
    train_loss: list[float]
    """Per round, the unweighted mean of the clients' mean training losses."""
    foreign_cores: float | None = None
    """Cores that processes other than this one and its Ray workers kept busy meanwhile."""

    @property
    def first_round_seconds(self) -> float:
        """Round 1, which includes Ray's start-up, actor creation and the actors' job loading."""
        return self.round_seconds[0] if self.round_seconds else float("nan")

    @property
    def steady_round_seconds(self) -> float | None:
        """Median of the later rounds (``None`` with a single round)."""
        later = self.round_seconds[1:]
        return float(np.median(later)) if later else None

    @property
    def ray_startup_estimate(self) -> float | None:
        """Round 1 minus a steady round: roughly what Ray start-up and actor creation cost."""
        steady = self.steady_round_seconds
        return None if steady is None else self.first_round_seconds - steady


@dataclass
class _ServerState:
    marks: list[float] = field(default_factory=list)
    result_arrays: ArrayRecord | None = None
    replies: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    call_seconds: float = 0.0
    strategy_start: float = 0.0
    strategy_end: float = 0.0
    monitor: CpuMonitor = field(default_factory=CpuMonitor)


def run_flower(
    model: MultimodalModel,
    data: FederatedDataset,
    *,
    rounds: int,
    clients_per_round: int,
    training: LocalTraining,
    seed: int,
    client_resources: dict[str, float] | None = None,
    torch_threads: int = 1,
    modality_aware: bool = False,
    quiet: bool = True,
) -> FlowerResult:
    """Run the federated job on Flower's simulation engine (Ray backend).

    Parameters
    ----------
    model
        Initial global model (not modified).
    data
        Clients' partitions (``client_indices``) of ``data.train``.
    rounds, clients_per_round, training, seed
        As for :func:`mmshield.runtime.simulation.simulate`.
    client_resources
        Ray resources per ClientApp (``num_cpus`` sets how many actors share the machine).
    torch_threads
        ``torch.set_num_threads`` inside each Ray actor.
    modality_aware
        Use :class:`ModalityAwareFedAvg` instead of Flower's stock ``FedAvg``.
    quiet
        Lower Flower's log level to WARNING (its INFO lines are per round, not per client).
    """
    num_clients = data.num_clients
    resources = client_resources or {"num_cpus": 1, "num_gpus": 0.0}
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="mmshield-flower-"))
    job_path = tmp / "job.pt"
    torch.save(
        {
            "model": copy.deepcopy(model),
            "train": data.train,
            "client_indices": data.client_indices,
            "training": training,
            "seed": seed,
        },
        job_path,
    )
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = _ServerState()

    strategy_cls = ModalityAwareFedAvg if modality_aware else FedAvg
    strategy_kwargs: dict[str, Any] = {
        "fraction_train": clients_per_round / num_clients,
        "fraction_evaluate": 0.0,
        "min_train_nodes": clients_per_round,
        "min_available_nodes": num_clients,
    }

    class _Strategy(strategy_cls):  # type: ignore[valid-type,misc]
        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            ok = [r for r in replies if not r.has_error()]
            state.replies.append(len(ok))
            losses = []
            for r in ok:
                m = next(iter(r.content.metric_records.values()))
                state.train_seconds += float(m["train-seconds"])  # type: ignore[arg-type]
                state.call_seconds += float(m["client-seconds"])  # type: ignore[arg-type]
                losses.append(float(m["train-loss"]))  # type: ignore[arg-type]
            state.train_loss.append(float(np.mean(losses)) if losses else float("nan"))
            return super().aggregate_train(server_round, replies)  # type: ignore[no-any-return]

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = _Strategy(**strategy_kwargs)
        config = ConfigRecord({"job-path": str(job_path), "torch-threads": torch_threads})

        def _mark(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            state.marks.append(time.perf_counter())
            return None

        state.strategy_start = time.perf_counter()
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=rounds,
            train_config=config,
            evaluate_fn=_mark,
        )
        state.strategy_end = time.perf_counter()
        state.monitor.stop()  # before Ray shuts its workers down
        state.result_arrays = result.arrays

    state.monitor.start()
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_clients,
            backend_config={"client_resources": dict(resources)},
        )
        t_end = time.perf_counter()
    finally:
        job_path.unlink(missing_ok=True)
        tmp.rmdir()

    if state.result_arrays is None or len(state.replies) != rounds:
        raise RuntimeError(f"Flower simulation did not finish its {rounds} rounds")
    if any(r != clients_per_round for r in state.replies):
        raise RuntimeError(f"Flower clients failed: replies per round {state.replies}")
    final = state.result_arrays.to_torch_state_dict()
    marks = state.marks  # round 0 (before training), then after each round
    rounds_s = [b - a for a, b in itertools.pairwise(marks)]
    return FlowerResult(
        state={k: v.clone() for k, v in final.items()},
        wall_seconds=state.strategy_end - t0,
        total_seconds=t_end - t0,
        round_seconds=rounds_s,
        startup_seconds=state.strategy_start - t0,
        clients_per_round=list(state.replies),
        client_train_seconds=state.train_seconds,
        client_call_seconds=state.call_seconds,
        train_loss=list(state.train_loss),
        foreign_cores=state.monitor.foreign_cores,
    )


def load_state(model: MultimodalModel, state: dict[str, torch.Tensor]) -> MultimodalModel:
    """A copy of ``model`` holding the parameters ``state``."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            p.copy_(state[name])
    return out
