"""One DP-SGD step: mmshield against the non-private step and Opacus, same model, batch and run.

Run ``python -m benchmarks.dpsgd`` (``--quick``: a smoke test, 2 timed rounds at 1 thread only,
one clipping norm checked, no profile). Every method takes one full optimiser step on the same
batch of 256 ``av-digits`` training records, starting from the same weights, with
``torch.set_num_threads(2)`` (then 1):

- **non-private**: the model as a normal ``nn.Module``, forward, backward, ``torch.optim.SGD``;
- **mmshield** (shipped): :meth:`mmshield.privacy.dpsgd.DPSGD.clipped_sum_fn` with its default
  ``clipping="bookkeeping"`` (:class:`mmshield.privacy.bookkeeping.BookKeeping`: per-record norms
  from each layer's input and output gradient, the clipped sum from one backward pass; Bu et al.
  2023), Gaussian noise from :meth:`~mmshield.privacy.dpsgd.DPSGD.noise` (ChaCha20, Box-Muller,
  one draw for all tensors), division by the batch size, SGD update: the step
  :func:`mmshield.fl.client.train_stacked` takes;
- **mmshield per-sample** (shipped reference and fallback): the same with
  ``clipping="per_sample"`` (:func:`mmshield.privacy.dpsgd.clipped_grad_sum`: ``vmap`` over
  records of ``grad`` of one record's loss, per-record clipping of the whole gradient, sum);
- **Opacus hooks** and **Opacus ghost clipping**: ``PrivacyEngine.make_private`` (Opacus 1.6,
  ``grad_sample_mode="hooks"`` / ``"ghost"``), one ``DPOptimizer`` step.

Same noise multiplier (1.0), clipping norm (1.0) and learning rate everywhere. Workloads (the
model factories are mmshield's :func:`~mmshield.models.build_model`):

- ``cnn``: the image view alone (28×28 MNIST digits), 2 conv + 2 linear layers (mmshield's
  ``ConvEncoder`` with LayerNorm, then a linear head): the ANCHORS reference workload's shape;
- ``av-digits``: the demo's 3-modality model (image and audio CNNs, text embedding bag) with
  concatenation fusion (Opacus 1.6 cannot wrap the attention fusion: a module with its own
  parameters and two inputs);
- ``av-digits-attention``: the demo's model as configured (attention fusion); Opacus rows n/a.

Methods are timed round-robin (one step each per round, order rotated) after warm-up; figures are
medians. Before timing, both mmshield clipped sums are checked against Opacus's (hooks and ghost
clipping, noise 0, ``loss_reduction="sum"``) and against each other at two clipping norms.
Writes ``benchmarks/results/dpsgd.json`` and, for full runs, the ``dpsgd`` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from mmshield.data.av_digits import load_av_digits
from mmshield.models import build_model
from mmshield.models.model import MultimodalModel
from mmshield.privacy.bookkeeping import BookKeeping
from mmshield.privacy.dpsgd import DPSGD, Clipping, clipped_grad_sum
from mmshield.privacy.noise import NoiseSource

from benchmarks._common import (
    CpuMonitor,
    machine_info,
    machine_line,
    target,
    update_results_md,
    wait_for_quiet,
    write_json,
)

NAME = "dpsgd"
BATCH = 256
LR = 0.05
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
TARGET_RATIO = 1.3
DISTURBED = 0.25  # cores kept busy by other processes above which a block is re-measured
TOLERANCE = 1e-4  # |mmshield - Opacus| <= TOLERANCE * (1 + |Opacus|), elementwise
DATA_SEED = 0

METHODS = {
    "plain": "non-private (nn.Module + SGD)",
    "mmshield": "mmshield DP-SGD (book-keeping, shipped default)",
    "mmshield_per_sample": "mmshield DP-SGD, per-sample vmap(grad) (reference)",
    "opacus_hooks": "Opacus 1.6 hooks",
    "opacus_ghost": "Opacus 1.6 ghost clipping",
}
NOISE_ROW = "mmshield_noise_only"
EXTRA_ROWS = {
    NOISE_ROW: "mmshield's DPSGD.noise alone",
}


# --- Workloads ----------------------------------------------------------------------------------


@dataclass
class Workload:
    """A model and one batch of av-digits training records."""

    key: str
    description: str
    model: MultimodalModel
    inputs: dict[str, torch.Tensor]
    present: dict[str, torch.Tensor]
    labels: torch.Tensor
    opacus: bool

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def workloads(keys: list[str]) -> list[Workload]:
    """The benchmark's workloads (same records, drawn once with :data:`DATA_SEED`)."""
    train, _ = load_av_digits()
    gen = torch.Generator().manual_seed(DATA_SEED)
    rows = torch.randperm(len(train), generator=gen)[:BATCH]
    out = []
    for key in keys:
        if key == "cnn":
            specs = [s for s in train.specs if s.name == "image"]
            model = build_model(specs, 10, embed_dim=64, fusion="concat", fusion_hidden=0)
            desc = (
                "image 1×28×28: conv 5×5/2 (16) → conv 3×3/2 (32) → linear 1568→64 → "
                "LayerNorm → linear 64→10"
            )
        elif key == "av-digits":
            specs = train.specs
            model = build_model(specs, 10, embed_dim=64, fusion="concat", fusion_hidden=64)
            desc = "demo model, concat fusion: image + audio CNNs, text embedding bag (4096×64)"
        else:
            specs = train.specs
            model = build_model(specs, 10, embed_dim=64, fusion="attention", fusion_hidden=64)
            desc = "demo model as configured (attention fusion); Opacus cannot wrap it"
        mods = [s.name for s in specs]
        out.append(
            Workload(
                key=key,
                description=desc,
                model=model,
                inputs={m: train.inputs[m][rows].clone() for m in mods},
                present={m: train.present[m][rows].clone() for m in mods},
                labels=train.labels[rows].clone(),
                opacus=key != "av-digits-attention",
            )
        )
    return out


