"""Tests of the built-in ``av-digits`` data set (file, loader, determinism, split hygiene)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from mmshield.data.av_digits import build_av_digits, data_file, load_av_digits
from mmshield.data.dataset import ModalitySpec, MultimodalDataset
from mmshield.data.features import TEXT_MAX_TOKENS, TEXT_VOCAB, log_mel_shape
from mmshield.errors import DataError


@pytest.fixture(scope="module")
def splits() -> tuple[MultimodalDataset, MultimodalDataset]:
    return load_av_digits()


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    with data_file().open("rb") as fh, np.load(fh) as npz:
        return {k: npz[k] for k in npz.files}


def test_file_size_within_budget() -> None:
    assert Path(str(data_file())).stat().st_size <= 10 * 1024 * 1024


def test_specs_shapes_and_dtypes(splits: tuple[MultimodalDataset, MultimodalDataset]) -> None:
    for ds in splits:
        assert ds.name == "av-digits"
        assert ds.classes == [str(d) for d in range(10)]
        assert ds.specs == [
            ModalitySpec("image", "image", (1, 28, 28)),
            ModalitySpec("audio", "audio", log_mel_shape()),
            ModalitySpec("text", "text", (TEXT_MAX_TOKENS,), vocab_size=TEXT_VOCAB),
        ]
        n = len(ds)
        image, audio, text = ds.inputs["image"], ds.inputs["audio"], ds.inputs["text"]
        assert image.dtype == torch.float32 and image.shape == (n, 1, 28, 28)
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert audio.dtype == torch.float32 and audio.shape == (n, *log_mel_shape())
        assert bool(torch.isfinite(audio).all())
        assert text.dtype == torch.int64 and text.shape == (n, TEXT_MAX_TOKENS)
        assert int(text.min()) >= 0 and int(text.max()) < TEXT_VOCAB
        assert ds.labels.dtype == torch.int64
        assert all(bool(p.all()) and p.dtype == torch.bool for p in ds.present.values())
        assert ds.ids is not None and all(re.fullmatch(r"avd-\d{5}", i) for i in ds.ids)
        texts = ds.meta["texts"]
        assert isinstance(texts, list) and len(texts) == n and all(texts)


def test_split_sizes_and_class_balance(
    splits: tuple[MultimodalDataset, MultimodalDataset],
) -> None:
    train, test = splits
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [100] * 10
    assert train.ids is not None and test.ids is not None
    assert len(set(train.ids) | set(test.ids)) == 5000


def test_raw_file_contents(raw: dict[str, np.ndarray]) -> None:
    assert raw["images"].shape == (5000, 28, 28) and raw["images"].dtype == np.uint8
    assert np.bincount(raw["labels"], minlength=10).tolist() == [500] * 10
    assert raw["texts"].shape == (5000,) and raw["texts"].dtype.kind == "U"
    assert raw["clips"].dtype == np.int8 and raw["clips"].shape[1] <= 6400


def test_train_and_test_use_disjoint_clip_pools(raw: dict[str, np.ndarray]) -> None:
    clip_of_sample, split = raw["clip_of_sample"], raw["split"]
    train_clips = set(clip_of_sample[split == 0].tolist())
    test_clips = set(clip_of_sample[split == 1].tolist())
    assert train_clips and test_clips and not train_clips & test_clips
    # every sample hears a clip of its own label, from its own split's pool
    assert np.array_equal(raw["clip_label"][clip_of_sample], raw["labels"])
    assert np.array_equal(raw["clip_split"][clip_of_sample], split)


def test_deterministic_across_loads(
    splits: tuple[MultimodalDataset, MultimodalDataset],
) -> None:
    fresh = build_av_digits()  # bypasses the in-process cache
    for a, b in zip(splits, fresh, strict=True):
        assert a.ids == b.ids
        assert torch.equal(a.labels, b.labels)
        for name in a.modalities:
            assert torch.equal(a.inputs[name], b.inputs[name])
        assert a.meta["texts"] == b.meta["texts"]


def test_returns_independent_copies() -> None:
    train, _ = load_av_digits()
    before = train.inputs["image"][0].clone()
    train.inputs["image"][0] = 0.5
    train.labels[0] = 9 - int(train.labels[0])
    again, _ = load_av_digits()
    assert torch.equal(again.inputs["image"][0], before)
    assert not torch.equal(again.labels[:1], train.labels[:1])


def test_missing_file_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing"):
        build_av_digits(source=tmp_path / "nope.npz")


def test_corrupt_file_raises_data_error(tmp_path: Path) -> None:
    bad = tmp_path / "av_digits.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="corrupt"):
        build_av_digits(source=bad)
    np.savez_compressed(bad, images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="lacks"):
        build_av_digits(source=bad)


def test_subset_indexes_per_record_meta() -> None:
    from mmshield.data.av_digits import load_av_digits

    train, _ = load_av_digits()
    part = train.subset([5, 2])
    texts = train.meta["texts"]
    assert isinstance(texts, list) and part.meta["texts"] == [texts[5], texts[2]]
    degraded = train.meta["image_degraded"]
    assert len(part.meta["image_degraded"]) == 2  # type: ignore[arg-type]
    assert bool(part.meta["image_degraded"][0]) == bool(degraded[5])  # type: ignore[index]
