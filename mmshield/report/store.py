"""A small SQLite run store: one row per training run, its per-round metrics and its artefacts.

Layout on disk (the default database is ``runs/mmshield.db``)::

    runs/
      mmshield.db            # runs, metrics and artefacts tables (WAL mode)
      20250101-120000-a1b2c3/  # one directory per run, next to the database
        config.yaml          # the run's configuration
        summary.json         # final summary (finished or failed runs)
        ...                  # artefacts, report.html

Run directories and artefacts inside them are stored relative to the database's folder, so the
whole ``runs/`` folder can be moved or copied. Every write is one transaction; the schema version
lives in ``PRAGMA user_version``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

import yaml

from mmshield.errors import StoreError

__all__ = ["DEFAULT_DB", "SCHEMA_VERSION", "RunInfo", "RunStatus", "RunStore", "new_run_id"]

DEFAULT_DB = Path("runs/mmshield.db")
SCHEMA_VERSION = 1

RunStatus = Literal["running", "finished", "failed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    created_at   TEXT NOT NULL,
    finished_at  TEXT,
    status       TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    dataset      TEXT NOT NULL,
    config_yaml  TEXT NOT NULL,
    run_dir      TEXT NOT NULL,
    summary_json TEXT,
    error        TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    round  INTEGER NOT NULL,
    name   TEXT NOT NULL,
    value  REAL,
    PRIMARY KEY (run_id, round, name)
);
CREATE TABLE IF NOT EXISTS artefacts (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    name   TEXT NOT NULL,
    path   TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    bytes  INTEGER NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX IF NOT EXISTS runs_created ON runs(created_at);
"""

_TABLES = {"runs", "metrics", "artefacts"}
_RUN_COLUMNS = (
    "run_id, created_at, finished_at, status, dataset, config_yaml, run_dir, summary_json, error"
)
_HINT = "run `mmshield runs` to list the stored runs"


@dataclass(frozen=True)
class RunInfo:
    """One stored run.

    Parameters
    ----------
    run_id
        ``YYYYMMDD-HHMMSS-xxxxxx`` (UTC creation time and 6 random hex characters).
    created_at, finished_at
        ISO 8601 UTC timestamps; ``finished_at`` is ``None`` while the run is running.
    status
        ``running``, ``finished`` or ``failed``.
    dataset
        Name of the data set the run trained on.
    config
        The run's configuration, as passed to :meth:`RunStore.create_run`.
    run_dir
        Absolute path of the run's directory.
    summary
        Final summary (``None`` until the run finishes, or fails with a summary).
    error
        Failure message of a failed run, else ``None``.
    """

    run_id: str
    created_at: str
    finished_at: str | None
    status: RunStatus
    dataset: str
    config: dict[str, Any]
    run_dir: Path
    summary: dict[str, Any] | None
    error: str | None