# --- Steps --------------------------------------------------------------------------------------


def _loader(w: Workload) -> torch.utils.data.DataLoader:
    """A one-batch loader: Opacus takes the expected batch size (256) from it."""
    ds = torch.utils.data.TensorDataset(w.labels)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH)


def make_steps(w: Workload) -> dict[str, Callable[[], None]]:
    """One full optimiser step per method, each on its own copy of the same initial weights."""
    from opacus import PrivacyEngine

    inputs, present, labels = w.inputs, w.present, w.labels
    steps: dict[str, Callable[[], None]] = {}

    plain = copy.deepcopy(w.model)
    opt = torch.optim.SGD(plain.parameters(), lr=LR)

    def plain_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(plain(inputs, present), labels).backward()
        opt.step()

    steps["plain"] = plain_step

    def functional_step(clipping: Clipping) -> Callable[[], None]:
        model = copy.deepcopy(w.model)
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        mech = DPSGD(
            MAX_GRAD_NORM, NOISE_MULTIPLIER, NoiseSource(False, 0, "dpsgd-noise"), clipping
        )
        fn = mech.clipped_sum_fn(model)
        weight = torch.ones(len(labels))

        def step() -> None:
            sums, _, _ = fn(params, inputs, present, labels, weight)
            noise = mech.noise(sums)
            with torch.no_grad():
                for k, p in params.items():
                    p.add_((sums[k] + noise[k]) / BATCH, alpha=-LR)

        return step

    steps["mmshield"] = functional_step("bookkeeping")
    steps["mmshield_per_sample"] = functional_step("per_sample")

    if w.opacus:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hm = copy.deepcopy(w.model)
            hooks_model, hooks_opt, _ = PrivacyEngine().make_private(
                module=hm, optimizer=torch.optim.SGD(hm.parameters(), lr=LR),
                data_loader=_loader(w), noise_multiplier=NOISE_MULTIPLIER,
                max_grad_norm=MAX_GRAD_NORM, poisson_sampling=False,
            )  # fmt: skip
            gm = copy.deepcopy(w.model)
            ghost_model, ghost_opt, ghost_loss, _ = PrivacyEngine().make_private(
                module=gm, optimizer=torch.optim.SGD(gm.parameters(), lr=LR),
                criterion=nn.CrossEntropyLoss(), data_loader=_loader(w),
                noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                poisson_sampling=False, grad_sample_mode="ghost",
            )  # fmt: skip

        def hooks_step() -> None:
            hooks_opt.zero_grad(set_to_none=True)
            F.cross_entropy(hooks_model(inputs, present), labels).backward()
            hooks_opt.step()

        def ghost_step() -> None:
            ghost_opt.zero_grad(set_to_none=True)
            ghost_loss(ghost_model(inputs, present), labels).backward()
            ghost_opt.step()

        steps["opacus_hooks"] = hooks_step
        steps["opacus_ghost"] = ghost_step

    mech = DPSGD(MAX_GRAD_NORM, NOISE_MULTIPLIER, NoiseSource(False, 0, "dpsgd-noise"))
    like = {k: v.detach() for k, v in w.model.named_parameters()}

    def noise_only() -> None:
        mech.noise(like)

    steps[NOISE_ROW] = noise_only
    return steps


