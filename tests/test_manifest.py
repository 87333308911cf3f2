"""Tests for loading a user's multimodal manifest (CSV and JSONL)."""

from __future__ import annotations

import csv
import json
import math
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmshield.data.features import TEXT_MAX_TOKENS, TEXT_VOCAB, log_mel_shape
from mmshield.data.manifest import ManifestModality, load_manifest
from mmshield.errors import BadRecordsError, ConfigError, DataError

TAB_COLS = ("age", "bp", "hr", "temp")


def _write_png(path: Path, size: tuple[int, int] = (40, 30), mode: str = "RGB") -> None:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def _write_wav(path: Path, rate: int = 16000, channels: int = 1, width: int = 2) -> None:
    t = np.arange(int(rate * 0.5)) / rate
    x = 0.5 * np.sin(2 * math.pi * 440.0 * t)
    if width == 1:
        pcm = (x * 127 + 128).astype(np.uint8)
    elif width == 2:
        pcm = (x * 32767).astype("<i2")
    else:
        pcm = (x * (2**31 - 1)).astype("<i4")
    frames = np.repeat(pcm[:, None], channels, axis=1).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    """Good and bad media files under tmp_path (img/, wav/, notes/)."""
    for sub in ("img", "wav", "notes"):
        (tmp_path / sub).mkdir()
    _write_png(tmp_path / "img" / "a.png")
    _write_png(tmp_path / "img" / "b.png", (20, 20), mode="L")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _write_wav(tmp_path / "wav" / "tone.wav", rate=16000, channels=2, width=2)
    _write_wav(tmp_path / "wav" / "tone8.wav", rate=8000, channels=1, width=1)
    _write_wav(tmp_path / "wav" / "tone32.wav", rate=22050, channels=1, width=4)
    rng = np.random.default_rng(1)
    (tmp_path / "wav" / "corrupt.wav").write_bytes(rng.integers(0, 256, 500, np.uint8).tobytes())
    (tmp_path / "notes" / "n1.txt").write_text("a short clinical note\n", encoding="utf-8")
    return tmp_path


MODALITIES_CSV = {
    "photo": ManifestModality("image"),
    "voice": ManifestModality("audio"),
    "note": ManifestModality("text"),
    "vitals": ManifestModality("tabular", columns=TAB_COLS),
}

# (id, label, photo, voice, note, age, bp, hr, temp); the first record is CSV line 2
CSV_ROWS: list[list[str]] = [
    ["r1", "0", "img/a.png", "wav/tone.wav", "hello world", "1", "2", "3", "4"],  # 2 good
    ["r2", "1", "img/b.png", "", "notes/n1.txt", "5", "6", "7", "8"],  # 3 good, no audio
    ["r3", "1", "", "wav/tone8.wav", "", "", "", "", ""],  # 4 good, audio only
    ["r4", "0", "img/missing.png", "", "x", "1", "2", "3", "4"],  # 5 missing file
    ["r5", "0", "", "wav/corrupt.wav", "x", "1", "2", "3", "4"],  # 6 corrupt WAV
    ["r6", "1", "img/broken.png", "", "x", "1", "2", "3", "4"],  # 7 undecodable PNG
    ["r7", "0", "", "", "x", "1", "high", "3", "4"],  # 8 non-numeric
    ["r8", "cat", "", "", "x", "1", "2", "3", "4"],  # 9 unknown label
    ["r9", "1", "", "", "x", "1", "2", "3", "nan"],  # 10 NaN
    ["r1", "1", "", "", "x", "1", "2", "3", "4"],  # 11 duplicate id
    ["", "1", "", "", "x", "1", "2", "3", "4"],  # 12 missing id
    ["r10", "1", "", "", "", "", "", "", ""],  # 13 nothing present
    ["r11", "1", "", "", "x", "1", "2", "", "4"],  # 14 partial tabular
    ["r12", "0", "", "wav/tone32.wav", "notes/absent.txt", "1", "2", "3", "4"],  # 15 missing .txt
]
CSV_BAD = {
    5: ["photo", "img/missing.png", "not found"],
    6: ["voice", "wav/corrupt.wav", "not a valid WAV"],
    7: ["photo", "img/broken.png", "could not be decoded"],
    8: ["vitals", "'bp'", "not a number", "'high'"],
    9: ["label 'cat'", "declared classes", "['0', '1']"],
    10: ["vitals", "'temp'", "not finite"],
    11: ["duplicate id 'r1'", "line 2"],
    12: ["missing id"],
    13: ["no modality present"],
    14: ["vitals", "'hr'", "empty"],
    15: ["note", "notes/absent.txt", "not found"],
}


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "photo", "voice", "note", *TAB_COLS])
        w.writerows(rows)
    return path


