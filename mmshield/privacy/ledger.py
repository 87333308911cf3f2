"""The privacy ledger: per-dataset, per-modality ε budgets and every run's spend, in SQLite.

A DP run is **admitted** before it trains: in one ``BEGIN IMMEDIATE`` transaction the ledger adds
what every modality it reads has already spent, what running runs have reserved, and what the new
run plans to spend, and refuses the run (naming the remaining budget) if any modality's budget would
be exceeded; otherwise it records the run with its reservation. Because the check and the
reservation happen in one write transaction, two runs racing for the last budget cannot both be
admitted. Each finished round is **charged** in its own transaction (the run's cumulative ε so
far), so a run that stops half-way has spent exactly what its completed rounds released. When it
finishes its final charge replaces the reservation. A run whose process died is marked
``interrupted`` at the next admission: its reservation is released, its charges stay.

Spend across runs composes by basic composition (ε and δ add up), which is valid for any
mechanisms; within a run the accountant's tighter composition gives the run's ε.

Budgets: a row ``(dataset, modality)``; modality ``*`` is the dataset's default for modalities
without their own row. No budget row: the run is admitted and recorded, without a limit.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mmshield.errors import PrivacyError, StoreError

ANY_MODALITY = "*"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    dataset TEXT NOT NULL, modality TEXT NOT NULL, epsilon REAL NOT NULL, delta REAL NOT NULL,
    PRIMARY KEY (dataset, modality));
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, dataset TEXT NOT NULL, modalities TEXT NOT NULL,
    planned_epsilon REAL NOT NULL, planned_delta REAL NOT NULL, mechanism TEXT NOT NULL,
    status TEXT NOT NULL, pid INTEGER, host TEXT, created_at REAL NOT NULL, planned TEXT);
CREATE TABLE IF NOT EXISTS charges (
    run_id TEXT NOT NULL REFERENCES runs(run_id), round INTEGER NOT NULL,
    modality TEXT NOT NULL DEFAULT '*',
    epsilon REAL NOT NULL, delta REAL NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (run_id, round, modality));
"""
# Version 1 added per-modality plans (runs.planned, JSON) and charges (charges.modality; ``*``
# charges every modality of the run). Version-0 files are migrated when first opened.
_VERSION = 1
_MIGRATE_0_TO_1 = """
ALTER TABLE runs ADD COLUMN planned TEXT;
CREATE TABLE charges_v1 (
    run_id TEXT NOT NULL REFERENCES runs(run_id), round INTEGER NOT NULL,
    modality TEXT NOT NULL DEFAULT '*',
    epsilon REAL NOT NULL, delta REAL NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (run_id, round, modality));
INSERT INTO charges_v1 SELECT run_id, round, '*', epsilon, delta, at FROM charges;
DROP TABLE charges;
ALTER TABLE charges_v1 RENAME TO charges;
"""


def default_ledger_path() -> Path:
    """``$MMSHIELD_LEDGER``, else ``$XDG_DATA_HOME/mmshield/ledger.db`` (``~/.local/share``)."""
    env = os.environ.get("MMSHIELD_LEDGER")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "mmshield" / "ledger.db"


@dataclass(frozen=True)
class Spend:
    """Budget and spend of one dataset modality."""

    dataset: str
    modality: str
    budget_epsilon: float | None
    budget_delta: float | None
    spent_epsilon: float
    spent_delta: float
    reserved_epsilon: float

    @property
    def remaining_epsilon(self) -> float | None:
        """What is left for new runs (``None``: no budget)."""
        if self.budget_epsilon is None:
            return None
        return self.budget_epsilon - self.spent_epsilon - self.reserved_epsilon