# --- Correctness --------------------------------------------------------------------------------


def _opacus_sums(w: Workload, max_grad_norm: float, ghost: bool) -> dict[str, torch.Tensor]:
    """Opacus's clipped gradient sum on the batch (noise 0, sum reduction)."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model = copy.deepcopy(w.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ghost:
            gsm: nn.Module = GradSampleModuleFastGradientClipping(
                model, max_grad_norm=max_grad_norm, use_ghost_clipping=True, loss_reduction="sum"
            )
            opt: Any = DPOptimizerFastGradientClipping(
                torch.optim.SGD(gsm.parameters(), lr=LR), noise_multiplier=0.0,
                max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="sum",
            )  # fmt: skip
            crit = DPLossFastGradientClipping(
                gsm,
                opt,
                nn.CrossEntropyLoss(reduction="sum"),
                loss_reduction="sum",
            )
            crit(gsm(w.inputs, w.present), w.labels).backward()
        else:
            gsm = GradSampleModule(model, loss_reduction="sum")
            opt = DPOptimizer(
                torch.optim.SGD(gsm.parameters(), lr=LR), noise_multiplier=0.0,
                max_grad_norm=max_grad_norm, expected_batch_size=1, loss_reduction="sum",
            )  # fmt: skip
            F.cross_entropy(gsm(w.inputs, w.present), w.labels, reduction="sum").backward()
        opt.pre_step()  # clip, sum, add (zero) noise, divide by expected batch size 1
    return {
        n.removeprefix("_module."): p.grad.detach().clone()  # type: ignore[union-attr]
        for n, p in gsm.named_parameters()
    }


def _compare(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    worst_abs, worst_excess = 0.0, 0.0
    for k, r in ref.items():
        diff = (got[k] - r).abs()
        worst_abs = max(worst_abs, float(diff.max()))
        worst_excess = max(worst_excess, float((diff / (1.0 + r.abs())).max()))
    scale = max(float(r.abs().max()) for r in ref.values())
    return {
        "max_abs_diff": worst_abs,
        "max_diff_over_1_plus_abs": worst_excess,
        "max_abs_value": scale,
        "passed": worst_excess <= TOLERANCE and set(got) >= set(ref),
    }


def check(w: Workload, both: bool = True) -> dict[str, Any]:
    """mmshield's clipped sums (book-keeping and per-sample) against Opacus's and each other.

    At the benchmark's clipping norm and at the median record norm (about half the records
    clipped); ``both=False``: the median only.
    """
    params = {k: v.detach() for k, v in w.model.named_parameters()}
    weight = torch.ones(len(w.labels))
    args = (params, w.inputs, w.present, w.labels, weight)
    _, _, norms = clipped_grad_sum(w.model, MAX_GRAD_NORM)(*args)
    out: dict[str, Any] = {
        "norms": {
            "median": float(norms.median()),
            "min": float(norms.min()),
            "max": float(norms.max()),
        },
        "cases": [],
    }
    for c in (MAX_GRAD_NORM, float(norms.median())) if both else (float(norms.median()),):
        per_sample, _, _ = clipped_grad_sum(w.model, c)(*args)
        fn = DPSGD(c, 0.0, NoiseSource(False)).clipped_sum_fn(w.model)
        assert isinstance(fn, BookKeeping)
        shipped, _, bk_norms = fn(*args)
        case: dict[str, Any] = {
            "max_grad_norm": c,
            "clipped_fraction": float((norms > c).float().mean()),
            "mmshield_vs_per_sample": _compare(shipped, per_sample),
            "bookkeeping_norms_max_rel_diff": float(((bk_norms - norms).abs() / norms).max()),
        }
        if w.opacus:
            for mode in ("hooks", "ghost"):
                ref = _opacus_sums(w, c, ghost=mode == "ghost")
                case[f"mmshield_vs_opacus_{mode}"] = _compare(shipped, ref)
                case[f"per_sample_vs_opacus_{mode}"] = _compare(per_sample, ref)
        out["cases"].append(case)
    out["passed"] = all(
        v["passed"] for case in out["cases"] for v in case.values() if isinstance(v, dict)
    )
    return out


def check_noise() -> bool:
    """``NoiseSource.normal_like`` (many tensors, one draw) equals one ``normal`` draw."""
    like = {"a": torch.zeros(3, 5), "b": torch.zeros(7), "c": torch.zeros(700_001)}
    got = NoiseSource(False, 3, "check").normal_like(like, 2.0)
    flat = NoiseSource(False, 3, "check").normal((sum(v.numel() for v in like.values()),), 2.0)
    return torch.equal(torch.cat([v.flatten() for v in got.values()]), flat)


# --- Timing -------------------------------------------------------------------------------------


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def time_steps(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int
) -> tuple[dict[str, list[float]], float | None]:
    """Seconds per step of each method, round-robin (order rotated each round)."""
    for f in steps.values():
        for _ in range(warmup):
            f()
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    with CpuMonitor() as mon:
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for k in order:
                t0 = time.perf_counter()
                steps[k]()
                times[k].append(time.perf_counter() - t0)
    return times, mon.foreign_cores


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Median, quartiles and ratio to the non-private step (also median of per-round ratios)."""
    plain = times["plain"]
    out = {}
    for k, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        med = statistics.median(ts)
        per_round = [t / p for t, p in zip(ts, plain, strict=True)]
        out[k] = {
            "median_ms": med * 1e3,
            "p25_ms": q[0] * 1e3,
            "p75_ms": q[2] * 1e3,
            "ratio": med / statistics.median(plain),
            "ratio_median_per_round": statistics.median(per_round),
            "samples_ms": [round(t * 1e3, 3) for t in ts],
        }
    return out


