"""Scale: client-updates per second and peak memory from 100 to 10,000 clients per round.

Run ``python -m benchmarks.scale`` (``--quick`` for a smaller version, ``--mmshield-only`` to skip
Flower). mmshield's vectorised simulator trains the sampled clients of a round in cohorts
(``cohort_size`` clients per ``torch.func.vmap`` pass); this benchmark reports its throughput
(client-updates per second: sampled clients trained and aggregated per second) and its peak
memory against the number of clients per round and the cohort size, and runs the same workload
on Flower's simulation engine (Ray backend) in the same run.

Workload
--------
A synthetic tabular federation of :data:`POPULATION` = 20,000 clients, in the style of
``fedprox-synthetic`` (Li et al. 2020) but with few records per client: client ``k`` holds
``n_k ~ U{20, …, 50}`` records (mean 35; 699,549 in all), features
``x ~ N(v_k, diag(j^-1.2))`` (60 dimensions) around a client mean ``v_k[j] ~ N(B_k, 1)`` with
``B_k ~ N(0, 1)``, and labels ``y = argmax(x W_k + b_k)`` from a client labeller
``W_k = W_0 + 0.5 E_k``, ``b_k = b_0 + 0.5 e_k`` (a shared part ``W_0, b_0 ~ N(0, 1)`` a global
model can learn, a client part ``E_k, e_k ~ N(0, 1)``: non-IID features and labels). The test set
is one further record of every client (20,000 records). Model: a 60-64-10 MLP (mmshield's
``build_model`` with one tabular modality, concat fusion, no fusion layer; 4,554 parameters).
Local training: 1 epoch of SGD, batch 10, lr 0.05 (2 to 5 steps per client); FedAvg; 3 rounds;
seed 0; no evaluation between rounds (mmshield evaluates once after the last round, inside the
timing; Flower does not evaluate).

What is measured
----------------
mmshield, 20,000-client population: 100, 1,000 and 10,000 clients per round, with cohort sizes
100, 1,000 and ``auto`` (simulate's default: as many as fit its 2 GB estimate, capped at the
clients per round) where they differ. Each configuration runs in a fresh interpreter
(``ru_maxrss`` / ``VmHWM`` are monotone), data generated and libraries imported before the clock
starts; its peak memory is the process's peak resident set (``VmHWM``: interpreter, torch, the
whole data set and the simulation), and the peak before ``simulate`` is reported next to it.
mmshield runs with 1 torch thread (``--threads``): on this shared 2-core machine two-thread
kernels collapse whenever another process holds a core (a 100-client round took 0.04 s quiet and
about 1 s with one core busy elsewhere), while one thread is undisturbed by one foreign core.
That leaves the second core idle, which only understates mmshield against Flower's two actors;
the same-federation comparisons are also measured with 2 threads and reported next to it.

Flower 1.41 (``benchmarks/_flower_sim.py``: ServerApp with FedAvg in the driver, ClientApps in two
Ray actors with 1 CPU and 1 torch thread each, clients running mmshield's reference per-client
loop with the same per-client seeds) at 100 and 1,000 clients per round, each on a federation of
exactly that many clients: the first 100 or 1,000 clients of the population, all trained every
round. Why not the 20,000-client population: Flower's simulation engine costs grow with the
number of supernodes, not only with the sampled ones (at 100 sampled clients per round, a steady
round takes several times longer with 20,000 supernodes than with 100: see
``flower_full_population``), so a population of exactly ``clients_per_round`` is Flower's most
favourable setting. With ``--flower-population`` (on by
default in a full run) Flower is also measured once on the whole population at 100 clients per
round, 2 rounds (``flower_full_population`` in the JSON), to show what that costs. mmshield
runs the same two sub-federations (same clients every round, same data, same initial model, same
seeds): those runs give the ratios (same workload, same clients) and the largest parameter
difference between the two final models (both sides computed the same training up to
floating-point summation order).

Figures: steady-state client-updates/s = clients per round / median of rounds 2..R, less
mmshield's test-set evaluation after the last round (timed separately, ``evaluation_seconds``;
Flower does not evaluate). Round 1 is reported separately (for mmshield it holds the first vmap
call and allocator warm-up, for Flower Ray's start-up, actor creation and the actors' loading of
the job file). Whole-run updates/s = clients per round x rounds / wall time from starting the
job to holding the final model (mmshield: ``simulate``'s wall time incl. its set-up and the
evaluation; Flower: incl. Ray start-up). Flower's memory: the driver's peak resident set
(``VmHWM``) and, sampled once a second, the proportional set size (PSS, shared pages split
between processes) summed over the driver and all its descendants (Ray's GCS, raylet, dashboard
and the two actors); a sampled peak can miss short spikes.

Profile: one more fresh run at 10,000 clients per round (auto cohort, 1 torch thread) times the
parts of a round by wrapping the simulator's helpers (set-up, vectorised batch schedules and
seeds, the cohort trainer's own work, the vmapped gradient steps, the rest of ``train_stacked``,
finiteness checks, aggregation, evaluation; each part's exclusive time, so they add up to the
round), then a warm round under cProfile (top functions by own time in the JSON).

The machine is shared and has 2 cores: every measurement records the load average and how many
cores other processes kept busy (``foreign_cores``); an mmshield configuration measured while
other processes kept more than ``--max-foreign`` cores busy is measured again (``--retries``)
and the least disturbed attempt is kept. ``--quick`` (2,000 clients, 100 and 1,000 per round,
2 rounds, Flower at 100 only) writes ``"quick": true`` and leaves RESULTS.md alone.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import json
import math
import os
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mmshield.data.dataset import FederatedDataset, ModalitySpec, MultimodalDataset
from mmshield.fl.client import LocalTraining
from mmshield.fl.evaluate import evaluate
from mmshield.models.model import MultimodalModel, build_model

from benchmarks._common import (
    CpuMonitor,
    machine_info,
    machine_line,
    target,
    update_results_md,
    wait_for_quiet,
    write_json,
)

NAME = "scale"
ROOT = Path(__file__).resolve().parent.parent

POPULATION = 20_000
QUICK_POPULATION = 2_000
MIN_RECORDS, MAX_RECORDS = 20, 50
DIMENSION = 60
NUM_CLASSES = 10
EMBED_DIM = 64
HETEROGENEITY = 0.5
SEED = 0
ROUNDS = 3
QUICK_ROUNDS = 2
TRAINING = LocalTraining(local_epochs=1, batch_size=10, lr=0.05)
FLOWER_RESOURCES = {"num_cpus": 1.0, "num_gpus": 0.0}
FLOWER_THREADS = 1
FLOWER_POPULATION_CLIENTS = 100
FLOWER_POPULATION_ROUNDS = 2
MEMORY_GOAL_MB = 4000.0  # "under 4 GB": decimal megabytes, the stricter reading
SPEEDUP_GOAL = 100.0
MB = 1e6

console = Console()
if not console.is_terminal:
    console.width = 130


# --------------------------------------------------------------------------------------------
# Workload
# --------------------------------------------------------------------------------------------


def scale_federation(
    num_clients: int = POPULATION,
    min_records: int = MIN_RECORDS,
    max_records: int = MAX_RECORDS,
    seed: int = SEED,
    heterogeneity: float = HETEROGENEITY,
    chunk: int = 1024,
) -> FederatedDataset:
    """The synthetic federation of the module docstring (one test record per client).

    Records of client ``k`` are rows ``offsets[k]:offsets[k+1]`` of the training set; its test
    record is row ``k`` of the test set (``test.meta["client_of_row"]``).
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(min_records, max_records + 1, num_clients)
    b_user = rng.normal(0.0, 1.0, num_clients).astype(np.float32)
    w0 = rng.standard_normal((DIMENSION, NUM_CLASSES), dtype=np.float32)
    b0 = rng.standard_normal(NUM_CLASSES, dtype=np.float32)
    std = np.power(np.arange(1, DIMENSION + 1, dtype=np.float64), -0.6).astype(np.float32)
    width = max_records + 1
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    x_train = np.empty((int(offsets[-1]), DIMENSION), dtype=np.float32)
    y_train = np.empty(int(offsets[-1]), dtype=np.int64)
    x_test = np.empty((num_clients, DIMENSION), dtype=np.float32)
    y_test = np.empty(num_clients, dtype=np.int64)
    for c0 in range(0, num_clients, chunk):
        c1 = min(num_clients, c0 + chunk)
        k = c1 - c0
        v = b_user[c0:c1, None] + rng.standard_normal((k, DIMENSION), dtype=np.float32)
        w = w0 + heterogeneity * rng.standard_normal((k, DIMENSION, NUM_CLASSES), dtype=np.float32)
        b = b0 + heterogeneity * rng.standard_normal((k, NUM_CLASSES), dtype=np.float32)
        x = v[:, None, :] + rng.standard_normal((k, width, DIMENSION), dtype=np.float32) * std
        y = np.argmax(np.matmul(x, w) + b[:, None, :], axis=2)
        for i in range(k):
            c = c0 + i
            lo, hi, n = int(offsets[c]), int(offsets[c + 1]), int(sizes[c])
            x_train[lo:hi] = x[i, :n]
            y_train[lo:hi] = y[i, :n]
            x_test[c] = x[i, max_records]
            y_test[c] = y[i, max_records]
    spec = ModalitySpec("features", "tabular", (DIMENSION,))
    classes = [str(c) for c in range(NUM_CLASSES)]

    def build(x: np.ndarray, y: np.ndarray, name: str) -> MultimodalDataset:
        return MultimodalDataset(
            specs=[spec],
            inputs={"features": torch.from_numpy(x)},
            present={"features": torch.ones(len(y), dtype=torch.bool)},
            labels=torch.from_numpy(y),
            classes=classes,
            name=name,
        )

    train = build(x_train, y_train, "scale-synthetic train")
    test = build(x_test, y_test, "scale-synthetic test")
    test.meta["client_of_row"] = np.arange(num_clients)
    indices = [np.arange(offsets[c], offsets[c + 1]) for c in range(num_clients)]
    return FederatedDataset(train=train, client_indices=indices, test=test)