class PrivacyLedger:
    """The ledger database at ``path`` (created if missing)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_ledger_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                db.execute("BEGIN IMMEDIATE")  # one process creates or migrates; others wait
                version = db.execute("PRAGMA user_version").fetchone()[0]
                fresh = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
                if version == 0 and not fresh:
                    for statement in _MIGRATE_0_TO_1.split(";"):
                        if statement.strip():
                            db.execute(statement)
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {_VERSION}")
                db.execute("COMMIT")
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the privacy ledger: {exc}") from None

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the privacy ledger: {exc}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    # ------------------------------------------------------------------ budgets

    def set_budget(
        self, dataset: str, epsilon: float, delta: float, modality: str = ANY_MODALITY
    ) -> None:
        """Set (or replace) the budget of ``dataset``'s ``modality`` (``*``: every modality)."""
        if not epsilon > 0 or not 0 < delta < 1:
            raise PrivacyError(f"a budget needs ε > 0 and 0 < δ < 1 (got {epsilon}, {delta})")
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO budgets VALUES (?, ?, ?, ?)",
                (dataset, modality, epsilon, delta),
            )

    def spend(self, dataset: str, modalities: Sequence[str] | None = None) -> list[Spend]:
        """Budget, spend and reservations per modality of ``dataset``."""
        with self._tx() as db:
            return self._spend(db, dataset, modalities)

    def _spend(
        self, db: sqlite3.Connection, dataset: str, modalities: Sequence[str] | None
    ) -> list[Spend]:
        budgets = {
            m: (e, d)
            for m, e, d in db.execute(
                "SELECT modality, epsilon, delta FROM budgets WHERE dataset = ?", (dataset,)
            )
        }
        runs = db.execute(
            "SELECT run_id, modalities, planned_epsilon, planned, status FROM runs "
            "WHERE dataset = ?",
            (dataset,),
        ).fetchall()
        # A run's last charged round holds its cumulative spend, one row per modality it
        # charged separately (``*``: all of them alike).
        charged: dict[str, dict[str, tuple[float, float]]] = {}
        for r, m, e, d in db.execute(
            "SELECT c.run_id, c.modality, c.epsilon, c.delta FROM charges c JOIN runs USING "
            "(run_id) WHERE runs.dataset = ? AND c.round = (SELECT MAX(round) FROM charges c2 "
            "WHERE c2.run_id = c.run_id)",
            (dataset,),
        ):
            charged.setdefault(r, {})[m] = (e, d)
        if modalities is not None:
            names = set(modalities)
        else:
            names = {m for m in budgets if m != ANY_MODALITY}
            for _, mods, _, _, _ in runs:
                names |= set(json.loads(mods))
        out = []
        for m in sorted(names):
            budget = budgets.get(m, budgets.get(ANY_MODALITY))
            spent_e = spent_d = reserved = 0.0
            for run_id, mods, planned_max, planned, status in runs:
                if m not in json.loads(mods):
                    continue
                rows = charged.get(run_id, {})
                e, d = rows.get(m, rows.get(ANY_MODALITY, (0.0, 0.0)))
                spent_e += e
                spent_d += d
                if status == "running":
                    plan = json.loads(planned).get(m, planned_max) if planned else planned_max
                    reserved += max(plan - e, 0.0)
            out.append(
                Spend(
                    dataset,
                    m,
                    budget[0] if budget else None,
                    budget[1] if budget else None,
                    spent_e,
                    spent_d,
                    reserved,
                )
            )
        return out

    # ------------------------------------------------------------------ runs

    def admit(
        self,
        run_id: str,
        dataset: str,
        modalities: Sequence[str],
        epsilon: float | Mapping[str, float],
        delta: float,
        mechanism: dict[str, object],
    ) -> None:
        """Reserve ``(epsilon, delta)`` on every modality, or refuse the run.

        ``epsilon`` is one figure for every modality, or one per modality (a run whose phases
        read different modalities spends different amounts on each).

        Raises
        ------
        PrivacyError
            Some modality's remaining budget is too small; the message shows each one.
        """
        plan = (
            {m: float(epsilon) for m in modalities}
            if isinstance(epsilon, int | float)
            else {m: float(epsilon.get(m, 0.0)) for m in modalities}
        )
        with self._tx() as db:
            self._mark_dead_runs(db)
            short = []
            for s in self._spend(db, dataset, modalities):
                remaining = s.remaining_epsilon
                delta_left = None if s.budget_delta is None else s.budget_delta - s.spent_delta
                if remaining is not None and plan[s.modality] > remaining + 1e-12:
                    short.append(
                        f"{s.modality}: needs ε {plan[s.modality]:.4g}, "
                        f"{remaining:.4g} left of {s.budget_epsilon:g}"
                    )
                elif delta_left is not None and delta > delta_left + 1e-18:
                    short.append(f"{s.modality}: δ {delta_left:.3g} left of {s.budget_delta:g}")
            if short:
                raise PrivacyError(
                    f"run refused: it would spend ε = {max(plan.values()):.4g}, δ = {delta:g} on "
                    f"{dataset} ({', '.join(modalities)}), more than the remaining budget ("
                    + "; ".join(short)
                    + "). Lower the run's ε or rounds, or raise the budget with "
                    "`mmshield budget set`"
                )
            db.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                (
                    run_id,
                    dataset,
                    json.dumps(sorted(modalities)),
                    max(plan.values(), default=0.0),
                    delta,
                    json.dumps(mechanism),
                    os.getpid(),
                    os.uname().nodename,
                    time.time(),
                    json.dumps(plan),
                ),
            )

    def charge(
        self, run_id: str, round: int, epsilon: float | Mapping[str, float], delta: float
    ) -> None:
        """Record the run's cumulative spend after ``round`` (one transaction).

        ``epsilon`` is one figure for all the run's modalities or a ``modality -> ε`` mapping.
        """
        rows = (
            {ANY_MODALITY: float(epsilon)}
            if isinstance(epsilon, int | float)
            else {m: float(e) for m, e in epsilon.items()}
        )
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT OR REPLACE INTO charges VALUES (?, ?, ?, ?, ?, ?)",
                [(run_id, round, m, e, delta, now) for m, e in rows.items()],
            )

    def close_run(self, run_id: str, status: str = "finished") -> None:
        """Release the reservation: the charges are what the run spent."""
        with self._tx() as db:
            db.execute("UPDATE runs SET status = ? WHERE run_id = ?", (status, run_id))

    def history(self, dataset: str | None = None) -> list[dict[str, object]]:
        """Every run with its final charge (the largest over its modalities), newest first."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT r.run_id, r.dataset, r.modalities, r.status, r.planned_epsilon, "
                "(SELECT json_group_object(modality, epsilon) FROM charges c "
                " WHERE c.run_id = r.run_id AND c.round = "
                " (SELECT MAX(round) FROM charges c2 WHERE c2.run_id = r.run_id)), "
                "(SELECT COUNT(DISTINCT round) FROM charges c WHERE c.run_id = r.run_id), "
                "r.mechanism FROM runs r WHERE (? IS NULL OR r.dataset = ?) "
                "ORDER BY r.created_at DESC",
                (dataset, dataset),
            ).fetchall()
        out: list[dict[str, object]] = []
        for r in rows:
            mods = json.loads(r[2])
            last = json.loads(r[5]) if r[5] else {}
            by_modality = {m: float(last.get(m, last.get(ANY_MODALITY, 0.0))) for m in mods}
            out.append(
                {
                    "run_id": r[0],
                    "dataset": r[1],
                    "modalities": mods,
                    "status": r[3],
                    "planned_epsilon": r[4],
                    "spent_epsilon": max(by_modality.values(), default=0.0),
                    "spent_by_modality": by_modality,
                    "rounds_charged": r[6],
                    "mechanism": json.loads(r[7]),
                }
            )
        return out

    def datasets(self) -> list[str]:
        """Datasets with a budget or a run."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT dataset FROM budgets UNION SELECT dataset FROM runs ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]

    @staticmethod
    def _mark_dead_runs(db: sqlite3.Connection) -> None:
        host = os.uname().nodename
        for run_id, pid in db.execute(
            "SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ?", (host,)
        ).fetchall():
            if pid is None or not _alive(int(pid)):
                db.execute("UPDATE runs SET status = 'interrupted' WHERE run_id = ?", (run_id,))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