def measure(
    ws: list[Workload],
    threads: int,
    rounds: int,
    warmup: int,
    console: Console,
    quiet_wait: float = 0.0,
    attempts: int = 1,
) -> dict[str, Any]:
    """Time every workload's methods at ``threads`` torch threads.

    A block (one workload) disturbed by other processes (more than :data:`DISTURBED` cores busy)
    is measured again, up to ``attempts`` times in all; the least disturbed attempt is kept.
    """
    torch.set_num_threads(threads)
    out: dict[str, Any] = {}
    for w in ws:
        steps = make_steps(w)
        best: dict[str, Any] | None = None
        tried: list[float | None] = []
        for _ in range(attempts):
            before = wait_for_quiet(quiet_wait) if quiet_wait > 0 else None
            load = _load()
            times, foreign = time_steps(steps, rounds, warmup)
            tried.append(None if foreign is None else round(foreign, 3))
            block = {
                "methods": summarise(times),
                "foreign_cores": foreign,
                "foreign_cores_before": before,
                "load_average": load,
            }
            if best is None or (foreign or 0.0) < (best["foreign_cores"] or 0.0):
                best = block
            if foreign is None or foreign <= DISTURBED:
                break
        assert best is not None
        best["foreign_cores_attempts"] = tried
        out[w.key] = best
        console.print(
            f"  {w.key}, {threads} thread(s): other processes kept {tried} cores busy "
            f"(attempts); plain {best['methods']['plain']['median_ms']:.1f} ms, mmshield "
            f"{best['methods']['mmshield']['ratio']:.2f}x"
        )
    return out


