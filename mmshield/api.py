"""The main job in a few lines of Python: build data and model from a config, train, store, report.

Examples
--------
>>> from mmshield.api import run                              # doctest: +SKIP
>>> from mmshield.config import load_config                   # doctest: +SKIP
>>> outcome = run(load_config("mmshield.yaml"))               # doctest: +SKIP
>>> outcome.summary["accuracy"], outcome.report_path          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from mmshield import __version__
from mmshield.config import DistributionConfig, RunConfig, SystemsConfig, load_config
from mmshield.data.dataset import FederatedDataset, MultimodalDataset
from mmshield.data.partition import (
    dirichlet_partition,
    drop_modalities,
    iid_partition,
    label_counts,
    quantity_skew_partition,
)
from mmshield.errors import ConfigError, MMShieldError
from mmshield.fl.aggregate import ClientQuality
from mmshield.fl.client import LocalTraining
from mmshield.fl.evaluate import accuracy_by_modalities, evaluate
from mmshield.fl.strategy import make_server_optimizer
from mmshield.models.model import MultimodalModel, build_model
from mmshield.privacy.accountant import SampledGaussian, calibrate_noise_multiplier, epsilon
from mmshield.privacy.client_dp import AdaptiveClipping, ClientLevelDP
from mmshield.privacy.dpsgd import (
    DPSGD,
    calibrate_sample_level,
    record_mechanisms,
    sample_level_epsilon,
)
from mmshield.privacy.ledger import PrivacyLedger
from mmshield.privacy.noise import NoiseSource
from mmshield.runtime.asynchronous import simulate_buffered
from mmshield.runtime.simulation import RoundRecord, SimulationResult, simulate
from mmshield.runtime.systems import Distribution, SystemsProfile

__all__ = ["Job", "RunOutcome", "build_job", "load_config", "run"]


@dataclass
class Job:
    """Everything a federated run needs, built from a config."""

    config: RunConfig
    data: FederatedDataset
    model: MultimodalModel
    training: LocalTraining
    rounds: int
    clients_per_round: int
    seed: int
    holds: np.ndarray
    rescued_clients: int
    notes: list[str] = field(default_factory=list)
    quality: ClientQuality | None = None


@dataclass
class RunOutcome:
    """What :func:`run` produced."""

    run_id: str
    run_dir: Path
    summary: dict[str, Any]
    report_path: Path


def load_data(
    config: RunConfig,
) -> tuple[MultimodalDataset, MultimodalDataset, list[np.ndarray] | None, list[str]]:
    """Return train, test, a natural partition if the data set has one, and notes."""
    ds = config.dataset
    notes: list[str] = []
    if ds.name == "av-digits":
        from mmshield.data.av_digits import load_av_digits

        train, test = load_av_digits()
        return train, test, None, notes
    if ds.name == "fedprox-synthetic":
        from mmshield.data.synthetic import fedprox_synthetic

        fed = fedprox_synthetic(
            ds.alpha, ds.beta, num_users=config.partition.clients, seed=config.seed
        )
        return fed.train, fed.test, fed.client_indices, notes
    from mmshield.data.manifest import ManifestModality, load_manifest

    assert ds.path is not None
    modalities = {
        name: ManifestModality(
            kind=m.kind,
            column=m.column,
            columns=tuple(m.columns),
            size=m.size,
            image_size=m.image_size,
            channels=m.channels,
        )
        for name, m in ds.modalities.items()
    }
    full, problems = load_manifest(
        ds.path,
        modalities,
        id_column=ds.id_column,
        label_column=ds.label_column,
        classes=ds.classes,
        on_bad_record=ds.on_bad_record,
    )
    if problems:
        notes.append(f"{len(problems)} bad record(s) in {ds.path} were skipped")
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x7E57]))
    order = rng.permutation(len(full))
    n_test = max(1, round(ds.test_fraction * len(full)))
    if len(full) - n_test < config.partition.clients:
        raise ConfigError(
            f"{ds.path}: {len(full)} usable records leave {len(full) - n_test} for training, fewer "
            f"than partition.clients={config.partition.clients}; add data or lower the client count"
        )
    return full.subset(np.sort(order[n_test:])), full.subset(np.sort(order[:n_test])), None, notes


def model_for(config: RunConfig, train: MultimodalDataset) -> MultimodalModel:
    """The architecture ``config.model`` describes for ``train``'s modalities, seeded."""
    m = config.model
    return build_model(
        train.specs,
        train.num_classes,
        embed_dim=m.embed_dim,
        fusion=m.fusion,
        fusion_hidden=m.fusion_hidden,
        seed=config.seed,
    )


