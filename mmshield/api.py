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
import dataclasses
import fnmatch
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
from mmshield.crypto.ckks import COEFF_MOD_BIT_SIZES, POLY_MODULUS_DEGREE
from mmshield.data.dataset import FederatedDataset, MultimodalDataset
from mmshield.data.partition import (
    dirichlet_partition,
    drop_modalities,
    iid_partition,
    label_counts,
    quantity_skew_partition,
)
from mmshield.errors import ConfigError, EncryptionError, MMShieldError, PrivacyError
from mmshield.fl.aggregate import ClientQuality
from mmshield.fl.client import LocalTraining
from mmshield.fl.evaluate import accuracy_by_modalities, evaluate
from mmshield.fl.strategy import make_server_optimizer
from mmshield.models.model import MultimodalModel, build_model
from mmshield.privacy.accountant import SampledGaussian, calibrate_noise_multiplier, epsilon
from mmshield.privacy.client_dp import (
    AdaptiveClipping,
    ClientLevelDP,
    ReleaseAccount,
    client_level_statement,
    client_level_summary,
    gaussian_epsilon,
)
from mmshield.privacy.distributed_dp import (
    SkellamFedAvg,
    default_max_participation,
    skellam_statement,
)
from mmshield.privacy.dpsgd import DPSGD, record_releases
from mmshield.privacy.ledger import PrivacyLedger
from mmshield.privacy.noise import NoiseSource
from mmshield.privacy.planner import PhaseNeeds, modality_epsilon, plan_phase_noise
from mmshield.privacy.planner import candidates as planner_candidates
from mmshield.privacy.skellam import DistributedSkellam, SkellamAccount
from mmshield.runtime.asynchronous import simulate_buffered
from mmshield.runtime.encrypted_sum import EncryptedRound, EncryptedSum
from mmshield.runtime.secure_sum import SecureRound, SecureSum
from mmshield.runtime.simulation import RoundRecord, SimulationResult, simulate
from mmshield.runtime.systems import Distribution, SystemsProfile

__all__ = ["Job", "RunOutcome", "build_job", "load_config", "run"]


@dataclass(frozen=True)
class Phase:
    """One training phase of a job, resolved against its data and model.

    ``data`` is the phase's view of the federation: the modalities it does not read are absent
    (masked and zeroed, so nothing of them reaches the model) and records holding none of its
    modalities sit the phase out.
    """

    name: str
    rounds: int
    modalities: tuple[str, ...]
    trainable: frozenset[str] | None
    """Parameter names trained in this phase (``None``: all)."""
    data: FederatedDataset

    def client_sizes(self) -> np.ndarray:
        """Records each client trains on in this phase."""
        return np.array([len(ix) for ix in self.data.client_indices], dtype=np.int64)


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
    phases: list[Phase] = field(default_factory=list)
    """The training phases in order (one phase reading everything when none is configured)."""


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
        resolve_phases(config, data, model),
    )


