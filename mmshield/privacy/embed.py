"""Private on-device embeddings: clip, then add analytic-Gaussian noise, charged per device.

A device computes the embedding of its own record with a model it holds locally, clips it to L2
norm ``C`` and adds Gaussian noise calibrated with the analytic Gaussian mechanism (Balle & Wang
2018, via ``dp_accounting.get_sigma_gaussian``) for sensitivity ``2C``: replacing the record can
move a clipped embedding anywhere in a ball of radius ``C``. Noise of scale Δ/ε on an *unclipped*
embedding, as some articles suggest, guarantees nothing because Δ is unbounded; clipping is what
makes the sensitivity finite.

Nothing here opens a network connection: models are read from local files only (the caller passes
the model; :func:`mmshield.cli` loads mmshield checkpoints from a run directory).
"""

from __future__ import annotations

import dp_accounting as dpa
import numpy as np
import torch

from mmshield.data.dataset import MultimodalDataset
from mmshield.errors import PrivacyError
from mmshield.models.model import MultimodalModel
from mmshield.privacy.noise import NoiseSource


def embed_records(model: MultimodalModel, data: MultimodalDataset, batch: int = 256) -> np.ndarray:
    """Fused embeddings ``(N, D)`` of ``data``'s records (no noise)."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(data), batch):
            part = data.subset(np.arange(i, min(i + batch, len(data))))
            out.append(model.embed(part.inputs, part.present).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def gaussian_sigma(epsilon: float, delta: float, clip_norm: float) -> float:
    """Noise standard deviation for one (ε, δ) release of a vector clipped to ``clip_norm``."""
    if not epsilon > 0 or not 0 < delta < 1 or not clip_norm > 0:
        raise PrivacyError(
            f"private embeddings need ε > 0, 0 < δ < 1 and clip norm > 0 "
            f"(got {epsilon}, {delta}, {clip_norm})"
        )
    return float(dpa.get_sigma_gaussian(epsilon, delta)) * 2.0 * clip_norm


def privatise(
    embeddings: np.ndarray, epsilon: float, delta: float, clip_norm: float, source: NoiseSource
) -> np.ndarray:
    """Clip each row to ``clip_norm`` and add analytic-Gaussian noise for (ε, δ) per row."""
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    clipped = x * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
    sigma = gaussian_sigma(epsilon, delta, clip_norm)
    noise = source.normal(clipped.shape, sigma, dtype=torch.float64).numpy()
    return (clipped + noise).astype(np.float32)
