"""Per-modality encoders: each maps one modality's featurised tensor to an ``embed_dim`` vector.

None of them uses batch statistics (no BatchNorm), so one sample's output never depends on another
sample in the batch: a requirement for masking absent modalities exactly and for per-sample DP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmshield.data.dataset import ModalitySpec


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


class ConvEncoder(nn.Module):
    """Small two-layer strided CNN for images ``(C, H, W)`` and log-mel spectrograms ``(1, M, T)``.

    Parameters
    ----------
    in_shape
        Per-sample input shape ``(C, H, W)``.
    embed_dim
        Output size.
    """

    def __init__(self, in_shape: tuple[int, ...], embed_dim: int) -> None:
        super().__init__()
        c, h, w = in_shape
        self.conv1 = nn.Conv2d(c, 16, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1)
        h2 = _conv_out(_conv_out(h, 5, 2, 2), 3, 2, 1)
        w2 = _conv_out(_conv_out(w, 5, 2, 2), 3, 2, 1)
        self.proj = nn.Linear(32 * h2 * w2, embed_dim)
        # Per-sample normalisation (never batch statistics) speeds up plain SGD a lot here.
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``(B, C, H, W)`` to ``(B, embed_dim)``."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return F.relu(self.norm(self.proj(x.flatten(1))))


class TextEncoder(nn.Module):
    """Embedding bag (mean over non-padding ids) over hashed n-grams, then a linear layer.

    Parameters
    ----------
    vocab_size
        Number of hash buckets; id 0 is padding.
    embed_dim
        Output size.
    """

    def __init__(self, vocab_size: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        # The mean of many random embeddings is small; normalising it per sample keeps the
        # gradients reaching each embedding row large enough for plain SGD.
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Encode int64 ``(B, L)`` ids to ``(B, embed_dim)``."""
        # Masked mean instead of nn.EmbeddingBag: it composes with torch.func.vmap.
        mask = (ids > 0).to(self.embedding.weight.dtype).unsqueeze(-1)
        summed = (self.embedding(ids) * mask).sum(1)
        mean = summed / mask.sum(1).clamp_min(1.0)
        return F.relu(self.proj(self.norm(mean)))


class TabularEncoder(nn.Module):
    """One linear layer with ReLU for numeric vectors ``(D,)``.

    Parameters
    ----------
    in_features
        Vector length ``D``.
    embed_dim
        Output size.
    """

    def __init__(self, in_features: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode ``(B, D)`` to ``(B, embed_dim)``."""
        return F.relu(self.linear(x))


def build_encoder(spec: ModalitySpec, embed_dim: int) -> nn.Module:
    """Return the default encoder for a modality spec."""
    if spec.kind in ("image", "audio"):
        if len(spec.shape) != 3:
            raise ValueError(f"modality {spec.name!r}: expected (C, H, W), got {spec.shape}")
        return ConvEncoder(spec.shape, embed_dim)
    if spec.kind == "text":
        return TextEncoder(spec.vocab_size, embed_dim)
    if spec.kind == "tabular":
        return TabularEncoder(spec.shape[0], embed_dim)
    raise ValueError(f"modality {spec.name!r}: unknown kind {spec.kind!r}")