def _assert_problems(problems: list[tuple[int, str]], expected: dict[int, list[str]]) -> None:
    assert [n for n, _ in problems] == sorted(expected)
    for line, reason in problems:
        for needle in expected[line]:
            assert needle in reason, f"line {line}: {needle!r} not in {reason!r}"


def test_csv_fail_lists_every_bad_row(files: Path) -> None:
    manifest = _write_csv(files / "train.csv", CSV_ROWS)
    with pytest.raises(BadRecordsError) as info:
        load_manifest(manifest, MODALITIES_CSV, classes=["0", "1"])
    err = info.value
    assert err.source == str(manifest)
    _assert_problems(err.problems, CSV_BAD)
    assert "11 bad record(s)" in str(err)
    assert "row 6: voice: 'wav/corrupt.wav' is not a valid WAV file" in str(err)


def test_csv_skip_loads_good_rows(files: Path) -> None:
    manifest = _write_csv(files / "train.csv", CSV_ROWS)
    with pytest.warns(UserWarning, match=r"skipped 11 of 14"):
        ds, problems = load_manifest(
            manifest, MODALITIES_CSV, classes=["0", "1"], on_bad_record="skip"
        )
    _assert_problems(problems, CSV_BAD)
    assert len(ds) == 3
    assert ds.ids == ["r1", "r2", "r3"]
    assert ds.name == "train.csv"
    assert ds.classes == ["0", "1"]
    assert ds.labels.tolist() == [0, 1, 1]
    assert ds.modalities == ["photo", "voice", "note", "vitals"]

    assert ds.spec("photo").shape == (1, 28, 28)
    assert ds.spec("voice").shape == log_mel_shape()
    assert ds.spec("note").shape == (TEXT_MAX_TOKENS,)
    assert ds.spec("note").vocab_size == TEXT_VOCAB
    assert ds.spec("vitals").shape == (4,)
    assert ds.inputs["photo"].dtype == torch.float32
    assert ds.inputs["note"].dtype == torch.int64

    assert ds.present["photo"].tolist() == [True, True, False]
    assert ds.present["voice"].tolist() == [True, False, True]  # r2 has an empty audio cell
    assert ds.present["note"].tolist() == [True, True, False]
    assert ds.present["vitals"].tolist() == [True, True, False]

    img = ds.inputs["photo"]
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
    assert float(img[0].std()) > 0.0
    assert torch.all(img[2] == 0)  # absent: zero-filled
    audio = ds.inputs["voice"]
    assert torch.isfinite(audio).all()
    assert float(audio[0].std()) > 0.0 and float(audio[2].std()) > 0.0
    assert torch.all(audio[1] == 0)
    note = ds.inputs["note"]
    assert int((note[0] > 0).sum()) > 0 and int((note[1] > 0).sum()) > 0
    assert int(note.max()) < TEXT_VOCAB and torch.all(note[2] == 0)
    torch.testing.assert_close(
        ds.inputs["vitals"], torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]]).float()
    )


def test_csv_all_good_and_class_inference(files: Path) -> None:
    rows = [
        ["a", "10", "img/a.png", "", "one", "1", "2", "3", "4"],
        ["b", "2", "", "wav/tone.wav", "two", "1", "2", "3", "4"],
        ["c", "2", "img/b.png", "", "", "1", "2", "3", "4"],
        ["d", "1", "", "", "four", "", "", "", ""],
    ]
    ds, problems = load_manifest(_write_csv(files / "ok.csv", rows), MODALITIES_CSV)
    assert problems == []
    assert len(ds) == 4
    assert ds.classes == ["1", "2", "10"]  # natural (numeric) order
    assert ds.labels.tolist() == [2, 1, 1, 0]
    assert ds.meta["skipped"] == 0

    words = [["a", "zebra"], ["b", "ant"], ["c", "Moth"]]
    words_rows = [[i, lab, "", "", "t", "", "", "", ""] for i, lab in words]
    ds2, _ = load_manifest(_write_csv(files / "w.csv", words_rows), MODALITIES_CSV)
    assert ds2.classes == ["Moth", "ant", "zebra"]


