"""The built-in ``av-digits`` data set: ten digit classes seen as an image, a spoken word and text.

Like AV-MNIST, every modality alone is imperfect and fusing them is clearly better, so a client
that misses a modality loses accuracy. The shipped file ``builtin/av_digits.npz`` (built by
``scripts/build_av_digits.py``) holds clean data:

* 5,000 real MNIST digits (500 per class), split 4,000 train / 1,000 test (stratified);
* 8 kHz ``espeak-ng`` recordings of the words "zero" .. "nine" (8-bit mu-law), each sample
  mapped to one clip of its label; train and test samples use disjoint clip pools;
* one short noisy description per sample (properties shared by several digits, typos).

:func:`load_av_digits` corrupts images and audio deterministically (with :data:`DATA_SEED`, not a
run seed, so every run sees the same data set) and featurises audio (log-mel) and text (hashed
n-grams). Each sample draws a degradation pattern (defaults of :class:`Corruption`): neither
modality degraded (51 %), only the image (20 %), only the audio (28 %) or both (1 %).

* **image**, mild: Gaussian pixel noise with standard deviation U(0, 0.1); degraded: 2 or 3
  occluding rectangles (sides 7-13 px, each erased to background or filled with ink) and
  Gaussian noise with standard deviation U(0.6, 0.9); clipped to [0, 1];
* **audio**: random gain (-12 to 0 dB), random time shift (the word starts anywhere from 50 ms
  before the clip start to where it just fits), then white, pink or babble noise (babble = 3-6
  other clips of the same split's pool, any label) at an SNR of U(15, 35) dB (mild) or
  U(-25, -10) dB (degraded);
* **text**: as shipped (already noisy).

The per-sample pattern is recorded in ``meta["image_degraded"]`` and ``meta["audio_degraded"]``.

Only NumPy and PyTorch are needed at load time; the result is cached in-process and every call
returns fresh copies of the tensors.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable

import numpy as np
import torch

from mmshield.data.dataset import ModalitySpec, MultimodalDataset
from mmshield.data.features import (
    TEXT_MAX_TOKENS,
    TEXT_VOCAB,
    audio_num_samples,
    hash_text,
    log_mel,
    log_mel_shape,
)
from mmshield.errors import DataError

__all__ = [
    "DATA_SEED",
    "NAME",
    "Corruption",
    "build_av_digits",
    "data_file",
    "load_av_digits",
]

NAME = "av-digits"
DATA_SEED = 20_241_123
"""Fixed seed of the load-time corruption (part of the data set's definition)."""

_RESOURCE = ("builtin", "av_digits.npz")
_CLASSES = [str(d) for d in range(10)]
_MU = 255.0
_KEYS = (
    "images",
    "labels",
    "split",
    "clips",
    "clip_length",
    "clip_split",
    "clip_of_sample",
    "texts",
)


@dataclass(frozen=True)
class Corruption:
    """Strength of the load-time corruption (the defaults define ``av-digits``).

    Every sample first draws a degradation pattern: its image, its audio, both or neither are
    *degraded* (heavily corrupted) and the others only mildly corrupted. Ranges ``(lo, hi)`` are
    sampled uniformly per sample.

    Parameters
    ----------
    pattern_p
        Probabilities of the patterns: nothing, image only, audio only, image and audio degraded.
    image_noise, image_noise_degraded
        Standard deviation of the Gaussian pixel noise (mild, degraded).
    image_patches, image_patches_degraded
        Probabilities of 0, 1, 2, 3 occluding rectangles per image (mild, degraded).
    patch_size, patch_size_degraded
        Range (inclusive) of a rectangle's side lengths in pixels (mild, degraded).
    patch_ink
        Probability that a rectangle is filled with ink (1.0) rather than erased (0.0).
    audio_snr_db, audio_snr_db_degraded
        Speech-to-noise ratio in dB (mild, degraded).
    audio_noise_p
        Probabilities of white, pink and babble noise.
    babble_talkers
        Range (inclusive) of the number of clips mixed into babble noise.
    audio_gain_db
        Range of the random gain applied to the speech.
    """

    pattern_p: tuple[float, float, float, float] = (0.51, 0.20, 0.28, 0.01)
    image_noise: tuple[float, float] = (0.0, 0.1)
    image_noise_degraded: tuple[float, float] = (0.6, 0.9)
    image_patches: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)
    image_patches_degraded: tuple[float, float, float, float] = (0.0, 0.0, 0.3, 0.7)
    patch_size: tuple[int, int] = (7, 13)
    patch_size_degraded: tuple[int, int] = (7, 13)
    patch_ink: float = 0.5
    audio_snr_db: tuple[float, float] = (15.0, 35.0)
    audio_snr_db_degraded: tuple[float, float] = (-25.0, -10.0)
    audio_noise_p: tuple[float, float, float] = (0.3, 0.3, 0.4)
    babble_talkers: tuple[int, int] = (3, 6)
    audio_gain_db: tuple[float, float] = (-12.0, 0.0)