def build_job(config: RunConfig) -> Job:
    """Build the data partition, model and training settings a config describes.

    Parameters
    ----------
    config
        A validated run configuration.

    Returns
    -------
    Job
    """
    train, test, natural, notes = load_data(config)
    p = config.partition
    labels = train.labels.numpy()
    if p.scheme == "natural":
        if natural is None:
            raise ConfigError(
                "partition.scheme 'natural' needs a data set with a natural split by user "
                f"(fedprox-synthetic); {config.dataset.name!r} has none: "
                "use iid, dirichlet or quantity"
            )
        parts = natural
    elif p.scheme == "iid":
        parts = iid_partition(len(train), p.clients, config.seed)
    elif p.scheme == "dirichlet":
        parts = dirichlet_partition(labels, p.clients, p.alpha, config.seed)
    else:
        parts = quantity_skew_partition(len(train), p.clients, p.beta, config.seed)
    train, holds, rescued = drop_modalities(train, parts, p.missing_modality, config.seed)
    if rescued:
        notes.append(f"{rescued} client(s) would have held no modality and kept one")
    data = FederatedDataset(train=train, client_indices=parts, test=test)
    model = model_for(config, train)
    t = config.training
    training = LocalTraining(
        local_epochs=t.local_epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        proximal_mu=t.proximal_mu,
    )
    per_round = min(t.clients_per_round or data.num_clients, data.num_clients)
    quality = None
    if config.server.client_quality:
        try:
            quality = ClientQuality(
                config.server.client_quality, data.num_clients, train.modalities
            )
        except ValueError as exc:
            raise ConfigError(f"server.client_quality: {exc}") from None
    return Job(
        config,
        data,
        model,
        training,
        t.rounds,
        per_round,
        config.seed,
        holds,
        rescued,
        notes,
        quality,
    )


@dataclass
class PrivacyPlan:
    """The differential privacy a run will give, decided before it starts."""

    mechanism: DPSGD | None
    epsilon: float | None
    delta: float | None
    statement: str | None
    client_dp: ClientLevelDP | None = None
    per_round: SampledGaussian | None = None
    """The worst-off unit's mechanism for one round (for the ledger's per-round charges)."""

    def epsilon_after(self, rounds: int, total_rounds: int) -> float:
        """Cumulative ε after ``rounds`` rounds: a fast RDP upper bound, the plan at the end."""
        if self.epsilon is None or self.delta is None or self.per_round is None:
            return 0.0
        if rounds >= total_rounds:
            return self.epsilon
        m = self.per_round
        partial = SampledGaussian(m.noise_multiplier, m.steps * rounds, m.sampling, m.sampling_rate)
        return min(self.epsilon, epsilon([partial], self.delta, "rdp", coarse=True))

    def mechanism_record(self) -> dict[str, object]:
        """What the ledger stores about the mechanism."""
        m = self.per_round
        return {
            "statement": self.statement,
            "noise_multiplier": None if m is None else m.noise_multiplier,
            "sampling_rate": None if m is None else m.sampling_rate,
            "steps_per_round": None if m is None else m.steps,
        }