def test_jsonl_list_tabular_and_line_numbers(files: Path) -> None:
    lines = [
        {"id": "j1", "label": 0, "photo": "img/a.png", "vitals": [1, 2, 3, 4]},  # 1 good
        {"id": 2, "label": 1, "voice": "wav/tone.wav", "vitals": None},  # 2 good, int id
        None,  # 3 blank line
        {"id": "j3", "label": 1, "note": "notes/n1.txt", "vitals": [1.5, 2, 3, 4.5]},  # 4 good
        {"id": "j4", "label": 0, "vitals": [1, 2, 3]},  # 5 wrong length
        "{not json",  # 6 invalid JSON
        {"id": "j6", "label": 0, "vitals": [1, "x", 3, 4]},  # 7 non-numeric element
        {"id": "j7", "label": 5, "photo": "img/a.png"},  # 8 unknown label
        {"id": "j8", "label": 1, "vitals": [1, 2, float("nan"), 4]},  # 9 NaN
        {"id": "j9", "label": 1, "voice": "wav/corrupt.wav", "photo": "img/broken.png"},  # 10
        {"label": 1, "note": "hi"},  # 11 missing id
        [1, 2],  # 12 not an object
        {"id": "j12", "label": 0},  # 13 nothing present
    ]
    text = "\n".join("" if x is None else x if isinstance(x, str) else json.dumps(x) for x in lines)
    manifest = files / "data.jsonl"
    manifest.write_text(text + "\n", encoding="utf-8")
    mods = {
        "photo": ManifestModality("image", image_size=16, channels=3),
        "voice": ManifestModality("audio"),
        "note": ManifestModality("text"),
        "vitals": ManifestModality("tabular", column="vitals", size=4),
    }
    expected = {
        5: ["vitals", "expected 4 numeric values, got 3"],
        6: ["invalid JSON"],
        7: ["vitals", "not a number", "'x'"],
        8: ["label '5'", "declared classes"],
        9: ["vitals", "not finite"],
        10: ["not a valid WAV", "wav/corrupt.wav", "could not be decoded", "img/broken.png"],
        11: ["missing id"],
        12: ["expected a JSON object"],
        13: ["no modality present"],
    }
    with pytest.raises(BadRecordsError) as info:
        load_manifest(manifest, mods, classes=["0", "1"])
    _assert_problems(info.value.problems, expected)

    with pytest.warns(UserWarning, match="skipped 9"):
        ds, problems = load_manifest(manifest, mods, classes=["0", "1"], on_bad_record="skip")
    assert problems == info.value.problems
    assert ds.ids == ["j1", "2", "j3"]
    assert ds.labels.tolist() == [0, 1, 1]
    assert ds.inputs["photo"].shape == (3, 3, 16, 16)
    assert ds.present["photo"].tolist() == [True, False, False]
    assert ds.present["voice"].tolist() == [False, True, False]
    assert ds.present["note"].tolist() == [False, False, True]
    assert ds.present["vitals"].tolist() == [True, False, True]
    torch.testing.assert_close(ds.inputs["vitals"][2], torch.tensor([1.5, 2.0, 3.0, 4.5]))


def test_jsonl_inferred_list_size(tmp_path: Path) -> None:
    rows = [{"id": i, "label": "x", "v": [i, i, i]} for i in range(3)]
    rows.append({"id": 9, "label": "x", "v": [1, 2]})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.warns(UserWarning, match="skipped 1"):
        ds, problems = load_manifest(
            manifest, {"v": ManifestModality("tabular")}, on_bad_record="skip"
        )
    assert ds.spec("v").shape == (3,)
    assert problems == [(4, "v: expected 3 numeric values (the most common length), got 2")]


def test_wav_formats_give_similar_features(files: Path) -> None:
    rows = [
        {"id": "a", "label": 0, "voice": "wav/tone.wav"},  # 16 kHz stereo 16-bit
        {"id": "b", "label": 0, "voice": str(files / "wav" / "tone8.wav")},  # absolute, 8-bit
        {"id": "c", "label": 0, "voice": "wav/tone32.wav"},  # 22.05 kHz 32-bit
    ]
    manifest = files / "a.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    ds, _ = load_manifest(manifest, {"voice": ManifestModality("audio")})
    mel = ds.inputs["voice"]
    # same 440 Hz tone: the loudest mel band agrees whatever the file's format
    peak = mel[:, 0].mean(dim=-1).argmax(dim=-1)
    assert len(set(peak.tolist())) == 1


def test_all_bad_empty_and_bad_config(files: Path) -> None:
    bad = _write_csv(files / "bad.csv", [CSV_ROWS[3], CSV_ROWS[4]])
    with pytest.raises(DataError, match="all 2 record"):
        load_manifest(bad, MODALITIES_CSV, on_bad_record="skip")
    empty = _write_csv(files / "empty.csv", [])
    with pytest.raises(DataError, match="no records"):
        load_manifest(empty, MODALITIES_CSV, on_bad_record="skip")
    (files / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no records"):
        load_manifest(files / "empty.jsonl", MODALITIES_CSV, on_bad_record="skip")
    with pytest.raises(DataError, match="no column"):
        load_manifest(bad, {"scan": ManifestModality("image")})
    with pytest.raises(DataError, match="unknown manifest format"):
        load_manifest(files / "x.tsv", MODALITIES_CSV)
    with pytest.raises(DataError, match="not found"):
        load_manifest(files / "nope.csv", MODALITIES_CSV)
    with pytest.raises(ConfigError):
        ManifestModality("image", channels=2)
    with pytest.raises(ConfigError):
        ManifestModality("tabular", column="v", columns=("a",))
