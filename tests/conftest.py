"""Shared fixtures: a small random multimodal data set."""

from __future__ import annotations

import pytest
import torch

from mmshield.data.dataset import ModalitySpec, MultimodalDataset


def make_toy(n: int = 120, seed: int = 0, classes: int = 4) -> MultimodalDataset:
    """Random image + text + tabular records whose labels depend on every modality."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    image = torch.rand((n, 1, 12, 12), generator=g) * 0.5
    image[:, 0, :3, :3] += labels.view(-1, 1, 1).float() / classes
    text = torch.randint(1, 64, (n, 10), generator=g)
    text[:, 0] = labels + 1
    text[:, 7:] = 0
    tab = torch.randn((n, 5), generator=g) + labels.view(-1, 1).float()
    specs = [
        ModalitySpec("image", "image", (1, 12, 12)),
        ModalitySpec("text", "text", (10,), vocab_size=64),
        ModalitySpec("tab", "tabular", (5,)),
    ]
    return MultimodalDataset(
        specs=specs,
        inputs={"image": image, "text": text, "tab": tab},
        present={m: torch.ones(n, dtype=torch.bool) for m in ("image", "text", "tab")},
        labels=labels,
        classes=[str(c) for c in range(classes)],
        name="toy",
    )


@pytest.fixture
def toy() -> MultimodalDataset:
    return make_toy()


@pytest.fixture(autouse=True)
def _private_ledger(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test gets its own privacy ledger, never the user's."""
    monkeypatch.setenv("MMSHIELD_LEDGER", str(tmp_path_factory.mktemp("ledger") / "ledger.db"))
