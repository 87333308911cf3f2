"""Tests for the SQLite run store (mmshield.report.store)."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from mmshield.errors import StoreError
from mmshield.report.store import SCHEMA_VERSION, RunStore, new_run_id

CONFIG = {"fl": {"clients": 4, "rounds": 3}, "model": {"hidden": 32}, "seed": 7}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RunStore]:
    with RunStore(tmp_path / "runs" / "mmshield.db") as s:
        yield s


def test_run_id_format() -> None:
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", new_run_id())


def test_creates_parents_schema_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store.db"
    RunStore(path).close()
    assert path.is_file()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"runs", "metrics", "artefacts"} <= tables
    finally:
        conn.close()


def test_create_run_writes_dir_and_config(store: RunStore) -> None:
    run = store.create_run({**CONFIG, "out": Path("/x/y"), "shape": (1, 2)}, dataset="toy")
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", run.run_id)
    assert run.status == "running" and run.finished_at is None
    assert run.run_dir == store.path.parent / run.run_id and run.run_dir.is_dir()
    on_disk = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert on_disk["out"] == "/x/y" and on_disk["shape"] == [1, 2]
    got = store.get_run(run.run_id)
    assert got == run
    assert got.config["fl"] == {"clients": 4, "rounds": 3}
    assert got.summary is None and got.error is None


def test_finish_run(store: RunStore) -> None:
    run = store.create_run(CONFIG, "toy")
    summary = {"accuracy": 0.91, "accuracy_by_modalities": {"image+text": 0.91}, "epsilon": None}
    store.finish_run(run.run_id, summary)
    got = store.get_run(run.run_id)
    assert got.status == "finished" and got.finished_at is not None
    assert got.summary == summary and got.error is None
    assert json.loads((run.run_dir / "summary.json").read_text()) == summary


def test_fail_run(store: RunStore) -> None:
    a = store.create_run(CONFIG, "toy")
    store.fail_run(a.run_id, "round 2, client 3: loss is NaN")
    got = store.get_run(a.run_id)
    assert got.status == "failed" and got.error == "round 2, client 3: loss is NaN"
    assert got.summary is None and not (a.run_dir / "summary.json").exists()

    b = store.create_run(CONFIG, "toy")
    store.fail_run(b.run_id, "boom", summary={"rounds": 1})
    got = store.get_run(b.run_id)
    assert got.status == "failed" and got.summary == {"rounds": 1}
    assert json.loads((b.run_dir / "summary.json").read_text()) == {"rounds": 1}


def test_list_runs_newest_first(store: RunStore) -> None:
    ids = [store.create_run(CONFIG, f"ds{i}").run_id for i in range(3)]
    listed = store.list_runs()
    assert [r.run_id for r in listed] == ids[::-1]
    assert [r.dataset for r in listed] == ["ds2", "ds1", "ds0"]


def test_get_by_prefix(store: RunStore) -> None:
    run = store.create_run(CONFIG, "toy")
    assert store.get_run(run.run_id[:-2]).run_id == run.run_id
    assert store.get_run(run.run_id[:4]).run_id == run.run_id  # only one run yet
    assert store.metrics(run.run_id[:10]) == {}


def test_ambiguous_and_unknown_prefix(store: RunStore) -> None:
    a = store.create_run(CONFIG, "toy").run_id
    b = store.create_run(CONFIG, "toy").run_id
    n = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    common = a[:n]
    assert common  # both start with the year at least
    with pytest.raises(StoreError, match="ambiguous") as info:
        store.get_run(common)
    assert common in str(info.value) and "mmshield runs" in str(info.value)
    assert a in str(info.value) and b in str(info.value)
    with pytest.raises(StoreError, match="no run") as info:
        store.get_run("nosuchrun")
    assert "'nosuchrun'" in str(info.value) and "mmshield runs" in str(info.value)
    with pytest.raises(StoreError):
        store.get_run("")


def test_metrics_ordering_overwrite_and_nan(store: RunStore) -> None:
    run = store.create_run(CONFIG, "toy")
    for rnd in (3, 1, 2):
        store.log_round(run.run_id, rnd, {"test_accuracy": rnd / 10, "test_loss": 1.0 / rnd})
    store.log_round(run.run_id, 2, {"test_accuracy": 0.25})  # overwrite
    store.log_round(run.run_id, 4, {"train_loss": float("nan")})
    m = store.metrics(run.run_id)
    assert m["test_accuracy"] == [(1, 0.1), (2, 0.25), (3, 0.3)]
    assert [r for r, _ in m["test_loss"]] == [1, 2, 3]
    assert m["train_loss"][0][0] == 4 and math.isnan(m["train_loss"][0][1])


def test_writes_to_unknown_run_fail(store: RunStore, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="nope"):
        store.log_round("nope", 1, {"x": 1.0})
    with pytest.raises(StoreError, match="nope"):
        store.finish_run("nope", {})
    run = store.create_run(CONFIG, "toy")
    with pytest.raises(StoreError, match="not a number"):
        store.log_round(run.run_id, 1, {"x": "high"})  # type: ignore[dict-item]
    assert store.metrics(run.run_id) == {}


def test_artefacts_sha256_and_size(store: RunStore, tmp_path: Path) -> None:
    run = store.create_run(CONFIG, "toy")
    inside = run.run_dir / "model.safetensors"
    inside.write_bytes(b"weights" * 1000)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"\x00\x01")
    store.add_artefact(run.run_id, "model", inside)
    store.add_artefact(run.run_id, "extra", outside)
    assert store.artefacts(run.run_id) == {"extra": outside, "model": inside}
    records = {name: (sha, size) for name, _, sha, size in store.artefact_records(run.run_id)}
    assert records["model"] == (hashlib.sha256(b"weights" * 1000).hexdigest(), 7000)
    assert records["extra"] == (hashlib.sha256(b"\x00\x01").hexdigest(), 2)
    inside.write_bytes(b"new")  # re-adding replaces the record
    store.add_artefact(run.run_id, "model", inside)
    records = {name: (sha, size) for name, _, sha, size in store.artefact_records(run.run_id)}
    assert records["model"] == (hashlib.sha256(b"new").hexdigest(), 3)
    with pytest.raises(StoreError, match="not an existing file"):
        store.add_artefact(run.run_id, "ghost", tmp_path / "missing.bin")


def test_reopen_keeps_data_and_folder_is_relocatable(tmp_path: Path) -> None:
    db = tmp_path / "runs" / "mmshield.db"
    with RunStore(db) as s:
        run = s.create_run(CONFIG, "toy")
        s.log_round(run.run_id, 1, {"test_accuracy": 0.5})
        (run.run_dir / "m.bin").write_bytes(b"abc")
        s.add_artefact(run.run_id, "m", run.run_dir / "m.bin")
        s.finish_run(run.run_id, {"accuracy": 0.5})
    with RunStore(db) as s:
        got = s.get_run(run.run_id)
        assert got.status == "finished" and got.summary == {"accuracy": 0.5}
        assert s.metrics(run.run_id) == {"test_accuracy": [(1, 0.5)]}
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    with RunStore(tmp_path / "moved" / "mmshield.db") as s:
        got = s.get_run(run.run_id)
        assert got.run_dir == tmp_path / "moved" / run.run_id
        assert s.artefacts(run.run_id)["m"].read_bytes() == b"abc"


def test_two_stores_on_one_file(tmp_path: Path) -> None:
    db = tmp_path / "mmshield.db"
    with RunStore(db) as a, RunStore(db) as b:
        run = a.create_run(CONFIG, "toy")
        b.log_round(run.run_id, 1, {"test_accuracy": 0.7})
        assert a.metrics(run.run_id) == {"test_accuracy": [(1, 0.7)]}


def test_corrupt_file_raises_store_error(tmp_path: Path) -> None:
    bad = tmp_path / "mmshield.db"
    bad.write_bytes(b"this is not an sqlite database at all\n" * 200)
    with pytest.raises(StoreError) as info:
        RunStore(bad)
    assert str(bad) in str(info.value)


def test_foreign_sqlite_and_newer_schema(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE songs (title TEXT)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not an mmshield run store") as info:
        RunStore(other)
    assert str(other) in str(info.value)

    newer = tmp_path / "newer.db"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        RunStore(newer)


def test_directory_path_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="folder"):
        RunStore(tmp_path)
