"""Load a user's own multimodal data from a manifest file (CSV or JSONL).

A manifest has one row per record: an id, a label and, for every modality, either a file path
(image: PNG/JPEG, audio: WAV, text: a ``.txt`` file), inline text, or numbers (tabular). Relative
paths resolve against the manifest's directory. The format follows the file extension:
``.csv`` (the first line is the header) or ``.jsonl`` (one JSON object per line).

Loading validates every row before giving up, so a user fixes all bad rows in one go. A problem
is reported as ``(line, reason)`` where ``line`` is the line number an editor shows (for CSV the
header is line 1 and the first record line 2) and ``reason`` names the modality or column, the
file and what was expected. With ``on_bad_record="fail"`` any problem raises
:class:`~mmshield.errors.BadRecordsError`; with ``"skip"`` the bad rows are left out and a
warning says how many.

A *missing* modality (empty cell, JSON ``null``, absent key) is not a problem: the sample's
presence mask is ``False`` for it and its slot is zero-filled. A row without any modality is.

Example
-------
``data/train.csv``::

    id,label,photo,voice,note,age,bp
    r1,cat,img/r1.png,wav/r1.wav,fluffy and loud,3,120
    r2,dog,img/r2.png,,notes/r2.txt,5,130

>>> ds, problems = load_manifest(  # doctest: +SKIP
...     "data/train.csv",
...     {
...         "photo": ManifestModality("image"),
...         "voice": ManifestModality("audio"),
...         "note": ManifestModality("text"),
...         "vitals": ManifestModality("tabular", columns=("age", "bp")),
...     },
... )
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
import wave
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from mmshield.data.dataset import ModalityKind, ModalitySpec, MultimodalDataset
from mmshield.data.features import (
    SAMPLE_RATE,
    TEXT_MAX_TOKENS,
    TEXT_VOCAB,
    audio_num_samples,
    fit_length,
    hash_text,
    log_mel,
    log_mel_shape,
    resample,
)
from mmshield.errors import BadRecordsError, ConfigError, DataError

__all__ = ["ManifestModality", "load_manifest"]

_KINDS: tuple[str, ...] = ("image", "audio", "text", "tabular")
_AUDIO_CHUNK = 256  # waveforms turned into log-mel features per batch (bounds memory)
_INT_RE = re.compile(r"[+-]?\d+")
_WAV_FORMAT_NAMES = {3: "IEEE float", 6: "A-law", 7: "mu-law", 65534: "WAVE_FORMAT_EXTENSIBLE"}


@dataclass(frozen=True)
class ManifestModality:
    """How one modality is stored in a manifest.

    Parameters
    ----------
    kind
        ``"image"`` (a PNG/JPEG path), ``"audio"`` (a WAV path), ``"text"`` (inline text, or a
        path ending ``.txt``) or ``"tabular"`` (numbers).
    column
        Image/audio/text: the column holding the path or the inline text. Tabular: a single
        column holding a list of numbers (a JSON list in JSONL, or ``"[1, 2, 3]"`` in a CSV cell;
        a bare number counts as a list of one). Defaults to the modality name when neither
        ``column`` nor ``columns`` is given.
    columns
        Tabular only: one numeric column per feature (CSV columns, or JSONL keys).
    size
        Tabular only: the expected vector length. With ``columns`` it must equal
        ``len(columns)``; with a list ``column`` it defaults to the most common list length.
    image_size
        Images are resized (bilinear) to ``image_size x image_size``.
    channels
        Image channels: 1 (grayscale) or 3 (RGB).

    Raises
    ------
    ConfigError
        If the combination of fields is invalid.
    """

    kind: Literal["image", "audio", "text", "tabular"]
    column: str | None = None
    columns: tuple[str, ...] = ()
    size: int | None = None
    image_size: int = 28
    channels: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(f"modality kind must be one of {list(_KINDS)}, got {self.kind!r}")
        if not isinstance(self.columns, tuple):
            object.__setattr__(self, "columns", tuple(self.columns))
        if self.column is not None and (not isinstance(self.column, str) or not self.column):
            raise ConfigError(f"{self.kind}: `column` must be a non-empty string")
        if any(not isinstance(c, str) or not c for c in self.columns):
            raise ConfigError(f"{self.kind}: `columns` must be non-empty strings")
        if len(set(self.columns)) != len(self.columns):
            raise ConfigError(f"{self.kind}: `columns` has duplicates: {list(self.columns)}")
        if self.kind == "tabular":
            if self.column is not None and self.columns:
                raise ConfigError("tabular: give either `column` (a list) or `columns`, not both")
            if self.size is not None and self.size < 1:
                raise ConfigError(f"tabular: `size` must be >= 1, got {self.size}")
            if self.columns and self.size is not None and self.size != len(self.columns):
                raise ConfigError(
                    f"tabular: `size` is {self.size} but {len(self.columns)} `columns` are given"
                )
        else:
            if self.columns:
                raise ConfigError(f"{self.kind}: `columns` is for tabular data; use `column`")
            if self.size is not None:
                raise ConfigError(f"{self.kind}: `size` is for tabular data only")
        if self.kind == "image":
            if self.image_size < 1:
                raise ConfigError(f"image: `image_size` must be >= 1, got {self.image_size}")
            if self.channels not in (1, 3):
                raise ConfigError(f"image: `channels` must be 1 or 3, got {self.channels}")


# --------------------------------------------------------------------------- reading rows


@dataclass
class _RawRow:
    """One manifest record before validation: its line and ``column -> value``."""

    line: int
    values: dict[str, object]
    error: str | None = None  # the row could not be parsed at all


def _read_csv(path: Path, needed: list[str]) -> Iterator[_RawRow]:
    """Yield the records of a CSV manifest; raise DataError for file-level problems."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not valid UTF-8 ({e.reason}); save the manifest as UTF-8"
        ) from None
    reader = csv.reader(text.splitlines(keepends=True))
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if header is None:
                raise DataError(f"{path}: header (line {start}) is not valid CSV ({e})") from None
            yield _RawRow(start, {}, f"not valid CSV ({e})")
            continue
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue  # blank line
        if header is None:
            header = [c.strip() for c in cells]
            dupes = sorted(c for c, n in Counter(header).items() if n > 1)
            if dupes:
                raise DataError(f"{path}: header (line {start}) repeats column(s) {dupes}")
            absent = [c for c in needed if c not in header]
            if absent:
                raise DataError(
                    f"{path}: header (line {start}) has no column(s) {absent}; it has {header}"
                )
            continue
        if len(cells) != len(header):
            yield _RawRow(
                start,
                {},
                f"expected {len(header)} fields (one per header column), got {len(cells)}",
            )
            continue
        yield _RawRow(start, dict(zip(header, cells, strict=True)))


