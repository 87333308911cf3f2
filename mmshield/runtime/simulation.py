"""The vectorised in-process simulator.

Each round samples clients, then trains them in cohorts: the cohort's parameters are stacked
along a leading client axis and one ``torch.func.vmap`` step trains every client of the cohort at
once (see :func:`mmshield.fl.client.train_stacked`). Cohort deltas stream into a modality-aware
weighted mean, so memory is bounded by the cohort size, not by the number of clients.

Determinism: one seed drives client sampling and every client's shuffling; the same seed and
cohort size give the same model bit for bit on the same machine, and another cohort size changes
only the order of floating-point sums.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mmshield.data.dataset import FederatedDataset, MultimodalDataset
from mmshield.errors import TrainingError
from mmshield.fl.aggregate import ClientQuality, ModalityAwareMean
from mmshield.fl.client import LocalTraining, batch_schedules, client_seeds, train_stacked
from mmshield.fl.evaluate import evaluate
from mmshield.fl.fedavg import FedAvg
from mmshield.fl.scaffold import Scaffold
from mmshield.fl.strategy import ServerOptimizer
from mmshield.models.model import MultimodalModel
from mmshield.privacy.client_dp import ClientLevelDP, poisson_clients
from mmshield.privacy.distributed_dp import SkellamFedAvg
from mmshield.privacy.dpsgd import DPSGD, poisson_schedules
from mmshield.runtime.encrypted_sum import EncryptedRound, EncryptedSum
from mmshield.runtime.secure_sum import SecureRound, SecureSum
from mmshield.runtime.systems import ClientSystems, SystemsProfile, steps_per_epoch

BYTES_PER_PARAMETER = 4  # float32 on the wire


@dataclass
class RoundRecord:
    """What happened in one round."""

    round: int
    clients: int
    train_loss: float
    test_loss: float | None
    test_accuracy: float | None
    seconds: float
    bytes_up: int
    bytes_down: int
    sampled: int = 0
    """Clients the server sampled (``clients`` of them contributed an update)."""
    dropped: int = 0
    """Sampled clients that dropped out."""
    partial: int = 0
    """Clients that did only part of their local work (stragglers, deadline)."""
    simulated_seconds: float | None = None
    """The round's duration on the simulated clock (``None`` without a systems profile)."""
    staleness: float | None = None
    """Asynchronous runs: mean server steps between a contributing client's start and its use."""
    phase: str | None = None
    """The training phase the round belongs to (runs with ``training.phases``)."""
    secure: SecureRound | None = None
    """What secure aggregation did this round (``None``: it was off, or fewer than 2 clients)."""
    encrypted: EncryptedRound | None = None
    """What encrypted aggregation did this round (``None``: it was off, or no client reported)."""


@dataclass
class SimulationResult:
    """Outcome of :func:`simulate`."""

    model: MultimodalModel
    history: list[RoundRecord] = field(default_factory=list)
    wall_seconds: float = 0.0
    cohort_size: int = 0

    @property
    def bytes_up(self) -> int:
        """Bytes clients would have uploaded in total."""
        return sum(r.bytes_up for r in self.history)

    @property
    def bytes_down(self) -> int:
        """Bytes the server would have sent in total."""
        return sum(r.bytes_down for r in self.history)

    @property
    def simulated_seconds(self) -> float | None:
        """Total simulated time (``None`` when the run had no systems profile)."""
        times = [r.simulated_seconds for r in self.history if r.simulated_seconds is not None]
        return float(sum(times)) if times else None


def sample_clients(
    num_clients: int, per_round: int, seed: int, round: int, online: np.ndarray | None = None
) -> np.ndarray:
    """Clients taking part in ``round``: uniform without replacement, sorted.

    With an ``online`` mask, only online clients can be sampled (all of them if fewer than
    ``per_round`` are online).
    """
    pool = np.arange(num_clients) if online is None else np.flatnonzero(online)
    if per_round >= len(pool):
        return pool
    rng = np.random.default_rng(np.random.SeedSequence([seed, round, 0xC11E]))
    return np.sort(rng.choice(pool, size=per_round, replace=False))


# On a CPU, one stacked copy of the cohort's parameters should stay near cache size: at 10,000
# clients of a 4,554-parameter MLP (a 180 MB copy) a round ran 1.6x slower than in cohorts of
# 500-2,000 (18-36 MB), because every SGD update and gather then streams from memory.
CPU_STACK_BYTES = 32 << 20
CPU_MIN_COHORT = 32


