"""The privacy ledger: budgets, admission, per-round charges, races and crashes."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mmshield.cli import main
from mmshield.errors import PrivacyError
from mmshield.privacy.ledger import PrivacyLedger
from mmshield.report.store import RunStore

ROOT = Path(__file__).resolve().parent.parent


def test_admission_respects_every_modality_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "l.db")
    ledger.set_budget("ds", 5.0, 1e-5)  # every modality
    ledger.set_budget("ds", 2.0, 1e-5, modality="audio")  # audio is more sensitive
    ledger.admit("r1", "ds", ["image"], 3.0, 1e-6, {})
    ledger.charge("r1", 1, 3.0, 1e-6)
    ledger.close_run("r1")
    with pytest.raises(PrivacyError, match=r"image: needs ε 2.5, 2 left of 5"):
        ledger.admit("r2", "ds", ["image", "audio"], 2.5, 1e-6, {})
    with pytest.raises(PrivacyError, match=r"audio: needs ε 2.5, 2 left of 2"):
        ledger.admit("r3", "ds", ["audio"], 2.5, 1e-6, {})
    ledger.admit("r4", "ds", ["image", "audio"], 2.0, 1e-6, {})  # exactly what is left
    spend = {s.modality: s for s in ledger.spend("ds")}
    assert spend["image"].reserved_epsilon == 2.0 and spend["image"].remaining_epsilon == 0.0
    assert spend["audio"].spent_epsilon == 0.0  # r1 read only images


def _admit(path: str, run_id: str, start: object, out: object) -> None:
    start.wait()  # type: ignore[attr-defined]
    try:
        PrivacyLedger(path).admit(run_id, "ds", ["image"], 1.0, 1e-6, {})
        out.put((run_id, "admitted"))  # type: ignore[attr-defined]
    except PrivacyError:
        out.put((run_id, "refused"))  # type: ignore[attr-defined]


def test_two_runs_racing_for_the_last_budget_cannot_both_be_admitted(tmp_path: Path) -> None:
    path = str(tmp_path / "l.db")
    PrivacyLedger(path).set_budget("ds", 1.5, 1e-5)
    ctx = multiprocessing.get_context("spawn")
    for trial in range(3):
        start, out = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(target=_admit, args=(path, f"t{trial}-{i}", start, out)) for i in range(4)
        ]
        for p in procs:
            p.start()
        start.set()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        # Exactly one wins each time (the previous winner's process has exited, so the next
        # admission marks it interrupted and releases its reservation: it never charged).
        assert [r for _, r in results].count("admitted") == 1


def _dp_config(tmp_path: Path, rounds: int) -> Path:
    cfg = {
        "dataset": {"name": "fedprox-synthetic", "alpha": 0.5, "beta": 0.5},
        "partition": {"clients": 30, "scheme": "natural"},
        "model": {"fusion": "concat", "fusion_hidden": 0},
        "training": {"rounds": rounds, "clients_per_round": 5, "local_epochs": 1},
        "privacy": {
            "client_level": {"noise_multiplier": 1.0, "delta": 1e-3},
            "secure_noise": False,
        },
    }
    path = tmp_path / f"dp{rounds}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_runs_are_charged_per_round_and_refused_when_the_budget_is_gone(tmp_path: Path) -> None:
    ledger = PrivacyLedger(os.environ["MMSHIELD_LEDGER"])
    store = tmp_path / "m.db"
    assert main(["run", str(_dp_config(tmp_path, 3)), "--store", str(store), "--quiet"]) == 0
    run = RunStore(store).list_runs()[0]
    eps = [v for _, v in RunStore(store).metrics(run.run_id)["epsilon"]]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(run.summary["epsilon"])  # type: ignore[index]
    (hist,) = ledger.history("fedprox-synthetic")
    assert hist["status"] == "finished" and hist["rounds_charged"] == 3
    # A budget smaller than what is already spent plus another run refuses the next one.
    ledger.set_budget("fedprox-synthetic", eps[-1] * 1.5, 1e-2)
    assert main(["run", str(_dp_config(tmp_path, 3)), "--store", str(store), "--quiet"]) == 2
    refused = RunStore(store).list_runs()[0]
    assert refused.status == "failed" and "remaining budget" in (refused.error or "")
    assert RunStore(store).metrics(refused.run_id) == {}
    assert main(["budget"]) == 0


@pytest.mark.slow
def test_killing_a_run_midway_leaves_the_ledger_consistent(tmp_path: Path) -> None:
    ledger_path = os.environ["MMSHIELD_LEDGER"]
    store = tmp_path / "m.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmshield.cli", "run", str(_dp_config(tmp_path, 400)),
         "--store", str(store), "--quiet"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ledger = PrivacyLedger(ledger_path)
    deadline = time.time() + 120
    while time.time() < deadline:
        hist = ledger.history()
        if hist and int(hist[0]["rounds_charged"]) >= 3:  # type: ignore[call-overload]
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run,) = ledger.history()
    charged = int(run["rounds_charged"])  # type: ignore[call-overload]
    assert 3 <= charged < 400 and run["status"] == "running"
    # The spend is the last charged round's cumulative ε: below the plan, above zero.
    assert 0 < float(run["spent_epsilon"]) < float(run["planned_epsilon"])  # type: ignore[arg-type]
    # The next admission notices the dead process and releases its reservation.
    ledger.admit("next", "fedprox-synthetic", ["features"], 0.1, 1e-6, {})
    (after,) = [h for h in ledger.history() if h["run_id"] == run["run_id"]]
    assert after["status"] == "interrupted" and after["rounds_charged"] == charged
    (spend,) = ledger.spend("fedprox-synthetic")
    assert spend.spent_epsilon == pytest.approx(float(run["spent_epsilon"]))  # type: ignore[arg-type]
    assert spend.reserved_epsilon == pytest.approx(0.1)


def test_per_modality_plans_and_charges(tmp_path: Path) -> None:
    """A phased run spends differently on each modality; admission and spend follow that."""
    ledger = PrivacyLedger(tmp_path / "l.db")
    ledger.set_budget("ds", 2.0, 1e-5, modality="image")
    ledger.set_budget("ds", 8.0, 1e-5, modality="audio")
    with pytest.raises(PrivacyError, match=r"image: needs ε 3"):
        ledger.admit("r0", "ds", ["image", "audio"], {"image": 3.0, "audio": 3.0}, 1e-6, {})
    ledger.admit("r1", "ds", ["image", "audio"], {"image": 2.0, "audio": 7.0}, 1e-6, {})
    ledger.charge("r1", 1, {"image": 1.0, "audio": 4.0}, 1e-6)
    spend = {s.modality: s for s in ledger.spend("ds")}
    assert spend["audio"].spent_epsilon == 4.0 and spend["audio"].reserved_epsilon == 3.0
    assert spend["image"].spent_epsilon == 1.0 and spend["image"].reserved_epsilon == 1.0
    ledger.charge("r1", 2, {"image": 2.0, "audio": 7.0}, 1e-6)
    ledger.close_run("r1")
    (run,) = ledger.history("ds")
    assert run["spent_by_modality"] == {"audio": 7.0, "image": 2.0}
    assert run["spent_epsilon"] == 7.0 and run["rounds_charged"] == 2
    ledger.admit("r2", "ds", ["audio"], 1.0, 1e-6, {})  # audio has 1 left; image has none
    with pytest.raises(PrivacyError, match=r"image: needs ε 0.1, 0 left of 2"):
        ledger.admit("r3", "ds", ["image"], 0.1, 1e-6, {})


def test_a_version_0_ledger_is_migrated_with_its_charges(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE budgets (dataset TEXT NOT NULL, modality TEXT NOT NULL,
            epsilon REAL NOT NULL, delta REAL NOT NULL, PRIMARY KEY (dataset, modality));
        CREATE TABLE runs (run_id TEXT PRIMARY KEY, dataset TEXT NOT NULL,
            modalities TEXT NOT NULL, planned_epsilon REAL NOT NULL, planned_delta REAL NOT NULL,
            mechanism TEXT NOT NULL, status TEXT NOT NULL, pid INTEGER, host TEXT,
            created_at REAL NOT NULL);
        CREATE TABLE charges (run_id TEXT NOT NULL REFERENCES runs(run_id),
            round INTEGER NOT NULL, epsilon REAL NOT NULL, delta REAL NOT NULL,
            at REAL NOT NULL, PRIMARY KEY (run_id, round));
        INSERT INTO budgets VALUES ('ds', '*', 5.0, 1e-5);
        INSERT INTO runs VALUES ('old', 'ds', '["audio", "image"]', 3.0, 1e-6, '{}',
            'finished', 1, 'h', 0.0);
        INSERT INTO charges VALUES ('old', 1, 1.5, 1e-6, 0.0);
        INSERT INTO charges VALUES ('old', 2, 3.0, 1e-6, 0.0);
        """
    )
    db.close()
    ledger = PrivacyLedger(path)
    spend = {s.modality: s.spent_epsilon for s in ledger.spend("ds")}
    assert spend == {"audio": 3.0, "image": 3.0}
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
    PrivacyLedger(path)  # opening again is a no-op
    assert ledger.history("ds")[0]["rounds_charged"] == 2