def _read_jsonl(path: Path) -> Iterator[_RawRow]:
    """Yield the records of a JSONL manifest (each line decoded separately)."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield _RawRow(line_no, {}, f"not valid UTF-8 ({e.reason} at byte {e.start})")
            continue
        except (ValueError, RecursionError) as e:
            yield _RawRow(line_no, {}, f"invalid JSON ({e})")
            continue
        if not isinstance(obj, dict):
            yield _RawRow(line_no, {}, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield _RawRow(line_no, obj)


# --------------------------------------------------------------------------- decoding values


def _is_missing(value: object) -> bool:
    """Empty cell, JSON null, or a blank string."""
    return value is None or (isinstance(value, str) and not value.strip())


def _scalar_label(value: object) -> str | None:
    """A label or id as a string, or ``None`` if the JSON type is not usable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return None


def _resolve(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


def _check_file(prefix: str, value: str, path: Path) -> str | None:
    if not path.exists():
        return f"{prefix}: file {value!r} not found (looked at {path})"
    if not path.is_file():
        return f"{prefix}: {value!r} is not a file ({path})"
    return None


def _exc(e: BaseException) -> str:
    name = type(e).__name__
    if type(e).__module__ not in ("builtins", "__main__"):
        name = f"{type(e).__module__}.{name}"
    if isinstance(e, EOFError):
        return f"{name}: the file is empty or truncated"
    msg = str(e).strip()
    return f"{name}: {msg}" if msg else name


def _load_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode an image to float32 ``(channels, size, size)`` in [0, 1]."""
    with Image.open(path) as im:
        im.load()
        img: Image.Image = im
        try:
            img = ImageOps.exif_transpose(im) or im
        except Exception:  # a broken EXIF block should not reject a decodable image
            img = im
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            # 16-bit grayscale: scale to [0, 1] here (convert("L") would clip at 255)
            arr16 = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
            gray = Image.fromarray(arr16).resize((size, size), Image.Resampling.BILINEAR)
            out = np.clip(np.asarray(gray, dtype=np.float32), 0.0, 1.0)[None]
            return np.repeat(out, channels, axis=0)
        img = img.convert("L" if channels == 1 else "RGB")
        img = img.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _pcm_to_float(frames: bytes, width: int, channels: int) -> np.ndarray:
    """Integer PCM bytes -> mono float32 in [-1, 1]."""
    usable = len(frames) - len(frames) % (width * channels)
    buf = frames[:usable]
    if width == 1:
        x = (np.frombuffer(buf, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(buf, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(buf, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)
        x = v.astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = (np.frombuffer(buf, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    else:
        raise ValueError(f"unsupported sample width {width * 8} bits")
    return x.reshape(-1, channels).mean(axis=1, dtype=np.float32)


def _load_wav(path: Path) -> np.ndarray:
    """Read a PCM WAV, mix to mono, resample to SAMPLE_RATE and fit to the clip length."""
    with wave.open(str(path), "rb") as w:
        channels, width, rate, n = (
            w.getnchannels(),
            w.getsampwidth(),
            w.getframerate(),
            w.getnframes(),
        )
        if channels < 1:
            raise ValueError("header says 0 channels")
        if rate <= 0:
            raise ValueError(f"header says sample rate {rate}")
        # only the first clip's worth of audio is used; +2 frames keep the interpolation exact
        needed = math.ceil(audio_num_samples() * rate / SAMPLE_RATE) + 2
        frames = w.readframes(min(n, needed))
    mono = _pcm_to_float(frames, width, channels)
    if mono.size == 0:
        raise ValueError("it contains no audio samples")
    return fit_length(resample(mono, rate, SAMPLE_RATE))


def _wav_reason(e: BaseException) -> str:
    m = re.fullmatch(r"unknown format: (\d+)", str(e))
    if isinstance(e, wave.Error) and m:
        code = int(m.group(1))
        name = _WAV_FORMAT_NAMES.get(code, f"format code {code}")
        return f"sample format {name} is not supported; re-export it as 16-bit PCM WAV"
    return _exc(e)


def _parse_number(value: object) -> float | None:
    """A finite-or-not float from a JSON number or a numeric string; ``None`` if not a number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:
            return math.inf
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _finite_f32(prefix: str, what: str, x: float) -> str | None:
    if not math.isfinite(x):
        return f"{prefix}: {what} is not finite: {x!r} (NaN/inf are not allowed)"
    if abs(x) > float(np.finfo(np.float32).max):
        return f"{prefix}: {what} is {x!r}, out of float32 range"
    return None


# --------------------------------------------------------------------------- the loader


@dataclass
class _Row:
    line: int
    reasons: list[str] = field(default_factory=list)
    id: str | None = None
    label: str | None = None
    feats: dict[str, object] = field(default_factory=dict)  # name -> array / text; absent = missing


@dataclass
class _Plan:
    """A resolved modality: its name, spec and where its data is."""

    name: str
    mod: ManifestModality
    column: str | None
    columns: tuple[str, ...]

    @property
    def prefix(self) -> str:
        if self.column is not None and self.column != self.name:
            return f"{self.name} (column {self.column!r})"
        return self.name


class _AudioBatcher:
    """Turns waveforms into log-mel features in batches, writing them back into rows."""

    def __init__(self) -> None:
        self.pending: list[tuple[_Row, str, np.ndarray]] = []

    def add(self, row: _Row, name: str, wav: np.ndarray) -> None:
        self.pending.append((row, name, wav))
        if len(self.pending) >= _AUDIO_CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        mels = log_mel(np.stack([w for _, _, w in self.pending]))
        for (row, name, _), mel in zip(self.pending, mels, strict=True):
            row.feats[name] = mel
        self.pending = []


def _plan(modalities: Mapping[str, ManifestModality]) -> list[_Plan]:
    if not modalities:
        raise ConfigError("load_manifest: at least one modality must be given")
    plans = []
    for name, mod in modalities.items():
        if not isinstance(mod, ManifestModality):
            raise ConfigError(
                f"modality {name!r}: expected a ManifestModality, got {type(mod).__name__}"
            )
        if mod.kind == "tabular" and mod.columns:
            plans.append(_Plan(name, mod, None, mod.columns))
        else:
            plans.append(_Plan(name, mod, mod.column or name, ()))
    return plans


def _read_text(prefix: str, base: Path, value: str) -> tuple[str | None, str | None]:
    """Return ``(text, problem)`` for an inline text or a ``.txt`` path."""
    v = value.strip()
    if "\n" in v or not v.lower().endswith(".txt"):
        return value, None
    path = _resolve(base, v)
    problem = _check_file(prefix, v, path)
    if problem:
        return None, problem
    try:
        content = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, f"{prefix}: {v!r} is not valid UTF-8 text ({e.reason} at byte {e.start})"
    except Exception as e:
        return None, f"{prefix}: {v!r} could not be read ({_exc(e)})"
    if not content.strip():
        return None, f"{prefix}: text file {v!r} is empty"
    return content, None


def _tabular_values(plan: _Plan, raw: dict[str, object]) -> tuple[list[float] | None, list[str]]:
    """Numbers of a tabular modality: ``(None, [])`` if missing, ``(None, reasons)`` if bad."""
    prefix = plan.prefix
    if plan.columns:
        cells = [raw.get(c) for c in plan.columns]
        empty = [c for c, v in zip(plan.columns, cells, strict=True) if _is_missing(v)]
        if len(empty) == len(plan.columns):
            return None, []
        if empty:
            return None, [
                f"{plan.name}: column(s) {empty} are empty while others are set "
                "(leave all of them empty to mark the modality missing)"
            ]
        out: list[float] = []
        reasons: list[str] = []
        for c, v in zip(plan.columns, cells, strict=True):
            x = _parse_number(v)
            if x is None:
                reasons.append(f"{plan.name}: column {c!r} is not a number: {v!r}")
                continue
            problem = _finite_f32(plan.name, f"column {c!r}", x)
            if problem:
                reasons.append(problem)
            out.append(x)
        return (None, reasons) if reasons else (out, [])
    assert plan.column is not None
    value = raw.get(plan.column)
    if _is_missing(value):
        return None, []
    items: object = value
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                items = json.loads(s)
            except ValueError as e:
                return None, [f"{prefix}: expected a JSON list of numbers, got {s!r} ({e})"]
        else:
            items = [s]
    elif not isinstance(value, list):
        items = [value]
    if not isinstance(items, list):
        return None, [f"{prefix}: expected a list of numbers, got {value!r}"]
    if not items:
        return None, []
    out = []
    reasons = []
    for i, v in enumerate(items):
        x = _parse_number(v)
        if x is None:
            reasons.append(f"{prefix}: value #{i + 1} is not a number: {v!r}")
            continue
        problem = _finite_f32(prefix, f"value #{i + 1}", x)
        if problem:
            reasons.append(problem)
        out.append(x)
    if len(reasons) > 3:
        reasons = [*reasons[:3], f"{prefix}: ... and {len(reasons) - 3} more bad values"]
    return (None, reasons) if reasons else (out, [])


def _natural_classes(labels: set[str]) -> list[str]:
    if labels and all(_INT_RE.fullmatch(s) for s in labels):
        return sorted(labels, key=lambda s: (int(s), s))
    return sorted(labels)


def load_manifest(
    path: str | Path,
    modalities: Mapping[str, ManifestModality],
    *,
    id_column: str = "id",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
    on_bad_record: Literal["fail", "skip"] = "fail",
) -> tuple[MultimodalDataset, list[tuple[int, str]]]:
    """Load and featurise a CSV or JSONL manifest into a :class:`MultimodalDataset`.

    Every row is validated (and its files decoded) before anything is raised, so the error
    lists all bad rows at once.

    Parameters
    ----------
    path
        The manifest, ``*.csv`` (with a header line) or ``*.jsonl`` (one JSON object per line).
        Relative file paths inside it resolve against its directory.
    modalities
        ``modality name -> ManifestModality``; the data set's specs follow this order.
    id_column
        Column with the record id (must be present and unique).
    label_column
        Column with the class label.
    classes
        Allowed class names, in label-index order. If omitted, the sorted distinct labels of the
        loaded rows (numeric order if all labels are integers). JSON integers are compared as
        strings.
    on_bad_record
        ``"fail"`` raises on any bad row; ``"skip"`` leaves bad rows out and warns.

    Returns
    -------
    dataset : MultimodalDataset
        Featurised records: image ``(channels, s, s)`` float in [0, 1], audio log-mel
        :func:`~mmshield.data.features.log_mel_shape`, text hashed ids ``(TEXT_MAX_TOKENS,)``,
        tabular ``(D,)`` float. ``name`` is the manifest's file name, ``ids`` its id values.
    problems : list of (int, str)
        ``(line, reason)`` for every bad row (empty when all rows are good), one entry per row
        with its reasons joined by ``"; "``. Line numbers are those an editor shows.

    Raises
    ------
    BadRecordsError
        With ``on_bad_record="fail"`` if any row is bad (listing all of them).
    DataError
        If the manifest is missing, unreadable, of unknown format, has no records, lacks a
        declared column in its CSV header, or every row is bad (even with ``"skip"``).
    ConfigError
        If ``modalities``, ``classes`` or ``on_bad_record`` are invalid.
    """
    path = Path(path)
    source = str(path)
    if on_bad_record not in ("fail", "skip"):
        raise ConfigError(f"on_bad_record must be 'fail' or 'skip', got {on_bad_record!r}")
    plans = _plan(modalities)
    declared: list[str] | None = None
    if classes is not None:
        declared = [str(c) for c in classes]
        if not declared:
            raise ConfigError("classes: must not be empty when given")
        dupes = sorted(c for c, n in Counter(declared).items() if n > 1)
        if dupes:
            raise ConfigError(f"classes: repeated class name(s) {dupes}")
    declared_set = set(declared) if declared is not None else None

    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"{source}: unknown manifest format {path.suffix!r}; use .csv or .jsonl")
    if not path.is_file():
        raise DataError(f"{source}: manifest not found")
    base = path.resolve().parent

    needed = [id_column, label_column]
    for p in plans:
        needed += [p.column] if p.column is not None else list(p.columns)
    needed = list(dict.fromkeys(needed))
    try:
        raw_rows = list(_read_csv(path, needed) if suffix == ".csv" else _read_jsonl(path))
    except OSError as e:
        raise DataError(f"{source}: could not read the manifest ({_exc(e)})") from None
    if not raw_rows:
        raise DataError(f"{source}: the manifest has no records")

    if suffix == ".jsonl":
        for col in needed[2:]:
            if not any(col in r.values for r in raw_rows):
                warnings.warn(
                    f"{source}: no record has the key {col!r}; that modality is missing "
                    "everywhere (check the column name)",
                    stacklevel=2,
                )

    rows: list[_Row] = []
    first_seen: dict[str, int] = {}
    audio = _AudioBatcher()
    for raw in raw_rows:
        row = _Row(raw.line)
        rows.append(row)
        if raw.error is not None:
            row.reasons.append(raw.error)
            continue
        vals = raw.values

        rid = vals.get(id_column)
        if _is_missing(rid):
            row.reasons.append(f"missing id (column {id_column!r})")
        else:
            sid = _scalar_label(rid)
            if not sid:
                row.reasons.append(f"id must be a string or an integer, got {rid!r}")
            elif sid in first_seen:
                row.reasons.append(f"duplicate id {sid!r} (first used on line {first_seen[sid]})")
            else:
                first_seen[sid] = row.line
                row.id = sid

        lab = vals.get(label_column)
        if _is_missing(lab):
            row.reasons.append(f"missing label (column {label_column!r})")
        else:
            slab = _scalar_label(lab)
            if not slab:
                row.reasons.append(f"label must be a string or an integer, got {lab!r}")
            elif declared_set is not None and slab not in declared_set:
                row.reasons.append(f"label {slab!r} is not one of the declared classes {declared}")
            else:
                row.label = slab

        given = 0
        for plan in plans:
            mod, prefix = plan.mod, plan.prefix
            if mod.kind == "tabular":
                nums, why = _tabular_values(plan, vals)
                given += int(nums is not None or bool(why))
                row.reasons += why
                if nums is not None:
                    row.feats[plan.name] = nums
                continue
            assert plan.column is not None
            value = vals.get(plan.column)
            if _is_missing(value):
                continue
            given += 1
            if not isinstance(value, str):
                row.reasons.append(f"{prefix}: expected a string, got {value!r}")
                continue
            if mod.kind == "text":
                text, problem = _read_text(prefix, base, value)
                if problem:
                    row.reasons.append(problem)
                else:
                    row.feats[plan.name] = text
                continue
            rel = value.strip()
            fpath = _resolve(base, rel)
            problem = _check_file(prefix, rel, fpath)
            if problem:
                row.reasons.append(problem)
                continue
            if mod.kind == "image":
                try:
                    row.feats[plan.name] = _load_image(fpath, mod.image_size, mod.channels)
                except Exception as e:
                    row.reasons.append(f"{prefix}: {rel!r} could not be decoded ({_exc(e)})")
            else:
                try:
                    wav = _load_wav(fpath)
                except Exception as e:
                    row.reasons.append(
                        f"{prefix}: {rel!r} is not a valid WAV file ({_wav_reason(e)})"
                    )
                else:
                    audio.add(row, plan.name, wav)
        if given == 0:
            names = [p.name for p in plans]
            row.reasons.append(f"no modality present (all of {names} are empty)")
    audio.flush()

    # tabular vector lengths (needs all rows when the length is inferred)
    dims: dict[str, int] = {}
    for plan in plans:
        if plan.mod.kind != "tabular":
            continue
        if plan.columns:
            dims[plan.name] = len(plan.columns)
            continue
        lengths = [len(v) for r in rows if isinstance(v := r.feats.get(plan.name), list)]
        if plan.mod.size is not None:
            dim = plan.mod.size
        elif lengths:
            dim = Counter(lengths).most_common(1)[0][0]  # ties: first seen
        else:
            dim = 1
        dims[plan.name] = dim
        for r in rows:
            v = r.feats.get(plan.name)
            if isinstance(v, list) and len(v) != dim:
                hint = "" if plan.mod.size is not None else " (the most common length)"
                r.reasons.append(
                    f"{plan.prefix}: expected {dim} numeric values{hint}, got {len(v)}"
                )

    problems = [(r.line, "; ".join(r.reasons)) for r in rows if r.reasons]
    good = [r for r in rows if not r.reasons]
    if problems and on_bad_record == "fail":
        raise BadRecordsError(problems, source=source)
    if not good:
        shown = "\n".join(f"  row {n}: {why}" for n, why in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(f"{source}: all {len(rows)} record(s) are bad:\n{shown}{more}")
    if problems:
        lines = ", ".join(str(n) for n, _ in problems[:10]) + (
            ", ..." if len(problems) > 10 else ""
        )
        warnings.warn(
            f"{source}: skipped {len(problems)} of {len(rows)} record(s) as bad (rows {lines}); "
            f"first: row {problems[0][0]}: {problems[0][1]}. The returned problems list has "
            "every row and reason; use on_bad_record='fail' to see them as an error.",
            stacklevel=2,
        )

    class_names = (
        declared if declared is not None else _natural_classes({r.label or "" for r in good})
    )
    index = {c: i for i, c in enumerate(class_names)}
    n = len(good)
    specs: list[ModalitySpec] = []
    inputs: dict[str, torch.Tensor] = {}
    present: dict[str, torch.Tensor] = {}
    for plan in plans:
        kind: ModalityKind = plan.mod.kind
        mask = np.array([plan.name in r.feats for r in good], dtype=bool)
        if kind == "text":
            texts = [str(r.feats.get(plan.name, "")) for r in good]
            arr: np.ndarray = hash_text(texts, TEXT_VOCAB, TEXT_MAX_TOKENS)
            arr[~mask] = 0
            specs.append(ModalitySpec(plan.name, kind, (TEXT_MAX_TOKENS,), TEXT_VOCAB))
        else:
            if kind == "image":
                s = plan.mod.image_size
                shape: tuple[int, ...] = (plan.mod.channels, s, s)
            elif kind == "audio":
                shape = log_mel_shape()
            else:
                shape = (dims[plan.name],)
            arr = np.zeros((n, *shape), dtype=np.float32)
            for i, r in enumerate(good):
                v = r.feats.get(plan.name)
                if v is not None:
                    arr[i] = np.asarray(v, dtype=np.float32).reshape(shape)
            specs.append(ModalitySpec(plan.name, kind, shape))
        inputs[plan.name] = torch.from_numpy(arr)
        present[plan.name] = torch.from_numpy(mask)

    dataset = MultimodalDataset(
        specs=specs,
        inputs=inputs,
        present=present,
        labels=torch.tensor([index[r.label or ""] for r in good], dtype=torch.int64),
        classes=list(class_names),
        ids=[r.id or "" for r in good],
        name=path.name,
        meta={"source": source, "format": suffix[1:], "skipped": len(problems)},
    )
    return dataset, problems