def plan_privacy(job: Job) -> PrivacyPlan:
    """Calibrate (or account for) the run's DP-SGD before training.

    Raises
    ------
    PrivacyError
        The target ε cannot be reached (the message names the smallest reachable ε).
    """
    cfg = job.config.privacy
    if cfg.client_level is not None:
        return _plan_client_level(job)
    dp = cfg.sample_level
    if dp is None:
        return PrivacyPlan(None, None, None, None)
    sizes = np.array([len(ix) for ix in job.data.client_indices])
    t = job.training
    if dp.epsilon is not None:
        sigma, eps = calibrate_sample_level(
            sizes, t.batch_size, t.local_epochs, job.rounds, dp.epsilon, dp.delta, cfg.accountant
        )
    else:
        assert dp.noise_multiplier is not None
        sigma = dp.noise_multiplier
        eps = sample_level_epsilon(
            sizes, t.batch_size, t.local_epochs, job.rounds, sigma, dp.delta, cfg.accountant
        )
    source = NoiseSource(cfg.secure_noise, job.seed, "dpsgd")
    per_round = max(
        record_mechanisms(sizes, t.batch_size, t.local_epochs, 1, sigma).values(),
        key=lambda m: epsilon([m], dp.delta, "rdp", coarse=True),
    )
    statement = (
        f"sample-level DP-SGD: every record's influence is clipped to norm {dp.max_grad_norm:g} "
        f"and Gaussian noise (multiplier {sigma:.3f}) is added at every local step; "
        f"(ε = {eps:.3g}, δ = {dp.delta:g}) per record under {cfg.accountant.upper()} accounting "
        "of Poisson-sampled batches, counting every round for every client"
    )
    return PrivacyPlan(
        DPSGD(dp.max_grad_norm, sigma, source), eps, dp.delta, statement, None, per_round
    )


def _plan_client_level(job: Job) -> PrivacyPlan:
    cfg = job.config.privacy
    dp = cfg.client_level
    assert dp is not None
    n = job.data.num_clients
    rate = job.clients_per_round / n
    template = SampledGaussian(1.0, job.rounds, "poisson", rate)
    if dp.epsilon is not None:
        z = calibrate_noise_multiplier(dp.epsilon, dp.delta, template, cfg.accountant)
    else:
        assert dp.noise_multiplier is not None
        z = dp.noise_multiplier
    eps = epsilon([SampledGaussian(z, job.rounds, "poisson", rate)], dp.delta, cfg.accountant)
    adaptive = (
        AdaptiveClipping(
            dp.adaptive.target_quantile, dp.adaptive.learning_rate, dp.adaptive.count_noise
        )
        if dp.adaptive is not None
        else None
    )
    try:
        mech = ClientLevelDP(
            dp.clip_norm,
            z,
            job.clients_per_round,
            NoiseSource(cfg.secure_noise, job.seed, "client-dp"),
            adaptive,
        )
    except ValueError as exc:
        raise ConfigError(f"privacy.client_level: {exc}") from None
    clipping = (
        f"an adaptive clip norm (starting at {dp.clip_norm:g}, tracking the "
        f"{dp.adaptive.target_quantile:g} quantile of update norms)"
        if dp.adaptive is not None
        else f"clip norm {dp.clip_norm:g}"
    )
    statement = (
        f"client-level DP-FedAvg: clients joined each round by Poisson sampling (rate {rate:.3g}); "
        f"each client's whole update was clipped ({clipping}) and the server added Gaussian "
        f"noise (multiplier {z:.3f}) to the sum; (ε = {eps:.3g}, δ = {dp.delta:g}) per client "
        f"over {job.rounds} rounds under {cfg.accountant.upper()} accounting"
    )
    return PrivacyPlan(None, eps, dp.delta, statement, mech, SampledGaussian(z, 1, "poisson", rate))


