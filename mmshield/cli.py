"""The ``mmshield`` command: ``init``, ``run``, ``runs``, ``report``."""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mmshield.errors import MMShieldError

DEFAULT_STORE = "runs/mmshield.db"
console = Console()


def example_config() -> str:
    """The commented example configuration (the demo's)."""
    return resources.files("mmshield.configs").joinpath("demo.yaml").read_text(encoding="utf-8")


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented example config into DIR."""
    target = Path(args.dir) / "mmshield.yaml"
    if target.exists() and not args.force:
        console.print(f"[red]{target} exists[/red]; pass --force to overwrite it")
        return 1
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(example_config(), encoding="utf-8")
    console.print(f"wrote {target}\nnext: [bold]mmshield run {target}[/bold]")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Train the run a config describes, store it and write its report."""
    from mmshield.api import run
    from mmshield.config import load_config

    config = load_config(args.config)
    if args.rounds is not None:
        config = config.model_copy(
            update={"training": config.training.model_copy(update={"rounds": args.rounds})}
        )
    console.print(
        f"[bold]{config.name}[/bold]: {config.dataset.name}, {config.partition.clients} clients, "
        f"{config.training.rounds} rounds"
    )
    outcome = run(config, store_path=args.store, progress=not args.quiet)
    s = outcome.summary
    table = Table(title=f"run {outcome.run_id}", show_header=False)
    table.add_row("test accuracy (all modalities)", f"{s['accuracy']:.4f}")
    for subset, acc in s["accuracy_by_modalities"].items():
        table.add_row(f"  with only {subset}", f"{acc:.4f}")
    table.add_row("wall time", f"{s['wall_seconds']:.1f} s")
    if s.get("simulated_seconds") is not None:
        table.add_row("simulated time", f"{s['simulated_seconds']:.1f} s")
        table.add_row(
            "client updates (dropped, partial)",
            f"{s['client_updates']} ({s['dropped_clients']}, {s['partial_clients']})",
        )
    table.add_row(
        "bytes up / down", f"{s['bytes_up'] / 1e6:.1f} MB / {s['bytes_down'] / 1e6:.1f} MB"
    )
    table.add_row(
        "differential privacy", "off" if s["epsilon"] is None else f"ε = {s['epsilon']:.3g}"
    )
    console.print(table)
    for note in s.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"report: [bold]{outcome.report_path}[/bold]")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """List the runs in the store."""
    from mmshield.report.html import format_runs_table
    from mmshield.report.store import RunStore

    if not Path(args.store).exists():
        console.print(f"no run store at {args.store}; `mmshield run CONFIG` creates it")
        return 0
    console.print(format_runs_table(RunStore(args.store).list_runs()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write a run's HTML report and print its path."""
    from mmshield.report.html import render_report
    from mmshield.report.store import RunStore

    store = RunStore(args.store)
    info = store.get_run(args.run)
    path = render_report(store, info.run_id, Path(args.out) if args.out else None)
    print(path)
    return 0


def cmd_budget(args: argparse.Namespace) -> int:
    """Show (or set) privacy budgets, spend and history."""
    from mmshield.privacy.ledger import PrivacyLedger

    ledger = PrivacyLedger(args.ledger)
    if args.action == "set":
        if args.dataset is None or args.epsilon is None or args.delta is None:
            console.print("usage: mmshield budget set DATASET --epsilon E --delta D [--modality M]")
            return 2
        ledger.set_budget(args.dataset, args.epsilon, args.delta, args.modality)
        console.print(
            f"budget of {args.dataset} ({args.modality}): ε = {args.epsilon:g}, δ = {args.delta:g}"
        )
        return 0
    datasets = [args.dataset] if args.dataset else ledger.datasets()
    console.print(f"privacy ledger: {ledger.path}")
    if not datasets:
        console.print("no budgets and no DP runs yet")
        return 0
    table = Table(title="budgets and spend (ε; δ)")
    for col in ("dataset", "modality", "budget", "spent", "reserved", "remaining"):
        table.add_column(col)
    for ds in datasets:
        for sp in ledger.spend(ds):
            budget = (
                "none"
                if sp.budget_epsilon is None
                else f"{sp.budget_epsilon:g}; {sp.budget_delta:g}"
            )
            left = sp.remaining_epsilon
            table.add_row(
                ds,
                sp.modality,
                budget,
                f"{sp.spent_epsilon:.4g}; {sp.spent_delta:.3g}",
                f"{sp.reserved_epsilon:.4g}",
                "unlimited" if left is None else f"{left:.4g}",
            )
    console.print(table)
    history = Table(title="history (newest first)")
    for col in ("run", "dataset", "modalities", "status", "planned ε", "spent ε", "rounds"):
        history.add_column(col)
    for ds in datasets:
        for h in ledger.history(ds):
            history.add_row(
                str(h["run_id"]),
                str(h["dataset"]),
                "+".join(h["modalities"]),  # type: ignore[arg-type]
                str(h["status"]),
                f"{h['planned_epsilon']:.4g}",
                _spent_text(h["spent_by_modality"]),  # type: ignore[arg-type]
                str(h["rounds_charged"]),
            )
    console.print(history)
    return 0


def _spent_text(by_modality: dict[str, float]) -> str:
    """One figure when every modality spent the same, else ``modality ε`` pairs."""
    values = set(by_modality.values())
    if len(values) <= 1:
        return f"{next(iter(values), 0.0):.4g}"
    return ", ".join(f"{m} {e:.4g}" for m, e in sorted(by_modality.items()))


def cmd_embed(args: argparse.Namespace) -> int:
    """Private embeddings of a device's records with a local model, charged to the device."""
    import uuid

    import numpy as np

    from mmshield.api import load_data, load_run_model
    from mmshield.privacy.embed import embed_records, gaussian_sigma, privatise
    from mmshield.privacy.ledger import PrivacyLedger
    from mmshield.privacy.noise import NoiseSource

    model, config = load_run_model(args.run_dir)
    train, test, _, _ = load_data(config)
    data = test if args.split == "test" else train
    if args.limit is not None:
        data = data.subset(np.arange(min(args.limit, len(data))))
    sigma = gaussian_sigma(args.epsilon, args.delta, args.clip)
    ledger = PrivacyLedger(args.ledger)
    dataset = f"device:{args.device}"
    release = f"embed-{uuid.uuid4().hex[:12]}"
    # Each record is released once, and records are disjoint: one (ε, δ) charge per call.
    ledger.admit(
        release,
        dataset,
        model.modalities,
        args.epsilon,
        args.delta,
        {"mechanism": "analytic Gaussian", "clip_norm": args.clip, "sigma": sigma},
    )
    try:
        noisy = privatise(
            embed_records(model, data), args.epsilon, args.delta, args.clip, NoiseSource(True)
        )
        np.save(args.out, noisy)
        ledger.charge(release, 1, args.epsilon, args.delta)
    finally:
        ledger.close_run(release)
    console.print(
        f"{len(noisy)} private embeddings (dimension {noisy.shape[1]}) written to {args.out}; "
        f"clip norm {args.clip:g}, noise σ = {sigma:.4g}, (ε = {args.epsilon:g}, "
        f"δ = {args.delta:g}) charged to {dataset}"
    )
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    """Classify records with a head evaluated in plaintext or, with --encrypted, under CKKS."""
    import time

    import numpy as np
    import torch

    from mmshield.api import load_data, load_run_model
    from mmshield.crypto.encrypted_inference import (
        InferenceClient,
        InferenceServer,
        LinearHead,
        PolyMLPHead,
        train_poly_head,
    )
    from mmshield.privacy.embed import embed_records

    if args.batch < 1 or args.hidden < 1:
        console.print("--batch and --hidden must be at least 1")
        return 2
    model, config = load_run_model(args.run_dir)
    train, test, _, _ = load_data(config)
    data = test if args.split == "test" else train
    if args.limit is not None:
        data = data.subset(np.arange(min(args.limit, len(data))))
    if len(data) == 0:
        console.print(f"no {args.split} records to classify")
        return 2
    labels = data.labels.numpy()
    # The server calibrates (and, for the polynomial head, trains) on training embeddings; the
    # client embeds its own records with its local copy of the model.
    calibration = embed_records(model, train)
    head: LinearHead | PolyMLPHead
    if args.head == "linear":
        head = LinearHead.from_module(model.head, calibration)  # type: ignore[arg-type]
    else:
        head = train_poly_head(calibration, train.labels.numpy(), hidden=args.hidden, seed=0)
    queries = embed_records(model, data)
    plain = head.logits(queries)
    table = Table(
        title=f"{args.head} head on {len(data)} {config.dataset.name} {args.split} records"
    )
    table.add_column("")
    table.add_column("value", justify="right")
    if args.head == "poly":
        own = model.head(torch.from_numpy(queries)).argmax(1).numpy()
        table.add_row("the model's own head: accuracy", f"{(own == labels).mean():.4f}")
    table.add_row("plaintext head accuracy", f"{(plain.argmax(1) == labels).mean():.4f}")
    if not args.encrypted:
        start = time.perf_counter()
        head.logits(queries)
        per_query = (time.perf_counter() - start) / max(len(queries), 1)
        table.add_row("latency per query (plaintext)", f"{per_query * 1e3:.4f} ms")
        console.print(table)
        console.print("no encryption: add --encrypted to evaluate the head under CKKS")
        return 0
    spec = head.spec()
    client = InferenceClient(spec.to_bytes())
    context = client.public_context()
    server = InferenceServer(context, head)  # holds no secret key
    single_ms = []
    for i in range(min(3, len(queries))):  # one query at a time, as a lone client would send it
        start = time.perf_counter()
        client.decrypt(server.evaluate(client.encrypt(queries[i])))
        single_ms.append((time.perf_counter() - start) * 1e3)
    logits, up, down, batch_ms = [], 0, 0, []
    for i in range(0, len(queries), args.batch):
        start = time.perf_counter()
        query = client.encrypt(queries[i : i + args.batch], args.layout)
        reply = server.evaluate(query)
        logits.append(client.decrypt(reply))
        batch_ms.append((time.perf_counter() - start) * 1e3)
        up, down = up + len(query), down + len(reply)
    enc = np.concatenate(logits)
    n = len(enc)
    table.add_row("encrypted head accuracy", f"{(enc.argmax(1) == labels).mean():.4f}")
    agree = (enc.argmax(1) == plain.argmax(1)).mean()
    table.add_row("agreement with the plaintext head", f"{agree:.4f}")
    table.add_row("max |logit difference|", f"{np.abs(enc - plain).max():.2e}")
    table.add_row("CKKS parameters", spec.params.describe())
    table.add_row("latency, one query (median of 3)", f"{float(np.median(single_ms)):.1f} ms")
    table.add_row(
        f"latency per batch of {args.batch} (median)",
        f"{float(np.median(batch_ms)):.1f} ms ({sum(batch_ms) / n:.2f} ms per query)",
    )
    table.add_row("evaluation context (once)", f"{len(context) / 1e6:.2f} MB")
    table.add_row("bytes up / down per query", f"{up / n:,.0f} / {down / n:,.0f}")
    console.print(table)
    console.print(
        "the server saw only ciphertexts and public evaluation keys (context "
        f"{client.fingerprint.hex()[:16]}); the client decrypted the logits"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mmshield`` command."""
    parser = argparse.ArgumentParser(
        prog="mmshield", description="Privacy-preserving multimodal federated learning."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="write a commented example config")
    p.add_argument("dir", nargs="?", default=".")
    p.add_argument("--force", action="store_true", help="overwrite an existing mmshield.yaml")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("run", help="train the run a config describes")
    p.add_argument("config")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"run store (default {DEFAULT_STORE})")
    p.add_argument("--rounds", type=int, default=None, help="override training.rounds")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("runs", help="list runs")
    p.add_argument("--store", default=DEFAULT_STORE)
    p.set_defaults(func=cmd_runs)
    p = sub.add_parser("report", help="write a run's HTML report and print its path")
    p.add_argument("run", help="run id or a unique prefix of it")
    p.add_argument("--store", default=DEFAULT_STORE)
    p.add_argument("--out", default=None, help="output file (default: RUN_DIR/report.html)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("budget", help="show or set privacy budgets (the privacy ledger)")
    p.add_argument("action", nargs="?", choices=["show", "set"], default="show")
    p.add_argument("dataset", nargs="?", default=None)
    p.add_argument("--epsilon", type=float, default=None)
    p.add_argument("--delta", type=float, default=None)
    p.add_argument("--modality", default="*", help="one modality (default *: every modality)")
    p.add_argument("--ledger", default=None, help="ledger file (default: $MMSHIELD_LEDGER)")
    p.set_defaults(func=cmd_budget)
    p = sub.add_parser("embed", help="private embeddings with a local model (no network)")
    p.add_argument("run_dir", help="a finished run's directory (its model.safetensors)")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=1.0, help="embedding clip norm C")
    p.add_argument("--device", required=True, help="device id charged in the ledger")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--limit", type=int, default=None, help="first N records only")
    p.add_argument("--out", required=True, help="output .npy file")
    p.add_argument("--ledger", default=None)
    p.set_defaults(func=cmd_embed)
    p = sub.add_parser(
        "infer", help="classify records with a head, in plaintext or under CKKS (--encrypted)"
    )
    p.add_argument("run_dir", help="a finished run's directory (its model.safetensors)")
    p.add_argument(
        "--encrypted",
        action="store_true",
        help="client encrypts its embeddings, server evaluates the head on ciphertexts",
    )
    p.add_argument(
        "--head",
        choices=["linear", "poly"],
        default="linear",
        help="the model's own linear head, or a polynomial MLP head trained on its embeddings",
    )
    p.add_argument("--hidden", type=int, default=32, help="hidden units of the polynomial head")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--limit", type=int, default=None, help="first N records only")
    p.add_argument("--batch", type=int, default=64, help="queries per encrypted request")
    p.add_argument(
        "--layout",
        choices=["auto", "packed", "expanded"],
        default="auto",
        help="ciphertext layout (expanded: polynomial head only, lowest latency for 1-2 queries)",
    )
    p.set_defaults(func=cmd_infer)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mmshield`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MMShieldError as exc:
        console.print("[bold red]error:[/bold red]", end=" ")
        console.print(str(exc), highlight=False, markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