def profile_steps(ws: list[Workload], steps_per: int = 3) -> dict[str, Any]:
    """Top operators (self CPU time) of mmshield's steps (book-keeping and per-sample)."""
    from torch.profiler import profile

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for w in ws:
        steps = make_steps(w)
        out[w.key] = {}
        for method in ("mmshield", "mmshield_per_sample"):
            f = steps[method]
            f()
            with profile() as prof:
                for _ in range(steps_per):
                    f()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
            out[w.key][method] = {
                "step_ms": total / steps_per / 1e3,
                "top_ops": [
                    {
                        "op": e.key,
                        "self_ms_per_step": e.self_cpu_time_total / steps_per / 1e3,
                        "share": e.self_cpu_time_total / total,
                    }
                    for e in top
                ],
                "phases_ms_per_step": {
                    e.key.removeprefix("bookkeeping: "): e.cpu_time_total / steps_per / 1e3
                    for e in events
                    if e.key.startswith("bookkeeping: ")
                },
            }
    return out


# --- In the simulator: train_stacked over a cohort of clients -----------------------------------

SIM_CLIENTS = 20  # the demo's clients per round
SIM_BATCH = 32  # the demo's batch size
SIM_STEPS = 2  # local steps per timed call


def simulator(threads: int, rounds: int, warmup: int, quick: bool) -> dict[str, Any]:
    """Local DP-SGD steps of a cohort in :func:`train_stacked`, as the simulator runs them.

    The demo's model (attention fusion), 20 clients × 32 records per step, vmapped over
    clients; momentum 0.9. Methods: non-private, shipped DPSGD (book-keeping), DPSGD with
    ``clipping="per_sample"``. Also checks at σ = 0 that both end at the same parameters.
    """
    from mmshield.fl.client import LocalTraining, train_stacked

    torch.set_num_threads(threads)
    train, _ = load_av_digits()
    k = 2 if quick else SIM_CLIENTS
    gen = torch.Generator().manual_seed(DATA_SEED)
    index = torch.randint(0, len(train), (k, SIM_STEPS, SIM_BATCH), generator=gen)
    weight = torch.ones(k, SIM_STEPS, SIM_BATCH)
    model = build_model(train.specs, 10, embed_dim=64, fusion="attention", fusion_hidden=64)
    params = {n: v.detach().unsqueeze(0).expand(k, *v.shape) for n, v in model.named_parameters()}
    training = LocalTraining(local_epochs=1, batch_size=SIM_BATCH, lr=LR, momentum=0.9)

    def private(sigma: float, clipping: Clipping = "bookkeeping") -> DPSGD:
        return DPSGD(MAX_GRAD_NORM, sigma, NoiseSource(False, 0, "dpsgd-noise"), clipping)

    def run(dp: DPSGD | None) -> dict[str, torch.Tensor]:
        out, _ = train_stacked(model, params, train, index, weight, training, None, dp)
        return out

    agree = _compare(run(private(0.0)), run(private(0.0, "per_sample")))

    def stepper(dp: DPSGD | None) -> Callable[[], None]:
        def step() -> None:
            run(dp)

        return step

    steps: dict[str, Callable[[], None]] = {
        "plain": stepper(None),
        "mmshield": stepper(private(NOISE_MULTIPLIER)),
        "mmshield_per_sample": stepper(private(NOISE_MULTIPLIER, "per_sample")),
    }
    mech = private(NOISE_MULTIPLIER)
    like = {n: torch.zeros(k, *v.shape) for n, v in model.named_parameters()}

    def noise_only() -> None:
        for _ in range(SIM_STEPS):
            mech.noise(like)

    steps[NOISE_ROW] = noise_only
    best: tuple[dict[str, list[float]], float | None, float | None] | None = None
    tried: list[float | None] = []
    for _ in range(1 if quick else 3):
        quiet = None if quick else wait_for_quiet(60.0)
        times, foreign = time_steps(steps, rounds, warmup)
        tried.append(None if foreign is None else round(foreign, 3))
        if best is None or (foreign or 0.0) < (best[1] or 0.0):
            best = (times, foreign, quiet)
        if foreign is None or foreign <= DISTURBED:
            break
    assert best is not None
    times, foreign, quiet = best
    per_step = {n: [t / SIM_STEPS for t in ts] for n, ts in times.items()}
    return {
        "clients": k,
        "batch": SIM_BATCH,
        "steps_per_call": SIM_STEPS,
        "threads": threads,
        "records_per_step": k * SIM_BATCH,
        "methods": summarise(per_step),
        "foreign_cores": foreign,
        "foreign_cores_before": quiet,
        "foreign_cores_attempts": tried,
        "bookkeeping_vs_per_sample_at_sigma_0": agree,
    }