def _draw(
    degraded: np.ndarray,
    mild: tuple[float, float],
    heavy: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """Per-sample uniform draws from ``heavy`` where ``degraded`` else from ``mild``."""
    u = rng.random(degraded.shape[0])
    lo = np.where(degraded, heavy[0], mild[0])
    hi = np.where(degraded, heavy[1], mild[1])
    return lo + u * (hi - lo)


def data_file() -> Traversable:
    """Location of the shipped ``av_digits.npz`` (package data ``mmshield/data/builtin/``)."""
    return resources.files("mmshield.data").joinpath(*_RESOURCE)


def _read_npz(ref: Traversable | None = None) -> dict[str, np.ndarray]:
    """Read and validate ``av_digits.npz`` (default: the shipped file; a ``Path`` also works)."""
    ref = data_file() if ref is None else ref
    where = str(ref)
    if not ref.is_file():
        raise DataError(
            f"{NAME}: data file {where} is missing; reinstall mmshield or rebuild it with "
            "`python scripts/build_av_digits.py`"
        )
    try:
        with ref.open("rb") as fh, np.load(fh, allow_pickle=False) as npz:
            data = {k: np.asarray(npz[k]) for k in _KEYS}
    except KeyError as exc:
        raise DataError(f"{NAME}: data file {where} lacks array {exc}; rebuild it") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{NAME}: data file {where} is corrupt ({exc}); rebuild it") from exc
    n = data["labels"].shape[0]
    n_clips = data["clips"].shape[0]
    ok = (
        data["images"].shape == (n, 28, 28)
        and data["images"].dtype == np.uint8
        and data["split"].shape == (n,)
        and data["texts"].shape == (n,)
        and data["clip_of_sample"].shape == (n,)
        and data["clips"].ndim == 2
        and data["clips"].dtype == np.int8
        and data["clips"].shape[1] <= audio_num_samples()
        and data["clip_length"].shape == (n_clips,)
        and data["clip_split"].shape == (n_clips,)
        and n > 0
        and int(data["labels"].min()) >= 0
        and int(data["labels"].max()) < len(_CLASSES)
        and int(data["clip_of_sample"].min()) >= 0
        and int(data["clip_of_sample"].max()) < n_clips
    )
    if not ok:
        raise DataError(
            f"{NAME}: data file {where} has unexpected array shapes or values; rebuild it"
        )
    return data


def _mu_law_decode(codes: np.ndarray) -> np.ndarray:
    y = codes.astype(np.float32) / 127.0
    return (np.sign(y) * np.expm1(np.abs(y) * np.log1p(_MU)) / _MU).astype(np.float32)


def _corrupt_images(
    images: np.ndarray, degraded: np.ndarray, c: Corruption, rng: np.random.Generator
) -> np.ndarray:
    """Occlusion rectangles and Gaussian noise; returns float32 ``(N, 1, 28, 28)`` in [0, 1]."""
    n = images.shape[0]
    x = images.astype(np.float32) / 255.0
    cum_mild = np.cumsum(c.image_patches)
    cum_heavy = np.cumsum(c.image_patches_degraded)
    u = rng.random(n)
    n_patches = np.where(
        degraded,
        np.searchsorted(cum_heavy, u, side="right"),
        np.searchsorted(cum_mild, u, side="right"),
    )
    n_patches = np.minimum(n_patches, len(c.image_patches) - 1)
    for i in range(n):
        lo, hi = c.patch_size_degraded if degraded[i] else c.patch_size
        for _ in range(int(n_patches[i])):
            h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
            r, col = int(rng.integers(0, 29 - h)), int(rng.integers(0, 29 - w))
            x[i, r : r + h, col : col + w] = 1.0 if rng.random() < c.patch_ink else 0.0
    sigma = _draw(degraded, c.image_noise, c.image_noise_degraded, rng)
    sigma = sigma.astype(np.float32)[:, None, None]
    x += sigma * rng.standard_normal(x.shape, dtype=np.float32)
    return np.clip(x, 0.0, 1.0)[:, None]


def _pink(n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rows of 1/f noise (unit RMS)."""
    spec = np.fft.rfft(rng.standard_normal((n, length), dtype=np.float32), axis=1)
    f = np.arange(spec.shape[1], dtype=np.float32)
    f[0] = 1.0
    x = np.fft.irfft(spec / np.sqrt(f), n=length, axis=1).astype(np.float32)
    return x / np.sqrt(np.mean(x**2, axis=1, keepdims=True) + 1e-12)


def _add_shifted(out: np.ndarray, clip: np.ndarray, offset: int) -> None:
    """Add ``clip`` to ``out`` starting at ``offset`` (negative crops the clip's start)."""
    if offset < 0:
        clip, offset = clip[-offset:], 0
    n = max(0, min(len(clip), out.shape[0] - offset))
    out[offset : offset + n] += clip[:n]


def _corrupt_audio(
    decoded: list[np.ndarray],
    clip_ids: np.ndarray,
    pool: np.ndarray,
    degraded: np.ndarray,
    c: Corruption,
    rng: np.random.Generator,
) -> np.ndarray:
    """Gain, time shift and background noise; returns float32 ``(N, samples)`` waveforms."""
    length = audio_num_samples()
    n = clip_ids.shape[0]

    def offset(k: int) -> int:
        return int(rng.integers(-length // 16, max(0, length - len(decoded[k])) + 1))

    speech = np.zeros((n, length), dtype=np.float32)
    for i, k in enumerate(clip_ids.tolist()):
        _add_shifted(speech[i], decoded[k], offset(k))
    speech *= (10.0 ** (rng.uniform(*c.audio_gain_db, size=(n, 1)) / 20.0)).astype(np.float32)
    active = np.array([min(length, len(decoded[k])) for k in clip_ids.tolist()], np.float32)
    speech_power = np.sum(speech**2, axis=1) / np.maximum(active, 1.0)

    kind = rng.choice(3, size=n, p=np.asarray(c.audio_noise_p))
    noise = rng.standard_normal((n, length), dtype=np.float32)
    pink_rows = np.flatnonzero(kind == 1)
    noise[pink_rows] = _pink(len(pink_rows), length, rng)
    lo, hi = c.babble_talkers
    for i in np.flatnonzero(kind == 2).tolist():
        mix = np.zeros(length, dtype=np.float32)
        for k in rng.choice(pool, size=int(rng.integers(lo, hi + 1))).tolist():
            _add_shifted(mix, decoded[k], offset(k))
        noise[i] = mix / np.sqrt(np.mean(mix**2) + 1e-12)
    snr = _draw(degraded, c.audio_snr_db, c.audio_snr_db_degraded, rng)
    noise *= np.sqrt(speech_power / 10.0 ** (snr / 10.0)).astype(np.float32)[:, None]
    return speech + noise


def _make_split(
    data: dict[str, np.ndarray],
    decoded: list[np.ndarray],
    split: int,
    c: Corruption,
    rng: np.random.Generator,
) -> MultimodalDataset:
    rows = np.flatnonzero(data["split"] == split)
    labels = data["labels"][rows]
    texts = [str(t) for t in data["texts"][rows]]
    pool = np.flatnonzero(data["clip_split"] == split)
    pattern = rng.choice(4, size=len(rows), p=np.asarray(c.pattern_p))
    image_degraded = (pattern == 1) | (pattern == 3)
    audio_degraded = (pattern == 2) | (pattern == 3)
    image = _corrupt_images(data["images"][rows], image_degraded, c, rng)
    wave = _corrupt_audio(decoded, data["clip_of_sample"][rows], pool, audio_degraded, c, rng)
    audio = np.concatenate([log_mel(wave[i : i + 500]) for i in range(0, len(rows), 500)])
    text = hash_text(texts)
    specs = [
        ModalitySpec("image", "image", (1, 28, 28)),
        ModalitySpec("audio", "audio", log_mel_shape()),
        ModalitySpec("text", "text", (TEXT_MAX_TOKENS,), vocab_size=TEXT_VOCAB),
    ]
    n = len(rows)
    return MultimodalDataset(
        specs=specs,
        inputs={
            "image": torch.from_numpy(image),
            "audio": torch.from_numpy(audio),
            "text": torch.from_numpy(text),
        },
        present={s.name: torch.ones(n, dtype=torch.bool) for s in specs},
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=list(_CLASSES),
        ids=[f"avd-{int(r):05d}" for r in rows],
        name=NAME,
        meta={
            "texts": texts,
            "split": "train" if split == 0 else "test",
            "image_degraded": image_degraded.tolist(),
            "audio_degraded": audio_degraded.tolist(),
        },
    )


def build_av_digits(
    corruption: Corruption | None = None, source: Traversable | None = None
) -> tuple[MultimodalDataset, MultimodalDataset]:
    """Load and corrupt ``av-digits`` without caching (for tuning; prefer :func:`load_av_digits`).

    Parameters
    ----------
    corruption
        Corruption strength; ``None`` uses the defaults that define the data set.
    source
        The ``.npz`` file to read (a ``pathlib.Path`` works); ``None`` reads :func:`data_file`.

    Returns
    -------
    tuple of MultimodalDataset
        ``(train, test)`` with 4,000 and 1,000 records.

    Raises
    ------
    DataError
        If the data file is missing or corrupt.
    """
    c = Corruption() if corruption is None else corruption
    data = _read_npz(source)
    codes = data["clips"]
    lengths = np.clip(data["clip_length"].astype(np.int64), 1, codes.shape[1])
    decoded = [_mu_law_decode(codes[k, : lengths[k]]) for k in range(codes.shape[0])]
    rng = np.random.default_rng(DATA_SEED)
    train = _make_split(data, decoded, 0, c, rng)
    test = _make_split(data, decoded, 1, c, rng)
    return train, test


@lru_cache(maxsize=1)
def _cached() -> tuple[MultimodalDataset, MultimodalDataset]:
    return build_av_digits()


def _copy(ds: MultimodalDataset) -> MultimodalDataset:
    return replace(
        ds,
        specs=list(ds.specs),
        inputs={k: v.clone() for k, v in ds.inputs.items()},
        present={k: v.clone() for k, v in ds.present.items()},
        labels=ds.labels.clone(),
        classes=list(ds.classes),
        ids=list(ds.ids) if ds.ids is not None else None,
        meta={k: (list(v) if isinstance(v, list) else v) for k, v in ds.meta.items()},
    )


def load_av_digits() -> tuple[MultimodalDataset, MultimodalDataset]:
    """Load the built-in ``av-digits`` data set (image, audio and text views of digits 0-9).

    The corruption is deterministic (seeded with :data:`DATA_SEED`), so every call returns the
    same data. The first call takes a few seconds; later calls return copies of an in-process
    cache, which callers may mutate freely.

    Returns
    -------
    tuple of MultimodalDataset
        ``(train, test)``: 4,000 and 1,000 records named ``av-digits`` with modalities
        ``image`` (float32 ``(1, 28, 28)`` in [0, 1]), ``audio`` (float32 log-mel
        :func:`~mmshield.data.features.log_mel_shape`) and ``text`` (int64 hashed n-gram ids,
        ``(TEXT_MAX_TOKENS,)``), all present; classes ``"0"`` .. ``"9"``; ids ``avd-NNNNN``;
        the raw descriptions in ``meta["texts"]``.

    Raises
    ------
    DataError
        If the shipped data file is missing or corrupt.
    """
    train, test = _cached()
    return _copy(train), _copy(test)
