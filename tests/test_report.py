"""Tests for the HTML run report and the ``mmshield runs`` table (mmshield.report.html)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from mmshield.report import PLOT_NAMES, RunStore, format_runs_table, render_report

CONFIG = {
    "fl": {"clients": 3, "rounds": 4},
    "model": {"note": "<script>alert('x')</script> & \"friends\""},
}
SUMMARY = {
    "accuracy": 0.875,
    "accuracy_by_modalities": {"image+audio+text": 0.875, "image": 0.8, "audio": 0.6, "text": 0.7},
    "epsilon": None,
    "delta": None,
    "clients": 3,
    "rounds": 4,
    "wall_seconds": 83.4,
    "simulated_seconds": 1260.0,
    "bytes_up": 12_897_484,
    "bytes_down": 2048,
}
PARTITION = {
    "classes": ["cat", "dog"],
    "modalities": ["image", "audio", "text"],
    "label_counts": [[10, 2], [3, 9], [5, 5]],
    "modality_counts": {"image": [12, 6, 10], "audio": [6, 12, 0], "text": [12, 12, 10]},
    "client_sizes": [12, 12, 10],
}
IMG = re.compile(
    r'<img class="plot" alt="[^"]+" data-plot="(\w+)"[^>]* src="data:image/png;base64,'
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    with RunStore(tmp_path / "runs" / "mmshield.db") as s:
        yield s


def make_run(store: RunStore, partition: bool = True, summary: dict | None = None) -> str:
    run = store.create_run(CONFIG, "toy-mm")
    for rnd in range(1, 5):
        store.log_round(
            run.run_id,
            rnd,
            {"test_accuracy": 0.5 + rnd / 10, "test_loss": 1.0 / rnd, "train_loss": 0.8 / rnd},
        )
    if partition:
        (run.run_dir / "partition.json").write_text(json.dumps(PARTITION))
    store.finish_run(run.run_id, SUMMARY if summary is None else summary)
    return run.run_id


def plots(page: str) -> dict[str, bytes]:
    out = {}
    for match in re.finditer(r'<img class="plot"[^>]*>', page):
        tag = match.group(0)
        name = re.search(r'data-plot="(\w+)"', tag)
        data = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert name and data, tag[:200]
        out[name.group(1)] = base64.b64decode(data.group(1), validate=True)
    return out


def test_report_has_all_plots_and_sections(store: RunStore) -> None:
    run_id = make_run(store)
    out = render_report(store, run_id[:12])
    run = store.get_run(run_id)
    assert out == run.run_dir / "report.html"
    page = out.read_text(encoding="utf-8")
    images = plots(page)
    assert set(images) == set(PLOT_NAMES)
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000 for png in images.values())
    assert len(IMG.findall(page)) == 4
    for text in (run_id, "toy-mm", "finished", "87.5%", "image+audio+text", "12.3 MiB", "2.0 KiB"):
        assert text in page
    assert "no differential privacy" in page
    assert "never left their owner" in page and "No secure aggregation" in page
    assert "1 min 23 s" in page and "21 min 00 s" in page
    assert "plotsLoaded" in page


def test_report_escapes_config_and_loads_nothing(store: RunStore) -> None:
    run_id = make_run(store, summary={**SUMMARY, "protections": ["<b>TLS</b> transport"]})
    page = render_report(store, run_id).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(" in page and "<script>alert(" not in page
    assert "&lt;b&gt;TLS&lt;/b&gt; transport" in page
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page and "url(" not in page
    for attr in re.findall(r'\b(?:src|href)\s*=\s*["\']([^"\']*)', page):
        assert attr.startswith("data:"), attr
    assert page.count("<script>") == 1  # only the tiny plot-counting script


def test_report_privacy_statements(store: RunStore) -> None:
    dp = {**SUMMARY, "epsilon": 2.5, "delta": 1e-5, "protections": ["secure aggregation (SecAgg+)"]}
    page = render_report(store, make_run(store, summary=dp)).read_text(encoding="utf-8")
    assert "ε = 2.5, δ = 1e-05" in page
    assert "no differential privacy" not in page
    assert "Secure aggregation hid" in page and "secure aggregation (SecAgg+)" in page


def test_report_without_partition_or_summary(store: RunStore, tmp_path: Path) -> None:
    run_id = make_run(store, partition=False)
    page = render_report(store, run_id).read_text(encoding="utf-8")
    assert set(plots(page)) == {"accuracy_loss", "accuracy_by_modalities"}
    assert "No partition.json" in page

    running = store.create_run(CONFIG, "toy-mm")
    out = render_report(store, running.run_id, tmp_path / "elsewhere" / "r.html")
    page = out.read_text(encoding="utf-8")
    assert plots(page) == {} and "still running" in page

    failed = store.create_run(CONFIG, "toy-mm")
    store.log_round(failed.run_id, 1, {"test_loss": 2.0})
    store.fail_run(failed.run_id, "client 2: <bad> data")
    page = render_report(store, failed.run_id).read_text(encoding="utf-8")
    assert set(plots(page)) == {"accuracy_loss"}
    assert "Run failed" in page and "client 2: &lt;bad&gt; data" in page


def test_report_malformed_partition_is_skipped(store: RunStore) -> None:
    run_id = make_run(store, partition=False)
    run_dir = store.get_run(run_id).run_dir
    bad = {**PARTITION, "modality_counts": {"image": [1]}}
    (run_dir / "partition.json").write_text(json.dumps(bad))
    page = render_report(store, run_id).read_text(encoding="utf-8")
    assert "label_distribution" in plots(page) and "modality_availability" not in plots(page)
    assert "malformed" in page
    (run_dir / "partition.json").write_text("{not json")
    page = render_report(store, run_id).read_text(encoding="utf-8")
    assert "could not be read" in page


def test_report_many_clients(store: RunStore) -> None:
    run = store.create_run(CONFIG, "big")
    n = 60
    part = {
        "classes": [f"c{k}" for k in range(10)],
        "modalities": ["image", "text"],
        "label_counts": [[(i * k) % 7 for k in range(10)] for i in range(n)],
        "modality_counts": {"image": [i % 5 for i in range(n)], "text": [0] * n},
        "client_sizes": [sum((i * k) % 7 for k in range(10)) for i in range(n)],
    }
    (run.run_dir / "partition.json").write_text(json.dumps(part))
    page = render_report(store, run.run_id).read_text(encoding="utf-8")
    assert {"label_distribution", "modality_availability"} <= set(plots(page))


def test_format_runs_table(store: RunStore) -> None:
    finished = make_run(store, partition=False)
    store.create_run(CONFIG, "[bold]odd[/bold]")
    console = Console(record=True, width=160, color_system=None)
    console.print(format_runs_table(store.list_runs()))
    text = console.export_text()
    for header in ("id", "created", "status", "dataset", "rounds", "clients", "accuracy"):
        assert header in text
    assert finished in text and "87.5%" in text and "finished" in text and "running" in text
    assert "[bold]odd[/bold]" in text  # dataset names are not parsed as rich markup
    lines = text.splitlines()
    running_line = next(i for i, line in enumerate(lines) if "running" in line)
    finished_line = next(i for i, line in enumerate(lines) if finished in line)
    assert running_line < finished_line  # newest first


@pytest.mark.browser
def test_report_renders_in_headless_chromium(store: RunStore, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary found")
    out = render_report(store, make_run(store))
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [*common, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", out.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-plots-loaded="{len(PLOT_NAMES)}"' in dom.stdout

    shot = tmp_path / "report.png"
    result = subprocess.run(
        [
            *common,
            f"--user-data-dir={tmp_path / 'profile-shot'}",
            "--window-size=1200,2400",
            f"--screenshot={shot}",
            out.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000) or []
    assert len(colours) > 200  # text, plots and colour maps, not a blank page
    assert shot.stat().st_size > 50_000
