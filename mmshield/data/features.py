"""Fixed, parameter-free featurisers: log-mel spectrograms for audio, hashed n-grams for text.

They run once when data is loaded (on the data owner's side), not in every training step, so the
model's audio encoder is a small CNN over log-mel features and its text encoder an embedding bag
over hashed character n-grams.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 8000
AUDIO_SECONDS = 0.8
N_FFT = 256
HOP = 160
N_MELS = 32
TEXT_VOCAB = 4096
TEXT_MAX_TOKENS = 96


def audio_num_samples() -> int:
    """Waveform length (samples) every clip is padded or cropped to."""
    return int(SAMPLE_RATE * AUDIO_SECONDS)


def log_mel_shape() -> tuple[int, int, int]:
    """Shape ``(1, mels, frames)`` of :func:`log_mel` output per clip."""
    frames = 1 + (audio_num_samples() - N_FFT) // HOP
    return (1, N_MELS, frames)


@lru_cache(maxsize=4)
def _mel_filterbank(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Triangular mel filters (HTK mel scale), shape ``(n_fft // 2 + 1, n_mels)``."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    bins = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mels = np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sr / 2)), n_mels + 2)
    hz = mel_to_hz(mels)
    fb = np.zeros((n_fft // 2 + 1, n_mels), dtype=np.float64)
    for m in range(n_mels):
        lo, mid, hi = hz[m], hz[m + 1], hz[m + 2]
        up = (bins - lo) / max(mid - lo, 1e-9)
        down = (hi - bins) / max(hi - mid, 1e-9)
        fb[:, m] = np.clip(np.minimum(up, down), 0.0, None)
    return fb.astype(np.float32)


def fit_length(wave: np.ndarray, n: int | None = None) -> np.ndarray:
    """Crop or zero-pad a 1-D waveform to ``n`` samples (default :func:`audio_num_samples`)."""
    n = audio_num_samples() if n is None else n
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    if wave.shape[0] >= n:
        return wave[:n]
    return np.pad(wave, (0, n - wave.shape[0]))


def resample(wave: np.ndarray, sr_from: int, sr_to: int = SAMPLE_RATE) -> np.ndarray:
    """Resample by linear interpolation (adequate for speech features at 8 kHz)."""
    if sr_from == sr_to:
        return np.asarray(wave, dtype=np.float32)
    n_out = max(1, round(len(wave) * sr_to / sr_from))
    t_out = np.arange(n_out) * (sr_from / sr_to)
    return np.interp(t_out, np.arange(len(wave)), wave).astype(np.float32)


def log_mel(waves: np.ndarray) -> np.ndarray:
    """Log-mel spectrograms of fixed-length waveforms.

    Parameters
    ----------
    waves
        ``(N, samples)`` float waveforms at :data:`SAMPLE_RATE`, already of length
        :func:`audio_num_samples`.

    Returns
    -------
    numpy.ndarray
        ``(N, 1, N_MELS, frames)`` float32, roughly zero-mean, unit-scale.
    """
    waves = np.asarray(waves, dtype=np.float32)
    if waves.ndim != 2 or waves.shape[1] != audio_num_samples():
        raise ValueError(f"expected (N, {audio_num_samples()}) waveforms, got {waves.shape}")
    frames = 1 + (waves.shape[1] - N_FFT) // HOP
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    window = np.hanning(N_FFT).astype(np.float32)
    framed = waves[:, idx] * window  # (N, frames, n_fft)
    power = np.abs(np.fft.rfft(framed, axis=-1)) ** 2  # (N, frames, bins)
    mel = power @ _mel_filterbank(SAMPLE_RATE, N_FFT, N_MELS)  # (N, frames, mels)
    logmel = np.log(mel + 1e-6)
    out = (logmel.transpose(0, 2, 1) + 6.0) / 4.0  # fixed affine scale, not data-dependent
    return out[:, None, :, :].astype(np.float32)


def _bucket(token: str, vocab: int) -> int:
    return 1 + zlib.crc32(token.encode("utf-8")) % (vocab - 1)


def hash_text(
    texts: list[str], vocab: int = TEXT_VOCAB, max_tokens: int = TEXT_MAX_TOKENS
) -> np.ndarray:
    """Hashed word and character-trigram ids, padded with 0.

    Parameters
    ----------
    texts
        Raw strings.
    vocab
        Number of hash buckets (id 0 is reserved for padding).
    max_tokens
        Ids kept per text (the rest are dropped).

    Returns
    -------
    numpy.ndarray
        ``(len(texts), max_tokens)`` int64.
    """
    out = np.zeros((len(texts), max_tokens), dtype=np.int64)
    for i, text in enumerate(texts):
        ids: list[int] = []
        for word in text.lower().split():
            ids.append(_bucket("w:" + word, vocab))
            padded = f"<{word}>"
            ids.extend(_bucket(padded[j : j + 3], vocab) for j in range(len(padded) - 2))
        ids = ids[:max_tokens]
        out[i, : len(ids)] = ids
    return out