def resolve_phases(
    config: RunConfig, data: FederatedDataset, model: MultimodalModel
) -> list[Phase]:
    """The config's training phases checked against the data's modalities and the model.

    Raises
    ------
    ConfigError
        A phase names a modality the data lacks, or a parameter pattern that matches nothing.
    """
    modalities = tuple(data.train.modalities)
    if config.training.phases is None:
        return [Phase("training", config.training.rounds, modalities, None, data)]
    names = [n for n, _ in model.named_parameters()]
    phases = []
    for i, ph in enumerate(config.training.phases):
        where = f"training.phases[{i}] ({ph.name!r})"
        reads = tuple(ph.modalities) if ph.modalities is not None else modalities
        unknown = sorted(set(reads) - set(modalities))
        if unknown:
            raise ConfigError(
                f"{where}.modalities: {unknown} not in the data set; it has {list(modalities)}"
            )
        patterns = ph.trainable
        if patterns is None:
            patterns = [f"encoders.{m}.*" for m in reads] + ["fusion.*", "head.*"]
        else:
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    groups = sorted({".".join(n.split(".")[:2]) + ".*" for n in names})
                    raise ConfigError(
                        f"{where}.trainable: {pattern!r} matches no parameter; parameter "
                        f"groups are {groups}"
                    )
        chosen = frozenset(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
        trainable = None if len(chosen) == len(names) else chosen
        phases.append(Phase(ph.name, ph.rounds, reads, trainable, _phase_view(data, reads)))
    return phases


def _phase_view(data: FederatedDataset, reads: tuple[str, ...]) -> FederatedDataset:
    train = data.train
    if set(reads) == set(train.modalities):
        return data
    present = {m: (p if m in reads else torch.zeros_like(p)) for m, p in train.present.items()}
    inputs = {m: (x if m in reads else torch.zeros_like(x)) for m, x in train.inputs.items()}
    holds_one = torch.zeros(len(train), dtype=torch.bool)
    for m in reads:
        holds_one |= train.present[m].bool().cpu()
    keep = holds_one.numpy()
    view = dataclasses.replace(train, inputs=inputs, present=present)
    return FederatedDataset(
        train=view,
        client_indices=[ix[keep[ix]] for ix in data.client_indices],
        test=data.test,
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
    phase_mechanisms: list[DPSGD] | None = None
    """Sample-level DP: one DP-SGD per training phase (each with its own noise)."""
    phase_needs: list[PhaseNeeds] | None = None
    epsilon_by_modality: dict[str, float] | None = None
    """Sample-level DP: each modality's ε (the phases that read it, composed)."""
    phase_split: list[dict[str, Any]] = field(default_factory=list)
    """Per phase: name, rounds, modalities, noise multiplier and the modality that set it."""
    worst_clients: dict[str, list[int]] = field(default_factory=dict)
    """Per modality, the least protected clients (ranked once, when the run is planned)."""
    distributed_dp: SkellamFedAvg | None = None
    """Client-level DP with distributed Skellam noise under secure aggregation."""

    def epsilon_by_modality_after(self, rounds: int) -> dict[str, float] | None:
        """Each modality's cumulative ε after ``rounds`` rounds (sample-level DP).

        Completed phases count whole and the current one for its rounds so far; a fast RDP upper
        bound, capped by (and at the end equal to) the plan's exact figure.
        """
        needs, plan = self.phase_needs, self.epsilon_by_modality
        if needs is None or plan is None or self.delta is None:
            return None
        if rounds >= sum(int(p["rounds"]) for p in self.phase_split):
            return dict(plan)
        partial, left = [], rounds
        for need, split in zip(needs, self.phase_split, strict=True):
            done = min(left, int(split["rounds"]))
            left -= done
            fraction = done / int(split["rounds"])
            partial.append(
                PhaseNeeds(
                    need.name,
                    need.modalities,
                    [
                        None
                        if m is None or done == 0
                        else dataclasses.replace(m, steps=round(m.steps * fraction))
                        for m in need.releases
                    ],
                )
            )
        sigmas = [float(p["noise_multiplier"]) for p in self.phase_split]
        return {
            m: min(
                e,
                modality_epsilon(
                    partial,
                    sigmas,
                    m,
                    self.delta,
                    "rdp",
                    self.worst_clients[m],
                    coarse=True,
                ),
            )
            for m, e in plan.items()
        }

    def epsilon_after(self, rounds: int, total_rounds: int) -> float:
        """Cumulative ε after ``rounds`` rounds: a fast RDP upper bound, the plan at the end.

        Client-level DP with distributed or local noise: what its releases actually spent.
        """
        if self.client_dp is not None and self.client_dp.account is not None:
            return self.client_dp.account.spent
        if self.distributed_dp is not None:
            return self.distributed_dp.account.spent
        if self.phase_needs is not None:
            by_modality = self.epsilon_by_modality_after(rounds)
            return max(by_modality.values(), default=0.0) if by_modality else 0.0
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
            "noise_placement": (
                "distributed (Skellam, secure aggregation)"
                if self.distributed_dp is not None
                else None
                if self.client_dp is None
                else self.client_dp.placement
            ),
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
    t = job.training
    needs = [
        PhaseNeeds(
            ph.name,
            frozenset(ph.modalities),
            record_releases(ph.client_sizes(), t.batch_size, t.local_epochs, ph.rounds),
        )
        for ph in job.phases
    ]
    read = sorted({m for ph in job.phases for m in ph.modalities})
    if not any(r is not None for need in needs for r in need.releases):
        raise PrivacyError("no client holds any record: nothing to train with DP-SGD")
    if dp.epsilon is not None:
        budgets = (
            dict(dp.epsilon)
            if isinstance(dp.epsilon, dict)
            else {m: float(dp.epsilon) for m in read}
        )
        plan = plan_phase_noise(needs, budgets, dp.delta, cfg.accountant)
        sigmas, by_modality, setters, least_protected = (
            list(plan.noise_multipliers),
            plan.epsilon_by_modality,
            list(plan.bottleneck),
            plan.worst_clients,
        )
    else:
        assert dp.noise_multiplier is not None
        sigmas = [dp.noise_multiplier] * len(needs)
        setters = ["fixed"] * len(needs)
        least_protected = {m: planner_candidates(needs, m, dp.delta) for m in read}
        by_modality = {
            m: modality_epsilon(needs, sigmas, m, dp.delta, cfg.accountant, least_protected[m])
            for m in read
        }
    eps = max(by_modality.values())
    source = NoiseSource(cfg.secure_noise, job.seed, "dpsgd")
    mechanisms = [DPSGD(dp.max_grad_norm, s, source) for s in sigmas]
    # The ledger's record describes the first phase's worst-off client for one round.
    first = [m for m in needs[0].releases if m is not None] or [SampledGaussian(1.0, 0)]
    worst = max(first, key=lambda m: epsilon([m], dp.delta, "rdp", coarse=True))
    per_round = dataclasses.replace(
        worst, noise_multiplier=sigmas[0], steps=worst.steps // max(job.phases[0].rounds, 1)
    )
    split = [
        {
            "phase": ph.name,
            "rounds": ph.rounds,
            "modalities": list(ph.modalities),
            "noise_multiplier": s,
            "set_by": who,
        }
        for ph, s, who in zip(job.phases, sigmas, setters, strict=True)
    ]
    if len(job.phases) == 1:
        noise = f"Gaussian noise (multiplier {sigmas[0]:.3f}) is added at every local step"
    else:
        noise = "Gaussian noise is added at every local step, per phase: " + "; ".join(
            f"{ph.name} ({', '.join(ph.modalities)}, {ph.rounds} rounds) multiplier {s:.3f}"
            for ph, s in zip(job.phases, sigmas, strict=True)
        )
    per_mod = ", ".join(f"{m} {e:.3g}" for m, e in sorted(by_modality.items()))
    statement = (
        f"sample-level DP-SGD: every record's influence is clipped to norm {dp.max_grad_norm:g} "
        f"and {noise}; (ε = {eps:.3g}, δ = {dp.delta:g}) per record under "
        f"{cfg.accountant.upper()} accounting of Poisson-sampled batches, counting every round "
        f"for every client; ε by modality: {per_mod} (a phase is charged to the modalities it "
        "reads; a record's label counts with each of them)"
    )
    return PrivacyPlan(
        mechanisms[0],
        eps,
        dp.delta,
        statement,
        None,
        per_round,
        phase_mechanisms=mechanisms,
        phase_needs=needs,
        epsilon_by_modality=by_modality,
        phase_split=split,
        worst_clients=least_protected,
    )


def _plan_client_level(job: Job) -> PrivacyPlan:
    """Plan client-level DP-FedAvg for the noise placement the config chooses.

    Central: the server adds ``z`` every round; the plan's ε is what the run spends. Local: the
    server sees each update, so no amplification by sampling; the plan is the worst case (a
    client in every round) and the run is charged for the worst-off client's real count.
    Distributed: each client adds a share sized for ``ρ m`` reports (``ρ``:
    ``reporting_fraction``, the safety factor); the plan's ε (the budget the ledger reserves)
    is that of ``z`` every round, and each round is charged for the multiplier
    ``z sqrt(k / (ρ m))`` of the ``k`` shares that actually reached the sum: more reports
    credit more noise, fewer cost more, and a round that would take the run past its budget is
    refused before it is released (:class:`~mmshield.privacy.client_dp.ReleaseAccount`).
    """
    cfg = job.config.privacy
    dp = cfg.client_level
    assert dp is not None
    if job.config.secure_aggregation is not None:
        return _plan_skellam(job)
    n = job.data.num_clients
    rate = job.clients_per_round / n
    local = dp.noise == "local"
    template = (
        SampledGaussian(1.0, job.rounds, "none")
        if local
        else SampledGaussian(1.0, job.rounds, "poisson", rate)
    )
    if dp.epsilon is not None:
        z = calibrate_noise_multiplier(dp.epsilon, dp.delta, template, cfg.accountant)
    else:
        assert dp.noise_multiplier is not None
        z = dp.noise_multiplier
    if dp.noise == "central":
        eps = epsilon([SampledGaussian(z, job.rounds, "poisson", rate)], dp.delta, cfg.accountant)
    elif local:
        eps = gaussian_epsilon(z / job.rounds**0.5, dp.delta)
    else:
        # On the account's grid, so that a run whose every round carries exactly the planned
        # noise spends exactly its budget.
        eps = epsilon(
            [SampledGaussian(z, job.rounds, "poisson", rate)], dp.delta, cfg.accountant, True
        )
    adaptive = (
        AdaptiveClipping(
            dp.adaptive.target_quantile, dp.adaptive.learning_rate, dp.adaptive.count_noise
        )
        if dp.adaptive is not None
        else None
    )
    distributed = dp.noise == "distributed"
    central = dp.noise == "central"
    account = None if central else ReleaseAccount(dp.delta, eps, rate, cfg.accountant)
    try:
        mech = ClientLevelDP(
            dp.clip_norm,
            z,
            job.clients_per_round,
            NoiseSource(cfg.secure_noise, job.seed, "client-dp"),
            adaptive,
            placement=dp.noise,
            noise_shares=dp.reporting_fraction * job.clients_per_round if distributed else None,
            client_source=NoiseSource(cfg.secure_noise, job.seed, "client-dp-clients"),
            account=account,
        )
    except ValueError as exc:
        raise ConfigError(f"privacy.client_level: {exc}") from None
    statement = client_level_statement(mech, rate, job.rounds, eps, dp.delta, cfg.accountant)
    per_round = SampledGaussian(z, 1, "none") if local else SampledGaussian(z, 1, "poisson", rate)
    return PrivacyPlan(None, eps, dp.delta, statement, mech, per_round)


def _plan_skellam(job: Job) -> PrivacyPlan:
    """Plan client-level DP with distributed Skellam noise inside the secure sum.

    ``μ`` is calibrated (Skellam RDP, no amplification by sampling: the server knows who took
    part) so that a client taking part in ``P`` rounds with every planned share present spends
    the target ε; the fixed-point scale is the largest power of two for which the sum of
    ``clients_per_round`` encodings fits the secure sum's ring.
    """
    cfg, sa = job.config.privacy, job.config.secure_aggregation
    dp = cfg.client_level
    assert dp is not None and dp.epsilon is not None and sa is not None
    m = job.clients_per_round
    cap = dp.max_participation or default_max_participation(job.rounds, m, job.data.num_clients)
    dim = sum(p.numel() for p in job.model.parameters())
    try:
        mech = DistributedSkellam.for_target(
            dp.epsilon,
            dp.delta,
            rounds=cap,
            dim=dim,
            clip=dp.clip_norm,
            noise_shares=dp.reporting_fraction * m,
            bits=sa.bits,
            max_clients=m,
        )
    except PrivacyError as exc:
        raise ConfigError(f"privacy.client_level with secure_aggregation: {exc}") from None
    eps = mech.epsilon_for(cap, None, dp.delta)
    fedavg = SkellamFedAvg(
        mech,
        m,
        SkellamAccount(dp.delta, eps, mech.l1, mech.l2),
        client_source=NoiseSource(cfg.secure_noise, job.seed, "skellam-clients"),
        seed_source=NoiseSource(cfg.secure_noise, job.seed, "skellam-rotation"),
        collusion=sa.collusion,
        max_participation=cap,
    )
    statement = skellam_statement(fedavg, job.rounds, eps)
    return PrivacyPlan(None, eps, dp.delta, statement, distributed_dp=fedavg)


def finish_client_level(privacy: PrivacyPlan, job: Job) -> dict[str, Any]:
    """After a client-level DP run: restate its guarantee with what it spent; summary fields."""
    if privacy.distributed_dp is not None and privacy.epsilon is not None:
        fedavg = privacy.distributed_dp
        privacy.statement = skellam_statement(fedavg, job.rounds, privacy.epsilon)
        return {
            "noise_placement": "distributed",
            "epsilon": fedavg.account.spent,
            "epsilon_budget": privacy.epsilon,
            "distributed_dp": fedavg.summary(),
        }
    mech, cfg = privacy.client_dp, job.config.privacy
    if mech is None or privacy.epsilon is None or privacy.delta is None:
        return {}
    rate = job.clients_per_round / job.data.num_clients
    privacy.statement = client_level_statement(
        mech, rate, job.rounds, privacy.epsilon, privacy.delta, cfg.accountant
    )
    return client_level_summary(mech, privacy.epsilon, privacy.delta)


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
    secure = None
    if config.secure_aggregation is not None:
        sa = config.secure_aggregation
        secure = SecureSum(
            sa.protocol, sa.bits, sa.clip_range, sa.dropout, sa.collusion, sa.failure_bits
        )
        # Overflow or intolerable dropout: refuse up front. (Under distributed DP the clients
        # encode for the ring themselves; DistributedSkellam sized it when the run was planned.)
        if privacy.distributed_dp is None:
            secure.check(job.clients_per_round)
        else:
            secure.parameters(job.clients_per_round)
    encrypted = None
    if config.encryption is not None:
        enc = config.encryption
        try:
            encrypted = EncryptedSum(
                job.clients_per_round, enc.clip_range, enc.max_bytes_per_param, enc.key_holder
            )
        except EncryptionError as exc:
            raise ConfigError(f"encryption: {exc}") from None
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
        "secure": secure,
        "encrypted": encrypted,
    }
    if srv.strategy == "fedbuff":
        common.pop("secure")  # refused with FedBuff by the config
        common.pop("encrypted")
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
    if len(job.phases) == 1 and job.phases[0].trainable is None:
        return simulate(
            job.model,
            job.data,
            rounds=job.rounds,
            clients_per_round=job.clients_per_round,
            scaffold=srv.strategy == "scaffold",
            private=privacy.mechanism,
            client_dp=privacy.client_dp,
            distributed_dp=privacy.distributed_dp,
            **common,
        )
    # Phases run one after the other on the same model and server optimiser; round numbers
    # continue across them.
    model, first, history, wall, cohort = job.model, 1, [], 0.0, 0
    mechanisms: list[DPSGD | None] = (
        list(privacy.phase_mechanisms)
        if privacy.phase_mechanisms
        else [privacy.mechanism] * len(job.phases)
    )
    for phase, mechanism in zip(job.phases, mechanisms, strict=True):
        part = simulate(
            model,
            phase.data,
            rounds=phase.rounds,
            clients_per_round=job.clients_per_round,
            private=mechanism,
            trainable=phase.trainable,
            first_round=first,
            **common,
        )
        for record in part.history:
            record.phase = phase.name
        model, first = part.model, first + phase.rounds
        history += part.history
        wall += part.wall_seconds
        cohort = max(cohort, part.cohort_size)
    return SimulationResult(model=model, history=history, wall_seconds=wall, cohort_size=cohort)


def _secure_summary(config: RunConfig, rounds: list[SecureRound]) -> dict[str, Any] | None:
    sa = config.secure_aggregation
    if sa is None:
        return None
    return {
        "protocol": sa.protocol,
        "bits": sa.bits,
        "clip_range": sa.clip_range,
        "tolerated_dropout": sa.dropout,
        "tolerated_collusion": sa.collusion,
        "rounds": len(rounds),
        "clients_per_round": [r.invited for r in rounds],
        "k": [r.k for r in rounds],
        "t": [r.t for r in rounds],
        "dropped_per_round": [r.dropped for r in rounds],
        "clipped_values": sum(r.clipped_values for r in rounds),
        "protocol_seconds": sum(r.seconds for r in rounds),
        "failed_rounds": [r.failure for r in rounds if r.failure is not None],
    }


def _secure_statement(config: RunConfig, rounds: list[SecureRound]) -> str:
    sa = config.secure_aggregation
    assert sa is not None
    name = "SecAgg+ (sparse neighbour graph)" if sa.protocol == "secagg+" else "SecAgg"
    ks = sorted({r.k for r in rounds})
    ts = sorted({r.t for r in rounds})
    dropped = sum(r.dropped for r in rounds if r.failure is None)
    clipped = sum(r.clipped_values for r in rounds)
    failed = sum(r.failure is not None for r in rounds)
    return (
        f"secure aggregation: {name} in every round ({len(rounds)} rounds, k = "
        f"{'/'.join(map(str, ks)) or '-'} neighbours, threshold t = "
        f"{'/'.join(map(str, ts)) or '-'}; X25519, AES-GCM shares, AES-CTR masks, "
        f"{sa.bits}-bit sums): the server saw only each round's sum of updates; "
        f"{dropped} client dropout(s) recovered"
        + (f", {failed} round(s) released nothing (too many dropouts)" if failed else "")
        + f"; {clipped} update value(s) outside "
        f"±{sa.clip_range:g} clipped before encoding; tolerates dropout {sa.dropout:g} and a "
        f"colluding fraction {sa.collusion:g}"
    )


def _encryption_summary(config: RunConfig, rounds: list[EncryptedRound]) -> dict[str, Any] | None:
    enc = config.encryption
    if enc is None:
        return None
    cipher = sum(r.ciphertext_bytes for r in rounds)
    plain = sum(r.plaintext_bytes for r in rounds)
    return {
        "scheme": "BFV (Microsoft SEAL via TenSEAL)",
        "key_holder": enc.key_holder,
        "clip_range": enc.clip_range,
        "rounds": len(rounds),
        "clients_per_round": [r.clients for r in rounds],
        "ciphertext_bytes_up": cipher,
        "plaintext_bytes_up": plain,
        "bytes_per_value": 4 * cipher / plain if plain else None,
        "clipped_values": sum(r.clipped_values for r in rounds),
        "encryption_seconds": sum(r.seconds for r in rounds),
    }


def _encryption_statement(config: RunConfig, rounds: list[EncryptedRound]) -> str:
    enc = config.encryption
    assert enc is not None
    cipher = sum(r.ciphertext_bytes for r in rounds)
    plain = sum(r.plaintext_bytes for r in rounds)
    clipped = sum(r.clipped_values for r in rounds)
    trust = (
        "the designated key holder (one client) must not collude with the server"
        if enc.key_holder == "client"
        else "every client holds the shared secret key, so no client may collude with the server"
    )
    ratio = f", {4 * cipher / plain:.2f} bytes per value" if plain else ""
    return (
        "homomorphic encryption: every round's client contributions were encrypted (BFV on "
        f"Microsoft SEAL via TenSEAL, N = {POLY_MODULUS_DEGREE}, moduli "
        f"{list(COEFF_MOD_BIT_SIZES)}, 128-bit security) under the key holder's public key; the "
        "server only added ciphertexts and the key holder decrypted only the sum. "
        f"{cipher / 1e6:.1f} MB of ciphertext went up ({plain / 1e6:.1f} MB as float32 "
        f"plaintext{ratio}); {clipped} value(s) outside ±{enc.clip_range:g} clipped before "
        f"encryption. Trust: {trust}, and the server must follow the protocol "
        "(honest-but-curious)"
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
        secure_rounds: list[SecureRound] = []
        encrypted_rounds: list[EncryptedRound] = []

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
            if record.secure is not None:
                sec = record.secure
                metrics |= {
                    "secagg_invited": float(sec.invited),
                    "secagg_dropped": float(sec.dropped),
                    "secagg_k": float(sec.k),
                    "secagg_t": float(sec.t),
                    "secagg_clipped_values": float(sec.clipped_values),
                    "secagg_seconds": sec.seconds,
                    "secagg_failed": float(sec.failure is not None),
                }
                secure_rounds.append(sec)
            if record.encrypted is not None:
                he = record.encrypted
                metrics |= {
                    "he_ciphertext_bytes": float(he.ciphertext_bytes),
                    "he_plaintext_bytes": float(he.plaintext_bytes),
                    "he_clipped_values": float(he.clipped_values),
                    "he_seconds": he.seconds,
                }
                encrypted_rounds.append(he)
            skellam = privacy.distributed_dp
            if skellam is not None and skellam.history and record.clients > 0:
                metrics["effective_noise_multiplier"] = skellam.history[-1].effective_multiplier
            if ledger is not None and privacy.delta is not None:
                spent = privacy.epsilon_after(record.round, job.rounds)
                by_modality = privacy.epsilon_by_modality_after(record.round)
                ledger.charge(
                    info.run_id,
                    record.round,
                    spent if by_modality is None else by_modality,
                    privacy.delta,
                )
                metrics["epsilon"] = spent
                for m, e in (by_modality or {}).items():
                    metrics[f"epsilon/{m}"] = e
            store.log_round(info.run_id, record.round, metrics)

        privacy = plan_privacy(job)  # refuses an unreachable ε before any training
        ledger = None
        if privacy.epsilon is not None and privacy.delta is not None:
            ledger = PrivacyLedger(config.privacy.ledger)
            ledger.admit(
                info.run_id,
                ledger_dataset(config),
                job.data.train.modalities,
                privacy.epsilon_by_modality or privacy.epsilon,
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
        client_level_fields = finish_client_level(privacy, job)
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
            "accountant": None if privacy.epsilon is None else config.privacy.accountant,
            "privacy_unit": (
                None
                if privacy.epsilon is None
                else "client"
                if config.privacy.client_level is not None
                else "record"
            ),
            "epsilon_by_modality": privacy.epsilon_by_modality,
            "phases": [
                {
                    "phase": ph.name,
                    "rounds": ph.rounds,
                    "modalities": list(ph.modalities),
                    "trainable": None if ph.trainable is None else sorted(ph.trainable),
                }
                for ph in job.phases
            ],
            "privacy_split": privacy.phase_split,
            "secure_aggregation": _secure_summary(config, secure_rounds),
            "encryption": _encryption_summary(config, encrypted_rounds),
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
                *(
                    [_secure_statement(config, secure_rounds)]
                    if config.secure_aggregation is not None
                    else []
                ),
                *(
                    [_encryption_statement(config, encrypted_rounds)]
                    if config.encryption is not None
                    else []
                ),
            ],
            "notes": job.notes,
            "mmshield_version": __version__,
        }
        summary |= client_level_fields
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