def new_run_id(now: datetime | None = None) -> str:
    """Return a fresh run id ``YYYYMMDD-HHMMSS-xxxxxx``.

    Parameters
    ----------
    now
        Creation time (default: the current UTC time).

    Returns
    -------
    str
        The id; the suffix is 6 hex characters from :mod:`secrets`.
    """
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """Convert ``value`` to plain YAML/JSON types (dict, list, str, int, float, bool, None)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [_plain(v) for v in items]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)  # NumPy and torch scalars
    if callable(item):
        with contextlib.suppress(TypeError, ValueError):
            return _plain(item())
    tolist = getattr(value, "tolist", None)  # NumPy arrays
    if callable(tolist):
        return _plain(tolist())
    if hasattr(value, "model_dump"):  # pydantic models
        return _plain(value.model_dump())
    return str(value)


def _sha256(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class RunStore:
    """Runs, per-round metrics and artefacts in one SQLite database.

    Parameters
    ----------
    path
        Database file (default ``runs/mmshield.db``). Missing parent folders are created, and a
        new file gets the schema. Each run's directory is ``<path's folder>/<run_id>/``.

    Raises
    ------
    StoreError
        The file is not an SQLite database, is corrupt, belongs to another program or a newer
        mmshield, or cannot be created.

    Notes
    -----
    One store object may be shared between threads (calls are serialised); several processes may
    use the same database at once (WAL mode, 30 s busy timeout). Use it as a context manager, or
    call :meth:`close`, to release the file.
    """

    def __init__(self, path: str | Path = DEFAULT_DB) -> None:
        self.path = Path(path).expanduser().absolute()
        self.root = self.path.parent
        self._lock = threading.RLock()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"{self.path}: cannot create the run store folder {self.root}: {exc}. "
                "Choose a writable location for the database."
            ) from exc
        if self.path.is_dir():
            raise StoreError(
                f"{self.path}: is a folder, not a run store database file. "
                "Pass the path of a .db file instead."
            )
        try:
            self._conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the run store: {exc}.") from exc
        try:
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------ plumbing

    def _corrupt(self, exc: sqlite3.Error) -> StoreError:
        return StoreError(
            f"{self.path}: the run store could not be read or written ({exc}). If the file is "
            "corrupt or not an mmshield run store, move it aside or pass a different database "
            "path; a new store is created on first use."
        )

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """Serialise access and turn SQLite errors into :class:`StoreError`."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise self._corrupt(exc) from exc

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on error)."""
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _init_schema(self) -> None:
        with self._db() as conn:
            # Reading the header fails here ("file is not a database") for non-SQLite files.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: run store schema version {version} is newer than this "
                    f"mmshield supports ({SCHEMA_VERSION}). Upgrade mmshield to read it."
                )
            if version == 0:
                names = {
                    row[0]
                    for row in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' "
                        "AND name NOT LIKE 'sqlite_%'"
                    )
                }
                foreign = names - _TABLES
                if foreign:
                    raise StoreError(
                        f"{self.path}: is an SQLite database but not an mmshield run store "
                        f"(it has tables {sorted(foreign)}). Pass a different database path."
                    )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = NORMAL")
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")

    def close(self) -> None:
        """Close the database connection (the object must not be used afterwards)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r})"

    def _run_dir(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.root / path

    def _relative(self, path: Path, base: Path) -> str:
        path = path.absolute()
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            return str(path)

    def _row_to_info(self, row: tuple[Any, ...]) -> RunInfo:
        (run_id, created, finished, status, dataset, config_yaml, run_dir, summary, error) = row
        try:
            config = yaml.safe_load(config_yaml) or {}
            summary_dict = json.loads(summary) if summary is not None else None
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise StoreError(
                f"{self.path}: run {run_id} has an unreadable config or summary ({exc})."
            ) from exc
        return RunInfo(
            run_id=run_id,
            created_at=created,
            finished_at=finished,
            status=cast(RunStatus, status),
            dataset=dataset,
            config=config if isinstance(config, dict) else {"config": config},
            run_dir=self._run_dir(run_dir),
            summary=summary_dict,
            error=error,
        )

    def _require(self, conn: sqlite3.Connection, run_id: str) -> tuple[str, Path]:
        row = conn.execute(
            "SELECT status, run_dir FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no run with id {run_id!r}; {_HINT}.")
        return row[0], self._run_dir(row[1])

    # ------------------------------------------------------------------ writes

    def create_run(self, config: Mapping[str, Any], dataset: str) -> RunInfo:
        """Start a new run: make its directory, write ``config.yaml`` there and record it.

        Parameters
        ----------
        config
            The run's configuration (paths, tuples and NumPy scalars are stored as plain values).
        dataset
            Name of the data set.

        Returns
        -------
        RunInfo
            The new run, with status ``running``.
        """
        plain = _plain(config)
        config_yaml = yaml.safe_dump(plain, sort_keys=False, allow_unicode=True)
        for _ in range(20):
            created = _now()
            run_id = new_run_id(datetime.fromisoformat(created))
            run_dir = self.root / run_id
            try:
                run_dir.mkdir(parents=True, exist_ok=False)
            except FileExistsError:
                continue
            except OSError as exc:
                raise StoreError(f"{run_dir}: cannot create the run directory: {exc}.") from exc
            break
        else:  # pragma: no cover - 20 collisions of 24 random bits
            raise StoreError(f"{self.root}: could not find a free run id; try again.")
        try:
            _write_atomic(run_dir / "config.yaml", config_yaml)
            with self._tx() as conn:
                conn.execute(
                    f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES (?, ?, NULL, 'running', ?, ?, ?, "
                    "NULL, NULL)",
                    (run_id, created, dataset, config_yaml, run_id),
                )
        except BaseException as exc:
            shutil.rmtree(run_dir, ignore_errors=True)
            if isinstance(exc, OSError):
                raise StoreError(f"{run_dir}: cannot write config.yaml: {exc}.") from exc
            raise
        return RunInfo(
            run_id=run_id,
            created_at=created,
            finished_at=None,
            status="running",
            dataset=dataset,
            config=plain if isinstance(plain, dict) else {"config": plain},
            run_dir=run_dir,
            summary=None,
            error=None,
        )

    def log_round(self, run_id: str, round: int, metrics: Mapping[str, float]) -> None:
        """Record one round's metrics (a metric logged twice for a round keeps the last value).

        Parameters
        ----------
        run_id
            Full run id.
        round
            Round number (any integer; the report plots metrics against it).
        metrics
            ``name -> value``. NaN is stored (as SQL NULL) and read back as NaN.
        """
        rows = []
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise StoreError(
                    f"run {run_id}, round {round}: metric {name!r} is not a number ({value!r})."
                ) from exc
            rows.append((run_id, int(round), str(name), None if math.isnan(number) else number))
        with self._tx() as conn:
            self._require(conn, run_id)
            conn.executemany(
                "INSERT INTO metrics (run_id, round, name, value) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (run_id, round, name) DO UPDATE SET value = excluded.value",
                rows,
            )

    def add_artefact(self, run_id: str, name: str, path: Path) -> None:
        """Record a file produced by a run, with its SHA-256 and size in bytes.

        Parameters
        ----------
        run_id
            Full run id.
        name
            Artefact name (unique per run; adding a name again replaces the record).
        path
            The file. Paths inside the store folder are stored relative to it.
        """
        path = Path(path)
        if not path.is_file():
            raise StoreError(
                f"run {run_id}: artefact {name!r} is not an existing file: {path}. "
                "Write the file before recording it."
            )
        try:
            sha, size = _sha256(path)
        except OSError as exc:
            raise StoreError(
                f"run {run_id}: cannot read artefact {name!r} at {path}: {exc}."
            ) from exc
        with self._tx() as conn:
            self._require(conn, run_id)
            conn.execute(
                "INSERT INTO artefacts (run_id, name, path, sha256, bytes) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (run_id, name) DO UPDATE SET path = excluded.path, "
                "sha256 = excluded.sha256, bytes = excluded.bytes",
                (run_id, name, self._relative(path, self.root), sha, size),
            )

    def _close_run(
        self,
        run_id: str,
        status: RunStatus,
        summary: Mapping[str, Any] | None,
        error: str | None,
    ) -> None:
        summary_json = (
            json.dumps(_plain(summary), indent=2, sort_keys=False) if summary is not None else None
        )
        with self._tx() as conn:
            _, run_dir = self._require(conn, run_id)
            if summary_json is not None:
                try:
                    run_dir.mkdir(parents=True, exist_ok=True)
                    _write_atomic(run_dir / "summary.json", summary_json + "\n")
                except OSError as exc:
                    raise StoreError(f"{run_dir}: cannot write summary.json: {exc}.") from exc
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, summary_json = ?, error = ? "
                "WHERE run_id = ?",
                (status, _now(), summary_json, error, run_id),
            )

    def finish_run(self, run_id: str, summary: Mapping[str, Any]) -> None:
        """Mark a run finished and write its ``summary.json``.

        Parameters
        ----------
        run_id
            Full run id.
        summary
            Final results, e.g. ``accuracy``, ``accuracy_by_modalities``, ``epsilon``, ``delta``,
            ``clients``, ``rounds``, ``wall_seconds``, ``bytes_up``, ``bytes_down``,
            ``protections`` (see :func:`mmshield.report.render_report`).
        """
        self._close_run(run_id, "finished", summary, None)

    def fail_run(self, run_id: str, error: str, summary: Mapping[str, Any] | None = None) -> None:
        """Mark a run failed.

        Parameters
        ----------
        run_id
            Full run id.
        error
            What went wrong (shown by ``mmshield runs`` and in the report).
        summary
            Partial results, if any; written to ``summary.json`` when given.
        """
        self._close_run(run_id, "failed", summary, str(error))

    # ------------------------------------------------------------------ reads

    def resolve(self, run_id: str) -> str:
        """Return the full id of the run whose id is, or starts with, ``run_id``.

        Raises
        ------
        StoreError
            No run matches, or the prefix matches several runs.
        """
        prefix = run_id.strip()
        if not prefix:
            raise StoreError(f"{self.path}: empty run id; {_HINT}.")
        with self._db() as conn:
            exact = conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (prefix,)).fetchone()
            if exact:
                return prefix
            matches = [
                row[0]
                for row in conn.execute(
                    "SELECT run_id FROM runs WHERE substr(run_id, 1, ?) = ? ORDER BY run_id",
                    (len(prefix), prefix),
                )
            ]
        if not matches:
            raise StoreError(f"{self.path}: no run with id {run_id!r}; {_HINT}.")
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (" ..." if len(matches) > 5 else "")
            raise StoreError(
                f"{self.path}: run id prefix {run_id!r} is ambiguous: it matches {len(matches)} "
                f"runs ({shown}). Give more characters; {_HINT}."
            )
        return matches[0]

    def list_runs(self) -> list[RunInfo]:
        """Return all runs, newest first."""
        with self._db() as conn:
            rows = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY created_at DESC, rowid DESC"
            ).fetchall()
        return [self._row_to_info(row) for row in rows]

    def get_run(self, run_id: str) -> RunInfo:
        """Return one run.

        Parameters
        ----------
        run_id
            Full id or a unique prefix of it.

        Raises
        ------
        StoreError
            Unknown or ambiguous id (the message names it and suggests ``mmshield runs``).
        """
        full = self.resolve(run_id)
        with self._db() as conn:
            row = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (full,)
            ).fetchone()
        if row is None:  # deleted concurrently
            raise StoreError(f"{self.path}: no run with id {run_id!r}; {_HINT}.")
        return self._row_to_info(row)

    def metrics(self, run_id: str) -> dict[str, list[tuple[int, float]]]:
        """Return a run's metrics as ``name -> [(round, value), ...]`` sorted by round.

        Parameters
        ----------
        run_id
            Full id or a unique prefix of it.
        """
        full = self.resolve(run_id)
        out: dict[str, list[tuple[int, float]]] = {}
        with self._db() as conn:
            rows = conn.execute(
                "SELECT name, round, value FROM metrics WHERE run_id = ? ORDER BY name, round",
                (full,),
            ).fetchall()
        for name, rnd, value in rows:
            out.setdefault(name, []).append((int(rnd), math.nan if value is None else float(value)))
        return out

    def artefacts(self, run_id: str) -> dict[str, Path]:
        """Return a run's artefacts as ``name -> absolute path``.

        Parameters
        ----------
        run_id
            Full id or a unique prefix of it.
        """
        full = self.resolve(run_id)
        with self._db() as conn:
            rows = conn.execute(
                "SELECT name, path FROM artefacts WHERE run_id = ? ORDER BY name", (full,)
            ).fetchall()
        return {name: self._run_dir(path) for name, path in rows}

    def artefact_records(self, run_id: str) -> list[tuple[str, Path, str, int]]:
        """Return a run's artefacts as ``(name, path, sha256, bytes)`` sorted by name."""
        full = self.resolve(run_id)
        with self._db() as conn:
            rows = conn.execute(
                "SELECT name, path, sha256, bytes FROM artefacts WHERE run_id = ? ORDER BY name",
                (full,),
            ).fetchall()
        return [(name, self._run_dir(path), sha, int(size)) for name, path, sha, size in rows]
