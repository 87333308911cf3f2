"""Self-contained HTML run reports and the ``mmshield runs`` table.

:func:`render_report` writes one HTML file with inline CSS, a few lines of inline script and
plots embedded as base64 PNG (drawn with matplotlib's Agg canvas), so the file can be mailed or
archived and opens offline: it loads nothing from anywhere. A Content-Security-Policy meta tag
enforces that.

Plots (each an ``<img class="plot" data-plot="NAME">``):

``accuracy_loss``
    Test accuracy and test/train loss per round (metrics ``test_accuracy``, ``test_loss``,
    ``train_loss``; any may be missing).
``accuracy_by_modalities``
    Final accuracy for each subset of available modalities (``summary["accuracy_by_modalities"]``).
``label_distribution``
    Labels x clients heat map (from the run directory's ``partition.json``).
``modality_availability``
    Share of each client's samples that have each modality (also from ``partition.json``).

A plot whose data is missing is left out with a short note in its place.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import yaml

from mmshield.report.store import RunInfo, RunStore

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from rich.table import Table

__all__ = ["PLOT_NAMES", "format_runs_table", "render_report"]

PLOT_NAMES = (
    "accuracy_loss",
    "accuracy_by_modalities",
    "label_distribution",
    "modality_availability",
)

_PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04"]
_RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "axes.edgecolor": "#9aa5b1",
    "axes.labelcolor": "#323f4b",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e4e7eb",
    "grid.linewidth": 0.8,
    "xtick.color": "#52606d",
    "ytick.color": "#52606d",
    "legend.frameon": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
_DPI = 150  # PNG resolution; images are shown at 96 CSS px per figure inch (sharp on HiDPI)


# --------------------------------------------------------------------------- formatting helpers


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _fmt_time(stamp: str | None) -> str:
    if not stamp:
        return "—"
    try:
        parsed = datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return f"{parsed:%Y-%m-%d %H:%M:%S} UTC"


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt_bytes(value: float) -> str:
    size = float(value)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size):,} bytes" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _fmt_pct(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _esc(value)
    if not math.isfinite(number):
        return str(number)
    return f"{number * 100:.1f}%" if -1e-9 <= number <= 1 + 1e-9 else f"{number:.4g}"


def _fmt_num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _esc(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "∞" if value > 0 else str(value)
    return f"{value:.4g}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _duration(created: str, finished: str | None) -> str | None:
    if not finished:
        return None
    try:
        delta = datetime.fromisoformat(finished) - datetime.fromisoformat(created)
    except (TypeError, ValueError):
        return None
    return _fmt_duration(delta.total_seconds())


# --------------------------------------------------------------------------- plots


@dataclass
class _Plot:
    name: str
    alt: str
    png: bytes
    width_px: int

    def img(self) -> str:
        data = base64.b64encode(self.png).decode("ascii")
        return (
            f'<img class="plot" alt="{_esc(self.alt)}" data-plot="{self.name}" '
            f'width="{self.width_px}" src="data:image/png;base64,{data}">'
        )


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _to_plot(fig: Figure, name: str, alt: str) -> _Plot:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    width = round(fig.get_figwidth() * 96)
    return _Plot(name=name, alt=alt, png=buf.getvalue(), width_px=width)


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=0)


def _rc() -> Any:
    import matplotlib

    return matplotlib.rc_context(cast(Any, _RC))


def _plot_accuracy_loss(metrics: Mapping[str, list[tuple[int, float]]]) -> _Plot | None:
    acc_names = [n for n in ("test_accuracy", "train_accuracy") if metrics.get(n)]
    loss_names = [n for n in ("test_loss", "train_loss") if metrics.get(n)]
    if not acc_names and not loss_names:
        return None
    panels = [names for names in (acc_names, loss_names) if names]
    rounds = max(len(metrics[n]) for group in panels for n in group)
    marker = "o" if rounds <= 40 else None
    with _rc():
        fig = _figure(9.5 if len(panels) == 2 else 7.0, 3.4)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, names in zip(axes, panels, strict=True):
            is_acc = names is acc_names
            for name in names:
                xs = [r for r, _ in metrics[name]]
                ys = [v for _, v in metrics[name]]
                ax.plot(
                    xs,
                    ys,
                    marker=marker,
                    markersize=4,
                    linewidth=2,
                    linestyle="--" if name.startswith("train") else "-",
                    color=_PALETTE[0 if name.startswith("test") else 1],
                    label=name.replace("_", " "),
                )
            finite = [v for n in names for _, v in metrics[n] if math.isfinite(v)]
            if is_acc:
                ax.set_title("Accuracy per round")
                ax.set_ylabel("accuracy")
                if finite and max(finite) <= 1.0:
                    ax.set_ylim(0, 1.02)
                    ax.yaxis.set_major_formatter(_percent_formatter())
            else:
                ax.set_title("Loss per round")
                ax.set_ylabel("loss")
                if finite and min(finite) >= 0:
                    ax.set_ylim(bottom=0)
            ax.set_xlabel("round")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(loc="best")
        parts = [n.replace("_", " ") for group in panels for n in group]
        return _to_plot(fig, "accuracy_loss", "Per-round " + ", ".join(parts))


def _plot_systems(metrics: Mapping[str, list[tuple[int, float]]]) -> _Plot | None:
    """Accuracy against simulated time, and who took part per round, for runs with a clock."""
    clock = dict(metrics.get("simulated_seconds", []))
    acc = [(clock[r], v) for r, v in metrics.get("test_accuracy", []) if r in clock]
    if not clock:
        return None
    rounds = sorted(clock)
    clients = dict(metrics.get("clients", []))
    dropped = dict(metrics.get("dropped", []))
    partial = dict(metrics.get("partial", []))
    with _rc():
        fig = _figure(9.5, 3.4)
        left, right = fig.subplots(1, 2)
        if acc:
            left.plot([t for t, _ in acc], [v for _, v in acc], color=_PALETTE[0], linewidth=2)
            left.set_ylim(0, 1.02)
            left.yaxis.set_major_formatter(_percent_formatter())
        left.set_title("Accuracy against simulated time")
        left.set_xlabel("simulated seconds")
        left.set_ylabel("test accuracy")
        sent = [clients.get(r, 0.0) for r in rounds]
        right.bar(rounds, sent, color=_PALETTE[0], label="sent an update")
        right.bar(
            rounds, [dropped.get(r, 0.0) for r in rounds], bottom=sent, color="#bbbbbb",
            label="dropped out",
        )  # fmt: skip
        right.plot(
            rounds, [partial.get(r, 0.0) for r in rounds], color=_PALETTE[1], marker=".",
            linewidth=1.5, label="did partial work",
        )  # fmt: skip
        right.set_title("Clients per round (or server step)")
        right.set_xlabel("round")
        right.set_ylabel("clients")
        right.xaxis.get_major_locator().set_params(integer=True)
        right.legend(loc="best")
        return _to_plot(
            fig, "systems", "Accuracy against simulated time; clients per round by outcome"
        )


def _plot_epsilon(
    metrics: Mapping[str, list[tuple[int, float]]], summary: Mapping[str, Any]
) -> _Plot | None:
    """Cumulative ε after each round (the ledger's charges), with the run's final ε.

    Runs whose phases read different modalities get one line per modality.
    """
    from matplotlib.ticker import MaxNLocator

    points = metrics.get("epsilon") or []
    if not points:
        return None
    final = _number(summary.get("epsilon"))
    per_modality = {
        k.split("/", 1)[1]: v for k, v in sorted(metrics.items()) if k.startswith("epsilon/")
    }
    distinct = len({tuple(v) for v in per_modality.values()}) > 1
    lines = per_modality if distinct else {"ε spent": points}
    with _rc():
        fig = _figure(7.0, 3.2)
        ax = fig.subplots()
        marker = "o" if len(points) <= 40 else None
        for i, (label, series) in enumerate(lines.items()):
            xs, ys = [r for r, _ in series], [v for _, v in series]
            ax.plot(
                xs, ys, color=_PALETTE[i % len(_PALETTE)], linewidth=2, marker=marker, label=label
            )
        if final is not None:
            ax.axhline(final, color="grey", linestyle="--", label=f"final ε = {final:.3g}")
        ax.set_title("Privacy spent (cumulative ε after each round)")
        ax.set_xlabel("round")
        ax.set_ylabel("ε")
        ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="best")
        return _to_plot(fig, "epsilon", "Cumulative ε after each round")


def _modality_key(item: tuple[str, float]) -> tuple[int, float, str]:
    name, value = item
    return (-len([p for p in re.split(r"[+,&]", name) if p.strip()]), -value, name)


def _plot_accuracy_by_modalities(by_mod: Mapping[str, Any]) -> _Plot | None:
    items = [(str(k), v) for k, v in by_mod.items() if _number(v) is not None]
    values = sorted(((k, float(v)) for k, v in items), key=_modality_key)
    if not values:
        return None
    counts = [-_modality_key(item)[0] for item in values]
    top = max(counts)
    frac = all(0 <= v <= 1 for _, v in values)
    with _rc():
        fig = _figure(7.0, min(9.0, 1.0 + 0.42 * len(values)))
        ax = fig.subplots()
        ys = list(range(len(values)))[::-1]
        colors = [_PALETTE[min(top - c, len(_PALETTE) - 1)] for c in counts]
        ax.barh(ys, [v for _, v in values], color=colors, height=0.62)
        ax.set_yticks(ys, [k for k, _ in values])
        ax.grid(axis="y", visible=False)
        for y, (_, v) in zip(ys, values, strict=True):
            label = f"{v * 100:.1f}%" if frac else f"{v:.4g}"
            ax.text(v, y, f" {label}", va="center", ha="left", fontsize=9, color="#323f4b")
        if frac:
            ax.set_xlim(0, 1.12)
            ax.xaxis.set_major_formatter(_percent_formatter())
        ax.set_xlabel("test accuracy")
        ax.set_title("Accuracy by available modalities")
        return _to_plot(fig, "accuracy_by_modalities", "Test accuracy by available-modality subset")


def _heatmap(
    name: str,
    title: str,
    alt: str,
    matrix: list[list[float]],
    row_labels: Sequence[str],
    cmap: str,
    colorbar: str,
    percent: bool,
) -> _Plot:
    import numpy as np

    data = np.asarray(matrix, dtype=float)
    n_rows, n_cols = data.shape
    with _rc():
        width = min(11.0, max(7.5, 2.2 + 0.5 * n_cols))
        height = min(9.0, max(2.4, 1.3 + 0.36 * n_rows))
        fig = _figure(width, height)
        ax = fig.subplots()
        ax.grid(False)
        vmax = 1.0 if percent else max(float(np.nanmax(data)) if data.size else 1.0, 1.0)
        image = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0, vmax=vmax)
        ax.set_yticks(range(n_rows), list(row_labels))
        step = max(1, math.ceil(n_cols / 30))
        ax.set_xticks(range(0, n_cols, step), [str(i) for i in range(0, n_cols, step)])
        ax.set_xlabel("client")
        ax.set_title(title)
        for spine in ax.spines.values():
            spine.set_visible(False)
        if n_rows * n_cols <= 300 and n_cols <= 24:
            for (r, c), value in np.ndenumerate(data):
                text = f"{value * 100:.0f}%" if percent else f"{value:.0f}"
                color = "white" if value > 0.6 * vmax else "#1f2933"
                ax.text(c, r, text, ha="center", va="center", fontsize=8, color=color)
        bar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.01)
        bar.set_label(colorbar)
        bar.outline.set_visible(False)
        if percent:
            bar.ax.yaxis.set_major_formatter(_percent_formatter())
        return _to_plot(fig, name, alt)


def _plot_labels(part: Mapping[str, Any]) -> _Plot:
    classes = [str(c) for c in part["classes"]]
    counts = [[float(x) for x in row] for row in part["label_counts"]]
    if not counts or any(len(row) != len(classes) for row in counts):
        raise ValueError(
            f"label_counts must have one row per client with {len(classes)} counts (one per class)"
        )
    matrix = [[row[k] for row in counts] for k in range(len(classes))]  # classes x clients
    return _heatmap(
        "label_distribution",
        "Labels per client",
        "Heat map of label counts per class and client",
        matrix,
        classes,
        "Blues",
        "samples",
        percent=False,
    )


def _plot_availability(part: Mapping[str, Any]) -> _Plot:
    modalities = [str(m) for m in part["modalities"]]
    present = part["modality_counts"]
    sizes = part.get("client_sizes")
    if sizes is None:
        sizes = [sum(row) for row in part["label_counts"]]
    sizes = [float(s) for s in sizes]
    matrix = []
    for modality in modalities:
        row = [float(x) for x in present[modality]]
        if len(row) != len(sizes):
            raise ValueError(
                f"modality_counts[{modality!r}] has {len(row)} entries for {len(sizes)} clients"
            )
        matrix.append([n / s if s > 0 else 0.0 for n, s in zip(row, sizes, strict=True)])
    if not matrix or not sizes:
        raise ValueError("no modalities or no clients")
    return _heatmap(
        "modality_availability",
        "Modality availability per client",
        "Heat map of the share of each client's samples that have each modality",
        matrix,
        modalities,
        "Greens",
        "share of samples",
        percent=True,
    )


# --------------------------------------------------------------------------- HTML pieces

_CSS = """
:root { --ink:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f3f5f8; --card:#fff;
  --accent:#2563eb; --ok:#15803d; --bad:#b91c1c; --warn:#b45309; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  "Noto Sans", "Liberation Sans", sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 28px 20px 40px; }
h1 { font-size: 24px; margin: 2px 0 12px; font-weight: 650; letter-spacing: -0.01em; }
h2 { font-size: 17px; margin: 0 0 14px; font-weight: 620; }
h3 { font-size: 14px; margin: 0 0 8px; color: var(--muted); font-weight: 600;
  text-transform: uppercase; letter-spacing: .04em; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 20px 24px; margin: 0 0 18px; box-shadow: 0 1px 2px rgba(15,23,42,.04); }
.eyebrow { color: var(--accent); font-weight: 650; font-size: 13px; letter-spacing: .06em;
  text-transform: uppercase; }
.mono, code, pre { font-family: ui-monospace, "SF Mono", Menlo, Consolas, "DejaVu Sans Mono",
  "Liberation Mono", monospace; }
.meta { display: grid; grid-template-columns: repeat(auto-fit, minmax(170px, 1fr));
  gap: 12px 24px; margin: 0; }
.meta div { min-width: 0; }
.meta dt { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .05em; }
.meta dd { margin: 2px 0 0; font-weight: 560; overflow-wrap: anywhere; }
.badge { display: inline-block; padding: 1px 10px; border-radius: 999px; font-size: 13px;
  font-weight: 650; border: 1px solid currentColor; }
.badge.finished { color: var(--ok); background: #f0fdf4; }
.badge.failed { color: var(--bad); background: #fef2f2; }
.badge.running { color: var(--warn); background: #fffbeb; }
.error { border-left: 4px solid var(--bad); background: #fef2f2; }
.error pre { margin: 0; white-space: pre-wrap; color: #7f1d1d; }
.cols { display: grid; grid-template-columns: minmax(0, 1.15fr) minmax(0, 1fr); gap: 28px; }
@media (max-width: 760px) { .cols { grid-template-columns: 1fr; } }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
table.kv th { color: var(--muted); font-weight: 500; width: 44%; }
table.kv td { font-weight: 560; }
td.num, th.num { text-align: right; }
.sub { color: var(--muted); font-weight: 400; font-size: 13px; }
.protect { border-left: 4px solid var(--accent); }
.protect p { margin: 0 0 8px; }
.protect ul { margin: 4px 0 0; padding-left: 20px; }
figure { margin: 0 0 18px; text-align: center; }
figure:last-child { margin-bottom: 0; }
img.plot { max-width: 100%; height: auto; }
.note { color: var(--muted); font-style: italic; margin: 0 0 12px; }
details summary { cursor: pointer; font-weight: 600; }
details table { margin-top: 12px; font-size: 13px; }
.scroll { overflow-x: auto; }
pre.config { background: #f8fafc; border: 1px solid var(--line); border-radius: 8px;
  padding: 14px 16px; overflow-x: auto; font-size: 13px; line-height: 1.5; margin: 0; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 24px; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var n = 0;
  document.querySelectorAll("img.plot").forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { n += 1; }
  });
  document.body.dataset.plotsLoaded = String(n);
});
"""

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)

_DP_WORDS = re.compile(r"differential[\s_-]*privacy|\bdp(-?sgd)?\b", re.IGNORECASE)
_SECAGG_WORDS = re.compile(r"secure[\s_-]*aggregation|\bsec[\s_-]*agg\b", re.IGNORECASE)
_HE_WORDS = re.compile(r"homomorphic[\s_-]*encryption", re.IGNORECASE)


def _dp_text(summary: Mapping[str, Any]) -> str:
    epsilon = _number(summary.get("epsilon"))
    if epsilon is None:
        return "no differential privacy"
    eps = "∞" if math.isinf(epsilon) else f"{epsilon:.3g}"
    delta = _number(summary.get("delta"))
    return f"ε = {eps}" + (f", δ = {delta:.3g}" if delta is not None else "")


def _protected_paragraph(summary: Mapping[str, Any]) -> str:
    raw = summary.get("protections") or []
    protections = [str(p) for p in raw] if isinstance(raw, list | tuple) else [str(raw)]
    epsilon = _number(summary.get("epsilon"))
    dp = epsilon is not None or any(_DP_WORDS.search(p) for p in protections)
    secagg = any(_SECAGG_WORDS.search(p) for p in protections)
    encrypted = any(_HE_WORDS.search(p) for p in protections)
    sentences = [
        "Raw records never left their owner's client: clients trained locally and sent only "
        "model updates to the server."
    ]
    if dp:
        guarantee = f" ({_esc(_dp_text(summary))})" if epsilon is not None else ""
        unit = "client's whole data" if summary.get("privacy_unit") == "client" else "record"
        sentences.append(
            "Differential privacy limited how much the updates and the final model can reveal "
            f"about any single {unit}{guarantee}."
        )
    else:
        sentences.append(
            "No differential privacy was applied, so the model updates and the final model may "
            "still reveal information about individual records (for example to membership "
            "inference)."
        )
    if secagg:
        sentences.append(
            "Secure aggregation hid each client's individual update from the server, which saw "
            "only the aggregate."
        )
    elif encrypted:
        sentences.append(
            "Homomorphic encryption hid each client's individual update from the server, which "
            "only added ciphertexts; the key holder decrypted only the aggregate."
        )
    else:
        sentences.append(
            "No secure aggregation was used: the server saw each client's individual update."
        )
    out = f"<p>{' '.join(sentences)}</p>"
    if protections:
        items = "".join(f"<li>{_esc(p)}</li>" for p in protections)
        out += f"<p class='sub'>Protections recorded for this run:</p><ul>{items}</ul>"
    return out


def _privacy_split_table(summary: Mapping[str, Any]) -> str:
    """The privacy budget's split over training phases and modalities (sample-level DP)."""
    split = summary.get("privacy_split")
    by_modality = summary.get("epsilon_by_modality")
    if not isinstance(split, list) or not split or not isinstance(by_modality, Mapping):
        return ""
    rows = "".join(
        f"<tr><td>{_esc(p.get('phase'))}</td><td class='num'>{_esc(p.get('rounds'))}</td>"
        f"<td>{_esc(', '.join(map(str, p.get('modalities') or [])))}</td>"
        f"<td class='num'>{_fmt_num(p.get('noise_multiplier'))}</td>"
        f"<td>{_esc(p.get('set_by'))}</td></tr>"
        for p in split
        if isinstance(p, Mapping)
    )
    eps = "".join(
        f"<tr><td>{_esc(m)}</td><td class='num'>{_fmt_num(e)}</td></tr>"
        for m, e in sorted(by_modality.items())
    )
    return (
        "<div class='cols'><div><h3>Noise per training phase</h3><div class='scroll'><table>"
        "<thead><tr><th>phase</th><th class='num'>rounds</th><th>reads</th>"
        "<th class='num'>noise multiplier</th><th>set by the budget of</th></tr></thead>"
        f"<tbody>{rows}</tbody></table></div></div><div><h3>ε per modality</h3><table>"
        f"<thead><tr><th>modality</th><th class='num'>ε</th></tr></thead><tbody>{eps}</tbody>"
        "</table></div></div>"
    )


def _results_rows(summary: Mapping[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if "accuracy" in summary:
        rows.append(("Test accuracy", _fmt_pct(summary["accuracy"])))
    rows.append(("Differential privacy", _esc(_dp_text(summary))))
    for key, label in (("clients", "Clients"), ("rounds", "Rounds")):
        if key in summary:
            rows.append((label, _fmt_num(summary[key])))
    for key, label in (
        ("wall_seconds", "Wall-clock time"),
        ("simulated_seconds", "Simulated time"),
    ):
        seconds = _number(summary.get(key))
        if seconds is not None:
            rows.append(
                (label, f"{_fmt_duration(seconds)} <span class='sub'>({seconds:,.1f} s)</span>")
            )
    he = summary.get("encryption")
    if isinstance(he, Mapping) and _number(he.get("plaintext_bytes_up")):
        cipher, plain = (
            _number(he.get("ciphertext_bytes_up")) or 0.0,
            _number(he["plaintext_bytes_up"]) or 1.0,
        )
        rows.append(
            (
                "Encrypted uploads",
                f"{_fmt_bytes(cipher)} of ciphertext; {_fmt_bytes(plain)} without encryption "
                f"<span class='sub'>({cipher / plain:.2f}x)</span>",
            )
        )
    for key, label in (("bytes_up", "Sent to server"), ("bytes_down", "Sent to clients")):
        size = _number(summary.get(key))
        if size is not None:
            rows.append(
                (
                    f"{label} <span class='sub'>({key})</span>",
                    f"{_fmt_bytes(size)}"
                    + (f" <span class='sub'>({int(size):,} bytes)</span>" if size >= 1024 else ""),
                )
            )
    return rows


def _kv_table(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='kv'>{body}</table>"


def _modality_table(by_mod: Mapping[str, Any]) -> str:
    items = sorted(
        ((str(k), v) for k, v in by_mod.items()),
        key=lambda kv: _modality_key((kv[0], _number(kv[1]) or 0.0)),
    )
    body = "".join(
        f"<tr><td>{_esc(k)}</td><td class='num'>{_fmt_pct(v)}</td></tr>" for k, v in items
    )
    return (
        "<table><thead><tr><th>Available modalities</th><th class='num'>Accuracy</th></tr>"
        f"</thead><tbody>{body}</tbody></table>"
    )


def _rounds_table(metrics: Mapping[str, list[tuple[int, float]]]) -> str:
    names = sorted(metrics)
    by_round: dict[int, dict[str, float]] = {}
    for name in names:
        for rnd, value in metrics[name]:
            by_round.setdefault(rnd, {})[name] = value
    head = "".join(f"<th class='num'>{_esc(n)}</th>" for n in names)
    body = "".join(
        f"<tr><td>{rnd}</td>"
        + "".join(
            f"<td class='num'>{_fmt_num(values[n]) if n in values else '—'}</td>" for n in names
        )
        + "</tr>"
        for rnd, values in sorted(by_round.items())
    )
    return (
        f"<details><summary>Per-round metrics ({len(by_round)} rounds)</summary>"
        f"<div class='scroll'><table><thead><tr><th>round</th>{head}</tr></thead>"
        f"<tbody>{body}</tbody></table></div></details>"
    )


def _figure_html(plot: _Plot | None, missing: str) -> str:
    if plot is None:
        return f"<p class='note'>{_esc(missing)}</p>"
    return f"<figure>{plot.img()}</figure>"


def _load_partition(run_dir: Path) -> tuple[dict[str, Any] | None, str]:
    path = run_dir / "partition.json"
    if not path.is_file():
        return None, f"No partition.json in {run_dir}, so the data distribution is not shown."
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{path} could not be read ({exc}); the data distribution is not shown."
    if not isinstance(data, dict):
        return None, f"{path} is not a JSON object; the data distribution is not shown."
    return data, ""


def _try_plot(
    func: Callable[[Mapping[str, Any]], _Plot], part: Mapping[str, Any], what: str, source: Path
) -> tuple[_Plot | None, str]:
    try:
        return func(part), ""
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        return None, f"The {what} plot is not shown: {source} is malformed ({detail})."


# --------------------------------------------------------------------------- public API


def render_report(store: RunStore, run_id: str, out: Path | None = None) -> Path:
    """Write a self-contained HTML report for one run.

    Parameters
    ----------
    store
        The run store holding the run.
    run_id
        Full id or unique prefix.
    out
        Output file (default ``<run_dir>/report.html``); parent folders are created.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    StoreError
        Unknown or ambiguous run id, or the store cannot be read.
    OSError
        The report file cannot be written.
    """
    from mmshield import __version__

    run = store.get_run(run_id)
    metrics = store.metrics(run.run_id)
    artefacts = store.artefact_records(run.run_id)
    summary: dict[str, Any] = run.summary or {}
    out = Path(out) if out is not None else run.run_dir / "report.html"

    by_mod = summary.get("accuracy_by_modalities")
    by_mod = by_mod if isinstance(by_mod, Mapping) else {}
    plot_curves = _plot_accuracy_loss(metrics)
    plot_systems = _plot_systems(metrics)
    plot_epsilon = _plot_epsilon(metrics, summary)
    plot_mods = _plot_accuracy_by_modalities(by_mod) if by_mod else None
    part, part_note = _load_partition(run.run_dir)
    part_path = run.run_dir / "partition.json"
    plot_labels = plot_avail = None
    notes: list[str] = []
    if part is None:
        notes.append(part_note)
    else:
        plot_labels, note = _try_plot(_plot_labels, part, "labels per client", part_path)
        notes += [note] if note else []
        plot_avail, note = _try_plot(_plot_availability, part, "modality availability", part_path)
        notes += [note] if note else []

    status = _esc(run.status)
    meta = [
        ("Dataset", _esc(run.dataset)),
        ("Status", f"<span class='badge {status}'>{status}</span>"),
        ("Created", _esc(_fmt_time(run.created_at))),
        ("Finished", _esc(_fmt_time(run.finished_at))),
    ]
    duration = _duration(run.created_at, run.finished_at)
    if duration:
        meta.append(("Duration", _esc(duration)))
    meta_html = "".join(f"<div><dt>{k}</dt><dd>{v}</dd></div>" for k, v in meta)

    sections: list[str] = [
        "<header class='card'><div class='eyebrow'>mmshield · run report</div>"
        f"<h1 class='mono'>{_esc(run.run_id)}</h1><dl class='meta'>{meta_html}</dl></header>"
    ]
    if run.error:
        sections.append(
            f"<section class='card error'><h2>Run failed</h2><pre>{_esc(run.error)}</pre></section>"
        )

    if run.summary is None:
        pending = (
            "The run is still running" if run.status == "running" else "The run stopped"
        ) + " and has no final summary yet."
        results = f"<p class='note'>{pending}</p>"
    else:
        right = (
            f"<div><h3>Accuracy by available modalities</h3>{_modality_table(by_mod)}</div>"
            if by_mod
            else ""
        )
        results = (
            f"<div class='cols'><div><h3>Final metrics</h3>"
            f"{_kv_table(_results_rows(summary))}</div>{right}</div>"
        )
    sections.append(f"<section class='card'><h2>Results</h2>{results}</section>")
    sections.append(
        "<section class='card protect'><h2>What was protected</h2>"
        f"{_protected_paragraph(summary)}{_privacy_split_table(summary)}</section>"
    )

    progress = _figure_html(plot_curves, "No per-round accuracy or loss was logged for this run.")
    for extra in (plot_systems, plot_epsilon):
        if extra is not None:
            progress += _figure_html(extra, "")
    if metrics:
        progress += _rounds_table(metrics)
    sections.append(f"<section class='card'><h2>Training progress</h2>{progress}</section>")
    if plot_mods is not None:
        sections.append(
            "<section class='card'><h2>Accuracy by available modalities</h2>"
            f"{_figure_html(plot_mods, '')}</section>"
        )
    data_html = "".join(f"<p class='note'>{_esc(n)}</p>" for n in notes)
    data_html += "".join(_figure_html(p, "") for p in (plot_labels, plot_avail) if p is not None)
    if part is not None:
        sizes = part.get("client_sizes")
        if isinstance(sizes, list) and sizes and all(_number(s) is not None for s in sizes):
            total = sum(int(_number(s) or 0) for s in sizes)
            data_html = (
                f"<p class='sub'>{len(sizes)} clients, {total:,} training samples "
                f"({min(int(_number(s) or 0) for s in sizes):,}–"
                f"{max(int(_number(s) or 0) for s in sizes):,} per client).</p>"
            ) + data_html
    sections.append(f"<section class='card'><h2>Data across clients</h2>{data_html}</section>")

    if artefacts:
        rows = "".join(
            f"<tr><td>{_esc(name)}</td><td class='mono'>{_esc(_display_path(path, run.run_dir))}"
            f"</td><td class='num'>{_fmt_bytes(size)}</td>"
            f"<td class='mono' title='{_esc(sha)}'>{_esc(sha[:16])}…</td></tr>"
            for name, path, sha, size in artefacts
        )
        sections.append(
            "<section class='card'><h2>Artefacts</h2><div class='scroll'><table><thead><tr>"
            "<th>name</th><th>path</th><th class='num'>size</th><th>sha256</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div></section>"
        )

    config_yaml = yaml.safe_dump(run.config, sort_keys=False, allow_unicode=True)
    sections.append(
        "<section class='card'><h2>Configuration</h2>"
        f"<pre class='config'>{_esc(config_yaml)}</pre></section>"
    )
    generated = datetime.now(UTC).isoformat(timespec="seconds")
    footer = (
        f"<footer>Generated by mmshield {_esc(__version__)} on {_esc(_fmt_time(generated))}. "
        "This file is self-contained and loads nothing from the network.</footer>"
    )
    title = f"mmshield run {run.run_id} · {run.dataset}"
    document = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n"
        f"<body data-plots-loaded='0'><main>\n"
        + "\n".join(sections)
        + f"\n{footer}</main><script>{_SCRIPT}</script></body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(document, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _display_path(path: Path, run_dir: Path) -> str:
    try:
        return path.relative_to(run_dir).as_posix()
    except ValueError:
        return str(path)


def format_runs_table(runs: list[RunInfo]) -> Table:
    """Build the ``mmshield runs`` table.

    Parameters
    ----------
    runs
        Runs to show, in display order (:meth:`RunStore.list_runs` gives newest first).

    Returns
    -------
    rich.table.Table
        Columns id, created, status, dataset, rounds, clients, accuracy; ``—`` marks values a run
        has not recorded (e.g. a running run has no summary yet).
    """
    from rich.table import Table
    from rich.text import Text

    table = Table(title="mmshield runs", title_justify="left", header_style="bold")
    table.add_column("id", style="cyan", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("dataset")
    table.add_column("rounds", justify="right")
    table.add_column("clients", justify="right")
    table.add_column("accuracy", justify="right")
    styles = {"finished": "green", "failed": "red", "running": "yellow"}
    for run in runs:
        summary = run.summary or {}
        created = _fmt_time(run.created_at).removesuffix(" UTC")
        accuracy = _number(summary.get("accuracy"))
        rounds = summary.get("rounds")
        clients = summary.get("clients")
        table.add_row(
            Text(run.run_id),
            created,
            Text(run.status, style=styles.get(run.status, "")),
            Text(run.dataset),
            str(rounds) if rounds is not None else "—",
            str(clients) if clients is not None else "—",
            _fmt_pct(accuracy) if accuracy is not None else "—",
        )
    return table
