"""Shared fixtures: a small random multimodal data set, a private ledger, a benchmark runner."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_benchmark() -> Callable[..., tuple[str, dict[str, Any]]]:
    """``run(name, out, *args, timeout=300)``: ``python -m benchmarks.NAME --quick *args --out
    OUT`` in a subprocess; asserts it succeeded and returns its stdout and the JSON it wrote."""

    def run(name: str, out: Path, *args: str, timeout: float = 300) -> tuple[str, dict[str, Any]]:
        proc = subprocess.run(
            [sys.executable, "-m", f"benchmarks.{name}", "--quick", *args, "--out", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout, json.loads(Path(out).read_text())

    return run