def load_run_model(run_dir: str | Path) -> tuple[MultimodalModel, RunConfig]:
    """Rebuild a finished run's model from its directory (``config.yaml``, ``model.safetensors``).

    Reads local files only.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise ConfigError(f"{run_dir}: no model.safetensors; is this a finished run's directory?")
    config = load_config(run_dir / "config.yaml")
    train, _, _, _ = load_data(config)
    model = model_for(config, train)
    model.load_state_dict(load_file(str(weights)))
    return model, config


def ledger_dataset(config: RunConfig) -> str:
    """The ledger's name for a run's data set (a manifest is named by its file)."""
    ds = config.dataset
    return f"manifest:{ds.path}" if ds.name == "manifest" else ds.name


def _close_ledger_run(config: RunConfig, run_id: str) -> None:
    # A failed run keeps what its completed rounds were charged; only its reservation goes.
    if config.privacy.sample_level is None and config.privacy.client_level is None:
        return
    # If even that fails, the run stays "running" and the next admission after this process
    # exits marks it interrupted; the original error is the one to report.
    with contextlib.suppress(MMShieldError):
        PrivacyLedger(config.privacy.ledger).close_run(run_id, "failed")


def simulate_job(
    job: Job,
    *,
    progress: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    privacy: PrivacyPlan | None = None,
) -> SimulationResult:
    """Train ``job`` in the simulator its config selects (synchronous, or FedBuff's)."""
    config = job.config
    privacy = privacy or plan_privacy(job)
    srv = config.server
    server = make_server_optimizer(
        srv.strategy,
        lr=srv.lr,
        momentum=srv.momentum,
        beta_1=srv.beta_1,
        beta_2=srv.beta_2,
        tau=srv.tau,
    )
    common: dict[str, Any] = {
        "training": job.training,
        "seed": job.seed,
        "server": server,
        "systems": systems_profile(config.systems),
        "quality": job.quality,
        "device": config.simulation.device,
        "cohort_size": config.simulation.cohort_size,
        "eval_every": config.training.eval_every,
        "progress": progress,
        "on_round": on_round,
    }
    if srv.strategy == "fedbuff":
        if privacy.mechanism is not None:
            raise ConfigError("privacy.sample_level is not supported with server.strategy fedbuff")
        return simulate_buffered(
            job.model,
            job.data,
            updates=job.rounds,
            concurrency=job.clients_per_round,
            buffer_size=srv.buffer_size,
            staleness_exponent=srv.staleness_exponent,
            **common,
        )
    return simulate(
        job.model,
        job.data,
        rounds=job.rounds,
        clients_per_round=job.clients_per_round,
        scaffold=srv.strategy == "scaffold",
        private=privacy.mechanism,
        client_dp=privacy.client_dp,
        **common,
    )


def systems_profile(config: SystemsConfig | None) -> SystemsProfile | None:
    """The simulator's systems profile for a ``systems:`` config block (``None``: ideal)."""
    if config is None:
        return None

    def dist(d: DistributionConfig) -> Distribution:
        return Distribution(**d.model_dump())

    return SystemsProfile(
        speed=dist(config.speed),
        step_seconds=config.step_seconds,
        bandwidth_mbps=config.bandwidth_mbps,
        availability=dist(config.availability),
        dropout=config.dropout,
        stragglers=config.stragglers,
        deadline=config.deadline,
        partial_work=config.partial_work,
    )


def partition_summary(job: Job) -> dict[str, Any]:
    """Who holds what: the data behind the report's heat maps."""
    train = job.data.train
    counts = label_counts(train.labels.numpy(), job.data.client_indices, train.num_classes)
    return {
        "classes": train.classes,
        "modalities": train.modalities,
        "label_counts": counts.tolist(),
        "modality_counts": {
            m: [int(train.present[m][torch.as_tensor(ix)].sum()) for ix in job.data.client_indices]
            for m in train.modalities
        },
        "client_sizes": [len(ix) for ix in job.data.client_indices],
        "rescued_clients": job.rescued_clients,
    }


def run(
    config: RunConfig,
    *,
    store_path: str | Path = "runs/mmshield.db",
    progress: bool = False,
) -> RunOutcome:
    """Train, evaluate, store and report one run.

    Parameters
    ----------
    config
        A validated run configuration.
    store_path
        SQLite run store; the run's directory is created beside it.
    progress
        Show a progress bar.

    Returns
    -------
    RunOutcome
    """
    from mmshield.report.html import render_report
    from mmshield.report.store import RunStore

    if config.simulation.threads:
        torch.set_num_threads(config.simulation.threads)
    store = RunStore(store_path)
    info = store.create_run(config.model_dump(mode="json"), config.dataset.name)
    start = time.perf_counter()
    try:
        job = build_job(config)
        (info.run_dir / "partition.json").write_text(json.dumps(partition_summary(job)))

        clock = [0.0]

        def log(record: RoundRecord) -> None:
            metrics = {
                "train_loss": record.train_loss,
                "round_seconds": record.seconds,
                "clients": float(record.clients),
            }
            if record.simulated_seconds is not None:
                clock[0] += record.simulated_seconds
                metrics |= {
                    "simulated_seconds": clock[0],
                    "dropped": float(record.dropped),
                    "partial": float(record.partial),
                }
            if record.test_accuracy is not None and record.test_loss is not None:
                metrics |= {"test_accuracy": record.test_accuracy, "test_loss": record.test_loss}
            if ledger is not None and privacy.delta is not None:
                spent = privacy.epsilon_after(record.round, job.rounds)
                ledger.charge(info.run_id, record.round, spent, privacy.delta)
                metrics["epsilon"] = spent
            store.log_round(info.run_id, record.round, metrics)

        privacy = plan_privacy(job)  # refuses an unreachable ε before any training
        ledger = None
        if privacy.epsilon is not None and privacy.delta is not None:
            ledger = PrivacyLedger(config.privacy.ledger)
            ledger.admit(
                info.run_id,
                ledger_dataset(config),
                job.data.train.modalities,
                privacy.epsilon,
                privacy.delta,
                privacy.mechanism_record(),
            )
        result = simulate_job(job, progress=progress, on_round=log, privacy=privacy)
        test_loss, accuracy = evaluate(result.model, job.data.test)
        by_modalities = accuracy_by_modalities(result.model, job.data.test)
        model_path = info.run_dir / "model.safetensors"
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()},
            str(model_path),
        )
        store.add_artefact(info.run_id, "model", model_path)
        summary: dict[str, Any] = {
            "run_id": info.run_id,
            "name": config.name,
            "dataset": config.dataset.name,
            "clients": job.data.num_clients,
            "clients_per_round": job.clients_per_round,
            "strategy": config.server.strategy,
            "rounds": job.rounds,
            "accuracy": accuracy,
            "test_loss": test_loss,
            "accuracy_by_modalities": by_modalities,
            "epsilon": privacy.epsilon,
            "delta": privacy.delta,
            "wall_seconds": time.perf_counter() - start,
            "training_seconds": result.wall_seconds,
            "simulated_seconds": result.simulated_seconds,
            "client_updates": sum(r.clients for r in result.history),
            "dropped_clients": sum(r.dropped for r in result.history),
            "partial_clients": sum(r.partial for r in result.history),
            "bytes_up": result.bytes_up,
            "bytes_down": result.bytes_down,
            "cohort_size": result.cohort_size,
            "seed": config.seed,
            "protections": [
                "federated learning: raw records never left their client",
                *([privacy.statement] if privacy.statement else []),
            ],
            "notes": job.notes,
            "mmshield_version": __version__,
        }
        store.finish_run(info.run_id, summary)
        if ledger is not None:
            ledger.close_run(info.run_id, "finished")
        report_path = render_report(store, info.run_id)
        store.add_artefact(info.run_id, "report", report_path)
        return RunOutcome(info.run_id, info.run_dir, summary, report_path)
    except MMShieldError as exc:
        _close_ledger_run(config, info.run_id)
        store.fail_run(info.run_id, str(exc))
        raise
    except Exception as exc:  # an unexpected bug: record it, then let it surface
        _close_ledger_run(config, info.run_id)
        store.fail_run(info.run_id, "".join(traceback.format_exception(exc)))
        raise