# --- Reporting ----------------------------------------------------------------------------------


def _cell(m: dict[str, Any] | None) -> tuple[str, str]:
    if m is None:
        return "n/a", "n/a"
    return f"{m['median_ms']:.1f}", f"{m['ratio']:.2f}x"


def print_table(console: Console, ws: list[Workload], timings: dict[str, Any]) -> None:
    for w in ws:
        table = Table(title=f"{w.key}: {w.parameters:,} parameters, batch {BATCH}")
        table.add_column("method")
        for t in timings:
            table.add_column(f"{t} ms")
            table.add_column(f"{t} / plain")
        for k in [*METHODS, *EXTRA_ROWS]:
            label = METHODS.get(k) or "  " + EXTRA_ROWS[k]
            cells: list[str] = []
            for t in timings:
                cells.extend(_cell(timings[t][w.key]["methods"].get(k)))
            table.add_row(label, *cells)
        console.print(table)


SIM_ROWS = {
    "plain": "non-private",
    "mmshield": "mmshield DPSGD (book-keeping, shipped default)",
    "mmshield_per_sample": "mmshield DPSGD, per-sample vmap(grad) (reference)",
    NOISE_ROW: "DPSGD.noise alone",
}


def print_simulator(console: Console, sim: dict[str, Any]) -> None:
    table = Table(
        title=(
            f"train_stacked, {sim['clients']} clients × {sim['batch']} records per step, "
            f"{sim['threads']} thread(s): ms per local step"
        )
    )
    for col in ("method", "ms per step", "/ non-private"):
        table.add_column(col)
    for k, label in SIM_ROWS.items():
        table.add_row(label, *_cell(sim["methods"][k]))
    console.print(table)