def restrict(data: FederatedDataset, clients: int) -> FederatedDataset:
    """The federation of the first ``clients`` clients only (their records and test records)."""
    if clients >= data.num_clients:
        return data
    kept = data.client_indices[:clients]
    rows = np.concatenate(kept)
    train = data.train.subset(rows)
    sizes = np.array([len(ix) for ix in kept])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    indices = [np.arange(offsets[c], offsets[c + 1]) for c in range(clients)]
    owner = np.asarray(data.test.meta["client_of_row"])
    test_rows = np.flatnonzero(owner < clients)
    test = data.test.subset(test_rows)
    test.meta["client_of_row"] = owner[test_rows]
    return FederatedDataset(train=train, client_indices=indices, test=test)


def build_scale_model(data: FederatedDataset) -> MultimodalModel:
    """The 60-64-10 MLP (seed :data:`SEED`)."""
    return build_model(
        data.train.specs, NUM_CLASSES, embed_dim=EMBED_DIM, fusion="concat", fusion_hidden=0,
        seed=SEED,
    )  # fmt: skip


def fingerprint(data: FederatedDataset, model: MultimodalModel) -> str:
    """Hash of the initial model, the partition, features and labels (processes must agree)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().numpy().tobytes())
    h.update(np.array([len(ix) for ix in data.client_indices], dtype=np.int64).tobytes())
    h.update(np.concatenate(data.client_indices).astype(np.int64).tobytes())
    h.update(data.train.labels.numpy().tobytes())
    h.update(data.train.inputs["features"].numpy()[::97].tobytes())
    return h.hexdigest()[:16]


def workload_info(data: FederatedDataset, model: MultimodalModel, rounds: int) -> dict[str, Any]:
    """Parameters of the workload for the JSON."""
    sizes = np.array([len(ix) for ix in data.client_indices])
    return {
        "description": (
            f"synthetic tabular federation, {data.num_clients:,} clients with "
            f"{MIN_RECORDS}-{MAX_RECORDS} records each, 60-64-10 MLP, 1 epoch SGD batch 10"
        ),
        "population": data.num_clients,
        "records_per_client": {
            "min": int(sizes.min()),
            "max": int(sizes.max()),
            "mean": float(sizes.mean()),
        },
        "train_records": len(data.train),
        "test_records": len(data.test),
        "features": DIMENSION,
        "classes": NUM_CLASSES,
        "heterogeneity": HETEROGENEITY,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": f"{DIMENSION}-{EMBED_DIM}-{NUM_CLASSES} MLP (concat fusion, no fusion layer)",
        "training": {
            "local_epochs": TRAINING.local_epochs,
            "batch_size": TRAINING.batch_size,
            "lr": TRAINING.lr,
            "momentum": TRAINING.momentum,
        },
        "rounds": rounds,
        "seed": SEED,
        "fingerprint": fingerprint(data, model),
    }


# --------------------------------------------------------------------------------------------
# Memory and load
# --------------------------------------------------------------------------------------------


def _status_kb(field: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``, ``VmRSS``), if readable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def _pss_kb(pid: int) -> int | None:
    """Proportional set size of ``pid`` from ``/proc/PID/smaps_rollup``, if readable."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def _descendants(root: int) -> list[int]:
    """``root`` and every live process below it."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        parent[int(entry.name)] = int(raw[raw.rindex(")") + 2 :].split()[1])
    out = []
    for pid in parent:
        p, depth = pid, 0
        while p not in (0, 1) and p != root and depth < 64:
            p, depth = parent.get(p, 0), depth + 1
        if p == root:
            out.append(pid)
    return out


class TreeMemorySampler:
    """Samples, once per ``interval``, the PSS summed over this process and its descendants.

    Also keeps each process's largest ``VmHWM`` seen (their sum over-counts shared pages: an
    upper bound of the tree's peak resident memory).
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.peak_pss_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        """Take one sample."""
        pids = _descendants(os.getpid())
        self.processes = max(self.processes, len(pids))
        total = 0
        for pid in pids:
            total += _pss_kb(pid) or 0
            hwm = _status_kb("VmHWM", pid)
            if hwm is not None:
                self.hwm_kb[pid] = max(self.hwm_kb.get(pid, 0), hwm)
        self.peak_pss_kb = max(self.peak_pss_kb, total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> TreeMemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _load() -> list[float]:
    """1, 5 and 15 minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb * 1024 / MB


# --------------------------------------------------------------------------------------------
# Configurations and workers (each measurement runs in a fresh interpreter)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One measurement: which runtime, on which federation, how many clients per round."""

    side: str  # "mmshield", "flower" or "profile"
    population: int  # clients of the generated federation
    clients: int  # clients of the federation actually used (first `clients` of the population)
    clients_per_round: int
    cohort: int | None  # mmshield's cohort_size (None: simulate's automatic choice)
    rounds: int
    threads: int | None  # torch threads of the mmshield process (None: torch's default)

    @property
    def label(self) -> str:
        """Short description for console lines."""
        cohort = "auto" if self.cohort is None else f"{self.cohort:,}"
        who = f"{self.side}, population {self.clients:,}, {self.clients_per_round:,}/round"
        return who + (f", cohort {cohort}" if self.side != "flower" else "")


def _job(cfg: Config) -> tuple[FederatedDataset, MultimodalModel]:
    data = restrict(scale_federation(cfg.population), cfg.clients)
    return data, build_scale_model(data)


def _mmshield_worker(cfg: Config) -> dict[str, Any]:
    """Child process: one mmshield simulation, its timings and the process's peak memory."""
    import torch._dynamo  # torch.func imports it lazily: library start-up, not the job

    import mmshield.runtime.simulation as sim_module
    from mmshield.runtime.simulation import RoundRecord, simulate

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data, model = _job(cfg)
    # Time the test-set evaluation (after the last round) so that the steady-state figure can
    # leave it out: Flower's side does not evaluate.
    spans: list[float] = []
    per_round: list[float] = []
    original = getattr(sim_module, "evaluate", None)
    if original is not None:

        def timed_evaluate(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spans.append(time.perf_counter() - t0)

        sim_module.evaluate = timed_evaluate

    def on_round(_record: RoundRecord) -> None:
        per_round.append(sum(spans, 0.0) - sum(per_round, 0.0))

    rss_before = _status_kb("VmRSS")
    hwm_before = _status_kb("VmHWM")
    load_before = _load()
    try:
        with CpuMonitor() as mon:
            result = simulate(
                model,
                data,
                rounds=cfg.rounds,
                clients_per_round=cfg.clients_per_round,
                training=TRAINING,
                seed=SEED,
                cohort_size=cfg.cohort,
                eval_every=cfg.rounds,
                on_round=on_round,
            )
    finally:
        if original is not None:
            sim_module.evaluate = original
    hwm = _status_kb("VmHWM")
    last = result.history[-1]
    rounds = [r.seconds for r in result.history]
    return {
        "fingerprint": fingerprint(data, model),
        "wall_seconds": result.wall_seconds,
        "round_seconds": rounds,
        "evaluation_seconds": per_round if original is not None else None,
        "training_round_seconds": [r - e for r, e in zip(rounds, per_round, strict=True)]
        if original is not None
        else rounds,
        "clients_trained": [r.clients for r in result.history],
        "train_loss": [r.train_loss for r in result.history],
        "test_accuracy": last.test_accuracy,
        "test_loss": last.test_loss,
        "cohort_size": result.cohort_size,
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": _mb(hwm),
        "peak_rss_before_simulate_mb": _mb(hwm_before),
        "rss_before_simulate_mb": _mb(rss_before),
        "foreign_cores": mon.foreign_cores,
        "load_average_before": load_before,
        "load_average_after": _load(),
        "_state": {k: v.detach().clone() for k, v in result.model.named_parameters()},
    }


def _flower_worker(cfg: Config) -> dict[str, Any]:
    """Child process: one Flower simulation (Ray), its timings and memory."""
    from benchmarks._flower_sim import run_flower

    data, model = _job(cfg)
    load_before = _load()
    with TreeMemorySampler(interval=1.0) as sampler:
        res = run_flower(
            model,
            data,
            rounds=cfg.rounds,
            clients_per_round=cfg.clients_per_round,
            training=TRAINING,
            seed=SEED,
            client_resources=dict(FLOWER_RESOURCES),
            torch_threads=FLOWER_THREADS,
        )
    return {
        "fingerprint": fingerprint(data, model),
        "wall_seconds": res.wall_seconds,
        "total_seconds_incl_shutdown": res.total_seconds,
        "startup_seconds": res.startup_seconds,
        "round_seconds": res.round_seconds,
        "clients_trained": res.clients_per_round,
        "train_loss": res.train_loss,
        "client_train_seconds": res.client_train_seconds,
        "client_call_seconds": res.client_call_seconds,
        "client_resources": dict(FLOWER_RESOURCES),
        "torch_threads_per_actor": FLOWER_THREADS,
        "driver_peak_rss_mb": _mb(_status_kb("VmHWM")),
        "tree_peak_pss_mb": _mb(sampler.peak_pss_kb),
        "tree_sum_of_peak_rss_mb": _mb(sum(sampler.hwm_kb.values())),
        "tree_processes": sampler.processes,
        "foreign_cores": res.foreign_cores,
        "load_average_before": load_before,
        "load_average_after": _load(),
        "_state": {k: v.clone() for k, v in res.state.items()},
    }


# Parts of a round the profile times, by what they wrap (first found is used); each records its
# exclusive time (time inside other wrapped parts is subtracted), so the parts add up.
PROFILE_PARTS: dict[str, tuple[str, ...]] = {
    "sample_clients": ("sim:sample_clients",),
    "batch schedules (vectorised, per cohort)": ("sim:batch_schedules",),
    "client seeds (vectorised, per cohort)": ("sim:client_seeds",),
    "cohort set-up (sort by schedule length, row lookup, stacking, deltas)": (
        "sim:CohortTrainer.train",
        "sim:_train_cohort",
    ),
    "vmapped grad steps (forward + backward)": ("client:vmap",),
    "rest of train_stacked (SGD updates, gathers, sort, clones)": (
        "sim:train_stacked",
        "client:train_stacked",
    ),
    "_check_cohort_finite": ("sim:_check_cohort_finite",),
    "ModalityAwareMean.add": ("aggregate:ModalityAwareMean.add",),
    "evaluate": ("sim:evaluate",),
}
REST_OF_ROUND = "rest of the round (server step, parameter copies, loss)"


@contextlib.contextmanager
def _timers(acc: dict[str, list[float]]) -> Iterator[list[str]]:
    """Wrap the simulator's helpers; ``acc[part]`` collects [exclusive seconds, calls].

    Yields the parts it found nothing to wrap for (the simulator's internals may change).
    """
    import mmshield.fl.aggregate as agg_module
    import mmshield.fl.client as client_module
    import mmshield.runtime.simulation as sim_module

    modules = {"sim": sim_module, "client": client_module, "aggregate": agg_module}
    restore: list[tuple[object, str, object]] = []
    missing: list[str] = []
    stack: list[list[float]] = []  # [start, time spent in wrapped callees] per active call

    def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        slot = acc.setdefault(part, [0.0, 0.0])

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            frame = [time.perf_counter(), 0.0]
            stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                stack.pop()
                elapsed = time.perf_counter() - frame[0]
                slot[0] += elapsed - frame[1]
                slot[1] += 1
                if stack:
                    stack[-1][1] += elapsed

        return wrapper

    def resolve(spec: str) -> tuple[object, str] | None:
        mod, _, path = spec.partition(":")
        owner: object = modules[mod]
        *parents, attr = path.split(".")
        for name in parents:
            owner = getattr(owner, name, None)
            if owner is None:
                return None
        return (owner, attr) if getattr(owner, attr, None) is not None else None

    for part, specs in PROFILE_PARTS.items():
        found = next((r for r in map(resolve, specs) if r is not None), None)
        if found is None:
            missing.append(part)
            continue
        owner, attr = found
        fn = getattr(owner, attr)
        restore.append((owner, attr, fn))
        if specs[0] == "client:vmap":
            # vmap builds the step function: time the function it returns.
            def timed_vmap(
                f: Callable[..., Any], *a: Any, _fn: Any = fn, _part: str = part, **k: Any
            ) -> Callable[..., Any]:
                return timed(_part, _fn(f, *a, **k))

            setattr(owner, attr, timed_vmap)
        else:
            setattr(owner, attr, timed(part, fn))
    try:
        yield missing
    finally:
        for owner, attr, fn in reversed(restore):
            setattr(owner, attr, fn)


def _breakdown(acc: dict[str, list[float]], round_seconds: float) -> dict[str, Any]:
    """Exclusive seconds per part of one round; the rest of the round is what none covers."""
    parts = {part: acc.get(part, [0.0, 0.0])[0] for part in PROFILE_PARTS}
    parts[REST_OF_ROUND] = round_seconds - sum(parts.values())
    return {
        "round_seconds": round_seconds,
        "parts_seconds": parts,
        "calls": {part: int(acc.get(part, [0.0, 0.0])[1]) for part in PROFILE_PARTS},
    }


def _profile_worker(cfg: Config) -> dict[str, Any]:
    """Child process: where a round's time goes at ``cfg.clients_per_round`` clients."""
    import torch._dynamo  # library start-up, not the job

    from mmshield.runtime.simulation import RoundRecord, sample_clients, simulate

    torch.set_num_threads(cfg.threads or 1)
    data, model = _job(cfg)
    acc: dict[str, list[float]] = {}
    snapshots: list[dict[str, list[float]]] = []

    def snap(_record: RoundRecord) -> None:
        snapshots.append({k: list(v) for k, v in acc.items()})

    with _timers(acc) as missing, CpuMonitor() as mon:
        result = simulate(
            model,
            data,
            rounds=cfg.rounds,
            clients_per_round=cfg.clients_per_round,
            training=TRAINING,
            seed=SEED,
            cohort_size=cfg.cohort,
            eval_every=cfg.rounds,
            on_round=snap,
        )
    rounds = [r.seconds for r in result.history]
    setup = result.wall_seconds - sum(rounds)
    per_round = []
    prev: dict[str, list[float]] = {}
    for rec, now in zip(result.history, snapshots, strict=True):
        diff = {k: [v[0] - prev.get(k, [0.0, 0.0])[0], v[1] - prev.get(k, [0.0, 0.0])[1]]
                for k, v in now.items()}  # fmt: skip
        per_round.append(_breakdown(diff, rec.seconds))
        prev = now
    # A warm round under cProfile (same process, kernels and allocator primed).
    prof = cProfile.Profile()
    prof.enable()
    simulate(
        model, data, rounds=1, clients_per_round=cfg.clients_per_round, training=TRAINING,
        seed=SEED + 1, cohort_size=cfg.cohort,
    )  # fmt: skip
    prof.disable()
    stats = pstats.Stats(prof)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    rows: list[dict[str, Any]] = []
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in raw.items():
        short = filename.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
        rows.append(
            {"function": f"{short}:{line}({func})", "calls": int(ncalls),
             "tottime": float(tottime), "cumtime": float(cumtime)}
        )  # fmt: skip
    rows.sort(key=lambda r: r["tottime"], reverse=True)
    total = sum(r["tottime"] for r in rows)
    # Arithmetic rate of the vmapped steps in the last round: matmul FLOPs of the real samples
    # (forward 2 x in x out per Linear layer and sample, backward twice that) over their time.
    sizes = np.array([len(ix) for ix in data.client_indices])
    chosen = sample_clients(data.num_clients, cfg.clients_per_round, SEED, cfg.rounds)
    samples = int(sizes[chosen].sum()) * TRAINING.local_epochs
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    flops_per_sample = 6 * sum(m.in_features * m.out_features for m in linear)
    vmap_seconds = per_round[-1]["parts_seconds"]["vmapped grad steps (forward + backward)"]
    return {
        "clients_per_round": cfg.clients_per_round,
        "population": cfg.clients,
        "cohort_size": result.cohort_size,
        "torch_threads": torch.get_num_threads(),
        "wall_seconds": result.wall_seconds,
        "setup_seconds": setup,
        "round_seconds": rounds,
        "rounds": per_round,
        "not_wrapped": missing,
        "foreign_cores": mon.foreign_cores,
        "cprofile_total_seconds": total,
        "cprofile_top": rows[:20],
        "samples_last_round": samples,
        "matmul_flops_per_sample": flops_per_sample,
        "vmap_step_gflops": samples * flops_per_sample / vmap_seconds / 1e9
        if vmap_seconds > 0
        else None,
        "fingerprint": fingerprint(data, model),
    }


WORKERS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "mmshield": _mmshield_worker,
    "flower": _flower_worker,
    "profile": _profile_worker,
}


def run_worker(cfg: Config, expect: str, timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter and return its result."""
    with tempfile.TemporaryDirectory(prefix="mmshield-scale-") as tmp:
        out = Path(tmp) / "result.pt"
        cmd = [
            sys.executable, "-m", "benchmarks.scale", "--worker", json.dumps(asdict(cfg)),
            "--worker-out", str(out),
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"{cfg.label}: no result within {timeout:.0f} s") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"{cfg.label} failed:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        result: dict[str, Any] = torch.load(out, weights_only=False)
    if result["fingerprint"] != expect:
        raise RuntimeError(f"{cfg.label}: the worker built another workload (different data)")
    return result


def measure(
    cfg: Config, expect: str, *, retries: int, max_foreign: float, wait_quiet: float,
    timeout: float,
) -> dict[str, Any]:  # fmt: skip
    """Measure ``cfg``; again (up to ``retries`` times) while other processes kept more than
    ``max_foreign`` cores busy; keep the least disturbed attempt (all are listed)."""
    tried: list[dict[str, Any]] = []
    for attempt in range(retries + 1):
        before = wait_for_quiet(wait_quiet)
        res = run_worker(cfg, expect, timeout)
        res["foreign_cores_before"] = before
        tried.append(res)
        foreign = res.get("foreign_cores")
        if foreign is None or foreign <= max_foreign or attempt == retries:
            break
        console.print(
            f"    other processes kept {foreign:.2f} cores busy; measuring {cfg.label} again"
        )
    best = min(tried, key=lambda r: r.get("foreign_cores") or 0.0)
    best["attempts"] = [
        {"wall_seconds": r["wall_seconds"], "foreign_cores": r.get("foreign_cores")} for r in tried
    ]
    return best


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _steady(round_seconds: list[float]) -> float | None:
    later = round_seconds[1:]
    return float(np.median(later)) if later else None


def throughput(entry: dict[str, Any], clients_per_round: int) -> dict[str, Any]:
    """Client-updates per second: steady state (rounds 2..R, less any test-set evaluation),
    round 1 and whole run (everything included)."""
    rounds = entry["round_seconds"]
    steady = _steady(entry.get("training_round_seconds") or rounds)
    return {
        "steady_round_seconds": steady,
        "first_round_seconds": rounds[0],
        "updates_per_second_steady": clients_per_round / steady if steady else None,
        "updates_per_second_first_round": clients_per_round / rounds[0],
        "updates_per_second_whole_run": clients_per_round * len(rounds) / entry["wall_seconds"],
    }


def _max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _cohort_txt(entry: dict[str, Any]) -> str:
    asked = entry["config"]["cohort"]
    return f"{entry['cohort_size']:,}" + (" (auto)" if asked is None else "")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def _mmshield_configs(
    population: int, quick: bool, threads: int | None, rounds: int
) -> list[Config]:
    per_round = [100, 1_000] if quick else [100, 1_000, 10_000]
    configs = []
    for cpr in per_round:
        cohorts: list[int | None] = [c for c in (100, 1_000) if c < cpr] + [None]
        for cohort in cohorts:
            configs.append(Config("mmshield", population, population, cpr, cohort, rounds, threads))
    return configs


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.scale``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="smaller version (under a minute)")
    parser.add_argument("--mmshield-only", action="store_true", help="skip Flower")
    parser.add_argument(
        "--flower-population",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"also run Flower on the whole population at {FLOWER_POPULATION_CLIENTS} clients per "
        "round (slow: minutes; default on in a full run, off with --quick)",
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the profile run")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the mmshield runs (default 1: on this shared 2-core machine "
        "two-thread kernels collapse whenever another process holds a core; the comparisons "
        "with Flower are also measured with 2 threads, reported next to them)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=None,
        help="measure an mmshield configuration again (up to N times) when other processes kept "
        "more than --max-foreign cores busy (default 2; 0 with --quick); Flower runs once",
    )
    parser.add_argument("--max-foreign", type=float, default=0.3, metavar="CORES")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=None,
        metavar="SECONDS",
        help="before each measurement wait up to this long for idle CPUs (default 15; 0 quick)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        cfg = Config(**json.loads(args.worker))
        torch.save(WORKERS[cfg.side](cfg), args.worker_out)
        return 0

    quick: bool = args.quick
    flower = not args.mmshield_only
    flower_population = flower and (
        args.flower_population if args.flower_population is not None else not quick
    )
    retries = args.retries if args.retries is not None else (0 if quick else 2)
    wait_quiet = args.wait_quiet if args.wait_quiet is not None else (0.0 if quick else 15.0)
    population = QUICK_POPULATION if quick else POPULATION
    rounds = QUICK_ROUNDS if quick else ROUNDS
    flower_per_round = [100] if quick else [100, 1_000]

    t_start = time.perf_counter()
    machine = machine_info()
    console.print(f"[bold]machine[/]: {machine_line(machine)}; load average {_load()}")
    t0 = time.perf_counter()
    data = scale_federation(population)
    model = build_scale_model(data)
    info = workload_info(data, model, rounds)
    console.print(
        f"workload: {info['description']}; {info['train_records']:,} training records, "
        f"generated in {time.perf_counter() - t0:.1f} s"
    )
    expect = {population: info["fingerprint"]}
    subsets: dict[int, FederatedDataset] = {}
    for k in sorted({*flower_per_round, FLOWER_POPULATION_CLIENTS}) if flower else []:
        subsets[k] = restrict(data, k)
        expect[k] = fingerprint(subsets[k], model)
    load_start = _load()

    def run(cfg: Config, timeout: float = 900.0, tries: int | None = None) -> dict[str, Any]:
        res = measure(
            cfg, expect[cfg.clients], retries=retries if tries is None else tries,
            max_foreign=args.max_foreign, wait_quiet=wait_quiet, timeout=timeout,
        )  # fmt: skip
        res["config"] = asdict(cfg)
        res |= throughput(res, cfg.clients_per_round)
        return res

    # mmshield on the whole population
    mm_runs: list[dict[str, Any]] = []
    for cfg in _mmshield_configs(population, quick, args.threads, rounds):
        console.print(f"  {cfg.label} ...")
        r = run(cfg)
        r.pop("_state")
        console.print(
            f"    {_fmt(r['updates_per_second_steady'])} updates/s steady "
            f"(rounds {', '.join(f'{x:.3f}' for x in r['round_seconds'])} s), "
            f"peak {_fmt(r['peak_rss_mb'])} MB, cohort {_cohort_txt(r)}, "
            f"other processes {_fmt(r['foreign_cores'], '.2f')} cores"
        )
        mm_runs.append(r)

    # Flower and mmshield on the same sub-federations
    comparisons: list[dict[str, Any]] = []
    flower_runs: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for cpr in flower_per_round if flower else []:
        sub = subsets[cpr]
        mm_cfg = Config("mmshield", population, cpr, cpr, None, rounds, args.threads)
        fl_cfg = Config("flower", population, cpr, cpr, None, rounds, None)
        console.print(f"  {mm_cfg.label} (same federation as Flower's) ...")
        mm = run(mm_cfg)
        two: dict[str, Any] | None = None
        if args.threads != 2:
            two_cfg = replace(mm_cfg, threads=2)
            console.print(f"  {two_cfg.label}, 2 torch threads ...")
            two = run(two_cfg)
        console.print(f"  {fl_cfg.label} ...")
        try:
            fl = run(fl_cfg, tries=0)
        except RuntimeError as exc:
            console.print(f"    [red]failed[/]: {exc}")
            failures.append({"config": fl_cfg.label, "error": str(exc)})
            mm.pop("_state")
            if two is not None:
                two.pop("_state")
            comparisons.append(
                {"clients_per_round": cpr, "mmshield": mm, "mmshield_two_threads": two,
                 "flower": None}
            )  # fmt: skip
            continue
        from benchmarks._flower_sim import load_state

        fl_state, mm_state = fl.pop("_state"), mm.pop("_state")
        fl["test_loss"], fl["test_accuracy"] = evaluate(load_state(model, fl_state), sub.test)
        diff = _max_param_diff(mm_state, fl_state)
        if two is not None:
            two["max_param_diff_vs_flower"] = _max_param_diff(two.pop("_state"), fl_state)
        console.print(
            f"    Flower {_fmt(fl['updates_per_second_steady'], ',.1f')} updates/s steady (rounds "
            f"{', '.join(f'{x:.2f}' for x in fl['round_seconds'])} s; round 1 incl. Ray "
            f"start-up), mmshield {_fmt(mm['updates_per_second_steady'])}; "
            f"max |Δparam| {diff:.1e}; other processes {_fmt(fl['foreign_cores'], '.2f')} cores"
        )
        flower_runs.append(fl)
        comparisons.append(
            {
                "clients_per_round": cpr,
                "population": cpr,
                "mmshield": mm,
                "flower": fl,
                "ratio_steady": mm["updates_per_second_steady"] / fl["updates_per_second_steady"],
                "ratio_whole_run": mm["updates_per_second_whole_run"]
                / fl["updates_per_second_whole_run"],
                "max_param_diff": diff,
                "mmshield_two_threads": two,
                "ratio_steady_two_threads": (
                    two["updates_per_second_steady"] / fl["updates_per_second_steady"]
                    if two is not None
                    else None
                ),
            }
        )

    flower_full: dict[str, Any] | None = None
    if flower_population:
        cfg = Config(
            "flower", population, population, FLOWER_POPULATION_CLIENTS, None,
            FLOWER_POPULATION_ROUNDS, None,
        )  # fmt: skip
        console.print(f"  {cfg.label} (Flower on the whole population) ...")
        try:
            flower_full = run(cfg, timeout=1200.0, tries=0)
            flower_full.pop("_state")
            console.print(
                f"    {_fmt(flower_full['updates_per_second_steady'], ',.1f')} updates/s steady "
                f"(rounds {', '.join(f'{x:.1f}' for x in flower_full['round_seconds'])} s)"
            )
        except RuntimeError as exc:
            console.print(f"    [red]failed[/]: {exc}")
            failures.append({"config": cfg.label, "error": str(exc)})

    profile: dict[str, Any] | None = None
    if not args.no_profile:
        cpr = 1_000 if quick else 10_000
        cfg = Config("profile", population, population, cpr, None, 2, 1)
        console.print(f"  {cfg.label}, 1 torch thread ...")
        try:
            profile = run_worker(cfg, expect[population], 900.0)
        except RuntimeError as exc:
            console.print(f"    [red]failed[/]: {exc}")
            failures.append({"config": cfg.label, "error": str(exc)})

    # Targets
    targets: dict[str, Any] = {}
    largest = max(r["config"]["clients_per_round"] for r in mm_runs)
    at_largest = [r for r in mm_runs if r["config"]["clients_per_round"] == largest]
    if largest >= 10_000:
        peak = max(r["peak_rss_mb"] for r in at_largest)
        targets["peak_memory_10000_clients"] = target(peak, MEMORY_GOAL_MB, "<=", "MB")
    by_cpr = {c["clients_per_round"]: c for c in comparisons if c.get("flower")}
    if 1_000 in by_cpr:
        targets["speedup_1000_clients"] = target(
            by_cpr[1_000]["ratio_steady"], SPEEDUP_GOAL, ">=", "x"
        )

    payload: dict[str, Any] = {
        "benchmark": NAME,
        "quick": quick,
        "flower": flower,
        "machine": machine,
        "targets": targets,
        "protocol": {
            "mmshield_threads": args.threads,
            "flower_client_resources": FLOWER_RESOURCES,
            "flower_torch_threads_per_actor": FLOWER_THREADS,
            "retries": retries,
            "max_foreign_cores": args.max_foreign,
            "wait_quiet_seconds": wait_quiet,
            "rounds": rounds,
        },
        "workload": info,
        "load_average_start": load_start,
        "load_average_end": _load(),
        "mmshield": mm_runs,
        "comparisons": comparisons,
        "flower_full_population": flower_full,
        "profile": profile,
        "failures": failures,
        "benchmark_seconds": time.perf_counter() - t_start,
    }
    out_path = write_json(NAME, payload, args.out)
    _print_summary(payload)
    console.print(f"wrote {out_path} ({payload['benchmark_seconds']:.0f} s in all)")
    if flower and not quick and args.out is None:
        md = update_results_md(NAME, _results_markdown(payload))
        console.print(f"updated {md}")
    return 0


def _mmshield_entries(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mmshield measurement: population runs, then the same-federation ones."""
    out = list(payload["mmshield"])
    for c in payload["comparisons"]:
        out += [r for r in (c["mmshield"], c.get("mmshield_two_threads")) if r is not None]
    return out


def _rows(payload: dict[str, Any]) -> list[list[str]]:
    """One row per measurement: runtime, population, per round, cohort, figures, peak memory."""
    rows = []
    mm_all = _mmshield_entries(payload)
    mm_all.sort(
        key=lambda r: (
            r["config"]["clients_per_round"], -r["config"]["clients"], r["torch_threads"]
        )
    )  # fmt: skip
    for r in mm_all:
        c = r["config"]
        rows.append(
            [
                "mmshield",
                f"{c['clients']:,}",
                f"{c['clients_per_round']:,}",
                _cohort_txt(r),
                str(r["torch_threads"]),
                _fmt(r["updates_per_second_steady"]),
                _fmt(r["updates_per_second_first_round"]),
                _fmt(r["updates_per_second_whole_run"]),
                _fmt(r["peak_rss_mb"]),
                _fmt(r["foreign_cores"], ".2f"),
            ]
        )
    flowers = [c["flower"] for c in payload["comparisons"] if c.get("flower")]
    if payload.get("flower_full_population"):
        flowers.append(payload["flower_full_population"])
    for r in flowers:
        c = r["config"]
        rows.append(
            [
                "Flower",
                f"{c['clients']:,}",
                f"{c['clients_per_round']:,}",
                "-",
                "2 actors x 1",
                _fmt(r["updates_per_second_steady"], ",.1f"),
                _fmt(r["updates_per_second_first_round"], ",.1f"),
                _fmt(r["updates_per_second_whole_run"], ",.1f"),
                f"{_fmt(r['driver_peak_rss_mb'])} / {_fmt(r['tree_peak_pss_mb'])}",
                _fmt(r["foreign_cores"], ".2f"),
            ]
        )
    return rows


COLUMNS = [
    "runtime",
    "population",
    "clients/round",
    "cohort",
    "threads",
    "updates/s steady",
    "updates/s round 1",
    "updates/s whole run",
    "peak MB",
    "foreign cores",
]


def _print_summary(payload: dict[str, Any]) -> None:
    table = Table(title="client-updates per second and peak memory")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "runtime" else "right")
    for row in _rows(payload):
        table.add_row(*row)
    console.print(table)
    console.print(
        "peak MB: mmshield = the process's VmHWM; Flower = driver VmHWM / PSS of driver + Ray "
        "processes (sampled every second)"
    )
    for c in payload["comparisons"]:
        if c.get("flower"):
            two = c.get("ratio_steady_two_threads")
            console.print(
                f"{c['clients_per_round']:,} clients/round (same {c['population']:,}-client "
                f"federation): mmshield / Flower = {c['ratio_steady']:.1f}x steady, "
                f"{c['ratio_whole_run']:.1f}x whole run"
                + (f" ({two:.1f}x steady with 2 threads)" if two is not None else "")
                + f"; max |Δparam| {c['max_param_diff']:.1e}"
            )
    prof = payload.get("profile")
    if prof:
        last = prof["rounds"][-1]
        console.print(
            f"profile at {prof['clients_per_round']:,} clients/round, cohort "
            f"{prof['cohort_size']:,}, {prof['torch_threads']} thread: set-up "
            f"{prof['setup_seconds']:.2f} s, round {last['round_seconds']:.2f} s:"
        )
        for part, sec in last["parts_seconds"].items():
            console.print(f"    {part}: {sec:.3f} s ({sec / last['round_seconds']:.0%})")
        console.print(
            f"    vmapped steps: {_fmt(prof['vmap_step_gflops'], '.1f')} GFLOP/s of matmul work "
            f"({prof['samples_last_round']:,} samples x {prof['matmul_flops_per_sample']:,} FLOP)"
        )
    for k, t in payload["targets"].items():
        mark = "[green]met[/]" if t["met"] else "[red]missed[/]"
        console.print(f"  {k}: {t['value']:.4g} {t['unit']} (goal {t['op']} {t['goal']:g}) {mark}")
    for f in payload["failures"]:
        console.print(f"  [red]failed[/]: {f['config']}")


def _results_markdown(payload: dict[str, Any]) -> str:
    """The scale section of ``benchmarks/RESULTS.md``."""
    w = payload["workload"]
    lines = [
        f"`python -m benchmarks.scale`, {payload['timestamp'][:16].replace('T', ' ')} UTC; "
        f"machine: {machine_line(payload['machine'])}. Workload: {w['description']} "
        f"({w['train_records']:,} training records), {w['rounds']} rounds, FedAvg; mmshield with "
        f"{payload['protocol']['mmshield_threads']} torch thread(s) (the comparisons also with "
        "2), Flower 1.41 simulation with 2 Ray actors x 1 CPU x 1 torch thread, clients running "
        "mmshield's reference loop, on a federation of exactly the clients per round. Each "
        "measurement in a fresh process. Steady = clients per round / median of rounds 2.."
        f"{w['rounds']} (less mmshield's test-set evaluation after the last round; Flower does "
        "not evaluate); whole run includes set-up, evaluation and, for Flower, Ray start-up. "
        "Peak MB: mmshield = "
        "process VmHWM (incl. the whole data set); Flower = driver VmHWM / PSS summed over the "
        "driver and Ray's processes (sampled every second).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(payload)]
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for k, t in payload["targets"].items():
        lines.append(
            f"| {k} | {t['value']:.4g} {t['unit']} | {t['op']} {t['goal']:g} | {t['met']} |"
        )
    lines.append("")
    for c in payload["comparisons"]:
        if c.get("flower"):
            fl = c["flower"]
            lines.append(
                f"- {c['clients_per_round']:,} clients per round, both on the same "
                f"{c['population']:,}-client federation (all clients every round): mmshield / "
                f"Flower = **{c['ratio_steady']:.1f}x** steady, {c['ratio_whole_run']:.1f}x whole "
                "run"
                + (
                    f" ({c['ratio_steady_two_threads']:.1f}x steady with mmshield on 2 threads)"
                    if c.get("ratio_steady_two_threads") is not None
                    else ""
                )
                + f"; Flower's rounds {', '.join(f'{x:.2f}' for x in fl['round_seconds'])} s "
                f"(round 1 incl. Ray start-up), its actors busy training "
                f"{fl['client_train_seconds']:.1f} actor-s in all; max |Δparam| between the final "
                f"models {c['max_param_diff']:.1e}."
            )
    full = payload.get("flower_full_population")
    if full:
        lines.append(
            f"- Flower on the whole {full['config']['clients']:,}-client population, "
            f"{full['config']['clients_per_round']:,} sampled per round: rounds "
            f"{', '.join(f'{x:.1f}' for x in full['round_seconds'])} s, "
            f"{_fmt(full['updates_per_second_steady'], ',.1f')} updates/s steady (its engine's "
            "cost grows with the number of supernodes, not only the sampled ones)."
        )
    prof = payload.get("profile")
    if prof:
        last = prof["rounds"][-1]
        parts = ", ".join(
            f"{k} {v:.2f} s ({v / last['round_seconds']:.0%})"
            for k, v in sorted(last["parts_seconds"].items(), key=lambda kv: -kv[1])
        )
        lines += [
            "",
            f"Where mmshield's time goes at {prof['clients_per_round']:,} clients per round "
            f"(cohort {prof['cohort_size']:,}, {prof['torch_threads']} torch thread, round 2 of "
            f"{len(prof['round_seconds'])}: {last['round_seconds']:.2f} s; set-up before round 1 "
            f"{prof['setup_seconds']:.2f} s): {parts}. The vmapped steps run at "
            f"{_fmt(prof['vmap_step_gflops'], '.1f')} GFLOP/s of matmul work.",
        ]
    foreign = [
        r.get("foreign_cores") or 0.0
        for r in _mmshield_entries(payload)
        + [c["flower"] for c in payload["comparisons"] if c.get("flower")]
    ]
    lines += [
        "",
        f"Other processes kept up to {max(foreign, default=0.0):.2f} cores busy during the "
        f"reported measurements (load average {payload['load_average_start']} at the start, "
        f"{payload['load_average_end']} at the end); mmshield configurations measured while "
        f"more than {payload['protocol']['max_foreign_cores']} cores were busy elsewhere were "
        "measured again, Flower's long runs were not.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
