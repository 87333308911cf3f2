"""End-to-end: `mmshield run` trains, stores and reports; `runs` and `report` find the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from mmshield.cli import example_config, main
from mmshield.report.store import RunStore

SUMMARY_KEYS = {
    "run_id",
    "dataset",
    "clients",
    "rounds",
    "accuracy",
    "accuracy_by_modalities",
    "epsilon",
    "delta",
    "wall_seconds",
    "bytes_up",
    "bytes_down",
}


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_run_fedprox_synthetic_end_to_end(tmp_path: Path, capsys) -> None:
    config = {
        "name": "synthetic",
        "dataset": {"name": "fedprox-synthetic", "alpha": 0.5, "beta": 0.5},
        "partition": {"clients": 30, "scheme": "natural"},
        "model": {"fusion": "concat", "fusion_hidden": 0},
        "training": {"rounds": 5, "clients_per_round": 10, "local_epochs": 1, "lr": 0.05},
        "systems": {
            "speed": {"kind": "pareto", "shape": 1.5},
            "step_seconds": 0.2,
            "dropout": 0.1,
            "stragglers": 0.3,
            "deadline": 30.0,
        },
    }
    store = tmp_path / "runs" / "mmshield.db"
    assert main(["run", str(_write(tmp_path, config)), "--store", str(store), "--quiet"]) == 0
    out = capsys.readouterr().out
    runs = RunStore(store).list_runs()
    assert len(runs) == 1 and runs[0].status == "finished"
    run_dir = runs[0].run_dir
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["clients"] == 30 and summary["rounds"] == 5 and summary["epsilon"] is None
    assert 0.0 <= summary["accuracy"] <= 1.0 and summary["bytes_up"] > 0
    assert 0 < summary["simulated_seconds"] <= 5 * 30.0
    assert summary["partial_clients"] > 0
    assert summary["client_updates"] + summary["dropped_clients"] == 50
    assert "simulated time" in out
    html = (run_dir / "report.html").read_text()
    assert "Simulated time" in html and 'data-plot="systems"' in html
    for name in (
        "config.yaml",
        "summary.json",
        "model.safetensors",
        "report.html",
        "partition.json",
    ):
        assert (run_dir / name).exists(), name
    assert "encoders.features.linear.weight" in load_file(str(run_dir / "model.safetensors"))
    assert str(run_dir / "report.html") in out.replace("\n", "")
    assert len(RunStore(store).metrics(runs[0].run_id)["test_accuracy"]) == 5
    assert main(["runs", "--store", str(store)]) == 0
    assert main(["report", runs[0].run_id[:15], "--store", str(store)]) == 0


@pytest.mark.slow
def test_av_digits_short_run_learns_all_modalities(tmp_path: Path) -> None:
    config = yaml.safe_load(example_config())
    config["training"]["rounds"] = 3
    store = tmp_path / "mmshield.db"
    assert main(["run", str(_write(tmp_path, config)), "--store", str(store), "--quiet"]) == 0
    summary = RunStore(store).list_runs()[0].summary
    assert summary is not None
    assert set(summary["accuracy_by_modalities"]) == {
        "image+audio+text",
        "image+audio",
        "image+text",
        "audio+text",
        "image",
        "audio",
        "text",
    }
    assert summary["accuracy"] > 0.5  # 3 short rounds already far above chance (0.1)


def test_failed_run_is_recorded_with_its_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,label,x\n1,a,1.0\n2,b,oops\n")
    config = {
        "dataset": {
            "name": "manifest",
            "path": str(manifest),
            "modalities": {"x": {"kind": "tabular", "columns": ["x"]}},
        },
        "partition": {"clients": 1, "scheme": "iid"},
    }
    store = tmp_path / "s.db"
    assert main(["run", str(_write(tmp_path, config)), "--store", str(store), "--quiet"]) == 2
    run = RunStore(store).list_runs()[0]
    assert run.status == "failed" and "row 3" in (run.error or "")