def markdown(payload: dict[str, Any]) -> str:
    """The ``dpsgd`` section of RESULTS.md."""
    ws, timings = payload["workloads"], payload["timings"]
    lines = [
        f"`python -m benchmarks.dpsgd`, {payload['timestamp_utc']}; machine: "
        f"{machine_line(payload['machine'])}, opacus {payload['opacus']}. One full optimiser "
        f"step on the same {BATCH} av-digits training records and the same initial weights, "
        f"noise multiplier {NOISE_MULTIPLIER}, clipping norm {MAX_GRAD_NORM}; medians of "
        f"{payload['rounds']} round-robin rounds after warm-up. Load average at the start "
        f"{payload['load_average_start']}, at the end {payload['load_average_end']}.",
        "",
        "Workloads (mmshield's `build_model`):",
        "",
        *[f"- `{k}` ({v['parameters']:,} parameters): {v['description']}" for k, v in ws.items()],
        "",
    ]
    heads = " | ".join(f"{t} ms | {t} / plain" for t in timings)
    lines += [
        f"| workload | method | {heads} |",
        "|---|---|" + "---|---|" * len(timings),
    ]
    for key in ws:
        for k in [*METHODS, *EXTRA_ROWS]:
            cells: list[str] = []
            for t in timings:
                cells.extend(_cell(timings[t][key]["methods"].get(k)))
            label = METHODS.get(k) or EXTRA_ROWS[k]
            lines.append(f"| {key} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for k, t in payload["targets"].items():
        lines.append(f"| {k} | {t['value']:.2f} {t['unit']} | {t['op']} {t['goal']} | {t['met']} |")
    noise = [
        f"{t}, {key}: {v['foreign_cores']:.2f}"
        for t, per in timings.items()
        for key, v in per.items()
        if v["foreign_cores"] is not None
    ]
    corr = payload["correctness"]
    worst = max(
        v["max_diff_over_1_plus_abs"]
        for c in corr.values()
        for case in c["cases"]
        for name, v in case.items()
        if isinstance(v, dict) and "opacus" in name
    )
    spreads = [
        (m["p75_ms"] - m["p25_ms"]) / m["median_ms"]
        for per in timings.values()
        for v in per.values()
        for m in v["methods"].values()
    ]
    lines += [
        "",
        "Noise: mmshield draws Gaussians from ChaCha20 (Box-Muller in float64, one draw for "
        "all tensors), Opacus from `torch.normal` (not cryptographic unless `secure_mode`); "
        "both are inside their rows. "
        f"Spread of step times (interquartile range over median): median "
        f"{statistics.median(spreads):.0%}, worst {max(spreads):.0%}.",
    ]
    lines += [
        "",
        f"Correctness: clipped sums of mmshield (book-keeping and per-sample) equal Opacus's "
        f"(hooks and ghost clipping, noise 0) and each other (all three workloads) within "
        f"{TOLERANCE:g}·(1 + |g|) at clipping norms {MAX_GRAD_NORM} and the median record norm: "
        f"**{payload['correctness_passed']}** (worst against Opacus {worst:.1e}).",
        "",
        "Cores kept busy by other processes during each timing block (2-core machine shared "
        "with other work; 2-thread figures suffer most): " + "; ".join(noise) + "; "
        f"simulator: {payload['simulator']['foreign_cores'] or 0.0:.2f}.",
    ]
    sim = payload["simulator"]
    lines += [
        "",
        f"In the simulator (`train_stacked`, vmapped over clients): the demo model (attention "
        f"fusion), {sim['clients']} clients × {sim['batch']} records per local step, momentum "
        f"0.9, {sim['threads']} threads, ms per local step of the whole cohort:",
        "",
        "| method | ms per step | / non-private |",
        "|---|---|---|",
        *[
            f"| {label} | " + " | ".join(_cell(sim["methods"][k])) + " |"
            for k, label in SIM_ROWS.items()
        ],
        "",
        f"Book-keeping vs per-sample trainer at σ = 0 after {sim['steps_per_call']} steps: max "
        f"|Δparam| {sim['bookkeeping_vs_per_sample_at_sigma_0']['max_abs_diff']:.1e}. "
        "`DPSGD.noise` (one `NoiseSource.normal_like` draw for all tensors) equals one "
        f"`NoiseSource.normal` draw bit for bit: {payload['noise_like_bit_identical']}.",
    ]
    prof = payload.get("profile")
    if prof:
        lines += [
            "",
            "Where mmshield's step goes (1 thread, torch profiler, top self-time ops; "
            "ChaCha20 itself is invisible to it):",
        ]
        for key, per in prof.items():
            top = per["mmshield"]["top_ops"][:4]
            ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in top)
            phases = per["mmshield"]["phases_ms_per_step"]
            ph = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
            ref = per["mmshield_per_sample"]
            lines.append(
                f"- {key}: book-keeping step {per['mmshield']['step_ms']:.0f} ms ({ph} ms): "
                f"{ops}; per-sample step {ref['step_ms']:.0f} ms."
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpsgd")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 rounds at 1 thread, no warm-up, one clipping norm, no profile",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Optimal order is the")
    console = Console()
    load_start = _load()
    t_start = time.perf_counter()
    keys = ["cnn", "av-digits", "av-digits-attention"]
    ws = workloads(keys)
    rounds, warmup = (2, 0) if args.quick else (15, 2)
    quiet_wait, attempts = (0.0, 1) if args.quick else (60.0, 3)

    # Quick runs (smoke tests) time at 1 thread: a 2-thread step slows down many times over
    # when another process holds one of the 2 cores, which would blow the test's time limit.
    thread_counts = (1,) if args.quick else (2, 1)
    torch.set_num_threads(thread_counts[0])
    console.print("checking clipped sums against Opacus ...")
    correctness = {w.key: check(w, both=not args.quick) for w in ws}
    noise_identical = check_noise()
    passed = all(c["passed"] for c in correctness.values()) and noise_identical
    console.print(
        f"clipped sums equal Opacus's: {passed} ({time.perf_counter() - t_start:.0f} s so far)"
    )

    timings: dict[str, Any] = {}
    for threads in thread_counts:
        console.print(f"timing at {threads} thread(s) ...")
        timings[f"{threads}t"] = measure(ws, threads, rounds, warmup, console, quiet_wait, attempts)
    console.print(f"timing train_stacked (simulator) at {thread_counts[0]} thread(s) ...")
    sim = simulator(thread_counts[0], 2 if args.quick else 5, warmup, args.quick)
    passed = passed and sim["bookkeeping_vs_per_sample_at_sigma_0"]["passed"]
    prof = None if args.quick else profile_steps(ws)
    torch.set_num_threads(2)
    print_table(console, ws, timings)
    print_simulator(console, sim)

    main_key = f"{thread_counts[0]}t"
    main_t = timings[main_key]
    targets = {
        f"{w.key}_mmshield_over_plain": target(
            main_t[w.key]["methods"]["mmshield"]["ratio"], TARGET_RATIO, "<=", "x"
        )
        for w in ws
    }
    for w in ws:
        ratio = main_t[w.key]["methods"]["mmshield"]["ratio"]
        ref = main_t[w.key]["methods"]["mmshield_per_sample"]["ratio"]
        console.print(
            f"{w.key}, {main_key}: mmshield {ratio:.2f}x the non-private step "
            f"(target <= {TARGET_RATIO}x: {'met' if ratio <= TARGET_RATIO else 'missed'}); "
            f"per-sample reference {ref:.2f}x"
        )
    from importlib import metadata

    payload: dict[str, Any] = {
        "quick": args.quick,
        "rounds": rounds,
        "warmup": warmup,
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "opacus": metadata.version("opacus"),
        "settings": {
            "batch": BATCH,
            "lr": LR,
            "noise_multiplier": NOISE_MULTIPLIER,
            "max_grad_norm": MAX_GRAD_NORM,
            "noise_source": "NoiseSource(secure=False): ChaCha20 keyed by the seed, as fast as "
            "secure=True",
            "data": f"av-digits train, {BATCH} records drawn with seed {DATA_SEED}",
        },
        "methods": {**METHODS, **EXTRA_ROWS},
        "workloads": {
            w.key: {"description": w.description, "parameters": w.parameters, "opacus": w.opacus}
            for w in ws
        },
        "correctness": correctness,
        "noise_like_bit_identical": noise_identical,
        "correctness_passed": passed,
        "timings": timings,
        "simulator": sim,
        "profile": prof,
        "load_average_start": load_start,
        "load_average_end": _load(),
        "targets_threads": thread_counts[0],
        "targets": targets,
    }
    write_json(NAME, payload, args.out)
    if not args.quick and args.out is None:
        payload.setdefault("machine", machine_info())
        update_results_md(NAME, markdown(payload))
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