def auto_cohort_size(
    model: MultimodalModel,
    sample: MultimodalDataset,
    batch_size: int,
    budget_bytes: int = 2 << 30,
    device: torch.device | str = "cpu",
    per_sample_gradients: bool = False,
) -> int:
    """Largest cohort whose stacked training state and activations fit in ``budget_bytes``.

    The estimate counts parameters, gradients, momentum and a working copy per client, plus the
    outputs of every leaf module for one batch, three times over (forward, backward, temporaries).
    On a CPU the cohort is also capped so that one stacked copy of the parameters is at most
    :data:`CPU_STACK_BYTES` (but never below :data:`CPU_MIN_COHORT` clients). With
    ``per_sample_gradients`` (DP-SGD) each client also holds one gradient per batch record.
    """
    n_params = sum(p.numel() for p in model.parameters())
    activations = 0

    def hook(_m: torch.nn.Module, _i: object, out: object) -> None:
        nonlocal activations
        if isinstance(out, torch.Tensor):
            activations += out.numel()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            one = sample.subset([0])
            model(one.inputs, one.present)
    finally:
        for h in handles:
            h.remove()
    per_client = 4 * (4 * n_params + 3 * activations * batch_size)
    if per_sample_gradients:  # DP-SGD holds one gradient per record of the batch
        per_client += 4 * n_params * batch_size
    size = max(1, int(budget_bytes // max(per_client, 1)))
    if torch.device(device).type == "cpu":
        size = min(size, max(CPU_MIN_COHORT, CPU_STACK_BYTES // (4 * max(n_params, 1))))
    return size


def simulate(
    model: MultimodalModel,
    data: FederatedDataset,
    *,
    rounds: int,
    clients_per_round: int,
    training: LocalTraining,
    seed: int = 0,
    server: ServerOptimizer | None = None,
    scaffold: bool = False,
    systems: SystemsProfile | None = None,
    quality: ClientQuality | None = None,
    private: DPSGD | None = None,
    client_dp: ClientLevelDP | None = None,
    device: str = "cpu",
    cohort_size: int | None = None,
    eval_every: int = 1,
    progress: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
    trainable: Collection[str] | None = None,
    first_round: int = 1,
    secure: SecureSum | None = None,
    distributed_dp: SkellamFedAvg | None = None,
    encrypted: EncryptedSum | None = None,
) -> SimulationResult:
    """Run federated training of ``model`` over the clients of ``data``.

    Parameters
    ----------
    model
        Initial global model (not modified; the result holds the trained copy).
    data
        Training records split across clients, and the held-out test set.
    rounds
        Number of rounds.
    clients_per_round
        Clients sampled each round (uniformly, without replacement).
    training
        Local training settings.
    seed
        Drives client sampling and local shuffling.
    server
        Server optimiser (default plain FedAvg; see :mod:`mmshield.fl.strategy`).
    scaffold
        Correct client drift with SCAFFOLD's control variates (:mod:`mmshield.fl.scaffold`).
    systems
        Client speeds, availability, dropouts, stragglers and a round deadline on a simulated
        clock (:mod:`mmshield.runtime.systems`); ``None``: every client is always there and
        finishes its work.
    quality
        Per-client (and per-modality) quality scores multiplying the aggregation weights.
    private
        Sample-level DP-SGD in every client's local training (:mod:`mmshield.privacy.dpsgd`).
    client_dp
        Client-level DP-FedAvg (:mod:`mmshield.privacy.client_dp`): clients join by Poisson
        sampling at rate ``client_dp.expected_clients / num_clients`` (``clients_per_round`` is
        then only that expectation), updates are clipped and averaged uniformly; the noise is
        added by the server, or by the clients (distributed or local placement) before their
        updates leave them. A release the privacy budget cannot afford stops the run with a
        :class:`~mmshield.errors.PrivacyError` before anything of that round is released.
    device
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    cohort_size
        Clients trained together in one vectorised pass (default: as many as fit in 2 GB).
    eval_every
        Evaluate on the test set every this many rounds (and always after the last).
    progress
        Show a rich progress bar.
    on_round
        Called with each round's record (e.g. to write it to the run store).
    trainable
        Names of the parameters clients train, send and the server updates; the others stay
        frozen (``None``: all of them).
    first_round
        Number of the first round (a later training phase continues the numbering, which also
        keeps its sampling and shuffling seeds distinct).
    secure
        Secure aggregation (:mod:`mmshield.runtime.secure_sum`): every round's sum of weighted
        updates, weights and losses is computed by the SecAgg+ protocol; sampled clients that
        drop out go silent after sharing their keys.
    distributed_dp
        Client-level DP-FedAvg with distributed Skellam noise (needs ``secure``;
        :mod:`mmshield.privacy.distributed_dp`): ``clients_per_round`` clients are invited
        among those below the participation cap, each clips and encodes its whole update with
        its own noise share, the secure sum is decoded and divided by ``clients_per_round``.
        Each release is charged first; one the budget cannot afford stops the run with a
        :class:`~mmshield.errors.PrivacyError` before it is released. No training loss is
        released (it would carry no noise).
    encrypted
        Homomorphically encrypted aggregation (:mod:`mmshield.runtime.encrypted_sum`): every
        round's contributions (as for ``secure``) are encrypted by the clients, added as
        ciphertexts and only the sum is decrypted.

    Returns
    -------
    SimulationResult
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    server = server or FedAvg()
    start = time.perf_counter()
    global_model = copy.deepcopy(model).to(dev)
    trainer = CohortTrainer(global_model, data, training, seed, dev, quality, private)
    sizes = trainer.sizes
    if cohort_size is None:
        cohort_size = auto_cohort_size(
            global_model,
            trainer.train_set,
            training.batch_size,
            device=dev,
            per_sample_gradients=private is not None,
        )
    cohort_size = max(1, min(cohort_size, clients_per_round, data.num_clients))
    n_params = sum(
        p.numel()
        for name, p in global_model.named_parameters()
        if trainable is None or name in trainable
    )
    model_bytes = n_params * BYTES_PER_PARAMETER
    result = SimulationResult(model=global_model, cohort_size=cohort_size)
    population = (
        ClientSystems(systems, data.num_clients, seed, model_bytes) if systems is not None else None
    )
    per_epoch = steps_per_epoch(sizes, training.batch_size)
    # Under secure aggregation clients send weight/scale and weight/scale * delta, so every value
    # stays within the encoder's range when |delta| does (the largest client size is public).
    weight_scale = float(max(int(sizes.max(initial=1)), 1))
    controls = (
        Scaffold({k: v.detach() for k, v in global_model.named_parameters()}, data.num_clients)
        if scaffold
        else None
    )

    bar = progress_bar(progress)
    task = bar.add_task("training", total=rounds, status="") if bar else None
    try:
        if bar:
            bar.start()
        for rnd in range(first_round, first_round + rounds):
            t0 = time.perf_counter()
            online = population.online(rnd) if population is not None else None
            if client_dp is not None:
                rate = client_dp.expected_clients / data.num_clients
                sampled = poisson_clients(data.num_clients, rate, client_dp.source)
                if online is not None:
                    sampled = sampled[online[sampled]]
            elif distributed_dp is not None:
                allowed = distributed_dp.eligible(data.num_clients)
                if online is not None:
                    allowed &= online
                sampled = sample_clients(data.num_clients, clients_per_round, seed, rnd, allowed)
            else:
                sampled = sample_clients(data.num_clients, clients_per_round, seed, rnd, online)
            plan = (
                population.plan(rnd, sampled, per_epoch[sampled], training.local_epochs)
                if population is not None
                else None
            )
            chosen = sampled if plan is None else sampled[plan.contributes]
            max_steps = None if plan is None else plan.steps[plan.contributes]
            # Frozen parameters are read from the model itself by the trainer and never sent.
            global_params = {
                k: v.detach()
                for k, v in global_model.named_parameters()
                if trainable is None or k in trainable
            }
            acc = ModalityAwareMean(global_params)
            losses: list[torch.Tensor] = []
            protected: dict[int, np.ndarray] = {}
            # Public; the clients' updates do not depend on it (the ring check assumes so).
            round_seed = distributed_dp.round_seed() if distributed_dp is not None else 0
            clipped = 0
            for c0 in range(0, len(chosen), cohort_size):
                cohort = chosen[c0 : c0 + cohort_size]
                update = trainer.train(
                    global_params,
                    cohort,
                    rnd,
                    f"round {rnd}",
                    controls.correction(cohort.tolist()) if controls is not None else None,
                    None if max_steps is None else max_steps[c0 : c0 + cohort_size],
                )
                if controls is not None:
                    controls.add_cohort(
                        update.clients.tolist(),
                        global_params,
                        update.trained,
                        update.steps,
                        training.lr,
                        update.modality_examples,
                    )
                if client_dp is not None:
                    client_dp.add(update.deltas, update.clients)
                elif distributed_dp is not None:
                    inputs, n_clipped = distributed_dp.encode(
                        update.deltas, update.clients, round_seed
                    )
                    protected.update(inputs)
                    clipped += n_clipped
                    continue  # the training loss carries no noise: it is not released
                elif secure is not None or encrypted is not None:
                    protected.update(_contributions(update, weight_scale))
                else:
                    acc.add(update.deltas, update.examples, update.modality_examples)
                losses.append(update.loss)
            secure_round, dp_mean, encrypted_round = None, None, None
            if distributed_dp is not None:
                assert secure is not None
                silent = [int(c) for c in sampled if int(c) not in protected]
                ring = secure.sum_ring(protected, silent, f"round {rnd}", clipped)
                if ring is not None:
                    secure_round = ring[2]
                if ring is None or ring[0] is None:
                    chosen = chosen[:0]  # nothing released, nothing charged
                else:
                    chosen = np.asarray(ring[1], dtype=np.int64)
                    dp_mean = distributed_dp.release(
                        ring[0], ring[1], round_seed, global_params, f"round {rnd}", clipped
                    )
            elif encrypted is not None:
                summed = encrypted.sum(protected, f"round {rnd}")
                if summed is None:
                    chosen, losses = chosen[:0], []
                else:
                    enc_total, enc_included, encrypted_round = summed
                    chosen = np.asarray(enc_included, dtype=np.int64)
                    losses = [_add_secure_sum(acc, global_params, enc_total, len(enc_included))]
            elif secure is not None:
                out = secure.sum(
                    protected,
                    [int(c) for c in sampled if int(c) not in protected],
                    f"round {rnd}",
                )
                if out is not None:
                    secure_round = out[2]
                total = None if out is None else out[0]
                if out is None or total is None:
                    # Fewer than two clients, or too many dropouts: nothing is released.
                    chosen, losses = chosen[:0], []
                else:
                    included = out[1]
                    chosen = np.asarray(included, dtype=np.int64)
                    losses = [_add_secure_sum(acc, global_params, total, len(included))]
            # Under client-level DP every round releases a noisy mean, even an empty one.
            if len(chosen) or client_dp is not None:
                if controls is not None:
                    controls.finish_round(len(chosen))
                mean = (
                    dp_mean
                    if dp_mean is not None
                    else acc.mean()
                    if client_dp is None
                    else client_dp.noisy_mean(global_params)
                )
                new_params = server.step(global_params, mean, rnd)
                check_finite(new_params, f"round {rnd}")
                with torch.no_grad():
                    for name, p in global_model.named_parameters():
                        if name in new_params:
                            p.copy_(new_params[name])
            # A round in which no client reported leaves the model as it was; its record
            # (clients == 0, train_loss NaN) says so.
            train_loss = float(torch.cat(losses).mean()) if losses else float("nan")
            test_loss = test_acc = None
            if rnd % eval_every == 0 or rnd == first_round + rounds - 1:
                test_loss, test_acc = evaluate(global_model, data.test)
            record = RoundRecord(
                round=rnd,
                clients=len(chosen),
                train_loss=train_loss,
                test_loss=test_loss,
                test_accuracy=test_acc,
                seconds=time.perf_counter() - t0,
                bytes_up=(
                    secure_round.bytes_up
                    if secure_round is not None
                    else encrypted_round.ciphertext_bytes
                    if encrypted_round is not None
                    else len(chosen) * model_bytes
                ),
                bytes_down=len(sampled) * model_bytes
                + (0 if secure_round is None else secure_round.bytes_down),
                sampled=len(sampled),
                dropped=0 if plan is None else int(plan.dropped.sum()),
                partial=0 if plan is None else int(plan.partial.sum()),
                simulated_seconds=(
                    None if population is None or plan is None else population.round_seconds(plan)
                ),
                secure=secure_round,
                encrypted=encrypted_round,
            )
            result.history.append(record)
            if on_round is not None:
                on_round(record)
            if bar and task is not None:
                acc_txt = f"acc {test_acc:.3f}" if test_acc is not None else ""
                lost = f" dropped {record.dropped}" if record.dropped else ""
                bar.update(task, advance=1, status=f"loss {train_loss:.3f} {acc_txt}{lost}")
    finally:
        if bar:
            bar.stop()
    result.wall_seconds = time.perf_counter() - start
    return result


@dataclass
class CohortUpdate:
    """A trained cohort: one slice per client along the leading axis."""

    clients: np.ndarray
    order: np.ndarray
    """``clients == cohort[order]`` for the ``cohort`` that was passed in."""
    deltas: dict[str, torch.Tensor]
    """Local minus starting parameters."""
    trained: dict[str, torch.Tensor]
    loss: torch.Tensor
    """Each client's mean training loss (on the CPU)."""
    examples: torch.Tensor
    """Aggregation weight of shared parameters: records held (times the quality score)."""
    modality_examples: dict[str, torch.Tensor]
    """Aggregation weight of each encoder: records holding its modality (times quality)."""
    steps: torch.Tensor
    """Local steps each client took."""


class CohortTrainer:
    """Trains cohorts of a federation's clients with the vectorised trainer.

    Parameters
    ----------
    model
        The architecture (on ``dev``).
    data
        The federation.
    training
        Local training settings.
    seed
        Run seed (each client's shuffling derives from it, the task key and the client id).
    dev
        Training device.
    quality
        Optional per-client quality scores applied to the aggregation weights.
    private
        Sample-level DP-SGD (Poisson-sampled batches, per-record clipping, noise).
    """

    def __init__(
        self,
        model: MultimodalModel,
        data: FederatedDataset,
        training: LocalTraining,
        seed: int,
        dev: torch.device,
        quality: ClientQuality | None = None,
        private: DPSGD | None = None,
    ) -> None:
        self.model = model
        self.quality = quality
        self.private = private
        self.data = data
        self.train_set = _to_device(data.train, dev)
        self.training = training
        self.seed = seed
        self.dev = dev
        self.sizes = np.array([len(ix) for ix in data.client_indices], dtype=np.int64)
        rows = np.concatenate(
            [np.asarray(ix, dtype=np.int64) for ix in data.client_indices] + [np.zeros(1, np.int64)]
        )
        self.rows = rows
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        owner = np.repeat(np.arange(data.num_clients), self.sizes)
        rows = rows[: len(owner)]
        self.modality_counts = {
            m: np.bincount(
                owner, weights=data.train.present[m].cpu().numpy()[rows], minlength=data.num_clients
            ).astype(np.int64)
            for m in data.train.modalities
        }

    def train(
        self,
        start: dict[str, torch.Tensor],
        cohort: np.ndarray,
        key: int | np.ndarray,
        where: str,
        correction: dict[str, torch.Tensor] | None = None,
        max_steps: np.ndarray | None = None,
    ) -> CohortUpdate:
        """Train ``cohort`` from the parameters ``start``.

        ``key`` (the round, or one asynchronous task number per client) seeds each client's
        shuffling; ``where`` names it in errors. ``max_steps`` cuts each client's schedule
        (partial work); its steps are a prefix, so the cut is exact. ``correction`` (SCAFFOLD)
        has one row per client of ``cohort``.

        The update comes back with the clients sorted by schedule length, longest first (what
        the vectorised trainer needs; sorting here, on client ids, spares it permuting stacked
        parameters twice): ``update.clients`` is that order and ``update.order`` the positions
        in ``cohort``.
        """
        training, dev = self.training, self.dev
        seeds = client_seeds(self.seed, key, cohort)
        lengths = training.local_epochs * -(-self.sizes[cohort] // training.batch_size)
        if max_steps is not None:
            lengths = np.minimum(lengths, max_steps)
        order = np.argsort(-lengths, kind="stable")
        cohort, seeds = cohort[order], seeds[order]
        if max_steps is not None:
            max_steps = np.asarray(max_steps)[order]
        if correction is not None:
            perm = torch.as_tensor(order, device=dev)
            correction = {n: c[perm] for n, c in correction.items()}
        steps_np = None
        if self.private is not None:
            local, weight_np, steps_np = poisson_schedules(
                self.sizes[cohort],
                training.batch_size,
                training.local_epochs,
                self.private.source,
                max_steps,
            )
        else:
            local, weight_np = batch_schedules(self.sizes[cohort], training, seeds, max_steps)
        # Local record i of client c is row rows[offsets[c] + i] of the training set.
        flat = self.offsets[cohort][:, None, None] + local
        index = torch.from_numpy(np.where(weight_np > 0, self.rows[flat], 0)).to(dev)
        weight = torch.from_numpy(weight_np).to(dev)
        k = len(cohort)
        # Every client starts from ``start``: a broadcast view, copied once inside the trainer.
        stacked = {n: p.unsqueeze(0).expand(k, *p.shape) for n, p in start.items()}
        trained, loss = train_stacked(
            self.model,
            stacked,
            self.train_set,
            index,
            weight,
            training,
            correction,
            self.private,
            None if steps_np is None else torch.from_numpy(steps_np),
            torch.from_numpy(np.minimum(self.sizes[cohort], training.batch_size)),
        )
        deltas = {n: trained[n] - start[n] for n in trained}
        _check_cohort_finite(deltas, cohort, where)
        examples = torch.as_tensor(self.sizes[cohort], dtype=torch.float32, device=dev)
        modality_examples = {
            m: torch.as_tensor(v[cohort], dtype=torch.float32, device=dev)
            for m, v in self.modality_counts.items()
        }
        if self.quality is not None:
            examples, modality_examples = self.quality.apply(cohort, examples, modality_examples)
        return CohortUpdate(
            clients=cohort,
            order=order,
            deltas=deltas,
            trained=trained,
            loss=loss.detach().cpu(),
            examples=examples,
            modality_examples=modality_examples,
            steps=((weight.sum(2) > 0).sum(1) if steps_np is None else torch.from_numpy(steps_np)),
        )


def _contributions(update: CohortUpdate, weight_scale: float) -> dict[int, np.ndarray]:
    """Each client's vector for the secure sum: weighted deltas, weights, then its loss."""
    weighted, weights = ModalityAwareMean.contributions(
        update.deltas,
        update.examples / weight_scale,
        {m: v / weight_scale for m, v in update.modality_examples.items()},
    )
    k = int(update.examples.shape[0])
    parts = [v.reshape(k, -1) for v in weighted.values()]
    parts += [torch.stack(list(weights.values()), 1), update.loss.to(parts[0]).view(k, 1)]
    # float32, as trained: the encoder's float32 path is exact and 30x faster than float64.
    rows = torch.cat([p.to(torch.float32).cpu() for p in parts], 1).numpy()
    return {int(c): rows[i] for i, c in enumerate(update.clients)}


def _add_secure_sum(
    acc: ModalityAwareMean, template: dict[str, torch.Tensor], total: np.ndarray, clients: int
) -> torch.Tensor:
    """Unflatten a secure sum (layout of :func:`_contributions`) into ``acc``; return the mean
    loss as a one-element tensor."""
    flat = torch.from_numpy(total)
    sums, offset = {}, 0
    for name, t in template.items():
        sums[name] = flat[offset : offset + t.numel()].view(t.shape).to(t)
        offset += t.numel()
    weights = {name: flat[offset + i] for i, name in enumerate(template)}
    acc.add_sums(sums, weights, clients)
    return (flat[-1:] / max(clients, 1)).float()


def _check_cohort_finite(deltas: dict[str, torch.Tensor], cohort: np.ndarray, where: str) -> None:
    bad = torch.zeros(len(cohort), dtype=torch.bool, device=next(iter(deltas.values())).device)
    for d in deltas.values():
        # A NaN or inf anywhere makes the client's sum non-finite: one reduction per client
        # instead of an elementwise test (a sum overflowing float32 is flagged too, rightly).
        bad |= ~torch.isfinite(d.flatten(1).sum(1))
    if bool(bad.any()):
        clients = [int(c) for c, b in zip(cohort, bad.cpu().tolist(), strict=True) if b]
        raise TrainingError(
            f"{where}: client(s) {clients} produced non-finite (NaN/inf) updates; "
            "lower `training.lr`, check those clients' data for extreme values, or enable "
            "update clipping."
        )


def check_finite(params: dict[str, torch.Tensor], where: str) -> None:
    """Raise :class:`TrainingError` naming ``where`` if a global parameter is NaN or inf."""
    for name, p in params.items():
        if not bool(torch.isfinite(p).all()):
            raise TrainingError(f"{where}: global parameter {name!r} became non-finite")


def _to_device(ds: MultimodalDataset, dev: torch.device) -> MultimodalDataset:
    if dev.type == "cpu":
        return ds
    return MultimodalDataset(
        specs=ds.specs,
        inputs={k: v.to(dev) for k, v in ds.inputs.items()},
        present={k: v.to(dev) for k, v in ds.present.items()},
        labels=ds.labels.to(dev),
        classes=ds.classes,
        ids=ds.ids,
        name=ds.name,
        meta=ds.meta,
    )


def progress_bar(enabled: bool) -> Progress | None:
    """A rich progress bar for rounds (``None`` when disabled)."""
    if not enabled:
        return None
    return Progress(
        TextColumn("[bold]round {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
